//! LongNet dilated attention, exactly as Prov-GigaPath's reference computes it (spec section 3).
//!
//! For each branch `(segment length S, ratio r)` over a sequence of length L (CLS included):
//! `s = min(S, L)`; q, k, v are zero-padded at the end to a multiple of `s` and cut into segments;
//! inside a segment (zero-padded to a multiple of r) head group `j = h / (H / r)` keeps the
//! positions `j, j + r, j + 2r, ...`. Each (segment, head) is a full, *unmasked* softmax attention
//! over its selected tokens: zero-padded keys take part with logit 0 and value 0, as in the
//! reference. Outputs and log-sum-exps are scattered back to their dense positions (0 and -1e8
//! where a head did not cover a position; an lse of exactly 0.0 also becomes -1e8), and the
//! branches are mixed per (position, head) with weights `softmax_b(lse_b)`.
//!
//! Implementation: the segment / head-group selection of a branch is one index map
//! ([`BranchLayout`]) from its attention problems into the flattened `[L * H]` (position, head)
//! grid, with zero padding read from an all-zero sink row. A branch is then one gather, a batch of
//! small attentions run in chunks of bounded size, and one scatter; nothing ever holds more than
//! one chunk of attention scores, so memory is linear in L.

use candle_core::{DType, Result, Tensor};
use std::sync::{Arc, Mutex};

use crate::kernels::{self, attention_with_lse};
pub use crate::kernels::{Branch, BranchLayout, UNCOVERED_LSE};

/// Default bound on attention scores held at once (elements): 16 Mi, 64 MiB in f32.
pub const DEFAULT_CHUNK_SCORES: usize = 1 << 24;

/// A branch's [`BranchLayout`] on a device: the gather map, its inverse over the `[L * H]` grid.
#[derive(Debug)]
struct DeviceLayout {
    rows: Tensor,
    inverse: Tensor,
    problems: usize,
    tokens: usize,
}

/// Dilated attention over a set of branches.
#[derive(Debug, Clone)]
pub struct DilatedAttention {
    branches: Vec<Branch>,
    num_heads: usize,
    scale: f64,
    chunk_scores: usize,
}

impl DilatedAttention {
    /// Branches from parallel lists of segment lengths and ratios; softmax scale `1/sqrt(head_dim)`.
    pub fn new(
        segment_lengths: &[usize],
        ratios: &[usize],
        num_heads: usize,
        head_dim: usize,
    ) -> std::result::Result<Self, String> {
        if segment_lengths.len() != ratios.len() || segment_lengths.is_empty() {
            return Err(format!(
                "segment_length ({}) and dilated_ratio ({}) must be non-empty lists of equal length",
                segment_lengths.len(),
                ratios.len()
            ));
        }
        if segment_lengths.contains(&0) || ratios.contains(&0) {
            return Err("segment lengths and dilation ratios must be positive".into());
        }
        let branches = segment_lengths
            .iter()
            .zip(ratios)
            .map(|(&segment_length, &ratio)| Branch {
                segment_length,
                ratio,
            })
            .collect();
        Ok(Self {
            branches,
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
            chunk_scores: DEFAULT_CHUNK_SCORES,
        })
    }

    /// Bounds the attention scores held at once (elements); larger chunks suit GPUs.
    pub fn with_chunk_scores(mut self, elements: usize) -> Self {
        self.chunk_scores = elements.max(1);
        self
    }

    /// The branches.
    pub fn branches(&self) -> &[Branch] {
        &self.branches
    }

    /// Errors when `seq_len` tokens cannot be processed as the reference would (see
    /// [`Branch::check_len`]).
    pub fn check_len(&self, seq_len: usize) -> std::result::Result<(), String> {
        self.branches.iter().try_for_each(|b| b.check_len(seq_len))
    }

    /// `q`, `k`, `v` [L, H, Dh] -> attention output [L, H, Dh].
    ///
    /// One fused kernel where [`kernels::dilated_attention`] has one (f32 CPU inference, half
    /// precision on CUDA); otherwise the same math in candle ops ([`DilatedAttention::forward_ops`]).
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (_, h, _) = q.dims3()?;
        if h != self.num_heads {
            candle_core::bail!("dilated attention: {h} heads, expected {}", self.num_heads)
        }
        let scale = self.scale as f32;
        if let Some(y) = kernels::dilated_attention(q, k, v, &self.branches, scale)? {
            return Ok(y);
        }
        self.forward_ops(q, k, v)
    }

    /// [`DilatedAttention::forward`] in candle ops only (CUDA, half precision, training): per
    /// branch one gather, chunked attention with lse, one scatter; then the softmax over branches.
    pub fn forward_ops(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (l, h, dh) = q.dims3()?;
        let grid = l * h;
        // The all-zero sink row that padded tokens read from (and write their discarded outputs to).
        let with_sink = |t: &Tensor| -> Result<Tensor> {
            let zero = Tensor::zeros((1, dh), t.dtype(), t.device())?;
            Tensor::cat(&[&t.reshape((grid, dh))?, &zero], 0)
        };
        let (q, k, v) = (with_sink(q)?, with_sink(k)?, with_sink(v)?);
        // Per branch: its outputs and lses gathered back to the dense grid. The scatter is a
        // gather through the inverse of the branch's layout (each grid row is covered at most
        // once per branch): candle's `index_add` on CUDA walks the indices serially, a gather is
        // one thread per element.
        let mut dense_out = Vec::with_capacity(self.branches.len());
        let mut lses = Vec::with_capacity(self.branches.len());
        for maps in self.device_layouts(l, h, q.device())?.iter() {
            let DeviceLayout {
                rows,
                inverse,
                problems,
                tokens,
            } = maps;
            let (out, lse) = self.branch(&q, &k, &v, rows, *problems, *tokens)?;
            // Dense lse: zero where the branch does not reach, then the reference's
            // `masked_fill(lse == 0, -1e8)`, which also catches genuinely zero lses.
            let zero = Tensor::zeros(1, DType::F32, q.device())?;
            let dense = Tensor::cat(&[&lse, &zero], 0)?.index_select(inverse, 0)?;
            let uncovered = dense.eq(0f32)?;
            let filler = Tensor::full(UNCOVERED_LSE, grid, q.device())?;
            lses.push(uncovered.where_cond(&filler, &dense)?);
            let zero_row = Tensor::zeros((1, dh), out.dtype(), q.device())?;
            dense_out.push(Tensor::cat(&[&out, &zero_row], 0)?.index_select(inverse, 0)?);
        }
        // Branch weights: softmax over branches of the lse, in f32 and without gradient (the
        // reference computes them under `torch.no_grad()`).
        let lse = Tensor::stack(&lses, 0)?.detach(); // [branches, L*H]
        let max = lse.max_keepdim(0)?;
        let e = lse.broadcast_sub(&max)?.exp()?;
        let weights = e.broadcast_div(&e.sum_keepdim(0)?)?;
        let mut out: Option<Tensor> = None;
        for (b, o) in dense_out.into_iter().enumerate() {
            let weighted = o
                .to_dtype(DType::F32)?
                .broadcast_mul(&weights.get(b)?.unsqueeze(1)?)?;
            out = Some(match out {
                Some(acc) => (acc + weighted)?,
                None => weighted,
            });
        }
        out.expect("at least one branch")
            .to_dtype(q.dtype())?
            .reshape((l, h, dh))
    }

    /// Every branch's gather map and its inverse on `device` for `seq_len` tokens. Built once per
    /// (length, heads, branches, device) and shared by all layers (a slide encoder calls this 12
    /// times per slide with the same length; at 100k tiles the maps are 1.6 M rows per branch).
    /// The last one stays cached (13 MB per branch at 100k tiles).
    fn device_layouts(
        &self,
        seq_len: usize,
        num_heads: usize,
        device: &candle_core::Device,
    ) -> Result<Arc<Vec<DeviceLayout>>> {
        type Key = (usize, usize, Vec<Branch>, candle_core::Device);
        static LAST: Mutex<Option<(Key, Arc<Vec<DeviceLayout>>)>> = Mutex::new(None);
        let key: Key = (seq_len, num_heads, self.branches.clone(), device.clone());
        if let Some(((l, h, b, d), maps)) = LAST.lock().expect("poisoned").as_ref() {
            if (*l, *h, b) == (key.0, key.1, &key.2) && d.same_device(device) {
                return Ok(maps.clone());
            }
        }
        let grid = seq_len * num_heads;
        let mut maps = Vec::with_capacity(self.branches.len());
        for branch in &self.branches {
            let layout = branch.layout(seq_len, num_heads)?;
            let sparse_rows = layout.problems * layout.tokens;
            // inverse[g] = the sparse row holding grid row g, or `sparse_rows` (a zero row).
            let mut inverse = vec![sparse_rows as u32; grid];
            for (i, &r) in layout.rows.iter().enumerate() {
                if (r as usize) < grid {
                    inverse[r as usize] = i as u32;
                }
            }
            maps.push(DeviceLayout {
                rows: Tensor::from_vec(layout.rows, sparse_rows, device)?,
                inverse: Tensor::from_vec(inverse, grid, device)?,
                problems: layout.problems,
                tokens: layout.tokens,
            });
        }
        let maps = Arc::new(maps);
        *LAST.lock().expect("poisoned") = Some((key, maps.clone()));
        Ok(maps)
    }

    /// One branch: gather its problems, attend chunk by chunk. Returns the sparse outputs
    /// [problems * tokens, Dh] and lses [problems * tokens] (f32) in `rows` order.
    fn branch(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rows: &Tensor,
        problems: usize,
        tokens: usize,
    ) -> Result<(Tensor, Tensor)> {
        let dh = q.dim(1)?;
        let gather = |t: &Tensor| t.index_select(rows, 0)?.reshape((problems, tokens, dh));
        let (q, k, v) = (gather(q)?, gather(k)?, gather(v)?);
        let mut outs = Vec::new();
        let mut lses = Vec::new();
        let per_problem = tokens * tokens;
        if per_problem <= self.chunk_scores {
            let batch = (self.chunk_scores / per_problem).max(1);
            for start in (0..problems).step_by(batch) {
                let n = batch.min(problems - start);
                let (o, lse) = attention_with_lse(
                    &q.narrow(0, start, n)?,
                    &k.narrow(0, start, n)?,
                    &v.narrow(0, start, n)?,
                    self.scale,
                )?;
                outs.push(o.reshape((n * tokens, dh))?);
                lses.push(lse.flatten_all()?);
            }
        } else {
            // One problem is too big on its own: split its queries, keys stay whole (exact).
            let block = (self.chunk_scores / tokens).max(1);
            for p in 0..problems {
                let (kp, vp) = (k.narrow(0, p, 1)?, v.narrow(0, p, 1)?);
                for start in (0..tokens).step_by(block) {
                    let n = block.min(tokens - start);
                    let qp = q.narrow(0, p, 1)?.narrow(1, start, n)?;
                    let (o, lse) = attention_with_lse(&qp, &kp, &vp, self.scale)?;
                    outs.push(o.reshape((n, dh))?);
                    lses.push(lse.flatten_all()?);
                }
            }
        }
        Ok((Tensor::cat(&outs, 0)?, Tensor::cat(&lses, 0)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{softmax_with_lse, softmax_with_lse_fused};
    use candle_core::{Device, D};

    /// The spec's algorithm written out literally in f64 loops: pad, segment, dilate, attend,
    /// scatter with -1e8, combine. Independent of the gather/scatter map above.
    fn naive(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        l: usize,
        h: usize,
        dh: usize,
        branches: &[(usize, usize)],
    ) -> Vec<f64> {
        let at = |x: &[f64], pos: usize, head: usize| -> Vec<f64> {
            if pos < l {
                x[(pos * h + head) * dh..][..dh].to_vec()
            } else {
                vec![0.0; dh]
            }
        };
        let scale = (dh as f64).powf(-0.5);
        let mut outs = Vec::new();
        let mut lses = Vec::new();
        for &(seg_len, r) in branches {
            let s = seg_len.min(l);
            let n = l.div_ceil(s);
            let s_pad = s.div_ceil(r) * r;
            let hp = h.div_ceil(r) * r;
            let mut out = vec![0.0; l * h * dh];
            let mut lse = vec![0.0; l * h];
            for seg in 0..n {
                for head in 0..h {
                    let j = head / (hp / r);
                    let pos: Vec<usize> = (j..s_pad).step_by(r).map(|p| seg * s + p).collect();
                    for &pq in &pos {
                        let qv = at(q, pq, head);
                        let logits: Vec<f64> = pos
                            .iter()
                            .map(|&pk| {
                                at(k, pk, head)
                                    .iter()
                                    .zip(&qv)
                                    .map(|(a, b)| a * b)
                                    .sum::<f64>()
                                    * scale
                            })
                            .collect();
                        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let z: f64 = logits.iter().map(|x| (x - m).exp()).sum();
                        if pq >= l {
                            continue;
                        }
                        for (&pk, x) in pos.iter().zip(&logits) {
                            let w = (x - m).exp() / z;
                            for (d, vv) in at(v, pk, head).iter().enumerate() {
                                out[(pq * h + head) * dh + d] += w * vv;
                            }
                        }
                        lse[pq * h + head] = m + z.ln();
                    }
                }
            }
            lse.iter_mut()
                .filter(|x| **x == 0.0)
                .for_each(|x| *x = -1e8);
            outs.push(out);
            lses.push(lse);
        }
        let mut res = vec![0.0; l * h * dh];
        for i in 0..l * h {
            let m = lses.iter().map(|x| x[i]).fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = lses.iter().map(|x| (x[i] - m).exp()).sum();
            for b in 0..branches.len() {
                let w = (lses[b][i] - m).exp() / z;
                for d in 0..dh {
                    res[i * dh + d] += w * outs[b][i * dh + d];
                }
            }
        }
        res
    }

    fn random(l: usize, h: usize, dh: usize, seed: u64) -> Vec<f64> {
        // A small LCG: deterministic, no extra dependency.
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..l * h * dh)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) as f64 / (1u64 << 31) as f64) * 4.0 - 2.0
            })
            .collect()
    }

    fn run(
        l: usize,
        h: usize,
        dh: usize,
        branches: &[(usize, usize)],
        chunk: usize,
    ) -> (Vec<f64>, Vec<f32>) {
        let (q, k, v) = (
            random(l, h, dh, 1),
            random(l, h, dh, 2),
            random(l, h, dh, 3),
        );
        let expected = naive(&q, &k, &v, l, h, dh, branches);
        let t = |x: &[f64]| {
            Tensor::from_vec(
                x.iter().map(|&a| a as f32).collect::<Vec<_>>(),
                (l, h, dh),
                &Device::Cpu,
            )
            .unwrap()
        };
        let (segs, ratios): (Vec<usize>, Vec<usize>) = branches.iter().cloned().unzip();
        let attn = DilatedAttention::new(&segs, &ratios, h, dh)
            .unwrap()
            .with_chunk_scores(chunk);
        let got = attn.forward(&t(&q), &t(&k), &t(&v)).unwrap();
        // The ops path (CUDA, half precision, training) must agree with the fused CPU kernel.
        let ops = attn.forward_ops(&t(&q), &t(&k), &t(&v)).unwrap();
        let diff: f32 = (&got - &ops)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(diff < 1e-5, "fused kernel and ops path differ by {diff}");
        (expected, got.flatten_all().unwrap().to_vec1().unwrap())
    }

    fn assert_close(expected: &[f64], got: &[f32], what: &str) {
        let max = expected
            .iter()
            .zip(got)
            .map(|(a, b)| (a - *b as f64).abs())
            .fold(0.0, f64::max);
        assert!(max < 2e-5, "{what}: max abs diff {max}");
    }

    #[test]
    fn matches_the_naive_spec_on_lengths_on_and_off_segment_multiples() {
        let branches = [(4, 1), (8, 2), (16, 4)];
        // 1: a single token; 4, 8, 16: exact multiples; 5, 9, 13: a partial last segment;
        // 17 and 37: several segments in every branch, odd tails inside the dilation.
        for l in [1, 3, 4, 5, 8, 9, 13, 16, 17, 37] {
            let (expected, got) = run(l, 4, 3, &branches, DEFAULT_CHUNK_SCORES);
            assert_close(&expected, &got, &format!("L = {l}"));
        }
    }

    #[test]
    fn matches_the_naive_spec_when_heads_do_not_divide_by_the_ratio() {
        // 3 heads, ratio 2 and 4: the reference pads heads to a multiple of r, then drops them.
        for l in [6, 7, 11] {
            let (expected, got) = run(l, 3, 2, &[(4, 1), (6, 2), (8, 4)], DEFAULT_CHUNK_SCORES);
            assert_close(&expected, &got, &format!("L = {l}, 3 heads"));
        }
    }

    #[test]
    fn chunking_does_not_change_results() {
        let branches = [(8, 1), (16, 2), (64, 4)];
        let (expected, whole) = run(50, 4, 4, &branches, DEFAULT_CHUNK_SCORES);
        // 100 scores per chunk: several problems per chunk for small branches, query blocks
        // inside one problem for the 50-token single-segment ones.
        let (_, chunked) = run(50, 4, 4, &branches, 100);
        let (_, tiny) = run(50, 4, 4, &branches, 1);
        assert_close(&expected, &whole, "whole");
        assert_close(&expected, &chunked, "chunked");
        assert_close(&expected, &tiny, "one query row at a time");
    }

    #[test]
    fn layout_selects_the_head_group_positions() {
        // L = 10, 4 heads, S = 8, r = 2: two segments [0, 8) and [8, 16) (padded past 10);
        // heads 0-1 take even offsets, heads 2-3 odd ones.
        let layout = Branch {
            segment_length: 8,
            ratio: 2,
        }
        .layout(10, 4)
        .unwrap();
        assert_eq!((layout.problems, layout.tokens), (8, 4));
        let sink = 40;
        let positions = |problem: usize| -> Vec<i64> {
            layout.rows[problem * 4..][..4]
                .iter()
                .map(|&r| if r == sink { -1 } else { (r / 4) as i64 })
                .collect()
        };
        assert_eq!(positions(0), [0, 2, 4, 6]); // segment 0, head 0
        assert_eq!(positions(1), [0, 2, 4, 6]); // head 1, same group
        assert_eq!(positions(2), [1, 3, 5, 7]); // head 2
        assert_eq!(positions(4), [8, -1, -1, -1]); // segment 1, head 0: 10, 12, 14 are padding
        assert_eq!(positions(7), [9, -1, -1, -1]); // segment 1, head 3
        assert_eq!(layout.rows[2 * 4], 4 + 2, "row = position * heads + head");
    }

    #[test]
    fn zero_padded_keys_count_in_the_softmax() {
        // One branch, S = 4, L = 5: token 4 sits alone in segment 2 with 3 zero keys, so
        // out[4] = v4 * e^a / (e^a + 3) with a = q4.k4 / sqrt(dh).
        let (l, h, dh) = (5, 1, 2);
        let q = Tensor::new(
            &[
                [[0.0f32, 0.0]],
                [[0.0, 0.0]],
                [[0.0, 0.0]],
                [[0.0, 0.0]],
                [[1.0, 2.0]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let k = Tensor::new(
            &[
                [[0.0f32, 0.0]],
                [[0.0, 0.0]],
                [[0.0, 0.0]],
                [[0.0, 0.0]],
                [[0.5, 0.25]],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let v = (Tensor::ones((l, h, dh), DType::F32, &Device::Cpu).unwrap() * 3.0).unwrap();
        let attn = DilatedAttention::new(&[4], &[1], h, dh).unwrap();
        let out: Vec<f32> = attn
            .forward(&q, &k, &v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let a = (1.0f64 * 0.5 + 2.0 * 0.25) / 2f64.sqrt();
        let expected = 3.0 * a.exp() / (a.exp() + 3.0);
        assert!(
            (out[8] as f64 - expected).abs() < 1e-6,
            "{} vs {expected}",
            out[8]
        );
    }

    #[test]
    fn uncovered_positions_take_no_weight_from_a_branch() {
        // With branches (4, 1) and (4, 2), head 0 of the ratio-2 branch covers positions 0 and 2
        // only: at position 1 the mix must equal the ratio-1 branch alone (lse -1e8 -> weight 0).
        let (l, h, dh) = (4, 2, 3);
        let t = |seed| {
            let x: Vec<f32> = random(l, h, dh, seed).iter().map(|&a| a as f32).collect();
            Tensor::from_vec(x, (l, h, dh), &Device::Cpu).unwrap()
        };
        let (q, k, v) = (t(1), t(2), t(3));
        let both = DilatedAttention::new(&[4, 4], &[1, 2], h, dh)
            .unwrap()
            .forward(&q, &k, &v)
            .unwrap();
        let first = DilatedAttention::new(&[4], &[1], h, dh)
            .unwrap()
            .forward(&q, &k, &v)
            .unwrap();
        let at = |t: &Tensor, p: usize, hd: usize| -> Vec<f32> {
            t.get(p).unwrap().get(hd).unwrap().to_vec1().unwrap()
        };
        assert_eq!(at(&both, 1, 0), at(&first, 1, 0));
        assert_eq!(at(&both, 0, 1), at(&first, 0, 1));
        assert_ne!(
            at(&both, 0, 0),
            at(&first, 0, 0),
            "covered positions mix both branches"
        );
    }

    #[test]
    fn a_zero_lse_is_treated_as_uncovered() {
        // L = 1, q = 0: every branch attends one key with logit 0, so every lse is exactly 0.0,
        // all become -1e8, and the mix weighs the branches equally (each output is v).
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 1, 2), DType::F32, &dev).unwrap();
        let k = Tensor::new(&[[[1.0f32, 1.0]]], &dev).unwrap();
        let v = Tensor::new(&[[[2.0f32, -4.0]]], &dev).unwrap();
        let out = DilatedAttention::new(&[1, 2], &[1, 1], 1, 2)
            .unwrap()
            .forward(&q, &k, &v)
            .unwrap();
        assert_eq!(
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [2.0, -4.0]
        );
        let scores = Tensor::zeros((1, 1, 1), DType::F32, &dev).unwrap();
        let (_, lse) = softmax_with_lse(&scores, 1.0).unwrap();
        assert_eq!(lse.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [0.0]);
    }

    #[test]
    fn lengths_where_the_reference_drifts_are_refused() {
        let attn = DilatedAttention::new(
            &[1024, 5792, 32768, 185363, 1048576],
            &[1, 2, 4, 8, 16],
            16,
            48,
        )
        .unwrap();
        assert!(attn.check_len(185_363).is_ok());
        let err = attn.check_len(185_364).unwrap_err();
        assert!(err.contains("at most 185362 tiles"), "{err}");
    }

    #[test]
    fn fused_and_composed_softmax_with_lse_agree() {
        let x = Tensor::randn(0f32, 3., (3, 5, 70), &Device::Cpu).unwrap();
        let (p, lse) = softmax_with_lse(&x, 0.3).unwrap();
        let xs = (&x * 0.3).unwrap();
        let p_ref = candle_nn::ops::softmax(&xs, D::Minus1).unwrap();
        let lse_ref = xs.exp().unwrap().sum(D::Minus1).unwrap().log().unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&p, &p_ref) < 1e-6);
        assert!(diff(&lse, &lse_ref) < 1e-5);
        // The GPU inference path (fused softmax, lse from the row maxima), run here on CPU.
        let (p2, lse2) = softmax_with_lse_fused(&x, 0.3).unwrap();
        assert!(diff(&p2, &p_ref) < 1e-6);
        assert!(diff(&lse2, &lse_ref) < 1e-5);
        // Large logits: the max-shift keeps it finite where exp() alone overflows.
        let big = (Tensor::randn(0f32, 1., (2, 9), &Device::Cpu).unwrap() + 500.0).unwrap();
        let (_, lse_big) = softmax_with_lse_fused(&big, 1.0).unwrap();
        let max: Vec<f32> = big.max(D::Minus1).unwrap().to_vec1().unwrap();
        for (l, m) in lse_big.to_vec1::<f32>().unwrap().iter().zip(&max) {
            assert!(
                l.is_finite() && *l >= *m && *l <= m + (9f32).ln() + 1e-3,
                "{l} vs {m}"
            );
        }
    }
}
