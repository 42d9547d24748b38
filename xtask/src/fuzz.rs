//! `cargo xtask fuzz`: the fuzzers at full length.
//!
//! 1. the packet fuzzer (`tests/tests/fuzz.rs`, root): a million random
//!    and mutated frames through the kernel program with
//!    `BPF_PROG_TEST_RUN` (`cargo xtask test` runs a slice of 100 000);
//! 2. each cargo-fuzz target of the `fuzz/` crate (`config`, `api`) for a
//!    bounded time, installing `cargo-fuzz` first if it is missing.
//!
//! New corpus entries go to `target/fuzz-corpus/<target>/` (the committed
//! `fuzz/corpus/<target>/` is only read, so it stays small); crashes go to
//! `fuzz/artifacts/<target>/`, and the summary says how to make one a
//! regression test.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};

use crate::util::{cargo, cargo_bin_dir, is_root, run, step, target_dir, workspace_root};

/// The cargo-fuzz release `cargo xtask fuzz` installs.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// The cargo-fuzz targets (`fuzz/fuzz_targets/<name>.rs`).
pub const TARGETS: [&str; 2] = ["config", "api"];

/// What `cargo xtask fuzz` runs.
pub struct FuzzOptions {
    /// Frames for the packet fuzzer (0: skip it).
    pub frames: u64,
    /// Its seed (`None`: one from the clock, printed).
    pub seed: Option<u64>,
    /// Seconds for each cargo-fuzz target (0: skip them).
    pub seconds: u64,
}

/// One part's outcome, for the summary.
struct Part {
    name: String,
    ok: bool,
    took: Duration,
    note: String,
}

fn cargo_fuzz_installed() -> bool {
    crate::util::probe(cargo().args(["fuzz", "--version"])).is_some()
        || cargo_bin_dir().is_some_and(|d| d.join("cargo-fuzz").is_file())
}

/// Runs the packet fuzzer, then each cargo-fuzz target. `Ok(false)` if any
/// part failed (a refused frame, a crash).
///
/// # Errors
/// Setup or the installation of cargo-fuzz failed.
pub fn fuzz(opts: &FuzzOptions) -> Result<bool> {
    crate::setup::setup()?;
    let mut parts = Vec::new();
    if opts.frames > 0 {
        parts.push(packets(opts));
    }
    if opts.seconds > 0 {
        if !cargo_fuzz_installed() {
            step(&format!(
                "installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute or two)"
            ));
            run(cargo().args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                CARGO_FUZZ_VERSION,
            ]))?;
        }
        let corpus_root = target_dir()?.join("fuzz-corpus");
        for t in TARGETS {
            parts.push(target(t, opts.seconds, &corpus_root));
        }
    }
    println!();
    println!("{:<22} {:<6} {:>8}  note", "part", "result", "time");
    for p in &parts {
        println!(
            "{:<22} {:<6} {:>7.0}s  {}",
            p.name,
            if p.ok { "ok" } else { "FAILED" },
            p.took.as_secs_f64(),
            p.note
        );
    }
    let ok = parts.iter().all(|p| p.ok);
    if !ok {
        println!(
            "\nA crash of a cargo-fuzz target is saved under fuzz/artifacts/<target>/ (the path is printed above).\n\
             To keep it as a regression test: copy it to fuzz/regressions/<target>/<short-name> (optionally minimised\n\
             first with `AYA_BUILD_SKIP=1 cargo +nightly fuzz tmin -s none --features libfuzzer <target> <file>`);\n\
             `cargo test -p splitter-fuzz` replays it on stable, and fails until it is fixed.\n\
             A refused frame of the packet fuzzer prints its seed and frame count: the replay line above runs it again."
        );
    }
    Ok(ok)
}

fn packets(opts: &FuzzOptions) -> Part {
    let name = "packets".to_string();
    if !is_root() {
        let note = "not root: the packet fuzzer loads the XDP program in network namespaces; \
                    run `sudo cargo xtask fuzz` (or `--frames 0`)";
        eprintln!("error: {note}");
        return Part {
            name,
            ok: false,
            took: Duration::ZERO,
            note: note.into(),
        };
    }
    let seed = opts.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    step(&format!(
        "packet fuzzer: {} frames, seed {seed}",
        opts.frames
    ));
    let start = Instant::now();
    let result = run(cargo()
        .args([
            "test",
            "-p",
            "splitter-tests",
            "--test",
            "fuzz",
            "--",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env("SPLITTER_FUZZ_SEED", seed.to_string())
        .env("SPLITTER_FUZZ_FRAMES", opts.frames.to_string()));
    Part {
        name,
        ok: result.is_ok(),
        took: start.elapsed(),
        note: format!("{} frames, seed {seed}", opts.frames),
    }
}

/// `cargo +nightly fuzz run` of one target for `seconds`.
fn target(name: &str, seconds: u64, corpus_root: &Path) -> Part {
    let corpus = corpus_root.join(name);
    let seeds = workspace_root().join("fuzz").join("corpus").join(name);
    let start = Instant::now();
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        step(&format!(
            "cargo-fuzz target `{name}` for {seconds} s (new inputs: {}; crashes: fuzz/artifacts/{name}/)",
            corpus.display()
        ));
        let mut c = Command::new("cargo");
        c.current_dir(workspace_root())
            .env("PATH", splitter_tests::path_with_cargo_bin())
            // The targets need no kernel program: skip its nightly BPF build.
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz", "run"])
            // Safe Rust only: no sanitizer, so the build is a plain one
            // (debug assertions stay on, as cargo-fuzz builds by default).
            .args(["--sanitizer", "none", "--features", "libfuzzer", name])
            // libFuzzer writes new inputs to the first directory only.
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .args([
                "-timeout=10",
                "-rss_limit_mb=4096",
                "-max_len=65536",
                "-print_final_stats=1",
            ]);
        // The toolchain that runs xtask must not leak into the nightly build.
        for key in [
            "RUSTC",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTFLAGS",
            "RUSTUP_TOOLCHAIN",
        ] {
            c.env_remove(key);
        }
        run(&mut c)
    })();
    Part {
        name: format!("cargo-fuzz {name}"),
        ok: result.is_ok(),
        took: start.elapsed(),
        note: match result {
            Ok(()) => format!("{seconds} s, no crash"),
            Err(e) => format!("{e:#}"),
        },
    }
}
