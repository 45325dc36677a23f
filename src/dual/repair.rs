//! Repair intents and the repair worker: converge the two sides on keys whose
//! non-authoritative write failed.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, Connection, Row};

use super::DualStore;
use crate::db::{Backend, now_micros};
use crate::flags::BoxFuture;
use crate::{Result, Side};

/// How to copy one key from one side of a migration to the other, in your repository's terms.
///
/// The repair worker calls `load` on the side that is authoritative now, then `store` (or
/// `delete`, when the key is gone there) on the other side, in one transaction. `load` should
/// lock what it reads (`FOR SHARE` on PostgreSQL) so that a concurrent write cannot slip in
/// between the load and the store. All three must be idempotent.
pub trait Resync<R: ?Sized>: Send + Sync + 'static {
    /// A key's data, in a form both sides can store.
    type Record: Send;

    /// The key's record on this side, or `None` if it has none.
    fn load<'c>(
        &'c self,
        repo: &'c R,
        conn: &'c mut AnyConnection,
        key: i64,
    ) -> BoxFuture<'c, sqlx::Result<Option<Self::Record>>>;

    /// Makes this side hold `record` for the key (insert or update).
    fn store<'c>(
        &'c self,
        repo: &'c R,
        conn: &'c mut AnyConnection,
        key: i64,
        record: Self::Record,
    ) -> BoxFuture<'c, sqlx::Result<()>>;

    /// Makes this side hold nothing for the key.
    fn delete<'c>(
        &'c self,
        repo: &'c R,
        conn: &'c mut AnyConnection,
        key: i64,
    ) -> BoxFuture<'c, sqlx::Result<()>>;
}

/// What a repair pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Keys copied from the authoritative side.
    pub copied: u64,
    /// Keys deleted on the other side because the authoritative side no longer has them.
    pub deleted: u64,
    /// Intents whose re-sync failed (kept, with their error, for the next pass).
    pub failed: u64,
    /// Intents another worker was already handling.
    pub skipped: u64,
}

/// Records, in the caller's transaction, that `side` missed (or may miss) a write of `key`.
/// Returns the intent's id.
pub(super) async fn record_intent(
    conn: &mut AnyConnection,
    migration: &str,
    key: i64,
    side: Side,
    error: &str,
) -> Result<i64> {
    let error: String = error.chars().take(1000).collect();
    Ok(sqlx::query_scalar(
        "INSERT INTO twintrack_repair_intents (migration, key, target_side, created_at, last_error)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(migration)
    .bind(key)
    .bind(side.as_str())
    .bind(now_micros())
    .bind(error)
    .fetch_one(conn)
    .await?)
}

/// Drops an intent whose write has landed.
pub(super) async fn clear_intent(db: &crate::Database, id: i64) -> Result<()> {
    sqlx::query("DELETE FROM twintrack_repair_intents WHERE id = $1")
        .bind(id)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// Notes why an intent's write failed (it stays for the repair worker).
pub(super) async fn note_failure(db: &crate::Database, id: i64, error: &str) -> Result<()> {
    let error: String = error.chars().take(1000).collect();
    sqlx::query(
        "UPDATE twintrack_repair_intents SET attempts = attempts + 1, last_error = $1 WHERE id = $2",
    )
    .bind(error)
    .bind(id)
    .execute(db.pool())
    .await?;
    Ok(())
}

/// One pass over the intents older than `min_age`, oldest first.
pub(super) async fn run<R, X>(store: &DualStore<R, X>, min_age: Duration) -> Result<RepairReport>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let inner = &store.inner;
    let cutoff = now_micros() - i64::try_from(min_age.as_micros()).unwrap_or(i64::MAX);
    let mut report = RepairReport::default();
    // Intents live in the database of the side that was authoritative when they were written.
    let mut databases = vec![store.database_of(Side::Legacy)];
    if store.is_split() {
        databases.push(store.database_of(Side::New));
    }
    for db in databases {
        pass(store, db, cutoff, &mut report).await?;
    }
    for (event, n) in [
        ("repaired", report.copied + report.deleted),
        ("failed", report.failed),
    ] {
        if n > 0 {
            inner.metrics.repair_intents.add(
                n,
                &[
                    store.migration_attr(),
                    opentelemetry::KeyValue::new("event", event),
                ],
            );
        }
    }
    Ok(report)
}

async fn pass<R, X>(
    store: &DualStore<R, X>,
    db: &crate::Database,
    cutoff: i64,
    report: &mut RepairReport,
) -> Result<()>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let inner = &store.inner;
    let mut after = 0i64;
    loop {
        let batch = sqlx::query(
            "SELECT id, key FROM twintrack_repair_intents
             WHERE migration = $1 AND created_at <= $2 AND id > $3 ORDER BY id LIMIT 100",
        )
        .bind(&*inner.migration)
        .bind(cutoff)
        .bind(after)
        .fetch_all(db.pool())
        .await?;
        let Some(last) = batch.last() else { break };
        after = last.try_get("id")?;
        for row in &batch {
            let id: i64 = row.try_get("id")?;
            let key: i64 = row.try_get("key")?;
            // The side that holds the truth now (the stage may have moved since the intent).
            let (flag, _) = store.flag()?;
            let source = flag.stage().plan().authoritative;
            match resync_one(store, db, id, key, source).await {
                Ok(Some(true)) => report.copied += 1,
                Ok(Some(false)) => report.deleted += 1,
                Ok(None) => report.skipped += 1,
                Err(err) => {
                    report.failed += 1;
                    tracing::warn!(migration = %inner.migration, key, error = %err, "repair failed; will retry");
                    note_failure(db, id, &err.to_string()).await?;
                }
            }
        }
    }
    Ok(())
}

/// Re-syncs one key and drops its intent, in one transaction. `Some(true)` copied,
/// `Some(false)` deleted, `None` when another worker holds the intent or it is gone.
async fn resync_one<R, X>(
    store: &DualStore<R, X>,
    intents: &crate::Database,
    id: i64,
    key: i64,
    source: Side,
) -> Result<Option<bool>>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let inner = &store.inner;
    let mut conn = intents.pool().acquire().await?;
    let lock = match intents.backend() {
        Backend::Postgres => " FOR UPDATE SKIP LOCKED",
        Backend::Sqlite => "",
    };
    let mut tx = conn.begin_with(intents.backend().begin_write()).await?;
    let sql = format!("SELECT id FROM twintrack_repair_intents WHERE id = $1{lock}");
    if sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?
        .is_none()
    {
        return Ok(None);
    }
    let target = source.other();
    let copied = if store.is_split() {
        if intents.backend() == Backend::Sqlite {
            // SQLite has no row locks: release the file's write lock before the copy takes it
            // (the intents may live in the source's file).
            tx.rollback().await?;
            let copied = resync_across(store, key, source).await?;
            clear_intent(intents, id).await?;
            return Ok(Some(copied));
        }
        resync_across(store, key, source).await?
    } else if let Some(def) = &inner.definition
        && let outcome = crate::definition::resync_key(&mut tx, def, key, source).await?
        && outcome != crate::definition::Resynced::LeftAlone
    {
        outcome == crate::definition::Resynced::Copied
    } else {
        let record = inner
            .resync
            .load(store.repo(source), &mut tx, key)
            .await
            .map_err(store.side_error(source))?;
        let copied = record.is_some();
        match record {
            Some(record) => {
                let repo = store.repo(target);
                inner.resync.store(repo, &mut tx, key, record).await
            }
            None => inner.resync.delete(store.repo(target), &mut tx, key).await,
        }
        .map_err(store.side_error(target))?;
        copied
    };
    sqlx::query("DELETE FROM twintrack_repair_intents WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Some(copied))
}

/// Two databases: copies `key` from `source` to the other side. The source transaction holds
/// the key's row (the `Resync::load` lock on PostgreSQL, the write lock on SQLite) until the
/// target has committed, so concurrent copies of one key land in commit order. Returns whether
/// a record was copied (`false`: deleted on the target).
pub(super) async fn resync_across<R, X>(
    store: &DualStore<R, X>,
    key: i64,
    source: Side,
) -> Result<bool>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let inner = &store.inner;
    let target = source.other();
    let source_db = store.database_of(source);
    let mut source_conn = source_db.pool().acquire().await?;
    let mut source_tx = source_conn
        .begin_with(source_db.backend().begin_write())
        .await?;
    let record = inner
        .resync
        .load(store.repo(source), &mut source_tx, key)
        .await
        .map_err(store.side_error(source))?;
    let copied = record.is_some();
    let mut target_tx = store.database_of(target).pool().begin().await?;
    match record {
        Some(record) => {
            let repo = store.repo(target);
            inner.resync.store(repo, &mut target_tx, key, record).await
        }
        None => {
            inner
                .resync
                .delete(store.repo(target), &mut target_tx, key)
                .await
        }
    }
    .map_err(store.side_error(target))?;
    target_tx.commit().await?;
    source_tx.commit().await?;
    Ok(copied)
}

/// The number of repair intents waiting for `migration`.
pub async fn pending_intents(db: &crate::Database, migration: &str) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT COUNT(*) FROM twintrack_repair_intents WHERE migration = $1")
            .bind(migration)
            .fetch_one(db.pool())
            .await?,
    )
}
