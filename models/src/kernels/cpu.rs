//! Fused CPU kernels for f32 inference ([`super::Path::Cpu`]), as candle custom ops.
//!
//! candle runs attention as separate ops: head-split copies, a batched matmul that parallelises
//! inside each small (197 x 197) product, a scalar-`exp` softmax, another matmul, a merge copy, and
//! for the slide encoder a gather and a scatter per branch. Profiling showed those steps (plus the
//! page faults of their large temporaries) at 3-4x PyTorch's fused SDPA. The attention kernels here
//! compute the same math in one pass per (problem, query block): the products go straight to the
//! `gemm` crate (candle's own CPU matmul) on strided views of q / k / v, the softmax uses the
//! vectorised `exp` of [`super::simd`], results are written in place, and threads work on different
//! heads and blocks. No tensor larger than a block of scores is ever allocated.
//!
//! The LayerNorm is our own two-pass one: candle's computes the variance as `E[x^2] - E[x]^2` in
//! f32, which loses about three digits once a channel's mean is large against its spread (1e-3
//! absolute error at mean 50, std 1), as residual streams allow.
//!
//! None of these ops records a backward op; [`super::dispatch`] sends training elsewhere.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::branch::{Branch, UNCOVERED_LSE};
use super::simd;

/// The f32 values of a contiguous CPU tensor, or an error naming the kernel and operand.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{what}: this CPU kernel takes f32")
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: this CPU kernel takes contiguous input"),
    }
}

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
// Safety: the pointer is only dereferenced by tasks that write disjoint rows (see the users).
unsafe impl Send for SharedMut {}
// Safety: as for `Send`: no two tasks touch the same element.
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
    // Safety: the caller guarantees the problem's rows lie inside q / k; `scores` holds nq x m.
    unsafe {
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
        )
    };
    for (row, l) in scores.chunks_exact_mut(m).zip(lse.iter_mut()) {
        *l = simd::softmax_in_place(row, p.zero_keys);
    }
    // out = P V: [nq, dh]
    // Safety: the problem's rows lie inside v; `out` holds nq x dh (the caller sizes it).
    unsafe {
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
        )
    };
}

/// Multi-head self-attention from a fused qkv projection: [B, N, 3 * H * Dh] (rows `[q; k; v]`,
/// heads contiguous, as timm stores `qkv`) -> [B, N, H * Dh] with heads merged.
pub(crate) struct FusedQkvAttention {
    /// Attention heads H.
    pub heads: usize,
    /// Softmax scale, `Dh^-0.5`.
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
    /// The branches, mixed by their lses.
    pub branches: Vec<Branch>,
    /// Softmax scale, `Dh^-0.5`.
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
    // Safety: the caller guarantees `idx` is in range of the [L * H] grid (and of its [L * H,
    // dh] accumulator) and that no other thread touches this (position, head).
    let (max, weight, acc) = unsafe {
        (
            &mut *max.get().add(idx),
            &mut *weight.get().add(idx),
            std::slice::from_raw_parts_mut(acc.get().add(idx * dh), dh),
        )
    };
    let m_old = *max;
    let m_new = m_old.max(lse);
    let a = (m_old - m_new).exp(); // 0 for the first branch (m_old = -inf)
    let c = (lse - m_new).exp();
    *max = m_new;
    *weight = *weight * a + c;
    for (x, &y) in acc.iter_mut().zip(o) {
        *x = *x * a + c * y;
    }
}

/// CPU LayerNorm over the last dimension, rows in parallel: mean, then the variance of the
/// centred values (f32, eight partial sums per pass).
pub(crate) struct TwoPassLayerNorm {
    /// Added to the variance.
    pub eps: f64,
}

impl CustomOp3 for TwoPassLayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-two-pass"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, bias) = (
            contiguous_f32(xs, xl, "layer-norm")?,
            contiguous_f32(ws, wl, "layer-norm")?,
            contiguous_f32(bs, bl, "layer-norm")?,
        );
        let n = w.len();
        if n == 0 || xl.dims().last() != Some(&n) || bias.len() != n {
            candle_core::bail!(
                "layer-norm: input {:?}, weight {n}, bias {}",
                xl.dims(),
                bias.len()
            )
        }
        let eps = self.eps as f32;
        let mut out = vec![0f32; x.len()];
        x.par_chunks(n)
            .zip(out.par_chunks_mut(n))
            .with_min_len(8)
            .for_each(|(row, y)| simd::layer_norm_row(row, w, bias, eps, y));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `x + y * gamma`, `gamma` over the last dimension, one pass.
pub(crate) struct ScaledResidual;

impl CustomOp3 for ScaledResidual {
    fn name(&self) -> &'static str {
        "scaled-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, y, g) = (
            contiguous_f32(xs, xl, "scaled-residual")?,
            contiguous_f32(ys, yl, "scaled-residual")?,
            contiguous_f32(gs, gl, "scaled-residual")?,
        );
        let mut out = x.to_vec();
        out.par_chunks_mut(g.len())
            .zip(y.par_chunks(g.len()))
            .with_min_len(8)
            .for_each(|(o, y)| {
                for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                    *o += y * g;
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// timm's packed SwiGLU gate `silu(h[..., :n]) * h[..., n:]`, one vectorised pass.
pub(crate) struct SwiGluPacked;

impl CustomOp1 for SwiGluPacked {
    fn name(&self) -> &'static str {
        "swiglu-packed"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "swiglu")?;
        let mut dims = layout.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || width % 2 != 0 {
            candle_core::bail!("swiglu: last dimension {width} must be even")
        }
        let half = width / 2;
        let mut out = vec![0f32; x.len() / 2];
        x.par_chunks(width)
            .zip(out.par_chunks_mut(half))
            .with_min_len(8)
            .for_each(|(row, y)| {
                let (gate, value) = row.split_at(half);
                simd::silu_mul(gate, value, y);
            });
        *dims.last_mut().unwrap() = half;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// CPU kernel: rows of `x` -> rows of `[softmax(scale * x), lse]` (one extra trailing column), so
/// probabilities and lse come out of one pass without a second output tensor.
pub(crate) struct SoftmaxWithLse {
    /// Applied to the scores before the softmax.
    pub scale: f32,
}

impl CustomOp1 for SoftmaxWithLse {
    fn name(&self) -> &'static str {
        "softmax-with-lse"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = storage else {
            candle_core::bail!("softmax-with-lse: only f32 on CPU")
        };
        let Some((o1, o2)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax-with-lse: input must be contiguous")
        };
        let src = &src[o1..o2];
        let mut dims = layout.dims().to_vec();
        let n = *dims.last().unwrap_or(&0);
        if n == 0 {
            candle_core::bail!("softmax-with-lse: empty last dimension")
        }
        let mut dst = vec![0f32; src.len() / n * (n + 1)];
        let scale = self.scale;
        src.par_chunks(n)
            .zip(dst.par_chunks_mut(n + 1))
            .with_min_len(16)
            .for_each(|(x, out)| {
                let (p, lse) = out.split_at_mut(n);
                lse[0] = simd::softmax_row(x, scale, p);
            });
        *dims.last_mut().unwrap() = n + 1;
        Ok((CpuStorage::F32(dst), Shape::from(dims)))
    }
}
