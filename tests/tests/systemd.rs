//! systemd integration of the real daemon: the shipped unit passes
//! `systemd-analyze verify`, and a daemon started with a real
//! `NOTIFY_SOCKET` reports READY (only once it forwards), STATUS, WATCHDOG
//! pings, RELOADING/READY around a SIGHUP reload, and STOPPING.
//!
//! Privileged (the daemon attaches XDP), so `#[ignore]`d for a plain
//! `cargo test`; `cargo xtask test` runs it.
use std::{
    os::unix::net::UnixDatagram,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use splitter_tests::{
    clients,
    servers::TcpIdentityServer,
    splitter::{Affinity, Daemon, Mode, blue_green_config, splitter_bin},
    topology::{self, Topology, TopologyOptions},
};

/// Reads notifications until one contains `want` (bounded by `timeout`).
fn wait_for(
    sock: &UnixDatagram,
    want: &str,
    timeout: Duration,
    seen: &mut Vec<String>,
) -> Result<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10)),
        ))?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                seen.push(msg.clone());
                if msg.lines().any(|l| l == want || l.starts_with(want)) {
                    return Ok(msg);
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.into()),
        }
    }
    bail!("no {want:?} within {timeout:?}; got {seen:?}")
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn shipped_unit_passes_systemd_analyze_verify() -> Result<()> {
    if !splitter_tests::netns::on_path("systemd-analyze") {
        bail!("systemd-analyze is not installed (apt-get install systemd)");
    }
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/splitter.service");
    let text =
        std::fs::read_to_string(&unit).with_context(|| format!("reading {}", unit.display()))?;
    // Verify against the binary that was built (the unit names /usr/bin/splitter).
    let bin = splitter_bin()?;
    let dir = tempfile::tempdir()?;
    let copy = dir.path().join("splitter.service");
    std::fs::write(
        &copy,
        text.replace("/usr/bin/splitter", &bin.to_string_lossy()),
    )?;
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about other units on this machine are not ours to judge.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("splitter.service"))
        .collect();
    ensure!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
    for want in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=",
        "Restart=on-failure",
        "CapabilityBoundingSet=",
        "StateDirectory=",
        "RuntimeDirectory=",
        "--on-stop keep",
    ] {
        ensure!(text.contains(want), "unit lacks {want}");
    }
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn daemon_reports_ready_status_watchdog_reload_and_stopping() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let _blue = TcpIdentityServer::start(&topo.back, topo.backend(0)?, "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, topo.backend(1)?, "green")?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path)?;
    // SAFETY: privileged tests run one at a time; the variables are removed below.
    unsafe {
        std::env::set_var("NOTIFY_SOCKET", &path);
        std::env::set_var("WATCHDOG_USEC", "400000");
    }
    let started = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    );
    unsafe {
        std::env::remove_var("NOTIFY_SOCKET");
        std::env::remove_var("WATCHDOG_USEC");
    }
    let mut daemon = started?;
    let mut seen = Vec::new();
    let ready = wait_for(&sock, "READY=1", Duration::from_secs(5), &mut seen)?;
    ensure!(
        ready.contains("STATUS=forwarding 1 service(s) on ec, eb"),
        "READY without STATUS: {ready:?}"
    );
    // Ready means forwarding.
    let id = clients::tcp_identity(&topo.cli, topology::vip(), None, Duration::from_secs(3))?;
    ensure!(id.name == "blue", "{id:?}");
    wait_for(&sock, "WATCHDOG=1", Duration::from_secs(3), &mut seen)?;

    // SIGHUP reloads the (changed) file.
    let config = daemon.dir().join("splitter.toml");
    std::fs::write(
        &config,
        blue_green_config(Mode::Snat, Affinity::Flow, 0, 100),
    )?;
    let pid = daemon.pid() as i32;
    // SAFETY: plain kill(2) on the daemon's pid.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGHUP) } == 0,
        "kill -HUP failed"
    );
    wait_for(&sock, "RELOADING=1", Duration::from_secs(3), &mut seen)?;
    let after = wait_for(&sock, "READY=1", Duration::from_secs(3), &mut seen)?;
    ensure!(
        after.contains("STATUS=reloaded: changed service web"),
        "{after:?}"
    );
    let id = clients::tcp_identity(&topo.cli, topology::vip(), None, Duration::from_secs(3))?;
    ensure!(id.name == "green", "after reload to 0/100: {id:?}");

    let status = daemon.stop()?;
    ensure!(status.success(), "daemon exited with {status}");
    wait_for(&sock, "STOPPING=1", Duration::from_secs(3), &mut seen)?;
    Ok(())
}
