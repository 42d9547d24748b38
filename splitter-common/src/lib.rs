//! The contract between the splitter kernel program and its controller.
//!
//! Layout:
//! - capacities and timeouts (`MAX_*`, `*_NS`), sized once for both sides;
//! - map names (`map`), so the loader and the program cannot disagree;
//! - the plain-old-data keys and values stored in those maps;
//! - counter indexes (`counter`) with their human names.
//!
//! Every struct is `#[repr(C)]`, `Copy`, and has explicit padding so that no
//! byte of a map key is left undefined (an undefined padding byte in a hash
//! key makes two equal keys hash differently). Addresses are stored as four
//! `u32` words in network byte order so that IPv6 fits later without a format
//! change; an IPv4 address sits in word 0 and the other words are zero.
//! Ports are stored in network byte order, exactly as they sit in the packet.
#![no_std]

/// Most services the data plane holds at once.
pub const MAX_SERVICES: u32 = 1024;
/// Most versions a single service can split between.
pub const MAX_VERSIONS: usize = 4;
/// Most backends over all services. Backend ids are `u16` in the tables.
pub const MAX_BACKENDS: u32 = 16384;
/// Size of a Maglev lookup table. A prime, so that every `skip` is a
/// generator. Maglev trades disruption for balance through this size: at
/// 16381, 100 equal backends get 163 or 164 slots each, and removing one of
/// N backends moves about 1.05/N of the flows for N = 10, 1.5/N for N = 50
/// and 2.4/N for N = 100 (measured by the table tests).
pub const MAGLEV_SIZE: u32 = 16381;
/// Table slots. Each version owns two (generation 0 and 1): the controller
/// writes the idle one and then publishes it by flipping the generation in
/// the service entry, so no packet ever reads a half-written table.
pub const MAX_TABLES: u32 = 1024;
/// Entries of `TARGETS` (source-CIDR rules over all services).
pub const MAX_TARGETS: u32 = 65536;
/// Connection-table entries (one forward and one reverse entry per flow):
/// the default, and what the object file declares. `dataplane.conn_capacity`
/// sets another, within [`MIN_CONN_CAPACITY`]..=[`MAX_CONN_CAPACITY`], when
/// the program is loaded.
pub const CONN_CAPACITY: u32 = 1 << 20;
/// Smallest `dataplane.conn_capacity`.
pub const MIN_CONN_CAPACITY: u32 = 1 << 10;
/// Largest `dataplane.conn_capacity` (about 3 GiB of kernel memory).
pub const MAX_CONN_CAPACITY: u32 = 1 << 24;

/// SNAT source ports the edge hands out, per (backend, SNAT address).
/// Keep local listeners of the edge that talk to backends out of this range.
pub const SNAT_PORT_MIN: u16 = 10000;
/// Last SNAT source port (inclusive).
pub const SNAT_PORT_MAX: u16 = 32767;
/// How many ports a new flow probes before it is dropped as
/// `DROP_SNAT_EXHAUSTED`.
pub const SNAT_PORT_TRIES: u32 = 32;

/// A closed TCP flow (RST, or FIN both ways) may give up its SNAT port and
/// be re-selected after this long: time for the closing handshake's last
/// ACK and a first retransmitted FIN to pass. Both entries record the time
/// of the packet that closed the flow exactly (not at
/// `LAST_SEEN_GRANULARITY_NS`). Every closed flow holds its port this long,
/// so at R new flows per second to one backend about R x this many of its
/// ports are held.
pub const TCP_CLOSED_REUSE_NS: u64 = 1_000_000_000;
/// The backend keeps a closed connection in TIME_WAIT this long (Linux: 60
/// s). Within it, the backend refuses a new SYN on the same (source, port)
/// pair unless the SYN's TCP timestamp is newer than the old connection's
/// last (PAWS; each client connection has a timestamp clock of its own, so
/// a SNAT port's next client has a random one). A SNAT port whose TCP flow
/// ended more recently is handed to a new flow only if the SYN's timestamp
/// is newer than the old flow's last FIN (`Conn::fin_tsval`), or else when
/// none of the other probed ports is free.
pub const SNAT_TIME_WAIT_NS: u64 = 60_000_000_000;
/// A TCP flow that never got a SYN-ACK is stale after this long.
pub const TCP_SYN_TIMEOUT_NS: u64 = 30_000_000_000;
/// An idle established TCP flow is stale after this long.
pub const TCP_IDLE_TIMEOUT_NS: u64 = 3600 * 1_000_000_000;
/// An idle UDP flow is stale after this long; its next datagram is a new flow.
pub const UDP_IDLE_TIMEOUT_NS: u64 = 60_000_000_000;
/// `last_seen` is refreshed at most this often, to spare a shared cache line.
pub const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;
/// How long a flow entry's cached route (egress interface and MACs, see
/// [`Conn::fib_at`]) is used before the FIB is asked again: a route or
/// neighbour change reaches established flows within this time.
pub const FIB_CACHE_NS: u64 = 1_000_000_000;

/// 64-bit words of each half of the address filter (`ADDR_FILTER`).
pub const ADDR_FILTER_WORDS: u32 = 1024;
/// Bits of each half of the address filter.
pub const ADDR_FILTER_BITS: u32 = ADDR_FILTER_WORDS * 64;
/// First word of the half that holds destination addresses of interest
/// (VIPs, SNAT addresses).
pub const ADDR_FILTER_DST: u32 = 0;
/// First word of the half that holds source addresses of interest
/// (backends of DNAT-mode services, whose replies come from them).
pub const ADDR_FILTER_SRC: u32 = ADDR_FILTER_WORDS;

/// Address families, as in `AF_INET` / `AF_INET6`.
pub const FAMILY_V4: u8 = 2;
/// IPv6 (reserved: the format holds it, the program does not parse it yet).
pub const FAMILY_V6: u8 = 10;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;

/// Names of the maps in the kernel object.
pub mod map {
    /// `HashMap<ServiceKey, Service>`.
    pub const SERVICES: &str = "SERVICES";
    /// `HashMap<VipKey, u32>`: every VIP address, for dropping malformed
    /// packets to a VIP whose port cannot be read.
    pub const VIPS: &str = "VIPS";
    /// `Array<MaglevTable>`, `MAX_TABLES` slots.
    pub const TABLES: &str = "TABLES";
    /// `Array<Backend>`, indexed by backend id.
    pub const BACKENDS: &str = "BACKENDS";
    /// `LruHashMap<FlowKey, Conn>`.
    pub const CONNS: &str = "CONNS";
    /// `PerCpuArray<BackendStats>`, indexed by backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// `PerCpuArray<BackendSignals>`, indexed by backend id: how the
    /// backend's connections open and end. Touched only by handshake
    /// packets, resets and missed deadlines, never by the data packets of
    /// an established flow.
    pub const BACKEND_SIGNALS: &str = "BACKEND_SIGNALS";
    /// `PerCpuArray<u64>`, indexed by `counter::*`.
    pub const COUNTERS: &str = "COUNTERS";
    /// `PerCpuArray<u64>`: drops by reason per service, index
    /// `service id * service_drop::SLOTS + service_drop::*`.
    pub const SERVICE_DROPS: &str = "SERVICE_DROPS";
    /// `Array<u64>`, `2 * ADDR_FILTER_WORDS` words: a bit set of addresses
    /// that a flow or a service may involve ([`super::addr_filter_bit`]).
    pub const ADDR_FILTER: &str = "ADDR_FILTER";
    /// `LpmTrie<TargetKey, u32>` (`BPF_F_NO_PREALLOC`), `MAX_TARGETS`
    /// entries: source-CIDR rules of services flagged `SVC_F_TARGETS`;
    /// the value is the global version id the matching clients' new flows
    /// go to.
    pub const TARGETS: &str = "TARGETS";
    /// `Array<Shadow>`, indexed by service id: the version each service
    /// mirrors and the share it mirrors (all zero: none).
    pub const SHADOWS: &str = "SHADOWS";
    /// `PerCpuArray<u32>`, indexed by service id: the sampling accumulator
    /// of each mirrored service (see [`super::Shadow`]).
    pub const SHADOW_ACC: &str = "SHADOW_ACC";
    /// `Array<u64>`, indexed by service id: until when (`CLOCK_MONOTONIC`
    /// ns) the controller's TCP shadow tee of the service is known to
    /// listen. A mirrored TCP service hands sampled new flows to the edge's
    /// own stack only before that deadline; the controller pushes it 1.5 s
    /// ahead every 0.5 s while its tee runs (and zeroes it when the tee
    /// stops), so flows stay on the fast path within 1.5 s of a daemon
    /// that died.
    pub const TEE_ALIVE: &str = "TEE_ALIVE";
}

/// Service flag: pick the version and backend from the client address only.
pub const SVC_F_CLIENT_IP: u32 = 1;
/// Service flag: rewrite the source to the edge's address (SNAT mode).
pub const SVC_F_SNAT: u32 = 2;
/// Service flag: the service has source-CIDR rules in `TARGETS`; only a
/// service with the flag looks them up, so one without pays nothing.
pub const SVC_F_TARGETS: u32 = 4;

/// Data of a `TARGETS` key (the LPM trie's key is this behind a `u32`
/// prefix length). The prefix length counts `service` in full, so it is
/// `32 + ` the CIDR's length: a rule never matches another service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TargetKey {
    /// `Service::id`, big-endian (the trie compares bytes in order; any
    /// fixed order works for a full match, this one reads well in dumps).
    pub service: u32,
    /// Client network, network byte order; IPv4 in word 0, the other words
    /// zero (room for IPv6 prefixes).
    pub addr: [u32; 4],
}

/// Bits of a `TARGETS` key that a rule of prefix `bits` matches.
#[inline(always)]
pub const fn target_prefix_len(bits: u32) -> u32 {
    32 + bits
}
/// Service flag: the service mirrors a share of its traffic to a shadow
/// version (`SHADOWS` holds which). Unmirrored services never read
/// `SHADOWS` for a new flow (an established UDP flow's client datagram
/// reads it, whatever its service). (4 is source-CIDR targeting's.)
pub const SVC_F_SHADOW: u32 = 8;

/// Value of `SHADOWS` (indexed by service id): where a mirrored service's
/// copies go. A UDP datagram (a new TCP flow) of the service is mirrored
/// when the CPU's accumulator (`SHADOW_ACC`), raised by `percent` per
/// datagram (new flow), reaches 100 (it then drops by 100): exactly
/// `percent` in 100 per CPU, with no randomness to make a share drift.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shadow {
    /// Table slot (index into `TABLES`) of the shadow version, generation
    /// included (the live one, as in [`Service::tables`]).
    pub table: u32,
    /// Controller's global id of the shadow version.
    pub version: u32,
    /// Share mirrored, 1..=100; 0: mirroring is off.
    pub percent: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// XDP metadata (`bpf_xdp_adjust_meta`) in front of a datagram the XDP
/// program rewrote to its stable backend and passed to the kernel for
/// mirroring. The tc program on the same interface reads it, picks the
/// shadow backend, makes the copy's reply entry, sends a rewritten clone,
/// and clears `magic` so the clone is not mirrored again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShadowMeta {
    /// [`SHADOW_META_MAGIC`] while the copy is still to be made.
    pub magic: u32,
    /// Service id (index of `SHADOWS`).
    pub service: u32,
    /// The flow hash: picks the shadow backend in its version's table.
    pub hash: u32,
    /// The VIP the datagram was sent to, network byte order.
    pub vip: u32,
    /// The client's address, network byte order.
    pub client: u32,
    /// The VIP port, network byte order.
    pub vip_port: u16,
    /// The client's port, network byte order.
    pub client_port: u16,
}

/// `ShadowMeta::magic` of a datagram still to be mirrored.
pub const SHADOW_META_MAGIC: u32 = 0x5348_4457;

/// Key of `SERVICES`: what a packet is addressed to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// VIP address, network byte order.
    pub addr: [u32; 4],
    /// VIP port, network byte order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// Key of `VIPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// VIP address, network byte order.
    pub addr: [u32; 4],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u32,
}

/// Value of `SERVICES`: everything a new flow needs to pick a backend.
///
/// The whole entry is replaced in one map update (hash-map updates are
/// atomic to readers), which is how a weight change or a table generation
/// flip is published.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Controller's index of the service (for logs and tests).
    pub id: u32,
    /// `SVC_F_*`.
    pub flags: u32,
    /// Source address used in SNAT mode, network byte order.
    pub snat_addr: [u32; 4],
    /// How many of the `MAX_VERSIONS` entries below are in use.
    pub version_count: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// Cumulative upper bounds over the 32-bit version hash: version `i`
    /// takes hashes `h` with `thresholds[i-1] <= h < thresholds[i]`. The last
    /// used entry is `1 << 32`. A version of weight 0 has an empty range.
    pub thresholds: [u64; MAX_VERSIONS],
    /// Table slot (index into `TABLES`) of each version, generation included.
    pub tables: [u32; MAX_VERSIONS],
    /// Controller's global id of each version (for counters).
    pub versions: [u32; MAX_VERSIONS],
}

/// A Maglev lookup table: slot -> backend id. `u16::MAX` marks an empty
/// table (a version with no usable backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Backend id of each slot.
    pub slots: [u16; MAGLEV_SIZE as usize],
    /// Explicit padding to a 4-byte multiple.
    pub _pad: u16,
}

impl Default for MaglevTable {
    fn default() -> Self {
        Self {
            slots: [NO_BACKEND; MAGLEV_SIZE as usize],
            _pad: 0,
        }
    }
}

/// Table entry meaning "no backend".
pub const NO_BACKEND: u16 = u16::MAX;

/// Value of `BACKENDS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, network byte order.
    pub addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `BACKEND_F_*`.
    pub flags: u8,
    /// Global version id this backend belongs to (below `MAX_TABLES / 2`).
    pub version: u16,
    /// The service's `connect_timeout_ms`: a new flow that has no answer
    /// from the backend (TCP: SYN-ACK; UDP: a reply datagram) this long
    /// after its first packet counts as a timeout. 0 (a table written by a
    /// build that did not know the field) means
    /// [`DEFAULT_CONNECT_TIMEOUT_MS`].
    pub connect_timeout_ms: u16,
}

/// Connect timeout of a backend whose entry says 0.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u16 = 1000;

/// Backend flag: the slot holds a configured backend.
pub const BACKEND_F_PRESENT: u8 = 1;
/// Backend flag: the operator disabled the backend. It gets no new flows
/// (it is left out of every table) and the client packets of its
/// established flows are dropped (`drop_backend_disabled`). A draining
/// backend is only left out of the tables: its flows go on.
pub const BACKEND_F_DISABLED: u8 = 2;

/// Key of `CONNS`: a packet's own 5-tuple as it arrives at the edge.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network byte order.
    pub src: [u32; 4],
    /// Destination address, network byte order.
    pub dst: [u32; 4],
    /// Source port, network byte order.
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
}

/// Conn flag: this entry is the reply direction (backend -> edge).
pub const CONN_F_REVERSE: u32 = 1;
/// Conn flag: the flow is source-NATed; rewrite `other` too.
pub const CONN_F_SNAT: u32 = 2;
/// Conn flag: `fin_tsval` holds the TCP timestamp of the client's FIN.
pub const CONN_F_FIN_TS: u32 = 4;
/// Conn flag: a shadow copy's reply entry (with [`CONN_F_REVERSE`]): the
/// shadow backend's replies are counted and dropped, never sent on. It has
/// no forward entry of its own (the copies ride on the stable flow's).
pub const CONN_F_SHADOW: u32 = 8;
/// Conn flag: a mirrored TCP flow served through the edge's own stack by
/// the controller's tee (forward entry only, no reverse entry). Its client
/// packets pass to the kernel unrewritten (the tee listens on the VIP);
/// `new_addr:new_port` is the stable backend the tee connects to, chosen
/// like any flow's (`backend` is its id).
pub const CONN_F_LOCAL: u32 = 16;

/// TCP state bit: the client's SYN was seen.
pub const TCP_SYN: u32 = 1;
/// TCP state bit: the backend's SYN-ACK was seen.
pub const TCP_ESTABLISHED: u32 = 2;
/// TCP state bit: the client sent FIN.
pub const TCP_FIN_CLIENT: u32 = 4;
/// TCP state bit: the backend sent FIN.
pub const TCP_FIN_BACKEND: u32 = 8;
/// TCP state bit: either side sent RST.
pub const TCP_RST: u32 = 16;
/// State bit (TCP and UDP): the flow had no answer from its backend within
/// the backend's `connect_timeout_ms`, and that timeout was counted (in
/// `BackendSignals::timeouts`, or by the controller's sweep). Set once, so
/// an attempt is counted as a timeout once.
pub const STATE_TIMED_OUT: u32 = 32;
/// UDP flows use [`TCP_ESTABLISHED`] for "the backend answered" (its first
/// reply datagram was seen); no other `TCP_*` bit applies to them.
pub const UDP_ANSWERED: u32 = TCP_ESTABLISHED;

/// Value of `CONNS`. A flow has two entries, keyed by the forward tuple
/// (client -> VIP) and the reverse tuple (backend -> edge or client).
///
/// Forward entry: new destination := `new`; with `CONN_F_SNAT`, new source
/// := `other` (the SNAT address and port). Reverse entry: new source :=
/// `new` (the VIP); with `CONN_F_SNAT`, new destination := `other` (the
/// client). Each entry therefore holds the other's key:
/// reverse key = (`new` -> `other`), forward key = (`other` -> `new`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// Address written into the packet (see above), network byte order.
    pub new_addr: [u32; 4],
    /// The far end as seen after rewriting, network byte order.
    pub other_addr: [u32; 4],
    /// Port paired with `new_addr`, network byte order.
    pub new_port: u16,
    /// Port paired with `other_addr`, network byte order.
    pub other_port: u16,
    /// Backend id the flow is bound to.
    pub backend: u32,
    /// `CONN_F_*`.
    pub flags: u32,
    /// `TCP_*` bits seen so far (kept in both entries).
    pub state: u32,
    /// Service id, for the controller's flow inspection.
    pub service: u32,
    /// Without `CONN_F_FIN_TS`: when the flow's first packet was forwarded,
    /// in [`start_units`] (`bpf_ktime_get_ns() >> 10`, truncated to 32
    /// bits), for the connect latency and the connect deadline.
    /// With `CONN_F_FIN_TS`: the TCP timestamp (TSval, host order) of the
    /// client's last FIN, kept in both entries. A backend that closed first
    /// holds the connection in TIME_WAIT and accepts a SYN on the same
    /// (SNAT address, port) only with a newer timestamp, so a SNAT port is
    /// safe to reuse within TIME_WAIT for a SYN whose TSval is newer.
    pub fin_tsval: u32,
    /// `CLOCK_MONOTONIC` ns (the kernel's coarse reading,
    /// `bpf_ktime_get_coarse_ns()`) of the last packet, at
    /// `LAST_SEEN_GRANULARITY_NS`.
    pub last_seen: u64,
    /// Route cache of this direction, written by the kernel program only:
    /// coarse `CLOCK_MONOTONIC` ns of the FIB lookup it holds, 0 for none.
    /// Used for `FIB_CACHE_NS`, for packets that arrive on `fib_iif` with
    /// TOS `fib_tos` and are no longer than `fib_len`.
    pub fib_at: u64,
    /// Egress interface the FIB gave.
    pub fib_ifindex: u32,
    /// Ingress interface the lookup was made for.
    pub fib_iif: u32,
    /// Destination (next hop) MAC the FIB gave. Directly followed by
    /// `fib_smac`, as in an Ethernet header, 4-byte aligned.
    pub fib_dmac: [u8; 6],
    /// Source MAC the FIB gave.
    pub fib_smac: [u8; 6],
    /// Largest IP total length the route accepted (its MTU check passed).
    pub fib_len: u16,
    /// IP TOS the lookup was made with.
    pub fib_tos: u8,
    /// Explicit padding.
    pub _pad2: u8,
}

/// Has a TCP flow with these `TCP_*` bits ended: a RST, or a FIN from
/// both ends?
#[inline(always)]
pub fn tcp_closed(state: u32) -> bool {
    state & TCP_RST != 0
        || state & (TCP_FIN_CLIENT | TCP_FIN_BACKEND) == (TCP_FIN_CLIENT | TCP_FIN_BACKEND)
}

/// How long a flow that has not ended may stay idle before it is over.
#[inline(always)]
fn idle_timeout(proto: u8, state: u32) -> u64 {
    if proto != PROTO_TCP {
        UDP_IDLE_TIMEOUT_NS
    } else if state & TCP_ESTABLISHED == 0 {
        TCP_SYN_TIMEOUT_NS
    } else {
        TCP_IDLE_TIMEOUT_NS
    }
}

/// Is the flow an entry describes still going at `now` (same clock as
/// `last_seen`)? Not once a TCP flow ended ([`tcp_closed`]), nor once it
/// was idle past its timeout. The controller counts live flows with it.
#[inline(always)]
pub fn conn_live(proto: u8, state: u32, last_seen: u64, now: u64) -> bool {
    !(proto == PROTO_TCP && tcp_closed(state))
        && now.saturating_sub(last_seen) <= idle_timeout(proto, state)
}

/// May the entry's tuple (and SNAT port) serve a new flow at `now`? A
/// TCP flow that ended, after `TCP_CLOSED_REUSE_NS`; any other once idle
/// past its timeout. The data plane checks it before reusing a tuple.
#[inline(always)]
pub fn conn_stale(proto: u8, state: u32, last_seen: u64, now: u64) -> bool {
    let idle = now.saturating_sub(last_seen);
    if proto == PROTO_TCP && tcp_closed(state) {
        idle > TCP_CLOSED_REUSE_NS
    } else {
        idle > idle_timeout(proto, state)
    }
}

/// Value of `BACKEND_STATS` (per CPU; the controller sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    /// Packets forwarded to the backend.
    pub packets: u64,
    /// Bytes forwarded to the backend (whole frames).
    pub bytes: u64,
    /// Flows bound to the backend.
    pub new_flows: u64,
    /// Reply packets from the backend translated back.
    pub reply_packets: u64,
    /// Reply bytes from the backend translated back.
    pub reply_bytes: u64,
}

impl BackendStats {
    /// Adds `other` field by field (wrapping), as the controller sums the
    /// per-CPU entries.
    pub fn add(&mut self, other: &Self) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
        self.new_flows = self.new_flows.wrapping_add(other.new_flows);
        self.reply_packets = self.reply_packets.wrapping_add(other.reply_packets);
        self.reply_bytes = self.reply_bytes.wrapping_add(other.reply_bytes);
    }
}

/// Buckets of the connect-latency histogram: one per bound of
/// [`LATENCY_BOUNDS_US`] and one above the last.
pub const LATENCY_BUCKETS: usize = 15;
/// Upper bounds (inclusive, microseconds) of the connect-latency buckets:
/// 0.1 ms to 2.5 s in 1-2.5-5 steps, as Prometheus reads them.
pub const LATENCY_BOUNDS_US: [u64; LATENCY_BUCKETS - 1] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000,
];

/// Value of `BACKEND_SIGNALS` (per CPU; the controller sums the CPUs): how
/// a backend's flows open and end. New flows ("attempts") are
/// `BackendStats::new_flows`. An attempt has at most one of `refused` and
/// `timeouts`; a connection that opens after its deadline counts in
/// `timeouts` and in `established`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendSignals {
    /// TCP: SYN-ACKs seen (connections the backend accepted). UDP: flows
    /// that got a first reply datagram.
    pub established: u64,
    /// TCP: the backend answered a SYN with RST (before any SYN-ACK and
    /// before the deadline).
    pub refused: u64,
    /// Flows with no answer from the backend within `connect_timeout_ms`.
    pub timeouts: u64,
    /// RST from the backend on an established TCP flow (the flow's first RST).
    pub reset_by_backend: u64,
    /// RST from the client (the flow's first RST), in any TCP state.
    pub reset_by_client: u64,
    /// Sum of the connect latencies sampled, in microseconds.
    pub latency_sum_us: u64,
    /// Connect latency (first packet forwarded to the backend's first
    /// answer), one count per established flow, in the buckets of
    /// [`LATENCY_BOUNDS_US`] (not cumulative).
    pub latency: [u64; LATENCY_BUCKETS],
    /// Room for later signals without a layout change.
    pub _spare: [u64; 3],
}

impl BackendSignals {
    /// Adds `other` field by field (wrapping), as the controller sums the
    /// per-CPU entries.
    pub fn add(&mut self, other: &Self) {
        self.established = self.established.wrapping_add(other.established);
        self.refused = self.refused.wrapping_add(other.refused);
        self.timeouts = self.timeouts.wrapping_add(other.timeouts);
        self.reset_by_backend = self.reset_by_backend.wrapping_add(other.reset_by_backend);
        self.reset_by_client = self.reset_by_client.wrapping_add(other.reset_by_client);
        self.latency_sum_us = self.latency_sum_us.wrapping_add(other.latency_sum_us);
        for (a, b) in self.latency.iter_mut().zip(other.latency) {
            *a = a.wrapping_add(b);
        }
    }
}

/// The 32-bit time stamp of [`Conn::fin_tsval`] for a `CLOCK_MONOTONIC`
/// reading in ns: units of 1.024 us, wrapping every 73 minutes.
#[inline(always)]
pub const fn start_units(mono_ns: u64) -> u32 {
    (mono_ns >> 10) as u32
}

/// Microseconds from a [`start_units`] stamp to a later reading (0 if the
/// reading is earlier: the coarse clock may lag the fine one by a tick).
#[inline(always)]
pub const fn elapsed_us(start: u32, mono_ns: u64) -> u64 {
    let d = start_units(mono_ns).wrapping_sub(start) as i32;
    if d <= 0 { 0 } else { (d as u64 * 1024) / 1000 }
}

/// Index into [`BackendSignals::latency`] of a latency in microseconds.
#[inline(always)]
pub fn latency_bucket(us: u64) -> usize {
    let mut i = 0;
    while i < LATENCY_BOUNDS_US.len() {
        if us <= LATENCY_BOUNDS_US[i] {
            return i;
        }
        i += 1;
    }
    LATENCY_BUCKETS - 1
}

/// A backend's connect deadline in microseconds (`connect_timeout_ms`, 0
/// read as [`DEFAULT_CONNECT_TIMEOUT_MS`]).
#[inline(always)]
pub const fn connect_deadline_us(connect_timeout_ms: u16) -> u64 {
    let ms = if connect_timeout_ms == 0 {
        DEFAULT_CONNECT_TIMEOUT_MS
    } else {
        connect_timeout_ms
    };
    ms as u64 * 1000
}

/// Has a flow had no answer from its backend yet, with no outcome
/// counted (no answer, reset or timeout), and does its `fin_tsval` hold its
/// start stamp? Only such a flow can still time out.
#[inline(always)]
pub const fn awaiting_answer(state: u32, flags: u32) -> bool {
    state & (TCP_ESTABLISHED | TCP_RST | STATE_TIMED_OUT) == 0 && flags & CONN_F_FIN_TS == 0
}

/// Indexes of `COUNTERS`: drops by reason and forwarding outcomes.
pub mod counter {
    /// IPv4 header shorter than 20 bytes or than its IHL says. Dropped.
    pub const DROP_TRUNCATED_IP: u32 = 0;
    /// IHL below 5. Dropped.
    pub const DROP_BAD_IHL: u32 = 1;
    /// IP options on a packet to a VIP. Dropped.
    pub const DROP_IP_OPTIONS: u32 = 2;
    /// A fragment of a packet to a VIP. Dropped.
    pub const DROP_FRAGMENT: u32 = 3;
    /// TCP/UDP header cut short on a packet to a VIP. Dropped.
    pub const DROP_TRUNCATED_L4: u32 = 4;
    /// TCP packet without SYN to a VIP, for a flow the table does not know. Dropped.
    pub const DROP_NO_FLOW: u32 = 5;
    /// The chosen version has no usable backend. Dropped.
    pub const DROP_NO_BACKEND: u32 = 6;
    /// No free SNAT port after `SNAT_PORT_TRIES` probes. Dropped.
    pub const DROP_SNAT_EXHAUSTED: u32 = 7;
    /// The connection table refused an insert. Dropped.
    pub const DROP_CONN_TABLE: u32 = 8;
    /// The route lookup said blackhole, unreachable or prohibited. Dropped.
    pub const DROP_UNROUTABLE: u32 = 9;
    /// TTL would reach zero; handed to the kernel for its ICMP error.
    pub const PASS_TTL: u32 = 10;
    /// Rewritten, but the next hop's MAC is not known yet: handed to the
    /// kernel, which resolves it and forwards the packet.
    pub const PASS_NO_NEIGH: u32 = 11;
    /// Rewritten, route lookup declined for another reason: handed to the kernel.
    pub const PASS_FIB_OTHER: u32 = 12;
    /// Sent back out of the interface it came in on (`XDP_TX`).
    pub const TX: u32 = 13;
    /// Sent out of another interface (`XDP_REDIRECT`).
    pub const REDIRECT: u32 = 14;
    /// New flows created.
    pub const NEW_FLOW: u32 = 15;
    /// A client packet of a flow whose backend the operator disabled. Dropped.
    pub const DROP_BACKEND_DISABLED: u32 = 16;
    /// New flows whose version a source-CIDR rule (`TARGETS`) chose (also
    /// counted in `NEW_FLOW`).
    pub const NEW_FLOW_TARGETED: u32 = 17;
    /// Datagrams sampled for mirroring: rewritten to their stable backend
    /// and passed to the kernel with metadata for the tc program to copy.
    pub const SHADOW_COPIES: u32 = 18;
    /// Replies from a shadow backend, counted and dropped.
    pub const SHADOW_REPLY_DROPPED: u32 = 19;
    /// Sampled datagrams not copied: the shadow version had no usable
    /// backend, the copy's reply tuple was held by a real flow, or the
    /// metadata could not be written or the clone not sent. The datagram
    /// itself went on to its stable backend.
    pub const SHADOW_SKIPPED: u32 = 20;
    /// Shadow copies the tc program sent (`bpf_clone_redirect`).
    pub const SHADOW_CLONED: u32 = 21;
    /// New TCP flows of a mirrored service handed to the controller's tee
    /// (passed unrewritten to the edge's stack; also counted in `NEW_FLOW`).
    pub const SHADOW_TEE_FLOWS: u32 = 22;
    /// Number of counters in use.
    pub const COUNT: u32 = 23;
    /// Entries of the `COUNTERS` map: room for counters added later, so that
    /// adding one does not change the map's layout (and an upgrade can keep
    /// the pinned maps).
    pub const SLOTS: u32 = 32;
    /// The last slot, written only by the `upgrade-probe` test build of
    /// the kernel program (one per packet it sees): the upgrade test reads
    /// it to prove the new build handles the traffic. Not in [`NAMES`].
    pub const UPGRADE_PROBE: u32 = SLOTS - 1;

    /// Human names, indexed like the constants.
    pub const NAMES: [&str; COUNT as usize] = [
        "drop_truncated_ip",
        "drop_bad_ihl",
        "drop_ip_options",
        "drop_fragment",
        "drop_truncated_l4",
        "drop_no_flow",
        "drop_no_backend",
        "drop_snat_exhausted",
        "drop_conn_table",
        "drop_unroutable",
        "pass_ttl",
        "pass_no_neigh",
        "pass_fib_other",
        "tx",
        "redirect",
        "new_flow",
        "drop_backend_disabled",
        "new_flow_targeted",
        "shadow_copies",
        "shadow_reply_dropped",
        "shadow_skipped",
        "shadow_cloned",
        "shadow_tee_flows",
    ];
}

/// Slots of `SERVICE_DROPS`: the drops that happen once a packet's service
/// is known, counted per service as well as globally.
pub mod service_drop {
    /// `counter::DROP_NO_FLOW`.
    pub const NO_FLOW: u32 = 0;
    /// `counter::DROP_NO_BACKEND`.
    pub const NO_BACKEND: u32 = 1;
    /// `counter::DROP_SNAT_EXHAUSTED`.
    pub const SNAT_EXHAUSTED: u32 = 2;
    /// `counter::DROP_CONN_TABLE`.
    pub const CONN_TABLE: u32 = 3;
    /// `counter::DROP_BACKEND_DISABLED`.
    pub const BACKEND_DISABLED: u32 = 4;
    /// Slots per service (room to grow without a layout change).
    pub const SLOTS: u32 = 8;
    /// Reasons in use, named like the global counters without `drop_`.
    pub const NAMES: [&str; 5] = [
        "no_flow",
        "no_backend",
        "snat_exhausted",
        "conn_table",
        "backend_disabled",
    ];
}

/// Where a new flow of 5-tuple hash `h` starts probing for a SNAT port, as
/// an offset from `SNAT_PORT_MIN` (both sides use it: the data plane to
/// probe, tests to predict the probe).
#[inline(always)]
pub fn snat_port_start(h: u32) -> u32 {
    mix32(h ^ 0x27d4_eb2d) % ((SNAT_PORT_MAX - SNAT_PORT_MIN) as u32 + 1)
}

/// The 32-bit mixer both sides use to hash flows (the finalizer of
/// MurmurHash3): cheap, and every input bit affects every output bit.
#[inline(always)]
pub const fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Hash of a flow for backend selection. With `client_ip_only`, only the
/// source address counts, so one client always lands on one version and
/// backend. Ports and addresses are taken in network byte order.
#[inline(always)]
pub const fn flow_hash(
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    client_ip_only: bool,
) -> u32 {
    let mut h = mix32(src[0] ^ 0x9e37_79b9);
    h = mix32(h ^ src[1]);
    h = mix32(h ^ src[2]);
    h = mix32(h ^ src[3]);
    if client_ip_only {
        return h;
    }
    h = mix32(h ^ dst[0]);
    h = mix32(h ^ dst[1]);
    h = mix32(h ^ dst[2]);
    h = mix32(h ^ dst[3]);
    mix32(h ^ ((sport as u32) << 16 | dport as u32) ^ ((proto as u32) << 8))
}

/// Bit of an address in either half of the address filter. The filter may
/// hold false positives (two addresses on one bit); it never misses an
/// address that was added.
#[inline(always)]
pub const fn addr_filter_bit(addr: &[u32; 4]) -> u32 {
    let h = mix32(addr[0] ^ mix32(addr[1] ^ mix32(addr[2] ^ mix32(addr[3] ^ 0x2545_f491))));
    h & (ADDR_FILTER_BITS - 1)
}

/// Hash used to pick the version, derived from the flow hash so that the
/// version choice and the backend choice inside it are independent.
#[inline(always)]
pub const fn version_hash(flow_hash: u32) -> u32 {
    mix32(flow_hash ^ 0x5bd1_e995)
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], Copy, made only of integers, and
    // carry explicit padding fields, so every bit pattern is valid and no
    // byte is uninitialised.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Conn {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for BackendSignals {}
    unsafe impl aya::Pod for TargetKey {}
    unsafe impl aya::Pod for Shadow {}
    unsafe impl aya::Pod for ShadowMeta {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(
            size_of::<Service>(),
            32 + 8 * MAX_VERSIONS + 8 * MAX_VERSIONS
        );
        assert_eq!(size_of::<MaglevTable>(), 2 * MAGLEV_SIZE as usize + 2);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Conn>(), 96);
        // The program zeroes the route cache as the last four 64-bit words
        // and copies the cached MACs as six 16-bit words.
        assert_eq!(core::mem::offset_of!(Conn, fib_at), 64);
        assert_eq!(core::mem::offset_of!(Conn, fib_dmac), 80);
        assert_eq!(core::mem::offset_of!(Conn, fib_smac), 86);
        assert_eq!(size_of::<BackendStats>(), 40);
        assert_eq!(size_of::<TargetKey>(), 20);
        assert_eq!(size_of::<Shadow>(), 16);
        // XDP metadata must be a multiple of 4 bytes, at most 32.
        assert_eq!(size_of::<ShadowMeta>(), 24);
        assert_eq!(size_of::<BackendSignals>(), 8 * (6 + LATENCY_BUCKETS + 3));
    }

    #[test]
    fn latency_buckets_take_their_upper_bound_and_overflow_into_the_last() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(100), 0);
        assert_eq!(latency_bucket(101), 1);
        assert_eq!(latency_bucket(1_000_000), 12);
        assert_eq!(latency_bucket(2_500_000), 13);
        assert_eq!(latency_bucket(2_500_001), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn elapsed_time_survives_the_stamp_wrapping_and_a_lagging_clock() {
        let t0 = (1u64 << 42) - 500_000; // the 32-bit stamp wraps 0.5 ms later
        let s = start_units(t0);
        assert_eq!(elapsed_us(s, t0), 0);
        let d = elapsed_us(s, t0 + 1_000_000_000);
        assert!((999_000..=1_001_000).contains(&d), "{d}");
        // A reading before the stamp (the coarse clock lags): 0, not huge.
        assert_eq!(elapsed_us(s, t0 - 4_000_000), 0);
        assert_eq!(connect_deadline_us(0), 1_000_000);
        assert_eq!(connect_deadline_us(250), 250_000);
    }

    #[test]
    fn client_ip_hash_ignores_everything_but_the_source() {
        let a = flow_hash(&[1, 0, 0, 0], &[2, 0, 0, 0], 10, 80, 6, true);
        let b = flow_hash(&[1, 0, 0, 0], &[3, 0, 0, 0], 11, 81, 17, true);
        assert_eq!(a, b);
        let c = flow_hash(&[1, 0, 0, 0], &[2, 0, 0, 0], 10, 80, 6, false);
        let d = flow_hash(&[1, 0, 0, 0], &[2, 0, 0, 0], 11, 80, 6, false);
        assert_ne!(c, d);
    }
}
