//! What the daemon keeps of each rollout beside the machine's state, and
//! saves in the state file: the [`Book`] (state, timeline, analysis
//! schedule, the signals of each analysis), and [`supersede`], the rule by
//! which a finished rollout's weights survive an edited configuration file.
//! Plain data and pure functions: the controller holds the books, the
//! driver ([`crate::rollout::driver`]) writes them, the state file stores
//! them.
use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{
    config::{Config, ServiceConfig},
    rollout::machine::{AnalysisScope, HistoryEntry, Rollout},
    signals::Window,
};

/// Most timeline entries kept per rollout (the oldest go first).
pub const MAX_TIMELINE: usize = 2000;
/// Most plot samples kept per rollout (one per analysis).
pub const MAX_SAMPLES: usize = 2000;

/// A rollout and what the driver keeps beside it. Saved in the state file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Book {
    /// The machine's state.
    pub rollout: Rollout,
    /// Its timeline (the machine's `Record` actions), oldest first.
    #[serde(default)]
    pub timeline: VecDeque<HistoryEntry>,
    /// The running analysis, if any.
    #[serde(default)]
    pub analysis: Option<Schedule>,
    /// Signals at each analysis, for the report's plot.
    #[serde(default)]
    pub samples: VecDeque<Sample>,
    /// The configuration file's weights of the service when the rollout
    /// started: while the file still says these, a reload (or a restart
    /// with an edited file) keeps the weights the rollout set; once the
    /// file's weights are edited, the file wins (see [`supersede`]).
    #[serde(default)]
    pub file_weights: Option<BTreeMap<String, u32>>,
}

/// Adds to `file` (a service as a config file has it) the source-CIDR
/// rules a running rollout's `targets` step owns in `running`, so that a
/// reload does not take them away mid-rollout. True if it added any.
pub fn keep_rollout_targets(
    file: &mut ServiceConfig,
    running: &ServiceConfig,
    book: &Book,
) -> bool {
    let r = &book.rollout;
    if !r.phase.is_running() {
        return false;
    }
    let mut kept = false;
    for t in &running.targets {
        if r.spec.targets.contains(&t.cidr) && !file.targets.iter().any(|f| f.cidr == t.cidr) {
            file.targets.push(t.clone());
            kept = true;
        }
    }
    kept
}

/// Keeps in `next` (a config file being loaded) the weights that rollouts
/// set in `running`, for every service whose weights in the file are still
/// those the file had when its rollout started (or whose rollout is
/// running): a rollout's outcome is not undone by an unrelated edit of the
/// file. Returns one sentence per service it kept or gave up.
pub fn supersede(
    next: &mut Config,
    books: &BTreeMap<String, Book>,
    running: &Config,
) -> Vec<String> {
    let mut said = Vec::new();
    for (service, book) in books {
        let Some(run) = running.service(service) else {
            continue;
        };
        let Some(file) = next.services.iter_mut().find(|s| &s.name == service) else {
            continue;
        };
        if keep_rollout_targets(file, run, book) {
            said.push(format!(
                "kept the target rules of {service} that its running rollout ({} -> {}) owns",
                book.rollout.spec.from, book.rollout.spec.to
            ));
        }
        let file_weights: BTreeMap<String, u32> = file
            .versions
            .iter()
            .map(|v| (v.name.clone(), v.weight))
            .collect();
        let running_weights: BTreeMap<String, u32> = run
            .versions
            .iter()
            .map(|v| (v.name.clone(), v.weight))
            .collect();
        if file_weights == running_weights {
            continue;
        }
        let same_versions = file_weights.keys().eq(running_weights.keys());
        let keep = same_versions
            && (book.rollout.phase.is_running()
                || book.file_weights.as_ref() == Some(&file_weights));
        let r = &book.rollout;
        if keep {
            for v in &mut file.versions {
                if let Some(w) = running_weights.get(&v.name) {
                    v.weight = *w;
                }
            }
            said.push(format!(
                "kept the weights of {service} that its rollout ({} -> {}) set; the file's weights for {service} are superseded until they are edited",
                r.spec.from, r.spec.to
            ));
        } else {
            said.push(format!(
                "the file's weights for {service} (edited since its rollout {} -> {}) replace those the rollout set",
                r.spec.from, r.spec.to
            ));
        }
    }
    said
}

/// An analysis the machine asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// What it compares.
    pub scope: AnalysisScope,
    /// Between two verdicts.
    pub interval_ms: u64,
    /// When the next verdict is due.
    pub next_ms: u64,
}

/// The signals of one analysis, for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// When (the rollout's clock).
    pub at_ms: u64,
    /// The target's share of new flows then.
    pub target_percent: u32,
    /// The judged side (the target version, or a rolling batch).
    pub canary: Window,
    /// The baseline (the stable version, or the batch's peers).
    pub baseline: Option<Window>,
    /// `pass`, `fail` or `inconclusive`.
    pub verdict: String,
}
