//! systemd integration of the real daemon: the shipped unit passes
//! `systemd-analyze verify`, and a daemon started with a real
//! `NOTIFY_SOCKET` reports READY (only once it forwards), STATUS, WATCHDOG
//! pings, RELOADING/READY around a SIGHUP reload, and STOPPING; and the
//! unit's capability bounding set is enough for the daemon to forward and
//! for its TCP shadow tee to listen on port 80.
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
    splitter::{
        Affinity, Daemon, Mode, ServiceSpec, VersionSpec, blue_green_config, config_toml,
        splitter_bin,
    },
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

/// The capabilities of the shipped unit's `CapabilityBoundingSet=`, as
/// `setpriv --bounding-set` takes them (`-all,+bpf,+perfmon,...`).
fn unit_bounding_set() -> Result<String> {
    let unit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/splitter.service");
    let text = std::fs::read_to_string(&unit)?;
    let caps = text
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .context("the unit has no CapabilityBoundingSet=")?;
    let mut set = "-all".to_string();
    for c in caps.split_whitespace() {
        let name = c
            .strip_prefix("CAP_")
            .with_context(|| format!("not a capability: {c}"))?;
        set.push_str(&format!(",+{}", name.to_lowercase()));
    }
    Ok(set)
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn the_units_capabilities_let_the_daemon_forward_and_its_tee_listen_on_port_80() -> Result<()> {
    // The daemon runs with no capability outside the shipped unit's
    // bounding set (a wrapper execs it through `setpriv`), with a TCP
    // service on port 80 that mirrors every new flow through the tee.
    let set = unit_bounding_set()?;
    let dir = tempfile::tempdir()?;
    let wrapper = dir.path().join("splitter-unit-caps");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec setpriv --bounding-set {set} --inh-caps -all {} \"$@\"\n",
            splitter_bin()?.display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    let topo = Topology::new(TopologyOptions::default())?;
    let (stable, shadow) = (topo.backend(0)?, topo.backend(1)?);
    let _stable = TcpIdentityServer::start(&topo.back, stable, "stable")?;
    let shadow_server = TcpIdentityServer::start(&topo.back, shadow, "shadow")?;
    let version = |name: &str, weight, addr| VersionSpec {
        name: name.into(),
        weight,
        backends: vec![addr],
    };
    let config = config_toml(
        Mode::Snat,
        &[ServiceSpec {
            name: "web".into(),
            vip: topology::vip(),
            protocol: "tcp",
            affinity: Affinity::Flow,
            versions: vec![version("stable", 100, stable), version("shadow", 0, shadow)],
        }],
    )
    .replacen(
        "protocol = \"tcp\"\n",
        "protocol = \"tcp\"\nread_only = true\n",
        1,
    ) + "\n[service.shadow]\nversion = \"shadow\"\npercent = 100\n";
    let daemon = Daemon::start_with(&topo.edge, &config, &wrapper)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = daemon.status_json()?;
        let tee = &s["services"][0]["shadow"]["tee"];
        if tee["listening"] == true {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "under the unit's capabilities ({set}) the tee does not listen: {tee}\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let got =
        clients::tcp_identity_many(&topo.cli, topology::vip(), 20, &[], Duration::from_secs(2))?;
    ensure!(
        got.count("stable") == 20,
        "through the tee every client should reach stable: {got:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while shadow_server.accepted() < 20 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(
        shadow_server.accepted() == 20,
        "the shadow got {} of 20 mirrored connections",
        shadow_server.accepted()
    );
    Ok(())
}
