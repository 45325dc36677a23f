//! A migration's definition: the two shapes, and the SQL that copies and compares them.
//!
//! Backfill, verify and repair all work from this one definition:
//!
//! - `legacy_table` / `legacy_key`, `new_table` / `new_key`: the two shapes and their integer
//!   keys (validated and quoted identifiers);
//! - `copy`: upserts the new rows for the legacy rows whose key is in `($1, $2]`;
//! - `reverse_copy` (optional): the same from new to legacy (a reverse backfill, which makes
//!   leaving `new_only` safe);
//! - `legacy_projection` / `new_projection`: a `SELECT` of a column named `key` plus the
//!   comparable columns, in one canonical form on both sides (same names, same types).
//!
//! SQL may differ per backend (`copy = "…"` for both, or `[migration.copy]` with `postgres` and
//! `sqlite` keys). [`MigrationDef::check`] proves a definition against the database before
//! anything is written: tables and key columns exist, the SQL runs (inside a transaction that
//! is rolled back), and the projections have a `key` column.

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AssertSqlSafe, Connection};

use crate::db::{Backend, Database, quote_ident};
use crate::{Error, Result, Side};

/// SQL text, the same for every backend or one per backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SqlText {
    /// One statement for every backend.
    Same(String),
    /// One statement per backend; a backend without one cannot run this part.
    PerBackend {
        /// For PostgreSQL.
        #[serde(default)]
        postgres: Option<String>,
        /// For SQLite.
        #[serde(default)]
        sqlite: Option<String>,
    },
}

impl SqlText {
    /// The statement for `backend`, if there is one.
    pub fn for_backend(&self, backend: Backend) -> Option<&str> {
        match (self, backend) {
            (SqlText::Same(sql), _) => Some(sql),
            (SqlText::PerBackend { postgres, .. }, Backend::Postgres) => postgres.as_deref(),
            (SqlText::PerBackend { sqlite, .. }, Backend::Sqlite) => sqlite.as_deref(),
        }
    }
}

/// A migration's definition, resolved for one backend. Build it with
/// [`MigrationDef::builder`] or from `twintrack.toml`
/// ([`MigrationConfig::definition`](crate::config::MigrationConfig::definition)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationDef {
    /// The migration's name.
    pub name: String,
    /// The legacy table (quoted, ready for SQL).
    pub legacy_table: String,
    /// The legacy key column (quoted).
    pub legacy_key: String,
    /// The new table (quoted).
    pub new_table: String,
    /// The new key column (quoted).
    pub new_key: String,
    /// Upserts new rows from the legacy rows with key in `($1, $2]`.
    pub copy: Option<String>,
    /// Upserts legacy rows from the new rows with key in `($1, $2]`.
    pub reverse_copy: Option<String>,
    /// `SELECT key, …` over the legacy shape, in canonical form.
    pub legacy_projection: Option<String>,
    /// `SELECT key, …` over the new shape, in the same canonical form.
    pub new_projection: Option<String>,
}

/// Builds a [`MigrationDef`].
#[derive(Clone, Debug)]
pub struct MigrationDefBuilder {
    name: String,
    tables: Option<(String, String, String, String)>,
    copy: Option<String>,
    reverse_copy: Option<String>,
    legacy_projection: Option<String>,
    new_projection: Option<String>,
}

impl MigrationDefBuilder {
    /// The two shapes: tables and their key columns (plain or `schema.table` identifiers).
    pub fn tables(
        mut self,
        legacy_table: &str,
        legacy_key: &str,
        new_table: &str,
        new_key: &str,
    ) -> Self {
        self.tables = Some((
            legacy_table.into(),
            legacy_key.into(),
            new_table.into(),
            new_key.into(),
        ));
        self
    }

    /// The copy statement (`$1` exclusive, `$2` inclusive key bounds).
    pub fn copy(mut self, sql: &str) -> Self {
        self.copy = Some(sql.into());
        self
    }

    /// The reverse copy statement.
    pub fn reverse_copy(mut self, sql: &str) -> Self {
        self.reverse_copy = Some(sql.into());
        self
    }

    /// The two projections.
    pub fn projections(mut self, legacy: &str, new: &str) -> Self {
        self.legacy_projection = Some(legacy.into());
        self.new_projection = Some(new.into());
        self
    }

    /// The definition, or [`Error::Config`] for a bad name or identifier.
    pub fn build(self) -> Result<MigrationDef> {
        crate::flags::validate_migration_name(&self.name)
            .map_err(|e| Error::Config(e.to_string()))?;
        let (lt, lk, nt, nk) = self
            .tables
            .ok_or_else(|| Error::Config(format!("migration {:?}: no tables given", self.name)))?;
        let quote = |what: &str, ident: &str| {
            quote_ident(ident).map_err(|e| Error::Config(format!("{what}: {e}")))
        };
        let non_empty = |what: &str, sql: Option<String>| -> Result<Option<String>> {
            match sql {
                Some(s) if s.trim().is_empty() => Err(Error::Config(format!("{what} is empty"))),
                other => Ok(other),
            }
        };
        Ok(MigrationDef {
            legacy_table: quote("legacy_table", &lt)?,
            legacy_key: quote("legacy_key", &lk)?,
            new_table: quote("new_table", &nt)?,
            new_key: quote("new_key", &nk)?,
            copy: non_empty("copy", self.copy)?,
            reverse_copy: non_empty("reverse_copy", self.reverse_copy)?,
            legacy_projection: non_empty("legacy_projection", self.legacy_projection)?,
            new_projection: non_empty("new_projection", self.new_projection)?,
            name: self.name,
        })
    }
}

/// Which way a copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Legacy → new (a backfill).
    Forward,
    /// New → legacy (a reverse sync).
    Reverse,
}

impl Direction {
    /// `forward` or `reverse`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }
}

impl MigrationDef {
    /// A definition named `name`.
    pub fn builder(name: &str) -> MigrationDefBuilder {
        MigrationDefBuilder {
            name: name.into(),
            tables: None,
            copy: None,
            reverse_copy: None,
            legacy_projection: None,
            new_projection: None,
        }
    }

    /// The copy statement for `direction`, or a clear error if the definition has none.
    pub fn copy_sql(&self, direction: Direction) -> Result<&str> {
        let (sql, key) = match direction {
            Direction::Forward => (&self.copy, "copy"),
            Direction::Reverse => (&self.reverse_copy, "reverse_copy"),
        };
        sql.as_deref().ok_or_else(|| {
            Error::Config(format!(
                "migration {:?} defines no `{key}` SQL for this database",
                self.name
            ))
        })
    }

    /// The source table and key of a copy in `direction`.
    pub fn source(&self, direction: Direction) -> (&str, &str) {
        match direction {
            Direction::Forward => (&self.legacy_table, &self.legacy_key),
            Direction::Reverse => (&self.new_table, &self.new_key),
        }
    }

    /// Both projections, or a clear error.
    pub fn projections(&self) -> Result<(&str, &str)> {
        match (&self.legacy_projection, &self.new_projection) {
            (Some(l), Some(n)) => Ok((l, n)),
            _ => Err(Error::Config(format!(
                "migration {:?} needs `legacy_projection` and `new_projection` SQL for this database",
                self.name
            ))),
        }
    }

    /// Proves the definition against `db` without changing anything: both tables and key
    /// columns exist, every SQL statement runs (on an empty key range, in a transaction that is
    /// rolled back), and each projection has a `key` column. [`Error::Config`] says which part
    /// failed and the database's message.
    pub async fn check(&self, db: &Database) -> Result<()> {
        let mut conn = db.pool().acquire().await.map_err(Error::from_sqlx)?;
        let mut tx = conn
            .begin_with(db.backend().begin_write())
            .await
            .map_err(Error::from_sqlx)?;
        let bad = |what: &str, e: sqlx::Error| {
            Error::Config(format!(
                "migration {:?}: {what}: {}",
                self.name,
                db_message(&e)
            ))
        };
        for (what, table, key) in [
            (
                "legacy_table/legacy_key",
                &self.legacy_table,
                &self.legacy_key,
            ),
            ("new_table/new_key", &self.new_table, &self.new_key),
        ] {
            let sql = format!("SELECT {key} FROM {table} WHERE 1 = 0");
            sqlx::query(AssertSqlSafe(sql))
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| bad(what, e))?;
            if db.backend() == Backend::Sqlite {
                // SQLite reads a double-quoted name that is no column as a string literal, so
                // the statement above proves only the table: ask for the column by name.
                let unquote = |s: &str| s.replace('"', "");
                let table = unquote(table);
                let (schema, name) = table.split_once('.').unwrap_or(("main", &table));
                let found: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pragma_table_info($1, $2) WHERE name = $3",
                )
                .bind(name)
                .bind(schema)
                .bind(unquote(key))
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| bad(what, e))?;
                if found == 0 {
                    return Err(Error::Config(format!(
                        "migration {:?}: {what}: no column {key} in {table}",
                        self.name
                    )));
                }
            }
        }
        for (what, sql) in [("copy", &self.copy), ("reverse_copy", &self.reverse_copy)] {
            if let Some(sql) = sql {
                sqlx::query(AssertSqlSafe(sql.clone()))
                    .bind(0i64)
                    .bind(0i64)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| bad(&format!("{what} SQL fails"), e))?;
            }
        }
        for (what, sql) in [
            ("legacy_projection", &self.legacy_projection),
            ("new_projection", &self.new_projection),
        ] {
            if let Some(sql) = sql {
                let probe = format!("SELECT p.key FROM ({sql}) p WHERE 1 = 0");
                sqlx::query(AssertSqlSafe(probe))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| {
                        bad(
                            &format!("{what} SQL fails (it must select a column named `key`)"),
                            e,
                        )
                    })?;
            }
        }
        // Nothing to keep: the copies ran on an empty range, and even that is undone.
        tx.rollback().await.map_err(Error::from_sqlx)?;
        Ok(())
    }
}

/// The database's own message for `e`, without sqlx's wrapping.
pub(crate) fn db_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        other => other.to_string(),
    }
}

/// What [`resync_key`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resynced {
    /// The source's row was copied over the other side's.
    Copied,
    /// The source has no row: the new side's row was deleted.
    Deleted,
    /// The new side is the source and has no row: the legacy row was left alone (it usually
    /// holds more than the migrated columns).
    LeftAlone,
}

/// Re-syncs one key from `source` to the other side, in the caller's transaction, with the
/// definition's SQL: the one way twintrack re-syncs a key from SQL (verify's `--repair`, and
/// the dual store's repair worker when it has a definition).
///
/// The source row is locked first (`FOR SHARE` on PostgreSQL) so no write slips in between;
/// then, if the source projection has the key, `copy` (or `reverse_copy`) runs for `(key-1,
/// key]`; if not, the new side's row is deleted (legacy source) or left alone (new source).
pub async fn resync_key(
    conn: &mut AnyConnection,
    def: &MigrationDef,
    key: i64,
    source: Side,
) -> Result<Resynced> {
    let backend = conn.backend_name().to_ascii_lowercase();
    let (direction, table, key_column) = match source {
        Side::Legacy => (Direction::Forward, &def.legacy_table, &def.legacy_key),
        Side::New => (Direction::Reverse, &def.new_table, &def.new_key),
    };
    let (legacy_projection, new_projection) = def.projections()?;
    let projection = match source {
        Side::Legacy => legacy_projection,
        Side::New => new_projection,
    };
    if backend.contains("postgres") {
        let lock = format!("SELECT 1 FROM {table} WHERE {key_column} = $1 FOR SHARE");
        sqlx::query(AssertSqlSafe(lock))
            .bind(key)
            .fetch_all(&mut *conn)
            .await?;
    }
    let present = format!("SELECT COUNT(*) FROM ({projection}) p WHERE p.key = $1");
    let present: i64 = sqlx::query_scalar(AssertSqlSafe(present))
        .bind(key)
        .fetch_one(&mut *conn)
        .await?;
    if present > 0 {
        let sql = def.copy_sql(direction)?.to_owned();
        sqlx::query(AssertSqlSafe(sql))
            .bind(key.saturating_sub(1))
            .bind(key)
            .execute(&mut *conn)
            .await?;
        return Ok(Resynced::Copied);
    }
    match source {
        Side::Legacy => {
            let sql = format!("DELETE FROM {} WHERE {} = $1", def.new_table, def.new_key);
            sqlx::query(AssertSqlSafe(sql))
                .bind(key)
                .execute(&mut *conn)
                .await?;
            Ok(Resynced::Deleted)
        }
        Side::New => Ok(Resynced::LeftAlone),
    }
}
