//! Writes: authoritative side first; the other side in a savepoint of the same transaction
//! (one database) or re-synced by a task that outlives the caller (two databases), with a
//! repair intent whenever it may have missed the write.

use std::time::{Duration, Instant};

use tracing::Instrument;

use super::repair;
use super::{ConnOf, Db, DualStore, KeyOf, Operation, Resync};
use crate::db::{Native, query};
use crate::key::Key;
use crate::{Error, Result, Side, Stage};

/// Outcome of one side's call, with its latency.
pub(super) type SideCall<T> = std::result::Result<(T, Duration), Error>;

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// Runs `op` on the side(s) the pinned stage writes, authoritative first, and returns the
    /// authoritative side's result. One database: one transaction, the other side in a
    /// savepoint (a repair intent if it fails). Two databases: see
    /// [`DualStoreBuilder::new_database`](super::DualStoreBuilder::new_database).
    pub async fn write<T, F>(&self, key: &KeyOf<R, X>, op: F) -> Result<T>
    where
        T: Send,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        if self.is_split() {
            return self.write_split(key, op).await;
        }
        let mut tx = self.inner.pool.begin().await?;
        let out = self.write_in(&mut tx, key, op).await?;
        self.commit(tx, key).await?;
        Ok(out)
    }

    /// Like [`DualStore::write`], inside a transaction of the caller's (for writes that also
    /// touch tables outside the migration). Nothing is committed here. Both shapes must be in
    /// the transaction's database.
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
        let (flag, ctx) = self.flag()?;
        // From here the outcome may be committed (by us or the caller): pin the request.
        if let Some(ctx) = &ctx {
            ctx.note_write();
        }
        let stage = flag.stage();
        let plan = stage.plan();
        let authoritative = plan.writes[0];
        let conn: &mut ConnOf<R, X> = tx;
        let (out, _) = self
            .call_side("write", &op, authoritative, stage, conn)
            .await?;
        for &side in &plan.writes[1..] {
            // A savepoint of our own rather than a nested sqlx transaction: on success it is
            // left for the COMMIT to release, which saves the RELEASE round trip on every dual
            // write; only a failure costs the ROLLBACK TO.
            query("SAVEPOINT twintrack_other_side")
                .execute(Db::<R, X>::conn(conn))
                .await?;
            if let Err(err) = self.call_side("write", &op, side, stage, conn).await {
                query("ROLLBACK TO SAVEPOINT twintrack_other_side")
                    .execute(Db::<R, X>::conn(conn))
                    .await?;
                let key_text = key.to_text();
                tracing::warn!(key = %key_text, error = %err, "non-authoritative write failed; repair intent recorded");
                repair::record_intent(
                    Db::<R, X>::conn(conn),
                    &self.inner.migration,
                    &key_text,
                    side,
                    &err.to_string(),
                )
                .await?;
                self.count_intent("recorded");
            }
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
        let (flag, ctx) = self.flag()?;
        if let Some(ctx) = &ctx {
            ctx.note_write();
        }
        let stage = flag.stage();
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
