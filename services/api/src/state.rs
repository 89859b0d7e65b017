//! What every handler shares: the configuration, the opened pipeline (store + encoders, one
//! runtime for all store calls), metrics, and helpers that run model and store work off the
//! HTTP threads with the request timeout.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use gigapath_pipeline::{Config, Pipeline};

use crate::error::{ApiError, ApiResult};
use crate::metrics::Metrics;

pub struct AppState {
    pub config: Config,
    pub pipeline: Arc<Pipeline>,
    pub metrics: Arc<Metrics>,
}

impl AppState {
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

    /// Raw text embeddings of `texts` (text encoder output, as stored in `reports.text`).
    pub async fn embed_texts(&self, texts: Vec<String>) -> ApiResult<Vec<Vec<f32>>> {
        self.compute(move |p| Ok(p.text_model()?.encode(&texts)?))
            .await
    }
}
