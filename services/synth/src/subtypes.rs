//! What each synthetic subtype looks like under the microscope.
//!
//! Three renal-cell-carcinoma-like patterns built from the two real H&E crops, differing in
//! colour balance, cell density and architecture, as the real subtypes do:
//! - `CCRCC`: nests of pale ("clear") epithelium separated by a fine stroma network;
//! - `PRCC`: dark, crowded epithelium in elongated fronds (papillae) on pale oedematous stroma;
//! - `CHRCC`: solid eosinophilic (pink) sheets crossed by thin septa.
//!
//! Every slide draws its own fragments, positions and a colour jitter, so no two are alike and
//! colour alone does not identify a subtype perfectly.

use gigapath_wsi::slide_writer::{Scene, Shape, TextureKind, TissueRegion};
use serde::{Deserialize, Serialize};

use crate::rng::Rng;

/// A synthetic subtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Subtype {
    /// Clear-cell RCC-like: pale nests in a fine stroma network.
    #[serde(rename = "CCRCC")]
    Ccrcc,
    /// Papillary RCC-like: dark crowded fronds on pale stroma.
    #[serde(rename = "PRCC")]
    Prcc,
    /// Chromophobe RCC-like: solid pink sheets crossed by thin septa.
    #[serde(rename = "CHRCC")]
    Chrcc,
}

impl Subtype {
    /// Every subtype.
    pub const ALL: [Subtype; 3] = [Subtype::Ccrcc, Subtype::Prcc, Subtype::Chrcc];

    /// The label, as in `prompts/subtype-rcc.toml`.
    pub fn label(self) -> &'static str {
        match self {
            Subtype::Ccrcc => "CCRCC",
            Subtype::Prcc => "PRCC",
            Subtype::Chrcc => "CHRCC",
        }
    }

    /// The subtype of a label, ignoring case; `None` for any other label.
    pub fn from_label(label: &str) -> Option<Subtype> {
        Subtype::ALL
            .into_iter()
            .find(|s| s.label().eq_ignore_ascii_case(label))
    }
}

impl std::fmt::Display for Subtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

fn jitter(rng: &mut Rng, gain: [f32; 3], amount: f64) -> [f32; 3] {
    gain.map(|g| (g as f64 * rng.range(1.0 - amount, 1.0 + amount)) as f32)
}

fn region(shape: Shape, texture: TextureKind, od_gain: [f32; 3]) -> TissueRegion {
    TissueRegion {
        shape,
        texture,
        od_gain,
    }
}

/// The scene of one slide of `subtype`, `w_um` x `h_um` microns.
pub fn scene(subtype: Subtype, rng: &mut Rng, w_um: f64, h_um: f64) -> Scene {
    scene_with(subtype, rng, w_um, h_um, 0.0)
}

/// The stain balance every subtype's gains move towards as `closeness` goes to 1.
const COMMON_GAIN: [f32; 3] = [0.8, 1.0, 0.85];

/// [`scene`] with subtypes `closeness` (0-1) alike: each stain gain is moved that far towards
/// a common stain balance (`COMMON_GAIN`) and the slide-wide jitter grows from 8% to 20%. The
/// same random draws in the same order, so `closeness` 0 is exactly [`scene`].
pub fn scene_with(subtype: Subtype, rng: &mut Rng, w_um: f64, h_um: f64, closeness: f64) -> Scene {
    let c = closeness.clamp(0.0, 1.0) as f32;
    // One slide-wide stain jitter (scanner and staining batch), applied to every gain.
    let batch = jitter(rng, [1.0; 3], 0.08 + 0.12 * c as f64);
    let stain = |g: [f32; 3]| {
        let m = |i: usize| g[i] * (1.0 - c) + COMMON_GAIN[i] * c;
        [m(0) * batch[0], m(1) * batch[1], m(2) * batch[2]]
    };
    let mut regions = Vec::new();
    let fragments = 1 + rng.below(2);
    for _ in 0..fragments {
        let (rx, ry) = (rng.range(0.22, 0.36) * w_um, rng.range(0.22, 0.36) * h_um);
        let (cx, cy) = (
            rng.range(rx + 10.0, w_um - rx - 10.0),
            rng.range(ry + 10.0, h_um - ry - 10.0),
        );
        let outline = Shape::Ellipse { cx, cy, rx, ry };
        let inside = |x: f64, y: f64| outline.contains(x, y);
        match subtype {
            Subtype::Ccrcc => {
                regions.push(region(
                    outline.clone(),
                    TextureKind::Stroma,
                    stain([0.8, 0.85, 0.8]),
                ));
                // Nests on a jittered lattice, pale epithelium ("clear cytoplasm").
                let step = rng.range(60.0, 75.0);
                let mut y = cy - ry;
                while y < cy + ry {
                    let mut x = cx - rx;
                    while x < cx + rx {
                        let (nx, ny) = (x + rng.range(-8.0, 8.0), y + rng.range(-8.0, 8.0));
                        if inside(nx, ny) {
                            let shape = Shape::Ellipse {
                                cx: nx,
                                cy: ny,
                                rx: rng.range(20.0, 30.0),
                                ry: rng.range(20.0, 30.0),
                            };
                            regions.push(region(
                                shape,
                                TextureKind::Epithelium,
                                stain([0.3, 0.33, 0.38]),
                            ));
                        }
                        x += step;
                    }
                    y += step;
                }
            }
            Subtype::Prcc => {
                regions.push(region(
                    outline.clone(),
                    TextureKind::Stroma,
                    stain([0.55, 0.6, 0.55]),
                ));
                // Fronds: long thin ellipses of crowded dark epithelium, at random angles.
                let n = ((rx * ry) / 2500.0) as usize;
                for _ in 0..n {
                    let (fx, fy) = (cx + rng.range(-rx, rx), cy + rng.range(-ry, ry));
                    if !inside(fx, fy) {
                        continue;
                    }
                    let shape = Shape::Rotated {
                        cx: fx,
                        cy: fy,
                        rx: rng.range(45.0, 90.0),
                        ry: rng.range(9.0, 15.0),
                        angle: rng.range(0.0, std::f64::consts::PI),
                    };
                    regions.push(region(
                        shape,
                        TextureKind::Epithelium,
                        stain([1.3, 1.3, 1.08]),
                    ));
                }
            }
            Subtype::Chrcc => {
                // Solid eosinophilic sheets: more green absorbed reads as pinker.
                regions.push(region(
                    outline.clone(),
                    TextureKind::Epithelium,
                    stain([0.8, 1.45, 1.0]),
                ));
                for _ in 0..3 + rng.below(3) {
                    let (sx, sy) = (
                        cx + rng.range(-0.6, 0.6) * rx,
                        cy + rng.range(-0.6, 0.6) * ry,
                    );
                    let shape = Shape::Rotated {
                        cx: sx,
                        cy: sy,
                        rx: rng.range(0.4, 0.8) * rx,
                        ry: rng.range(4.0, 7.0),
                        angle: rng.range(0.0, std::f64::consts::PI),
                    };
                    regions.push(region(shape, TextureKind::Stroma, stain([1.0, 1.0, 1.0])));
                }
            }
        }
    }
    // Nests, fronds and septa may poke out of their fragment; drop any that would leave the slide.
    regions.retain(|r| {
        let (a, b, c, d) = r.shape.bbox();
        a >= 0.0 && b >= 0.0 && c <= w_um && d <= h_um
    });
    Scene {
        regions,
        background: [242, 241, 244],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mean RGB of a rendered scene's tissue pixels.
    fn tissue_mean(s: Subtype, seed: u64) -> [f64; 3] {
        tissue_mean_at(s, seed, 0.0)
    }

    fn tissue_mean_at(s: Subtype, seed: u64, closeness: f64) -> [f64; 3] {
        let mut rng = Rng::new(seed);
        let scene = scene_with(s, &mut rng, 800.0, 800.0, closeness);
        let px = scene.render(0.0, 0.0, 4.0, 200, 200);
        let mut acc = [0f64; 3];
        let mut n = 0.0;
        for p in px.chunks_exact(3) {
            if p.iter().map(|&v| v as u32).sum::<u32>() < 3 * 225 {
                for c in 0..3 {
                    acc[c] += p[c] as f64;
                }
                n += 1.0;
            }
        }
        acc.map(|v| v / n)
    }

    #[test]
    fn subtypes_differ_in_colour_as_designed() {
        let cc = tissue_mean(Subtype::Ccrcc, 1);
        let p = tissue_mean(Subtype::Prcc, 1);
        let ch = tissue_mean(Subtype::Chrcc, 1);
        let lum = |c: [f64; 3]| c.iter().sum::<f64>() / 3.0;
        // Clear cell is the palest, chromophobe the pinkest (red well above green).
        assert!(lum(cc) > lum(p) && lum(cc) > lum(ch), "{cc:?} {p:?} {ch:?}");
        assert!(ch[0] - ch[1] > cc[0] - cc[1], "{cc:?} {ch:?}");
        assert_eq!(Subtype::from_label("prcc"), Some(Subtype::Prcc));
    }

    #[test]
    fn closeness_draws_the_subtypes_colours_together() {
        // 0 is the designed scene, draw for draw.
        let a = scene(Subtype::Prcc, &mut Rng::new(3), 800.0, 800.0);
        let b = scene_with(Subtype::Prcc, &mut Rng::new(3), 800.0, 800.0, 0.0);
        assert_eq!(
            a.render(0.0, 0.0, 4.0, 100, 100),
            b.render(0.0, 0.0, 4.0, 100, 100)
        );
        let gap = |c: f64| {
            let (x, y) = (
                tissue_mean_at(Subtype::Ccrcc, 1, c),
                tissue_mean_at(Subtype::Chrcc, 1, c),
            );
            (0..3).map(|i| (x[i] - y[i]).powi(2)).sum::<f64>().sqrt()
        };
        let (apart, close) = (gap(0.0), gap(0.9));
        assert!(close < 0.5 * apart, "colour gap {apart:.1} -> {close:.1}");
    }
}
