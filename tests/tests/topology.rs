//! Smoke tests of the test kit itself, with no splitter running: the
//! topology builds, the edge's plain kernel forwarding carries TCP and UDP
//! between the client and backend namespaces, the servers and clients see
//! the right identities and peers, no checksum errors appear, and every
//! namespace is gone after drop.
//!
//! Privileged (root) and meant to run one at a time, so `#[ignore]`d for a
//! plain `cargo test`; `cargo xtask test` runs them:
//!
//! ```text
//! cargo test -p splitter-tests --test topology -- --include-ignored --test-threads=1
//! ```
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Result, ensure};
use splitter_tests::{
    clients::{self, LongLivedConn},
    netns,
    servers::{HttpServer, TcpIdentityServer, UdpIdentityServer},
    topology::{BACKEND_PORT, CLIENT_ADDR, Topology, TopologyOptions},
};

const TIMEOUT: Duration = Duration::from_secs(3);

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn veth_offloads_and_neighbours_are_set() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    for (ns, dev) in [(&topo.cli, "c0"), (&topo.back, "b0")] {
        let k = ns.exec("ethtool", &["-k", dev])?;
        ensure!(
            k.contains("tx-checksumming: off"),
            "tx checksum offload still on for {dev}:\n{k}"
        );
        ensure!(
            k.contains("generic-receive-offload: on"),
            "GRO off on {dev}:\n{k}"
        );
    }
    let neigh = topo.edge.ip(&["neigh", "show", "dev", "eb"])?;
    ensure!(
        neigh.contains("10.0.2.3 ") && neigh.contains("PERMANENT"),
        "edge neighbours: {neigh}"
    );
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn tcp_through_edge_forwarding() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        extra_client_addrs: 2,
        ..Default::default()
    })?;
    let blue_addr = topo.backend(0)?;
    let green_addr = topo.backend(1)?;
    let blue = TcpIdentityServer::start(&topo.back, blue_addr, "blue")?;
    let green = TcpIdentityServer::start(&topo.back, green_addr, "green")?;

    let id = clients::tcp_identity(&topo.cli, blue_addr, None, TIMEOUT)?;
    ensure!(id.name == "blue", "wrong server: {id:?}");
    ensure!(
        *id.peer.ip() == CLIENT_ADDR,
        "backend saw {} instead of the client address",
        id.peer
    );

    let extra = topo.extra_client_addrs()[0];
    let id = clients::tcp_identity(&topo.cli, green_addr, Some(extra), TIMEOUT)?;
    ensure!(
        id.name == "green" && *id.peer.ip() == extra,
        "bound source not seen: {id:?}"
    );

    let r =
        clients::tcp_identity_many(&topo.cli, blue_addr, 40, topo.extra_client_addrs(), TIMEOUT)?;
    ensure!(
        r.errors == 0 && r.count("blue") == 40,
        "parallel connections: {r:?}"
    );
    ensure!(
        r.per_source.len() == 2,
        "both source addresses used: {:?}",
        r.per_source
    );

    // A long-lived connection echoes every 50 ms.
    let conn = LongLivedConn::start(&topo.cli, green_addr, TIMEOUT)?;
    conn.wait_echoes(5, Duration::from_secs(5))?;
    let report = conn.stop();
    ensure!(
        report.failures.is_empty() && report.echoed >= 5,
        "long-lived: {report:?}"
    );

    ensure!(blue.accepted() == 41, "blue accepted {}", blue.accepted());
    ensure!(green.accepted() == 2, "green accepted {}", green.accepted());
    let peers = blue.stats().peer_ips();
    ensure!(
        peers.contains(&CLIENT_ADDR) && peers.len() == 3,
        "blue saw peers {peers:?}"
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn udp_and_http_through_edge_forwarding() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let udp_addr = SocketAddrV4::new(*topo.backend(0)?.ip(), 5353);
    let udp = UdpIdentityServer::start(&topo.back, udp_addr, "blue")?;
    let reply = clients::udp_request(&topo.cli, udp_addr, "hello there", TIMEOUT)?;
    ensure!(
        reply.name == "blue" && reply.payload == "hello there",
        "UDP reply {reply:?}"
    );
    ensure!(*reply.peer.ip() == CLIENT_ADDR, "UDP peer {}", reply.peer);
    ensure!(
        udp.requests() == 1,
        "UDP server answered {}",
        udp.requests()
    );

    let http_addr = topo.backend(1)?;
    let http = HttpServer::start(&topo.back, http_addr, "green")?;
    let resp = clients::http_get(&topo.cli, http_addr, "/")?;
    ensure!(
        resp.status == 200 && resp.body == format!("green {CLIENT_ADDR}\n"),
        "HTTP answer {resp:?}"
    );
    let r = clients::http_get_many(&topo.cli, http_addr, "/x", 30, TIMEOUT)?;
    ensure!(r.errors == 0 && r.count("green") == 30, "HTTP many: {r:?}");
    ensure!(
        http.requests() == 31,
        "HTTP server answered {}",
        http.requests()
    );
    topo.no_csum_errors()
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn namespaces_are_removed_on_drop() -> Result<()> {
    let names;
    {
        let mut topo = Topology::new(TopologyOptions {
            backend_addrs: 1,
            ..Default::default()
        })?;
        names = topo.names();
        for n in &names {
            ensure!(netns::exists(n), "{n} missing while the topology lives");
        }
        let added = topo.add_backend_addr()?;
        ensure!(
            added == Ipv4Addr::new(10, 0, 2, 3),
            "second backend address {added}"
        );
        let _server =
            TcpIdentityServer::start(&topo.back, SocketAddrV4::new(added, BACKEND_PORT), "x")?;
        // A failing test panics here and there; the guards still run.
        let panicked = std::panic::catch_unwind(|| {
            let _t = Topology::new(TopologyOptions::default());
            panic!("on purpose");
        });
        ensure!(panicked.is_err());
    }
    let left: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| names.contains(n))
        .collect();
    ensure!(left.is_empty(), "namespaces left after drop: {left:?}");
    let own = format!("{}{}-", netns::PREFIX_ROOT, std::process::id());
    let mine: Vec<String> = netns::list()
        .into_iter()
        .filter(|n| n.starts_with(&own))
        .collect();
    ensure!(
        mine.is_empty(),
        "namespaces of this process left (also after a panic): {mine:?}"
    );
    Ok(())
}
