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
//! - A request body the handler did not read (to its end) closes the connection after the
//!   answer: actix would otherwise drain a chunked body to keep the connection, for as long as
//!   a client trickles it ([`hold_payload`]).
//! - Security headers on every response: a Content-Security-Policy that allows only the page's
//!   own script, style and pictures, no framing, no MIME sniffing, no referrer.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header;
use actix_web::middleware::{DefaultHeaders, Next};
use actix_web::web::Bytes;
use actix_web::{web, ResponseError};
use futures_core::Stream;

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
    /// A counter at 0 that refuses requests beyond `max` in flight.
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

/// The request's payload, read by the handler through [`SharedPayload`] and held by the
/// response body ([`HoldPayload`]) until the answer is sent.
type Held = Rc<RefCell<Payload>>;

struct SharedPayload(Held);

impl Stream for SharedPayload {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut payload = self.0.borrow_mut();
        Pin::new(&mut *payload).poll_next(cx)
    }
}

/// A response body that keeps the request payload alive until it is sent: actix then sees an
/// unfinished payload that is still wanted and closes the connection after the answer (after
/// `client_disconnect_timeout`), instead of draining a dropped chunked payload for ever.
struct HoldPayload {
    body: BoxBody,
    _payload: Held,
}

impl MessageBody for HoldPayload {
    type Error = <BoxBody as MessageBody>::Error;

    fn size(&self) -> BodySize {
        self.body.size()
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_next(cx)
    }
}

/// For a request that carries a body: the handler reads it through a shared handle, and the
/// answer holds the payload until sent (see `HoldPayload`). A body read to its end changes
/// nothing (the connection is kept alive as usual).
pub async fn hold_payload(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    if !has_body {
        return Ok(next.call(req).await?.map_into_boxed_body());
    }
    let (http, payload) = req.into_parts();
    let held: Held = Rc::new(RefCell::new(payload));
    let stream: Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>> =
        Box::pin(SharedPayload(held.clone()));
    let req = ServiceRequest::from_parts(http, Payload::Stream { payload: stream });
    let res = next.call(req).await?;
    Ok(res.map_body(|_, body| {
        BoxBody::new(HoldPayload {
            body: body.boxed(),
            _payload: held,
        })
    }))
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
