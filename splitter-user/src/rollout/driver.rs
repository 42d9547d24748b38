//! The rollout driver: what the pure machine decides, done. It owns time
//! (`CLOCK_MONOTONIC` ms, which a restarted daemon shares with the one
//! before it), feeds the machine ticks, analysis verdicts from the
//! signals, backend events and operator commands, and carries out its
//! actions through the controller: weights through the same edit as
//! `splitter weights set`, backend states through the same edit as
//! `splitter backend set`, preview addresses and slow-start ramps as
//! overlays of what is published ([`crate::effective`]). Hooks run outside
//! the controller's lock. Every rollout is saved with the running state
//! after each change and resumed at its step by the next daemon.
//!
//! A rollback is immediate: the machine's first action on a failed
//! analysis or an abort is "stable 100%", carried out under the same lock
//! that took the verdict, before anything else.
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddrV4,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use crate::rollout::book::{Book, MAX_SAMPLES, MAX_TIMELINE, Sample, Schedule, supersede};
use crate::{
    config::BackendState,
    controller::{Controller, ControllerError, Shared},
    dataplane::monotonic_ns,
    edit::{self, BackendPatch},
    report::{RolloutReport, VerdictLine, VersionLine},
    rollout::{
        machine::{Action, AnalysisScope, Command, Event, HookPurpose, HookRun, Phase, Rollout},
        spec::{Pause, RolloutSpec, Step, Strategy},
    },
    shutdown::Shutdown,
    signals::analysis::{self, MetricInput},
};

/// How often the driver ticks its rollouts.
pub const TICK: Duration = Duration::from_millis(200);
/// `POST /v1/rollouts`: start a rollout of `service` to version `to`,
/// from the service's `[service.rollout]` defaults with what is named
/// here overridden.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The service.
    pub service: String,
    /// The target version (rolling: the version whose backends are
    /// redeployed).
    pub to: String,
    /// `canary`, `blue-green` or `rolling` (default: the service's).
    #[serde(default)]
    pub strategy: Option<String>,
    /// The version it starts from (default: the one with the largest
    /// weight other than `to`; rolling: `to`).
    #[serde(default)]
    pub from: Option<String>,
    /// Canary steps in percent (`5,10,25,50,100`).
    #[serde(default)]
    pub steps: Option<Vec<u32>>,
    /// Canary: put a "targets only" step before the steps (the CLI's
    /// `--steps targets,5,...`).
    #[serde(default)]
    pub targets_step: Option<bool>,
    /// Client networks the targets step sends to the target version
    /// (`["10.0.1.96/28"]`; default: `[service.rollout] targets`).
    #[serde(default)]
    pub targets: Option<Vec<String>>,
    /// How long each canary step lasts, ms (0: until promoted).
    #[serde(default)]
    pub step_ms: Option<u64>,
    /// Time between verdicts, ms.
    #[serde(default)]
    pub analysis_interval_ms: Option<u64>,
    /// `false`: no analysis (steps advance on time alone).
    #[serde(default)]
    pub analysis: Option<bool>,
    /// Fewest new flows a window needs for a verdict.
    #[serde(default)]
    pub min_attempts: Option<u64>,
    /// The highest error rate that passes, 0..=1.
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// Blue-green: the preview address.
    #[serde(default)]
    pub preview: Option<SocketAddrV4>,
    /// Blue-green: the post-switch analysis window, ms.
    #[serde(default)]
    pub post_switch_ms: Option<u64>,
    /// Rolling: backends per batch.
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// Rolling: the deploy hook (argv).
    #[serde(default)]
    pub hook: Option<Vec<String>>,
}

fn invalid(e: impl std::fmt::Display) -> ControllerError {
    ControllerError::Invalid(e.to_string())
}

/// Builds the spec a start request asks for, against the running config.
///
/// # Errors
/// An unknown service or version, a bad override, a spec that does not
/// validate (every problem named).
pub fn spec_for(c: &Controller, req: &StartRequest) -> Result<RolloutSpec, ControllerError> {
    let svc = c
        .config()
        .service(&req.service)
        .ok_or_else(|| ControllerError::NotFound(format!("no service named {:?}", req.service)))?;
    let defaults = svc.rollout.clone().unwrap_or_default();
    let mut strategy = match req.strategy.as_deref() {
        None => defaults.strategy.clone(),
        Some("canary") => match &defaults.strategy {
            s @ Strategy::Canary { .. } => s.clone(),
            _ => Strategy::default(),
        },
        Some("blue-green") => match &defaults.strategy {
            s @ Strategy::BlueGreen { .. } => s.clone(),
            _ => serde_json::from_str(r#"{"kind": "blue_green"}"#).map_err(invalid)?,
        },
        Some("rolling") => match &defaults.strategy {
            s @ Strategy::Rolling { .. } => s.clone(),
            _ => serde_json::from_str(r#"{"kind": "rolling"}"#).map_err(invalid)?,
        },
        Some(other) => {
            return Err(invalid(format!(
                "strategy {other:?} is not one of canary, blue-green, rolling"
            )));
        }
    };
    match &mut strategy {
        Strategy::Canary { steps } => {
            if let Some(percents) = &req.steps {
                let pause = steps.first().map(|s| s.pause).unwrap_or_default();
                *steps = percents
                    .iter()
                    .map(|&weight_percent| Step {
                        weight_percent,
                        pause,
                        targets: false,
                    })
                    .collect();
            }
            if req.targets_step == Some(true) && !steps.first().is_some_and(|s| s.targets) {
                let pause = steps.first().map(|s| s.pause).unwrap_or_default();
                steps.insert(
                    0,
                    Step {
                        weight_percent: 0,
                        pause,
                        targets: true,
                    },
                );
            }
            if let Some(ms) = req.step_ms {
                for s in steps.iter_mut() {
                    s.pause = if ms == 0 {
                        Pause::UntilPromoted
                    } else {
                        Pause::For(ms)
                    };
                }
            }
        }
        Strategy::BlueGreen {
            preview,
            post_switch_analysis_ms,
            ..
        } => {
            if req.preview.is_some() {
                *preview = req.preview;
            }
            if let Some(ms) = req.post_switch_ms {
                *post_switch_analysis_ms = ms;
            }
        }
        Strategy::Rolling {
            batch_size, hook, ..
        } => {
            if let Some(n) = req.batch_size {
                *batch_size = n;
            }
            if req.hook.is_some() {
                hook.clone_from(&req.hook);
            }
        }
    }
    let rolling = matches!(strategy, Strategy::Rolling { .. });
    let from = match (&req.from, rolling) {
        (Some(f), _) => f.clone(),
        (None, true) => req.to.clone(),
        (None, false) => svc
            .versions
            .iter()
            .filter(|v| v.name != req.to)
            .max_by_key(|v| v.weight)
            .map(|v| v.name.clone())
            .ok_or_else(|| {
                invalid(format!(
                    "service {} has no version besides {:?} to start from",
                    req.service, req.to
                ))
            })?,
    };
    let mut spec = defaults.spec(&req.service, &from, &req.to);
    spec.strategy = strategy;
    if let Some(list) = &req.targets {
        spec.targets = list
            .iter()
            .map(|c| {
                c.parse()
                    .map_err(|e: String| invalid(format!("targets: {e}")))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(ms) = req.analysis_interval_ms {
        spec.analysis.interval_ms = ms;
    }
    if let Some(on) = req.analysis {
        spec.analysis.enabled = on;
    }
    if let Some(n) = req.min_attempts {
        spec.analysis.criteria.min_attempts = n;
    }
    if let Some(r) = req.max_error_rate {
        spec.analysis.criteria.max_error_rate = Some(r);
    }
    // The external metric's bounds come from [service.analysis] unless
    // the rollout's criteria set their own.
    if let Some(a) = &svc.analysis {
        let k = &mut spec.analysis.criteria;
        if k.metric_min.is_none() && k.metric_max.is_none() {
            k.metric_min = a.min;
            k.metric_max = a.max;
        }
    }
    spec.validate(svc).map_err(|p| {
        invalid(format!(
            "the rollout of {} is not valid: {}",
            req.service,
            p.join("; ")
        ))
    })?;
    if let Strategy::BlueGreen {
        preview: Some(vip), ..
    } = &spec.strategy
        && let Some(other) = c.config().services.iter().find(|s| s.vip == *vip)
    {
        return Err(invalid(format!(
            "the preview address {vip} is service {}'s VIP: pick a free address",
            other.name
        )));
    }
    Ok(spec)
}

impl Controller {
    /// Starts a rollout. Refused while the service has one running.
    ///
    /// # Errors
    /// As [`spec_for`]; a rollout already running for the service.
    pub fn rollout_start(
        &mut self,
        req: &StartRequest,
        now_ms: u64,
    ) -> Result<(RolloutReport, Vec<HookRun>), ControllerError> {
        if let Some(b) = self.rollouts.get(&req.service)
            && !b.rollout.phase.is_finished()
            && b.rollout.phase != Phase::Pending
        {
            return Err(invalid(format!(
                "service {} has a rollout in progress ({} -> {}); watch it with `splitter rollout status {0}`, end it with `splitter rollout abort {0}`",
                req.service, b.rollout.spec.from, b.rollout.spec.to
            )));
        }
        let spec = spec_for(self, req)?;
        let svc = self
            .config()
            .service(&req.service)
            .ok_or_else(|| ControllerError::NotFound(req.service.clone()))?;
        let rollout = Rollout::new(spec, svc, now_ms).map_err(|p| invalid(p.join("; ")))?;
        self.rollouts.insert(
            req.service.clone(),
            Book {
                rollout,
                timeline: VecDeque::new(),
                analysis: None,
                samples: VecDeque::new(),
                file_weights: self.file_weights(&req.service),
            },
        );
        let hooks = self.rollout_event(&req.service, Event::Start { at_ms: now_ms })?;
        info!(service = %req.service, to = %req.to, "rollout started");
        Ok((self.rollout_report(&req.service, now_ms)?, hooks))
    }

    /// An operator's command to the rollout of `service`.
    ///
    /// # Errors
    /// No rollout for the service; a command its state does not allow (the
    /// message says what it is in and what is allowed).
    pub fn rollout_command(
        &mut self,
        service: &str,
        command: Command,
        now_ms: u64,
    ) -> Result<(RolloutReport, Vec<HookRun>), ControllerError> {
        let hooks = self.rollout_event(
            service,
            Event::Command {
                at_ms: now_ms,
                command,
            },
        )?;
        Ok((self.rollout_report(service, now_ms)?, hooks))
    }

    /// Feeds one event to the rollout of `service` and carries out the
    /// actions; returns the hooks to run (outside the lock). Saves the
    /// state.
    ///
    /// # Errors
    /// No rollout for the service, or the event refused (nothing changed).
    pub fn rollout_event(
        &mut self,
        service: &str,
        event: Event,
    ) -> Result<Vec<HookRun>, ControllerError> {
        let book = self
            .rollouts
            .get_mut(service)
            .ok_or_else(|| no_rollout(service))?;
        let actions = book.rollout.apply(event).map_err(invalid)?;
        let hooks = self.carry_out(service, actions);
        if let Err(e) = self.persist() {
            warn!(error = %e, "could not save the rollout's state");
        }
        Ok(hooks)
    }

    /// Does what the machine asked, in order. A weight change the kernel
    /// refuses is logged and retried at the next tick's `Restored`-style
    /// republish; it never stops the list (a rollback's later actions
    /// still run).
    fn carry_out(&mut self, service: &str, actions: Vec<Action>) -> Vec<HookRun> {
        let mut hooks = Vec::new();
        for action in actions {
            let r = match action {
                Action::SetWeights {
                    stable,
                    stable_percent,
                    target,
                    target_percent,
                } => {
                    self.rollout_weights(service, &stable, stable_percent, &target, target_percent)
                }
                Action::SetTargets { version, cidrs } => self
                    .edit_by_rollout(|c| edit::set_rollout_targets(c, service, &version, &cidrs))
                    .map(|_| ()),
                Action::ClearTargets { cidrs } => self
                    .edit_by_rollout(|c| edit::clear_rollout_targets(c, service, &cidrs))
                    .map(|_| ()),
                Action::SetPreview { vip, version } => {
                    self.overlay_mut()
                        .previews
                        .insert(service.to_string(), (vip, version));
                    self.republish("preview address")
                }
                Action::ClearPreview { .. } => {
                    self.overlay_mut().previews.remove(service);
                    self.republish("preview address removed")
                }
                Action::SetStable { version, previous } => {
                    info!(service, stable = %version, previous = %previous, "rollout: new stable version");
                    Ok(())
                }
                Action::ReleaseOld { version } => {
                    info!(service, version = %version, "rollout: the old version is no longer kept for undo");
                    Ok(())
                }
                Action::SetBackendState { backend, state } => {
                    self.rollout_backend_state(service, backend, state)
                }
                Action::SetBackendWeight { backend, percent } => {
                    if percent >= 100 {
                        self.overlay_mut()
                            .weight_percent
                            .remove(&(service.to_string(), backend));
                    } else {
                        self.overlay_mut()
                            .weight_percent
                            .insert((service.to_string(), backend), percent.max(1));
                    }
                    self.republish("slow start")
                }
                Action::RunHook(h) => {
                    hooks.push(h);
                    Ok(())
                }
                Action::StartAnalysis { scope, interval_ms } => {
                    if let Some(b) = self.rollouts.get_mut(service) {
                        let now = b.rollout.updated_at_ms;
                        b.analysis = Some(Schedule {
                            scope,
                            interval_ms,
                            next_ms: now + interval_ms,
                        });
                    }
                    Ok(())
                }
                Action::StopAnalysis => {
                    if let Some(b) = self.rollouts.get_mut(service) {
                        b.analysis = None;
                    }
                    Ok(())
                }
                Action::Record(entry) => {
                    info!(service, step = entry.step, kind = ?entry.kind, "rollout: {}", entry.detail);
                    if let Some(b) = self.rollouts.get_mut(service) {
                        b.timeline.push_back(entry);
                        while b.timeline.len() > MAX_TIMELINE {
                            b.timeline.pop_front();
                        }
                    }
                    Ok(())
                }
                Action::Done { outcome } => {
                    info!(service, ?outcome, "rollout finished");
                    let name = serde_json::to_value(outcome)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_else(|| format!("{outcome:?}"));
                    *self
                        .rollouts_ended
                        .entry((service.to_string(), name))
                        .or_insert(0) += 1;
                    Ok(())
                }
            };
            if let Err(e) = r {
                warn!(service, error = %e, "rollout: an action failed");
            }
        }
        hooks
    }

    /// Sets the two versions' weights (percent) and every other version of
    /// the service to 0, through the same edit as `splitter weights set`.
    fn rollout_weights(
        &mut self,
        service: &str,
        stable: &str,
        stable_percent: u32,
        target: &str,
        target_percent: u32,
    ) -> Result<(), ControllerError> {
        let svc = self
            .config()
            .service(service)
            .ok_or_else(|| ControllerError::NotFound(service.to_string()))?;
        let weights: BTreeMap<String, u32> = svc
            .versions
            .iter()
            .map(|v| {
                let w = if v.name == target {
                    target_percent
                } else if v.name == stable {
                    stable_percent
                } else {
                    0
                };
                (v.name.clone(), w)
            })
            .collect();
        self.set_weights_by(service, &weights, true).map(|_| ())
    }

    fn rollout_backend_state(
        &mut self,
        service: &str,
        backend: SocketAddrV4,
        state: BackendState,
    ) -> Result<(), ControllerError> {
        let patch = BackendPatch {
            weight: None,
            state: Some(state.to_string()),
        };
        self.edit_by_rollout(|c| edit::set_backend(c, service, backend, &patch))
            .map(|_| ())
    }

    /// What `GET /v1/rollouts/{service}` answers.
    ///
    /// # Errors
    /// No rollout for the service.
    pub fn rollout_report(
        &self,
        service: &str,
        now_ms: u64,
    ) -> Result<RolloutReport, ControllerError> {
        let b = self
            .rollouts
            .get(service)
            .ok_or_else(|| no_rollout(service))?;
        let r = &b.rollout;
        let spec = &r.spec;
        let weights = self
            .config()
            .service(service)
            .map(|s| {
                s.versions
                    .iter()
                    .map(|v| (v.name.clone(), v.weight))
                    .collect()
            })
            .unwrap_or_default();
        let (state, reason) = match &r.phase {
            Phase::Pending | Phase::Progressing | Phase::WaitingForPromotion => ("running", None),
            Phase::Paused { reason, .. } => ("paused", Some(reason.clone())),
            Phase::Completed { .. } => ("completed", None),
            Phase::RolledBack { reason, .. } => ("rolled-back", Some(reason.clone())),
            Phase::Aborted { reason, .. } => ("aborted", Some(reason.clone())),
        };
        let steps = match &spec.strategy {
            Strategy::Canary { steps } => steps.len(),
            Strategy::BlueGreen { .. } => 2,
            Strategy::Rolling { .. } => r.rolling.as_ref().map_or(0, |p| p.batches.len()),
        };
        let started = r.started_at_ms.unwrap_or(r.created_at_ms);
        let interval = spec.analysis.interval_ms;
        // One line per version: a rolling update moves within one.
        let mut versions = vec![&spec.from];
        if spec.to != spec.from {
            versions.push(&spec.to);
        }
        let signals = versions
            .into_iter()
            .map(|v| {
                let w = self.version_window(service, v, analysis_window_ms(interval));
                VersionLine {
                    version: v.clone(),
                    new_flows_per_sec: w.as_ref().map_or(0.0, |w| w.attempts_per_sec),
                    error_rate: w.as_ref().and_then(|w| w.error_rate),
                    latency_p99_ms: w.as_ref().and_then(|w| w.latency_p99_ms),
                }
            })
            .collect();
        Ok(RolloutReport {
            service: service.to_string(),
            from: spec.from.clone(),
            to: spec.to.clone(),
            strategy: match spec.strategy {
                Strategy::Canary { .. } => "canary",
                Strategy::BlueGreen { .. } => "blue-green",
                Strategy::Rolling { .. } => "rolling",
            }
            .into(),
            state: state.into(),
            phase: r.describe(now_ms),
            step: if matches!(r.phase, Phase::Pending) {
                0
            } else {
                (r.step + 1).min(steps.max(1))
            },
            steps,
            target_percent: r.weights.target_percent,
            weights,
            waiting_for: waiting_for(b, now_ms),
            step_elapsed_secs: now_ms.saturating_sub(r.step_started_at_ms) as f64 / 1000.0,
            reason,
            verdicts: r
                .verdicts
                .iter()
                .map(|v| VerdictLine {
                    at_secs: v.at_ms.saturating_sub(started) as f64 / 1000.0,
                    step: v.step + 1,
                    verdict: v.verdict.name().into(),
                    reason: match &v.verdict {
                        analysis::Verdict::Pass => None,
                        analysis::Verdict::Fail { reason, .. }
                        | analysis::Verdict::Inconclusive { reason } => Some(reason.clone()),
                    },
                })
                .collect(),
            signals,
            allowed: r
                .allowed_commands(now_ms)
                .iter()
                .map(|c| c.name().to_string())
                .collect(),
            // The service's report only when it mirrors (it reads every
            // backend's counters).
            shadow: self
                .config()
                .service(service)
                .is_some_and(|s| s.shadow.is_some())
                .then(|| self.report_of(service).ok().and_then(|s| s.shadow))
                .flatten(),
        })
    }

    /// Every rollout the daemon knows, running or finished.
    pub fn rollout_list(&self, now_ms: u64) -> Vec<RolloutReport> {
        self.rollouts
            .keys()
            .filter_map(|s| self.rollout_report(s, now_ms).ok())
            .collect()
    }

    /// The timeline of a service's rollout.
    ///
    /// # Errors
    /// No rollout for the service.
    pub fn rollout_book(&self, service: &str) -> Result<&Book, ControllerError> {
        self.rollouts
            .get(service)
            .ok_or_else(|| no_rollout(service))
    }

    /// One driver tick at `now_ms`: time for every running rollout, and
    /// the verdicts that are due. Returns the hooks to run.
    pub fn rollout_tick(&mut self, now_ms: u64) -> Vec<HookRun> {
        let mut hooks = Vec::new();
        let services: Vec<String> = self
            .rollouts
            .iter()
            .filter(|(_, b)| {
                !matches!(b.rollout.phase, Phase::Pending) && !b.rollout.phase.is_finished()
                    || matches!(
                        b.rollout.phase,
                        Phase::Completed {
                            undo_until_ms: Some(_)
                        }
                    )
            })
            .map(|(s, _)| s.clone())
            .collect();
        for service in services {
            if let Some(verdict) = self.due_verdict(&service, now_ms) {
                match self.rollout_event(
                    &service,
                    Event::Analysis {
                        at_ms: now_ms,
                        verdict,
                    },
                ) {
                    Ok(h) => hooks.extend(h),
                    Err(e) => warn!(service, error = %e, "rollout: analysis refused"),
                }
            }
            match self.rollout_event(&service, Event::Tick { now_ms }) {
                Ok(h) => hooks.extend(h),
                Err(e) => warn!(service, error = %e, "rollout: tick refused"),
            }
        }
        hooks
    }

    /// The verdict of the analysis of `service`'s rollout if one is due at
    /// `now_ms` (and the schedule moved on), from the signal history and
    /// the external metric's last readings.
    fn due_verdict(&mut self, service: &str, now_ms: u64) -> Option<analysis::Verdict> {
        let book = self.rollouts.get(service)?;
        let sched = book.analysis.clone()?;
        if now_ms < sched.next_ms {
            return None;
        }
        let criteria = book.rollout.spec.analysis.criteria.clone();
        let target_percent = book.rollout.weights.target_percent;
        // The history holds one sample a second: a window one sample
        // longer than the interval always covers the whole interval.
        let window_ms = analysis_window_ms(sched.interval_ms);
        let (canary, baseline, metric) = match &sched.scope {
            AnalysisScope::Versions { canary, baseline } => (
                self.version_window(service, canary, window_ms),
                self.version_window(service, baseline, window_ms),
                MetricInput::from_readings(
                    self.metric_of(service, canary).as_ref(),
                    self.metric_of(service, baseline).as_ref(),
                ),
            ),
            AnalysisScope::Backends {
                version,
                canary,
                baseline,
            } => (
                self.backends_window(service, version, canary, window_ms),
                self.backends_window(service, version, baseline, window_ms),
                MetricInput::default(),
            ),
        };
        let canary = canary.unwrap_or_default();
        let verdict = analysis::analyse(&canary, baseline.as_ref(), &metric, &criteria);
        if let Some(b) = self.rollouts.get_mut(service) {
            if let Some(s) = b.analysis.as_mut() {
                s.next_ms = now_ms + s.interval_ms;
            }
            b.samples.push_back(Sample {
                at_ms: now_ms,
                target_percent,
                canary,
                baseline,
                verdict: verdict.name().into(),
            });
            while b.samples.len() > MAX_SAMPLES {
                b.samples.pop_front();
            }
        }
        Some(verdict)
    }

    /// Sends `Restored` to every rollout loaded from the state file, so
    /// each puts its step back in place. Returns the hooks to run.
    pub fn rollouts_restored(&mut self, now_ms: u64) -> Vec<HookRun> {
        let services: Vec<String> = self.rollouts.keys().cloned().collect();
        let mut hooks = Vec::new();
        for s in services {
            match self.rollout_event(&s, Event::Restored { at_ms: now_ms }) {
                Ok(h) => hooks.extend(h),
                Err(e) => warn!(service = %s, error = %e, "rollout: could not resume"),
            }
        }
        hooks
    }

    /// Events a rolling update waits for: the live flows of its draining
    /// backends (from a walker's count taken after the drain began) and, once a second, each
    /// waiting backend's health as the checks see it. Returns the hooks to
    /// run.
    pub(crate) fn rolling_inputs(&mut self, now_ms: u64) -> Vec<HookRun> {
        use crate::rollout::machine::BatchStage;
        let mut events = Vec::new();
        for (service, b) in &self.rollouts {
            let r = &b.rollout;
            let Some(p) = r
                .rolling
                .as_ref()
                .filter(|_| matches!(r.phase, Phase::Progressing))
            else {
                continue;
            };
            match p.stage {
                BatchStage::Draining => {
                    // Only a count taken after the drain began: an older
                    // one may predate the batch's last new flows.
                    let since_ns = p.stage_started_at_ms.saturating_mul(1_000_000);
                    let Some(counts) = self.live_flows_since(since_ns) else {
                        continue;
                    };
                    for m in &p.members {
                        if let Ok(live) = self.backend_live_flows(&counts, service, m.backend) {
                            events.push((
                                service.clone(),
                                Event::Drained {
                                    at_ms: now_ms,
                                    backend: m.backend,
                                    live_flows: live,
                                },
                            ));
                        }
                    }
                }
                BatchStage::WaitingForHealth if now_ms / 1000 != r.updated_at_ms / 1000 => {
                    for m in p.members.iter().filter(|m| m.hook_ok != Some(false)) {
                        events.push((
                            service.clone(),
                            Event::Health {
                                at_ms: now_ms,
                                backend: m.backend,
                                up: self.backend_up(service, m.backend),
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
        let mut hooks = Vec::new();
        for (service, e) in events {
            match self.rollout_event(&service, e) {
                Ok(h) => hooks.extend(h),
                Err(e) => warn!(service, error = %e, "rollout: backend event refused"),
            }
        }
        hooks
    }
}

/// The signal window an analysis of `interval_ms` judges: the interval and
/// one more second of history (samples are a second apart), at most the
/// history's length.
pub fn analysis_window_ms(interval_ms: u64) -> u64 {
    (interval_ms + 1000).clamp(2000, crate::signals::HISTORY_SECS * 1000)
}

fn no_rollout(service: &str) -> ControllerError {
    ControllerError::NotFound(format!(
        "no rollout of {service:?}: start one with `splitter rollout start {service} --to VERSION`"
    ))
}

/// What a rollout waits for, in words.
fn waiting_for(b: &Book, now_ms: u64) -> String {
    let r = &b.rollout;
    let analysis = if b.analysis.is_some() {
        " and a passing analysis"
    } else {
        ""
    };
    match &r.phase {
        Phase::Pending => "start".into(),
        Phase::Paused { .. } => "`splitter rollout resume` (or promote, abort)".into(),
        Phase::WaitingForPromotion => "`splitter rollout promote`".into(),
        Phase::Completed {
            undo_until_ms: Some(until),
        } => format!(
            "nothing (undo possible for {}s more)",
            until.saturating_sub(now_ms) / 1000
        ),
        Phase::Completed { .. } | Phase::RolledBack { .. } | Phase::Aborted { .. } => {
            "nothing".into()
        }
        Phase::Progressing => match &r.spec.strategy {
            Strategy::Canary { steps } => match steps.get(r.step).map(|s| s.pause) {
                Some(Pause::For(ms)) => {
                    let left = (r.step_started_at_ms + ms).saturating_sub(now_ms) / 1000;
                    format!("the step's pause ({left}s left){analysis}")
                }
                _ => format!("the step's end{analysis}"),
            },
            Strategy::BlueGreen { .. } => format!("the switch's analysis window{analysis}"),
            Strategy::Rolling { .. } => match &r.rolling {
                Some(p) => format!("batch {} to be {:?}", r.step + 1, p.stage),
                None => "the batch".into(),
            },
        },
    }
}

/// The daemon's rollout task: ticks every rollout every [`TICK`], runs the
/// hooks outside the lock (a deploy hook's end goes back to its rollout),
/// and feeds rolling updates their drain counts and health checks. Stops
/// at a tick boundary when `shutdown` fires.
pub async fn run(controller: Shared, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let now = || monotonic_ns() / 1_000_000;
    let restored = match controller.lock() {
        Ok(mut c) => c.rollouts_restored(now()),
        Err(_) => return,
    };
    spawn_hooks(&controller, restored);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let hooks = match controller.lock() {
            Ok(mut c) => {
                let mut h = c.rolling_inputs(now());
                h.extend(c.rollout_tick(now()));
                h
            }
            Err(_) => return,
        };
        spawn_hooks(&controller, hooks);
    }
}

/// Runs hooks on tasks of their own; a deploy hook's end is fed back.
pub fn spawn_hooks(controller: &Shared, hooks: Vec<HookRun>) {
    for h in hooks {
        let c = Arc::clone(controller);
        tokio::spawn(async move {
            let out = crate::hook::run(&h.argv, &h.env, Duration::from_millis(h.timeout_ms)).await;
            if let HookPurpose::Deploy { backend } = h.purpose {
                let service = h.env.get("SPLITTER_SERVICE").cloned().unwrap_or_default();
                let detail = match &out.error {
                    None => "exit status 0".to_string(),
                    Some(e) => e.clone(),
                };
                let event = Event::HookFinished {
                    at_ms: monotonic_ns() / 1_000_000,
                    backend,
                    ok: out.ok,
                    detail,
                };
                let more = match c.lock() {
                    Ok(mut g) => g.rollout_event(&service, event),
                    Err(_) => return,
                };
                match more {
                    Ok(more) => spawn_hooks(&c, more),
                    Err(e) => warn!(service, error = %e, "rollout: deploy hook result refused"),
                }
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        kernel::{DataplaneOps as _, FakeDataplane},
        signals::Window,
    };

    const TEXT: &str = r#"
[dataplane]
interface = "eth0"

[[service]]
name = "web"
vip = "10.0.0.10:80"

[[service.version]]
name = "blue"
weight = 100
backends = ["10.0.2.2:8080"]

[[service.version]]
name = "green"
weight = 0
backends = ["10.0.2.3:8080"]

[[service]]
name = "api"
vip = "10.0.0.11:80"

[[service.version]]
name = "v1"
weight = 1
backends = ["10.0.2.9:8080"]
"#;

    fn weights(c: &Config, service: &str) -> Vec<u32> {
        c.service(service)
            .unwrap()
            .versions
            .iter()
            .map(|v| v.weight)
            .collect()
    }

    /// A controller whose canary web blue -> green completed (promoted in
    /// full), with the file's weights recorded at its start.
    fn completed() -> Controller {
        let config = Config::parse(TEXT).unwrap();
        let mut fake = FakeDataplane::default();
        fake.apply(&config).unwrap();
        let mut c = Controller::new(config, fake, None);
        let req = StartRequest {
            service: "web".into(),
            to: "green".into(),
            ..StartRequest::default()
        };
        c.rollout_start(&req, 1_000).unwrap();
        c.rollout_command("web", Command::PromoteFull, 2_000)
            .unwrap();
        assert_eq!(c.rollout_report("web", 2_000).unwrap().state, "completed");
        c
    }

    #[test]
    fn an_unrelated_edit_of_the_file_keeps_what_the_rollout_did() {
        let c = completed();
        assert_eq!(weights(c.config(), "web"), [0, 100]);
        // The file as it was, with an unrelated change to another service.
        let mut next = Config::parse(&TEXT.replace("weight = 1\n", "weight = 3\n")).unwrap();
        let said = supersede(&mut next, &c.rollouts, c.config());
        assert_eq!(weights(&next, "web"), [0, 100], "{said:?}");
        assert_eq!(weights(&next, "api"), [3]);
        assert!(said[0].contains("kept the weights of web"), "{said:?}");
    }

    #[test]
    fn editing_the_services_weights_in_the_file_takes_them_back() {
        let c = completed();
        let mut next = Config::parse(&TEXT.replace(
            "weight = 100\nbackends = [\"10.0.2.2:8080\"]",
            "weight = 50\nbackends = [\"10.0.2.2:8080\"]",
        ))
        .unwrap();
        let said = supersede(&mut next, &c.rollouts, c.config());
        assert_eq!(weights(&next, "web"), [50, 0]);
        assert!(
            said[0].contains("replace those the rollout set"),
            "{said:?}"
        );
    }

    #[test]
    fn a_running_rollout_refuses_conflicting_edits_and_names_itself() {
        let config = Config::parse(TEXT).unwrap();
        let mut fake = FakeDataplane::default();
        fake.apply(&config).unwrap();
        let mut c = Controller::new(config, fake.clone(), None);
        let req = StartRequest {
            service: "web".into(),
            to: "green".into(),
            ..StartRequest::default()
        };
        let (report, _) = c.rollout_start(&req, 1_000).unwrap();
        assert_eq!(report.target_percent, 5);
        assert_eq!(weights(&fake.last().unwrap(), "web"), [95, 5]);
        let w = BTreeMap::from([("blue".to_string(), 0), ("green".to_string(), 100)]);
        let e = c.set_weights("web", &w).unwrap_err().to_string();
        assert!(e.contains("rollout in progress (blue -> green"), "{e}");
        assert!(e.contains("splitter rollout abort web"), "{e}");
        // Another service is not concerned.
        let w = BTreeMap::from([("v1".to_string(), 2)]);
        c.set_weights("api", &w).unwrap();
        // A second start is refused while it runs.
        let e = c.rollout_start(&req, 1_500).unwrap_err().to_string();
        assert!(e.contains("has a rollout in progress"), "{e}");
        // Abort: stable at 100% at once.
        c.rollout_command("web", Command::Abort, 2_000).unwrap();
        assert_eq!(weights(&fake.last().unwrap(), "web"), [100, 0]);
    }

    #[test]
    fn a_failed_verdict_rolls_back_first_thing() {
        let config = Config::parse(TEXT).unwrap();
        let mut fake = FakeDataplane::default();
        fake.apply(&config).unwrap();
        let mut c = Controller::new(config, fake.clone(), None);
        let req = StartRequest {
            service: "web".into(),
            to: "green".into(),
            steps: Some(vec![50, 100]),
            ..StartRequest::default()
        };
        c.rollout_start(&req, 1_000).unwrap();
        let published = fake.with(|s| s.published.len());
        let bad = Window {
            attempts: 50,
            refused: 50,
            error_rate: Some(1.0),
            seconds: 10.0,
            ..Window::default()
        };
        let verdict = analysis::analyse(
            &bad,
            None,
            &MetricInput::default(),
            &analysis::Criteria::default(),
        );
        c.rollout_event(
            "web",
            Event::Analysis {
                at_ms: 2_000,
                verdict,
            },
        )
        .unwrap();
        // The very next publish is the rollback.
        let next = fake.with(|s| s.published[published].clone());
        assert_eq!(weights(&next, "web"), [100, 0]);
        let r = c.rollout_report("web", 2_000).unwrap();
        assert_eq!(r.state, "rolled-back");
        assert!(r.reason.unwrap().contains("error rate"));
    }
}
