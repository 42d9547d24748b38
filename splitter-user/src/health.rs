//! Active health checks: a TCP connect (or an HTTP `GET` that must answer
//! 2xx or 3xx) to every active or draining backend of each service with a
//! `[service.health]` table, on its own interval.
//! This module owns the checking loop and the rise/fall counting; the
//! controller owns what a verdict changes (a backend that is down leaves
//! new-flow selection, see [`Controller::set_health`]).
//!
//! Checks run from the daemon's network namespace with the kernel's
//! routing, so a backend is checked the way the edge reaches it.
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{net::TcpStream, task::JoinSet, time::Instant};
use tracing::{info, warn};

use crate::{config::HealthConfig, controller::Controller};

/// How often the loop looks for checks that are due.
const TICK: Duration = Duration::from_millis(50);

/// What the loop knows of one backend.
#[derive(Debug, Clone)]
struct Track {
    next_due: Instant,
    /// Consecutive passes (> 0) or failures (< 0).
    streak: i64,
    up: bool,
    in_flight: bool,
}

/// Rise/fall counting: the verdict after one more result, if it changed.
fn record(t: &mut Track, passed: bool, cfg: &HealthConfig) -> Option<bool> {
    t.streak = match (passed, t.streak) {
        (true, s) if s > 0 => s + 1,
        (true, _) => 1,
        (false, s) if s < 0 => s - 1,
        (false, _) => -1,
    };
    if t.up && t.streak <= -i64::from(cfg.fall) {
        t.up = false;
        Some(false)
    } else if !t.up && t.streak >= i64::from(cfg.rise) {
        t.up = true;
        Some(true)
    } else {
        None
    }
}

/// One check within `timeout`: the TCP handshake, and with `http_path`
/// an HTTP/1.0 `GET` whose status must be 2xx or 3xx.
async fn check(
    addr: SocketAddrV4,
    http_path: Option<String>,
    timeout: Duration,
) -> Result<(), String> {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let Some(path) = http_path else {
            return Ok(());
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let req = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: splitter-health\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = Vec::with_capacity(64);
        let mut buf = [0u8; 64];
        // The status line is all that is needed; read until its end.
        while !head.contains(&b'\n') && head.len() < 1024 {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        http_status_ok(&head)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Is the first line of `head` an HTTP status line with 2xx or 3xx?
fn http_status_ok(head: &[u8]) -> Result<(), String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("no HTTP status line: {:?}", line.trim()));
    };
    if !version.starts_with("HTTP/") {
        return Err(format!("no HTTP status line: {:?}", line.trim()));
    }
    match code.parse::<u16>() {
        Ok(200..=399) => Ok(()),
        Ok(c) => Err(format!("HTTP status {c}")),
        Err(_) => Err(format!("bad HTTP status {code:?}")),
    }
}

/// Runs the checks until the task is aborted. Backends start as up (a
/// restarted daemon does not pull traffic before it knows better).
pub async fn run(controller: Arc<Mutex<Controller>>, mut shutdown: crate::shutdown::Shutdown) {
    let mut tracks: BTreeMap<(String, SocketAddrV4), Track> = BTreeMap::new();
    type Done = ((String, SocketAddrV4), HealthConfig, Result<(), String>);
    let mut running: JoinSet<Done> = JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = ticker.tick() => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((key, cfg, result)) = done else { continue };
                // Gone from the targets since (the controller ignores
                // verdicts on backends it no longer checks).
                let Some(t) = tracks.get_mut(&key) else { continue };
                t.in_flight = false;
                if let Err(e) = &result
                    && t.up
                {
                    info!(service = %key.0, backend = %key.1, error = %e, "health check failed");
                }
                if let Some(up) = record(t, result.is_ok(), &cfg) {
                    if up {
                        info!(service = %key.0, backend = %key.1, "backend is up again: back in new-flow selection");
                    } else {
                        warn!(service = %key.0, backend = %key.1, fall = cfg.fall, "backend is down: out of new-flow selection (established flows go on)");
                    }
                    let r = match controller.lock() {
                        Ok(mut c) => c.set_health(&key.0, key.1, up),
                        Err(_) => return,
                    };
                    if let Err(e) = r {
                        warn!(error = %e, "could not publish a health change; will retry on the next check");
                        // Undo, so the next result triggers it again.
                        t.up = !up;
                        t.streak = 0;
                    }
                }
                continue;
            }
        }
        let targets = match controller.lock() {
            Ok(c) => c.health_targets(),
            Err(_) => return,
        };
        let now = Instant::now();
        let targets: BTreeMap<(String, SocketAddrV4), (HealthConfig, bool)> = targets
            .into_iter()
            .map(|(s, a, cfg, up)| ((s, a), (cfg, up)))
            .collect();
        tracks.retain(|k, _| targets.contains_key(k));
        for (key, (cfg, up)) in targets {
            let t = tracks.entry(key.clone()).or_insert(Track {
                next_due: now,
                streak: 0,
                up,
                in_flight: false,
            });
            if t.up != up && !t.in_flight {
                // The controller forgot a verdict (the backend left and came
                // back, or its checks changed): start over from its view.
                t.up = up;
                t.streak = 0;
            }
            if t.in_flight || t.next_due > now {
                continue;
            }
            t.in_flight = true;
            t.next_due = now + Duration::from_millis(u64::from(cfg.interval_ms));
            let timeout = Duration::from_millis(u64::from(cfg.timeout_ms));
            running.spawn(async move {
                let r = check(key.1, cfg.http_path.clone(), timeout).await;
                (key, cfg, r)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_lines() {
        assert!(http_status_ok(b"HTTP/1.1 200 OK\r\n").is_ok());
        assert!(http_status_ok(b"HTTP/1.0 302 Found\r\nLocation: /").is_ok());
        assert_eq!(
            http_status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Err("HTTP status 503".into())
        );
        assert!(http_status_ok(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(http_status_ok(b"").is_err());
        assert!(http_status_ok(b"HTTP/1.1 abc\r\n").is_err());
    }

    #[test]
    fn rise_and_fall_need_streaks() {
        let cfg = HealthConfig {
            fall: 3,
            rise: 2,
            ..HealthConfig::default()
        };
        let mut t = Track {
            next_due: Instant::now(),
            streak: 0,
            up: true,
            in_flight: false,
        };
        // Two failures, a pass, two failures: never three in a row.
        for passed in [false, false, true, false, false] {
            assert_eq!(record(&mut t, passed, &cfg), None);
        }
        assert_eq!(record(&mut t, false, &cfg), Some(false));
        assert_eq!(record(&mut t, false, &cfg), None);
        assert_eq!(record(&mut t, true, &cfg), None);
        assert_eq!(record(&mut t, true, &cfg), Some(true));
        assert!(t.up);
    }
}
