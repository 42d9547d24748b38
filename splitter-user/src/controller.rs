//! The controller's state: the running [`Config`] and the [`Dataplane`] it
//! is published into. Every change goes through here, validated first and
//! published second, so a refused change leaves both exactly as they were.
use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use tokio::sync::Notify;
use tracing::{error, info};

use crate::{
    api::{
        ApiError, AttachmentReport, BackendReport, ConnectionReport, DataplaneReport, FlowReport,
        ServiceReport, StatusReport, VersionReport,
    },
    config::{Config, ServiceConfig, parse_weight_args},
    dataplane::Dataplane,
    pins,
    state::{self, State},
    table,
};

/// Running config plus the data plane it is published into.
pub struct Controller {
    config: Config,
    dataplane: Dataplane,
    /// Where the state file lives (`None`: nothing is persisted).
    state_dir: Option<PathBuf>,
    /// Set by a detach request; the daemon stops when it fires.
    pub detach: Arc<Notify>,
    /// The file `reload` reads.
    config_path: Option<PathBuf>,
}

impl Controller {
    /// Wraps a data plane into which `config` has already been applied.
    pub fn new(config: Config, dataplane: Dataplane, state_dir: Option<PathBuf>) -> Self {
        Self {
            config,
            dataplane,
            state_dir,
            detach: Arc::new(Notify::new()),
            config_path: None,
        }
    }

    /// Sets the file [`Controller::reload`] reads.
    pub fn with_config_path(mut self, path: PathBuf) -> Self {
        self.config_path = Some(path);
        self
    }

    /// Re-reads the configuration file and applies it as a diff: services
    /// that did not change keep their tables untouched, established flows
    /// are never touched. The file's weights win over runtime ones. An
    /// invalid file is refused as a whole and nothing changes.
    ///
    /// # Errors
    /// [`ApiError::BadRequest`] with every problem of the file, or when the
    /// `[dataplane]` section changed (that needs a restart);
    /// [`ApiError::Internal`] when the kernel refused (the old config stays live).
    pub fn reload(&mut self) -> Result<Vec<String>, ApiError> {
        let path = self.config_path.clone().ok_or_else(|| {
            ApiError::BadRequest("this daemon has no configuration file to reload".into())
        })?;
        let next = Config::load(&path)
            .map_err(|e| ApiError::BadRequest(format!("reload refused, nothing changed: {e}")))?;
        if next.dataplane != self.config.dataplane {
            return Err(ApiError::BadRequest(
                "reload refused, nothing changed: the [dataplane] section differs from the running one; restart the daemon to change interfaces, mode, SNAT address, XDP mode or pin_dir".into(),
            ));
        }
        if next.metrics != self.config.metrics {
            return Err(ApiError::BadRequest(
                "reload refused, nothing changed: the [metrics] section differs from the running one; restart the daemon to move or turn off the metrics endpoint".into(),
            ));
        }
        let mut changes = Vec::new();
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
        if let Err(e) = self.dataplane.apply(&next) {
            let _ = self.dataplane.apply(&self.config);
            return Err(ApiError::Internal(format!(
                "reload failed, the previous configuration stays live: {e}"
            )));
        }
        self.config = next;
        if let Err(e) = self.persist() {
            error!(error = %e, "reloaded, but the state file could not be written");
        }
        info!(changes = ?changes, "configuration reloaded");
        Ok(changes)
    }

    /// Writes the state file (weights and live ids).
    ///
    /// # Errors
    /// The write failed; the previous file stays in place.
    pub fn persist(&self) -> Result<(), state::StateError> {
        let Some(dir) = &self.state_dir else {
            return Ok(());
        };
        let weights = self
            .config
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.versions
                        .iter()
                        .map(|v| (v.name.clone(), v.weight))
                        .collect(),
                )
            })
            .collect();
        state::save(
            dir,
            &State {
                format: state::FORMAT,
                weights,
                layout: self.dataplane.layout(),
            },
        )
    }

    /// Removes the pinned program, links and maps and asks the daemon to
    /// stop: forwarding ends once this process exits.
    ///
    /// # Errors
    /// A pin that cannot be removed.
    pub fn detach(&mut self) -> Result<Vec<String>, ApiError> {
        let removed = pins::remove_all(&self.config.dataplane.pin_dir)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
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
    /// [`ApiError::NotFound`] for an unknown service, [`ApiError::BadRequest`]
    /// for unknown or missing versions and invalid weights, [`ApiError::Internal`]
    /// when the kernel refuses the update (the old weights then stay live).
    pub fn set_weights(
        &mut self,
        service: &str,
        weights: &BTreeMap<String, u32>,
    ) -> Result<ServiceReport, ApiError> {
        let svc = self.config.service(service).ok_or_else(|| {
            let known: Vec<&str> = self
                .config
                .services
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            ApiError::NotFound(format!(
                "no service named {service:?}; services: {}",
                known.join(", ")
            ))
        })?;
        let args: Vec<String> = weights.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let vector =
            parse_weight_args(svc, &args).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let next = self
            .config
            .with_weights(service, &vector)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if let Err(e) = self.dataplane.apply(&next) {
            // Put back what was live; the maps may hold part of `next`.
            let _ = self.dataplane.apply(&self.config);
            return Err(ApiError::Internal(e.to_string()));
        }
        self.config = next;
        info!(service, weights = ?weights, "weights changed");
        if let Err(e) = self.persist() {
            error!(error = %e, "weights are live but could not be saved; a restart would lose them");
        }
        let svc = self
            .config
            .service(service)
            .ok_or_else(|| ApiError::Internal("service vanished".into()))?
            .clone();
        self.service_report(&svc)
    }

    /// Where `client`'s flow to `service` goes and why: the connection-table
    /// entry if the edge knows the flow, and what a new flow would get now.
    ///
    /// # Errors
    /// [`ApiError::NotFound`] for an unknown service; [`ApiError::Internal`]
    /// for map failures.
    pub fn flow(
        &self,
        service: &str,
        client: std::net::SocketAddrV4,
    ) -> Result<FlowReport, ApiError> {
        use splitter_common::{
            CONN_F_SNAT, TCP_ESTABLISHED, TCP_FIN_BACKEND, TCP_FIN_CLIENT, TCP_RST, TCP_SYN,
            flow_hash, version_hash,
        };
        let svc = self
            .config
            .service(service)
            .ok_or_else(|| ApiError::NotFound(format!("no service named {service:?}")))?;
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
        let internal = |e: String| ApiError::Internal(e);
        let thresholds =
            table::version_thresholds(&weights).map_err(|e| internal(e.to_string()))?;
        let vi = table::pick_version(&thresholds, weights.len(), version_hash(h));
        let version = svc
            .versions
            .get(vi)
            .ok_or_else(|| internal("no version picked".into()))?;
        let keys: Vec<String> = version
            .backends
            .iter()
            .map(|b| b.address.to_string())
            .collect();
        let members: Vec<table::MaglevBackend> = version
            .backends
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
        let lo = if vi == 0 { 0 } else { thresholds[vi - 1] };
        let why = format!(
            "{} hash {h:#010x}; version hash {:#010x} falls in {}'s range [{lo:#x}, {:#x}) of the weights {}; Maglev slot {} of that version",
            if by_ip { "client-ip" } else { "5-tuple" },
            version_hash(h),
            version.name,
            thresholds[vi],
            svc.versions
                .iter()
                .map(|v| format!("{}={}", v.name, v.weight))
                .collect::<Vec<_>>()
                .join(" "),
            h % splitter_common::MAGLEV_SIZE,
        );
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
            connection,
        })
    }

    /// Status of everything, with live counters.
    ///
    /// # Errors
    /// [`ApiError::Internal`] when a map cannot be read.
    pub fn status(&self) -> Result<StatusReport, ApiError> {
        let dp = &self.config.dataplane;
        let services = self
            .config
            .services
            .iter()
            .map(|s| self.service_report(s))
            .collect::<Result<Vec<_>, _>>()?;
        let counters = self
            .dataplane
            .counters()
            .map_err(|e| ApiError::Internal(e.to_string()))?
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
                attachments: self
                    .dataplane
                    .attachments()
                    .iter()
                    .map(|a| AttachmentReport {
                        interface: a.interface.clone(),
                        mode: a.mode.to_string(),
                    })
                    .collect(),
            },
            services,
            counters,
        })
    }

    fn service_report(&self, svc: &ServiceConfig) -> Result<ServiceReport, ApiError> {
        let total: u64 = svc.versions.iter().map(|v| u64::from(v.weight)).sum();
        let mut versions = Vec::with_capacity(svc.versions.len());
        for v in &svc.versions {
            let mut backends = Vec::with_capacity(v.backends.len());
            for b in &v.backends {
                let s = self
                    .dataplane
                    .backend_stats(&svc.name, &v.name, b.address)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                backends.push(BackendReport {
                    address: b.address.to_string(),
                    weight: b.weight,
                    packets: s.packets,
                    bytes: s.bytes,
                    new_flows: s.new_flows,
                    reply_packets: s.reply_packets,
                    reply_bytes: s.reply_bytes,
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
                packets: backends.iter().map(|b| b.packets).sum(),
                bytes: backends.iter().map(|b| b.bytes).sum(),
                backends,
            });
        }
        Ok(ServiceReport {
            name: svc.name.clone(),
            vip: svc.vip.to_string(),
            protocol: svc.protocol.to_string(),
            affinity: svc.affinity.to_string(),
            versions,
        })
    }
}

/// The clock `Conn::last_seen` is stamped with: the kernel program reads
/// CLOCK_MONOTONIC at tick granularity (`bpf_ktime_get_coarse_ns`), so a
/// stamp is at most a tick behind this reading (the idle time saturates at 0).
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
