//! Shadow traffic (mirroring) of UDP services, in two halves.
//!
//! XDP cannot clone a packet. For a sampled datagram of a mirrored service
//! (`SVC_F_SHADOW`, `SHADOWS`, sampled by [`sample`]), the XDP side
//! ([`mark`]) rewrites the datagram to its stable backend as usual but
//! hands it to the kernel (`XDP_PASS`) with `ShadowMeta` in XDP metadata
//! (service id, flow hash, client and VIP). The tc side ([`tc`], a clsact
//! ingress program on the same interface) finds the metadata on the skb,
//! picks the shadow backend from the shadow version's table, makes the
//! copy's reply entry in `CONNS` (`CONN_F_SHADOW`, keyed by what the
//! shadow backend sends back), rewrites the skb to the shadow tuple, sends
//! a clone back into the interface's ingress (`bpf_clone_redirect`,
//! `BPF_F_INGRESS`) after clearing the metadata's magic (the clone shares
//! it, so it is not mirrored again), restores the stable tuple and lets
//! the kernel forward the original. Both copies are routed by the
//! kernel's own IPv4 forwarding. The shadow backend's replies hit the
//! copy's reply entry in the XDP program and are counted and dropped
//! ([`reply`]).
//!
//! The work is on the tc side because the XDP program's stack is nearly
//! full: [`mark`] is inlined and small.
//!
//! The same sampling ([`sample`]) draws the new flows of a mirrored TCP
//! service that `flow::new_flow` hands to the controller's tee while
//! [`tee_alive`] says it listens (`CONN_F_LOCAL`).
use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_UNSPEC, xdp_md,
    },
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_meta},
    programs::{TcContext, XdpContext},
};
use core::mem::size_of;
use splitter_common::{
    BACKEND_F_DISABLED, BACKEND_F_PRESENT, CONN_F_REVERSE, CONN_F_SHADOW, Conn, FAMILY_V4, FlowKey,
    LAST_SEEN_GRANULARITY_NS, MAGLEV_SIZE, NO_BACKEND, PROTO_UDP, SHADOW_META_MAGIC,
    STATE_TIMED_OUT, ShadowMeta, UDP_ANSWERED, awaiting_answer, conn_stale, connect_deadline_us,
    counter, elapsed_us, start_units,
};

use crate::{
    XDP_DROP, XDP_PASS,
    maps::{self, BACKEND_STATS, BACKENDS, CONNS, SHADOW_ACC, SHADOWS, TABLES, TEE_ALIVE},
    nat::{self, Tuple},
    parse::{ETH_LEN, Ipv4Hdr, L4_OFF, UdpHdr, ptr_at},
};

/// Does the controller's TCP tee of service `svc` listen now (`now`:
/// coarse `CLOCK_MONOTONIC` ns)? Read only for a new TCP flow of a
/// mirrored service, before [`sample`], so that no flow is handed to an
/// edge stack where nothing listens and the share is drawn only from
/// flows that can be mirrored.
#[inline(always)]
pub fn tee_alive(svc: u32, now: u64) -> bool {
    match TEE_ALIVE.get(svc) {
        Some(until) => now < *until,
        None => false,
    }
}

/// Is this client datagram (or new TCP flow) of service `svc` to be
/// mirrored? Raises the CPU's accumulator by the service's share and takes
/// one each time it reaches 100. False when the service mirrors nothing,
/// or not this one.
#[inline(always)]
pub fn sample(svc: u32) -> bool {
    sampled(svc).is_some()
}

#[inline(always)]
fn sampled(svc: u32) -> Option<()> {
    let sh = *SHADOWS.get(svc)?;
    if sh.percent == 0 {
        return None;
    }
    let acc = SHADOW_ACC.get_ptr_mut(svc)?;
    // SAFETY: this CPU's slot of a per-CPU array: no other writer.
    unsafe {
        let a = *acc + sh.percent;
        if a >= 100 {
            *acc = a - 100;
            Some(())
        } else {
            *acc = a;
            None
        }
    }
}

/// A sampled datagram, still as it arrived: `new_addrs` (source << 32 |
/// destination) and `new_ports` (source << 16 | destination) are its
/// stable rewrite, `svc_hash` the service id << 32 | the flow hash.
/// Rewrites it to the stable tuple (the kernel's forwarding decrements the
/// TTL), writes `ShadowMeta` in front of it and passes it to the kernel,
/// where [`tc`] makes the copy. Without room for the metadata the
/// datagram still goes to its stable backend (`shadow_skipped`).
///
/// Inlined: a BPF-to-BPF call would add a frame of its own to the main
/// program's, which is near the 512-byte limit that both would share.
#[inline(always)]
pub fn mark(raw: *mut xdp_md, new_addrs: u64, new_ports: u32, svc_hash: u64) -> u32 {
    let ctx = XdpContext::new(raw);
    let ctx = &ctx;
    let (Some(ip), Some(udp)) = (
        ptr_at::<Ipv4Hdr>(ctx, ETH_LEN),
        ptr_at::<UdpHdr>(ctx, L4_OFF),
    ) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let old = unsafe {
        Tuple {
            saddr: (*ip).saddr,
            daddr: (*ip).daddr,
            sport: (*udp).sport,
            dport: (*udp).dport,
        }
    };
    let new = Tuple {
        saddr: (new_addrs >> 32) as u32,
        daddr: new_addrs as u32,
        sport: (new_ports >> 16) as u16,
        dport: new_ports as u16,
    };
    if nat::rewrite(ctx, PROTO_UDP, &old, &new, false).is_none() {
        return XDP_PASS;
    }
    // SAFETY: the helper checks the room in front of the frame itself.
    let room = unsafe { bpf_xdp_adjust_meta(raw, -(size_of::<ShadowMeta>() as i32)) };
    let meta = ctx.metadata();
    // For the verifier: the metadata must lie before the packet data.
    if room != 0 || meta + size_of::<ShadowMeta>() > ctx.data() {
        maps::count(counter::SHADOW_SKIPPED);
        return XDP_PASS;
    }
    // SAFETY: bounds checked just above.
    unsafe {
        *(meta as *mut ShadowMeta) = ShadowMeta {
            magic: SHADOW_META_MAGIC,
            service: (svc_hash >> 32) as u32,
            hash: svc_hash as u32,
            vip: old.daddr,
            client: old.saddr,
            vip_port: old.dport,
            client_port: old.sport,
        }
    };
    maps::count(counter::SHADOW_COPIES);
    XDP_PASS
}

/// Picks the shadow backend, makes or refreshes the copy's reply entry
/// (shadow backend -> the stable copy's source `src`:`sport`) and counts
/// the copy in the shadow backend's stats. Returns the backend's address
/// and port (network order).
#[inline(always)]
fn shadow_entry(m: &ShadowMeta, src: u32, sport: u16, len: u32) -> Option<(u32, u16)> {
    let sh = SHADOWS.get(m.service)?;
    let table = TABLES.get(sh.table)?;
    let rem = m.hash % MAGLEV_SIZE;
    // For the verifier: see `flow::pick_backend`.
    let idx = unsafe { core::ptr::read_volatile(&rem) } as usize;
    let id = *table.slots.get(idx)?;
    if id == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(id as u32)?;
    if b.flags & BACKEND_F_PRESENT == 0 || b.flags & BACKEND_F_DISABLED != 0 {
        return None;
    }
    let (baddr, bport) = (b.addr[0], b.port);
    let rkey = FlowKey {
        src: [baddr, 0, 0, 0],
        dst: [src, 0, 0, 0],
        sport: bport,
        dport: sport,
        proto: PROTO_UDP,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    // SAFETY: the coarse clock helper has no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    let mut created = false;
    match CONNS.get_ptr_mut(&rkey) {
        Some(e) => {
            // SAFETY: a valid map value for this program run.
            let e = unsafe { &mut *e };
            if e.flags & CONN_F_SHADOW == 0 {
                // A real flow of the shadow backend holds this tuple: its
                // replies must reach its client, so no copy this time.
                return None;
            }
            if conn_stale(PROTO_UDP, e.state, e.last_seen, now) {
                // A new attempt on an idle tuple: its answer is awaited anew.
                e.state = 0;
                e.fin_tsval = start_units(unsafe { bpf_ktime_get_ns() });
                e.last_seen = now;
                created = true;
            } else if now.saturating_sub(e.last_seen) > LAST_SEEN_GRANULARITY_NS {
                e.last_seen = now;
            }
        }
        None => {
            let mut slot = core::mem::MaybeUninit::<Conn>::uninit();
            // SAFETY: every field is written here, the route cache by
            // `clear_route` (field by field: a whole-struct default would
            // become a `memset` call).
            let c = unsafe {
                let c = slot.as_mut_ptr();
                (*c).new_addr = [m.vip, 0, 0, 0];
                (*c).other_addr = [m.client, 0, 0, 0];
                (*c).new_port = m.vip_port;
                (*c).other_port = m.client_port;
                (*c).backend = id as u32;
                (*c).flags = CONN_F_REVERSE | CONN_F_SHADOW;
                (*c).state = 0;
                (*c).service = m.service;
                (*c).fin_tsval = start_units(bpf_ktime_get_ns());
                (*c).last_seen = now;
                crate::flow::clear_route(c);
                &*c
            };
            CONNS.insert(&rkey, c, BPF_NOEXIST as u64).ok()?;
            created = true;
        }
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id as u32) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            if created {
                (*s).new_flows += 1;
            }
            (*s).packets += 1;
            (*s).bytes += len as u64;
        }
    }
    Some((baddr, bport))
}

/// A reply from a shadow backend (its entry has `CONN_F_SHADOW`): counted
/// as the shadow backend's (first answer and its latency, a missed
/// deadline, reply packets and bytes) and dropped.
#[inline(never)]
pub fn reply(len: u32, conn: *mut Conn, now: u64) -> u32 {
    // SAFETY: a valid map value for this program run.
    let conn = unsafe { &mut *conn };
    let mut bits = UDP_ANSWERED;
    if awaiting_answer(conn.state, conn.flags)
        && let Some(b) = BACKENDS.get(conn.backend)
        && elapsed_us(conn.fin_tsval, now) > connect_deadline_us(b.connect_timeout_ms)
    {
        bits |= STATE_TIMED_OUT;
    }
    let new_bits = bits & !conn.state;
    if new_bits != 0 {
        crate::flow::signal(conn, new_bits, true);
        conn.state |= new_bits;
        conn.last_seen = now;
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(conn.backend) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            (*s).reply_packets += 1;
            (*s).reply_bytes += len as u64;
        }
    }
    maps::count(counter::SHADOW_REPLY_DROPPED);
    XDP_DROP
}

/// Offsets in the frame (tc programs see it from the Ethernet header; the
/// XDP side marks only IPv4 without options, so the UDP header is at 34).
const IP_CHECK: usize = 14 + 10;
const IP_SADDR: usize = 14 + 12;
const IP_DADDR: usize = 14 + 16;
const IP_PROTO: usize = 14 + 9;
const UDP_SPORT: usize = 14 + 20;
const UDP_DPORT: usize = 14 + 22;
const UDP_CHECK: usize = 14 + 26;

/// The tc half: makes the shadow copy of a datagram the XDP side marked.
/// Returns `TC_ACT_UNSPEC` always (the original goes on to the kernel, and
/// other tc programs on the interface still run).
#[inline(always)]
pub fn tc(ctx: &TcContext) -> i32 {
    // SAFETY: the context pointer the kernel passed.
    let (meta, data) = unsafe {
        (
            (*ctx.skb.skb).data_meta as usize,
            (*ctx.skb.skb).data as usize,
        )
    };
    // For the verifier: the whole struct must lie in the metadata.
    if meta + size_of::<ShadowMeta>() > data {
        return TC_ACT_UNSPEC;
    }
    let m = meta as *mut ShadowMeta;
    // SAFETY: bounds checked just above.
    let copy = unsafe { *m };
    if copy.magic != SHADOW_META_MAGIC {
        return TC_ACT_UNSPEC;
    }
    // Cleared before the clone, which shares the metadata: the clone comes
    // back through this program and must pass untouched.
    unsafe { (*m).magic = 0 };
    if clone_copy(ctx, &copy).is_none() {
        maps::count(counter::SHADOW_SKIPPED);
    }
    TC_ACT_UNSPEC
}

#[inline(always)]
fn clone_copy(ctx: &TcContext, m: &ShadowMeta) -> Option<()> {
    if ctx.load::<u8>(IP_PROTO).ok()? != PROTO_UDP {
        return None;
    }
    let stable = Tuple {
        saddr: ctx.load::<u32>(IP_SADDR).ok()?,
        daddr: ctx.load::<u32>(IP_DADDR).ok()?,
        sport: ctx.load::<u16>(UDP_SPORT).ok()?,
        dport: ctx.load::<u16>(UDP_DPORT).ok()?,
    };
    let (daddr, dport) = shadow_entry(m, stable.saddr, stable.sport, ctx.len())?;
    let shadow = Tuple {
        daddr,
        dport,
        ..stable
    };
    set_tuple(ctx, &stable, &shadow)?;
    let sent = ctx.clone_redirect(unsafe { (*ctx.skb.skb).ifindex }, BPF_F_INGRESS as u64);
    // The original is restored whatever became of the clone.
    set_tuple(ctx, &shadow, &stable)?;
    sent.ok()?;
    maps::count(counter::SHADOW_CLONED);
    Some(())
}

/// Rewrites the skb's UDP/IPv4 destination from `from` to `to` with the
/// kernel's checksum helpers (which know about checksum offload and a
/// zero UDP checksum).
#[inline(always)]
fn set_tuple(ctx: &TcContext, from: &Tuple, to: &Tuple) -> Option<()> {
    let l4 = (BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) as u64;
    if from.daddr != to.daddr {
        ctx.l4_csum_replace(UDP_CHECK, from.daddr as u64, to.daddr as u64, l4 | 4)
            .ok()?;
        ctx.l3_csum_replace(IP_CHECK, from.daddr as u64, to.daddr as u64, 4)
            .ok()?;
        ctx.store(IP_DADDR, &to.daddr, 0).ok()?;
    }
    if from.dport != to.dport {
        ctx.l4_csum_replace(
            UDP_CHECK,
            from.dport as u64,
            to.dport as u64,
            BPF_F_MARK_MANGLED_0 as u64 | 2,
        )
        .ok()?;
        ctx.store(UDP_DPORT, &to.dport, 0).ok()?;
    }
    Some(())
}
