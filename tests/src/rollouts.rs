//! Helpers of the rollout tests (`tests/tests/rollout*.rs`): the rollout's
//! report and the service's weights as the CLI prints them, a server that
//! accepts then resets, an exporter with a 5xx ratio of one half for
//! `green`, and a deploy hook that hands each backend to the test to
//! "restart as a new version".
//!
//! ```no_run
//! use splitter_tests::rollouts::DeployHook;
//! # fn main() -> anyhow::Result<()> {
//! let hook = DeployHook::new()?;
//! // splitter rollout start web --to blue --strategy rolling --hook <hook.script()>
//! for backend in hook.requests()? {
//!     // ... restart the server at `backend`, then:
//!     hook.done(&backend)?;
//! }
//! # Ok(()) }
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{ErrorKind, Read},
    net::{SocketAddrV4, TcpListener},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{netns::Netns, splitter::Daemon};

/// The rollout's report, as `splitter rollout status SERVICE --output
/// json` prints it.
///
/// # Errors
/// The CLI failed or printed no JSON.
pub fn rollout(daemon: &Daemon, service: &str) -> Result<Value> {
    let out = daemon.cli_ok(&["rollout", "status", service, "--output", "json"])?;
    serde_json::from_str(&out).with_context(|| format!("not JSON: {out}"))
}

/// The weight of every version of the first service (`web`), from
/// `splitter status`.
///
/// # Errors
/// The CLI failed or its JSON lacks the fields.
pub fn weights(daemon: &Daemon) -> Result<BTreeMap<String, u64>> {
    let st = daemon.status_json()?;
    st["services"][0]["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .map(|v| {
            Ok((
                v["name"].as_str().context("name")?.to_string(),
                v["weight"].as_u64().context("weight")?,
            ))
        })
        .collect()
}

/// One version of the first service in `splitter status --output json`.
///
/// # Errors
/// The CLI failed, or no such version.
pub fn version_status(daemon: &Daemon, version: &str) -> Result<Value> {
    let st = daemon.status_json()?;
    st["services"][0]["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .find(|v| v["name"] == version)
        .cloned()
        .with_context(|| format!("no version {version} in {st}"))
}

/// Polls `check` every 100 ms until it passes, at most `within`.
///
/// # Errors
/// The last error of `check`, once `within` passed.
pub fn eventually<T>(within: Duration, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let started = Instant::now();
    loop {
        match check() {
            Ok(v) => return Ok(v),
            Err(e) if started.elapsed() >= within => {
                return Err(e.context(format!("still not so after {within:?}")));
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A server that accepts every connection, waits up to 200 ms for a first
/// read, then resets it (`SO_LINGER` 0): a TCP health check passes, every
/// real connection is reset by the backend. Stopped on drop.
#[derive(Debug)]
pub struct ResettingServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ResettingServer {
    /// Binds `addr` in `ns` and starts resetting.
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start(ns: &Netns, addr: SocketAddrV4) -> Result<Self> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(3600) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let sock = socket2::Socket::from(s);
                        let _ = sock.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 64];
                        let _ = Read::read(&mut &sock, &mut buf);
                        let _ = sock.set_linger(Some(Duration::ZERO));
                        drop(sock);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ResettingServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A [`crate::prometheus::Exporter`] with `green` answering one 500 for
/// each 200 (5xx ratio exactly 0.5, its counters growing by 1 and 1 at
/// every scrape) and `blue` none (ratio 0). Query it with
/// [`crate::prometheus::RATIO_QUERY`]. Stopped on drop.
pub struct HalfErrorsExporter;

impl HalfErrorsExporter {
    /// Binds `addr` (`IP:PORT`) in `ns` and serves until dropped.
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start(ns: &Netns, addr: &str) -> Result<crate::prometheus::Exporter> {
        crate::prometheus::Exporter::start_with(ns, addr, half_errors_exposition)
    }
}

/// The counters of a [`HalfErrorsExporter`] after `k` scrapes.
pub fn half_errors_exposition(k: u64) -> String {
    let mut out = String::from(
        "# HELP http_requests_total HTTP requests answered.\n# TYPE http_requests_total counter\n",
    );
    for (version, code, value) in [
        ("green", "200", 1000 + k),
        ("green", "500", 1000 + k),
        ("blue", "200", 500 + 10 * k),
        ("blue", "500", 0),
    ] {
        out.push_str(&format!(
            "http_requests_total{{service=\"web\",version=\"{version}\",code=\"{code}\"}} {value}\n"
        ));
    }
    out
}

/// A rolling update's deploy hook that hands each backend to the test: a
/// shell script in a temporary directory which saves its `SPLITTER_*`
/// environment to `<dir>/<backend>.env`, asks with `<dir>/<backend>.req`,
/// and exits 0 once the test created `<dir>/<backend>.done` (at most
/// `wait_secs` later; then it exits 1). [`DeployHook::failing`] is a hook
/// that always exits 1. The directory is removed on drop.
#[derive(Debug)]
pub struct DeployHook {
    dir: tempfile::TempDir,
    script: PathBuf,
    handled: std::sync::Mutex<BTreeSet<String>>,
}

impl DeployHook {
    /// The handing-over hook, waiting at most 10 s for the test.
    ///
    /// # Errors
    /// The directory or the script could not be written.
    pub fn new() -> Result<Self> {
        Self::with_body(
            "for i in $(seq 100); do [ -e \"$d/$SPLITTER_BACKEND.done\" ] && exit 0; sleep 0.1; done\nexit 1\n",
        )
    }

    /// A hook that records its call like [`DeployHook::new`] and exits 1.
    ///
    /// # Errors
    /// The directory or the script could not be written.
    pub fn failing() -> Result<Self> {
        Self::with_body("echo 'deploy failed' >&2\nexit 1\n")
    }

    fn with_body(body: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("splitter-hook-")
            .tempdir()
            .context("creating a temp dir")?;
        let script = dir.path().join("deploy.sh");
        let text = format!(
            "#!/bin/sh\nd='{}'\nenv | grep '^SPLITTER_' > \"$d/$SPLITTER_BACKEND.env\"\n\
             echo \"$SPLITTER_BACKEND\" > \"$d/$SPLITTER_BACKEND.tmp\" && mv \"$d/$SPLITTER_BACKEND.tmp\" \"$d/$SPLITTER_BACKEND.req\"\n{body}",
            dir.path().display()
        );
        std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(Self {
            dir,
            script,
            handled: Default::default(),
        })
    }

    /// The script's path (the `--hook` argument).
    pub fn script(&self) -> &Path {
        &self.script
    }

    /// Backends whose hook asked and that were not returned before, in
    /// the order of their names.
    ///
    /// # Errors
    /// The directory could not be read.
    pub fn requests(&self) -> Result<Vec<String>> {
        let mut handled = self.handled.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = Vec::new();
        for e in std::fs::read_dir(self.dir.path())? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(backend) = name.strip_suffix(".req")
                && handled.insert(backend.to_string())
            {
                new.push(backend.to_string());
            }
        }
        new.sort();
        Ok(new)
    }

    /// Lets the hook of `backend` exit 0.
    ///
    /// # Errors
    /// The file could not be created.
    pub fn done(&self, backend: &str) -> Result<()> {
        let p = self.dir.path().join(format!("{backend}.done"));
        std::fs::write(&p, b"").with_context(|| format!("writing {}", p.display()))
    }

    /// The `SPLITTER_*` environment the hook of `backend` was run with.
    ///
    /// # Errors
    /// The hook did not run for it.
    pub fn env_of(&self, backend: &str) -> Result<BTreeMap<String, String>> {
        let p = self.dir.path().join(format!("{backend}.env"));
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Every backend the hook was called for so far.
    ///
    /// # Errors
    /// The directory could not be read.
    pub fn called_for(&self) -> Result<BTreeSet<String>> {
        let mut all = BTreeSet::new();
        for e in std::fs::read_dir(self.dir.path())? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(backend) = name.strip_suffix(".req") {
                all.insert(backend.to_string());
            }
        }
        Ok(all)
    }
}
