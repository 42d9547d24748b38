//! `cargo xtask build`: setup, then the release build of the `splitter`
//! binary. splitter-user's build script builds the kernel program with the
//! nightly toolchain and bpf-linker, so this one command builds both.
use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::util::{cargo, run, step, target_dir};

/// Builds `splitter` in release mode and returns the binary's path.
///
/// # Errors
/// Setup or the build failed.
pub fn build() -> Result<PathBuf> {
    crate::setup::setup()?;
    step("building splitter and its XDP program (cargo build --release -p splitter-user)");
    run(cargo().args(["build", "--release", "-p", "splitter-user"]))?;
    let bin = target_dir()?.join("release").join("splitter");
    if !bin.is_file() {
        bail!("the build succeeded but {} does not exist", bin.display());
    }
    step(&format!("built {}", bin.display()));
    Ok(bin)
}
