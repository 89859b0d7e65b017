//! Class embeddings from prompts, and probabilities from cosine similarities (spec section 6).
//!
//! Class embedding = mean over (names x templates) of the L2-normalised text embeddings,
//! renormalised (MI-Zero, CONCH, TITAN). Probabilities = softmax(logit_scale x cosine) with the
//! alignment's trained logit scale ([`Temperature::LogitScale`]); TITAN instead takes the
//! softmax over the raw cosines ([`Temperature::None`]), which ranks the same but gives flatter
//! probabilities. Mutation answers are the two-way softmax of the mutated against the
//! wild-type embedding of each gene.
//!
//! The text encoder is not part of this crate: callers pass an [`Embed`] function (a closure
//! over their encoder and alignment head) that maps texts to joint-space vectors.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{EmbedError, Result, ZeroShotError};
use crate::prompts::{prompts, GenePrompts, MutationSet, SubtypeSet};

/// Texts in, one vector per text out (any norm: they are normalised here). Errors are reported
/// as [`ZeroShotError::Embed`].
pub trait Embed {
    /// One vector per text of `texts`, in order; an `Err` is the embedder's own error.
    fn embed(&mut self, texts: &[String]) -> std::result::Result<Vec<Vec<f32>>, EmbedError>;
}

impl<F, E> Embed for F
where
    F: FnMut(&[String]) -> std::result::Result<Vec<Vec<f32>>, E>,
    E: Into<EmbedError>,
{
    fn embed(&mut self, texts: &[String]) -> std::result::Result<Vec<Vec<f32>>, EmbedError> {
        self(texts).map_err(Into::into)
    }
}

/// Texts per call of the embedding function.
pub const EMBED_BATCH: usize = 64;

/// How cosines become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Temperature {
    /// softmax(scale x cosine) with the alignment's `exp(logit_scale)` (CLIP, MI-Zero).
    LogitScale(f32),
    /// softmax(cosine), no temperature (TITAN).
    None,
}

impl Temperature {
    fn scale(self) -> f32 {
        match self {
            Temperature::LogitScale(s) => s,
            Temperature::None => 1.0,
        }
    }
}

/// Unit-norm embeddings of a set of texts, computed once and looked up by text (prompt sets
/// share many prompts; the MI-Zero protocol re-averages subsets of them 50 times).
#[derive(Debug, Clone, Default)]
pub struct TextEmbeddings {
    vectors: HashMap<String, Vec<f32>>,
    dim: usize,
}

impl TextEmbeddings {
    /// Embeds `texts` (deduplicated, in batches of [`EMBED_BATCH`]) and L2-normalises them.
    pub fn compute(texts: &[String], embed: &mut dyn Embed) -> Result<Self> {
        let mut out = TextEmbeddings::default();
        out.extend(texts, embed)?;
        Ok(out)
    }

    /// Adds the texts not embedded yet.
    pub fn extend(&mut self, texts: &[String], embed: &mut dyn Embed) -> Result<()> {
        let mut todo: Vec<String> = Vec::new();
        for t in texts {
            if !self.vectors.contains_key(t) && !todo.contains(t) {
                todo.push(t.clone());
            }
        }
        for chunk in todo.chunks(EMBED_BATCH) {
            let vectors = embed.embed(chunk).map_err(ZeroShotError::Embed)?;
            if vectors.len() != chunk.len() {
                return Err(ZeroShotError::Embed(
                    format!("{} vectors for {} texts", vectors.len(), chunk.len()).into(),
                ));
            }
            for (t, v) in chunk.iter().zip(vectors) {
                if self.dim == 0 {
                    self.dim = v.len();
                }
                if v.len() != self.dim || v.is_empty() {
                    return Err(ZeroShotError::Embed(
                        format!("vector of {} values, expected {}", v.len(), self.dim).into(),
                    ));
                }
                self.vectors.insert(t.clone(), normalized(&v, t)?);
            }
        }
        Ok(())
    }

    /// The unit vector of `text`, if embedded.
    pub fn get(&self, text: &str) -> Option<&[f32]> {
        self.vectors.get(text).map(Vec::as_slice)
    }

    /// Mean of the unit vectors of `texts`, renormalised (all must be embedded).
    pub fn mean(&self, texts: &[String]) -> Result<Vec<f32>> {
        if texts.is_empty() {
            return Err(ZeroShotError::Input("no prompts to average".into()));
        }
        let mut acc = vec![0f64; self.dim];
        for t in texts {
            let v = self
                .get(t)
                .ok_or_else(|| ZeroShotError::Input(format!("prompt {t:?} was not embedded")))?;
            for (a, x) in acc.iter_mut().zip(v) {
                *a += *x as f64;
            }
        }
        let mean: Vec<f32> = acc
            .iter()
            .map(|a| (*a / texts.len() as f64) as f32)
            .collect();
        normalized(&mean, "the mean of the prompts")
    }
}

/// `v / ||v||`, an error for a zero or non-finite vector.
pub fn normalized(v: &[f32], what: &str) -> Result<Vec<f32>> {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if !(norm.is_finite() && norm > 0.0) {
        return Err(ZeroShotError::Input(format!(
            "embedding of {what:?} has norm {norm} (zero or not finite)"
        )));
    }
    Ok(v.iter().map(|x| (*x as f64 / norm) as f32).collect())
}

/// Cosine similarity of two vectors (0 when either is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (*x as f64, *y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    (ab / (aa.sqrt() * bb.sqrt())) as f32
}

/// Numerically stable softmax of `scale x values`.
pub fn softmax(values: &[f32], scale: f32) -> Vec<f32> {
    let max = values
        .iter()
        .map(|v| v * scale)
        .fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = values
        .iter()
        .map(|v| ((v * scale - max) as f64).exp())
        .collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| (x / sum) as f32).collect()
}

/// The embedding of each class of a task, unit norm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassEmbeddings {
    /// Class labels, in class order.
    pub labels: Vec<String>,
    /// One unit-norm vector per class, in class order.
    pub vectors: Vec<Vec<f32>>,
    /// Prompts averaged per class (names x templates).
    pub prompts_per_class: Vec<usize>,
}

impl ClassEmbeddings {
    /// Class embeddings from per-class name pools and templates, with embeddings already
    /// computed in `texts`.
    pub fn from_pools(
        labels: &[String],
        names: &[Vec<String>],
        templates: &[String],
        texts: &TextEmbeddings,
    ) -> Result<Self> {
        let mut vectors = Vec::with_capacity(labels.len());
        let mut counts = Vec::with_capacity(labels.len());
        for pool in names {
            let p = prompts(pool, templates);
            vectors.push(texts.mean(&p)?);
            counts.push(p.len());
        }
        Ok(ClassEmbeddings {
            labels: labels.to_vec(),
            vectors,
            prompts_per_class: counts,
        })
    }

    /// Width of the vectors.
    pub fn dim(&self) -> usize {
        self.vectors.first().map_or(0, Vec::len)
    }

    /// Cosine of `embedding` with each class.
    pub fn cosines(&self, embedding: &[f32]) -> Result<Vec<f32>> {
        if embedding.len() != self.dim() {
            return Err(ZeroShotError::Input(format!(
                "embedding of {} values, class embeddings have {}",
                embedding.len(),
                self.dim()
            )));
        }
        Ok(self.vectors.iter().map(|c| cosine(embedding, c)).collect())
    }

    /// Class probabilities of one slide embedding.
    pub fn probabilities(&self, embedding: &[f32], temperature: Temperature) -> Result<Vec<f32>> {
        Ok(softmax(&self.cosines(embedding)?, temperature.scale()))
    }

    /// Probabilities, the predicted class and the cosines of one slide embedding.
    pub fn classify(&self, embedding: &[f32], temperature: Temperature) -> Result<Prediction> {
        let cosines = self.cosines(embedding)?;
        let probabilities = softmax(&cosines, temperature.scale());
        let index = argmax(&probabilities);
        Ok(Prediction {
            label: self.labels[index].clone(),
            index,
            probabilities,
            cosines,
        })
    }
}

/// One zero-shot answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The predicted class's label.
    pub label: String,
    /// The predicted class's index in the labels.
    pub index: usize,
    /// Softmax of the scaled cosines, one per class, summing to 1.
    pub probabilities: Vec<f32>,
    /// Cosine of the embedding with each class, in [-1, 1].
    pub cosines: Vec<f32>,
}

/// Index of the largest value (the first on ties).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

impl SubtypeSet {
    /// Every prompt of the set (names x templates of every class).
    pub fn all_prompts(&self) -> Vec<String> {
        self.classes
            .iter()
            .flat_map(|c| prompts(&c.names, &self.templates))
            .collect()
    }

    /// The class embeddings of the full set (all names, all templates).
    pub fn class_embeddings(&self, embed: &mut dyn Embed) -> Result<ClassEmbeddings> {
        let texts = TextEmbeddings::compute(&self.all_prompts(), embed)?;
        self.class_embeddings_from(&texts)
    }

    /// The class embeddings from prompt embeddings computed earlier.
    pub fn class_embeddings_from(&self, texts: &TextEmbeddings) -> Result<ClassEmbeddings> {
        let names: Vec<Vec<String>> = self.classes.iter().map(|c| c.names.clone()).collect();
        ClassEmbeddings::from_pools(&self.labels(), &names, &self.templates, texts)
    }
}

/// The two embeddings of one gene.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneEmbeddings {
    /// The gene's name (`EGFR`, ...).
    pub gene: String,
    /// Unit-norm embedding of its mutated phrasings.
    pub mutated: Vec<f32>,
    /// Unit-norm embedding of its wild-type phrasings.
    pub wild_type: Vec<f32>,
}

impl GeneEmbeddings {
    /// P(mutated) of a slide: the two-way softmax of its cosines with the mutated and the
    /// wild-type embedding.
    pub fn probability(&self, embedding: &[f32], temperature: Temperature) -> Result<f32> {
        if embedding.len() != self.mutated.len() {
            return Err(ZeroShotError::Input(format!(
                "embedding of {} values, gene embeddings have {}",
                embedding.len(),
                self.mutated.len()
            )));
        }
        let c = [
            cosine(embedding, &self.mutated),
            cosine(embedding, &self.wild_type),
        ];
        Ok(softmax(&c, temperature.scale())[0])
    }
}

impl MutationSet {
    /// Embeddings of the named genes (all for `None`): each phrasing pool x the templates.
    pub fn gene_embeddings(
        &self,
        genes: Option<&[String]>,
        embed: &mut dyn Embed,
    ) -> Result<Vec<GeneEmbeddings>> {
        let selected: Vec<&GenePrompts> = self.select(genes)?;
        let all: Vec<String> = selected
            .iter()
            .flat_map(|g| {
                prompts(&g.mutated, &self.templates)
                    .into_iter()
                    .chain(prompts(&g.wild_type, &self.templates))
            })
            .collect();
        let texts = TextEmbeddings::compute(&all, embed)?;
        selected
            .iter()
            .map(|g| {
                Ok(GeneEmbeddings {
                    gene: g.gene.clone(),
                    mutated: texts.mean(&prompts(&g.mutated, &self.templates))?,
                    wild_type: texts.mean(&prompts(&g.wild_type, &self.templates))?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::ClassPrompts;

    /// A toy "encoder": counts of the letters a, b, c (plus a constant) - enough to check the
    /// averaging and the scoring by hand.
    fn letters(texts: &[String]) -> std::result::Result<Vec<Vec<f32>>, String> {
        Ok(texts
            .iter()
            .map(|t| {
                let n = |ch| t.chars().filter(|&c| c == ch).count() as f32;
                vec![n('a'), n('b'), n('c'), 0.5]
            })
            .collect())
    }

    fn set() -> SubtypeSet {
        SubtypeSet::inline(
            "toy",
            vec![
                ClassPrompts {
                    label: "A".into(),
                    names: vec!["aaa".into(), "aa".into()],
                },
                ClassPrompts {
                    label: "B".into(),
                    names: vec!["bbb".into()],
                },
                ClassPrompts {
                    label: "C".into(),
                    names: vec!["ccc".into()],
                },
            ],
            vec!["CLASSNAME".into(), "x CLASSNAME".into()],
        )
        .unwrap()
    }

    #[test]
    fn class_embedding_is_the_renormalised_mean_of_unit_prompts() {
        let mut calls = 0;
        let mut embed = |t: &[String]| {
            calls += 1;
            letters(t)
        };
        let ce = set().class_embeddings(&mut embed).unwrap();
        assert_eq!(calls, 1, "one batch for 8 prompts");
        assert_eq!(ce.prompts_per_class, [4, 2, 2]);
        // Class A: "aaa" -> (3,0,0,.5)/|.|, "aa" -> (2,0,0,.5)/|.|, each twice; mean, renormalised.
        let u = |a: f32| {
            let n = (a * a + 0.25f32).sqrt();
            [a / n, 0.5 / n]
        };
        let (p, q) = (u(3.0), u(2.0));
        let m = [(p[0] + q[0]) / 2.0, (p[1] + q[1]) / 2.0];
        let n = (m[0] * m[0] + m[1] * m[1]).sqrt();
        assert!((ce.vectors[0][0] - m[0] / n).abs() < 1e-6);
        assert!((ce.vectors[0][3] - m[1] / n).abs() < 1e-6);
        let norm: f32 = ce.vectors[1].iter().map(|v| v * v).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }

    #[test]
    fn probabilities_follow_the_temperature() {
        let ce = set().class_embeddings(&mut letters).unwrap();
        let slide = [0.1, 2.0, 0.0, 0.5];
        let sharp = ce.classify(&slide, Temperature::LogitScale(100.0)).unwrap();
        let flat = ce.classify(&slide, Temperature::None).unwrap();
        assert_eq!((sharp.label.as_str(), flat.label.as_str()), ("B", "B"));
        assert!(sharp.probabilities[1] > 0.99);
        assert!(flat.probabilities[1] < 0.6, "{:?}", flat.probabilities);
        let sum: f32 = flat.probabilities.iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
        // softmax(cos) with no temperature, checked by hand.
        let e: Vec<f64> = flat.cosines.iter().map(|c| (*c as f64).exp()).collect();
        let s: f64 = e.iter().sum();
        assert!((flat.probabilities[0] as f64 - e[0] / s).abs() < 1e-6);
        assert!(ce.probabilities(&[1.0, 2.0], Temperature::None).is_err());
    }

    #[test]
    fn mutation_probability_is_a_two_way_softmax() {
        let g = GeneEmbeddings {
            gene: "KRAS".into(),
            mutated: vec![1.0, 0.0],
            wild_type: vec![0.0, 1.0],
        };
        let p = g
            .probability(&[1.0, 1.0], Temperature::LogitScale(50.0))
            .unwrap();
        assert!((p - 0.5).abs() < 1e-6);
        let p = g
            .probability(&[0.9, 0.1], Temperature::LogitScale(10.0))
            .unwrap();
        let c1 = 0.9 / (0.82f64).sqrt();
        let c2 = 0.1 / (0.82f64).sqrt();
        let expected = 1.0 / (1.0 + (10.0 * (c2 - c1)).exp());
        assert!((p as f64 - expected).abs() < 1e-5, "{p} vs {expected}");
    }

    #[test]
    fn embedder_failures_and_bad_vectors_are_errors() {
        let mut failing = |_: &[String]| Err::<Vec<Vec<f32>>, String>("model not loaded".into());
        let err = set()
            .class_embeddings(&mut failing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model not loaded"), "{err}");
        let mut zeros = |t: &[String]| Ok::<_, String>(vec![vec![0.0f32; 3]; t.len()]);
        let err = set().class_embeddings(&mut zeros).unwrap_err().to_string();
        assert!(err.contains("norm 0"), "{err}");
        let mut short = |_: &[String]| Ok::<_, String>(vec![vec![1.0f32; 3]]);
        assert!(set().class_embeddings(&mut short).is_err());
    }
}
