//! The packet fuzzer's pure half: a seeded generator of frames (valid TCP,
//! UDP, ICMP, IPv6 and ARP frames, to a VIP and not, on established flows'
//! tuples, then truncated, bit-flipped, re-headered and VLAN-tagged) and
//! the oracle that judges what the kernel program did with each one.
//!
//! The oracle knows only the documented behaviour (the counter meanings
//! of `splitter_common::counter` and docs/operations.md, the XDP actions)
//! and the addresses the configuration makes interesting ([`World`]),
//! never the program's internals, so it can judge any later version of the
//! program too:
//! - the action is `XDP_PASS`, `XDP_DROP`, `XDP_TX` or `XDP_REDIRECT`,
//!   never `XDP_ABORTED`;
//! - the counters moved consistently with it: a drop moved exactly one
//!   `drop_*` counter, `XDP_TX` moved `tx`, `XDP_REDIRECT` `redirect`, a
//!   pass at most one `pass_*` counter, and `new_flow` only beside a
//!   forwarding outcome (or `drop_unroutable`), each by exactly one;
//! - a pass that moved no counter, or moved `pass_ttl`, left the frame
//!   byte for byte as it came;
//! - a frame that no service or flow can hold (its IPv4 addresses are
//!   none of the [`World`]'s, or it is not IPv4 at all) passes untouched
//!   and moves nothing; one whose IPv4 header is broken is passed untouched
//!   or dropped as `drop_truncated_ip`/`drop_bad_ihl`;
//! - a well-formed frame with correct checksums that comes out rewritten
//!   still has correct checksums, and one the program sends on itself
//!   (`XDP_TX`, `XDP_REDIRECT`) has its TTL one lower.
//!
//! Everything comes from one `u64` seed ([`Generator::new`]), so a failure
//! replays from the seed and the frame index.
//!
//! ```
//! use splitter_tests::fuzz::{Generator, World};
//! let world = World::example();
//! let mut g = Generator::new(7, world.clone());
//! let a: Vec<Vec<u8>> = (0..100).map(|_| g.frame()).collect();
//! let mut g = Generator::new(7, world);
//! let b: Vec<Vec<u8>> = (0..100).map(|_| g.frame()).collect();
//! assert_eq!(a, b);
//! ```
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
};

use crate::{
    packet::{
        CLIENT_MAC, ETH_LEN, ETH_P_ARP, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP, IPV4_LEN, Packet,
        TCP_ACK, TCP_FIN, TCP_PSH, TCP_RST, TCP_SYN, arp_request, internet_checksum,
        verify_checksums,
    },
    testrun::xdp_action,
};

/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ) service tag.
pub const ETH_P_8021AD: u16 = 0x88a8;
/// Shortest frame `BPF_PROG_TEST_RUN` accepts for XDP (an Ethernet header).
pub const MIN_FRAME: usize = ETH_LEN;
/// ICMP.
pub const IPPROTO_ICMP: u8 = 1;

/// The addresses a configuration makes interesting: what the program may
/// take as its own. Anything else must pass untouched.
#[derive(Clone, Debug)]
pub struct World {
    /// Every service: its VIP and protocol.
    pub services: Vec<(SocketAddrV4, u8)>,
    /// Backends of every service (with the service's protocol).
    pub backends: Vec<(SocketAddrV4, u8)>,
    /// The SNAT source address (SNAT mode), a destination of interest.
    pub snat: Option<Ipv4Addr>,
    /// DNAT mode: backends' replies come from their own addresses, so
    /// those are sources of interest.
    pub dnat: bool,
    /// Client addresses the generator sends from.
    pub clients: Vec<Ipv4Addr>,
    /// Addresses that are no VIP, SNAT address or backend.
    pub others: Vec<Ipv4Addr>,
    /// IPv6 VIPs (none today: the program passes every IPv6 frame).
    pub services_v6: Vec<Ipv6Addr>,
}

impl World {
    /// A small world for examples and host tests: TCP `10.0.0.10:80`, UDP
    /// `10.0.0.53:53`, SNAT address `10.0.2.1`.
    pub fn example() -> Self {
        let a = |s: &str| {
            s.parse::<SocketAddrV4>()
                .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        };
        Self {
            services: vec![
                (a("10.0.0.10:80"), IPPROTO_TCP),
                (a("10.0.0.53:53"), IPPROTO_UDP),
            ],
            backends: vec![
                (a("10.0.2.2:8080"), IPPROTO_TCP),
                (a("10.0.2.2:5353"), IPPROTO_UDP),
            ],
            snat: Some(Ipv4Addr::new(10, 0, 2, 1)),
            dnat: false,
            clients: vec![Ipv4Addr::new(10, 0, 1, 2)],
            others: vec![Ipv4Addr::new(10, 0, 0, 11), Ipv4Addr::new(192, 0, 2, 1)],
            services_v6: Vec::new(),
        }
    }

    /// Can an IPv4 packet from `src` to `dst` belong to any service or flow?
    /// To a VIP or the SNAT address, or (DNAT mode) from a backend.
    pub fn may_hold(&self, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
        self.services.iter().any(|(v, _)| *v.ip() == dst)
            || self.snat == Some(dst)
            || (self.dnat && self.backends.iter().any(|(b, _)| *b.ip() == src))
    }
}

/// A flow's two tuples as they arrive at the edge: the client's
/// (client -> VIP) and the backend's reply (backend -> SNAT address or
/// client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowTuples {
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Client -> VIP.
    pub forward: (SocketAddrV4, SocketAddrV4),
    /// Backend -> edge (SNAT) or client (DNAT).
    pub reverse: (SocketAddrV4, SocketAddrV4),
}

impl FlowTuples {
    /// The tuple a packet of this flow carries once the program rewrote it
    /// (`splitter_common::Conn`'s documented rewrite): the client's packet
    /// leaves as the backend's reply tuple turned round (SNAT address or
    /// client -> backend), the backend's as VIP -> client. `None` for a
    /// packet of another tuple.
    pub fn rewritten(&self, t: &Touch) -> Option<(SocketAddrV4, SocketAddrV4)> {
        if t.proto != self.proto {
            None
        } else if (t.src, t.dst) == self.forward {
            Some((self.reverse.1, self.reverse.0))
        } else if (t.src, t.dst) == self.reverse {
            Some((self.forward.1, self.forward.0))
        } else {
            None
        }
    }
}

/// The transport fields of a frame wherever they sit: under any number of
/// VLAN tags, after any IPv4 options, fragment or not. What a program that
/// parses more than today's could still read as a flow's packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Touch {
    /// IP protocol.
    pub proto: u8,
    /// Source.
    pub src: SocketAddrV4,
    /// Destination.
    pub dst: SocketAddrV4,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
}

impl Touch {
    /// The frame's tuple, read as generously as any parser could.
    pub fn of(frame: &[u8]) -> Option<Self> {
        let ip = ipv4_start(frame)?;
        let h = frame.get(ip..ip + IPV4_LEN)?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        let proto = h[9];
        if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
            return None;
        }
        let l4 = frame.get(ip + ihl.max(IPV4_LEN)..)?;
        if l4.len() < 4 {
            return None;
        }
        let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
        let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
        let tcp_flags = if proto == IPPROTO_TCP {
            l4.get(13).copied().unwrap_or(0)
        } else {
            0
        };
        Some(Self {
            proto,
            src: SocketAddrV4::new(src, u16::from_be_bytes([l4[0], l4[1]])),
            dst: SocketAddrV4::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
            tcp_flags,
        })
    }

    /// Could this frame end the flow (a FIN or RST on one of its TCP
    /// tuples), after which a SYN may legitimately start a new flow on the
    /// tuple? A UDP flow ends only by idling past its timeout, never by a
    /// frame.
    pub fn may_end(&self, flow: &FlowTuples) -> bool {
        self.proto == IPPROTO_TCP
            && flow.proto == IPPROTO_TCP
            && ((self.src, self.dst) == flow.forward || (self.src, self.dst) == flow.reverse)
            && self.tcp_flags & (TCP_FIN | TCP_RST) != 0
    }
}

/// Offset of the IPv4 header under any VLAN tags, if the frame carries
/// IPv4 (EtherType 0x0800 after 0, 1 or more 802.1Q/802.1ad tags).
fn ipv4_start(frame: &[u8]) -> Option<usize> {
    let mut off = 12;
    loop {
        let t = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        match t {
            ETH_P_IP => return Some(off + 2),
            ETH_P_8021Q | ETH_P_8021AD if off < 12 + 4 * 8 => off += 4,
            _ => return None,
        }
    }
}

/// How the oracle sees a frame before the program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// No service or flow can hold it: it must pass untouched, counting
    /// nothing.
    NotOurs,
    /// An IPv4 frame whose header is broken (shorter than 20 bytes, IHL
    /// below 5 or past the frame, version not 4; or, not to any service, a
    /// total length below the header or past the frame): passed untouched,
    /// or dropped as `drop_truncated_ip`/`drop_bad_ihl`.
    BrokenIp,
    /// It may be ours: only the general rules apply.
    MaybeOurs,
}

/// Classifies `frame` against `world`.
pub fn classify(frame: &[u8], world: &World) -> Class {
    let et = u16::from_be_bytes([frame[12], frame[13]]);
    if et == ETH_P_IPV6 {
        let dst = frame
            .get(ETH_LEN + 24..ETH_LEN + 40)
            .and_then(|d| <[u8; 16]>::try_from(d).ok());
        return match dst {
            Some(d) if world.services_v6.contains(&Ipv6Addr::from(d)) => Class::MaybeOurs,
            _ => Class::NotOurs,
        };
    }
    let Some(ip) = ipv4_start(frame) else {
        if et == ETH_P_8021Q || et == ETH_P_8021AD {
            // Tags nested deeper than `ipv4_start` looks: nothing to say.
            return Class::MaybeOurs;
        }
        return Class::NotOurs;
    };
    let h = &frame[ip..];
    let broken_header = h.len() < IPV4_LEN || {
        let ihl = usize::from(h[0] & 0x0f) * 4;
        h[0] >> 4 != 4 || ihl < IPV4_LEN || ihl > h.len()
    };
    if broken_header {
        return Class::BrokenIp;
    }
    let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
    let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
    if world.may_hold(src, dst) {
        return Class::MaybeOurs;
    }
    // Not ours by its addresses; a total length that disagrees with the
    // frame makes it a broken header a later program may drop as such.
    let ihl = usize::from(h[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if tot < ihl || tot > h.len() {
        Class::BrokenIp
    } else {
        Class::NotOurs
    }
}

/// Counters that may move beside `new_flow` (the flow is made, then the
/// route decides): every forwarding outcome, and an unroutable backend.
const WITH_NEW_FLOW: [&str; 6] = [
    "tx",
    "redirect",
    "pass_ttl",
    "pass_no_neigh",
    "pass_fib_other",
    "drop_unroutable",
];

/// Counters that only ever move beside an outcome counter, never alone.
pub const COMPANIONS: [&str; 4] = [
    "new_flow",
    "new_flow_targeted",
    "shadow_skipped",
    "shadow_tee_flows",
];

/// Counters that are an outcome of their own without a `drop_`/`pass_`
/// prefix.
pub const OUTCOMES: [&str; 4] = ["tx", "redirect", "shadow_copies", "shadow_reply_dropped"];

/// Counters the XDP program never moves (the tc program's).
pub const NOT_XDP: [&str; 1] = ["shadow_cloned"];

/// Judges one run: `action` and `output` for `input`, and the counters that
/// moved (`deltas`, name -> increase, only those that moved). `Err` says
/// what broke the documented behaviour.
pub fn judge(
    class: Class,
    input: &[u8],
    action: u32,
    output: &[u8],
    deltas: &BTreeMap<&str, u64>,
) -> Result<(), String> {
    use xdp_action::{DROP, PASS, REDIRECT, TX};
    if ![PASS, DROP, TX, REDIRECT].contains(&action) {
        return Err(format!("action {} ({action})", xdp_action::name(action)));
    }
    if let Some((k, v)) = deltas.iter().find(|(_, v)| **v != 1) {
        return Err(format!("counter {k} moved by {v} for one frame"));
    }
    let new_flow = deltas.contains_key("new_flow");
    // Companions: a rule chose the new flow's version (only with
    // `new_flow`), a datagram to mirror went on uncopied (beside its own
    // outcome).
    if deltas.contains_key("new_flow_targeted") && !new_flow {
        return Err(format!("new_flow_targeted without new_flow: {deltas:?}"));
    }
    // A mirrored TCP flow handed to the edge's tee: made (new_flow) and
    // passed exactly as it came (docs/architecture.md, the tee).
    let tee = deltas.contains_key("shadow_tee_flows");
    if tee && !new_flow {
        return Err(format!("shadow_tee_flows without new_flow: {deltas:?}"));
    }
    if deltas.contains_key("shadow_cloned") {
        return Err("shadow_cloned moved in the XDP program (only tc clones)".into());
    }
    let outcomes: Vec<&str> = deltas
        .keys()
        .copied()
        .filter(|k| !COMPANIONS.contains(k))
        .collect();
    let untouched = output == input;
    if tee && !(action == PASS && outcomes.is_empty() && untouched) {
        return Err(format!(
            "a flow handed to the tee was not passed as it came: {} with counters {deltas:?}{}",
            xdp_action::name(action),
            if untouched { "" } else { ", frame changed" }
        ));
    }
    match (action, outcomes.as_slice()) {
        (DROP, [d]) if d.starts_with("drop_") => {}
        (TX, ["tx"]) | (REDIRECT, ["redirect"]) => {}
        (PASS, []) if tee => {}
        (PASS, []) if !new_flow => {
            if !untouched {
                return Err("XDP_PASS counting nothing, but the frame was changed".into());
            }
        }
        (PASS, ["pass_ttl"]) => {
            if !untouched {
                return Err("XDP_PASS with pass_ttl, but the frame was changed".into());
            }
        }
        (PASS, [p]) if p.starts_with("pass_") => {}
        // Rewritten to its stable backend and passed for the tc program to
        // copy (docs/architecture.md, shadow traffic).
        (PASS, ["shadow_copies"]) => {}
        (DROP, ["shadow_reply_dropped"]) => {}
        _ => {
            return Err(format!(
                "{} with counters {deltas:?}",
                xdp_action::name(action)
            ));
        }
    }
    if new_flow
        && !outcomes
            .iter()
            .all(|o| WITH_NEW_FLOW.contains(o) || *o == "shadow_copies")
    {
        return Err(format!("new_flow beside {outcomes:?}"));
    }
    // Forwarded by the program itself: the TTL goes down by one
    // (docs/architecture.md, the forwarding path).
    if (action == TX || action == REDIRECT)
        && let (Some(i), Some(o)) = (ttl(input), ttl(output))
        && o != i.wrapping_sub(1)
    {
        return Err(format!("forwarded with TTL {o}, came with {i}"));
    }
    match class {
        Class::NotOurs if !(action == PASS && untouched && deltas.is_empty()) => Err(format!(
            "a frame no service can hold: {} (frame {}), counters {deltas:?}",
            xdp_action::name(action),
            if untouched { "untouched" } else { "changed" }
        )),
        Class::BrokenIp => match (action, outcomes.as_slice()) {
            (PASS, []) if untouched => Ok(()),
            (DROP, ["drop_truncated_ip" | "drop_bad_ihl"]) if !new_flow => Ok(()),
            _ => Err(format!(
                "a broken IPv4 header: {} with counters {deltas:?}",
                xdp_action::name(action)
            )),
        },
        _ => {
            if !untouched
                && action != DROP
                && verify_checksums(input).is_ok()
                && let Err(e) = verify_checksums(output)
            {
                return Err(format!("rewritten frame with a bad checksum: {e}"));
            }
            Ok(())
        }
    }
}

/// The IPv4 TTL of a frame (under any VLAN tags), if it has a header.
fn ttl(frame: &[u8]) -> Option<u8> {
    let ip = ipv4_start(frame)?;
    frame.get(ip..ip + IPV4_LEN).map(|h| h[8])
}

/// A frame as hex, 32 bytes a line, for failure reports.
pub fn hex(frame: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in frame.chunks(32).enumerate() {
        let _ = write!(s, "{:04x}:", i * 32);
        for b in chunk {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}

/// The seeded frame generator.
pub struct Generator {
    rng: fastrand::Rng,
    world: World,
    flows: Vec<FlowTuples>,
}

impl Generator {
    /// A generator whose every frame follows from `seed`.
    pub fn new(seed: u64, world: World) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            world,
            flows: Vec::new(),
        }
    }

    /// The established flows whose tuples frames may be aimed at.
    pub fn set_flows(&mut self, flows: Vec<FlowTuples>) {
        self.flows = flows;
    }

    /// A client address and an ephemeral port.
    fn client(&mut self) -> SocketAddrV4 {
        let ip = pick(&mut self.rng, &self.world.clients).unwrap_or(Ipv4Addr::new(10, 0, 1, 2));
        SocketAddrV4::new(ip, self.rng.u16(1024..))
    }

    /// An address that is no VIP, with a port that is sometimes a VIP's.
    fn other(&mut self) -> SocketAddrV4 {
        let ip = pick(&mut self.rng, &self.world.others).unwrap_or(Ipv4Addr::new(192, 0, 2, 1));
        let port = if self.rng.bool() {
            pick(&mut self.rng, &self.world.services).map_or(80, |(v, _)| v.port())
        } else {
            self.rng.u16(..)
        };
        SocketAddrV4::new(ip, port)
    }

    /// Random TCP flags: mostly the handshake's and teardown's.
    fn tcp_flags(&mut self) -> u8 {
        pick(
            &mut self.rng,
            &[
                TCP_SYN,
                TCP_SYN | TCP_ACK,
                TCP_ACK,
                TCP_ACK | TCP_PSH,
                TCP_FIN | TCP_ACK,
                TCP_RST,
                TCP_RST | TCP_ACK,
                TCP_SYN | TCP_FIN,
                0,
                0xff,
            ][..],
        )
        .unwrap_or(TCP_SYN)
    }

    /// A segment of `flags` with sometimes a timestamp option and data.
    fn tcp(&mut self, src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Packet {
        let mut p = Packet::tcp(src, dst, flags).seq_ack(self.rng.u32(..), self.rng.u32(..));
        if self.rng.bool() {
            let ts = self.rng.u32(..).to_be_bytes();
            p = p.tcp_options(&[
                2, 4, 5, 0xb4, 1, 1, 8, 10, ts[0], ts[1], ts[2], ts[3], 0, 0, 0, 0,
            ]);
        }
        if self.rng.u8(..4) == 0 {
            let n = self.rng.usize(..200);
            p = p.payload(&self.bytes(n));
        }
        p
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.rng.u8(..)).collect()
    }

    /// One valid frame, before any mutation.
    pub fn base(&mut self) -> Vec<u8> {
        let w = self.world.clone();
        let tcp_vip = w
            .services
            .iter()
            .filter(|(_, p)| *p == IPPROTO_TCP)
            .map(|(v, _)| *v)
            .collect::<Vec<_>>();
        let udp_vip = w
            .services
            .iter()
            .filter(|(_, p)| *p == IPPROTO_UDP)
            .map(|(v, _)| *v)
            .collect::<Vec<_>>();
        let fallback = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);
        match self.rng.u8(..16) {
            // To a TCP VIP from a client.
            0..=3 => {
                let (c, v) = (
                    self.client(),
                    pick(&mut self.rng, &tcp_vip).unwrap_or(fallback),
                );
                let f = self.tcp_flags();
                self.tcp(c, v, f).build()
            }
            // To a UDP VIP.
            4 | 5 => {
                let (c, v) = (
                    self.client(),
                    pick(&mut self.rng, &udp_vip).unwrap_or(fallback),
                );
                let n = self.rng.usize(..64);
                let data = self.bytes(n);
                let p = Packet::udp(c, v, &data);
                if self.rng.u8(..8) == 0 {
                    p.udp_zero_checksum().build()
                } else {
                    p.build()
                }
            }
            // On an established flow's tuple, either direction.
            6..=8 if !self.flows.is_empty() => {
                let flow = pick(&mut self.rng, &self.flows).unwrap_or(self.flows[0]);
                let (s, d) = if self.rng.bool() {
                    flow.forward
                } else {
                    flow.reverse
                };
                if flow.proto == IPPROTO_TCP {
                    // Mostly data, so that most flows stay up (a FIN or RST lets
                    // a flow be replaced, and the test then skips it).
                    let f = if self.rng.u8(..16) == 0 {
                        self.tcp_flags()
                    } else {
                        TCP_ACK | TCP_PSH
                    };
                    self.tcp(s, d, f).build()
                } else {
                    let n = self.rng.usize(..64);
                    Packet::udp(s, d, &self.bytes(n)).build()
                }
            }
            // A backend to the SNAT address or a client, on a random port.
            9 => {
                let (b, proto) =
                    pick(&mut self.rng, &w.backends).unwrap_or((fallback, IPPROTO_TCP));
                let ip = match w.snat {
                    Some(s) if self.rng.bool() => s,
                    _ => *self.client().ip(),
                };
                let to = SocketAddrV4::new(ip, self.rng.u16(..));
                if proto == IPPROTO_TCP {
                    let f = self.tcp_flags();
                    self.tcp(b, to, f).build()
                } else {
                    Packet::udp(b, to, b"reply").build()
                }
            }
            // ICMP echo to a VIP or elsewhere.
            10 => {
                let dst = if self.rng.bool() {
                    pick(&mut self.rng, &w.services)
                        .map_or(fallback, |(v, _)| v)
                        .ip()
                        .to_owned()
                } else {
                    *self.other().ip()
                };
                let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
                icmp.extend(self.bytes(16));
                let c = internet_checksum(&icmp);
                icmp[2..4].copy_from_slice(&c.to_be_bytes());
                Packet::raw(*self.client().ip(), dst, IPPROTO_ICMP, &icmp).build()
            }
            // TCP/UDP not to a VIP.
            11 | 12 => {
                let (c, o) = (self.client(), self.other());
                if self.rng.bool() {
                    let f = self.tcp_flags();
                    self.tcp(c, o, f).build()
                } else {
                    Packet::udp(c, o, b"not ours").build()
                }
            }
            // IPv6 TCP or UDP.
            13 => {
                let proto = if self.rng.bool() {
                    IPPROTO_TCP
                } else {
                    IPPROTO_UDP
                };
                let n = self.rng.usize(..32);
                let payload = self.bytes(n);
                ipv6_frame(
                    "fd00::1:2".parse().unwrap_or(Ipv6Addr::LOCALHOST),
                    "fd00::10".parse().unwrap_or(Ipv6Addr::LOCALHOST),
                    proto,
                    self.rng.u16(1024..),
                    pick(&mut self.rng, &w.services).map_or(80, |(v, _)| v.port()),
                    &payload,
                )
            }
            // ARP for a VIP.
            14 => arp_request(
                CLIENT_MAC,
                *self.client().ip(),
                pick(&mut self.rng, &w.services)
                    .map_or(fallback, |(v, _)| v)
                    .ip()
                    .to_owned(),
            ),
            // Random bytes.
            _ => {
                let n = self.rng.usize(MIN_FRAME..200);
                self.bytes(n)
            }
        }
    }

    /// One fuzz frame: a [`base`](Self::base) frame with 0 to 4 mutations.
    pub fn frame(&mut self) -> Vec<u8> {
        let mut f = self.base();
        let n = match self.rng.u8(..8) {
            0 | 1 => 0,
            2..=4 => 1,
            5 | 6 => 2,
            _ => self.rng.usize(3..=4),
        };
        for _ in 0..n {
            self.mutate(&mut f);
        }
        if f.len() < MIN_FRAME {
            f.resize(MIN_FRAME, 0);
        }
        f
    }

    /// One mutation of `f` (the IPv4 header is assumed at offset 14; where
    /// it is not, the bytes there are mangled all the same).
    pub fn mutate(&mut self, f: &mut Vec<u8>) {
        const IP: usize = ETH_LEN;
        match self.rng.u8(..14) {
            // Cut anywhere.
            0 | 1 => {
                let len = self.rng.usize(MIN_FRAME..=f.len().max(MIN_FRAME));
                f.truncate(len);
            }
            // Flip a few bits.
            2 | 3 => {
                for _ in 0..self.rng.usize(1..=4) {
                    if !f.is_empty() {
                        let i = self.rng.usize(..f.len());
                        f[i] ^= 1 << self.rng.u8(..8);
                    }
                }
            }
            // Flip a bit in the headers (where it matters most).
            4 => {
                let end = f.len().min(IP + 40);
                if end > 0 {
                    let i = self.rng.usize(..end);
                    f[i] ^= 1 << self.rng.u8(..8);
                }
            }
            // IHL.
            5 => set(f, IP, |b| (b & 0xf0) | rng_u8(&mut self.rng, 16)),
            // Total length.
            6 => {
                let v = self.rng.u16(..).to_be_bytes();
                set(f, IP + 2, |_| v[0]);
                set(f, IP + 3, |_| v[1]);
            }
            // Fragment bits and offset.
            7 => {
                let v = self.rng.u16(..) & 0x3fff | if self.rng.bool() { 0x4000 } else { 0 };
                let v = v.to_be_bytes();
                set(f, IP + 6, |_| v[0]);
                set(f, IP + 7, |_| v[1]);
            }
            // IP options inserted, IHL raised to match (or not).
            8 => {
                let words = self.rng.usize(1..=10);
                if f.len() >= IP + IPV4_LEN {
                    let opts = self.bytes(words * 4);
                    f.splice(IP + IPV4_LEN..IP + IPV4_LEN, opts);
                    let fix = self.rng.bool();
                    set(f, IP, |b| {
                        if fix {
                            (b & 0xf0) | (5 + words as u8).min(15)
                        } else {
                            b
                        }
                    });
                }
            }
            // A VLAN tag (sometimes a QinQ pair).
            9 => {
                let tags = if self.rng.u8(..4) == 0 { 2 } else { 1 };
                for t in 0..tags {
                    let tpid = if t == 0 && tags == 2 {
                        ETH_P_8021Q
                    } else if self.rng.u8(..4) == 0 {
                        ETH_P_8021AD
                    } else {
                        ETH_P_8021Q
                    };
                    let tci = self.rng.u16(..4096).to_be_bytes();
                    if f.len() >= 12 {
                        let tpid = tpid.to_be_bytes();
                        f.splice(12..12, [tpid[0], tpid[1], tci[0], tci[1]]);
                    }
                }
            }
            // Protocol byte, version nibble or EtherType.
            10 => match self.rng.u8(..3) {
                0 => {
                    let p = pick(&mut self.rng, &[0u8, 1, 6, 17, 41, 47, 58, 132, 255][..])
                        .unwrap_or(6);
                    set(f, IP + 9, |_| p);
                }
                1 => set(f, IP, |b| (b & 0x0f) | (rng_u8(&mut self.rng, 16) << 4)),
                _ => {
                    let t = pick(
                        &mut self.rng,
                        &[ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_8021Q, 0x88cc, 0][..],
                    )
                    .unwrap_or(ETH_P_IP);
                    let t = t.to_be_bytes();
                    set(f, 12, |_| t[0]);
                    set(f, 13, |_| t[1]);
                }
            },
            // TCP data offset, or the TCP flags.
            11 => {
                let l4 = IP + usize::from(f.get(IP).map_or(5, |b| b & 0x0f).max(5)) * 4;
                if self.rng.bool() {
                    set(f, l4 + 12, |b| {
                        (b & 0x0f) | (rng_u8(&mut self.rng, 16) << 4)
                    });
                } else {
                    let fl = self.tcp_flags();
                    set(f, l4 + 13, |_| fl);
                }
            }
            // Random bytes over a stretch of up to 16.
            12 => {
                if !f.is_empty() {
                    let start = self.rng.usize(..f.len());
                    let end = (start + self.rng.usize(1..=16)).min(f.len());
                    for b in &mut f[start..end] {
                        *b = self.rng.u8(..);
                    }
                }
            }
            // Grown by junk, up to a jumbo-ish size.
            _ => {
                let most = if self.rng.u8(..16) == 0 { 2000 } else { 64 };
                let n = self.rng.usize(1..=most);
                let more = self.bytes(n);
                f.extend(more);
            }
        }
    }

    /// Valid frames of every kind the generator makes, for the sweep that
    /// cuts each at every length from [`MIN_FRAME`] up.
    pub fn templates(&mut self) -> Vec<Vec<u8>> {
        let w = self.world.clone();
        let mut out = Vec::new();
        for (vip, proto) in &w.services {
            let c = self.client();
            if *proto == IPPROTO_TCP {
                for fl in [TCP_SYN, TCP_ACK, TCP_FIN | TCP_ACK, TCP_RST] {
                    out.push(
                        Packet::tcp(c, *vip, fl)
                            .tcp_options(&[2, 4, 5, 0xb4, 1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 0])
                            .payload(b"hello")
                            .build(),
                    );
                }
                out.push(
                    Packet::tcp(c, *vip, TCP_SYN)
                        .ip_options(&[1, 1, 1, 1])
                        .build(),
                );
            } else {
                out.push(Packet::udp(c, *vip, b"query").build());
            }
        }
        for flow in self.flows.clone() {
            for (s, d) in [flow.forward, flow.reverse] {
                out.push(if flow.proto == IPPROTO_TCP {
                    Packet::tcp(s, d, TCP_ACK | TCP_PSH)
                        .payload(b"data")
                        .build()
                } else {
                    Packet::udp(s, d, b"data").build()
                });
            }
        }
        let (c, o) = (self.client(), self.other());
        out.push(Packet::tcp(c, o, TCP_SYN).build());
        out.push(
            Packet::raw(
                *c.ip(),
                *o.ip(),
                IPPROTO_ICMP,
                &[8, 0, 0xf7, 0xfe, 0, 0, 0, 1],
            )
            .build(),
        );
        out.push(ipv6_frame(
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
            IPPROTO_TCP,
            1234,
            80,
            b"",
        ));
        out.push(arp_request(CLIENT_MAC, *c.ip(), *o.ip()));
        out
    }
}

/// A random element of `from` (`None` if it is empty).
fn pick<T: Copy>(rng: &mut fastrand::Rng, from: &[T]) -> Option<T> {
    if from.is_empty() {
        None
    } else {
        from.get(rng.usize(..from.len())).copied()
    }
}

fn rng_u8(rng: &mut fastrand::Rng, below: u8) -> u8 {
    rng.u8(..below)
}

/// Sets byte `i` of `f` to `g(old)` if the frame is that long.
fn set(f: &mut [u8], i: usize, g: impl FnOnce(u8) -> u8) {
    if let Some(b) = f.get_mut(i) {
        *b = g(*b);
    }
}

/// An Ethernet + IPv6 frame with a TCP (SYN, no options) or UDP header and
/// `payload`, transport checksum over the IPv6 pseudo-header.
pub fn ipv6_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    proto: u8,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    let csum_at = if proto == IPPROTO_TCP {
        l4.extend_from_slice(&1000u32.to_be_bytes());
        l4.extend_from_slice(&0u32.to_be_bytes());
        l4.extend_from_slice(&[0x50, TCP_SYN, 0xff, 0xff, 0, 0, 0, 0]);
        16
    } else {
        let len = (8 + payload.len()) as u16;
        l4.extend_from_slice(&len.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        6
    };
    l4.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, proto]);
    pseudo.extend_from_slice(&l4);
    let c = internet_checksum(&pseudo);
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&crate::packet::EDGE_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.push(proto);
    f.push(64);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&l4);
    f
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn deltas(names: &[&'static str]) -> BTreeMap<&'static str, u64> {
        names.iter().map(|n| (*n, 1)).collect()
    }

    #[test]
    fn same_seed_same_frames_other_seed_other_frames() {
        let w = World::example();
        let run = |seed| {
            let mut g = Generator::new(seed, w.clone());
            (0..1000).map(|_| g.frame()).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
    }

    #[test]
    fn frames_cover_every_kind_and_class() {
        let w = World::example();
        let mut g = Generator::new(3, w.clone());
        g.set_flows(vec![FlowTuples {
            proto: IPPROTO_TCP,
            forward: (
                "10.0.1.2:4000".parse().unwrap(),
                "10.0.0.10:80".parse().unwrap(),
            ),
            reverse: (
                "10.0.2.2:8080".parse().unwrap(),
                "10.0.2.1:20000".parse().unwrap(),
            ),
        }]);
        let mut classes = BTreeMap::new();
        let mut ethertypes = BTreeMap::new();
        let mut on_flow = 0;
        for _ in 0..20_000 {
            let f = g.frame();
            assert!(f.len() >= MIN_FRAME, "{}", f.len());
            *classes
                .entry(format!("{:?}", classify(&f, &w)))
                .or_insert(0) += 1;
            *ethertypes
                .entry(u16::from_be_bytes([f[12], f[13]]))
                .or_insert(0) += 1;
            if Touch::of(&f).is_some_and(|t| (t.src, t.dst) == g.flows[0].forward) {
                on_flow += 1;
            }
        }
        for c in ["NotOurs", "BrokenIp", "MaybeOurs"] {
            assert!(classes.get(c).copied().unwrap_or(0) > 500, "{classes:?}");
        }
        for t in [ETH_P_IP, ETH_P_IPV6, ETH_P_ARP, ETH_P_8021Q] {
            assert!(
                ethertypes.get(&t).copied().unwrap_or(0) > 100,
                "{t:#x}: {ethertypes:?}"
            );
        }
        assert!(on_flow > 500, "{on_flow}");
    }

    #[test]
    fn classify_follows_the_addresses_and_the_header() {
        let w = World::example();
        let c: SocketAddrV4 = "10.0.1.2:4000".parse().unwrap();
        let vip: SocketAddrV4 = "10.0.0.10:80".parse().unwrap();
        let other: SocketAddrV4 = "10.0.0.11:80".parse().unwrap();
        let snat: SocketAddrV4 = "10.0.2.1:20000".parse().unwrap();
        let blue: SocketAddrV4 = "10.0.2.2:8080".parse().unwrap();
        assert_eq!(
            classify(&Packet::tcp(c, vip, TCP_SYN).build(), &w),
            Class::MaybeOurs
        );
        assert_eq!(
            classify(&Packet::tcp(blue, snat, TCP_ACK).build(), &w),
            Class::MaybeOurs
        );
        assert_eq!(
            classify(&Packet::tcp(c, other, TCP_SYN).build(), &w),
            Class::NotOurs
        );
        // SNAT mode: a backend's packet to a client is not ours; DNAT: it may be.
        assert_eq!(
            classify(&Packet::tcp(blue, c, TCP_ACK).build(), &w),
            Class::NotOurs
        );
        let dnat = World {
            dnat: true,
            snat: None,
            ..w.clone()
        };
        assert_eq!(
            classify(&Packet::tcp(blue, c, TCP_ACK).build(), &dnat),
            Class::MaybeOurs
        );
        assert_eq!(
            classify(&Packet::tcp(c, other, TCP_SYN).ihl(4).build(), &w),
            Class::BrokenIp
        );
        assert_eq!(
            classify(&Packet::tcp(c, vip, TCP_SYN).truncate(14 + 19).build(), &w),
            Class::BrokenIp
        );
        assert_eq!(
            classify(&Packet::tcp(c, vip, TCP_SYN).truncate(14 + 30).build(), &w),
            Class::MaybeOurs
        );
        assert_eq!(
            classify(
                &Packet::tcp(c, other, TCP_SYN).truncate(14 + 30).build(),
                &w
            ),
            Class::BrokenIp,
            "total length past the frame"
        );
        let v6 = ipv6_frame(
            Ipv6Addr::LOCALHOST,
            Ipv6Addr::LOCALHOST,
            IPPROTO_TCP,
            1,
            80,
            b"",
        );
        assert_eq!(classify(&v6, &w), Class::NotOurs);
        assert_eq!(
            classify(&arp_request(CLIENT_MAC, *c.ip(), *vip.ip()), &w),
            Class::NotOurs
        );
        // A tagged frame is judged by what is under the tag.
        let mut tagged = Packet::tcp(c, other, TCP_SYN).build();
        tagged.splice(12..12, [0x81, 0, 0, 5]);
        assert_eq!(classify(&tagged, &w), Class::NotOurs);
        let mut tagged = Packet::tcp(c, vip, TCP_SYN).build();
        tagged.splice(12..12, [0x81, 0, 0, 5]);
        assert_eq!(classify(&tagged, &w), Class::MaybeOurs);
    }

    #[test]
    fn judge_accepts_the_documented_outcomes() {
        let f = vec![0u8; 60];
        let mut g = f.clone();
        g[20] = 1;
        use xdp_action::*;
        for (class, action, out, d) in [
            (Class::NotOurs, PASS, &f, deltas(&[])),
            (Class::BrokenIp, DROP, &f, deltas(&["drop_bad_ihl"])),
            (Class::BrokenIp, PASS, &f, deltas(&[])),
            (Class::MaybeOurs, DROP, &f, deltas(&["drop_no_flow"])),
            (Class::MaybeOurs, TX, &g, deltas(&["tx", "new_flow"])),
            (Class::MaybeOurs, REDIRECT, &g, deltas(&["redirect"])),
            (
                Class::MaybeOurs,
                PASS,
                &g,
                deltas(&["pass_fib_other", "new_flow"]),
            ),
            (
                Class::MaybeOurs,
                PASS,
                &f,
                deltas(&["pass_ttl", "new_flow"]),
            ),
            (
                Class::MaybeOurs,
                DROP,
                &f,
                deltas(&["drop_unroutable", "new_flow"]),
            ),
            (
                Class::MaybeOurs,
                PASS,
                &f,
                deltas(&["new_flow", "shadow_tee_flows"]),
            ),
            (
                Class::MaybeOurs,
                PASS,
                &g,
                deltas(&["shadow_copies", "new_flow"]),
            ),
            (
                Class::MaybeOurs,
                DROP,
                &f,
                deltas(&["shadow_reply_dropped"]),
            ),
            (
                Class::MaybeOurs,
                REDIRECT,
                &g,
                deltas(&["redirect", "new_flow", "new_flow_targeted"]),
            ),
        ] {
            assert_eq!(
                judge(class, &f, action, out, &d),
                Ok(()),
                "{class:?} {action} {d:?}"
            );
        }
    }

    #[test]
    fn judge_refuses_what_the_docs_rule_out() {
        let f = vec![0u8; 60];
        let mut g = f.clone();
        g[20] = 1;
        use xdp_action::*;
        let mut two = deltas(&["drop_no_flow"]);
        two.insert("drop_no_flow", 2);
        for (why, class, action, out, d) in [
            ("aborted", Class::MaybeOurs, ABORTED, &f, deltas(&[])),
            ("unknown action", Class::MaybeOurs, 7, &f, deltas(&[])),
            (
                "drop without counter",
                Class::MaybeOurs,
                DROP,
                &f,
                deltas(&[]),
            ),
            (
                "two drop counters",
                Class::MaybeOurs,
                DROP,
                &f,
                deltas(&["drop_no_flow", "drop_fragment"]),
            ),
            ("counted twice", Class::MaybeOurs, DROP, &f, two.clone()),
            (
                "tx counted as redirect",
                Class::MaybeOurs,
                TX,
                &g,
                deltas(&["redirect"]),
            ),
            (
                "silent pass that changed",
                Class::MaybeOurs,
                PASS,
                &g,
                deltas(&[]),
            ),
            (
                "pass_ttl that changed",
                Class::MaybeOurs,
                PASS,
                &g,
                deltas(&["pass_ttl"]),
            ),
            (
                "new flow alone",
                Class::MaybeOurs,
                PASS,
                &g,
                deltas(&["new_flow"]),
            ),
            (
                "new flow and no_flow",
                Class::MaybeOurs,
                DROP,
                &f,
                deltas(&["new_flow", "drop_no_flow"]),
            ),
            (
                "not ours, dropped",
                Class::NotOurs,
                DROP,
                &f,
                deltas(&["drop_fragment"]),
            ),
            (
                "not ours, changed",
                Class::NotOurs,
                PASS,
                &g,
                deltas(&["pass_fib_other"]),
            ),
            (
                "broken, forwarded",
                Class::BrokenIp,
                TX,
                &g,
                deltas(&["tx"]),
            ),
            (
                "broken, other drop",
                Class::BrokenIp,
                DROP,
                &f,
                deltas(&["drop_no_flow"]),
            ),
            (
                "a tee flow rewritten",
                Class::MaybeOurs,
                PASS,
                &g,
                deltas(&["new_flow", "shadow_tee_flows"]),
            ),
            (
                "a tee flow forwarded",
                Class::MaybeOurs,
                TX,
                &g,
                deltas(&["tx", "new_flow", "shadow_tee_flows"]),
            ),
            (
                "a tee flow without a new flow",
                Class::MaybeOurs,
                PASS,
                &f,
                deltas(&["shadow_tee_flows"]),
            ),
            (
                "a target without a new flow",
                Class::MaybeOurs,
                REDIRECT,
                &g,
                deltas(&["redirect", "new_flow_targeted"]),
            ),
            (
                "a clone counted by the XDP program",
                Class::MaybeOurs,
                PASS,
                &g,
                deltas(&["shadow_copies", "shadow_cloned"]),
            ),
        ] {
            assert!(judge(class, &f, action, out, &d).is_err(), "{why}");
        }
    }

    #[test]
    fn judge_checks_checksums_of_rewritten_frames() {
        let c: SocketAddrV4 = "10.0.1.2:4000".parse().unwrap();
        let vip: SocketAddrV4 = "10.0.0.10:80".parse().unwrap();
        let blue: SocketAddrV4 = "10.0.2.2:8080".parse().unwrap();
        let input = Packet::tcp(c, vip, TCP_SYN).build();
        let good = Packet::tcp(c, blue, TCP_SYN).build();
        let mut bad = good.clone();
        bad[ETH_LEN + 16] ^= 1;
        let d = deltas(&["pass_fib_other", "new_flow"]);
        assert_eq!(
            judge(Class::MaybeOurs, &input, xdp_action::PASS, &good, &d),
            Ok(())
        );
        assert!(judge(Class::MaybeOurs, &input, xdp_action::PASS, &bad, &d).is_err());
    }

    #[test]
    fn judge_checks_the_ttl_of_forwarded_frames() {
        let c: SocketAddrV4 = "10.0.1.2:4000".parse().unwrap();
        let vip: SocketAddrV4 = "10.0.0.10:80".parse().unwrap();
        let blue: SocketAddrV4 = "10.0.2.2:8080".parse().unwrap();
        let input = Packet::tcp(c, vip, TCP_SYN).build();
        let d = deltas(&["tx", "new_flow"]);
        let out = Packet::tcp(c, blue, TCP_SYN).ttl(63).build();
        assert_eq!(
            judge(Class::MaybeOurs, &input, xdp_action::TX, &out, &d),
            Ok(())
        );
        let same = Packet::tcp(c, blue, TCP_SYN).build();
        assert!(judge(Class::MaybeOurs, &input, xdp_action::TX, &same, &d).is_err());
    }

    #[test]
    fn touch_reads_under_tags_and_options() {
        let c: SocketAddrV4 = "10.0.1.2:4000".parse().unwrap();
        let vip: SocketAddrV4 = "10.0.0.10:80".parse().unwrap();
        let mut f = Packet::tcp(c, vip, TCP_RST)
            .ip_options(&[1, 1, 1, 1])
            .build();
        f.splice(12..12, [0x88, 0xa8, 0, 1, 0x81, 0, 0, 2]);
        let t = Touch::of(&f).unwrap();
        assert_eq!((t.src, t.dst, t.tcp_flags), (c, vip, TCP_RST));
        let flow = FlowTuples {
            proto: IPPROTO_TCP,
            forward: (c, vip),
            reverse: (
                "10.0.2.2:8080".parse().unwrap(),
                "10.0.2.1:20000".parse().unwrap(),
            ),
        };
        assert!(t.may_end(&flow));
        let ack = Touch::of(&Packet::tcp(c, vip, TCP_ACK).build()).unwrap();
        assert!(!ack.may_end(&flow));
        assert_eq!(flow.rewritten(&ack), Some((flow.reverse.1, flow.reverse.0)));
        let reply =
            Touch::of(&Packet::tcp(flow.reverse.0, flow.reverse.1, TCP_ACK).build()).unwrap();
        assert_eq!(flow.rewritten(&reply), Some((vip, c)));
        let other = Touch::of(&Packet::tcp(vip, c, TCP_ACK).build()).unwrap();
        assert_eq!(flow.rewritten(&other), None);
        let udp = Touch::of(&Packet::udp(c, vip, b"").build()).unwrap();
        assert!(!udp.may_end(&FlowTuples {
            proto: IPPROTO_UDP,
            ..flow
        }));
    }

    #[test]
    fn ipv6_frames_have_valid_transport_checksums() {
        let f = ipv6_frame(
            Ipv6Addr::LOCALHOST,
            "fd00::10".parse().unwrap(),
            IPPROTO_UDP,
            1,
            2,
            b"abc",
        );
        assert_eq!(f.len(), 14 + 40 + 8 + 3);
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&f[22..54]);
        pseudo.extend_from_slice(&11u32.to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_UDP]);
        pseudo.extend_from_slice(&f[54..]);
        assert_eq!(internet_checksum(&pseudo), 0);
    }
}
