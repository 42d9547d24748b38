//! Weight math and the weighted Maglev table builder. This module owns how a
//! service's version weights become hash thresholds and how a version's
//! backends become a `MaglevTable`. Pure: no I/O, no randomness, no
//! process-dependent hashing, so the same configuration gives the same
//! tables on every node (several edges behind ECMP then agree on every flow).
//!
//! - [`version_thresholds`] turns version weights into cumulative ranges of
//!   the 32-bit version hash; [`pick_version`] is the kernel's lookup.
//! - [`maglev_table`] fills `MAGLEV_SIZE` slots with backend ids following
//!   Maglev (Eisenbud et al., NSDI 2016, §3.4, Pseudocode 1) with weighted
//!   turns; [`maglev_lookup`] is the kernel's lookup.
//!
//! ```
//! use splitter::table::{MaglevBackend, maglev_lookup, maglev_table, pick_version, version_thresholds};
//!
//! // 90 % blue, 10 % green.
//! let thresholds = version_thresholds(&[90, 10]).unwrap();
//! assert_eq!(pick_version(&thresholds, 2, 0), 0);
//! assert_eq!(pick_version(&thresholds, 2, u32::MAX), 1);
//!
//! let table = maglev_table(&[
//!     MaglevBackend { key: "10.0.2.2:8080", weight: 1, id: 7 },
//!     MaglevBackend { key: "10.0.2.3:8080", weight: 2, id: 8 },
//! ])
//! .unwrap();
//! assert!([7, 8].contains(&maglev_lookup(&table, 12345)));
//! ```
//!
//! # Properties (`MAGLEV_SIZE` = 16381; each one is checked by a test below)
//! - Weights: every backend gets the floor or the ceiling of its exact share
//!   `MAGLEV_SIZE * weight / total` (largest-remainder split). So 100 equal
//!   backends get 163 or 164 slots each.
//! - Equal weights give exactly the paper's table.
//! - Disruption, equal weights: removing one of N backends rewrites about
//!   1.05/N of the slots for N = 10, 1.5/N for N = 50 and 2.4/N for N = 100
//!   (measured worst: 1.6/N + 1 % of the table; slots of the other backends
//!   that move: under 2 %). Maglev pays for its balance with this extra
//!   movement. Established flows are not affected (the connection table
//!   pins them); it matters for new flows and client-IP affinity.
//! - Known weak spot: two keys whose `skip` is equal (about N² / 33000 of
//!   sets of N backends, so 0.3 % at N = 10, 26 % at N = 100) walk the same
//!   cycle shifted, and removals in such a set move up to twice as much
//!   (measured worst: 0.67 instead of 0.34 of the table at N = 3, 0.038
//!   instead of 0.031 at N = 50). The paper's permutation is kept; a
//!   permutation family without shifted twins (e.g. a per-backend
//!   multiplicative step) would avoid it.
//! - Speed: 0.3-0.5 ms for 100 backends in a release build.
use splitter_common::{MAGLEV_SIZE, MAX_VERSIONS, MaglevTable, NO_BACKEND};

/// Table-building errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// No versions given.
    #[error("a service needs at least one version")]
    NoVersions,
    /// More versions than the data plane holds.
    #[error("{0} versions given; at most {MAX_VERSIONS} are supported")]
    TooManyVersions(usize),
    /// Every weight is zero.
    #[error("all version weights are 0: at least one version needs weight > 0")]
    AllZero,
    /// Two backends share a key.
    #[error("backend {0} is listed twice")]
    DuplicateBackend(String),
    /// More backends than slots.
    #[error("{0} backends given; a table holds at most {MAGLEV_SIZE}")]
    TooManyBackends(usize),
    /// A backend uses the id that marks an empty slot.
    #[error("backend {0} has id {NO_BACKEND}, which is reserved for \"no backend\"")]
    ReservedId(String),
}

/// The upper end of the hash space (exclusive) as a threshold.
pub const HASH_SPACE: u64 = 1 << 32;

/// Cumulative upper bounds of each version's share of the 32-bit hash
/// space: version `i` takes hashes `h` with `t[i-1] <= h < t[i]` (and
/// `t[-1] = 0`). Entry `i` is `floor((w_0 + ... + w_i) << 32 / total)`, so
/// the last used entry, and every unused one, is exactly `1 << 32`, and a
/// version of weight 0 gets an empty range.
///
/// With two versions, moving weight from version 0 to version 1 only moves
/// hashes from 0 to 1. With more, raising the last version's weight moves
/// every boundary down: hashes only ever move to a later version, but some
/// move between the earlier versions too (ranges are contiguous in version
/// order, as the kernel reads them).
///
/// # Errors
/// No weights, more than `MAX_VERSIONS`, or all zero.
pub fn version_thresholds(weights: &[u32]) -> Result<[u64; MAX_VERSIONS], TableError> {
    if weights.is_empty() {
        return Err(TableError::NoVersions);
    }
    if weights.len() > MAX_VERSIONS {
        return Err(TableError::TooManyVersions(weights.len()));
    }
    let total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
    if total == 0 {
        return Err(TableError::AllZero);
    }
    let mut out = [HASH_SPACE; MAX_VERSIONS];
    let mut cum: u128 = 0;
    for (slot, w) in out.iter_mut().zip(weights) {
        cum += u128::from(*w);
        // cum <= total, so the quotient is at most 1 << 32 and fits in u64.
        *slot = u64::try_from((cum << 32) / total).unwrap_or(HASH_SPACE);
    }
    Ok(out)
}

/// The version a version hash picks, as the kernel does it: the first `i <
/// count` with `h < thresholds[i]`. `h` is the *version* hash
/// (`splitter_common::version_hash` of the flow hash). Returns `count` if no
/// range holds `h` (the kernel drops such a packet), which cannot happen for
/// thresholds from [`version_thresholds`] with `count` = the number of
/// weights.
pub fn pick_version(thresholds: &[u64; MAX_VERSIONS], count: usize, h: u32) -> usize {
    let h = u64::from(h);
    thresholds
        .iter()
        .take(count)
        .position(|t| h < *t)
        .unwrap_or(count)
}

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity, the same on every node (e.g. `"10.0.2.2:8080"`):
    /// it alone decides the backend's permutation of the slots.
    pub key: &'a str,
    /// Relative weight; 0 gets no slots.
    pub weight: u32,
    /// Value written into the table (the data plane's backend id).
    pub id: u16,
}

/// FNV-1a over `bytes`, started from a seeded basis and finished with
/// splitmix64's finalizer (FNV alone mixes the low bits of short keys
/// poorly). Fixed, so tables never depend on the process or the platform.
fn key_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Seeds of the two hashes a key's permutation comes from.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031;
const SKIP_SEED: u64 = 0x736b_6970_7370_6c74;

/// A backend while the table fills: where it is in its permutation
/// `offset, offset + skip, ...` (mod `MAGLEV_SIZE`) and how many slots it
/// still has to take.
struct Walk {
    /// Next slot to try; always `< MAGLEV_SIZE`.
    slot: u32,
    /// In `1..MAGLEV_SIZE`: as the size is prime, the walk visits every slot.
    skip: u32,
    /// Written into the slots this backend takes.
    id: u16,
    /// Slots still to take (its apportioned share).
    wants: u32,
}

impl Walk {
    fn new(b: &MaglevBackend<'_>) -> Self {
        let m = u64::from(MAGLEV_SIZE);
        // Both remainders are below MAGLEV_SIZE, so the conversions hold.
        let offset = key_hash(OFFSET_SEED, b.key.as_bytes()) % m;
        let skip = key_hash(SKIP_SEED, b.key.as_bytes()) % (m - 1) + 1;
        Self {
            slot: u32::try_from(offset).unwrap_or(0),
            skip: u32::try_from(skip).unwrap_or(1),
            id: b.id,
            wants: 0,
        }
    }

    /// Takes the next free slot of the permutation. The table must have a
    /// free slot; then the loop ends within `MAGLEV_SIZE` steps.
    fn take(&mut self, slots: &mut [u16]) {
        while slots[self.slot as usize] != NO_BACKEND {
            self.slot += self.skip;
            if self.slot >= MAGLEV_SIZE {
                self.slot -= MAGLEV_SIZE;
            }
        }
        slots[self.slot as usize] = self.id;
        self.wants -= 1;
    }
}

/// Splits `MAGLEV_SIZE` slots by weight with the largest-remainder
/// (Hamilton) method: everyone gets `floor(M * w / total)`, and the slots
/// left over go one each to the largest remainders, ties in `sorted` order.
/// Every count is the floor or the ceiling of the exact share.
fn apportion(sorted: &[&MaglevBackend<'_>], walks: &mut [Walk]) {
    let m = u64::from(MAGLEV_SIZE);
    // At most MAGLEV_SIZE weights of at most u32::MAX: no overflow in u64.
    let total: u64 = sorted.iter().map(|b| u64::from(b.weight)).sum();
    let mut given = 0u64;
    let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(sorted.len());
    for (i, (b, walk)) in sorted.iter().zip(walks.iter_mut()).enumerate() {
        let exact = m * u64::from(b.weight);
        // The floor is at most MAGLEV_SIZE.
        walk.wants = u32::try_from(exact / total).unwrap_or(MAGLEV_SIZE);
        given += u64::from(walk.wants);
        remainders.push((exact % total, i));
    }
    // Stable: equal remainders keep `sorted` order.
    remainders.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (_, i) in remainders.iter().take((m - given) as usize) {
        walks[*i].wants += 1;
    }
}

/// The backends of one weight, which take their turns together.
struct Group {
    /// Their weight.
    weight: u64,
    /// They are `walks[start..end]`, in key order.
    start: usize,
    end: usize,
    /// Turn accumulator in halves of the heaviest weight `W`, so that turns
    /// round to nearest: it starts at `W` (one half), gains `2 * weight`
    /// per round, and a turn is due whenever it reaches `2 * W`.
    acc: u64,
}

/// Builds the weighted Maglev table of one version.
///
/// Each backend walks its own permutation of the slots (`offset = h1 %
/// M`, `skip = h2 % (M - 1) + 1` from two fixed hashes of its key) and, on
/// its turn, takes the next slot of that permutation nobody holds yet
/// (the paper's Pseudocode 1).
///
/// Weights enter twice:
/// - *How many* slots: the largest-remainder split of `MAGLEV_SIZE` by
///   weight, so every backend gets the floor or the ceiling of its exact
///   share `M * w / total` (a backend whose share is below half a slot may
///   get none). A backend stops taking turns once it has its count.
/// - *When* it takes them: the table fills in rounds; after round `r`, a
///   backend of weight `w` has had `round(r * w / W)` turns, `W` being the
///   largest weight (Bresenham-style accumulators). So all backends reach
///   their counts together, as in the unweighted algorithm, instead of the
///   heavy ones taking the last, most contested slots. Within a round,
///   heavier backends go first, then key order.
///
/// Equal weights reduce exactly to the paper's Maglev: one turn each per
/// round in key order, the first `M mod N` backends one slot more. Backends
/// of one weight share an accumulator, so a round costs one step per
/// distinct weight.
///
/// The result depends only on the set of `(key, weight, id)`, not on
/// their order. Weight-0 backends get no slots, exactly as if absent; with
/// no positive weight the table is all `NO_BACKEND` (the kernel counts the
/// drops).
///
/// # Errors
/// Duplicate keys, more backends than slots, or the reserved id
/// `NO_BACKEND` on a backend with weight.
pub fn maglev_table(backends: &[MaglevBackend<'_>]) -> Result<Box<MaglevTable>, TableError> {
    if backends.len() > MAGLEV_SIZE as usize {
        return Err(TableError::TooManyBackends(backends.len()));
    }
    let mut sorted: Vec<&MaglevBackend<'_>> = backends.iter().collect();
    sorted.sort_unstable_by(|a, b| a.key.cmp(b.key));
    if let Some(pair) = sorted.windows(2).find(|p| p[0].key == p[1].key) {
        return Err(TableError::DuplicateBackend(pair[0].key.to_string()));
    }
    sorted.retain(|b| b.weight > 0);
    if let Some(b) = sorted.iter().find(|b| b.id == NO_BACKEND) {
        return Err(TableError::ReservedId(b.key.to_string()));
    }
    let mut table = Box::new(MaglevTable::default());
    // Heaviest first; the sort is stable, so key order within a weight.
    sorted.sort_by_key(|b| std::cmp::Reverse(b.weight));
    let Some(heaviest) = sorted.first().map(|b| u64::from(b.weight)) else {
        return Ok(table);
    };
    let mut walks: Vec<Walk> = sorted.iter().map(|b| Walk::new(b)).collect();
    apportion(&sorted, &mut walks);
    let mut groups: Vec<Group> = Vec::new();
    for (i, b) in sorted.iter().enumerate() {
        let weight = u64::from(b.weight);
        match groups.last_mut() {
            Some(g) if g.weight == weight => g.end = i + 1,
            _ => groups.push(Group {
                weight,
                start: i,
                end: i + 1,
                acc: heaviest,
            }),
        }
    }
    let slots = &mut table.slots[..];
    // The counts add up to the table size, so the table is full exactly
    // when every backend has its count, and a backend with slots to take
    // always finds one.
    let mut left: u32 = walks.iter().map(|w| w.wants).sum();
    while left > 0 {
        let before = left;
        for g in &mut groups {
            g.acc += 2 * g.weight;
            if g.acc < 2 * heaviest {
                continue;
            }
            g.acc -= 2 * heaviest;
            for walk in &mut walks[g.start..g.end] {
                if walk.wants > 0 {
                    walk.take(slots);
                    left -= 1;
                }
            }
        }
        if left == before {
            // Only backends far lighter than the heaviest still want slots
            // (their share's remainder won them one more): skip the idle
            // rounds up to the next turn of one of them, which may be
            // billions of rounds away with extreme weights.
            let wanting = |g: &Group| walks[g.start..g.end].iter().any(|w| w.wants > 0);
            let skip = groups
                .iter()
                .filter(|g| wanting(g))
                .map(|g| (2 * heaviest - g.acc).div_ceil(2 * g.weight))
                .min()
                .unwrap_or(1)
                - 1;
            for g in groups.iter_mut().filter(|g| wanting(g)) {
                g.acc += 2 * g.weight * skip;
            }
        }
    }
    Ok(table)
}

/// The backend id a flow hash picks in a table (what the kernel does).
pub fn maglev_lookup(table: &MaglevTable, h: u32) -> u16 {
    table.slots[(h % MAGLEV_SIZE) as usize]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const M: usize = MAGLEV_SIZE as usize;

    /// `n` distinct keys in one /8 (the set the documented figures use).
    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    /// `n` distinct keys that look like arbitrary backends, from `seed`.
    fn random_keys(n: usize, seed: u64) -> Vec<String> {
        let mut s = seed;
        let mut out = std::collections::BTreeSet::new();
        while out.len() < n {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let x = s >> 16;
            out.insert(format!(
                "{}.{}.{}.{}:{}",
                x & 0xff,
                (x >> 8) & 0xff,
                (x >> 16) & 0xff,
                (x >> 24) & 0xff,
                1 + (x >> 32) % 65535
            ));
        }
        out.into_iter().collect()
    }

    fn backends<'a>(keys: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        keys.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (k, w))| MaglevBackend {
                key: k,
                weight: *w,
                id: i as u16,
            })
            .collect()
    }

    fn build(keys: &[String], weights: &[u32]) -> Box<MaglevTable> {
        maglev_table(&backends(keys, weights)).unwrap()
    }

    fn counts(t: &MaglevTable, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for s in t.slots {
            c[s as usize] += 1;
        }
        c
    }

    fn skip_of(key: &str) -> u32 {
        Walk::new(&MaglevBackend {
            key,
            weight: 1,
            id: 0,
        })
        .skip
    }

    /// Whether two keys walk the same cycle (equal `skip`): their
    /// permutations are then shifts of each other, Maglev's known weak spot
    /// for disruption (see the module header).
    fn shares_a_skip(keys: &[String]) -> bool {
        let mut skips: Vec<u32> = keys.iter().map(|k| skip_of(k)).collect();
        skips.sort_unstable();
        skips.windows(2).any(|w| w[0] == w[1])
    }

    /// The paper's Pseudocode 1, written as plainly as possible, with the
    /// permutation of `Walk::new`.
    fn reference_maglev(keys: &[String]) -> Vec<u16> {
        let mut sorted: Vec<(usize, &String)> = keys.iter().enumerate().collect();
        sorted.sort_by(|a, b| a.1.cmp(b.1));
        let m = M as u64;
        let perm: Vec<(u64, u64)> = sorted
            .iter()
            .map(|(_, k)| {
                (
                    key_hash(OFFSET_SEED, k.as_bytes()) % m,
                    key_hash(SKIP_SEED, k.as_bytes()) % (m - 1) + 1,
                )
            })
            .collect();
        let mut next = vec![0u64; sorted.len()];
        let mut entry = vec![NO_BACKEND; M];
        let mut n = 0;
        loop {
            for (i, (id, _)) in sorted.iter().enumerate() {
                let mut c = (perm[i].0 + next[i] * perm[i].1) % m;
                while entry[c as usize] != NO_BACKEND {
                    next[i] += 1;
                    c = (perm[i].0 + next[i] * perm[i].1) % m;
                }
                entry[c as usize] = *id as u16;
                next[i] += 1;
                n += 1;
                if n == M {
                    return entry;
                }
            }
        }
    }

    /// The largest-remainder split, independently: floors first, then one
    /// more slot each by largest remainder, ties heaviest first, then key.
    fn hamilton(keys: &[String], weights: &[u32]) -> Vec<usize> {
        let total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
        let mut out: Vec<usize> = weights
            .iter()
            .map(|w| (M as u128 * u128::from(*w) / total) as usize)
            .collect();
        let mut order: Vec<usize> = (0..weights.len()).filter(|i| weights[*i] > 0).collect();
        order.sort_by(|a, b| {
            let rem = |i: usize| M as u128 * u128::from(weights[i]) % total;
            rem(*b)
                .cmp(&rem(*a))
                .then(weights[*b].cmp(&weights[*a]))
                .then(keys[*a].cmp(&keys[*b]))
        });
        let left = M - out.iter().sum::<usize>();
        for i in &order[..left] {
            out[*i] += 1;
        }
        out
    }

    /// Fraction of all slots that differ, and fraction of the slots
    /// `before` did not give to `gone` that differ.
    fn moved(before: &MaglevTable, after: &MaglevTable, gone: u16) -> (f64, f64) {
        let pairs = || before.slots.iter().zip(after.slots.iter());
        let changed = pairs().filter(|(a, b)| a != b).count();
        let kept_owner = before.slots.iter().filter(|s| **s != gone).count();
        let others_moved = pairs().filter(|(a, b)| **a != gone && a != b).count();
        (
            changed as f64 / M as f64,
            others_moved as f64 / kept_owner.max(1) as f64,
        )
    }

    #[test]
    fn equal_weights_are_the_papers_maglev() {
        for n in [1, 2, 7, 100, 1000] {
            let k = random_keys(n, n as u64);
            assert_eq!(build(&k, &vec![1; n]).slots.to_vec(), reference_maglev(&k));
            // Any common weight is the same as weight 1.
            assert_eq!(build(&k, &vec![1; n]), build(&k, &vec![977; n]));
        }
    }

    #[test]
    fn hundred_equal_backends_are_balanced() {
        let t = build(&keys(100), &[1; 100]);
        let c = counts(&t, 100);
        let mean = M as f64 / 100.0;
        let max = *c.iter().max().unwrap() as f64;
        let min = *c.iter().min().unwrap() as f64;
        assert!(max / mean <= 1.05, "max/mean = {}", max / mean);
        assert!(min / mean >= 0.95, "min/mean = {}", min / mean);
        assert_eq!((min, max), (163.0, 164.0));
    }

    #[test]
    fn weights_give_proportional_shares() {
        let k = keys(3);
        let c = counts(&build(&k, &[1, 2, 3]), 3);
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = c[i] as f64 / M as f64;
            assert!((got - want).abs() < 0.02, "backend {i}: {got} vs {want}");
        }
        // 16381 = 6 * 2730 + 1: the one slot left goes to the largest
        // remainder, the weight-3 backend's.
        assert_eq!(c, vec![2730, 5460, 8191]);
    }

    #[test]
    fn extreme_weights_finish_and_keep_the_split() {
        // A remainder wins the last slot for a backend 4 billion times
        // lighter than the others: the builder must skip the idle rounds.
        for w in [
            vec![u32::MAX, u32::MAX, 1],
            vec![u32::MAX, 1],
            vec![u32::MAX, u32::MAX - 1, 3, 2, 1],
            vec![1000, 1],
        ] {
            let k = keys(w.len());
            let start = std::time::Instant::now();
            let c = counts(&build(&k, &w), w.len());
            assert_eq!(c, hamilton(&k, &w), "weights {w:?}");
            assert!(
                start.elapsed().as_secs() < 2,
                "weights {w:?} took {:?}",
                start.elapsed()
            );
        }
    }

    #[test]
    fn zero_weights_and_empty_give_an_empty_table() {
        let k = keys(2);
        assert!(build(&k, &[0, 0]).slots.iter().all(|s| *s == NO_BACKEND));
        assert!(
            maglev_table(&[])
                .unwrap()
                .slots
                .iter()
                .all(|s| *s == NO_BACKEND)
        );
        // Weight 0 gets nothing; a lone weighted backend gets everything.
        assert!(build(&k, &[0, 5]).slots.iter().all(|s| *s == 1));
        // A weight-0 backend is exactly as if absent (draining = removing).
        let k3 = keys(3);
        let without: Vec<MaglevBackend> = backends(&k3, &[2, 0, 3])
            .into_iter()
            .filter(|b| b.weight > 0)
            .collect();
        assert_eq!(build(&k3, &[2, 0, 3]), maglev_table(&without).unwrap());
    }

    #[test]
    fn duplicates_overflow_and_reserved_ids_are_refused() {
        let b = |key, id| MaglevBackend { key, weight: 1, id };
        assert_eq!(
            maglev_table(&[b("a", 0), b("b", 1), b("a", 2)]).unwrap_err(),
            TableError::DuplicateBackend("a".into())
        );
        assert_eq!(
            maglev_table(&[b("a", NO_BACKEND)]).unwrap_err(),
            TableError::ReservedId("a".into())
        );
        // The reserved id is harmless on a backend that gets no slot.
        let idle = MaglevBackend {
            key: "b",
            weight: 0,
            id: NO_BACKEND,
        };
        assert!(maglev_table(&[b("a", 1), idle]).is_ok());
        let k = keys(M + 1);
        let many: Vec<MaglevBackend> = k.iter().map(|k| b(k, 0)).collect();
        assert_eq!(
            maglev_table(&many).unwrap_err(),
            TableError::TooManyBackends(M + 1)
        );
        assert!(
            TableError::TooManyBackends(M + 1)
                .to_string()
                .contains("at most 16381")
        );
        // Exactly as many backends as slots is fine: one slot each.
        let many: Vec<MaglevBackend> = k[..M]
            .iter()
            .enumerate()
            .map(|(i, k)| b(k, i as u16))
            .collect();
        let c = counts(&maglev_table(&many).unwrap(), M);
        assert!(c.iter().all(|n| *n == 1));
    }

    #[test]
    fn shared_skip_still_gives_a_valid_balanced_table() {
        // Find two keys that walk the same cycle.
        let pool = random_keys(2000, 7);
        let mut seen = std::collections::HashMap::new();
        let pair = pool
            .iter()
            .find_map(|k| seen.insert(skip_of(k), k.clone()).map(|o| [o, k.clone()]))
            .unwrap();
        let mut k = pair.to_vec();
        k.push(pool[0].clone());
        assert!(shares_a_skip(&k));
        let c = counts(&build(&k, &[1, 1, 1]), 3);
        assert_eq!(c, hamilton(&k, &[1, 1, 1]));
        let t = build(&k, &[1, 1, 0]);
        assert!(t.slots.iter().all(|s| *s < 2));
    }

    #[test]
    fn documented_disruption_figures_hold() {
        // The figures in splitter_common::MAGLEV_SIZE's doc and this module's
        // header: mean slots moved when one of N equal backends goes, in
        // units of 1/N.
        for (n, documented) in [(10, 1.05), (50, 1.5), (100, 2.4)] {
            let k = keys(n);
            assert!(!shares_a_skip(&k));
            let before = build(&k, &vec![1; n]);
            let mut sum = 0.0;
            let victims: Vec<usize> = (0..n).step_by(n / 10).collect();
            for &gone in &victims {
                let mut w = vec![1; n];
                w[gone] = 0;
                let (frac, _) = moved(&before, &build(&k, &w), gone as u16);
                sum += frac * n as f64;
            }
            let mean = sum / victims.len() as f64;
            assert!(
                (mean - documented).abs() < 0.1,
                "n={n}: mean {mean:.2}/N, documented {documented}/N"
            );
        }
    }

    #[test]
    fn thresholds_split_the_hash_space_by_weight() {
        let t = version_thresholds(&[90, 10]).unwrap();
        assert_eq!(
            t,
            [(HASH_SPACE * 9) / 10, HASH_SPACE, HASH_SPACE, HASH_SPACE]
        );
        assert_eq!(version_thresholds(&[0, 1]).unwrap()[0], 0);
        assert_eq!(
            version_thresholds(&[7]).unwrap(),
            [HASH_SPACE; MAX_VERSIONS]
        );
        assert_eq!(
            version_thresholds(&[u32::MAX; MAX_VERSIONS]).unwrap(),
            [
                HASH_SPACE / 4,
                HASH_SPACE / 2,
                HASH_SPACE / 4 * 3,
                HASH_SPACE
            ]
        );
        assert_eq!(version_thresholds(&[]), Err(TableError::NoVersions));
        assert_eq!(version_thresholds(&[0, 0]), Err(TableError::AllZero));
        assert_eq!(
            version_thresholds(&[1; 5]),
            Err(TableError::TooManyVersions(5))
        );
        // A weight-0 version owns no hash at all.
        let t = version_thresholds(&[5, 0, 5]).unwrap();
        assert_eq!(t[0], t[1]);
        for h in [
            0u32,
            1,
            u32::MAX / 2 - 1,
            u32::MAX / 2,
            u32::MAX / 2 + 1,
            u32::MAX,
        ] {
            assert_ne!(pick_version(&t, 3, h), 1);
        }
        assert_eq!(pick_version(&t, 3, u32::MAX), 2);
        assert_eq!(pick_version(&t, 3, 0), 0);
        // Beyond `count` nothing matches.
        assert_eq!(pick_version(&[0; MAX_VERSIONS], 2, 0), 2);
    }

    #[test]
    fn share_of_hashes_matches_weights() {
        let t = version_thresholds(&[90, 10]).unwrap();
        let n = 100_000u32;
        let canary = (0..n)
            .filter(|i| pick_version(&t, 2, splitter_common::version_hash(*i)) == 1)
            .count();
        let share = canary as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.005, "{share}");
    }

    #[test]
    fn lookup_reads_the_slot_of_the_hash() {
        let mut t = MaglevTable::default();
        t.slots[5] = 42;
        assert_eq!(maglev_lookup(&t, 5), 42);
        assert_eq!(maglev_lookup(&t, 5 + MAGLEV_SIZE), 42);
        assert_eq!(maglev_lookup(&t, 6), NO_BACKEND);
        assert_eq!(maglev_lookup(&t, u32::MAX), NO_BACKEND);
    }

    #[test]
    #[ignore = "timing; run with --release -- --ignored"]
    fn thousand_services_of_hundred_backends_build_in_a_second() {
        let k = random_keys(100, 1);
        for w in [vec![1; 100], (1..=100).collect::<Vec<u32>>()] {
            let b = backends(&k, &w);
            let start = std::time::Instant::now();
            for _ in 0..1000 {
                std::hint::black_box(maglev_table(std::hint::black_box(&b)).unwrap());
            }
            let took = start.elapsed();
            eprintln!("1000 tables of 100 backends: {took:?}");
            assert!(took.as_secs_f64() < 1.0, "{took:?}");
        }
    }

    proptest! {
        #[test]
        fn same_set_in_any_order_gives_the_same_table(
            n in 1usize..40,
            weights in prop::collection::vec(0u32..5, 40),
            seed in any::<u64>(),
        ) {
            let k = random_keys(n, seed);
            let mut b = backends(&k, &weights[..n]);
            let first = maglev_table(&b).unwrap();
            b.reverse();
            prop_assert_eq!(&first, &maglev_table(&b).unwrap());
            // Deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..b.len()).rev() {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                b.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(first, maglev_table(&b).unwrap());
        }

        #[test]
        fn every_backend_gets_the_floor_or_ceiling_of_its_share(
            weights in prop::collection::vec(
                prop_oneof![0u32..=3, 0u32..=1000, any::<u32>()], 1..30),
            seed in any::<u64>(),
        ) {
            let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
            prop_assume!(total > 0);
            let k = random_keys(weights.len(), seed);
            let c = counts(&build(&k, &weights), weights.len());
            prop_assert_eq!(&c, &hamilton(&k, &weights));
            for (i, w) in weights.iter().enumerate() {
                let exact = M as f64 * f64::from(*w) / total as f64;
                prop_assert!((c[i] as f64 - exact).abs() < 1.0);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn removing_one_of_n_moves_about_one_nth(
            n in 5usize..=100,
            victim in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let k = random_keys(n, seed);
            prop_assume!(!shares_a_skip(&k));
            let before = build(&k, &vec![1; n]);
            let gone = victim.index(n);
            let rest: Vec<MaglevBackend> = backends(&k, &vec![1; n])
                .into_iter()
                .filter(|b| b.id as usize != gone)
                .collect();
            let after = maglev_table(&rest).unwrap();
            // Every slot of the removed backend went to someone else.
            prop_assert!(after.slots.iter().all(|s| *s as usize != gone && *s != NO_BACKEND));
            let (frac, others) = moved(&before, &after, gone as u16);
            // At least its own 1/N moved; Maglev moves some more, the
            // price of its balance (measured worst: 1.6/N + 1 %).
            prop_assert!(frac >= 0.99 / n as f64);
            prop_assert!(frac <= 1.6 / n as f64 + 0.015,
                "n={} moved {:.4} = {:.2}/N", n, frac, frac * n as f64);
            // Slots of the other backends mostly stay (measured worst: 1.8 %).
            prop_assert!(others <= 0.025, "n={} others moved {:.4}", n, others);
        }

        #[test]
        fn removing_a_weighted_backend_moves_little_more_than_its_share(
            weights in prop::collection::vec(1u32..=10, 2..30),
            victim in any::<prop::sample::Index>(),
            seed in any::<u64>(),
        ) {
            let n = weights.len();
            let k = random_keys(n, seed);
            prop_assume!(!shares_a_skip(&k));
            let gone = victim.index(n);
            let before = build(&k, &weights);
            let mut w = weights.clone();
            w[gone] = 0;
            let after = build(&k, &w);
            prop_assert!(after.slots.iter().all(|s| *s as usize != gone));
            let share = f64::from(weights[gone]) / weights.iter().map(|w| f64::from(*w)).sum::<f64>();
            let (frac, _) = moved(&before, &after, gone as u16);
            // Measured worst: 2 * share + 1 %.
            prop_assert!(frac <= 2.0 * share + 0.02, "moved {frac:.4}, share {share:.4}");
        }
    }

    proptest! {
        #[test]
        fn thresholds_are_cumulative_and_exact(weights in prop::collection::vec(any::<u32>(), 1..=MAX_VERSIONS)) {
            let total: u128 = weights.iter().map(|w| u128::from(*w)).sum();
            prop_assume!(total > 0);
            let t = version_thresholds(&weights).unwrap();
            let mut cum = 0u128;
            let mut prev = 0u64;
            for (i, w) in weights.iter().enumerate() {
                cum += u128::from(*w);
                prop_assert_eq!(u128::from(t[i]), (cum << 32) / total);
                prop_assert!(t[i] >= prev);
                // Each range is its exact share of 2^32, within one hash.
                let exact = (u128::from(*w) << 32) as f64 / total as f64;
                prop_assert!(((t[i] - prev) as f64 - exact).abs() <= 1.0);
                prev = t[i];
            }
            prop_assert!(t[weights.len() - 1..].iter().all(|x| *x == HASH_SPACE));
        }

        #[test]
        fn moving_share_to_the_canary_only_moves_flows_onto_it(
            total in 1u32..=1_000_000,
            a in 0.0f64..=1.0,
            b in 0.0f64..=1.0,
            hashes in prop::collection::vec(any::<u32>(), 64),
        ) {
            // Canary weight grows from `lo` to `hi`; the sum stays `total`.
            let lo = (a.min(b) * f64::from(total)) as u32;
            let hi = ((a.max(b) * f64::from(total)) as u32).max(lo);
            let before = version_thresholds(&[total - lo, lo]).unwrap();
            let after = version_thresholds(&[total - hi, hi]).unwrap();
            // Test the boundaries themselves too, where an off-by-one hides.
            let edges = [before[0], after[0]]
                .into_iter()
                .flat_map(|t| [t.saturating_sub(1), t, t + 1])
                .filter_map(|t| u32::try_from(t).ok());
            for h in hashes.into_iter().chain(edges) {
                let (vb, va) = (pick_version(&before, 2, h), pick_version(&after, 2, h));
                prop_assert!(vb < 2 && va < 2);
                prop_assert!(!(vb == 1 && va == 0), "hash {h} went back to stable");
            }
        }

        #[test]
        fn raising_the_last_version_only_moves_flows_later(
            weights in prop::collection::vec(0u32..=1_000_000, 2..=MAX_VERSIONS),
            extra in 0u32..=1_000_000,
            hashes in prop::collection::vec(any::<u32>(), 64),
        ) {
            prop_assume!(weights.iter().any(|w| *w > 0));
            let n = weights.len();
            let mut raised = weights.clone();
            raised[n - 1] += extra;
            let before = version_thresholds(&weights).unwrap();
            let after = version_thresholds(&raised).unwrap();
            for h in hashes {
                let (vb, va) = (pick_version(&before, n, h), pick_version(&after, n, h));
                prop_assert!(vb < n && va < n);
                prop_assert!(va >= vb, "hash {h} moved from version {vb} to {va}");
                if n == 2 {
                    prop_assert!(va == vb || va == n - 1);
                }
            }
        }
    }
}
