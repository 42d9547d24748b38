//! Rollouts run by the real `splitter daemon` on a real XDP edge, driven
//! through the CLI exactly as docs/deployments.md shows, under continuous
//! load of short requests plus a long-lived connection that sends every
//! 50 ms:
//!
//! - a canary to a healthy version completes with no failed request and
//!   no long-lived connection reset or moved;
//! - a canary whose version refuses connections is rolled back on its own,
//!   within two analysis intervals, with failed requests no more than the
//!   canary's share of those made meanwhile, the stable version untouched,
//!   and its notification hooks (`started`, `rolled_back`) run with the
//!   documented environment;
//! - with no traffic, the analysis is inconclusive and the rollout pauses
//!   and says why; it never promotes;
//! - `rollout status --watch` exits 0 on completion, 1 on rollback, 4 on
//!   `--timeout`, 3 when its daemon goes away.
//!
//! Privileged, so `#[ignore]`d for a plain `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test rollout -- --include-ignored --test-threads=1
//! ```
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use splitter_tests::{
    clients::LongLivedConn,
    load::Load,
    rollouts::{rollout, weights},
    servers::TcpIdentityServer,
    splitter::{Affinity, Daemon, Mode, blue_green_config},
    topology::{self, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);

struct Setup {
    topo: Topology,
    _blue: TcpIdentityServer,
    _green: Option<TcpIdentityServer>,
    daemon: Daemon,
}

/// blue (serving) at weight 100, green (serving, or nothing listening when
/// `green_up` is false) at 0.
fn setup(green_up: bool) -> Result<Setup> {
    setup_with(green_up, "")
}

/// [`setup`] with `extra` appended to the config (tables of the service).
fn setup_with(green_up: bool, extra: &str) -> Result<Setup> {
    let topo = Topology::new(TopologyOptions::default())?;
    let blue = TcpIdentityServer::start(&topo.back, topo.backend(0)?, "blue")?;
    let green = if green_up {
        Some(TcpIdentityServer::start(
            &topo.back,
            topo.backend(1)?,
            "green",
        )?)
    } else {
        None
    };
    let config = format!(
        "{}\n{extra}",
        blue_green_config(Mode::Snat, Affinity::Flow, 100, 0)
    );
    let daemon = Daemon::start(&topo.edge, &config)?;
    Ok(Setup {
        topo,
        _blue: blue,
        _green: green,
        daemon,
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_canary_to_a_healthy_version_completes_with_no_failed_request() -> Result<()> {
    let s = setup(true)?;
    let long = LongLivedConn::start(&s.topo.cli, topology::vip(), TIMEOUT)?;
    ensure!(long.identity().name == "blue", "{:?}", long.identity());
    let load = Load::start(&s.topo.cli, topology::vip(), 2)?;
    let started = Instant::now();
    let out = s.daemon.cli_for(
        &[
            "rollout",
            "start",
            "web",
            "--to",
            "green",
            "--steps",
            "20,50,100",
            "--step-time",
            "2s",
            "--analysis-interval",
            "1s",
            "--min-attempts",
            "5",
            "--watch",
            "--timeout",
            "60s",
        ],
        Duration::from_secs(90),
    )?;
    let took = started.elapsed();
    let seen = load.stop();
    let report = long.stop();
    ensure!(
        out.status.code() == Some(0),
        "rollout start --watch exited {:?} after {took:?}\nstdout:\n{}\nstderr:\n{}\ndaemon log:\n{}",
        out.status.code(),
        out.stdout,
        out.stderr,
        s.daemon.log()
    );
    ensure!(
        seen.failures.is_empty(),
        "{} of {} requests failed: {:?}",
        seen.failures.len(),
        seen.ok() + seen.failures.len() as u64,
        &seen.failures[..seen.failures.len().min(5)]
    );
    ensure!(
        seen.per_name.get("green").copied().unwrap_or(0) > 0 && seen.per_name.contains_key("blue"),
        "both versions should have answered: {:?}",
        seen.per_name
    );
    ensure!(
        report.failures.is_empty() && report.echoed > 0,
        "the long-lived connection broke: {report:?}"
    );
    let w = weights(&s.daemon)?;
    ensure!(w["blue"] == 0 && w["green"] == 100, "weights after: {w:?}");
    let r = rollout(&s.daemon, "web")?;
    ensure!(r["state"] == "completed", "{r}");
    // Every step had a passing analysis.
    let verdicts = r["verdicts"].as_array().context("verdicts")?;
    ensure!(
        verdicts.iter().all(|v| v["verdict"] != "fail"),
        "a failed verdict: {r}"
    );
    // The history and the report.
    let history = s.daemon.cli_ok(&["rollout", "history", "web"])?;
    ensure!(
        history.contains("completed") && history.contains("step 3"),
        "{history}"
    );
    let file = s.daemon.dir().join("web-rollout.svg");
    let path = file.to_str().context("path")?;
    s.daemon
        .cli_ok(&["rollout", "report", "web", "--out", path])?;
    let svg = std::fs::read_to_string(&file)?;
    ensure!(
        svg.starts_with("<svg") && svg.contains("rollout of web"),
        "{svg:.200}"
    );
    s.topo.no_csum_errors()?;
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_canary_that_refuses_connections_is_rolled_back_on_its_own() -> Result<()> {
    // Notification hooks on `started` and `rolled_back` record their
    // environment, as docs/deployments.md documents it.
    let hooks = tempfile::tempdir()?;
    let hook = |event: &str| {
        format!(
            "[[service.rollout.hooks]]\nevent = \"{event}\"\nargv = [\"/bin/sh\", \"-c\", \"env | grep ^SPLITTER_ | sort > {}/{event}.env\"]\ntimeout_ms = 5000\n",
            hooks.path().display()
        )
    };
    let s = setup_with(
        false,
        &format!(
            "[service.rollout]\n{}{}",
            hook("started"),
            hook("rolled_back")
        ),
    )?;
    let long = LongLivedConn::start(&s.topo.cli, topology::vip(), TIMEOUT)?;
    let load = Load::start(&s.topo.cli, topology::vip(), 2)?;
    std::thread::sleep(Duration::from_millis(500));
    let before = load.snapshot();
    ensure!(
        before.failures.is_empty(),
        "failures before the rollout: {before:?}"
    );
    let t0 = load.started.elapsed();
    s.daemon.cli_ok(&[
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
    let out = s.daemon.cli_for(
        &["rollout", "status", "web", "--watch", "--timeout", "30s"],
        Duration::from_secs(45),
    )?;
    ensure!(
        out.status.code() == Some(1),
        "status --watch exited {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        out.stdout,
        out.stderr
    );
    // Let in-flight requests end, then look.
    std::thread::sleep(Duration::from_millis(1500));
    let seen = load.stop();
    let report = long.stop();
    let r = rollout(&s.daemon, "web")?;
    ensure!(r["state"] == "rolled-back", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("error rate"), "reason: {reason}");
    let w = weights(&s.daemon)?;
    ensure!(w["blue"] == 100 && w["green"] == 0, "weights after: {w:?}");
    // The failures all fell within two analysis intervals (plus the
    // client's connect time) of the first one.
    let first = seen
        .failures
        .first()
        .map(|f| f.0)
        .context("no request failed at all")?;
    let last = seen.failures.last().map(|f| f.0).unwrap_or(first);
    ensure!(
        last - first <= Duration::from_millis(2 * 1000 + 1500),
        "failures went on for {:?} (from {first:?} to {last:?} after the load started; rollout at {t0:?})",
        last - first
    );
    // No more than the canary's share (20%) of the requests made meanwhile.
    let made = seen.ok() + seen.failures.len() as u64;
    ensure!(
        (seen.failures.len() as u64) * 100 <= 20 * made + 100,
        "{} of {made} requests failed",
        seen.failures.len()
    );
    // The stable version was untouched.
    ensure!(
        report.failures.is_empty(),
        "long-lived connection: {report:?}"
    );
    // Each hook ran once with the event's environment (bounded wait: hooks
    // run on tasks of their own).
    let read = |event: &str| -> Result<String> {
        let path = hooks.path().join(format!("{event}.env"));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match std::fs::read_to_string(&path) {
                Ok(t) if t.contains("SPLITTER_EVENT") => return Ok(t),
                r if Instant::now() >= deadline => {
                    anyhow::bail!(
                        "the {event} hook wrote no environment ({r:?}); daemon log:\n{}",
                        s.daemon.log()
                    )
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };
    let started = read("started")?;
    for want in [
        "SPLITTER_EVENT=started",
        "SPLITTER_SERVICE=web",
        "SPLITTER_FROM=blue",
        "SPLITTER_TO=green",
    ] {
        ensure!(
            started.contains(want),
            "started hook env lacks {want}:\n{started}"
        );
    }
    let rolled_back = read("rolled_back")?;
    for want in [
        "SPLITTER_EVENT=rolled_back",
        "SPLITTER_SERVICE=web",
        "SPLITTER_TARGET_PERCENT=0",
        "SPLITTER_REASON=",
    ] {
        ensure!(
            rolled_back.contains(want),
            "rolled_back hook env lacks {want}:\n{rolled_back}"
        );
    }
    ensure!(
        rolled_back.contains("error rate"),
        "the rolled_back hook's reason does not say why:\n{rolled_back}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn without_traffic_a_rollout_pauses_and_says_why_and_never_promotes() -> Result<()> {
    let s = setup(true)?;
    s.daemon.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--steps",
        "50,100",
        "--step-time",
        "1s",
        "--analysis-interval",
        "1s",
    ])?;
    // Three inconclusive verdicts in a row (the default limit) pause it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let r = loop {
        let r = rollout(&s.daemon, "web")?;
        if r["state"] == "paused" || Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    ensure!(r["state"] == "paused", "not paused after 15 s: {r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    ensure!(reason.contains("inconclusive"), "reason: {reason}");
    ensure!(r["step"] == 1 && r["target_percent"] == 50, "{r}");
    // A watch with a timeout gives up with exit 4; the rollout stays paused.
    let out = s.daemon.cli_for(
        &["rollout", "status", "web", "--watch", "--timeout", "2s"],
        Duration::from_secs(15),
    )?;
    ensure!(
        out.status.code() == Some(4),
        "exit {:?}: {}{}",
        out.status.code(),
        out.stdout,
        out.stderr
    );
    let w = weights(&s.daemon)?;
    ensure!(w["green"] == 50, "weights: {w:?}");
    // A paused rollout refuses a conflicting edit, naming itself.
    let refused = s
        .daemon
        .cli(&["weights", "set", "web", "blue=0", "green=100"])?;
    ensure!(
        refused.status.code() == Some(1) && refused.stderr.contains("rollout in progress"),
        "{}",
        refused.stderr
    );
    // Aborted: new flows back to blue, and the watch says so with exit 1.
    s.daemon.cli_ok(&["rollout", "abort", "web"])?;
    let w = weights(&s.daemon)?;
    ensure!(
        w["blue"] == 100 && w["green"] == 0,
        "weights after abort: {w:?}"
    );
    let out = s.daemon.cli(&["rollout", "status", "web", "--watch"])?;
    ensure!(out.status.code() == Some(1), "exit {:?}", out.status.code());

    // A watch whose daemon goes away exits 3.
    let mut s = s;
    s.daemon.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--steps",
        "50,100",
        "--step-time",
        "60s",
    ])?;
    let mut watch = std::process::Command::new(s.daemon.bin());
    watch
        .arg("--socket")
        .arg(s.daemon.socket())
        .args(["rollout", "status", "web", "--watch"]);
    let watcher = std::thread::spawn(move || {
        splitter_tests::netns::output_with_timeout(&mut watch, Duration::from_secs(20))
    });
    std::thread::sleep(Duration::from_millis(1500));
    s.daemon.stop()?;
    let out = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("the watch thread panicked"))??;
    ensure!(
        out.status.code() == Some(3),
        "a watch whose daemon stopped exited {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        out.stdout,
        out.stderr
    );
    ensure!(
        out.stdout.contains("running"),
        "the watch printed no running rollout before the daemon went away: {}",
        out.stdout
    );
    Ok(())
}
