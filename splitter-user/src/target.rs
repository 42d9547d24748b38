//! Source-CIDR targeting: per service, rules `CIDR -> version` that send
//! the new flows of matching clients to one version, whatever the weights
//! say (`[[service.target]]`, `splitter target ...`). This module owns the
//! rules as plain data: parsing a CIDR, validating a service's rules, and
//! the longest-prefix match the kernel's `TARGETS` trie does per packet,
//! as pure functions (no I/O).
//!
//! ```
//! use splitter::target::{Cidr, TargetSet};
//! let rules = vec![
//!     ("10.0.0.0/16".parse::<Cidr>().unwrap(), "blue"),
//!     ("10.0.1.96/28".parse::<Cidr>().unwrap(), "green"),
//! ];
//! let set = TargetSet::new(rules.iter().map(|(c, v)| (*c, *v)));
//! assert_eq!(set.lookup("10.0.1.100".parse().unwrap()), Some(&"green"));
//! assert_eq!(set.lookup("10.0.7.1".parse().unwrap()), Some(&"blue"));
//! assert_eq!(set.lookup("192.0.2.1".parse().unwrap()), None);
//! ```
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Networks as `a/n, b/m` (for messages).
pub fn cidr_list(cidrs: &[Cidr]) -> String {
    cidrs
        .iter()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// An IPv4 network: an address with no host bits set and a prefix length
/// (0..=32). Written `10.0.1.96/28`; a bare address is a `/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// Network address (host bits zero).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub len: u8,
}

/// The mask of a prefix length (0..=32).
fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - len) }
}

impl Cidr {
    /// Does the network hold `ip`?
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask(self.len) == u32::from(self.addr)
    }

    /// Does this network hold all of `other` (itself included)?
    pub fn covers(&self, other: &Cidr) -> bool {
        self.len <= other.len && self.contains(other.addr)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, l) = s.split_once('/').unwrap_or((s, "32"));
        if a.contains(':') {
            return Err(format!(
                "{s:?} is an IPv6 prefix: targets are IPv4-only for now, like the services"
            ));
        }
        let addr: Ipv4Addr = a.parse().map_err(|_| {
            format!("{s:?} is not an IPv4 network (like \"10.0.1.96/28\" or \"10.0.1.7\")")
        })?;
        let len: u8 = match l.parse() {
            Ok(n) if n <= 32 => n,
            _ => {
                return Err(format!(
                    "{s:?}: the prefix length {l:?} is not a number in 0..=32"
                ));
            }
        };
        let net = Ipv4Addr::from(u32::from(addr) & mask(len));
        if net != addr {
            return Err(format!("{s} has host bits set; did you mean {net}/{len}?"));
        }
        Ok(Cidr { addr, len })
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One rule (`[[service.target]]`): new flows from clients in `cidr` go to
/// `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Client network.
    pub cidr: Cidr,
    /// Version name within the service.
    pub version: String,
}

/// Rules keyed for longest-prefix lookup: by prefix length, then network.
/// The same structure as the kernel's trie answers with (a host-side
/// model of it, property-tested against a scan of the rules).
#[derive(Debug, Clone)]
pub struct TargetSet<V> {
    by_len: BTreeMap<u8, BTreeMap<u32, V>>,
}

impl<V> TargetSet<V> {
    /// A set of `(network, value)` rules; a network given twice keeps the
    /// last value (validation refuses that before it gets here).
    pub fn new(rules: impl IntoIterator<Item = (Cidr, V)>) -> Self {
        let mut by_len: BTreeMap<u8, BTreeMap<u32, V>> = BTreeMap::new();
        for (c, v) in rules {
            by_len
                .entry(c.len)
                .or_default()
                .insert(u32::from(c.addr), v);
        }
        Self { by_len }
    }

    /// The value of the longest rule holding `ip`, if any.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<&V> {
        self.lookup_with(ip).map(|(_, v)| v)
    }

    /// The longest rule holding `ip` and its value, if any.
    pub fn lookup_with(&self, ip: Ipv4Addr) -> Option<(Cidr, &V)> {
        let ip = u32::from(ip);
        self.by_len.iter().rev().find_map(|(len, nets)| {
            let net = ip & mask(*len);
            nets.get(&net).map(|v| {
                (
                    Cidr {
                        addr: Ipv4Addr::from(net),
                        len: *len,
                    },
                    v,
                )
            })
        })
    }
}

/// The longest rule of `rules` that holds `ip` (for `splitter flow`).
pub fn longest_match(rules: &[TargetConfig], ip: Ipv4Addr) -> Option<&TargetConfig> {
    rules
        .iter()
        .filter(|r| r.cidr.contains(ip))
        .max_by_key(|r| r.cidr.len)
}

/// What rules are checked against: the service's name and its versions,
/// each with whether it has an active backend (one that can take a
/// targeted client's new flows). `ServiceConfig::target_problems` fills it
/// from a config.
#[derive(Debug, Clone)]
pub struct Versions<'a> {
    /// The service's name (for messages).
    pub service: &'a str,
    /// Each version's name, and whether it has an active backend.
    pub versions: Vec<(&'a str, bool)>,
}

/// Every problem with a service's rules, each naming the rule:
/// - a version the service does not have;
/// - a version with no active backend (its targeted clients would fall
///   through to the weights, which is surely not what was meant);
/// - the same network twice;
/// - a rule nested in another rule of the same version with no other
///   rule between them (the longest rule that holds it already sends its
///   clients there: redundant). A nested rule to a *different* version is
///   an exception carved out of the wider one and is allowed.
pub fn problems(rules: &[TargetConfig], of: &Versions<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let known: Vec<&str> = of.versions.iter().map(|(v, _)| *v).collect();
    let active = |name: &str| of.versions.iter().any(|(v, a)| *v == name && *a);
    let mut seen: BTreeMap<Cidr, &str> = BTreeMap::new();
    for r in rules {
        let at = format!("target {} -> {}", r.cidr, r.version);
        if !known.contains(&r.version.as_str()) {
            out.push(format!(
                "{at}: service {:?} has no version {:?}; its versions are: {}",
                of.service,
                r.version,
                known.join(", ")
            ));
        } else if !active(&r.version) {
            out.push(format!(
                "{at}: version {:?} has no active backend, so its targeted clients would get the weights' choice: add or activate a backend first",
                r.version
            ));
        }
        if let Some(prev) = seen.insert(r.cidr, &r.version) {
            out.push(format!(
                "{at}: {} is given twice (already -> {prev}); remove one",
                r.cidr
            ));
            continue;
        }
    }
    // Redundancy: against the longest *other* rule that covers it, found
    // by prefix length (33 look-ups a rule, not a scan of all rules: a
    // service may hold tens of thousands).
    let set = TargetSet::new(rules.iter().map(|t| (t.cidr, t.version.as_str())));
    for r in rules {
        let parent = (0..r.cidr.len).rev().find_map(|len| {
            let net = Cidr {
                addr: Ipv4Addr::from(u32::from(r.cidr.addr) & mask(len)),
                len,
            };
            set.by_len
                .get(&len)
                .and_then(|nets| nets.get(&u32::from(net.addr)))
                .map(|v| (net, *v))
        });
        if let Some((p, version)) = parent
            && version == r.version
        {
            out.push(format!(
                "target {} -> {}: redundant: {p} already sends these clients to {version} (a rule inside another must name a different version)",
                r.cidr, r.version
            ));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{BackendState, ServiceConfig};
    use proptest::prelude::*;

    fn problems(s: &ServiceConfig) -> Vec<String> {
        s.target_problems()
    }

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_refuses_with_clear_messages() {
        assert_eq!(c("10.0.1.96/28").to_string(), "10.0.1.96/28");
        assert_eq!(c("10.0.1.7").len, 32);
        assert_eq!(c("0.0.0.0/0").len, 0);
        assert_eq!(
            "10.0.1.97/28".parse::<Cidr>().unwrap_err(),
            "10.0.1.97/28 has host bits set; did you mean 10.0.1.96/28?"
        );
        assert!(
            "2001:db8::/32"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("IPv4-only")
        );
        assert!(
            "10.0.1.0/33"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("0..=32")
        );
        assert!(
            "10.0.1/24"
                .parse::<Cidr>()
                .unwrap_err()
                .contains("not an IPv4")
        );
        assert!("1.2.3.4/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn longest_prefix_wins_and_edges_hold() {
        let set = TargetSet::new([
            (c("0.0.0.0/0"), "a"),
            (c("10.0.0.0/8"), "b"),
            (c("10.0.1.96/28"), "c"),
            (c("10.0.1.100/32"), "d"),
            (c("255.255.255.255/32"), "e"),
        ]);
        let l = |s: &str| set.lookup(s.parse().unwrap()).copied();
        assert_eq!(l("10.0.1.100"), Some("d"));
        assert_eq!(l("10.0.1.101"), Some("c"));
        assert_eq!(l("10.0.1.95"), Some("b"));
        assert_eq!(l("11.0.0.1"), Some("a"));
        assert_eq!(l("0.0.0.0"), Some("a"));
        assert_eq!(l("255.255.255.255"), Some("e"));
        let none = TargetSet::new([(c("10.0.0.0/8"), 1)]);
        assert_eq!(none.lookup("11.0.0.0".parse().unwrap()), None);
    }

    fn svc(targets: &[(&str, &str)]) -> ServiceConfig {
        let mut s = crate::rollout::spec::tests::service();
        s.targets = targets
            .iter()
            .map(|(cidr, v)| TargetConfig {
                cidr: c(cidr),
                version: v.to_string(),
            })
            .collect();
        s
    }

    #[test]
    fn validation_refuses_bad_rules_and_allows_carve_outs() {
        let versions: Vec<String> = crate::rollout::spec::tests::service()
            .versions
            .iter()
            .map(|v| v.name.clone())
            .collect();
        let (a, b) = (versions[0].as_str(), versions[1].as_str());
        assert!(problems(&svc(&[("10.0.0.0/16", a), ("10.0.1.0/24", b)])).is_empty());
        // A carve-out back to the outer version is not redundant.
        assert!(
            problems(&svc(&[
                ("10.0.0.0/16", a),
                ("10.0.1.0/24", b),
                ("10.0.1.16/28", a)
            ]))
            .is_empty()
        );
        let p = problems(&svc(&[("10.0.0.0/16", a), ("10.0.1.0/24", a)]));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("redundant: 10.0.0.0/16 already sends"),
            "{p:?}"
        );
        let p = problems(&svc(&[("10.0.1.0/24", a), ("10.0.1.0/24", b)]));
        assert!(p.iter().any(|m| m.contains("given twice")), "{p:?}");
        let p = problems(&svc(&[("10.0.1.0/24", "purple")]));
        assert!(p[0].contains("has no version \"purple\""), "{p:?}");
        let mut s = svc(&[("10.0.1.0/24", b)]);
        for be in &mut s.versions[1].backends {
            be.state = BackendState::Drain;
        }
        let p = problems(&s);
        assert!(p[0].contains("no active backend"), "{p:?}");
    }

    const FILE: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[[service.version]]
name = "blue"
weight = 100
backends = ["10.0.2.1:80"]

[[service.version]]
name = "green"
weight = 0
backends = ["10.0.3.1:80"]
"#;

    fn config_with(rules: &str) -> Result<crate::config::Config, String> {
        crate::config::Config::parse(&format!("{FILE}{rules}")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_config_file_takes_rules_and_reports_bad_ones() {
        let cfg = config_with("[[service.target]]\ncidr = \"10.0.1.96/28\"\nversion = \"green\"\n")
            .unwrap();
        assert_eq!(
            cfg.services[0].targets,
            vec![TargetConfig {
                cidr: c("10.0.1.96/28"),
                version: "green".into()
            }]
        );
        let e = config_with("[[service.target]]\ncidr = \"10.0.1.97/28\"\nversion = \"green\"\n")
            .unwrap_err();
        assert!(
            e.contains("service[0] \"web\": target[0]: cidr: 10.0.1.97/28 has host bits set; did you mean 10.0.1.96/28?"),
            "{e}"
        );
        let e = config_with(
            "[[service.target]]\ncidr = \"10.0.0.0/8\"\nversion = \"green\"\n\
             [[service.target]]\ncidr = \"10.1.0.0/16\"\nversion = \"green\"\n\
             [[service.target]]\ncidr = \"10.2.0.0/16\"\nversion = \"teal\"\n",
        )
        .unwrap_err();
        assert!(e.contains("redundant: 10.0.0.0/8 already sends"), "{e}");
        assert!(e.contains("has no version \"teal\""), "{e}");
        let e = config_with(
            "[[service.target]]\ncidr = \"10.0.0.0/8\"\nversion = \"green\"\nname = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn edits_add_and_remove_rules_and_refuse_bad_ones() {
        use crate::edit::{TargetSpec, add_target, remove_target};
        let c0 = config_with("").unwrap();
        let spec = |cidr: &str, v: &str| TargetSpec {
            cidr: cidr.into(),
            version: v.into(),
        };
        let (c1, what) = add_target(&c0, "web", &spec("10.0.1.96/28", "green")).unwrap();
        assert_eq!(what, "target 10.0.1.96/28 -> green on web");
        assert_eq!(c1.services[0].targets.len(), 1);
        for (s, msg) in [
            (
                spec("10.0.1.96/28", "blue"),
                "already has a rule for 10.0.1.96/28",
            ),
            (spec("10.0.1.97/28", "blue"), "did you mean 10.0.1.96/28?"),
            (spec("10.0.1.100/32", "green"), "redundant"),
            (spec("10.0.9.0/24", "teal"), "no version \"teal\""),
            (spec("2001:db8::/64", "green"), "IPv4-only"),
        ] {
            let e = add_target(&c1, "web", &s).unwrap_err().to_string();
            assert!(e.contains(msg), "{e}");
        }
        // A carve-out to the other version is fine.
        let (c2, _) = add_target(&c1, "web", &spec("10.0.1.100/32", "blue")).unwrap();
        // Removing the outer rule would leave nothing redundant: fine.
        let (c3, what) = remove_target(&c2, "web", "10.0.1.96/28").unwrap();
        assert_eq!(what, "removed target 10.0.1.96/28 -> green from web");
        assert_eq!(c3.services[0].targets.len(), 1);
        let e = remove_target(&c3, "web", "10.0.1.96/28")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("has no rule for 10.0.1.96/28; its rules are: 10.0.1.100/32"),
            "{e}"
        );
        // Draining green's last backend while a rule sends clients there.
        let e = crate::edit::set_backend(
            &c1,
            "web",
            "10.0.3.1:80".parse().unwrap(),
            &crate::edit::BackendPatch {
                weight: None,
                state: Some("drain".into()),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no active backend"), "{e}");
    }

    #[test]
    fn a_rule_whose_version_is_down_is_not_published() {
        use crate::effective::{Overlay, effective};
        let cfg = config_with("[[service.target]]\ncidr = \"10.0.1.96/28\"\nversion = \"green\"\n")
            .unwrap();
        let mut o = Overlay::default();
        assert_eq!(effective(&cfg, &o).services[0].targets.len(), 1);
        o.down
            .insert(("web".into(), "10.0.3.1:80".parse().unwrap()));
        assert!(effective(&cfg, &o).services[0].targets.is_empty());
    }

    fn arb_cidr() -> impl Strategy<Value = Cidr> {
        // A small address space, so that rules nest and addresses match.
        (0u32..64, 24u8..=32).prop_map(|(host, len)| {
            let ip = 0x0a00_0100 | (host * 4);
            Cidr {
                addr: Ipv4Addr::from(ip & mask(len)),
                len,
            }
        })
    }

    proptest! {
        #[test]
        fn redundancy_agrees_with_a_scan(
            rules in proptest::collection::btree_map(arb_cidr(), 0u32..2, 0..20),
        ) {
            let mut s = svc(&[]);
            s.targets = rules
                .iter()
                .map(|(c, v)| TargetConfig {
                    cidr: *c,
                    version: ["blue", "green"][*v as usize].into(),
                })
                .collect();
            let scan = s
                .targets
                .iter()
                .filter(|r| {
                    s.targets
                        .iter()
                        .filter(|o| o.cidr != r.cidr && o.cidr.covers(&r.cidr))
                        .max_by_key(|o| o.cidr.len)
                        .is_some_and(|p| p.version == r.version)
                })
                .count();
            let found = problems(&s).iter().filter(|p| p.contains("redundant")).count();
            prop_assert_eq!(found, scan);
        }

        #[test]
        fn set_lookup_agrees_with_a_scan(
            rules in proptest::collection::btree_map(arb_cidr(), 0u32..4, 0..20),
            probes in proptest::collection::vec(0u32..512, 1..40),
        ) {
            let list: Vec<TargetConfig> = rules
                .iter()
                .map(|(c, v)| TargetConfig { cidr: *c, version: v.to_string() })
                .collect();
            let set = TargetSet::new(rules.iter().map(|(c, v)| (*c, *v)));
            for p in probes {
                let ip = Ipv4Addr::from(0x0a00_0000 + p * 3);
                let scan = longest_match(&list, ip).map(|r| r.version.clone());
                prop_assert_eq!(set.lookup(ip).map(|v| v.to_string()), scan);
            }
        }
    }
}
