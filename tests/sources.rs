//! External flag sources held to twintrack's rules: the flag cache's guarantees (per-request
//! pinning, last known value on error, fallback when never loaded) over an OpenFeature
//! provider, and the holds: a stage the transition rules refuse given the evidence in
//! twintrack's tables is not served. The evidence and the mirror of what is served live in a
//! real database: SQLite, PostgreSQL and MariaDB (when available).
//!
//! The OpenFeature Rust SDK ships no in-memory provider (its Go and Java SDKs do), so
//! `MemoryProvider` below is one: the SDK's `FeatureProvider` trait over a map, as the
//! other SDKs' `InMemoryProvider` is.
#![cfg(feature = "openfeature")]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestMetrics;
use open_feature::provider::{FeatureProvider, ProviderMetadata, ResolutionDetails};
use open_feature::{
    EvaluationContext, EvaluationError, EvaluationErrorCode, EvaluationResult, StructValue, Value,
};
use twintrack::flags::{
    EvidenceKind, FlagCache, FlagSource, FlagStore, OpenFeatureSource, SqlFlagStore, StageChange,
    StageSource,
};
use twintrack::{Database, Stage};

const M: &str = "user_settings";

/// An in-memory OpenFeature provider whose flags a test edits, and which can be made to fail
/// every evaluation (a provider that lost its connection).
#[derive(Clone)]
struct MemoryProvider {
    flags: Arc<Mutex<HashMap<String, Value>>>,
    down: Arc<AtomicBool>,
    metadata: ProviderMetadata,
}

impl MemoryProvider {
    fn new() -> MemoryProvider {
        MemoryProvider {
            flags: Arc::default(),
            down: Arc::default(),
            metadata: ProviderMetadata::new("in-memory"),
        }
    }

    fn set(&self, key: &str, value: impl Into<Value>) {
        self.flags
            .lock()
            .unwrap()
            .insert(key.to_owned(), value.into());
    }

    fn remove(&self, key: &str) {
        self.flags.lock().unwrap().remove(key);
    }

    fn resolve<T>(
        &self,
        key: &str,
        pick: impl Fn(&Value) -> Option<T>,
    ) -> EvaluationResult<ResolutionDetails<T>> {
        if self.down.load(Ordering::SeqCst) {
            return Err(EvaluationError::builder()
                .code(EvaluationErrorCode::ProviderNotReady)
                .message("connection lost")
                .build());
        }
        let flags = self.flags.lock().unwrap();
        let value = flags.get(key).ok_or_else(|| {
            EvaluationError::builder()
                .code(EvaluationErrorCode::FlagNotFound)
                .build()
        })?;
        pick(value).map(ResolutionDetails::new).ok_or_else(|| {
            EvaluationError::builder()
                .code(EvaluationErrorCode::TypeMismatch)
                .message(format!("{value:?}"))
                .build()
        })
    }
}

#[open_feature::async_trait]
impl FeatureProvider for MemoryProvider {
    fn metadata(&self) -> &ProviderMetadata {
        &self.metadata
    }

    async fn resolve_bool_value(
        &self,
        key: &str,
        _: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<bool>> {
        self.resolve(key, Value::as_bool)
    }

    async fn resolve_int_value(
        &self,
        key: &str,
        _: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<i64>> {
        self.resolve(key, Value::as_i64)
    }

    async fn resolve_float_value(
        &self,
        key: &str,
        _: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<f64>> {
        self.resolve(key, Value::as_f64)
    }

    async fn resolve_string_value(
        &self,
        key: &str,
        _: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<String>> {
        self.resolve(key, |v| v.as_str().map(str::to_owned))
    }

    async fn resolve_struct_value(
        &self,
        key: &str,
        _: &EvaluationContext,
    ) -> EvaluationResult<ResolutionDetails<StructValue>> {
        self.resolve(key, |v| v.as_struct().cloned())
    }
}

async fn store_at(url: &str) -> Arc<SqlFlagStore> {
    let store = Arc::new(
        SqlFlagStore::open(Database::connect(url).await.unwrap())
            .await
            .unwrap(),
    );
    store.register(M, "test").await.unwrap();
    store
}

/// A cache following `provider` over `store`; it reloads only when the test says so.
async fn cache_over(
    store: &Arc<SqlFlagStore>,
    provider: &MemoryProvider,
    metrics: &TestMetrics,
) -> FlagCache {
    FlagCache::builder(store.clone())
        .source(Arc::new(OpenFeatureSource::new(provider.clone())))
        .migration(M, Stage::LegacyOnly)
        .migration("unregistered", Stage::Shadow)
        .soft_ttl(Duration::from_secs(3600))
        .metrics(metrics.metrics())
        .build()
        .await
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

/// What the source says is served when the rules allow it (and mirrored into twintrack's
/// table, audited as `external`); what they refuse is held at the last allowed stage, with
/// the refusal, the gauge and the store all saying so; once the evidence is there, or the
/// source asks for a safe stage, it is followed again.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_is_followed_where_the_rules_allow_and_held_where_they_refuse() {
    for (backend, url, _guard) in common::backends_with_mariadb().await {
        let store = store_at(&url).await;
        let provider = MemoryProvider::new();
        provider.set(M, "dual_write");
        let metrics = TestMetrics::new();
        let flags = cache_over(&store, &provider, &metrics).await;

        // legacy_only -> dual_write only adds writes: followed and mirrored.
        let flag = flags.snapshot().get(M).unwrap().clone();
        assert_eq!(
            (flag.stage(), flag.source, flag.held.is_none()),
            (Stage::DualWrite, FlagSource::Fresh, true),
            "{backend}"
        );
        assert_eq!(store.get(M).await.unwrap().state.stage, Stage::DualWrite);
        let audit = store.audit_log(M, 1).await.unwrap();
        assert_eq!(
            (audit[0].actor.as_str(), audit[0].to_stage.as_deref()),
            ("external", Some("dual_write")),
            "{backend}: {audit:?}"
        );
        assert!(audit[0].reason.contains("in-memory"), "{audit:?}");

        // live without a finished backfill and a clean verify: held at dual_write.
        provider.set(M, "live");
        flags.refresh().await.unwrap();
        let flag = flags.snapshot().get(M).unwrap().clone();
        assert_eq!(flag.stage(), Stage::DualWrite, "{backend}: held");
        let hold = flag.held.as_deref().expect("a hold");
        assert_eq!((hold.wanted, hold.serving), (Stage::Live, Stage::DualWrite));
        assert!(hold.refusal.remedy.contains("twintrack backfill"), "{hold}");
        assert_eq!(store.get(M).await.unwrap().state.stage, Stage::DualWrite);
        let held = [
            ("migration", M),
            ("wanted", "live"),
            ("serving", "dual_write"),
        ];
        assert_eq!(
            metrics.gauge_u64_all("twintrack.flags.held", &held),
            Some(1)
        );
        // The tools outside the service see the same hold.
        let seen = twintrack::flags::source::current_hold(
            &OpenFeatureSource::new(provider.clone()),
            &*store,
            M,
        )
        .await
        .unwrap();
        assert_eq!(seen.map(|h| h.wanted), Some(Stage::Live));

        // The evidence arrives: the next reload follows.
        let now = now_micros();
        store
            .record_evidence(M, EvidenceKind::BackfillFinished, now, "test")
            .await
            .unwrap();
        store
            .record_evidence(M, EvidenceKind::VerifyClean, now + 1, "test")
            .await
            .unwrap();
        flags.refresh().await.unwrap();
        let flag = flags.snapshot().get(M).unwrap().clone();
        assert_eq!((flag.stage(), flag.held.is_none()), (Stage::Live, true));
        assert_eq!(
            metrics.gauge_u64_all("twintrack.flags.held", &held),
            Some(0)
        );

        // Rollback to legacy_only is always allowed; straight back to new_only is not (the
        // writes made in legacy_only never reached the new shape).
        provider.set(M, "off"); // LaunchDarkly's name for legacy_only
        flags.refresh().await.unwrap();
        assert_eq!(flags.snapshot().stage(M), Some(Stage::LegacyOnly));
        provider.set(M, "complete"); // new_only
        flags.refresh().await.unwrap();
        let flag = flags.snapshot().get(M).unwrap().clone();
        assert_eq!(flag.stage(), Stage::LegacyOnly, "{backend}");
        assert_eq!(flag.held.as_ref().map(|h| h.wanted), Some(Stage::NewOnly));

        // A safe edit afterwards is followed.
        provider.set(M, "dual_write");
        flags.refresh().await.unwrap();
        let flag = flags.snapshot().get(M).unwrap().clone();
        assert_eq!(
            (flag.stage(), flag.held.is_none()),
            (Stage::DualWrite, true)
        );

        // The migration no store row exists for cannot be checked: its fallback is served.
        provider.set("unregistered", "new_only");
        flags.refresh().await.unwrap();
        let flag = flags.snapshot().get("unregistered").unwrap().clone();
        assert_eq!(
            (flag.stage(), flag.source),
            (Stage::Shadow, FlagSource::Fallback)
        );
    }
}

/// Leaving new_only for a stage that reads legacy needs a reverse sync: held without one.
#[tokio::test(flavor = "multi_thread")]
async fn leaving_new_only_for_a_legacy_read_without_a_reverse_sync_is_held() {
    let (_dir, url) = common::sqlite_db();
    let store = store_at(&url).await;
    store
        .set_stage(StageChange::new(M, Stage::NewOnly, "test", "setup").force(true))
        .await
        .unwrap();
    let provider = MemoryProvider::new();
    provider.set(M, "new_only");
    let metrics = TestMetrics::new();
    let flags = cache_over(&store, &provider, &metrics).await;
    assert_eq!(flags.snapshot().stage(M), Some(Stage::NewOnly));

    provider.set(M, "live");
    flags.refresh().await.unwrap();
    let flag = flags.snapshot().get(M).unwrap().clone();
    assert_eq!(flag.stage(), Stage::NewOnly);
    let hold = flag.held.as_deref().expect("held");
    assert!(hold.refusal.remedy.contains("--reverse"), "{hold}");

    // ramp_down does not read legacy: followed.
    provider.set(M, "rampdown");
    flags.refresh().await.unwrap();
    assert_eq!(flags.snapshot().stage(M), Some(Stage::RampDown));
}

/// `hold_unsafe = false`: the source is followed into a refused stage as a forced move, with
/// the overridden refusal in the audit entry.
#[tokio::test(flavor = "multi_thread")]
async fn hold_unsafe_false_follows_the_source_as_an_audited_forced_move() {
    let (_dir, url) = common::sqlite_db();
    let store = store_at(&url).await;
    let provider = MemoryProvider::new();
    provider.set(M, "live");
    let flags = FlagCache::builder(store.clone())
        .source(Arc::new(OpenFeatureSource::new(provider.clone())))
        .migration(M, Stage::LegacyOnly)
        .hold_unsafe(M, false)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    let flag = flags.snapshot().get(M).unwrap().clone();
    assert_eq!((flag.stage(), flag.held.is_none()), (Stage::Live, true));
    let audit = store.audit_log(M, 1).await.unwrap();
    assert!(audit[0].forced, "{audit:?}");
    assert!(audit[0].overridden.is_some(), "{audit:?}");
}

/// Bad values and a failing provider keep the last known stage (counted, logged with the
/// value); a cache that never loaded a migration serves the stage its store row says is
/// served, else the fallback.
#[tokio::test(flavor = "multi_thread")]
async fn bad_values_and_a_failing_source_keep_the_last_known_stage() {
    for (backend, url, _guard) in common::backends().await {
        let store = store_at(&url).await;
        let provider = MemoryProvider::new();
        provider.set(M, "dual_write");
        let metrics = TestMetrics::new();
        let flags = cache_over(&store, &provider, &metrics).await;
        assert_eq!(flags.snapshot().stage(M), Some(Stage::DualWrite));

        let bad: [Value; 5] = [
            "banana".into(),
            "".into(),
            "DUAL_WRITE; drop table".into(),
            Value::Int(3),
            Value::Bool(true),
        ];
        for value in bad {
            // (A reload of the cache's own, pushed by PostgreSQL's NOTIFY, may count too.)
            let before = metrics.counter("twintrack.flags.invalid", ("migration", M));
            provider.set(M, value.clone());
            flags.refresh().await.unwrap();
            let flag = flags.snapshot().get(M).unwrap().clone();
            assert_eq!(
                (flag.stage(), flag.source),
                (Stage::DualWrite, FlagSource::Stale),
                "{backend}: {value:?}"
            );
            assert!(
                metrics.counter("twintrack.flags.invalid", ("migration", M)) > before,
                "{backend}: {value:?} counted"
            );
        }
        provider.remove(M);
        flags.refresh().await.unwrap();
        assert_eq!(flags.snapshot().get(M).unwrap().source, FlagSource::Stale);
        assert_eq!(store.get(M).await.unwrap().state.stage, Stage::DualWrite);

        // The provider fails as a whole.
        provider.set(M, "legacy_only");
        provider.down.store(true, Ordering::SeqCst);
        flags.refresh().await.unwrap();
        let flag = flags.snapshot().get(M).unwrap().clone();
        assert_eq!(
            (flag.stage(), flag.source),
            (Stage::DualWrite, FlagSource::Stale)
        );
        assert!(metrics.counter("twintrack.flags.stale", ("migration", M)) >= 1);

        // A new instance while the provider is down serves what the store says is served.
        let cold = cache_over(&store, &provider, &metrics).await;
        assert_eq!(
            cold.snapshot().stage(M),
            Some(Stage::DualWrite),
            "{backend}"
        );
        assert_eq!(
            cold.snapshot().get("unregistered").unwrap().source,
            FlagSource::Fallback
        );

        // Back: followed again.
        provider.down.store(false, Ordering::SeqCst);
        flags.refresh().await.unwrap();
        cold.refresh().await.unwrap();
        assert_eq!(flags.snapshot().stage(M), Some(Stage::LegacyOnly));
        assert_eq!(cold.snapshot().stage(M), Some(Stage::LegacyOnly));
    }
}

/// Per-request pinning is the cache's, whatever the source: a request in flight keeps the
/// stage it started with while the source flips and the cache reloads; the next one sees it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_keeps_its_stage_while_the_source_flips() {
    use axum::extract::Extension;
    use tokio::sync::{Notify, oneshot};
    use twintrack::{RequestContext, TwinTrackLayer};

    let (_dir, url) = common::sqlite_db();
    let store = store_at(&url).await;
    let provider = MemoryProvider::new();
    provider.set(M, "legacy_only");
    let metrics = TestMetrics::new();
    let flags = cache_over(&store, &provider, &metrics).await;

    type Reached = Arc<tokio::sync::Mutex<Option<oneshot::Sender<()>>>>;
    let reached: Reached = Arc::default();
    let resume = Arc::new(Notify::new());
    async fn handler(
        Extension(reached): Extension<Reached>,
        Extension(resume): Extension<Arc<Notify>>,
    ) -> String {
        let stage = || RequestContext::current().and_then(|c| c.stage(M)).unwrap();
        let first = stage();
        if let Some(tx) = reached.lock().await.take() {
            let _ = tx.send(());
            resume.notified().await;
        }
        format!("{first} {}", stage())
    }
    let app = axum::Router::new()
        .route("/", axum::routing::get(handler))
        .layer(Extension(reached.clone()))
        .layer(Extension(resume.clone()))
        .layer(TwinTrackLayer::new(flags.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}");

    let (tx, rx) = oneshot::channel();
    *reached.lock().await = Some(tx);
    async fn get(url: String) -> String {
        use http_body_util::{BodyExt, Empty};
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let res = client.get(url.parse().unwrap()).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }
    let in_flight = tokio::spawn(get(format!("{base}/")));
    rx.await.unwrap();
    provider.set(M, "dual_write");
    flags.refresh().await.unwrap();
    assert_eq!(flags.snapshot().stage(M), Some(Stage::DualWrite));
    resume.notify_one();
    assert_eq!(in_flight.await.unwrap(), "legacy_only legacy_only");
    assert_eq!(get(format!("{base}/")).await, "dual_write dual_write");
    server.abort();
}

/// The SQL store is a stage source too (what `twintrack status` compares against).
#[tokio::test(flavor = "multi_thread")]
async fn the_sql_store_is_a_stage_source() {
    let (_dir, url) = common::sqlite_db();
    let store = store_at(&url).await;
    let names: Vec<Arc<str>> = vec![M.into(), "unregistered".into()];
    let wanted = store.stages(&names).await.unwrap();
    assert_eq!(wanted.len(), 1);
    assert_eq!(wanted[0].stage, Ok(Stage::LegacyOnly));
}
