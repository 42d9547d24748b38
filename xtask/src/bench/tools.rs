//! The programs the traffic sections of `cargo xtask bench` run (nginx,
//! HAProxy, wrk, nftables), installed with apt-get when missing. Only the
//! bench path calls this; `cargo xtask setup` and `test` do not need them.
use std::process::Command;

use anyhow::Result;
use splitter_tests::netns::on_path;

use crate::util::{probe, run, step};

/// Debian package, the program it provides, and why.
pub const BENCH_PACKAGES: &[(&str, &str, &str)] = &[
    (
        "nginx-light",
        "nginx",
        "backends of the connection-rate section",
    ),
    (
        "haproxy",
        "haproxy",
        "HAProxy mode tcp, compared in the connection-rate section",
    ),
    (
        "wrk",
        "wrk",
        "the HTTP load generator of the connection-rate section",
    ),
    (
        "nftables",
        "nft",
        "nftables DNAT, compared in both traffic sections",
    ),
];

fn installed(pkg: &str, prog: &str) -> bool {
    on_path(prog)
        || std::path::Path::new("/usr/sbin").join(prog).is_file()
        || probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
            .is_some_and(|s| s.contains("install ok installed"))
}

/// Installs the missing packages. A failure is returned for the caller to
/// print: the sections that need a missing program then report it as not
/// measured, and the rest of the bench still runs.
///
/// # Errors
/// apt-get is missing or failed.
pub fn install_missing() -> Result<()> {
    let missing: Vec<&(&str, &str, &str)> = BENCH_PACKAGES
        .iter()
        .filter(|(pkg, prog, _)| !installed(pkg, prog))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !on_path("apt-get") {
        anyhow::bail!(
            "apt-get is not available to install {}",
            missing.iter().map(|m| m.0).collect::<Vec<_>>().join(" ")
        );
    }
    step("installing what the traffic sections of the bench run");
    for (pkg, _, why) in &missing {
        println!("    {pkg}: {why}");
    }
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing.iter().map(|m| m.0))
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(())
}
