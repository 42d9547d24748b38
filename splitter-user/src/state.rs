//! The daemon's runtime state on disk: the running services (with every
//! change made through the API: weights, backends added, removed, drained)
//! and the data-plane layout (which ids and table generations are live in
//! the pinned maps). Written atomically (temporary file, fsync, rename, fsync
//! of the directory) after every change and read back on start, before the
//! daemon reports ready. A damaged file is set aside under a new name and
//! reported, never silently dropped.
use std::{
    collections::BTreeMap,
    io::Write,
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::config::ServiceConfig;

/// Format version written into the file. Format 1 (weights only) is still
/// read.
pub const FORMAT: u32 = 2;
/// Oldest format still read.
const OLDEST_FORMAT: u32 = 1;
/// File name inside the state directory.
pub const FILE_NAME: &str = "state.json";
/// Default state directory (systemd's `StateDirectory=splitter`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/splitter";

/// Everything persisted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// [`FORMAT`] when written by this build.
    pub format: u32,
    /// Format 1 only: service -> version -> weight, as last set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, BTreeMap<String, u32>>,
    /// Digest ([`crate::config::file_digest`]) of the configuration file
    /// the running services started from. On start they are restored only
    /// if the file is still the same; an edited file wins.
    #[serde(default)]
    pub config_digest: String,
    /// The running services, as changed at runtime (format 2).
    #[serde(default)]
    pub services: Option<Vec<ServiceConfig>>,
    /// What is live in the pinned maps.
    pub layout: Layout,
    /// Rollouts by service, running and finished: a running one resumes
    /// at its step in the next daemon.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollouts: BTreeMap<String, crate::rollout::book::Book>,
}

/// Ids and generations the data plane uses, so a restarted daemon can keep
/// publishing into pinned maps without tearing a live table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    /// Service name -> its ids.
    pub services: BTreeMap<String, LayoutService>,
    /// Backend ids.
    pub backends: Vec<LayoutBackend>,
    /// Interface -> XDP mode it was attached in.
    pub attachments: BTreeMap<String, String>,
}

/// One service's ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayoutService {
    /// Service id.
    pub id: u32,
    /// VIP address and port it is published under.
    pub vip: SocketAddrV4,
    /// IP protocol number.
    pub proto: u8,
    /// Version name -> (version id, live generation).
    pub versions: BTreeMap<String, (u32, u32)>,
}

/// One backend id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayoutBackend {
    /// Service name.
    pub service: String,
    /// Version name.
    pub version: String,
    /// Backend address.
    pub address: SocketAddrV4,
    /// Backend id.
    pub id: u32,
}

/// State-file errors.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but cannot be used; it was moved aside.
    #[error(
        "state file {path} is damaged ({detail}); moved it to {moved_to} and started from the configuration"
    )]
    Damaged {
        path: PathBuf,
        moved_to: PathBuf,
        detail: String,
    },
    /// I/O trouble.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads the state in `dir`. `Ok(None)` when there is none yet.
///
/// # Errors
/// [`StateError::Damaged`] after moving a bad file aside (the caller goes
/// on from the configuration), [`StateError::Io`] when it cannot be read.
pub fn load(dir: &Path) -> Result<Option<State>, StateError> {
    let path = dir.join(FILE_NAME);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Io {
                op: "reading",
                path,
                source,
            });
        }
    };
    let parsed: Result<State, String> = serde_json::from_str::<State>(&text)
        .map_err(|e| e.to_string())
        .and_then(|s| {
            if (OLDEST_FORMAT..=FORMAT).contains(&s.format) {
                Ok(s)
            } else {
                Err(format!("unknown format {}", s.format))
            }
        });
    match parsed {
        Ok(s) => Ok(Some(s)),
        Err(detail) => {
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let moved_to = dir.join(format!("{FILE_NAME}.damaged-{stamp}"));
            std::fs::rename(&path, &moved_to).map_err(|source| StateError::Io {
                op: "setting aside",
                path: path.clone(),
                source,
            })?;
            Err(StateError::Damaged {
                path,
                moved_to,
                detail,
            })
        }
    }
}

/// Writes `state` into `dir` atomically.
///
/// # Errors
/// [`StateError::Io`] naming the step that failed; the previous file stays.
pub fn save(dir: &Path, state: &State) -> Result<(), StateError> {
    fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError + use<> {
        let path = path.to_path_buf();
        move |source| StateError::Io { op, path, source }
    }
    std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
    let path = dir.join(FILE_NAME);
    let tmp = dir.join(format!(".{FILE_NAME}.tmp"));
    let text = serde_json::to_vec_pretty(state).map_err(|e| StateError::Io {
        op: "encoding",
        path: path.clone(),
        source: e.into(),
    })?;
    {
        let mut f = std::fs::File::create(&tmp).map_err(io("creating", &tmp))?;
        f.write_all(&text).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("syncing", &tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io("renaming into place", &path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing", dir))?;
    Ok(())
}

/// Forgets the saved state (after a detach: the next start begins from
/// the configuration file).
///
/// # Errors
/// The file exists but cannot be removed.
pub fn remove(dir: &Path) -> Result<(), StateError> {
    let path = dir.join(FILE_NAME);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io {
            op: "removing",
            path,
            source,
        }),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damaged_file_is_set_aside() {
        let dir = std::env::temp_dir().join(format!("splitter-state-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load(&dir).unwrap(), None);
        let mut s = State {
            format: FORMAT,
            ..Default::default()
        };
        s.weights
            .entry("web".into())
            .or_default()
            .insert("blue".into(), 30);
        save(&dir, &s).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(s));
        std::fs::write(dir.join(FILE_NAME), b"{ not json").unwrap();
        match load(&dir) {
            Err(StateError::Damaged { moved_to, .. }) => assert!(moved_to.exists()),
            other => panic!("expected Damaged, got {other:?}"),
        }
        assert!(!dir.join(FILE_NAME).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
