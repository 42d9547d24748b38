//! Control-plane figures that need no traffic and no privileges: the time
//! to build the Maglev tables of 1,000 services of 100 backends each with
//! `splitter::table::maglev_table`, on one thread, in this build's profile.
use std::time::Instant;

use anyhow::{Result, anyhow, ensure};
use splitter::table::{MaglevBackend, maglev_table};
use splitter_common::NO_BACKEND;

/// Services in the table-build benchmark.
pub const SERVICES: usize = 1000;
/// Backends per service.
pub const BACKENDS: usize = 100;

/// Milliseconds to build all `SERVICES` tables, once per round. Backend
/// keys are distinct `address:port` strings made before the clock starts;
/// weights are 1 except every tenth backend's 3, so the weighted path runs.
///
/// # Errors
/// The builder refused a table, or a table left a slot empty.
pub fn maglev_build(rounds: usize) -> Result<Vec<f64>> {
    let keys: Vec<Vec<String>> = (0..SERVICES)
        .map(|s| {
            (0..BACKENDS)
                .map(|b| format!("10.{}.{}.{}:8080", 64 + s / 256, s % 256, b + 1))
                .collect()
        })
        .collect();
    let members: Vec<Vec<MaglevBackend<'_>>> = keys
        .iter()
        .map(|ks| {
            ks.iter()
                .enumerate()
                .map(|(i, k)| MaglevBackend {
                    key: k,
                    weight: if i % 10 == 0 { 3 } else { 1 },
                    id: i as u16,
                })
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let mut filled = 0usize;
        for m in &members {
            let table = maglev_table(m).map_err(|e| anyhow!("maglev_table: {e}"))?;
            filled += usize::from(table.slots[0] != NO_BACKEND);
        }
        out.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(filled == SERVICES, "a table came out empty");
    }
    Ok(out)
}
