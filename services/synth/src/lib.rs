//! Synthetic cohorts for tests and the demo: slides whose tissue differs by subtype (real H&E
//! texture, different colour balance, density and architecture) and pathology reports written
//! from templates with distractors, synonyms and noise.
//!
//! Not for: reading or tiling slides (`gigapath-wsi`), or anything a real cohort needs.
//!
//! A cohort folder holds `slides/<slide_id>.svs`, `reports.jsonl` (one report per slide:
//! `report_id`, `slide_id`, `patient_id`, `report_text`, `subtype`, `site`, `cohort`),
//! `labels.csv` and `manifest.json`. Everything is a function of the seed: the same spec gives
//! the same bytes on every machine.

pub mod reports;
pub mod rng;
pub mod subtypes;

use std::path::{Path, PathBuf};

use gigapath_wsi::slide_writer::{self, Metadata, SlideSpec};
use gigapath_wsi::WsiError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::rng::Rng;
pub use crate::subtypes::Subtype;

/// Errors of the generator.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// Writing a slide failed.
    #[error(transparent)]
    Slide(#[from] WsiError),
    /// Writing a report, label or manifest file (or its folder) failed.
    #[error("{}: {msg}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        msg: String,
    },
    /// A [`CohortSpec`] that cannot be generated.
    #[error("invalid cohort spec: {0}")]
    Invalid(String),
}

fn io(path: &Path, e: impl std::fmt::Display) -> SynthError {
    SynthError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// What to generate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CohortSpec {
    /// Cohort name, written as every report's `cohort`.
    pub name: String,
    /// Subtypes to generate; at least one.
    pub subtypes: Vec<Subtype>,
    /// Slides of each subtype; at least one.
    pub slides_per_subtype: usize,
    /// Seed of everything drawn: the same spec gives the same bytes.
    pub seed: u64,
    /// Mean side of a slide, microns (each slide varies by +-15%).
    pub slide_um: f64,
    /// Share of slides scanned at 40x (0.2527 um/px); the rest at 20x (0.499 um/px).
    pub fraction_40x: f64,
    /// Share of patients with a second slide (same subtype): splits must go by patient.
    pub second_slide_fraction: f64,
    /// How close the subtypes look, 0 (as designed) to 1: stain gains drawn towards one common
    /// balance and a larger per-slide stain jitter, so colour separates them less and
    /// architecture must (the "harder" cohort of the probe comparisons). 0 gives the same bytes
    /// as before the option existed.
    #[serde(default)]
    pub closeness: f64,
}

impl Default for CohortSpec {
    fn default() -> Self {
        CohortSpec {
            name: "synthetic-rcc".into(),
            subtypes: Subtype::ALL.to_vec(),
            slides_per_subtype: 40,
            seed: 7,
            slide_um: 1024.0,
            fraction_40x: 0.1,
            second_slide_fraction: 0.2,
            closeness: 0.0,
        }
    }
}

/// One generated slide.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CohortSlide {
    /// `SYN-0001`, ...
    pub slide_id: String,
    /// `P0001`, ...; shared by a patient's slides.
    pub patient_id: String,
    /// What the slide shows.
    pub subtype: Subtype,
    /// Relative to the cohort folder.
    pub path: String,
    /// Level-0 micrometres per pixel (0.2527 at 40x, 0.499 at 20x).
    pub mpp: f64,
    /// Level-0 width in pixels.
    pub width: u64,
    /// Level-0 height in pixels.
    pub height: u64,
}

/// One report, as written to `reports.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CohortReport {
    /// `R-<slide_id>`.
    pub report_id: String,
    /// The slide it describes.
    pub slide_id: String,
    /// The slide's patient.
    pub patient_id: String,
    /// The report, from the subtype's templates.
    pub report_text: String,
    /// The slide's subtype label (`CCRCC`, ...): the ground truth.
    pub subtype: String,
    /// Organ: always `kidney`.
    pub site: String,
    /// The cohort's name ([`CohortSpec::name`]).
    pub cohort: String,
}

/// A generated cohort, as recorded in `manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cohort {
    /// What was asked for.
    pub spec: CohortSpec,
    /// The slides generated, in id order.
    pub slides: Vec<CohortSlide>,
}

impl Cohort {
    /// Where `slide` is when the cohort folder is `dir`.
    pub fn slide_path(&self, dir: &Path, slide: &CohortSlide) -> PathBuf {
        dir.join(&slide.path)
    }
}

/// The slides and reports of `spec`, without writing anything.
pub fn plan(spec: &CohortSpec) -> Result<(Vec<CohortSlide>, Vec<CohortReport>), SynthError> {
    if spec.subtypes.is_empty() || spec.slides_per_subtype == 0 {
        return Err(SynthError::Invalid(
            "need at least one subtype and one slide per subtype".into(),
        ));
    }
    if !(spec.slide_um >= 300.0 && spec.slide_um <= 20_000.0) {
        return Err(SynthError::Invalid(format!(
            "slide side {} um not in [300, 20000]",
            spec.slide_um
        )));
    }
    if !(0.0..=1.0).contains(&spec.closeness) {
        return Err(SynthError::Invalid(format!(
            "closeness {} not in [0, 1]",
            spec.closeness
        )));
    }
    let mut rng = Rng::new(spec.seed);
    let mut labels: Vec<Subtype> = spec
        .subtypes
        .iter()
        .flat_map(|&s| std::iter::repeat_n(s, spec.slides_per_subtype))
        .collect();
    rng.shuffle(&mut labels);
    let mut slides = Vec::with_capacity(labels.len());
    let mut reports = Vec::with_capacity(labels.len());
    let mut patient = 0usize;
    let mut i = 0usize;
    while i < labels.len() {
        patient += 1;
        // A second slide of the same patient takes the next slot of the same subtype.
        let mut group = vec![i];
        if rng.chance(spec.second_slide_fraction) {
            if let Some(j) = (i + 1..labels.len()).find(|&j| labels[j] == labels[i]) {
                labels.swap(i + 1, j);
                group.push(i + 1);
            }
        }
        for &k in &group {
            let subtype = labels[k];
            let slide_id = format!("SYN-{:04}", k + 1);
            let mpp = if rng.chance(spec.fraction_40x) {
                0.2527
            } else {
                0.499
            };
            let w_um = spec.slide_um * rng.range(0.85, 1.15);
            let h_um = spec.slide_um * rng.range(0.85, 1.15);
            let mut text_rng = Rng::derive(spec.seed ^ 0x5EED_7E77, k as u64);
            reports.push(CohortReport {
                report_id: format!("R-{slide_id}"),
                slide_id: slide_id.clone(),
                patient_id: format!("P{patient:04}"),
                report_text: reports::write(subtype, &mut text_rng),
                subtype: subtype.label().to_string(),
                site: "kidney".into(),
                cohort: spec.name.clone(),
            });
            slides.push(CohortSlide {
                path: format!("slides/{slide_id}.svs"),
                slide_id,
                patient_id: format!("P{patient:04}"),
                subtype,
                mpp,
                width: (w_um / mpp).round() as u64,
                height: (h_um / mpp).round() as u64,
            });
        }
        i += group.len();
    }
    Ok((slides, reports))
}

/// Writes the cohort of `spec` into `dir` (slides already present are kept: they are the same
/// bytes for the same spec). `progress` is called with (slides done, total).
pub fn generate(
    dir: &Path,
    spec: &CohortSpec,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Cohort, SynthError> {
    let (slides, reports) = plan(spec)?;
    let slides_dir = dir.join("slides");
    std::fs::create_dir_all(&slides_dir).map_err(|e| io(&slides_dir, e))?;
    let done = std::sync::atomic::AtomicUsize::new(0);
    slides.par_iter().enumerate().try_for_each(|(k, s)| {
        let path = dir.join(&s.path);
        if !path.exists() {
            let mut rng = Rng::derive(spec.seed, k as u64);
            let w_um = s.width as f64 * s.mpp;
            let h_um = s.height as f64 * s.mpp;
            let scene = subtypes::scene_with(s.subtype, &mut rng, w_um, h_um, spec.closeness);
            let slide_spec = SlideSpec {
                width: s.width,
                height: s.height,
                mpp: s.mpp,
                downsamples: vec![1, 4, 16],
                metadata: Metadata::Aperio {
                    app_mag: if s.mpp < 0.3 { 40 } else { 20 },
                },
                jpeg_quality: 85,
            };
            slide_writer::write_slide(&path, &slide_spec, &scene)?;
        }
        progress(
            done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            slides.len(),
        );
        Ok::<_, SynthError>(())
    })?;
    let jsonl: String = reports
        .iter()
        .map(|r| serde_json::to_string(r).expect("report serialises") + "\n")
        .collect();
    write_file(&dir.join("reports.jsonl"), jsonl.as_bytes())?;
    let mut labels = String::from("slide_id,patient_id,subtype,site\n");
    for s in &slides {
        labels.push_str(&format!(
            "{},{},{},kidney\n",
            s.slide_id, s.patient_id, s.subtype
        ));
    }
    write_file(&dir.join("labels.csv"), labels.as_bytes())?;
    let cohort = Cohort {
        spec: spec.clone(),
        slides,
    };
    write_file(
        &dir.join("manifest.json"),
        &serde_json::to_vec_pretty(&cohort).expect("manifest serialises"),
    )?;
    Ok(cohort)
}

/// Writes through a temp file and a rename, so a reader never sees half a file.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_is_balanced_deterministic_and_groups_patients() {
        let spec = CohortSpec::default();
        let (slides, reports) = plan(&spec).unwrap();
        assert_eq!(slides.len(), 120);
        for s in Subtype::ALL {
            assert_eq!(slides.iter().filter(|x| x.subtype == s).count(), 40);
        }
        let (again, _) = plan(&spec).unwrap();
        assert_eq!(
            slides
                .iter()
                .map(|s| (&s.slide_id, s.subtype))
                .collect::<Vec<_>>(),
            again
                .iter()
                .map(|s| (&s.slide_id, s.subtype))
                .collect::<Vec<_>>()
        );
        // Some patients have two slides, always of one subtype.
        let mut by_patient = std::collections::HashMap::<&str, Vec<Subtype>>::new();
        for s in &slides {
            by_patient.entry(&s.patient_id).or_default().push(s.subtype);
        }
        let pairs = by_patient.values().filter(|v| v.len() == 2).count();
        assert!(pairs >= 5, "{pairs} patients with two slides");
        assert!(by_patient.values().all(|v| v.iter().all(|s| *s == v[0])));
        assert!(reports
            .iter()
            .zip(&slides)
            .all(|(r, s)| r.slide_id == s.slide_id && r.subtype == s.subtype.label()));
    }
}
