//! What the daemon reports: the JSON documents the API answers with and
//! the CLI, the metrics endpoint and scripts read (status, services,
//! signals, flows). Plain data, no I/O; the controller builds them, the API
//! serializes them ([`crate::api`] re-exports them).
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::signals::{Counters, MetricReading, Window};

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// Interfaces, mode, SNAT address.
    pub dataplane: DataplaneReport,
    /// Every service with its versions and backends.
    pub services: Vec<ServiceReport>,
    /// Data-plane counters by name (drops by reason, TX, redirects, new flows).
    pub counters: BTreeMap<String, u64>,
    /// Every rollout the daemon knows, running and finished.
    #[serde(default)]
    pub rollouts: Vec<RolloutReport>,
    /// Rollouts ended since the daemon started, by service and outcome
    /// (`completed`, `rolled_back`, `aborted`, `undone`).
    #[serde(default)]
    pub rollouts_ended: Vec<RolloutsEnded>,
}

/// How many rollouts of a service ended one way.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutsEnded {
    /// The service.
    pub service: String,
    /// `completed`, `rolled_back`, `aborted` or `undone`.
    pub outcome: String,
    /// How many.
    pub count: u64,
}

/// How the data plane is set up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataplaneReport {
    /// Client-facing interface.
    pub interface: String,
    /// Backend-facing interface.
    pub backend_interface: String,
    /// `snat` or `dnat`.
    pub mode: String,
    /// Source address of SNAT mode.
    pub snat_address: Option<String>,
    /// Where the program is attached and in which XDP mode.
    pub attachments: Vec<AttachmentReport>,
    /// The running kernel program (id, tag, origin).
    #[serde(default)]
    pub program: Option<ProgramReport>,
    /// Connection-table entries (two per flow), as the kernel holds the map.
    #[serde(default)]
    pub conn_capacity: Option<u32>,
    /// Set when the pins vanish with this daemon (a bpffs private to its
    /// mount namespace, accepted by `--ephemeral-pins`): why.
    #[serde(default)]
    pub ephemeral_pins: Option<String>,
}

/// The running kernel program.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProgramReport {
    /// Kernel program id (changes at every load).
    pub id: u32,
    /// Kernel program tag, 16 hex digits: a hash of the instructions, so
    /// another build has another tag.
    pub tag: String,
    /// `embedded`, or the object file given to `splitter daemon --program`.
    pub source: String,
}

/// One XDP attachment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttachmentReport {
    /// Interface name.
    pub interface: String,
    /// `native` or `generic`.
    pub mode: String,
}

/// One service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceReport {
    /// Service name.
    pub name: String,
    /// `addr:port`.
    pub vip: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `flow` or `client-ip`.
    pub affinity: String,
    /// Versions in configuration order.
    pub versions: Vec<VersionReport>,
    /// Drops of this service's packets by reason (`no_flow`, `no_backend`,
    /// `snat_exhausted`, `conn_table`, `backend_disabled`).
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
    /// Source-CIDR rules, longest prefix first (`[[service.target]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetReport>,
    /// Mirroring to a shadow version (`None`: off).
    #[serde(default)]
    pub shadow: Option<ShadowReport>,
}

/// One source-CIDR rule of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TargetReport {
    /// Client network.
    pub cidr: String,
    /// Version its clients' new flows go to.
    pub version: String,
    /// Whether the version has a backend that takes new flows now (active
    /// and not down by its health checks). An inactive rule is skipped by
    /// the data plane: its clients get the weights' choice.
    pub active: bool,
}

/// A service's mirroring and how its shadow answers, beside the stable
/// versions' own counters (taken from the shadow version's backends: the
/// copies are its packets, their answers its replies, dropped at the edge).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShadowReport {
    /// The shadow version.
    pub version: String,
    /// Share mirrored, in percent (UDP: of datagrams; TCP: of new flows).
    pub percent: u32,
    /// Copies sent to the shadow (UDP: datagrams; TCP: connections the tee
    /// opened to it).
    pub copies: u64,
    /// Copies' flows (UDP: client flows whose datagrams were copied; TCP:
    /// flows the tee served).
    pub flows: u64,
    /// Flows the shadow answered at least once.
    pub answered: u64,
    /// Flows with no answer within the service's connect deadline.
    pub timeouts: u64,
    /// Answers from the shadow, dropped at the edge (UDP: packets; TCP:
    /// connections whose answer the tee read and dropped).
    pub answers_dropped: u64,
    /// Their bytes (UDP: whole frames; TCP: the stream's bytes).
    pub answer_bytes: u64,
    /// Mean time from a flow's first copy to the shadow's first answer
    /// (TCP: from the tee's first read of the request), in microseconds
    /// (`None`: no answer yet).
    pub first_answer_mean_us: Option<u64>,
    /// TCP only: the tee's mirrored flows, with the stable and the shadow
    /// side of the same flows (connections, errors, response bytes, time
    /// to first byte).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tee: Option<crate::tee::TeeReport>,
}

impl ShadowReport {
    /// The report of mirroring `percent` to `version`, from that version's
    /// report.
    pub fn of(version: &VersionReport, percent: u32) -> Self {
        let s = &version.signals;
        Self {
            version: version.name.clone(),
            percent,
            copies: version.packets,
            flows: version.new_flows,
            answered: s.established,
            timeouts: s.timeouts,
            answers_dropped: version.backends.iter().map(|b| b.reply_packets).sum(),
            answer_bytes: version.backends.iter().map(|b| b.reply_bytes).sum(),
            first_answer_mean_us: s.latency_sum_us.checked_div(s.established),
            tee: None,
        }
    }

    /// The report of a TCP service's mirroring: its counts are the tee's
    /// (copies: connections opened to the shadow; flows: flows the tee
    /// served; answers: read by the tee and dropped, never sent on).
    pub fn with_tee(self, tee: crate::tee::TeeReport) -> Self {
        let sh = &tee.shadow;
        Self {
            copies: sh.connects,
            flows: tee.flows,
            answered: sh.answered,
            timeouts: sh.timeouts,
            answers_dropped: sh.answered,
            answer_bytes: sh.response_bytes,
            first_answer_mean_us: sh.ttfb_mean_us(),
            tee: Some(tee),
            ..self
        }
    }
}

/// One version of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionReport {
    /// Version name.
    pub name: String,
    /// Configured weight.
    pub weight: u32,
    /// Share of new flows this weight gives, in percent.
    pub share_percent: f64,
    /// New flows over all its backends.
    pub new_flows: u64,
    /// Established flows over all its backends now.
    #[serde(default)]
    pub live_flows: u64,
    /// Packets to its backends.
    pub packets: u64,
    /// Bytes to its backends.
    pub bytes: u64,
    /// Its backends.
    pub backends: Vec<BackendReport>,
    /// Signal counters summed over its backends (cumulative).
    #[serde(default)]
    pub signals: Counters,
    /// Its signals over the status window (`None`: no history yet).
    #[serde(default)]
    pub window: Option<Window>,
    /// The external metric of `[service.analysis]`, if configured.
    #[serde(default)]
    pub metric: Option<MetricReading>,
}

/// One backend and its counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendReport {
    /// `addr:port`.
    pub address: String,
    /// Weight inside its version.
    pub weight: u32,
    /// `active`, `drain` or `disabled`.
    #[serde(default)]
    pub state: String,
    /// `up` or `down` by the service's health checks, `unchecked` without.
    #[serde(default)]
    pub health: String,
    /// Flows bound to it that are still going (counted from the
    /// connection table, recounted about once a second).
    #[serde(default)]
    pub live_flows: u64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// Flows bound to it.
    pub new_flows: u64,
    /// Reply packets translated back.
    pub reply_packets: u64,
    /// Reply bytes translated back.
    pub reply_bytes: u64,
    /// How its connections open and end (cumulative counters).
    #[serde(default)]
    pub signals: Counters,
    /// Its signals over the status window (`None`: no history yet).
    #[serde(default)]
    pub window: Option<Window>,
}

/// `GET /v1/services/{name}/signals?window=60s`: how a service's
/// connections open and end, per version and per backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignalsReport {
    /// Service name.
    pub service: String,
    /// The window asked for, in seconds (each `window` says what it covers).
    pub window_secs: f64,
    /// The service's connect deadline.
    pub connect_timeout_ms: u32,
    /// Versions in configuration order.
    pub versions: Vec<VersionSignals>,
}

/// One version's signals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionSignals {
    /// Version name.
    pub name: String,
    /// Configured weight.
    pub weight: u32,
    /// Cumulative counters over its backends.
    pub signals: Counters,
    /// Over the window (`None`: no history yet).
    pub window: Option<Window>,
    /// The external metric, if configured.
    pub metric: Option<MetricReading>,
    /// Its backends.
    pub backends: Vec<BackendSignalsReport>,
}

/// One backend's signals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendSignalsReport {
    /// `addr:port`.
    pub address: String,
    /// Cumulative counters.
    pub signals: Counters,
    /// Over the window (`None`: no history yet).
    pub window: Option<Window>,
}

/// `GET /v1/flow?service=NAME&client=ADDR:PORT`: where a client's flow goes and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowReport {
    /// Service name.
    pub service: String,
    /// `addr:port` of the VIP.
    pub vip: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `flow` or `client-ip`.
    pub affinity: String,
    /// The client `addr:port` asked about.
    pub client: String,
    /// Flow hash (of the client address only with `client-ip` affinity).
    pub hash: u32,
    /// Version a new flow from this client would get now, and why.
    pub new_flow_version: String,
    /// Backend a new flow would get now.
    pub new_flow_backend: String,
    /// How the version and backend were chosen.
    pub why: String,
    /// The source-CIDR rule that decides the version of a new flow from
    /// this client (`CIDR -> VERSION`), if one does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The connection-table entry, if the flow is known to the edge: it
    /// decides, whatever the weights say now.
    pub connection: Option<ConnectionReport>,
}

/// A connection-table entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionReport {
    /// Backend the flow is bound to.
    pub backend: String,
    /// Source the backend sees in SNAT mode.
    pub snat_source: Option<String>,
    /// TCP state seen so far (`syn`, `established`, `fin-client`, `fin-backend`, `rst`).
    pub tcp_state: Vec<String>,
    /// Milliseconds since the last packet (at one-second granularity).
    pub idle_ms: u64,
}

/// `GET /v1/rollouts/{service}`: where a rollout stands, what it waits
/// for, and what the signals and analyses said so far.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutReport {
    /// The service it moves.
    pub service: String,
    /// The stable version it started from.
    pub from: String,
    /// The version it moves to.
    pub to: String,
    /// `canary`, `blue-green` or `rolling`.
    pub strategy: String,
    /// `running`, `paused`, `completed`, `aborted` or `rolled-back`.
    pub state: String,
    /// The machine's phase in words (`step 3 of 5: 25% for 60s`,
    /// `waiting for promote`, ...).
    pub phase: String,
    /// The step being run, from 1 (0 before the first).
    pub step: usize,
    /// Steps in all (canary steps, blue-green stages, rolling batches).
    pub steps: usize,
    /// Share of new flows the target version gets now, in percent.
    pub target_percent: u32,
    /// Version weights as published now.
    pub weights: BTreeMap<String, u32>,
    /// What the rollout waits for before its next move.
    pub waiting_for: String,
    /// Seconds spent in the current step.
    pub step_elapsed_secs: f64,
    /// Why it paused, was aborted or rolled back.
    #[serde(default)]
    pub reason: Option<String>,
    /// The analyses so far, oldest first (bounded).
    #[serde(default)]
    pub verdicts: Vec<VerdictLine>,
    /// Each version's signals over the last analysis interval.
    #[serde(default)]
    pub signals: Vec<VersionLine>,
    /// Commands the rollout accepts now (`promote`, `pause`, ...).
    #[serde(default)]
    pub allowed: Vec<String>,
    /// The service's mirroring, when it mirrors (how the shadow answers,
    /// beside the stable side).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowReport>,
}

/// One analysis verdict of a rollout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerdictLine {
    /// Seconds since the rollout started.
    pub at_secs: f64,
    /// The step it judged, from 1.
    pub step: usize,
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
    /// Why (fail and inconclusive).
    #[serde(default)]
    pub reason: Option<String>,
}

/// One version's signals in a rollout report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionLine {
    /// Version name.
    pub version: String,
    /// New flows per second.
    pub new_flows_per_sec: f64,
    /// Error rate, 0..=1 (`None` without attempts).
    pub error_rate: Option<f64>,
    /// Connect latency p99 in ms (`None` without samples).
    pub latency_p99_ms: Option<f64>,
}

impl RolloutReport {
    /// Has the rollout ended (completed, aborted or rolled back)?
    pub fn finished(&self) -> bool {
        matches!(self.state.as_str(), "completed" | "aborted" | "rolled-back")
    }
}
