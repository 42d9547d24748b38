//! The real `splitter` binary under test: finding it, running
//! `splitter daemon` in the edge namespace, talking to it with the CLI, and
//! writing its configuration for the test topology.
//!
//! [`Daemon::start`] writes the config to a temporary directory, starts
//! `ip netns exec EDGE splitter daemon --config FILE --socket SOCK` with its
//! output in a log file, and waits (at most [`READY_TIMEOUT`]) until
//! `splitter status` answers. Dropping the handle sends SIGTERM (SIGKILL
//! after [`STOP_GRACE`]) and prints the log if the test is failing or the
//! daemon did not exit cleanly.
//!
//! ```no_run
//! use splitter_tests::{splitter::{Daemon, blue_green_config, Mode, Affinity}, topology::*};
//! # fn main() -> anyhow::Result<()> {
//! let topo = Topology::new(TopologyOptions::default())?;
//! let daemon = Daemon::start(&topo.edge, &blue_green_config(Mode::Snat, Affinity::Flow, 90, 10))?;
//! daemon.weights_set("web", &[("blue", 0), ("green", 100)])?;
//! println!("{}", daemon.status_json()?);
//! # Ok(()) }
//! ```
use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    netns::{self, Child, Netns, Output},
    topology::{self, EDGE_BACKEND_IF, EDGE_CLIENT_IF},
};

/// Longest the daemon may take to answer its first `status`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Time between SIGTERM and SIGKILL on stop.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Longest one CLI call may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(15);

/// The `splitter` binary: `$SPLITTER_BIN`, else the workspace's release
/// build, else its debug build (honouring `$CARGO_TARGET_DIR`).
///
/// # Errors
/// None of these exists; the message lists where it looked.
pub fn splitter_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SPLITTER_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("SPLITTER_BIN={} is not a file", p.display());
        }
        return Ok(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t));
    }
    dirs.push(workspace.join("target"));
    let candidates: Vec<PathBuf> = ["release", "debug"]
        .iter()
        .flat_map(|profile| dirs.iter().map(move |d| d.join(profile).join("splitter")))
        .collect();
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    let tried: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "no splitter binary: set SPLITTER_BIN or run `cargo xtask build` (looked at {})",
        tried.join(", ")
    )
}

/// Forwarding mode (`dataplane.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The edge rewrites the client's source; backends need no route back.
    Snat,
    /// The client's address reaches the backend; replies route via the edge.
    Dnat,
}

impl Mode {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snat => "snat",
            Self::Dnat => "dnat",
        }
    }
}

/// How new flows pick a version (`service.affinity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    /// Per flow (5-tuple hash).
    Flow,
    /// Per client address: one client, one version.
    ClientIp,
}

impl Affinity {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Flow => "flow",
            Self::ClientIp => "client-ip",
        }
    }
}

/// One version of a service.
#[derive(Debug, Clone)]
pub struct VersionSpec {
    /// Version name (`blue`).
    pub name: String,
    /// Relative weight.
    pub weight: u32,
    /// Backend addresses.
    pub backends: Vec<SocketAddrV4>,
}

/// One service.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    /// Service name (`web`).
    pub name: String,
    /// The VIP and port.
    pub vip: SocketAddrV4,
    /// `"tcp"` or `"udp"`.
    pub protocol: &'static str,
    /// Version choice.
    pub affinity: Affinity,
    /// The versions.
    pub versions: Vec<VersionSpec>,
}

/// A config file for the test topology (`ec` facing clients, `eb` facing
/// backends) with these services.
pub fn config_toml(mode: Mode, services: &[ServiceSpec]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "[dataplane]");
    let _ = writeln!(s, "interface = \"{EDGE_CLIENT_IF}\"");
    let _ = writeln!(s, "backend_interface = \"{EDGE_BACKEND_IF}\"");
    let _ = writeln!(s, "mode = \"{}\"", mode.as_str());
    for svc in services {
        let _ = writeln!(s, "\n[[service]]");
        let _ = writeln!(s, "name = \"{}\"", svc.name);
        let _ = writeln!(s, "vip = \"{}\"", svc.vip);
        let _ = writeln!(s, "protocol = \"{}\"", svc.protocol);
        let _ = writeln!(s, "affinity = \"{}\"", svc.affinity.as_str());
        for v in &svc.versions {
            let backends: Vec<String> = v.backends.iter().map(|b| format!("\"{b}\"")).collect();
            let _ = writeln!(s, "\n[[service.version]]");
            let _ = writeln!(s, "name = \"{}\"", v.name);
            let _ = writeln!(s, "weight = {}", v.weight);
            let _ = writeln!(s, "backends = [{}]", backends.join(", "));
        }
    }
    s
}

/// Service `web` on 10.0.0.10:80/tcp with `blue` (10.0.2.2:8080) and
/// `green` (10.0.2.3:8080) at the given weights.
pub fn blue_green_config(mode: Mode, affinity: Affinity, blue: u32, green: u32) -> String {
    let be = |last: u8| {
        SocketAddrV4::new(
            std::net::Ipv4Addr::new(10, 0, 2, last),
            topology::BACKEND_PORT,
        )
    };
    config_toml(
        mode,
        &[ServiceSpec {
            name: "web".into(),
            vip: topology::vip(),
            protocol: "tcp",
            affinity,
            versions: vec![
                VersionSpec {
                    name: "blue".into(),
                    weight: blue,
                    backends: vec![be(2)],
                },
                VersionSpec {
                    name: "green".into(),
                    weight: green,
                    backends: vec![be(3)],
                },
            ],
        }],
    )
}

/// A running `splitter daemon`, stopped on drop.
#[derive(Debug)]
pub struct Daemon {
    /// Extra `splitter daemon` arguments.
    args: Vec<String>,
    /// How the process enters the edge namespace.
    launch: Launch,
    bin: PathBuf,
    /// Edge namespace name (for messages).
    #[allow(dead_code)]
    edge: String,
    dir: tempfile::TempDir,
    socket: PathBuf,
    log: PathBuf,
    child: Child,
    stopped: Option<ExitStatus>,
}

impl Daemon {
    /// Starts the daemon in `edge` with `config_toml` and waits until it
    /// answers `status`.
    ///
    /// # Errors
    /// No binary, the daemon exited or did not answer in time (the message
    /// includes its log).
    pub fn start(edge: &Netns, config_toml: &str) -> Result<Self> {
        Self::start_with(edge, config_toml, &splitter_bin()?)
    }

    /// [`Daemon::start`] with extra `splitter daemon` arguments (for
    /// example `--on-stop keep`), kept for [`Daemon::restart`] too.
    ///
    /// # Errors
    /// As [`Daemon::start`].
    pub fn start_with_args(edge: &Netns, config_toml: &str, args: &[&str]) -> Result<Self> {
        Self::start_full(edge, config_toml, &splitter_bin()?, args)
    }

    /// [`Daemon::start`] with an explicit binary.
    ///
    /// # Errors
    /// As [`Daemon::start`].
    pub fn start_with(edge: &Netns, config_toml: &str, bin: &Path) -> Result<Self> {
        Self::start_full(edge, config_toml, bin, &[])
    }

    fn start_full(edge: &Netns, config_toml: &str, bin: &Path, args: &[&str]) -> Result<Self> {
        Self::start_launched(edge, config_toml, bin, args, Launch::NetnsExec)
    }

    /// [`Daemon::start_with_args`], started the way docs/operations.md
    /// shows for a data plane that outlives its daemon: `nsenter
    /// --net=/run/netns/EDGE`, in the host's mount namespace (so its pins
    /// are on the host's bpffs), without `--ephemeral-pins`.
    ///
    /// # Errors
    /// As [`Daemon::start`].
    pub fn start_nsenter(edge: &Netns, config_toml: &str, args: &[&str]) -> Result<Self> {
        Self::start_launched(edge, config_toml, &splitter_bin()?, args, Launch::Nsenter)
    }

    fn start_launched(
        edge: &Netns,
        config_toml: &str,
        bin: &Path,
        args: &[&str],
        launch: Launch,
    ) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("splitter-test-")
            .tempdir()
            .context("creating a temp dir")?;
        let config = dir.path().join("splitter.toml");
        let socket = dir.path().join("splitter.sock");
        let log = dir.path().join("daemon.log");
        std::fs::write(&config, config_toml)
            .with_context(|| format!("writing {}", config.display()))?;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = spawn_daemon(edge, bin, dir.path(), &log, &args, launch)?;
        let mut d = Self {
            args,
            launch,
            bin: bin.to_path_buf(),
            edge: edge.name().to_string(),
            dir,
            socket,
            log,
            child,
            stopped: None,
        };
        d.wait_ready()?;
        Ok(d)
    }

    /// Kills the daemon with SIGKILL (no clean-up at all), then starts a new
    /// one with the same config, socket and state directory and waits until
    /// it answers. What the data plane does in between is the test's to check.
    ///
    /// # Errors
    /// The new daemon did not come up (its log is in the message).
    pub fn kill9_and_restart(&mut self, edge: &Netns) -> Result<()> {
        self.child.signal(libc::SIGKILL);
        let _ = self.child.wait_timeout(STOP_GRACE)?;
        self.restart(edge)
    }

    /// Starts the daemon again after it stopped (same config, socket, state
    /// directory and arguments) and waits until it answers.
    ///
    /// # Errors
    /// The new daemon did not come up (its log is in the message).
    pub fn restart(&mut self, edge: &Netns) -> Result<()> {
        self.child = spawn_daemon(
            edge,
            &self.bin,
            self.dir.path(),
            &self.log,
            &self.args,
            self.launch,
        )?;
        self.stopped = None;
        self.wait_ready()
    }

    /// Replaces the extra `splitter daemon` arguments of the next
    /// [`Daemon::restart`]: `--program PATH` upgrades the kernel program.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            if let Some(status) = self.child.try_wait()? {
                self.stopped = Some(status);
                bail!(
                    "splitter daemon exited during start-up ({status}); its log:\n{}",
                    self.log()
                );
            }
            match self.cli(&["status", "--output", "json"]) {
                Ok(o) if o.status.success() => {
                    if serde_json::from_str::<serde_json::Value>(&o.stdout).is_ok() {
                        return Ok(());
                    }
                    last = format!("status printed no JSON: {}", o.stdout);
                }
                Ok(o) => last = o.stderr.trim().to_string(),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() >= deadline {
                let _ = self.child.terminate(STOP_GRACE);
                bail!(
                    "splitter daemon did not answer `status` within {READY_TIMEOUT:?} (last: {last}); its log:\n{}",
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Process id of the running daemon.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The temp dir holding config, socket and log (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The binary in use.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Runs `splitter --socket SOCK ARGS...` (from the root namespace: the
    /// socket is a path, reachable from any network namespace).
    ///
    /// # Errors
    /// The CLI could not run or took longer than [`CLI_TIMEOUT`]; a non-zero
    /// exit is returned, not an error.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut c = Command::new(&self.bin);
        c.arg("--socket").arg(&self.socket).args(args);
        netns::output_with_timeout(&mut c, CLI_TIMEOUT)
    }

    /// [`Daemon::cli`] for commands that run longer (`rollout status
    /// --watch`): killed after `timeout`.
    ///
    /// # Errors
    /// The CLI could not run or took longer than `timeout`.
    pub fn cli_for(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let mut c = Command::new(&self.bin);
        c.arg("--socket").arg(&self.socket).args(args);
        netns::output_with_timeout(&mut c, timeout)
    }

    /// [`Daemon::cli`] that must exit 0; returns stdout.
    ///
    /// # Errors
    /// Non-zero exit (the message holds stderr).
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let o = self.cli(args)?;
        if !o.status.success() {
            bail!(
                "`splitter {}` failed ({}): {}",
                args.join(" "),
                o.status,
                o.stderr.trim()
            );
        }
        Ok(o.stdout)
    }

    /// `splitter status --output json`, parsed.
    ///
    /// # Errors
    /// The command failed or printed something else than JSON.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = self.cli_ok(&["status", "--output", "json"])?;
        serde_json::from_str(&out).with_context(|| format!("status output is not JSON: {out}"))
    }

    /// Waits (at most `within`, polling every 10 ms) until the status
    /// reports the health of backend `addr` of `service` as `want`
    /// (`"up"`, `"down"`); returns how long that took.
    ///
    /// # Errors
    /// The status failed, lacks the backend, or the wait ran out.
    pub fn wait_health(
        &self,
        service: &str,
        addr: SocketAddrV4,
        want: &str,
        within: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let status = self.status_json()?;
            if status_backend(&status, service, addr)?["health"] == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!("{addr} is not {want} after {within:?}: {status}");
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `splitter weights set SERVICE V=W ...`; returns its stdout.
    ///
    /// # Errors
    /// The daemon refused.
    pub fn weights_set(&self, service: &str, weights: &[(&str, u32)]) -> Result<String> {
        let pairs: Vec<String> = weights.iter().map(|(v, w)| format!("{v}={w}")).collect();
        let mut args = vec!["weights", "set", service];
        args.extend(pairs.iter().map(String::as_str));
        self.cli_ok(&args)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM (SIGKILL after [`STOP_GRACE`]) and returns how it exited;
    /// by contract a clean stop exits 0.
    ///
    /// # Errors
    /// `waitpid` failed.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(s) = self.stopped {
            return Ok(s);
        }
        let s = self.child.terminate(STOP_GRACE)?;
        self.stopped = Some(s);
        Ok(s)
    }
}

/// Starts `splitter daemon` in `edge` with the config, socket and state
/// directory inside `dir`, appending its output to `log`.
/// How a test daemon enters the edge namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launch {
    /// `ip netns exec EDGE`: a mount namespace of its own with a fresh
    /// `/sys`, so a default pin_dir is on a bpffs private to the process
    /// (`--ephemeral-pins` accepts that; the pins go with the process,
    /// which is how most tests clean up).
    NetnsExec,
    /// `nsenter --net=/run/netns/EDGE`: the network namespace only; the
    /// pins are on the host's bpffs and outlive the process.
    Nsenter,
}

fn spawn_daemon(
    edge: &Netns,
    bin: &Path,
    dir: &Path,
    log: &Path,
    args: &[String],
    launch: Launch,
) -> Result<Child> {
    let log_out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let log_err = log_out.try_clone()?;
    let mut cmd = match launch {
        Launch::NetnsExec => edge.command(&bin.to_string_lossy()),
        Launch::Nsenter => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", edge.path().display()))
                .arg("--")
                .arg(bin);
            c
        }
    };
    cmd.arg("daemon");
    if launch == Launch::NetnsExec {
        cmd.arg("--ephemeral-pins");
    }
    cmd.arg("--config")
        .arg(dir.join("splitter.toml"))
        .arg("--socket")
        .arg(dir.join("splitter.sock"))
        // Every daemon its own state: weights saved by one test must not
        // leak into the next.
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_out)
        .stderr(log_err);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    Child::spawn(&mut cmd)
}

/// A bpffs mounted on a temporary directory of the host's mount namespace,
/// for tests whose pinned data plane must outlive one daemon process
/// (`ip netns exec` gives each process its own `/sys`, so pins under
/// `/sys/fs/bpf` vanish with it). Unmounted on drop, which releases every
/// pin below it: the XDP links detach and the maps are freed.
#[derive(Debug)]
pub struct BpfMount {
    dir: tempfile::TempDir,
}

impl BpfMount {
    /// Mounts a fresh bpffs.
    ///
    /// # Errors
    /// `mount` failed (not root?).
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("splitter-bpffs-")
            .tempdir()
            .context("creating a temp dir")?;
        netns::run(
            Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(dir.path()),
        )?;
        Ok(Self { dir })
    }

    /// A pin directory inside it.
    pub fn pin_dir(&self) -> PathBuf {
        self.dir.path().join("splitter")
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// `config_toml` with `dataplane.pin_dir` set to `dir`.
pub fn with_pin_dir(config_toml: &str, dir: &Path) -> String {
    config_toml.replacen(
        "[dataplane]\n",
        &format!("[dataplane]\npin_dir = \"{}\"\n", dir.display()),
        1,
    )
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let status = self.stop();
        let clean = matches!(&status, Ok(s) if s.success());
        if thread::panicking() || !clean {
            let how = match &status {
                Ok(s) => s.to_string(),
                Err(e) => format!("{e:#}"),
            };
            eprintln!(
                "---- splitter daemon log ({how}) ----\n{}---- end of daemon log ----",
                self.log()
            );
        }
    }
}

/// The backend `addr` of service `service` in a [`Daemon::status_json`]
/// report.
///
/// # Errors
/// No such service, or no such backend in it.
pub fn status_backend<'a>(
    status: &'a serde_json::Value,
    service: &str,
    addr: SocketAddrV4,
) -> Result<&'a serde_json::Value> {
    let svc = status["services"]
        .as_array()
        .context("no services")?
        .iter()
        .find(|s| s["name"] == service)
        .with_context(|| format!("no service {service} in {status}"))?;
    svc["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .flat_map(|v| v["backends"].as_array().into_iter().flatten())
        .find(|b| b["address"] == addr.to_string())
        .with_context(|| format!("no backend {addr} in {svc}"))
}

/// Creates a BPF map of the given type, key and value sizes and capacity
/// (`BPF_MAP_CREATE`; a plain hash without preallocation) and pins it at
/// `path`, as a build with another map layout would have left it.
///
/// # Errors
/// The kernel refused the map or the pin.
pub fn pin_foreign_map(
    path: &Path,
    map_type: u32,
    key: u32,
    value: u32,
    entries: u32,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    let flags = if map_type == BPF_MAP_TYPE_HASH {
        BPF_F_NO_PREALLOC
    } else {
        0
    };
    let mut attr = [0u32; 32];
    attr[..5].copy_from_slice(&[map_type, key, value, entries, flags]);
    // SAFETY: BPF_MAP_CREATE (0) with a zeroed attr holding the five first fields.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let mut pin = [0u64; 4];
    pin[0] = cpath.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN (6): pathname, bpf_fd.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), std::mem::size_of_val(&pin)) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor we created; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
    if rc != 0 {
        bail!("BPF_OBJ_PIN {}: {err}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_renders_every_field() {
        let c = blue_green_config(Mode::Dnat, Affinity::ClientIp, 90, 10);
        for want in [
            "interface = \"ec\"",
            "backend_interface = \"eb\"",
            "mode = \"dnat\"",
            "vip = \"10.0.0.10:80\"",
            "affinity = \"client-ip\"",
            "weight = 90",
            "backends = [\"10.0.2.3:8080\"]",
        ] {
            assert!(c.contains(want), "{want} missing from\n{c}");
        }
    }
}
