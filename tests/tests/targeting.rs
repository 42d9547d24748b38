//! Packet-level tests of source-CIDR targeting (`TARGETS`, `SVC_F_TARGETS`):
//! one frame in through `BPF_PROG_TEST_RUN`, the exact frame out, and
//! exactly the counters that moved.
//!
//! Privileged (root), one at a time:
//!
//! ```text
//! cargo test -p splitter-tests --test targeting -- --include-ignored --test-threads=1
//! ```
//!
//! Each test loads its own copy of the real program (`Dataplane::load`),
//! publishes configs with `apply` (the controller's path into the maps), and
//! runs frames inside an empty network namespace of its own, where the
//! program hands every rewritten frame to the kernel (`XDP_PASS`,
//! `pass_fib_other`). A DNAT-mode SYN comes out with only its destination
//! rewritten, so the backend it went to, and with it the version, reads
//! straight from the frame.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::RawFd,
};

use anyhow::{Context, Result, ensure};
use splitter::{
    config::{BackendState, Config},
    dataplane::Dataplane,
    target::TargetConfig,
};
use splitter_tests::{
    netns::{Netns, run_prefix},
    packet::{Packet, TCP_ACK, TCP_SYN, diff},
    testrun::{test_run_xdp, xdp_action},
};

const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);
const API_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 11), 80);
const BLUE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080);
const GREEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 8080);
const RED: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 4), 8080);
const API_V1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 3, 2), 8080);

/// Service "web" (blue takes every weighted flow; green and red get none
/// by weight) and service "api" (one version, never any rule), with `rules`
/// (`CIDR -> version`) on web.
fn config(rules: &[(&str, &str)]) -> Result<Config> {
    let mut text = format!(
        r#"
[dataplane]
interface = "lo"
mode = "dnat"

[[service]]
name = "web"
vip = "{VIP}"

[[service.version]]
name = "blue"
weight = 100
backends = ["{BLUE}"]

[[service.version]]
name = "green"
weight = 0
backends = ["{GREEN}"]

[[service.version]]
name = "red"
weight = 0
backends = ["{RED}"]
"#
    );
    for (cidr, version) in rules {
        text.push_str(&format!(
            "\n[[service.target]]\ncidr = \"{cidr}\"\nversion = \"{version}\"\n"
        ));
    }
    text.push_str(&format!(
        r#"
[[service]]
name = "api"
vip = "{API_VIP}"

[[service.version]]
name = "v1"
weight = 1
backends = ["{API_V1}"]
"#
    ));
    Config::parse(&text).map_err(|e| anyhow::anyhow!("test config rejected: {e}"))
}

struct Edge {
    dp: Dataplane,
    fd: RawFd,
}

impl Edge {
    fn new(config: &Config) -> Result<Self> {
        let mut dp = Dataplane::load().context("loading the XDP program (root needed)")?;
        dp.apply(config)?;
        let fd = dp.program_fd()?;
        Ok(Self { dp, fd })
    }

    /// Runs a TCP packet `from` -> `dst` with `flags`, checks it came out
    /// with only its destination rewritten to `to`, and that exactly
    /// `counters` moved.
    fn expect(
        &self,
        what: &str,
        (from, dst, flags): (SocketAddrV4, SocketAddrV4, u8),
        to: SocketAddrV4,
        counters: &[(&'static str, u64)],
    ) -> Result<()> {
        let before = self.dp.counters()?;
        let pkt = Packet::tcp(from, dst, flags);
        let r = test_run_xdp(self.fd, &pkt.build(), None, 1).context("BPF_PROG_TEST_RUN")?;
        let after = self.dp.counters()?;
        let moved: BTreeMap<&str, u64> = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(k).copied().unwrap_or(0);
                (d != 0).then_some((*k, d))
            })
            .collect();
        ensure!(
            r.action == xdp_action::PASS,
            "{what}: action {}",
            xdp_action::name(r.action)
        );
        let want = pkt.endpoints(from, to).build();
        ensure!(
            r.data == want,
            "{what}: not forwarded to {to}:\n{}",
            diff(&r.data, &want)
        );
        let want_counters: BTreeMap<&str, u64> = counters.iter().copied().collect();
        ensure!(
            moved == want_counters,
            "{what}: counters moved {moved:?}, expected {want_counters:?}"
        );
        Ok(())
    }

    /// A SYN from `client` to web: it must reach `to`, counted as a
    /// targeted new flow or not.
    fn syn(&self, client: SocketAddrV4, to: SocketAddrV4, targeted: bool) -> Result<()> {
        let mut c = vec![("new_flow", 1), ("pass_fib_other", 1)];
        if targeted {
            c.push(("new_flow_targeted", 1));
        }
        self.expect(
            &format!("SYN from {client}"),
            (client, VIP, TCP_SYN),
            to,
            &c,
        )
    }
}

fn at(ip: [u8; 4], port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from(ip), port)
}

fn in_netns<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = Netns::new(format!("{}-tgt", run_prefix()))?;
    ns.enter(f)?
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn the_longest_prefix_decides_and_a_client_no_rule_holds_follows_the_weights() -> Result<()> {
    in_netns(|| {
        // Nested rules, each an exception carved out of the one around it.
        let edge = Edge::new(&config(&[
            ("10.0.0.0/8", "green"),
            ("10.0.1.0/24", "red"),
            ("10.0.1.7/32", "green"),
        ])?)?;
        edge.syn(at([10, 0, 1, 7], 40000), GREEN, true)?; // the /32
        edge.syn(at([10, 0, 1, 8], 40000), RED, true)?; // the /24
        edge.syn(at([10, 0, 1, 255], 40000), RED, true)?; // the /24's last
        edge.syn(at([10, 0, 2, 0], 40000), GREEN, true)?; // just past it: the /8
        edge.syn(at([10, 255, 255, 255], 40000), GREEN, true)?;
        // No rule holds these: the weights (blue 100 %) decide.
        edge.syn(at([11, 0, 0, 0], 40000), BLUE, false)?;
        edge.syn(at([9, 255, 255, 255], 40000), BLUE, false)?;
        edge.syn(at([0, 0, 0, 0], 40000), BLUE, false)?;
        edge.syn(at([255, 255, 255, 255], 40000), BLUE, false)?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_default_route_rule_and_host_rules_at_the_edges_of_the_address_space() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new(&config(&[
            ("0.0.0.0/0", "red"),
            ("0.0.0.0/32", "green"),
            ("255.255.255.255/32", "green"),
        ])?)?;
        edge.syn(at([0, 0, 0, 0], 1), GREEN, true)?;
        edge.syn(at([255, 255, 255, 255], 65535), GREEN, true)?;
        edge.syn(at([0, 0, 0, 1], 1), RED, true)?;
        edge.syn(at([255, 255, 255, 254], 1), RED, true)?;
        edge.syn(at([192, 0, 2, 1], 1), RED, true)?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn an_empty_version_falls_through_and_a_service_without_rules_is_untouched() -> Result<()> {
    in_netns(|| {
        let mut c = config(&[("10.0.1.0/24", "green")])?;
        // Green's only backend drained behind validation's back (as a
        // publish racing a backend's removal would leave it): its table is
        // empty, so the rule's clients get the weights' choice, not a drop.
        c.services[0].versions[1].backends[0].state = BackendState::Drain;
        let edge = Edge::new(&c)?;
        edge.syn(at([10, 0, 1, 9], 40000), BLUE, false)?;
        // The other service has no rule and no flag: the same client
        // follows its weights there.
        edge.expect(
            "SYN to api",
            (at([10, 0, 1, 9], 40000), API_VIP, TCP_SYN),
            API_V1,
            &[("new_flow", 1), ("pass_fib_other", 1)],
        )?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn established_flows_never_move_and_rules_leave_with_their_service() -> Result<()> {
    in_netns(|| {
        let client = at([10, 0, 1, 8], 40000);
        let mut edge = Edge::new(&config(&[])?)?;
        edge.syn(client, BLUE, false)?;
        let ack = (client, VIP, TCP_ACK);
        let fwd = [("pass_fib_other", 1)];
        edge.expect("ACK before the rule", ack, BLUE, &fwd)?;

        // A rule for the client: its established flow stays on blue ...
        edge.dp.apply(&config(&[("10.0.1.8/32", "green")])?)?;
        edge.expect("ACK after the rule", ack, BLUE, &fwd)?;
        // ... its new flows go to green.
        let other_port = at([10, 0, 1, 8], 40001);
        edge.syn(other_port, GREEN, true)?;
        let ack2 = (other_port, VIP, TCP_ACK);

        // The rule moves to red: both flows stay where they are.
        edge.dp.apply(&config(&[("10.0.1.8/32", "red")])?)?;
        edge.expect("ACK of the first flow", ack, BLUE, &fwd)?;
        edge.expect("ACK of the targeted flow", ack2, GREEN, &fwd)?;
        edge.syn(at([10, 0, 1, 8], 40002), RED, true)?;
        ensure!(edge.dp.target_entries().len() == 1);

        // Rule removed: new flows follow the weights again.
        edge.dp.apply(&config(&[])?)?;
        edge.syn(at([10, 0, 1, 8], 40003), BLUE, false)?;
        edge.expect("ACK of the targeted flow, rule gone", ack2, GREEN, &fwd)?;
        ensure!(edge.dp.target_entries().is_empty());

        // A service removed takes its rules along (its id is handed out
        // again).
        let mut c = config(&[("10.0.1.0/24", "green")])?;
        edge.dp.apply(&c)?;
        ensure!(edge.dp.target_entries().len() == 1);
        c.services.retain(|s| s.name != "web");
        edge.dp.apply(&c)?;
        ensure!(
            edge.dp.target_entries().is_empty(),
            "rules left: {:?}",
            edge.dp.target_entries()
        );
        Ok(())
    })
}

/// The rules survive in the config type as written.
#[test]
fn rules_parse_into_the_config() -> Result<()> {
    let c = config(&[("10.0.1.96/28", "green")])?;
    ensure!(
        c.services[0].targets
            == vec![TargetConfig {
                cidr: "10.0.1.96/28".parse().map_err(anyhow::Error::msg)?,
                version: "green".into(),
            }]
    );
    Ok(())
}
