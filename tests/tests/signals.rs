//! The connection signals of the real `splitter daemon` against real
//! servers that misbehave in every way the edge can see, under real client
//! load: what `splitter status` and `GET /v1/services/{name}/signals` report
//! per version must agree with what the clients saw.
//!
//! Service `web` (connect deadline 500 ms) has one version per behaviour:
//! - `healthy`: a server that answers (error rate 0);
//! - `closed`: nothing listens on the port (refused, about 100%);
//! - `blackhole`: nftables in the backend namespace drops its SYNs
//!   (timeouts, about 100%);
//! - `resetting`: a server that accepts and then resets (RST on an
//!   established connection).
//!
//! Service `slow` (connect deadline 60 s) has one backend whose SYNs are
//! dropped half of the time: about half of its connect latencies are above
//! a second (the client's SYN retransmit), exactly as many as the clients
//! saw connect that slowly.
//!
//! Service `dns` (UDP, connect deadline 300 ms) has a version `answering`
//! (a UDP echo server) and a version `silent` (a server that reads every
//! datagram and never answers): one-datagram queries from fresh client
//! sockets, each its own flow, must show as established or timed out, the
//! silent ones counted by the daemon's sweep of the connection table within
//! seconds of their deadline, with datagrams counted both ways.
//!
//! Privileged, so `#[ignore]`d for a plain `cargo test`:
//!
//! ```text
//! cargo test -p splitter-tests --test signals -- --include-ignored --test-threads=1
//! ```
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use splitter_tests::{
    netns::Netns,
    rollouts::ResettingServer,
    servers::{TcpIdentityServer, UdpIdentityServer},
    splitter::{Affinity, Daemon, Mode, ServiceSpec, VersionSpec, config_toml},
    topology::{self, Topology, TopologyOptions},
};

/// What one client connection saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Connected and read the server's greeting.
    Ok,
    /// `ECONNREFUSED`.
    Refused,
    /// No connection within the client's connect timeout.
    TimedOut,
    /// Connected, then reset by the far end.
    Reset,
}

/// Tallies of client outcomes, and of connect times of a second or more.
#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    refused: u64,
    timed_out: u64,
    reset: u64,
    slow_connects: u64,
    connects: u64,
}

/// The next client source port (20000-31999, below the kernel's ephemeral
/// range, so no other socket takes it): every connection of a run has its own,
/// since a port the kernel handed out again would reuse a tuple the edge
/// still holds for a connection that never got an answer (its SYN counts
/// as that flow's retransmission, not as a new attempt).
fn next_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    20_000 + (NEXT.fetch_add(1, Ordering::Relaxed) % 12_000) as u16
}

/// One connection to `vip` from a port of its own: connect (giving up
/// after `connect_timeout`), then read until the server's first line or
/// the connection's end.
fn connect_once(vip: SocketAddrV4, connect_timeout: Duration) -> Result<(Outcome, Duration)> {
    let started = Instant::now();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from(([0, 0, 0, 0], next_port())).into())?;
    let connected = sock
        .connect_timeout(&SocketAddr::V4(vip).into(), connect_timeout)
        .map(|()| TcpStream::from(sock));
    let mut s = match connected {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            return Ok((Outcome::Refused, started.elapsed()));
        }
        Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::WouldBlock => {
            return Ok((Outcome::TimedOut, started.elapsed()));
        }
        Err(e) => bail!("connect to {vip}: {e}"),
    };
    let took = started.elapsed();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = s.write_all(b"hello\n");
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => Ok((Outcome::Ok, took)),
        Ok(_) => bail!("{vip}: connection closed without a greeting or a reset"),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok((Outcome::Reset, took)),
        Err(e) => bail!("{vip}: read: {e}"),
    }
}

/// `n` connections to `vip` from the client namespace, `threads` at a time.
fn load(
    cli: &Netns,
    vip: SocketAddrV4,
    n: u64,
    threads: u64,
    connect_timeout: Duration,
) -> Result<Tally> {
    cli.enter(|| -> Result<Tally> {
        let per = n.div_ceil(threads);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::spawn(move || -> Result<Vec<(Outcome, Duration)>> {
                    let count = per.min(n.saturating_sub(t * per));
                    (0..count)
                        .map(|_| connect_once(vip, connect_timeout))
                        .collect()
                })
            })
            .collect();
        let mut tally = Tally::default();
        for h in handles {
            let results = h
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            for (outcome, took) in results {
                tally.connects += 1;
                match outcome {
                    Outcome::Ok => tally.ok += 1,
                    Outcome::Refused => tally.refused += 1,
                    Outcome::TimedOut => tally.timed_out += 1,
                    Outcome::Reset => tally.reset += 1,
                }
                if outcome != Outcome::Refused
                    && outcome != Outcome::TimedOut
                    && took >= Duration::from_millis(900)
                {
                    tally.slow_connects += 1;
                }
            }
        }
        Ok(tally)
    })?
}

/// The per-version signals of `service` over the last `window`, from the
/// API through the CLI's socket (`curl --unix-socket` works the same).
fn signals(daemon: &Daemon, service: &str, window: &str) -> Result<Value> {
    let out = daemon.cli_ok(&["status", "--output", "json", "--window", window])?;
    let status: Value = serde_json::from_str(&out).context("status JSON")?;
    status["services"]
        .as_array()
        .context("no services")?
        .iter()
        .find(|s| s["name"] == service)
        .cloned()
        .with_context(|| format!("no service {service} in {status}"))
}

/// A cumulative signal counter of one version.
fn counter(service: &Value, version: &str, field: &str) -> Result<u64> {
    service["versions"]
        .as_array()
        .context("no versions")?
        .iter()
        .find(|v| v["name"] == version)
        .and_then(|v| v["signals"][field].as_u64())
        .with_context(|| format!("no signals.{field} of version {version} in {service}"))
}

/// `a` and `b` agree within 1% of `of` (and at least one).
fn agree(what: &str, edge: u64, clients: u64, of: u64) -> Result<()> {
    let slack = (of / 100).max(1);
    ensure!(
        edge.abs_diff(clients) <= slack,
        "{what}: the edge counted {edge}, the clients saw {clients} (allowed difference {slack})"
    );
    Ok(())
}

/// Polls (every 100 ms, at most `within`) until `check` passes.
fn eventually(within: Duration, mut check: impl FnMut() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    loop {
        match check() {
            Ok(()) => return Ok(started.elapsed()),
            Err(e) if started.elapsed() >= within => {
                return Err(e.context(format!("still not so after {within:?}")));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The nftables rules of the backend namespace: drop every SYN to the
/// blackhole backend, and a random half of the SYNs to the slow one.
fn drop_syns(back: &Netns, blackhole: SocketAddrV4, slow: SocketAddrV4) -> Result<()> {
    let rules = format!(
        "table inet spl_signals {{\n\
         chain input {{\n\
         type filter hook input priority 0; policy accept;\n\
         ip daddr {} tcp dport {} tcp flags & (syn | ack) == syn drop\n\
         ip daddr {} tcp dport {} tcp flags & (syn | ack) == syn numgen random mod 2 == 0 drop\n\
         }}\n}}\n",
        blackhole.ip(),
        blackhole.port(),
        slow.ip(),
        slow.port()
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("rules.nft");
    std::fs::write(&path, rules)?;
    back.exec(
        "nft",
        &["-f", path.to_str().context("temp path is not UTF-8")?],
    )?;
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn signals_agree_with_what_clients_saw_for_every_kind_of_failure() -> Result<()> {
    let topo = Topology::new(TopologyOptions {
        backend_addrs: 5,
        ..Default::default()
    })?;
    let [healthy, closed, blackhole, resetting, slow] = [0, 1, 2, 3, 4].map(|i| topo.backend(i));
    let (healthy, closed, blackhole, resetting, slow) =
        (healthy?, closed?, blackhole?, resetting?, slow?);
    let _healthy_server = TcpIdentityServer::start(&topo.back, healthy, "healthy")?;
    let _slow_server = TcpIdentityServer::start(&topo.back, slow, "slow")?;
    let _resetting_server = ResettingServer::start(&topo.back, resetting)?;
    drop_syns(&topo.back, blackhole, slow)?;

    let web_vip = topology::vip();
    let slow_vip = SocketAddrV4::new(topology::VIP, 81);
    let version = |name: &str, backend| VersionSpec {
        name: name.into(),
        weight: 1,
        backends: vec![backend],
    };
    let mut config = config_toml(
        Mode::Snat,
        &[
            ServiceSpec {
                name: "web".into(),
                vip: web_vip,
                protocol: "tcp",
                affinity: Affinity::Flow,
                versions: vec![
                    version("healthy", healthy),
                    version("closed", closed),
                    version("blackhole", blackhole),
                    version("resetting", resetting),
                ],
            },
            ServiceSpec {
                name: "slow".into(),
                vip: slow_vip,
                protocol: "tcp",
                affinity: Affinity::Flow,
                versions: vec![version("halfdrop", slow)],
            },
        ],
    );
    // Deadlines per service, right after each `vip = ...` line.
    config = config.replace(
        &format!("vip = \"{web_vip}\"\n"),
        &format!("vip = \"{web_vip}\"\nconnect_timeout_ms = 500\n"),
    );
    config = config.replace(
        &format!("vip = \"{slow_vip}\"\n"),
        &format!("vip = \"{slow_vip}\"\nconnect_timeout_ms = 60000\n"),
    );
    let daemon = Daemon::start(&topo.edge, &config)?;

    // 400 connections over the four versions of `web`, 40 at a time; the
    // clients give up connecting after 2.5 s (after one SYN retransmit).
    let n = 400;
    let web = load(&topo.cli, web_vip, n, 40, Duration::from_millis(2500))?;
    let finished = Instant::now();
    ensure!(web.connects == n, "{web:?}");
    for (what, count) in [
        ("succeeded", web.ok),
        ("were refused", web.refused),
        ("timed out", web.timed_out),
        ("were reset", web.reset),
    ] {
        ensure!(
            count >= n / 10,
            "only {count} of {n} connections {what}: the four versions should share them ({web:?})"
        );
    }
    let took = eventually(Duration::from_secs(2), || {
        let s = signals(&daemon, "web", "60s")?;
        agree(
            "healthy: established",
            counter(&s, "healthy", "established")?,
            web.ok,
            n,
        )?;
        agree(
            "closed: refused",
            counter(&s, "closed", "refused")?,
            web.refused,
            n,
        )?;
        agree(
            "blackhole: timeouts",
            counter(&s, "blackhole", "timeouts")?,
            web.timed_out,
            n,
        )?;
        agree(
            "resetting: reset_by_backend",
            counter(&s, "resetting", "reset_by_backend")?,
            web.reset,
            n,
        )?;
        let attempts: u64 = ["healthy", "closed", "blackhole", "resetting"]
            .iter()
            .map(|v| counter(&s, v, "attempts"))
            .sum::<Result<u64>>()?;
        ensure!(
            attempts == n,
            "{attempts} attempts counted for {n} connections"
        );
        Ok(())
    })?;
    eprintln!(
        "web: the edge agreed with the clients {:?} after they finished ({took:?} of polling)",
        finished.elapsed()
    );

    // Each failure is its version's only kind, and the windowed error rate
    // says so: about 100% for closed, blackhole and resetting, 0 for healthy.
    let s = signals(&daemon, "web", "60s")?;
    let rate = |v: &str| -> Result<f64> {
        s["versions"]
            .as_array()
            .context("no versions")?
            .iter()
            .find(|x| x["name"] == v)
            .and_then(|x| x["window"]["error_rate"].as_f64())
            .with_context(|| format!("no window.error_rate of {v} in {s}"))
    };
    ensure!(
        rate("healthy")? == 0.0,
        "healthy error rate {}",
        rate("healthy")?
    );
    for v in ["closed", "blackhole", "resetting"] {
        ensure!(
            rate(v)? >= 0.99,
            "{v}: error rate {} (expected about 1)",
            rate(v)?
        );
    }
    for (v, field) in [
        ("healthy", "refused"),
        ("healthy", "timeouts"),
        ("healthy", "reset_by_backend"),
        ("closed", "established"),
        ("blackhole", "established"),
        ("blackhole", "refused"),
    ] {
        ensure!(counter(&s, v, field)? == 0, "{v}: {field} is not 0: {s}");
    }
    // The resetting server did accept every connection.
    agree(
        "resetting: established",
        counter(&s, "resetting", "established")?,
        web.reset,
        n,
    )?;

    // Half of the SYNs to `slow` dropped: its connections open, about half
    // of them after the client's retransmit a second later. The edge's
    // latency histogram has exactly those above one second.
    let m = 120;
    let sl = load(&topo.cli, slow_vip, m, 40, Duration::from_secs(10))?;
    // A connection whose SYN was dropped four times in a row (1 in 16)
    // gives up after 10 s: the edge saw no answer either.
    ensure!(
        sl.ok + sl.timed_out == m && sl.timed_out <= m / 8,
        "connections to `slow` should open: {sl:?}"
    );
    ensure!(
        (m / 4..=3 * m / 4).contains(&sl.slow_connects),
        "{} of {m} connects took a second or more; expected about half",
        sl.slow_connects
    );
    eventually(Duration::from_secs(2), || {
        let s = signals(&daemon, "slow", "60s")?;
        let v = &s["versions"][0];
        let buckets: Vec<u64> = v["signals"]["latency"]
            .as_array()
            .context("no latency buckets")?
            .iter()
            .map(|b| b.as_u64().unwrap_or(0))
            .collect();
        // Bucket 12 ends at 1 s: the ones after it are the slow connects.
        let above_1s: u64 = buckets.iter().skip(13).sum();
        let total: u64 = buckets.iter().sum();
        ensure!(
            total == sl.ok,
            "{total} latency samples for {} connections: {v}",
            sl.ok
        );
        ensure!(
            v["signals"]["established"] == sl.ok,
            "established differs from {} connections: {v}",
            sl.ok
        );
        agree("slow connects", above_1s, sl.slow_connects, m)?;
        let p99 = v["window"]["latency_p99_ms"].as_f64().context("no p99")?;
        ensure!(
            p99 >= 1000.0,
            "p99 connect latency {p99} ms, expected >= 1 s"
        );
        Ok(())
    })?;

    // The table view shows the signals section.
    let table = daemon.cli_ok(&["status", "--backends"])?;
    ensure!(
        table.contains("signals over the last 1m") && table.contains("blackhole"),
        "status table lacks the signals section:\n{table}"
    );
    topo.no_csum_errors()?;
    Ok(())
}

/// A UDP server that reads every datagram and never answers; it counts
/// what it read.
struct SilentUdpServer {
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SilentUdpServer {
    /// Longest life of its thread, whatever happens to the test.
    const LIFETIME: Duration = Duration::from_secs(300);

    fn start(ns: &Netns, addr: SocketAddrV4) -> Result<Self> {
        let sock = ns
            .enter(|| UdpSocket::bind(addr))?
            .with_context(|| format!("binding UDP {addr} in {}", ns.name()))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), received.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut buf = [0u8; 2048];
            while !flag.load(Ordering::Relaxed) && started.elapsed() < Self::LIFETIME {
                if sock.recv_from(&mut buf).is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Self {
            stop,
            received,
            thread: Some(thread),
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for SilentUdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the UDP clients saw.
#[derive(Debug)]
struct UdpTally {
    sent: u64,
    /// Queries answered by the `answering` server.
    answered: u64,
    /// Queries with no answer within the read timeout.
    unanswered: u64,
    /// When the last query of all went out.
    last_sent: Instant,
}

/// `n` one-datagram queries to `vip` from the client namespace, `threads`
/// at a time, each from a fresh socket (its own flow), each waiting up to
/// `read_timeout` for one answer. The sockets stay open until every query
/// is done, so no two queries share a source port (and so a flow).
fn udp_load(
    cli: &Netns,
    vip: SocketAddrV4,
    n: u64,
    threads: u64,
    read_timeout: Duration,
) -> Result<UdpTally> {
    cli.enter(|| -> Result<UdpTally> {
        let per = n.div_ceil(threads);
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                std::thread::spawn(move || -> Result<(u64, u64, Instant, Vec<UdpSocket>)> {
                    let count = per.min(n.saturating_sub(t * per));
                    let (mut answered, mut unanswered) = (0, 0);
                    let mut last_sent = Instant::now();
                    let mut sockets = Vec::new();
                    for i in 0..count {
                        let s = UdpSocket::bind("0.0.0.0:0")?;
                        s.connect(vip)?;
                        s.set_read_timeout(Some(read_timeout))?;
                        let query = format!("q{t}-{i}");
                        s.send(query.as_bytes())
                            .with_context(|| format!("sending to {vip}"))?;
                        last_sent = Instant::now();
                        let mut buf = [0u8; 2048];
                        match s.recv(&mut buf) {
                            Ok(len) => {
                                let text = String::from_utf8_lossy(&buf[..len]);
                                ensure!(
                                    text.starts_with("answering ") && text.ends_with(&query),
                                    "query {query:?} got the answer {text:?}"
                                );
                                answered += 1;
                            }
                            Err(e)
                                if e.kind() == ErrorKind::WouldBlock
                                    || e.kind() == ErrorKind::TimedOut =>
                            {
                                unanswered += 1;
                            }
                            Err(e) => bail!("query {query:?} to {vip}: {e}"),
                        }
                        sockets.push(s);
                    }
                    Ok((answered, unanswered, last_sent, sockets))
                })
            })
            .collect();
        let mut tally = UdpTally {
            sent: 0,
            answered: 0,
            unanswered: 0,
            last_sent: Instant::now(),
        };
        let mut all_sockets = Vec::new();
        let mut last: Option<Instant> = None;
        for h in handles {
            let (a, u, at, sockets) = h
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            tally.answered += a;
            tally.unanswered += u;
            tally.sent += a + u;
            if a + u > 0 {
                last = Some(last.map_or(at, |l| l.max(at)));
            }
            all_sockets.extend(sockets);
        }
        tally.last_sent = last.unwrap_or(tally.last_sent);
        drop(all_sockets);
        Ok(tally)
    })?
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn udp_signals_agree_with_what_clients_saw() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let (answering, silent) = (topo.backend(0)?, topo.backend(1)?);
    let answering_server = UdpIdentityServer::start(&topo.back, answering, "answering")?;
    let silent_server = SilentUdpServer::start(&topo.back, silent)?;

    let vip = SocketAddrV4::new(topology::VIP, 5353);
    let deadline = Duration::from_millis(300);
    let version = |name: &str, backend| VersionSpec {
        name: name.into(),
        weight: 1,
        backends: vec![backend],
    };
    let config = config_toml(
        Mode::Snat,
        &[ServiceSpec {
            name: "dns".into(),
            vip,
            protocol: "udp",
            affinity: Affinity::Flow,
            versions: vec![version("answering", answering), version("silent", silent)],
        }],
    )
    .replace(
        &format!("vip = \"{vip}\"\n"),
        &format!(
            "vip = \"{vip}\"\nconnect_timeout_ms = {}\n",
            deadline.as_millis()
        ),
    );
    let daemon = Daemon::start(&topo.edge, &config)?;

    // 200 queries, 20 at a time, each waiting as long as the edge's
    // deadline for its answer.
    let n = 200;
    let udp = udp_load(&topo.cli, vip, n, 20, deadline)?;
    let last_deadline = udp.last_sent + deadline;
    ensure!(udp.sent == n, "{udp:?}");
    ensure!(
        udp.answered >= n / 4 && udp.unanswered >= n / 4,
        "the two versions should share the {n} queries about evenly: {udp:?}"
    );
    // What the backends saw: the answering server answered every answered
    // query, the silent one read every other.
    agree(
        "answering server: datagrams answered",
        answering_server.requests(),
        udp.answered,
        n,
    )?;
    agree(
        "silent server: datagrams read",
        silent_server.received(),
        udp.unanswered,
        n,
    )?;

    // The silent flows send nothing after their datagram: the daemon's
    // sweep (about once a second) must count their timeouts within 3 s of
    // the last deadline.
    let within = Duration::from_secs(3).saturating_sub(last_deadline.elapsed());
    let mut last_seen = None;
    let took = eventually(within, || {
        let s = signals(&daemon, "dns", "60s")?;
        last_seen = Some(s.clone());
        agree(
            "silent: timeouts",
            counter(&s, "silent", "timeouts")?,
            udp.unanswered,
            n,
        )?;
        agree(
            "answering: established",
            counter(&s, "answering", "established")?,
            udp.answered,
            n,
        )
    })
    .with_context(|| {
        format!(
            "the edge's counters did not agree with the clients ({udp:?}) within 3 s of the \
             last deadline; last status of dns: {}",
            last_seen.as_ref().map(Value::to_string).unwrap_or_default()
        )
    })?;
    eprintln!(
        "dns: the edge agreed with the clients {:?} after the last deadline ({took:?} of polling)",
        last_deadline.elapsed()
    );

    // Settled: every counter of both versions.
    let s = signals(&daemon, "dns", "60s")?;
    eprintln!(
        "dns: clients {udp:?}; edge: answering {}, silent {}",
        s["versions"][0]["signals"], s["versions"][1]["signals"]
    );
    let attempts = counter(&s, "answering", "attempts")? + counter(&s, "silent", "attempts")?;
    ensure!(
        attempts == n,
        "{attempts} attempts counted for {n} one-datagram flows: {s}"
    );
    for (v, field, clients) in [
        ("answering", "attempts", udp.answered),
        ("answering", "established", udp.answered),
        ("answering", "timeouts", 0),
        ("answering", "packets", udp.answered),
        ("answering", "reply_packets", udp.answered),
        ("silent", "attempts", udp.unanswered),
        ("silent", "established", 0),
        ("silent", "timeouts", udp.unanswered),
        ("silent", "packets", udp.unanswered),
        ("silent", "reply_packets", 0),
    ] {
        agree(
            &format!("{v}: signals.{field}"),
            counter(&s, v, field)?,
            clients,
            n,
        )?;
    }
    for (v, field) in [
        ("answering", "refused"),
        ("answering", "reset_by_backend"),
        ("silent", "refused"),
        ("silent", "reset_by_backend"),
    ] {
        ensure!(counter(&s, v, field)? == 0, "{v}: {field} is not 0: {s}");
    }
    // The version's own packet count says the same as its signals.
    for (v, clients) in [("answering", udp.answered), ("silent", udp.unanswered)] {
        let packets = s["versions"]
            .as_array()
            .context("no versions")?
            .iter()
            .find(|x| x["name"] == v)
            .and_then(|x| x["packets"].as_u64())
            .with_context(|| format!("no packets of version {v} in {s}"))?;
        agree(&format!("{v}: packets"), packets, clients, n)?;
    }
    // One latency sample per answered flow; the error rate says which
    // version never answers.
    let version_of = |v: &str| -> Result<Value> {
        s["versions"]
            .as_array()
            .context("no versions")?
            .iter()
            .find(|x| x["name"] == v)
            .cloned()
            .with_context(|| format!("no version {v} in {s}"))
    };
    let answering_v = version_of("answering")?;
    let samples: u64 = answering_v["signals"]["latency"]
        .as_array()
        .context("no latency buckets")?
        .iter()
        .map(|b| b.as_u64().unwrap_or(0))
        .sum();
    agree("answering: latency samples", samples, udp.answered, n)?;
    // The windows come from the once-a-second history, which may be a
    // second behind the live counters above: the error rate says, within
    // a few seconds, which version never answers.
    let took = eventually(Duration::from_secs(3), || {
        let s = signals(&daemon, "dns", "60s")?;
        let rate = |v: &str| -> Result<Option<f64>> {
            Ok(s["versions"]
                .as_array()
                .context("no versions")?
                .iter()
                .find(|x| x["name"] == v)
                .with_context(|| format!("no version {v} in {s}"))?["window"]["error_rate"]
                .as_f64())
        };
        ensure!(
            rate("answering")? == Some(0.0),
            "answering: windowed error rate {:?}, expected 0",
            rate("answering")?
        );
        ensure!(
            rate("silent")?.is_some_and(|r| r >= 0.99),
            "silent: windowed error rate {:?}, expected about 1",
            rate("silent")?
        );
        Ok(())
    })?;
    eprintln!("dns: the windowed error rates caught up after {took:?}");
    topo.no_csum_errors()?;
    Ok(())
}
