//! Graceful shutdown: the signal to stop on, for `twintrack serve` and services embedding
//! twintrack.
//!
//! ```no_run
//! # async fn demo(app: axum::Router, listener: tokio::net::TcpListener) -> std::io::Result<()> {
//! axum::serve(listener, app)
//!     .with_graceful_shutdown(twintrack::shutdown::signal())
//!     .await?;
//! // Then let the dual stores finish their background work: `DualStore::drain`.
//! # Ok(()) }
//! ```

/// Resolves when the process is asked to stop: SIGTERM (what Kubernetes, systemd and Docker
/// send) or SIGINT (Ctrl-C). Where a signal handler cannot be installed it logs why and waits
/// for the other one.
pub async fn signal() {
    let interrupt = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}

/// How long [`serve`] lets HTTP/1 connections finish on their own before shutting the rest
/// down (idle keep-alive connections, HTTP/2 with `GOAWAY`).
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves `service` on `listener` until `signal` resolves, then drains without resetting a
/// request:
///
/// 1. the listener closes (new connections are refused: a client reconnects elsewhere);
/// 2. every HTTP/1 response from then on carries `Connection: close`, so a connection in use
///    closes cleanly after its next answer; a request already sent on a kept-alive connection
///    is answered, not dropped (closing an idle keep-alive connection at once, as a plain
///    graceful shutdown does, races a client's next request on it and fails that request);
/// 3. after `grace`, or as soon as no connection is left, the remaining connections are shut
///    down gracefully (HTTP/2 with `GOAWAY`, idle HTTP/1 ones closed); their requests in flight
///    get one more `grace` to complete (a stream that never ends, like a watch, is then cut).
///
/// HTTP/1 and HTTP/2 (gRPC) on one port, as `axum::serve`.
///
/// Errors: only when accepting fails in a way that cannot be retried.
pub async fn serve<S, B>(
    listener: tokio::net::TcpListener,
    service: S,
    signal: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
) -> std::io::Result<()>
where
    S: tower_service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;

    let closing = Arc::new(AtomicBool::new(false));
    let graceful = GracefulShutdown::new();
    let builder = Builder::new(TokioExecutor::new());
    let mut signal = std::pin::pin!(signal);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors and the like: back off, as axum::serve does.
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let service = TowerToHyperService::new(CloseWhenDraining {
                    inner: service.clone(),
                    closing: closing.clone(),
                });
                let conn = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            () = &mut signal => break,
        }
    }
    drop(listener);
    closing.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + grace;
    while graceful.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Streams that never end by themselves (gRPC `WatchMigrations`) are not waited for past a
    // second grace: the process exits 0 all the same.
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("connections still open after the grace period; closing them");
    }
    Ok(())
}

/// Adds `Connection: close` to HTTP/1 responses once draining has begun.
#[derive(Clone)]
struct CloseWhenDraining<S> {
    inner: S,
    closing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl<S, B, ReqBody> tower_service::Service<http::Request<ReqBody>> for CloseWhenDraining<S>
where
    S: tower_service::Service<http::Request<ReqBody>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<B>, S::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let http1 = req.version() <= http::Version::HTTP_11;
        let closing = self.closing.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let mut response = response.await?;
            if http1 && closing.load(std::sync::atomic::Ordering::SeqCst) {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok(response)
        })
    }
}
