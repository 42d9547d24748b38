//! Real servers that tell the client who answered: a TCP identity-and-echo
//! server, a minimal HTTP/1.1 server and a UDP identity server; and the
//! recorders a mirroring test puts where the shadow is ([`TcpRecorder`],
//! [`UdpRecorder`]), which keep every request they get.
//!
//! Each binds its socket inside a namespace ([`Netns::enter`]) and serves
//! it from background threads of this process. Each counts what it served
//! and records the peer addresses it saw, so a test can check what the
//! backend side observed (SNAT: the edge's address; DNAT: the client's).
//! Dropping a server (or [`TcpIdentityServer::stop`] etc.) stops its
//! threads within about [`POLL`] and closes every socket.
//!
//! ```no_run
//! use std::net::{Ipv4Addr, SocketAddrV4};
//! use splitter_tests::{netns::Netns, servers::HttpServer};
//! # fn main() -> anyhow::Result<()> {
//! let ns = Netns::new("spl-doc-back")?;
//! let blue = HttpServer::start(&ns, SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080), "blue")?;
//! println!("{} requests so far", blue.stats().requests());
//! # Ok(()) }
//! ```
use std::{
    collections::BTreeSet,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// How often idle server threads look at the stop flag.
pub const POLL: Duration = Duration::from_millis(50);
/// A server runs at most this long, even if nobody stops it.
pub const MAX_LIFETIME: Duration = Duration::from_secs(2 * 3600);
/// Longest a reply may take to write before the connection is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest HTTP request head (request line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Most peer addresses remembered (the counters keep counting past it).
const MAX_PEERS: usize = 1_000_000;

/// What a server saw. Shared between the server's threads and the test.
#[derive(Debug, Default)]
pub struct ServerStats {
    accepted: AtomicU64,
    requests: AtomicU64,
    active: AtomicU64,
    peers: Mutex<Vec<SocketAddrV4>>,
}

impl ServerStats {
    /// TCP connections accepted (0 for UDP).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// HTTP requests or UDP datagrams being answered; for the TCP identity
    /// server, identity lines (= connections). Counted before the answer is
    /// sent, so a client that has its answer sees it counted.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// TCP connections open right now.
    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    /// Every peer address seen, in order (one per connection or datagram).
    pub fn peers(&self) -> Vec<SocketAddrV4> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The distinct peer IP addresses seen.
    pub fn peer_ips(&self) -> BTreeSet<Ipv4Addr> {
        self.peers().iter().map(|p| *p.ip()).collect()
    }

    fn record_peer(&self, peer: SocketAddrV4) {
        let mut p = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < MAX_PEERS {
            p.push(peer);
        }
    }
}

/// The threads of one server and their stop flag; joins them on drop.
#[derive(Debug)]
struct Background {
    stop: Arc<AtomicBool>,
    main: Option<JoinHandle<()>>,
}

impl Background {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.main.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

fn v4(a: SocketAddr) -> Result<SocketAddrV4> {
    match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => bail!("unexpected IPv6 peer {a}"),
    }
}

/// Binds a TCP listener inside `ns`.
fn bind_tcp(ns: &Netns, addr: SocketAddrV4) -> Result<TcpListener> {
    let l = ns
        .enter(|| TcpListener::bind(addr))?
        .with_context(|| format!("binding TCP {addr} in namespace {}", ns.name()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Accepts connections until stopped, handing each to `handle` on its own
/// thread; joins the connection threads before returning.
fn spawn_acceptor<H>(listener: TcpListener, stats: Arc<ServerStats>, handle: H) -> Background
where
    H: Fn(TcpStream, SocketAddrV4, &AtomicBool, &ServerStats) + Send + Sync + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = Arc::new(handle);
    let main = thread::spawn(move || {
        let started = Instant::now();
        let mut conns: Vec<JoinHandle<()>> = Vec::new();
        while !flag.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let Ok(peer) = v4(peer) else { continue };
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    stats.record_peer(peer);
                    if stream.set_nonblocking(false).is_err()
                        || stream.set_read_timeout(Some(POLL)).is_err()
                        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
                    {
                        continue;
                    }
                    let (flag, stats, handle) =
                        (Arc::clone(&flag), Arc::clone(&stats), Arc::clone(&handle));
                    conns.retain(|h| !h.is_finished());
                    conns.push(thread::spawn(move || {
                        stats.active.fetch_add(1, Ordering::Relaxed);
                        handle(stream, peer, &flag, &stats);
                        stats.active.fetch_sub(1, Ordering::Relaxed);
                    }));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(2))
                }
                Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        }
        flag.store(true, Ordering::Relaxed);
        for h in conns {
            let _ = h.join();
        }
    });
    Background {
        stop,
        main: Some(main),
    }
}

/// Reads into `buf`; `Ok(None)` means "nothing yet, look at the stop flag".
fn read_some(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    match s.read(buf) {
        Ok(n) => Ok(Some(n)),
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Sends `"<name> <peer_ip>:<peer_port>\n"` on accept, then echoes.
///
/// A long-lived connection can send every few milliseconds and check the
/// echo, which proves the connection survives whatever the test changes.
#[derive(Debug)]
pub struct TcpIdentityServer {
    addr: SocketAddrV4,
    name: String,
    stats: Arc<ServerStats>,
    bg: Background,
}

impl TcpIdentityServer {
    /// Binds `addr` in `ns` and starts serving.
    ///
    /// # Errors
    /// The address could not be bound (not on an interface of `ns`, in use).
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str) -> Result<Self> {
        let listener = bind_tcp(ns, addr)?;
        let stats = Arc::new(ServerStats::default());
        let id = name.to_string();
        let bg = spawn_acceptor(
            listener,
            Arc::clone(&stats),
            move |mut s, peer, stop, stats| {
                // Count first: a client holding the answer must see it counted.
                stats.requests.fetch_add(1, Ordering::Relaxed);
                if s.write_all(format!("{id} {peer}\n").as_bytes()).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Relaxed) {
                    match read_some(&mut s, &mut buf) {
                        Ok(Some(0)) | Err(_) => break,
                        Ok(Some(n)) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Ok(None) => {}
                    }
                }
            },
        );
        Ok(Self {
            addr,
            name: name.to_string(),
            stats,
            bg,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The identity it announces.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.stats.accepted()
    }

    /// Counters and peers.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops serving and closes every connection.
    pub fn stop(mut self) {
        self.bg.stop();
    }
}

/// The head of an HTTP/1.x request, as far as this server cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The request target, e.g. `/`.
    pub path: String,
    /// Whether the connection stays open after the answer.
    pub keep_alive: bool,
    /// Bytes of body that follow the head.
    pub content_length: usize,
}

/// Parses a request head (everything before the blank line).
///
/// # Errors
/// Not an HTTP/1.x request line, or a malformed `Content-Length`.
pub fn parse_request_head(head: &str) -> Result<RequestHead> {
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        bail!("bad request line {line:?}");
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        v => bail!("unsupported version {v:?}"),
    };
    let mut keep_alive = http11;
    let mut content_length = 0;
    for h in lines {
        let Some((k, v)) = h.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("connection") {
            if v.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if k.eq_ignore_ascii_case("content-length") {
            content_length = v
                .parse()
                .with_context(|| format!("bad Content-Length {v:?}"))?;
        }
    }
    Ok(RequestHead {
        method: method.to_string(),
        path: path.to_string(),
        keep_alive,
        content_length,
    })
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// A minimal HTTP/1.1 server: `GET` anything answers 200 with the body
/// `"<name> <peer_ip>\n"`, except `GET /status/NNN`, which answers status
/// NNN (for health checks). Keep-alive and `Connection: close` are honoured.
#[derive(Debug)]
pub struct HttpServer {
    addr: SocketAddrV4,
    name: String,
    stats: Arc<ServerStats>,
    bg: Background,
}

impl HttpServer {
    /// Binds `addr` in `ns` and starts serving.
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str) -> Result<Self> {
        let listener = bind_tcp(ns, addr)?;
        let stats = Arc::new(ServerStats::default());
        let id = name.to_string();
        let bg = spawn_acceptor(listener, Arc::clone(&stats), move |s, peer, stop, stats| {
            serve_http(s, peer, &id, stop, stats);
        });
        Ok(Self {
            addr,
            name: name.to_string(),
            stats,
            bg,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The identity it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests()
    }

    /// Counters and peers.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops serving and closes every connection.
    pub fn stop(mut self) {
        self.bg.stop();
    }
}

fn serve_http(
    mut s: TcpStream,
    peer: SocketAddrV4,
    name: &str,
    stop: &AtomicBool,
    stats: &ServerStats,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        // One request: read until the head is complete.
        let Some(end) = find_head_end(&buf) else {
            if buf.len() > MAX_HEAD {
                let _ = s.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
                return;
            }
            match read_some(&mut s, &mut chunk) {
                Ok(Some(0)) | Err(_) => return,
                Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
                Ok(None) => {}
            }
            continue;
        };
        let head = match parse_request_head(&String::from_utf8_lossy(&buf[..end - 4])) {
            Ok(h) => h,
            Err(_) => {
                let _ = s.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                );
                return;
            }
        };
        // Skip the body, if any (bounded by the stop flag and read timeouts).
        let mut body_left = head.content_length.saturating_sub(buf.len() - end);
        buf.drain(..(end + head.content_length).min(buf.len()));
        while body_left > 0 && !stop.load(Ordering::Relaxed) {
            match read_some(&mut s, &mut chunk[..body_left.min(4096)]) {
                Ok(Some(0)) | Err(_) => return,
                Ok(Some(n)) => body_left -= n,
                Ok(None) => {}
            }
        }
        let forced = head
            .path
            .strip_prefix("/status/")
            .and_then(|c| c.parse::<u16>().ok())
            .filter(|c| (100..=599).contains(c));
        let (status, body) = match (head.method.as_str(), forced) {
            ("GET", Some(code)) => (format!("{code} Forced"), format!("{name} {code}\n")),
            ("GET", None) => ("200 OK".to_string(), format!("{name} {}\n", peer.ip())),
            _ => ("405 Method Not Allowed".to_string(), String::new()),
        };
        let conn = if head.keep_alive {
            "keep-alive"
        } else {
            "close"
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
            body.len()
        );
        // Count first: a client holding the answer must see it counted.
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if s.write_all(resp.as_bytes()).is_err() {
            return;
        }
        if !head.keep_alive {
            return;
        }
    }
}

/// Answers each datagram with `"<name> <peer_ip>:<peer_port> <payload>"`.
#[derive(Debug)]
pub struct UdpIdentityServer {
    addr: SocketAddrV4,
    name: String,
    stats: Arc<ServerStats>,
    bg: Background,
}

impl UdpIdentityServer {
    /// Binds `addr` in `ns` and starts serving.
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str) -> Result<Self> {
        let sock = ns
            .enter(|| UdpSocket::bind(addr))?
            .with_context(|| format!("binding UDP {addr} in namespace {}", ns.name()))?;
        sock.set_read_timeout(Some(POLL))?;
        let stats = Arc::new(ServerStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, st, id) = (Arc::clone(&stop), Arc::clone(&stats), name.to_string());
        let main = thread::spawn(move || {
            let started = Instant::now();
            let mut buf = [0u8; 65536];
            while !flag.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(peer) = v4(peer) else { continue };
                st.record_peer(peer);
                let mut reply = format!("{id} {peer} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                // Count first: a client holding the answer must see it counted.
                st.requests.fetch_add(1, Ordering::Relaxed);
                let _ = sock.send_to(&reply, peer);
            }
        });
        Ok(Self {
            addr,
            name: name.to_string(),
            stats,
            bg: Background {
                stop,
                main: Some(main),
            },
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }

    /// The identity it answers with.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Datagrams answered so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests()
    }

    /// Counters and peers.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops serving and closes the socket.
    pub fn stop(mut self) {
        self.bg.stop();
    }
}

/// How a recorder answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recording {
    /// Keeps each request and answers it with `"<name> "` and its bytes.
    Answers,
    /// TCP: accepts and never reads (holds each connection until stopped).
    /// UDP: keeps each datagram and never answers.
    Stalls,
}

/// Requests a recorder kept, in arrival order.
type Kept = Arc<Mutex<Vec<Vec<u8>>>>;

fn kept(k: &Kept) -> Vec<Vec<u8>> {
    k.lock().map(|g| g.clone()).unwrap_or_default()
}

/// A TCP server that keeps each connection's bytes up to the client's end
/// (its half-close), then answers them (or stalls, see [`Recording`]).
#[derive(Debug)]
pub struct TcpRecorder {
    got: Kept,
    stats: Arc<ServerStats>,
    bg: Background,
}

impl TcpRecorder {
    /// Binds `addr` in `ns` and starts recording.
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str, how: Recording) -> Result<Self> {
        let listener = bind_tcp(ns, addr)?;
        let stats = Arc::new(ServerStats::default());
        let got: Kept = Arc::default();
        let (g, id) = (Arc::clone(&got), name.to_string());
        let bg = spawn_acceptor(
            listener,
            Arc::clone(&stats),
            move |mut s, _, stop, stats| {
                let mut bytes = Vec::new();
                let mut buf = [0u8; 16384];
                while !stop.load(Ordering::Relaxed) {
                    if how == Recording::Stalls {
                        thread::sleep(POLL);
                        continue;
                    }
                    match read_some(&mut s, &mut buf) {
                        Ok(Some(0)) => {
                            let mut answer = format!("{id} ").into_bytes();
                            answer.extend_from_slice(&bytes);
                            if let Ok(mut g) = g.lock() {
                                g.push(bytes);
                            }
                            stats.requests.fetch_add(1, Ordering::Relaxed);
                            let _ = s.write_all(&answer);
                            return;
                        }
                        Ok(Some(n)) => bytes.extend_from_slice(&buf[..n]),
                        Ok(None) => {}
                        Err(_) => return,
                    }
                }
            },
        );
        Ok(Self { got, stats, bg })
    }

    /// Each connection's bytes, for the connections that ended their side.
    pub fn got(&self) -> Vec<Vec<u8>> {
        kept(&self.got)
    }

    /// Counters and peers.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Stops and closes every connection.
    pub fn stop(mut self) {
        self.bg.stop();
    }
}

/// A UDP server that keeps every datagram and answers it (or not, see
/// [`Recording`]). Its receive buffer (8 MiB) is far larger than a test's
/// burst, so that a recorder thread descheduled on a busy machine loses none.
#[derive(Debug)]
pub struct UdpRecorder {
    got: Kept,
    bg: Background,
}

impl UdpRecorder {
    /// Binds `addr` in `ns` and starts recording.
    ///
    /// # Errors
    /// The address could not be bound.
    pub fn start(ns: &Netns, addr: SocketAddrV4, name: &str, how: Recording) -> Result<Self> {
        let sock = ns
            .enter(|| -> std::io::Result<UdpSocket> {
                let s = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::DGRAM,
                    Some(socket2::Protocol::UDP),
                )?;
                s.set_recv_buffer_size(8 << 20)?;
                s.bind(&socket2::SockAddr::from(addr))?;
                Ok(s.into())
            })?
            .with_context(|| format!("binding UDP {addr} in namespace {}", ns.name()))?;
        sock.set_read_timeout(Some(POLL))?;
        let got: Kept = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (g, flag, id) = (Arc::clone(&got), Arc::clone(&stop), name.to_string());
        let main = thread::spawn(move || {
            let started = Instant::now();
            let mut buf = [0u8; 65536];
            while !flag.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if let Ok(mut g) = g.lock() {
                    g.push(buf[..n].to_vec());
                }
                if how == Recording::Answers {
                    let mut reply = format!("{id} ").into_bytes();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = sock.send_to(&reply, peer);
                }
            }
        });
        Ok(Self {
            got,
            bg: Background {
                stop,
                main: Some(main),
            },
        })
    }

    /// Every datagram so far.
    pub fn got(&self) -> Vec<Vec<u8>> {
        kept(&self.got)
    }

    /// Stops and closes the socket.
    pub fn stop(mut self) {
        self.bg.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http11_defaults_to_keep_alive() -> Result<()> {
        let h = parse_request_head("GET /x HTTP/1.1\r\nHost: a")?;
        assert_eq!(
            h,
            RequestHead {
                method: "GET".into(),
                path: "/x".into(),
                keep_alive: true,
                content_length: 0
            }
        );
        Ok(())
    }

    #[test]
    fn connection_header_wins() -> Result<()> {
        assert!(!parse_request_head("GET / HTTP/1.1\r\nConnection: Close")?.keep_alive);
        assert!(parse_request_head("GET / HTTP/1.0\r\nconnection: keep-alive")?.keep_alive);
        assert!(!parse_request_head("GET / HTTP/1.0")?.keep_alive);
        Ok(())
    }

    #[test]
    fn content_length_and_garbage() -> Result<()> {
        assert_eq!(
            parse_request_head("POST / HTTP/1.1\r\nContent-Length: 12")?.content_length,
            12
        );
        assert!(parse_request_head("POST / HTTP/1.1\r\nContent-Length: x").is_err());
        assert!(parse_request_head("hello").is_err());
        assert!(parse_request_head("GET / HTTP/2").is_err());
        Ok(())
    }

    #[test]
    fn head_end_is_after_blank_line() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
    }
}
