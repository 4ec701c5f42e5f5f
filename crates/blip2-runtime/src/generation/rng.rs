//! The random numbers behind sampling.
//!
//! Sampling cannot match torch's RNG, so it only has to be reproducible: a given seed must give
//! the same tokens on every machine and with every version of this crate. That rules out
//! `rand::rngs::StdRng`, whose algorithm may change between rand releases, so this is a small
//! fixed generator (xoshiro256**, seeded through SplitMix64). Each row of a batch gets its own
//! stream, so what a row samples does not depend on what the other rows draw or when they finish.

/// xoshiro256** (Blackman and Vigna): fast, small state, good statistical quality.
#[derive(Clone, Debug)]
pub(crate) struct Rng {
    s: [u64; 4],
}

/// SplitMix64 (Steele, Lea and Flood): the next value of the sequence seeded by `state`.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// The generator for stream `stream` (a row) of seed `seed`.
    pub(crate) fn new(seed: u64, stream: u64) -> Self {
        // Hash the seed and the stream together so neighbouring seeds and rows are unrelated.
        let mut sm = seed;
        let base = splitmix64(&mut sm);
        let mut sm = base ^ stream.wrapping_mul(0xD605_BBB5_8C8A_BBB5).rotate_left(17);
        let mut s = [0u64; 4];
        for x in &mut s {
            *x = splitmix64(&mut sm);
        }
        Rng { s }
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Unnormalised probabilities exp(score - max) in f64; -inf scores get weight 0.
fn weights(scores: &[f32]) -> Vec<f64> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // All -inf (or +inf present): fall back to the maxima only.
        return scores.iter().map(|&s| if s == max { 1.0 } else { 0.0 }).collect();
    }
    scores.iter().map(|&s| (f64::from(s) - f64::from(max)).exp()).collect()
}

/// Draws one index from softmax(scores), as `torch.multinomial(softmax(scores), 1)` does.
/// Tokens whose score is -inf are never drawn.
pub(crate) fn sample_one(scores: &[f32], rng: &mut Rng) -> usize {
    let w = weights(scores);
    let total: f64 = w.iter().sum();
    let u = rng.next_f64() * total;
    let mut acc = 0.0;
    let mut last_positive = 0;
    for (i, &wi) in w.iter().enumerate() {
        if wi > 0.0 {
            acc += wi;
            last_positive = i;
            if acc > u {
                return i;
            }
        }
    }
    // Rounding left u at the very top: the last token with any weight.
    last_positive
}

/// Draws `k` distinct indices from softmax(scores) without replacement, in draw order, like
/// `torch.multinomial(probs, k, replacement=False)`. When fewer than `k` indices have any
/// probability, torch still returns `k` indices (the rest arbitrary zero-probability ones); here
/// the rest are the zero-probability indices with the highest scores, lowest index first.
pub(crate) fn sample_without_replacement(scores: &[f32], k: usize, rng: &mut Rng) -> Vec<usize> {
    let mut w = weights(scores);
    let mut picked = Vec::with_capacity(k);
    while picked.len() < k {
        let total: f64 = w.iter().sum();
        if total <= 0.0 {
            break;
        }
        let u = rng.next_f64() * total;
        let mut acc = 0.0;
        let mut choice = None;
        for (i, &wi) in w.iter().enumerate() {
            if wi > 0.0 {
                acc += wi;
                choice = Some(i);
                if acc > u {
                    break;
                }
            }
        }
        let i = choice.expect("total > 0 implies a positive weight");
        w[i] = 0.0;
        picked.push(i);
    }
    if picked.len() < k {
        let mut rest: Vec<usize> = (0..scores.len()).filter(|i| !picked.contains(i)).collect();
        rest.sort_by(|&a, &b| super::processors::desc(scores[a], scores[b]).then(a.cmp(&b)));
        picked.extend(rest.into_iter().take(k - picked.len()));
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_draws_are_pinned() {
        // From scripts/rng_reference.py (the published SplitMix64 and xoshiro256**, written
        // again in Python): a change here would change every seeded sample.
        let want: [(u64, u64, [u64; 3]); 3] = [
            (0, 0, [0xfb5405f7bd79c540, 0x780c98e26cea5883, 0x2a146e0980febc66]),
            (42, 1, [0x6ed4637520e4a882, 0x3590f48bd6fa4152, 0x7369b5b3132dc91f]),
            (7, 3, [0x653e8c07762c822b, 0x963a228b748ee7bc, 0x3d502b06d2ed0350]),
        ];
        for (seed, stream, draws) in want {
            let mut r = Rng::new(seed, stream);
            let got = [r.next_u64(), r.next_u64(), r.next_u64()];
            assert_eq!(got, draws, "seed {seed}, stream {stream}");
        }
    }

    #[test]
    fn streams_differ_and_repeat() {
        let a: Vec<u64> = (0..4).map(|_| Rng::new(7, 0).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(Rng::new(7, 0).next_u64(), Rng::new(7, 1).next_u64());
        assert_ne!(Rng::new(7, 0).next_u64(), Rng::new(8, 0).next_u64());
    }

    #[test]
    fn never_draws_masked_tokens() {
        let scores = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 1.0];
        let mut rng = Rng::new(1, 0);
        for _ in 0..500 {
            let i = sample_one(&scores, &mut rng);
            assert!(i == 1 || i == 3);
        }
        let all = sample_without_replacement(&scores, 4, &mut rng);
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3]);
        assert!(all[..2].contains(&1) && all[..2].contains(&3));
    }
}
