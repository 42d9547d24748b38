//! What the data plane is asked to publish: one pure function of the
//! running configuration and the overlays the controller keeps beside it
//! (health verdicts; a rollout's preview addresses and slow-start ramps;
//! source-CIDR rules whose version has no backend up are left out). No I/O: the controller calls [`effective`] before
//! every publish, and tests call it directly.
//!
//! Rollouts change weights through the same edits as the CLI, so their
//! outcome is part of the running configuration itself (and of the state
//! file), not an overlay that a restart could forget.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use crate::{
    config::{BackendState, Config, ServiceConfig, VersionConfig},
    target::TargetConfig,
};

/// The name a preview service is published under: `SERVICE~preview` (`~`
/// is not allowed in configured names, so it never collides).
pub fn preview_name(service: &str) -> String {
    format!("{service}~preview")
}

/// The source-CIDR rules of `svc` the data plane gets: those whose version
/// has a backend up to take new flows. A rule whose version has none is
/// left out, so its clients get the weights' choice rather than the
/// fail-open of [`effective`] sending them to backends known to be down.
pub fn published_targets(svc: &ServiceConfig, overlay: &Overlay) -> Vec<TargetConfig> {
    let up = |v: &VersionConfig| {
        v.backends.iter().any(|b| {
            b.state == BackendState::Active
                && !overlay.down.contains(&(svc.name.clone(), b.address))
        })
    };
    svc.targets
        .iter()
        .filter(|t| svc.versions.iter().any(|v| v.name == t.version && up(v)))
        .cloned()
        .collect()
}

/// What the controller knows beside the configuration and applies over
/// it at every publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// Backends the health checks found down, by (service, address).
    pub down: BTreeSet<(String, SocketAddrV4)>,
    /// Preview addresses of blue-green rollouts: service -> (address, the
    /// version it reaches). Each is published as a service of its own.
    pub previews: BTreeMap<String, (SocketAddrV4, String)>,
    /// Slow start of a rolling update: (service, backend) -> the percent of
    /// its configured weight it gets now (at least 1).
    pub weight_percent: BTreeMap<(String, SocketAddrV4), u32>,
}

/// The configuration as the data plane gets it: active backends that the
/// health checks found down are set to drain (out of new-flow selection,
/// established flows untouched), except where that would leave a version
/// without an active backend: then all of its active backends stay in
/// (fail open: better a sick backend than no backend for the version's
/// share of new flows).
/// A rollout's preview address is published as a service of its own
/// (`SERVICE~preview`) whose only version is the one it previews; slow
/// start scales a backend's weight by its percent (never below 1).
pub fn effective(config: &Config, overlay: &Overlay) -> Config {
    let mut out = config.clone();
    for ((service, addr), percent) in &overlay.weight_percent {
        for svc in out.services.iter_mut().filter(|s| &s.name == service) {
            for b in svc
                .versions
                .iter_mut()
                .flat_map(|v| v.backends.iter_mut())
                .filter(|b| b.address == *addr)
            {
                b.weight = (u64::from(b.weight) * u64::from(*percent) / 100).max(1) as u32;
            }
        }
    }
    for (service, (vip, version)) in &overlay.previews {
        let Some(svc) = config.service(service) else {
            continue;
        };
        let Some(v) = svc.versions.iter().find(|v| &v.name == version) else {
            continue;
        };
        let mut preview = svc.clone();
        preview.name = preview_name(service);
        preview.vip = *vip;
        preview.health = None;
        // One version: nothing for a rule to choose.
        preview.targets = Vec::new();
        preview.versions = vec![VersionConfig {
            name: v.name.clone(),
            weight: 1,
            backends: v.backends.clone(),
        }];
        out.services.push(preview);
    }
    for svc in &mut out.services {
        svc.targets = published_targets(svc, overlay);
    }
    if overlay.down.is_empty() {
        return out;
    }
    for svc in &mut out.services {
        for v in &mut svc.versions {
            let is_down = |a: SocketAddrV4| overlay.down.contains(&(svc.name.clone(), a));
            let healthy = v
                .backends
                .iter()
                .filter(|b| b.state == BackendState::Active && !is_down(b.address))
                .count();
            if healthy == 0 {
                continue;
            }
            for b in &mut v.backends {
                if b.state == BackendState::Active && is_down(b.address) {
                    b.state = BackendState::Drain;
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[[service.version]]
name = "blue"
weight = 90
backends = ["10.0.2.2:8080", "10.0.2.3:8080"]

[[service.version]]
name = "green"
weight = 10
backends = ["10.0.2.4:8080"]
"#;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    fn states(c: &Config) -> Vec<BackendState> {
        c.services[0]
            .versions
            .iter()
            .flat_map(|v| v.backends.iter().map(|b| b.state))
            .collect()
    }

    fn down(addrs: &[&str]) -> Overlay {
        Overlay {
            down: addrs.iter().map(|a| ("web".to_string(), addr(a))).collect(),
            ..Overlay::default()
        }
    }

    #[test]
    fn a_preview_is_a_service_of_its_own_reaching_one_version() {
        let c = Config::parse(TEXT).unwrap();
        let mut o = Overlay::default();
        o.previews
            .insert("web".into(), (addr("10.0.0.20:80"), "green".into()));
        let e = effective(&c, &o);
        assert_eq!(e.services.len(), 2);
        let p = &e.services[1];
        assert_eq!(p.name, "web~preview");
        assert_eq!(p.vip, addr("10.0.0.20:80"));
        assert_eq!(p.versions.len(), 1);
        assert_eq!(p.versions[0].name, "green");
        assert_eq!(p.versions[0].backends[0].address, addr("10.0.2.4:8080"));
        // The service itself is untouched.
        assert_eq!(e.services[0], c.services[0]);
    }

    #[test]
    fn slow_start_scales_a_backends_weight_never_to_zero() {
        let mut c = Config::parse(TEXT).unwrap();
        c.services[0].versions[0].backends[0].weight = 10;
        let mut o = Overlay::default();
        o.weight_percent
            .insert(("web".into(), addr("10.0.2.2:8080")), 50);
        o.weight_percent
            .insert(("web".into(), addr("10.0.2.3:8080")), 1);
        let e = effective(&c, &o);
        assert_eq!(e.services[0].versions[0].backends[0].weight, 5);
        assert_eq!(e.services[0].versions[0].backends[1].weight, 1);
    }

    #[test]
    fn no_verdicts_publish_the_config_as_it_is() {
        let c = Config::parse(TEXT).unwrap();
        assert_eq!(effective(&c, &Overlay::default()), c);
    }

    #[test]
    fn a_down_backend_drains_while_its_version_has_another() {
        let c = Config::parse(TEXT).unwrap();
        let e = effective(&c, &down(&["10.0.2.2:8080"]));
        use BackendState::*;
        assert_eq!(states(&e), [Drain, Active, Active]);
        // Weights and everything else are untouched.
        assert_eq!(e.services[0].versions[0].weight, 90);
    }

    #[test]
    fn a_version_whose_every_backend_is_down_fails_open() {
        let c = Config::parse(TEXT).unwrap();
        let e = effective(
            &c,
            &down(&["10.0.2.2:8080", "10.0.2.3:8080", "10.0.2.4:8080"]),
        );
        assert_eq!(e, c);
    }

    #[test]
    fn verdicts_of_other_services_change_nothing() {
        let c = Config::parse(TEXT).unwrap();
        let mut o = down(&[]);
        o.down.insert(("api".into(), addr("10.0.2.2:8080")));
        assert_eq!(effective(&c, &o), c);
    }
}
