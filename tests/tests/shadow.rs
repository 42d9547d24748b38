//! Shadow traffic (mirroring) of UDP services end to end: the real daemon
//! on a real XDP edge, a real stable server and a real shadow server that
//! records every datagram it gets.
//!
//! What a user checks: the clients get only the stable version's answers,
//! byte for byte; the shadow gets the same request bytes for the mirrored
//! share (within 2 points over 2,000 new flows); the shadow's answers are
//! dropped at the edge and counted; a shadow that is down or never answers
//! costs the clients nothing. Privileged, so `#[ignore]`d for a plain
//! `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test shadow -- --include-ignored --test-threads=1
//! ```
use std::{
    collections::BTreeSet,
    net::{SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use splitter_tests::{
    netns::Netns,
    servers::{Recording, UdpIdentityServer, UdpRecorder},
    splitter::{
        Affinity, BpfMount, Daemon, Mode, ServiceSpec, VersionSpec, config_toml, with_pin_dir,
    },
    topology::{self, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(2);
/// A client's answer must come within this, mirrored or not, whatever the
/// shadow does (the copy is made in the edge's kernel before the original
/// is forwarded; nothing waits for the shadow). Generous for a loaded
/// 2-core machine; the unmirrored round trip here is well under 1 ms.
const ANSWER_BOUND: Duration = Duration::from_millis(250);

/// Service `dns` (UDP, VIP:53): `stable` (weight 100) on backend 0 and
/// `shadow` (weight 0) on backend 1, mirroring `percent` (0: no
/// `[service.shadow]`).
fn config(topo: &Topology, mode: Mode, percent: u32) -> Result<(String, SocketAddrV4)> {
    let stable = SocketAddrV4::new(*topo.backend(0)?.ip(), 5353);
    let shadow = SocketAddrV4::new(*topo.backend(1)?.ip(), 5353);
    let mut toml = config_toml(
        mode,
        &[ServiceSpec {
            name: "dns".into(),
            vip: SocketAddrV4::new(topology::VIP, 53),
            protocol: "udp",
            affinity: Affinity::Flow,
            versions: vec![
                VersionSpec {
                    name: "stable".into(),
                    weight: 100,
                    backends: vec![stable],
                },
                VersionSpec {
                    name: "shadow".into(),
                    weight: 0,
                    backends: vec![shadow],
                },
            ],
        }],
    );
    if percent > 0 {
        toml.push_str(&format!(
            "\n[service.shadow]\nversion = \"shadow\"\npercent = {percent}\n"
        ));
    }
    Ok((toml, shadow))
}

/// What the clients saw.
struct Run {
    sent: Vec<Vec<u8>>,
    slowest: Duration,
}

/// `n` requests, each from a new socket (a new flow), each waiting for its
/// answer, which must be the stable server's echo of exactly these bytes.
fn requests(ns: &Netns, n: usize, tag: &str) -> Result<Run> {
    let vip = SocketAddrV4::new(topology::VIP, 53);
    ns.enter(|| -> Result<Run> {
        let mut sent = Vec::with_capacity(n);
        let mut slowest = Duration::ZERO;
        let mut buf = [0u8; 65536];
        for i in 0..n {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(vip)?;
            s.set_read_timeout(Some(TIMEOUT))?;
            // Binary bytes too: the copy must carry the payload exactly.
            let mut payload = format!("{tag}-{i}-").into_bytes();
            payload.extend((0..=255u8).map(|b| b.wrapping_mul(i as u8 | 1)));
            let t = Instant::now();
            s.send(&payload)?;
            let got = s
                .recv(&mut buf)
                .with_context(|| format!("request {i}: no answer within {TIMEOUT:?}"))?;
            slowest = slowest.max(t.elapsed());
            let answer = &buf[..got];
            // "stable <peer> <payload>"
            let mut parts = answer.splitn(3, |b| *b == b' ');
            let (Some(name), Some(_peer), Some(echo)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!(
                    "request {i}: malformed answer {:?}",
                    String::from_utf8_lossy(answer)
                );
            };
            ensure!(
                name == b"stable",
                "request {i}: answered by {:?}, not the stable version",
                String::from_utf8_lossy(name)
            );
            ensure!(
                echo == payload.as_slice(),
                "request {i}: the echo differs from the request"
            );
            sent.push(payload);
        }
        Ok(Run { sent, slowest })
    })?
}

fn counter(status: &Value, name: &str) -> u64 {
    status["counters"][name].as_u64().unwrap_or(0)
}

/// Polls the status until `f` holds (at most 3 s).
fn wait_status(daemon: &Daemon, what: &str, f: impl Fn(&Value) -> bool) -> Result<Value> {
    let start = Instant::now();
    loop {
        let s = daemon.status_json()?;
        if f(&s) {
            return Ok(s);
        }
        if start.elapsed() > Duration::from_secs(3) {
            bail!("{what}: not reached within 3 s: {}", s["counters"]);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn udp_shadow_gets_the_mirrored_share_and_clients_only_stable_answers() -> Result<()> {
    for (mode, flows) in [(Mode::Snat, 2000usize), (Mode::Dnat, 300)] {
        let topo = Topology::new(TopologyOptions::default())?;
        let (toml, shadow_addr) = config(&topo, mode, 10)?;
        let _stable = UdpIdentityServer::start(
            &topo.back,
            SocketAddrV4::new(*topo.backend(0)?.ip(), 5353),
            "stable",
        )?;
        let shadow = UdpRecorder::start(&topo.back, shadow_addr, "shadow", Recording::Answers)?;
        let daemon = Daemon::start(&topo.edge, &toml)?;
        let run = requests(&topo.cli, flows, "q")?;
        // Every copy reached the shadow, and its answer was dropped.
        let status = wait_status(&daemon, "shadow answers dropped", |s| {
            // Every copy sent has landed, and every answer was dropped.
            let got = shadow.got().len() as u64;
            got > 0
                && got >= counter(s, "shadow_cloned")
                && counter(s, "shadow_reply_dropped") >= got
        })?;
        let got = shadow.got();
        let share = got.len() as f64 * 100.0 / flows as f64;
        ensure!(
            (8.0..=12.0).contains(&share),
            "{mode:?}: the shadow got {} of {flows} datagrams ({share:.2}%), want 10 +- 2",
            got.len()
        );
        let sent: BTreeSet<&Vec<u8>> = run.sent.iter().collect();
        for g in &got {
            ensure!(
                sent.contains(g),
                "{mode:?}: the shadow got bytes no client sent: {:?}",
                String::from_utf8_lossy(g)
            );
        }
        let distinct: BTreeSet<&Vec<u8>> = got.iter().collect();
        ensure!(
            distinct.len() == got.len(),
            "{mode:?}: a datagram was copied twice"
        );
        ensure!(
            counter(&status, "shadow_cloned") == got.len() as u64
                && counter(&status, "shadow_copies") == got.len() as u64
                && counter(&status, "shadow_skipped") == 0,
            "{mode:?}: counters disagree with what the shadow got ({}): {}",
            got.len(),
            status["counters"]
        );
        ensure!(
            run.slowest < ANSWER_BOUND,
            "{mode:?}: slowest answer {:?}",
            run.slowest
        );
        topo.no_csum_errors()?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_shadow_that_is_down_or_stalls_costs_the_clients_nothing() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let (toml, shadow_addr) = config(&topo, Mode::Snat, 100)?;
    let _stable = UdpIdentityServer::start(
        &topo.back,
        SocketAddrV4::new(*topo.backend(0)?.ip(), 5353),
        "stable",
    )?;
    let daemon = Daemon::start(&topo.edge, &toml)?;
    // Down: nothing listens on the shadow's port (its host answers with
    // ICMP port unreachable, which the clients must never see).
    let down = requests(&topo.cli, 200, "down")?;
    ensure!(
        down.slowest < ANSWER_BOUND,
        "shadow down: slowest answer {:?}",
        down.slowest
    );
    // Stalls: it reads every copy and never answers.
    let stalled = UdpRecorder::start(&topo.back, shadow_addr, "shadow", Recording::Stalls)?;
    let run = requests(&topo.cli, 200, "stall")?;
    ensure!(
        run.slowest < ANSWER_BOUND,
        "shadow stalled: slowest answer {:?}",
        run.slowest
    );
    let status = wait_status(&daemon, "copies of the stalled run", |s| {
        counter(s, "shadow_cloned") >= 400 && stalled.got().len() >= 200
    })
    .with_context(|| {
        format!(
            "the stalled shadow has {} of 200 copies",
            stalled.got().len()
        )
    })?;
    ensure!(
        stalled.got().len() == 200,
        "the stalled shadow got {} of 200 copies",
        stalled.got().len()
    );
    ensure!(
        counter(&status, "shadow_reply_dropped") == 0,
        "a shadow that never answered had answers dropped: {}",
        status["counters"]
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn shadow_set_and_off_at_runtime_with_status_and_refusals() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let (toml, shadow_addr) = config(&topo, Mode::Snat, 0)?;
    let _stable = UdpIdentityServer::start(
        &topo.back,
        SocketAddrV4::new(*topo.backend(0)?.ip(), 5353),
        "stable",
    )?;
    let shadow = UdpRecorder::start(&topo.back, shadow_addr, "shadow", Recording::Answers)?;
    let daemon = Daemon::start(&topo.edge, &toml)?;
    requests(&topo.cli, 50, "before")?;
    ensure!(shadow.got().is_empty(), "copies before mirroring was set");

    // A version that serves clients cannot be the shadow.
    let refused = daemon.cli(&["shadow", "set", "dns", "stable", "--percent", "10"])?;
    ensure!(
        !refused.status.success() && refused.stderr.contains("a shadow version serves no client"),
        "mirroring to the stable version was not refused: {} {}",
        refused.stdout,
        refused.stderr
    );
    println!(
        "$ splitter shadow set dns stable --percent 10\n{}",
        refused.stderr
    );
    let refused = daemon.cli(&["shadow", "set", "dns", "shadow", "--percent", "0"])?;
    ensure!(
        !refused.status.success() && refused.stderr.contains("1..=100"),
        "percent 0 was not refused: {}",
        refused.stderr
    );

    let set = daemon.cli_ok(&["shadow", "set", "dns", "shadow", "--percent", "50"])?;
    // Shown with --nocapture (docs/deployments.md quotes a run).
    println!("$ splitter shadow set dns shadow --percent 50\n{set}");
    println!("refused: {}", refused.stderr);
    requests(&topo.cli, 400, "on")?;
    let status = wait_status(&daemon, "answers of the copies dropped", |s| {
        // Every copy sent has landed, and every answer was dropped.
        let got = shadow.got().len() as u64;
        got > 0 && got >= counter(s, "shadow_cloned") && counter(s, "shadow_reply_dropped") >= got
    })?;
    let got = shadow.got().len();
    ensure!(
        (184..=216).contains(&got),
        "the shadow got {got} of 400 datagrams at 50%"
    );
    let svc = &status["services"][0]["shadow"];
    ensure!(
        svc["version"] == "shadow"
            && svc["percent"] == 50
            && svc["copies"].as_u64() == Some(got as u64)
            // Every flow answered (a client port reused within the UDP
            // timeout is the same flow: flows may be fewer than copies).
            && svc["answered"] == svc["flows"]
            && svc["flows"].as_u64().is_some_and(|f| f > 0 && f <= got as u64)
            && svc["answers_dropped"].as_u64() == Some(got as u64),
        "the status disagrees with what the shadow got ({got}): {svc}"
    );
    let table = daemon.cli_ok(&["status"])?;
    println!("$ splitter status\n{table}");
    ensure!(
        table.contains(&format!("shadow of dns: 50% to shadow: {got} copies")),
        "no shadow line in the status:\n{table}"
    );

    let off = daemon.cli_ok(&["shadow", "off", "dns"])?;
    println!("$ splitter shadow off dns\n{off}");
    requests(&topo.cli, 100, "off")?;
    thread::sleep(Duration::from_millis(200));
    ensure!(
        shadow.got().len() == got,
        "copies after mirroring was turned off: {} then {got}",
        shadow.got().len()
    );
    let status = daemon.status_json()?;
    ensure!(
        status["services"][0]["shadow"].is_null(),
        "the status still shows a shadow: {}",
        status["services"][0]["shadow"]
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn mirroring_survives_kill_9_and_detach_removes_its_tc_link() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let bpffs = BpfMount::new()?;
    let (toml, shadow_addr) = config(&topo, Mode::Snat, 100)?;
    let toml = with_pin_dir(&toml, &bpffs.pin_dir());
    let _stable = UdpIdentityServer::start(
        &topo.back,
        SocketAddrV4::new(*topo.backend(0)?.ip(), 5353),
        "stable",
    )?;
    let shadow = UdpRecorder::start(&topo.back, shadow_addr, "shadow", Recording::Answers)?;
    let mut daemon = Daemon::start(&topo.edge, &toml)?;
    let tc_links: Vec<_> = ["ec", "eb"]
        .iter()
        .map(|i| bpffs.pin_dir().join(format!("tclink_{i}")))
        .collect();
    for l in &tc_links {
        ensure!(l.exists(), "no pinned tc link at {}", l.display());
    }
    requests(&topo.cli, 50, "first")?;
    // The next daemon takes the pinned tc links over (bpf_link_update).
    daemon.kill9_and_restart(&topo.edge)?;
    requests(&topo.cli, 50, "second")?;
    // The copies go through the kernel's forwarding, and may land a little
    // after the clients' answers: wait (bounded) for all of them.
    let start = Instant::now();
    while shadow.got().len() < 100 && start.elapsed() < Duration::from_secs(3) {
        thread::sleep(Duration::from_millis(20));
    }
    let got = shadow.got();
    ensure!(
        got.len() == 100,
        "the shadow got {} of 100 datagrams across the restart ({} of the first 50, {} of the second); counters: {}\ndaemon log:\n{}",
        got.len(),
        got.iter().filter(|g| g.starts_with(b"first-")).count(),
        got.iter().filter(|g| g.starts_with(b"second-")).count(),
        daemon.status_json()?["counters"],
        daemon.log()
    );
    ensure!(
        got.iter().filter(|g| g.starts_with(b"second-")).count() == 50,
        "copies after the restart missing"
    );
    daemon.cli_ok(&["detach"])?;
    for l in &tc_links {
        ensure!(!l.exists(), "detach left {}", l.display());
    }
    topo.no_csum_errors()
}
