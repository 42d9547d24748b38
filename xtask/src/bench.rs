//! `cargo xtask bench`: figures, not tests. It measures and reports; a
//! missed target is printed, never an error, and `cargo xtask test` does
//! not run it.
//!
//! Two stages, because the measurements load the XDP programs through
//! `splitter-user`, whose build script needs the BPF toolchain that
//! `setup` installs (so the plain xtask cannot link it), and the bench's
//! own reference programs (`bench-ebpf`), which this crate's build script
//! (`xtask/build.rs`) builds with that toolchain only for the `bench`
//! feature, into this crate's `OUT_DIR` (never into the product's):
//!
//! 1. this crate as always (`cargo xtask bench`): setup, the release
//!    build, then `cargo run --release -p xtask --features bench -- bench`;
//! 2. that release build with the `bench` feature measures:
//!    - [`packet`]: per-packet cost through `BPF_PROG_TEST_RUN` of the
//!      splitter program and of reference programs, in a namespace of its
//!      own, and the weight-change latency of `Dataplane::apply`;
//!    - [`control`]: Maglev table builds for 1,000 services x 100 backends;
//!    - [`bpf`]: map memory as the kernel accounts it;
//!    - [`edge`]: packets per second through the edge namespace (an
//!      in-kernel generator, counted at the backends), splitter beside
//!      kernel forwarding, nftables and a minimal XDP forwarder;
//!    - [`connrate`]: connections per second (wrk, nginx) through
//!      splitter, HAProxy, nftables and direct, and weight changes through
//!      the daemon's API, end to end;
//!
//!    then prints a table ([`report`]) and writes
//!    `docs/benchmarks/results.json`, `docs/benchmarks/per-packet.svg` and
//!    the generated part of `docs/benchmarks.md`.
//!
//! `SPLITTER_BENCH_TRAFFIC_ONLY=1` in the environment runs only the traffic
//! sections ([`edge`], [`connrate`]) and prints them, writing nothing;
//! `SPLITTER_BENCH_CONN_ONLY=1` only the connection rate ([`connrate::run`]),
//! printed, nothing written; `SPLITTER_BENCH_PACKET_ONLY=1` only the
//! per-packet section (and the Maglev builds), printed, nothing written;
//! `SPLITTER_BENCH_TARGETS=1` adds to the per-packet section SYNs and
//! established packets under 10 and 10,000 source-CIDR rules (each round
//! then adds 4 x 8192 flows to the table; the bench refuses rounds that
//! would overflow it). `SPLITTER_BENCH_CONN_CAPACITY=N` (with
//! `--no-write`) measures the per-packet section with an N-entry connection
//! table instead of the default.
//!
//! Everything it creates (a network namespace, BPF programs and maps) is
//! owned by guards and removed on return; namespaces left by a killed run
//! are removed by the next one.
// Used only by the measuring stage; compiled (and tested) in both.
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
mod edge_report;
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
mod report;
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
mod stats;

#[cfg(feature = "bench")]
mod bpf;
#[cfg(feature = "bench")]
mod connrate;
#[cfg(feature = "bench")]
mod control;
#[cfg(feature = "bench")]
mod edge;
#[cfg(feature = "bench")]
mod health;
#[cfg(feature = "bench")]
mod packet;
#[cfg(not(feature = "bench"))]
mod tools;

/// The per-packet section's reference programs (`bench-ebpf/src/bin/baseline.rs`),
/// built into this crate's `OUT_DIR` by `xtask/build.rs` with the `bench`
/// feature. A path rather than embedded bytes, so that a build with
/// `AYA_BUILD_SKIP=1` still compiles; the bench says so if it is missing.
#[cfg(feature = "bench")]
const BASELINE_OBJECT: &str = concat!(env!("OUT_DIR"), "/baseline");
/// The through-edge section's generator, receiver and minimal forwarder
/// (`bench-ebpf/src/bin/edgebench.rs`), built the same way.
#[cfg(feature = "bench")]
const EDGEBENCH_OBJECT: &str = concat!(env!("OUT_DIR"), "/edgebench");

use anyhow::Result;

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Rounds of every measurement (min / median / max are over rounds).
    pub rounds: usize,
    /// Live flows in the connection table for the established-flow cases.
    pub flows: u32,
    /// Print only; leave docs/ alone.
    pub no_write: bool,
}

/// Runs the bench; `Ok(false)` if a section could not be measured.
///
/// # Errors
/// Setup, the build or the measuring process failed to run.
pub fn bench(opts: &BenchOptions) -> Result<bool> {
    // Checked before the set-up and the build, in either stage.
    if std::env::var_os("SPLITTER_BENCH_CONN_CAPACITY").is_some() && !opts.no_write {
        anyhow::bail!(
            "SPLITTER_BENCH_CONN_CAPACITY is a diagnostic: add --no-write (the published results are of the default connection table)"
        );
    }
    #[cfg(feature = "bench")]
    {
        measure::run(opts)
    }
    #[cfg(not(feature = "bench"))]
    {
        outer(opts)
    }
}

/// Stage 1: setup, build, then stage 2 in release mode.
#[cfg(not(feature = "bench"))]
fn outer(opts: &BenchOptions) -> Result<bool> {
    use crate::util::{cargo, is_root, step};
    crate::build::build()?;
    if !is_root() {
        anyhow::bail!(
            "not root: the bench loads XDP programs and builds a network namespace; run `sudo cargo xtask bench`"
        );
    }
    if let Err(e) = tools::install_missing() {
        eprintln!("warning: {e:#}; the traffic sections that need them will say so");
    }
    step("measuring (release build of xtask with the `bench` feature)");
    let mut c = cargo();
    c.args([
        "run",
        "--release",
        "-p",
        "xtask",
        "--features",
        "bench",
        "--",
        "bench",
        "--rounds",
        &opts.rounds.to_string(),
        "--flows",
        &opts.flows.to_string(),
    ]);
    if opts.no_write {
        c.arg("--no-write");
    }
    let what = splitter_tests::netns::describe(&c);
    println!("    $ {what}");
    let status = c
        .status()
        .map_err(|e| anyhow::anyhow!("cannot start `{what}`: {e}"))?;
    Ok(status.success())
}

/// Stage 2: the measurements.
#[cfg(feature = "bench")]
mod measure {
    use std::{path::Path, time::Instant};

    use anyhow::{Context, Result, bail};
    use splitter_tests::netns::{Netns, remove_stale, run_prefix};

    use super::{
        BenchOptions, connrate, control, edge,
        edge_report::Traffic,
        health, packet,
        report::{self, ControlResults, Machine, Results},
    };
    use crate::util::{is_root, probe, step, workspace_root};

    /// Rounds of the Maglev build (each builds all 1,000 tables).
    const MAGLEV_ROUNDS: usize = 5;
    /// Most rounds of the traffic sections (each takes seconds per round).
    const TRAFFIC_ROUNDS: usize = 5;

    pub fn run(opts: &BenchOptions) -> Result<bool> {
        if !is_root() {
            bail!("not root: run `sudo cargo xtask bench`");
        }
        let stale = remove_stale();
        if !stale.is_empty() {
            step(&format!(
                "removed namespaces left by earlier runs: {}",
                stale.join(" ")
            ));
        }
        let mut machine = machine();
        if std::env::var_os("SPLITTER_BENCH_CONN_ONLY").is_some() {
            // For work on the connection rate: that section only, printed.
            let rounds = opts.rounds.min(TRAFFIC_ROUNDS);
            step(&format!(
                "connection rate: {rounds} rounds x {} paths, wrk {} s each",
                connrate::PATHS,
                connrate::duration_s()
            ));
            let t = Traffic {
                edge: None,
                conn: Some(connrate::run(rounds).map_err(|e| format!("{e:#}"))),
                api: None,
            };
            print!("{}", t.text());
            return Ok(t.measured().len() == 1);
        }
        if std::env::var_os("SPLITTER_BENCH_TRAFFIC_ONLY").is_some() {
            // For work on the traffic sections: those only, printed, nothing written.
            let t = traffic(opts.rounds.min(TRAFFIC_ROUNDS));
            print!("{}", t.text());
            return Ok(t.measured().len() == 3);
        }
        let packet_only = std::env::var_os("SPLITTER_BENCH_PACKET_ONLY").is_some();
        if packet_only {
            step(
                "SPLITTER_BENCH_PACKET_ONLY: the per-packet section only, printed, nothing written",
            );
        }
        step(&format!(
            "control plane: Maglev tables for {} services x {} backends, {MAGLEV_ROUNDS} rounds",
            control::SERVICES,
            control::BACKENDS
        ));
        let maglev = control::maglev_build(MAGLEV_ROUNDS);
        step(&format!(
            "per-packet cost: {} rounds, {} live flows, then a full connection table",
            opts.rounds, opts.flows
        ));
        let popts = packet::PacketOptions {
            rounds: opts.rounds,
            flows: opts.flows,
        };
        let measured = (|| -> Result<_> {
            let ns = Netns::new(format!("{}-bench", run_prefix()))?;
            packet::build_topology(&ns)?;
            ns.enter(|| packet::run(popts))?
        })();
        let (packet, extras) = match measured {
            Ok((p, x)) => (Ok(p), Some(x)),
            Err(e) => (Err(format!("{e:#}")), None),
        };
        machine.pinned_cpu = extras.as_ref().and_then(|x| x.pinned_cpu);
        let health_removal_ms = if packet_only {
            Err("not measured (SPLITTER_BENCH_PACKET_ONLY)".to_string())
        } else {
            step("control plane: backend death to removal with default health checks, 3 rounds");
            health::backend_death(3).map_err(|e| format!("{e:#}"))
        };
        let control = maglev
            .map(|maglev_ms| {
                let mut c = ControlResults {
                    services: control::SERVICES,
                    backends_per_service: control::BACKENDS,
                    maglev_ms,
                    health_removal_ms,
                    ..ControlResults::default()
                };
                if let Some(x) = extras {
                    c.apply_us = x.apply_us;
                    c.rollback_us = x.rollback_us;
                    c.rollback_misses = x.rollback_misses;
                    c.live_scan_ms = x.live_scan_ms;
                    c.live_scan_flows = x.live_scan_flows;
                    c.apply_misses = x.apply_misses;
                    c.maps = x.maps;
                }
                c
            })
            .map_err(|e| format!("{e:#}"));
        let traffic = if packet_only {
            Traffic {
                edge: None,
                conn: None,
                api: None,
            }
        } else {
            traffic(opts.rounds.min(TRAFFIC_ROUNDS))
        };
        let results = Results {
            machine,
            packet,
            control,
            traffic,
        };
        step("results");
        print!("{}", report::text(&results));
        if !opts.no_write && !packet_only {
            write(&results)?;
        }
        Ok(results.packet.is_ok() && results.control.is_ok())
    }

    /// The traffic sections, each in namespaces of its own; a section that
    /// fails is reported as not measured, with its reason.
    fn traffic(rounds: usize) -> Traffic {
        let timed = |what: &str| {
            step(what);
            Instant::now()
        };
        let t = timed(&format!(
            "through-edge throughput: {rounds} rounds x {} cases x UDP and TCP, {} ms windows",
            edge::Edge::ALL.len(),
            edge::WINDOW.as_millis()
        ));
        let e = edge::run(edge::EdgeOptions { rounds }).map_err(|e| format!("{e:#}"));
        println!("    took {:.0} s", t.elapsed().as_secs_f64());
        let t = timed(&format!(
            "connection rate: {rounds} rounds x {} paths, wrk {} s each",
            connrate::PATHS,
            connrate::duration_s()
        ));
        let c = connrate::run(rounds).map_err(|e| format!("{e:#}"));
        println!("    took {:.0} s", t.elapsed().as_secs_f64());
        let t = timed(&format!(
            "weight change through the API: {} flips",
            connrate::API_FLIPS
        ));
        let a = connrate::api_flips(connrate::API_FLIPS).map_err(|e| format!("{e:#}"));
        println!("    took {:.0} s", t.elapsed().as_secs_f64());
        Traffic {
            edge: Some(e),
            conn: Some(c),
            api: Some(a),
        }
    }

    fn write(r: &Results) -> Result<()> {
        let docs = workspace_root().join("docs");
        let dir = docs.join("benchmarks");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = serde_json::to_string_pretty(&report::to_json(r))? + "\n";
        write_file(&dir.join("results.json"), &json)?;
        if let Some(svg) = report::per_packet_svg(r) {
            write_file(&dir.join("per-packet.svg"), &svg)?;
        }
        let m = &r.machine;
        let machine = format!(
            "{} CPUs, {}, kernel {}, {}",
            m.nproc, m.cpu_model, m.kernel, m.date
        );
        if let Some(svg) = r.traffic.through_edge_svg(&machine) {
            write_file(&dir.join("through-edge.svg"), &svg)?;
        }
        let md = docs.join("benchmarks.md");
        match std::fs::read_to_string(&md)
            .ok()
            .and_then(|doc| report::replace_generated(&doc, &report::markdown(r)))
        {
            Some(doc) => write_file(&md, &doc)?,
            None => eprintln!(
                "warning: {} has no `{}` / `{}` markers; its results section was not updated",
                md.display(),
                report::BEGIN_MARKER,
                report::END_MARKER
            ),
        }
        Ok(())
    }

    fn write_file(path: &Path, text: &str) -> Result<()> {
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("    wrote {}", path.display());
        Ok(())
    }

    fn machine() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let git = |args: &[&str]| {
            probe(
                std::process::Command::new("git")
                    .current_dir(workspace_root())
                    .args(args),
            )
        };
        let mut commit = git(&["rev-parse", "--short", "HEAD"])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        if git(&["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|s| !s.trim().is_empty())
        {
            commit.push_str("-dirty");
        }
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpu_model,
            date: probe(std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            commit,
            profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            pinned_cpu: None,
        }
    }
}
