//! Classification and retrieval metrics, as scikit-learn defines them (the numbers papers
//! report): balanced accuracy, support-weighted F1, macro one-vs-rest AUROC, the confusion
//! matrix, and recall@k for cross-modal retrieval.

use serde::{Deserialize, Serialize};

use crate::classify::argmax;
use crate::error::{Result, ZeroShotError};

/// `m[t][p]`: how many samples of true class `t` were predicted `p`.
pub fn confusion_matrix(truth: &[usize], pred: &[usize], classes: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; classes]; classes];
    for (&t, &p) in truth.iter().zip(pred) {
        if t < classes && p < classes {
            m[t][p] += 1;
        }
    }
    m
}

/// Mean recall over the classes present in `truth` (sklearn `balanced_accuracy_score`).
pub fn balanced_accuracy(truth: &[usize], pred: &[usize], classes: usize) -> f64 {
    let m = confusion_matrix(truth, pred, classes);
    let recalls: Vec<f64> = m
        .iter()
        .enumerate()
        .filter_map(|(i, row)| {
            let n: u64 = row.iter().sum();
            (n > 0).then(|| row[i] as f64 / n as f64)
        })
        .collect();
    if recalls.is_empty() {
        return 0.0;
    }
    recalls.iter().sum::<f64>() / recalls.len() as f64
}

/// F1 per class weighted by its support (sklearn `f1_score(average="weighted")`; an undefined
/// precision or recall counts as 0).
pub fn weighted_f1(truth: &[usize], pred: &[usize], classes: usize) -> f64 {
    let m = confusion_matrix(truth, pred, classes);
    let total: u64 = m.iter().flatten().sum();
    if total == 0 {
        return 0.0;
    }
    (0..classes)
        .map(|c| {
            let tp = m[c][c] as f64;
            let support: u64 = m[c].iter().sum();
            let predicted: u64 = m.iter().map(|row| row[c]).sum();
            let f1 = if tp == 0.0 {
                0.0
            } else {
                let (p, r) = (tp / predicted as f64, tp / support as f64);
                2.0 * p * r / (p + r)
            };
            f1 * support as f64 / total as f64
        })
        .sum()
}

/// Area under the ROC curve of `scores` for `positive` labels (the Mann-Whitney U statistic,
/// ties counted half); `None` without both positives and negatives.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties (1-based).
    let mut ranks = vec![0f64; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    let n_pos = positive.iter().filter(|&&p| p).count() as f64;
    let n_neg = positive.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(positive)
        .filter(|(_, &p)| p)
        .map(|(r, _)| r)
        .sum();
    Some((rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// Mean over classes of the one-vs-rest AUROC of each class's probability (sklearn
/// `roc_auc_score(multi_class="ovr", average="macro")`), over the classes that have both
/// positives and negatives; `None` if none has.
pub fn macro_auroc_ovr(truth: &[usize], probabilities: &[Vec<f32>], classes: usize) -> Option<f64> {
    let aucs: Vec<f64> = (0..classes)
        .filter_map(|c| {
            let scores: Vec<f64> = probabilities.iter().map(|p| p[c] as f64).collect();
            let positive: Vec<bool> = truth.iter().map(|&t| t == c).collect();
            auroc(&scores, &positive)
        })
        .collect();
    (!aucs.is_empty()).then(|| aucs.iter().sum::<f64>() / aucs.len() as f64)
}

/// Share of queries whose relevant candidate ranks in the top `k` by similarity.
///
/// `similarity[q][c]` scores candidate `c` for query `q`; `relevant[q]` lists the candidates
/// that count as a hit (e.g. every report of a slide). A relevant candidate's rank is the
/// number of candidates scoring strictly higher (ties in its favour).
pub fn recall_at_k(similarity: &[Vec<f32>], relevant: &[Vec<usize>], k: usize) -> f64 {
    if similarity.is_empty() {
        return 0.0;
    }
    let hits = similarity
        .iter()
        .zip(relevant)
        .filter(|(scores, rel)| {
            rel.iter().any(|&r| {
                let s = scores[r];
                scores.iter().filter(|&&x| x > s).count() < k
            })
        })
        .count();
    hits as f64 / similarity.len() as f64
}

/// Everything a zero-shot classification run reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassificationReport {
    /// Class labels, in the order of every per-class list and of the confusion matrix.
    pub labels: Vec<String>,
    /// Samples scored.
    pub n: usize,
    /// Samples per true class.
    pub support: Vec<u64>,
    /// Share of samples predicted right, in [0, 1].
    pub accuracy: f64,
    /// Mean recall over the classes present ([`balanced_accuracy`]).
    pub balanced_accuracy: f64,
    /// F1 per class weighted by support ([`weighted_f1`]).
    pub weighted_f1: f64,
    /// `None` when no class has both positives and negatives.
    pub macro_auroc: Option<f64>,
    /// Rows: true class; columns: predicted class.
    pub confusion: Vec<Vec<u64>>,
}

impl ClassificationReport {
    /// The report for true classes `truth` and per-sample class `probabilities`.
    pub fn new(labels: &[String], truth: &[usize], probabilities: &[Vec<f32>]) -> Result<Self> {
        let k = labels.len();
        if truth.len() != probabilities.len() || truth.is_empty() {
            return Err(ZeroShotError::Input(format!(
                "{} true labels and {} predictions (need the same, non-zero number)",
                truth.len(),
                probabilities.len()
            )));
        }
        if let Some(p) = probabilities.iter().find(|p| p.len() != k) {
            return Err(ZeroShotError::Input(format!(
                "a prediction has {} probabilities for {k} classes",
                p.len()
            )));
        }
        if let Some(t) = truth.iter().find(|&&t| t >= k) {
            return Err(ZeroShotError::Input(format!("true class {t} of {k}")));
        }
        let pred: Vec<usize> = probabilities.iter().map(|p| argmax(p)).collect();
        let confusion = confusion_matrix(truth, &pred, k);
        let correct = truth.iter().zip(&pred).filter(|(t, p)| t == p).count();
        Ok(ClassificationReport {
            labels: labels.to_vec(),
            n: truth.len(),
            support: confusion.iter().map(|r| r.iter().sum()).collect(),
            accuracy: correct as f64 / truth.len() as f64,
            balanced_accuracy: balanced_accuracy(truth, &pred, k),
            weighted_f1: weighted_f1(truth, &pred, k),
            macro_auroc: macro_auroc_ovr(truth, probabilities, k),
            confusion,
        })
    }

    /// The confusion matrix as aligned text, rows = truth.
    pub fn confusion_text(&self) -> String {
        let w = self
            .labels
            .iter()
            .map(|l| l.len())
            .max()
            .unwrap_or(4)
            .max(5)
            + 1;
        let mut s = format!("{:>w$}", "true\\pred");
        for l in &self.labels {
            s.push_str(&format!("{l:>w$}"));
        }
        for (l, row) in self.labels.iter().zip(&self.confusion) {
            s.push('\n');
            s.push_str(&format!("{l:>w$}"));
            for v in row {
                s.push_str(&format!("{v:>w$}"));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_accuracy_and_f1_match_sklearn() {
        // sklearn docs: balanced_accuracy_score([0,1,0,0,1,0], [0,1,0,0,0,1]) == 0.625
        assert!(
            (balanced_accuracy(&[0, 1, 0, 0, 1, 0], &[0, 1, 0, 0, 0, 1], 2) - 0.625).abs() < 1e-12
        );
        // sklearn docs: f1_score([0,1,2,0,1,2], [0,2,1,0,0,1], average="weighted") == 0.2666...
        let f1 = weighted_f1(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 1], 3);
        assert!((f1 - 0.266_666_666_666_666_66).abs() < 1e-12, "{f1}");
        assert_eq!(
            confusion_matrix(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 1], 3),
            vec![vec![2, 0, 0], vec![1, 0, 1], vec![0, 2, 0]]
        );
    }

    #[test]
    fn auroc_matches_sklearn_with_ties() {
        // sklearn docs: roc_auc_score([0,0,1,1], [0.1,0.4,0.35,0.8]) == 0.75
        let a = auroc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
        assert!((a - 0.75).abs() < 1e-12);
        // A tie between a positive and a negative counts half: (1 + 0.5) / 2.
        let a = auroc(&[0.5, 0.5, 0.9], &[false, true, true]).unwrap();
        assert!((a - 0.75).abs() < 1e-12, "{a}");
        assert_eq!(auroc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn macro_ovr_auroc_averages_classes() {
        let truth = [0, 1, 2, 2];
        let probs = vec![
            vec![0.8, 0.1, 0.1],
            vec![0.3, 0.4, 0.3],
            vec![0.2, 0.5, 0.3],
            vec![0.1, 0.1, 0.8],
        ];
        // Class 0: 1.0; class 1: positive 0.4 vs negatives 0.1, 0.5, 0.1 -> 2/3;
        // class 2: positives 0.3, 0.8 vs negatives 0.1, 0.3 -> (1.5 + 2) / 4.
        let expected = (1.0 + 2.0 / 3.0 + 3.5 / 4.0) / 3.0;
        let got = macro_auroc_ovr(&truth, &probs, 3).unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        let r = ClassificationReport::new(&["a".into(), "b".into(), "c".into()], &truth, &probs)
            .unwrap();
        assert_eq!(
            r.confusion,
            vec![vec![1, 0, 0], vec![0, 1, 0], vec![0, 1, 1]]
        );
        assert!((r.balanced_accuracy - (1.0 + 1.0 + 0.5) / 3.0).abs() < 1e-12);
        assert_eq!(r.support, [1, 1, 2]);
        assert!(r.confusion_text().contains("true\\pred"));
        assert!(ClassificationReport::new(&["a".into()], &[0, 0], &[vec![1.0]]).is_err());
    }

    #[test]
    fn recall_at_k_counts_hits() {
        let sim = vec![
            vec![0.9, 0.1, 0.2], // relevant 0 ranks first
            vec![0.5, 0.4, 0.6], // relevant 1 ranks third
            vec![0.2, 0.3, 0.1], // relevant 2 ranks third, relevant 1 second
        ];
        let rel = vec![vec![0], vec![1], vec![2, 1]];
        assert!((recall_at_k(&sim, &rel, 1) - 2.0 / 3.0).abs() < 1e-12);
        assert!((recall_at_k(&sim, &rel, 2) - 2.0 / 3.0).abs() < 1e-12);
        assert!((recall_at_k(&sim, &rel, 3) - 1.0).abs() < 1e-12);
    }
}
