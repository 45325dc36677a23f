//! Verify: prove both shapes hold the same data, or say exactly where they differ.
//!
//! The key space is cut into segments at keys taken from the legacy table's key index (every
//! N-th key, so segments hold the same number of rows whatever the keys look like). Each
//! segment is summarised on both sides by its row count and an order-independent 64-bit hash
//! of its rows: the sum of each row's hash, so that a row present twice counts twice (a
//! bit-xor would cancel duplicates out). PostgreSQL computes every segment's summary in one
//! pass per side, `width_bucket` placing each row in its segment, with
//! `hash_record_extended(row, 0)` (PostgreSQL 14 and later, when every column's type has an
//! extended hash function; otherwise `hashtextextended(row::text, 0)`, about twice the cost);
//! SQLite's rows are hashed here (FNV-1a of the row as JSON).
//! Equal summaries mean equal segments. A differing segment is cut again at keys taken from
//! its own rows and its pieces compared the same way, until a piece holds at most
//! [`ROW_COMPARE`] rows (or a single key); then rows are compared key by key, each key's rows
//! as a multiset: `missing_in_new`, `missing_in_legacy`, or `different` with the columns that
//! differ. Every difference is looked at once more after a short delay, so a write in flight
//! between the two sides' reads is not reported.
//!
//! A verify is **clean** only when no key differs *and* every segment whose summaries differed
//! was explained by keys found in it: a segment that differs with no differing key to show for
//! it (looked at twice) is reported and keeps the verify from being clean. A clean verify is
//! recorded as evidence for the stage gates, at its start time.
//!
//! With `repair`, each difference is re-synced from the authoritative side
//! ([`resync_key`]): the definition's `copy` (or `reverse_copy`) for that one key, or a delete
//! of the new side's rows of a key the legacy side no longer has. Rows the legacy side has and
//! an authoritative new side lacks are reported, never deleted (a legacy row usually holds more
//! than the migrated columns).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::db::{Backend, Database, Query, Row, Value, now_micros};
use crate::definition::{MigrationDef, Resynced, bound, projection_key_columns, resync_key};
use crate::flags::{BoxFuture, EvidenceKind, FlagStore};
use crate::key::{DynKey, KeyKind};
use crate::keyset::{self, KeyRange, Lower, Upper};
use crate::metrics::Metrics;
use crate::retry;
use crate::{Error, Result};

/// How a verify runs.
#[derive(Clone, Debug)]
pub struct VerifyOptions {
    /// Segments the key space is cut into (1 to 10,000). Default 64.
    pub segments: usize,
    /// Range comparisons run at once (each holds one connection per side). Default 4.
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

/// A key whose rows differ between the shapes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Different {
    /// The key.
    pub key: DynKey,
    /// The columns whose values differ (`(rows)` when each column's values agree as a
    /// multiset but the rows pair them differently).
    pub columns: Vec<String>,
}

/// What a verify found.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The migration.
    pub migration: String,
    /// No differences left (after re-checks, and repairs if asked), and every differing
    /// segment explained.
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
    pub missing_in_new: Vec<DynKey>,
    /// Keys the new side has and the legacy side lacks.
    pub missing_in_legacy: Vec<DynKey>,
    /// Keys on both sides with different rows.
    pub different: Vec<Different>,
    /// Segments whose summaries still differed with no differing key found in them.
    pub unexplained_segments: usize,
    /// Legacy projection rows whose key (or a part of it) is `NULL`: no key range holds them,
    /// so they cannot be compared; any keeps the verify from being clean.
    pub legacy_null_keys: u64,
    /// The same for the new projection.
    pub new_null_keys: u64,
    /// Differences that were gone when looked at again (writes in flight).
    pub in_flight: usize,
    /// Keys re-synced by `repair`.
    pub repaired: Vec<DynKey>,
    /// Wall time, in seconds.
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
        for (side, n) in [
            ("legacy", self.legacy_null_keys),
            ("new", self.new_null_keys),
        ] {
            if n > 0 {
                out.push(format!(
                    "{n} {side} projection rows have a NULL key and cannot be compared (not clean)"
                ));
            }
        }
        if self.unexplained_segments > 0 {
            out.push(format!(
                "{} segments differ in count or hash with no differing key found (not clean)",
                self.unexplained_segments
            ));
        }
        out
    }
}

/// A range's summary on one side.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Summary {
    rows: u64,
    /// The sum of the rows' hashes, as decimal text (PostgreSQL's exact `numeric` sum; SQLite's
    /// sum modulo 2^64).
    hash: String,
}

/// At most this many rows in a differing range are compared row by row.
pub const ROW_COMPARE: u64 = 512;
/// A differing range is cut into this many pieces to look further.
const FANOUT: u64 = 16;
/// The most segments a verify cuts the key space into.
const MAX_SEGMENTS: usize = 10_000;

/// How PostgreSQL hashes a projection's row; the same on both sides of one verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowHash {
    /// `hash_record_extended(p, 0)`: each column by its type's own hash function.
    Record,
    /// `hashtextextended(CAST(p AS TEXT), 0)`: the row's text.
    Text,
}

impl RowHash {
    fn sql(self) -> &'static str {
        match self {
            RowHash::Record => "hash_record_extended(p, 0)",
            RowHash::Text => "hashtextextended(CAST(p AS TEXT), 0)",
        }
    }
}

struct Ctx {
    db: Database,
    hash: RowHash,
    def: MigrationDef,
    kinds: Vec<KeyKind>,
    legacy: String,
    new: String,
    /// The projections' key columns, qualified by `p`.
    key: Vec<String>,
    /// The same, as the column names rows carry (`key`, `key1`, …).
    key_names: Vec<String>,
    /// `p."key" IS NULL OR …`: a row no key range can hold.
    null_key: String,
    limit: tokio::sync::Semaphore,
    metrics: Metrics,
}

/// Verifies `def` (both projections) on `db`; see the [module docs](self).
pub async fn run(
    db: &Database,
    flags: &dyn FlagStore,
    def: &MigrationDef,
    options: VerifyOptions,
    metrics: Metrics,
) -> Result<VerifyReport> {
    run_keys(db, flags, def, options, metrics, None).await
}

/// Verifies only `keys` (each compared as a whole), or everything when `None`. A verify of
/// chosen keys is never recorded as evidence.
pub async fn run_keys(
    db: &Database,
    flags: &dyn FlagStore,
    def: &MigrationDef,
    options: VerifyOptions,
    metrics: Metrics,
    keys: Option<&[String]>,
) -> Result<VerifyReport> {
    if options.segments == 0 || options.segments > MAX_SEGMENTS {
        return Err(Error::InvalidInput(format!(
            "segments must be between 1 and {MAX_SEGMENTS}"
        )));
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
    let kinds = def.check(db).await?;
    let chosen = keys
        .map(|keys| {
            keys.iter()
                .map(|k| DynKey::parse(k, &kinds))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    let hash = row_hash(db, legacy, new).await;
    let ctx = Arc::new(Ctx {
        db: db.clone(),
        hash,
        def: def.clone(),
        key: keyset::qualified(&projection_key_columns(kinds.len()), Some("p")),
        key_names: projection_key_columns(kinds.len())
            .iter()
            .map(|c| c.replace('"', ""))
            .collect(),
        null_key: keyset::qualified(&projection_key_columns(kinds.len()), Some("p"))
            .iter()
            .map(|c| format!("{c} IS NULL"))
            .collect::<Vec<_>>()
            .join(" OR "),
        kinds,
        legacy: legacy.to_owned(),
        new: new.to_owned(),
        limit: tokio::sync::Semaphore::new(options.parallel),
        metrics: metrics.clone(),
    });
    let mut found = match &chosen {
        None => compare_everything(&ctx, options.segments).await?,
        Some(keys) => {
            let mut found = Found::default();
            for key in keys {
                found.rows.extend(compare_key(&ctx, key).await?);
            }
            found
        }
    };
    // A second look at every difference: gone now means a write was in flight.
    let mut in_flight = 0;
    if !found.rows.is_empty() || !found.unexplained.is_empty() {
        tokio::time::sleep(options.recheck_delay).await;
        let mut confirmed = BTreeMap::new();
        for key in std::mem::take(&mut found.rows).into_keys() {
            match compare_key(&ctx, &key).await?.remove(&key) {
                None => in_flight += 1,
                Some(kind) => {
                    confirmed.insert(key, kind);
                }
            }
        }
        found.rows = confirmed;
        let mut still = Vec::new();
        for range in std::mem::take(&mut found.unexplained) {
            let again = compare_range(ctx.clone(), range.clone(), None).await?;
            if again.rows.is_empty() && again.unexplained.is_empty() {
                // Equal now: a write was in flight.
                in_flight += 1;
            } else if again.rows.is_empty() {
                still.push(range);
            } else {
                found.rows.extend(again.rows);
            }
        }
        found.unexplained = still;
    }
    let mut repaired = Vec::new();
    if options.repair && !found.rows.is_empty() {
        let stage = record.state.stage;
        let authoritative = stage.plan().writes[0];
        for key in found.rows.keys() {
            let mut tx = db.begin().await?;
            let outcome = resync_key(tx.conn(), def, &ctx.kinds, key, authoritative).await?;
            tx.commit().await?;
            if outcome != Resynced::LeftAlone {
                repaired.push(key.clone());
            }
        }
        let mut still = BTreeMap::new();
        for key in std::mem::take(&mut found.rows).into_keys() {
            if let Some(kind) = compare_key(&ctx, &key).await?.remove(&key) {
                still.insert(key, kind);
            }
        }
        found.rows = still;
    }
    let clean = found.rows.is_empty()
        && found.unexplained.is_empty()
        && found.legacy_null_keys == 0
        && found.new_null_keys == 0;
    let mut report = VerifyReport {
        migration: def.name.clone(),
        clean,
        legacy_rows: found.legacy_rows,
        new_rows: found.new_rows,
        segments: found.segments,
        differing_segments: found.differing_segments,
        missing_in_new: Vec::new(),
        missing_in_legacy: Vec::new(),
        different: Vec::new(),
        unexplained_segments: found.unexplained.len(),
        legacy_null_keys: found.legacy_null_keys,
        new_null_keys: found.new_null_keys,
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
    if clean && chosen.is_none() {
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

/// [`RowHash::Record`] when both projections' columns are of the same types, in the same order,
/// and every type's equality means identical values (integers, booleans, UUIDs, text under a
/// deterministic collation, bytes, dates and timestamps, and arrays of them), so that a type's
/// hash cannot call two different stored values equal (`numeric` `1.0` and `1.00`, `citext`,
/// a case-insensitive collation would); and the server has `hash_record_extended`
/// (PostgreSQL 14). Else [`RowHash::Text`], which hashes the row's text.
async fn row_hash(db: &Database, legacy: &str, new: &str) -> RowHash {
    if db.backend() != Backend::Postgres {
        return RowHash::Text;
    }
    let (Some(l), Some(n)) = (column_types(db, legacy).await, column_types(db, new).await) else {
        return RowHash::Text;
    };
    if l != n || !l.iter().all(|(_, exact)| *exact) {
        return RowHash::Text;
    }
    for proj in [legacy, new] {
        let probe = format!("SELECT hash_record_extended(p, 0) FROM ({proj}) p LIMIT 1");
        if Query::assert_safe(probe).fetch_all(db).await.is_err() {
            return RowHash::Text;
        }
    }
    RowHash::Record
}

/// Each output column of `proj`: its type and whether that type's equality means identical
/// values. Read from the catalog through a temporary view, in a transaction rolled back.
async fn column_types(db: &Database, proj: &str) -> Option<Vec<(i64, bool)>> {
    let mut tx = db.begin().await.ok()?;
    Query::assert_safe(format!("CREATE TEMP VIEW twintrack_probe AS {proj}"))
        .execute(&mut tx)
        .await
        .ok()?;
    let rows = crate::db::query(
        "SELECT CAST(a.atttypid AS BIGINT) AS typ,
                CAST(COALESCE(e.typname, t.typname) AS TEXT) AS base,
                COALESCE(c.collisdeterministic, TRUE) AS deterministic
         FROM pg_attribute a
         JOIN pg_type t ON t.oid = a.atttypid
         LEFT JOIN pg_type e ON t.typcategory = 'A' AND e.oid = t.typelem
         LEFT JOIN pg_collation c ON c.oid = a.attcollation
         WHERE a.attrelid = to_regclass('pg_temp.twintrack_probe') AND a.attnum > 0
         ORDER BY a.attnum",
    )
    .fetch_all(&mut tx)
    .await
    .ok()?;
    let _ = tx.rollback().await;
    const EXACT: &[&str] = &[
        "int2",
        "int4",
        "int8",
        "bool",
        "uuid",
        "text",
        "varchar",
        "bytea",
        "date",
        "timestamp",
        "timestamptz",
    ];
    rows.iter()
        .map(|row| {
            let typ: i64 = row.get("typ").ok()?;
            let base: String = row.get("base").ok()?;
            let deterministic: bool = row.get("deterministic").ok()?;
            Some((typ, deterministic && EXACT.contains(&base.as_str())))
        })
        .collect()
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
    legacy_null_keys: u64,
    new_null_keys: u64,
    segments: usize,
    differing_segments: usize,
    rows: BTreeMap<DynKey, Kind>,
    /// Ranges whose summaries differed with no differing key found in them.
    unexplained: Vec<KeyRange>,
}

impl Found {
    fn merge(&mut self, other: Found) {
        self.rows.extend(other.rows);
        self.unexplained.extend(other.unexplained);
    }
}

/// The whole key space: segments cut at the legacy table's keys, summarised on both sides,
/// differing ones looked into.
async fn compare_everything(ctx: &Arc<Ctx>, segments: usize) -> Result<Found> {
    let cuts = match sampled_cuts(ctx, segments).await {
        Some(cuts) => cuts,
        None => {
            let (table, key) = ctx.def.shape(crate::Side::Legacy);
            let total: i64 = Query::assert_safe(format!("SELECT COUNT(*) FROM {table}"))
                .run_on(ctx)
                .await?
                .first()
                .map_or(Ok(0), |row| row.get_at(0))?;
            cuts_of(
                ctx,
                &format!("SELECT {} FROM {table}", named(key)),
                None,
                u64::try_from(total).unwrap_or(0),
                segments as u64,
            )
            .await?
        }
    };
    let mut found = compare_pieces(ctx.clone(), KeyRange::all(), cuts, true).await?;
    found.segments = found.segments.max(1);
    Ok(found)
}

/// PostgreSQL: segment cuts from a sample of the legacy table's keys (`TABLESAMPLE SYSTEM`,
/// about a hundred keys a segment), read in a few milliseconds where numbering every key would
/// take a pass over the whole key index. The segments come out about even; even is all verify
/// needs of them (its bisection cuts at exact row counts). `None` (then the exact way) on
/// SQLite, for a table without statistics yet, or when sampling fails (a view, say).
async fn sampled_cuts(ctx: &Ctx, segments: usize) -> Option<Vec<DynKey>> {
    if ctx.db.backend() != Backend::Postgres || segments < 2 {
        return None;
    }
    let (table, key) = ctx.def.shape(crate::Side::Legacy);
    let rows: f64 = crate::db::query(
        "SELECT CAST(reltuples AS DOUBLE PRECISION) FROM pg_class WHERE oid = to_regclass($1)",
    )
    .bind(table)
    .scalar::<Option<f64>>(&ctx.db)
    .await
    .ok()??;
    if rows < 1.0 {
        return None;
    }
    let wanted = (segments * 100) as f64;
    let percent = (100.0 * wanted / rows).clamp(0.01, 100.0);
    let columns = keyset::order_by(key);
    let sample: Vec<DynKey> = Query::assert_safe(format!(
        "SELECT {columns} FROM {table} TABLESAMPLE SYSTEM ({percent}) ORDER BY {columns}"
    ))
    .fetch_all(&ctx.db)
    .await
    .ok()?
    .into_iter()
    .map(|row| crate::backfill::row_key(row, &ctx.kinds))
    .collect::<Result<_>>()
    .ok()?;
    let step = sample.len().div_ceil(segments).max(1);
    let mut cuts: Vec<DynKey> = sample.into_iter().skip(step).step_by(step).collect();
    cuts.dedup();
    Some(cuts)
}

/// Compares `range`: cut at keys of its own rows, summarised, differing pieces looked into.
/// `sizes` is how many rows each side holds in it (legacy, new), when known.
fn compare_range(
    ctx: Arc<Ctx>,
    range: KeyRange,
    sizes: Option<(u64, u64)>,
) -> BoxFuture<'static, Result<Found>> {
    Box::pin(async move {
        let (legacy_rows, new_rows) = match sizes {
            Some(sizes) => sizes,
            None => {
                let ((l, _), (n, _)) = tokio::try_join!(
                    summarize(&ctx, &ctx.legacy, &range, &[]),
                    summarize(&ctx, &ctx.new, &range, &[])
                )?;
                if l == n {
                    return Ok(Found::default());
                }
                (l[0].rows, n[0].rows)
            }
        };
        let rows = legacy_rows.max(new_rows);
        if rows <= ROW_COMPARE {
            return compare_rows_found(&ctx, &range).await;
        }
        // Cut at the keys of the side with more rows in the range.
        let proj = if legacy_rows >= new_rows {
            &ctx.legacy
        } else {
            &ctx.new
        };
        let p = keyset::predicate(&ctx.key, &range, 1);
        let source = format!(
            "SELECT {} FROM ({proj}) p WHERE ({}) AND NOT ({})",
            named(&ctx.key),
            p.sql,
            ctx.null_key
        );
        let mut cuts = cuts_of(&ctx, &source, Some(p.args), rows, FANOUT).await?;
        // A cut at the range's own first key would leave one piece that is the whole range
        // again (one key holding most of the rows, in a one-to-many projection).
        if let Lower::From(first) = &range.lower {
            cuts.retain(|cut| cut != first);
        }
        if cuts.is_empty() {
            // Every row of the range has one key: compare that key's rows.
            return compare_rows_found(&ctx, &range).await;
        }
        compare_pieces(ctx, range, cuts, false).await
    })
}

async fn compare_rows_found(ctx: &Ctx, range: &KeyRange) -> Result<Found> {
    let rows = compare_rows(ctx, range).await?;
    let mut found = Found::default();
    if rows.is_empty() {
        found.unexplained.push(range.clone());
    }
    found.rows = rows;
    Ok(found)
}

/// Summarises the pieces of `range` between `cuts` on both sides and looks into each piece that
/// differs.
async fn compare_pieces(
    ctx: Arc<Ctx>,
    range: KeyRange,
    cuts: Vec<DynKey>,
    top: bool,
) -> Result<Found> {
    let ((l, legacy_null_keys), (n, new_null_keys)) = tokio::try_join!(
        summarize(&ctx, &ctx.legacy, &range, &cuts),
        summarize(&ctx, &ctx.new, &range, &cuts)
    )?;
    let pieces = pieces(&range, &cuts);
    let mut found = Found::default();
    if top {
        found.segments = pieces.len();
        found.legacy_rows = l.iter().map(|s| s.rows).sum();
        found.new_rows = n.iter().map(|s| s.rows).sum();
        found.legacy_null_keys = legacy_null_keys;
        found.new_null_keys = new_null_keys;
    }
    let mut tasks = tokio::task::JoinSet::new();
    for ((piece, l), n) in pieces.into_iter().zip(l).zip(n) {
        if l == n {
            continue;
        }
        if top {
            found.differing_segments += 1;
        }
        let ctx = ctx.clone();
        if piece == range {
            // Cutting made no progress (every cut outside the range's rows): compare its rows
            // rather than cut it again, forever.
            tasks.spawn(async move { compare_rows_found(&ctx, &piece).await });
        } else {
            tasks.spawn(compare_range(ctx, piece, Some((l.rows, n.rows))));
        }
    }
    while let Some(done) = tasks.join_next().await {
        let part = done.map_err(|e| Error::Internal(format!("a verify task died: {e}")))??;
        found.merge(part);
    }
    Ok(found)
}

/// The pieces of `range` between `cuts` (sorted keys inside it): `[lower, c1)`, `[c1, c2)`, …,
/// `[cn, upper]`.
fn pieces(range: &KeyRange, cuts: &[DynKey]) -> Vec<KeyRange> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut lower = range.lower.clone();
    for cut in cuts {
        out.push(KeyRange {
            lower,
            upper: Upper::Before(cut.clone()),
        });
        lower = Lower::From(cut.clone());
    }
    out.push(KeyRange {
        lower,
        upper: range.upper.clone(),
    });
    out
}

/// `key`'s columns selected as `twintrack_k1`, `twintrack_k2`, … (what [`cuts_of`] reads).
fn named(key: &[String]) -> String {
    key.iter()
        .enumerate()
        .map(|(i, k)| format!("{k} AS twintrack_k{}", i + 1))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keys that cut `total` rows of `source` (a `SELECT` of the key columns named by [`named`],
/// parameters `args`) into about `pieces` pieces of equal size: every step-th key in key
/// order, skipping the first row (each cut starts a piece).
async fn cuts_of(
    ctx: &Ctx,
    source: &str,
    args: Option<Vec<Value>>,
    total: u64,
    pieces: u64,
) -> Result<Vec<DynKey>> {
    let step = total.div_ceil(pieces.max(1)).max(1);
    if total <= step {
        return Ok(Vec::new());
    }
    let names: Vec<String> = (1..=ctx.kinds.len())
        .map(|i| format!("twintrack_k{i}"))
        .collect();
    let sql = format!(
        "SELECT {names} FROM (SELECT {names}, row_number() OVER (ORDER BY {names}) AS twintrack_rn
                              FROM ({source}) s1) s2
         WHERE (twintrack_rn - 1) % {step} = 0 AND twintrack_rn > 1 ORDER BY {names}",
        names = names.join(", "),
    );
    let mut cuts: Vec<DynKey> = bound(Query::assert_safe(sql), args.unwrap_or_default())
        .run_on(ctx)
        .await?
        .into_iter()
        .map(|row| crate::backfill::row_key(row, &ctx.kinds))
        .collect::<Result<_>>()?;
    // Rows sharing a key can put one key at two cuts (a one-to-many projection).
    cuts.dedup();
    Ok(cuts)
}

/// A projection that failed while verifying: the definition passed its check, so this is a
/// failure at run time (a value a cast rejects, a lost connection), not bad input.
fn projection_error(name: &str, e: Error) -> Error {
    match e {
        Error::Database(source) => Error::Statement {
            what: format!("migration {name:?}: a projection failed"),
            source,
        },
        Error::Internal(message) => Error::Internal(format!("migration {name:?}: {message}")),
        other => other,
    }
}

/// A verify's statements: run on its database, retried through transient errors (a lost
/// connection, a serialization failure; [`retry::retrying`]) and counted in
/// `twintrack.verify.retries`; a failure that remains is a projection failing at run time.
trait RunOn {
    async fn run_on(self, ctx: &Ctx) -> Result<Vec<Row>>;
}

impl RunOn for Query {
    async fn run_on(self, ctx: &Ctx) -> Result<Vec<Row>> {
        let counted = |reason: &'static str| {
            ctx.metrics.verify_retries.add(
                1,
                &[
                    KeyValue::new("migration", ctx.def.name.clone()),
                    KeyValue::new("reason", reason),
                ],
            );
        };
        retry::retrying(&format!("verify of {:?}", ctx.def.name), counted, || {
            self.clone().fetch_all(&ctx.db)
        })
        .await
        .map_err(|e| projection_error(&ctx.def.name, e))
    }
}

/// Count and order-independent hash of `proj`'s rows in each piece of `range` between `cuts`,
/// and how many rows the range's predicate let through with a `NULL` in their key (held by no
/// piece; counted for the whole key space, where the predicate lets every row through).
async fn summarize(
    ctx: &Ctx,
    proj: &str,
    range: &KeyRange,
    cuts: &[DynKey],
) -> Result<(Vec<Summary>, u64)> {
    let _permit = ctx
        .limit
        .acquire()
        .await
        .map_err(|_| Error::Internal("verify stopped".into()))?;
    match ctx.db.backend() {
        Backend::Postgres => {
            let p = keyset::predicate(&ctx.key, range, 1);
            let mut args = p.args;
            let bucket = if cuts.is_empty() {
                "0".to_owned()
            } else {
                let mut items = Vec::with_capacity(cuts.len());
                for cut in cuts {
                    let params: Vec<String> = cut
                        .parts()
                        .iter()
                        .map(|part| {
                            args.push(part.to_value());
                            format!("${}", args.len())
                        })
                        .collect();
                    items.push(match params.as_slice() {
                        [one] => one.clone(),
                        many => format!("ROW({})", many.join(", ")),
                    });
                }
                // Record values compare column types strictly: each key column is cast to the
                // type its thresholds are bound as (a `smallint` to `integer`, say).
                let operand = match ctx.key.as_slice() {
                    [one] => one.clone(),
                    many => format!(
                        "ROW({})",
                        many.iter()
                            .zip(&ctx.kinds)
                            .map(|(column, kind)| format!(
                                "CAST({column} AS {})",
                                kind.postgres_type()
                            ))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                // A scalar subquery: the array is built once (an InitPlan), not for every row
                // as a bare `ARRAY[$1, …]` of parameters would be.
                format!(
                    "width_bucket({operand}, (SELECT ARRAY[{}]))",
                    items.join(", ")
                )
            };
            let sql = format!(
                "SELECT CASE WHEN {} THEN -1 ELSE {bucket} END AS seg, COUNT(*) AS n,
                        CAST(COALESCE(SUM({}), 0) AS TEXT) AS h
                 FROM ({proj}) p WHERE {} GROUP BY 1",
                ctx.null_key,
                ctx.hash.sql(),
                p.sql
            );
            let rows = bound(Query::assert_safe(sql), args).run_on(ctx).await?;
            let mut out = vec![Summary::default(); cuts.len() + 1];
            for s in out.iter_mut() {
                s.hash = "0".into();
            }
            let mut null_keys = 0;
            for row in rows {
                let seg: i64 = row.get("seg")?;
                if seg == -1 {
                    null_keys = u64::try_from(row.get::<i64>("n")?).unwrap_or(0);
                    continue;
                }
                let slot = out
                    .get_mut(usize::try_from(seg).unwrap_or(usize::MAX))
                    .ok_or_else(|| Error::Internal(format!("width_bucket gave segment {seg}")))?;
                slot.rows = u64::try_from(row.get::<i64>("n")?).unwrap_or(0);
                slot.hash = row.get("h")?;
            }
            Ok((out, null_keys))
        }
        Backend::Sqlite => {
            let mut out = Vec::with_capacity(cuts.len() + 1);
            for piece in pieces(range, cuts) {
                let mut rows = 0u64;
                let mut hash = 0u64;
                for docs in fetch_rows(ctx, proj, &piece).await?.into_values() {
                    for doc in docs {
                        rows += 1;
                        hash = hash.wrapping_add(fnv1a(doc.to_string().as_bytes()));
                    }
                }
                out.push(Summary {
                    rows,
                    hash: hash.to_string(),
                });
            }
            if *range != KeyRange::all() {
                return Ok((out, 0));
            }
            let null_keys: i64 = Query::assert_safe(format!(
                "SELECT COUNT(*) FROM ({proj}) p WHERE {}",
                ctx.null_key
            ))
            .run_on(ctx)
            .await?
            .first()
            .map_or(Ok(0), |row| row.get_at(0))?;
            Ok((out, u64::try_from(null_keys).unwrap_or(0)))
        }
    }
}

/// Each key's rows of `proj` in `range`, as JSON objects by column name.
async fn fetch_rows(
    ctx: &Ctx,
    proj: &str,
    range: &KeyRange,
) -> Result<BTreeMap<DynKey, Vec<Json>>> {
    let p = keyset::predicate(&ctx.key, range, 1);
    let n = ctx.kinds.len();
    let mut out: BTreeMap<DynKey, Vec<Json>> = BTreeMap::new();
    match ctx.db.backend() {
        Backend::Postgres => {
            let sql = format!(
                "SELECT {}, CAST(row_to_json(p) AS TEXT) AS twintrack_doc FROM ({proj}) p WHERE ({}) AND NOT ({})",
                ctx.key.join(", "),
                p.sql,
                ctx.null_key
            );
            let rows = bound(Query::assert_safe(sql), p.args).run_on(ctx).await?;
            for row in rows {
                let mut values = row.into_values();
                let doc = values.pop().unwrap_or(Value::Null);
                let key = DynKey::from_values(values.into_iter().take(n), &ctx.kinds)?;
                let doc = match doc {
                    Value::Text(t) => serde_json::from_str(&t).unwrap_or(Json::String(t)),
                    other => other.to_json(),
                };
                out.entry(key).or_default().push(doc);
            }
        }
        Backend::Sqlite => {
            let sql = format!(
                "SELECT * FROM ({proj}) p WHERE ({}) AND NOT ({})",
                p.sql, ctx.null_key
            );
            let rows = bound(Query::assert_safe(sql), p.args).run_on(ctx).await?;
            let names = projection_key_columns(n);
            for row in rows {
                let key = key_of(&row, &names, &ctx.kinds)?;
                out.entry(key)
                    .or_default()
                    .push(Json::Object(row_to_json(&row)));
            }
        }
    }
    Ok(out)
}

/// The key columns (by name, `key` or `key1`…) of a projection's row.
fn key_of(row: &Row, names: &[String], kinds: &[KeyKind]) -> Result<DynKey> {
    let values = names
        .iter()
        .map(|n| row.get::<Value>(&n.replace('"', "")))
        .collect::<Result<Vec<_>>>()?;
    DynKey::from_values(values, kinds)
}

/// A row as a JSON object, each value as the database returned it.
fn row_to_json(row: &Row) -> Map<String, Json> {
    row.names()
        .zip(row.values())
        .map(|(name, value)| (name.to_owned(), value.to_json()))
        .collect()
}

/// Key-by-key comparison of `range`, each key's rows as a multiset.
async fn compare_rows(ctx: &Ctx, range: &KeyRange) -> Result<BTreeMap<DynKey, Kind>> {
    let _permit = ctx
        .limit
        .acquire()
        .await
        .map_err(|_| Error::Internal("verify stopped".into()))?;
    let (legacy, new) = tokio::try_join!(
        fetch_rows(ctx, &ctx.legacy, range),
        fetch_rows(ctx, &ctx.new, range)
    )?;
    let mut out = BTreeMap::new();
    for (key, l) in &legacy {
        match new.get(key) {
            None => {
                out.insert(key.clone(), Kind::MissingInNew);
            }
            Some(n) => {
                if let Some(columns) = differing(l, n, &ctx.key_names) {
                    out.insert(key.clone(), Kind::Different(columns));
                }
            }
        }
    }
    for key in new.keys().filter(|k| !legacy.contains_key(*k)) {
        out.insert(key.clone(), Kind::MissingInLegacy);
    }
    Ok(out)
}

/// One key compared again: empty when both sides agree now.
async fn compare_key(ctx: &Ctx, key: &DynKey) -> Result<BTreeMap<DynKey, Kind>> {
    compare_rows(ctx, &KeyRange::exactly(key.clone())).await
}

/// `None` when the two multisets of rows are equal; else the columns (other than the key's,
/// `keys`) whose multisets of values differ (`(rows)` when every column agrees but the rows
/// pair values differently).
fn differing(l: &[Json], n: &[Json], keys: &[String]) -> Option<Vec<String>> {
    let sorted = |rows: &[Json]| {
        let mut texts: Vec<String> = rows.iter().map(Json::to_string).collect();
        texts.sort();
        texts
    };
    if sorted(l) == sorted(n) {
        return None;
    }
    let mut names: Vec<&String> = l
        .iter()
        .chain(n)
        .filter_map(Json::as_object)
        .flat_map(Map::keys)
        .collect();
    names.sort();
    names.dedup();
    let column = |rows: &[Json], name: &str| {
        let mut values: Vec<String> = rows
            .iter()
            .map(|r| {
                r.get(name)
                    .map_or_else(|| "(absent)".to_owned(), Json::to_string)
            })
            .collect();
        values.sort();
        values
    };
    let columns: Vec<String> = names
        .into_iter()
        .filter(|name| !keys.contains(name) && column(l, name) != column(n, name))
        .cloned()
        .collect();
    Some(if columns.is_empty() {
        vec!["(rows)".to_owned()]
    } else {
        columns
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_compare_as_multisets_and_name_the_columns_that_differ() {
        let keys = ["key".to_owned()];
        let a = json!({"key": 1, "tag": "a"});
        let b = json!({"key": 1, "tag": "b"});
        assert_eq!(
            differing(&[a.clone(), b.clone()], &[b.clone(), a.clone()], &keys),
            None
        );
        // One row twice against once: the tag's multiset differs (the key's is not listed).
        assert_eq!(
            differing(std::slice::from_ref(&a), &[a.clone(), a.clone()], &keys),
            Some(vec!["tag".to_owned()])
        );
        // Duplicates on both sides that a bit-xor of row hashes would call equal.
        assert_eq!(
            differing(&[a.clone(), a.clone()], &[b.clone(), b.clone()], &keys),
            Some(vec!["tag".to_owned()])
        );
        assert_eq!(
            differing(std::slice::from_ref(&a), std::slice::from_ref(&b), &keys),
            Some(vec!["tag".to_owned()])
        );
        let x1 = json!({"k": 1, "u": "a", "v": "x"});
        let x2 = json!({"k": 1, "u": "b", "v": "y"});
        let y1 = json!({"k": 1, "u": "a", "v": "y"});
        let y2 = json!({"k": 1, "u": "b", "v": "x"});
        assert_eq!(
            differing(&[x1, x2], &[y1, y2], &["k".to_owned()]),
            Some(vec!["(rows)".to_owned()])
        );
    }

    #[test]
    fn pieces_cover_the_range_without_gaps_or_overlaps() {
        use crate::key::KeyPart;
        let k = |v| DynKey::single(KeyPart::BigInt(v));
        let all = pieces(&KeyRange::all(), &[k(5), k(9)]);
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].lower, Lower::Unbounded);
        assert_eq!(all[0].upper, Upper::Before(k(5)));
        assert_eq!(all[1].lower, Lower::From(k(5)));
        assert_eq!(all[2].upper, Upper::Unbounded);
        assert_eq!(pieces(&KeyRange::all(), &[]), vec![KeyRange::all()]);
    }
}
