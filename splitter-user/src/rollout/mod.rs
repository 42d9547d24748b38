//! The rollout engine's pure core: what a rollout is asked to do and the
//! state machine that decides each move. No I/O, no clock, no tokio: the
//! driver (a daemon task) owns time, reads the signals, persists the
//! state and carries out the actions through the controller's edit path.
//!
//! # Layout
//! - [`spec`]: [`spec::RolloutSpec`] (service, stable and target version,
//!   strategy: canary steps, blue-green, rolling batches; analysis limits;
//!   hooks), the checks it needs no service for, and the
//!   `[service.rollout]` defaults ([`spec::RolloutDefaults`]).
//! - [`check`]: [`spec::RolloutSpec::validate`], the spec against the
//!   service's config (versions, backends, health checks, rules).
//! - [`book`]: what is kept of each rollout beside the machine's state
//!   (timeline, analysis schedule, samples), and how a finished rollout's
//!   weights survive an edited config file (pure).
//! - [`driver`]: the daemon side (not pure): carries out the machine's
//!   actions through the controller, feeds it time, verdicts, backend
//!   events and commands, saves and resumes rollouts.
//! - [`plot`]: the report's SVG (plotters): shares, error rates, latency.
//! - [`machine`]: [`machine::Rollout`] (the persisted state) and
//!   [`machine::step`]: `(state, event) -> (state, actions)`, with its
//!   states, rules and errors ([`machine::TransitionError`]).
pub mod book;
pub mod check;
pub mod driver;
pub mod machine;
pub mod plot;
pub mod spec;
