//! The packet fuzzer: random, truncated and mutated frames through the real
//! kernel program with `BPF_PROG_TEST_RUN`, each judged by the oracle of
//! `splitter_tests::fuzz` (documented actions and counters only), with
//! established flows in the table whose entries must keep their identity.
//!
//! Privileged (root), `#[ignore]`d for a plain `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test fuzz -- --include-ignored --test-threads=1 --nocapture
//! SPLITTER_FUZZ_SEED=42 SPLITTER_FUZZ_FRAMES=1000000 cargo test -p splitter-tests --test fuzz -- --include-ignored --nocapture
//! ```
//!
//! `SPLITTER_FUZZ_FRAMES` (default 100 000, the slice `cargo xtask test`
//! runs; `cargo xtask fuzz` runs 1 000 000) frames are split between data
//! planes (phases of at most [`PHASE_FRAMES`], at least two), in SNAT and
//! DNAT mode in turn, each loaded fresh in a namespace of its own with a veth pair, routes, permanent
//! neighbours and a blackhole route, so every outcome (`XDP_TX`,
//! `XDP_REDIRECT`, a missing neighbour, an unroutable backend, the kernel's
//! own forwarding) can happen. Frames arrive on either veth or on
//! loopback. Before the random frames, every template frame is cut at every
//! length from 14 bytes up.
//!
//! Every few thousand frames ([`BATCH`]) the test opens new flows with real
//! SYN/SYN-ACK (and UDP query/answer) exchanges, aims part of the next
//! frames at their tuples, and afterwards checks each flow's two
//! connection-table entries: still there, same addresses, ports, backend,
//! service and direction/SNAT flags, state bits only added. A flow that a
//! frame of the batch could have ended (a FIN or RST on one of its tuples,
//! however tagged or optioned) may legitimately be replaced by a new flow,
//! and is skipped.
//!
//! The config holds every kind of service: weights, a source-CIDR rule,
//! client-IP affinity, a mirrored UDP service (datagrams passed with the
//! shadow metadata), and a mirrored TCP service whose tee the test says
//! listens (`TEE_ALIVE` far ahead), so half its new flows are handed to
//! the edge's stack untouched and later frames of theirs pass untouched.
//!
//! The seed is `SPLITTER_FUZZ_SEED` (default a fixed one, so
//! `cargo xtask test` runs the same frames every time); a failure prints
//! the seed, the frame count, the frame's index and the frame and the
//! program's output in hex: the same two variables replay the same frames.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::RawFd,
    time::Instant,
};

use anyhow::{Context, Result, ensure};
use aya::maps::{HashMap, MapData};
use splitter::{config::Config, dataplane::Dataplane};
use splitter_common::{
    CONN_F_REVERSE, CONN_F_SNAT, Conn, FlowKey, SHADOW_META_MAGIC, ShadowMeta, counter,
};
use splitter_tests::{
    fuzz::{self, Class, FlowTuples, Generator, MIN_FRAME, Touch, World, classify, hex, judge},
    netns::Netns,
    packet::{CLIENT_MAC, IPPROTO_TCP, IPPROTO_UDP, Packet, TCP_ACK, TCP_PSH, TCP_SYN, parse},
    testrun::{self, RunResult, ifindex, test_run_xdp, xdp_action},
};

/// Frames between two rounds of new flows and entry checks.
const BATCH: usize = 2000;
/// Flows opened for each batch (a third of them UDP).
const FLOWS: usize = 24;
/// Clients of the test's own flows: addresses the generator never sends
/// from, so no random frame opens a flow on their tuples first.
const FLOW_CLIENTS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 0, 1, 9), Ipv4Addr::new(10, 0, 1, 10)];
/// Most frames one loaded data plane gets (a phase).
const PHASE_FRAMES: usize = 500_000;
/// Default frame count: the slice `cargo xtask test` runs.
const DEFAULT_FRAMES: usize = 100_000;
/// Default seed.
const DEFAULT_SEED: u64 = 0x5eed_0001;

const IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xee];
const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xef];
const BLUE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn sa(s: &str) -> SocketAddrV4 {
    s.parse()
        .unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
}

/// The services: `web` (TCP, two versions: blue with a neighbour, green
/// without), `dns` (UDP), and `sticky` (TCP, client-IP affinity, one
/// backend behind a blackhole route and one without a neighbour).
fn config(mode: &str) -> Result<Config> {
    let snat = if mode == "snat" {
        "snat_address = \"10.0.2.1\""
    } else {
        ""
    };
    let text = format!(
        r#"
[dataplane]
interface = "lo"
mode = "{mode}"
{snat}

[[service]]
name = "web"
vip = "10.0.0.10:80"
protocol = "tcp"
connect_timeout_ms = 1

[[service.version]]
name = "blue"
weight = 50
backends = ["10.0.2.2:8080"]

[[service.version]]
name = "green"
weight = 50
backends = ["10.0.2.3:8080"]

# One client's new flows chosen by a source-CIDR rule, the other's by weight.
[[service.target]]
cidr = "10.0.1.2/32"
version = "green"

[[service]]
name = "dns"
vip = "10.0.0.53:53"
protocol = "udp"

[[service.version]]
name = "blue"
weight = 100
backends = ["10.0.2.2:5353", "10.0.2.3:5353"]

[[service.version]]
name = "shadow"
weight = 0
backends = ["10.0.2.4:5353"]

# Half the datagrams passed for the tc program to copy to the shadow.
[service.shadow]
version = "shadow"
percent = 50

[[service]]
name = "sticky"
vip = "10.0.0.20:443"
protocol = "tcp"
affinity = "client-ip"

[[service.version]]
name = "only"
weight = 100
backends = ["10.0.9.5:443", "10.0.2.4:443"]

# Half the new flows handed to the edge's stack for the TCP tee (the test
# says a tee listens: `TEE_ALIVE` far ahead), passed as they came.
[[service]]
name = "mirror"
vip = "10.0.0.30:80"
protocol = "tcp"
read_only = true

[[service.version]]
name = "stable"
weight = 100
backends = ["10.0.2.5:8080"]

[[service.version]]
name = "shadow"
weight = 0
backends = ["10.0.2.6:8080"]

[service.shadow]
version = "shadow"
percent = 50
"#
    );
    Config::parse(&text).map_err(|e| anyhow::anyhow!("fuzz config rejected: {e}"))
}

fn world(mode: &str) -> World {
    World {
        services: vec![
            (sa("10.0.0.10:80"), IPPROTO_TCP),
            (sa("10.0.0.53:53"), IPPROTO_UDP),
            (sa("10.0.0.20:443"), IPPROTO_TCP),
            (sa("10.0.0.30:80"), IPPROTO_TCP),
        ],
        backends: vec![
            (sa("10.0.2.2:8080"), IPPROTO_TCP),
            (sa("10.0.2.3:8080"), IPPROTO_TCP),
            (sa("10.0.2.2:5353"), IPPROTO_UDP),
            (sa("10.0.2.3:5353"), IPPROTO_UDP),
            (sa("10.0.9.5:443"), IPPROTO_TCP),
            (sa("10.0.2.4:443"), IPPROTO_TCP),
            (sa("10.0.2.5:8080"), IPPROTO_TCP),
            (sa("10.0.2.6:8080"), IPPROTO_TCP),
        ],
        snat: (mode == "snat").then_some(Ipv4Addr::new(10, 0, 2, 1)),
        dnat: mode == "dnat",
        clients: vec![Ipv4Addr::new(10, 0, 1, 2), Ipv4Addr::new(10, 0, 1, 3)],
        others: vec![
            Ipv4Addr::new(10, 0, 0, 11),
            Ipv4Addr::new(10, 0, 2, 77),
            Ipv4Addr::new(192, 0, 2, 1),
        ],
        services_v6: Vec::new(),
    }
}

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

/// The identity of a connection-table entry: everything but the state
/// bits, the timestamps and the route cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    new_addr: [u32; 4],
    other_addr: [u32; 4],
    new_port: u16,
    other_port: u16,
    backend: u32,
    service: u32,
    flags: u32,
}

impl From<&Conn> for Identity {
    fn from(c: &Conn) -> Self {
        Self {
            new_addr: c.new_addr,
            other_addr: c.other_addr,
            new_port: c.new_port,
            other_port: c.other_port,
            backend: c.backend,
            service: c.service,
            flags: c.flags & (CONN_F_REVERSE | CONN_F_SNAT),
        }
    }
}

fn flow_key(proto: u8, (src, dst): (SocketAddrV4, SocketAddrV4)) -> FlowKey {
    splitter::dataplane::flow_key(src, dst, proto)
}

/// A flow opened by the test, with its two entries as first read.
struct Seeded {
    tuples: FlowTuples,
    entries: [(FlowKey, Conn); 2],
    /// A frame of the batch could have ended it.
    may_end: bool,
}

/// The loaded program in its namespace.
struct Edge {
    dp: Dataplane,
    fd: RawFd,
    conns: HashMap<MapData, FlowKey, Conn>,
    ifs: [Option<u32>; 3],
}

/// Counters that moved, by name.
type Deltas = BTreeMap<&'static str, u64>;

impl Edge {
    fn new(mode: &str) -> Result<Self> {
        let mut dp = Dataplane::load().context("loading the XDP program (root needed)")?;
        dp.apply(&config(mode)?)?;
        // A tee listens for `mirror` for as long as the test runs.
        let (conns, alive) = dp.tee_fds()?;
        let id = dp.service_id("mirror").context("no id for mirror")?;
        splitter::tee::TeeMaps::open(conns, alive)?.set_alive(id, u64::MAX)?;
        let fd = dp.program_fd()?;
        let map = MapData::from_fd(dp.conns_fd()?).context("opening CONNS")?;
        let conns = HashMap::try_from(aya::maps::Map::LruHashMap(map)).context("CONNS type")?;
        Ok(Self {
            dp,
            fd,
            conns,
            ifs: [None, Some(ifindex("sp-in")?), Some(ifindex("sp-out")?)],
        })
    }

    fn run(&self, frame: &[u8], ingress: Option<u32>) -> Result<(RunResult, Deltas)> {
        let before = self.dp.counters()?;
        let mut r = test_run_xdp(self.fd, frame, ingress, 1).context("BPF_PROG_TEST_RUN")?;
        let after = self.dp.counters()?;
        let deltas: Deltas = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v.wrapping_sub(before.get(k).copied().unwrap_or(0));
                (d != 0).then_some((*k, d))
            })
            .collect();
        if deltas.contains_key("shadow_copies") {
            // A datagram passed for mirroring carries the documented
            // metadata in front of the frame (the test run returns it):
            // check it, and judge the frame behind it.
            let n = size_of::<ShadowMeta>();
            ensure!(
                r.data.len() >= n && r.data[..4] == SHADOW_META_MAGIC.to_ne_bytes(),
                "shadow_copies without the metadata in front of the frame:\n{}",
                hex(&r.data)
            );
            r.data.drain(..n);
        }
        Ok((r, deltas))
    }

    fn entry(&self, key: &FlowKey) -> Result<Option<Conn>> {
        match self.conns.get(key, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading CONNS"),
        }
    }

    /// Opens a flow from `client` to `vip` with real frames (TCP: SYN,
    /// SYN-ACK, ACK; UDP: query, answer) and reads its two entries.
    /// `None` if the tuple holds a flow already (a random frame opened it).
    fn open_flow(
        &self,
        proto: u8,
        client: SocketAddrV4,
        vip: SocketAddrV4,
    ) -> Result<Option<Seeded>> {
        let (cin, cout) = (self.ifs[1], self.ifs[2]);
        let first = if proto == IPPROTO_TCP {
            Packet::tcp(client, vip, TCP_SYN).build()
        } else {
            Packet::udp(client, vip, b"query").build()
        };
        if self.entry(&flow_key(proto, (client, vip)))?.is_some() {
            return Ok(None);
        }
        let (r, d) = self.run(&first, cin)?;
        ensure!(
            d.get("new_flow") == Some(&1) && r.action != xdp_action::DROP,
            "opening {client} -> {vip}: {} {d:?}",
            xdp_action::name(r.action)
        );
        let out = parse(&r.data).map_err(anyhow::Error::msg)?;
        let (src, dst) = (
            out.source().context("no source")?,
            out.destination().context("no destination")?,
        );
        let reverse = (dst, src);
        let answer = if proto == IPPROTO_TCP {
            Packet::tcp(dst, src, TCP_SYN | TCP_ACK).build()
        } else {
            Packet::udp(dst, src, b"answer").build()
        };
        self.run(&answer, cout)?;
        if proto == IPPROTO_TCP {
            self.run(&Packet::tcp(client, vip, TCP_ACK | TCP_PSH).build(), cin)?;
        }
        let tuples = FlowTuples {
            proto,
            forward: (client, vip),
            reverse,
        };
        let fk = flow_key(proto, tuples.forward);
        let rk = flow_key(proto, tuples.reverse);
        let f = self.entry(&fk)?.context("no forward entry")?;
        let b = self.entry(&rk)?.context("no reverse entry")?;
        Ok(Some(Seeded {
            tuples,
            entries: [(fk, f), (rk, b)],
            may_end: false,
        }))
    }

    /// Each flow's entries kept their identity (unless a frame may have ended it).
    fn check_flows(&self, flows: &[Seeded]) -> Result<usize> {
        let mut checked = 0;
        for s in flows.iter().filter(|s| !s.may_end) {
            for (key, was) in &s.entries {
                let now = self
                    .entry(key)?
                    .with_context(|| format!("the entry of flow {:?} is gone", s.tuples))?;
                ensure!(
                    Identity::from(&now) == Identity::from(was),
                    "flow {:?}: entry {key:?} changed identity\nwas {was:?}\nnow {now:?}",
                    s.tuples
                );
                ensure!(
                    now.state & was.state == was.state && now.last_seen >= was.last_seen,
                    "flow {:?}: state bits lost or time went back\nwas {was:?}\nnow {now:?}",
                    s.tuples
                );
            }
            checked += 1;
        }
        Ok(checked)
    }
}

/// What a phase did, for the summary.
#[derive(Default)]
struct Tally {
    frames: usize,
    actions: BTreeMap<&'static str, usize>,
    classes: BTreeMap<String, usize>,
    counters: BTreeMap<&'static str, u64>,
    flows_checked: usize,
    flows_skipped: usize,
    /// Frames of an established flow that left rewritten (and were checked).
    flow_frames: usize,
}

/// Where a frame came in, for a failure report.
struct At<'a> {
    /// `SPLITTER_FUZZ_SEED` and `SPLITTER_FUZZ_FRAMES` of the run.
    seed: u64,
    frames: usize,
    mode: &'a str,
    /// `#N` (random frames, counted over both phases) or the template cut.
    index: &'a str,
    ingress: Option<u32>,
}

/// A frame the oracle refused, with everything needed to replay it.
fn report(
    at: &At,
    frame: &[u8],
    class: Class,
    r: &RunResult,
    deltas: &Deltas,
    why: &str,
) -> anyhow::Error {
    let At {
        seed,
        frames,
        mode,
        index,
        ingress,
    } = at;
    anyhow::anyhow!(
        "fuzz failure: {why}\n  frame {index} of the {mode} phase, ingress ifindex {ingress:?}, class {class:?}\n  action {} counters {deltas:?}\n  replay: SPLITTER_FUZZ_SEED={seed} SPLITTER_FUZZ_FRAMES={frames} cargo test -p splitter-tests --test fuzz -- --include-ignored --nocapture\n  input ({} bytes):\n{}  output ({} bytes):\n{}",
        xdp_action::name(r.action),
        frame.len(),
        hex(frame),
        r.data.len(),
        hex(&r.data)
    )
}

/// One data plane, `frames` random frames.
fn phase(
    number: usize,
    mode: &str,
    seed: u64,
    total: usize,
    frames: usize,
    first_index: usize,
) -> Result<Tally> {
    let ns = forwarding_ns(&format!("fz{number}"))?;
    ns.enter(|| -> Result<Tally> {
        let edge = Edge::new(mode)?;
        let world = world(mode);
        let phase_seed = seed.wrapping_add((number as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut g = Generator::new(phase_seed, world.clone());
        let mut pick = fastrand::Rng::with_seed(phase_seed.rotate_left(17));
        let mut t = Tally::default();
        let judge_one =
            |t: &mut Tally, index: &str, frame: &[u8], ingress: Option<u32>| -> Result<RunResult> {
                let class = classify(frame, &world);
                let (r, deltas) = edge.run(frame, ingress)?;
                if let Err(why) = judge(class, frame, r.action, &r.data, &deltas) {
                    let at = At {
                        seed,
                        frames: total,
                        mode,
                        index,
                        ingress,
                    };
                    return Err(report(&at, frame, class, &r, &deltas, &why));
                }
                *t.actions.entry(xdp_action::name(r.action)).or_default() += 1;
                *t.classes.entry(format!("{class:?}")).or_default() += 1;
                for (k, v) in deltas {
                    *t.counters.entry(k).or_default() += v;
                }
                Ok(r)
            };
        let mut port = 20000u16;
        let mut flows = Vec::new();
        let mut done = 0;
        let mut first = true;
        while done < frames {
            // New flows for this batch: TCP to web, UDP to dns.
            flows.clear();
            for i in 0..FLOWS {
                let (proto, vip) = if i % 3 == 2 {
                    (IPPROTO_UDP, sa("10.0.0.53:53"))
                } else {
                    (IPPROTO_TCP, sa("10.0.0.10:80"))
                };
                // A mutated frame (a flipped port bit) may have opened a
                // flow on the next tuple already: then take another port.
                let mut opened = None;
                for _ in 0..16 {
                    port = port.wrapping_add(1).max(1024);
                    let client = SocketAddrV4::new(FLOW_CLIENTS[i % 2], port);
                    if let Some(s) = edge.open_flow(proto, client, vip)? {
                        opened = Some(s);
                        break;
                    }
                }
                flows.push(opened.context("16 tuples in a row were taken already")?);
            }
            g.set_flows(flows.iter().map(|s| s.tuples).collect());
            if first {
                // Every template cut at every length, on each ingress.
                first = false;
                for (ti, tmpl) in g.templates().into_iter().enumerate() {
                    for len in MIN_FRAME..=tmpl.len() {
                        let ingress = edge.ifs[len % 3];
                        judge_one(
                            &mut t,
                            &format!("template {ti} cut at {len}"),
                            &tmpl[..len],
                            ingress,
                        )?;
                    }
                }
                // The sweep may have ended the flows: open new ones.
                continue;
            }
            let n = BATCH.min(frames - done);
            for i in 0..n {
                let frame = g.frame();
                let ingress = edge.ifs[pick.usize(..3)];
                let touch = Touch::of(&frame);
                // A packet of a flow that is still up must leave with the
                // flow's rewrite, if it leaves rewritten at all.
                let expect = touch.and_then(|t| {
                    flows
                        .iter()
                        .filter(|s| !s.may_end)
                        .find_map(|s| s.tuples.rewritten(&t))
                });
                if let Some(touch) = touch {
                    for s in flows.iter_mut() {
                        s.may_end |= touch.may_end(&s.tuples);
                    }
                }
                let index = format!("#{}", first_index + done + i);
                let r = judge_one(&mut t, &index, &frame, ingress)?;
                if let Some(want) = expect
                    && r.action != xdp_action::DROP
                    && r.data != frame
                {
                    t.flow_frames += 1;
                    let got = Touch::of(&r.data).map(|o| (o.src, o.dst));
                    ensure!(
                        got == Some(want),
                        "fuzz failure: frame {index} of the {mode} phase (seed {seed}, {total} frames) on an established flow left as {got:?}, not {want:?}\n  input:\n{}  output:\n{}",
                        hex(&frame),
                        hex(&r.data)
                    );
                }
            }
            done += n;
            t.frames += n;
            let checked = edge.check_flows(&flows)?;
            t.flows_checked += checked;
            t.flows_skipped += flows.len() - checked;
        }
        Ok(t)
    })?
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn fuzzed_frames_follow_the_documented_behaviour() -> Result<()> {
    // The oracle knows every counter the program documents, by name.
    for name in counter::NAMES {
        ensure!(
            name.starts_with("drop_")
                || name.starts_with("pass_")
                || fuzz::COMPANIONS.contains(&name)
                || fuzz::OUTCOMES.contains(&name)
                || fuzz::NOT_XDP.contains(&name),
            "counter {name} has no meaning in the fuzz oracle (splitter_tests::fuzz::judge)"
        );
    }
    let seed: u64 = env_or("SPLITTER_FUZZ_SEED", DEFAULT_SEED)?;
    let frames: usize = env_or("SPLITTER_FUZZ_FRAMES", DEFAULT_FRAMES)?;
    println!("packet fuzz: seed {seed}, {frames} frames");
    let start = Instant::now();
    // At least one phase per mode; more for longer runs, so that no data
    // plane's SNAT ports fill up with the flows random SYNs open.
    let phases = frames.div_ceil(PHASE_FRAMES).max(2);
    for number in 0..phases {
        let mode = if number % 2 == 0 { "snat" } else { "dnat" };
        let first = frames * number / phases;
        let n = frames * (number + 1) / phases - first;
        let t0 = Instant::now();
        let t = phase(number, mode, seed, frames, n, first)?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{mode}: {} frames in {secs:.1} s ({:.0} frames/s); classes {:?}; actions {:?}; flows checked {} (skipped as possibly ended {}); rewritten flow frames checked {}\n  counters {:?}",
            t.frames,
            t.frames as f64 / secs.max(1e-9),
            t.classes,
            t.actions,
            t.flows_checked,
            t.flows_skipped,
            t.flow_frames,
            t.counters
        );
        // The run reached the interesting paths, not just the parser.
        for c in [
            "new_flow",
            "drop_no_flow",
            "drop_truncated_l4",
            "redirect",
            "shadow_tee_flows",
        ] {
            ensure!(
                n < 20_000 || t.counters.get(c).copied().unwrap_or(0) > 0,
                "{mode}: no frame moved {c}: {:?}",
                t.counters
            );
        }
        ensure!(
            n < 20_000 || (t.flows_checked > 0 && t.flow_frames > 0),
            "{mode}: no flow or none of its frames was checked"
        );
    }
    println!(
        "packet fuzz: {frames} frames in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
