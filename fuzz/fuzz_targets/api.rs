//! cargo-fuzz target: a request body to one of the API's body-taking
//! routes, through the real router ([`splitter_fuzz::api_request`]).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = splitter_fuzz::api_request(data);
});
