//! Writes: authoritative side first; then, one database, the other side in the same
//! transaction (when it fails: rolled back, the authoritative side written again alone with a
//! repair intent; in a caller's transaction, a savepoint instead), or, two databases, re-synced
//! by a task that outlives the caller, with a repair intent whenever it may have missed the
//! write.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::repair;
use super::{ConnOf, Db, DualStore, KeyOf, Operation, Resync};
use crate::db::{Native, query};
use crate::key::Key;
use crate::{Error, RequestContext, Result, Side, Stage};

/// Outcome of one side's call, with its latency.
pub(super) type SideCall<T> = std::result::Result<(T, Duration), Error>;

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// Runs `op` on the side(s) the pinned stage writes, authoritative first, and returns the
    /// authoritative side's result. One database: one transaction; when the other side fails,
    /// that transaction is rolled back and the write runs again on the authoritative side
    /// alone, with a repair intent for the other, in a new one (no savepoint on the way of
    /// every write: a failing side is the exception). In a request that will answer with a
    /// read-your-writes token, the commit reads the primary's position in its own round trip.
    /// Two databases: see [`DualStoreBuilder::new_database`](super::DualStoreBuilder::new_database).
    pub async fn write<T, F>(&self, key: &KeyOf<R, X>, op: F) -> Result<T>
    where
        T: Send,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        if self.is_split() {
            return self.write_split(key, op).await;
        }
        let (stage, ctx) = self.begin_write()?;
        // One pooled connection for the attempt, the retry and the position read.
        let mut conn = self.inner.pool.acquire().await?;
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let out = match self
            .write_sides(&mut tx, key, &op, stage, Other::Optimistic)
            .await
        {
            Ok(out) => out,
            Err(Failed::Other(side, err)) => {
                tx.rollback().await?;
                tracing::warn!(key = %key.to_text(), %side, error = %err,
                    "non-authoritative write failed; written again on the authoritative side with a repair intent");
                tx = sqlx::Connection::begin(&mut *conn).await?;
                self.write_sides(&mut tx, key, &op, stage, Other::Intent(&err))
                    .await?
            }
            Err(Failed::Error(err)) => return Err(err),
        };
        self.commit(tx, key).await?;
        // A request that will answer with a read-your-writes token: the position now, on the
        // same connection (at or after the commit), so the token needs no connection of its
        // own for it.
        if let (Some(router), Some(ctx)) = (&self.inner.router, &ctx)
            && ctx.answers_with_token()
            && router.issues_positions()
        {
            match router.position_on(Db::<R, X>::conn(&mut conn)).await {
                Ok(Some(lsn)) => ctx.committed_at(lsn),
                Ok(None) => {}
                // Committed all the same; the token then asks the primary itself.
                Err(err) => {
                    tracing::warn!(error = %err, "could not read the position after the commit")
                }
            }
        }
        Ok(out)
    }

    /// Like [`DualStore::write`], inside a transaction of the caller's (for writes that also
    /// touch tables outside the migration). Nothing is committed here. Both shapes must be in
    /// the transaction's database. The other side runs in a savepoint (the caller's
    /// transaction cannot be run again), rolled back to when it fails, with a repair intent.
    pub async fn write_in<T, F>(
        &self,
        tx: &mut sqlx::Transaction<'_, X::Database>,
        key: &KeyOf<R, X>,
        op: F,
    ) -> Result<T>
    where
        T: Send,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        if self.is_split() {
            return Err(Error::Config(
                "write_in needs both shapes in one database; use write".into(),
            ));
        }
        let (stage, _) = self.begin_write()?;
        self.write_sides(tx, key, &op, stage, Other::Savepoint)
            .await
            .map_err(Error::from)
    }

    /// The pinned stage of a write about to start; the request (if any) is pinned to the
    /// primary from here, as the outcome may be committed.
    fn begin_write(&self) -> Result<(Stage, Option<RequestContext>)> {
        let (flag, ctx) = self.flag()?;
        if let Some(ctx) = &ctx {
            ctx.note_write();
        }
        Ok((flag.stage(), ctx))
    }

    /// Writes `stage`'s sides on `conn`, in a transaction begun by the caller: the
    /// authoritative one, then the other as `other` says.
    async fn write_sides<T, F>(
        &self,
        conn: &mut ConnOf<R, X>,
        key: &KeyOf<R, X>,
        op: &F,
        stage: Stage,
        other: Other<'_>,
    ) -> std::result::Result<T, Failed>
    where
        T: Send,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        let plan = stage.plan();
        let authoritative = plan.writes[0];
        let (out, _) = self
            .call_side("write", op, authoritative, stage, conn)
            .await?;
        for &side in &plan.writes[1..] {
            let failure = match other {
                Other::Optimistic => match self.call_side("write", op, side, stage, conn).await {
                    Ok(_) => continue,
                    Err(err) => return Err(Failed::Other(side, err)),
                },
                Other::Intent(failure) => failure.to_string(),
                Other::Savepoint => {
                    // A savepoint of our own rather than a nested sqlx transaction: on success
                    // it is left for the COMMIT to release (no RELEASE round trip).
                    query("SAVEPOINT twintrack_other_side")
                        .execute(Db::<R, X>::conn(conn))
                        .await?;
                    let Err(err) = self.call_side("write", op, side, stage, conn).await else {
                        continue;
                    };
                    query("ROLLBACK TO SAVEPOINT twintrack_other_side")
                        .execute(Db::<R, X>::conn(conn))
                        .await?;
                    tracing::warn!(key = %key.to_text(), error = %err, "non-authoritative write failed; repair intent recorded");
                    err.to_string()
                }
            };
            repair::record_intent(
                Db::<R, X>::conn(conn),
                &self.inner.migration,
                &key.to_text(),
                side,
                &failure,
            )
            .await?;
            self.count_intent("recorded");
        }
        Ok(out)
    }

    /// Commits a write's transaction, unless the fault-injection hook asks to fail it here.
    async fn commit(
        &self,
        tx: sqlx::Transaction<'_, X::Database>,
        key: &KeyOf<R, X>,
    ) -> Result<()> {
        if let Some(hook) = &self.inner.hooks.before_commit {
            let key = key.to_text();
            if hook(&key) {
                tx.rollback().await?;
                return Err(Error::Database(sqlx::Error::Protocol(format!(
                    "fault injected before commit (key {key})"
                ))));
            }
        }
        Ok(tx.commit().await?)
    }

    pub(super) fn count_intent(&self, event: &'static str) {
        self.inner.metrics.get().repair_intents.add(
            1,
            &[
                self.migration_attr(),
                opentelemetry::KeyValue::new("event", event),
            ],
        );
    }

    /// Two databases: authoritative side + intent in one transaction, then the other side in a
    /// task of its own, which clears the intent when it succeeds.
    ///
    /// The task does not replay `op`: it copies the key's *current* state from the
    /// authoritative side (the one key-copy path, [`Resync`]), holding the source row locked
    /// until the copy commits. Two writes' tasks finishing out of order therefore cannot leave
    /// the other side with the older value.
    async fn write_split<T, F>(&self, key: &KeyOf<R, X>, op: F) -> Result<T>
    where
        T: Send,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        let (stage, ctx) = self.begin_write()?;
        let plan = stage.plan();
        let authoritative = plan.writes[0];
        let other = plan.writes.get(1).copied();
        // An older write still on its way to this side must land first, not after this one.
        self.settle_pending(key, authoritative, ctx.as_ref()).await;
        let mut tx = self.pool_of(authoritative).begin().await?;
        let conn: &mut ConnOf<R, X> = &mut tx;
        let (out, _) = self
            .call_side("write", &op, authoritative, stage, conn)
            .await?;
        let key_text = key.to_text();
        // Written before the commit, so that no crash or drop can lose the other side's write.
        let intent = match other {
            Some(side) => Some(
                repair::record_intent(
                    Db::<R, X>::conn(conn),
                    &self.inner.migration,
                    &key_text,
                    side,
                    repair::IN_FLIGHT,
                )
                .await?,
            ),
            None => None,
        };
        self.commit(tx, key).await?;
        if let Some(hook) = &self.inner.hooks.after_authoritative_commit {
            hook(&key_text);
        }
        if let (Some(side), Some(intent)) = (other, intent) {
            let store = self.clone();
            let key = key.clone();
            let task = tokio::spawn(async move {
                store
                    .write_other_side(&key, stage, side, authoritative, intent)
                    .await
            });
            // The caller normally waits for both sides; if it is dropped here, the task goes on.
            let _ = task.await;
        }
        Ok(out)
    }

    async fn write_other_side(
        &self,
        key: &KeyOf<R, X>,
        stage: Stage,
        side: Side,
        authoritative: Side,
        intent: i64,
    ) {
        let started = Instant::now();
        let attempt = async {
            let span = self.span("write", stage, side);
            span.record("twintrack.read_from", "primary");
            self.resync_across(key, authoritative)
                .instrument(span)
                .await?;
            repair::clear_intent(self.database_of(authoritative), intent).await
        };
        let result = attempt.await;
        self.observe(
            "write",
            side,
            started.elapsed(),
            result.as_ref().err().map(Error::error_type),
        );
        if let Err(err) = result {
            tracing::warn!(migration = %self.inner.migration, key = %key.to_text(), %side, error = %err,
                "non-authoritative write failed; the repair intent stays");
            self.count_intent("recorded");
            let _ = repair::note_failure(self.database_of(authoritative), intent, &err.to_string())
                .await;
        }
    }

    /// Runs `op` on `side` over `conn` (its primary), in a span, timed and counted.
    pub(super) async fn call_side<T, F>(
        &self,
        what: &'static str,
        op: &F,
        side: Side,
        stage: Stage,
        conn: &mut ConnOf<R, X>,
    ) -> SideCall<T>
    where
        F: Operation<R, ConnOf<R, X>, T>,
    {
        self.call_side_from(what, op, side, stage, conn, "primary")
            .await
    }

    /// [`Self::call_side`] over a connection to `read_from` (`primary` or `replica`).
    pub(super) async fn call_side_from<T, F>(
        &self,
        what: &'static str,
        op: &F,
        side: Side,
        stage: Stage,
        conn: &mut ConnOf<R, X>,
        read_from: &'static str,
    ) -> SideCall<T>
    where
        F: Operation<R, ConnOf<R, X>, T>,
    {
        let started = Instant::now();
        let span = self.span(what, stage, side);
        span.record("twintrack.read_from", read_from);
        let result = op(self.repo(side), conn).instrument(span).await;
        let took = started.elapsed();
        self.observe(
            what,
            side,
            took,
            result.as_ref().err().map(crate::metrics::error_type),
        );
        result.map(|v| (v, took)).map_err(self.side_error(side))
    }
}

/// How [`DualStore::write_sides`] writes the side after the authoritative one.
#[derive(Clone, Copy)]
enum Other<'a> {
    /// Straight on: a failure ends the attempt ([`Failed::Other`]), for the caller to roll
    /// back and run again with [`Other::Intent`].
    Optimistic,
    /// Not at all: a repair intent for it, with the failure that made it so.
    Intent(&'a Error),
    /// In a savepoint, rolled back to on failure, then a repair intent (a caller's
    /// transaction, which cannot be run again).
    Savepoint,
}

/// Why [`DualStore::write_sides`] did not finish.
enum Failed {
    /// The non-authoritative side failed ([`Other::Optimistic`]): the transaction holds the
    /// authoritative side's write and must be rolled back.
    Other(Side, Error),
    /// Anything else.
    Error(Error),
}

impl From<Error> for Failed {
    fn from(err: Error) -> Failed {
        Failed::Error(err)
    }
}

impl From<sqlx::Error> for Failed {
    fn from(err: sqlx::Error) -> Failed {
        Failed::Error(err.into())
    }
}

impl From<Failed> for Error {
    fn from(failed: Failed) -> Error {
        match failed {
            Failed::Other(_, err) | Failed::Error(err) => err,
        }
    }
}
