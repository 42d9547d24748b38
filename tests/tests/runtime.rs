//! Runtime changes through the CLI, as an operator makes them during a
//! deploy: backends added, drained, disabled and removed; versions and
//! services added and removed; all of it saved, so a restarted daemon
//! keeps it, unless the configuration file was edited since. Real daemon,
//! real XDP edge (native mode), real servers and connections; every test
//! checks that no namespace saw a corrupt checksum.
//!
//! ```text
//! cargo test -p splitter-tests --test runtime -- --include-ignored --test-threads=1
//! ```
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use splitter_tests::{
    clients::{self, LongLivedConn},
    servers::{HttpServer, TcpIdentityServer},
    splitter::{
        Affinity, BpfMount, Daemon, Mode, ServiceSpec, VersionSpec, blue_green_config, config_toml,
        status_backend, with_pin_dir,
    },
    topology::{self, BACKEND_PORT, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn be(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, last), BACKEND_PORT)
}

/// Waits (bounded) until the daemon counts `want` live flows on `addr`.
fn wait_live_flows(d: &Daemon, addr: SocketAddrV4, want: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let status = d.status_json()?;
        let got = status_backend(&status, "web", addr)?["live_flows"]
            .as_u64()
            .context("no live_flows")?;
        if got == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{addr} has {got} live flows, expected {want}: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Runs the CLI, which must fail with exit `code` and say `want` on stderr.
fn refused(d: &Daemon, args: &[&str], code: i32, want: &str) -> Result<()> {
    let o = d.cli(args)?;
    ensure!(
        o.status.code() == Some(code) && o.stderr.contains(want),
        "`splitter {}`: expected exit {code} with {want:?}, got {} stdout {:?} stderr {:?}",
        args.join(" "),
        o.status,
        o.stdout,
        o.stderr
    );
    Ok(())
}

/// The running config as the API returns it (to check nothing changed).
fn running_config(d: &Daemon) -> Result<Value> {
    let s = d.status_json()?;
    // Counters move with traffic; the shape (names, weights, states) must not.
    let shape: Vec<Value> = s["services"]
        .as_array()
        .context("no services")?
        .iter()
        .map(|svc| {
            serde_json::json!({
                "name": svc["name"],
                "vip": svc["vip"],
                "versions": svc["versions"].as_array().map(|vs| vs.iter().map(|v| serde_json::json!({
                    "name": v["name"],
                    "weight": v["weight"],
                    "backends": v["backends"].as_array().map(|bs| bs.iter().map(|b| serde_json::json!({
                        "address": b["address"], "weight": b["weight"], "state": b["state"],
                    })).collect::<Vec<_>>()),
                })).collect::<Vec<_>>()),
            })
        })
        .collect();
    Ok(Value::Array(shape))
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn rolling_add_drain_and_remove_a_backend_without_dropping_a_connection() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 3,
        ..Default::default()
    })?;
    let blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let blue2 = TcpIdentityServer::start(&topo.back, be(4), "blue2")?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;

    // Three long-lived connections, all on blue (its only backend).
    let conns = (0..3)
        .map(|_| LongLivedConn::start(&topo.cli, topology::vip(), TIMEOUT))
        .collect::<Result<Vec<_>>>()?;
    for c in &conns {
        ensure!(c.identity().name == "blue", "went to {:?}", c.identity());
        c.wait_echoes(3, Duration::from_secs(5))?;
    }
    wait_live_flows(&d, be(2), 3)?;

    // Add a second blue backend: new flows spread over both.
    let out = d.cli_ok(&["backend", "add", "web", "blue", &be(4).to_string()])?;
    ensure!(out.contains("10.0.2.4:8080"), "add printed: {out}");
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 300, &[], TIMEOUT)?;
    ensure!(r.errors == 0, "failures: {:?}", r.error_samples);
    ensure!(
        r.count("blue") > 90 && r.count("blue2") > 90,
        "300 connections over two blue backends: {:?}",
        r.per_name
    );
    // Short connections end; only the three long-lived ones stay live.
    wait_live_flows(&d, be(2), 3)?;

    // Drain the first: no new flows; its established ones go on.
    let out = d.cli_ok(&[
        "backend",
        "set",
        "web",
        &be(2).to_string(),
        "--state",
        "drain",
    ])?;
    ensure!(out.contains("drain"), "set printed: {out}");
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 200, &[], TIMEOUT)?;
    ensure!(r.errors == 0, "failures: {:?}", r.error_samples);
    ensure!(
        r.count("blue2") == 200,
        "a drained backend got new flows: {:?}",
        r.per_name
    );
    for c in &conns {
        let before = c.report().echoed;
        c.wait_echoes(before + 3, Duration::from_secs(5))?;
    }

    // Removing it now would cut three connections: refused, nothing changes.
    let before = running_config(&d)?;
    refused(
        &d,
        &["backend", "remove", "web", &be(2).to_string()],
        1,
        "3 established flow(s)",
    )?;
    ensure!(
        running_config(&d)? == before,
        "a refused remove changed the config"
    );
    // Waiting for the drain times out while they live, and says so.
    let b2 = be(2).to_string();
    let drain_wait = |secs: &'static str| {
        [
            "backend", "set", "web", &b2, "--state", "drain", "--wait", secs,
        ]
    };
    refused(
        &d,
        &drain_wait("1"),
        1,
        "still has 3 live flow(s) after 1 s",
    )?;

    // The connections finish; then the removal goes through.
    for c in conns {
        let report = c.stop();
        ensure!(
            report.failures.is_empty(),
            "a long-lived connection broke while draining: {:?}",
            report.failures
        );
    }
    let o = d.cli(&drain_wait("10"))?;
    ensure!(
        o.status.success() && o.stderr.contains("drained: no live flows"),
        "drain --wait: {} {:?}",
        o.status,
        o.stderr
    );
    wait_live_flows(&d, be(2), 0)?;
    d.cli_ok(&["backend", "remove", "web", &b2])?;
    let status = d.status_json()?;
    ensure!(
        status_backend(&status, "web", be(2)).is_err(),
        "removed backend still listed: {status}"
    );
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 100, &[], TIMEOUT)?;
    ensure!(r.errors == 0 && r.count("blue2") == 100, "{r:?}");
    ensure!(blue.accepted() >= 4, "blue accepted {}", blue.accepted());
    drop(blue2);
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_disabled_backend_gets_no_packets_and_guards_refuse_bad_changes() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let _blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let conn = LongLivedConn::start(&topo.cli, topology::vip(), TIMEOUT)?;
    ensure!(conn.identity().name == "blue", "{:?}", conn.identity());
    conn.wait_echoes(3, Duration::from_secs(5))?;

    // Guards, each refused with nothing changed.
    let before = running_config(&d)?;
    let b2 = be(2).to_string();
    refused(
        &d,
        &["backend", "set", "web", &b2, "--state", "disabled"],
        1,
        "no active backend",
    )?;
    refused(&d, &["backend", "remove", "web", &b2], 1, "drain it first")?;
    refused(
        &d,
        &["version", "remove", "web", "blue"],
        1,
        "still has weight 100",
    )?;
    refused(
        &d,
        &["backend", "set", "web", "10.0.2.99:8080", "--weight", "2"],
        1,
        "has no backend 10.0.2.99:8080",
    )?;
    refused(
        &d,
        &["backend", "add", "web", "purple", "10.0.2.9:8080"],
        1,
        "has no version \"purple\"",
    )?;
    refused(
        &d,
        &["backend", "add", "web", "green", &b2],
        1,
        "already a backend",
    )?;
    refused(
        &d,
        &["backend", "set", "web", &b2, "--weight", "0"],
        1,
        "out of range 1..=1000",
    )?;
    refused(
        &d,
        &["backend", "set", "web", &b2, "--state", "sleeping"],
        2,
        "invalid value",
    )?;
    refused(
        &d,
        &["backend", "set", "web", "10.0.2.x:80", "--weight", "2"],
        2,
        "invalid",
    )?;
    refused(&d, &["backend", "set", "web", &b2], 2, "nothing to change")?;
    refused(
        &d,
        &[
            "service",
            "add",
            "web",
            "--vip",
            "10.0.0.20:80",
            "--version",
            "a",
            "--backend",
            "10.0.2.9:80",
        ],
        1,
        "already exists",
    )?;
    refused(&d, &["service", "remove", "we b"], 2, "names hold only")?;
    refused(
        &d,
        &["service", "remove", "nope"],
        1,
        "no service named \"nope\"",
    )?;
    ensure!(
        running_config(&d)? == before,
        "a refused change changed the config"
    );

    // Move new flows to green, then disable blue: its established flow's
    // client packets are dropped and counted.
    d.weights_set("web", &[("blue", 0), ("green", 100)])?;
    d.cli_ok(&["backend", "set", "web", &b2, "--state", "disabled"])?;
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 50, &[], TIMEOUT)?;
    ensure!(r.errors == 0 && r.count("green") == 50, "{r:?}");
    // The connection's echoes since the switch went to the disabled backend.
    let report = conn.stop();
    let status = d.status_json()?;
    let dropped = status["counters"]["drop_backend_disabled"]
        .as_u64()
        .context("no drop_backend_disabled counter")?;
    ensure!(
        dropped > 0,
        "drop_backend_disabled stayed 0: {report:?} {status}"
    );
    ensure!(
        status["services"][0]["drops"]["backend_disabled"] == dropped,
        "the service's own drop count differs from the global one: {status}"
    );
    ensure!(
        status_backend(&status, "web", be(2))?["state"] == "disabled",
        "{status}"
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn services_and_versions_added_at_runtime_survive_a_restart() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 4,
        ..Default::default()
    })?;
    let _blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let _canary = TcpIdentityServer::start(&topo.back, be(4), "canary")?;
    let _api = TcpIdentityServer::start(&topo.back, be(5), "api")?;
    let api_vip = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 11), 80);
    let bpffs = BpfMount::new()?;
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
        &bpffs.pin_dir(),
    );
    let mut d = Daemon::start(&topo.edge, &config)?;

    d.cli_ok(&[
        "service",
        "add",
        "api",
        "--vip",
        &api_vip.to_string(),
        "--version",
        "v1",
        "--backend",
        &be(5).to_string(),
    ])?;
    d.cli_ok(&[
        "version",
        "add",
        "web",
        "canary",
        "--backend",
        &be(4).to_string(),
    ])?;
    d.weights_set("web", &[("blue", 0), ("green", 0), ("canary", 100)])?;
    let check = |what: &str| -> Result<()> {
        let r = clients::tcp_identity_many(&topo.cli, api_vip, 40, &[], TIMEOUT)?;
        ensure!(r.errors == 0 && r.count("api") == 40, "{what}: api: {r:?}");
        let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 40, &[], TIMEOUT)?;
        ensure!(
            r.errors == 0 && r.count("canary") == 40,
            "{what}: web: {r:?}"
        );
        Ok(())
    };
    check("after the changes")?;
    let shape = running_config(&d)?;

    // kill -9 and start again with the same file: everything is back.
    d.kill9_and_restart(&topo.edge)?;
    ensure!(
        running_config(&d)? == shape,
        "runtime changes lost across a restart: {} vs {shape}",
        running_config(&d)?
    );
    check("after kill -9 and restart")?;

    // `service show` and removal of the runtime service.
    let out = d.cli_ok(&["service", "show", "api", "--output", "json"])?;
    let api: Value = serde_json::from_str(&out)?;
    ensure!(api["vip"] == api_vip.to_string(), "{api}");
    d.cli_ok(&["service", "remove", "api"])?;
    refused(&d, &["service", "show", "api"], 1, "no service named")?;

    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 40, &[], TIMEOUT)?;
    ensure!(r.errors == 0, "{r:?}");
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn an_edited_file_wins_over_saved_runtime_changes() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let _blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let bpffs = BpfMount::new()?;
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
        &bpffs.pin_dir(),
    );
    let mut d = Daemon::start(&topo.edge, &config)?;
    d.weights_set("web", &[("blue", 0), ("green", 100)])?;
    std::fs::write(
        d.dir().join("splitter.toml"),
        config
            .replace("weight = 100", "weight = 60")
            .replace("weight = 0", "weight = 40"),
    )?;
    d.kill9_and_restart(&topo.edge)?;
    let status = d.status_json()?;
    let weights: Vec<u64> = status["services"][0]["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .filter_map(|v| v["weight"].as_u64())
        .collect();
    ensure!(weights == [60, 40], "the edited file did not win: {status}");
    ensure!(
        d.log()
            .contains("configuration file changed since the state was saved"),
        "no warning in the log:\n{}",
        d.log()
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn the_api_socket_can_be_opened_to_a_group() -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let topo = Topology::new(TopologyOptions::default())?;
    let config = blue_green_config(Mode::Snat, Affinity::Flow, 100, 0);
    let d = Daemon::start(&topo.edge, &config)?;
    let m = std::fs::metadata(d.socket())?;
    ensure!(
        m.permissions().mode() & 0o777 == 0o600,
        "default mode {:o}",
        m.mode()
    );
    drop(d);

    // A group every Debian system has.
    let d = Daemon::start_with_args(&topo.edge, &config, &["--socket-group", "adm"])?;
    let m = std::fs::metadata(d.socket())?;
    let adm = std::fs::read_to_string("/etc/group")?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&"adm")).then(|| f.get(2).and_then(|g| g.parse::<u32>().ok()))?
        })
        .context("no adm group")?;
    ensure!(
        m.permissions().mode() & 0o777 == 0o660 && m.gid() == adm,
        "mode {:o} gid {}",
        m.mode(),
        m.gid()
    );
    drop(d);

    // An unknown group refuses the start with a clear message.
    match Daemon::start_with_args(&topo.edge, &config, &["--socket-group", "no-such-group-x"]) {
        Ok(_) => bail!("a daemon started with an unknown socket group"),
        Err(e) => ensure!(
            format!("{e:#}").contains("no such group"),
            "unclear error: {e:#}"
        ),
    }
    Ok(())
}

/// Service `web` with `blue` (weight 100) on 10.0.2.2 and 10.0.2.4 and
/// `green` (weight 0) on 10.0.2.3, port 8080, SNAT.
fn two_blue_backends_config() -> String {
    config_toml(
        Mode::Snat,
        &[ServiceSpec {
            name: "web".into(),
            vip: topology::vip(),
            protocol: "tcp",
            affinity: Affinity::Flow,
            versions: vec![
                VersionSpec {
                    name: "blue".into(),
                    weight: 100,
                    backends: vec![be(2), be(4)],
                },
                VersionSpec {
                    name: "green".into(),
                    weight: 0,
                    backends: vec![be(3)],
                },
            ],
        }],
    )
}

/// Longest a backend may take to be reported up or down in these tests.
const HEALTH_WAIT: Duration = Duration::from_secs(8);

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn health_checks_take_a_dead_backend_out_and_bring_it_back() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 3,
        ..Default::default()
    })?;
    let _blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let blue2 = TcpIdentityServer::start(&topo.back, be(4), "blue2")?;
    let mut config = two_blue_backends_config();

    config
        .push_str("\n[service.health]\ninterval_ms = 200\ntimeout_ms = 200\nfall = 2\nrise = 2\n");
    let d = Daemon::start(&topo.edge, &config)?;
    d.wait_health("web", be(4), "up", HEALTH_WAIT)?;
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 200, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.count("blue") > 0 && r.count("blue2") > 0,
        "{r:?}"
    );

    // blue2 dies: after two failed checks it gets no new flows.
    blue2.stop();
    let took = d.wait_health("web", be(4), "down", HEALTH_WAIT)?;
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 200, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.count("blue") == 200,
        "with blue2 down: {r:?}"
    );
    let out = d.cli_ok(&["status"])?;
    ensure!(
        out.contains("10.0.2.4:8080 w=1 active down"),
        "status table:\n{out}"
    );

    // It comes back: after two passed checks it takes new flows again.
    let _blue2 = TcpIdentityServer::start(&topo.back, be(4), "blue2")?;
    d.wait_health("web", be(4), "up", HEALTH_WAIT)?;
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 200, &[], TIMEOUT)?;
    ensure!(r.errors == 0 && r.count("blue2") > 0, "blue2 back: {r:?}");
    eprintln!("blue2 was marked down {took:?} after it stopped");
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn http_health_checks_go_by_the_status_code() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 3,
        ..Default::default()
    })?;
    let ok = HttpServer::start(&topo.back, be(2), "ok")?;
    let _green = HttpServer::start(&topo.back, be(3), "green")?;
    let failing = HttpServer::start(&topo.back, be(4), "failing")?;
    let base = two_blue_backends_config();

    // Every backend answers the TCP connect; the path decides. A path that
    // answers 503 takes both blue backends down (and fails open); 200 keeps
    // them up.
    let health = |path: &str| {
        format!(
            "{base}\n[service.health]\ncheck = \"http\"\npath = \"{path}\"\ninterval_ms = 200\ntimeout_ms = 500\nfall = 2\nrise = 2\n"
        )
    };
    let d = Daemon::start(&topo.edge, &health("/status/503"))?;
    d.wait_health("web", be(2), "down", HEALTH_WAIT)?;
    d.wait_health("web", be(4), "down", HEALTH_WAIT)?;
    // Both of blue's backends are down: blue fails open and still serves.
    let r = clients::http_get_many(&topo.cli, topology::vip(), "/", 40, TIMEOUT)?;
    ensure!(r.errors == 0 && r.ok() == 40, "fail open: {r:?}");
    ensure!(
        ok.requests() > 0 && failing.requests() > 0,
        "checks did not reach the servers"
    );

    std::fs::write(d.dir().join("splitter.toml"), health("/status/204"))?;
    d.cli_ok(&["reload"])?;
    d.wait_health("web", be(2), "up", HEALTH_WAIT)?;
    d.wait_health("web", be(4), "up", HEALTH_WAIT)?;
    topo.no_csum_errors()
}
