//! Runtime edits of the running configuration: add and remove services,
//! versions and backends, change a backend's weight or state. Each edit
//! takes the running [`Config`] and returns a validated copy with the
//! change and a one-line description, or an error that says what is wrong
//! and changes nothing. The controller publishes the copy; this module
//! never touches the data plane.
//!
//! The request bodies of the API (`ServiceSpec`, `VersionSpec`,
//! `BackendSpec`, `BackendPatch`) are defined here too, with addresses and
//! keywords as strings so that a bad one is reported by field.
use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use crate::config::{
    Affinity, BackendConfig, BackendState, Config, ConfigError, MAX_BACKEND_WEIGHT, Protocol,
    ServiceConfig, VersionConfig,
};

/// Why an edit was refused.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// A service, version or backend named in the request does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request or its result is invalid; nothing changed.
    #[error("{0}")]
    Invalid(String),
}

impl From<ConfigError> for EditError {
    fn from(e: ConfigError) -> Self {
        Self::Invalid(e.to_string())
    }
}

/// `POST /v1/services`: a new service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Unique name.
    pub name: String,
    /// `IPv4:port`.
    pub vip: String,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// `flow` (default) or `client-ip`.
    #[serde(default)]
    pub affinity: Option<String>,
    /// At least one; the weights follow the config file's rules.
    pub versions: Vec<VersionSpec>,
}

/// `POST /v1/services/{service}/versions`: a new version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    /// Unique within the service.
    pub name: String,
    /// Share of new flows (default 0: a new version gets no traffic until
    /// its weight is raised).
    #[serde(default)]
    pub weight: u32,
    /// Its backends.
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
}

/// `POST /v1/services/{service}/versions/{version}/backends`: a new backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// `IPv4:port`.
    pub address: String,
    /// Weight inside the version (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
    /// `active` (default), `drain` or `disabled`.
    #[serde(default)]
    pub state: Option<String>,
}

/// `PATCH /v1/services/{service}/backends/{address}`: what to change.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendPatch {
    /// New weight inside the version.
    #[serde(default)]
    pub weight: Option<u32>,
    /// New state.
    #[serde(default)]
    pub state: Option<String>,
}

/// Parses `IPv4:port`, naming the field on failure.
///
/// # Errors
/// Not an IPv4 socket address.
pub fn parse_addr(field: &str, v: &str) -> Result<SocketAddrV4, EditError> {
    v.parse().map_err(|_| {
        EditError::Invalid(format!(
            "{field}: {v:?} is not an IPv4 address:port (like \"10.0.2.1:8080\")"
        ))
    })
}

fn parse_keyword<T: std::str::FromStr<Err = String> + Default>(
    field: &str,
    v: Option<&str>,
) -> Result<T, EditError> {
    v.map_or(Ok(T::default()), |s| {
        s.parse()
            .map_err(|e| EditError::Invalid(format!("{field}: {e}")))
    })
}

fn backend_from_spec(field: &str, b: &BackendSpec) -> Result<BackendConfig, EditError> {
    Ok(BackendConfig {
        address: parse_addr(&format!("{field}: address"), &b.address)?,
        weight: b.weight.unwrap_or(1),
        state: parse_keyword(&format!("{field}: state"), b.state.as_deref())?,
    })
}

fn version_from_spec(field: &str, v: &VersionSpec) -> Result<VersionConfig, EditError> {
    let backends = v
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| backend_from_spec(&format!("{field}: backends[{i}]"), b))
        .collect::<Result<_, _>>()?;
    Ok(VersionConfig {
        name: v.name.clone(),
        weight: v.weight,
        backends,
    })
}

fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<&str> = it.collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn service_mut<'a>(c: &'a mut Config, name: &str) -> Result<&'a mut ServiceConfig, EditError> {
    let known = names(c.services.iter().map(|s| s.name.as_str()));
    c.services
        .iter_mut()
        .find(|s| s.name == name)
        .ok_or_else(|| {
            EditError::NotFound(format!(
                "no service named {name:?}; the services are: {known}"
            ))
        })
}

fn version_mut<'a>(
    s: &'a mut ServiceConfig,
    name: &str,
) -> Result<&'a mut VersionConfig, EditError> {
    let known = names(s.versions.iter().map(|v| v.name.as_str()));
    let service = s.name.clone();
    s.versions
        .iter_mut()
        .find(|v| v.name == name)
        .ok_or_else(|| {
            EditError::NotFound(format!(
                "service {service:?} has no version {name:?}; its versions are: {known}"
            ))
        })
}

/// Where a backend sits: (version index, backend index).
fn find_backend(s: &ServiceConfig, addr: SocketAddrV4) -> Result<(usize, usize), EditError> {
    for (i, v) in s.versions.iter().enumerate() {
        if let Some(j) = v.backends.iter().position(|b| b.address == addr) {
            return Ok((i, j));
        }
    }
    let known = names(
        s.versions
            .iter()
            .flat_map(|v| v.backends.iter())
            .map(|b| b.address.to_string())
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str),
    );
    Err(EditError::NotFound(format!(
        "service {:?} has no backend {addr}; its backends are: {known}",
        s.name
    )))
}

fn validated(next: Config) -> Result<Config, EditError> {
    next.validate()?;
    Ok(next)
}

/// Adds a service.
///
/// # Errors
/// A bad field, a name or VIP already in use, or a result that fails
/// validation.
pub fn add_service(c: &Config, spec: &ServiceSpec) -> Result<(Config, String), EditError> {
    if c.service(&spec.name).is_some() {
        return Err(EditError::Invalid(format!(
            "a service named {:?} already exists",
            spec.name
        )));
    }
    let vip = parse_addr("vip", &spec.vip)?;
    let protocol: Protocol = parse_keyword("protocol", spec.protocol.as_deref())?;
    let affinity: Affinity = parse_keyword("affinity", spec.affinity.as_deref())?;
    let versions = spec
        .versions
        .iter()
        .map(|v| version_from_spec(&format!("version {:?}", v.name), v))
        .collect::<Result<_, _>>()?;
    let mut next = c.clone();
    next.services.push(ServiceConfig {
        name: spec.name.clone(),
        vip,
        protocol,
        affinity,
        versions,
        health: None,
        connect_timeout_ms: crate::config::DEFAULT_CONNECT_TIMEOUT_MS,
        analysis: None,
        rollout: None,
        targets: Vec::new(),
        read_only: false,
        shadow: None,
    });
    let what = format!("added service {} on {vip}/{protocol}", spec.name);
    Ok((validated(next)?, what))
}

/// Removes a service. Its established flows keep going to their backends
/// until they end (the connection table holds them); new connections to
/// its VIP are no longer balanced.
///
/// # Errors
/// Unknown service.
pub fn remove_service(c: &Config, name: &str) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    service_mut(&mut next, name)?;
    next.services.retain(|s| s.name != name);
    Ok((validated(next)?, format!("removed service {name}")))
}

/// `POST /v1/services/{service}/targets`: a new source-CIDR rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Client network, like `10.0.1.96/28` (a bare address is a /32).
    pub cidr: String,
    /// Version its clients' new flows go to.
    pub version: String,
}

/// Adds a source-CIDR rule (see [`crate::target`]): new flows from the
/// network go to the version; established flows stay where they are.
///
/// # Errors
/// Unknown service, a bad network, or a rule [`crate::target::problems`]
/// refuses (unknown version, one without an active backend, a network
/// given twice, a redundant nested rule).
pub fn add_target(
    c: &Config,
    service: &str,
    spec: &TargetSpec,
) -> Result<(Config, String), EditError> {
    let cidr: crate::target::Cidr = spec
        .cidr
        .parse()
        .map_err(|e: String| EditError::Invalid(format!("cidr: {e}")))?;
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    if let Some(old) = s.targets.iter().find(|t| t.cidr == cidr) {
        return Err(EditError::Invalid(format!(
            "service {service:?} already has a rule for {cidr} (-> {}); remove it first (`splitter target remove {service} {cidr}`)",
            old.version
        )));
    }
    s.targets.push(crate::target::TargetConfig {
        cidr,
        version: spec.version.clone(),
    });
    let problems = s.target_problems();
    if !problems.is_empty() {
        return Err(EditError::Invalid(problems.join("; ")));
    }
    let what = format!("target {cidr} -> {} on {service}", spec.version);
    Ok((validated(next)?, what))
}

/// Makes every network of `cidrs` a rule of `service` to `version` (the
/// rules a rollout's `targets` step owns); rules already so are left alone.
///
/// # Errors
/// Unknown service, or a result that fails validation.
pub fn set_rollout_targets(
    c: &Config,
    service: &str,
    version: &str,
    cidrs: &[crate::target::Cidr],
) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    s.targets.retain(|t| !cidrs.contains(&t.cidr));
    s.targets
        .extend(cidrs.iter().map(|cidr| crate::target::TargetConfig {
            cidr: *cidr,
            version: version.to_string(),
        }));
    let what = format!(
        "rollout targets of {service}: {} -> {version}",
        crate::target::cidr_list(cidrs)
    );
    Ok((validated(next)?, what))
}

/// Removes the rules for `cidrs` from `service` (a rollout's, when it
/// ends); networks with no rule are skipped.
///
/// # Errors
/// Unknown service, or a result that fails validation.
pub fn clear_rollout_targets(
    c: &Config,
    service: &str,
    cidrs: &[crate::target::Cidr],
) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    s.targets.retain(|t| !cidrs.contains(&t.cidr));
    let what = format!(
        "rollout targets of {service} removed: {}",
        crate::target::cidr_list(cidrs)
    );
    Ok((validated(next)?, what))
}

/// Removes the source-CIDR rule for exactly `cidr`.
///
/// # Errors
/// Unknown service, a bad network, or no rule for it.
pub fn remove_target(c: &Config, service: &str, cidr: &str) -> Result<(Config, String), EditError> {
    let cidr: crate::target::Cidr = cidr
        .parse()
        .map_err(|e: String| EditError::Invalid(format!("cidr: {e}")))?;
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    let Some(i) = s.targets.iter().position(|t| t.cidr == cidr) else {
        let known = names(
            s.targets
                .iter()
                .map(|t| t.cidr.to_string())
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str),
        );
        return Err(EditError::NotFound(format!(
            "service {service:?} has no rule for {cidr}; its rules are: {known}"
        )));
    };
    let old = s.targets.remove(i);
    let problems = s.target_problems();
    if !problems.is_empty() {
        // Removing a carve-out can make a rule inside it redundant.
        return Err(EditError::Invalid(format!(
            "service {service:?}: removing {cidr} would leave: {}; remove those rules first",
            problems.join("; ")
        )));
    }
    let what = format!("removed target {cidr} -> {} from {service}", old.version);
    Ok((validated(next)?, what))
}

/// Adds a version to a service.
///
/// # Errors
/// Unknown service, a bad field, a duplicate name, too many versions.
pub fn add_version(
    c: &Config,
    service: &str,
    spec: &VersionSpec,
) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    if s.versions.iter().any(|v| v.name == spec.name) {
        return Err(EditError::Invalid(format!(
            "service {service:?} already has a version {:?}",
            spec.name
        )));
    }
    s.versions.push(version_from_spec(
        &format!("version {:?}", spec.name),
        spec,
    )?);
    let what = format!(
        "added version {} to {service} (weight {})",
        spec.name, spec.weight
    );
    Ok((validated(next)?, what))
}

/// Removes a version. Refused while it has weight: set it to 0 first, so
/// that removing it never shifts new flows by surprise.
///
/// # Errors
/// Unknown service or version, the version still has weight, or it is
/// the last one.
pub fn remove_version(
    c: &Config,
    service: &str,
    version: &str,
) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    let v = version_mut(s, version)?;
    if v.weight > 0 {
        return Err(EditError::Invalid(format!(
            "version {version:?} of {service:?} still has weight {}: move its traffic first (splitter weights set {service} ...) so that its weight is 0",
            v.weight
        )));
    }
    if s.versions.len() == 1 {
        return Err(EditError::Invalid(format!(
            "{version:?} is the only version of {service:?}; remove the service instead"
        )));
    }
    s.versions.retain(|v| v.name != version);
    Ok((
        validated(next)?,
        format!("removed version {version} from {service}"),
    ))
}

/// Adds a backend to a version.
///
/// # Errors
/// Unknown service or version, a bad field, an address already in use in
/// the service.
pub fn add_backend(
    c: &Config,
    service: &str,
    version: &str,
    spec: &BackendSpec,
) -> Result<(Config, String), EditError> {
    let b = backend_from_spec("backend", spec)?;
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    if let Ok((vi, _)) = find_backend(s, b.address) {
        return Err(EditError::Invalid(format!(
            "{} is already a backend of {service:?} (version {:?})",
            b.address, s.versions[vi].name
        )));
    }
    version_mut(s, version)?.backends.push(b.clone());
    let what = format!(
        "added backend {} to {service}/{version} (weight {}, {})",
        b.address, b.weight, b.state
    );
    Ok((validated(next)?, what))
}

/// What removing a backend would cut, for [`remove_backend`].
#[derive(Debug, Clone, Copy)]
pub struct RemoveGuard {
    /// Established flows on the backend now.
    pub live_flows: u64,
    /// Remove even if active or with live flows.
    pub force: bool,
}

/// Removes a backend. Refused, unless forced, while it is active (drain it
/// first) or while it still carries established flows.
///
/// # Errors
/// Unknown service or backend, the guard refuses, or the version would be
/// left with weight but no active backend.
pub fn remove_backend(
    c: &Config,
    service: &str,
    addr: SocketAddrV4,
    guard: RemoveGuard,
) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    let (vi, bi) = find_backend(s, addr)?;
    let b = &s.versions[vi].backends[bi];
    if !guard.force && b.state == BackendState::Active {
        return Err(EditError::Invalid(format!(
            "backend {addr} of {service:?} is active: drain it first (splitter backend set {service} {addr} --state drain), wait for its flows to end, then remove it; or use --force"
        )));
    }
    if !guard.force && guard.live_flows > 0 {
        return Err(EditError::Invalid(format!(
            "backend {addr} of {service:?} still carries {} established flow(s): wait for them to end (splitter status shows live flows), or use --force",
            guard.live_flows
        )));
    }
    let version = s.versions[vi].name.clone();
    s.versions[vi].backends.remove(bi);
    Ok((
        validated(next)?,
        format!("removed backend {addr} from {service}/{version}"),
    ))
}

/// Changes a backend's weight and/or state.
///
/// # Errors
/// Unknown service or backend, nothing to change, a bad value, or a
/// result that fails validation (the last active backend of a weighted
/// version cannot be drained).
pub fn set_backend(
    c: &Config,
    service: &str,
    addr: SocketAddrV4,
    patch: &BackendPatch,
) -> Result<(Config, String), EditError> {
    if patch.weight.is_none() && patch.state.is_none() {
        return Err(EditError::Invalid(
            "nothing to change: give a weight and/or a state".into(),
        ));
    }
    if let Some(w) = patch.weight
        && !(1..=MAX_BACKEND_WEIGHT).contains(&w)
    {
        return Err(EditError::Invalid(format!(
            "weight {w} is out of range 1..={MAX_BACKEND_WEIGHT} (to stop new flows, set --state drain)"
        )));
    }
    let state: Option<BackendState> = patch
        .state
        .as_deref()
        .map(|s| parse_keyword("state", Some(s)))
        .transpose()?;
    let mut next = c.clone();
    let s = service_mut(&mut next, service)?;
    let (vi, bi) = find_backend(s, addr)?;
    let version = s.versions[vi].name.clone();
    let b = &mut s.versions[vi].backends[bi];
    let mut what = Vec::new();
    if let Some(w) = patch.weight {
        what.push(format!("weight {} -> {w}", b.weight));
        b.weight = w;
    }
    if let Some(st) = state {
        what.push(format!("state {} -> {st}", b.state));
        b.state = st;
    }
    let what = format!("backend {addr} of {service}/{version}: {}", what.join(", "));
    Ok((validated(next)?, what))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[dataplane]
interface = "ec"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[[service.version]]
name = "blue"
weight = 100
backends = ["10.0.2.1:8080", "10.0.2.2:8080"]

[[service.version]]
name = "green"
weight = 0
backends = ["10.0.2.3:8080"]
"#;

    fn base() -> Config {
        Config::parse(BASE).unwrap()
    }

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn patch(weight: Option<u32>, state: Option<&str>) -> BackendPatch {
        BackendPatch {
            weight,
            state: state.map(str::to_string),
        }
    }

    #[test]
    fn service_add_and_remove() {
        let spec = ServiceSpec {
            name: "api".into(),
            vip: "10.0.0.11:443".into(),
            protocol: None,
            affinity: Some("client-ip".into()),
            versions: vec![VersionSpec {
                name: "v1".into(),
                weight: 1,
                backends: vec![BackendSpec {
                    address: "10.0.2.9:443".into(),
                    weight: None,
                    state: None,
                }],
            }],
        };
        let (next, what) = add_service(&base(), &spec).unwrap();
        assert!(what.contains("added service api"), "{what}");
        let api = next.service("api").unwrap();
        assert_eq!(api.affinity, Affinity::ClientIp);
        assert_eq!(api.versions[0].backends[0].weight, 1);
        // The same name again, a taken VIP, a bad address: refused.
        assert!(matches!(
            add_service(&next, &spec),
            Err(EditError::Invalid(e)) if e.contains("already exists")
        ));
        let mut taken = spec.clone();
        taken.name = "api2".into();
        taken.vip = "10.0.0.10:80".into();
        let e = add_service(&base(), &taken).unwrap_err().to_string();
        assert!(e.contains("already used by service \"web\""), "{e}");
        let mut bad = spec.clone();
        bad.versions[0].backends[0].address = "10.0.2.x:1".into();
        let e = add_service(&base(), &bad).unwrap_err().to_string();
        assert!(
            e.contains("backends[0]: address") && e.contains("10.0.2.x:1"),
            "{e}"
        );
        let mut bad = spec;
        bad.versions.clear();
        assert!(add_service(&base(), &bad).is_err());

        let (gone, _) = remove_service(&next, "api").unwrap();
        assert_eq!(gone, base());
        assert!(matches!(
            remove_service(&base(), "nope"),
            Err(EditError::NotFound(e)) if e.contains("the services are: web")
        ));
    }

    #[test]
    fn version_add_and_remove() {
        let spec = VersionSpec {
            name: "canary".into(),
            weight: 0,
            backends: vec![],
        };
        let (next, _) = add_version(&base(), "web", &spec).unwrap();
        assert_eq!(next.service("web").unwrap().versions.len(), 3);
        // Weight without a backend is refused by validation.
        let mut weighted = spec.clone();
        weighted.weight = 5;
        let e = add_version(&base(), "web", &weighted)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no backends"), "{e}");
        assert!(add_version(&next, "web", &spec).is_err());
        // Removing a weighted version is refused; a weightless one works.
        let e = remove_version(&base(), "web", "blue")
            .unwrap_err()
            .to_string();
        assert!(e.contains("still has weight 100"), "{e}");
        let (fewer, _) = remove_version(&base(), "web", "green").unwrap();
        assert_eq!(fewer.service("web").unwrap().versions.len(), 1);
        assert!(matches!(
            remove_version(&base(), "web", "red"),
            Err(EditError::NotFound(e)) if e.contains("blue, green")
        ));
    }

    #[test]
    fn backend_add_set_remove() {
        let spec = BackendSpec {
            address: "10.0.2.4:8080".into(),
            weight: Some(3),
            state: Some("drain".into()),
        };
        let (next, _) = add_backend(&base(), "web", "green", &spec).unwrap();
        let b = &next.service("web").unwrap().versions[1].backends[1];
        assert_eq!((b.weight, b.state), (3, BackendState::Drain));
        // The same address again, in any version: refused.
        let e = add_backend(&next, "web", "blue", &spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("already a backend"), "{e}");
        let mut bad = spec.clone();
        bad.state = Some("sleeping".into());
        let e = add_backend(&base(), "web", "green", &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backend: state") && e.contains("active, drain, disabled"),
            "{e}"
        );

        // Drain one of blue's two: fine; the last active one: refused.
        let a1 = addr("10.0.2.1:8080");
        let a2 = addr("10.0.2.2:8080");
        let (drained, what) = set_backend(&base(), "web", a1, &patch(None, Some("drain"))).unwrap();
        assert!(what.contains("state active -> drain"), "{what}");
        let e = set_backend(&drained, "web", a2, &patch(None, Some("disabled")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no active backend"), "{e}");
        // Out-of-range weight, empty patch, unknown backend: refused.
        assert!(set_backend(&base(), "web", a1, &patch(Some(0), None)).is_err());
        assert!(set_backend(&base(), "web", a1, &patch(None, None)).is_err());
        assert!(matches!(
            set_backend(&base(), "web", addr("10.9.9.9:1"), &patch(Some(2), None)),
            Err(EditError::NotFound(_))
        ));

        // Removal: active refused, live flows refused, then allowed.
        let guard = |live_flows, force| RemoveGuard { live_flows, force };
        let e = remove_backend(&base(), "web", a1, guard(0, false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("drain it first"), "{e}");
        let e = remove_backend(&drained, "web", a1, guard(4, false))
            .unwrap_err()
            .to_string();
        assert!(e.contains("4 established flow(s)"), "{e}");
        let (removed, _) = remove_backend(&drained, "web", a1, guard(0, false)).unwrap();
        assert_eq!(
            removed.service("web").unwrap().versions[0].backends.len(),
            1
        );
        assert!(remove_backend(&base(), "web", a1, guard(9, true)).is_ok());
        // Removing green's only backend leaves a weightless, empty version: fine.
        assert!(remove_backend(&base(), "web", addr("10.0.2.3:8080"), guard(0, true)).is_ok());
    }
}

/// `PUT /v1/services/{service}/shadow`: mirror a share of the service's
/// traffic to one of its versions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowSpec {
    /// The shadow version: a version of the service with weight 0.
    pub version: String,
    /// Share mirrored, 1..=100 (UDP: of datagrams; TCP: of new flows).
    pub percent: u32,
}

/// Turns mirroring of `service` on (or changes it), with the config
/// file's rules (`config::shadow_problems`).
///
/// # Errors
/// Unknown service, or a shadow the config would refuse (unknown version,
/// a version with weight or no active backend, a share out of 1..=100, a
/// TCP service that is not `read_only`).
pub fn set_shadow(
    c: &Config,
    service: &str,
    spec: &ShadowSpec,
) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    let svc = service_mut(&mut next, service)?;
    svc.shadow = Some(crate::config::ShadowConfig {
        version: spec.version.clone(),
        percent: spec.percent,
    });
    Ok((
        validated(next)?,
        format!(
            "service {service}: mirroring {}% to version {}",
            spec.percent, spec.version
        ),
    ))
}

/// Turns mirroring of `service` off (nothing to do if it was off).
///
/// # Errors
/// Unknown service.
pub fn clear_shadow(c: &Config, service: &str) -> Result<(Config, String), EditError> {
    let mut next = c.clone();
    service_mut(&mut next, service)?.shadow = None;
    Ok((
        validated(next)?,
        format!("service {service}: mirroring off"),
    ))
}
