//! `cargo xtask setup`: installs what building and testing splitter needs
//! on a fresh Debian machine, skipping what is present, and prints each
//! step. Every other task calls [`setup`] first; when everything is in
//! place it only runs a few quick probes.
//!
//! What it checks, in install order:
//! 1. apt packages `llvm-22-dev` (bpf-linker links against LLVM 22),
//!    `ethtool` (the test topology turns veth offloads off), `iproute2`,
//!    and the others of [`APT_PACKAGES`] (`nftables` for tests/signals.rs,
//!    `prometheus` for tests/prometheus.rs, which starts its own server in
//!    a namespace);
//! 2. the `rust-src` component of the `nightly` toolchain (the kernel
//!    program is built with `-Z build-std=core`);
//! 3. `bpf-linker` (built with `cargo install`, LLVM 22 on `PATH`);
//! 4. bpffs mounted at `/sys/fs/bpf`.
use std::{path::Path, process::Command};

use anyhow::{Result, bail};
use splitter_tests::netns::on_path;

use crate::util::{cargo_bin_dir, is_root, probe, run, step};

/// Debian packages the build and the tests need, with the reason.
const APT_PACKAGES: &[(&str, &str)] = &[
    ("llvm-22-dev", "needed by bpf-linker"),
    ("ethtool", "the test topology sets veth offloads"),
    ("iproute2", "`ip` builds the test namespaces"),
    ("systemd", "systemd-analyze verifies the shipped unit"),
    ("man-db", "the package test renders the installed man page"),
    (
        "nftables",
        "the signals test drops a backend's SYNs with nft in its namespace",
    ),
    (
        "prometheus",
        "tests/prometheus.rs starts its own Prometheus server in a namespace",
    ),
];
/// The bpf-linker release known to work with LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Where LLVM 22's `llvm-config` lives (bpf-linker's build finds it on PATH).
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPFFS: &str = "/sys/fs/bpf";

/// What is missing.
#[derive(Debug, Default)]
struct Plan {
    apt: Vec<&'static str>,
    nightly: bool,
    rust_src: bool,
    bpf_linker: bool,
    bpffs: bool,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.apt.is_empty() && !self.nightly && !self.rust_src && !self.bpf_linker && !self.bpffs
    }

    fn needs_root(&self) -> bool {
        !self.apt.is_empty() || self.bpffs
    }

    /// The shell commands that would fix everything, in order.
    fn commands(&self) -> Vec<String> {
        let mut c = Vec::new();
        if !self.apt.is_empty() {
            c.push("apt-get update".to_string());
            c.push(format!(
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -q {}",
                self.apt.join(" ")
            ));
        }
        if self.nightly {
            c.push(
                "rustup toolchain install nightly --profile minimal --component rust-src"
                    .to_string(),
            );
        } else if self.rust_src {
            c.push("rustup component add rust-src --toolchain nightly".to_string());
        }
        if self.bpf_linker {
            c.push(format!(
                "PATH={LLVM_BIN}:$PATH cargo install bpf-linker --locked --version {BPF_LINKER_VERSION} \
                 --no-default-features --features llvm-22"
            ));
        }
        if self.bpffs {
            c.push(format!("mount -t bpf bpf {BPFFS}"));
        }
        c
    }
}

fn apt_installed(pkg: &str) -> bool {
    probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn nightly_installed() -> bool {
    probe(Command::new("rustup").args(["toolchain", "list"]))
        .is_some_and(|s| s.lines().any(|l| l.starts_with("nightly")))
}

fn rust_src_installed() -> bool {
    probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|s| s.lines().any(|l| l.trim() == "rust-src"))
}

fn bpf_linker_installed() -> bool {
    on_path("bpf-linker") || cargo_bin_dir().is_some_and(|d| d.join("bpf-linker").is_file())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(1) == Some(&BPFFS) && f.get(2) == Some(&"bpf")
            })
        })
        .unwrap_or(false)
}

fn report(ok: bool, what: &str) {
    println!("    {} {what}", if ok { "ok     " } else { "missing" });
}

fn plan() -> Plan {
    let mut p = Plan::default();
    for (pkg, why) in APT_PACKAGES {
        let ok = apt_installed(pkg);
        report(ok, &format!("{pkg} ({why})"));
        if !ok {
            p.apt.push(pkg);
        }
    }
    p.nightly = !nightly_installed();
    p.rust_src = p.nightly || !rust_src_installed();
    report(!p.nightly, "nightly toolchain (builds the kernel program)");
    report(!p.rust_src, "rust-src for nightly (-Z build-std=core)");
    p.bpf_linker = !bpf_linker_installed();
    report(!p.bpf_linker, "bpf-linker (links the kernel program)");
    p.bpffs = !bpffs_mounted();
    report(!p.bpffs, &format!("bpffs mounted at {BPFFS}"));
    p
}

/// Installs whatever is missing.
///
/// # Errors
/// Something needs root (or apt-get) that this process does not have — the
/// message lists the exact commands to run — or an install step failed.
pub fn setup() -> Result<()> {
    step("checking prerequisites (cargo xtask setup)");
    let p = plan();
    if p.is_empty() {
        step("all prerequisites are in place");
        return Ok(());
    }
    let no_apt = !p.apt.is_empty() && !on_path("apt-get");
    if (p.needs_root() && !is_root()) || no_apt {
        let why = if no_apt {
            "apt-get is not available"
        } else {
            "this needs root"
        };
        bail!(
            "some prerequisites are missing and {why}; run these commands (as root), then try again:\n  {}",
            p.commands().join("\n  ")
        );
    }
    if !p.apt.is_empty() {
        step("updating the apt package lists");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        for (pkg, why) in APT_PACKAGES.iter().filter(|(n, _)| p.apt.contains(n)) {
            step(&format!("installing {pkg} ({why})"));
        }
        run(Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&p.apt)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    if p.nightly {
        step("installing the nightly toolchain with rust-src (builds the kernel program)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    } else if p.rust_src {
        step("installing rust-src for nightly (-Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    if p.bpf_linker {
        step(&format!(
            "installing bpf-linker {BPF_LINKER_VERSION} with LLVM 22 (a few minutes)"
        ));
        if !Path::new(LLVM_BIN).join("llvm-config").is_file() {
            bail!("{LLVM_BIN}/llvm-config is missing: install llvm-22-dev first");
        }
        let path = format!("{LLVM_BIN}:{}", std::env::var("PATH").unwrap_or_default());
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("PATH", path))?;
    }
    if p.bpffs {
        step(&format!("mounting bpffs at {BPFFS}"));
        run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    }
    step("prerequisites installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_cover_every_missing_item() {
        let p = Plan {
            apt: vec!["ethtool"],
            nightly: false,
            rust_src: true,
            bpf_linker: true,
            bpffs: true,
        };
        let c = p.commands().join("\n");
        for want in [
            "apt-get update",
            "apt-get install -y -q ethtool",
            "rustup component add rust-src --toolchain nightly",
            "cargo install bpf-linker",
            "mount -t bpf bpf /sys/fs/bpf",
        ] {
            assert!(c.contains(want), "{want} missing from\n{c}");
        }
        assert!(p.needs_root());
        assert!(Plan::default().is_empty() && Plan::default().commands().is_empty());
    }
}
