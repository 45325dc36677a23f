//! Verify: prove both shapes hold the same data, or say exactly where they differ.
//!
//! The key range of both projections is cut into segments. Each segment is summarised on both
//! sides by its row count and a 64-bit order-independent hash of its rows (the XOR of each
//! row's hash: PostgreSQL computes `bit_xor(hashtextextended(row::text, 0))` in the database;
//! SQLite's rows are hashed here). Equal summaries mean equal segments. A differing segment is
//! bisected until its parts are small, then compared row by row: `missing_in_new`,
//! `missing_in_legacy`, or `different` with the differing columns. Every difference is looked at
//! once more after a short delay, so a write in flight between the two sides' reads is not
//! reported. A clean verify is recorded as evidence for the stage gates, at its start time.
//!
//! With `repair`, each difference is re-synced from the authoritative side: the definition's
//! `copy` (or `reverse_copy`) for that one key, or a delete of a new-side row whose legacy row
//! is gone. Rows the legacy side has and an authoritative new side lacks are reported, never
//! deleted (a legacy row usually holds more than the migrated columns).

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Column, Row};

use crate::db::{Backend, Database, now_micros};
use crate::definition::{MigrationDef, Resynced, db_message, resync_key};
use crate::flags::{EvidenceKind, FlagStore};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How a verify runs.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Segments the key range is cut into. Default 64.
    pub segments: usize,
    /// Segments summarised at once (one connection each). Default 4.
    pub parallel: usize,
    /// Delay before a difference is looked at again. Default 200 ms.
    pub recheck_delay: Duration,
    /// Re-sync the differences from the authoritative side.
    pub repair: bool,
    /// Who runs it (recorded with the evidence).
    pub actor: String,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        VerifyOptions {
            segments: 64,
            parallel: 4,
            recheck_delay: Duration::from_millis(200),
            repair: false,
            actor: "twintrack verify".into(),
        }
    }
}

/// A row that differs between the shapes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Different {
    /// The key.
    pub key: i64,
    /// The columns whose values differ.
    pub columns: Vec<String>,
}

/// What a verify found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The migration.
    pub migration: String,
    /// No differences left (after re-checks, and repairs if asked).
    pub clean: bool,
    /// Rows in the legacy projection.
    pub legacy_rows: u64,
    /// Rows in the new projection.
    pub new_rows: u64,
    /// Segments compared.
    pub segments: usize,
    /// Segments whose summaries differed.
    pub differing_segments: usize,
    /// Keys the legacy side has and the new side lacks.
    pub missing_in_new: Vec<i64>,
    /// Keys the new side has and the legacy side lacks.
    pub missing_in_legacy: Vec<i64>,
    /// Keys on both sides with different values.
    pub different: Vec<Different>,
    /// Differences that were gone when looked at again (writes in flight).
    pub in_flight: usize,
    /// Keys re-synced by `repair`.
    pub repaired: Vec<i64>,
    /// Wall time.
    pub elapsed_seconds: f64,
}

impl VerifyReport {
    /// Every difference, one per line, for people.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(
            self.missing_in_new
                .iter()
                .map(|k| format!("missing_in_new {k}")),
        );
        out.extend(
            self.missing_in_legacy
                .iter()
                .map(|k| format!("missing_in_legacy {k}")),
        );
        out.extend(
            self.different
                .iter()
                .map(|d| format!("different {} ({})", d.key, d.columns.join(", "))),
        );
        out
    }
}

/// A segment's summary on one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Summary {
    rows: u64,
    hash: i64,
}

/// Below this many rows a differing range is compared row by row.
const ROW_COMPARE: u64 = 512;

struct Ctx {
    db: Database,
    legacy: String,
    new: String,
    name: String,
    limit: Arc<tokio::sync::Semaphore>,
}

/// Verifies `def` (both projections) on `db`; see the [module docs](self).
pub async fn run(
    db: &Database,
    flags: &dyn FlagStore,
    def: &MigrationDef,
    options: VerifyOptions,
    metrics: Metrics,
) -> Result<VerifyReport> {
    if options.segments == 0 || options.segments > 100_000 {
        return Err(Error::InvalidInput(
            "segments must be between 1 and 100000".into(),
        ));
    }
    if options.parallel == 0 || options.parallel > 64 {
        return Err(Error::InvalidInput(
            "parallel must be between 1 and 64".into(),
        ));
    }
    let started = Instant::now();
    let started_at = now_micros();
    let (legacy, new) = def.projections()?;
    let record = flags.get(&def.name).await?;
    def.check(db).await?;
    let ctx = Arc::new(Ctx {
        db: db.clone(),
        legacy: legacy.to_owned(),
        new: new.to_owned(),
        name: def.name.clone(),
        limit: Arc::new(tokio::sync::Semaphore::new(options.parallel)),
    });
    let (lower, upper) = bounds(&ctx).await?;
    let span = (upper - lower).max(0);
    let segments = (options.segments as i64).clamp(1, span.max(1));
    let width = (span + segments - 1) / segments;
    let mut tasks = tokio::task::JoinSet::new();
    let mut lo = lower;
    while lo < upper {
        let hi = (lo + width).min(upper);
        let ctx = ctx.clone();
        tasks.spawn(async move { compare_range(ctx, lo, hi, true).await });
        lo = hi;
    }
    let mut found = Found::default();
    let mut segment_count = 0;
    while let Some(done) = tasks.join_next().await {
        let part = done.map_err(|e| Error::InvalidInput(format!("a verify task died: {e}")))??;
        segment_count += 1;
        found.merge(part);
    }
    // A second look at every difference: gone now means a write was in flight.
    let mut in_flight = 0;
    if !found.rows.is_empty() {
        tokio::time::sleep(options.recheck_delay).await;
        let mut confirmed = BTreeMap::new();
        for (key, kind) in std::mem::take(&mut found.rows) {
            match compare_key(&ctx, key).await? {
                None => in_flight += 1,
                Some(kind_now) => {
                    let _ = kind;
                    confirmed.insert(key, kind_now);
                }
            }
        }
        found.rows = confirmed;
    }
    let mut repaired = Vec::new();
    if options.repair && !found.rows.is_empty() {
        let stage = record.state.stage;
        let authoritative = stage.plan().writes[0];
        for &key in found.rows.keys() {
            if resync(db, def, key, authoritative).await? {
                repaired.push(key);
            }
        }
        let mut still = BTreeMap::new();
        for (key, kind) in std::mem::take(&mut found.rows) {
            match compare_key(&ctx, key).await? {
                None => {}
                Some(now) => {
                    let _ = kind;
                    still.insert(key, now);
                }
            }
        }
        found.rows = still;
    }
    let clean = found.rows.is_empty();
    let mut report = VerifyReport {
        migration: def.name.clone(),
        clean,
        legacy_rows: found.legacy_rows,
        new_rows: found.new_rows,
        segments: segment_count,
        differing_segments: found.differing_segments,
        missing_in_new: Vec::new(),
        missing_in_legacy: Vec::new(),
        different: Vec::new(),
        in_flight,
        repaired,
        elapsed_seconds: 0.0,
    };
    for (key, kind) in found.rows {
        match kind {
            Kind::MissingInNew => report.missing_in_new.push(key),
            Kind::MissingInLegacy => report.missing_in_legacy.push(key),
            Kind::Different(columns) => report.different.push(Different { key, columns }),
        }
    }
    let result = if clean { "clean" } else { "divergent" };
    metrics.verify_runs.add(
        1,
        &[
            KeyValue::new("migration", def.name.clone()),
            KeyValue::new("result", result),
        ],
    );
    if clean {
        flags
            .record_evidence(
                &def.name,
                EvidenceKind::VerifyClean,
                started_at,
                &options.actor,
            )
            .await?;
    }
    report.elapsed_seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    MissingInNew,
    MissingInLegacy,
    Different(Vec<String>),
}

#[derive(Default)]
struct Found {
    legacy_rows: u64,
    new_rows: u64,
    differing_segments: usize,
    rows: BTreeMap<i64, Kind>,
}

impl Found {
    fn merge(&mut self, other: Found) {
        self.legacy_rows += other.legacy_rows;
        self.new_rows += other.new_rows;
        self.differing_segments += other.differing_segments;
        self.rows.extend(other.rows);
    }
}

/// The key range `(lower, upper]` covering both projections.
async fn bounds(ctx: &Ctx) -> Result<(i64, i64)> {
    let mut lower = i64::MAX;
    let mut upper = i64::MIN;
    for proj in [&ctx.legacy, &ctx.new] {
        let sql = format!(
            "SELECT CAST(MIN(p.key) AS BIGINT) AS lo, CAST(MAX(p.key) AS BIGINT) AS hi FROM ({proj}) p"
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_one(ctx.db.pool())
            .await
            .map_err(|e| projection_error(&ctx.name, &e))?;
        if let (Some(lo), Some(hi)) = (
            row.try_get::<Option<i64>, _>("lo")?,
            row.try_get::<Option<i64>, _>("hi")?,
        ) {
            lower = lower.min(lo.saturating_sub(1));
            upper = upper.max(hi);
        }
    }
    if lower == i64::MAX {
        return Ok((0, 0)); // both empty
    }
    Ok((lower, upper))
}

fn projection_error(name: &str, e: &sqlx::Error) -> Error {
    Error::Config(format!(
        "migration {name:?}: a projection failed: {}",
        db_message(e)
    ))
}

type BoxedFound<'a> = Pin<Box<dyn Future<Output = Result<Found>> + Send + 'a>>;

/// Compares `(lo, hi]`: summaries first, then halves, then rows.
fn compare_range(ctx: Arc<Ctx>, lo: i64, hi: i64, top: bool) -> BoxedFound<'static> {
    Box::pin(async move {
        let (l, n) = {
            let _permit = ctx
                .limit
                .acquire()
                .await
                .map_err(|_| Error::InvalidInput("verify stopped".into()))?;
            tokio::try_join!(
                summarize(&ctx, &ctx.legacy, lo, hi),
                summarize(&ctx, &ctx.new, lo, hi)
            )?
        };
        let mut found = Found::default();
        if top {
            found.legacy_rows = l.rows;
            found.new_rows = n.rows;
        }
        if l == n {
            return Ok(found);
        }
        if top {
            found.differing_segments = 1;
        }
        if l.rows.max(n.rows) <= ROW_COMPARE || hi - lo <= 1 {
            let _permit = ctx
                .limit
                .acquire()
                .await
                .map_err(|_| Error::InvalidInput("verify stopped".into()))?;
            found.rows = compare_rows(&ctx, lo, hi).await?;
            return Ok(found);
        }
        let mid = lo + (hi - lo) / 2;
        let (a, b) = tokio::try_join!(
            compare_range(ctx.clone(), lo, mid, false),
            compare_range(ctx.clone(), mid, hi, false)
        )?;
        found.rows.extend(a.rows);
        found.rows.extend(b.rows);
        Ok(found)
    })
}

/// Count and order-independent hash of a projection's rows with key in `(lo, hi]`.
async fn summarize(ctx: &Ctx, proj: &str, lo: i64, hi: i64) -> Result<Summary> {
    match ctx.db.backend() {
        Backend::Postgres => {
            let sql = format!(
                "SELECT COUNT(*) AS n, CAST(COALESCE(bit_xor(hashtextextended(CAST(p AS TEXT), 0)), 0) AS BIGINT) AS h
                 FROM ({proj}) p WHERE p.key > $1 AND p.key <= $2"
            );
            let row = sqlx::query(AssertSqlSafe(sql))
                .bind(lo)
                .bind(hi)
                .fetch_one(ctx.db.pool())
                .await
                .map_err(|e| projection_error(&ctx.name, &e))?;
            Ok(Summary {
                rows: u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0),
                hash: row.try_get("h")?,
            })
        }
        Backend::Sqlite => {
            let rows = fetch_rows(ctx, proj, lo, hi).await?;
            let mut summary = Summary::default();
            for (_, doc) in rows {
                summary.rows += 1;
                summary.hash ^= fnv1a(doc.to_string().as_bytes()) as i64;
            }
            Ok(summary)
        }
    }
}

/// Each row of a projection with key in `(lo, hi]`, as a JSON object by column name.
async fn fetch_rows(ctx: &Ctx, proj: &str, lo: i64, hi: i64) -> Result<BTreeMap<i64, Value>> {
    let mut out = BTreeMap::new();
    match ctx.db.backend() {
        Backend::Postgres => {
            let sql = format!(
                "SELECT CAST(p.key AS BIGINT) AS k, CAST(row_to_json(p) AS TEXT) AS doc
                 FROM ({proj}) p WHERE p.key > $1 AND p.key <= $2"
            );
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(lo)
                .bind(hi)
                .fetch_all(ctx.db.pool())
                .await
                .map_err(|e| projection_error(&ctx.name, &e))?;
            for row in rows {
                let key: i64 = row.try_get("k")?;
                let doc: String = row.try_get("doc")?;
                let value = serde_json::from_str(&doc).unwrap_or(Value::String(doc));
                out.insert(key, value);
            }
        }
        Backend::Sqlite => {
            let sql = format!("SELECT * FROM ({proj}) p WHERE p.key > $1 AND p.key <= $2");
            let rows = sqlx::query(AssertSqlSafe(sql))
                .bind(lo)
                .bind(hi)
                .fetch_all(ctx.db.pool())
                .await
                .map_err(|e| projection_error(&ctx.name, &e))?;
            for row in rows {
                let doc = row_to_json(&row);
                let key = doc.get("key").and_then(Value::as_i64).ok_or_else(|| {
                    Error::Config(format!(
                        "migration {:?}: a projection's `key` is not an integer",
                        ctx.name
                    ))
                })?;
                out.insert(key, Value::Object(doc));
            }
        }
    }
    Ok(out)
}

/// An SQLite row as a JSON object, each value as SQLite stored it.
fn row_to_json(row: &AnyRow) -> Map<String, Value> {
    let mut doc = Map::new();
    for (i, column) in row.columns().iter().enumerate() {
        let value = if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
            v.map_or(Value::Null, Value::from)
        } else if let Ok(v) = row.try_get::<Option<f64>, _>(i) {
            v.map_or(Value::Null, Value::from)
        } else if let Ok(v) = row.try_get::<Option<String>, _>(i) {
            v.map_or(Value::Null, Value::from)
        } else if let Ok(v) = row.try_get::<Option<Vec<u8>>, _>(i) {
            v.map_or(Value::Null, |b| Value::from(format!("{b:02x?}")))
        } else {
            Value::Null
        };
        doc.insert(column.name().to_owned(), value);
    }
    doc
}

/// Row-by-row comparison of `(lo, hi]`.
async fn compare_rows(ctx: &Ctx, lo: i64, hi: i64) -> Result<BTreeMap<i64, Kind>> {
    let (legacy, new) = tokio::try_join!(
        fetch_rows(ctx, &ctx.legacy, lo, hi),
        fetch_rows(ctx, &ctx.new, lo, hi)
    )?;
    let mut out = BTreeMap::new();
    for (key, l) in &legacy {
        match new.get(key) {
            None => {
                out.insert(*key, Kind::MissingInNew);
            }
            Some(n) if n != l => {
                out.insert(*key, Kind::Different(differing_columns(l, n)));
            }
            Some(_) => {}
        }
    }
    for key in new.keys().filter(|k| !legacy.contains_key(k)) {
        out.insert(*key, Kind::MissingInLegacy);
    }
    Ok(out)
}

/// One key compared again: `None` when both sides agree now.
async fn compare_key(ctx: &Ctx, key: i64) -> Result<Option<Kind>> {
    Ok(compare_rows(ctx, key.saturating_sub(1), key)
        .await?
        .remove(&key))
}

fn differing_columns(l: &Value, n: &Value) -> Vec<String> {
    let (Value::Object(l), Value::Object(n)) = (l, n) else {
        return vec!["(row)".into()];
    };
    let mut columns: Vec<String> = l
        .iter()
        .filter(|(k, v)| n.get(*k) != Some(*v))
        .map(|(k, _)| k.clone())
        .chain(n.keys().filter(|k| !l.contains_key(*k)).cloned())
        .collect();
    columns.sort();
    columns.dedup();
    columns
}

/// FNV-1a, 64-bit: a fixed, portable row hash for SQLite's client-side summaries.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Re-syncs one key from the authoritative side ([`resync_key`]). Returns whether it changed
/// something.
async fn resync(
    db: &Database,
    def: &MigrationDef,
    key: i64,
    authoritative: crate::Side,
) -> Result<bool> {
    let mut conn = db.pool().acquire().await?;
    let mut tx = sqlx::Connection::begin_with(&mut *conn, db.backend().begin_write()).await?;
    let outcome = resync_key(&mut tx, def, key, authoritative).await?;
    tx.commit().await?;
    Ok(outcome != Resynced::LeftAlone)
}
