//! [`DualStoreBuilder`]: a dual store's options.

use std::sync::Arc;

use super::{DualStore, Inner, Resync, handle_of};
use crate::definition::MigrationDef;
use crate::flags::FlagCache;
use crate::metrics::Metrics;
use crate::ryw::Router;
use crate::shadow::{ShadowMode, ShadowOptions};
use crate::{Error, Result};

/// Decides, from a key's canonical text, whether to fail a write before its commit.
#[doc(hidden)]
pub type CommitHook = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Called with a key's canonical text after a two-database write's authoritative commit.
#[doc(hidden)]
pub type CommittedHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Fault injection for drills and tests (not part of the documented API): a hook that fails a
/// write just before its commit, and one called right after a two-database write's
/// authoritative side committed. Both get the key's canonical text.
#[doc(hidden)]
#[derive(Clone, Default)]
pub struct FaultHooks {
    /// When it returns true for a key, the write fails after both sides were written and
    /// before the commit. For [`DualStore::transaction`](super::DualStore::transaction): the
    /// first key the transaction wrote (none written: not called).
    pub before_commit: Option<CommitHook>,
    /// Called with the key right after the authoritative side committed (two databases).
    pub after_authoritative_commit: Option<CommittedHook>,
}

/// Builds a [`DualStore`].
pub struct DualStoreBuilder<R: ?Sized, X: Resync<R>> {
    inner: Inner<R, X>,
}

impl<R, X> DualStoreBuilder<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    pub(super) fn new(
        migration: &str,
        legacy: Arc<R>,
        new: Arc<R>,
        pool: sqlx::Pool<X::Database>,
        flags: FlagCache,
        resync: X,
    ) -> Self {
        let migration: Arc<str> = migration.into();
        let db = handle_of(&pool);
        // One permit until `build` adds the rest the shadow options ask for.
        let bookkeeping = Arc::new(tokio::sync::Semaphore::new(1));
        DualStoreBuilder {
            inner: Inner {
                stats: crate::stats::Stats::new(
                    db.clone(),
                    migration.clone(),
                    Some(bookkeeping.clone()),
                ),
                labels: super::labels::CallLabels::new(&migration, db.backend().db_system_name()),
                migration,
                legacy,
                new,
                db,
                pool,
                new_pool: None,
                flags,
                resync,
                shadow: ShadowOptions::default(),
                metrics: Metrics::global(),
                hooks: FaultHooks::default(),
                background: Arc::new(tokio::sync::Semaphore::new(1)),
                classifying: Arc::new(tokio::sync::Semaphore::new(1)),
                bookkeeping,
                recorder: std::sync::OnceLock::new(),
                router: None,
                primary_reads: false,
                definition: None,
                settle_paused_until: std::sync::atomic::AtomicI64::new(0),
                settling: tokio::sync::Semaphore::new(super::repair::SETTLING_AT_ONCE),
            },
        }
    }

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

    /// The new shape lives in this other database (of the same backend). Writes then commit on
    /// the authoritative side together with a repair intent, and the other side is written by
    /// a task that survives the caller being dropped; the intent is cleared when it succeeds.
    /// Both databases need twintrack's tables ([`crate::schema::install`]).
    pub fn new_database(mut self, pool: sqlx::Pool<X::Database>) -> Self {
        let db = handle_of(&pool);
        self.inner.new_pool = Some((pool, db));
        self
    }

    /// Reads go where `router` says: a replica of the database, unless the request wrote,
    /// carries a token no replica has replayed, or the migration asks for primary reads (see
    /// [`crate::ryw`]). The router's primary must be this store's database. With two databases
    /// ([`DualStoreBuilder::new_database`]) only the legacy database's reads are routed; the
    /// new database's are served by its primary.
    pub fn router(mut self, router: Router) -> Self {
        self.inner.router = Some(router);
        self
    }

    /// The repair worker re-syncs keys with this definition's SQL
    /// ([`resync_key`](crate::definition::resync_key), the same way `twintrack verify --repair`
    /// does) instead of through [`Resync`]; `Resync` still deletes a legacy row an
    /// authoritative new side no longer has, and still serves two-database stores. Backfill
    /// ([`DualStore::backfill`]) needs it.
    pub fn definition(mut self, definition: MigrationDef) -> Self {
        self.inner.definition = Some(definition);
        self
    }

    /// This migration reads from the primary only, whatever the request (for data that must
    /// never be read stale, or a replica that does not have the new shape yet).
    pub fn primary_reads(mut self, primary_only: bool) -> Self {
        self.inner.primary_reads = primary_only;
        self
    }

    /// Fault injection for drills and tests; see [`FaultHooks`].
    #[doc(hidden)]
    pub fn fault_hooks(mut self, hooks: FaultHooks) -> Self {
        self.inner.hooks = hooks;
        self
    }

    /// The store, or [`Error::Config`] for a combination that cannot work (`Snapshot` shadow
    /// reads need both shapes in one database; a router must route this store's database) or
    /// shadow options out of range.
    pub fn build(mut self) -> Result<DualStore<R, X>> {
        if self.inner.new_pool.is_some() && self.inner.shadow.mode == ShadowMode::Snapshot {
            return Err(Error::Config(
                "snapshot shadow reads need both shapes in one database; use concurrent or background".into(),
            ));
        }
        if let Some(router) = &self.inner.router
            && !router.primary().same_database(&self.inner.db)
        {
            return Err(Error::Config(format!(
                "the router's primary ({}) is not the dual store's database ({})",
                router.primary().describe(),
                self.inner.db.describe()
            )));
        }
        let shadow = &self.inner.shadow;
        if !crate::shadow::MAX_DIFF_BYTES_RANGE.contains(&shadow.max_diff_bytes) {
            return Err(Error::Config(format!(
                "max_diff_bytes must be between 256 and 65536, got {}",
                shadow.max_diff_bytes
            )));
        }
        if shadow.bookkeeping_connections == 0 {
            return Err(Error::Config(
                "bookkeeping_connections must be at least 1".into(),
            ));
        }
        // The same semaphore the figures' writer holds, so both share the permits.
        self.inner
            .bookkeeping
            .add_permits(shadow.bookkeeping_connections - 1);
        let limit = self.inner.shadow.background_limit.max(1);
        self.inner.background = Arc::new(tokio::sync::Semaphore::new(limit));
        self.inner.classifying = Arc::new(tokio::sync::Semaphore::new(limit));
        Ok(DualStore {
            inner: Arc::new(self.inner),
        })
    }
}
