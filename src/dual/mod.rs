//! The dual store: one repository call, run on the side(s) the pinned stage names.
//!
//! Wrap the legacy and the new implementation of your repository trait in a [`DualStore`].
//! Handlers then call [`DualStore::read`] and [`DualStore::write`] with the operation once; the
//! store runs it on the right side(s), in the stage's order, without any stage logic in your
//! code. The stage comes from the request's [`RequestContext`] (or, outside a request, from the
//! flag cache's current snapshot).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use twintrack::dual::{DualStore, Resync};
//! # use twintrack::flags::BoxFuture;
//! # use sqlx::AnyConnection;
//! trait Settings: Send + Sync {
//!     fn get<'c>(&'c self, conn: &'c mut AnyConnection, id: i64)
//!         -> BoxFuture<'c, sqlx::Result<Option<String>>>;
//!     fn put<'c>(&'c self, conn: &'c mut AnyConnection, id: i64, theme: String)
//!         -> BoxFuture<'c, sqlx::Result<()>>;
//! }
//! # async fn demo<X: Resync<dyn Settings>>(store: DualStore<dyn Settings, X>) -> twintrack::Result<()> {
//! // Written to legacy, new or both (authoritative first, atomically), as the stage says.
//! // The operation may run once per side, so it is an `Fn`: it clones what it hands over.
//! let theme = "dark".to_owned();
//! store
//!     .write(42, move |repo, conn| repo.put(conn, 42, theme.clone()))
//!     .await?;
//! // Served by the stage's side; in `shadow` and `live` also compared with the other side.
//! let theme = store.read(42, |repo, conn| repo.get(conn, 42)).await?;
//! # Ok(()) }
//! ```
//!
//! # Writes
//!
//! Both shapes live in one database: the sides are written in one transaction on the primary,
//! the authoritative side first. If it fails, the other side is never called and the caller
//! gets the error. The other side runs inside a savepoint; if it fails, the savepoint is rolled
//! back, a *repair intent* for the key is written in the same transaction, and the write
//! succeeds. [`DualStore::repair`] later re-syncs such keys from the authoritative side.
//!
//! # Reads
//!
//! See [`crate::shadow`] for how reads are compared in `shadow` and `live`.
//!
//! [`RequestContext`]: crate::RequestContext

mod repair;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use opentelemetry::KeyValue;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, Connection, Transaction};
use tracing::Instrument;

pub use repair::{RepairReport, Resync, pending_intents};

use crate::context::random_key;
use crate::db::{Backend, Database};
use crate::flags::{BoxFuture, FlagCache, MigrationFlag};
use crate::metrics::Metrics;
use crate::ryw::{ReadTarget, ReplicaFailure, Router};
use crate::shadow::{MismatchClass, ShadowMode, ShadowOptions, record_mismatch};
use crate::{Error, RequestContext, Result, Side, Stage};

/// Decides, for a test or a fault drill, whether to fail a write just before its commit.
pub type CommitHook = Arc<dyn Fn(i64) -> bool + Send + Sync>;

/// A legacy and a new implementation of repository `R`, routed by the pinned stage.
///
/// `R` is usually a trait object (`dyn MyRepository`); `X` tells the repair worker how to copy
/// one key from one side to the other. Cheap to clone; `Send + Sync`.
pub struct DualStore<R: ?Sized, X> {
    inner: Arc<Inner<R, X>>,
}

impl<R: ?Sized, X> Clone for DualStore<R, X> {
    fn clone(&self) -> Self {
        DualStore {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R: ?Sized, X> {
    migration: Arc<str>,
    legacy: Arc<R>,
    new: Arc<R>,
    /// The legacy shape's database (both shapes', unless `new_db` is set). twintrack's own
    /// tables (mismatches) live here.
    db: Database,
    /// The new shape's database, when it is not `db`.
    new_db: Option<Database>,
    flags: FlagCache,
    resync: X,
    shadow: ShadowOptions,
    metrics: Metrics,
    before_commit: Option<CommitHook>,
    after_authoritative_commit: Option<Arc<dyn Fn(i64) + Send + Sync>>,
    /// Caps `Background` shadow reads in flight.
    background: Arc<tokio::sync::Semaphore>,
    /// Caps mismatch classifications in flight (a real divergence can make every read one).
    classifying: Arc<tokio::sync::Semaphore>,
    /// Routes reads between the primary and replicas (of `db`); none: every read on `db`.
    router: Option<Router>,
    /// The migration reads from the primary only.
    primary_reads: bool,
    /// Re-sync keys with the definition's SQL (one database only).
    definition: Option<crate::definition::MigrationDef>,
}

/// Where a read may go.
#[derive(Clone, Copy)]
enum Reading<'a> {
    /// Where the router sends this request's reads.
    Routed(Option<&'a RequestContext>),
    /// The primary, whatever the request (mismatch re-checks).
    Primary,
}

/// Builds a [`DualStore`].
pub struct DualStoreBuilder<R: ?Sized, X> {
    inner: Inner<R, X>,
}

impl<R: ?Sized, X> DualStoreBuilder<R, X> {
    /// How shadow reads run and compare (default: serial, equality of normalized values).
    pub fn shadow(mut self, options: ShadowOptions) -> Self {
        self.inner.shadow = options;
        self
    }

    /// Records metrics on these instruments instead of the global meter's.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.inner.metrics = metrics;
        self
    }

    /// Fault injection: when `hook(key)` returns true, [`DualStore::write`] fails after both
    /// sides were written and before the commit (for drills and tests of atomicity).
    pub fn fail_before_commit(
        mut self,
        hook: impl Fn(i64) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.inner.before_commit = Some(Arc::new(hook));
        self
    }

    /// The new shape lives in this other database. Writes then commit on the authoritative
    /// side together with a repair intent, and the other side is written by a task that
    /// survives the caller being dropped; the intent is cleared when it succeeds. Both
    /// databases need twintrack's tables ([`crate::schema::install`]).
    pub fn new_database(mut self, db: Database) -> Self {
        self.inner.new_db = Some(db);
        self
    }

    /// Reads go where `router` says: a replica of the database, unless the request wrote,
    /// carries a token no replica has replayed, or the migration asks for primary reads (see
    /// [`crate::ryw`]). The router's primary must be this store's database (same URL). With
    /// two databases ([`DualStoreBuilder::new_database`]) only the legacy database's reads
    /// are routed; the new database's are served by its primary.
    pub fn router(mut self, router: Router) -> Self {
        self.inner.router = Some(router);
        self
    }

    /// The repair worker re-syncs keys with this definition's SQL
    /// ([`resync_key`](crate::definition::resync_key), the same way `twintrack verify --repair`
    /// does) instead of through [`Resync`]; `Resync` still deletes a legacy row an
    /// authoritative new side no longer has, and still serves two-database stores.
    pub fn definition(mut self, definition: crate::definition::MigrationDef) -> Self {
        self.inner.definition = Some(definition);
        self
    }

    /// This migration reads from the primary only, whatever the request (for data that must
    /// never be read stale, or a replica that does not have the new shape yet).
    pub fn primary_reads(mut self, primary_only: bool) -> Self {
        self.inner.primary_reads = primary_only;
        self
    }

    /// Drills and tests: called with the key right after the authoritative side committed
    /// (two-database writes).
    pub fn on_authoritative_commit(mut self, hook: impl Fn(i64) + Send + Sync + 'static) -> Self {
        self.inner.after_authoritative_commit = Some(Arc::new(hook));
        self
    }

    /// The store, or [`Error::Config`] for a combination that cannot work (`Snapshot` shadow
    /// reads need both shapes in one database).
    pub fn build(mut self) -> Result<DualStore<R, X>> {
        if self.inner.new_db.is_some() && self.inner.shadow.mode == ShadowMode::Snapshot {
            return Err(Error::Config(
                "snapshot shadow reads need both shapes in one database; use concurrent or background".into(),
            ));
        }
        if let Some(router) = &self.inner.router
            && router.primary().url() != self.inner.db.url()
        {
            return Err(Error::Config(
                "the router's primary is not the dual store's database (their URLs differ)".into(),
            ));
        }
        let limit = self.inner.shadow.background_limit.max(1);
        self.inner.background = Arc::new(tokio::sync::Semaphore::new(limit));
        self.inner.classifying = Arc::new(tokio::sync::Semaphore::new(limit));
        Ok(DualStore {
            inner: Arc::new(self.inner),
        })
    }
}

/// Outcome of one side's read, with its latency.
type SideRead<T> = std::result::Result<(T, Duration), Error>;

/// A spawned shadow read that is aborted if the read waiting for it is dropped first.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Waits for the task; a panic in it comes back as `Err`, as `catch_unwind` would give it.
    async fn join(mut self) -> std::thread::Result<T> {
        let joined = (&mut self.0).await;
        joined.map_err(|err| match err.try_into_panic() {
            Ok(panic) => panic,
            // Only `abort` cancels it, and only `drop` aborts it.
            Err(cancelled) => Box::new(cancelled.to_string()),
        })
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// A dual store for `migration`, with both shapes in `db`. `flags` must have the migration
    /// registered.
    pub fn builder(
        migration: &str,
        legacy: Arc<R>,
        new: Arc<R>,
        db: Database,
        flags: FlagCache,
        resync: X,
    ) -> DualStoreBuilder<R, X> {
        DualStoreBuilder {
            inner: Inner {
                migration: migration.into(),
                legacy,
                new,
                db,
                flags,
                resync,
                shadow: ShadowOptions::default(),
                metrics: Metrics::global(),
                before_commit: None,
                after_authoritative_commit: None,
                new_db: None,
                background: Arc::new(tokio::sync::Semaphore::new(1)),
                classifying: Arc::new(tokio::sync::Semaphore::new(1)),
                router: None,
                primary_reads: false,
                definition: None,
            },
        }
    }

    /// The migration this store routes.
    pub fn migration(&self) -> &str {
        &self.inner.migration
    }

    /// The legacy shape's database (both shapes', unless a separate new database was set).
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// The database holding `side`.
    pub fn database_of(&self, side: Side) -> &Database {
        match (side, &self.inner.new_db) {
            (Side::New, Some(db)) => db,
            _ => &self.inner.db,
        }
    }

    /// Whether the two shapes live in separate databases.
    pub fn is_split(&self) -> bool {
        self.inner.new_db.is_some()
    }

    fn repo(&self, side: Side) -> &R {
        match side {
            Side::Legacy => &self.inner.legacy,
            Side::New => &self.inner.new,
        }
    }

    /// The pinned flag: the request's, or the cache's current one outside a request.
    fn flag(&self) -> Result<(MigrationFlag, Option<RequestContext>)> {
        let ctx = RequestContext::current();
        let flag = match &ctx {
            Some(ctx) => ctx.flag(&self.inner.migration).cloned(),
            None => self
                .inner
                .flags
                .snapshot()
                .get(&self.inner.migration)
                .cloned(),
        };
        flag.map(|f| (f, ctx))
            .ok_or_else(|| Error::UnknownMigration(self.inner.migration.to_string()))
    }

    /// The `migration` attribute, sharing the name rather than copying it per call.
    pub(crate) fn migration_attr(&self) -> KeyValue {
        KeyValue::new("migration", self.inner.migration.clone())
    }

    fn observe(&self, op: &'static str, side: Side, took: Duration, ok: bool) {
        let attrs = [
            self.migration_attr(),
            KeyValue::new("op", op),
            KeyValue::new("side", side.as_str()),
            KeyValue::new("outcome", if ok { "ok" } else { "error" }),
        ];
        let metrics = &self.inner.metrics;
        metrics
            .dual_duration
            .record(took.as_secs_f64(), &attrs[..3]);
        metrics.dual_ops.add(1, &attrs);
    }

    /// Runs `op` on the side(s) the pinned stage writes, authoritative first, and returns the
    /// authoritative side's result. One database: one transaction, the other side in a
    /// savepoint (a repair intent if it fails). Two databases: see
    /// [`DualStoreBuilder::new_database`].
    pub async fn write<T, F>(&self, key: i64, op: F) -> Result<T>
    where
        T: Send,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        if self.is_split() {
            return self.write_split(key, op).await;
        }
        let mut tx = self.inner.db.pool().begin().await?;
        let out = self.write_in(&mut tx, key, op).await?;
        self.commit(tx, key).await?;
        Ok(out)
    }

    /// Like [`DualStore::write`], inside a transaction of the caller's (for writes that also
    /// touch tables outside the migration). Nothing is committed here. Both shapes must be in
    /// the transaction's database.
    pub async fn write_in<T, F>(&self, tx: &mut Transaction<'_, Any>, key: i64, op: F) -> Result<T>
    where
        T: Send,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        if self.is_split() {
            return Err(Error::Config(
                "write_in needs both shapes in one database; use write".into(),
            ));
        }
        let (flag, ctx) = self.flag()?;
        // From here the outcome may be committed (by us or the caller): pin the request.
        if let Some(ctx) = &ctx {
            ctx.note_write();
        }
        let stage = flag.stage();
        let plan = stage.plan();
        let authoritative = plan.writes[0];
        let (out, _) = self
            .call_side("write", &op, authoritative, stage, tx)
            .await?;
        for &side in &plan.writes[1..] {
            // A savepoint of our own rather than a nested sqlx transaction: on success it is
            // left for the COMMIT to release, which saves the RELEASE round trip on every dual
            // write; only a failure costs the ROLLBACK TO.
            sqlx::query("SAVEPOINT twintrack_other_side")
                .execute(&mut **tx)
                .await?;
            if let Err(err) = self.call_side("write", &op, side, stage, tx).await {
                sqlx::query("ROLLBACK TO SAVEPOINT twintrack_other_side")
                    .execute(&mut **tx)
                    .await?;
                tracing::warn!(key, error = %err, "non-authoritative write failed; repair intent recorded");
                repair::record_intent(tx, &self.inner.migration, key, side, &err.to_string())
                    .await?;
                self.count_intent("recorded");
            }
        }
        Ok(out)
    }

    /// Commits a write's transaction, unless the fault-injection hook asks to fail it here.
    async fn commit(&self, tx: Transaction<'_, Any>, key: i64) -> Result<()> {
        if let Some(hook) = &self.inner.before_commit
            && hook(key)
        {
            tx.rollback().await?;
            return Err(Error::Database(sqlx::Error::Protocol(format!(
                "fault injected before commit (key {key})"
            ))));
        }
        Ok(tx.commit().await?)
    }

    fn count_intent(&self, event: &'static str) {
        self.inner
            .metrics
            .repair_intents
            .add(1, &[self.migration_attr(), KeyValue::new("event", event)]);
    }

    /// Two databases: authoritative side + intent in one transaction, then the other side in a
    /// task of its own, which clears the intent when it succeeds.
    ///
    /// The task does not replay `op`: it copies the key's *current* state from the
    /// authoritative side (the repair worker's re-sync), holding the source row locked until
    /// the copy commits. Two writes' tasks finishing out of order therefore cannot leave the
    /// other side with the older value.
    async fn write_split<T, F>(&self, key: i64, op: F) -> Result<T>
    where
        T: Send,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        let (flag, ctx) = self.flag()?;
        if let Some(ctx) = &ctx {
            ctx.note_write();
        }
        let stage = flag.stage();
        let plan = stage.plan();
        let authoritative = plan.writes[0];
        let other = plan.writes.get(1).copied();
        let mut tx = self.database_of(authoritative).pool().begin().await?;
        let (out, _) = self
            .call_side("write", &op, authoritative, stage, &mut tx)
            .await?;
        // Written before the commit, so that no crash or drop can lose the other side's write.
        let intent = match other {
            Some(side) => Some(
                repair::record_intent(&mut tx, &self.inner.migration, key, side, "pending").await?,
            ),
            None => None,
        };
        self.commit(tx, key).await?;
        if let Some(hook) = &self.inner.after_authoritative_commit {
            hook(key);
        }
        if let (Some(side), Some(intent)) = (other, intent) {
            let store = self.clone();
            let task = tokio::spawn(async move {
                store
                    .write_other_side(key, stage, side, authoritative, intent)
                    .await
            });
            // The caller normally waits for both sides; if it is dropped here, the task goes on.
            let _ = task.await;
        }
        Ok(out)
    }

    async fn write_other_side(
        &self,
        key: i64,
        stage: Stage,
        side: Side,
        authoritative: Side,
        intent: i64,
    ) {
        let started = Instant::now();
        let attempt = async {
            repair::resync_across(self, key, authoritative)
                .instrument(self.span("write", stage, side))
                .await?;
            repair::clear_intent(self.database_of(authoritative), intent).await
        };
        let result = attempt.await;
        self.observe("write", side, started.elapsed(), result.is_ok());
        if let Err(err) = result {
            tracing::warn!(migration = %self.inner.migration, key, %side, error = %err,
                "non-authoritative write failed; the repair intent stays");
            self.count_intent("recorded");
            let _ = repair::note_failure(self.database_of(authoritative), intent, &err.to_string())
                .await;
        }
    }

    fn span(&self, op: &'static str, stage: Stage, side: Side) -> tracing::Span {
        tracing::debug_span!("twintrack", migration = %self.inner.migration, op, stage = %stage, side = %side)
    }

    /// Tags a repository error with the side it came from.
    pub(crate) fn side_error(&self, side: Side) -> impl Fn(sqlx::Error) -> Error + '_ {
        move |source| Error::Repository {
            migration: self.inner.migration.to_string(),
            side,
            source,
        }
    }

    /// Runs `op` on `side` over `conn`, in a span, timed and counted.
    async fn call_side<T, F>(
        &self,
        what: &'static str,
        op: &F,
        side: Side,
        stage: Stage,
        conn: &mut AnyConnection,
    ) -> SideRead<T>
    where
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        let started = Instant::now();
        let result = op(self.repo(side), conn)
            .instrument(self.span(what, stage, side))
            .await;
        let took = started.elapsed();
        self.observe(what, side, took, result.is_ok());
        result.map(|v| (v, took)).map_err(self.side_error(side))
    }

    /// Reads `side`, where the router sends this request's reads (retrying on another replica,
    /// then the primary, after a hot-standby conflict or a dead replica).
    async fn read_side<T, F>(
        &self,
        op: &F,
        side: Side,
        stage: Stage,
        reading: Reading<'_>,
    ) -> SideRead<T>
    where
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        let (read, _released) = self.read_side_held(op, side, stage, reading).await?;
        Ok(read)
    }

    /// [`Self::read_side`], handing back the connection it read on rather than releasing it.
    /// Releasing a pooled connection starts a round trip (the pool tests it): a caller still
    /// waiting for another read holds it until that one is done.
    async fn read_side_held<T, F>(
        &self,
        op: &F,
        side: Side,
        stage: Stage,
        reading: Reading<'_>,
    ) -> Result<((T, Duration), PoolConnection<Any>)>
    where
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        let routed = match (&self.inner.router, reading) {
            (Some(router), Reading::Routed(ctx)) if !(side == Side::New && self.is_split()) => {
                Some((router, ctx))
            }
            _ => None,
        };
        let Some((router, ctx)) = routed else {
            let mut conn = self.database_of(side).pool().acquire().await?;
            let read = self.call_side("read", op, side, stage, &mut conn).await?;
            return Ok((read, conn));
        };
        router
            .run_read(ctx, self.inner.primary_reads, |mut conn, _| async move {
                let read = self.call_side("read", op, side, stage, &mut conn).await?;
                Ok((read, conn))
            })
            .await
    }

    /// Runs `op` on the side the pinned stage serves and returns its result. In `shadow` and
    /// `live`, a sampled share of reads also runs `op` on the other side and compares.
    pub async fn read<T, F>(&self, key: i64, op: F) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>>
            + Send
            + Sync
            + 'static,
    {
        let (flag, ctx) = self.flag()?;
        let stage = match &ctx {
            Some(ctx) => ctx
                .read_stage(&self.inner.migration)
                .unwrap_or(flag.stage()),
            None => flag.stage(),
        };
        let plan = stage.plan();
        let served = plan.served;
        let shadow = plan
            .shadow
            .filter(|_| sampled(flag.state.shadow_sample_rate));
        let Some(shadow) = shadow else {
            return self
                .read_side(&op, served, stage, Reading::Routed(ctx.as_ref()))
                .await
                .map(|(v, _)| v);
        };

        // Both sides go where this request's reads go: the primary once it wrote (so replica
        // lag never shows up as a mismatch), else the one replica chosen for the request.
        let reading = Reading::Routed(ctx.as_ref());
        let shadow_read =
            |op| AssertUnwindSafe(self.read_side(op, shadow, stage, reading)).catch_unwind();
        let (served_result, shadow_result) = match self.inner.shadow.mode {
            ShadowMode::Background => {
                let (value, took) = self.read_side(&op, served, stage, reading).await?;
                self.compare_in_background(key, stage, served, (to_value(&value), took), op, ctx);
                return Ok(value);
            }
            ShadowMode::Snapshot => {
                self.read_snapshot(&op, served, shadow, stage, ctx.as_ref())
                    .await?
            }
            ShadowMode::Concurrent => {
                // The shadow read gets a task of its own, so that the runtime's other worker
                // can drive it while this one drives the served read: polled from one task,
                // both sides' client work would queue on one thread. Dropping the request
                // aborts it (the guard), as it would have dropped a joined future.
                let op = Arc::new(op);
                let store = self.clone();
                let (shadow_op, shadow_ctx) = (op.clone(), ctx.clone());
                // Its span stays a child of the caller's, as it would have been when joined.
                let shadow_task = AbortOnDrop(tokio::spawn(
                    async move {
                        let reading = Reading::Routed(shadow_ctx.as_ref());
                        store
                            .read_side_held(&*shadow_op, shadow, stage, reading)
                            .await
                    }
                    .instrument(tracing::Span::current()),
                ));
                // Each side's connection is released once both reads are done, so that the
                // first one's release (a round trip) does not compete with the other read.
                let mut held = Vec::with_capacity(2);
                let mut hold = |read: Result<_>| {
                    read.map(|(read, conn)| {
                        held.push(conn);
                        read
                    })
                };
                let served_result = hold(self.read_side_held(&*op, served, stage, reading).await);
                let shadow_result = shadow_task.join().await.map(&mut hold);
                let served_value = self.serve_and_compare(
                    key,
                    stage,
                    (served, served_result),
                    (shadow, shadow_result),
                    op,
                );
                drop(held);
                return served_value;
            }
            ShadowMode::Random if random_key() & 1 == 1 => {
                let s = shadow_read(&op).await;
                (self.read_side(&op, served, stage, reading).await, s)
            }
            ShadowMode::Serial | ShadowMode::Random => {
                let v = self.read_side(&op, served, stage, reading).await;
                (v, shadow_read(&op).await)
            }
        };
        self.serve_and_compare(
            key,
            stage,
            (served, served_result),
            (shadow, shadow_result),
            Arc::new(op),
        )
    }

    /// Counts a failed or panicked shadow read, returns the served value (or its error), and on
    /// a pair of values compares them, classifying a mismatch off the caller's path.
    fn serve_and_compare<T, F>(
        &self,
        key: i64,
        stage: Stage,
        (served, served_result): (Side, SideRead<T>),
        (shadow, shadow_result): (Side, std::thread::Result<SideRead<T>>),
        op: Arc<F>,
    ) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>>
            + Send
            + Sync
            + 'static,
    {
        let shadow_value = match shadow_result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                tracing::warn!(migration = %self.inner.migration, key, side = %shadow, error = %err, "shadow read failed");
                self.count_shadow_error(shadow);
                None
            }
            Err(_panic) => {
                tracing::error!(migration = %self.inner.migration, key, side = %shadow, "shadow read panicked");
                self.count_shadow_error(shadow);
                None
            }
        };
        let (value, served_took) = match served_result {
            Ok(v) => v,
            Err(err) => {
                self.count_shadow_error(served);
                return Err(err);
            }
        };
        if let Some((other, shadow_took)) = shadow_value {
            let served_read = (to_value(&value), served_took);
            let shadow_read = (to_value(&other), shadow_took);
            let store = self.clone();
            // A mismatch is classified off the request's path (a second look after a delay).
            if let Some(classify) =
                store.compare_or_classify_later(key, stage, served, served_read, shadow_read, op)
            {
                tokio::spawn(classify);
            }
        }
        Ok(value)
    }

    /// Compares; on a mismatch returns the classification work (re-read and record), to be run
    /// off the caller's path.
    fn compare_or_classify_later<T, F>(
        self,
        key: i64,
        stage: Stage,
        served: Side,
        served_read: (serde_json::Value, Duration),
        shadow_read: (serde_json::Value, Duration),
        op: Arc<F>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static>
    where
        T: Serialize + Send + 'static,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>>
            + Send
            + Sync
            + 'static,
    {
        let ((legacy, legacy_took), (new, new_took)) = match served {
            Side::Legacy => (served_read, shadow_read),
            Side::New => (shadow_read, served_read),
        };
        if self.inner.shadow.comparison.compare(&legacy, &new).is_ok() {
            self.count_result("match");
            return None;
        }
        let Ok(permit) = self.inner.classifying.clone().try_acquire_owned() else {
            // Too many re-checks in flight already: count it, do not pile up more work.
            self.count_result("unclassified");
            return None;
        };
        Some(async move {
            let _permit = permit;
            self.classify(key, stage, op, micros(legacy_took), micros(new_took))
                .await
        })
    }

    async fn compare_and_classify<T, F>(
        &self,
        key: i64,
        stage: Stage,
        served: Side,
        served_read: (serde_json::Value, Duration),
        shadow_read: (serde_json::Value, Duration),
        op: Arc<F>,
    ) where
        T: Serialize + Send + 'static,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>>
            + Send
            + Sync
            + 'static,
    {
        if let Some(classify) =
            self.clone()
                .compare_or_classify_later(key, stage, served, served_read, shadow_read, op)
        {
            classify.await;
        }
    }

    /// Reads the shadow side and compares, in a task of its own (`Background` mode).
    fn compare_in_background<T, F>(
        &self,
        key: i64,
        stage: Stage,
        served: Side,
        served_read: (serde_json::Value, Duration),
        op: F,
        ctx: Option<RequestContext>,
    ) where
        T: Serialize + Send + 'static,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>>
            + Send
            + Sync
            + 'static,
    {
        let Ok(permit) = self.inner.background.clone().try_acquire_owned() else {
            self.count_result("skipped");
            return;
        };
        let store = self.clone();
        let shadow = served.other();
        tokio::spawn(
            async move {
                let _permit = permit;
                // The request's read-your-writes state (it may have written since) travels along.
                let reading = Reading::Routed(ctx.as_ref());
                let read =
                    AssertUnwindSafe(store.read_side(&op, shadow, stage, reading)).catch_unwind();
                let (other, other_took) =
                    match tokio::time::timeout(store.inner.shadow.background_timeout, read).await {
                        Ok(Ok(Ok(read))) => read,
                        _ => {
                            tracing::warn!(migration = %store.inner.migration, key, side = %shadow,
                            "background shadow read failed, panicked or timed out");
                            store.count_shadow_error(shadow);
                            return;
                        }
                    };
                let other = to_value(&other);
                store
                    .compare_and_classify(
                        key,
                        stage,
                        served,
                        served_read,
                        (other, other_took),
                        Arc::new(op),
                    )
                    .await;
            }
            // A child of the request's span, which may well have closed by the time it ends.
            .instrument(tracing::Span::current()),
        );
    }

    /// Both reads in one repeatable-read transaction: the served side, then the shadow side.
    /// On a replica (read-only transactions run on a hot standby), a hot-standby conflict or a
    /// dead replica retries the pair elsewhere.
    async fn read_snapshot<T, F>(
        &self,
        op: &F,
        served: Side,
        shadow: Side,
        stage: Stage,
        ctx: Option<&RequestContext>,
    ) -> Result<(SideRead<T>, std::thread::Result<SideRead<T>>)>
    where
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        let begin = match self.inner.db.backend() {
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            // A deferred SQLite transaction reads one snapshot from its first read on (WAL).
            Backend::Sqlite => "BEGIN",
        };
        let attempt = |mut conn: PoolConnection<Any>, target: ReadTarget| async move {
            let mut tx = conn.begin_with(begin).await?;
            let mut timed =
                async |side: Side| self.call_side("read", op, side, stage, &mut tx).await;
            let served_result = match timed(served).await {
                // On a replica that failed the way replicas fail: the pair is retried elsewhere.
                Err(err)
                    if matches!(target, ReadTarget::Replica(_))
                        && ReplicaFailure::of_error(&err).is_some() =>
                {
                    return Err(err);
                }
                other => other,
            };
            let shadow_result = AssertUnwindSafe(timed(shadow)).catch_unwind().await;
            // Read-only: nothing to keep, and nothing to wait for. Dropped, the transaction
            // queues its ROLLBACK; the pool flushes it (and tests the connection, closing it if
            // broken) while returning the connection, in a task of its own: off the caller's
            // path, one round trip fewer on it.
            drop(tx);
            Ok((served_result, shadow_result))
        };
        match &self.inner.router {
            Some(router) => {
                router
                    .run_read(ctx, self.inner.primary_reads, attempt)
                    .await
            }
            None => attempt(self.inner.db.pool().acquire().await?, ReadTarget::Primary).await,
        }
    }

    async fn classify<T, F>(&self, key: i64, stage: Stage, op: Arc<F>, legacy_us: i64, new_us: i64)
    where
        T: Serialize + Send + 'static,
        F: for<'c> Fn(&'c R, &'c mut AnyConnection) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync,
    {
        tokio::time::sleep(self.inner.shadow.recheck_delay).await;
        // The second look is on the primary: the truth, whatever served the first.
        let legacy = self
            .read_side(&*op, Side::Legacy, stage, Reading::Primary)
            .await;
        let new = self
            .read_side(&*op, Side::New, stage, Reading::Primary)
            .await;
        let (Ok((legacy, _)), Ok((new, _))) = (legacy, new) else {
            tracing::warn!(migration = %self.inner.migration, key, "re-read of a mismatch failed; not classified");
            return;
        };
        let (class, diff) = match self
            .inner
            .shadow
            .comparison
            .compare(&to_value(&legacy), &to_value(&new))
        {
            Ok(()) => (MismatchClass::Transient, Vec::new()),
            Err(diff) => (MismatchClass::Confirmed, diff),
        };
        self.count_result(class.as_str());
        let recorded = record_mismatch(
            &self.inner.db,
            crate::shadow::NewMismatch {
                migration: &self.inner.migration,
                key,
                class,
                stage,
                diff: &diff,
                legacy_micros: legacy_us,
                new_micros: new_us,
            },
            self.inner.shadow.keep,
        )
        .await;
        if let Err(err) = recorded {
            tracing::warn!(migration = %self.inner.migration, key, error = %err, "could not record a mismatch");
        }
    }

    fn count_result(&self, result: &'static str) {
        self.inner
            .metrics
            .shadow_results
            .add(1, &[self.migration_attr(), KeyValue::new("result", result)]);
    }

    fn count_shadow_error(&self, side: Side) {
        self.inner.metrics.shadow_errors.add(
            1,
            &[self.migration_attr(), KeyValue::new("side", side.as_str())],
        );
    }

    /// Replays repair intents older than `min_age`: re-syncs each key from the side that is
    /// authoritative now (copy, or delete when the key is gone there), then drops the intent.
    pub async fn repair(&self, min_age: Duration) -> Result<RepairReport> {
        repair::run(self, min_age).await
    }
}

/// Whether this read is compared, for a sample rate between 0 (never) and 1 (always).
fn sampled(rate: f64) -> bool {
    let unit = (random_key() >> 11) as f64 / (1u64 << 53) as f64; // uniform in [0, 1)
    rate >= 1.0 || (rate > 0.0 && unit < rate)
}

fn to_value<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Copies a backfill batch's keys from one database to the other through [`Resync`].
struct SplitCopier<R: ?Sized, X> {
    store: DualStore<R, X>,
    source: Side,
}

impl<R, X> crate::backfill::KeyCopier for SplitCopier<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    fn target_bounds(&self) -> BoxFuture<'_, Result<Option<(i64, i64)>>> {
        Box::pin(async move {
            let Some(def) = &self.store.inner.definition else {
                return Ok(None);
            };
            let (table, key) = match self.source.other() {
                Side::New => (&def.new_table, &def.new_key),
                Side::Legacy => (&def.legacy_table, &def.legacy_key),
            };
            let sql = format!(
                "SELECT CAST(MIN({key}) AS BIGINT) AS lo, CAST(MAX({key}) AS BIGINT) AS hi FROM {table}"
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_one(self.store.database_of(self.source.other()).pool())
                .await?;
            use sqlx::Row as _;
            let lo: Option<i64> = row.try_get("lo")?;
            let hi: Option<i64> = row.try_get("hi")?;
            Ok(lo.zip(hi))
        })
    }

    fn copy<'a>(
        &'a self,
        source: &'a mut AnyConnection,
        keys: &'a [i64],
        range: (i64, i64),
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let store = &self.store;
            let inner = &store.inner;
            let target = self.source.other();
            // Keys the other side holds in the range but the batch did not list: the source
            // lost them (or gained them just now). Each is read again from the source below,
            // so only a key the source really no longer has is removed.
            let mut extra = Vec::new();
            if let Some(def) = &inner.definition {
                let (table, key) = match target {
                    Side::New => (&def.new_table, &def.new_key),
                    Side::Legacy => (&def.legacy_table, &def.legacy_key),
                };
                let sql =
                    format!("SELECT {key} AS k FROM {table} WHERE {key} > $1 AND {key} <= $2");
                let held: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(range.0)
                    .bind(range.1)
                    .fetch_all(store.database_of(target).pool())
                    .await?;
                let listed: std::collections::HashSet<i64> = keys.iter().copied().collect();
                extra.extend(held.into_iter().filter(|k| !listed.contains(k)));
            }
            // Read under the batch's row locks, write the other database, commit it: the
            // batch (and its locks) commits after, so no dual write can slip in between.
            let mut records = Vec::with_capacity(keys.len() + extra.len());
            for &key in keys.iter().chain(&extra) {
                let record = inner
                    .resync
                    .load(store.repo(self.source), source, key)
                    .await
                    .map_err(store.side_error(self.source))?;
                records.push((key, record));
            }
            let records_len = records.len();
            let mut tx = store.database_of(target).pool().begin().await?;
            for (key, record) in records {
                match record {
                    Some(record) => {
                        inner
                            .resync
                            .store(store.repo(target), &mut tx, key, record)
                            .await
                    }
                    None => inner.resync.delete(store.repo(target), &mut tx, key).await,
                }
                .map_err(store.side_error(target))?;
            }
            tx.commit().await?;
            Ok(records_len as u64)
        })
    }
}

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// Backfills this store's migration (see [`crate::backfill`]); needs the definition
    /// ([`DualStoreBuilder::definition`]) for the source table and key. One database: the
    /// definition's SQL copies. Two databases: each batch's keys are read under the batch's
    /// row locks and written to the other database through [`Resync`], which commits before
    /// the batch does.
    pub async fn backfill(
        &self,
        options: crate::backfill::BackfillOptions,
        progress: impl Fn(&crate::backfill::Progress) + Send + Sync + 'static,
    ) -> Result<crate::backfill::BackfillReport> {
        let Some(def) = &self.inner.definition else {
            return Err(Error::Config(
                "a dual store backfills with its definition: set DualStoreBuilder::definition"
                    .into(),
            ));
        };
        let flags = self.inner.flags.store().clone();
        let metrics = self.inner.metrics.clone();
        if !self.is_split() {
            return crate::backfill::run(self.database(), &*flags, def, options, metrics, progress)
                .await;
        }
        let source = match options.direction {
            crate::definition::Direction::Forward => Side::Legacy,
            crate::definition::Direction::Reverse => Side::New,
        };
        let copier = crate::backfill::Copier::Keys(Arc::new(SplitCopier {
            store: self.clone(),
            source,
        }));
        crate::backfill::run_with(
            self.database_of(source),
            &*flags,
            def,
            options,
            metrics,
            progress,
            Some(copier),
        )
        .await
    }
}
