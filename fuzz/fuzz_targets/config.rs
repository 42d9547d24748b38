//! cargo-fuzz target: the TOML config, parsed and validated as
//! `splitter config check` does ([`splitter_fuzz::config_check`]).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    splitter_fuzz::config_check(data);
});
