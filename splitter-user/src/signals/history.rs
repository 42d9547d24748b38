//! The bounded history of every backend's signal counters and the windows
//! over it. This module owns how once-a-second samples are kept (compactly,
//! for the longest window only), how counter restarts are read, and how a
//! span of samples becomes a [`Window`] (rates, error rate, latency
//! percentiles). Pure: no I/O, no clock; the caller passes times in ms.
//!
//! ```
//! use splitter::signals::{Counters, history::History};
//!
//! let mut h = History::new(60);
//! for s in 0..=10u64 {
//!     let c = Counters { attempts: 100 * s, refused: s, ..Counters::default() };
//!     h.record(s * 1000, [("blue-1", c)]);
//! }
//! let w = h.window(&"blue-1", 10_000, 60_000).unwrap();
//! assert_eq!(w.seconds, 10.0);
//! assert_eq!(w.attempts_per_sec, 100.0);
//! assert_eq!(w.error_rate, Some(0.01));
//! ```
//!
//! # Reading the counters
//! - Every call of [`History::record`] is one sample of every backend; a
//!   key absent from a call is dropped with its history (the backend was
//!   removed; if it comes back it starts over).
//! - Increases are summed step by step between consecutive samples, never
//!   as last minus first. A field that is smaller than in the previous
//!   sample restarted from zero, so its increase over that step is its new
//!   value (as Prometheus's `increase` reads a counter reset). This is
//!   decided per field, not per sample: the swept `timeouts` live in the
//!   controller and survive a new data plane whose kernel counters restart,
//!   and a whole-sample reset would count all of them again as new.
//! - Percentiles interpolate linearly inside a bucket, as Prometheus's
//!   `histogram_quantile`: the first bucket starts at 0, and a quantile
//!   that lands in the `+Inf` bucket is the last finite bound (2500 ms).
//!
//! # Memory
//! A backend keeps [`History::new`]'s `max_window_secs + 1` samples (at
//! most [`MAX_WINDOW_SECS`] + 1), stored as the increases between them:
//! 24 LEB128 varints per step, one byte per increase below 128, two below
//! 16384, three below 2 M. An idle backend costs 24 B per step, a busy one
//! (1,000 connections/s, 50,000 packets/s) about 36 B, where a plain
//! [`Counters`] plus its time would be 200 B. The newest cumulative values
//! (192 B) and the map entry add about 300 B per backend. For 1,000
//! backends that is 7-11 MB at the default 300 s
//! ([`DEFAULT_MAX_WINDOW_SECS`]) and 87-130 MB at the 3600 s maximum (plain
//! `Counters` would take 60 MB and 720 MB), plus up to as much again while
//! the buffers' spare room (they grow by doubling) is unused;
//! [`History::heap_bytes`] gives the actual figure.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

use splitter_common::{LATENCY_BOUNDS_US, LATENCY_BUCKETS};

use super::{Counters, Window};

/// The longest window a [`History`] keeps samples for, in seconds.
pub const MAX_WINDOW_SECS: u64 = 3600;

/// The window length [`History::default`] keeps samples for, in seconds.
pub const DEFAULT_MAX_WINDOW_SECS: u64 = 300;

/// Fields of [`Counters`] as stored: 9 counters and the latency buckets.
const FIELDS: usize = 9 + LATENCY_BUCKETS;

/// A bounded history of cumulative [`Counters`] samples per key (the
/// controller's backend identity), and the [`Window`]s over it.
#[derive(Clone, Debug)]
pub struct History<K: Ord + Clone> {
    /// Samples kept per key: the longest window's seconds plus one.
    capacity: usize,
    /// Times (ms) of the kept [`History::record`] calls, oldest first,
    /// strictly increasing; at most `capacity`.
    times: VecDeque<u64>,
    /// Sequence number of `times[0]` (every accepted call has the next
    /// one; older calls are forgotten).
    first_seq: u64,
    /// Each present key's samples; their newest is always `times.back()`.
    series: BTreeMap<K, Series>,
}

/// One key's samples.
#[derive(Clone, Debug)]
struct Series {
    /// Sequence number of the key's oldest kept sample.
    first_seq: u64,
    /// The newest sample's cumulative values (to read the next step).
    last: [u64; FIELDS],
    /// Increases between consecutive samples, oldest first, each step
    /// `FIELDS` LEB128 varints.
    steps: VecDeque<u8>,
}

impl<K: Ord + Clone> Default for History<K> {
    /// A history for windows up to [`DEFAULT_MAX_WINDOW_SECS`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_WINDOW_SECS)
    }
}

impl<K: Ord + Clone> History<K> {
    /// An empty history that keeps enough once-a-second samples for
    /// windows of up to `max_window_secs` (clamped to 1..=
    /// [`MAX_WINDOW_SECS`]): `max_window_secs + 1` samples per key. If the
    /// caller samples faster than once a second, the longest window covers
    /// less time, and [`Window::seconds`] says so.
    pub fn new(max_window_secs: u64) -> Self {
        let secs = max_window_secs.clamp(1, MAX_WINDOW_SECS);
        Self {
            capacity: usize::try_from(secs)
                .unwrap_or(usize::MAX)
                .saturating_add(1),
            times: VecDeque::new(),
            first_seq: 0,
            series: BTreeMap::new(),
        }
    }

    /// Samples kept per key.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Records one sample of every backend at `at_ms`: their cumulative
    /// counters, keyed. Keys absent from `samples` are dropped with their
    /// history; a key given twice keeps its last counters. A call whose
    /// `at_ms` is not after the newest recorded one changes nothing and
    /// returns `false` (times come from a monotonic clock; a repeat is
    /// ignored rather than read as a zero-length step).
    pub fn record(&mut self, at_ms: u64, samples: impl IntoIterator<Item = (K, Counters)>) -> bool {
        if self.times.back().is_some_and(|&newest| at_ms <= newest) {
            return false;
        }
        let new: BTreeMap<K, Counters> = samples.into_iter().collect();
        self.times.push_back(at_ms);
        let newest_seq = self.seq_of(self.times.len() - 1);
        while self.times.len() > self.capacity {
            self.times.pop_front();
            self.first_seq = self.first_seq.saturating_add(1);
        }
        self.series.retain(|k, _| new.contains_key(k));
        for (key, counters) in new {
            let fields = to_fields(&counters);
            match self.series.get_mut(&key) {
                Some(s) => {
                    for (old, new) in s.last.iter().zip(fields) {
                        push_varint(&mut s.steps, increase(*old, new));
                    }
                    s.last = fields;
                }
                None => {
                    self.series.insert(
                        key,
                        Series {
                            first_seq: newest_seq,
                            last: fields,
                            steps: VecDeque::new(),
                        },
                    );
                }
            }
        }
        for s in self.series.values_mut() {
            while s.first_seq < self.first_seq {
                pop_step(&mut s.steps);
                s.first_seq += 1;
            }
        }
        true
    }

    /// Drops every key for which `keep` is false (as a missing key in the
    /// next [`History::record`] would).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.series.retain(|k, _| keep(k));
    }

    /// The keys with at least one sample.
    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.series.keys()
    }

    /// Samples kept for `key` (0 if unknown).
    pub fn samples(&self, key: &K) -> usize {
        self.series.get(key).map_or(0, |s| {
            self.times.len().saturating_sub(self.index_of(s.first_seq))
        })
    }

    /// What `key`'s counters say over the `len_ms` before `now_ms`: from
    /// its newest sample at or before `now_ms` back to its oldest sample at
    /// or after `now_ms - len_ms`. `None` for an unknown key or fewer than
    /// two samples in that span. [`Window::seconds`] is the time between
    /// the two samples (shorter than `len_ms` while the history is young).
    pub fn window(&self, key: &K, now_ms: u64, len_ms: u64) -> Option<Window> {
        let s = self.series.get(key)?;
        let span = self.span(s, now_ms, len_ms)?;
        let mut delta = [0u64; FIELDS];
        self.add_increases(s, &span, &mut delta);
        Some(window_of(&from_fields(&delta), span.seconds))
    }

    /// What a set of keys (a version's backends) says together over the
    /// `len_ms` before `now_ms`: the sum of each key's increases over the
    /// span of [`History::window`]. A key given twice counts once; unknown
    /// keys and keys without two samples in the span add nothing (a backend
    /// added during the span adds what it did since). `seconds` is the
    /// longest span among the keys. `None` if no key has a window.
    pub fn window_sum<'a>(
        &self,
        keys: impl IntoIterator<Item = &'a K>,
        now_ms: u64,
        len_ms: u64,
    ) -> Option<Window>
    where
        K: 'a,
    {
        let keys: BTreeSet<&K> = keys.into_iter().collect();
        let mut delta = [0u64; FIELDS];
        let mut seconds: Option<f64> = None;
        for key in keys {
            let Some(s) = self.series.get(key) else {
                continue;
            };
            let Some(span) = self.span(s, now_ms, len_ms) else {
                continue;
            };
            self.add_increases(s, &span, &mut delta);
            seconds = Some(seconds.map_or(span.seconds, |x| x.max(span.seconds)));
        }
        seconds.map(|secs| window_of(&from_fields(&delta), secs))
    }

    /// Bytes the history holds on the heap (buffers' capacity, map entries
    /// estimated), for reports.
    pub fn heap_bytes(&self) -> usize {
        let entry = size_of::<K>() + size_of::<Series>() + 16;
        self.times.capacity() * size_of::<u64>()
            + self
                .series
                .values()
                .map(|s| entry + s.steps.capacity())
                .sum::<usize>()
    }

    /// Sequence number of `times[index]`.
    fn seq_of(&self, index: usize) -> u64 {
        self.first_seq
            .saturating_add(u64::try_from(index).unwrap_or(u64::MAX))
    }

    /// Index into `times` of a kept sequence number.
    fn index_of(&self, seq: u64) -> usize {
        usize::try_from(seq.saturating_sub(self.first_seq)).unwrap_or(usize::MAX)
    }

    /// The samples of `s` a window uses (see [`History::window`]).
    fn span(&self, s: &Series, now_ms: u64, len_ms: u64) -> Option<Span> {
        let end = self
            .times
            .partition_point(|&t| t <= now_ms)
            .checked_sub(1)?;
        let from_ms = now_ms.saturating_sub(len_ms);
        let start = self
            .times
            .partition_point(|&t| t < from_ms)
            .max(self.index_of(s.first_seq));
        if start >= end {
            return None;
        }
        let (t0, t1) = (*self.times.get(start)?, *self.times.get(end)?);
        Some(Span {
            start: self.seq_of(start),
            end: self.seq_of(end),
            seconds: t1.saturating_sub(t0) as f64 / 1000.0,
        })
    }

    /// Adds the increases of `s` over `span`, step by step, to `acc`.
    fn add_increases(&self, s: &Series, span: &Span, acc: &mut [u64; FIELDS]) {
        let mut bytes = s.steps.iter().copied();
        let mut from = s.first_seq;
        while from < span.end {
            let mut step = [0u64; FIELDS];
            for f in step.iter_mut() {
                *f = read_varint(&mut bytes);
            }
            if from >= span.start {
                for (a, inc) in acc.iter_mut().zip(step) {
                    *a = a.saturating_add(inc);
                }
            }
            from += 1;
        }
    }
}

/// The samples a window spans, as sequence numbers, and their distance.
struct Span {
    start: u64,
    end: u64,
    seconds: f64,
}

/// The increase of a counter between two consecutive samples: the
/// difference, or the new value if it went down (it restarted from zero).
fn increase(old: u64, new: u64) -> u64 {
    if new >= old { new - old } else { new }
}

/// The stored fields of `c`.
fn to_fields(c: &Counters) -> [u64; FIELDS] {
    let mut f = [0u64; FIELDS];
    f[..9].copy_from_slice(&[
        c.attempts,
        c.established,
        c.refused,
        c.timeouts,
        c.reset_by_backend,
        c.reset_by_client,
        c.packets,
        c.reply_packets,
        c.latency_sum_us,
    ]);
    f[9..].copy_from_slice(&c.latency);
    f
}

/// The counters of stored fields (inverse of [`to_fields`]).
fn from_fields(f: &[u64; FIELDS]) -> Counters {
    let mut latency = [0u64; LATENCY_BUCKETS];
    latency.copy_from_slice(&f[9..]);
    Counters {
        attempts: f[0],
        established: f[1],
        refused: f[2],
        timeouts: f[3],
        reset_by_backend: f[4],
        reset_by_client: f[5],
        packets: f[6],
        reply_packets: f[7],
        latency_sum_us: f[8],
        latency,
    }
}

/// Appends `v` as an LEB128 varint (7 bits a byte, low bits first).
fn push_varint(buf: &mut VecDeque<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            buf.push_back(byte);
            return;
        }
        buf.push_back(byte | 0x80);
    }
}

/// Reads one varint written by [`push_varint`] (0 at the end of input).
fn read_varint(bytes: &mut impl Iterator<Item = u8>) -> u64 {
    let mut v = 0u64;
    let mut shift = 0u32;
    for b in bytes {
        if shift < 64 {
            v |= u64::from(b & 0x7f) << shift;
        }
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    v
}

/// Removes the oldest step (`FIELDS` varints) from `buf`.
fn pop_step(buf: &mut VecDeque<u8>) {
    for _ in 0..FIELDS {
        while let Some(b) = buf.pop_front() {
            if b & 0x80 == 0 {
                break;
            }
        }
    }
}

/// The [`Window`] of a counters increase over `seconds` (a negative or
/// non-finite span counts as 0 s, and a 0 s window has rate 0). The error
/// rate is `None` without attempts and at most 1 (resets of connections
/// opened before the window may outnumber its attempts).
pub fn window_of(delta: &Counters, seconds: f64) -> Window {
    let seconds = if seconds.is_finite() && seconds > 0.0 {
        seconds
    } else {
        0.0
    };
    let errors = delta
        .refused
        .saturating_add(delta.timeouts)
        .saturating_add(delta.reset_by_backend);
    Window {
        seconds,
        attempts: delta.attempts,
        established: delta.established,
        refused: delta.refused,
        timeouts: delta.timeouts,
        reset_by_backend: delta.reset_by_backend,
        reset_by_client: delta.reset_by_client,
        attempts_per_sec: if seconds > 0.0 {
            delta.attempts as f64 / seconds
        } else {
            0.0
        },
        error_rate: error_rate(delta.attempts, errors),
        latency_p50_ms: latency_quantile_ms(0.5, &delta.latency),
        latency_p90_ms: latency_quantile_ms(0.9, &delta.latency),
        latency_p99_ms: latency_quantile_ms(0.99, &delta.latency),
        latency: delta.latency,
    }
}

/// `errors / attempts`, at most 1; `None` without attempts.
pub fn error_rate(attempts: u64, errors: u64) -> Option<f64> {
    (attempts > 0).then(|| (errors as f64 / attempts as f64).min(1.0))
}

/// The `q` quantile (0..=1; clamped) of a connect-latency histogram of
/// [`LATENCY_BOUNDS_US`] buckets (not cumulative), in ms, interpolated as
/// Prometheus's `histogram_quantile`: linearly inside the bucket, the
/// first bucket from 0, the `+Inf` bucket read as the last finite bound.
/// `None` without samples or for a NaN `q`.
pub fn latency_quantile_ms(q: f64, buckets: &[u64; LATENCY_BUCKETS]) -> Option<f64> {
    if q.is_nan() {
        return None;
    }
    let total: f64 = buckets.iter().map(|&c| c as f64).sum();
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let mut below = 0.0;
    let mut lower_us = 0.0;
    for (i, &count) in buckets.iter().enumerate() {
        let count = count as f64;
        let Some(&upper_us) = LATENCY_BOUNDS_US.get(i) else {
            // The +Inf bucket: the last finite bound.
            return Some(lower_us / 1000.0);
        };
        let upper_us = upper_us as f64;
        if count > 0.0 && below + count >= rank {
            let at = lower_us + (upper_us - lower_us) * ((rank - below) / count).clamp(0.0, 1.0);
            return Some(at / 1000.0);
        }
        below += count;
        lower_us = upper_us;
    }
    Some(lower_us / 1000.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Counters with `attempts`, `refused` of them and the rest established.
    fn c(attempts: u64, refused: u64) -> Counters {
        Counters {
            attempts,
            established: attempts.saturating_sub(refused),
            refused,
            ..Counters::default()
        }
    }

    fn hist(pairs: &[(usize, u64)]) -> [u64; LATENCY_BUCKETS] {
        let mut h = [0u64; LATENCY_BUCKETS];
        for &(i, n) in pairs {
            h[i] = n;
        }
        h
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn steady_rates() {
        let mut h = History::new(60);
        for s in 0..=120u64 {
            assert!(h.record(s * 1000, [("a", c(50 * s, 2 * s)), ("b", c(10 * s, 0))]));
        }
        let w = h.window(&"a", 120_000, 60_000).unwrap();
        assert_eq!(w.seconds, 60.0);
        assert_eq!(w.attempts, 3000);
        assert_eq!(w.refused, 120);
        assert!(close(w.attempts_per_sec, 50.0));
        assert!(close(w.error_rate.unwrap(), 0.04));
        let w = h.window(&"b", 120_000, 10_000).unwrap();
        assert_eq!((w.seconds, w.attempts), (10.0, 100));
        assert_eq!(w.error_rate, Some(0.0));
        assert_eq!(h.samples(&"a"), 61);
        // A window asked for longer than kept covers what is kept.
        let w = h.window(&"a", 120_000, 600_000).unwrap();
        assert_eq!(w.seconds, 60.0);
        // A window in the past ends at the newest sample at or before `now`.
        let w = h.window(&"a", 100_500, 10_000).unwrap();
        assert_eq!((w.seconds, w.attempts), (9.0, 450));
    }

    #[test]
    fn young_history_covers_what_it_has() {
        let mut h = History::new(60);
        assert!(h.window(&"a", 0, 60_000).is_none());
        h.record(1000, [("a", c(10, 0))]);
        assert!(
            h.window(&"a", 1000, 60_000).is_none(),
            "one sample is no window"
        );
        h.record(2000, [("a", c(30, 1))]);
        h.record(3000, [("a", c(50, 1))]);
        let w = h.window(&"a", 3000, 60_000).unwrap();
        assert_eq!((w.seconds, w.attempts, w.refused), (2.0, 40, 1));
        assert!(close(w.attempts_per_sec, 20.0));
        assert!(
            h.window(&"a", 500, 60_000).is_none(),
            "before the first sample"
        );
        assert!(h.window(&"a", 3000, 0).is_none(), "an empty span");
    }

    #[test]
    fn reset_in_the_middle_is_counted_from_zero() {
        let mut h = History::new(60);
        let seq = [c(1000, 10), c(1100, 11), c(20, 1), c(120, 2)];
        for (s, x) in seq.iter().enumerate() {
            h.record(s as u64 * 1000, [("a", *x)]);
        }
        let w = h.window(&"a", 3000, 60_000).unwrap();
        // 100 + 20 (restart, from zero) + 100.
        assert_eq!(w.attempts, 220);
        assert_eq!(w.refused, 1 + 1 + 1);
        assert!(close(w.attempts_per_sec, 220.0 / 3.0));
        assert!(w.error_rate.unwrap() <= 1.0);
    }

    #[test]
    fn reset_is_read_per_field() {
        // A new data plane restarts the kernel counters; the swept timeouts
        // live in the controller and keep growing.
        let mut h = History::new(60);
        let before = Counters {
            attempts: 500,
            timeouts: 40,
            ..Counters::default()
        };
        let after = Counters {
            attempts: 10,
            timeouts: 41,
            ..Counters::default()
        };
        h.record(0, [("a", before)]);
        h.record(1000, [("a", after)]);
        let w = h.window(&"a", 1000, 60_000).unwrap();
        assert_eq!((w.attempts, w.timeouts), (10, 1));
    }

    #[test]
    fn huge_values_and_resets_do_not_overflow() {
        let mut h = History::new(5);
        let big = Counters {
            attempts: u64::MAX,
            refused: u64::MAX,
            timeouts: u64::MAX,
            reset_by_backend: u64::MAX,
            latency: [u64::MAX; LATENCY_BUCKETS],
            ..Counters::default()
        };
        for s in 0..10u64 {
            let x = if s % 2 == 0 { big } else { Counters::default() };
            h.record(s * 1000, [("a", x), ("b", x)]);
        }
        let w = h.window_sum([&"a", &"b"], 9000, 60_000).unwrap();
        assert_eq!(w.attempts, u64::MAX, "saturates");
        assert_eq!(w.error_rate, Some(1.0));
        assert!(w.latency_p99_ms.unwrap().is_finite());
    }

    #[test]
    fn removed_keys_are_dropped_and_start_over() {
        let mut h = History::new(60);
        h.record(0, [("a", c(0, 0)), ("b", c(0, 0))]);
        h.record(1000, [("a", c(10, 0)), ("b", c(10, 0))]);
        h.record(2000, [("a", c(20, 0))]);
        assert!(h.window(&"b", 2000, 60_000).is_none());
        assert_eq!(h.samples(&"b"), 0);
        assert_eq!(h.keys().collect::<Vec<_>>(), [&"a"]);
        // Back again: a new history from its first sample.
        h.record(3000, [("a", c(30, 0)), ("b", c(500, 0))]);
        assert!(h.window(&"b", 3000, 60_000).is_none());
        h.record(4000, [("a", c(40, 0)), ("b", c(510, 0))]);
        assert_eq!(h.window(&"b", 4000, 60_000).unwrap().attempts, 10);
        h.retain(|k| *k != "a");
        assert!(h.window(&"a", 4000, 60_000).is_none());
    }

    #[test]
    fn times_that_do_not_grow_are_ignored() {
        let mut h = History::new(60);
        assert!(h.record(5000, [("a", c(10, 0))]));
        assert!(!h.record(5000, [("a", c(20, 0))]));
        assert!(!h.record(4000, [("b", c(20, 0))]));
        assert!(h.record(6000, [("a", c(30, 0))]));
        assert_eq!(h.window(&"a", 6000, 60_000).unwrap().attempts, 20);
    }

    #[test]
    fn capacity_bounds_the_samples() {
        let mut h = History::new(10);
        assert_eq!(h.capacity(), 11);
        for s in 0..100u64 {
            h.record(s * 1000, [("a", c(s * 7, 0))]);
        }
        assert_eq!(h.samples(&"a"), 11);
        let w = h.window(&"a", 99_000, 1_000_000).unwrap();
        assert_eq!((w.seconds, w.attempts), (10.0, 70));
        assert_eq!(History::<u8>::new(0).capacity(), 2);
        assert_eq!(History::<u8>::new(u64::MAX).capacity(), 3601);
        assert_eq!(History::<u8>::default().capacity(), 301);
    }

    #[test]
    fn memory_per_step_is_as_documented() {
        // A busy backend: 1,000 connections/s, 50,000 packets/s, a few
        // latency buckets in use.
        let mut h = History::new(300);
        let mut x = Counters::default();
        for s in 0..=300u64 {
            h.record(s * 1000, [(0u32, x)]);
            x.attempts += 1000;
            x.established += 995;
            x.refused += 5;
            x.reset_by_client += 3;
            x.packets += 50_000;
            x.reply_packets += 45_000;
            x.latency_sum_us += 995 * 3000;
            x.latency[4] += 600;
            x.latency[5] += 390;
            x.latency[7] += 5;
        }
        let bytes = h.series[&0].steps.len();
        assert!(bytes <= 300 * 36, "{} B per step", bytes / 300);
        let mut h = History::new(300);
        for s in 0..=300u64 {
            h.record(s * 1000, [(0u32, Counters::default())]);
        }
        assert_eq!(h.series[&0].steps.len(), 300 * FIELDS);
        assert!(h.heap_bytes() >= 300 * FIELDS);
    }

    #[test]
    fn window_sum_adds_backends_over_the_same_span() {
        let mut h = History::new(60);
        for s in 0..=30u64 {
            let mut samples = vec![("a", c(10 * s, s)), ("b", c(20 * s, 0))];
            if s >= 20 {
                samples.push(("c", c(5 * (s - 20), s - 20)));
            }
            h.record(s * 1000, samples);
        }
        let sum = h
            .window_sum([&"a", &"b", &"c", &"a", &"unknown"], 30_000, 20_000)
            .unwrap();
        let parts: Vec<Window> = ["a", "b", "c"]
            .iter()
            .map(|k| h.window(k, 30_000, 20_000).unwrap())
            .collect();
        assert_eq!(sum.seconds, 20.0);
        assert_eq!(sum.attempts, parts.iter().map(|w| w.attempts).sum::<u64>());
        assert_eq!(sum.refused, parts.iter().map(|w| w.refused).sum::<u64>());
        assert_eq!(sum.attempts, 200 + 400 + 50);
        assert!(close(sum.attempts_per_sec, 650.0 / 20.0));
        assert!(h.window_sum([&"unknown"], 30_000, 20_000).is_none());
        assert!(
            h.window_sum(std::iter::empty::<&&str>(), 30_000, 20_000)
                .is_none()
        );
    }

    #[test]
    fn percentiles_all_in_one_bucket() {
        // 100 samples in (1 ms, 2.5 ms]: p50 in the middle of the bucket.
        let b = hist(&[(4, 100)]);
        assert!(close(latency_quantile_ms(0.5, &b).unwrap(), 1.75));
        assert!(close(
            latency_quantile_ms(0.9, &b).unwrap(),
            1.0 + 1.5 * 0.9
        ));
        assert!(close(latency_quantile_ms(1.0, &b).unwrap(), 2.5));
        assert!(close(latency_quantile_ms(0.0, &b).unwrap(), 1.0));
        // The first bucket starts at 0.
        let b = hist(&[(0, 10)]);
        assert!(close(latency_quantile_ms(0.5, &b).unwrap(), 0.05));
    }

    #[test]
    fn percentiles_spread_over_buckets() {
        // 50 in (0, 0.1], 40 in (0.1, 0.25], 10 in (50, 100] ms.
        let b = hist(&[(0, 50), (1, 40), (9, 10)]);
        assert!(close(latency_quantile_ms(0.5, &b).unwrap(), 0.1));
        assert!(close(
            latency_quantile_ms(0.7, &b).unwrap(),
            0.1 + 0.15 * 0.5
        ));
        assert!(close(latency_quantile_ms(0.9, &b).unwrap(), 0.25));
        assert!(close(
            latency_quantile_ms(0.99, &b).unwrap(),
            50.0 + 50.0 * 0.9
        ));
        let w = window_of(
            &Counters {
                latency: b,
                ..Counters::default()
            },
            10.0,
        );
        assert!(close(w.latency_p50_ms.unwrap(), 0.1));
        assert!(close(w.latency_p99_ms.unwrap(), 95.0));
    }

    #[test]
    fn percentiles_in_the_inf_bucket_are_the_last_bound() {
        let b = hist(&[(0, 1), (LATENCY_BUCKETS - 1, 99)]);
        assert_eq!(latency_quantile_ms(0.5, &b), Some(2500.0));
        assert_eq!(latency_quantile_ms(0.99, &b), Some(2500.0));
        assert!(close(latency_quantile_ms(0.01, &b).unwrap(), 0.1));
        assert_eq!(latency_quantile_ms(0.5, &hist(&[])), None);
        assert_eq!(latency_quantile_ms(f64::NAN, &b), None);
    }

    #[test]
    fn window_of_without_attempts_or_time() {
        let w = window_of(&Counters::default(), 0.0);
        assert_eq!(w.error_rate, None);
        assert_eq!(w.latency_p99_ms, None);
        assert_eq!(w.attempts_per_sec, 0.0);
        let w = window_of(&c(10, 2), f64::NAN);
        assert_eq!((w.seconds, w.attempts_per_sec), (0.0, 0.0));
        assert_eq!(w.error_rate, Some(0.2));
        let w = window_of(&c(10, 2), -5.0);
        assert_eq!(w.seconds, 0.0);
        // Resets of older connections may outnumber the window's attempts.
        let w = window_of(
            &Counters {
                attempts: 2,
                reset_by_backend: 9,
                ..Counters::default()
            },
            1.0,
        );
        assert_eq!(w.error_rate, Some(1.0));
    }

    #[test]
    fn varints_round_trip() {
        let mut buf = VecDeque::new();
        let values = [0, 1, 127, 128, 16383, 16384, u64::MAX / 3, u64::MAX];
        for v in values {
            push_varint(&mut buf, v);
        }
        let mut it = buf.iter().copied();
        for v in values {
            assert_eq!(read_varint(&mut it), v);
        }
        assert_eq!(read_varint(&mut it), 0);
    }

    fn counters() -> impl Strategy<Value = Counters> {
        (any::<[u32; 9]>(), any::<[u16; LATENCY_BUCKETS]>()).prop_map(|(f, l)| Counters {
            attempts: f[0].into(),
            established: f[1].into(),
            refused: f[2].into(),
            timeouts: f[3].into(),
            reset_by_backend: f[4].into(),
            reset_by_client: f[5].into(),
            packets: f[6].into(),
            reply_packets: f[7].into(),
            latency_sum_us: f[8].into(),
            latency: l.map(u64::from),
        })
    }

    proptest! {
        #[test]
        fn error_rate_is_a_rate_and_rates_are_not_negative(
            samples in prop::collection::vec(counters(), 1..40),
            steps in prop::collection::vec(1u64..5000, 40),
            len_ms in 0u64..200_000,
        ) {
            let mut h = History::new(30);
            let mut t = 0;
            for (x, dt) in samples.iter().zip(&steps) {
                t += dt;
                h.record(t, [(1u8, *x)]);
            }
            if let Some(w) = h.window(&1, t, len_ms) {
                prop_assert!(w.attempts_per_sec >= 0.0 && w.attempts_per_sec.is_finite());
                prop_assert!(w.seconds >= 0.0 && w.seconds <= len_ms as f64 / 1000.0);
                if let Some(r) = w.error_rate {
                    prop_assert!((0.0..=1.0).contains(&r));
                }
                for p in [w.latency_p50_ms, w.latency_p90_ms, w.latency_p99_ms].into_iter().flatten() {
                    prop_assert!((0.0..=2500.0).contains(&p));
                }
                prop_assert!(w.latency_p50_ms <= w.latency_p90_ms && w.latency_p90_ms <= w.latency_p99_ms);
            }
        }

        #[test]
        fn monotone_counters_give_last_minus_first(
            incs in prop::collection::vec(counters(), 2..50),
            first in counters(),
        ) {
            let mut h = History::new(60);
            let mut x = first;
            h.record(0, [("k", x)]);
            for (i, inc) in incs.iter().enumerate() {
                x.add(inc);
                h.record((i as u64 + 1) * 1000, [("k", x)]);
            }
            let now = incs.len() as u64 * 1000;
            let w = h.window(&"k", now, now).unwrap();
            let mut expect = x;
            // last - first, field by field.
            let f = to_fields(&first);
            let mut e = to_fields(&expect);
            for (a, b) in e.iter_mut().zip(f) {
                *a -= b;
            }
            expect = from_fields(&e);
            prop_assert_eq!(w, window_of(&expect, incs.len() as f64));
        }

        #[test]
        fn window_sum_is_the_sum_of_the_parts(
            a in prop::collection::vec(counters(), 2..20),
            b in prop::collection::vec(counters(), 2..20),
            len_ms in 1000u64..30_000,
        ) {
            let mut h = History::new(60);
            let n = a.len().max(b.len());
            for i in 0..n {
                let mut s = vec![];
                if let Some(x) = a.get(i) { s.push((0u8, *x)); }
                // "b" joins late.
                if i + b.len() >= n { s.push((1u8, b[i + b.len() - n])); }
                h.record(i as u64 * 1000, s);
            }
            let now = (n as u64 - 1) * 1000;
            let parts: Vec<Window> = [0u8, 1].iter().filter_map(|k| h.window(k, now, len_ms)).collect();
            let sum = h.window_sum([&0u8, &1], now, len_ms);
            prop_assert_eq!(sum.is_some(), !parts.is_empty());
            if let Some(sum) = sum {
                prop_assert_eq!(sum.attempts, parts.iter().map(|w| w.attempts).sum::<u64>());
                prop_assert_eq!(sum.timeouts, parts.iter().map(|w| w.timeouts).sum::<u64>());
                for i in 0..LATENCY_BUCKETS {
                    prop_assert_eq!(sum.latency[i], parts.iter().map(|w| w.latency[i]).sum::<u64>());
                }
                let longest = parts.iter().map(|w| w.seconds).fold(0.0, f64::max);
                prop_assert_eq!(sum.seconds, longest);
            }
        }
    }
}
