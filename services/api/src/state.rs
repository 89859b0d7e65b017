//! What every handler shares: the configuration, the opened pipeline (store + encoders, one
//! runtime for all store calls), the prompt library, caches, metrics, and helpers that run
//! model and store work off the HTTP threads under the request timeout.
//!
//! The models (encoders, alignment checkpoint), their fingerprints and the prompt-embedding
//! caches form one [`Heads`], swapped as a whole when the data dir's `gigapath.toml` names
//! another `models.alignment` (what `gigapath reembed` writes): every request is pinned to the
//! heads current when it arrived ([`pin_heads`]), so no answer mixes two checkpoints.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use gigapath_pipeline::config::DATA_DIR_CONFIG;
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

/// The models one request works with: encoders and alignment (a [`Pipeline`] over the shared
/// store), their guard fingerprints, and what was embedded with them.
pub struct Heads {
    /// The pipeline with these heads' models (sharing the service's store).
    pub pipeline: Arc<Pipeline>,
    fingerprints: OnceLock<Fingerprints>,
    /// Class / gene embeddings per prompt set: computed once per (set, heads).
    class_cache: Mutex<HashMap<String, Arc<ClassEmbeddings>>>,
    gene_cache: Mutex<HashMap<String, Arc<Vec<GeneEmbeddings>>>>,
}

impl Heads {
    fn new(pipeline: Arc<Pipeline>) -> Heads {
        Heads {
            pipeline,
            fingerprints: OnceLock::new(),
            class_cache: Mutex::new(HashMap::new()),
            gene_cache: Mutex::new(HashMap::new()),
        }
    }
}

/// What identifies one version of the data dir's config file (it is replaced by a rename).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode: m.ino(),
    })
}

/// The `models.alignment` the data dir's own config names (after the environment).
fn dir_alignment(data_dir: &Path) -> Result<Option<PathBuf>, String> {
    Config::load(Some(data_dir), None)
        .map(|c| c.models.alignment)
        .map_err(|e| e.to_string())
}

/// The data dir's config as last seen, and the heads built from it.
struct Watch {
    stamp: Option<Stamp>,
    alignment: Option<PathBuf>,
}

tokio::task_local! {
    /// The heads the current request was pinned to.
    static PINNED: Arc<Heads>;
}

/// What every handler shares: configuration, the opened store, models, metrics, prompts.
pub struct AppState {
    /// The configuration the service started with.
    pub config: Config,
    /// The pipeline opened at start: the store, its runtime, the data dir. Models come from
    /// [`AppState::heads`].
    pub pipeline: Arc<Pipeline>,
    /// The Prometheus registry.
    pub metrics: Arc<Metrics>,
    /// The prompt sets, loaded at start.
    pub prompts: PromptLibrary,
    heads: RwLock<Arc<Heads>>,
    watch: Mutex<Watch>,
}

impl AppState {
    /// State over an opened `pipeline`; the heads start from its models.
    pub fn new(
        config: Config,
        pipeline: Arc<Pipeline>,
        metrics: Arc<Metrics>,
        prompts: PromptLibrary,
    ) -> AppState {
        let file = config.store.data_dir.join(DATA_DIR_CONFIG);
        let watch = Watch {
            stamp: stamp(&file),
            alignment: dir_alignment(&config.store.data_dir).ok().flatten(),
        };
        AppState {
            config,
            heads: RwLock::new(Arc::new(Heads::new(pipeline.clone()))),
            pipeline,
            metrics,
            prompts,
            watch: Mutex::new(watch),
        }
    }

    /// The heads of this request (pinned by [`pin_heads`]), else the current ones.
    pub fn heads(&self) -> Arc<Heads> {
        PINNED
            .try_with(Arc::clone)
            .unwrap_or_else(|_| self.current_heads())
    }

    fn current_heads(&self) -> Arc<Heads> {
        self.heads.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The current heads after a look at the data dir's config: when it names another
    /// `models.alignment` than when last read (a `gigapath reembed` ran), new heads with that
    /// checkpoint replace the old ones for every later request. One `stat` when nothing changed.
    pub fn refreshed_heads(&self) -> Arc<Heads> {
        let data_dir = &self.config.store.data_dir;
        let now = stamp(&data_dir.join(DATA_DIR_CONFIG));
        let mut watch = self.watch.lock().unwrap_or_else(|e| e.into_inner());
        if now == watch.stamp {
            return self.current_heads();
        }
        watch.stamp = now;
        let alignment = match dir_alignment(data_dir) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("the data dir's config changed but does not load: {e}; serving on with the models loaded");
                return self.current_heads();
            }
        };
        if alignment == watch.alignment {
            return self.current_heads();
        }
        let current = self.current_heads();
        let mut models = current.pipeline.config.models.clone();
        models.alignment = alignment.clone();
        match current.pipeline.with_models(models) {
            Ok(p) => {
                tracing::info!(
                    "the data dir's config names alignment {}: serving with it from now on",
                    alignment
                        .as_deref()
                        .map_or("(none)".into(), |a| a.display().to_string())
                );
                watch.alignment = alignment;
                let fresh = Arc::new(Heads::new(Arc::new(p)));
                *self.heads.write().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
                fresh
            }
            Err(e) => {
                tracing::warn!("the data dir's config names another alignment that cannot be used: {e}; serving on with the models loaded");
                current
            }
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
        let pipeline = self.heads().pipeline.clone();
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
        let heads = self.heads();
        if let Some(f) = heads.fingerprints.get() {
            return Ok(f.clone());
        }
        let models = heads.pipeline.config.models.clone();
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
        Ok(heads.fingerprints.get_or_init(|| f).clone())
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
        let heads = self.heads();
        if cache {
            if let Some(c) = heads
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
                    joint_texts(p, &cut, "zero-shot")
                };
                set.class_embeddings(&mut embed).map_err(zeroshot_error)
            })
            .await?;
        let classes = Arc::new(classes);
        if cache {
            heads
                .class_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, classes.clone());
        }
        Ok(classes)
    }

    /// Gene embeddings of a mutation set (all genes), cached.
    pub async fn gene_embeddings(&self, name: &str) -> ApiResult<Arc<Vec<GeneEmbeddings>>> {
        let heads = self.heads();
        if let Some(g) = heads
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
                let mut embed = |texts: &[String]| joint_texts(p, texts, "zero-shot");
                set.gene_embeddings(None, &mut embed)
                    .map_err(zeroshot_error)
            })
            .await?;
        let genes = Arc::new(genes);
        heads
            .gene_cache
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

/// The alignment checkpoint of `p`; 409 naming `what` needs it when none is configured.
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

/// Joint-space embeddings of `texts` through `p`'s text encoder and alignment (409 without an
/// alignment, as [`alignment`]).
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

/// Zero-shot errors: unknown sets are 404, bad inline prompts 400, and an error of the
/// service's own text embedding keeps the status it was raised with (409 without an alignment
/// checkpoint), taken back by type.
pub fn zeroshot_error(e: gigapath_zeroshot::ZeroShotError) -> ApiError {
    use gigapath_zeroshot::ZeroShotError as Z;
    match e {
        Z::UnknownSet { .. } => ApiError::NotFound(e.to_string()),
        Z::Input(_) | Z::Prompt { .. } => ApiError::BadRequest(e.to_string()),
        Z::Embed(source) => match source.downcast::<ApiError>() {
            Ok(api) => *api,
            Err(other) => ApiError::Internal(format!("embedding prompts: {other}")),
        },
        other => ApiError::Internal(other.to_string()),
    }
}

/// Middleware: pins each request to the heads current when it arrives (after a look at the
/// data dir's config), so that its fingerprints and its embeddings come from one checkpoint.
pub async fn pin_heads(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let heads = req
        .app_data::<actix_web::web::Data<AppState>>()
        .map(|s| s.refreshed_heads());
    match heads {
        Some(h) => PINNED.scope(h, next.call(req)).await,
        None => next.call(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gigapath_zeroshot::ZeroShotError;

    #[test]
    fn an_embedder_error_keeps_its_status_through_the_zero_shot_crate() {
        let conflict = ApiError::Conflict("zero-shot needs an alignment checkpoint".into());
        match zeroshot_error(ZeroShotError::Embed(Box::new(conflict))) {
            ApiError::Conflict(m) => assert_eq!(m, "zero-shot needs an alignment checkpoint"),
            other => panic!("not a conflict: {other:?}"),
        }
        let bad = ApiError::BadRequest("text too long".into());
        assert!(matches!(
            zeroshot_error(ZeroShotError::Embed(Box::new(bad))),
            ApiError::BadRequest(_)
        ));
        // Anything else the embedder says is the service's own failure, not the caller's.
        let other = ZeroShotError::Embed("3 vectors for 4 texts".into());
        match zeroshot_error(other) {
            ApiError::Internal(m) => assert!(m.contains("3 vectors for 4 texts"), "{m}"),
            e => panic!("not internal: {e:?}"),
        }
    }
}
