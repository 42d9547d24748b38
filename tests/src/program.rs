//! Other builds of the kernel program, for the upgrade tests: the same
//! sources built with a test-only cargo feature of `splitter-ebpf`, with the
//! toolchain and flags `aya-build` uses for the embedded one (nightly,
//! `bpfel-unknown-none`, `-Z build-std=core`, bpf-linker with BTF).
//!
//! - [`Variant::UpgradeProbe`] behaves like the shipped program and also
//!   counts every packet in `counter::UPGRADE_PROBE`: other instructions,
//!   so another program tag, and proof that it is the one running.
//! - [`Variant::ForeignLayout`] gives `COUNTERS` another capacity: a
//!   daemon must refuse to load it over the pinned maps.
//!
//! The builds go to their own target directory (`target/program-variants`),
//! so they neither wait for nor disturb the build running the tests; after
//! the first run they are cached and take about a second.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::netns;

/// Longest one variant build may take (the first one builds `core`).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// A test build of the kernel program.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Feature `upgrade-probe`: same behaviour, other instructions, counts
    /// packets in `counter::UPGRADE_PROBE`.
    UpgradeProbe,
    /// Feature `foreign-layout`: `COUNTERS` has another capacity.
    ForeignLayout,
}

impl Variant {
    /// The `splitter-ebpf` cargo feature.
    pub fn feature(self) -> &'static str {
        match self {
            Self::UpgradeProbe => "upgrade-probe",
            Self::ForeignLayout => "foreign-layout",
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Where the variants are built and left: `$CARGO_TARGET_DIR` (else the
/// workspace's `target/`) + `program-variants`.
pub fn variants_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("program-variants")
}

/// The `--cfg bpf_target_arch` value aya-ebpf needs (the host's, as
/// aya-build does).
fn bpf_target_arch() -> &'static str {
    match std::env::consts::ARCH {
        a if a.starts_with("riscv64") => "riscv64",
        a => a,
    }
}

/// Builds `variant` (or finds it up to date) and returns the object file,
/// copied to `variants_dir()/splitter-FEATURE.o`.
///
/// # Errors
/// The build failed or took longer than [`BUILD_TIMEOUT`]; the message
/// holds the command and the end of its output.
pub fn build(variant: Variant) -> Result<PathBuf> {
    let dir = variants_dir();
    let target_dir = dir.join("target");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let target = if cfg!(target_endian = "big") {
        "bpfeb-unknown-none"
    } else {
        "bpfel-unknown-none"
    };
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{}\"", bpf_target_arch()),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace_root())
        .args(["run", "nightly", "cargo", "build"])
        .args([
            "--package",
            "splitter-ebpf",
            "--bin",
            "splitter",
            "--release",
        ])
        .args(["--target", target, "-Z", "build-std=core"])
        .args(["--features", variant.feature()])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("PATH", crate::path_with_cargo_bin())
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // As aya-build: whatever toolchain runs the tests must not leak in.
    for key in [
        "RUSTC",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(key);
    }
    let out = netns::output_with_timeout(&mut cmd, BUILD_TIMEOUT)?;
    if !out.status.success() {
        let tail: Vec<&str> = out.stderr.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "building the {} kernel program failed ({}): `{}`\n{}",
            variant.feature(),
            out.status,
            netns::describe(&cmd),
            tail.join("\n")
        );
    }
    let built = target_dir.join(target).join("release").join("splitter");
    let dest = dir.join(format!("splitter-{}.o", variant.feature()));
    std::fs::copy(&built, &dest)
        .with_context(|| format!("copying {} to {}", built.display(), dest.display()))?;
    Ok(dest)
}
