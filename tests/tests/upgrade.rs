//! Upgrading the kernel program under load: a genuinely different build of
//! `splitter-ebpf` (the `upgrade-probe` feature: other instructions, so
//! another program tag, and a counter that proves it handles the packets)
//! replaces the running one through `splitter daemon --program PATH`, while
//! short HTTP requests and long-lived connections go through the VIP. And
//! an object built against another map layout is refused before anything
//! changes, the running program forwarding on; so is a restart that asks a
//! pinned connection table for another `dataplane.conn_capacity`.
//!
//! The variants are built by the test itself ([`program::build`]: nightly,
//! bpfel, the flags aya-build uses) into `target/program-variants`, cached
//! after the first run. Privileged, so `#[ignore]`d for a plain `cargo
//! test`; `cargo xtask test` runs them:
//!
//! ```text
//! cargo test -p splitter-tests --test upgrade -- --include-ignored --test-threads=1
//! ```
use std::{
    net::SocketAddrV4,
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use splitter_tests::{
    clients::{self, LongLivedConn},
    netns::Netns,
    program::{self, Variant},
    servers::{HttpServer, TcpIdentityServer},
    splitter::{
        Affinity, BpfMount, Daemon, Mode, ServiceSpec, VersionSpec, config_toml, pin_foreign_map,
        with_pin_dir,
    },
    topology::{self, EDGE_BACKEND_IF, EDGE_CLIENT_IF, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// Port of the HTTP service on the VIP, and of its backends.
const HTTP_VIP_PORT: u16 = 81;
const HTTP_BACKEND_PORT: u16 = 8081;
/// Long-lived connections held across the upgrade.
const LONG_LIVED: usize = 4;
/// Extra daemon arguments of every start: a SIGTERM leaves the data plane
/// pinned and forwarding, as in the documented upgrade procedure.
const KEEP: [&str; 2] = ["--on-stop", "keep"];

fn http_vip() -> SocketAddrV4 {
    SocketAddrV4::new(topology::VIP, HTTP_VIP_PORT)
}

/// Services `web` (TCP identity-and-echo, for the long-lived connections)
/// and `http` (short HTTP requests), each with blue and green.
struct Setup {
    topo: Topology,
    bpffs: BpfMount,
    blue: TcpIdentityServer,
    green: TcpIdentityServer,
    _http: [HttpServer; 2],
    config: String,
}

fn setup() -> Result<Setup> {
    let topo = Topology::new(TopologyOptions::default())?;
    let bpffs = BpfMount::new()?;
    let (b, g) = (topo.backend(0)?, topo.backend(1)?);
    let blue = TcpIdentityServer::start(&topo.back, b, "blue")?;
    let green = TcpIdentityServer::start(&topo.back, g, "green")?;
    let hb = SocketAddrV4::new(*b.ip(), HTTP_BACKEND_PORT);
    let hg = SocketAddrV4::new(*g.ip(), HTTP_BACKEND_PORT);
    let http = [
        HttpServer::start(&topo.back, hb, "blue")?,
        HttpServer::start(&topo.back, hg, "green")?,
    ];
    let version = |name: &str, weight, addr| VersionSpec {
        name: name.into(),
        weight,
        backends: vec![addr],
    };
    let config = with_pin_dir(
        &config_toml(
            Mode::Snat,
            &[
                ServiceSpec {
                    name: "web".into(),
                    vip: topology::vip(),
                    protocol: "tcp",
                    affinity: Affinity::Flow,
                    versions: vec![version("blue", 90, b), version("green", 10, g)],
                },
                ServiceSpec {
                    name: "http".into(),
                    vip: http_vip(),
                    protocol: "tcp",
                    affinity: Affinity::Flow,
                    versions: vec![version("blue", 50, hb), version("green", 50, hg)],
                },
            ],
        ),
        &bpffs.pin_dir(),
    );
    Ok(Setup {
        topo,
        bpffs,
        blue,
        green,
        _http: http,
        config,
    })
}

/// The running kernel program as the daemon reports it: (id, tag, source).
fn program_of(status: &Value) -> Result<(u64, String, String)> {
    let p = &status["dataplane"]["program"];
    let id = p["id"].as_u64().context("no program id")?;
    let tag = p["tag"].as_str().context("no program tag")?.to_string();
    let source = p["source"]
        .as_str()
        .context("no program source")?
        .to_string();
    ensure!(
        id > 0 && tag.len() == 16 && tag.chars().all(|c| c.is_ascii_hexdigit()),
        "odd program report: {p}"
    );
    Ok((id, tag, source))
}

/// The id of the XDP program the kernel runs on `iface` of `edge`, from
/// `ip -d link show` (independent of what the daemon says).
fn kernel_xdp_prog_id(edge: &Netns, iface: &str) -> Result<u64> {
    let out = edge.ip(&["-d", "link", "show", "dev", iface])?;
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(3)
        .find(|w| w[0] == "prog/xdp" && w[1] == "id")
        .and_then(|w| w[2].parse().ok())
        .with_context(|| format!("no XDP program on {iface}: {out}"))
}

/// Both edge interfaces run program `id`.
fn kernel_runs(edge: &Netns, id: u64) -> Result<()> {
    for iface in [EDGE_CLIENT_IF, EDGE_BACKEND_IF] {
        let found = kernel_xdp_prog_id(edge, iface)?;
        ensure!(
            found == id,
            "the kernel runs program {found} on {iface}, not {id}"
        );
    }
    Ok(())
}

/// `counter::UPGRADE_PROBE` summed over CPUs, read from the pinned map.
fn probe_count(pin_dir: &Path) -> Result<u64> {
    use aya::maps::{Map, MapData, PerCpuArray};
    let path = pin_dir.join(splitter_common::map::COUNTERS);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(data))?;
    let v = arr.get(&splitter_common::counter::UPGRADE_PROBE, 0)?;
    Ok(v.iter().sum())
}

/// Weights by service, in config order.
fn weights(status: &Value) -> Result<Vec<(String, Vec<u64>)>> {
    status["services"]
        .as_array()
        .context("no services")?
        .iter()
        .map(|s| {
            let name = s["name"].as_str().context("no name")?.to_string();
            let w = s["versions"]
                .as_array()
                .context("no versions")?
                .iter()
                .filter_map(|v| v["weight"].as_u64())
                .collect();
            Ok((name, w))
        })
        .collect()
}

/// `Tcp.EstabResets` and `Tcp.AttemptFails` of the client namespace: the
/// kernel's own count of connections reset or refused.
fn client_tcp_failures(cli: &Netns) -> Result<(u64, u64)> {
    let snmp = cli.snmp()?;
    let get = |k: &str| {
        snmp.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| *v)
            .with_context(|| format!("no {k} in /proc/net/snmp"))
    };
    Ok((get("Tcp.EstabResets")?, get("Tcp.AttemptFails")?))
}

/// Opens the long-lived connections and waits for their first echoes.
fn long_lived(s: &Setup) -> Result<Vec<LongLivedConn>> {
    let mut conns = Vec::new();
    for _ in 0..LONG_LIVED {
        let c = LongLivedConn::start(&s.topo.cli, topology::vip(), TIMEOUT)?;
        c.wait_echoes(3, Duration::from_secs(5))?;
        conns.push(c);
    }
    Ok(conns)
}

/// Each connection is still open, still echoing (10 more echoes) and
/// never failed; and each backend holds exactly the connections that
/// landed on it at the start (none moved, none was dropped).
fn long_lived_intact(s: &Setup, conns: &[LongLivedConn], when: &str) -> Result<()> {
    for (i, c) in conns.iter().enumerate() {
        let echoed = c.report().echoed;
        c.wait_echoes(echoed + 10, Duration::from_secs(5))
            .with_context(|| format!("long-lived connection {i} {when}"))?;
    }
    for server in [&s.blue, &s.green] {
        let mine = conns
            .iter()
            .filter(|c| c.identity().name == server.name())
            .count() as u64;
        ensure!(
            server.stats().active() == mine,
            "{when}: {} holds {} connections, but {mine} long-lived ones landed there",
            server.name(),
            server.stats().active()
        );
    }
    Ok(())
}

/// Closes the long-lived connections; none may have recorded a failure.
fn stop_long_lived(conns: Vec<LongLivedConn>) -> Result<()> {
    for (i, c) in conns.into_iter().enumerate() {
        let report = c.stop();
        ensure!(
            report.failures.is_empty(),
            "long-lived connection {i}: {:?}",
            report.failures
        );
    }
    Ok(())
}

/// Short HTTP requests through the VIP, [`clients::PARALLELISM`] at a time,
/// until `stop` (at most 400 rounds of 8, and 120 s).
struct Load {
    stop: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Load {
    fn new() -> Self {
        Self {
            stop: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
        }
    }

    fn run(&self, cli: &Netns) {
        let started = Instant::now();
        for _ in 0..400 {
            if self.stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(120) {
                break;
            }
            let (ok, failed, samples) =
                match clients::http_get_many(cli, http_vip(), "/", 8, TIMEOUT) {
                    Ok(r) => (r.ok(), r.errors, r.error_samples),
                    Err(e) => (0, 1, vec![format!("{e:#}")]),
                };
            self.ok.fetch_add(ok, Ordering::Relaxed);
            self.failed.fetch_add(failed, Ordering::Relaxed);
            if let Ok(mut v) = self.samples.lock() {
                v.extend(samples);
            }
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until `n` more requests succeeded than `from`.
    fn wait_more(&self, from: u64, n: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ok() < from + n {
            ensure!(
                Instant::now() < deadline,
                "the load stalled: {} requests, waited for {}",
                self.ok(),
                from + n
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

/// Stops the daemon with SIGTERM (the pinned data plane keeps forwarding)
/// and starts it again with `args`.
fn restart_with(daemon: &mut Daemon, edge: &Netns, args: &[&str]) -> Result<()> {
    let status = daemon.stop()?;
    ensure!(status.success(), "daemon exited with {status}");
    daemon.set_args(args);
    daemon.restart(edge)
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn another_build_replaces_the_running_program_under_load_and_rolls_back() -> Result<()> {
    let probe = program::build(Variant::UpgradeProbe)?;
    let s = setup()?;
    let pin_dir = s.bpffs.pin_dir();
    let mut daemon = Daemon::start_with_args(&s.topo.edge, &s.config, &KEEP)?;
    daemon.weights_set("web", &[("blue", 30), ("green", 70)])?;
    let weights_before = weights(&daemon.status_json()?)?;
    let (id0, tag0, source0) = program_of(&daemon.status_json()?)?;
    ensure!(
        source0 == "embedded",
        "first start did not use the embedded program: {source0}"
    );
    kernel_runs(&s.topo.edge, id0)?;
    ensure!(
        probe_count(&pin_dir)? == 0,
        "the embedded program writes the probe counter: it is the probe build"
    );
    let conns = long_lived(&s)?;
    let resets_before = client_tcp_failures(&s.topo.cli)?;

    let load = Load::new();
    let mut upgrade_args: Vec<&str> = KEEP.to_vec();
    let probe_arg = probe.to_string_lossy().into_owned();
    upgrade_args.extend(["--program", probe_arg.as_str()]);
    let upgraded = std::thread::scope(|sc| -> Result<(u64, u64)> {
        sc.spawn(|| load.run(&s.topo.cli));
        let result = (|| {
            load.wait_more(0, 50)?;
            let before = load.ok();
            restart_with(&mut daemon, &s.topo.edge, &upgrade_args)?;
            let at_restart = load.ok();
            load.wait_more(at_restart, 100)?;
            Ok((before, at_restart))
        })();
        load.stop.store(true, Ordering::Relaxed);
        result
    });
    let (before, at_restart) = upgraded?;
    let failed = load.failed.load(Ordering::Relaxed);
    ensure!(
        failed == 0,
        "{failed} of {} HTTP requests failed across the upgrade: {:?}",
        load.ok() + failed,
        load.samples.lock().map(|v| v.clone()).unwrap_or_default()
    );
    ensure!(
        before > 0 && at_restart > before,
        "no request went through while the daemon restarted: {before} then {at_restart}"
    );

    // The program really changed, in the daemon's report and in the kernel.
    let status = daemon.status_json()?;
    let (id1, tag1, source1) = program_of(&status)?;
    ensure!(
        id1 != id0 && tag1 != tag0,
        "program not replaced: id {id0} -> {id1}, tag {tag0} -> {tag1}"
    );
    ensure!(
        source1 == probe_arg,
        "source {source1}, expected {probe_arg}"
    );
    kernel_runs(&s.topo.edge, id1)?;
    // ... and it is the one handling the packets.
    let p1 = probe_count(&pin_dir)?;
    let r = clients::http_get_many(&s.topo.cli, http_vip(), "/", 20, TIMEOUT)?;
    ensure!(r.errors == 0, "after the upgrade: {:?}", r.error_samples);
    let p2 = probe_count(&pin_dir)?;
    ensure!(
        p1 > 0 && p2 >= p1 + 20,
        "the new build does not see the traffic: probe counter {p1} then {p2}"
    );
    eprintln!(
        "upgrade: program {id0} ({tag0}) -> {id1} ({tag1}); {} requests, {before} before the stop, \
         {at_restart} when the new daemon answered; probe counter {p1} then {p2}",
        load.ok()
    );
    ensure!(
        weights(&status)? == weights_before,
        "weights changed across the upgrade: {:?} -> {:?}",
        weights_before,
        weights(&status)?
    );
    long_lived_intact(&s, &conns, "after the upgrade")?;

    // Roll back to the embedded program: the first tag again, the probe
    // counter stops, the connections go on.
    restart_with(&mut daemon, &s.topo.edge, &KEEP)?;
    let status = daemon.status_json()?;
    let (id2, tag2, source2) = program_of(&status)?;
    ensure!(
        tag2 == tag0 && id2 != id1 && source2 == "embedded",
        "rollback: id {id2}, tag {tag2} (first {tag0}), source {source2}"
    );
    kernel_runs(&s.topo.edge, id2)?;
    let p3 = probe_count(&pin_dir)?;
    let r = clients::http_get_many(&s.topo.cli, http_vip(), "/", 20, TIMEOUT)?;
    ensure!(r.errors == 0, "after the rollback: {:?}", r.error_samples);
    ensure!(
        probe_count(&pin_dir)? == p3,
        "the probe build still sees packets after the rollback"
    );
    ensure!(
        weights(&status)? == weights_before,
        "weights changed across the rollback"
    );
    long_lived_intact(&s, &conns, "after the rollback")?;

    let resets_after = client_tcp_failures(&s.topo.cli)?;
    ensure!(
        resets_after == resets_before,
        "the client's kernel counted resets or failed connects (EstabResets, AttemptFails): {resets_before:?} -> {resets_after:?}"
    );
    stop_long_lived(conns)?;
    s.topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn an_object_of_another_layout_is_refused_and_the_running_program_forwards_on() -> Result<()> {
    let foreign = program::build(Variant::ForeignLayout)?;
    let s = setup()?;
    let mut daemon = Daemon::start_with_args(&s.topo.edge, &s.config, &KEEP)?;
    let (id0, tag0, _) = program_of(&daemon.status_json()?)?;
    let conns = long_lived(&s)?;

    let stopped = daemon.stop()?;
    ensure!(stopped.success(), "daemon exited with {stopped}");

    // Not a BPF object at all.
    let junk = daemon.dir().join("junk.o");
    std::fs::write(&junk, b"not an ELF file\n")?;
    let junk_arg = junk.to_string_lossy().into_owned();
    // Another map layout: COUNTERS with 64 entries instead of 32.
    let foreign_arg = foreign.to_string_lossy().into_owned();
    for (arg, want) in [
        (
            junk_arg.as_str(),
            vec!["is not a usable BPF object", "nothing was changed"],
        ),
        (
            foreign_arg.as_str(),
            vec![
                "defines map COUNTERS with capacity 64",
                "uses 32",
                "another map layout",
                "running program keeps forwarding",
            ],
        ),
    ] {
        let mut args: Vec<&str> = KEEP.to_vec();
        args.extend(["--program", arg]);
        daemon.set_args(&args);
        let err = match daemon.restart(&s.topo.edge) {
            Ok(()) => bail!("the daemon started with {arg}"),
            Err(e) => format!("{e:#}"),
        };
        for w in want {
            ensure!(err.contains(w), "refusal of {arg} lacks {w:?}: {err}");
        }
        // Nothing changed: the same program runs and forwards.
        kernel_runs(&s.topo.edge, id0)?;
        let r = clients::http_get_many(&s.topo.cli, http_vip(), "/", 40, TIMEOUT)?;
        ensure!(
            r.errors == 0 && r.ok() == 40,
            "no daemon after the refusal of {arg}: {:?}",
            r.error_samples
        );
        long_lived_intact(&s, &conns, &format!("after the refusal of {arg}"))?;
    }

    // The same build again: a new program id, the same tag.
    daemon.set_args(&KEEP);
    daemon.restart(&s.topo.edge)?;
    let (id1, tag1, _) = program_of(&daemon.status_json()?)?;
    ensure!(
        id1 != id0 && tag1 == tag0,
        "same build restarted: id {id0} -> {id1}, tag {tag0} -> {tag1}"
    );
    kernel_runs(&s.topo.edge, id1)?;
    long_lived_intact(&s, &conns, "after the restart")?;
    stop_long_lived(conns)?;
    s.topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_pinned_map_of_another_type_is_refused() -> Result<()> {
    use splitter_common::{CONN_CAPACITY, Conn, FlowKey};
    let s = setup()?;
    let pin_dir = s.bpffs.pin_dir();
    std::fs::create_dir_all(&pin_dir)?;
    // CONNS with the right sizes and capacity, but a plain hash (type 1)
    // instead of an LRU hash (9): only the type tells them apart.
    let size = |n: usize| n as u32;
    pin_foreign_map(
        &pin_dir.join(splitter_common::map::CONNS),
        1,
        size(std::mem::size_of::<FlowKey>()),
        size(std::mem::size_of::<Conn>()),
        CONN_CAPACITY,
    )?;
    let err = match Daemon::start_with_args(&s.topo.edge, &s.config, &KEEP) {
        Ok(_) => bail!("the daemon took over a CONNS map of another type"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("CONNS")
            && err.contains("map type (bpf_map_type) 1")
            && err.contains("expects 9")
            && err.contains("layout changed"),
        "unclear refusal: {err}"
    );
    ensure!(
        !s.topo
            .edge
            .ip(&["-o", "link", "show", EDGE_CLIENT_IF])?
            .contains("xdp"),
        "something was attached despite the refusal"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_sized_connection_table_is_kept_and_another_size_is_refused_while_it_forwards() -> Result<()> {
    let s = setup()?;
    let sized = |n: u32| {
        s.config.replacen(
            "[dataplane]\n",
            &format!("[dataplane]\nconn_capacity = {n}\n"),
            1,
        )
    };
    let mut daemon = Daemon::start_with_args(&s.topo.edge, &sized(4096), &KEEP)?;
    let pinned = s.bpffs.pin_dir().join(splitter_common::map::CONNS);
    let kernel_capacity = || -> Result<u32> {
        Ok(aya::maps::MapInfo::from_pin(&pinned)
            .context("reading the pinned connection table")?
            .max_entries())
    };
    let entries = kernel_capacity()?;
    ensure!(
        entries == 4096,
        "the kernel's CONNS has {entries} entries, configured 4096"
    );
    let status = daemon.status_json()?;
    ensure!(
        status["dataplane"]["conn_capacity"] == 4096,
        "status reports {} entries",
        status["dataplane"]["conn_capacity"]
    );
    let text = daemon.cli_ok(&["status"])?;
    ensure!(
        text.contains("connection table: 4096 entries (up to 2048 flows)"),
        "status text: {text}"
    );
    let (id0, ..) = program_of(&status)?;
    let conns = long_lived(&s)?;
    let stopped = daemon.stop()?;
    ensure!(stopped.success(), "daemon exited with {stopped}");

    // Another size with the table pinned: refused, nothing changed.
    std::fs::write(daemon.dir().join("splitter.toml"), sized(8192))?;
    let err = match daemon.restart(&s.topo.edge) {
        Ok(()) => bail!("the daemon resized a pinned connection table"),
        Err(e) => format!("{e:#}"),
    };
    for want in [
        "holds 4096 entries",
        "conn_capacity asks for 8192",
        "Set conn_capacity = 4096",
        "splitter detach",
    ] {
        ensure!(err.contains(want), "refusal lacks {want:?}: {err}");
    }
    kernel_runs(&s.topo.edge, id0)?;
    ensure!(kernel_capacity()? == 4096, "the pinned table changed");
    let r = clients::http_get_many(&s.topo.cli, http_vip(), "/", 40, TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.ok() == 40,
        "no forwarding after the refusal: {:?}",
        r.error_samples
    );
    long_lived_intact(&s, &conns, "after the refused resize")?;

    // The configured size again: taken over, flows intact.
    std::fs::write(daemon.dir().join("splitter.toml"), sized(4096))?;
    daemon.restart(&s.topo.edge)?;
    long_lived_intact(&s, &conns, "after the restart")?;
    stop_long_lived(conns)?;
    s.topo.no_csum_errors()
}
