//! Reads: the served side, and in `shadow`/`live` a sampled comparison with the other side,
//! one function per [`ShadowMode`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::{AssertSqlSafe, Connection};
use tracing::Instrument;

use super::compare::{Observed, sampled};
use super::labels::Call;
use super::write::SideCall;
use super::{ConnOf, Db, DualStore, KeyOf, Operation, Resync};
use crate::context::random_key;
use crate::db::{Backend, Native, acquire};
use crate::key::Key;
use crate::ryw::{ReadTarget, ReplicaFailure};
use crate::shadow::ShadowMode;
use crate::{RequestContext, Result, Side, Stage};

/// How long a read waits for the other database to list (and settle) its key's repair intents
/// (two databases) before reading without.
const SETTLE_TIMEOUT: Duration = Duration::from_millis(250);
/// How long reads skip settling after the other database failed to answer.
const SETTLE_PAUSE: Duration = Duration::from_secs(1);

/// Where a read may go.
#[derive(Clone, Copy)]
pub(super) enum Reading<'a> {
    /// Where the router sends this request's reads.
    Routed(Option<&'a RequestContext>),
    /// The primary, whatever the request (mismatch re-checks).
    Primary,
}

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

/// What a read is about: one key, or a query over many (a list, a search), by its label.
/// Logs and mismatch records name it by [`Subject::text`].
pub(super) enum Subject<'a, K> {
    Key(&'a K),
    Query(&'static str),
}

/// [`Subject`], owning its key (for work that outlives the read).
pub(super) enum OwnedSubject<K> {
    Key(K),
    Query(&'static str),
}

impl<K> OwnedSubject<K> {
    fn as_ref(&self) -> Subject<'_, K> {
        match self {
            OwnedSubject::Key(key) => Subject::Key(key),
            OwnedSubject::Query(label) => Subject::Query(label),
        }
    }
}

impl<K: Key> Subject<'_, K> {
    /// The key's canonical text, or the query's label.
    pub(super) fn text(&self) -> String {
        match self {
            Subject::Key(key) => key.to_text(),
            Subject::Query(label) => (*label).to_owned(),
        }
    }
}

/// The two sides of a compared read, as they came back (a shadow side may have panicked).
pub(super) struct Pair<T> {
    pub(super) served: Side,
    pub(super) served_result: SideCall<T>,
    pub(super) shadow: Side,
    pub(super) shadow_result: std::thread::Result<SideCall<T>>,
}

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// Runs `op` on the side the pinned stage serves and returns its result. In `shadow` and
    /// `live`, a sampled share of reads also runs `op` on the other side and compares (see
    /// [`crate::shadow`]).
    pub async fn read<T, F>(&self, key: &KeyOf<R, X>, op: F) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T> + 'static,
    {
        self.read_about(&Subject::Key(key), op).await
    }

    /// Like [`DualStore::read`], for a read that is about no one key: a list or a search
    /// (`articles with tag T`). It is routed and compared like any read; a mismatch is
    /// recorded under `label` in place of a key (and counted like any other).
    pub async fn read_query<T, F>(&self, label: &'static str, op: F) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T> + 'static,
    {
        self.read_about(&Subject::Query(label), op).await
    }

    async fn read_about<T, F>(&self, key: &Subject<'_, KeyOf<R, X>>, op: F) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T> + 'static,
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
        if self.is_split()
            && let Subject::Key(key) = key
        {
            self.settle_pending(key, served, ctx.as_ref()).await;
        }
        let shadow = plan
            .shadow
            .filter(|_| sampled(flag.state.shadow_sample_rate));
        let reading = Reading::Routed(ctx.as_ref());
        let Some(shadow) = shadow else {
            return self
                .read_side(&op, served, stage, reading)
                .await
                .map(|(v, _)| v);
        };
        // Both sides go where this request's reads go: the primary once it wrote (so replica
        // lag never shows up as a mismatch), else the one replica chosen for the request.
        match self.inner.shadow.mode {
            ShadowMode::Background => self.read_background(key, stage, served, op, ctx).await,
            ShadowMode::Snapshot => {
                let pair = self
                    .read_snapshot(&op, served, shadow, stage, ctx.as_ref())
                    .await?;
                self.serve_and_compare(key, stage, pair, Arc::new(op))
            }
            ShadowMode::Concurrent => {
                self.read_concurrent(key, stage, served, shadow, op, ctx)
                    .await
            }
            ShadowMode::Random if random_key() & 1 == 1 => {
                let shadow_result = self.read_caught(&op, shadow, stage, reading).await;
                let served_result = self.read_side(&op, served, stage, reading).await;
                let pair = Pair {
                    served,
                    served_result,
                    shadow,
                    shadow_result,
                };
                self.serve_and_compare(key, stage, pair, Arc::new(op))
            }
            ShadowMode::Serial | ShadowMode::Random => {
                let served_result = self.read_side(&op, served, stage, reading).await;
                let shadow_result = self.read_caught(&op, shadow, stage, reading).await;
                let pair = Pair {
                    served,
                    served_result,
                    shadow,
                    shadow_result,
                };
                self.serve_and_compare(key, stage, pair, Arc::new(op))
            }
        }
    }

    /// Two databases: before `side` is read (the served side) or written first (the
    /// authoritative side) for `key`, settles the key's repair intents that target `side`:
    /// writes acknowledged while the other side was authoritative whose copy to `side` has not
    /// landed yet (e.g. across a move from `shadow` to `live` during an outage). So a read
    /// shows them, and a write is not overwritten later by their older value. One indexed
    /// lookup in the other database. Never fails the call: when the other database does not
    /// answer within [`SETTLE_TIMEOUT`], it goes ahead unsettled and settling pauses for
    /// [`SETTLE_PAUSE`] (so an outage of the other database costs nothing more), counted in
    /// `twintrack.repair.intents` (`event` = `unsettled`; settled ones: `settled_inline`).
    pub(super) async fn settle_pending(
        &self,
        key: &KeyOf<R, X>,
        served: Side,
        ctx: Option<&RequestContext>,
    ) {
        use std::sync::atomic::Ordering;
        let inner = &self.inner;
        let now = crate::db::now_micros();
        let event = if inner.settle_paused_until.load(Ordering::Relaxed) > now {
            "unsettled"
        } else {
            use super::repair::Settle;
            match super::repair::settle_key(self, served, key, SETTLE_TIMEOUT).await {
                Ok(Settle::Settled(0)) => return,
                Ok(Settle::Settled(_)) => {
                    // The copy went to `served`'s primary: the rest of the request reads there.
                    if let Some(ctx) = ctx {
                        ctx.note_write();
                    }
                    "settled_inline"
                }
                Ok(Settle::Busy) => "unsettled",
                // Only a database that does not answer pauses settling for every key: one
                // key's copy failing (a lock timeout, a constraint) is that key's, and its
                // intent stays for the repair worker.
                Err(err) => {
                    tracing::warn!(migration = %inner.migration, key = %key.to_text(), error = %err,
                        "could not settle the key's repair intents; going ahead");
                    if err.is_unreachable() {
                        self.pause_settling(now);
                    }
                    "unsettled"
                }
                Ok(Settle::LookupTimedOut) => {
                    self.pause_settling(now);
                    "unsettled"
                }
            }
        };
        self.count_intent(event);
    }

    fn pause_settling(&self, now: i64) {
        let until = now + i64::try_from(SETTLE_PAUSE.as_micros()).unwrap_or(i64::MAX);
        self.inner
            .settle_paused_until
            .fetch_max(until, std::sync::atomic::Ordering::Relaxed);
    }

    /// A shadow side's read, its panic caught.
    async fn read_caught<T, F>(
        &self,
        op: &F,
        side: Side,
        stage: Stage,
        reading: Reading<'_>,
    ) -> std::thread::Result<SideCall<T>>
    where
        F: Operation<R, ConnOf<R, X>, T>,
    {
        AssertUnwindSafe(self.read_side(op, side, stage, reading))
            .catch_unwind()
            .await
    }

    /// `Background`: the served side now; the shadow read and the comparison in a task of
    /// their own, after the response.
    async fn read_background<T, F>(
        &self,
        key: &Subject<'_, KeyOf<R, X>>,
        stage: Stage,
        served: Side,
        op: F,
        ctx: Option<RequestContext>,
    ) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T> + 'static,
    {
        let (value, took) = self
            .read_side(&op, served, stage, Reading::Routed(ctx.as_ref()))
            .await?;
        let served_read = Observed::of(&value, took);
        // A task slot, and one of the store's bookkeeping connections for the shadow read: off
        // the request's path it never takes more of the pool than those. None free: skipped.
        let Ok(permit) = self.inner.background.clone().try_acquire_owned() else {
            self.count_result("skipped");
            return Ok(value);
        };
        let Ok(connection) = self.inner.bookkeeping.clone().try_acquire_owned() else {
            self.count_result("skipped");
            return Ok(value);
        };
        let store = self.clone();
        let shadow = served.other();
        let key = match key {
            Subject::Key(key) => OwnedSubject::Key((*key).clone()),
            Subject::Query(label) => OwnedSubject::Query(label),
        };
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
                            tracing::warn!(migration = %store.inner.migration, key = %key.as_ref().text(), side = %shadow,
                            "background shadow read failed, panicked or timed out");
                            store.count_shadow_error(shadow);
                            return;
                        }
                    };
                drop(connection);
                let shadow_read = Observed::of(&other, other_took);
                if let Some(classify) = store.clone().compare_or_classify_later(
                    &key.as_ref(),
                    stage,
                    served,
                    served_read,
                    shadow_read,
                    Arc::new(op),
                ) {
                    classify.await;
                }
            }
            // A child of the request's span, which may well have closed by the time it ends.
            .instrument(tracing::Span::current()),
        );
        Ok(value)
    }

    /// `Concurrent`: the shadow read on a task of its own, so that the runtime's other worker
    /// can drive it while this one drives the served read (polled from one task, both sides'
    /// client work would queue on one thread). Dropping the read aborts it, as it would have
    /// dropped a joined future.
    async fn read_concurrent<T, F>(
        &self,
        key: &Subject<'_, KeyOf<R, X>>,
        stage: Stage,
        served: Side,
        shadow: Side,
        op: F,
        ctx: Option<RequestContext>,
    ) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T> + 'static,
    {
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
        // Each side's connection is released once both reads are done, so that the first
        // one's release (a round trip: the pool tests it) does not compete with the other read.
        let mut held = Vec::with_capacity(2);
        let mut hold = |read: Result<_>| {
            read.map(|(read, conn)| {
                held.push(conn);
                read
            })
        };
        let reading = Reading::Routed(ctx.as_ref());
        let served_result = hold(self.read_side_held(&*op, served, stage, reading).await);
        let shadow_result = shadow_task.join().await.map(&mut hold);
        let pair = Pair {
            served,
            served_result,
            shadow,
            shadow_result,
        };
        let value = self.serve_and_compare(key, stage, pair, op);
        drop(held);
        value
    }

    /// `Snapshot`: both reads in one repeatable-read transaction, the served side first. On a
    /// replica (read-only transactions run on a hot standby), a hot-standby conflict or a dead
    /// replica retries the pair elsewhere.
    async fn read_snapshot<T, F>(
        &self,
        op: &F,
        served: Side,
        shadow: Side,
        stage: Stage,
        ctx: Option<&RequestContext>,
    ) -> Result<Pair<T>>
    where
        F: Operation<R, ConnOf<R, X>, T>,
    {
        let begin = match <Db<R, X> as Native>::BACKEND {
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            // InnoDB's consistent snapshot (REPEATABLE READ, the server default), taken now.
            Backend::MySql => "START TRANSACTION WITH CONSISTENT SNAPSHOT, READ ONLY",
            // A deferred SQLite transaction reads one snapshot from its first read on (WAL).
            _ => "BEGIN",
        };
        let attempt = |mut conn: PoolConnection<Db<R, X>>, target: ReadTarget| async move {
            let mut tx = conn.begin_with(AssertSqlSafe(begin)).await?;
            let served_result = match self.call_side(Call::Read, op, served, stage, &mut tx).await {
                // On a replica that failed the way replicas fail: the pair is retried elsewhere.
                Err(err)
                    if matches!(target, ReadTarget::Replica(_))
                        && ReplicaFailure::of_error(&err).is_some() =>
                {
                    return Err(err);
                }
                other => other,
            };
            let shadow_result =
                AssertUnwindSafe(self.call_side(Call::Read, op, shadow, stage, &mut tx))
                    .catch_unwind()
                    .await;
            // Read-only: nothing to keep, and nothing to wait for. Dropped, the transaction
            // queues its ROLLBACK; the pool flushes it (and tests the connection, closing it if
            // broken) while returning the connection, in a task of its own: off the caller's
            // path, one round trip fewer on it.
            drop(tx);
            Ok(Pair {
                served,
                served_result,
                shadow,
                shadow_result,
            })
        };
        match &self.inner.router {
            Some(router) => {
                router
                    .run_read::<Db<R, X>, _, _, _>(ctx, self.inner.primary_reads, attempt)
                    .await
            }
            None => attempt(acquire(&self.inner.pool).await?, ReadTarget::Primary).await,
        }
    }

    /// Reads `side`, where the router sends this request's reads (retrying on another replica,
    /// then the primary, after a hot-standby conflict or a dead replica).
    pub(super) async fn read_side<T, F>(
        &self,
        op: &F,
        side: Side,
        stage: Stage,
        reading: Reading<'_>,
    ) -> SideCall<T>
    where
        F: Operation<R, ConnOf<R, X>, T>,
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
    ) -> Result<((T, Duration), PoolConnection<Db<R, X>>)>
    where
        F: Operation<R, ConnOf<R, X>, T>,
    {
        let routed = match (&self.inner.router, reading) {
            (Some(router), Reading::Routed(ctx)) if !(side == Side::New && self.is_split()) => {
                Some((router, ctx))
            }
            _ => None,
        };
        let Some((router, ctx)) = routed else {
            let mut conn = acquire(self.pool_of(side)).await?;
            let read = self
                .call_side(Call::Read, op, side, stage, &mut conn)
                .await?;
            return Ok((read, conn));
        };
        router
            .run_read::<Db<R, X>, _, _, _>(
                ctx,
                self.inner.primary_reads,
                |mut conn, target| async move {
                    let read = self
                        .call_side_from(Call::Read, op, side, stage, &mut conn, target.as_str())
                        .await?;
                    Ok((read, conn))
                },
            )
            .await
    }
}
