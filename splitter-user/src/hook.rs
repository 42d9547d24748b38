//! Operator commands run on events (rollout hooks, the deploy hook of a
//! rolling update): one process per call, with the event described in its
//! environment (`SPLITTER_*`), bounded by a timeout (then killed), its
//! output captured (the first [`MAX_OUTPUT`] bytes) and logged.
use std::{collections::BTreeMap, process::Stdio, time::Duration};

use tokio::io::AsyncReadExt;
use tracing::{info, warn};

/// Most bytes of a hook's stdout and stderr kept (each).
pub const MAX_OUTPUT: usize = 16 * 1024;

/// How one hook call ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HookOutcome {
    /// The command as run.
    pub argv: Vec<String>,
    /// It exited with status 0 within its timeout.
    pub ok: bool,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// What went wrong, for people (`exit status 3`, `timed out after 5s`,
    /// `cannot start: No such file or directory`); `None` when `ok`.
    pub error: Option<String>,
    /// The start of its standard output.
    pub stdout: String,
    /// The start of its standard error.
    pub stderr: String,
}

/// Runs `argv` with `env` added to the daemon's environment, killing it
/// after `timeout`. Never fails: a command that cannot start, exits non-zero
/// or times out gives an outcome that says so.
pub async fn run(
    argv: &[String],
    env: &BTreeMap<String, String>,
    timeout: Duration,
) -> HookOutcome {
    let mut outcome = HookOutcome {
        argv: argv.to_vec(),
        ok: false,
        code: None,
        error: None,
        stdout: String::new(),
        stderr: String::new(),
    };
    let Some((prog, args)) = argv.split_first() else {
        outcome.error = Some("empty command".into());
        return outcome;
    };
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            outcome.error = Some(format!("cannot start {prog}: {e}"));
            warn!(command = ?argv, error = %e, "hook could not start");
            return outcome;
        }
    };
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let waited = tokio::time::timeout(timeout, async {
        tokio::join!(read_bounded(out), read_bounded(err), child.wait())
    })
    .await;
    match waited {
        Ok((o, e, status)) => {
            outcome.stdout = o;
            outcome.stderr = e;
            match status {
                Ok(s) => {
                    outcome.code = s.code();
                    outcome.ok = s.success();
                    if !s.success() {
                        outcome.error = Some(s.to_string());
                    }
                }
                Err(e) => outcome.error = Some(format!("waiting for it: {e}")),
            }
        }
        Err(_) => {
            let _ = child.kill().await;
            outcome.error = Some(format!("timed out after {timeout:?}; killed"));
        }
    }
    if outcome.ok {
        info!(command = ?argv, stdout = %outcome.stdout.trim_end(), "hook succeeded");
    } else {
        warn!(
            command = ?argv,
            error = outcome.error.as_deref().unwrap_or(""),
            stdout = %outcome.stdout.trim_end(),
            stderr = %outcome.stderr.trim_end(),
            "hook failed"
        );
    }
    outcome
}

/// The first [`MAX_OUTPUT`] bytes of a pipe, as text.
async fn read_bounded(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> String {
    let mut buf = Vec::new();
    if let Some(p) = pipe {
        let _ = p.take(MAX_OUTPUT as u64).read_to_end(&mut buf).await;
    }
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[tokio::test]
    async fn a_hook_sees_its_event_and_its_output_is_kept() {
        let env = BTreeMap::from([("SPLITTER_EVENT".to_string(), "step".to_string())]);
        let o = run(
            &argv(&["sh", "-c", "echo event=$SPLITTER_EVENT; echo oops >&2"]),
            &env,
            Duration::from_secs(5),
        )
        .await;
        assert!(o.ok, "{o:?}");
        assert_eq!(o.code, Some(0));
        assert_eq!(o.stdout, "event=step\n");
        assert_eq!(o.stderr, "oops\n");
        assert_eq!(o.error, None);
    }

    #[tokio::test]
    async fn failures_are_outcomes_that_say_what_happened() {
        let env = BTreeMap::new();
        let o = run(&argv(&["sh", "-c", "exit 3"]), &env, Duration::from_secs(5)).await;
        assert!(!o.ok);
        assert_eq!(o.code, Some(3));
        assert!(o.error.unwrap().contains('3'));

        let o = run(&argv(&["/nonexistent/hook"]), &env, Duration::from_secs(5)).await;
        assert!(!o.ok && o.error.unwrap().contains("cannot start"));

        let started = std::time::Instant::now();
        let o = run(&argv(&["sleep", "10"]), &env, Duration::from_millis(200)).await;
        assert!(!o.ok && o.error.unwrap().contains("timed out"));
        assert!(started.elapsed() < Duration::from_secs(5));

        let o = run(&[], &env, Duration::from_secs(1)).await;
        assert_eq!(o.error.as_deref(), Some("empty command"));
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let o = run(
            &argv(&["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x"]),
            &BTreeMap::new(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(o.stdout.len(), MAX_OUTPUT);
    }
}
