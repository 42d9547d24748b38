//! Active health checks: a TCP connect to every active or draining backend
//! of each service with a `[service.health]` table, on its own interval.
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

/// One connect: `Ok` once the handshake completes within `timeout`.
async fn check(addr: SocketAddrV4, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// Runs the checks until the task is aborted. Backends start as up (a
/// restarted daemon does not pull traffic before it knows better).
pub async fn run(controller: Arc<Mutex<Controller>>) {
    let mut tracks: BTreeMap<(String, SocketAddrV4), Track> = BTreeMap::new();
    let mut running: JoinSet<((String, SocketAddrV4), Result<(), String>)> = JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((key, result)) = done else { continue };
                let targets = match controller.lock() {
                    Ok(c) => c.health_targets(),
                    Err(_) => return,
                };
                let Some(cfg) = targets.iter().find(|(s, a, _)| (s, a) == (&key.0, &key.1)).map(|t| t.2) else {
                    tracks.remove(&key);
                    continue;
                };
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
        tracks.retain(|k, _| targets.iter().any(|(s, a, _)| (s, a) == (&k.0, &k.1)));
        for (service, addr, cfg) in targets {
            let key = (service, addr);
            let t = tracks.entry(key.clone()).or_insert(Track {
                next_due: now,
                streak: 0,
                up: true,
                in_flight: false,
            });
            if t.in_flight || t.next_due > now {
                continue;
            }
            t.in_flight = true;
            t.next_due = now + Duration::from_millis(u64::from(cfg.interval_ms));
            let timeout = Duration::from_millis(u64::from(cfg.timeout_ms));
            running.spawn(async move {
                let r = check(key.1, timeout).await;
                (key, r)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
