//! `splitter daemon`: loads the config, publishes it into the data plane,
//! attaches XDP, serves the API until SIGTERM or SIGINT, then detaches.
use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result, bail};
use tokio::net::UnixListener;
use tracing::{info, warn};

use crate::{api, config::Config, controller::Controller, dataplane::Dataplane};

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/splitter/splitter.sock";

/// What `splitter daemon` needs to start.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// Configuration file.
    pub config: PathBuf,
    /// API socket path.
    pub socket: PathBuf,
}

/// Runs the daemon until `shutdown` resolves.
///
/// # Errors
/// Invalid config, not root, interfaces missing, the kernel refusing the
/// program, or the socket path being unusable; each with a message that
/// says which.
pub async fn run(
    opts: DaemonOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let config = Config::load(&opts.config)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "splitter daemon must run as root (it loads BPF programs and attaches XDP: CAP_BPF, CAP_NET_ADMIN)"
        );
    }
    let mut dataplane = Dataplane::load()?;
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
    dataplane.attach(&config.dataplane)?;
    let listener = bind_socket(&opts.socket)?;
    info!(
        socket = %opts.socket.display(),
        services = config.services.len(),
        "splitter daemon ready"
    );
    let controller = Arc::new(std::sync::Mutex::new(Controller::new(config, dataplane)));
    api::serve(listener, controller.clone(), shutdown).await;
    info!("shutting down: detaching XDP");
    drop(controller);
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
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

fn bind_socket(path: &Path) -> Result<UnixListener> {
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
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
