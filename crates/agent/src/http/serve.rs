//! Serving the router over plain HTTP/1.1 (TLS goes through axum-server,
//! configured the same way in `daemon`). Unlike `axum::serve`, hyper's
//! connection builder here has a timer, so `header_read_timeout` applies:
//! a client that trickles its headers (or sends nothing) is cut off. Each
//! connection is a task in one `JoinSet`; a stop lets them finish for a few
//! seconds, then aborts what is left (event streams of long runs).

use axum::extract::connect_info::ConnectInfo;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// How long a stop waits for open requests.
const DRAIN: Duration = Duration::from_secs(5);

/// hyper's HTTP/1 settings for the agent: a timer, and the header read
/// timeout.
pub fn http1_builder(header_read_timeout: Duration) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new()).header_read_timeout(header_read_timeout);
    b
}

/// Serve `app` on `listener` until `stop` is cancelled. Requests carry the
/// peer address as `ConnectInfo<SocketAddr>`, as with
/// `into_make_service_with_connect_info`.
pub async fn serve_plain(
    listener: TcpListener,
    app: Router,
    header_read_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let builder = http1_builder(header_read_timeout);
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    tracing::warn!(error = %e, "cannot accept a connection; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req)
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        conns.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::debug!(open = conns.len(), "connections still open after the drain; closing them");
    }
    conns.shutdown().await;
    Ok(())
}
