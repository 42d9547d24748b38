//! The API socket against stuck or hostile clients: idle connections and
//! half-sent requests are closed by the daemon after its header timeout
//! (10 s), a body that never comes is answered 408, connections past the
//! bound (256) are refused with 503 while the daemon keeps answering
//! ordinary requests, and an oversized body is answered 413 without
//! changing the running config; a client that pipelines requests and
//! never reads the answers is cut off once a write stalls for 10 s; the
//! metrics endpoint refuses scrape
//! connections past its bound (64) with 503 and serves again once they
//! close. Real daemon, raw Unix-socket and TCP clients.
//!
//! ```text
//! cargo test -p splitter-tests --test api_limits -- --include-ignored --test-threads=1
//! ```
use std::{
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use splitter_tests::{
    splitter::{Affinity, Daemon, Mode, blue_green_config},
    topology::{Topology, TopologyOptions},
};

/// The daemon's header (and idle keep-alive) timeout.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The daemon's bound on open API connections.
const MAX_CONNECTIONS: usize = 256;
/// Idle and half-sent connections held at once: under the bound, so the
/// daemon must keep answering the CLI meanwhile.
const IDLE: usize = 200;
const HALF_SENT: usize = 50;
/// Connections opened to go past the bound.
const OVER: usize = 300;
/// How long a read waits for an answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection the test holds open looks like now, without waiting.
#[derive(Debug, PartialEq)]
enum Seen {
    /// Nothing to read and no EOF: the daemon keeps it open.
    Open,
    /// EOF or an error, after what the daemon sent (maybe nothing).
    Closed(String),
}

/// Reads what `s` has without blocking, down to EOF if the daemon closed it.
fn look(s: &mut UnixStream) -> Result<Seen> {
    s.set_nonblocking(true)?;
    look_nonblocking(s)
}

/// [`look`] for any stream already set non-blocking.
fn look_nonblocking(s: &mut impl Read) -> Result<Seen> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ensure!(out.is_empty(), "a partial answer: {out:?}");
                return Ok(Seen::Open);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    Ok(Seen::Closed(String::from_utf8_lossy(&out).into_owned()))
}

/// A connection to the API socket that has written `prefix`.
fn open(socket: &Path, prefix: &[u8]) -> Result<UnixStream> {
    let mut s = UnixStream::connect(socket).context("connecting to the API socket")?;
    s.write_all(prefix)?;
    Ok(s)
}

/// One request on its own connection: status and body of the answer.
fn request(socket: &Path, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: splitter\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    // A refused body may be left unread, and the write then fail.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                bail!("{method} {path}: no complete answer within {READ_TIMEOUT:?}")
            }
            Err(_) => break,
        }
    }
    let out = String::from_utf8_lossy(&out).into_owned();
    parse_answer(&out).with_context(|| format!("{method} {path}: {out:?}"))
}

/// The status and body of an HTTP/1.1 answer.
fn parse_answer(out: &str) -> Result<(u16, String)> {
    let (head, body) = out.split_once("\r\n\r\n").context("not an HTTP answer")?;
    let status = head
        .split(' ')
        .nth(1)
        .context("no status")?
        .parse()
        .context("bad status")?;
    Ok((status, body.to_string()))
}

/// The `error` of a JSON error body.
fn error_of(body: &str) -> Result<String> {
    let v: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("not JSON: {body:?}"))?;
    v["error"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no error in {body}"))
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn idle_and_half_sent_connections_are_closed_after_the_header_timeout() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let socket = d.socket();

    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..IDLE {
        held.push(("idle", open(socket, b"")?));
    }
    for _ in 0..HALF_SENT {
        held.push(("half-sent", open(socket, b"GET /v1/sta")?));
    }
    let mut stalled = open(
        socket,
        b"PUT /v1/services/web/weights HTTP/1.1\r\nHost: splitter\r\nContent-Length: 100\r\n\r\n{",
    )?;

    // The daemon still answers others meanwhile, and keeps them all open.
    let status = d.status_json()?;
    ensure!(status["services"][0]["name"] == "web", "status: {status}");
    let (code, _) = request(socket, "GET", "/v1/config", b"")?;
    ensure!(code == 200, "GET /v1/config answered {code}");
    ensure!(
        started.elapsed() < HEADER_TIMEOUT / 2,
        "opening took {:?}: too long to check they are open before the timeout",
        started.elapsed()
    );
    for (what, s) in &mut held {
        ensure!(look(s)? == Seen::Open, "a {what} connection closed early");
    }

    // After the timeout (bounded wait) the daemon closed every one.
    let deadline = started + HEADER_TIMEOUT + Duration::from_secs(8);
    loop {
        let mut open_now = 0;
        for (_, s) in &mut held {
            if look(s)? == Seen::Open {
                open_now += 1;
            }
        }
        if open_now == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{open_now} of {} connections still open {:?} after they opened",
            held.len(),
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    ensure!(
        started.elapsed() >= HEADER_TIMEOUT - Duration::from_secs(1),
        "closed after {:?}, before the header timeout",
        started.elapsed()
    );
    // The body that never came was answered 408, in the usual shape.
    stalled.set_read_timeout(Some(READ_TIMEOUT))?;
    stalled.set_nonblocking(false)?;
    let mut out = String::new();
    let _ = stalled.read_to_string(&mut out);
    let (code, body) = parse_answer(&out).with_context(|| format!("stalled body: {out:?}"))?;
    ensure!(code == 408, "a body that never came: {code} {body}");
    ensure!(error_of(&body)?.contains("did not arrive"), "{body}");

    let status = d.status_json()?;
    ensure!(status["services"][0]["name"] == "web", "status: {status}");
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn connections_past_the_bound_are_refused_and_the_daemon_recovers() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let socket = d.socket();

    let mut held = (0..OVER)
        .map(|_| open(socket, b""))
        .collect::<Result<Vec<_>>>()?;
    // Refusals are immediate; give the daemon a moment to send them.
    std::thread::sleep(Duration::from_millis(500));
    let (mut admitted, mut refused) = (0, Vec::new());
    for s in &mut held {
        match look(s)? {
            Seen::Open => admitted += 1,
            Seen::Closed(answer) => refused.push(answer),
        }
    }
    ensure!(
        admitted <= MAX_CONNECTIONS && refused.len() >= OVER - MAX_CONNECTIONS,
        "{OVER} connections: {admitted} kept open, {} refused (bound {MAX_CONNECTIONS})",
        refused.len()
    );
    ensure!(
        admitted >= MAX_CONNECTIONS - 8,
        "only {admitted} of {OVER} admitted under a bound of {MAX_CONNECTIONS}"
    );
    let (code, body) = parse_answer(&refused[0])
        .with_context(|| format!("a refused connection got {:?}", refused[0]))?;
    ensure!(code == 503, "a refused connection got {code}: {body}");
    ensure!(
        error_of(&body)?.contains("connections open"),
        "refusal: {body}"
    );
    let log = d.log();
    ensure!(
        log.matches("refusing new ones").count() == 1,
        "the refusals were not logged exactly once: {log}"
    );

    // Once they close, an ordinary request goes through (bounded wait).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match d.status_json() {
            Ok(s) if s["services"][0]["name"] == "web" => break,
            r if Instant::now() >= deadline => bail!("status after the burst: {r:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn an_oversized_body_is_413_and_changes_nothing() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let socket = d.socket();

    let (code, before) = request(socket, "GET", "/v1/config", b"")?;
    ensure!(code == 200, "GET /v1/config: {code} {before}");
    // Valid JSON that would move every connection to green, padded past 64 KiB.
    let big = format!(
        r#"{{"weights": {{"blue": 0, "green": 100}}, "pad": "{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let (code, body) = request(socket, "PUT", "/v1/services/web/weights", big.as_bytes())?;
    ensure!(code == 413, "an oversized body: {code} {body}");
    ensure!(error_of(&body)?.contains("larger than"), "{body}");
    let (code, after) = request(socket, "GET", "/v1/config", b"")?;
    ensure!(code == 200, "GET /v1/config: {code} {after}");
    ensure!(
        before == after,
        "the running config changed:\n{before}\n{after}"
    );
    Ok(())
}

/// The metrics endpoint's bound on open connections.
const MAX_METRICS_CONNECTIONS: usize = 64;
/// Scrape connections opened to go past it.
const METRICS_OVER: usize = 90;
/// The default `[metrics] listen`.
const METRICS_LISTEN: &str = "127.0.0.1:9470";

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn metrics_connections_past_the_bound_get_503_and_scrapes_resume() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let addr: std::net::SocketAddr = METRICS_LISTEN.parse()?;
    // Sockets made inside the edge namespace stay there.
    let mut held = topo.edge.enter(|| -> Result<Vec<std::net::TcpStream>> {
        (0..METRICS_OVER)
            .map(|_| {
                std::net::TcpStream::connect_timeout(&addr, READ_TIMEOUT)
                    .context("connecting to the metrics endpoint")
            })
            .collect()
    })??;
    std::thread::sleep(Duration::from_millis(500));
    let (mut admitted, mut refused) = (0, Vec::new());
    for s in &mut held {
        s.set_nonblocking(true)?;
        match look_nonblocking(s)? {
            Seen::Open => admitted += 1,
            Seen::Closed(answer) => refused.push(answer),
        }
    }
    ensure!(
        admitted <= MAX_METRICS_CONNECTIONS
            && refused.len() >= METRICS_OVER - MAX_METRICS_CONNECTIONS,
        "{METRICS_OVER} connections: {admitted} kept open, {} refused (bound {MAX_METRICS_CONNECTIONS})",
        refused.len()
    );
    let (code, body) = parse_answer(&refused[0])
        .with_context(|| format!("a refused connection got {:?}", refused[0]))?;
    ensure!(
        code == 503 && body.contains("too many metrics connections"),
        "a refused scrape connection got {code}: {body}"
    );
    // The API is another listener: it answers meanwhile.
    ensure!(
        d.status_json()?["services"][0]["name"] == "web",
        "status while the metrics endpoint is full"
    );

    // Once they close, a scrape goes through (bounded wait).
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let scraped = topo.edge.enter(|| -> Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, READ_TIMEOUT)?;
            s.set_read_timeout(Some(READ_TIMEOUT))?;
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: splitter\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })?;
        match scraped {
            Ok(out) if out.starts_with("HTTP/1.1 200") && out.contains("splitter_") => break,
            r if Instant::now() >= deadline => bail!("scrape after the burst: {r:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    Ok(())
}

/// Requests pipelined on one connection whose answers the test never reads.
const PIPELINED: usize = 5000;

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn a_client_that_never_reads_its_answers_is_cut_off_after_the_write_timeout() -> Result<()> {
    let topo = Topology::new(TopologyOptions::default())?;
    let d = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let mut s = UnixStream::connect(d.socket())?;
    s.set_nonblocking(true)?;
    let one = b"GET /v1/status HTTP/1.1\r\nHost: splitter\r\n\r\n";
    let all: Vec<u8> = one.repeat(PIPELINED);
    // Write what the socket takes (bounded in time): far more answers
    // than the socket buffers hold, so the daemon's writes stall.
    let mut written = 0;
    let deadline = Instant::now() + Duration::from_secs(3);
    while written < all.len() && Instant::now() < deadline {
        match s.write(&all[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => bail!("writing pipelined requests: {e}"),
        }
    }
    let requests = written / one.len();
    ensure!(requests >= 1000, "only {requests} requests went out");
    // The CLI is answered meanwhile: one stalled connection holds no lock.
    ensure!(d.status_json()?["services"][0]["name"] == "web", "status");
    std::thread::sleep(HEADER_TIMEOUT + Duration::from_secs(3));
    // Now read: the daemon must have given up on this connection, so what
    // is buffered ends in EOF well before every request is answered.
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 65536];
    let ended = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                break false;
            }
            Err(_) => break true,
        }
    };
    let answered = String::from_utf8_lossy(&got)
        .matches("HTTP/1.1 200")
        .count();
    ensure!(
        ended && answered < requests,
        "a connection that never read was not cut off: {answered} of {requests} answered, EOF: {ended}"
    );
    ensure!(
        d.status_json()?["services"][0]["name"] == "web",
        "status after"
    );
    Ok(())
}
