//! Next hop and exit: asks the kernel FIB (`bpf_fib_lookup`) where the
//! rewritten packet goes, then rewrites it and leaves by `XDP_TX` (same
//! interface) or `XDP_REDIRECT` (another one). When the FIB cannot answer
//! with a neighbour yet, the rewritten packet goes to the kernel stack,
//! which resolves the neighbour and forwards it (needs IPv4 forwarding).
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_fib_lookup as FibParams,
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use core::mem::{size_of, zeroed};
use splitter_common::counter;

use crate::{
    XDP_PASS, XDP_TX, maps,
    nat::{self, Tuple},
    parse::{ETH_LEN, EthHdr, Ipv4Hdr, ptr_at},
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_BLACKHOLE: i64 = 1;
const BPF_FIB_LKUP_RET_UNREACHABLE: i64 = 2;
const BPF_FIB_LKUP_RET_PROHIBIT: i64 = 3;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Rewrites the packet from `old` to `new` and sends it on. Returns the XDP action.
#[inline(always)]
pub fn forward(ctx: &XdpContext, proto: u8, old: &Tuple, new: &Tuple) -> u32 {
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
    let mut p: FibParams = unsafe { zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.sport = new.sport;
    p.dport = new.dport;
    p.__bindgen_anon_1.tot_len = u16::from_be(tot_len);
    p.__bindgen_anon_2.tos = tos;
    p.__bindgen_anon_3.ipv4_src = new.saddr;
    p.__bindgen_anon_4.ipv4_dst = new.daddr;
    p.ifindex = ingress;
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut p as *mut FibParams,
            size_of::<FibParams>() as i32,
            0,
        )
    };
    match rc {
        BPF_FIB_LKUP_RET_SUCCESS => {
            if nat::rewrite(ctx, proto, old, new, true).is_none() {
                return XDP_PASS;
            }
            let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
                return XDP_PASS;
            };
            unsafe {
                (*eth).dst = p.dmac;
                (*eth).src = p.smac;
            }
            if p.ifindex == ingress {
                maps::count(counter::TX);
                XDP_TX
            } else {
                maps::count(counter::REDIRECT);
                unsafe { bpf_redirect(p.ifindex, 0) as u32 }
            }
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
