//! `cargo xtask demo`: a blue/green switch through splitter, end to end,
//! in network namespaces this process builds and removes.
//!
//! Topology `spl-demo-<pid>-{cli,edge,back}` (see `docs/testing.md`), HTTP
//! servers `blue` (10.0.2.2:8080) and `green` (10.0.2.3:8080), the daemon on
//! the edge at blue=90 green=10; N requests (a new connection each) to the
//! VIP 10.0.0.10:80; `splitter weights set web blue=0 green=100`; N more;
//! `splitter status`. Everything is owned by `Drop` guards, so it is removed
//! on success, on failure and on Ctrl-C (the first SIGINT asks the demo to
//! stop at the next check; a second one kills it, and the next run removes
//! what was left).
use std::{
    io::{IsTerminal, Write},
    net::SocketAddrV4,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, bail, ensure};
use splitter_tests::{
    clients,
    netns::CsumErrors,
    servers::HttpServer,
    splitter::{Affinity, Daemon, Mode, blue_green_config},
    topology::{self, Topology, TopologyOptions},
};

use crate::util::{is_root, step};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT handler: the first Ctrl-C sets [`INTERRUPTED`] (and
/// the default action comes back, so a second one kills the process).
fn install_sigint_handler() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe); the
    // sigaction struct is zeroed and then filled in before use.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted (Ctrl-C); the daemon, servers and namespaces were removed");
    }
    Ok(())
}

/// Whether the demo stopped because of Ctrl-C.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Options of `cargo xtask demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub requests: usize,
    pub mode: Mode,
    pub bin: Option<PathBuf>,
}

/// Requests per batch (between progress updates and Ctrl-C checks).
const BATCH: usize = 50;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// What one round of requests did.
struct Round {
    blue: u64,
    green: u64,
    errors: u64,
    samples: Vec<String>,
    took: Duration,
}

/// Runs the demo.
///
/// # Errors
/// Any step failed, a request failed, the switch did not take, or a
/// checksum error appeared.
pub fn demo(opts: &DemoOptions) -> Result<()> {
    install_sigint_handler();
    if !is_root() {
        bail!(
            "the demo builds network namespaces and attaches XDP programs: run it as root (sudo cargo xtask demo)"
        );
    }
    let bin = match &opts.bin {
        Some(b) => {
            crate::setup::setup()?;
            b.clone()
        }
        None => crate::build::build()?,
    };
    check_interrupt()?;

    let prefix = format!("spl-demo-{}", std::process::id());
    step(&format!(
        "building the topology: namespaces {prefix}-cli, {prefix}-edge, {prefix}-back"
    ));
    // Declared first, so it is dropped last: servers and daemon go before
    // their namespaces.
    let topo = Topology::new(TopologyOptions {
        prefix: Some(prefix),
        ..Default::default()
    })?;
    check_interrupt()?;

    let (blue_addr, green_addr) = (topo.backend(0)?, topo.backend(1)?);
    step(&format!(
        "starting HTTP servers: blue on {blue_addr}, green on {green_addr}"
    ));
    let blue = HttpServer::start(&topo.back, blue_addr, "blue")?;
    let green = HttpServer::start(&topo.back, green_addr, "green")?;

    step(&format!(
        "starting `splitter daemon` on the edge ({} mode, blue=90 green=10)",
        opts.mode.as_str()
    ));
    let daemon = Daemon::start_with(
        &topo.edge,
        &blue_green_config(opts.mode, Affinity::Flow, 90, 10),
        &bin,
    )?;
    check_interrupt()?;

    let vip = topology::vip();
    let r1 = round(&topo, vip, opts.requests, &blue, &green)?;
    print_table("blue=90 green=10", &r1);

    step("switching: splitter weights set web blue=0 green=100");
    let out = daemon.weights_set("web", &[("blue", 0), ("green", 100)])?;
    print_indented(&out);
    check_interrupt()?;

    let r2 = round(&topo, vip, opts.requests, &blue, &green)?;
    print_table("blue=0 green=100", &r2);

    step("splitter status");
    print_indented(&daemon.cli_ok(&["status"])?);

    let peers: Vec<String> = blue
        .stats()
        .peer_ips()
        .union(&green.stats().peer_ips())
        .map(|p| p.to_string())
        .collect();
    println!(
        "    the backends saw connections from: {}",
        peers.join(", ")
    );
    let csum = [
        ("client", topo.cli.csum_errors()?),
        ("backend", topo.back.csum_errors()?),
    ];
    let csum_text: Vec<String> = csum
        .iter()
        .map(|(n, c)| format!("{n} tcp {} udp {}", c.tcp, c.udp))
        .collect();
    println!("    InCsumErrors: {}", csum_text.join(", "));

    step("stopping the daemon and removing the namespaces");
    drop(daemon);
    drop((blue, green));
    drop(topo);

    ensure!(
        r1.errors == 0 && r2.errors == 0,
        "{} requests failed",
        r1.errors + r2.errors
    );
    ensure!(
        r2.blue == 0,
        "after the switch to blue=0, blue still received {} new connections",
        r2.blue
    );
    ensure!(
        r1.blue > 0 && r1.green > 0,
        "at blue=90 green=10 one version received nothing"
    );
    ensure!(
        csum.iter().all(|(_, c)| *c == CsumErrors::default()),
        "checksum errors: {csum_text:?}"
    );
    step("demo finished: every request answered, the switch moved all new connections to green");
    Ok(())
}

/// Sends `n` requests in batches, with progress, and returns what each
/// server received meanwhile.
fn round(
    topo: &Topology,
    vip: SocketAddrV4,
    n: usize,
    blue: &HttpServer,
    green: &HttpServer,
) -> Result<Round> {
    step(&format!(
        "sending {n} HTTP requests to {vip}, a new connection each, from {}",
        topology::CLIENT_ADDR
    ));
    let (b0, g0) = (blue.requests(), green.requests());
    let started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let (mut done, mut errors, mut samples) = (0usize, 0u64, Vec::new());
    while done < n {
        check_interrupt()?;
        let k = BATCH.min(n - done);
        let r = clients::http_get_many(&topo.cli, vip, "/", k, REQUEST_TIMEOUT)?;
        done += k;
        errors += r.errors;
        samples.extend(
            r.error_samples
                .into_iter()
                .take(5usize.saturating_sub(samples.len())),
        );
        if tty {
            print!("\r    {done}/{n} sent, {errors} failed");
            let _ = std::io::stdout().flush();
        } else if done % 250 == 0 || done == n {
            println!("    {done}/{n} sent, {errors} failed");
        }
    }
    if tty {
        println!();
    }
    Ok(Round {
        blue: blue.requests() - b0,
        green: green.requests() - g0,
        errors,
        samples,
        took: started.elapsed(),
    })
}

fn print_table(title: &str, r: &Round) {
    let total = (r.blue + r.green + r.errors).max(1) as f64;
    let pct = |x: u64| 100.0 * x as f64 / total;
    println!();
    println!("    weights {title}        ({:.1} s)", r.took.as_secs_f64());
    println!("    {:<10} {:>9} {:>8}", "version", "received", "share");
    println!("    {:<10} {:>9} {:>7.1}%", "blue", r.blue, pct(r.blue));
    println!("    {:<10} {:>9} {:>7.1}%", "green", r.green, pct(r.green));
    println!(
        "    {:<10} {:>9} {:>7.1}%",
        "failed",
        r.errors,
        pct(r.errors)
    );
    for s in &r.samples {
        println!("      e.g. {s}");
    }
    println!();
}

fn print_indented(text: &str) {
    for l in text.lines() {
        println!("    {l}");
    }
}
