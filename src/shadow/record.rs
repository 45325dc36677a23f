//! The mismatch table: the newest mismatches per migration, with their diffs.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{FieldDiff, MismatchClass};
use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc};

use crate::db::{Backend, Database, Query, query};
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
    /// When (µs since the Unix epoch; RFC 3339 in JSON).
    #[serde(with = "crate::util::rfc3339")]
    pub at: i64,
}

/// The default for [`ShadowOptions::max_diff_bytes`](super::ShadowOptions::max_diff_bytes).
pub const DEFAULT_MAX_DIFF_BYTES: usize = 2048;
/// The smallest and largest [`ShadowOptions::max_diff_bytes`](super::ShadowOptions::max_diff_bytes).
pub const MAX_DIFF_BYTES_RANGE: std::ops::RangeInclusive<usize> = 256..=65_536;
/// [`list_mismatches`] returns at most this much diff text in all (2 MiB: a listing at its
/// largest limit stays under gRPC's default 4 MiB message limit); diffs past it are replaced
/// by an entry saying so.
pub const LIST_DIFF_BUDGET: usize = 2 << 20;

/// A diff cut down to about `max_bytes` of JSON, for storage and listings.
///
/// - A value whose JSON text is longer than a quarter of `max_bytes` (at least 64 bytes) is
///   replaced by `{"twintrack_truncated": {"bytes": N, "sha256": "<hex>", "head": "<the
///   first 64 characters of its JSON text>"}}`: its full size and a SHA-256 of its JSON text
///   are kept, so two large values can still be told apart and matched against the data.
/// - Fields are kept in order while the diff stays within `max_bytes`; the rest become one
///   entry whose path is `(N more fields differ)`, with no values.
pub fn cap_diff(diff: &[FieldDiff], max_bytes: usize) -> Vec<FieldDiff> {
    let max_value = (max_bytes / 4).max(64);
    let cap = |value: &Option<Value>| -> Option<Value> {
        let value = value.as_ref()?;
        let text = value.to_string();
        if text.len() <= max_value || is_truncated(value) {
            return Some(value.clone());
        }
        let head: String = text.chars().take(64).collect();
        Some(json!({"twintrack_truncated": {
            "bytes": text.len(),
            "sha256": crate::util::hex(&Sha256::digest(text.as_bytes())),
            "head": head,
        }}))
    };
    let mut out = Vec::new();
    let mut used = 2; // the array's brackets
    for (index, field) in diff.iter().enumerate() {
        let capped = FieldDiff {
            path: field.path.chars().take(256).collect(),
            legacy: cap(&field.legacy),
            new: cap(&field.new),
        };
        let size = serde_json::to_string(&capped).map_or(0, |t| t.len()) + 1;
        if used + size > max_bytes && !out.is_empty() {
            out.push(FieldDiff {
                path: format!("({} more fields differ)", diff.len() - index),
                legacy: None,
                new: None,
            });
            break;
        }
        used += size;
        out.push(capped);
    }
    out
}

/// Whether `value` is exactly a marker [`cap_diff`] wrote (`bytes` a number, `sha256` 64 hex
/// digits, `head` at most 64 characters), so capping twice changes nothing. A value of the
/// data's own that merely has the marker's field name is capped like any other.
fn is_truncated(value: &Value) -> bool {
    let Some(marker) = value
        .as_object()
        .filter(|o| o.len() == 1)
        .and_then(|o| o.get("twintrack_truncated"))
        .and_then(Value::as_object)
    else {
        return false;
    };
    marker.len() == 3
        && marker.get("bytes").is_some_and(Value::is_u64)
        && marker
            .get("sha256")
            .and_then(Value::as_str)
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        && marker
            .get("head")
            .and_then(Value::as_str)
            .is_some_and(|h| h.chars().count() <= 64)
}

/// A mismatch to store, its diff already capped ([`cap_diff`]).
pub(crate) struct NewMismatch {
    pub(crate) key: String,
    pub(crate) class: MismatchClass,
    pub(crate) stage: Stage,
    pub(crate) diff: Vec<FieldDiff>,
    pub(crate) legacy_micros: i64,
    pub(crate) new_micros: i64,
    pub(crate) at: i64,
}

/// Mismatches waiting for the recorder at most; past it, new ones are dropped and counted.
pub(crate) const RECORDER_QUEUE: usize = 1024;
/// Mismatches written by one statement at most.
const RECORDER_BATCH: usize = 100;

/// A dual store's mismatch recorder: one task that writes what it is sent in batches (one
/// multi-row `INSERT` and one trim per batch), each batch holding one connection and one
/// of the store's bookkeeping permits. Sending never waits: a full queue drops the mismatch
/// (the caller counts it).
pub(crate) fn spawn_recorder(
    db: Database,
    migration: Arc<str>,
    keep: u32,
    permits: Arc<Semaphore>,
    on_dropped: impl Fn(&'static str, u64) + Send + 'static,
) -> mpsc::Sender<NewMismatch> {
    let (tx, mut rx) = mpsc::channel::<NewMismatch>(RECORDER_QUEUE);
    tokio::spawn(async move {
        let mut batch = Vec::with_capacity(RECORDER_BATCH);
        while rx.recv_many(&mut batch, RECORDER_BATCH).await > 0 {
            let written = match permits.acquire().await {
                Ok(_permit) => write_batch(&db, &migration, &batch, keep).await,
                Err(_) => return,
            };
            if let Err(err) = written {
                tracing::warn!(migration = %migration, error = %err, lost = batch.len(),
                    "could not record mismatches");
                on_dropped("write_failed", batch.len() as u64);
            }
            batch.clear();
        }
    });
    tx
}

/// Stores `batch` in one statement, then trims the table to the newest `keep` of `migration`.
///
/// The trim skips rows another trim is deleting (`SKIP LOCKED`): recorders of several
/// instances never wait on each other.
async fn write_batch(
    db: &Database,
    migration: &str,
    batch: &[NewMismatch],
    keep: u32,
) -> Result<()> {
    let mut sql = String::from(
        r#"INSERT INTO twintrack_mismatches (migration, key_text, "key", class, stage, diff, legacy_micros, new_micros, at) VALUES "#,
    );
    for i in 0..batch.len() {
        let n = i * 9;
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!(
            "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            n + 5,
            n + 6,
            n + 7,
            n + 8,
            n + 9
        ));
    }
    let mut insert = Query::assert_safe(sql);
    for m in batch {
        insert = insert
            .bind(migration)
            .bind(m.key.as_str())
            .bind(crate::dual::integer_key(&m.key))
            .bind(m.class.as_str())
            .bind(m.stage.as_str())
            .bind(serde_json::to_string(&m.diff).unwrap_or_else(|_| "[]".into()))
            .bind(m.legacy_micros)
            .bind(m.new_micros)
            .bind(m.at);
    }
    insert.execute(db).await?;
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
        // No LIMIT in an IN subquery there: every id up to the first one past the cap (the
        // derived table is materialised before the delete reads the table again).
        Backend::MySql => {
            "DELETE FROM twintrack_mismatches WHERE migration = $1 AND id <= (
                 SELECT id FROM (SELECT id FROM twintrack_mismatches WHERE migration = $1
                                 ORDER BY id DESC LIMIT 1 OFFSET $2) twintrack_past)"
        }
    };
    // The batch is stored: a failed trim loses nothing (the next batch trims again).
    if let Err(err) = query(trim)
        .bind(migration)
        .bind(i64::from(keep))
        .execute(db)
        .await
    {
        tracing::warn!(migration, error = %err, "could not trim the mismatch table; the next batch tries again");
    }
    Ok(())
}

/// The newest `limit` mismatches of `migration`, newest first. Each diff is as stored
/// ([`cap_diff`] at record time), cut to the largest cap (64 KiB) if an older version stored
/// more; past [`LIST_DIFF_BUDGET`] of diff text in all, a diff is replaced by one entry,
/// `(diff left out: the listing reached 2 MiB; list fewer)`.
pub async fn list_mismatches(db: &Database, migration: &str, limit: u32) -> Result<Vec<Mismatch>> {
    // Mismatches of twintrack before key text have only the integer key (none on MySQL).
    let sql = match db.backend() {
        Backend::MySql => {
            "SELECT id, migration, key_text, class, stage, diff, legacy_micros, new_micros, at
             FROM twintrack_mismatches WHERE migration = $1 ORDER BY id DESC LIMIT $2"
        }
        _ => {
            r#"SELECT id, migration, COALESCE(key_text, CAST("key" AS TEXT)) AS key_text, class, stage, diff, legacy_micros, new_micros, at
             FROM twintrack_mismatches WHERE migration = $1 ORDER BY id DESC LIMIT $2"#
        }
    };
    let rows = query(sql)
        .bind(migration)
        .bind(i64::from(limit))
        .fetch_all(db)
        .await?;
    let mut budget = LIST_DIFF_BUDGET;
    rows.iter()
        .map(|row| {
            let class: String = row.get("class")?;
            let stored: String = row.get("diff")?;
            let mut diff: Vec<FieldDiff> = serde_json::from_str(&stored).unwrap_or_default();
            if stored.len() > *MAX_DIFF_BYTES_RANGE.end() {
                diff = cap_diff(&diff, *MAX_DIFF_BYTES_RANGE.end());
            }
            let size = serde_json::to_string(&diff).map_or(0, |t| t.len());
            if size > budget {
                diff = vec![FieldDiff {
                    path: "(diff left out: the listing reached 2 MiB; list fewer)".into(),
                    legacy: None,
                    new: None,
                }];
                budget = 0;
            } else {
                budget -= size;
            }
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
                diff,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn field(path: &str, legacy: Value, new: Value) -> FieldDiff {
        FieldDiff {
            path: path.into(),
            legacy: Some(legacy),
            new: Some(new),
        }
    }

    #[test]
    fn small_diffs_are_kept_as_they_are() {
        let diff = vec![field("theme", json!("dark"), json!("light"))];
        assert_eq!(cap_diff(&diff, 2048), diff);
    }

    #[test]
    fn a_large_value_keeps_its_size_hash_and_head() {
        let big = "x".repeat(10_000);
        let capped = cap_diff(&[field("v", json!(big), json!(1))], 2048);
        let t = &capped[0].legacy.as_ref().unwrap()["twintrack_truncated"];
        assert_eq!(t["bytes"], 10_002);
        // SHA-256 of the JSON text `"xxx…"`: 64 hex digits, and not the other side's.
        assert_eq!(t["sha256"].as_str().unwrap().len(), 64);
        assert_eq!(t["head"].as_str().unwrap().chars().count(), 64);
        assert_eq!(capped[0].new, Some(json!(1)));
        // Capping again changes nothing.
        assert_eq!(cap_diff(&capped, 2048), capped);
        // Two large values that differ only past the head stay apart by their hashes.
        let other = format!("{}y", "x".repeat(9_999));
        let again = cap_diff(&[field("v", json!(other), json!(1))], 2048);
        assert_ne!(again[0].legacy, capped[0].legacy);
    }

    #[test]
    fn data_shaped_like_the_marker_is_capped_like_any_value() {
        // A stored JSON value of the data's own that uses the marker's field name.
        let forged = json!({"twintrack_truncated": "z".repeat(400_000)});
        let capped = cap_diff(&[field("v", forged, json!(1))], 2048);
        assert!(serde_json::to_string(&capped).unwrap().len() < 2048);
        let t = &capped[0].legacy.as_ref().unwrap()["twintrack_truncated"];
        assert_eq!(t["sha256"].as_str().unwrap().len(), 64);
        let forged_marker = json!({"twintrack_truncated": {
            "bytes": 1, "sha256": "0".repeat(64), "head": "h".repeat(400_000)}});
        let capped = cap_diff(&[field("v", forged_marker, json!(1))], 2048);
        assert!(serde_json::to_string(&capped).unwrap().len() < 2048);
    }

    #[test]
    fn fields_past_the_budget_are_counted() {
        let diff: Vec<FieldDiff> = (0..1000)
            .map(|i| field(&format!("f{i}"), json!("a".repeat(50)), json!("b")))
            .collect();
        let capped = cap_diff(&diff, 2048);
        assert!(serde_json::to_string(&capped).unwrap().len() < 2048 + 64);
        let last = capped.last().unwrap();
        let kept = capped.len() - 1;
        assert_eq!(last.path, format!("({} more fields differ)", 1000 - kept));
        assert_eq!((&last.legacy, &last.new), (&None, &None));
    }

    #[test]
    fn one_field_larger_than_the_budget_is_still_shown_capped() {
        let long_path = "p".repeat(10_000);
        let capped = cap_diff(&[field(&long_path, json!("a"), json!("b"))], 256);
        assert_eq!(capped.len(), 1);
        assert_eq!(capped[0].path.len(), 256);
    }
}
