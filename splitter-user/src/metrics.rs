//! The Prometheus endpoint: [`render`] turns a [`StatusReport`] into the
//! Prometheus text exposition format (version 0.0.4), encoded by the
//! [`prometheus_client`] crate, and [`serve`] answers `GET /metrics` with it
//! over HTTP/1.1 on a TCP listener (`[metrics] listen`, `127.0.0.1:9470` by
//! default).
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `splitter_program_info` | gauge (always 1) | `id`, `tag`, `source` of the running kernel program |
//! | `splitter_service_info` | gauge (always 1) | `service`, `vip`, `protocol`, `affinity` |
//! | `splitter_version_weight` | gauge | `service`, `version` |
//! | `splitter_version_share_ratio` | gauge, 0..1 | `service`, `version` |
//! | `splitter_version_new_flows_total` | counter | `service`, `version` |
//! | `splitter_version_live_flows` | gauge | `service`, `version` |
//! | `splitter_version_error_ratio` | gauge, 0..1 (only with a status window that saw attempts) | `service`, `version` |
//! | `splitter_version_external_metric` | gauge (only when the last `[service.analysis]` query gave a value) | `service`, `version` |
//! | `splitter_backend_state` | gauge (1 for the current state) | `service`, `version`, `backend`, `state` |
//! | `splitter_backend_health_up` | gauge (1 up, 0 down; only checked backends) | `service`, `version`, `backend` |
//! | `splitter_backend_weight` | gauge | `service`, `version`, `backend` |
//! | `splitter_backend_live_flows` | gauge | `service`, `version`, `backend` |
//! | `splitter_backend_packets_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_bytes_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_new_flows_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_reply_packets_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_reply_bytes_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_connections_established_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_connections_refused_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_connect_timeouts_total` | counter | `service`, `version`, `backend` |
//! | `splitter_backend_resets_total` | counter | `service`, `version`, `backend`, `by` (`backend` or `client`) |
//! | `splitter_backend_connect_latency_seconds` | histogram (`_bucket` with `le`, `_sum`, `_count`) | `service`, `version`, `backend` |
//! | `splitter_dataplane_events_total` | counter | `event` (every data-plane counter) |
//! | `splitter_drops_total` | counter | `reason` (the `drop_*` counters, prefix removed) |
//! | `splitter_service_drops_total` | counter | `service`, `reason` (drops once the service is known) |
//! | `splitter_shadow_ratio` | gauge, 0..1 (only mirrored services) | `service`, `version` (the shadow) |
//! | `splitter_shadow_answers_dropped_total` | counter (only mirrored services) | `service`, `version` (the shadow) |
//! | `splitter_shadow_tee_flows_total` | counter (only mirrored TCP services) | `service` |
//! | `splitter_shadow_tee_fell_behind_total` | counter (only mirrored TCP services) | `service` |
//! | `splitter_shadow_tee_errors_total` | counter (only mirrored TCP services) | `service`, `side` (`stable`, `shadow`) |
//! | `splitter_shadow_tee_response_bytes_total` | counter (only mirrored TCP services) | `service`, `side` |
//! | `splitter_shadow_tee_first_byte_mean_seconds` | gauge (only mirrored TCP services that answered) | `service`, `side` |
//! | `splitter_rollout_info` | gauge (always 1) | `service`, `from`, `to`, `strategy`, `state` (`running`, `paused`, `completed`, `rolled-back`, `aborted`) |
//! | `splitter_rollout_step` | gauge (from 1) | `service` |
//! | `splitter_rollout_target_share_ratio` | gauge, 0..1 | `service` |
//! | `splitter_rollouts_ended_total` | counter (since the daemon started) | `service`, `outcome` (`completed`, `rolled_back`, `aborted`, `undone`) |
//!
//! Every scrape reads the counters live through [`Controller::status`], the
//! same numbers `splitter status` shows, and encodes them through a fresh
//! [`Registry`] holding one [`Collector`] over that report. Counters
//! restart from 0 when the data plane is created anew (after a detach),
//! which Prometheus treats as an ordinary counter reset.
use std::{convert::Infallible, fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioTimer;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet, prometheus_text,
    },
    metrics::{MetricType, TypedMetric, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use splitter_common::LATENCY_BUCKETS;
use tokio::{net::TcpListener, task::JoinSet};
use tracing::{debug, warn};

use crate::{
    api::{BackendReport, ServiceReport, StatusReport, VersionReport},
    controller::Controller,
    signals::{Counters, latency_bounds_seconds},
};

/// `Content-Type` of the text exposition format (0.0.4, UTF-8).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The only path served.
pub const PATH: &str = "/metrics";

/// Longest a client may take to send its request headers, counted from
/// when the connection opens or its previous answer went out: also the
/// idle keep-alive timeout (the API's, [`crate::api::HEADER_TIMEOUT`]).
const HEADER_TIMEOUT: Duration = crate::api::HEADER_TIMEOUT;

/// Most scrape connections open at once (Prometheus keeps one per
/// target); past it a new connection is answered 503 and closed.
const MAX_CONNECTIONS: usize = 64;

/// The whole answer to a connection past [`MAX_CONNECTIONS`].
const BUSY: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 34\r\nconnection: close\r\n\r\ntoo many metrics connections open\n";

/// A histogram known by its buckets rather than by observations (the
/// crate's own `Histogram` can only observe): the data plane's per-bucket
/// counts, encoded as Prometheus's cumulative `_bucket{le}` series,
/// `_sum` and `_count`.
#[derive(Debug)]
struct BucketHistogram {
    /// `(upper bound, count in this bucket alone)`, bounds ascending, the
    /// last `+Inf`.
    buckets: [(f64, u64); LATENCY_BUCKETS],
    /// Sum of the observed values.
    sum: f64,
    /// Sum of the bucket counts.
    count: u64,
}

impl BucketHistogram {
    /// The connect-latency histogram of `c`, in seconds. Were the bucket
    /// counts to add up past `u64::MAX`, the excess is left out so the
    /// cumulative series never wrap and `+Inf` stays equal to `_count`.
    fn connect_latency(c: &Counters) -> Self {
        let mut buckets = [(f64::INFINITY, 0); LATENCY_BUCKETS];
        let mut count = 0u64;
        for ((b, le), n) in buckets
            .iter_mut()
            .zip(latency_bounds_seconds())
            .zip(c.latency)
        {
            let n = n.min(u64::MAX - count);
            count += n;
            *b = (le, n);
        }
        Self {
            buckets,
            sum: c.latency_sum_us as f64 / 1e6,
            count,
        }
    }
}

impl TypedMetric for BucketHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for BucketHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        // The encoder makes the buckets cumulative.
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Writes one metric family: its `# HELP` and `# TYPE` lines, then one
/// series (or, for a histogram, one group of series) per sample. `name` is
/// the name as exposed: a counter's `_total` is written by the encoder,
/// so it is taken off here first.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, M)>,
) -> fmt::Result
where
    L: EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    let name = match M::TYPE {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    let mut family = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

fn gauge<N>(v: N) -> ConstGauge<N> {
    ConstGauge::new(v)
}

fn version_labels<'a>(s: &'a ServiceReport, v: &'a VersionReport) -> [(&'static str, &'a str); 2] {
    [("service", &s.name), ("version", &v.name)]
}

fn backend_labels<'a>(
    s: &'a ServiceReport,
    v: &'a VersionReport,
    b: &'a BackendReport,
) -> [(&'static str, &'a str); 3] {
    [
        ("service", &s.name),
        ("version", &v.name),
        ("backend", &b.address),
    ]
}

/// The families of one report, in a fixed order; encoded afresh at every
/// scrape.
#[derive(Debug)]
struct ReportCollector(StatusReport);

impl Collector for ReportCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let report = &self.0;
        let e = &mut e;

        let program = report.dataplane.program.as_ref().map(|p| {
            let id = p.id.to_string();
            (id, p.tag.as_str(), p.source.as_str())
        });
        family(
            e,
            "splitter_program_info",
            "The running kernel program (always 1): its id, its tag (a hash of its instructions: another build, another tag) and where it was loaded from.",
            program.iter().map(|(id, tag, source)| {
                (
                    [("id", id.as_str()), ("tag", tag), ("source", source)],
                    gauge(1u32),
                )
            }),
        )?;
        family(
            e,
            "splitter_service_info",
            "A configured service (always 1), with its VIP, protocol and affinity.",
            report.services.iter().map(|s| {
                (
                    [
                        ("service", s.name.as_str()),
                        ("vip", &s.vip),
                        ("protocol", &s.protocol),
                        ("affinity", &s.affinity),
                    ],
                    gauge(1u32),
                )
            }),
        )?;

        let versions = || {
            report.services.iter().flat_map(|s| {
                let total: u64 = s.versions.iter().map(|v| u64::from(v.weight)).sum();
                s.versions.iter().map(move |v| (s, v, total))
            })
        };
        let backends =
            || versions().flat_map(|(s, v, _)| v.backends.iter().map(move |b| (s, v, b)));

        family(
            e,
            "splitter_version_weight",
            "Configured weight of a version (relative to the other versions of its service).",
            versions().map(|(s, v, _)| (version_labels(s, v), gauge(v.weight))),
        )?;
        family(
            e,
            "splitter_version_share_ratio",
            "Share of new flows the version's weight gives it, 0 to 1.",
            versions().map(|(s, v, total)| {
                let share = if total == 0 {
                    0.0
                } else {
                    f64::from(v.weight) / total as f64
                };
                (version_labels(s, v), gauge(share))
            }),
        )?;
        family(
            e,
            "splitter_version_new_flows_total",
            "New flows placed on any backend of the version.",
            versions().map(|(s, v, _)| (version_labels(s, v), counter(v.new_flows))),
        )?;
        family(
            e,
            "splitter_version_live_flows",
            "Established flows on the version's backends now (from the connection table).",
            versions().map(|(s, v, _)| (version_labels(s, v), gauge(v.live_flows))),
        )?;
        family(
            e,
            "splitter_version_error_ratio",
            "Share of the version's new flows over the last status window that failed (refused, timed out or reset by the backend), 0 to 1; absent while the window saw no attempts.",
            versions().filter_map(|(s, v, _)| {
                let r = v.window.as_ref()?.error_rate?;
                Some((version_labels(s, v), gauge(r)))
            }),
        )?;
        family(
            e,
            "splitter_version_external_metric",
            "The version's external metric ([service.analysis] query) as last read; absent when not configured or when the last query gave no single number.",
            versions().filter_map(|(s, v, _)| {
                let m = v.metric.as_ref()?.value?;
                Some((version_labels(s, v), gauge(m)))
            }),
        )?;

        family(
            e,
            "splitter_backend_state",
            "The backend's state: 1 on the series of its current state (active, drain or disabled).",
            backends().map(|(s, v, b)| {
                (
                    [
                        ("service", s.name.as_str()),
                        ("version", &v.name),
                        ("backend", &b.address),
                        ("state", &b.state),
                    ],
                    gauge(1u32),
                )
            }),
        )?;
        family(
            e,
            "splitter_backend_health_up",
            "1 if the backend passes its health checks, 0 if it is down (only backends of services with [service.health]).",
            backends()
                .filter(|(_, _, b)| b.health == "up" || b.health == "down")
                .map(|(s, v, b)| (backend_labels(s, v, b), gauge(u32::from(b.health == "up")))),
        )?;

        type Field = fn(&BackendReport) -> u64;
        let gauges: [(&str, &str, Field); 2] = [
            (
                "splitter_backend_weight",
                "Weight of the backend inside its version.",
                |b| u64::from(b.weight),
            ),
            (
                "splitter_backend_live_flows",
                "Established flows bound to the backend now (from the connection table, recounted about once a second).",
                |b| b.live_flows,
            ),
        ];
        for (name, help, field) in gauges {
            family(
                e,
                name,
                help,
                backends().map(|(s, v, b)| (backend_labels(s, v, b), gauge(field(b)))),
            )?;
        }
        let counters: [(&str, &str, Field); 8] = [
            (
                "splitter_backend_packets_total",
                "Packets forwarded to the backend.",
                |b| b.packets,
            ),
            (
                "splitter_backend_bytes_total",
                "Bytes forwarded to the backend.",
                |b| b.bytes,
            ),
            (
                "splitter_backend_new_flows_total",
                "New flows bound to the backend.",
                |b| b.new_flows,
            ),
            (
                "splitter_backend_reply_packets_total",
                "Reply packets from the backend translated back to clients.",
                |b| b.reply_packets,
            ),
            (
                "splitter_backend_reply_bytes_total",
                "Reply bytes from the backend translated back to clients.",
                |b| b.reply_bytes,
            ),
            (
                "splitter_backend_connections_established_total",
                "Connections the backend accepted: TCP SYN-ACKs seen, UDP flows that got a first reply.",
                |b| b.signals.established,
            ),
            (
                "splitter_backend_connections_refused_total",
                "TCP connection attempts the backend refused (a SYN answered with RST).",
                |b| b.signals.refused,
            ),
            (
                "splitter_backend_connect_timeouts_total",
                "New flows the backend did not answer within the service's connect_timeout_ms.",
                |b| b.signals.timeouts,
            ),
        ];
        for (name, help, field) in counters {
            family(
                e,
                name,
                help,
                backends().map(|(s, v, b)| (backend_labels(s, v, b), counter(field(b)))),
            )?;
        }
        family(
            e,
            "splitter_backend_resets_total",
            "TCP flows of the backend reset (the first RST of each flow), by who sent it: by=\"backend\" (on an established flow; an error of the backend) or by=\"client\" (in any state).",
            backends().flat_map(|(s, v, b)| {
                [
                    ("backend", b.signals.reset_by_backend),
                    ("client", b.signals.reset_by_client),
                ]
                .map(|(by, n)| {
                    (
                        [
                            ("service", s.name.as_str()),
                            ("version", &v.name),
                            ("backend", &b.address),
                            ("by", by),
                        ],
                        counter(n),
                    )
                })
            }),
        )?;
        family(
            e,
            "splitter_backend_connect_latency_seconds",
            "Connect latency of the backend's flows: from the first packet forwarded to the backend to its first answer (TCP: the SYN-ACK), one per established flow.",
            backends().map(|(s, v, b)| {
                (
                    backend_labels(s, v, b),
                    BucketHistogram::connect_latency(&b.signals),
                )
            }),
        )?;

        family(
            e,
            "splitter_dataplane_events_total",
            "Data-plane counters by event: drops by reason, packets passed to the kernel, TX, redirects, new flows.",
            report
                .counters
                .iter()
                .map(|(event, v)| ([("event", event.as_str())], counter(*v))),
        )?;
        family(
            e,
            "splitter_drops_total",
            "Packets the data plane dropped, by reason (the drop_* events without their prefix).",
            report.counters.iter().filter_map(|(event, v)| {
                let reason = event.strip_prefix("drop_")?;
                Some(([("reason", reason)], counter(*v)))
            }),
        )?;
        family(
            e,
            "splitter_service_drops_total",
            "Packets of a service the data plane dropped, by reason (drops that happen once the service is known; also in splitter_drops_total).",
            report.services.iter().flat_map(|s| {
                s.drops.iter().map(move |(reason, v)| {
                    (
                        [("service", s.name.as_str()), ("reason", reason.as_str())],
                        counter(*v),
                    )
                })
            }),
        )?;
        let shadows = || {
            report
                .services
                .iter()
                .filter_map(|s| s.shadow.as_ref().map(|sh| (s.name.as_str(), sh)))
        };
        family(
            e,
            "splitter_shadow_ratio",
            "Share of a service's traffic mirrored to its shadow version (UDP: of datagrams), 0..1; only mirrored services.",
            shadows().map(|(s, sh)| {
                (
                    [("service", s), ("version", sh.version.as_str())],
                    gauge(f64::from(sh.percent) / 100.0),
                )
            }),
        )?;
        family(
            e,
            "splitter_shadow_answers_dropped_total",
            "Answers from a service's shadow version, dropped at the edge, never sent to a client (UDP: packets; TCP: connections whose answer the tee read and dropped). UDP: the copies, their flows, answers, timeouts and first-answer latency are the shadow version's splitter_backend_* series; TCP: see splitter_shadow_tee_*.",
            shadows().map(|(s, sh)| {
                (
                    [("service", s), ("version", sh.version.as_str())],
                    counter(sh.answers_dropped),
                )
            }),
        )?;
        let tees = || shadows().filter_map(|(s, sh)| sh.tee.as_ref().map(|t| (s, t)));
        let sides =
            || tees().flat_map(|(s, t)| [(s, "stable", &t.stable), (s, "shadow", &t.shadow)]);
        family(
            e,
            "splitter_shadow_tee_flows_total",
            "Mirrored TCP flows the edge's tee served (each to a stable backend, and copied to a shadow backend).",
            tees().map(|(s, t)| ([("service", s)], counter(t.flows))),
        )?;
        family(
            e,
            "splitter_shadow_tee_fell_behind_total",
            "Shadow connections the tee cut off: the shadow fell more than 1 MiB behind its client, or was still busy 5 s after the client's connection ended.",
            tees().map(|(s, t)| ([("service", s)], counter(t.fell_behind))),
        )?;
        family(
            e,
            "splitter_shadow_tee_errors_total",
            "Connections of mirrored TCP flows refused, timed out or reset by the backend, by side (stable or shadow; the same flows).",
            sides().map(|(s, side, x)| ([("service", s), ("side", side)], counter(x.errors()))),
        )?;
        family(
            e,
            "splitter_shadow_tee_response_bytes_total",
            "Response bytes of mirrored TCP flows, by side (the shadow's are read and dropped at the edge).",
            sides()
                .map(|(s, side, x)| ([("service", s), ("side", side)], counter(x.response_bytes))),
        )?;
        family(
            e,
            "splitter_shadow_tee_first_byte_mean_seconds",
            "Mean time from the request's first bytes to the first response byte over mirrored TCP flows, by side (the same flows).",
            sides().filter_map(|(s, side, x)| {
                x.ttfb_mean_us()
                    .map(|us| ([("service", s), ("side", side)], gauge(us as f64 / 1e6)))
            }),
        )?;
        family(
            e,
            "splitter_rollout_info",
            "A rollout the daemon knows (1), with its versions, strategy and state.",
            report.rollouts.iter().map(|r| {
                (
                    [
                        ("service", r.service.as_str()),
                        ("from", r.from.as_str()),
                        ("to", r.to.as_str()),
                        ("strategy", r.strategy.as_str()),
                        ("state", r.state.as_str()),
                    ],
                    gauge(1),
                )
            }),
        )?;
        family(
            e,
            "splitter_rollout_step",
            "The step a rollout is at, from 1.",
            report
                .rollouts
                .iter()
                .map(|r| ([("service", r.service.as_str())], gauge(r.step as i64))),
        )?;
        family(
            e,
            "splitter_rollout_target_share_ratio",
            "Share of new flows a rollout gives its target version now, 0..1.",
            report.rollouts.iter().map(|r| {
                (
                    [("service", r.service.as_str())],
                    gauge(f64::from(r.target_percent) / 100.0),
                )
            }),
        )?;
        family(
            e,
            "splitter_rollouts_ended_total",
            "Rollouts ended since the daemon started, by outcome (rolled_back: an analysis failed; aborted: a command or a failed deploy hook).",
            report.rollouts_ended.iter().map(|x| {
                (
                    [
                        ("service", x.service.as_str()),
                        ("outcome", x.outcome.as_str()),
                    ],
                    counter(x.count),
                )
            }),
        )?;
        Ok(())
    }
}

/// The report in the Prometheus text exposition format (0.0.4): each
/// family's `# HELP` and `# TYPE` lines followed by its samples, families
/// in a fixed order, services, versions and backends in configuration
/// order, data-plane counters by name.
pub fn render(report: &StatusReport) -> String {
    match try_render(report) {
        Ok(text) => text,
        Err(e) => {
            // Writing to a String does not fail; nor should the encoder.
            warn!(error = %e, "encoding the metrics failed");
            String::new()
        }
    }
}

/// [`render`], or the encoder's error.
fn try_render(report: &StatusReport) -> Result<String, fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ReportCollector(report.clone())));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

type Shared = Arc<std::sync::Mutex<Controller>>;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; then
/// closes the listener and ends every open connection before returning.
/// Other paths answer 404, other methods on `/metrics` 405. Connections
/// are held to [`HEADER_TIMEOUT`], to the API's write timeout (answers
/// nobody reads) and to [`MAX_CONNECTIONS`] at once.
pub async fn serve(listener: TcpListener, controller: Shared, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut connections = JoinSet::new();
    let mut limit = crate::api::ConnectionLimit::new("metrics", MAX_CONNECTIONS);
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
        let Some(permit) = limit.admit() else {
            // Never waiting on the client; the reset that may follow the
            // close is an answer too.
            let _ = stream.try_write(BUSY.as_bytes());
            continue;
        };
        let controller = controller.clone();
        connections.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| handle(controller.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(crate::api::write_bounded(stream), svc)
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
    let body =
        report.and_then(|r| try_render(&r).map_err(|e| format!("encoding them failed: {e}")));
    Ok(match body {
        Ok(body) => {
            let mut resp = text(StatusCode::OK, body);
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
    use crate::{
        api::DataplaneReport,
        signals::{MetricReading, Window},
    };

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
            signals: Counters::default(),
            window: None,
        }
    }

    fn version(name: &str, weight: u32, backends: Vec<BackendReport>) -> VersionReport {
        let mut signals = Counters::default();
        for b in &backends {
            signals.add(&b.signals);
        }
        VersionReport {
            name: name.into(),
            weight,
            share_percent: 0.0,
            new_flows: backends.iter().map(|b| b.new_flows).sum(),
            live_flows: backends.iter().map(|b| b.live_flows).sum(),
            packets: backends.iter().map(|b| b.packets).sum(),
            bytes: backends.iter().map(|b| b.bytes).sum(),
            backends,
            signals,
            window: None,
            metric: None,
        }
    }

    /// Blue's backend: 7 connections, 1 refused, 2 timeouts, resets both
    /// ways, latencies in four buckets (200 us twice, 400 us three times,
    /// 800 us, 3 s).
    fn blue_backend() -> BackendReport {
        let mut b = backend("10.0.2.2:8080", 7);
        let mut latency = [0; LATENCY_BUCKETS];
        latency[1] = 2;
        latency[2] = 3;
        latency[3] = 1;
        latency[LATENCY_BUCKETS - 1] = 1;
        b.signals = Counters {
            attempts: 10,
            established: 7,
            refused: 1,
            timeouts: 2,
            reset_by_backend: 1,
            reset_by_client: 3,
            packets: 70,
            reply_packets: 56,
            latency_sum_us: 2 * 200 + 3 * 400 + 800 + 3_000_000,
            latency,
        };
        b
    }

    fn sample() -> StatusReport {
        let mut blue = version("blue", 90, vec![blue_backend()]);
        blue.window = Some(Window {
            error_rate: Some(0.25),
            ..Window::default()
        });
        blue.metric = Some(MetricReading {
            query: "q".into(),
            value: Some(0.5),
            error: None,
            age_secs: 1.0,
        });
        let mut green = version("green", 10, vec![backend("10.0.2.3:8080", 3)]);
        // A window without attempts and a failed query: no series.
        green.window = Some(Window::default());
        green.metric = Some(MetricReading {
            query: "q".into(),
            value: None,
            error: Some("unreachable".into()),
            age_secs: 1.0,
        });
        StatusReport {
            dataplane: DataplaneReport {
                interface: "ec".into(),
                backend_interface: "eb".into(),
                mode: "snat".into(),
                snat_address: Some("10.0.2.1".into()),
                attachments: vec![],
                program: None,
                conn_capacity: None,
                ephemeral_pins: None,
            },
            services: vec![ServiceReport {
                name: "web".into(),
                vip: "10.0.0.10:80".into(),
                protocol: "tcp".into(),
                affinity: "flow".into(),
                versions: vec![blue, green],
                drops: BTreeMap::from([("no_backend".to_string(), 0), ("no_flow".to_string(), 2)]),
                targets: vec![],
                shadow: None,
            }],
            counters: BTreeMap::from([
                ("drop_no_flow".to_string(), 2),
                ("new_flow".to_string(), 10),
                ("tx".to_string(), 0),
            ]),
            rollouts: vec![crate::report::RolloutReport {
                service: "web".into(),
                from: "blue".into(),
                to: "green".into(),
                strategy: "canary".into(),
                state: "running".into(),
                phase: "progressing at step 2 of 5 (10% to \"green\")".into(),
                step: 2,
                steps: 5,
                target_percent: 10,
                weights: BTreeMap::new(),
                waiting_for: String::new(),
                step_elapsed_secs: 3.0,
                reason: None,
                verdicts: vec![],
                signals: vec![],
                allowed: vec![],
                shadow: None,
            }],
            rollouts_ended: vec![crate::report::RolloutsEnded {
                service: "web".into(),
                outcome: "rolled_back".into(),
                count: 1,
            }],
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
# HELP splitter_version_error_ratio Share of the version's new flows over the last status window that failed (refused, timed out or reset by the backend), 0 to 1; absent while the window saw no attempts.
# TYPE splitter_version_error_ratio gauge
splitter_version_error_ratio{service="web",version="blue"} 0.25
# HELP splitter_version_external_metric The version's external metric ([service.analysis] query) as last read; absent when not configured or when the last query gave no single number.
# TYPE splitter_version_external_metric gauge
splitter_version_external_metric{service="web",version="blue"} 0.5
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
# HELP splitter_backend_connections_established_total Connections the backend accepted: TCP SYN-ACKs seen, UDP flows that got a first reply.
# TYPE splitter_backend_connections_established_total counter
splitter_backend_connections_established_total{service="web",version="blue",backend="10.0.2.2:8080"} 7
splitter_backend_connections_established_total{service="web",version="green",backend="10.0.2.3:8080"} 0
# HELP splitter_backend_connections_refused_total TCP connection attempts the backend refused (a SYN answered with RST).
# TYPE splitter_backend_connections_refused_total counter
splitter_backend_connections_refused_total{service="web",version="blue",backend="10.0.2.2:8080"} 1
splitter_backend_connections_refused_total{service="web",version="green",backend="10.0.2.3:8080"} 0
# HELP splitter_backend_connect_timeouts_total New flows the backend did not answer within the service's connect_timeout_ms.
# TYPE splitter_backend_connect_timeouts_total counter
splitter_backend_connect_timeouts_total{service="web",version="blue",backend="10.0.2.2:8080"} 2
splitter_backend_connect_timeouts_total{service="web",version="green",backend="10.0.2.3:8080"} 0
# HELP splitter_backend_resets_total TCP flows of the backend reset (the first RST of each flow), by who sent it: by="backend" (on an established flow; an error of the backend) or by="client" (in any state).
# TYPE splitter_backend_resets_total counter
splitter_backend_resets_total{service="web",version="blue",backend="10.0.2.2:8080",by="backend"} 1
splitter_backend_resets_total{service="web",version="blue",backend="10.0.2.2:8080",by="client"} 3
splitter_backend_resets_total{service="web",version="green",backend="10.0.2.3:8080",by="backend"} 0
splitter_backend_resets_total{service="web",version="green",backend="10.0.2.3:8080",by="client"} 0
# HELP splitter_backend_connect_latency_seconds Connect latency of the backend's flows: from the first packet forwarded to the backend to its first answer (TCP: the SYN-ACK), one per established flow.
# TYPE splitter_backend_connect_latency_seconds histogram
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.0001"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.00025"} 2
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.0005"} 5
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.001"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.0025"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.005"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.01"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.025"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.05"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.1"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.25"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="0.5"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="1"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="2.5"} 6
splitter_backend_connect_latency_seconds_bucket{service="web",version="blue",backend="10.0.2.2:8080",le="+Inf"} 7
splitter_backend_connect_latency_seconds_sum{service="web",version="blue",backend="10.0.2.2:8080"} 3.0024
splitter_backend_connect_latency_seconds_count{service="web",version="blue",backend="10.0.2.2:8080"} 7
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.0001"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.00025"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.0005"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.001"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.0025"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.005"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.01"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.025"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.05"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.1"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.25"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="0.5"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="1"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="2.5"} 0
splitter_backend_connect_latency_seconds_bucket{service="web",version="green",backend="10.0.2.3:8080",le="+Inf"} 0
splitter_backend_connect_latency_seconds_sum{service="web",version="green",backend="10.0.2.3:8080"} 0.0
splitter_backend_connect_latency_seconds_count{service="web",version="green",backend="10.0.2.3:8080"} 0
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
# HELP splitter_shadow_ratio Share of a service's traffic mirrored to its shadow version (UDP: of datagrams), 0..1; only mirrored services.
# TYPE splitter_shadow_ratio gauge
# HELP splitter_shadow_answers_dropped_total Answers from a service's shadow version, dropped at the edge, never sent to a client (UDP: packets; TCP: connections whose answer the tee read and dropped). UDP: the copies, their flows, answers, timeouts and first-answer latency are the shadow version's splitter_backend_* series; TCP: see splitter_shadow_tee_*.
# TYPE splitter_shadow_answers_dropped_total counter
# HELP splitter_shadow_tee_flows_total Mirrored TCP flows the edge's tee served (each to a stable backend, and copied to a shadow backend).
# TYPE splitter_shadow_tee_flows_total counter
# HELP splitter_shadow_tee_fell_behind_total Shadow connections the tee cut off: the shadow fell more than 1 MiB behind its client, or was still busy 5 s after the client's connection ended.
# TYPE splitter_shadow_tee_fell_behind_total counter
# HELP splitter_shadow_tee_errors_total Connections of mirrored TCP flows refused, timed out or reset by the backend, by side (stable or shadow; the same flows).
# TYPE splitter_shadow_tee_errors_total counter
# HELP splitter_shadow_tee_response_bytes_total Response bytes of mirrored TCP flows, by side (the shadow's are read and dropped at the edge).
# TYPE splitter_shadow_tee_response_bytes_total counter
# HELP splitter_shadow_tee_first_byte_mean_seconds Mean time from the request's first bytes to the first response byte over mirrored TCP flows, by side (the same flows).
# TYPE splitter_shadow_tee_first_byte_mean_seconds gauge
# HELP splitter_rollout_info A rollout the daemon knows (1), with its versions, strategy and state.
# TYPE splitter_rollout_info gauge
splitter_rollout_info{service="web",from="blue",to="green",strategy="canary",state="running"} 1
# HELP splitter_rollout_step The step a rollout is at, from 1.
# TYPE splitter_rollout_step gauge
splitter_rollout_step{service="web"} 2
# HELP splitter_rollout_target_share_ratio Share of new flows a rollout gives its target version now, 0..1.
# TYPE splitter_rollout_target_share_ratio gauge
splitter_rollout_target_share_ratio{service="web"} 0.1
# HELP splitter_rollouts_ended_total Rollouts ended since the daemon started, by outcome (rolled_back: an analysis failed; aborted: a command or a failed deploy hook).
# TYPE splitter_rollouts_ended_total counter
splitter_rollouts_ended_total{service="web",outcome="rolled_back"} 1
"#;

    #[test]
    fn sample_report_renders_exactly() {
        let got = render(&sample());
        for (i, (g, w)) in got.lines().zip(EXPECTED.lines()).enumerate() {
            assert_eq!(g, w, "line {}", i + 1);
        }
        assert_eq!(got, EXPECTED);
    }

    /// Every family and its type, as the module's table gives them.
    const FAMILIES: [(&str, &str); 36] = [
        ("splitter_program_info", "gauge"),
        ("splitter_service_info", "gauge"),
        ("splitter_version_weight", "gauge"),
        ("splitter_version_share_ratio", "gauge"),
        ("splitter_version_new_flows_total", "counter"),
        ("splitter_version_live_flows", "gauge"),
        ("splitter_version_error_ratio", "gauge"),
        ("splitter_version_external_metric", "gauge"),
        ("splitter_backend_state", "gauge"),
        ("splitter_backend_health_up", "gauge"),
        ("splitter_backend_weight", "gauge"),
        ("splitter_backend_live_flows", "gauge"),
        ("splitter_backend_packets_total", "counter"),
        ("splitter_backend_bytes_total", "counter"),
        ("splitter_backend_new_flows_total", "counter"),
        ("splitter_backend_reply_packets_total", "counter"),
        ("splitter_backend_reply_bytes_total", "counter"),
        ("splitter_backend_connections_established_total", "counter"),
        ("splitter_backend_connections_refused_total", "counter"),
        ("splitter_backend_connect_timeouts_total", "counter"),
        ("splitter_backend_resets_total", "counter"),
        ("splitter_backend_connect_latency_seconds", "histogram"),
        ("splitter_dataplane_events_total", "counter"),
        ("splitter_drops_total", "counter"),
        ("splitter_service_drops_total", "counter"),
        ("splitter_shadow_ratio", "gauge"),
        ("splitter_shadow_answers_dropped_total", "counter"),
        ("splitter_shadow_tee_flows_total", "counter"),
        ("splitter_shadow_tee_fell_behind_total", "counter"),
        ("splitter_shadow_tee_errors_total", "counter"),
        ("splitter_shadow_tee_response_bytes_total", "counter"),
        ("splitter_shadow_tee_first_byte_mean_seconds", "gauge"),
        ("splitter_rollout_info", "gauge"),
        ("splitter_rollout_step", "gauge"),
        ("splitter_rollout_target_share_ratio", "gauge"),
        ("splitter_rollouts_ended_total", "counter"),
    ];

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

    /// Checks that every line of `text` is a `# HELP` or `# TYPE` comment
    /// or a valid sample of the family announced last (a histogram's as
    /// `_bucket`, `_sum`, `_count`), that `# TYPE` follows its `# HELP`,
    /// and that no family appears twice. Returns the families' types and
    /// every sample.
    fn check_exposition(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        assert!(text.is_empty() || text.ends_with('\n'));
        let mut families: Vec<(String, String)> = Vec::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(c) = line.strip_prefix("# ") {
                let mut parts = c.splitn(3, ' ');
                let (kw, name) = (parts.next().unwrap(), parts.next().unwrap());
                match kw {
                    "HELP" => families.push((name.to_string(), String::new())),
                    "TYPE" => {
                        let last = families.last_mut().unwrap();
                        assert_eq!(name, last.0, "TYPE without its HELP: {line}");
                        let kind = parts.next().unwrap();
                        assert!(matches!(kind, "counter" | "gauge" | "histogram"), "{line}");
                        last.1 = kind.to_string();
                    }
                    _ => panic!("unknown comment: {line}"),
                }
                continue;
            }
            let sample = parse_sample(line).unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let (family, kind) = families
                .last()
                .unwrap_or_else(|| panic!("sample before any family: {line}"));
            let ok = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| sample.0.strip_suffix(s) == Some(family)),
                _ => &sample.0 == family,
            };
            assert!(ok, "sample outside its family {family}: {line}");
            samples.push(sample);
        }
        let types: BTreeMap<String, String> = families.iter().cloned().collect();
        assert_eq!(types.len(), families.len(), "a family appears twice");
        (types, samples)
    }

    /// The value of the one sample named `name` whose labels include all of `labels`.
    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = samples.iter().filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        });
        let v = found.next()?.2;
        assert!(found.next().is_none(), "{name} {labels:?} matches twice");
        Some(v)
    }

    #[test]
    fn every_family_is_there_with_its_type() {
        let (types, _) = check_exposition(&render(&sample()));
        let want: BTreeMap<String, String> = FAMILIES
            .iter()
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        assert_eq!(types, want);
    }

    #[test]
    fn label_values_are_escaped() {
        let mut r = sample();
        r.services[0].name = "we\"b\\\n".into();
        let got = render(&r);
        assert!(
            got.contains(r#"splitter_version_weight{service="we\"b\\\n",version="blue"} 90"#),
            "{got}"
        );
        assert!(
            got.contains(r#"splitter_backend_connect_latency_seconds_count{service="we\"b\\\n",version="blue",backend="10.0.2.2:8080"} 7"#),
            "{got}"
        );
        assert!(got.lines().all(|l| !l.is_empty()), "a raw newline leaked");
    }

    #[test]
    fn the_program_has_its_info_series() {
        let mut r = sample();
        r.dataplane.program = Some(crate::api::ProgramReport {
            id: 42,
            tag: "0123456789abcdef".into(),
            source: "embedded".into(),
        });
        let got = render(&r);
        assert!(
            got.contains(
                "splitter_program_info{id=\"42\",tag=\"0123456789abcdef\",source=\"embedded\"} 1\n"
            ),
            "{got}"
        );
        check_exposition(&got);
    }

    #[test]
    fn special_floats_use_the_format_spelling() {
        for (v, spelt) in [
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
            (0.25, "0.25"),
        ] {
            let mut r = sample();
            r.services[0].versions[0].metric = Some(MetricReading {
                value: Some(v),
                ..MetricReading::default()
            });
            let got = render(&r);
            let want = format!(
                "splitter_version_external_metric{{service=\"web\",version=\"blue\"}} {spelt}\n"
            );
            assert!(got.contains(&want), "{got}");
        }
    }

    #[test]
    fn zero_weights_give_share_zero() {
        let mut r = sample();
        for v in &mut r.services[0].versions {
            v.weight = 0;
        }
        let (_, samples) = check_exposition(&render(&r));
        for version in ["blue", "green"] {
            assert_eq!(
                value(
                    &samples,
                    "splitter_version_share_ratio",
                    &[("version", version)]
                ),
                Some(0.0)
            );
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_the_count() {
        let r = sample();
        let (_, samples) = check_exposition(&render(&r));
        let bounds = latency_bounds_seconds();
        for b in r.services[0].versions.iter().flat_map(|v| &v.backends) {
            let buckets: Vec<(f64, f64)> = samples
                .iter()
                .filter(|(n, l, _)| {
                    n == "splitter_backend_connect_latency_seconds_bucket"
                        && l.iter().any(|(k, v)| k == "backend" && v == &b.address)
                })
                .map(|(_, l, v)| {
                    let le = &l.iter().find(|(k, _)| k == "le").unwrap().1;
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    };
                    (le, *v)
                })
                .collect();
            let les: Vec<f64> = buckets.iter().map(|(le, _)| *le).collect();
            assert_eq!(les, bounds, "{}", b.address);
            let mut want = 0;
            for ((_, got), n) in buckets.iter().zip(b.signals.latency) {
                want += n;
                assert_eq!(*got, want as f64, "{}: not cumulative", b.address);
            }
            let labels = [("backend", b.address.as_str())];
            let count = value(
                &samples,
                "splitter_backend_connect_latency_seconds_count",
                &labels,
            );
            assert_eq!(buckets.last().map(|(_, v)| *v), count);
            assert_eq!(count, Some(b.signals.latency_count() as f64));
            let sum = value(
                &samples,
                "splitter_backend_connect_latency_seconds_sum",
                &labels,
            );
            assert_eq!(sum, Some(b.signals.latency_sum_us as f64 / 1e6));
        }
        let blue = [("backend", "10.0.2.2:8080")];
        let bucket = |le: &str| {
            let labels = [blue[0], ("le", le)];
            value(
                &samples,
                "splitter_backend_connect_latency_seconds_bucket",
                &labels,
            )
        };
        assert_eq!(bucket("0.0001"), Some(0.0));
        assert_eq!(bucket("0.00025"), Some(2.0));
        assert_eq!(bucket("0.0005"), Some(5.0));
        assert_eq!(bucket("0.001"), Some(6.0));
        assert_eq!(bucket("2.5"), Some(6.0));
        assert_eq!(bucket("+Inf"), Some(7.0));
    }

    #[test]
    fn huge_bucket_counts_do_not_wrap() {
        let mut r = sample();
        let b = &mut r.services[0].versions[0].backends[0];
        b.signals.latency = [u64::MAX; LATENCY_BUCKETS];
        b.signals.latency_sum_us = u64::MAX;
        let (_, samples) = check_exposition(&render(&r));
        let labels = [("backend", "10.0.2.2:8080"), ("le", "+Inf")];
        let inf = value(
            &samples,
            "splitter_backend_connect_latency_seconds_bucket",
            &labels,
        );
        let count = value(
            &samples,
            "splitter_backend_connect_latency_seconds_count",
            &labels[..1],
        );
        assert_eq!(inf, Some(u64::MAX as f64));
        assert_eq!(inf, count);
    }

    #[test]
    fn signal_counters_and_version_gauges_come_from_the_report() {
        let (_, samples) = check_exposition(&render(&sample()));
        let blue = [("version", "blue"), ("backend", "10.0.2.2:8080")];
        for (name, want) in [
            ("splitter_backend_connections_established_total", 7.0),
            ("splitter_backend_connections_refused_total", 1.0),
            ("splitter_backend_connect_timeouts_total", 2.0),
        ] {
            assert_eq!(value(&samples, name, &blue), Some(want), "{name}");
        }
        let resets = |by| {
            let labels = [blue[0], blue[1], ("by", by)];
            value(&samples, "splitter_backend_resets_total", &labels)
        };
        assert_eq!(resets("backend"), Some(1.0));
        assert_eq!(resets("client"), Some(3.0));
        let blue = [("version", "blue")];
        let green = [("version", "green")];
        assert_eq!(
            value(&samples, "splitter_version_error_ratio", &blue),
            Some(0.25)
        );
        assert_eq!(
            value(&samples, "splitter_version_external_metric", &blue),
            Some(0.5)
        );
        assert_eq!(
            value(&samples, "splitter_version_error_ratio", &green),
            None
        );
        assert_eq!(
            value(&samples, "splitter_version_external_metric", &green),
            None
        );

        // No window, no metric: no series either.
        let mut r = sample();
        r.services[0].versions[0].window = None;
        r.services[0].versions[0].metric = None;
        let (_, samples) = check_exposition(&render(&r));
        assert_eq!(value(&samples, "splitter_version_error_ratio", &blue), None);
        assert_eq!(
            value(&samples, "splitter_version_external_metric", &blue),
            None
        );
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let mut r = sample();
        r.services[0].versions[0].name = "odd \"name\"\\\nhere,{}=".into();
        let (types, samples) = check_exposition(&render(&r));
        for (_, labels, _) in &samples {
            if let Some((_, v)) = labels.iter().find(|(k, _)| k == "version") {
                assert!(v == "odd \"name\"\\\nhere,{}=" || v == "green", "{v:?}");
            }
        }
        for (want, _) in FAMILIES {
            assert!(types.contains_key(want), "{want} missing");
        }
    }

    #[test]
    fn an_empty_report_is_still_valid() {
        let mut r = sample();
        r.services.clear();
        r.rollouts.clear();
        r.rollouts_ended.clear();
        let (types, samples) = check_exposition(&render(&r));
        assert_eq!(types.len(), FAMILIES.len());
        assert!(
            samples
                .iter()
                .all(|(n, _, _)| n.starts_with("splitter_dataplane_")
                    || n.starts_with("splitter_drops_")),
            "{samples:?}"
        );
        r.counters.clear();
        let text = render(&r);
        assert!(text.lines().all(|l| l.starts_with("# ")), "{text}");
        check_exposition(&text);
    }
}
