//! The one way a key is copied to the other side: [`Resync`], and the store's re-sync of a key
//! (used by the repair worker, two-database writes and two-database backfill).

use sqlx::{AssertSqlSafe, Connection};

use super::{ConnOf, Db, DualStore, KeyOf, NativeConnection, repair};
use crate::backfill::KeyCopier;
use crate::db::{Conn, Native, Query, acquire};
use crate::definition::{Resynced, bound};
use crate::flags::BoxFuture;
use crate::key::{DynKey, Key};
use crate::keyset::{self, KeyRange};
use crate::{Error, Result, Side};

/// How to copy one key from one side of a migration to the other, in your repository's terms;
/// with it, the store's database and key type.
///
/// The store calls `load` on the side that holds the truth, then `store` (or `delete`, when
/// the key is gone there) on the other side. `load` should lock what it reads (`FOR SHARE` on
/// PostgreSQL) so that a concurrent write cannot slip in between the load and the store. All
/// three must be idempotent.
pub trait Resync<R: ?Sized>: Send + Sync + 'static {
    /// The database both shapes live in: `sqlx::Postgres` or `sqlx::Sqlite`.
    type Database: Native;
    /// The migration's key: `i64`, `i32`, `uuid::Uuid`, `String`, or a tuple of them.
    type Key: Key;
    /// A key's data, in a form both sides can store.
    type Record: Send;

    /// The key's record on this side, or `None` if it has none.
    fn load<'c>(
        &'c self,
        repo: &'c R,
        conn: &'c mut NativeConnection<Self::Database>,
        key: &'c Self::Key,
    ) -> BoxFuture<'c, sqlx::Result<Option<Self::Record>>>;

    /// Makes this side hold `record` for the key (insert or update).
    fn store<'c>(
        &'c self,
        repo: &'c R,
        conn: &'c mut NativeConnection<Self::Database>,
        key: &'c Self::Key,
        record: Self::Record,
    ) -> BoxFuture<'c, sqlx::Result<()>>;

    /// Makes this side hold nothing for the key.
    fn delete<'c>(
        &'c self,
        repo: &'c R,
        conn: &'c mut NativeConnection<Self::Database>,
        key: &'c Self::Key,
    ) -> BoxFuture<'c, sqlx::Result<()>>;
}

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// One database: makes the other side match `source` for `key`, on `conn` (inside the
    /// caller's transaction). With a definition, its SQL copies ([`resync_key`]); where that
    /// leaves a legacy row alone, and without a definition, [`Resync`] does.
    ///
    /// [`resync_key`]: crate::definition::resync_key
    pub(super) async fn resync_in(
        &self,
        conn: &mut ConnOf<R, X>,
        key: &KeyOf<R, X>,
        source: Side,
    ) -> Result<Resynced> {
        if let Some(def) = &self.inner.definition {
            let kinds = <KeyOf<R, X> as Key>::KINDS;
            let done = crate::definition::resync_key(
                Db::<R, X>::conn(conn),
                def,
                kinds,
                &key.to_dyn(),
                source,
            )
            .await?;
            if done != Resynced::LeftAlone {
                return Ok(done);
            }
        }
        self.copy_with_resync(conn, None, key, source).await
    }

    /// Copies through [`Resync`]: loads on `source_conn`, stores or deletes on `target_conn`
    /// (the same connection when `None`).
    async fn copy_with_resync(
        &self,
        source_conn: &mut ConnOf<R, X>,
        target_conn: Option<&mut ConnOf<R, X>>,
        key: &KeyOf<R, X>,
        source: Side,
    ) -> Result<Resynced> {
        let resync = &self.inner.resync;
        let target = source.other();
        let record = resync
            .load(self.repo(source), source_conn, key)
            .await
            .map_err(self.side_error(source))?;
        let copied = record.is_some();
        let conn = match target_conn {
            Some(conn) => conn,
            None => source_conn,
        };
        match record {
            Some(record) => resync.store(self.repo(target), conn, key, record).await,
            None => resync.delete(self.repo(target), conn, key).await,
        }
        .map_err(self.side_error(target))?;
        Ok(if copied {
            Resynced::Copied
        } else {
            Resynced::Deleted
        })
    }

    /// Two databases: copies `key` from `source` to the other side. The source transaction
    /// holds the key's row (the [`Resync::load`] lock on PostgreSQL, the write lock on SQLite)
    /// until the target has committed, so concurrent copies of one key land in commit order.
    /// `intent` (in the source's database), the repair intent this copy fulfils, is dropped
    /// after both commits on the source's connection (no connection of its own: two round
    /// trips fewer); if that fails, it stays and a replay copies the key once more.
    pub(super) async fn resync_across(
        &self,
        key: &KeyOf<R, X>,
        source: Side,
        intent: Option<i64>,
    ) -> Result<Resynced> {
        let target = source.other();
        let backend = <Db<R, X> as Native>::BACKEND;
        let mut source_conn = acquire(self.pool_of(source)).await?;
        let mut target_conn = acquire(self.pool_of(target)).await?;
        // PostgreSQL: a copy one way and a copy the other way of one key lock in opposite
        // orders, and neither database sees a cycle spanning both: a bounded wait ends it (the
        // intent stays and is replayed).
        let copied: Result<Resynced> = async {
            let begin = repair::bounded_begin(backend, backend.begin_write());
            let mut source_tx = source_conn.begin_with(AssertSqlSafe(begin)).await?;
            let begin = repair::bounded_begin(backend, "BEGIN");
            let mut target_tx = target_conn.begin_with(AssertSqlSafe(begin)).await?;
            let done = self
                .copy_with_resync(&mut source_tx, Some(&mut target_tx), key, source)
                .await?;
            target_tx.commit().await?;
            source_tx.commit().await?;
            Ok(done)
        }
        .await;
        let done = match copied {
            Ok(done) => done,
            Err(err) => {
                // Closed rather than reused: a begin of two statements that failed after its
                // `BEGIN` leaves a transaction sqlx does not know of.
                source_conn.close_on_drop();
                target_conn.close_on_drop();
                return Err(err);
            }
        };
        // Back to its pool before the intent's delete, which may wait for the intent's row.
        drop(target_conn);
        if let Some(id) = intent {
            repair::clear_intent(Db::<R, X>::conn(&mut source_conn), id).await?;
        }
        Ok(done)
    }
}

/// Two-database backfill: copies a batch's keys from the source database (read under the
/// batch's row locks) to the other one through [`Resync`].
pub(super) struct BatchCopier<R: ?Sized, X: Resync<R>> {
    store: DualStore<R, X>,
    source: Side,
}

impl<R: ?Sized, X: Resync<R>> BatchCopier<R, X> {
    pub(super) fn new(store: DualStore<R, X>, source: Side) -> Self {
        BatchCopier { store, source }
    }
}

impl<R, X> KeyCopier for BatchCopier<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    fn target(&self) -> &crate::db::Database {
        self.store.database_of(self.source.other())
    }

    fn copy<'a>(
        &'a self,
        source: Conn<'a>,
        keys: &'a [DynKey],
        range: &'a KeyRange,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let store = &self.store;
            let target = self.source.other();
            let source_conn = Db::<R, X>::native(source).ok_or_else(|| {
                Error::Internal("a backfill batch on another backend than the store's".into())
            })?;
            // Keys the other side holds in the range but the batch did not list: the source
            // lost them (or gained them just now). Each is read again from the source below,
            // so only a key the source really no longer has is removed.
            let mut all: Vec<KeyOf<R, X>> = keys
                .iter()
                .cloned()
                .map(KeyOf::<R, X>::from_dyn)
                .collect::<Result<_>>()?;
            if let Some(def) = &store.inner.definition {
                let (table, key) = def.shape(target);
                let p = keyset::predicate(key, range, 1);
                let sql = format!(
                    "SELECT {} FROM {table} WHERE {}",
                    keyset::order_by(key),
                    p.sql
                );
                let kinds = <KeyOf<R, X> as Key>::KINDS;
                let listed: std::collections::HashSet<&DynKey> = keys.iter().collect();
                for row in bound(Query::assert_safe(sql), p.args)
                    .fetch_all(store.database_of(target))
                    .await?
                {
                    let held = DynKey::from_row(row, kinds)?;
                    if !listed.contains(&held) {
                        all.push(KeyOf::<R, X>::from_dyn(held)?);
                    }
                }
            }
            // Read under the batch's row locks, write the other database, commit it: the
            // batch (and its locks) commits after, so no dual write can slip in between.
            let mut target_conn = acquire(store.pool_of(target)).await?;
            let mut target_tx = target_conn.begin().await?;
            for key in &all {
                store
                    .copy_with_resync(&mut *source_conn, Some(&mut target_tx), key, self.source)
                    .await?;
            }
            target_tx.commit().await?;
            Ok(all.len() as u64)
        })
    }
}
