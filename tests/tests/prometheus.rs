//! The external metric of `[service.analysis]` against a real Prometheus
//! server (Debian's `prometheus` package, `/usr/bin/prometheus`; `cargo
//! xtask setup` installs it): `splitter::signals::external::query` reads
//! the exact 5xx ratio of a version that an exporter in the test counts,
//! both as an instant ratio of counters and as a ratio of rates, and turns
//! every other outcome into its own error: an unreachable server, no series,
//! bad PromQL (with Prometheus's own text), several series, NaN.
//!
//! Everything runs inside a namespace of its own with only `lo`: the
//! exporter (a thread of this test serving `/metrics` in the Prometheus
//! text format), Prometheus scraping it every second with its data in a
//! temporary directory, and the queries (a tokio runtime on a thread that
//! joined the namespace). A Prometheus that the package may have started on
//! the host (`:9090`) is not involved. Privileged, so `#[ignore]`d for a
//! plain `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test prometheus -- --include-ignored --test-threads=1
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
use splitter::{
    config::AnalysisConfig,
    signals::external::{self, MetricError},
};
use splitter_tests::netns::{Child, Netns, run_prefix};

const PROMETHEUS_BIN: &str = "/usr/bin/prometheus";
/// Inside the test's namespace: nothing else listens there.
const PROMETHEUS_ADDR: &str = "127.0.0.1:19090";
const EXPORTER_ADDR: &str = "127.0.0.1:19100";
/// A port nothing listens on in the namespace.
const NOBODY_ADDR: &str = "127.0.0.1:19091";
/// Longest wait for Prometheus to be ready and to have scraped.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for enough samples for a `rate()` over `RATE_RANGE`.
const RATE_TIMEOUT: Duration = Duration::from_secs(30);
/// The range of the rate queries (five scrapes at 1 s).
const RATE_RANGE: &str = "5s";
/// Longest life of the exporter thread, whatever happens to the test.
const EXPORTER_LIFETIME: Duration = Duration::from_secs(300);
const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The 5xx ratio of one version, as an instant ratio of counters.
const RATIO: &str = r#"sum(http_requests_total{service="{service}",version="{version}",code=~"5.."}) / sum(http_requests_total{service="{service}",version="{version}"})"#;

fn rate_ratio() -> String {
    format!(
        r#"sum(rate(http_requests_total{{service="{{service}}",version="{{version}}",code=~"5.."}}[{RATE_RANGE}])) / sum(rate(http_requests_total{{service="{{service}}",version="{{version}}"}}[{RATE_RANGE}]))"#
    )
}

/// A `/metrics` endpoint on a thread: request counters of service `web`.
/// Version `green` serves 3 answers with code 200 for each one with code
/// 500, and its counters grow by 3 and 1 at every scrape, so both its
/// instant ratio and its rate ratio are exactly 0.25. Version `blue`'s
/// counters stay put (500 answers, no errors): ratio 0, and a rate ratio of
/// 0/0.
struct Exporter {
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Exporter {
    fn start(ns: &Netns, addr: &str) -> Result<Self> {
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
                        let _ = serve(s, &count);
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

    fn scrapes(&self) -> u64 {
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

/// The exposition of the exporter after `k` scrapes.
fn exposition(k: u64) -> String {
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

fn serve(mut s: TcpStream, count: &AtomicU64) -> std::io::Result<()> {
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
struct Prometheus {
    child: Child,
    log: PathBuf,
    // Removed after the process is gone (fields drop after `drop`).
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(ns: &Netns, listen: &str, target: &str) -> Result<Self> {
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

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Waits until `/-/ready` answers 200 (or the process dies).
    fn wait_ready(&mut self, ns: &Netns, addr: &str) -> Result<()> {
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
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Err(e) = self.child.terminate(Duration::from_secs(5)) {
            eprintln!("warning: stopping prometheus: {e:#}");
        }
        if thread::panicking() {
            eprintln!("prometheus log (last lines):\n{}", self.log_tail());
        }
    }
}

/// A raw `GET path` from inside `ns`: the whole answer.
fn http_get(ns: &Netns, addr: &str, path: &str) -> Result<String> {
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

/// `[service.analysis]` pointing at `addr`.
fn analysis(addr: &str, query: &str) -> AnalysisConfig {
    AnalysisConfig {
        prometheus: format!("http://{addr}"),
        query: query.to_string(),
        min: None,
        max: None,
        interval_ms: 5000,
        timeout_ms: 2000,
    }
}

/// [`external::query`] from inside `ns` (a current-thread runtime on a
/// thread that joined it, so its sockets are the namespace's).
fn query_in(
    ns: &Netns,
    cfg: &AnalysisConfig,
    service: &str,
    version: &str,
) -> Result<Result<f64, MetricError>> {
    ns.enter(|| -> Result<Result<f64, MetricError>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(external::query(cfg, service, version)))
    })?
}

/// Queries until `cfg` gives a value for `version`, up to `timeout`.
fn wait_value(ns: &Netns, cfg: &AnalysisConfig, version: &str, timeout: Duration) -> Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = query_in(ns, cfg, "web", version)?;
        match r {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "no value for {version} within {timeout:?}; last error: {e}\nquery: {}",
                    external::render_query(&cfg.query, "web", version)
                )
            }
            Err(_) => thread::sleep(Duration::from_millis(250)),
        }
    }
}

/// The namespace, the exporter and Prometheus, ready and with at least one
/// scrape stored. Fields drop in order: Prometheus, the exporter, then the
/// namespace.
struct Setup {
    prometheus: Prometheus,
    exporter: Exporter,
    ns: Netns,
}

impl Setup {
    fn start() -> Result<Self> {
        let ns = Netns::new(format!("{}-prom", run_prefix()))?;
        let exporter = Exporter::start(&ns, EXPORTER_ADDR)?;
        let mut prometheus = Prometheus::start(&ns, PROMETHEUS_ADDR, EXPORTER_ADDR)?;
        prometheus.wait_ready(&ns, PROMETHEUS_ADDR)?;
        let s = Self {
            prometheus,
            exporter,
            ns,
        };
        // Scraped and stored: the instant ratio has a value.
        let ready = s.cfg(RATIO);
        wait_value(&s.ns, &ready, "green", READY_TIMEOUT).with_context(|| {
            format!(
                "prometheus never gave a value ({} scrapes served):\n{}",
                s.exporter.scrapes(),
                s.prometheus.log_tail()
            )
        })?;
        Ok(s)
    }

    fn cfg(&self, query: &str) -> AnalysisConfig {
        analysis(PROMETHEUS_ADDR, query)
    }

    fn query(&self, query: &str, version: &str) -> Result<Result<f64, MetricError>> {
        query_in(&self.ns, &self.cfg(query), "web", version)
    }
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_real_prometheus_gives_the_error_ratio_of_one_version() -> Result<()> {
    let s = Setup::start()?;

    // Counters: (1000 + k) / (4000 + 4k) is exactly 0.25 whatever k is.
    let green = s.query(RATIO, "green")?;
    ensure!(green == Ok(0.25), "green's ratio: {green:?}");
    let blue = s.query(RATIO, "blue")?;
    ensure!(blue == Ok(0.0), "blue's ratio: {blue:?}");

    // Rates, once the range holds two samples: the counters grow 1:3 at
    // every scrape, so the ratio is 0.25 up to rounding.
    let rate = wait_value(&s.ns, &s.cfg(&rate_ratio()), "green", RATE_TIMEOUT)?;
    ensure!(
        (rate - 0.25).abs() < 1e-9,
        "green's rate ratio is {rate}, not 0.25"
    );

    // A scalar result is a value too.
    let scalar = s.query(
        r#"scalar(sum(http_requests_total{version="{version}",code="200"}))"#,
        "blue",
    )?;
    ensure!(scalar == Ok(500.0), "scalar: {scalar:?}");

    // The reading as the daemon keeps it: the query as sent and the value.
    let reading = s.ns.enter(|| -> Result<_> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(rt.block_on(external::read(&s.cfg(RATIO), "web", "green")))
    })??;
    ensure!(
        reading.value == Some(0.25) && reading.error.is_none(),
        "{reading:?}"
    );
    ensure!(
        reading.query == external::render_query(RATIO, "web", "green")
            && reading.query.contains(r#"version="green""#),
        "{reading:?}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn every_other_outcome_is_its_own_error() -> Result<()> {
    let s = Setup::start()?;

    // Nothing listens on the port.
    let cfg = analysis(NOBODY_ADDR, RATIO);
    let e = query_in(&s.ns, &cfg, "web", "green")?;
    match &e {
        Err(e @ MetricError::Unreachable { .. }) => {
            let msg = e.to_string();
            ensure!(
                msg.starts_with(&format!(
                    "Prometheus at http://{NOBODY_ADDR} is unreachable"
                )) && msg.contains("refused"),
                "unreachable: {msg}"
            );
        }
        other => bail!("a port nobody listens on gave {other:?}"),
    }

    // No such version: no series.
    let e = s.query(RATIO, "purple")?;
    ensure!(e == Err(MetricError::NoSeries), "unknown version: {e:?}");

    // Bad PromQL: Prometheus's own error type and text.
    let e = s.query(r#"sum(http_requests_total{version="{version}"}"#, "green")?;
    match &e {
        Err(MetricError::Refused { error_type, error }) => ensure!(
            error_type == "bad_data" && error.contains("parse error"),
            "bad PromQL: {error_type}: {error}"
        ),
        other => bail!("bad PromQL gave {other:?}"),
    }
    let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(
        msg.starts_with("Prometheus refused the query (bad_data): "),
        "{msg}"
    );

    // Two series: one per code.
    let e = s.query(r#"http_requests_total{version="{version}"}"#, "green")?;
    match &e {
        Err(MetricError::MultipleSeries { count, first }) => ensure!(
            *count == 2
                && first.contains("http_requests_total{")
                && first.contains(r#"code="200""#)
                && first.contains(r#"code="500""#),
            "multi-series: {count} {first}"
        ),
        other => bail!("two series gave {other:?}"),
    }
    let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
    ensure!(msg.starts_with("the query gave 2 series, not one"), "{msg}");

    // Blue's counters never move: its rate ratio is 0/0. Wait until the
    // range holds two samples (green's rate has a value by then).
    wait_value(&s.ns, &s.cfg(&rate_ratio()), "green", RATE_TIMEOUT)?;
    let e = s.query(&rate_ratio(), "blue")?;
    ensure!(e == Err(MetricError::NaN), "0/0: {e:?}");
    ensure!(
        MetricError::NaN.to_string() == "the query gave NaN (no requests in the range?)",
        "{}",
        MetricError::NaN
    );
    Ok(())
}
