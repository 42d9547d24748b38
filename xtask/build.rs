//! With the `bench` feature (the measuring stage of `cargo xtask bench`),
//! builds the bench's reference XDP programs (`bench-ebpf`: `baseline` and
//! `edgebench`) with the `nightly` toolchain for `bpfel-unknown-none` and
//! leaves them in `OUT_DIR`, where `bench::packet` and `bench::edge` find
//! them. Without the feature it does nothing, so the plain xtask (which
//! `setup`, `test`, `build` and `demo` compile first) builds on a machine
//! that has no BPF toolchain yet. `AYA_BUILD_SKIP=1` skips the programs;
//! the bench then says they are missing.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_BENCH").is_none() {
        return Ok(());
    }
    #[cfg(feature = "bench")]
    bench_programs()?;
    Ok(())
}

#[cfg(feature = "bench")]
fn bench_programs() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    // Included by path (bench-ebpf/src/reference.rs); aya-build watches
    // only the crate's own directory.
    let headers = manifest.join("../splitter-ebpf/src/headers.rs");
    println!("cargo:rerun-if-changed={}", headers.display());
    let root = manifest.join("../bench-ebpf");
    let root = root.to_string_lossy().into_owned();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "bench-ebpf",
            root_dir: &root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    Ok(())
}
