//! The one seeded generator of gigapath: SplitMix64 (Steele, Lea, Flood 2014), 64 bits of state,
//! passes BigCrush, trivially seedable.
//!
//! Synthetic cohorts, training splits and data order, prompt sampling, few-shot draws and
//! generated test weights must be the same for a seed on every machine and after a resume; a
//! dependency would be more code than this. Its sequences are part of those results: do not
//! change them.
//!
//! Not for: cryptography, or anything that must be unpredictable.

/// SplitMix64: a stream of 64-bit words that is a function of the seed alone.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose stream is a function of `seed` alone.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// A generator for item `index` of a stream, independent of how many draws others made.
    pub fn derive(seed: u64, index: u64) -> Self {
        let mut r = SplitMix64(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        r
    }

    /// The next 64 uniformly random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), 53 random bits.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.f64()
    }

    /// Standard normal (Box-Muller over two [`SplitMix64::f64`] draws).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.f64().max(1e-300);
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform in `0..n` (`n > 0`) by multiply-shift: unbiased enough for sampling, branch-free.
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Shuffles `items` in place (Fisher-Yates over [`SplitMix64::below`]), every order equally
    /// likely.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_splitmix64() {
        // The reference outputs of SplitMix64 seeded with 1234567 (Vigna's splitmix64.c).
        let mut r = SplitMix64::new(1_234_567);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(
            got,
            [
                6_457_827_717_110_365_317,
                3_203_168_211_198_807_973,
                9_817_491_932_198_370_423
            ]
        );
    }

    #[test]
    fn same_seed_same_stream_and_uniform_enough() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        assert_eq!(
            (0..5).map(|_| a.next_u64()).collect::<Vec<_>>(),
            (0..5).map(|_| b.next_u64()).collect::<Vec<_>>()
        );
        let mut r = SplitMix64::new(1);
        let mean = (0..10_000).map(|_| r.f64()).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[r.below(3)] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        let normals: Vec<f64> = (0..10_000).map(|_| r.normal()).collect();
        let m = normals.iter().sum::<f64>() / 1e4;
        let v = normals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / 1e4;
        assert!(
            m.abs() < 0.05 && (v - 1.0).abs() < 0.05,
            "mean {m}, variance {v}"
        );
    }

    #[test]
    fn derived_streams_differ_and_repeat() {
        let a: Vec<u64> = (0..4)
            .map(|i| SplitMix64::derive(9, i).next_u64())
            .collect();
        assert_eq!(
            a,
            (0..4)
                .map(|i| SplitMix64::derive(9, i).next_u64())
                .collect::<Vec<_>>()
        );
        assert!(a.windows(2).all(|w| w[0] != w[1]));
    }
}
