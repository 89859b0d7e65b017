//! Finding a slide's level-0 resolution in microns per pixel, and saying where it came from.
//!
//! Order: OpenSlide's `openslide.mpp-x/y` (vendor metadata such as Aperio's `MPP`), then an
//! OME-XML ImageDescription's `PhysicalSizeX/Y` (OpenSlide 3.4 opens an OME-TIFF as a generic TIFF
//! and reports the XML only as `tiff.ImageDescription`), then the TIFF
//! `XResolution`/`YResolution`/`ResolutionUnit` tags (OpenSlide 3.4 does not turn these into mpp
//! for generic TIFF), then the user's `--mpp`. A value outside (0, 50] um/px from a file is not a
//! microscope resolution (72 dpi defaults give 353 um/px) and is ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Result, WsiError};

/// Largest level-0 mpp believed when read from a file; scanners are well under 10 um/px.
const MAX_FILE_MPP: f64 = 50.0;
/// Largest mpp a user may give.
const MAX_USER_MPP: f64 = 100.0;

/// Where a slide's mpp was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MppSource {
    /// `openslide.mpp-x` / `openslide.mpp-y` properties (vendor metadata).
    Openslide,
    /// `PhysicalSizeX` / `PhysicalSizeY` of the first `Pixels` element of an OME-XML
    /// ImageDescription (OME-TIFF).
    OmeXml,
    /// TIFF resolution tags (`tiff.XResolution`, `tiff.ResolutionUnit`).
    TiffResolution,
    /// The user's `--mpp`.
    User,
}

impl std::fmt::Display for MppSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MppSource::Openslide => "openslide properties (openslide.mpp-x/y)",
            MppSource::OmeXml => "OME-XML PhysicalSizeX/Y",
            MppSource::TiffResolution => "TIFF resolution tags",
            MppSource::User => "--mpp given by the user",
        })
    }
}

/// Level-0 microns per pixel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Mpp {
    /// Micrometres per pixel across.
    pub x: f64,
    /// Micrometres per pixel down.
    pub y: f64,
    /// Where the values came from.
    pub source: MppSource,
}

impl Mpp {
    /// The one number used for tiling: the mean of x and y (scanners have square pixels; a
    /// mismatch over 1% is logged).
    pub fn mean(&self) -> f64 {
        (self.x + self.y) / 2.0
    }
}

/// Checks a user-given mpp.
pub fn validate(mpp: f64) -> Result<f64> {
    if mpp.is_finite() && mpp > 0.0 && mpp <= MAX_USER_MPP {
        Ok(mpp)
    } else {
        Err(WsiError::InvalidMpp(mpp))
    }
}

/// Finds the mpp from the slide's properties (`prop` looks one up by name), else `user`.
pub fn discover(
    path: &Path,
    prop: &dyn Fn(&str) -> Option<String>,
    user: Option<f64>,
) -> Option<Mpp> {
    let num = |name: &str| {
        prop(name)
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let plausible = |v: f64| v > 0.0 && v <= MAX_FILE_MPP;

    let found = match (num("openslide.mpp-x"), num("openslide.mpp-y")) {
        (Some(x), Some(y)) if plausible(x) && plausible(y) => Some(Mpp {
            x,
            y,
            source: MppSource::Openslide,
        }),
        (Some(x), None) | (None, Some(x)) if plausible(x) => Some(Mpp {
            x,
            y: x,
            source: MppSource::Openslide,
        }),
        _ => None,
    }
    .or_else(|| {
        let desc = prop("tiff.ImageDescription")?;
        let (x, y) = ome_pixel_size_um(&desc)?;
        if !(plausible(x) && plausible(y)) {
            tracing::debug!(
                "{}: OME-XML gives {x} x {y} um/px, not a microscope resolution; ignored",
                path.display()
            );
            return None;
        }
        Some(Mpp {
            x,
            y,
            source: MppSource::OmeXml,
        })
    })
    .or_else(|| {
        let um_per_unit = match prop("tiff.ResolutionUnit")?.trim() {
            "centimeter" | "3" => 10_000.0,
            "inch" | "2" => 25_400.0,
            _ => return None,
        };
        let x = um_per_unit / num("tiff.XResolution")?;
        let y = num("tiff.YResolution").map_or(x, |r| um_per_unit / r);
        if !(plausible(x) && plausible(y)) {
            tracing::debug!(
                "{}: TIFF resolution tags give {x:.1} um/px, not a microscope resolution; ignored",
                path.display()
            );
            return None;
        }
        Some(Mpp {
            x,
            y,
            source: MppSource::TiffResolution,
        })
    })
    .or_else(|| {
        user.map(|v| Mpp {
            x: v,
            y: v,
            source: MppSource::User,
        })
    });
    if let Some(m) = &found {
        if (m.x - m.y).abs() > 0.01 * m.x {
            tracing::warn!(
                "{}: non-square pixels (mpp x {} vs y {}); tiling uses their mean",
                path.display(),
                m.x,
                m.y
            );
        }
    }
    found
}

/// The pixel size in microns (x, y) of the first `Pixels` element of an OME-XML document, from
/// its `PhysicalSizeX` / `PhysicalSizeY` and their units (`PhysicalSizeXUnit`, micrometres when
/// absent, as the OME schema says). `None` when the text is not OME-XML or gives no x size; a
/// missing y size is taken equal to x.
pub fn ome_pixel_size_um(xml: &str) -> Option<(f64, f64)> {
    if !xml.contains("<OME") && !xml.contains(":OME") {
        return None;
    }
    let pixels = first_element(xml, "Pixels")?;
    let size = |axis: &str| -> Option<f64> {
        let v: f64 = attribute(pixels, &format!("PhysicalSize{axis}"))?
            .trim()
            .parse()
            .ok()?;
        let unit = attribute(pixels, &format!("PhysicalSize{axis}Unit")).unwrap_or("µm");
        let um = v * um_per_ome_unit(unit.trim())?;
        (um.is_finite() && um > 0.0).then_some(um)
    };
    let x = size("X")?;
    Some((x, size("Y").unwrap_or(x)))
}

/// Microns per unit of the OME `UnitsLength` values a pixel size is given in.
fn um_per_ome_unit(unit: &str) -> Option<f64> {
    Some(match unit {
        "µm" | "μm" | "um" | "micron" | "microns" => 1.0,
        "nm" => 1e-3,
        "Å" | "A" => 1e-4,
        "mm" => 1e3,
        "cm" => 1e4,
        "m" => 1e6,
        "pm" => 1e-6,
        _ => return None,
    })
}

/// The text of the start tag (`<Pixels ...>`, any namespace prefix) of the first `name` element.
fn first_element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = xml[from..].find(name) {
        let at = from + i;
        let before = xml[..at].chars().next_back();
        let after = xml[at + name.len()..].chars().next();
        if matches!(before, Some('<') | Some(':'))
            && after.is_some_and(|c| c.is_whitespace() || c == '>' || c == '/')
        {
            let end = xml[at..].find('>')?;
            return Some(&xml[at + name.len()..at + end]);
        }
        from = at + name.len();
    }
    None
}

/// The value of attribute `name` in a start tag's text (`name="v"` or `name='v'`).
fn attribute<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(i) = tag[from..].find(name) {
        let at = from + i;
        let preceded_by_space = tag[..at]
            .chars()
            .next_back()
            .is_some_and(char::is_whitespace);
        let rest = tag[at + name.len()..].trim_start();
        if preceded_by_space {
            if let Some(rest) = rest.strip_prefix('=') {
                let rest = rest.trim_start();
                let quote = rest.chars().next().filter(|&c| c == '"' || c == '\'')?;
                let value = &rest[1..];
                return value.find(quote).map(|end| &value[..end]);
            }
        }
        from = at + name.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn openslide_property_wins() {
        let p = lookup(&[
            ("openslide.mpp-x", "0.499"),
            ("openslide.mpp-y", "0.4991"),
            ("tiff.ResolutionUnit", "centimeter"),
            ("tiff.XResolution", "40000"),
        ]);
        let m = discover(Path::new("s"), &p, Some(0.25)).unwrap();
        assert_eq!((m.x, m.y, m.source), (0.499, 0.4991, MppSource::Openslide));
    }

    #[test]
    fn tiff_tags_in_centimetres_and_inches() {
        let p = lookup(&[
            ("tiff.ResolutionUnit", "centimeter"),
            ("tiff.XResolution", "40000"),
            ("tiff.YResolution", "40000"),
        ]);
        let m = discover(Path::new("s"), &p, None).unwrap();
        assert_eq!(m.source, MppSource::TiffResolution);
        assert!((m.x - 0.25).abs() < 1e-12);
        let p = lookup(&[
            ("tiff.ResolutionUnit", "inch"),
            ("tiff.XResolution", "50800"),
        ]);
        assert!((discover(Path::new("s"), &p, None).unwrap().y - 0.5).abs() < 1e-12);
    }

    #[test]
    fn screen_resolution_tags_are_not_mpp_and_user_value_is_the_fallback() {
        // 28.34 px/cm is the 72 dpi default that image editors write.
        let p = lookup(&[
            ("tiff.ResolutionUnit", "centimeter"),
            ("tiff.XResolution", "28.34"),
        ]);
        assert_eq!(discover(Path::new("s"), &p, None), None);
        let m = discover(Path::new("s"), &p, Some(0.5)).unwrap();
        assert_eq!((m.x, m.source), (0.5, MppSource::User));
    }

    #[test]
    fn ome_xml_pixel_size_with_units_and_before_resolution_tags() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" PhysicalSizeX="0.2527" PhysicalSizeXUnit="µm" PhysicalSizeY = '252.8' PhysicalSizeYUnit="nm" SizeX="100" SizeY="80" Type="uint8"><TiffData/></Pixels></Image><Image ID="Image:1"><Pixels PhysicalSizeX="9.0"/></Image></OME>"#;
        let (x, y) = ome_pixel_size_um(xml).unwrap();
        assert!(
            (x - 0.2527).abs() < 1e-12 && (y - 0.2528).abs() < 1e-12,
            "{x} {y}"
        );
        let p = lookup(&[
            ("tiff.ImageDescription", xml),
            ("tiff.ResolutionUnit", "centimeter"),
            ("tiff.XResolution", "20000"),
        ]);
        let m = discover(Path::new("s"), &p, None).unwrap();
        assert_eq!(m.source, MppSource::OmeXml);
        assert!((m.x - 0.2527).abs() < 1e-12);
        // Unit absent: micrometres; namespace prefix on the elements.
        let xml = r#"<ome:OME xmlns:ome="x"><ome:Image><ome:Pixels PhysicalSizeX="0.5" SizeX="1"/></ome:Image></ome:OME>"#;
        assert_eq!(ome_pixel_size_um(xml), Some((0.5, 0.5)));
        // Not OME, no size, an unknown unit: nothing.
        assert_eq!(ome_pixel_size_um("Aperio Image Library|MPP = 0.5"), None);
        assert_eq!(ome_pixel_size_um(r#"<OME><Pixels SizeX="5"/></OME>"#), None);
        assert_eq!(
            ome_pixel_size_um(
                r#"<OME><Pixels PhysicalSizeX="1" PhysicalSizeXUnit="parsec"/></OME>"#
            ),
            None
        );
    }

    #[test]
    fn absurd_user_values_are_rejected() {
        for v in [0.0, -0.5, f64::NAN, f64::INFINITY, 1e6] {
            assert!(validate(v).is_err(), "{v} accepted");
        }
        assert_eq!(validate(0.25).unwrap(), 0.25);
    }
}
