//! The kernel side, seen from user space: loads the XDP program, attaches
//! it, and publishes a [`Config`] into its maps.
//!
//! Publishing is a reconciliation, not a rewrite: ids (service, version,
//! backend) stay stable across applies, a version's Maglev table is written
//! into its idle generation slot and only then made live by replacing the
//! service entry (one atomic hash-map update), and nothing a running flow
//! depends on is touched (flows carry their backend's address in the
//! connection table).
//!
//! The address filter (`ADDR_FILTER`) only ever gains bits while the maps
//! live: every VIP, SNAT address and DNAT-mode backend ever published stays
//! in it, so established flows of a withdrawn service or of an earlier
//! mode still reach the connection table. Extra bits only cost a lookup.
//!
//! ```no_run
//! # fn main() -> Result<(), splitter::dataplane::DataplaneError> {
//! use splitter::{config::Config, dataplane::Dataplane};
//! let config = Config::load(std::path::Path::new("/etc/splitter/splitter.toml")).unwrap();
//! let mut dp = Dataplane::load_pinned(&config.dataplane.pin_dir)?;
//! dp.apply(&config)?;
//! dp.attach(&config.dataplane, &Default::default())?;
//! # Ok(()) }
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::SchedClassifierLink,
        xdp::XdpLink,
    },
};
use splitter_common::{
    ADDR_FILTER_DST, ADDR_FILTER_SRC, ADDR_FILTER_WORDS, BACKEND_F_DISABLED, BACKEND_F_PRESENT,
    Backend, BackendSignals, BackendStats, CONN_CAPACITY, CONN_F_REVERSE, Conn, FAMILY_V4, FlowKey,
    MAX_BACKENDS, MAX_CONN_CAPACITY, MAX_TABLES, MAX_VERSIONS, MaglevTable, PROTO_TCP, PROTO_UDP,
    SVC_F_CLIENT_IP, SVC_F_SHADOW, SVC_F_SNAT, SVC_F_TARGETS, Service, ServiceKey, Shadow,
    TargetKey, VipKey, addr_filter_bit, counter, map, service_drop, target_prefix_len,
};
use tracing::{info, warn};

use crate::{
    config::{
        Affinity, BackendState, Config, DataplaneConfig, Mode, Protocol, ServiceConfig,
        XdpModeConfig,
    },
    netif, pins,
    signals::Counters,
    state::{Layout, LayoutBackend, LayoutService},
    table::{self, MaglevBackend},
    target::Cidr,
};

/// Timeouts counted by the sweep per backend id (see
/// [`Dataplane::swept_timeouts`]).
pub type SweptTimeouts = std::sync::Arc<std::sync::Mutex<BTreeMap<u32, u64>>>;

/// The compiled kernel program, built by `build.rs`.
static PROGRAM: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splitter"));

/// Name of the XDP program inside the object.
pub const PROGRAM_NAME: &str = "splitter";
/// Name of the tc (clsact ingress) program inside the object: the copying
/// half of UDP mirroring (see `splitter-ebpf/src/shadow.rs`).
pub const TC_PROGRAM_NAME: &str = "splitter_shadow";

/// Errors of loading, attaching and publishing.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The binary was built with `AYA_BUILD_SKIP=1`.
    #[error(
        "this binary was built without its kernel program (AYA_BUILD_SKIP); rebuild with `cargo xtask build`"
    )]
    NoProgram,
    /// The kernel refused the object (verifier, missing BPF support, no privileges).
    #[error("loading the XDP program failed (are you root, on a kernel with BPF and XDP?): {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A map or program the object should hold is missing or has another type.
    #[error("the kernel object has no usable {what} `{name}`: {detail}")]
    Object {
        what: &'static str,
        name: &'static str,
        detail: String,
    },
    /// `bpf(BPF_PROG_LOAD)` or attaching failed.
    #[error("{op} on interface {iface} failed: {source}")]
    Program {
        op: &'static str,
        iface: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map update failed.
    #[error("updating map {map} failed: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// An interface named in the config does not exist or has no address.
    #[error(transparent)]
    Interface(#[from] netif::NetifError),
    /// The tables could not be built.
    #[error("service {service}: {source}")]
    Table {
        service: String,
        #[source]
        source: table::TableError,
    },
    /// Out of ids, or a kernel without what persistence needs.
    #[error("{0}")]
    Capacity(String),
    /// The pin directory is unusable or holds maps of another layout, or
    /// the kernel program's maps are of another layout.
    #[error(transparent)]
    Pins(#[from] pins::PinError),
    /// `splitter daemon --program PATH`: the file cannot be read.
    #[error("reading the kernel program {path}: {source}")]
    ProgramFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the kernel program comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ProgramSource {
    /// The object built into this binary (the normal case).
    #[default]
    Embedded,
    /// An object file (`splitter daemon --program PATH`): upgrading the
    /// kernel program alone, or trying a build. It goes through the same
    /// layout checks and link take-over as the embedded one.
    File(PathBuf),
}

impl std::fmt::Display for ProgramSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedded => f.write_str("embedded"),
            Self::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The loaded kernel program as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedProgram {
    /// Kernel program id (new at every load).
    pub id: u32,
    /// Kernel program tag (a hash of its instructions, 16 hex digits): the
    /// same for the same build, different for another build.
    pub tag: String,
    /// `embedded` or the object file's path.
    pub source: String,
}

type Result<T> = std::result::Result<T, DataplaneError>;

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> DataplaneError {
    move |e| DataplaneError::Map {
        map,
        source: Box::new(e),
    }
}

/// How the program ended up attached.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Attachment {
    /// Interface name.
    pub interface: String,
    /// "native" or "generic".
    pub mode: &'static str,
}

/// What is live for one version.
#[derive(Debug, Clone)]
struct LiveVersion {
    /// Global version id; its table slots are `2 * id` and `2 * id + 1`.
    id: u32,
    /// Generation (0 or 1) whose slot is live.
    generation: u32,
    /// The live table, to skip rewriting an unchanged one (`None` after a
    /// restart: then the next publish rewrites the idle generation).
    table: Option<Box<MaglevTable>>,
    /// The (key, weight, id) list the live table was built from: when it
    /// is unchanged (a weight-only change), the table is not rebuilt.
    members: Vec<(String, u32, u16)>,
}

/// What is live for one service.
#[derive(Debug, Clone)]
struct LiveService {
    id: u32,
    key: ServiceKey,
    versions: BTreeMap<String, LiveVersion>,
}

/// Small id allocator. Ids are handed out round-robin (the first free id
/// after the last one taken), so a freed id is reused as late as possible:
/// flows still bound to a removed backend (or counted for a removed
/// service) do not land on the counters, the state or the live-flow count
/// of whatever is added next.
#[derive(Debug)]
struct Ids {
    free: BTreeSet<u32>,
    next: u32,
}

impl Ids {
    fn new(capacity: u32) -> Self {
        Self {
            free: (0..capacity).collect(),
            next: 0,
        }
    }
    fn take(&mut self, what: &str) -> Result<u32> {
        let id = self
            .free
            .range(self.next..)
            .next()
            .or_else(|| self.free.first())
            .copied()
            .ok_or_else(|| {
                DataplaneError::Capacity(format!("capacity exceeded: no free {what} id"))
            })?;
        self.free.remove(&id);
        self.next = id.wrapping_add(1);
        Ok(id)
    }
    fn give(&mut self, id: u32) {
        self.free.insert(id);
    }
    /// Marks `id` as in use (restored from the state file).
    fn claim(&mut self, id: u32) {
        self.free.remove(&id);
        self.next = self.next.max(id.wrapping_add(1));
    }
}

/// The loaded program, its maps and what has been published into them.
pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    vips: HashMap<MapData, VipKey, u32>,
    tables: Array<MapData, MaglevTable>,
    backends: Array<MapData, Backend>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    backend_signals: PerCpuArray<MapData, BackendSignals>,
    /// Timeouts the controller's sweep counted per backend id (flows that
    /// sent nothing after their deadline, so the program never saw it
    /// pass); shared with the task that sweeps. Cleared with the id's
    /// kernel counters.
    swept: SweptTimeouts,
    counters: PerCpuArray<MapData, u64>,
    conns: HashMap<MapData, FlowKey, Conn>,
    service_drops: PerCpuArray<MapData, u64>,
    addr_filter: Array<MapData, u64>,
    /// What each service mirrors, by service id (`SHADOWS`).
    shadows: Array<MapData, Shadow>,
    /// Until when each service's TCP tee listens (`TEE_ALIVE`), written by
    /// the tee through a descriptor of its own ([`Dataplane::tee_fds`]).
    tee_alive: Array<MapData, u64>,
    /// What `addr_filter` holds, so that a publish writes only new bits.
    filter_words: Vec<u64>,
    targets: LpmTrie<MapData, TargetKey, u32>,
    /// What `targets` holds: (service id, network) -> global version id.
    /// Read from the map on load (a restart takes over pinned rules).
    targets_written: BTreeMap<(u32, Cidr), u32>,
    live: BTreeMap<String, LiveService>,
    /// Backend ids by (service, version, address).
    backend_ids: BTreeMap<(String, String, SocketAddrV4), u32>,
    /// Entry last written to `BACKENDS` per id (a change of state or
    /// connect timeout rewrites it; an unchanged one is not written again).
    backend_written: BTreeMap<u32, Backend>,
    service_ids: Ids,
    version_ids: Ids,
    backend_id_pool: Ids,
    version_id_by_name: BTreeMap<(String, String), u32>,
    attachments: Vec<Attachment>,
    snat_address: Option<Ipv4Addr>,
    /// Where maps and links are pinned; `None` for an unpinned instance
    /// (packet tests, benchmarks) that vanishes with the process.
    pin_dir: Option<PathBuf>,
    /// The connection table came from a previous instance (restart, upgrade).
    reused: bool,
    /// Id, tag and origin of the loaded program.
    program: LoadedProgram,
}

impl Dataplane {
    /// Loads the kernel program and takes its maps. Nothing is attached yet.
    ///
    /// # Errors
    /// [`DataplaneError::Load`] when the kernel refuses the object (not
    /// root, no BPF, verifier), [`DataplaneError::NoProgram`] for a build
    /// without the kernel program.
    pub fn load() -> Result<Self> {
        Self::load_sized(CONN_CAPACITY)
    }

    /// [`Dataplane::load`] with a connection table of `conn_capacity`
    /// entries (two per flow) instead of [`CONN_CAPACITY`].
    ///
    /// # Errors
    /// As [`Dataplane::load`].
    pub fn load_sized(conn_capacity: u32) -> Result<Self> {
        let source = ProgramSource::Embedded;
        let bytes = program_bytes(&source)?;
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map::CONNS, conn_capacity);
        Self::load_with(loader, &bytes, &source, None, false, false)
    }

    /// Loads the kernel program with its maps pinned in `pin_dir` (a bpffs
    /// directory, mounted at `/sys/fs/bpf` if needed). Maps already pinned
    /// there, by an earlier daemon or build, are taken over after their
    /// layout is checked, so established flows survive restarts and upgrades.
    ///
    /// # Errors
    /// As [`Dataplane::load`], plus [`DataplaneError::Pins`] when `pin_dir`
    /// is unusable or holds maps of another layout.
    pub fn load_pinned(pin_dir: &Path) -> Result<Self> {
        Self::load_pinned_from(pin_dir, &ProgramSource::Embedded, CONN_CAPACITY)
    }

    /// [`Dataplane::load_pinned`] with the kernel program from `source` and
    /// a connection table of `conn_capacity` entries. The object's maps are
    /// checked against this build's layout before anything is loaded, then
    /// the pinned maps as usual (a pinned connection table must have
    /// `conn_capacity` entries); a refused object or table changes nothing
    /// (the pinned program keeps forwarding).
    ///
    /// # Errors
    /// As [`Dataplane::load_pinned`], plus [`DataplaneError::ProgramFile`]
    /// for an unreadable file and [`DataplaneError::Pins`] for an object
    /// whose maps are of another layout or a pinned connection table of
    /// another capacity.
    pub fn load_pinned_from(
        pin_dir: &Path,
        source: &ProgramSource,
        conn_capacity: u32,
    ) -> Result<Self> {
        let bytes = program_bytes(source)?;
        pins::ensure_bpffs(pin_dir)?;
        let reused = pins::check_layout(pin_dir, conn_capacity)?;
        // A connection table kept from a build without the address filter
        // holds flows the new filter knows nothing of: open it fully.
        let open_filter = reused && !pin_dir.join(map::ADDR_FILTER).exists();
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(map::CONNS, conn_capacity);
        for (name, ..) in pins::expected_maps() {
            loader.map_pin_path(name, pin_dir.join(name));
        }
        Self::load_with(
            loader,
            &bytes,
            source,
            Some(pin_dir.to_path_buf()),
            reused,
            open_filter,
        )
    }

    /// Id, tag and origin of the loaded kernel program.
    pub fn program(&self) -> &LoadedProgram {
        &self.program
    }

    /// Whether the maps were taken over from an earlier instance.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Entries of the connection table as the kernel holds it (two per
    /// flow); `None` if the kernel does not say.
    pub fn conn_capacity(&self) -> Option<u32> {
        use aya::maps::IterableMap as _;
        self.conns.map().info().ok().map(|i| i.max_entries())
    }

    fn load_with(
        mut loader: EbpfLoader<'_>,
        bytes: &[u8],
        source: &ProgramSource,
        pin_dir: Option<PathBuf>,
        reused: bool,
        open_filter: bool,
    ) -> Result<Self> {
        raise_memlock_limit();
        let mut ebpf = loader
            .load(bytes)
            .map_err(|e| DataplaneError::Load(Box::new(e)))?;
        let loaded = {
            let prog: &mut Xdp = program(&mut ebpf)?;
            prog.load().map_err(|e| DataplaneError::Program {
                op: "loading the XDP program (verifier)",
                iface: "-".into(),
                source: Box::new(e),
            })?;
            let info = prog.info().map_err(|e| DataplaneError::Program {
                op: "reading the loaded program's id and tag",
                iface: "-".into(),
                source: Box::new(e),
            })?;
            LoadedProgram {
                id: info.id(),
                tag: format!("{:016x}", info.tag()),
                source: source.to_string(),
            }
        };
        info!(id = loaded.id, tag = %loaded.tag, source = %loaded.source, "kernel program loaded");
        let services = take(&mut ebpf, map::SERVICES, HashMap::try_from)?;
        let vips = take(&mut ebpf, map::VIPS, HashMap::try_from)?;
        let tables = take(&mut ebpf, map::TABLES, Array::try_from)?;
        let backends = take(&mut ebpf, map::BACKENDS, Array::try_from)?;
        let backend_stats = take(&mut ebpf, map::BACKEND_STATS, PerCpuArray::try_from)?;
        let backend_signals = take(&mut ebpf, map::BACKEND_SIGNALS, PerCpuArray::try_from)?;
        let counters = take(&mut ebpf, map::COUNTERS, PerCpuArray::try_from)?;
        let conns = take(&mut ebpf, map::CONNS, HashMap::try_from)?;
        let service_drops = take(&mut ebpf, map::SERVICE_DROPS, PerCpuArray::try_from)?;
        let mut addr_filter = take(&mut ebpf, map::ADDR_FILTER, Array::try_from)?;
        let shadows = take(&mut ebpf, map::SHADOWS, Array::try_from)?;
        let tee_alive = take(&mut ebpf, map::TEE_ALIVE, Array::try_from)?;
        {
            tc_program(&mut ebpf)?
                .load()
                .map_err(|e| DataplaneError::Program {
                    op: "loading the tc shadow program (verifier)",
                    iface: "-".into(),
                    source: Box::new(e),
                })?;
        }
        if open_filter {
            warn!("connection table kept from a build without the address filter: filter opened");
            for i in 0..2 * ADDR_FILTER_WORDS {
                addr_filter
                    .set(i, u64::MAX, 0)
                    .map_err(map_err(map::ADDR_FILTER))?;
            }
        }
        let targets: LpmTrie<MapData, TargetKey, u32> =
            take(&mut ebpf, map::TARGETS, LpmTrie::try_from)?;
        let targets_written = targets
            .iter()
            .filter_map(|e| e.ok())
            .filter_map(|(k, v)| Some((decode_target_key(&k)?, v)))
            .collect();
        let filter_words = (0..2 * ADDR_FILTER_WORDS)
            .map(|i| addr_filter.get(&i, 0))
            .collect::<std::result::Result<Vec<u64>, _>>()
            .map_err(map_err(map::ADDR_FILTER))?;
        Ok(Self {
            ebpf,
            services,
            vips,
            tables,
            backends,
            backend_stats,
            backend_signals,
            swept: SweptTimeouts::default(),
            counters,
            conns,
            service_drops,
            addr_filter,
            shadows,
            tee_alive,
            filter_words,
            targets,
            targets_written,
            live: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            backend_written: BTreeMap::new(),
            service_ids: Ids::new(splitter_common::MAX_SERVICES),
            version_ids: Ids::new(MAX_TABLES / 2),
            backend_id_pool: Ids::new(MAX_BACKENDS),
            version_id_by_name: BTreeMap::new(),
            attachments: Vec::new(),
            snat_address: None,
            pin_dir,
            reused,
            program: loaded,
        })
    }

    /// The program's file descriptor (for `BPF_PROG_TEST_RUN` in tests).
    ///
    /// # Errors
    /// Only if the program is missing from the object.
    pub fn program_fd(&mut self) -> Result<RawFd> {
        let prog = program(&mut self.ebpf)?;
        let fd = prog.fd().map_err(|e| DataplaneError::Program {
            op: "reading the program fd",
            iface: "-".into(),
            source: Box::new(e),
        })?;
        Ok(fd.as_fd().as_raw_fd())
    }

    /// Attaches to the client-facing interface and, if it differs, the
    /// backend-facing one. `auto` tries native mode and falls back to
    /// generic mode with a warning.
    ///
    /// With a pin directory, each attachment is a pinned XDP link: one left
    /// by an earlier instance is taken over and switched to this program in
    /// one atomic update (no packet sees no program), and a new one is
    /// pinned so it outlives this process. Links of interfaces no longer
    /// configured are removed. `modes` holds the modes earlier links were
    /// made in, for reporting.
    ///
    /// # Errors
    /// A missing interface, or the kernel refusing the attach or the update.
    pub fn attach(
        &mut self,
        cfg: &DataplaneConfig,
        modes: &BTreeMap<String, String>,
    ) -> Result<()> {
        let mut ifaces = vec![cfg.interface.clone()];
        if let Some(b) = &cfg.backend_interface
            && *b != cfg.interface
        {
            ifaces.push(b.clone());
        }
        for iface in &ifaces {
            netif::ifindex(iface)?;
        }
        if let Some(dir) = &self.pin_dir {
            for (iface, path) in pins::link_pins(dir) {
                if !ifaces.contains(&iface) {
                    info!(interface = %iface, "removing the XDP link of an interface no longer configured");
                    let _ = std::fs::remove_file(path);
                    let _ = std::fs::remove_file(pins::tc_link_pin(dir, &iface));
                }
            }
        }
        let pin_dir = self.pin_dir.clone();
        let prog = program(&mut self.ebpf)?;
        for iface in ifaces {
            let prog_err = |op: &'static str| {
                let iface = iface.clone();
                move |e: aya::programs::ProgramError| DataplaneError::Program {
                    op,
                    iface,
                    source: Box::new(e),
                }
            };
            if let Some(dir) = &pin_dir {
                let path = pins::link_pin(dir, &iface);
                if path.exists() {
                    match take_over_link(prog, &path) {
                        Ok(()) => {
                            let mode = match modes.get(&iface).map(String::as_str) {
                                Some("native") => "native",
                                Some("generic") => "generic",
                                _ => "pinned",
                            };
                            info!(interface = %iface, mode, "took over the pinned XDP link: program replaced atomically");
                            self.attachments.push(Attachment {
                                interface: iface,
                                mode,
                            });
                            continue;
                        }
                        Err(e) => {
                            warn!(interface = %iface, error = %e, "pinned XDP link unusable (interface recreated?); attaching anew");
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
            }
            let attempt = |prog: &mut Xdp, mode: XdpMode| prog.attach(&iface, mode);
            let (id, mode) = match cfg.xdp_mode {
                XdpModeConfig::Native => attempt(prog, XdpMode::Driver).map(|id| (id, "native")),
                XdpModeConfig::Generic => attempt(prog, XdpMode::Skb).map(|id| (id, "generic")),
                XdpModeConfig::Auto => match attempt(prog, XdpMode::Driver) {
                    Ok(id) => Ok((id, "native")),
                    Err(e) => {
                        warn!(interface = %iface, error = %e, "native XDP attach failed; falling back to generic mode (slower)");
                        attempt(prog, XdpMode::Skb).map(|id| (id, "generic"))
                    }
                },
            }
            .map_err(prog_err("attaching XDP"))?;
            if let Some(dir) = &pin_dir {
                let path = pins::link_pin(dir, &iface);
                let link = prog
                    .take_link(id)
                    .map_err(prog_err("taking the XDP link"))?;
                let fd_link = FdLink::try_from(link).map_err(|e| {
                    DataplaneError::Capacity(format!(
                        "interface {iface}: the kernel attached XDP without a bpf_link ({e}), which cannot be pinned"
                    ))
                })?;
                fd_link.pin(&path).map_err(|e| {
                    DataplaneError::Pins(pins::PinError::Io {
                        op: "pinning the XDP link at",
                        path: path.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })
                })?;
            }
            info!(interface = %iface, mode, "XDP program attached");
            self.attachments.push(Attachment {
                interface: iface,
                mode,
            });
        }
        for a in &self.attachments {
            attach_tc(&mut self.ebpf, &a.interface, self.pin_dir.as_deref())?;
        }
        Ok(())
    }

    /// The connection-table entry of a client's flow to a VIP, if any.
    ///
    /// # Errors
    /// Map read failures other than "not found".
    pub fn conn(&self, client: SocketAddrV4, vip: SocketAddrV4, proto: u8) -> Result<Option<Conn>> {
        match self.conns.get(&flow_key(client, vip, proto), 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(map::CONNS)(e)),
        }
    }

    /// Live flows per backend id: forward entries of the connection table
    /// whose flow is still going (see [`splitter_common::conn_live`]) at
    /// `now` (`CLOCK_MONOTONIC` ns). Reads the table in batches of 4096
    /// entries (`BPF_MAP_LOOKUP_BATCH`; about 0.6 s for a full table of a million
    /// entries on the bench machine),
    /// or one entry at a time on kernels without batch reads. Either walk
    /// is bounded, since the table changes while it is read.
    ///
    /// # Errors
    /// Map read failures.
    pub fn live_flows(&self, now: u64) -> Result<BTreeMap<u32, u64>> {
        let mut out = BTreeMap::new();
        let mut count = |key: &FlowKey, conn: &Conn| tally_live(&mut out, key, conn, now);
        use aya::maps::IterableMap as _;
        let fd = self.conns.map().fd().as_fd().as_raw_fd();
        match lookup_batch(fd, 2 * MAX_CONN_CAPACITY as usize, &mut count) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::debug!("no batch map reads on this kernel: walking CONNS entry by entry");
                for item in self.conns.iter().take(2 * MAX_CONN_CAPACITY as usize) {
                    match item {
                        Ok((key, conn)) => count(&key, &conn),
                        // An entry evicted between the key walk and its read.
                        Err(aya::maps::MapError::KeyNotFound) => continue,
                        Err(e) => return Err(map_err(map::CONNS)(e)),
                    }
                }
            }
            Err(e) => {
                return Err(DataplaneError::Map {
                    map: map::CONNS,
                    source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_lookup_batch",
                        io_error: e,
                    })),
                });
            }
        }
        Ok(out)
    }

    /// A descriptor of its own for the connection table, for
    /// [`count_live_flows`] outside whatever holds this `Dataplane`.
    ///
    /// # Errors
    /// `dup` failed.
    pub fn conns_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use aya::maps::IterableMap as _;
        self.conns.map().fd().as_fd().try_clone_to_owned()
    }

    /// Descriptors of their own for the connection table and `TEE_ALIVE`,
    /// for the TCP shadow tee ([`crate::tee`]), which runs outside whatever
    /// holds this `Dataplane`.
    ///
    /// # Errors
    /// `dup` failed.
    pub fn tee_fds(&self) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
        use aya::maps::IterableMap as _;
        Ok((
            self.conns_fd()?,
            self.tee_alive.map().fd().as_fd().try_clone_to_owned()?,
        ))
    }

    /// The id a configured service has in the tables.
    pub fn service_id(&self, service: &str) -> Option<u32> {
        self.live.get(service).map(|l| l.id)
    }

    /// The backend id table entries use for a configured backend.
    pub fn backend_id(&self, service: &str, version: &str, addr: SocketAddrV4) -> Option<u32> {
        self.backend_ids
            .get(&(service.to_string(), version.to_string(), addr))
            .copied()
    }

    /// What is live, for the state file.
    pub fn layout(&self) -> Layout {
        let mut l = Layout::default();
        for (name, svc) in &self.live {
            l.services.insert(
                name.clone(),
                LayoutService {
                    id: svc.id,
                    vip: SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(svc.key.addr[0])),
                        u16::from_be(svc.key.port),
                    ),
                    proto: svc.key.proto,
                    versions: svc
                        .versions
                        .iter()
                        .map(|(n, v)| (n.clone(), (v.id, v.generation)))
                        .collect(),
                },
            );
        }
        l.backends = self
            .backend_ids
            .iter()
            .map(|((s, v, a), id)| LayoutBackend {
                service: s.clone(),
                version: v.clone(),
                address: *a,
                id: *id,
            })
            .collect();
        l.attachments = self
            .attachments
            .iter()
            .map(|a| (a.interface.clone(), a.mode.to_string()))
            .collect();
        l
    }

    /// Takes over the ids and live generations an earlier instance left in
    /// reused maps (from its state file), so the next [`Dataplane::apply`]
    /// writes only idle table slots. Entries out of range are skipped.
    pub fn restore_layout(&mut self, layout: &Layout) {
        for (name, ls) in &layout.services {
            if ls.id >= splitter_common::MAX_SERVICES {
                warn!(service = %name, "state file: service id out of range; skipped");
                continue;
            }
            let key = ServiceKey {
                addr: [u32::from(*ls.vip.ip()).to_be(), 0, 0, 0],
                port: ls.vip.port().to_be(),
                proto: ls.proto,
                family: FAMILY_V4,
            };
            let mut versions = BTreeMap::new();
            for (vname, (vid, generation)) in &ls.versions {
                if *vid >= MAX_TABLES / 2 || *generation > 1 {
                    warn!(service = %name, version = %vname, "state file: version id out of range; skipped");
                    continue;
                }
                self.version_ids.claim(*vid);
                self.version_id_by_name
                    .insert((name.clone(), vname.clone()), *vid);
                versions.insert(
                    vname.clone(),
                    LiveVersion {
                        id: *vid,
                        generation: *generation,
                        table: None,
                        members: Vec::new(),
                    },
                );
            }
            self.service_ids.claim(ls.id);
            self.live.insert(
                name.clone(),
                LiveService {
                    id: ls.id,
                    key,
                    versions,
                },
            );
        }
        for b in &layout.backends {
            if b.id < MAX_BACKENDS {
                self.backend_id_pool.claim(b.id);
                self.backend_ids
                    .insert((b.service.clone(), b.version.clone(), b.address), b.id);
            }
        }
    }

    /// Withdraws every published service (new flows to VIPs stop being
    /// placed until the next [`Dataplane::apply`]; established ones go on).
    /// Used when maps are reused without a state file to say what is live.
    ///
    /// # Errors
    /// Map failures.
    pub fn reset_published(&mut self) -> Result<()> {
        let keys: Vec<ServiceKey> = self.services.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.services.remove(&k);
        }
        let vips: Vec<VipKey> = self.vips.keys().filter_map(|k| k.ok()).collect();
        for k in vips {
            let _ = self.vips.remove(&k);
        }
        // Their ids are handed out afresh: no rule may stay behind.
        let rules: Vec<(u32, Cidr)> = self.targets_written.keys().copied().collect();
        for k in rules {
            self.target_remove(k)?;
        }
        Ok(())
    }

    /// Interfaces the program is attached to.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The SNAT address in use (resolved from the backend interface unless configured).
    pub fn snat_address(&self) -> Option<Ipv4Addr> {
        self.snat_address
    }

    /// Publishes `config`: new and changed services are written, removed
    /// ones deleted. Established flows are unaffected.
    ///
    /// # Errors
    /// Map update failures, capacity limits, or an unresolvable SNAT address.
    /// On error, services already published stay as they were published.
    pub fn apply(&mut self, config: &Config) -> Result<()> {
        let snat = match config.dataplane.mode {
            Mode::Dnat => None,
            Mode::Snat => Some(match config.dataplane.snat_address {
                Some(a) => a,
                None => {
                    let iface = config
                        .dataplane
                        .backend_interface
                        .as_deref()
                        .unwrap_or(&config.dataplane.interface);
                    netif::first_ipv4(iface)?
                }
            }),
        };
        self.snat_address = snat;
        for svc in &config.services {
            self.publish_service(svc, snat)?;
        }
        let wanted: BTreeSet<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = self
            .live
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.remove_service(&name)?;
        }
        // Rules an earlier instance left for services no longer published.
        let live_ids: BTreeSet<u32> = self.live.values().map(|l| l.id).collect();
        let orphans: Vec<(u32, Cidr)> = self
            .targets_written
            .keys()
            .filter(|(id, _)| !live_ids.contains(id))
            .copied()
            .collect();
        for k in orphans {
            self.target_remove(k)?;
        }
        Ok(())
    }

    /// Removes one rule from `TARGETS` (a missing one is fine).
    fn target_remove(&mut self, (id, cidr): (u32, Cidr)) -> Result<()> {
        match self.targets.remove(&target_key(id, cidr)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map::TARGETS)(e)),
        }
        self.targets_written.remove(&(id, cidr));
        Ok(())
    }

    /// The rules in `TARGETS` now: (service id, network, global version
    /// id), for tests and `splitter status`.
    pub fn target_entries(&self) -> Vec<(u32, Cidr, u32)> {
        self.targets_written
            .iter()
            .map(|((id, c), v)| (*id, *c, *v))
            .collect()
    }

    fn publish_service(&mut self, svc: &ServiceConfig, snat: Option<Ipv4Addr>) -> Result<()> {
        let key = service_key(svc);
        // A service whose VIP changed is a new service at a new key.
        if let Some(live) = self.live.get(&svc.name)
            && live.key != key
        {
            self.remove_service(&svc.name)?;
        }
        let id = match self.live.get(&svc.name) {
            Some(l) => l.id,
            None => {
                let id = self.service_ids.take("service")?;
                // A recycled id starts its drop counters from zero.
                self.clear_service_drops(id)?;
                id
            }
        };
        let weights: Vec<u32> = svc.versions.iter().map(|v| v.weight).collect();
        let thresholds =
            table::version_thresholds(&weights).map_err(|source| DataplaneError::Table {
                service: svc.name.clone(),
                source,
            })?;
        let mut entry = Service {
            id,
            flags: 0,
            snat_addr: [0; 4],
            version_count: svc.versions.len() as u32,
            _pad: 0,
            thresholds,
            tables: [0; MAX_VERSIONS],
            versions: [0; MAX_VERSIONS],
        };
        if svc.affinity == Affinity::ClientIp {
            entry.flags |= SVC_F_CLIENT_IP;
        }
        if let Some(a) = snat {
            entry.flags |= SVC_F_SNAT;
            entry.snat_addr = [u32::from(a).to_be(), 0, 0, 0];
        }
        let old_versions = self
            .live
            .get(&svc.name)
            .map(|l| l.versions.clone())
            .unwrap_or_default();
        let mut versions = BTreeMap::new();
        let mut used_backends = BTreeSet::new();
        for (i, ver) in svc.versions.iter().enumerate() {
            let vid = match self
                .version_id_by_name
                .get(&(svc.name.clone(), ver.name.clone()))
            {
                Some(v) => *v,
                None => {
                    let v = self.version_ids.take("version")?;
                    self.version_id_by_name
                        .insert((svc.name.clone(), ver.name.clone()), v);
                    v
                }
            };
            let mut members = Vec::with_capacity(ver.backends.len());
            for b in &ver.backends {
                if snat.is_none() {
                    // DNAT: replies come from the backend's own address.
                    self.filter_add(ADDR_FILTER_SRC, *b.address.ip())?;
                }
                let bkey = (svc.name.clone(), ver.name.clone(), b.address);
                let entry = backend_entry(b.address, vid, b.state, svc.connect_timeout_ms);
                let bid = match self.backend_ids.get(&bkey) {
                    Some(id) => *id,
                    None => {
                        let bid = self.backend_id_pool.take("backend")?;
                        // A recycled id starts its counters from zero.
                        self.clear_stats(bid)?;
                        self.backend_ids.insert(bkey, bid);
                        bid
                    }
                };
                if self.backend_written.get(&bid) != Some(&entry) {
                    self.backends
                        .set(bid, entry, 0)
                        .map_err(map_err(map::BACKENDS))?;
                    self.backend_written.insert(bid, entry);
                }
                used_backends.insert(bid);
                // Only active backends take new flows; draining and
                // disabled ones keep their id (their flows go on being
                // counted) but leave the table.
                if b.state == BackendState::Active {
                    members.push((b.address.to_string(), b.weight, bid as u16));
                }
            }
            if let Some(old) = old_versions.get(&ver.name)
                && old.table.is_some()
                && old.members == members
            {
                entry.tables[i] = old.id * 2 + old.generation;
                entry.versions[i] = old.id;
                versions.insert(ver.name.clone(), old.clone());
                continue;
            }
            let mb: Vec<MaglevBackend> = members
                .iter()
                .map(|(k, w, id)| MaglevBackend {
                    key: k,
                    weight: *w,
                    id: *id,
                })
                .collect();
            let table = table::maglev_table(&mb).map_err(|source| DataplaneError::Table {
                service: svc.name.clone(),
                source,
            })?;
            let live_ver = match old_versions.get(&ver.name) {
                Some(old) if old.table.as_ref() == Some(&table) => LiveVersion {
                    members: members.clone(),
                    ..old.clone()
                },
                Some(old) => {
                    let generation = old.generation ^ 1;
                    self.tables
                        .set(vid * 2 + generation, table.as_ref(), 0)
                        .map_err(map_err(map::TABLES))?;
                    LiveVersion {
                        id: vid,
                        generation,
                        table: Some(table),
                        members: members.clone(),
                    }
                }
                None => {
                    self.tables
                        .set(vid * 2, table.as_ref(), 0)
                        .map_err(map_err(map::TABLES))?;
                    LiveVersion {
                        id: vid,
                        generation: 0,
                        table: Some(table),
                        members: members.clone(),
                    }
                }
            };
            entry.tables[i] = live_ver.id * 2 + live_ver.generation;
            entry.versions[i] = live_ver.id;
            versions.insert(ver.name.clone(), live_ver);
        }
        // Source-CIDR rules: written before the service entry that flags
        // them, removed after it (a rule the entry does not flag, or one
        // that names a version the entry lacks, is never used).
        let mut wanted_targets = BTreeMap::new();
        for t in &svc.targets {
            if let Some(v) = versions.get(&t.version) {
                wanted_targets.insert((id, t.cidr), v.id);
            }
        }
        for (k, vid) in &wanted_targets {
            if self.targets_written.get(k) != Some(vid) {
                self.targets
                    .insert(&target_key(k.0, k.1), *vid, 0)
                    .map_err(map_err(map::TARGETS))?;
                self.targets_written.insert(*k, *vid);
            }
        }
        if !wanted_targets.is_empty() {
            entry.flags |= SVC_F_TARGETS;
        }
        // The shadow entry before the service entry that flags it: a
        // mirrored service's first datagram finds where its copy goes.
        let shadow = match &svc.shadow {
            Some(sh) => match versions.get(&sh.version) {
                Some(v) => Shadow {
                    table: v.id * 2 + v.generation,
                    version: v.id,
                    percent: sh.percent.min(100),
                    _pad: 0,
                },
                None => Shadow::default(),
            },
            None => Shadow::default(),
        };
        if shadow.percent > 0 {
            entry.flags |= SVC_F_SHADOW;
        }
        self.shadows
            .set(id, shadow, 0)
            .map_err(map_err(map::SHADOWS))?;
        // Before the service goes live, so its first packets are not
        // filtered out: the VIP, and in SNAT mode the address replies come to.
        self.filter_add(ADDR_FILTER_DST, *svc.vip.ip())?;
        if let Some(a) = snat {
            self.filter_add(ADDR_FILTER_DST, a)?;
        }
        // Publish: one atomic replacement of the service entry.
        self.services
            .insert(key, entry, 0)
            .map_err(map_err(map::SERVICES))?;
        self.vips
            .insert(vip_key(&key), 1, 0)
            .map_err(map_err(map::VIPS))?;
        let stale_targets: Vec<(u32, Cidr)> = self
            .targets_written
            .keys()
            .filter(|k| k.0 == id && !wanted_targets.contains_key(*k))
            .copied()
            .collect();
        for k in stale_targets {
            self.target_remove(k)?;
        }
        // Versions and backends that left the service.
        for (name, old) in &old_versions {
            if !versions.contains_key(name) {
                self.version_id_by_name
                    .remove(&(svc.name.clone(), name.clone()));
                self.version_ids.give(old.id);
            }
        }
        let stale: Vec<_> = self
            .backend_ids
            .iter()
            .filter(|((s, _, _), id)| *s == svc.name && !used_backends.contains(id))
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        for (k, id) in stale {
            self.backend_ids.remove(&k);
            self.backend_written.remove(&id);
            self.backend_id_pool.give(id);
        }
        self.live
            .insert(svc.name.clone(), LiveService { id, key, versions });
        Ok(())
    }

    fn remove_service(&mut self, name: &str) -> Result<()> {
        let Some(live) = self.live.remove(name) else {
            return Ok(());
        };
        match self.services.remove(&live.key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map::SERVICES)(e)),
        }
        // Its rules go with it: the id is handed to the next new service.
        let rules: Vec<(u32, Cidr)> = self
            .targets_written
            .keys()
            .filter(|k| k.0 == live.id)
            .copied()
            .collect();
        for k in rules {
            self.target_remove(k)?;
        }
        let vip_still_used = self.live.values().any(|l| l.key.addr == live.key.addr);
        if !vip_still_used {
            let _ = self.vips.remove(&vip_key(&live.key));
        }
        self.shadows
            .set(live.id, Shadow::default(), 0)
            .map_err(map_err(map::SHADOWS))?;
        for v in live.versions.values() {
            self.version_ids.give(v.id);
        }
        self.version_id_by_name.retain(|(s, _), _| s != name);
        let ids: Vec<_> = self
            .backend_ids
            .iter()
            .filter(|((s, _, _), _)| s == name)
            .map(|(k, id)| (k.clone(), *id))
            .collect();
        for (k, id) in ids {
            self.backend_ids.remove(&k);
            self.backend_written.remove(&id);
            self.backend_id_pool.give(id);
        }
        self.service_ids.give(live.id);
        Ok(())
    }

    fn clear_service_drops(&mut self, id: u32) -> Result<()> {
        for slot in 0..service_drop::SLOTS {
            self.service_drops
                .set(
                    id * service_drop::SLOTS + slot,
                    per_cpu_zeros(map::SERVICE_DROPS)?,
                    0,
                )
                .map_err(map_err(map::SERVICE_DROPS))?;
        }
        Ok(())
    }

    /// Sets the bit of `addr` in one half of the address filter (never
    /// cleared; see the module documentation).
    fn filter_add(&mut self, half: u32, addr: Ipv4Addr) -> Result<()> {
        let bit = addr_filter_bit(&[u32::from(addr).to_be(), 0, 0, 0]);
        let idx = half + bit / 64;
        let word = self.filter_words[idx as usize];
        let mask = 1u64 << (bit % 64);
        if word & mask == 0 {
            self.addr_filter
                .set(idx, word | mask, 0)
                .map_err(map_err(map::ADDR_FILTER))?;
            self.filter_words[idx as usize] = word | mask;
        }
        Ok(())
    }

    /// Drops of one service by reason ([`service_drop::NAMES`]), summed
    /// over CPUs; empty for a service that is not published.
    ///
    /// # Errors
    /// Map read failures.
    pub fn service_drops(&self, service: &str) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        let Some(live) = self.live.get(service) else {
            return Ok(out);
        };
        for (slot, name) in service_drop::NAMES.iter().enumerate() {
            let v = self
                .service_drops
                .get(&(live.id * service_drop::SLOTS + slot as u32), 0)
                .map_err(map_err(map::SERVICE_DROPS))?;
            out.insert(*name, v.iter().sum());
        }
        Ok(out)
    }

    /// Whether `addr` is in one half of the address filter (its bit is set).
    pub fn filter_has(&self, half: u32, addr: Ipv4Addr) -> Result<bool> {
        let bit = addr_filter_bit(&[u32::from(addr).to_be(), 0, 0, 0]);
        let word = self
            .addr_filter
            .get(&(half + bit / 64), 0)
            .map_err(map_err(map::ADDR_FILTER))?;
        Ok(word & (1u64 << (bit % 64)) != 0)
    }

    fn clear_stats(&mut self, id: u32) -> Result<()> {
        self.backend_stats
            .set(id, per_cpu_zeros(map::BACKEND_STATS)?, 0)
            .map_err(map_err(map::BACKEND_STATS))?;
        self.backend_signals
            .set(id, per_cpu_zeros(map::BACKEND_SIGNALS)?, 0)
            .map_err(map_err(map::BACKEND_SIGNALS))?;
        if let Ok(mut g) = self.swept.lock() {
            g.remove(&id);
        }
        Ok(())
    }

    /// The timeouts the sweep counted, shared with the task that sweeps
    /// (see [`sweep_timeouts`]).
    pub fn swept_timeouts(&self) -> SweptTimeouts {
        self.swept.clone()
    }

    /// A descriptor of its own for `BACKENDS`, for [`sweep_timeouts`]
    /// outside whatever holds this `Dataplane`.
    ///
    /// # Errors
    /// `dup` failed.
    pub fn backends_fd(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        use aya::maps::IterableMap as _;
        self.backends.map().fd().as_fd().try_clone_to_owned()
    }

    /// Signal counters of one backend (kernel counters summed over CPUs,
    /// plus the sweep's timeouts); zero for a backend that is not published.
    ///
    /// # Errors
    /// Map read failures.
    pub fn backend_counters(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<Counters> {
        let Some(&id) = self
            .backend_ids
            .get(&(service.to_string(), version.to_string(), addr))
        else {
            return Ok(Counters::default());
        };
        let stats = self.stats_of(id)?;
        let sig = self
            .backend_signals
            .get(&id, 0)
            .map_err(map_err(map::BACKEND_SIGNALS))?
            .iter()
            .fold(BackendSignals::default(), |mut acc, s| {
                acc.add(s);
                acc
            });
        let swept = self
            .swept
            .lock()
            .ok()
            .and_then(|g| g.get(&id).copied())
            .unwrap_or(0);
        Ok(Counters::from_kernel(&stats, &sig, swept))
    }

    /// Counters of one backend, summed over CPUs.
    ///
    /// # Errors
    /// Map read failures.
    pub fn backend_stats(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<BackendStats> {
        match self
            .backend_ids
            .get(&(service.to_string(), version.to_string(), addr))
        {
            Some(&id) => self.stats_of(id),
            None => Ok(BackendStats::default()),
        }
    }

    /// `BACKEND_STATS` of backend `id`, summed over CPUs.
    fn stats_of(&self, id: u32) -> Result<BackendStats> {
        Ok(self
            .backend_stats
            .get(&id, 0)
            .map_err(map_err(map::BACKEND_STATS))?
            .iter()
            .fold(BackendStats::default(), |mut acc, s| {
                acc.add(s);
                acc
            }))
    }

    /// Global counters (drops by reason and outcomes), by name.
    ///
    /// # Errors
    /// Map read failures.
    pub fn counters(&self) -> Result<BTreeMap<&'static str, u64>> {
        let mut out = BTreeMap::new();
        for (i, name) in counter::NAMES.iter().enumerate() {
            let v = self
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err(map::COUNTERS))?;
            out.insert(*name, v.iter().sum());
        }
        Ok(out)
    }
}

/// The object to load from `source`. An object file's maps are checked
/// against this build's layout first (so a refused object changes
/// nothing); the embedded one is built from the same sources, which
/// `pins::tests::the_embedded_program_has_this_builds_layout` checks.
fn program_bytes(source: &ProgramSource) -> Result<std::borrow::Cow<'static, [u8]>> {
    match source {
        ProgramSource::Embedded if PROGRAM.is_empty() => Err(DataplaneError::NoProgram),
        ProgramSource::Embedded => Ok(std::borrow::Cow::Borrowed(PROGRAM)),
        ProgramSource::File(path) => {
            let bytes = std::fs::read(path).map_err(|e| DataplaneError::ProgramFile {
                path: path.clone(),
                source: e,
            })?;
            pins::check_object(&bytes, &format!("the kernel program {}", path.display()))?;
            Ok(std::borrow::Cow::Owned(bytes))
        }
    }
}

/// The connection table and the backend entries opened through
/// descriptors of their own, for the daemon's once-a-second walk outside
/// the controller's lock: it counts live flows per backend and sweeps
/// missed connect deadlines (see [`TableWalker::walk`]).
pub struct TableWalker {
    conns: HashMap<MapData, FlowKey, Conn>,
    backends: Array<MapData, Backend>,
    swept: SweptTimeouts,
}

/// Most missed deadlines one walk marks; the rest wait for the next walk.
const SWEEP_BATCH: usize = 65536;

impl TableWalker {
    /// Opens the maps of `dp` again for a walker.
    ///
    /// # Errors
    /// A descriptor could not be duplicated or opened as a map.
    pub fn new(dp: &Dataplane) -> std::io::Result<Self> {
        let open = |fd| MapData::from_fd(fd).map_err(std::io::Error::other);
        let conns = HashMap::try_from(aya::maps::Map::LruHashMap(open(dp.conns_fd()?)?))
            .map_err(std::io::Error::other)?;
        let backends = Array::try_from(aya::maps::Map::Array(open(dp.backends_fd()?)?))
            .map_err(std::io::Error::other)?;
        Ok(Self {
            conns,
            backends,
            swept: dp.swept_timeouts(),
        })
    }

    /// One walk of the connection table at `now` (`CLOCK_MONOTONIC` ns):
    /// the live flows per backend id (see [`Dataplane::live_flows`]), and
    /// the sweep: a flow still waiting for its backend's first answer past
    /// the backend's connect deadline, whose client sent nothing since
    /// (so the program never saw the deadline pass), is marked
    /// `STATE_TIMED_OUT` in both of its entries and counted as a timeout
    /// of its backend here ([`Dataplane::swept_timeouts`]). The mark makes
    /// the program count no second timeout for it. A packet of the same
    /// flow in the microseconds between the sweep's read and write of an
    /// entry could see the timeout counted twice.
    ///
    /// Reads the table in batches, or one entry at a time on kernels
    /// without batch reads.
    ///
    /// # Errors
    /// A read of the table failed.
    pub fn walk(&mut self, now: u64) -> std::io::Result<BTreeMap<u32, u64>> {
        let mut live = BTreeMap::new();
        let mut expired = Vec::new();
        let mut deadlines: BTreeMap<u32, u64> = BTreeMap::new();
        let fd = {
            use aya::maps::IterableMap as _;
            self.conns.map().fd().as_fd().as_raw_fd()
        };
        let mut visit = |key: &FlowKey, conn: &Conn| {
            tally_live(&mut live, key, conn, now);
            if expired.len() < SWEEP_BATCH
                && conn.flags & CONN_F_REVERSE == 0
                && splitter_common::awaiting_answer(conn.state, conn.flags)
                && splitter_common::conn_live(key.proto, conn.state, conn.last_seen, now)
            {
                let deadline = *deadlines.entry(conn.backend).or_insert_with(|| {
                    let ms = self
                        .backends
                        .get(&conn.backend, 0)
                        .map(|b| b.connect_timeout_ms)
                        .unwrap_or(0);
                    splitter_common::connect_deadline_us(ms)
                });
                if splitter_common::elapsed_us(conn.fin_tsval, now) > deadline {
                    expired.push((*key, *conn));
                }
            }
        };
        match lookup_batch(fd, 2 * MAX_CONN_CAPACITY as usize, &mut visit) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // No batch reads (kernels before 5.6): one entry at a time.
                for item in self.conns.iter().take(2 * MAX_CONN_CAPACITY as usize) {
                    match item {
                        Ok((key, conn)) => visit(&key, &conn),
                        // An entry evicted between the key walk and its read.
                        Err(aya::maps::MapError::KeyNotFound) => continue,
                        Err(e) => return Err(std::io::Error::other(e)),
                    }
                }
            }
            Err(e) => return Err(e),
        }
        for (key, seen) in expired {
            if self.mark_timed_out(&key, &seen)
                && let Ok(mut g) = self.swept.lock()
            {
                *g.entry(seen.backend).or_insert(0) += 1;
            }
        }
        Ok(live)
    }

    /// Marks the flow of forward entry `key` (as `seen` in the walk) timed
    /// out in both entries, if it still waits for the same attempt's
    /// answer. True if it did.
    fn mark_timed_out(&mut self, key: &FlowKey, seen: &Conn) -> bool {
        use splitter_common::{STATE_TIMED_OUT, awaiting_answer};
        let Ok(mut fwd) = self.conns.get(key, 0) else {
            return false;
        };
        if !awaiting_answer(fwd.state, fwd.flags)
            || fwd.fin_tsval != seen.fin_tsval
            || fwd.backend != seen.backend
        {
            return false;
        }
        fwd.state |= STATE_TIMED_OUT;
        // BPF_EXIST (2): only if the entry is still there.
        if self.conns.insert(key, fwd, 2).is_err() {
            return false;
        }
        let rkey = FlowKey {
            src: fwd.new_addr,
            dst: fwd.other_addr,
            sport: fwd.new_port,
            dport: fwd.other_port,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        };
        if let Ok(mut rev) = self.conns.get(&rkey, 0)
            && rev.backend == fwd.backend
            && rev.state & STATE_TIMED_OUT == 0
        {
            rev.state |= STATE_TIMED_OUT;
            let _ = self.conns.insert(rkey, rev, 2);
        }
        true
    }
}

/// Counts `conn` for its backend in `out` if it is a forward entry whose
/// flow is still going at `now` (see [`splitter_common::conn_live`]).
fn tally_live(out: &mut BTreeMap<u32, u64>, key: &FlowKey, conn: &Conn, now: u64) {
    if conn.flags & CONN_F_REVERSE == 0
        && splitter_common::conn_live(key.proto, conn.state, conn.last_seen, now)
    {
        *out.entry(conn.backend).or_insert(0) += 1;
    }
}

/// Reads every entry of the connection table behind `fd` with
/// `BPF_MAP_LOOKUP_BATCH` and hands it to `f`, at most `limit` entries.
/// `EINVAL` means the kernel has no batch reads (before 5.6).
fn lookup_batch(fd: i32, limit: usize, f: &mut impl FnMut(&FlowKey, &Conn)) -> std::io::Result<()> {
    /// The `batch` member of `union bpf_attr`.
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const CHUNK: usize = 4096;
    let mut keys = vec![FlowKey::default(); CHUNK];
    let mut values = vec![Conn::default(); CHUNK];
    // The position token: a bucket index for hash maps (room for a key).
    let mut token_in = [0u8; size_of::<FlowKey>()];
    let mut token_out = [0u8; size_of::<FlowKey>()];
    let mut first = true;
    let mut seen = 0usize;
    while seen < limit {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `CHUNK` keys and values of the
        // map's sizes and at tokens of a key's size, all alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let done = if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        let n = (attr.count as usize).min(CHUNK);
        for (k, v) in keys.iter().zip(&values).take(n) {
            f(k, v);
        }
        seen += n;
        if done {
            break;
        }
        token_in = token_out;
        first = false;
    }
    Ok(())
}

/// The clock `Conn::last_seen` is stamped with: the kernel program reads
/// CLOCK_MONOTONIC at tick granularity (`bpf_ktime_get_coarse_ns`), so a
/// stamp is at most a tick behind this reading (the idle time saturates at 0).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A zero value for every possible CPU, to reset a slot of per-CPU `map`.
fn per_cpu_zeros<T: aya::Pod + Default>(map: &'static str) -> Result<aya::maps::PerCpuValues<T>> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
        map,
        source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: e,
        })),
    })?;
    aya::maps::PerCpuValues::try_from((0..cpus).map(|_| T::default()).collect::<Vec<_>>())
        .map_err(|e| DataplaneError::Capacity(e.to_string()))
}

/// Replaces the program behind the pinned link at `path` with `prog`. The
/// pin keeps the link after this process exits (closing our descriptor does
/// not detach a pinned link).
fn take_over_link(prog: &mut Xdp, path: &Path) -> std::result::Result<(), String> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    prog.attach_to_link(link).map_err(|e| e.to_string())?;
    Ok(())
}

/// Attaches the tc half of UDP mirroring to `iface`'s ingress, next to the
/// XDP program: a tcx link (kernel 6.6 and later), pinned and taken over
/// like the XDP link (one `bpf_link_update`), so mirroring goes on while
/// no daemon runs. On an older kernel the program is attached through
/// netlink (clsact), which cannot be pinned: it stays attached after the
/// daemon exits and the next daemon attaches its own in front of it.
/// The program costs one bounds check per packet the kernel receives (it
/// never sees what XDP forwards itself).
fn attach_tc(ebpf: &mut Ebpf, iface: &str, pin_dir: Option<&Path>) -> Result<()> {
    let prog = tc_program(ebpf)?;
    let prog_err = |op: &'static str| {
        let iface = iface.to_string();
        move |e: aya::programs::ProgramError| DataplaneError::Program {
            op,
            iface,
            source: Box::new(e),
        }
    };
    if let Some(dir) = pin_dir {
        let path = pins::tc_link_pin(dir, iface);
        if path.exists() {
            let taken = PinnedLink::from_pin(&path)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    SchedClassifierLink::try_from(FdLink::from(p)).map_err(|e| e.to_string())
                })
                .and_then(|l| prog.attach_to_link(l).map_err(|e| e.to_string()));
            match taken {
                Ok(_) => {
                    info!(interface = %iface, "took over the pinned tc link of the shadow program");
                    return Ok(());
                }
                Err(e) => {
                    warn!(interface = %iface, error = %e, "pinned tc link unusable; attaching anew");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
    let id = match prog.attach(iface, TcAttachType::Ingress) {
        Ok(id) => id,
        Err(_) => {
            // Netlink attachment (before 6.6) needs the clsact qdisc.
            let _ = aya::programs::tc::qdisc_add_clsact(iface);
            prog.attach(iface, TcAttachType::Ingress)
                .map_err(prog_err("attaching the tc shadow program"))?
        }
    };
    if let Some(dir) = pin_dir {
        let path = pins::tc_link_pin(dir, iface);
        let link = prog.take_link(id).map_err(prog_err("taking the tc link"))?;
        match FdLink::try_from(link) {
            Ok(fd_link) => {
                fd_link.pin(&path).map_err(|e| {
                    DataplaneError::Pins(pins::PinError::Io {
                        op: "pinning the tc link at",
                        path: path.clone(),
                        source: std::io::Error::other(e.to_string()),
                    })
                })?;
            }
            Err(e) => {
                warn!(interface = %iface, error = %e, "tc program attached through netlink (kernel before 6.6): not pinned");
            }
        }
    }
    info!(interface = %iface, "tc shadow program attached (ingress)");
    Ok(())
}

/// The tc half of UDP mirroring in `ebpf`.
fn tc_program(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier> {
    ebpf.program_mut(TC_PROGRAM_NAME)
        .ok_or(DataplaneError::Object {
            what: "program",
            name: TC_PROGRAM_NAME,
            detail: "not found".into(),
        })?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Object {
            what: "program",
            name: TC_PROGRAM_NAME,
            detail: e.to_string(),
        })
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    let p = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(DataplaneError::Object {
            what: "program",
            name: PROGRAM_NAME,
            detail: "not found".into(),
        })?;
    p.try_into()
        .map_err(|e: aya::programs::ProgramError| DataplaneError::Object {
            what: "program",
            name: PROGRAM_NAME,
            detail: e.to_string(),
        })
}

fn take<T>(
    ebpf: &mut Ebpf,
    name: &'static str,
    conv: impl FnOnce(aya::maps::Map) -> std::result::Result<T, aya::maps::MapError>,
) -> Result<T> {
    let m = ebpf.take_map(name).ok_or(DataplaneError::Object {
        what: "map",
        name,
        detail: "not found".into(),
    })?;
    conv(m).map_err(|e| DataplaneError::Object {
        what: "map",
        name,
        detail: e.to_string(),
    })
}

/// The `CONNS` key of a packet from `src` to `dst` (IPv4).
pub fn flow_key(src: SocketAddrV4, dst: SocketAddrV4, proto: u8) -> FlowKey {
    FlowKey {
        src: [u32::from(*src.ip()).to_be(), 0, 0, 0],
        dst: [u32::from(*dst.ip()).to_be(), 0, 0, 0],
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto,
        family: FAMILY_V4,
        _pad: [0; 2],
    }
}

/// The `SERVICES` key of a configured service.
pub fn service_key(svc: &ServiceConfig) -> ServiceKey {
    ServiceKey {
        addr: [u32::from(*svc.vip.ip()).to_be(), 0, 0, 0],
        port: svc.vip.port().to_be(),
        proto: match svc.protocol {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        },
        family: FAMILY_V4,
    }
}

/// The `TARGETS` key of a rule of service `id`.
pub fn target_key(id: u32, cidr: Cidr) -> LpmKey<TargetKey> {
    LpmKey::new(
        target_prefix_len(u32::from(cidr.len)),
        TargetKey {
            service: id.to_be(),
            addr: [u32::from(cidr.addr).to_be(), 0, 0, 0],
        },
    )
}

/// The rule a `TARGETS` key holds, if it is one this build writes.
fn decode_target_key(k: &LpmKey<TargetKey>) -> Option<(u32, Cidr)> {
    let data = k.data();
    let len = k.prefix_len().checked_sub(32).filter(|l| *l <= 32)?;
    Some((
        u32::from_be(data.service),
        Cidr {
            addr: Ipv4Addr::from(u32::from_be(data.addr[0])),
            len: len as u8,
        },
    ))
}

fn vip_key(key: &ServiceKey) -> VipKey {
    VipKey {
        addr: key.addr,
        family: FAMILY_V4 as u32,
    }
}

fn backend_entry(
    addr: SocketAddrV4,
    version: u32,
    state: BackendState,
    connect_timeout_ms: u32,
) -> Backend {
    let flags = match state {
        BackendState::Disabled => BACKEND_F_PRESENT | BACKEND_F_DISABLED,
        BackendState::Active | BackendState::Drain => BACKEND_F_PRESENT,
    };
    Backend {
        addr: [u32::from(*addr.ip()).to_be(), 0, 0, 0],
        port: addr.port().to_be(),
        family: FAMILY_V4,
        flags,
        // Version ids are below MAX_TABLES / 2 and the timeout is
        // validated to 60000 ms: both fit.
        version: version as u16,
        connect_timeout_ms: connect_timeout_ms.min(u32::from(u16::MAX)) as u16,
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so they
/// load there too. Harmless on newer kernels.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!("could not lift RLIMIT_MEMLOCK; only kernels before 5.11 need it");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::Ids;

    #[test]
    fn freed_ids_are_reused_last() {
        let mut ids = Ids::new(4);
        assert_eq!(
            (0..3).map(|_| ids.take("x").unwrap()).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        ids.give(0);
        // 0 is free again, but 3 comes first; then the wrap finds 0.
        assert_eq!(ids.take("x").unwrap(), 3);
        assert_eq!(ids.take("x").unwrap(), 0);
        assert!(ids.take("x").is_err());
        ids.give(2);
        ids.claim(2);
        assert!(ids.take("x").is_err());
        ids.give(1);
        assert_eq!(ids.take("x").unwrap(), 1);
    }
}
