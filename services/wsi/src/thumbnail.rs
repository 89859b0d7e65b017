//! A downsampled RGB view of a whole slide at an exact downsample, read strip by strip so that
//! memory stays at the size of the result (never the slide's pixels).
//!
//! Segmentation runs on this view; its pixel grid is chosen so that every tile covers a whole
//! number of its pixels (see [`crate::grid`]).

use crate::error::Result;
use crate::slide::Slide;

/// Level-0 pixels of a strip read in one OpenSlide call (about 64 MB of ARGB).
const STRIP_PX: u64 = 16 << 20;

/// Packed RGB image.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

impl RgbImage {
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }
}

/// Reads the slide at level-0 `downsample` (>= 1): output pixel (i, j) is the mean of the
/// source pixels whose level-0 footprint falls in [i*ds, (i+1)*ds) x [j*ds, (j+1)*ds).
/// The size is `ceil(W0 / ds) x ceil(H0 / ds)`.
pub fn read_downsampled(slide: &Slide, downsample: f64) -> Result<RgbImage> {
    let (w0, h0) = slide.level0_size();
    let out_w = (w0 as f64 / downsample).ceil() as u32;
    let out_h = (h0 as f64 / downsample).ceil() as u32;
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
    let rows_per_strip = ((STRIP_PX as f64 / (lvl.width as f64 * f)).floor() as u32).max(1);
    let mut row = 0u32;
    while row < out_h {
        let rows = rows_per_strip.min(out_h - row);
        let src_y0 = (row as f64 * f).floor() as u64;
        let src_y1 = (((row + rows) as f64 * f).ceil() as u64)
            .min(lvl.height)
            .max(src_y0 + 1);
        let src_h = (src_y1 - src_y0) as u32;
        let src_w = lvl.width as u32;
        let y0_level0 = (src_y0 as f64 * lvl.downsample).round() as u64;
        let strip = slide.read_rgb(level, 0, y0_level0, src_w, src_h)?;
        for j in row..row + rows {
            let (sy0, sy1) = source_span(j, f, src_y0, src_y1);
            for i in 0..out_w {
                let (sx0, sx1) = source_span(i, f, 0, lvl.width);
                let mut acc = [0u64; 3];
                let mut n = 0u64;
                for sy in sy0..sy1 {
                    let base = ((sy - src_y0) as usize * src_w as usize) * 3;
                    for sx in sx0..sx1 {
                        let k = base + sx as usize * 3;
                        acc[0] += strip[k] as u64;
                        acc[1] += strip[k + 1] as u64;
                        acc[2] += strip[k + 2] as u64;
                        n += 1;
                    }
                }
                let o = (j as usize * out_w as usize + i as usize) * 3;
                for c in 0..3 {
                    pixels[o + c] = ((acc[c] + n / 2) / n) as u8;
                }
            }
        }
        row += rows;
    }
    Ok(RgbImage {
        width: out_w,
        height: out_h,
        pixels,
    })
}

/// Source pixels [a, b) averaged into output pixel `i` at `f` source pixels per output pixel,
/// kept inside [lo, hi) and never empty (edge pixels repeat the last source pixel).
fn source_span(i: u32, f: f64, lo: u64, hi: u64) -> (u64, u64) {
    let a = ((i as f64 * f).floor() as u64).clamp(lo, hi - 1);
    let b = (((i + 1) as f64 * f).floor() as u64).clamp(a + 1, hi);
    (a, b)
}
