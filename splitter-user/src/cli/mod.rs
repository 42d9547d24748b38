//! The `splitter` command line: clap definitions and one small module per
//! subcommand. Every subcommand but `daemon` and `config check` is a client
//! of the daemon's API.
//!
//! Exit codes: 0 success; 1 the request was refused or failed (the message
//! says why); 2 bad command line; 3 the daemon could not be reached.
mod detach;
mod edit;
mod rollout;
mod status;
mod target;
mod weights;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{client::ClientError, daemon};

const EXAMPLES: &str = "\
Examples:
  splitter daemon --config /etc/splitter/splitter.toml
  splitter status
  splitter status --output json
  splitter status --window 5m --backends          # signals over 5 minutes, per backend too
  splitter weights set web blue=90 green=10
  splitter weights set web blue=0 green=100      # blue-green switch by hand
  splitter rollout start web --to green --watch  # canary 5,10,25,50,100% gated on signals
  splitter rollout status web --watch --timeout 30m   # exit 0 done, 1 rolled back, 4 timeout
  splitter backend set web 10.0.2.2:8080 --state drain   # no new flows; established go on
  splitter backend set web 10.0.2.2:8080 --state drain --wait 300   # ... and wait until they end
  splitter backend remove web 10.0.2.2:8080       # once its live flows reached 0
  splitter backend add web blue 10.0.2.5:8080
  splitter version add web canary --backend 10.0.2.7:8080   # weight 0 until raised
  splitter service add api --vip 10.0.0.11:443 --version v1 --backend 10.0.2.9:8443
  splitter target add web 10.0.1.96/28 green      # these clients' new flows go to green
  splitter target list web
  splitter config check /etc/splitter/splitter.toml
  splitter flow 10.0.1.2:40000 --service web      # where a flow goes, and why
  splitter reload                                 # re-read the config file (or SIGHUP)
  splitter detach                                 # remove the pinned data plane

Exit codes: 0 ok, 1 refused or failed, 2 bad command line, 3 daemon unreachable.";

/// XDP traffic splitter for zero-downtime deployments.
///
/// Splits new TCP/UDP flows to a virtual IP between versions of a service
/// (blue/green, canary) by weight, while established connections stay on
/// their backend. `splitter daemon` runs the data plane; the other commands
/// talk to it over its Unix socket.
#[derive(Debug, Parser)]
#[command(name = "splitter", version, after_help = EXAMPLES)]
pub struct Cli {
    /// API socket of the daemon.
    #[arg(long, global = true, env = "SPLITTER_SOCKET", default_value = daemon::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Output format of read commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON for scripts (the API's own format).
    Json,
}

/// `--window`: a duration within the signal history, in ms.
fn parse_window_arg(s: &str) -> Result<u64, String> {
    crate::signals::parse_window(s)
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller: load and attach the XDP program, publish the
    /// config, serve the API until SIGTERM (which detaches).
    ///
    /// Example: splitter daemon --config /etc/splitter/splitter.toml
    Daemon {
        /// Configuration file (TOML; see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Directory of the state file (the running services with every
        /// runtime change, and the live ids).
        #[arg(long, default_value = crate::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// On SIGTERM/SIGINT: `detach` removes the data plane; `keep` leaves
        /// it pinned and forwarding for the next daemon (restarts and
        /// upgrades without dropping a connection). A killed daemon always
        /// leaves it pinned.
        #[arg(long, value_enum, default_value_t = daemon::OnStop::Detach)]
        on_stop: daemon::OnStop,
        /// Load the kernel program from this BPF object file instead of the
        /// one built into this binary: to upgrade the kernel program alone,
        /// or to test a build (`cargo xtask build` leaves the program it
        /// embeds in target/release/splitter.bpf.o). Its maps must have
        /// this daemon's layout, checked before anything changes; it then
        /// takes over the pinned maps and XDP links like any restart, so
        /// established connections keep flowing. Applies to this run only.
        /// `splitter status` shows the running program's id and tag.
        #[arg(long, value_name = "PATH")]
        program: Option<PathBuf>,
        /// Group allowed to use the API socket (mode 0660 instead of 0600,
        /// owned by this group), so its members run the CLI without root.
        #[arg(long, value_name = "GROUP")]
        socket_group: Option<String>,
        /// Start even when the pins would vanish with this process (a
        /// daemon under `ip netns exec` with pin_dir below /sys/fs/bpf gets
        /// a bpffs of its own): the data plane and every established
        /// connection then end with the daemon, even on kill -9. For tests
        /// and demos; `splitter status` says so. Without it such a start is
        /// refused with the ways out (`nsenter --net=/run/netns/NAME`, or a
        /// pin_dir on the host's bpffs).
        #[arg(long)]
        ephemeral_pins: bool,
    },
    /// Show where a client's flow goes and why: its connection-table entry
    /// if the edge knows it (that decides), and the version and backend a
    /// new flow from it would get now.
    ///
    /// Example: splitter flow 10.0.1.2:40000 --service web
    Flow {
        /// Client address and source port.
        client: String,
        /// Service the client connects to.
        #[arg(long, short)]
        service: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// Example: splitter completions bash > /usr/share/bash-completion/completions/splitter
    Completions {
        /// Target shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) generated from these help texts.
    ///
    /// Example: splitter manpage | gzip > splitter.1.gz
    Manpage,
    /// Re-read the daemon's configuration file and apply it as a diff
    /// (same as SIGHUP). An invalid file is refused as a whole and the
    /// running configuration stays; the file replaces runtime changes
    /// (weights, backends, states, versions, services made with the CLI).
    ///
    /// Example: splitter reload
    Reload,
    /// Remove the data plane: detach XDP and delete the pinned program,
    /// links and maps, which drops every established flow through the
    /// edge. Stops a running daemon first. Stopping the daemon alone leaves
    /// the data plane forwarding.
    ///
    /// Example: splitter detach
    Detach {
        /// Pin directory (dataplane.pin_dir), used when no daemon runs.
        #[arg(long, default_value = crate::config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// State directory whose saved runtime changes are forgotten too, used when
        /// no daemon runs.
        #[arg(long, default_value = crate::state::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Show services, versions, weights, backends, counters, and how each
    /// version's connections open and end (new flows/s, error rate with its
    /// parts, connect latency) over a recent window.
    ///
    /// The signals are measured by the kernel program on every handshake:
    /// refused = the backend answered a SYN with RST; timeouts = no answer
    /// within the service's connect_timeout_ms; resets = RST from the
    /// backend on an established connection; error rate = (refused +
    /// timeouts + resets) / new flows. An error inside a healthy connection
    /// (an HTTP 500) is invisible here: see [service.analysis] for an
    /// external metric.
    ///
    /// Examples: splitter status --window 5m --backends; splitter status --output json
    Status {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Length of the signal window (`30s`, `5m`; at most 10m).
        #[arg(long, short, default_value = "60s", value_parser = parse_window_arg)]
        window: u64,
        /// Show the signals of every backend too, not only per version.
        #[arg(long, short)]
        backends: bool,
    },
    /// Change version weights live (new flows follow at once; established
    /// flows keep their backend).
    #[command(subcommand)]
    Weights(WeightsCommand),
    /// Canary, blue-green and rolling deployments run by the daemon, each
    /// step gated on the analysis of connection signals (and an external
    /// metric), with automatic rollback; watch them from a terminal or CI.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// Add, remove or show services (runtime changes, saved across restarts).
    #[command(subcommand)]
    Service(edit::ServiceCommand),
    /// Add or remove versions of a service.
    #[command(subcommand)]
    Version(edit::VersionCommand),
    /// Add, remove, reweight, drain or disable backends.
    #[command(subcommand)]
    Backend(edit::BackendCommand),
    /// Source-CIDR targeting: send new flows from client networks to one
    /// version, whatever the weights say (longest prefix wins).
    #[command(subcommand)]
    Target(target::TargetCommand),
    /// Mirror a share of a service's traffic to a shadow version, or stop.
    #[command(subcommand)]
    Shadow(edit::ShadowCommand),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `splitter weights ...`
#[derive(Debug, Subcommand)]
pub enum WeightsCommand {
    /// Set the weight of every version of a service.
    ///
    /// Weights are relative: blue=90 green=10 sends 90% of new flows to
    /// blue. Name every version of the service; at least one weight must be
    /// above zero.
    ///
    /// Example: splitter weights set web blue=90 green=10
    Set {
        /// Service name.
        service: String,
        /// VERSION=WEIGHT pairs, one per version.
        #[arg(required = true, value_name = "VERSION=WEIGHT")]
        weights: Vec<String>,
        /// Output format of the resulting service.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// `splitter config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file without touching the data plane.
    ///
    /// Example: splitter config check /etc/splitter/splitter.toml
    Check {
        /// Configuration file.
        file: PathBuf,
    },
}

/// Runs the parsed command line and returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Daemon {
            config,
            state_dir,
            on_stop,
            program,
            socket_group,
            ephemeral_pins,
        } => {
            let opts = daemon::DaemonOptions {
                config,
                socket: cli.socket,
                state_dir,
                on_stop,
                program,
                socket_group,
                ephemeral_pins,
            };
            daemon::run(opts, daemon::shutdown_signal())
                .await
                .map_err(CliError::Other)
        }
        Command::Status {
            output,
            window,
            backends,
        } => status::run(&cli.socket, output, window, backends).await,
        Command::Detach { pin_dir, state_dir } => {
            detach::run(&cli.socket, &pin_dir, &state_dir).await
        }
        Command::Reload => reload(&cli.socket).await,
        Command::Flow {
            client,
            service,
            output,
        } => flow(&cli.socket, &client, &service, output).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "splitter", &mut std::io::stdout());
            Ok(())
        }
        Command::Manpage => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| CliError::Other(e.into()))
                .map(|()| {
                    use std::io::Write as _;
                    let _ = std::io::stdout().write_all(&out);
                })
        }
        Command::Weights(WeightsCommand::Set {
            service,
            weights,
            output,
        }) => weights::set(&cli.socket, &service, &weights, output).await,
        Command::Service(c) => edit::service(&cli.socket, c).await,
        Command::Rollout(c) => rollout::run(&cli.socket, c).await,
        Command::Version(c) => edit::version(&cli.socket, c).await,
        Command::Backend(c) => edit::backend(&cli.socket, c).await,
        Command::Target(c) => target::run(&cli.socket, c).await,
        Command::Shadow(c) => edit::shadow(&cli.socket, c).await,
        Command::Config(ConfigCommand::Check { file }) => {
            match crate::config::Config::load(&file) {
                Ok(c) => {
                    println!("{}: OK ({} service(s))", file.display(), c.services.len());
                    Ok(())
                }
                Err(e) => Err(CliError::Other(e.into())),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Exit(code)) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.code())
        }
    }
}

async fn flow(
    socket: &std::path::Path,
    client: &str,
    service: &str,
    output: Output,
) -> Result<(), CliError> {
    let client: std::net::SocketAddrV4 = client.parse().map_err(|_| {
        CliError::Usage(format!(
            "{client:?} is not an IPv4 address:port (like 10.0.1.2:40000)"
        ))
    })?;
    let path = format!(
        "/v1/flow?service={}&client={client}",
        edit::seg("service", service)?
    );
    let body = crate::client::request(socket, hyper::Method::GET, &path, None).await?;
    if output == Output::Json {
        print!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let r: crate::api::FlowReport =
        serde_json::from_slice(&body).map_err(|e| CliError::Other(e.into()))?;
    println!(
        "flow {} -> {} ({}/{}, affinity {})",
        r.client, r.vip, r.service, r.protocol, r.affinity
    );
    match &r.connection {
        Some(c) => println!(
            "established: bound to {} (state {}, idle {} ms{}) — weights do not move it",
            c.backend,
            if c.tcp_state.is_empty() {
                "udp".to_string()
            } else {
                c.tcp_state.join(",")
            },
            c.idle_ms,
            c.snat_source
                .as_deref()
                .map(|s| format!(", backend sees {s}"))
                .unwrap_or_default()
        ),
        None => println!("not in the connection table"),
    }
    println!(
        "a new flow now: version {}, backend {}",
        r.new_flow_version, r.new_flow_backend
    );
    if let Some(t) = &r.target {
        println!("target rule: {t}");
    }
    println!("why: {}", r.why);
    Ok(())
}

async fn reload(socket: &std::path::Path) -> Result<(), CliError> {
    let body = crate::client::request(socket, hyper::Method::POST, "/v1/reload", None).await?;
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| CliError::Other(e.into()))?;
    let changes: Vec<&str> = v["changes"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    if changes.is_empty() {
        println!("reloaded: no changes");
    } else {
        println!("reloaded: {}", changes.join(", "));
    }
    Ok(())
}

/// Errors of CLI commands, carrying their exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Bad arguments found after parsing.
    #[error("{0}")]
    Usage(String),
    /// Anything else.
    #[error("{0:#}")]
    Other(anyhow::Error),
    /// A watch ended otherwise than completed: this exit code (its reason
    /// was printed already).
    #[error("exit {0}")]
    Exit(u8),
}

impl CliError {
    fn code(&self) -> u8 {
        match self {
            Self::Client(ClientError::Unreachable { .. }) => 3,
            Self::Usage(_) => 2,
            Self::Exit(code) => *code,
            _ => 1,
        }
    }
}
