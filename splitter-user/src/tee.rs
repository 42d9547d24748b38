//! TCP shadow traffic: the tee.
//!
//! XDP cannot copy a byte stream onto a second connection, so a mirrored
//! TCP flow leaves the fast path. The kernel program hands the sampled
//! share of a mirrored service's new flows to the edge's own stack
//! (`CONN_F_LOCAL`; only while `TEE_ALIVE` says a tee listens), with the
//! stable backend it chose for the flow in the flow's entry. The tee
//! listens on the VIP (an AnyIP route, `local VIP/32 dev lo`, makes the
//! stack take the address), connects to that stable backend and to a
//! shadow backend, copies the client's bytes to both and only the stable
//! backend's bytes back. The shadow's answers are read, counted and
//! dropped.
//!
//! The shadow never holds the client: its copy of the request goes
//! through a bounded queue ([`QUEUE_CHUNKS`] reads of at most
//! [`CHUNK`] bytes per flow, [`QUEUE_TOTAL`] bytes over all flows) that the
//! client side never waits on; a shadow that falls behind is cut off
//! (`fell_behind`), and one that is still busy [`SHADOW_LINGER`] after the
//! client's connection ended is dropped.
//!
//! This module owns the listeners and routes of mirrored TCP services,
//! the heartbeat in `TEE_ALIVE`, and the tee's counters: per service
//! ([`TeeReport`]) and per backend in the form of the signals
//! ([`Counters`], added to the kernel's by the controller). [`plans`] (what
//! should run, from the published config) is pure.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use splitter_common::{
    CONN_F_LOCAL, Conn, FlowKey, PROTO_TCP, TCP_FIN_BACKEND, TCP_FIN_CLIENT, latency_bucket,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};

use crate::{
    config::{BackendState, Config, Protocol},
    signals::Counters,
};

/// Bytes one read from a client (or a backend) takes at most.
pub const CHUNK: usize = 16 * 1024;
/// Reads of the client's bytes queued for a shadow at most: a shadow more
/// than `QUEUE_CHUNKS * CHUNK` bytes (1 MiB) behind its client is cut off.
pub const QUEUE_CHUNKS: usize = 64;
/// Bytes queued for shadows over all flows at most: past it, a shadow that
/// needs more room is cut off as if its own queue were full (64 MiB).
pub const QUEUE_TOTAL: usize = 64 << 20;
/// How long a shadow may go on after its client's connection ended (to
/// finish its answer, which is counted), before it is dropped.
pub const SHADOW_LINGER: Duration = Duration::from_secs(5);
/// How often the heartbeat pushes `TEE_ALIVE`.
pub const BEAT: Duration = Duration::from_millis(500);
/// How far ahead of now it pushes it: the mirrored share of the new flows
/// a daemon gets after it died (which its edge refuses, nothing listening)
/// ends within this.
pub const ALIVE_AHEAD: Duration = Duration::from_millis(1500);
/// The routing protocol number the tee's AnyIP routes carry, so that a
/// daemon finds (and removes) routes an earlier one left.
pub const ROUTE_PROTO: &str = "250";

/// What the tee of one mirrored TCP service does: derived from the
/// published config by [`plans`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Service name.
    pub service: String,
    /// Where the tee listens.
    pub vip: SocketAddrV4,
    /// The shadow version.
    pub shadow_version: String,
    /// Its backends that take copies (active, not down).
    pub shadow: Vec<SocketAddrV4>,
    /// Every backend of the service with its version, to name the version
    /// of the stable backend a flow's entry gives.
    pub backends: Vec<(String, SocketAddrV4)>,
    /// Backends to fall back on when a flow's entry is gone (weight of
    /// version x weight of backend, active ones of versions with weight).
    pub fallback: Vec<(String, SocketAddrV4, u64)>,
    /// The service's connect timeout, for both connections.
    pub connect_timeout: Duration,
}

/// The tees `config` (the published one: health verdicts applied) asks
/// for: one per TCP service with a shadow.
pub fn plans(config: &Config) -> Vec<Plan> {
    config
        .services
        .iter()
        .filter(|s| s.protocol == Protocol::Tcp)
        .filter_map(|s| {
            let sh = s.shadow.as_ref().filter(|sh| sh.percent > 0)?;
            let shadow = s
                .versions
                .iter()
                .find(|v| v.name == sh.version)?
                .backends
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .map(|b| b.address)
                .collect();
            let backends = s
                .versions
                .iter()
                .flat_map(|v| v.backends.iter().map(|b| (v.name.clone(), b.address)))
                .collect();
            let fallback = s
                .versions
                .iter()
                .filter(|v| v.weight > 0 && v.name != sh.version)
                .flat_map(|v| {
                    v.backends
                        .iter()
                        .filter(|b| b.state == BackendState::Active && b.weight > 0)
                        .map(|b| {
                            (
                                v.name.clone(),
                                b.address,
                                u64::from(v.weight) * u64::from(b.weight),
                            )
                        })
                })
                .collect();
            Some(Plan {
                service: s.name.clone(),
                vip: s.vip,
                shadow_version: sh.version.clone(),
                shadow,
                backends,
                fallback,
                connect_timeout: Duration::from_millis(u64::from(s.connect_timeout_ms.max(1))),
            })
        })
        .collect()
}

/// One side of the tee's connections (to the stable backends, or to the
/// shadow's), counted over a service's mirrored flows.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Side {
    /// Connections tried.
    pub connects: u64,
    /// Connections that opened.
    pub connected: u64,
    /// Connections refused (RST to the SYN, or another connect error).
    pub refused: u64,
    /// Connections with no answer within the service's connect timeout.
    pub timeouts: u64,
    /// Connections the backend reset after they opened.
    pub resets: u64,
    /// Request bytes written to the backend.
    pub request_bytes: u64,
    /// Response bytes read from it (for the shadow: read and dropped).
    pub response_bytes: u64,
    /// Connections that answered at least one byte.
    pub answered: u64,
    /// Sum over those of the time from the tee's first read of the
    /// client's request to the backend's first response byte, in µs.
    pub ttfb_sum_us: u64,
}

impl Side {
    /// Refused + timeouts + resets.
    pub fn errors(&self) -> u64 {
        self.refused + self.timeouts + self.resets
    }

    /// Mean time to first byte in µs (`None`: nothing answered yet).
    pub fn ttfb_mean_us(&self) -> Option<u64> {
        self.ttfb_sum_us.checked_div(self.answered)
    }
}

/// A TCP service's tee: is it listening, how many flows it served, and
/// how both sides of them did (the same flows, so the two compare).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TeeReport {
    /// The tee listens on the VIP and the data plane hands it flows.
    pub listening: bool,
    /// Why it does not listen, when it tried and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Mirrored flows the tee accepted.
    pub flows: u64,
    /// Of those, open now.
    pub open: u64,
    /// Shadow connections cut off because the shadow fell more than the
    /// queue (1 MiB) behind its client, or was still busy 5 s after it.
    pub fell_behind: u64,
    /// Flows with no shadow backend to copy to.
    pub no_shadow: u64,
    /// The stable backends' side.
    pub stable: Side,
    /// The shadow backends' side.
    pub shadow: Side,
}

/// The tee's counters, shared with the controller (which reads them into
/// its reports and adds the per-backend ones to the kernel's signals).
#[derive(Debug, Default)]
pub struct TeeStats {
    services: Mutex<BTreeMap<String, TeeReport>>,
    /// Per backend (service, version, address): the tee's connections in
    /// the form of the signals. `attempts` only for shadow backends (the
    /// data plane counts a stable backend's flows itself).
    backends: Mutex<BTreeMap<(String, String, SocketAddrV4), Counters>>,
}

impl TeeStats {
    /// A service's report (`None`: no tee ever ran for it).
    pub fn report(&self, service: &str) -> Option<TeeReport> {
        self.services.lock().ok()?.get(service).cloned()
    }

    /// What the tee counted for one backend.
    pub fn backend(&self, service: &str, version: &str, addr: SocketAddrV4) -> Counters {
        self.backends
            .lock()
            .ok()
            .and_then(|g| {
                g.get(&(service.to_string(), version.to_string(), addr))
                    .copied()
            })
            .unwrap_or_default()
    }

    fn service(&self, service: &str, f: impl FnOnce(&mut TeeReport)) {
        if let Ok(mut g) = self.services.lock() {
            // Called per read of every mirrored flow: no key allocation
            // once the service has its entry.
            match g.get_mut(service) {
                Some(r) => f(r),
                None => f(g.entry(service.to_string()).or_default()),
            }
        }
    }

    fn side(&self, service: &str, shadow: bool, f: impl FnOnce(&mut Side)) {
        self.service(service, |r| {
            f(if shadow { &mut r.shadow } else { &mut r.stable })
        });
    }

    /// `n` response bytes on one side; the `first` read of a connection
    /// also counts it answered, with its time to first byte since the
    /// tee's first read of the request (`first_read`).
    fn response(
        &self,
        service: &str,
        shadow: bool,
        n: usize,
        first: bool,
        first_read: &OnceLock<Instant>,
    ) {
        let ttfb = first.then(|| {
            first_read
                .get()
                .map_or(0, |t| t.elapsed().as_micros() as u64)
        });
        self.side(service, shadow, |s| {
            s.response_bytes += n as u64;
            if let Some(us) = ttfb {
                s.answered += 1;
                s.ttfb_sum_us += us;
            }
        });
    }

    fn signals(&self, key: &(String, String, SocketAddrV4), f: impl FnOnce(&mut Counters)) {
        if let Ok(mut g) = self.backends.lock() {
            f(g.entry(key.clone()).or_default());
        }
    }
}

/// The maps the tee uses, through descriptors of its own.
pub struct TeeMaps {
    conns: HashMap<MapData, FlowKey, Conn>,
    alive: Array<MapData, u64>,
}

impl TeeMaps {
    /// Opens the connection table and `TEE_ALIVE` from descriptors (see
    /// [`crate::dataplane::Dataplane::tee_fds`]).
    ///
    /// # Errors
    /// A descriptor is not such a map.
    pub fn open(conns: OwnedFd, alive: OwnedFd) -> std::io::Result<Self> {
        let open = |fd| MapData::from_fd(fd).map_err(std::io::Error::other);
        Ok(Self {
            conns: HashMap::try_from(aya::maps::Map::LruHashMap(open(conns)?))
                .map_err(std::io::Error::other)?,
            alive: Array::try_from(aya::maps::Map::Array(open(alive)?))
                .map_err(std::io::Error::other)?,
        })
    }
}

impl TeeMaps {
    /// Says the tee of service `id` listens until `until_ns`
    /// (`CLOCK_MONOTONIC` ns; 0: it does not).
    ///
    /// # Errors
    /// The map update failed.
    pub fn set_alive(&mut self, id: u32, until_ns: u64) -> std::io::Result<()> {
        self.alive
            .set(id, until_ns, 0)
            .map_err(std::io::Error::other)
    }
}

/// A stable pick among `n` by the client's address and port.
fn spread(client: SocketAddrV4, n: usize) -> usize {
    let h = splitter_common::mix32(u32::from(*client.ip()) ^ (u32::from(client.port()) << 16));
    (h as usize) % n.max(1)
}

/// A weighted pick from `fallback` by the client's address and port.
fn pick_fallback(plan: &Plan, client: SocketAddrV4) -> Option<(String, SocketAddrV4)> {
    let total: u64 = plan.fallback.iter().map(|(_, _, w)| w).sum();
    if total == 0 {
        return None;
    }
    let mut at = spread(client, usize::MAX) as u64 % total;
    for (v, a, w) in &plan.fallback {
        if at < *w {
            return Some((v.clone(), *a));
        }
        at -= w;
    }
    None
}

/// Shared by a tee's tasks.
struct Shared {
    maps: Mutex<TeeMaps>,
    stats: Arc<TeeStats>,
    /// Bytes in every flow's shadow queue now (see [`QUEUE_TOTAL`]).
    queued: Arc<AtomicUsize>,
}

/// A read of a client's bytes on its way to a shadow; it leaves the
/// global count of queued bytes when it is dropped (written, or thrown
/// away with its queue).
struct Queued {
    bytes: Bytes,
    queued: Arc<AtomicUsize>,
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.bytes.len(), Ordering::Relaxed);
    }
}

impl Shared {
    /// The stable backend the data plane chose for the flow (its entry),
    /// or a weighted pick of the plan's when the entry is gone.
    fn stable_of(&self, plan: &Plan, client: SocketAddrV4) -> Option<(String, SocketAddrV4)> {
        let key = crate::dataplane::flow_key(client, plan.vip, PROTO_TCP);
        let entry = self
            .maps
            .lock()
            .ok()
            .and_then(|m| m.conns.get(&key, 0).ok())
            .filter(|c| c.flags & CONN_F_LOCAL != 0);
        if let Some(c) = entry {
            let addr = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(c.new_addr[0])),
                u16::from_be(c.new_port),
            );
            if let Some((v, _)) = plan.backends.iter().find(|(_, a)| *a == addr) {
                return Some((v.clone(), addr));
            }
        }
        pick_fallback(plan, client)
    }

    /// Marks the flow's entry closed (both FINs), so that it no longer
    /// counts as a live flow of its backend; the program reuses the tuple.
    fn close_entry(&self, plan: &Plan, client: SocketAddrV4) {
        let key = crate::dataplane::flow_key(client, plan.vip, PROTO_TCP);
        if let Ok(mut m) = self.maps.lock()
            && let Ok(mut c) = m.conns.get(&key, 0)
            && c.flags & CONN_F_LOCAL != 0
        {
            c.state |= TCP_FIN_CLIENT | TCP_FIN_BACKEND;
            c.last_seen = crate::dataplane::monotonic_ns();
            let _ = m.conns.insert(key, c, 0);
        }
    }
}

/// A running tee.
struct Running {
    id: u32,
    plan: watch::Sender<Plan>,
    task: JoinHandle<()>,
    /// The AnyIP route is the tee's (it removes it when it stops).
    route: bool,
}

/// The tees of every mirrored TCP service of a daemon.
pub struct Tee {
    shared: Arc<Shared>,
    running: Mutex<BTreeMap<String, Running>>,
}

impl Tee {
    /// A tee over `maps`, counting into `stats`. Removes AnyIP routes an
    /// earlier daemon left (they are made again for the services that
    /// still mirror).
    pub fn new(maps: TeeMaps, stats: Arc<TeeStats>) -> Self {
        route_flush();
        Self {
            shared: Arc::new(Shared {
                maps: Mutex::new(maps),
                stats,
                queued: Arc::new(AtomicUsize::new(0)),
            }),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Starts, updates and stops tees so that exactly `wanted` (plan,
    /// service id) run, then pushes the heartbeat of each running one.
    /// A tee that cannot start is reported in its service's
    /// [`TeeReport::error`] and tried again on the next call.
    pub fn sync(&self, wanted: Vec<(Plan, u32)>) {
        let Ok(mut running) = self.running.lock() else {
            return;
        };
        let names: Vec<String> = running.keys().cloned().collect();
        for name in names {
            let keep = wanted.iter().any(|(p, id)| {
                p.service == name
                    && running[&name].id == *id
                    && running[&name].plan.borrow().vip == p.vip
            });
            if !keep && let Some(r) = running.remove(&name) {
                self.stop(&name, r);
            }
        }
        for (plan, id) in wanted {
            if let Some(r) = running.get(&plan.service) {
                if *r.plan.borrow() != plan {
                    let _ = r.plan.send(plan);
                }
                continue;
            }
            let name = plan.service.clone();
            match self.start(plan, id) {
                Ok(r) => {
                    running.insert(name.clone(), r);
                    self.shared.stats.service(&name, |t| {
                        t.listening = true;
                        t.error = None;
                    });
                }
                Err(e) => {
                    // Tried again on every beat: logged when the reason changes.
                    let before = self.shared.stats.report(&name).and_then(|t| t.error);
                    if before.as_deref() != Some(e.as_str()) {
                        warn!(service = %name, error = %e, "TCP shadow tee cannot start; flows stay on the fast path");
                    }
                    self.shared.stats.service(&name, |t| {
                        t.listening = false;
                        t.error = Some(e);
                    });
                }
            }
        }
        let until = crate::dataplane::monotonic_ns() + ALIVE_AHEAD.as_nanos() as u64;
        if let Ok(mut m) = self.shared.maps.lock() {
            for r in running.values() {
                if let Err(e) = m.set_alive(r.id, until) {
                    warn!(error = %e, "TEE_ALIVE could not be written");
                }
            }
        }
    }

    /// Stops every tee (the daemon is leaving): the data plane keeps new
    /// flows on the fast path from now on.
    pub fn shutdown(&self) {
        if let Ok(mut running) = self.running.lock() {
            for (name, r) in std::mem::take(&mut *running) {
                self.stop(&name, r);
            }
        }
    }

    fn start(&self, plan: Plan, id: u32) -> Result<Running, String> {
        let route = route_add(*plan.vip.ip())?;
        let listener = match listen(plan.vip) {
            Ok(l) => l,
            Err(e) => {
                if route {
                    route_del(*plan.vip.ip());
                }
                return Err(format!("cannot listen on {}: {e}", plan.vip));
            }
        };
        info!(service = %plan.service, vip = %plan.vip, "TCP shadow tee listening");
        let (tx, rx) = watch::channel(plan);
        let shared = self.shared.clone();
        let task = tokio::spawn(accept_loop(listener, rx, shared));
        Ok(Running {
            id,
            plan: tx,
            task,
            route,
        })
    }

    fn stop(&self, name: &str, r: Running) {
        if let Ok(mut m) = self.shared.maps.lock() {
            let _ = m.set_alive(r.id, 0);
        }
        r.task.abort();
        if r.route {
            route_del(*r.plan.borrow().vip.ip());
        }
        self.shared.stats.service(name, |t| t.listening = false);
        info!(service = %name, "TCP shadow tee stopped");
    }
}

/// A listener on the VIP (the AnyIP route makes it local).
fn listen(vip: SocketAddrV4) -> std::io::Result<TcpListener> {
    let s = TcpSocket::new_v4()?;
    s.set_reuseaddr(true)?;
    s.bind(vip.into())?;
    s.listen(1024)
}

/// Runs `ip` with `args`; its error output on failure.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes `vip` local with an AnyIP route unless it already is (an address
/// of this host, or a route the tee made before). True if the route is the
/// tee's to remove.
fn route_add(vip: Ipv4Addr) -> Result<bool, String> {
    let prefix = format!("{vip}/32");
    let shown = ip(&["-4", "route", "show", "table", "local", "exact", &prefix])?;
    if !shown.trim().is_empty() {
        return Ok(shown.contains(&format!("proto {ROUTE_PROTO}")));
    }
    ip(&[
        "-4",
        "route",
        "add",
        "local",
        &prefix,
        "dev",
        "lo",
        "table",
        "local",
        "proto",
        ROUTE_PROTO,
    ])?;
    Ok(true)
}

fn route_del(vip: Ipv4Addr) {
    let prefix = format!("{vip}/32");
    if let Err(e) = ip(&[
        "-4",
        "route",
        "del",
        "local",
        &prefix,
        "dev",
        "lo",
        "table",
        "local",
        "proto",
        ROUTE_PROTO,
    ]) {
        warn!(error = %e, "the tee's route could not be removed");
    }
}

/// Removes every AnyIP route of the tee's protocol.
fn route_flush() {
    if let Err(e) = ip(&[
        "-4",
        "route",
        "flush",
        "table",
        "local",
        "proto",
        ROUTE_PROTO,
    ]) {
        debug!(error = %e, "no tee routes flushed");
    }
}

async fn accept_loop(listener: TcpListener, plan: watch::Receiver<Plan>, shared: Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait a little.
                warn!(error = %e, "the tee could not accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let std::net::SocketAddr::V4(peer) = peer else {
            continue;
        };
        let plan = plan.borrow().clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            serve(stream, peer, &plan, &shared).await;
            shared.close_entry(&plan, peer);
            shared
                .stats
                .service(&plan.service, |t| t.open = t.open.saturating_sub(1));
        });
    }
}

/// Which end broke a connection.
enum Broken {
    Client,
    Stable,
}

/// Ends `s` with a reset instead of a FIN.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// Connects to `addr` within `timeout` from a port above the SNAT range
/// (the data plane's SNAT ports must never meet the tee's). Counts the
/// outcome on the stable or the `shadow` side and in the backend's signals.
async fn connect(
    addr: SocketAddrV4,
    timeout: Duration,
    shared: &Shared,
    service: &str,
    key: &(String, String, SocketAddrV4),
    shadow: bool,
) -> Option<TcpStream> {
    let t0 = Instant::now();
    shared.stats.side(service, shadow, |s| s.connects += 1);
    if shadow {
        shared.stats.signals(key, |c| c.attempts += 1);
    }
    let attempt = async {
        let s = TcpSocket::new_v4()?;
        above_snat_ports(&s);
        s.connect(addr.into()).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(s)) => {
            let us = t0.elapsed().as_micros() as u64;
            let _ = s.set_nodelay(true);
            shared.stats.side(service, shadow, |s| s.connected += 1);
            shared.stats.signals(key, |c| {
                c.established += 1;
                c.latency_sum_us += us;
                if let Some(b) = c.latency.get_mut(latency_bucket(us)) {
                    *b += 1;
                }
            });
            Some(s)
        }
        Ok(Err(e)) => {
            debug!(backend = %addr, error = %e, "tee connect failed");
            shared.stats.side(service, shadow, |s| s.refused += 1);
            shared.stats.signals(key, |c| c.refused += 1);
            None
        }
        Err(_) => {
            shared.stats.side(service, shadow, |s| s.timeouts += 1);
            shared.stats.signals(key, |c| c.timeouts += 1);
            None
        }
    }
}

/// Asks the kernel for a local port above the SNAT range
/// (`IP_LOCAL_PORT_RANGE`, Linux 6.3+; older kernels use the system range,
/// 32768-60999 by default, which is above it too).
fn above_snat_ports(s: &TcpSocket) {
    use std::os::fd::AsRawFd;
    const IP_LOCAL_PORT_RANGE: libc::c_int = 51;
    let range: u32 = (u32::from(u16::MAX) << 16) | (u32::from(splitter_common::SNAT_PORT_MAX) + 1);
    // SAFETY: a valid socket and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_LOCAL_PORT_RANGE,
            (&raw const range).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        );
    }
}

/// One mirrored flow, from accept to the end of the client's connection.
async fn serve(mut client: TcpStream, peer: SocketAddrV4, plan: &Plan, shared: &Arc<Shared>) {
    let stats = &shared.stats;
    stats.service(&plan.service, |t| {
        t.flows += 1;
        t.open += 1;
    });
    let _ = client.set_nodelay(true);
    let Some((stable_version, stable_addr)) = shared.stable_of(plan, peer) else {
        reset(&client);
        return;
    };
    // The reference of both sides' time to first byte: the tee's first
    // read of the request.
    let first_read: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let (done_tx, done_rx) = watch::channel(false);
    let mut to_shadow = None;
    if plan.shadow.is_empty() {
        stats.service(&plan.service, |t| t.no_shadow += 1);
    } else {
        let addr = plan.shadow[spread(peer, plan.shadow.len())];
        let (tx, rx) = mpsc::channel::<Queued>(QUEUE_CHUNKS);
        to_shadow = Some(tx);
        tokio::spawn(shadow_side(
            addr,
            rx,
            first_read.clone(),
            done_rx,
            plan.clone(),
            shared.clone(),
        ));
    }
    let skey = (plan.service.clone(), stable_version, stable_addr);
    let Some(mut stable) = connect(
        stable_addr,
        plan.connect_timeout,
        shared,
        &plan.service,
        &skey,
        false,
    )
    .await
    else {
        reset(&client);
        let _ = done_tx.send(true);
        return;
    };
    let outcome = {
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = stable.split();
        let service = plan.service.as_str();
        let up = async {
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) => {
                        let _ = sw.shutdown().await;
                        to_shadow = None;
                        return Ok(());
                    }
                    Ok(n) => n,
                    Err(_) => return Err(Broken::Client),
                };
                first_read.get_or_init(Instant::now);
                if sw.write_all(&buf[..n]).await.is_err() {
                    return Err(Broken::Stable);
                }
                stats.side(service, false, |s| s.request_bytes += n as u64);
                if let Some(tx) = &to_shadow {
                    // Full (the shadow fell behind, or all shadows hold
                    // too much) or gone: never wait.
                    let room = shared.queued.load(Ordering::Relaxed) + n <= QUEUE_TOTAL;
                    let sent = room && {
                        shared.queued.fetch_add(n, Ordering::Relaxed);
                        let q = Queued {
                            bytes: Bytes::copy_from_slice(&buf[..n]),
                            queued: shared.queued.clone(),
                        };
                        tx.try_send(q).is_ok()
                    };
                    if !sent {
                        if !tx.is_closed() {
                            stats.service(service, |t| t.fell_behind += 1);
                        }
                        to_shadow = None;
                    }
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; CHUNK];
            let mut answered = false;
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) => {
                        let _ = cw.shutdown().await;
                        return Ok(());
                    }
                    Ok(n) => n,
                    Err(_) => return Err(Broken::Stable),
                };
                stats.response(service, false, n, !answered, &first_read);
                answered = true;
                if cw.write_all(&buf[..n]).await.is_err() {
                    return Err(Broken::Client);
                }
            }
        };
        tokio::try_join!(up, down)
    };
    let _ = done_tx.send(true);
    match outcome {
        Ok(_) => {}
        Err(Broken::Stable) => {
            stats.side(&plan.service, false, |s| s.resets += 1);
            stats.signals(&skey, |c| c.reset_by_backend += 1);
            reset(&client);
        }
        Err(Broken::Client) => {
            stats.signals(&skey, |c| c.reset_by_client += 1);
            reset(&stable);
        }
    }
}

/// The shadow's connection of one flow: the client's bytes from `rx` in,
/// its answers read, counted and dropped. Ends when both directions end,
/// or [`SHADOW_LINGER`] after the client's connection ended.
async fn shadow_side(
    addr: SocketAddrV4,
    mut rx: mpsc::Receiver<Queued>,
    first_read: Arc<OnceLock<Instant>>,
    mut client_done: watch::Receiver<bool>,
    plan: Plan,
    shared: Arc<Shared>,
) {
    let stats = &shared.stats;
    let service = plan.service.as_str();
    let key = (plan.service.clone(), plan.shadow_version.clone(), addr);
    let work = async {
        let Some(mut s) = connect(addr, plan.connect_timeout, &shared, service, &key, true).await
        else {
            return;
        };
        let (mut r, mut w) = s.split();
        let writer = async {
            while let Some(q) = rx.recv().await {
                if w.write_all(&q.bytes).await.is_err() {
                    return Err(());
                }
                stats.side(service, true, |s| s.request_bytes += q.bytes.len() as u64);
            }
            let _ = w.shutdown().await;
            Ok(())
        };
        let reader = async {
            let mut buf = vec![0u8; CHUNK];
            let mut answered = false;
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        stats.response(service, true, n, !answered, &first_read);
                        answered = true;
                    }
                    Err(_) => return Err(()),
                }
            }
        };
        if tokio::try_join!(writer, reader).is_err() {
            stats.side(service, true, |s| s.resets += 1);
            stats.signals(&key, |c| c.reset_by_backend += 1);
        }
    };
    let deadline = async {
        while !*client_done.borrow() {
            if client_done.changed().await.is_err() {
                break;
            }
        }
        tokio::time::sleep(SHADOW_LINGER).await;
    };
    tokio::select! {
        () = work => {}
        () = deadline => {
            stats.service(service, |t| t.fell_behind += 1);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10:80"
read_only = true

[[service.version]]
name = "blue"
weight = 3
backends = ["10.0.2.2:80", { address = "10.0.2.3:80", weight = 3 }, { address = "10.0.2.4:80", state = "drain" }]

[[service.version]]
name = "green"
weight = 1
backends = ["10.0.2.5:80"]

[[service.version]]
name = "shadow"
weight = 0
backends = ["10.0.2.6:80", { address = "10.0.2.7:80", state = "disabled" }]

[service.shadow]
version = "shadow"
percent = 10

[[service]]
name = "dns"
vip = "10.0.0.10:53"
protocol = "udp"

[[service.version]]
name = "a"
weight = 1
backends = ["10.0.3.2:53"]

[[service.version]]
name = "s"
weight = 0
backends = ["10.0.3.3:53"]

[service.shadow]
version = "s"
percent = 50
"#;

    #[test]
    fn plans_cover_mirrored_tcp_services_only() {
        let c = Config::parse(TEXT).unwrap();
        let p = plans(&c);
        assert_eq!(p.len(), 1, "{p:?}");
        let p = &p[0];
        assert_eq!(p.service, "web");
        assert_eq!(p.vip, "10.0.0.10:80".parse().unwrap());
        assert_eq!(p.shadow, vec!["10.0.2.6:80".parse().unwrap()]);
        assert_eq!(p.backends.len(), 6);
        let w: Vec<u64> = p.fallback.iter().map(|(_, _, w)| *w).collect();
        assert_eq!(w, vec![3, 9, 1], "active backends of versions with weight");
        assert_eq!(p.connect_timeout, Duration::from_millis(1000));
    }

    #[test]
    fn the_fallback_follows_the_weights() {
        let c = Config::parse(TEXT).unwrap();
        let p = &plans(&c)[0];
        let mut seen: BTreeMap<SocketAddrV4, u32> = BTreeMap::new();
        for i in 0..13_000u32 {
            let client =
                SocketAddrV4::new(Ipv4Addr::from(0x0a00_0100 + i % 250), 20_000 + i as u16);
            let (_, a) = pick_fallback(p, client).unwrap();
            *seen.entry(a).or_default() += 1;
        }
        let share = |a: &str| f64::from(seen[&a.parse().unwrap()]) / 13_000.0;
        assert!((share("10.0.2.2:80") - 3.0 / 13.0).abs() < 0.03, "{seen:?}");
        assert!((share("10.0.2.3:80") - 9.0 / 13.0).abs() < 0.03, "{seen:?}");
        assert!((share("10.0.2.5:80") - 1.0 / 13.0).abs() < 0.03, "{seen:?}");
    }

    #[test]
    fn a_shadow_with_percent_zero_or_no_version_plans_nothing() {
        let mut c = Config::parse(TEXT).unwrap();
        c.services[0].shadow.as_mut().unwrap().percent = 0;
        assert!(plans(&c).is_empty());
        let mut c = Config::parse(TEXT).unwrap();
        c.services[0].shadow = None;
        assert!(plans(&c).is_empty());
    }

    #[test]
    fn side_errors_and_mean() {
        let s = Side {
            refused: 1,
            timeouts: 2,
            resets: 3,
            answered: 4,
            ttfb_sum_us: 4000,
            ..Side::default()
        };
        assert_eq!(s.errors(), 6);
        assert_eq!(s.ttfb_mean_us(), Some(1000));
        assert_eq!(Side::default().ttfb_mean_us(), None);
    }
}
