//! The Debian package, installed for real: `dpkg -i` of the `.deb` that
//! `cargo xtask dist` builds, then what an operator would look at (the
//! binary runs, the installed unit passes `systemd-analyze verify`, the man
//! page renders, the example configuration is valid, the completions
//! parse), then `dpkg -P` removes every file again.
//!
//! It changes the machine (`/usr/bin/splitter`, the unit, docs), so it
//! refuses to run where a `splitter` package or an unpackaged
//! `/usr/bin/splitter` already exists, and purges the package also when a
//! check fails. The package has no maintainer scripts: installing it
//! starts and enables nothing. Needs root, so `#[ignore]`d for a plain
//! `cargo test`; `cargo xtask test` builds the package and runs it:
//!
//! ```text
//! cargo xtask dist
//! cargo test -p splitter-tests --test package -- --include-ignored
//! ```
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Result, bail, ensure};
use splitter_tests::netns::{self, Output};

const TIMEOUT: Duration = Duration::from_secs(120);
const BIN: &str = "/usr/bin/splitter";
const UNIT: &str = "/lib/systemd/system/splitter.service";
const MAN: &str = "/usr/share/man/man1/splitter.1.gz";
const EXAMPLE: &str = "/usr/share/doc/splitter/examples/splitter.toml";
const BASH_COMPLETION: &str = "/usr/share/bash-completion/completions/splitter";

fn sh(prog: &str, args: &[&str]) -> Result<Output> {
    netns::output_with_timeout(Command::new(prog).args(args), TIMEOUT)
}

fn sh_ok(prog: &str, args: &[&str]) -> Result<String> {
    let o = sh(prog, args)?;
    ensure!(
        o.status.success(),
        "`{prog} {}` failed ({}): {}{}",
        args.join(" "),
        o.status,
        o.stdout,
        o.stderr
    );
    Ok(o.stdout)
}

/// The package to test: `$SPLITTER_DEB` (set by `cargo xtask test`), else
/// the one `cargo xtask dist` left in `target/dist`.
fn deb() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SPLITTER_DEB") {
        let p = PathBuf::from(p);
        ensure!(
            p.is_file(),
            "SPLITTER_DEB={} is not a file (did `cargo xtask dist` fail?)",
            p.display()
        );
        return Ok(p);
    }
    let dist = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("dist");
    let arch = sh_ok("dpkg", &["--print-architecture"])?;
    let p = dist.join(format!(
        "splitter_{}_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    ));
    ensure!(
        p.is_file(),
        "no package at {}: run `cargo xtask dist` (or set SPLITTER_DEB)",
        p.display()
    );
    Ok(p)
}

fn installed() -> bool {
    sh("dpkg-query", &["-W", "-f=${Status}", "splitter"])
        .map(|o| o.status.success() && o.stdout.contains("install ok installed"))
        .unwrap_or(false)
}

/// Purges the package on drop, so a failing check leaves nothing behind.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() {
            let _ = sh("dpkg", &["-P", "splitter"]);
        }
    }
}

#[test]
#[ignore = "needs root: run with -- --include-ignored --test-threads=1"]
fn the_deb_installs_works_and_purges_cleanly() -> Result<()> {
    let deb = deb()?;
    for tool in ["dpkg", "systemd-analyze", "man", "bash"] {
        ensure!(netns::on_path(tool), "{tool} is not installed");
    }
    if installed() {
        bail!(
            "a splitter package is installed on this machine; this test would replace and purge it"
        );
    }
    if Path::new(BIN).exists() {
        bail!("{BIN} exists outside any package; this test would overwrite it");
    }
    let deb_arg = deb.to_string_lossy().into_owned();
    let guard = Installed;
    sh_ok("dpkg", &["-i", &deb_arg])?;
    ensure!(
        installed(),
        "dpkg -i succeeded but the package is not installed"
    );
    let pkg_version = sh_ok("dpkg-query", &["-W", "-f=${Version}", "splitter"])?;
    ensure!(
        pkg_version.trim() == env!("CARGO_PKG_VERSION"),
        "package version {pkg_version:?}"
    );

    // Every file the package lists is there.
    let listed = sh_ok("dpkg", &["-L", "splitter"])?;
    for want in [BIN, UNIT, MAN, EXAMPLE, BASH_COMPLETION] {
        ensure!(
            listed.lines().any(|l| l == want) && Path::new(want).is_file(),
            "{want} not installed; dpkg -L says:\n{listed}"
        );
    }
    // The installed binary is the one under test, and it runs.
    if let Some(bin) = std::env::var_os("SPLITTER_BIN") {
        ensure!(
            std::fs::read(BIN)? == std::fs::read(&bin)?,
            "{BIN} differs from SPLITTER_BIN={}",
            bin.to_string_lossy()
        );
    }
    let version = sh_ok(BIN, &["--version"])?;
    ensure!(
        version.trim() == format!("splitter {}", env!("CARGO_PKG_VERSION")),
        "--version printed {version:?}"
    );
    let help = sh_ok(BIN, &["daemon", "--help"])?;
    ensure!(help.contains("--program"), "daemon --help lacks --program");

    // The installed unit, against the installed binary.
    let verify = sh("systemd-analyze", &["verify", UNIT])?;
    let ours: Vec<&str> = verify
        .stderr
        .lines()
        .filter(|l| l.contains("splitter"))
        .collect();
    ensure!(
        verify.status.success() && ours.is_empty(),
        "systemd-analyze verify {UNIT}: {}",
        verify.stderr
    );

    // The man page renders and documents the commands.
    let man = netns::output_with_timeout(
        Command::new("man")
            .args(["-l", MAN])
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
        TIMEOUT,
    )?;
    ensure!(man.status.success(), "man -l {MAN}: {}", man.stderr);
    for want in ["splitter", "daemon", "status", "weights"] {
        ensure!(man.stdout.contains(want), "man page lacks {want}");
    }

    // The example configuration is valid for the installed binary.
    let check = sh_ok(BIN, &["config", "check", EXAMPLE])?;
    ensure!(check.contains("OK"), "config check printed {check:?}");

    // The bash completion parses and defines the completion function.
    sh_ok("bash", &["-n", BASH_COMPLETION])?;
    let defined = sh_ok(
        "bash",
        &[
            "-c",
            &format!("source {BASH_COMPLETION} && complete -p splitter"),
        ],
    )?;
    ensure!(
        defined.contains("splitter"),
        "completion not registered: {defined}"
    );

    // Purge removes every file it installed.
    sh_ok("dpkg", &["-P", "splitter"])?;
    ensure!(!installed(), "still installed after dpkg -P");
    for gone in [BIN, UNIT, MAN, EXAMPLE, BASH_COMPLETION] {
        ensure!(!Path::new(gone).exists(), "{gone} left after dpkg -P");
    }
    drop(guard);
    Ok(())
}
