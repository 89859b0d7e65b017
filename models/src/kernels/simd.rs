//! Vectorised row primitives for the CPU kernels: a `exp` that vectorises, softmax and LayerNorm
//! rows, the SwiGLU gate.
//!
//! Each public function is a portable loop written to auto-vectorise, compiled a second time with
//! AVX2 + FMA enabled; [`avx2_fma`] picks the variant once per process. The portable bodies are
//! `#[inline(always)]` so that the AVX2 copy really is compiled with the wider instructions.

use std::sync::OnceLock;

/// Whether this CPU has AVX2 and FMA (detected once per process; false off x86-64).
pub fn avx2_fma() -> bool {
    static DETECTED: OnceLock<bool> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// `fn $name(args) -> ret` running `$portable(args)`, compiled with AVX2 + FMA when the CPU has
/// them: the one place the feature dispatch is written.
macro_rules! with_avx2 {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? = $portable:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $portable($($arg),*)
                }
                if avx2_fma() {
                    // Safety: the CPU has AVX2 and FMA (`avx2_fma`).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}

with_avx2! {
    /// `row <- softmax(row)` over the row plus `zero_keys` implicit zero logits; returns the lse.
    pub fn softmax_in_place(row: &mut [f32], zero_keys: usize) -> f32 = softmax_in_place_portable
}

with_avx2! {
    /// `xs[i] <- exp(xs[i] - max)`, returning the sum (the softmax's inner loop, on its own for
    /// its test).
    #[cfg(test)]
    pub fn exp_sub_sum(xs: &mut [f32], max: f32) -> f32 = exp_sub_sum_portable
}

with_avx2! {
    /// `y[i] <- silu(gate[i]) * value[i]` with the vectorised `exp` (timm's packed SwiGLU gate).
    pub fn silu_mul(gate: &[f32], value: &[f32], y: &mut [f32]) = silu_mul_portable
}

with_avx2! {
    /// LayerNorm of one row: mean, then the variance of the centred values (two passes, eight
    /// partial sums each), then `(x - mean) / sqrt(var + eps) * w + b` into `y`.
    pub fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) = layer_norm_row_portable
}

#[inline(always)]
fn softmax_in_place_portable(row: &mut [f32], zero_keys: usize) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let mut max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if zero_keys > 0 && max < 0.0 {
        max = 0.0;
    }
    let sum = exp_sub_sum_portable(row, max) + zero_keys as f32 * (-max).exp();
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
    max + sum.ln()
}

/// `xs[i] <- exp(xs[i] - max)`, returning the sum (eight partial sums: vectorisable, and more
/// accurate than one running sum).
#[inline(always)]
fn exp_sub_sum_portable(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = exp_approx(*x - max);
            *a += *x;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - max);
        sum += *x;
    }
    sum
}

#[inline(always)]
fn silu_mul_portable(gate: &[f32], value: &[f32], y: &mut [f32]) {
    for ((y, &g), &v) in y.iter_mut().zip(gate).zip(value) {
        *y = g / (1.0 + exp_approx(-g)) * v;
    }
}

#[inline(always)]
fn layer_norm_row_portable(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let n = x.len() as f32;
    let mean = sum8(x, |v| v) / n;
    let var = sum8(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for (((y, &v), &g), &c) in y.iter_mut().zip(x).zip(w).zip(b) {
        *y = (v - mean) * inv * g + c;
    }
}

/// `sum(f(x))` with eight interleaved partial sums (vectorisable, and more accurate than one).
#[inline(always)]
fn sum8(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    chunks.remainder().iter().map(|&v| f(v)).sum::<f32>() + acc.iter().sum::<f32>()
}

/// One row: writes `softmax(scale * x)` to `p`, returns `ln(sum(exp(scale * x)))` (libm `exp`,
/// for the composed-op path's lse).
pub fn softmax_row(x: &[f32], scale: f32, p: &mut [f32]) -> f32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
    // Eight partial sums: vectorisable and more accurate than one running sum.
    let mut acc = [0f32; 8];
    for (xs, ps) in x.chunks(8).zip(p.chunks_mut(8)) {
        for (i, (&v, q)) in xs.iter().zip(ps.iter_mut()).enumerate() {
            let e = (v * scale - max).exp();
            *q = e;
            acc[i] += e;
        }
    }
    let sum: f32 = acc.iter().sum();
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|q| *q *= inv);
    max + sum.ln()
}

/// `exp(x)` to ~1 ulp without a libm call, so loops over it vectorise (Cephes `expf`: `2^n e^r`
/// with `|r| <= ln2 / 2` and a degree-6 polynomial). Inputs below -87.3 give ~1e-38, not 0.
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.336_55, 88.376_26);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let n_int = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    y * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_approx(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_3;
        }
        assert!(worst < 2.5e-7, "max relative error {worst:e}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-1e8) < 1e-37);
    }

    #[test]
    fn exp_sub_sum_matches_the_scalar_loop() {
        let mut xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let expected: f64 = xs.iter().map(|&x| ((x - 20.0) as f64).exp()).sum();
        let sum = exp_sub_sum(&mut xs, 20.0);
        assert!(((sum as f64 - expected) / expected).abs() < 1e-6);
    }

    #[test]
    fn the_avx2_and_portable_variants_agree() {
        let x: Vec<f32> = (0..77)
            .map(|i| (i as f32 * 0.61).cos() * 9.0 + 40.0)
            .collect();
        let w: Vec<f32> = (0..77).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..77).map(|i| i as f32 * -0.02).collect();
        let (mut fast, mut plain) = (vec![0f32; 77], vec![0f32; 77]);
        layer_norm_row(&x, &w, &b, 1e-6, &mut fast);
        layer_norm_row_portable(&x, &w, &b, 1e-6, &mut plain);
        for (a, b) in fast.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let (mut r1, mut r2) = (x.clone(), x.clone());
        let (l1, l2) = (
            softmax_in_place(&mut r1, 3),
            softmax_in_place_portable(&mut r2, 3),
        );
        assert!((l1 - l2).abs() < 1e-5);
        assert!((r1.iter().sum::<f32>() + 3.0 * (-l1).exp() - 1.0).abs() < 1e-5);
    }
}
