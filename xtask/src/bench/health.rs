//! Time from a backend's death to its removal from new-flow selection,
//! with the default health settings (`[service.health]` with no overrides:
//! a TCP connect every second, out after three failures in a row).
//!
//! The real daemon runs in the test topology's edge namespace with one
//! service whose version has two backends. Each round stops one backend's
//! server (its port then refuses connections, as after a crash) and polls
//! `splitter status` until the daemon reports the backend down: the data
//! plane is updated before the status can say so. Then the server comes
//! back and the round waits until it is up again. Every wait is bounded.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Result, ensure};
use splitter_tests::{
    clients,
    servers::TcpIdentityServer,
    splitter::{Affinity, Daemon, Mode, ServiceSpec, VersionSpec, config_toml},
    topology::{self, BACKEND_PORT, Topology, TopologyOptions},
};

/// Longest a backend may take to be reported down or up again.
const WAIT: Duration = Duration::from_secs(15);

fn be(last: u8) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, last), BACKEND_PORT)
}

/// Milliseconds from stopping a backend to its removal, once per round.
///
/// # Errors
/// The topology, the servers or the daemon could not start, a wait ran
/// out, or new flows still reached the dead backend after its removal.
pub fn backend_death(rounds: usize) -> Result<Vec<f64>> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 3,
        ..Default::default()
    })?;
    let _keep = TcpIdentityServer::start(&topo.back, be(2), "keep")?;
    let mut config = config_toml(
        Mode::Snat,
        &[ServiceSpec {
            name: "web".into(),
            vip: topology::vip(),
            protocol: "tcp",
            affinity: Affinity::Flow,
            versions: vec![VersionSpec {
                name: "blue".into(),
                weight: 1,
                backends: vec![be(2), be(4)],
            }],
        }],
    );
    config.push_str("\n[service.health]\n");
    let mut victim = Some(TcpIdentityServer::start(&topo.back, be(4), "victim")?);
    let d = Daemon::start(&topo.edge, &config)?;
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        d.wait_health("web", be(4), "up", WAIT)?;
        if let Some(v) = victim.take() {
            v.stop();
        }
        let took = d.wait_health("web", be(4), "down", WAIT)?;
        out.push(took.as_secs_f64() * 1e3);
        let r = clients::tcp_identity_many(
            &topo.cli,
            topology::vip(),
            50,
            &[],
            Duration::from_secs(3),
        )?;
        ensure!(
            r.errors == 0 && r.count("keep") == 50,
            "new flows after the removal: {r:?}"
        );
        victim = Some(TcpIdentityServer::start(&topo.back, be(4), "victim")?);
    }
    Ok(out)
}
