//! The rollout state machine: `(state, event) -> (state, actions)`, with
//! no clock and no I/O. The driver owns time (every [`Event`] carries its
//! own `at_ms`), reads the signals, and carries out the [`Action`]s through
//! the same edit path as the CLI; this module only decides.
//!
//! ```
//! use splitter::rollout::machine::{Action, Command, Event, Phase, Rollout, step};
//! use splitter::rollout::spec::RolloutDefaults;
//! use splitter::signals::analysis::Verdict;
//! # use splitter::config::{BackendConfig, ServiceConfig, VersionConfig};
//! # let v = |name: &str, a: &str| VersionConfig { name: name.into(), weight: 1, backends: vec![BackendConfig::new(a.parse().unwrap())] };
//! # let service = ServiceConfig { name: "web".into(), vip: "10.0.0.10:80".parse().unwrap(),
//! #   protocol: Default::default(), affinity: Default::default(),
//! #   versions: vec![v("blue", "10.0.2.1:80"), v("green", "10.0.3.1:80")],
//! #   health: None, connect_timeout_ms: 1000, analysis: None, rollout: None, targets: vec![],
//! #   read_only: false, shadow: None };
//!
//! let spec = RolloutDefaults::default().spec("web", "blue", "green");
//! let r = Rollout::new(spec, &service, 0).unwrap();
//! let (r, actions) = step(r, Event::Start { at_ms: 0 }).unwrap();
//! assert!(actions.iter().any(|a| matches!(a, Action::SetWeights { target_percent: 5, .. })));
//! // One minute and a pass later, the second step (10%).
//! let (r, _) = step(r, Event::Analysis { at_ms: 50_000, verdict: Verdict::Pass }).unwrap();
//! let (r, actions) = step(r, Event::Tick { now_ms: 60_000 }).unwrap();
//! assert!(matches!(actions[0], Action::SetWeights { target_percent: 10, .. }));
//! // A finished rollout cannot be promoted: the error says why.
//! let (r, _) = step(r, Event::Command { at_ms: 61_000, command: Command::Abort }).unwrap();
//! assert!(matches!(r.phase, Phase::Aborted { .. }));
//! let err = step(r, Event::Command { at_ms: 62_000, command: Command::Promote }).unwrap_err();
//! assert!(err.to_string().starts_with("cannot promote: the rollout of \"web\" (blue → green) is aborted"));
//! ```
//!
//! # States
//! ```text
//! Pending ──Start──► step 0: Progressing (timed pause) | WaitingForPromotion (until_promoted)
//! Progressing ──pause over and the gate open──► next step | Completed
//! Progressing | WaitingForPromotion | Paused ──Promote──► next step | Completed
//!                                            ──PromoteFull──► Completed
//!                                            ──failure_limit failures──► RolledBack
//!                                            ──Abort──► Aborted
//! Progressing | WaitingForPromotion ──Pause, or inconclusive_limit in a row──► Paused
//! Paused ──Resume──► the step's phase again (its clock shifted by the pause)
//! Pending ──Abort──► Aborted
//! Completed (undo until T) ──Undo before T──► RolledBack
//!                          ──Tick at or after T──► Completed (old version released)
//! RolledBack | Aborted ──Retry──► step 0 (rolling: the failed batch)
//! ```
//! A blue-green rollout has two steps: the preview (target at 0%, ended
//! by `Promote` or `auto_promote_after_ms`, not analysed) and the switch
//! (target at 100%, analysed for `post_switch_analysis_ms`). A rolling
//! update is one step per batch; inside `Progressing` a batch goes through
//! the [`BatchStage`]s: `Draining ──live flows 0 or deadline──► RunningHook
//! ──every hook ok──► WaitingForHealth ──rise passes each──► SlowStart
//! ──ramp at 100%──► Verifying ──pass──►` the next batch, or `Completed`.
//!
//! # Rules
//! - **The gate.** With analysis enabled, a step ends only when its
//!   latest verdict is a `Pass`: at least one pass in the step, and no
//!   failure or inconclusive verdict since the last one (like Argo
//!   Rollouts, where the step's analysis run must succeed). A timed step
//!   ends at the first event at or after `step start + pause` with the
//!   gate open, so a pass that comes late ends it at once. No data never
//!   promotes. `Promote` is an operator's decision and skips the gate.
//! - **Failure.** `failure_limit` failed verdicts in one attempt roll back
//!   at once: the first action is `SetWeights` with the stable version at
//!   100%, and the phase keeps the reason and the figures. A rolling batch
//!   that fails is drained at once instead (`SetBackendState` first).
//! - **Doubt.** `inconclusive_limit` inconclusive verdicts in a row pause
//!   the rollout with the reason. A paused rollout keeps its weights and
//!   its analysis: a failure while paused still rolls back.
//! - **Pause.** Time spent paused does not count: `Resume` moves the
//!   step's start (and a rolling batch stage's start) later by the pause's
//!   length, and resets the inconclusive run.
//! - **Restart.** The state is serde data: the driver saves it after
//!   every step and, after a daemon restart, feeds [`Event::Restored`].
//!   The step's clock *continues* from the saved `step_started_at_ms`: the
//!   pinned data plane kept serving the step's weights while the daemon
//!   was down, so that time was real exposure. But the step's latest
//!   verdict is forgotten (nobody watched while the daemon was down), so
//!   the gate needs a fresh pass. `Restored` answers with the actions
//!   that re-establish the current step (weights, preview, analysis,
//!   backend states), which the driver applies idempotently.
//! - **Facts are never illegal.** `Tick`, `Analysis`, `Drained`,
//!   `HookFinished`, `Health` and `Restored` report what happened; when
//!   the machine is not waiting for them they are ignored (a verdict may
//!   have been in flight when the analysis stopped). Only `Start` and the
//!   [`Command`]s can be refused, with a [`TransitionError`] that says what
//!   state the rollout is in and what is allowed
//!   ([`Rollout::allowed_commands`]). A refused event changes nothing.
//! - **Time** never goes back inside the machine: an event older than the
//!   last one counts as happening at the last one's time.
use std::{collections::BTreeMap, collections::VecDeque, fmt, net::SocketAddrV4};

use serde::{Deserialize, Serialize};

use super::spec::{HookEvent, Pause, RolloutSpec, Strategy};
use crate::{
    config::{BackendState, ServiceConfig},
    signals::analysis::{Figures, Verdict},
    target::Cidr,
};

/// Most verdicts kept in [`Rollout::verdicts`]; older ones are dropped
/// (the full timeline is in the [`Action::Record`]s the driver stores).
pub const MAX_VERDICTS: usize = 50;

/// Where a rollout is. Finished phases are `Completed`, `RolledBack` and
/// `Aborted`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Created, not started.
    Pending,
    /// In a step that ends on its own: a timed pause (canary, blue-green
    /// with auto-promotion, post-switch window) or a rolling batch.
    Progressing,
    /// In a step that ends only on `Promote`.
    WaitingForPromotion,
    /// Stopped where it is, weights kept, analysis running, until
    /// `Resume` (or `Promote`, `Abort`).
    Paused {
        /// Why: the command, or the inconclusive verdicts.
        reason: String,
        /// When it paused.
        since_ms: u64,
    },
    /// The target is the stable version.
    Completed {
        /// Until when `Undo` is possible (the old version is kept at
        /// weight 0); `None`: no longer (or never, for rolling).
        undo_until_ms: Option<u64>,
    },
    /// Every new flow went back to the stable version: analysis failed,
    /// or a completed rollout was undone.
    RolledBack {
        /// What failed, with the numbers; or the undo.
        reason: String,
        /// The failed criterion's figures, if analysis failed.
        figures: Option<Figures>,
    },
    /// Stopped: by command (traffic back to stable), or a rolling batch
    /// whose deploy hook or analysis failed (the batch is left drained).
    Aborted {
        /// Why.
        reason: String,
        /// The failed criterion's figures, if a rolling batch's analysis
        /// failed.
        figures: Option<Figures>,
    },
}

impl Phase {
    /// `Completed`, `RolledBack` or `Aborted`.
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            Phase::Completed { .. } | Phase::RolledBack { .. } | Phase::Aborted { .. }
        )
    }

    /// `Progressing`, `WaitingForPromotion` or `Paused`: started and not
    /// finished.
    pub fn is_running(&self) -> bool {
        matches!(
            self,
            Phase::Progressing | Phase::WaitingForPromotion | Phase::Paused { .. }
        )
    }
}

/// The kind of a verdict, for the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    /// [`Verdict::Pass`].
    Pass,
    /// [`Verdict::Fail`].
    Fail,
    /// [`Verdict::Inconclusive`].
    Inconclusive,
}

impl VerdictKind {
    /// The kind of `v`.
    pub fn of(v: &Verdict) -> Self {
        match v {
            Verdict::Pass => VerdictKind::Pass,
            Verdict::Fail { .. } => VerdictKind::Fail,
            Verdict::Inconclusive { .. } => VerdictKind::Inconclusive,
        }
    }
}

/// A verdict the rollout took into account.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VerdictRecord {
    /// When it was made.
    pub at_ms: u64,
    /// The step (rolling: batch) it judged.
    pub step: usize,
    /// The verdict.
    pub verdict: Verdict,
}

/// The shares of new flows between the two versions, in percent (they add
/// up to 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    /// The stable version's share.
    pub stable_percent: u32,
    /// The target version's share.
    pub target_percent: u32,
}

impl Weights {
    /// `target_percent` to the target, the rest to stable.
    pub fn target(target_percent: u32) -> Self {
        let target_percent = target_percent.min(100);
        Self {
            stable_percent: 100 - target_percent,
            target_percent,
        }
    }
}

/// Where a rolling batch is, inside [`Phase::Progressing`] (or paused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum BatchStage {
    /// Out of new-flow selection; waiting for live flows to reach 0 or the
    /// drain deadline.
    Draining,
    /// The deploy hook runs on each backend of the batch.
    RunningHook,
    /// Waiting for `rise` passed health checks in a row on each backend.
    WaitingForHealth,
    /// Taking new flows again at `percent` of their weight, ramping up.
    SlowStart {
        /// The share of its configured weight each backend has now.
        percent: u32,
    },
    /// The batch is analysed against its peers and needs a pass.
    Verifying,
}

/// One backend of the current rolling batch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchMember {
    /// Its address.
    pub backend: SocketAddrV4,
    /// Its live flows, last reported while draining.
    pub live_flows: Option<u64>,
    /// Its deploy hook's result, once finished.
    pub hook_ok: Option<bool>,
    /// Passed health checks in a row since its hook finished.
    pub health_streak: u32,
}

impl BatchMember {
    fn new(backend: SocketAddrV4) -> Self {
        Self {
            backend,
            live_flows: None,
            hook_ok: None,
            health_streak: 0,
        }
    }
}

/// A rolling update's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollingProgress {
    /// The plan: the version's active backends when the rollout was
    /// created, in config order, `batch_size` at a time.
    pub batches: Vec<Vec<SocketAddrV4>>,
    /// The version's active backends at creation: a batch's peers in its
    /// analysis are these minus the batch.
    pub all: Vec<SocketAddrV4>,
    /// Where the current batch ([`Rollout::step`]) is.
    pub stage: BatchStage,
    /// When that stage began (shifted by pauses like the step's start).
    pub stage_started_at_ms: u64,
    /// The current batch's backends.
    pub members: Vec<BatchMember>,
}

/// A rollout: the spec and everything decided so far. Serde data, saved by
/// the driver after every step and restored on start (see the module's
/// rules for what a restart does to a step's clock).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// What was asked.
    pub spec: RolloutSpec,
    /// Where it is.
    pub phase: Phase,
    /// The current step: canary step, blue-green step (0 preview, 1 after
    /// the switch), rolling batch.
    pub step: usize,
    /// When the current step began (shifted later by pauses).
    pub step_started_at_ms: u64,
    /// The current shares of new flows (canary, blue-green).
    pub weights: Weights,
    /// The latest verdict in the current step: the gate (see the rules).
    pub step_verdict: Option<VerdictKind>,
    /// Inconclusive verdicts in a row.
    pub consecutive_inconclusive: u32,
    /// Failed verdicts in this attempt.
    pub failures: u32,
    /// The latest verdicts, oldest first, at most [`MAX_VERDICTS`].
    pub verdicts: VecDeque<VerdictRecord>,
    /// A rolling update's progress; `None` for canary and blue-green.
    pub rolling: Option<RollingProgress>,
    /// Starts so far (1 after `Start`, +1 per `Retry`).
    pub attempt: u32,
    /// When it was created.
    pub created_at_ms: u64,
    /// When it first started.
    pub started_at_ms: Option<u64>,
    /// The latest event's time (time never goes back before it).
    pub updated_at_ms: u64,
    /// When it last finished.
    pub finished_at_ms: Option<u64>,
}

/// What an operator asks (`splitter rollout promote ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// End the current step now (skipping its pause and gate).
    Promote,
    /// Complete now: the target at 100% and stable.
    PromoteFull,
    /// Stop where it is until `Resume`.
    Pause,
    /// Go on after a pause.
    Resume,
    /// Stop: new flows back to the stable version.
    Abort,
    /// Start again after a rollback or abort.
    Retry,
    /// Give the traffic back to the old version after completion, while it
    /// is kept.
    Undo,
}

impl Command {
    /// The CLI's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Command::Promote => "promote",
            Command::PromoteFull => "promote-full",
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Abort => "abort",
            Command::Retry => "retry",
            Command::Undo => "undo",
        }
    }

    /// Every command.
    pub const ALL: [Command; 7] = [
        Command::Promote,
        Command::PromoteFull,
        Command::Pause,
        Command::Resume,
        Command::Abort,
        Command::Retry,
        Command::Undo,
    ];
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What happened. Every event carries the driver's time in ms (any
/// monotonic origin, the same for the rollout's whole life).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Begin (only from `Pending`).
    Start {
        /// When.
        at_ms: u64,
    },
    /// Time passed.
    Tick {
        /// Now.
        now_ms: u64,
    },
    /// An analysis finished.
    Analysis {
        /// When it was made.
        at_ms: u64,
        /// Its verdict.
        verdict: Verdict,
    },
    /// An operator's command.
    Command {
        /// When it came.
        at_ms: u64,
        /// What it asks.
        command: Command,
    },
    /// A draining backend's live flows (reported while draining).
    Drained {
        /// When they were counted.
        at_ms: u64,
        /// The backend.
        backend: SocketAddrV4,
        /// Its live flows.
        live_flows: u64,
    },
    /// A deploy hook finished.
    HookFinished {
        /// When.
        at_ms: u64,
        /// The backend it deployed.
        backend: SocketAddrV4,
        /// Exit status 0 within its timeout.
        ok: bool,
        /// Its exit status or the reason it failed, for the record.
        detail: String,
    },
    /// One health check of a backend.
    Health {
        /// When.
        at_ms: u64,
        /// The backend.
        backend: SocketAddrV4,
        /// Passed.
        up: bool,
    },
    /// The daemon restarted and loaded this state.
    Restored {
        /// When.
        at_ms: u64,
    },
}

impl Event {
    /// When it happened.
    pub fn at_ms(&self) -> u64 {
        match self {
            Event::Tick { now_ms } => *now_ms,
            Event::Start { at_ms }
            | Event::Analysis { at_ms, .. }
            | Event::Command { at_ms, .. }
            | Event::Drained { at_ms, .. }
            | Event::HookFinished { at_ms, .. }
            | Event::Health { at_ms, .. }
            | Event::Restored { at_ms } => *at_ms,
        }
    }
}

/// What an analysis compares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scope", rename_all = "snake_case")]
pub enum AnalysisScope {
    /// The target version against the stable one (canary, blue-green).
    Versions {
        /// Judged.
        canary: String,
        /// Compared with.
        baseline: String,
    },
    /// Some backends of a version against the rest (a rolling batch
    /// against its peers).
    Backends {
        /// The version.
        version: String,
        /// Judged: the batch.
        canary: Vec<SocketAddrV4>,
        /// Compared with: its peers.
        baseline: Vec<SocketAddrV4>,
    },
}

/// Why a hook runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookPurpose {
    /// A notification hook of [`RolloutSpec::hooks`]; not waited for.
    Notify(HookEvent),
    /// The rolling deploy hook of one backend; answered by
    /// [`Event::HookFinished`].
    Deploy {
        /// The backend it deploys.
        backend: SocketAddrV4,
    },
}

/// A program to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookRun {
    /// Why.
    pub purpose: HookPurpose,
    /// Program and arguments (no shell).
    pub argv: Vec<String>,
    /// Added to its environment (`SPLITTER_*`).
    pub env: BTreeMap<String, String>,
    /// Kill it after this long (a deploy hook is then reported as failed).
    pub timeout_ms: u64,
}

/// What a timeline entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryKind {
    /// Started.
    Started,
    /// Started again (`Retry`).
    Retried,
    /// A step (batch) began.
    Step,
    /// A verdict came.
    Analysis,
    /// Paused.
    Paused,
    /// Resumed.
    Resumed,
    /// An operator ended a step (`Promote`).
    Promoted,
    /// Completed.
    Completed,
    /// Rolled back by analysis.
    RolledBack,
    /// Aborted.
    Aborted,
    /// Undone after completion.
    Undone,
    /// The old version's keep time ran out.
    OldReleased,
    /// The daemon restarted.
    Restored,
    /// A rolling batch's stage changed (drained, hooked, healthy, ramped).
    Batch,
}

/// One entry of the rollout's timeline, for reports and plots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// When.
    pub at_ms: u64,
    /// What.
    pub kind: HistoryKind,
    /// The step (rolling: batch) at that time.
    pub step: usize,
    /// The shares at that time (canary, blue-green).
    pub weights: Option<Weights>,
    /// The verdict, for `Analysis`.
    pub verdict: Option<Verdict>,
    /// A sentence for humans.
    pub detail: String,
}

/// How a rollout ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The target is the stable version.
    Completed,
    /// Analysis failed; traffic went back to stable.
    RolledBack,
    /// Aborted (command, failed deploy hook or batch).
    Aborted,
    /// A completed rollout was undone.
    Undone,
}

/// What the driver must do, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Give new flows to the two versions in these shares (other versions
    /// of the service get none).
    SetWeights {
        /// The stable version.
        stable: String,
        /// Its share, in percent.
        stable_percent: u32,
        /// The target version.
        target: String,
        /// Its share, in percent.
        target_percent: u32,
    },
    /// Serve `version` on the preview address `vip`.
    SetPreview {
        /// The address.
        vip: SocketAddrV4,
        /// The version it reaches.
        version: String,
    },
    /// Send new flows from these client networks to `version` (the
    /// rollout's `targets` step; the rules stay until
    /// [`Action::ClearTargets`]).
    SetTargets {
        /// The target version.
        version: String,
        /// The client networks.
        cidrs: Vec<Cidr>,
    },
    /// Remove the rollout's rules again (it ended).
    ClearTargets {
        /// The client networks.
        cidrs: Vec<Cidr>,
    },
    /// Stop serving the preview address.
    ClearPreview {
        /// The address.
        vip: SocketAddrV4,
    },
    /// `version` is now the service's stable version; `previous` stays at
    /// weight 0, ready, until [`Action::ReleaseOld`].
    SetStable {
        /// The new stable version.
        version: String,
        /// The one it replaces.
        previous: String,
    },
    /// `version` (kept for undo) is no longer needed; the driver may say
    /// so in reports or scale it down.
    ReleaseOld {
        /// The old version.
        version: String,
    },
    /// Put a backend in or out of new-flow selection.
    SetBackendState {
        /// The backend.
        backend: SocketAddrV4,
        /// `Active` or `Drain`.
        state: BackendState,
    },
    /// Slow start: the backend takes `percent` of its configured weight
    /// (100: its own weight again; the driver may drop the overlay).
    SetBackendWeight {
        /// The backend.
        backend: SocketAddrV4,
        /// 1..=100.
        percent: u32,
    },
    /// Run a program.
    RunHook(HookRun),
    /// Start producing [`Event::Analysis`] every `interval_ms`.
    StartAnalysis {
        /// What to compare.
        scope: AnalysisScope,
        /// How often.
        interval_ms: u64,
    },
    /// Stop the analysis.
    StopAnalysis,
    /// Append to the rollout's timeline.
    Record(HistoryEntry),
    /// The rollout finished (`splitter rollout status --watch` exits).
    Done {
        /// How.
        outcome: Outcome,
    },
}

/// A command (or `Start`) that the rollout's state does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {attempted}: the rollout of {rollout} is {state}; allowed now: {}", allowed_list(.allowed))]
pub struct TransitionError {
    /// What was asked (`promote`, `start`, ...).
    pub attempted: String,
    /// Which rollout: `"SERVICE" (FROM → TO)`.
    pub rollout: String,
    /// Its state, described ([`Rollout::describe`]).
    pub state: String,
    /// The commands allowed in that state.
    pub allowed: Vec<Command>,
}

fn allowed_list(allowed: &[Command]) -> String {
    if allowed.is_empty() {
        "nothing".to_string()
    } else {
        allowed
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One canary or blue-green step, as the machine sees it.
struct StepPlan {
    target_percent: u32,
    pause: Pause,
    /// Whether its verdicts count (the blue-green preview's do not).
    analysed: bool,
    preview: Option<SocketAddrV4>,
    /// A "targets only" step: the rollout's targets see the target.
    targets: bool,
}

/// Applies `event` to `state`.
///
/// # Errors
/// A [`TransitionError`] when `event` is `Start` or a command that the
/// state does not allow; the state is then consumed unchanged (use
/// [`Rollout::apply`] to keep it).
pub fn step(mut state: Rollout, event: Event) -> Result<(Rollout, Vec<Action>), TransitionError> {
    let actions = state.apply(event)?;
    Ok((state, actions))
}

impl Rollout {
    /// A pending rollout of `spec` on `service` (its config now), created
    /// at `now_ms`. A rolling update plans its batches here, from the
    /// version's active backends.
    ///
    /// # Errors
    /// The spec's problems ([`RolloutSpec::validate`]).
    pub fn new(
        spec: RolloutSpec,
        service: &ServiceConfig,
        now_ms: u64,
    ) -> Result<Self, Vec<String>> {
        spec.validate(service)?;
        let rolling = match &spec.strategy {
            Strategy::Rolling { batch_size, .. } => {
                let all: Vec<SocketAddrV4> = service
                    .versions
                    .iter()
                    .filter(|v| v.name == spec.from)
                    .flat_map(|v| v.backends.iter())
                    .filter(|b| b.state == BackendState::Active)
                    .map(|b| b.address)
                    .collect();
                let size = (*batch_size as usize).max(1);
                Some(RollingProgress {
                    batches: all.chunks(size).map(<[SocketAddrV4]>::to_vec).collect(),
                    all,
                    stage: BatchStage::Draining,
                    stage_started_at_ms: now_ms,
                    members: Vec::new(),
                })
            }
            _ => None,
        };
        Ok(Self {
            spec,
            phase: Phase::Pending,
            step: 0,
            step_started_at_ms: now_ms,
            weights: Weights::target(0),
            step_verdict: None,
            consecutive_inconclusive: 0,
            failures: 0,
            verdicts: VecDeque::new(),
            rolling,
            attempt: 0,
            created_at_ms: now_ms,
            started_at_ms: None,
            updated_at_ms: now_ms,
            finished_at_ms: None,
        })
    }

    /// Applies `event`: the state moves on and the actions to carry out,
    /// in order, are returned.
    ///
    /// # Errors
    /// A [`TransitionError`] when `event` is `Start` or a command that the
    /// state does not allow; `self` is then unchanged.
    pub fn apply(&mut self, event: Event) -> Result<Vec<Action>, TransitionError> {
        let now = event.at_ms().max(self.updated_at_ms);
        let mut out = Vec::new();
        match event {
            Event::Start { .. } => {
                if self.phase != Phase::Pending {
                    return Err(self.refuse("start", now));
                }
                self.begin(now, &mut out);
            }
            Event::Command { command, .. } => {
                if !self.allowed_commands(now).contains(&command) {
                    return Err(self.refuse(command.name(), now));
                }
                self.command(command, now, &mut out);
            }
            Event::Tick { .. } => self.tick(now, &mut out),
            Event::Analysis { verdict, .. } => self.verdict(verdict, now, &mut out),
            Event::Drained {
                backend,
                live_flows,
                ..
            } => self.drained(backend, live_flows, now, &mut out),
            Event::HookFinished {
                backend,
                ok,
                detail,
                ..
            } => self.hook_finished(backend, ok, &detail, now, &mut out),
            Event::Health { backend, up, .. } => self.health(backend, up, now, &mut out),
            Event::Restored { .. } => self.restored(now, &mut out),
        }
        self.updated_at_ms = now;
        Ok(out)
    }

    /// The commands the state allows at `now_ms` (`Undo` depends on the
    /// time).
    pub fn allowed_commands(&self, now_ms: u64) -> Vec<Command> {
        use Command::*;
        let rolling = self.rolling.is_some();
        match &self.phase {
            Phase::Pending => vec![Abort],
            Phase::Progressing | Phase::WaitingForPromotion if rolling => vec![Pause, Abort],
            Phase::Progressing | Phase::WaitingForPromotion => {
                vec![Promote, PromoteFull, Pause, Abort]
            }
            Phase::Paused { .. } if rolling => vec![Resume, Abort],
            Phase::Paused { .. } => vec![Promote, PromoteFull, Resume, Abort],
            Phase::Completed {
                undo_until_ms: Some(until),
            } if now_ms < *until && !rolling => vec![Undo],
            Phase::Completed { .. } => vec![],
            Phase::RolledBack { .. } | Phase::Aborted { .. } => vec![Retry],
        }
    }

    /// The state in words, as errors and status lines show it.
    pub fn describe(&self, now_ms: u64) -> String {
        let at = || match (&self.rolling, self.spec_steps().get(self.step)) {
            (Some(r), _) => format!(
                "batch {} of {} ({})",
                self.step + 1,
                r.batches.len(),
                batch_stage_name(r.stage)
            ),
            (None, Some(s)) => format!(
                "step {} of {} ({}% to {:?})",
                self.step + 1,
                self.spec_steps().len(),
                s.target_percent,
                self.spec.to
            ),
            (None, None) => format!("step {}", self.step + 1),
        };
        match &self.phase {
            Phase::Pending => "pending (not started)".to_string(),
            Phase::Progressing => format!("progressing at {}", at()),
            Phase::WaitingForPromotion => format!("waiting for promotion at {}", at()),
            Phase::Paused { reason, .. } => format!("paused at {}: {reason}", at()),
            Phase::Completed { undo_until_ms } => match undo_until_ms {
                _ if self.rolling.is_some() => {
                    "completed (a rolling update keeps no old version to undo to)".to_string()
                }
                Some(until) if now_ms < *until => format!(
                    "completed (the old version {:?} is kept for undo for {} more)",
                    self.spec.from,
                    remaining(until - now_ms)
                ),
                _ => format!(
                    "completed, and the old version {:?} is no longer kept (keep_old_ms = {} ran out), so it cannot be undone",
                    self.spec.from,
                    self.spec.keep_old_for_ms()
                ),
            },
            Phase::RolledBack { reason, .. } => format!("rolled back: {reason}"),
            Phase::Aborted { reason, .. } => format!("aborted: {reason}"),
        }
    }

    fn refuse(&self, attempted: &str, now: u64) -> TransitionError {
        TransitionError {
            attempted: attempted.to_string(),
            rollout: format!(
                "{:?} ({} → {})",
                self.spec.service, self.spec.from, self.spec.to
            ),
            state: self.describe(now),
            allowed: self.allowed_commands(now),
        }
    }

    // ---- Steps (canary and blue-green).

    fn spec_steps(&self) -> Vec<StepPlan> {
        match &self.spec.strategy {
            Strategy::Canary { steps } => steps
                .iter()
                .map(|s| StepPlan {
                    target_percent: s.weight_percent,
                    pause: s.pause,
                    analysed: true,
                    preview: None,
                    targets: s.targets,
                })
                .collect(),
            Strategy::BlueGreen {
                preview,
                auto_promote_after_ms,
                post_switch_analysis_ms,
                ..
            } => vec![
                StepPlan {
                    target_percent: 0,
                    pause: auto_promote_after_ms.map_or(Pause::UntilPromoted, Pause::For),
                    analysed: false,
                    preview: *preview,
                    targets: false,
                },
                StepPlan {
                    target_percent: 100,
                    pause: Pause::For(*post_switch_analysis_ms),
                    analysed: true,
                    preview: None,
                    targets: false,
                },
            ],
            Strategy::Rolling { .. } => Vec::new(),
        }
    }

    /// Whether verdicts are being produced (and counted) now.
    fn analysing(&self) -> bool {
        if !self.spec.analysis.enabled || !self.phase.is_running() {
            return false;
        }
        match &self.rolling {
            Some(r) => r.stage == BatchStage::Verifying,
            None => self.spec_steps().get(self.step).is_some_and(|s| s.analysed),
        }
    }

    fn gate_open(&self, analysed: bool) -> bool {
        !(analysed && self.spec.analysis.enabled) || self.step_verdict == Some(VerdictKind::Pass)
    }

    /// The rules of the `targets` step, if the schedule has one (they
    /// stay from that step, the first, until the rollout ends).
    fn owned_targets(&self) -> Option<Vec<Cidr>> {
        (self.spec.has_targets_step() && !self.spec.targets.is_empty())
            .then(|| self.spec.targets.clone())
    }

    fn version_scope(&self) -> AnalysisScope {
        AnalysisScope::Versions {
            canary: self.spec.to.clone(),
            baseline: self.spec.from.clone(),
        }
    }

    fn set_weights(&mut self, w: Weights, out: &mut Vec<Action>) {
        self.weights = w;
        out.push(Action::SetWeights {
            stable: self.spec.from.clone(),
            stable_percent: w.stable_percent,
            target: self.spec.to.clone(),
            target_percent: w.target_percent,
        });
    }

    fn begin(&mut self, now: u64, out: &mut Vec<Action>) {
        let retry = self.attempt > 0;
        self.attempt = self.attempt.saturating_add(1);
        self.failures = 0;
        self.consecutive_inconclusive = 0;
        self.step_verdict = None;
        self.started_at_ms.get_or_insert(now);
        self.finished_at_ms = None;
        let (kind, detail) = if retry {
            (HistoryKind::Retried, format!("attempt {}", self.attempt))
        } else {
            (
                HistoryKind::Started,
                format!(
                    "{} rollout of {:?} from {:?} to {:?}",
                    self.spec.strategy.name(),
                    self.spec.service,
                    self.spec.from,
                    self.spec.to
                ),
            )
        };
        out.push(self.record(now, kind, detail.clone(), None));
        self.notify(HookEvent::Started, &detail, out);
        if self.rolling.is_some() {
            // A retry starts the batch that failed again; earlier batches
            // are done.
            self.start_batch(now, out);
        } else {
            self.enter_step(0, now, out);
        }
        self.advance(now, out);
    }

    fn enter_step(&mut self, index: usize, now: u64, out: &mut Vec<Action>) {
        let steps = self.spec_steps();
        let Some(plan) = steps.get(index) else {
            return;
        };
        let previous = index.checked_sub(1).and_then(|i| steps.get(i));
        self.set_weights(Weights::target(plan.target_percent), out);
        if plan.targets
            && let Some(cidrs) = self.owned_targets()
        {
            out.push(Action::SetTargets {
                version: self.spec.to.clone(),
                cidrs,
            });
        }
        if let Some(vip) = previous.and_then(|p| p.preview) {
            out.push(Action::ClearPreview { vip });
        }
        if let Some(vip) = plan.preview {
            out.push(Action::SetPreview {
                vip,
                version: self.spec.to.clone(),
            });
        }
        let was_analysed = previous.is_some_and(|p| p.analysed);
        if plan.analysed && self.spec.analysis.enabled && !was_analysed {
            out.push(Action::StartAnalysis {
                scope: self.version_scope(),
                interval_ms: self.spec.analysis.interval_ms,
            });
        }
        self.step = index;
        self.step_started_at_ms = now;
        self.step_verdict = None;
        self.phase = match plan.pause {
            Pause::For(_) => Phase::Progressing,
            Pause::UntilPromoted => Phase::WaitingForPromotion,
        };
        let detail = format!(
            "step {} of {}: {}% of new flows to {:?}{}",
            index + 1,
            steps.len(),
            plan.target_percent,
            self.spec.to,
            match plan.pause {
                Pause::For(ms) => format!(", for {ms} ms"),
                Pause::UntilPromoted => ", until promoted".to_string(),
            }
        );
        out.push(self.record(now, HistoryKind::Step, detail.clone(), None));
        self.notify(HookEvent::Step, &detail, out);
    }

    /// Ends the current step: the next one, or completion.
    fn next_step(&mut self, now: u64, out: &mut Vec<Action>) {
        if self.rolling.is_some() {
            return;
        }
        if self.step + 1 < self.spec_steps().len() {
            self.enter_step(self.step + 1, now, out);
        } else {
            self.complete(now, out);
        }
    }

    /// Moves on while the current step's end condition holds.
    fn advance(&mut self, now: u64, out: &mut Vec<Action>) {
        // Each round ends a step or a batch stage; bounded by their number.
        let bound = self.spec_steps().len()
            + self
                .rolling
                .as_ref()
                .map_or(0, |r| r.batches.len().saturating_mul(6))
            + 1;
        for _ in 0..bound {
            if self.phase != Phase::Progressing {
                return;
            }
            let moved = if self.rolling.is_some() {
                self.advance_batch(now, out)
            } else {
                let steps = self.spec_steps();
                let done = steps.get(self.step).is_some_and(|s| match s.pause {
                    Pause::For(ms) => {
                        now.saturating_sub(self.step_started_at_ms) >= ms
                            && self.gate_open(s.analysed)
                    }
                    Pause::UntilPromoted => false,
                });
                if done {
                    self.next_step(now, out);
                }
                done
            };
            if !moved {
                return;
            }
        }
    }

    fn complete(&mut self, now: u64, out: &mut Vec<Action>) {
        // A rolling update completes from `batch_done`, which stopped the
        // batch's analysis already.
        let analysing = self.rolling.is_none() && self.analysing();
        if self.rolling.is_none() {
            if self.weights != Weights::target(100) {
                self.set_weights(Weights::target(100), out);
            }
            if let Some(vip) = self.spec_steps().get(self.step).and_then(|s| s.preview) {
                out.push(Action::ClearPreview { vip });
            }
            // At 100% the rules choose nothing any more.
            if let Some(cidrs) = self.owned_targets() {
                out.push(Action::ClearTargets { cidrs });
            }
        }
        if analysing {
            out.push(Action::StopAnalysis);
        }
        let detail = if self.rolling.is_some() {
            self.phase = Phase::Completed {
                undo_until_ms: None,
            };
            format!("every batch of {:?} is redeployed", self.spec.from)
        } else {
            out.push(Action::SetStable {
                version: self.spec.to.clone(),
                previous: self.spec.from.clone(),
            });
            self.phase = Phase::Completed {
                undo_until_ms: Some(now.saturating_add(self.spec.keep_old_for_ms())),
            };
            format!(
                "{:?} is the stable version; {:?} is kept at weight 0 for {} ms",
                self.spec.to,
                self.spec.from,
                self.spec.keep_old_for_ms()
            )
        };
        self.finished_at_ms = Some(now);
        out.push(self.record(now, HistoryKind::Completed, detail.clone(), None));
        self.notify(HookEvent::Completed, &detail, out);
        out.push(Action::Done {
            outcome: Outcome::Completed,
        });
    }

    /// New flows back to stable (canary, blue-green) or the batch drained
    /// (rolling), then the phase and the record.
    fn take_back(&mut self, out: &mut Vec<Action>) {
        let analysing = self.analysing();
        if self.rolling.is_none() {
            self.set_weights(Weights::target(0), out);
            if let Some(cidrs) = self.owned_targets() {
                out.push(Action::ClearTargets { cidrs });
            }
            if let Some(vip) = self.spec_steps().get(self.step).and_then(|s| s.preview) {
                out.push(Action::ClearPreview { vip });
            }
        } else if let Some(r) = &self.rolling
            && matches!(
                r.stage,
                BatchStage::SlowStart { .. } | BatchStage::Verifying
            )
        {
            for m in &r.members {
                out.push(Action::SetBackendState {
                    backend: m.backend,
                    state: BackendState::Drain,
                });
            }
        }
        if analysing {
            out.push(Action::StopAnalysis);
        }
    }

    fn finish_badly(
        &mut self,
        now: u64,
        reason: String,
        figures: Option<Figures>,
        verdict: Option<Verdict>,
        out: &mut Vec<Action>,
    ) {
        let rolled_back = self.rolling.is_none() && figures.is_some();
        self.take_back(out);
        let (kind, hook, outcome) = if rolled_back {
            self.phase = Phase::RolledBack {
                reason: reason.clone(),
                figures,
            };
            (
                HistoryKind::RolledBack,
                HookEvent::RolledBack,
                Outcome::RolledBack,
            )
        } else {
            self.phase = Phase::Aborted {
                reason: reason.clone(),
                figures,
            };
            (HistoryKind::Aborted, HookEvent::Aborted, Outcome::Aborted)
        };
        self.finished_at_ms = Some(now);
        out.push(self.record(now, kind, reason.clone(), verdict));
        self.notify(hook, &reason, out);
        out.push(Action::Done { outcome });
    }

    fn pause(&mut self, now: u64, reason: String, out: &mut Vec<Action>) {
        self.phase = Phase::Paused {
            reason: reason.clone(),
            since_ms: now,
        };
        out.push(self.record(now, HistoryKind::Paused, reason.clone(), None));
        self.notify(HookEvent::Paused, &reason, out);
    }

    /// The phase of the current step when it runs.
    fn running_phase(&self) -> Phase {
        match self.spec_steps().get(self.step).map(|s| s.pause) {
            Some(Pause::UntilPromoted) => Phase::WaitingForPromotion,
            _ => Phase::Progressing,
        }
    }

    fn command(&mut self, command: Command, now: u64, out: &mut Vec<Action>) {
        match command {
            Command::Promote => {
                self.consecutive_inconclusive = 0;
                let detail = format!("step {} ended by command", self.step + 1);
                out.push(self.record(now, HistoryKind::Promoted, detail, None));
                self.next_step(now, out);
                self.advance(now, out);
            }
            Command::PromoteFull => {
                out.push(self.record(
                    now,
                    HistoryKind::Promoted,
                    "promoted to 100% by command".to_string(),
                    None,
                ));
                self.complete(now, out);
            }
            Command::Pause => self.pause(now, "paused by command".to_string(), out),
            Command::Resume => {
                if let Phase::Paused { since_ms, .. } = self.phase {
                    let paused = now.saturating_sub(since_ms);
                    self.step_started_at_ms = self.step_started_at_ms.saturating_add(paused);
                    if let Some(r) = &mut self.rolling {
                        r.stage_started_at_ms = r.stage_started_at_ms.saturating_add(paused);
                    }
                    self.consecutive_inconclusive = 0;
                    self.phase = self.running_phase();
                    let detail = format!("resumed after {paused} ms");
                    out.push(self.record(now, HistoryKind::Resumed, detail.clone(), None));
                    self.notify(HookEvent::Resumed, &detail, out);
                    self.advance(now, out);
                }
            }
            Command::Abort => {
                if self.phase == Phase::Pending {
                    let reason = "aborted by command before it started".to_string();
                    self.phase = Phase::Aborted {
                        reason: reason.clone(),
                        figures: None,
                    };
                    self.finished_at_ms = Some(now);
                    out.push(self.record(now, HistoryKind::Aborted, reason.clone(), None));
                    self.notify(HookEvent::Aborted, &reason, out);
                    out.push(Action::Done {
                        outcome: Outcome::Aborted,
                    });
                } else {
                    let reason = match &self.rolling {
                        Some(r) => format!(
                            "aborted by command; batch {} ({}) is left drained",
                            self.step + 1,
                            list(r.members.iter().map(|m| m.backend))
                        ),
                        None => format!(
                            "aborted by command; every new flow goes to {:?}",
                            self.spec.from
                        ),
                    };
                    self.finish_badly(now, reason, None, None, out);
                }
            }
            Command::Retry => self.begin(now, out),
            Command::Undo => {
                let after = self.finished_at_ms.map_or(0, |f| now.saturating_sub(f));
                self.set_weights(Weights::target(0), out);
                out.push(Action::SetStable {
                    version: self.spec.from.clone(),
                    previous: self.spec.to.clone(),
                });
                let reason = format!(
                    "undone by command {after} ms after completion; {:?} is the stable version again",
                    self.spec.from
                );
                self.phase = Phase::RolledBack {
                    reason: reason.clone(),
                    figures: None,
                };
                self.finished_at_ms = Some(now);
                out.push(self.record(now, HistoryKind::Undone, reason.clone(), None));
                self.notify(HookEvent::Undone, &reason, out);
                out.push(Action::Done {
                    outcome: Outcome::Undone,
                });
            }
        }
    }

    fn tick(&mut self, now: u64, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Completed {
                undo_until_ms: Some(until),
            } if now >= until => {
                self.phase = Phase::Completed {
                    undo_until_ms: None,
                };
                out.push(Action::ReleaseOld {
                    version: self.spec.from.clone(),
                });
                let detail = format!(
                    "{:?} is no longer kept for undo (keep_old_ms = {})",
                    self.spec.from,
                    self.spec.keep_old_for_ms()
                );
                out.push(self.record(now, HistoryKind::OldReleased, detail.clone(), None));
                self.notify(HookEvent::OldReleased, &detail, out);
            }
            Phase::Progressing => self.advance(now, out),
            _ => {}
        }
    }

    fn verdict(&mut self, verdict: Verdict, now: u64, out: &mut Vec<Action>) {
        if !self.analysing() {
            return;
        }
        let kind = VerdictKind::of(&verdict);
        if self.verdicts.len() >= MAX_VERDICTS {
            self.verdicts.pop_front();
        }
        self.verdicts.push_back(VerdictRecord {
            at_ms: now,
            step: self.step,
            verdict: verdict.clone(),
        });
        self.step_verdict = Some(kind);
        let failure_limit = self.spec.analysis.failure_limit.max(1);
        let inconclusive_limit = self.spec.analysis.inconclusive_limit.max(1);
        let record = self.record(
            now,
            HistoryKind::Analysis,
            verdict.name().to_string(),
            Some(verdict.clone()),
        );
        match &verdict {
            Verdict::Pass => {
                self.consecutive_inconclusive = 0;
                out.push(record);
            }
            Verdict::Inconclusive { reason } => {
                out.push(record);
                self.consecutive_inconclusive = self.consecutive_inconclusive.saturating_add(1);
                if self.consecutive_inconclusive >= inconclusive_limit
                    && !matches!(self.phase, Phase::Paused { .. })
                {
                    let why = format!(
                        "{} inconclusive analyses in a row (inconclusive_limit = {inconclusive_limit}); the last: {reason}",
                        self.consecutive_inconclusive
                    );
                    self.pause(now, why, out);
                }
            }
            Verdict::Fail { reason, figures } => {
                self.consecutive_inconclusive = 0;
                self.failures = self.failures.saturating_add(1);
                if self.failures < failure_limit {
                    out.push(record);
                } else {
                    // Taking the traffic back comes first: `finish_badly`
                    // starts with it, and records the verdict after.
                    let what = match &self.rolling {
                        Some(r) => format!(
                            "analysis of batch {} ({}) failed ({} of failure_limit {failure_limit}): {reason}; the batch is drained",
                            self.step + 1,
                            list(r.members.iter().map(|m| m.backend)),
                            self.failures
                        ),
                        None => format!(
                            "analysis failed ({} of failure_limit {failure_limit}): {reason}; every new flow goes to {:?}",
                            self.failures, self.spec.from
                        ),
                    };
                    let figures = Some(figures.clone());
                    self.finish_badly(now, what, figures, Some(verdict), out);
                    return;
                }
            }
        }
        self.advance(now, out);
    }

    fn restored(&mut self, now: u64, out: &mut Vec<Action>) {
        if !self.phase.is_running() {
            out.push(self.record(now, HistoryKind::Restored, self.describe(now), None));
            return;
        }
        // Nobody watched while the daemon was down: the gate needs a
        // fresh pass. The step's clock goes on from its saved start.
        self.step_verdict = None;
        let analysing = self.analysing();
        match self.rolling.clone() {
            None => {
                self.set_weights(self.weights, out);
                if let Some(cidrs) = self.owned_targets() {
                    out.push(Action::SetTargets {
                        version: self.spec.to.clone(),
                        cidrs,
                    });
                }
                if let Some(vip) = self.spec_steps().get(self.step).and_then(|s| s.preview) {
                    out.push(Action::SetPreview {
                        vip,
                        version: self.spec.to.clone(),
                    });
                }
                if analysing {
                    out.push(Action::StartAnalysis {
                        scope: self.version_scope(),
                        interval_ms: self.spec.analysis.interval_ms,
                    });
                }
            }
            Some(r) => match r.stage {
                BatchStage::Draining | BatchStage::RunningHook | BatchStage::WaitingForHealth => {
                    for m in &r.members {
                        out.push(Action::SetBackendState {
                            backend: m.backend,
                            state: BackendState::Drain,
                        });
                    }
                    if r.stage == BatchStage::RunningHook {
                        // The hooks died with the daemon; they run again
                        // (deploy hooks must be idempotent).
                        for m in r.members.iter().filter(|m| m.hook_ok.is_none()) {
                            if let Some(run) = self.deploy_hook(m.backend) {
                                out.push(Action::RunHook(run));
                            }
                        }
                    }
                }
                BatchStage::SlowStart { percent } => {
                    for m in &r.members {
                        out.push(Action::SetBackendWeight {
                            backend: m.backend,
                            percent,
                        });
                        out.push(Action::SetBackendState {
                            backend: m.backend,
                            state: BackendState::Active,
                        });
                    }
                }
                BatchStage::Verifying => {
                    if analysing {
                        out.push(Action::StartAnalysis {
                            scope: self.batch_scope(),
                            interval_ms: self.spec.analysis.interval_ms,
                        });
                    }
                }
            },
        }
        out.push(self.record(now, HistoryKind::Restored, self.describe(now), None));
    }

    // ---- Rolling batches.

    fn start_batch(&mut self, now: u64, out: &mut Vec<Action>) {
        let step = self.step;
        let Some(r) = &mut self.rolling else {
            return;
        };
        let Some(batch) = r.batches.get(step) else {
            return;
        };
        r.members = batch.iter().copied().map(BatchMember::new).collect();
        r.stage = BatchStage::Draining;
        r.stage_started_at_ms = now;
        let n = r.batches.len();
        let names = list(batch.iter().copied());
        for &backend in batch {
            out.push(Action::SetBackendState {
                backend,
                state: BackendState::Drain,
            });
        }
        self.step_started_at_ms = now;
        self.step_verdict = None;
        self.phase = Phase::Progressing;
        let detail = format!("batch {} of {n}: draining {names}", step + 1);
        out.push(self.record(now, HistoryKind::Step, detail.clone(), None));
        self.notify(HookEvent::Step, &detail, out);
    }

    fn rolling_knobs(&self) -> (u64, u32, u64) {
        match &self.spec.strategy {
            Strategy::Rolling {
                drain_deadline_ms,
                rise,
                slow_start_ms,
                ..
            } => (*drain_deadline_ms, *rise, *slow_start_ms),
            _ => (0, 1, 0),
        }
    }

    fn deploy_hook(&self, backend: SocketAddrV4) -> Option<HookRun> {
        let Strategy::Rolling {
            hook: Some(argv),
            hook_timeout_ms,
            ..
        } = &self.spec.strategy
        else {
            return None;
        };
        let mut env = self.env("deploy", "");
        env.insert("SPLITTER_BACKEND".into(), backend.to_string());
        env.insert("SPLITTER_VERSION".into(), self.spec.from.clone());
        env.insert("SPLITTER_BATCH".into(), (self.step + 1).to_string());
        Some(HookRun {
            purpose: HookPurpose::Deploy { backend },
            argv: argv.clone(),
            env,
            timeout_ms: *hook_timeout_ms,
        })
    }

    fn batch_scope(&self) -> AnalysisScope {
        let (canary, baseline) = match &self.rolling {
            Some(r) => {
                let canary: Vec<SocketAddrV4> = r.members.iter().map(|m| m.backend).collect();
                let baseline = r
                    .all
                    .iter()
                    .copied()
                    .filter(|b| !canary.contains(b))
                    .collect();
                (canary, baseline)
            }
            None => (Vec::new(), Vec::new()),
        };
        AnalysisScope::Backends {
            version: self.spec.from.clone(),
            canary,
            baseline,
        }
    }

    fn set_stage(&mut self, stage: BatchStage, now: u64) {
        if let Some(r) = &mut self.rolling {
            r.stage = stage;
            r.stage_started_at_ms = now;
        }
    }

    /// One move of the current batch, if its stage's condition holds.
    fn advance_batch(&mut self, now: u64, out: &mut Vec<Action>) -> bool {
        let Some(r) = self.rolling.clone() else {
            return false;
        };
        let (deadline, rise, slow_start) = self.rolling_knobs();
        let elapsed = now.saturating_sub(r.stage_started_at_ms);
        match r.stage {
            BatchStage::Draining => {
                let all_drained = r.members.iter().all(|m| m.live_flows == Some(0));
                if !all_drained && elapsed < deadline {
                    return false;
                }
                let detail = if all_drained {
                    format!("batch {}: drained", self.step + 1)
                } else {
                    let left: Vec<String> = r
                        .members
                        .iter()
                        .filter(|m| m.live_flows != Some(0))
                        .map(|m| match m.live_flows {
                            Some(n) => format!("{} with {n} live flows", m.backend),
                            None => format!("{} (live flows never reported)", m.backend),
                        })
                        .collect();
                    format!(
                        "batch {}: drain deadline of {deadline} ms reached: {}",
                        self.step + 1,
                        left.join(", ")
                    )
                };
                out.push(self.record(now, HistoryKind::Batch, detail, None));
                let runs: Vec<HookRun> = r
                    .members
                    .iter()
                    .filter_map(|m| self.deploy_hook(m.backend))
                    .collect();
                if runs.is_empty() {
                    self.set_stage(BatchStage::WaitingForHealth, now);
                } else {
                    out.extend(runs.into_iter().map(Action::RunHook));
                    self.set_stage(BatchStage::RunningHook, now);
                }
                true
            }
            BatchStage::RunningHook => {
                if !r.members.iter().all(|m| m.hook_ok == Some(true)) {
                    return false;
                }
                if let Some(r) = &mut self.rolling {
                    for m in &mut r.members {
                        m.health_streak = 0;
                    }
                }
                let detail = format!(
                    "batch {}: deployed; waiting for {rise} passed health checks each",
                    self.step + 1
                );
                out.push(self.record(now, HistoryKind::Batch, detail, None));
                self.set_stage(BatchStage::WaitingForHealth, now);
                true
            }
            BatchStage::WaitingForHealth => {
                if !r.members.iter().all(|m| m.health_streak >= rise) {
                    return false;
                }
                let percent = ramp(0, slow_start);
                for m in &r.members {
                    out.push(Action::SetBackendWeight {
                        backend: m.backend,
                        percent,
                    });
                    out.push(Action::SetBackendState {
                        backend: m.backend,
                        state: BackendState::Active,
                    });
                }
                let detail = format!(
                    "batch {}: healthy; back in at {percent}% of its weight",
                    self.step + 1
                );
                out.push(self.record(now, HistoryKind::Batch, detail, None));
                self.set_stage(BatchStage::SlowStart { percent }, now);
                true
            }
            BatchStage::SlowStart { percent } => {
                let next = ramp(elapsed, slow_start);
                if next != percent {
                    for m in &r.members {
                        out.push(Action::SetBackendWeight {
                            backend: m.backend,
                            percent: next,
                        });
                    }
                    if let Some(r) = &mut self.rolling {
                        r.stage = BatchStage::SlowStart { percent: next };
                    }
                }
                if next < 100 {
                    return false;
                }
                if self.spec.analysis.enabled {
                    self.set_stage(BatchStage::Verifying, now);
                    self.step_verdict = None;
                    out.push(Action::StartAnalysis {
                        scope: self.batch_scope(),
                        interval_ms: self.spec.analysis.interval_ms,
                    });
                    let detail = format!(
                        "batch {}: at full weight; analysed against its peers",
                        self.step + 1
                    );
                    out.push(self.record(now, HistoryKind::Batch, detail, None));
                } else {
                    self.batch_done(now, out);
                }
                true
            }
            BatchStage::Verifying => {
                if !self.gate_open(true) {
                    return false;
                }
                out.push(Action::StopAnalysis);
                self.batch_done(now, out);
                true
            }
        }
    }

    fn batch_done(&mut self, now: u64, out: &mut Vec<Action>) {
        let n = self.rolling.as_ref().map_or(0, |r| r.batches.len());
        let detail = format!("batch {} of {n} done", self.step + 1);
        out.push(self.record(now, HistoryKind::Batch, detail, None));
        if self.step + 1 < n {
            self.step += 1;
            self.start_batch(now, out);
        } else {
            self.complete(now, out);
        }
    }

    fn member(&mut self, backend: SocketAddrV4, stage: BatchStage) -> Option<&mut BatchMember> {
        if !self.phase.is_running() {
            return None;
        }
        let r = self.rolling.as_mut()?;
        if r.stage != stage {
            return None;
        }
        r.members.iter_mut().find(|m| m.backend == backend)
    }

    fn drained(&mut self, backend: SocketAddrV4, live_flows: u64, now: u64, out: &mut Vec<Action>) {
        let Some(m) = self.member(backend, BatchStage::Draining) else {
            return;
        };
        m.live_flows = Some(live_flows);
        self.advance(now, out);
    }

    fn hook_finished(
        &mut self,
        backend: SocketAddrV4,
        ok: bool,
        detail: &str,
        now: u64,
        out: &mut Vec<Action>,
    ) {
        let Some(m) = self.member(backend, BatchStage::RunningHook) else {
            return;
        };
        if m.hook_ok.is_some() {
            return;
        }
        m.hook_ok = Some(ok);
        let line = format!(
            "deploy hook on {backend} {}: {detail}",
            if ok { "succeeded" } else { "failed" }
        );
        out.push(self.record(now, HistoryKind::Batch, line, None));
        if ok {
            self.advance(now, out);
            return;
        }
        let batch = self
            .rolling
            .as_ref()
            .map(|r| list(r.members.iter().map(|m| m.backend)))
            .unwrap_or_default();
        let reason = format!(
            "deploy hook failed on {backend}: {detail}; batch {} ({batch}) is left drained",
            self.step + 1
        );
        self.finish_badly(now, reason, None, None, out);
    }

    fn health(&mut self, backend: SocketAddrV4, up: bool, now: u64, out: &mut Vec<Action>) {
        let Some(m) = self.member(backend, BatchStage::WaitingForHealth) else {
            return;
        };
        m.health_streak = if up {
            m.health_streak.saturating_add(1)
        } else {
            0
        };
        self.advance(now, out);
    }

    // ---- Records and hooks.

    fn record(
        &self,
        now: u64,
        kind: HistoryKind,
        detail: String,
        verdict: Option<Verdict>,
    ) -> Action {
        Action::Record(HistoryEntry {
            at_ms: now,
            kind,
            step: self.step,
            weights: self.rolling.is_none().then_some(self.weights),
            verdict,
            detail,
        })
    }

    fn env(&self, event: &str, reason: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert("SPLITTER_EVENT".into(), event.to_string());
        env.insert("SPLITTER_SERVICE".into(), self.spec.service.clone());
        env.insert("SPLITTER_FROM".into(), self.spec.from.clone());
        env.insert("SPLITTER_TO".into(), self.spec.to.clone());
        env.insert("SPLITTER_STEP".into(), self.step.to_string());
        if self.rolling.is_none() {
            env.insert(
                "SPLITTER_TARGET_PERCENT".into(),
                self.weights.target_percent.to_string(),
            );
        }
        if !reason.is_empty() {
            env.insert("SPLITTER_REASON".into(), reason.to_string());
        }
        env
    }

    fn notify(&self, event: HookEvent, reason: &str, out: &mut Vec<Action>) {
        for h in self.spec.hooks.iter().filter(|h| h.event == event) {
            out.push(Action::RunHook(HookRun {
                purpose: HookPurpose::Notify(event),
                argv: h.argv.clone(),
                env: self.env(event.name(), reason),
                timeout_ms: h.timeout_ms,
            }));
        }
    }
}

/// The slow-start share after `elapsed` of `total` ms: 1..=100, 100 at
/// the end (and at once when `total` is 0).
fn ramp(elapsed: u64, total: u64) -> u32 {
    if total == 0 || elapsed >= total {
        return 100;
    }
    let p = u128::from(elapsed) * 100 / u128::from(total);
    u32::try_from(p).unwrap_or(100).clamp(1, 100)
}

fn batch_stage_name(s: BatchStage) -> &'static str {
    match s {
        BatchStage::Draining => "draining",
        BatchStage::RunningHook => "running the deploy hook",
        BatchStage::WaitingForHealth => "waiting for health",
        BatchStage::SlowStart { .. } => "slow start",
        BatchStage::Verifying => "verifying",
    }
}

fn list(backends: impl Iterator<Item = SocketAddrV4>) -> String {
    backends
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod targets_tests;
#[cfg(test)]
mod tests;

/// A time left, for people: `9m59s`, `42s` (whole seconds, rounded down;
/// under a second reads `0s`).
fn remaining(ms: u64) -> String {
    let secs = ms / 1000;
    if secs >= 60 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}
