//! The maps the program shares with the controller (names and types from
//! `splitter-common`), the two counter helpers every path uses, and the
//! address checks (`is_vip`, `may_be_ours`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use splitter_common::{
    ADDR_FILTER_DST, ADDR_FILTER_SRC, ADDR_FILTER_WORDS, Backend, BackendSignals, BackendStats,
    CONN_CAPACITY, Conn, FlowKey, MAX_BACKENDS, MAX_SERVICES, MAX_TABLES, MAX_TARGETS, MaglevTable,
    Service, ServiceKey, Shadow, TargetKey, VipKey, addr_filter_bit, counter, service_drop,
};

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "VIPS")]
pub static VIPS: HashMap<VipKey, u32> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "TABLES")]
pub static TABLES: Array<MaglevTable> = Array::with_max_entries(MAX_TABLES, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Shared by all CPUs: a reply may arrive on another CPU than its request.
#[map(name = "CONNS")]
pub static CONNS: LruHashMap<FlowKey, Conn> = LruHashMap::with_max_entries(CONN_CAPACITY, 0);

#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<BackendStats> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Touched only on handshakes, resets and missed deadlines (`flow::signal`).
#[map(name = "BACKEND_SIGNALS")]
pub static BACKEND_SIGNALS: PerCpuArray<BackendSignals> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Entries of `COUNTERS`. The `foreign-layout` test build doubles them, so
/// its maps no longer match the pinned ones and a daemon must refuse it.
#[cfg(not(feature = "foreign-layout"))]
const COUNTER_SLOTS: u32 = counter::SLOTS;
#[cfg(feature = "foreign-layout")]
const COUNTER_SLOTS: u32 = counter::SLOTS * 2;
/// Bit set of the addresses a flow or a service may involve (see
/// `splitter_common::map::ADDR_FILTER`), so that a packet that cannot be
/// ours skips the connection-table lookup. Filled by the controller.
#[map(name = "ADDR_FILTER")]
pub static ADDR_FILTER: Array<u64> = Array::with_max_entries(2 * ADDR_FILTER_WORDS, 0);

/// Source-CIDR rules (`splitter_common::map::TARGETS`); looked up only
/// for new flows of services flagged `SVC_F_TARGETS`. `LpmTrie` maps are
/// created with `BPF_F_NO_PREALLOC` (the kernel requires it).
#[map(name = "TARGETS")]
pub static TARGETS: LpmTrie<TargetKey, u32> = LpmTrie::with_max_entries(MAX_TARGETS, 0);
/// What each service mirrors (`shadow`), indexed by service id.
#[map(name = "SHADOWS")]
pub static SHADOWS: Array<Shadow> = Array::with_max_entries(MAX_SERVICES, 0);

/// Per-CPU sampling accumulator of each mirrored service (`shadow::sample`).
#[map(name = "SHADOW_ACC")]
pub static SHADOW_ACC: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);

/// Until when each service's TCP shadow tee listens (`shadow::tee_alive`).
#[map(name = "TEE_ALIVE")]
pub static TEE_ALIVE: Array<u64> = Array::with_max_entries(MAX_SERVICES, 0);

#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "SERVICE_DROPS")]
pub static SERVICE_DROPS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(MAX_SERVICES * service_drop::SLOTS, 0);

/// Counts a drop of service `svc` globally (`idx`, a `counter::*`) and for
/// the service (`slot`, a `service_drop::*`), and returns `XDP_DROP`.
#[inline(always)]
pub fn drop_for(svc: u32, idx: u32, slot: u32) -> u32 {
    if let Some(c) = SERVICE_DROPS.get_ptr_mut(svc.wrapping_mul(service_drop::SLOTS) + slot) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
    drop_with(idx)
}

/// Adds one to counter `idx` (a `counter::*` constant).
#[inline(always)]
pub fn count(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        // Per-CPU slot: no other writer.
        unsafe { *c += 1 };
    }
}

/// Counts `idx` and returns `XDP_DROP`.
#[inline(always)]
pub fn drop_with(idx: u32) -> u32 {
    count(idx);
    crate::XDP_DROP
}

/// Is `addr` the address of any VIP? Used to decide whether a packet we
/// cannot fully parse is ours to drop or the kernel's to judge.
#[inline(always)]
pub fn is_vip(addr: u32) -> bool {
    let key = VipKey {
        addr: [addr, 0, 0, 0],
        family: splitter_common::FAMILY_V4 as u32,
    };
    VIPS.get_ptr(&key).is_some()
}

#[inline(always)]
fn filter_has(base: u32, addr: u32) -> bool {
    let bit = addr_filter_bit(&[addr, 0, 0, 0]);
    match ADDR_FILTER.get(base + bit / 64) {
        Some(w) => *w & (1u64 << (bit % 64)) != 0,
        None => true,
    }
}

/// Can this packet belong to a flow or start one? Only if it is addressed
/// to a VIP or a SNAT address, or comes from a DNAT-mode backend (the
/// filter may answer yes for others; it never answers no for these).
#[inline(always)]
pub fn may_be_ours(saddr: u32, daddr: u32) -> bool {
    filter_has(ADDR_FILTER_DST, daddr) || filter_has(ADDR_FILTER_SRC, saddr)
}
