//! The gigapath HTTP service (actix-web, JSON under `/v1`, OpenAPI at `/v1/openapi.json`):
//! text-to-slide search, report search, zero-shot subtyping and mutation prompts, slide
//! metadata and pictures, ingest endpoints that queue work, health, readiness and metrics.
//!
//! Not for: computing anything itself. Handlers validate, call the pipeline / store / models, and
//! map results; errors become HTTP statuses in one place ([`error`]). Store calls run on the
//! pipeline's runtime and model work on the blocking pool, both under the request timeout.
//!
//! With the embedded vector store one process holds the data dir, so the service runs the ingest
//! worker itself (`serve.run_worker`); with a Qdrant server and a Postgres catalog, separate
//! `gigapath worker` processes can do it instead.

pub mod auth;
pub mod client;
pub mod error;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod state;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{get, web, App, HttpRequest, HttpResponse, HttpServer};
use gigapath_pipeline::{Config, Pipeline, Progress};
use gigapath_zeroshot::PromptLibrary;
use utoipa::OpenApi;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::state::AppState;

/// The OpenAPI document, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(title = "gigapath", description = "Whole-slide pathology search and zero-shot prediction over Prov-GigaPath embeddings."),
    paths(
        routes::health::healthz, routes::health::readyz, routes::health::metrics,
        routes::slides::get_slide, routes::slides::picture, routes::slides::delete_slide, routes::slides::heatmap,
        routes::search::search_slides, routes::search::search_reports,
        routes::ingest::ingest, routes::ingest::status,
        routes::jobs::list_jobs, routes::jobs::retry_job, routes::jobs::cancel_job,
        routes::zeroshot::prompt_sets, routes::zeroshot::subtype, routes::zeroshot::mutation,
        routes::classify::classify, routes::classify::probes, routes::classify::attention,
        openapi_json,
    ),
    modifiers(&SecurityAddon)
)]
pub struct ApiDoc;

struct SecurityAddon;

impl utoipa::Modify for SecurityAddon {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))),
        );
    }
}

/// The web page: search, results with thumbnails, a slide view with its tissue overlay,
/// zero-shot probabilities and a prompt heatmap. Self-contained (no external scripts or fonts);
/// its script and style are files of their own ([`app_js`], [`app_css`]), so that the
/// Content-Security-Policy needs no inline allowance ([`limits::CONTENT_SECURITY_POLICY`]).
#[get("/")]
pub async fn index() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("../static/index.html"))
}

/// The page's script.
#[get("/app.js")]
pub async fn app_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(include_str!("../static/app.js"))
}

/// The page's style sheet.
#[get("/app.css")]
pub async fn app_css() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .body(include_str!("../static/app.css"))
}

/// This document, with this server's limits (see [`openapi`]).
#[utoipa::path(responses((status = 200, body = Object)))]
#[get("/v1/openapi.json")]
pub async fn openapi_json(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(openapi::document(&state.config.serve))
}

/// Registers every route, the JSON limits and error mapping, on an actix app.
pub fn configure(state: web::Data<AppState>) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let limit = state.config.serve.max_body_bytes;
        cfg.app_data(state)
            .app_data(
                web::JsonConfig::default()
                    .limit(limit)
                    .error_handler(json_error),
            )
            .app_data(
                web::PathConfig::default()
                    .error_handler(|e, _| ApiError::BadRequest(e.to_string()).into()),
            )
            .app_data(web::PayloadConfig::default().limit(limit))
            .service(routes::health::healthz)
            .service(routes::health::readyz)
            .service(routes::health::metrics)
            .service(openapi_json)
            .service(routes::search::search_slides)
            .service(routes::search::search_reports)
            .service(routes::ingest::ingest)
            .service(routes::ingest::status)
            .service(routes::jobs::list_jobs)
            .service(routes::jobs::retry_job)
            .service(routes::jobs::cancel_job)
            .service(routes::slides::get_slide)
            .service(routes::slides::picture)
            .service(routes::slides::delete_slide)
            .service(routes::slides::heatmap)
            .service(routes::zeroshot::prompt_sets)
            .service(routes::zeroshot::subtype)
            .service(routes::zeroshot::mutation)
            .service(routes::classify::classify)
            .service(routes::classify::probes)
            .service(routes::classify::attention)
            .service(index)
            .service(app_js)
            .service(app_css)
            .default_service(web::to(not_found));
    }
}

fn json_error(err: actix_web::error::JsonPayloadError, _req: &HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as E;
    match &err {
        E::Overflow { limit } | E::OverflowKnownLength { limit, .. } => {
            ApiError::PayloadTooLarge(format!("request body over the {limit}-byte limit")).into()
        }
        E::ContentType => {
            ApiError::BadRequest("expected Content-Type: application/json".into()).into()
        }
        E::Deserialize(e) => ApiError::BadRequest(format!("invalid JSON body: {e}")).into(),
        other => ApiError::BadRequest(format!("invalid request body: {other}")).into(),
    }
}

/// Unknown paths are 404; known paths asked with another method 405, with `Allow`.
async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    let allowed = openapi::allowed_methods(req.path());
    if !allowed.is_empty() && !allowed.contains(req.method().as_str()) {
        let allow = allowed.into_iter().collect::<Vec<_>>().join(", ");
        return Err(ApiError::MethodNotAllowed {
            message: format!(
                "{} {} is not served; allowed: {allow}",
                req.method(),
                req.path()
            ),
            allow,
        });
    }
    Err(ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.path()
    )))
}

/// Counts and times every request by its route pattern.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let start = Instant::now();
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let res = next.call(req).await?;
    if let Some(m) = metrics {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        m.observe(&route, res.status().as_u16(), start.elapsed().as_secs_f64());
    }
    Ok(res)
}

/// A running service.
pub struct Service {
    /// The address it listens on (the real port when `bind` asked for port 0).
    pub addr: SocketAddr,
    /// The shared state its handlers see.
    pub state: web::Data<AppState>,
    handle: ServerHandle,
    server: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    worker: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

/// Counts the worker's slides for `/metrics`.
struct WorkerProgress(Arc<Metrics>);

impl Progress for WorkerProgress {
    fn slide_finished(&self, _slide_id: &str, error: Option<&str>) {
        let c = if error.is_none() {
            &self.0.slides_embedded_by_worker
        } else {
            &self.0.slides_failed_by_worker
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl Service {
    /// Opens the data dir of `config`, starts the worker (if configured) and the HTTP server on
    /// `config.serve.bind` (port 0: any free port; see `addr`). Call from a plain thread.
    pub fn start(config: Config) -> Result<Service, ApiError> {
        // Prompt sets are validated before anything else starts: a bad file is a startup error.
        // The default `prompts` means "the usual place" (GIGAPATH_PROMPTS_DIR, ./prompts, the
        // checkout's), as for `gigapath eval`; any other folder is taken as given.
        let dir = if config.serve.prompts_dir == std::path::Path::new("prompts") {
            PromptLibrary::default_dir()
        } else {
            config.serve.prompts_dir.clone()
        };
        let prompts = PromptLibrary::load(&dir)
            .map_err(|e| ApiError::BadRequest(format!("prompt sets: {e}")))?;
        // Startup errors keep their detail (an `Internal` error would print as "internal error").
        let pipeline = Arc::new(Pipeline::open(config.clone()).map_err(|e| {
            ApiError::Unavailable(format!(
                "cannot open the data dir {}: {e}",
                config.store.data_dir.display()
            ))
        })?);
        let metrics = Arc::new(Metrics::default());
        let state = web::Data::new(AppState::new(
            config.clone(),
            pipeline.clone(),
            metrics.clone(),
            prompts,
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let worker = config.serve.run_worker.then(|| {
            let (pipeline, stop, metrics) = (pipeline.clone(), stop.clone(), metrics.clone());
            std::thread::Builder::new()
                .name("ingest-worker".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) =
                            pipeline.work(&WorkerProgress(metrics.clone()), &stop, false)
                        {
                            tracing::error!("ingest worker: {e}; retrying in 5 s");
                            std::thread::sleep(Duration::from_secs(5));
                        }
                    }
                })
                .expect("worker thread starts")
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let server_state = state.clone();
        let bind = config.serve.bind.clone();
        let serve = config.serve.clone();
        let read_timeout = Duration::from_secs(serve.read_timeout_seconds);
        let in_flight = web::Data::from(limits::InFlight::new(serve.max_in_flight));
        let workers = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2);
        // actix counts connections per worker; serve.max_connections is for them all.
        let per_worker = serve.max_connections.div_ceil(workers).max(1);
        let server = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    // Outermost first: security headers on every answer (also 503s), then
                    // metrics (they count refusals), the payload holder (also for refused and
                    // exempt requests), then the in-flight cap.
                    let server = HttpServer::new(move || {
                        App::new()
                            .app_data(in_flight.clone())
                            .wrap(from_fn(state::pin_heads))
                            .wrap(from_fn(limits::admit))
                            .wrap(from_fn(limits::hold_payload))
                            .wrap(from_fn(observe))
                            .wrap(limits::security_headers())
                            .configure(configure(server_state.clone()))
                    })
                    .client_request_timeout(read_timeout)
                    .client_disconnect_timeout(Duration::from_secs(1))
                    .max_connections(per_worker)
                    .backlog(u32::try_from(serve.backlog).unwrap_or(u32::MAX))
                    .shutdown_timeout(5)
                    .workers(workers)
                    .bind(&bind);
                    let server = match server {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = tx.send(Err(format!("cannot listen on {bind}: {e}")));
                            return Ok(());
                        }
                    };
                    let addr = server.addrs()[0];
                    let running = server.run();
                    let _ = tx.send(Ok((addr, running.handle())));
                    running.await
                })
            })
            .expect("http thread starts");
        let (addr, handle) = match rx.recv() {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                return Err(ApiError::Unavailable(e));
            }
            Err(_) => {
                return Err(ApiError::Internal(
                    "the HTTP server thread ended at start".into(),
                ))
            }
        };
        Ok(Service {
            addr,
            state,
            handle,
            server: Some(server),
            worker,
            stop,
        })
    }

    /// Blocks until the server stops (Ctrl-C / SIGTERM), then stops the worker.
    pub fn wait(mut self) {
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        self.shutdown();
    }

    /// Stops the server and the worker.
    pub fn stop(mut self) {
        let handle = self.handle.clone();
        let _ =
            std::thread::spawn(move || actix_web::rt::System::new().block_on(handle.stop(true)))
                .join();
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
