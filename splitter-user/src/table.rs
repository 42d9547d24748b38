//! Weight math and the weighted Maglev table builder. Pure: no I/O, no
//! randomness, so the same configuration gives the same tables on every
//! node (several edges behind ECMP then agree on every flow).
//!
//! - [`version_thresholds`] turns version weights into cumulative ranges of
//!   the 32-bit version hash; [`pick_version`] is the kernel's lookup.
//! - [`maglev_table`] fills `MAGLEV_SIZE` slots with backend ids following
//!   Maglev (Eisenbud et al., NSDI 2016, §3.4) with weighted turns;
//!   [`maglev_lookup`] is the kernel's lookup.
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
}

/// The upper end of the hash space (exclusive) as a threshold.
pub const HASH_SPACE: u64 = 1 << 32;

/// Cumulative upper bounds of each version's share of the 32-bit hash
/// space: version `i` takes hashes `h` with `t[i-1] <= h < t[i]`. The last
/// used entry, and every unused one, is exactly `1 << 32`.
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
    for (i, w) in weights.iter().enumerate() {
        cum += u128::from(*w);
        // cum <= total, so the quotient is at most 1 << 32 and fits in u64.
        out[i] = ((cum << 32) / total) as u64;
    }
    Ok(out)
}

/// The version a hash picks (what the kernel does). Returns `count` if no
/// range holds `h`, which cannot happen for thresholds from
/// [`version_thresholds`].
pub fn pick_version(thresholds: &[u64; MAX_VERSIONS], count: usize, h: u32) -> usize {
    let h = u64::from(h);
    (0..count.min(MAX_VERSIONS))
        .find(|&i| h < thresholds[i])
        .unwrap_or(count)
}

/// One backend as the table builder sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend<'a> {
    /// Stable identity, the same on every node (e.g. `"10.0.2.2:8080"`):
    /// it alone decides the backend's permutation.
    pub key: &'a str,
    /// Relative weight; 0 gets no slots.
    pub weight: u32,
    /// Value written into the table (the data plane's backend id).
    pub id: u16,
}

/// FNV-1a, 64 bits: fixed, so tables do not depend on the process.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV alone mixes short keys poorly in the low bits; finish with
    // splitmix64's finalizer.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Builds the weighted Maglev table.
///
/// Each backend walks its own permutation of the slots (`offset`, `skip`
/// from two hashes of its key; `MAGLEV_SIZE` is prime, so every `skip`
/// visits every slot). Turns are handed out by weight: in every round, each
/// backend whose share is behind `weight / total` takes the next free slot
/// of its permutation (largest deficit first is not needed: the round-robin
/// over "behind" backends keeps every backend within one slot of its exact
/// share). Equal weights reduce to plain Maglev.
///
/// The result depends only on the set of `(key, weight, id)`, not on
/// their order. With no positive weight the table is all `NO_BACKEND`.
///
/// # Errors
/// Duplicate keys, or more backends than slots.
pub fn maglev_table(backends: &[MaglevBackend<'_>]) -> Result<Box<MaglevTable>, TableError> {
    let m = MAGLEV_SIZE as u64;
    if backends.len() > MAGLEV_SIZE as usize {
        return Err(TableError::TooManyBackends(backends.len()));
    }
    let mut sorted: Vec<MaglevBackend<'_>> = backends.to_vec();
    sorted.sort_by(|a, b| a.key.cmp(b.key));
    for pair in sorted.windows(2) {
        if pair[0].key == pair[1].key {
            return Err(TableError::DuplicateBackend(pair[0].key.to_string()));
        }
    }
    sorted.retain(|b| b.weight > 0);
    let mut table = Box::new(MaglevTable::default());
    if sorted.is_empty() {
        return Ok(table);
    }
    let total: u64 = sorted.iter().map(|b| u64::from(b.weight)).sum();
    let perms: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let offset = fnv1a(0x6d61_676c_6576_3031, b.key.as_bytes()) % m;
            let skip = fnv1a(0x736b_6970_7370_6c74, b.key.as_bytes()) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; sorted.len()];
    let mut owned = vec![0u64; sorted.len()];
    let mut filled = 0u64;
    while filled < m {
        let before = filled;
        for (i, b) in sorted.iter().enumerate() {
            // Behind its share of what is filled so far (+1 so every
            // backend with weight gets a turn in the first round).
            if owned[i] * total > (filled + 1) * u64::from(b.weight) {
                continue;
            }
            let (offset, skip) = perms[i];
            loop {
                let slot = ((offset + next[i] * skip) % m) as usize;
                next[i] += 1;
                if table.slots[slot] == NO_BACKEND {
                    table.slots[slot] = b.id;
                    owned[i] += 1;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
        debug_assert!(filled > before, "every round fills at least one slot");
        if filled == before {
            break;
        }
    }
    Ok(table)
}

/// The backend id a hash picks (what the kernel does).
pub fn maglev_lookup(table: &MaglevTable, h: u32) -> u16 {
    table.slots[(h % MAGLEV_SIZE) as usize]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.{}.{}.{}:8080", i / 65536, (i / 256) % 256, i % 256))
            .collect()
    }

    fn build(keys: &[String], weights: &[u32]) -> Box<MaglevTable> {
        let b: Vec<MaglevBackend> = keys
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (k, w))| MaglevBackend {
                key: k,
                weight: *w,
                id: i as u16,
            })
            .collect();
        maglev_table(&b).unwrap()
    }

    fn counts(t: &MaglevTable, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for s in t.slots {
            c[s as usize] += 1;
        }
        c
    }

    #[test]
    fn hundred_equal_backends_are_balanced() {
        let k = keys(100);
        let t = build(&k, &[1; 100]);
        let c = counts(&t, 100);
        let mean = MAGLEV_SIZE as f64 / 100.0;
        let max = *c.iter().max().unwrap() as f64;
        assert!(max / mean <= 1.05, "max/mean = {}", max / mean);
        assert!(c.iter().all(|&n| n > 0));
    }

    #[test]
    fn weights_give_proportional_shares() {
        let k = keys(3);
        let t = build(&k, &[1, 2, 3]);
        let c = counts(&t, 3);
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = c[i] as f64 / MAGLEV_SIZE as f64;
            assert!((got - want).abs() < 0.02, "backend {i}: {got} vs {want}");
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
        let t = build(&k, &[0, 5]);
        assert!(t.slots.iter().all(|s| *s == 1));
    }

    #[test]
    fn duplicates_and_overflow_are_refused() {
        let b = [
            MaglevBackend {
                key: "a",
                weight: 1,
                id: 0,
            },
            MaglevBackend {
                key: "a",
                weight: 1,
                id: 1,
            },
        ];
        assert_eq!(
            maglev_table(&b).unwrap_err(),
            TableError::DuplicateBackend("a".into())
        );
        let k = keys(MAGLEV_SIZE as usize + 1);
        let many: Vec<MaglevBackend> = k
            .iter()
            .map(|k| MaglevBackend {
                key: k,
                weight: 1,
                id: 0,
            })
            .collect();
        assert!(matches!(
            maglev_table(&many),
            Err(TableError::TooManyBackends(_))
        ));
    }

    #[test]
    fn thresholds_split_the_hash_space_by_weight() {
        let t = version_thresholds(&[90, 10]).unwrap();
        assert_eq!(t[1], HASH_SPACE);
        assert_eq!(t[0], (HASH_SPACE * 9) / 10);
        assert_eq!(version_thresholds(&[0, 1]).unwrap()[0], 0);
        assert_eq!(version_thresholds(&[]), Err(TableError::NoVersions));
        assert_eq!(version_thresholds(&[0, 0]), Err(TableError::AllZero));
        assert_eq!(
            version_thresholds(&[1; 5]),
            Err(TableError::TooManyVersions(5))
        );
        // A weight-0 version owns no hash at all.
        let t = version_thresholds(&[5, 0, 5]).unwrap();
        assert_eq!(t[0], t[1]);
        for h in [0u32, 1, u32::MAX / 2, u32::MAX] {
            assert_ne!(pick_version(&t, 3, h), 1);
        }
        assert_eq!(pick_version(&t, 3, u32::MAX), 2);
        assert_eq!(pick_version(&t, 3, 0), 0);
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

    proptest! {
        #[test]
        fn same_input_any_order_same_table(n in 1usize..40, seed in any::<u64>()) {
            let k = keys(n);
            let mut b: Vec<MaglevBackend> = k.iter().enumerate()
                .map(|(i, k)| MaglevBackend { key: k, weight: 1 + (i as u32 % 3), id: i as u16 })
                .collect();
            let first = maglev_table(&b).unwrap();
            // Deterministic shuffle from the seed.
            let mut s = seed;
            for i in (1..b.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                b.swap(i, (s >> 33) as usize % (i + 1));
            }
            prop_assert_eq!(first, maglev_table(&b).unwrap());
        }

        #[test]
        fn removing_one_of_n_moves_about_one_nth(n in 5usize..=100, victim in any::<prop::sample::Index>()) {
            let k = keys(n);
            let w = vec![1; n];
            let before = build(&k, &w);
            let gone = victim.index(n);
            let rest: Vec<MaglevBackend> = k.iter().enumerate().filter(|(i, _)| *i != gone)
                .map(|(i, k)| MaglevBackend { key: k, weight: 1, id: i as u16 }).collect();
            let after = maglev_table(&rest).unwrap();
            let changed = before.slots.iter().zip(after.slots.iter()).filter(|(a, b)| a != b).count();
            let frac = changed as f64 / MAGLEV_SIZE as f64;
            prop_assert!(after.slots.iter().all(|s| *s as usize != gone));
            // Maglev moves the removed backend's slots plus some more, the
            // price of its balance; with MAGLEV_SIZE = 16381 the worst case
            // stays below 1.3/N up to 20 backends and 2.8/N up to 100.
            let bound = if n <= 20 { 1.3 } else { 2.8 };
            prop_assert!(frac * n as f64 <= bound, "n={} moved {:.4} = {:.2}/N", n, frac, frac * n as f64);
        }

        #[test]
        fn raising_the_canary_only_moves_flows_onto_it(total in 1u32..10_000, a in 0u32..10_000, b in 0u32..10_000, h in any::<u32>()) {
            let (lo, hi) = (a.min(b) % (total + 1), a.max(b) % (total + 1));
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            prop_assume!(total - lo > 0 || lo > 0);
            let before = version_thresholds(&[total - lo, lo]);
            let after = version_thresholds(&[total - hi, hi]);
            if let (Ok(before), Ok(after)) = (before, after) {
                let vb = pick_version(&before, 2, h);
                let va = pick_version(&after, 2, h);
                // Never from canary back to stable when the canary grows.
                prop_assert!(!(vb == 1 && va == 0));
            }
        }
    }
}
