//! The dual store: one repository call, run on the side(s) the pinned stage names.
//!
//! Wrap the legacy and the new implementation of your repository trait in a [`DualStore`].
//! Handlers then call [`DualStore::read`] and [`DualStore::write`] with the operation once; the
//! store runs it on the right side(s), in the stage's order, without any stage logic in your
//! code. Each operation receives the native sqlx connection of its database
//! (`&mut PgConnection`, `&mut SqliteConnection`), so typed queries, `query_as` with `FromRow`,
//! the checked `query!` macros and native types (`uuid`, `timestamptz`, arrays) work
//! unchanged. The stage comes from the request's [`RequestContext`] (or, outside a request,
//! from the flag cache's current snapshot).
//!
//! ```no_run
//! # use std::sync::Arc;
//! use sqlx::PgConnection;
//! use twintrack::dual::{DualStore, Resync};
//! use twintrack::flags::BoxFuture;
//! use uuid::Uuid;
//!
//! trait Tags: Send + Sync {
//!     fn get<'c>(&'c self, conn: &'c mut PgConnection, id: Uuid)
//!         -> BoxFuture<'c, sqlx::Result<Vec<String>>>;
//!     fn set<'c>(&'c self, conn: &'c mut PgConnection, id: Uuid, tags: Vec<String>)
//!         -> BoxFuture<'c, sqlx::Result<()>>;
//! }
//! # async fn demo<X>(store: DualStore<dyn Tags, X>) -> twintrack::Result<()>
//! # where X: Resync<dyn Tags, Database = sqlx::Postgres, Key = Uuid> {
//! let id = Uuid::new_v4();
//! // Written to legacy, new or both (authoritative first, atomically), as the stage says.
//! // The operation may run once per side, so it is an `Fn`: it clones what it hands over.
//! let tags = vec!["rust".to_owned()];
//! store
//!     .write(&id, move |repo, conn| repo.set(conn, id, tags.clone()))
//!     .await?;
//! // Served by the stage's side; in `shadow` and `live` also compared with the other side.
//! let tags = store.read(&id, move |repo, conn| repo.get(conn, id)).await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! - `builder.rs`: [`DualStoreBuilder`], the options.
//! - `write.rs`: writes, in one database (one transaction; a savepoint in a caller's) or across
//!   two (the authoritative side with an intent, then a re-sync).
//! - `read.rs`: reads, one function per [`ShadowMode`](crate::shadow::ShadowMode).
//! - `compare.rs`: comparing a read's two values and classifying a mismatch, in one place.
//! - `resync.rs`: the one way a key is copied to the other side ([`Resync`]), used by the
//!   repair worker, two-database writes and two-database backfill.
//! - `repair.rs`: repair intents and the repair worker's pass.
//!
//! # Writes
//!
//! Both shapes live in one database: the sides are written in one transaction on the primary,
//! the authoritative side first. If it fails, the other side is never called and the caller
//! gets the error. If the other side fails, the transaction is rolled back and the
//! authoritative side written again alone, with a *repair intent* for the key, in a new one,
//! and the write succeeds (so the authoritative side's operation runs twice then: keep effects
//! outside the database out of it). Writes that also touch tables outside the migration run in
//! a transaction of the store's own ([`DualStore::transaction`]), rolled back and run again the
//! same way. In a caller's transaction ([`DualStore::write_in`]), which cannot be run again,
//! the other side runs in a savepoint instead (a statement more per write), rolled back to
//! when it fails, with the intent in the same transaction. [`DualStore::repair`] later re-syncs such
//! keys from the authoritative side.
//!
//! # Reads
//!
//! See [`crate::shadow`] for how reads are compared in `shadow` and `live`.
//!
//! [`RequestContext`]: crate::RequestContext

mod builder;
mod compare;
mod labels;
mod read;
mod repair;
mod resync;
mod write;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;

pub use builder::{CommitHook, CommittedHook, DualStoreBuilder, FaultHooks};
pub(crate) use repair::{IN_FLIGHT, IN_FLIGHT_FOR};
pub use repair::{RepairReport, intents_targeting, pending_intents};
pub(crate) use repair::{await_intents_targeting, integer_key, intents_pending_error};
pub use resync::Resync;
pub use write::StoreTx;

use crate::db::{Database, Native};
use crate::definition::MigrationDef;
use crate::flags::{BoxFuture, FlagCache, MigrationFlag};
use crate::key::Key;
use crate::metrics::Metrics;
use crate::ryw::Router;
use crate::shadow::ShadowOptions;
use crate::{Error, RequestContext, Result, Side};
use labels::Call;

/// The native connection type of database `DB` (`PgConnection`, `SqliteConnection`).
pub type NativeConnection<DB> = <DB as sqlx::Database>::Connection;

/// A repository operation: called with one side's repository and the native connection to run
/// on (inside the write's transaction, or where the read is routed). It may run once per side,
/// so it is an `Fn`. Every closure of that shape is one.
pub trait Operation<R: ?Sized, C, T>:
    for<'c> Fn(&'c R, &'c mut C) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync
{
}

impl<R: ?Sized, C, T, F> Operation<R, C, T> for F where
    F: for<'c> Fn(&'c R, &'c mut C) -> BoxFuture<'c, sqlx::Result<T>> + Send + Sync
{
}

/// The database, key and connection types of a store whose key copies are `X`.
type Db<R, X> = <X as Resync<R>>::Database;
type KeyOf<R, X> = <X as Resync<R>>::Key;
type ConnOf<R, X> = NativeConnection<Db<R, X>>;

/// A legacy and a new implementation of repository `R`, routed by the pinned stage.
///
/// `R` is usually a trait object (`dyn MyRepository`); `X` tells the store how to copy one key
/// from one side to the other ([`Resync`]), and with it the database (`X::Database`) and key
/// type (`X::Key`). Cheap to clone; `Send + Sync`.
pub struct DualStore<R: ?Sized, X: Resync<R>> {
    inner: Arc<Inner<R, X>>,
}

impl<R: ?Sized, X: Resync<R>> Clone for DualStore<R, X> {
    fn clone(&self) -> Self {
        DualStore {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<R: ?Sized, X: Resync<R>> {
    migration: Arc<str>,
    legacy: Arc<R>,
    new: Arc<R>,
    /// The legacy shape's database (both shapes', unless `new_pool` is set). twintrack's own
    /// tables (mismatches, intents) live here.
    pool: sqlx::Pool<Db<R, X>>,
    db: Database,
    /// The new shape's database, when it is not `pool`'s.
    new_pool: Option<(sqlx::Pool<Db<R, X>>, Database)>,
    flags: FlagCache,
    resync: X,
    shadow: ShadowOptions,
    metrics: Metrics,
    hooks: FaultHooks,
    /// The span name and metric attributes of each repository call.
    labels: labels::CallLabels,
    /// This process's per-minute figures for the admin page's charts (write latency by side,
    /// shadow results), written to `db`.
    stats: crate::stats::Stats,
    /// Caps `Background` shadow reads in flight.
    background: Arc<tokio::sync::Semaphore>,
    /// Caps mismatch classifications in flight (a real divergence can make every read one).
    classifying: Arc<tokio::sync::Semaphore>,
    /// The pool connections shadow bookkeeping (re-reads of a mismatch, the recorder) may hold
    /// at once: [`ShadowOptions::bookkeeping_connections`].
    bookkeeping: Arc<tokio::sync::Semaphore>,
    /// The mismatch recorder's queue, started with the first mismatch.
    recorder: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::shadow::NewMismatch>>,
    /// Routes reads between the primary and replicas (of `pool`); none: every read on `pool`.
    router: Option<Router>,
    /// The migration reads from the primary only.
    primary_reads: bool,
    /// Re-sync keys with the definition's SQL (one database only).
    definition: Option<MigrationDef>,
    /// Two databases: until when (µs since the epoch) reads skip settling their key's intents
    /// because the intents' database did not answer (see `read.rs`).
    settle_paused_until: std::sync::atomic::AtomicI64,
    /// Turns to settle a key inline ([`repair::SETTLING_AT_ONCE`]).
    settling: tokio::sync::Semaphore,
}

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// A dual store for `migration`, with both shapes in `pool` (the pool the service already
    /// has). `flags` must have the migration registered.
    pub fn builder(
        migration: &str,
        legacy: Arc<R>,
        new: Arc<R>,
        pool: sqlx::Pool<X::Database>,
        flags: FlagCache,
        resync: X,
    ) -> DualStoreBuilder<R, X> {
        DualStoreBuilder::new(migration, legacy, new, pool, flags, resync)
    }

    /// The migration this store routes.
    pub fn migration(&self) -> &str {
        &self.inner.migration
    }

    /// The legacy shape's pool (both shapes', unless a separate new database was set).
    pub fn pool(&self) -> &sqlx::Pool<X::Database> {
        &self.inner.pool
    }

    /// The legacy shape's database, as twintrack's handle.
    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// The pool holding `side`.
    pub fn pool_of(&self, side: Side) -> &sqlx::Pool<X::Database> {
        match (side, &self.inner.new_pool) {
            (Side::New, Some((pool, _))) => pool,
            _ => &self.inner.pool,
        }
    }

    /// The database holding `side`, as twintrack's handle.
    pub fn database_of(&self, side: Side) -> &Database {
        match (side, &self.inner.new_pool) {
            (Side::New, Some((_, db))) => db,
            _ => &self.inner.db,
        }
    }

    /// Waits, at most `timeout`, for this store's work off the request path to finish: shadow
    /// reads running in the background, mismatch classifications, and the mismatch recorder's
    /// queue to empty (the batch it took last may still be being written: mismatches are
    /// diagnostics); then writes this process's per-minute figures for the admin page's
    /// charts (otherwise written every 10 s). Call it at shutdown, once the server has stopped taking requests (see
    /// [`crate::shutdown`]). Returns whether all of it finished in time.
    ///
    /// A write's other side is not such work: it completes inside the request, or stays a
    /// repair intent in the database for a repair worker (this process's, or the next one's),
    /// so nothing is lost whether or not this is called.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let limit = u32::try_from(self.inner.shadow.background_limit.max(1)).unwrap_or(u32::MAX);
        let work = async {
            let _background = self.inner.background.acquire_many(limit).await;
            let _classifying = self.inner.classifying.acquire_many(limit).await;
            if let Some(queue) = self.inner.recorder.get() {
                while queue.capacity() < queue.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            if let Err(err) = self.inner.stats.flush().await {
                tracing::warn!(migration = %self.inner.migration, error = %err, "could not write the per-minute figures");
            }
        };
        tokio::time::timeout(timeout, work).await.is_ok()
    }

    /// How this store's shadow reads run and compare.
    pub fn shadow_options(&self) -> &ShadowOptions {
        &self.inner.shadow
    }

    /// Whether the two shapes live in separate databases.
    pub fn is_split(&self) -> bool {
        self.inner.new_pool.is_some()
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

    /// Records one repository call on `side`: `error` is its `error.type` when it failed.
    fn observe(&self, call: Call, side: Side, took: Duration, error: Option<String>) {
        let metrics = self.inner.metrics.get();
        let labels = &self.inner.labels;
        match error {
            None => {
                metrics.dual_ops.add(1, labels.ops_ok(call, side));
                metrics
                    .db_duration
                    .record(took.as_secs_f64(), labels.duration_ok(call, side));
            }
            Some(error) => {
                let mut ops = labels.ops_ok(call, side).to_vec();
                ops[3] = KeyValue::new("outcome", "error");
                metrics.dual_ops.add(1, &ops);
                let mut attrs = labels.duration_ok(call, side).to_vec();
                attrs.push(KeyValue::new("error.type", error));
                metrics.db_duration.record(took.as_secs_f64(), &attrs);
            }
        }
        if call == Call::Write {
            self.inner.stats.write(side.as_str(), took);
        }
    }

    /// The span of one repository call on one side, with OpenTelemetry's database attributes
    /// (its name `{db.operation.name} {migration}`, as the conventions name database spans)
    /// and twintrack's; `twintrack.read_from` is recorded by the caller.
    fn span(&self, call: Call, stage: crate::Stage, side: Side) -> tracing::Span {
        tracing::info_span!(
            "twintrack.dual",
            "otel.name" = self.inner.labels.span_name(call),
            "db.operation.name" = call.as_str(),
            "db.system.name" = self.database_of(side).backend().db_system_name(),
            "twintrack.migration" = %self.inner.migration,
            "twintrack.stage" = %stage,
            "twintrack.side" = %side,
            "twintrack.read_from" = tracing::field::Empty,
        )
    }

    /// Tags a repository error with the side it came from.
    pub(crate) fn side_error(&self, side: Side) -> impl Fn(sqlx::Error) -> Error + '_ {
        move |source| Error::Repository {
            migration: self.inner.migration.to_string(),
            side,
            source,
        }
    }

    /// The definition's key kinds, checked against `X::Key` (a definition of another key type
    /// is an [`Error::Config`]).
    async fn definition_kinds(&self, def: &MigrationDef) -> Result<()> {
        let kinds = match self.is_split() {
            false => def.key_kinds(&self.inner.db).await?,
            true => def.side_key_kinds(&self.inner.db, Side::Legacy).await?,
        };
        if kinds != <KeyOf<R, X> as Key>::KINDS {
            let show =
                |k: &[crate::KeyKind]| k.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
            return Err(Error::Config(format!(
                "migration {:?}: the store's key type is ({}) but the database's key columns are ({})",
                self.inner.migration,
                show(<KeyOf<R, X> as Key>::KINDS),
                show(&kinds)
            )));
        }
        Ok(())
    }

    /// Replays repair intents older than `min_age`: re-syncs each key (copy, or delete when
    /// the key is gone there), then drops the intent. One database: from the side that is
    /// authoritative now. Two databases: from the side whose database holds the intent (the
    /// side its write committed on, authoritative then), even if the stage has moved authority
    /// since; an intent superseded by a newer one for the key in the other database is dropped.
    pub async fn repair(&self, min_age: Duration) -> Result<RepairReport> {
        repair::run(self, min_age).await
    }

    /// Backfills this store's migration (see [`crate::backfill`]); needs the definition
    /// ([`DualStoreBuilder::definition`]) for the source table and key. One database: the
    /// definition's SQL copies. Two databases: each batch's keys are read under the batch's
    /// row locks and written to the other database, which commits before the batch does: by
    /// the definition's `copy_select` (or `reverse_copy_select`) when it has one (see
    /// [`crate::across`]), else key by key through [`Resync`].
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
        self.definition_kinds(def).await?;
        let flags = self.inner.flags.store().clone();
        let metrics = self.inner.metrics.clone();
        if !self.is_split() {
            return crate::backfill::run(self.database(), &*flags, def, options, metrics, progress)
                .await;
        }
        let source = options.direction.source();
        let has_select = match options.direction {
            crate::definition::Direction::Forward => def.copy_select.is_some(),
            crate::definition::Direction::Reverse => def.reverse_copy_select.is_some(),
        };
        let copier = if has_select {
            // The definition's select: one statement a batch on each side.
            let (from, to) = (self.database_of(source), self.database_of(source.other()));
            let kinds = <KeyOf<R, X> as Key>::KINDS;
            crate::backfill::Copier::Keys(Arc::new(
                crate::across::CrossCopier::new(def, kinds, options.direction, from, to).await?,
            ))
        } else {
            crate::backfill::Copier::Keys(Arc::new(resync::BatchCopier::new(self.clone(), source)))
        };
        crate::backfill::run_with(
            self.database_of(source),
            &*flags,
            def,
            options,
            metrics,
            progress,
            copier,
        )
        .await
    }
}

/// twintrack's handle on a pool of the store's backend.
fn handle_of<DB: Native>(pool: &sqlx::Pool<DB>) -> Database {
    DB::database(pool.clone())
}
