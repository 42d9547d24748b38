//! Per-packet cost of the splitter XDP program through
//! `BPF_PROG_TEST_RUN`, beside reference programs measured in the same
//! rounds (issue 4, item 1), and the weight-change latency of
//! `Dataplane::apply` (item 4), which needs the same loaded program.
//!
//! # Method
//! `BPF_PROG_TEST_RUN` with `repeat = N` runs a program N times on one
//! buffer and reports the mean time per run, measured in the kernel around
//! the loop. A rewriting program would see its own output from the second
//! run on, so every run goes through `bench_wrapper`
//! (`bench-ebpf/src/bin/baseline.rs`): it copies the next frame of a
//! segment of a ring of distinct prepared frames over the buffer and
//! tail-calls the program under test. The same wrapper tail-calling the
//! empty program on the same segment, in the same round, is the harness
//! cost subtracted from every case ("net"). Rounds interleave all cases, so
//! drift on a shared machine hits them alike.
//!
//! Every run is checked: the action of the last iteration, the splitter's
//! counters (exactly `repeat` redirects and, for SYNs, new flows), the
//! wrapper's cursor, and, on single runs before the rounds, the output
//! frames' checksums and addresses.
//!
//! Everything runs on one thread pinned to one CPU, inside a network
//! namespace of its own that holds a veth pair with routes and permanent
//! neighbours, so `bpf_fib_lookup` succeeds as on a real edge (the frames
//! are never sent anywhere: test runs do not transmit).
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    time::Instant,
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, ProgramArray},
    programs::{ProgramFd, Xdp},
};
use splitter::{
    config::Config,
    dataplane::Dataplane,
    table::{MaglevBackend, maglev_table},
};
use splitter_common::{
    BACKEND_F_PRESENT, Backend, CONN_CAPACITY, FAMILY_V4, MAX_CONN_CAPACITY, MIN_CONN_CAPACITY,
    MaglevTable, PROTO_TCP, ServiceKey,
};
use splitter_tests::{
    netns::Netns,
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, parse, verify_checksums},
    testrun::{test_run_xdp, xdp_action},
};

use super::{
    BASELINE_OBJECT, bpf,
    report::{MapMemory, PacketCase, PacketResults, SingleRun},
};

/// The service's VIP.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 10), 80);
/// A destination that is no VIP.
const NOT_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 11), 80);
/// The edge's backend-side address, used for SNAT.
const SNAT: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// Backends per version (blue 10.2.0.x, green 10.2.1.x): enough SNAT
/// ports (22768 per backend) for a full connection table.
const BACKENDS_PER_VERSION: u8 = 64;
/// Frames per ring segment, and the most live flows.
const SEGMENT: u32 = 1 << 16;
/// Ring capacity (`RING_CAPACITY` in baseline.rs): four segments.
const RING_CAPACITY: u32 = 4 * SEGMENT;
/// Fresh SYNs per round.
const SYN_BATCH: u32 = 8192;
/// Passes over a segment per test run.
const PASSES: u32 = 2;
/// Length of every frame (Ethernet + IPv4 + TCP, no options).
const FRAME_LEN: usize = 54;
/// Weight changes timed.
const WEIGHT_CHANGES: u32 = 200;

const IF_IN: &str = "bsp-in";
const IF_OUT: &str = "bsp-out";
const IN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x01];
const OUT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x02, 0x01];
const CLIENT_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const BACKEND_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// Source ports that keep each batch of flows distinct.
mod ports {
    pub const ESTABLISHED: u16 = 40000;
    pub const NOT_VIP: u16 = 30000;
    pub const SYN_LIVE: u16 = 41000;
    pub const SYN_FULL: u16 = 45000;
    /// Target-rule variants: `SYN_TARGETS + 4 * round + variant`.
    pub const SYN_TARGETS: u16 = 43000;
    pub const FILL: u16 = 50000;
    pub const WEIGHTS: u16 = 61000;
    pub const ROLLBACK: u16 = 62000;
}

/// Options of the per-packet section.
#[derive(Debug, Clone, Copy)]
pub struct PacketOptions {
    pub rounds: usize,
    /// Live flows before the first round (at most 65536).
    pub flows: u32,
}

/// What the per-packet section returns besides its own results.
pub struct Extras {
    pub apply_us: Vec<f64>,
    /// Microseconds from a failed analysis verdict handed to a running
    /// canary to its rollback published (stable at 100%), per rollback.
    pub rollback_us: Vec<f64>,
    /// Rollbacks after which a new flow still reached the canary.
    pub rollback_misses: usize,
    /// Milliseconds to count live flows over the full connection table
    /// (`Dataplane::live_flows`, what `status` and drains read), per read.
    pub live_scan_ms: Vec<f64>,
    /// Live flows that count found.
    pub live_scan_flows: u64,
    pub apply_misses: usize,
    pub maps: Vec<MapMemory>,
    pub pinned_cpu: Option<usize>,
}

/// Client `i` (0..65536) of the 10.1.0.0/16 block.
fn client(i: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8), port)
}

fn backend(version: u8, k: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 2, version, k + 1), 8080)
}

fn backends(version: u8) -> String {
    (0..BACKENDS_PER_VERSION)
        .map(|k| format!("\"{}\"", backend(version, k)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One TCP service, versions blue and green of 64 backends each, SNAT.
fn config(blue: u32, green: u32) -> Result<Config> {
    let text = format!(
        r#"
[dataplane]
interface = "lo"
mode = "snat"
snat_address = "{SNAT}"

[[service]]
name = "web"
vip = "{VIP}"
protocol = "tcp"

[[service.version]]
name = "blue"
weight = {blue}
backends = [{}]

[[service.version]]
name = "green"
weight = {green}
backends = [{}]
"#,
        backends(0),
        backends(1)
    );
    Config::parse(&text).map_err(|e| anyhow!("bench config rejected: {e}"))
}

/// Source-CIDR rule sets measured beside the plain SYN case (with
/// `SPLITTER_BENCH_TARGETS`): (case id, label, rules, whether the SYN
/// clients 10.1.0.0 ..= 10.1.31.255 match one).
fn target_variants() -> Result<Vec<(&'static str, &'static str, Config, bool)>> {
    use splitter::target::{Cidr, TargetConfig};
    let with = |rules: Vec<Cidr>| -> Result<Config> {
        let mut c = config(90, 10)?;
        c.services[0].targets = rules
            .into_iter()
            .map(|cidr| TargetConfig {
                cidr,
                version: "green".into(),
            })
            .collect();
        c.validate()
            .map_err(|e| anyhow!("bench rules rejected: {e}"))?;
        Ok(c)
    };
    let net = |a: u32, len: u8| Cidr {
        addr: Ipv4Addr::from(a),
        len,
    };
    let base = u32::from(Ipv4Addr::new(10, 1, 0, 0));
    // 10: four /21s over the SYN clients, six /24s elsewhere.
    let mut ten: Vec<Cidr> = (0..4).map(|k| net(base + (k << 11), 21)).collect();
    ten.extend((0..6).map(|k| net(u32::from(Ipv4Addr::new(10, 5, k, 0)), 24)));
    // 10,000 host rules: every SYN client's (8192), and 1808 elsewhere.
    let elsewhere = u32::from(Ipv4Addr::new(10, 6, 0, 0));
    let mut hosts: Vec<Cidr> = (0..SYN_BATCH).map(|i| net(base + i, 32)).collect();
    hosts.extend((0..10_000 - SYN_BATCH).map(|i| net(elsewhere + i, 32)));
    // 10,000 host rules none of the SYN clients match.
    let missed: Vec<Cidr> = (0..10_000).map(|i| net(elsewhere + i, 32)).collect();
    Ok(vec![
        (
            "syn_targets_10",
            "splitter: SYN, 10 rules, matched",
            with(ten)?,
            true,
        ),
        (
            "syn_targets_10k",
            "splitter: SYN, 10000 rules, matched",
            with(hosts)?,
            true,
        ),
        (
            "syn_targets_10k_miss",
            "splitter: SYN, 10000 rules, none matched",
            with(missed)?,
            false,
        ),
    ])
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string; looked up in this thread's netns.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}: {}", std::io::Error::last_os_error());
    }
    Ok(i)
}

/// A veth pair inside `ns`: clients (10.1.0.0/16) behind 10.0.1.2 on
/// `bsp-in`, backends (10.2.0.0/16) behind 10.0.2.2 on `bsp-out`, both
/// gateways with permanent neighbour entries, forwarding on.
pub fn build_topology(ns: &Netns) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        IF_IN,
        "address",
        &mac_str(IN_MAC),
        "type",
        "veth",
        "peer",
        "name",
        IF_OUT,
        "address",
        &mac_str(OUT_MAC),
    ])?;
    ns.ip(&["addr", "add", "10.0.1.1/24", "dev", IF_IN])?;
    ns.ip(&["addr", "add", &format!("{SNAT}/24"), "dev", IF_OUT])?;
    ns.ip(&["link", "set", IF_IN, "up"])?;
    ns.ip(&["link", "set", IF_OUT, "up"])?;
    for (gw, mac, dev) in [
        ("10.0.1.2", CLIENT_GW_MAC, IF_IN),
        ("10.0.2.2", BACKEND_GW_MAC, IF_OUT),
    ] {
        ns.ip(&[
            "neigh",
            "replace",
            gw,
            "lladdr",
            &mac_str(mac),
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
    }
    ns.ip(&[
        "route",
        "add",
        "10.1.0.0/16",
        "via",
        "10.0.1.2",
        "dev",
        IF_IN,
    ])?;
    ns.ip(&[
        "route",
        "add",
        "10.2.0.0/16",
        "via",
        "10.0.2.2",
        "dev",
        IF_OUT,
    ])?;
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    Ok(())
}

/// A 54-byte frame padded to a ring slot.
fn slot_of(frame: &[u8]) -> Result<[u8; 64]> {
    ensure!(
        frame.len() == FRAME_LEN,
        "bench frame is {} bytes, expected {FRAME_LEN}",
        frame.len()
    );
    let mut s = [0u8; 64];
    s[..FRAME_LEN].copy_from_slice(frame);
    Ok(s)
}

fn client_frame(src: SocketAddrV4, dst: SocketAddrV4, flags: u8) -> Vec<u8> {
    Packet::tcp(src, dst, flags)
        .macs(IN_MAC, CLIENT_GW_MAC)
        .build()
}

/// The programs under test, by the slot the wrapper tail-calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prog {
    Pass,
    Rewrite,
    Slot,
    Splitter,
}

/// A range of ring slots.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: u32,
    len: u32,
}

/// Counter moves a run must produce, exactly.
type Expected<'a> = &'a [(&'static str, u64)];

/// The loaded programs and the maps the bench drives.
struct Rig {
    dp: Dataplane,
    splitter: ProgramFd,
    pass: ProgramFd,
    rewrite: ProgramFd,
    slot: ProgramFd,
    wrapper: ProgramFd,
    target: ProgramArray<MapData>,
    ring: Array<MapData, [u8; 64]>,
    ctrl: Array<MapData, u32>,
    /// Owns the reference programs and their remaining maps.
    _baseline: Ebpf,
    if_in: u32,
    if_out: u32,
    target_now: Option<Prog>,
}

fn load_xdp(ebpf: &mut Ebpf, name: &'static str) -> Result<ProgramFd> {
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("{BASELINE_OBJECT} has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))?;
    prog.load()
        .with_context(|| format!("loading {name} (verifier)"))?;
    Ok(prog.fd()?.try_clone()?)
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &str,
    conv: impl FnOnce(aya::maps::Map) -> std::result::Result<T, aya::maps::MapError>,
) -> Result<T> {
    let m = ebpf
        .take_map(name)
        .with_context(|| format!("{BASELINE_OBJECT} has no map {name}"))?;
    conv(m).with_context(|| format!("map {name}"))
}

/// Connection-table entries of the measured program: `CONN_CAPACITY`, or
/// `SPLITTER_BENCH_CONN_CAPACITY` (a diagnostic: the same program with a
/// table of another size, as `dataplane.conn_capacity` sets it).
fn conn_capacity() -> Result<u32> {
    let Some(v) = std::env::var_os("SPLITTER_BENCH_CONN_CAPACITY") else {
        return Ok(CONN_CAPACITY);
    };
    let v = v.to_string_lossy();
    match v.parse::<u32>() {
        Ok(n) if (MIN_CONN_CAPACITY..=MAX_CONN_CAPACITY).contains(&n) => Ok(n),
        _ => bail!(
            "SPLITTER_BENCH_CONN_CAPACITY={v}: expected connection-table entries in {MIN_CONN_CAPACITY}..={MAX_CONN_CAPACITY}"
        ),
    }
}

impl Rig {
    fn load(conn_capacity: u32) -> Result<Self> {
        let mut dp =
            Dataplane::load_sized(conn_capacity).context("loading the splitter XDP program")?;
        dp.apply(&config(90, 10)?)
            .context("publishing the bench config")?;
        let raw = dp.program_fd()?;
        // SAFETY: `raw` belongs to `dp`, which outlives this borrow.
        let splitter = bpf::program_fd(unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) })?;

        let path = std::path::Path::new(BASELINE_OBJECT);
        ensure!(
            std::fs::metadata(path)
                .map(|m| m.len() > 0)
                .unwrap_or(false),
            "{BASELINE_OBJECT} is missing or empty (built with AYA_BUILD_SKIP?); run `cargo xtask bench` without it"
        );
        let mut bl = EbpfLoader::new()
            .load_file(path)
            .with_context(|| format!("loading {BASELINE_OBJECT}"))?;
        let pass = load_xdp(&mut bl, "bench_pass")?;
        let rewrite = load_xdp(&mut bl, "bench_rewrite")?;
        let slot = load_xdp(&mut bl, "bench_slot")?;
        let wrapper = load_xdp(&mut bl, "bench_wrapper")?;
        let target = take(&mut bl, "BENCH_TARGET", ProgramArray::try_from)?;
        let ring = take(&mut bl, "BENCH_RING", Array::try_from)?;
        let ctrl = take(&mut bl, "BENCH_CTRL", Array::try_from)?;

        // The slot-table program: the VIP, blue's table and backends.
        let mut vips: HashMap<MapData, ServiceKey, u32> =
            take(&mut bl, "SLOT_VIPS", HashMap::try_from)?;
        let mut tables: Array<MapData, MaglevTable> =
            take(&mut bl, "SLOT_TABLES", Array::try_from)?;
        let mut bes: Array<MapData, Backend> = take(&mut bl, "SLOT_BACKENDS", Array::try_from)?;
        let keys: Vec<String> = (0..BACKENDS_PER_VERSION)
            .map(|k| backend(0, k).to_string())
            .collect();
        let members: Vec<MaglevBackend<'_>> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| MaglevBackend {
                key: k,
                weight: 1,
                id: i as u16,
            })
            .collect();
        let table = maglev_table(&members).map_err(|e| anyhow!("slot table: {e}"))?;
        tables.set(0, *table, 0)?;
        for k in 0..BACKENDS_PER_VERSION {
            let b = backend(0, k);
            bes.set(
                u32::from(k),
                Backend {
                    addr: [u32::from(*b.ip()).to_be(), 0, 0, 0],
                    port: b.port().to_be(),
                    family: FAMILY_V4,
                    flags: BACKEND_F_PRESENT,
                    version: 0,
                    // Not read by `bench_slot`; 0 is the default timeout.
                    connect_timeout_ms: 0,
                },
                0,
            )?;
        }
        let key = ServiceKey {
            addr: [u32::from(*VIP.ip()).to_be(), 0, 0, 0],
            port: VIP.port().to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
        };
        vips.insert(key, 0, 0)?;

        Ok(Self {
            dp,
            splitter,
            pass,
            rewrite,
            slot,
            wrapper,
            target,
            ring,
            ctrl,
            _baseline: bl,
            if_in: ifindex(IF_IN)?,
            if_out: ifindex(IF_OUT)?,
            target_now: None,
        })
    }

    fn fd(&self, p: Prog) -> &ProgramFd {
        match p {
            Prog::Pass => &self.pass,
            Prog::Rewrite => &self.rewrite,
            Prog::Slot => &self.slot,
            Prog::Splitter => &self.splitter,
        }
    }

    fn write(&mut self, start: u32, frames: &[[u8; 64]]) -> Result<()> {
        ensure!(
            start as usize + frames.len() <= RING_CAPACITY as usize,
            "ring overflow"
        );
        for (i, f) in frames.iter().enumerate() {
            self.ring
                .set(start + i as u32, f, 0)
                .context("writing BENCH_RING")?;
        }
        Ok(())
    }

    /// One program run directly on one frame.
    fn single(
        &self,
        p: Prog,
        frame: &[u8],
        ingress: u32,
        repeat: u32,
    ) -> Result<(u32, Vec<u8>, f64)> {
        let r = test_run_xdp(self.fd(p).as_fd().as_raw_fd(), frame, Some(ingress), repeat)
            .context("BPF_PROG_TEST_RUN")?;
        Ok((r.action, r.data, f64::from(r.duration_ns)))
    }

    /// The wrapper on `seg`, tail-calling `p`, `repeat` iterations: the
    /// mean ns per iteration and the last action. Checks that the wrapper
    /// went through the frames it should have.
    fn wrapped(&mut self, p: Prog, seg: Segment, repeat: u32, ingress: u32) -> Result<(f64, u32)> {
        if self.target_now != Some(p) {
            let fd = match p {
                Prog::Pass => &self.pass,
                Prog::Rewrite => &self.rewrite,
                Prog::Slot => &self.slot,
                Prog::Splitter => &self.splitter,
            };
            self.target
                .set(0, fd, 0)
                .context("setting BENCH_TARGET (tail-call compatibility)")?;
            self.target_now = Some(p);
        }
        self.ctrl.set(1, seg.start, 0)?;
        self.ctrl.set(2, seg.start + seg.len, 0)?;
        self.ctrl.set(0, seg.start, 0)?;
        let r = test_run_xdp(
            self.wrapper.as_fd().as_raw_fd(),
            &[0u8; FRAME_LEN],
            Some(ingress),
            repeat,
        )
        .context("BPF_PROG_TEST_RUN of the wrapper")?;
        let cursor = self.ctrl.get(&0, 0)?;
        let want = seg.start + (repeat.max(1) - 1) % seg.len + 1;
        ensure!(
            cursor == want,
            "the wrapper stopped at frame {cursor}, expected {want}"
        );
        Ok((f64::from(r.duration_ns), r.action))
    }

    /// Like [`Rig::wrapped`] for the splitter, checking the action and
    /// that exactly the `expect`ed counters moved; a mismatch is returned
    /// as a problem, not an error. With `exhausted_ok`, up to 1% of the
    /// new flows may instead be dropped as `drop_snat_exhausted` (a full
    /// table: every probed SNAT port may be held by a live flow); how many
    /// is returned.
    fn splitter_run(
        &mut self,
        seg: Segment,
        repeat: u32,
        ingress: u32,
        action: u32,
        expect: Expected<'_>,
        exhausted_ok: bool,
    ) -> Result<(f64, u32, Option<String>, u64)> {
        let before = self.dp.counters()?;
        let (ns, got) = self.wrapped(Prog::Splitter, seg, repeat, ingress)?;
        let after = self.dp.counters()?;
        let moved: BTreeMap<&str, u64> = after
            .iter()
            .filter_map(|(k, v)| {
                let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
                (d != 0).then_some((*k, d))
            })
            .collect();
        let mut want: BTreeMap<&str, u64> = expect.iter().copied().collect();
        let exhausted = moved.get("drop_snat_exhausted").copied().unwrap_or(0);
        if exhausted_ok && exhausted > 0 && exhausted <= u64::from(repeat) / 100 {
            for k in ["new_flow", "redirect"] {
                if let Some(v) = want.get_mut(k) {
                    *v = v.saturating_sub(exhausted);
                }
            }
            want.insert("drop_snat_exhausted", exhausted);
        }
        let mut problem = None;
        if got != action || moved != want {
            problem = Some(format!(
                "last action {} (expected {}), counters moved {moved:?} (expected {want:?})",
                xdp_action::name(got),
                xdp_action::name(action)
            ));
        }
        Ok((ns, got, problem, exhausted))
    }
}

fn new_case(
    id: &'static str,
    label: &str,
    program: &'static str,
    frames: u32,
    repeat: u32,
) -> PacketCase {
    PacketCase {
        id,
        label: label.to_string(),
        program,
        frames,
        repeat,
        conn_entries: None,
        gross: Vec::new(),
        harness: Vec::new(),
        action: String::new(),
        problems: Vec::new(),
    }
}

fn record(case: &mut PacketCase, gross: f64, harness: f64, action: u32, problem: Option<String>) {
    case.gross.push(gross);
    case.harness.push(harness);
    case.action = xdp_action::name(action).to_string();
    if let Some(p) = problem
        && case.problems.len() < 3
    {
        case.problems.push(p);
    }
}

fn check_action(got: u32, want: u32) -> Option<String> {
    (got != want).then(|| {
        format!(
            "last action {}, expected {}",
            xdp_action::name(got),
            xdp_action::name(want)
        )
    })
}

/// Pins the calling thread to the last CPU; returns it, or `None` if refused.
fn pin_to_last_cpu() -> Option<usize> {
    let n = std::thread::available_parallelism().ok()?.get();
    let cpu = n - 1;
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it for cpu < CPU_SETSIZE; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0)
            .then_some(cpu)
    }
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Runs the whole section. Call from a thread inside the bench namespace
/// (after [`build_topology`]).
///
/// # Errors
/// Loading or driving the programs failed; a failed path check is a
/// problem in the results instead.
pub fn run(opts: PacketOptions) -> Result<(PacketResults, Extras)> {
    let pinned_cpu = pin_to_last_cpu();
    let flows = opts.flows.clamp(1, SEGMENT);
    let rounds = opts.rounds.max(1);
    let capacity = conn_capacity()?;
    ensure!(
        u64::from(flows) * 2 <= u64::from(capacity),
        "{flows} live flows need {} connection-table entries; SPLITTER_BENCH_CONN_CAPACITY is {capacity}",
        u64::from(flows) * 2
    );
    let mut rig = Rig::load(capacity)?;
    let (if_in, if_out) = (rig.if_in, rig.if_out);
    let mut res = PacketResults {
        rounds,
        flows,
        ..PacketResults::default()
    };

    // Sizes of every program, from the kernel.
    for (name, p) in [
        ("splitter", Prog::Splitter),
        ("bench_rewrite (floor)", Prog::Rewrite),
        ("bench_slot", Prog::Slot),
        ("bench_pass", Prog::Pass),
    ] {
        res.programs.push(bpf::program_size(name, rig.fd(p))?);
    }
    res.programs
        .push(bpf::program_size("bench_wrapper", &rig.wrapper)?);

    // 1. Live flows, one single run per SYN and per SYN-ACK, so that the
    //    reply frames can name each flow's SNAT port. Also the cross-check
    //    by single runs.
    let est_seg = Segment {
        start: 0,
        len: flows,
    };
    let reply_seg = Segment {
        start: SEGMENT,
        len: flows,
    };
    let nonvip_seg = Segment {
        start: 2 * SEGMENT,
        len: flows,
    };
    let scratch = 3 * SEGMENT;
    let mut est_frames = Vec::with_capacity(flows as usize);
    let mut reply_frames = Vec::with_capacity(flows as usize);
    let mut nonvip_frames = Vec::with_capacity(flows as usize);
    let (mut syn_ns, mut est_ns, mut pass_ns) = (Vec::new(), Vec::new(), Vec::new());
    let mut setup_problems = Vec::new();
    for i in 0..flows {
        let c = client(i, ports::ESTABLISHED);
        let (action, out, ns) =
            rig.single(Prog::Splitter, &client_frame(c, VIP, TCP_SYN), if_in, 1)?;
        syn_ns.push(ns);
        let view = parse(&out).map_err(|e| anyhow!("SYN output: {e}"))?;
        let (Some(snat), Some(be)) = (view.source(), view.destination()) else {
            bail!("SYN output has no TCP endpoints");
        };
        if action != xdp_action::REDIRECT || *snat.ip() != SNAT {
            bail!(
                "SYN {c}: {} to {be} from {snat}; expected XDP_REDIRECT from {SNAT} (is the FIB set up?)",
                xdp_action::name(action)
            );
        }
        if i == 0
            && let Err(e) = verify_checksums(&out)
        {
            setup_problems.push(format!("SYN output checksum: {e}"));
        }
        let synack = Packet::tcp(be, snat, TCP_SYN | TCP_ACK)
            .macs(OUT_MAC, BACKEND_GW_MAC)
            .build();
        let (action, _, _) = rig.single(Prog::Splitter, &synack, if_out, 1)?;
        ensure!(
            action == xdp_action::REDIRECT,
            "SYN-ACK from {be}: {}",
            xdp_action::name(action)
        );
        est_frames.push(slot_of(&client_frame(c, VIP, TCP_ACK | TCP_PSH))?);
        reply_frames.push(slot_of(
            &Packet::tcp(be, snat, TCP_ACK)
                .macs(OUT_MAC, BACKEND_GW_MAC)
                .build(),
        )?);
        nonvip_frames.push(slot_of(&client_frame(
            client(i, ports::NOT_VIP),
            NOT_VIP,
            TCP_ACK,
        ))?);
    }
    for f in &est_frames {
        let (action, _, ns) = rig.single(Prog::Splitter, &f[..FRAME_LEN], if_in, 1)?;
        ensure!(
            action == xdp_action::REDIRECT,
            "established packet: {}",
            xdp_action::name(action)
        );
        est_ns.push(ns);
        let (_, _, ns) = rig.single(Prog::Pass, &f[..FRAME_LEN], if_in, 1)?;
        pass_ns.push(ns);
    }
    let pass_mean = mean(&pass_ns);
    res.single_runs.push(SingleRun {
        id: "syn",
        label: "SYN, new flow".into(),
        runs: syn_ns.len(),
        mean_ns: mean(&syn_ns),
        net_ns: mean(&syn_ns) - pass_mean,
    });
    res.single_runs.push(SingleRun {
        id: "established",
        label: "established-flow packet".into(),
        runs: est_ns.len(),
        mean_ns: mean(&est_ns),
        net_ns: mean(&est_ns) - pass_mean,
    });
    rig.write(est_seg.start, &est_frames)?;
    rig.write(reply_seg.start, &reply_frames)?;
    rig.write(nonvip_seg.start, &nonvip_frames)?;

    // The reference programs' output, checked once.
    let first = &est_frames[0][..FRAME_LEN];
    for (p, name) in [(Prog::Rewrite, "floor"), (Prog::Slot, "slot table")] {
        let (action, out, _) = rig.single(p, first, if_in, 1)?;
        let dst = parse(&out).ok().and_then(|v| v.destination());
        let ok_dst = match p {
            Prog::Rewrite => dst == Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 2), 8080)),
            _ => dst.is_some_and(|d| d.ip().octets()[..3] == [10, 2, 0]),
        };
        ensure!(
            action == xdp_action::TX && ok_dst && verify_checksums(&out).is_ok(),
            "the {name} program's output is wrong: {}, to {dst:?}, checksums {:?}",
            xdp_action::name(action),
            verify_checksums(&out)
        );
    }

    // 2. Rounds, every case in each, the order of the ring cases rotated.
    let repeat = flows * PASSES;
    let live_entries = 2 * u64::from(flows);
    let mut floor = new_case(
        "floor",
        "floor: parse + DNAT + XDP_TX",
        "bench_rewrite",
        flows,
        repeat,
    );
    let mut slot = new_case(
        "slot",
        "minimal slot-table balancer",
        "bench_slot",
        flows,
        repeat,
    );
    let mut nonvip = new_case(
        "non_vip",
        "splitter: packet to no VIP",
        "splitter",
        flows,
        repeat,
    );
    let mut est = new_case(
        "established",
        "splitter: established flow",
        "splitter",
        flows,
        repeat,
    );
    let mut reply = new_case(
        "reply",
        "splitter: reply (return path)",
        "splitter",
        flows,
        repeat,
    );
    let mut syn = new_case(
        "syn",
        "splitter: SYN, new flow",
        "splitter",
        SYN_BATCH,
        SYN_BATCH,
    );
    est.conn_entries = Some(live_entries);
    reply.conn_entries = Some(live_entries);
    nonvip.conn_entries = Some(live_entries);
    syn.conn_entries = Some(live_entries);
    floor.problems = setup_problems;
    // Source-CIDR rules (docs/benchmarks.md, "Source-CIDR targeting"):
    // each rule set published in turn every round, a fresh SYN batch and
    // the established segment run under it, then the plain config again.
    let targets = std::env::var_os("SPLITTER_BENCH_TARGETS").is_some();
    // Each round's SYN batches stay in the table; they must fit beside the
    // live flows (or the LRU would evict the established segment's flows).
    let round_flows = u64::from(SYN_BATCH) * if targets { 4 } else { 1 };
    ensure!(
        (u64::from(flows) + rounds as u64 * round_flows) * 2 <= u64::from(capacity),
        "{rounds} rounds of {round_flows} new flows beside {flows} live ones overflow the {capacity}-entry connection table: use fewer rounds"
    );
    let variants = if targets {
        target_variants()?
    } else {
        Vec::new()
    };
    let mut target_cases: Vec<(PacketCase, PacketCase)> = variants
        .iter()
        .map(|(id, label, _, _)| {
            let mut syn_case = new_case(id, label, "splitter", SYN_BATCH, SYN_BATCH);
            syn_case.conn_entries = Some(live_entries);
            // The established path never reads the rules: measured under
            // each set all the same, to show it.
            let est_label = label
                .replace("SYN", "established flow")
                .replace(", matched", " published")
                .replace(", none matched", " published (other set)");
            let mut est_case = new_case(
                match *id {
                    "syn_targets_10" => "est_targets_10",
                    "syn_targets_10k" => "est_targets_10k",
                    _ => "est_targets_10k_miss",
                },
                &est_label,
                "splitter",
                flows,
                repeat,
            );
            est_case.conn_entries = Some(live_entries);
            (syn_case, est_case)
        })
        .collect();
    let plain = config(90, 10)?;
    for r in 0..rounds {
        let (_, _, lp) = rig.single(Prog::Pass, first, if_in, repeat)?;
        res.test_loop.push(lp);
        let (h_est, _) = rig.wrapped(Prog::Pass, est_seg, repeat, if_in)?;
        let (h_reply, _) = rig.wrapped(Prog::Pass, reply_seg, repeat, if_out)?;
        let (h_nonvip, _) = rig.wrapped(Prog::Pass, nonvip_seg, repeat, if_in)?;
        res.harness.push(h_est);
        for k in 0..5 {
            match (k + r) % 5 {
                0 => {
                    let (g, a) = rig.wrapped(Prog::Rewrite, est_seg, repeat, if_in)?;
                    record(&mut floor, g, h_est, a, check_action(a, xdp_action::TX));
                }
                1 => {
                    let (g, a) = rig.wrapped(Prog::Slot, est_seg, repeat, if_in)?;
                    record(&mut slot, g, h_est, a, check_action(a, xdp_action::TX));
                }
                2 => {
                    let (g, a, p, _) = rig.splitter_run(
                        est_seg,
                        repeat,
                        if_in,
                        xdp_action::REDIRECT,
                        &[("redirect", u64::from(repeat))],
                        false,
                    )?;
                    record(&mut est, g, h_est, a, p);
                }
                3 => {
                    let (g, a, p, _) = rig.splitter_run(
                        reply_seg,
                        repeat,
                        if_out,
                        xdp_action::REDIRECT,
                        &[("redirect", u64::from(repeat))],
                        false,
                    )?;
                    record(&mut reply, g, h_reply, a, p);
                }
                _ => {
                    let (g, a, p, _) =
                        rig.splitter_run(nonvip_seg, repeat, if_in, xdp_action::PASS, &[], false)?;
                    record(&mut nonvip, g, h_nonvip, a, p);
                }
            }
        }
        // Fresh SYNs: the table grows by SYN_BATCH flows per round.
        let batch: Vec<[u8; 64]> = (0..SYN_BATCH)
            .map(|i| {
                slot_of(&client_frame(
                    client(i, ports::SYN_LIVE + r as u16),
                    VIP,
                    TCP_SYN,
                ))
            })
            .collect::<Result<_>>()?;
        rig.write(scratch, &batch)?;
        let seg = Segment {
            start: scratch,
            len: SYN_BATCH,
        };
        let (h, _) = rig.wrapped(Prog::Pass, seg, SYN_BATCH, if_in)?;
        let n = u64::from(SYN_BATCH);
        let (g, a, p, _) = rig.splitter_run(
            seg,
            SYN_BATCH,
            if_in,
            xdp_action::REDIRECT,
            &[("new_flow", n), ("redirect", n)],
            false,
        )?;
        record(&mut syn, g, h, a, p);
        for (k, (_, _, cfg, matched)) in variants.iter().enumerate() {
            rig.dp.apply(cfg).context("publishing target rules")?;
            let batch: Vec<[u8; 64]> = (0..SYN_BATCH)
                .map(|i| {
                    slot_of(&client_frame(
                        client(i, ports::SYN_TARGETS + 4 * r as u16 + k as u16),
                        VIP,
                        TCP_SYN,
                    ))
                })
                .collect::<Result<_>>()?;
            rig.write(scratch, &batch)?;
            let (h, _) = rig.wrapped(Prog::Pass, seg, SYN_BATCH, if_in)?;
            let mut want = vec![("new_flow", n), ("redirect", n)];
            if *matched {
                want.push(("new_flow_targeted", n));
            }
            let (g, a, p, _) =
                rig.splitter_run(seg, SYN_BATCH, if_in, xdp_action::REDIRECT, &want, false)?;
            record(&mut target_cases[k].0, g, h, a, p);
            let (g, a, p, _) = rig.splitter_run(
                est_seg,
                repeat,
                if_in,
                xdp_action::REDIRECT,
                &[("redirect", u64::from(repeat))],
                false,
            )?;
            record(&mut target_cases[k].1, g, h_est, a, p);
            rig.dp
                .apply(&plain)
                .context("publishing the plain config")?;
        }
    }

    // 3. Fill the connection table past capacity (the LRU then evicts on
    //    every insert), then fresh SYNs again.
    let cap_flows = capacity / 2;
    let mut live = flows + rounds as u32 * SYN_BATCH * (1 + variants.len() as u32);
    let goal = cap_flows + cap_flows / 8;
    let mut chunk = 0u16;
    let mut fill_moves: BTreeMap<&'static str, u64> = BTreeMap::new();
    while live < goal && chunk < 64 {
        let n = (goal - live).min(SEGMENT);
        let frames: Vec<[u8; 64]> = (0..n)
            .map(|i| slot_of(&client_frame(client(i, ports::FILL + chunk), VIP, TCP_SYN)))
            .collect::<Result<_>>()?;
        rig.write(scratch, &frames)?;
        let before = rig.dp.counters()?;
        rig.wrapped(
            Prog::Splitter,
            Segment {
                start: scratch,
                len: n,
            },
            n,
            if_in,
        )?;
        for (k, v) in rig.dp.counters()? {
            let d = v.saturating_sub(before.get(k).copied().unwrap_or(0));
            if d != 0 {
                *fill_moves.entry(k).or_default() += d;
            }
        }
        live += n;
        chunk += 1;
    }
    res.notes.push(format!(
        "Before the full-table rounds, {live} SYNs had made flows (two entries each) in the {capacity}-entry connection table, {}% of its capacity; counters moved by the last {} of them: {fill_moves:?}.",
        u64::from(live) * 200 / u64::from(capacity),
        live - flows - rounds as u32 * SYN_BATCH * (1 + variants.len() as u32)
    ));
    let mut syn_full = new_case(
        "syn_full",
        "splitter: SYN, full connection table",
        "splitter",
        SYN_BATCH,
        SYN_BATCH,
    );
    syn_full.conn_entries = Some(u64::from(capacity));
    if capacity != CONN_CAPACITY {
        res.notes.push(format!(
            "Diagnostic run: the connection table has {capacity} entries (SPLITTER_BENCH_CONN_CAPACITY), not the default {CONN_CAPACITY}."
        ));
    }
    let mut exhausted = 0u64;
    for r in 0..rounds {
        let batch: Vec<[u8; 64]> = (0..SYN_BATCH)
            .map(|i| {
                slot_of(&client_frame(
                    client(i, ports::SYN_FULL + r as u16),
                    VIP,
                    TCP_SYN,
                ))
            })
            .collect::<Result<_>>()?;
        rig.write(scratch, &batch)?;
        let seg = Segment {
            start: scratch,
            len: SYN_BATCH,
        };
        let (h, _) = rig.wrapped(Prog::Pass, seg, SYN_BATCH, if_in)?;
        let n = u64::from(SYN_BATCH);
        let (g, a, p, ex) = rig.splitter_run(
            seg,
            SYN_BATCH,
            if_in,
            xdp_action::REDIRECT,
            &[("new_flow", n), ("redirect", n)],
            true,
        )?;
        exhausted += ex;
        record(&mut syn_full, g, h, a, p);
    }
    if exhausted > 0 {
        res.notes.push(format!(
            "{exhausted} of {} SYNs into the full table were dropped as drop_snat_exhausted: all {} SNAT ports probed were held by live flows ({BACKENDS_PER_VERSION} backends per version).",
            u64::from(SYN_BATCH) * rounds as u64,
            splitter_common::SNAT_PORT_TRIES
        ));
    }
    res.cases = vec![floor, slot, nonvip, est, reply, syn];
    for (s, e) in target_cases {
        res.cases.push(s);
        res.cases.push(e);
    }
    res.cases.push(syn_full);

    // The full table, read the way `splitter status` counts live flows.
    let (mut live_scan_ms, mut live_scan_flows) = (Vec::new(), 0);
    for _ in 0..3 {
        let now = splitter::dataplane::monotonic_ns();
        let t = Instant::now();
        let counts = rig.dp.live_flows(now).context("counting live flows")?;
        live_scan_ms.push(t.elapsed().as_secs_f64() * 1e3);
        live_scan_flows = counts.values().sum();
    }

    // 4. Weight changes: each apply, then one fresh SYN must follow it.
    let (mut apply_us, mut misses) = (Vec::new(), 0);
    let configs = [config(0, 100)?, config(100, 0)?];
    for k in 0..WEIGHT_CHANGES {
        let green = k % 2 == 0;
        let cfg = &configs[usize::from(!green)];
        let t = Instant::now();
        rig.dp.apply(cfg).context("applying a weight change")?;
        apply_us.push(t.elapsed().as_secs_f64() * 1e6);
        let f = client_frame(client(k, ports::WEIGHTS), VIP, TCP_SYN);
        let (_, out, _) = rig.single(Prog::Splitter, &f, if_in, 1)?;
        let third = parse(&out)
            .ok()
            .and_then(|v| v.destination())
            .map(|d| d.ip().octets()[2]);
        if third != Some(u8::from(green)) {
            misses += 1;
        }
    }

    let (rollback_us, rollback_misses) = rollbacks(if_in)?;

    let maps = bpf::map_memory(&rig.splitter)?;
    Ok((
        res,
        Extras {
            apply_us,
            rollback_us,
            rollback_misses,
            live_scan_ms,
            live_scan_flows,
            apply_misses: misses,
            maps,
            pinned_cpu,
        },
    ))
}

/// Rollbacks measured: a controller over a program of its own runs a
/// canary at 50%; a failed verdict goes in, and the time until the machine's
/// first action (stable at 100%) is published is taken. Then 16 new flows
/// from fresh ports must all reach the stable version. `ROLLBACKS` rounds,
/// each rollout retried from its first step.
fn rollbacks(if_in: u32) -> Result<(Vec<f64>, usize)> {
    use splitter::{
        controller::Controller,
        dataplane::{Dataplane, monotonic_ns},
        rollout::{
            driver::StartRequest,
            machine::{Command, Event},
        },
        signals::{Window, analysis},
    };
    const ROLLBACKS: u32 = 100;
    let cfg = config(100, 0)?;
    let mut dp = Dataplane::load().context("loading a second program for the rollback rounds")?;
    dp.apply(&cfg)?;
    let fd = dp.program_fd()?;
    let mut c = Controller::new(cfg, dp, None);
    let now = || monotonic_ns() / 1_000_000;
    let req = StartRequest {
        service: "web".into(),
        to: "green".into(),
        steps: Some(vec![50, 100]),
        step_ms: Some(3_600_000),
        analysis_interval_ms: Some(1000),
        ..StartRequest::default()
    };
    // A window that fails the default criteria: every attempt refused.
    let bad = Window {
        seconds: 1.0,
        attempts: 100,
        refused: 100,
        attempts_per_sec: 100.0,
        error_rate: Some(1.0),
        ..Window::default()
    };
    let fail = analysis::analyse(
        &bad,
        None,
        &analysis::MetricInput::default(),
        &analysis::Criteria::default(),
    );
    anyhow::ensure!(
        fail.name() == "fail",
        "the bench's window should fail: {fail:?}"
    );
    let (mut us, mut misses) = (Vec::new(), 0);
    for k in 0..ROLLBACKS {
        if k == 0 {
            c.rollout_start(&req, now()).map_err(|e| anyhow!("{e}"))?;
        } else {
            c.rollout_command("web", Command::Retry, now())
                .map_err(|e| anyhow!("{e}"))?;
        }
        let event = Event::Analysis {
            at_ms: now(),
            verdict: fail.clone(),
        };
        let t = Instant::now();
        c.rollout_event("web", event).map_err(|e| anyhow!("{e}"))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        for j in 0..16u32 {
            let f = client_frame(client(k * 16 + j, ports::ROLLBACK), VIP, TCP_SYN);
            let r = test_run_xdp(fd, &f, Some(if_in), 1).context("BPF_PROG_TEST_RUN")?;
            let third = parse(&r.data)
                .ok()
                .and_then(|v| v.destination())
                .map(|d| d.ip().octets()[2]);
            if third != Some(0) {
                misses += 1;
                break;
            }
        }
    }
    Ok((us, misses))
}
