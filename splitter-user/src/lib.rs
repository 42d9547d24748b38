//! splitter: the controller of an XDP L4 traffic splitter.
//!
//! # Layout
//! - [`config`]: the TOML configuration, parsed and validated with errors that
//!   name the field (pure, no I/O but reading the file).
//! - [`edit`]: runtime edits (add/remove services, versions, backends;
//!   backend weight and state), each validated before it is published.
//! - [`effective`]: what the data plane publishes: the config with the
//!   controller's overlays (health verdicts) applied (pure).
//! - [`health`]: active TCP or HTTP health checks with rise/fall counting.
//! - [`signals`]: per-backend connection signals from the kernel, their
//!   history and windows, the external metric, and the pure analysis.
//! - [`rollout`]: the rollout engine's pure core: the rollout spec and the
//!   state machine `(state, event) -> (state, actions)` (no I/O, no clock).
//! - [`target`]: source-CIDR targeting rules: parsing, validation and the
//!   longest-prefix match (pure).
//! - [`tee`]: TCP shadow traffic: the tee that copies a mirrored flow's
//!   bytes to a shadow backend (its plans are pure).
//! - [`table`]: weight math and the Maglev table builder (pure, property-tested).
//! - [`dataplane`]: loads and attaches the kernel program and writes its maps.
//! - [`hook`]: operator commands run on events, bounded by a timeout.
//! - [`kernel`]: the seam between the controller and the kernel (a trait
//!   the real data plane and a host-test fake implement).
//! - [`netif`]: interface look-ups (index, first IPv4 address).
//! - [`pins`]: the bpffs pin directory: layout checks, take-over, removal.
//! - [`state`]: the state file (running services, live ids), written atomically.
//! - [`systemd`]: readiness, status and watchdog notifications.
//! - [`controller`]: the running config and the data plane, changed together.
//! - [`report`]: the JSON documents the daemon reports (status, services,
//!   signals, flows): plain data the controller builds.
//! - [`api`]: the daemon's HTTP API on a Unix socket, and its request types.
//! - [`client`]: the CLI's side of that API.
//! - [`metrics`]: the Prometheus endpoint (`GET /metrics` on TCP, loopback by default).
//! - [`shutdown`]: the stop signal of the daemon's background tasks.
//! - [`daemon`]: `splitter daemon`: ties the above together until SIGTERM
//!   (which detaches, or with `--on-stop keep` leaves the data plane pinned).
//! - [`cli`]: the `splitter` command line, one module per subcommand.
pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod edit;
pub mod effective;
pub mod health;
pub mod hook;
pub mod kernel;
pub mod metrics;
pub mod netif;
pub mod pins;
pub mod report;
pub mod rollout;
pub mod shutdown;
pub mod signals;
pub mod state;
pub mod systemd;
pub mod table;
pub mod target;
pub mod tee;
