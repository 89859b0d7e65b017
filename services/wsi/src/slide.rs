//! Opening a slide through OpenSlide, describing it, and reading RGB pixels from it.
//!
//! Not for: choosing the tile level or magnification (see [`crate::grid`]).

use std::path::{Path, PathBuf};

use openslide_rs::{errors::OpenSlideError, Address, OpenSlide, Region, Size};
use serde::Serialize;

use crate::error::{Result, WsiError};
use crate::mpp::{self, Mpp};

/// One level of the slide's pyramid.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Level {
    /// Width in this level's pixels.
    pub width: u64,
    /// Height in this level's pixels.
    pub height: u64,
    /// Level-0 pixels per pixel of this level, as OpenSlide reports it (e.g. 4.0003).
    pub downsample: f64,
    /// Side of the tiles the file stores this level in (`openslide.level[N].tile-width` /
    /// `-height`), when OpenSlide reports it: OpenSlide decodes a whole tile to read any of its
    /// pixels, so this bounds what one read allocates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tile_size: Option<(u64, u64)>,
}

/// An associated image (label, macro, thumbnail) stored beside the pyramid.
#[derive(Debug, Clone, Serialize)]
pub struct AssociatedImage {
    /// OpenSlide's name for it (`label`, `macro`, `thumbnail`).
    pub name: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// What `gigapath slide info` prints.
#[derive(Debug, Clone, Serialize)]
pub struct SlideInfo {
    /// The slide file.
    pub path: PathBuf,
    /// OpenSlide's format name (`aperio`, `hamamatsu`, ...); `unknown` when it gives none.
    pub vendor: String,
    /// The pyramid, level 0 (full resolution) first.
    pub levels: Vec<Level>,
    /// Level-0 resolution, or `None` when neither the slide nor the user gives one.
    pub mpp: Option<Mpp>,
    /// Scanning objective magnification (20, 40), when the slide records it.
    pub objective_power: Option<f64>,
    /// Label, macro and similar images; empty when there are none.
    pub associated_images: Vec<AssociatedImage>,
    /// RGB the slide declares for areas outside the scanned region (white when unset).
    pub background_rgb: [u8; 3],
}

/// An open whole-slide image. `Send + Sync` (OpenSlide is thread-safe); each handle keeps its own
/// tile cache, so parallel readers open one handle each.
pub struct Slide {
    path: PathBuf,
    osr: OpenSlide,
    info: SlideInfo,
}

impl Slide {
    /// Opens `path`. `user_mpp` is the fallback resolution used only when the slide records none
    /// (OpenSlide properties first, then the TIFF resolution tags); it is validated either way.
    pub fn open(path: &Path, user_mpp: Option<f64>) -> Result<Slide> {
        if let Some(v) = user_mpp {
            mpp::validate(v)?;
        }
        check_file(path)?;
        let osr = OpenSlide::new(path).map_err(|e| open_error(path, e))?;
        let info = describe(path, &osr, user_mpp)?;
        Ok(Slide {
            path: path.to_path_buf(),
            osr,
            info,
        })
    }

    /// The file it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the slide says about itself.
    pub fn info(&self) -> &SlideInfo {
        &self.info
    }

    /// The pyramid, level 0 first (never empty).
    pub fn levels(&self) -> &[Level] {
        &self.info.levels
    }

    /// Width and height of level 0, in pixels.
    pub fn level0_size(&self) -> (u64, u64) {
        let l = self.info.levels[0];
        (l.width, l.height)
    }

    /// The level-0 resolution, or the error that tells the user to pass `--mpp`.
    pub fn mpp(&self) -> Result<Mpp> {
        self.info
            .mpp
            .clone()
            .ok_or_else(|| WsiError::NoMpp(self.path.clone()))
    }

    /// Reads `w x h` pixels of `level` whose top-left corner is at level-0 pixel
    /// (`x0_level0`, `y0_level0`), as packed RGB. OpenSlide returns premultiplied ARGB; pixels
    /// that are not fully opaque (outside the scanned area) are composited over the slide's
    /// background colour, as OpenSlide recommends.
    pub fn read_rgb(
        &self,
        level: usize,
        x0_level0: u64,
        y0_level0: u64,
        w: u32,
        h: u32,
    ) -> Result<Vec<u8>> {
        let mut rgb = vec![0u8; w as usize * h as usize * 3];
        self.read_rgb_into(level, x0_level0, y0_level0, w, h, &mut rgb)?;
        Ok(rgb)
    }

    /// [`Slide::read_rgb`] into a caller-owned buffer of `w * h * 3` bytes.
    pub fn read_rgb_into(
        &self,
        level: usize,
        x0_level0: u64,
        y0_level0: u64,
        w: u32,
        h: u32,
        rgb: &mut [u8],
    ) -> Result<()> {
        assert_eq!(rgb.len(), w as usize * h as usize * 3, "rgb buffer size");
        let to_u32 = |v: u64| {
            u32::try_from(v).map_err(|_| WsiError::InvalidParameter {
                name: "region origin",
                value: v.to_string(),
                why: "beyond OpenSlide's 32-bit addresses",
            })
        };
        let region = Region {
            size: Size { w, h },
            level: level as u32,
            address: Address {
                x: to_u32(x0_level0)?,
                y: to_u32(y0_level0)?,
            },
        };
        let argb = self
            .osr
            .read_region(&region)
            .map_err(|e| WsiError::Unreadable {
                path: self.path.clone(),
                msg: format!(
                    "reading {w}x{h} px at level {level}, level-0 ({x0_level0}, {y0_level0}): {e}"
                ),
            })?;
        premultiplied_argb_to_rgb(&argb, self.info.background_rgb, rgb);
        Ok(())
    }
}

/// Converts OpenSlide's premultiplied native-endian ARGB to RGB over `background`.
/// Compositing a premultiplied colour needs no division: `out = c + bg * (255 - a) / 255`.
pub fn premultiplied_argb_to_rgb(argb: &[u8], background: [u8; 3], rgb: &mut [u8]) {
    for (px, out) in argb.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        let v = u32::from_ne_bytes([px[0], px[1], px[2], px[3]]);
        let a = (v >> 24) as u8;
        let c = [(v >> 16) as u8, (v >> 8) as u8, v as u8];
        match a {
            255 => out.copy_from_slice(&c),
            0 => out.copy_from_slice(&background),
            _ => {
                for i in 0..3 {
                    let bg = (background[i] as u32 * (255 - a as u32) + 127) / 255;
                    out[i] = (c[i] as u32 + bg).min(255) as u8;
                }
            }
        }
    }
}

fn check_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => WsiError::MissingFile(path.to_path_buf()),
        _ => WsiError::io(path, e),
    })?;
    if meta.is_dir() {
        return Err(WsiError::IsDirectory(path.to_path_buf()));
    }
    if meta.len() == 0 {
        return Err(WsiError::EmptyFile(path.to_path_buf()));
    }
    Ok(())
}

fn open_error(path: &Path, err: OpenSlideError) -> WsiError {
    match err {
        OpenSlideError::MissingFile(p) => WsiError::MissingFile(p),
        OpenSlideError::UnsupportedFile(p) => WsiError::Unsupported(p),
        other => WsiError::Unreadable {
            path: path.to_path_buf(),
            msg: other.to_string(),
        },
    }
}

fn describe(path: &Path, osr: &OpenSlide, user_mpp: Option<f64>) -> Result<SlideInfo> {
    let unreadable = |e: OpenSlideError| WsiError::Unreadable {
        path: path.to_path_buf(),
        msg: e.to_string(),
    };
    let prop = |name: &str| osr.property_value(name).ok();
    let sizes: Vec<(u64, u64)> = osr
        .all_level_dimensions()
        .iter()
        .map(|s| (s.w as u64, s.h as u64))
        .collect();
    let mut info = describe_properties(path, &prop, &sizes, osr.all_level_downsamples(), user_mpp)?;
    for name in osr.associated_image_names().map_err(unreadable)? {
        let size = osr.associated_image_dimensions(&name).map_err(unreadable)?;
        info.associated_images.push(AssociatedImage {
            name,
            width: size.w,
            height: size.h,
        });
    }
    Ok(info)
}

/// What a slide's properties (`prop` looks one up by name, as OpenSlide reports them) and its
/// pyramid (level sizes and downsamples) say about it: levels with their stored tile sizes, mpp
/// and its source, objective power, background colour. Associated images are left empty. Pure
/// (no file access): [`Slide::open`] calls it with what OpenSlide read, the fuzz targets with
/// arbitrary values. Errors when there is no level or level 0 is empty.
pub fn describe_properties(
    path: &Path,
    prop: &dyn Fn(&str) -> Option<String>,
    sizes: &[(u64, u64)],
    downsamples: &[f64],
    user_mpp: Option<f64>,
) -> Result<SlideInfo> {
    if sizes.is_empty() {
        return Err(WsiError::Unreadable {
            path: path.to_path_buf(),
            msg: "the slide has no pyramid levels".into(),
        });
    }
    let levels = sizes
        .iter()
        .zip(downsamples)
        .enumerate()
        .map(|(i, (&(w, h), &d))| {
            let side = |what: &str| {
                prop(&format!("openslide.level[{i}].tile-{what}"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            Level {
                width: w,
                height: h,
                downsample: d,
                tile_size: side("width").zip(side("height")),
            }
        })
        .collect::<Vec<_>>();
    if levels.is_empty() || levels[0].width == 0 || levels[0].height == 0 {
        return Err(WsiError::Unreadable {
            path: path.to_path_buf(),
            msg: "level 0 is empty (0 px)".into(),
        });
    }
    Ok(SlideInfo {
        path: path.to_path_buf(),
        vendor: prop("openslide.vendor").unwrap_or_else(|| "unknown".into()),
        levels,
        mpp: mpp::discover(path, prop, user_mpp),
        objective_power: prop("openslide.objective-power").and_then(|v| v.trim().parse().ok()),
        associated_images: Vec::new(),
        background_rgb: prop("openslide.background-color")
            .and_then(|hex| parse_hex_rgb(&hex))
            .unwrap_or([255, 255, 255]),
    })
}

fn parse_hex_rgb(hex: &str) -> Option<[u8; 3]> {
    let hex = hex.trim();
    if hex.len() != 6 {
        return None;
    }
    let ch = |i: usize| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok();
    Some([ch(0)?, ch(2)?, ch(4)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn premultiplied_pixels_composite_over_background() {
        let px =
            |a: u32, r: u32, g: u32, b: u32| ((a << 24) | (r << 16) | (g << 8) | b).to_ne_bytes();
        let argb: Vec<u8> = [px(255, 10, 20, 30), px(0, 0, 0, 0), px(128, 64, 0, 32)]
            .into_iter()
            .flatten()
            .collect();
        let mut rgb = [0u8; 9];
        premultiplied_argb_to_rgb(&argb, [255, 255, 255], &mut rgb);
        assert_eq!(&rgb[0..3], &[10, 20, 30]);
        assert_eq!(&rgb[3..6], &[255, 255, 255]);
        // Half-transparent: premultiplied colour plus half the white background.
        assert_eq!(&rgb[6..9], &[64 + 127, 127, 32 + 127]);
    }

    #[test]
    fn hex_background_colour() {
        assert_eq!(parse_hex_rgb("FFEEDD"), Some([255, 238, 221]));
        assert_eq!(parse_hex_rgb("zz"), None);
    }
}
