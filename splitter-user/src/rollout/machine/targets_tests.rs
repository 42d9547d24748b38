//! The `targets` step of a canary: the rollout's rules are set on entering
//! it, kept through the later steps, and cleared when the rollout ends
//! (completed, rolled back, aborted); a restart sets them again; the spec
//! refuses a targets step without targets and the reverse.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::rollout::spec::{
    Step,
    tests::{canary, service},
};

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

/// `targets, 50, 100`, a second a step, targets 10.0.1.96/28.
fn spec() -> RolloutSpec {
    let mut s = canary(&[(50, Pause::For(1000)), (100, Pause::For(1000))]);
    if let Strategy::Canary { steps } = &mut s.strategy {
        steps.insert(
            0,
            Step {
                weight_percent: 0,
                pause: Pause::For(1000),
                targets: true,
            },
        );
    }
    s.targets = vec![cidr("10.0.1.96/28")];
    s
}

fn set_targets() -> Action {
    Action::SetTargets {
        version: "green".into(),
        cidrs: vec![cidr("10.0.1.96/28")],
    }
}

fn clear_targets() -> Action {
    Action::ClearTargets {
        cidrs: vec![cidr("10.0.1.96/28")],
    }
}

fn count(actions: &[Action], a: &Action) -> usize {
    actions.iter().filter(|x| *x == a).count()
}

fn pass(at_ms: u64) -> Event {
    Event::Analysis {
        at_ms,
        verdict: Verdict::Pass,
    }
}

fn started() -> Rollout {
    let r = Rollout::new(spec(), &service(), 0).unwrap();
    let (r, actions) = step(r, Event::Start { at_ms: 0 }).unwrap();
    // The stable version keeps every weighted flow; only the targets move.
    let first = actions
        .iter()
        .position(|a| matches!(a, Action::SetWeights { .. }))
        .unwrap();
    assert!(matches!(
        &actions[first],
        Action::SetWeights {
            stable_percent: 100,
            target_percent: 0,
            ..
        }
    ));
    assert_eq!(actions[first + 1], set_targets(), "{actions:?}");
    r
}

#[test]
fn the_targets_step_sets_the_rules_keeps_them_and_completion_clears_them() {
    let mut r = started();
    let a = r.apply(pass(500)).unwrap();
    let a2 = r.apply(Event::Tick { now_ms: 1000 }).unwrap();
    let both: Vec<Action> = a.into_iter().chain(a2).collect();
    // Step 2 (50 %): weights move, the rules are neither set again nor cleared.
    assert!(both.iter().any(|x| matches!(
        x,
        Action::SetWeights {
            target_percent: 50,
            ..
        }
    )));
    assert_eq!(
        count(&both, &set_targets()) + count(&both, &clear_targets()),
        0
    );
    r.apply(pass(1500)).unwrap();
    let a = r.apply(Event::Tick { now_ms: 2000 }).unwrap();
    r.apply(pass(2500)).unwrap();
    let b = r.apply(Event::Tick { now_ms: 3000 }).unwrap();
    let done: Vec<Action> = a.into_iter().chain(b).collect();
    assert!(matches!(r.phase, Phase::Completed { .. }), "{:?}", r.phase);
    assert_eq!(count(&done, &clear_targets()), 1, "{done:?}");
}

#[test]
fn a_rollback_or_an_abort_clears_the_rules_right_after_the_weights() {
    let mut r = started();
    let a = r
        .apply(Event::Analysis {
            at_ms: 500,
            verdict: Verdict::Fail {
                reason: "error rate 0.5 above 0.05".into(),
                figures: Figures {
                    criterion: crate::signals::analysis::Criterion::ErrorRate,
                    value: 0.5,
                    limit: 0.05,
                    attempts: 40,
                    errors: 20,
                    error_rate: Some(0.5),
                    baseline_attempts: None,
                    baseline_error_rate: None,
                    latency_p99_ms: None,
                    metric: None,
                    baseline_metric: None,
                },
            },
        })
        .unwrap();
    assert!(matches!(r.phase, Phase::RolledBack { .. }), "{:?}", r.phase);
    assert!(matches!(
        a[0],
        Action::SetWeights {
            stable_percent: 100,
            ..
        }
    ));
    assert_eq!(a[1], clear_targets(), "{a:?}");

    let mut r = started();
    let a = r
        .apply(Event::Command {
            at_ms: 500,
            command: Command::Abort,
        })
        .unwrap();
    assert_eq!(count(&a, &clear_targets()), 1, "{a:?}");
    // A retry starts at the targets step again.
    let a = r
        .apply(Event::Command {
            at_ms: 600,
            command: Command::Retry,
        })
        .unwrap();
    assert_eq!(count(&a, &set_targets()), 1, "{a:?}");
}

#[test]
fn a_restart_sets_the_rules_again() {
    let mut r = started();
    let a = r.apply(Event::Restored { at_ms: 700 }).unwrap();
    assert_eq!(count(&a, &set_targets()), 1, "{a:?}");
}

#[test]
fn the_spec_needs_targets_with_the_step_and_the_step_with_targets() {
    let mut s = spec();
    s.targets.clear();
    let p = s.validate(&service()).unwrap_err();
    assert!(
        p.iter().any(|m| m.contains("no targets are given")),
        "{p:?}"
    );
    let mut s = canary(&[(50, Pause::For(1000)), (100, Pause::For(1000))]);
    s.targets = vec![cidr("10.0.1.96/28")];
    let p = s.validate(&service()).unwrap_err();
    assert!(
        p.iter().any(|m| m.contains("no targets step uses them")),
        "{p:?}"
    );
    // A targets step later than the first, or with a share, is refused.
    let mut s = spec();
    if let Strategy::Canary { steps } = &mut s.strategy {
        steps.swap(0, 1);
        steps[1].weight_percent = 0;
    }
    let p = s.validate(&service()).unwrap_err();
    assert!(
        p.iter().any(|m| m.contains("it must be the first")),
        "{p:?}"
    );
    let mut s = spec();
    if let Strategy::Canary { steps } = &mut s.strategy {
        steps[0].weight_percent = 5;
    }
    let p = s.validate(&service()).unwrap_err();
    assert!(p.iter().any(|m| m.contains("so it must be 0")), "{p:?}");
    // Targets that clash with the service's own rules.
    let mut svc = service();
    svc.targets.push(crate::target::TargetConfig {
        cidr: cidr("10.0.1.96/28"),
        version: "blue".into(),
    });
    let p = spec().validate(&svc).unwrap_err();
    assert!(
        p.iter()
            .any(|m| m.contains("targets: ") && m.contains("given twice")),
        "{p:?}"
    );
    // The TOML form.
    let s: RolloutSpec = toml::from_str(
        r#"
service = "web"
from = "blue"
to = "green"
targets = ["10.0.1.96/28"]
[strategy]
kind = "canary"
steps = [{ targets = true }, { weight_percent = 5 }, { weight_percent = 100 }]
"#,
    )
    .unwrap();
    s.validate(&service()).unwrap();
    assert!(s.has_targets_step());
}
