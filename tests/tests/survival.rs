//! A data plane that outlives its daemon, started as docs/operations.md
//! says for a daemon in a network namespace:
//!
//! - `ip netns exec EDGE splitter daemon` with the default pin_dir would
//!   pin into a bpffs private to the process (a fresh `/sys`), so a kill -9
//!   would take the program, the connection table and every established
//!   connection with it: the daemon refuses to start, says why and how to
//!   run it instead, and changes nothing;
//! - `nsenter --net=/run/netns/EDGE splitter daemon` (the network namespace
//!   only; the pins on the host's bpffs) survives a kill -9 and a restart
//!   under load with no failed request and no broken connection.
//!
//! Privileged, so `#[ignore]`d for a plain `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test survival -- --include-ignored --test-threads=1
//! ```
use std::{path::PathBuf, time::Duration};

use anyhow::{Result, ensure};
use splitter_tests::{
    clients::LongLivedConn,
    load::Load,
    netns::{self, run_prefix},
    servers::TcpIdentityServer,
    splitter::{Affinity, Daemon, Mode, blue_green_config, splitter_bin, with_pin_dir},
    topology::{self, Topology, TopologyOptions},
};

/// A pin directory on the host's bpffs, removed (with whatever is pinned
/// in it) on drop.
struct HostPins(PathBuf);

impl HostPins {
    fn new() -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/{}-survival",
            run_prefix()
        )))
    }
}

impl Drop for HostPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn private_pins_under_ip_netns_exec_are_refused_with_the_way_out() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("splitter.toml");
    std::fs::write(
        &config,
        blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let bin = splitter_bin()?;
    let mut cmd = topo.edge.command(&bin.to_string_lossy());
    cmd.arg("daemon")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"));
    let out = netns::output_with_timeout(&mut cmd, Duration::from_secs(20))?;
    ensure!(
        !out.status.success(),
        "the daemon started with private pins: {}",
        out.stderr
    );
    for want in [
        "refusing to start",
        "private to this process",
        "nsenter --net=/run/netns/NAME",
        "--ephemeral-pins",
    ] {
        ensure!(
            out.stderr.contains(want),
            "{want:?} missing from: {}",
            out.stderr
        );
    }
    // Nothing was attached: the edge's interfaces carry no XDP program.
    let links = topo.edge.ip(&["link", "show"])?;
    ensure!(
        !links.contains("xdp"),
        "an XDP program was attached: {links}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_daemon_started_with_nsenter_survives_kill_9_under_load() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let pins = HostPins::new();
    let _blue = TcpIdentityServer::start(&topo.back, topo.backend(0)?, "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, topo.backend(1)?, "green")?;
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 50, 50),
        &pins.0,
    );
    let mut daemon = Daemon::start_nsenter(&topo.edge, &config, &[])?;
    let st = daemon.status_json()?;
    ensure!(
        st["dataplane"]["ephemeral_pins"].is_null(),
        "nsenter's pins are the host's: {st}"
    );
    let long = LongLivedConn::start(&topo.cli, topology::vip(), Duration::from_secs(3))?;
    let load = Load::start(&topo.cli, topology::vip(), 2)?;
    std::thread::sleep(Duration::from_millis(500));
    daemon.kill9_and_restart(&topo.edge)?;
    std::thread::sleep(Duration::from_millis(1500));
    let seen = load.stop();
    let report = long.stop();
    ensure!(
        seen.failures.is_empty(),
        "{} requests failed across the kill -9: {:?}",
        seen.failures.len(),
        &seen.failures[..seen.failures.len().min(3)]
    );
    ensure!(seen.ok() > 50, "too few requests to tell: {}", seen.ok());
    ensure!(
        report.failures.is_empty() && report.echoed > 20,
        "the long-lived connection broke: {report:?}"
    );
    let log = daemon.log();
    ensure!(
        log.contains("took over the pinned data plane"),
        "the restarted daemon did not take over the pins:\n{log}"
    );
    // The pins are on the host's bpffs, where the test can see them.
    ensure!(
        pins.0.join("CONNS").exists(),
        "no pinned connection table in {}",
        pins.0.display()
    );
    drop(daemon);
    Ok(())
}
