//! XDP programs for the through-edge throughput section of
//! `cargo xtask bench` (`xtask/src/bench/edge.rs`), built by
//! `xtask/build.rs` with xtask's `bench` feature only.
//!
//! - [`edge_gen`]: the traffic generator. Run with `BPF_PROG_TEST_RUN` and
//!   `BPF_F_TEST_XDP_LIVE_FRAMES` on the client's veth, it writes the
//!   template frame (`GEN_TMPL`, [`FRAME_LEN`] bytes) over the buffer, gives
//!   it the next of `GEN_CFG.flows` source ports (from the template's),
//!   fixes the L4 checksum incrementally and returns `XDP_TX`, which the
//!   kernel turns into a transmit on that veth: the edge receives it. The
//!   whole frame is rewritten every time because live-frame pages are
//!   recycled with whatever the edge left in them (NAT, MACs, TTL).
//! - [`edge_sink`]: the receiver on the backends' veth: counts IPv4 TCP/UDP
//!   frames per destination (`SINK_COUNT`, per CPU) and drops them; a TCP
//!   SYN is answered with a SYN-ACK instead (redirected back out of the
//!   same veth), so that stateful edges (conntrack) see a handshake.
//! - [`edge_drop`]: counts and drops whatever comes back to the client.
//! - [`edge_fwd`]: the minimal XDP forwarder to compare with: a frame to
//!   `FWD_CFG.vip` gets destination `FWD_CFG.backend` (incremental
//!   checksums), the backend's MACs, and is redirected through `FWD_DEV[0]`.
//!   No flow state, no split, no FIB.
#![no_std]
#![no_main]

#[path = "../reference.rs"]
#[allow(dead_code)] // each program uses part of it
mod reference;

use reference::{
    ETH_LEN, ETH_P_IP, EthHdr, Ipv4Hdr, L4_OFF, TCP_ACK, TCP_SYN, TcpHdr, UdpHdr, add16, add32,
    fold, ptr_at,
};
use splitter_common::{PROTO_TCP, PROTO_UDP};

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    helpers::bpf_redirect,
    macros::{map, xdp},
    maps::{Array, DevMap, PerCpuArray},
    programs::XdpContext,
};

/// Every generated frame: 64 bytes on the wire without the FCS.
const FRAME_LEN: usize = 60;

/// `SINK_COUNT` slots.
const SINK_DATA: u32 = 0;
const SINK_SYN: u32 = 1;
const SINK_OTHER: u32 = 2;
/// Slot `SINK_BY_HOST + last octet of the destination`.
const SINK_BY_HOST: u32 = 8;

/// Generator settings, written by the bench before each run.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenCfg {
    /// Distinct source ports (flows).
    pub flows: u32,
    /// Unused (the first source port is the template's).
    pub base_port: u32,
}

/// Minimal forwarder settings (addresses and ports in network order).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FwdCfg {
    pub vip: u32,
    pub backend: u32,
    pub vport: u16,
    pub bport: u16,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// The frame to send (the first `FRAME_LEN` bytes).
#[map(name = "GEN_TMPL")]
static GEN_TMPL: Array<[u64; 8]> = Array::with_max_entries(1, 0);

#[map(name = "GEN_CFG")]
static GEN_CFG: Array<GenCfg> = Array::with_max_entries(1, 0);

/// Slot 0: frames generated on this CPU (the flow cursor too).
#[map(name = "GEN_SEQ")]
static GEN_SEQ: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "SINK_COUNT")]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(264, 0);

#[map(name = "FWD_CFG")]
static FWD_CFG: Array<FwdCfg> = Array::with_max_entries(1, 0);

#[map(name = "FWD_DEV")]
static FWD_DEV: DevMap = DevMap::with_max_entries(1, 0);

/// A checksum field after the changes summed in `delta`.
#[inline(always)]
fn patch(check: u16, delta: u32) -> u16 {
    !fold(delta + ((!check) as u32 & 0xffff))
}

/// Ethernet + IPv4 without options, and its L4 protocol.
#[inline(always)]
fn parse_ip(ctx: &XdpContext) -> Option<(*mut EthHdr, *mut Ipv4Hdr, u8)> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    if u16::from_be(unsafe { (*eth).proto }) != ETH_P_IP {
        return None;
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    if unsafe { (*ip).ver_ihl } != 0x45 {
        return None;
    }
    Some((eth, ip, unsafe { (*ip).proto }))
}

/// The generator: next source port, checksum, `XDP_TX`.
#[xdp]
pub fn edge_gen(ctx: XdpContext) -> u32 {
    let Some(cfg) = GEN_CFG.get(0) else {
        return XDP_DROP;
    };
    let Some(tmpl) = GEN_TMPL.get(0) else {
        return XDP_DROP;
    };
    let Some(dst) = ptr_at::<[u8; FRAME_LEN]>(&ctx, 0) else {
        return XDP_DROP;
    };
    // 60 bytes: seven u64 and one u32.
    unsafe {
        let d = dst as *mut u8;
        let s = tmpl.as_ptr() as *const u8;
        let mut w = 0;
        while w < 7 {
            core::ptr::write_unaligned(
                (d as *mut u64).add(w),
                core::ptr::read((s as *const u64).add(w)),
            );
            w += 1;
        }
        core::ptr::write_unaligned(
            d.add(56) as *mut u32,
            core::ptr::read(s.add(56) as *const u32),
        );
    }
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return XDP_DROP;
    };
    let n = unsafe { *seq };
    unsafe { *seq = n + 1 };
    let flows = if cfg.flows == 0 { 1 } else { cfg.flows as u64 };
    let Some((_, _, proto)) = parse_ip(&ctx) else {
        return XDP_DROP;
    };
    if proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHdr>(&ctx, L4_OFF) else {
            return XDP_DROP;
        };
        unsafe {
            let old = (*tcp).sport;
            let port = ((u16::from_be(old) as u64 + n % flows) as u16).to_be();
            (*tcp).check = patch((*tcp).check, add16(0, old, port));
            (*tcp).sport = port;
        }
    } else if proto == PROTO_UDP {
        let Some(udp) = ptr_at::<UdpHdr>(&ctx, L4_OFF) else {
            return XDP_DROP;
        };
        unsafe {
            let old = (*udp).sport;
            let port = ((u16::from_be(old) as u64 + n % flows) as u16).to_be();
            if (*udp).check != 0 {
                let c = patch((*udp).check, add16(0, old, port));
                (*udp).check = if c == 0 { 0xffff } else { c };
            }
            (*udp).sport = port;
        }
    }
    XDP_TX
}

#[inline(always)]
fn count(slot: u32) {
    if let Some(c) = SINK_COUNT.get_ptr_mut(slot) {
        unsafe { *c += 1 };
    }
}

/// The receiver: count and drop; answer a SYN with a SYN-ACK.
#[xdp]
pub fn edge_sink(ctx: XdpContext) -> u32 {
    let Some((eth, ip, proto)) = parse_ip(&ctx) else {
        count(SINK_OTHER);
        return XDP_DROP;
    };
    if proto == PROTO_TCP
        && let Some(tcp) = ptr_at::<TcpHdr>(&ctx, L4_OFF)
        && unsafe { (*tcp).flags } & (TCP_SYN | TCP_ACK) == TCP_SYN
    {
        count(SINK_SYN);
        unsafe {
            let (s, d) = ((*eth).src, (*eth).dst);
            (*eth).src = d;
            (*eth).dst = s;
            // Swapping addresses and ports leaves both checksums as they are.
            let (sa, da) = ((*ip).saddr, (*ip).daddr);
            (*ip).saddr = da;
            (*ip).daddr = sa;
            let (sp, dp) = ((*tcp).sport, (*tcp).dport);
            (*tcp).sport = dp;
            (*tcp).dport = sp;
            let old_seq = (*tcp).seq;
            let old_ack = (*tcp).ack_seq;
            let new_ack = (u32::from_be(old_seq).wrapping_add(1)).to_be();
            let new_seq = 0x1000_0000u32.to_be();
            // doff and flags form one 16-bit word.
            let word = tcp as *mut u8;
            let old_w = core::ptr::read_unaligned(word.add(12) as *const u16);
            (*tcp).flags = TCP_SYN | TCP_ACK;
            let new_w = core::ptr::read_unaligned(word.add(12) as *const u16);
            let delta = add16(
                add32(add32(0, old_seq, new_seq), old_ack, new_ack),
                old_w,
                new_w,
            );
            (*tcp).seq = new_seq;
            (*tcp).ack_seq = new_ack;
            (*tcp).check = patch((*tcp).check, delta);
        }
        // Back out of the same veth, as a redirect rather than `XDP_TX`:
        // veth's XDP_TX wakes the peer only if the peer has an XDP program,
        // while a redirect (ndo_xdp_xmit with a flush) also wakes a peer
        // that only has GRO (NAPI) on, like the edge's `eb` with no XDP.
        return unsafe { bpf_redirect(ctx.ingress_ifindex() as u32, 0) } as u32;
    }
    if proto == PROTO_TCP || proto == PROTO_UDP {
        count(SINK_DATA);
        let host = u32::from_be(unsafe { (*ip).daddr }) & 0xff;
        count(SINK_BY_HOST + host);
    } else {
        count(SINK_OTHER);
    }
    XDP_DROP
}

/// Counts and drops what comes back to the client.
#[xdp]
pub fn edge_drop(_ctx: XdpContext) -> u32 {
    count(SINK_OTHER + 1);
    XDP_DROP
}

/// The minimal forwarder: DNAT to one backend, MACs, redirect.
#[xdp]
pub fn edge_fwd(ctx: XdpContext) -> u32 {
    try_fwd(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_fwd(ctx: &XdpContext) -> Option<u32> {
    let cfg = FWD_CFG.get(0)?;
    let (eth, ip, proto) = parse_ip(ctx)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let daddr = unsafe { (*ip).daddr };
    if daddr != cfg.vip {
        return None;
    }
    // The ports sit at the same offsets in TCP and UDP.
    let ports: *mut UdpHdr = ptr_at(ctx, L4_OFF)?;
    if unsafe { (*ports).dport } != cfg.vport {
        return None;
    }
    let pseudo = add32(0, daddr, cfg.backend);
    let l4 = add16(pseudo, cfg.vport, cfg.bport);
    unsafe {
        (*ip).check = patch((*ip).check, pseudo);
        (*ip).daddr = cfg.backend;
        (*ports).dport = cfg.bport;
    }
    if proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF)?;
        unsafe { (*tcp).check = patch((*tcp).check, l4) };
    } else {
        unsafe {
            if (*ports).check != 0 {
                let c = patch((*ports).check, l4);
                (*ports).check = if c == 0 { 0xffff } else { c };
            }
        }
    }
    unsafe {
        (*eth).src = cfg.src_mac;
        (*eth).dst = cfg.dst_mac;
    }
    FWD_DEV.redirect(0, 0).ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
