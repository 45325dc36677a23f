//! Backfill: copy the rows that existed before dual writes began, safely, resumably, in parallel.
//!
//! A run covers the source's keys up to the largest one when it starts (later rows are
//! dual-written anyway), walked in keyset order: `WHERE (k…) > (last…) ORDER BY k… LIMIT n`.
//! The keys are cut into *chunks* at boundaries taken from the table's own keys (every N-th
//! key of the key index, so chunks hold the same number of rows however sparse, skewed,
//! negative or non-numeric the keys are), stored in `twintrack_backfill_chunks` as canonical
//! key text. Workers (several per process, several processes) lease one chunk at a time
//! (`FOR UPDATE SKIP LOCKED` on PostgreSQL) and copy it in batches. Each batch is one
//! transaction that:
//!
//! 1. selects the batch's next keys and locks their source rows `FOR SHARE` (so a racing
//!    update or delete through the dual store waits for the batch, and the batch never copies a
//!    value older than one already dual-written, nor brings back a row deleted meanwhile);
//! 2. runs the definition's `copy` SQL for the batch's key range, `(after, upto]` with both
//!    bounds keys of the table (see [`crate::definition`] for `{batch}`);
//! 3. moves the chunk's checkpoint (the last key copied) and renews the lease, if the lease is
//!    still this worker's.
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
use tracing::Instrument as _;

use crate::db::{Backend, Conn, Database, Query, Row, Tx, Value, now_micros, query};
use crate::definition::{Direction, MigrationDef, bound};
use crate::flags::{BoxFuture, EvidenceKind, FlagStore};
use crate::key::{DynKey, KeyKind};
use crate::keyset::{self, KeyRange, Lower};
use crate::metrics::Metrics;
use crate::retry;
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
    /// Pause while a standby's replay lag is above this, or while a standby that should be
    /// watched shows no lag figure (an inactive replication slot, slots but no streaming
    /// standby, a replica in `replicas` that cannot be polled; MySQL: a replica connected to the
    /// primary and not in `replicas`). Refused on SQLite ([`Error::InvalidInput`]).
    pub max_lag: Option<Duration>,
    /// Replicas whose replay lag `max_lag` also reads directly (their replayed position and
    /// last replayed transaction), beside the primary's `pg_stat_replication`: needed for
    /// standbys the primary cannot see (cascading ones), and they are expected to be there.
    pub replicas: Option<crate::ryw::ReplicaSet>,
    /// At most this many rows per second, all workers of this process together.
    pub rate: Option<f64>,
    /// Concurrent workers in this process. Default 1.
    pub workers: usize,
    /// How long a chunk lease lasts without a batch renewing it. Default 30 s.
    pub lease: Duration,
    /// Who runs it (recorded with the evidence).
    pub actor: String,
    /// For demonstrations and tests only: copy without locking the source rows `FOR SHARE` and
    /// without holding one snapshot for the batch (`REPEATABLE READ`), which lets a racing dual
    /// write be overwritten by a batch's older copy. Never set it in production.
    pub unsafe_no_row_locks: bool,
    /// Tests only: awaited in every batch between locking its keys and copying them.
    #[doc(hidden)]
    pub before_copy: Option<BeforeCopy>,
}

/// See [`BackfillOptions::before_copy`].
#[doc(hidden)]
#[derive(Clone)]
pub struct BeforeCopy(pub Arc<dyn Fn() -> BoxFuture<'static, ()> + Send + Sync>);

impl std::fmt::Debug for BeforeCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeCopy")
    }
}

impl Default for BackfillOptions {
    fn default() -> Self {
        BackfillOptions {
            direction: Direction::Forward,
            batch_size: 1_000,
            target_batch_time: Duration::from_millis(200),
            max_lag: None,
            replicas: None,
            rate: None,
            workers: 1,
            lease: Duration::from_secs(30),
            actor: "twintrack backfill".into(),
            unsafe_no_row_locks: false,
            before_copy: None,
        }
    }
}

/// Where a run stands, reported after every batch and while paused.
#[derive(Clone, Debug, Serialize)]
pub struct Progress {
    /// Rows the copies wrote so far (all processes).
    pub rows_copied: u64,
    /// Source keys walked so far (all processes).
    pub keys_done: u64,
    /// Source keys in the run (counted when it started).
    pub keys_total: u64,
    /// Chunks finished.
    pub chunks_done: u64,
    /// Chunks in the run.
    pub chunks: u64,
    /// Source keys per second walked by this process.
    pub keys_per_second: f64,
    /// Estimated time left, in seconds.
    pub eta_seconds: Option<f64>,
    /// Paused for replica lag right now.
    pub paused: bool,
    /// Why, while paused: the standby over the limit and by how much, or why no lag figure
    /// can be read.
    pub pause_reason: Option<String>,
    /// The current batch size, in keys.
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
    /// The run covers keys above this one (`None`: from the smallest key).
    pub lower_bound: Option<DynKey>,
    /// … up to and including this one (`None`: to the largest, in a two-database run).
    pub upper_bound: Option<DynKey>,
    /// Rows the copies wrote in this call.
    pub rows_copied: u64,
    /// Rows the copies wrote in the whole run, all processes and attempts.
    pub run_rows_copied: u64,
    /// Source keys the whole run walked.
    pub keys_done: u64,
    /// Batches committed by this call.
    pub batches: u64,
    /// Chunks in the run.
    pub chunks: u64,
    /// Time spent paused for replica lag, in seconds.
    pub paused_seconds: f64,
    /// Wall time of this call, in seconds.
    pub elapsed_seconds: f64,
    /// Whether the run is finished (false only if another process still holds a chunk).
    pub finished: bool,
}

/// How a batch is copied.
pub(crate) enum Copier {
    /// The definition's `copy` (or `reverse_copy`) SQL, in the batch's transaction.
    Sql,
    /// A copier that writes the locked keys elsewhere (two-database stores).
    Keys(Arc<dyn KeyCopier>),
}

/// Makes the other side match the source for the keys in `range`: copies the source rows of
/// `keys` (every source key in the range, locked by the batch's transaction on `source`) and
/// removes what the other side holds for keys the source no longer has; commits there before
/// the batch commits. Returns the rows written.
pub(crate) trait KeyCopier: Send + Sync + 'static {
    /// The database the copies write to.
    fn target(&self) -> &Database;

    fn copy<'a>(
        &'a self,
        source: Conn<'a>,
        keys: &'a [DynKey],
        range: &'a KeyRange,
    ) -> BoxFuture<'a, Result<u64>>;
}

/// At most this many chunks per run: enough for the workers to share, few enough to keep the
/// bookkeeping small.
const MAX_CHUNKS: i64 = 256;
/// At least this many source rows per chunk (the last one may hold fewer).
const MIN_CHUNK_ROWS: i64 = 20_000;

struct Run {
    id: i64,
    lower: Option<DynKey>,
    upper: Option<DynKey>,
    started_at: i64,
    resumed: bool,
    keys_total: i64,
}

struct Shared {
    db: Database,
    def: MigrationDef,
    kinds: Vec<KeyKind>,
    /// Two databases: the last batch also walks the target's keys above the source's largest.
    open_ended: bool,
    options: BackfillOptions,
    metrics: Metrics,
    /// Keys and rows per minute, for the admin page's progress chart.
    stats: crate::stats::Stats,
    run: Run,
    owner: String,
    rows: AtomicU64,
    keys: AtomicU64,
    batches: AtomicU64,
    paused_micros: AtomicU64,
    paused_now: AtomicBool,
    pause_reason: std::sync::Mutex<Option<String>>,
    /// Warned once that max lag has nothing to watch.
    nothing_to_watch: AtomicBool,
    /// The most standbys seen streaming at once during this run.
    standbys_seen: std::sync::atomic::AtomicI64,
    /// The database of the flag rows (two databases: each batch holds its flag row).
    flags_db: Option<Database>,
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
    run_with(db, flags, def, options, metrics, progress, Copier::Sql).await
}

/// [`run`] with a copier of its own.
#[tracing::instrument(
    name = "twintrack.backfill",
    skip_all,
    fields(
        otel.name = %format!("backfill {}", def.name),
        twintrack.migration = %def.name,
        twintrack.backfill.direction = options.direction.as_str(),
    )
)]
pub(crate) async fn run_with(
    db: &Database,
    flags: &dyn FlagStore,
    def: &MigrationDef,
    options: BackfillOptions,
    metrics: Metrics,
    progress: impl Fn(&Progress) + Send + Sync + 'static,
    copier: Copier,
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
    if options.max_lag.is_some() && db.backend() == Backend::Sqlite {
        return Err(Error::InvalidInput(format!(
            "a replica lag limit reads replication, which SQLite has none of ({})",
            db.describe()
        )));
    }
    let direction = options.direction;
    if let Copier::Sql = copier {
        def.copy_sql(direction)?;
    }
    let record = flags.get(&def.name).await?;
    let stage = record.state.stage;
    if matches!(stage, Stage::LegacyOnly | Stage::NewOnly) {
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
    // Two databases: a batch removes target rows of keys the source does not have, so the
    // target must not be the side writes reach first (it would hold keys the source has not
    // been given yet).
    if matches!(copier, Copier::Keys(_)) && stage.plan().writes[0] == direction.source().other() {
        return Err(Error::Precondition(format!(
            "in stage {stage} the {} shape is written first, so a {} backfill across two databases could remove rows it holds that the other database has not received yet; {}",
            match direction {
                Direction::Forward => "new",
                Direction::Reverse => "legacy",
            },
            direction.as_str(),
            match direction {
                Direction::Forward => format!(
                    "roll back to shadow first (`twintrack rollback {}`), or run a reverse backfill",
                    def.name
                ),
                Direction::Reverse => format!(
                    "move to live or ramp_down first, or run a forward backfill (`twintrack backfill {}`)",
                    def.name
                ),
            }
        )));
    }
    let kinds = match &copier {
        Copier::Sql => def.check(db).await?,
        // The other side is another database: the source's key is read here.
        Copier::Keys(_) => def.side_key_kinds(db, direction.source()).await?,
    };
    // A run started before the target shape last missed writes (the migration went back to
    // legacy_only, or through new_only for a reverse run) cannot be resumed: its done chunks
    // no longer prove anything.
    let stale_before = match direction {
        Direction::Forward => record.evidence.left_legacy_only_at,
        Direction::Reverse => record.evidence.left_new_only_at,
    };
    // Two databases: the last batch also walks the target's keys above the source's largest
    // (rows the source lost), to remove them.
    let open_ended = matches!(copier, Copier::Keys(_));
    let run = open_run(db, def, &kinds, direction, stale_before, open_ended).await?;
    let shared = Arc::new(Shared {
        db: db.clone(),
        def: def.clone(),
        kinds,
        open_ended,
        options: options.clone(),
        metrics,
        // Unique across hosts: two containers' processes may have the same pid.
        owner: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()),
        stats: crate::stats::Stats::new(db.clone(), def.name.as_str().into(), None),
        run,
        rows: AtomicU64::new(0),
        keys: AtomicU64::new(0),
        batches: AtomicU64::new(0),
        paused_micros: AtomicU64::new(0),
        paused_now: AtomicBool::new(false),
        pause_reason: std::sync::Mutex::new(None),
        nothing_to_watch: AtomicBool::new(false),
        standbys_seen: std::sync::atomic::AtomicI64::new(0),
        flags_db: flags.flag_database().cloned(),
        started: Instant::now(),
        progress: Box::new(progress),
    });
    let copier = Arc::new(copier);
    // A JoinSet: dropping this future (a killed run) stops its workers too.
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..options.workers {
        let shared = shared.clone();
        let copier = copier.clone();
        workers.spawn(async move { work(&shared, &copier).await }.in_current_span());
    }
    let mut failure = None;
    while let Some(worker) = workers.join_next().await {
        match worker {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failure = failure.or(Some(err)),
            Err(join) => {
                failure = failure.or(Some(Error::Internal(format!(
                    "a backfill worker died: {join}"
                ))))
            }
        }
    }
    if let Err(err) = shared.stats.flush().await {
        tracing::warn!(migration = %def.name, error = %err, "could not write the backfill's per-minute figures");
    }
    if let Some(err) = failure {
        return Err(err);
    }
    let finished = finish_run(&shared, flags).await?;
    let totals = chunk_totals(db, shared.run.id).await?;
    Ok(BackfillReport {
        migration: def.name.clone(),
        direction,
        run_id: shared.run.id,
        resumed: shared.run.resumed,
        lower_bound: shared.run.lower.clone(),
        upper_bound: shared.run.upper.clone(),
        rows_copied: shared.rows.load(Ordering::Relaxed),
        run_rows_copied: totals.rows_copied,
        keys_done: totals.keys_done,
        batches: shared.batches.load(Ordering::Relaxed),
        chunks: totals.chunks,
        paused_seconds: shared.paused_micros.load(Ordering::Relaxed) as f64 / 1e6,
        elapsed_seconds: shared.started.elapsed().as_secs_f64(),
        finished,
    })
}

/// A key of `kinds` stored as canonical text (`None`: no bound).
fn stored_key(text: Option<String>, kinds: &[KeyKind]) -> Result<Option<DynKey>> {
    text.map(|t| {
        DynKey::parse(&t, kinds).map_err(|e| {
            Error::Internal(format!(
                "a stored backfill bound does not fit the key's columns ({e}); abandon the run by moving the migration back to legacy_only"
            ))
        })
    })
    .transpose()
}

/// The key in `row`'s first columns.
pub(crate) fn row_key(row: Row, kinds: &[KeyKind]) -> Result<DynKey> {
    DynKey::from_row(row, kinds)
}

/// The open run for this migration and direction, or a new one over the source's keys now.
///
/// A new run's chunks are planned (a count and a pass over the source's key index) outside
/// any lock: on SQLite the write lock would stop the service's writes for the whole pass. The
/// run is then created under the lock, unless another process created one meanwhile, which
/// this one joins.
async fn open_run(
    db: &Database,
    def: &MigrationDef,
    kinds: &[KeyKind],
    direction: Direction,
    stale_before: Option<i64>,
    open_ended: bool,
) -> Result<Run> {
    let mut tx = lock_runs(db, &def.name).await?;
    if let Some(run) = find_open(&mut tx, def, kinds, direction, stale_before).await? {
        tx.commit().await?;
        return Ok(run);
    }
    tx.commit().await?;

    let (table, key) = def.source(direction);
    let columns = keyset::order_by(key);
    let total: i64 = Query::assert_safe(format!("SELECT COUNT(*) FROM {table}"))
        .scalar(db)
        .await?;
    let descending: Vec<String> = key.iter().map(|c| format!("{c} DESC")).collect();
    let upper = Query::assert_safe(format!(
        "SELECT {columns} FROM {table} ORDER BY {} LIMIT 1",
        descending.join(", ")
    ))
    .fetch_optional(db)
    .await?
    .map(|row| row_key(row, kinds))
    .transpose()?;
    let boundaries = chunk_boundaries(db, table, key, kinds, total).await?;

    let mut tx = lock_runs(db, &def.name).await?;
    if let Some(run) = find_open(&mut tx, def, kinds, direction, stale_before).await? {
        tx.commit().await?;
        return Ok(run);
    }
    let started_at = now_micros();
    let id: i64 = query(
        "INSERT INTO twintrack_backfill_runs (migration, direction, lower_bound, upper_bound, started_at, rows_total)
         VALUES ($1, $2, NULL, $3, $4, $5) RETURNING id",
    )
    .bind(&def.name)
    .bind(direction.as_str())
    .bind(upper.as_ref().map(DynKey::to_text))
    .bind(started_at)
    .bind(total)
    .scalar(&mut tx)
    .await?;
    // Chunks: (none, b1], (b1, b2], …, (bn, upper]; each boundary is every step-th key.
    let step = rows_per_chunk(total);
    let mut lo: Option<DynKey> = None;
    let mut counted = 0i64;
    let mut ends: Vec<(Option<DynKey>, i64)> = boundaries
        .into_iter()
        .filter(|b| Some(b) != upper.as_ref())
        .map(|b| {
            counted += step;
            (Some(b), step)
        })
        .collect();
    ends.push((upper.clone(), (total - counted).max(0)));
    for (index, (hi, rows)) in ends.into_iter().enumerate() {
        // With nothing to copy (and, in one database, nothing to remove), a chunk is done
        // from the start.
        let done = rows == 0 && !open_ended;
        query(
            "INSERT INTO twintrack_backfill_chunks (run_id, chunk, lo, hi, next_key, rows_expected, done_at)
             VALUES ($1, $2, $3, $4, $3, $5, $6)",
        )
        .bind(id)
        .bind(index as i64)
        .bind(lo.as_ref().map(DynKey::to_text))
        .bind(hi.as_ref().map(DynKey::to_text))
        .bind(rows)
        .bind(if done { Some(started_at) } else { None })
        .execute(&mut tx)
        .await?;
        lo = hi;
    }
    tx.commit().await?;
    Ok(Run {
        id,
        lower: None,
        upper,
        started_at,
        resumed: false,
        keys_total: total,
    })
}

/// A transaction holding the right to create a run: PostgreSQL's advisory lock (one creator
/// at a time), SQLite's write lock, MySQL's lock on the migration's flag row.
async fn lock_runs(db: &Database, migration: &str) -> Result<Tx> {
    let mut tx = db.begin().await?;
    match db.backend() {
        Backend::Postgres => {
            query("SELECT pg_advisory_xact_lock(1953986927)")
                .execute(&mut tx)
                .await?;
        }
        Backend::MySql => {
            query("SELECT migration FROM twintrack_flags WHERE migration = $1 FOR UPDATE")
                .bind(migration)
                .fetch_optional(&mut tx)
                .await?;
        }
        Backend::Sqlite => {}
    }
    Ok(tx)
}

/// The open run of `def` in `direction`, unless it started before `stale_before` (then it is
/// closed without evidence and `None` returned).
async fn find_open(
    tx: &mut Tx,
    def: &MigrationDef,
    kinds: &[KeyKind],
    direction: Direction,
    stale_before: Option<i64>,
) -> Result<Option<Run>> {
    let open = query(
        "SELECT id, lower_bound, upper_bound, started_at, rows_total FROM twintrack_backfill_runs
         WHERE migration = $1 AND direction = $2 AND finished_at IS NULL",
    )
    .bind(&def.name)
    .bind(direction.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = open else { return Ok(None) };
    let run = Run {
        id: row.get("id")?,
        lower: stored_key(row.get("lower_bound")?, kinds)?,
        upper: stored_key(row.get("upper_bound")?, kinds)?,
        started_at: row.get("started_at")?,
        resumed: true,
        keys_total: row.get("rows_total")?,
    };
    if stale_before.is_none_or(|at| run.started_at > at) {
        return Ok(Some(run));
    }
    tracing::warn!(migration = %def.name, run = run.id,
        "abandoning an interrupted backfill run older than the last time the target shape missed writes");
    // Closed without evidence (finished_at < started_at marks it abandoned).
    query("UPDATE twintrack_backfill_runs SET finished_at = 0 WHERE id = $1")
        .bind(run.id)
        .execute(&mut *tx)
        .await?;
    Ok(None)
}

/// Source rows per chunk for a table of `total` rows: at least [`MIN_CHUNK_ROWS`], and few
/// enough chunks to stay within [`MAX_CHUNKS`].
fn rows_per_chunk(total: i64) -> i64 {
    let by_count = (total + MAX_CHUNKS - 1) / MAX_CHUNKS;
    by_count.max(MIN_CHUNK_ROWS)
}

/// Every [`rows_per_chunk`]-th key of `table` in key order (one pass over the key index): the
/// chunks' upper ends, so each chunk holds the same number of rows.
async fn chunk_boundaries(
    db: &Database,
    table: &str,
    key: &[String],
    kinds: &[KeyKind],
    total: i64,
) -> Result<Vec<DynKey>> {
    let step = rows_per_chunk(total);
    if total <= step {
        return Ok(Vec::new());
    }
    let columns = keyset::order_by(key);
    let sql = format!(
        "SELECT {columns} FROM (SELECT {columns}, row_number() OVER (ORDER BY {columns}) AS twintrack_rn FROM {table}) s
         WHERE twintrack_rn % $1 = 0 ORDER BY {columns}"
    );
    Query::assert_safe(sql)
        .bind(step)
        .fetch_all(db)
        .await?
        .into_iter()
        .map(|row| row_key(row, kinds))
        .collect()
}

/// A leased chunk: copy the keys after `next_key` (from the start when `None`) up to `hi`
/// (to the end when `None`).
struct Lease {
    chunk: i64,
    next_key: Option<DynKey>,
    hi: Option<DynKey>,
    /// Batches committed on the chunk: the compare-and-set token of its checkpoint.
    batches: i64,
}

/// One worker: lease chunks and copy them until none is left.
async fn work(shared: &Shared, copier: &Copier) -> Result<()> {
    let mut batch = shared.options.batch_size;
    loop {
        let Some(mut lease) = shared
            .retrying("lease a chunk", || lease_chunk(shared))
            .await?
        else {
            let left = shared
                .retrying("count the chunks left", || {
                    unfinished_chunks(&shared.db, shared.run.id)
                })
                .await?;
            if left == 0 {
                return Ok(());
            }
            // Others hold the rest; wait in case a lease expires (its holder died).
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            wait_for_replicas(shared).await?;
            let started = Instant::now();
            let span = tracing::info_span!(
                "twintrack.backfill.batch",
                "otel.name" = format!("backfill batch {}", shared.def.name),
                "twintrack.migration" = %shared.def.name,
                "twintrack.backfill.chunk" = lease.chunk,
                "twintrack.backfill.batch_size" = batch,
                "twintrack.backfill.rows" = tracing::field::Empty,
            );
            let Some(done) = shared
                .retrying("copy a batch", || copy_batch(shared, copier, &lease, batch))
                .instrument(span.clone())
                .await?
            else {
                break; // the lease was lost to another worker
            };
            span.record("twintrack.backfill.rows", done.rows);
            let took = started.elapsed();
            shared.rows.fetch_add(done.rows, Ordering::Relaxed);
            shared.keys.fetch_add(done.keys, Ordering::Relaxed);
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared.stats.backfill(shared.run.id, done.keys, done.rows);
            shared.metrics.get().backfill_rows.add(
                done.rows,
                &[
                    KeyValue::new("migration", shared.def.name.clone()),
                    KeyValue::new("direction", shared.options.direction.as_str()),
                ],
            );
            batch = tune(batch, took, shared.options.target_batch_time);
            throttle(shared, done.keys, took).await;
            report(shared, batch, false).await;
            if done.chunk_done {
                break;
            }
            lease.next_key = done.upto;
            lease.batches += 1;
        }
    }
}

impl Shared {
    /// `op`, retried through transient errors ([`retry::retrying`]), each retry counted in
    /// `twintrack.backfill.retries` by reason. Any other error stops the run.
    async fn retrying<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let counted = |reason: &'static str| {
            self.metrics.get().backfill_retries.add(
                1,
                &[
                    KeyValue::new("migration", self.def.name.clone()),
                    KeyValue::new("reason", reason),
                ],
            );
        };
        retry::retrying(
            &format!("backfill of {:?}: {what}", self.def.name),
            counted,
            op,
        )
        .await
    }
}

/// How long a batch waits for a row lock before giving up (and retrying): shorter than
/// PostgreSQL's `deadlock_timeout` (1 s by default), so in a lock cycle with the service's
/// own transaction the batch is the one to step back, not the service.
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '500ms'";

/// Leases the next chunk not done and not leased (or whose lease expired).
async fn lease_chunk(shared: &Shared) -> Result<Option<Lease>> {
    let db = &shared.db;
    let now = now_micros();
    let until = now + i64::try_from(shared.options.lease.as_micros()).unwrap_or(i64::MAX / 2);
    let mut tx = db.begin().await?;
    let pick = match db.backend() {
        Backend::Postgres => {
            "SELECT chunk, next_key, hi, batches FROM twintrack_backfill_chunks
             WHERE run_id = $1 AND done_at IS NULL AND (owner IS NULL OR leased_until < $2)
             ORDER BY chunk LIMIT 1 FOR UPDATE SKIP LOCKED"
        }
        // MariaDB 10.6 and MySQL 8 skip locked rows too.
        Backend::MySql => {
            "SELECT chunk, next_key, hi, batches FROM twintrack_backfill_chunks
             WHERE run_id = $1 AND done_at IS NULL AND (owner IS NULL OR leased_until < $2)
             ORDER BY chunk LIMIT 1 FOR UPDATE SKIP LOCKED"
        }
        Backend::Sqlite => {
            "SELECT chunk, next_key, hi, batches FROM twintrack_backfill_chunks
             WHERE run_id = $1 AND done_at IS NULL AND (owner IS NULL OR leased_until < $2)
             ORDER BY chunk LIMIT 1"
        }
    };
    let Some(row) = query(pick)
        .bind(shared.run.id)
        .bind(now)
        .fetch_optional(&mut tx)
        .await?
    else {
        tx.commit().await?;
        return Ok(None);
    };
    let lease = Lease {
        chunk: row.get("chunk")?,
        next_key: stored_key(row.get("next_key")?, &shared.kinds)?,
        hi: stored_key(row.get("hi")?, &shared.kinds)?,
        batches: row.get("batches")?,
    };
    query(
        "UPDATE twintrack_backfill_chunks SET owner = $1, leased_until = $2 WHERE run_id = $3 AND chunk = $4",
    )
    .bind(&shared.owner)
    .bind(until)
    .bind(shared.run.id)
    .bind(lease.chunk)
    .execute(&mut tx)
    .await?;
    tx.commit().await?;
    Ok(Some(lease))
}

/// What one committed batch did.
struct Batch {
    /// The last key covered.
    upto: Option<DynKey>,
    /// Source keys walked.
    keys: u64,
    /// Rows the copy wrote.
    rows: u64,
    /// The chunk has no keys left.
    chunk_done: bool,
}

/// One batch in one transaction: lock the source rows, copy them, move the checkpoint. `None`
/// if the lease was lost.
async fn copy_batch(
    shared: &Shared,
    copier: &Copier,
    lease: &Lease,
    batch: u32,
) -> Result<Option<Batch>> {
    let db = &shared.db;
    let direction = shared.options.direction;
    if let Copier::Keys(copier) = copier {
        source_has_every_write(shared, copier.target()).await?;
    }
    let (table, key) = shared.def.source(direction);
    let lock = match (db.backend(), copier) {
        (Backend::Postgres, _) if shared.options.unsafe_no_row_locks => "",
        // Two databases: the batch's copy and a dual write's copy of one key must not run at
        // once (two replacements of a one-to-many key would both insert); FOR NO KEY UPDATE
        // conflicts with the share lock each copy takes, FOR SHARE does not.
        (Backend::Postgres, Copier::Keys(_)) => " FOR NO KEY UPDATE",
        (Backend::Postgres, Copier::Sql) => " FOR SHARE",
        // SQLite: BEGIN IMMEDIATE holds the database's write lock for the whole batch.
        (Backend::Sqlite, _) => "",
        (Backend::MySql, _) => " LOCK IN SHARE MODE",
    };
    let remaining = KeyRange::after_upto(lease.next_key.clone(), lease.hi.clone());
    let p = keyset::predicate(key, &remaining, 1);
    let limit = p.args.len() + 1;
    let columns = keyset::order_by(key);
    let select = format!(
        "SELECT {columns} FROM {table} WHERE {} ORDER BY {columns} LIMIT ${limit}{lock}",
        p.sql
    );
    // PostgreSQL: one snapshot for the whole batch. The copy statement then sees the batch's
    // rows as the keys' SELECT did: a row inserted into the range after that (dual-written
    // already) is neither copied stale nor brought back, and a row changed under the copy
    // makes it fail with a serialization failure, retried. Two-database copies read each key
    // under its lock instead, as of now.
    let mut tx = match (db.backend(), copier) {
        (Backend::Postgres, Copier::Sql) if !shared.options.unsafe_no_row_locks => {
            db.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ")
                .await?
        }
        // Two databases: the copy locks keys and then reads rows with plain selects, which
        // must see the latest committed rows (`Database::begin_read_committed`).
        (_, Copier::Keys(_)) => db.begin_read_committed().await?,
        _ => db.begin().await?,
    };
    if db.backend() == Backend::Postgres {
        query(LOCK_TIMEOUT).execute(&mut tx).await?;
    }
    // MySQL, one database: only the batch's last key is read (`LIMIT 1 OFFSET batch - 1`).
    // The scan to it takes the same shared next-key locks on every row of the batch as reading
    // them all would, and the copy reads the rows itself; the keys need not travel. Not for the
    // first batch of a run (a definition's `$1` needs the first key) nor a short last batch
    // (its keys are counted), which read every key.
    let last_only = if db.backend() == Backend::MySql
        && matches!(copier, Copier::Sql)
        && lease.next_key.is_some()
    {
        let boundary = format!(
            "SELECT {columns} FROM {table} WHERE {} ORDER BY {columns} LIMIT 1 OFFSET ${limit}{lock}",
            p.sql
        );
        bound(Query::assert_safe(boundary), p.args.clone())
            .bind(i64::from(batch) - 1)
            .fetch_optional(&mut tx)
            .await?
            .map(|row| row_key(row, &shared.kinds))
            .transpose()?
    } else {
        None
    };
    let keys: Vec<DynKey> = if last_only.is_some() {
        Vec::new()
    } else {
        bound(Query::assert_safe(select), p.args)
            .bind(i64::from(batch))
            .fetch_all(&mut tx)
            .await?
            .into_iter()
            .map(|row| row_key(row, &shared.kinds))
            .collect::<Result<_>>()?
    };
    if let Some(hook) = &shared.options.before_copy {
        (hook.0)().await;
    }
    // A full batch ends at its last key; a short one covers the rest of the chunk.
    let walked = if last_only.is_some() {
        batch as usize
    } else {
        keys.len()
    };
    let full = walked == batch as usize;
    let upto = if full {
        last_only.or_else(|| keys.last().cloned())
    } else {
        lease.hi.clone()
    };
    let chunk_done = !full || (upto.is_some() && upto == lease.hi);
    let range = KeyRange::after_upto(lease.next_key.clone(), upto.clone());
    let rows = match copier {
        Copier::Keys(copier) => {
            // The stage must not move authority to the target while the batch runs: held.
            let _stage_held = hold_stage(shared, &mut tx).await?;
            // The last batch of the run also walks the target's keys above the source's
            // largest at start, to remove those the source lost.
            let range = if shared.open_ended && chunk_done && lease.hi == shared.run.upper {
                KeyRange::after_upto(lease.next_key.clone(), None)
            } else {
                range
            };
            copier.copy(tx.conn(), &keys, &range).await?
        }
        Copier::Sql if walked == 0 => 0,
        Copier::Sql => {
            // `$1`/`$2` definitions need a lower integer bound: the batch starts at its first key.
            let range = match (&range.lower, keys.first()) {
                (Lower::Unbounded, Some(first)) => KeyRange {
                    lower: Lower::From(first.clone()),
                    ..range
                },
                _ => range,
            };
            let what = match direction {
                Direction::Forward => "copy",
                Direction::Reverse => "reverse_copy",
            };
            let statement = shared
                .def
                .copy_statement(direction, &shared.kinds, &range)?;
            // `$1` bound below every bigint (a batch starting at i64::MIN): SQL that casts `$1`
            // to an integer type cannot take it.
            let below_every_bigint = matches!(statement.args.first(), Some(Value::F64(_)));
            statement
                .execute(&mut tx)
                .await
                .map_err(|e| match e {
                    // Transient: retried as it is (`Shared::retrying`).
                    e if retry::transient(&e).is_some() => e,
                    e if below_every_bigint => Error::Config(format!(
                        "migration {:?}: the {what} SQL fails on the batch starting at {} (its $1 is bound below every bigint there, which SQL casting $1 to an integer type cannot take: {}); write the batch predicate as {{batch}}",
                        shared.def.name,
                        range_start(&range),
                        crate::definition::error_message(&e)
                    )),
                    Error::Database(source) => Error::Statement {
                        what: format!(
                            "migration {:?}: the {what} SQL failed on the batch after {} up to {}",
                            shared.def.name,
                            lease
                                .next_key
                                .as_ref()
                                .map_or("the first key".into(), |k| k.to_string()),
                            upto.as_ref()
                                .map_or("the last key".into(), |k| k.to_string()),
                        ),
                        source,
                    },
                    other => other,
                })?
        }
    };
    let done = Batch {
        upto,
        keys: walked as u64,
        rows,
        chunk_done,
    };
    if finish_batch(shared, tx, lease, &done).await? {
        Ok(Some(done))
    } else {
        Ok(None)
    }
}

/// How long a two-database batch waits for the repair intents that keep its source from
/// holding every acknowledged write ([`source_has_every_write`]).
const INTENTS_WAIT: Duration = Duration::from_secs(30);

/// Two databases: before a batch reads its source, waits (up to [`INTENTS_WAIT`]) until no
/// repair intent in the target's database targets the source: each stands for a write
/// acknowledged while the target was written first that the source has not received yet,
/// which the batch would overwrite with the source's older rows. The service's repair worker
/// (or a read of the key) settles them. Checked before the batch locks its rows, which the
/// settling copies need. [`Error::Precondition`] if they stay.
async fn source_has_every_write(shared: &Shared, target: &Database) -> Result<()> {
    let (name, source) = (&shared.def.name, shared.options.direction.source());
    match crate::dual::await_intents_targeting(target, name, source, INTENTS_WAIT).await? {
        0 => Ok(()),
        pending => Err(crate::dual::intents_pending_error(
            target,
            name,
            source,
            pending,
            &format!("the {} backfill", shared.options.direction.as_str()),
        )),
    }
}

/// Two databases: reads the migration's stage for a batch and holds it there until the batch
/// commits (PostgreSQL: the flag row `FOR SHARE`, in the batch's own transaction when the flag
/// rows live in the source database, else in a transaction returned to be dropped after the
/// batch; SQLite: in the batch's transaction, whose write lock holds the file, or read as it
/// is). A stage change waits for the batch. [`Error::Precondition`] when the target side is
/// now the one written first: the batch could remove rows it holds that the source has not
/// received yet.
async fn hold_stage(shared: &Shared, tx: &mut Tx) -> Result<Option<Tx>> {
    let Some(flags_db) = &shared.flags_db else {
        return Ok(None);
    };
    let sql = match flags_db.backend() {
        Backend::Postgres => "SELECT stage FROM twintrack_flags WHERE migration = $1 FOR SHARE",
        Backend::Sqlite => "SELECT stage FROM twintrack_flags WHERE migration = $1",
        Backend::MySql => {
            "SELECT stage FROM twintrack_flags WHERE migration = $1 LOCK IN SHARE MODE"
        }
    };
    let (stage, guard): (String, Option<Tx>) = if flags_db.same_database(&shared.db) {
        (
            query(sql).bind(&shared.def.name).scalar(&mut *tx).await?,
            None,
        )
    } else {
        let mut guard = flags_db.begin_with("BEGIN").await?;
        let stage = query(sql).bind(&shared.def.name).scalar(&mut guard).await?;
        (stage, Some(guard))
    };
    let stage: Stage = stage.parse()?;
    let direction = shared.options.direction;
    if stage.plan().writes[0] == direction.source().other() {
        return Err(Error::Precondition(format!(
            "the stage of {:?} moved to {stage} during the {} backfill: the target shape is written first now, so a batch across two databases could remove rows it holds that the source has not received yet; run it again in a stage where the source is written first",
            shared.def.name,
            direction.as_str()
        )));
    }
    Ok(guard)
}

/// Moves the chunk's checkpoint in the batch's transaction and commits it, if the lease is
/// still ours (no other worker committed a batch of the chunk since we read it).
async fn finish_batch(shared: &Shared, mut tx: Tx, lease: &Lease, done: &Batch) -> Result<bool> {
    let now = now_micros();
    let until = now + i64::try_from(shared.options.lease.as_micros()).unwrap_or(i64::MAX / 2);
    let moved = query(
        "UPDATE twintrack_backfill_chunks
         SET next_key = $1, rows_copied = rows_copied + $2, keys_done = keys_done + $3,
             batches = batches + 1, leased_until = $4, done_at = $5
         WHERE run_id = $6 AND chunk = $7 AND owner = $8 AND batches = $9",
    )
    .bind(done.upto.as_ref().map(DynKey::to_text))
    .bind(i64::try_from(done.rows).unwrap_or(i64::MAX))
    .bind(i64::try_from(done.keys).unwrap_or(i64::MAX))
    .bind(until)
    .bind(if done.chunk_done { Some(now) } else { None })
    .bind(shared.run.id)
    .bind(lease.chunk)
    .bind(&shared.owner)
    .bind(lease.batches)
    .execute(&mut tx)
    .await?;
    if moved == 0 {
        // Another worker took the chunk over (our lease expired): undo, leave it to them.
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// The first key of `range`, for messages.
fn range_start(range: &KeyRange) -> String {
    match &range.lower {
        Lower::Unbounded => "the first key".into(),
        Lower::From(k) => k.to_string(),
        Lower::After(k) => format!("the key after {k}"),
    }
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

/// Sleeps as long as the rate cap asks for after walking `keys` in `took`.
async fn throttle(shared: &Shared, keys: u64, took: Duration) {
    let Some(rate) = shared.options.rate else {
        return;
    };
    let per_worker = rate / shared.options.workers as f64;
    let should_take = Duration::from_secs_f64(keys as f64 / per_worker);
    if should_take > took {
        tokio::time::sleep(should_take - took).await;
    }
}

/// What the lag watch sees.
#[derive(Debug, PartialEq)]
enum LagView {
    /// Every standby that should be watched has a replay lag figure; the largest, in ms, and
    /// whose it is.
    Seen { lag_ms: i64, whose: String },
    /// Nothing is expected to replicate and nothing streams: nothing to wait for.
    NothingToWatch,
    /// A standby that should be watched has no lag figure: why.
    Blind(String),
}

/// What `max_lag` watches, read now: the primary's `pg_stat_replication` (the replay lag of
/// each streaming standby) and `pg_replication_slots`, and each replica in
/// [`BackfillOptions::replicas`] directly (its replay position against the primary's, and the
/// age of its last replayed transaction: [`ReplicaSet`](crate::ryw::ReplicaSet)'s poll).
///
/// Blind, never healthy, when a standby is expected but has no figure: an inactive replication
/// slot (its standby is disconnected while the slot holds WAL for it), slots but no streaming
/// standby (or a role that cannot see `pg_stat_replication`'s columns: it needs `pg_monitor`),
/// or a replica given by URL that cannot be polled or is not replaying.
///
/// MySQL and MariaDB: the primary lists its connected replicas (`SHOW SLAVE HOSTS`) but not
/// their lag, which only each replica reports (`SHOW ALL SLAVES STATUS`:
/// `Seconds_Behind_Master` and the GTID gap); so every connected replica must be given in
/// [`BackfillOptions::replicas`], else the view is blind.
async fn lag_view(shared: &Shared) -> Result<LagView> {
    let (mut view, gone) = match shared.db.backend() {
        Backend::MySql => (replicas_connected(shared).await, None),
        _ => standbys_streaming(shared).await?,
    };
    if matches!(view, LagView::Blind(_)) {
        return Ok(view);
    }
    if let Some(replicas) = &shared.options.replicas {
        replicas.poll_all().await;
        for (index, health) in replicas.health().into_iter().enumerate() {
            let name = replicas.replica(index).describe();
            let Some(lag) = health.lag else {
                return Ok(LagView::Blind(format!(
                    "replica {name} has no lag figure: {}",
                    health.problem.unwrap_or_else(|| "not polled yet".into())
                )));
            };
            // Behind in bytes with no replayed transaction to date it (just restarted, say):
            // a lag of 0 ms would be a guess.
            if lag.is_zero() && health.lag_bytes.is_some_and(|b| b > 0) {
                return Ok(LagView::Blind(format!(
                    "replica {name} is {} {} behind and has no lag in time to measure it by",
                    health.lag_bytes.unwrap_or(0),
                    match shared.db.backend() {
                        Backend::MySql => "transactions",
                        _ => "bytes",
                    }
                )));
            }
            let lag_ms = i64::try_from(lag.as_millis()).unwrap_or(i64::MAX);
            view = match view {
                LagView::Seen { lag_ms: seen, .. } if seen >= lag_ms => view,
                _ => LagView::Seen {
                    lag_ms,
                    whose: format!("replica {name}"),
                },
            };
        }
    }
    if let Some(gone) = gone {
        return Ok(LagView::Blind(gone));
    }
    Ok(view)
}

/// MySQL: blind when the primary has a replica connected (`SHOW SLAVE HOSTS`, by
/// `Server_id`) that is not one of those given to read the lag on (each one's `@@server_id`),
/// or cannot list them; else nothing to watch beyond the replicas given.
async fn replicas_connected(shared: &Shared) -> LagView {
    let connected = match query("SHOW SLAVE HOSTS").fetch_all(&shared.db).await {
        Ok(rows) => rows
            .iter()
            .filter_map(|row| row.get::<i64>("Server_id").ok())
            .collect::<Vec<i64>>(),
        Err(e) => {
            return LagView::Blind(format!(
                "the primary's replicas cannot be listed (SHOW SLAVE HOSTS needs REPLICATION MASTER ADMIN): {e}"
            ));
        }
    };
    let mut given = Vec::new();
    if let Some(replicas) = &shared.options.replicas {
        for index in 0..replicas.len() {
            // One that cannot answer is reported by its own poll, below.
            if let Ok(id) = query("SELECT CAST(@@server_id AS SIGNED)")
                .scalar::<i64>(replicas.replica(index))
                .await
            {
                given.push(id);
            }
        }
    }
    let unwatched: Vec<String> = connected
        .iter()
        .filter(|id| !given.contains(id))
        .map(i64::to_string)
        .collect();
    if unwatched.is_empty() {
        LagView::NothingToWatch
    } else {
        LagView::Blind(format!(
            "replica(s) with server_id {} connected to the primary (SHOW SLAVE HOSTS) but not given to read the lag on: a MariaDB or MySQL replica reports its lag only itself, so give each one (--replica-url)",
            unwatched.join(", ")
        ))
    }
}

/// PostgreSQL: the primary's view of its streaming standbys (or blind), and a reason to be
/// blind later if standbys seen streaming earlier in the run are gone.
async fn standbys_streaming(shared: &Shared) -> Result<(LagView, Option<String>)> {
    let row = query(
        "SELECT
            (SELECT COUNT(*) FROM pg_stat_replication WHERE state = 'streaming') AS streaming,
            (SELECT CAST(COALESCE(MAX(EXTRACT(EPOCH FROM replay_lag) * 1000), 0) AS BIGINT)
               FROM pg_stat_replication) AS lag_ms,
            (SELECT COALESCE(application_name, '') || '@' || COALESCE(CAST(client_addr AS TEXT), 'local')
               FROM pg_stat_replication ORDER BY replay_lag DESC NULLS LAST LIMIT 1) AS laggard,
                        (SELECT string_agg(COALESCE(application_name, '?') || ' (' || COALESCE(state, 'state unreadable: grant pg_monitor') || ')', ', ')
               FROM pg_stat_replication WHERE state IS DISTINCT FROM 'streaming' AND state IS DISTINCT FROM 'backup') AS not_streaming,
            (SELECT COUNT(*) FROM pg_replication_slots WHERE slot_type = 'physical') AS slots,
            (SELECT string_agg(slot_name, ', ' ORDER BY slot_name)
               FROM pg_replication_slots WHERE slot_type = 'physical' AND NOT active) AS inactive",
    )
    .fetch_one(&shared.db)
    .await?;
    let streaming: i64 = row.get("streaming")?;
    let slots: i64 = row.get("slots")?;
    if let Some(inactive) = row.get::<Option<String>>("inactive")? {
        return Ok((
            LagView::Blind(format!(
                "physical replication slot {inactive} is inactive: its standby is not connected, so its lag cannot be read (drop the slot if that standby is gone for good)"
            )),
            None,
        ));
    }
    // A standby connected but not streaming (catching up, or a role that cannot read its
    // state) has no lag figure to trust.
    if let Some(which) = row.get::<Option<String>>("not_streaming")? {
        return Ok((
            LagView::Blind(format!("standby {which} is connected but not streaming")),
            None,
        ));
    }
    // A standby that streamed earlier in this run and is gone now is still expected (one
    // without a slot leaves no other trace).
    // (Named after the replicas given by URL, whose own reason is more telling.)
    let seen = shared.standbys_seen.fetch_max(streaming, Ordering::Relaxed);
    let gone = (streaming < seen).then(|| {
        format!(
            "{} of the {seen} standbys streaming earlier in this run are gone from pg_stat_replication (restart the backfill to stop expecting them)",
            seen - streaming
        )
    });
    let view = if streaming > 0 {
        LagView::Seen {
            lag_ms: row.get("lag_ms")?,
            whose: format!(
                "standby {}",
                row.get::<Option<String>>("laggard")?.unwrap_or_default()
            ),
        }
    } else if slots > 0 {
        LagView::Blind(format!(
            "{slots} replication slot(s) but no standby streaming in pg_stat_replication (or this role cannot see it: grant pg_monitor)"
        ))
    } else {
        LagView::NothingToWatch
    };
    Ok((view, gone))
}

/// Waits while a standby's replay lag is above the limit, or while a standby that should be
/// watched shows no lag figure at all ([`lag_view`]): a throttle that cannot see pauses, and
/// says why. PostgreSQL, MySQL (the options were checked when the run started).
async fn wait_for_replicas(shared: &Shared) -> Result<()> {
    let Some(max_lag) = shared.options.max_lag else {
        return Ok(());
    };
    let limit_ms = i64::try_from(max_lag.as_millis()).unwrap_or(i64::MAX);
    let mut paused_since: Option<Instant> = None;
    loop {
        let view = shared
            .retrying("read replica lag", || lag_view(shared))
            .await?;
        let why = match view {
            LagView::Seen { lag_ms, .. } if lag_ms <= limit_ms => None,
            LagView::Seen { lag_ms, whose } => Some(format!(
                "{whose} replays {lag_ms} ms behind, over --max-lag-ms {limit_ms}"
            )),
            LagView::NothingToWatch => {
                if !shared.nothing_to_watch.swap(true, Ordering::Relaxed) {
                    tracing::warn!(migration = %shared.def.name,
                        "max lag set, but no standby streams and none is expected (no replication slot, no replica given): nothing to wait for");
                }
                None
            }
            LagView::Blind(why) => Some(format!("no replica lag figure: {why}")),
        };
        let Some(why) = why else {
            if let Some(since) = paused_since {
                let paused = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                shared.paused_micros.fetch_add(paused, Ordering::Relaxed);
                shared.paused_now.store(false, Ordering::Relaxed);
                tracing::info!(migration = %shared.def.name, "replica lag readable and under the limit; backfill resumes");
            }
            return Ok(());
        };
        if paused_since.is_none() {
            paused_since = Some(Instant::now());
            shared.paused_now.store(true, Ordering::Relaxed);
            shared
                .metrics
                .get()
                .backfill_pauses
                .add(1, &[KeyValue::new("migration", shared.def.name.clone())]);
            tracing::info!(migration = %shared.def.name, reason = %why, "backfill paused");
        }
        *shared
            .pause_reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(why);
        report(shared, shared.options.batch_size, true).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn report(shared: &Shared, batch: u32, paused: bool) {
    let Ok(totals) = chunk_totals(&shared.db, shared.run.id).await else {
        return;
    };
    let total = u64::try_from(shared.run.keys_total).unwrap_or(0);
    let secs = shared.started.elapsed().as_secs_f64();
    let rate = shared.keys.load(Ordering::Relaxed) as f64 / secs.max(1e-3);
    let eta = (rate > 0.0).then(|| total.saturating_sub(totals.keys_done) as f64 / rate);
    (shared.progress)(&Progress {
        rows_copied: totals.rows_copied,
        keys_done: totals.keys_done,
        keys_total: total,
        chunks_done: totals.chunks_done,
        chunks: totals.chunks,
        keys_per_second: rate,
        eta_seconds: eta,
        paused: paused || shared.paused_now.load(Ordering::Relaxed),
        pause_reason: if paused || shared.paused_now.load(Ordering::Relaxed) {
            shared
                .pause_reason
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone()
        } else {
            None
        },
        batch_size: batch,
    });
}

/// What a run's chunks add up to.
struct ChunkTotals {
    keys_done: u64,
    rows_copied: u64,
    chunks: u64,
    chunks_done: u64,
}

/// The 64-bit integer type a `CAST` names (`SUM` of integers is `numeric`/`DECIMAL`).
fn integer_type(db: &Database) -> &'static str {
    match db.backend() {
        Backend::MySql => "SIGNED",
        _ => "BIGINT",
    }
}

async fn chunk_totals(db: &Database, run: i64) -> Result<ChunkTotals> {
    let int = integer_type(db);
    let row = Query::assert_safe(format!(
        "SELECT CAST(COALESCE(SUM(keys_done), 0) AS {int}) AS keys_done,
                CAST(COALESCE(SUM(rows_copied), 0) AS {int}) AS copied, COUNT(*) AS chunks,
                CAST(COALESCE(SUM(CASE WHEN done_at IS NULL THEN 0 ELSE 1 END), 0) AS {int}) AS done
         FROM twintrack_backfill_chunks WHERE run_id = $1"
    ))
    .bind(run)
    .fetch_one(db)
    .await?;
    let count =
        |column: &str| -> Result<u64> { Ok(u64::try_from(row.get::<i64>(column)?).unwrap_or(0)) };
    Ok(ChunkTotals {
        keys_done: count("keys_done")?,
        rows_copied: count("copied")?,
        chunks: count("chunks")?,
        chunks_done: count("done")?,
    })
}

async fn unfinished_chunks(db: &Database, run: i64) -> Result<i64> {
    query("SELECT COUNT(*) FROM twintrack_backfill_chunks WHERE run_id = $1 AND done_at IS NULL")
        .bind(run)
        .scalar(db)
        .await
}

/// Marks the run finished once every chunk is done and records the evidence (once).
async fn finish_run(shared: &Shared, flags: &dyn FlagStore) -> Result<bool> {
    if unfinished_chunks(&shared.db, shared.run.id).await? > 0 {
        return Ok(false);
    }
    let marked = query(
        "UPDATE twintrack_backfill_runs SET finished_at = $1 WHERE id = $2 AND finished_at IS NULL",
    )
    .bind(now_micros())
    .bind(shared.run.id)
    .execute(&shared.db)
    .await?;
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
    /// The run covers keys above this one (canonical key text; `None`: from the first key).
    pub lower_bound: Option<String>,
    /// … up to and including this one (`None`: to the last).
    pub upper_bound: Option<String>,
    /// Source keys walked so far.
    pub keys_done: i64,
    /// Source keys in the run (counted when it started).
    pub keys_total: i64,
    /// Rows copied so far.
    pub rows_copied: i64,
    /// When it started (µs).
    pub started_at: i64,
    /// When it finished (µs); `None` while open. `Some(0)`: abandoned.
    pub finished_at: Option<i64>,
}

/// The newest run of `migration` in each direction.
pub async fn latest_runs(db: &Database, migration: &str) -> Result<Vec<RunStatus>> {
    let int = integer_type(db);
    let rows = Query::assert_safe(format!(
        "SELECT r.id, r.direction, r.lower_bound, r.upper_bound, r.started_at, r.finished_at, r.rows_total,
                CAST(COALESCE(SUM(c.keys_done), 0) AS {int}) AS done,
                CAST(COALESCE(SUM(c.rows_copied), 0) AS {int}) AS copied
         FROM twintrack_backfill_runs r LEFT JOIN twintrack_backfill_chunks c ON c.run_id = r.id
         WHERE r.migration = $1 AND r.id IN (
             SELECT MAX(id) FROM twintrack_backfill_runs WHERE migration = $1 GROUP BY direction)
         GROUP BY r.id, r.direction, r.lower_bound, r.upper_bound, r.started_at, r.finished_at, r.rows_total
         ORDER BY r.direction"
    ))
    .bind(migration)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(RunStatus {
                run_id: row.get("id")?,
                direction: row.get("direction")?,
                lower_bound: row.get("lower_bound")?,
                upper_bound: row.get("upper_bound")?,
                keys_done: row.get("done")?,
                keys_total: row.get("rows_total")?,
                rows_copied: row.get("copied")?,
                started_at: row.get("started_at")?,
                finished_at: row.get("finished_at")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_hold_at_least_the_minimum_and_stay_within_the_maximum_count() {
        assert_eq!(rows_per_chunk(0), MIN_CHUNK_ROWS);
        assert_eq!(rows_per_chunk(1_000_000), MIN_CHUNK_ROWS);
        assert_eq!(rows_per_chunk(10_000_000), 39_063);
        assert!(10_000_000 / rows_per_chunk(10_000_000) < MAX_CHUNKS);
    }

    #[test]
    fn batch_sizes_move_toward_the_target_time_at_most_twofold() {
        let target = Duration::from_millis(200);
        assert_eq!(tune(1000, Duration::from_millis(100), target), 2000);
        assert_eq!(tune(1000, Duration::from_millis(400), target), 500);
        assert_eq!(tune(1000, Duration::from_secs(10), target), 500);
        assert_eq!(tune(1000, Duration::ZERO, target), 2000);
        assert_eq!(tune(10, Duration::from_secs(10), target), 10);
        assert_eq!(tune(100_000, Duration::from_millis(1), target), 100_000);
    }
}
