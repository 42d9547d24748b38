//! A real Prometheus server (Debian's `prometheus` package,
//! `/usr/bin/prometheus`; `cargo xtask setup` installs it) and an exporter
//! it scrapes, both inside a test namespace, for the external metric of
//! `[service.analysis]`.
//!
//! - [`Exporter`]: a thread serving `/metrics` in the Prometheus text
//!   format: `http_requests_total{service="web",version=...,code=...}`
//!   counters with a known 5xx ratio per version ([`exposition`]).
//! - [`Prometheus`]: `/usr/bin/prometheus` scraping one target every
//!   second, with its config, data and log in a temporary directory;
//!   stopped on drop (or on [`Prometheus::stop`]), its log printed if the
//!   test is failing.
//! - [`free_port`], [`http_get`]: a loopback port nobody uses in a
//!   namespace, and a raw HTTP `GET` from inside one.
//!
//! ```no_run
//! use splitter_tests::{netns::Netns, prometheus::*};
//! # fn main() -> anyhow::Result<()> {
//! let ns = Netns::new("spl-doc-prom")?;
//! let exporter_addr = format!("127.0.0.1:{}", free_port(&ns)?);
//! let prom_addr = format!("127.0.0.1:{}", free_port(&ns)?);
//! let _exporter = Exporter::start(&ns, &exporter_addr)?;
//! let mut prometheus = Prometheus::start(&ns, &prom_addr, &exporter_addr)?;
//! prometheus.wait_ready(&ns, &prom_addr)?;
//! # Ok(()) }
//! ```
use std::{
    fs::File,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{Child, Netns};

/// The Prometheus binary of the Debian package.
pub const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// Longest wait for Prometheus to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest life of the exporter thread, whatever happens to the test.
pub const EXPORTER_LIFETIME: Duration = Duration::from_secs(300);
/// Read and write timeout of every exchange here.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// Time between SIGTERM and SIGKILL when Prometheus stops.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// The 5xx ratio of one version, as an instant ratio of counters: exactly
/// 0.25 for `green` and 0 for `blue` with [`Exporter`]'s counters.
pub const RATIO_QUERY: &str = r#"sum(http_requests_total{service="{service}",version="{version}",code=~"5.."}) / sum(http_requests_total{service="{service}",version="{version}"})"#;

/// A loopback TCP port that nothing listens on in `ns` right now (the
/// kernel's pick for port 0, released again). Only this test uses the
/// namespace, so nothing else takes it before the caller binds it.
///
/// # Errors
/// The namespace could not be joined or nothing could be bound.
pub fn free_port(ns: &Netns) -> Result<u16> {
    let port = ns
        .enter(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))?
        .with_context(|| format!("binding a free loopback port in {}", ns.name()))?
        .port();
    Ok(port)
}

/// A `/metrics` endpoint on a thread: request counters of service `web`.
/// Version `green` serves 3 answers with code 200 for each one with code
/// 500, and its counters grow by 3 and 1 at every scrape, so both its
/// instant ratio and its rate ratio are exactly 0.25. Version `blue`'s
/// counters stay put (500 answers, no errors): ratio 0, and a rate ratio of
/// 0/0. Stopped on drop (or after [`EXPORTER_LIFETIME`]).
#[derive(Debug)]
pub struct Exporter {
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    /// Binds `addr` (`IP:PORT`) in `ns` and serves until dropped.
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start(ns: &Netns, addr: &str) -> Result<Self> {
        Self::start_with(ns, addr, exposition)
    }

    /// [`Exporter::start`] serving `exposition(k)` at the `k`-th scrape
    /// (another set of counters, such as [`crate::rollouts::half_errors_exposition`]).
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start_with(ns: &Netns, addr: &str, exposition: fn(u64) -> String) -> Result<Self> {
        let listener = ns
            .enter(|| TcpListener::bind(addr))?
            .with_context(|| format!("binding the exporter on {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicU64::new(0));
        let (flag, count) = (Arc::clone(&stop), Arc::clone(&scrapes));
        let thread = thread::spawn(move || {
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) && started.elapsed() < EXPORTER_LIFETIME {
                match listener.accept() {
                    Ok((s, _)) => {
                        // One request per connection, answered in turn:
                        // Prometheus scrapes once a second.
                        let _ = serve(s, &count, exposition);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(50)),
                }
            }
        });
        Ok(Self {
            stop,
            scrapes,
            thread: Some(thread),
        })
    }

    /// Scrapes served so far.
    pub fn scrapes(&self) -> u64 {
        self.scrapes.load(Ordering::Relaxed)
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The exposition of the [`Exporter`] after `k` scrapes.
pub fn exposition(k: u64) -> String {
    let mut out = String::from(
        "# HELP http_requests_total HTTP requests answered.\n# TYPE http_requests_total counter\n",
    );
    for (version, code, value) in [
        ("green", "200", 3000 + 3 * k),
        ("green", "500", 1000 + k),
        ("blue", "200", 500),
        ("blue", "500", 0),
    ] {
        out.push_str(&format!(
            "http_requests_total{{service=\"web\",version=\"{version}\",code=\"{code}\"}} {value}\n"
        ));
    }
    out
}

fn serve(
    mut s: TcpStream,
    count: &AtomicU64,
    exposition: fn(u64) -> String,
) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let (status, body) = if head.starts_with(b"GET /metrics ") {
        let k = count.fetch_add(1, Ordering::Relaxed);
        ("200 OK", exposition(k))
    } else {
        ("404 Not Found", String::new())
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Prometheus running in a namespace, with its config, data and log in a
/// temporary directory; stopped (SIGTERM, then SIGKILL) on drop, and its
/// log printed if the test is failing.
#[derive(Debug)]
pub struct Prometheus {
    child: Child,
    log: PathBuf,
    // Removed after the process is gone (fields drop after `drop`).
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus in `ns`, listening on `listen` (`IP:PORT`) and
    /// scraping `target` (`IP:PORT`, path `/metrics`) every second.
    ///
    /// # Errors
    /// The binary is missing or could not be started.
    pub fn start(ns: &Netns, listen: &str, target: &str) -> Result<Self> {
        ensure!(
            Path::new(PROMETHEUS_BIN).is_file(),
            "{PROMETHEUS_BIN} is missing: install the Debian package prometheus (cargo xtask setup does)"
        );
        let dir = tempfile::Builder::new()
            .prefix("splitter-prometheus-")
            .tempdir()?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: exporter\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )?;
        let log = dir.path().join("prometheus.log");
        let mut cmd = ns.command(PROMETHEUS_BIN);
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let child = Child::spawn(&mut cmd)?;
        Ok(Self {
            child,
            log,
            _dir: dir,
        })
    }

    /// The last 30 lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until `/-/ready` on `addr` answers 200 (or the process dies),
    /// at most [`READY_TIMEOUT`].
    ///
    /// # Errors
    /// It exited or was not ready in time (the message holds its log).
    pub fn wait_ready(&mut self, ns: &Netns, addr: &str) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "prometheus exited ({status}) before it was ready:\n{}",
                    self.log_tail()
                );
            }
            match http_get(ns, addr, "/-/ready") {
                Ok(answer) if answer.starts_with("HTTP/1.1 200") => return Ok(()),
                Ok(answer) => last = answer.lines().next().unwrap_or_default().to_string(),
                Err(e) => last = format!("{e:#}"),
            }
            thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "prometheus was not ready within {READY_TIMEOUT:?} (last: {last}):\n{}",
            self.log_tail()
        )
    }

    /// Stops it now (SIGTERM, SIGKILL after [`STOP_GRACE`]) and waits for
    /// the process to be gone: its port is closed when this returns.
    ///
    /// # Errors
    /// `waitpid` failed.
    pub fn stop(&mut self) -> Result<()> {
        self.child.terminate(STOP_GRACE)?;
        Ok(())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Err(e) = self.child.terminate(STOP_GRACE) {
            eprintln!("warning: stopping prometheus: {e:#}");
        }
        if thread::panicking() {
            eprintln!("prometheus log (last lines):\n{}", self.log_tail());
        }
    }
}

/// A raw `GET path` to `addr` (`IP:PORT`) from inside `ns`: the whole
/// answer, head and body.
///
/// # Errors
/// No connection or no complete answer within [`IO_TIMEOUT`].
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> Result<String> {
    let addr: SocketAddr = addr.parse()?;
    ns.enter(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_keeps_green_at_a_quarter() {
        for k in [0, 1, 7] {
            let text = exposition(k);
            let value = |version: &str, code: &str| -> f64 {
                let series = format!(
                    "http_requests_total{{service=\"web\",version=\"{version}\",code=\"{code}\"}} "
                );
                text.lines()
                    .find_map(|l| l.strip_prefix(series.as_str()))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN)
            };
            let green = value("green", "500") / (value("green", "200") + value("green", "500"));
            let blue = value("blue", "500") / (value("blue", "200") + value("blue", "500"));
            assert_eq!((green, blue), (0.25, 0.0), "after {k} scrapes:\n{text}");
        }
    }
}
