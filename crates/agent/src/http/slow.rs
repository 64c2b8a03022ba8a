//! Slow clients. A request body must have arrived in full within the read
//! timeout, counted from when its headers did; otherwise reading it fails,
//! the request is answered 408 and the connection closed. (Headers that
//! trickle are cut off by hyper's `header_read_timeout`, set where the
//! server is built.) A trickling client costs a socket and a small task
//! until then, never a worker thread.

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::header::{HeaderValue, CONNECTION};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;

use super::metrics::Metrics;

/// Reading a request body took longer than the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub Duration);

/// A request body with a deadline for the whole of it (not per frame, so a
/// byte a second cannot keep it alive).
struct DeadlineBody {
    inner: Body,
    sleep: Pin<Box<Sleep>>,
    timeout: Duration,
    fired: Arc<AtomicBool>,
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            this.fired.store(true, Ordering::Relaxed);
            return Poll::Ready(Some(Err(Box::new(BodyTimedOut(this.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The state of [`body_deadline`].
#[derive(Clone)]
pub struct BodyDeadline {
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
}

pub async fn body_deadline(State(d): State<BodyDeadline>, req: Request, next: Next) -> Response {
    if req.body().is_end_stream() {
        return next.run(req).await;
    }
    let fired = Arc::new(AtomicBool::new(false));
    let timeout = d.timeout;
    let f2 = fired.clone();
    let req = req.map(move |inner| {
        Body::new(DeadlineBody { inner, sleep: Box::pin(tokio::time::sleep(timeout)), timeout, fired: f2 })
    });
    let mut resp = next.run(req).await;
    if fired.load(Ordering::Relaxed) {
        d.metrics.body_timeouts.inc();
        // The rest of the body is not worth waiting for.
        resp.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Whether `e` (an extractor's rejection) comes from [`BodyTimedOut`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimedOut>() {
            return true;
        }
        cur = err.source();
    }
    false
}
