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
//! MySQL and MariaDB (one database) hash in the database too, as pt-table-checksum does: the
//! first 64 bits of the `SHA1` of each row's canonical text
//! ([`row_checksum`](crate::db::mysql::row_checksum)), summed; each segment is its own range
//! scan on the key, all of a side's segments in one statement (so the segments cost one scan,
//! as the whole range would: there is no whole-range pass first), cut arithmetically between
//! the smallest and largest key when the key is one integer column.
//! SQLite's rows are hashed here (FNV-1a of the row as JSON).
//! On PostgreSQL the whole range is summarised first, as one plain aggregate per side (which
//! the server runs as a parallel scan, where the grouped one runs serially): when both
//! summaries agree there is nothing to cut, and a clean table costs one scan per side.
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
use serde_json::Value as Json;
use tracing::Instrument as _;

use crate::across::CrossCopier;
use crate::db::{Backend, Database, Query, Row, Value, now_micros};
use crate::definition::{
    Direction, MigrationDef, Resynced, bound, projection_key_columns, resync_key,
};
use crate::flags::{BoxFuture, EvidenceKind, FlagStore};
use crate::key::{DynKey, KeyKind, KeyPart};
use crate::keyset::{self, KeyRange, Lower, Upper};
use crate::metrics::Metrics;
use crate::retry;
use crate::{Error, Result, Side};

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
    /// Differing keys found past the first [`MAX_LISTED`], counted but not listed (nor looked
    /// at again, nor repaired); any keeps the verify from being clean.
    pub not_listed: u64,
    /// Keys re-synced by `repair`.
    pub repaired: Vec<DynKey>,
    /// Wall time, in seconds.
    pub elapsed_seconds: f64,
    /// How rows were hashed: `record` or `text` (PostgreSQL, in the database), `checksum`
    /// (MySQL, in the database) or `client` (streamed and hashed by twintrack).
    pub row_hash: &'static str,
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
        if self.not_listed > 0 {
            out.push(format!(
                "{} more differing keys not listed (the first {MAX_LISTED} are; not clean)",
                self.not_listed
            ));
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

/// At most this many differing keys are kept and listed (the largest ones are dropped first);
/// the rest are counted in [`VerifyReport::not_listed`], so a verify's memory does not grow
/// with the number of differences (a verify before any backfill, say).
pub const MAX_LISTED: usize = 100_000;

/// At most this many rows in a differing range are compared row by row.
pub const ROW_COMPARE: u64 = 512;
/// A differing range is cut into this many pieces to look further.
const FANOUT: u64 = 16;
/// The most segments a verify cuts the key space into.
const MAX_SEGMENTS: usize = 10_000;

/// How a projection's rows are hashed; the same on both sides of one verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RowHash {
    /// PostgreSQL, in the database: `hash_record_extended(p, 0)`, each column by its type's
    /// own hash function.
    Record,
    /// PostgreSQL, in the database: `hashtextextended(CAST(p AS TEXT), 0)`, the row's text.
    Text,
    /// Here: each row streamed in its canonical text ([`canonical`]) and hashed with FNV-1a
    /// (SQLite; two databases whose in-database hashes cannot be proved the same).
    Client,
    /// MySQL, in the database: [`row_checksum`](crate::db::mysql::row_checksum) over each projection's own columns.
    Checksum,
}

impl RowHash {
    /// Its name in a [`VerifyReport`].
    fn name(self) -> &'static str {
        match self {
            RowHash::Record => "record",
            RowHash::Text => "text",
            RowHash::Client => "client",
            RowHash::Checksum => "checksum",
        }
    }
}

struct Ctx {
    /// The legacy shape's database.
    legacy_db: Database,
    /// The new shape's database: the same as `legacy_db`, or another one.
    new_db: Database,
    hash: RowHash,
    /// Each side's row hash expression over `p` (legacy, new); unused for [`RowHash::Client`].
    hash_sql: [String; 2],
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

impl Ctx {
    /// `side`'s database and projection.
    fn side(&self, side: Side) -> (&Database, &str) {
        match side {
            Side::Legacy => (&self.legacy_db, &self.legacy),
            Side::New => (&self.new_db, &self.new),
        }
    }

    /// `side`'s row hash expression over `p`.
    fn hash_sql(&self, side: Side) -> &str {
        match side {
            Side::Legacy => &self.hash_sql[0],
            Side::New => &self.hash_sql[1],
        }
    }
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
    run_across(db, db, flags, def, options, metrics, keys).await
}

/// [`run_keys`] with each shape in its own database: the legacy projection runs on `legacy`,
/// the new one on `new` (the same database as `legacy`, or another one). Across two
/// databases, both PostgreSQL of one major version and encoding whose projections' columns
/// all have exact types, each database hashes its own rows (`hash_record_extended`, as in one
/// database); otherwise rows are streamed in their canonical text and hashed here. Either
/// way a side is never held in memory: summaries are per segment, and rows are read only for
/// the few hundred of a differing piece. `--repair` copies through the definition's
/// `copy_select` (see [`crate::across`]). The evidence opens the gates as in one database.
#[tracing::instrument(
    name = "twintrack.verify",
    skip_all,
    fields(
        otel.name = %format!("verify {}", def.name),
        twintrack.migration = %def.name,
        twintrack.verify.result = tracing::field::Empty,
    )
)]
pub async fn run_across(
    legacy_db: &Database,
    new_db: &Database,
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
    let across = !legacy_db.same_database(new_db);
    let started = Instant::now();
    let started_at = now_micros();
    let (legacy, new) = def.projections()?;
    let record = flags.get(&def.name).await?;
    let kinds = if across {
        let kinds = def.key_kinds_across(legacy_db, new_db).await?;
        check_projection(legacy_db, def, "legacy_projection", legacy, kinds.len()).await?;
        check_projection(new_db, def, "new_projection", new, kinds.len()).await?;
        kinds
    } else {
        def.check(legacy_db).await?
    };
    let chosen = keys
        .map(|keys| {
            keys.iter()
                .map(|k| DynKey::parse(k, &kinds))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    // Across two databases, repairs copy with `copy_select`: proved before anything runs.
    let authoritative = record.state.stage.plan().writes[0];
    let copier = if across && options.repair {
        let (direction, source, target) = match authoritative {
            Side::Legacy => (Direction::Forward, legacy_db, new_db),
            Side::New => (Direction::Reverse, new_db, legacy_db),
        };
        Some(CrossCopier::new(def, &kinds, direction, source, target).await?)
    } else {
        None
    };
    let (hash, hash_sql) = row_hash(legacy_db, new_db, legacy, new).await;
    let qualified = keyset::qualified(&projection_key_columns(kinds.len()), Some("p"));
    let ctx = Arc::new(Ctx {
        legacy_db: legacy_db.clone(),
        new_db: new_db.clone(),
        hash,
        hash_sql,
        def: def.clone(),
        key_names: projection_key_columns(kinds.len())
            .iter()
            .map(|c| c.replace('"', ""))
            .collect(),
        null_key: qualified
            .iter()
            .map(|c| format!("{c} IS NULL"))
            .collect::<Vec<_>>()
            .join(" OR "),
        key: qualified,
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
                found.merge(compare_rows_found(&ctx, &KeyRange::exactly(key.clone())).await?);
            }
            // A chosen key that agrees is no unexplained difference.
            found.unexplained.clear();
            found
        }
    };
    // A second look at every piece where something differed: its summaries equal now means
    // a write was in flight. The whole piece is looked at again, not only the keys found in
    // it, so a difference the row comparison could not name still keeps the verify unclean.
    let mut in_flight = 0;
    if !found.rows.is_empty() || !found.unexplained.is_empty() {
        tokio::time::sleep(options.recheck_delay).await;
        let before = std::mem::take(&mut found.rows);
        let unexplained = std::mem::take(&mut found.unexplained);
        let leaves = std::mem::take(&mut found.leaves);
        let again = look_again(&ctx, &leaves, &unexplained, &before).await?;
        in_flight = before
            .keys()
            .filter(|k| !again.found.rows.contains_key(*k))
            .count()
            + again.settled_unexplained;
        found.merge(again.found);
    }
    let mut repaired = Vec::new();
    if options.repair && !found.rows.is_empty() && across {
        // The authoritative side is the source of every repair: it must hold every
        // acknowledged write (two databases: no intent waits to bring one to it).
        let other = match authoritative {
            Side::Legacy => new_db,
            Side::New => legacy_db,
        };
        let pending = crate::dual::await_intents_targeting(
            other,
            &def.name,
            authoritative,
            Duration::from_secs(30),
        )
        .await?;
        if pending > 0 {
            return Err(crate::dual::intents_pending_error(
                other,
                &def.name,
                authoritative,
                pending,
                "the repairs",
            ));
        }
    }
    if options.repair && !found.rows.is_empty() {
        for key in found.rows.keys() {
            // The side to copy from is the one written first now: if the stage moved since
            // the verify began, its findings no longer say which way to copy.
            let now = flags.get(&def.name).await?.state.stage.plan().writes[0];
            if now != authoritative {
                return Err(Error::Precondition(format!(
                    "the stage of {:?} moved while verifying; run `twintrack verify {} --repair` again",
                    def.name, def.name
                )));
            }
            let outcome = match &copier {
                Some(copier) => {
                    let source = match authoritative {
                        Side::Legacy => legacy_db,
                        Side::New => new_db,
                    };
                    copier.resync_key(source, key).await?
                }
                None => {
                    let mut tx = legacy_db.begin().await?;
                    let outcome =
                        resync_key(tx.conn(), def, &ctx.kinds, key, authoritative).await?;
                    tx.commit().await?;
                    outcome
                }
            };
            if outcome != Resynced::LeftAlone {
                repaired.push(key.clone());
            }
        }
        // After the repairs, every piece that differed is compared again as a whole.
        let before = std::mem::take(&mut found.rows);
        let leaves = std::mem::take(&mut found.leaves);
        let unexplained = std::mem::take(&mut found.unexplained);
        let mut again = look_again(&ctx, &leaves, &unexplained, &before)
            .await?
            .found;
        // What still differs right after the repairs may be a write made since: one more look
        // after the delay, and only what differs both times stays.
        if !again.rows.is_empty() || !again.unexplained.is_empty() {
            tokio::time::sleep(options.recheck_delay).await;
            again = look_again(&ctx, &again.leaves, &again.unexplained, &again.rows)
                .await?
                .found;
        }
        found.merge(again);
    }
    let clean = found.rows.is_empty()
        && found.not_listed == 0
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
        not_listed: found.not_listed,
        repaired,
        elapsed_seconds: 0.0,
        row_hash: ctx.hash.name(),
    };
    for (key, kind) in found.rows {
        match kind {
            Kind::MissingInNew => report.missing_in_new.push(key),
            Kind::MissingInLegacy => report.missing_in_legacy.push(key),
            Kind::Different(columns) => report.different.push(Different { key, columns }),
        }
    }
    let result = if clean { "clean" } else { "divergent" };
    tracing::Span::current().record("twintrack.verify.result", result);
    metrics.get().verify_runs.add(
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

/// What a second look at some pieces found.
struct Again {
    found: Found,
    /// Unexplained pieces whose summaries are equal now.
    settled_unexplained: usize,
}

/// Compares `leaves` (pieces where the keys of `known` differed) and `unexplained` pieces
/// again from their summaries down. Of the keys that differ now, only those of `known` are
/// kept: a key that differs now and did not at the first look arrived in between (a write in
/// flight), for a later verify to see. A piece that differs with no key to show for it stays
/// unexplained.
async fn look_again(
    ctx: &Arc<Ctx>,
    leaves: &[KeyRange],
    unexplained: &[KeyRange],
    known: &BTreeMap<DynKey, Kind>,
) -> Result<Again> {
    let mut found = Found::default();
    let mut settled_unexplained = 0;
    for range in leaves {
        let mut again = compare_range(ctx.clone(), range.clone(), None).await?;
        again.rows.retain(|key, _| known.contains_key(key));
        if again.rows.is_empty() {
            again.leaves.clear();
        }
        found.merge(again);
    }
    for range in unexplained {
        let again = compare_range(ctx.clone(), range.clone(), None).await?;
        if again.rows.is_empty() && again.unexplained.is_empty() {
            settled_unexplained += 1;
        }
        found.merge(again);
    }
    Ok(Again {
        found,
        settled_unexplained,
    })
}

/// Proves a projection on its own database (two databases): it runs and selects the key's
/// columns.
async fn check_projection(
    db: &Database,
    def: &MigrationDef,
    what: &str,
    sql: &str,
    key_len: usize,
) -> Result<()> {
    let key_columns = projection_key_columns(key_len);
    let columns = keyset::qualified(&key_columns, Some("p")).join(", ");
    Query::assert_safe(format!("SELECT {columns} FROM ({sql}) p WHERE 1 = 0"))
        .fetch_all(db)
        .await
        .map(drop)
        .map_err(|e| match e {
            e if e.is_unreachable() => e,
            e => Error::Config(format!(
                "migration {:?}: {what} SQL fails on {} (it must select the key as {}): {}",
                def.name,
                db.describe(),
                key_columns.join(", ").replace('"', ""),
                crate::definition::error_message(&e)
            )),
        })
}

/// How rows are hashed (see [`RowHash`]). One database: [`RowHash::Record`] when both
/// projections' columns are of the same types, in the same order, and every type's equality
/// means identical values (integers, booleans, UUIDs, text under a deterministic collation,
/// bytes, dates and timestamps, and arrays of them), so that a type's hash cannot call two
/// different stored values equal (`numeric` `1.0` and `1.00`, `citext`, a case-insensitive
/// collation would); and the server has `hash_record_extended` (PostgreSQL 14). Else
/// [`RowHash::Text`], which hashes the row's text. SQLite: [`RowHash::Client`]. MySQL:
/// [`RowHash::Checksum`] in one database when both projections' columns can be read from
/// their prepared statements, else [`RowHash::Client`].
///
/// Two databases: [`RowHash::Record`] on the same conditions, checked in each database, and
/// both servers of one major version and one server encoding (the same hash functions over
/// the same bytes); otherwise [`RowHash::Client`] (the row's text depends on each session's
/// settings, so `Text` is never used across).
///
/// Returns the kind and each side's hash expression over `p` (legacy, new).
async fn row_hash(
    legacy_db: &Database,
    new_db: &Database,
    legacy: &str,
    new: &str,
) -> (RowHash, [String; 2]) {
    let of = |hash: RowHash| {
        let sql = match hash {
            RowHash::Record => "hash_record_extended(p, 0)",
            _ => "hashtextextended(CAST(p AS TEXT), 0)",
        };
        (hash, [sql.to_owned(), sql.to_owned()])
    };
    #[cfg(feature = "mysql")]
    if let (Some(l), Some(n)) = (legacy_db.as_mysql(), new_db.as_mysql())
        && legacy_db.same_database(new_db)
    {
        let checksum = |pool, proj: &str| {
            let select = format!("SELECT * FROM ({proj}) p");
            async move {
                let columns = crate::db::mysql::columns(pool, &select, &[]).await.ok()?;
                crate::db::mysql::row_checksum("p", &columns).ok()
            }
        };
        return match (checksum(l, legacy).await, checksum(n, new).await) {
            (Some(l), Some(n)) => (RowHash::Checksum, [l, n]),
            _ => of(RowHash::Client),
        };
    }
    of(row_hash_postgres(legacy_db, new_db, legacy, new).await)
}

async fn row_hash_postgres(
    legacy_db: &Database,
    new_db: &Database,
    legacy: &str,
    new: &str,
) -> RowHash {
    if legacy_db.backend() != Backend::Postgres || new_db.backend() != Backend::Postgres {
        return RowHash::Client;
    }
    let across = !legacy_db.same_database(new_db);
    let fallback = if across {
        RowHash::Client
    } else {
        RowHash::Text
    };
    if across {
        let server = |db: &Database| {
            let db = db.clone();
            async move {
                crate::db::query(
                    "SELECT CAST(current_setting('server_version_num') AS INTEGER) / 10000 AS major,
                            current_setting('server_encoding') AS encoding",
                )
                .fetch_one(&db)
                .await
                .ok()
                .and_then(|row| Some((row.get::<i64>("major").ok()?, row.get::<String>("encoding").ok()?)))
            }
        };
        let (l, n) = (server(legacy_db).await, server(new_db).await);
        if l.is_none() || l != n {
            return fallback;
        }
    }
    let (Some(l), Some(n)) = (
        column_types(legacy_db, legacy).await,
        column_types(new_db, new).await,
    ) else {
        return fallback;
    };
    if l != n || !l.iter().all(|(_, exact)| *exact) {
        return fallback;
    }
    for (db, proj) in [(legacy_db, legacy), (new_db, new)] {
        let probe = format!("SELECT hash_record_extended(p, 0) FROM ({proj}) p LIMIT 1");
        if Query::assert_safe(probe).fetch_all(db).await.is_err() {
            return fallback;
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
    /// The pieces compared row by row in which keys differed (looked at again as a whole).
    leaves: Vec<KeyRange>,
    /// Ranges whose summaries differed with no differing key found in them.
    unexplained: Vec<KeyRange>,
    /// Differing keys past [`MAX_LISTED`], counted and not kept.
    not_listed: u64,
}

impl Found {
    fn merge(&mut self, other: Found) {
        self.rows.extend(other.rows);
        self.leaves.extend(other.leaves);
        self.unexplained.extend(other.unexplained);
        self.not_listed += other.not_listed;
        // Memory stays bounded however much differs: past the cap, keys are counted only.
        while self.rows.len() > MAX_LISTED {
            self.rows.pop_last();
            self.not_listed += 1;
        }
    }
}

/// The whole key space: segments cut at the legacy table's keys, summarised on both sides,
/// differing ones looked into.
async fn compare_everything(ctx: &Arc<Ctx>, segments: usize) -> Result<Found> {
    let top = top_range(ctx).await?;
    if matches!(ctx.hash, RowHash::Record | RowHash::Text) {
        // The whole range first: one aggregate without grouping, which PostgreSQL runs as a
        // parallel scan (a grouped one it plans as one group per row, serially). When it
        // agrees on both sides, there is nothing to cut.
        let (l, n) = tokio::try_join!(
            summarize_whole(ctx, Side::Legacy, &top),
            summarize_whole(ctx, Side::New, &top)
        )?;
        if l == n && l.null_keys == 0 {
            return Ok(Found {
                segments: 1,
                legacy_rows: l.summary.rows,
                new_rows: n.summary.rows,
                ..Found::default()
            });
        }
    }
    let cuts = match sampled_cuts(ctx, segments).await {
        Some(cuts) => cuts,
        None => {
            let (table, key) = ctx.def.shape(crate::Side::Legacy);
            let total: i64 = Query::assert_safe(format!("SELECT COUNT(*) FROM {table}"))
                .run_on(ctx, Side::Legacy)
                .await?
                .first()
                .map_or(Ok(0), |row| row.get_at(0))?;
            cuts_of(
                ctx,
                Side::Legacy,
                &format!("SELECT {} FROM {table}", named(key)),
                None,
                u64::try_from(total).unwrap_or(0),
                segments as u64,
            )
            .await?
        }
    };
    let cuts = match &top.upper {
        // Only where Rust orders the keys as the database does (`top_range`).
        Upper::UpTo(max) => cuts.into_iter().filter(|c| c <= max).collect(),
        _ => cuts,
    };
    let mut found = compare_pieces(ctx.clone(), top, cuts, true).await?;
    found.segments = found.segments.max(1);
    Ok(found)
}

/// The keys a whole verify covers: up to the largest key either table holds when it starts
/// (rows inserted after that are dual-written, as in a backfill), so a stream of inserts with
/// ever larger keys (a sequence) cannot keep the top segment differing for as long as the
/// verify runs. Every key when Rust cannot order the keys as the database does
/// ([`crate::key::rust_orders_as`]) or both tables are empty.
async fn top_range(ctx: &Ctx) -> Result<KeyRange> {
    if !crate::key::rust_orders_as(ctx.legacy_db.backend(), &ctx.kinds) {
        return Ok(KeyRange::all());
    }
    let mut max: Option<DynKey> = None;
    for side in [Side::Legacy, Side::New] {
        let (table, key) = ctx.def.shape(side);
        let descending: Vec<String> = key.iter().map(|c| format!("{c} DESC")).collect();
        let sql = format!(
            "SELECT {} FROM {table} WHERE {} ORDER BY {} LIMIT 1",
            keyset::order_by(key),
            key.iter()
                .map(|c| format!("{c} IS NOT NULL"))
                .collect::<Vec<_>>()
                .join(" AND "),
            descending.join(", ")
        );
        if let Some(row) = Query::assert_safe(sql)
            .run_on(ctx, side)
            .await?
            .into_iter()
            .next()
        {
            let key = crate::backfill::row_key(row, &ctx.kinds)?;
            if max.as_ref().is_none_or(|m| key > *m) {
                max = Some(key);
            }
        }
    }
    Ok(match max {
        Some(max) => KeyRange {
            lower: Lower::Unbounded,
            upper: Upper::UpTo(max),
        },
        None => KeyRange::all(),
    })
}

/// PostgreSQL: segment cuts from a sample of the legacy table's keys (`TABLESAMPLE SYSTEM`,
/// about a hundred keys a segment), read in a few milliseconds where numbering every key would
/// take a pass over the whole key index. The segments come out about even; even is all verify
/// needs of them (its bisection cuts at exact row counts). MySQL: [`even_cuts`]. `None` (then
/// the exact way) on SQLite, for a table without statistics yet, or when sampling fails (a
/// view, say).
async fn sampled_cuts(ctx: &Ctx, segments: usize) -> Option<Vec<DynKey>> {
    if ctx.legacy_db.backend() == Backend::MySql {
        return even_cuts(ctx, segments).await;
    }
    if ctx.legacy_db.backend() != Backend::Postgres || segments < 2 {
        return None;
    }
    let (table, key) = ctx.def.shape(crate::Side::Legacy);
    let rows: f64 = crate::db::query(
        "SELECT CAST(reltuples AS DOUBLE PRECISION) FROM pg_class WHERE oid = to_regclass($1)",
    )
    .bind(table)
    .scalar::<Option<f64>>(&ctx.legacy_db)
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
    .fetch_all(&ctx.legacy_db)
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

/// MySQL (no table sampling), a key of one integer column: cuts spaced evenly between the
/// legacy table's smallest and largest key (two reads of the key index's ends). Segments
/// come out even for dense keys and uneven for skewed ones, which costs nothing: a differing
/// segment is cut again at exact row counts. `None` (then the exact way) for other keys.
async fn even_cuts(ctx: &Ctx, segments: usize) -> Option<Vec<DynKey>> {
    if ctx.kinds.len() != 1 || !matches!(ctx.kinds[0], KeyKind::BigInt | KeyKind::Int) {
        return None;
    }
    let (table, key) = ctx.def.shape(crate::Side::Legacy);
    let row = Query::assert_safe(format!(
        "SELECT CAST(MIN({k}) AS SIGNED) AS lo, CAST(MAX({k}) AS SIGNED) AS hi FROM {table}",
        k = key[0]
    ))
    .fetch_one(&ctx.legacy_db)
    .await
    .ok()?;
    let (lo, hi): (Option<i64>, Option<i64>) = (row.get("lo").ok()?, row.get("hi").ok()?);
    let (lo, hi) = (i128::from(lo?), i128::from(hi?));
    let mut cuts: Vec<DynKey> = (1..segments as i128)
        .map(|i| lo + (hi - lo) * i / segments as i128)
        .filter(|&cut| cut > lo)
        .map(|cut| {
            let cut = i64::try_from(cut).unwrap_or(i64::MAX);
            DynKey::single(match ctx.kinds[0] {
                KeyKind::Int => KeyPart::Int(i32::try_from(cut).unwrap_or(i32::MAX)),
                _ => KeyPart::BigInt(cut),
            })
        })
        .collect();
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
                    summarize(&ctx, Side::Legacy, &range, &[], false),
                    summarize(&ctx, Side::New, &range, &[], false)
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
        let side = if legacy_rows >= new_rows {
            Side::Legacy
        } else {
            Side::New
        };
        let (_, proj) = ctx.side(side);
        let p = keyset::predicate(&ctx.key, &range, 1);
        let source = format!(
            "SELECT {} FROM ({proj}) p WHERE ({}) AND NOT ({})",
            named(&ctx.key),
            p.sql,
            ctx.null_key
        );
        let mut cuts = cuts_of(&ctx, side, &source, Some(p.args), rows, FANOUT).await?;
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
    } else {
        found.leaves.push(range.clone());
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
        summarize(&ctx, Side::Legacy, &range, &cuts, top),
        summarize(&ctx, Side::New, &range, &cuts, top)
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
        // A differing segment (or piece of one), looked into in a task of its own.
        let span = tracing::info_span!(
            "twintrack.verify.segment",
            "otel.name" = format!("verify segment {}", ctx.def.name),
            "twintrack.migration" = %ctx.def.name,
            "twintrack.verify.legacy_rows" = l.rows,
            "twintrack.verify.new_rows" = n.rows,
        );
        if piece == range {
            // Cutting made no progress (every cut outside the range's rows): compare its rows
            // rather than cut it again, forever.
            tasks.spawn(async move { compare_rows_found(&ctx, &piece).await }.instrument(span));
        } else {
            tasks.spawn(compare_range(ctx, piece, Some((l.rows, n.rows))).instrument(span));
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
    side: Side,
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
        .run_on(ctx, side)
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
    async fn run_on(self, ctx: &Ctx, side: Side) -> Result<Vec<Row>>;
}

impl RunOn for Query {
    async fn run_on(self, ctx: &Ctx, side: Side) -> Result<Vec<Row>> {
        let (db, _) = ctx.side(side);
        retry::retrying(
            &format!("verify of {:?}", ctx.def.name),
            counted(ctx),
            || self.clone().fetch_all(db),
        )
        .await
        .map_err(|e| projection_error(&ctx.def.name, e))
    }
}

/// Counts a verify's retry in `twintrack.verify.retries`.
fn counted(ctx: &Ctx) -> impl Fn(&'static str) + '_ {
    move |reason: &'static str| {
        ctx.metrics.get().verify_retries.add(
            1,
            &[
                KeyValue::new("migration", ctx.def.name.clone()),
                KeyValue::new("reason", reason),
            ],
        );
    }
}

/// Count and order-independent hash of `side`'s rows in each piece of `range` between `cuts`,
/// and, `with_null_keys` (the whole verify's range), how many rows have a `NULL` in their key
/// (held by no piece).
async fn summarize(
    ctx: &Ctx,
    side: Side,
    range: &KeyRange,
    cuts: &[DynKey],
    with_null_keys: bool,
) -> Result<(Vec<Summary>, u64)> {
    let _permit = ctx
        .limit
        .acquire()
        .await
        .map_err(|_| Error::Internal("verify stopped".into()))?;
    let (_, proj) = ctx.side(side);
    if ctx.hash == RowHash::Client {
        let mut out = Vec::with_capacity(cuts.len() + 1);
        for piece in pieces(range, cuts) {
            let (rows, hash) = stream_rows(
                ctx,
                side,
                &piece,
                || (0u64, 0u64),
                |(rows, hash), _, doc| {
                    *rows += 1;
                    *hash = hash.wrapping_add(fnv1a(canonical(&doc).as_bytes()));
                    Ok(())
                },
            )
            .await?;
            out.push(Summary {
                rows,
                hash: hash.to_string(),
            });
        }
        if !with_null_keys {
            return Ok((out, 0));
        }
        let null_keys: i64 = Query::assert_safe(format!(
            "SELECT COUNT(*) FROM ({proj}) p WHERE {}",
            ctx.null_key
        ))
        .run_on(ctx, side)
        .await?
        .first()
        .map_or(Ok(0), |row| row.get_at(0))?;
        return Ok((out, u64::try_from(null_keys).unwrap_or(0)));
    }
    if ctx.hash == RowHash::Checksum {
        return summarize_pieces(ctx, side, range, cuts, with_null_keys).await;
    }
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
                    .map(|(column, kind)| format!("CAST({column} AS {})", kind.postgres_type()))
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
    // The whole verify's top range also lets NULL keys through, to count them (bucket -1).
    let filter = if with_null_keys {
        format!("({}) OR ({})", p.sql, ctx.null_key)
    } else {
        p.sql
    };
    let sql = format!(
        "SELECT CASE WHEN {} THEN -1 ELSE {bucket} END AS seg, COUNT(*) AS n,
                CAST(COALESCE(SUM({}), 0) AS TEXT) AS h
         FROM ({proj}) p WHERE {filter} GROUP BY 1",
        ctx.null_key,
        ctx.hash_sql(side),
    );
    let rows = bound(Query::assert_safe(sql), args)
        .run_on(ctx, side)
        .await?;
    let mut out = empty_summaries(cuts.len() + 1);
    let null_keys = read_summaries(rows, &mut out)?;
    Ok((out, null_keys))
}

/// `n` summaries of nothing (no rows, hash 0).
fn empty_summaries(n: usize) -> Vec<Summary> {
    vec![
        Summary {
            rows: 0,
            hash: "0".into()
        };
        n
    ]
}

/// Reads summary rows (`seg`, `n`, `h`) into `out` by segment; returns the `NULL`-key count
/// (segment -1).
fn read_summaries(rows: Vec<Row>, out: &mut [Summary]) -> Result<u64> {
    let mut null_keys = 0;
    for row in rows {
        let seg: i64 = row.get("seg")?;
        let n = u64::try_from(row.get::<i64>("n")?).unwrap_or(0);
        if seg == -1 {
            null_keys = n;
            continue;
        }
        let slot = out
            .get_mut(usize::try_from(seg).unwrap_or(usize::MAX))
            .ok_or_else(|| Error::Internal(format!("a summary named segment {seg}")))?;
        slot.rows = n;
        slot.hash = row.get("h")?;
    }
    Ok(null_keys)
}

/// At most this many pieces are summarised by one statement of [`summarize_pieces`] (its
/// parameters stay far below MySQL's 65,535 for any key).
const PIECES_PER_STATEMENT: usize = 256;

/// [`summarize`] where the database has no `width_bucket` (MySQL): each piece its own
/// `SELECT` with the piece's key range (a range scan on the key's index), joined by `UNION ALL`
/// into one statement per [`PIECES_PER_STATEMENT`] pieces.
async fn summarize_pieces(
    ctx: &Ctx,
    side: Side,
    range: &KeyRange,
    cuts: &[DynKey],
    with_null_keys: bool,
) -> Result<(Vec<Summary>, u64)> {
    let (_, proj) = ctx.side(side);
    let hash = ctx.hash_sql(side);
    let null_key = &ctx.null_key;
    let pieces = pieces(range, cuts);
    let mut out = empty_summaries(pieces.len());
    let mut null_keys = 0;
    for (chunk, group) in pieces.chunks(PIECES_PER_STATEMENT).enumerate() {
        let mut args = Vec::new();
        let mut parts = Vec::with_capacity(group.len() + 1);
        if with_null_keys && chunk == 0 {
            parts.push(format!(
                "SELECT -1 AS seg, COUNT(*) AS n, '0' AS h FROM ({proj}) p WHERE {null_key}"
            ));
        }
        for (i, piece) in group.iter().enumerate() {
            let p = keyset::predicate(&ctx.key, piece, args.len() + 1);
            args.extend(p.args);
            parts.push(format!(
                "SELECT {} AS seg, COUNT(*) AS n, CAST(COALESCE(SUM({hash}), 0) AS CHAR) AS h
                 FROM ({proj}) p WHERE ({}) AND NOT ({null_key})",
                chunk * PIECES_PER_STATEMENT + i,
                p.sql
            ));
        }
        let rows = bound(Query::assert_safe(parts.join(" UNION ALL ")), args)
            .run_on(ctx, side)
            .await?;
        null_keys += read_summaries(rows, &mut out)?;
    }
    Ok((out, null_keys))
}

/// A side's whole range in one summary, and its rows with a `NULL` in their key.
#[derive(Debug, PartialEq, Eq)]
struct Whole {
    summary: Summary,
    null_keys: u64,
}

/// [`summarize`] of `range` as one piece, in PostgreSQL (`RowHash::Record` or `Text`), with no
/// `GROUP BY`: `FILTER` clauses keep the `NULL`-key rows apart, so the plan stays a (parallel)
/// plain aggregate.
async fn summarize_whole(ctx: &Ctx, side: Side, range: &KeyRange) -> Result<Whole> {
    let _permit = ctx
        .limit
        .acquire()
        .await
        .map_err(|_| Error::Internal("verify stopped".into()))?;
    let (_, proj) = ctx.side(side);
    let p = keyset::predicate(&ctx.key, range, 1);
    let null_key = &ctx.null_key;
    let hash = ctx.hash_sql(side);
    let sql = format!(
        "SELECT COUNT(*) FILTER (WHERE NOT ({null_key})) AS n,
                COUNT(*) FILTER (WHERE {null_key}) AS null_keys,
                CAST(COALESCE(SUM({hash}) FILTER (WHERE NOT ({null_key})), 0) AS TEXT) AS h
         FROM ({proj}) p WHERE ({}) OR ({null_key})",
        p.sql,
    );
    let rows = bound(Query::assert_safe(sql), p.args)
        .run_on(ctx, side)
        .await?;
    let row = rows
        .first()
        .ok_or_else(|| Error::Internal("an aggregate returned no row".into()))?;
    Ok(Whole {
        summary: Summary {
            rows: u64::try_from(row.get::<i64>("n")?).unwrap_or(0),
            hash: row.get("h")?,
        },
        null_keys: u64::try_from(row.get::<i64>("null_keys")?).unwrap_or(0),
    })
}

/// A projection's row: each column's value in its canonical text, by column name. On
/// PostgreSQL the text `row_to_json` gives the value (its type's own output, so `numeric`
/// keeps every digit); on SQLite the value as JSON.
type Doc = BTreeMap<String, String>;

/// A row's canonical text: a JSON object of its columns in name order, each value in its
/// canonical text ([`Doc`]). What the client-side hash hashes, and what rows compare by.
fn canonical(doc: &Doc) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in doc.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&Json::String(name.clone()).to_string());
        out.push(':');
        out.push_str(value);
    }
    out.push('}');
    out
}

/// Streams `side`'s rows in `range` (a `NULL` key excluded) to `f`, each with its key, in
/// bounded memory, folding them into a state that starts as `init()`. A transient failure
/// (a lost connection) starts the statement over with a fresh state, so no row counts twice.
async fn stream_rows<S>(
    ctx: &Ctx,
    side: Side,
    range: &KeyRange,
    init: impl Fn() -> S,
    mut f: impl FnMut(&mut S, DynKey, Doc) -> Result<()> + Send,
) -> Result<S>
where
    S: Send,
{
    let (db, proj) = ctx.side(side);
    let p = keyset::predicate(&ctx.key, range, 1);
    let n = ctx.kinds.len();
    let sql = match db.backend() {
        Backend::Postgres => format!(
            "SELECT {}, CAST(row_to_json(p) AS TEXT) AS twintrack_doc FROM ({proj}) p WHERE ({}) AND NOT ({})",
            ctx.key.join(", "),
            p.sql,
            ctx.null_key
        ),
        // Each value as its type gives it (MySQL: projections cast dates and times to text).
        Backend::Sqlite | Backend::MySql => format!(
            "SELECT * FROM ({proj}) p WHERE ({}) AND NOT ({})",
            p.sql, ctx.null_key
        ),
    };
    let query = bound(Query::assert_safe(sql), p.args);
    let names = projection_key_columns(n);
    let backend = db.backend();
    let mut attempt = 0u32;
    loop {
        let mut state = init();
        let result = query
            .clone()
            .for_each(db, |row| {
                let (key, doc) = match backend {
                    Backend::Postgres => {
                        let mut values = row.into_values();
                        let doc = values.pop().unwrap_or(Value::Null);
                        let key = DynKey::from_values(values.into_iter().take(n), &ctx.kinds)?;
                        let Value::Text(text) = doc else {
                            return Err(Error::Internal("row_to_json gave no text".into()));
                        };
                        (key, doc_of_json(&text)?)
                    }
                    Backend::Sqlite | Backend::MySql => {
                        (key_of(&row, &names, &ctx.kinds)?, doc_of_row(&row))
                    }
                };
                f(&mut state, key, doc)
            })
            .await;
        let err = match result {
            Ok(_) => return Ok(state),
            Err(err) => err,
        };
        let Some(reason) = retry::transient(&err).filter(|_| attempt < retry::MAX_RETRIES) else {
            return Err(projection_error(&ctx.def.name, err));
        };
        attempt += 1;
        counted(ctx)(reason);
        let backoff = retry::backoff(attempt);
        tracing::warn!(migration = %ctx.def.name, attempt, reason, error = %err, retry_in = ?backoff,
            "verify: reading a projection failed transiently; starting it over");
        tokio::time::sleep(backoff).await;
    }
}

/// A [`Doc`] from `row_to_json`'s text: each value's raw JSON text, as PostgreSQL wrote it.
fn doc_of_json(text: &str) -> Result<Doc> {
    let raw: BTreeMap<String, Box<serde_json::value::RawValue>> = serde_json::from_str(text)
        .map_err(|e| Error::Internal(format!("row_to_json gave no JSON object: {e}")))?;
    Ok(raw
        .into_iter()
        .map(|(name, value)| (name, value.get().to_owned()))
        .collect())
}

/// A [`Doc`] from a row's values.
fn doc_of_row(row: &Row) -> Doc {
    row.names()
        .zip(row.values())
        .map(|(name, value)| (name.to_owned(), value.to_json().to_string()))
        .collect()
}

/// Each key's rows of `side` in `range`.
async fn fetch_rows(ctx: &Ctx, side: Side, range: &KeyRange) -> Result<BTreeMap<DynKey, Vec<Doc>>> {
    stream_rows(
        ctx,
        side,
        range,
        BTreeMap::new,
        |out: &mut BTreeMap<DynKey, Vec<Doc>>, key, doc| {
            out.entry(key).or_default().push(doc);
            Ok(())
        },
    )
    .await
}

/// The key columns (by name, `key` or `key1`…) of a projection's row.
fn key_of(row: &Row, names: &[String], kinds: &[KeyKind]) -> Result<DynKey> {
    let values = names
        .iter()
        .map(|n| row.get::<Value>(&n.replace('"', "")))
        .collect::<Result<Vec<_>>>()?;
    DynKey::from_values_of(row, values, kinds)
}

/// Key-by-key comparison of `range`, each key's rows as a multiset.
async fn compare_rows(ctx: &Ctx, range: &KeyRange) -> Result<BTreeMap<DynKey, Kind>> {
    let _permit = ctx
        .limit
        .acquire()
        .await
        .map_err(|_| Error::Internal("verify stopped".into()))?;
    let (legacy, new) = tokio::try_join!(
        fetch_rows(ctx, Side::Legacy, range),
        fetch_rows(ctx, Side::New, range)
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

/// `None` when the two multisets of rows are equal (each row by its canonical text); else
/// the columns (other than the key's, `keys`) whose multisets of values differ (`(rows)` when
/// every column agrees but the rows pair values differently).
fn differing(l: &[Doc], n: &[Doc], keys: &[String]) -> Option<Vec<String>> {
    let sorted = |rows: &[Doc]| {
        let mut texts: Vec<String> = rows.iter().map(canonical).collect();
        texts.sort();
        texts
    };
    if sorted(l) == sorted(n) {
        return None;
    }
    let mut names: Vec<&String> = l.iter().chain(n).flat_map(BTreeMap::keys).collect();
    names.sort();
    names.dedup();
    let column = |rows: &[Doc], name: &str| -> Vec<String> {
        let mut values: Vec<String> = rows
            .iter()
            .map(|r| r.get(name).cloned().unwrap_or_else(|| "(absent)".into()))
            .collect();
        values.sort_unstable();
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

    /// A [`Doc`] from a JSON object literal, as PostgreSQL's `row_to_json` would give it.
    fn doc(v: Json) -> Doc {
        doc_of_json(&v.to_string()).unwrap()
    }

    #[test]
    fn rows_compare_as_multisets_and_name_the_columns_that_differ() {
        let keys = ["key".to_owned()];
        let a = doc(json!({"key": 1, "tag": "a"}));
        let b = doc(json!({"key": 1, "tag": "b"}));
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
        let x1 = doc(json!({"k": 1, "u": "a", "v": "x"}));
        let x2 = doc(json!({"k": 1, "u": "b", "v": "y"}));
        let y1 = doc(json!({"k": 1, "u": "a", "v": "y"}));
        let y2 = doc(json!({"k": 1, "u": "b", "v": "x"}));
        assert_eq!(
            differing(&[x1, x2], &[y1, y2], &["k".to_owned()]),
            Some(vec!["(rows)".to_owned()])
        );
    }

    #[test]
    fn numbers_compare_by_every_digit_postgresql_wrote() {
        // Beyond a double's precision: equal as f64, different as numeric.
        let l = doc_of_json(r#"{"key":7,"amount":12345678901234567.01}"#).unwrap();
        let n = doc_of_json(r#"{"key":7,"amount":12345678901234567.02}"#).unwrap();
        assert_eq!(
            differing(
                std::slice::from_ref(&l),
                std::slice::from_ref(&n),
                &["key".to_owned()]
            ),
            Some(vec!["amount".to_owned()])
        );
        assert_ne!(
            fnv1a(canonical(&l).as_bytes()),
            fnv1a(canonical(&n).as_bytes())
        );
        // Column order does not matter; the canonical text sorts by name.
        let a = doc_of_json(r#"{"key":1,"b":2,"a":"x"}"#).unwrap();
        let b = doc_of_json(r#"{"a":"x","key":1,"b":2}"#).unwrap();
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(canonical(&a), r#"{"a":"x","b":2,"key":1}"#);
    }

    #[test]
    fn differing_keys_past_the_cap_are_counted_not_kept() {
        use crate::key::KeyPart;
        let mut found = Found::default();
        for chunk in 0..3 {
            let mut part = Found::default();
            for i in 0..(MAX_LISTED as i64 / 2 + 10) {
                let k = DynKey::single(KeyPart::BigInt(chunk * 1_000_000 + i));
                part.rows.insert(k, Kind::MissingInNew);
            }
            found.merge(part);
        }
        assert_eq!(found.rows.len(), MAX_LISTED);
        assert_eq!(
            found.not_listed,
            3 * (MAX_LISTED as u64 / 2 + 10) - MAX_LISTED as u64
        );
        // The smallest keys are the ones kept.
        assert_eq!(
            found.rows.keys().next(),
            Some(&DynKey::single(KeyPart::BigInt(0)))
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
