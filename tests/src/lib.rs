//! Test kit for splitter's privileged tests, the demo and the benchmarks:
//! network namespaces built by the tests themselves, real servers and
//! clients inside them, and the real daemon on the edge.
//!
//! # Layout
//! - [`netns`]: namespace and child-process guards, the checked command
//!   runner, sysctls and `/proc/net/snmp` counters.
//! - [`topology`]: the client / edge / backend namespaces joined by veth
//!   pairs, addressed, routed and tuned for XDP on veth.
//! - [`servers`]: TCP identity-and-echo, HTTP and UDP identity servers
//!   that count what they serve and record the peers they see.
//! - [`clients`]: one-shot and parallel TCP, HTTP and UDP clients, and a
//!   long-lived echo connection that records any disruption.
//! - [`splitter`]: finding the `splitter` binary, running the daemon in the
//!   edge namespace, its CLI, and config files for the topology.
//! - [`prometheus`]: a real Prometheus server and an exporter it scrapes,
//!   inside a namespace, for the external metric of `[service.analysis]`.
//! - [`load`]: continuous short requests with every answer and failure
//!   timed, for tests that change the traffic under load.
//! - [`rollouts`]: the rollout tests' helpers: report and weights, a
//!   resetting server, an exporter with a 5xx ratio of 0.5, a deploy hook
//!   that hands each backend to the test.
//! - [`program`]: test builds of the kernel program (another tag; another
//!   map layout) for the upgrade tests.
//! - [`fuzz`]: the packet fuzzer's seeded frame generator and mutator, and
//!   its oracle of documented behaviour (tests/fuzz.rs runs it).
//!
//! Everything that creates something (namespaces, processes, threads,
//! sockets) is owned by a guard that removes it on `Drop`, so a failing or
//! panicking test leaves nothing behind; [`netns::remove_stale`] clears what
//! a killed process could not. Every wait is bounded.
//!
//! Errors are `anyhow` with context: this code's errors are read by people
//! looking at a failed test, never matched by callers.
//!
//! The tests in `tests/` need root; they are `#[ignore]`d for a plain
//! `cargo test` and run one at a time by `cargo xtask test`.
pub mod clients;
pub mod fuzz;
pub mod load;
pub mod netns;
pub mod program;
pub mod prometheus;
pub mod rollouts;
pub mod servers;
pub mod splitter;
pub mod topology;

/// Whether this process runs as root (the privileged tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Where `cargo install` puts binaries (`bpf-linker`) and rustup its
/// proxies: `$CARGO_HOME/bin`, else `~/.cargo/bin`.
pub fn cargo_bin_dir() -> Option<std::path::PathBuf> {
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        return Some(std::path::PathBuf::from(h).join("bin"));
    }
    std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo").join("bin"))
}

/// `PATH` with [`cargo_bin_dir`] appended if it is missing, so a freshly
/// installed `bpf-linker` (and `rustup`) is found by a build.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<std::path::PathBuf> = std::env::split_paths(&path).collect();
    if let Some(bin) = cargo_bin_dir()
        && !dirs.contains(&bin)
    {
        dirs.push(bin);
    }
    std::env::join_paths(dirs).unwrap_or(path)
}

pub mod packet;
pub mod testrun;
