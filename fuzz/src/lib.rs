//! Fuzz targets for what the daemon reads from outside: the TOML config
//! ([`config_check`], as `splitter config check` parses and validates it)
//! and every API request body ([`api_request`], through the real axum
//! router over a [`FakeDataplane`]).
//!
//! Each target is a plain function that panics when a property breaks, so
//! the cargo-fuzz binaries (`fuzz_targets/`, built with the `libfuzzer`
//! feature by `cargo xtask fuzz`) and this crate's unit tests call the same
//! code: `cargo test -p splitter-fuzz` replays every file of
//! `corpus/<target>/` and `regressions/<target>/` on stable.
//!
//! ```
//! splitter_fuzz::config_check(b"[dataplane]\ninterface = \"eth0\"\n");
//! // Route 0 is `PUT /v1/services/web/weights`.
//! splitter_fuzz::api_request(b"\x00{\"weights\": {\"blue\": 1, \"green\": 1}}");
//! ```
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt as _;
use splitter::{
    api::{ErrorBody, router},
    config::Config,
    controller::Controller,
    kernel::{DataplaneOps as _, FakeDataplane},
};
use tower::ServiceExt as _;

/// Parses and validates `data` as a config file. Properties: no panic; a
/// refusal says why (a non-empty message); an accepted config serializes,
/// and holds at least what validation promises (one service or more is not
/// required, but every service has a version).
pub fn config_check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text) {
        Ok(c) => {
            assert!(
                c.services.iter().all(|s| !s.versions.is_empty()),
                "an accepted config has a service without versions: {text:?}"
            );
            if let Err(e) = serde_json::to_string(&c) {
                panic!("an accepted config does not serialize: {e}: {text:?}");
            }
        }
        Err(e) => assert!(
            !e.to_string().trim().is_empty(),
            "an empty error for {text:?}"
        ),
    }
}

/// The config every API input starts from: two services, versions with
/// backends in each state.
pub const API_CONFIG: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[[service.version]]
name = "blue"
weight = 100
backends = ["10.0.2.2:8080", { address = "10.0.2.3:8080", weight = 2, state = "drain" }]

[[service.version]]
name = "green"
weight = 0
backends = ["10.0.2.4:8080"]

[[service]]
name = "dns"
vip = "10.0.0.53:53"
protocol = "udp"

[[service.version]]
name = "only"
weight = 1
backends = ["10.0.2.2:5353"]

[[service.version]]
name = "mirror"
weight = 0
backends = ["10.0.2.5:5353"]
"#;

/// The routes that take a body, chosen by an input's first byte.
pub const ROUTES: [(&str, &str); 13] = [
    ("PUT", "/v1/services/web/weights"),
    ("POST", "/v1/services"),
    ("POST", "/v1/services/web/versions"),
    ("POST", "/v1/services/web/versions/green/backends"),
    ("PATCH", "/v1/services/web/backends/10.0.2.3:8080"),
    ("POST", "/v1/rollouts"),
    ("PUT", "/v1/services/dns/weights"),
    ("POST", "/v1/services/nope/versions"),
    ("PATCH", "/v1/services/web/backends/10.0.2.9:8080"),
    ("POST", "/v1/services/dns/versions/only/backends"),
    ("POST", "/v1/services/web/targets"),
    ("PUT", "/v1/services/dns/shadow"),
    ("PUT", "/v1/services/web/shadow"),
];

/// What a refused request must leave as it was: the running config, what
/// the data plane was last given, and the rollouts (their reports at one
/// fixed instant, so that only a change of state shows).
/// A value that cannot be serialized fails the target (a panic is how a
/// fuzz target reports), rather than turn both snapshots into "" alike.
fn snapshot(c: &Controller, fake: &FakeDataplane) -> (String, usize, String, String) {
    let json = |r: serde_json::Result<String>| match r {
        Ok(s) => s,
        Err(e) => panic!("a snapshot could not be serialized: {e}"),
    };
    let published = fake.with(|s| s.published.len());
    let last = fake
        .last()
        .map(|c| json(serde_json::to_string(&c)))
        .unwrap_or_default();
    (
        json(serde_json::to_string(c.config())),
        published,
        last,
        json(serde_json::to_string(&c.rollout_list(1_000_000))),
    )
}

/// Sends the rest of `data` as the body of route `data[0] % ROUTES.len()`
/// to a fresh controller over a fake data plane. Properties: no panic;
/// never a 5xx; a refusal is 4xx with a non-empty `{"error": ...}` and
/// changes neither the running config, nor what was published, nor the
/// rollouts; an accepted request answers JSON. Returns the status code
/// (`None` for an empty input).
pub fn api_request(data: &[u8]) -> Option<u16> {
    let (&route, body) = data.split_first()?;
    let (method, path) = ROUTES[usize::from(route) % ROUTES.len()];
    let config = match Config::parse(API_CONFIG) {
        Ok(c) => c,
        Err(e) => panic!("API_CONFIG is refused: {e}"),
    };
    let mut fake = FakeDataplane::default();
    if let Err(e) = fake.apply(&config) {
        panic!("the fake data plane refused API_CONFIG: {e}");
    }
    let controller = Arc::new(Mutex::new(Controller::new(config, fake.clone(), None)));
    let before = match controller.lock() {
        Ok(c) => snapshot(&c, &fake),
        Err(_) => panic!("poisoned"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("no runtime: {e}"),
    };
    let request = match axum::http::Request::builder()
        .method(method)
        .uri(path)
        .body(axum::body::Body::from(body.to_vec()))
    {
        Ok(r) => r,
        Err(e) => panic!("request: {e}"),
    };
    let (status, answer) = rt.block_on(async {
        let resp = match router(controller.clone()).oneshot(request).await {
            Ok(r) => r,
            Err(e) => match e {},
        };
        let status = resp.status();
        let bytes = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => panic!("reading the answer: {e}"),
        };
        (status, bytes)
    });
    let text = String::from_utf8_lossy(&answer);
    let input = String::from_utf8_lossy(body);
    assert!(
        !status.is_server_error(),
        "{method} {path} {input:?}: {status} {text}"
    );
    if status.is_success() {
        if let Err(e) = serde_json::from_slice::<serde_json::Value>(&answer) {
            panic!("{method} {path} {input:?}: {status} with a body that is no JSON ({e}): {text}");
        }
        return Some(status.as_u16());
    }
    assert!(
        status.is_client_error(),
        "{method} {path} {input:?}: {status} {text}"
    );
    match serde_json::from_slice::<ErrorBody>(&answer) {
        Ok(e) => assert!(
            !e.error.trim().is_empty(),
            "{method} {path} {input:?}: {status} with an empty error"
        ),
        Err(e) => panic!("{method} {path} {input:?}: {status} error body {text:?}: {e}"),
    }
    let after = match controller.lock() {
        Ok(c) => snapshot(&c, &fake),
        Err(_) => panic!("{method} {path} {input:?}: the controller lock is poisoned"),
    };
    assert!(
        before == after,
        "{method} {path} {input:?}: refused ({status} {text}) but changed the state"
    );
    Some(status.as_u16())
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    /// Every file of `corpus/<target>/` and `regressions/<target>/`.
    fn inputs(target: &str) -> Vec<PathBuf> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut out = Vec::new();
        for dir in ["corpus", "regressions"] {
            if let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) {
                out.extend(
                    entries
                        .filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .filter(|p| p.is_file()),
                );
            }
        }
        out.sort();
        out
    }

    fn replay(target: &str, f: fn(&[u8])) -> usize {
        let files = inputs(target);
        for p in &files {
            let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            // A panic names the file: run it alone with
            // `cargo test -p splitter-fuzz` and the file's name in the message.
            eprintln!("replaying {}", p.display());
            f(&data);
        }
        files.len()
    }

    #[test]
    fn config_corpus_replays() {
        assert!(
            replay("config", config_check) >= 10,
            "the config corpus is missing"
        );
    }

    #[test]
    fn api_corpus_replays() {
        assert!(
            replay("api", |d| {
                let _ = api_request(d);
            }) >= 10,
            "the API corpus is missing"
        );
    }

    #[test]
    fn every_route_accepts_a_valid_body() {
        // The properties are checked on accepted requests too; make sure
        // each route can accept one, so the fuzzer gets past the parser.
        for (i, body) in [
            r#"{"weights": {"blue": 50, "green": 50}}"#,
            r#"{"name": "api", "vip": "10.0.0.11:80", "versions": [{"name": "v1", "weight": 1, "backends": [{"address": "10.0.2.7:80"}]}]}"#,
            r#"{"name": "canary", "weight": 0, "backends": [{"address": "10.0.2.8:8080"}]}"#,
            r#"{"address": "10.0.2.9:8080", "weight": 3}"#,
            r#"{"weight": 5, "state": "active"}"#,
            r#"{"service": "web", "to": "green"}"#,
        ]
        .iter()
        .enumerate()
        .chain([
            (10, &r#"{"cidr": "10.0.1.96/28", "version": "green"}"#),
            (11, &r#"{"version": "mirror", "percent": 10}"#),
        ])
        {
            let mut data = vec![i as u8];
            data.extend_from_slice(body.as_bytes());
            let status = api_request(&data);
            assert!(
                status.is_some_and(|s| (200..300).contains(&s)),
                "{:?} {body}: {status:?}",
                ROUTES[i]
            );
        }
    }

    #[test]
    fn refusals_are_checked_to_change_nothing() {
        for body in [
            "",
            "{",
            "null",
            r#"{"weights": {"purple": 1}}"#,
            r#"{"weights": {"blue": 0, "green": 0}}"#,
        ] {
            let mut data = vec![0u8];
            data.extend_from_slice(body.as_bytes());
            let status = api_request(&data);
            assert!(
                status.is_some_and(|s| (400..500).contains(&s)),
                "{body:?}: {status:?}"
            );
        }
    }
}
