//! The external metric of `[service.analysis]`: one instant PromQL query
//! per version against a Prometheus-compatible HTTP API, read as exactly
//! one number or a clear reason why there is none ([`MetricError`]).
//!
//! This module owns the query template ([`render_query`]), the HTTP
//! exchange (`GET PREFIX/api/v1/query?query=...` over plain HTTP/1.1 with
//! a timeout, [`query`]) and the reading of Prometheus's JSON answer
//! ([`parse_response`]). It keeps no state: the daemon's sampler decides
//! when to query and keeps the last [`MetricReading`] per version; the
//! analysis judges the numbers. An error is never turned into a number.
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::MetricReading;
use crate::config::{AnalysisConfig, PrometheusUrl, next_placeholder};

/// Largest answer read from Prometheus; a bigger one is an error (a query
/// that gives thousands of series is a wrong query here anyway).
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Series shown in a [`MetricError::MultipleSeries`] message.
const SHOWN_SERIES: usize = 3;

/// Why a query gave no number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MetricError {
    /// `analysis.prometheus` is not a usable URL (a config built in code
    /// and not validated).
    #[error("bad Prometheus URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection, a refused one, or no complete answer within the
    /// timeout.
    #[error("Prometheus at {url} is unreachable: {reason}")]
    Unreachable {
        /// The base URL.
        url: String,
        /// The connect or I/O error, or the timeout.
        reason: String,
    },
    /// Prometheus refused the query (`"status": "error"`): bad PromQL, a
    /// query that timed out on its side...
    #[error("Prometheus refused the query ({error_type}): {error}")]
    Refused {
        /// Prometheus's `errorType` (`bad_data`, `timeout`, `execution`...).
        error_type: String,
        /// Prometheus's `error` text.
        error: String,
    },
    /// The answer is not a Prometheus API answer (another HTTP server, an
    /// HTTP error page, a truncated or oversized body...).
    #[error("not a Prometheus API answer: {0}")]
    BadAnswer(String),
    /// An instant vector without series: nothing matched the query.
    #[error(
        "the query gave no series (no such series for this version yet, or a label that does not match?)"
    )]
    NoSeries,
    /// An instant vector with more than one series.
    #[error("the query gave {count} series, not one (aggregate them, e.g. with sum(...)): {first}")]
    MultipleSeries {
        /// How many series.
        count: usize,
        /// The label sets of the first few, `{a="b"}, {a="c"}, ...`.
        first: String,
    },
    /// A result type other than an instant vector or a scalar (a range
    /// vector or a string).
    #[error("the query gave a {0} result, not an instant vector or a scalar")]
    WrongType(String),
    /// The value is NaN.
    #[error("the query gave NaN (no requests in the range?)")]
    NaN,
}

/// Fills `{service}` and `{version}` of `template` in one pass (a name
/// holding `{version}` is not filled again). The names are escaped for a
/// PromQL double-quoted label value: `\` becomes `\\` and `"` becomes
/// `\"`. Other `{...}`, such as PromQL's label matchers, are left as they
/// are; so is an unknown placeholder (validation refuses those).
pub fn render_query(template: &str, service: &str, version: &str) -> String {
    let mut out = String::with_capacity(template.len() + service.len() + version.len());
    let mut rest = template;
    while let Some((start, end, name)) = next_placeholder(rest) {
        out.push_str(&rest[..start]);
        match name {
            "service" => push_escaped(&mut out, service),
            "version" => push_escaped(&mut out, version),
            _ => out.push_str(&rest[start..end]),
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

fn push_escaped(out: &mut String, value: &str) {
    for c in value.chars() {
        if matches!(c, '\\' | '"') {
            out.push('\\');
        }
        out.push(c);
    }
}

/// `s` percent-encoded for a URL query component: everything but
/// `A-Z a-z 0-9 - . _ ~` as `%XX` of its UTF-8 bytes.
fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request target of an instant query: `PREFIX/api/v1/query?query=...`.
fn request_target(url: &PrometheusUrl, promql: &str) -> String {
    format!("{}/api/v1/query?query={}", url.prefix, url_encode(promql))
}

/// Runs the query of `cfg` for one version (placeholders filled by
/// [`render_query`]) and returns its one number. The whole exchange
/// (connect, request, answer) is bounded by `cfg.timeout_ms`.
///
/// A value of `+Inf` or `-Inf` is returned as such (a division by zero, or
/// a quantile in the last histogram bucket): it compares against `min` and
/// `max` like any number. NaN is an error.
///
/// # Errors
/// See [`MetricError`].
pub async fn query(cfg: &AnalysisConfig, service: &str, version: &str) -> Result<f64, MetricError> {
    query_rendered(cfg, &render_query(&cfg.query, service, version)).await
}

/// [`query`] with the PromQL already rendered.
async fn query_rendered(cfg: &AnalysisConfig, promql: &str) -> Result<f64, MetricError> {
    let url = PrometheusUrl::parse(&cfg.prometheus).map_err(|reason| MetricError::BadUrl {
        url: cfg.prometheus.clone(),
        reason,
    })?;
    let timeout = Duration::from_millis(u64::from(cfg.timeout_ms));
    let unreachable = |reason: String| MetricError::Unreachable {
        url: cfg.prometheus.clone(),
        reason,
    };
    let body = match tokio::time::timeout(timeout, fetch(&url, promql)).await {
        Ok(r) => r.map_err(unreachable)?,
        Err(_) => {
            return Err(unreachable(format!(
                "no answer within {} ms",
                timeout.as_millis()
            )));
        }
    };
    parse_response(&body)
}

/// One `GET` of the instant-query endpoint; the body of the answer,
/// whatever its status (Prometheus explains a refusal in a JSON body with
/// status 400 or 422). `Err` holds a connect or I/O problem in words.
async fn fetch(url: &PrometheusUrl, promql: &str) -> Result<Bytes, String> {
    let stream = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("connect to {}: {e}", url.authority()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    // Ends with the exchange (or when this future is dropped on timeout:
    // the task then ends once the connection closes).
    let conn = tokio::spawn(conn);
    let req = Request::get(request_target(url, promql))
        .header(hyper::header::HOST, url.authority())
        .header(hyper::header::ACCEPT, "application/json")
        .header(hyper::header::USER_AGENT, "splitter")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("building the request: {e}"))?;
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP request: {e}"))?;
        let status = resp.status();
        match Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
        {
            Ok(b) => Ok(b.to_bytes()),
            Err(e) => Err(format!("reading the answer (HTTP {status}): {e}")),
        }
    }
    .await;
    conn.abort();
    result
}

/// Reads the JSON body of an instant query (`/api/v1/query`): the one
/// number it gives, or why there is none.
///
/// - `"status": "error"` → [`MetricError::Refused`] with `errorType` and
///   `error`;
/// - `"resultType": "vector"` with one series → its value; none →
///   [`MetricError::NoSeries`]; more → [`MetricError::MultipleSeries`];
/// - `"resultType": "scalar"` → its value;
/// - a value of `"NaN"` → [`MetricError::NaN`]; `"+Inf"`/`"-Inf"` are
///   returned as infinities;
/// - anything else → [`MetricError::BadAnswer`] or
///   [`MetricError::WrongType`].
///
/// # Errors
/// As above.
pub fn parse_response(body: &[u8]) -> Result<f64, MetricError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(body);
        let start: String = text.chars().take(120).collect();
        MetricError::BadAnswer(format!("not JSON ({e}): {start:?}"))
    })?;
    let bad = |what: &str| MetricError::BadAnswer(what.to_string());
    match v.get("status").and_then(Value::as_str) {
        Some("success") => {}
        Some("error") => {
            let text = |k: &str| {
                v.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or("(none given)")
                    .to_string()
            };
            return Err(MetricError::Refused {
                error_type: text("errorType"),
                error: text("error"),
            });
        }
        Some(other) => return Err(bad(&format!("\"status\" is {other:?}"))),
        None => return Err(bad("no \"status\"")),
    }
    let data = v.get("data").ok_or_else(|| bad("no \"data\""))?;
    let result = data
        .get("result")
        .ok_or_else(|| bad("no \"data.result\""))?;
    match data.get("resultType").and_then(Value::as_str) {
        Some("vector") => {
            let series = result
                .as_array()
                .ok_or_else(|| bad("\"data.result\" of a vector is not a list"))?;
            match series.as_slice() {
                [] => Err(MetricError::NoSeries),
                [one] => sample_value(
                    one.get("value")
                        .ok_or_else(|| bad("a series without \"value\""))?,
                ),
                many => {
                    let mut first: Vec<String> = many
                        .iter()
                        .take(SHOWN_SERIES)
                        .map(|s| label_set(s.get("metric")))
                        .collect();
                    if many.len() > SHOWN_SERIES {
                        first.push("...".into());
                    }
                    Err(MetricError::MultipleSeries {
                        count: many.len(),
                        first: first.join(", "),
                    })
                }
            }
        }
        Some("scalar") => sample_value(result),
        Some(t @ ("matrix" | "string")) => Err(MetricError::WrongType(t.to_string())),
        Some(other) => Err(bad(&format!("unknown \"resultType\" {other:?}"))),
        None => Err(bad("no \"data.resultType\"")),
    }
}

/// The number of a sample `[ <unix time>, "<value>" ]`.
fn sample_value(sample: &Value) -> Result<f64, MetricError> {
    let text = sample
        .as_array()
        .and_then(|a| match a.as_slice() {
            [_, v] => v.as_str(),
            _ => None,
        })
        .ok_or_else(|| {
            MetricError::BadAnswer(format!(
                "a sample is not [time, \"value\"]: {}",
                truncated(&sample.to_string())
            ))
        })?;
    // Go's strconv spellings, as Prometheus writes them.
    let value = match text {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        t => t
            .parse::<f64>()
            .map_err(|_| MetricError::BadAnswer(format!("the value {t:?} is not a number")))?,
    };
    if value.is_nan() {
        return Err(MetricError::NaN);
    }
    Ok(value)
}

/// A series' labels as PromQL writes them: `name{a="b", c="d"}`.
fn label_set(metric: Option<&Value>) -> String {
    let Some(labels) = metric.and_then(Value::as_object) else {
        return "{}".into();
    };
    let name = labels
        .get("__name__")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let pairs: Vec<String> = labels
        .iter()
        .filter(|(k, _)| k.as_str() != "__name__")
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.as_str()
                    .map_or_else(|| v.to_string(), |s| format!("{s:?}"))
            )
        })
        .collect();
    truncated(&format!("{name}{{{}}}", pairs.join(", ")))
}

fn truncated(s: &str) -> String {
    const MAX: usize = 200;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push_str("...");
        t
    }
}

/// [`query`] as a [`MetricReading`]: the query as sent, and the value or
/// the error's message; `age_secs` 0 (the caller ages it).
pub async fn read(cfg: &AnalysisConfig, service: &str, version: &str) -> MetricReading {
    let promql = render_query(&cfg.query, service, version);
    let (value, error) = match query_rendered(cfg, &promql).await {
        Ok(v) if v.is_finite() => (Some(v), None),
        // JSON has no infinities: say it rather than show nothing.
        Ok(v) => (
            None,
            Some(format!("the query gave {v} (a division by zero?)")),
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    MetricReading {
        query: promql,
        value,
        error,
        age_secs: 0.0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TEMPLATE: &str = r#"sum(rate(http_requests_total{service="{service}",version="{version}",code=~"5.."}[30s])) / sum(rate(http_requests_total{service="{service}",version="{version}"}[30s]))"#;

    fn cfg(prometheus: &str) -> AnalysisConfig {
        AnalysisConfig {
            prometheus: prometheus.into(),
            query: "up{job=\"{service}\"}".into(),
            min: None,
            max: None,
            interval_ms: 5000,
            timeout_ms: 500,
        }
    }

    #[test]
    fn render_fills_every_placeholder_and_leaves_promql_braces() {
        assert_eq!(
            render_query(TEMPLATE, "web", "green"),
            r#"sum(rate(http_requests_total{service="web",version="green",code=~"5.."}[30s])) / sum(rate(http_requests_total{service="web",version="green"}[30s]))"#
        );
        assert_eq!(render_query("up", "web", "green"), "up");
        assert_eq!(render_query("{version}{service}", "a", "b"), "ba");
        // Braces that are not placeholders stay, and so does an unknown
        // placeholder (validation refuses it).
        assert_eq!(
            render_query(r#"x{} y{a="{3}"} {other} {version"#, "s", "v"),
            r#"x{} y{a="{3}"} {other} {version"#
        );
    }

    #[test]
    fn render_escapes_label_values_and_fills_once() {
        assert_eq!(
            render_query(r#"a{s="{service}",v="{version}"}"#, r#"we"b"#, r"g\n"),
            r#"a{s="we\"b",v="g\\n"}"#
        );
        // A name holding a placeholder is not filled again.
        assert_eq!(render_query("{service}", "{version}", "v"), "{version}");
    }

    #[test]
    fn url_encoding_and_target() {
        assert_eq!(url_encode("a-b_c.d~"), "a-b_c.d~");
        assert_eq!(
            url_encode(r#"sum(x{a="b c"}) / 2 + é"#),
            "sum%28x%7Ba%3D%22b%20c%22%7D%29%20%2F%202%20%2B%20%C3%A9"
        );
        let url = PrometheusUrl::parse("http://p:9090/prom/").unwrap();
        assert_eq!(request_target(&url, "up"), "/prom/api/v1/query?query=up");
        let url = PrometheusUrl::parse("http://p").unwrap();
        assert_eq!(request_target(&url, "1+1"), "/api/v1/query?query=1%2B1");
    }

    #[test]
    fn one_series_gives_its_value() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000.123,"0.25"]}]}}"#;
        assert_eq!(parse_response(body), Ok(0.25));
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"b"},"value":[1,"3e2"]}]}}"#;
        assert_eq!(parse_response(body), Ok(300.0));
    }

    #[test]
    fn scalars_and_infinities() {
        let body =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"42"]}}"#;
        assert_eq!(parse_response(body), Ok(42.0));
        let body = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#;
        assert_eq!(parse_response(body), Ok(f64::INFINITY));
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"-Inf"]}]}}"#;
        assert_eq!(parse_response(body), Ok(f64::NEG_INFINITY));
    }

    #[test]
    fn nan_is_an_error_not_a_number() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#;
        let e = parse_response(body).unwrap_err();
        assert_eq!(e, MetricError::NaN);
        assert_eq!(
            e.to_string(),
            "the query gave NaN (no requests in the range?)"
        );
        let body = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#;
        assert_eq!(parse_response(body), Err(MetricError::NaN));
    }

    #[test]
    fn empty_and_multi_series_results_are_errors() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        let e = parse_response(body).unwrap_err();
        assert_eq!(e, MetricError::NoSeries);
        assert!(e.to_string().starts_with("the query gave no series"), "{e}");
        let series =
            |v: &str| format!(r#"{{"metric":{{"__name__":"up","job":"{v}"}},"value":[1,"1"]}}"#);
        let list: Vec<String> = ["a", "b", "c", "d"].iter().map(|v| series(v)).collect();
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
            list.join(",")
        );
        let e = parse_response(body.as_bytes()).unwrap_err();
        assert_eq!(
            e,
            MetricError::MultipleSeries {
                count: 4,
                first: r#"up{job="a"}, up{job="b"}, up{job="c"}, ..."#.into()
            }
        );
        assert_eq!(
            e.to_string(),
            r#"the query gave 4 series, not one (aggregate them, e.g. with sum(...)): up{job="a"}, up{job="b"}, up{job="c"}, ..."#
        );
        let body = format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
            list[..2].join(",")
        );
        assert!(
            parse_response(body.as_bytes())
                .unwrap_err()
                .to_string()
                .contains(r#"2 series, not one (aggregate them, e.g. with sum(...)): up{job="a"}, up{job="b"}"#)
        );
    }

    #[test]
    fn prometheus_errors_keep_its_text() {
        let body = br#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:5: parse error: unexpected end of input"}"#;
        let e = parse_response(body).unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"Prometheus refused the query (bad_data): invalid parameter "query": 1:5: parse error: unexpected end of input"#
        );
        let e = parse_response(br#"{"status":"error"}"#).unwrap_err();
        assert_eq!(
            e,
            MetricError::Refused {
                error_type: "(none given)".into(),
                error: "(none given)".into()
            }
        );
    }

    #[test]
    fn other_answers_are_bad_answers() {
        for (body, want) in [
            (&b"<html>502 Bad Gateway</html>"[..], "not JSON"),
            (b"", "not JSON"),
            (b"{}", "no \"status\""),
            (br#"{"status":"ok"}"#, "\"status\" is \"ok\""),
            (br#"{"status":"success"}"#, "no \"data\""),
            (
                br#"{"status":"success","data":{"result":[]}}"#,
                "no \"data.resultType\"",
            ),
            (
                br#"{"status":"success","data":{"resultType":"vector","result":{}}}"#,
                "not a list",
            ),
            (
                br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}"#,
                "a series without \"value\"",
            ),
            (
                br#"{"status":"success","data":{"resultType":"scalar","result":[1,2]}}"#,
                "a sample is not [time, \"value\"]",
            ),
            (
                br#"{"status":"success","data":{"resultType":"scalar","result":[1,"x"]}}"#,
                "the value \"x\" is not a number",
            ),
            (
                br#"{"status":"success","data":{"resultType":"weird","result":[]}}"#,
                "unknown \"resultType\" \"weird\"",
            ),
        ] {
            let e = parse_response(body).unwrap_err();
            assert!(
                matches!(e, MetricError::BadAnswer(_)) && e.to_string().contains(want),
                "{}: want {want:?} in {e}",
                String::from_utf8_lossy(body)
            );
        }
        let body = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert_eq!(
            parse_response(body).unwrap_err().to_string(),
            "the query gave a matrix result, not an instant vector or a scalar"
        );
    }

    #[tokio::test]
    async fn a_port_without_listener_is_unreachable() {
        // Bind then drop: nothing listens on the port afterwards.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = cfg(&format!("http://127.0.0.1:{port}"));
        let e = query(&c, "web", "green").await.unwrap_err();
        assert!(
            matches!(e, MetricError::Unreachable { .. })
                && e.to_string()
                    .starts_with(&format!("Prometheus at http://127.0.0.1:{port} is unreachable: connect to 127.0.0.1:{port}")),
            "{e}"
        );
        let r = read(&c, "web", "green").await;
        assert_eq!(r.query, "up{job=\"web\"}");
        assert_eq!(r.value, None);
        assert!(r.error.unwrap().contains("is unreachable"));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_as_unreachable() {
        // Accepts (the kernel does) but never answers.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut c = cfg(&format!("http://127.0.0.1:{port}"));
        c.timeout_ms = 200;
        let e = query(&c, "web", "green").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "Prometheus at http://127.0.0.1:{port} is unreachable: no answer within 200 ms"
            )
        );
        drop(l);
    }

    #[tokio::test]
    async fn a_bad_url_is_reported_as_such() {
        let e = query(&cfg("https://p:9090"), "web", "green")
            .await
            .unwrap_err();
        assert!(
            matches!(e, MetricError::BadUrl { .. })
                && e.to_string().contains("https is not supported"),
            "{e}"
        );
    }
}
