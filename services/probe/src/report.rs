//! The side-by-side comparison `gigapath probe compare` prints for one label: zero-shot (when
//! an alignment is there), the few-shot curves and the cross-validated heads, each with its
//! interval.

use serde::{Deserialize, Serialize};

use crate::eval::{CvResult, FewShotPoint, Scores};
use crate::heads::HeadKind;

/// Zero-shot scores of the same label.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotRow {
    /// The prompt set used.
    pub prompt_set: String,
    /// Which slides it was scored on: `held-out` (the alignment's validation slides) or `all`.
    pub split: String,
    /// Scores with bootstrap intervals.
    pub scores: Scores,
}

/// Everything the comparison shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The label compared on.
    pub label: String,
    /// Its classes.
    pub classes: Vec<String>,
    /// Labelled slides and patients.
    pub slides: usize,
    /// Patient groups.
    pub patients: usize,
    /// Slides per class.
    pub support: Vec<usize>,
    /// The slide vector the heads read.
    pub space: String,
    /// Zero-shot, when an alignment checkpoint and prompt set are there.
    pub zero_shot: Option<ZeroShotRow>,
    /// Why zero-shot is missing, when it is.
    pub zero_shot_note: Option<String>,
    /// Few-shot points.
    pub few_shot: Vec<FewShotPoint>,
    /// Cross-validated heads.
    pub supervised: Vec<CvResult>,
    /// Seconds taken.
    pub seconds: f64,
}

fn kind_name(k: HeadKind) -> &'static str {
    match k {
        HeadKind::Linear => "linear probe (logistic, L2 swept)",
        HeadKind::Knn => "kNN (cosine)",
        HeadKind::Prototype => "prototype (cosine)",
        HeadKind::Abmil => "attention MIL (tiles)",
    }
}

impl Comparison {
    /// Readable text: one table, chance named.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "label `{}`: {} classes ({}), {} slides of {} patients, {} vectors\n",
            self.label,
            self.classes.len(),
            self.classes
                .iter()
                .zip(&self.support)
                .map(|(c, n)| format!("{c} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.slides,
            self.patients,
            self.space
        ));
        s.push_str(&format!(
            "chance balanced accuracy {:.3}; intervals are 95% (bootstrap over patients for scores, \
             2.5-97.5th percentile over draws for few-shot)\n\n",
            1.0 / self.classes.len() as f64
        ));
        s.push_str(&format!(
            "{:<56} {:>22} {:>22} {:>22}\n",
            "method", "balanced accuracy", "weighted F1", "macro AUROC"
        ));
        let row = |s: &mut String, name: &str, sc: &Scores| {
            s.push_str(&format!(
                "{:<56} {:>22} {:>22} {:>22}\n",
                name,
                sc.balanced_accuracy.to_string(),
                sc.weighted_f1.to_string(),
                sc.macro_auroc
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "n/a".into())
            ));
        };
        match (&self.zero_shot, &self.zero_shot_note) {
            (Some(z), _) => row(
                &mut s,
                &format!(
                    "zero-shot `{}` ({} {} slides)",
                    z.prompt_set, z.scores.report.n, z.split
                ),
                &z.scores,
            ),
            (None, Some(note)) => s.push_str(&format!("{:<56} {note}\n", "zero-shot")),
            (None, None) => {}
        }
        for p in &self.few_shot {
            let name = format!(
                "few-shot {} k={}",
                if p.kind == HeadKind::Knn {
                    "kNN".to_string()
                } else {
                    p.kind.to_string()
                },
                p.k
            );
            match &p.skipped {
                Some(why) => s.push_str(&format!("{name:<56} skipped: {why}\n")),
                None => s.push_str(&format!(
                    "{:<56} {:>22} {:>22} {:>22}\n",
                    format!("{name} ({} draws)", p.draws),
                    format!("{:.3} [{:.3}, {:.3}]", p.mean, p.low, p.high),
                    format!("sd {:.3}", p.std),
                    p.macro_auroc
                        .map(|a| format!("{a:.3} (mean)"))
                        .unwrap_or_else(|| "n/a".into())
                )),
            }
        }
        for r in &self.supervised {
            row(
                &mut s,
                &format!("{} {}-fold", kind_name(r.kind), r.folds),
                &r.scores,
            );
            if !r.lambdas.is_empty() {
                s.push_str(&format!(
                    "{:<56} penalty chosen per fold: {}\n",
                    "",
                    r.lambdas
                        .iter()
                        .map(|l| format!("{l:e}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        s.push_str(&format!("\n({:.1} s)\n", self.seconds));
        s
    }
}
