//! Training data: (slide, report) pairs from the catalog, the train / validation split, and
//! the order batches are drawn in.
//!
//! The split goes by group - the patient when every pair names one (`patient_id` label), else
//! the slide - so no patient is on both sides; it is stratified by a label when every pair has
//! one, and it is a pure function of the seed. The data order is a pure function of
//! (seed, epoch): a resumed run recomputes exactly the batches the killed one would have drawn.

use std::collections::{BTreeMap, BTreeSet};

use gigapath_store::catalog::TrainingPair;
use serde::{Deserialize, Serialize};

use crate::config::DataSection;
use crate::error::{Result, TrainError};
use gigapath_zeroshot::rng::SplitMix64;

/// Which slides train and which validate, and how the split was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// `patient` or `slide`.
    pub by: String,
    /// The label the split was stratified on, if any.
    pub stratified_by: Option<String>,
    /// The seed it was drawn with.
    pub seed: u64,
    /// Slide ids, sorted.
    pub train: Vec<String>,
    /// Held-out slide ids, sorted.
    pub validation: Vec<String>,
}

impl Split {
    /// Whether `slide_id` is held out.
    pub fn is_validation(&self, slide_id: &str) -> bool {
        self.validation
            .binary_search_by(|s| s.as_str().cmp(slide_id))
            .is_ok()
    }
}

/// Splits `pairs` by group (see the module docs).
pub fn split(pairs: &[TrainingPair], cfg: &DataSection, seed: u64) -> Result<Split> {
    if pairs.is_empty() {
        return Err(TrainError::Data(
            "no training pairs: ingest slides together with their reports first \
             (gigapath ingest --reports FILE SLIDES...)"
                .into(),
        ));
    }
    let all_have = |key: &str| pairs.iter().all(|p| p.labels.contains_key(key));
    let by = match cfg.split_by.as_str() {
        "patient" if !all_have("patient_id") => {
            return Err(TrainError::config(
                "data.split_by",
                "`patient`, but not every pair has a patient_id label",
            ))
        }
        "patient" => "patient",
        "auto" if all_have("patient_id") => "patient",
        _ => "slide",
    };
    let stratum_key = (!cfg.stratify_by.is_empty() && all_have(&cfg.stratify_by))
        .then(|| cfg.stratify_by.clone());
    // group -> (stratum, slides)
    let mut groups: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for p in pairs {
        let group = match by {
            "patient" => p.labels["patient_id"].clone(),
            _ => p.slide_id.clone(),
        };
        let stratum = stratum_key
            .as_ref()
            .map(|k| p.labels[k].clone())
            .unwrap_or_default();
        groups
            .entry(group)
            .or_insert_with(|| (stratum, BTreeSet::new()))
            .1
            .insert(p.slide_id.clone());
    }
    let mut strata: BTreeMap<String, Vec<&String>> = BTreeMap::new();
    for (g, (stratum, _)) in &groups {
        strata.entry(stratum.clone()).or_default().push(g);
    }
    let mut validation_groups = BTreeSet::new();
    for (stratum, mut members) in strata {
        let mut rng = SplitMix64::new(seed ^ fnv1a(stratum.as_bytes()));
        rng.shuffle(&mut members);
        let n = (members.len() as f64 * cfg.val_fraction).round() as usize;
        // Keep at least one group on each side of a stratum that can afford it.
        let n = if cfg.val_fraction > 0.0 && members.len() >= 2 {
            n.clamp(1, members.len() - 1)
        } else {
            n.min(members.len())
        };
        validation_groups.extend(members.into_iter().take(n).cloned());
    }
    let mut train = Vec::new();
    let mut validation = Vec::new();
    for (g, (_, slides)) in &groups {
        let side = if validation_groups.contains(g) {
            &mut validation
        } else {
            &mut train
        };
        side.extend(slides.iter().cloned());
    }
    train.sort();
    validation.sort();
    let train_pairs = pairs
        .iter()
        .filter(|p| train.binary_search(&p.slide_id).is_ok())
        .count();
    if train_pairs < 2 {
        return Err(TrainError::Data(format!(
            "{} training pair(s) after holding out {} slide(s) for validation: a contrastive \
             batch needs at least 2 (add pairs or lower data.val_fraction)",
            train_pairs,
            validation.len()
        )));
    }
    Ok(Split {
        by: by.into(),
        stratified_by: stratum_key,
        seed,
        train,
        validation,
    })
}

/// Batches of pair indices: each epoch a seeded permutation, cut into full batches (the tail
/// that does not fill one is dropped, so no pair meets itself as a negative).
#[derive(Debug, Clone)]
pub struct BatchOrder {
    n: usize,
    batch: usize,
    seed: u64,
}

impl BatchOrder {
    /// Over `n` items; the batch shrinks to `n` when there are fewer items than one batch.
    pub fn new(n: usize, batch_size: usize, seed: u64) -> Self {
        BatchOrder {
            n,
            batch: batch_size.min(n).max(1),
            seed,
        }
    }

    /// Items per batch.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Full batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        (self.n / self.batch).max(1)
    }

    /// The epoch of micro-batch `index`.
    pub fn epoch(&self, index: u64) -> u64 {
        index / self.batches_per_epoch() as u64
    }

    /// Item indices of micro-batch `index` (0-based, counted over the whole run).
    pub fn batch(&self, index: u64) -> Vec<usize> {
        let epoch = self.epoch(index);
        let within = (index % self.batches_per_epoch() as u64) as usize;
        let mut order: Vec<usize> = (0..self.n).collect();
        SplitMix64::new(self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut order);
        order[within * self.batch..(within + 1) * self.batch].to_vec()
    }
}

/// FNV-1a, a stable hash for seeding per-stratum shuffles.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(slide: &str, patient: Option<&str>, subtype: &str) -> TrainingPair {
        let mut labels = BTreeMap::from([("subtype".to_string(), subtype.to_string())]);
        if let Some(p) = patient {
            labels.insert("patient_id".into(), p.into());
        }
        TrainingPair {
            slide_id: slide.into(),
            report_id: format!("R-{slide}"),
            text: "text".into(),
            cohort: None,
            site: None,
            labels,
            feature_path: String::new(),
        }
    }

    #[test]
    fn split_keeps_patients_together_and_is_stratified_and_seeded() {
        // Every fifth slide belongs to the patient of the slide before it (same subtype).
        let pairs: Vec<TrainingPair> = (0..60)
            .map(|i| {
                let patient = if i % 5 == 4 { i - 1 } else { i };
                let subtype = ["A", "B", "C"][patient % 3];
                pair(&format!("S{i:03}"), Some(&format!("P{patient}")), subtype)
            })
            .collect();
        let cfg = DataSection::default();
        let s = split(&pairs, &cfg, 1).unwrap();
        assert_eq!(s.by, "patient");
        assert_eq!(s.stratified_by.as_deref(), Some("subtype"));
        assert_eq!(s, split(&pairs, &cfg, 1).unwrap());
        assert_ne!(s.validation, split(&pairs, &cfg, 2).unwrap().validation);
        assert_eq!(s.train.len() + s.validation.len(), 60);
        // No patient on both sides.
        let patient = |id: &String| {
            pairs.iter().find(|p| &p.slide_id == id).unwrap().labels["patient_id"].clone()
        };
        let train_patients: BTreeSet<String> = s.train.iter().map(patient).collect();
        assert!(s
            .validation
            .iter()
            .map(patient)
            .all(|p| !train_patients.contains(&p)));
        // Each subtype is held out in proportion.
        for sub in ["A", "B", "C"] {
            let held = s
                .validation
                .iter()
                .filter(|id| {
                    pairs
                        .iter()
                        .any(|p| &&p.slide_id == id && p.labels["subtype"] == sub)
                })
                .count();
            assert!((3..=7).contains(&held), "{sub}: {held}");
        }
        let by_slide = split(
            &pairs,
            &DataSection {
                split_by: "slide".into(),
                ..cfg
            },
            1,
        )
        .unwrap();
        assert_eq!(by_slide.by, "slide");
    }

    #[test]
    fn no_or_too_few_pairs_are_clear_errors() {
        let cfg = DataSection::default();
        let err = split(&[], &cfg, 0).unwrap_err().to_string();
        assert!(err.contains("no training pairs"), "{err}");
        let err = split(&[pair("a", None, "A"), pair("b", None, "A")], &cfg, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 training pair"), "{err}");
        let err = split(
            &[
                pair("a", None, "A"),
                pair("b", None, "A"),
                pair("c", None, "B"),
            ],
            &DataSection {
                split_by: "patient".into(),
                ..cfg
            },
            0,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("data.split_by") && err.contains("patient_id"),
            "{err}"
        );
    }

    #[test]
    fn batch_order_is_a_function_of_seed_and_index() {
        let order = BatchOrder::new(10, 4, 3);
        assert_eq!(order.batches_per_epoch(), 2);
        let epoch0: Vec<usize> = [order.batch(0), order.batch(1)].concat();
        let mut distinct = epoch0.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), 8, "no repeats within an epoch");
        assert_eq!(order.batch(5), BatchOrder::new(10, 4, 3).batch(5));
        assert_ne!(
            order.batch(0),
            order.batch(2),
            "a new permutation each epoch"
        );
        assert_eq!(BatchOrder::new(3, 32, 0).batch_size(), 3);
    }
}
