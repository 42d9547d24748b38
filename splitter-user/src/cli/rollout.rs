//! `splitter rollout ...`: start a rollout and steer it, and watch it from
//! a terminal or a CI job (`status --watch` exits 0 when it completes, 1
//! when it is aborted or rolled back, 4 on `--timeout`, 3 when the daemon
//! cannot be reached).
use std::{fmt::Write as _, io::IsTerminal as _, net::SocketAddrV4, path::Path, time::Duration};

use clap::Subcommand;
use hyper::Method;

use super::{CliError, Output};
use crate::{client, report::RolloutReport, rollout::driver::StartRequest};

/// `splitter rollout ...`
// Parsed once per process: the size of the `start` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start moving a service's new flows to another version, step by step,
    /// each step gated on the analysis of its signals (connection errors
    /// and latency measured by the edge, and the external metric of
    /// [service.analysis] if set); a failed analysis rolls back at once.
    ///
    /// The service's [service.rollout] section gives the defaults (a canary
    /// 5, 10, 25, 50, 100% with a minute a step and an analysis every 10 s);
    /// the options here override them. The target version must exist with
    /// backends (add it with `splitter version add` at weight 0).
    ///
    /// Examples:
    ///   splitter rollout start web --to green --watch
    ///   splitter rollout start web --to green --steps 10,50,100 --step-time 30s
    ///   splitter rollout start web --to green --steps targets,5,10,25,50,100 --targets 10.0.1.96/28
    ///   splitter rollout start web --to green --strategy blue-green --preview 10.0.0.20:80
    ///   splitter rollout start web --to blue --strategy rolling --batch-size 1 --hook /usr/local/bin/deploy
    Start {
        /// Service name.
        service: String,
        /// The version to move to (rolling: the version to redeploy).
        #[arg(long)]
        to: String,
        /// The version to move from (default: the other version with the
        /// largest weight).
        #[arg(long)]
        from: Option<String>,
        /// canary, blue-green or rolling (default: the service's).
        #[arg(long, value_parser = ["canary", "blue-green", "rolling"])]
        strategy: Option<String>,
        /// Canary steps in percent of new flows, ending at 100. A first
        /// step `targets` sends only the --targets networks to the new
        /// version (everyone else stays on the old one at 0%); their rules
        /// stay until the rollout ends.
        #[arg(long, value_delimiter = ',', value_name = "[targets,]PERCENT,...", value_parser = parse_step)]
        steps: Option<Vec<StepArg>>,
        /// Client networks the `targets` step sends to the new version
        /// (default: [service.rollout] targets).
        #[arg(long, value_delimiter = ',', value_name = "CIDR,...")]
        targets: Option<Vec<String>>,
        /// How long each canary step lasts (`30s`, `5m`); `0` waits for
        /// `splitter rollout promote` at every step.
        #[arg(long, value_parser = parse_duration_ms, value_name = "DURATION")]
        step_time: Option<u64>,
        /// Time between two analyses (at least 1s).
        #[arg(long, value_parser = parse_duration_ms, value_name = "DURATION")]
        analysis_interval: Option<u64>,
        /// Advance on time alone: no analysis, no automatic rollback.
        #[arg(long)]
        no_analysis: bool,
        /// Fewest new flows an analysis window needs for a verdict (below:
        /// inconclusive, never a pass).
        #[arg(long)]
        min_attempts: Option<u64>,
        /// Highest error rate that passes, 0..1 (refused + timeouts +
        /// resets by the backend, over new flows).
        #[arg(long)]
        max_error_rate: Option<f64>,
        /// Blue-green: an address (VIP:port) that reaches only the new
        /// version before the switch.
        #[arg(long)]
        preview: Option<SocketAddrV4>,
        /// Blue-green: how long the switched version is analysed before the
        /// rollout completes.
        #[arg(long, value_parser = parse_duration_ms, value_name = "DURATION")]
        post_switch_time: Option<u64>,
        /// Rolling: backends per batch.
        #[arg(long)]
        batch_size: Option<u32>,
        /// Rolling: the deploy command, run once per backend with
        /// SPLITTER_BACKEND, SPLITTER_SERVICE, SPLITTER_VERSION and
        /// SPLITTER_BATCH in its environment (a non-zero exit stops the
        /// rollout, the backend left drained).
        #[arg(long, num_args = 1.., value_name = "COMMAND")]
        hook: Option<Vec<String>>,
        /// Then follow it as `rollout status --watch` does.
        #[arg(long)]
        watch: bool,
        /// With --watch: give up after this long (exit 4).
        #[arg(long, value_parser = parse_duration_ms, value_name = "DURATION")]
        timeout: Option<u64>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Where a rollout stands: strategy, step, weights, signals, verdicts,
    /// what it waits for.
    ///
    /// With --watch it follows the rollout until it ends (redrawn in place
    /// on a terminal, one line per change otherwise) and exits 0 when it
    /// completes, 1 when it is aborted or rolled back, 4 after --timeout,
    /// 3 when the daemon cannot be reached: a CI job can wait on it.
    ///
    /// Example: splitter rollout status web --watch --timeout 30m
    Status {
        /// Service name.
        service: String,
        /// Follow until the rollout ends.
        #[arg(long, short)]
        watch: bool,
        /// With --watch: give up after this long (exit 4).
        #[arg(long, value_parser = parse_duration_ms, value_name = "DURATION")]
        timeout: Option<u64>,
        /// Output format (with --watch: one JSON document per change).
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// End the current step now (skipping its wait and its analysis gate);
    /// with --full, complete the rollout at once (the target at 100%).
    ///
    /// Example: splitter rollout promote web
    Promote {
        /// Service name.
        service: String,
        /// Complete the rollout now.
        #[arg(long)]
        full: bool,
    },
    /// Stop where it is (weights kept, analysis running) until resume.
    Pause {
        /// Service name.
        service: String,
    },
    /// Go on after a pause (the paused time does not count in the step).
    Resume {
        /// Service name.
        service: String,
    },
    /// Stop the rollout: every new flow back to the stable version at once
    /// (established connections finish where they are).
    Abort {
        /// Service name.
        service: String,
    },
    /// Start an aborted or rolled-back rollout again from its first step.
    Retry {
        /// Service name.
        service: String,
    },
    /// Give the traffic back to the old version after a completed rollout,
    /// while the old version is kept (keep_old_ms, 10 minutes by default).
    Undo {
        /// Service name.
        service: String,
    },
    /// The rollout's timeline: steps, verdicts with their reasons,
    /// pauses, the outcome.
    History {
        /// Service name.
        service: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Write the rollout's report: an SVG plot of the target's share of new
    /// flows, the error rates and the connect latency over time, each step
    /// and verdict marked.
    ///
    /// Example: splitter rollout report web --out web-rollout.svg
    Report {
        /// Service name.
        service: String,
        /// File to write (default: SERVICE-rollout.svg).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Every rollout the daemon knows, running and finished.
    List {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// One entry of `--steps`: a percent, or `targets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepArg {
    /// The "targets only" step.
    Targets,
    /// A share of new flows, in percent.
    Percent(u32),
}

fn parse_step(s: &str) -> Result<StepArg, String> {
    if s == "targets" {
        return Ok(StepArg::Targets);
    }
    s.parse().map(StepArg::Percent).map_err(|_| {
        format!("{s:?} is neither a percent nor `targets` (like targets,5,10,25,50,100)")
    })
}

/// A duration (`30s`, `5m`, `500ms`; a bare number is seconds) in ms.
fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let d = match s.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("{s:?} is not a duration like 30s or 5m ({e})"))?,
    };
    u64::try_from(d.as_millis()).map_err(|_| format!("{s:?} is too long"))
}

/// Runs `splitter rollout ...`.
pub async fn run(socket: &Path, cmd: RolloutCommand) -> Result<(), CliError> {
    let seg = |s: &str| super::edit::seg("service", s);
    let end = match cmd {
        RolloutCommand::Start {
            service,
            to,
            from,
            strategy,
            steps,
            targets,
            step_time,
            analysis_interval,
            no_analysis,
            min_attempts,
            max_error_rate,
            preview,
            post_switch_time,
            batch_size,
            hook,
            watch,
            timeout,
            output,
        } => {
            let targets_step = steps
                .as_ref()
                .is_some_and(|s| s.first() == Some(&StepArg::Targets))
                .then_some(true);
            if let Some(s) = &steps
                && s.iter().skip(1).any(|a| *a == StepArg::Targets)
            {
                return Err(CliError::Usage(
                    "--steps: `targets` can only be the first step (targets,5,10,25,50,100)".into(),
                ));
            }
            let steps = steps.map(|s| {
                s.iter()
                    .filter_map(|a| match a {
                        StepArg::Percent(p) => Some(*p),
                        StepArg::Targets => None,
                    })
                    .collect()
            });
            let req = StartRequest {
                service: service.clone(),
                to,
                strategy,
                from,
                steps,
                targets_step,
                targets,
                step_ms: step_time,
                analysis_interval_ms: analysis_interval,
                analysis: no_analysis.then_some(false),
                min_attempts,
                max_error_rate,
                preview,
                post_switch_ms: post_switch_time,
                batch_size,
                hook,
            };
            let body = serde_json::to_string(&req).map_err(|e| CliError::Other(e.into()))?;
            let bytes = client::request(socket, Method::POST, "/v1/rollouts", Some(body)).await?;
            if watch {
                status(
                    socket,
                    &service,
                    output,
                    true,
                    timeout.map(Duration::from_millis),
                )
                .await?
            } else {
                print_report(&bytes, output)?;
                None
            }
        }
        RolloutCommand::Status {
            service,
            watch,
            timeout,
            output,
        } => {
            status(
                socket,
                &service,
                output,
                watch,
                timeout.map(Duration::from_millis),
            )
            .await?
        }
        RolloutCommand::Promote { service, full } => {
            let what = if full { "promote-full" } else { "promote" };
            command(socket, &service, what).await?
        }
        RolloutCommand::Pause { service } => command(socket, &service, "pause").await?,
        RolloutCommand::Resume { service } => command(socket, &service, "resume").await?,
        RolloutCommand::Abort { service } => command(socket, &service, "abort").await?,
        RolloutCommand::Retry { service } => command(socket, &service, "retry").await?,
        RolloutCommand::Undo { service } => command(socket, &service, "undo").await?,
        RolloutCommand::History { service, output } => {
            let path = format!("/v1/rollouts/{}/history", seg(&service)?);
            let bytes = client::request(socket, Method::GET, &path, None).await?;
            if output == Output::Json {
                print!("{}", String::from_utf8_lossy(&bytes));
            } else {
                let book: crate::rollout::driver::Book =
                    serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
                print!("{}", render_history(&book));
            }
            None
        }
        RolloutCommand::Report { service, out } => {
            let path = format!("/v1/rollouts/{}/report", seg(&service)?);
            let bytes = client::request(socket, Method::GET, &path, None).await?;
            let file = out.unwrap_or_else(|| format!("{service}-rollout.svg").into());
            std::fs::write(&file, &bytes)
                .map_err(|e| CliError::Other(anyhow::anyhow!("writing {}: {e}", file.display())))?;
            println!("wrote {} ({} bytes)", file.display(), bytes.len());
            None
        }
        RolloutCommand::List { output } => {
            let bytes = client::request(socket, Method::GET, "/v1/rollouts", None).await?;
            if output == Output::Json {
                print!("{}", String::from_utf8_lossy(&bytes));
            } else {
                let all: Vec<RolloutReport> =
                    serde_json::from_slice(&bytes).map_err(|e| CliError::Other(e.into()))?;
                if all.is_empty() {
                    println!("no rollouts");
                }
                for r in &all {
                    println!("{}", line(r));
                }
            }
            None
        }
    };
    match end {
        None | Some(WatchEnd::Completed) => Ok(()),
        Some(e) => Err(CliError::Exit(exit_code(e))),
    }
}

/// Sends a command and prints the rollout as it now is.
async fn command(socket: &Path, service: &str, what: &str) -> Result<Option<WatchEnd>, CliError> {
    let path = format!(
        "/v1/rollouts/{}/{what}",
        super::edit::seg("service", service)?
    );
    let bytes = client::request(socket, Method::POST, &path, None).await?;
    print_report(&bytes, Output::Table)?;
    Ok(None)
}

fn print_report(bytes: &[u8], output: Output) -> Result<(), CliError> {
    match output {
        Output::Json => print!("{}", String::from_utf8_lossy(bytes)),
        Output::Table => {
            let r: RolloutReport =
                serde_json::from_slice(bytes).map_err(|e| CliError::Other(e.into()))?;
            print!("{}", render(&r));
        }
    }
    Ok(())
}

/// The timeline for people: one line per entry, seconds since the start.
pub fn render_history(book: &crate::rollout::driver::Book) -> String {
    let r = &book.rollout;
    let t0 = r.started_at_ms.unwrap_or(r.created_at_ms);
    let mut out = format!(
        "rollout of {}: {} -> {}\n",
        r.spec.service, r.spec.from, r.spec.to
    );
    for e in &book.timeline {
        let weights = e
            .weights
            .map(|w| format!(" [{}% to {}]", w.target_percent, r.spec.to))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:>8.1}s  step {}  {:<11}{}  {}",
            e.at_ms.saturating_sub(t0) as f64 / 1000.0,
            e.step + 1,
            format!("{:?}", e.kind).to_lowercase(),
            weights,
            e.detail
        );
    }
    out
}

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
        let _ = writeln!(
            out,
            "{:<12} {:>8} {:>8} {:>10}",
            "VERSION", "NEW/S", "ERRORS", "P99"
        );
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
    if let Some(sh) = &r.shadow {
        let _ = writeln!(out, "{}", crate::cli::status::shadow_line(&r.service, sh));
        if let Some(t) = &sh.tee {
            let _ = writeln!(out, "{}", crate::cli::status::tee_line(&r.service, t));
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
            shadow: None,
        }
    }

    #[test]
    fn a_frame_shows_step_bar_weights_wait_signals_and_verdicts() {
        let f = render(&report("running"));
        assert!(
            f.contains("rollout web: canary blue -> green   RUNNING"),
            "{f}"
        );
        assert!(
            f.contains("step 3/5  [######..................]  25% to green   0:42 in step"),
            "{f}"
        );
        assert!(f.contains("weights  blue=75 green=25"), "{f}");
        assert!(f.contains("waiting  the step's pause"), "{f}");
        assert!(
            f.contains("green            31.2     0.0%     0.15ms"),
            "{f}"
        );
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
