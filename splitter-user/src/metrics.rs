//! The Prometheus endpoint: [`render`] turns a [`StatusReport`] into the
//! Prometheus text exposition format (version 0.0.4), and [`serve`] answers
//! `GET /metrics` with it over HTTP/1.1 on a TCP listener (`[metrics] listen`,
//! `127.0.0.1:9470` by default).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `splitter_program_info` | gauge (always 1) | `id`, `tag`, `source` of the running kernel program |
//! | `splitter_service_info` | gauge (always 1) | `service`, `vip`, `protocol`, `affinity` |
//! | `splitter_version_weight` | gauge | `service`, `version` |
//! | `splitter_version_share_ratio` | gauge, 0..1 | `service`, `version` |
//! | `splitter_version_new_flows_total` | counter | `service`, `version` |
//! | `splitter_version_live_flows` | gauge | `service`, `version` |
//! | `splitter_backend_weight` | gauge | `service`, `version`, `backend` |
//! | `splitter_backend_state` | gauge (1 for the current state) | `service`, `version`, `backend`, `state` |
//! | `splitter_backend_live_flows` | gauge | `service`, `version`, `backend` |
//! | `splitter_backend_health_up` | gauge (1 up, 0 down; only checked backends) | `service`, `version`, `backend` |
//! | `splitter_backend_packets_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_bytes_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_new_flows_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_reply_packets_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_reply_bytes_total` | counter | `service`, `version`, `backend` |
//! | `splitter_dataplane_events_total` | counter | `event` (every data-plane counter) |
//! | `splitter_drops_total` | counter | `reason` (the `drop_*` counters, prefix removed) |
//! | `splitter_service_drops_total` | counter | `service`, `reason` (drops once the service is known) |
//!
//! Every scrape reads the counters live through [`Controller::status`], the
//! same numbers `splitter status` shows. Counters restart from 0 when the
//! data plane is created anew (after a detach), which Prometheus treats as
//! an ordinary counter reset.
use std::{convert::Infallible, fmt::Write as _, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{debug, warn};

use crate::{api::StatusReport, controller::Controller};

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// The only path served.
pub const PATH: &str = "/metrics";

/// Longest a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Escapes a label value: backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Escapes `# HELP` text: backslash and newline.
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value as the format spells it.
fn float(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

/// Writes one metric family: its `# HELP` and `# TYPE` lines, then one
/// line per sample.
struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &'static str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Self { out, name }
    }

    fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The report in the Prometheus text exposition format (0.0.4): each
/// family's `# HELP` and `# TYPE` lines followed by its samples, families
/// in a fixed order, services, versions and backends in configuration
/// order, data-plane counters by name.
pub fn render(report: &StatusReport) -> String {
    let mut out = String::new();

    let mut f = Family::new(
        &mut out,
        "splitter_program_info",
        "gauge",
        "The running kernel program (always 1): its id, its tag (a hash of its instructions: another build, another tag) and where it was loaded from.",
    );
    if let Some(p) = &report.dataplane.program {
        f.sample(
            &[
                ("id", &p.id.to_string()),
                ("tag", &p.tag),
                ("source", &p.source),
            ],
            1,
        );
    }

    let mut f = Family::new(
        &mut out,
        "splitter_service_info",
        "gauge",
        "A configured service (always 1), with its VIP, protocol and affinity.",
    );
    for s in &report.services {
        f.sample(
            &[
                ("service", &s.name),
                ("vip", &s.vip),
                ("protocol", &s.protocol),
                ("affinity", &s.affinity),
            ],
            1,
        );
    }

    let versions = || {
        report.services.iter().flat_map(|s| {
            let total: u64 = s.versions.iter().map(|v| u64::from(v.weight)).sum();
            s.versions.iter().map(move |v| (s, v, total))
        })
    };
    let mut f = Family::new(
        &mut out,
        "splitter_version_weight",
        "gauge",
        "Configured weight of a version (relative to the other versions of its service).",
    );
    for (s, v, _) in versions() {
        f.sample(&[("service", &s.name), ("version", &v.name)], v.weight);
    }
    let mut f = Family::new(
        &mut out,
        "splitter_version_share_ratio",
        "gauge",
        "Share of new flows the version's weight gives it, 0 to 1.",
    );
    for (s, v, total) in versions() {
        let share = if total == 0 {
            0.0
        } else {
            f64::from(v.weight) / total as f64
        };
        f.sample(&[("service", &s.name), ("version", &v.name)], float(share));
    }
    type VersionField = fn(&crate::api::VersionReport) -> u64;
    let version_families: [(&'static str, &str, &str, VersionField); 2] = [
        (
            "splitter_version_new_flows_total",
            "counter",
            "New flows placed on any backend of the version.",
            |v| v.new_flows,
        ),
        (
            "splitter_version_live_flows",
            "gauge",
            "Established flows on the version's backends now (from the connection table).",
            |v| v.live_flows,
        ),
    ];
    for (name, kind, help, field) in version_families {
        let mut f = Family::new(&mut out, name, kind, help);
        for (s, v, _) in versions() {
            f.sample(&[("service", &s.name), ("version", &v.name)], field(v));
        }
    }
    let mut f = Family::new(
        &mut out,
        "splitter_backend_state",
        "gauge",
        "The backend's state: 1 on the series of its current state (active, drain or disabled).",
    );
    for (s, v, _) in versions() {
        for b in &v.backends {
            f.sample(
                &[
                    ("service", &s.name),
                    ("version", &v.name),
                    ("backend", &b.address),
                    ("state", &b.state),
                ],
                1,
            );
        }
    }

    let mut f = Family::new(
        &mut out,
        "splitter_backend_health_up",
        "gauge",
        "1 if the backend passes its health checks, 0 if it is down (only backends of services with [service.health]).",
    );
    for (s, v, _) in versions() {
        for b in v
            .backends
            .iter()
            .filter(|b| b.health == "up" || b.health == "down")
        {
            f.sample(
                &[
                    ("service", &s.name),
                    ("version", &v.name),
                    ("backend", &b.address),
                ],
                u8::from(b.health == "up"),
            );
        }
    }

    type Field = fn(&crate::api::BackendReport) -> u64;
    let backend_families: [(&'static str, &str, &str, Field); 7] = [
        (
            "splitter_backend_weight",
            "gauge",
            "Weight of the backend inside its version.",
            |b| u64::from(b.weight),
        ),
        (
            "splitter_backend_live_flows",
            "gauge",
            "Established flows bound to the backend now (from the connection table, recounted about once a second).",
            |b| b.live_flows,
        ),
        (
            "splitter_backend_packets_total",
            "counter",
            "Packets forwarded to the backend.",
            |b| b.packets,
        ),
        (
            "splitter_backend_bytes_total",
            "counter",
            "Bytes forwarded to the backend.",
            |b| b.bytes,
        ),
        (
            "splitter_backend_new_flows_total",
            "counter",
            "New flows bound to the backend.",
            |b| b.new_flows,
        ),
        (
            "splitter_backend_reply_packets_total",
            "counter",
            "Reply packets from the backend translated back to clients.",
            |b| b.reply_packets,
        ),
        (
            "splitter_backend_reply_bytes_total",
            "counter",
            "Reply bytes from the backend translated back to clients.",
            |b| b.reply_bytes,
        ),
    ];
    for (name, kind, help, field) in backend_families {
        let mut f = Family::new(&mut out, name, kind, help);
        for (s, v, _) in versions() {
            for b in &v.backends {
                f.sample(
                    &[
                        ("service", &s.name),
                        ("version", &v.name),
                        ("backend", &b.address),
                    ],
                    field(b),
                );
            }
        }
    }

    let mut f = Family::new(
        &mut out,
        "splitter_dataplane_events_total",
        "counter",
        "Data-plane counters by event: drops by reason, packets passed to the kernel, TX, redirects, new flows.",
    );
    for (event, v) in &report.counters {
        f.sample(&[("event", event)], v);
    }
    let mut f = Family::new(
        &mut out,
        "splitter_drops_total",
        "counter",
        "Packets the data plane dropped, by reason (the drop_* events without their prefix).",
    );
    for (event, v) in &report.counters {
        if let Some(reason) = event.strip_prefix("drop_") {
            f.sample(&[("reason", reason)], v);
        }
    }
    let mut f = Family::new(
        &mut out,
        "splitter_service_drops_total",
        "counter",
        "Packets of a service the data plane dropped, by reason (drops that happen once the service is known; also in splitter_drops_total).",
    );
    for s in &report.services {
        for (reason, v) in &s.drops {
            f.sample(&[("service", &s.name), ("reason", reason)], v);
        }
    }
    out
}

type Shared = Arc<std::sync::Mutex<Controller>>;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; then
/// closes the listener and ends every open connection before returning.
/// Other paths answer 404, other methods on `/metrics` 405.
pub async fn serve(listener: TcpListener, controller: Shared, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let controller = controller.clone();
        connections.spawn(async move {
            let svc = service_fn(move |req| handle(controller.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    // Keep-alive scrapers would otherwise hold the controller past shutdown.
    connections.shutdown().await;
}

async fn handle(
    controller: Shared,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    if path != PATH {
        return Ok(text(
            StatusCode::NOT_FOUND,
            format!("not found: {path} (metrics are at {PATH})\n"),
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {} is not allowed on {PATH}\n", req.method()),
        );
        resp.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return Ok(resp);
    }
    let report = match controller.lock() {
        Ok(c) => c.status().map_err(|e| e.to_string()),
        Err(_) => Err("controller state is poisoned".into()),
    };
    Ok(match report {
        Ok(r) => {
            let mut resp = text(StatusCode::OK, render(&r));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(CONTENT_TYPE),
            );
            resp
        }
        Err(e) => {
            warn!(error = %e, "metrics scrape failed");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot read the counters: {e}\n"),
            )
        }
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::{BackendReport, DataplaneReport, ServiceReport, VersionReport};

    fn backend(address: &str, n: u64) -> BackendReport {
        BackendReport {
            address: address.into(),
            weight: 1,
            state: "active".into(),
            health: if n > 5 { "up" } else { "down" }.into(),
            live_flows: n / 2,
            packets: n * 10,
            bytes: n * 1000,
            new_flows: n,
            reply_packets: n * 8,
            reply_bytes: n * 4000,
            signals: Default::default(),
            window: None,
        }
    }

    fn version(name: &str, weight: u32, backends: Vec<BackendReport>) -> VersionReport {
        VersionReport {
            name: name.into(),
            weight,
            share_percent: 0.0,
            new_flows: backends.iter().map(|b| b.new_flows).sum(),
            live_flows: backends.iter().map(|b| b.live_flows).sum(),
            packets: backends.iter().map(|b| b.packets).sum(),
            bytes: backends.iter().map(|b| b.bytes).sum(),
            backends,
            signals: Default::default(),
            window: None,
            metric: None,
        }
    }

    fn sample() -> StatusReport {
        StatusReport {
            dataplane: DataplaneReport {
                interface: "ec".into(),
                backend_interface: "eb".into(),
                mode: "snat".into(),
                snat_address: Some("10.0.2.1".into()),
                attachments: vec![],
                program: None,
                conn_capacity: None,
            },
            services: vec![ServiceReport {
                name: "web".into(),
                vip: "10.0.0.10:80".into(),
                protocol: "tcp".into(),
                affinity: "flow".into(),
                versions: vec![
                    version("blue", 90, vec![backend("10.0.2.2:8080", 7)]),
                    version("green", 10, vec![backend("10.0.2.3:8080", 3)]),
                ],
                drops: BTreeMap::from([("no_backend".to_string(), 0), ("no_flow".to_string(), 2)]),
            }],
            counters: BTreeMap::from([
                ("drop_no_flow".to_string(), 2),
                ("new_flow".to_string(), 10),
                ("tx".to_string(), 0),
            ]),
        }
    }

    const EXPECTED: &str = r#"# HELP splitter_program_info The running kernel program (always 1): its id, its tag (a hash of its instructions: another build, another tag) and where it was loaded from.
# TYPE splitter_program_info gauge
# HELP splitter_service_info A configured service (always 1), with its VIP, protocol and affinity.
# TYPE splitter_service_info gauge
splitter_service_info{service="web",vip="10.0.0.10:80",protocol="tcp",affinity="flow"} 1
# HELP splitter_version_weight Configured weight of a version (relative to the other versions of its service).
# TYPE splitter_version_weight gauge
splitter_version_weight{service="web",version="blue"} 90
splitter_version_weight{service="web",version="green"} 10
# HELP splitter_version_share_ratio Share of new flows the version's weight gives it, 0 to 1.
# TYPE splitter_version_share_ratio gauge
splitter_version_share_ratio{service="web",version="blue"} 0.9
splitter_version_share_ratio{service="web",version="green"} 0.1
# HELP splitter_version_new_flows_total New flows placed on any backend of the version.
# TYPE splitter_version_new_flows_total counter
splitter_version_new_flows_total{service="web",version="blue"} 7
splitter_version_new_flows_total{service="web",version="green"} 3
# HELP splitter_version_live_flows Established flows on the version's backends now (from the connection table).
# TYPE splitter_version_live_flows gauge
splitter_version_live_flows{service="web",version="blue"} 3
splitter_version_live_flows{service="web",version="green"} 1
# HELP splitter_backend_state The backend's state: 1 on the series of its current state (active, drain or disabled).
# TYPE splitter_backend_state gauge
splitter_backend_state{service="web",version="blue",backend="10.0.2.2:8080",state="active"} 1
splitter_backend_state{service="web",version="green",backend="10.0.2.3:8080",state="active"} 1
# HELP splitter_backend_health_up 1 if the backend passes its health checks, 0 if it is down (only backends of services with [service.health]).
# TYPE splitter_backend_health_up gauge
splitter_backend_health_up{service="web",version="blue",backend="10.0.2.2:8080"} 1
splitter_backend_health_up{service="web",version="green",backend="10.0.2.3:8080"} 0
# HELP splitter_backend_weight Weight of the backend inside its version.
# TYPE splitter_backend_weight gauge
splitter_backend_weight{service="web",version="blue",backend="10.0.2.2:8080"} 1
splitter_backend_weight{service="web",version="green",backend="10.0.2.3:8080"} 1
# HELP splitter_backend_live_flows Established flows bound to the backend now (from the connection table, recounted about once a second).
# TYPE splitter_backend_live_flows gauge
splitter_backend_live_flows{service="web",version="blue",backend="10.0.2.2:8080"} 3
splitter_backend_live_flows{service="web",version="green",backend="10.0.2.3:8080"} 1
# HELP splitter_backend_packets_total Packets forwarded to the backend.
# TYPE splitter_backend_packets_total counter
splitter_backend_packets_total{service="web",version="blue",backend="10.0.2.2:8080"} 70
splitter_backend_packets_total{service="web",version="green",backend="10.0.2.3:8080"} 30
# HELP splitter_backend_bytes_total Bytes forwarded to the backend.
# TYPE splitter_backend_bytes_total counter
splitter_backend_bytes_total{service="web",version="blue",backend="10.0.2.2:8080"} 7000
splitter_backend_bytes_total{service="web",version="green",backend="10.0.2.3:8080"} 3000
# HELP splitter_backend_new_flows_total New flows bound to the backend.
# TYPE splitter_backend_new_flows_total counter
splitter_backend_new_flows_total{service="web",version="blue",backend="10.0.2.2:8080"} 7
splitter_backend_new_flows_total{service="web",version="green",backend="10.0.2.3:8080"} 3
# HELP splitter_backend_reply_packets_total Reply packets from the backend translated back to clients.
# TYPE splitter_backend_reply_packets_total counter
splitter_backend_reply_packets_total{service="web",version="blue",backend="10.0.2.2:8080"} 56
splitter_backend_reply_packets_total{service="web",version="green",backend="10.0.2.3:8080"} 24
# HELP splitter_backend_reply_bytes_total Reply bytes from the backend translated back to clients.
# TYPE splitter_backend_reply_bytes_total counter
splitter_backend_reply_bytes_total{service="web",version="blue",backend="10.0.2.2:8080"} 28000
splitter_backend_reply_bytes_total{service="web",version="green",backend="10.0.2.3:8080"} 12000
# HELP splitter_dataplane_events_total Data-plane counters by event: drops by reason, packets passed to the kernel, TX, redirects, new flows.
# TYPE splitter_dataplane_events_total counter
splitter_dataplane_events_total{event="drop_no_flow"} 2
splitter_dataplane_events_total{event="new_flow"} 10
splitter_dataplane_events_total{event="tx"} 0
# HELP splitter_drops_total Packets the data plane dropped, by reason (the drop_* events without their prefix).
# TYPE splitter_drops_total counter
splitter_drops_total{reason="no_flow"} 2
# HELP splitter_service_drops_total Packets of a service the data plane dropped, by reason (drops that happen once the service is known; also in splitter_drops_total).
# TYPE splitter_service_drops_total counter
splitter_service_drops_total{service="web",reason="no_backend"} 0
splitter_service_drops_total{service="web",reason="no_flow"} 2
"#;

    #[test]
    fn sample_report_renders_exactly() {
        let got = render(&sample());
        for (i, (g, w)) in got.lines().zip(EXPECTED.lines()).enumerate() {
            assert_eq!(g, w, "line {}", i + 1);
        }
        assert_eq!(got, EXPECTED);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label(r#"a\b"c"#), r#"a\\b\"c"#);
        assert_eq!(escape_label("line\nbreak"), r"line\nbreak");
        assert_eq!(escape_label("plain-1.2_x"), "plain-1.2_x");
        assert_eq!(escape_help("a\\b\nc"), r"a\\b\nc");
        let mut r = sample();
        r.services[0].name = "we\"b\\\n".into();
        let got = render(&r);
        assert!(
            got.contains(r#"splitter_version_weight{service="we\"b\\\n",version="blue"} 90"#),
            "{got}"
        );
        assert!(got.lines().all(|l| !l.is_empty()), "a raw newline leaked");
    }

    #[test]
    fn special_floats_use_the_format_spelling() {
        assert_eq!(float(f64::NAN), "NaN");
        assert_eq!(float(f64::INFINITY), "+Inf");
        assert_eq!(float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(float(0.0), "0");
        assert_eq!(float(1.0), "1");
        assert_eq!(float(0.25), "0.25");
    }

    #[test]
    fn zero_weights_give_share_zero() {
        let mut r = sample();
        for v in &mut r.services[0].versions {
            v.weight = 0;
        }
        let got = render(&r);
        assert!(got.contains("splitter_version_share_ratio{service=\"web\",version=\"blue\"} 0\n"));
    }

    /// A parsed sample: name, labels (unescaped), value.
    type Sample = (String, Vec<(String, String)>, f64);

    /// Parses one sample line as `name{k="v",...} value`, undoing escapes.
    fn parse_sample(line: &str) -> Option<Sample> {
        let name_end = line.find(['{', ' '])?;
        let name = &line[..name_end];
        let name_ok = !name.is_empty()
            && name.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            });
        if !name_ok {
            return None;
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            rest = r;
            loop {
                if let Some(r) = rest.strip_prefix('}') {
                    rest = r;
                    break;
                }
                let eq = rest.find('=')?;
                let key = rest[..eq].to_string();
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return None;
                }
                let mut chars = rest[eq + 1..].strip_prefix('"')?.char_indices();
                let mut value = String::new();
                let end = loop {
                    match chars.next()? {
                        (_, '\\') => match chars.next()?.1 {
                            '\\' => value.push('\\'),
                            '"' => value.push('"'),
                            'n' => value.push('\n'),
                            _ => return None,
                        },
                        (i, '"') => break i,
                        (_, '\n') => return None,
                        (_, c) => value.push(c),
                    }
                };
                labels.push((key, value));
                rest = &rest[eq + 1 + 1 + end + 1..];
                if let Some(r) = rest.strip_prefix(',') {
                    rest = r;
                }
            }
        }
        let value = rest.strip_prefix(' ')?;
        let v = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().ok()?,
        };
        Some((name.to_string(), labels, v))
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let mut r = sample();
        r.services[0].versions[0].name = "odd \"name\"\\\nhere,{}=".into();
        let text = render(&r);
        assert!(text.ends_with('\n'));
        let mut families = Vec::new();
        for line in text.lines() {
            if let Some(c) = line.strip_prefix("# ") {
                let mut parts = c.splitn(3, ' ');
                let (kw, name) = (parts.next().unwrap(), parts.next().unwrap());
                match kw {
                    "HELP" => families.push(name.to_string()),
                    "TYPE" => {
                        assert_eq!(Some(name), families.last().map(String::as_str));
                        assert!(matches!(parts.next(), Some("counter" | "gauge")), "{line}");
                    }
                    _ => panic!("unknown comment: {line}"),
                }
                continue;
            }
            let (name, labels, _) =
                parse_sample(line).unwrap_or_else(|| panic!("not a sample: {line:?}"));
            assert_eq!(Some(&name), families.last(), "sample outside its family");
            if let Some((_, v)) = labels.iter().find(|(k, _)| k == "version") {
                assert!(v == "odd \"name\"\\\nhere,{}=" || v == "green", "{v:?}");
            }
        }
        let unique: std::collections::BTreeSet<&String> = families.iter().collect();
        assert_eq!(unique.len(), families.len(), "a family appears twice");
        for want in [
            "splitter_backend_packets_total",
            "splitter_backend_bytes_total",
            "splitter_backend_new_flows_total",
            "splitter_backend_reply_packets_total",
            "splitter_backend_reply_bytes_total",
            "splitter_version_weight",
            "splitter_version_share_ratio",
            "splitter_version_new_flows_total",
            "splitter_service_info",
            "splitter_dataplane_events_total",
            "splitter_drops_total",
        ] {
            assert!(families.iter().any(|f| f == want), "{want} missing");
        }
    }

    #[test]
    fn an_empty_report_is_still_valid() {
        let mut r = sample();
        r.services.clear();
        r.counters.clear();
        let text = render(&r);
        assert!(text.lines().all(|l| l.starts_with("# ")), "{text}");
    }
}
