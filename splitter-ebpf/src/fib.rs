//! Next hop and exit: asks the kernel FIB (`bpf_fib_lookup`) where the
//! rewritten packet goes, then rewrites it and leaves by `XDP_TX` (same
//! interface) or `XDP_REDIRECT` (another one). When the FIB cannot answer
//! with a neighbour yet, the rewritten packet goes to the kernel stack,
//! which resolves the neighbour and forwards it (needs IPv4 forwarding).
//!
//! An established flow's entry caches the last successful answer (egress
//! interface and MACs) for `FIB_CACHE_NS`, for packets that arrive on the
//! same interface with the same TOS and are no longer than the longest
//! packet the route accepted; anything else asks the FIB again.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_fib_lookup as FibParams,
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use core::{
    mem::{MaybeUninit, size_of},
    ptr::{read_volatile, write_volatile},
    sync::atomic::{Ordering, compiler_fence},
};
use splitter_common::{Conn, FIB_CACHE_NS, counter};

use crate::{
    XDP_PASS, XDP_TX, maps,
    nat::{self, Tuple},
    parse::{ETH_LEN, Ipv4Hdr, ptr_at},
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_BLACKHOLE: i64 = 1;
const BPF_FIB_LKUP_RET_UNREACHABLE: i64 = 2;
const BPF_FIB_LKUP_RET_PROHIBIT: i64 = 3;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Where a packet leaves: egress interface and the 12 bytes of MACs
/// (destination, then source, as in the Ethernet header) as 16-bit words.
struct Hop {
    ifindex: u32,
    macs: [u16; 6],
}

/// Rewrites the packet from `old` to `new` and sends it on. `cache` is the
/// flow entry of this direction (its route cache is used and refreshed),
/// `None` for a packet whose entry is not at hand. Returns the XDP action.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    proto: u8,
    old: &Tuple,
    new: &Tuple,
    cache: Option<&mut Conn>,
    now: u64,
) -> u32 {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_LEN) else {
        return XDP_PASS;
    };
    let (ttl, tos, tot_len) = unsafe { ((*ip).ttl, (*ip).tos, (*ip).tot_len) };
    if ttl <= 1 {
        // Let the kernel send its "time exceeded".
        maps::count(counter::PASS_TTL);
        return XDP_PASS;
    }
    let ingress = ctx.ingress_ifindex() as u32;
    let len = u16::from_be(tot_len);
    // The cached answer is fresh and was made for this interface and TOS.
    let mut fresh = false;
    if let Some(c) = cache.as_deref() {
        // SAFETY: a map value; `fib_at` is written last (see `store`).
        let at = unsafe { read_volatile(&c.fib_at) };
        compiler_fence(Ordering::Acquire);
        fresh = at != 0
            && now.wrapping_sub(at) < FIB_CACHE_NS
            && c.fib_iif == ingress
            && c.fib_tos == tos;
        if fresh && len <= c.fib_len {
            let hop = Hop {
                ifindex: c.fib_ifindex,
                macs: load_macs(&c.fib_dmac),
            };
            return send(ctx, proto, old, new, ingress, &hop);
        }
    }
    let mut params = MaybeUninit::<FibParams>::uninit();
    // SAFETY: every byte is written by `zero` before the struct is used.
    let p = unsafe {
        zero(params.as_mut_ptr());
        &mut *params.as_mut_ptr()
    };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.sport = new.sport;
    p.dport = new.dport;
    p.__bindgen_anon_1.tot_len = len;
    p.__bindgen_anon_2.tos = tos;
    p.__bindgen_anon_3.ipv4_src = new.saddr;
    p.__bindgen_anon_4.ipv4_dst = new.daddr;
    p.ifindex = ingress;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            p as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            let hop = Hop {
                ifindex: p.ifindex,
                macs: [
                    pair(p.dmac[0], p.dmac[1]),
                    pair(p.dmac[2], p.dmac[3]),
                    pair(p.dmac[4], p.dmac[5]),
                    pair(p.smac[0], p.smac[1]),
                    pair(p.smac[2], p.smac[3]),
                    pair(p.smac[4], p.smac[5]),
                ],
            };
            if let Some(c) = cache {
                store(c, &hop, fresh, ingress, tos, len, now);
            }
            send(ctx, proto, old, new, ingress, &hop)
        }
        BPF_FIB_LKUP_RET_BLACKHOLE | BPF_FIB_LKUP_RET_UNREACHABLE | BPF_FIB_LKUP_RET_PROHIBIT => {
            maps::drop_with(counter::DROP_UNROUTABLE)
        }
        _ => {
            let _ = nat::rewrite(ctx, proto, old, new, false);
            maps::count(if rc == BPF_FIB_LKUP_RET_NO_NEIGH {
                counter::PASS_NO_NEIGH
            } else {
                counter::PASS_FIB_OTHER
            });
            XDP_PASS
        }
    }
}

/// Rewrites (TTL decremented), sets the MACs and leaves by `hop`.
#[inline(always)]
fn send(ctx: &XdpContext, proto: u8, old: &Tuple, new: &Tuple, ingress: u32, hop: &Hop) -> u32 {
    if nat::rewrite(ctx, proto, old, new, true).is_none() {
        return XDP_PASS;
    }
    let Some(eth) = ptr_at::<[u16; 6]>(ctx, 0) else {
        return XDP_PASS;
    };
    // Word by word: a whole-array copy compiles to a `memmove` call.
    unsafe {
        (*eth)[0] = hop.macs[0];
        (*eth)[1] = hop.macs[1];
        (*eth)[2] = hop.macs[2];
        (*eth)[3] = hop.macs[3];
        (*eth)[4] = hop.macs[4];
        (*eth)[5] = hop.macs[5];
    }
    if hop.ifindex == ingress {
        maps::count(counter::TX);
        XDP_TX
    } else {
        maps::count(counter::REDIRECT);
        unsafe { bpf_redirect(hop.ifindex, 0) as u32 }
    }
}

/// Two bytes as they lie in memory, as one 16-bit word.
#[inline(always)]
fn pair(a: u8, b: u8) -> u16 {
    u16::from_ne_bytes([a, b])
}

/// The cached MACs (`fib_dmac` then `fib_smac`, 12 bytes in a row).
#[inline(always)]
fn load_macs(dmac: &[u8; 6]) -> [u16; 6] {
    // `fib_dmac` and `fib_smac` are adjacent and 4-byte aligned in `Conn`
    // (checked by the layout test in splitter-common).
    let w = dmac.as_ptr() as *const u16;
    unsafe { [*w, *w.add(1), *w.add(2), *w.add(3), *w.add(4), *w.add(5)] }
}

/// Records a successful lookup in the flow entry. While the cached answer
/// is still `fresh` (as `forward` found it: unexpired, same interface and
/// TOS) and the same, a longer packet that the route accepted only raises
/// `fib_len` (the answer keeps its time, so everything cached expires
/// `FIB_CACHE_NS` after the lookup that started it).
#[inline(always)]
fn store(c: &mut Conn, hop: &Hop, fresh: bool, ingress: u32, tos: u8, len: u16, now: u64) {
    if fresh && c.fib_ifindex == hop.ifindex && load_macs(&c.fib_dmac) == hop.macs {
        if len > c.fib_len {
            c.fib_len = len;
        }
        return;
    }
    // Another CPU may read the entry meanwhile (a flow's packets normally
    // stay on one CPU): the time is cleared first and written last, so a
    // reader that checks it after the clear asks the FIB itself. One that
    // checked it just before may mix the old and new answer's fields, which
    // differ only when the route changed at that very moment.
    unsafe { write_volatile(&mut c.fib_at, 0) };
    compiler_fence(Ordering::Release);
    let w = c.fib_dmac.as_mut_ptr() as *mut u16;
    unsafe {
        *w = hop.macs[0];
        *w.add(1) = hop.macs[1];
        *w.add(2) = hop.macs[2];
        *w.add(3) = hop.macs[3];
        *w.add(4) = hop.macs[4];
        *w.add(5) = hop.macs[5];
    }
    c.fib_ifindex = hop.ifindex;
    c.fib_iif = ingress;
    c.fib_tos = tos;
    c.fib_len = len;
    compiler_fence(Ordering::Release);
    unsafe { write_volatile(&mut c.fib_at, now) };
}

/// Zeroes the lookup parameters in place, word by word (a `zeroed()`
/// struct compiles to a `memset` call and a copy).
#[inline(always)]
unsafe fn zero(p: *mut FibParams) {
    let w = p as *mut u32;
    let mut i = 0;
    while i < size_of::<FibParams>() / 4 {
        unsafe { write_volatile(w.add(i), 0) };
        i += 1;
    }
}
