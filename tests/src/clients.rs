//! Real clients, run inside the client namespace: one-shot TCP identity
//! connections (alone or many in parallel), HTTP GETs, a long-lived echo
//! connection that notices any disruption, and UDP requests.
//!
//! They talk to the servers of [`crate::servers`] and return what the
//! backend said about itself (its name) and about the client (the peer
//! address it saw). Every call has a timeout; parallel helpers use
//! [`PARALLELISM`] threads.
//!
//! ```no_run
//! use std::time::Duration;
//! use splitter_tests::{clients, topology::{self, Topology, TopologyOptions}};
//! # fn main() -> anyhow::Result<()> {
//! let topo = Topology::new(TopologyOptions::default())?;
//! let r = clients::tcp_identity_many(&topo.cli, topology::vip(), 100, &[], Duration::from_secs(2))?;
//! println!("blue {} green {} errors {}", r.count("blue"), r.count("green"), r.errors);
//! # Ok(()) }
//! ```
use std::{
    collections::BTreeMap,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::netns::Netns;

/// Threads the `*_many` helpers use.
pub const PARALLELISM: usize = 4;
/// Default timeout of [`http_get`].
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a [`LongLivedConn`] sends.
pub const LONG_LIVED_INTERVAL: Duration = Duration::from_millis(50);
/// A [`LongLivedConn`] stops by itself after this long.
pub const LONG_LIVED_MAX: Duration = Duration::from_secs(30 * 60);
/// Error messages a [`ManyResult`] keeps.
const ERROR_SAMPLES: usize = 10;

/// What a TCP identity server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The server's name (the version, e.g. `blue`).
    pub name: String,
    /// The client address the backend saw (the edge's in SNAT mode).
    pub peer: SocketAddrV4,
}

/// Parses `"<name> <ip>:<port>"`.
///
/// # Errors
/// Any other shape.
pub fn parse_identity(line: &str) -> Result<Identity> {
    let line = line.trim_end();
    let (name, peer) = line
        .split_once(' ')
        .with_context(|| format!("bad identity line {line:?}"))?;
    let peer = peer
        .parse()
        .with_context(|| format!("bad peer address in identity line {line:?}"))?;
    Ok(Identity {
        name: name.to_string(),
        peer,
    })
}

/// A TCP connection to `to` from `bind` (any port), within `timeout`.
/// Call it inside the client namespace.
fn connect(to: SocketAddrV4, bind: Option<Ipv4Addr>, timeout: Duration) -> Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    if let Some(ip) = bind {
        s.bind(&SockAddr::from(SocketAddrV4::new(ip, 0)))
            .with_context(|| format!("binding {ip}"))?;
    }
    s.connect_timeout(&SockAddr::from(to), timeout)
        .with_context(|| format!("connecting to {to}"))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads one `\n`-terminated line (at most 512 bytes) before `deadline`.
fn read_line(s: &mut TcpStream, deadline: Instant) -> Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 512 {
        if Instant::now() >= deadline {
            bail!(
                "timed out reading a line (got {:?})",
                String::from_utf8_lossy(&line)
            );
        }
        match s.read(&mut b) {
            Ok(0) => bail!(
                "connection closed before a full line (got {:?})",
                String::from_utf8_lossy(&line)
            ),
            Ok(_) if b[0] == b'\n' => return Ok(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading a line"),
        }
    }
    bail!("line longer than 512 bytes")
}

/// One connection without entering a namespace (the caller has).
fn tcp_identity_here(
    vip: SocketAddrV4,
    bind: Option<Ipv4Addr>,
    timeout: Duration,
) -> Result<Identity> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(vip, bind, timeout)?;
    let line = read_line(&mut s, deadline)?;
    // The client closes first (its side keeps TIME_WAIT, not the backend's).
    drop(s);
    parse_identity(&line)
}

/// Connects to `vip` from `ns` (optionally from `bind_ip`), reads the
/// identity line and closes.
///
/// # Errors
/// Connect, read or parse failed, or `timeout` passed.
pub fn tcp_identity(
    ns: &Netns,
    vip: SocketAddrV4,
    bind_ip: Option<Ipv4Addr>,
    timeout: Duration,
) -> Result<Identity> {
    ns.enter(|| tcp_identity_here(vip, bind_ip, timeout))?
}

/// The outcome of many one-shot requests.
#[derive(Debug, Clone, Default)]
pub struct ManyResult {
    /// Successful answers per server name.
    pub per_name: BTreeMap<String, u64>,
    /// Successful answers per source address (`None`: the default source)
    /// and server name; for client-IP affinity checks.
    pub per_source: BTreeMap<Option<Ipv4Addr>, BTreeMap<String, u64>>,
    /// Failed requests.
    pub errors: u64,
    /// The first few error messages.
    pub error_samples: Vec<String>,
}

impl ManyResult {
    /// Answers from `name`.
    pub fn count(&self, name: &str) -> u64 {
        self.per_name.get(name).copied().unwrap_or(0)
    }

    /// All successful answers.
    pub fn ok(&self) -> u64 {
        self.per_name.values().sum()
    }

    fn add(&mut self, source: Option<Ipv4Addr>, r: Result<String>) {
        match r {
            Ok(name) => {
                *self
                    .per_source
                    .entry(source)
                    .or_default()
                    .entry(name.clone())
                    .or_default() += 1;
                *self.per_name.entry(name).or_default() += 1;
            }
            Err(e) => {
                self.errors += 1;
                if self.error_samples.len() < ERROR_SAMPLES {
                    self.error_samples.push(format!("{e:#}"));
                }
            }
        }
    }
}

/// Runs `one(source)` `n` times on [`PARALLELISM`] threads inside `ns`;
/// request `i` uses source `sources[i % len]` (none if empty).
fn many<F>(ns: &Netns, n: usize, sources: &[Ipv4Addr], one: F) -> Result<ManyResult>
where
    F: Fn(Option<Ipv4Addr>) -> Result<String> + Sync,
{
    let next = AtomicUsize::new(0);
    let result = Mutex::new(ManyResult::default());
    ns.enter(|| {
        // Threads spawned here start inside `ns` too.
        thread::scope(|s| {
            for _ in 0..PARALLELISM.min(n.max(1)) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let src = if sources.is_empty() {
                            None
                        } else {
                            Some(sources[i % sources.len()])
                        };
                        let r = one(src);
                        result.lock().unwrap_or_else(|e| e.into_inner()).add(src, r);
                    }
                });
            }
        });
    })?;
    Ok(result.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// `n` [`tcp_identity`] connections, [`PARALLELISM`] at a time, cycling
/// through `bind_ips` as source addresses (the default source if empty).
///
/// # Errors
/// Only if the namespace cannot be entered; failed connections are counted
/// in [`ManyResult::errors`].
pub fn tcp_identity_many(
    ns: &Netns,
    vip: SocketAddrV4,
    n: usize,
    bind_ips: &[Ipv4Addr],
    timeout: Duration,
) -> Result<ManyResult> {
    many(ns, n, bind_ips, |src| {
        tcp_identity_here(vip, src, timeout).map(|id| id.name)
    })
}

/// An HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body as text.
    pub body: String,
}

impl HttpResponse {
    /// The first word of the body: the server's name for [`crate::servers::HttpServer`].
    pub fn server_name(&self) -> &str {
        self.body.split_whitespace().next().unwrap_or_default()
    }
}

/// [`http_get`] from the calling thread's own network namespace (a
/// thread started inside [`Netns::enter`] is in that namespace).
///
/// # Errors
/// Connect, write or read failed, a bad answer, or `timeout` passed.
pub fn http_get_here(vip: SocketAddrV4, path: &str, timeout: Duration) -> Result<HttpResponse> {
    http_get_here_from(vip, None, path, timeout)
}

/// [`http_get_here`] from source address `bind` (`None`: the default).
fn http_get_here_from(
    vip: SocketAddrV4,
    bind: Option<Ipv4Addr>,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut s = connect(vip, bind, timeout)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            bail!("timed out waiting for the HTTP answer from {vip}");
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .with_context(|| format!("bad status line in {head:?}"))?;
            let len: Option<usize> = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            });
            let complete = match len {
                Some(len) => buf.len() >= end + len,
                None => false,
            };
            if complete || matches!(len, Some(0)) {
                let body_end = end + len.unwrap_or(0);
                return Ok(HttpResponse {
                    status,
                    body: String::from_utf8_lossy(&buf[end..body_end]).into_owned(),
                });
            }
        }
        if buf.len() > 1 << 20 {
            bail!("HTTP answer from {vip} larger than 1 MiB");
        }
        match s.read(&mut chunk) {
            Ok(0) => bail!(
                "connection closed before a complete HTTP answer (got {:?})",
                String::from_utf8_lossy(&buf)
            ),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("reading the HTTP answer from {vip}")),
        }
    }
}

/// `GET path` on a new connection (`Connection: close`), within
/// [`HTTP_TIMEOUT`].
///
/// # Errors
/// Connect, read or parse failed, or the timeout passed.
pub fn http_get(ns: &Netns, vip: SocketAddrV4, path: &str) -> Result<HttpResponse> {
    http_get_timeout(ns, vip, path, HTTP_TIMEOUT)
}

/// [`http_get`] with an explicit timeout.
///
/// # Errors
/// As [`http_get`].
pub fn http_get_timeout(
    ns: &Netns,
    vip: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> Result<HttpResponse> {
    ns.enter(|| http_get_here(vip, path, timeout))?
}

/// `n` [`http_get`]s, each on a new connection, [`PARALLELISM`] at a time.
/// A non-200 answer counts as an error.
///
/// # Errors
/// Only if the namespace cannot be entered.
pub fn http_get_many(
    ns: &Netns,
    vip: SocketAddrV4,
    path: &str,
    n: usize,
    timeout: Duration,
) -> Result<ManyResult> {
    many(ns, n, &[], |_| {
        let r = http_get_here(vip, path, timeout)?;
        if r.status != 200 {
            bail!("HTTP {} from {vip}: {:?}", r.status, r.body);
        }
        Ok(r.server_name().to_string())
    })
}

/// [`http_get_many`] from each of `sources` in turn (addresses of the
/// client namespace, e.g. from `Topology::add_client_addr`); the answers
/// per source are in [`ManyResult::per_source`].
///
/// # Errors
/// Entering `ns` failed.
pub fn http_get_many_from(
    ns: &Netns,
    vip: SocketAddrV4,
    path: &str,
    n: usize,
    sources: &[Ipv4Addr],
    timeout: Duration,
) -> Result<ManyResult> {
    many(ns, n, sources, |src| {
        let r = http_get_here_from(vip, src, path, timeout)?;
        if r.status != 200 {
            bail!("HTTP {} from {vip}: {:?}", r.status, r.body);
        }
        Ok(r.server_name().to_string())
    })
}

/// What a UDP identity server answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpReply {
    /// The server's name.
    pub name: String,
    /// The client address the backend saw.
    pub peer: SocketAddrV4,
    /// The payload it echoed.
    pub payload: String,
}

/// Sends `payload` to `vip` from a fresh socket in `ns` and waits up to
/// `timeout` for the answer. One datagram, no retry.
///
/// # Errors
/// No answer in time, or an answer of the wrong shape.
pub fn udp_request(
    ns: &Netns,
    vip: SocketAddrV4,
    payload: &str,
    timeout: Duration,
) -> Result<UdpReply> {
    ns.enter(|| -> Result<UdpReply> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(vip)?;
        s.set_read_timeout(Some(timeout))?;
        s.send(payload.as_bytes())
            .with_context(|| format!("sending to {vip}"))?;
        let mut buf = [0u8; 65536];
        let n = s
            .recv(&mut buf)
            .with_context(|| format!("no UDP answer from {vip} within {timeout:?}"))?;
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let mut parts = text.splitn(3, ' ');
        let (Some(name), Some(peer), rest) = (parts.next(), parts.next(), parts.next()) else {
            bail!("bad UDP answer {text:?}");
        };
        let peer = peer
            .parse()
            .with_context(|| format!("bad peer in UDP answer {text:?}"))?;
        Ok(UdpReply {
            name: name.to_string(),
            peer,
            payload: rest.unwrap_or_default().to_string(),
        })
    })?
}

/// What a [`LongLivedConn`] saw.
#[derive(Debug, Clone, Default)]
pub struct LongLivedReport {
    /// Messages sent.
    pub sent: u64,
    /// Messages whose echo came back intact.
    pub echoed: u64,
    /// What went wrong (reset, timeout, wrong echo); empty when all went well.
    /// The connection stops at its first failure.
    pub failures: Vec<String>,
}

#[derive(Debug, Default)]
struct LongLivedShared {
    sent: AtomicU64,
    echoed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

/// A connection that stays open, sending a short message every
/// [`LONG_LIVED_INTERVAL`] and checking its echo, until stopped. Any reset,
/// timeout or wrong echo is recorded: a test asserts there were none after
/// changing weights, draining, restarting the controller...
#[derive(Debug)]
pub struct LongLivedConn {
    identity: Identity,
    shared: Arc<LongLivedShared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LongLivedConn {
    /// Connects from `ns` to `vip` (a [`crate::servers::TcpIdentityServer`]
    /// behind it), reads the identity line and starts pinging. `timeout`
    /// bounds the connect and each echo.
    ///
    /// # Errors
    /// The connection or the identity line failed.
    pub fn start(ns: &Netns, vip: SocketAddrV4, timeout: Duration) -> Result<Self> {
        let (mut stream, identity) = ns.enter(|| -> Result<(TcpStream, Identity)> {
            let mut s = connect(vip, None, timeout)?;
            let line = read_line(&mut s, Instant::now() + timeout)?;
            Ok((s, parse_identity(&line)?))
        })??;
        let shared = Arc::new(LongLivedShared::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (sh, flag) = (Arc::clone(&shared), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let started = Instant::now();
            let mut seq: u64 = 0;
            let fail = |msg: String| {
                sh.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(msg)
            };
            while !flag.load(Ordering::Relaxed) && started.elapsed() < LONG_LIVED_MAX {
                seq += 1;
                let msg = format!("ping {seq}\n");
                if let Err(e) = stream.write_all(msg.as_bytes()) {
                    fail(format!(
                        "message {seq}: write failed after {:?}: {e}",
                        started.elapsed()
                    ));
                    return;
                }
                sh.sent.fetch_add(1, Ordering::Relaxed);
                let mut echo = vec![0u8; msg.len()];
                if let Err(e) = stream.read_exact(&mut echo) {
                    let what = match e.kind() {
                        ErrorKind::WouldBlock | ErrorKind::TimedOut => "timed out".to_string(),
                        ErrorKind::UnexpectedEof => "connection closed".to_string(),
                        _ => e.to_string(),
                    };
                    fail(format!(
                        "message {seq}: no echo ({what}) after {:?}",
                        started.elapsed()
                    ));
                    return;
                }
                if echo != msg.as_bytes() {
                    fail(format!(
                        "message {seq}: wrong echo {:?}",
                        String::from_utf8_lossy(&echo)
                    ));
                    return;
                }
                sh.echoed.fetch_add(1, Ordering::Relaxed);
                thread::sleep(LONG_LIVED_INTERVAL);
            }
        });
        Ok(Self {
            identity,
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// Who answered, and the address the backend saw.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The report so far (the connection keeps going).
    pub fn report(&self) -> LongLivedReport {
        LongLivedReport {
            sent: self.shared.sent.load(Ordering::Relaxed),
            echoed: self.shared.echoed.load(Ordering::Relaxed),
            failures: self
                .shared
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    /// Waits (bounded) until at least `n` echoes have come back in total.
    ///
    /// # Errors
    /// A failure happened or `timeout` passed first.
    pub fn wait_echoes(&self, n: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.report();
            if !r.failures.is_empty() {
                bail!("long-lived connection failed: {:?}", r.failures);
            }
            if r.echoed >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("only {} of {n} echoes within {timeout:?}", r.echoed);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops pinging, closes the connection and returns the final report.
    pub fn stop(mut self) -> LongLivedReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for LongLivedConn {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_line_parses() -> Result<()> {
        let id = parse_identity("blue 10.0.2.1:40000\n")?;
        assert_eq!(id.name, "blue");
        assert_eq!(
            id.peer,
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 2, 1), 40000)
        );
        assert!(parse_identity("blue").is_err());
        assert!(parse_identity("blue nowhere").is_err());
        Ok(())
    }

    #[test]
    fn many_result_counts() {
        let mut r = ManyResult::default();
        r.add(None, Ok("blue".into()));
        r.add(Some(Ipv4Addr::new(10, 0, 1, 100)), Ok("green".into()));
        r.add(None, Err(anyhow::anyhow!("reset")));
        assert_eq!(
            (r.count("blue"), r.count("green"), r.ok(), r.errors),
            (1, 1, 2, 1)
        );
        assert_eq!(r.error_samples, vec!["reset".to_string()]);
    }
}
