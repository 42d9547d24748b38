//! Network namespaces and child processes, each behind a guard that cleans
//! up on `Drop`, plus the checked command runner every other module uses.
//!
//! - [`Netns`]: `ip netns add` on creation, `ip netns del` on drop. Run a
//!   command inside it ([`Netns::exec`], [`Netns::spawn`]), or run Rust code
//!   whose sockets must live in it ([`Netns::enter`]).
//! - [`Child`]: a spawned process that is killed when the guard drops.
//! - [`run_prefix`]: a per-process, per-call unique prefix for namespace
//!   names, so tests and a demo can run side by side; [`remove_stale`]
//!   deletes what a killed run left behind.
//! - [`run`]: runs a command with a time bound and turns a failure into an
//!   error that quotes the command and its stderr.
//!
//! ```no_run
//! use splitter_tests::netns::{Netns, run_prefix};
//! # fn main() -> anyhow::Result<()> {
//! let ns = Netns::new(format!("{}-demo", run_prefix()))?;
//! let links = ns.exec("ip", &["-o", "link"])?;
//! let fd_in_ns = ns.enter(|| std::net::UdpSocket::bind("127.0.0.1:0"))??;
//! # drop((links, fd_in_ns)); Ok(()) }
//! ```
use std::{
    fs::File,
    io::Read,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Where `ip netns add` puts a namespace's handle.
pub const NETNS_DIR: &str = "/run/netns";

/// Longest a checked command ([`run`]) may take before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Every namespace name this crate makes starts with this.
pub const PREFIX_ROOT: &str = "spl-";

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A prefix unique to this process and call, like `spl-4242-0`.
///
/// Namespace names have no length limit; interface names (15 characters at
/// most) never include the prefix.
pub fn run_prefix() -> String {
    format!(
        "{PREFIX_ROOT}{}-{}",
        std::process::id(),
        RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// The captured result of a finished command.
#[derive(Debug, Clone)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout (lossy UTF-8).
    pub stdout: String,
    /// Everything it wrote to stderr (lossy UTF-8).
    pub stderr: String,
}

/// A command line as a person would type it, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion (stdin closed), killing it after `timeout`.
///
/// # Errors
/// The program could not be started, or it ran longer than `timeout`.
/// A non-zero exit is *not* an error here: see [`run`].
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{what}` (is it installed and on PATH?)"))?;
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut b);
        }
        b
    });
    let err_t = thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child
            .try_wait()
            .with_context(|| format!("waiting for `{what}`"))?
        {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{what}` did not finish within {timeout:?} and was killed");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// Runs `cmd` (bounded by [`COMMAND_TIMEOUT`]) and returns its stdout.
///
/// # Errors
/// It could not start, timed out, or exited non-zero; the message holds the
/// command line, the exit status and stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let what = describe(cmd);
    let out = output_with_timeout(cmd, COMMAND_TIMEOUT)?;
    if !out.status.success() {
        bail!("`{what}` failed ({}): {}", out.status, out.stderr.trim());
    }
    Ok(out.stdout)
}

/// Runs `ip ARGS...` in the current (root) namespace.
///
/// # Errors
/// As [`run`].
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Whether `prog` is an executable file somewhere on `PATH`.
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// Switches the calling thread to the network namespace behind `path`.
fn setns_this_thread(path: &Path) -> Result<()> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: `f` is an open namespace file for the duration of the call;
    // setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        bail!(
            "setns({}, CLONE_NEWNET) failed: {e} (are you root?)",
            path.display()
        );
    }
    Ok(())
}

/// A network namespace that exists as long as this guard does.
///
/// Sockets made inside it (through [`Netns::enter`]) hold a reference to
/// the namespace: close them (stop the servers) before the guard drops, or
/// the kernel keeps the namespace alive, nameless, until they are closed.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// `ip netns add NAME`, then brings `lo` up.
    ///
    /// # Errors
    /// Not root, no netns support, or the name is taken (a stale run: see
    /// [`remove_stale`]).
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        ip(&["netns", "add", &name])
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, the file `setns` opens.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// A `Command` for `ip netns exec NAME PROG`; add arguments and run it
    /// with [`run`] or [`Child::spawn`].
    pub fn command(&self, prog: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, prog]);
        c
    }

    /// Runs `PROG ARGS...` inside the namespace and returns its stdout.
    ///
    /// # Errors
    /// As [`run`]: the message quotes the command and its stderr.
    pub fn exec(&self, prog: &str, args: &[&str]) -> Result<String> {
        run(self.command(prog).args(args))
    }

    /// `ip -n NAME ARGS...`.
    ///
    /// # Errors
    /// As [`run`].
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        run(&mut c)
    }

    /// Starts `PROG ARGS...` inside the namespace (stdin and stdout closed,
    /// stderr inherited); the process is killed when the guard drops.
    ///
    /// # Errors
    /// The process could not be started.
    pub fn spawn(&self, prog: &str, args: &[&str]) -> Result<Child> {
        let mut c = self.command(prog);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        Child::spawn(&mut c)
    }

    /// Runs `f` on a fresh thread that has joined this namespace, and
    /// returns its result. Sockets made in `f` stay in the namespace and can
    /// be used from any thread afterwards; threads spawned inside `f` start
    /// in the namespace too. A panic in `f` is resumed on the caller.
    ///
    /// # Errors
    /// The namespace could not be joined.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        let joined = thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                setns_this_thread(&path)?;
                Ok(f())
            })
            .join()
        });
        match joined {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Sets a sysctl inside the namespace, like `sysctl -w KEY=VALUE`.
    ///
    /// # Errors
    /// Unknown key or refused value.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        sysctl(self, key, value)
    }

    /// The namespace's `/proc/net/snmp` counters, keyed `"Tcp.InCsumErrors"`.
    ///
    /// # Errors
    /// The file could not be read or parsed.
    pub fn snmp(&self) -> Result<Vec<(String, u64)>> {
        let text = self.exec("cat", &["/proc/net/snmp"])?;
        parse_snmp(&text)
    }

    /// `InCsumErrors` of TCP and UDP in this namespace: packets the stack
    /// received and dropped for a bad checksum.
    ///
    /// # Errors
    /// As [`Netns::snmp`].
    pub fn csum_errors(&self) -> Result<CsumErrors> {
        csum_errors(self)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "warning: could not remove network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// Sets `KEY=VALUE` (dotted, like `net.ipv4.ip_forward`) in `ns`.
///
/// Written through `/proc/sys` from a thread inside the namespace, so it
/// needs no `sysctl` binary.
///
/// # Errors
/// Unknown key or refused value.
pub fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    ns.enter(|| std::fs::write(&path, value))?.with_context(|| {
        format!(
            "sysctl {key}={value} in namespace {} ({})",
            ns.name(),
            path.display()
        )
    })
}

/// Checksum errors counted by a namespace's stack (`/proc/net/snmp`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CsumErrors {
    /// `Tcp: InCsumErrors`.
    pub tcp: u64,
    /// `Udp: InCsumErrors`.
    pub udp: u64,
}

impl CsumErrors {
    /// Both counters added.
    pub fn total(&self) -> u64 {
        self.tcp + self.udp
    }
}

/// `InCsumErrors` for TCP and UDP in `ns`.
///
/// # Errors
/// The counters could not be read or are missing.
pub fn csum_errors(ns: &Netns) -> Result<CsumErrors> {
    let counters = ns.snmp()?;
    let get = |k: &str| {
        counters
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| *v)
            .with_context(|| format!("{k} missing from /proc/net/snmp in {}", ns.name()))
    };
    Ok(CsumErrors {
        tcp: get("Tcp.InCsumErrors")?,
        udp: get("Udp.InCsumErrors")?,
    })
}

/// Parses `/proc/net/snmp`: pairs of `Proto: names...` / `Proto: values...`
/// lines into `("Proto.Name", value)`.
///
/// # Errors
/// A header line without its value line, or a value that is not a number.
pub fn parse_snmp(text: &str) -> Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(head) = lines.next() {
        let Some((proto, names)) = head.split_once(':') else {
            continue;
        };
        let values = lines
            .next()
            .with_context(|| format!("snmp: no value line after {proto}"))?;
        let Some((_, values)) = values.split_once(':') else {
            bail!("snmp: bad value line for {proto}")
        };
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            // Tcp MaxConn is -1: keep the counters that are counts.
            if let Ok(v) = v.parse::<u64>() {
                out.push((format!("{proto}.{n}"), v));
            }
        }
    }
    Ok(out)
}

/// The namespaces that exist now (`/run/netns`).
pub fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether a namespace called `name` exists.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// The process id in a name this crate made (`spl-PID-…`, `spl-demo-PID-…`).
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX_ROOT)?
        .split('-')
        .find(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))?
        .parse()
        .ok()
}

/// Deletes the namespaces this crate made in processes that are gone (a run
/// killed with SIGKILL cannot clean up after itself). Returns their names.
pub fn remove_stale() -> Vec<String> {
    let mut removed = Vec::new();
    for name in list() {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        if ip(&["netns", "del", &name]).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// A child process that is killed (and reaped) when the guard drops.
#[derive(Debug)]
pub struct Child {
    inner: std::process::Child,
    what: String,
    status: Option<ExitStatus>,
}

impl Child {
    /// Spawns `cmd` as configured by the caller (stdio included).
    ///
    /// # Errors
    /// The program could not be started.
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let what = describe(cmd);
        let inner = cmd
            .spawn()
            .with_context(|| format!("cannot start `{what}`"))?;
        Ok(Self {
            inner,
            what,
            status: None,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.inner.id()
    }

    /// The command line, for messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// The exit status if it has ended, without waiting.
    ///
    /// # Errors
    /// `waitpid` failed.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .inner
                .try_wait()
                .with_context(|| format!("waiting for `{}`", self.what))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to end on its own.
    ///
    /// # Errors
    /// `waitpid` failed.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) unless the process has ended.
    pub fn signal(&mut self, signal: i32) {
        if matches!(self.try_wait(), Ok(None))
            && let Ok(pid) = libc::pid_t::try_from(self.inner.id())
        {
            // SAFETY: plain kill(2) on our own child, which has not been
            // reaped yet (try_wait returned None), so the pid is still ours.
            unsafe { libc::kill(pid, signal) };
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL. Returns how it ended.
    ///
    /// # Errors
    /// `waitpid` failed.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        if let Some(s) = self.wait_timeout(grace)? {
            return Ok(s);
        }
        let _ = self.inner.kill();
        let s = self
            .inner
            .wait()
            .with_context(|| format!("reaping `{}`", self.what))?;
        self.status = Some(s);
        Ok(s)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(None)) {
            let _ = self.inner.kill();
            let _ = self.inner.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_parses_csum_errors() -> Result<()> {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm MaxConn InCsumErrors\nTcp: 1 -1 3\n\
                    Udp: InDatagrams InCsumErrors\nUdp: 10 2\n";
        let c = parse_snmp(text)?;
        assert!(c.contains(&("Tcp.InCsumErrors".to_string(), 3)));
        assert!(c.contains(&("Udp.InCsumErrors".to_string(), 2)));
        assert!(!c.iter().any(|(k, _)| k == "Tcp.MaxConn"));
        Ok(())
    }

    #[test]
    fn owner_pid_reads_both_prefix_shapes() {
        assert_eq!(owner_pid("spl-4242-0-cli"), Some(4242));
        assert_eq!(owner_pid("spl-demo-77-edge"), Some(77));
        assert_eq!(owner_pid("other-12"), None);
        assert_eq!(owner_pid("spl-x-back"), None);
    }

    #[test]
    fn run_prefix_is_unique() {
        assert_ne!(run_prefix(), run_prefix());
    }
}
