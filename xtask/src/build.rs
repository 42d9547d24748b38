//! `cargo xtask build`: setup, then the release build of the `splitter`
//! binary. splitter-user's build script builds the kernel program with the
//! nightly toolchain and bpf-linker, so this one command builds both.
//! The kernel program the binary embeds is also left beside it, as
//! `target/release/splitter.bpf.o`, for `splitter daemon --program`.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

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
    match copy_program(&target_dir()?.join("release")) {
        Ok(obj) => step(&format!("built {} and {}", bin.display(), obj.display())),
        // A build without the kernel program (AYA_BUILD_SKIP=1) has none.
        Err(e) => {
            step(&format!("built {}", bin.display()));
            eprintln!("warning: the kernel program was not copied beside it: {e:#}");
        }
    }
    Ok(bin)
}

/// Copies the kernel program of the latest build (splitter-user's
/// `OUT_DIR/splitter`) to `release/splitter.bpf.o` and returns that path.
fn copy_program(release: &Path) -> Result<PathBuf> {
    let build = release.join("build");
    let newest = std::fs::read_dir(&build)
        .with_context(|| format!("reading {}", build.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("splitter-user-")
        })
        .map(|e| e.path().join("out").join("splitter"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .filter(|(_, p)| p.metadata().map(|m| m.len() > 0).unwrap_or(false))
        .max()
        .map(|(_, p)| p)
        .with_context(|| format!("no kernel program under {}", build.display()))?;
    let dest = release.join("splitter.bpf.o");
    std::fs::copy(&newest, &dest)
        .with_context(|| format!("copying {} to {}", newest.display(), dest.display()))?;
    Ok(dest)
}
