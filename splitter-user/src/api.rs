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
//! | GET | `/v1/services/{name}/backends/{addr:port}/drain[?timeout=SECONDS]` | | [`crate::controller::DrainWait`]: live flows once 0 or after the timeout |
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
    controller::{Controller, ControllerError},
    edit::{self, BackendPatch, BackendSpec, ServiceSpec, VersionSpec, parse_addr},
};

pub use crate::report::{
    AttachmentReport, BackendReport, BackendSignalsReport, ConnectionReport, DataplaneReport,
    FlowReport, ProgramReport, ServiceReport, SignalsReport, StatusReport, VersionReport,
    VersionSignals,
};

/// Largest request body the API reads.
const MAX_BODY: usize = 64 * 1024;

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

impl From<crate::edit::EditError> for ApiError {
    fn from(e: crate::edit::EditError) -> Self {
        ControllerError::from(e).into()
    }
}

impl From<ControllerError> for ApiError {
    fn from(e: ControllerError) -> Self {
        match e {
            ControllerError::Invalid(m) => Self::BadRequest(m),
            ControllerError::NotFound(m) => Self::NotFound(m),
            ControllerError::Internal(m) => Self::Internal(m),
        }
    }
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
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result = match (&method, segments.as_slice()) {
        // Waits for a live-flow count without the controller's lock.
        (&Method::DELETE, ["v1", "services", name, "backends", addr]) => {
            remove_backend(&controller, name, addr, query.as_deref()).await
        }
        (&Method::GET, ["v1", "services", name, "backends", addr, "drain"]) => {
            wait_drained(&controller, name, addr, query.as_deref()).await
        }
        _ => route(&controller, &method, &path, query.as_deref(), &body),
    };
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

/// `DELETE /v1/services/{name}/backends/{addr:port}[?force=true]`.
async fn remove_backend(
    controller: &Shared,
    name: &str,
    addr: &str,
    query: Option<&str>,
) -> Result<String, ApiError> {
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
    to_json(&crate::controller::remove_backend(controller, name, addr, force).await?)
}

/// Longest `?timeout=` of a drain wait.
const MAX_DRAIN_WAIT_SECS: u64 = 3600;

/// `GET /v1/services/{name}/backends/{addr:port}/drain[?timeout=SECONDS]`:
/// the backend's live flows from a count taken after the request came,
/// once they reached 0 or after `timeout` seconds (default 0: at once).
async fn wait_drained(
    controller: &Shared,
    name: &str,
    addr: &str,
    query: Option<&str>,
) -> Result<String, ApiError> {
    let addr = parse_addr("backend", addr)?;
    let secs = match query_param(query, "timeout") {
        None => 0,
        Some(t) => t
            .parse::<u64>()
            .ok()
            .filter(|s| *s <= MAX_DRAIN_WAIT_SECS)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "timeout={t:?}: seconds to wait, 0..={MAX_DRAIN_WAIT_SECS}"
                ))
            })?,
    };
    let wait = crate::controller::wait_drained(
        controller,
        name,
        addr,
        std::time::Duration::from_secs(secs),
        |_| {},
    )
    .await?;
    to_json(&wait)
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
