//! Labelled slides: a label per slide from the catalog (report columns ingested with the
//! slides) or a CSV (`slide_id,<label>[,patient_id]`), the slide's stored vector (`slide` or
//! `joint`), and the patient it belongs to, so that splits never put one patient on both sides.
//!
//! A mutation status is a label like any other (`KRAS` = `mutant` / `wildtype`, or `1` / `0`):
//! binary heads are two-class heads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use gigapath_query::Space;
use gigapath_store::catalog::SlideState;
use gigapath_store::vector::{combined_fingerprint, Point, SLIDES};
use gigapath_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ProbeError, Result};

/// Labelled slides with their vectors, classes in sorted order.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The label column the classes come from (`subtype`, `KRAS`, ...).
    pub label: String,
    /// Class names, sorted; `y` indexes them.
    pub classes: Vec<String>,
    /// One entry per slide, in the order of `y` and `x`.
    pub slide_ids: Vec<String>,
    /// The patient of each slide (the slide id when none is known): the unit of splits.
    pub groups: Vec<String>,
    /// Class index per slide.
    pub y: Vec<usize>,
    /// Vector per slide, all of width `dim`.
    pub x: Vec<Vec<f32>>,
    /// Vector width.
    pub dim: usize,
}

/// One labelled slide before the dataset is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledSlide {
    /// Slide id.
    pub slide_id: String,
    /// Its label value.
    pub value: String,
    /// Its patient, if known.
    pub patient: Option<String>,
    /// Its vector.
    pub x: Vec<f32>,
}

impl Dataset {
    /// Checks and indexes `slides`: equal widths, finite values, at least two classes; with
    /// `classes`, every value must be one of them (a head's classes), else the classes are the
    /// sorted distinct values.
    pub fn new(
        label: &str,
        slides: Vec<LabelledSlide>,
        classes: Option<&[String]>,
    ) -> Result<Self> {
        let distinct: BTreeSet<&str> = slides.iter().map(|s| s.value.as_str()).collect();
        let classes: Vec<String> = match classes {
            Some(c) => c.to_vec(),
            None => distinct.iter().map(|s| s.to_string()).collect(),
        };
        if distinct.len() < 2 || classes.len() < 2 {
            return Err(ProbeError::SingleClass {
                label: label.into(),
                class: distinct
                    .iter()
                    .next()
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
                slides: slides.len(),
            });
        }
        let dim = slides[0].x.len();
        let mut ds = Dataset {
            label: label.into(),
            classes,
            slide_ids: Vec::with_capacity(slides.len()),
            groups: Vec::with_capacity(slides.len()),
            y: Vec::with_capacity(slides.len()),
            x: Vec::with_capacity(slides.len()),
            dim,
        };
        for s in slides {
            if s.x.len() != dim {
                return Err(ProbeError::DimensionMismatch {
                    what: format!("the vector of slide `{}`", s.slide_id),
                    expected: dim,
                    got: s.x.len(),
                });
            }
            if s.x.iter().any(|v| !v.is_finite()) {
                return Err(ProbeError::Invalid(format!(
                    "the vector of slide `{}` has a non-finite value",
                    s.slide_id
                )));
            }
            let class = ds.class_index(&s.value, &s.slide_id)?;
            ds.groups
                .push(s.patient.unwrap_or_else(|| s.slide_id.clone()));
            ds.slide_ids.push(s.slide_id);
            ds.y.push(class);
            ds.x.push(s.x);
        }
        Ok(ds)
    }

    /// The index of class `value`, or [`ProbeError::UnknownLabel`].
    pub fn class_index(&self, value: &str, slide: &str) -> Result<usize> {
        self.classes
            .iter()
            .position(|c| c == value)
            .ok_or_else(|| ProbeError::UnknownLabel {
                value: value.into(),
                slide: slide.into(),
                known: self.classes.join(", "),
            })
    }

    /// Slides in the dataset.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether it has no slide.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Slides per class.
    pub fn support(&self) -> Vec<usize> {
        let mut n = vec![0; self.classes.len()];
        for &c in &self.y {
            n[c] += 1;
        }
        n
    }

    /// The slides at `idx`, same classes.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            label: self.label.clone(),
            classes: self.classes.clone(),
            slide_ids: idx.iter().map(|&i| self.slide_ids[i].clone()).collect(),
            groups: idx.iter().map(|&i| self.groups[i].clone()).collect(),
            y: idx.iter().map(|&i| self.y[i]).collect(),
            x: idx.iter().map(|&i| self.x[i].clone()).collect(),
            dim: self.dim,
        }
    }

    /// SHA-256 (16 hex) of the training set: label, classes, and every (slide, patient, class,
    /// vector) in slide order. Two heads with one fingerprint learned from the same data.
    pub fn fingerprint(&self) -> String {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.sort_by(|&a, &b| self.slide_ids[a].cmp(&self.slide_ids[b]));
        let mut h = Sha256::new();
        h.update(self.label.as_bytes());
        for c in &self.classes {
            h.update([0u8]);
            h.update(c.as_bytes());
        }
        for i in order {
            h.update([1u8]);
            h.update(self.slide_ids[i].as_bytes());
            h.update([0u8]);
            h.update(self.groups[i].as_bytes());
            h.update((self.y[i] as u64).to_le_bytes());
            for v in &self.x[i] {
                h.update(v.to_le_bytes());
            }
        }
        hex16(&h.finalize())
    }
}

pub(crate) fn hex16(digest: &[u8]) -> String {
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A slide's label (and patient) from a labels CSV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvLabel {
    /// The label value.
    pub value: String,
    /// `patient_id` when the file has that column and the row a value.
    pub patient: Option<String>,
}

/// Reads a labels CSV with a `slide_id` column and the `label` column (or a column named
/// `label`), and an optional `patient_id`. Rows with an empty label are skipped; a slide listed
/// twice with different labels is an error naming it.
pub fn read_labels_csv(path: &Path, label: &str) -> Result<BTreeMap<String, CsvLabel>> {
    let mut reader = csv::Reader::from_path(path).map_err(|e| ProbeError::io(path, e))?;
    let headers = reader
        .headers()
        .map_err(|e| ProbeError::io(path, e))?
        .clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let id_col = col("slide_id")
        .ok_or_else(|| ProbeError::Invalid(format!("{}: no `slide_id` column", path.display())))?;
    let label_col = col(label).or_else(|| col("label")).ok_or_else(|| {
        ProbeError::Invalid(format!(
            "{}: no `{label}` (or `label`) column; columns are {}",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let patient_col = col("patient_id");
    let mut out = BTreeMap::new();
    for (row, record) in reader.records().enumerate() {
        let record = record.map_err(|e| ProbeError::io(path, e))?;
        let get = |c: usize| record.get(c).map(str::trim).unwrap_or("");
        let (id, value) = (get(id_col), get(label_col));
        if id.is_empty() {
            return Err(ProbeError::Invalid(format!(
                "{} row {}: empty slide_id",
                path.display(),
                row + 2
            )));
        }
        if value.is_empty() {
            continue;
        }
        let entry = CsvLabel {
            value: value.into(),
            patient: patient_col
                .map(get)
                .filter(|p| !p.is_empty())
                .map(String::from),
        };
        if let Some(prev) = out.insert(id.to_string(), entry.clone()) {
            if prev.value != entry.value {
                return Err(ProbeError::Invalid(format!(
                    "{}: slide `{id}` is labelled both `{}` and `{}`",
                    path.display(),
                    prev.value,
                    entry.value
                )));
            }
        }
    }
    Ok(out)
}

/// What the vectors of a dataset are and which weights made them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingInfo {
    /// `slide` (the slide encoder's output) or `joint` (the aligned space).
    pub space: Space,
    /// Vector width.
    pub dim: usize,
    /// The weights behind the vectors: tile + slide encoders for `slide`, plus the alignment
    /// for `joint`. A head refuses vectors with another one.
    pub fingerprint: String,
}

/// A stored slide's vector in one space.
#[derive(Debug, Clone, PartialEq)]
pub struct SlideVector {
    /// Slide id.
    pub slide_id: String,
    /// The vector.
    pub x: Vec<f32>,
    /// Its embedding fingerprint (see [`EmbeddingInfo::fingerprint`]).
    pub fingerprint: String,
    /// The slide's labels as stored with its point.
    pub labels: BTreeMap<String, String>,
}

/// The fingerprint of the weights behind a point's `space` vector: the tile and slide encoders
/// for `slide` (an alignment checkpoint does not change it), the point's guard fingerprint for
/// `joint`.
pub fn embedding_fingerprint(point: &Point, space: Space) -> String {
    let roles: BTreeMap<String, String> = point
        .payload
        .get("fingerprints")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.as_str() == "tile" || k.as_str() == "slide")
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    match space {
        Space::Slide if roles.len() == 2 => combined_fingerprint(&roles),
        _ => point.fingerprint.clone(),
    }
}

/// The `space` vectors of `ids`, in order; an unknown id is [`ProbeError::UnknownSlide`] and a
/// slide without the vector (`joint` before an alignment) an error saying so.
pub async fn slide_vectors(
    store: &Store,
    ids: &[String],
    space: Space,
) -> Result<Vec<SlideVector>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(256) {
        let points = store.vectors.retrieve(SLIDES, chunk, true).await?;
        let mut by_id: BTreeMap<String, Point> =
            points.into_iter().map(|p| (p.id.clone(), p)).collect();
        for id in chunk {
            let p = by_id
                .remove(id)
                .ok_or_else(|| ProbeError::UnknownSlide(id.clone()))?;
            let x = p.vectors.get(&space.to_string()).cloned().ok_or_else(|| {
                ProbeError::Invalid(format!(
                    "slide `{id}` has no `{space}` vector{}",
                    if space == Space::Joint {
                        " (no alignment checkpoint when it was embedded: use --space slide, or gigapath reembed)"
                    } else {
                        ""
                    }
                ))
            })?;
            let labels = p
                .payload
                .get("labels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            out.push(SlideVector {
                slide_id: id.clone(),
                fingerprint: embedding_fingerprint(&p, space),
                x,
                labels,
            });
        }
    }
    Ok(out)
}

/// Where the labels come from.
#[derive(Debug, Clone, Default)]
pub struct LabelSource {
    /// The label column (`subtype`, a gene, ...).
    pub label: String,
    /// A labels CSV; `None`: the catalog's slide labels.
    pub csv: Option<std::path::PathBuf>,
}

/// Every embedded slide that carries the label, with its `space` vector; slides without the
/// label are left out (counted in the second value). All vectors must come from one set of
/// weights.
pub async fn load_dataset(
    store: &Store,
    source: &LabelSource,
    space: Space,
) -> Result<(Dataset, EmbeddingInfo, usize)> {
    let csv = match &source.csv {
        Some(p) => Some(read_labels_csv(p, &source.label)?),
        None => None,
    };
    let slides = store
        .catalog
        .list_slides(Some(SlideState::Embedded))
        .await?;
    let mut wanted: Vec<(String, String, Option<String>)> = Vec::new();
    let mut unlabelled = 0;
    for s in &slides {
        let catalog_patient = s
            .labels
            .get("patient_id")
            .or_else(|| s.labels.get("patient"))
            .cloned();
        let found = match &csv {
            Some(map) => map
                .get(&s.id)
                .map(|l| (l.value.clone(), l.patient.clone().or(catalog_patient))),
            None => s
                .labels
                .get(&source.label)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (v.clone(), catalog_patient)),
        };
        match found {
            Some((value, patient)) => wanted.push((s.id.clone(), value, patient)),
            None => unlabelled += 1,
        }
    }
    if let Some(map) = &csv {
        let known: BTreeSet<&str> = slides.iter().map(|s| s.id.as_str()).collect();
        let missing: Vec<&str> = map
            .keys()
            .map(String::as_str)
            .filter(|id| !known.contains(id))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                "{} slide(s) of the labels CSV are not embedded here and are left out: {}",
                missing.len(),
                missing
                    .iter()
                    .take(5)
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    if wanted.is_empty() {
        return Err(ProbeError::SingleClass {
            label: source.label.clone(),
            class: String::new(),
            slides: 0,
        });
    }
    let ids: Vec<String> = wanted.iter().map(|w| w.0.clone()).collect();
    let vectors = slide_vectors(store, &ids, space).await?;
    let fingerprint = vectors[0].fingerprint.clone();
    if let Some(other) = vectors.iter().find(|v| v.fingerprint != fingerprint) {
        return Err(ProbeError::Fingerprint(format!(
            "slides `{}` and `{}` were embedded with different weights ({fingerprint} vs {}): \
             re-embed them before training a head",
            vectors[0].slide_id, other.slide_id, other.fingerprint
        )));
    }
    let rows: Vec<LabelledSlide> = wanted
        .into_iter()
        .zip(vectors)
        .map(|((slide_id, value, patient), v)| LabelledSlide {
            slide_id,
            value,
            patient,
            x: v.x,
        })
        .collect();
    let ds = Dataset::new(&source.label, rows, None)?;
    let info = EmbeddingInfo {
        space,
        dim: ds.dim,
        fingerprint,
    };
    Ok((ds, info, unlabelled))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, value: &str, x: Vec<f32>) -> LabelledSlide {
        LabelledSlide {
            slide_id: id.into(),
            value: value.into(),
            patient: None,
            x,
        }
    }

    #[test]
    fn dataset_checks_classes_dims_and_values() {
        let err = Dataset::new(
            "subtype",
            vec![row("a", "X", vec![1.0]), row("b", "X", vec![2.0])],
            None,
        )
        .unwrap_err();
        assert!(matches!(err, ProbeError::SingleClass { .. }), "{err}");
        assert!(err.to_string().contains("single class (X)"), "{err}");
        let err = Dataset::new(
            "subtype",
            vec![row("a", "X", vec![1.0]), row("b", "Y", vec![2.0, 3.0])],
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "dimension mismatch: the vector of slide `b` has 2 dimensions, expected 1"
            ),
            "{err}"
        );
        let classes = ["X".to_string(), "Y".to_string()];
        let err = Dataset::new(
            "subtype",
            vec![row("a", "X", vec![1.0]), row("b", "Z", vec![2.0])],
            Some(&classes),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("unknown label value `Z` of slide `b`: the classes are X, Y"),
            "{err}"
        );
        let ds = Dataset::new(
            "subtype",
            vec![row("b", "Y", vec![1.0]), row("a", "X", vec![2.0])],
            None,
        )
        .unwrap();
        assert_eq!(ds.classes, ["X", "Y"]);
        assert_eq!(ds.y, [1, 0]);
        assert_eq!(
            ds.groups,
            ["b", "a"],
            "no patient: the slide is its own group"
        );
        // The fingerprint ignores row order but not labels.
        let swapped = ds.subset(&[1, 0]);
        assert_eq!(ds.fingerprint(), swapped.fingerprint());
        let relabelled = Dataset::new(
            "subtype",
            vec![row("b", "X", vec![1.0]), row("a", "Y", vec![2.0])],
            None,
        )
        .unwrap();
        assert_ne!(ds.fingerprint(), relabelled.fingerprint());
    }

    #[test]
    fn labels_csv_with_patients_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("labels.csv");
        std::fs::write(
            &p,
            "slide_id,patient_id,KRAS\nS1,P1,mutant\nS2,P1,mutant\nS3,,wildtype\nS4,P3,\n",
        )
        .unwrap();
        let m = read_labels_csv(&p, "KRAS").unwrap();
        assert_eq!(m.len(), 3, "the row without a value is skipped");
        assert_eq!(m["S1"].patient.as_deref(), Some("P1"));
        assert_eq!(m["S3"].patient, None);
        assert_eq!(m["S3"].value, "wildtype");
        std::fs::write(&p, "slide_id,label\nS1,A\nS1,B\n").unwrap();
        let err = read_labels_csv(&p, "subtype").unwrap_err().to_string();
        assert!(
            err.contains("slide `S1` is labelled both `A` and `B`"),
            "{err}"
        );
        std::fs::write(&p, "id,label\nS1,A\n").unwrap();
        let err = read_labels_csv(&p, "subtype").unwrap_err().to_string();
        assert!(err.contains("no `slide_id` column"), "{err}");
    }
}
