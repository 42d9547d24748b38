//! `splitter rollout ...`: start a rollout and steer it, and watch it from
//! a terminal or a CI job (`status --watch` exits 0 when it completes, 1
//! when it is aborted or rolled back, 4 on `--timeout`, 3 when the daemon
//! cannot be reached).
use std::{fmt::Write as _, io::IsTerminal as _, path::Path, time::Duration};

use hyper::Method;

use super::{CliError, Output};
use crate::{client, report::RolloutReport};

/// Width of the progress bar in cells.
const BAR: usize = 24;

/// One frame of `rollout status` for people: a few lines that a terminal
/// redraws in place.
pub fn render(r: &RolloutReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rollout {}: {} {} -> {}   {}",
        r.service,
        r.strategy,
        r.from,
        r.to,
        r.state.to_uppercase()
    );
    let filled = (r.target_percent.min(100) as usize * BAR).div_ceil(100);
    let _ = writeln!(
        out,
        "step {}/{}  [{}{}] {:>3}% to {}   {} in step",
        r.step,
        r.steps,
        "#".repeat(filled),
        ".".repeat(BAR - filled),
        r.target_percent,
        r.to,
        clock(r.step_elapsed_secs)
    );
    let weights: Vec<String> = r.weights.iter().map(|(v, w)| format!("{v}={w}")).collect();
    let _ = writeln!(out, "weights  {}", weights.join(" "));
    let _ = writeln!(out, "phase    {}", r.phase);
    if !r.finished() {
        let _ = writeln!(out, "waiting  {}", r.waiting_for);
    }
    if let Some(reason) = &r.reason {
        let _ = writeln!(out, "reason   {reason}");
    }
    if !r.signals.is_empty() {
        let _ = writeln!(out, "{:<12} {:>8} {:>8} {:>10}", "VERSION", "NEW/S", "ERRORS", "P99");
        for s in &r.signals {
            let _ = writeln!(
                out,
                "{:<12} {:>8.1} {:>8} {:>10}",
                s.version,
                s.new_flows_per_sec,
                s.error_rate
                    .map_or("-".to_string(), |e| format!("{:.1}%", 100.0 * e)),
                s.latency_p99_ms
                    .map_or("-".to_string(), |l| format!("{l:.2}ms"))
            );
        }
    }
    if !r.verdicts.is_empty() {
        let last: Vec<String> = r
            .verdicts
            .iter()
            .rev()
            .take(6)
            .rev()
            .map(|v| format!("step{} {}", v.step, v.verdict))
            .collect();
        let _ = writeln!(out, "verdicts {}", last.join(", "));
        if let Some(v) = r.verdicts.last()
            && let Some(reason) = &v.reason
        {
            let _ = writeln!(out, "         last: {reason}");
        }
    }
    out
}

/// `m:ss`.
fn clock(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{}:{:02}", s / 60, s % 60)
}

/// One line for logs and CI: what changed, with the time.
pub fn line(r: &RolloutReport) -> String {
    let weights: Vec<String> = r.weights.iter().map(|(v, w)| format!("{v}={w}")).collect();
    let mut l = format!(
        "{} {} step {}/{} {}% [{}] {}",
        r.service,
        r.state,
        r.step,
        r.steps,
        r.target_percent,
        weights.join(" "),
        r.phase
    );
    if let Some(v) = r.verdicts.last() {
        let _ = write!(l, "; last analysis: {}", v.verdict);
    }
    if let Some(reason) = &r.reason {
        let _ = write!(l, "; {reason}");
    }
    l
}

/// What `status --watch` ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The rollout completed (exit 0).
    Completed,
    /// Aborted or rolled back (exit 1).
    Failed,
    /// `--timeout` passed first (exit 4).
    TimedOut,
}

/// The exit code of a finished watch.
pub fn exit_code(end: WatchEnd) -> u8 {
    match end {
        WatchEnd::Completed => 0,
        WatchEnd::Failed => 1,
        WatchEnd::TimedOut => 4,
    }
}

/// How a report ends a watch, if it does.
pub fn watch_end(r: &RolloutReport) -> Option<WatchEnd> {
    match r.state.as_str() {
        "completed" => Some(WatchEnd::Completed),
        "aborted" | "rolled-back" => Some(WatchEnd::Failed),
        _ => None,
    }
}

async fn fetch(socket: &Path, service: &str) -> Result<(RolloutReport, Vec<u8>), CliError> {
    let path = format!("/v1/rollouts/{}", super::edit::seg("service", service)?);
    let bytes = client::request(socket, Method::GET, &path, None).await?;
    let r = serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
    Ok((r, bytes.to_vec()))
}

/// `splitter rollout status SERVICE [--watch] [--timeout D]`: prints the
/// report once, or follows it until it ends (redrawn in place on a
/// terminal, one line per change otherwise, JSON lines with `--output
/// json`). Returns how a watch ended (`None` without `--watch`).
pub async fn status(
    socket: &Path,
    service: &str,
    output: Output,
    watch: bool,
    timeout: Option<Duration>,
) -> Result<Option<WatchEnd>, CliError> {
    let (r, bytes) = fetch(socket, service).await?;
    if !watch {
        match output {
            Output::Json => print!("{}", String::from_utf8_lossy(&bytes)),
            Output::Table => print!("{}", render(&r)),
        }
        return Ok(None);
    }
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let tty = std::io::stdout().is_terminal() && output == Output::Table;
    let mut last_line = String::new();
    let mut drawn_lines = 0usize;
    let mut report = r;
    loop {
        match output {
            Output::Json => {
                let compact =
                    serde_json::to_string(&report).map_err(|e| CliError::Other(e.into()))?;
                if compact != last_line {
                    println!("{compact}");
                    last_line = compact;
                }
            }
            Output::Table if tty => {
                let frame = render(&report);
                // Up over the last frame and clear it, then draw anew.
                if drawn_lines > 0 {
                    print!("\x1b[{drawn_lines}A\x1b[J");
                }
                print!("{frame}");
                drawn_lines = frame.lines().count();
            }
            Output::Table => {
                let l = line(&report);
                if l != last_line {
                    println!("{l}");
                    last_line = l;
                }
            }
        }
        if let Some(end) = watch_end(&report) {
            return Ok(Some(end));
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            eprintln!(
                "rollout of {service} still {} after --timeout: {}",
                report.state, report.waiting_for
            );
            return Ok(Some(WatchEnd::TimedOut));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        report = fetch(socket, service).await?.0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::report::{VerdictLine, VersionLine};

    fn report(state: &str) -> RolloutReport {
        RolloutReport {
            service: "web".into(),
            from: "blue".into(),
            to: "green".into(),
            strategy: "canary".into(),
            state: state.into(),
            phase: "step 3 of 5: 25% for 60s".into(),
            step: 3,
            steps: 5,
            target_percent: 25,
            weights: BTreeMap::from([("blue".into(), 75), ("green".into(), 25)]),
            waiting_for: "the step's pause (18s left) and a passing analysis".into(),
            step_elapsed_secs: 42.0,
            reason: None,
            verdicts: vec![VerdictLine {
                at_secs: 30.0,
                step: 3,
                verdict: "pass".into(),
                reason: None,
            }],
            signals: vec![VersionLine {
                version: "green".into(),
                new_flows_per_sec: 31.25,
                error_rate: Some(0.0),
                latency_p99_ms: Some(0.15),
            }],
            allowed: vec!["promote".into(), "pause".into(), "abort".into()],
        }
    }

    #[test]
    fn a_frame_shows_step_bar_weights_wait_signals_and_verdicts() {
        let f = render(&report("running"));
        assert!(f.contains("rollout web: canary blue -> green   RUNNING"), "{f}");
        assert!(f.contains("step 3/5  [######..................]  25% to green   0:42 in step"), "{f}");
        assert!(f.contains("weights  blue=75 green=25"), "{f}");
        assert!(f.contains("waiting  the step's pause"), "{f}");
        assert!(f.contains("green            31.2     0.0%     0.15ms"), "{f}");
        assert!(f.contains("verdicts step3 pass"), "{f}");
    }

    #[test]
    fn a_finished_rollout_shows_why_and_ends_the_watch_with_its_code() {
        let mut r = report("rolled-back");
        r.reason = Some("error rate 50.0% is above the limit 5.0%".into());
        let f = render(&r);
        assert!(!f.contains("waiting"), "{f}");
        assert!(f.contains("reason   error rate 50.0%"), "{f}");
        assert_eq!(watch_end(&r).map(exit_code), Some(1));
        assert_eq!(watch_end(&report("aborted")).map(exit_code), Some(1));
        assert_eq!(watch_end(&report("completed")).map(exit_code), Some(0));
        assert_eq!(watch_end(&report("running")), None);
        assert_eq!(watch_end(&report("paused")), None);
        assert_eq!(exit_code(WatchEnd::TimedOut), 4);
    }

    #[test]
    fn a_log_line_carries_the_state_the_weights_and_the_last_verdict() {
        let l = line(&report("running"));
        assert_eq!(
            l,
            "web running step 3/5 25% [blue=75 green=25] step 3 of 5: 25% for 60s; last analysis: pass"
        );
    }
}
