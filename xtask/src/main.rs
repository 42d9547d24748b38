//! `cargo xtask`: the project's task runner (the `.cargo/config.toml`
//! alias runs this crate).
//!
//! # Layout
//! - `setup`: installs missing prerequisites (apt packages, nightly
//!   rust-src, bpf-linker, bpffs); every other task runs it first.
//! - `build`: the release build of `splitter` (and its XDP program).
//! - `dist`: a Debian package (binary, unit, example config, man page, completions).
//! - `test`: host tests, then the privileged tests one at a time, with a
//!   summary.
//! - `demo`: rollouts, targeting and a shadow through splitter in network
//!   namespaces.
//! - `fuzz`: the packet fuzzer's million frames, then each cargo-fuzz
//!   target (config, API bodies) for a bounded time.
//! - `bench`: per-packet and control-plane figures, written to
//!   `docs/benchmarks*` (never run by `test`; never fails for slowness).
//! - `util`: workspace paths, cargo, running commands.
mod bench;
mod build;
mod demo;
mod dist;
mod fuzz;
mod setup;
mod test;
mod util;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use splitter_tests::splitter::Mode;

const EXAMPLES: &str = "\
Examples:
  cargo xtask setup                      # install what is missing (root), print each step
  cargo xtask build                      # target/release/splitter, XDP program included
  cargo xtask test                       # everything: host tests, then privileged tests
  cargo xtask test topology              # only tests whose name contains `topology`
  cargo xtask test --host-only           # no root needed
  cargo xtask test -- --nocapture        # arguments after `--` go to the test binaries
  cargo xtask demo                       # rollouts, targeting, a shadow in network namespaces
  cargo xtask demo --requests 200 --mode dnat
  cargo xtask fuzz                       # 1M fuzzed frames (root), then each cargo-fuzz target 60 s
  cargo xtask fuzz --frames 0 --seconds 300   # only the cargo-fuzz targets, 5 minutes each
  cargo xtask bench                      # per-packet cost, control plane; writes docs/benchmarks*
  cargo xtask bench --rounds 5 --no-write # quicker, print only";

/// Developer tasks for splitter: install prerequisites, build, test, demo.
///
/// Run as root on Debian: setup installs packages and mounts bpffs, and the
/// privileged tests and the demo build network namespaces and attach XDP.
#[derive(Debug, Parser)]
#[command(name = "xtask", bin_name = "cargo xtask", after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what building and testing need, skipping what is present:
    /// llvm-22-dev, ethtool, iproute2 (apt), rust-src for nightly,
    /// bpf-linker (cargo install), bpffs at /sys/fs/bpf.
    ///
    /// Example: cargo xtask setup
    Setup,
    /// Setup, then `cargo build --release -p splitter-user` (which builds
    /// the XDP program too); prints the binary's path.
    ///
    /// Example: cargo xtask build
    Build,
    /// Setup, build, then a Debian package in target/dist/: the binary,
    /// the systemd unit, an example config, the man page, completions.
    ///
    /// Example: cargo xtask dist && apt-get install ./target/dist/splitter_*.deb
    Dist,
    /// Setup, build, host tests, then the privileged tests of
    /// splitter-tests one at a time (root) with SPLITTER_BIN set. Prints a
    /// summary; exits non-zero if anything failed.
    ///
    /// Example: cargo xtask test topology -- --nocapture
    Test {
        /// Only the host tests (no root needed).
        #[arg(long, conflicts_with = "privileged_only")]
        host_only: bool,
        /// Only the privileged tests.
        #[arg(long)]
        privileged_only: bool,
        /// Passed to the test binaries: a name filter, --nocapture, ...
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, build, then rollouts in network namespaces under continuous
    /// requests: a canary blue -> green that completes, a canary to a broken
    /// version that the daemon rolls back on its own, a blue-green switch
    /// with a preview address, a targeted client address, and a shadow
    /// (20% of new connections mirrored through the tee); then requests
    /// and `splitter status`. Cleans
    /// up on success, failure and Ctrl-C.
    ///
    /// Example: cargo xtask demo --requests 1000
    Demo {
        /// Requests (new connections) sent after the rollouts.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
        /// Forwarding mode of the daemon.
        #[arg(long, value_enum, default_value_t = DemoMode::Snat)]
        mode: DemoMode,
        /// Use this splitter binary instead of building one.
        #[arg(long, env = "SPLITTER_BIN")]
        bin: Option<PathBuf>,
    },
    /// Setup, then the fuzzers at full length: random, truncated and
    /// mutated frames through the XDP program with BPF_PROG_TEST_RUN (root;
    /// every action, counter and established flow checked against the
    /// documented behaviour), then each cargo-fuzz target of fuzz/ (the TOML
    /// config, every API request body) for --seconds, installing cargo-fuzz
    /// if it is missing. Crashes go to fuzz/artifacts/<target>/; see
    /// docs/testing.md for turning one into a regression test.
    ///
    /// Example: cargo xtask fuzz --seconds 300 --seed 42
    Fuzz {
        /// Frames for the packet fuzzer (0 skips it).
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Seed of the packet fuzzer (default: from the clock; printed, so a
        /// failure can be replayed).
        #[arg(long)]
        seed: Option<u64>,
        /// Seconds for each cargo-fuzz target (0 skips them).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Setup, build, then measure (root): the XDP program's cost per packet
    /// through BPF_PROG_TEST_RUN beside reference programs, Maglev table
    /// builds, weight-change latency, map memory. Prints a table and writes
    /// docs/benchmarks.md, docs/benchmarks/results.json and an SVG chart.
    /// Reports targets; never fails because something is slow.
    ///
    /// Example: cargo xtask bench --rounds 15
    Bench {
        /// Rounds of each measurement (min / median / max are over rounds).
        #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=50))]
        rounds: u64,
        /// Live flows for the established-flow and reply cases (at most 65536).
        #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u32).range(1..=65536))]
        flows: u32,
        /// Print the results only; leave docs/ alone.
        #[arg(long)]
        no_write: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DemoMode {
    Snat,
    Dnat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::setup().map(|()| true),
        Command::Bench {
            rounds,
            flows,
            no_write,
        } => bench::bench(&bench::BenchOptions {
            rounds: rounds as usize,
            flows,
            no_write,
        }),
        Command::Build => build::build().map(|_| true),
        Command::Fuzz {
            frames,
            seed,
            seconds,
        } => fuzz::fuzz(&fuzz::FuzzOptions {
            frames,
            seed,
            seconds,
        }),
        Command::Dist => dist::dist().map(|_| true),
        Command::Test {
            host_only,
            privileged_only,
            args,
        } => test::test(&test::TestOptions {
            host_only,
            privileged_only,
            // `cargo xtask test FILTER -- --nocapture` leaves a `--` among
            // the arguments: drop it, the test binaries get ours.
            args: args.into_iter().filter(|a| a != "--").collect(),
        }),
        Command::Demo {
            requests,
            mode,
            bin,
        } => {
            let mode = match mode {
                DemoMode::Snat => Mode::Snat,
                DemoMode::Dnat => Mode::Dnat,
            };
            demo::demo(&demo::DemoOptions {
                requests,
                mode,
                bin,
            })
            .map(|()| true)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            if demo::interrupted() {
                ExitCode::from(130)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
