//! Flow handling: established flows in both directions (connection-table
//! hit), new flows (service hit), the TCP state both entries share, and
//! the per-backend signals of how flows open and end (`signal`).
use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::XdpContext,
};
use splitter_common::{
    BACKEND_F_DISABLED, BACKEND_F_PRESENT, CONN_F_FIN_TS, CONN_F_LOCAL, CONN_F_REVERSE,
    CONN_F_SHADOW, CONN_F_SNAT, Conn, FAMILY_V4, FlowKey, LAST_SEEN_GRANULARITY_NS, MAGLEV_SIZE,
    MAX_VERSIONS, NO_BACKEND, PROTO_TCP, SNAT_PORT_MAX, SNAT_PORT_MIN, SNAT_PORT_TRIES,
    SNAT_TIME_WAIT_NS, STATE_TIMED_OUT, SVC_F_CLIENT_IP, SVC_F_SHADOW, SVC_F_SNAT, SVC_F_TARGETS,
    Service, ServiceKey, TCP_ESTABLISHED, TCP_FIN_BACKEND, TCP_FIN_CLIENT, TCP_RST, TCP_SYN,
    TargetKey, UDP_ANSWERED, awaiting_answer, conn_stale, connect_deadline_us, counter, elapsed_us,
    flow_hash, latency_bucket, mix32, service_drop, snat_port_start, start_units,
    target_prefix_len, version_hash,
};

use crate::{
    XDP_PASS, fib,
    maps::{self, BACKEND_SIGNALS, BACKEND_STATS, BACKENDS, CONNS, SERVICES, TABLES, TARGETS},
    nat::Tuple,
    parse::{self, Packet},
    shadow,
};

/// Entry point for every packet.
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> u32 {
    // Test build only: a different program (another tag) that shows it runs.
    #[cfg(feature = "upgrade-probe")]
    maps::count(counter::UPGRADE_PROBE);
    let pkt = match parse::parse(ctx) {
        Ok(p) => p,
        Err(action) => return action,
    };
    if !maps::may_be_ours(pkt.saddr, pkt.daddr) {
        // Neither to a VIP or SNAT address nor from a DNAT backend: no
        // flow can hold it and no service can take it.
        return XDP_PASS;
    }
    let key = FlowKey {
        src: [pkt.saddr, 0, 0, 0],
        dst: [pkt.daddr, 0, 0, 0],
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    // CLOCK_MONOTONIC at tick granularity: timeouts and `last_seen` are
    // coarser than a tick, and the fine clock costs a clock-source read.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(entry) = CONNS.get_ptr_mut(&key) {
        // SAFETY: a valid map value for the duration of this program run.
        let conn = unsafe { &mut *entry };
        if !restarts(conn, &pkt, now) {
            return established(ctx, &pkt, conn, now);
        }
    }
    let skey = ServiceKey {
        addr: key.dst,
        port: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
    };
    match SERVICES.get_ptr(&skey) {
        // SAFETY: as above.
        Some(svc) => new_flow(ctx, &pkt, &key, unsafe { &*svc }, now),
        None => XDP_PASS,
    }
}

/// Does this packet start a new flow on a tuple the table still holds?
/// Only a client's packet can: a TCP SYN after the old connection closed
/// (or went stale), or a UDP datagram after the idle timeout.
#[inline(always)]
fn restarts(conn: &Conn, pkt: &Packet, now: u64) -> bool {
    if conn.flags & CONN_F_REVERSE != 0 {
        return false;
    }
    if pkt.proto != PROTO_TCP {
        return conn_stale(pkt.proto, conn.state, conn.last_seen, now);
    }
    if pkt.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) != parse::TCP_SYN {
        return false;
    }
    let closed = conn.state & TCP_RST != 0 || conn.state & (TCP_FIN_CLIENT | TCP_FIN_BACKEND) != 0;
    closed || conn_stale(pkt.proto, conn.state, conn.last_seen, now)
}

/// The other entry of the same flow.
#[inline(always)]
fn peer_key(conn: &Conn, proto: u8) -> FlowKey {
    let (src, dst, sport, dport) = if conn.flags & CONN_F_REVERSE != 0 {
        (
            conn.other_addr,
            conn.new_addr,
            conn.other_port,
            conn.new_port,
        )
    } else {
        (
            conn.new_addr,
            conn.other_addr,
            conn.new_port,
            conn.other_port,
        )
    };
    FlowKey {
        src,
        dst,
        sport,
        dport,
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// A packet of a known flow, either direction.
#[inline(always)]
fn established(ctx: &XdpContext, pkt: &Packet, conn: &mut Conn, now: u64) -> u32 {
    if conn.flags & CONN_F_SHADOW != 0 {
        // A shadow backend's reply: counted, never sent on.
        return shadow::reply(pkt.len, conn, now);
    }
    if conn.flags & CONN_F_LOCAL != 0 {
        return local(pkt, conn, now);
    }
    let reverse = conn.flags & CONN_F_REVERSE != 0;
    // Client packets read their backend anyway (is it disabled?).
    let backend = if reverse {
        None
    } else {
        BACKENDS.get(conn.backend)
    };
    if let Some(b) = backend
        && b.flags & BACKEND_F_DISABLED != 0
    {
        return maps::drop_for(
            conn.service,
            counter::DROP_BACKEND_DISABLED,
            service_drop::BACKEND_DISABLED,
        );
    }
    let mut bits = 0;
    let mut touch_peer = false;
    if awaiting_answer(conn.state, conn.flags) {
        // Rare: only until the backend's first answer. Has the deadline
        // passed? A reply reads its backend's deadline here.
        let b = match backend {
            Some(b) => Some(b),
            None => BACKENDS.get(conn.backend),
        };
        if let Some(b) = b
            && elapsed_us(conn.fin_tsval, now) > connect_deadline_us(b.connect_timeout_ms)
        {
            bits |= STATE_TIMED_OUT;
        }
    }
    if pkt.proto != PROTO_TCP {
        if reverse {
            bits |= UDP_ANSWERED;
        }
    } else {
        let f = pkt.tcp_flags;
        if f & parse::TCP_RST != 0 {
            bits |= TCP_RST;
        }
        if f & parse::TCP_FIN != 0 {
            bits |= if reverse {
                TCP_FIN_BACKEND
            } else {
                TCP_FIN_CLIENT
            };
        }
        if reverse && f & (parse::TCP_SYN | parse::TCP_ACK) == (parse::TCP_SYN | parse::TCP_ACK) {
            bits |= TCP_ESTABLISHED;
        }
    }
    let new_bits = bits & !conn.state;
    if new_bits != 0 {
        signal(conn, new_bits, reverse);
        conn.state |= new_bits;
        // The exact time of a state change: a closed flow's SNAT port
        // is reused `TCP_CLOSED_REUSE_NS` after it.
        conn.last_seen = now;
        touch_peer = true;
    }
    if pkt.proto == PROTO_TCP {
        let f = pkt.tcp_flags;
        if !reverse
            && f & parse::TCP_FIN != 0
            && let Some(ts) = parse::tcp_tsval(ctx)
        {
            // The backend's TIME_WAIT (if it closed first) ends on this
            // FIN: remember its timestamp for the SNAT port's next flow.
            conn.fin_tsval = ts;
            conn.flags |= CONN_F_FIN_TS;
            touch_peer = true;
        }
    }
    if now.saturating_sub(conn.last_seen) > LAST_SEEN_GRANULARITY_NS {
        conn.last_seen = now;
        touch_peer = true;
    }
    if touch_peer {
        // Rare (state changes, once a second): keep both entries in step so
        // that either one tells whether the flow is over.
        if let Some(peer) = CONNS.get_ptr_mut(&peer_key(conn, pkt.proto)) {
            unsafe {
                (*peer).state |= conn.state;
                (*peer).last_seen = now;
                if conn.flags & CONN_F_FIN_TS != 0 {
                    (*peer).fin_tsval = conn.fin_tsval;
                    (*peer).flags |= CONN_F_FIN_TS;
                }
            }
        }
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(conn.backend) {
        unsafe {
            if reverse {
                (*s).reply_packets += 1;
                (*s).reply_bytes += pkt.len as u64;
            } else {
                (*s).packets += 1;
                (*s).bytes += pkt.len as u64;
            }
        }
    }
    let old = Tuple {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
    };
    let mut new = old;
    let snat = conn.flags & CONN_F_SNAT != 0;
    if reverse {
        new.saddr = conn.new_addr[0];
        new.sport = conn.new_port;
        if snat {
            new.daddr = conn.other_addr[0];
            new.dport = conn.other_port;
        }
    } else {
        new.daddr = conn.new_addr[0];
        new.dport = conn.new_port;
        if snat {
            new.saddr = conn.other_addr[0];
            new.sport = conn.other_port;
        }
    }
    if !reverse && pkt.proto != PROTO_TCP && shadow::sample(conn.service) {
        // A datagram to mirror (UDP only; one array read per client
        // datagram finds whether its service mirrors at all).
        let h = flow_hash(
            &[pkt.saddr, 0, 0, 0],
            &[pkt.daddr, 0, 0, 0],
            pkt.sport,
            pkt.dport,
            pkt.proto,
            false,
        );
        return mirror(ctx, &new, conn.service, h);
    }
    fib::forward(ctx, pkt.proto, &old, &new, Some(conn), now)
}

/// A client packet of a flow the controller's tee serves (`CONN_F_LOCAL`,
/// a mirrored TCP flow): its FIN or RST and `last_seen` kept (the flow
/// counts as a live flow of its stable backend, and a drain waits for it),
/// its bytes counted for the stable backend, and the packet passed to the
/// edge's stack unrewritten, where the tee's socket on the VIP takes it.
/// The tee marks the entry closed when its connection ends.
#[inline(always)]
fn local(pkt: &Packet, conn: &mut Conn, now: u64) -> u32 {
    let mut bits = 0;
    if pkt.tcp_flags & parse::TCP_RST != 0 {
        bits |= TCP_RST;
    }
    if pkt.tcp_flags & parse::TCP_FIN != 0 {
        bits |= TCP_FIN_CLIENT;
    }
    if bits & !conn.state != 0 || now.saturating_sub(conn.last_seen) > LAST_SEEN_GRANULARITY_NS {
        conn.state |= bits;
        conn.last_seen = now;
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(conn.backend) {
        // SAFETY: this CPU's slot of a per-CPU array.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.len as u64;
        }
    }
    XDP_PASS
}

/// Hands a sampled datagram (still as it arrived; `new` is its stable
/// rewrite) to [`shadow::mark`], packed into scalars.
#[inline(always)]
fn mirror(ctx: &XdpContext, new: &Tuple, svc: u32, h: u32) -> u32 {
    shadow::mark(
        ctx.ctx,
        (new.saddr as u64) << 32 | new.daddr as u64,
        (new.sport as u32) << 16 | new.dport as u32,
        (svc as u64) << 32 | h as u64,
    )
}

/// Counts what the state bits `new` (not set before) say about the flow's
/// backend in `BACKEND_SIGNALS`: its first answer (with the connect
/// latency), a refusal, a missed deadline, a reset. Called only when a
/// flow's state changes, so an outcome is counted once per flow (two CPUs
/// changing the same flow at the same instant could both count it).
#[inline(always)]
pub(crate) fn signal(conn: &Conn, new: u32, reverse: bool) {
    let Some(s) = BACKEND_SIGNALS.get_ptr_mut(conn.backend) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU array: no other writer.
    let s = unsafe { &mut *s };
    let old = conn.state;
    if new & STATE_TIMED_OUT != 0 {
        s.timeouts += 1;
    }
    if new & TCP_ESTABLISHED != 0 {
        s.established += 1;
        if conn.flags & CONN_F_FIN_TS == 0 {
            let us = elapsed_us(conn.fin_tsval, unsafe { bpf_ktime_get_ns() });
            s.latency_sum_us += us;
            if let Some(b) = s.latency.get_mut(latency_bucket(us)) {
                *b += 1;
            }
        }
    }
    if new & TCP_RST != 0 {
        if !reverse {
            s.reset_by_client += 1;
        } else if old & TCP_ESTABLISHED != 0 {
            s.reset_by_backend += 1;
        } else if (old | new) & STATE_TIMED_OUT == 0 {
            s.refused += 1;
        }
    }
}

/// Picks the version by hash threshold, then the backend by Maglev slot.
#[inline(always)]
fn pick_backend(svc: &Service, h: u32) -> Option<u16> {
    let vh = version_hash(h) as u64;
    let mut slot = None;
    let mut i = 0;
    while i < MAX_VERSIONS {
        if (i as u32) < svc.version_count && vh < svc.thresholds[i] {
            slot = Some(svc.tables[i]);
            break;
        }
        i += 1;
    }
    maglev_pick(slot?, h)
}

/// The version a source-CIDR rule of the service gives the client (its
/// table slot), if the longest matching rule names a version the service
/// still has. The rule holds the global version id, not the index, so a
/// service entry published before or after the rule never sends a client
/// to another version than the rule says.
#[inline(always)]
fn target_table(svc: &Service, saddr: u32) -> Option<u32> {
    let key = Key::new(
        target_prefix_len(32),
        TargetKey {
            service: svc.id.to_be(),
            addr: [saddr, 0, 0, 0],
        },
    );
    let vid = *TARGETS.get(&key)?;
    let mut i = 0;
    while i < MAX_VERSIONS {
        if (i as u32) < svc.version_count && svc.versions[i] == vid {
            return Some(svc.tables[i]);
        }
        i += 1;
    }
    None
}

/// The backend in Maglev slot `h` of table `slot`, if it has one.
#[inline(always)]
fn maglev_pick(slot: u32, h: u32) -> Option<u16> {
    let table = TABLES.get(slot)?;
    // For the verifier: the compiler turns `%` into multiply-and-shift, which
    // the verifier cannot bound, and then drops the bounds check as provably
    // redundant. Reading the index through a volatile load hides what the
    // compiler knows, so the check below stays and bounds it for the verifier.
    let rem = h % MAGLEV_SIZE;
    let idx = unsafe { core::ptr::read_volatile(&rem) } as usize;
    let id = *table.slots.get(idx)?;
    if id == NO_BACKEND { None } else { Some(id) }
}

/// A packet to a service with no flow yet.
#[inline(always)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, key: &FlowKey, svc: &Service, now: u64) -> u32 {
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) != parse::TCP_SYN
    {
        // Mid-stream packet of a flow we do not know: forwarding it to a
        // freshly chosen backend would only draw a reset.
        return maps::drop_for(svc.id, counter::DROP_NO_FLOW, service_drop::NO_FLOW);
    }
    let full = flow_hash(&key.src, &key.dst, pkt.sport, pkt.dport, pkt.proto, false);
    let h = if svc.flags & SVC_F_CLIENT_IP != 0 {
        flow_hash(&key.src, &key.dst, pkt.sport, pkt.dport, pkt.proto, true)
    } else {
        full
    };
    // A targeted client takes its rule's version with the same hash (so
    // client-IP affinity holds within it); an empty table there (no
    // healthy backend left) falls through to the weights.
    let mut targeted = None;
    if svc.flags & SVC_F_TARGETS != 0
        && let Some(slot) = target_table(svc, pkt.saddr)
    {
        targeted = maglev_pick(slot, h);
    }
    let Some(id) = targeted.or_else(|| pick_backend(svc, h)) else {
        return maps::drop_for(svc.id, counter::DROP_NO_BACKEND, service_drop::NO_BACKEND);
    };
    let Some(backend) = BACKENDS.get(id as u32) else {
        return maps::drop_for(svc.id, counter::DROP_NO_BACKEND, service_drop::NO_BACKEND);
    };
    if backend.flags & BACKEND_F_PRESENT == 0 {
        return maps::drop_for(svc.id, counter::DROP_NO_BACKEND, service_drop::NO_BACKEND);
    }
    // A sampled new TCP flow of a mirrored service goes to the tee, if one
    // listens (checked first, so flows that cannot be mirrored do not
    // draw from the share).
    let tee = pkt.proto == PROTO_TCP
        && svc.flags & SVC_F_SHADOW != 0
        && shadow::tee_alive(svc.id, now)
        && shadow::sample(svc.id);
    let snat = svc.flags & SVC_F_SNAT != 0 && !tee;
    let state = if tee {
        // Answered by the edge's own stack: nothing to wait for, and
        // nothing for the backend's signals (the tee counts those).
        TCP_SYN | TCP_ESTABLISHED
    } else if pkt.proto == PROTO_TCP {
        TCP_SYN
    } else {
        0
    };
    let flags = if snat { CONN_F_SNAT } else { 0 };
    // IPv4 only on this path: addresses are built from word 0 (the other
    // words are zero by contract), which also keeps the compiler from
    // turning whole-array copies into `memmove` calls.
    let backend_addr = [backend.addr[0], 0, 0, 0];
    let mut slot = MaybeUninit::<Conn>::uninit();
    // SAFETY: every field is written here, the route cache by `clear_route`.
    let rev = unsafe {
        let c = slot.as_mut_ptr();
        (*c).new_addr = key.dst;
        (*c).other_addr = key.src;
        (*c).new_port = pkt.dport;
        (*c).other_port = pkt.sport;
        (*c).backend = id as u32;
        (*c).flags = flags | CONN_F_REVERSE;
        (*c).state = state;
        (*c).service = svc.id;
        // The fine clock, once per new flow: the connect latency is
        // measured from here.
        (*c).fin_tsval = start_units(bpf_ktime_get_ns());
        (*c).last_seen = now;
        clear_route(c);
        &mut *c
    };
    if tee {
        // Forward entry only: the tee's own connections to the backends
        // leave from the edge's address and come back to its stack.
        rev.new_addr = backend_addr;
        rev.new_port = backend.port;
        rev.flags = CONN_F_LOCAL;
        if CONNS.insert(key, &*rev, BPF_ANY as u64).is_err() {
            return maps::drop_for(svc.id, counter::DROP_CONN_TABLE, service_drop::CONN_TABLE);
        }
        maps::count(counter::NEW_FLOW);
        maps::count(counter::SHADOW_TEE_FLOWS);
        if targeted.is_some() {
            maps::count(counter::NEW_FLOW_TARGETED);
        }
        if let Some(s) = BACKEND_STATS.get_ptr_mut(id as u32) {
            unsafe {
                (*s).new_flows += 1;
                (*s).packets += 1;
                (*s).bytes += pkt.len as u64;
            }
        }
        return XDP_PASS;
    }
    let mut rkey = FlowKey {
        src: backend_addr,
        dst: key.src,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    if snat {
        rkey.dst = [svc.snat_addr[0], 0, 0, 0];
        let syn_ts = if pkt.proto == PROTO_TCP {
            parse::tcp_tsval(ctx)
        } else {
            None
        };
        let Some(port) = claim_snat_port(&mut rkey, &*rev, full, syn_ts, now) else {
            return maps::drop_for(
                svc.id,
                counter::DROP_SNAT_EXHAUSTED,
                service_drop::SNAT_EXHAUSTED,
            );
        };
        rkey.dport = port;
    } else if CONNS.insert(&rkey, &*rev, BPF_ANY as u64).is_err() {
        return maps::drop_for(svc.id, counter::DROP_CONN_TABLE, service_drop::CONN_TABLE);
    }
    rev.new_addr = backend_addr;
    rev.new_port = backend.port;
    rev.other_addr = rkey.dst;
    rev.other_port = rkey.dport;
    rev.flags = flags;
    if CONNS.insert(key, &*rev, BPF_ANY as u64).is_err() {
        let _ = CONNS.remove(&rkey);
        return maps::drop_for(svc.id, counter::DROP_CONN_TABLE, service_drop::CONN_TABLE);
    }
    maps::count(counter::NEW_FLOW);
    if targeted.is_some() {
        maps::count(counter::NEW_FLOW_TARGETED);
    }
    if let Some(s) = BACKEND_STATS.get_ptr_mut(id as u32) {
        unsafe {
            (*s).new_flows += 1;
            (*s).packets += 1;
            (*s).bytes += pkt.len as u64;
        }
    }
    let old = Tuple {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
    };
    let new = Tuple {
        saddr: rkey.dst[0],
        daddr: backend.addr[0],
        sport: rkey.dport,
        dport: backend.port,
    };
    if pkt.proto != PROTO_TCP && svc.flags & SVC_F_SHADOW != 0 && shadow::sample(svc.id) {
        return mirror(ctx, &new, svc.id, full);
    }
    fib::forward(ctx, pkt.proto, &old, &new, None, now)
}

/// Zeroes the route cache of a new entry, word by word (the compiler turns
/// a run of zero stores into a `memset` call).
#[inline(always)]
pub(crate) unsafe fn clear_route(c: *mut Conn) {
    let w = unsafe { &raw mut (*c).fib_at };
    let mut i = 0;
    while i < 4 {
        // SAFETY: `fib_at` starts the last 32 bytes of the 96-byte `Conn`
        // (checked by the layout test in splitter-common).
        unsafe { core::ptr::write_volatile(w.add(i), 0) };
        i += 1;
    }
}

/// Finds a free SNAT port towards this backend and inserts the reverse
/// entry under it. Probes `SNAT_PORT_TRIES` ports from a hash-chosen start
/// (`snat_port_start`); a port whose TCP flow ended within the backend's
/// TIME_WAIT (`SNAT_TIME_WAIT_NS`) is taken right away if the SYN's
/// timestamp (`syn_ts`) is newer than that flow's last FIN (the backend
/// then accepts it), else only if no other probed port is; a port whose
/// entry is stale is taken over. Returns the port (network order).
///
/// Each port is looked up before anything is inserted: an insert into the
/// LRU table takes a free element first (evicting the oldest flow when the
/// table is full) and only then finds the key taken, so probing by insert
/// would evict a flow for every busy port it meets.
#[inline(always)]
fn claim_snat_port(
    rkey: &mut FlowKey,
    rev: &Conn,
    h: u32,
    syn_ts: Option<u32>,
    now: u64,
) -> Option<u16> {
    let range = (SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1;
    let start = snat_port_start(h);
    // Probes step by a hash-chosen odd stride below 1423, so coprime with
    // the range (22768 = 16 x 1423): unlike consecutive ports, the probes of
    // one flow do not run into the clusters that other flows' probes left.
    let stride = 2 * (mix32(h ^ 0x9e37_79b9) % 700) + 1;
    // A port whose TCP flow ended within the backend's TIME_WAIT: used only
    // if no other probed port is free (network order; 0: none).
    let mut recent = 0u16;
    let mut i = 0;
    while i < SNAT_PORT_TRIES {
        let port = (SNAT_PORT_MIN as u32 + (start + i * stride) % range) as u16;
        rkey.dport = port.to_be();
        match CONNS.get_ptr(&*rkey) {
            None => {
                // NOEXIST: another CPU may have claimed the port meanwhile.
                if CONNS.insert(&*rkey, rev, BPF_NOEXIST as u64).is_ok() {
                    return Some(rkey.dport);
                }
            }
            Some(e) => {
                // SAFETY: a valid map value; read before it is replaced.
                let (state, last_seen, flags, fin_ts) =
                    unsafe { ((*e).state, (*e).last_seen, (*e).flags, (*e).fin_tsval) };
                if conn_stale(rkey.proto, state, last_seen, now) {
                    let in_time_wait = rkey.proto == PROTO_TCP
                        && now.saturating_sub(last_seen) <= SNAT_TIME_WAIT_NS;
                    // PAWS at the backend: a SYN is accepted in TIME_WAIT
                    // when its timestamp is newer (serial order) than the
                    // last one of the old connection.
                    let newer = match syn_ts {
                        Some(ts) => {
                            flags & CONN_F_FIN_TS != 0 && (ts.wrapping_sub(fin_ts) as i32) > 0
                        }
                        None => false,
                    };
                    if !in_time_wait || newer {
                        if take_over_port(rkey, rev, e) {
                            return Some(rkey.dport);
                        }
                    } else if recent == 0 {
                        recent = rkey.dport;
                    }
                }
            }
        }
        i += 1;
    }
    if recent != 0 {
        rkey.dport = recent;
        // Looked up again: another CPU may have taken or refreshed it.
        if let Some(e) = CONNS.get_ptr(&*rkey)
            // SAFETY: a valid map value.
            && unsafe { conn_stale(rkey.proto, (*e).state, (*e).last_seen, now) }
            && take_over_port(rkey, rev, e)
        {
            return Some(recent);
        }
    }
    None
}

/// Replaces the stale entry `e` at `rkey` (the caller checked it is
/// stale) with `rev`, and removes the old flow's forward entry if it still
/// names this port (a late packet of the old flow must not leak into the
/// new one). False if the insert failed.
#[inline(always)]
fn take_over_port(rkey: &FlowKey, rev: &Conn, e: *const Conn) -> bool {
    // SAFETY: a valid map value; read before it is replaced.
    let (fwd, shadow_entry) =
        unsafe { (peer_key(&*e, rkey.proto), (*e).flags & CONN_F_SHADOW != 0) };
    if CONNS.insert(rkey, rev, BPF_ANY as u64).is_err() {
        return false;
    }
    if shadow_entry {
        // A shadow copy's reply entry has no forward entry of its own.
        return true;
    }
    if let Some(f) = CONNS.get_ptr(&fwd) {
        let (port, addr) = unsafe { ((*f).other_port, (*f).other_addr) };
        if port == rkey.dport && addr == rkey.dst {
            let _ = CONNS.remove(&fwd);
        }
    }
    true
}
