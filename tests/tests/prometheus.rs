//! The external metric of `[service.analysis]` against a real Prometheus
//! server (Debian's `prometheus` package, `/usr/bin/prometheus`; `cargo
//! xtask setup` installs it): `splitter::signals::external::query` reads
//! the exact 5xx ratio of a version that an exporter in the test counts,
//! both as an instant ratio of counters and as a ratio of rates, and turns
//! every other outcome into its own error: an unreachable server, no series,
//! bad PromQL (with Prometheus's own text), several series, NaN.
//!
//! And the real daemon end to end: Prometheus and the exporter in the
//! topology's edge namespace, where `splitter daemon` polls the metric of
//! each version every second; `splitter status` (JSON and table) and
//! `GET /v1/services/web/signals` show the value per version, and an error,
//! never a number, once Prometheus is gone.
//!
//! The library tests run inside a namespace of its own with only `lo`: the
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
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use splitter::{
    config::AnalysisConfig,
    signals::external::{self, MetricError},
};
use splitter_tests::{
    clients,
    netns::{Netns, run_prefix},
    prometheus::{Exporter, Prometheus, RATIO_QUERY as RATIO, READY_TIMEOUT, free_port},
    servers::HttpServer,
    splitter::{Affinity, Daemon, Mode, blue_green_config},
    topology::{self, Topology, TopologyOptions},
};

/// Inside the test's namespace: nothing else listens there.
const PROMETHEUS_ADDR: &str = "127.0.0.1:19090";
const EXPORTER_ADDR: &str = "127.0.0.1:19100";
/// A port nothing listens on in the namespace.
const NOBODY_ADDR: &str = "127.0.0.1:19091";
/// Longest wait for enough samples for a `rate()` over `RATE_RANGE`.
const RATE_TIMEOUT: Duration = Duration::from_secs(30);
/// The range of the rate queries (five scrapes at 1 s).
const RATE_RANGE: &str = "5s";

fn rate_ratio() -> String {
    format!(
        r#"sum(rate(http_requests_total{{service="{{service}}",version="{{version}}",code=~"5.."}}[{RATE_RANGE}])) / sum(rate(http_requests_total{{service="{{service}}",version="{{version}}"}}[{RATE_RANGE}]))"#
    )
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

/// Longest wait for the daemon's poll (every second) to show a change.
const POLL_TIMEOUT: Duration = Duration::from_secs(15);
/// The status window of the daemon test.
const WINDOW: &str = "30s";

/// `RATIO` as the daemon must send it for `version` of `web` (filled in
/// here, independently of the product's `render_query`).
fn rendered(version: &str) -> String {
    RATIO
        .replace("{service}", "web")
        .replace("{version}", version)
}

/// A `GET path` over the daemon's API socket (what `curl --unix-socket
/// SOCKET http://splitter/PATH` does): the status code and the body.
fn api_get(socket: &Path, path: &str) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the API socket {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: splitter\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .with_context(|| format!("reading the answer to GET {path}"))?;
    let text = String::from_utf8(raw).context("the API answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of head in the answer to GET {path}: {text:?}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no status code in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    // At most one chunk per byte: bounded.
    for _ in 0..=body.len() {
        let (size, rest) = body
            .split_once("\r\n")
            .with_context(|| format!("bad chunk head in {body:?}"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        ensure!(rest.len() >= size + 2, "truncated chunk in {body:?}");
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    bail!("endless chunked body")
}

/// `splitter status --output json --window WINDOW`, parsed.
fn status(daemon: &Daemon) -> Result<Value> {
    let out = daemon.cli_ok(&["status", "--output", "json", "--window", WINDOW])?;
    serde_json::from_str(&out).with_context(|| format!("status output is not JSON: {out}"))
}

/// The `metric` of `version` of `web` in a status report (its
/// `services[].versions[]`) or a signals report (its `versions[]`).
fn metric_of<'a>(versions: &'a Value, version: &str) -> Result<&'a Value> {
    versions
        .as_array()
        .context("no versions")?
        .iter()
        .find(|v| v["name"] == version)
        .map(|v| &v["metric"])
        .with_context(|| format!("no version {version} in {versions}"))
}

fn web_versions(status: &Value) -> Result<&Value> {
    status["services"]
        .as_array()
        .context("no services")?
        .iter()
        .find(|s| s["name"] == "web")
        .map(|s| &s["versions"])
        .with_context(|| format!("no service web in {status}"))
}

/// Checks one reading: the query sent for `version`, no error, the value
/// `want`, and a fresh age (the daemon reads every second).
fn check_value(m: &Value, version: &str, want: f64) -> Result<()> {
    ensure!(
        m["query"] == rendered(version).as_str(),
        "{version}: query {} is not the rendered {:?}",
        m["query"],
        rendered(version)
    );
    ensure!(
        m["error"].is_null(),
        "{version}: an error with a value expected: {m}"
    );
    ensure!(
        m["value"].as_f64() == Some(want),
        "{version}: value {} instead of {want}: {m}",
        m["value"]
    );
    // A poll every second would keep readings under about 1.2 s old; 3 s
    // allows for one skipped poll: the daemon's poller skips a service
    // when its 1 s tick wakes earlier than the last one did (`due` is set
    // from the wake-up time), so with `interval_ms = 1000` readings now
    // reach 2 s of age (a known product bug).
    let age = m["age_secs"].as_f64().context("no age_secs")?;
    ensure!(
        (0.0..=3.0).contains(&age),
        "{version}: reading {age} s old, with a poll every second: {m}"
    );
    Ok(())
}

/// Checks one reading that must be an `unreachable` error about `url`:
/// no value, never a number.
fn check_unreachable(m: &Value, version: &str, url: &str) -> Result<()> {
    ensure!(
        m.is_object(),
        "{version}: no metric reading at all, expected an error: {m}"
    );
    ensure!(
        m["value"].is_null(),
        "{version}: a value with Prometheus unreachable (must be an error, never a number): {m}"
    );
    let e = m["error"].as_str().unwrap_or_default();
    ensure!(
        e.starts_with(&format!("Prometheus at {url} is unreachable")),
        "{version}: error {:?} instead of `Prometheus at {url} is unreachable...`: {m}",
        m["error"]
    );
    ensure!(
        m["query"] == rendered(version).as_str(),
        "{version}: query {} is not the rendered {:?}",
        m["query"],
        rendered(version)
    );
    Ok(())
}

/// The METRIC cell of `version`'s row in the signals section of the
/// status table, after checking that the section's header has the column
/// last. The cell is everything after the P99 cell, so it may hold spaces
/// (an error).
fn table_metric(table: &str, version: &str) -> Result<String> {
    let section = table
        .split_once(&format!("signals over the last {WINDOW}:\n"))
        .map(|(_, s)| s)
        .with_context(|| format!("no `signals over the last {WINDOW}` section in\n{table}"))?;
    let mut lines = section.lines();
    let header = lines.next().unwrap_or_default();
    let at = header
        .find("METRIC")
        .with_context(|| format!("no METRIC column in {header:?}\n{table}"))?;
    ensure!(
        header.trim_end().ends_with("METRIC"),
        "METRIC is not the last column: {header:?}"
    );
    let row = lines
        .find(|l| {
            let mut cells = l.split_whitespace();
            cells.next() == Some("web") && cells.next() == Some(version)
        })
        .with_context(|| format!("no row for web {version} in\n{section}"))?;
    Ok(row.get(at..).unwrap_or_default().trim().to_string())
}

/// Polls `check` every 200 ms until it passes, at most `within`.
fn eventually(within: Duration, mut check: impl FnMut() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    loop {
        match check() {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) if started.elapsed() >= within => {
                return Err(e.context(format!("still not so after {within:?}")));
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn the_daemon_shows_the_external_metric_of_each_version() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let (blue, green) = (topo.backend(0)?, topo.backend(1)?);
    let _blue = HttpServer::start(&topo.back, blue, "blue")?;
    let _green = HttpServer::start(&topo.back, green, "green")?;

    // The exporter and (later) Prometheus on the edge's loopback, where the
    // daemon runs. The exporter holds its port, so Prometheus's differs.
    let exporter_addr = format!("127.0.0.1:{}", free_port(&topo.edge)?);
    let exporter = Exporter::start(&topo.edge, &exporter_addr)?;
    let prom_addr = format!("127.0.0.1:{}", free_port(&topo.edge)?);
    let url = format!("http://{prom_addr}");

    let config = format!(
        "{}\n[service.analysis]\nprometheus = \"{url}\"\nquery = '{RATIO}'\ninterval_ms = 1000\n",
        blue_green_config(Mode::Snat, Affinity::Flow, 50, 50)
    );
    let daemon = Daemon::start(&topo.edge, &config)?;

    // Real traffic through the VIP: both versions answer.
    let served =
        clients::http_get_many(&topo.cli, topology::vip(), "/", 40, Duration::from_secs(5))?;
    ensure!(
        served.ok() == 40 && served.count("blue") > 0 && served.count("green") > 0,
        "40 requests through the VIP should reach both versions: {served:?}"
    );

    // Nothing listens at the Prometheus address yet: an error, no value.
    eventually(POLL_TIMEOUT, || {
        let s = status(&daemon)?;
        for v in ["blue", "green"] {
            check_unreachable(metric_of(web_versions(&s)?, v)?, v, &url)?;
        }
        Ok(())
    })
    .context("before Prometheus runs")?;

    let mut prometheus = Prometheus::start(&topo.edge, &prom_addr, &exporter_addr)?;
    prometheus.wait_ready(&topo.edge, &prom_addr)?;
    let ready = Instant::now();

    // Blue 0, green 0.25, each with its own rendered query.
    let took = eventually(READY_TIMEOUT, || {
        let s = status(&daemon)?;
        check_value(metric_of(web_versions(&s)?, "blue")?, "blue", 0.0)?;
        check_value(metric_of(web_versions(&s)?, "green")?, "green", 0.25)?;
        Ok(())
    })
    .with_context(|| {
        format!(
            "the daemon never showed the values ({} scrapes served):\n{}",
            exporter.scrapes(),
            prometheus.log_tail()
        )
    })?;
    eprintln!("values shown {took:?} after Prometheus was ready");
    ensure!(
        ready.elapsed() < Duration::from_secs(20),
        "the values took {:?} after Prometheus was ready (scrape and poll are every second)",
        ready.elapsed()
    );

    // The table: the METRIC column with the values.
    let table = daemon.cli_ok(&["status", "--window", WINDOW, "--backends"])?;
    for (v, want) in [("blue", "0.0000"), ("green", "0.2500")] {
        let cell = table_metric(&table, v)?;
        ensure!(
            cell == want,
            "{v}: METRIC cell {cell:?}, expected {want:?}:\n{table}"
        );
    }

    // The API's signals route: the same readings.
    let (code, body) = api_get(
        daemon.socket(),
        &format!("/v1/services/web/signals?window={WINDOW}"),
    )?;
    ensure!(code == 200, "GET signals: {code} {body}");
    let signals: Value =
        serde_json::from_str(&body).with_context(|| format!("signals is not JSON: {body}"))?;
    ensure!(
        signals["service"] == "web" && signals["window_secs"].as_f64() == Some(30.0),
        "signals report of another service or window: {signals}"
    );
    check_value(metric_of(&signals["versions"], "blue")?, "blue", 0.0)?;
    check_value(metric_of(&signals["versions"], "green")?, "green", 0.25)?;

    // Prometheus gone: an error at the next poll, and no value ever again.
    prometheus.stop()?;
    let stopped = Instant::now();
    let took = eventually(POLL_TIMEOUT, || {
        let s = status(&daemon)?;
        for v in ["blue", "green"] {
            check_unreachable(metric_of(web_versions(&s)?, v)?, v, &url)?;
        }
        Ok(())
    })
    .context("after Prometheus stopped")?;
    eprintln!("errors shown {took:?} after Prometheus stopped");
    ensure!(
        stopped.elapsed() < Duration::from_secs(5),
        "the error took {:?} to show, with a poll every second",
        stopped.elapsed()
    );
    // Three more seconds (three more polls): still errors, never a number.
    let watch = Instant::now();
    for _ in 0..100 {
        if watch.elapsed() >= Duration::from_secs(3) {
            break;
        }
        let s = status(&daemon)?;
        for v in ["blue", "green"] {
            check_unreachable(metric_of(web_versions(&s)?, v)?, v, &url)
                .context("while Prometheus stays stopped")?;
        }
        thread::sleep(Duration::from_millis(200));
    }
    let table = daemon.cli_ok(&["status", "--window", WINDOW, "--backends"])?;
    for v in ["blue", "green"] {
        let cell = table_metric(&table, v)?;
        ensure!(
            cell.starts_with(&format!("error: Prometheus at {url} is unreachable")),
            "{v}: METRIC cell {cell:?}, expected the unreachable error:\n{table}"
        );
    }
    let (code, body) = api_get(
        daemon.socket(),
        &format!("/v1/services/web/signals?window={WINDOW}"),
    )?;
    ensure!(code == 200, "GET signals: {code} {body}");
    let signals: Value =
        serde_json::from_str(&body).with_context(|| format!("signals is not JSON: {body}"))?;
    for v in ["blue", "green"] {
        check_unreachable(metric_of(&signals["versions"], v)?, v, &url)?;
    }
    topo.no_csum_errors()?;
    Ok(())
}
