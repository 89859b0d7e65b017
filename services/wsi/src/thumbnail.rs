//! A downsampled RGB view of a whole slide at an exact downsample, read strip by strip so that
//! memory stays at the size of the result (never the slide's pixels).
//!
//! Segmentation runs on this view; its pixel grid is chosen so that every tile covers a whole
//! number of its pixels (see [`crate::grid`]).
//!
//! A damaged stored tile does not fail the view: its pixels show the slide's background (see
//! `BlockReader`), so no tile is kept there.

use crate::error::{Result, WsiError};
use crate::slide::Slide;

/// Source pixels of a block read in one OpenSlide call (about 64 MB of ARGB).
const STRIP_PX: u64 = 16 << 20;

/// Packed RGB image.
#[derive(Debug, Clone)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Row-major RGB, 3 bytes a pixel, `width * height * 3`.
    pub pixels: Vec<u8>,
}

impl RgbImage {
    /// The RGB of pixel (`x`, `y`); panics outside the image.
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// Reads the slide at level-0 `downsample` (>= 1): output pixel (i, j) is the mean of the
/// source pixels whose level-0 footprint falls in [i*ds, (i+1)*ds) x [j*ds, (j+1)*ds).
/// The size is `ceil(W0 / ds) x ceil(H0 / ds)`, refused above `max_px` pixels before anything
/// is allocated; source pixels are read in blocks of at most about `STRIP_PX` whatever the
/// slide's width.
pub fn read_downsampled(slide: &Slide, downsample: f64, max_px: u64) -> Result<RgbImage> {
    let (w0, h0) = slide.level0_size();
    let too_big = |what: String| WsiError::AbsurdPlan {
        path: slide.path().to_path_buf(),
        reason: what,
    };
    if !(downsample.is_finite() && downsample >= 1.0) {
        return Err(too_big(format!(
            "a view at downsample {downsample} would be finer than level 0"
        )));
    }
    let (out_w, out_h) = (
        (w0 as f64 / downsample).ceil(),
        (h0 as f64 / downsample).ceil(),
    );
    if out_w * out_h > max_px as f64 {
        return Err(too_big(format!(
            "a {out_w} x {out_h} px view at downsample {downsample} is over the {max_px} px cap"
        )));
    }
    let (out_w, out_h) = (out_w as u32, out_h as u32);
    // The coarsest level no coarser than the target (1% slack for OpenSlide's 4.0003-style
    // downsamples), so that every output pixel averages at least one real pixel.
    let (level, lvl) = slide
        .levels()
        .iter()
        .enumerate()
        .filter(|(_, l)| l.downsample <= downsample * 1.01)
        .max_by(|a, b| a.1.downsample.total_cmp(&b.1.downsample))
        .unwrap_or((0, &slide.levels()[0]));
    // Source pixels of `level` per output pixel.
    let f = downsample / lvl.downsample;
    let mut pixels = vec![0u8; out_w as usize * out_h as usize * 3];
    let mut reader = BlockReader {
        slide,
        fresh: None,
        lost_pieces: 0,
    };
    // Blocks of output pixels whose source block holds at most about STRIP_PX pixels: bands of
    // about 4096 source rows, cut into columns.
    let rows_per_band = ((4096.0 / f).floor() as u32).clamp(1, out_h);
    let band_src_rows = (rows_per_band as f64 * f).ceil() + 1.0;
    let cols_per_block = ((STRIP_PX as f64 / (band_src_rows * f)).floor() as u32).clamp(1, out_w);
    let mut row = 0u32;
    while row < out_h {
        let rows = rows_per_band.min(out_h - row);
        let src_y0 = (row as f64 * f).floor() as u64;
        let src_y1 = (((row + rows) as f64 * f).ceil() as u64)
            .min(lvl.height)
            .max(src_y0 + 1);
        let mut col = 0u32;
        while col < out_w {
            let cols = cols_per_block.min(out_w - col);
            let src_x0 = ((col as f64 * f).floor() as u64).min(lvl.width.saturating_sub(1));
            let src_x1 = (((col + cols) as f64 * f).ceil() as u64)
                .min(lvl.width)
                .max(src_x0 + 1);
            let block = Block {
                x0: src_x0,
                x1: src_x1,
                y0: src_y0,
                y1: src_y1,
            };
            let src = reader.read_block(level, lvl.downsample, &block)?;
            for j in row..row + rows {
                let (sy0, sy1) = source_span(j, f, src_y0, src_y1);
                for i in col..col + cols {
                    let (sx0, sx1) = source_span(i, f, src_x0, src_x1);
                    let mean = block.mean(&src, (sx0, sx1), (sy0, sy1));
                    let o = (j as usize * out_w as usize + i as usize) * 3;
                    pixels[o..o + 3].copy_from_slice(&mean);
                }
            }
            col += cols;
        }
        row += rows;
    }
    if reader.lost_pieces > 0 {
        tracing::warn!(
            "{}: {} stored tiles of level {level} could not be decoded; the tissue view shows \
             background there",
            slide.path().display(),
            reader.lost_pieces
        );
    }
    Ok(RgbImage {
        width: out_w,
        height: out_h,
        pixels,
    })
}

/// Side of the pieces a block is read in again after a failed read (a stored tile's usual size).
const PIECE_PX: u64 = 256;

/// Reads blocks of one level, surviving damaged stored tiles: OpenSlide's errors are sticky, so
/// after a failed read a fresh handle reads the block again in [`PIECE_PX`] pieces, and a piece
/// that still fails shows the slide's background colour.
struct BlockReader<'a> {
    slide: &'a Slide,
    fresh: Option<Slide>,
    lost_pieces: usize,
}

impl BlockReader<'_> {
    fn handle(&self) -> &Slide {
        self.fresh.as_ref().unwrap_or(self.slide)
    }

    fn reopen(&mut self) -> Result<()> {
        self.fresh = Some(Slide::open(self.slide.path(), None)?);
        Ok(())
    }

    fn read_block(&mut self, level: usize, downsample: f64, b: &Block) -> Result<Vec<u8>> {
        let to_level0 = |v: u64| (v as f64 * downsample).round() as u64;
        let (w, h) = (b.width() as u32, b.height() as u32);
        let first = self
            .handle()
            .read_rgb(level, to_level0(b.x0), to_level0(b.y0), w, h);
        let err = match first {
            Ok(rgb) => return Ok(rgb),
            Err(e @ WsiError::Unreadable { .. }) => e,
            Err(e) => return Err(e),
        };
        self.reopen()?;
        let background = self.slide.info().background_rgb;
        let mut rgb: Vec<u8> = background
            .iter()
            .copied()
            .cycle()
            .take(w as usize * h as usize * 3)
            .collect();
        let (mut read, mut lost) = (0usize, 0usize);
        // Pieces aligned to the level's stored tiles, so that one bad tile costs one piece.
        let mut py = b.y0 / PIECE_PX * PIECE_PX;
        while py < b.y1 {
            let (y0, y1) = (py.max(b.y0), (py + PIECE_PX).min(b.y1));
            let mut px = b.x0 / PIECE_PX * PIECE_PX;
            while px < b.x1 {
                let (x0, x1) = (px.max(b.x0), (px + PIECE_PX).min(b.x1));
                let (pw, ph) = ((x1 - x0) as u32, (y1 - y0) as u32);
                match self
                    .handle()
                    .read_rgb(level, to_level0(x0), to_level0(y0), pw, ph)
                {
                    Ok(piece) => {
                        read += 1;
                        for row in 0..ph as usize {
                            let src = &piece[row * pw as usize * 3..][..pw as usize * 3];
                            let at =
                                ((y0 - b.y0) as usize + row) * w as usize + (x0 - b.x0) as usize;
                            rgb[at * 3..at * 3 + src.len()].copy_from_slice(src);
                        }
                    }
                    Err(WsiError::Unreadable { .. }) => {
                        lost += 1;
                        self.reopen()?;
                    }
                    Err(e) => return Err(e),
                }
                px += PIECE_PX;
            }
            py += PIECE_PX;
        }
        if read == 0 {
            return Err(err);
        }
        self.lost_pieces += lost;
        Ok(rgb)
    }
}

/// A rectangle of source pixels [x0, x1) x [y0, y1) of one level, read as packed RGB.
struct Block {
    x0: u64,
    x1: u64,
    y0: u64,
    y1: u64,
}

impl Block {
    fn width(&self) -> u64 {
        self.x1 - self.x0
    }

    fn height(&self) -> u64 {
        self.y1 - self.y0
    }

    /// Rounded mean RGB of the source pixels [sx0, sx1) x [sy0, sy1) (level coordinates).
    fn mean(&self, rgb: &[u8], (sx0, sx1): (u64, u64), (sy0, sy1): (u64, u64)) -> [u8; 3] {
        let mut acc = [0u64; 3];
        let mut n = 0u64;
        for sy in sy0..sy1 {
            let base = (sy - self.y0) as usize * self.width() as usize * 3;
            for sx in sx0..sx1 {
                let k = base + (sx - self.x0) as usize * 3;
                acc[0] += rgb[k] as u64;
                acc[1] += rgb[k + 1] as u64;
                acc[2] += rgb[k + 2] as u64;
                n += 1;
            }
        }
        acc.map(|c| ((c + n / 2) / n.max(1)) as u8)
    }
}

/// Source pixels [a, b) averaged into output pixel `i` at `f` source pixels per output pixel,
/// kept inside [lo, hi) and never empty (edge pixels repeat the last source pixel).
fn source_span(i: u32, f: f64, lo: u64, hi: u64) -> (u64, u64) {
    let a = ((i as f64 * f).floor() as u64).clamp(lo, hi - 1);
    let b = (((i + 1) as f64 * f).floor() as u64).clamp(a + 1, hi);
    (a, b)
}
