//! The service's edge: how many requests it takes at once, and the headers every response
//! carries.
//!
//! - Requests in flight (being received or worked on), all workers together, are capped at
//!   `serve.max_in_flight`; one more is answered at once with 503 `overloaded` and
//!   `Retry-After` (as text-embeddings-inference answers "model is overloaded"), before its body
//!   is read. The probes (`/healthz`, `/readyz`, `/metrics`) are not counted, so they still
//!   answer when the service is saturated.
//! - Connections, the listen backlog and the read deadlines are set on the server itself
//!   ([`crate::Service::start`]); the body deadline is in [`crate::routes::Body`].
//! - Security headers on every response: a Content-Security-Policy that allows only the page's
//!   own script, style and pictures, no framing, no MIME sniffing, no referrer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{DefaultHeaders, Next};
use actix_web::{web, ResponseError};

use crate::error::ApiError;

/// The page's policy: its script and style are files of this server (`/app.js`, `/app.css`),
/// pictures and API calls go to this server only, nothing may frame it.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The headers added to every response (unless a handler set its own).
pub fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add(("Content-Security-Policy", CONTENT_SECURITY_POLICY))
        .add(("X-Content-Type-Options", "nosniff"))
        .add(("X-Frame-Options", "DENY"))
        .add(("Referrer-Policy", "no-referrer"))
}

/// Paths that are never refused for load: the probes an orchestrator depends on.
pub const EXEMPT: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

/// The count of requests in flight, shared by every worker.
#[derive(Debug)]
pub struct InFlight {
    now: AtomicUsize,
    max: usize,
}

impl InFlight {
    pub fn new(max: usize) -> Arc<InFlight> {
        Arc::new(InFlight {
            now: AtomicUsize::new(0),
            max,
        })
    }

    /// Requests in flight now.
    pub fn current(&self) -> usize {
        self.now.load(Ordering::Relaxed)
    }

    /// A slot, or None when all `max` are taken.
    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.now
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// One request's place; released when the request's handling ends (dropped, also on error or
/// when the client goes away).
struct Slot(Arc<InFlight>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Admits a request if a slot is free (or it is a probe), else answers 503 with `Retry-After`.
pub async fn admit(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let Some(in_flight) = req.app_data::<web::Data<InFlight>>().cloned() else {
        return Ok(next.call(req).await?.map_into_boxed_body());
    };
    if EXEMPT.contains(&req.path()) {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    let Some(_slot) = in_flight.clone().into_inner().try_acquire() else {
        let e = ApiError::Overloaded(format!(
            "the service is overloaded: {} requests in flight (serve.max_in_flight); retry later",
            in_flight.max
        ));
        tracing::warn!("refused {} {}: {e}", req.method(), req.path());
        return Ok(req.into_response(e.error_response()));
    };
    Ok(next.call(req).await?.map_into_boxed_body())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_and_released() {
        let f = InFlight::new(2);
        let a = f.try_acquire().expect("first");
        let b = f.try_acquire().expect("second");
        assert!(f.try_acquire().is_none(), "a third is over the cap");
        assert_eq!(f.current(), 2);
        drop(a);
        assert_eq!(f.current(), 1);
        let _c = f.try_acquire().expect("a released slot is free again");
        drop(b);
        assert_eq!(f.current(), 1);
    }
}
