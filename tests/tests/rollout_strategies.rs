//! Rollout strategies and failure modes, run by the real `splitter daemon`
//! on a real XDP edge through the CLI, each under continuous load of short
//! requests plus a long-lived connection that sends every 50 ms:
//!
//! - **blue-green**: during the preview, the preview address reaches only
//!   green and the VIP only blue; `rollout promote` switches every new flow
//!   to green at once; the post-switch analysis passes and the rollout
//!   completes; `rollout undo` sends every new flow back to blue; no failed
//!   request, the long-lived connection never breaks;
//! - **SIGKILL during a canary step**: with a pinned data plane (`--on-stop
//!   keep`) the daemon is killed at step 2 (50%) and restarted: the same
//!   step, running, weights unchanged, no failed request, the long-lived
//!   connection intact; `rollout promote --full` then completes it;
//! - **rolling update** of three backends whose deploy hook hands each
//!   backend to the test, which restarts its server as `v2`: no failed
//!   request, every backend answers `v2`, the long-lived connection is
//!   served until its backend's drain deadline; then a failing hook stops a
//!   second rollout with that backend left drained and the hook named;
//! - a canary whose target **passes its health check but resets** every
//!   connection is rolled back on the passive signal alone;
//! - a canary whose target answers **HTTP 500s**, judged by the external
//!   metric from a real Prometheus, is rolled back naming the metric.
//!
//! Privileged, so `#[ignore]`d for a plain `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test rollout_strategies -- --include-ignored --test-threads=1
//! ```
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use splitter_tests::{
    clients::{LongLivedConn, LongLivedReport},
    load::{Load, Seen, one_request},
    netns::Netns,
    prometheus::{Prometheus, RATIO_QUERY, free_port},
    rollouts::{
        DeployHook, HalfErrorsExporter, ResettingServer, eventually, rollout, version_status,
        weights,
    },
    servers::TcpIdentityServer,
    splitter::{
        Affinity, BpfMount, Daemon, Mode, ServiceSpec, VersionSpec, blue_green_config, config_toml,
        status_backend, with_pin_dir,
    },
    topology::{self, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);
const KEEP: [&str; 2] = ["--on-stop", "keep"];
/// TCP health checks every 200 ms: out after 2 failures, back after 1 pass.
const HEALTH: &str = "\n[service.health]\ncheck = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 500\nfall = 2\nrise = 1\n";

fn preview() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 20), 80)
}

/// Fails with the first few failures if the load saw any.
fn no_failures(seen: &Seen) -> Result<()> {
    ensure!(
        seen.failures.is_empty(),
        "{} of {} requests failed: {:?}",
        seen.failures.len(),
        seen.ok() + seen.failures.len() as u64,
        &seen.failures[..seen.failures.len().min(5)]
    );
    Ok(())
}

fn intact(report: &LongLivedReport) -> Result<()> {
    ensure!(
        report.failures.is_empty() && report.echoed > 0,
        "the long-lived connection broke: {report:?}"
    );
    Ok(())
}

/// `n` requests to `addr` from `cli`, one after the other: answers per name
/// (failures under `"<failed>"`).
fn requests(cli: &Netns, addr: SocketAddrV4, n: usize) -> Result<BTreeMap<String, u64>> {
    cli.enter(move || {
        let mut m = BTreeMap::new();
        for _ in 0..n {
            let name = one_request(addr).unwrap_or_else(|_| "<failed>".to_string());
            *m.entry(name).or_default() += 1;
        }
        m
    })
}

/// Only `name` answered, at least once.
fn only(what: &str, answers: &BTreeMap<String, u64>, name: &str) -> Result<()> {
    ensure!(
        answers.len() == 1 && answers.get(name).copied().unwrap_or(0) > 0,
        "{what}: expected only {name} to answer, got {answers:?}"
    );
    Ok(())
}

fn expect_exit(out: &splitter_tests::netns::Output, code: i32, daemon: &Daemon) -> Result<()> {
    ensure!(
        out.status.code() == Some(code),
        "exit {:?} (expected {code})\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
        out.status.code(),
        out.stdout,
        out.stderr,
        daemon.log()
    );
    Ok(())
}

/// The state (`active`, `drain`...) of `addr` in `web`.
fn backend_state(daemon: &Daemon, addr: SocketAddrV4) -> Result<String> {
    let st = daemon.status_json()?;
    let b = status_backend(&st, "web", addr)?;
    b["state"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no state for {addr}: {b}"))
}

struct BlueGreen {
    topo: Topology,
    _blue: TcpIdentityServer,
    _green: TcpIdentityServer,
}

fn blue_green_servers(topo: Topology) -> Result<BlueGreen> {
    let blue = TcpIdentityServer::start(&topo.back, topo.backend(0)?, "blue")?;
    let green = TcpIdentityServer::start(&topo.back, topo.backend(1)?, "green")?;
    Ok(BlueGreen {
        topo,
        _blue: blue,
        _green: green,
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn blue_green_previews_then_switches_atomically_and_undoes() -> Result<()> {
    let s = blue_green_servers(Topology::new(TopologyOptions::default())?)?;
    let (cli, vip) = (&s.topo.cli, topology::vip());
    let daemon = Daemon::start(
        &s.topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let long = LongLivedConn::start(cli, vip, TIMEOUT)?;
    ensure!(long.identity().name == "blue", "{:?}", long.identity());
    let load = Load::start(cli, vip, 2)?;
    std::thread::sleep(Duration::from_millis(300));

    let t_start = load.elapsed();
    let preview_arg = preview().to_string();
    daemon.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--strategy",
        "blue-green",
        "--preview",
        &preview_arg,
        "--post-switch-time",
        "2s",
        "--analysis-interval",
        "1s",
        "--min-attempts",
        "5",
    ])?;
    let r = rollout(&daemon, "web")?;
    ensure!(
        r["strategy"] == "blue-green" && r["step"] == 1 && r["target_percent"] == 0,
        "{r}"
    );
    // The preview: its address reaches only green, the VIP only blue.
    let previewed = eventually(Duration::from_secs(5), || {
        let a = requests(cli, preview(), 20)?;
        only("the preview address", &a, "green")?;
        Ok(a)
    })?;
    std::thread::sleep(Duration::from_millis(1000));
    let r = rollout(&daemon, "web")?;
    ensure!(
        r["state"] == "running" && r["step"] == 1,
        "the preview ended on its own: {r}"
    );
    let t_promote = load.elapsed();
    daemon.cli_ok(&["rollout", "promote", "web"])?;
    let t_promoted = load.elapsed();
    let w = weights(&daemon)?;
    ensure!(
        w["blue"] == 0 && w["green"] == 100,
        "weights after promote: {w:?}"
    );

    // The post-switch analysis passes and the rollout completes.
    let out = daemon.cli_for(
        &["rollout", "status", "web", "--watch", "--timeout", "30s"],
        Duration::from_secs(45),
    )?;
    expect_exit(&out, 0, &daemon)?;
    let r = rollout(&daemon, "web")?;
    ensure!(r["state"] == "completed", "{r}");
    ensure!(
        r["verdicts"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["verdict"] == "pass")),
        "no passing post-switch verdict: {r}"
    );
    // The preview address is gone with the preview.
    let after = requests(cli, preview(), 3)?;
    ensure!(
        !after.contains_key("green") && !after.contains_key("blue"),
        "the preview address still answers after the switch: {after:?}"
    );

    let t_undo = load.elapsed();
    daemon.cli_ok(&["rollout", "undo", "web"])?;
    let t_undone = load.elapsed();
    let w = weights(&daemon)?;
    ensure!(
        w["blue"] == 100 && w["green"] == 0,
        "weights after undo: {w:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let seen = load.stop();
    let report = long.stop();
    let r = rollout(&daemon, "web")?;
    ensure!(
        r["state"] == "rolled-back" && r["reason"].as_str().is_some_and(|s| s.contains("undone")),
        "after undo: {r}"
    );

    no_failures(&seen)?;
    intact(&report)?;
    eprintln!("preview answers: {previewed:?}");
    only(
        "VIP during the preview",
        &seen.started_between(t_start, t_promote),
        "blue",
    )?;
    only(
        "VIP after the promote",
        &seen.started_between(t_promoted, t_undo),
        "green",
    )?;
    only("VIP after the undo", &seen.started_since(t_undone), "blue")?;
    s.topo.no_csum_errors()?;
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_daemon_killed_during_a_canary_step_resumes_it_at_that_step() -> Result<()> {
    let s = blue_green_servers(Topology::new(TopologyOptions::default())?)?;
    let bpffs = BpfMount::new()?;
    let (cli, vip) = (&s.topo.cli, topology::vip());
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
        &bpffs.pin_dir(),
    );
    let mut daemon = Daemon::start_with_args(&s.topo.edge, &config, &KEEP)?;
    let long = LongLivedConn::start(cli, vip, TIMEOUT)?;
    let load = Load::start(cli, vip, 2)?;
    daemon.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--steps",
        "20,50,100",
        "--step-time",
        "60s",
        "--analysis-interval",
        "1s",
        "--min-attempts",
        "5",
    ])?;
    let r = rollout(&daemon, "web")?;
    ensure!(r["step"] == 1 && r["target_percent"] == 20, "{r}");
    daemon.cli_ok(&["rollout", "promote", "web"])?;
    let r = rollout(&daemon, "web")?;
    ensure!(
        r["step"] == 2 && r["target_percent"] == 50 && r["state"] == "running",
        "{r}"
    );
    let w = weights(&daemon)?;
    ensure!(
        w["blue"] == 50 && w["green"] == 50,
        "weights at step 2: {w:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));

    let pid = daemon.pid();
    daemon.kill9_and_restart(&s.topo.edge)?;
    ensure!(daemon.pid() != pid, "the daemon was not restarted");
    let t_restarted = load.elapsed();
    let check = |when: &str| -> Result<()> {
        let r = rollout(&daemon, "web")?;
        ensure!(
            r["step"] == 2 && r["target_percent"] == 50 && r["state"] == "running",
            "{when}: {r}"
        );
        let w = weights(&daemon)?;
        ensure!(w["blue"] == 50 && w["green"] == 50, "{when}: weights {w:?}");
        Ok(())
    };
    check("right after the restart")?;
    // It stays there: a 60 s step neither advances nor rolls back.
    std::thread::sleep(Duration::from_millis(2500));
    check("2.5 s after the restart")?;
    let mid = load.snapshot();
    let since = mid.started_since(t_restarted);
    ensure!(
        since.get("blue").copied().unwrap_or(0) > 0 && since.get("green").copied().unwrap_or(0) > 0,
        "both versions should answer after the restart: {since:?}"
    );

    daemon.cli_ok(&["rollout", "promote", "web", "--full"])?;
    let r = rollout(&daemon, "web")?;
    ensure!(r["state"] == "completed", "{r}");
    let w = weights(&daemon)?;
    ensure!(w["blue"] == 0 && w["green"] == 100, "weights after: {w:?}");
    let out = daemon.cli(&["rollout", "status", "web", "--watch", "--timeout", "5s"])?;
    expect_exit(&out, 0, &daemon)?;
    std::thread::sleep(Duration::from_millis(500));
    let seen = load.stop();
    let report = long.stop();
    no_failures(&seen)?;
    intact(&report)?;
    let history = daemon.cli_ok(&["rollout", "history", "web"])?;
    ensure!(history.contains("completed"), "{history}");
    Ok(())
}

/// Service `web`, version `blue` with three backends, health checks, and a
/// rolling strategy that drains for at most 2 s and ramps up in 1 s.
fn rolling_config(topo: &Topology) -> Result<String> {
    let backends = (0..3)
        .map(|i| topo.backend(i))
        .collect::<Result<Vec<_>>>()?;
    Ok(format!(
        "{}{HEALTH}\n[service.rollout]\nkeep_old_ms = 60000\n[service.rollout.strategy]\nkind = \"rolling\"\n\
         drain_deadline_ms = 2000\nrise = 1\nslow_start_ms = 1000\nhook_timeout_ms = 20000\n",
        config_toml(
            Mode::Snat,
            &[ServiceSpec {
                name: "web".into(),
                vip: topology::vip(),
                protocol: "tcp",
                affinity: Affinity::Flow,
                versions: vec![VersionSpec {
                    name: "blue".into(),
                    weight: 100,
                    backends,
                }],
            }],
        )
    ))
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_rolling_update_redeploys_every_backend_and_a_failing_hook_stops_it() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 3,
        ..Default::default()
    })?;
    let (cli, vip) = (&topo.cli, topology::vip());
    let addrs: Vec<SocketAddrV4> = (0..3).map(|i| topo.backend(i)).collect::<Result<_>>()?;
    let servers: Mutex<BTreeMap<SocketAddrV4, TcpIdentityServer>> = Mutex::new(
        addrs
            .iter()
            .map(|&a| Ok((a, TcpIdentityServer::start(&topo.back, a, "v1")?)))
            .collect::<Result<_>>()?,
    );
    let daemon = Daemon::start(&topo.edge, &rolling_config(&topo)?)?;
    for &a in &addrs {
        daemon.wait_health("web", a, "up", Duration::from_secs(10))?;
    }
    let long = LongLivedConn::start(cli, vip, TIMEOUT)?;
    ensure!(long.identity().name == "v1", "{:?}", long.identity());
    long.wait_echoes(2, TIMEOUT)?;
    // Which backend holds it: the only server with an open connection.
    let long_backend = {
        let s = servers.lock().unwrap_or_else(|e| e.into_inner());
        let open: Vec<SocketAddrV4> = s
            .iter()
            .filter(|(_, srv)| srv.stats().active() == 1)
            .map(|(a, _)| *a)
            .collect();
        ensure!(open.len() == 1, "open connections on {open:?}");
        open[0]
    };
    let load = Load::start(cli, vip, 2)?;
    std::thread::sleep(Duration::from_millis(300));

    // The deployer: restarts each backend's server as `v2` when its hook
    // asks, then lets the hook exit 0.
    let hook = DeployHook::new()?;
    let stop = AtomicBool::new(false);
    let hook_arg = hook.script().to_string_lossy().into_owned();
    let started = Instant::now();
    let (out, deployed) = std::thread::scope(|sc| {
        let deployer = sc.spawn(|| -> Result<Vec<(String, LongLivedReport, Duration)>> {
            let mut done = Vec::new();
            let limit = Instant::now() + Duration::from_secs(150);
            while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                for b in hook.requests()? {
                    let addr: SocketAddrV4 = b.parse()?;
                    let before = long.report();
                    let mut s = servers.lock().unwrap_or_else(|e| e.into_inner());
                    let old = s
                        .remove(&addr)
                        .with_context(|| format!("no server at {b}"))?;
                    old.stop();
                    s.insert(addr, TcpIdentityServer::start(&topo.back, addr, "v2")?);
                    drop(s);
                    hook.done(&b)?;
                    done.push((b, before, started.elapsed()));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(done)
        });
        let out = daemon.cli_for(
            &[
                "rollout",
                "start",
                "web",
                "--to",
                "blue",
                "--strategy",
                "rolling",
                "--batch-size",
                "1",
                "--analysis-interval",
                "1s",
                "--min-attempts",
                "5",
                "--hook",
                &hook_arg,
                "--watch",
                "--timeout",
                "120s",
            ],
            Duration::from_secs(150),
        );
        stop.store(true, Ordering::Relaxed);
        let deployed = deployer
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the deployer panicked")));
        (out, deployed)
    });
    let took = started.elapsed();
    let out = out?;
    let deployed = deployed?;
    expect_exit(&out, 0, &daemon)?;
    eprintln!("rolling update of 3 backends took {took:?}");
    let t_done = load.elapsed();
    let r = rollout(&daemon, "web")?;
    ensure!(
        r["state"] == "completed" && r["strategy"] == "rolling",
        "{r}"
    );

    // One batch after the other, in config order, each deployed once.
    let order: Vec<&str> = deployed.iter().map(|d| d.0.as_str()).collect();
    let want: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    ensure!(order == want, "deploy order {order:?}, expected {want:?}");
    for a in &addrs {
        let env = hook.env_of(&a.to_string())?;
        for (k, v) in [
            ("SPLITTER_BACKEND", a.to_string()),
            ("SPLITTER_SERVICE", "web".to_string()),
            ("SPLITTER_VERSION", "blue".to_string()),
        ] {
            ensure!(
                env.get(k) == Some(&v),
                "hook of {a}: {k} = {:?}, expected {v:?} (environment {env:?})",
                env.get(k)
            );
        }
    }
    // The long-lived connection was served until its backend was
    // redeployed, which waited for the drain deadline.
    let (_, long_before, _) = deployed
        .iter()
        .find(|d| d.0 == long_backend.to_string())
        .context("the long-lived connection's backend was never deployed")?;
    ensure!(
        long_before.failures.is_empty() && long_before.echoed > 20,
        "the long-lived connection broke before its backend was redeployed: {long_before:?}"
    );
    let history = daemon.cli_ok(&["rollout", "history", "web"])?;
    ensure!(
        history.contains("drain deadline of 2000 ms reached")
            && history.contains(&long_backend.to_string()),
        "the drain of {long_backend} should have waited for its deadline:\n{history}"
    );
    drop(long);

    // Every backend answers as v2, and each took new flows at the end.
    std::thread::sleep(Duration::from_millis(1000));
    only("after the update", &requests(cli, vip, 30)?, "v2")?;
    let snap = load.snapshot();
    only("load after the update", &snap.started_since(t_done), "v2")?;
    no_failures(&snap)?;
    {
        let s = servers.lock().unwrap_or_else(|e| e.into_inner());
        for (a, srv) in s.iter() {
            ensure!(
                srv.name() == "v2" && srv.stats().requests() > 0,
                "{a}: {} served {} requests",
                srv.name(),
                srv.stats().requests()
            );
        }
    }

    // A failing hook: the rollout stops, its backend left drained.
    let failing = DeployHook::failing()?;
    let fail_arg = failing.script().to_string_lossy().into_owned();
    let out = daemon.cli_for(
        &[
            "rollout",
            "start",
            "web",
            "--to",
            "blue",
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            "--analysis-interval",
            "1s",
            "--min-attempts",
            "5",
            "--hook",
            &fail_arg,
            "--watch",
            "--timeout",
            "60s",
        ],
        Duration::from_secs(90),
    )?;
    expect_exit(&out, 1, &daemon)?;
    let first = addrs[0];
    let r = rollout(&daemon, "web")?;
    let reason = r["reason"].as_str().unwrap_or_default();
    ensure!(
        r["state"] == "aborted"
            && reason.contains("deploy hook")
            && reason.contains(&first.to_string()),
        "after the failing hook: {r}"
    );
    ensure!(
        failing.called_for()?.into_iter().collect::<Vec<_>>() == vec![first.to_string()],
        "the failing hook ran for {:?}",
        failing.called_for()?
    );
    ensure!(
        backend_state(&daemon, first)? == "drain",
        "{first} is not drained: {}",
        daemon.status_json()?
    );
    for &a in &addrs[1..] {
        ensure!(backend_state(&daemon, a)? == "active", "{a} is not active");
    }
    // No new flow reaches the drained backend: its server, renamed (the
    // health checks connect to it too, so its own counters cannot tell),
    // never answers the load.
    {
        let mut s = servers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = s.remove(&first) {
            old.stop();
        }
        s.insert(
            first,
            TcpIdentityServer::start(&topo.back, first, "drained")?,
        );
    }
    let t_aborted = load.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let seen = load.stop();
    let after = seen.started_since(t_aborted);
    ensure!(
        !after.contains_key("drained") && after.get("v2").copied().unwrap_or(0) > 0,
        "after the abort, with {first} drained: {after:?}"
    );
    no_failures(&seen)?;
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_canary_that_passes_health_checks_but_resets_is_rolled_back_on_the_passive_signal() -> Result<()>
{
    let topo = Topology::new(TopologyOptions::default())?;
    let (cli, vip) = (&topo.cli, topology::vip());
    let _blue = TcpIdentityServer::start(&topo.back, topo.backend(0)?, "blue")?;
    let green = topo.backend(1)?;
    let _green = ResettingServer::start(&topo.back, green)?;
    let config = format!(
        "{}{HEALTH}",
        blue_green_config(Mode::Snat, Affinity::Flow, 100, 0)
    );
    let daemon = Daemon::start(&topo.edge, &config)?;
    daemon.wait_health("web", green, "up", Duration::from_secs(10))?;
    let long = LongLivedConn::start(cli, vip, TIMEOUT)?;
    let load = Load::start(cli, vip, 2)?;
    std::thread::sleep(Duration::from_millis(500));
    no_failures(&load.snapshot())?;

    daemon.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--steps",
        "20,50,100",
        "--step-time",
        "10s",
        "--analysis-interval",
        "1s",
        "--min-attempts",
        "5",
        "--max-error-rate",
        "0.05",
    ])?;
    let out = daemon.cli_for(
        &["rollout", "status", "web", "--watch", "--timeout", "30s"],
        Duration::from_secs(45),
    )?;
    expect_exit(&out, 1, &daemon)?;
    let t_rolled_back = load.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    let seen = load.stop();
    let report = long.stop();

    let r = rollout(&daemon, "web")?;
    ensure!(r["state"] == "rolled-back", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("error rate") && reason.contains("reset"),
        "reason: {reason}"
    );
    let w = weights(&daemon)?;
    ensure!(w["blue"] == 100 && w["green"] == 0, "weights after: {w:?}");
    let g = version_status(&daemon, "green")?;
    let resets = g["signals"]["reset_by_backend"].as_u64().unwrap_or(0);
    ensure!(resets > 0, "no reset_by_backend counted for green: {g}");
    // The active checks never saw anything wrong: the passive signal alone.
    let st = daemon.status_json()?;
    ensure!(
        status_backend(&st, "web", green)?["health"] == "up",
        "green's health check failed too: {st}"
    );
    // Failures: some (the canary's share), none after the rollback settled.
    ensure!(!seen.failures.is_empty(), "no request was reset at all");
    let late: Vec<_> = seen
        .failures
        .iter()
        .filter(|f| f.0 > t_rolled_back + Duration::from_millis(500))
        .collect();
    ensure!(late.is_empty(), "failures after the rollback: {late:?}");
    let made = seen.ok() + seen.failures.len() as u64;
    ensure!(
        (seen.failures.len() as u64) * 100 <= 20 * made + 100,
        "{} of {made} requests failed",
        seen.failures.len()
    );
    intact(&report)?;
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_canary_with_http_500s_is_rolled_back_on_the_external_metric() -> Result<()> {
    let s = blue_green_servers(Topology::new(TopologyOptions::default())?)?;
    let (cli, vip, edge) = (&s.topo.cli, topology::vip(), &s.topo.edge);
    let exporter_addr = format!("127.0.0.1:{}", free_port(edge)?);
    let exporter = HalfErrorsExporter::start(edge, &exporter_addr)?;
    let prom_addr = format!("127.0.0.1:{}", free_port(edge)?);
    let mut prometheus = Prometheus::start(edge, &prom_addr, &exporter_addr)?;
    let config = format!(
        "{}\n[service.analysis]\nprometheus = \"http://{prom_addr}\"\nquery = '{RATIO_QUERY}'\nmax = 0.05\ninterval_ms = 1000\n",
        blue_green_config(Mode::Snat, Affinity::Flow, 100, 0)
    );
    let daemon = Daemon::start(edge, &config)?;
    prometheus.wait_ready(edge, &prom_addr)?;
    // The daemon reads green's 0.5 and blue's 0 before the rollout.
    eventually(Duration::from_secs(30), || {
        for (v, want) in [("green", 0.5), ("blue", 0.0)] {
            let m = &version_status(&daemon, v)?["metric"];
            ensure!(m["value"].as_f64() == Some(want), "{v}: {m}");
        }
        Ok(())
    })
    .with_context(|| {
        format!(
            "{} scrapes; prometheus:\n{}",
            exporter.scrapes(),
            prometheus.log_tail()
        )
    })?;

    let long = LongLivedConn::start(cli, vip, TIMEOUT)?;
    let load = Load::start(cli, vip, 2)?;
    daemon.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--steps",
        "20,50,100",
        "--step-time",
        "10s",
        "--analysis-interval",
        "1s",
        "--min-attempts",
        "5",
    ])?;
    let started = Instant::now();
    let out = daemon.cli_for(
        &["rollout", "status", "web", "--watch", "--timeout", "30s"],
        Duration::from_secs(45),
    )?;
    expect_exit(&out, 1, &daemon)?;
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let seen = load.stop();
    let report = long.stop();
    let r = rollout(&daemon, "web")?;
    ensure!(r["state"] == "rolled-back", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    ensure!(
        reason.contains("external metric") && reason.contains("0.5") && reason.contains("0.05"),
        "reason: {reason}"
    );
    ensure!(
        !reason.contains("error rate"),
        "the connections were all fine, yet: {reason}"
    );
    // At the first verdict (1 s interval), give or take a poll.
    ensure!(
        took < Duration::from_secs(5),
        "rolled back only after {took:?}"
    );
    let w = weights(&daemon)?;
    ensure!(w["blue"] == 100 && w["green"] == 0, "weights after: {w:?}");
    no_failures(&seen)?;
    ensure!(
        seen.per_name.get("green").copied().unwrap_or(0) > 0,
        "green never answered: {:?}",
        seen.per_name
    );
    intact(&report)?;
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn the_deploy_hook_gets_the_documented_environment() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 3,
        ..Default::default()
    })?;
    let _servers = (0..3)
        .map(|i| TcpIdentityServer::start(&topo.back, topo.backend(i)?, "v1"))
        .collect::<Result<Vec<_>>>()?;
    let daemon = Daemon::start(&topo.edge, &rolling_config(&topo)?)?;
    let hook = DeployHook::failing()?;
    let hook_arg = hook.script().to_string_lossy().into_owned();
    let out = daemon.cli_for(
        &[
            "rollout",
            "start",
            "web",
            "--to",
            "blue",
            "--strategy",
            "rolling",
            "--batch-size",
            "1",
            "--hook",
            &hook_arg,
            "--watch",
            "--timeout",
            "30s",
        ],
        Duration::from_secs(45),
    )?;
    expect_exit(&out, 1, &daemon)?;
    let first = topo.backend(0)?.to_string();
    let env = hook.env_of(&first)?;
    for k in [
        "SPLITTER_BACKEND",
        "SPLITTER_SERVICE",
        "SPLITTER_VERSION",
        "SPLITTER_BATCH",
    ] {
        ensure!(
            env.contains_key(k),
            "the deploy hook of {first} ran without {k}: {env:?}"
        );
    }
    Ok(())
}
