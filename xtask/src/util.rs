//! Small helpers shared by the tasks: where the workspace is, how to call
//! cargo, printing a step, running a command and failing clearly.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use splitter_tests::netns::describe;

/// The workspace root (the parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Prints a step header, `==> what`.
pub fn step(what: &str) {
    println!("==> {what}");
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    splitter_tests::is_root()
}

pub use splitter_tests::cargo_bin_dir;
use splitter_tests::path_with_cargo_bin;

/// A `cargo` command run from the workspace root, with the cargo bin
/// directory on `PATH`.
pub fn cargo() -> Command {
    let mut c = Command::new("cargo");
    c.current_dir(workspace_root())
        .env("PATH", path_with_cargo_bin());
    c
}

/// Prints `$ command` and runs it with inherited stdio.
///
/// # Errors
/// It could not start or exited non-zero.
pub fn run(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    println!("    $ {what}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout, or `None` if it could not
/// run or failed (used for probes: "is this installed?").
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stdin(std::process::Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Cargo's target directory for this workspace (honours
/// `CARGO_TARGET_DIR` and config files).
///
/// # Errors
/// `cargo metadata` failed.
pub fn target_dir() -> Result<PathBuf> {
    let out = probe(cargo().args(["metadata", "--format-version", "1", "--no-deps"]))
        .context("`cargo metadata` failed")?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing `cargo metadata`")?;
    v.get("target_directory")
        .and_then(|t| t.as_str())
        .map(PathBuf::from)
        .context("`cargo metadata` has no target_directory")
}
