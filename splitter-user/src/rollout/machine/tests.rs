//! The machine's tests: every legal transition, every refusal, the rules
//! of the module's doc, and properties over random event sequences.
#![allow(clippy::unwrap_used)]

use proptest::prelude::{ProptestConfig, any, prop, prop_assert, prop_assert_eq, proptest};

use super::*;
use crate::{
    rollout::spec::{
        Hook, RolloutDefaults,
        tests::{addr, canary, service},
    },
    signals::analysis::Criterion,
};

// ---- Helpers.

fn new(spec: RolloutSpec) -> Rollout {
    Rollout::new(spec, &service(), 0).unwrap()
}

fn started(spec: RolloutSpec) -> (Rollout, Vec<Action>) {
    step(new(spec), Event::Start { at_ms: 0 }).unwrap()
}

fn go(r: &mut Rollout, e: Event) -> Vec<Action> {
    r.apply(e).unwrap()
}

fn tick(now_ms: u64) -> Event {
    Event::Tick { now_ms }
}

fn pass(at_ms: u64) -> Event {
    Event::Analysis {
        at_ms,
        verdict: Verdict::Pass,
    }
}

fn doubt(at_ms: u64) -> Event {
    Event::Analysis {
        at_ms,
        verdict: Verdict::Inconclusive {
            reason: "only 3 attempts in the canary's last 10 s; at least 20 are needed".into(),
        },
    }
}

fn figures() -> Figures {
    Figures {
        criterion: Criterion::ErrorRate,
        value: 0.12,
        limit: 0.05,
        attempts: 50,
        errors: 6,
        error_rate: Some(0.12),
        baseline_attempts: None,
        baseline_error_rate: None,
        latency_p99_ms: None,
        metric: None,
        baseline_metric: None,
    }
}

fn failed() -> Verdict {
    Verdict::Fail {
        reason: "error rate 12.0% (6 of 50 attempts: 5 refused, 1 timeout) is above the limit 5.0%"
            .into(),
        figures: figures(),
    }
}

fn fail(at_ms: u64) -> Event {
    Event::Analysis {
        at_ms,
        verdict: failed(),
    }
}

fn cmd(at_ms: u64, command: Command) -> Event {
    Event::Command { at_ms, command }
}

fn set(stable_percent: u32, target_percent: u32) -> Action {
    Action::SetWeights {
        stable: "blue".into(),
        stable_percent,
        target: "green".into(),
        target_percent,
    }
}

/// The target percents of the `SetWeights` among `actions`.
fn targets(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetWeights { target_percent, .. } => Some(*target_percent),
            _ => None,
        })
        .collect()
}

/// The actions other than records and notification hooks.
fn effects(actions: &[Action]) -> Vec<Action> {
    actions
        .iter()
        .filter(|a| !matches!(a, Action::Record(_)))
        .cloned()
        .collect()
}

fn records(actions: &[Action]) -> Vec<HistoryEntry> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Record(e) => Some(e.clone()),
            _ => None,
        })
        .collect()
}

fn done(outcome: Outcome) -> Action {
    Action::Done { outcome }
}

const P: Pause = Pause::For(1000);

/// 10% for 1 s, 50% until promoted, 100% for 1 s.
fn three_steps() -> RolloutSpec {
    canary(&[(10, P), (50, Pause::UntilPromoted), (100, P)])
}

fn versions() -> AnalysisScope {
    AnalysisScope::Versions {
        canary: "green".into(),
        baseline: "blue".into(),
    }
}

// ---- Canary.

#[test]
fn start_sets_the_first_step_and_starts_the_analysis() {
    let (r, actions) = started(RolloutDefaults::default().spec("web", "blue", "green"));
    assert_eq!(r.phase, Phase::Progressing);
    assert_eq!((r.step, r.attempt, r.started_at_ms), (0, 1, Some(0)));
    assert_eq!(
        effects(&actions),
        [
            set(95, 5),
            Action::StartAnalysis {
                scope: versions(),
                interval_ms: 10_000
            }
        ]
    );
    let kinds: Vec<HistoryKind> = records(&actions).iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [HistoryKind::Started, HistoryKind::Step]);
    assert_eq!(
        records(&actions)[1].detail,
        "step 1 of 5: 5% of new flows to \"green\", for 60000 ms"
    );
}

#[test]
fn canary_happy_path_5_to_100() {
    let (mut r, first) = started(RolloutDefaults::default().spec("web", "blue", "green"));
    let mut all = first;
    let mut t = 0;
    for _ in 0..5 {
        // Ticks and passes through the step; it ends at 60 s.
        for s in 1..=6 {
            all.extend(go(&mut r, pass(t + s * 10_000 - 1)));
            all.extend(go(&mut r, tick(t + s * 10_000)));
        }
        t += 60_000;
    }
    assert_eq!(targets(&all), [5, 10, 25, 50, 100]);
    assert_eq!(
        r.phase,
        Phase::Completed {
            undo_until_ms: Some(300_000 + 600_000)
        }
    );
    assert_eq!(r.finished_at_ms, Some(300_000));
    let tail = effects(&all[all.len() - 4..]);
    assert_eq!(
        tail,
        [
            Action::StopAnalysis,
            Action::SetStable {
                version: "green".into(),
                previous: "blue".into()
            },
            done(Outcome::Completed)
        ]
    );
    assert_eq!(
        all.iter()
            .filter(|a| matches!(a, Action::Done { .. }))
            .count(),
        1
    );
    assert_eq!(
        all.iter()
            .filter(|a| matches!(a, Action::StartAnalysis { .. }))
            .count(),
        1
    );
}

#[test]
fn a_timed_step_ends_at_its_pause_with_a_pass() {
    let (mut r, _) = started(three_steps());
    assert!(
        go(&mut r, pass(200))
            .iter()
            .all(|a| matches!(a, Action::Record(_)))
    );
    assert!(
        effects(&go(&mut r, tick(999))).is_empty(),
        "the pause is not over"
    );
    assert_eq!(targets(&go(&mut r, tick(1000))), [50]);
    assert_eq!(r.phase, Phase::WaitingForPromotion);
    assert_eq!((r.step, r.step_started_at_ms), (1, 1000));
}

#[test]
fn without_a_pass_the_step_waits_and_a_late_pass_ends_it_at_once() {
    let (mut r, _) = started(three_steps());
    assert!(effects(&go(&mut r, tick(5000))).is_empty());
    assert_eq!(r.step, 0);
    assert_eq!(targets(&go(&mut r, pass(5500))), [50]);
    assert_eq!(r.step, 1);
}

#[test]
fn a_doubt_after_the_pass_closes_the_gate_until_the_next_pass() {
    let (mut r, _) = started(three_steps());
    go(&mut r, pass(100));
    go(&mut r, doubt(200));
    assert!(effects(&go(&mut r, tick(2000))).is_empty());
    assert_eq!(r.step_verdict, Some(VerdictKind::Inconclusive));
    assert_eq!(targets(&go(&mut r, pass(2100))), [50]);
}

#[test]
fn a_failure_below_the_limit_closes_the_gate_and_the_limit_rolls_back() {
    let mut spec = three_steps();
    spec.analysis.failure_limit = 2;
    let (mut r, _) = started(spec);
    go(&mut r, pass(100));
    let a = go(&mut r, fail(200));
    assert!(effects(&a).is_empty(), "{a:?}");
    assert_eq!((r.failures, r.phase.clone()), (1, Phase::Progressing));
    assert!(
        effects(&go(&mut r, tick(1500))).is_empty(),
        "a failure closes the gate"
    );
    assert_eq!(targets(&go(&mut r, pass(1600))), [50]);
    let a = go(&mut r, fail(1700));
    assert_eq!(a[0], set(100, 0));
    let Phase::RolledBack { reason, figures: f } = &r.phase else {
        panic!("{:?}", r.phase)
    };
    assert_eq!(
        reason,
        "analysis failed (2 of failure_limit 2): error rate 12.0% (6 of 50 attempts: 5 refused, 1 timeout) is above the limit 5.0%; every new flow goes to \"blue\""
    );
    assert_eq!(f.as_ref(), Some(&figures()));
}

#[test]
fn the_first_failure_rolls_back_with_stable_at_100_first() {
    let (mut r, _) = started(three_steps());
    go(&mut r, pass(100));
    go(&mut r, tick(1000));
    let a = go(&mut r, fail(1500));
    assert_eq!(
        a[0],
        set(100, 0),
        "the traffic goes back before anything else"
    );
    assert_eq!(
        effects(&a),
        [set(100, 0), Action::StopAnalysis, done(Outcome::RolledBack)]
    );
    let rec = records(&a);
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].kind, HistoryKind::RolledBack);
    assert_eq!(rec[0].verdict, Some(failed()));
    assert_eq!(rec[0].weights, Some(Weights::target(0)));
    assert!(matches!(
        &r.phase,
        Phase::RolledBack {
            figures: Some(_),
            ..
        }
    ));
    assert_eq!(
        (r.weights, r.failures, r.finished_at_ms),
        (Weights::target(0), 1, Some(1500))
    );
    assert_eq!(r.verdicts.back().map(|v| &v.verdict), Some(&failed()));
}

#[test]
fn a_failure_while_paused_still_rolls_back() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(100, Command::Pause));
    let a = go(&mut r, fail(200));
    assert_eq!(a[0], set(100, 0));
    assert!(matches!(r.phase, Phase::RolledBack { .. }));
}

#[test]
fn inconclusive_limit_in_a_row_pauses_with_the_reason() {
    let (mut r, _) = started(three_steps());
    go(&mut r, doubt(100));
    go(&mut r, doubt(200));
    go(&mut r, pass(300)); // the run is broken
    go(&mut r, doubt(400));
    go(&mut r, doubt(500));
    assert_eq!(r.phase, Phase::Progressing);
    let a = go(&mut r, doubt(600));
    assert!(effects(&a).is_empty(), "weights stay: {a:?}");
    assert_eq!(
        r.phase,
        Phase::Paused {
            reason: "3 inconclusive analyses in a row (inconclusive_limit = 3); the last: only 3 attempts in the canary's last 10 s; at least 20 are needed".into(),
            since_ms: 600
        }
    );
    assert_eq!(
        records(&a).last().map(|e| e.kind),
        Some(HistoryKind::Paused)
    );
    // Paused: time does not advance it, even with a pass.
    go(&mut r, pass(5000));
    assert!(effects(&go(&mut r, tick(9000))).is_empty());
    assert_eq!(r.step, 0);
}

#[test]
fn resume_continues_the_step_and_the_pause_does_not_count() {
    let (mut r, _) = started(three_steps());
    go(&mut r, doubt(100));
    go(&mut r, doubt(200));
    go(&mut r, doubt(400));
    assert!(matches!(r.phase, Phase::Paused { .. }));
    let a = go(&mut r, cmd(10_400, Command::Resume));
    assert_eq!(r.phase, Phase::Progressing);
    assert_eq!(r.consecutive_inconclusive, 0);
    assert_eq!(
        r.step_started_at_ms, 10_000,
        "moved later by the 10 s pause"
    );
    assert_eq!(records(&a)[0].detail, "resumed after 10000 ms");
    go(&mut r, pass(10_500));
    assert!(
        effects(&go(&mut r, tick(10_999))).is_empty(),
        "999 ms in the step"
    );
    assert_eq!(targets(&go(&mut r, tick(11_000))), [50]);
}

#[test]
fn no_data_never_promotes() {
    let (mut r, _) = started(three_steps());
    for t in 1..=100 {
        assert!(targets(&go(&mut r, tick(t * 1000))).is_empty());
    }
    go(&mut r, doubt(100_001));
    go(&mut r, doubt(100_002));
    go(&mut r, doubt(100_003));
    assert!(matches!(r.phase, Phase::Paused { .. }));
    assert_eq!((r.step, r.weights), (0, Weights::target(10)));
}

#[test]
fn without_analysis_steps_advance_on_time_and_verdicts_are_ignored() {
    let mut spec = canary(&[(10, P), (100, P)]);
    spec.analysis.enabled = false;
    let (mut r, a) = started(spec);
    assert_eq!(effects(&a), [set(90, 10)], "no analysis is started");
    assert!(go(&mut r, fail(10)).is_empty());
    assert_eq!(targets(&go(&mut r, tick(1000))), [100]);
    let a = go(&mut r, tick(2000));
    assert!(a.contains(&done(Outcome::Completed)));
    assert!(!a.contains(&Action::StopAnalysis));
}

#[test]
fn steps_that_hold_nothing_back_complete_at_start() {
    let mut spec = canary(&[(50, Pause::For(0)), (100, Pause::For(0))]);
    spec.analysis.enabled = false;
    let (r, a) = started(spec);
    assert_eq!(targets(&a), [50, 100]);
    assert!(matches!(r.phase, Phase::Completed { .. }));
}

#[test]
fn until_promoted_waits_for_promote() {
    let (mut r, _) = started(three_steps());
    go(&mut r, pass(100));
    go(&mut r, tick(1000));
    assert_eq!(r.phase, Phase::WaitingForPromotion);
    for t in 2..10 {
        go(&mut r, pass(t * 1000));
        assert!(effects(&go(&mut r, tick(t * 1000 + 500))).is_empty());
    }
    let a = go(&mut r, cmd(20_000, Command::Promote));
    assert_eq!(records(&a)[0].kind, HistoryKind::Promoted);
    assert_eq!(targets(&a), [100]);
    assert_eq!((r.step, r.phase.clone()), (2, Phase::Progressing));
}

#[test]
fn promote_ends_a_timed_step_without_its_pause_or_gate() {
    let (mut r, _) = started(three_steps());
    assert_eq!(targets(&go(&mut r, cmd(10, Command::Promote))), [50]);
}

#[test]
fn promote_from_paused_goes_to_the_next_step() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(10, Command::Pause));
    assert_eq!(targets(&go(&mut r, cmd(20, Command::Promote))), [50]);
    assert_eq!(r.phase, Phase::WaitingForPromotion);
}

#[test]
fn promote_at_the_last_step_completes() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(10, Command::Promote));
    go(&mut r, cmd(20, Command::Promote));
    let a = go(&mut r, cmd(30, Command::Promote));
    assert!(a.contains(&done(Outcome::Completed)));
    assert_eq!(targets(&a), Vec::<u32>::new(), "already at 100%");
}

#[test]
fn promote_full_skips_to_100_and_completes() {
    let (mut r, _) = started(three_steps());
    let a = go(&mut r, cmd(10, Command::PromoteFull));
    assert_eq!(
        effects(&a),
        [
            set(0, 100),
            Action::StopAnalysis,
            Action::SetStable {
                version: "green".into(),
                previous: "blue".into()
            },
            done(Outcome::Completed)
        ]
    );
    assert_eq!(
        r.phase,
        Phase::Completed {
            undo_until_ms: Some(10 + DEFAULT_KEEP)
        }
    );
}

const DEFAULT_KEEP: u64 = crate::rollout::spec::DEFAULT_KEEP_OLD_MS;

#[test]
fn pause_by_command_keeps_weights_and_analysis() {
    let (mut r, _) = started(three_steps());
    let a = go(&mut r, cmd(10, Command::Pause));
    assert!(effects(&a).is_empty());
    assert_eq!(
        r.phase,
        Phase::Paused {
            reason: "paused by command".into(),
            since_ms: 10
        }
    );
    // Verdicts still count while paused.
    go(&mut r, pass(20));
    assert_eq!(r.step_verdict, Some(VerdictKind::Pass));
    go(&mut r, cmd(30, Command::Resume));
    assert_eq!(r.phase, Phase::Progressing);
    // Resume into an until-promoted step waits for promotion again.
    go(&mut r, tick(1020));
    assert_eq!(r.phase, Phase::WaitingForPromotion);
    go(&mut r, cmd(1100, Command::Pause));
    go(&mut r, cmd(1200, Command::Resume));
    assert_eq!(r.phase, Phase::WaitingForPromotion);
}

#[test]
fn abort_rolls_back_to_stable_and_stops() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(10, Command::Promote));
    let a = go(&mut r, cmd(20, Command::Abort));
    assert_eq!(
        effects(&a),
        [set(100, 0), Action::StopAnalysis, done(Outcome::Aborted)]
    );
    assert_eq!(
        r.phase,
        Phase::Aborted {
            reason: "aborted by command; every new flow goes to \"blue\"".into(),
            figures: None
        }
    );
    // Stopped: time and verdicts change nothing.
    assert!(go(&mut r, tick(100_000)).is_empty());
    assert!(go(&mut r, fail(100_001)).is_empty());
}

#[test]
fn abort_before_start_changes_no_weights() {
    let mut r = new(three_steps());
    let a = go(&mut r, cmd(5, Command::Abort));
    assert_eq!(effects(&a), [done(Outcome::Aborted)]);
    assert!(matches!(r.phase, Phase::Aborted { .. }));
    assert_eq!(r.allowed_commands(5), [Command::Retry]);
}

#[test]
fn retry_restarts_at_step_0() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(10, Command::Promote));
    go(&mut r, doubt(15));
    go(&mut r, fail(20));
    assert!(matches!(r.phase, Phase::RolledBack { .. }));
    let a = go(&mut r, cmd(30, Command::Retry));
    assert_eq!(
        effects(&a),
        [
            set(90, 10),
            Action::StartAnalysis {
                scope: versions(),
                interval_ms: 10_000
            }
        ]
    );
    assert_eq!(records(&a)[0].kind, HistoryKind::Retried);
    assert_eq!(
        (
            r.step,
            r.attempt,
            r.failures,
            r.consecutive_inconclusive,
            r.step_verdict
        ),
        (0, 2, 0, 0, None)
    );
    assert_eq!((r.started_at_ms, r.finished_at_ms), (Some(0), None));
    assert_eq!(r.verdicts.len(), 2, "the history is kept");
}

#[test]
fn undo_within_keep_old_gives_the_traffic_back() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(10, Command::PromoteFull));
    let a = go(&mut r, cmd(5_010, Command::Undo));
    assert_eq!(
        effects(&a),
        [
            set(100, 0),
            Action::SetStable {
                version: "blue".into(),
                previous: "green".into()
            },
            done(Outcome::Undone)
        ]
    );
    assert_eq!(
        r.phase,
        Phase::RolledBack {
            reason:
                "undone by command 5000 ms after completion; \"blue\" is the stable version again"
                    .into(),
            figures: None
        }
    );
    // And it can be tried again.
    assert_eq!(r.allowed_commands(5_020), [Command::Retry]);
}

#[test]
fn keep_old_runs_out_on_a_tick_then_undo_is_refused() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(10, Command::PromoteFull));
    let until = 10 + DEFAULT_KEEP;
    assert!(go(&mut r, tick(until - 1)).is_empty());
    // Refused at the deadline even before the tick that releases it.
    let e = r.clone().apply(cmd(until, Command::Undo)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot undo: the rollout of \"web\" (blue → green) is completed, and the old version \"blue\" is no longer kept (keep_old_ms = 600000 ran out), so it cannot be undone; allowed now: nothing"
    );
    let a = go(&mut r, tick(until));
    assert_eq!(
        effects(&a),
        [Action::ReleaseOld {
            version: "blue".into()
        }]
    );
    assert_eq!(
        r.phase,
        Phase::Completed {
            undo_until_ms: None
        }
    );
    assert!(go(&mut r, tick(until + 1)).is_empty(), "released once");
    let e = r.clone().apply(cmd(until + 2, Command::Undo)).unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot be undone; allowed now: nothing"),
        "{e}"
    );
}

#[test]
fn the_verdict_history_is_bounded() {
    let (mut r, _) = started(canary(&[(100, Pause::UntilPromoted)]));
    for t in 0..(MAX_VERDICTS as u64 + 10) {
        go(&mut r, pass(t));
    }
    assert_eq!(r.verdicts.len(), MAX_VERDICTS);
    assert_eq!(r.verdicts.front().map(|v| v.at_ms), Some(10));
}

#[test]
fn verdicts_are_ignored_when_no_analysis_runs() {
    let mut r = new(three_steps());
    assert!(go(&mut r, fail(1)).is_empty(), "pending");
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(1, Command::PromoteFull));
    assert!(go(&mut r, fail(2)).is_empty(), "completed");
    assert!(r.verdicts.is_empty());
}

#[test]
fn time_never_goes_back() {
    let (mut r, _) = started(three_steps());
    go(&mut r, tick(5000));
    let a = go(&mut r, pass(100));
    assert_eq!(records(&a)[0].at_ms, 5000);
    assert_eq!(r.verdicts[0].at_ms, 5000);
    assert_eq!(r.updated_at_ms, 5000);
    // The step's pause counted from 0, so the late pass ends it.
    assert_eq!(r.step, 1);
}

#[test]
fn backend_events_are_ignored_by_a_canary() {
    let (mut r, _) = started(three_steps());
    let b = addr("10.0.2.1:80");
    let before = r.clone();
    assert!(
        go(
            &mut r,
            Event::Drained {
                at_ms: 0,
                backend: b,
                live_flows: 0
            }
        )
        .is_empty()
    );
    assert!(
        go(
            &mut r,
            Event::Health {
                at_ms: 0,
                backend: b,
                up: true
            }
        )
        .is_empty()
    );
    assert!(
        go(
            &mut r,
            Event::HookFinished {
                at_ms: 0,
                backend: b,
                ok: false,
                detail: "x".into()
            }
        )
        .is_empty()
    );
    assert_eq!(r, before);
}

#[test]
fn notification_hooks_run_with_their_environment() {
    let mut spec = three_steps();
    spec.hooks = vec![
        Hook {
            event: HookEvent::Step,
            argv: vec!["notify-step".into()],
            timeout_ms: 1000,
        },
        Hook {
            event: HookEvent::RolledBack,
            argv: vec!["page".into(), "--team=web".into()],
            timeout_ms: 2000,
        },
    ];
    let (mut r, a) = started(spec);
    let hooks: Vec<&HookRun> = a
        .iter()
        .filter_map(|a| match a {
            Action::RunHook(h) => Some(h),
            _ => None,
        })
        .collect();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0].purpose, HookPurpose::Notify(HookEvent::Step));
    assert_eq!(hooks[0].env["SPLITTER_TARGET_PERCENT"], "10");
    assert_eq!(hooks[0].env["SPLITTER_EVENT"], "step");
    let a = go(&mut r, fail(10));
    assert_eq!(a[0], set(100, 0));
    let Some(Action::RunHook(h)) = a.iter().find(|a| matches!(a, Action::RunHook(_))) else {
        panic!("{a:?}")
    };
    assert_eq!(h.argv, ["page", "--team=web"]);
    assert_eq!(h.timeout_ms, 2000);
    assert_eq!(h.env["SPLITTER_EVENT"], "rolled_back");
    assert_eq!(h.env["SPLITTER_SERVICE"], "web");
    assert_eq!(h.env["SPLITTER_TARGET_PERCENT"], "0");
    assert!(h.env["SPLITTER_REASON"].starts_with("analysis failed (1 of failure_limit 1)"));
}

// ---- Blue-green.

fn blue_green(auto: Option<u64>) -> RolloutSpec {
    RolloutSpec {
        strategy: Strategy::BlueGreen {
            preview: Some(addr("10.0.0.10:8080")),
            auto_promote_after_ms: auto,
            post_switch_analysis_ms: 5000,
            keep_old_ms: Some(60_000),
        },
        ..RolloutDefaults::default().spec("web", "blue", "green")
    }
}

#[test]
fn blue_green_previews_then_switches_at_once_on_promote() {
    let (mut r, a) = started(blue_green(None));
    let vip = addr("10.0.0.10:8080");
    assert_eq!(
        effects(&a),
        [
            set(100, 0),
            Action::SetPreview {
                vip,
                version: "green".into()
            }
        ],
        "the preview is not analysed"
    );
    assert_eq!(r.phase, Phase::WaitingForPromotion);
    assert!(
        go(&mut r, fail(100)).is_empty(),
        "no analysis during the preview"
    );
    assert!(effects(&go(&mut r, tick(1_000_000))).is_empty());
    let a = go(&mut r, cmd(1_000_001, Command::Promote));
    assert_eq!(
        effects(&a),
        [
            set(0, 100),
            Action::ClearPreview { vip },
            Action::StartAnalysis {
                scope: versions(),
                interval_ms: 10_000
            }
        ]
    );
    assert_eq!((r.step, r.phase.clone()), (1, Phase::Progressing));
    go(&mut r, pass(1_002_000));
    assert!(
        effects(&go(&mut r, tick(1_005_000))).is_empty(),
        "window not over"
    );
    let a = go(&mut r, tick(1_005_001));
    assert_eq!(
        effects(&a),
        [
            Action::StopAnalysis,
            Action::SetStable {
                version: "green".into(),
                previous: "blue".into()
            },
            done(Outcome::Completed)
        ]
    );
    assert_eq!(
        r.phase,
        Phase::Completed {
            undo_until_ms: Some(1_005_001 + 60_000)
        }
    );
}

#[test]
fn blue_green_auto_promotes_after_its_time() {
    let (mut r, a) = started(blue_green(Some(30_000)));
    assert_eq!(r.phase, Phase::Progressing);
    assert!(effects(&a).len() == 2);
    assert!(targets(&go(&mut r, tick(29_999))).is_empty());
    let a = go(&mut r, tick(30_000));
    assert_eq!(a[0], set(0, 100));
}

#[test]
fn blue_green_post_switch_failure_switches_back_at_once() {
    let (mut r, _) = started(blue_green(None));
    go(&mut r, cmd(10, Command::Promote));
    let a = go(&mut r, fail(20));
    assert_eq!(
        effects(&a),
        [set(100, 0), Action::StopAnalysis, done(Outcome::RolledBack)]
    );
}

#[test]
fn blue_green_post_switch_window_needs_a_pass() {
    let (mut r, _) = started(blue_green(None));
    go(&mut r, cmd(10, Command::Promote));
    go(&mut r, doubt(1000));
    assert!(effects(&go(&mut r, tick(100_000))).is_empty());
    assert_eq!(r.step, 1);
}

#[test]
fn blue_green_undo_is_instant_within_its_keep_time() {
    let (mut r, _) = started(blue_green(None));
    let a = go(&mut r, cmd(10, Command::PromoteFull));
    assert_eq!(effects(&a)[0], set(0, 100));
    assert!(a.contains(&Action::ClearPreview {
        vip: addr("10.0.0.10:8080")
    }));
    assert_eq!(r.allowed_commands(60_009), [Command::Undo]);
    assert_eq!(r.allowed_commands(60_010), Vec::<Command>::new());
    let a = go(&mut r, cmd(60_009, Command::Undo));
    assert_eq!(a[0], set(100, 0));
}

#[test]
fn blue_green_abort_in_preview_clears_it() {
    let (mut r, _) = started(blue_green(None));
    let a = go(&mut r, cmd(10, Command::Abort));
    assert_eq!(
        effects(&a),
        [
            set(100, 0),
            Action::ClearPreview {
                vip: addr("10.0.0.10:8080")
            },
            done(Outcome::Aborted)
        ]
    );
}

// ---- Rolling.

const B1: &str = "10.0.2.1:80";
const B2: &str = "10.0.2.2:80";
const B3: &str = "10.0.2.3:80";

fn rolling(hook: bool) -> RolloutSpec {
    RolloutSpec {
        strategy: Strategy::Rolling {
            batch_size: 1,
            drain_deadline_ms: 10_000,
            hook: hook.then(|| vec!["deploy".to_string()]),
            hook_timeout_ms: 60_000,
            rise: 2,
            slow_start_ms: 1000,
        },
        ..RolloutDefaults::default().spec("web", "blue", "blue")
    }
}

fn drain(b: &str) -> Action {
    Action::SetBackendState {
        backend: addr(b),
        state: BackendState::Drain,
    }
}

fn drained(at_ms: u64, b: &str, live_flows: u64) -> Event {
    Event::Drained {
        at_ms,
        backend: addr(b),
        live_flows,
    }
}

fn hooked(at_ms: u64, b: &str, ok: bool) -> Event {
    Event::HookFinished {
        at_ms,
        backend: addr(b),
        ok,
        detail: if ok { "exit status 0" } else { "exit status 3" }.into(),
    }
}

fn health(at_ms: u64, b: &str, up: bool) -> Event {
    Event::Health {
        at_ms,
        backend: addr(b),
        up,
    }
}

fn stage(r: &Rollout) -> BatchStage {
    r.rolling.as_ref().map(|p| p.stage).unwrap()
}

/// Takes the current batch (one backend `b`, started at `t`) through to
/// the analysis; returns the actions.
fn through_batch(r: &mut Rollout, b: &str, t: u64) -> Vec<Action> {
    let mut all = go(r, drained(t + 10, b, 3));
    all.extend(go(r, drained(t + 20, b, 0)));
    all.extend(go(r, hooked(t + 30, b, true)));
    all.extend(go(r, health(t + 40, b, true)));
    all.extend(go(r, health(t + 50, b, true)));
    all.extend(go(r, tick(t + 550)));
    all.extend(go(r, tick(t + 1050)));
    all
}

#[test]
fn rolling_plans_batches_from_the_active_backends() {
    let mut spec = rolling(true);
    spec.strategy = Strategy::Rolling {
        batch_size: 2,
        drain_deadline_ms: 0,
        hook: None,
        hook_timeout_ms: 1,
        rise: 1,
        slow_start_ms: 0,
    };
    let r = new(spec);
    let p = r.rolling.unwrap();
    assert_eq!(p.batches, [vec![addr(B1), addr(B2)], vec![addr(B3)]]);
    assert_eq!(p.all, [addr(B1), addr(B2), addr(B3)]);
}

#[test]
fn rolling_happy_path_batch_by_batch() {
    let (mut r, a) = started(rolling(true));
    assert_eq!(effects(&a), [drain(B1)]);
    assert_eq!(stage(&r), BatchStage::Draining);
    // Live flows not yet 0: it waits.
    assert!(effects(&go(&mut r, drained(10, B1, 3))).is_empty());
    let a = effects(&go(&mut r, drained(20, B1, 0)));
    let [Action::RunHook(h)] = a.as_slice() else {
        panic!("{a:?}")
    };
    assert_eq!(h.purpose, HookPurpose::Deploy { backend: addr(B1) });
    assert_eq!(h.env["SPLITTER_BACKEND"], B1);
    assert_eq!(h.env["SPLITTER_VERSION"], "blue");
    assert_eq!(h.timeout_ms, 60_000);
    // Health results before the deploy finished do not count.
    go(&mut r, health(25, B1, true));
    go(&mut r, health(26, B1, true));
    assert_eq!(stage(&r), BatchStage::RunningHook);
    go(&mut r, hooked(30, B1, true));
    assert_eq!(stage(&r), BatchStage::WaitingForHealth);
    go(&mut r, health(40, B1, true));
    go(&mut r, health(45, B1, false)); // the run starts again
    assert!(effects(&go(&mut r, health(50, B1, true))).is_empty());
    let a = go(&mut r, health(60, B1, true));
    assert_eq!(
        effects(&a),
        [
            Action::SetBackendWeight {
                backend: addr(B1),
                percent: 1
            },
            Action::SetBackendState {
                backend: addr(B1),
                state: BackendState::Active
            }
        ]
    );
    assert_eq!(stage(&r), BatchStage::SlowStart { percent: 1 });
    let a = go(&mut r, tick(560));
    assert_eq!(
        effects(&a),
        [Action::SetBackendWeight {
            backend: addr(B1),
            percent: 50
        }]
    );
    let a = go(&mut r, tick(1060));
    assert_eq!(
        effects(&a),
        [
            Action::SetBackendWeight {
                backend: addr(B1),
                percent: 100
            },
            Action::StartAnalysis {
                scope: AnalysisScope::Backends {
                    version: "blue".into(),
                    canary: vec![addr(B1)],
                    baseline: vec![addr(B2), addr(B3)]
                },
                interval_ms: 10_000
            }
        ]
    );
    assert_eq!(stage(&r), BatchStage::Verifying);
    assert!(
        effects(&go(&mut r, tick(50_000))).is_empty(),
        "needs a pass"
    );
    let a = go(&mut r, pass(50_001));
    assert_eq!(effects(&a), [Action::StopAnalysis, drain(B2)]);
    assert_eq!((r.step, stage(&r)), (1, BatchStage::Draining));
    let a = through_batch(&mut r, B2, 60_000);
    assert!(a.contains(&Action::StartAnalysis {
        scope: AnalysisScope::Backends {
            version: "blue".into(),
            canary: vec![addr(B2)],
            baseline: vec![addr(B1), addr(B3)]
        },
        interval_ms: 10_000
    }));
    go(&mut r, pass(70_000));
    through_batch(&mut r, B3, 80_000);
    let a = go(&mut r, pass(90_000));
    assert_eq!(
        effects(&a),
        [Action::StopAnalysis, done(Outcome::Completed)],
        "no SetStable: the version stays"
    );
    assert_eq!(
        r.phase,
        Phase::Completed {
            undo_until_ms: None
        }
    );
    assert_eq!(r.allowed_commands(90_001), Vec::<Command>::new());
    assert_eq!(
        r.describe(90_001),
        "completed (a rolling update keeps no old version to undo to)"
    );
}

#[test]
fn rolling_goes_on_at_the_drain_deadline() {
    let (mut r, _) = started(rolling(false));
    go(&mut r, drained(10, B1, 7));
    assert!(effects(&go(&mut r, tick(9_999))).is_empty());
    let a = go(&mut r, tick(10_000));
    assert_eq!(
        records(&a)[0].detail,
        "batch 1: drain deadline of 10000 ms reached: 10.0.2.1:80 with 7 live flows"
    );
    assert_eq!(
        stage(&r),
        BatchStage::WaitingForHealth,
        "no hook: straight to health"
    );
}

#[test]
fn rolling_hook_failure_aborts_and_leaves_the_batch_drained() {
    let (mut r, _) = started(rolling(true));
    go(&mut r, drained(10, B1, 0));
    let a = go(&mut r, hooked(20, B1, false));
    assert_eq!(
        effects(&a),
        [done(Outcome::Aborted)],
        "no backend goes back in"
    );
    assert_eq!(
        r.phase,
        Phase::Aborted {
            reason: "deploy hook failed on 10.0.2.1:80: exit status 3; batch 1 (10.0.2.1:80) is left drained".into(),
            figures: None
        }
    );
    // Retry starts the failed batch again.
    let a = go(&mut r, cmd(30, Command::Retry));
    assert_eq!(effects(&a), [drain(B1)]);
    assert_eq!(
        (r.step, stage(&r), r.phase.clone()),
        (0, BatchStage::Draining, Phase::Progressing)
    );
}

#[test]
fn rolling_retry_resumes_at_the_failed_batch() {
    let (mut r, _) = started(rolling(true));
    through_batch(&mut r, B1, 0);
    go(&mut r, pass(2000));
    assert_eq!(r.step, 1);
    go(&mut r, drained(3000, B2, 0));
    go(&mut r, hooked(3010, B2, false));
    let a = go(&mut r, cmd(4000, Command::Retry));
    assert_eq!(effects(&a), [drain(B2)]);
    assert_eq!(r.step, 1);
}

#[test]
fn rolling_batch_failure_drains_it_first() {
    let (mut r, _) = started(rolling(true));
    through_batch(&mut r, B1, 0);
    assert_eq!(stage(&r), BatchStage::Verifying);
    let a = go(&mut r, fail(2000));
    assert_eq!(a[0], drain(B1));
    assert_eq!(
        effects(&a),
        [drain(B1), Action::StopAnalysis, done(Outcome::Aborted)]
    );
    let Phase::Aborted { reason, figures: f } = &r.phase else {
        panic!("{:?}", r.phase)
    };
    assert!(
        reason.starts_with(
            "analysis of batch 1 (10.0.2.1:80) failed (1 of failure_limit 1): error rate 12.0%"
        ),
        "{reason}"
    );
    assert_eq!(f.as_ref(), Some(&figures()));
}

#[test]
fn rolling_abort_drains_a_batch_that_takes_traffic() {
    let (mut r, _) = started(rolling(true));
    go(&mut r, drained(10, B1, 0));
    go(&mut r, hooked(20, B1, true));
    go(&mut r, health(30, B1, true));
    go(&mut r, health(40, B1, true));
    assert_eq!(stage(&r), BatchStage::SlowStart { percent: 1 });
    let a = go(&mut r, cmd(50, Command::Abort));
    assert_eq!(effects(&a), [drain(B1), done(Outcome::Aborted)]);
    assert_eq!(
        r.phase,
        Phase::Aborted {
            reason: "aborted by command; batch 1 (10.0.2.1:80) is left drained".into(),
            figures: None
        }
    );
}

#[test]
fn rolling_pause_freezes_the_ramp_and_keeps_facts() {
    let (mut r, _) = started(rolling(true));
    go(&mut r, cmd(5, Command::Pause));
    // Facts still land while paused, but nothing moves.
    assert!(effects(&go(&mut r, drained(10, B1, 0))).is_empty());
    assert_eq!(stage(&r), BatchStage::Draining);
    let a = go(&mut r, cmd(100, Command::Resume));
    assert!(matches!(effects(&a).as_slice(), [Action::RunHook(_)]));
    go(&mut r, hooked(110, B1, true));
    go(&mut r, health(120, B1, true));
    go(&mut r, health(130, B1, true));
    go(&mut r, tick(630)); // 50%
    go(&mut r, cmd(630, Command::Pause));
    assert!(effects(&go(&mut r, tick(50_000))).is_empty());
    go(&mut r, cmd(60_630, Command::Resume));
    assert_eq!(stage(&r), BatchStage::SlowStart { percent: 50 });
    let a = go(&mut r, tick(60_880));
    assert_eq!(
        effects(&a),
        [Action::SetBackendWeight {
            backend: addr(B1),
            percent: 75
        }]
    );
}

#[test]
fn rolling_knows_no_promotion() {
    let (r, _) = started(rolling(true));
    assert_eq!(r.allowed_commands(1), [Command::Pause, Command::Abort]);
    let e = r.clone().apply(cmd(1, Command::Promote)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cannot promote: the rollout of \"web\" (blue → blue) is progressing at batch 1 of 3 (draining); allowed now: pause, abort"
    );
}

// ---- Legal and illegal transitions.

/// A rollout in each phase, with the commands it allows at `at`.
fn fixtures() -> Vec<(&'static str, Rollout, u64, Vec<Command>)> {
    use Command::*;
    let at = 100;
    let pending = new(three_steps());
    let (progressing, _) = started(three_steps());
    let mut waiting = progressing.clone();
    go(&mut waiting, cmd(10, Promote));
    let mut paused = progressing.clone();
    go(&mut paused, cmd(10, Pause));
    let mut completed = progressing.clone();
    go(&mut completed, cmd(10, PromoteFull));
    let mut released = completed.clone();
    go(&mut released, tick(10 + DEFAULT_KEEP));
    let mut rolled_back = progressing.clone();
    go(&mut rolled_back, fail(10));
    let mut aborted = progressing.clone();
    go(&mut aborted, cmd(10, Abort));
    let (rolling_progressing, _) = started(rolling(true));
    let mut rolling_paused = rolling_progressing.clone();
    go(&mut rolling_paused, cmd(10, Pause));
    let mut rolling_aborted = rolling_progressing.clone();
    go(&mut rolling_aborted, cmd(10, Abort));
    let mut rolling_completed = {
        let mut spec = rolling(false);
        spec.analysis.enabled = false;
        started(spec).0
    };
    for (b, t) in [(B1, 0), (B2, 10_000), (B3, 20_000)] {
        go(&mut rolling_completed, drained(t + 1, b, 0));
        go(&mut rolling_completed, health(t + 2, b, true));
        go(&mut rolling_completed, health(t + 3, b, true));
        go(&mut rolling_completed, tick(t + 5000));
    }
    assert_eq!(
        rolling_completed.phase,
        Phase::Completed {
            undo_until_ms: None
        }
    );
    let released_at = released.updated_at_ms + 1;
    vec![
        ("pending", pending, at, vec![Abort]),
        (
            "progressing",
            progressing,
            at,
            vec![Promote, PromoteFull, Pause, Abort],
        ),
        (
            "waiting",
            waiting,
            at,
            vec![Promote, PromoteFull, Pause, Abort],
        ),
        (
            "paused",
            paused,
            at,
            vec![Promote, PromoteFull, Resume, Abort],
        ),
        ("completed", completed, at, vec![Undo]),
        ("released", released, released_at, vec![]),
        ("rolled back", rolled_back, at, vec![Retry]),
        ("aborted", aborted, at, vec![Retry]),
        (
            "rolling progressing",
            rolling_progressing,
            at,
            vec![Pause, Abort],
        ),
        ("rolling paused", rolling_paused, at, vec![Resume, Abort]),
        ("rolling aborted", rolling_aborted, at, vec![Retry]),
        ("rolling completed", rolling_completed, 30_000, vec![]),
    ]
}

#[test]
fn every_command_in_every_phase_is_allowed_or_refused_with_the_reason() {
    for (name, r, at, allowed) in fixtures() {
        assert_eq!(r.allowed_commands(at), allowed, "{name}");
        for c in Command::ALL {
            let mut copy = r.clone();
            let result = copy.apply(cmd(at, c));
            if allowed.contains(&c) {
                assert!(result.is_ok(), "{name}: {c}: {result:?}");
            } else {
                let e = result.unwrap_err();
                assert_eq!(copy, r, "{name}: a refused {c} changes nothing");
                assert_eq!(e.attempted, c.name());
                assert_eq!(e.allowed, allowed, "{name}");
                assert_eq!(e.state, r.describe(at));
                let text = e.to_string();
                assert!(
                    text.starts_with(&format!("cannot {c}: the rollout of \"web\"")),
                    "{text}"
                );
                assert!(text.contains("; allowed now: "), "{text}");
            }
        }
        // Start only from pending.
        let result = r.clone().apply(Event::Start { at_ms: at });
        assert_eq!(result.is_ok(), name == "pending", "{name}: start");
    }
}

#[test]
fn refusals_say_what_state_it_is_in() {
    let f: BTreeMap<&str, Rollout> = fixtures().into_iter().map(|(n, r, _, _)| (n, r)).collect();
    let refuse =
        |name: &str, c: Command| f[name].clone().apply(cmd(100, c)).unwrap_err().to_string();
    assert_eq!(
        refuse("progressing", Command::Resume),
        "cannot resume: the rollout of \"web\" (blue → green) is progressing at step 1 of 3 (10% to \"green\"); allowed now: promote, promote-full, pause, abort"
    );
    assert_eq!(
        refuse("waiting", Command::Retry),
        "cannot retry: the rollout of \"web\" (blue → green) is waiting for promotion at step 2 of 3 (50% to \"green\"); allowed now: promote, promote-full, pause, abort"
    );
    assert_eq!(
        refuse("paused", Command::Pause),
        "cannot pause: the rollout of \"web\" (blue → green) is paused at step 1 of 3 (10% to \"green\"): paused by command; allowed now: promote, promote-full, resume, abort"
    );
    assert_eq!(
        refuse("completed", Command::Promote),
        "cannot promote: the rollout of \"web\" (blue → green) is completed (the old version \"blue\" is kept for undo for 9m59s more); allowed now: undo"
    );
    assert_eq!(
        refuse("progressing", Command::Undo),
        "cannot undo: the rollout of \"web\" (blue → green) is progressing at step 1 of 3 (10% to \"green\"); allowed now: promote, promote-full, pause, abort"
    );
    assert_eq!(
        refuse("aborted", Command::Resume),
        "cannot resume: the rollout of \"web\" (blue → green) is aborted: aborted by command; every new flow goes to \"blue\"; allowed now: retry"
    );
    assert_eq!(
        refuse("pending", Command::Promote),
        "cannot promote: the rollout of \"web\" (blue → green) is pending (not started); allowed now: abort"
    );
    let e = f["progressing"]
        .clone()
        .apply(Event::Start { at_ms: 100 })
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cannot start: the rollout of \"web\" (blue → green) is progressing"),
        "{e}"
    );
}

#[test]
fn a_step_error_consumes_nothing_but_the_state_value() {
    let (r, _) = started(three_steps());
    let e = step(r, cmd(1, Command::Retry)).unwrap_err();
    assert_eq!(
        e.allowed,
        [
            Command::Promote,
            Command::PromoteFull,
            Command::Pause,
            Command::Abort
        ]
    );
}

#[test]
fn rollout_new_refuses_an_invalid_spec() {
    let e = Rollout::new(canary(&[(10, P)]), &service(), 0).unwrap_err();
    assert_eq!(
        e,
        [
            "strategy.steps[0].weight_percent = 10: the last step must be 100 (the whole share to the target)"
        ]
    );
}

// ---- Persistence and restart.

#[test]
fn a_saved_mid_rollout_state_resumes_where_it_was() {
    let (mut r, _) = started(RolloutDefaults::default().spec("web", "blue", "green"));
    for t in [60_000, 120_000] {
        go(&mut r, pass(t - 1));
        go(&mut r, tick(t));
    }
    go(&mut r, doubt(125_000));
    go(&mut r, pass(130_000));
    assert_eq!(
        (r.step, r.weights, r.step_started_at_ms),
        (2, Weights::target(25), 120_000)
    );
    let saved = serde_json::to_string_pretty(&r).unwrap();
    let mut back: Rollout = serde_json::from_str(&saved).unwrap();
    assert_eq!(back, r);

    // The daemon comes back at 150 s: the step's actions are re-asserted,
    // its clock goes on from 120 s, and its pass before the restart is
    // forgotten.
    let a = go(&mut back, Event::Restored { at_ms: 150_000 });
    assert_eq!(
        effects(&a),
        [
            set(75, 25),
            Action::StartAnalysis {
                scope: versions(),
                interval_ms: 10_000
            }
        ]
    );
    assert_eq!(records(&a)[0].kind, HistoryKind::Restored);
    assert_eq!(back.step_verdict, None);
    assert!(
        effects(&go(&mut back, tick(180_000))).is_empty(),
        "the gate needs a fresh pass"
    );
    assert_eq!(
        targets(&go(&mut back, pass(180_500))),
        [50],
        "the 60 s counted from 120 s"
    );
}

#[test]
fn a_restored_rolling_update_reruns_unfinished_hooks() {
    let (mut r, _) = started(rolling(true));
    go(&mut r, drained(10, B1, 0));
    let mut back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    let a = go(&mut back, Event::Restored { at_ms: 5000 });
    let e = effects(&a);
    assert_eq!(e[0], drain(B1));
    assert!(
        matches!(&e[1], Action::RunHook(h) if h.purpose == HookPurpose::Deploy { backend: addr(B1) })
    );
}

#[test]
fn restoring_a_finished_or_paused_rollout_changes_nothing_else() {
    for (name, r, at, _) in fixtures() {
        let mut copy = r.clone();
        let a = go(&mut copy, Event::Restored { at_ms: at });
        assert_eq!(copy.phase, r.phase, "{name}");
        if !r.phase.is_running() {
            assert!(effects(&a).is_empty(), "{name}: {a:?}");
        }
    }
}

#[test]
fn a_paused_rollout_survives_a_restart_paused() {
    let (mut r, _) = started(three_steps());
    go(&mut r, cmd(500, Command::Pause));
    let mut back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    let a = go(&mut back, Event::Restored { at_ms: 10_000 });
    assert_eq!(effects(&a)[0], set(90, 10));
    assert!(matches!(back.phase, Phase::Paused { since_ms: 500, .. }));
    go(&mut back, cmd(20_500, Command::Resume));
    assert_eq!(back.step_started_at_ms, 20_000);
}

#[test]
fn states_events_and_actions_serialize_with_tags() {
    let (_, a) = started(three_steps());
    let json = serde_json::to_value(&a[1]).unwrap();
    assert_eq!(json["action"], "set_weights");
    assert_eq!(json["target_percent"], 10);
    let e = serde_json::to_value(cmd(5, Command::PromoteFull)).unwrap();
    assert_eq!(
        e,
        serde_json::json!({"event": "command", "at_ms": 5, "command": "promote_full"})
    );
    let p = serde_json::to_value(Phase::Paused {
        reason: "x".into(),
        since_ms: 1,
    })
    .unwrap();
    assert_eq!(
        p,
        serde_json::json!({"phase": "paused", "reason": "x", "since_ms": 1})
    );
}

// ---- Properties.

/// A canary whose every step needs analysis.
fn analysed_canary() -> RolloutSpec {
    canary(&[
        (5, Pause::For(100)),
        (25, Pause::For(0)),
        (50, Pause::UntilPromoted),
        (100, Pause::For(100)),
    ])
}

/// A time step and two selectors for [`event_of`].
fn any_event() -> impl proptest::strategy::Strategy<Value = (u64, u8, u8)> {
    (0u64..500, 0u8..15, 0u8..7)
}

/// Builds an event from a time and two selectors; `pass_ok`/`fail_ok`
/// decide whether those verdicts may appear, and `commands` which
/// commands. Rolling events are about the first backend.
fn event_of(t: u64, kind: u8, c: u8, pass_ok: bool, fail_ok: bool, commands: &[Command]) -> Event {
    match kind {
        0..=3 => tick(t),
        4 if pass_ok => pass(t),
        4 | 5 => doubt(t),
        6 if fail_ok => fail(t),
        7 => Event::Restored { at_ms: t },
        12 => drained(t, B1, u64::from(c % 2)),
        13 => hooked(t, B1, !c.is_multiple_of(3)),
        14 => health(t, B1, !c.is_multiple_of(4)),
        _ => match commands.get(usize::from(c) % commands.len().max(1)) {
            Some(&command) => cmd(t, command),
            None => tick(t),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Without a pass (and without an operator's promotion), a canary
    /// whose steps need analysis never completes, whatever else happens.
    #[test]
    fn no_pass_never_completes(events in prop::collection::vec(any_event(), 0..80)) {
        use Command::*;
        let commands = [Pause, Resume, Abort, Retry, Undo];
        let mut r = new(analysed_canary());
        r.apply(Event::Start { at_ms: 0 }).unwrap();
        let mut t = 0;
        for (dt, kind, c) in events {
            t += dt;
            let _ = r.apply(event_of(t, kind, c, false, true, &commands));
            prop_assert!(!matches!(r.phase, Phase::Completed { .. }), "{:?}", r.phase);
            prop_assert!(r.weights.target_percent <= 5, "{:?}", r.weights);
        }
    }

    /// In a healthy canary (no failure, abort or undo), the target's share
    /// never goes down, and the two shares add up to 100.
    #[test]
    fn healthy_canary_weights_never_go_down(events in prop::collection::vec(any_event(), 0..120)) {
        use Command::*;
        let commands = [Promote, PromoteFull, Pause, Resume];
        let mut r = new(analysed_canary());
        let mut seen = targets(&r.apply(Event::Start { at_ms: 0 }).unwrap());
        let mut t = 0;
        for (dt, kind, c) in events {
            t += dt;
            if let Ok(actions) = r.apply(event_of(t, kind, c, true, false, &commands)) {
                for a in &actions {
                    if let Action::SetWeights { stable_percent, target_percent, .. } = a {
                        prop_assert_eq!(stable_percent + target_percent, 100);
                    }
                }
                seen.extend(targets(&actions));
            }
        }
        prop_assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{:?}", seen);
    }

    /// Any reachable state survives a JSON round trip, and a refused event
    /// leaves it as it was.
    #[test]
    fn reachable_states_round_trip_and_refusals_change_nothing(
        events in prop::collection::vec(any_event(), 0..60),
        rolling_spec in any::<bool>(),
    ) {
        let commands = Command::ALL;
        let spec = if rolling_spec { rolling(true) } else { analysed_canary() };
        let mut r = new(spec);
        r.apply(Event::Start { at_ms: 0 }).unwrap();
        let mut t = 0;
        for (dt, kind, c) in events {
            t += dt;
            let before = r.clone();
            if r.apply(event_of(t, kind, c, true, true, &commands)).is_err() {
                prop_assert_eq!(&r, &before);
            }
            let back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
            prop_assert_eq!(&back, &r);
        }
    }
}

#[test]
fn a_step_with_equal_weights_sets_them_again() {
    // Equal steps are legal (a second pause at the same share).
    let spec = canary(&[(50, Pause::For(0)), (50, Pause::UntilPromoted), (100, P)]);
    let (mut r, _) = started(spec);
    assert_eq!(r.step, 0);
    assert_eq!(targets(&go(&mut r, pass(1))), [50]);
    assert_eq!(r.phase, Phase::WaitingForPromotion);
}

#[test]
fn time_left_reads_in_minutes_and_seconds() {
    assert_eq!(super::remaining(599_910), "9m59s");
    assert_eq!(super::remaining(60_000), "1m00s");
    assert_eq!(super::remaining(59_999), "59s");
    assert_eq!(super::remaining(999), "0s");
}
