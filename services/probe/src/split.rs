//! Splits that keep a patient's slides together: stratified grouped k-fold cross-validation and
//! few-shot draws of k labelled slides per class.
//!
//! A group (patient) is assigned the class most of its slides carry; within each class the
//! groups are shuffled with the seed and dealt to the folds in turn, so every fold holds about
//! the same share of each class and no patient is in two folds.

use std::collections::BTreeMap;

use gigapath_zeroshot::rng::SplitMix64;

use crate::data::Dataset;
use crate::error::{ProbeError, Result};

/// Fold index (0-based) of every slide of `ds`, for `folds` stratified grouped folds. Each
/// fold's training side (the other folds) must hold every class: a class with fewer patient
/// groups than that allows is [`ProbeError::ClassMissingFromFold`].
pub fn stratified_group_folds(ds: &Dataset, folds: usize, seed: u64) -> Result<Vec<usize>> {
    if folds < 2 {
        return Err(ProbeError::Invalid(format!(
            "{folds} fold(s): cross-validation needs at least 2"
        )));
    }
    let groups = group_classes(ds);
    let distinct = groups.len();
    if distinct < folds {
        return Err(ProbeError::Invalid(format!(
            "{folds} folds for {distinct} patient group(s): use at most {distinct} folds"
        )));
    }
    let mut by_class: Vec<Vec<&str>> = vec![Vec::new(); ds.classes.len()];
    for (g, &c) in &groups {
        by_class[c].push(g.as_str());
    }
    let mut fold_of_group: BTreeMap<&str, usize> = BTreeMap::new();
    // Deal each class starting where the previous one stopped, so fold sizes stay even.
    let mut next = 0usize;
    for (c, members) in by_class.iter_mut().enumerate() {
        let mut rng = SplitMix64::new(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.shuffle(members);
        for g in members.iter() {
            fold_of_group.insert(g, next % folds);
            next += 1;
        }
    }
    let assignment: Vec<usize> = ds
        .groups
        .iter()
        .map(|g| fold_of_group[g.as_str()])
        .collect();
    for fold in 0..folds {
        let mut present = vec![false; ds.classes.len()];
        for (i, &f) in assignment.iter().enumerate() {
            if f != fold {
                present[ds.y[i]] = true;
            }
        }
        if let Some(c) = present.iter().position(|p| !p) {
            return Err(ProbeError::ClassMissingFromFold {
                class: ds.classes[c].clone(),
                fold: fold + 1,
                folds,
                groups: by_class[c].len(),
            });
        }
    }
    Ok(assignment)
}

/// Each group's class: the one most of its slides carry (ties: the lower class index).
fn group_classes(ds: &Dataset) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (g, &c) in ds.groups.iter().zip(&ds.y) {
        counts.entry(g).or_insert_with(|| vec![0; ds.classes.len()])[c] += 1;
    }
    counts
        .into_iter()
        .map(|(g, n)| {
            let best = (0..n.len())
                .max_by_key(|&c| (n[c], std::cmp::Reverse(c)))
                .unwrap_or(0);
            (g.to_string(), best)
        })
        .collect()
}

/// `k` slides of every class drawn at random (seeded) from the slides at `pool`: indices into
/// the dataset. [`ProbeError::TooFewSlides`] when a class has fewer than `k` there.
pub fn few_shot_draw(ds: &Dataset, pool: &[usize], k: usize, seed: u64) -> Result<Vec<usize>> {
    if k == 0 {
        return Err(ProbeError::Invalid("k = 0 slides per class".into()));
    }
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::with_capacity(k * ds.classes.len());
    for (c, class) in ds.classes.iter().enumerate() {
        let mut members: Vec<usize> = pool.iter().copied().filter(|&i| ds.y[i] == c).collect();
        if members.len() < k {
            return Err(ProbeError::TooFewSlides {
                k,
                class: class.clone(),
                available: members.len(),
            });
        }
        rng.shuffle(&mut members);
        out.extend_from_slice(&members[..k]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::LabelledSlide;
    use std::collections::BTreeSet;

    /// `n` slides, classes round-robin, every third slide sharing the previous one's patient.
    pub(crate) fn toy(n: usize, classes: usize) -> Dataset {
        let rows = (0..n)
            .map(|i| {
                let owner = if i % 3 == 2 { i - 1 } else { i };
                // Patients 0, 1, 2, ... own slides (0), (1, 2), (3), (4, 5), ...
                let patient = owner - owner / 3;
                LabelledSlide {
                    slide_id: format!("S{i:03}"),
                    value: format!("C{}", patient % classes),
                    patient: Some(format!("P{owner}")),
                    x: vec![i as f32],
                }
            })
            .collect();
        Dataset::new("subtype", rows, None).unwrap()
    }

    #[test]
    fn folds_keep_patients_together_and_are_stratified() {
        let ds = toy(60, 3);
        let folds = stratified_group_folds(&ds, 5, 1).unwrap();
        assert_eq!(folds, stratified_group_folds(&ds, 5, 1).unwrap());
        assert_ne!(folds, stratified_group_folds(&ds, 5, 2).unwrap());
        let mut fold_of_patient = BTreeMap::new();
        for (g, &f) in ds.groups.iter().zip(&folds) {
            assert_eq!(
                *fold_of_patient.entry(g).or_insert(f),
                f,
                "patient {g} split"
            );
        }
        for f in 0..5 {
            let classes: BTreeSet<usize> = (0..60)
                .filter(|&i| folds[i] == f)
                .map(|i| ds.y[i])
                .collect();
            assert_eq!(classes.len(), 3, "fold {f} holds every class");
            let n = folds.iter().filter(|&&x| x == f).count();
            assert!((9..=15).contains(&n), "fold {f}: {n} slides");
        }
    }

    #[test]
    fn a_class_missing_from_a_training_fold_is_a_clear_error() {
        // Class C2 has a single patient: the fold holding it trains without it.
        let rows = (0..13)
            .map(|i| LabelledSlide {
                slide_id: format!("S{i}"),
                value: if i == 12 {
                    "C2".into()
                } else {
                    format!("C{}", i % 2)
                },
                patient: Some(format!("P{i}")),
                x: vec![0.0],
            })
            .collect();
        let ds = Dataset::new("subtype", rows, None).unwrap();
        let err = stratified_group_folds(&ds, 3, 0).unwrap_err();
        assert!(matches!(err, ProbeError::ClassMissingFromFold { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("class `C2` is missing from the training slides of fold"),
            "{msg}"
        );
        assert!(msg.contains("1 patient group(s)"), "{msg}");
        let err = stratified_group_folds(&toy(6, 2), 5, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("5 folds for 4 patient group(s)"), "{err}");
    }

    #[test]
    fn few_shot_draws_are_balanced_seeded_and_bounded() {
        let ds = toy(30, 3);
        let pool: Vec<usize> = (0..30).collect();
        let d = few_shot_draw(&ds, &pool, 4, 9).unwrap();
        assert_eq!(d.len(), 12);
        for c in 0..3 {
            assert_eq!(d.iter().filter(|&&i| ds.y[i] == c).count(), 4);
        }
        assert_eq!(d, few_shot_draw(&ds, &pool, 4, 9).unwrap());
        assert_ne!(d, few_shot_draw(&ds, &pool, 4, 10).unwrap());
        let err = few_shot_draw(&ds, &pool, 16, 0).unwrap_err();
        assert!(
            matches!(err, ProbeError::TooFewSlides { k: 16, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("too few slides per class for k = 16"),
            "{err}"
        );
    }
}
