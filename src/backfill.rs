//! Backfill: copy the rows that existed before dual writes began, safely, resumably, in parallel.
//!
//! A run covers the source key range `(lower, upper]` fixed when it starts (the largest key
//! then; later rows are dual-written anyway). The range is cut into *chunks*, stored in
//! `twintrack_backfill_chunks`. Workers (several per process, several processes) lease one
//! chunk at a time (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and copy it in keyset batches. Each
//! batch is one transaction that:
//!
//! 1. locks the batch's source rows `FOR SHARE` (so a racing update or delete through the dual
//!    store waits for the batch, and the batch never copies a value older than one already
//!    dual-written, nor brings back a row deleted meanwhile);
//! 2. runs the definition's `copy` SQL for the batch's key range `($1, $2]`;
//! 3. moves the chunk's checkpoint (`next_key`) and renews the lease, if the lease is still
//!    this worker's.
//!
//! A run killed at any point resumes where its last batch committed: nothing is copied twice
//! by the run's bookkeeping, nothing skipped. The batch size is tuned toward a target time per
//! batch; the run pauses while a replica lags past a limit and can be capped to a rate. When
//! every chunk is done, the run is marked finished and "backfill finished" (or, for a reverse
//! run, "reverse synced") is recorded as evidence for the stage gates, at the run's start time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use serde::Serialize;
use sqlx::{AssertSqlSafe, Connection, Row};

use crate::db::{Backend, Database, now_micros};
use crate::definition::{Direction, MigrationDef, db_message};
use crate::flags::{EvidenceKind, FlagStore};
use crate::metrics::Metrics;
use crate::{Error, Result, Stage};

/// How a backfill runs.
#[derive(Clone, Debug)]
pub struct BackfillOptions {
    /// Legacy → new (default) or new → legacy.
    pub direction: Direction,
    /// Rows in the first batch (tuned afterwards). Default 1,000.
    pub batch_size: u32,
    /// The batch size is tuned so a batch takes about this long. Default 200 ms.
    pub target_batch_time: Duration,
    /// Pause while a streaming replica's replay lag is above this (PostgreSQL).
    pub max_lag: Option<Duration>,
    /// At most this many rows per second, all workers of this process together.
    pub rate: Option<f64>,
    /// Concurrent workers in this process. Default 1.
    pub workers: usize,
    /// How long a chunk lease lasts without a batch renewing it. Default 30 s.
    pub lease: Duration,
    /// Who runs it (recorded with the evidence).
    pub actor: String,
    /// For demonstrations and tests only: copy without locking the source rows `FOR SHARE`,
    /// which lets a racing dual write be overwritten by a batch's older copy. Never set it in
    /// production.
    pub unsafe_no_row_locks: bool,
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            direction: Direction::Forward,
            batch_size: 1_000,
            target_batch_time: Duration::from_millis(200),
            max_lag: None,
            rate: None,
            workers: 1,
            lease: Duration::from_secs(30),
            actor: "twintrack backfill".into(),
            unsafe_no_row_locks: false,
        }
    }
}

/// Where a run stands, reported after every batch and while paused.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    /// Rows copied by the whole run so far (all processes).
    pub rows_copied: u64,
    /// Keys of the range covered so far.
    pub keys_done: u64,
    /// Keys in the range.
    pub keys_total: u64,
    /// Rows per second copied by this process.
    pub rows_per_second: f64,
    /// Estimated time left.
    pub eta_seconds: Option<f64>,
    /// Paused for replica lag right now.
    pub paused: bool,
    /// The current batch size.
    pub batch_size: u32,
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct BackfillReport {
    /// The migration.
    pub migration: String,
    /// `forward` or `reverse`.
    pub direction: Direction,
    /// The run's id.
    pub run_id: i64,
    /// Whether this call picked up a run that an earlier (killed) one started.
    pub resumed: bool,
    /// The key range `(lower, upper]`.
    pub lower_bound: i64,
    /// See `lower_bound`.
    pub upper_bound: i64,
    /// Rows copied by this call.
    pub rows_copied: u64,
    /// Rows copied by the run, all processes and attempts.
    pub run_rows_copied: u64,
    /// Batches committed by this call.
    pub batches: u64,
    /// Chunks in the run.
    pub chunks: u64,
    /// Time spent paused for replica lag.
    pub paused_seconds: f64,
    /// Wall time of this call.
    pub elapsed_seconds: f64,
    /// Whether the run is finished (false only if another process still holds a chunk).
    pub finished: bool,
}

/// How a batch is copied.
pub(crate) enum Copier {
    /// The definition's `copy` (or `reverse_copy`) SQL, in the batch's transaction.
    Sql(String),
    /// A copier that writes the locked keys elsewhere (two-database stores).
    Keys(Arc<dyn KeyCopier>),
}

/// Makes the other side match the source for the key range `(lo, hi]`: copies the source rows
/// of `keys` (every source key in the range, locked by the batch's transaction, `source`) and
/// removes what the other side holds for keys the source no longer has; commits there before
/// the batch commits. Returns the rows written.
pub(crate) trait KeyCopier: Send + Sync + 'static {
    fn copy<'a>(
        &'a self,
        source: &'a mut sqlx::AnyConnection,
        keys: &'a [i64],
        range: (i64, i64),
    ) -> crate::flags::BoxFuture<'a, Result<u64>>;

    /// The other side's smallest and largest key, so the run also covers keys the source lost.
    fn target_bounds(&self) -> crate::flags::BoxFuture<'_, Result<Option<(i64, i64)>>>;
}

/// Chunks a run is cut into: enough for the workers to share, few enough to keep the
/// bookkeeping small.
const MAX_CHUNKS: i64 = 256;
const KEYS_PER_CHUNK: i64 = 20_000;

struct Run {
    id: i64,
    lower: i64,
    upper: i64,
    started_at: i64,
    resumed: bool,
}

struct Shared {
    db: Database,
    def: MigrationDef,
    options: BackfillOptions,
    metrics: Metrics,
    run: Run,
    owner: String,
    rows: AtomicU64,
    batches: AtomicU64,
    paused_micros: AtomicU64,
    paused_now: AtomicBool,
    started: Instant,
    progress: Box<dyn Fn(&Progress) + Send + Sync>,
}

/// Runs (or resumes) the backfill of `def` in `options.direction`. Refuses in a stage where the
/// target shape does not receive dual writes (`legacy_only` for a forward run; anything but
/// `dual_write` … `ramp_down` for a reverse one). `progress` is called after every batch.
pub async fn run(
    db: &Database,
    flags: &dyn FlagStore,
    def: &MigrationDef,
    options: BackfillOptions,
    metrics: Metrics,
    progress: impl Fn(&Progress) + Send + Sync + 'static,
) -> Result<BackfillReport> {
    run_with(db, flags, def, options, metrics, progress, None).await
}

/// [`run`] with a copier of its own (`None`: the definition's SQL).
pub(crate) async fn run_with(
    db: &Database,
    flags: &dyn FlagStore,
    def: &MigrationDef,
    options: BackfillOptions,
    metrics: Metrics,
    progress: impl Fn(&Progress) + Send + Sync + 'static,
    copier: Option<Copier>,
) -> Result<BackfillReport> {
    if options.workers == 0 || options.workers > 64 {
        return Err(Error::InvalidInput(
            "workers must be between 1 and 64".into(),
        ));
    }
    if options.batch_size == 0 {
        return Err(Error::InvalidInput("batch size must be at least 1".into()));
    }
    if options.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(Error::InvalidInput(
            "rate must be a positive number of rows per second".into(),
        ));
    }
    let direction = options.direction;
    let copier = Arc::new(match copier {
        Some(copier) => copier,
        None => Copier::Sql(def.copy_sql(direction)?.to_owned()),
    });
    let record = flags.get(&def.name).await?;
    let stage = record.state.stage;
    let writes_target = match direction {
        Direction::Forward => !matches!(stage, Stage::LegacyOnly | Stage::NewOnly),
        Direction::Reverse => !matches!(stage, Stage::LegacyOnly | Stage::NewOnly),
    };
    if !writes_target {
        let remedy = match direction {
            Direction::Forward => format!(
                "turn dual writes on first: `twintrack stage set {} dual_write --reason …`",
                def.name
            ),
            Direction::Reverse => format!(
                "move to ramp_down first (writes legacy again): `twintrack stage set {} ramp_down --reason …`",
                def.name
            ),
        };
        return Err(Error::Precondition(format!(
            "a {} backfill of {:?} in stage {stage} would race writes it cannot see; {remedy}",
            direction.as_str(),
            def.name
        )));
    }
    match &*copier {
        Copier::Sql(_) => def.check(db).await?,
        Copier::Keys(_) => {
            // The other side is another database: check the source here.
            let (table, key) = def.source(direction);
            let probe = format!("SELECT {key} FROM {table} WHERE 1 = 0");
            sqlx::query(AssertSqlSafe(probe))
                .fetch_all(db.pool())
                .await
                .map_err(|e| {
                    Error::Config(format!(
                        "migration {:?}: the backfill's source {table}.{key}: {}",
                        def.name,
                        db_message(&e)
                    ))
                })?;
        }
    }
    // A run started before the target shape last missed writes (the migration went back to
    // legacy_only, or through new_only for a reverse run) cannot be resumed: its done chunks
    // no longer prove anything.
    let stale_before = match direction {
        Direction::Forward => record.evidence.left_legacy_only_at,
        Direction::Reverse => record.evidence.left_new_only_at,
    };
    let extra = match &*copier {
        Copier::Keys(copier) => copier.target_bounds().await?,
        Copier::Sql(_) => None,
    };
    let run = open_run(db, def, direction, stale_before, extra).await?;
    let shared = Arc::new(Shared {
        db: db.clone(),
        def: def.clone(),
        options: options.clone(),
        metrics,
        owner: format!("{}-{:x}", std::process::id(), crate::context::random_key()),
        run,
        rows: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        paused_micros: AtomicU64::new(0),
        paused_now: AtomicBool::new(false),
        started: Instant::now(),
        progress: Box::new(progress),
    });
    // A JoinSet: dropping this future (a killed run) stops its workers too.
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.workers {
        let shared = shared.clone();
        let copier = copier.clone();
        workers.spawn(async move { work(&shared, &copier).await });
    }
    let mut failure = None;
    while let Some(worker) = workers.join_next().await {
        match worker {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failure = failure.or(Some(err)),
            Err(join) => {
                failure = failure.or(Some(Error::InvalidInput(format!(
                    "a backfill worker died: {join}"
                ))))
            }
        }
    }
    if let Some(err) = failure {
        return Err(err);
    }
    let finished = finish_run(&shared, flags).await?;
    let ChunkTotals {
        rows_copied: run_rows,
        chunks,
        ..
    } = chunk_totals(db, shared.run.id).await?;
    Ok(BackfillReport {
        migration: def.name.clone(),
        direction,
        run_id: shared.run.id,
        resumed: shared.run.resumed,
        lower_bound: shared.run.lower,
        upper_bound: shared.run.upper,
        rows_copied: shared.rows.load(Ordering::Relaxed),
        run_rows_copied: run_rows,
        batches: shared.batches.load(Ordering::Relaxed),
        chunks,
        paused_seconds: shared.paused_micros.load(Ordering::Relaxed) as f64 / 1e6,
        elapsed_seconds: shared.started.elapsed().as_secs_f64(),
        finished,
    })
}

/// The open run for this migration and direction, or a new one over the source's keys now.
async fn open_run(
    db: &Database,
    def: &MigrationDef,
    direction: Direction,
    stale_before: Option<i64>,
    extra: Option<(i64, i64)>,
) -> Result<Run> {
    let mut conn = db.pool().acquire().await?;
    let mut tx = conn.begin_with(db.backend().begin_write()).await?;
    if db.backend() == Backend::Postgres {
        // One creator at a time; everyone else then finds the run and joins it.
        sqlx::query("SELECT pg_advisory_xact_lock(1953986927)")
            .execute(&mut *tx)
            .await?;
    }
    let open = sqlx::query(
        "SELECT id, lower_bound, upper_bound, started_at FROM twintrack_backfill_runs
         WHERE migration = $1 AND direction = $2 AND finished_at IS NULL",
    )
    .bind(&def.name)
    .bind(direction.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = open {
        let run = Run {
            id: row.try_get("id")?,
            lower: row.try_get("lower_bound")?,
            upper: row.try_get("upper_bound")?,
            started_at: row.try_get("started_at")?,
            resumed: true,
        };
        if stale_before.is_none_or(|at| run.started_at > at) {
            tx.commit().await?;
            return Ok(run);
        }
        tracing::warn!(migration = %def.name, run = run.id,
            "abandoning an interrupted backfill run older than the last time the target shape missed writes");
        // Closed without evidence (finished_at < started_at marks it abandoned).
        sqlx::query("UPDATE twintrack_backfill_runs SET finished_at = 0 WHERE id = $1")
            .bind(run.id)
            .execute(&mut *tx)
            .await?;
    }
    let (table, key) = def.source(direction);
    let bounds = format!(
        "SELECT CAST(COALESCE(MIN({key}), 0) AS BIGINT) AS lo, CAST(COALESCE(MAX({key}), 0) AS BIGINT) AS hi FROM {table}"
    );
    let row = sqlx::query(AssertSqlSafe(bounds))
        .fetch_one(&mut *tx)
        .await?;
    let (mut min, mut max): (i64, i64) = (row.try_get("lo")?, row.try_get("hi")?);
    if let Some((lo, hi)) = extra {
        (min, max) = if max == 0 && min == 0 {
            (lo, hi)
        } else {
            (min.min(lo), max.max(hi))
        };
    }
    let lower = min.saturating_sub(1);
    let upper = max.max(lower);
    let started_at = now_micros();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO twintrack_backfill_runs (migration, direction, lower_bound, upper_bound, started_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(&def.name)
    .bind(direction.as_str())
    .bind(lower)
    .bind(upper)
    .bind(started_at)
    .fetch_one(&mut *tx)
    .await?;
    let span = (upper - lower).max(0);
    let chunks = (span / KEYS_PER_CHUNK).clamp(1, MAX_CHUNKS);
    let width = (span + chunks - 1) / chunks.max(1);
    let mut lo = lower;
    let mut index = 0i64;
    while lo < upper || index == 0 {
        let hi = if width == 0 {
            upper
        } else {
            (lo + width).min(upper)
        };
        sqlx::query(
            "INSERT INTO twintrack_backfill_chunks (run_id, chunk, lo, hi, next_key, done_at)
             VALUES ($1, $2, $3, $4, $3, $5)",
        )
        .bind(id)
        .bind(index)
        .bind(lo)
        .bind(hi)
        // An empty range is done from the start.
        .bind(if hi <= lo { Some(started_at) } else { None })
        .execute(&mut *tx)
        .await?;
        index += 1;
        if hi >= upper {
            break;
        }
        lo = hi;
    }
    tx.commit().await?;
    Ok(Run {
        id,
        lower,
        upper,
        started_at,
        resumed: false,
    })
}

/// A leased chunk: copy from `next_key` (exclusive) up to `hi` (inclusive).
struct Lease {
    chunk: i64,
    next_key: i64,
    hi: i64,
}

/// One worker: lease chunks and copy them until none is left.
async fn work(shared: &Shared, copier: &Copier) -> Result<()> {
    let mut batch = shared.options.batch_size;
    loop {
        let Some(mut lease) = lease_chunk(shared).await? else {
            if unfinished_chunks(&shared.db, shared.run.id).await? == 0 {
                return Ok(());
            }
            // Others hold the rest; wait in case a lease expires (its holder died).
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while lease.next_key < lease.hi {
            wait_for_replicas(shared).await?;
            let started = Instant::now();
            let Some((upto, rows)) = copy_batch(shared, copier, &lease, batch).await? else {
                break; // the lease was lost to another worker
            };
            let took = started.elapsed();
            lease.next_key = upto;
            shared.rows.fetch_add(rows, Ordering::Relaxed);
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared.metrics.backfill_rows.add(
                rows,
                &[
                    KeyValue::new("migration", shared.def.name.clone()),
                    KeyValue::new("direction", shared.options.direction.as_str()),
                ],
            );
            batch = tune(batch, took, shared.options.target_batch_time);
            throttle(shared, rows, took).await;
            report(shared, batch, false).await;
        }
    }
}

/// Leases the next chunk not done and not leased (or whose lease expired).
async fn lease_chunk(shared: &Shared) -> Result<Option<Lease>> {
    let db = &shared.db;
    let now = now_micros();
    let until = now + i64::try_from(shared.options.lease.as_micros()).unwrap_or(i64::MAX / 2);
    let mut conn = db.pool().acquire().await?;
    let mut tx = conn.begin_with(db.backend().begin_write()).await?;
    let pick = match db.backend() {
        Backend::Postgres => {
            "SELECT chunk, next_key, hi FROM twintrack_backfill_chunks
             WHERE run_id = $1 AND done_at IS NULL AND (owner IS NULL OR leased_until < $2)
             ORDER BY chunk LIMIT 1 FOR UPDATE SKIP LOCKED"
        }
        Backend::Sqlite => {
            "SELECT chunk, next_key, hi FROM twintrack_backfill_chunks
             WHERE run_id = $1 AND done_at IS NULL AND (owner IS NULL OR leased_until < $2)
             ORDER BY chunk LIMIT 1"
        }
    };
    let Some(row) = sqlx::query(pick)
        .bind(shared.run.id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?
    else {
        tx.commit().await?;
        return Ok(None);
    };
    let lease = Lease {
        chunk: row.try_get("chunk")?,
        next_key: row.try_get("next_key")?,
        hi: row.try_get("hi")?,
    };
    sqlx::query(
        "UPDATE twintrack_backfill_chunks SET owner = $1, leased_until = $2 WHERE run_id = $3 AND chunk = $4",
    )
    .bind(&shared.owner)
    .bind(until)
    .bind(shared.run.id)
    .bind(lease.chunk)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(lease))
}

/// One batch in one transaction: lock the source rows, copy them, move the checkpoint. Returns
/// the key copied up to and the rows the copy wrote, or `None` if the lease was lost.
async fn copy_batch(
    shared: &Shared,
    copier: &Copier,
    lease: &Lease,
    batch: u32,
) -> Result<Option<(i64, u64)>> {
    let db = &shared.db;
    let (table, key) = shared.def.source(shared.options.direction);
    let lock = match db.backend() {
        Backend::Postgres if shared.options.unsafe_no_row_locks => "",
        Backend::Postgres => " FOR SHARE",
        // SQLite: BEGIN IMMEDIATE holds the database's write lock for the whole batch.
        Backend::Sqlite => "",
    };
    let keys = format!(
        "SELECT {key} AS k FROM {table} WHERE {key} > $1 AND {key} <= $2 ORDER BY {key} LIMIT $3{lock}"
    );
    let mut conn = db.pool().acquire().await?;
    let mut tx = conn.begin_with(db.backend().begin_write()).await?;
    let rows = sqlx::query(AssertSqlSafe(keys))
        .bind(lease.next_key)
        .bind(lease.hi)
        .bind(i64::from(batch))
        .fetch_all(&mut *tx)
        .await?;
    // A full batch ends at its last key; a short one covers the rest of the chunk.
    let upto = if rows.len() == batch as usize {
        rows.last()
            .map(|r| r.try_get::<i64, _>("k"))
            .transpose()?
            .unwrap_or(lease.hi)
    } else {
        lease.hi
    };
    let copy_sql = match copier {
        Copier::Sql(sql) => sql,
        Copier::Keys(copier) => {
            let keys = rows
                .iter()
                .map(|r| r.try_get::<i64, _>("k"))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let copied = copier.copy(&mut tx, &keys, (lease.next_key, upto)).await?;
            return finish_batch(shared, tx, lease, upto, copied).await;
        }
    };
    let copied = sqlx::query(AssertSqlSafe(copy_sql.to_owned()))
        .bind(lease.next_key)
        .bind(upto)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            Error::Config(format!(
                "migration {:?}: the {} SQL failed on keys ({}, {upto}]: {}",
                shared.def.name,
                match shared.options.direction {
                    Direction::Forward => "copy",
                    Direction::Reverse => "reverse_copy",
                },
                lease.next_key,
                db_message(&e)
            ))
        })?
        .rows_affected();
    finish_batch(shared, tx, lease, upto, copied).await
}

/// Moves the chunk's checkpoint in the batch's transaction and commits it, if the lease is
/// still ours.
async fn finish_batch(
    shared: &Shared,
    mut tx: sqlx::Transaction<'_, sqlx::Any>,
    lease: &Lease,
    upto: i64,
    copied: u64,
) -> Result<Option<(i64, u64)>> {
    let now = now_micros();
    let until = now + i64::try_from(shared.options.lease.as_micros()).unwrap_or(i64::MAX / 2);
    let moved = sqlx::query(
        "UPDATE twintrack_backfill_chunks
         SET next_key = $1, rows_copied = rows_copied + $2, batches = batches + 1,
             leased_until = $3, done_at = CASE WHEN $1 >= hi THEN $4 ELSE NULL END
         WHERE run_id = $5 AND chunk = $6 AND owner = $7 AND next_key = $8",
    )
    .bind(upto)
    .bind(i64::try_from(copied).unwrap_or(i64::MAX))
    .bind(until)
    .bind(now)
    .bind(shared.run.id)
    .bind(lease.chunk)
    .bind(&shared.owner)
    .bind(lease.next_key)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if moved == 0 {
        // Another worker took the chunk over (our lease expired): undo, leave it to them.
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some((upto, copied)))
}

/// The next batch size: toward the target time, at most doubling or halving per batch.
fn tune(batch: u32, took: Duration, target: Duration) -> u32 {
    if took.is_zero() {
        return batch.saturating_mul(2).min(100_000);
    }
    let ideal = f64::from(batch) * target.as_secs_f64() / took.as_secs_f64();
    let bounded = ideal.clamp(f64::from(batch) / 2.0, f64::from(batch) * 2.0);
    (bounded as u32).clamp(10, 100_000)
}

/// Sleeps as long as the rate cap asks for after copying `rows` in `took`.
async fn throttle(shared: &Shared, rows: u64, took: Duration) {
    let Some(rate) = shared.options.rate else {
        return;
    };
    let per_worker = rate / shared.options.workers as f64;
    let should_take = Duration::from_secs_f64(rows as f64 / per_worker);
    if should_take > took {
        tokio::time::sleep(should_take - took).await;
    }
}

/// Waits while any streaming replica's replay lag is above the limit (PostgreSQL), reporting
/// the pause.
async fn wait_for_replicas(shared: &Shared) -> Result<()> {
    let Some(max_lag) = shared.options.max_lag else {
        return Ok(());
    };
    if shared.db.backend() != Backend::Postgres {
        return Ok(());
    }
    let mut paused_since: Option<Instant> = None;
    loop {
        let lag_ms: i64 = sqlx::query_scalar(
            "SELECT CAST(COALESCE(MAX(EXTRACT(EPOCH FROM replay_lag) * 1000), 0) AS BIGINT) FROM pg_stat_replication",
        )
        .fetch_one(shared.db.pool())
        .await?;
        if u128::try_from(lag_ms.max(0)).unwrap_or(0) <= max_lag.as_millis() {
            if let Some(since) = paused_since {
                let paused = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                shared.paused_micros.fetch_add(paused, Ordering::Relaxed);
                shared.paused_now.store(false, Ordering::Relaxed);
                tracing::info!(migration = %shared.def.name, "replica lag back under the limit; backfill resumes");
            }
            return Ok(());
        }
        if paused_since.is_none() {
            paused_since = Some(Instant::now());
            shared.paused_now.store(true, Ordering::Relaxed);
            shared
                .metrics
                .backfill_pauses
                .add(1, &[KeyValue::new("migration", shared.def.name.clone())]);
            tracing::info!(migration = %shared.def.name, lag_ms, "replica lag over the limit; backfill paused");
        }
        report(shared, shared.options.batch_size, true).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn report(shared: &Shared, batch: u32, paused: bool) {
    let Ok(ChunkTotals {
        keys_done: done,
        rows_copied: copied,
        ..
    }) = chunk_totals(&shared.db, shared.run.id).await
    else {
        return;
    };
    let total = u64::try_from(shared.run.upper - shared.run.lower).unwrap_or(0);
    let secs = shared.started.elapsed().as_secs_f64();
    let rate = shared.rows.load(Ordering::Relaxed) as f64 / secs.max(1e-3);
    let key_rate = done as f64 / secs.max(1e-3);
    let eta = (key_rate > 0.0).then(|| total.saturating_sub(done) as f64 / key_rate);
    (shared.progress)(&Progress {
        rows_copied: copied,
        keys_done: done,
        keys_total: total,
        rows_per_second: rate,
        eta_seconds: eta,
        paused: paused || shared.paused_now.load(Ordering::Relaxed),
        batch_size: batch,
    });
}

/// What a run's chunks add up to.
struct ChunkTotals {
    /// Keys of the range already covered.
    keys_done: u64,
    rows_copied: u64,
    chunks: u64,
}

async fn chunk_totals(db: &Database, run: i64) -> Result<ChunkTotals> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(next_key - lo), 0) AS BIGINT) AS done,
                CAST(COALESCE(SUM(rows_copied), 0) AS BIGINT) AS copied, COUNT(*) AS chunks
         FROM twintrack_backfill_chunks WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(db.pool())
    .await?;
    let count = |column: &str| -> Result<u64> {
        Ok(u64::try_from(row.try_get::<i64, _>(column)?).unwrap_or(0))
    };
    Ok(ChunkTotals {
        keys_done: count("done")?,
        rows_copied: count("copied")?,
        chunks: count("chunks")?,
    })
}

async fn unfinished_chunks(db: &Database, run: i64) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM twintrack_backfill_chunks WHERE run_id = $1 AND done_at IS NULL",
    )
    .bind(run)
    .fetch_one(db.pool())
    .await?)
}

/// Marks the run finished once every chunk is done and records the evidence (once).
async fn finish_run(shared: &Shared, flags: &dyn FlagStore) -> Result<bool> {
    if unfinished_chunks(&shared.db, shared.run.id).await? > 0 {
        return Ok(false);
    }
    let marked = sqlx::query(
        "UPDATE twintrack_backfill_runs SET finished_at = $1 WHERE id = $2 AND finished_at IS NULL",
    )
    .bind(now_micros())
    .bind(shared.run.id)
    .execute(shared.db.pool())
    .await?
    .rows_affected();
    if marked == 1 {
        let kind = match shared.options.direction {
            Direction::Forward => EvidenceKind::BackfillFinished,
            Direction::Reverse => EvidenceKind::ReverseSynced,
        };
        // The run's start time: rows dual-written since then are covered, older ones copied.
        flags
            .record_evidence(
                &shared.def.name,
                kind,
                shared.run.started_at,
                &shared.options.actor,
            )
            .await?;
    }
    Ok(true)
}

/// Where one backfill run stands (for status pages and the control plane).
#[derive(Clone, Debug, Serialize)]
pub struct RunStatus {
    /// The run's id.
    pub run_id: i64,
    /// `forward` or `reverse`.
    pub direction: String,
    /// Key range `(lower, upper]`.
    pub lower_bound: i64,
    /// See `lower_bound`.
    pub upper_bound: i64,
    /// Keys of the range covered so far.
    pub keys_done: i64,
    /// Rows copied so far.
    pub rows_copied: i64,
    /// When it started (µs).
    pub started_at: i64,
    /// When it finished (µs); `None` while open. `Some(0)`: abandoned.
    pub finished_at: Option<i64>,
}

/// The newest run of `migration` in each direction.
pub async fn latest_runs(db: &Database, migration: &str) -> Result<Vec<RunStatus>> {
    let rows = sqlx::query(
        "SELECT r.id, r.direction, r.lower_bound, r.upper_bound, r.started_at, r.finished_at,
                CAST(COALESCE(SUM(c.next_key - c.lo), 0) AS BIGINT) AS done,
                CAST(COALESCE(SUM(c.rows_copied), 0) AS BIGINT) AS copied
         FROM twintrack_backfill_runs r LEFT JOIN twintrack_backfill_chunks c ON c.run_id = r.id
         WHERE r.migration = $1 AND r.id IN (
             SELECT MAX(id) FROM twintrack_backfill_runs WHERE migration = $1 GROUP BY direction)
         GROUP BY r.id, r.direction, r.lower_bound, r.upper_bound, r.started_at, r.finished_at
         ORDER BY r.direction",
    )
    .bind(migration)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(RunStatus {
                run_id: row.try_get("id")?,
                direction: row.try_get("direction")?,
                lower_bound: row.try_get("lower_bound")?,
                upper_bound: row.try_get("upper_bound")?,
                keys_done: row.try_get("done")?,
                rows_copied: row.try_get("copied")?,
                started_at: row.try_get("started_at")?,
                finished_at: row.try_get("finished_at")?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(Error::from_sqlx)
}
