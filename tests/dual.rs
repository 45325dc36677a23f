//! The dual store, proven through the quickstart's own repositories (`examples/quickstart/
//! repos.rs`) on real PostgreSQL and SQLite, with `bigint` keys on both, text keys on SQLite
//! and UUID keys on PostgreSQL (each guarantee runs once per [`common::Shape`]): per-stage
//! routing, authoritative-first writes, repair intents and the repair worker, atomicity, and
//! shadow-read classification.

mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Shape, TestKey, TestMetrics};
use repos::{
    LegacySettings, NewSettings, Settings, SettingsRepo, SettingsResync, UserError, UserId, Users,
};
use twintrack::db::{Native, Query, query};
use twintrack::dual::{DualStore, DualStoreBuilder, FaultHooks, NativeConnection, pending_intents};
use twintrack::flags::{BoxFuture, FlagCache, FlagStore, SqlFlagStore, StageChange, TuningChange};
use twintrack::shadow::{MismatchClass, ShadowMode, ShadowOptions, list_mismatches};
use twintrack::{Backend, Database, DynKey, Side, Stage};

const M: &str = "user_settings";

/// A key type the dual store's guarantees run with: the quickstart's ids and the tests' keys.
trait K: UserId + TestKey {}
impl<T: UserId + TestKey> K for T {}

/// A side's repository that records its calls and can be told to fail or panic.
struct Instrumented<DB: Native, I> {
    side: &'static str,
    inner: Arc<dyn SettingsRepo<DB, I>>,
    calls: Arc<Mutex<Vec<String>>>,
    fail_put: AtomicBool,
    fail_delete: AtomicBool,
    fail_get: AtomicBool,
    panic_get: AtomicBool,
    gets: AtomicUsize,
    /// Runs once, before the next `get` reads (a write "landing between the two reads").
    before_get: Mutex<Option<BoxFuture<'static, ()>>>,
}

impl<DB: Native, I> Instrumented<DB, I> {
    fn new(
        side: &'static str,
        inner: Arc<dyn SettingsRepo<DB, I>>,
        calls: Arc<Mutex<Vec<String>>>,
    ) -> Self {
        Instrumented {
            side,
            inner,
            calls,
            fail_put: AtomicBool::new(false),
            fail_delete: AtomicBool::new(false),
            fail_get: AtomicBool::new(false),
            panic_get: AtomicBool::new(false),
            gets: AtomicUsize::new(0),
            before_get: Mutex::new(None),
        }
    }

    fn log(&self, op: &str) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{}.{op}", self.side));
    }
}

fn injected() -> sqlx::Error {
    sqlx::Error::Protocol("injected failure".into())
}

impl<DB: Native, I: K> SettingsRepo<DB, I> for Instrumented<DB, I> {
    fn get<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: I,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        Box::pin(async move {
            self.log("get");
            self.gets.fetch_add(1, Ordering::SeqCst);
            let hook = self.before_get.lock().unwrap().take();
            if let Some(hook) = hook {
                hook.await;
            }
            if self.panic_get.load(Ordering::SeqCst) {
                panic!("{} side panicked", self.side);
            }
            if self.fail_get.load(Ordering::SeqCst) {
                return Err(injected());
            }
            self.inner.get(conn, id, lock).await
        })
    }

    fn put<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: I,
        s: Settings,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            self.log("put");
            if self.fail_put.load(Ordering::SeqCst) {
                return Err(injected());
            }
            self.inner.put(conn, id, s).await
        })
    }

    fn delete<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        id: I,
    ) -> BoxFuture<'c, sqlx::Result<bool>> {
        Box::pin(async move {
            self.log("delete");
            if self.fail_delete.load(Ordering::SeqCst) {
                return Err(injected());
            }
            self.inner.delete(conn, id).await
        })
    }
}

type Builder<DB, I> = DualStoreBuilder<dyn SettingsRepo<DB, I>, SettingsResync<DB, I>>;

struct Fixture<DB: Native, I: K> {
    /// `backend/key`, for messages.
    name: String,
    url: String,
    db: Database,
    pool: sqlx::Pool<DB>,
    flags_store: Arc<SqlFlagStore>,
    flags: FlagCache,
    users: Users<DB, I>,
    calls: Arc<Mutex<Vec<String>>>,
    legacy: Arc<Instrumented<DB, I>>,
    new: Arc<Instrumented<DB, I>>,
    metrics: TestMetrics,
    _guard: Option<tempfile::TempDir>,
}

impl<DB: Native, I: K> Fixture<DB, I> {
    async fn new(shape: Shape, shadow: ShadowOptions) -> Self {
        Self::custom(shape, shadow, |b| b).await
    }

    async fn custom(
        shape: Shape,
        shadow: ShadowOptions,
        customize: impl FnOnce(Builder<DB, I>) -> Builder<DB, I>,
    ) -> Self {
        let db = Database::connect(&shape.url).await.unwrap();
        let pool = db.typed::<DB>().unwrap().clone();
        repos::create_shapes::<I>(&db).await.unwrap();
        let flags_store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
        flags_store.register(M, "test").await.unwrap();
        let flags = FlagCache::builder(flags_store.clone())
            .migration(M, Stage::LegacyOnly)
            .soft_ttl(Duration::from_secs(3600))
            .build()
            .await;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (l, n) = repos::repos::<DB, I>();
        let legacy = Arc::new(Instrumented::new("legacy", l, calls.clone()));
        let new = Arc::new(Instrumented::new("new", n, calls.clone()));
        let metrics = TestMetrics::new();
        let builder = DualStore::builder(
            M,
            legacy.clone() as Arc<dyn SettingsRepo<DB, I>>,
            new.clone() as Arc<dyn SettingsRepo<DB, I>>,
            pool.clone(),
            flags.clone(),
            SettingsResync::default(),
        )
        .shadow(shadow)
        .metrics(metrics.metrics());
        let users = Users {
            settings: customize(builder).build().unwrap(),
        };
        Fixture {
            name: shape.name(),
            url: shape.url,
            db,
            pool,
            flags_store,
            flags,
            users,
            calls,
            legacy,
            new,
            metrics,
            _guard: shape.guard,
        }
    }

    async fn stage(&self, stage: Stage) {
        self.flags_store
            .set_stage(StageChange::new(M, stage, "test", "setup").force(true))
            .await
            .unwrap();
        self.flags.refresh().await.unwrap();
    }

    async fn sample_rate(&self, rate: f64) {
        self.flags_store
            .tune(TuningChange {
                migration: M.into(),
                shadow_sample_rate: Some(rate),
                read_rollout_percent: None,
                expected_version: None,
                actor: "test".into(),
                reason: "test".into(),
            })
            .await
            .unwrap();
        self.flags.refresh().await.unwrap();
    }

    fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    /// What each shape holds for `id`, read directly (not through the dual store).
    async fn sides(&self, id: &I) -> (Option<Settings>, Option<Settings>) {
        sides::<DB, I>(&self.pool, id).await
    }

    /// Writes each shape directly, bypassing the dual store.
    async fn plant(&self, id: &I, legacy: &Settings, new: &Settings) {
        plant::<DB, I>(&self.pool, id, legacy, new).await
    }

    async fn user_exists(&self, id: &I) -> bool {
        query("SELECT id FROM users WHERE id = $1")
            .bind_key(&id.to_dyn())
            .fetch_optional(&self.db)
            .await
            .unwrap()
            .is_some()
    }
}

async fn sides<DB: Native, I: K>(
    pool: &sqlx::Pool<DB>,
    id: &I,
) -> (Option<Settings>, Option<Settings>) {
    let mut conn = pool.acquire().await.unwrap();
    let legacy = SettingsRepo::<DB, I>::get(&LegacySettings, &mut conn, id.clone(), false)
        .await
        .unwrap();
    let new = SettingsRepo::<DB, I>::get(
        &NewSettings { standalone: false },
        &mut conn,
        id.clone(),
        false,
    )
    .await
    .unwrap();
    (legacy, new)
}

async fn plant<DB: Native, I: K>(pool: &sqlx::Pool<DB>, id: &I, legacy: &Settings, new: &Settings) {
    let mut conn = pool.acquire().await.unwrap();
    assert!(
        SettingsRepo::<DB, I>::put(&LegacySettings, &mut conn, id.clone(), legacy.clone())
            .await
            .unwrap()
    );
    assert!(
        SettingsRepo::<DB, I>::put(
            &NewSettings { standalone: false },
            &mut conn,
            id.clone(),
            new.clone()
        )
        .await
        .unwrap()
    );
}

/// Runs `$test::<DB, K>(fixture, args)` for a fixture of every shape built with `$shadow`.
macro_rules! each_fixture {
    ($test:ident, $shadow:expr) => {{
        async fn with_fixture<DB: Native, I: K>(shape: Shape, shadow: ShadowOptions) {
            $test(Fixture::<DB, I>::new(shape, shadow).await).await
        }
        each_shape_with_mariadb!(with_fixture, $shadow.clone());
    }};
}

/// The modes in which the caller waits for both reads.
const WAITING_MODES: [ShadowMode; 3] = [
    ShadowMode::Serial,
    ShadowMode::Random,
    ShadowMode::Concurrent,
];

fn mode(mode: ShadowMode) -> ShadowOptions {
    ShadowOptions {
        mode,
        ..ShadowOptions::default()
    }
}

fn settings(theme: &str) -> Settings {
    Settings {
        theme: theme.into(),
        notifications_enabled: theme.len().is_multiple_of(2),
    }
}

fn expected_calls(sides: &[Side], op: &str) -> Vec<String> {
    sides.iter().map(|s| format!("{s}.{op}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_stage_writes_and_serves_exactly_its_sides() {
    each_fixture!(each_stage_writes_and_serves, ShadowOptions::default());
}

async fn each_stage_writes_and_serves<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    let mut mismatches = 0;
    for (i, stage) in Stage::ALL.into_iter().enumerate() {
        f.stage(stage).await;
        let plan = stage.plan();
        let wrote = |side| plan.writes.contains(&side);

        // Create: exactly the stage's sides, in its order.
        f.take_calls();
        let s1 = settings("one");
        let id = f
            .users
            .create(&format!("u{i}@example.com"), s1.clone())
            .await
            .unwrap();
        assert_eq!(
            f.take_calls(),
            expected_calls(plan.writes, "put"),
            "{b} {stage}: create"
        );
        let (legacy, new) = f.sides(&id).await;
        assert_eq!(
            legacy.is_some(),
            wrote(Side::Legacy),
            "{b} {stage}: legacy after create"
        );
        assert_eq!(
            new.is_some(),
            wrote(Side::New),
            "{b} {stage}: new after create"
        );

        // Update.
        let s2 = settings("second");
        f.users.update(&id, s2.clone()).await.unwrap();
        assert_eq!(
            f.take_calls(),
            expected_calls(plan.writes, "put"),
            "{b} {stage}: update"
        );
        let (legacy, new) = f.sides(&id).await;
        let after = |side| wrote(side).then(|| s2.clone());
        assert_eq!(
            (legacy, new),
            (after(Side::Legacy), after(Side::New)),
            "{b} {stage}"
        );

        // Read: planted apart, the stage's served side answers.
        let (on_legacy, on_new) = (settings("planted-legacy"), settings("planted-new"));
        f.plant(&id, &on_legacy, &on_new).await;
        f.take_calls();
        let served = f.users.settings(&id).await.unwrap();
        let want = match plan.served {
            Side::Legacy => &on_legacy,
            Side::New => &on_new,
        };
        assert_eq!(&served, want, "{b} {stage}: served side");
        let mut reads = vec![format!("{}.get", plan.served)];
        if let Some(shadow) = plan.shadow {
            reads.push(format!("{shadow}.get"));
        }
        assert_eq!(
            f.take_calls(),
            reads,
            "{b} {stage}: read calls (serial shadow)"
        );
        if plan.shadow.is_some() {
            // The planted divergence is re-checked in the background (two more reads through
            // these repositories): wait for its record so those calls do not leak into the
            // next step's log.
            mismatches += 1;
            wait_for_mismatch(&f, mismatches).await;
            f.take_calls();
        }

        // Delete: exactly the stage's sides; the user row itself goes in every stage.
        f.users.delete(&id).await.unwrap();
        assert_eq!(
            f.take_calls(),
            expected_calls(plan.writes, "delete"),
            "{b} {stage}: delete"
        );
        let (legacy, new) = f.sides(&id).await;
        assert_eq!(legacy, None, "{b} {stage}");
        assert_eq!(
            new.is_none(),
            wrote(Side::New),
            "{b} {stage}: new row after delete"
        );
        assert!(!f.user_exists(&id).await);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_authoritative_write_never_reaches_the_other_side() {
    each_fixture!(failing_authoritative_write, ShadowOptions::default());
}

async fn failing_authoritative_write<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    for (stage, authoritative) in [(Stage::DualWrite, &f.legacy), (Stage::Live, &f.new)] {
        f.stage(stage).await;
        let id = f
            .users
            .create(&format!("{stage}@example.com"), settings("before"))
            .await
            .unwrap();
        f.take_calls();
        authoritative.fail_put.store(true, Ordering::SeqCst);
        let err = f.users.update(&id, settings("after")).await.unwrap_err();
        authoritative.fail_put.store(false, Ordering::SeqCst);
        assert!(
            matches!(err, UserError::Failed(twintrack::Error::Repository { .. })),
            "{b}: {err:?}"
        );
        assert_eq!(
            f.take_calls(),
            [format!("{}.put", authoritative.side)],
            "{b} {stage}"
        );
        // The failed call is in the duration histogram, with its error.type (semantic
        // conventions), in buckets made for database calls.
        let side = authoritative.side;
        let failed = [
            ("twintrack.side", side),
            ("db.operation.name", "write"),
            ("error.type", "protocol"),
            ("twintrack.migration", M),
        ];
        let bounds = twintrack::metrics::DURATION_BUCKETS;
        assert_eq!(
            f.metrics
                .histogram_count("db.client.operation.duration", &failed, &bounds),
            1,
            "{b} {stage}"
        );
        assert_eq!(
            f.sides(&id).await,
            (Some(settings("before")), Some(settings("before")))
        );
        assert_eq!(pending_intents(&f.db, M).await.unwrap(), 0);
    }
}

/// A constraint only the new shape has makes its write fail: the request succeeds, an intent
/// is recorded in the same transaction, and once the cause is gone the repair worker converges.
#[tokio::test(flavor = "multi_thread")]
async fn a_failing_other_side_records_an_intent_and_repair_converges() {
    each_fixture!(failing_other_side, ShadowOptions::default());
}

async fn failing_other_side<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::DualWrite).await;
    let (add, drop) = match f.db.backend() {
        Backend::Postgres => (
            "ALTER TABLE user_settings ADD CONSTRAINT short_theme CHECK (length(theme) <= 10)",
            "ALTER TABLE user_settings DROP CONSTRAINT short_theme",
        ),
        Backend::MySql => (
            "ALTER TABLE user_settings ADD CONSTRAINT short_theme CHECK (CHAR_LENGTH(theme) <= 10)",
            "ALTER TABLE user_settings DROP CONSTRAINT short_theme",
        ),
        _ => (
            "CREATE TRIGGER short_theme BEFORE INSERT ON user_settings WHEN length(NEW.theme) > 10 BEGIN SELECT RAISE(ABORT, 'theme too long'); END",
            "DROP TRIGGER short_theme",
        ),
    };
    query(add).execute(&f.db).await.unwrap();
    let long = settings("a-very-long-theme-name");
    let id = f
        .users
        .create("long@example.com", long.clone())
        .await
        .unwrap();
    assert_eq!(f.sides(&id).await, (Some(long.clone()), None), "{b}");
    assert_eq!(pending_intents(&f.db, M).await.unwrap(), 1, "{b}");
    assert_eq!(
        f.metrics
            .counter("twintrack.repair.intents", ("event", "recorded")),
        1
    );
    // The intent names the key by its canonical text.
    let stored: String = query("SELECT key_text FROM twintrack_repair_intents")
        .scalar(&f.db)
        .await
        .unwrap();
    assert_eq!(stored, id.to_text(), "{b}");
    assert_eq!(I::parse(&stored).unwrap(), id, "{b}");

    // While the cause is still there, repair fails and keeps the intent.
    let report = f.users.settings.repair(Duration::ZERO).await.unwrap();
    assert_eq!((report.copied, report.failed), (0, 1), "{b}: {report:?}");
    assert_eq!(pending_intents(&f.db, M).await.unwrap(), 1);

    query(drop).execute(&f.db).await.unwrap();
    // Too young for a worker that waits an hour.
    let report = f
        .users
        .settings
        .repair(Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(report.copied, 0);
    let report = f.users.settings.repair(Duration::ZERO).await.unwrap();
    assert_eq!((report.copied, report.failed), (1, 0), "{b}: {report:?}");
    assert_eq!(
        f.sides(&id).await,
        (Some(long.clone()), Some(long)),
        "{b}: converged"
    );
    assert_eq!(pending_intents(&f.db, M).await.unwrap(), 0);

    // Through `write` (the store's own transaction, no savepoint): the other side fails, the
    // transaction is rolled back, and the authoritative side is written again alone with the
    // intent, in a new one. Committed once, nothing of the failed attempt left.
    f.take_calls();
    f.new.fail_put.store(true, Ordering::SeqCst);
    f.users.update(&id, settings("changed")).await.unwrap();
    f.new.fail_put.store(false, Ordering::SeqCst);
    assert_eq!(
        f.take_calls(),
        ["legacy.put", "new.put", "legacy.put"],
        "{b}"
    );
    assert_eq!(
        f.sides(&id).await,
        (
            Some(settings("changed")),
            Some(settings("a-very-long-theme-name"))
        ),
        "{b}"
    );
    assert_eq!(pending_intents(&f.db, M).await.unwrap(), 1, "{b}");
    let report = f.users.settings.repair(Duration::ZERO).await.unwrap();
    assert_eq!((report.copied, report.failed), (1, 0), "{b}: {report:?}");
    assert_eq!(
        f.sides(&id).await,
        (Some(settings("changed")), Some(settings("changed"))),
        "{b}"
    );

    // A missed delete: repair removes the row the authoritative side no longer has.
    f.new.fail_delete.store(true, Ordering::SeqCst);
    let id2 = f
        .users
        .create("gone@example.com", settings("x"))
        .await
        .unwrap();
    f.users.delete(&id2).await.unwrap();
    f.new.fail_delete.store(false, Ordering::SeqCst);
    assert_eq!(f.sides(&id2).await, (None, Some(settings("x"))), "{b}");
    let report = f.users.settings.repair(Duration::ZERO).await.unwrap();
    assert_eq!((report.deleted, report.failed), (1, 0), "{b}: {report:?}");
    assert_eq!(f.sides(&id2).await, (None, None), "{b}");
    // Idempotent: nothing left to do.
    assert_eq!(
        f.users.settings.repair(Duration::ZERO).await.unwrap(),
        Default::default()
    );
}

/// `DualStore::transaction`, the store's own transaction for writes that also touch other
/// tables (the quickstart's create and delete): one unit with the caller's statements; when
/// the other side fails, rolled back and run again with an intent (whatever the body did with
/// the error); a body's error rolls everything back.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_transaction_is_one_unit_and_runs_again_when_the_other_side_fails() {
    each_fixture!(store_transaction, ShadowOptions::default());
}

async fn store_transaction<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::DualWrite).await;
    let users_named = async |email: &str| -> i64 {
        query("SELECT COUNT(*) FROM users WHERE email = $1")
            .bind(email)
            .scalar(&f.db)
            .await
            .unwrap()
    };
    // Both sides and the user row, in one transaction.
    let id = f
        .users
        .create("tx@example.com", settings("a"))
        .await
        .unwrap();
    assert_eq!(f.take_calls(), ["legacy.put", "new.put"], "{b}");
    assert_eq!(
        f.sides(&id).await,
        (Some(settings("a")), Some(settings("a"))),
        "{b}"
    );

    // The other side fails: run again, the user row inserted once, an intent for the other.
    f.new.fail_put.store(true, Ordering::SeqCst);
    let failed = f
        .users
        .create("tx2@example.com", settings("b"))
        .await
        .unwrap();
    assert_eq!(
        f.take_calls(),
        ["legacy.put", "new.put", "legacy.put"],
        "{b}"
    );
    assert_eq!(users_named("tx2@example.com").await, 1, "{b}");
    assert_eq!(f.sides(&failed).await, (Some(settings("b")), None), "{b}");
    assert_eq!(pending_intents(&f.db, M).await.unwrap(), 1, "{b}");

    // A body that swallows the other side's error still runs again: its first attempt is void.
    let swallowed = put_in_transaction(&f, &id, "c", true).await.unwrap();
    f.new.fail_put.store(false, Ordering::SeqCst);
    assert!(
        !swallowed,
        "{b}: the run that counts wrote with an intent, no error"
    );
    assert_eq!(
        f.take_calls(),
        ["legacy.put", "new.put", "legacy.put"],
        "{b}"
    );
    assert_eq!(
        f.sides(&id).await,
        (Some(settings("c")), Some(settings("a"))),
        "{b}"
    );
    assert_eq!(pending_intents(&f.db, M).await.unwrap(), 2, "{b}");

    // The body's error: nothing of it committed, the error returned as it was.
    let err = put_in_transaction(&f, &id, "d", false).await.unwrap_err();
    assert!(matches!(err, UserError::NotFound), "{b}: {err:?}");
    assert_eq!(f.take_calls(), ["legacy.put", "new.put"], "{b}");
    assert_eq!(
        f.sides(&id).await,
        (Some(settings("c")), Some(settings("a"))),
        "{b}"
    );
    // The authoritative side's error swallowed by the body: never committed, an error.
    f.legacy.fail_put.store(true, Ordering::SeqCst);
    let err = put_in_transaction(&f, &id, "e", true).await.unwrap_err();
    f.legacy.fail_put.store(false, Ordering::SeqCst);
    assert!(
        matches!(err, UserError::Failed(twintrack::Error::Internal(_))),
        "{b}: {err:?}"
    );
    assert_eq!(f.take_calls(), ["legacy.put"], "{b}");
    assert_eq!(
        f.sides(&id).await,
        (Some(settings("c")), Some(settings("a"))),
        "{b}"
    );
    // The quickstart's delete of an unknown user: rolled back the same way (404).
    assert!(
        matches!(
            f.users.delete(&I::nth(9_999_999)).await,
            Err(UserError::NotFound)
        ),
        "{b}"
    );

    let report = f.users.settings.repair(Duration::ZERO).await.unwrap();
    assert_eq!((report.copied, report.failed), (2, 0), "{b}: {report:?}");
    assert_eq!(
        f.sides(&id).await,
        (Some(settings("c")), Some(settings("c"))),
        "{b}"
    );
}

/// Puts `theme` for `id` in a store transaction. `swallow`: the body ignores the write's error
/// and returns whether there was one; else it returns the write's error, or `NotFound`.
async fn put_in_transaction<DB: Native, I: K>(
    f: &Fixture<DB, I>,
    id: &I,
    theme: &'static str,
    swallow: bool,
) -> Result<bool, UserError> {
    let key = id.clone();
    f.users
        .settings
        .transaction(move |tx| {
            let key = key.clone();
            Box::pin(async move {
                let k = key.clone();
                let wrote = tx
                    .write(&key, move |repo, conn| {
                        repo.put(conn, k.clone(), settings(theme))
                    })
                    .await;
                if swallow {
                    return Ok(wrote.is_err());
                }
                wrote?;
                Err(UserError::NotFound)
            })
        })
        .await
}

/// A failure injected after both statements ran and before the commit leaves neither written.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_before_commit_leaves_neither_side_written() {
    each_shape_with_mariadb!(failure_before_commit);
}

async fn failure_before_commit<DB: Native, I: K>(shape: Shape) {
    let fail = Arc::new(AtomicBool::new(false));
    let hook = fail.clone();
    let f = Fixture::<DB, I>::custom(shape, ShadowOptions::default(), move |b| {
        b.fault_hooks(FaultHooks {
            before_commit: Some(Arc::new(move |_key: &str| hook.load(Ordering::SeqCst))),
            ..FaultHooks::default()
        })
    })
    .await;
    let b = &f.name;
    for stage in [Stage::DualWrite, Stage::Live] {
        f.stage(stage).await;
        let id = f
            .users
            .create(&format!("{stage}@x.io"), settings("before"))
            .await
            .unwrap();
        fail.store(true, Ordering::SeqCst);
        assert!(f.users.update(&id, settings("after")).await.is_err());
        fail.store(false, Ordering::SeqCst);
        assert_eq!(
            f.take_calls().len(),
            4,
            "{b}: both sides ran (create + update)"
        );
        assert_eq!(
            f.sides(&id).await,
            (Some(settings("before")), Some(settings("before"))),
            "{b} {stage}: neither side written"
        );
    }
}

async fn wait_for_mismatch<DB: Native, I: K>(
    f: &Fixture<DB, I>,
    n: usize,
) -> Vec<twintrack::shadow::Mismatch> {
    let start = std::time::Instant::now();
    loop {
        let found = list_mismatches(&f.db, M, 100).await.unwrap();
        if found.len() >= n {
            return found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}: no mismatch recorded",
            f.name
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_reads_classify_confirmed_and_transient_mismatches() {
    each_fixture!(shadow_classification, ShadowOptions::default());
}

async fn shadow_classification<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::Shadow).await;
    let id = f
        .users
        .create("s@example.com", settings("same"))
        .await
        .unwrap();
    assert_eq!(f.users.settings(&id).await.unwrap(), settings("same"));

    // Planted divergence: served from legacy (authoritative), confirmed, diff names the field.
    f.plant(&id, &settings("dark"), &settings("light")).await;
    assert_eq!(
        f.users.settings(&id).await.unwrap(),
        settings("dark"),
        "{b}"
    );
    let found = wait_for_mismatch(&f, 1).await;
    assert_eq!(found[0].class, MismatchClass::Confirmed, "{b}");
    assert_eq!(found[0].key, id.to_text(), "{b}");
    assert_eq!(found[0].stage, "shadow");
    let paths: Vec<&str> = found[0].diff.iter().map(|d| d.path.as_str()).collect();
    assert!(paths.contains(&"theme"), "{b}: {paths:?}");

    // The operator's view of it.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .args([
            "--json",
            "--database-url",
            &f.url,
            "mismatches",
            M,
            "--limit",
            "5",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["class"], "confirmed");
    assert_eq!(listed[0]["key"], id.to_text(), "{b}");
    assert!(
        listed[0]["diff"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["path"] == "theme")
    );

    // A write landing between the two reads: transient.
    f.plant(&id, &settings("v1"), &settings("v1")).await;
    let (pool, key) = (f.pool.clone(), id.clone());
    *f.new.before_get.lock().unwrap() = Some(Box::pin(async move {
        plant::<DB, I>(&pool, &key, &settings("v2"), &settings("v2")).await;
    }));
    assert_eq!(
        f.users.settings(&id).await.unwrap(),
        settings("v1"),
        "{b}: read before the write"
    );
    let found = wait_for_mismatch(&f, 2).await;
    assert_eq!(found[0].class, MismatchClass::Transient, "{b}");
    assert!(found[0].diff.is_empty());
    assert!(
        f.metrics
            .counter("twintrack.shadow.results", ("result", "transient"))
            >= 1
    );
    assert!(
        f.metrics
            .counter("twintrack.shadow.results", ("result", "confirmed"))
            >= 1
    );
    assert!(
        f.metrics
            .counter("twintrack.shadow.results", ("result", "match"))
            >= 1
    );

    // In live the new side serves and legacy is compared.
    f.stage(Stage::Live).await;
    f.plant(&id, &settings("old"), &settings("new")).await;
    assert_eq!(f.users.settings(&id).await.unwrap(), settings("new"), "{b}");
    let found = wait_for_mismatch(&f, 3).await;
    assert_eq!(
        (found[0].class, found[0].stage.as_str()),
        (MismatchClass::Confirmed, "live")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_or_panicking_shadow_side_never_changes_the_served_value() {
    for m in WAITING_MODES {
        each_fixture!(shadow_failures_leave_the_served_value, mode(m));
    }
}

async fn shadow_failures_leave_the_served_value<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::Shadow).await;
    let id = f
        .users
        .create("e@example.com", settings("ok"))
        .await
        .unwrap();
    f.new.fail_get.store(true, Ordering::SeqCst);
    assert_eq!(f.users.settings(&id).await.unwrap(), settings("ok"), "{b}");
    f.new.fail_get.store(false, Ordering::SeqCst);
    f.new.panic_get.store(true, Ordering::SeqCst);
    assert_eq!(f.users.settings(&id).await.unwrap(), settings("ok"), "{b}");
    f.new.panic_get.store(false, Ordering::SeqCst);
    assert_eq!(
        f.metrics
            .counter("twintrack.shadow.errors", ("side", "new")),
        2,
        "{b}"
    );
    assert_eq!(
        f.metrics
            .counter("twintrack.shadow.errors", ("side", "legacy")),
        0,
        "{b}"
    );
    // The served side failing is the caller's error, counted on its side.
    f.legacy.fail_get.store(true, Ordering::SeqCst);
    assert!(f.users.settings(&id).await.is_err());
    f.legacy.fail_get.store(false, Ordering::SeqCst);
    assert_eq!(
        f.metrics
            .counter("twintrack.shadow.errors", ("side", "legacy")),
        1,
        "{b}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        list_mismatches(&f.db, M, 10).await.unwrap().is_empty(),
        "{b}: nothing compared"
    );
}

/// In `concurrent` mode the shadow read runs in a task of its own; a caller that gives up on
/// the read (a dropped request) takes that task down with it, as it would a joined future.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_concurrent_read_takes_its_shadow_read_down_with_it() {
    each_fixture!(dropped_concurrent_read, mode(ShadowMode::Concurrent));
}

async fn dropped_concurrent_read<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::Shadow).await;
    let id = f
        .users
        .create("d@example.com", settings("ok"))
        .await
        .unwrap();
    let started = Arc::new(tokio::sync::Notify::new());
    let finished = Arc::new(AtomicBool::new(false));
    let (start, done) = (started.clone(), finished.clone());
    *f.new.before_get.lock().unwrap() = Some(Box::pin(async move {
        start.notify_one();
        tokio::time::sleep(Duration::from_millis(300)).await;
        done.store(true, Ordering::SeqCst);
    }));
    // The caller gives up on the read as soon as its shadow read has started.
    tokio::select! {
        _ = f.users.settings(&id) => panic!("{b}: the read did not wait for its shadow read"),
        _ = started.notified() => {}
    }
    assert_eq!(f.new.gets.load(Ordering::SeqCst), 1, "{b}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !finished.load(Ordering::SeqCst),
        "{b}: the shadow read went on after its caller was gone"
    );
    // Not a failure of the shadow side: nothing counted, nothing recorded.
    assert_eq!(
        f.metrics
            .counter("twintrack.shadow.errors", ("side", "new")),
        0,
        "{b}"
    );
    assert!(
        list_mismatches(&f.db, M, 10).await.unwrap().is_empty(),
        "{b}"
    );
    // And the next read is served and compared as usual.
    assert_eq!(f.users.settings(&id).await.unwrap(), settings("ok"), "{b}");
    assert_eq!(f.new.gets.load(Ordering::SeqCst), 2, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_and_modes() {
    for m in WAITING_MODES {
        each_fixture!(sampling, mode(m));
    }
}

async fn sampling<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::Shadow).await;
    let id = f
        .users
        .create("m@example.com", settings("x"))
        .await
        .unwrap();
    f.sample_rate(0.0).await;
    let before = f.new.gets.load(Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(f.users.settings(&id).await.unwrap(), settings("x"));
    }
    assert_eq!(
        f.new.gets.load(Ordering::SeqCst),
        before,
        "{b}: rate 0 never compares"
    );
    f.sample_rate(1.0).await;
    for _ in 0..50 {
        assert_eq!(f.users.settings(&id).await.unwrap(), settings("x"));
    }
    assert_eq!(
        f.new.gets.load(Ordering::SeqCst),
        before + 50,
        "{b}: rate 1 always"
    );
    assert_eq!(
        f.metrics
            .counter("twintrack.shadow.results", ("result", "match")),
        50
    );
    f.sample_rate(0.5).await;
    for _ in 0..400 {
        f.users.settings(&id).await.unwrap();
    }
    let compared = f.new.gets.load(Ordering::SeqCst) - before - 50;
    assert!(
        (120..=280).contains(&compared),
        "{b}: {compared} of 400 at 0.5"
    );
    // Operations are counted per side in the metrics.
    assert!(
        f.metrics
            .counter("twintrack.dual.operations", ("side", "legacy"))
            >= 500
    );
}

/// `background`: the response returns while the shadow read is still blocked; the comparison
/// finishes afterwards and the mismatch is recorded. Over the cap, reads are not compared
/// (`skipped`); a shadow read past the timeout counts as an error.
#[tokio::test(flavor = "multi_thread")]
async fn background_mode_compares_after_the_response() {
    let options = ShadowOptions {
        mode: ShadowMode::Background,
        background_limit: 1,
        background_timeout: Duration::from_millis(300),
        ..ShadowOptions::default()
    };
    each_fixture!(background_mode, options);
}

async fn background_mode<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::Shadow).await;
    let id = f
        .users
        .create("bg@example.com", settings("x"))
        .await
        .unwrap();
    f.plant(&id, &settings("dark"), &settings("light")).await;

    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    *f.new.before_get.lock().unwrap() = Some(Box::pin(async move { gate.notified().await }));
    assert_eq!(
        f.users.settings(&id).await.unwrap(),
        settings("dark"),
        "{b}"
    );
    // The response is back. The shadow read runs in its own task: once it reaches the
    // gate, it is provably still in flight after the response.
    let start = std::time::Instant::now();
    while f.new.gets.load(Ordering::SeqCst) == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{b}: shadow read never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        list_mismatches(&f.db, M, 10).await.unwrap().is_empty(),
        "{b}: not compared yet"
    );
    // The cap is 1 and it is taken: this read is served and not compared.
    assert_eq!(f.users.settings(&id).await.unwrap(), settings("dark"));
    assert_eq!(
        f.metrics
            .counter("twintrack.shadow.results", ("result", "skipped")),
        1,
        "{b}"
    );
    release.notify_one();
    let found = wait_for_mismatch(&f, 1).await;
    assert_eq!(found[0].class, MismatchClass::Confirmed, "{b}");

    // A shadow read that never answers is abandoned at the timeout and counted. (The
    // previous comparison may still hold the cap's one permit for a moment, which makes a
    // read `skipped`: read until a shadow read really starts.)
    *f.new.before_get.lock().unwrap() = Some(Box::pin(std::future::pending()));
    let gets = f.new.gets.load(Ordering::SeqCst);
    let start = std::time::Instant::now();
    while f.new.gets.load(Ordering::SeqCst) == gets {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{b}: no shadow read started"
        );
        assert_eq!(f.users.settings(&id).await.unwrap(), settings("dark"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let start = std::time::Instant::now();
    while f
        .metrics
        .counter("twintrack.shadow.errors", ("side", "new"))
        == 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{b}: timeout never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `snapshot`: both reads in one repeatable-read transaction, so writers racing the reads never
/// show up as mismatches. 1,000 compared reads under 4 concurrent dual writers.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_mode_has_no_false_mismatches_under_concurrent_writers() {
    for m in [ShadowMode::Snapshot, ShadowMode::Serial] {
        each_fixture!(snapshot_under_writers, mode(m));
    }
}

async fn snapshot_under_writers<DB: Native, I: K>(f: Fixture<DB, I>) {
    let snapshot = f.users.settings.shadow_options().mode == ShadowMode::Snapshot;
    let b = format!("{} {:?}", f.name, f.users.settings.shadow_options().mode);
    f.stage(Stage::Shadow).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(
            f.users
                .create(&format!("w{i}@example.com"), settings("v0"))
                .await
                .unwrap(),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (users, ids, stop, written) =
            (f.users.clone(), ids.clone(), stop.clone(), written.clone());
        writers.push(tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = &ids[(n + w) % ids.len()];
                // SQLite allows one writer at a time; a busy error is not the point here.
                if users
                    .update(id, settings(&format!("w{w}-{n}")))
                    .await
                    .is_ok()
                {
                    written.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }
    // At least 1,000 reads, and at least 100 writes landing among them (on a loaded
    // machine SQLite's single writer can be slow to get its turn).
    let mut reads = 0usize;
    let start = std::time::Instant::now();
    while reads < 1000 || written.load(Ordering::Relaxed) < 100 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{b}: writers starved"
        );
        f.users.settings(&ids[reads % ids.len()]).await.unwrap();
        reads += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let writes = written.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await; // let any classification finish
    let mismatches = list_mismatches(&f.db, M, 1000).await.unwrap();
    let matched = f
        .metrics
        .counter("twintrack.shadow.results", ("result", "match"));
    eprintln!(
        "{b}: {reads} reads under {writes} writes: {matched} matched, {} mismatches",
        mismatches.len()
    );
    if snapshot {
        assert!(mismatches.is_empty(), "{b}: {mismatches:?}");
        assert_eq!(matched, reads as u64, "{b}: every read compared and equal");
    }
}

/// `snapshot` leaves the ROLLBACK of its read-only transaction to the pool, off the caller's
/// path. The connection must still come back clean: with a pool of one, every write after a
/// snapshot read lands on the very connection that read, and would fail inside a read-only
/// transaction; none may be left idle in one.
#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_read_hands_its_connection_back_clean() {
    each_shape_with_mariadb!(snapshot_connection_clean);
}

async fn snapshot_connection_clean<DB: Native, I: K>(shape: Shape) {
    let b = shape.name();
    let one = twintrack::db::ConnectOptions {
        max_connections: 1,
        ..twintrack::db::ConnectOptions::default()
    };
    let db = Database::connect_with(&shape.url, one).await.unwrap();
    repos::create_shapes::<I>(&db).await.unwrap();
    let flags_store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    flags_store.register(M, "test").await.unwrap();
    flags_store
        .set_stage(StageChange::new(M, Stage::Shadow, "test", "setup").force(true))
        .await
        .unwrap();
    let flags = FlagCache::builder(flags_store.clone())
        .migration(M, Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    let (legacy, new) = repos::repos::<DB, I>();
    let metrics = TestMetrics::new();
    let pool = db.typed::<DB>().unwrap().clone();
    let users = Users {
        settings: DualStore::builder(M, legacy, new, pool, flags, SettingsResync::default())
            .shadow(mode(ShadowMode::Snapshot))
            .metrics(metrics.metrics())
            .build()
            .unwrap(),
    };
    let id = users
        .create("clean@example.com", settings("v0"))
        .await
        .unwrap();
    for i in 1..=20 {
        assert_eq!(
            users.settings(&id).await.unwrap(),
            settings(&format!("v{}", i - 1)),
            "{b}"
        );
        users
            .update(&id, settings(&format!("v{i}")))
            .await
            .unwrap_or_else(|e| panic!("{b}: write after a snapshot read: {e:?}"));
    }
    assert_eq!(
        metrics.counter("twintrack.shadow.results", ("result", "match")),
        20,
        "{b}"
    );
    if db.backend() == Backend::Postgres {
        users.settings(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let idle_in_tx: i64 = query(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND state LIKE 'idle in transaction%'",
        )
        .scalar(&db)
        .await
        .unwrap();
        assert_eq!(idle_in_tx, 0, "a connection was left in its transaction");
    }
}

/// A key-value repository for the two-database test: one table per side, each in its own
/// database.
trait Kv<DB: Native, I>: Send + Sync {
    fn get<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        k: I,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<String>>>;
    fn put<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        k: I,
        v: String,
    ) -> BoxFuture<'c, sqlx::Result<()>>;
    fn delete<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        k: I,
    ) -> BoxFuture<'c, sqlx::Result<()>>;
}

struct KvTable {
    table: &'static str,
    /// Fail one `put` in this many (0: never).
    fail_one_in: usize,
    puts: AtomicUsize,
}

impl<DB: Native, I: K> Kv<DB, I> for KvTable {
    fn get<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        k: I,
        lock: bool,
    ) -> BoxFuture<'c, sqlx::Result<Option<String>>> {
        Box::pin(async move {
            let lock = if lock && DB::BACKEND == Backend::Postgres {
                " FOR SHARE"
            } else {
                ""
            };
            let sql = format!("SELECT v FROM {} WHERE k = $1{lock}", self.table);
            let row = Query::assert_safe(sql)
                .bind_key(&k.to_dyn())
                .fetch_optional(DB::conn(conn))
                .await?;
            Ok(row.map(|r| r.get("v")).transpose()?)
        })
    }

    fn put<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        k: I,
        v: String,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            let n = self.puts.fetch_add(1, Ordering::SeqCst);
            if self.fail_one_in > 0 && n.is_multiple_of(self.fail_one_in) {
                return Err(injected());
            }
            let upsert = match DB::BACKEND {
                twintrack::Backend::MySql => "ON DUPLICATE KEY UPDATE v = VALUES(v)",
                _ => "ON CONFLICT (k) DO UPDATE SET v = excluded.v",
            };
            let sql = format!(
                "INSERT INTO {t} (k, v) VALUES ($1, $2) {upsert}",
                t = self.table
            );
            Query::assert_safe(sql)
                .bind_key(&k.to_dyn())
                .bind(v)
                .execute(DB::conn(conn))
                .await?;
            Ok(())
        })
    }

    fn delete<'c>(
        &'c self,
        conn: &'c mut NativeConnection<DB>,
        k: I,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async move {
            let sql = format!("DELETE FROM {} WHERE k = $1", self.table);
            Query::assert_safe(sql)
                .bind_key(&k.to_dyn())
                .execute(DB::conn(conn))
                .await?;
            Ok(())
        })
    }
}

struct KvResync<DB, I>(std::marker::PhantomData<fn() -> (DB, I)>);

impl<'a, DB: Native, I: K> twintrack::dual::Resync<dyn Kv<DB, I> + 'a> for KvResync<DB, I> {
    type Database = DB;
    type Key = I;
    type Record = String;
    fn load<'c>(
        &'c self,
        repo: &'c (dyn Kv<DB, I> + 'a),
        conn: &'c mut NativeConnection<DB>,
        key: &'c I,
    ) -> BoxFuture<'c, sqlx::Result<Option<String>>> {
        repo.get(conn, key.clone(), true)
    }
    fn store<'c>(
        &'c self,
        repo: &'c (dyn Kv<DB, I> + 'a),
        conn: &'c mut NativeConnection<DB>,
        key: &'c I,
        v: String,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        repo.put(conn, key.clone(), v)
    }
    fn delete<'c>(
        &'c self,
        repo: &'c (dyn Kv<DB, I> + 'a),
        conn: &'c mut NativeConnection<DB>,
        key: &'c I,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        repo.delete(conn, key.clone())
    }
}

/// Each row of a kv table, by the key's canonical text.
async fn kv_rows<I: K>(db: &Database, table: &str) -> BTreeMap<String, String> {
    let sql = format!("SELECT k, v FROM {table}");
    Query::assert_safe(sql)
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            let v: String = r.get("v").unwrap();
            let k = DynKey::from_row(r, I::KINDS).unwrap();
            (k.to_text(), v)
        })
        .collect()
}

/// Two databases: every write's future is dropped right after the authoritative commit, 1,000
/// times, while one in seven copies to the other side fails. Once repair has run, both sides
/// hold exactly what was acknowledged: nothing lost, nothing stale.
#[tokio::test(flavor = "multi_thread")]
async fn two_databases_lose_nothing_when_every_write_is_dropped_after_commit() {
    each_shape_with_mariadb!(two_databases_lose_nothing);
}

async fn two_databases_lose_nothing<DB: Native, I: K>(shape: Shape) {
    let b = shape.name();
    // The new shape's database: a second SQLite file, or a second database on the server.
    let (_second_guard, new_url) = match shape.backend {
        "postgres" => (None, common::pg::fresh_db().await.unwrap().url),
        "mariadb" => (None, common::mariadb::fresh_db().await.unwrap().url),
        _ => {
            let (dir, url) = common::sqlite_db();
            (Some(dir), url)
        }
    };
    let legacy_db = Database::connect(&shape.url).await.unwrap();
    let new_db = Database::connect(&new_url).await.unwrap();
    for (db, table) in [(&legacy_db, "kv_legacy"), (&new_db, "kv_new")] {
        twintrack::schema::install(db).await.unwrap();
        let sql = format!(
            "CREATE TABLE {table} (k {} PRIMARY KEY, v TEXT NOT NULL)",
            I::column(db.backend())
        );
        Query::assert_safe(sql).execute(db).await.unwrap();
    }
    let flags_store = Arc::new(SqlFlagStore::open(legacy_db.clone()).await.unwrap());
    flags_store.register(M, "t").await.unwrap();
    let flags = FlagCache::builder(flags_store.clone())
        .migration(M, Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    let committed = Arc::new(tokio::sync::Notify::new());
    let signal = committed.clone();
    let kv = |table, fail_one_in| -> Arc<dyn Kv<DB, I>> {
        Arc::new(KvTable {
            table,
            fail_one_in,
            puts: AtomicUsize::new(0),
        })
    };
    let store = DualStore::builder(
        M,
        kv("kv_legacy", 7),
        kv("kv_new", 7),
        legacy_db.typed::<DB>().unwrap().clone(),
        flags.clone(),
        KvResync(std::marker::PhantomData),
    )
    .new_database(new_db.typed::<DB>().unwrap().clone())
    .fault_hooks(FaultHooks {
        after_authoritative_commit: Some(Arc::new(move |_: &str| signal.notify_one())),
        ..FaultHooks::default()
    })
    .build()
    .unwrap();
    // One transaction over both shapes needs them in one database.
    let joined = store
        .transaction(|_| Box::pin(async { Ok::<_, twintrack::Error>(()) }))
        .await;
    assert!(
        matches!(joined, Err(twintrack::Error::Config(_))),
        "{b}: {joined:?}"
    );

    let mut model = BTreeMap::new();
    let (mut dropped, mut completed, mut refused) = (0u32, 0u32, 0u32);
    let mut i = 0u32;
    // Until 1,000 writes have been dropped right after their authoritative commit. (Under
    // load a write sometimes finishes in the very poll that commits it: then it is simply
    // acknowledged, and the loop goes on.)
    while dropped < 1000 {
        assert!(
            i < 5000,
            "{b}: only {dropped} drops in {i} writes ({completed} completed, {refused} refused)"
        );
        if i == 0 || (dropped == 500 && flags.snapshot().stage(M) != Some(Stage::Live)) {
            let stage = if i == 0 {
                Stage::DualWrite
            } else {
                Stage::Live
            };
            flags_store
                .set_stage(StageChange::new(M, stage, "t", "t").force(true))
                .await
                .unwrap();
            flags.refresh().await.unwrap();
        }
        let key = I::nth(u64::from(i % 97));
        let delete = i.is_multiple_of(13);
        let value = format!("v{i}");
        i += 1;
        let (written, k) = (value.clone(), key.clone());
        let write = store.write(&key, move |repo, conn| {
            if delete {
                repo.delete(conn, k.clone())
            } else {
                repo.put(conn, k.clone(), written.clone())
            }
        });
        tokio::select! {
            biased;
            _ = committed.notified() => dropped += 1,
            result = write => match result {
                Ok(()) => completed += 1,
                // An injected failure on the authoritative side: refused, nothing written.
                Err(_) => {
                    refused += 1;
                    continue;
                }
            },
        }
        if delete {
            model.remove(&key.to_text());
        } else {
            model.insert(key.to_text(), value);
        }
    }

    // Let the detached copies finish, then repair what they could not do.
    let start = std::time::Instant::now();
    loop {
        store.repair(Duration::ZERO).await.unwrap();
        let pending = pending_intents(&legacy_db, M).await.unwrap()
            + pending_intents(&new_db, M).await.unwrap();
        if pending == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{b}: {pending} intents left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let legacy = kv_rows::<I>(&legacy_db, "kv_legacy").await;
    let new = kv_rows::<I>(&new_db, "kv_new").await;
    eprintln!(
        "{b}: {dropped} writes dropped after commit, {completed} completed, {refused} refused; {} keys on each side",
        model.len()
    );
    assert_eq!(legacy, model, "{b}: legacy holds every acknowledged write");
    assert_eq!(new, model, "{b}: new holds every acknowledged write");
}

/// A real divergence makes every compared read a mismatch. A storm of them must neither stall
/// the service (re-checks and their records hold pooled connections) nor grow the table past
/// its cap.
#[tokio::test(flavor = "multi_thread")]
async fn a_mismatch_storm_neither_stalls_reads_nor_grows_the_table() {
    let options = ShadowOptions {
        mode: ShadowMode::Concurrent,
        keep: 5,
        recheck_delay: Duration::from_millis(10),
        ..ShadowOptions::default()
    };
    each_fixture!(mismatch_storm, options);
}

async fn mismatch_storm<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.stage(Stage::Shadow).await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let id = f
            .users
            .create(&format!("storm{i}@example.com"), settings("x"))
            .await
            .unwrap();
        f.plant(&id, &settings("dark"), &settings("light")).await;
        ids.push(id);
    }
    let reads: Vec<_> = (0..300)
        .map(|i| {
            let (users, id) = (f.users.clone(), ids[i % ids.len()].clone());
            tokio::spawn(async move { users.settings(&id).await })
        })
        .collect();
    for read in reads {
        let served = read
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{b}: a read failed: {e:?}"));
        assert_eq!(served, settings("dark"), "{b}");
    }
    // Let the re-checks finish, then the table holds at most `keep` rows.
    let start = std::time::Instant::now();
    while f
        .metrics
        .counter("twintrack.shadow.results", ("result", "confirmed"))
        + f.metrics
            .counter("twintrack.shadow.results", ("result", "unclassified"))
        < 300
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{b}: re-checks never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last records may still be landing (the result is counted before its record is
    // written): once they have, at most `keep` rows remain.
    let start = std::time::Instant::now();
    loop {
        let kept = list_mismatches(&f.db, M, 1000).await.unwrap().len();
        if (1..=5).contains(&kept) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{b}: {kept} rows kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// PostgreSQL, `bigint` keys: the shape the field reports used.
fn pg_shape(url: String) -> Shape {
    Shape {
        backend: "postgres",
        key: "i64",
        url,
        replica_urls: Vec::new(),
        guard: None,
    }
}

/// The field report: 20 mismatches of 400 KB values made an 8 MB listing. Stored diffs are
/// capped: each large value is kept as its size, its SHA-256 and its first characters, so a
/// listing of them weighs a few KB.
#[tokio::test(flavor = "multi_thread")]
async fn mismatches_of_large_values_are_stored_capped_with_their_size_and_hash() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let f = Fixture::<sqlx::Postgres, i64>::new(
        pg_shape(pg.url),
        ShadowOptions {
            recheck_delay: Duration::from_millis(1),
            ..ShadowOptions::default()
        },
    )
    .await;
    f.stage(Stage::Shadow).await;
    let (big_legacy, big_new) = ("l".repeat(400_000), "n".repeat(400_000));
    for i in 0..20 {
        let id = f
            .users
            .create(&format!("big{i}@example.com"), settings("x"))
            .await
            .unwrap();
        f.plant(&id, &settings(&big_legacy), &settings(&big_new))
            .await;
        assert_eq!(f.users.settings(&id).await.unwrap().theme.len(), 400_000);
    }
    let start = std::time::Instant::now();
    let listed = loop {
        let listed = list_mismatches(&f.db, M, 20).await.unwrap();
        if listed.len() == 20 {
            break listed;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            listed.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let size = serde_json::to_string(&listed).unwrap().len();
    assert!(
        size < 20 * 2048 + 20 * 512,
        "20 mismatches listed in {size} bytes"
    );
    let theme = listed[0]
        .diff
        .iter()
        .find(|d| d.path == "theme")
        .expect("the theme differs");
    let full = serde_json::to_string(&big_legacy).unwrap();
    use sha2::Digest;
    let want = serde_json::json!({"twintrack_truncated": {
        "bytes": full.len(),
        "sha256": sha2::Sha256::digest(full.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>(),
        "head": full.chars().take(64).collect::<String>(),
    }});
    assert_eq!(theme.legacy.as_ref(), Some(&want));
    assert_ne!(theme.new, theme.legacy, "the two sides' values stay apart");
}

/// The field report: with every read mismatching, recording and re-checking took 5-6 of the
/// pool's 10 connections. Here the mismatch table is locked for the whole storm (every insert
/// waits): bookkeeping still holds at most its own connections (one recorder waiting on the
/// lock, never more), every read is served from legacy, mismatches beyond what the recorder
/// can queue are dropped and counted, and once the lock goes the table is written and trimmed.
#[tokio::test(flavor = "multi_thread")]
async fn a_mismatch_storm_over_a_locked_mismatch_table_keeps_to_the_bookkeeping_connections() {
    use sqlx::Connection;
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let f = Fixture::<sqlx::Postgres, i64>::new(
        pg_shape(pg.url.clone()),
        ShadowOptions {
            keep: 50,
            recheck_delay: Duration::from_millis(1),
            ..ShadowOptions::default()
        },
    )
    .await;
    f.stage(Stage::Shadow).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let id = f
            .users
            .create(&format!("storm{i}@example.com"), settings("x"))
            .await
            .unwrap();
        f.plant(&id, &settings("dark"), &settings("light")).await;
        ids.push(id);
    }
    let mut locker = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE twintrack_mismatches IN EXCLUSIVE MODE")
        .execute(&mut locker)
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (db, stop) = (f.db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut most = 0i64;
            while !stop.load(Ordering::SeqCst) {
                let waiting: i64 = query(
                    "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database()
                     AND state <> 'idle' AND query LIKE 'INSERT INTO twintrack_mismatches%'",
                )
                .scalar(&db)
                .await
                .unwrap();
                most = most.max(waiting);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        })
    };
    let dropped = || {
        f.metrics.counter(
            "twintrack.shadow.mismatches_dropped",
            ("reason", "queue_full"),
        )
    };
    // Reads until the recorder's queue has overflowed (at most 60,000).
    let mut served = 0;
    while dropped() == 0 && served < 60_000 {
        let reads: Vec<_> = (0..16)
            .map(|t| {
                let (users, ids) = (f.users.clone(), ids.clone());
                tokio::spawn(async move {
                    for i in 0..50 {
                        let id = &ids[(t * 50 + i) % ids.len()];
                        let got = users.settings(id).await.expect("a read failed");
                        assert_eq!(got, settings("dark"));
                    }
                })
            })
            .collect();
        for read in reads {
            tokio::time::timeout(Duration::from_secs(120), read)
                .await
                .expect("reads stalled behind the mismatch table's lock")
                .unwrap();
        }
        served += 16 * 50;
    }
    assert!(
        dropped() > 0,
        "the queue never overflowed in {served} reads"
    );
    stop.store(true, Ordering::SeqCst);
    let most = sampler.await.unwrap();
    assert!(
        most <= 1,
        "{most} connections were inserting mismatches at once"
    );

    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    let start = std::time::Instant::now();
    loop {
        let kept = list_mismatches(&f.db, M, 1000).await.unwrap().len();
        if (1..=50).contains(&kept) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{kept} rows kept"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two databases: a write acknowledged while legacy was authoritative whose copy to the new
/// database failed (its repair intent waits in the legacy database) is shown by a read of the
/// new side right after the move to `live`, before any repair pass: the read settles the key's
/// intent first. And with the other database unreachable, reads go on unsettled (counted).
#[tokio::test(flavor = "multi_thread")]
async fn two_databases_a_read_settles_its_keys_intents_after_authority_moves() {
    use sqlx::Connection;
    let Some(legacy_t) = common::pg::fresh_db().await else {
        return;
    };
    let new_t = common::pg::fresh_db().await.unwrap();
    let metrics = TestMetrics::new();
    let legacy_db = Database::connect(&legacy_t.url).await.unwrap();
    let new_db = Database::connect(&new_t.url).await.unwrap();
    for (db, table) in [(&legacy_db, "kv_legacy"), (&new_db, "kv_new")] {
        twintrack::schema::install(db).await.unwrap();
        let sql = format!("CREATE TABLE {table} (k BIGINT PRIMARY KEY, v TEXT NOT NULL)");
        Query::assert_safe(sql).execute(db).await.unwrap();
    }
    let flags_store = Arc::new(SqlFlagStore::open(legacy_db.clone()).await.unwrap());
    flags_store.register(M, "t").await.unwrap();
    let flags = FlagCache::builder(flags_store.clone())
        .migration(M, Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    let kv = |table| -> Arc<dyn Kv<sqlx::Postgres, i64>> {
        Arc::new(KvTable {
            table,
            fail_one_in: 0,
            puts: AtomicUsize::new(0),
        })
    };
    let store = DualStore::builder(
        M,
        kv("kv_legacy"),
        kv("kv_new"),
        legacy_db.typed::<sqlx::Postgres>().unwrap().clone(),
        flags.clone(),
        KvResync(std::marker::PhantomData),
    )
    .new_database(new_db.typed::<sqlx::Postgres>().unwrap().clone())
    .metrics(metrics.metrics())
    .build()
    .unwrap();
    let stage = |to: Stage| {
        let (flags_store, flags) = (flags_store.clone(), flags.clone());
        async move {
            flags_store
                .set_stage(StageChange::new(M, to, "t", "t").force(true))
                .await
                .unwrap();
            flags.refresh().await.unwrap();
        }
    };
    let put =
        |v: &'static str| store.write(&7i64, move |repo, conn| repo.put(conn, 7, v.to_owned()));
    let get = || store.read(&7i64, |repo, conn| repo.get(conn, 7, false));

    stage(Stage::Shadow).await;
    put("v1").await.unwrap();
    // The copy of the next write to the new database cannot get the row (held here past the
    // copy's lock timeout): the write is acknowledged, its intent stays in the legacy database.
    let mut holder = sqlx::PgConnection::connect(&new_t.url).await.unwrap();
    let mut held = holder.begin().await.unwrap();
    sqlx::query("SELECT v FROM kv_new WHERE k = 7 FOR UPDATE")
        .fetch_one(&mut *held)
        .await
        .unwrap();
    put("v2").await.unwrap();
    held.rollback().await.unwrap();
    assert_eq!(pending_intents(&legacy_db, M).await.unwrap(), 1);
    assert_eq!(kv_rows::<i64>(&new_db, "kv_new").await["7"], "v1");

    // New is authoritative and served now; no repair pass has run.
    stage(Stage::Live).await;
    assert_eq!(get().await.unwrap().as_deref(), Some("v2"));
    assert_eq!(pending_intents(&legacy_db, M).await.unwrap(), 0);
    assert_eq!(kv_rows::<i64>(&new_db, "kv_new").await["7"], "v2");
    assert_eq!(
        metrics.counter("twintrack.repair.intents", ("event", "settled_inline")),
        1
    );

    // In `shadow` a read of legacy looks for intents in the new database, which now refuses
    // connections: the reads go on, unsettled.
    stage(Stage::Shadow).await;
    query("SELECT 1").execute(&new_db).await.unwrap();
    let admin = Database::connect(&legacy_t.url).await.unwrap();
    let refuse = |allow: bool| {
        Query::assert_safe(format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {allow}",
            new_t.name
        ))
    };
    refuse(false).execute(&admin).await.unwrap();
    Query::assert_safe(format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
        new_t.name
    ))
    .execute(&admin)
    .await
    .unwrap();
    for _ in 0..3 {
        assert_eq!(get().await.unwrap().as_deref(), Some("v2"));
    }
    refuse(true).execute(&admin).await.unwrap();
    assert!(
        metrics.counter("twintrack.repair.intents", ("event", "unsettled")) >= 3,
        "reads while the other database was down count as unsettled"
    );
}

/// twintrack installs no meter provider and records through the one the host has installed
/// *when it records*: a store built before the host installs its provider (the order a service
/// wiring telemetry after its data layer has) reports into it from then on.
#[tokio::test]
async fn a_meter_provider_installed_after_the_store_was_built_receives_its_recordings() {
    let (_dir, url) = common::sqlite_db();
    let db = Database::connect(&url).await.unwrap();
    repos::create_shapes::<i64>(&db).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register("user_settings", "t").await.unwrap();
    store
        .set_stage(StageChange::new("user_settings", Stage::DualWrite, "t", "t").force(true))
        .await
        .unwrap();
    let flags = FlagCache::builder(store)
        .migration("user_settings", Stage::LegacyOnly)
        .build()
        .await;
    let (legacy, new) = repos::repos::<sqlx::Sqlite, i64>();
    let users = Users {
        settings: DualStore::builder(
            "user_settings",
            legacy,
            new,
            db.as_sqlite().unwrap().clone(),
            flags,
            SettingsResync::default(),
        )
        .build()
        .unwrap(),
    };
    let settings = Settings {
        theme: "x".into(),
        notifications_enabled: true,
    };
    users
        .create("before@example.com", settings.clone())
        .await
        .unwrap();

    // Installed only now, after the store was built and had recorded.
    let host = TestMetrics::new();
    opentelemetry::global::set_meter_provider(host.provider.clone());
    let id = users.create("after@example.com", settings).await.unwrap();
    users.settings(&id).await.unwrap();
    let writes = host.counter_all(
        "twintrack.dual.operations",
        &[("op", "write"), ("side", "new"), ("outcome", "ok")],
    );
    assert_eq!(writes, 1, "the write made after the provider was installed");
    assert!(
        host.histogram_count(
            "db.client.operation.duration",
            &[("twintrack.migration", "user_settings")],
            &twintrack::metrics::DURATION_BUCKETS,
        ) >= 3,
        "durations of the write's two sides and the read"
    );
}
