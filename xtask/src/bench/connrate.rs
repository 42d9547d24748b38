//! Connection rate: wrk with short connections (`Connection: close`, one
//! request per connection) from the client namespace against two nginx
//! servers in the backend namespace (blue 10.0.2.2:8080, green
//! 10.0.2.3:8080), through the edge namespace, six ways in every round:
//!
//! - `direct`: to blue's address, the edge's kernel forwarding, no NAT;
//! - `splitter`: the real daemon, service `web` on the VIP, 90/10, SNAT;
//! - `haproxy`: HAProxy `mode tcp` in the edge namespace on the VIP
//!   (added to the edge's `lo`), weights 90/10;
//! - `nftables`: DNAT with a `numgen random` 90/10 split (the backends
//!   route back through the edge);
//! - `splitter_mirrored`: splitter again, with 10% of the new flows
//!   mirrored to a third nginx (`shadow`, on port 8081 of the green
//!   addresses) through the edge's tee (the service is `read_only`): the
//!   cost of TCP shadow traffic beside the unmirrored row;
//! - `splitter_no_timewait`, a diagnostic: splitter again, with the
//!   backends keeping no TIME_WAIT (`net.ipv4.tcp_max_tw_buckets=0` in the
//!   backend namespace for that run), to show how much of splitter's gap is
//!   its SNAT ports meeting the backends' TIME_WAIT.
//!
//! wrk's requests/s is the connection rate; its latency percentiles come
//! with it. nginx's `stub_status` counters (read from inside the backend
//! namespace) give the share of connections that reached green.
//!
//! Every path in every round talks to a pair of backend addresses of its
//! own (both nginx servers listen on all of them): the backends keep each
//! closed connection in TIME_WAIT for a minute, and a later case whose SYN
//! reused such a 4-tuple would be slowed by the state an earlier case left
//! (the backend rejects it by PAWS and the client retransmits). SYN
//! retransmits (client) and PAWS rejects in TIME_WAIT (backends) are
//! counted per path.
//!
//! Diagnostics (environment): `SPLITTER_BENCH_CONN_SECS=N` runs wrk for N
//! seconds instead of [`DURATION_S`]; `SPLITTER_BENCH_CONN_PERF=DIR` records
//! a system-wide profile of every case ([`perf_case`]) and prints each
//! case's rate beside it; `SPLITTER_BENCH_CONN_DIAG=1` prints every counter
//! that moved during each case ([`all_counters`]) and `splitter status`.
use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use splitter_tests::{
    netns::parse_snmp,
    netns::{Child, Netns, on_path},
    splitter::{Affinity, Daemon, Mode, ServiceSpec, VersionSpec, blue_green_config, config_toml},
    topology::{BACKEND_PORT, EDGE_BACKEND_ADDR, Topology, TopologyOptions, VIP, VIP_PORT},
};

use super::edge_report::{ApiResults, ConnCase, ConnResults};

/// wrk's settings.
pub const DURATION_S: u64 = 3;

/// wrk's duration: [`DURATION_S`], or `SPLITTER_BENCH_CONN_SECS` (a
/// diagnostic: runs longer than the backends' 60 s TIME_WAIT divided by the
/// time one SNAT port range lasts show the steady state, where every SNAT
/// port a new flow can get is still in TIME_WAIT on its backend).
pub fn duration_s() -> u64 {
    std::env::var("SPLITTER_BENCH_CONN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(DURATION_S)
}
const CONNECTIONS: u32 = 32;
const THREADS: u32 = 1;
const BLUE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 2);
const GREEN: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 3);
/// Backend address pairs of the cases start at 10.0.2.FIRST_PAIR.
const FIRST_PAIR: u8 = 10;

/// The blue and green addresses of case `k` (round * paths + path).
fn pair(k: usize) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let b = FIRST_PAIR + 2 * k as u8;
    (
        std::net::Ipv4Addr::new(10, 0, 2, b),
        std::net::Ipv4Addr::new(10, 0, 2, b + 1),
    )
}
const NFT_TABLE: &str = "splitter_connbench";
/// Backend TIME_WAIT capacity, 0 for the diagnostic splitter path.
const TW_BUCKETS: &str = "net.ipv4.tcp_max_tw_buckets";
/// API weight flips timed.
pub const API_FLIPS: usize = 100;

/// Paths measured in every round.
pub const PATHS: usize = Path4::ALL.len();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path4 {
    Direct,
    Splitter,
    /// Splitter mirroring 10% of the new flows through its tee.
    SplitterMirrored,
    /// Diagnostic: splitter with `tcp_max_tw_buckets=0` on the backends.
    SplitterNoTw,
    Haproxy,
    Nftables,
}

impl Path4 {
    const ALL: [Path4; 6] = [
        Path4::Direct,
        Path4::Splitter,
        Path4::SplitterMirrored,
        Path4::SplitterNoTw,
        Path4::Haproxy,
        Path4::Nftables,
    ];
    fn id(self) -> &'static str {
        match self {
            Path4::Direct => "direct",
            Path4::Splitter => "splitter",
            Path4::SplitterMirrored => "splitter_mirrored",
            Path4::SplitterNoTw => "splitter_no_timewait",
            Path4::Haproxy => "haproxy",
            Path4::Nftables => "nftables",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Path4::Direct => "direct to a backend (forwarding, no NAT)",
            Path4::Splitter => "splitter, SNAT, 90/10",
            Path4::SplitterMirrored => "splitter, 90/10, 10% mirrored (TCP tee)",
            Path4::SplitterNoTw => "splitter; backends keep no TIME_WAIT",
            Path4::Haproxy => "HAProxy mode tcp, 90/10",
            Path4::Nftables => "nftables DNAT, numgen 90/10",
        }
    }
}

/// The programs this section runs; a clear error naming what is missing.
pub fn check_tools() -> Result<()> {
    let missing: Vec<&str> = ["nginx", "wrk", "haproxy", "nft"]
        .into_iter()
        .filter(|p| !on_path(p) && !Path::new("/usr/sbin").join(p).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "not installed: {} (`cargo xtask bench` installs them with apt-get)",
            missing.join(", ")
        );
    }
    Ok(())
}

fn tool(name: &str) -> String {
    let sbin = Path::new("/usr/sbin").join(name);
    if !on_path(name) && sbin.is_file() {
        sbin.to_string_lossy().into_owned()
    } else {
        name.to_string()
    }
}

/// An nginx server in the backend namespace, stopped on drop. One process
/// (`master_process off`): a master's workers would outlive a killed master.
struct Nginx {
    child: Child,
    addr: SocketAddrV4,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.terminate(Duration::from_secs(5));
    }
}

fn nginx_conf(dir: &Path, name: &str, addr: SocketAddrV4, more: &[std::net::Ipv4Addr]) -> String {
    let d = dir.display();
    let more: String = more
        .iter()
        .map(|a| format!("    listen {a}:{} backlog=4096;\n", addr.port()))
        .collect();
    format!(
        "worker_processes 1;
master_process off;
daemon off;
pid {d}/{name}.pid;
error_log {d}/{name}.err warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {d}/{name}-body;
  proxy_temp_path {d}/{name}-proxy;
  fastcgi_temp_path {d}/{name}-fastcgi;
  uwsgi_temp_path {d}/{name}-uwsgi;
  scgi_temp_path {d}/{name}-scgi;
  server {{
    listen {addr} backlog=4096;
{more}    location = /nginx_status {{ stub_status; }}
    location / {{ return 200 \"{name}\\n\"; }}
  }}
}}
"
    )
}

impl Nginx {
    /// Listens on `addr` and on `more` addresses (same port); `stub_status` on `addr`.
    fn start(
        back: &Netns,
        dir: &Path,
        name: &str,
        addr: SocketAddrV4,
        more: &[std::net::Ipv4Addr],
    ) -> Result<Self> {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, nginx_conf(dir, name, addr, more))?;
        let child = back.spawn(&tool("nginx"), &["-c", &conf.to_string_lossy()])?;
        let n = Self { child, addr };
        let t = Instant::now();
        loop {
            if n.requests(back).is_ok() {
                return Ok(n);
            }
            if t.elapsed() > Duration::from_secs(5) {
                let err =
                    std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
                bail!("nginx {name} on {addr} did not answer within 5 s: {err}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Requests served so far (`stub_status`), asked from inside `back`.
    fn requests(&self, back: &Netns) -> Result<u64> {
        let addr = self.addr;
        let text = back.enter(move || -> Result<String> {
            let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /nginx_status HTTP/1.0\r\n\r\n")?;
            let mut b = String::new();
            s.read_to_string(&mut b)?;
            Ok(b)
        })??;
        // "server accepts handled requests\n A H R"
        let line = text
            .lines()
            .skip_while(|l| !l.contains("accepts handled requests"))
            .nth(1)
            .with_context(|| format!("unexpected stub_status answer: {text}"))?;
        line.split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unexpected stub_status line: {line}"))
    }
}

/// What wrk reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wrk {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    pub errors: u64,
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mul) = if let Some(v) = s.strip_suffix("us") {
        (v, 0.001)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1000.0)
    } else if let Some(v) = s.strip_suffix('m') {
        (v, 60_000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|n| n * mul)
}

/// Parses `wrk --latency` output.
pub fn parse_wrk(out: &str) -> Result<Wrk> {
    let mut w = Wrk::default();
    let mut have_rps = false;
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            w.rps = v.trim().parse().context("Requests/sec")?;
            have_rps = true;
        } else if let Some(v) = t.strip_prefix("50%") {
            w.p50_ms = parse_duration_ms(v).context("50% latency")?;
        } else if let Some(v) = t.strip_prefix("99%") {
            w.p99_ms = parse_duration_ms(v).context("99% latency")?;
        } else if t.contains("requests in") {
            w.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            w.errors += v
                .split(',')
                .filter_map(|kv| kv.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            w.errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    if !have_rps {
        bail!("no Requests/sec in wrk's output: {out}");
    }
    Ok(w)
}

fn wrk(cli: &Netns, url: &str) -> Result<Wrk> {
    let out = cli.exec(
        &tool("wrk"),
        &[
            &format!("-t{THREADS}"),
            &format!("-c{CONNECTIONS}"),
            &format!("-d{}s", duration_s()),
            "--latency",
            "-H",
            "Connection: close",
            url,
        ],
    )?;
    parse_wrk(&out)
}

/// Waits until a TCP connection from `cli` to `addr` succeeds.
fn wait_listening(cli: &Netns, addr: SocketAddrV4, what: &str) -> Result<()> {
    let t = Instant::now();
    loop {
        let ok = cli.enter(move || {
            TcpStream::connect_timeout(&addr.into(), Duration::from_millis(300)).is_ok()
        })?;
        if ok {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(5) {
            bail!("{what} did not accept connections on {addr} within 5 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// The edge as set up for one path; undone on drop.
enum Setup<'a> {
    None,
    /// The daemon, and the backends' `tcp_max_tw_buckets` to restore.
    Splitter(Box<Daemon>, Option<(&'a Netns, String)>),
    Haproxy(&'a Netns, Child),
    Nft(&'a Netns),
}

impl Drop for Setup<'_> {
    fn drop(&mut self) {
        match self {
            Setup::None => {}
            Setup::Splitter(d, restore) => {
                let _ = d.stop();
                if let Some((back, v)) = restore.take()
                    && let Err(e) = back.sysctl(TW_BUCKETS, &v)
                {
                    eprintln!("warning: restoring {TW_BUCKETS}: {e:#}");
                }
            }
            Setup::Haproxy(edge, child) => {
                let _ = child.terminate(Duration::from_secs(5));
                let _ = edge.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
            }
            Setup::Nft(edge) => {
                if let Err(e) = edge.exec(&tool("nft"), &["delete", "table", "ip", NFT_TABLE]) {
                    eprintln!("warning: removing the nftables table: {e:#}");
                }
            }
        }
    }
}

fn haproxy_conf(dir: &Path, (blue, green): (std::net::Ipv4Addr, std::net::Ipv4Addr)) -> String {
    format!(
        "global
  maxconn 4096
  pidfile {}/haproxy.pid
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend web
  bind {VIP}:{VIP_PORT}
  default_backend web
backend web
  balance roundrobin
  server blue {blue}:{BACKEND_PORT} weight 90
  server green {green}:{BACKEND_PORT} weight 10
",
        dir.display()
    )
}

fn nft_ruleset((blue, green): (std::net::Ipv4Addr, std::net::Ipv4Addr)) -> String {
    format!(
        "table ip {NFT_TABLE} {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {VIP} tcp dport {VIP_PORT} dnat to numgen random mod 100 map {{ 0-89 : {blue}, 90-99 : {green} }} : {BACKEND_PORT}
  }}
}}
"
    )
}

fn setup<'a>(
    p: Path4,
    topo: &'a Topology,
    dir: &Path,
    addrs: (std::net::Ipv4Addr, std::net::Ipv4Addr),
) -> Result<Setup<'a>> {
    let vip = SocketAddrV4::new(VIP, VIP_PORT);
    Ok(match p {
        Path4::Direct => Setup::None,
        Path4::Splitter | Path4::SplitterMirrored | Path4::SplitterNoTw => {
            let version = |name: &str, weight, a, port| VersionSpec {
                name: name.into(),
                weight,
                backends: vec![SocketAddrV4::new(a, port)],
            };
            let mut versions = vec![
                version("blue", 90, addrs.0, BACKEND_PORT),
                version("green", 10, addrs.1, BACKEND_PORT),
            ];
            if p == Path4::SplitterMirrored {
                versions.push(version("shadow", 0, addrs.1, SHADOW_PORT));
            }
            let mut cfg = config_toml(
                Mode::Snat,
                &[ServiceSpec {
                    name: "web".into(),
                    vip,
                    protocol: "tcp",
                    affinity: Affinity::Flow,
                    versions,
                }],
            );
            if p == Path4::SplitterMirrored {
                cfg = cfg.replacen(
                    "protocol = \"tcp\"\n",
                    "protocol = \"tcp\"\nread_only = true\n",
                    1,
                );
                cfg.push_str("\n[service.shadow]\nversion = \"shadow\"\npercent = 10\n");
            }
            let daemon = Box::new(Daemon::start(&topo.edge, &cfg)?);
            if p == Path4::SplitterMirrored {
                wait_tee(&daemon)?;
            }
            let restore = if p == Path4::SplitterNoTw {
                let path = format!("/proc/sys/{}", TW_BUCKETS.replace('.', "/"));
                let old = topo
                    .back
                    .exec("cat", &[&path])
                    .with_context(|| format!("reading {TW_BUCKETS}"))?
                    .trim()
                    .to_string();
                let s = Setup::Splitter(daemon, Some((&topo.back, old)));
                topo.back.sysctl(TW_BUCKETS, "0")?;
                return Ok(s);
            } else {
                None
            };
            Setup::Splitter(daemon, restore)
        }
        Path4::Haproxy => {
            let conf = dir.join("haproxy.cfg");
            std::fs::write(&conf, haproxy_conf(dir, addrs))?;
            topo.edge
                .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            let child = match topo
                .edge
                .spawn(&tool("haproxy"), &["-db", "-f", &conf.to_string_lossy()])
            {
                Ok(c) => c,
                Err(e) => {
                    let _ = topo
                        .edge
                        .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
                    return Err(e);
                }
            };
            let s = Setup::Haproxy(&topo.edge, child);
            wait_listening(&topo.cli, vip, "HAProxy")?;
            s
        }
        Path4::Nftables => {
            let file = dir.join("dnat.nft");
            std::fs::write(&file, nft_ruleset(addrs))?;
            topo.edge
                .exec(&tool("nft"), &["-f", &file.to_string_lossy()])
                .context("loading the nftables ruleset")?;
            Setup::Nft(&topo.edge)
        }
    })
}

struct Servers {
    blue: Nginx,
    green: Nginx,
    /// The mirrored case's shadow, on [`SHADOW_PORT`] of the green addresses.
    _shadow: Nginx,
}

/// Port of the shadow nginx.
const SHADOW_PORT: u16 = 8081;

/// Waits (at most 5 s) until the daemon's tee listens.
fn wait_tee(daemon: &Daemon) -> Result<()> {
    let t = Instant::now();
    loop {
        let s = daemon.status_json()?;
        if s["services"][0]["shadow"]["tee"]["listening"] == true {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(5) {
            bail!(
                "the tee did not listen within 5 s: {}",
                s["services"][0]["shadow"]
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// TCP counters of a namespace (`/proc/net/netstat`): SYN retransmits and
/// SYNs rejected by PAWS in TIME_WAIT.
fn tcp_counters(ns: &Netns) -> Result<(u64, u64)> {
    let text = ns.exec("cat", &["/proc/net/netstat"])?;
    let c = parse_snmp(&text)?;
    let get = |k: &str| c.iter().find(|(n, _)| n == k).map_or(0, |(_, v)| *v);
    Ok((get("TcpExt.TCPSynRetrans"), get("TcpExt.PAWSTimewait")))
}

/// Every counter of a namespace: `/proc/net/netstat` and `/proc/net/snmp`,
/// then each interface's `ethtool -S` statistics (named `IFACE.stat`).
fn all_counters(ns: &Netns) -> Result<Vec<(String, u64)>> {
    let mut c = parse_snmp(&ns.exec("cat", &["/proc/net/netstat"])?)?;
    c.extend(parse_snmp(&ns.exec("cat", &["/proc/net/snmp"])?)?);
    let links = ns.exec("ls", &["/sys/class/net"])?;
    for dev in links.split_whitespace().filter(|d| *d != "lo") {
        if let Ok(text) = ns.exec("ethtool", &["-S", dev]) {
            for line in text.lines().skip(1) {
                if let Some((k, v)) = line.split_once(':')
                    && let Ok(v) = v.trim().parse::<u64>()
                {
                    c.push((format!("{dev}.{}", k.trim()), v));
                }
            }
        }
    }
    Ok(c)
}

/// `SPLITTER_BENCH_CONN_DIAG=1`, a diagnostic: prints every counter of
/// [`all_counters`] that moved during a case, per namespace.
fn diag_print(case: &str, ns: &str, before: &[(String, u64)], after: &[(String, u64)]) {
    let moved: Vec<String> = after
        .iter()
        .filter_map(|(k, v)| {
            let b = before.iter().find(|(n, _)| n == k).map_or(0, |(_, b)| *b);
            (*v != b).then(|| format!("{k}={}", v.wrapping_sub(b) as i64))
        })
        .collect();
    eprintln!("    diag {case} {ns}: {}", moved.join(" "));
}

/// `SPLITTER_BENCH_CONN_PERF=DIR`, a diagnostic: a system-wide profile
/// (`perf record -a -g -e cpu-clock`) of the first two seconds of every
/// case's wrk run, written to `DIR/ROUND-PATH.data`. `None` when unset.
fn perf_case(name: &str) -> Result<Option<std::process::Child>> {
    let Some(dir) = std::env::var_os("SPLITTER_BENCH_CONN_PERF") else {
        return Ok(None);
    };
    let out = Path::new(&dir).join(format!("{name}.data"));
    let child = std::process::Command::new("perf")
        .args([
            "record",
            "-a",
            "-g",
            "-e",
            "cpu-clock",
            "-F",
            "2000",
            "-q",
            "-o",
        ])
        .arg(&out)
        .args(["--", "sleep", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record (SPLITTER_BENCH_CONN_PERF)")?;
    Ok(Some(child))
}

/// The topology with `pairs` extra backend address pairs from 10.0.2.FIRST_PAIR.
fn start_topology(pairs: usize) -> Result<(Topology, tempfile_dir::Dir)> {
    let mut topo = Topology::new(TopologyOptions {
        backend_addrs: 2,
        ..TopologyOptions::default()
    })?;
    if pairs > 0 {
        let (_, last) = pair(pairs - 1);
        while topo.backend_addrs().last().is_some_and(|a| *a < last) {
            topo.add_backend_addr()?;
        }
    }
    topo.back.sysctl("net.core.somaxconn", "4096")?;
    topo.edge.sysctl("net.core.somaxconn", "4096")?;
    let dir = tempfile_dir::Dir::new("splitter-connbench")?;
    Ok((topo, dir))
}

/// A temporary directory removed on drop (no extra dependency).
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> anyhow::Result<Self> {
            let p = std::env::temp_dir().join(format!(
                "{prefix}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0)
            ));
            std::fs::create_dir_all(&p)?;
            Ok(Self(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs the connection-rate section.
///
/// # Errors
/// A tool is missing, or the topology or the servers could not start; a
/// path that fails in a round is a problem in the results instead.
pub fn run(rounds: usize) -> Result<ConnResults> {
    check_tools()?;
    // At most 30 address pairs (10.0.2.10 ..= 10.0.2.69).
    let rounds = rounds.clamp(1, 5);
    let cases_n = rounds * Path4::ALL.len();
    let (topo, dir) = start_topology(cases_n)?;
    let (blues, greens): (Vec<_>, Vec<_>) = (0..cases_n).map(pair).unzip();
    let servers = Servers {
        blue: Nginx::start(
            &topo.back,
            dir.path(),
            "blue",
            SocketAddrV4::new(BLUE, BACKEND_PORT),
            &blues,
        )?,
        green: Nginx::start(
            &topo.back,
            dir.path(),
            "green",
            SocketAddrV4::new(GREEN, BACKEND_PORT),
            &greens,
        )?,
        _shadow: Nginx::start(
            &topo.back,
            dir.path(),
            "shadow",
            SocketAddrV4::new(GREEN, SHADOW_PORT),
            &greens,
        )?,
    };
    let mut cases: Vec<ConnCase> = Path4::ALL
        .iter()
        .map(|p| ConnCase {
            id: p.id(),
            label: p.label().into(),
            cps: Vec::new(),
            p50_ms: Vec::new(),
            p99_ms: Vec::new(),
            green_share: Vec::new(),
            errors: 0,
            syn_retrans: 0,
            paws_rejects: 0,
            problems: Vec::new(),
        })
        .collect();
    for round in 0..rounds {
        for k in 0..Path4::ALL.len() {
            let p = Path4::ALL[(k + round) % Path4::ALL.len()];
            let addrs = pair(round * Path4::ALL.len() + k);
            let url = if p == Path4::Direct {
                format!("http://{}:{BACKEND_PORT}/", addrs.0)
            } else {
                format!("http://{VIP}:{VIP_PORT}/")
            };
            let r = (|| -> Result<(Wrk, f64, u64, u64)> {
                let set = setup(p, &topo, dir.path(), addrs)?;
                let (syn0, _) = tcp_counters(&topo.cli)?;
                let (_, paws0) = tcp_counters(&topo.back)?;
                let (b0, g0) = (
                    servers.blue.requests(&topo.back)?,
                    servers.green.requests(&topo.back)?,
                );
                let diag = std::env::var_os("SPLITTER_BENCH_CONN_DIAG").is_some();
                let nss = [
                    ("cli", &topo.cli),
                    ("edge", &topo.edge),
                    ("back", &topo.back),
                ];
                let before = if diag {
                    nss.iter()
                        .map(|(_, n)| all_counters(n))
                        .collect::<Result<Vec<_>>>()?
                } else {
                    Vec::new()
                };
                let perf = perf_case(&format!("{round}-{}", p.id()))?;
                let w = wrk(&topo.cli, &url)?;
                if p == Path4::SplitterMirrored
                    && let Setup::Splitter(d, _) = &set
                {
                    let s = d.status_json()?;
                    let flows = s["services"][0]["shadow"]["tee"]["flows"].as_u64();
                    ensure!(
                        flows.is_some_and(|f| f > 0),
                        "no connection went through the tee: {}",
                        s["services"][0]["shadow"]
                    );
                }
                if diag {
                    for ((name, n), b) in nss.iter().zip(&before) {
                        diag_print(&format!("{round}-{}", p.id()), name, b, &all_counters(n)?);
                    }
                    if let Setup::Splitter(d, _) = &set {
                        eprintln!(
                            "    diag splitter status: {}",
                            d.cli_ok(&["status"]).unwrap_or_default()
                        );
                    }
                }
                if let Some(mut perf) = perf {
                    let _ = perf.wait();
                    eprintln!(
                        "    perf {round}-{}: {:.0} connections/s, {} requests",
                        p.id(),
                        w.rps,
                        w.requests
                    );
                }
                let (syn1, _) = tcp_counters(&topo.cli)?;
                let (_, paws1) = tcp_counters(&topo.back)?;
                let (b1, g1) = (
                    servers.blue.requests(&topo.back)?,
                    servers.green.requests(&topo.back)?,
                );
                // Minus our own stub_status request on each.
                let (db, dg) = (b1.saturating_sub(b0 + 1), g1.saturating_sub(g0 + 1));
                let share = if db + dg == 0 {
                    0.0
                } else {
                    dg as f64 / (db + dg) as f64
                };
                if w.requests == 0 || w.rps <= 0.0 {
                    bail!("wrk completed no request ({} errors)", w.errors);
                }
                Ok((
                    w,
                    share,
                    syn1.saturating_sub(syn0),
                    paws1.saturating_sub(paws0),
                ))
            })();
            let c = cases
                .iter_mut()
                .find(|c| c.id == p.id())
                .context("case list")?;
            match r {
                Ok((w, share, syn_retrans, paws)) => {
                    c.syn_retrans += syn_retrans;
                    c.paws_rejects += paws;
                    c.cps.push(w.rps);
                    c.p50_ms.push(w.p50_ms);
                    c.p99_ms.push(w.p99_ms);
                    c.green_share.push(share);
                    c.errors += w.errors;
                }
                Err(e) => {
                    c.cps.push(f64::NAN);
                    if c.problems.len() < 3 {
                        c.problems.push(format!("round {round}: {e:#}"));
                    }
                }
            }
        }
    }
    drop(servers);
    let mut notes = vec![format!(
        "HAProxy {} with default threads; nginx {} as one process per server; the edge's SNAT address is {EDGE_BACKEND_ADDR} for splitter and HAProxy, nftables only rewrites the destination.",
        version(&tool("haproxy"), &["-v"]),
        version(&tool("nginx"), &["-v"]),
    )];
    if let Some(c) = cases.iter().find(|c| c.id == "splitter")
        && c.paws_rejects > 0
    {
        let median = |id: &str| {
            cases
                .iter()
                .find(|k| k.id == id)
                .and_then(|k| super::stats::Stat::of(&k.cps))
                .map_or("-".to_string(), |s| format!("{:.0}", s.median))
        };
        notes.push(format!(
            "Through splitter the backends rejected {} SYNs by PAWS in TIME_WAIT and the client retransmitted {} SYNs. One SNAT address has {} ports per backend, so once the range was used within the backend's TIME_WAIT ({} s) new flows get ports the backend still holds in TIME_WAIT. The client's TCP timestamp offset is random per 4-tuple (this kernel hashes the ports into it), so a new SYN's TSval is older than the old connection's last one about half the time, and the backend refuses such a SYN by PAWS. The kernel program keeps the TSval of each flow's last client FIN and takes a port in TIME_WAIT right away only for a SYN with a newer TSval; a SYN is refused only when all {} probed ports are unsafe (or the client sends no timestamps), and the client then resets and retransmits (after about 10 ms the first time, a second the next). The other paths (which keep the client's ports) had {} such rejects. With the backends keeping no TIME_WAIT (diagnostic row), splitter made {} connections/s (median) instead of {}.",
            c.paws_rejects,
            c.syn_retrans,
            u32::from(splitter_common::SNAT_PORT_MAX - splitter_common::SNAT_PORT_MIN) + 1,
            splitter_common::SNAT_TIME_WAIT_NS / 1_000_000_000,
            splitter_common::SNAT_PORT_TRIES,
            cases
                .iter()
                .filter(|k| k.id != "splitter")
                .map(|k| k.paws_rejects)
                .sum::<u64>(),
            median("splitter_no_timewait"),
            median("splitter"),
        ));
    }
    drop(topo);
    Ok(ConnResults {
        rounds,
        duration_s: duration_s(),
        connections: CONNECTIONS,
        threads: THREADS,
        cases,
        notes,
    })
}

fn version(prog: &str, args: &[&str]) -> String {
    let o = std::process::Command::new(prog).args(args).output();
    let text = o
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            s
        })
        .unwrap_or_default();
    text.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) || w.contains('/'))
        .map(|w| w.trim_start_matches("nginx/").to_string())
        .unwrap_or_else(|| "?".into())
}

/// Weight changes through the daemon's API, end to end: `PUT
/// /v1/services/web/weights` over the Unix socket (blue=100 <-> green=100),
/// then new connections to the VIP until one lands on the version switched
/// on (nginx answers with its name).
///
/// # Errors
/// The topology, the servers or the daemon could not start.
pub fn api_flips(flips: usize) -> Result<ApiResults> {
    check_tools()?;
    let (topo, dir) = start_topology(0)?;
    let _blue = Nginx::start(
        &topo.back,
        dir.path(),
        "blue",
        SocketAddrV4::new(BLUE, BACKEND_PORT),
        &[],
    )?;
    let _green = Nginx::start(
        &topo.back,
        dir.path(),
        "green",
        SocketAddrV4::new(GREEN, BACKEND_PORT),
        &[],
    )?;
    let daemon = Daemon::start(
        &topo.edge,
        &blue_green_config(Mode::Snat, Affinity::Flow, 100, 0),
    )?;
    let socket = daemon.socket().to_path_buf();
    let vip = SocketAddrV4::new(VIP, VIP_PORT);
    let mut res = ApiResults::default();
    let deadline = Duration::from_secs(2);
    let r = topo.cli.enter(|| -> Result<()> {
        for k in 0..flips {
            let green = k % 2 == 0;
            let body = if green {
                r#"{"weights":{"blue":0,"green":100}}"#
            } else {
                r#"{"weights":{"blue":100,"green":0}}"#
            };
            let want = if green { "green" } else { "blue" };
            let t = Instant::now();
            put_weights(&socket, "web", body)?;
            res.put_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let mut seen = false;
            while t.elapsed() < deadline {
                if let Ok(name) = http_name(vip)
                    && name == want
                {
                    seen = true;
                    break;
                }
            }
            if seen {
                res.visible_ms.push(t.elapsed().as_secs_f64() * 1e3);
            } else {
                res.misses += 1;
            }
        }
        Ok(())
    })?;
    r?;
    res.notes.push(format!(
        "PUT from a raw HTTP/1.1 client on the Unix socket; each probe is a new TCP connection from the client namespace (GET /, nginx answers with its name); a flip not seen within {} s counts as a miss.",
        deadline.as_secs()
    ));
    drop(daemon);
    Ok(res)
}

/// `PUT /v1/services/NAME/weights` over the daemon's Unix socket.
fn put_weights(socket: &Path, service: &str, body: &str) -> Result<()> {
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "PUT /v1/services/{service}/weights HTTP/1.1\r\nHost: splitter\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.lines().next().unwrap_or_default();
    if !status.contains(" 200") && !status.contains(" 204") {
        bail!(
            "PUT weights: {status}: {}",
            out.lines().last().unwrap_or_default()
        );
    }
    Ok(())
}

/// One short HTTP request; the body's first line (the server's name).
fn http_name(addr: SocketAddrV4) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut b = String::new();
    s.read_to_string(&mut b)?;
    Ok(b.split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() -> Result<()> {
        let out = "Running 3s test @ http://10.0.0.10:80/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.01ms  500.00us  12.00ms   90.00%
  Latency Distribution
     50%  850.00us
     75%    1.20ms
     90%    2.00ms
     99%    5.50ms
  12345 requests in 3.00s, 1.90MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   4115.00
Transfer/sec:    600.00KB
";
        let w = parse_wrk(out)?;
        assert_eq!(w.rps, 4115.0);
        assert!((w.p50_ms - 0.85).abs() < 1e-9);
        assert_eq!(w.p99_ms, 5.5);
        assert_eq!(w.requests, 12345);
        assert_eq!(w.errors, 7);
        Ok(())
    }
}
