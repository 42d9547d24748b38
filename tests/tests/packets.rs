//! Packet-level tests of the kernel program: one frame in through
//! `BPF_PROG_TEST_RUN`, the exact action and the exact bytes out.
//!
//! Privileged (root) and meant to run one at a time, so `#[ignore]`d for a
//! plain `cargo test` like every test of this crate:
//!
//! ```text
//! cargo test -p splitter-tests --test packets -- --include-ignored --test-threads=1
//! ```
//!
//! Each test loads its own copy of the real program (`Dataplane::load`, so
//! maps and counters start empty), publishes a config with `apply`, and runs
//! every frame from a thread inside a network namespace of its own
//! (`spl-<pid>-<n>-pkt`, deleted on drop), so the host's routes cannot change
//! what `bpf_fib_lookup` answers. In an empty namespace the lookup finds no
//! route and the program hands the rewritten frame, TTL untouched, to the
//! kernel (`XDP_PASS`, counter `pass_fib_other`); the last test builds a
//! veth pair with routes and permanent neighbours to check the forwarding
//! path itself (`XDP_REDIRECT`/`XDP_TX`, TTL, MACs from the FIB).
//!
//! Every expected frame is built from scratch with full checksums
//! (`splitter_tests::packet`), independently of the kernel's incremental
//! updates; every run also checks that exactly the expected counters moved.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::RawFd,
};

use addrs::*;
use anyhow::{Context, Result, ensure};
use splitter::{config::Config, dataplane::Dataplane};
use splitter_tests::{
    netns::{Netns, run_prefix},
    packet::{
        CLIENT_MAC, EDGE_MAC, Packet, TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, arp_request,
        diff, parse, verify_checksums,
    },
    testrun::{self, RunResult, ifindex, mac_str, test_run_xdp, xdp_action},
};

/// Addresses of the test topology, spelled out so the tests read like the spec.
mod addrs {
    use std::net::{Ipv4Addr, SocketAddrV4};

    pub const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);
    pub const UDP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 53), 53);
    pub const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 2), 40000);
    pub const BLUE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080);
    pub const GREEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 8080);
    pub const UDP_BLUE: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 5353);
    pub const UDP_GREEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 3), 5353);
    pub const SNAT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
    /// An address that is no VIP.
    pub const OTHER: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 11), 80);
    /// SNAT source ports, as documented (docs/config.md): 10000–32767.
    pub const SNAT_PORTS: std::ops::RangeInclusive<u16> = 10000..=32767;
}

/// The config every test starts from: a TCP and a UDP service, each with
/// versions blue and green of one backend each.
fn config(mode: &str, blue: u32, green: u32) -> Result<Config> {
    let snat = if mode == "snat" {
        format!("snat_address = \"{SNAT_IP}\"")
    } else {
        String::new()
    };
    let text = format!(
        r#"
[dataplane]
interface = "lo"
mode = "{mode}"
{snat}

[[service]]
name = "web"
vip = "{VIP}"
protocol = "tcp"

[[service.version]]
name = "blue"
weight = {blue}
backends = ["{BLUE}"]

[[service.version]]
name = "green"
weight = {green}
backends = ["{GREEN}"]

[[service]]
name = "dns"
vip = "{UDP_VIP}"
protocol = "udp"

[[service.version]]
name = "blue"
weight = {blue}
backends = ["{UDP_BLUE}"]

[[service.version]]
name = "green"
weight = {green}
backends = ["{UDP_GREEN}"]
"#
    );
    Config::parse(&text).map_err(|e| anyhow::anyhow!("test config rejected: {e}"))
}

/// The loaded program with a published config.
struct Edge {
    dp: Dataplane,
    fd: RawFd,
}

/// How much each counter moved during one run (only the ones that moved).
type Deltas = BTreeMap<&'static str, u64>;

impl Edge {
    fn new(mode: &str, blue: u32, green: u32) -> Result<Self> {
        Self::with_config(&config(mode, blue, green)?)
    }

    fn with_config(config: &Config) -> Result<Self> {
        let mut dp = Dataplane::load().context("loading the XDP program (root needed)")?;
        dp.apply(config)?;
        let fd = dp.program_fd()?;
        Ok(Self { dp, fd })
    }

    /// The signal counters of one backend:
    /// `[attempts, established, refused, timeouts, reset_by_backend, reset_by_client, latency samples]`.
    fn signals(&self, service: &str, version: &str, backend: SocketAddrV4) -> Result<[u64; 7]> {
        let c = self.dp.backend_counters(service, version, backend)?;
        Ok([
            c.attempts,
            c.established,
            c.refused,
            c.timeouts,
            c.reset_by_backend,
            c.reset_by_client,
            c.latency_count(),
        ])
    }

    fn reweight(&mut self, mode: &str, blue: u32, green: u32) -> Result<()> {
        Ok(self.dp.apply(&config(mode, blue, green)?)?)
    }

    /// Runs the program once on `frame` (arriving on `ingress`, or on
    /// loopback) and returns the result and the counters that moved.
    fn run_on(&self, frame: &[u8], ingress: Option<u32>) -> Result<(RunResult, Deltas)> {
        let before = self.dp.counters()?;
        let r = test_run_xdp(self.fd, frame, ingress, 1).context("BPF_PROG_TEST_RUN")?;
        let after = self.dp.counters()?;
        let deltas = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(k).copied().unwrap_or(0);
                (d != 0).then_some((*k, d))
            })
            .collect();
        Ok((r, deltas))
    }

    fn run(&self, frame: &[u8]) -> Result<(RunResult, Deltas)> {
        self.run_on(frame, None)
    }

    /// Runs `input` and asserts the action, the exact output and the exact
    /// counter changes.
    fn expect(
        &self,
        what: &str,
        input: &[u8],
        action: u32,
        output: &[u8],
        counters: &[(&'static str, u64)],
    ) -> Result<RunResult> {
        let (r, deltas) = self.run(input)?;
        check(what, &r, &deltas, action, output, counters)?;
        Ok(r)
    }

    /// A frame the program must hand to the kernel untouched, moving no counter.
    fn expect_untouched(&self, what: &str, input: &[u8]) -> Result<()> {
        self.expect(what, input, xdp_action::PASS, input, &[])?;
        Ok(())
    }

    /// Entries in the connection table.
    fn entries(&self) -> Result<usize> {
        use aya::maps::{HashMap, MapData};
        let map = MapData::from_fd(self.dp.conns_fd()?).context("opening CONNS")?;
        let conns: HashMap<_, splitter_common::FlowKey, splitter_common::Conn> =
            HashMap::try_from(aya::maps::Map::LruHashMap(map)).context("CONNS type")?;
        Ok(conns.keys().count())
    }

    fn stats(&self, service: &str, version: &str, backend: SocketAddrV4) -> Result<[u64; 5]> {
        let s = self.dp.backend_stats(service, version, backend)?;
        Ok([
            s.new_flows,
            s.packets,
            s.bytes,
            s.reply_packets,
            s.reply_bytes,
        ])
    }
}

fn check(
    what: &str,
    r: &RunResult,
    deltas: &Deltas,
    action: u32,
    output: &[u8],
    counters: &[(&'static str, u64)],
) -> Result<()> {
    ensure!(
        r.action == action,
        "{what}: action {} ({}), expected {} ({})",
        xdp_action::name(r.action),
        r.action,
        xdp_action::name(action),
        action
    );
    ensure!(
        r.data == output,
        "{what}: output differs from the expected frame:\n{}",
        diff(&r.data, output)
    );
    let want: Deltas = counters.iter().copied().collect();
    ensure!(
        *deltas == want,
        "{what}: counters moved {deltas:?}, expected {want:?}"
    );
    Ok(())
}

/// Runs `f` on a thread inside a fresh, empty network namespace.
fn in_netns<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = Netns::new(format!("{}-pkt", run_prefix()))?;
    ns.enter(f)?
}

/// The SNAT address and port the program gave a forwarded frame, checked
/// against the documented range.
fn snat_source(frame: &[u8]) -> Result<SocketAddrV4> {
    let src = parse(frame)
        .map_err(anyhow::Error::msg)?
        .source()
        .context("no source in output")?;
    ensure!(
        *src.ip() == SNAT_IP,
        "source {src} is not the SNAT address {SNAT_IP}"
    );
    ensure!(
        SNAT_PORTS.contains(&src.port()),
        "SNAT port {} outside {SNAT_PORTS:?}",
        src.port()
    );
    Ok(src)
}

fn client(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(*CLIENT.ip(), port)
}

/// Clients (ports from `first` up, in order) whose new TCP flow to `VIP`
/// starts its SNAT port probe at `snat_port`, as the program computes it.
fn clients_probing_from(snat_port: u16, first: u16) -> impl Iterator<Item = SocketAddrV4> {
    use splitter_common::{PROTO_TCP, flow_hash, snat_port_start};
    let be32 = |a: SocketAddrV4| [u32::from(*a.ip()).to_be(), 0, 0, 0];
    let want = u32::from(snat_port - SNAT_PORTS.start());
    (first..=u16::MAX).map(client).filter(move |c| {
        let h = flow_hash(
            &be32(*c),
            &be32(VIP),
            c.port().to_be(),
            VIP.port().to_be(),
            PROTO_TCP,
            false,
        );
        snat_port_start(h) == want
    })
}

const FORWARDED_NEW: &[(&str, u64)] = &[("new_flow", 1), ("pass_fib_other", 1)];
const FORWARDED: &[(&str, u64)] = &[("pass_fib_other", 1)];

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn snat_syn_data_and_reply_are_translated() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;

        // SYN: destination to the backend, source to SNAT address and port.
        let syn = Packet::tcp(CLIENT, VIP, TCP_SYN).tcp_options(&[2, 4, 0x05, 0xb4]);
        let (r, deltas) = edge.run(&syn.build())?;
        let snat = snat_source(&r.data)?;
        let want = syn.clone().endpoints(snat, BLUE).build();
        check("SYN", &r, &deltas, xdp_action::PASS, &want, FORWARDED_NEW)?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;
        let syn_len = syn.build().len() as u64;
        assert_eq!(edge.stats("web", "blue", BLUE)?, [1, 1, syn_len, 0, 0]);

        // A retransmitted SYN is the same flow: same port, no new flow.
        edge.expect(
            "SYN again",
            &syn.build(),
            xdp_action::PASS,
            &want,
            FORWARDED,
        )?;

        // The backend's SYN-ACK, to the SNAT port: back to VIP -> client.
        let synack = Packet::tcp(BLUE, snat, TCP_SYN | TCP_ACK)
            .seq_ack(5000, 1001)
            .macs(EDGE_MAC, [2, 0, 0, 0, 0, 2]);
        let want = synack.clone().endpoints(VIP, CLIENT).build();
        let r = edge.expect(
            "SYN-ACK",
            &synack.build(),
            xdp_action::PASS,
            &want,
            FORWARDED,
        )?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;

        // The client's ACK with data: same rewrite, same SNAT port.
        let data = Packet::tcp(CLIENT, VIP, TCP_ACK | TCP_PSH)
            .seq_ack(1001, 5001)
            .payload(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let want = data.clone().endpoints(snat, BLUE).build();
        let r = edge.expect(
            "ACK+data",
            &data.build(),
            xdp_action::PASS,
            &want,
            FORWARDED,
        )?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;

        let synack_len = synack.build().len() as u64;
        let data_len = data.build().len() as u64;
        assert_eq!(
            edge.stats("web", "blue", BLUE)?,
            [1, 3, 2 * syn_len + data_len, 1, synack_len]
        );
        assert_eq!(edge.stats("web", "green", GREEN)?, [0; 5]);

        // A "reply" to another SNAT port belongs to no flow: not ours.
        let other_port = if snat.port() == 32767 {
            10000
        } else {
            snat.port() + 1
        };
        let stray = Packet::tcp(
            BLUE,
            SocketAddrV4::new(SNAT_IP, other_port),
            TCP_SYN | TCP_ACK,
        )
        .build();
        edge.expect_untouched("reply to an unused SNAT port", &stray)?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn dnat_rewrites_only_the_destination() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("dnat", 100, 0)?;
        let syn = Packet::tcp(CLIENT, VIP, TCP_SYN);
        let want = syn.clone().endpoints(CLIENT, BLUE).build();
        let r = edge.expect("SYN", &syn.build(), xdp_action::PASS, &want, FORWARDED_NEW)?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;

        let synack = Packet::tcp(BLUE, CLIENT, TCP_SYN | TCP_ACK).seq_ack(5000, 1001);
        let want = synack.clone().endpoints(VIP, CLIENT).build();
        edge.expect(
            "SYN-ACK",
            &synack.build(),
            xdp_action::PASS,
            &want,
            FORWARDED,
        )?;

        let data = Packet::tcp(CLIENT, VIP, TCP_ACK)
            .seq_ack(1001, 5001)
            .payload(b"x");
        let want = data.clone().endpoints(CLIENT, BLUE).build();
        edge.expect(
            "ACK+data",
            &data.build(),
            xdp_action::PASS,
            &want,
            FORWARDED,
        )?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn traffic_that_is_not_ours_passes_untouched() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        edge.expect_untouched(
            "SYN to a non-VIP",
            &Packet::tcp(CLIENT, OTHER, TCP_SYN).build(),
        )?;
        edge.expect_untouched(
            "ACK to a non-VIP",
            &Packet::tcp(CLIENT, OTHER, TCP_ACK).build(),
        )?;
        edge.expect_untouched(
            "SYN to a VIP port without a service",
            &Packet::tcp(CLIENT, SocketAddrV4::new(*VIP.ip(), 443), TCP_SYN).build(),
        )?;
        edge.expect_untouched(
            "UDP to the TCP service's port",
            &Packet::udp(CLIENT, VIP, b"x").build(),
        )?;
        edge.expect_untouched(
            "TCP to the UDP service's port",
            &Packet::tcp(CLIENT, UDP_VIP, TCP_SYN).build(),
        )?;
        edge.expect_untouched(
            "ICMP echo to the VIP",
            &Packet::raw(*CLIENT.ip(), *VIP.ip(), 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]).build(),
        )?;
        edge.expect_untouched(
            "ARP who-has VIP",
            &arp_request(CLIENT_MAC, *CLIENT.ip(), *VIP.ip()),
        )?;
        let mut ipv6 = Packet::tcp(CLIENT, VIP, TCP_SYN).build();
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        edge.expect_untouched("IPv6 ethertype", &ipv6)?;
        let mut v6_in_v4 = Packet::tcp(CLIENT, VIP, TCP_SYN).build();
        v6_in_v4[14] = 0x65;
        edge.expect_untouched("IP version 6 under the IPv4 ethertype", &v6_in_v4)?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn malformed_packets_to_a_vip_are_dropped_and_counted() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        let syn = Packet::tcp(CLIENT, VIP, TCP_SYN);
        let udp = Packet::udp(client(5000), UDP_VIP, b"query");
        let cases: [(&str, Vec<u8>, &'static str); 11] = [
            (
                "IPv4 header cut at 19 bytes",
                syn.clone().truncate(14 + 19).build(),
                "drop_truncated_ip",
            ),
            (
                "options cut short (IHL 6, 20 bytes)",
                syn.clone()
                    .ip_options(&[1, 1, 1, 1])
                    .truncate(14 + 20)
                    .build(),
                "drop_truncated_ip",
            ),
            ("IHL 4", syn.clone().ihl(4).build(), "drop_bad_ihl"),
            ("IHL 0", syn.clone().ihl(0).build(), "drop_bad_ihl"),
            (
                "IP options (4 NOPs)",
                syn.clone().ip_options(&[1, 1, 1, 1]).build(),
                "drop_ip_options",
            ),
            (
                "non-first fragment",
                syn.clone().fragment(185, false).build(),
                "drop_fragment",
            ),
            (
                "first fragment (MF)",
                syn.clone().fragment(0, true).build(),
                "drop_fragment",
            ),
            (
                "TCP header cut at 10 bytes",
                syn.clone().truncate(14 + 20 + 10).build(),
                "drop_truncated_l4",
            ),
            (
                "TCP header cut at 19 bytes",
                syn.clone().truncate(14 + 20 + 19).build(),
                "drop_truncated_l4",
            ),
            (
                "UDP header cut at 4 bytes",
                udp.clone().truncate(14 + 20 + 4).build(),
                "drop_truncated_l4",
            ),
            (
                "ACK of an unknown flow",
                Packet::tcp(CLIENT, VIP, TCP_ACK).payload(b"x").build(),
                "drop_no_flow",
            ),
        ];
        for (what, frame, counter) in &cases {
            edge.expect(what, frame, xdp_action::DROP, frame, &[(*counter, 1)])?;
        }
        // None of them created a flow: a real SYN still is the first one.
        let (r, d) = edge.run(&syn.build())?;
        ensure!(
            r.action == xdp_action::PASS && d == FORWARDED_NEW.iter().copied().collect::<Deltas>(),
            "SYN after malformed: {d:?}"
        );
        assert_eq!(edge.stats("web", "blue", BLUE)?[0], 1);
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn malformed_packets_to_others_follow_parse_rules() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        let syn = Packet::tcp(CLIENT, OTHER, TCP_SYN);
        let udp = Packet::udp(client(5000), SocketAddrV4::new(*OTHER.ip(), 53), b"query");
        // The IPv4 header itself is unusable: dropped whoever it is for
        // (the kernel's own input path would drop it too).
        for (what, frame, counter) in [
            (
                "IPv4 header cut at 19 bytes",
                syn.clone().truncate(14 + 19).build(),
                "drop_truncated_ip",
            ),
            ("IHL 4", syn.clone().ihl(4).build(), "drop_bad_ihl"),
        ] {
            edge.expect(what, &frame, xdp_action::DROP, &frame, &[(counter, 1)])?;
        }
        // Well-formed IPv4 the program cannot forward: the kernel's business.
        for (what, frame) in [
            ("IP options", syn.clone().ip_options(&[1, 1, 1, 1]).build()),
            (
                "non-first fragment",
                syn.clone().fragment(185, false).build(),
            ),
            ("first fragment (MF)", syn.clone().fragment(0, true).build()),
            (
                "TCP header cut at 10 bytes",
                syn.clone().truncate(14 + 20 + 10).build(),
            ),
            (
                "UDP header cut at 4 bytes",
                udp.clone().truncate(14 + 20 + 4).build(),
            ),
            (
                "ACK of an unknown flow",
                Packet::tcp(CLIENT, OTHER, TCP_ACK).build(),
            ),
            // To a VIP but not TCP/UDP: fragments of other protocols pass.
            (
                "ICMP fragment to the VIP",
                Packet::raw(*CLIENT.ip(), *VIP.ip(), 1, &[0; 16])
                    .fragment(1, false)
                    .build(),
            ),
        ] {
            edge.expect_untouched(what, &frame)?;
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn ttl_one_is_left_to_the_kernel_unchanged() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        let syn = Packet::tcp(CLIENT, VIP, TCP_SYN).ttl(1).build();
        edge.expect(
            "SYN with TTL 1",
            &syn,
            xdp_action::PASS,
            &syn,
            &[("new_flow", 1), ("pass_ttl", 1)],
        )?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn udp_datagrams_are_translated_and_zero_checksum_stays_zero() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        let c = client(5000);
        let q = Packet::udp(
            c,
            UDP_VIP,
            b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x01a\x00\x00\x01\x00\x01",
        );
        let (r, deltas) = edge.run(&q.build())?;
        let snat = snat_source(&r.data)?;
        let want = q.clone().endpoints(snat, UDP_BLUE).build();
        check(
            "UDP query",
            &r,
            &deltas,
            xdp_action::PASS,
            &want,
            FORWARDED_NEW,
        )?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;
        ensure!(
            r.data[40..42] != [0, 0],
            "computed UDP checksum must not be 0"
        );

        // Same flow, no checksum: rewritten, checksum still 0.
        let q0 = Packet::udp(c, UDP_VIP, b"odd").udp_zero_checksum();
        let want = q0.clone().endpoints(snat, UDP_BLUE).build();
        ensure!(want[40..42] == [0, 0], "expected frame keeps checksum 0");
        edge.expect(
            "UDP without checksum",
            &q0.build(),
            xdp_action::PASS,
            &want,
            FORWARDED,
        )?;

        // The answer comes back from the VIP.
        let a = Packet::udp(UDP_BLUE, snat, b"answer!");
        let want = a.clone().endpoints(UDP_VIP, c).build();
        let r = edge.expect("UDP answer", &a.build(), xdp_action::PASS, &want, FORWARDED)?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;

        // A new client port is a new flow, with its own SNAT port.
        let q2 = Packet::udp(client(5001), UDP_VIP, b"q2").udp_zero_checksum();
        let (r, deltas) = edge.run(&q2.build())?;
        let snat2 = snat_source(&r.data)?;
        ensure!(snat2 != snat, "two flows share SNAT source {snat}");
        check(
            "second flow",
            &r,
            &deltas,
            xdp_action::PASS,
            &q2.clone().endpoints(snat2, UDP_BLUE).build(),
            FORWARDED_NEW,
        )?;
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn weight_flip_moves_new_flows_and_keeps_established_ones() -> Result<()> {
    in_netns(|| {
        let mut edge = Edge::new("snat", 100, 0)?;
        let a = client(40001);
        let b = client(40002);
        let syn_a = Packet::tcp(a, VIP, TCP_SYN);
        let (r, deltas) = edge.run(&syn_a.build())?;
        let snat_a = snat_source(&r.data)?;
        check(
            "flow A SYN",
            &r,
            &deltas,
            xdp_action::PASS,
            &syn_a.clone().endpoints(snat_a, BLUE).build(),
            FORWARDED_NEW,
        )?;
        let ua = Packet::udp(a, UDP_VIP, b"a");
        let (r, _) = edge.run(&ua.build())?;
        let usnat_a = snat_source(&r.data)?;
        ensure!(
            r.data == ua.clone().endpoints(usnat_a, UDP_BLUE).build(),
            "UDP flow A not to blue"
        );

        edge.reweight("snat", 0, 100)?;

        // A new flow goes to green.
        let syn_b = Packet::tcp(b, VIP, TCP_SYN);
        let (r, deltas) = edge.run(&syn_b.build())?;
        let snat_b = snat_source(&r.data)?;
        check(
            "flow B SYN",
            &r,
            &deltas,
            xdp_action::PASS,
            &syn_b.clone().endpoints(snat_b, GREEN).build(),
            FORWARDED_NEW,
        )?;
        let ub = Packet::udp(b, UDP_VIP, b"b");
        let (r, _) = edge.run(&ub.build())?;
        let usnat_b = snat_source(&r.data)?;
        ensure!(
            r.data == ub.clone().endpoints(usnat_b, UDP_GREEN).build(),
            "UDP flow B not to green:\n{}",
            diff(&r.data, &ub.clone().endpoints(usnat_b, UDP_GREEN).build())
        );

        // The flow from before the flip stays on blue, both directions.
        let ack_a = Packet::tcp(a, VIP, TCP_ACK)
            .seq_ack(1001, 5001)
            .payload(b"still blue");
        edge.expect(
            "flow A ACK",
            &ack_a.build(),
            xdp_action::PASS,
            &ack_a.clone().endpoints(snat_a, BLUE).build(),
            FORWARDED,
        )?;
        let synack_a = Packet::tcp(BLUE, snat_a, TCP_SYN | TCP_ACK);
        edge.expect(
            "flow A SYN-ACK",
            &synack_a.build(),
            xdp_action::PASS,
            &synack_a.clone().endpoints(VIP, a).build(),
            FORWARDED,
        )?;
        edge.expect(
            "UDP flow A",
            &ua.build(),
            xdp_action::PASS,
            &ua.clone().endpoints(usnat_a, UDP_BLUE).build(),
            FORWARDED,
        )?;

        assert_eq!(edge.stats("web", "blue", BLUE)?[0], 1);
        assert_eq!(edge.stats("web", "green", GREEN)?[0], 1);
        Ok(())
    })
}

/// MACs of the veth pair in the forwarding test.
const IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
/// The backend's neighbour entry.
const BLUE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn forwarding_ns(tag: &str) -> Result<Netns> {
    testrun::forwarding_ns(
        tag,
        testrun::ForwardingMacs {
            sp_in: IN_MAC,
            sp_out: OUT_MAC,
            client: CLIENT_MAC,
            backend: BLUE_MAC,
        },
    )
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn forwarding_uses_the_fib_redirect_tx_ttl_and_macs() -> Result<()> {
    let ns = forwarding_ns("fwd")?;
    ns.enter(|| -> Result<()> {
        let edge = Edge::new("snat", 100, 0)?;
        let (if_in, if_out) = (ifindex("sp-in")?, ifindex("sp-out")?);

        // Client SYN on sp-in: rewritten, TTL 64 -> 63, MACs from the FIB, out of sp-out.
        let syn = Packet::tcp(CLIENT, VIP, TCP_SYN).macs(IN_MAC, CLIENT_MAC);
        let (r, deltas) = edge.run_on(&syn.build(), Some(if_in))?;
        let snat = snat_source(&r.data)?;
        let want = syn
            .clone()
            .endpoints(snat, BLUE)
            .ttl(63)
            .macs(BLUE_MAC, OUT_MAC)
            .build();
        check(
            "SYN on sp-in",
            &r,
            &deltas,
            xdp_action::REDIRECT,
            &want,
            &[("new_flow", 1), ("redirect", 1)],
        )?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;

        // The backend's SYN-ACK on sp-out: back out of sp-in to the client's MAC.
        let synack = Packet::tcp(BLUE, snat, TCP_SYN | TCP_ACK)
            .seq_ack(5000, 1001)
            .ttl(64)
            .macs(OUT_MAC, BLUE_MAC);
        let want = synack
            .clone()
            .endpoints(VIP, CLIENT)
            .ttl(63)
            .macs(CLIENT_MAC, IN_MAC)
            .build();
        let (r, deltas) = edge.run_on(&synack.build(), Some(if_out))?;
        check(
            "SYN-ACK on sp-out",
            &r,
            &deltas,
            xdp_action::REDIRECT,
            &want,
            &[("redirect", 1)],
        )?;
        verify_checksums(&r.data).map_err(anyhow::Error::msg)?;

        // A SYN arriving on the interface it must leave by: XDP_TX.
        let syn2 = Packet::tcp(client(40100), VIP, TCP_SYN)
            .ttl(9)
            .macs(OUT_MAC, CLIENT_MAC);
        let (r, deltas) = edge.run_on(&syn2.build(), Some(if_out))?;
        let snat2 = snat_source(&r.data)?;
        let want = syn2
            .clone()
            .endpoints(snat2, BLUE)
            .ttl(8)
            .macs(BLUE_MAC, OUT_MAC)
            .build();
        check(
            "SYN on sp-out",
            &r,
            &deltas,
            xdp_action::TX,
            &want,
            &[("new_flow", 1), ("tx", 1)],
        )?;

        // A client with no neighbour entry: the reply is rewritten (TTL kept)
        // and handed to the kernel to resolve the MAC.
        let c3 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 3), 40000);
        let (r, _) = edge.run_on(&Packet::tcp(c3, VIP, TCP_SYN).build(), Some(if_in))?;
        let snat3 = snat_source(&r.data)?;
        let reply = Packet::tcp(BLUE, snat3, TCP_SYN | TCP_ACK).macs(OUT_MAC, BLUE_MAC);
        let want = reply.clone().endpoints(VIP, c3).build();
        let (r, deltas) = edge.run_on(&reply.build(), Some(if_out))?;
        check(
            "reply without neighbour",
            &r,
            &deltas,
            xdp_action::PASS,
            &want,
            &[("pass_no_neigh", 1)],
        )?;

        // A client behind a blackhole route: the reply is dropped as unroutable.
        let c4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 9, 9), 40000);
        let (r, _) = edge.run_on(&Packet::tcp(c4, VIP, TCP_SYN).build(), Some(if_in))?;
        let snat4 = snat_source(&r.data)?;
        let reply = Packet::tcp(BLUE, snat4, TCP_SYN | TCP_ACK).build();
        let (r, deltas) = edge.run_on(&reply, Some(if_out))?;
        check(
            "reply to a blackhole",
            &r,
            &deltas,
            xdp_action::DROP,
            &reply,
            &[("drop_unroutable", 1)],
        )?;

        // TTL 1: untouched, for the kernel's ICMP time exceeded.
        let ttl1 = Packet::tcp(client(40200), VIP, TCP_SYN).ttl(1).build();
        let (r, deltas) = edge.run_on(&ttl1, Some(if_in))?;
        check(
            "SYN with TTL 1",
            &r,
            &deltas,
            xdp_action::PASS,
            &ttl1,
            &[("new_flow", 1), ("pass_ttl", 1)],
        )?;
        Ok(())
    })?
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn established_flows_cache_the_route_for_a_short_while() -> Result<()> {
    use splitter_common::FIB_CACHE_NS;
    use std::time::{Duration, Instant};
    const MAC2: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
    const MAC3: [u8; 6] = [0x02, 0, 0, 0, 0, 0x33];
    let ns = forwarding_ns("rtc")?;
    let set_blue_mac = |mac: [u8; 6]| -> Result<()> {
        ns.ip(&[
            "neigh",
            "replace",
            "10.0.2.2",
            "lladdr",
            &mac_str(mac),
            "dev",
            "sp-out",
            "nud",
            "permanent",
        ])?;
        Ok(())
    };
    let validity = Duration::from_nanos(FIB_CACHE_NS);
    ns.enter(|| -> Result<()> {
        let edge = Edge::new("snat", 100, 0)?;
        let if_in = ifindex("sp-in")?;
        let syn = Packet::tcp(CLIENT, VIP, TCP_SYN).macs(IN_MAC, CLIENT_MAC);
        let (r, _) = edge.run_on(&syn.build(), Some(if_in))?;
        let snat = snat_source(&r.data)?;
        // One ACK of the flow with `len` payload bytes, and what it should
        // become when sent towards `mac`.
        let ack_frame = |len: usize| {
            Packet::tcp(CLIENT, VIP, TCP_ACK)
                .seq_ack(1001, 5001)
                .payload(&vec![b'x'; len])
                .macs(IN_MAC, CLIENT_MAC)
        };
        let want = |len: usize, mac: [u8; 6]| {
            ack_frame(len)
                .endpoints(snat, BLUE)
                .ttl(63)
                .macs(mac, OUT_MAC)
                .build()
        };
        let forwarded = |what: &str, r: &RunResult, deltas: &Deltas, len: usize, mac| {
            check(
                what,
                r,
                deltas,
                xdp_action::REDIRECT,
                &want(len, mac),
                &[("redirect", 1)],
            )
        };
        // Sends one ACK and checks that it went towards `mac`.
        let ack = |len: usize, mac: [u8; 6], what: &str| -> Result<()> {
            let (r, deltas) = edge.run_on(&ack_frame(len).build(), Some(if_in))?;
            forwarded(what, &r, &deltas, len, mac)
        };

        // The first established packet asks the FIB and caches the answer.
        ack(10, BLUE_MAC, "first ACK")?;
        let cached_at = Instant::now();
        set_blue_mac(MAC2)?;
        // Same size or smaller, within the validity: the cached MAC; once it
        // has passed, the new one. The program's coarse clock may lag the
        // real one by a tick, so near the limit either answer is right (on
        // a machine slow enough to get there).
        let slack = Duration::from_millis(20);
        let before = cached_at.elapsed();
        let (r, deltas) = edge.run_on(&ack_frame(10).build(), Some(if_in))?;
        let after = cached_at.elapsed();
        let what = "ACK right after the neighbour changed";
        if after + slack < validity {
            forwarded(what, &r, &deltas, 10, BLUE_MAC)?;
        } else if before > validity + slack {
            forwarded(what, &r, &deltas, 10, MAC2)?;
        } else {
            forwarded(what, &r, &deltas, 10, BLUE_MAC)
                .or_else(|_| forwarded(what, &r, &deltas, 10, MAC2))?;
        }
        // Longer than any packet the cached route accepted: a fresh lookup,
        // which sees the new neighbour and replaces the cached answer.
        ack(200, MAC2, "longer ACK")?;
        ack(10, MAC2, "short ACK after the longer one")?;
        // A change is picked up once the validity has passed.
        set_blue_mac(MAC3)?;
        std::thread::sleep(validity + Duration::from_millis(200));
        ack(10, MAC3, "ACK after the validity")?;

        // A packet longer than the egress MTU allows is not sent from the
        // cache: the FIB answers "fragmentation needed" and the kernel gets it.
        ns.ip(&["link", "set", "sp-out", "mtu", "1000"])?;
        let big = Packet::tcp(CLIENT, VIP, TCP_ACK)
            .seq_ack(1001, 5001)
            .payload(&[b'y'; 1200])
            .macs(IN_MAC, CLIENT_MAC);
        let want = big.clone().endpoints(snat, BLUE).build();
        let (r, deltas) = edge.run_on(&big.build(), Some(if_in))?;
        check(
            "ACK above the MTU",
            &r,
            &deltas,
            xdp_action::PASS,
            &want,
            &[("pass_fib_other", 1)],
        )?;
        ack(10, MAC3, "short ACK after the big one")?;
        Ok(())
    })?
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn flows_of_a_withdrawn_service_go_on_past_the_address_filter() -> Result<()> {
    use splitter_common::{ADDR_FILTER_DST, ADDR_FILTER_SRC};
    for mode in ["snat", "dnat"] {
        in_netns(|| {
            let mut edge = Edge::new(mode, 100, 0)?;
            let syn = Packet::tcp(CLIENT, VIP, TCP_SYN);
            let (r, _) = edge.run(&syn.build())?;
            let via = if mode == "snat" {
                snat_source(&r.data)?
            } else {
                CLIENT
            };
            // What the filter must hold for this mode.
            ensure!(
                edge.dp.filter_has(ADDR_FILTER_DST, *VIP.ip())?,
                "{mode}: VIP not in the filter"
            );
            if mode == "snat" {
                ensure!(
                    edge.dp.filter_has(ADDR_FILTER_DST, SNAT_IP)?,
                    "SNAT address not in the filter"
                );
            } else {
                ensure!(
                    edge.dp.filter_has(ADDR_FILTER_SRC, *BLUE.ip())?,
                    "DNAT backend not in the filter"
                );
            }

            // The web service goes away; its flow stays in the table.
            let mut cfg = config(mode, 100, 0)?;
            cfg.services.retain(|s| s.name != "web");
            edge.dp.apply(&cfg)?;
            let synack = Packet::tcp(BLUE, via, TCP_SYN | TCP_ACK).seq_ack(5000, 1001);
            edge.expect(
                &format!("{mode}: SYN-ACK of the withdrawn service's flow"),
                &synack.build(),
                xdp_action::PASS,
                &synack.clone().endpoints(VIP, CLIENT).build(),
                FORWARDED,
            )?;
            let ack = Packet::tcp(CLIENT, VIP, TCP_ACK).seq_ack(1001, 5001);
            edge.expect(
                &format!("{mode}: ACK of the withdrawn service's flow"),
                &ack.build(),
                xdp_action::PASS,
                &ack.clone().endpoints(via, BLUE).build(),
                FORWARDED,
            )?;
            // New flows to it are no longer ours.
            edge.expect_untouched(
                &format!("{mode}: SYN to the withdrawn VIP"),
                &Packet::tcp(client(40500), VIP, TCP_SYN).build(),
            )?;
            Ok(())
        })?;
    }
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_kept_connection_table_without_a_filter_opens_the_filter() -> Result<()> {
    use splitter::pins;
    use splitter_common::{ADDR_FILTER_DST, ADDR_FILTER_SRC, map};
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/{}-filter", run_prefix()));
    let check = || -> Result<()> {
        {
            let mut dp = Dataplane::load_pinned(&dir)?;
            dp.apply(&config("snat", 100, 0)?)?;
            ensure!(
                !dp.filter_has(ADDR_FILTER_DST, *OTHER.ip())?,
                "a non-VIP address is in the filter"
            );
        }
        // As if the table had been kept by a build without the filter.
        std::fs::remove_file(dir.join(map::ADDR_FILTER))?;
        let dp = Dataplane::load_pinned(&dir)?;
        ensure!(
            dp.reused(),
            "the pinned connection table was not taken over"
        );
        ensure!(
            dp.filter_has(ADDR_FILTER_DST, *OTHER.ip())?
                && dp.filter_has(ADDR_FILTER_SRC, *CLIENT.ip())?,
            "the filter was not opened for the kept table's flows"
        );
        Ok(())
    };
    let r = check();
    pins::remove_all(&dir)?;
    r
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_snat_port_in_the_backends_time_wait_is_not_reused_while_others_are_free() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        // A connection that opens and closes (FIN both ways).
        let a = client(41000);
        let (r, _) = edge.run(&Packet::tcp(a, VIP, TCP_SYN).build())?;
        let port = snat_source(&r.data)?;
        edge.run(
            &Packet::tcp(BLUE, port, TCP_SYN | TCP_ACK)
                .seq_ack(5000, 1001)
                .macs(EDGE_MAC, [2, 0, 0, 0, 0, 2])
                .build(),
        )?;
        edge.run(
            &Packet::tcp(a, VIP, TCP_FIN | TCP_ACK)
                .seq_ack(1001, 5001)
                .build(),
        )?;
        edge.run(
            &Packet::tcp(BLUE, port, TCP_FIN | TCP_ACK)
                .seq_ack(5001, 1002)
                .macs(EDGE_MAC, [2, 0, 0, 0, 0, 2])
                .build(),
        )?;
        // Past the 1 s after which a closed flow's port may be reused, but
        // well inside the backend's 60 s TIME_WAIT.
        std::thread::sleep(std::time::Duration::from_millis(1300));
        // A new client connection whose probe starts at that very port.
        let b = clients_probing_from(port.port(), 41001)
            .next()
            .context("no client port probes from that SNAT port")?;
        let (r, _) = edge.run(&Packet::tcp(b, VIP, TCP_SYN).build())?;
        let got = snat_source(&r.data)?;
        ensure!(
            got.port() != port.port(),
            "{b} got SNAT port {} although its flow from {a} closed 1.3 s ago (TIME_WAIT at the backend) and the next port was free",
            got.port()
        );
        Ok(())
    })
}

/// TCP options as Linux sends them on a SYN (MSS, SACK permitted,
/// timestamps, no-op, window scale) with timestamp value `tsval`.
fn syn_options(tsval: u32) -> Vec<u8> {
    let mut o = vec![2, 4, 0x05, 0xb4, 4, 2, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&[0, 0, 0, 0, 1, 3, 3, 7]);
    o
}

/// TCP options as Linux sends them after the SYN (two no-ops, timestamps).
fn ts_options(tsval: u32, tsecr: u32) -> Vec<u8> {
    let mut o = vec![1, 1, 8, 10];
    o.extend_from_slice(&tsval.to_be_bytes());
    o.extend_from_slice(&tsecr.to_be_bytes());
    o
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_snat_port_in_time_wait_is_reused_only_by_a_syn_with_a_newer_timestamp() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        // A connection with timestamps that the backend closes first (so the
        // backend holds it in TIME_WAIT); the client's FIN has TSval 50000.
        let a = client(42000);
        let (r, _) = edge.run(
            &Packet::tcp(a, VIP, TCP_SYN)
                .tcp_options(&syn_options(40000))
                .build(),
        )?;
        let port = snat_source(&r.data)?;
        let from_blue = |flags: u8, seq: u32, ack: u32, tsval: u32, tsecr: u32| {
            Packet::tcp(BLUE, port, flags)
                .seq_ack(seq, ack)
                .tcp_options(&ts_options(tsval, tsecr))
                .macs(EDGE_MAC, [2, 0, 0, 0, 0, 2])
                .build()
        };
        edge.run(&from_blue(TCP_SYN | TCP_ACK, 5000, 1001, 7000, 40000))?;
        edge.run(&from_blue(TCP_FIN | TCP_ACK, 5001, 1001, 7100, 40000))?;
        edge.run(
            &Packet::tcp(a, VIP, TCP_FIN | TCP_ACK)
                .seq_ack(1001, 5002)
                .tcp_options(&ts_options(50000, 7100))
                .build(),
        )?;
        std::thread::sleep(std::time::Duration::from_millis(1300));
        // Two new clients whose probes start at that port.
        let mut starting_there = clients_probing_from(port.port(), 42001);
        let older = starting_there
            .next()
            .context("no client port probes from that port")?;
        let newer = starting_there
            .next()
            .context("no second client port probes from that port")?;
        // An older timestamp would be refused by the backend (PAWS): another port.
        let (r, _) = edge.run(
            &Packet::tcp(older, VIP, TCP_SYN)
                .tcp_options(&syn_options(49000))
                .build(),
        )?;
        let got = snat_source(&r.data)?;
        ensure!(
            got.port() != port.port(),
            "{older} (TSval 49000) got SNAT port {} whose last flow's FIN had TSval 50000",
            got.port()
        );
        // A newer one is accepted: the port is taken at once.
        let (r, _) = edge.run(
            &Packet::tcp(newer, VIP, TCP_SYN)
                .tcp_options(&syn_options(51000))
                .build(),
        )?;
        let got = snat_source(&r.data)?;
        ensure!(
            got.port() == port.port(),
            "{newer} (TSval 51000) got SNAT port {} instead of {} (last FIN TSval 50000, so the backend accepts it)",
            got.port(),
            port.port()
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_mirrored_tcp_flow_goes_to_the_tee_only_while_it_listens() -> Result<()> {
    in_netns(|| {
        // web mirrors every new flow to green (weight 0), read_only.
        let text = format!(
            "[dataplane]\ninterface = \"lo\"\nmode = \"snat\"\nsnat_address = \"{SNAT_IP}\"\n\n\
             [[service]]\nname = \"web\"\nvip = \"{VIP}\"\nprotocol = \"tcp\"\nread_only = true\n\n\
             [[service.version]]\nname = \"blue\"\nweight = 100\nbackends = [\"{BLUE}\"]\n\n\
             [[service.version]]\nname = \"green\"\nweight = 0\nbackends = [\"{GREEN}\"]\n\n\
             [service.shadow]\nversion = \"green\"\npercent = 100\n"
        );
        let config = Config::parse(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        let edge = Edge::with_config(&config)?;
        let id = edge.dp.service_id("web").context("no id for web")?;
        let (conns, alive) = edge.dp.tee_fds()?;
        let mut tee = splitter::tee::TeeMaps::open(conns, alive)?;

        // No tee listens: the flow stays on the fast path.
        let first = client(41000);
        let syn = Packet::tcp(first, VIP, TCP_SYN);
        let (r, deltas) = edge.run(&syn.build())?;
        let snat = snat_source(&r.data)?;
        check(
            "SYN, no tee",
            &r,
            &deltas,
            xdp_action::PASS,
            &syn.clone().endpoints(snat, BLUE).build(),
            FORWARDED_NEW,
        )?;

        // A tee listens: the new flow is handed to the edge's stack as it
        // came, with the backend it was given in its entry.
        tee.set_alive(id, u64::MAX)?;
        let second = client(41001);
        let syn = Packet::tcp(second, VIP, TCP_SYN).build();
        let entries = edge.entries()?;
        edge.expect(
            "SYN, tee listening",
            &syn,
            xdp_action::PASS,
            &syn,
            &[("new_flow", 1), ("shadow_tee_flows", 1)],
        )?;
        // The forward entry only: the tee's own connections leave from the
        // edge, and nothing of the backend's comes back through the flow.
        ensure!(
            edge.entries()? == entries + 1,
            "the tee's flow made {} entries, not 1",
            edge.entries()? - entries
        );
        let conn = edge
            .dp
            .conn(second, VIP, 6)?
            .context("no entry for the tee's flow")?;
        ensure!(
            conn.flags == splitter_common::CONN_F_LOCAL
                && conn.new_addr[0] == u32::from(*BLUE.ip()).to_be()
                && conn.new_port == BLUE.port().to_be()
                && conn.state == splitter_common::TCP_SYN | splitter_common::TCP_ESTABLISHED,
            "the tee's entry: {conn:?}"
        );
        // Its later packets pass untouched too, and count for blue.
        let data = Packet::tcp(second, VIP, TCP_ACK | TCP_PSH)
            .seq_ack(1001, 5001)
            .payload(b"GET / HTTP/1.1\r\n\r\n")
            .build();
        edge.expect("data to the tee", &data, xdp_action::PASS, &data, &[])?;
        let fin = Packet::tcp(second, VIP, TCP_FIN | TCP_ACK).build();
        edge.expect("FIN to the tee", &fin, xdp_action::PASS, &fin, &[])?;
        let conn = edge.dp.conn(second, VIP, 6)?.context("entry gone")?;
        ensure!(
            conn.state & splitter_common::TCP_FIN_CLIENT != 0,
            "the client's FIN is not in the entry: {conn:?}"
        );
        let [new_flows, packets, ..] = edge.stats("web", "blue", BLUE)?;
        ensure!(
            new_flows == 2 && packets == 4,
            "blue's stats: {new_flows} flows, {packets} packets"
        );

        // The tee stopped: new flows are on the fast path again.
        tee.set_alive(id, 0)?;
        let third = Packet::tcp(client(41002), VIP, TCP_SYN);
        let (r, deltas) = edge.run(&third.build())?;
        let snat = snat_source(&r.data)?;
        check(
            "SYN, tee stopped",
            &r,
            &deltas,
            xdp_action::PASS,
            &third.clone().endpoints(snat, BLUE).build(),
            FORWARDED_NEW,
        )?;
        Ok(())
    })
}

/// The config with `connect_timeout_ms` set on both services.
fn config_with_timeout(mode: &str, connect_timeout_ms: u32) -> Result<Config> {
    let mut c = config(mode, 100, 0)?;
    for s in &mut c.services {
        s.connect_timeout_ms = connect_timeout_ms;
    }
    c.validate()?;
    Ok(c)
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn handshake_outcomes_are_counted_once_per_flow() -> Result<()> {
    in_netns(|| {
        let edge = Edge::new("snat", 100, 0)?;
        let sig = || edge.signals("web", "blue", BLUE);

        // SYN: one attempt, nothing else yet; a retransmit is no new attempt.
        let c1 = client(41000);
        let syn = Packet::tcp(c1, VIP, TCP_SYN);
        let (r, _) = edge.run(&syn.build())?;
        let snat1 = snat_source(&r.data)?;
        edge.run(&syn.build())?;
        assert_eq!(
            sig()?,
            [1, 0, 0, 0, 0, 0, 0],
            "after SYN and its retransmit"
        );

        // SYN-ACK: established, one latency sample; a repeated SYN-ACK adds nothing.
        let synack = Packet::tcp(BLUE, snat1, TCP_SYN | TCP_ACK).seq_ack(5000, 1001);
        edge.run(&synack.build())?;
        edge.run(&synack.build())?;
        assert_eq!(sig()?, [1, 1, 0, 0, 0, 0, 1], "after the SYN-ACK");
        let lat = edge.dp.backend_counters("web", "blue", BLUE)?;
        ensure!(
            lat.latency_sum_us < 1_000_000,
            "a BPF_PROG_TEST_RUN handshake took {} us",
            lat.latency_sum_us
        );

        // The backend resets the established flow: reset_by_backend, once.
        let rst = Packet::tcp(BLUE, snat1, TCP_RST | TCP_ACK).seq_ack(5001, 1001);
        edge.run(&rst.build())?;
        edge.run(&rst.build())?;
        assert_eq!(sig()?, [1, 1, 0, 0, 1, 0, 1], "after the backend's RST");

        // A second flow refused: RST to the SYN.
        let c2 = client(41001);
        let (r, _) = edge.run(&Packet::tcp(c2, VIP, TCP_SYN).build())?;
        let snat2 = snat_source(&r.data)?;
        edge.run(
            &Packet::tcp(BLUE, snat2, TCP_RST | TCP_ACK)
                .seq_ack(0, 1001)
                .build(),
        )?;
        assert_eq!(sig()?, [2, 1, 1, 0, 1, 0, 1], "after a refused SYN");

        // A third flow established, then reset by the client: counted apart.
        let c3 = client(41002);
        let (r, _) = edge.run(&Packet::tcp(c3, VIP, TCP_SYN).build())?;
        let snat3 = snat_source(&r.data)?;
        edge.run(
            &Packet::tcp(BLUE, snat3, TCP_SYN | TCP_ACK)
                .seq_ack(7000, 1001)
                .build(),
        )?;
        edge.run(
            &Packet::tcp(c3, VIP, TCP_RST | TCP_ACK)
                .seq_ack(1001, 7001)
                .build(),
        )?;
        // The backend's answering RST is not the backend's doing.
        edge.run(&Packet::tcp(BLUE, snat3, TCP_RST).seq_ack(7001, 0).build())?;
        assert_eq!(sig()?, [3, 2, 1, 0, 1, 1, 2], "after a client's RST");

        // Nothing was counted for the other version's backend.
        assert_eq!(edge.signals("web", "green", GREEN)?, [0; 7]);
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_missed_connect_deadline_is_one_timeout_however_it_is_noticed() -> Result<()> {
    in_netns(|| {
        let edge = Edge::with_config(&config_with_timeout("snat", 100)?)?;
        let sig = || edge.signals("web", "blue", BLUE);
        let pause = || std::thread::sleep(std::time::Duration::from_millis(180));

        // Noticed on the client's SYN retransmit after the deadline: one
        // timeout, and a second retransmit adds none. The SYN-ACK that
        // finally comes is an established connection too (a slow one).
        let c1 = client(42000);
        let syn = Packet::tcp(c1, VIP, TCP_SYN);
        let (r, _) = edge.run(&syn.build())?;
        let snat1 = snat_source(&r.data)?;
        edge.run(&syn.build())?;
        assert_eq!(
            sig()?,
            [1, 0, 0, 0, 0, 0, 0],
            "a retransmit within the deadline"
        );
        pause();
        edge.run(&syn.build())?;
        assert_eq!(
            sig()?,
            [1, 0, 0, 1, 0, 0, 0],
            "a retransmit past the deadline"
        );
        pause();
        edge.run(&syn.build())?;
        assert_eq!(sig()?, [1, 0, 0, 1, 0, 0, 0], "another retransmit");
        edge.run(
            &Packet::tcp(BLUE, snat1, TCP_SYN | TCP_ACK)
                .seq_ack(9000, 1001)
                .build(),
        )?;
        let [.., latency] = sig()?;
        assert_eq!(sig()?, [1, 1, 0, 1, 0, 0, 1], "the late SYN-ACK");
        assert_eq!(latency, 1);
        let c = edge.dp.backend_counters("web", "blue", BLUE)?;
        ensure!(
            c.latency_sum_us >= 300_000,
            "the late SYN-ACK came {} us after the SYN, expected >= 300 ms",
            c.latency_sum_us
        );

        // Noticed on the backend's late RST: a timeout, not a refusal.
        let c2 = client(42001);
        let (r, _) = edge.run(&Packet::tcp(c2, VIP, TCP_SYN).build())?;
        let snat2 = snat_source(&r.data)?;
        pause();
        edge.run(
            &Packet::tcp(BLUE, snat2, TCP_RST | TCP_ACK)
                .seq_ack(0, 1001)
                .build(),
        )?;
        assert_eq!(sig()?, [2, 1, 0, 2, 0, 0, 1], "a RST past the deadline");

        // UDP: a flow answered in time, and one never answered, noticed on
        // the client's next datagram past the deadline.
        let usig = || edge.signals("dns", "blue", UDP_BLUE);
        let (r, _) = edge.run(&Packet::udp(client(5300), UDP_VIP, b"q1").build())?;
        let usnat = snat_source(&r.data)?;
        edge.run(&Packet::udp(UDP_BLUE, usnat, b"a1").build())?;
        edge.run(&Packet::udp(UDP_BLUE, usnat, b"a1 again").build())?;
        assert_eq!(usig()?, [1, 1, 0, 0, 0, 0, 1], "an answered UDP flow");
        let q2 = Packet::udp(client(5301), UDP_VIP, b"q2");
        edge.run(&q2.build())?;
        edge.run(&q2.build())?;
        assert_eq!(
            usig()?,
            [2, 1, 0, 0, 0, 0, 1],
            "an unanswered flow within the deadline"
        );
        pause();
        edge.run(&q2.build())?;
        edge.run(&q2.build())?;
        assert_eq!(
            usig()?,
            [2, 1, 0, 1, 0, 0, 1],
            "an unanswered flow past the deadline"
        );
        Ok(())
    })
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn the_sweep_counts_silent_missed_deadlines_once_and_the_program_agrees() -> Result<()> {
    in_netns(|| {
        let edge = Edge::with_config(&config_with_timeout("snat", 100)?)?;
        let mut walker = splitter::dataplane::TableWalker::new(&edge.dp)?;
        let sig = || edge.signals("web", "blue", BLUE);
        let usig = || edge.signals("dns", "blue", UDP_BLUE);
        let now = splitter::dataplane::monotonic_ns;

        // A TCP attempt and a one-datagram UDP flow that never hear back,
        // and a TCP flow that is answered in time.
        let syn = Packet::tcp(client(43000), VIP, TCP_SYN);
        edge.run(&syn.build())?;
        edge.run(&Packet::udp(client(5400), UDP_VIP, b"one shot").build())?;
        let (r, _) = edge.run(&Packet::tcp(client(43001), VIP, TCP_SYN).build())?;
        let snat = snat_source(&r.data)?;
        edge.run(
            &Packet::tcp(BLUE, snat, TCP_SYN | TCP_ACK)
                .seq_ack(1, 1001)
                .build(),
        )?;

        // Within the deadline the sweep counts nothing.
        let live = walker.walk(now())?;
        ensure!(
            live.values().sum::<u64>() == 3,
            "live flows {live:?}, expected 3"
        );
        assert_eq!(sig()?, [2, 1, 0, 0, 0, 0, 1], "before the deadline");
        assert_eq!(usig()?, [1, 0, 0, 0, 0, 0, 0], "before the deadline");

        // Past it, one walk counts each silent flow once; a second walk
        // and the client's late retransmit add nothing.
        std::thread::sleep(std::time::Duration::from_millis(180));
        walker.walk(now())?;
        assert_eq!(sig()?, [2, 1, 0, 1, 0, 0, 1], "after the sweep");
        assert_eq!(usig()?, [1, 0, 0, 1, 0, 0, 0], "after the sweep");
        walker.walk(now())?;
        edge.run(&syn.build())?;
        assert_eq!(
            sig()?,
            [2, 1, 0, 1, 0, 0, 1],
            "after a second sweep and a retransmit"
        );
        assert_eq!(usig()?, [1, 0, 0, 1, 0, 0, 0], "after a second sweep");
        Ok(())
    })
}
