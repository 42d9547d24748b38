//! The TOML configuration: types, parsing and validation. Pure: nothing here
//! touches the network or the kernel (the daemon resolves interfaces).
//!
//! Every problem of a file is reported at once, each naming its field:
//!
//! ```text
//! service[1] "api": version "green": backends[0]: "10.0.2.x:80" is not an IPv4 address:port
//! service "web": all version weights are 0: at least one version needs weight > 0
//! ```
//!
//! A complete example (docs/config.md explains every field):
//!
//! ```
//! let text = r#"
//! [dataplane]
//! interface = "eth0"
//! backend_interface = "eth1"
//! mode = "snat"
//!
//! [[service]]
//! name = "web"
//! vip = "10.0.0.10:80"
//! protocol = "tcp"
//! affinity = "flow"
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
//! "#;
//! let config = splitter::config::Config::parse(text).unwrap();
//! assert_eq!(config.services[0].versions[1].weight, 10);
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use splitter_common::{MAX_BACKENDS, MAX_SERVICES, MAX_TABLES, MAX_VERSIONS};

/// Highest version weight.
pub const MAX_VERSION_WEIGHT: u32 = 1_000_000;
/// Highest backend weight.
pub const MAX_BACKEND_WEIGHT: u32 = 1000;

/// Everything wrong with a configuration, one line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the config came from, if a file.
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
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(src) = &self.source {
            write!(f, "{src}: ")?;
        }
        if self.problems.len() > 1 {
            writeln!(f, "{} problems:", self.problems.len())?;
        }
        write!(f, "{}", self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

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

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// Interfaces and forwarding.
    pub dataplane: DataplaneConfig,
    /// Services, in file order.
    pub services: Vec<ServiceConfig>,
}

/// `[dataplane]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataplaneConfig {
    /// Client-facing interface.
    pub interface: String,
    /// Backend-facing interface; `None` means `interface`.
    pub backend_interface: Option<String>,
    /// SNAT or DNAT.
    pub mode: Mode,
    /// SNAT source; `None` means the backend interface's first IPv4 address.
    pub snat_address: Option<Ipv4Addr>,
    /// How to attach XDP.
    pub xdp_mode: XdpModeConfig,
}

/// `[[service]]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceConfig {
    /// Unique name.
    pub name: String,
    /// Virtual address clients connect to.
    pub vip: SocketAddrV4,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Placement hash input.
    pub affinity: Affinity,
    /// Versions, in the order weights refer to.
    pub versions: Vec<VersionConfig>,
}

/// `[[service.version]]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VersionConfig {
    /// Unique within the service.
    pub name: String,
    /// Relative share of new flows.
    pub weight: u32,
    /// Its backends.
    pub backends: Vec<BackendConfig>,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackendConfig {
    /// Address and port.
    pub address: SocketAddrV4,
    /// Relative weight inside the version.
    pub weight: u32,
}

// ---- raw, as written in the file: strings are checked in `build` so that
// every error names its field.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    dataplane: RawDataplane,
    #[serde(default, rename = "service")]
    services: Vec<RawService>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataplane {
    interface: String,
    backend_interface: Option<String>,
    mode: Option<String>,
    snat_address: Option<String>,
    xdp_mode: Option<String>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVersion {
    name: String,
    weight: i64,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawBackend {
    Plain(String),
    Table(RawBackendTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    address: String,
    weight: Option<i64>,
}

/// Collects problems while building.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, msg: String) {
        self.0.push(msg);
    }
    fn keyword<T: FromStr<Err = String> + Default>(&mut self, field: &str, v: Option<&str>) -> T {
        match v {
            None => T::default(),
            Some(s) => s.parse().unwrap_or_else(|e| {
                self.push(format!("{field}: {e}"));
                T::default()
            }),
        }
    }
    fn socket(&mut self, field: &str, v: &str) -> SocketAddrV4 {
        match v.parse::<SocketAddrV4>() {
            Ok(a) if a.port() == 0 => {
                self.push(format!("{field}: {v:?}: port 0 is not a usable port"));
                a
            }
            Ok(a) => a,
            Err(_) => {
                if v.parse::<std::net::SocketAddrV6>().is_ok() {
                    self.push(format!("{field}: {v:?}: IPv6 is not supported yet"));
                } else {
                    self.push(format!(
                        "{field}: {v:?} is not an IPv4 address:port (like \"10.0.0.10:80\")"
                    ));
                }
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)
            }
        }
    }
    fn name(&mut self, field: &str, v: &str) {
        if v.is_empty() {
            self.push(format!("{field}: must not be empty"));
        } else if !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            self.push(format!(
                "{field}: {v:?} may only hold letters, digits, '_', '.' and '-'"
            ));
        } else if v.len() > 64 {
            self.push(format!("{field}: {v:?} is longer than 64 characters"));
        }
    }
    fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                source: None,
                problems: self.0,
            })
        }
    }
}

fn build(raw: RawConfig) -> Result<Config, ConfigError> {
    let mut p = Problems::default();
    let d = raw.dataplane;
    for (field, name) in [
        ("dataplane.interface", Some(&d.interface)),
        ("dataplane.backend_interface", d.backend_interface.as_ref()),
    ] {
        if let Some(n) = name {
            if n.is_empty() {
                p.push(format!("{field}: must not be empty"));
            } else if n.len() > 15 || n.contains(['/', ' ', '\0']) {
                p.push(format!("{field}: {n:?} is not a valid interface name (at most 15 characters, no '/' or spaces)"));
            }
        }
    }
    let snat_address = d
        .snat_address
        .as_deref()
        .and_then(|s| match s.parse::<Ipv4Addr>() {
            Ok(a) => Some(a),
            Err(_) => {
                p.push(format!(
                    "dataplane.snat_address: {s:?} is not an IPv4 address"
                ));
                None
            }
        });
    let dataplane = DataplaneConfig {
        mode: p.keyword("dataplane.mode", d.mode.as_deref()),
        xdp_mode: p.keyword("dataplane.xdp_mode", d.xdp_mode.as_deref()),
        interface: d.interface,
        backend_interface: d.backend_interface,
        snat_address,
    };
    let mut services = Vec::with_capacity(raw.services.len());
    for (i, s) in raw.services.into_iter().enumerate() {
        let at = format!("service[{i}] {:?}", s.name);
        p.name(&format!("{at}: name"), &s.name);
        let vip = p.socket(&format!("{at}: vip"), &s.vip);
        let protocol = p.keyword(&format!("{at}: protocol"), s.protocol.as_deref());
        let affinity = p.keyword(&format!("{at}: affinity"), s.affinity.as_deref());
        let mut versions = Vec::with_capacity(s.versions.len());
        for v in s.versions {
            let vat = format!("{at}: version {:?}", v.name);
            p.name(&format!("{vat}: name"), &v.name);
            let weight = match u32::try_from(v.weight) {
                Ok(w) if w <= MAX_VERSION_WEIGHT => w,
                _ => {
                    p.push(format!(
                        "{vat}: weight {} is out of range 0..={MAX_VERSION_WEIGHT}",
                        v.weight
                    ));
                    0
                }
            };
            let mut backends = Vec::with_capacity(v.backends.len());
            for (j, b) in v.backends.into_iter().enumerate() {
                let bat = format!("{vat}: backends[{j}]");
                let (addr, w) = match b {
                    RawBackend::Plain(a) => (a, 1),
                    RawBackend::Table(t) => (t.address, t.weight.unwrap_or(1)),
                };
                let address = p.socket(&bat, &addr);
                let weight = match u32::try_from(w) {
                    Ok(w) if (1..=MAX_BACKEND_WEIGHT).contains(&w) => w,
                    _ => {
                        p.push(format!(
                            "{bat}: weight {w} is out of range 1..={MAX_BACKEND_WEIGHT} (remove the backend instead of weighting it 0)"
                        ));
                        1
                    }
                };
                backends.push(BackendConfig { address, weight });
            }
            versions.push(VersionConfig {
                name: v.name,
                weight,
                backends,
            });
        }
        services.push(ServiceConfig {
            name: s.name,
            vip,
            protocol,
            affinity,
            versions,
        });
    }
    let config = Config {
        dataplane,
        services,
    };
    // Cross-field checks only make sense on fields that parsed.
    if p.0.is_empty() {
        p.0.extend(semantic_problems(&config));
    }
    p.finish(config)
}

/// Checks that span fields: uniqueness, weights, capacities.
fn semantic_problems(c: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if c.services.len() > MAX_SERVICES as usize {
        out.push(format!(
            "{} services configured; at most {MAX_SERVICES} are supported",
            c.services.len()
        ));
    }
    let mut names = BTreeSet::new();
    let mut vips: BTreeMap<(SocketAddrV4, Protocol), &str> = BTreeMap::new();
    let mut total_backends = 0usize;
    for s in &c.services {
        let at = format!("service {:?}", s.name);
        if !names.insert(s.name.as_str()) {
            out.push(format!("{at}: the name is used by another service too"));
        }
        if let Some(other) = vips.insert((s.vip, s.protocol), &s.name) {
            out.push(format!(
                "{at}: vip {}/{} is already used by service {other:?}",
                s.vip, s.protocol
            ));
        }
        if s.versions.is_empty() {
            out.push(format!("{at}: needs at least one [[service.version]]"));
        }
        if s.versions.len() > MAX_VERSIONS {
            out.push(format!(
                "{at}: {} versions; at most {MAX_VERSIONS} are supported",
                s.versions.len()
            ));
        }
        if !s.versions.is_empty() && s.versions.iter().all(|v| v.weight == 0) {
            out.push(format!(
                "{at}: all version weights are 0: at least one version needs weight > 0"
            ));
        }
        let mut vnames = BTreeSet::new();
        let mut seen = BTreeMap::new();
        for v in &s.versions {
            if !vnames.insert(v.name.as_str()) {
                out.push(format!("{at}: version {:?} is defined twice", v.name));
            }
            if v.weight > 0 && v.backends.is_empty() {
                out.push(format!(
                    "{at}: version {:?} has weight {} but no backends",
                    v.name, v.weight
                ));
            }
            for b in &v.backends {
                if let Some(prev) = seen.insert(b.address, v.name.as_str()) {
                    out.push(format!(
                        "{at}: version {:?}: backend {} is already listed (in version {prev:?})",
                        v.name, b.address
                    ));
                }
            }
            total_backends += v.backends.len();
        }
    }
    let total_versions: usize = c.services.iter().map(|s| s.versions.len()).sum();
    if total_versions > (MAX_TABLES / 2) as usize {
        out.push(format!(
            "{total_versions} versions configured over all services; at most {} are supported",
            MAX_TABLES / 2
        ));
    }
    if total_backends > MAX_BACKENDS as usize {
        out.push(format!(
            "{total_backends} backends configured; at most {MAX_BACKENDS} are supported"
        ));
    }
    out
}

impl Config {
    /// Parses and validates TOML text.
    ///
    /// # Errors
    /// Syntax errors (with line and column) or every validation problem.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError::one(e.to_string().trim_end().to_string()))?;
        build(raw)
    }

    /// Reads and parses a file.
    ///
    /// # Errors
    /// An unreadable file, or as [`Config::parse`]; the message names the path.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let with_source = |mut e: ConfigError| {
            e.source = Some(path.display().to_string());
            e
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| with_source(ConfigError::one(format!("cannot read the file: {e}"))))?;
        Self::parse(&text).map_err(with_source)
    }

    /// Re-checks the cross-field rules (for configs built in code).
    ///
    /// # Errors
    /// Every problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let problems = semantic_problems(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                source: None,
                problems,
            })
        }
    }

    /// The service called `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }

    /// A validated copy with `service`'s version weights replaced (in version order).
    ///
    /// # Errors
    /// Unknown service, wrong number of weights, or a result that fails validation.
    pub fn with_weights(&self, service: &str, weights: &[u32]) -> Result<Config, ConfigError> {
        let mut next = self.clone();
        let svc = next
            .services
            .iter_mut()
            .find(|s| s.name == service)
            .ok_or_else(|| ConfigError::one(format!("no service named {service:?}")))?;
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

/// Turns `["blue=90", "green=10"]` into weights in the service's version order.
/// Every version must be named exactly once.
///
/// # Errors
/// Malformed pairs, unknown or repeated versions, missing versions, weights
/// out of range, or all weights zero; the message lists the known versions.
pub fn parse_weight_args(
    service: &ServiceConfig,
    args: &[String],
) -> Result<Vec<u32>, ConfigError> {
    let known: Vec<&str> = service.versions.iter().map(|v| v.name.as_str()).collect();
    let mut p = Problems::default();
    let mut given: BTreeMap<&str, u32> = BTreeMap::new();
    for arg in args {
        let Some((name, value)) = arg.split_once('=') else {
            p.push(format!(
                "{arg:?} is not VERSION=WEIGHT (for example blue=90)"
            ));
            continue;
        };
        if !known.contains(&name) {
            p.push(format!(
                "service {:?} has no version {name:?}; its versions are: {}",
                service.name,
                known.join(", ")
            ));
            continue;
        }
        let weight = match value.trim().parse::<u32>() {
            Ok(w) if w <= MAX_VERSION_WEIGHT => w,
            _ => {
                p.push(format!(
                    "{arg:?}: weight must be a whole number in 0..={MAX_VERSION_WEIGHT}"
                ));
                continue;
            }
        };
        if given.insert(name, weight).is_some() {
            p.push(format!("version {name:?} is given twice"));
        }
    }
    let missing: Vec<&str> = known
        .iter()
        .filter(|k| !given.contains_key(*k))
        .copied()
        .collect();
    if p.0.is_empty() && !missing.is_empty() {
        p.push(format!(
            "name every version of service {:?}; missing: {} (for example: {})",
            service.name,
            missing.join(", "),
            known
                .iter()
                .map(|k| format!("{k}=N"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    if p.0.is_empty() && given.values().all(|w| *w == 0) {
        p.push(format!(
            "service {:?}: all version weights are 0: at least one version needs weight > 0",
            service.name
        ));
    }
    let weights = known
        .iter()
        .map(|k| given.get(k).copied().unwrap_or(0))
        .collect();
    p.finish(weights)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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

    fn err(text: &str) -> String {
        match Config::parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn complete_example_parses_with_defaults() {
        let c = Config::parse(BASE).unwrap();
        assert_eq!(c.dataplane.interface, "ec");
        assert_eq!(c.dataplane.backend_interface.as_deref(), Some("eb"));
        assert_eq!(c.dataplane.mode, Mode::Snat);
        assert_eq!(c.dataplane.xdp_mode, XdpModeConfig::Auto);
        let s = &c.services[0];
        assert_eq!(s.vip, "10.0.0.10:80".parse().unwrap());
        assert_eq!((s.protocol, s.affinity), (Protocol::Tcp, Affinity::Flow));
        assert_eq!(
            s.versions[0].backends[1],
            BackendConfig {
                address: "10.0.2.4:8080".parse().unwrap(),
                weight: 2
            }
        );
        assert_eq!(s.versions[1].weight, 10);
    }

    #[test]
    fn every_error_names_its_field() {
        let cases = [
            (
                BASE.replace("10.0.2.3:8080", "10.0.2.x:80"),
                r#"service[0] "web": version "green": backends[0]: "10.0.2.x:80" is not an IPv4 address:port"#,
            ),
            (
                BASE.replace("weight = 10\n", "weight = 0\n")
                    .replace("weight = 90", "weight = 0"),
                "all version weights are 0",
            ),
            (
                BASE.replace("interface = \"ec\"", "interface = \"ec\"\nmode = \"nat\""),
                r#"dataplane.mode: "nat" is not one of snat, dnat"#,
            ),
            (
                BASE.replace("10.0.0.10:80", "[::1]:80"),
                "IPv6 is not supported yet",
            ),
            (BASE.replace("10.0.0.10:80", "10.0.0.10:0"), "port 0"),
            (
                BASE.replace("name = \"green\"", "name = \"blue\""),
                r#"version "blue" is defined twice"#,
            ),
            (
                BASE.replace("\"10.0.2.3:8080\"", "\"10.0.2.2:8080\""),
                "backend 10.0.2.2:8080 is already listed",
            ),
            (
                BASE.replace("weight = 2", "weight = 0"),
                "backends[1]: weight 0 is out of range",
            ),
            (
                BASE.replace("weight = 90", "weight = -1"),
                r#"version "blue": weight -1 is out of range"#,
            ),
            (
                BASE.replace("affinity", "x")
                    .replace("vip = ", "affinity = \"sticky\"\nvip = "),
                r#"affinity: "sticky" is not one of flow, client-ip"#,
            ),
            (
                BASE.replace("interface = \"ec\"", "interface = \"ec\"\ncolour = \"red\""),
                "unknown field `colour`",
            ),
            (
                BASE.replace(
                    "interface = \"ec\"",
                    "interface = \"averyveryverylongname\"",
                ),
                "dataplane.interface",
            ),
            (
                BASE.replace("name = \"web\"", "name = \"my web\""),
                "may only hold",
            ),
            (
                BASE.replace("backends = [\"10.0.2.3:8080\"]", ""),
                r#"version "green" has weight 10 but no backends"#,
            ),
            (
                format!(
                    "{BASE}\n[[service]]\nname = \"api\"\nvip = \"10.0.0.10:80\"\n[[service.version]]\nname = \"v1\"\nweight = 1\nbackends = [\"10.0.2.9:80\"]\n"
                ),
                r#"service "api": vip 10.0.0.10:80/tcp is already used by service "web""#,
            ),
            ("[dataplane]\n".to_string(), "missing field `interface`"),
            ("[dataplane\ninterface = 1".to_string(), "line 1"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "want {want:?} in:\n{e}");
        }
    }

    #[test]
    fn all_problems_are_reported_together() {
        let text = BASE
            .replace("10.0.2.3:8080", "nope")
            .replace("10.0.0.10:80", "bad");
        let e = Config::parse(&text).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn weight_args_follow_version_order_and_reject_bad_input() {
        let c = Config::parse(BASE).unwrap();
        let s = &c.services[0];
        let args = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_weight_args(s, &args(&["green=100", "blue=0"])).unwrap(),
            vec![0, 100]
        );
        for (bad, want) in [
            (&["blue=1", "red=2"][..], "its versions are: blue, green"),
            (&["blue=1"], "missing: green"),
            (&["blue=0", "green=0"], "all version weights are 0"),
            (&["blue", "green=1"], "is not VERSION=WEIGHT"),
            (&["blue=x", "green=1"], "whole number"),
            (&["blue=1", "blue=2", "green=1"], "given twice"),
            (&["blue=2000000", "green=1"], "whole number"),
        ] {
            let e = parse_weight_args(s, &args(bad)).unwrap_err().to_string();
            assert!(e.contains(want), "{bad:?}: want {want:?} in {e}");
        }
        let next = c.with_weights("web", &[0, 100]).unwrap();
        assert_eq!(next.services[0].versions[1].weight, 100);
        assert!(c.with_weights("web", &[0, 0]).is_err());
        assert!(c.with_weights("nope", &[1, 1]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,400}") {
            let _ = Config::parse(&text);
        }

        #[test]
        fn mutated_valid_config_never_panics(cut in 0usize..600, insert in "[ -~]{0,8}") {
            let mut s = BASE.to_string();
            let at = cut.min(s.len());
            if s.is_char_boundary(at) {
                s.insert_str(at, &insert);
            }
            let _ = Config::parse(&s);
        }
    }
}
