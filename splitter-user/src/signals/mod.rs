//! Signals: how each backend's connections really open and end, measured
//! by the kernel program, plus an optional external metric per version,
//! kept as a bounded history and judged by a pure analysis.
//!
//! - [`Counters`]: one backend's cumulative counters at one instant, as the
//!   kernel keeps them (`BACKEND_STATS`, `BACKEND_SIGNALS`) plus the
//!   timeouts the controller's sweep found (pure data);
//! - [`Window`]: what a span of time of those counters says: rates, error
//!   rate with its parts, connect-latency percentiles (pure data);
//! - [`history`]: the once-a-second samples of every backend, bounded, and
//!   the windows over them (pure, no I/O);
//! - [`analysis`]: a canary's window against its baseline's and the
//!   criteria: `Pass`, `Fail` or `Inconclusive` (pure, no I/O);
//! - [`external`]: the Prometheus query of `[service.analysis]` (HTTP).
use serde::{Deserialize, Serialize};
use splitter_common::{BackendSignals, BackendStats, LATENCY_BOUNDS_US, LATENCY_BUCKETS};

pub mod analysis;
pub mod external;
pub mod history;

/// How far back the signal history reaches: the longest window a status,
/// the API or an analysis can ask for.
pub const HISTORY_SECS: u64 = 600;
/// The window `splitter status` and the API use without `--window`.
pub const DEFAULT_WINDOW_SECS: u64 = 60;

/// Parses a window length (`60s`, `5m`, `1m30s`, `500ms`; a bare number is
/// seconds) into ms, within 1 s ..= [`HISTORY_SECS`].
///
/// # Errors
/// A message naming the value and the accepted forms.
pub fn parse_window(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let d = match t.parse::<u64>() {
        Ok(secs) => std::time::Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(t).map_err(|e| {
            format!("window {text:?} is not a duration like 60s, 5m or 1m30s ({e})")
        })?,
    };
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if (1000..=HISTORY_SECS * 1000).contains(&ms) {
        Ok(ms)
    } else {
        Err(format!(
            "window {text:?} is outside 1s..={HISTORY_SECS}s (the signal history's length)"
        ))
    }
}

/// One backend's cumulative signal counters at one instant. Every field
/// only grows while the backend's id lives; a smaller value than before
/// means the counters restarted (a new data plane, a recycled id, a
/// restarted daemon for the swept timeouts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// New flows forwarded to the backend (TCP: first SYN; UDP: first
    /// datagram).
    pub attempts: u64,
    /// TCP: SYN-ACKs seen. UDP: flows that got a reply.
    pub established: u64,
    /// TCP: SYNs answered with RST.
    pub refused: u64,
    /// Flows with no answer within the service's `connect_timeout_ms`.
    pub timeouts: u64,
    /// RSTs from the backend on established TCP flows.
    pub reset_by_backend: u64,
    /// RSTs from clients (not errors of the backend; shown apart).
    pub reset_by_client: u64,
    /// Packets (UDP: datagrams) forwarded to the backend.
    pub packets: u64,
    /// Packets (UDP: datagrams) from the backend translated back.
    pub reply_packets: u64,
    /// Sum of the sampled connect latencies, in microseconds.
    pub latency_sum_us: u64,
    /// Connect latencies by bucket of [`LATENCY_BOUNDS_US`] (not
    /// cumulative; the last bucket is above the last bound).
    pub latency: [u64; LATENCY_BUCKETS],
}

impl Counters {
    /// The counters of one backend from its kernel entries (summed over
    /// CPUs) and the timeouts the controller's sweep counted for it.
    pub fn from_kernel(stats: &BackendStats, sig: &BackendSignals, swept_timeouts: u64) -> Self {
        Self {
            attempts: stats.new_flows,
            established: sig.established,
            refused: sig.refused,
            timeouts: sig.timeouts + swept_timeouts,
            reset_by_backend: sig.reset_by_backend,
            reset_by_client: sig.reset_by_client,
            packets: stats.packets,
            reply_packets: stats.reply_packets,
            latency_sum_us: sig.latency_sum_us,
            latency: sig.latency,
        }
    }

    /// Failed attempts and broken connections the backend is to blame for:
    /// refused + timeouts + reset_by_backend.
    pub fn errors(&self) -> u64 {
        self.refused + self.timeouts + self.reset_by_backend
    }

    /// Adds `other` field by field (a version's sum of its backends).
    pub fn add(&mut self, other: &Counters) {
        self.attempts += other.attempts;
        self.established += other.established;
        self.refused += other.refused;
        self.timeouts += other.timeouts;
        self.reset_by_backend += other.reset_by_backend;
        self.reset_by_client += other.reset_by_client;
        self.packets += other.packets;
        self.reply_packets += other.reply_packets;
        self.latency_sum_us += other.latency_sum_us;
        for (a, b) in self.latency.iter_mut().zip(other.latency) {
            *a += b;
        }
    }

    /// Connect latencies sampled (the histogram's count).
    pub fn latency_count(&self) -> u64 {
        self.latency.iter().sum()
    }
}

/// Upper bounds of the connect-latency buckets in seconds, the last one
/// `+Inf` (as Prometheus's `le` labels read them).
pub fn latency_bounds_seconds() -> [f64; LATENCY_BUCKETS] {
    let mut out = [f64::INFINITY; LATENCY_BUCKETS];
    for (o, us) in out.iter_mut().zip(LATENCY_BOUNDS_US) {
        *o = us as f64 / 1e6;
    }
    out
}

/// What a span of time of one backend's (or the sum of a version's
/// backends') counters says.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Seconds the window really covers (shorter than asked while the
    /// history is young).
    pub seconds: f64,
    /// Counter increases over the window.
    pub attempts: u64,
    /// See [`Counters::established`].
    pub established: u64,
    /// See [`Counters::refused`].
    pub refused: u64,
    /// See [`Counters::timeouts`].
    pub timeouts: u64,
    /// See [`Counters::reset_by_backend`].
    pub reset_by_backend: u64,
    /// See [`Counters::reset_by_client`].
    pub reset_by_client: u64,
    /// New flows per second.
    pub attempts_per_sec: f64,
    /// (refused + timeouts + reset_by_backend) / attempts, at most 1;
    /// `None` without attempts.
    pub error_rate: Option<f64>,
    /// Connect-latency percentiles in ms, from the bucket increases
    /// (linear inside a bucket, as Prometheus's `histogram_quantile`);
    /// `None` without samples.
    pub latency_p50_ms: Option<f64>,
    /// 90th percentile, as above.
    pub latency_p90_ms: Option<f64>,
    /// 99th percentile, as above.
    pub latency_p99_ms: Option<f64>,
    /// Latency bucket increases (not cumulative).
    pub latency: [u64; LATENCY_BUCKETS],
}

/// The external metric of one version (`[service.analysis]`), as last
/// read: a number, or the reason there is none. An error is never read as
/// a number.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricReading {
    /// The query as sent (placeholders filled in).
    pub query: String,
    /// The value, when the last query gave exactly one number.
    pub value: Option<f64>,
    /// Why the last query gave no value (unreachable, bad PromQL, empty or
    /// multi-series result...).
    pub error: Option<String>,
    /// Seconds since the reading was taken.
    pub age_secs: f64,
}
