//! The daemon's HTTP API on a Unix socket, and the JSON types both ends use.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/v1/status[?window=60s]` | | [`StatusReport`], signal windows over `window` |
//! | GET | `/v1/services/{name}/signals[?window=60s]` | | [`SignalsReport`] |
//! | GET | `/v1/config` | | the running [`Config`] |
//! | PUT | `/v1/services/{name}/weights` | [`WeightsRequest`] | [`ServiceReport`] |
//! | POST | `/v1/services` | [`ServiceSpec`] | [`ServiceReport`] of the new service |
//! | GET | `/v1/services/{name}` | | [`ServiceReport`] |
//! | DELETE | `/v1/services/{name}` | | `{"removed": "..."}` |
//! | POST | `/v1/services/{name}/versions` | [`VersionSpec`] | [`ServiceReport`] |
//! | DELETE | `/v1/services/{name}/versions/{version}` | | [`ServiceReport`] |
//! | POST | `/v1/services/{name}/versions/{version}/backends` | [`BackendSpec`] | [`ServiceReport`] |
//! | PATCH | `/v1/services/{name}/backends/{addr:port}` | [`BackendPatch`] | [`ServiceReport`] |
//! | DELETE | `/v1/services/{name}/backends/{addr:port}[?force=true]` | | [`ServiceReport`] |
//! | GET | `/v1/flow?service=NAME&client=ADDR:PORT` | | [`FlowReport`] |
//! | POST | `/v1/reload` | | `{"changes": [...]}`: the config file re-read and applied as a diff |
//! | POST | `/v1/detach` | | `{"removed": [pins]}`; the daemon then stops and XDP is detached |
//!
//! Errors come back as `{"error": "..."}` with 400 (bad input), 404
//! (unknown service or route) or 500 (the kernel refused a map update).
//! `curl --unix-socket /run/splitter/splitter.sock http://splitter/v1/status`
//! works as well as the CLI.
use std::{collections::BTreeMap, convert::Infallible, future::Future, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tracing::{debug, info, warn};

use crate::{
    controller::Controller,
    edit::{self, BackendPatch, BackendSpec, ServiceSpec, VersionSpec, parse_addr},
    signals::{Counters, MetricReading, Window},
};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

/// `GET /v1/status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// Interfaces, mode, SNAT address.
    pub dataplane: DataplaneReport,
    /// Every service with its versions and backends.
    pub services: Vec<ServiceReport>,
    /// Data-plane counters by name (drops by reason, TX, redirects, new flows).
    pub counters: BTreeMap<String, u64>,
}

/// How the data plane is set up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataplaneReport {
    /// Client-facing interface.
    pub interface: String,
    /// Backend-facing interface.
    pub backend_interface: String,
    /// `snat` or `dnat`.
    pub mode: String,
    /// Source address of SNAT mode.
    pub snat_address: Option<String>,
    /// Where the program is attached and in which XDP mode.
    pub attachments: Vec<AttachmentReport>,
    /// The running kernel program (id, tag, origin).
    #[serde(default)]
    pub program: Option<ProgramReport>,
    /// Connection-table entries (two per flow), as the kernel holds the map.
    #[serde(default)]
    pub conn_capacity: Option<u32>,
}

/// The running kernel program.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProgramReport {
    /// Kernel program id (changes at every load).
    pub id: u32,
    /// Kernel program tag, 16 hex digits: a hash of the instructions, so
    /// another build has another tag.
    pub tag: String,
    /// `embedded`, or the object file given to `splitter daemon --program`.
    pub source: String,
}

/// One XDP attachment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttachmentReport {
    /// Interface name.
    pub interface: String,
    /// `native` or `generic`.
    pub mode: String,
}

/// One service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceReport {
    /// Service name.
    pub name: String,
    /// `addr:port`.
    pub vip: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `flow` or `client-ip`.
    pub affinity: String,
    /// Versions in configuration order.
    pub versions: Vec<VersionReport>,
    /// Drops of this service's packets by reason (`no_flow`, `no_backend`,
    /// `snat_exhausted`, `conn_table`, `backend_disabled`).
    #[serde(default)]
    pub drops: BTreeMap<String, u64>,
}

/// One version of a service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionReport {
    /// Version name.
    pub name: String,
    /// Configured weight.
    pub weight: u32,
    /// Share of new flows this weight gives, in percent.
    pub share_percent: f64,
    /// New flows over all its backends.
    pub new_flows: u64,
    /// Established flows over all its backends now.
    #[serde(default)]
    pub live_flows: u64,
    /// Packets to its backends.
    pub packets: u64,
    /// Bytes to its backends.
    pub bytes: u64,
    /// Its backends.
    pub backends: Vec<BackendReport>,
    /// Signal counters summed over its backends (cumulative).
    #[serde(default)]
    pub signals: Counters,
    /// Its signals over the status window (`None`: no history yet).
    #[serde(default)]
    pub window: Option<Window>,
    /// The external metric of `[service.analysis]`, if configured.
    #[serde(default)]
    pub metric: Option<MetricReading>,
}

/// One backend and its counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendReport {
    /// `addr:port`.
    pub address: String,
    /// Weight inside its version.
    pub weight: u32,
    /// `active`, `drain` or `disabled`.
    #[serde(default)]
    pub state: String,
    /// `up` or `down` by the service's health checks, `unchecked` without.
    #[serde(default)]
    pub health: String,
    /// Flows bound to it that are still going (counted from the
    /// connection table, recounted about once a second).
    #[serde(default)]
    pub live_flows: u64,
    /// Packets forwarded to it.
    pub packets: u64,
    /// Bytes forwarded to it.
    pub bytes: u64,
    /// Flows bound to it.
    pub new_flows: u64,
    /// Reply packets translated back.
    pub reply_packets: u64,
    /// Reply bytes translated back.
    pub reply_bytes: u64,
    /// How its connections open and end (cumulative counters).
    #[serde(default)]
    pub signals: Counters,
    /// Its signals over the status window (`None`: no history yet).
    #[serde(default)]
    pub window: Option<Window>,
}

/// `GET /v1/services/{name}/signals?window=60s`: how a service's
/// connections open and end, per version and per backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SignalsReport {
    /// Service name.
    pub service: String,
    /// The window asked for, in seconds (each `window` says what it covers).
    pub window_secs: f64,
    /// The service's connect deadline.
    pub connect_timeout_ms: u32,
    /// Versions in configuration order.
    pub versions: Vec<VersionSignals>,
}

/// One version's signals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionSignals {
    /// Version name.
    pub name: String,
    /// Configured weight.
    pub weight: u32,
    /// Cumulative counters over its backends.
    pub signals: Counters,
    /// Over the window (`None`: no history yet).
    pub window: Option<Window>,
    /// The external metric, if configured.
    pub metric: Option<MetricReading>,
    /// Its backends.
    pub backends: Vec<BackendSignalsReport>,
}

/// One backend's signals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackendSignalsReport {
    /// `addr:port`.
    pub address: String,
    /// Cumulative counters.
    pub signals: Counters,
    /// Over the window (`None`: no history yet).
    pub window: Option<Window>,
}

/// `GET /v1/flow?service=NAME&client=ADDR:PORT`: where a client's flow goes and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FlowReport {
    /// Service name.
    pub service: String,
    /// `addr:port` of the VIP.
    pub vip: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `flow` or `client-ip`.
    pub affinity: String,
    /// The client `addr:port` asked about.
    pub client: String,
    /// Flow hash (of the client address only with `client-ip` affinity).
    pub hash: u32,
    /// Version a new flow from this client would get now, and why.
    pub new_flow_version: String,
    /// Backend a new flow would get now.
    pub new_flow_backend: String,
    /// How the version and backend were chosen.
    pub why: String,
    /// The connection-table entry, if the flow is known to the edge: it
    /// decides, whatever the weights say now.
    pub connection: Option<ConnectionReport>,
}

/// A connection-table entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ConnectionReport {
    /// Backend the flow is bound to.
    pub backend: String,
    /// Source the backend sees in SNAT mode.
    pub snat_source: Option<String>,
    /// TCP state seen so far (`syn`, `established`, `fin-client`, `fin-backend`, `rst`).
    pub tcp_state: Vec<String>,
    /// Milliseconds since the last packet (at one-second granularity).
    pub idle_ms: u64,
}

/// `PUT /v1/services/{name}/weights`: every version of the service, by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightsRequest {
    /// Version name -> weight.
    pub weights: BTreeMap<String, u32>,
}

/// Body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    /// What went wrong, for a human.
    pub error: String,
}

/// Errors the API answers with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

type Shared = Arc<std::sync::Mutex<Controller>>;

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(listener: UnixListener, controller: Shared, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let controller = controller.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(controller.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
}

async fn handle(
    controller: Shared,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let req_query = req.uri().query().map(str::to_string);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Ok(reply_error(&ApiError::BadRequest(format!(
                "could not read the request body (at most {MAX_BODY} bytes): {e}"
            ))));
        }
    };
    let query = req_query;
    let result = route(&controller, &method, &path, query.as_deref(), &body);
    match &result {
        Ok(_) => debug!(%method, %path, "API request"),
        Err(e) => info!(%method, %path, error = %e, "API request refused"),
    }
    Ok(match result {
        Ok(json) => json_response(StatusCode::OK, json),
        Err(e) => reply_error(&e),
    })
}

fn route(
    controller: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> Result<String, ApiError> {
    let lock = || {
        controller
            .lock()
            .map_err(|_| ApiError::Internal("controller state is poisoned".into()))
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, segments.as_slice()) {
        (&Method::GET, ["v1", "status"]) => {
            let window = window_param(query)?;
            to_json(&lock()?.status_over(window)?)
        }
        (&Method::GET, ["v1", "services", name, "signals"]) => {
            let window = window_param(query)?;
            to_json(&lock()?.signals_of(name, window)?)
        }
        (&Method::GET, ["v1", "config"]) => to_json(lock()?.config()),
        (&Method::PUT, ["v1", "services", name, "weights"]) => {
            let req: WeightsRequest = serde_json::from_slice(body).map_err(|e| {
                ApiError::BadRequest(format!(
                    "body must be JSON like {{\"weights\": {{\"blue\": 90, \"green\": 10}}}}: {e}"
                ))
            })?;
            to_json(&lock()?.set_weights(name, &req.weights)?)
        }
        (&Method::POST, ["v1", "services"]) => {
            let spec: ServiceSpec = body_json(
                body,
                r#"{"name": "web", "vip": "10.0.0.10:80", "versions": [{"name": "blue", "weight": 100, "backends": [{"address": "10.0.2.1:8080"}]}]}"#,
            )?;
            let mut c = lock()?;
            c.edit(|cfg| edit::add_service(cfg, &spec))?;
            to_json(&c.report_of(&spec.name)?)
        }
        (&Method::GET, ["v1", "services", name]) => to_json(&lock()?.report_of(name)?),
        (&Method::DELETE, ["v1", "services", name]) => to_json(
            &serde_json::json!({ "removed": lock()?.edit(|cfg| edit::remove_service(cfg, name))? }),
        ),
        (&Method::POST, ["v1", "services", name, "versions"]) => {
            let spec: VersionSpec = body_json(
                body,
                r#"{"name": "green", "weight": 0, "backends": [{"address": "10.0.2.3:8080"}]}"#,
            )?;
            let mut c = lock()?;
            c.edit(|cfg| edit::add_version(cfg, name, &spec))?;
            to_json(&c.report_of(name)?)
        }
        (&Method::DELETE, ["v1", "services", name, "versions", version]) => {
            let mut c = lock()?;
            c.edit(|cfg| edit::remove_version(cfg, name, version))?;
            to_json(&c.report_of(name)?)
        }
        (&Method::POST, ["v1", "services", name, "versions", version, "backends"]) => {
            let spec: BackendSpec = body_json(
                body,
                r#"{"address": "10.0.2.4:8080", "weight": 1, "state": "active"}"#,
            )?;
            let mut c = lock()?;
            c.edit(|cfg| edit::add_backend(cfg, name, version, &spec))?;
            to_json(&c.report_of(name)?)
        }
        (&Method::PATCH, ["v1", "services", name, "backends", addr]) => {
            let addr = parse_addr("backend", addr)?;
            let patch: BackendPatch = body_json(body, r#"{"weight": 2, "state": "drain"}"#)?;
            let mut c = lock()?;
            c.edit(|cfg| edit::set_backend(cfg, name, addr, &patch))?;
            to_json(&c.report_of(name)?)
        }
        (&Method::DELETE, ["v1", "services", name, "backends", addr]) => {
            let addr = parse_addr("backend", addr)?;
            let force = match query_param(query, "force").as_deref() {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    return Err(ApiError::BadRequest(format!(
                        "force={other:?}: use force=true or force=false"
                    )));
                }
            };
            to_json(&lock()?.remove_backend(name, addr, force)?)
        }
        (&Method::GET, ["v1", "flow"]) => {
            let q = query.unwrap_or_default();
            let get = |k: &str| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            };
            let service = get("service")
                .ok_or_else(|| ApiError::BadRequest("missing ?service=NAME".into()))?;
            let client = get("client")
                .ok_or_else(|| ApiError::BadRequest("missing &client=ADDR:PORT".into()))?;
            let client: std::net::SocketAddrV4 = client.parse().map_err(|_| {
                ApiError::BadRequest(format!("client {client:?} is not an IPv4 address:port"))
            })?;
            to_json(&lock()?.flow(&service, client)?)
        }
        (&Method::POST, ["v1", "reload"]) => {
            to_json(&serde_json::json!({ "changes": lock()?.reload()? }))
        }
        (&Method::POST, ["v1", "detach"]) => {
            to_json(&serde_json::json!({ "removed": lock()?.detach()? }))
        }
        (
            _,
            ["v1", "status"]
            | ["v1", "config"]
            | ["v1", "detach"]
            | ["v1", "reload"]
            | ["v1", "services", _, "weights"]
            | ["v1", "services", _, "signals"]
            | ["v1", "services"]
            | ["v1", "services", _]
            | ["v1", "services", _, "versions"]
            | ["v1", "services", _, "versions", _]
            | ["v1", "services", _, "versions", _, "backends"]
            | ["v1", "services", _, "backends", _],
        ) => Err(ApiError::BadRequest(format!(
            "method {method} is not allowed on {path}"
        ))),
        _ => Err(ApiError::NotFound(format!("no such API path: {path}"))),
    }
}

/// Decodes a JSON body, with an example of a good one in the error.
fn body_json<T: serde::de::DeserializeOwned>(body: &[u8], example: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("body must be JSON like {example}: {e}")))
}

/// `?window=DURATION` (`60s`, `5m`, `90s`...) in ms; the default
/// ([`crate::signals::DEFAULT_WINDOW_SECS`]) without one.
fn window_param(query: Option<&str>) -> Result<u64, ApiError> {
    match query_param(query, "window") {
        None => Ok(crate::signals::DEFAULT_WINDOW_SECS * 1000),
        Some(w) => crate::signals::parse_window(&w).map_err(ApiError::BadRequest),
    }
}

/// The value of `key` in a query string.
fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

fn to_json<T: Serialize>(v: &T) -> Result<String, ApiError> {
    serde_json::to_string_pretty(v).map_err(|e| ApiError::Internal(e.to_string()))
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body + "\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn reply_error(e: &ApiError) -> Response<Full<Bytes>> {
    let body = serde_json::to_string(&ErrorBody {
        error: e.to_string(),
    })
    .unwrap_or_else(|_| "{\"error\":\"internal\"}".into());
    json_response(e.status(), body)
}
