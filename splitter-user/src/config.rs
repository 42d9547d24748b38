//! The TOML configuration: its types, parsing and validation. This module
//! owns what a valid configuration is. Pure: nothing here touches the
//! network or the kernel (the daemon resolves interfaces and the default
//! SNAT address); [`Config::load`] only reads the file.
//!
//! Every problem of a file is reported at once, one line each, naming the
//! field and the problem:
//!
//! ```text
//! service[1] "api": version "green": backends[0]: "10.0.2.x:80" is not an IPv4 address:port (like "10.0.0.10:80")
//! service "web": all version weights are 0: at least one version needs weight > 0
//! ```
//!
//! Fields inside a service are named `service[INDEX] "NAME": ...`; checks
//! about the service as a whole (weights, versions, its VIP) as
//! `service "NAME": ...`. TOML syntax and type errors come from the `toml`
//! crate, with line, column and the offending line.
//!
//! A complete example (docs/config.md explains every field):
//!
//! ```
//! use splitter::config::{Affinity, Config, Mode, Protocol, XdpModeConfig};
//!
//! let text = r#"
//! [dataplane]
//! interface = "eth0"            # client-facing interface (required)
//! backend_interface = "eth1"    # default: interface (one-armed)
//! mode = "snat"                 # "snat" (default) | "dnat"
//! snat_address = "10.0.2.1"     # default: first IPv4 address of backend_interface
//! xdp_mode = "auto"             # "auto" (default) | "native" | "generic"
//! conn_capacity = 1048576       # connection-table entries, two per flow (default)
//!
//! [[service]]
//! name = "web"
//! vip = "10.0.0.10:80"
//! protocol = "tcp"              # "tcp" (default) | "udp"
//! affinity = "flow"             # "flow" (default) | "client-ip"
//!
//! [[service.version]]
//! name = "blue"
//! weight = 90
//! backends = ["10.0.2.2:8080", { address = "10.0.2.4:8080", weight = 2 }]
//!
//! [[service.version]]
//! name = "green"
//! weight = 10
//! backends = ["10.0.2.3:8080"]
//!
//! [[service]]
//! name = "dns"
//! vip = "10.0.0.53:53"
//! protocol = "udp"
//! affinity = "client-ip"
//!
//! [[service.version]]
//! name = "stable"
//! weight = 1
//! backends = ["10.0.2.6:53"]
//! "#;
//! let config = Config::parse(text).unwrap();
//! assert_eq!(config.dataplane.mode, Mode::Snat);
//! assert_eq!(config.dataplane.xdp_mode, XdpModeConfig::Auto);
//! let web = config.service("web").unwrap();
//! assert_eq!(web.versions[1].weight, 10);
//! assert_eq!(web.versions[0].backends[1].weight, 2);
//! let dns = config.service("dns").unwrap();
//! assert_eq!((dns.protocol, dns.affinity), (Protocol::Udp, Affinity::ClientIp));
//!
//! // `splitter weights web blue=50 green=50`:
//! let args = ["blue=50".to_string(), "green=50".to_string()];
//! let weights = splitter::config::parse_weight_args(web, &args).unwrap();
//! let next = config.with_weights("web", &weights).unwrap();
//! assert_eq!(next.service("web").unwrap().versions[1].weight, 50);
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use splitter_common::{
    CONN_CAPACITY, MAX_BACKENDS, MAX_CONN_CAPACITY, MAX_SERVICES, MAX_TABLES, MAX_VERSIONS,
    MIN_CONN_CAPACITY,
};

/// Highest version weight.
pub const MAX_VERSION_WEIGHT: u32 = 1_000_000;
/// Highest backend weight (the lowest is 1: remove a backend instead of
/// weighting it 0).
pub const MAX_BACKEND_WEIGHT: u32 = 1000;
/// Longest service or version name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;
/// Most versions over all services: each one holds two table slots (the
/// live generation and the one being written).
pub const MAX_TOTAL_VERSIONS: usize = (MAX_TABLES / 2) as usize;

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the config came from, if any.
    pub source: Option<String>,
    /// One message per problem, each naming its field.
    pub problems: Vec<String>,
}

impl ConfigError {
    fn one(msg: impl Into<String>) -> Self {
        Self {
            source: None,
            problems: vec![msg.into()],
        }
    }

    fn check(problems: Vec<String>) -> Result<(), Self> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Self {
                source: None,
                problems,
            })
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(src) = &self.source {
            write!(f, "{src}: ")?;
        }
        if self.problems.len() > 1 {
            writeln!(f, "{} problems:", self.problems.len())?;
        }
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

/// A closed set of keywords: serde, `Display` and `FromStr` all use the
/// spelling of the TOML file.
macro_rules! keyword_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $text)] $variant),+
        }
        impl $name {
            /// Every accepted spelling.
            pub const NAMES: &'static [&'static str] = &[$($text),+];
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(match self { $(Self::$variant => $text),+ })
            }
        }
        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!("{other:?} is not one of {}", Self::NAMES.join(", "))),
                }
            }
        }
    };
}

keyword_enum!(
    /// Forwarding mode.
    Mode {
        /// Backends see the edge's address; replies come back to it.
        #[default]
        Snat = "snat",
        /// Backends see the client's address and route replies via the edge.
        Dnat = "dnat",
    }
);
keyword_enum!(
    /// XDP attach mode.
    XdpModeConfig {
        /// Native, falling back to generic with a warning.
        #[default]
        Auto = "auto",
        /// Driver mode only.
        Native = "native",
        /// Generic (skb) mode only.
        Generic = "generic",
    }
);
keyword_enum!(
    /// Transport protocol of a service.
    Protocol {
        /// TCP.
        #[default]
        Tcp = "tcp",
        /// UDP.
        Udp = "udp",
    }
);
keyword_enum!(
    /// What a new flow's placement is hashed from.
    Affinity {
        /// The 5-tuple: each connection placed on its own.
        #[default]
        Flow = "flow",
        /// The client address: one client, one version, one backend.
        ClientIp = "client-ip",
    }
);

keyword_enum!(
    /// Whether a backend takes new flows (`state` of a backend).
    BackendState {
        /// In its version's table: takes new flows.
        #[default]
        Active = "active",
        /// Out of the table: no new flows; its established flows go on
        /// until they end (rolling deploys drain a backend this way).
        Drain = "drain",
        /// Out of service: no new flows, and the client packets of its
        /// established flows are dropped (counted as `drop_backend_disabled`).
        Disabled = "disabled",
    }
);

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Interfaces and forwarding.
    pub dataplane: DataplaneConfig,
    /// Services, in file order (`[[service]]`).
    pub services: Vec<ServiceConfig>,
    /// The Prometheus endpoint; `None`: disabled.
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]`: the Prometheus endpoint (`GET /metrics`). Without the
/// table it listens on [`DEFAULT_METRICS_LISTEN`]; `listen = ""` or
/// `enabled = false` turns it off. It binds only what is written: a
/// non-loopback address (`0.0.0.0:9470`) exposes the counters, service
/// names and backend addresses to whoever can reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsConfig {
    /// Address and port to listen on.
    pub listen: SocketAddr,
}

/// Default of `metrics.listen`: loopback only.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9470));

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_METRICS_LISTEN,
        }
    }
}

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DataplaneConfig {
    /// Client-facing interface, where the XDP program is attached.
    pub interface: String,
    /// Backend-facing interface; `None` means `interface` (one-armed).
    pub backend_interface: Option<String>,
    /// SNAT or DNAT.
    pub mode: Mode,
    /// SNAT source; `None` means the backend interface's first IPv4
    /// address, which the daemon looks up.
    pub snat_address: Option<Ipv4Addr>,
    /// How to attach XDP.
    pub xdp_mode: XdpModeConfig,
    /// bpffs directory where maps and XDP links are pinned, so the data
    /// plane keeps forwarding while the daemon is stopped or upgraded.
    pub pin_dir: PathBuf,
    /// Connection-table entries, two per flow (default
    /// [`splitter_common::CONN_CAPACITY`]).
    pub conn_capacity: u32,
}

/// Default of `dataplane.pin_dir`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/splitter";

/// `[[service]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceConfig {
    /// Unique name.
    pub name: String,
    /// Virtual address clients connect to; unique with `protocol`.
    pub vip: SocketAddrV4,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Placement hash input.
    pub affinity: Affinity,
    /// Versions (`[[service.version]]`), in the order weights refer to.
    pub versions: Vec<VersionConfig>,
    /// Active health checks of its backends (`[service.health]`); `None`:
    /// not checked, every active backend takes new flows.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// A new flow with no answer from its backend (TCP: SYN-ACK; UDP: a
    /// reply datagram) this long after its first packet counts as a
    /// connect timeout in the backend's signals, in ms
    /// ([`DEFAULT_CONNECT_TIMEOUT_MS`], 1..=60000).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u32,
    /// The external metric judged per version (`[service.analysis]`);
    /// `None`: only the kernel-measured signals.
    #[serde(default)]
    pub analysis: Option<AnalysisConfig>,
    /// Defaults of this service's rollouts (`[service.rollout]`): the
    /// strategy, its schedule, the analysis and the hooks; `splitter
    /// rollout start` overrides what it names. `None`: the built-in
    /// defaults (a canary 5, 10, 25, 50, 100% with a minute a step).
    #[serde(default)]
    pub rollout: Option<crate::rollout::spec::RolloutDefaults>,
    /// Source-CIDR rules (`[[service.target]]`, `splitter target add`):
    /// new flows of a client in a rule's network go to its version, the
    /// longest matching rule winning; others follow the weights. See
    /// [`crate::target`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<crate::target::TargetConfig>,
    /// The service only reads (`read_only = true`): repeating its requests
    /// to a shadow changes nothing. Required for a TCP shadow.
    #[serde(default)]
    pub read_only: bool,
    /// Mirroring to a shadow version (`[service.shadow]`); `None`: off.
    #[serde(default)]
    pub shadow: Option<ShadowConfig>,
}

/// `[service.shadow]`: a share of the service's traffic is copied to a
/// version that serves no client. UDP: `percent` of the datagrams (each
/// still goes to its stable backend, and a copy to the shadow version's
/// backend, whose replies are dropped at the edge).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowConfig {
    /// The version that receives the copies: a version of the service
    /// with weight 0 and at least one active backend.
    pub version: String,
    /// Share mirrored, 1..=100 (of datagrams for UDP).
    pub percent: u32,
}

impl ServiceConfig {
    /// Does `version` have an active backend (one that can take new flows)?
    pub fn has_active_backend(&self, version: &str) -> bool {
        self.versions
            .iter()
            .find(|v| v.name == version)
            .is_some_and(|v| v.backends.iter().any(|b| b.state == BackendState::Active))
    }

    /// Every problem of `rules` were they this service's source-CIDR rules
    /// ([`crate::target::problems`]).
    pub fn problems_of_targets(&self, rules: &[crate::target::TargetConfig]) -> Vec<String> {
        let of = crate::target::Versions {
            service: &self.name,
            versions: self
                .versions
                .iter()
                .map(|v| (v.name.as_str(), self.has_active_backend(&v.name)))
                .collect(),
        };
        crate::target::problems(rules, &of)
    }

    /// Every problem of this service's own source-CIDR rules.
    pub fn target_problems(&self) -> Vec<String> {
        self.problems_of_targets(&self.targets)
    }
}

/// Default of `connect_timeout_ms`.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u32 = splitter_common::DEFAULT_CONNECT_TIMEOUT_MS as u32;
/// Largest `connect_timeout_ms` (the data plane keeps it in 16 bits).
pub const MAX_CONNECT_TIMEOUT_MS: u32 = 60_000;

fn default_connect_timeout_ms() -> u32 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

/// `[service.health]`: a TCP connect (or an HTTP `GET`) to each backend
/// every `interval_ms`.
/// A backend that fails `fall` checks in a row leaves new-flow selection
/// (its established flows go on); one that then passes `rise` in a row
/// comes back. If every active backend of a version is down, all of them
/// stay in (fail open) rather than dropping the version's new flows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthConfig {
    /// `None`: a TCP connect passes. `Some(path)`: `GET path` must answer
    /// with a 2xx or 3xx status.
    #[serde(default)]
    pub http_path: Option<String>,
    /// Time between checks of one backend, in ms.
    pub interval_ms: u32,
    /// Longest one check may take (the connect, and with HTTP the status
    /// line), in ms.
    pub timeout_ms: u32,
    /// Failed checks in a row that take a backend out.
    pub fall: u32,
    /// Passed checks in a row that bring it back.
    pub rise: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            http_path: None,
            interval_ms: 1000,
            timeout_ms: 1000,
            fall: 3,
            rise: 2,
        }
    }
}

/// `[service.analysis]`: one external metric per version, read from a
/// Prometheus-compatible HTTP API every `interval_ms` (typically the
/// application's own HTTP 5xx ratio). The query is a PromQL template whose
/// `{service}` and `{version}` are filled in per version
/// ([`crate::signals::external::render_query`]); it must give exactly one
/// number. `min` and `max` bound the metric for the analysis.
///
/// `Eq` holds because validation rejects NaN bounds (see [`Config::validate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnalysisConfig {
    /// Base URL of the Prometheus HTTP API, `http://HOST[:PORT][/PREFIX]`
    /// (see [`PrometheusUrl`]); the query goes to `PREFIX/api/v1/query`.
    pub prometheus: String,
    /// PromQL template with the placeholders [`QUERY_PLACEHOLDERS`].
    pub query: String,
    /// Lowest acceptable value of the metric; `None`: no lower bound.
    #[serde(default)]
    pub min: Option<f64>,
    /// Highest acceptable value of the metric; `None`: no upper bound.
    #[serde(default)]
    pub max: Option<f64>,
    /// Time between two queries of one version, in ms
    /// ([`DEFAULT_ANALYSIS_INTERVAL_MS`], `MIN_..=MAX_ANALYSIS_INTERVAL_MS`).
    #[serde(default = "default_analysis_interval_ms")]
    pub interval_ms: u32,
    /// Longest one query may take (connect, request and answer), in ms
    /// (default [`DEFAULT_ANALYSIS_TIMEOUT_MS`] or `interval_ms` if shorter;
    /// `MIN_..=MAX_ANALYSIS_TIMEOUT_MS`, at most `interval_ms`).
    #[serde(default = "default_analysis_timeout_ms")]
    pub timeout_ms: u32,
}

impl Eq for AnalysisConfig {}

/// Default of `analysis.interval_ms`.
pub const DEFAULT_ANALYSIS_INTERVAL_MS: u32 = 5000;
/// Shortest `analysis.interval_ms`.
pub const MIN_ANALYSIS_INTERVAL_MS: u32 = 1000;
/// Longest `analysis.interval_ms`.
pub const MAX_ANALYSIS_INTERVAL_MS: u32 = 600_000;
/// Default of `analysis.timeout_ms` (or `interval_ms` if shorter).
pub const DEFAULT_ANALYSIS_TIMEOUT_MS: u32 = 2000;
/// Shortest `analysis.timeout_ms`.
pub const MIN_ANALYSIS_TIMEOUT_MS: u32 = 100;
/// Longest `analysis.timeout_ms`.
pub const MAX_ANALYSIS_TIMEOUT_MS: u32 = 60_000;
/// The placeholders an `analysis.query` may hold, each written `{name}`.
pub const QUERY_PLACEHOLDERS: &[&str] = &["service", "version"];

fn default_analysis_interval_ms() -> u32 {
    DEFAULT_ANALYSIS_INTERVAL_MS
}

fn default_analysis_timeout_ms() -> u32 {
    DEFAULT_ANALYSIS_TIMEOUT_MS
}

/// The next `{name}` in `text` (an identifier in braces: `[A-Za-z_]
/// [A-Za-z0-9_]*`), as (start, end, name) with `end` past the `}`.
/// PromQL's own braces (`{code=~"5.."}`, `{}`, `{3}`) are not placeholders.
pub(crate) fn next_placeholder(text: &str) -> Option<(usize, usize, &str)> {
    let mut from = 0;
    while let Some(open) = text[from..].find('{').map(|i| from + i) {
        let rest = &text[open + 1..];
        let len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..len];
        let is_ident = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if is_ident && rest[len..].starts_with('}') {
            return Some((open, open + 1 + len + 1, name));
        }
        from = open + 1;
    }
    None
}

/// Problem with an `analysis.query` template, if any: empty, or a
/// `{placeholder}` other than [`QUERY_PLACEHOLDERS`].
fn query_problem(query: &str) -> Option<String> {
    if query.trim().is_empty() {
        return Some("must not be empty".into());
    }
    let mut rest = query;
    let mut unknown = Vec::new();
    while let Some((_, end, name)) = next_placeholder(rest) {
        if !QUERY_PLACEHOLDERS.contains(&name) && !unknown.contains(&name) {
            unknown.push(name);
        }
        rest = &rest[end..];
    }
    if unknown.is_empty() {
        return None;
    }
    let unknown: Vec<String> = unknown.iter().map(|n| format!("{{{n}}}")).collect();
    let known: Vec<String> = QUERY_PLACEHOLDERS
        .iter()
        .map(|n| format!("{{{n}}}"))
        .collect();
    Some(format!(
        "unknown placeholder {}; the placeholders are {}",
        unknown.join(", "),
        known.join(" and ")
    ))
}

/// `analysis.prometheus` taken apart: `http://HOST[:PORT][/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrometheusUrl {
    /// A DNS name, an IPv4 address, or an IPv6 address (without brackets).
    pub host: String,
    /// The port; 80 when the URL has none.
    pub port: u16,
    /// The path before `/api/v1/...`: empty, or starting with `/` and
    /// without a trailing `/` (`/prometheus`).
    pub prefix: String,
}

impl PrometheusUrl {
    /// Parses a base URL. Only plain `http` is supported; user names,
    /// queries and fragments are refused.
    ///
    /// # Errors
    /// What is wrong with it, in words.
    pub fn parse(url: &str) -> Result<Self, String> {
        const EXAMPLE: &str = "like \"http://127.0.0.1:9090\"";
        if url.is_empty() {
            return Err(format!("must not be empty ({EXAMPLE})"));
        }
        let Some(rest) = url
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case("http://"))
            .map(|_| &url[7..])
        else {
            return Err(if url.to_ascii_lowercase().starts_with("https://") {
                format!("{url:?}: https is not supported, only http ({EXAMPLE})")
            } else {
                format!("{url:?} is not an http:// URL ({EXAMPLE})")
            });
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "{url:?}: user names and passwords are not supported"
            ));
        }
        if let Some(c) = path.chars().find(|c| matches!(c, '?' | '#')) {
            return Err(format!(
                "{url:?}: a base URL has no {} part",
                if c == '?' {
                    "query (?)"
                } else {
                    "fragment (#)"
                }
            ));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "{url:?}: the path holds spaces or control characters"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((host, after)) = v6.split_once(']') else {
                return Err(format!("{url:?}: no ']' after the IPv6 address"));
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(format!("{url:?}: {host:?} is not an IPv6 address"));
            }
            match after {
                "" => (host, None),
                p => match p.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(format!("{url:?}: unexpected {p:?} after the host")),
                },
            }
        } else {
            match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?} has no host ({EXAMPLE})"));
        }
        if !authority.starts_with('[')
            && !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("{url:?}: {host:?} is not a host name or address"));
        }
        let port = match port {
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(format!("{url:?}: {p:?} is not a port (1..=65535)")),
            },
        };
        Ok(Self {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }

    /// `HOST:PORT`, with brackets around an IPv6 address (the `Host`
    /// header and messages).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// `[[service.version]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionConfig {
    /// Unique within the service.
    pub name: String,
    /// Relative share of new flows, `0..=MAX_VERSION_WEIGHT`.
    pub weight: u32,
    /// Its backends.
    pub backends: Vec<BackendConfig>,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendConfig {
    /// Address and port.
    pub address: SocketAddrV4,
    /// Relative weight inside the version, `1..=MAX_BACKEND_WEIGHT`.
    pub weight: u32,
    /// Active, draining or disabled.
    #[serde(default)]
    pub state: BackendState,
}

impl BackendConfig {
    /// An active backend of weight 1.
    pub fn new(address: SocketAddrV4) -> Self {
        Self {
            address,
            weight: 1,
            state: BackendState::Active,
        }
    }
}

// ---- The file as written. Addresses, keywords and weights stay raw here
// and are converted in `convert`, so that each bad value is reported with
// its field path instead of stopping the parse at the first one.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    dataplane: RawDataplane,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    enabled: Option<bool>,
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    interface: String,
    backend_interface: Option<String>,
    pin_dir: Option<String>,
    mode: Option<String>,
    snat_address: Option<String>,
    xdp_mode: Option<String>,
    conn_capacity: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    protocol: Option<String>,
    affinity: Option<String>,
    #[serde(default, rename = "version")]
    versions: Vec<RawVersion>,
    health: Option<RawHealth>,
    connect_timeout_ms: Option<i64>,
    analysis: Option<RawAnalysis>,
    rollout: Option<crate::rollout::spec::RolloutDefaults>,
    #[serde(default, rename = "target")]
    targets: Vec<RawTarget>,
    read_only: Option<bool>,
    shadow: Option<RawShadow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    cidr: String,
    version: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShadow {
    version: String,
    percent: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    prometheus: Option<String>,
    query: Option<String>,
    min: Option<f64>,
    max: Option<f64>,
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<String>,
    path: Option<String>,
    interval_ms: Option<i64>,
    timeout_ms: Option<i64>,
    fall: Option<i64>,
    rise: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    name: String,
    weight: i64,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

/// `"IPv4:port"` or `{ address = "IPv4:port", weight = N, state = "drain" }`.
struct RawBackend {
    address: String,
    weight: Option<i64>,
    state: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    address: String,
    weight: Option<i64>,
    state: Option<String>,
}

impl<'de> Deserialize<'de> for RawBackend {
    // By hand rather than `#[serde(untagged)]`, whose only error is "data did
    // not match any variant": this keeps the table's own errors (unknown
    // field, missing address) and says what a backend may look like.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    r#"a backend: "IPv4:port" or { address = "IPv4:port", weight = N, state = "active" }"#,
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend {
                    address: v.to_string(),
                    weight: None,
                    state: None,
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawBackend, A::Error> {
                let t = RawBackendTable::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(RawBackend {
                    address: t.address,
                    weight: t.weight,
                    state: t.state,
                })
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Values that did not convert, so that `check` does not pile a second,
/// misleading message (port 0, duplicate address) on their placeholders.
#[derive(Default)]
struct Unparsed {
    /// Services (by index) whose vip or protocol is bad.
    vips: BTreeSet<usize>,
    /// (service, version) whose weight is bad.
    weights: BTreeSet<(usize, usize)>,
    /// (service, version, backend) whose address is bad.
    backends: BTreeSet<(usize, usize, usize)>,
}

/// Problems found so far, each tagged with the part of the file it is
/// about, so that they are listed in file order whichever pass found them.
#[derive(Default)]
struct Problems {
    /// 0: `[dataplane]`; `i + 1`: `service[i]`; `usize::MAX`: totals.
    section: usize,
    list: Vec<(usize, String)>,
}

impl Problems {
    fn push(&mut self, msg: String) {
        self.list.push((self.section, msg));
    }

    fn in_file_order(mut self) -> Vec<String> {
        // Stable: within a section, conversion problems come first.
        self.list.sort_by_key(|(section, _)| *section);
        self.list.into_iter().map(|(_, msg)| msg).collect()
    }
}

fn keyword<T: FromStr<Err = String> + Default>(
    problems: &mut Problems,
    field: &str,
    v: Option<&str>,
) -> Option<T> {
    match v.map(str::parse) {
        None => Some(T::default()),
        Some(Ok(t)) => Some(t),
        Some(Err(e)) => {
            problems.push(format!("{field}: {e}"));
            None
        }
    }
}

fn socket(problems: &mut Problems, field: &str, v: &str) -> Option<SocketAddrV4> {
    if let Ok(a) = v.parse::<SocketAddrV4>() {
        return Some(a);
    }
    if v.parse::<SocketAddrV6>().is_ok() {
        problems.push(format!("{field}: {v:?}: IPv6 is not supported yet"));
    } else {
        problems.push(format!(
            "{field}: {v:?} is not an IPv4 address:port (like \"10.0.0.10:80\")"
        ));
    }
    None
}

/// Converts `[service.health]`; `None` (and a problem) for a bad value or
/// `check = "none"`.
fn health(p: &mut Problems, at: &str, h: RawHealth) -> Option<HealthConfig> {
    let http_path = match (h.check.as_deref(), h.path) {
        (None | Some("tcp"), None) => None,
        (Some("http"), None) => Some("/".to_string()),
        (Some("http"), Some(path)) => {
            if !path.starts_with('/') || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
                p.push(format!(
                    "{at}.path: {path:?} must start with '/' and hold no spaces or control characters"
                ));
            }
            Some(path)
        }
        (None | Some("tcp"), Some(_)) => {
            p.push(format!("{at}.path: only for check = \"http\""));
            None
        }
        (Some("none"), _) => return None,
        (Some(other), _) => {
            p.push(format!(
                "{at}.check: {other:?} is not one of tcp, http, none"
            ));
            return None;
        }
    };
    let d = HealthConfig::default();
    let mut field = |name: &str, v: Option<i64>, default: u32, lo: u32, hi: u32| -> u32 {
        match v {
            None => default,
            Some(v) if (i64::from(lo)..=i64::from(hi)).contains(&v) => v as u32,
            Some(v) => {
                p.push(format!("{at}.{name}: {v} is out of range {lo}..={hi}"));
                default
            }
        }
    };
    let c = HealthConfig {
        http_path,
        interval_ms: field("interval_ms", h.interval_ms, d.interval_ms, 100, 3_600_000),
        timeout_ms: field("timeout_ms", h.timeout_ms, d.timeout_ms, 10, 60_000),
        fall: field("fall", h.fall, d.fall, 1, 100),
        rise: field("rise", h.rise, d.rise, 1, 100),
    };
    Some(c)
}

/// Converts `[service.analysis]`: the integer ranges and defaults (the
/// URL, the query and the bounds are checked in [`check`], so that configs
/// built in code get the same checks; a missing `prometheus` or `query`
/// stays empty and is reported there).
fn analysis(p: &mut Problems, at: &str, a: RawAnalysis) -> AnalysisConfig {
    let mut ms = |name: &str, v: Option<i64>, lo: u32, hi: u32| -> Option<u32> {
        match v {
            None => None,
            Some(v) if (i64::from(lo)..=i64::from(hi)).contains(&v) => Some(v as u32),
            Some(v) => {
                p.push(format!("{at}.{name}: {v} is out of range {lo}..={hi}"));
                None
            }
        }
    };
    let interval_ms = ms(
        "interval_ms",
        a.interval_ms,
        MIN_ANALYSIS_INTERVAL_MS,
        MAX_ANALYSIS_INTERVAL_MS,
    )
    .unwrap_or(DEFAULT_ANALYSIS_INTERVAL_MS);
    // Also the stand-in for a bad value, which must then pass `check`.
    let default_timeout = DEFAULT_ANALYSIS_TIMEOUT_MS.min(interval_ms);
    let timeout_ms = ms(
        "timeout_ms",
        a.timeout_ms,
        MIN_ANALYSIS_TIMEOUT_MS,
        MAX_ANALYSIS_TIMEOUT_MS,
    )
    .unwrap_or(default_timeout);
    AnalysisConfig {
        prometheus: a.prometheus.unwrap_or_default(),
        query: a.query.unwrap_or_default(),
        min: a.min,
        max: a.max,
        interval_ms,
        timeout_ms,
    }
}

/// Every problem of a typed `[service.analysis]`, each naming its field
/// after `at` (`service[0] "web": analysis`).
fn analysis_problems(a: &AnalysisConfig, at: &str, out: &mut Problems) {
    if a.prometheus.is_empty() {
        out.push(format!(
            "{at}.prometheus: required: the base URL of the Prometheus HTTP API, like \"http://127.0.0.1:9090\""
        ));
    } else if let Err(e) = PrometheusUrl::parse(&a.prometheus) {
        out.push(format!("{at}.prometheus: {e}"));
    }
    if a.query.trim().is_empty() {
        out.push(format!(
            "{at}.query: required: PromQL giving one number, with {{service}} and {{version}} filled in per version"
        ));
    } else if let Some(e) = query_problem(&a.query) {
        out.push(format!("{at}.query: {e}"));
    }
    for (name, v) in [("min", a.min), ("max", a.max)] {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            out.push(format!("{at}.{name}: {v} is not a finite number"));
        }
    }
    if let (Some(min), Some(max)) = (a.min, a.max)
        && min.is_finite()
        && max.is_finite()
        && max < min
    {
        out.push(format!("{at}.max: {max} is below min {min}"));
    }
    let interval_ok =
        (MIN_ANALYSIS_INTERVAL_MS..=MAX_ANALYSIS_INTERVAL_MS).contains(&a.interval_ms);
    if !interval_ok {
        out.push(format!(
            "{at}.interval_ms: {} is out of range {MIN_ANALYSIS_INTERVAL_MS}..={MAX_ANALYSIS_INTERVAL_MS}",
            a.interval_ms
        ));
    }
    if !(MIN_ANALYSIS_TIMEOUT_MS..=MAX_ANALYSIS_TIMEOUT_MS).contains(&a.timeout_ms) {
        out.push(format!(
            "{at}.timeout_ms: {} is out of range {MIN_ANALYSIS_TIMEOUT_MS}..={MAX_ANALYSIS_TIMEOUT_MS}",
            a.timeout_ms
        ));
    } else if interval_ok && a.timeout_ms > a.interval_ms {
        out.push(format!(
            "{at}.timeout_ms: {} is longer than interval_ms {}: a query must end before the next one starts",
            a.timeout_ms, a.interval_ms
        ));
    }
}

/// Converts the raw file into typed values, reporting every value that
/// does not convert. Placeholders stand in for those (see [`Unparsed`]).
fn convert(raw: RawConfig, p: &mut Problems, bad: &mut Unparsed) -> Config {
    p.section = 0;
    let d = raw.dataplane;
    let snat_address = d
        .snat_address
        .as_deref()
        .and_then(|s| match s.parse::<Ipv4Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let why = if s.parse::<Ipv6Addr>().is_ok() {
                    "IPv6 is not supported yet"
                } else {
                    "is not an IPv4 address"
                };
                p.push(format!("dataplane.snat_address: {s:?}: {why}"));
                None
            }
        });
    let dataplane = DataplaneConfig {
        mode: keyword(p, "dataplane.mode", d.mode.as_deref()).unwrap_or_default(),
        xdp_mode: keyword(p, "dataplane.xdp_mode", d.xdp_mode.as_deref()).unwrap_or_default(),
        interface: d.interface,
        backend_interface: d.backend_interface,
        snat_address,
        pin_dir: match d.pin_dir {
            None => PathBuf::from(DEFAULT_PIN_DIR),
            Some(dir) if dir.starts_with('/') && dir.len() > 1 => PathBuf::from(dir),
            Some(dir) => {
                p.push(format!(
                    "dataplane.pin_dir: {dir:?} must be an absolute path below a bpffs mount"
                ));
                PathBuf::from(DEFAULT_PIN_DIR)
            }
        },
        conn_capacity: match d.conn_capacity {
            None => CONN_CAPACITY,
            Some(n)
                if (i64::from(MIN_CONN_CAPACITY)..=i64::from(MAX_CONN_CAPACITY)).contains(&n) =>
            {
                n as u32
            }
            Some(n) => {
                p.push(format!(
                    "dataplane.conn_capacity: {n} is outside {MIN_CONN_CAPACITY}..={MAX_CONN_CAPACITY} (connection-table entries, two per flow)"
                ));
                CONN_CAPACITY
            }
        },
    };
    let placeholder = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let mut services = Vec::with_capacity(raw.services.len());
    for (i, s) in raw.services.into_iter().enumerate() {
        p.section = i + 1;
        let at = format!("service[{i}] {:?}", s.name);
        let vip = socket(p, &format!("{at}: vip"), &s.vip);
        let protocol = keyword(p, &format!("{at}: protocol"), s.protocol.as_deref());
        let affinity = keyword(p, &format!("{at}: affinity"), s.affinity.as_deref());
        if vip.is_none() || protocol.is_none() {
            bad.vips.insert(i);
        }
        let mut versions = Vec::with_capacity(s.versions.len());
        for (j, v) in s.versions.into_iter().enumerate() {
            let vat = format!("{at}: version {:?}", v.name);
            let weight = u32::try_from(v.weight).unwrap_or_else(|_| {
                p.push(format!(
                    "{vat}: weight {} is out of range 0..={MAX_VERSION_WEIGHT}",
                    v.weight
                ));
                bad.weights.insert((i, j));
                0
            });
            let mut backends = Vec::with_capacity(v.backends.len());
            for (k, b) in v.backends.into_iter().enumerate() {
                let bat = format!("{vat}: backends[{k}]");
                let address = socket(p, &bat, &b.address).unwrap_or_else(|| {
                    bad.backends.insert((i, j, k));
                    placeholder
                });
                let w = b.weight.unwrap_or(1);
                let weight = u32::try_from(w).unwrap_or_else(|_| {
                    p.push(format!("{bat}: {}", backend_weight_problem(w)));
                    1
                });
                let state =
                    keyword(p, &format!("{bat}: state"), b.state.as_deref()).unwrap_or_default();
                backends.push(BackendConfig {
                    address,
                    weight,
                    state,
                });
            }
            versions.push(VersionConfig {
                name: v.name,
                weight,
                backends,
            });
        }
        let health = s
            .health
            .and_then(|h| health(p, &format!("{at}: health"), h));
        let connect_timeout_ms = match s.connect_timeout_ms {
            None => DEFAULT_CONNECT_TIMEOUT_MS,
            Some(v) if (1..=i64::from(MAX_CONNECT_TIMEOUT_MS)).contains(&v) => v as u32,
            Some(v) => {
                p.push(format!(
                    "{at}: connect_timeout_ms: {v} is out of range 1..={MAX_CONNECT_TIMEOUT_MS}"
                ));
                DEFAULT_CONNECT_TIMEOUT_MS
            }
        };
        let analysis = s
            .analysis
            .map(|a| analysis(p, &format!("{at}: analysis"), a));
        let mut targets = Vec::with_capacity(s.targets.len());
        for (k, t) in s.targets.into_iter().enumerate() {
            match t.cidr.parse() {
                Ok(cidr) => targets.push(crate::target::TargetConfig {
                    cidr,
                    version: t.version,
                }),
                Err(e) => p.push(format!("{at}: target[{k}]: cidr: {e}")),
            }
        }
        services.push(ServiceConfig {
            name: s.name,
            vip: vip.unwrap_or(placeholder),
            protocol: protocol.unwrap_or_default(),
            affinity: affinity.unwrap_or_default(),
            versions,
            health,
            connect_timeout_ms,
            analysis,
            rollout: s.rollout,
            targets,
            read_only: s.read_only.unwrap_or(false),
            shadow: s.shadow.map(|r| ShadowConfig {
                version: r.version,
                // Out of range: reported by `check` (shadow_problems).
                percent: u32::try_from(r.percent).unwrap_or(0),
            }),
        });
    }
    p.section = 0;
    let metrics = match raw.metrics {
        None => Some(MetricsConfig::default()),
        Some(RawMetrics {
            enabled: Some(false),
            ..
        }) => None,
        Some(RawMetrics { listen: None, .. }) => Some(MetricsConfig::default()),
        Some(RawMetrics {
            listen: Some(l), ..
        }) if l.is_empty() => None,
        Some(RawMetrics {
            listen: Some(l), ..
        }) => match l.parse::<SocketAddr>() {
            Ok(listen) => Some(MetricsConfig { listen }),
            Err(_) => {
                p.push(format!(
                    "metrics.listen: {l:?} is not an address:port (like \"{DEFAULT_METRICS_LISTEN}\"; \"\" turns the endpoint off)"
                ));
                None
            }
        },
    };
    Config {
        dataplane,
        services,
        metrics,
    }
}

fn backend_weight_problem(w: i64) -> String {
    let hint = if w == 0 {
        " (to take a backend out, remove it from the list)"
    } else {
        ""
    };
    format!("weight {w} is out of range 1..={MAX_BACKEND_WEIGHT}{hint}")
}

/// Problem with a service or version name, if any.
fn name_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        Some("must not be empty".into())
    } else if !v
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        Some(format!(
            "{v:?} may only hold letters, digits, '_', '.' and '-'"
        ))
    } else if v.len() > MAX_NAME_LEN {
        Some(format!("{v:?} is longer than {MAX_NAME_LEN} characters"))
    } else {
        None
    }
}

/// Problem with an interface name, if any (the kernel's `dev_valid_name`).
fn ifname_problem(v: &str) -> Option<String> {
    if v.is_empty() {
        Some("must not be empty".into())
    } else if v.len() > MAX_IFNAME_LEN {
        Some(format!(
            "{v:?} is longer than {MAX_IFNAME_LEN} bytes, the kernel's limit for interface names"
        ))
    } else if v == "."
        || v == ".."
        || v.chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        Some(format!("{v:?} is not a valid interface name"))
    } else {
        None
    }
}

/// Problem with an address a packet is sent to or from, if any.
fn addr_problem(a: Ipv4Addr) -> Option<String> {
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
        Some(format!("{a} is not a unicast address"))
    } else {
        None
    }
}

/// Every rule of a valid configuration, skipping the checks whose input
/// did not convert (`bad`).
fn check(c: &Config, bad: &Unparsed, out: &mut Problems) {
    out.section = 0;
    let d = &c.dataplane;
    if let Some(e) = ifname_problem(&d.interface) {
        out.push(format!("dataplane.interface: {e}"));
    }
    if let Some(e) = d.backend_interface.as_deref().and_then(ifname_problem) {
        out.push(format!("dataplane.backend_interface: {e}"));
    }
    if let Some(e) = d.snat_address.and_then(addr_problem) {
        out.push(format!("dataplane.snat_address: {e}"));
    }
    if let Some(m) = &c.metrics {
        if m.listen.port() == 0 {
            out.push(format!(
                "metrics.listen: {}: port 0 is not a usable port",
                m.listen
            ));
        }
        if m.listen.ip().is_multicast() {
            out.push(format!(
                "metrics.listen: {} is not a unicast address",
                m.listen
            ));
        }
    }
    out.section = usize::MAX;
    if c.services.len() > MAX_SERVICES as usize {
        out.push(format!(
            "{} services configured; at most {MAX_SERVICES} are supported",
            c.services.len()
        ));
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    // Every VIP and the first service that uses it.
    let mut vips: BTreeMap<(SocketAddrV4, Protocol), (usize, &str)> = BTreeMap::new();
    for (i, s) in c.services.iter().enumerate() {
        if !bad.vips.contains(&i) {
            vips.entry((s.vip, s.protocol)).or_insert((i, &s.name));
        }
    }
    let mut total_backends = 0usize;
    let mut total_versions = 0usize;
    let mut total_targets = 0usize;
    for (i, s) in c.services.iter().enumerate() {
        out.section = i + 1;
        let at = format!("service[{i}] {:?}", s.name);
        let svc = format!("service {:?}", s.name);
        if let Some(e) = name_problem(&s.name) {
            out.push(format!("{at}: name: {e}"));
        }
        if let Some(first) = names.insert(&s.name, i) {
            out.push(format!(
                "{at}: name: {:?} is already used by service[{first}]",
                s.name
            ));
        }
        if !bad.vips.contains(&i) {
            if s.vip.port() == 0 {
                out.push(format!("{at}: vip: {}: port 0 is not a usable port", s.vip));
            }
            if let Some(e) = addr_problem(*s.vip.ip()) {
                out.push(format!("{at}: vip: {e}"));
            }
            if let Some((_, first)) = vips.get(&(s.vip, s.protocol)).filter(|(j, _)| *j != i) {
                out.push(format!(
                    "{svc}: vip {}/{} is already used by service {first:?}",
                    s.vip, s.protocol
                ));
            }
        }
        if s.versions.is_empty() {
            out.push(format!("{svc}: needs at least one [[service.version]]"));
        }
        if s.health.is_some() && s.protocol != Protocol::Tcp {
            out.push(format!(
                "{at}: health: TCP and HTTP checks need a tcp service (set check = \"none\" for {})",
                s.protocol
            ));
        }
        if let Some(r) = &s.rollout
            && let Err(problems) = r.validate()
        {
            for problem in problems {
                out.push(format!("{at}: rollout.{problem}"));
            }
        }
        for problem in shadow_problems(s) {
            out.push(format!("{at}: shadow: {problem}"));
        }
        if !(1..=MAX_CONNECT_TIMEOUT_MS).contains(&s.connect_timeout_ms) {
            out.push(format!(
                "{at}: connect_timeout_ms: {} is out of range 1..={MAX_CONNECT_TIMEOUT_MS}",
                s.connect_timeout_ms
            ));
        }
        if let Some(a) = &s.analysis {
            analysis_problems(a, &format!("{at}: analysis"), out);
        }
        for problem in s.target_problems() {
            out.push(format!("{at}: {problem}"));
        }
        total_targets += s.targets.len();
        if s.versions.len() > MAX_VERSIONS {
            out.push(format!(
                "{svc}: {} versions; at most {MAX_VERSIONS} are supported",
                s.versions.len()
            ));
        }
        let weights_known = (0..s.versions.len()).all(|j| !bad.weights.contains(&(i, j)));
        if weights_known && !s.versions.is_empty() && s.versions.iter().all(|v| v.weight == 0) {
            out.push(format!(
                "{svc}: all version weights are 0: at least one version needs weight > 0"
            ));
        }
        let mut vnames = BTreeSet::new();
        let mut seen: BTreeMap<SocketAddrV4, &str> = BTreeMap::new();
        for (j, v) in s.versions.iter().enumerate() {
            let vat = format!("{at}: version {:?}", v.name);
            if let Some(e) = name_problem(&v.name) {
                out.push(format!("{vat}: name: {e}"));
            }
            if !vnames.insert(v.name.as_str()) {
                out.push(format!("{vat}: name: defined twice in the service"));
            }
            if !bad.weights.contains(&(i, j)) && v.weight > MAX_VERSION_WEIGHT {
                out.push(format!(
                    "{vat}: weight {} is out of range 0..={MAX_VERSION_WEIGHT}",
                    v.weight
                ));
            }
            if v.weight > 0 && v.backends.is_empty() {
                out.push(format!(
                    "{vat}: has weight {} but no backends (add backends or set weight = 0)",
                    v.weight
                ));
            } else if v.weight > 0 && !v.backends.iter().any(|b| b.state == BackendState::Active) {
                out.push(format!(
                    "{vat}: has weight {} but no active backend (every one is draining or disabled): activate one or set the version's weight to 0 first",
                    v.weight
                ));
            }
            for (k, b) in v.backends.iter().enumerate() {
                let bat = format!("{vat}: backends[{k}]");
                if !(1..=MAX_BACKEND_WEIGHT).contains(&b.weight) {
                    out.push(format!(
                        "{bat}: {}",
                        backend_weight_problem(i64::from(b.weight))
                    ));
                }
                if bad.backends.contains(&(i, j, k)) {
                    continue;
                }
                if b.address.port() == 0 {
                    out.push(format!("{bat}: {}: port 0 is not a usable port", b.address));
                }
                if let Some(e) = addr_problem(*b.address.ip()) {
                    out.push(format!("{bat}: {e}"));
                }
                if let Some(prev) = seen.insert(b.address, v.name.as_str()) {
                    out.push(format!(
                        "{bat}: {} is already a backend of version {prev:?}",
                        b.address
                    ));
                }
                if let Some((_, owner)) = vips.get(&(b.address, s.protocol)) {
                    out.push(format!(
                        "{bat}: {} is the vip of service {owner:?}: packets would loop",
                        b.address
                    ));
                }
            }
            total_backends += v.backends.len();
        }
        total_versions += s.versions.len();
    }
    out.section = usize::MAX;
    if total_versions > MAX_TOTAL_VERSIONS {
        out.push(format!(
            "{total_versions} versions configured over all services; at most {MAX_TOTAL_VERSIONS} are supported"
        ));
    }
    if total_targets > splitter_common::MAX_TARGETS as usize {
        out.push(format!(
            "{total_targets} target rules configured over all services; at most {} are supported",
            splitter_common::MAX_TARGETS
        ));
    }
    if total_backends > MAX_BACKENDS as usize {
        out.push(format!(
            "{total_backends} backends configured over all services; at most {MAX_BACKENDS} are supported"
        ));
    }
}

impl Config {
    /// Parses TOML text and validates it (see [`Config::validate`]).
    ///
    /// # Errors
    /// A TOML syntax or type error (one problem, with line and column), or
    /// every problem found by conversion and validation.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::one(e.to_string().trim_end()))?;
        let mut problems = Problems::default();
        let mut bad = Unparsed::default();
        let config = convert(raw, &mut problems, &mut bad);
        check(&config, &bad, &mut problems);
        ConfigError::check(problems.in_file_order())?;
        Ok(config)
    }

    /// Reads a file and parses it.
    ///
    /// # Errors
    /// An unreadable file, or as [`Config::parse`]; the error's `source`
    /// (and so its message) names the path.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_digest(path).map(|(config, _)| config)
    }

    /// Reads a file, parses it, and returns it with the digest of its text
    /// ([`file_digest`]).
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn load_with_digest(path: &Path) -> Result<(Self, String), ConfigError> {
        let with_source = |mut e: ConfigError| {
            e.source = Some(path.display().to_string());
            e
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| with_source(ConfigError::one(format!("cannot read the file: {e}"))))?;
        let config = Self::parse(&text).map_err(with_source)?;
        Ok((config, file_digest(&text)))
    }

    /// Checks every rule of a valid configuration: names, interface names,
    /// addresses and ports, weight ranges, uniqueness, versions per service
    /// and the data plane's capacities. [`Config::parse`] calls it; call it
    /// on configs built or changed in code.
    ///
    /// # Errors
    /// Every problem found, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Problems::default();
        check(self, &Unparsed::default(), &mut problems);
        ConfigError::check(problems.in_file_order())
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// A validated copy with `service`'s version weights replaced (in
    /// version order, as from [`parse_weight_args`]).
    ///
    /// # Errors
    /// Unknown service, wrong number of weights, or a result that fails
    /// validation (a weight out of range, all weights 0, weight on a version
    /// without backends).
    pub fn with_weights(&self, service: &str, weights: &[u32]) -> Result<Config, ConfigError> {
        let mut next = self.clone();
        let known = || {
            self.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let svc = next
            .services
            .iter_mut()
            .find(|s| s.name == service)
            .ok_or_else(|| {
                ConfigError::one(format!(
                    "no service named {service:?}; the services are: {}",
                    known()
                ))
            })?;
        if weights.len() != svc.versions.len() {
            return Err(ConfigError::one(format!(
                "service {service:?} has {} versions but {} weights were given",
                svc.versions.len(),
                weights.len()
            )));
        }
        for (v, w) in svc.versions.iter_mut().zip(weights) {
            v.weight = *w;
        }
        next.validate()?;
        Ok(next)
    }
}

/// What is wrong with a service's `[service.shadow]` (empty: nothing, or
/// no shadow). A shadow version serves no client: it must be one of the
/// service's versions, take weight 0, and have an active backend; a TCP
/// service must be `read_only` (its requests are repeated to the shadow).
pub fn shadow_problems(s: &ServiceConfig) -> Vec<String> {
    let mut out = Vec::new();
    let Some(sh) = &s.shadow else {
        return out;
    };
    if !(1..=100).contains(&sh.percent) {
        out.push("percent: must be a whole number in 1..=100".to_string());
    }
    match s.versions.iter().find(|v| v.name == sh.version) {
        None => out.push(format!(
            "version {:?} is not a version of service {:?}; its versions are: {}",
            sh.version,
            s.name,
            s.versions
                .iter()
                .map(|v| v.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(v) => {
            if v.weight > 0 {
                out.push(format!(
                    "version {:?} takes weight {}: a shadow version serves no client, set its weight to 0 \
                     (or turn the shadow off before giving it traffic)",
                    v.name, v.weight
                ));
            }
            if !v.backends.iter().any(|b| b.state == BackendState::Active) {
                out.push(format!(
                    "version {:?} has no active backend to receive the copies",
                    v.name
                ));
            }
        }
    }
    if s.protocol == Protocol::Tcp && !s.read_only {
        out.push(format!(
            "service {:?} is not read_only: only ports marked read_only = true may be mirrored, \
             since every request (and every write) would be repeated to the shadow",
            s.name
        ));
    }
    out
}

/// A digest of a configuration file's text (64-bit FNV-1a, hex): the state
/// file records it to tell whether the file changed since.
pub fn file_digest(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("fnv1a64:{h:016x}")
}

/// Turns CLI arguments like `["blue=90", "green=10"]` into weights in the
/// service's version order. Every version must be named exactly once, so
/// that a typo cannot silently leave a version at its old weight.
///
/// # Errors
/// Every problem found: a malformed pair, an unknown version (the message
/// lists the known ones), a version given twice, a weight that is not a
/// whole number in `0..=MAX_VERSION_WEIGHT`, versions left out (named), or
/// all weights 0.
pub fn parse_weight_args(
    service: &ServiceConfig,
    args: &[String],
) -> Result<Vec<u32>, ConfigError> {
    let known: Vec<&str> = service.versions.iter().map(|v| v.name.as_str()).collect();
    let svc = format!("service {:?}", service.name);
    let mut problems = Vec::new();
    let mut given: BTreeMap<&str, u32> = BTreeMap::new();
    for arg in args {
        let Some((name, value)) = arg.split_once('=') else {
            problems.push(format!(
                "{arg:?} is not VERSION=WEIGHT (for example blue=90)"
            ));
            continue;
        };
        let (name, value) = (name.trim(), value.trim());
        if !known.contains(&name) {
            problems.push(format!(
                "{svc} has no version {name:?}; its versions are: {}",
                known.join(", ")
            ));
            continue;
        }
        let weight = match value.parse::<u64>() {
            Ok(w) if w <= u64::from(MAX_VERSION_WEIGHT) => w as u32,
            Ok(w) => {
                problems.push(format!(
                    "{arg:?}: weight {w} is out of range 0..={MAX_VERSION_WEIGHT}"
                ));
                continue;
            }
            Err(_) => {
                problems.push(format!(
                    "{arg:?}: {value:?} is not a whole number in 0..={MAX_VERSION_WEIGHT}"
                ));
                continue;
            }
        };
        if given.insert(name, weight).is_some() {
            problems.push(format!("version {name:?} is given twice"));
        }
    }
    let missing: Vec<&str> = known
        .iter()
        .filter(|k| !given.contains_key(*k))
        .copied()
        .collect();
    // Only once the named versions are right: a typo shows up as "unknown
    // version", not also as a missing one.
    if problems.is_empty() && !missing.is_empty() {
        let example: Vec<String> = known.iter().map(|k| format!("{k}=N")).collect();
        problems.push(format!(
            "name every version of {svc}; missing: {} (for example: {})",
            missing.join(", "),
            example.join(" ")
        ));
    }
    if problems.is_empty() && given.values().all(|w| *w == 0) {
        problems.push(format!(
            "{svc}: all version weights are 0: at least one version needs weight > 0"
        ));
    }
    ConfigError::check(problems)?;
    Ok(known
        .iter()
        .map(|k| given.get(k).copied().unwrap_or(0))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BASE: &str = r#"
[dataplane]
interface = "ec"
backend_interface = "eb"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[[service.version]]
name = "blue"
weight = 90
backends = ["10.0.2.2:8080", { address = "10.0.2.4:8080", weight = 2 }]

[[service.version]]
name = "green"
weight = 10
backends = ["10.0.2.3:8080"]
"#;

    /// The `[service.rollout]` example of docs/config.md, as written there.
    fn documented_rollout_block() -> String {
        let doc = include_str!("../../docs/config.md");
        let start = doc.find("```toml\n[service.rollout]").unwrap() + "```toml\n".len();
        let len = doc[start..].find("```").unwrap();
        doc[start..start + len].to_string()
    }

    #[test]
    fn the_documented_rollout_defaults_parse_and_validate() {
        let c = Config::parse(&format!("{BASE}\n{}", documented_rollout_block())).unwrap();
        let r = c.services[0].rollout.clone().unwrap();
        assert_eq!(r.keep_old_ms, 600_000);
        assert_eq!(r.analysis.criteria.min_attempts, 20);
        assert_eq!(r.hooks.len(), 1);
        let crate::rollout::spec::Strategy::Canary { steps } = &r.strategy else {
            panic!("{:?}", r.strategy)
        };
        assert_eq!(steps.len(), 3);
    }

    #[test]
    fn rollout_defaults_errors_name_the_service_and_field() {
        let bad = "[service.rollout.strategy]\nkind = \"canary\"\nsteps = [{ weight_percent = 50 }, { weight_percent = 20 }]\n";
        let e = err(&format!("{BASE}\n{bad}")).to_string();
        assert!(
            e.contains("service[0] \"web\": rollout.strategy.steps"),
            "{e}"
        );
        let unknown = "[service.rollout]\nspeed = 3\n";
        let e = err(&format!("{BASE}\n{unknown}")).to_string();
        assert!(e.contains("speed"), "{e}");
    }

    /// A second service, appended to BASE.
    const API: &str = r#"
[[service]]
name = "api"
vip = "10.0.0.11:443"

[[service.version]]
name = "v1"
weight = 1
backends = ["10.0.3.1:8443"]
"#;

    fn err(text: &str) -> ConfigError {
        match Config::parse(text) {
            Ok(c) => panic!("expected an error for:\n{text}\ngot {c:?}"),
            Err(e) => e,
        }
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn complete_example_parses_to_the_expected_struct() {
        let text = BASE
            .replace(
                "backend_interface = \"eb\"",
                "backend_interface = \"eb\"\nmode = \"dnat\"\nsnat_address = \"10.0.2.1\"\nxdp_mode = \"native\"\nconn_capacity = 65536",
            )
            .replace(
                "vip = \"10.0.0.10:80\"",
                "vip = \"10.0.0.10:80\"\nprotocol = \"udp\"\naffinity = \"client-ip\"",
            );
        let want = Config {
            dataplane: DataplaneConfig {
                interface: "ec".into(),
                backend_interface: Some("eb".into()),
                mode: Mode::Dnat,
                snat_address: Some(Ipv4Addr::new(10, 0, 2, 1)),
                xdp_mode: XdpModeConfig::Native,
                pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
                conn_capacity: 65536,
            },
            services: vec![ServiceConfig {
                name: "web".into(),
                vip: addr("10.0.0.10:80"),
                protocol: Protocol::Udp,
                affinity: Affinity::ClientIp,
                health: None,
                connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
                analysis: None,
                rollout: None,
                targets: Vec::new(),
                read_only: false,
                shadow: None,
                versions: vec![
                    VersionConfig {
                        name: "blue".into(),
                        weight: 90,
                        backends: vec![
                            BackendConfig {
                                address: addr("10.0.2.2:8080"),
                                weight: 1,
                                state: BackendState::Active,
                            },
                            BackendConfig {
                                address: addr("10.0.2.4:8080"),
                                weight: 2,
                                state: BackendState::Active,
                            },
                        ],
                    },
                    VersionConfig {
                        name: "green".into(),
                        weight: 10,
                        backends: vec![BackendConfig {
                            address: addr("10.0.2.3:8080"),
                            weight: 1,
                            state: BackendState::Active,
                        }],
                    },
                ],
            }],
            metrics: Some(MetricsConfig::default()),
        };
        assert_eq!(Config::parse(&text).unwrap(), want);
        assert_eq!(want.validate(), Ok(()));
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.dataplane.mode, Mode::Snat);
        assert_eq!(c.dataplane.xdp_mode, XdpModeConfig::Auto);
        assert_eq!(c.dataplane.snat_address, None);
        assert_eq!(c.dataplane.conn_capacity, CONN_CAPACITY);
        let s = &c.services[0];
        assert_eq!((s.protocol, s.affinity), (Protocol::Tcp, Affinity::Flow));
        assert_eq!(s.versions[0].backends[0].weight, 1);
        let one_armed = Config::parse(&BASE.replace("backend_interface = \"eb\"", "")).unwrap();
        assert_eq!(one_armed.dataplane.backend_interface, None);
        // A version at weight 0 may have no backends yet.
        let c = Config::parse(
            &BASE.replace("weight = 10\nbackends = [\"10.0.2.3:8080\"]", "weight = 0"),
        )
        .unwrap();
        assert!(c.services[0].versions[1].backends.is_empty());
    }

    #[test]
    fn zero_services_is_an_edge_with_nothing_yet() {
        let c = Config::parse("[dataplane]\ninterface = \"eth0\"\n").unwrap();
        assert!(c.services.is_empty());
        assert!(c.service("web").is_none());
    }

    #[test]
    fn metrics_default_to_loopback_and_can_be_moved_or_turned_off() {
        let listen = |extra: &str| {
            Config::parse(&format!("{BASE}\n{extra}"))
                .unwrap()
                .metrics
                .map(|m| m.listen.to_string())
        };
        assert_eq!(listen(""), Some("127.0.0.1:9470".into()));
        assert_eq!(listen("[metrics]"), Some("127.0.0.1:9470".into()));
        assert_eq!(
            listen("[metrics]\nlisten = \"10.1.2.3:9100\""),
            Some("10.1.2.3:9100".into())
        );
        assert_eq!(
            listen("[metrics]\nlisten = \"[::1]:9470\""),
            Some("[::1]:9470".into())
        );
        assert_eq!(listen("[metrics]\nlisten = \"\""), None);
        assert_eq!(listen("[metrics]\nenabled = false"), None);
        assert_eq!(
            listen("[metrics]\nenabled = false\nlisten = \"127.0.0.1:1\""),
            None
        );
        assert_eq!(
            listen("[metrics]\nenabled = true"),
            Some("127.0.0.1:9470".into())
        );
        for (extra, want) in [
            (
                "[metrics]\nlisten = \"localhost:9470\"",
                "metrics.listen: \"localhost:9470\" is not an address:port",
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1\"",
                "metrics.listen: \"127.0.0.1\" is not an address:port",
            ),
            (
                "[metrics]\nlisten = \"127.0.0.1:0\"",
                "metrics.listen: 127.0.0.1:0: port 0 is not a usable port",
            ),
            (
                "[metrics]\nlisten = \"224.0.0.1:9470\"",
                "metrics.listen: 224.0.0.1:9470 is not a unicast address",
            ),
            ("[metrics]\nport = 9470", "unknown field `port`"),
        ] {
            let e = err(&format!("{BASE}\n{extra}")).to_string();
            assert!(e.contains(want), "{extra}: got {e}");
        }
    }

    #[test]
    fn health_tables_parse_with_defaults_and_ranges() {
        let c = Config::parse(&format!("{BASE}\n[service.health]\nfall = 5\n")).unwrap();
        let h = c.services[0].health.clone().unwrap();
        assert_eq!(
            (h.interval_ms, h.timeout_ms, h.fall, h.rise),
            (1000, 1000, 5, 2)
        );
        assert_eq!(h.http_path, None);
        let c = Config::parse(&format!(
            "{BASE}\n[service.health]\ncheck = \"http\"\npath = \"/healthz\"\n"
        ))
        .unwrap();
        let h = c.services[0].health.clone().unwrap();
        assert_eq!(h.http_path.as_deref(), Some("/healthz"));
        let e = err(&format!("{BASE}\n[service.health]\npath = \"/x\"\n")).to_string();
        assert!(e.contains("health.path: only for check = \"http\""), "{e}");
        let e = err(&format!(
            "{BASE}\n[service.health]\ncheck = \"http\"\npath = \"x y\"\n"
        ))
        .to_string();
        assert!(e.contains("must start with '/'"), "{e}");
        let off = Config::parse(&format!("{BASE}\n[service.health]\ncheck = \"none\"\n")).unwrap();
        assert_eq!(off.services[0].health, None);
        let e = err(&format!(
            "{BASE}\n[service.health]\ncheck = \"grpc\"\ninterval_ms = 5\nrise = 0\n"
        ))
        .to_string();
        assert!(
            e.contains("health.check: \"grpc\" is not one of tcp, http, none"),
            "{e}"
        );
        let e = err(&format!(
            "{BASE}\n[service.health]\ninterval_ms = 5\nrise = 0\n"
        ))
        .to_string();
        assert!(
            e.contains("health.interval_ms: 5 is out of range 100..=3600000"),
            "{e}"
        );
        assert!(e.contains("health.rise: 0 is out of range 1..=100"), "{e}");
        let udp = BASE.replace(
            "vip = \"10.0.0.10:80\"",
            "vip = \"10.0.0.10:80\"\nprotocol = \"udp\"",
        );
        let e = err(&format!("{udp}\n[service.health]\n")).to_string();
        assert!(e.contains("TCP and HTTP checks need a tcp service"), "{e}");
    }

    const ANALYSIS: &str = r#"
[service.analysis]
prometheus = "http://127.0.0.1:9090"
query = 'sum(rate(http_requests_total{service="{service}",version="{version}",code=~"5.."}[30s])) / sum(rate(http_requests_total{service="{service}",version="{version}"}[30s]))'
"#;

    fn with_analysis(extra: &str) -> String {
        format!("{BASE}{ANALYSIS}{extra}")
    }

    #[test]
    fn analysis_tables_parse_with_defaults() {
        let c = Config::parse(&with_analysis("")).unwrap();
        let a = c.services[0].analysis.clone().unwrap();
        assert_eq!(a.prometheus, "http://127.0.0.1:9090");
        assert!(
            a.query
                .starts_with("sum(rate(http_requests_total{service=\"{service}\"")
        );
        assert_eq!((a.min, a.max), (None, None));
        assert_eq!(
            (a.interval_ms, a.timeout_ms),
            (DEFAULT_ANALYSIS_INTERVAL_MS, DEFAULT_ANALYSIS_TIMEOUT_MS)
        );
        assert_eq!((a.interval_ms, a.timeout_ms), (5000, 2000));
        assert_eq!(c.validate(), Ok(()));
        // Without the table: no analysis.
        assert_eq!(Config::parse(BASE).unwrap().services[0].analysis, None);
        // Every field; integers are accepted as bounds.
        let c = Config::parse(&with_analysis(
            "min = 0\nmax = 0.05\ninterval_ms = 1000\ntimeout_ms = 900\n",
        ))
        .unwrap();
        let a = c.services[0].analysis.clone().unwrap();
        assert_eq!((a.min, a.max), (Some(0.0), Some(0.05)));
        assert_eq!((a.interval_ms, a.timeout_ms), (1000, 900));
        // The default timeout is never longer than the interval.
        let c = Config::parse(&with_analysis("interval_ms = 1000\n")).unwrap();
        assert_eq!(c.services[0].analysis.as_ref().unwrap().timeout_ms, 1000);
        // min = max is a point, allowed; a query without placeholders too.
        let c = Config::parse(
            &with_analysis("min = 1\nmax = 1\n")
                .replace("query = 'sum(", "query = 'scalar(sum(up)) + 0 * sum("),
        )
        .unwrap();
        assert!(c.services[0].analysis.is_some());
        let c = Config::parse(&format!(
            "{BASE}\n[service.analysis]\nprometheus = \"http://prom.example:80/prometheus/\"\nquery = \"up\"\n"
        ))
        .unwrap();
        assert_eq!(c.services[0].analysis.as_ref().unwrap().query, "up");
    }

    #[test]
    fn analysis_survives_the_state_files_round_trip() {
        let c = Config::parse(&with_analysis("min = 0\nmax = 0.05\n")).unwrap();
        let s = &c.services[0];
        let json = serde_json::to_string(s).unwrap();
        let back: ServiceConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, s);
        // A state file from before `analysis` existed still reads.
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_object_mut().unwrap().remove("analysis");
        let old: ServiceConfig = serde_json::from_value(v).unwrap();
        assert_eq!(old.analysis, None);
        // And with only the required fields.
        let a: AnalysisConfig =
            serde_json::from_str(r#"{"prometheus":"http://p:9090","query":"up"}"#).unwrap();
        assert_eq!((a.interval_ms, a.timeout_ms, a.min), (5000, 2000, None));
    }

    #[test]
    fn analysis_errors_name_their_field() {
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{BASE}\n[service.analysis]\nquery = \"up\"\n"),
                r#"service[0] "web": analysis.prometheus: required: the base URL of the Prometheus HTTP API, like "http://127.0.0.1:9090""#,
            ),
            (
                format!("{BASE}\n[service.analysis]\nprometheus = \"http://p:9090\"\n"),
                r#"service[0] "web": analysis.query: required: PromQL giving one number, with {service} and {version} filled in per version"#,
            ),
            (
                with_analysis("").replace("query = 'sum", "query = '  '\nx = 'sum"),
                "unknown field `x`, expected one of `prometheus`, `query`, `min`, `max`, `interval_ms`, `timeout_ms`",
            ),
            (
                format!(
                    "{BASE}\n[service.analysis]\nprometheus = \"http://p:9090\"\nquery = \" \"\n"
                ),
                r#"service[0] "web": analysis.query: required"#,
            ),
            (
                with_analysis("").replace("{version}\",code", "{versoin}\",code"),
                r#"service[0] "web": analysis.query: unknown placeholder {versoin}; the placeholders are {service} and {version}"#,
            ),
            (
                format!(
                    "{BASE}\n[service.analysis]\nprometheus = \"http://p:9090\"\nquery = \"a{{x}} + b{{y}} + c{{x}}\"\n"
                ),
                "analysis.query: unknown placeholder {x}, {y}; the placeholders",
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "https://127.0.0.1:9090"),
                r#"service[0] "web": analysis.prometheus: "https://127.0.0.1:9090": https is not supported, only http (like "http://127.0.0.1:9090")"#,
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "127.0.0.1:9090"),
                r#"analysis.prometheus: "127.0.0.1:9090" is not an http:// URL"#,
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "http://127.0.0.1:0"),
                r#"analysis.prometheus: "http://127.0.0.1:0": "0" is not a port (1..=65535)"#,
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "http://127.0.0.1:99999"),
                r#""99999" is not a port"#,
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "http://:9090"),
                r#"analysis.prometheus: "http://:9090" has no host"#,
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "http://u:pw@p:9090"),
                "user names and passwords are not supported",
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "http://p:9090/?x=1"),
                "a base URL has no query (?) part",
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "http://p q:9090"),
                r#""p q" is not a host name or address"#,
            ),
            (
                with_analysis("").replace("http://127.0.0.1:9090", "http://[::1:9090"),
                "no ']' after the IPv6 address",
            ),
            (
                with_analysis("min = 0.5\nmax = 0.1\n"),
                r#"service[0] "web": analysis.max: 0.1 is below min 0.5"#,
            ),
            (
                with_analysis("min = nan\n"),
                r#"service[0] "web": analysis.min: NaN is not a finite number"#,
            ),
            (
                with_analysis("max = inf\n"),
                r#"service[0] "web": analysis.max: inf is not a finite number"#,
            ),
            (
                with_analysis("interval_ms = 999\n"),
                r#"service[0] "web": analysis.interval_ms: 999 is out of range 1000..=600000"#,
            ),
            (
                with_analysis("interval_ms = 600001\n"),
                "analysis.interval_ms: 600001 is out of range 1000..=600000",
            ),
            (
                with_analysis("interval_ms = -1\n"),
                "analysis.interval_ms: -1 is out of range 1000..=600000",
            ),
            (
                with_analysis("timeout_ms = 99\n"),
                r#"service[0] "web": analysis.timeout_ms: 99 is out of range 100..=60000"#,
            ),
            (
                with_analysis("timeout_ms = 99999999999\n"),
                "analysis.timeout_ms: 99999999999 is out of range 100..=60000",
            ),
            (
                with_analysis("interval_ms = 1000\ntimeout_ms = 3000\n"),
                r#"service[0] "web": analysis.timeout_ms: 3000 is longer than interval_ms 1000: a query must end before the next one starts"#,
            ),
            (
                with_analysis("min = \"0\"\n"),
                "invalid type: string \"0\", expected f64",
            ),
        ];
        for (text, want) in cases {
            let e = err(&text).to_string();
            assert!(e.contains(want), "want {want:?} in:\n{e}\n--- for:\n{text}");
        }
        // One message per problem: a bad value is not also reported by the
        // checks of what stands in for it.
        let e = err(&with_analysis("interval_ms = 5\ntimeout_ms = 1\n"));
        assert_eq!(e.problems.len(), 2, "{e}");
        let e = err(&format!("{BASE}\n[service.analysis]\n"));
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn validate_checks_analysis_built_in_code() {
        let mut c = Config::parse(&with_analysis("")).unwrap();
        let a = c.services[0].analysis.as_mut().unwrap();
        a.query = "up{x=\"{nope}\"}".into();
        a.prometheus = "ftp://p".into();
        a.min = Some(f64::NAN);
        a.interval_ms = 0;
        let e = c.validate().unwrap_err();
        assert_eq!(e.problems.len(), 4, "{e}");
        assert!(
            e.problems[0].starts_with(r#"service[0] "web": analysis.prometheus:"#),
            "{e}"
        );
    }

    #[test]
    fn prometheus_urls_are_taken_apart() {
        let u = |s: &str| PrometheusUrl::parse(s).unwrap();
        let want = |host: &str, port: u16, prefix: &str| PrometheusUrl {
            host: host.into(),
            port,
            prefix: prefix.into(),
        };
        assert_eq!(u("http://127.0.0.1:9090"), want("127.0.0.1", 9090, ""));
        assert_eq!(u("http://127.0.0.1:9090/"), want("127.0.0.1", 9090, ""));
        assert_eq!(u("HTTP://prom.example"), want("prom.example", 80, ""));
        assert_eq!(
            u("http://prom-1.example:9090/prometheus/"),
            want("prom-1.example", 9090, "/prometheus")
        );
        assert_eq!(u("http://[::1]:9090/a/b"), want("::1", 9090, "/a/b"));
        assert_eq!(u("http://[::1]"), want("::1", 80, ""));
        assert_eq!(u("http://[::1]:9090").authority(), "[::1]:9090");
        assert_eq!(u("http://p").authority(), "p:80");
        for bad in [
            "",
            "http://",
            "http://[zz]:1",
            "http://[::1]x",
            "http://p:",
            "http://p:x",
            "http://p:1:2",
            "http://p/a b",
            "http://p/#x",
            "unix:///run/p.sock",
        ] {
            assert!(PrometheusUrl::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn placeholders_are_identifiers_in_braces() {
        assert_eq!(next_placeholder("a{service}b"), Some((1, 10, "service")));
        assert_eq!(
            next_placeholder(r#"x{a="b"} {3} {} {_x1}"#),
            Some((16, 21, "_x1"))
        );
        assert_eq!(next_placeholder(r#"x{a="b"} {3} {} {x"#), None);
        assert_eq!(query_problem("up"), None);
        assert_eq!(query_problem(r#"up{a=~"x{2}"} + {version}"#), None);
    }

    #[test]
    fn every_error_names_its_field() {
        let dp = |extra: &str| BASE.replace("backend_interface = \"eb\"", extra);
        let cases: Vec<(String, &str)> = vec![
            // Dataplane.
            (
                dp("mode = \"nat\""),
                r#"dataplane.mode: "nat" is not one of snat, dnat"#,
            ),
            (
                dp("xdp_mode = \"fast\""),
                r#"dataplane.xdp_mode: "fast" is not one of auto, native, generic"#,
            ),
            (
                dp("conn_capacity = 100"),
                "dataplane.conn_capacity: 100 is outside 1024..=16777216 (connection-table entries, two per flow)",
            ),
            (
                dp("conn_capacity = -1"),
                "dataplane.conn_capacity: -1 is outside 1024..=16777216",
            ),
            (
                dp("conn_capacity = 99999999999"),
                "dataplane.conn_capacity: 99999999999 is outside 1024..=16777216",
            ),
            (
                dp("snat_address = \"10.0.2\""),
                r#"dataplane.snat_address: "10.0.2": is not an IPv4 address"#,
            ),
            (
                dp("snat_address = \"fe80::1\""),
                r#"dataplane.snat_address: "fe80::1": IPv6 is not supported yet"#,
            ),
            (
                dp("snat_address = \"0.0.0.0\""),
                "dataplane.snat_address: 0.0.0.0 is not a unicast address",
            ),
            (
                BASE.replace("interface = \"ec\"", "interface = \"\""),
                "dataplane.interface: must not be empty",
            ),
            (
                BASE.replace(
                    "interface = \"ec\"",
                    "interface = \"averyveryverylongname\"",
                ),
                "dataplane.interface: \"averyveryverylongname\" is longer than 15 bytes",
            ),
            (
                dp("backend_interface = \"eth 1\""),
                r#"dataplane.backend_interface: "eth 1" is not a valid interface name"#,
            ),
            (
                dp("colour = \"red\""),
                "unknown field `colour`, expected one of `interface`, `backend_interface`",
            ),
            ("[dataplane]\n".to_string(), "missing field `interface`"),
            (String::new(), "missing field `dataplane`"),
            // Service.
            (
                BASE.replace("10.0.0.10:80", "10.0.0.x:80"),
                r#"service[0] "web": vip: "10.0.0.x:80" is not an IPv4 address:port"#,
            ),
            (
                BASE.replace("10.0.0.10:80", "[::1]:80"),
                r#"service[0] "web": vip: "[::1]:80": IPv6 is not supported yet"#,
            ),
            (
                BASE.replace("10.0.0.10:80", "10.0.0.10:0"),
                r#"service[0] "web": vip: 10.0.0.10:0: port 0 is not a usable port"#,
            ),
            (
                BASE.replace("10.0.0.10:80", "10.0.0.10"),
                r#"service[0] "web": vip: "10.0.0.10" is not an IPv4 address:port"#,
            ),
            (
                BASE.replace("10.0.0.10:80", "224.0.0.1:80"),
                r#"service[0] "web": vip: 224.0.0.1 is not a unicast address"#,
            ),
            (
                BASE.replace("vip = ", "protocol = \"sctp\"\nvip = "),
                r#"service[0] "web": protocol: "sctp" is not one of tcp, udp"#,
            ),
            (
                BASE.replace("vip = ", "affinity = \"sticky\"\nvip = "),
                r#"service[0] "web": affinity: "sticky" is not one of flow, client-ip"#,
            ),
            (
                BASE.replace("name = \"web\"", "name = \"my web\""),
                r#"service[0] "my web": name: "my web" may only hold letters, digits, '_', '.' and '-'"#,
            ),
            (
                BASE.replace("name = \"web\"", "name = \"\""),
                r#"service[0] "": name: must not be empty"#,
            ),
            (
                BASE.replace("name = \"web\"", &format!("name = \"{}\"", "w".repeat(65))),
                "is longer than 64 characters",
            ),
            (
                BASE.to_string() + &API.replace("\"api\"", "\"web\""),
                r#"service[1] "web": name: "web" is already used by service[0]"#,
            ),
            (
                BASE.to_string() + &API.replace("10.0.0.11:443", "10.0.0.10:80"),
                r#"service "api": vip 10.0.0.10:80/tcp is already used by service "web""#,
            ),
            (
                BASE.replace("name = \"web\"", "name = \"web\"\nport = 80"),
                "unknown field `port`, expected one of `name`, `vip`",
            ),
            (
                "[dataplane]\ninterface = \"e\"\n[[service]]\nname = \"x\"\nvip = \"10.0.0.1:1\"\n"
                    .to_string(),
                r#"service "x": needs at least one [[service.version]]"#,
            ),
            (
                BASE.to_string()
                    + "[[service.version]]\nname = \"v3\"\nweight = 0\n"
                    + "[[service.version]]\nname = \"v4\"\nweight = 0\n"
                    + "[[service.version]]\nname = \"v5\"\nweight = 0\n",
                r#"service "web": 5 versions; at most 4 are supported"#,
            ),
            (
                BASE.replace("weight = 10\n", "weight = 0\n")
                    .replace("weight = 90", "weight = 0"),
                r#"service "web": all version weights are 0: at least one version needs weight > 0"#,
            ),
            // Version.
            (
                BASE.replace("name = \"green\"", "name = \"blue\""),
                r#"service[0] "web": version "blue": name: defined twice in the service"#,
            ),
            (
                BASE.replace("name = \"green\"", "name = \"gr/een\""),
                r#"service[0] "web": version "gr/een": name: "gr/een" may only hold"#,
            ),
            (
                BASE.replace("weight = 90", "weight = -1"),
                r#"service[0] "web": version "blue": weight -1 is out of range 0..=1000000"#,
            ),
            (
                BASE.replace("weight = 90", "weight = 1000001"),
                r#"service[0] "web": version "blue": weight 1000001 is out of range 0..=1000000"#,
            ),
            (
                BASE.replace("weight = 90", "weight = 99999999999"),
                r#"service[0] "web": version "blue": weight 99999999999 is out of range"#,
            ),
            (
                BASE.replace("backends = [\"10.0.2.3:8080\"]", ""),
                r#"service[0] "web": version "green": has weight 10 but no backends"#,
            ),
            (
                BASE.replace("name = \"green\"", "name = \"green\"\nbackend = []"),
                "unknown field `backend`, expected one of `name`, `weight`, `backends`",
            ),
            // Backend.
            (
                BASE.replace("10.0.2.3:8080", "10.0.2.x:80"),
                r#"service[0] "web": version "green": backends[0]: "10.0.2.x:80" is not an IPv4 address:port"#,
            ),
            (
                BASE.replace("10.0.2.3:8080", "[2001:db8::1]:80"),
                r#"service[0] "web": version "green": backends[0]: "[2001:db8::1]:80": IPv6 is not supported yet"#,
            ),
            (
                BASE.replace("10.0.2.3:8080", "10.0.2.3:0"),
                r#"service[0] "web": version "green": backends[0]: 10.0.2.3:0: port 0 is not a usable port"#,
            ),
            (
                BASE.replace("\"10.0.2.3:8080\"", "\"10.0.2.2:8080\""),
                r#"service[0] "web": version "green": backends[0]: 10.0.2.2:8080 is already a backend of version "blue""#,
            ),
            (
                BASE.replace("weight = 2", "weight = 0"),
                r#"service[0] "web": version "blue": backends[1]: weight 0 is out of range 1..=1000"#,
            ),
            (
                BASE.replace("weight = 2", "weight = 1001"),
                r#"backends[1]: weight 1001 is out of range 1..=1000"#,
            ),
            (
                BASE.replace("weight = 2", "weight = -5"),
                r#"backends[1]: weight -5 is out of range 1..=1000"#,
            ),
            (
                BASE.replace("weight = 2 }", "weigth = 2 }"),
                "unknown field `weigth`, expected one of `address`, `weight`, `state`",
            ),
            (
                BASE.replace(
                    "{ address = \"10.0.2.4:8080\", weight = 2 }",
                    "{ weight = 2 }",
                ),
                "missing field `address`",
            ),
            (
                BASE.replace("\"10.0.2.3:8080\"", "8080"),
                r#"expected a backend: "IPv4:port" or { address = "IPv4:port", weight = N, state = "active" }"#,
            ),
            (
                BASE.replace("\"10.0.2.3:8080\"", "\"10.0.0.10:80\""),
                r#"backends[0]: 10.0.0.10:80 is the vip of service "web": packets would loop"#,
            ),
            // TOML syntax and types keep toml's position.
            ("[dataplane\ninterface = 1".to_string(), "line 1, column 11"),
            (
                BASE.replace("weight = 90", "weight = \"ninety\""),
                "line 12, column 10",
            ),
            (BASE.replace("weight = 90", "weight = 9.5"), "line 12"),
        ];
        for (text, want) in cases {
            let e = err(&text).to_string();
            assert!(e.contains(want), "want {want:?} in:\n{e}\n--- for:\n{text}");
        }
    }

    #[test]
    fn all_problems_are_reported_together_in_file_order() {
        let text = BASE
            .replace("10.0.2.3:8080", "nope")
            .replace("10.0.0.10:80", "bad")
            .replace("weight = 2", "weight = 0")
            .replace("name = \"green\"", "name = \"blue\"")
            .replace("interface = \"ec\"", "interface = \"ec\"\nmode = \"nat\"")
            + &API.replace("10.0.3.1:8443", "10.0.3.1:0");
        let e = err(&text);
        let shown = e.to_string();
        assert!(shown.starts_with("6 problems:\n"), "{shown}");
        let lines: Vec<&str> = shown.lines().skip(1).collect();
        assert_eq!(lines.len(), 6, "{shown}");
        // Dataplane, then service[0] (conversion before validation), then
        // service[1], whichever pass found them.
        let want = [
            "dataplane.mode:",
            r#"service[0] "web": vip: "bad""#,
            r#"service[0] "web": version "blue": backends[0]: "nope""#,
            r#"service[0] "web": version "blue": backends[1]: weight 0"#,
            r#"service[0] "web": version "blue": name: defined twice"#,
            r#"service[1] "api": version "v1": backends[0]: 10.0.3.1:0: port 0"#,
        ];
        for (line, want) in lines.iter().zip(want) {
            assert!(
                line.starts_with(want),
                "want {want:?} at the start of {line:?}\n{shown}"
            );
        }
    }

    #[test]
    fn a_bad_value_does_not_also_trip_checks_on_its_placeholder() {
        // Two unparsable VIPs are not "the same VIP"; a bad backend address
        // is not "port 0" or a duplicate; a negative weight is not "all
        // weights are 0".
        let text = BASE.to_string() + API;
        let text = text
            .replace("10.0.0.10:80", "x")
            .replace("10.0.0.11:443", "y")
            .replace("10.0.2.3:8080", "z")
            .replace("10.0.2.2:8080", "z")
            .replace("weight = 90", "weight = -90")
            .replace("weight = 10\n", "weight = 0\n");
        let e = err(&text);
        assert_eq!(e.problems.len(), 5, "{e}");
        assert!(!e.to_string().contains("port 0"), "{e}");
        assert!(!e.to_string().contains("already"), "{e}");
        assert!(!e.to_string().contains("all version weights"), "{e}");
    }

    #[test]
    fn load_names_the_path() {
        let dir = std::env::temp_dir().join(format!("splitter-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, BASE).unwrap();
        assert_eq!(Config::load(&good).unwrap(), Config::parse(BASE).unwrap());
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, BASE.replace("10.0.0.10:80", "10.0.0.10:0")).unwrap();
        let e = Config::load(&bad).unwrap_err();
        assert_eq!(
            e.source.as_deref(),
            Some(bad.display().to_string().as_str())
        );
        assert!(
            e.to_string()
                .starts_with(&format!("{}: service[0]", bad.display())),
            "{e}"
        );
        let missing = dir.join("missing.toml");
        let e = Config::load(&missing).unwrap_err().to_string();
        assert!(e.contains("missing.toml: cannot read the file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn validate_catches_configs_built_in_code() {
        let good = Config::parse(BASE).unwrap();
        let mut c = good.clone();
        c.services[0].versions[0].weight = MAX_VERSION_WEIGHT + 1;
        c.services[0].versions[0].backends[0].weight = 0;
        c.services[0].vip.set_port(0);
        c.dataplane.interface = "x".repeat(16);
        let e = c.validate().unwrap_err();
        assert_eq!(e.problems.len(), 4, "{e}");
        let mut c = good.clone();
        c.services.push(good.services[0].clone());
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains(r#"service[1] "web": name: "web" is already used by service[0]"#),
            "{e}"
        );
    }

    #[test]
    fn capacities_are_enforced() {
        let mut c = Config::parse(BASE).unwrap();
        let proto = c.services[0].clone();
        c.services = (0..=MAX_SERVICES)
            .map(|i| {
                let mut s = proto.clone();
                s.name = format!("s{i}");
                s.vip = SocketAddrV4::new(Ipv4Addr::from(0x0a00_0000 + i), 80);
                s.versions.truncate(1);
                s.versions[0].backends = vec![BackendConfig {
                    address: SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + i), 80),
                    weight: 1,
                    state: BackendState::Active,
                }];
                s
            })
            .collect();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("1025 services configured; at most 1024"), "{e}");
        assert!(
            e.contains("1025 versions configured over all services; at most 512"),
            "{e}"
        );
        let mut c = Config::parse(BASE).unwrap();
        c.services[0].versions[0].backends = (0..MAX_BACKENDS)
            .map(|i| BackendConfig {
                address: SocketAddrV4::new(Ipv4Addr::from(0x0b00_0000 + i), 80),
                weight: 1,
                state: BackendState::Active,
            })
            .collect();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("16385 backends configured over all services; at most 16384"),
            "{e}"
        );
    }

    #[test]
    fn keywords_round_trip_through_display_fromstr_and_serde() {
        for name in Mode::NAMES {
            assert_eq!(name.parse::<Mode>().unwrap().to_string(), *name);
        }
        for name in XdpModeConfig::NAMES {
            assert_eq!(name.parse::<XdpModeConfig>().unwrap().to_string(), *name);
        }
        for name in Protocol::NAMES {
            assert_eq!(name.parse::<Protocol>().unwrap().to_string(), *name);
        }
        for name in Affinity::NAMES {
            assert_eq!(name.parse::<Affinity>().unwrap().to_string(), *name);
        }
        assert_eq!(Affinity::ClientIp.to_string(), "client-ip");
        assert_eq!(
            "TCP".parse::<Protocol>().unwrap_err(),
            r#""TCP" is not one of tcp, udp"#
        );
        let c = Config::parse(&BASE.replace("vip = ", "affinity = \"client-ip\"\nvip = ")).unwrap();
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("affinity = \"client-ip\""), "{text}");
        assert!(text.contains("mode = \"snat\""), "{text}");
        assert!(text.contains("vip = \"10.0.0.10:80\""), "{text}");
    }

    #[test]
    fn weight_args_follow_version_order() {
        let c = Config::parse(BASE).unwrap();
        let s = &c.services[0];
        assert_eq!(
            parse_weight_args(s, &args(&["green=100", "blue=0"])).unwrap(),
            vec![0, 100]
        );
        assert_eq!(
            parse_weight_args(s, &args(&["blue = 5", "green=1000000"])).unwrap(),
            vec![5, 1_000_000]
        );
        let next = c.with_weights("web", &[0, 100]).unwrap();
        assert_eq!(next.services[0].versions[1].weight, 100);
        assert_eq!(next.services[0].versions[0].weight, 0);
        // The original is untouched.
        assert_eq!(c.services[0].versions[0].weight, 90);
    }

    #[test]
    fn weight_args_reject_bad_input() {
        let c = Config::parse(BASE).unwrap();
        let s = &c.services[0];
        for (bad, want) in [
            (
                &["blue=1", "red=2"][..],
                r#"service "web" has no version "red"; its versions are: blue, green"#,
            ),
            (&["blue=1"], "missing: green (for example: blue=N green=N)"),
            (&[], "missing: blue, green"),
            (
                &["blue=0", "green=0"],
                r#"service "web": all version weights are 0"#,
            ),
            (&["blue", "green=1"], r#""blue" is not VERSION=WEIGHT"#),
            (
                &["blue=x", "green=1"],
                r#""blue=x": "x" is not a whole number in 0..=1000000"#,
            ),
            (&["blue=-1", "green=1"], "is not a whole number"),
            (&["blue=1.5", "green=1"], "is not a whole number"),
            (&["blue=", "green=1"], "is not a whole number"),
            (
                &["blue=1", "blue=2", "green=1"],
                r#"version "blue" is given twice"#,
            ),
            (
                &["blue=2000000", "green=1"],
                "weight 2000000 is out of range 0..=1000000",
            ),
            (
                &["blue=99999999999999999999", "green=1"],
                "is not a whole number",
            ),
        ] {
            let e = parse_weight_args(s, &args(bad)).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: want {want:?} in {e}");
        }
        // Several problems at once.
        let e = parse_weight_args(s, &args(&["red=1", "blue=x"])).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn with_weights_validates() {
        let c = Config::parse(BASE).unwrap();
        for (service, weights, want) in [
            ("web", &[0u32, 0][..], "all version weights are 0"),
            ("web", &[1], "has 2 versions but 1 weights were given"),
            ("web", &[MAX_VERSION_WEIGHT + 1, 1], "out of range"),
            (
                "nope",
                &[1, 1],
                r#"no service named "nope"; the services are: web"#,
            ),
        ] {
            let e = c.with_weights(service, weights).unwrap_err().to_string();
            assert!(e.contains(want), "{weights:?}: want {want:?} in {e}");
        }
        // Weight on a version without backends.
        let empty = Config::parse(
            &BASE.replace("weight = 10\nbackends = [\"10.0.2.3:8080\"]", "weight = 0"),
        )
        .unwrap();
        let e = empty.with_weights("web", &[1, 1]).unwrap_err().to_string();
        assert!(
            e.contains(r#"version "green": has weight 1 but no backends"#),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
            let _ = Config::parse(&text);
        }

        #[test]
        fn tomlish_text_never_panics(text in r#"[\[\]{}="a-z0-9:., \n#-]{0,300}"#) {
            let _ = Config::parse(&text);
        }

        #[test]
        fn mutated_valid_config_never_panics(cut in 0usize..700, insert in "[ -~\n]{0,12}", delete in 0usize..20) {
            let mut s = (BASE.to_string() + API).into_bytes();
            let at = cut.min(s.len());
            let end = (at + delete).min(s.len());
            s.splice(at..end, insert.bytes());
            if let Ok(text) = String::from_utf8(s)
                && let Ok(c) = Config::parse(&text)
            {
                // Whatever parses is valid.
                prop_assert_eq!(c.validate(), Ok(()));
            }
        }

        #[test]
        fn weight_args_never_panic(a in "\\PC{0,30}", b in "\\PC{0,30}") {
            let c = Config::parse(BASE).unwrap();
            if let Ok(w) = parse_weight_args(&c.services[0], &[a, b]) {
                prop_assert!(c.with_weights("web", &w).is_ok());
            }
        }
    }

    fn shadow_config(protocol: &str, read_only: bool, shadow: &str) -> String {
        format!(
            r#"
[dataplane]
interface = "ec"

[[service]]
name = "dns"
vip = "10.0.0.10:53"
protocol = "{protocol}"
read_only = {read_only}

[[service.version]]
name = "stable"
weight = 100
backends = ["10.0.2.2:53"]

[[service.version]]
name = "canary"
weight = 0
backends = ["10.0.2.3:53"]

[service.shadow]
{shadow}
"#
        )
    }

    #[test]
    fn a_udp_shadow_to_a_weightless_version_is_accepted() {
        let c = Config::parse(&shadow_config(
            "udp",
            false,
            "version = \"canary\"\npercent = 10",
        ))
        .unwrap();
        let s = c.service("dns").unwrap();
        assert_eq!(
            s.shadow,
            Some(ShadowConfig {
                version: "canary".into(),
                percent: 10
            })
        );
        assert!(!s.read_only);
    }

    #[test]
    fn a_tcp_shadow_of_a_read_only_service_is_accepted() {
        let c = Config::parse(&shadow_config(
            "tcp",
            true,
            "version = \"canary\"\npercent = 10",
        ))
        .unwrap();
        assert_eq!(
            c.service("dns").unwrap().shadow.as_ref().unwrap().percent,
            10
        );
    }

    #[test]
    fn shadows_the_data_plane_cannot_serve_are_refused_with_the_reason() {
        let refused = |protocol, read_only, shadow: &str| {
            Config::parse(&shadow_config(protocol, read_only, shadow))
                .unwrap_err()
                .to_string()
        };
        let e = refused("tcp", false, "version = \"canary\"\npercent = 10");
        assert!(e.contains("is not read_only"), "{e}");
        assert!(e.contains("would be repeated"), "{e}");
        let e = refused("udp", false, "version = \"stable\"\npercent = 10");
        assert!(e.contains("takes weight 100"), "{e}");
        let e = refused("udp", false, "version = \"nope\"\npercent = 10");
        assert!(e.contains("its versions are: stable, canary"), "{e}");
        for p in ["0", "101", "-5"] {
            let e = refused(
                "udp",
                false,
                &format!("version = \"canary\"\npercent = {p}"),
            );
            assert!(
                e.contains("percent: must be a whole number in 1..=100"),
                "{p}: {e}"
            );
        }
        let e = refused(
            "udp",
            false,
            "version = \"canary\"\npercent = 10\nshare = 3",
        );
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn shadow_edits_follow_the_config_rules() {
        let c = Config::parse(&shadow_config(
            "udp",
            false,
            "version = \"canary\"\npercent = 10",
        ))
        .unwrap();
        let (off, what) = crate::edit::clear_shadow(&c, "dns").unwrap();
        assert_eq!(what, "service dns: mirroring off");
        assert_eq!(off.service("dns").unwrap().shadow, None);
        let spec = crate::edit::ShadowSpec {
            version: "canary".into(),
            percent: 40,
        };
        let (on, _) = crate::edit::set_shadow(&off, "dns", &spec).unwrap();
        assert_eq!(
            on.service("dns").unwrap().shadow.as_ref().unwrap().percent,
            40
        );
        let bad = crate::edit::ShadowSpec {
            version: "stable".into(),
            percent: 40,
        };
        assert!(crate::edit::set_shadow(&off, "dns", &bad).is_err());
        assert!(crate::edit::set_shadow(&off, "nope", &spec).is_err());
    }
}
