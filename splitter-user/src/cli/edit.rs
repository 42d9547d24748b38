//! `splitter service|version|backend ...`: change the running services
//! without editing the file. Each command is one API call; the daemon
//! validates, publishes and saves the change (it survives restarts), and
//! the command prints the service as it now is.
use std::{net::SocketAddrV4, path::Path};

use clap::Subcommand;
use hyper::Method;

use super::{CliError, Output, status};
use crate::{
    api::ServiceReport,
    client,
    config::{Affinity, BackendState, Protocol},
    controller::DrainWait,
    edit::{BackendPatch, BackendSpec, ServiceSpec, VersionSpec},
};

/// The keywords of a config enum, as clap's possible values.
fn keywords(names: &'static [&'static str]) -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(names.iter().copied())
}

/// `splitter service ...`
#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Add a service with one version. Add more versions with
    /// `splitter version add`.
    ///
    /// Example: splitter service add api --vip 10.0.0.11:443 --version v1 --backend 10.0.2.5:8443 --backend 10.0.2.6:8443
    Add {
        /// Service name (letters, digits, '-', '_', '.').
        name: String,
        /// Virtual address clients connect to.
        #[arg(long, value_name = "IPv4:PORT")]
        vip: SocketAddrV4,
        /// Transport protocol.
        #[arg(long, value_parser = keywords(Protocol::NAMES), default_value = "tcp")]
        protocol: String,
        /// What a new flow is placed by: its 5-tuple, or the client address
        /// (one client, one version, one backend).
        #[arg(long, value_parser = keywords(Affinity::NAMES), default_value = "flow")]
        affinity: String,
        /// Name of the first version.
        #[arg(long)]
        version: String,
        /// Backends of the first version (repeat, or separate with commas).
        #[arg(
            long = "backend",
            value_name = "IPv4:PORT",
            required = true,
            value_delimiter = ','
        )]
        backends: Vec<SocketAddrV4>,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove a service. Its established flows keep going until they end;
    /// new connections to its VIP are no longer balanced.
    ///
    /// Example: splitter service remove api
    Remove {
        /// Service name.
        name: String,
    },
    /// Show one service: versions, weights, backends, states, live flows.
    ///
    /// Example: splitter service show web --output json
    Show {
        /// Service name.
        name: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// `splitter version ...`
#[derive(Debug, Subcommand)]
pub enum VersionCommand {
    /// Add a version to a service. It gets no new flows until its weight
    /// is raised (`splitter weights set`), unless --weight says otherwise.
    ///
    /// Example: splitter version add web green --backend 10.0.2.3:8080,10.0.2.4:8080
    Add {
        /// Service name.
        service: String,
        /// Version name.
        version: String,
        /// Share of new flows, relative to the other versions.
        #[arg(long, default_value_t = 0)]
        weight: u32,
        /// Its backends (repeat, or separate with commas).
        #[arg(long = "backend", value_name = "IPv4:PORT", value_delimiter = ',')]
        backends: Vec<SocketAddrV4>,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove a version. Refused while its weight is above 0: move its
    /// traffic away first. Its established flows keep going.
    ///
    /// Example: splitter version remove web blue
    Remove {
        /// Service name.
        service: String,
        /// Version name.
        version: String,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// `splitter backend ...`
#[derive(Debug, Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a version of a service.
    ///
    /// Example: splitter backend add web blue 10.0.2.5:8080 --weight 2
    Add {
        /// Service name.
        service: String,
        /// Version name.
        version: String,
        /// Backend address.
        address: SocketAddrV4,
        /// Weight inside the version (1-1000).
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Initial state.
        #[arg(long, value_parser = keywords(BackendState::NAMES), default_value = "active")]
        state: String,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Change a backend's weight or state.
    ///
    /// States: `active` takes new flows; `drain` takes no new flows while
    /// its established flows go on (watch LIVE FLOWS fall to 0 in `splitter
    /// status`); `disabled` takes no new flows and the client packets of its
    /// established flows are dropped.
    ///
    /// Example: splitter backend set web 10.0.2.2:8080 --state drain
    Set {
        /// Service name.
        service: String,
        /// Backend address.
        address: SocketAddrV4,
        /// New weight inside its version (1-1000).
        #[arg(long)]
        weight: Option<u32>,
        /// New state.
        #[arg(long, value_parser = keywords(BackendState::NAMES))]
        state: Option<String>,
        /// With --state drain: then wait up to SECONDS for the backend's
        /// live flows to reach 0, printing the count as it falls; exit 1 if
        /// they have not by then (the backend stays draining).
        #[arg(long, value_name = "SECONDS", requires = "state")]
        wait: Option<u64>,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Remove a backend. Refused while it is active (drain it first) or
    /// still carries established flows, unless --force (which cuts them).
    ///
    /// Example: splitter backend remove web 10.0.2.2:8080
    Remove {
        /// Service name.
        service: String,
        /// Backend address.
        address: SocketAddrV4,
        /// Remove even if active or carrying flows.
        #[arg(long)]
        force: bool,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// A service or version name as a URL path segment. Names only ever hold
/// letters, digits, '-', '_' and '.', so anything else is a typo.
pub(super) fn seg(what: &str, v: &str) -> Result<String, CliError> {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(CliError::Usage(format!(
            "{what} {v:?}: names hold only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(v.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string(v).map_err(|e| CliError::Other(e.into()))
}

/// Sends one request whose answer is a service report, and prints it.
pub(super) async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
    output: Output,
) -> Result<(), CliError> {
    let bytes = client::request(socket, method, path, body).await?;
    match output {
        Output::Json => print!("{}", String::from_utf8_lossy(&bytes)),
        Output::Table => {
            let report: ServiceReport =
                serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
            print!("{}", status::render_services(std::slice::from_ref(&report)));
            if let Some(sh) = &report.shadow {
                println!("{}", status::shadow_line(&report.name, sh));
            }
        }
    }
    Ok(())
}

fn backends(addrs: &[SocketAddrV4]) -> Vec<BackendSpec> {
    addrs
        .iter()
        .map(|a| BackendSpec {
            address: a.to_string(),
            weight: None,
            state: None,
        })
        .collect()
}

/// Asks the daemon to wait (a second at a time, so progress shows) until
/// `addr` has no live flows, or `secs` have passed. Progress goes to
/// stderr, so stdout stays the command's output.
async fn wait_drained(
    socket: &Path,
    service: &str,
    addr: SocketAddrV4,
    secs: u64,
) -> Result<(), CliError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut last = None;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let path = format!(
            "/v1/services/{}/backends/{}/drain?timeout={}",
            seg("service", service)?,
            addr,
            left.as_secs().min(1)
        );
        let bytes = client::request(socket, Method::GET, &path, None).await?;
        let wait: DrainWait =
            serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
        if wait.drained {
            eprintln!("{addr} drained: no live flows");
            return Ok(());
        }
        if last != Some(wait.live_flows) {
            eprintln!("draining {addr}: {} live flow(s)", wait.live_flows);
            last = Some(wait.live_flows);
        }
        if left.is_zero() {
            return Err(CliError::Other(anyhow::anyhow!(
                "{addr} still has {} live flow(s) after {secs} s; it stays draining (no new flows)",
                wait.live_flows
            )));
        }
    }
}

/// Runs `splitter service ...`.
pub async fn service(socket: &Path, cmd: ServiceCommand) -> Result<(), CliError> {
    match cmd {
        ServiceCommand::Add {
            name,
            vip,
            protocol,
            affinity,
            version,
            backends: addrs,
            output,
        } => {
            let spec = ServiceSpec {
                name,
                vip: vip.to_string(),
                protocol: Some(protocol),
                affinity: Some(affinity),
                versions: vec![VersionSpec {
                    name: version,
                    weight: 100,
                    backends: backends(&addrs),
                }],
            };
            call(
                socket,
                Method::POST,
                "/v1/services",
                Some(json(&spec)?),
                output,
            )
            .await
        }
        ServiceCommand::Remove { name } => {
            let path = format!("/v1/services/{}", seg("service", &name)?);
            let bytes = client::request(socket, Method::DELETE, &path, None).await?;
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
            println!("{}", v["removed"].as_str().unwrap_or("removed"));
            Ok(())
        }
        ServiceCommand::Show { name, output } => {
            let path = format!("/v1/services/{}", seg("service", &name)?);
            call(socket, Method::GET, &path, None, output).await
        }
    }
}

/// Runs `splitter version ...`.
pub async fn version(socket: &Path, cmd: VersionCommand) -> Result<(), CliError> {
    match cmd {
        VersionCommand::Add {
            service,
            version,
            weight,
            backends: addrs,
            output,
        } => {
            let spec = VersionSpec {
                name: version,
                weight,
                backends: backends(&addrs),
            };
            let path = format!("/v1/services/{}/versions", seg("service", &service)?);
            call(socket, Method::POST, &path, Some(json(&spec)?), output).await
        }
        VersionCommand::Remove {
            service,
            version,
            output,
        } => {
            let path = format!(
                "/v1/services/{}/versions/{}",
                seg("service", &service)?,
                seg("version", &version)?
            );
            call(socket, Method::DELETE, &path, None, output).await
        }
    }
}

/// Runs `splitter backend ...`.
pub async fn backend(socket: &Path, cmd: BackendCommand) -> Result<(), CliError> {
    match cmd {
        BackendCommand::Add {
            service,
            version,
            address,
            weight,
            state,
            output,
        } => {
            let spec = BackendSpec {
                address: address.to_string(),
                weight: Some(weight),
                state: Some(state),
            };
            let path = format!(
                "/v1/services/{}/versions/{}/backends",
                seg("service", &service)?,
                seg("version", &version)?
            );
            call(socket, Method::POST, &path, Some(json(&spec)?), output).await
        }
        BackendCommand::Set {
            service,
            address,
            weight,
            state,
            wait,
            output,
        } => {
            if weight.is_none() && state.is_none() {
                return Err(CliError::Usage(
                    "nothing to change: give --weight and/or --state".into(),
                ));
            }
            if wait.is_some() && state.as_deref() != Some("drain") {
                return Err(CliError::Usage(
                    "--wait goes with --state drain: it waits for the drained backend's flows to end"
                        .into(),
                ));
            }
            let patch = BackendPatch { weight, state };
            let path = format!(
                "/v1/services/{}/backends/{address}",
                seg("service", &service)?
            );
            call(socket, Method::PATCH, &path, Some(json(&patch)?), output).await?;
            match wait {
                Some(secs) => wait_drained(socket, &service, address, secs).await,
                None => Ok(()),
            }
        }
        BackendCommand::Remove {
            service,
            address,
            force,
            output,
        } => {
            let path = format!(
                "/v1/services/{}/backends/{address}?force={force}",
                seg("service", &service)?
            );
            call(socket, Method::DELETE, &path, None, output).await
        }
    }
}

/// `splitter shadow ...`
#[derive(Debug, Subcommand)]
pub enum ShadowCommand {
    /// Mirror a share of a service's traffic to a version that serves no
    /// client (weight 0), whose answers are dropped at the edge and counted.
    ///
    /// UDP: each sampled datagram still goes to its stable backend, and a
    /// copy to the shadow version. TCP (only a service with
    /// read_only = true, since every request is repeated): each sampled new
    /// flow is served by its stable backend through the daemon's tee, and
    /// the shadow gets the same request bytes over its own connection; a
    /// slow or dead shadow is cut off, never the client. Saved across
    /// restarts until the config file is edited; refused during a rollout
    /// of the service. `splitter status` shows how the shadow answers.
    ///
    /// Example: splitter shadow set dns canary --percent 10
    ///
    /// Example: splitter shadow set web green --percent 5
    Set {
        /// Service name.
        service: String,
        /// The shadow version (a version of the service with weight 0).
        version: String,
        /// Share mirrored, 1-100 (UDP: of datagrams; TCP: of new flows).
        #[arg(long)]
        percent: u32,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stop mirroring a service.
    ///
    /// Example: splitter shadow off dns
    Off {
        /// Service name.
        service: String,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Runs `splitter shadow ...`.
pub async fn shadow(socket: &Path, cmd: ShadowCommand) -> Result<(), CliError> {
    match cmd {
        ShadowCommand::Set {
            service,
            version,
            percent,
            output,
        } => {
            let spec = crate::edit::ShadowSpec { version, percent };
            let path = format!("/v1/services/{}/shadow", seg("service", &service)?);
            call(socket, Method::PUT, &path, Some(json(&spec)?), output).await
        }
        ShadowCommand::Off { service, output } => {
            let path = format!("/v1/services/{}/shadow", seg("service", &service)?);
            call(socket, Method::DELETE, &path, None, output).await
        }
    }
}
