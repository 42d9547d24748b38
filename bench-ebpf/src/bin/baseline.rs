//! Reference XDP programs for `cargo xtask bench`, measured beside the
//! splitter program in the same run so that its cost can be read as a
//! ratio rather than an absolute figure (absolute figures drift by tens of
//! percent on shared machines).
//!
//! - [`bench_pass`]: `return XDP_PASS`, the cost of the test loop itself.
//! - [`bench_rewrite`]: the floor: parse Ethernet / IPv4 / TCP, rewrite the
//!   destination address and port with incremental checksums (RFC 1624),
//!   `XDP_TX`. No maps.
//! - [`bench_slot`]: a minimal load balancer: VIP hash lookup, the splitter
//!   flow hash, one Maglev slot, the backend, DNAT with checksums, MAC swap,
//!   `XDP_TX`. No connection table, no FIB, no counters.
//! - [`bench_wrapper`]: the harness. `BPF_PROG_TEST_RUN` with a repeat count
//!   runs a program again and again on one buffer, so a program that
//!   rewrites the packet would see its own output from the second run on.
//!   The wrapper first copies the next frame of a segment of a ring of
//!   prepared frames (`BENCH_RING`) over the buffer, then tail-calls the program
//!   under test (`BENCH_TARGET[0]`). Its own cost is measured by tail-calling
//!   `bench_pass` and subtracted.
//!
//! Every frame in the ring is exactly [`FRAME_LEN`] bytes (Ethernet + IPv4
//! without options + TCP without options), the length of the test buffer.
#![no_std]
#![no_main]

#[path = "../reference.rs"]
#[allow(dead_code)] // each program uses part of it
mod reference;

use reference::{ETH_LEN, ETH_P_IP, EthHdr, Ipv4Hdr, L4_OFF, TcpHdr, add16, add32, fold, ptr_at};

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_PASS, XDP_TX},
    macros::{map, xdp},
    maps::{Array, HashMap, ProgramArray},
    programs::XdpContext,
};
use splitter_common::{
    Backend, FAMILY_V4, MAGLEV_SIZE, MaglevTable, NO_BACKEND, PROTO_TCP, ServiceKey, flow_hash,
};

/// Length of every benchmark frame: 14 + 20 + 20.
const FRAME_LEN: usize = 54;
/// Frames the ring holds (several segments of up to 64Ki frames).
const RING_CAPACITY: u32 = 1 << 18;
/// `BENCH_CTRL` index of the next frame to copy.
const CTRL_CURSOR: u32 = 0;
/// `BENCH_CTRL` index of the first frame of the segment in use.
const CTRL_START: u32 = 1;
/// `BENCH_CTRL` index of the end (exclusive) of the segment in use.
const CTRL_END: u32 = 2;

/// Prepared frames, 64 bytes each (the first `FRAME_LEN` are used).
#[map(name = "BENCH_RING")]
static BENCH_RING: Array<[u64; 8]> = Array::with_max_entries(RING_CAPACITY, 0);

/// `[cursor, start, end]`: the wrapper cycles through frames `start..end`.
#[map(name = "BENCH_CTRL")]
static BENCH_CTRL: Array<u32> = Array::with_max_entries(3, 0);

/// Slot 0: the program under test.
#[map(name = "BENCH_TARGET")]
static BENCH_TARGET: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `bench_slot`'s services: VIP key -> index into `SLOT_TABLES`.
#[map(name = "SLOT_VIPS")]
static SLOT_VIPS: HashMap<ServiceKey, u32> = HashMap::with_max_entries(64, 0);

/// `bench_slot`'s Maglev tables (the splitter's format).
#[map(name = "SLOT_TABLES")]
static SLOT_TABLES: Array<MaglevTable> = Array::with_max_entries(4, 0);

/// `bench_slot`'s backends (the splitter's format).
#[map(name = "SLOT_BACKENDS")]
static SLOT_BACKENDS: Array<Backend> = Array::with_max_entries(1024, 0);

/// The Ethernet / IPv4 (no options) / TCP headers, or `None` for anything else.
#[inline(always)]
fn parse_tcp(ctx: &XdpContext) -> Option<(*mut EthHdr, *mut Ipv4Hdr, *mut TcpHdr)> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    if u16::from_be(unsafe { (*eth).proto }) != ETH_P_IP {
        return None;
    }
    let ip: *mut Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    if unsafe { (*ip).ver_ihl } != 0x45 || unsafe { (*ip).proto } != PROTO_TCP {
        return None;
    }
    let tcp: *mut TcpHdr = ptr_at(ctx, L4_OFF)?;
    Some((eth, ip, tcp))
}

/// Rewrites the destination address and port (network order) with both checksums.
#[inline(always)]
fn dnat(ip: *mut Ipv4Hdr, tcp: *mut TcpHdr, daddr: u32, dport: u16) {
    unsafe {
        let old_daddr = (*ip).daddr;
        let old_dport = (*tcp).dport;
        let sum = add32((!(*ip).check) as u32 & 0xffff, old_daddr, daddr);
        (*ip).check = !fold(sum);
        (*ip).daddr = daddr;
        let l4 = add16(add32(0, old_daddr, daddr), old_dport, dport);
        (*tcp).check = !fold(l4 + ((!(*tcp).check) as u32 & 0xffff));
        (*tcp).dport = dport;
    }
}

/// The cost of the test loop: nothing at all.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The floor: parse, rewrite destination to 10.0.2.2:8080, `XDP_TX`.
#[xdp]
pub fn bench_rewrite(ctx: XdpContext) -> u32 {
    let Some((_, ip, tcp)) = parse_tcp(&ctx) else {
        return XDP_PASS;
    };
    dnat(
        ip,
        tcp,
        u32::from_be_bytes([10, 0, 2, 2]).to_be(),
        8080u16.to_be(),
    );
    XDP_TX
}

/// A minimal load balancer: VIP lookup, slot table, DNAT, MAC swap, `XDP_TX`.
#[xdp]
pub fn bench_slot(ctx: XdpContext) -> u32 {
    try_slot(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_slot(ctx: &XdpContext) -> Option<u32> {
    let (eth, ip, tcp) = parse_tcp(ctx)?;
    let (saddr, daddr, sport, dport) =
        unsafe { ((*ip).saddr, (*ip).daddr, (*tcp).sport, (*tcp).dport) };
    let key = ServiceKey {
        addr: [daddr, 0, 0, 0],
        port: dport,
        proto: PROTO_TCP,
        family: FAMILY_V4,
    };
    let table_idx = unsafe { SLOT_VIPS.get(&key) }.copied()?;
    let table = SLOT_TABLES.get(table_idx)?;
    let h = flow_hash(
        &[saddr, 0, 0, 0],
        &[daddr, 0, 0, 0],
        sport,
        dport,
        PROTO_TCP,
        false,
    );
    // For the verifier, as in the splitter program: a volatile read keeps
    // the bounds check that the compiler would otherwise prove redundant.
    let rem = h % MAGLEV_SIZE;
    let idx = unsafe { core::ptr::read_volatile(&rem) } as usize;
    let id = *table.slots.get(idx)?;
    if id == NO_BACKEND {
        return None;
    }
    let backend = SLOT_BACKENDS.get(id as u32)?;
    dnat(ip, tcp, backend.addr[0], backend.port);
    unsafe {
        let dst = (*eth).dst;
        (*eth).dst = (*eth).src;
        (*eth).src = dst;
    }
    Some(XDP_TX)
}

/// The harness: copy the next ring frame over the buffer, tail-call the
/// program under test. `XDP_ABORTED` if the frame or the target is missing.
#[xdp]
pub fn bench_wrapper(ctx: XdpContext) -> u32 {
    if copy_next_frame(&ctx).is_none() {
        return XDP_ABORTED;
    }
    unsafe { BENCH_TARGET.tail_call(&ctx, 0) };
    XDP_ABORTED
}

#[inline(always)]
fn copy_next_frame(ctx: &XdpContext) -> Option<()> {
    let start = *BENCH_CTRL.get(CTRL_START)?;
    let end = *BENCH_CTRL.get(CTRL_END)?;
    let cursor = BENCH_CTRL.get_ptr_mut(CTRL_CURSOR)?;
    let mut i = unsafe { *cursor };
    if i >= end || i < start {
        i = start;
    }
    // Only one test run at a time uses the ring, so a plain store is enough.
    unsafe { *cursor = i + 1 };
    let src = BENCH_RING.get(i)?;
    let dst: *mut [u8; FRAME_LEN] = ptr_at(ctx, 0)?;
    let dst = dst as *mut u8;
    // 54 bytes: six u64, one u32, one u16 (the buffer is 8-byte aligned
    // after XDP headroom; x86 would not mind otherwise).
    unsafe {
        let s = src.as_ptr() as *const u8;
        let mut w = 0;
        while w < 6 {
            core::ptr::write_unaligned(
                (dst as *mut u64).add(w),
                core::ptr::read((s as *const u64).add(w)),
            );
            w += 1;
        }
        core::ptr::write_unaligned(
            dst.add(48) as *mut u32,
            core::ptr::read(s.add(48) as *const u32),
        );
        core::ptr::write_unaligned(
            dst.add(52) as *mut u16,
            core::ptr::read(s.add(52) as *const u16),
        );
    }
    Some(())
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
