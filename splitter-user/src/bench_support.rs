//! What `cargo xtask bench` needs from this crate beyond its public API:
//! where the build script left the reference XDP programs
//! (`splitter-ebpf/src/bin/baseline.rs`: the empty program, the
//! parse+rewrite floor, a minimal slot-table balancer and the test-run
//! harness), built next to the splitter program.
//!
//! A path rather than embedded bytes, so that a build with
//! `AYA_BUILD_SKIP=1` (no kernel programs) still compiles; the bench reads
//! the file at run time and says so if it is missing.

/// Path of the reference programs' object file in this build's `OUT_DIR`.
pub const BASELINE_OBJECT: &str = concat!(env!("OUT_DIR"), "/baseline");
