//! `splitter daemon`: loads the config, publishes it into the data plane,
//! attaches XDP, serves the API until SIGTERM or SIGINT, then detaches.
use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tracing::{error, info, warn};

use crate::{
    api,
    config::Config,
    controller::Controller,
    dataplane::{Dataplane, ProgramSource},
    metrics, pins,
    shutdown::Shutdown,
    state, systemd,
};

/// How long a stopping daemon waits for its background tasks.
const TASK_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/splitter/splitter.sock";

/// What `splitter daemon` needs to start.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Configuration file.
    pub config: PathBuf,
    /// API socket path.
    pub socket: PathBuf,
    /// Directory of the state file.
    pub state_dir: PathBuf,
    /// What SIGTERM/SIGINT does to the data plane.
    pub on_stop: OnStop,
    /// Kernel program object to load instead of the embedded one
    /// (`--program`); `None` for the embedded one.
    pub program: Option<PathBuf>,
    /// Group allowed on the API socket (mode 0660); `None`: root only (0600).
    pub socket_group: Option<String>,
    /// Start even when the pins would vanish with this process
    /// ([`pins::ephemeral_pins`]).
    pub ephemeral_pins: bool,
}

/// What a stopping daemon does to the pinned data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnStop {
    /// Remove the pins: XDP is detached and the maps freed (a clean stop).
    Detach,
    /// Leave everything pinned: the data plane keeps forwarding and the
    /// next daemon takes it over (restarts and upgrades without loss).
    Keep,
}

/// Runs the daemon until `shutdown` resolves or a detach is requested.
/// With [`OnStop::Detach`] a shutdown removes the data plane; with
/// [`OnStop::Keep`] it stays pinned and forwarding.
///
/// On start it reads the state file (running services, live ids),
/// takes over maps and XDP links pinned by an earlier instance (so
/// established flows keep flowing through restarts and upgrades), publishes
/// the configuration, attaches, and only then serves the API. On stop the
/// data plane is detached or, with `--on-stop keep`, keeps forwarding.
///
/// # Errors
/// Invalid config, not root, interfaces missing, the kernel refusing the
/// program, a pinned layout this build cannot take over, the socket path
/// being unusable, or the metrics address not bindable; each with a message
/// that says which.
pub async fn run(
    opts: DaemonOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let (file_config, digest) = Config::load_with_digest(&opts.config)?;
    // Before anything changes: an unknown group refuses the start.
    let socket_gid = opts.socket_group.as_deref().map(group_id).transpose()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "splitter daemon must run as root (it loads BPF programs and attaches XDP: CAP_BPF, CAP_NET_ADMIN)"
        );
    }
    // Before the data plane is touched: a taken port refuses the start
    // with nothing changed.
    let metrics_listener = match &file_config.metrics {
        Some(m) => Some(bind_metrics(m.listen).await?),
        None => None,
    };
    let saved = match state::load(&opts.state_dir) {
        Ok(s) => s,
        Err(e @ state::StateError::Damaged { .. }) => {
            error!("{e}");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let mut config = match &saved {
        Some(saved) => restore_services(file_config, &digest, saved),
        None => file_config,
    };
    let rollouts = saved
        .as_ref()
        .map(|s| s.rollouts.clone())
        .unwrap_or_default();
    if let Some(services) = saved.as_ref().and_then(|s| s.services.clone()) {
        // An edited file does not undo what rollouts did, unless it edits
        // those services' weights.
        let mut running = config.clone();
        running.services = services;
        for said in crate::rollout::book::supersede(&mut config, &rollouts, &running) {
            info!("{said}");
        }
    }
    let pin_dir = config.dataplane.pin_dir.clone();
    // Before the data plane is touched: pins that would vanish with this
    // process are refused unless asked for.
    let ephemeral = pins::ephemeral_pins(&pin_dir);
    if let Some(why) = &ephemeral {
        if !opts.ephemeral_pins {
            bail!("refusing to start: {why}");
        }
        warn!("{why}; starting anyway (--ephemeral-pins)");
    }
    let source = match &opts.program {
        Some(p) => ProgramSource::File(p.clone()),
        None => ProgramSource::Embedded,
    };
    let mut dataplane =
        Dataplane::load_pinned_from(&pin_dir, &source, config.dataplane.conn_capacity)?;
    if dataplane.reused() {
        match &saved {
            Some(s) => dataplane.restore_layout(&s.layout),
            None => {
                warn!(
                    "pinned maps found but no state file: republishing every service from the configuration"
                );
                dataplane.reset_published()?;
            }
        }
        info!(pins = %pin_dir.display(), "took over the pinned data plane: established connections keep flowing");
    }
    dataplane
        .apply(&config)
        .context("publishing the configuration into the data plane")?;
    let dp = &config.dataplane;
    let mut ifaces = vec![dp.interface.as_str()];
    ifaces.extend(
        dp.backend_interface
            .as_deref()
            .filter(|b| *b != dp.interface),
    );
    prepare_kernel_forwarding(&ifaces);
    let modes = saved
        .as_ref()
        .map(|s| s.layout.attachments.clone())
        .unwrap_or_default();
    dataplane.attach(&config.dataplane, &modes)?;
    let listener = bind_socket(&opts.socket, socket_gid)?;
    let status_line = format!(
        "STATUS=forwarding {} service(s) on {}",
        config.services.len(),
        ifaces.join(", ")
    );
    let controller = Controller::new(config, dataplane, Some(opts.state_dir.clone()))
        .with_config_path(opts.config.clone(), digest)
        .with_rollouts(rollouts)
        .with_ephemeral_pins(ephemeral);
    if let Err(e) = controller.persist() {
        warn!(error = %e, "could not write the state file; runtime changes would not survive a restart");
    }
    let detach = controller.detach.clone();
    info!(socket = %opts.socket.display(), pins = %pin_dir.display(), "splitter daemon ready");
    let controller = Arc::new(std::sync::Mutex::new(controller));
    // Ready only now: program attached, state restored, API listening.
    systemd::notify(&format!("READY=1\n{status_line}"));
    let (stop_tasks, tasks_stop) = crate::shutdown::channel();
    let mut background = spawn_watchdog_and_reload(controller.clone(), &tasks_stop);
    background.push(tokio::spawn(crate::health::run(
        controller.clone(),
        tasks_stop.clone(),
    )));
    if let Some(task) = spawn_live_flow_counter(&controller, tasks_stop.clone()) {
        background.push(task);
    }
    if let Some(task) = spawn_tee(&controller, tasks_stop.clone()) {
        background.push(task);
    }
    background.push(tokio::spawn(sample_signals(
        controller.clone(),
        tasks_stop.clone(),
    )));
    background.push(tokio::spawn(crate::rollout::driver::run(
        controller.clone(),
        tasks_stop.clone(),
    )));
    background.push(tokio::spawn(poll_external_metrics(
        controller.clone(),
        tasks_stop,
    )));
    let metrics_server = metrics_listener.map(|l| {
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(metrics::serve(l, controller.clone(), async {
            let _ = stop_rx.await;
        }));
        (stop_tx, task)
    });
    let stop = async {
        tokio::select! {
            _ = shutdown => match opts.on_stop {
                OnStop::Keep => info!("stopping; the pinned data plane keeps forwarding (`splitter detach` removes it)"),
                OnStop::Detach => {
                    info!("stopping: detaching XDP, removing the pins and the saved state (--on-stop keep would leave them)");
                    if let Err(e) = pins::remove_all(&pin_dir) {
                        error!(error = %e, "could not remove every pin; run `splitter detach`");
                    }
                    if let Err(e) = state::remove(&opts.state_dir) {
                        error!(error = %e, "could not remove the state file");
                    }
                }
            },
            _ = detach.notified() => info!("detach requested: stopping"),
        }
    };
    api::serve(listener, controller.clone(), stop).await;
    systemd::notify("STOPPING=1");
    // Each task returns at its next safe point; one that does not within
    // the grace period (a blocking walk of a huge table) is left to end
    // with the process.
    stop_tasks.fire();
    let grace = tokio::time::sleep(TASK_GRACE);
    tokio::pin!(grace);
    for mut task in background {
        tokio::select! {
            _ = &mut task => {}
            _ = &mut grace => {
                warn!("a background task did not stop within {TASK_GRACE:?}; stopping anyway");
                task.abort();
            }
        }
    }
    if let Some((stop_tx, task)) = metrics_server {
        drop(stop_tx);
        let _ = task.await;
    }
    drop(controller);
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

/// The watchdog pinger (it takes the controller's lock, so a wedged
/// controller stops the pings and systemd restarts it) and the SIGHUP
/// handler (reload, reported through `RELOADING=1` / `READY=1`).
fn spawn_watchdog_and_reload(
    controller: Arc<std::sync::Mutex<Controller>>,
    shutdown: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if let Some(every) = systemd::watchdog_interval() {
        let c = controller.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.wait() => return,
                }
                if c.lock().is_ok() {
                    systemd::notify("WATCHDOG=1");
                }
            }
        }));
    }
    let mut stop = shutdown.clone();
    tasks.push(tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            warn!("cannot handle SIGHUP; use `splitter reload`");
            return;
        };
        loop {
            tokio::select! {
                got = hup.recv() => if got.is_none() { return },
                _ = stop.wait() => return,
            }
            info!("SIGHUP: reloading the configuration");
            systemd::notify(&format!(
                "RELOADING=1\nMONOTONIC_USEC={}",
                crate::dataplane::monotonic_ns() / 1000
            ));
            let result = match controller.lock() {
                Ok(mut c) => c.reload(),
                Err(_) => Err(crate::controller::ControllerError::Internal(
                    "controller state is poisoned".into(),
                )),
            };
            match result {
                Ok(changes) => {
                    systemd::notify(&format!("READY=1\nSTATUS=reloaded: {}", describe(&changes)));
                }
                Err(e) => {
                    error!(error = %e, "reload refused");
                    systemd::notify(
                        "READY=1\nSTATUS=reload refused; the previous configuration is live",
                    );
                }
            }
        }
    }));
    tasks
}

/// Renews the live-flow count about once a second (less often for a huge
/// connection table) on a blocking thread, with descriptors of its own, so
/// `status`, metrics and drains read a count without walking the
/// connection table under the controller's lock. The same walk sweeps
/// missed connect deadlines ([`crate::dataplane::TableWalker::walk`]).
fn spawn_live_flow_counter(
    controller: &Arc<std::sync::Mutex<Controller>>,
    mut shutdown: Shutdown,
) -> Option<tokio::task::JoinHandle<()>> {
    let feed = controller.lock().ok()?.live_flows_feed();
    let (shared, walker) = match feed {
        Ok((shared, Some(walker))) => (shared, walker),
        Ok((_, None)) => return None,
        Err(e) => {
            warn!(error = %e, "no descriptor for the live-flow counter; status counts on demand");
            return None;
        }
    };
    let mut walker = Some(walker);
    Some(tokio::spawn(async move {
        while let Some(mut w) = walker.take() {
            let started = std::time::Instant::now();
            let counted = tokio::task::spawn_blocking(move || {
                let now = crate::dataplane::monotonic_ns();
                let counted = w.walk(now).map(|c| (now, c));
                (w, counted)
            })
            .await;
            let counted = counted.map(|(w, c)| {
                walker = Some(w);
                c
            });
            match counted {
                Ok(Ok(v)) => {
                    if let Ok(mut g) = shared.lock() {
                        *g = Some(v);
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "could not walk the connection table; live-flow counts are not renewed")
                }
                Err(_) => return,
            }
            // A second between counts, or four times as long as a count
            // took: a huge table costs at most a fifth of a CPU.
            let pause = std::time::Duration::from_secs(1).max(started.elapsed() * 4);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.wait() => return,
            }
        }
    }))
}

/// Runs the TCP shadow tees ([`crate::tee`]) the published config asks
/// for: follows every publish at once, and pushes their heartbeat every
/// half second. On the way out the tees stop, so new flows stay on the fast
/// path (connections the tee is serving end with the process).
fn spawn_tee(
    controller: &Arc<std::sync::Mutex<Controller>>,
    mut shutdown: Shutdown,
) -> Option<tokio::task::JoinHandle<()>> {
    let feed = controller.lock().ok()?.tee_feed();
    let (maps, stats, wake) = match feed {
        Ok(Some(f)) => f,
        Ok(None) => return None,
        Err(e) => {
            warn!(error = %e, "no descriptor for the TCP shadow tee; TCP services are not mirrored");
            return None;
        }
    };
    let controller = controller.clone();
    Some(tokio::spawn(async move {
        // Starting and stopping a tee runs `ip`: on a blocking thread.
        let Ok(tee) =
            tokio::task::spawn_blocking(move || Arc::new(crate::tee::Tee::new(maps, stats))).await
        else {
            return;
        };
        loop {
            let plans = match controller.lock() {
                Ok(c) => c.tee_plans(),
                Err(_) => break,
            };
            let t = tee.clone();
            if tokio::task::spawn_blocking(move || t.sync(plans))
                .await
                .is_err()
            {
                break;
            }
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(crate::tee::BEAT) => {}
                _ = shutdown.wait() => break,
            }
        }
        let _ = tokio::task::spawn_blocking(move || tee.shutdown()).await;
    }))
}

/// Records every backend's signal counters in the controller's history
/// once a second (a few map reads per backend under the lock; no table
/// walk).
async fn sample_signals(controller: Arc<std::sync::Mutex<Controller>>, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let now_ms = crate::dataplane::monotonic_ns() / 1_000_000;
        let Ok(mut c) = controller.lock() else { return };
        match c.sample_signals(now_ms) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                warn!(error = %e, "could not sample the signal counters");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Reads the external metric of every version of every service with
/// `[service.analysis]`, each service every `interval_ms`, outside the
/// controller's lock; a failed query is kept as its error, never as a
/// number.
async fn poll_external_metrics(
    controller: Arc<std::sync::Mutex<Controller>>,
    mut shutdown: Shutdown,
) {
    let mut due: BTreeMap<String, u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let now_ms = crate::dataplane::monotonic_ns() / 1_000_000;
        let work: Vec<(String, Vec<String>, crate::config::AnalysisConfig)> = {
            let Ok(c) = controller.lock() else { return };
            c.config()
                .services
                .iter()
                .filter_map(|s| {
                    let a = s.analysis.clone()?;
                    Some((
                        s.name.clone(),
                        s.versions.iter().map(|v| v.name.clone()).collect(),
                        a,
                    ))
                })
                .collect()
        };
        due.retain(|name, _| work.iter().any(|(n, ..)| n == name));
        for (service, versions, cfg) in work {
            let interval = u64::from(cfg.interval_ms);
            let next = match due.get(&service) {
                Some(at) if *at > now_ms => continue,
                // From the time it was due, so the ticks' jitter does not
                // add a second now and then; after a long stall, from now.
                Some(at) if now_ms - *at < interval => *at + interval,
                _ => now_ms + interval,
            };
            due.insert(service.clone(), next);
            for version in versions {
                let reading = tokio::select! {
                    r = crate::signals::external::read(&cfg, &service, &version) => r,
                    _ = shutdown.wait() => return,
                };
                let at = crate::dataplane::monotonic_ns() / 1_000_000;
                let Ok(mut c) = controller.lock() else { return };
                c.store_metric(&service, &version, at, reading);
            }
        }
    }
}

fn describe(changes: &[String]) -> String {
    if changes.is_empty() {
        "no changes".into()
    } else {
        changes.join(", ")
    }
}

/// The services to start with: the saved running ones if the file is
/// still the one they started from (runtime changes survive a restart),
/// otherwise the file's (an edited file wins, and says so). A format-1
/// state carries weights only; those are applied to the file's services.
fn restore_services(file: Config, digest: &str, saved: &state::State) -> Config {
    let Some(services) = &saved.services else {
        return restore_weights(file, &saved.weights);
    };
    if saved.config_digest != digest {
        warn!(
            "the configuration file changed since the state was saved: starting from the file; runtime changes made since it was last read are replaced by it"
        );
        return file;
    }
    let mut config = file.clone();
    config.services = services.clone();
    match config.validate() {
        Ok(()) => {
            if config.services != file.services {
                info!(
                    services = config.services.len(),
                    "restored the running services from the state file (they differ from the file: runtime changes kept)"
                );
            }
            config
        }
        Err(e) => {
            error!(error = %e, "the saved services are not valid; starting from the configuration file");
            file
        }
    }
}

/// Applies saved weights to services whose versions are still the same.
fn restore_weights(config: Config, saved: &BTreeMap<String, BTreeMap<String, u32>>) -> Config {
    let mut config = config;
    for (service, weights) in saved {
        let Some(svc) = config.service(service) else {
            continue;
        };
        let names: Vec<&String> = svc.versions.iter().map(|v| &v.name).collect();
        if names.len() != weights.len() || names.iter().any(|n| !weights.contains_key(*n)) {
            warn!(
                service,
                "saved weights name other versions than the configuration; using the configuration's"
            );
            continue;
        }
        let vector: Vec<u32> = svc.versions.iter().map(|v| weights[&v.name]).collect();
        match config.with_weights(service, &vector) {
            Ok(next) => {
                info!(service, weights = ?weights, "restored weights from the state file");
                config = next;
            }
            Err(e) => {
                warn!(service, error = %e, "saved weights are invalid; using the configuration's")
            }
        }
    }
    config
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot install signal handlers; stop the daemon with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// Binds the Prometheus endpoint (`[metrics] listen`).
async fn bind_metrics(addr: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!(
            "binding the metrics endpoint on {addr} ([metrics] listen): set another address, or enabled = false to turn it off"
        )
    })?;
    if addr.ip().is_loopback() {
        info!(%addr, "metrics on http://{addr}/metrics");
    } else {
        warn!(%addr, "metrics on http://{addr}/metrics, reachable beyond this host: counters, service names and backend addresses are visible to anyone who can connect");
    }
    Ok(listener)
}

/// The id of group `name`.
fn group_id(name: &str) -> Result<libc::gid_t> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| anyhow::anyhow!("--socket-group {name:?}: not a group name"))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; `buf` outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        bail!("--socket-group {name:?}: no such group (create it with `groupadd {name}`)");
    }
    Ok(grp.gr_gid)
}

fn bind_socket(path: &Path, group: Option<libc::gid_t>) -> Result<UnixListener> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another splitter daemon is already serving {}",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding API socket {}", path.display()))?;
    match group {
        None => std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?,
        Some(gid) => {
            std::os::unix::fs::chown(path, None, Some(gid))
                .with_context(|| format!("chown :{gid} {}", path.display()))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
                .with_context(|| format!("chmod 0660 {}", path.display()))?;
        }
    }
    Ok(listener)
}

/// The edge hands packets it cannot finish in XDP (next hop's MAC not yet
/// known) to the kernel, already rewritten, and lets the kernel resolve the
/// neighbour and forward them. That needs IPv4 forwarding (which
/// `bpf_fib_lookup` also requires) and, in SNAT mode, `accept_local` on the
/// attached interfaces: the rewritten source is the edge's own address,
/// which the kernel otherwise drops as a martian.
fn prepare_kernel_forwarding(interfaces: &[&str]) {
    let mut settings = vec![(
        "/proc/sys/net/ipv4/ip_forward".to_string(),
        "net.ipv4.ip_forward",
    )];
    for i in interfaces {
        settings.push((
            format!("/proc/sys/net/ipv4/conf/{i}/accept_local"),
            "accept_local",
        ));
    }
    for (path, name) in settings {
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {}
            _ => match std::fs::write(&path, "1") {
                Ok(()) => info!(setting = %path, "set {name}=1"),
                Err(e) => {
                    warn!(setting = %path, error = %e, "could not set {name}=1; first packets of new flows may be lost")
                }
            },
        }
    }
}
