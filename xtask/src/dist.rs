//! `cargo xtask dist`: a Debian package of splitter, built with `dpkg-deb`
//! from the release build: the binary, the systemd unit, an example
//! configuration, the manual page and shell completions.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{probe, run, step, target_dir, workspace_root};

/// Builds `target/dist/splitter_<version>_<arch>.deb` and returns its path.
///
/// # Errors
/// The build, a file copy, or `dpkg-deb` failed.
pub fn dist() -> Result<PathBuf> {
    let bin = crate::build::build()?;
    package(&bin)
}

/// Packages the release binary `bin` (already built) into
/// `target/dist/splitter_<version>_<arch>.deb` and returns its path.
///
/// # Errors
/// A file copy or `dpkg-deb` failed.
pub fn package(bin: &Path) -> Result<PathBuf> {
    let root = workspace_root();
    let version = env!("CARGO_PKG_VERSION");
    let arch = probe(Command::new("dpkg").arg("--print-architecture"))
        .map(|a| a.trim().to_string())
        .context("dpkg --print-architecture failed: is this Debian?")?;
    let dist = target_dir()?.join("dist");
    let stage = dist.join(format!("splitter_{version}_{arch}"));
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("clearing {}", stage.display()))?;
    }
    let put = |rel: &str, bytes: &[u8], mode: u32| -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = stage.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    step("staging the package tree");
    put("usr/bin/splitter", &fs::read(bin)?, 0o755)?;
    put(
        "lib/systemd/system/splitter.service",
        &fs::read(root.join("packaging/systemd/splitter.service"))?,
        0o644,
    )?;
    put(
        "usr/share/doc/splitter/examples/splitter.toml",
        &fs::read(root.join("packaging/splitter.toml"))?,
        0o644,
    )?;
    for doc in [
        "README.md",
        "docs/config.md",
        "docs/operations.md",
        "docs/architecture.md",
    ] {
        let name = doc.rsplit('/').next().unwrap_or(doc);
        put(
            &format!("usr/share/doc/splitter/{name}"),
            &fs::read(root.join(doc))?,
            0o644,
        )?;
    }
    let output = |args: &[&str]| -> Result<Vec<u8>> {
        let out = Command::new(bin).args(args).output()?;
        if !out.status.success() {
            bail!(
                "splitter {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    };
    let man = output(&["manpage"])?;
    let gz = {
        let mut child = Command::new("gzip")
            .args(["-9n"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("running gzip")?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().context("gzip stdin")?;
            stdin.write_all(&man)?;
        }
        child.wait_with_output()?.stdout
    };
    put("usr/share/man/man1/splitter.1.gz", &gz, 0o644)?;
    put(
        "usr/share/bash-completion/completions/splitter",
        &output(&["completions", "bash"])?,
        0o644,
    )?;
    put(
        "usr/share/zsh/vendor-completions/_splitter",
        &output(&["completions", "zsh"])?,
        0o644,
    )?;
    put(
        "usr/share/fish/vendor_completions.d/splitter.fish",
        &output(&["completions", "fish"])?,
        0o644,
    )?;
    let control = format!(
        "Package: splitter\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: splitter developers <splitter@example.invalid>\n\
         Depends: libc6, iproute2\n\
         Section: net\n\
         Priority: optional\n\
         Description: XDP traffic splitter for zero-downtime deployments\n \
         Splits new TCP and UDP flows to a virtual IP between versions of a\n \
         service by weight (canary, blue-green) in the kernel's XDP hook, and\n \
         keeps every established connection on its backend through weight\n \
         changes, restarts and upgrades.\n"
    );
    put("DEBIAN/control", control.as_bytes(), 0o644)?;
    let deb = dist.join(format!("splitter_{version}_{arch}.deb"));
    step(&format!("dpkg-deb --build {}", deb.display()));
    run(Command::new("dpkg-deb")
        .arg("--root-owner-group")
        .arg("--build")
        .arg(&stage)
        .arg(&deb))?;
    let listing = probe(Command::new("dpkg-deb").arg("--contents").arg(&deb)).unwrap_or_default();
    for want in [
        "./usr/bin/splitter",
        "./lib/systemd/system/splitter.service",
        "./usr/share/man/man1/splitter.1.gz",
    ] {
        if !listing.contains(want) {
            bail!("{} lacks {want}:\n{listing}", deb.display());
        }
    }
    step(&format!("built {}", deb.display()));
    Ok(deb)
}
