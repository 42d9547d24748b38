//! What a rollout is asked to do: the service, the stable version it
//! starts from, the target version it moves to, the [`Strategy`], the
//! [`AnalysisSpec`] that judges each step, and the hooks to run. Plain
//! serde data, validated against the service's config with messages that
//! name the field ([`RolloutSpec::validate`]). Pure: no I/O, no clock.
//!
//! ```
//! use splitter::rollout::spec::{Pause, RolloutSpec, Strategy};
//!
//! let spec: RolloutSpec = toml::from_str(r#"
//! service = "web"
//! from = "blue"
//! to = "green"
//! [strategy]
//! kind = "canary"
//! steps = [
//!   { weight_percent = 10, pause = { for = 30000 } },
//!   { weight_percent = 50, pause = "until_promoted" },
//!   { weight_percent = 100 },
//! ]
//! "#).unwrap();
//! let Strategy::Canary { steps } = &spec.strategy else { panic!() };
//! assert_eq!(steps[1].pause, Pause::UntilPromoted);
//! assert_eq!(spec.analysis.failure_limit, 1);
//! ```
//!
//! The same knobs with their defaults, per service, are
//! [`RolloutDefaults`] (`[service.rollout]`); a rollout started from the
//! CLI takes them and overrides what it names.
use std::net::SocketAddrV4;

use serde::{Deserialize, Serialize};

use crate::{signals::analysis::Criteria, target::Cidr};

/// The canary schedule when none is given: the share of new flows sent to
/// the target at each step, in percent.
pub const DEFAULT_CANARY_PERCENTS: [u32; 5] = [5, 10, 25, 50, 100];
/// How long a step lasts when its pause is not given (1 min).
pub const DEFAULT_STEP_PAUSE_MS: u64 = 60_000;
/// Default of [`AnalysisSpec::interval_ms`] (10 s).
pub const DEFAULT_ANALYSIS_INTERVAL_MS: u64 = 10_000;
/// Shortest [`AnalysisSpec::interval_ms`]: the signals are read once a
/// second, so a shorter interval would judge the same data twice.
pub const MIN_ANALYSIS_INTERVAL_MS: u64 = 1_000;
/// Default of [`AnalysisSpec::failure_limit`]: the first failure rolls back.
pub const DEFAULT_FAILURE_LIMIT: u32 = 1;
/// Default of [`AnalysisSpec::inconclusive_limit`].
pub const DEFAULT_INCONCLUSIVE_LIMIT: u32 = 3;
/// Default of [`RolloutSpec::keep_old_ms`] (10 min).
pub const DEFAULT_KEEP_OLD_MS: u64 = 600_000;
/// Default of a blue-green switch's post-switch analysis window (5 min).
pub const DEFAULT_POST_SWITCH_ANALYSIS_MS: u64 = 300_000;
/// Default of a rolling batch's drain deadline (30 s).
pub const DEFAULT_DRAIN_DEADLINE_MS: u64 = 30_000;
/// Default of a rolling batch's slow-start ramp (30 s).
pub const DEFAULT_SLOW_START_MS: u64 = 30_000;
/// Default of a rolling update's health gate (passed checks in a row).
pub const DEFAULT_ROLLING_RISE: u32 = 2;
/// Default of a hook's timeout (5 min); the driver kills it after that.
pub const DEFAULT_HOOK_TIMEOUT_MS: u64 = 300_000;

/// How a canary step ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pause {
    /// After this many ms in the step (and the step's analysis gate, see
    /// [`crate::rollout::machine`]). TOML: `pause = { for = 60000 }`.
    For(u64),
    /// When an operator promotes (`splitter rollout promote`). TOML:
    /// `pause = "until_promoted"`.
    UntilPromoted,
}

impl Default for Pause {
    fn default() -> Self {
        Pause::For(DEFAULT_STEP_PAUSE_MS)
    }
}

/// One canary step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Share of new flows sent to the target version, 0..=100; the rest go
    /// to the stable version. 0 when left out (a `targets` step must leave
    /// it 0).
    #[serde(default)]
    pub weight_percent: u32,
    /// How the step ends (default: [`DEFAULT_STEP_PAUSE_MS`]).
    #[serde(default)]
    pub pause: Pause,
    /// A "targets only" step (TOML `{ targets = true }`, CLI `--steps
    /// targets,5,...`): only the rollout's [`RolloutSpec::targets`] (client
    /// networks) see the target version, everyone else stays on the stable
    /// one (`weight_percent` 0). It must be the first step; its rules stay
    /// for the later steps and are removed when the rollout ends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub targets: bool,
}

/// The default canary schedule: [`DEFAULT_CANARY_PERCENTS`], each step
/// pausing [`DEFAULT_STEP_PAUSE_MS`].
pub fn default_steps() -> Vec<Step> {
    DEFAULT_CANARY_PERCENTS
        .iter()
        .map(|&weight_percent| Step {
            weight_percent,
            pause: Pause::default(),
            targets: false,
        })
        .collect()
}

fn default_post_switch_analysis_ms() -> u64 {
    DEFAULT_POST_SWITCH_ANALYSIS_MS
}
fn default_batch_size() -> u32 {
    1
}
fn default_drain_deadline_ms() -> u64 {
    DEFAULT_DRAIN_DEADLINE_MS
}
fn default_rolling_rise() -> u32 {
    DEFAULT_ROLLING_RISE
}
fn default_slow_start_ms() -> u64 {
    DEFAULT_SLOW_START_MS
}
fn default_hook_timeout_ms() -> u64 {
    DEFAULT_HOOK_TIMEOUT_MS
}

/// How the traffic moves. TOML: a table with `kind = "canary" |
/// "blue_green" | "rolling"` and the variant's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Strategy {
    /// Shares of new flows, step by step, from stable to target.
    Canary {
        /// The schedule (default [`default_steps`]): percents that never go
        /// down and end at 100.
        #[serde(default = "default_steps")]
        steps: Vec<Step>,
    },
    /// The target beside the stable version, previewed, then all new flows
    /// switched at once.
    BlueGreen {
        /// An address (VIP:port) that reaches the target before the switch,
        /// for tests on production infrastructure; `None`: no preview.
        #[serde(default)]
        preview: Option<SocketAddrV4>,
        /// Switch this long after the start without a `promote`; `None`:
        /// wait for `promote`.
        #[serde(default)]
        auto_promote_after_ms: Option<u64>,
        /// After the switch, the target is analysed this long (and needs a
        /// pass) before the rollout completes; a failure switches back.
        #[serde(default = "default_post_switch_analysis_ms")]
        post_switch_analysis_ms: u64,
        /// How long the old version stays ready at weight 0 for `undo`
        /// after completion; `None`: [`RolloutSpec::keep_old_ms`].
        #[serde(default)]
        keep_old_ms: Option<u64>,
    },
    /// Inside one version (`from` = `to`): batches of backends are drained,
    /// redeployed by a hook, health-checked, ramped back and analysed
    /// against their peers, one batch after the other.
    Rolling {
        /// Backends per batch (default 1); fewer than the version's active
        /// backends, so that some keep serving.
        #[serde(default = "default_batch_size")]
        batch_size: u32,
        /// Longest wait for a drained backend's live flows to reach 0; the
        /// batch goes on after it anyway (the figure is recorded).
        #[serde(default = "default_drain_deadline_ms")]
        drain_deadline_ms: u64,
        /// The deploy hook, run once per backend of the batch after the
        /// drain (argv; `SPLITTER_BACKEND` etc. in its environment); `None`:
        /// something else deploys, the batch only waits for health.
        #[serde(default)]
        hook: Option<Vec<String>>,
        /// Longest run of the deploy hook, in ms (default
        /// [`DEFAULT_HOOK_TIMEOUT_MS`]); the driver reports a timeout as a
        /// failed hook.
        #[serde(default = "default_hook_timeout_ms")]
        hook_timeout_ms: u64,
        /// Passed health checks in a row a redeployed backend needs before
        /// it takes new flows again (default 2).
        #[serde(default = "default_rolling_rise")]
        rise: u32,
        /// The ramp from 1% to 100% of the backend's weight once healthy,
        /// in ms (0: at once).
        #[serde(default = "default_slow_start_ms")]
        slow_start_ms: u64,
    },
}

impl Default for Strategy {
    fn default() -> Self {
        Strategy::Canary {
            steps: default_steps(),
        }
    }
}

impl Strategy {
    /// `canary`, `blue_green` or `rolling`.
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Canary { .. } => "canary",
            Strategy::BlueGreen { .. } => "blue_green",
            Strategy::Rolling { .. } => "rolling",
        }
    }

    /// Problems of the strategy on its own (without the service), each
    /// naming its field under `strategy.`.
    pub(super) fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        match self {
            Strategy::Canary { steps } => {
                if steps.is_empty() {
                    p.push("strategy.steps is empty: a canary needs at least one step, and the last at 100%".to_string());
                }
                let mut previous: Option<u32> = None;
                for (i, s) in steps.iter().enumerate() {
                    if s.targets && i > 0 {
                        p.push(format!(
                            "strategy.steps[{i}] is a targets step: it must be the first (targets, 5, 10, 25, 50, 100)"
                        ));
                    }
                    if s.targets && s.weight_percent != 0 {
                        p.push(format!(
                            "strategy.steps[{i}] is a targets step with weight_percent = {}: only the targeted clients see the target there, so it must be 0",
                            s.weight_percent
                        ));
                    }
                    if s.weight_percent > 100 {
                        p.push(format!(
                            "strategy.steps[{i}].weight_percent = {} is above 100",
                            s.weight_percent
                        ));
                    }
                    if let Some(prev) = previous
                        && s.weight_percent < prev
                    {
                        p.push(format!(
                            "strategy.steps[{i}].weight_percent = {} is below the previous step's {prev}: steps must not go down",
                            s.weight_percent
                        ));
                    }
                    previous = Some(s.weight_percent);
                }
                if let Some(last) = steps.last()
                    && last.weight_percent != 100
                {
                    p.push(format!(
                        "strategy.steps[{}].weight_percent = {}: the last step must be 100 (the whole share to the target)",
                        steps.len() - 1,
                        last.weight_percent
                    ));
                }
            }
            Strategy::BlueGreen { .. } => {}
            Strategy::Rolling {
                batch_size,
                hook,
                hook_timeout_ms,
                rise,
                ..
            } => {
                if *batch_size == 0 {
                    p.push(
                        "strategy.batch_size = 0: a batch needs at least one backend".to_string(),
                    );
                }
                if *rise == 0 {
                    p.push("strategy.rise = 0: a redeployed backend needs at least one passed health check".to_string());
                }
                if let Some(argv) = hook {
                    if let Some(problem) = argv_problem(argv) {
                        p.push(format!("strategy.hook {problem}"));
                    }
                    if *hook_timeout_ms == 0 {
                        p.push(
                            "strategy.hook_timeout_ms = 0: the hook needs time to run".to_string(),
                        );
                    }
                }
            }
        }
        p
    }
}

/// Problem of a hook's argv, if any.
fn argv_problem(argv: &[String]) -> Option<String> {
    match argv.first() {
        None => Some("is empty: it needs at least the program to run".to_string()),
        Some(prog) if prog.trim().is_empty() => {
            Some("has an empty program name (argv[0])".to_string())
        }
        Some(_) => None,
    }
}

fn default_analysis_interval_ms() -> u64 {
    DEFAULT_ANALYSIS_INTERVAL_MS
}
fn default_failure_limit() -> u32 {
    DEFAULT_FAILURE_LIMIT
}
fn default_inconclusive_limit() -> u32 {
    DEFAULT_INCONCLUSIVE_LIMIT
}
fn yes() -> bool {
    true
}

/// How each step is judged (the knobs of Argo Rollouts' analysis, named
/// the same way).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisSpec {
    /// `false`: no analysis; steps advance on time (or promotion) alone and
    /// nothing rolls back on its own. Default `true`.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Time between two verdicts, in ms (default 10 s, at least 1 s).
    #[serde(default = "default_analysis_interval_ms")]
    pub interval_ms: u64,
    /// Failed verdicts (over the whole attempt) that roll back; default 1:
    /// the first failure rolls back.
    #[serde(default = "default_failure_limit")]
    pub failure_limit: u32,
    /// Inconclusive verdicts in a row that pause the rollout (with the
    /// reason); default 3. No data never promotes.
    #[serde(default = "default_inconclusive_limit")]
    pub inconclusive_limit: u32,
    /// What a verdict judges (thresholds, minimum samples).
    #[serde(default)]
    pub criteria: Criteria,
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            interval_ms: DEFAULT_ANALYSIS_INTERVAL_MS,
            failure_limit: DEFAULT_FAILURE_LIMIT,
            inconclusive_limit: DEFAULT_INCONCLUSIVE_LIMIT,
            criteria: Criteria::default(),
        }
    }
}

impl AnalysisSpec {
    pub(super) fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.interval_ms < MIN_ANALYSIS_INTERVAL_MS {
            p.push(format!(
                "analysis.interval_ms = {} is below the shortest interval {MIN_ANALYSIS_INTERVAL_MS}",
                self.interval_ms
            ));
        }
        if self.failure_limit == 0 {
            p.push("analysis.failure_limit = 0: it must be at least 1 (1: the first failure rolls back)".to_string());
        }
        if self.inconclusive_limit == 0 {
            p.push("analysis.inconclusive_limit = 0: it must be at least 1 (that many inconclusive verdicts in a row pause the rollout)".to_string());
        }
        if let Err(e) = self.criteria.validate() {
            p.push(format!("analysis.criteria: {e}"));
        }
        p
    }
}

/// When a notification hook runs. The hook's environment says what
/// happened (`SPLITTER_EVENT`, `SPLITTER_SERVICE`, `SPLITTER_FROM`,
/// `SPLITTER_TO`, `SPLITTER_STEP`, `SPLITTER_TARGET_PERCENT`,
/// `SPLITTER_REASON`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookEvent {
    /// The rollout started (or was retried).
    Started,
    /// A new step (canary), the switch (blue-green) or a new batch
    /// (rolling) began.
    Step,
    /// It paused (command or inconclusive limit).
    Paused,
    /// It resumed.
    Resumed,
    /// It completed: the target is the stable version.
    Completed,
    /// Analysis failed and the traffic went back to the stable version.
    RolledBack,
    /// It was aborted (command or failed deploy hook).
    Aborted,
    /// A completed rollout was undone.
    Undone,
    /// The old version's keep time ran out (undo is no longer possible).
    OldReleased,
}

impl HookEvent {
    /// The spelling used in files and in `SPLITTER_EVENT`.
    pub fn name(self) -> &'static str {
        match self {
            HookEvent::Started => "started",
            HookEvent::Step => "step",
            HookEvent::Paused => "paused",
            HookEvent::Resumed => "resumed",
            HookEvent::Completed => "completed",
            HookEvent::RolledBack => "rolled_back",
            HookEvent::Aborted => "aborted",
            HookEvent::Undone => "undone",
            HookEvent::OldReleased => "old_released",
        }
    }
}

/// A program run when something happens to the rollout. Notification
/// only: the rollout does not wait for it (the rolling deploy hook, which
/// it waits for, is the rolling strategy's `hook`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// When it runs.
    pub event: HookEvent,
    /// Program and arguments (no shell).
    pub argv: Vec<String>,
    /// Longest run, in ms (default [`DEFAULT_HOOK_TIMEOUT_MS`]).
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
}

pub(super) fn hooks_problems(hooks: &[Hook]) -> Vec<String> {
    let mut p = Vec::new();
    for (i, h) in hooks.iter().enumerate() {
        if let Some(problem) = argv_problem(&h.argv) {
            p.push(format!("hooks[{i}].argv {problem}"));
        }
        if h.timeout_ms == 0 {
            p.push(format!(
                "hooks[{i}].timeout_ms = 0: the hook needs time to run"
            ));
        }
    }
    p
}

fn default_keep_old_ms() -> u64 {
    DEFAULT_KEEP_OLD_MS
}

/// One rollout: move `service` from `from` to `to` by `strategy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The service's name.
    pub service: String,
    /// The stable version: where new flows go now, and where they go back
    /// on rollback.
    pub from: String,
    /// The target version, already in the config with backends (rolling:
    /// the same as `from`).
    pub to: String,
    /// How the traffic moves (default: the default canary).
    #[serde(default)]
    pub strategy: Strategy,
    /// How each step is judged.
    #[serde(default)]
    pub analysis: AnalysisSpec,
    /// How long the old version stays ready at weight 0 after completion,
    /// so that `undo` is instant; after it `undo` is refused. In ms,
    /// default 10 min.
    #[serde(default = "default_keep_old_ms")]
    pub keep_old_ms: u64,
    /// Notification hooks.
    #[serde(default)]
    pub hooks: Vec<Hook>,
    /// Client networks a canary's `targets` step sends to the target
    /// version (as source-CIDR rules the rollout owns); needed by, and only
    /// with, such a step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Cidr>,
}

impl RolloutSpec {
    /// Whether the schedule starts with a `targets` step.
    pub fn has_targets_step(&self) -> bool {
        matches!(&self.strategy, Strategy::Canary { steps } if steps.first().is_some_and(|s| s.targets))
    }

    /// How long the old version is kept for `undo` after completion: the
    /// blue-green strategy's own value if set, else [`Self::keep_old_ms`].
    pub fn keep_old_for_ms(&self) -> u64 {
        match &self.strategy {
            Strategy::BlueGreen {
                keep_old_ms: Some(ms),
                ..
            } => *ms,
            _ => self.keep_old_ms,
        }
    }
}

/// `[service.rollout]`: a service's rollout defaults, which a rollout
/// started for it takes unless it says otherwise. Every field has a
/// default, so an empty table (or none) is the default canary.
///
/// ```
/// use splitter::rollout::spec::RolloutDefaults;
///
/// let d: RolloutDefaults = toml::from_str(r#"
/// keep_old_ms = 60000
/// [strategy]
/// kind = "blue_green"
/// preview = "10.0.0.10:8080"
/// [analysis]
/// inconclusive_limit = 5
/// "#).unwrap();
/// d.validate().unwrap();
/// let spec = d.spec("web", "blue", "green");
/// assert_eq!(spec.analysis.inconclusive_limit, 5);
/// assert_eq!(spec.strategy.name(), "blue_green");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutDefaults {
    /// The strategy (default: the default canary).
    pub strategy: Strategy,
    /// The analysis.
    pub analysis: AnalysisSpec,
    /// See [`RolloutSpec::keep_old_ms`].
    pub keep_old_ms: u64,
    /// Notification hooks.
    pub hooks: Vec<Hook>,
    /// See [`RolloutSpec::targets`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<Cidr>,
}

// Equality is reflexive: validation refuses NaN in the criteria, the only
// floats here (the config, which holds these, compares with `Eq`).
impl Eq for RolloutDefaults {}

impl Default for RolloutDefaults {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            analysis: AnalysisSpec::default(),
            keep_old_ms: DEFAULT_KEEP_OLD_MS,
            hooks: Vec::new(),
            targets: Vec::new(),
        }
    }
}

impl RolloutDefaults {
    /// Checks what can be checked without knowing the versions: the
    /// schedule, the limits, the hooks. Messages name the field as in
    /// [`RolloutSpec::validate`] (the config prefixes them with
    /// `service "NAME": rollout.`).
    ///
    /// # Errors
    /// Every problem, one sentence each.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut p = self.strategy.problems();
        p.extend(self.analysis.problems());
        p.extend(hooks_problems(&self.hooks));
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// A rollout of `service` from `from` to `to` with these defaults.
    pub fn spec(&self, service: &str, from: &str, to: &str) -> RolloutSpec {
        RolloutSpec {
            service: service.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            strategy: self.strategy.clone(),
            analysis: self.analysis.clone(),
            keep_old_ms: self.keep_old_ms,
            hooks: self.hooks.clone(),
            targets: self.targets.clone(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{BackendConfig, BackendState, HealthConfig, ServiceConfig, VersionConfig};

    pub(crate) fn addr(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    /// Service "web" with versions blue (3 backends) and green (2).
    pub(crate) fn service() -> ServiceConfig {
        let backends = |list: &[&str]| list.iter().map(|a| BackendConfig::new(addr(a))).collect();
        ServiceConfig {
            name: "web".into(),
            vip: addr("10.0.0.10:80"),
            protocol: Default::default(),
            affinity: Default::default(),
            versions: vec![
                VersionConfig {
                    name: "blue".into(),
                    weight: 100,
                    backends: backends(&["10.0.2.1:80", "10.0.2.2:80", "10.0.2.3:80"]),
                },
                VersionConfig {
                    name: "green".into(),
                    weight: 0,
                    backends: backends(&["10.0.3.1:80", "10.0.3.2:80"]),
                },
            ],
            health: Some(HealthConfig::default()),
            connect_timeout_ms: crate::config::DEFAULT_CONNECT_TIMEOUT_MS,
            analysis: None,
            rollout: None,
            targets: Vec::new(),
            read_only: false,
            shadow: None,
        }
    }

    pub(crate) fn canary(steps: &[(u32, Pause)]) -> RolloutSpec {
        RolloutSpec {
            strategy: Strategy::Canary {
                steps: steps
                    .iter()
                    .map(|&(weight_percent, pause)| Step {
                        weight_percent,
                        pause,
                        targets: false,
                    })
                    .collect(),
            },
            ..RolloutDefaults::default().spec("web", "blue", "green")
        }
    }

    fn problems(spec: &RolloutSpec) -> Vec<String> {
        spec.validate(&service()).err().unwrap_or_default()
    }

    #[test]
    fn the_default_spec_is_the_default_canary_and_valid() {
        let spec = RolloutDefaults::default().spec("web", "blue", "green");
        let Strategy::Canary { steps } = &spec.strategy else {
            panic!("{spec:?}")
        };
        let percents: Vec<u32> = steps.iter().map(|s| s.weight_percent).collect();
        assert_eq!(percents, DEFAULT_CANARY_PERCENTS);
        assert!(steps.iter().all(|s| s.pause == Pause::For(60_000)));
        assert_eq!(spec.analysis.interval_ms, 10_000);
        assert_eq!(spec.analysis.failure_limit, 1);
        assert_eq!(spec.analysis.inconclusive_limit, 3);
        assert_eq!(spec.validate(&service()), Ok(()));
    }

    #[test]
    fn a_minimal_toml_spec_takes_the_defaults() {
        let spec: RolloutSpec =
            toml::from_str("service = \"web\"\nfrom = \"blue\"\nto = \"green\"\n").unwrap();
        assert_eq!(
            spec,
            RolloutDefaults::default().spec("web", "blue", "green")
        );
    }

    #[test]
    fn strategies_parse_from_toml() {
        let bg: RolloutSpec = toml::from_str(
            r#"
service = "web"
from = "blue"
to = "green"
[strategy]
kind = "blue_green"
preview = "10.0.0.10:8080"
auto_promote_after_ms = 120000
keep_old_ms = 5000
"#,
        )
        .unwrap();
        assert_eq!(
            bg.strategy,
            Strategy::BlueGreen {
                preview: Some(addr("10.0.0.10:8080")),
                auto_promote_after_ms: Some(120_000),
                post_switch_analysis_ms: DEFAULT_POST_SWITCH_ANALYSIS_MS,
                keep_old_ms: Some(5000),
            }
        );
        assert_eq!(bg.keep_old_for_ms(), 5000);
        let rolling: RolloutSpec = toml::from_str(
            r#"
service = "web"
from = "blue"
to = "blue"
[strategy]
kind = "rolling"
batch_size = 2
hook = ["/usr/local/bin/deploy", "--fast"]
"#,
        )
        .unwrap();
        assert_eq!(
            rolling.strategy,
            Strategy::Rolling {
                batch_size: 2,
                drain_deadline_ms: DEFAULT_DRAIN_DEADLINE_MS,
                hook: Some(vec!["/usr/local/bin/deploy".into(), "--fast".into()]),
                hook_timeout_ms: DEFAULT_HOOK_TIMEOUT_MS,
                rise: DEFAULT_ROLLING_RISE,
                slow_start_ms: DEFAULT_SLOW_START_MS,
            }
        );
        assert_eq!(rolling.validate(&service()), Ok(()));
        assert_eq!(rolling.keep_old_for_ms(), DEFAULT_KEEP_OLD_MS);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = toml::from_str::<RolloutSpec>(
            "service = \"web\"\nfrom = \"blue\"\nto = \"green\"\nkeep_old = 1\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("keep_old"), "{e}");
    }

    #[test]
    fn json_round_trip() {
        let mut spec = canary(&[(10, Pause::For(1000)), (100, Pause::UntilPromoted)]);
        spec.hooks.push(Hook {
            event: HookEvent::Completed,
            argv: vec!["notify".into()],
            timeout_ms: 1000,
        });
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<RolloutSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn unknown_versions_are_named() {
        let spec = RolloutDefaults::default().spec("web", "blu", "gren");
        assert_eq!(
            problems(&spec),
            [
                "from = \"blu\": no such version of service \"web\" (versions: blue, green)",
                "to = \"gren\": no such version of service \"web\" (versions: blue, green)",
            ]
        );
    }

    #[test]
    fn the_wrong_service_is_named() {
        let spec = RolloutDefaults::default().spec("api", "blue", "green");
        assert_eq!(
            problems(&spec),
            ["service = \"api\", but it is checked against service \"web\""]
        );
    }

    #[test]
    fn target_equal_to_stable_is_refused() {
        let spec = RolloutDefaults::default().spec("web", "blue", "blue");
        assert_eq!(
            problems(&spec),
            ["to = \"blue\" is the stable version (from): the target must be another version"]
        );
    }

    #[test]
    fn target_without_active_backend_is_refused() {
        let mut svc = service();
        for b in &mut svc.versions[1].backends {
            b.state = BackendState::Drain;
        }
        let spec = RolloutDefaults::default().spec("web", "blue", "green");
        assert_eq!(
            spec.validate(&svc),
            Err(vec![
                "to = \"green\": the target version has no active backend to send flows to"
                    .to_string()
            ])
        );
    }

    #[test]
    fn canary_schedules_are_checked() {
        assert_eq!(
            problems(&canary(&[])),
            ["strategy.steps is empty: a canary needs at least one step, and the last at 100%"]
        );
        let p = Pause::For(1);
        assert_eq!(
            problems(&canary(&[(50, p), (20, p), (100, p)])),
            [
                "strategy.steps[1].weight_percent = 20 is below the previous step's 50: steps must not go down"
            ]
        );
        assert_eq!(
            problems(&canary(&[(10, p), (50, p)])),
            [
                "strategy.steps[1].weight_percent = 50: the last step must be 100 (the whole share to the target)"
            ]
        );
        assert_eq!(
            problems(&canary(&[(10, p), (150, p)])),
            [
                "strategy.steps[1].weight_percent = 150 is above 100",
                "strategy.steps[1].weight_percent = 150: the last step must be 100 (the whole share to the target)"
            ]
        );
        // Equal steps are allowed (a second pause at the same share).
        assert_eq!(
            problems(&canary(&[
                (0, p),
                (50, p),
                (50, Pause::UntilPromoted),
                (100, p)
            ])),
            Vec::<String>::new()
        );
    }

    #[test]
    fn rolling_is_checked() {
        let rolling = |batch_size, to: &str| RolloutSpec {
            strategy: Strategy::Rolling {
                batch_size,
                drain_deadline_ms: 1000,
                hook: Some(vec![" ".into()]),
                hook_timeout_ms: 0,
                rise: 0,
                slow_start_ms: 0,
            },
            ..RolloutDefaults::default().spec("web", "blue", to)
        };
        assert_eq!(
            problems(&rolling(0, "green")),
            [
                "to = \"green\", from = \"blue\": a rolling update stays inside one version, so to must equal from (use canary or blue_green to move between versions)",
                "strategy.batch_size = 0: a batch needs at least one backend",
                "strategy.rise = 0: a redeployed backend needs at least one passed health check",
                "strategy.hook has an empty program name (argv[0])",
                "strategy.hook_timeout_ms = 0: the hook needs time to run",
            ]
        );
        let p = problems(&rolling(3, "blue"));
        assert_eq!(
            p[0],
            "strategy.batch_size = 3 would drain all 3 active backends of version \"blue\" at once: at least one must keep serving"
        );
        let mut svc = service();
        svc.health = None;
        let mut ok = rolling(1, "blue");
        ok.strategy = Strategy::Rolling {
            batch_size: 1,
            drain_deadline_ms: 0,
            hook: None,
            hook_timeout_ms: 1,
            rise: 1,
            slow_start_ms: 0,
        };
        assert_eq!(ok.validate(&service()), Ok(()));
        assert_eq!(
            ok.validate(&svc),
            Err(vec!["strategy.kind = \"rolling\" needs health checks ([service.health] of \"web\") so that a redeployed backend is checked before it takes new flows".to_string()])
        );
    }

    #[test]
    fn analysis_and_hooks_are_checked() {
        let mut spec = RolloutDefaults::default().spec("web", "blue", "green");
        spec.analysis.interval_ms = 10;
        spec.analysis.failure_limit = 0;
        spec.analysis.inconclusive_limit = 0;
        spec.analysis.criteria.max_error_rate = Some(2.0);
        spec.hooks.push(Hook {
            event: HookEvent::Started,
            argv: vec![],
            timeout_ms: 0,
        });
        assert_eq!(
            problems(&spec),
            [
                "analysis.interval_ms = 10 is below the shortest interval 1000",
                "analysis.failure_limit = 0: it must be at least 1 (1: the first failure rolls back)",
                "analysis.inconclusive_limit = 0: it must be at least 1 (that many inconclusive verdicts in a row pause the rollout)",
                "analysis.criteria: max_error_rate = 2 is not a rate between 0 and 1",
                "hooks[0].argv is empty: it needs at least the program to run",
                "hooks[0].timeout_ms = 0: the hook needs time to run",
            ]
        );
    }

    #[test]
    fn defaults_parse_validate_and_make_specs() {
        let d: RolloutDefaults = toml::from_str("").unwrap();
        assert_eq!(d, RolloutDefaults::default());
        assert_eq!(d.validate(), Ok(()));
        let bad: RolloutDefaults =
            toml::from_str("[strategy]\nkind = \"canary\"\nsteps = [{ weight_percent = 50 }]\n")
                .unwrap();
        assert_eq!(
            bad.validate(),
            Err(vec!["strategy.steps[0].weight_percent = 50: the last step must be 100 (the whole share to the target)".to_string()])
        );
        assert!(toml::from_str::<RolloutDefaults>("[strategy]\nkind = \"linear\"\n").is_err());
    }
}
