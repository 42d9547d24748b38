//! End-to-end tests of the real `splitter daemon` on a real XDP edge: client,
//! edge and backend namespaces joined by veth pairs, the program attached in
//! native mode, real servers and clients over real sockets.
//!
//! Each test asserts what a user would check: where connections land, that
//! nothing failed or was reset, what address the backends saw, and that no
//! namespace saw a corrupt checksum (`InCsumErrors`). Privileged, so
//! `#[ignore]`d for a plain `cargo test`; `cargo xtask test` runs them one at
//! a time:
//!
//! ```text
//! cargo test -p splitter-tests --test e2e -- --include-ignored --test-threads=1
//! ```
use std::{collections::BTreeSet, net::SocketAddrV4, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use splitter_tests::{
    clients::{self, LongLivedConn},
    servers::{TcpIdentityServer, UdpIdentityServer},
    splitter::{
        Affinity, BpfMount, Daemon, Mode, ServiceSpec, VersionSpec, blue_green_config, config_toml,
        pin_foreign_map, with_pin_dir,
    },
    topology::{self, CLIENT_ADDR, EDGE_BACKEND_ADDR, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// The program runs in native (driver) mode on both edge interfaces.
fn attached_native(status: &Value) -> Result<()> {
    let att = status["dataplane"]["attachments"]
        .as_array()
        .context("no attachments in status")?;
    ensure!(att.len() == 2, "expected two attachments: {status}");
    for a in att {
        ensure!(a["mode"] == "native", "not native: {a}");
    }
    Ok(())
}

/// Weights of the versions of service `web`, in order.
fn weights(status: &Value) -> Result<Vec<u64>> {
    Ok(status["services"][0]["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .filter_map(|v| v["weight"].as_u64())
        .collect())
}

/// New flows the daemon counted for `version` of service `web`.
fn new_flows(status: &Value, version: &str) -> Result<u64> {
    status["services"][0]["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .find(|v| v["name"] == version)
        .and_then(|v| v["new_flows"].as_u64())
        .with_context(|| format!("no version {version} in {status}"))
}

struct BlueGreen {
    topo: Topology,
    blue: TcpIdentityServer,
    green: TcpIdentityServer,
}

fn blue_green(extra_client_addrs: usize) -> Result<BlueGreen> {
    let topo = Topology::new(TopologyOptions {
        extra_client_addrs,
        ..Default::default()
    })?;
    let blue = TcpIdentityServer::start(&topo.back, topo.backend(0)?, "blue")?;
    let green = TcpIdentityServer::start(&topo.back, topo.backend(1)?, "green")?;
    Ok(BlueGreen { topo, blue, green })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn weights_90_10_split_ten_thousand_connections() -> Result<()> {
    let bg = blue_green(0)?;
    let daemon = Daemon::start(
        &bg.topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 90, 10),
    )?;
    attached_native(&daemon.status_json()?)?;
    let n = 10_000;
    let r = clients::tcp_identity_many(&bg.topo.cli, topology::vip(), n, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0,
        "{} of {n} connections failed: {:?}",
        r.errors,
        r.error_samples
    );
    let green_share = 100.0 * r.count("green") as f64 / n as f64;
    ensure!(
        (green_share - 10.0).abs() <= 1.5,
        "green got {green_share:.2}% of new connections, want 10 ± 1.5 ({:?})",
        r.per_name
    );
    ensure!(
        bg.blue.accepted() + bg.green.accepted() == n as u64,
        "servers accepted a different number"
    );
    let status = daemon.status_json()?;
    ensure!(
        new_flows(&status, "green")? == r.count("green")
            && new_flows(&status, "blue")? == r.count("blue"),
        "daemon's new-flow counters disagree with what the servers saw: {status}"
    );
    bg.topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn established_connection_keeps_its_backend_through_a_switch() -> Result<()> {
    let bg = blue_green(0)?;
    let daemon = Daemon::start(
        &bg.topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let conn = LongLivedConn::start(&bg.topo.cli, topology::vip(), TIMEOUT)?;
    ensure!(
        conn.identity().name == "blue",
        "100/0 sent the connection to {:?}",
        conn.identity()
    );
    conn.wait_echoes(10, Duration::from_secs(5))?;

    daemon.weights_set("web", &[("blue", 0), ("green", 100)])?;
    let r = clients::tcp_identity_many(&bg.topo.cli, topology::vip(), 300, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0,
        "new connections failed after the switch: {:?}",
        r.error_samples
    );
    ensure!(
        r.count("green") == 300,
        "after 0/100, new connections went to {:?}",
        r.per_name
    );

    // Keep talking for a while on the old connection: every echo must come
    // back from blue, with no reset.
    let before = conn.report().echoed;
    conn.wait_echoes(before + 20, Duration::from_secs(5))?;
    let report = conn.stop();
    ensure!(
        report.failures.is_empty(),
        "long-lived connection broke: {:?}",
        report.failures
    );
    ensure!(report.echoed >= before + 20, "too few echoes: {report:?}");
    ensure!(
        bg.blue.accepted() == 1,
        "blue accepted {} connections",
        bg.blue.accepted()
    );
    bg.topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn client_ip_affinity_keeps_each_client_on_one_version() -> Result<()> {
    let bg = blue_green(20)?;
    let _daemon = Daemon::start(
        &bg.topo.edge,
        &blue_green_config(Mode::Snat, Affinity::ClientIp, 50, 50),
    )?;
    let clients_addrs = bg.topo.extra_client_addrs().to_vec();
    ensure!(
        clients_addrs.len() == 20,
        "topology gave {} client addresses",
        clients_addrs.len()
    );
    let r = clients::tcp_identity_many(
        &bg.topo.cli,
        topology::vip(),
        20 * 50,
        &clients_addrs,
        TIMEOUT,
    )?;
    ensure!(r.errors == 0, "connections failed: {:?}", r.error_samples);
    let mut versions_used = BTreeSet::new();
    for addr in &clients_addrs {
        let seen = r
            .per_source
            .get(&Some(*addr))
            .with_context(|| format!("no answers for {addr}"))?;
        ensure!(
            seen.len() == 1,
            "client {addr} saw several versions: {seen:?}"
        );
        ensure!(seen.values().sum::<u64>() == 50, "client {addr}: {seen:?}");
        versions_used.extend(seen.keys().cloned());
    }
    // 20 clients at 50/50: all on one version would be a 1 in 500 000 event.
    ensure!(
        versions_used.len() == 2,
        "all clients landed on {versions_used:?}"
    );
    bg.topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn udp_request_response_through_the_vip() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        extra_client_addrs: 1,
        ..Default::default()
    })?;
    let vip = SocketAddrV4::new(topology::VIP, 53);
    let stable = SocketAddrV4::new(*topo.backend(0)?.ip(), 5353);
    let canary = SocketAddrV4::new(*topo.backend(1)?.ip(), 5353);
    let _s = UdpIdentityServer::start(&topo.back, stable, "stable")?;
    let _c = UdpIdentityServer::start(&topo.back, canary, "canary")?;
    let config = config_toml(
        Mode::Snat,
        &[ServiceSpec {
            name: "dns".into(),
            vip,
            protocol: "udp",
            affinity: Affinity::Flow,
            versions: vec![
                VersionSpec {
                    name: "stable".into(),
                    weight: 100,
                    backends: vec![stable],
                },
                VersionSpec {
                    name: "canary".into(),
                    weight: 0,
                    backends: vec![canary],
                },
            ],
        }],
    );
    let daemon = Daemon::start(&topo.edge, &config)?;
    for i in 0..20 {
        let payload = format!("query-{i}");
        let reply = clients::udp_request(&topo.cli, vip, &payload, TIMEOUT)?;
        ensure!(
            reply.name == "stable" && reply.payload == payload,
            "wrong answer {reply:?}"
        );
        ensure!(
            *reply.peer.ip() == EDGE_BACKEND_ADDR,
            "SNAT source not applied: {reply:?}"
        );
    }
    daemon.weights_set("dns", &[("stable", 0), ("canary", 1)])?;
    // From an address no earlier query used: certainly a new flow (a reused
    // ephemeral port would, rightly, still be the old flow for 60 s).
    let fresh = topo.extra_client_addrs()[0];
    let reply = topo.cli.enter(|| -> Result<(String, String)> {
        let s = std::net::UdpSocket::bind((fresh, 0))?;
        s.connect(vip)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.send(b"after-switch")?;
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).context("no UDP answer after the switch")?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let name = text.split(' ').next().unwrap_or_default().to_string();
        Ok((name, text))
    })??;
    ensure!(
        reply.0 == "canary",
        "new UDP flow after the switch went to {:?}",
        reply.1
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn backends_see_the_edge_in_snat_and_the_client_in_dnat() -> Result<()> {
    for (mode, want) in [(Mode::Snat, EDGE_BACKEND_ADDR), (Mode::Dnat, CLIENT_ADDR)] {
        let bg = blue_green(0)?;
        let daemon = Daemon::start(
            &bg.topo.edge,
            &blue_green_config(mode, Affinity::Flow, 1, 1),
        )?;
        let r = clients::tcp_identity_many(&bg.topo.cli, topology::vip(), 50, &[], TIMEOUT)?;
        ensure!(
            r.errors == 0,
            "{mode:?}: connections failed: {:?}",
            r.error_samples
        );
        let peers: BTreeSet<_> = bg
            .blue
            .stats()
            .peer_ips()
            .union(&bg.green.stats().peer_ips())
            .copied()
            .collect();
        ensure!(
            peers == BTreeSet::from([want]),
            "{mode:?}: backends saw {peers:?}, want only {want}"
        );
        let id = clients::tcp_identity(&bg.topo.cli, topology::vip(), None, TIMEOUT)?;
        ensure!(*id.peer.ip() == want, "{mode:?}: identity says {id:?}");
        bg.topo.no_csum_errors()?;
        drop(daemon);
    }
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn bad_cli_input_is_refused_and_changes_nothing() -> Result<()> {
    let bg = blue_green(0)?;
    let daemon = Daemon::start(
        &bg.topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 90, 10),
    )?;
    let before = daemon.status_json()?["services"].clone();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["weights", "set", "nope", "blue=1", "green=1"],
            1,
            "no service named",
        ),
        (
            &["weights", "set", "web", "blue=1", "red=1"],
            1,
            "no version \"red\"",
        ),
        (&["weights", "set", "web", "blue=1"], 1, "missing: green"),
        (
            &["weights", "set", "web", "blue=0", "green=0"],
            1,
            "all version weights are 0",
        ),
        (
            &["weights", "set", "web", "blue=x", "green=1"],
            2,
            "whole number",
        ),
        (&["weights", "set", "web", "blue"], 2, "VERSION=WEIGHT"),
        (
            &["weights", "set", "web", "blue=2000000", "green=1"],
            1,
            "weight",
        ),
        (&["status", "--output", "yaml"], 2, "invalid value"),
    ];
    for (args, code, want) in cases {
        let out = daemon.cli(args)?;
        ensure!(
            out.status.code() == Some(*code) && out.stderr.contains(want),
            "splitter {args:?}: exit {:?}, stderr {:?}; want exit {code} and {want:?}",
            out.status.code(),
            out.stderr
        );
        ensure!(
            !out.stderr.contains("panicked"),
            "panic on {args:?}: {}",
            out.stderr
        );
    }
    let after = daemon.status_json()?["services"].clone();
    ensure!(
        before == after,
        "a refused request changed the services:\n{before}\n{after}"
    );

    // Not reachable: exit code 3.
    let out = std::process::Command::new(daemon.bin())
        .args(["--socket", "/nonexistent/splitter.sock", "status"])
        .output()?;
    ensure!(
        out.status.code() == Some(3),
        "unreachable daemon gave {:?}",
        out.status.code()
    );

    // Traffic still follows 90/10 after all that.
    let r = clients::tcp_identity_many(&bg.topo.cli, topology::vip(), 200, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.count("blue") > r.count("green"),
        "{:?}",
        r.per_name
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn kill_9_and_restart_under_load_loses_nothing() -> Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let bg = blue_green(0)?;
    let bpffs = BpfMount::new()?;
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 90, 10),
        &bpffs.pin_dir(),
    );
    let mut daemon = Daemon::start(&bg.topo.edge, &config)?;
    daemon.weights_set("web", &[("blue", 30), ("green", 70)])?;
    let conn = LongLivedConn::start(&bg.topo.cli, topology::vip(), TIMEOUT)?;
    conn.wait_echoes(5, Duration::from_secs(5))?;

    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let samples = std::sync::Mutex::new(Vec::new());
    let restarted = std::thread::scope(|s| {
        s.spawn(|| {
            // Bounded: at most 200 rounds of 10 connections.
            for _ in 0..200 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match clients::tcp_identity_many(&bg.topo.cli, topology::vip(), 10, &[], TIMEOUT) {
                    Ok(r) => {
                        ok.fetch_add(r.ok(), Ordering::Relaxed);
                        failed.fetch_add(r.errors, Ordering::Relaxed);
                        if let Ok(mut v) = samples.lock() {
                            v.extend(r.error_samples);
                        }
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut v) = samples.lock() {
                            v.push(format!("{e:#}"));
                        }
                    }
                }
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let before = ok.load(Ordering::Relaxed);
        let r = daemon.kill9_and_restart(&bg.topo.edge);
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        r.map(|()| before)
    });
    let before = restarted?;
    let (ok, failed) = (ok.into_inner(), failed.into_inner());
    ensure!(
        failed == 0,
        "{failed} connections failed across kill -9 and restart: {:?}",
        samples.lock().map(|v| v.clone()).unwrap_or_default()
    );
    ensure!(
        before > 0 && ok > before,
        "load did not run across the restart: {before} then {ok}"
    );
    let report = conn.stop();
    ensure!(
        report.failures.is_empty(),
        "long-lived connection broke: {:?}",
        report.failures
    );
    let status = daemon.status_json()?;
    let weights = weights(&status)?;
    ensure!(
        weights == vec![30, 70],
        "weights after restart: {weights:?}"
    );
    ensure!(
        new_flows(&status, "blue")? + new_flows(&status, "green")? >= ok,
        "counters were lost across the restart: {status}"
    );
    bg.topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn sigterm_detaches_by_default_and_keeps_forwarding_with_on_stop_keep() -> Result<()> {
    let bg = blue_green(0)?;
    let bpffs = BpfMount::new()?;
    let pin_dir = bpffs.pin_dir();
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 1, 1),
        &pin_dir,
    );
    let xdp_on_edge = || -> Result<bool> {
        Ok(bg
            .topo
            .edge
            .ip(&["-o", "link", "show", "ec"])?
            .contains("xdp"))
    };

    // Default: a clean stop removes everything.
    let mut daemon = Daemon::start(&bg.topo.edge, &config)?;
    ensure!(
        xdp_on_edge()? && pin_dir.join("CONNS").exists(),
        "not attached and pinned"
    );
    let status = daemon.stop()?;
    ensure!(status.success(), "daemon exited with {status}");
    ensure!(!xdp_on_edge()?, "XDP still attached after SIGTERM");
    ensure!(!pin_dir.join("CONNS").exists(), "pins left after SIGTERM");
    ensure!(
        !daemon.dir().join("state/state.json").exists(),
        "saved state left after a detaching stop"
    );
    drop(daemon);

    // --on-stop keep: the data plane outlives the daemon, connections too.
    let mut daemon = Daemon::start_with_args(&bg.topo.edge, &config, &["--on-stop", "keep"])?;
    let conn = LongLivedConn::start(&bg.topo.cli, topology::vip(), TIMEOUT)?;
    conn.wait_echoes(5, Duration::from_secs(5))?;
    let status = daemon.stop()?;
    ensure!(status.success(), "daemon exited with {status}");
    ensure!(xdp_on_edge()?, "XDP detached although --on-stop keep");
    ensure!(
        daemon.dir().join("state/state.json").exists(),
        "state file gone although --on-stop keep"
    );
    let r = clients::tcp_identity_many(&bg.topo.cli, topology::vip(), 50, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0,
        "no daemon, pinned data plane: {:?}",
        r.error_samples
    );
    let echoed = conn.report().echoed;
    conn.wait_echoes(echoed + 10, Duration::from_secs(5))?;
    daemon.restart(&bg.topo.edge)?;
    let report = conn.stop();
    ensure!(
        report.failures.is_empty(),
        "long-lived connection broke: {:?}",
        report.failures
    );

    // `splitter detach` through the running daemon removes it all.
    let out = daemon.cli(&["detach"])?;
    ensure!(out.status.success(), "detach failed: {}", out.stderr);
    let _ = daemon.stop();
    ensure!(!xdp_on_edge()?, "XDP still attached after detach");
    ensure!(!pin_dir.join("CONNS").exists(), "pins left after detach");
    bg.topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn reload_applies_a_valid_file_and_refuses_an_invalid_one() -> Result<()> {
    let bg = blue_green(0)?;
    let daemon = Daemon::start(
        &bg.topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let conn = LongLivedConn::start(&bg.topo.cli, topology::vip(), TIMEOUT)?;
    let file = daemon.dir().join("splitter.toml");

    // Invalid: refused as a whole, nothing changes.
    let bad = blue_green_config(Mode::Snat, Affinity::Flow, 0, 100)
        .replace("10.0.2.3:8080", "10.0.2.x:8080");
    std::fs::write(&file, &bad)?;
    let out = daemon.cli(&["reload"])?;
    ensure!(
        out.status.code() == Some(1)
            && out.stderr.contains("reload refused")
            && out.stderr.contains("10.0.2.x"),
        "invalid reload: exit {:?}, {}",
        out.status.code(),
        out.stderr
    );
    ensure!(
        weights(&daemon.status_json()?)? == vec![100, 0],
        "an invalid reload changed the weights"
    );
    let r = clients::tcp_identity_many(&bg.topo.cli, topology::vip(), 50, &[], TIMEOUT)?;
    ensure!(r.errors == 0 && r.count("blue") == 50, "{:?}", r.per_name);

    // A [dataplane] change needs a restart: refused.
    std::fs::write(&file, blue_green_config(Mode::Dnat, Affinity::Flow, 0, 100))?;
    let out = daemon.cli(&["reload"])?;
    ensure!(
        out.status.code() == Some(1) && out.stderr.contains("[dataplane]"),
        "{}",
        out.stderr
    );

    // Valid: applied.
    std::fs::write(&file, blue_green_config(Mode::Snat, Affinity::Flow, 0, 100))?;
    let out = daemon.cli_ok(&["reload"])?;
    ensure!(out.contains("changed service web"), "{out}");
    ensure!(
        weights(&daemon.status_json()?)? == vec![0, 100],
        "valid reload not applied"
    );
    let r = clients::tcp_identity_many(&bg.topo.cli, topology::vip(), 50, &[], TIMEOUT)?;
    ensure!(r.errors == 0 && r.count("green") == 50, "{:?}", r.per_name);
    let report = conn.stop();
    ensure!(
        report.failures.is_empty(),
        "a reload broke an established connection: {:?}",
        report.failures
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn flow_shows_the_bound_backend_and_what_a_new_flow_would_get() -> Result<()> {
    let bg = blue_green(0)?;
    // DNAT: the backend sees the client's own address and port, which is
    // the flow's key at the edge.
    let daemon = Daemon::start(
        &bg.topo.edge,
        &blue_green_config(Mode::Dnat, Affinity::Flow, 100, 0),
    )?;
    let conn = LongLivedConn::start(&bg.topo.cli, topology::vip(), TIMEOUT)?;
    conn.wait_echoes(3, Duration::from_secs(5))?;
    let client = conn.identity().peer.to_string();
    daemon.weights_set("web", &[("blue", 0), ("green", 100)])?;
    let out = daemon.cli_ok(&["flow", &client, "--service", "web", "--output", "json"])?;
    let v: Value = serde_json::from_str(&out)?;
    ensure!(
        v["connection"]["backend"] == bg.blue.addr().to_string(),
        "{v}"
    );
    ensure!(
        v["connection"]["tcp_state"]
            .as_array()
            .is_some_and(|s| s.iter().any(|x| x == "established")),
        "{v}"
    );
    ensure!(
        v["new_flow_version"] == "green" && v["new_flow_backend"] == bg.green.addr().to_string(),
        "{v}"
    );
    let table = daemon.cli_ok(&["flow", &client, "--service", "web"])?;
    ensure!(
        table.contains("established: bound to 10.0.2.2:8080"),
        "{table}"
    );
    let unknown = daemon.cli_ok(&["flow", "10.0.1.2:1", "--service", "web", "--output", "json"])?;
    ensure!(
        serde_json::from_str::<Value>(&unknown)?["connection"].is_null(),
        "{unknown}"
    );
    let bad = daemon.cli(&["flow", "nonsense", "--service", "web"])?;
    ensure!(bad.status.code() == Some(2), "{}", bad.stderr);
    let report = conn.stop();
    ensure!(report.failures.is_empty(), "{:?}", report.failures);
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn malformed_api_requests_get_clear_errors() -> Result<()> {
    use std::io::{Read, Write};
    let bg = blue_green(0)?;
    let daemon = Daemon::start(
        &bg.topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 90, 10),
    )?;
    let before = daemon.status_json()?["services"].clone();
    let send = |req: &str| -> Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(daemon.socket())?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let put = |body: &str| {
        format!(
            "PUT /v1/services/web/weights HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let req = |method: &str, path: &str, body: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    for (req, want_status, want) in [
        (put("{not json"), "400", "body must be JSON"),
        (
            put(r#"{"weights": {"blue": -5, "green": 1}}"#),
            "400",
            "body must be JSON",
        ),
        (put(r#"{"weights": {"blue": 1}}"#), "400", "missing: green"),
        (
            put(r#"{"weights": {"blue": 0, "green": 0}}"#),
            "400",
            "all version weights are 0",
        ),
        (
            put(r#"{"weights": {"blue": 1, "green": 1}, "extra": 1}"#),
            "400",
            "unknown field",
        ),
        (
            "GET /v1/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
            "404",
            "no such API path",
        ),
        (
            "DELETE /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_string(),
            "400",
            "not allowed",
        ),
        (
            "GET /v1/flow?service=web&client=zzz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                .to_string(),
            "400",
            "not an IPv4",
        ),
        (
            req("POST", "/v1/services", "{\"name\": \"api\""),
            "400",
            "body must be JSON like",
        ),
        (
            req(
                "POST",
                "/v1/services",
                r#"{"name": "api", "vip": "10.0.0.300:80", "versions": []}"#,
            ),
            "400",
            "10.0.0.300:80\\\" is not an IPv4 address:port",
        ),
        (
            req(
                "POST",
                "/v1/services/web/versions",
                r#"{"name": "canary", "weight": 5}"#,
            ),
            "400",
            "has weight 5 but no backends",
        ),
        (
            req(
                "POST",
                "/v1/services/web/versions/blue/backends",
                r#"{"address": "10.0.2.9:80", "state": "asleep"}"#,
            ),
            "400",
            "is not one of active, drain, disabled",
        ),
        (
            req(
                "PATCH",
                "/v1/services/web/backends/10.0.2.2:8080",
                r#"{"weight": 5000}"#,
            ),
            "400",
            "out of range 1..=1000",
        ),
        (
            req(
                "PATCH",
                "/v1/services/web/backends/nope",
                r#"{"weight": 2}"#,
            ),
            "400",
            "not an IPv4 address:port",
        ),
        (
            req("DELETE", "/v1/services/web/backends/10.0.2.77:8080", ""),
            "404",
            "has no backend 10.0.2.77:8080",
        ),
        (
            req(
                "DELETE",
                "/v1/services/web/backends/10.0.2.2:8080?force=maybe",
                "",
            ),
            "400",
            "use force=true or force=false",
        ),
        (
            req("DELETE", "/v1/services/nope/versions/blue", ""),
            "404",
            "no service named",
        ),
    ] {
        let out = send(&req)?;
        let status_line = out.lines().next().unwrap_or_default();
        ensure!(
            status_line.contains(want_status) && out.contains(want) && out.contains("\"error\""),
            "request {req:?} got:\n{out}"
        );
    }
    ensure!(
        daemon.status_json()?["services"] == before,
        "a refused request changed something"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_pinned_map_of_another_layout_is_refused() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let bpffs = BpfMount::new()?;
    let pin_dir = bpffs.pin_dir();
    std::fs::create_dir_all(&pin_dir)?;
    // An LRU hash (type 9) named CONNS whose values are 48 bytes, not 64.
    pin_foreign_map(&pin_dir.join("CONNS"), 9, 40, 48, 1024)?;
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 1, 1),
        &pin_dir,
    );
    let err = match Daemon::start(&topo.edge, &config) {
        Ok(_) => anyhow::bail!("the daemon took over a CONNS map of another layout"),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        err.contains("CONNS") && err.contains("value size 48") && err.contains("layout changed"),
        "unclear refusal: {err}"
    );
    ensure!(
        !topo.edge.ip(&["-o", "link", "show", "ec"])?.contains("xdp"),
        "something was attached despite the refusal"
    );
    Ok(())
}
