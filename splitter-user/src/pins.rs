//! The pinned side of the data plane: the bpffs directory that keeps the
//! maps and XDP links alive while no daemon runs, the check that a new
//! build can take them over, and their removal (`splitter detach`).
//!
//! Layout of the pin directory (default `/sys/fs/bpf/splitter`):
//! - one file per map, named as in `splitter_common::map`;
//! - `link_<interface>` for every XDP attachment;
//! - `tclink_<interface>` for the tc program (UDP mirroring) beside it.
use std::{
    ffi::CString,
    mem::size_of,
    path::{Path, PathBuf},
};

use splitter_common::{
    ADDR_FILTER_WORDS, Backend, BackendSignals, BackendStats, CONN_CAPACITY, Conn, FlowKey,
    MAX_BACKENDS, MAX_SERVICES, MAX_TABLES, MAX_TARGETS, MaglevTable, Service, ServiceKey, Shadow,
    TargetKey, VipKey, counter, map,
};

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is normally mounted.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Pin-directory errors.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The directory is not on a bpffs and none could be mounted.
    #[error(
        "{path} is not on a bpffs: mount one (`mount -t bpf bpf {BPFFS_ROOT}`) or set dataplane.pin_dir below a bpffs mount ({detail})"
    )]
    NotBpffs { path: PathBuf, detail: String },
    /// A pinned map's shape differs from what this build expects.
    #[error(
        "the pinned map {path} has {what} {found}, but this build expects {expected}: the map layout changed and \
         established connections cannot be carried over. Run `splitter detach` (drops the pinned state and \
         every established flow through the edge) and start again, or keep running the previous build"
    )]
    LayoutChanged {
        path: PathBuf,
        what: &'static str,
        found: u32,
        expected: u32,
    },
    /// The pinned connection table has another capacity than configured.
    #[error(
        "the pinned connection table {path} holds {found} entries, but dataplane.conn_capacity asks for {wanted}: \
         a table cannot be resized while it carries flows. Set conn_capacity = {found} to keep the established \
         connections, or run `splitter detach` (drops every established flow through the edge) and start again; \
         nothing was changed and the pinned program keeps forwarding"
    )]
    CapacityChanged {
        path: PathBuf,
        found: u32,
        wanted: u32,
    },
    /// A kernel program object whose maps differ from this build's layout.
    #[error(
        "{program} defines map {map} with {what} {found}, but this daemon (and the maps it pins) uses {expected}: \
         the object was built against another map layout and cannot take over the running data plane. \
         Build it from the same sources as this daemon (splitter-common), or upgrade the daemon itself; \
         nothing was changed and the running program keeps forwarding"
    )]
    ObjectLayout {
        program: String,
        map: &'static str,
        what: &'static str,
        found: u32,
        expected: u32,
    },
    /// A kernel program object that is not a usable BPF ELF object.
    #[error("{program} is not a usable BPF object (nothing was changed): {detail}")]
    Object { program: String, detail: String },
    /// Reading a pinned map's info failed.
    #[error("reading pinned map {path}: {detail}")]
    Info { path: PathBuf, detail: String },
    /// Filesystem trouble.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`expected_maps`] gives for each map, in this order.
const SHAPE: [&str; 4] = [
    "key size",
    "value size",
    "capacity",
    "map type (bpf_map_type)",
];

/// Every map with the key size, value size, capacity and kernel map type
/// (`bpf_map_type`) this build uses ([`SHAPE`]), with the default
/// connection-table capacity (what the object file declares).
pub fn expected_maps() -> [(&'static str, [u32; 4]); 14] {
    expected_maps_for(CONN_CAPACITY)
}

/// [`expected_maps`] with a connection table of `conn_capacity` entries.
pub fn expected_maps_for(conn_capacity: u32) -> [(&'static str, [u32; 4]); 14] {
    use aya_obj::generated::bpf_map_type::{
        BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LPM_TRIE, BPF_MAP_TYPE_LRU_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY,
    };
    let s = |n: usize| n as u32;
    let (hash, array, lru_hash, percpu_array) = (
        BPF_MAP_TYPE_HASH as u32,
        BPF_MAP_TYPE_ARRAY as u32,
        BPF_MAP_TYPE_LRU_HASH as u32,
        BPF_MAP_TYPE_PERCPU_ARRAY as u32,
    );
    [
        (
            map::SERVICES,
            [
                s(size_of::<ServiceKey>()),
                s(size_of::<Service>()),
                MAX_SERVICES,
                hash,
            ],
        ),
        (map::VIPS, [s(size_of::<VipKey>()), 4, MAX_SERVICES, hash]),
        (
            map::TABLES,
            [4, s(size_of::<MaglevTable>()), MAX_TABLES, array],
        ),
        (
            map::BACKENDS,
            [4, s(size_of::<Backend>()), MAX_BACKENDS, array],
        ),
        (
            map::CONNS,
            [
                s(size_of::<FlowKey>()),
                s(size_of::<Conn>()),
                conn_capacity,
                lru_hash,
            ],
        ),
        (
            map::BACKEND_STATS,
            [4, s(size_of::<BackendStats>()), MAX_BACKENDS, percpu_array],
        ),
        (
            map::BACKEND_SIGNALS,
            [
                4,
                s(size_of::<BackendSignals>()),
                MAX_BACKENDS,
                percpu_array,
            ],
        ),
        (map::COUNTERS, [4, 8, counter::SLOTS, percpu_array]),
        (
            map::SERVICE_DROPS,
            [
                4,
                8,
                MAX_SERVICES * splitter_common::service_drop::SLOTS,
                percpu_array,
            ],
        ),
        (map::ADDR_FILTER, [4, 8, 2 * ADDR_FILTER_WORDS, array]),
        (
            map::TARGETS,
            [
                // The trie's key: a u32 prefix length, then the data.
                s(4 + size_of::<TargetKey>()),
                4,
                MAX_TARGETS,
                BPF_MAP_TYPE_LPM_TRIE as u32,
            ],
        ),
        (
            map::SHADOWS,
            [4, s(size_of::<Shadow>()), MAX_SERVICES, array],
        ),
        (map::SHADOW_ACC, [4, 4, MAX_SERVICES, percpu_array]),
        (map::TEE_ALIVE, [4, 8, MAX_SERVICES, array]),
    ]
}

/// The first [`SHAPE`] item in which `found` differs from `expected`:
/// (what, found, expected).
fn first_difference(found: [u32; 4], expected: [u32; 4]) -> Option<(&'static str, u32, u32)> {
    SHAPE
        .into_iter()
        .zip(found.into_iter().zip(expected))
        .find(|(_, (f, e))| f != e)
        .map(|(what, (f, e))| (what, f, e))
}

/// Checks the maps an object file defines against [`expected_maps`]
/// before anything is loaded: an object built against another layout
/// would otherwise be handed the pinned maps and read them wrongly.
/// `program` names the object in messages.
///
/// # Errors
/// [`PinError::Object`] when the bytes are no BPF object or lack a map,
/// [`PinError::ObjectLayout`] naming the first map that differs.
pub fn check_object(bytes: &[u8], program: &str) -> Result<(), PinError> {
    let obj = aya_obj::Object::parse(bytes).map_err(|e| PinError::Object {
        program: program.to_string(),
        detail: e.to_string(),
    })?;
    for (name, expected) in expected_maps() {
        let Some(m) = obj.maps.get(name) else {
            return Err(PinError::Object {
                program: program.to_string(),
                detail: format!("it defines no map {name}"),
            });
        };
        let found = [m.key_size(), m.value_size(), m.max_entries(), m.map_type()];
        if let Some((what, found, expected)) = first_difference(found, expected) {
            return Err(PinError::ObjectLayout {
                program: program.to_string(),
                map: name,
                what,
                found,
                expected,
            });
        }
    }
    Ok(())
}

/// Makes sure `dir` exists on a bpffs, mounting bpffs at `/sys/fs/bpf`
/// when `dir` lies below it and nothing is mounted there yet.
///
/// # Errors
/// [`PinError::NotBpffs`] when no bpffs can be had there.
pub fn ensure_bpffs(dir: &Path) -> Result<(), PinError> {
    let root = Path::new(BPFFS_ROOT);
    if dir.starts_with(root) && !is_bpffs(root) {
        mount_bpffs(root).map_err(|e| PinError::NotBpffs {
            path: dir.to_path_buf(),
            detail: e.to_string(),
        })?;
        tracing::info!(path = BPFFS_ROOT, "mounted bpffs");
    }
    std::fs::create_dir_all(dir).map_err(|source| PinError::Io {
        op: "creating",
        path: dir.to_path_buf(),
        source,
    })?;
    if !is_bpffs(dir) {
        return Err(PinError::NotBpffs {
            path: dir.to_path_buf(),
            detail: "wrong filesystem type".into(),
        });
    }
    Ok(())
}

/// Why pins in `dir` would not outlive this process, if they would not:
/// this process has a mount namespace of its own (as `ip netns exec` gives
/// it, with a fresh `/sys`, where iproute2 may also mount a fresh bpffs),
/// and the bpffs that would hold `dir` is not the one the host (PID 1's
/// mount namespace, or the parent's) sees at the same path, or there is none yet and this
/// daemon would mount one. Such a bpffs lives only as long as the mount
/// namespace: when the daemon exits, even by `kill -9`, the pins go, and
/// with them the XDP program, the connection table and every established
/// connection through the edge.
pub fn ephemeral_pins(dir: &Path) -> Option<String> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok()?;
    // The host's view: PID 1's, or where that is hidden (a sandbox), the
    // parent's (`ip netns exec` runs the daemon in the process it made
    // the namespace in, so the parent still has the host's).
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    let (host_ns, host_pid) =
        ["1".to_string(), parent.to_string()]
            .into_iter()
            .find_map(|pid| {
                let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok()?;
                Some((ns, pid))
            })?;
    if own == host_ns {
        return None;
    }
    let private = match dir.ancestors().find(|a| a.exists()) {
        Some(here) if is_bpffs(here) => {
            let host = Path::new(&format!("/proc/{host_pid}/root"))
                .join(here.strip_prefix("/").unwrap_or(here));
            !is_bpffs(&host) || device(here) != device(&host)
        }
        // No bpffs there yet: the daemon would mount one below /sys/fs/bpf
        // in its own namespace (elsewhere it refuses to start anyway).
        _ => dir.starts_with(BPFFS_ROOT),
    };
    private.then(|| {
        format!(
            "the pin directory {} would be on a bpffs private to this process: it runs in a mount namespace of its own (as `ip netns exec` gives), whose bpffs is not the host's, so the pins, the XDP program and every established connection would vanish when the daemon exits, even by kill -9. Run it in the network namespace without a mount namespace of its own (`nsenter --net=/run/netns/NAME splitter daemon ...`), or set dataplane.pin_dir below a bpffs mounted in the host's mount namespace; --ephemeral-pins accepts the loss (tests, demos)",
            dir.display()
        )
    })
}

/// The device of the filesystem holding `path`.
fn device(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.dev())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed struct; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

fn mount_bpffs(at: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(at)?;
    let target = CString::new(at.as_os_str().as_encoded_bytes())?;
    // SAFETY: constant NUL-terminated strings and a valid target path.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Checks every pinned map against [`expected_maps_for`] `conn_capacity`.
/// Returns whether the connection table is pinned already (a restart or an
/// upgrade).
///
/// # Errors
/// [`PinError::LayoutChanged`] naming the first map that differs,
/// [`PinError::CapacityChanged`] for a connection table of another
/// capacity (and the same layout otherwise).
pub fn check_layout(dir: &Path, conn_capacity: u32) -> Result<bool, PinError> {
    let mut conns_pinned = false;
    for (name, expected) in expected_maps_for(conn_capacity) {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path).map_err(|e| PinError::Info {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        let found = [
            info.key_size(),
            info.value_size(),
            info.max_entries(),
            info.map_type().map(|t| t as u32).unwrap_or(u32::MAX),
        ];
        if let Some((what, found, expected)) = first_difference(found, expected) {
            if name == map::CONNS && what == SHAPE[2] {
                return Err(PinError::CapacityChanged {
                    path,
                    found,
                    wanted: expected,
                });
            }
            return Err(PinError::LayoutChanged {
                path,
                what,
                found,
                expected,
            });
        }
        if name == map::CONNS {
            conns_pinned = true;
        }
    }
    Ok(conns_pinned)
}

/// Pin path of the XDP link on `interface`.
pub fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link_{interface}"))
}

/// Pin path of the tc link (the shadow program) on `interface`.
pub fn tc_link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("tclink_{interface}"))
}

/// Link pins present in `dir`, as (interface, path).
pub fn link_pins(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("link_")
                .map(|i| (i.to_string(), e.path()))
        })
        .collect()
}

/// Removes the links (which detaches XDP once no process holds them),
/// then the maps, then the directory. Returns what was removed.
///
/// # Errors
/// A pin that exists but cannot be removed.
pub fn remove_all(dir: &Path) -> Result<Vec<PathBuf>, PinError> {
    let mut removed = Vec::new();
    let mut rm = |path: PathBuf| -> Result<(), PinError> {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                removed.push(path);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(PinError::Io {
                op: "removing",
                path,
                source,
            }),
        }
    };
    for (iface, path) in link_pins(dir) {
        rm(path)?;
        rm(tc_link_pin(dir, &iface))?;
    }
    for (name, ..) in expected_maps() {
        rm(dir.join(name))?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %dir.display(), error = %e, "pin directory left in place"),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program this binary embeds (empty with `AYA_BUILD_SKIP=1`).
    static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/splitter"));

    #[test]
    fn the_embedded_program_has_this_builds_layout() {
        if EMBEDDED.is_empty() {
            // Built without the kernel program: nothing to check.
            return;
        }
        let r = check_object(EMBEDDED, "the embedded kernel program");
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn a_file_that_is_no_bpf_object_is_refused() {
        let err = check_object(b"not an ELF file\n", "the kernel program junk.o")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("junk.o is not a usable BPF object"),
            "got {err:?}"
        );
    }
}
