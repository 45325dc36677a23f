//! Repair intents and the repair worker: converge the two sides on keys whose
//! non-authoritative write failed (or may not have landed yet, across two databases).
//!
//! An intent names the migration, the key (as its canonical text, see [`crate::key`]) and the
//! side that missed the write. It is written in the authoritative side's transaction, so no
//! crash or dropped future can lose it; the repair worker re-syncs the key from the side that
//! is authoritative *now* and drops the intent, in one transaction where both shapes share a
//! database.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::{AssertSqlSafe, Connection};

use super::{ConnOf, Db, DualStore, KeyOf, Resync};
use crate::db::{Backend, Conn, Database, Native, acquire, now_micros, query};
use crate::definition::Resynced;
use crate::key::Key;
use crate::{Result, Side};

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

/// Records, on `conn` (the authoritative side's transaction), that `side` missed (or may miss)
/// a write of the key `key_text`. Returns the intent's id.
/// The `last_error` of an intent written with its write, before the other side is tried (two
/// databases): the write is still in flight until the intent is cleared or a failure noted.
pub(crate) const IN_FLIGHT: &str = "pending";

/// How long a write can be in flight: an intent still [`IN_FLIGHT`] after this was left by a
/// process that stopped half-way, and waits for a repair worker.
pub(crate) const IN_FLIGHT_FOR: std::time::Duration = std::time::Duration::from_secs(30);

pub(super) async fn record_intent(
    conn: Conn<'_>,
    migration: &str,
    key_text: &str,
    side: Side,
    error: &str,
) -> Result<i64> {
    let error: String = error.chars().take(1000).collect();
    query(
        r#"INSERT INTO twintrack_repair_intents (migration, key_text, "key", target_side, created_at, last_error)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id"#,
    )
    .bind(migration)
    .bind(key_text)
    .bind(integer_key(key_text))
    .bind(side.as_str())
    .bind(now_micros())
    .bind(error)
    .scalar(conn)
    .await
}

/// The integer `key` column of a key stored as text, for readers of the previous schema: the
/// key when it is one integer, else `NULL`.
pub(crate) fn integer_key(key_text: &str) -> Option<i64> {
    key_text
        .parse()
        .ok()
        .filter(|k: &i64| k.to_string() == key_text)
}

/// The `BEGIN` of a transaction whose row-lock waits end after 2 s: on PostgreSQL, `BEGIN`
/// and `SET LOCAL lock_timeout` in one simple query (one round trip); elsewhere `plain`
/// (MariaDB bounds the statement that waits instead). When it fails, close the connection
/// rather than release it (`PoolConnection::close_on_drop`): a failure after the `BEGIN` of
/// the pair leaves a transaction sqlx does not know of.
pub(super) fn bounded_begin(backend: Backend, plain: &'static str) -> &'static str {
    match backend {
        Backend::Postgres => "BEGIN; SET LOCAL lock_timeout = '2s'",
        _ => plain,
    }
}

/// Drops an intent whose write has landed, on `on` (its database, or a connection to it).
pub(super) async fn clear_intent<'e>(on: impl Into<crate::db::On<'e>>, id: i64) -> Result<()> {
    query("DELETE FROM twintrack_repair_intents WHERE id = $1")
        .bind(id)
        .execute(on)
        .await?;
    Ok(())
}

/// Notes why an intent's write failed (it stays for the repair worker).
pub(super) async fn note_failure(db: &Database, id: i64, error: &str) -> Result<()> {
    let error: String = error.chars().take(1000).collect();
    query(
        "UPDATE twintrack_repair_intents SET attempts = attempts + 1, last_error = $1 WHERE id = $2",
    )
    .bind(error)
    .bind(id)
    .execute(db)
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
    if let Some(def) = &inner.definition {
        store.definition_kinds(def).await?;
    }
    let cutoff = now_micros() - i64::try_from(min_age.as_micros()).unwrap_or(i64::MAX);
    let mut report = RepairReport::default();
    // Intents live in the database of the side that was authoritative when they were written.
    let mut sides = vec![Side::Legacy];
    if store.is_split() {
        sides.push(Side::New);
    }
    for side in sides {
        pass(store, side, cutoff, &mut report).await?;
    }
    for (event, n) in [
        ("repaired", report.copied + report.deleted),
        ("failed", report.failed),
    ] {
        if n > 0 {
            inner.metrics.get().repair_intents.add(
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
    side: Side,
    cutoff: i64,
    report: &mut RepairReport,
) -> Result<()>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let inner = &store.inner;
    let db = store.database_of(side);
    let mut after = 0i64;
    loop {
        // Intents of twintrack before key text have only the integer key (none on MySQL).
        let sql = match db.backend() {
            Backend::MySql => {
                "SELECT id, key_text, created_at FROM twintrack_repair_intents
                 WHERE migration = $1 AND created_at <= $2 AND id > $3 ORDER BY id LIMIT 100"
            }
            _ => {
                r#"SELECT id, COALESCE(key_text, CAST("key" AS TEXT)) AS key_text, created_at FROM twintrack_repair_intents
                 WHERE migration = $1 AND created_at <= $2 AND id > $3 ORDER BY id LIMIT 100"#
            }
        };
        let batch = query(sql)
            .bind(&*inner.migration)
            .bind(cutoff)
            .bind(after)
            .fetch_all(db)
            .await?;
        let Some(last) = batch.last() else { break };
        after = last.get("id")?;
        for row in &batch {
            let id: i64 = row.get("id")?;
            let text: String = row.get("key_text")?;
            let key = match KeyOf::<R, X>::parse(&text) {
                Ok(key) => key,
                Err(err) => {
                    // Written by a store with another key type: keep it, say so, go on.
                    report.failed += 1;
                    tracing::warn!(migration = %inner.migration, key = %text, error = %err, "repair intent with an unreadable key");
                    note_failure(db, id, &err.to_string()).await?;
                    continue;
                }
            };
            let source = if store.is_split() {
                // Two databases: an intent lives in the database of the side that was
                // authoritative when its write committed, which holds that write; it is the
                // source even if the stage has moved authority since (the other side may
                // never have received the write). A newer intent for the key in the other
                // database supersedes it: that side holds the later write.
                let created_at: i64 = row.get("created_at")?;
                if superseded(store, side, id, &text, created_at).await? {
                    report.skipped += 1;
                    continue;
                }
                side
            } else {
                // One database: the side that holds the truth now (the stage may have moved
                // since the intent; both sides were written in one transaction).
                let (flag, _) = store.flag()?;
                flag.stage().plan().authoritative
            };
            match resync_one(store, side, id, &key, source, false).await {
                Ok(Some(Resynced::Copied)) => report.copied += 1,
                Ok(Some(_)) => report.deleted += 1,
                Ok(None) => report.skipped += 1,
                Err(err) => {
                    report.failed += 1;
                    tracing::warn!(migration = %inner.migration, key = %text, error = %err, "repair failed; will retry");
                    note_failure(db, id, &err.to_string()).await?;
                }
            }
        }
    }
    Ok(())
}

/// Two databases: settles the pending intents of the key `key` that target `target` (they
/// live in the other side's database, written while that side was authoritative), so that a
/// read of `target` shows the write they stand for. Each is handled as the repair worker
/// would (dropped if the target's database holds a newer intent for the key, else the key
/// copied from the intent's side). Returns how many intents it settled.
///
/// The lookup gives up after `lookup_timeout` ([`Settle::LookupTimedOut`]). Copies hold pool
/// connections on both sides, so at most [`SETTLING_AT_ONCE`] keys per store are settled at
/// once: a call that cannot get its turn within `lookup_timeout` goes ahead
/// ([`Settle::Busy`]). The settling itself is bounded by the locks' timeouts, and is not cut
/// short (a copy abandoned half-way would leave the read as stale as before).
pub(super) async fn settle_key<R, X>(
    store: &DualStore<R, X>,
    target: Side,
    key: &KeyOf<R, X>,
    lookup_timeout: Duration,
) -> Result<Settle>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let source = target.other();
    let key_text = key.to_text();
    let lookup = query(
        "SELECT id, created_at FROM twintrack_repair_intents
         WHERE migration = $1 AND key_text = $2 AND target_side = $3 ORDER BY id",
    )
    .bind(&*store.inner.migration)
    .bind(&key_text)
    .bind(target.as_str())
    .fetch_all(store.database_of(source));
    let Ok(pending) = tokio::time::timeout(lookup_timeout, lookup).await else {
        return Ok(Settle::LookupTimedOut);
    };
    let pending = pending?;
    if pending.is_empty() {
        return Ok(Settle::Settled(0));
    }
    let Ok(Ok(_turn)) = tokio::time::timeout(lookup_timeout, store.inner.settling.acquire()).await
    else {
        return Ok(Settle::Busy);
    };
    let mut settled = 0;
    for row in &pending {
        let id: i64 = row.get("id")?;
        let created_at: i64 = row.get("created_at")?;
        let done = superseded(store, source, id, &key_text, created_at).await?
            // `None`: gone meanwhile, settled by the repair worker (waited for) or the write's
            // task.
            || resync_one(store, source, id, key, source, true).await?.is_some();
        if done {
            settled += 1;
        }
    }
    Ok(Settle::Settled(settled))
}

/// At most this many keys of one store are settled inline at once (see [`settle_key`]).
pub(super) const SETTLING_AT_ONCE: usize = 2;

/// What [`settle_key`] did.
pub(super) enum Settle {
    /// Settled this many intents (0: there were none).
    Settled(u64),
    /// The other database did not list the key's intents in time.
    LookupTimedOut,
    /// Other keys were being settled: this one was left to the repair worker.
    Busy,
}

/// Re-syncs one key and drops its intent (stored in `intents_side`'s database), in one
/// transaction where both shapes share a database. `None` when another worker holds the intent
/// (unless `wait`: then its transaction is waited for) or it is gone.
async fn resync_one<R, X>(
    store: &DualStore<R, X>,
    intents_side: Side,
    id: i64,
    key: &KeyOf<R, X>,
    source: Side,
    wait: bool,
) -> Result<Option<Resynced>>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let backend = <Db<R, X> as Native>::BACKEND;
    let sql = match (backend, wait) {
        (Backend::Postgres | Backend::MySql, false) => {
            "SELECT id FROM twintrack_repair_intents WHERE id = $1 FOR UPDATE SKIP LOCKED"
        }
        (Backend::Postgres, true) => {
            "SELECT id FROM twintrack_repair_intents WHERE id = $1 FOR UPDATE"
        }
        // MariaDB: the same bounded wait as PostgreSQL's `lock_timeout` below, for this
        // statement only (seconds).
        (Backend::MySql, true) => {
            "SET STATEMENT innodb_lock_wait_timeout = 2 FOR SELECT id FROM twintrack_repair_intents WHERE id = $1 FOR UPDATE"
        }
        _ => "SELECT id FROM twintrack_repair_intents WHERE id = $1",
    };
    let mut conn = acquire(store.pool_of(intents_side)).await?;
    let replayed: Result<Option<Resynced>> = async {
        // Waiting: the repair worker holds the row while its copy runs; waited for, not
        // forever.
        let begin = match wait {
            true => bounded_begin(backend, backend.begin_write()),
            false => backend.begin_write(),
        };
        let mut tx = conn.begin_with(AssertSqlSafe(begin)).await?;
        let held = query(sql)
            .bind(id)
            .fetch_optional(Db::<R, X>::conn(&mut tx))
            .await?;
        if held.is_none() {
            return Ok(None);
        }
        let done = if store.is_split() {
            if backend == Backend::Sqlite {
                // SQLite has no row locks: release the file's write lock before the copy takes
                // it (the intents may live in the source's file).
                tx.rollback().await?;
                let done = store.resync_across(key, source, None).await?;
                clear_intent(store.database_of(intents_side), id).await?;
                return Ok(Some(done));
            }
            store.resync_across(key, source, None).await?
        } else {
            let conn: &mut ConnOf<R, X> = &mut tx;
            store.resync_in(conn, key, source).await?
        };
        clear_intent(Db::<R, X>::conn(&mut tx), id).await?;
        tx.commit().await?;
        Ok(Some(done))
    }
    .await;
    if replayed.is_err() {
        // Closed rather than reused: a begin of two statements that failed after its `BEGIN`
        // leaves a transaction sqlx does not know of.
        conn.close_on_drop();
    }
    replayed
}

/// Two databases: drops the intent `id` (in `side`'s database, created at `created_at`) when
/// the other database holds a newer intent for the key: that side has the later write, and
/// replaying this one would overwrite it. Whether it was dropped.
async fn superseded<R, X>(
    store: &DualStore<R, X>,
    side: Side,
    id: i64,
    key_text: &str,
    created_at: i64,
) -> Result<bool>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    if newer_intent(store, side.other(), key_text, created_at).await? {
        clear_intent(store.database_of(side), id).await?;
        return Ok(true);
    }
    Ok(false)
}

/// Whether `side`'s database holds an intent for the key `key_text` newer than `than` (µs).
async fn newer_intent<R, X>(
    store: &DualStore<R, X>,
    side: Side,
    key_text: &str,
    than: i64,
) -> Result<bool>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    let sql = match store.database_of(side).backend() {
        Backend::MySql => {
            "SELECT id FROM twintrack_repair_intents
             WHERE migration = $1 AND key_text = $2 AND created_at > $3 LIMIT 1"
        }
        _ => {
            r#"SELECT id FROM twintrack_repair_intents
             WHERE migration = $1 AND COALESCE(key_text, CAST("key" AS TEXT)) = $2 AND created_at > $3 LIMIT 1"#
        }
    };
    let found = query(sql)
        .bind(&*store.inner.migration)
        .bind(key_text)
        .bind(than)
        .fetch_optional(store.database_of(side))
        .await?;
    Ok(found.is_some())
}

/// Two databases: the repair intents in `db` (the database of the side that was written first
/// when they were written) waiting to bring `migration`'s writes to `target`. While any wait,
/// `target` misses acknowledged writes: it is no source of truth for a backfill or a repair.
/// A database without twintrack's tables holds none.
pub async fn intents_targeting(db: &Database, migration: &str, target: Side) -> Result<i64> {
    let counted = query(
        "SELECT COUNT(*) FROM twintrack_repair_intents WHERE migration = $1 AND target_side = $2",
    )
    .bind(migration)
    .bind(target.as_str())
    .scalar(db)
    .await;
    match counted {
        Err(crate::Error::NotInitialized) => Ok(0),
        other => other,
    }
}

/// Two databases: waits up to `wait` for [`intents_targeting`] to reach 0 (the service's
/// repair worker, or reads and writes of the keys, settle them). Returns how many are left.
pub(crate) async fn await_intents_targeting(
    db: &Database,
    migration: &str,
    target: Side,
    wait: Duration,
) -> Result<i64> {
    let started = std::time::Instant::now();
    loop {
        let pending = intents_targeting(db, migration, target).await?;
        if pending == 0 || started.elapsed() >= wait {
            return Ok(pending);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The error for `pending` intents in `db` that keep `target` from being a source of truth
/// for `what` (a backfill, a verify's repairs).
pub(crate) fn intents_pending_error(
    db: &Database,
    migration: &str,
    target: Side,
    pending: i64,
    what: &str,
) -> crate::Error {
    crate::Error::Precondition(format!(
        "{pending} repair intents of {migration:?} in {} wait to bring writes to the {target} shape (acknowledged while the {} shape was written first); {what} would overwrite them with older rows. The service's repair worker settles them (DualStore::repair); run it again once they are gone",
        db.describe(),
        target.other(),
    ))
}

/// The number of repair intents waiting for `migration`.
pub async fn pending_intents(db: &Database, migration: &str) -> Result<i64> {
    query("SELECT COUNT(*) FROM twintrack_repair_intents WHERE migration = $1")
        .bind(migration)
        .scalar(db)
        .await
}
