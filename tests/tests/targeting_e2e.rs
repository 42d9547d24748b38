//! Source-CIDR targeting end to end: a real daemon and XDP edge, real
//! identity servers and connections from many client addresses, rules from
//! the config file and from the CLI (`splitter target ...`).
//!
//! ```text
//! cargo test -p splitter-tests --test targeting_e2e -- --include-ignored --test-threads=1
//! ```
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use splitter_tests::{
    clients::{self, LongLivedConn},
    rollouts,
    servers::TcpIdentityServer,
    splitter::{Affinity, BpfMount, Daemon, Mode, blue_green_config, with_pin_dir},
    topology::{self, BACKEND_PORT, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn be(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, last), BACKEND_PORT)
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

/// The global counter `name` from `splitter status`.
fn counter(d: &Daemon, name: &str) -> Result<u64> {
    d.status_json()?["counters"][name]
        .as_u64()
        .with_context(|| format!("no counter {name}"))
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_pinned_network_sees_only_green_and_the_others_split_by_weight() -> Result<()> {
    // 20 client addresses: 10.0.1.100..=10.0.1.111 in 10.0.1.96/28 and
    // 10.0.1.112..=10.0.1.119 in 10.0.1.112/28.
    let topo = Topology::new(TopologyOptions {
        extra_client_addrs: 20,
        ..Default::default()
    })?;
    let _blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let config = format!(
        "{}\n[[service.target]]\ncidr = \"10.0.1.96/28\"\nversion = \"green\"\n",
        blue_green_config(Mode::Snat, Affinity::Flow, 50, 50)
    );
    let d = Daemon::start(&topo.edge, &config)?;
    let addrs = topo.extra_client_addrs().to_vec();
    ensure!(addrs.len() == 20);
    let net = |a: &Ipv4Addr| u32::from(*a) & !0xf;
    let pinned: Vec<Ipv4Addr> = addrs
        .iter()
        .copied()
        .filter(|a| net(a) == u32::from(Ipv4Addr::new(10, 0, 1, 96)))
        .collect();
    let others: Vec<Ipv4Addr> = addrs
        .iter()
        .copied()
        .filter(|a| net(a) == u32::from(Ipv4Addr::new(10, 0, 1, 112)))
        .collect();
    ensure!(
        pinned.len() == 12 && others.len() == 8,
        "addresses: {addrs:?}"
    );

    let before = counter(&d, "new_flow_targeted")?;
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 4 * 20, &addrs, TIMEOUT)?;
    ensure!(r.errors == 0, "failures: {:?}", r.error_samples);
    for a in &pinned {
        let seen = &r.per_source[&Some(*a)];
        ensure!(
            seen.keys().eq(["green"].iter()),
            "pinned client {a} saw {seen:?}"
        );
    }
    let mut split = std::collections::BTreeMap::new();
    for a in &others {
        for (name, n) in &r.per_source[&Some(*a)] {
            *split.entry(name.clone()).or_insert(0u64) += n;
        }
    }
    // 32 flows at 50/50: both versions, or the weights were ignored (the
    // chance of one version taking all 32 is 2^-31).
    ensure!(
        split.get("blue").copied().unwrap_or(0) > 0 && split.get("green").copied().unwrap_or(0) > 0,
        "the other /28 did not split by weight: {split:?}"
    );
    let targeted = counter(&d, "new_flow_targeted")? - before;
    ensure!(
        targeted == 4 * 12,
        "new_flow_targeted moved by {targeted}, expected {}",
        4 * 12
    );

    let list = d.cli_ok(&["target", "list", "web"])?;
    // What the docs show (visible with --nocapture).
    println!("$ splitter target list web\n{list}");
    ensure!(
        list.contains("10.0.1.96/28") && list.contains("green") && list.contains("active"),
        "target list: {list}"
    );
    let flow = d.cli_ok(&["flow", "10.0.1.100:40000", "--service", "web"])?;
    println!("$ splitter flow 10.0.1.100:40000 --service web\n{flow}");
    ensure!(
        flow.contains("a new flow now: version green")
            && flow.contains("target rule: 10.0.1.96/28 -> green"),
        "flow: {flow}"
    );
    let flow = d.cli_ok(&["flow", "10.0.1.112:40000", "--service", "web"])?;
    ensure!(!flow.contains("target rule"), "flow: {flow}");
    let status = d.cli_ok(&["status"])?;
    println!("$ splitter status\n{status}");
    ensure!(
        status.contains("web: 1 target rule(s): 10.0.1.96/28 -> green"),
        "status: {status}"
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_rule_added_at_runtime_moves_new_flows_only_and_survives_a_restart() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let _blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let bpffs = BpfMount::new()?;
    let config = with_pin_dir(
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
        &bpffs.pin_dir(),
    );
    let mut d = Daemon::start(&topo.edge, &config)?;

    // An established connection from the client (10.0.1.2), on blue.
    let conn = LongLivedConn::start(&topo.cli, topology::vip(), TIMEOUT)?;
    ensure!(conn.identity().name == "blue", "{:?}", conn.identity());
    conn.wait_echoes(3, Duration::from_secs(5))?;

    let out = d.cli_ok(&["target", "add", "web", "10.0.1.2/32", "green"])?;
    println!("$ splitter target add web 10.0.1.2/32 green\n{out}");
    ensure!(
        out.contains("10.0.1.2/32") && out.contains("green"),
        "target add printed: {out}"
    );
    // New flows from the client go to green ...
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 20, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.count("green") == 20,
        "after the rule: {r:?}"
    );
    // ... the established one stays on blue, undisturbed.
    let sent = conn.report().echoed;
    conn.wait_echoes(sent + 5, Duration::from_secs(5))?;
    let rep = conn.report();
    ensure!(rep.failures.is_empty(), "long-lived: {:?}", rep.failures);

    // Bad rules: refused with the reason, nothing changed.
    let before = d.cli_ok(&["target", "list", "web", "--output", "json"])?;
    for (args, want) in [
        (
            ["target", "add", "web", "10.0.1.3/24", "green"],
            "10.0.1.3/24 has host bits set; did you mean 10.0.1.0/24?",
        ),
        (
            ["target", "add", "web", "10.0.1.0/24", "purple"],
            "has no version \"purple\"",
        ),
        (
            ["target", "add", "web", "10.0.1.2/32", "blue"],
            "already has a rule for 10.0.1.2/32",
        ),
        (
            ["target", "add", "web", "10.0.1.0/24", "green"],
            "redundant",
        ),
        (
            ["target", "add", "web", "2001:db8::/64", "green"],
            "IPv4-only",
        ),
        (
            ["target", "remove", "web", "10.0.9.0/24", "-otable"],
            "has no rule for 10.0.9.0/24",
        ),
    ] {
        refused(&d, &args, 1, want)?;
        println!("$ splitter {}\n{}", args.join(" "), d.cli(&args)?.stderr);
    }
    // A version losing its last active backend while a rule needs it.
    refused(
        &d,
        &[
            "backend",
            "set",
            "web",
            &be(3).to_string(),
            "--state",
            "drain",
        ],
        1,
        "no active backend",
    )?;
    ensure!(
        d.cli_ok(&["target", "list", "web", "--output", "json"])? == before,
        "a refused edit changed the rules"
    );

    // kill -9 and start again with the same file: the rule is back.
    d.kill9_and_restart(&topo.edge)?;
    ensure!(
        d.cli_ok(&["target", "list", "web", "--output", "json"])? == before,
        "runtime rules lost across a restart"
    );
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 10, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.count("green") == 10,
        "after the restart: {r:?}"
    );

    // Removed: the weights decide again; the connection never moved.
    d.cli_ok(&["target", "remove", "web", "10.0.1.2/32"])?;
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 10, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.count("blue") == 10,
        "after remove: {r:?}"
    );
    let sent = conn.report().echoed;
    conn.wait_echoes(sent + 3, Duration::from_secs(5))?;
    let rep = conn.stop();
    ensure!(rep.failures.is_empty(), "long-lived: {:?}", rep.failures);
    drop(d);
    topo.no_csum_errors()
}

/// The new connections from each source of `sources` (10 each) and the
/// versions that answered them.
fn seen(
    topo: &Topology,
    sources: &[Ipv4Addr],
) -> Result<std::collections::BTreeMap<Ipv4Addr, Vec<String>>> {
    let r = clients::tcp_identity_many(
        &topo.cli,
        topology::vip(),
        10 * sources.len(),
        sources,
        TIMEOUT,
    )?;
    ensure!(r.errors == 0, "failures: {:?}", r.error_samples);
    Ok(sources
        .iter()
        .map(|a| {
            let names = r
                .per_source
                .get(&Some(*a))
                .map(|m| m.keys().cloned().collect())
                .unwrap_or_default();
            (*a, names)
        })
        .collect())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_targets_step_shows_the_new_version_to_the_targets_only_and_leaves_no_rule() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        extra_client_addrs: 4,
        ..Default::default()
    })?;
    let _blue = TcpIdentityServer::start(&topo.back, be(2), "blue")?;
    let _green = TcpIdentityServer::start(&topo.back, be(3), "green")?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    // 10.0.1.100 and .101 are the targets; .102 and .103 are not.
    let addrs = topo.extra_client_addrs().to_vec();
    let (targeted, others) = addrs.split_at(2);
    let only = |m: &std::collections::BTreeMap<Ipv4Addr, Vec<String>>,
                who: &[Ipv4Addr],
                version: &str|
     -> Result<()> {
        for a in who {
            ensure!(
                m[a] == [version],
                "{a} saw {:?}, expected only {version}",
                m[a]
            );
        }
        Ok(())
    };

    d.cli_ok(&[
        "rollout",
        "start",
        "web",
        "--to",
        "green",
        "--steps",
        "targets,50,100",
        "--targets",
        "10.0.1.100/31",
        "--step-time",
        "10m",
        "--no-analysis",
    ])?;
    // Step 1: the targets see green, everyone else blue (0 %).
    let r = rollouts::rollout(&d, "web")?;
    ensure!(r["step"] == 1 && r["state"] == "running", "{r}");
    let m = seen(&topo, &addrs)?;
    only(&m, targeted, "green")?;
    only(&m, others, "blue")?;
    let list = d.cli_ok(&["target", "list", "web"])?;
    ensure!(list.contains("10.0.1.100/31  green"), "{list}");
    // The rollout owns the service: a rule by hand is refused.
    refused(
        &d,
        &["target", "add", "web", "10.0.1.102/32", "green"],
        1,
        "rollout in progress",
    )?;

    // On to 50 %: the targets stay on green.
    d.cli_ok(&["rollout", "promote", "web"])?;
    let r = rollouts::rollout(&d, "web")?;
    ensure!(r["step"] == 2, "{r}");
    only(&seen(&topo, targeted)?, targeted, "green")?;

    // Aborted: every new flow back to blue, the rules gone.
    d.cli_ok(&["rollout", "abort", "web"])?;
    let list = d.cli_ok(&["target", "list", "web"])?;
    ensure!(list.contains("no target rules"), "after abort: {list}");
    only(&seen(&topo, &addrs)?, &addrs, "blue")?;

    // Retried from the targets step, then completed: green for all, and
    // the rules, which chose nothing at 100 %, are gone too.
    d.cli_ok(&["rollout", "retry", "web"])?;
    only(&seen(&topo, &addrs)?, targeted, "green")?;
    d.cli_ok(&["rollout", "promote", "web", "--full"])?;
    let r = rollouts::rollout(&d, "web")?;
    ensure!(r["state"] == "completed", "{r}");
    let list = d.cli_ok(&["target", "list", "web"])?;
    ensure!(list.contains("no target rules"), "after completion: {list}");
    only(&seen(&topo, &addrs)?, &addrs, "green")?;
    drop(d);
    topo.no_csum_errors()
}
