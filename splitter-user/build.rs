//! Builds the kernel program (`splitter-ebpf`) with the `nightly` toolchain
//! for `bpfel-unknown-none` and leaves it in `OUT_DIR/splitter`, where
//! `splitter::dataplane` embeds it. With `AYA_BUILD_SKIP=1` the kernel
//! program is not built and an empty placeholder is written instead, so the
//! host-only code can be checked and tested without the BPF toolchain; the
//! binary then refuses to load with a message that says so.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir =
        PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?);
    let skip = env::var("AYA_BUILD_SKIP")
        .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
        .unwrap_or(false);
    if skip {
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        fs::write(out_dir.join("splitter"), b"")?;
        return Ok(());
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../splitter-ebpf");
    let root = root.to_string_lossy().into_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "splitter-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
