//! What every handler shares: the configuration, the opened pipeline (store + encoders, one
//! runtime for all store calls), the prompt library, caches, metrics, and helpers that run
//! model and store work off the HTTP threads under the request timeout.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use gigapath_pipeline::encoders::{slide_fingerprints, text_fingerprints};
use gigapath_pipeline::{Config, Pipeline};
use gigapath_store::vector::combined_fingerprint;
use gigapath_zeroshot::{ClassEmbeddings, GeneEmbeddings, PromptLibrary, Temperature};

use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;

/// Fingerprints the stored points must carry for the loaded models.
#[derive(Debug, Clone)]
pub struct Fingerprints {
    /// `slides` points (tile + slide [+ alignment]).
    pub slides: String,
    /// The tile encoder's own (feature files are keyed by it).
    pub tile: String,
    /// `reports` points (text [+ alignment]).
    pub reports: String,
}

pub struct AppState {
    pub config: Config,
    pub pipeline: Arc<Pipeline>,
    pub metrics: Arc<Metrics>,
    pub prompts: PromptLibrary,
    fingerprints: OnceLock<Fingerprints>,
    /// Class / gene embeddings per prompt set: computed once per (set, text model, alignment),
    /// which are fixed for the life of the process.
    pub class_cache: Mutex<HashMap<String, Arc<ClassEmbeddings>>>,
    pub gene_cache: Mutex<HashMap<String, Arc<Vec<GeneEmbeddings>>>>,
}

impl AppState {
    pub fn new(
        config: Config,
        pipeline: Arc<Pipeline>,
        metrics: Arc<Metrics>,
        prompts: PromptLibrary,
    ) -> AppState {
        AppState {
            config,
            pipeline,
            metrics,
            prompts,
            fingerprints: OnceLock::new(),
            class_cache: Mutex::new(HashMap::new()),
            gene_cache: Mutex::new(HashMap::new()),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.config.serve.request_timeout_seconds)
    }

    /// Runs a store future on the pipeline's runtime, within the request timeout.
    pub async fn store<F, T>(&self, f: F) -> ApiResult<T>
    where
        F: Future<Output = Result<T, gigapath_store::StoreError>> + Send + 'static,
        T: Send + 'static,
    {
        match tokio::time::timeout(self.timeout(), self.pipeline.spawn(f)).await {
            Ok(joined) => Ok(joined??),
            Err(_) => Err(ApiError::Unavailable(
                "the store did not answer within the request timeout".into(),
            )),
        }
    }

    /// Runs CPU-bound model work on the blocking pool, within the request timeout.
    pub async fn compute<F, T>(&self, f: F) -> ApiResult<T>
    where
        F: FnOnce(&Pipeline) -> ApiResult<T> + Send + 'static,
        T: Send + 'static,
    {
        let pipeline = self.pipeline.clone();
        match tokio::time::timeout(self.timeout(), actix_web::web::block(move || f(&pipeline)))
            .await
        {
            Ok(done) => done?,
            Err(_) => Err(ApiError::Unavailable(
                "the models did not finish within the request timeout".into(),
            )),
        }
    }

    /// The guard fingerprints for the configured models (hashing the weight files once).
    pub async fn fingerprints(&self) -> ApiResult<Fingerprints> {
        if let Some(f) = self.fingerprints.get() {
            return Ok(f.clone());
        }
        let models = self.config.models.clone();
        let f = self
            .compute(move |_| {
                let roles = slide_fingerprints(&models).unwrap_or_default();
                Ok(Fingerprints {
                    slides: if roles.is_empty() {
                        String::new()
                    } else {
                        combined_fingerprint(&roles)
                    },
                    tile: roles.get("tile").cloned().unwrap_or_default(),
                    reports: combined_fingerprint(&text_fingerprints(&models)?),
                })
            })
            .await?;
        Ok(self.fingerprints.get_or_init(|| f).clone())
    }

    /// Raw text embeddings of `texts` (text encoder output, as stored in `reports.text`).
    pub async fn embed_texts(&self, texts: Vec<String>) -> ApiResult<Vec<Vec<f32>>> {
        self.compute(move |p| Ok(p.text_model()?.encode(&texts)?))
            .await
    }

    /// Joint (aligned) embeddings of `texts`, or 409 without an alignment checkpoint.
    pub async fn joint_texts(
        &self,
        texts: Vec<String>,
        what: &'static str,
    ) -> ApiResult<Vec<Vec<f32>>> {
        self.compute(move |p| joint_texts(p, &texts, what)).await
    }

    /// The alignment's logit scale (`exp` of the learned log scale, clamped at 100).
    pub async fn logit_scale(&self, what: &'static str) -> ApiResult<f32> {
        self.compute(move |p| Ok(alignment(p, what)?.alignment.logit_scale()))
            .await
    }

    /// The class embeddings of a prompt set, cached.
    pub async fn class_embeddings(
        &self,
        set: gigapath_zeroshot::SubtypeSet,
        cache: bool,
    ) -> ApiResult<Arc<ClassEmbeddings>> {
        let key = set.name.clone();
        if cache {
            if let Some(c) = self
                .class_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
            {
                return Ok(c.clone());
            }
        }
        // Inline templates can repeat CLASSNAME: filled prompts are cut at the query text limit
        // (the text encoder would truncate them anyway), so a small body stays a small job.
        let max_chars = self.config.serve.max_text_chars;
        let classes = self
            .compute(move |p| {
                let mut embed = |texts: &[String]| {
                    let cut: Vec<String> = texts
                        .iter()
                        .map(|t| t.chars().take(max_chars).collect())
                        .collect();
                    joint_texts(p, &cut, "zero-shot").map_err(|e| e.to_string())
                };
                set.class_embeddings(&mut embed).map_err(zeroshot_error)
            })
            .await?;
        let classes = Arc::new(classes);
        if cache {
            self.class_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, classes.clone());
        }
        Ok(classes)
    }

    /// Gene embeddings of a mutation set (all genes), cached.
    pub async fn gene_embeddings(&self, name: &str) -> ApiResult<Arc<Vec<GeneEmbeddings>>> {
        if let Some(g) = self
            .gene_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(g.clone());
        }
        let set = self.prompts.mutation(name).map_err(zeroshot_error)?.clone();
        let genes = self
            .compute(move |p| {
                let mut embed = |texts: &[String]| {
                    joint_texts(p, texts, "zero-shot").map_err(|e| e.to_string())
                };
                set.gene_embeddings(None, &mut embed)
                    .map_err(zeroshot_error)
            })
            .await?;
        let genes = Arc::new(genes);
        self.gene_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), genes.clone());
        Ok(genes)
    }

    /// The temperature of zero-shot answers.
    pub async fn temperature(&self, no_temperature: bool) -> ApiResult<Temperature> {
        if no_temperature {
            return Ok(Temperature::None);
        }
        Ok(Temperature::LogitScale(
            self.logit_scale("zero-shot").await?,
        ))
    }
}

pub fn alignment<'a>(
    p: &'a Pipeline,
    what: &str,
) -> ApiResult<&'a gigapath_pipeline::encoders::AlignmentModel> {
    p.alignment()?.ok_or_else(|| {
        ApiError::Conflict(format!(
            "{what} needs an alignment checkpoint: train one (gigapath train) and serve with models.alignment set"
        ))
    })
}

pub fn joint_texts(p: &Pipeline, texts: &[String], what: &str) -> ApiResult<Vec<Vec<f32>>> {
    let a = alignment(p, what)?;
    let text = p.text_model()?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let joint = a
        .alignment
        .text_joint(&text.encoder, &refs)
        .map_err(|e| ApiError::Internal(format!("text encoder: {e}")))?;
    joint
        .to_vec2::<f32>()
        .map_err(|e| ApiError::Internal(format!("text encoder output: {e}")))
}

/// Zero-shot errors: unknown sets are 404, bad inline prompts 400.
pub fn zeroshot_error(e: gigapath_zeroshot::ZeroShotError) -> ApiError {
    use gigapath_zeroshot::ZeroShotError as Z;
    match e {
        Z::UnknownSet { .. } => ApiError::NotFound(e.to_string()),
        Z::Input(_) | Z::Prompt { .. } => ApiError::BadRequest(e.to_string()),
        Z::Embed(m) if m.contains("alignment checkpoint") => ApiError::Conflict(m),
        other => ApiError::Internal(other.to_string()),
    }
}
