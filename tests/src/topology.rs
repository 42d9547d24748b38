//! The test network: a client, an edge and a backend namespace joined by
//! two veth pairs, addressed, routed, tuned for XDP on veth, and removed on
//! `Drop`.
//!
//! ```text
//!  <prefix>-cli                <prefix>-edge                 <prefix>-back
//!  c0 10.0.1.2/24  ──veth──  ec 10.0.1.1/24                  
//!  (+10.0.1.100..)            eb 10.0.2.1/24  ──veth──  b0 10.0.2.2/24
//!  10.0.0.0/24 via 10.0.1.1   ip_forward=1                  (+10.0.2.3, .4 ..)
//!  10.0.2.0/24 via 10.0.1.1   splitter attaches to ec, eb   default via 10.0.2.1
//! ```
//!
//! VIPs live in 10.0.0.0/24 ([`VIP`] = 10.0.0.10) and exist on no
//! interface: the edge's XDP program answers for them. The client also has
//! a plain route to the backend subnet, so tests can reach a backend through
//! the edge's kernel forwarding with no splitter running.
//!
//! Veth tuning (why: `docs/testing.md`): `tx off` on `c0` and `b0`, whose
//! local sockets send through the edge; `gro on` on `c0` and `b0`, the peers
//! of the interfaces the edge redirects into; permanent neighbour entries
//! everywhere, so no first packet waits for ARP.
//!
//! ```no_run
//! use splitter_tests::topology::{Topology, TopologyOptions};
//! # fn main() -> anyhow::Result<()> {
//! let topo = Topology::new(TopologyOptions::default())?;
//! println!("edge namespace: {}", topo.edge.name());
//! # Ok(()) }
//! ```
use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::{Context, Result, bail};

use crate::netns::{self, Netns};

/// The client's interface, in the client namespace.
pub const CLIENT_IF: &str = "c0";
/// The edge's client-facing interface (`dataplane.interface`).
pub const EDGE_CLIENT_IF: &str = "ec";
/// The edge's backend-facing interface (`dataplane.backend_interface`).
pub const EDGE_BACKEND_IF: &str = "eb";
/// The backends' interface, in the backend namespace.
pub const BACKEND_IF: &str = "b0";

/// The client's main address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 2);
/// The first extra client address; more follow (10.0.1.101, ...).
pub const FIRST_EXTRA_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 100);
/// The edge on the client side (the client's next hop for VIPs).
pub const EDGE_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 1);
/// The edge on the backend side (the backends' default route; SNAT source).
pub const EDGE_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The first backend address; more follow (10.0.2.3, 10.0.2.4, ...).
pub const BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The VIP range routed from the client to the edge.
pub const VIP_NET: &str = "10.0.0.0/24";
/// The usual VIP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// The usual service port on the VIP.
pub const VIP_PORT: u16 = 80;
/// The usual port the backend servers listen on.
pub const BACKEND_PORT: u16 = 8080;

const MAX_EXTRA_CLIENT_ADDRS: usize = 150; // 10.0.1.100 ..= 10.0.1.249
const MAX_BACKEND_ADDRS: usize = 98; // 10.0.2.2 ..= 10.0.2.99

/// `VIP:VIP_PORT`, the address clients connect to.
pub fn vip() -> SocketAddrV4 {
    SocketAddrV4::new(VIP, VIP_PORT)
}

/// What to build.
#[derive(Debug, Clone)]
pub struct TopologyOptions {
    /// Namespace name prefix; `None` takes a fresh [`netns::run_prefix`].
    pub prefix: Option<String>,
    /// Backend addresses on `b0`, counting 10.0.2.2 (at least 1).
    pub backend_addrs: usize,
    /// Client addresses on `c0` besides 10.0.1.2 (10.0.1.100, ...).
    pub extra_client_addrs: usize,
    /// Keep IPv6 on (off by default: no router solicitations or DAD
    /// packets crossing the edge and its counters).
    pub ipv6: bool,
}

impl Default for TopologyOptions {
    fn default() -> Self {
        Self {
            prefix: None,
            backend_addrs: 2,
            extra_client_addrs: 0,
            ipv6: false,
        }
    }
}

/// The three namespaces and their wiring. Dropping it deletes the
/// namespaces, and with them the veth pairs, addresses and routes.
///
/// Stop servers, clients and the daemon before this drops (declare the
/// topology first in a test, so it drops last).
#[derive(Debug)]
pub struct Topology {
    /// The client namespace (`c0`).
    pub cli: Netns,
    /// The edge namespace (`ec`, `eb`), where splitter runs.
    pub edge: Netns,
    /// The backend namespace (`b0`), where the servers run.
    pub back: Netns,
    prefix: String,
    client_mac: String,
    backend_mac: String,
    extra_client_addrs: Vec<Ipv4Addr>,
    backend_addrs: Vec<Ipv4Addr>,
}

impl Topology {
    /// Fails if any of the three namespaces counted a bad TCP or UDP
    /// checksum (`InCsumErrors` in `/proc/net/snmp`).
    ///
    /// # Errors
    /// The counters could not be read, or one is not zero.
    pub fn no_csum_errors(&self) -> Result<()> {
        for ns in [&self.cli, &self.edge, &self.back] {
            let c = ns.csum_errors()?;
            if c.total() != 0 {
                bail!("InCsumErrors in {}: {c:?}", ns.name());
            }
        }
        Ok(())
    }

    /// Builds the namespaces, links, addresses, routes, offloads and
    /// neighbour entries. Removes namespaces left by dead runs first.
    ///
    /// # Errors
    /// Any `ip`, `ethtool` or sysctl step failed (the message names it);
    /// whatever was built so far is removed again.
    pub fn new(opts: TopologyOptions) -> Result<Self> {
        if opts.backend_addrs == 0 || opts.backend_addrs > MAX_BACKEND_ADDRS {
            bail!(
                "backend_addrs must be 1..={MAX_BACKEND_ADDRS}, not {}",
                opts.backend_addrs
            );
        }
        if opts.extra_client_addrs > MAX_EXTRA_CLIENT_ADDRS {
            bail!("extra_client_addrs must be at most {MAX_EXTRA_CLIENT_ADDRS}");
        }
        if !netns::on_path("ethtool") {
            bail!(
                "ethtool is not installed; the topology needs it to turn veth offloads off \
                 (run `cargo xtask setup`, or `apt-get install ethtool`)"
            );
        }
        netns::remove_stale();
        let prefix = opts.prefix.clone().unwrap_or_else(netns::run_prefix);
        // Each guard exists before the next step, so a failure below
        // removes everything made so far.
        let cli = Netns::new(format!("{prefix}-cli"))?;
        let edge = Netns::new(format!("{prefix}-edge"))?;
        let back = Netns::new(format!("{prefix}-back"))?;
        if !opts.ipv6 {
            for ns in [&cli, &edge, &back] {
                ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
                ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
            }
        }

        let ip_cidr = |a: Ipv4Addr| format!("{a}/24");
        // Veth pairs made directly in their namespaces: nothing ever
        // appears in the root namespace.
        edge.ip(&[
            "link",
            "add",
            EDGE_CLIENT_IF,
            "type",
            "veth",
            "peer",
            "name",
            CLIENT_IF,
            "netns",
            cli.name(),
        ])
        .context("creating the client veth pair")?;
        edge.ip(&[
            "link",
            "add",
            EDGE_BACKEND_IF,
            "type",
            "veth",
            "peer",
            "name",
            BACKEND_IF,
            "netns",
            back.name(),
        ])
        .context("creating the backend veth pair")?;
        cli.ip(&["addr", "add", &ip_cidr(CLIENT_ADDR), "dev", CLIENT_IF])?;
        edge.ip(&[
            "addr",
            "add",
            &ip_cidr(EDGE_CLIENT_ADDR),
            "dev",
            EDGE_CLIENT_IF,
        ])?;
        edge.ip(&[
            "addr",
            "add",
            &ip_cidr(EDGE_BACKEND_ADDR),
            "dev",
            EDGE_BACKEND_IF,
        ])?;
        back.ip(&["addr", "add", &ip_cidr(BACKEND_ADDR), "dev", BACKEND_IF])?;

        // Offloads before the links come up (see the module comment).
        for (ns, dev) in [(&cli, CLIENT_IF), (&back, BACKEND_IF)] {
            ns.exec("ethtool", &["-K", dev, "tx", "off", "gro", "on"])
                .with_context(|| format!("setting offloads on {dev} in {}", ns.name()))?;
        }
        cli.ip(&["link", "set", CLIENT_IF, "up"])?;
        edge.ip(&["link", "set", EDGE_CLIENT_IF, "up"])?;
        edge.ip(&["link", "set", EDGE_BACKEND_IF, "up"])?;
        back.ip(&["link", "set", BACKEND_IF, "up"])?;

        let gw = EDGE_CLIENT_ADDR.to_string();
        cli.ip(&["route", "add", VIP_NET, "via", &gw])?;
        cli.ip(&["route", "add", "10.0.2.0/24", "via", &gw])?;
        back.ip(&[
            "route",
            "add",
            "default",
            "via",
            &EDGE_BACKEND_ADDR.to_string(),
        ])?;

        edge.sysctl("net.ipv4.ip_forward", "1")?;
        // Strict reverse-path filtering would drop packets the data plane
        // hands to the stack after a rewrite; be explicit, whatever the
        // host's defaults.
        for conf in ["all", "default", EDGE_CLIENT_IF, EDGE_BACKEND_IF] {
            edge.sysctl(&format!("net.ipv4.conf.{conf}.rp_filter"), "0")?;
        }

        let client_mac = mac_of(&cli, CLIENT_IF)?;
        let backend_mac = mac_of(&back, BACKEND_IF)?;
        let ec_mac = mac_of(&edge, EDGE_CLIENT_IF)?;
        let eb_mac = mac_of(&edge, EDGE_BACKEND_IF)?;
        permanent_neigh(&cli, EDGE_CLIENT_ADDR, &ec_mac, CLIENT_IF)?;
        permanent_neigh(&back, EDGE_BACKEND_ADDR, &eb_mac, BACKEND_IF)?;
        permanent_neigh(&edge, CLIENT_ADDR, &client_mac, EDGE_CLIENT_IF)?;
        permanent_neigh(&edge, BACKEND_ADDR, &backend_mac, EDGE_BACKEND_IF)?;

        let mut topo = Self {
            cli,
            edge,
            back,
            prefix,
            client_mac,
            backend_mac,
            extra_client_addrs: Vec::new(),
            backend_addrs: vec![BACKEND_ADDR],
        };
        for _ in 1..opts.backend_addrs {
            topo.add_backend_addr()?;
        }
        for _ in 0..opts.extra_client_addrs {
            topo.add_client_addr()?;
        }
        Ok(topo)
    }

    /// The namespace name prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// All backend addresses, 10.0.2.2 first.
    pub fn backend_addrs(&self) -> &[Ipv4Addr] {
        &self.backend_addrs
    }

    /// Backend address `i` with port [`BACKEND_PORT`] (0 is 10.0.2.2:8080).
    ///
    /// # Errors
    /// There are not that many backend addresses.
    pub fn backend(&self, i: usize) -> Result<SocketAddrV4> {
        let a = self
            .backend_addrs
            .get(i)
            .with_context(|| format!("no backend address #{i}"))?;
        Ok(SocketAddrV4::new(*a, BACKEND_PORT))
    }

    /// The extra client addresses (10.0.1.100, ...), without 10.0.1.2.
    pub fn extra_client_addrs(&self) -> &[Ipv4Addr] {
        &self.extra_client_addrs
    }

    /// Adds the next backend address to `b0` (10.0.2.3, 10.0.2.4, ...) and
    /// its neighbour entry on the edge.
    ///
    /// # Errors
    /// The range is used up or `ip` failed.
    pub fn add_backend_addr(&mut self) -> Result<Ipv4Addr> {
        if self.backend_addrs.len() >= MAX_BACKEND_ADDRS {
            bail!("no more backend addresses (at most {MAX_BACKEND_ADDRS})");
        }
        let a = offset(BACKEND_ADDR, self.backend_addrs.len());
        self.back
            .ip(&["addr", "add", &format!("{a}/24"), "dev", BACKEND_IF])?;
        permanent_neigh(&self.edge, a, &self.backend_mac, EDGE_BACKEND_IF)?;
        self.backend_addrs.push(a);
        Ok(a)
    }

    /// Adds the next extra client address to `c0` (10.0.1.100, ...) and its
    /// neighbour entry on the edge.
    ///
    /// # Errors
    /// The range is used up or `ip` failed.
    pub fn add_client_addr(&mut self) -> Result<Ipv4Addr> {
        if self.extra_client_addrs.len() >= MAX_EXTRA_CLIENT_ADDRS {
            bail!("no more client addresses (at most {MAX_EXTRA_CLIENT_ADDRS} extra)");
        }
        let a = offset(FIRST_EXTRA_CLIENT_ADDR, self.extra_client_addrs.len());
        self.cli
            .ip(&["addr", "add", &format!("{a}/24"), "dev", CLIENT_IF])?;
        permanent_neigh(&self.edge, a, &self.client_mac, EDGE_CLIENT_IF)?;
        self.extra_client_addrs.push(a);
        Ok(a)
    }

    /// The three namespace names (client, edge, backend).
    pub fn names(&self) -> [String; 3] {
        [
            self.cli.name().to_string(),
            self.edge.name().to_string(),
            self.back.name().to_string(),
        ]
    }
}

fn offset(base: Ipv4Addr, i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(u32::try_from(i).unwrap_or(u32::MAX)))
}

/// The MAC address of `dev` in `ns` (from `ip -j link show`).
fn mac_of(ns: &Netns, dev: &str) -> Result<String> {
    let json = ns.ip(&["-j", "link", "show", "dev", dev])?;
    let v: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("parsing `ip -j link show dev {dev}`: {json}"))?;
    v.get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .map(str::to_string)
        .with_context(|| format!("no MAC address for {dev} in {}: {json}", ns.name()))
}

fn permanent_neigh(ns: &Netns, addr: Ipv4Addr, mac: &str, dev: &str) -> Result<()> {
    ns.ip(&[
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])
    .with_context(|| format!("neighbour {addr} -> {mac} on {dev} in {}", ns.name()))?;
    Ok(())
}
