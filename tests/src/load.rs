//! Continuous load for the rollout tests: short TCP requests (connect, read
//! the identity line of a [`crate::servers::TcpIdentityServer`], close)
//! from the client namespace, back to back on a few threads, until stopped.
//! Every answer is counted per server name and kept with the time its
//! request started, every failure with the time it ended, so a test can
//! say "zero failed requests" and "every request started after the switch
//! was answered by green".
//!
//! ```no_run
//! use splitter_tests::{load::Load, topology::{self, Topology, TopologyOptions}};
//! # fn main() -> anyhow::Result<()> {
//! let topo = Topology::new(TopologyOptions::default())?;
//! let load = Load::start(&topo.cli, topology::vip(), 2)?;
//! let seen = load.stop();
//! println!("{} answers, {} failures", seen.ok(), seen.failures.len());
//! # Ok(()) }
//! ```
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Connect and read timeout of one request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest a load runs, whatever happens to the test.
pub const MAX_LOAD: Duration = Duration::from_secs(600);
/// Most answers kept with their times (the counters keep counting).
const MAX_ANSWERS: usize = 1_000_000;

/// What the load saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Answers per server name.
    pub per_name: BTreeMap<String, u64>,
    /// Failed requests, with the time since the load started (when the
    /// failure was seen).
    pub failures: Vec<(Duration, String)>,
    /// Every answer: when its request started (since the load started)
    /// and the server's name.
    pub answers: Vec<(Duration, String)>,
}

impl Seen {
    /// Answered requests.
    pub fn ok(&self) -> u64 {
        self.per_name.values().sum()
    }

    /// Answers per server name of the requests that started at or after
    /// `t` (since the load started).
    pub fn started_since(&self, t: Duration) -> BTreeMap<String, u64> {
        self.started_between(t, Duration::MAX)
    }

    /// Answers per server name of the requests that started in `from..to`.
    pub fn started_between(&self, from: Duration, to: Duration) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (_, name) in self
            .answers
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
        {
            *m.entry(name.clone()).or_default() += 1;
        }
        m
    }
}

/// Short requests from the client namespace, back to back on `threads`
/// threads, until stopped (or [`MAX_LOAD`]). Stopped on drop.
#[derive(Debug)]
pub struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// When the load started: the origin of every time in [`Seen`].
    pub started: Instant,
}

impl Load {
    /// Starts `threads` threads in `cli` requesting from `vip`.
    ///
    /// # Errors
    /// The namespace could not be joined.
    pub fn start(cli: &Netns, vip: SocketAddrV4, threads: usize) -> Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let handles = (0..threads)
            .map(|_| {
                let (seen, stop) = (seen.clone(), stop.clone());
                cli.enter(move || {
                    std::thread::spawn(move || {
                        let limit = Instant::now() + MAX_LOAD;
                        while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                            let t0 = started.elapsed();
                            let r = one_request(vip);
                            let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                            match r {
                                Ok(name) => {
                                    *s.per_name.entry(name.clone()).or_default() += 1;
                                    if s.answers.len() < MAX_ANSWERS {
                                        s.answers.push((t0, name));
                                    }
                                }
                                Err(e) => s.failures.push((started.elapsed(), format!("{e:#}"))),
                            }
                            drop(s);
                            std::thread::sleep(Duration::from_millis(4));
                        }
                    })
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            seen,
            stop,
            threads: handles,
            started,
        })
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What it saw so far (it keeps going).
    pub fn snapshot(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the threads and returns what they saw.
    pub fn stop(mut self) -> Seen {
        self.halt();
        self.snapshot()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One request to `addr` from the calling thread's namespace: the name in
/// the identity line.
///
/// # Errors
/// No connection, no line or an empty one within [`REQUEST_TIMEOUT`].
pub fn one_request(addr: SocketAddrV4) -> Result<String> {
    let s = TcpStream::connect_timeout(&SocketAddr::V4(addr), REQUEST_TIMEOUT)?;
    s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    line.split_whitespace()
        .next()
        .map(str::to_string)
        .context("empty identity line")
}
