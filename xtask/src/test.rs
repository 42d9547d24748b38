//! `cargo xtask test`: setup, release build, then two phases of tests,
//! each a `cargo test` whose output is streamed and counted:
//!
//! 1. host tests: every workspace crate but the kernel programs
//!    (`splitter-ebpf`, `bench-ebpf`) and the privileged test crate (unit,
//!    property and doc tests; no root);
//! 2. privileged tests: the `splitter-tests` crate, `#[ignore]`d tests
//!    included, one at a time (`--test-threads=1`), with `SPLITTER_BIN` set
//!    to the release binary and `SPLITTER_DEB` to the Debian package built
//!    from it (as `cargo xtask dist` does; `tests/package.rs` installs and
//!    purges it). The upgrade tests build their variants of the kernel
//!    program themselves (`target/program-variants`). Needs root.
//!
//! Extra arguments go to both test binaries (a filter, `--nocapture`...).
//! The last line is `summary: N passed, N failed, N skipped`.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::util::{cargo, is_root, step};

/// Counts from `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl Counts {
    fn add(&mut self, o: Counts) {
        self.passed += o.passed;
        self.failed += o.failed;
        self.ignored += o.ignored;
    }
}

/// Parses `test result: ok. 3 passed; 1 failed; 2 ignored; ...`.
pub fn parse_result_line(line: &str) -> Option<Counts> {
    let rest = line.trim().strip_prefix("test result: ")?;
    let mut c = Counts::default();
    for part in rest.split(';') {
        let words: Vec<&str> = part.split_whitespace().collect();
        // Parts like "finished in 0.01s" have no count: skip them.
        let [.., n, what] = words.as_slice() else {
            continue;
        };
        let Ok(n) = n.parse::<u64>() else { continue };
        match *what {
            "passed" => c.passed = n,
            "failed" => c.failed = n,
            "ignored" => c.ignored = n,
            _ => {}
        }
    }
    Some(c)
}

/// One phase's outcome.
#[derive(Debug)]
pub struct Phase {
    pub name: &'static str,
    pub ok: bool,
    pub counts: Counts,
    pub failed_tests: Vec<String>,
    pub took: Duration,
    pub note: Option<String>,
}

/// Runs a `cargo test` command, echoing its stdout and counting results.
fn run_phase(name: &'static str, cmd: &mut Command) -> Phase {
    step(&format!(
        "{name}: $ {}",
        splitter_tests::netns::describe(cmd)
    ));
    let started = Instant::now();
    let mut phase = Phase {
        name,
        ok: false,
        counts: Counts::default(),
        failed_tests: Vec::new(),
        took: Duration::ZERO,
        note: None,
    };
    let result = (|| -> Result<bool> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start cargo")?;
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line.unwrap_or_default();
                println!("{line}");
                if let Some(c) = parse_result_line(&line) {
                    phase.counts.add(c);
                } else if let Some(t) = line
                    .strip_prefix("test ")
                    .and_then(|l| l.strip_suffix(" ... FAILED"))
                {
                    phase.failed_tests.push(t.to_string());
                }
            }
        }
        Ok(child.wait()?.success())
    })();
    phase.took = started.elapsed();
    match result {
        Ok(ok) => {
            phase.ok = ok && phase.counts.failed == 0;
            if !ok && phase.counts.failed == 0 {
                phase.note =
                    Some("cargo test failed before running every test (build error?)".into());
            }
        }
        Err(e) => phase.note = Some(format!("{e:#}")),
    }
    phase
}

/// Options of `cargo xtask test`.
#[derive(Debug, Clone, Default)]
pub struct TestOptions {
    pub host_only: bool,
    pub privileged_only: bool,
    pub args: Vec<String>,
}

/// Runs the phases after setup and build; returns `Ok(false)` if anything failed.
///
/// # Errors
/// Only for problems outside the tests themselves.
pub fn test(opts: &TestOptions) -> Result<bool> {
    let bin = match crate::build::build() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e:#}");
            print_summary(&[], Some("the release build failed; no test ran"));
            return Ok(false);
        }
    };
    let mut phases = Vec::new();
    if !opts.privileged_only {
        let mut c = cargo();
        c.args([
            "test",
            "--no-fail-fast",
            "--workspace",
            "--exclude",
            "splitter-ebpf",
            "--exclude",
            "bench-ebpf",
            "--exclude",
            "splitter-tests",
        ]);
        if !opts.args.is_empty() {
            c.arg("--").args(&opts.args);
        }
        phases.push(run_phase("host tests", &mut c));
    }
    if !opts.host_only {
        phases.push(privileged(&bin, &opts.args));
    }
    let ok = print_summary(&phases, None);
    Ok(ok)
}

fn privileged(bin: &Path, args: &[String]) -> Phase {
    let name = "privileged tests";
    if !is_root() {
        let msg = "not root: the privileged tests build network namespaces and load XDP programs; \
                   run `sudo cargo xtask test` (or `cargo xtask test --host-only`)";
        eprintln!("error: {msg}");
        return Phase {
            name,
            ok: false,
            counts: Counts::default(),
            failed_tests: Vec::new(),
            took: Duration::ZERO,
            note: Some(msg.into()),
        };
    }
    let stale = splitter_tests::netns::remove_stale();
    if !stale.is_empty() {
        step(&format!(
            "removed namespaces left by earlier runs: {}",
            stale.join(" ")
        ));
    }
    // The package test (tests/package.rs) installs this .deb; a packaging
    // failure makes it fail with the path it could not find.
    let deb = match crate::dist::package(bin) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: building the package failed: {e:#}");
            crate::util::target_dir()
                .map(|t| t.join("dist").join("packaging-failed.deb"))
                .unwrap_or_default()
        }
    };
    let mut c = cargo();
    c.args([
        "test",
        "--no-fail-fast",
        "-p",
        "splitter-tests",
        "--",
        "--include-ignored",
        "--test-threads=1",
    ])
    .args(args)
    .env("SPLITTER_BIN", bin)
    .env("SPLITTER_DEB", deb);
    run_phase(name, &mut c)
}

/// Prints the table and the closing `summary:` line; returns whether all passed.
fn print_summary(phases: &[Phase], note: Option<&str>) -> bool {
    step("summary");
    let mut total = Counts::default();
    let mut ok = note.is_none();
    for p in phases {
        total.add(p.counts);
        ok &= p.ok;
        println!(
            "    {:<18} {:<7} {:>5} passed, {:>3} failed, {:>3} ignored  ({:.1} s)",
            p.name,
            if p.ok { "ok" } else { "FAILED" },
            p.counts.passed,
            p.counts.failed,
            p.counts.ignored,
            p.took.as_secs_f64()
        );
        for t in &p.failed_tests {
            println!("        failed: {t}");
        }
        if let Some(n) = &p.note {
            println!("        {n}");
        }
    }
    if let Some(n) = note {
        println!("    {n}");
    }
    if total.failed > 0 {
        ok = false;
    }
    println!(
        "summary: {} passed, {} failed, {} skipped",
        total.passed, total.failed, total.ignored
    );
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_parse() {
        let c = parse_result_line(
            "test result: FAILED. 3 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        assert_eq!(
            c,
            Some(Counts {
                passed: 3,
                failed: 1,
                ignored: 2
            })
        );
        assert_eq!(parse_result_line("running 3 tests"), None);
    }
}
