//! The new shape in a database of its own: copying rows across two databases.
//!
//! One SQL statement cannot span two databases, so a copy across is two steps. The
//! definition's `copy_select` (or `reverse_copy_select`, for a reverse copy) runs on the
//! source database, inside the transaction whose key `SELECT` locked the batch's rows
//! (`FOR SHARE` on PostgreSQL, the write lock on SQLite), and returns the batch's rows in the
//! target table's columns, named as there; `{batch}` stands for the batch's key predicate as
//! in `copy` (see [`crate::definition`]). twintrack then writes those rows to the target
//! database in one transaction that commits *before* the source transaction releases its
//! locks, so a dual write of a locked key waits for the batch and lands after it.
//!
//! How the target is written depends on its key:
//!
//! - **a unique target key** (a primary key or unique index on exactly the key's columns):
//!   each row is upserted by the key (`INSERT … ON CONFLICT (key) DO UPDATE` of the selected
//!   columns; other columns keep their values), and, copying forward, the target rows of keys
//!   the source yields no row for are deleted;
//! - **otherwise** (one-to-many, e.g. `article_tag(article_id, tag)` keyed by `article_id`):
//!   the keys' target rows are replaced: deleted, then the selected rows inserted.
//!
//! A reverse copy updates the legacy rows that exist by their key and never inserts or
//! deletes one (a legacy row usually holds more than the migrated columns, which the new shape
//! cannot supply), as in one database ([`crate::definition::resync_key`]); it needs a unique
//! legacy key.
//!
//! Keys the target holds in the batch's range that the batch did not list (the source lost
//! them, or gained them after the batch's `SELECT`) are each locked and read again on the
//! source: copied if the source has them now, removed if not. Rows the source's `SELECT` returns
//! for keys the batch did not lock are never written: a concurrent dual write owns them.
//!
//! Rows travel as the database's own text forms: on PostgreSQL as JSON (`json_agg` on the
//! source, `json_populate_recordset` on the target, so every type converts by its own input
//! function), on SQLite as values. Both databases must be of one backend.

use std::collections::HashSet;

use std::collections::BTreeMap;

use serde_json::Value as Json;
use serde_json::value::RawValue;

use crate::backfill::KeyCopier;
use crate::db::{Backend, Conn, Database, Query, Tx, Value, query, quote_ident};
use crate::definition::{Direction, MigrationDef, Resynced, bound, error_message, expand};
use crate::flags::BoxFuture;
use crate::key::{DynKey, KeyKind};
use crate::keyset::{self, KeyRange};
use crate::{Error, Result};

/// Keys per `DELETE … IN (VALUES …)` statement.
const DELETE_CHUNK: usize = 500;
/// Bound parameters per SQLite `INSERT` (SQLite allows 32,766).
const SQLITE_PARAMS: usize = 30_000;

/// How the target table is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    /// Upsert by the target key (it is unique there).
    Upsert,
    /// Delete the keys' rows, insert the selected ones (one-to-many).
    Replace,
    /// Update the rows that exist by the target key, never insert (a reverse copy: a legacy
    /// row holds more than the migrated columns, which the new shape cannot supply).
    Update,
}

/// One row the source's select returned, with its key.
struct Fetched {
    key: DynKey,
    data: RowData,
}

enum RowData {
    /// PostgreSQL: the row as a JSON object, by column name, each value's JSON text exactly as
    /// PostgreSQL wrote it (no number passes through a double, no `json` value is reordered).
    Json(BTreeMap<String, Box<RawValue>>),
    /// SQLite: the values, in the order of [`Batch::columns`].
    Values(Vec<Value>),
}

/// What one sync did on the target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Synced {
    /// Rows inserted or updated.
    pub(crate) written: u64,
    /// Rows deleted.
    pub(crate) deleted: u64,
}

/// Copies keys from one database to the other with the definition's `copy_select` (see the
/// [module docs](self)).
pub(crate) struct CrossCopier {
    def: MigrationDef,
    kinds: Vec<KeyKind>,
    direction: Direction,
    backend: Backend,
    target: Database,
    select: String,
    write: Write,
    /// The target key's column names as rows carry them (unquoted).
    target_key_names: Vec<String>,
}

/// The error for a definition whose shapes are in two databases and which has no select for
/// `direction`.
pub(crate) fn missing_select(def: &MigrationDef, direction: Direction) -> Error {
    let (field, from, to) = match direction {
        Direction::Forward => ("copy_select", "legacy", "new"),
        Direction::Reverse => ("reverse_copy_select", "new", "legacy"),
    };
    Error::Config(format!(
        "migration {:?} has its shapes in two databases, so one SQL statement cannot copy between them: add `{field}` to its definition, a SELECT run on the {from} database of the batch's rows ({{batch}} included) in the {to} table's columns, which twintrack writes to the {to} database",
        def.name
    ))
}

impl CrossCopier {
    /// A copier in `direction` from `source` to `target`, its definition proved first: both
    /// databases of one backend, a select with `{batch}` whose columns (run on an empty batch)
    /// include the target key's and all exist in the target table. [`Error::Config`] names
    /// what to add or fix.
    pub(crate) async fn new(
        def: &MigrationDef,
        kinds: &[KeyKind],
        direction: Direction,
        source: &Database,
        target: &Database,
    ) -> Result<CrossCopier> {
        if source.backend() != target.backend() {
            return Err(Error::Config(format!(
                "migration {:?}: the two databases must be of one backend ({} and {} here)",
                def.name,
                source.backend().as_str(),
                target.backend().as_str()
            )));
        }
        let field = match direction {
            Direction::Forward => "copy_select",
            Direction::Reverse => "reverse_copy_select",
        };
        let select = match direction {
            Direction::Forward => def.copy_select.clone(),
            Direction::Reverse => def.reverse_copy_select.clone(),
        }
        .ok_or_else(|| missing_select(def, direction))?;
        if !MigrationDef::uses_batch_token(&select) {
            return Err(Error::Config(format!(
                "migration {:?}: `{field}` must select its batch with {{batch}}",
                def.name
            )));
        }
        let (table, key) = def.shape(direction.source().other());
        let target_key_names: Vec<String> = key.iter().map(|c| c.replace('"', "")).collect();
        let columns = select_columns(source, def, direction, &select)
            .await
            .map_err(|e| match e {
                // Unreachable, or the database's own trouble: not the definition's fault.
                e if e.is_unreachable() || crate::retry::transient(&e).is_some() => e,
                e => Error::Config(format!(
                    "migration {:?}: `{field}` fails on the {} database: {}",
                    def.name,
                    side_name(direction.source()),
                    error_message(&e)
                )),
            })?;
        let table_columns = table_columns(target, table).await?;
        for name in &target_key_names {
            if !columns.contains(name) {
                return Err(Error::Config(format!(
                    "migration {:?}: `{field}` must select the target key column {name} (it selects {})",
                    def.name,
                    columns.join(", ")
                )));
            }
        }
        for name in &columns {
            quote_ident(name)
                .map_err(|e| Error::Config(format!("migration {:?}: `{field}`: {e}", def.name)))?;
            if !table_columns.contains(name) {
                return Err(Error::Config(format!(
                    "migration {:?}: `{field}` selects {name}, which {} has no column of",
                    def.name,
                    table.replace('"', "")
                )));
            }
        }
        let unique = unique_key(target, table, &target_key_names).await?;
        // MySQL's upsert (`ON DUPLICATE KEY UPDATE`) fires on whichever unique index a row
        // collides with: with another one besides the key's, a row could update another key's
        // row. There, rows are replaced (deleted by key and inserted), so such a collision is
        // an error, as PostgreSQL's `ON CONFLICT (key)` makes it.
        let upsert = unique.key && !(source.backend() == Backend::MySql && unique.others);
        let write = if unique.key && direction == Direction::Reverse {
            Write::Update
        } else if upsert {
            Write::Upsert
        } else if direction == Direction::Forward {
            Write::Replace
        } else {
            return Err(Error::Config(format!(
                "migration {:?}: `reverse_copy_select` writes {} by its key, which needs a primary key or unique index on exactly ({})",
                def.name,
                table.replace('"', ""),
                target_key_names.join(", ")
            )));
        };
        Ok(CrossCopier {
            def: def.clone(),
            kinds: kinds.to_vec(),
            direction,
            backend: source.backend(),
            target: target.clone(),
            select,
            write,
            target_key_names,
        })
    }

    /// Makes the target match the source for `keys` (the source keys in `range`, locked by
    /// the caller's transaction on `source`) and for every key the target holds in `range`;
    /// commits on the target before returning (see the [module docs](self)).
    pub(crate) async fn sync(
        &self,
        mut source: Conn<'_>,
        keys: &[DynKey],
        range: &KeyRange,
    ) -> Result<Synced> {
        let listed: HashSet<&DynKey> = keys.iter().collect();
        let mut rows: Vec<Fetched> = Vec::new();
        let mut columns: Vec<String> = Vec::new();
        if let Some(last) = keys.last() {
            // Only up to the batch's last listed key (keys come in key order): the open-ended
            // last batch of a run must not read every row inserted since the run began.
            let listed_range = KeyRange {
                lower: range.lower.clone(),
                upper: crate::keyset::Upper::UpTo(last.clone()),
            };
            let (names, fetched) = self.fetch(source.reborrow(), &listed_range).await?;
            columns = names;
            rows.extend(fetched.into_iter().filter(|r| listed.contains(&r.key)));
        }
        // Keys the target holds in the range that the batch did not list.
        let (target_table, target_key) = self.def.shape(self.direction.source().other());
        let p = keyset::predicate(target_key, range, 1);
        let sql = format!(
            "SELECT DISTINCT {} FROM {target_table} WHERE {}",
            keyset::order_by(target_key),
            p.sql
        );
        let held: Vec<DynKey> = bound(Query::assert_safe(sql), p.args)
            .fetch_all(&self.target)
            .await?
            .into_iter()
            .map(|row| DynKey::from_row(row, &self.kinds))
            .collect::<Result<_>>()?;
        let (source_table, source_key) = self.def.source(self.direction);
        let mut also: Vec<DynKey> = Vec::new();
        // Of `also`, the keys the source did not have.
        let mut absent: Vec<DynKey> = Vec::new();
        for key in held.into_iter().filter(|k| !listed.contains(k)) {
            let one = KeyRange::exactly(key.clone());
            let p = keyset::predicate(source_key, &one, 1);
            let lock = self.backend.share_lock();
            let sql = format!("SELECT 1 FROM {source_table} WHERE {}{lock}", p.sql);
            let present = !bound(Query::assert_safe(sql), p.args)
                .fetch_all(source.reborrow())
                .await?
                .is_empty();
            if present {
                let (names, fetched) = self.fetch(source.reborrow(), &one).await?;
                if columns.is_empty() {
                    columns = names;
                }
                rows.extend(fetched.into_iter().filter(|r| r.key == key));
            } else {
                absent.push(key.clone());
            }
            also.push(key);
        }
        let mut tx = self.target.begin().await?;
        if self.backend == Backend::Postgres {
            // Two databases never see a lock cycle between them: a wait across them ends here
            // (and the step is retried) rather than never.
            query("SET LOCAL lock_timeout = '2s'")
                .execute(&mut tx)
                .await?;
        }
        // A key the source did not have may have come back since (a dual write re-inserting
        // it, whose copy may have reached the target): with the target's rows of those keys
        // locked, each is looked up on the source again, and left alone if it is back.
        let mut back: HashSet<DynKey> = HashSet::new();
        if !absent.is_empty() {
            // (SQLite: the target's write lock, held already.)
            if self.backend != Backend::Sqlite {
                for chunk in absent.chunks(DELETE_CHUNK) {
                    let (sql, args) = self.target_keys_sql(chunk, "SELECT 1 FROM", " FOR UPDATE");
                    bound(Query::assert_safe(sql), args)
                        .fetch_all(&mut tx)
                        .await?;
                }
            }
            for key in &absent {
                let one = KeyRange::exactly(key.clone());
                let p = keyset::predicate(source_key, &one, 1);
                let sql = format!("SELECT 1 FROM {source_table} WHERE {}", p.sql);
                if !bound(Query::assert_safe(sql), p.args)
                    .fetch_all(source.reborrow())
                    .await?
                    .is_empty()
                {
                    back.insert(key.clone());
                }
            }
        }
        let synced: Vec<&DynKey> = keys
            .iter()
            .chain(&also)
            .filter(|k| !back.contains(*k))
            .collect();
        let mut out = Synced::default();
        match self.write {
            Write::Update => {
                out.written = self.insert(&mut tx, &columns, &rows).await?;
            }
            Write::Upsert => {
                out.written = self.insert(&mut tx, &columns, &rows).await?;
                if self.direction == Direction::Forward {
                    let with_rows: HashSet<&DynKey> = rows.iter().map(|r| &r.key).collect();
                    let gone: Vec<&DynKey> = synced
                        .iter()
                        .copied()
                        .filter(|k| !with_rows.contains(k))
                        .collect();
                    out.deleted = self.delete(&mut tx, &gone).await?;
                }
            }
            Write::Replace => {
                out.deleted = self.delete(&mut tx, &synced).await?;
                out.written = self.insert(&mut tx, &columns, &rows).await?;
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Re-syncs one key from `source` (the database this copier reads) to the target, in a
    /// transaction of its own that locks the source's row first: verify's `--repair` across
    /// two databases.
    pub(crate) async fn resync_key(&self, source: &Database, key: &DynKey) -> Result<Resynced> {
        let (table, columns) = self.def.source(self.direction);
        let one = KeyRange::exactly(key.clone());
        let p = keyset::predicate(columns, &one, 1);
        let lock = self.backend.share_lock();
        // Keys are looked up under lock and then read with plain selects: each must see the
        // latest committed row (MySQL's default isolation would not).
        let mut tx = source.begin_read_committed().await?;
        let sql = format!(
            "SELECT {} FROM {table} WHERE {}{lock}",
            keyset::order_by(columns),
            p.sql
        );
        let keys: Vec<DynKey> = bound(Query::assert_safe(sql), p.args)
            .fetch_all(&mut tx)
            .await?
            .into_iter()
            .map(|row| DynKey::from_row(row, &self.kinds))
            .collect::<Result<_>>()?;
        let done = self.sync(tx.conn(), &keys, &one).await?;
        tx.commit().await?;
        Ok(if done.written > 0 {
            Resynced::Copied
        } else if self.direction == Direction::Forward {
            Resynced::Deleted
        } else {
            Resynced::LeftAlone
        })
    }

    /// The select's rows for `range` on `source`: their column names and each row with its key.
    async fn fetch(
        &self,
        source: Conn<'_>,
        range: &KeyRange,
    ) -> Result<(Vec<String>, Vec<Fetched>)> {
        let (_, source_key) = self.def.source(self.direction);
        let (_, target_key) = self.def.shape(self.direction.source().other());
        let q = expand(&self.select, source_key, target_key, Some(range))?;
        let failed = |e: Error| match e {
            Error::Database(source) => Error::Statement {
                what: format!(
                    "migration {:?}: the {} SQL failed",
                    self.def.name,
                    match self.direction {
                        Direction::Forward => "copy_select",
                        Direction::Reverse => "reverse_copy_select",
                    }
                ),
                source,
            },
            other => other,
        };
        match self.backend {
            Backend::Postgres => {
                let wrapped = Query {
                    sql: format!(
                        "SELECT CAST(json_agg(twintrack_s) AS TEXT) FROM ({}) twintrack_s",
                        q.sql
                    )
                    .into(),
                    args: q.args,
                };
                let text: Option<String> = wrapped.scalar(source).await.map_err(failed)?;
                let Some(text) = text else {
                    return Ok((Vec::new(), Vec::new()));
                };
                let docs: Vec<BTreeMap<String, Box<RawValue>>> = serde_json::from_str(&text)
                    .map_err(|e| Error::Internal(format!("json_agg gave no array of rows: {e}")))?;
                let mut names: Vec<String> = Vec::new();
                let mut out = Vec::with_capacity(docs.len());
                for map in docs {
                    if names.is_empty() {
                        names = map.keys().cloned().collect();
                    }
                    let parts: Vec<Json> = self
                        .target_key_names
                        .iter()
                        .map(|n| {
                            map.get(n)
                                .and_then(|raw| serde_json::from_str(raw.get()).ok())
                                .unwrap_or(Json::Null)
                        })
                        .collect();
                    let key = match parts.as_slice() {
                        [one] => DynKey::from_json(one, &self.kinds),
                        _ => DynKey::from_json(&Json::Array(parts.clone()), &self.kinds),
                    }
                    .map_err(|e| self.bad_key(&e))?;
                    out.push(Fetched {
                        key,
                        data: RowData::Json(map),
                    });
                }
                Ok((names, out))
            }
            Backend::Sqlite | Backend::MySql => {
                let rows = q.fetch_all(source).await.map_err(failed)?;
                let names: Vec<String> = rows
                    .first()
                    .map(|r| r.names().map(str::to_owned).collect())
                    .unwrap_or_default();
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let parts = self
                        .target_key_names
                        .iter()
                        .map(|n| row.get::<Value>(n))
                        .collect::<Result<Vec<_>>>()?;
                    let key = DynKey::from_values_of(&row, parts, &self.kinds)
                        .map_err(|e| self.bad_key(&e))?;
                    out.push(Fetched {
                        key,
                        data: RowData::Values(row.into_values()),
                    });
                }
                Ok((names, out))
            }
        }
    }

    fn bad_key(&self, e: &Error) -> Error {
        Error::Internal(format!(
            "migration {:?}: a row of its {} has no usable key in ({}): {e}",
            self.def.name,
            match self.direction {
                Direction::Forward => "copy_select",
                Direction::Reverse => "reverse_copy_select",
            },
            self.target_key_names.join(", ")
        ))
    }

    /// Inserts (or upserts) `rows`, whose columns are `columns`, into the target table.
    async fn insert(&self, tx: &mut Tx, columns: &[String], rows: &[Fetched]) -> Result<u64> {
        if rows.is_empty() {
            return Ok(0);
        }
        let (table, key) = self.def.shape(self.direction.source().other());
        let quoted = columns
            .iter()
            .map(|c| quote_ident(c))
            .collect::<Result<Vec<_>>>()?;
        let list = quoted.join(", ");
        let mysql = self.backend == Backend::MySql;
        let conflict = match self.write {
            Write::Replace | Write::Update => String::new(),
            // MySQL: by whichever unique key the row collides on (the key's, proved unique).
            Write::Upsert if mysql => {
                let set: Vec<String> = quoted
                    .iter()
                    .filter(|c| !key.contains(c))
                    .map(|c| format!("{c} = VALUES({c})"))
                    .collect();
                match set.is_empty() {
                    true => format!(" ON DUPLICATE KEY UPDATE {0} = {0}", key[0]),
                    false => format!(" ON DUPLICATE KEY UPDATE {}", set.join(", ")),
                }
            }
            Write::Upsert => {
                let set: Vec<String> = quoted
                    .iter()
                    .filter(|c| !key.contains(c))
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect();
                if set.is_empty() {
                    format!(" ON CONFLICT ({}) DO NOTHING", key.join(", "))
                } else {
                    format!(
                        " ON CONFLICT ({}) DO UPDATE SET {}",
                        key.join(", "),
                        set.join(", ")
                    )
                }
            }
        };
        // Update mode: the SET list (the selected columns other than the key's) and the join on
        // the key with the rows, named `twintrack_s` in both backends' statements.
        let update = match self.write {
            Write::Update => {
                // MySQL's multi-table UPDATE names the table in its SET list.
                let target = if mysql {
                    format!("{table}.")
                } else {
                    String::new()
                };
                let set: Vec<String> = quoted
                    .iter()
                    .filter(|c| !key.contains(c))
                    .map(|c| format!("{target}{c} = twintrack_s.{c}"))
                    .collect();
                if set.is_empty() {
                    return Ok(0);
                }
                let on: Vec<String> = key
                    .iter()
                    .map(|c| format!("{table}.{c} = twintrack_s.{c}"))
                    .collect();
                Some((set.join(", "), on.join(" AND ")))
            }
            _ => None,
        };
        match self.backend {
            Backend::Postgres => {
                let docs: Vec<&BTreeMap<String, Box<RawValue>>> = rows
                    .iter()
                    .filter_map(|r| match &r.data {
                        RowData::Json(map) => Some(map),
                        RowData::Values(_) => None,
                    })
                    .collect();
                let text = serde_json::to_string(&docs)
                    .map_err(|e| Error::Internal(format!("rows to JSON: {e}")))?;
                let sql = if let Some((set, on)) = &update {
                    format!(
                        "UPDATE {table} SET {set} FROM json_populate_recordset(CAST(NULL AS {table}), CAST($1 AS json)) twintrack_s WHERE {on}"
                    )
                } else {
                    format!(
                        "INSERT INTO {table} ({list}) SELECT {list} FROM json_populate_recordset(CAST(NULL AS {table}), CAST($1 AS json)){conflict}"
                    )
                };
                Query::assert_safe(sql)
                    .bind(text)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.write_failed(e))
            }
            Backend::Sqlite | Backend::MySql => {
                let per = (SQLITE_PARAMS / columns.len().max(1)).max(1);
                let mut written = 0;
                for chunk in rows.chunks(per) {
                    let mut q = Query::assert_safe(String::new());
                    // Each row's parameters (`$n`), in column order.
                    let mut tuples: Vec<Vec<String>> = Vec::with_capacity(chunk.len());
                    let mut n = 0;
                    for row in chunk {
                        let RowData::Values(values) = &row.data else {
                            continue;
                        };
                        let params: Vec<String> = values
                            .iter()
                            .map(|v| {
                                n += 1;
                                q.args.push(v.clone());
                                format!("${n}")
                            })
                            .collect();
                        tuples.push(params);
                    }
                    q.sql = if let (Some((set, on)), true) = (&update, mysql) {
                        // No `WITH` before an `UPDATE` there: the rows as a derived table,
                        // named by the first row's aliases.
                        let rows: Vec<String> = tuples
                            .iter()
                            .enumerate()
                            .map(|(i, params)| match i {
                                0 => {
                                    let named: Vec<String> = params
                                        .iter()
                                        .zip(&quoted)
                                        .map(|(v, c)| format!("{v} AS {c}"))
                                        .collect();
                                    format!("SELECT {}", named.join(", "))
                                }
                                _ => format!("SELECT {}", params.join(", ")),
                            })
                            .collect();
                        format!(
                            "UPDATE {table} JOIN ({}) twintrack_s ON {on} SET {set}",
                            rows.join(" UNION ALL ")
                        )
                    } else {
                        let tuples: Vec<String> = tuples
                            .iter()
                            .map(|params| format!("({})", params.join(", ")))
                            .collect();
                        match &update {
                            Some((set, on)) => format!(
                                "WITH twintrack_s ({list}) AS (VALUES {}) UPDATE {table} SET {set} FROM twintrack_s WHERE {on}",
                                tuples.join(", ")
                            ),
                            None => format!(
                                "INSERT INTO {table} ({list}) VALUES {}{conflict}",
                                tuples.join(", ")
                            ),
                        }
                    }
                    .into();
                    written += q
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| self.write_failed(e))?;
                }
                Ok(written)
            }
        }
    }

    /// `{verb} {target table} WHERE (key…) IN (VALUES …){tail}` for `keys`, and its
    /// parameters.
    fn target_keys_sql<K: std::borrow::Borrow<DynKey>>(
        &self,
        keys: &[K],
        verb: &str,
        tail: &str,
    ) -> (String, Vec<Value>) {
        let (table, key) = self.def.shape(self.direction.source().other());
        let mut args: Vec<Value> = Vec::new();
        let mut items = Vec::with_capacity(keys.len());
        for k in keys {
            let params: Vec<String> = k
                .borrow()
                .parts()
                .iter()
                .map(|part| {
                    args.push(part.to_value());
                    format!("${}", args.len())
                })
                .collect();
            items.push(format!("({})", params.join(", ")));
        }
        // MySQL: a list of row values (`VALUES` there makes a table only in a FROM).
        let values = match self.backend {
            Backend::MySql => "",
            _ => "VALUES ",
        };
        (
            format!(
                "{verb} {table} WHERE {} IN ({values}{}){tail}",
                keyset::row(key),
                items.join(", ")
            ),
            args,
        )
    }

    /// Deletes the target rows of `keys`.
    async fn delete(&self, tx: &mut Tx, keys: &[&DynKey]) -> Result<u64> {
        let mut deleted = 0;
        for chunk in keys.chunks(DELETE_CHUNK) {
            let (sql, args) = self.target_keys_sql(chunk, "DELETE FROM", "");
            deleted += bound(Query::assert_safe(sql), args)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.write_failed(e))?;
        }
        Ok(deleted)
    }

    fn write_failed(&self, e: Error) -> Error {
        match e {
            e if crate::retry::transient(&e).is_some() => e,
            Error::Database(source) => Error::Statement {
                what: format!(
                    "migration {:?}: writing the {} database's {} failed",
                    self.def.name,
                    side_name(self.direction.source().other()),
                    self.def.shape(self.direction.source().other()).0
                ),
                source,
            },
            other => other,
        }
    }
}

impl KeyCopier for CrossCopier {
    fn target(&self) -> &Database {
        &self.target
    }

    fn copy<'a>(
        &'a self,
        source: Conn<'a>,
        keys: &'a [DynKey],
        range: &'a KeyRange,
    ) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { Ok(self.sync(source, keys, range).await?.written) })
    }
}

fn side_name(side: crate::Side) -> &'static str {
    match side {
        crate::Side::Legacy => "legacy",
        crate::Side::New => "new",
    }
}

/// The output columns of `select` (run on an empty batch), read through a temporary view in a
/// transaction that is rolled back.
async fn select_columns(
    db: &Database,
    def: &MigrationDef,
    direction: Direction,
    select: &str,
) -> Result<Vec<String>> {
    let (_, source_key) = def.source(direction);
    let (_, target_key) = def.shape(direction.source().other());
    let empty = expand(select, source_key, target_key, None)?;
    // MySQL has no temporary views: the prepared statement names its columns (and proves the
    // select, without running it).
    #[cfg(feature = "mysql")]
    if let Some(pool) = db.as_mysql() {
        let columns = crate::db::mysql::columns(pool, &empty.sql, &empty.args).await?;
        return Ok(columns.into_iter().map(|(name, _)| name).collect());
    }
    let mut tx = db.begin().await?;
    Query::assert_safe(format!(
        "CREATE TEMP VIEW twintrack_probe_select AS SELECT * FROM ({}) s",
        empty.sql
    ))
    .execute(&mut tx)
    .await?;
    let names = match db.backend() {
        Backend::Postgres => query(
            "SELECT CAST(attname AS TEXT) FROM pg_attribute
             WHERE attrelid = to_regclass('pg_temp.twintrack_probe_select') AND attnum > 0
             ORDER BY attnum",
        ),
        Backend::Sqlite => query(
            "SELECT name FROM pragma_table_info('twintrack_probe_select', 'temp') ORDER BY cid",
        ),
        Backend::MySql => unreachable!("MySQL reads the prepared statement's columns"),
    }
    .fetch_all(&mut tx)
    .await?
    .into_iter()
    .map(|row| row.get_at::<String>(0))
    .collect::<Result<Vec<_>>>()?;
    let _ = tx.rollback().await;
    Ok(names)
}

/// The column names of `table` (quoted) in `db`.
async fn table_columns(db: &Database, table: &str) -> Result<Vec<String>> {
    let bare = table.replace('"', "");
    let rows = match db.backend() {
        Backend::Postgres => {
            query(
                "SELECT CAST(attname AS TEXT) FROM pg_attribute
             WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            )
            .bind(table)
            .fetch_all(db)
            .await?
        }
        Backend::Sqlite => {
            let (schema, name) = bare.split_once('.').unwrap_or(("main", &bare));
            query("SELECT name FROM pragma_table_info($1, $2)")
                .bind(name)
                .bind(schema)
                .fetch_all(db)
                .await?
        }
        Backend::MySql => {
            query(
                "SELECT CAST(column_name AS CHAR) FROM information_schema.columns
                 WHERE table_schema = COALESCE($1, DATABASE()) AND table_name = $2",
            )
            .bind(schema_of(&bare))
            .bind(name_of(&bare))
            .fetch_all(db)
            .await?
        }
    };
    rows.into_iter().map(|row| row.get_at(0)).collect()
}

/// MySQL: the schema of `schema.table` (`None`: the connection's database, `DATABASE()`).
fn schema_of(bare: &str) -> Option<String> {
    bare.split_once('.').map(|(schema, _)| schema.to_owned())
}

/// MySQL: the table name of `schema.table` or `table`.
fn name_of(bare: &str) -> String {
    bare.rsplit('.').next().unwrap_or(bare).to_owned()
}

/// How `table`'s unique indexes stand to `key`.
struct UniqueKeys {
    /// A primary key or unique index (not partial, not on expressions) on exactly `key`.
    key: bool,
    /// Another unique index besides.
    others: bool,
}

/// Reads `table`'s unique indexes (see [`UniqueKeys`]).
async fn unique_key(db: &Database, table: &str, key: &[String]) -> Result<UniqueKeys> {
    let mut wanted: Vec<String> = key.to_vec();
    wanted.sort();
    let bare = table.replace('"', "");
    let mut sets: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    match db.backend() {
        Backend::Postgres => {
            let rows = query(
                "SELECT CAST(i.indexrelid AS BIGINT), CAST(a.attname AS TEXT)
                 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid
                   AND a.attnum = ANY((CAST(i.indkey AS int2[]))[0:i.indnkeyatts - 1])
                 WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL",
            )
            .bind(table)
            .fetch_all(db)
            .await?;
            for row in rows {
                let index: i64 = row.get_at(0)?;
                sets.entry(index.to_string())
                    .or_default()
                    .push(row.get_at(1)?);
            }
        }
        Backend::MySql => {
            // Not a prefix index (`sub_part`), nor (MySQL 8) one with an expression part
            // (no column name): it would not make the key's columns unique.
            let rows = query(
                "SELECT CAST(index_name AS CHAR), CAST(COALESCE(column_name, '(expression)') AS CHAR), sub_part
                 FROM information_schema.statistics
                 WHERE table_schema = COALESCE($1, DATABASE()) AND table_name = $2 AND non_unique = 0",
            )
            .bind(schema_of(&bare))
            .bind(name_of(&bare))
            .fetch_all(db)
            .await?;
            for row in rows {
                let index: String = row.get_at(0)?;
                let column: String = row.get_at(1)?;
                let prefix: Option<i64> = row.get_at(2)?;
                sets.entry(index).or_default().push(if prefix.is_some() {
                    "(prefix)".into()
                } else {
                    column
                });
            }
        }
        Backend::Sqlite => {
            let (schema, name) = bare.split_once('.').unwrap_or(("main", &bare));
            let rows = query(
                "SELECT il.name, ii.name FROM pragma_index_list($1, $2) il, pragma_index_info(il.name, $2) ii
                 WHERE il.\"unique\" = 1 AND il.partial = 0",
            )
            .bind(name)
            .bind(schema)
            .fetch_all(db)
            .await?;
            for row in rows {
                let index: String = row.get_at(0)?;
                // An index on an expression has a column with no name: it cannot be the key's.
                let column = row
                    .get_at::<Option<String>>(1)?
                    .unwrap_or_else(|| "(expression)".into());
                sets.entry(index).or_default().push(column);
            }
            let pk = query("SELECT name FROM pragma_table_info($1, $2) WHERE pk > 0")
                .bind(name)
                .bind(schema)
                .fetch_all(db)
                .await?;
            for row in pk {
                sets.entry("(primary key)".into())
                    .or_default()
                    .push(row.get_at(0)?);
            }
        }
    }
    let (mut on_key, mut others) = (false, false);
    for mut columns in sets.into_values() {
        columns.sort();
        if columns == wanted {
            on_key = true;
        } else {
            others = true;
        }
    }
    Ok(UniqueKeys {
        key: on_key,
        others,
    })
}
