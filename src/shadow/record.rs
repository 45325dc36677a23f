//! The mismatch table: the newest mismatches per migration, with their diffs.

use serde::{Deserialize, Serialize};

use super::{FieldDiff, MismatchClass};
use crate::db::{Backend, Database, now_micros, query};
use crate::{Result, Stage};

/// One recorded mismatch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mismatch {
    /// Increasing id.
    pub id: i64,
    /// The migration.
    pub migration: String,
    /// The key read, as its canonical text (see [`crate::key`]).
    pub key: String,
    /// `transient` or `confirmed`.
    pub class: MismatchClass,
    /// The stage the read ran in.
    pub stage: String,
    /// The differing fields (redacted).
    pub diff: Vec<FieldDiff>,
    /// How long the legacy read took (µs).
    pub legacy_micros: i64,
    /// How long the new read took (µs).
    pub new_micros: i64,
    /// When (µs since the Unix epoch).
    pub at: i64,
}

pub(crate) struct NewMismatch<'a> {
    pub(crate) migration: &'a str,
    pub(crate) key: &'a str,
    pub(crate) class: MismatchClass,
    pub(crate) stage: Stage,
    pub(crate) diff: &'a [FieldDiff],
    pub(crate) legacy_micros: i64,
    pub(crate) new_micros: i64,
}

/// Stores a mismatch, then trims the table to the newest `keep` of its migration.
///
/// The insert commits on its own, and the trim skips rows another trim is deleting
/// (`SKIP LOCKED`): a storm of mismatches must never make recorders wait on each other (each
/// holds a pooled connection while it waits).
pub(crate) async fn record_mismatch(db: &Database, m: NewMismatch<'_>, keep: u32) -> Result<()> {
    let diff = serde_json::to_string(m.diff).unwrap_or_else(|_| "[]".into());
    query(
        "INSERT INTO twintrack_mismatches (migration, key_text, key, class, stage, diff, legacy_micros, new_micros, at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(m.migration)
    .bind(m.key)
    .bind(crate::dual::integer_key(m.key))
    .bind(m.class.as_str())
    .bind(m.stage.as_str())
    .bind(diff)
    .bind(m.legacy_micros)
    .bind(m.new_micros)
    .bind(now_micros())
    .execute(db)
    .await?;
    let trim = match db.backend() {
        Backend::Postgres => {
            "DELETE FROM twintrack_mismatches WHERE id IN (
                 SELECT id FROM twintrack_mismatches WHERE migration = $1
                 ORDER BY id DESC OFFSET $2 FOR UPDATE SKIP LOCKED)"
        }
        Backend::Sqlite => {
            "DELETE FROM twintrack_mismatches WHERE id IN (
                 SELECT id FROM twintrack_mismatches WHERE migration = $1
                 ORDER BY id DESC LIMIT -1 OFFSET $2)"
        }
    };
    query(trim)
        .bind(m.migration)
        .bind(i64::from(keep))
        .execute(db)
        .await?;
    Ok(())
}

/// The newest `limit` mismatches of `migration`, newest first.
pub async fn list_mismatches(db: &Database, migration: &str, limit: u32) -> Result<Vec<Mismatch>> {
    let rows = query(
        "SELECT id, migration, COALESCE(key_text, CAST(key AS TEXT)) AS key_text, class, stage, diff, legacy_micros, new_micros, at
         FROM twintrack_mismatches WHERE migration = $1 ORDER BY id DESC LIMIT $2",
    )
    .bind(migration)
    .bind(i64::from(limit))
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            let class: String = row.get("class")?;
            let diff: String = row.get("diff")?;
            Ok(Mismatch {
                id: row.get("id")?,
                migration: row.get("migration")?,
                key: row.get("key_text")?,
                class: if class == "transient" {
                    MismatchClass::Transient
                } else {
                    MismatchClass::Confirmed
                },
                stage: row.get("stage")?,
                diff: serde_json::from_str(&diff).unwrap_or_default(),
                legacy_micros: row.get("legacy_micros")?,
                new_micros: row.get("new_micros")?,
                at: row.get("at")?,
            })
        })
        .collect()
}

/// Mismatches of `migration` recorded since `since` (µs), counted by class.
pub async fn mismatch_counts(
    db: &Database,
    migration: &str,
    since: i64,
) -> Result<Vec<(MismatchClass, i64)>> {
    let rows = query(
        "SELECT class, COUNT(*) AS n FROM twintrack_mismatches
         WHERE migration = $1 AND at >= $2 GROUP BY class ORDER BY class",
    )
    .bind(migration)
    .bind(since)
    .fetch_all(db)
    .await?;
    let mut out = Vec::new();
    for row in rows {
        let class: String = row.get("class")?;
        let n: i64 = row.get("n")?;
        let class = if class == "transient" {
            MismatchClass::Transient
        } else {
            MismatchClass::Confirmed
        };
        out.push((class, n));
    }
    Ok(out)
}
