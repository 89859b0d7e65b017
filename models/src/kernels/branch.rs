//! The geometry of LongNet's dilated attention, shared by every implementation of it: a branch
//! (segment length, dilation ratio), where its attention problems read and write, and the lse the
//! reference writes where a branch does not reach.

use candle_core::Result;

/// The lse the reference writes where a head did not cover a position.
pub const UNCOVERED_LSE: f32 = -1e8;

/// One branch of dilated attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Branch {
    /// Segment length S.
    pub segment_length: usize,
    /// Dilation ratio r.
    pub ratio: usize,
}

/// Where a branch's attention problems read from and write to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BranchLayout {
    /// Independent attention problems: segments x heads, ordered (segment, head).
    pub problems: usize,
    /// Tokens per problem, zero padding included.
    pub tokens: usize,
    /// Row of the flattened `[L * H]` grid (`position * H + head`) for token t of problem i at
    /// `rows[i * tokens + t]`; `L * H` (the zero sink row) for padding.
    pub rows: Vec<u32>,
}

impl Branch {
    /// Segment length actually used, `min(S, L)`, and the number of segments.
    pub fn segments(&self, seq_len: usize) -> (usize, usize) {
        let s = self.segment_length.min(seq_len).max(1);
        (s, seq_len.div_ceil(s))
    }

    /// Errors where the reference would silently misplace tokens: several segments whose length
    /// is not a multiple of r (its scatter-back then drifts by the intra-segment padding).
    pub fn check_len(&self, seq_len: usize) -> std::result::Result<(), String> {
        let (s, n) = self.segments(seq_len);
        if n > 1 && s % self.ratio != 0 {
            return Err(format!(
                "sequence length {seq_len} needs {n} segments of {s} tokens in the dilated \
                 attention branch (segment {}, ratio {}); the reference implementation is not \
                 defined there (segment length not a multiple of the ratio). Use at most {} tiles",
                self.segment_length,
                self.ratio,
                self.segment_length - 1
            ));
        }
        Ok(())
    }

    /// The gather / scatter map of this branch for `seq_len` tokens and `num_heads` heads.
    pub fn layout(&self, seq_len: usize, num_heads: usize) -> Result<BranchLayout> {
        self.check_len(seq_len).map_err(candle_core::Error::msg)?;
        let r = self.ratio;
        let (s, n) = self.segments(seq_len);
        let tokens = s.div_ceil(r);
        // The reference pads heads to a multiple of r too, then drops the padded heads.
        let group = num_heads.div_ceil(r);
        let sink = (seq_len * num_heads) as u32;
        let mut rows = Vec::with_capacity(n * num_heads * tokens);
        for seg in 0..n {
            for h in 0..num_heads {
                let j = h / group;
                rows.extend((0..tokens).map(|t| {
                    let pos = seg * s + j + r * t;
                    if pos < seq_len {
                        (pos * num_heads + h) as u32
                    } else {
                        sink
                    }
                }));
            }
        }
        Ok(BranchLayout {
            problems: n * num_heads,
            tokens,
            rows,
        })
    }
}
