//! The controller's state: the running [`Config`] and the [`Dataplane`] it
//! is published into. Every change goes through here, validated first and
//! published second, so a refused change leaves both exactly as they were.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    path::PathBuf,
    sync::Arc,
};

use tokio::sync::Notify;
use tracing::{error, info};

use crate::{
    config::{BackendState, Config, HealthConfig, ServiceConfig, parse_weight_args},
    dataplane::{DataplaneError, TableWalker, monotonic_ns},
    edit::{self, EditError, RemoveGuard},
    effective::{self, Overlay},
    kernel::DataplaneOps,
    pins,
    report::{
        AttachmentReport, BackendReport, BackendSignalsReport, ConnectionReport, DataplaneReport,
        FlowReport, ProgramReport, RolloutsEnded, ServiceReport, SignalsReport, StatusReport,
        VersionReport, VersionSignals,
    },
    rollout::book::Book,
    signals::{self, Counters, MetricReading, Window, history::History},
    state::{self, State},
    table,
    tee::{Plan, TeeMaps, TeeStats},
};

/// Running config plus the data plane it is published into.
pub struct Controller {
    config: Config,
    dataplane: Box<dyn DataplaneOps>,
    /// Where the state file lives (`None`: nothing is persisted).
    state_dir: Option<PathBuf>,
    /// Set by a detach request; the daemon stops when it fires.
    pub detach: Arc<Notify>,
    /// The file `reload` reads.
    config_path: Option<PathBuf>,
    /// Digest of that file's text when it was last read (see
    /// [`crate::config::file_digest`]).
    config_digest: String,
    /// Live flows per backend id and when they were counted (ns,
    /// `CLOCK_MONOTONIC`), renewed by the daemon's walker outside this
    /// lock: a walk of the connection table is not free.
    live_flows: LiveFlows,
    /// What is applied over the config at every publish: the backends the
    /// health checks found down. Not saved: a restarted daemon starts with
    /// every backend up.
    overlay: Overlay,
    /// Once-a-second samples of every backend's signal counters (see
    /// [`Controller::sample_signals`]). Not saved.
    history: History<BackendKey>,
    /// The external metric's last reading per (service, version), and when
    /// it was taken (ms, `CLOCK_MONOTONIC`).
    metric_readings: BTreeMap<(String, String), (u64, MetricReading)>,
    /// Rollouts by service, running and finished (see
    /// [`crate::rollout::driver`]); saved in the state file.
    pub(crate) rollouts: BTreeMap<String, Book>,
    /// Rollouts ended since this daemon started, by (service, outcome).
    pub(crate) rollouts_ended: BTreeMap<(String, String), u64>,
    /// Why the pins vanish with this process, when they do
    /// ([`pins::ephemeral_pins`], accepted by `--ephemeral-pins`).
    ephemeral_pins: Option<String>,
    /// The TCP shadow tee's counters (written by the daemon's tee task).
    tee_stats: Arc<TeeStats>,
    /// Fired on every publish, so the tee task follows a change at once.
    tee_wake: Arc<Notify>,
}

/// What the daemon's tee task is handed ([`Controller::tee_feed`]): the
/// maps, the counters it writes, and what wakes it on a publish.
pub type TeeFeed = (TeeMaps, Arc<TeeStats>, Arc<Notify>);

/// A backend in the signal history: (service, version, address).
pub type BackendKey = (String, String, SocketAddrV4);

/// The latest live-flow count per backend id and when it was taken (ns,
/// `CLOCK_MONOTONIC`). Shared with the daemon's counting task, which
/// renews it outside the controller's lock.
pub type LiveFlows = Arc<std::sync::Mutex<Option<(u64, BTreeMap<u32, u64>)>>>;

/// Why the controller refused or failed a request. Nothing changed unless
/// the variant says otherwise; the API maps each to its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The request is not valid (bad value, refused guard, conflict).
    #[error("{0}")]
    Invalid(String),
    /// An unknown service, version, backend or flow.
    #[error("{0}")]
    NotFound(String),
    /// The kernel or the system refused (a map update, a read); what was
    /// live stays live.
    #[error("{0}")]
    Internal(String),
}

impl From<EditError> for ControllerError {
    fn from(e: EditError) -> Self {
        match e {
            EditError::NotFound(m) => Self::NotFound(m),
            EditError::Invalid(m) => Self::Invalid(m),
        }
    }
}

impl Controller {
    /// Wraps a data plane into which `config` has already been applied.
    pub fn new(
        config: Config,
        dataplane: impl DataplaneOps + 'static,
        state_dir: Option<PathBuf>,
    ) -> Self {
        Self {
            config,
            dataplane: Box::new(dataplane),
            state_dir,
            detach: Arc::new(Notify::new()),
            config_path: None,
            config_digest: String::new(),
            live_flows: LiveFlows::default(),
            overlay: Overlay::default(),
            history: History::new(signals::HISTORY_SECS),
            metric_readings: BTreeMap::new(),
            rollouts: BTreeMap::new(),
            rollouts_ended: BTreeMap::new(),
            ephemeral_pins: None,
            tee_stats: Arc::default(),
            tee_wake: Arc::new(Notify::new()),
        }
    }

    /// Records that the pins vanish with this process, and why (shown by
    /// `splitter status`).
    pub fn with_ephemeral_pins(mut self, why: Option<String>) -> Self {
        self.ephemeral_pins = why;
        self
    }

    /// Takes over the rollouts saved by an earlier daemon (they resume when
    /// the driver sends them `Restored`).
    pub fn with_rollouts(mut self, rollouts: BTreeMap<String, Book>) -> Self {
        self.rollouts = rollouts;
        self
    }

    /// Sets the file [`Controller::reload`] reads, and the digest of the
    /// text the running config started from.
    pub fn with_config_path(mut self, path: PathBuf, digest: String) -> Self {
        self.config_path = Some(path);
        self.config_digest = digest;
        self
    }

    /// Re-reads the configuration file and applies it as a diff: services
    /// that did not change keep their tables untouched, established flows
    /// are never touched. The file's weights win over runtime ones. An
    /// invalid file is refused as a whole and nothing changes.
    ///
    /// # Errors
    /// [`ControllerError::Invalid`] with every problem of the file, or when the
    /// `[dataplane]` section changed (that needs a restart);
    /// [`ControllerError::Internal`] when the kernel refused (the old config stays live).
    pub fn reload(&mut self) -> Result<Vec<String>, ControllerError> {
        let path = self.config_path.clone().ok_or_else(|| {
            ControllerError::Invalid("this daemon has no configuration file to reload".into())
        })?;
        let (next, digest) = Config::load_with_digest(&path).map_err(|e| {
            ControllerError::Invalid(format!("reload refused, nothing changed: {e}"))
        })?;
        if next.dataplane != self.config.dataplane {
            return Err(ControllerError::Invalid(
                "reload refused, nothing changed: the [dataplane] section differs from the running one; restart the daemon to change interfaces, mode, SNAT address, XDP mode, pin_dir or conn_capacity".into(),
            ));
        }
        if next.metrics != self.config.metrics {
            return Err(ControllerError::Invalid(
                "reload refused, nothing changed: the [metrics] section differs from the running one; restart the daemon to move or turn off the metrics endpoint".into(),
            ));
        }
        let mut next = next;
        let mut changes = Vec::new();
        for (service, book) in &self.rollouts {
            let r = &book.rollout;
            let (Some(file), Some(running)) = (next.service(service), self.config.service(service))
            else {
                continue;
            };
            let mut file_with_running_weights = file.clone();
            for v in &mut file_with_running_weights.versions {
                if let Some(rv) = running.versions.iter().find(|x| x.name == v.name) {
                    v.weight = rv.weight;
                }
            }
            crate::rollout::book::keep_rollout_targets(
                &mut file_with_running_weights,
                running,
                book,
            );
            if r.phase.is_running() && file_with_running_weights != *running {
                return Err(ControllerError::Invalid(format!(
                    "reload refused, nothing changed: the file changes service {service}, which has a rollout in progress ({} -> {}); let it finish or end it first (`splitter rollout abort {service}`)",
                    r.spec.from, r.spec.to
                )));
            }
        }
        changes.extend(crate::rollout::book::supersede(
            &mut next,
            &self.rollouts,
            &self.config,
        ));
        for s in &next.services {
            match self.config.service(&s.name) {
                None => changes.push(format!("added service {}", s.name)),
                Some(old) if old != s => changes.push(format!("changed service {}", s.name)),
                Some(_) => {}
            }
        }
        for s in &self.config.services {
            if next.service(&s.name).is_none() {
                changes.push(format!("removed service {}", s.name));
            }
        }
        if let Err(e) = self.write_config(&next) {
            return Err(ControllerError::Internal(format!(
                "reload failed, the previous configuration stays live: {e}"
            )));
        }
        self.config = next;
        self.config_digest = digest;
        if let Err(e) = self.persist() {
            error!(error = %e, "reloaded, but the state file could not be written");
        }
        info!(changes = ?changes, "configuration reloaded");
        Ok(changes)
    }

    /// Writes the state file: the running services and live ids.
    ///
    /// # Errors
    /// The write failed; the previous file stays in place.
    pub fn persist(&self) -> Result<(), state::StateError> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        state::save(
            dir,
            &State {
                format: state::FORMAT,
                weights: BTreeMap::new(),
                config_digest: self.config_digest.clone(),
                services: Some(self.config.services.clone()),
                layout: self.dataplane.layout(),
                rollouts: self.rollouts.clone(),
            },
        )
    }

    /// Publishes `next` (already validated) in place of the running
    /// config, then saves it. On a kernel refusal the running config is put
    /// back and stays live.
    fn publish(&mut self, next: Config, what: &str) -> Result<(), ControllerError> {
        if let Err(e) = self.write_config(&next) {
            return Err(ControllerError::Internal(format!(
                "{what}: the kernel refused the update, nothing changed: {e}"
            )));
        }
        self.config = next;
        info!(change = what, "configuration changed");
        if let Err(e) = self.persist() {
            error!(error = %e, "the change is live but could not be saved; a restart would lose it");
        }
        Ok(())
    }

    /// One service's report (`GET /v1/services/{name}`).
    ///
    /// # Errors
    /// [`ControllerError::NotFound`] for an unknown service; [`ControllerError::Internal`]
    /// when a map cannot be read.
    pub fn report_of(&self, service: &str) -> Result<ServiceReport, ControllerError> {
        let svc = self
            .config
            .service(service)
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {service:?}")))?;
        self.service_report(svc, signals::DEFAULT_WINDOW_SECS * 1000)
    }

    /// Records every configured backend's signal counters at `at_ms`
    /// (`CLOCK_MONOTONIC` ms) in the history; backends no longer configured
    /// leave it. The daemon calls it once a second.
    ///
    /// # Errors
    /// [`ControllerError::Internal`] when a map cannot be read (nothing recorded).
    pub fn sample_signals(&mut self, at_ms: u64) -> Result<(), ControllerError> {
        let mut samples = Vec::new();
        for s in &self.config.services {
            for v in &s.versions {
                for b in &v.backends {
                    let c = self.counters_of(&s.name, &v.name, b.address)?;
                    samples.push(((s.name.clone(), v.name.clone(), b.address), c));
                }
            }
        }
        self.history.record(at_ms, samples);
        Ok(())
    }

    /// Keeps `reading`, taken at `at_ms`, as the external metric of
    /// `service`'s `version`.
    pub fn store_metric(
        &mut self,
        service: &str,
        version: &str,
        at_ms: u64,
        reading: MetricReading,
    ) {
        self.metric_readings
            .insert((service.to_string(), version.to_string()), (at_ms, reading));
    }

    /// The window of one version's signals (its backends summed) ending
    /// now, `None` while the history holds too little.
    pub fn version_window(&self, service: &str, version: &str, window_ms: u64) -> Option<Window> {
        let svc = self.config.service(service)?;
        let ver = svc.versions.iter().find(|v| v.name == version)?;
        let keys: Vec<BackendKey> = ver
            .backends
            .iter()
            .map(|b| (svc.name.clone(), ver.name.clone(), b.address))
            .collect();
        self.history
            .window_sum(keys.iter(), monotonic_ns() / 1_000_000, window_ms)
    }

    /// The external metric's last reading of a version, aged to now.
    pub fn metric_of(&self, service: &str, version: &str) -> Option<MetricReading> {
        let (at, r) = self
            .metric_readings
            .get(&(service.to_string(), version.to_string()))?;
        let now = monotonic_ns() / 1_000_000;
        Some(MetricReading {
            age_secs: now.saturating_sub(*at) as f64 / 1000.0,
            ..r.clone()
        })
    }

    /// `GET /v1/services/{name}/signals`: a service's signals over the
    /// last `window_ms`, per version and per backend.
    ///
    /// # Errors
    /// [`ControllerError::NotFound`] for an unknown service, [`ControllerError::Invalid`]
    /// for a window out of range, [`ControllerError::Internal`] when a map cannot
    /// be read.
    pub fn signals_of(
        &self,
        service: &str,
        window_ms: u64,
    ) -> Result<SignalsReport, ControllerError> {
        check_window(window_ms)?;
        let svc = self
            .config
            .service(service)
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {service:?}")))?;
        let r = self.service_report(svc, window_ms)?;
        Ok(SignalsReport {
            service: r.name,
            window_secs: window_ms as f64 / 1000.0,
            connect_timeout_ms: svc.connect_timeout_ms,
            versions: r
                .versions
                .into_iter()
                .map(|v| VersionSignals {
                    name: v.name,
                    weight: v.weight,
                    signals: v.signals,
                    window: v.window,
                    metric: v.metric,
                    backends: v
                        .backends
                        .into_iter()
                        .map(|b| BackendSignalsReport {
                            address: b.address,
                            signals: b.signals,
                            window: b.window,
                        })
                        .collect(),
                })
                .collect(),
        })
    }

    /// Applies one runtime edit (a function of [`crate::edit`] on the
    /// running config): publishes the validated result and saves it.
    /// Returns the edit's one-line description.
    ///
    /// # Errors
    /// The edit's own refusal ([`ControllerError::NotFound`] or
    /// [`ControllerError::Invalid`]), or [`ControllerError::Internal`] when the kernel
    /// refuses (the running config then stays live).
    pub fn edit(
        &mut self,
        f: impl FnOnce(&Config) -> Result<(Config, String), EditError>,
    ) -> Result<String, ControllerError> {
        let (next, what) = f(&self.config)?;
        self.refuse_during_rollouts(&next, &what)?;
        self.publish(next, &what)?;
        Ok(what)
    }

    /// [`Controller::edit`] on behalf of a rollout (no rollout guard).
    pub(crate) fn edit_by_rollout(
        &mut self,
        f: impl FnOnce(&Config) -> Result<(Config, String), EditError>,
    ) -> Result<String, ControllerError> {
        let (next, what) = f(&self.config)?;
        self.publish(next, &what)?;
        Ok(what)
    }

    /// Refuses a change to a service whose rollout is running, saying
    /// which rollout and how to end it.
    fn refuse_during_rollouts(&self, next: &Config, what: &str) -> Result<(), ControllerError> {
        for (service, book) in &self.rollouts {
            let r = &book.rollout;
            if r.phase.is_running() && next.service(service) != self.config.service(service) {
                return Err(ControllerError::Invalid(format!(
                    "{what}: refused, nothing changed: service {service} has a rollout in progress ({} -> {}, {}); let it finish (`splitter rollout status {service} --watch`) or end it first (`splitter rollout abort {service}`)",
                    r.spec.from,
                    r.spec.to,
                    r.describe(monotonic_ns() / 1_000_000)
                )));
            }
        }
        Ok(())
    }

    /// The configuration file's weights of `service` now (the running
    /// ones without a file, or when it cannot be read).
    pub(crate) fn file_weights(&self, service: &str) -> Option<BTreeMap<String, u32>> {
        let from_file = self
            .config_path
            .as_ref()
            .and_then(|p| Config::load(p).ok())
            .and_then(|c| c.service(service).cloned());
        let svc = from_file.or_else(|| self.config.service(service).cloned())?;
        Some(
            svc.versions
                .iter()
                .map(|v| (v.name.clone(), v.weight))
                .collect(),
        )
    }

    /// Is `addr` of `service` up by its health checks (or unchecked)?
    pub(crate) fn backend_up(&self, service: &str, addr: SocketAddrV4) -> bool {
        !self.overlay.down.contains(&(service.to_string(), addr))
    }

    /// The overlays applied over the config at every publish.
    pub(crate) fn overlay_mut(&mut self) -> &mut Overlay {
        &mut self.overlay
    }

    /// Publishes the running config again (after an overlay changed).
    pub(crate) fn republish(&mut self, what: &str) -> Result<(), ControllerError> {
        let running = self.config.clone();
        self.write_config(&running).map_err(|e| {
            ControllerError::Internal(format!("{what}: the kernel refused the update: {e}"))
        })
    }

    /// The window of some backends of a version, summed.
    pub(crate) fn backends_window(
        &self,
        service: &str,
        version: &str,
        backends: &[SocketAddrV4],
        window_ms: u64,
    ) -> Option<Window> {
        let keys: Vec<BackendKey> = backends
            .iter()
            .map(|b| (service.to_string(), version.to_string(), *b))
            .collect();
        self.history
            .window_sum(keys.iter(), monotonic_ns() / 1_000_000, window_ms)
    }

    /// Removes a backend: refused while it is active or carries live flows,
    /// unless `force`. `live_flows` is its count of live flows, taken after
    /// the request came (see [`remove_backend`], which waits for one
    /// outside the lock): a drained backend gains no flows, so that count
    /// can only be too high, never too low.
    ///
    /// # Errors
    /// As [`edit::remove_backend`], or the kernel refusing.
    pub fn remove_backend_counted(
        &mut self,
        service: &str,
        addr: SocketAddrV4,
        force: bool,
        live_flows: u64,
    ) -> Result<ServiceReport, ControllerError> {
        let guard = RemoveGuard { live_flows, force };
        self.edit(|c| edit::remove_backend(c, service, addr, guard))?;
        self.report_of(service)
    }

    /// What the data plane gets: the running config with the controller's
    /// overlays (health verdicts) applied, see [`effective::effective`].
    pub fn effective(&self, config: &Config) -> Config {
        effective::effective(config, &self.overlay)
    }

    /// Writes `next` into the data plane in place of the running config,
    /// forgetting first the verdicts on backends that `next` no longer
    /// checks (a backend removed and added again, or a service whose
    /// checks were turned off, starts up again). See
    /// [`Controller::write_or_restore`] for a refusal.
    fn write_config(&mut self, next: &Config) -> Result<(), DataplaneError> {
        let down_before = self.overlay.down.clone();
        self.overlay
            .down
            .retain(|(service, addr)| health_checked(next, service, *addr));
        self.write_or_restore(Some(next), down_before)
    }

    /// Writes `next` (the running config when `None`) with the current
    /// health verdicts into the data plane. On a kernel refusal the
    /// verdicts go back to `down_before` and the running config is written
    /// again: the maps may hold part of `next`, and what was live stays live.
    fn write_or_restore(
        &mut self,
        next: Option<&Config>,
        down_before: BTreeSet<(String, SocketAddrV4)>,
    ) -> Result<(), DataplaneError> {
        let result = self
            .dataplane
            .apply(&self.effective(next.unwrap_or(&self.config)));
        self.tee_wake.notify_one();
        if result.is_err() {
            self.overlay.down = down_before;
            let _ = self.dataplane.apply(&self.effective(&self.config));
        }
        result
    }

    /// Backends to health-check now: the active and draining backends of
    /// services with `[service.health]`, with their settings and whether
    /// they are up now.
    pub fn health_targets(&self) -> Vec<(String, SocketAddrV4, HealthConfig, bool)> {
        let mut out = Vec::new();
        for svc in &self.config.services {
            let Some(h) = &svc.health else { continue };
            for v in &svc.versions {
                for b in &v.backends {
                    if b.state != BackendState::Disabled {
                        let up = !self.overlay.down.contains(&(svc.name.clone(), b.address));
                        out.push((svc.name.clone(), b.address, h.clone(), up));
                    }
                }
            }
        }
        out
    }

    /// Records a health verdict and publishes its effect.
    ///
    /// # Errors
    /// [`ControllerError::Internal`] when the kernel refuses the update (the
    /// verdict is then not recorded).
    pub fn set_health(
        &mut self,
        service: &str,
        addr: SocketAddrV4,
        up: bool,
    ) -> Result<(), ControllerError> {
        if !health_checked(&self.config, service, addr) {
            // A verdict on a backend no longer checked (removed, disabled,
            // or its service's checks turned off while a check ran).
            return Ok(());
        }
        let key = (service.to_string(), addr);
        let before = self.overlay.down.clone();
        if up {
            self.overlay.down.remove(&key);
        } else {
            self.overlay.down.insert(key);
        }
        if before == self.overlay.down {
            return Ok(());
        }
        self.write_or_restore(None, before)
            .map_err(|e| ControllerError::Internal(e.to_string()))
    }

    fn health_of(&self, svc: &ServiceConfig, addr: SocketAddrV4) -> &'static str {
        if svc.health.is_none() {
            "unchecked"
        } else if self.overlay.down.contains(&(svc.name.clone(), addr)) {
            "down"
        } else {
            "up"
        }
    }

    /// Live flows per backend id: the count the daemon's walker renews
    /// outside this lock (about once a second). Only before any count was
    /// shared (a controller without that task, as in host tests) is the
    /// table walked here.
    fn live_flows_by_id(&self) -> Result<BTreeMap<u32, u64>, ControllerError> {
        if let Ok(guard) = self.live_flows.lock()
            && let Some((_, counts)) = &*guard
        {
            return Ok(counts.clone());
        }
        self.count_live_flows(monotonic_ns())
    }

    /// The shared live-flow count, if one was taken at or after `since`
    /// (ns, `CLOCK_MONOTONIC`).
    pub fn live_flows_since(&self, since: u64) -> Option<BTreeMap<u32, u64>> {
        let guard = self.live_flows.lock().ok()?;
        let (at, counts) = guard.as_ref()?;
        (*at >= since).then(|| counts.clone())
    }

    /// Live flows of one backend in `counts` (0 for one not published).
    pub fn backend_live_flows(
        &self,
        counts: &BTreeMap<u32, u64>,
        service: &str,
        addr: SocketAddrV4,
    ) -> Result<u64, ControllerError> {
        let svc = self
            .config
            .service(service)
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {service:?}")))?;
        let version = svc
            .versions
            .iter()
            .find(|v| v.backends.iter().any(|b| b.address == addr))
            .ok_or_else(|| {
                ControllerError::NotFound(format!("service {service} has no backend {addr}"))
            })?;
        Ok(self
            .dataplane
            .backend_id(service, &version.name, addr)
            .and_then(|id| counts.get(&id).copied())
            .unwrap_or(0))
    }

    /// Live flows per backend id, counted now (at `now`) and shared.
    fn count_live_flows(&self, now: u64) -> Result<BTreeMap<u32, u64>, ControllerError> {
        let counts = self
            .dataplane
            .live_flows(now)
            .map_err(|e| ControllerError::Internal(e.to_string()))?;
        if let Ok(mut g) = self.live_flows.lock() {
            *g = Some((now, counts.clone()));
        }
        Ok(counts)
    }

    /// The shared live-flow count and a walker of the connection table of
    /// its own, for a task that renews the count (and sweeps missed connect
    /// deadlines) without the controller's lock.
    ///
    /// # Errors
    /// A map descriptor could not be duplicated.
    pub fn live_flows_feed(&self) -> std::io::Result<(LiveFlows, Option<TableWalker>)> {
        Ok((self.live_flows.clone(), self.dataplane.walker()?))
    }

    /// A backend's signal counters: the kernel's, plus what the TCP shadow
    /// tee counted for it (its connections of mirrored flows).
    fn counters_of(
        &self,
        service: &str,
        version: &str,
        addr: SocketAddrV4,
    ) -> Result<Counters, ControllerError> {
        let mut c = self
            .dataplane
            .backend_counters(service, version, addr)
            .map_err(|e| ControllerError::Internal(e.to_string()))?;
        c.add(&self.tee_stats.backend(service, version, addr));
        Ok(c)
    }

    /// What the daemon's tee task needs: the maps (`None` without a kernel
    /// data plane), the counters it writes, and what wakes it on a publish.
    ///
    /// # Errors
    /// A map descriptor could not be duplicated.
    pub fn tee_feed(&self) -> std::io::Result<Option<TeeFeed>> {
        Ok(self
            .dataplane
            .tee_maps()?
            .map(|m| (m, self.tee_stats.clone(), self.tee_wake.clone())))
    }

    /// The tees the published config asks for, each with its service's id
    /// in the tables (see [`crate::tee::plans`]).
    pub fn tee_plans(&self) -> Vec<(Plan, u32)> {
        // Asked every heartbeat: no published config to build when no TCP
        // service mirrors.
        let mirrors_tcp = self
            .config
            .services
            .iter()
            .any(|s| s.protocol == crate::config::Protocol::Tcp && s.shadow.is_some());
        if !mirrors_tcp {
            return Vec::new();
        }
        crate::tee::plans(&self.effective(&self.config))
            .into_iter()
            .filter_map(|p| {
                let id = self.dataplane.service_id(&p.service)?;
                Some((p, id))
            })
            .collect()
    }

    /// Removes the pinned program, links and maps and asks the daemon to
    /// stop: forwarding ends once this process exits.
    ///
    /// # Errors
    /// A pin that cannot be removed.
    pub fn detach(&mut self) -> Result<Vec<String>, ControllerError> {
        let removed = pins::remove_all(&self.config.dataplane.pin_dir)
            .map_err(|e| ControllerError::Internal(e.to_string()))?;
        if let Some(dir) = &self.state_dir
            && let Err(e) = state::remove(dir)
        {
            error!(error = %e, "could not remove the state file");
        }
        info!(
            pins = removed.len(),
            "detached: pins and saved state removed, stopping"
        );
        self.detach.notify_one();
        Ok(removed
            .into_iter()
            .map(|p| p.display().to_string())
            .collect())
    }

    /// The running configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Sets every version weight of `service` at once.
    ///
    /// # Errors
    /// [`ControllerError::NotFound`] for an unknown service, [`ControllerError::Invalid`]
    /// for unknown or missing versions and invalid weights, [`ControllerError::Internal`]
    /// when the kernel refuses the update (the old weights then stay live).
    pub fn set_weights(
        &mut self,
        service: &str,
        weights: &BTreeMap<String, u32>,
    ) -> Result<ServiceReport, ControllerError> {
        self.set_weights_by(service, weights, false)
    }

    /// [`Controller::set_weights`]; `by_rollout` skips the rollout guard.
    pub(crate) fn set_weights_by(
        &mut self,
        service: &str,
        weights: &BTreeMap<String, u32>,
        by_rollout: bool,
    ) -> Result<ServiceReport, ControllerError> {
        let svc = self.config.service(service).ok_or_else(|| {
            let known: Vec<&str> = self
                .config
                .services
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            ControllerError::NotFound(format!(
                "no service named {service:?}; services: {}",
                known.join(", ")
            ))
        })?;
        let args: Vec<String> = weights.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let vector =
            parse_weight_args(svc, &args).map_err(|e| ControllerError::Invalid(e.to_string()))?;
        let next = self
            .config
            .with_weights(service, &vector)
            .map_err(|e| ControllerError::Invalid(e.to_string()))?;
        let what = format!("weights of {service}: {}", args.join(" "));
        if !by_rollout {
            self.refuse_during_rollouts(&next, &what)?;
        }
        self.publish(next, &what)?;
        self.report_of(service)
    }

    /// Where `client`'s flow to `service` goes and why: the connection-table
    /// entry if the edge knows the flow, and what a new flow would get now.
    ///
    /// # Errors
    /// [`ControllerError::NotFound`] for an unknown service; [`ControllerError::Internal`]
    /// for map failures.
    pub fn flow(
        &self,
        service: &str,
        client: std::net::SocketAddrV4,
    ) -> Result<FlowReport, ControllerError> {
        use splitter_common::{
            CONN_F_SNAT, TCP_ESTABLISHED, TCP_FIN_BACKEND, TCP_FIN_CLIENT, TCP_RST, TCP_SYN,
            flow_hash, version_hash,
        };
        let svc = self
            .config
            .service(service)
            .ok_or_else(|| ControllerError::NotFound(format!("no service named {service:?}")))?;
        let key = crate::dataplane::service_key(svc);
        let src = [u32::from(*client.ip()).to_be(), 0, 0, 0];
        let by_ip = svc.affinity == crate::config::Affinity::ClientIp;
        let h = flow_hash(
            &src,
            &key.addr,
            client.port().to_be(),
            key.port,
            key.proto,
            by_ip,
        );
        let weights: Vec<u32> = svc.versions.iter().map(|v| v.weight).collect();
        let internal = |e: String| ControllerError::Internal(e);
        let thresholds =
            table::version_thresholds(&weights).map_err(|e| internal(e.to_string()))?;
        // A published rule (the effective config's) decides first.
        let published = effective::published_targets(svc, &self.overlay);
        let rule = crate::target::longest_match(&published, *client.ip()).cloned();
        let by_weight = table::pick_version(&thresholds, weights.len(), version_hash(h));
        let vi = rule
            .as_ref()
            .and_then(|r| svc.versions.iter().position(|v| v.name == r.version))
            .unwrap_or(by_weight);
        let version = svc
            .versions
            .get(vi)
            .ok_or_else(|| internal("no version picked".into()))?;
        let active: Vec<&crate::config::BackendConfig> = version
            .backends
            .iter()
            .filter(|b| b.state == BackendState::Active)
            .collect();
        let keys: Vec<String> = active.iter().map(|b| b.address.to_string()).collect();
        let members: Vec<table::MaglevBackend> = active
            .iter()
            .zip(&keys)
            .map(|(b, k)| table::MaglevBackend {
                key: k,
                weight: b.weight,
                id: self
                    .dataplane
                    .backend_id(&svc.name, &version.name, b.address)
                    .unwrap_or(0) as u16,
            })
            .collect();
        let t = table::maglev_table(&members).map_err(|e| internal(e.to_string()))?;
        let id = table::maglev_lookup(&t, h);
        let backend = version
            .backends
            .iter()
            .find(|b| {
                self.dataplane
                    .backend_id(&svc.name, &version.name, b.address)
                    == Some(u32::from(id))
            })
            .map(|b| b.address.to_string())
            .unwrap_or_else(|| "none".into());
        let lo = if by_weight == 0 {
            0
        } else {
            thresholds[by_weight - 1]
        };
        let weighed = format!(
            "{} hash {h:#010x}; version hash {:#010x} falls in {}'s range [{lo:#x}, {:#x}) of the weights {}; Maglev slot {} of that version",
            if by_ip { "client-ip" } else { "5-tuple" },
            version_hash(h),
            svc.versions[by_weight].name,
            thresholds[by_weight],
            svc.versions
                .iter()
                .map(|v| format!("{}={}", v.name, v.weight))
                .collect::<Vec<_>>()
                .join(" "),
            h % splitter_common::MAGLEV_SIZE,
        );
        let why = match &rule {
            Some(r) => format!(
                "source rule {} -> {} (the longest prefix holding {}) decides the version, not the weights; {} hash {h:#010x}, Maglev slot {} of that version",
                r.cidr,
                r.version,
                client.ip(),
                if by_ip { "client-ip" } else { "5-tuple" },
                h % splitter_common::MAGLEV_SIZE,
            ),
            None => weighed,
        };
        let conn = self
            .dataplane
            .conn(client, svc.vip, key.proto)
            .map_err(|e| internal(e.to_string()))?;
        let connection = conn.map(|c| {
            let addr = |a: [u32; 4], p: u16| {
                std::net::SocketAddrV4::new(
                    std::net::Ipv4Addr::from(u32::from_be(a[0])),
                    u16::from_be(p),
                )
                .to_string()
            };
            let state = [
                (TCP_SYN, "syn"),
                (TCP_ESTABLISHED, "established"),
                (TCP_FIN_CLIENT, "fin-client"),
                (TCP_FIN_BACKEND, "fin-backend"),
                (TCP_RST, "rst"),
            ]
            .iter()
            .filter(|(bit, _)| c.state & bit != 0)
            .map(|(_, n)| n.to_string())
            .collect();
            ConnectionReport {
                backend: addr(c.new_addr, c.new_port),
                snat_source: (c.flags & CONN_F_SNAT != 0).then(|| addr(c.other_addr, c.other_port)),
                tcp_state: state,
                idle_ms: monotonic_ns().saturating_sub(c.last_seen) / 1_000_000,
            }
        });
        Ok(FlowReport {
            service: svc.name.clone(),
            vip: svc.vip.to_string(),
            protocol: svc.protocol.to_string(),
            affinity: svc.affinity.to_string(),
            client: client.to_string(),
            hash: h,
            new_flow_version: version.name.clone(),
            new_flow_backend: backend,
            why,
            target: rule.map(|r| format!("{} -> {}", r.cidr, r.version)),
            connection,
        })
    }

    /// Status of everything, with live counters.
    ///
    /// # Errors
    /// [`ControllerError::Internal`] when a map cannot be read.
    pub fn status(&self) -> Result<StatusReport, ControllerError> {
        self.status_over(signals::DEFAULT_WINDOW_SECS * 1000)
    }

    /// Status with the signal windows over the last `window_ms`.
    ///
    /// # Errors
    /// [`ControllerError::Invalid`] for a window out of range,
    /// [`ControllerError::Internal`] when a map cannot be read.
    pub fn status_over(&self, window_ms: u64) -> Result<StatusReport, ControllerError> {
        check_window(window_ms)?;
        let dp = &self.config.dataplane;
        let services = self
            .config
            .services
            .iter()
            .map(|s| self.service_report(s, window_ms))
            .collect::<Result<Vec<_>, _>>()?;
        let counters = self
            .dataplane
            .counters()
            .map_err(|e| ControllerError::Internal(e.to_string()))?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        Ok(StatusReport {
            dataplane: DataplaneReport {
                interface: dp.interface.clone(),
                backend_interface: dp
                    .backend_interface
                    .clone()
                    .unwrap_or_else(|| dp.interface.clone()),
                mode: dp.mode.to_string(),
                snat_address: self.dataplane.snat_address().map(|a| a.to_string()),
                conn_capacity: self.dataplane.conn_capacity(),
                ephemeral_pins: self.ephemeral_pins.clone(),
                attachments: self
                    .dataplane
                    .attachments()
                    .iter()
                    .map(|a| AttachmentReport {
                        interface: a.interface.clone(),
                        mode: a.mode.to_string(),
                    })
                    .collect(),
                program: {
                    let p = self.dataplane.program();
                    Some(ProgramReport {
                        id: p.id,
                        tag: p.tag.clone(),
                        source: p.source.clone(),
                    })
                },
            },
            services,
            counters,
            rollouts: self.rollout_list(monotonic_ns() / 1_000_000),
            rollouts_ended: self
                .rollouts_ended
                .iter()
                .map(|((service, outcome), count)| RolloutsEnded {
                    service: service.clone(),
                    outcome: outcome.clone(),
                    count: *count,
                })
                .collect(),
        })
    }

    fn service_report(
        &self,
        svc: &ServiceConfig,
        window_ms: u64,
    ) -> Result<ServiceReport, ControllerError> {
        let total: u64 = svc.versions.iter().map(|v| u64::from(v.weight)).sum();
        let now_ms = monotonic_ns() / 1_000_000;
        let live = self.live_flows_by_id()?;
        let mut versions = Vec::with_capacity(svc.versions.len());
        for v in &svc.versions {
            let id_of = |addr| {
                self.dataplane
                    .backend_id(&svc.name, &v.name, addr)
                    .unwrap_or(u32::MAX)
            };
            let mut backends = Vec::with_capacity(v.backends.len());
            for b in &v.backends {
                let s = self
                    .dataplane
                    .backend_stats(&svc.name, &v.name, b.address)
                    .map_err(|e| ControllerError::Internal(e.to_string()))?;
                backends.push(BackendReport {
                    address: b.address.to_string(),
                    weight: b.weight,
                    state: b.state.to_string(),
                    health: self.health_of(svc, b.address).to_string(),
                    live_flows: live.get(&id_of(b.address)).copied().unwrap_or(0),
                    packets: s.packets,
                    bytes: s.bytes,
                    new_flows: s.new_flows,
                    reply_packets: s.reply_packets,
                    reply_bytes: s.reply_bytes,
                    signals: self.counters_of(&svc.name, &v.name, b.address)?,
                    window: self.history.window(
                        &(svc.name.clone(), v.name.clone(), b.address),
                        now_ms,
                        window_ms,
                    ),
                });
            }
            versions.push(VersionReport {
                name: v.name.clone(),
                weight: v.weight,
                share_percent: if total == 0 {
                    0.0
                } else {
                    100.0 * f64::from(v.weight) / total as f64
                },
                new_flows: backends.iter().map(|b| b.new_flows).sum(),
                live_flows: backends.iter().map(|b| b.live_flows).sum(),
                packets: backends.iter().map(|b| b.packets).sum(),
                bytes: backends.iter().map(|b| b.bytes).sum(),
                signals: sum_counters(backends.iter().map(|b| &b.signals)),
                window: self.history.window_sum(
                    v.backends
                        .iter()
                        .map(|b| (svc.name.clone(), v.name.clone(), b.address))
                        .collect::<Vec<_>>()
                        .iter(),
                    now_ms,
                    window_ms,
                ),
                metric: self.metric_of(&svc.name, &v.name),
                backends,
            });
        }
        let drops = self
            .dataplane
            .service_drops(&svc.name)
            .map_err(|e| ControllerError::Internal(e.to_string()))?
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let shadow = svc.shadow.as_ref().and_then(|sh| {
            versions.iter().find(|v| v.name == sh.version).map(|v| {
                let r = crate::report::ShadowReport::of(v, sh.percent);
                if svc.protocol == crate::config::Protocol::Tcp {
                    r.with_tee(self.tee_stats.report(&svc.name).unwrap_or_default())
                } else {
                    r
                }
            })
        });
        Ok(ServiceReport {
            name: svc.name.clone(),
            vip: svc.vip.to_string(),
            protocol: svc.protocol.to_string(),
            affinity: svc.affinity.to_string(),
            versions,
            drops,
            targets: self.targets_of(svc),
            shadow,
        })
    }
}

impl Controller {
    /// The rules of `svc`, longest prefix first, each marked active when
    /// its version has a backend that takes new flows now (the health
    /// verdicts applied).
    fn targets_of(&self, svc: &ServiceConfig) -> Vec<crate::report::TargetReport> {
        let published = effective::published_targets(svc, &self.overlay);
        let mut rules: Vec<_> = svc.targets.iter().collect();
        rules.sort_by_key(|t| (std::cmp::Reverse(t.cidr.len), t.cidr));
        rules
            .into_iter()
            .map(|t| crate::report::TargetReport {
                cidr: t.cidr.to_string(),
                version: t.version.clone(),
                active: published.contains(t),
            })
            .collect()
    }
}

/// Refuses a signal window outside 1 s ..= the history's length.
fn check_window(window_ms: u64) -> Result<(), ControllerError> {
    let max = signals::HISTORY_SECS * 1000;
    if (1000..=max).contains(&window_ms) {
        Ok(())
    } else {
        Err(ControllerError::Invalid(format!(
            "window {window_ms} ms is outside 1s..={}s (the signal history's length)",
            signals::HISTORY_SECS
        )))
    }
}

/// The shared controller, as the daemon's tasks and the API hold it.
pub type Shared = Arc<std::sync::Mutex<Controller>>;

/// Longest wait for a live-flow count taken after a request came.
const FRESH_COUNT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn lock(c: &Shared) -> Result<std::sync::MutexGuard<'_, Controller>, ControllerError> {
    c.lock()
        .map_err(|_| ControllerError::Internal("controller state is poisoned".into()))
}

/// A live-flow count taken at or after `since`, waited for without the
/// controller's lock (the daemon's walker renews it about once a second);
/// after [`FRESH_COUNT_WAIT`], the newest one there is.
async fn fresh_live_flows(
    controller: &Shared,
    since: u64,
) -> Result<BTreeMap<u32, u64>, ControllerError> {
    let deadline = tokio::time::Instant::now() + FRESH_COUNT_WAIT;
    loop {
        if let Some(counts) = lock(controller)?.live_flows_since(since) {
            return Ok(counts);
        }
        if tokio::time::Instant::now() >= deadline {
            return lock(controller)?.live_flows_by_id();
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Removes a backend with a live-flow count taken after this call began,
/// never walking the connection table under the controller's lock (see
/// [`Controller::remove_backend_counted`]).
///
/// # Errors
/// As [`Controller::remove_backend_counted`].
pub async fn remove_backend(
    controller: &Shared,
    service: &str,
    addr: SocketAddrV4,
    force: bool,
) -> Result<ServiceReport, ControllerError> {
    let since = monotonic_ns();
    // An unknown service or backend is refused before any wait.
    let counts = BTreeMap::new();
    lock(controller)?.backend_live_flows(&counts, service, addr)?;
    let counts = fresh_live_flows(controller, since).await?;
    let mut c = lock(controller)?;
    let live = c.backend_live_flows(&counts, service, addr)?;
    c.remove_backend_counted(service, addr, force, live)
}

/// How a wait for a drained backend ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DrainWait {
    /// Its live flows at the end of the wait.
    pub live_flows: u64,
    /// Whether they reached 0.
    pub drained: bool,
}

/// Waits until backend `addr` of `service` carries no live flows, or
/// `timeout` passes, reading the counts the daemon's walker renews
/// (never under the controller's lock for longer than a read). Each new
/// count is handed to `progress`. The rolling deploys of the rollout
/// engine and `splitter backend set --state drain --wait` use it.
///
/// # Errors
/// An unknown service or backend (also one removed while waiting).
pub async fn wait_drained(
    controller: &Shared,
    service: &str,
    addr: SocketAddrV4,
    timeout: std::time::Duration,
    mut progress: impl FnMut(u64),
) -> Result<DrainWait, ControllerError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut since = monotonic_ns();
    loop {
        let counts = fresh_live_flows(controller, since).await?;
        since = monotonic_ns();
        let live = lock(controller)?.backend_live_flows(&counts, service, addr)?;
        progress(live);
        if live == 0 || tokio::time::Instant::now() >= deadline {
            return Ok(DrainWait {
                live_flows: live,
                drained: live == 0,
            });
        }
    }
}

/// The sum of several backends' counters (a version's).
fn sum_counters<'a>(all: impl Iterator<Item = &'a Counters>) -> Counters {
    all.fold(Counters::default(), |mut acc, c| {
        acc.add(c);
        acc
    })
}

/// Does `config` health-check backend `addr` of `service` (a service with
/// `[service.health]`, the backend active or draining)?
fn health_checked(config: &Config, service: &str, addr: SocketAddrV4) -> bool {
    config.service(service).is_some_and(|s| {
        s.health.is_some()
            && s.versions.iter().any(|v| {
                v.backends
                    .iter()
                    .any(|b| b.address == addr && b.state != BackendState::Disabled)
            })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kernel::FakeDataplane;

    const TEXT: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[service.health]

[[service.version]]
name = "blue"
weight = 100
backends = ["10.0.2.2:8080", "10.0.2.3:8080"]

[[service.version]]
name = "green"
weight = 0
backends = ["10.0.2.4:8080"]
"#;

    fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// A controller over a fake data plane into which the config was
    /// published, as the daemon does before it builds the controller.
    fn controller() -> (Controller, FakeDataplane) {
        let config = Config::parse(TEXT).unwrap();
        let mut fake = FakeDataplane::default();
        fake.apply(&config).unwrap();
        (Controller::new(config, fake.clone(), None), fake)
    }

    fn weights(c: &Config) -> Vec<u32> {
        c.services[0].versions.iter().map(|v| v.weight).collect()
    }

    #[test]
    fn a_weight_change_is_published_and_reported() {
        let (mut c, fake) = controller();
        let w = BTreeMap::from([("blue".to_string(), 90), ("green".to_string(), 10)]);
        let r = c.set_weights("web", &w).unwrap();
        assert_eq!(r.versions[1].share_percent, 10.0);
        assert_eq!(weights(&fake.last().unwrap()), [90, 10]);
        assert_eq!(weights(c.config()), [90, 10]);
    }

    #[test]
    fn a_refused_publish_changes_nothing_and_the_running_config_stays_live() {
        let (mut c, fake) = controller();
        fake.with(|s| s.fail_next_apply = Some("map full".into()));
        let w = BTreeMap::from([("blue".to_string(), 0), ("green".to_string(), 100)]);
        let e = c.set_weights("web", &w).unwrap_err();
        assert!(matches!(e, ControllerError::Internal(_)), "{e:?}");
        assert_eq!(weights(c.config()), [100, 0]);
        // The old config was written again after the refusal.
        assert_eq!(weights(&fake.last().unwrap()), [100, 0]);
    }

    #[test]
    fn a_down_backend_leaves_new_flow_selection_and_comes_back() {
        let (mut c, fake) = controller();
        let b = addr("10.0.2.2:8080");
        c.set_health("web", b, false).unwrap();
        let published = fake.last().unwrap();
        let state = |cfg: &Config| cfg.services[0].versions[0].backends[0].state;
        assert_eq!(state(&published), BackendState::Drain);
        // The running config itself is untouched: the verdict is an overlay.
        assert_eq!(state(c.config()), BackendState::Active);
        c.set_health("web", b, true).unwrap();
        assert_eq!(state(&fake.last().unwrap()), BackendState::Active);
    }

    #[test]
    fn signal_windows_come_from_the_sampled_counters() {
        let (mut c, fake) = controller();
        let key = (
            "web".to_string(),
            "green".to_string(),
            addr("10.0.2.4:8080"),
        );
        c.sample_signals(1_000).unwrap();
        fake.with(|s| {
            s.counters.insert(
                key.clone(),
                Counters {
                    attempts: 40,
                    established: 30,
                    refused: 10,
                    ..Counters::default()
                },
            )
        });
        c.sample_signals(11_000).unwrap();
        let w = c
            .history
            .window_sum([key.clone()].iter(), 11_000, 60_000)
            .unwrap();
        assert_eq!(w.attempts, 40);
        assert_eq!(w.refused, 10);
        assert_eq!(w.error_rate, Some(0.25));
        assert!((w.attempts_per_sec - 4.0).abs() < 1e-9, "{w:?}");
        // The report shows the cumulative counters of the backend.
        let r = c.report_of("web").unwrap();
        assert_eq!(r.versions[1].signals.refused, 10);
    }

    #[test]
    fn a_window_outside_the_history_is_refused_with_its_range() {
        let (c, _) = controller();
        let e = c.status_over(999).unwrap_err().to_string();
        assert!(e.contains("outside 1s..=600s"), "{e}");
        assert!(c.status_over(signals::HISTORY_SECS * 1000 + 1).is_err());
        assert!(c.signals_of("nope", 60_000).is_err());
    }
}
