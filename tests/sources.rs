//! External flag sources held to twintrack's rules: the flag cache's guarantees (per-request
//! pinning, last known value on error, fallback when never loaded) and the holds (a stage the
//! transition rules refuse given the evidence in twintrack's tables is not served), each run
//! over two sources: an OpenFeature provider, and the LaunchDarkly Rust server SDK fed by its
//! own `TestData` data source (offline). The evidence and the mirror of what is served live in
//! a real database: SQLite, PostgreSQL and MariaDB (when available).
//!
//! The OpenFeature Rust SDK ships no in-memory provider (its Go and Java SDKs do), so
//! `MemoryProvider` below is one: the SDK's `FeatureProvider` trait over a map, as the
//! other SDKs' `InMemoryProvider` is.
#![cfg(all(feature = "openfeature", feature = "launchdarkly"))]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::TestMetrics;
use launchdarkly_server_sdk as ld;
use open_feature::provider::{FeatureProvider, ProviderMetadata, ResolutionDetails};
use open_feature::{
    EvaluationContext, EvaluationError, EvaluationErrorCode, EvaluationResult, StructValue, Value,
};
use twintrack::flags::{
    EvidenceKind, FlagCache, FlagSource, FlagStore, LaunchDarklySource, OpenFeatureSource,
    SqlFlagStore, StageChange, StageSource,
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

/// A flag value as a test sets it.
#[derive(Clone, Debug)]
enum Val {
    Str(&'static str),
    Int(i64),
    Bool(bool),
}

/// A flag system a test edits, and the twintrack source reading it.
trait Flags: Send + Sync {
    /// Sets flag `key` to `value`.
    fn set(&self, key: &str, value: Val);
    /// The source over these flags (sharing them: edits are seen).
    fn source(&self) -> Arc<dyn StageSource>;
    /// Makes every evaluation fail (`false` when the system cannot be made to).
    fn set_down(&self, down: bool) -> bool;
}

impl Flags for MemoryProvider {
    fn set(&self, key: &str, value: Val) {
        let value = match value {
            Val::Str(s) => Value::String(s.to_owned()),
            Val::Int(i) => Value::Int(i),
            Val::Bool(b) => Value::Bool(b),
        };
        self.flags.lock().unwrap().insert(key.to_owned(), value);
    }

    fn source(&self) -> Arc<dyn StageSource> {
        Arc::new(OpenFeatureSource::new(self.clone()))
    }

    fn set_down(&self, down: bool) -> bool {
        self.down.store(down, Ordering::SeqCst);
        true
    }
}

/// The LaunchDarkly SDK with its `TestData` data source: flag edits reach a started client
/// through the SDK's own data store, as streamed updates would.
struct LaunchDarkly {
    data: ld::TestData,
    source: Arc<LaunchDarklySource>,
}

impl LaunchDarkly {
    async fn new() -> LaunchDarkly {
        let data = ld::TestData::new();
        let config = ld::ConfigBuilder::new("sdk-test-key")
            .data_source(&data)
            .event_processor(&ld::NullEventProcessorBuilder::new())
            .build()
            .unwrap();
        let source = LaunchDarklySource::start(config, Duration::from_secs(5))
            .await
            .unwrap();
        assert!(source.client().initialized());
        LaunchDarkly {
            data,
            source: Arc::new(source),
        }
    }
}

impl Flags for LaunchDarkly {
    fn set(&self, key: &str, value: Val) {
        let flag = match value {
            Val::Str(s) => self
                .data
                .flag(key)
                .variations(vec![ld::FlagValue::Str(s.to_owned())])
                .variation_for_all_index(0),
            Val::Int(i) => self
                .data
                .flag(key)
                .variations(vec![ld::FlagValue::Number(i as f64)])
                .variation_for_all_index(0),
            Val::Bool(b) => self.data.flag(key).variation_for_all(b),
        };
        self.data.update(flag);
    }

    fn source(&self) -> Arc<dyn StageSource> {
        self.source.clone()
    }

    fn set_down(&self, _: bool) -> bool {
        false
    }
}

/// Each source a rules test runs over, by name.
async fn kinds() -> Vec<(&'static str, Box<dyn Flags>)> {
    vec![
        ("openfeature", Box::new(MemoryProvider::new())),
        ("launchdarkly", Box::new(LaunchDarkly::new().await)),
    ]
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

/// A cache following `source` over `store`; it reloads only when the test says so.
async fn cache_over(
    store: &Arc<SqlFlagStore>,
    source: Arc<dyn StageSource>,
    metrics: &TestMetrics,
) -> FlagCache {
    FlagCache::builder(store.clone())
        .source(source)
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
/// source asks for a safe stage, it is followed again. Every source, every database.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_is_followed_where_the_rules_allow_and_held_where_they_refuse() {
    for (kind, flags) in kinds().await {
        for (backend, url, _guard) in common::backends_with_mariadb().await {
            followed_and_held(&format!("{kind} over {backend}"), &*flags, &url).await;
        }
    }
}

async fn followed_and_held(case: &str, flags: &dyn Flags, url: &str) {
    let store = store_at(url).await;
    flags.set(M, Val::Str("dualwrite"));
    let metrics = TestMetrics::new();
    let cache = cache_over(&store, flags.source(), &metrics).await;

    // legacy_only -> dual_write only adds writes: followed and mirrored.
    let flag = cache.snapshot().get(M).unwrap().clone();
    assert_eq!(
        (flag.stage(), flag.source, flag.held.is_none()),
        (Stage::DualWrite, FlagSource::Fresh, true),
        "{case}"
    );
    assert_eq!(store.get(M).await.unwrap().state.stage, Stage::DualWrite);
    let audit = store.audit_log(M, 1).await.unwrap();
    assert_eq!(
        (audit[0].actor.as_str(), audit[0].to_stage.as_deref()),
        ("external", Some("dual_write")),
        "{case}: {audit:?}"
    );
    assert!(
        audit[0].reason.contains(&flags.source().describe()),
        "{case}: {audit:?}"
    );

    // live without a finished backfill and a clean verify: held at dual_write.
    flags.set(M, Val::Str("live"));
    cache.refresh().await.unwrap();
    let flag = cache.snapshot().get(M).unwrap().clone();
    assert_eq!(flag.stage(), Stage::DualWrite, "{case}: held");
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
        Some(1),
        "{case}"
    );
    // The tools outside the service see the same hold.
    let seen = twintrack::flags::source::current_hold(&*flags.source(), &*store, M)
        .await
        .unwrap();
    assert_eq!(seen.map(|h| h.wanted), Some(Stage::Live), "{case}");

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
    cache.refresh().await.unwrap();
    let flag = cache.snapshot().get(M).unwrap().clone();
    assert_eq!(
        (flag.stage(), flag.held.is_none()),
        (Stage::Live, true),
        "{case}"
    );
    assert_eq!(
        metrics.gauge_u64_all("twintrack.flags.held", &held),
        Some(0),
        "{case}"
    );

    // Rollback to legacy_only is always allowed; straight back to new_only is not (the
    // writes made in legacy_only never reached the new shape).
    flags.set(M, Val::Str("off"));
    cache.refresh().await.unwrap();
    assert_eq!(cache.snapshot().stage(M), Some(Stage::LegacyOnly), "{case}");
    flags.set(M, Val::Str("complete"));
    cache.refresh().await.unwrap();
    let flag = cache.snapshot().get(M).unwrap().clone();
    assert_eq!(flag.stage(), Stage::LegacyOnly, "{case}");
    assert_eq!(flag.held.as_ref().map(|h| h.wanted), Some(Stage::NewOnly));

    // A safe edit afterwards is followed.
    flags.set(M, Val::Str("dualwrite"));
    cache.refresh().await.unwrap();
    let flag = cache.snapshot().get(M).unwrap().clone();
    assert_eq!(
        (flag.stage(), flag.held.is_none()),
        (Stage::DualWrite, true),
        "{case}"
    );

    // The migration no store row exists for cannot be checked: its fallback is served.
    flags.set("unregistered", Val::Str("complete"));
    cache.refresh().await.unwrap();
    let flag = cache.snapshot().get("unregistered").unwrap().clone();
    assert_eq!(
        (flag.stage(), flag.source),
        (Stage::Shadow, FlagSource::Fallback),
        "{case}"
    );
}

/// Leaving new_only for a stage that reads legacy needs a reverse sync: held without one.
#[tokio::test(flavor = "multi_thread")]
async fn leaving_new_only_for_a_legacy_read_without_a_reverse_sync_is_held() {
    for (kind, flags) in kinds().await {
        let (_dir, url) = common::sqlite_db();
        let store = store_at(&url).await;
        store
            .set_stage(StageChange::new(M, Stage::NewOnly, "test", "setup").force(true))
            .await
            .unwrap();
        flags.set(M, Val::Str("complete"));
        let metrics = TestMetrics::new();
        let cache = cache_over(&store, flags.source(), &metrics).await;
        assert_eq!(cache.snapshot().stage(M), Some(Stage::NewOnly), "{kind}");

        flags.set(M, Val::Str("live"));
        cache.refresh().await.unwrap();
        let flag = cache.snapshot().get(M).unwrap().clone();
        assert_eq!(flag.stage(), Stage::NewOnly, "{kind}");
        let hold = flag.held.as_deref().expect("held");
        assert!(hold.refusal.remedy.contains("--reverse"), "{kind}: {hold}");

        // ramp_down does not read legacy: followed.
        flags.set(M, Val::Str("rampdown"));
        cache.refresh().await.unwrap();
        assert_eq!(cache.snapshot().stage(M), Some(Stage::RampDown), "{kind}");
    }
}

/// `hold_unsafe = false`: the source is followed into a refused stage as a forced move, with
/// the overridden refusal in the audit entry.
#[tokio::test(flavor = "multi_thread")]
async fn hold_unsafe_false_follows_the_source_as_an_audited_forced_move() {
    for (kind, flags) in kinds().await {
        let (_dir, url) = common::sqlite_db();
        let store = store_at(&url).await;
        flags.set(M, Val::Str("live"));
        let cache = FlagCache::builder(store.clone())
            .source(flags.source())
            .migration(M, Stage::LegacyOnly)
            .hold_unsafe(M, false)
            .soft_ttl(Duration::from_secs(3600))
            .build()
            .await;
        let flag = cache.snapshot().get(M).unwrap().clone();
        assert_eq!(
            (flag.stage(), flag.held.is_none()),
            (Stage::Live, true),
            "{kind}"
        );
        let audit = store.audit_log(M, 1).await.unwrap();
        assert!(audit[0].forced, "{kind}: {audit:?}");
        assert!(audit[0].overridden.is_some(), "{kind}: {audit:?}");
    }
}

/// Bad values and a failing source keep the last known stage (counted, logged with the
/// value); a cache that never loaded a migration serves the stage its store row says is
/// served, else the fallback.
#[tokio::test(flavor = "multi_thread")]
async fn bad_values_and_a_failing_source_keep_the_last_known_stage() {
    for (kind, flags) in kinds().await {
        for (backend, url, _guard) in common::backends().await {
            bad_values(&format!("{kind} over {backend}"), &*flags, &url).await;
        }
    }
}

async fn bad_values(case: &str, flags: &dyn Flags, url: &str) {
    let store = store_at(url).await;
    flags.set(M, Val::Str("dual_write"));
    let metrics = TestMetrics::new();
    let cache = cache_over(&store, flags.source(), &metrics).await;
    assert_eq!(cache.snapshot().stage(M), Some(Stage::DualWrite), "{case}");

    for value in [
        Val::Str("banana"),
        Val::Str(""),
        Val::Str("DUAL_WRITE; drop table"),
        Val::Int(3),
        Val::Bool(true),
    ] {
        // (A reload of the cache's own, pushed by PostgreSQL's NOTIFY, may count too.)
        let before = metrics.counter("twintrack.flags.invalid", ("migration", M));
        flags.set(M, value.clone());
        cache.refresh().await.unwrap();
        let flag = cache.snapshot().get(M).unwrap().clone();
        assert_eq!(
            (flag.stage(), flag.source),
            (Stage::DualWrite, FlagSource::Stale),
            "{case}: {value:?}"
        );
        assert!(
            metrics.counter("twintrack.flags.invalid", ("migration", M)) > before,
            "{case}: {value:?} counted"
        );
    }
    assert_eq!(store.get(M).await.unwrap().state.stage, Stage::DualWrite);

    // The source fails as a whole (an OpenFeature provider; for LaunchDarkly see
    // `a_launchdarkly_client_without_flag_data_serves_the_stored_stage_or_the_fallback`).
    flags.set(M, Val::Str("legacy_only"));
    if flags.set_down(true) {
        assert!(cache.refresh().await.is_ok(), "per-flag errors only");
        let flag = cache.snapshot().get(M).unwrap().clone();
        assert_eq!(
            (flag.stage(), flag.source),
            (Stage::DualWrite, FlagSource::Stale),
            "{case}"
        );
        assert!(metrics.counter("twintrack.flags.stale", ("migration", M)) >= 1);

        // A new instance while the source is down serves what the store says is served.
        let cold = cache_over(&store, flags.source(), &metrics).await;
        assert_eq!(cold.snapshot().stage(M), Some(Stage::DualWrite), "{case}");
        assert_eq!(
            cold.snapshot().get("unregistered").unwrap().source,
            FlagSource::Fallback
        );
        flags.set_down(false);
        cold.refresh().await.unwrap();
        assert_eq!(cold.snapshot().stage(M), Some(Stage::LegacyOnly), "{case}");
    }
    // Good again: followed.
    cache.refresh().await.unwrap();
    assert_eq!(cache.snapshot().stage(M), Some(Stage::LegacyOnly), "{case}");
}

/// A LaunchDarkly client that never received flag data (its streaming endpoint refuses
/// connections): the source fails as a whole; a cache serves the stage twintrack's table says
/// is served, the fallback for a migration it has no row for, and follows once data arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_launchdarkly_client_without_flag_data_serves_the_stored_stage_or_the_fallback() {
    let (_dir, url) = common::sqlite_db();
    let store = store_at(&url).await;
    store
        .set_stage(StageChange::new(M, Stage::DualWrite, "test", "setup"))
        .await
        .unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let config = ld::ConfigBuilder::new("sdk-test-key")
        .service_endpoints(
            ld::ServiceEndpointsBuilder::new()
                .streaming_base_url(&endpoint)
                .polling_base_url(&endpoint)
                .events_base_url(&endpoint),
        )
        .event_processor(&ld::NullEventProcessorBuilder::new())
        .build()
        .unwrap();
    let source = LaunchDarklySource::start(config, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(!source.client().initialized());
    let metrics = TestMetrics::new();
    let cache = cache_over(&store, Arc::new(source), &metrics).await;
    let snapshot = cache.snapshot();
    assert_eq!(snapshot.stage(M), Some(Stage::DualWrite));
    let unregistered = snapshot.get("unregistered").unwrap();
    assert_eq!(
        (unregistered.stage(), unregistered.source),
        (Stage::Shadow, FlagSource::Fallback)
    );
    let err = cache.refresh().await.unwrap_err();
    assert!(err.to_string().contains("no flag data"), "{err}");
    assert!(metrics.counter("twintrack.flags.refresh", ("outcome", "error")) >= 2);
    assert_eq!(
        cache.snapshot().get(M).unwrap().source,
        FlagSource::Stale,
        "the last known stage, kept"
    );
}

/// Per-request pinning is the cache's, whatever the source: a request in flight keeps the
/// stage it started with while the source flips and the cache reloads; the next one sees it.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_keeps_its_stage_while_the_source_flips() {
    for (kind, flags) in kinds().await {
        pinned(kind, &*flags).await;
    }
}

async fn pinned(kind: &str, flags: &dyn Flags) {
    use axum::extract::Extension;
    use tokio::sync::{Notify, oneshot};
    use twintrack::{RequestContext, TwinTrackLayer};

    let (_dir, url) = common::sqlite_db();
    let store = store_at(&url).await;
    flags.set(M, Val::Str("off"));
    let metrics = TestMetrics::new();
    let cache = cache_over(&store, flags.source(), &metrics).await;

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
        .layer(TwinTrackLayer::new(cache.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}");

    async fn get(url: String) -> String {
        use http_body_util::{BodyExt, Empty};
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Empty<bytes::Bytes>>();
        let res = client.get(url.parse().unwrap()).await.unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }
    let (tx, rx) = oneshot::channel();
    *reached.lock().await = Some(tx);
    let in_flight = tokio::spawn(get(format!("{base}/")));
    rx.await.unwrap();
    flags.set(M, Val::Str("dualwrite"));
    cache.refresh().await.unwrap();
    assert_eq!(cache.snapshot().stage(M), Some(Stage::DualWrite), "{kind}");
    resume.notify_one();
    assert_eq!(
        in_flight.await.unwrap(),
        "legacy_only legacy_only",
        "{kind}"
    );
    assert_eq!(
        get(format!("{base}/")).await,
        "dual_write dual_write",
        "{kind}"
    );
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

/// Following is edge-triggered: an instance acts on a wanted stage it has not settled yet, so
/// two instances whose sources disagree for a while (one saw an edit first) do not undo each
/// other's moves, and an operator's rollback is not undone by a source still saying the old
/// stage. Every instance serves what twintrack's table holds.
#[tokio::test(flavor = "multi_thread")]
async fn instances_do_not_undo_each_others_moves_or_an_operators_rollback() {
    let (_dir, url) = common::sqlite_db();
    let store = store_at(&url).await;
    let (a, b) = (MemoryProvider::new(), MemoryProvider::new());
    a.set(M, Val::Str("shadow"));
    b.set(M, Val::Str("shadow"));
    store
        .set_stage(StageChange::new(M, Stage::DualWrite, "test", "setup"))
        .await
        .unwrap();
    let now = now_micros();
    store
        .record_evidence(M, EvidenceKind::BackfillFinished, now, "test")
        .await
        .unwrap();
    store
        .record_evidence(M, EvidenceKind::VerifyClean, now + 1, "test")
        .await
        .unwrap();
    let metrics = TestMetrics::new();
    let cache_a = cache_over(&store, a.source(), &metrics).await;
    let cache_b = cache_over(&store, b.source(), &metrics).await;
    assert_eq!(cache_b.snapshot().stage(M), Some(Stage::Shadow));

    // A's source is edited first: A moves to live; B, still seeing shadow, follows the table.
    a.set(M, Val::Str("live"));
    cache_a.refresh().await.unwrap();
    cache_b.refresh().await.unwrap();
    cache_a.refresh().await.unwrap();
    assert_eq!(cache_a.snapshot().stage(M), Some(Stage::Live));
    assert_eq!(cache_b.snapshot().stage(M), Some(Stage::Live));
    let moves = store
        .audit_log(M, 100)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.actor == "external")
        .count();
    assert_eq!(moves, 2, "shadow then live, no back and forth");

    // An operator rolls back during an incident: neither instance undoes it.
    store
        .set_stage(StageChange::new(M, Stage::Shadow, "oncall", "incident"))
        .await
        .unwrap();
    for _ in 0..3 {
        cache_a.refresh().await.unwrap();
        cache_b.refresh().await.unwrap();
    }
    assert_eq!(store.get(M).await.unwrap().state.stage, Stage::Shadow);
    assert_eq!(cache_a.snapshot().stage(M), Some(Stage::Shadow));
    assert_eq!(cache_b.snapshot().stage(M), Some(Stage::Shadow));
    // A new edit in the source is followed again.
    b.set(M, Val::Str("dualwrite"));
    cache_b.refresh().await.unwrap();
    assert_eq!(store.get(M).await.unwrap().state.stage, Stage::DualWrite);
}
