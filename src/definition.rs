//! A migration's definition: the two shapes, and the SQL that copies and compares them.
//!
//! Backfill, verify and repair all work from this one definition:
//!
//! - `legacy_table` / `legacy_key`, `new_table` / `new_key`: the two shapes and their key
//!   columns, one column or up to three (a composite key, in order); validated and quoted
//!   identifiers. The key columns' types are read from the database's catalog
//!   ([`MigrationDef::key_kinds`]): `bigint`, `integer`, `smallint`, `uuid` or `text` (see
//!   [`crate::key`]), the same on both sides.
//! - `copy`: upserts the new rows for a batch of legacy rows. The token `{batch}` (or
//!   `{batch:ALIAS}`, qualifying the columns with a table alias) stands for the batch's key
//!   predicate over the source's key columns, e.g. `("tenant_id", "id") > ($1, $2) AND
//!   ("tenant_id", "id") <= ($3, $4)`; `{target_batch}` / `{target_batch:ALIAS}` is the same
//!   predicate over the target's key columns (to delete target rows of the batch the source no
//!   longer has, as a one-to-many copy must). twintrack binds the bounds. A single integer key
//!   may instead use `$1` / `$2` as the batch's `(lower, upper]` bounds, as before `{batch}`
//!   existed.
//! - `reverse_copy` (optional): the same from new to legacy (a reverse backfill, which makes
//!   leaving `new_only` safe).
//! - `legacy_projection` / `new_projection`: a `SELECT` of the key as a column `key` (or `key1`,
//!   `key2`, … for a composite key, in key order) plus the comparable columns, in one canonical
//!   form on both sides (same names, same types).
//!
//! SQL may differ per backend (`copy = "…"` for both, or `[migration.copy]` with `postgres` and
//! `sqlite` keys). [`MigrationDef::check`] proves a definition against the database before
//! anything is written: tables and key columns exist with key types that match, every
//! statement runs (on an empty batch, in a transaction that is rolled back), and the
//! projections have their key columns.

use serde::{Deserialize, Serialize};

use crate::db::{Backend, Conn, Database, Query, Value, query, quote_ident};
use crate::key::{DynKey, KeyKind, MAX_KEY_COLUMNS};
use crate::keyset::{self, KeyRange, Lower, Upper};
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
        /// For MySQL and MariaDB.
        #[serde(default)]
        mysql: Option<String>,
    },
}

impl SqlText {
    /// The statement for `backend`, if there is one.
    pub fn for_backend(&self, backend: Backend) -> Option<&str> {
        match (self, backend) {
            (SqlText::Same(sql), _) => Some(sql),
            (SqlText::PerBackend { postgres, .. }, Backend::Postgres) => postgres.as_deref(),
            (SqlText::PerBackend { sqlite, .. }, Backend::Sqlite) => sqlite.as_deref(),
            (SqlText::PerBackend { mysql, .. }, Backend::MySql) => mysql.as_deref(),
        }
    }
}

/// A key's columns: one name, or several for a composite key (in key order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum KeyColumns {
    /// One column.
    One(String),
    /// Several columns, in key order.
    Many(Vec<String>),
}

impl KeyColumns {
    /// The column names, in key order.
    pub fn names(&self) -> Vec<&str> {
        match self {
            KeyColumns::One(name) => vec![name],
            KeyColumns::Many(names) => names.iter().map(String::as_str).collect(),
        }
    }
}

impl<'de> Deserialize<'de> for KeyColumns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = KeyColumns;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(
                    f,
                    "a key column name, or an array of 1 to {MAX_KEY_COLUMNS} column names"
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<KeyColumns, E> {
                Ok(KeyColumns::One(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<KeyColumns, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                if names.is_empty() || names.len() > MAX_KEY_COLUMNS {
                    return Err(serde::de::Error::invalid_length(names.len(), &self));
                }
                Ok(KeyColumns::Many(names))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl From<&str> for KeyColumns {
    fn from(name: &str) -> KeyColumns {
        KeyColumns::One(name.to_owned())
    }
}

impl From<&[&str]> for KeyColumns {
    fn from(names: &[&str]) -> KeyColumns {
        KeyColumns::Many(names.iter().map(|n| (*n).to_owned()).collect())
    }
}

impl<const N: usize> From<[&str; N]> for KeyColumns {
    fn from(names: [&str; N]) -> KeyColumns {
        KeyColumns::from(&names[..])
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
    /// The legacy key's columns (quoted), in key order.
    pub legacy_key: Vec<String>,
    /// The new table (quoted).
    pub new_table: String,
    /// The new key's columns (quoted), in key order.
    pub new_key: Vec<String>,
    /// Upserts new rows from a batch of legacy rows (`{batch}`, or `$1`/`$2`).
    pub copy: Option<String>,
    /// Upserts legacy rows from a batch of new rows.
    pub reverse_copy: Option<String>,
    /// Two databases: a `SELECT`, run on the legacy database, of the batch's rows (`{batch}`)
    /// in the new table's columns (named as they are there); twintrack writes them to the new
    /// database (see [`crate::across`]).
    pub copy_select: Option<String>,
    /// Two databases: the same from the new database, in the legacy table's columns.
    pub reverse_copy_select: Option<String>,
    /// `SELECT key, …` over the legacy shape, in canonical form.
    pub legacy_projection: Option<String>,
    /// `SELECT key, …` over the new shape, in the same canonical form.
    pub new_projection: Option<String>,
}

/// Builds a [`MigrationDef`].
#[derive(Clone, Debug)]
pub struct MigrationDefBuilder {
    name: String,
    tables: Option<(String, KeyColumns, String, KeyColumns)>,
    copy: Option<String>,
    reverse_copy: Option<String>,
    copy_select: Option<String>,
    reverse_copy_select: Option<String>,
    legacy_projection: Option<String>,
    new_projection: Option<String>,
}

impl MigrationDefBuilder {
    /// The two shapes: tables and their key columns (plain or `schema.table` identifiers; a
    /// key is one column name or an array of up to three, in key order).
    pub fn tables(
        mut self,
        legacy_table: &str,
        legacy_key: impl Into<KeyColumns>,
        new_table: &str,
        new_key: impl Into<KeyColumns>,
    ) -> Self {
        self.tables = Some((
            legacy_table.into(),
            legacy_key.into(),
            new_table.into(),
            new_key.into(),
        ));
        self
    }

    /// The copy statement (see the [module docs](self) for `{batch}`).
    pub fn copy(mut self, sql: &str) -> Self {
        self.copy = Some(sql.into());
        self
    }

    /// The reverse copy statement.
    pub fn reverse_copy(mut self, sql: &str) -> Self {
        self.reverse_copy = Some(sql.into());
        self
    }

    /// Two databases: the `SELECT` of a batch's rows on the legacy database, in the new
    /// table's columns (see [`crate::across`]).
    pub fn copy_select(mut self, sql: &str) -> Self {
        self.copy_select = Some(sql.into());
        self
    }

    /// Two databases: the `SELECT` of a batch's rows on the new database, in the legacy
    /// table's columns.
    pub fn reverse_copy_select(mut self, sql: &str) -> Self {
        self.reverse_copy_select = Some(sql.into());
        self
    }

    /// The two projections.
    pub fn projections(mut self, legacy: &str, new: &str) -> Self {
        self.legacy_projection = Some(legacy.into());
        self.new_projection = Some(new.into());
        self
    }

    /// The definition, or [`Error::Config`] for a bad name, identifier, key or `{batch}` token.
    pub fn build(self) -> Result<MigrationDef> {
        crate::flags::validate_migration_name(&self.name)
            .map_err(|e| Error::Config(e.to_string()))?;
        let (lt, lk, nt, nk) = self
            .tables
            .ok_or_else(|| Error::Config(format!("migration {:?}: no tables given", self.name)))?;
        let quote = |what: &str, ident: &str| {
            quote_ident(ident).map_err(|e| Error::Config(format!("{what}: {e}")))
        };
        let columns = |what: &str, key: &KeyColumns| -> Result<Vec<String>> {
            let names = key.names();
            if names.is_empty() || names.len() > MAX_KEY_COLUMNS {
                return Err(Error::Config(format!(
                    "{what}: a key has 1 to {MAX_KEY_COLUMNS} columns, not {}",
                    names.len()
                )));
            }
            names.iter().map(|n| quote(what, n)).collect()
        };
        let legacy_key = columns("legacy_key", &lk)?;
        let new_key = columns("new_key", &nk)?;
        if legacy_key.len() != new_key.len() {
            return Err(Error::Config(format!(
                "migration {:?}: legacy_key has {} columns and new_key {}; they must match",
                self.name,
                legacy_key.len(),
                new_key.len()
            )));
        }
        let non_empty = |what: &str, sql: Option<String>| -> Result<Option<String>> {
            match sql {
                Some(s) if s.trim().is_empty() => Err(Error::Config(format!("{what} is empty"))),
                Some(s) => {
                    tokens(&s).map_err(|e| Error::Config(format!("{what}: {e}")))?;
                    Ok(Some(s))
                }
                None => Ok(None),
            }
        };
        Ok(MigrationDef {
            legacy_table: quote("legacy_table", &lt)?,
            legacy_key,
            new_table: quote("new_table", &nt)?,
            new_key,
            copy: non_empty("copy", self.copy)?,
            reverse_copy: non_empty("reverse_copy", self.reverse_copy)?,
            copy_select: non_empty("copy_select", self.copy_select)?,
            reverse_copy_select: non_empty("reverse_copy_select", self.reverse_copy_select)?,
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

    /// The side a copy in this direction reads.
    pub fn source(self) -> Side {
        match self {
            Direction::Forward => Side::Legacy,
            Direction::Reverse => Side::New,
        }
    }
}

/// The columns a projection selects its key as: `key`, or `key1`, `key2`, … in key order.
pub(crate) fn projection_key_columns(n: usize) -> Vec<String> {
    if n == 1 {
        vec!["\"key\"".to_owned()]
    } else {
        (1..=n).map(|i| format!("\"key{i}\"")).collect()
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
            copy_select: None,
            reverse_copy_select: None,
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

    /// The table and key columns of `side`.
    pub fn shape(&self, side: Side) -> (&str, &[String]) {
        match side {
            Side::Legacy => (&self.legacy_table, &self.legacy_key),
            Side::New => (&self.new_table, &self.new_key),
        }
    }

    /// The source table and key columns of a copy in `direction`.
    pub fn source(&self, direction: Direction) -> (&str, &[String]) {
        self.shape(direction.source())
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

    /// The kinds of the key's columns, read from `db`'s catalog for both shapes.
    /// [`Error::Config`] names the table or column that is missing, a column whose type
    /// cannot be a key, or columns whose types differ between the shapes.
    pub async fn key_kinds(&self, db: &Database) -> Result<Vec<KeyKind>> {
        let legacy = column_kinds(
            db,
            &self.name,
            "legacy",
            &self.legacy_table,
            &self.legacy_key,
        )
        .await?;
        let new = column_kinds(db, &self.name, "new", &self.new_table, &self.new_key).await?;
        self.same_kinds(&legacy, &new)?;
        Ok(legacy.into_iter().map(|(_, kind)| kind).collect())
    }

    /// The key's kinds when the shapes live in two databases: each shape's key columns read
    /// from its own database's catalog, the same checks as [`MigrationDef::key_kinds`].
    pub async fn key_kinds_across(
        &self,
        legacy: &Database,
        new: &Database,
    ) -> Result<Vec<KeyKind>> {
        let l = column_kinds(
            legacy,
            &self.name,
            "legacy",
            &self.legacy_table,
            &self.legacy_key,
        )
        .await?;
        let n = column_kinds(new, &self.name, "new", &self.new_table, &self.new_key).await?;
        self.same_kinds(&l, &n)?;
        Ok(l.into_iter().map(|(_, kind)| kind).collect())
    }

    /// The kinds of one shape's key columns in `db` (for a shape in a database of its own).
    pub async fn side_key_kinds(&self, db: &Database, side: Side) -> Result<Vec<KeyKind>> {
        let (table, key) = self.shape(side);
        let which = match side {
            Side::Legacy => "legacy",
            Side::New => "new",
        };
        Ok(column_kinds(db, &self.name, which, table, key)
            .await?
            .into_iter()
            .map(|(_, kind)| kind)
            .collect())
    }

    fn same_kinds(&self, legacy: &[(String, KeyKind)], new: &[(String, KeyKind)]) -> Result<()> {
        if legacy.iter().map(|c| c.1).eq(new.iter().map(|c| c.1)) {
            return Ok(());
        }
        let show = |cols: &[(String, KeyKind)]| {
            cols.iter()
                .map(|(name, kind)| format!("{name} {kind}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        Err(Error::Config(format!(
            "migration {:?}: the key columns' types differ between the shapes: legacy_key ({}) vs new_key ({})",
            self.name,
            show(legacy),
            show(new)
        )))
    }

    /// Whether the copy statement for `direction` uses `{batch}` (rather than `$1`/`$2`).
    pub(crate) fn uses_batch_token(sql: &str) -> bool {
        tokens(sql).is_ok_and(|t| !t.is_empty())
    }

    /// The copy statement for `direction` over the keys in `range`, with its parameters bound:
    /// `{batch}` expanded, or the `$1`/`$2` bounds of a single integer key.
    pub(crate) fn copy_statement(
        &self,
        direction: Direction,
        kinds: &[KeyKind],
        range: &KeyRange,
    ) -> Result<Query> {
        let sql = self.copy_sql(direction)?;
        let (_, source) = self.source(direction);
        let (_, target) = self.shape(direction.source().other());
        if Self::uses_batch_token(sql) {
            return expand(sql, source, target, Some(range));
        }
        let what = match direction {
            Direction::Forward => "copy",
            Direction::Reverse => "reverse_copy",
        };
        if !matches!(kinds, [KeyKind::BigInt | KeyKind::Int]) {
            return Err(self.needs_batch_token(what, kinds));
        }
        let (lower, upper) = integer_bounds(range).map_err(|key| {
            Error::Config(format!(
                "migration {:?}: `{what}`'s $1/$2 cannot bound this batch (it ends at {}): write the batch predicate as {{batch}}",
                self.name,
                key.map_or("no key".to_owned(), |k| k.to_string())
            ))
        })?;
        // Below i64::MIN the lower bound is a double: the statement gets text of its own, as
        // sqlx's PostgreSQL statement cache is keyed by the text alone and would send the
        // double encoded for the `bigint` a cached statement expects.
        let statement = match lower {
            Value::F64(_) => Query::assert_safe(format!(
                "/* twintrack: lower bound below every bigint */ {sql}"
            )),
            _ => Query::assert_safe(sql),
        };
        Ok(statement.bind(lower).bind(upper))
    }

    fn needs_batch_token(&self, what: &str, kinds: &[KeyKind]) -> Error {
        let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
        Error::Config(format!(
            "migration {:?}: `{what}` must select its batch with {{batch}} (the key is ({}), not a single integer that $1/$2 could bound)",
            self.name,
            kinds.join(", ")
        ))
    }

    /// Proves the definition against `db` without changing anything: both tables and key
    /// columns exist with the same key types, every SQL statement runs (on an empty batch, in
    /// a transaction that is rolled back), a copy uses `{batch}` unless its key is a single
    /// integer, and each projection has its key columns. Returns the key's kinds.
    /// [`Error::Config`] says which part failed and the database's message.
    pub async fn check(&self, db: &Database) -> Result<Vec<KeyKind>> {
        let kinds = self.key_kinds(db).await?;
        let mut tx = db.begin().await?;
        let bad = |what: &str, e: Error| {
            Error::Config(format!(
                "migration {:?}: {what}: {}",
                self.name,
                error_message(&e)
            ))
        };
        for (what, direction, sql) in [
            ("copy", Direction::Forward, &self.copy),
            ("reverse_copy", Direction::Reverse, &self.reverse_copy),
        ] {
            let Some(sql) = sql else { continue };
            let statement = if Self::uses_batch_token(sql) {
                let (_, source) = self.source(direction);
                let (_, target) = self.shape(direction.source().other());
                expand(sql, source, target, None)?
            } else if matches!(kinds.as_slice(), [KeyKind::BigInt | KeyKind::Int]) {
                Query::assert_safe(sql.clone()).bind(0i64).bind(0i64)
            } else {
                return Err(self.needs_batch_token(what, &kinds));
            };
            statement
                .execute(&mut tx)
                .await
                .map_err(|e| bad(&format!("{what} SQL fails"), e))?;
        }
        let key_columns = projection_key_columns(kinds.len());
        for (what, sql) in [
            ("legacy_projection", &self.legacy_projection),
            ("new_projection", &self.new_projection),
        ] {
            if let Some(sql) = sql {
                let columns = keyset::qualified(&key_columns, Some("p")).join(", ");
                let probe = format!("SELECT {columns} FROM ({sql}) p WHERE 1 = 0");
                Query::assert_safe(probe)
                    .fetch_all(&mut tx)
                    .await
                    .map_err(|e| {
                        bad(
                            &format!(
                                "{what} SQL fails (it must select the key as {})",
                                key_columns.join(", ").replace('"', "")
                            ),
                            e,
                        )
                    })?;
            }
        }
        // Nothing to keep: the copies ran on an empty batch, and even that is undone.
        tx.rollback().await?;
        Ok(kinds)
    }
}

/// `-2^63 - 2048`: the largest double below `i64::MIN` (doubles are 2048 apart there).
const BELOW_EVERY_BIGINT: f64 = -9_223_372_036_854_777_856.0;

/// The `(lower, upper]` bounds of a range, for `$1`/`$2` copy statements, bound as values.
/// `upper` is an integer; `lower` is the integer below the range's first key, or, where no
/// integer is below it (the range starts at `i64::MIN`, or has no lower end), a number below
/// every `bigint`: the double `-2^63 - 2048` (the next double below `i64::MIN`), which both
/// PostgreSQL (`bigint > double precision`) and SQLite (`INTEGER > REAL`) compare numerically,
/// so `key > $1` holds for every key, `i64::MIN` included. (Used only there: elsewhere the
/// bound stays a `bigint` the key index serves.)
/// `Err(key)`: a bound is not a single integer (or the range ends before `i64::MIN`).
fn integer_bounds(range: &KeyRange) -> std::result::Result<(Value, i64), Option<DynKey>> {
    let int = |key: &DynKey| match key.parts() {
        [crate::key::KeyPart::BigInt(v)] => Some(*v),
        [crate::key::KeyPart::Int(v)] => Some(i64::from(*v)),
        _ => None,
    };
    let below_every_bigint = || Value::F64(BELOW_EVERY_BIGINT);
    let lower = match &range.lower {
        Lower::Unbounded => below_every_bigint(),
        Lower::After(k) => Value::I64(int(k).ok_or_else(|| Some(k.clone()))?),
        Lower::From(k) => match int(k).ok_or_else(|| Some(k.clone()))?.checked_sub(1) {
            Some(v) => Value::I64(v),
            None => below_every_bigint(),
        },
    };
    let upper = match &range.upper {
        Upper::Unbounded => i64::MAX,
        Upper::UpTo(k) => int(k).ok_or_else(|| Some(k.clone()))?,
        Upper::Before(k) => int(k)
            .and_then(|v| v.checked_sub(1))
            .ok_or_else(|| Some(k.clone()))?,
    };
    Ok((lower, upper))
}

/// One `{batch…}` token in copy SQL.
#[derive(Debug, PartialEq, Eq)]
struct Token {
    start: usize,
    end: usize,
    /// `{target_batch…}`: over the target's key columns.
    target: bool,
    alias: Option<String>,
}

/// The `{batch}`, `{batch:ALIAS}`, `{target_batch}` and `{target_batch:ALIAS}` tokens of
/// `sql`; other braces (JSON literals, say) are left alone. An alias must be a plain
/// identifier.
fn tokens(sql: &str) -> std::result::Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = sql[from..].find('{') {
        let start = from + pos;
        let rest = &sql[start + 1..];
        let (target, after) = if let Some(r) = rest.strip_prefix("batch") {
            (false, r)
        } else if let Some(r) = rest.strip_prefix("target_batch") {
            (true, r)
        } else {
            from = start + 1;
            continue;
        };
        let consumed = rest.len() - after.len();
        let (alias, len) = if after.starts_with('}') {
            (None, consumed + 1)
        } else if let Some(tail) = after.strip_prefix(':') {
            let close = tail
                .find('}')
                .ok_or_else(|| "an unclosed {batch:…} token".to_owned())?;
            let alias = &tail[..close];
            let ok = alias
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && alias.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && alias.len() <= 63;
            if !ok {
                return Err(format!(
                    "{{batch:{alias}}}: the alias must be a plain identifier (letters, digits, '_')"
                ));
            }
            (Some(alias.to_owned()), consumed + 1 + close + 1)
        } else {
            from = start + 1;
            continue;
        };
        out.push(Token {
            start,
            end: start + 1 + len,
            target,
            alias,
        });
        from = start + 1 + len;
    }
    Ok(out)
}

/// `sql` with every token replaced by the predicate selecting `range` (`None`: no key at all,
/// `1 = 0`), its parameters bound once and shared by every token.
pub(crate) fn expand(
    sql: &str,
    source: &[String],
    target: &[String],
    range: Option<&KeyRange>,
) -> Result<Query> {
    let tokens = tokens(sql).map_err(Error::Config)?;
    let mut text = String::with_capacity(sql.len() + 64);
    let mut args: Vec<Value> = Vec::new();
    let mut last = 0;
    for token in &tokens {
        text.push_str(&sql[last..token.start]);
        let columns = if token.target { target } else { source };
        let columns = keyset::qualified(columns, token.alias.as_deref());
        match range {
            None => text.push_str("(1 = 0)"),
            Some(range) => {
                let p = keyset::predicate(&columns, range, 1);
                if args.is_empty() {
                    args = p.args;
                }
                text.push('(');
                text.push_str(&p.sql);
                text.push(')');
            }
        }
        last = token.end;
    }
    text.push_str(&sql[last..]);
    let mut query = Query::assert_safe(text);
    for arg in args {
        query = query.bind(arg);
    }
    Ok(query)
}

/// The kinds of `table`'s key columns in `db`, each with its name.
async fn column_kinds(
    db: &Database,
    migration: &str,
    which: &str,
    table: &str,
    columns: &[String],
) -> Result<Vec<(String, KeyKind)>> {
    let unquote = |s: &str| s.replace('"', "");
    let table_name = unquote(table);
    let what = format!("{which}_table {table_name}");
    let mut out = Vec::with_capacity(columns.len());
    for column in columns {
        let name = unquote(column);
        // MySQL: the column's collation too (text keys need a binary no-pad one).
        let mut collation: Option<String> = None;
        let declared: Option<String> = match db.backend() {
            Backend::Postgres => {
                let exists: bool = query("SELECT to_regclass($1) IS NOT NULL")
                    .bind(table)
                    .scalar(db)
                    .await?;
                if !exists {
                    return Err(Error::Config(format!(
                        "migration {migration:?}: {what} does not exist"
                    )));
                }
                query(
                    "SELECT CAST(COALESCE(bt.typname, t.typname) AS TEXT)
                     FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                     LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
                     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
                       AND a.attname = $2",
                )
                .bind(table)
                .bind(&name)
                .fetch_optional(db)
                .await?
                .map(|row| row.get_at(0))
                .transpose()?
            }
            Backend::Sqlite => {
                let (schema, bare) = table_name.split_once('.').unwrap_or(("main", &table_name));
                let found: i64 = query("SELECT COUNT(*) FROM pragma_table_info($1, $2)")
                    .bind(bare)
                    .bind(schema)
                    .scalar(db)
                    .await?;
                if found == 0 {
                    return Err(Error::Config(format!(
                        "migration {migration:?}: {what} does not exist"
                    )));
                }
                query("SELECT type FROM pragma_table_info($1, $2) WHERE name = $3")
                    .bind(bare)
                    .bind(schema)
                    .bind(&name)
                    .fetch_optional(db)
                    .await?
                    .map(|row| row.get_at(0))
                    .transpose()?
            }
            Backend::MySql => {
                let (schema, bare) = match table_name.split_once('.') {
                    Some((schema, bare)) => (Some(schema), bare),
                    None => (None, table_name.as_str()),
                };
                let in_table = "table_schema = COALESCE($1, DATABASE()) AND table_name = $2";
                let found: i64 = Query::assert_safe(format!(
                    "SELECT COUNT(*) FROM information_schema.columns WHERE {in_table}"
                ))
                .bind(schema.map(str::to_owned))
                .bind(bare)
                .scalar(db)
                .await?;
                if found == 0 {
                    return Err(Error::Config(format!(
                        "migration {migration:?}: {what} does not exist"
                    )));
                }
                let row = Query::assert_safe(format!(
                    "SELECT CAST(column_type AS CHAR), CAST(collation_name AS CHAR) FROM information_schema.columns WHERE {in_table} AND column_name = $3"
                ))
                .bind(schema.map(str::to_owned))
                .bind(bare)
                .bind(&name)
                .fetch_optional(db)
                .await?;
                match row {
                    Some(row) => {
                        collation = row.get_at(1)?;
                        Some(row.get_at(0)?)
                    }
                    None => None,
                }
            }
        };
        let Some(declared) = declared else {
            return Err(Error::Config(format!(
                "migration {migration:?}: {which}_key: no column {name} in {table_name}"
            )));
        };
        let kind = match db.backend() {
            Backend::Postgres => KeyKind::from_postgres(&declared),
            Backend::Sqlite => KeyKind::from_sqlite(&declared),
            Backend::MySql => KeyKind::from_mysql(&declared, collation.as_deref()),
        }
        .ok_or_else(|| {
            let allowed = match db.backend() {
                Backend::MySql => {
                    if let Some(why) = KeyKind::mysql_text_refusal(
                        &table_name,
                        &name,
                        &declared,
                        collation.as_deref(),
                    ) {
                        return Error::Config(format!(
                            "migration {migration:?}: {which}_key column {name} of {table_name} is of type {declared:?}: {why}"
                        ));
                    }
                    "a signed bigint, int, mediumint, smallint or tinyint, MariaDB's uuid, or a varchar under a binary no-pad collation (utf8mb4_nopad_bin)"
                }
                _ => "bigint, integer, smallint, uuid, text or varchar",
            };
            Error::Config(format!(
                "migration {migration:?}: {which}_key column {name} of {table_name} is of type {declared:?}; a key column must be {allowed}"
            ))
        })?;
        out.push((name, kind));
    }
    Ok(out)
}

/// The database's own message for `e`, without twintrack's or sqlx's wrapping.
pub(crate) fn error_message(e: &Error) -> String {
    match e {
        Error::Database(source) => error_message_of(source),
        other => other.to_string(),
    }
}

/// The database's own message for an sqlx error.
pub(crate) fn error_message_of(e: &sqlx::Error) -> String {
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

/// Re-syncs one key from `source` to the other side, on the caller's connection (inside its
/// transaction), with the definition's SQL: the way twintrack re-syncs a key from SQL when
/// both shapes share a database (verify's `--repair`, and the dual store's repair worker when
/// it has a definition). `kinds` are the key's kinds ([`MigrationDef::key_kinds`]).
///
/// The source row is locked first (`FOR SHARE` on PostgreSQL) so no write slips in between;
/// then, if the source projection has the key, `copy` (or `reverse_copy`) runs for that one
/// key; if not, the new side's rows of the key are deleted (legacy source) or the legacy row
/// is left alone (new source).
pub async fn resync_key(
    mut conn: Conn<'_>,
    def: &MigrationDef,
    kinds: &[KeyKind],
    key: &DynKey,
    source: Side,
) -> Result<Resynced> {
    let direction = match source {
        Side::Legacy => Direction::Forward,
        Side::New => Direction::Reverse,
    };
    let (table, key_columns) = def.shape(source);
    let (legacy_projection, new_projection) = def.projections()?;
    let projection = match source {
        Side::Legacy => legacy_projection,
        Side::New => new_projection,
    };
    let one = KeyRange::exactly(key.clone());
    if conn.backend() == Backend::Postgres {
        let p = keyset::predicate(key_columns, &one, 1);
        let lock = format!("SELECT 1 FROM {table} WHERE {} FOR SHARE", p.sql);
        bound(Query::assert_safe(lock), p.args)
            .fetch_all(&mut conn)
            .await?;
    }
    let p = keyset::predicate(
        &keyset::qualified(&projection_key_columns(kinds.len()), Some("p")),
        &one,
        1,
    );
    let present = format!("SELECT COUNT(*) FROM ({projection}) p WHERE {}", p.sql);
    let present: i64 = bound(Query::assert_safe(present), p.args)
        .scalar(&mut conn)
        .await?;
    if present > 0 {
        def.copy_statement(direction, kinds, &one)?
            .execute(&mut conn)
            .await?;
        return Ok(Resynced::Copied);
    }
    match source {
        Side::Legacy => {
            let p = keyset::predicate(&def.new_key, &one, 1);
            let sql = format!("DELETE FROM {} WHERE {}", def.new_table, p.sql);
            bound(Query::assert_safe(sql), p.args)
                .execute(&mut conn)
                .await?;
            Ok(Resynced::Deleted)
        }
        Side::New => Ok(Resynced::LeftAlone),
    }
}

/// `query` with `args` bound in order.
pub(crate) fn bound(mut query: Query, args: Vec<Value>) -> Query {
    for arg in args {
        query = query.bind(arg);
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyPart;

    #[test]
    fn batch_tokens_are_found_and_other_braces_left_alone() {
        let sql = "UPDATE t SET p = '{}' WHERE {batch} AND x IN (SELECT 1 FROM u s WHERE {batch:s}) AND {target_batch:t} AND '{batches}' <> ''";
        let found = tokens(sql).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(&sql[found[0].start..found[0].end], "{batch}");
        assert_eq!(found[1].alias.as_deref(), Some("s"));
        assert!(found[2].target);
        assert!(tokens("WHERE {batch:s t}").is_err());
        assert!(tokens("WHERE {batch:1s}").is_err());
        assert!(tokens("WHERE {batch:s").is_err());
    }

    #[test]
    fn batch_tokens_expand_to_one_predicate_with_shared_parameters() {
        let source = vec!["\"tenant_id\"".to_owned(), "\"id\"".to_owned()];
        let target = vec!["\"t_id\"".to_owned(), "\"a_id\"".to_owned()];
        let lo = DynKey::new(vec![KeyPart::BigInt(1), KeyPart::BigInt(i64::MIN)]).unwrap();
        let range = KeyRange::after_upto(Some(lo), None);
        let q = expand(
            "DELETE FROM n t WHERE {target_batch:t}; SELECT * FROM l WHERE {batch}",
            &source,
            &target,
            Some(&range),
        )
        .unwrap();
        assert_eq!(
            q.sql(),
            "DELETE FROM n t WHERE ((t.\"t_id\", t.\"a_id\") > ($1, $2)); SELECT * FROM l WHERE ((\"tenant_id\", \"id\") > ($1, $2))"
        );
        assert_eq!(q.args, vec![Value::I64(1), Value::I64(i64::MIN)]);
        let empty = expand("x WHERE {batch}", &source, &target, None).unwrap();
        assert_eq!(empty.sql(), "x WHERE (1 = 0)");
    }

    #[test]
    fn integer_bounds_never_wrap() {
        let k = |v| DynKey::single(KeyPart::BigInt(v));
        assert_eq!(
            integer_bounds(&KeyRange::exactly(k(i64::MAX))).unwrap(),
            (Value::I64(i64::MAX - 1), i64::MAX)
        );
        assert_eq!(
            integer_bounds(&KeyRange::exactly(k(i64::MIN))).unwrap(),
            (Value::F64(BELOW_EVERY_BIGINT), i64::MIN)
        );
        assert!(BELOW_EVERY_BIGINT < i64::MIN as f64);
        assert_eq!(
            integer_bounds(&KeyRange::all()).unwrap(),
            (Value::F64(BELOW_EVERY_BIGINT), i64::MAX)
        );
        assert_eq!(
            integer_bounds(&KeyRange::after_upto(Some(k(i64::MIN)), Some(k(7)))).unwrap(),
            (Value::I64(i64::MIN), 7)
        );
        // A range ending before i64::MIN holds no integer: refused, not wrapped.
        assert_eq!(
            integer_bounds(&KeyRange {
                lower: Lower::Unbounded,
                upper: Upper::Before(k(i64::MIN))
            })
            .unwrap_err(),
            Some(k(i64::MIN))
        );
    }
}
