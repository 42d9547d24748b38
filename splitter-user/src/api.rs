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
//! | PUT | `/v1/services/{name}/shadow` | [`crate::edit::ShadowSpec`] | [`ServiceReport`] (mirroring on or changed) |
//! | DELETE | `/v1/services/{name}/shadow` | | [`ServiceReport`] (mirroring off) |
//! | POST | `/v1/services/{name}/versions/{version}/backends` | [`BackendSpec`] | [`ServiceReport`] |
//! | PATCH | `/v1/services/{name}/backends/{addr:port}` | [`BackendPatch`] | [`ServiceReport`] |
//! | DELETE | `/v1/services/{name}/backends/{addr:port}[?force=true]` | | [`ServiceReport`] |
//! | GET | `/v1/services/{name}/backends/{addr:port}/drain[?timeout=SECONDS]` | | [`crate::controller::DrainWait`]: live flows once 0 or after the timeout |
//! | GET | `/v1/services/{name}/targets` | | its source-CIDR rules, [`TargetReport`]s, longest prefix first |
//! | POST | `/v1/services/{name}/targets` | [`TargetSpec`] | its rules |
//! | DELETE | `/v1/services/{name}/targets/{addr}/{len}` | | its rules |
//! | GET | `/v1/flow?service=NAME&client=ADDR:PORT` | | [`FlowReport`] |
//! | POST | `/v1/reload` | | `{"changes": [...]}`: the config file re-read and applied as a diff |
//! | POST | `/v1/detach` | | `{"removed": [pins]}`; the daemon then stops and XDP is detached |
//! | GET | `/v1/rollouts` | | every rollout's [`crate::report::RolloutReport`] |
//! | POST | `/v1/rollouts` | [`StartRequest`] | the new rollout's report |
//! | GET | `/v1/rollouts/{name}` | | its report |
//! | GET | `/v1/rollouts/{name}/history` | | its timeline and analysis samples ([`crate::rollout::driver::Book`]) |
//! | GET | `/v1/rollouts/{name}/report` | | an SVG plot of weights, error rates and latency, steps and verdicts marked |
//! | POST | `/v1/rollouts/{name}/{command}` | | `promote`, `promote-full`, `pause`, `resume`, `abort`, `retry` or `undo`; its report |
//!
//! Bodies are JSON whatever their content type says, at most 64 KiB
//! (`MAX_BODY`). Errors come back as `{"error": "..."}` with 400 (bad input, or a
//! method the path does not take: `method DELETE is not allowed on
//! /v1/status`), 404 (unknown service, or `no such API path: ...`), 408 (a
//! body slower than 10 s), 413 (a body over 64 KiB) or 500 (the kernel
//! refused a map update).
//!
//! Hostile or stuck clients are bounded: a connection that has not sent a
//! complete request head within [`HEADER_TIMEOUT`] (10 s, of opening or of
//! its previous answer) is closed, and past [`MAX_CONNECTIONS`] (256) open
//! ones a new connection is answered 503 and closed.
//! `curl --unix-socket /run/splitter/splitter.sock http://splitter/v1/status`
//! works as well as the CLI.
//!
//! The table is `router`'s, one axum route per path; handlers lock the
//! controller only for the call that needs it, never across an `.await`
//! (a backend's removal and a drain wait count live flows without it).
//! Extractors refuse with an [`ApiError`] (`Params`, `JsonBody`), so
//! every refusal has the JSON shape above, and the router's fallbacks
//! answer unknown paths and methods the same way.
use std::{collections::BTreeMap, future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State},
    http::{HeaderValue, Method, StatusCode, Uri, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get, patch, post, put},
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    net::UnixListener,
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::{
    controller::{Controller, ControllerError},
    edit::{self, BackendPatch, BackendSpec, ServiceSpec, TargetSpec, VersionSpec, parse_addr},
    rollout::driver::StartRequest,
};

pub use crate::report::{
    AttachmentReport, BackendReport, BackendSignalsReport, ConnectionReport, DataplaneReport,
    FlowReport, ProgramReport, ServiceReport, SignalsReport, StatusReport, TargetReport,
    VersionReport, VersionSignals,
};

/// Largest request body the API reads (413 above it).
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
    /// 413: a request body over [`MAX_BODY`].
    #[error("{0}")]
    TooLarge(String),
    /// 408: a request body slower than [`BODY_TIMEOUT`].
    #[error("{0}")]
    Timeout(String),
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
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

type Shared = Arc<std::sync::Mutex<Controller>>;

/// How long a stopping daemon lets API requests in flight finish (a
/// `detach` answer, a drain wait) before it stops without them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Longest a client may take to send a request's headers, counted from
/// when the server starts waiting for them: as a connection opens and
/// after each answer on a kept-alive one. It is thus also the idle
/// (keep-alive) timeout: a connection that sends nothing, or half a
/// request, for this long is closed without an answer.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a request body may take to arrive once its headers are in
/// (408 past it).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest an answer may wait for the client to read it: a write that
/// makes no progress for this long (a client that sends requests and never
/// reads the answers) ends the connection.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// `stream` with writes bounded by [`WRITE_TIMEOUT`], ready for hyper.
pub(crate) fn write_bounded<S>(
    stream: S,
) -> TokioIo<std::pin::Pin<Box<tokio_io_timeout::TimeoutStream<S>>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite,
{
    let mut s = tokio_io_timeout::TimeoutStream::new(stream);
    s.set_write_timeout(Some(WRITE_TIMEOUT));
    TokioIo::new(Box::pin(s))
}

/// Most API connections open at once. Past it a new connection is
/// answered 503 (`{"error": ...}`) and closed at once.
const MAX_CONNECTIONS: usize = 256;

/// The bounds [`serve`] holds connections to (shorter ones in tests).
#[derive(Debug, Clone, Copy)]
struct Limits {
    header_timeout: Duration,
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: HEADER_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// A bound on a server's open connections: [`ConnectionLimit::admit`]
/// hands out a permit per connection while fewer than `max` are open,
/// and warns once per burst of refusals (not once per connection), with
/// their count when connections are admitted again.
pub(crate) struct ConnectionLimit {
    server: &'static str,
    max: usize,
    permits: Arc<Semaphore>,
    refused: u64,
}

impl ConnectionLimit {
    pub(crate) fn new(server: &'static str, max: usize) -> Self {
        Self {
            server,
            max,
            permits: Arc::new(Semaphore::new(max)),
            refused: 0,
        }
    }

    /// A permit for one more connection, held as long as it is open;
    /// `None` when `max` are open already.
    pub(crate) fn admit(&mut self) -> Option<OwnedSemaphorePermit> {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                if self.refused > 0 {
                    info!(
                        server = self.server,
                        refused = self.refused,
                        "accepting connections again after refusing some at the bound of {}",
                        self.max
                    );
                    self.refused = 0;
                }
                Some(permit)
            }
            Err(_) => {
                if self.refused == 0 {
                    warn!(
                        server = self.server,
                        "{} connections open: refusing new ones until some close", self.max
                    );
                }
                self.refused += 1;
                None
            }
        }
    }
}

/// Serves the API on `listener` until `shutdown` resolves; then accepts
/// nothing more, closes idle connections and gives requests in flight
/// [`SHUTDOWN_GRACE`] to finish.
///
/// Connections are held to [`HEADER_TIMEOUT`] (idle or half-sent
/// requests are closed), to [`WRITE_TIMEOUT`] (answers nobody reads) and
/// to [`MAX_CONNECTIONS`] at once (more are answered 503 and closed).
pub async fn serve(listener: UnixListener, controller: Shared, shutdown: impl Future<Output = ()>) {
    serve_with(listener, controller, shutdown, Limits::default()).await;
}

async fn serve_with(
    listener: UnixListener,
    controller: Shared,
    shutdown: impl Future<Output = ()>,
    limits: Limits,
) {
    let router = router(controller);
    let busy = busy_answer(limits.max_connections);
    let mut limit = ConnectionLimit::new("api", limits.max_connections);
    let (stop, stopped) = tokio::sync::watch::channel(());
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to close.
                    warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(permit) = limit.admit() else {
            // Best effort and never waiting: the socket buffer takes it
            // unless the client is hostile, and then it does not matter.
            let _ = stream.try_write(busy.as_bytes());
            continue;
        };
        let svc = TowerToHyperService::new(router.clone());
        let mut stopped = stopped.clone();
        let header_timeout = limits.header_timeout;
        connections.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(write_bounded(stream), svc);
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stopped.changed() => {
                    // Closes an idle connection now, a busy one after its answer.
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                debug!(error = %e, "API connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop.send(());
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drained).await.is_err() {
        info!("API requests still running after {SHUTDOWN_GRACE:?}; stopping without them");
    }
    connections.shutdown().await;
}

/// The whole answer to a connection past the bound: 503, the usual error
/// shape, and the connection closed.
fn busy_answer(max: usize) -> String {
    let body = serde_json::to_string(&ErrorBody {
        error: format!("the API has {max} connections open already; try again later"),
    })
    .unwrap_or_else(|_| "{\"error\":\"busy\"}".into())
        + "\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The routes of the table in the module docs, without the connection
/// bounds of [`serve`]: also for in-process callers (the fuzz targets drive
/// it with `tower::ServiceExt::oneshot`).
pub fn router(controller: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/config", get(config))
        .route("/v1/services", post(add_service))
        .route("/v1/services/{name}", get(service).delete(remove_service))
        .route("/v1/services/{name}/signals", get(signals))
        .route("/v1/services/{name}/weights", put(set_weights))
        .route("/v1/services/{name}/versions", post(add_version))
        .route(
            "/v1/services/{name}/shadow",
            put(set_shadow).delete(clear_shadow),
        )
        .route(
            "/v1/services/{name}/versions/{version}",
            delete(remove_version),
        )
        .route(
            "/v1/services/{name}/versions/{version}/backends",
            post(add_backend),
        )
        .route(
            "/v1/services/{name}/backends/{addr}",
            patch(set_backend).delete(remove_backend),
        )
        .route(
            "/v1/services/{name}/backends/{addr}/drain",
            get(wait_drained),
        )
        .route("/v1/rollouts", get(rollout_list).post(rollout_start))
        .route("/v1/rollouts/{name}", get(rollout_status))
        .route("/v1/rollouts/{name}/history", get(rollout_history))
        .route("/v1/rollouts/{name}/report", get(rollout_report))
        .route("/v1/rollouts/{name}/{command}", post(rollout_command))
        .route("/v1/services/{name}/targets", get(targets).post(add_target))
        .route(
            "/v1/services/{name}/targets/{addr}/{len}",
            delete(remove_target),
        )
        .route("/v1/flow", get(flow))
        .route("/v1/reload", post(reload))
        .route("/v1/detach", post(detach))
        // After every route: it applies to the routes already there.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_such_path)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(log_request))
        .with_state(controller)
}

/// The answer of a request that went through: pretty JSON and a newline
/// (the CLI prints it as it comes).
struct Answer(String);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        json_response(StatusCode::OK, self.0)
    }
}

/// Why a request was refused, for [`log_request`].
#[derive(Clone)]
struct Refusal(String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_string(&ErrorBody {
            error: self.to_string(),
        })
        .unwrap_or_else(|_| "{\"error\":\"internal\"}".into());
        let mut resp = json_response(self.status(), body);
        resp.extensions_mut().insert(Refusal(self.to_string()));
        resp
    }
}

type ApiResult = Result<Answer, ApiError>;

fn lock(controller: &Shared) -> Result<std::sync::MutexGuard<'_, Controller>, ApiError> {
    controller
        .lock()
        .map_err(|_| ApiError::Internal("controller state is poisoned".into()))
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    match resp.extensions().get::<Refusal>() {
        None => debug!(%method, %path, "API request"),
        Some(Refusal(e)) => info!(%method, %path, error = %e, "API request refused"),
    }
    resp
}

/// A known path with a method it does not take.
async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::BadRequest(format!("method {method} is not allowed on {}", uri.path()))
}

async fn no_such_path(uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no such API path: {}", uri.path()))
}

/// `?window=DURATION`.
#[derive(Deserialize)]
struct WindowQuery {
    window: Option<String>,
}

/// `GET /v1/status[?window=60s]`.
async fn status(
    State(c): State<Shared>,
    Params(Query(q)): Params<Query<WindowQuery>>,
) -> ApiResult {
    let window = window_ms(q.window.as_deref())?;
    to_json(&lock(&c)?.status_over(window)?)
}

/// `GET /v1/services/{name}/signals[?window=60s]`.
async fn signals(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
    Params(Query(q)): Params<Query<WindowQuery>>,
) -> ApiResult {
    let window = window_ms(q.window.as_deref())?;
    to_json(&lock(&c)?.signals_of(&name, window)?)
}

/// `GET /v1/config`.
async fn config(State(c): State<Shared>) -> ApiResult {
    to_json(lock(&c)?.config())
}

/// `PUT /v1/services/{name}/weights`.
async fn set_weights(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
    JsonBody(req): JsonBody<WeightsRequest>,
) -> ApiResult {
    to_json(&lock(&c)?.set_weights(&name, &req.weights)?)
}

/// `POST /v1/services`.
async fn add_service(State(c): State<Shared>, JsonBody(spec): JsonBody<ServiceSpec>) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::add_service(cfg, &spec))?;
    to_json(&c.report_of(&spec.name)?)
}

/// `GET /v1/services/{name}`.
async fn service(State(c): State<Shared>, Params(Path(name)): Params<Path<String>>) -> ApiResult {
    to_json(&lock(&c)?.report_of(&name)?)
}

/// `GET /v1/services/{name}/targets`.
async fn targets(State(c): State<Shared>, Params(Path(name)): Params<Path<String>>) -> ApiResult {
    to_json(&lock(&c)?.report_of(&name)?.targets)
}

/// `POST /v1/services/{name}/targets`.
async fn add_target(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
    JsonBody(spec): JsonBody<TargetSpec>,
) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::add_target(cfg, &name, &spec))?;
    to_json(&c.report_of(&name)?.targets)
}

/// `DELETE /v1/services/{name}/targets/{addr}/{len}`.
async fn remove_target(
    State(c): State<Shared>,
    Params(Path((name, addr, len))): Params<Path<(String, String, String)>>,
) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::remove_target(cfg, &name, &format!("{addr}/{len}")))?;
    to_json(&c.report_of(&name)?.targets)
}

/// `DELETE /v1/services/{name}`.
async fn remove_service(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
) -> ApiResult {
    let removed = lock(&c)?.edit(|cfg| edit::remove_service(cfg, &name))?;
    to_json(&serde_json::json!({ "removed": removed }))
}

/// `POST /v1/services/{name}/versions`.
async fn add_version(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
    JsonBody(spec): JsonBody<VersionSpec>,
) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::add_version(cfg, &name, &spec))?;
    to_json(&c.report_of(&name)?)
}

/// `PUT /v1/services/{name}/shadow`.
async fn set_shadow(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
    JsonBody(spec): JsonBody<edit::ShadowSpec>,
) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::set_shadow(cfg, &name, &spec))?;
    to_json(&c.report_of(&name)?)
}

/// `DELETE /v1/services/{name}/shadow`.
async fn clear_shadow(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::clear_shadow(cfg, &name))?;
    to_json(&c.report_of(&name)?)
}

/// `DELETE /v1/services/{name}/versions/{version}`.
async fn remove_version(
    State(c): State<Shared>,
    Params(Path((name, version))): Params<Path<(String, String)>>,
) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::remove_version(cfg, &name, &version))?;
    to_json(&c.report_of(&name)?)
}

/// `POST /v1/services/{name}/versions/{version}/backends`.
async fn add_backend(
    State(c): State<Shared>,
    Params(Path((name, version))): Params<Path<(String, String)>>,
    JsonBody(spec): JsonBody<BackendSpec>,
) -> ApiResult {
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::add_backend(cfg, &name, &version, &spec))?;
    to_json(&c.report_of(&name)?)
}

/// `PATCH /v1/services/{name}/backends/{addr:port}`.
async fn set_backend(
    State(c): State<Shared>,
    Params(Path((name, addr))): Params<Path<(String, String)>>,
    JsonBody(patch): JsonBody<BackendPatch>,
) -> ApiResult {
    let addr = parse_addr("backend", &addr)?;
    let mut c = lock(&c)?;
    c.edit(|cfg| edit::set_backend(cfg, &name, addr, &patch))?;
    to_json(&c.report_of(&name)?)
}

/// `?force=true|false`.
#[derive(Deserialize)]
struct ForceQuery {
    force: Option<String>,
}

/// `DELETE /v1/services/{name}/backends/{addr:port}[?force=true]`: waits
/// for a live-flow count without the controller's lock.
async fn remove_backend(
    State(c): State<Shared>,
    Params(Path((name, addr))): Params<Path<(String, String)>>,
    Params(Query(q)): Params<Query<ForceQuery>>,
) -> ApiResult {
    let addr = parse_addr("backend", &addr)?;
    let force = match q.force.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "force={other:?}: use force=true or force=false"
            )));
        }
    };
    to_json(&crate::controller::remove_backend(&c, &name, addr, force).await?)
}

/// Longest `?timeout=` of a drain wait.
const MAX_DRAIN_WAIT_SECS: u64 = 3600;

/// `?timeout=SECONDS`.
#[derive(Deserialize)]
struct DrainQuery {
    timeout: Option<String>,
}

/// `GET /v1/services/{name}/backends/{addr:port}/drain[?timeout=SECONDS]`:
/// the backend's live flows from a count taken after the request came,
/// once they reached 0 or after `timeout` seconds (default 0: at once).
/// Waits without the controller's lock.
async fn wait_drained(
    State(c): State<Shared>,
    Params(Path((name, addr))): Params<Path<(String, String)>>,
    Params(Query(q)): Params<Query<DrainQuery>>,
) -> ApiResult {
    let addr = parse_addr("backend", &addr)?;
    let secs = match q.timeout {
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
    let wait =
        crate::controller::wait_drained(&c, &name, addr, Duration::from_secs(secs), |_| {}).await?;
    to_json(&wait)
}

/// `?service=NAME&client=ADDR:PORT`.
#[derive(Deserialize)]
struct FlowQuery {
    service: Option<String>,
    client: Option<String>,
}

/// `GET /v1/flow?service=NAME&client=ADDR:PORT`.
async fn flow(State(c): State<Shared>, Params(Query(q)): Params<Query<FlowQuery>>) -> ApiResult {
    let service = q
        .service
        .ok_or_else(|| ApiError::BadRequest("missing ?service=NAME".into()))?;
    let client = q
        .client
        .ok_or_else(|| ApiError::BadRequest("missing &client=ADDR:PORT".into()))?;
    let client: std::net::SocketAddrV4 = client.parse().map_err(|_| {
        ApiError::BadRequest(format!("client {client:?} is not an IPv4 address:port"))
    })?;
    to_json(&lock(&c)?.flow(&service, client)?)
}

/// Now on the rollouts' clock (`CLOCK_MONOTONIC` ms).
fn now_ms() -> u64 {
    crate::dataplane::monotonic_ns() / 1_000_000
}

/// `GET /v1/rollouts`: every rollout, running or finished.
async fn rollout_list(State(c): State<Shared>) -> ApiResult {
    to_json(&lock(&c)?.rollout_list(now_ms()))
}

/// `POST /v1/rollouts`: start one ([`StartRequest`]).
async fn rollout_start(
    State(c): State<Shared>,
    JsonBody(req): JsonBody<StartRequest>,
) -> ApiResult {
    let (report, hooks) = lock(&c)?.rollout_start(&req, now_ms())?;
    crate::rollout::driver::spawn_hooks(&c, hooks);
    to_json(&report)
}

/// `GET /v1/rollouts/{name}`: where it stands.
async fn rollout_status(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
) -> ApiResult {
    to_json(&lock(&c)?.rollout_report(&name, now_ms())?)
}

/// `GET /v1/rollouts/{name}/history`: its timeline and analysis samples.
async fn rollout_history(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
) -> ApiResult {
    to_json(lock(&c)?.rollout_book(&name)?)
}

/// `GET /v1/rollouts/{name}/report`: the timeline as an SVG plot.
async fn rollout_report(
    State(c): State<Shared>,
    Params(Path(name)): Params<Path<String>>,
) -> Result<Response, ApiError> {
    let svg = {
        let c = lock(&c)?;
        crate::rollout::plot::svg(&name, c.rollout_book(&name)?)
    };
    let mut resp = Response::new(axum::body::Body::from(svg));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("image/svg+xml"),
    );
    Ok(resp)
}

/// `POST /v1/rollouts/{name}/{command}`: promote, promote-full, pause,
/// resume, abort, retry, undo.
async fn rollout_command(
    State(c): State<Shared>,
    Params(Path((name, command))): Params<Path<(String, String)>>,
) -> ApiResult {
    use crate::rollout::machine::Command;
    let command = Command::ALL
        .into_iter()
        .find(|k| k.name() == command)
        .ok_or_else(|| {
            let all: Vec<&str> = Command::ALL.iter().map(|k| k.name()).collect();
            ApiError::NotFound(format!(
                "no rollout command {command:?}; commands: {}",
                all.join(", ")
            ))
        })?;
    let (report, hooks) = lock(&c)?.rollout_command(&name, command, now_ms())?;
    crate::rollout::driver::spawn_hooks(&c, hooks);
    to_json(&report)
}

/// `POST /v1/reload`.
async fn reload(State(c): State<Shared>) -> ApiResult {
    let changes = lock(&c)?.reload()?;
    to_json(&serde_json::json!({ "changes": changes }))
}

/// `POST /v1/detach`: the daemon stops once the answer is out.
async fn detach(State(c): State<Shared>) -> ApiResult {
    let removed = lock(&c)?.detach()?;
    to_json(&serde_json::json!({ "removed": removed }))
}

/// An axum extractor (`Path`, `Query`) whose refusal is an [`ApiError`]
/// (400, or 500 for a route that names no such parameter), not axum's
/// plain-text answer.
struct Params<E>(E);

impl<S, E> FromRequestParts<S> for Params<E>
where
    S: Send + Sync,
    E: FromRequestParts<S>,
    E::Rejection: IntoResponse,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let refused = match E::from_request_parts(parts, state).await {
            Ok(e) => return Ok(Self(e)),
            Err(rejection) => rejection.into_response(),
        };
        Err(rejection_error(refused).await)
    }
}

/// An axum rejection as an [`ApiError`] with the same status class and text.
async fn rejection_error(resp: Response) -> ApiError {
    let status = resp.status();
    let text = axum::body::to_bytes(resp.into_body(), MAX_BODY)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    if status.is_server_error() {
        ApiError::Internal(text)
    } else {
        ApiError::BadRequest(text)
    }
}

/// A body type's example, shown when a body does not decode.
trait Example {
    const EXAMPLE: &'static str;
}

impl Example for WeightsRequest {
    const EXAMPLE: &'static str = r#"{"weights": {"blue": 90, "green": 10}}"#;
}

impl Example for ServiceSpec {
    const EXAMPLE: &'static str = r#"{"name": "web", "vip": "10.0.0.10:80", "versions": [{"name": "blue", "weight": 100, "backends": [{"address": "10.0.2.1:8080"}]}]}"#;
}

impl Example for VersionSpec {
    const EXAMPLE: &'static str =
        r#"{"name": "green", "weight": 0, "backends": [{"address": "10.0.2.3:8080"}]}"#;
}

impl Example for edit::ShadowSpec {
    const EXAMPLE: &'static str = r#"{"version": "canary", "percent": 10}"#;
}

impl Example for BackendSpec {
    const EXAMPLE: &'static str = r#"{"address": "10.0.2.4:8080", "weight": 1, "state": "active"}"#;
}

impl Example for TargetSpec {
    const EXAMPLE: &'static str = r#"{"cidr": "10.0.1.96/28", "version": "green"}"#;
}

impl Example for BackendPatch {
    const EXAMPLE: &'static str = r#"{"weight": 2, "state": "drain"}"#;
}

impl Example for StartRequest {
    const EXAMPLE: &'static str = r#"{"service": "web", "to": "green", "strategy": "canary", "steps": [5, 10, 25, 50, 100], "step_ms": 60000}"#;
}

/// A JSON request body of at most [`MAX_BODY`] bytes, whatever its
/// content type says (`curl -d` sends a form's).
struct JsonBody<T>(T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Example,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let read = tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, state));
        let body = match read.await {
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "the request body did not arrive within {BODY_TIMEOUT:?}"
                )));
            }
            Ok(Ok(b)) => b,
            Ok(Err(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::TooLarge(format!(
                    "the request body is larger than {MAX_BODY} bytes"
                )));
            }
            Ok(Err(e)) => {
                return Err(ApiError::BadRequest(format!(
                    "could not read the request body: {}",
                    e.body_text()
                )));
            }
        };
        body_json(&body, T::EXAMPLE).map(Self)
    }
}

/// Decodes a JSON body, with an example of a good one in the error.
fn body_json<T: DeserializeOwned>(body: &[u8], example: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("body must be JSON like {example}: {e}")))
}

/// `?window=DURATION` (`60s`, `5m`, `90s`...) in ms; the default
/// ([`crate::signals::DEFAULT_WINDOW_SECS`]) without one.
fn window_ms(window: Option<&str>) -> Result<u64, ApiError> {
    match window {
        None => Ok(crate::signals::DEFAULT_WINDOW_SECS * 1000),
        Some(w) => crate::signals::parse_window(w).map_err(ApiError::BadRequest),
    }
}

fn to_json<T: Serialize>(v: &T) -> ApiResult {
    serde_json::to_string_pretty(v)
        .map(Answer)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body + "\n",
    )
        .into_response()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{config::Config, kernel::FakeDataplane};

    const TEXT: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[[service.version]]
name = "blue"
weight = 100
backends = ["10.0.2.2:8080", "10.0.2.3:8080"]

[[service.version]]
name = "green"
weight = 0
backends = ["10.0.2.4:8080"]
"#;

    /// A served API over a fake data plane; the server stops on drop of
    /// `stop` (or when sent).
    struct Api {
        socket: std::path::PathBuf,
        fake: FakeDataplane,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<()>,
    }

    impl Api {
        fn start() -> Self {
            Self::start_with(Limits::default())
        }

        fn start_with(limits: Limits) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let socket = std::env::temp_dir().join(format!(
                "splitter-api-test-{}-{}.sock",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&socket);
            let listener = UnixListener::bind(&socket).unwrap();
            let config = Config::parse(TEXT).unwrap();
            let mut fake = FakeDataplane::default();
            crate::kernel::DataplaneOps::apply(&mut fake, &config).unwrap();
            let controller = Arc::new(std::sync::Mutex::new(Controller::new(
                config,
                fake.clone(),
                None,
            )));
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let shutdown = async {
                let _ = stopped.await;
            };
            let server = tokio::spawn(serve_with(listener, controller, shutdown, limits));
            Self {
                socket,
                fake,
                stop: Some(stop),
                server,
            }
        }

        /// Sends `method path` with `body`; the status and the body of the answer.
        async fn send(&self, method: &str, path: &str, body: &[u8]) -> (u16, String, String) {
            let mut s = tokio::net::UnixStream::connect(&self.socket).await.unwrap();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
            s.write_all(body).await.unwrap();
            // A refused body may be left unread: the server then resets
            // the connection after its answer.
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            let out = String::from_utf8(out).unwrap();
            let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP answer");
            let status = head.split(' ').nth(1).unwrap().parse().unwrap();
            (status, head.to_ascii_lowercase(), body.to_string())
        }

        /// The `error` of an error answer, checking its status.
        async fn refused(&self, method: &str, path: &str, body: &str, status: u16) -> String {
            let (got, head, text) = self.send(method, path, body.as_bytes()).await;
            assert_eq!(got, status, "{method} {path}: {text}");
            assert!(head.contains("content-type: application/json"), "{head}");
            serde_json::from_str::<ErrorBody>(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: {text:?}: {e}"))
                .error
        }
    }

    impl Drop for Api {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    #[tokio::test]
    async fn routes_answer_pretty_json() {
        let api = Api::start();
        let (status, head, body) = api.send("GET", "/v1/status?window=30s", b"").await;
        assert_eq!(status, 200, "{body}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(body.ends_with("}\n"), "{body:?}");
        let report: StatusReport = serde_json::from_str(&body).unwrap();
        assert_eq!(report.services.len(), 1);
        let (status, _, body) = api.send("GET", "/v1/services/web", b"").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            serde_json::from_str::<ServiceReport>(&body).unwrap().name,
            "web"
        );
        let (status, _, body) = api.send("GET", "/v1/config", b"").await;
        assert_eq!(status, 200, "{body}");
        let (status, _, body) = api
            .send(
                "PUT",
                "/v1/services/web/weights",
                br#"{"weights": {"blue": 90, "green": 10}}"#,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let weights: Vec<u32> = api.fake.last().unwrap().services[0]
            .versions
            .iter()
            .map(|v| v.weight)
            .collect();
        assert_eq!(weights, [90, 10]);
        let (status, _, body) = api
            .send(
                "PATCH",
                "/v1/services/web/backends/10.0.2.3:8080",
                br#"{"weight": 3}"#,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, _, body) = api
            .send("GET", "/v1/flow?service=web&client=10.0.1.2:40000", b"")
            .await;
        assert_eq!(status, 200, "{body}");
    }

    #[tokio::test]
    async fn refusals_keep_their_status_and_message() {
        let api = Api::start();
        for (method, path, body, status, want) in [
            ("GET", "/v1/nope", "", 404, "no such API path: /v1/nope"),
            (
                "GET",
                "/v1/services/web/backends",
                "",
                404,
                "no such API path",
            ),
            (
                "DELETE",
                "/v1/status",
                "",
                400,
                "method DELETE is not allowed on /v1/status",
            ),
            (
                "GET",
                "/v1/services/web/weights",
                "",
                400,
                "method GET is not allowed on /v1/services/web/weights",
            ),
            (
                "PUT",
                "/v1/services/web/backends/10.0.2.2:8080",
                "",
                400,
                "method PUT is not allowed",
            ),
            (
                "PUT",
                "/v1/services/web/weights",
                "{not json",
                400,
                r#"body must be JSON like {"weights": {"blue": 90, "green": 10}}: "#,
            ),
            (
                "POST",
                "/v1/services",
                r#"{"name": "api""#,
                400,
                r#"body must be JSON like {"name": "web", "vip""#,
            ),
            (
                "PATCH",
                "/v1/services/web/backends/nope",
                r#"{"weight": 2}"#,
                400,
                "not an IPv4 address:port",
            ),
            ("GET", "/v1/services/nope", "", 404, "no service named"),
            (
                "DELETE",
                "/v1/services/web/backends/10.0.2.77:8080",
                "",
                404,
                "has no backend 10.0.2.77:8080",
            ),
            (
                "DELETE",
                "/v1/services/web/backends/10.0.2.2:8080?force=maybe",
                "",
                400,
                r#"force="maybe": use force=true or force=false"#,
            ),
            (
                "GET",
                "/v1/services/web/backends/10.0.2.2:8080/drain?timeout=9999",
                "",
                400,
                r#"timeout="9999": seconds to wait, 0..=3600"#,
            ),
            (
                "GET",
                "/v1/flow?service=web",
                "",
                400,
                "missing &client=ADDR:PORT",
            ),
            (
                "GET",
                "/v1/flow?client=10.0.1.2:1",
                "",
                400,
                "missing ?service=NAME",
            ),
            (
                "GET",
                "/v1/flow?service=web&client=zzz",
                "",
                400,
                r#"client "zzz" is not an IPv4 address:port"#,
            ),
            ("GET", "/v1/status?window=", "", 400, ""),
            ("GET", "/v1/services/%FF", "", 400, "Invalid URL"),
        ] {
            let error = api.refused(method, path, body, status).await;
            assert!(error.contains(want), "{method} {path}: {error:?}");
        }
        let before = api.fake.with(|s| s.published.len());
        assert_eq!(before, 1, "a refused request published something");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413() {
        let api = Api::start();
        let big = format!(
            r#"{{"weights": {{"blue": 1, "x": "{}"}}}}"#,
            "a".repeat(MAX_BODY)
        );
        let error = api
            .refused("PUT", "/v1/services/web/weights", &big, 413)
            .await;
        assert_eq!(
            error,
            format!("the request body is larger than {MAX_BODY} bytes")
        );
        // One byte under the limit is read (and refused for what it says).
        let error = api
            .refused(
                "PUT",
                "/v1/services/web/weights",
                &" ".repeat(MAX_BODY - 1),
                400,
            )
            .await;
        assert!(error.starts_with("body must be JSON"), "{error}");
    }

    #[tokio::test]
    async fn serve_returns_when_shutdown_resolves() {
        let mut api = Api::start();
        let (status, _, _) = api.send("GET", "/v1/status", b"").await;
        assert_eq!(status, 200);
        // An idle connection does not hold the server up.
        let _idle = tokio::net::UnixStream::connect(&api.socket).await.unwrap();
        let _ = api.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(1), &mut api.server)
            .await
            .expect("serve returned")
            .unwrap();
    }

    /// Reads until the server closes `s` (EOF or an error), at most `wait`;
    /// what it sent before.
    async fn closed_within(s: &mut tokio::net::UnixStream, wait: Duration) -> Option<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(wait, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .ok()?;
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn idle_and_half_sent_connections_are_closed_and_the_excess_refused() {
        let api = Api::start_with(Limits {
            header_timeout: Duration::from_millis(300),
            max_connections: 3,
        });
        let connect = || tokio::net::UnixStream::connect(&api.socket);
        let mut idle = connect().await.unwrap();
        let mut half = connect().await.unwrap();
        half.write_all(b"GET /v1/sta").await.unwrap();
        let mut kept = connect().await.unwrap();
        // The fourth is over the bound: 503 in the usual shape, then closed.
        let mut over = connect().await.unwrap();
        let answer = closed_within(&mut over, Duration::from_secs(2))
            .await
            .expect("the connection over the bound was closed");
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer:?}");
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        let error = serde_json::from_str::<ErrorBody>(body).unwrap().error;
        assert!(error.contains("3 connections open"), "{error}");
        // A kept-alive connection answers, then idles like the others.
        kept.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let n = kept.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
        for (what, s) in [
            ("idle", &mut idle),
            ("half-sent", &mut half),
            ("kept", &mut kept),
        ] {
            assert!(
                closed_within(s, Duration::from_secs(3)).await.is_some(),
                "the {what} connection is still open"
            );
        }
        // Their permits are back: an ordinary request goes through.
        let (status, _, body) = api.send("GET", "/v1/status", b"").await;
        assert_eq!(status, 200, "{body}");
    }
}
