//! The Prometheus endpoint of the real `splitter daemon`, scraped over TCP
//! the way Prometheus would: its counters agree with what the backends
//! counted, its gauges with the configured weights, every line is valid
//! text exposition format, and `[metrics]` moves it, turns it off, and
//! refuses the start when its port is taken.
//!
//! The daemon runs inside the edge namespace, so its `127.0.0.1` is the
//! edge's loopback: the scrapes connect from inside that namespace.
//! Privileged, so `#[ignore]`d for a plain `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test metrics -- --include-ignored --test-threads=1
//! ```
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use splitter_tests::{
    clients,
    netns::Netns,
    servers::TcpIdentityServer,
    splitter::{Affinity, Daemon, Mode, blue_green_config},
    topology::{self, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);
/// The default `[metrics] listen`.
const DEFAULT_LISTEN: &str = "127.0.0.1:9470";

/// One HTTP answer: status code, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// `GET path` on `addr` from inside `ns`, with `Connection: close`.
fn get(ns: &Netns, addr: &str, path: &str) -> Result<Answer> {
    let addr: SocketAddr = addr.parse()?;
    let raw = ns.enter(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT)
            .with_context(|| format!("connecting to {addr} in {}", ns.name()))?;
        s.set_read_timeout(Some(TIMEOUT))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw)
    })??;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no end of headers in {raw:?}"))?;
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Answer {
        status,
        headers,
        body: body.to_string(),
    })
}

/// A scrape: every sample as `name{labels}` (exactly as written) -> value.
/// Fails on any line that is neither a `# HELP`/`# TYPE` comment nor a
/// `name{labels} value` sample.
fn scrape(ns: &Netns, addr: &str) -> Result<BTreeMap<String, f64>> {
    let a = get(ns, addr, "/metrics")?;
    ensure!(a.status == 200, "GET /metrics: {} {}", a.status, a.body);
    let ct = a.headers.get("content-type").map(String::as_str);
    ensure!(
        ct.is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
        "content type {ct:?}"
    );
    ensure!(a.body.ends_with('\n'), "no final newline");
    let mut samples = BTreeMap::new();
    for line in a.body.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("not a sample: {line:?}"))?;
        let name = series.split('{').next().unwrap_or_default();
        ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        ensure!(
            series == name || (series.contains('{') && series.ends_with('}')),
            "bad labels in {line:?}"
        );
        let value: f64 = value
            .parse()
            .with_context(|| format!("bad value in {line:?}"))?;
        if samples.insert(series.to_string(), value).is_some() {
            bail!("series {series} appears twice");
        }
    }
    Ok(samples)
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> Result<f64> {
    samples
        .get(series)
        .copied()
        .with_context(|| format!("no {series} in the scrape: {samples:#?}"))
}

fn version_series(metric: &str, version: &str) -> String {
    format!("{metric}{{service=\"web\",version=\"{version}\"}}")
}

fn backend_series(metric: &str, version: &str, backend: &str) -> String {
    format!("{metric}{{service=\"web\",version=\"{version}\",backend=\"{backend}\"}}")
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn scraped_counters_match_what_the_backends_counted() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let (blue_addr, green_addr) = (topo.backend(0)?, topo.backend(1)?);
    let blue = TcpIdentityServer::start(&topo.back, blue_addr, "blue")?;
    let green = TcpIdentityServer::start(&topo.back, green_addr, "green")?;
    let daemon = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 90, 10),
    )?;

    // Before any traffic: everything at 0, the weights already there.
    let before = scrape(&topo.edge, DEFAULT_LISTEN)?;
    ensure!(
        sample(
            &before,
            &backend_series(
                "splitter_backend_new_flows_total",
                "blue",
                &blue_addr.to_string()
            )
        )? == 0.0
    );

    let n = 100;
    let r = clients::tcp_identity_many(&topo.cli, topology::vip(), n, &[], TIMEOUT)?;
    ensure!(
        r.errors == 0,
        "{} of {n} connections failed: {:?}",
        r.errors,
        r.error_samples
    );
    ensure!(
        blue.accepted() + green.accepted() == n as u64,
        "servers accepted {} + {}, not {n}",
        blue.accepted(),
        green.accepted()
    );
    ensure!(
        r.count("blue") == blue.accepted() && r.count("green") == green.accepted(),
        "clients saw {:?}",
        r.per_name
    );

    let m = scrape(&topo.edge, DEFAULT_LISTEN)?;
    for (version, addr, server) in [("blue", blue_addr, &blue), ("green", green_addr, &green)] {
        let addr = addr.to_string();
        let flows = sample(
            &m,
            &backend_series("splitter_backend_new_flows_total", version, &addr),
        )?;
        ensure!(
            flows == server.accepted() as f64,
            "{version}: splitter_backend_new_flows_total is {flows}, the server accepted {}",
            server.accepted()
        );
        let version_flows = sample(
            &m,
            &version_series("splitter_version_new_flows_total", version),
        )?;
        ensure!(
            version_flows == flows,
            "{version}: version {version_flows} != backend {flows}"
        );
        for metric in [
            "splitter_backend_packets_total",
            "splitter_backend_bytes_total",
            "splitter_backend_reply_packets_total",
            "splitter_backend_reply_bytes_total",
        ] {
            let v = sample(&m, &backend_series(metric, version, &addr))?;
            // Every accepted connection carried a SYN, an ACK and a request
            // to the backend, and a SYN-ACK and an answer back.
            ensure!(
                v >= 2.0 * flows,
                "{version}: {metric} is {v} for {flows} flows"
            );
        }
    }
    // The connection signals: every connection went through the VIP to a
    // healthy backend, so each is one SYN-ACK seen (established) and one
    // connect latency observed.
    let (mut established, mut latencies) = (0.0, 0.0);
    for (version, addr) in [("blue", blue_addr), ("green", green_addr)] {
        let addr = addr.to_string();
        established += sample(
            &m,
            &backend_series(
                "splitter_backend_connections_established_total",
                version,
                &addr,
            ),
        )?;
        for metric in [
            "splitter_backend_connections_refused_total",
            "splitter_backend_connect_timeouts_total",
        ] {
            let v = sample(&m, &backend_series(metric, version, &addr))?;
            ensure!(
                v == 0.0,
                "{version}: {metric} is {v} with every connection served"
            );
        }
        for by in ["backend", "client"] {
            sample(
                &m,
                &format!(
                    "splitter_backend_resets_total{{service=\"web\",version=\"{version}\",backend=\"{addr}\",by=\"{by}\"}}"
                ),
            )?;
        }
        let hist = |suffix: &str| {
            backend_series(
                &format!("splitter_backend_connect_latency_seconds{suffix}"),
                version,
                &addr,
            )
        };
        let count = sample(&m, &hist("_count"))?;
        let inf = sample(
            &m,
            &format!(
                "splitter_backend_connect_latency_seconds_bucket{{service=\"web\",version=\"{version}\",backend=\"{addr}\",le=\"+Inf\"}}"
            ),
        )?;
        ensure!(
            inf == count,
            "{version}: le=\"+Inf\" bucket {inf} != _count {count}"
        );
        let sum = sample(&m, &hist("_sum"))?;
        ensure!(
            (count == 0.0 && sum == 0.0) || (sum > 0.0 && sum < count * TIMEOUT.as_secs_f64()),
            "{version}: latency _sum {sum}s for {count} connections"
        );
        latencies += count;
    }
    ensure!(
        established == n as f64,
        "splitter_backend_connections_established_total sums to {established}, {n} connections were made"
    );
    ensure!(
        latencies == n as f64,
        "splitter_backend_connect_latency_seconds_count sums to {latencies}, {n} connections were made"
    );
    let types = get(&topo.edge, DEFAULT_LISTEN, "/metrics")?.body;
    for (family, kind) in [
        ("splitter_backend_connections_established_total", "counter"),
        ("splitter_backend_connections_refused_total", "counter"),
        ("splitter_backend_connect_timeouts_total", "counter"),
        ("splitter_backend_resets_total", "counter"),
        ("splitter_backend_connect_latency_seconds", "histogram"),
        ("splitter_version_error_ratio", "gauge"),
        ("splitter_version_external_metric", "gauge"),
    ] {
        ensure!(
            types.contains(&format!("\n# TYPE {family} {kind}\n")),
            "no {kind} {family} in the scrape"
        );
    }

    ensure!(sample(&m, &version_series("splitter_version_weight", "blue"))? == 90.0);
    ensure!(sample(&m, &version_series("splitter_version_weight", "green"))? == 10.0);
    ensure!(sample(&m, &version_series("splitter_version_share_ratio", "blue"))? == 0.9);
    ensure!(sample(&m, &version_series("splitter_version_share_ratio", "green"))? == 0.1);
    ensure!(
        sample(
            &m,
            "splitter_service_info{service=\"web\",vip=\"10.0.0.10:80\",protocol=\"tcp\",affinity=\"flow\"}"
        )? == 1.0
    );
    let new_flow = sample(&m, "splitter_dataplane_events_total{event=\"new_flow\"}")?;
    ensure!(
        new_flow >= n as f64,
        "new_flow event counter {new_flow} < {n}"
    );
    for reason in ["no_flow", "no_backend", "conn_table", "snat_exhausted"] {
        sample(&m, &format!("splitter_drops_total{{reason=\"{reason}\"}}"))?;
    }

    // The same numbers `splitter status` gives.
    let status = daemon.status_json()?;
    for v in status["services"][0]["versions"]
        .as_array()
        .context("no versions")?
    {
        let name = v["name"].as_str().context("version name")?;
        let flows = v["new_flows"].as_u64().context("new_flows")?;
        ensure!(
            sample(
                &m,
                &version_series("splitter_version_new_flows_total", name)
            )? == flows as f64,
            "status and metrics disagree on {name}: {status}"
        );
    }

    // A weight change shows at the next scrape.
    daemon.weights_set("web", &[("blue", 30), ("green", 70)])?;
    let m = scrape(&topo.edge, DEFAULT_LISTEN)?;
    ensure!(sample(&m, &version_series("splitter_version_weight", "blue"))? == 30.0);
    ensure!(sample(&m, &version_series("splitter_version_share_ratio", "green"))? == 0.7);

    let other = get(&topo.edge, DEFAULT_LISTEN, "/v1/status")?;
    ensure!(
        other.status == 404,
        "GET /v1/status on the metrics port: {}",
        other.status
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn metrics_listen_moves_or_turns_off_the_endpoint() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let base = blue_green_config(Mode::Snat, Affinity::Flow, 90, 10);

    let moved = Daemon::start(
        &topo.edge,
        &format!("{base}\n[metrics]\nlisten = \"127.0.0.1:9555\"\n"),
    )?;
    let m = scrape(&topo.edge, "127.0.0.1:9555")?;
    ensure!(sample(&m, &version_series("splitter_version_weight", "green"))? == 10.0);
    ensure!(
        get(&topo.edge, DEFAULT_LISTEN, "/metrics").is_err(),
        "the default port still answers after [metrics] listen moved it"
    );
    drop(moved);

    let off = Daemon::start(&topo.edge, &format!("{base}\n[metrics]\nenabled = false\n"))?;
    ensure!(
        get(&topo.edge, DEFAULT_LISTEN, "/metrics").is_err(),
        "enabled = false still serves metrics"
    );
    drop(off);
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_taken_metrics_port_refuses_the_start_naming_the_address() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let squatter = topo
        .edge
        .enter(|| TcpListener::bind(DEFAULT_LISTEN))?
        .context("binding the metrics port first")?;
    let started = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 90, 10),
    );
    drop(squatter);
    let Err(e) = started else {
        bail!("the daemon started although {DEFAULT_LISTEN} was taken");
    };
    let msg = format!("{e:#}");
    ensure!(
        msg.contains("exited during start-up")
            && msg.contains(&format!("metrics endpoint on {DEFAULT_LISTEN}")),
        "unclear failure: {msg}"
    );
    Ok(())
}
