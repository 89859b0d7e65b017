//! Synthetic whole-slide images with real H&E texture in known shapes, for tests, benchmarks and
//! the demo: the true tissue area is known exactly, so tiling can be checked against it.
//!
//! A [`Scene`] lives in microns (so a 20x and a 40x slide of one scene show the same tissue);
//! [`write_slide`] renders it into a tiled, pyramidal, JPEG-compressed TIFF that OpenSlide opens,
//! either as an Aperio slide (`|AppMag = 20|MPP = 0.499` in the ImageDescription), as a generic
//! TIFF with resolution tags, as an OME-TIFF (OME-XML pixel size; SubIFDs or a flat pyramid), or
//! with no resolution at all. [`corrupt_tiles`] then damages chosen stored tiles of a written
//! file, for tests of unreadable tiles. Tiles are rendered and encoded in
//! parallel one row at a time, so memory stays at one row of tiles whatever the slide size.
//!
//! Not for: reading slides (see [`crate::slide`]).

use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::Path;
use std::sync::OnceLock;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use tiff::encoder::{Rational, TiffEncoder, TiffKind, TiffKindBig, TiffKindStandard};
use tiff::tags::Tag;

use crate::error::{Result, WsiError};

/// Resolution of the bundled texture crops (they come from an Aperio slide at 0.499 um/px).
pub const TEXTURE_MPP: f64 = 0.499;
/// Side of the TIFF's internal tiles.
const TIFF_TILE_PX: u32 = 256;

/// What fills a region: a real H&E crop, or an artifact laid over what is below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextureKind {
    /// Squamous epithelium: dense, purple, many nuclei.
    Epithelium,
    /// Collagenous stroma: pink, sparse nuclei.
    Stroma,
    /// Marker ink over whatever is below (glass or tissue): it multiplies the light through,
    /// as ink on a coverslip does.
    BlueInk,
    /// Green marker ink, as `BlueInk`.
    GreenInk,
    /// Black marker ink, as `BlueInk`.
    BlackInk,
    /// Opaque dark brown-black dirt.
    Debris,
    /// Tissue below seen out of focus (a fold, a bubble, a tilted scan): its texture blurred.
    OutOfFocus,
}

impl TextureKind {
    /// Whether this is tissue as it should be embedded (not an artifact).
    pub fn is_tissue(self) -> bool {
        matches!(self, TextureKind::Epithelium | TextureKind::Stroma)
    }

    /// Per-channel transmission of an ink.
    fn ink(self) -> Option<[f32; 3]> {
        match self {
            TextureKind::BlueInk => Some([0.25, 0.4, 0.9]),
            TextureKind::GreenInk => Some([0.3, 0.85, 0.45]),
            TextureKind::BlackInk => Some([0.2, 0.2, 0.22]),
            _ => None,
        }
    }
}

/// Colour of [`TextureKind::Debris`].
const DEBRIS_RGB: [u8; 3] = [44, 34, 28];
/// Mip levels by which [`TextureKind::OutOfFocus`] blurs the texture (2^3 = 8 px at 0.5 um/px).
const BLUR_MIP_LEVELS: usize = 3;
/// Spacing of the lattice [`TextureKind::OutOfFocus`] averages over, microns.
const BLUR_RADIUS_UM: f64 = 3.0;

/// An RGB texture with a box-filtered mip chain, sampled with mirrored repeat so that tiling it
/// shows no seams.
pub struct Texture {
    /// (width, height, RGB bytes), each half the size of the one before.
    mips: Vec<(usize, usize, Vec<u8>)>,
}

impl Texture {
    /// The bundled texture of `kind`, decoded once.
    pub fn get(kind: TextureKind) -> &'static Texture {
        static EPI: OnceLock<Texture> = OnceLock::new();
        static STROMA: OnceLock<Texture> = OnceLock::new();
        match kind {
            TextureKind::Epithelium => EPI
                .get_or_init(|| Texture::from_jpeg(include_bytes!("../assets/he_epithelium.jpg"))),
            // Artifacts have no texture of their own; stroma stands in should one be asked for.
            _ => {
                STROMA.get_or_init(|| Texture::from_jpeg(include_bytes!("../assets/he_stroma.jpg")))
            }
        }
    }

    fn from_jpeg(bytes: &[u8]) -> Texture {
        // The bytes are compiled in and decoded in this crate's tests: a failure is a build defect.
        let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Jpeg)
            .expect("bundled texture is a valid JPEG")
            .to_rgb8();
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut mips = vec![(w, h, img.into_raw())];
        while mips.last().is_some_and(|m| m.0 >= 32 && m.1 >= 32) {
            let (pw, ph, prev) = mips.last().unwrap();
            let (w, h) = (pw / 2, ph / 2);
            let mut next = vec![0u8; w * h * 3];
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let at = |dx: usize, dy: usize| {
                            prev[((2 * y + dy) * pw + 2 * x + dx) * 3 + c] as u32
                        };
                        next[(y * w + x) * 3 + c] =
                            ((at(0, 0) + at(1, 0) + at(0, 1) + at(1, 1) + 2) / 4) as u8;
                    }
                }
            }
            mips.push((w, h, next));
        }
        Texture { mips }
    }

    /// Colour at texel (`u`, `v`) of the full-size texture when one output pixel spans
    /// `texels_per_px` texels (picks the mip level so that minified texture does not alias).
    pub fn sample(&self, u: f64, v: f64, texels_per_px: f64) -> [u8; 3] {
        let level = if texels_per_px > 1.0 {
            (texels_per_px.log2().floor() as usize).min(self.mips.len() - 1)
        } else {
            0
        };
        let scale = (1u64 << level) as f64;
        let (w, h, px) = &self.mips[level];
        let x = mirror((u / scale).floor() as i64, *w);
        let y = mirror((v / scale).floor() as i64, *h);
        let i = (y * w + x) * 3;
        [px[i], px[i + 1], px[i + 2]]
    }
}

impl Texture {
    /// Like [`Texture::sample`] but `extra_levels` mip levels coarser and bilinear: the texture
    /// as an out-of-focus lens shows it (smooth, no block edges).
    pub fn sample_blurred(
        &self,
        u: f64,
        v: f64,
        texels_per_px: f64,
        extra_levels: usize,
    ) -> [u8; 3] {
        let base = if texels_per_px > 1.0 {
            texels_per_px.log2().floor() as usize
        } else {
            0
        };
        let level = (base + extra_levels).min(self.mips.len() - 1);
        let scale = (1u64 << level) as f64;
        let (w, h, px) = &self.mips[level];
        let (fu, fv) = (u / scale - 0.5, v / scale - 0.5);
        let (x0, y0) = (fu.floor(), fv.floor());
        let (ax, ay) = (fu - x0, fv - y0);
        let at = |dx: i64, dy: i64| {
            let x = mirror(x0 as i64 + dx, *w);
            let y = mirror(y0 as i64 + dy, *h);
            let i = (y * w + x) * 3;
            [px[i] as f64, px[i + 1] as f64, px[i + 2] as f64]
        };
        let (p00, p10, p01, p11) = (at(0, 0), at(1, 0), at(0, 1), at(1, 1));
        let mut out = [0u8; 3];
        for c in 0..3 {
            let top = p00[c] * (1.0 - ax) + p10[c] * ax;
            let bottom = p01[c] * (1.0 - ax) + p11[c] * ax;
            out[c] = (top * (1.0 - ay) + bottom * ay).round().clamp(0.0, 255.0) as u8;
        }
        out
    }
}

/// Mirrored repeat: 0,1,..,n-1,n-1,..,0,0,1,...
fn mirror(c: i64, n: usize) -> usize {
    let n = n as i64;
    let m = c.rem_euclid(2 * n);
    (if m >= n { 2 * n - 1 - m } else { m }) as usize
}

/// A shape in microns, level-0 origin at the top-left of the slide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Shape {
    /// An axis-aligned ellipse.
    Ellipse {
        /// Centre x, microns.
        cx: f64,
        /// Centre y, microns.
        cy: f64,
        /// Half-width, microns.
        rx: f64,
        /// Half-height, microns.
        ry: f64,
    },
    /// An axis-aligned rectangle.
    Rect {
        /// Left edge, microns.
        x: f64,
        /// Top edge, microns.
        y: f64,
        /// Width, microns.
        w: f64,
        /// Height, microns.
        h: f64,
    },
    /// An ellipse rotated by `angle` radians (papillary fronds, septa).
    Rotated {
        /// Centre x, microns.
        cx: f64,
        /// Centre y, microns.
        cy: f64,
        /// Semi-axis along the rotated x axis, microns.
        rx: f64,
        /// Semi-axis along the rotated y axis, microns.
        ry: f64,
        /// Rotation in radians, clockwise on screen (y points down).
        angle: f64,
    },
}

impl Shape {
    /// Bounding box (x0, y0, x1, y1) in microns.
    pub fn bbox(&self) -> (f64, f64, f64, f64) {
        match *self {
            Shape::Ellipse { cx, cy, rx, ry } => (cx - rx, cy - ry, cx + rx, cy + ry),
            Shape::Rect { x, y, w, h } => (x, y, x + w, y + h),
            Shape::Rotated { cx, cy, rx, ry, .. } => {
                let r = rx.max(ry);
                (cx - r, cy - r, cx + r, cy + r)
            }
        }
    }

    /// Whether the point (`x`, `y`), in microns, is inside the shape.
    pub fn contains(&self, x: f64, y: f64) -> bool {
        match *self {
            Shape::Ellipse { cx, cy, rx, ry } => {
                let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
                dx * dx + dy * dy <= 1.0
            }
            Shape::Rect { x: rx, y: ry, w, h } => x >= rx && x < rx + w && y >= ry && y < ry + h,
            Shape::Rotated {
                cx,
                cy,
                rx,
                ry,
                angle,
            } => {
                let (s, c) = angle.sin_cos();
                let (dx, dy) = (x - cx, y - cy);
                let (u, v) = ((c * dx + s * dy) / rx, (-s * dx + c * dy) / ry);
                u * u + v * v <= 1.0
            }
        }
    }
}

/// A piece of tissue: a shape filled with a texture, optionally restained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TissueRegion {
    /// Where the region is.
    pub shape: Shape,
    /// What fills it.
    pub texture: TextureKind,
    /// Per-channel optical-density gains (R, G, B): `I' = 255 (I/255)^g`. 1.0 keeps the colour;
    /// above 1 darkens that channel as a stronger stain would.
    #[serde(default = "unit_gain")]
    pub od_gain: [f32; 3],
}

fn unit_gain() -> [f32; 3] {
    [1.0; 3]
}

/// What a synthetic slide shows, in microns. Later regions paint over earlier ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// The regions, painted in order.
    pub regions: Vec<TissueRegion>,
    /// Glass colour; a little deterministic noise is added so that it looks scanned.
    pub background: [u8; 3],
}

impl Scene {
    /// A few blobs of epithelium and stroma spread over a `width_um` x `height_um` slide,
    /// covering roughly a third of it.
    pub fn blobs(width_um: f64, height_um: f64) -> Scene {
        let (w, h) = (width_um, height_um);
        let region = |shape, texture| TissueRegion {
            shape,
            texture,
            od_gain: unit_gain(),
        };
        Scene {
            background: [242, 241, 244],
            regions: vec![
                region(
                    Shape::Ellipse {
                        cx: 0.32 * w,
                        cy: 0.38 * h,
                        rx: 0.22 * w,
                        ry: 0.26 * h,
                    },
                    TextureKind::Stroma,
                ),
                region(
                    Shape::Ellipse {
                        cx: 0.30 * w,
                        cy: 0.40 * h,
                        rx: 0.10 * w,
                        ry: 0.12 * h,
                    },
                    TextureKind::Epithelium,
                ),
                region(
                    Shape::Rect {
                        x: 0.62 * w,
                        y: 0.55 * h,
                        w: 0.25 * w,
                        h: 0.30 * h,
                    },
                    TextureKind::Epithelium,
                ),
                region(
                    Shape::Ellipse {
                        cx: 0.75 * w,
                        cy: 0.22 * h,
                        rx: 0.08 * w,
                        ry: 0.08 * h,
                    },
                    TextureKind::Stroma,
                ),
            ],
        }
    }

    /// The region painted at (`x`, `y`) microns, if any.
    pub fn region_at(&self, x: f64, y: f64) -> Option<&TissueRegion> {
        self.regions.iter().rev().find(|r| r.shape.contains(x, y))
    }

    /// The tissue region at (`x`, `y`) when nothing but focus troubles it: `(region, in focus)`;
    /// `None` on glass, under ink or under debris.
    pub fn clean_tissue_at(&self, x: f64, y: f64) -> Option<(&TissueRegion, bool)> {
        let mut in_focus = true;
        for r in self.regions.iter().rev().filter(|r| r.shape.contains(x, y)) {
            match r.texture {
                TextureKind::OutOfFocus => in_focus = false,
                k if k.is_tissue() => return Some((r, in_focus)),
                _ => return None,
            }
        }
        None
    }

    /// Fraction of the square [`x`, `x`+`size`) x [`y`, `y`+`size`) microns that is tissue not
    /// covered by ink or debris (out of focus or not), on an `n` x `n` lattice.
    pub fn clean_tissue_coverage(&self, x: f64, y: f64, size: f64, n: usize) -> f64 {
        let step = size / n as f64;
        let mut inside = 0usize;
        for j in 0..n {
            for i in 0..n {
                let (px, py) = (x + (i as f64 + 0.5) * step, y + (j as f64 + 0.5) * step);
                inside += self.clean_tissue_at(px, py).is_some() as usize;
            }
        }
        inside as f64 / (n * n) as f64
    }

    /// [`Scene::blobs`] with the artifacts a slide meets: a wide blue pen stroke across the large
    /// stroma piece and onto glass, a green ink dot on the epithelial block, a black pen line,
    /// a 3 x 3 tile out-of-focus patch of stroma (on the 128 um grid of 0.5 um/px tiles, so that
    /// which tiles are out of focus is exact) and a few flecks of dark debris.
    pub fn blobs_with_artifacts(width_um: f64, height_um: f64) -> Scene {
        const TILE_UM: f64 = 128.0;
        let on_tile_grid = |v: f64| (v / TILE_UM).round() * TILE_UM;
        let (w, h) = (width_um, height_um);
        let mut scene = Scene::blobs(w, h);
        let region = |shape, texture| TissueRegion {
            shape,
            texture,
            od_gain: unit_gain(),
        };
        scene.regions.extend([
            region(
                Shape::Rect {
                    x: on_tile_grid(0.22 * w),
                    y: on_tile_grid(0.32 * h),
                    w: 3.0 * TILE_UM,
                    h: 3.0 * TILE_UM,
                },
                TextureKind::OutOfFocus,
            ),
            region(
                Shape::Rotated {
                    cx: 0.38 * w,
                    cy: 0.28 * h,
                    rx: 0.30 * w,
                    ry: 0.045 * h,
                    angle: 0.35,
                },
                TextureKind::BlueInk,
            ),
            region(
                Shape::Ellipse {
                    cx: 0.72 * w,
                    cy: 0.68 * h,
                    rx: 0.06 * w,
                    ry: 0.07 * h,
                },
                TextureKind::GreenInk,
            ),
            region(
                Shape::Rect {
                    x: 0.55 * w,
                    y: 0.90 * h,
                    w: 0.40 * w,
                    h: 0.05 * h,
                },
                TextureKind::BlackInk,
            ),
        ]);
        for (fx, fy) in [(0.52, 0.12), (0.12, 0.85), (0.45, 0.70), (0.80, 0.40)] {
            scene.regions.push(region(
                Shape::Ellipse {
                    cx: fx * w,
                    cy: fy * h,
                    rx: 0.012 * w,
                    ry: 0.012 * w,
                },
                TextureKind::Debris,
            ));
        }
        scene
    }

    /// Fraction of the square [`x`, `x`+`size`) x [`y`, `y`+`size`) microns that is tissue,
    /// measured on an `n` x `n` lattice of sample points.
    pub fn coverage(&self, x: f64, y: f64, size: f64, n: usize) -> f64 {
        let step = size / n as f64;
        let mut inside = 0usize;
        for j in 0..n {
            for i in 0..n {
                let (px, py) = (x + (i as f64 + 0.5) * step, y + (j as f64 + 0.5) * step);
                inside += self.region_at(px, py).is_some() as usize;
            }
        }
        inside as f64 / (n * n) as f64
    }

    /// Renders `w` x `h` pixels whose top-left pixel starts at (`x0_um`, `y0_um`) and each span
    /// `um_per_px` microns, into packed RGB.
    pub fn render(&self, x0_um: f64, y0_um: f64, um_per_px: f64, w: u32, h: u32) -> Vec<u8> {
        let mut out = vec![0u8; w as usize * h as usize * 3];
        let texels_per_px = um_per_px / TEXTURE_MPP;
        // Only the regions whose bounding box meets this window are tested per pixel: scenes
        // of a cohort hold hundreds of small nests and papillae.
        let (x1_um, y1_um) = (x0_um + w as f64 * um_per_px, y0_um + h as f64 * um_per_px);
        // Out-of-focus pixels look a blur radius around them.
        let m = BLUR_RADIUS_UM;
        let active: Vec<&TissueRegion> = self
            .regions
            .iter()
            .filter(|r| {
                let (a, b, c, d) = r.shape.bbox();
                a < x1_um + m && c > x0_um - m && b < y1_um + m && d > y0_um - m
            })
            .collect();
        let luts: Vec<[[u8; 256]; 3]> = active.iter().map(|r| od_lut(r.od_gain)).collect();
        let layers = Layers {
            active: &active,
            luts: &luts,
            background: self.background,
            texels_per_px,
        };
        for j in 0..h {
            let y = y0_um + (j as f64 + 0.5) * um_per_px;
            for i in 0..w {
                let x = x0_um + (i as f64 + 0.5) * um_per_px;
                let o = (j as usize * w as usize + i as usize) * 3;
                let c = layers.shade(active.len(), x, y, false);
                let rgb = c.map(|v| v.round().clamp(0.0, 255.0) as u8);
                out[o..o + 3].copy_from_slice(&rgb);
            }
        }
        out
    }
}

/// The regions under a render window, for shading one point.
struct Layers<'a> {
    active: &'a [&'a TissueRegion],
    luts: &'a [[[u8; 256]; 3]],
    background: [u8; 3],
    texels_per_px: f64,
}

impl Layers<'_> {
    /// Colour at (`x`, `y`) microns of the regions `active[..below]`, from the top one down:
    /// inks multiply what is under them, debris is opaque, out of focus averages what is under
    /// it over a 3 x 3 lattice [`BLUR_RADIUS_UM`] apart (textures from a coarser mip, so edges
    /// and texture both blur), tissue or glass ends it.
    fn shade(&self, below: usize, x: f64, y: f64, blurred: bool) -> [f32; 3] {
        let Some(k) = self.active[..below]
            .iter()
            .rposition(|r| r.shape.contains(x, y))
        else {
            let n = glass_noise(x, y);
            return self.background.map(|c| (c as i32 + n).clamp(0, 255) as f32);
        };
        let r = self.active[k];
        if let Some(ink) = r.texture.ink() {
            let c = self.shade(k, x, y, blurred);
            return [c[0] * ink[0], c[1] * ink[1], c[2] * ink[2]];
        }
        match r.texture {
            TextureKind::Debris => DEBRIS_RGB.map(|c| c as f32),
            TextureKind::OutOfFocus if !blurred => {
                let mut acc = [0f32; 3];
                for dy in [-1.0, 0.0, 1.0] {
                    for dx in [-1.0, 0.0, 1.0] {
                        let c =
                            self.shade(k, x + dx * BLUR_RADIUS_UM, y + dy * BLUR_RADIUS_UM, true);
                        (0..3).for_each(|i| acc[i] += c[i] / 9.0);
                    }
                }
                acc
            }
            TextureKind::OutOfFocus => self.shade(k, x, y, true),
            _ => {
                let tex = Texture::get(r.texture);
                let (u, v) = (x / TEXTURE_MPP, y / TEXTURE_MPP);
                let t = if blurred {
                    tex.sample_blurred(u, v, self.texels_per_px, BLUR_MIP_LEVELS)
                } else {
                    tex.sample(u, v, self.texels_per_px)
                };
                [0, 1, 2].map(|c| self.luts[k][c][t[c] as usize] as f32)
            }
        }
    }
}

fn od_lut(gain: [f32; 3]) -> [[u8; 256]; 3] {
    let mut lut = [[0u8; 256]; 3];
    for (c, g) in gain.iter().enumerate() {
        for (v, slot) in lut[c].iter_mut().enumerate() {
            let i = (v.max(1) as f32 / 255.0).powf(*g);
            *slot = (i * 255.0).round().clamp(0.0, 255.0) as u8;
        }
    }
    lut
}

/// -2..=2 grey levels of noise, a fixed function of the position (micron grid).
fn glass_noise(x: f64, y: f64) -> i32 {
    let h = (x.to_bits() ^ y.to_bits().rotate_left(29)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((h >> 59) % 5) as i32 - 2
}

/// How a synthetic slide records its resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Metadata {
    /// Aperio ImageDescription with `AppMag` and `MPP`: OpenSlide reports vendor `aperio`,
    /// objective power and mpp.
    Aperio {
        /// The `AppMag` objective power written (20, 40).
        app_mag: u32,
    },
    /// A generic TIFF with `XResolution`/`YResolution` in pixels per centimetre: OpenSlide 3.4
    /// reports vendor `generic-tiff` and no mpp.
    TiffResolution,
    /// A generic TIFF with no resolution at all: the user must give `--mpp`.
    None,
    /// An OME-TIFF: OME-XML ImageDescription with `PhysicalSizeX/Y` and no resolution tags.
    /// `sub_ifds`: the reduced levels hang off level 0 as SubIFDs (the OME 6 layout; OpenSlide
    /// 3.4 sees level 0 only); otherwise they follow it in the main IFD chain (a flat pyramid,
    /// which OpenSlide 3.4 reads as levels).
    Ome {
        /// Reduced levels as SubIFDs of level 0 (see above).
        sub_ifds: bool,
    },
}

/// The pyramid and encoding of a synthetic slide.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlideSpec {
    /// Level-0 width in pixels.
    pub width: u64,
    /// Level-0 height in pixels.
    pub height: u64,
    /// Level-0 microns per pixel.
    pub mpp: f64,
    /// Downsample of each pyramid level; the first must be 1.
    pub downsamples: Vec<u32>,
    /// How the resolution is recorded.
    pub metadata: Metadata,
    /// JPEG quality of the tiles, 1-100.
    pub jpeg_quality: u8,
}

impl SlideSpec {
    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(WsiError::format(path, msg));
        if self.width == 0
            || self.height == 0
            || self.width > u32::MAX as u64
            || self.height > u32::MAX as u64
        {
            return bad(format!(
                "invalid slide size {} x {}",
                self.width, self.height
            ));
        }
        if !(self.mpp.is_finite() && self.mpp > 0.0) {
            return bad(format!("invalid mpp {}", self.mpp));
        }
        if self.downsamples.first() != Some(&1) || self.downsamples.windows(2).any(|w| w[1] <= w[0])
        {
            return bad(format!(
                "pyramid downsamples must start at 1 and increase: {:?}",
                self.downsamples
            ));
        }
        if !(1..=100).contains(&self.jpeg_quality) {
            return bad(format!("JPEG quality {} not in 1..=100", self.jpeg_quality));
        }
        Ok(())
    }
}

/// Renders `scene` into a tiled pyramidal JPEG TIFF at `path`. The file appears under its final
/// name only when complete (written beside it, then renamed).
pub fn write_slide(path: &Path, spec: &SlideSpec, scene: &Scene) -> Result<()> {
    spec.validate(path)?;
    let tmp = path.with_file_name(format!(
        ".{}.partial-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("slide"),
        std::process::id()
    ));
    let result = (|| {
        let file = File::create(&tmp).map_err(|e| WsiError::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        // A conservative size estimate: BigTIFF once the file could pass 4 GiB.
        let level0_px = spec.width * spec.height;
        if level0_px * 3 / 4 > (u32::MAX as u64) {
            encode::<_, TiffKindBig>(&mut out, spec, scene, path)?;
        } else {
            encode::<_, TiffKindStandard>(&mut out, spec, scene, path)?;
        }
        let file = out
            .into_inner()
            .map_err(|e| WsiError::io(&tmp, e.error()))?;
        file.sync_all().map_err(|e| WsiError::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| WsiError::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn encode<W: Write + Seek, K: TiffKind>(
    out: &mut W,
    spec: &SlideSpec,
    scene: &Scene,
    path: &Path,
) -> Result<()> {
    let tiff_err = |e: tiff::TiffError| WsiError::format(path, format!("writing TIFF: {e}"));
    let mut tiff = TiffEncoder::<_, K>::new_generic(out).map_err(tiff_err)?;
    if let Metadata::Ome { sub_ifds: true } = spec.metadata {
        // The reduced levels first, outside the main IFD chain; level 0 then points at them.
        let mut subs = Vec::new();
        for index in 1..spec.downsamples.len() {
            let dir = tiff.extra_directory().map_err(tiff_err)?;
            let offset = write_level(dir, spec, scene, path, index, &[])?;
            subs.push(offset.offset);
        }
        let dir = tiff.image_directory().map_err(tiff_err)?;
        write_level(dir, spec, scene, path, 0, &subs)?;
        return Ok(());
    }
    for index in 0..spec.downsamples.len() {
        let dir = tiff.image_directory().map_err(tiff_err)?;
        write_level(dir, spec, scene, path, index, &[])?;
    }
    Ok(())
}

/// Renders pyramid level `index` into `dir` (tiles first, then the directory), with a SubIFDs
/// tag pointing at `sub_ifds` when there are any.
fn write_level<W: Write + Seek, K: TiffKind>(
    mut dir: tiff::encoder::DirectoryEncoder<'_, W, K>,
    spec: &SlideSpec,
    scene: &Scene,
    path: &Path,
    index: usize,
    sub_ifds: &[K::OffsetType],
) -> Result<tiff::encoder::DirectoryOffset<K>> {
    let tiff_err = |e: tiff::TiffError| WsiError::format(path, format!("writing TIFF: {e}"));
    let ds = spec.downsamples[index];
    let (w, h) = (
        spec.width.div_ceil(ds as u64) as u32,
        spec.height.div_ceil(ds as u64) as u32,
    );
    let um_per_px = spec.mpp * ds as f64;
    let (tiles_x, tiles_y) = (w.div_ceil(TIFF_TILE_PX), h.div_ceil(TIFF_TILE_PX));
    let mut offsets = Vec::with_capacity((tiles_x * tiles_y) as usize);
    let mut counts = Vec::with_capacity(offsets.capacity());
    for ty in 0..tiles_y {
        let row: Vec<Vec<u8>> = (0..tiles_x)
            .into_par_iter()
            .map(|tx| {
                let span = TIFF_TILE_PX as f64 * um_per_px;
                let rgb = scene.render(
                    tx as f64 * span,
                    ty as f64 * span,
                    um_per_px,
                    TIFF_TILE_PX,
                    TIFF_TILE_PX,
                );
                jpeg_tile(&rgb, spec.jpeg_quality)
            })
            .collect::<Result<_>>()?;
        for jpeg in &row {
            offsets.push(dir.write_data(jpeg.as_slice()).map_err(tiff_err)?);
            counts.push(jpeg.len() as u64);
        }
    }
    let to_k = |v: &[u64]| {
        v.iter()
            .map(|&o| K::convert_offset(o))
            .collect::<tiff::TiffResult<Vec<_>>>()
            .map_err(tiff_err)
    };
    let (offsets, counts) = (to_k(&offsets)?, to_k(&counts)?);
    dir.write_tag(Tag::NewSubfileType, if index == 0 { 0u32 } else { 1u32 })
        .map_err(tiff_err)?;
    dir.write_tag(Tag::ImageWidth, w).map_err(tiff_err)?;
    dir.write_tag(Tag::ImageLength, h).map_err(tiff_err)?;
    dir.write_tag(Tag::BitsPerSample, &[8u16, 8, 8][..])
        .map_err(tiff_err)?;
    dir.write_tag(Tag::Compression, 7u16).map_err(tiff_err)?; // new-style JPEG
    dir.write_tag(Tag::PhotometricInterpretation, 6u16)
        .map_err(tiff_err)?; // YCbCr
    match spec.metadata {
        Metadata::Aperio { app_mag } => {
            let desc = format!(
                "Aperio Image Library v12.0.0 (gigapath synthetic)\r\n{}x{} ({t}x{t}) JPEG/RGB Q={}|AppMag = {}|MPP = {}",
                spec.width, spec.height, spec.jpeg_quality, app_mag, spec.mpp, t = TIFF_TILE_PX
            );
            dir.write_tag(Tag::ImageDescription, desc.as_str())
                .map_err(tiff_err)?;
        }
        Metadata::Ome { .. } if index == 0 => {
            dir.write_tag(Tag::ImageDescription, ome_xml(spec).as_str())
                .map_err(tiff_err)?;
        }
        _ => {}
    }
    dir.write_tag(Tag::SamplesPerPixel, 3u16)
        .map_err(tiff_err)?;
    if spec.metadata == Metadata::TiffResolution {
        let px_per_cm = 10_000.0 / um_per_px;
        let r = Rational {
            n: (px_per_cm * 1000.0).round() as u32,
            d: 1000,
        };
        dir.write_tag(Tag::XResolution, r.clone())
            .map_err(tiff_err)?;
        dir.write_tag(Tag::YResolution, r).map_err(tiff_err)?;
        dir.write_tag(Tag::ResolutionUnit, 3u16).map_err(tiff_err)?; // centimetre
    }
    dir.write_tag(Tag::PlanarConfiguration, 1u16)
        .map_err(tiff_err)?;
    dir.write_tag(Tag::TileWidth, TIFF_TILE_PX)
        .map_err(tiff_err)?;
    dir.write_tag(Tag::TileLength, TIFF_TILE_PX)
        .map_err(tiff_err)?;
    dir.write_tag(Tag::TileOffsets, K::convert_slice(&offsets))
        .map_err(tiff_err)?;
    dir.write_tag(Tag::TileByteCounts, K::convert_slice(&counts))
        .map_err(tiff_err)?;
    dir.write_tag(Tag::Unknown(530), &[2u16, 2][..])
        .map_err(tiff_err)?; // YCbCrSubSampling
    if !sub_ifds.is_empty() {
        dir.write_tag(Tag::Unknown(330), K::convert_slice(sub_ifds))
            .map_err(tiff_err)?; // SubIFDs
    }
    dir.finish_with_offsets().map_err(tiff_err)
}

/// The OME-XML ImageDescription of an OME-TIFF: one RGB image, its physical pixel size in
/// micrometres (the schema's default unit, so no unit attribute), plane 0 in IFD 0.
fn ome_xml(spec: &SlideSpec) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" Creator="gigapath synthetic" xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd"><Image ID="Image:0" Name="synthetic"><Pixels BigEndian="false" DimensionOrder="XYCZT" ID="Pixels:0" Interleaved="true" PhysicalSizeX="{mpp}" PhysicalSizeY="{mpp}" SignificantBits="8" SizeC="3" SizeT="1" SizeX="{w}" SizeY="{h}" SizeZ="1" Type="uint8"><Channel ID="Channel:0:0" SamplesPerPixel="3"><LightPath/></Channel><TiffData FirstC="0" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1"/></Pixels></Image></OME>"#,
        mpp = spec.mpp,
        w = spec.width,
        h = spec.height
    )
}

/// Damages stored tiles of a slide written by [`write_slide`], in place, for tests of
/// unreadable tiles: the JPEG of each TIFF tile (`tx`, `ty`) (256 px tiles) of main-chain
/// directory `ifd` (level `ifd` of a flat pyramid) has its first bytes overwritten, so that no
/// decoder takes it for a JPEG any more. The file keeps its size and every other byte.
pub fn corrupt_tiles(path: &Path, ifd: usize, tiles: &[(u32, u32)]) -> Result<()> {
    let bad = |msg: String| WsiError::format(path, msg);
    let file = File::open(path).map_err(|e| WsiError::io(path, e))?;
    let mut dec = tiff::decoder::Decoder::new(std::io::BufReader::new(file))
        .map_err(|e| bad(format!("reading TIFF: {e}")))?;
    dec.seek_to_image(ifd)
        .map_err(|e| bad(format!("no directory {ifd}: {e}")))?;
    let (w, _) = dec
        .dimensions()
        .map_err(|e| bad(format!("reading TIFF: {e}")))?;
    let tiles_x = w.div_ceil(TIFF_TILE_PX);
    let offsets = dec
        .get_tag_u64_vec(Tag::TileOffsets)
        .map_err(|e| bad(format!("no tile offsets: {e}")))?;
    let counts = dec
        .get_tag_u64_vec(Tag::TileByteCounts)
        .map_err(|e| bad(format!("no tile byte counts: {e}")))?;
    drop(dec);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| WsiError::io(path, e))?;
    for &(tx, ty) in tiles {
        let i = (ty * tiles_x + tx) as usize;
        let (Some(&offset), Some(&count)) = (offsets.get(i), counts.get(i)) else {
            return Err(bad(format!("no tile ({tx}, {ty}) in directory {ifd}")));
        };
        let garbage: Vec<u8> = (0..count.min(64)).map(|k| 0xA5 ^ k as u8).collect();
        file.seek(std::io::SeekFrom::Start(offset))
            .and_then(|_| file.write_all(&garbage))
            .map_err(|e| WsiError::io(path, e))?;
    }
    file.sync_all().map_err(|e| WsiError::io(path, e))
}

fn jpeg_tile(rgb: &[u8], quality: u8) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(rgb.len() / 8);
    let mut enc = jpeg_encoder::Encoder::new(&mut bytes, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    enc.encode(
        rgb,
        TIFF_TILE_PX as u16,
        TIFF_TILE_PX as u16,
        jpeg_encoder::ColorType::Rgb,
    )
    .map_err(|e| WsiError::format("<jpeg tile>", format!("JPEG encoding failed: {e}")))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrored_repeat_has_no_seam() {
        let got: Vec<usize> = (-3..7).map(|c| mirror(c, 3)).collect();
        assert_eq!(got, vec![2, 1, 0, 0, 1, 2, 2, 1, 0, 0]);
    }

    #[test]
    fn textures_decode_and_differ_in_colour() {
        let mean = |k| {
            let t = Texture::get(k);
            let (w, h, px) = &t.mips[0];
            let mut s = [0f64; 3];
            for p in px.chunks_exact(3) {
                for c in 0..3 {
                    s[c] += p[c] as f64;
                }
            }
            s.map(|v| v / (w * h) as f64)
        };
        let (epi, stroma) = (mean(TextureKind::Epithelium), mean(TextureKind::Stroma));
        // Epithelium is bluer/darker than pink stroma: a lower red/blue ratio.
        assert!(
            epi[0] / epi[2] < stroma[0] / stroma[2],
            "{epi:?} {stroma:?}"
        );
        assert!(Texture::get(TextureKind::Epithelium).mips.len() >= 4);
    }

    #[test]
    fn coverage_of_a_rectangle_is_exact_on_its_lattice() {
        let scene = Scene {
            background: [240; 3],
            regions: vec![TissueRegion {
                shape: Shape::Rect {
                    x: 0.0,
                    y: 0.0,
                    w: 50.0,
                    h: 100.0,
                },
                texture: TextureKind::Stroma,
                od_gain: unit_gain(),
            }],
        };
        assert_eq!(scene.coverage(0.0, 0.0, 100.0, 10), 0.5);
        assert_eq!(scene.coverage(60.0, 0.0, 30.0, 10), 0.0);
    }

    #[test]
    fn stain_gain_darkens_a_channel() {
        let lut = od_lut([2.0, 1.0, 1.0]);
        assert!(lut[0][128] < 128 && lut[1][128] == 128);
    }
}
