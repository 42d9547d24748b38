//! What the data plane is asked to publish: one pure function of the
//! running configuration and the overlays the controller keeps beside it
//! (the health verdicts today; targeting later). No I/O: the controller
//! calls [`effective`] before every publish, and tests call it directly.
//!
//! Rollouts change weights through the same edits as the CLI, so their
//! outcome is part of the running configuration itself (and of the state
//! file), not an overlay that a restart could forget.
use std::{collections::BTreeSet, net::SocketAddrV4};

use crate::config::{BackendState, Config};

/// What the controller knows beside the configuration and applies over
/// it at every publish.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// Backends the health checks found down, by (service, address).
    pub down: BTreeSet<(String, SocketAddrV4)>,
}

/// The configuration as the data plane gets it: active backends that the
/// health checks found down are set to drain (out of new-flow selection,
/// established flows untouched), except where that would leave a version
/// without an active backend: then all of its active backends stay in
/// (fail open: better a sick backend than no backend for the version's
/// share of new flows).
pub fn effective(config: &Config, overlay: &Overlay) -> Config {
    let mut out = config.clone();
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
        }
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
