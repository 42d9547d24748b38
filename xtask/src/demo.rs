//! `cargo xtask demo`: rollouts run by splitter itself, end to end, in
//! network namespaces this process builds and removes.
//!
//! Topology `spl-demo-<pid>-{cli,edge,back}` (see `docs/testing.md`), HTTP
//! servers `blue` (10.0.2.2:8080) and `green` (10.0.2.3:8080), and a broken
//! version `red` (10.0.2.4:8080, nothing listening: every connection is
//! refused). The daemon starts at blue=100; a client sends requests (a new
//! connection each) the whole time. Then, each with the live view of
//! `splitter rollout ... --watch`:
//! 1. a canary blue -> green, 10, 25, 50, 100%, each step gated on the
//!    analysis of the edge's connection signals: it completes;
//! 2. a canary green -> red: its first analysis fails and the daemon rolls
//!    it back on its own;
//! 3. a blue-green switch green -> blue with a preview address, promoted by
//!    hand, analysed after the switch: it completes;
//! 4. targeting: an internal client address sees green first;
//! 5. shadow: green gets a copy of 20% of the new connections through the
//!    edge's tee, and only blue answers the clients.
//!
//! Then N more requests show where new connections land, and `splitter
//! status`. Everything is owned by `Drop` guards, so it is removed on
//! success, on failure and on Ctrl-C (the first SIGINT asks the demo to
//! stop at the next check; a second one kills it, and the next run removes
//! what was left).
use std::{
    io::{IsTerminal, Write},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use splitter_tests::{
    clients,
    netns::CsumErrors,
    servers::HttpServer,
    splitter::{Affinity, Daemon, Mode, ServiceSpec, VersionSpec, config_toml},
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
/// The blue-green preview address.
const PREVIEW: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 20), 80);

/// What the background client saw: answers per version, failures.
#[derive(Debug, Default, Clone)]
struct Tally {
    blue: u64,
    green: u64,
    failed: u64,
}

/// A client sending requests (a new connection each) to the VIP the whole
/// time, on a thread of its own.
struct Traffic {
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(topo: &Topology, vip: SocketAddrV4) -> Result<Self> {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (tally.clone(), stop.clone());
        // A thread started inside the namespace stays in it.
        let thread = topo.cli.enter(move || {
            std::thread::spawn(move || {
                // Bounded: the demo takes about a minute.
                let limit = Instant::now() + Duration::from_secs(600);
                while !s.load(Ordering::Relaxed) && Instant::now() < limit {
                    let r = clients::http_get_here(vip, "/", REQUEST_TIMEOUT);
                    let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(a) if a.status == 200 && a.server_name() == "blue" => g.blue += 1,
                        Ok(a) if a.status == 200 && a.server_name() == "green" => g.green += 1,
                        _ => g.failed += 1,
                    }
                    drop(g);
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        })?;
        Ok(Self {
            tally,
            stop,
            thread: Some(thread),
        })
    }

    fn take(&self) -> Tally {
        std::mem::take(&mut *self.tally.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the CLI with the terminal as its output (the live view), and
/// returns its exit code.
fn splitter_live(bin: &Path, socket: &Path, args: &[&str]) -> Result<i32> {
    println!("    $ splitter {}", args.join(" "));
    let status = Command::new(bin)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(status.code().unwrap_or(-1))
}

/// Runs the demo.
///
/// # Errors
/// Any step failed, a request failed outside the broken canary's short
/// life, a rollout did not end as it should, or a checksum error appeared.
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
    let mut topo = Topology::new(TopologyOptions {
        prefix: Some(prefix),
        backend_addrs: 3,
        ..Default::default()
    })?;
    check_interrupt()?;

    let (blue_addr, green_addr, red_addr) = (topo.backend(0)?, topo.backend(1)?, topo.backend(2)?);
    step(&format!(
        "starting HTTP servers: blue on {blue_addr}, green on {green_addr}; red on {red_addr} is broken (nothing listens)"
    ));
    let blue = HttpServer::start(&topo.back, blue_addr, "blue")?;
    let green = HttpServer::start(&topo.back, green_addr, "green")?;

    step(&format!(
        "starting `splitter daemon` on the edge ({} mode, blue=100 green=0 red=0)",
        opts.mode.as_str()
    ));
    let version = |name: &str, weight, addr| VersionSpec {
        name: name.into(),
        weight,
        backends: vec![addr],
    };
    let vip = topology::vip();
    let config = config_toml(
        opts.mode,
        &[ServiceSpec {
            name: "web".into(),
            vip,
            protocol: "tcp",
            affinity: Affinity::Flow,
            versions: vec![
                version("blue", 100, blue_addr),
                version("green", 0, green_addr),
                version("red", 0, red_addr),
            ],
        }],
    );
    // Plain GETs only read: the service may be mirrored (step 5).
    let config = config.replacen(
        "protocol = \"tcp\"\n",
        "protocol = \"tcp\"\nread_only = true\n",
        1,
    );
    let daemon = Daemon::start_with(&topo.edge, &config, &bin)?;
    check_interrupt()?;

    step(&format!(
        "a client sends HTTP requests to {vip} the whole time, a new connection each"
    ));
    let traffic = Traffic::start(&topo, vip)?;
    std::thread::sleep(Duration::from_secs(1));
    let warmup = traffic.take();

    let analysis = [
        "--analysis-interval",
        "1s",
        "--min-attempts",
        "5",
        "--watch",
        "--timeout",
        "120s",
    ];
    step(
        "1. canary blue -> green, 10 -> 25 -> 50 -> 100%, each step gated on the connection signals",
    );
    let mut args = vec![
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--steps",
        "10,25,50,100",
        "--step-time",
        "3s",
    ];
    args.extend(analysis);
    let canary = splitter_live(daemon.bin(), daemon.socket(), &args)?;
    let t_canary = traffic.take();
    print_tally("during the canary", &t_canary);
    check_interrupt()?;

    step(
        "2. canary green -> red (red refuses every connection): the analysis fails and the daemon rolls back on its own",
    );
    let mut args = vec![
        "rollout",
        "start",
        "web",
        "--to",
        "red",
        "--steps",
        "10,50,100",
        "--step-time",
        "3s",
    ];
    args.extend(analysis);
    let broken = splitter_live(daemon.bin(), daemon.socket(), &args)?;
    let t_broken = traffic.take();
    print_tally("during the broken canary", &t_broken);
    check_interrupt()?;

    let preview = PREVIEW.to_string();
    step(&format!(
        "3. blue-green green -> blue: blue previewed on {preview}, switched by `splitter rollout promote`"
    ));
    let out = daemon.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "blue",
        "--strategy",
        "blue-green",
        "--preview",
        &preview,
        "--post-switch-time",
        "3s",
        "--analysis-interval",
        "1s",
        "--min-attempts",
        "5",
    ])?;
    print_indented(&out);
    let previewed = clients::http_get_many(&topo.cli, PREVIEW, "/", 20, REQUEST_TIMEOUT)?;
    println!(
        "    20 requests to the preview address {preview}: blue {}, green {}, failed {}",
        previewed.count("blue"),
        previewed.count("green"),
        previewed.errors
    );
    let promote = splitter_live(
        daemon.bin(),
        daemon.socket(),
        &["rollout", "promote", "web"],
    )?;
    let switch = splitter_live(
        daemon.bin(),
        daemon.socket(),
        &["rollout", "status", "web", "--watch", "--timeout", "60s"],
    )?;
    let t_switch = traffic.take();
    print_tally("during the blue-green switch", &t_switch);
    drop(traffic);
    check_interrupt()?;

    let internal = topo.add_client_addr()?;
    let rule = format!("{internal}/32");
    step(&format!(
        "4. targeting: the internal client {internal} sees green first, everyone else stays on blue"
    ));
    print_indented(&run_cli(
        &daemon,
        &["target", "add", "web", &rule, "green"],
    )?);
    let outside = topology::CLIENT_ADDR;
    let seen = clients::http_get_many_from(
        &topo.cli,
        vip,
        "/",
        40,
        &[internal, outside],
        REQUEST_TIMEOUT,
    )?;
    for src in [internal, outside] {
        let by = seen.per_source.get(&Some(src)).cloned().unwrap_or_default();
        let n = |v: &str| by.get(v).copied().unwrap_or(0);
        println!(
            "    20 requests from {src}: blue {}, green {}",
            n("blue"),
            n("green")
        );
    }
    if seen.errors > 0 {
        println!("    failed: {}", seen.errors);
    }
    print_indented(&run_cli(&daemon, &["target", "remove", "web", &rule])?);
    check_interrupt()?;

    step(
        "5. shadow: green gets a copy of 20% of the new connections; its answers are dropped, clients see only blue",
    );
    print_indented(&run_cli(
        &daemon,
        &["shadow", "set", "web", "green", "--percent", "20"],
    )?);
    let green_before = green.requests();
    let mirrored = clients::http_get_many(&topo.cli, vip, "/", 50, REQUEST_TIMEOUT)?;
    // The shadow's copies end a little after the clients' exchanges.
    let deadline = Instant::now() + Duration::from_secs(5);
    while green.requests() < green_before + 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let copies = green.requests() - green_before;
    println!(
        "    50 requests: answered by blue {}, by green {}, failed {}; green got {copies} copies",
        mirrored.count("blue"),
        mirrored.count("green"),
        mirrored.errors
    );
    let status = daemon.cli_ok(&["status"])?;
    for l in status
        .lines()
        .skip_while(|l| !l.starts_with("shadow of web"))
        .take(4)
    {
        println!("    {l}");
    }
    print_indented(&run_cli(&daemon, &["shadow", "off", "web"])?);
    check_interrupt()?;

    let r = round(&topo, vip, opts.requests, &blue, &green)?;
    print_table("after the rollouts", &r);

    step("splitter rollout list");
    print_indented(&daemon.cli_ok(&["rollout", "list"])?);
    step("splitter status");
    print_indented(&daemon.cli_ok(&["status"])?);
    let report = daemon.dir().join("web-rollout.svg");
    let report_arg = report.display().to_string();
    daemon.cli_ok(&["rollout", "report", "web", "--out", &report_arg])?;

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
        canary == 0,
        "the canary to green did not complete (exit {canary})"
    );
    ensure!(
        broken == 1,
        "the canary to the broken red was not rolled back (exit {broken}; 1 expected)"
    );
    ensure!(
        promote == 0 && switch == 0,
        "the blue-green switch did not complete (promote exit {promote}, watch exit {switch})"
    );
    ensure!(
        previewed.count("blue") == 20,
        "the preview address should reach only blue: {previewed:?}"
    );
    ensure!(
        warmup.failed + t_canary.failed + t_switch.failed + r.errors == 0,
        "requests failed outside the broken canary: {} before, {} in the canary, {} in the switch, {} after",
        warmup.failed,
        t_canary.failed,
        t_switch.failed,
        r.errors
    );
    // Each new connection reaches red with a chance of 10% (a hash of its
    // ports): allow three standard deviations above that share.
    let made = t_broken.blue + t_broken.green + t_broken.failed;
    let allowed = 0.1 * made as f64 + 3.0 * (made as f64 * 0.09).sqrt() + 2.0;
    ensure!(
        (t_broken.failed as f64) <= allowed,
        "the broken canary failed {} of {made} requests, more than its 10% share allows ({allowed:.0})",
        t_broken.failed
    );
    ensure!(
        r.green == 0 && r.blue > 0,
        "after the switch every new connection should reach blue"
    );
    ensure!(
        mirrored.count("blue") == 50 && (8..=12).contains(&copies),
        "while green was mirrored, every answer should come from blue and green should get 20% of 50 copies (exact per CPU): {mirrored:?}, {copies} copies"
    );
    ensure!(
        csum.iter().all(|(_, c)| *c == CsumErrors::default()),
        "checksum errors: {csum_text:?}"
    );
    step(&format!(
        "demo finished: the canary completed, the broken canary was rolled back by the daemon ({} of {made} requests failed meanwhile), the blue-green switch completed; report in {}",
        t_broken.failed, "`splitter rollout report web`"
    ));
    Ok(())
}

fn print_tally(when: &str, t: &Tally) {
    println!(
        "    requests {when}: blue {}, green {}, failed {}",
        t.blue, t.green, t.failed
    );
}

/// What one round of requests did.
struct Round {
    blue: u64,
    green: u64,
    errors: u64,
    samples: Vec<String>,
    took: Duration,
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
    println!("    {title}        ({:.1} s)", r.took.as_secs_f64());
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

/// Prints `$ splitter ARGS` and runs it; its output.
fn run_cli(daemon: &Daemon, args: &[&str]) -> Result<String> {
    println!("    $ splitter {}", args.join(" "));
    daemon.cli_ok(args)
}
