//! Writes: authoritative side first; then, one database, the other side in the same
//! transaction (when it fails: rolled back, the authoritative side written again alone with a
//! repair intent; in a caller's transaction, a savepoint instead), or, two databases, re-synced
//! by a task that outlives the caller, with a repair intent whenever it may have missed the
//! write.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::labels::Call;
use super::repair;
use super::{ConnOf, Db, DualStore, KeyOf, Operation, Resync};
use crate::db::{Native, acquire, begin, query};
use crate::flags::BoxFuture;
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
    /// read-your-writes token whose router issues positions ([`TokenPositions`](crate::ryw::TokenPositions)),
    /// the primary's position is read right after the commit on the same connection.
    /// Two databases: see [`DualStoreBuilder::new_database`](super::DualStoreBuilder::new_database).
    pub async fn write<T, F>(&self, key: &KeyOf<R, X>, op: F) -> Result<T>
    where
        T: Send,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        if self.is_split() {
            return self.write_split(key, op).await;
        }
        self.run_transaction(&OneWrite { key, op }).await
    }

    /// A transaction of the store's own, for writes that also touch tables outside the
    /// migration (a row of a parent table, say): `body` runs the caller's statements on
    /// [`StoreTx::conn`] and the migration's writes through [`StoreTx::write`], all in one
    /// transaction on one pooled connection, committed when `body` returns `Ok` (rolled back
    /// when it returns `Err`, which is returned).
    ///
    /// The other side of each write runs straight on, with no savepoint (which
    /// [`DualStore::write_in`] needs, costing a statement a write). When one fails, the
    /// transaction is rolled back and `body` runs once more, in a new one, with every write's
    /// other side left to a repair intent, so `body` may run twice: keep effects outside the
    /// database out of it, and what a rollback does not undo (sequence values drawn, session
    /// locks and variables, DDL); give it owned values (it is an `Fn`, and its future may
    /// borrow only the [`StoreTx`]: clone into it).
    ///
    /// Return every error of [`StoreTx::write`] (`?`): a transaction in which a write failed is
    /// never committed. A body that returns `Ok` after one gets an [`Error::Internal`] (the
    /// transaction rolled back), as does the other side's failure that the body swallowed
    /// when the rerun fails. `E` is the body's error type; twintrack's own errors (begin,
    /// commit, the checks above) come as `E::from(Error)`. In a request that will answer with
    /// a read-your-writes token, the position is read after the commit on the same
    /// connection, as for [`DualStore::write`].
    ///
    /// Both shapes must be in one database: two databases are an [`Error::Config`]. Implement
    /// the store's [`Resync`] for `dyn YourRepository + 'a` (every `'a`, as the quickstart's
    /// `SettingsResync` does): the body's future must be `Send`, and rustc proves that of a
    /// future holding a trait object only for every lifetime ("implementation of `Resync` is
    /// not general enough" otherwise).
    ///
    /// ```no_run
    /// # use twintrack::dual::{DualStore, NativeConnection, Resync};
    /// # use twintrack::flags::BoxFuture;
    /// # trait Settings: Send + Sync {
    /// #     fn put<'c>(&'c self, conn: &'c mut sqlx::PgConnection, id: i64, theme: String)
    /// #         -> BoxFuture<'c, sqlx::Result<bool>>;
    /// # }
    /// # struct KeyCopy;
    /// # impl<'a> Resync<dyn Settings + 'a> for KeyCopy {
    /// #     type Database = sqlx::Postgres;
    /// #     type Key = i64;
    /// #     type Record = String;
    /// #     fn load<'c>(&'c self, _: &'c (dyn Settings + 'a), _: &'c mut sqlx::PgConnection, _: &'c i64)
    /// #         -> BoxFuture<'c, sqlx::Result<Option<String>>> { Box::pin(async { Ok(None) }) }
    /// #     fn store<'c>(&'c self, _: &'c (dyn Settings + 'a), _: &'c mut sqlx::PgConnection, _: &'c i64,
    /// #         _: String) -> BoxFuture<'c, sqlx::Result<()>> { Box::pin(async { Ok(()) }) }
    /// #     fn delete<'c>(&'c self, _: &'c (dyn Settings + 'a), _: &'c mut sqlx::PgConnection, _: &'c i64)
    /// #         -> BoxFuture<'c, sqlx::Result<()>> { Box::pin(async { Ok(()) }) }
    /// # }
    /// # async fn demo(store: DualStore<dyn Settings, KeyCopy>) -> twintrack::Result<i64> {
    /// // A user row and its settings, in one transaction of the store's own.
    /// let id = store
    ///     .transaction(|tx| {
    ///         Box::pin(async move {
    ///             let (id,): (i64,) =
    ///                 sqlx::query_as("INSERT INTO users (email) VALUES ($1) RETURNING id")
    ///                     .bind("a@example.com")
    ///                     .fetch_one(tx.conn())
    ///                     .await?;
    ///             tx.write(&id, move |repo, conn| repo.put(conn, id, "dark".into()))
    ///                 .await?;
    ///             Ok::<_, twintrack::Error>(id)
    ///         })
    ///     })
    ///     .await?;
    /// # Ok(id) }
    /// ```
    pub async fn transaction<T, E, F>(&self, body: F) -> std::result::Result<T, E>
    where
        T: Send,
        E: From<Error> + Send,
        F: for<'t> Fn(&'t mut StoreTx<'_, R, X>) -> BoxFuture<'t, std::result::Result<T, E>>
            + Send
            + Sync,
    {
        self.one_database("transaction")?;
        self.run_transaction(&body).await
    }

    /// Runs `body` in a transaction on one pooled connection (see [`DualStore::transaction`]):
    /// the other sides straight on; when one fails, rolled back and run again with intents.
    async fn run_transaction<T, E, B>(&self, body: &B) -> std::result::Result<T, E>
    where
        T: Send,
        E: From<Error> + Send,
        B: TxBody<R, X, T, E>,
    {
        let (stage, ctx) = self.begin_write()?;
        // One pooled connection for the attempt, the retry and the position read.
        let mut conn = acquire(&self.inner.pool).await.map_err(Error::from)?;
        let mut failure: Option<(Side, Error)> = None;
        let out = loop {
            let mut tx = sqlx::Connection::begin(&mut *conn)
                .await
                .map_err(Error::from)?;
            let mut store_tx = StoreTx {
                store: self,
                conn: &mut tx,
                stage,
                other: match &failure {
                    None => Other::Optimistic,
                    Some((_, err)) => Other::Intent(err),
                },
                failed: None,
                swallowed: None,
                first_key: None,
            };
            let out = body.run(&mut store_tx).await;
            let StoreTx {
                failed,
                swallowed,
                first_key,
                ..
            } = store_tx;
            match (failed, out) {
                // The other side failed: whatever the body made of it, this attempt is void.
                (Some((side, err)), _) => {
                    if failure.is_some() {
                        // A rerun leaves other sides to intents; should one fail all the same,
                        // the attempt is still never committed.
                        rollback_quietly(tx).await;
                        return Err(err.into());
                    }
                    tx.rollback().await.map_err(Error::from)?;
                    tracing::warn!(key = first_key.as_ref().map(Key::to_text).unwrap_or_default(), %side, error = %err,
                        "non-authoritative write failed; written again on the authoritative side with a repair intent");
                    failure = Some((side, err));
                }
                (None, Ok(_)) if swallowed.is_some() => {
                    rollback_quietly(tx).await;
                    return Err(Error::Internal(format!(
                        "a write in the transaction failed ({}) and the body went on to return Ok; rolled back",
                        swallowed.unwrap_or_default()
                    ))
                    .into());
                }
                (None, Ok(out)) => {
                    self.commit(tx, first_key.as_ref()).await?;
                    break out;
                }
                (None, Err(err)) => {
                    rollback_quietly(tx).await;
                    return Err(err);
                }
            }
        };
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
        self.one_database("write_in")?;
        let (stage, _) = self.begin_write()?;
        self.write_sides(tx, key, &op, stage, Other::Savepoint)
            .await
            .map_err(Error::from)
    }

    /// An [`Error::Config`] for `what` (a transaction joining both shapes) on two databases.
    fn one_database(&self, what: &str) -> Result<()> {
        match self.is_split() {
            true => Err(Error::Config(format!(
                "{what} needs both shapes in one database; use write"
            ))),
            false => Ok(()),
        }
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
            .call_side(Call::Write, op, authoritative, stage, conn)
            .await?;
        for &side in &plan.writes[1..] {
            let failure = match other {
                Other::Optimistic => match self.call_side(Call::Write, op, side, stage, conn).await
                {
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
                    let Err(err) = self.call_side(Call::Write, op, side, stage, conn).await else {
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
        key: Option<&KeyOf<R, X>>,
    ) -> Result<()> {
        if let (Some(hook), Some(key)) = (&self.inner.hooks.before_commit, key)
            && let key = key.to_text()
            && hook(&key)
        {
            tx.rollback().await?;
            return Err(Error::Database(sqlx::Error::Protocol(format!(
                "fault injected before commit (key {key})"
            ))));
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
        let mut tx = begin(self.pool_of(authoritative)).await?;
        let conn: &mut ConnOf<R, X> = &mut tx;
        let (out, _) = self
            .call_side(Call::Write, &op, authoritative, stage, conn)
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
        self.commit(tx, Some(key)).await?;
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
            let span = self.span(Call::Write, stage, side);
            span.record("twintrack.read_from", "primary");
            self.resync_across(key, authoritative, Some(intent))
                .instrument(span)
                .await
        };
        let result = attempt.await;
        self.observe(
            Call::Write,
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
        call: Call,
        op: &F,
        side: Side,
        stage: Stage,
        conn: &mut ConnOf<R, X>,
    ) -> SideCall<T>
    where
        F: Operation<R, ConnOf<R, X>, T>,
    {
        self.call_side_from(call, op, side, stage, conn, "primary")
            .await
    }

    /// [`Self::call_side`] over a connection to `read_from` (`primary` or `replica`).
    pub(super) async fn call_side_from<T, F>(
        &self,
        call: Call,
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
        let span = self.span(call, stage, side);
        span.record("twintrack.read_from", read_from);
        let result = op(self.repo(side), conn).instrument(span).await;
        let took = started.elapsed();
        self.observe(
            call,
            side,
            took,
            result.as_ref().err().map(crate::metrics::error_type),
        );
        result.map(|v| (v, took)).map_err(self.side_error(side))
    }
}

/// A transaction of a [`DualStore`]'s own, handed to the body of [`DualStore::transaction`]:
/// the caller's statements run on [`StoreTx::conn`], the migration's writes through
/// [`StoreTx::write`].
pub struct StoreTx<'a, R: ?Sized, X: Resync<R>> {
    store: &'a DualStore<R, X>,
    conn: &'a mut ConnOf<R, X>,
    stage: Stage,
    other: Other<'a>,
    /// The first other side that failed: the attempt is void and runs again.
    failed: Option<(Side, Error)>,
    /// Any other failed write's error, as text: the attempt is never committed.
    swallowed: Option<String>,
    /// The first key written (named to the fault-injection hook before the commit).
    first_key: Option<KeyOf<R, X>>,
}

impl<R, X> StoreTx<'_, R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// The transaction's connection, for the caller's own statements.
    pub fn conn(&mut self) -> &mut ConnOf<R, X> {
        self.conn
    }

    /// The pinned stage of the transaction (taken when it began, as for every write of it).
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// [`DualStore::write`] inside this transaction: `op` on the stage's sides, authoritative
    /// first; returns the authoritative side's result. When the other side fails, this returns
    /// an [`Error::Internal`] and the transaction runs again (the body's outcome is then
    /// ignored, whatever it does with the error). Any other error is returned as it is, and
    /// the transaction will not be committed: return it.
    pub async fn write<T, F>(&mut self, key: &KeyOf<R, X>, op: F) -> Result<T>
    where
        T: Send,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        if let Some((side, _)) = &self.failed {
            return Err(Error::Internal(format!(
                "the {side} side failed earlier in this transaction, which runs again"
            )));
        }
        if self.first_key.is_none() {
            self.first_key = Some(key.clone());
        }
        match (self.store)
            .write_sides(self.conn, key, &op, self.stage, self.other)
            .await
        {
            Ok(out) => Ok(out),
            Err(Failed::Other(side, err)) => {
                let message = format!(
                    "the {side} side failed ({err}); the transaction runs again with a repair intent for it"
                );
                self.failed = Some((side, err));
                Err(Error::Internal(message))
            }
            Err(Failed::Error(err)) => {
                self.swallowed.get_or_insert_with(|| err.to_string());
                Err(err)
            }
        }
    }
}

impl<R: ?Sized, X: Resync<R>> std::fmt::Debug for StoreTx<'_, R, X> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTx")
            .field("migration", &self.store.inner.migration)
            .field("stage", &self.stage)
            .field("failed", &self.failed.as_ref().map(|(side, _)| side))
            .finish_non_exhaustive()
    }
}

/// Rolls `tx` back; a failure is only logged (the caller's own error says more, and the pool
/// tests the connection before it is used again).
async fn rollback_quietly<DB: sqlx::Database>(tx: sqlx::Transaction<'_, DB>) {
    if let Err(err) = tx.rollback().await {
        tracing::warn!(error = %err, "rolling back a failed transaction failed");
    }
}

/// What [`DualStore::run_transaction`] runs: a caller's body, or one write.
trait TxBody<R: ?Sized, X: Resync<R>, T, E>: Send + Sync {
    fn run<'t>(&'t self, tx: &'t mut StoreTx<'_, R, X>)
    -> BoxFuture<'t, std::result::Result<T, E>>;
}

impl<R: ?Sized, X: Resync<R>, T, E, F> TxBody<R, X, T, E> for F
where
    F: for<'t> Fn(&'t mut StoreTx<'_, R, X>) -> BoxFuture<'t, std::result::Result<T, E>>
        + Send
        + Sync,
{
    fn run<'t>(
        &'t self,
        tx: &'t mut StoreTx<'_, R, X>,
    ) -> BoxFuture<'t, std::result::Result<T, E>> {
        self(tx)
    }
}

/// [`DualStore::write`]'s body: one operation on one key.
struct OneWrite<'k, K, F> {
    key: &'k K,
    op: F,
}

impl<R, X, T, F> TxBody<R, X, T, Error> for OneWrite<'_, KeyOf<R, X>, F>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
    T: Send,
    F: Operation<R, ConnOf<R, X>, T>,
{
    fn run<'t>(&'t self, tx: &'t mut StoreTx<'_, R, X>) -> BoxFuture<'t, Result<T>> {
        Box::pin(async move {
            // Calls the operation by reference: a write may run it twice (a retry).
            tx.write(self.key, |repo: &R, conn: &mut ConnOf<R, X>| {
                (self.op)(repo, conn)
            })
            .await
        })
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
