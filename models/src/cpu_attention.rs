//! Fused attention kernels for inference on CPU.
//!
//! candle runs attention as separate ops: head-split copies, a batched matmul that parallelises
//! inside each small (197 x 197) product, a scalar-`exp` softmax, another matmul, a merge copy, and
//! for the slide encoder a gather and a scatter per branch. Profiling showed those steps (plus the
//! page faults of their large temporaries) at 3-4x PyTorch's fused SDPA. These kernels compute the
//! same math in one pass per (problem, query block): the products go straight to the `gemm` crate
//! (candle's own CPU matmul) on strided views of q / k / v, the softmax uses a vectorised `exp`,
//! results are written in place, and threads work on different heads and blocks. No tensor larger
//! than a block of scores is ever allocated.
//!
//! Used only for f32 on CPU without gradient tracking; everything else (CUDA, training) takes the
//! composed-op path, which the tests check against the same references.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::dilated_attention::{Branch, UNCOVERED_LSE};

/// Query rows per task: small enough to spread a head over threads, large enough for `gemm`.
const QUERY_BLOCK: usize = 128;

/// Per-thread buffers, reused across tasks: gathered q / k / v rows of one problem, one block of
/// scores and of outputs.
#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A raw pointer that may cross threads: every task writes a disjoint set of rows.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the wrapper (which is `Sync`), not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One attention problem on strided rows: query, key and value row `t` start at
/// `q + t * stride` (resp. `k`, `v`), `dh` contiguous values each. `zero_keys` extra all-zero keys
/// take part in the softmax (logit 0, value 0), as the reference's zero padding does.
#[derive(Debug, Clone, Copy)]
struct Problem {
    q: usize,
    k: usize,
    v: usize,
    stride: usize,
    rows: usize,
    zero_keys: usize,
}

/// Attention for queries `q0 .. q0 + nq` of `p`: normalised outputs into `out` [nq, dh] and the
/// natural-log log-sum-exp of the scaled logits into `lse` [nq].
///
/// # Safety
/// `q`, `k`, `v` must be valid for every row the problem describes.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_block(
    (q, k, v): (*const f32, *const f32, *const f32),
    p: &Problem,
    q0: usize,
    nq: usize,
    dh: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    lse: &mut [f32],
) {
    let m = p.rows;
    scores.resize(nq * m, 0.0);
    let s = p.stride as isize;
    // scores = scale * Q K^T: [nq, m]; K^T is K read column-wise (no transpose copy).
    gemm(
        nq,
        m,
        dh,
        scores.as_mut_ptr(),
        1,
        m as isize,
        false,
        q.add(p.q + q0 * p.stride),
        1,
        s,
        k.add(p.k),
        s,
        1,
        0.0,
        scale,
        false,
        false,
        false,
        Parallelism::None,
    );
    for (row, l) in scores.chunks_exact_mut(m).zip(lse.iter_mut()) {
        *l = softmax_in_place(row, p.zero_keys);
    }
    // out = P V: [nq, dh]
    gemm(
        nq,
        dh,
        m,
        out.as_mut_ptr(),
        1,
        dh as isize,
        false,
        scores.as_ptr(),
        1,
        m as isize,
        v.add(p.v),
        1,
        s,
        0.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// `row <- softmax(row)` over the row plus `zero_keys` implicit zero logits; returns the lse.
fn softmax_in_place(row: &mut [f32], zero_keys: usize) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // Safety: the features were just detected.
        return unsafe { softmax_in_place_avx2(row, zero_keys) };
    }
    softmax_in_place_portable(row, zero_keys)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_in_place_avx2(row: &mut [f32], zero_keys: usize) -> f32 {
    softmax_in_place_portable(row, zero_keys)
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

/// `xs[i] <- exp(xs[i] - max)`, returning the sum; AVX2 + FMA when the CPU has them.
#[cfg(test)]
fn exp_sub_sum(xs: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // Safety: the features were just detected.
        return unsafe { exp_sub_sum_avx2(xs, max) };
    }
    exp_sub_sum_portable(xs, max)
}

#[cfg(all(test, target_arch = "x86_64"))]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sub_sum_avx2(xs: &mut [f32], max: f32) -> f32 {
    exp_sub_sum_portable(xs, max)
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

/// `y[i] <- silu(gate[i]) * value[i]` with the vectorised `exp` (timm's packed SwiGLU gate).
pub(crate) fn silu_mul(gate: &[f32], value: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // Safety: the features were just detected.
        return unsafe { silu_mul_avx2(gate, value, y) };
    }
    silu_mul_portable(gate, value, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &[f32], value: &[f32], y: &mut [f32]) {
    silu_mul_portable(gate, value, y)
}

#[inline(always)]
fn silu_mul_portable(gate: &[f32], value: &[f32], y: &mut [f32]) {
    for ((y, &g), &v) in y.iter_mut().zip(gate).zip(value) {
        *y = g / (1.0 + exp_approx(-g)) * v;
    }
}

/// `exp(x)` to ~1 ulp without a libm call, so loops over it vectorise (Cephes `expf`: `2^n e^r`
/// with `|r| <= ln2 / 2` and a degree-6 polynomial). Inputs below -87.3 give ~1e-38, not 0.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
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

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: the CPU attention kernel takes f32")
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: the CPU attention kernel takes contiguous input"),
    }
}

/// Multi-head self-attention from a fused qkv projection: [B, N, 3 * H * Dh] (rows `[q; k; v]`,
/// heads contiguous, as timm stores `qkv`) -> [B, N, H * Dh] with heads merged.
pub(crate) struct FusedQkvAttention {
    pub heads: usize,
    pub scale: f32,
}

impl CustomOp1 for FusedQkvAttention {
    fn name(&self) -> &'static str {
        "fused-qkv-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(storage, layout, "qkv")?;
        let (b, n, three_d) = layout.shape().dims3()?;
        let h = self.heads;
        let d = three_d / 3;
        let dh = d / h;
        let mut out = vec![0f32; b * n * d];
        let dst = SharedMut(out.as_mut_ptr());
        let base = qkv.as_ptr() as usize;
        let tasks: Vec<(usize, usize, usize)> = (0..b)
            .flat_map(|bi| {
                (0..h).flat_map(move |hi| (0..n).step_by(QUERY_BLOCK).map(move |q0| (bi, hi, q0)))
            })
            .collect();
        tasks.into_par_iter().for_each(|(bi, hi, q0)| {
            let p = Problem {
                q: bi * n * three_d + hi * dh,
                k: bi * n * three_d + d + hi * dh,
                v: bi * n * three_d + 2 * d + hi * dh,
                stride: three_d,
                rows: n,
                zero_keys: 0,
            };
            let nq = QUERY_BLOCK.min(n - q0);
            SCRATCH.with_borrow_mut(|buf| {
                buf.out.resize(nq * dh, 0.0);
                let mut lse = [0f32; QUERY_BLOCK];
                let base = base as *const f32;
                // Safety: every row of this (batch, head) lies inside `qkv`.
                unsafe {
                    attend_block(
                        (base, base, base),
                        &p,
                        q0,
                        nq,
                        dh,
                        self.scale,
                        &mut buf.scores,
                        &mut buf.out,
                        &mut lse,
                    )
                };
                for (i, row) in buf.out.chunks_exact(dh).enumerate() {
                    let at = (bi * n + q0 + i) * d + hi * dh;
                    // Safety: (batch, token, head) rows are written by this task only.
                    unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst.get().add(at), dh) };
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, n, d))))
    }
}

/// LongNet dilated attention over q, k, v [L, H, Dh] -> [L, H, Dh], every branch in one kernel.
///
/// Each branch's (segment, head) problem is a strided view (positions `p0, p0 + r, ...`) plus the
/// zero-padded keys past L, counted analytically. Branches are mixed online: per (position, head)
/// a running max, weight sum and weighted output, exactly the softmax over branch lses once the
/// branches that do not cover the position are added back (they carry lse -1e8 and output 0, and
/// only matter when every lse there is -1e8).
pub(crate) struct DilatedAttentionCpu {
    pub branches: Vec<Branch>,
    pub scale: f32,
}

impl CustomOp3 for DilatedAttentionCpu {
    fn name(&self) -> &'static str {
        "dilated-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            contiguous_f32(qs, ql, "q")?,
            contiguous_f32(ks, kl, "k")?,
            contiguous_f32(vs, vl, "v")?,
        );
        let (l, h, dh) = ql.shape().dims3()?;
        if kl.shape() != ql.shape() || vl.shape() != ql.shape() {
            candle_core::bail!("dilated attention: q, k, v shapes differ")
        }
        let grid = l * h;
        let mut acc = vec![0f32; grid * dh];
        let mut max = vec![f32::NEG_INFINITY; grid];
        let mut weight = vec![0f32; grid];
        let (acc_p, max_p, w_p) = (
            SharedMut(acc.as_mut_ptr()),
            SharedMut(max.as_mut_ptr()),
            SharedMut(weight.as_mut_ptr()),
        );
        for branch in &self.branches {
            branch.check_len(l).map_err(candle_core::Error::msg)?;
            let r = branch.ratio;
            let (s, segments) = branch.segments(l);
            let tokens = s.div_ceil(r);
            let group = h.div_ceil(r);
            // One task per (segment, head) problem: its rows are gathered once into contiguous
            // buffers (strided reads r * H * Dh apart would otherwise be re-packed by every
            // query block's gemm), then attended block by block.
            let problems: Vec<(usize, usize)> = (0..segments)
                .flat_map(|seg| (0..h).map(move |head| (seg * s + head / group, head)))
                .filter(|&(p0, _)| p0 < l)
                .collect();
            let scale = self.scale;
            problems.into_par_iter().for_each(|(p0, head)| {
                let rows = ((l - 1 - p0) / r + 1).min(tokens);
                let first = p0 * h * dh + head * dh;
                let stride = r * h * dh;
                SCRATCH.with_borrow_mut(|buf| {
                    for (src, dst) in [(q, &mut buf.q), (k, &mut buf.k), (v, &mut buf.v)] {
                        dst.clear();
                        for t in 0..rows {
                            dst.extend_from_slice(&src[first + t * stride..][..dh]);
                        }
                    }
                    let p = Problem {
                        q: 0,
                        k: 0,
                        v: 0,
                        stride: dh,
                        rows,
                        zero_keys: tokens - rows,
                    };
                    let mut lse = [0f32; QUERY_BLOCK];
                    for q0 in (0..rows).step_by(QUERY_BLOCK) {
                        let nq = QUERY_BLOCK.min(rows - q0);
                        buf.out.resize(nq * dh, 0.0);
                        let src = (buf.q.as_ptr(), buf.k.as_ptr(), buf.v.as_ptr());
                        // Safety: the buffers hold exactly `rows` rows of `dh` values.
                        unsafe {
                            attend_block(
                                src,
                                &p,
                                q0,
                                nq,
                                dh,
                                scale,
                                &mut buf.scores,
                                &mut buf.out,
                                &mut lse,
                            )
                        };
                        for (i, (row, &l_raw)) in
                            buf.out.chunks_exact(dh).zip(&lse[..nq]).enumerate()
                        {
                            let idx = (p0 + r * (q0 + i)) * h + head;
                            // The reference replaces an lse of exactly 0.0 by -1e8 (its "not covered").
                            let l_b = if l_raw == 0.0 { UNCOVERED_LSE } else { l_raw };
                            // Safety: within a branch each (position, head) belongs to one problem.
                            unsafe { mix_in(acc_p, max_p, w_p, idx, dh, l_b, row) };
                        }
                    }
                });
            });
        }
        // Add back the uncovered branches' exp(-1e8 - max) to each denominator, then normalise.
        let branches = &self.branches;
        acc.par_chunks_mut(dh)
            .zip(max.par_iter().zip(weight.par_iter()))
            .enumerate()
            .for_each(|(idx, (out, (&m, &w)))| {
                let (pos, head) = (idx / h, idx % h);
                let uncovered = branches
                    .iter()
                    .filter(|b| {
                        let (s, _) = b.segments(l);
                        (pos % s) % b.ratio != head / h.div_ceil(b.ratio)
                    })
                    .count();
                let denom = if m == f32::NEG_INFINITY {
                    f32::INFINITY
                } else {
                    w + uncovered as f32 * (UNCOVERED_LSE - m).exp()
                };
                let inv = 1.0 / denom;
                out.iter_mut().for_each(|x| *x *= inv);
            });
        Ok((CpuStorage::F32(acc), Shape::from((l, h, dh))))
    }
}

/// Online softmax-over-branches update of one (position, head) with a branch output `o`.
///
/// # Safety
/// `idx` must be in range and not updated concurrently.
#[inline]
unsafe fn mix_in(
    acc: SharedMut,
    max: SharedMut,
    weight: SharedMut,
    idx: usize,
    dh: usize,
    lse: f32,
    o: &[f32],
) {
    let (max, weight) = (max.get().add(idx), weight.get().add(idx));
    let m_old = *max;
    let m_new = m_old.max(lse);
    let a = (m_old - m_new).exp(); // 0 for the first branch (m_old = -inf)
    let c = (lse - m_new).exp();
    *max = m_new;
    *weight = *weight * a + c;
    let acc = std::slice::from_raw_parts_mut(acc.get().add(idx * dh), dh);
    for (x, &y) in acc.iter_mut().zip(o) {
        *x = *x * a + c * y;
    }
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
}
