//! `TwinTrackLayer` under axum, a bare hyper `service_fn` and tonic, each a real server on an
//! ephemeral port driven by a real client; and the per-request pin while flags flip.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Extension;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Notify, oneshot};
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::{Database, RequestContext, Stage, TwinTrackLayer};

const M: &str = "user_settings";

async fn flags_at(url: &str, stage: Stage) -> (Arc<SqlFlagStore>, FlagCache) {
    let store = Arc::new(
        SqlFlagStore::open(Database::connect(url).await.unwrap())
            .await
            .unwrap(),
    );
    store.register(M, "test").await.unwrap();
    if stage != Stage::LegacyOnly {
        store
            .set_stage(StageChange::new(M, stage, "test", "setup").force(true))
            .await
            .unwrap();
    }
    // Long TTL: the test decides when the cache reloads.
    let cache = FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    (store, cache)
}

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let uri = format!("http://{addr}{path}").parse().unwrap();
    let res = client.get(uri).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

fn stage_of_current() -> String {
    RequestContext::current()
        .and_then(|c| c.stage(M))
        .map(|s| s.to_string())
        .unwrap_or_else(|| "none".into())
}

/// The hook the pinning handler uses to pause between its two reads.
#[derive(Clone, Default)]
struct Pause {
    reached: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    resume: Arc<Notify>,
}

/// A request reads its stage, waits while the flag flips and the cache reloads, reads again:
/// the same stage both times (also in work it spawns and re-scopes). The next request sees the
/// flip. On PostgreSQL and SQLite, under axum.
#[tokio::test(flavor = "multi_thread")]
async fn stage_is_pinned_for_the_whole_request_under_axum() {
    for (backend, url, _guard) in common::backends().await {
        let (store, flags) = flags_at(&url, Stage::LegacyOnly).await;
        let pause = Pause::default();

        async fn handler(
            Extension(ctx): Extension<RequestContext>,
            Extension(pause): Extension<Pause>,
        ) -> String {
            let first = stage_of_current();
            if let Some(tx) = pause.reached.lock().await.take() {
                let _ = tx.send(());
                pause.resume.notified().await;
            }
            let second = stage_of_current();
            let spawned = tokio::spawn(ctx.clone().scope(async { stage_of_current() }))
                .await
                .unwrap();
            let unscoped = tokio::spawn(async { stage_of_current() }).await.unwrap();
            let explicit = ctx.stage(M).unwrap().to_string();
            format!("{first} {second} {spawned} {unscoped} {explicit}")
        }

        let app = axum::Router::new()
            .route("/", axum::routing::get(handler))
            .layer(Extension(pause.clone()))
            .layer(TwinTrackLayer::new(flags.clone()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let (tx, rx) = oneshot::channel();
        *pause.reached.lock().await = Some(tx);
        let in_flight = tokio::spawn(get(addr, "/"));
        rx.await.unwrap(); // the request has read its stage once

        store
            .set_stage(StageChange::new(
                M,
                Stage::DualWrite,
                "test",
                "flip mid-request",
            ))
            .await
            .unwrap();
        flags.refresh().await.unwrap();
        assert_eq!(
            flags.snapshot().stage(M),
            Some(Stage::DualWrite),
            "{backend}"
        );
        pause.resume.notify_one();

        assert_eq!(
            in_flight.await.unwrap(),
            "legacy_only legacy_only legacy_only none legacy_only",
            "{backend}: pinned for the whole request"
        );
        assert_eq!(
            get(addr, "/").await,
            "dual_write dual_write dual_write none dual_write",
            "{backend}: the next request sees the flip"
        );
        server.abort();
    }
}

/// The layer keeps the cache refreshing after the caller drops its own `FlagCache` handle
/// (the usual `TwinTrackLayer::new(flags)` move).
#[tokio::test(flavor = "multi_thread")]
async fn the_layer_keeps_the_cache_refreshing_on_its_own() {
    let (_dir, url) = common::sqlite_db();
    let store = Arc::new(
        SqlFlagStore::open(Database::connect(&url).await.unwrap())
            .await
            .unwrap(),
    );
    store.register(M, "t").await.unwrap();
    let flags = FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .soft_ttl(Duration::from_millis(50))
        .build()
        .await;
    let mut svc = tower::ServiceBuilder::new()
        .layer(TwinTrackLayer::new(flags)) // the only handle to the cache from here on
        .service(tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(stage_of_current()))
        }));
    use tower::{Service, ServiceExt};
    let mut call = async || {
        svc.ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap()
            .into_body()
    };
    assert_eq!(call().await, "legacy_only");
    store
        .set_stage(StageChange::new(M, Stage::DualWrite, "t", "flip"))
        .await
        .unwrap();
    let start = std::time::Instant::now();
    while call().await != "dual_write" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the flip never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bare hyper server with a tower `service_fn` wrapped by the layer.
#[tokio::test(flavor = "multi_thread")]
async fn works_under_a_bare_hyper_service() {
    let (_dir, url) = common::sqlite_db();
    let (store, flags) = flags_at(&url, Stage::DualWrite).await;
    let service = tower::ServiceBuilder::new()
        .layer(TwinTrackLayer::new(flags.clone()))
        .service(tower::service_fn(
            |req: http::Request<hyper::body::Incoming>| async move {
                let from_ext = req
                    .extensions()
                    .get::<RequestContext>()
                    .and_then(|c| c.stage(M))
                    .unwrap();
                let body = format!("{} {}", from_ext, stage_of_current());
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            },
        ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let svc = hyper_util::service::TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    assert_eq!(get(addr, "/").await, "dual_write dual_write");
    store
        .set_stage(StageChange::new(M, Stage::LegacyOnly, "t", "rollback"))
        .await
        .unwrap();
    flags.refresh().await.unwrap();
    assert_eq!(get(addr, "/").await, "legacy_only legacy_only");
    server.abort();
}

/// A tonic server: the handler sees the context through tonic's request extensions and the
/// task-local. The gRPC service is written by hand here (the control plane's proto comes with
/// its own issue); the wiring is exactly what generated code does.
#[tokio::test(flavor = "multi_thread")]
async fn works_under_tonic() {
    #[derive(Clone, PartialEq, prost::Message)]
    struct Ping {
        #[prost(string, tag = "1")]
        migration: String,
    }
    #[derive(Clone, PartialEq, prost::Message)]
    struct Pong {
        #[prost(string, tag = "1")]
        from_extensions: String,
        #[prost(string, tag = "2")]
        from_task_local: String,
    }

    #[derive(Clone)]
    struct PingService;
    impl tonic::server::NamedService for PingService {
        const NAME: &'static str = "twintrack.test.Ping";
    }
    impl tower::Service<http::Request<tonic::body::Body>> for PingService {
        type Response = http::Response<tonic::body::Body>;
        type Error = Infallible;
        type Future = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
        >;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Infallible>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            Box::pin(async move {
                let handler = tower::service_fn(|req: tonic::Request<Ping>| async move {
                    let migration = req.get_ref().migration.clone();
                    let from_extensions = req
                        .extensions()
                        .get::<RequestContext>()
                        .and_then(|c| c.stage(&migration))
                        .map(|s| s.to_string())
                        .unwrap_or_default();
                    Ok::<_, tonic::Status>(tonic::Response::new(Pong {
                        from_extensions,
                        from_task_local: stage_of_current(),
                    }))
                });
                let mut grpc =
                    tonic::server::Grpc::new(tonic_prost::ProstCodec::<Pong, Ping>::default());
                Ok(grpc.unary(handler, req).await)
            })
        }
    }

    let (_dir, url) = common::sqlite_db();
    let (_store, flags) = flags_at(&url, Stage::Shadow).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(TwinTrackLayer::new(flags))
            .add_service(PingService)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.unwrap();
    let pong: Pong = client
        .unary(
            tonic::Request::new(Ping {
                migration: M.into(),
            }),
            "/twintrack.test.Ping/Ping".parse().unwrap(),
            tonic_prost::ProstCodec::<Ping, Pong>::default(),
        )
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pong.from_extensions, "shadow");
    assert_eq!(pong.from_task_local, "shadow");
    server.abort();
}

/// In `live` with a read rollout percent, the request key header decides which requests read
/// as `live` and which as `shadow`: the same key always lands on the same side, about the
/// configured share of keys read `live`, and writes (`stage`) are never split.
#[tokio::test(flavor = "multi_thread")]
async fn request_key_places_requests_in_the_live_read_rollout() {
    use tower::{Service, ServiceExt};
    use twintrack::flags::TuningChange;

    let (_dir, url) = common::sqlite_db();
    let (store, flags) = flags_at(&url, Stage::Live).await;
    let tune = |percent: Option<u8>| TuningChange {
        migration: M.into(),
        shadow_sample_rate: None,
        read_rollout_percent: Some(percent),
        expected_version: None,
        actor: "t".into(),
        reason: "rollout".into(),
    };
    let mut svc = tower::ServiceBuilder::new()
        .layer(
            TwinTrackLayer::new(flags.clone())
                .request_key_header(http::HeaderName::from_static("x-user-id")),
        )
        .service(tower::service_fn(|_req: http::Request<()>| async {
            let ctx = RequestContext::current().unwrap();
            Ok::<_, Infallible>(http::Response::new((
                ctx.stage(M).unwrap(),
                ctx.read_stage(M).unwrap(),
            )))
        }));
    let mut call = async |user: Option<u32>| {
        let mut req = http::Request::new(());
        if let Some(user) = user {
            req.headers_mut().insert("x-user-id", user.into());
        }
        svc.ready()
            .await
            .unwrap()
            .call(req)
            .await
            .unwrap()
            .into_body()
    };

    // No percent: everyone reads live; the key is not even looked at.
    assert!(!flags.snapshot().needs_rollout_key());
    assert_eq!(call(Some(1)).await, (Stage::Live, Stage::Live));

    store.tune(tune(Some(30))).await.unwrap();
    flags.refresh().await.unwrap();
    assert!(flags.snapshot().needs_rollout_key());
    let mut live = 0;
    for user in 0..2000 {
        let (write, read) = call(Some(user)).await;
        assert_eq!(write, Stage::Live, "writes are never split");
        assert!(matches!(read, Stage::Live | Stage::Shadow));
        assert_eq!(call(Some(user)).await.1, read, "user {user} must be stable");
        live += usize::from(read == Stage::Live);
    }
    assert!(
        (500..=700).contains(&live),
        "{live} of 2000 keys read live at 30%"
    );
    // Without the header, requests are placed at random in the same proportion.
    let mut keyless = 0;
    for _ in 0..2000 {
        keyless += usize::from(call(None).await.1 == Stage::Live);
    }
    assert!(
        (500..=700).contains(&keyless),
        "{keyless} of 2000 keyless requests read live"
    );

    store.tune(tune(Some(0))).await.unwrap();
    flags.refresh().await.unwrap();
    for user in 0..100 {
        assert_eq!(call(Some(user)).await, (Stage::Live, Stage::Shadow));
    }
    store.tune(tune(None)).await.unwrap();
    flags.refresh().await.unwrap();
    assert_eq!(call(Some(7)).await, (Stage::Live, Stage::Live));
}
