//! Through-edge throughput: 64-byte UDP and TCP frames from an in-kernel
//! generator in the client namespace, through the edge namespace, counted at
//! the backends, for four edges side by side in the same rounds:
//!
//! - `gen_only` (a reference): `edge_drop` on `ec` drops every frame on
//!   arrival, counted there: the generator's and veth's share of each path;
//! - `forward`: plain kernel forwarding (frames addressed to a backend);
//! - `nftables`: DNAT + SNAT, a `numgen random` 90/10 split over two backends;
//! - `xdp_min`: `edge_fwd` (`bench-ebpf/src/bin/edgebench.rs`), the
//!   minimal XDP rewrite + redirect to one backend, native mode on `ec`;
//! - `splitter`: the real daemon, a 90/10 two-version service per protocol
//!   in SNAT mode, native XDP on `ec` and `eb`.
//!
//! # Method
//! The topology is the tests' three namespaces
//! ([`splitter_tests::topology`]). The generator is `edge_gen`, run with
//! `BPF_PROG_TEST_RUN` and `BPF_F_TEST_XDP_LIVE_FRAMES` on `c0` (from a
//! thread in the client namespace, pinned to the last CPU): each frame gets
//! the next of [`FLOWS`] source ports and leaves through `c0` into `ec`.
//! On `b0` the receiver `edge_sink` counts per destination and drops; it
//! answers a SYN with a SYN-ACK so that conntrack sees handshakes. `c0`
//! drops what comes back (`edge_drop`). GRO is on for `ec` and `eb`, so
//! that frames sent into them by XDP are received when no XDP program is
//! attached (veth needs NAPI for that).
//!
//! For TCP every flow is opened first: one SYN per source port, the
//! backends' SYN-ACKs, then the data frames (ACK + 6 bytes) are the ones
//! counted. Each measurement: a warm-up, then the backends' count over a
//! fixed window. Every round runs every case (order rotated), so drift on
//! the shared machine hits them alike; ratios are taken within a round.
use std::{
    io,
    mem::size_of,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMap, MapData, PerCpuArray},
    programs::{
        ProgramFd, Xdp, XdpMode,
        xdp::{XdpLink, XdpLinkId},
    },
};
use splitter_tests::{
    netns::Netns,
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, parse, verify_checksums},
    splitter::{Affinity, Daemon, Mode, ServiceSpec, VersionSpec, config_toml},
    testrun::{test_run_xdp, xdp_action},
    topology::{
        BACKEND_IF, BACKEND_PORT, CLIENT_ADDR, CLIENT_IF, EDGE_BACKEND_ADDR, EDGE_BACKEND_IF,
        EDGE_CLIENT_IF, Topology, TopologyOptions, VIP, VIP_PORT,
    },
};

use super::edge_report::{EdgeCase, EdgeResults};

/// Distinct flows (source ports) per measurement.
pub const FLOWS: u32 = 4096;
/// Time before the window, so queues and caches settle.
const WARMUP: Duration = Duration::from_millis(300);
/// The counting window.
pub const WINDOW: Duration = Duration::from_millis(1500);
/// Frames per generator test run (well under a second each).
const GEN_REPEAT: u32 = 1 << 18;
/// Longest a generator thread may run, whatever happens.
const GEN_LIMIT: Duration = Duration::from_secs(15);
/// Every generated frame (SYNs padded): 64 bytes on the wire with the FCS.
const FRAME_LEN: usize = 60;
/// Payload so that every data frame is 60 bytes (64 on the wire with FCS).
const TCP_PAYLOAD: [u8; 6] = [0x55; 6];
const UDP_PAYLOAD: [u8; 18] = [0x55; 18];
/// `SINK_COUNT` slots (edgebench.rs).
const SINK_DATA: u32 = 0;
const SINK_SYN: u32 = 1;
/// Slot `edge_drop` counts in.
const SINK_DROPPED: u32 = 3;
const SINK_BY_HOST: u32 = 8;
/// Blue and green backends (last octets) of the split cases.
const BLUE: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const GREEN: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
const NFT_TABLE: &str = "splitter_edgebench";

/// The edges compared, in the order shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edge {
    /// Reference: the edge drops every frame on arrival (`edge_drop` on `ec`).
    GenOnly,
    Forward,
    Nftables,
    XdpMin,
    Splitter,
    /// splitter with the UDP service mirrored: blue 100, green 0 as the
    /// shadow of 10% of the datagrams (the TCP service as in `Splitter`).
    SplitterShadow,
}

impl Edge {
    pub const ALL: [Edge; 6] = [
        Edge::GenOnly,
        Edge::Forward,
        Edge::Nftables,
        Edge::XdpMin,
        Edge::Splitter,
        Edge::SplitterShadow,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Edge::GenOnly => "gen_only",
            Edge::Forward => "forward",
            Edge::Nftables => "nftables",
            Edge::XdpMin => "xdp_min",
            Edge::Splitter => "splitter",
            Edge::SplitterShadow => "splitter_shadow",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Edge::GenOnly => "generator only (edge drops at ingress)",
            Edge::Forward => "kernel forwarding, no NAT",
            Edge::Nftables => "nftables DNAT+SNAT, numgen 90/10",
            Edge::XdpMin => "minimal XDP rewrite + redirect",
            Edge::Splitter => "splitter, SNAT, 90/10",
            Edge::SplitterShadow => {
                "splitter, SNAT, the UDP service at blue 100 mirroring 10% of its datagrams to green (UDP rate counts the copies, green = copies; the TCP service is not mirrored)"
            }
        }
    }
}

/// Options of the section.
#[derive(Debug, Clone, Copy)]
pub struct EdgeOptions {
    pub rounds: usize,
}

/// The object file with the generator, receiver and minimal forwarder.
fn object_path() -> std::path::PathBuf {
    std::path::PathBuf::from(super::EDGEBENCH_OBJECT)
}

/// One live-frames test run: `repeat` copies of `frame`, each through the
/// program and, on `XDP_TX`, out of interface `ifindex` (calling thread's
/// namespace).
fn live_run(prog: &ProgramFd, frame: &[u8], ifindex: u32, repeat: u32) -> io::Result<()> {
    splitter_tests::testrun::test_run_xdp_live(prog.as_fd().as_raw_fd(), frame, ifindex, repeat)
}

fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a valid NUL-terminated string; looked up in this thread's netns.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        bail!("no interface {name}: {}", io::Error::last_os_error());
    }
    Ok(i)
}

/// The MAC of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let json = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let s = v
        .get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .with_context(|| format!("no MAC for {dev} in {}", ns.name()))?;
    let mut m = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC {s} for {dev}");
    }
    for (b, p) in m.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC {s}"))?;
    }
    Ok(m)
}

/// Pins the calling thread to the last CPU; returns it, or `None` if refused.
fn pin_to_last_cpu() -> Option<usize> {
    let n = thread::available_parallelism().ok()?.get();
    let cpu = n - 1;
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it for cpu < CPU_SETSIZE; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        (libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) == 0).then_some(cpu)
    }
}

/// The loaded programs and maps, and where they are attached.
struct Rig {
    ebpf: Ebpf,
    gen_fd: ProgramFd,
    gen_cfg: Array<MapData, [u32; 2]>,
    gen_tmpl: Array<MapData, [u64; 8]>,
    gen_seq: PerCpuArray<MapData, u64>,
    sink: PerCpuArray<MapData, u64>,
    fwd_cfg: Array<MapData, [u8; 24]>,
    fwd_dev: DevMap<MapData>,
    c0_index: u32,
}

/// The XDP program `name` of the edgebench object.
fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .with_context(|| format!("edgebench object has no program {name}"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

fn load_prog<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let p = xdp(ebpf, name)?;
    p.load()
        .with_context(|| format!("loading {name} (verifier)"))?;
    Ok(p)
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("edgebench object has no map {name}"))
}

/// Attaches program `name` (loaded) to `dev` in `ns`, native mode.
fn attach(ebpf: &mut Ebpf, ns: &Netns, name: &str, dev: &str) -> Result<XdpLinkId> {
    let p = xdp(ebpf, name)?;
    ns.enter(|| p.attach(dev, XdpMode::Driver))?
        .with_context(|| format!("attaching {name} to {dev} in {} (native XDP)", ns.name()))
}

/// [`attach`], the link then owned by the caller (detached on drop).
fn attach_link(ebpf: &mut Ebpf, ns: &Netns, name: &str, dev: &str) -> Result<XdpLink> {
    let id = attach(ebpf, ns, name, dev)?;
    Ok(xdp(ebpf, name)?.take_link(id)?)
}

impl Rig {
    fn load(topo: &Topology) -> Result<Self> {
        let path = object_path();
        if !std::fs::metadata(&path)
            .map(|m| m.len() > 0)
            .unwrap_or(false)
        {
            bail!(
                "{} is missing or empty (built with AYA_BUILD_SKIP?); run `cargo xtask bench` without it",
                path.display()
            );
        }
        let mut ebpf = EbpfLoader::new()
            .load_file(&path)
            .with_context(|| format!("loading {}", path.display()))?;
        for name in ["edge_gen", "edge_sink", "edge_drop", "edge_fwd"] {
            load_prog(&mut ebpf, name)?;
        }
        let gen_fd = {
            let p: &mut Xdp = ebpf
                .program_mut("edge_gen")
                .context("no edge_gen")?
                .try_into()?;
            p.fd()?.try_clone()?
        };
        let gen_cfg = Array::try_from(take_map(&mut ebpf, "GEN_CFG")?)?;
        let gen_tmpl = Array::try_from(take_map(&mut ebpf, "GEN_TMPL")?)?;
        let gen_seq = PerCpuArray::try_from(take_map(&mut ebpf, "GEN_SEQ")?)?;
        let sink = PerCpuArray::try_from(take_map(&mut ebpf, "SINK_COUNT")?)?;
        let fwd_cfg = Array::try_from(take_map(&mut ebpf, "FWD_CFG")?)?;
        let fwd_dev = DevMap::try_from(take_map(&mut ebpf, "FWD_DEV")?)?;
        // Attached for the whole section (links live as long as `ebpf`).
        attach(&mut ebpf, &topo.back, "edge_sink", BACKEND_IF)?;
        attach(&mut ebpf, &topo.cli, "edge_drop", CLIENT_IF)?;
        let c0_index = topo.cli.enter(|| ifindex(CLIENT_IF))??;
        Ok(Self {
            ebpf,
            gen_fd,
            gen_cfg,
            gen_tmpl,
            gen_seq,
            sink,
            fwd_cfg,
            fwd_dev,
            c0_index,
        })
    }

    /// Makes `frame` (padded to [`FRAME_LEN`]) the generator's template.
    fn template(&mut self, frame: &[u8]) -> Result<Vec<u8>> {
        if frame.len() > FRAME_LEN {
            bail!(
                "generator frame is {} bytes, at most {FRAME_LEN}",
                frame.len()
            );
        }
        let mut bytes = [0u8; 64];
        bytes[..frame.len()].copy_from_slice(frame);
        let mut words = [0u64; 8];
        for (w, c) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            *w = u64::from_ne_bytes(b);
        }
        self.gen_tmpl.set(0, words, 0)?;
        Ok(bytes[..FRAME_LEN].to_vec())
    }

    /// Runs `name` once on `frame` (no live frames): the action and output.
    fn single(&mut self, name: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        let p: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .with_context(|| format!("no program {name}"))?
            .try_into()?;
        let r = test_run_xdp(p.fd()?.as_fd().as_raw_fd(), frame, None, 1)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        Ok((r.action, r.data))
    }

    /// The generator's and the receiver's rewrites, checked once: every
    /// checksum must verify from scratch (conntrack drops bad ones).
    fn self_check(&mut self) -> Result<()> {
        let src = SocketAddrV4::new(CLIENT_ADDR, 5000);
        let dst = SocketAddrV4::new(VIP, VIP_PORT);
        for (proto, f) in [
            (
                "tcp",
                Packet::tcp(src, dst, TCP_ACK).payload(&TCP_PAYLOAD).build(),
            ),
            ("udp", Packet::udp(src, dst, &UDP_PAYLOAD).build()),
        ] {
            let f = self.template(&f)?;
            self.gen_cfg.set(0, [FLOWS, 0], 0)?;
            for _ in 0..3 {
                let (a, out) = self.single("edge_gen", &f)?;
                ensure!(a == xdp_action::TX, "edge_gen: {}", xdp_action::name(a));
                verify_checksums(&out).map_err(|e| anyhow!("edge_gen {proto} output: {e}"))?;
            }
        }
        let syn = Packet::tcp(src, SocketAddrV4::new(BLUE, BACKEND_PORT), TCP_SYN).build();
        let (a, out) = self.single("edge_sink", &syn)?;
        ensure!(
            a == xdp_action::REDIRECT,
            "edge_sink on a SYN: {}",
            xdp_action::name(a)
        );
        verify_checksums(&out).map_err(|e| anyhow!("edge_sink's SYN-ACK: {e}"))?;
        Ok(())
    }

    fn sink_count(&self, slot: u32) -> Result<u64> {
        Ok(self.sink.get(&slot, 0)?.iter().sum())
    }

    fn generated(&self) -> Result<u64> {
        Ok(self.gen_seq.get(&0, 0)?.iter().sum())
    }
}

/// What the edge is set up as for one case; torn down on drop.
enum Setup<'a> {
    None,
    Nft(&'a Netns),
    /// Detached when dropped.
    Xdp(#[allow(dead_code)] XdpLink),
    Splitter(Box<Daemon>),
}

impl Drop for Setup<'_> {
    fn drop(&mut self) {
        match self {
            Setup::None => {}
            Setup::Nft(edge) => {
                if let Err(e) = edge.exec("nft", &["delete", "table", "ip", NFT_TABLE]) {
                    eprintln!("warning: removing the nftables table: {e:#}");
                }
            }
            Setup::Xdp(_) => {}
            Setup::Splitter(d) => {
                let _ = d.stop();
            }
        }
    }
}

fn nft_ruleset() -> String {
    format!(
        "table ip {NFT_TABLE} {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP} meta l4proto {{ tcp, udp }} th dport {VIP_PORT} dnat to numgen random mod 100 map {{ 0-89 : {BLUE}, 90-99 : {GREEN} }} : {BACKEND_PORT}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname \"{EDGE_BACKEND_IF}\" ip daddr 10.0.2.0/24 snat to {EDGE_BACKEND_ADDR}
  }}
}}
"
    )
}

/// [`splitter_config`] with the UDP service (the last one) at blue 100,
/// green 0, mirroring 10% of its datagrams to green.
fn splitter_shadow_config() -> Result<String> {
    let c = splitter_config();
    let Some((head, udp)) = c.split_once("name = \"dgram\"") else {
        bail!("the bench's config has no UDP service \"dgram\" to mirror");
    };
    let udp =
        udp.replacen("weight = 90", "weight = 100", 1)
            .replacen("weight = 10\n", "weight = 0\n", 1);
    Ok(format!(
        "{head}name = \"dgram\"{udp}\n[service.shadow]\nversion = \"green\"\npercent = 10\n"
    ))
}

fn splitter_config() -> String {
    let service = |name: &str, protocol: &'static str| ServiceSpec {
        name: name.into(),
        vip: SocketAddrV4::new(VIP, VIP_PORT),
        protocol,
        affinity: Affinity::Flow,
        versions: vec![
            VersionSpec {
                name: "blue".into(),
                weight: 90,
                backends: vec![SocketAddrV4::new(BLUE, BACKEND_PORT)],
            },
            VersionSpec {
                name: "green".into(),
                weight: 10,
                backends: vec![SocketAddrV4::new(GREEN, BACKEND_PORT)],
            },
        ],
    };
    config_toml(
        Mode::Snat,
        &[service("web", "tcp"), service("dgram", "udp")],
    )
}

fn setup<'a>(edge: Edge, topo: &'a Topology, rig: &mut Rig) -> Result<Setup<'a>> {
    Ok(match edge {
        Edge::Forward => Setup::None,
        Edge::GenOnly => Setup::Xdp(attach_link(
            &mut rig.ebpf,
            &topo.edge,
            "edge_drop",
            EDGE_CLIENT_IF,
        )?),
        Edge::Nftables => {
            let file =
                std::env::temp_dir().join(format!("splitter-edgebench-{}.nft", std::process::id()));
            std::fs::write(&file, nft_ruleset())?;
            let r = topo.edge.exec("nft", &["-f", &file.to_string_lossy()]);
            let _ = std::fs::remove_file(&file);
            r.context("loading the nftables ruleset")?;
            let s = Setup::Nft(&topo.edge);
            // Conntrack never sees the backends' window (the frames carry
            // made-up sequence numbers): do not drop them as out of window.
            topo.edge
                .sysctl("net.netfilter.nf_conntrack_tcp_be_liberal", "1")?;
            s
        }
        Edge::XdpMin => {
            let eb_mac = mac_of(&topo.edge, EDGE_BACKEND_IF)?;
            let b0_mac = mac_of(&topo.back, BACKEND_IF)?;
            let mut cfg = [0u8; 24];
            cfg[0..4].copy_from_slice(&VIP.octets());
            cfg[4..8].copy_from_slice(&BLUE.octets());
            cfg[8..10].copy_from_slice(&VIP_PORT.to_be_bytes());
            cfg[10..12].copy_from_slice(&BACKEND_PORT.to_be_bytes());
            cfg[12..18].copy_from_slice(&eb_mac);
            cfg[18..24].copy_from_slice(&b0_mac);
            rig.fwd_cfg.set(0, cfg, 0)?;
            // The devmap resolves the ifindex in the updating thread's namespace.
            let fwd_dev = &mut rig.fwd_dev;
            topo.edge.enter(|| -> Result<()> {
                let eb = ifindex(EDGE_BACKEND_IF)?;
                fwd_dev
                    .set(0, eb, None, 0)
                    .map_err(|e| anyhow!("FWD_DEV: {e}"))
            })??;
            // The reference program's output, checked once per set-up.
            for f in [
                Packet::udp(
                    SocketAddrV4::new(CLIENT_ADDR, 5000),
                    SocketAddrV4::new(VIP, VIP_PORT),
                    &UDP_PAYLOAD,
                )
                .build(),
                Packet::tcp(
                    SocketAddrV4::new(CLIENT_ADDR, 5000),
                    SocketAddrV4::new(VIP, VIP_PORT),
                    TCP_ACK,
                )
                .payload(&TCP_PAYLOAD)
                .build(),
            ] {
                let (a, out) = rig.single("edge_fwd", &f)?;
                let to = parse(&out).ok().and_then(|v| v.destination());
                ensure!(
                    a == xdp_action::REDIRECT
                        && to == Some(SocketAddrV4::new(BLUE, BACKEND_PORT))
                        && out[..6] == b0_mac
                        && verify_checksums(&out).is_ok(),
                    "edge_fwd's output is wrong: {}, to {to:?}, checksums {:?}",
                    xdp_action::name(a),
                    verify_checksums(&out)
                );
            }
            Setup::Xdp(attach_link(
                &mut rig.ebpf,
                &topo.edge,
                "edge_fwd",
                EDGE_CLIENT_IF,
            )?)
        }
        Edge::Splitter => Setup::Splitter(Box::new(
            Daemon::start(&topo.edge, &splitter_config()).context("starting splitter daemon")?,
        )),
        Edge::SplitterShadow => Setup::Splitter(Box::new(
            Daemon::start(&topo.edge, &splitter_shadow_config()?)
                .context("starting splitter daemon (mirrored)")?,
        )),
    })
}

/// One measurement's figures.
struct Sample {
    mpps: f64,
    gen_mpps: f64,
    green_share: f64,
}

/// Runs the generator for warm-up + window on a pinned thread in the client
/// namespace; returns the backends' rate over the window.
fn measure(rig: &Rig, cli: &Netns, frame: &[u8], count_slot: u32) -> Result<Sample> {
    let stop = AtomicBool::new(false);
    let gen_fd = &rig.gen_fd;
    let c0 = rig.c0_index;
    cli.enter(|| {
        thread::scope(|s| -> Result<Sample> {
            let generator = s.spawn(|| -> io::Result<()> {
                pin_to_last_cpu();
                let t = Instant::now();
                while !stop.load(Ordering::Relaxed) && t.elapsed() < GEN_LIMIT {
                    live_run(gen_fd, frame, c0, GEN_REPEAT)?;
                }
                Ok(())
            });
            let read = || -> Result<(Instant, u64, u64, u64)> {
                Ok((
                    Instant::now(),
                    rig.sink_count(count_slot)?,
                    rig.sink_count(SINK_BY_HOST + u32::from(GREEN.octets()[3]))?,
                    rig.generated()?,
                ))
            };
            let result = (|| {
                thread::sleep(WARMUP);
                let a = read()?;
                thread::sleep(WINDOW);
                let b = read()?;
                Ok::<_, anyhow::Error>((a, b))
            })();
            stop.store(true, Ordering::Relaxed);
            generator
                .join()
                .map_err(|_| anyhow!("the generator thread panicked"))?
                .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")?;
            let (a, b) = result?;
            let secs = b.0.duration_since(a.0).as_secs_f64();
            let data = b.1.saturating_sub(a.1);
            Ok(Sample {
                mpps: data as f64 / secs / 1e6,
                gen_mpps: b.3.saturating_sub(a.3) as f64 / secs / 1e6,
                green_share: if data == 0 {
                    0.0
                } else {
                    b.2.saturating_sub(a.2) as f64 / data as f64
                },
            })
        })
    })?
}

/// Opens `FLOWS` TCP flows from source ports `base..`: one SYN each, then
/// waits for the backends to have answered them.
fn open_flows(rig: &Rig, cli: &Netns, syn: &[u8]) -> Result<u64> {
    let before = rig.sink_count(SINK_SYN)?;
    let (gen_fd, c0) = (&rig.gen_fd, rig.c0_index);
    cli.enter(|| live_run(gen_fd, syn, c0, FLOWS))?
        .context("sending SYNs (live-frames test run)")?;
    let t = Instant::now();
    loop {
        let n = rig.sink_count(SINK_SYN)? - before;
        if n >= u64::from(FLOWS) || t.elapsed() > Duration::from_millis(500) {
            // Let the SYN-ACKs cross the edge back.
            thread::sleep(Duration::from_millis(50));
            return Ok(n);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Runs the whole section.
///
/// # Errors
/// The topology or the programs could not be set up; a case that fails is
/// a problem in the results instead.
pub fn run(opts: EdgeOptions) -> Result<EdgeResults> {
    let rounds = opts.rounds.max(1);
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 2,
        ..TopologyOptions::default()
    })?;
    for dev in [EDGE_CLIENT_IF, EDGE_BACKEND_IF] {
        topo.edge
            .exec("ethtool", &["-K", dev, "gro", "on"])
            .with_context(|| format!("ethtool -K {dev} gro on"))?;
    }
    let mut rig = Rig::load(&topo)?;
    rig.self_check()?;
    let ec_mac = mac_of(&topo.edge, EDGE_CLIENT_IF)?;
    let c0_mac = mac_of(&topo.cli, CLIENT_IF)?;

    let mut cases: Vec<EdgeCase> = Vec::new();
    for proto in ["udp", "tcp"] {
        for e in Edge::ALL {
            cases.push(EdgeCase {
                id: e.id(),
                proto,
                label: e.label().to_string(),
                mpps: Vec::new(),
                gen_mpps: Vec::new(),
                green_share: Vec::new(),
                problems: Vec::new(),
            });
        }
    }
    let mut notes = Vec::new();
    let mut splitter_mode = None;
    for round in 0..rounds {
        for k in 0..Edge::ALL.len() {
            let edge = Edge::ALL[(k + round) % Edge::ALL.len()];
            let dst = if edge == Edge::Forward {
                SocketAddrV4::new(BLUE, BACKEND_PORT)
            } else {
                SocketAddrV4::new(VIP, VIP_PORT)
            };
            let outcome = (|| -> Result<Vec<(&'static str, Result<Sample>)>> {
                let set = setup(edge, &topo, &mut rig)?;
                let rig: &mut Rig = &mut rig;
                if let Setup::Splitter(d) = &set
                    && splitter_mode.is_none()
                {
                    splitter_mode = d
                        .status_json()
                        .ok()
                        .map(|v| v.to_string())
                        .filter(|s| s.contains("native"))
                        .map(|_| "native");
                }
                let mut out = Vec::new();
                for (p, proto) in ["udp", "tcp"].into_iter().enumerate() {
                    // Fresh source ports every round and protocol: no
                    // state left by an earlier case is reused.
                    let slot = (round * 2 + p) % 14;
                    let base = 1024 + (slot as u32) * FLOWS;
                    rig.gen_cfg.set(0, [FLOWS, base], 0)?;
                    // The flow cursor restarts at the template's port.
                    rig.gen_seq.set(
                        0,
                        aya::maps::PerCpuValues::try_from(vec![
                            0u64;
                            aya::util::nr_cpus().map_err(
                                |(_, e)| anyhow!("possible CPUs: {e}")
                            )?
                        ])?,
                        0,
                    )?;
                    let src = SocketAddrV4::new(CLIENT_ADDR, base as u16);
                    let r = (|| -> Result<Sample> {
                        let frame = if proto == "udp" {
                            Packet::udp(src, dst, &UDP_PAYLOAD)
                                .macs(ec_mac, c0_mac)
                                .build()
                        } else if edge == Edge::GenOnly {
                            Packet::tcp(src, dst, TCP_ACK | TCP_PSH)
                                .macs(ec_mac, c0_mac)
                                .seq_ack(1001, 0x1000_0001)
                                .payload(&TCP_PAYLOAD)
                                .build()
                        } else {
                            let syn = Packet::tcp(src, dst, TCP_SYN)
                                .macs(ec_mac, c0_mac)
                                .seq_ack(1000, 0)
                                .build();
                            let syn = rig.template(&syn)?;
                            let answered = open_flows(&*rig, &topo.cli, &syn)?;
                            if answered < u64::from(FLOWS) {
                                bail!("only {answered} of {FLOWS} SYNs reached the backends");
                            }
                            Packet::tcp(src, dst, TCP_ACK | TCP_PSH)
                                .macs(ec_mac, c0_mac)
                                .seq_ack(1001, 0x1000_0001)
                                .payload(&TCP_PAYLOAD)
                                .build()
                        };
                        let frame = rig.template(&frame)?;
                        let slot = if edge == Edge::GenOnly {
                            SINK_DROPPED
                        } else {
                            SINK_DATA
                        };
                        let s = measure(&*rig, &topo.cli, &frame, slot)?;
                        if s.mpps <= 0.0 {
                            bail!(
                                "no frames reached the backends ({:.2} Mpps generated)",
                                s.gen_mpps
                            );
                        }
                        Ok(s)
                    })();
                    out.push((proto, r));
                }
                Ok(out)
            })();
            match outcome {
                Ok(samples) => {
                    for (proto, r) in samples {
                        let c = case_mut(&mut cases, edge.id(), proto);
                        match r {
                            Ok(s) => {
                                c.mpps.push(s.mpps);
                                c.gen_mpps.push(s.gen_mpps);
                                c.green_share.push(s.green_share);
                            }
                            Err(e) => {
                                c.mpps.push(f64::NAN);
                                if c.problems.len() < 3 {
                                    c.problems.push(format!("round {round}: {e:#}"));
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    for proto in ["udp", "tcp"] {
                        let c = case_mut(&mut cases, edge.id(), proto);
                        c.mpps.push(f64::NAN);
                        if c.problems.len() < 3 {
                            c.problems.push(format!("round {round}: set-up: {e:#}"));
                        }
                    }
                }
            }
        }
    }
    if let Some(m) = splitter_mode {
        notes.push(format!("splitter reported XDP mode: {m}."));
    }
    Ok(EdgeResults {
        rounds,
        flows: FLOWS,
        window_ms: WINDOW.as_millis() as u64,
        cases,
        notes,
    })
}

fn case_mut<'a>(cases: &'a mut [EdgeCase], id: &str, proto: &str) -> &'a mut EdgeCase {
    let i = cases
        .iter()
        .position(|c| c.id == id && c.proto == proto)
        .unwrap_or(0);
    &mut cases[i]
}
