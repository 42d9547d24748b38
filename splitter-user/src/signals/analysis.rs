//! The verdict on a canary: its [`Window`] against the baseline's (the
//! stable version over the same time), its external metric, and the
//! [`Criteria`]. This module owns what counts as enough data, which
//! criteria fail, and how the verdict explains itself. Pure: no I/O, no
//! clock; the rollout engine calls [`analyse`] with what it read.
//!
//! ```
//! use splitter::signals::{Counters, analysis::{Criteria, MetricInput, Verdict, analyse}, history::window_of};
//!
//! let canary = window_of(&Counters { attempts: 50, refused: 5, timeouts: 1, ..Counters::default() }, 60.0);
//! let v = analyse(&canary, None, &MetricInput::default(), &Criteria::default());
//! let Verdict::Fail { reason, .. } = v else { panic!() };
//! assert_eq!(reason, "error rate 12.0% (6 of 50 attempts: 5 refused, 1 timeout) is above the limit 5.0%");
//! ```
//!
//! # Rules
//! - Verdicts are ordered `Pass` > `Inconclusive` > `Fail`. Every
//!   configured criterion gives one of them and the verdict is the worst:
//!   any failure fails (all failures are named, the first one's
//!   [`Figures`] kept), else any doubt is `Inconclusive`, else `Pass`.
//! - Enough data: a canary window with fewer than `min_attempts` attempts
//!   (0 reads as 1, so no data is never a pass) is never `Pass`, and its
//!   error rate and latency are not judged, with one exception: a clear
//!   failure of `max_error_rate`, where the errors alone (at most one per
//!   attempt) exceed `max_error_rate × min_attempts`, so the rate would
//!   stay above the limit even if every attempt still needed to reach
//!   `min_attempts` succeeded.
//! - The relative criterion needs a baseline window with `min_attempts`;
//!   without one it is `Inconclusive`.
//! - Latency criteria are judged from the window's bucket increases; with
//!   no latency samples (attempts but no connection established) they are
//!   `Inconclusive`: refusals and timeouts are the error rate's business.
//! - The external metric is judged whenever a bound is configured, also
//!   below `min_attempts` (it counts requests, not connections, so its own
//!   query decides how much data it needs). A reading error or a missing
//!   or non-finite value is `Inconclusive`, never read as a number.
//! - Criteria that do not pass [`Criteria::validate`] give `Inconclusive`
//!   (the reason says why), so a NaN limit never passes or fails anything.
//!
//! These rules make the verdict monotone, which the tests check as
//! properties: more errors never improve it, fewer attempts never turn
//! `Inconclusive` into `Pass`, and no attempts never pass.
use serde::{Deserialize, Serialize};

use super::{MetricReading, Window, history::error_rate, history::latency_quantile_ms};

/// What a canary must show to pass. Every bound is optional except the
/// amount of data; defaults in each field's doc.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Criteria {
    /// Attempts the canary window needs before it can pass (and the
    /// baseline window before it is compared with). Default 20; 0 reads
    /// as 1.
    pub min_attempts: u64,
    /// Highest error rate of the canary, 0..=1 (refused + timeouts +
    /// resets by the backend, over attempts). Default 0.05.
    pub max_error_rate: Option<f64>,
    /// Relative bound: the canary's error rate may be at most the
    /// baseline's times this factor (≥ 1) plus [`Criteria::error_rate_margin`].
    /// Default off.
    pub max_error_rate_factor: Option<f64>,
    /// Added to the relative bound, 0..=1 (0.01 = one percentage point),
    /// so a baseline with no errors still allows a few. Default 0.01.
    pub error_rate_margin: f64,
    /// Highest median connect latency of the canary, in ms. Default off.
    pub max_latency_p50_ms: Option<f64>,
    /// Highest 90th-percentile connect latency, in ms. Default off.
    pub max_latency_p90_ms: Option<f64>,
    /// Highest 99th-percentile connect latency, in ms. Default off.
    pub max_latency_p99_ms: Option<f64>,
    /// Lowest value of the canary's external metric. Default off.
    pub metric_min: Option<f64>,
    /// Highest value of the canary's external metric. Default off.
    pub metric_max: Option<f64>,
}

impl Default for Criteria {
    fn default() -> Self {
        Self {
            min_attempts: 20,
            max_error_rate: Some(0.05),
            max_error_rate_factor: None,
            error_rate_margin: 0.01,
            max_latency_p50_ms: None,
            max_latency_p90_ms: None,
            max_latency_p99_ms: None,
            metric_min: None,
            metric_max: None,
        }
    }
}

impl Criteria {
    /// Checks that every bound is a number in its range: rates and the
    /// margin in 0..=1, the factor at least 1, latencies above 0,
    /// `metric_min` at most `metric_max`.
    ///
    /// # Errors
    /// A sentence naming the first field that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(r) = self.max_error_rate
            && !(0.0..=1.0).contains(&r)
        {
            return Err(format!(
                "max_error_rate = {r} is not a rate between 0 and 1"
            ));
        }
        if let Some(f) = self.max_error_rate_factor
            && !(f.is_finite() && f >= 1.0)
        {
            return Err(format!(
                "max_error_rate_factor = {f} must be a number of at least 1 (1: no worse than the baseline)"
            ));
        }
        if !(0.0..=1.0).contains(&self.error_rate_margin) {
            return Err(format!(
                "error_rate_margin = {} is not a rate between 0 and 1",
                self.error_rate_margin
            ));
        }
        for (name, v) in [
            ("max_latency_p50_ms", self.max_latency_p50_ms),
            ("max_latency_p90_ms", self.max_latency_p90_ms),
            ("max_latency_p99_ms", self.max_latency_p99_ms),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v > 0.0)
            {
                return Err(format!(
                    "{name} = {v} must be a positive number of milliseconds"
                ));
            }
        }
        for (name, v) in [
            ("metric_min", self.metric_min),
            ("metric_max", self.metric_max),
        ] {
            if let Some(v) = v
                && !v.is_finite()
            {
                return Err(format!("{name} = {v} is not a finite number"));
            }
        }
        if let (Some(lo), Some(hi)) = (self.metric_min, self.metric_max)
            && lo > hi
        {
            return Err(format!("metric_min = {lo} is above metric_max = {hi}"));
        }
        Ok(())
    }

    /// Whether an external-metric bound is configured.
    pub fn uses_metric(&self) -> bool {
        self.metric_min.is_some() || self.metric_max.is_some()
    }
}

/// The external metric as the analysis sees it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricInput {
    /// The canary's value (the one judged).
    pub canary: Option<f64>,
    /// The baseline's value (shown in [`Figures`], not judged).
    pub baseline: Option<f64>,
    /// Why the canary's value could not be read; judged metric bounds are
    /// then `Inconclusive`.
    pub error: Option<String>,
}

impl MetricInput {
    /// The input from the last readings of each version: the canary's
    /// error wins over its value; a baseline reading with an error gives
    /// no baseline value.
    pub fn from_readings(canary: Option<&MetricReading>, baseline: Option<&MetricReading>) -> Self {
        let (value, error) = match canary {
            None => (None, None),
            Some(r) => match &r.error {
                Some(e) => (None, Some(e.clone())),
                None => (r.value, None),
            },
        };
        Self {
            canary: value,
            baseline: baseline.filter(|r| r.error.is_none()).and_then(|r| r.value),
            error,
        }
    }
}

/// Which criterion a [`Figures`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// [`Criteria::max_error_rate`].
    ErrorRate,
    /// [`Criteria::max_error_rate_factor`] with the margin.
    RelativeErrorRate,
    /// [`Criteria::max_latency_p50_ms`].
    LatencyP50,
    /// [`Criteria::max_latency_p90_ms`].
    LatencyP90,
    /// [`Criteria::max_latency_p99_ms`].
    LatencyP99,
    /// [`Criteria::metric_min`].
    MetricMin,
    /// [`Criteria::metric_max`].
    MetricMax,
}

/// The numbers behind a failure, for reports and scripts. Every `f64` is
/// finite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// The criterion that failed.
    pub criterion: Criterion,
    /// The canary's value compared (a rate 0..=1, ms, or the metric).
    pub value: f64,
    /// The bound it crossed (same unit).
    pub limit: f64,
    /// The canary window's attempts.
    pub attempts: u64,
    /// Its errors (refused + timeouts + resets by the backend).
    pub errors: u64,
    /// Its error rate (`None` without attempts).
    pub error_rate: Option<f64>,
    /// The baseline window's attempts, if there is one.
    pub baseline_attempts: Option<u64>,
    /// The baseline's error rate, if it has attempts.
    pub baseline_error_rate: Option<f64>,
    /// The canary's 99th-percentile connect latency in ms, if sampled.
    pub latency_p99_ms: Option<f64>,
    /// The canary's external metric, if read.
    pub metric: Option<f64>,
    /// The baseline's external metric, if read.
    pub baseline_metric: Option<f64>,
}

/// The outcome of one analysis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every configured criterion holds on enough data.
    Pass,
    /// At least one criterion is broken.
    Fail {
        /// Every broken criterion, as sentences with the numbers, `; `
        /// apart.
        reason: String,
        /// The numbers of the first one.
        figures: Figures,
    },
    /// Nothing is broken, but something could not be judged.
    Inconclusive {
        /// What could not be judged and why, `; ` apart.
        reason: String,
    },
}

impl Verdict {
    /// `pass`, `fail` or `inconclusive`.
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail { .. } => "fail",
            Verdict::Inconclusive { .. } => "inconclusive",
        }
    }
}

/// The verdict on `canary` (its window) against `baseline` (the stable
/// version's window over the same time, if any), the external `metric`,
/// and `criteria`. See the module's rules.
pub fn analyse(
    canary: &Window,
    baseline: Option<&Window>,
    metric: &MetricInput,
    criteria: &Criteria,
) -> Verdict {
    if let Err(e) = criteria.validate() {
        return Verdict::Inconclusive {
            reason: format!("the criteria are invalid: {e}"),
        };
    }
    let c = Side::of(canary);
    let b = baseline.map(Side::of);
    let min = criteria.min_attempts.max(1);
    let enough = c.attempts >= min;
    let base = Figures {
        criterion: Criterion::ErrorRate,
        value: 0.0,
        limit: 0.0,
        attempts: c.attempts,
        errors: c.errors,
        error_rate: c.rate,
        baseline_attempts: b.as_ref().map(|b| b.attempts),
        baseline_error_rate: b.as_ref().and_then(|b| b.rate),
        latency_p99_ms: latency_quantile_ms(0.99, &canary.latency),
        metric: metric.canary.filter(|v| v.is_finite()),
        baseline_metric: metric.baseline.filter(|v| v.is_finite()),
    };
    let figures = |criterion, value, limit| Figures {
        criterion,
        value,
        limit,
        ..base.clone()
    };
    let mut fails: Vec<(String, Figures)> = Vec::new();
    let mut doubts: Vec<String> = Vec::new();

    if !enough {
        doubts.push(format!(
            "only {} attempt{} in the canary's last {} s; at least {min} are needed",
            c.attempts,
            plural(c.attempts),
            secs(canary.seconds)
        ));
        // A clear failure: the errors alone break the limit over `min`.
        if let Some(max) = criteria.max_error_rate {
            let counted = c.errors.min(c.attempts);
            let at_least = counted as f64 / min as f64;
            if at_least > max {
                let (r, l) = pct_pair(c.rate.unwrap_or(0.0), max);
                fails.push((
                    format!(
                        "error rate {r} ({}) is above the limit {l}, and would still be {} if all {} more attempts needed to reach {min} succeeded",
                        c.breakdown(),
                        pct(at_least),
                        min - c.attempts
                    ),
                    figures(Criterion::ErrorRate, at_least, max),
                ));
            }
        }
    } else {
        let rate = c.rate.unwrap_or(0.0);
        if let Some(max) = criteria.max_error_rate
            && rate > max
        {
            let (r, l) = pct_pair(rate, max);
            fails.push((
                format!("error rate {r} ({}) is above the limit {l}", c.breakdown()),
                figures(Criterion::ErrorRate, rate, max),
            ));
        }
        if let Some(factor) = criteria.max_error_rate_factor {
            match &b {
                None => doubts.push(
                    "no baseline window to compare the canary's error rate with".to_string(),
                ),
                Some(b) if b.attempts < min => doubts.push(format!(
                    "the baseline has only {} attempt{} in its window; at least {min} are needed to compare error rates",
                    b.attempts,
                    plural(b.attempts)
                )),
                Some(b) => {
                    let b_rate = b.rate.unwrap_or(0.0);
                    let limit = (b_rate * factor + criteria.error_rate_margin).min(1.0);
                    if rate > limit {
                        let (r, l) = pct_pair(rate, limit);
                        fails.push((
                            format!(
                                "error rate {r} ({}) is above {factor} × the baseline's {} ({}) + {:.1} points = {l}",
                                c.breakdown(),
                                pct(b_rate),
                                b.breakdown(),
                                criteria.error_rate_margin * 100.0
                            ),
                            figures(Criterion::RelativeErrorRate, rate, limit),
                        ));
                    }
                }
            }
        }
        for (q, name, criterion, max) in [
            (
                0.5,
                "p50",
                Criterion::LatencyP50,
                criteria.max_latency_p50_ms,
            ),
            (
                0.9,
                "p90",
                Criterion::LatencyP90,
                criteria.max_latency_p90_ms,
            ),
            (
                0.99,
                "p99",
                Criterion::LatencyP99,
                criteria.max_latency_p99_ms,
            ),
        ] {
            let Some(max) = max else {
                continue;
            };
            let samples: u64 = canary.latency.iter().fold(0, |a, &n| a.saturating_add(n));
            match latency_quantile_ms(q, &canary.latency) {
                None => doubts.push(format!(
                    "no connect-latency samples to judge the {name} latency ({} of {} attempts established)",
                    canary.established, c.attempts
                )),
                Some(v) if v > max => fails.push((
                    format!(
                        "{name} connect latency {v:.1} ms ({samples} sample{}) is above the limit {max:.1} ms",
                        plural(samples)
                    ),
                    figures(criterion, v, max),
                )),
                Some(_) => {}
            }
        }
    }

    if criteria.uses_metric() {
        match (&metric.error, metric.canary) {
            (Some(e), _) => doubts.push(format!("the external metric could not be read: {e}")),
            (None, None) => doubts.push("the external metric has no value for the canary".into()),
            (None, Some(v)) if !v.is_finite() => doubts.push(format!(
                "the external metric's value {v} is not a finite number"
            )),
            (None, Some(v)) => {
                if let Some(lo) = criteria.metric_min
                    && v < lo
                {
                    fails.push((
                        format!("the external metric {v} is below the minimum {lo}"),
                        figures(Criterion::MetricMin, v, lo),
                    ));
                }
                if let Some(hi) = criteria.metric_max
                    && v > hi
                {
                    fails.push((
                        format!("the external metric {v} is above the maximum {hi}"),
                        figures(Criterion::MetricMax, v, hi),
                    ));
                }
            }
        }
    }

    let mut fails = fails.into_iter();
    if let Some((first, figures)) = fails.next() {
        let reason = std::iter::once(first)
            .chain(fails.map(|(r, _)| r))
            .collect::<Vec<_>>()
            .join("; ");
        return Verdict::Fail { reason, figures };
    }
    if !doubts.is_empty() {
        return Verdict::Inconclusive {
            reason: doubts.join("; "),
        };
    }
    Verdict::Pass
}

/// The error figures of one window, recomputed from its counts (so a
/// hand-made window's fields cannot bring a NaN in).
struct Side {
    attempts: u64,
    errors: u64,
    refused: u64,
    timeouts: u64,
    resets: u64,
    rate: Option<f64>,
}

impl Side {
    fn of(w: &Window) -> Self {
        let errors = w
            .refused
            .saturating_add(w.timeouts)
            .saturating_add(w.reset_by_backend);
        Self {
            attempts: w.attempts,
            errors,
            refused: w.refused,
            timeouts: w.timeouts,
            resets: w.reset_by_backend,
            rate: error_rate(w.attempts, errors),
        }
    }

    /// "6 of 50 attempts: 5 refused, 1 timeout".
    fn breakdown(&self) -> String {
        let mut parts = Vec::new();
        if self.refused > 0 {
            parts.push(format!("{} refused", self.refused));
        }
        if self.timeouts > 0 {
            parts.push(format!(
                "{} timeout{}",
                self.timeouts,
                plural(self.timeouts)
            ));
        }
        if self.resets > 0 {
            let s = if self.resets == 1 { "reset" } else { "resets" };
            parts.push(format!("{} {s} by the backend", self.resets));
        }
        let head = if self.errors <= self.attempts {
            format!(
                "{} of {} attempt{}",
                self.errors,
                self.attempts,
                plural(self.attempts)
            )
        } else {
            format!(
                "{} errors in {} attempt{}",
                self.errors,
                self.attempts,
                plural(self.attempts)
            )
        };
        if parts.is_empty() {
            head
        } else {
            format!("{head}: {}", parts.join(", "))
        }
    }
}

/// "s" unless `n` is 1.
fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Seconds for a sentence, whole.
fn secs(s: f64) -> String {
    format!("{:.0}", if s.is_finite() { s } else { 0.0 })
}

/// A rate as a percentage with one decimal.
fn pct(r: f64) -> String {
    format!("{:.1}%", r * 100.0)
}

/// A value and its limit as percentages, with enough decimals (up to 4)
/// that a value above its limit does not read as equal to it.
fn pct_pair(value: f64, limit: f64) -> (String, String) {
    let mut digits = 1;
    loop {
        let (v, l) = (
            format!("{:.*}%", digits, value * 100.0),
            format!("{:.*}%", digits, limit * 100.0),
        );
        if v != l || digits >= 4 {
            return (v, l);
        }
        digits += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use splitter_common::LATENCY_BUCKETS;

    use super::*;
    use crate::signals::{Counters, history::window_of};

    /// A 60 s window of `attempts`, with `refused`, `timeouts` and
    /// `resets`, the rest established with latencies in bucket 4 (1-2.5 ms).
    fn win(attempts: u64, refused: u64, timeouts: u64, resets: u64) -> Window {
        let established = attempts.saturating_sub(refused + timeouts);
        let mut latency = [0; LATENCY_BUCKETS];
        latency[4] = established;
        window_of(
            &Counters {
                attempts,
                established,
                refused,
                timeouts,
                reset_by_backend: resets,
                latency,
                ..Counters::default()
            },
            60.0,
        )
    }

    fn no_metric() -> MetricInput {
        MetricInput::default()
    }

    fn only_errors() -> Criteria {
        Criteria::default()
    }

    fn why(v: &Verdict) -> &str {
        match v {
            Verdict::Pass => "",
            Verdict::Fail { reason, .. } | Verdict::Inconclusive { reason } => reason,
        }
    }

    /// Pass > Inconclusive > Fail.
    fn rank(v: &Verdict) -> u8 {
        match v {
            Verdict::Pass => 2,
            Verdict::Inconclusive { .. } => 1,
            Verdict::Fail { .. } => 0,
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Criteria::default();
        assert_eq!(c.min_attempts, 20);
        assert_eq!(c.max_error_rate, Some(0.05));
        assert_eq!(c.max_error_rate_factor, None);
        assert_eq!(c.error_rate_margin, 0.01);
        assert!(c.max_latency_p99_ms.is_none() && !c.uses_metric());
        assert_eq!(c.validate(), Ok(()));
        let parsed: Criteria = toml::from_str("").unwrap();
        assert_eq!(parsed, c);
        let parsed: Criteria =
            toml::from_str("min_attempts = 50\nmax_latency_p99_ms = 250.0\nmetric_max = 0.01")
                .unwrap();
        assert_eq!(parsed.min_attempts, 50);
        assert_eq!(parsed.max_latency_p99_ms, Some(250.0));
        assert_eq!(parsed.max_error_rate, Some(0.05));
        assert!(toml::from_str::<Criteria>("max_errors = 1").is_err());
    }

    #[test]
    fn validate_names_the_field() {
        let bad = [
            (
                Criteria {
                    max_error_rate: Some(1.5),
                    ..Criteria::default()
                },
                "max_error_rate = 1.5",
            ),
            (
                Criteria {
                    max_error_rate: Some(f64::NAN),
                    ..Criteria::default()
                },
                "max_error_rate = NaN",
            ),
            (
                Criteria {
                    max_error_rate_factor: Some(0.5),
                    ..Criteria::default()
                },
                "max_error_rate_factor = 0.5",
            ),
            (
                Criteria {
                    max_error_rate_factor: Some(f64::INFINITY),
                    ..Criteria::default()
                },
                "max_error_rate_factor = inf",
            ),
            (
                Criteria {
                    error_rate_margin: -0.1,
                    ..Criteria::default()
                },
                "error_rate_margin = -0.1",
            ),
            (
                Criteria {
                    max_latency_p90_ms: Some(0.0),
                    ..Criteria::default()
                },
                "max_latency_p90_ms = 0",
            ),
            (
                Criteria {
                    metric_min: Some(f64::NAN),
                    ..Criteria::default()
                },
                "metric_min = NaN",
            ),
            (
                Criteria {
                    metric_min: Some(2.0),
                    metric_max: Some(1.0),
                    ..Criteria::default()
                },
                "metric_min = 2 is above metric_max = 1",
            ),
        ];
        for (c, want) in bad {
            let e = c.validate().unwrap_err();
            assert!(e.contains(want), "{e:?} should name {want:?}");
        }
        let ok = Criteria {
            max_error_rate: Some(0.0),
            max_error_rate_factor: Some(1.0),
            error_rate_margin: 0.0,
            max_latency_p50_ms: Some(1.0),
            metric_min: Some(1.0),
            metric_max: Some(1.0),
            ..Criteria::default()
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn invalid_criteria_are_inconclusive() {
        let c = Criteria {
            max_error_rate: Some(f64::NAN),
            ..Criteria::default()
        };
        let v = analyse(&win(1000, 1000, 0, 0), None, &no_metric(), &c);
        assert_eq!(v.name(), "inconclusive");
        assert!(why(&v).starts_with("the criteria are invalid: max_error_rate = NaN"));
    }

    #[test]
    fn enough_clean_attempts_pass() {
        assert_eq!(
            analyse(&win(100, 0, 0, 0), None, &no_metric(), &only_errors()),
            Verdict::Pass
        );
        // Exactly at the limit passes.
        assert_eq!(
            analyse(&win(100, 5, 0, 0), None, &no_metric(), &only_errors()),
            Verdict::Pass
        );
        assert_eq!(
            analyse(&win(20, 0, 0, 0), None, &no_metric(), &only_errors()),
            Verdict::Pass
        );
    }

    #[test]
    fn error_rate_above_the_limit_fails_with_the_numbers() {
        let v = analyse(&win(50, 5, 1, 0), None, &no_metric(), &only_errors());
        let Verdict::Fail { reason, figures } = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            reason,
            "error rate 12.0% (6 of 50 attempts: 5 refused, 1 timeout) is above the limit 5.0%"
        );
        assert_eq!(figures.criterion, Criterion::ErrorRate);
        assert_eq!((figures.value, figures.limit), (0.12, 0.05));
        assert_eq!((figures.attempts, figures.errors), (50, 6));
        assert!((figures.latency_p99_ms.unwrap() - 2.485).abs() < 1e-9);
        let v = analyse(&win(100, 0, 2, 7), None, &no_metric(), &only_errors());
        assert_eq!(
            why(&v),
            "error rate 9.0% (9 of 100 attempts: 2 timeouts, 7 resets by the backend) is above the limit 5.0%"
        );
    }

    #[test]
    fn a_rate_just_above_the_limit_does_not_read_as_equal() {
        let v = analyse(&win(10_000, 501, 0, 0), None, &no_metric(), &only_errors());
        assert!(why(&v).starts_with("error rate 5.01% ("), "{v:?}");
        assert!(why(&v).ends_with("the limit 5.00%"), "{v:?}");
    }

    #[test]
    fn resets_of_older_connections_cap_the_rate_at_one() {
        let v = analyse(&win(20, 0, 0, 45), None, &no_metric(), &only_errors());
        let Verdict::Fail { reason, figures } = v else {
            panic!()
        };
        assert_eq!(figures.value, 1.0);
        assert!(
            reason.contains("(45 errors in 20 attempts: 45 resets by the backend)"),
            "{reason}"
        );
    }

    #[test]
    fn too_few_attempts_are_inconclusive() {
        let v = analyse(&win(19, 0, 0, 0), None, &no_metric(), &only_errors());
        assert_eq!(
            v,
            Verdict::Inconclusive {
                reason: "only 19 attempts in the canary's last 60 s; at least 20 are needed".into()
            }
        );
        // Some errors, but not enough to be sure: 1 of 20 would be 5%.
        let v = analyse(&win(10, 1, 0, 0), None, &no_metric(), &only_errors());
        assert_eq!(v.name(), "inconclusive");
    }

    #[test]
    fn no_attempts_are_inconclusive_even_with_min_attempts_zero() {
        let c = Criteria {
            min_attempts: 0,
            max_error_rate: Some(0.0),
            ..Criteria::default()
        };
        let v = analyse(&win(0, 0, 0, 0), None, &no_metric(), &c);
        assert!(why(&v).starts_with("only 0 attempts"), "{v:?}");
        // Resets of older connections are not attempts.
        let v = analyse(&win(0, 0, 0, 9), None, &no_metric(), &c);
        assert_eq!(v.name(), "inconclusive");
        let v = analyse(&win(1, 0, 0, 0), None, &no_metric(), &c);
        assert_eq!(v, Verdict::Pass);
    }

    #[test]
    fn a_clear_failure_fails_below_min_attempts() {
        // 2 errors in 5 attempts: even with 15 more successes, 2/20 = 10% > 5%.
        let v = analyse(&win(5, 2, 0, 0), None, &no_metric(), &only_errors());
        let Verdict::Fail { reason, figures } = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            reason,
            "error rate 40.0% (2 of 5 attempts: 2 refused) is above the limit 5.0%, and would still be 10.0% if all 15 more attempts needed to reach 20 succeeded"
        );
        assert_eq!((figures.value, figures.limit), (0.1, 0.05));
        // 1 error in 5: 1/20 = 5%, not above: wait for more data.
        let v = analyse(&win(5, 1, 0, 0), None, &no_metric(), &only_errors());
        assert_eq!(v.name(), "inconclusive");
        // Resets beyond the attempts do not count towards a clear failure.
        let v = analyse(&win(1, 0, 0, 30), None, &no_metric(), &only_errors());
        assert_eq!(v.name(), "inconclusive");
    }

    fn relative() -> Criteria {
        Criteria {
            max_error_rate: None,
            max_error_rate_factor: Some(2.0),
            error_rate_margin: 0.01,
            ..Criteria::default()
        }
    }

    #[test]
    fn relative_error_rate_against_the_baseline() {
        let base = win(1000, 20, 0, 0); // 2%
        // Limit 2% × 2 + 1 point = 5%.
        assert_eq!(
            analyse(&win(100, 5, 0, 0), Some(&base), &no_metric(), &relative()),
            Verdict::Pass
        );
        let v = analyse(&win(100, 6, 0, 0), Some(&base), &no_metric(), &relative());
        let Verdict::Fail { reason, figures } = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            reason,
            "error rate 6.0% (6 of 100 attempts: 6 refused) is above 2 × the baseline's 2.0% (20 of 1000 attempts: 20 refused) + 1.0 points = 5.0%"
        );
        assert_eq!(figures.criterion, Criterion::RelativeErrorRate);
        assert_eq!(
            (figures.baseline_attempts, figures.baseline_error_rate),
            (Some(1000), Some(0.02))
        );
        assert!((figures.limit - 0.05).abs() < 1e-12);
        // A clean baseline still allows the margin.
        let clean = win(1000, 0, 0, 0);
        assert_eq!(
            analyse(&win(100, 1, 0, 0), Some(&clean), &no_metric(), &relative()),
            Verdict::Pass
        );
        assert_eq!(
            analyse(&win(100, 2, 0, 0), Some(&clean), &no_metric(), &relative()).name(),
            "fail"
        );
    }

    #[test]
    fn relative_error_rate_needs_a_baseline_with_enough_attempts() {
        let v = analyse(&win(100, 0, 0, 0), None, &no_metric(), &relative());
        assert_eq!(
            v,
            Verdict::Inconclusive {
                reason: "no baseline window to compare the canary's error rate with".into()
            }
        );
        let v = analyse(
            &win(100, 0, 0, 0),
            Some(&win(3, 0, 0, 0)),
            &no_metric(),
            &relative(),
        );
        assert_eq!(
            why(&v),
            "the baseline has only 3 attempts in its window; at least 20 are needed to compare error rates"
        );
        // An absolute failure still fails.
        let c = Criteria {
            max_error_rate: Some(0.05),
            ..relative()
        };
        assert_eq!(
            analyse(&win(100, 50, 0, 0), None, &no_metric(), &c).name(),
            "fail"
        );
    }

    #[test]
    fn latency_above_the_limit_fails() {
        let c = Criteria {
            max_latency_p99_ms: Some(2.0),
            ..Criteria::default()
        };
        let v = analyse(&win(100, 0, 0, 0), None, &no_metric(), &c);
        let Verdict::Fail { reason, figures } = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            reason,
            "p99 connect latency 2.5 ms (100 samples) is above the limit 2.0 ms"
        );
        assert_eq!(figures.criterion, Criterion::LatencyP99);
        let c = Criteria {
            max_latency_p50_ms: Some(2.0),
            max_latency_p90_ms: Some(3.0),
            ..Criteria::default()
        };
        assert_eq!(
            analyse(&win(100, 0, 0, 0), None, &no_metric(), &c),
            Verdict::Pass
        );
        let c = Criteria {
            max_latency_p50_ms: Some(1.5),
            ..Criteria::default()
        };
        let v = analyse(&win(100, 0, 0, 0), None, &no_metric(), &c);
        assert!(why(&v).starts_with("p50 connect latency 1.8 ms"), "{v:?}");
    }

    #[test]
    fn latency_without_samples_is_inconclusive() {
        let c = Criteria {
            max_error_rate: None,
            max_latency_p99_ms: Some(100.0),
            ..Criteria::default()
        };
        // Every attempt timed out: no latency; the error rate would judge.
        let v = analyse(&win(100, 0, 100, 0), None, &no_metric(), &c);
        assert_eq!(
            why(&v),
            "no connect-latency samples to judge the p99 latency (0 of 100 attempts established)"
        );
        assert_eq!(v.name(), "inconclusive");
        let c = Criteria {
            max_latency_p99_ms: Some(100.0),
            ..Criteria::default()
        };
        assert_eq!(
            analyse(&win(100, 0, 100, 0), None, &no_metric(), &c).name(),
            "fail"
        );
    }

    #[test]
    fn latency_is_not_judged_below_min_attempts() {
        let mut w = win(5, 0, 0, 0);
        w.latency = [0; LATENCY_BUCKETS];
        w.latency[LATENCY_BUCKETS - 1] = 5;
        let c = Criteria {
            max_latency_p99_ms: Some(1.0),
            ..Criteria::default()
        };
        assert_eq!(analyse(&w, None, &no_metric(), &c).name(), "inconclusive");
    }

    fn metric_bounds() -> Criteria {
        Criteria {
            metric_min: Some(0.99),
            metric_max: Some(1.0),
            ..Criteria::default()
        }
    }

    fn metric(v: Option<f64>, error: Option<&str>) -> MetricInput {
        MetricInput {
            canary: v,
            baseline: Some(0.999),
            error: error.map(Into::into),
        }
    }

    #[test]
    fn external_metric_bounds() {
        let w = win(100, 0, 0, 0);
        assert_eq!(
            analyse(&w, None, &metric(Some(0.995), None), &metric_bounds()),
            Verdict::Pass
        );
        let v = analyse(&w, None, &metric(Some(0.9), None), &metric_bounds());
        let Verdict::Fail { reason, figures } = v else {
            panic!("{v:?}")
        };
        assert_eq!(reason, "the external metric 0.9 is below the minimum 0.99");
        assert_eq!(figures.criterion, Criterion::MetricMin);
        assert_eq!(
            (figures.metric, figures.baseline_metric),
            (Some(0.9), Some(0.999))
        );
        let v = analyse(&w, None, &metric(Some(1.5), None), &metric_bounds());
        assert_eq!(why(&v), "the external metric 1.5 is above the maximum 1");
        // Judged below min_attempts too, but never a pass there.
        assert_eq!(
            analyse(
                &win(3, 0, 0, 0),
                None,
                &metric(Some(0.5), None),
                &metric_bounds()
            )
            .name(),
            "fail"
        );
        assert_eq!(
            analyse(
                &win(3, 0, 0, 0),
                None,
                &metric(Some(0.995), None),
                &metric_bounds()
            )
            .name(),
            "inconclusive"
        );
    }

    #[test]
    fn external_metric_errors_are_never_read_as_numbers() {
        let w = win(100, 0, 0, 0);
        let v = analyse(
            &w,
            None,
            &metric(Some(0.1), Some("connection refused")),
            &metric_bounds(),
        );
        assert_eq!(
            v,
            Verdict::Inconclusive {
                reason: "the external metric could not be read: connection refused".into()
            }
        );
        let v = analyse(&w, None, &metric(None, None), &metric_bounds());
        assert_eq!(why(&v), "the external metric has no value for the canary");
        let v = analyse(&w, None, &metric(Some(f64::NAN), None), &metric_bounds());
        assert_eq!(
            why(&v),
            "the external metric's value NaN is not a finite number"
        );
        let v = analyse(
            &w,
            None,
            &metric(Some(f64::INFINITY), None),
            &metric_bounds(),
        );
        assert_eq!(v.name(), "inconclusive");
        // Without bounds the metric is not judged.
        assert_eq!(
            analyse(&w, None, &metric(None, Some("down")), &Criteria::default()),
            Verdict::Pass
        );
    }

    #[test]
    fn metric_input_from_readings() {
        let ok = MetricReading {
            value: Some(0.5),
            ..MetricReading::default()
        };
        let bad = MetricReading {
            value: Some(0.7),
            error: Some("bad PromQL".into()),
            ..MetricReading::default()
        };
        let m = MetricInput::from_readings(Some(&ok), Some(&bad));
        assert_eq!(
            m,
            MetricInput {
                canary: Some(0.5),
                baseline: None,
                error: None
            }
        );
        let m = MetricInput::from_readings(Some(&bad), Some(&ok));
        assert_eq!(
            m,
            MetricInput {
                canary: None,
                baseline: Some(0.5),
                error: Some("bad PromQL".into())
            }
        );
        assert_eq!(
            MetricInput::from_readings(None, None),
            MetricInput::default()
        );
    }

    #[test]
    fn failures_win_over_doubts_and_are_all_named() {
        let c = Criteria {
            max_latency_p99_ms: Some(1.0),
            ..metric_bounds()
        };
        let v = analyse(
            &win(100, 10, 0, 0),
            None,
            &metric(None, Some("timeout")),
            &c,
        );
        let Verdict::Fail { reason, figures } = v else {
            panic!("{v:?}")
        };
        assert_eq!(figures.criterion, Criterion::ErrorRate);
        assert!(reason.starts_with("error rate 10.0%"), "{reason}");
        assert!(reason.contains("; p99 connect latency"), "{reason}");
        assert!(
            !reason.contains("timeout"),
            "doubts are not failures: {reason}"
        );
        // Two doubts are both named.
        let c = Criteria {
            max_error_rate_factor: Some(1.5),
            ..metric_bounds()
        };
        let v = analyse(&win(100, 0, 0, 0), None, &metric(None, Some("timeout")), &c);
        assert_eq!(
            why(&v),
            "no baseline window to compare the canary's error rate with; the external metric could not be read: timeout"
        );
    }

    #[test]
    fn verdicts_serialize_with_a_tag() {
        let v = analyse(&win(50, 5, 1, 0), None, &no_metric(), &only_errors());
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["verdict"], "fail");
        assert_eq!(json["figures"]["criterion"], "error_rate");
        assert_eq!(json["figures"]["attempts"], 50);
        assert_eq!(serde_json::from_value::<Verdict>(json).unwrap(), v);
        assert_eq!(
            serde_json::to_value(Verdict::Pass).unwrap(),
            serde_json::json!({"verdict": "pass"})
        );
    }

    #[test]
    fn hand_made_windows_cannot_bring_nan_in() {
        let mut w = win(100, 0, 0, 0);
        w.error_rate = Some(f64::NAN);
        w.latency_p99_ms = Some(f64::NAN);
        w.seconds = f64::NAN;
        let c = Criteria {
            max_latency_p99_ms: Some(1000.0),
            ..Criteria::default()
        };
        assert_eq!(analyse(&w, None, &no_metric(), &c), Verdict::Pass);
        w.attempts = 3;
        assert!(why(&analyse(&w, None, &no_metric(), &c)).contains("last 0 s"));
    }

    /// Windows built as the history builds them.
    fn window() -> impl Strategy<Value = Window> {
        (
            0u64..400,
            0u64..100,
            0u64..100,
            0u64..60,
            any::<[u8; LATENCY_BUCKETS]>(),
            1u32..600,
        )
            .prop_map(|(attempts, refused, timeouts, resets, lat, secs)| {
                let refused = refused.min(attempts);
                let timeouts = timeouts.min(attempts - refused);
                window_of(
                    &Counters {
                        attempts,
                        established: attempts - refused - timeouts,
                        refused,
                        timeouts,
                        reset_by_backend: resets,
                        latency: lat.map(u64::from),
                        ..Counters::default()
                    },
                    f64::from(secs),
                )
            })
    }

    fn criteria() -> impl Strategy<Value = Criteria> {
        (
            0u64..60,
            prop::option::of(0.0f64..=1.0),
            prop::option::of(1.0f64..4.0),
            0.0f64..0.1,
            prop::option::of(0.05f64..3000.0),
            prop::option::of(0.05f64..3000.0),
            prop::option::of(-1.0f64..1.0),
            prop::option::of(0.0f64..2.0),
        )
            .prop_map(|(min, max, factor, margin, p50, p99, lo, hi)| Criteria {
                min_attempts: min,
                max_error_rate: max,
                max_error_rate_factor: factor,
                error_rate_margin: margin,
                max_latency_p50_ms: p50,
                max_latency_p90_ms: None,
                max_latency_p99_ms: p99,
                metric_min: lo,
                metric_max: hi.map(|h| lo.map_or(h, |l| l + h)),
            })
    }

    fn metric_input() -> impl Strategy<Value = MetricInput> {
        (
            prop::option::of(prop_oneof![-2.0f64..2.0, Just(f64::NAN)]),
            prop::option::of(-2.0f64..2.0),
            prop::option::of(Just("unreachable".to_string())),
        )
            .prop_map(|(canary, baseline, error)| MetricInput {
                canary,
                baseline,
                error,
            })
    }

    /// `w` with its counts scaled by `k` (0..=1), rounded down.
    fn scaled(w: &Window, k: f64) -> Window {
        let s = |n: u64| (n as f64 * k).floor() as u64;
        window_of(
            &Counters {
                attempts: s(w.attempts),
                established: s(w.established),
                refused: s(w.refused),
                timeouts: s(w.timeouts),
                reset_by_backend: s(w.reset_by_backend),
                reset_by_client: s(w.reset_by_client),
                latency: w.latency.map(s),
                ..Counters::default()
            },
            w.seconds,
        )
    }

    fn finite_figures(v: &Verdict) -> bool {
        match v {
            Verdict::Fail { figures: f, .. } => {
                f.value.is_finite()
                    && f.limit.is_finite()
                    && [
                        f.error_rate,
                        f.baseline_error_rate,
                        f.latency_p99_ms,
                        f.metric,
                        f.baseline_metric,
                    ]
                    .iter()
                    .flatten()
                    .all(|x| x.is_finite())
            }
            _ => true,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn more_errors_never_improve_the_verdict(
            w in window(),
            base in prop::option::of(window()),
            m in metric_input(),
            c in criteria(),
            more in (0u64..50, 0u64..50, 0u64..50),
        ) {
            let before = analyse(&w, base.as_ref(), &m, &c);
            let mut worse = w.clone();
            worse.refused += more.0;
            worse.timeouts += more.1;
            worse.reset_by_backend += more.2;
            let after = analyse(&worse, base.as_ref(), &m, &c);
            prop_assert!(rank(&after) <= rank(&before), "{:?} -> {:?}", before, after);
        }

        #[test]
        fn fewer_attempts_never_turn_inconclusive_into_pass(
            w in window(),
            base in prop::option::of(window()),
            m in metric_input(),
            c in criteria(),
            k in 0.0f64..=1.0,
        ) {
            let before = analyse(&w, base.as_ref(), &m, &c);
            let after = analyse(&scaled(&w, k), base.as_ref(), &m, &c);
            if before.name() == "inconclusive" {
                prop_assert!(after.name() != "pass", "{:?} -> {:?}", before, after);
            }
        }

        #[test]
        fn no_attempts_never_pass(
            w in window(),
            base in prop::option::of(window()),
            m in metric_input(),
            c in criteria(),
        ) {
            let mut none = w.clone();
            none.attempts = 0;
            prop_assert!(analyse(&none, base.as_ref(), &m, &c).name() != "pass");
        }

        #[test]
        fn verdicts_are_deterministic_and_free_of_nan(
            w in window(),
            base in prop::option::of(window()),
            m in metric_input(),
            c in criteria(),
        ) {
            let v = analyse(&w, base.as_ref(), &m, &c);
            prop_assert_eq!(&v, &analyse(&w.clone(), base.clone().as_ref(), &m.clone(), &c.clone()));
            prop_assert!(finite_figures(&v));
        }
    }
}
