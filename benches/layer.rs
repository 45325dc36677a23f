//! Cost of `TwinTrackLayer` per request: the same service with and without the layer, in one
//! run, with three registered migrations.
//!
//! - `http/*`: an axum service behind a real hyper HTTP/1.1 server, called by a hyper client
//!   over loopback with a kept-alive connection: the per-request cost a service pays. The goal
//!   (issue 2) is layered ≤ 1.05 × bare.
//! - `in_process/axum_*`: the same axum `Router` called directly (no network), and
//!   `in_process/noop_*`: a tower `service_fn` that does nothing, so the difference is the
//!   layer's own cost in nanoseconds. The goal is < 300 ns added.
//!
//! In-process requests are built outside the timed region (`iter_batched`) and complete on
//! their first poll, so they are driven with `now_or_never`: no executor cost in either column.
//!
//! Run: `cargo bench --bench layer`

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group};
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::Service;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore};
use twintrack::{Database, RequestContext, Stage, TwinTrackLayer};

fn flags(rt: &tokio::runtime::Runtime, dir: &tempfile::TempDir) -> FlagCache {
    flags_from(rt, dir, false)
}

/// The same cache with its stages from a flagd file (an external source, held to the rules)
/// when `external`: the per-request path must not notice the difference.
fn flags_from(rt: &tokio::runtime::Runtime, dir: &tempfile::TempDir, external: bool) -> FlagCache {
    rt.block_on(async {
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("bench.db").display()
        );
        let store = Arc::new(
            SqlFlagStore::open(Database::connect(&url).await.unwrap())
                .await
                .unwrap(),
        );
        let mut builder = FlagCache::builder(store.clone()).soft_ttl(Duration::from_secs(3600));
        for name in ["user_settings", "orders_split", "email_retype"] {
            store.register(name, "bench").await.unwrap();
            builder = builder.migration(name, Stage::LegacyOnly);
        }
        if external {
            let file = dir.path().join("flags.json");
            let flag = serde_json::json!({
                "state": "ENABLED", "variants": {"on": "legacy_only"}, "defaultVariant": "on"
            });
            let doc = serde_json::json!({"flags": {
                "user_settings": flag, "orders_split": flag, "email_retype": flag
            }});
            std::fs::write(&file, doc.to_string()).unwrap();
            let source = twintrack::flags::OpenFeatureSource::flagd_file(&file)
                .await
                .unwrap();
            builder = builder.source(Arc::new(source));
        }
        builder.build().await
    })
}

fn request<B: Default>() -> Request<B> {
    Request::builder()
        .uri("/users/42/settings")
        .header("x-user-id", "42")
        .body(B::default())
        .unwrap()
}

/// The handler both columns run: it reads its pinned stage when there is one, as a real
/// handler would.
async fn handler() -> String {
    match RequestContext::current().and_then(|c| c.read_stage("user_settings")) {
        Some(stage) => stage.as_str().to_owned(),
        None => "legacy_only".to_owned(),
    }
}

fn router() -> axum::Router {
    axum::Router::new().route("/users/{id}/settings", axum::routing::get(handler))
}

/// Serves `app` on an ephemeral loopback port; returns a client and the base URL.
fn serve<S>(
    rt: &tokio::runtime::Runtime,
    app: S,
) -> (
    hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Empty<Bytes>,
    >,
    String,
)
where
    S: Service<
            Request<hyper::body::Incoming>,
            Response = Response<axum::body::Body>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Empty<Bytes>>();
        (client, format!("http://{addr}/users/42/settings"))
    })
}

/// The two ways to put the layer on an axum app: around the whole router (one layer per
/// connection) or with `Router::layer` (axum wraps and clones it per route and request).
fn wrapped(layer: &TwinTrackLayer) -> twintrack::TwinTrack<axum::Router> {
    tower::Layer::layer(layer, router())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flags = flags(&rt, &dir);
    let layer =
        TwinTrackLayer::new(flags).request_key_header(http::HeaderName::from_static("x-user-id"));
    let _guard = rt.enter();

    let mut group = c.benchmark_group("http");
    group.sample_size(200);
    let bare = serve(&rt, router());
    let layered = serve(&rt, wrapped(&layer));
    let per_route = serve(&rt, router().layer(layer.clone()));
    for (name, (client, url)) in [
        ("bare", bare),
        ("twintrack", layered),
        ("twintrack_router_layer", per_route),
    ] {
        let uri: http::Uri = url.parse().unwrap();
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| async {
                let mut req = request::<Empty<Bytes>>();
                *req.uri_mut() = uri.clone();
                let res = client.request(req).await.unwrap();
                black_box(res.into_body().collect().await.unwrap());
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("in_process");
    group.sample_size(200);
    let mut bare = router();
    group.bench_function("axum_bare", |b| {
        b.iter_batched(
            request::<axum::body::Body>,
            |req| bare.call(req).now_or_never().unwrap().unwrap(),
            BatchSize::SmallInput,
        )
    });
    let mut layered = wrapped(&layer);
    group.bench_function("axum_twintrack", |b| {
        b.iter_batched(
            request::<axum::body::Body>,
            |req| layered.call(req).now_or_never().unwrap().unwrap(),
            BatchSize::SmallInput,
        )
    });
    let noop = tower::service_fn(|req: Request<String>| async move {
        black_box(&req);
        Ok::<_, Infallible>(Response::new(()))
    });
    let mut bare = noop;
    group.bench_function("noop_bare", |b| {
        b.iter_batched(
            request::<String>,
            |req| bare.call(req).now_or_never().unwrap().unwrap(),
            BatchSize::SmallInput,
        )
    });
    let mut layered = tower::ServiceBuilder::new().layer(layer).service(noop);
    group.bench_function("noop_twintrack", |b| {
        b.iter_batched(
            request::<String>,
            |req| layered.call(req).now_or_never().unwrap().unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Bare and layered measured in alternating short rounds (so machine drift hits both alike);
/// prints the median per-call cost of each and the median of the per-round ratios.
fn paired_summary() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flags = flags(&rt, &dir);
    let layer =
        TwinTrackLayer::new(flags).request_key_header(http::HeaderName::from_static("x-user-id"));
    let _guard = rt.enter();
    const ROUNDS: usize = 41;

    fn report(name: &str, unit: &str, scale: f64, bare: &mut [f64], layered: &mut [f64]) {
        let mut ratios: Vec<f64> = bare
            .iter()
            .zip(layered.iter())
            .map(|(b, l)| l / b)
            .collect();
        let mut added: Vec<f64> = bare
            .iter()
            .zip(layered.iter())
            .map(|(b, l)| l - b)
            .collect();
        let med = |v: &mut [f64]| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        println!(
            "paired {name:<10} bare {:>9.1} {unit}  twintrack {:>9.1} {unit}  added {:>7.1} {unit}  ratio {:.3}",
            med(bare) * scale,
            med(layered) * scale,
            med(&mut added) * scale,
            med(&mut ratios)
        );
    }

    // In process: per call, request construction included in both columns.
    fn per_call<S>(svc: &mut S, n: u32) -> f64
    where
        S: Service<Request<String>>,
        S::Error: std::fmt::Debug,
    {
        let start = std::time::Instant::now();
        for _ in 0..n {
            black_box(
                svc.call(request::<String>())
                    .now_or_never()
                    .unwrap()
                    .unwrap(),
            );
        }
        start.elapsed().as_secs_f64() / f64::from(n)
    }
    let noop = tower::service_fn(|req: Request<String>| async move {
        black_box(&req);
        Ok::<_, Infallible>(Response::new(()))
    });
    let axum_svc = |r: axum::Router| {
        tower::ServiceBuilder::new()
            .map_request(|req: Request<String>| req.map(axum::body::Body::from))
            .service(r)
    };
    let (mut b_noop, mut l_noop) = (
        noop,
        tower::ServiceBuilder::new()
            .layer(layer.clone())
            .service(noop),
    );
    let (mut b_axum, mut l_axum) = (
        axum_svc(router()),
        tower::ServiceBuilder::new()
            .map_request(|req: Request<String>| req.map(axum::body::Body::from))
            .service(wrapped(&layer)),
    );
    let (mut nb, mut nl, mut ab, mut al) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        nb.push(per_call(&mut b_noop, 20_000));
        nl.push(per_call(&mut l_noop, 20_000));
        ab.push(per_call(&mut b_axum, 5_000));
        al.push(per_call(&mut l_axum, 5_000));
    }
    report("noop", "ns", 1e9, &mut nb, &mut nl);
    report("axum", "ns", 1e9, &mut ab, &mut al);

    // Over HTTP: per request on a kept-alive loopback connection.
    let (bare, layered, per_route) = (
        serve(&rt, router()),
        serve(&rt, wrapped(&layer)),
        serve(&rt, router().layer(layer)),
    );
    let per_request = |(client, url): &(_, String), n: u32| {
        let uri: http::Uri = url.parse().unwrap();
        rt.block_on(async {
            let start = std::time::Instant::now();
            for _ in 0..n {
                let mut req = request::<Empty<Bytes>>();
                *req.uri_mut() = uri.clone();
                let client: &hyper_util::client::legacy::Client<_, Empty<Bytes>> = client;
                let res = client.request(req).await.unwrap();
                black_box(res.into_body().collect().await.unwrap());
            }
            start.elapsed().as_secs_f64() / f64::from(n)
        })
    };
    let (mut hb, mut hl, mut hb2, mut hr) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        hb.push(per_request(&bare, 200));
        hl.push(per_request(&layered, 200));
        hb2.push(per_request(&bare, 200));
        hr.push(per_request(&per_route, 200));
    }
    report("http", "µs", 1e6, &mut hb, &mut hl);
    report("http_route", "µs", 1e6, &mut hb2, &mut hr);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .measurement_time(Duration::from_secs(5))
        .warm_up_time(Duration::from_secs(1));
    targets = bench
}

/// `TWINTRACK_ICOUNT=<variant>:<n>`: run one variant n times and exit, for
/// `benches/icount.sh`, which counts instructions under callgrind (deterministic on a noisy
/// machine). Variants: `noop_bare`, `noop_twintrack`, `noop_twintrack_flagd` (stages from a
/// flagd file), `axum_bare`, `axum_twintrack`, `http_bare`, `http_twintrack`,
/// `http_twintrack_router_layer`.
fn icount(spec: &str) {
    let (variant, n) = spec.split_once(':').expect("variant:n");
    let n: u32 = n.parse().expect("n");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let flags = flags_from(&rt, &dir, variant.ends_with("_flagd"));
    let layer =
        TwinTrackLayer::new(flags).request_key_header(http::HeaderName::from_static("x-user-id"));
    let _guard = rt.enter();
    fn run<S: Service<Request<B>>, B: Default>(mut svc: S, n: u32)
    where
        S::Error: std::fmt::Debug,
    {
        for _ in 0..n {
            black_box(svc.call(request::<B>()).now_or_never().unwrap().unwrap());
        }
    }
    let noop = tower::service_fn(|req: Request<String>| async move {
        black_box(&req);
        Ok::<_, Infallible>(Response::new(()))
    });
    match variant {
        "noop_bare" => run(noop, n),
        "noop_twintrack" | "noop_twintrack_flagd" => {
            run(tower::ServiceBuilder::new().layer(layer).service(noop), n)
        }
        "axum_bare" => run::<_, axum::body::Body>(router(), n),
        "axum_twintrack" => run::<_, axum::body::Body>(wrapped(&layer), n),
        "http_bare" | "http_twintrack" | "http_twintrack_router_layer" => {
            let (client, url) = match variant {
                "http_bare" => serve(&rt, router()),
                "http_twintrack" => serve(&rt, wrapped(&layer)),
                _ => serve(&rt, router().layer(layer)),
            };
            let uri: http::Uri = url.parse().unwrap();
            rt.block_on(async {
                for _ in 0..n {
                    let mut req = request::<Empty<Bytes>>();
                    *req.uri_mut() = uri.clone();
                    let res = client.request(req).await.unwrap();
                    black_box(res.into_body().collect().await.unwrap());
                }
            });
        }
        other => panic!("unknown variant {other}"),
    }
}

fn main() {
    if let Ok(spec) = std::env::var("TWINTRACK_ICOUNT") {
        icount(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    paired_summary();
}
