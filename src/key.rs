//! Migration keys: any type the database orders, one or several columns.
//!
//! A migration's key is what rows are copied, compared and repaired by. It may be a `bigint`,
//! an `integer`, a `uuid`, `text`, or a composite of up to three of these (in the database's
//! order of the columns). Two forms of one key exist:
//!
//! - a Rust type implementing [`Key`] (`i64`, `i32`, `uuid::Uuid`, `String`, or a tuple of up
//!   to three of them), which the dual store and repositories use;
//! - a [`DynKey`], whose column kinds ([`KeyKind`]) are known only at run time (read from the
//!   database's catalog), which backfill, verify and the CLI use.
//!
//! Both print as one **canonical text** that round-trips exactly and is what twintrack's own
//! tables store (repair intents, mismatches, backfill checkpoints): a single key as itself
//! (`42`, `0b5d…` as `8-4-4-4-12` lowercase, the text unchanged), a composite key as a JSON
//! array of its parts (`[7,"0b5d…"]`). Reports show keys the same way, and JSON output uses
//! the natural JSON value (a number, a string, an array).
//!
//! twintrack never does arithmetic on keys: ranges are bounded by keys taken from the data
//! and compared by the database (`(k1, k2) > ($1, $2)`), so sparse, skewed, negative, extreme
//! and non-numeric keys all work.

use std::fmt;

use serde::Serialize;
use serde_json::Value as Json;
use uuid::Uuid;

use crate::db::{Row, Value};
use crate::{Error, Result};

/// The most columns a composite key may have.
pub const MAX_KEY_COLUMNS: usize = 3;

/// The type of one key column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// A 64-bit integer (`bigint`; SQLite `INTEGER`).
    BigInt,
    /// A 32- or 16-bit integer (`integer`, `smallint`).
    Int,
    /// A UUID (`uuid`; on SQLite a column declared `UUID`, holding sqlx's 16-byte blobs).
    Uuid,
    /// Text (`text`, `varchar`), ordered by the column's collation.
    Text,
}

impl KeyKind {
    /// How the kind is written in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyKind::BigInt => "bigint",
            KeyKind::Int => "integer",
            KeyKind::Uuid => "uuid",
            KeyKind::Text => "text",
        }
    }

    /// The PostgreSQL type a value of this kind is bound as (a `smallint` or `varchar` key
    /// column is cast to it where record values are compared).
    pub(crate) fn postgres_type(self) -> &'static str {
        match self {
            KeyKind::BigInt => "BIGINT",
            KeyKind::Int => "INTEGER",
            KeyKind::Uuid => "UUID",
            KeyKind::Text => "TEXT",
        }
    }

    /// The kind of a PostgreSQL column type (`pg_type.typname`), if it can be a key.
    pub(crate) fn from_postgres(typname: &str) -> Option<KeyKind> {
        match typname {
            "int8" => Some(KeyKind::BigInt),
            "int4" | "int2" => Some(KeyKind::Int),
            "uuid" => Some(KeyKind::Uuid),
            // Not `char(n)`: its comparisons ignore trailing spaces, a text parameter's do not.
            "text" | "varchar" => Some(KeyKind::Text),
            _ => None,
        }
    }

    /// The kind of an SQLite column by its declared type (SQLite's affinity rules; a declared
    /// `UUID` holds UUIDs as sqlx stores them), if it can be a key.
    pub(crate) fn from_sqlite(declared: &str) -> Option<KeyKind> {
        let t = declared.to_ascii_uppercase();
        if t.contains("UUID") {
            Some(KeyKind::Uuid)
        } else if t.contains("INT") {
            Some(KeyKind::BigInt)
        } else if t.contains("CHAR") || t.contains("CLOB") || t.contains("TEXT") {
            Some(KeyKind::Text)
        } else {
            None
        }
    }

    /// The kind of a MySQL/MariaDB column by its `information_schema.columns` `COLUMN_TYPE` and
    /// `COLLATION_NAME`, if it can be a key: signed integers and `varchar` under a binary
    /// no-pad collation ([`mysql_text_key_collation`]). Other text is refused
    /// with [`KeyKind::mysql_text_refusal`]: MySQL's default collations compare case- and
    /// accent-insensitively, and its other `_bin` collations ignore trailing spaces, so two
    /// keys the database holds as one would be two keys to twintrack (and the reverse).
    pub(crate) fn from_mysql(column_type: &str, collation: Option<&str>) -> Option<KeyKind> {
        let t = column_type.to_ascii_lowercase();
        if t.contains("unsigned") {
            return None;
        }
        match t.split('(').next().unwrap_or_default().trim() {
            "bigint" => Some(KeyKind::BigInt),
            "int" | "mediumint" | "smallint" | "tinyint" => Some(KeyKind::Int),
            // MariaDB's (10.7+): its values arrive as text, read as UUIDs (`DynKey::from_row`).
            "uuid" => Some(KeyKind::Uuid),
            "varchar" if collation.is_some_and(mysql_text_key_collation) => Some(KeyKind::Text),
            _ => None,
        }
    }

    /// Why a MySQL/MariaDB text column `table`.`column` of `column_type` under `collation`
    /// cannot be a key, and the remedy; `None` when the column is not text (then the usual list
    /// of key types).
    pub(crate) fn mysql_text_refusal(
        table: &str,
        column: &str,
        column_type: &str,
        collation: Option<&str>,
    ) -> Option<String> {
        let t = column_type.to_ascii_lowercase();
        let base = t.split('(').next().unwrap_or_default().trim().to_owned();
        let collation = collation.unwrap_or("none");
        match base.as_str() {
            "varchar" => Some(format!(
                "its collation {collation} does not compare text byte for byte (case- or accent-insensitive, or ignoring trailing spaces), so keys equal to the database would differ to twintrack; a text key needs a binary no-pad collation: ALTER TABLE {table} MODIFY {column} {t} CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin (MySQL 8: utf8mb4_0900_bin; keep the column's NOT NULL and default)"
            )),
            "char" | "tinytext" | "text" | "mediumtext" | "longtext" => Some(format!(
                "{base} columns pad or need a prefix index, so their equality is not the text's; a text key must be a varchar under a binary no-pad collation (utf8mb4_nopad_bin; MySQL 8: utf8mb4_0900_bin)"
            )),
            _ => None,
        }
    }

    /// What a value of this kind looks like, for error messages.
    fn expected(self) -> &'static str {
        match self {
            KeyKind::BigInt => "a whole number from -9223372036854775808 to 9223372036854775807",
            KeyKind::Int => "a whole number from -2147483648 to 2147483647",
            KeyKind::Uuid => "a UUID (8-4-4-4-12 hex digits)",
            KeyKind::Text => "text",
        }
    }
}

/// Whether a MySQL/MariaDB collation compares text byte for byte, as Rust does, so a
/// `varchar` under it can be a key: MariaDB's `utf8mb4_nopad_bin` and MySQL 8's
/// `utf8mb4_0900_bin` (both `NO PAD`, by code point, which is UTF-8's byte order). Not the
/// older `*_bin` collations: they are `PAD SPACE` (`'a' = 'a '`); not other character sets'
/// no-pad ones: a character set that cannot hold every Rust string turns the rest into `?`
/// (two keys to twintrack, one row to the database).
pub(crate) fn mysql_text_key_collation(collation: &str) -> bool {
    matches!(
        collation.to_ascii_lowercase().as_str(),
        "utf8mb4_nopad_bin" | "utf8mb4_0900_bin"
    )
}

/// Whether Rust's order of keys of `kinds` ([`DynKey`]'s `Ord`) is `backend`'s, so twintrack
/// may pick the larger of two keys itself. Not for text (a collation orders it), nor for
/// MariaDB's `uuid` (it compares two time-based UUIDs node field first, not byte for byte);
/// every walk and range is the database's own order either way.
pub(crate) fn rust_orders_as(backend: crate::Backend, kinds: &[KeyKind]) -> bool {
    kinds.iter().all(|kind| match kind {
        KeyKind::BigInt | KeyKind::Int => true,
        KeyKind::Uuid => backend != crate::Backend::MySql,
        KeyKind::Text => false,
    })
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One column's value of a key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyPart {
    /// A `bigint`.
    BigInt(i64),
    /// An `integer`.
    Int(i32),
    /// A `uuid`.
    Uuid(Uuid),
    /// A `text`.
    Text(String),
}

impl KeyPart {
    /// The part's kind.
    pub fn kind(&self) -> KeyKind {
        match self {
            KeyPart::BigInt(_) => KeyKind::BigInt,
            KeyPart::Int(_) => KeyKind::Int,
            KeyPart::Uuid(_) => KeyKind::Uuid,
            KeyPart::Text(_) => KeyKind::Text,
        }
    }

    /// The part as a statement parameter.
    pub fn to_value(&self) -> Value {
        match self {
            KeyPart::BigInt(v) => Value::I64(*v),
            KeyPart::Int(v) => Value::I32(*v),
            KeyPart::Uuid(v) => Value::Uuid(*v),
            KeyPart::Text(v) => Value::Text(v.clone()),
        }
    }

    /// A part of `kind` from a decoded column value, if the value is of that kind.
    pub fn from_value(kind: KeyKind, value: Value) -> Option<KeyPart> {
        use crate::db::FromValue;
        match kind {
            KeyKind::BigInt => i64::from_value(value).map(KeyPart::BigInt),
            KeyKind::Int => i32::from_value(value).map(KeyPart::Int),
            // Not from text: a UUID column holding text (SQLite) would not compare with the
            // UUIDs bound against it, and walks over it would skip rows.
            KeyKind::Uuid => match value {
                Value::Uuid(u) => Some(KeyPart::Uuid(u)),
                Value::Bytes(b) => Uuid::from_slice(&b).ok().map(KeyPart::Uuid),
                _ => None,
            },
            KeyKind::Text => String::from_value(value).map(KeyPart::Text),
        }
    }

    fn to_json(&self) -> Json {
        match self {
            KeyPart::BigInt(v) => (*v).into(),
            KeyPart::Int(v) => (*v).into(),
            KeyPart::Uuid(v) => v.to_string().into(),
            KeyPart::Text(v) => v.clone().into(),
        }
    }

    fn parse(kind: KeyKind, text: &str) -> Option<KeyPart> {
        match kind {
            KeyKind::BigInt => text.parse().ok().map(KeyPart::BigInt),
            KeyKind::Int => text.parse().ok().map(KeyPart::Int),
            KeyKind::Uuid => Uuid::parse_str(text).ok().map(KeyPart::Uuid),
            KeyKind::Text => Some(KeyPart::Text(text.to_owned())),
        }
    }

    fn from_json(kind: KeyKind, json: &Json) -> Option<KeyPart> {
        match (kind, json) {
            (KeyKind::BigInt, Json::Number(n)) => n.as_i64().map(KeyPart::BigInt),
            (KeyKind::Int, Json::Number(n)) => n
                .as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .map(KeyPart::Int),
            (KeyKind::Uuid | KeyKind::Text, Json::String(s)) => KeyPart::parse(kind, s),
            _ => None,
        }
    }
}

impl fmt::Display for KeyPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyPart::BigInt(v) => write!(f, "{v}"),
            KeyPart::Int(v) => write!(f, "{v}"),
            KeyPart::Uuid(v) => write!(f, "{v}"),
            KeyPart::Text(v) => f.write_str(v),
        }
    }
}

/// A key whose column kinds are known at run time: one to [`MAX_KEY_COLUMNS`] parts.
///
/// Displays as its canonical text; serializes as its natural JSON value (a number or a string
/// for one column, an array for several).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DynKey(Vec<KeyPart>);

impl DynKey {
    /// A key of these parts (1 to [`MAX_KEY_COLUMNS`]).
    pub fn new(parts: Vec<KeyPart>) -> Result<DynKey> {
        if parts.is_empty() || parts.len() > MAX_KEY_COLUMNS {
            return Err(Error::InvalidInput(format!(
                "a key has 1 to {MAX_KEY_COLUMNS} columns, not {}",
                parts.len()
            )));
        }
        Ok(DynKey(parts))
    }

    /// A key of `kinds` from decoded column values (in key order). [`Error::Internal`] when a
    /// value is not of its column's kind (an SQLite column holding a text where its declared
    /// type says integer, say).
    pub fn from_values(
        values: impl IntoIterator<Item = Value>,
        kinds: &[KeyKind],
    ) -> Result<DynKey> {
        DynKey::from_decoded(values, kinds, false)
    }

    /// A key of `kinds` from the first columns of `row`, as [`DynKey::from_values`]; on
    /// MySQL/MariaDB a UUID key column's text is read as the UUID it spells (MariaDB sends its
    /// `uuid` type as text, and compares bound text with it as a UUID).
    pub fn from_row(row: Row, kinds: &[KeyKind]) -> Result<DynKey> {
        let uuids_as_text = row.uuids_as_text;
        DynKey::from_decoded(row.into_values(), kinds, uuids_as_text)
    }

    /// [`DynKey::from_values`] for values taken out of `row` (by name, say): read as
    /// [`DynKey::from_row`] reads them.
    pub(crate) fn from_values_of(
        row: &Row,
        values: impl IntoIterator<Item = Value>,
        kinds: &[KeyKind],
    ) -> Result<DynKey> {
        DynKey::from_decoded(values, kinds, row.uuids_as_text)
    }

    /// Not from text on other backends: an SQLite `UUID` column holding text would not
    /// compare with the UUIDs (16-byte blobs) bound against it, and walks over it would skip
    /// rows.
    fn from_decoded(
        values: impl IntoIterator<Item = Value>,
        kinds: &[KeyKind],
        uuids_as_text: bool,
    ) -> Result<DynKey> {
        let mut parts = Vec::with_capacity(kinds.len());
        let mut values = values.into_iter();
        for kind in kinds {
            let mut value = values
                .next()
                .ok_or_else(|| Error::Internal("a key column is missing from the row".into()))?;
            if let (KeyKind::Uuid, true, Value::Text(text)) = (kind, uuids_as_text, &value)
                && let Ok(uuid) = Uuid::try_parse(text)
            {
                value = Value::Uuid(uuid);
            }
            let shown = value.kind();
            parts.push(KeyPart::from_value(*kind, value).ok_or_else(|| {
                Error::Internal(format!(
                    "a key column holds a {shown} value where its type says {kind}"
                ))
            })?);
        }
        DynKey::new(parts)
    }

    /// A one-column key.
    pub fn single(part: KeyPart) -> DynKey {
        DynKey(vec![part])
    }

    /// The parts, in key order.
    pub fn parts(&self) -> &[KeyPart] {
        &self.0
    }

    /// The parts' kinds.
    pub fn kinds(&self) -> Vec<KeyKind> {
        self.0.iter().map(KeyPart::kind).collect()
    }

    /// The canonical text (see the [module docs](self)).
    pub fn to_text(&self) -> String {
        match self.0.as_slice() {
            [one] => one.to_string(),
            parts => Json::Array(parts.iter().map(KeyPart::to_json).collect()).to_string(),
        }
    }

    /// The natural JSON value: a number or string for one column, an array for several.
    pub fn to_json(&self) -> Json {
        match self.0.as_slice() {
            [one] => one.to_json(),
            parts => Json::Array(parts.iter().map(KeyPart::to_json).collect()),
        }
    }

    /// Parses a canonical text (or a key typed by a person in the same form) as a key of
    /// `kinds`. [`Error::InvalidInput`] names the key and what was expected.
    pub fn parse(text: &str, kinds: &[KeyKind]) -> Result<DynKey> {
        let shown: String = text.chars().take(100).collect();
        let bad = |why: String| Error::InvalidInput(format!("key {shown:?}: {why}"));
        match kinds {
            [] => Err(bad("no key columns".into())),
            [kind] => KeyPart::parse(*kind, text)
                .map(DynKey::single)
                .ok_or_else(|| bad(format!("expected {}", kind.expected()))),
            kinds => {
                let expected = || {
                    format!(
                        "expected a JSON array of {} values ({})",
                        kinds.len(),
                        kinds
                            .iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                let json: Json = serde_json::from_str(text).map_err(|_| bad(expected()))?;
                DynKey::from_json(&json, kinds).map_err(|_| bad(expected()))
            }
        }
    }

    /// A key of `kinds` from its natural JSON value.
    pub fn from_json(json: &Json, kinds: &[KeyKind]) -> Result<DynKey> {
        let bad = || {
            let shown: String = json.to_string().chars().take(100).collect();
            Error::InvalidInput(format!(
                "key {shown}: expected {}",
                kinds
                    .iter()
                    .map(|k| k.expected())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        let parts = match (kinds, json) {
            ([kind], json) => vec![KeyPart::from_json(*kind, json).ok_or_else(bad)?],
            (kinds, Json::Array(items)) if items.len() == kinds.len() && kinds.len() > 1 => kinds
                .iter()
                .zip(items)
                .map(|(k, j)| KeyPart::from_json(*k, j).ok_or_else(bad))
                .collect::<Result<_>>()?,
            _ => return Err(bad()),
        };
        DynKey::new(parts)
    }
}

impl fmt::Display for DynKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

impl Serialize for DynKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

/// A migration's key as a Rust type: `i64`, `i32`, `uuid::Uuid`, `String`, or a tuple of two
/// or three of them (a composite key, in column order).
pub trait Key: Clone + fmt::Debug + Send + Sync + 'static {
    /// The kinds of the key's columns, in order.
    const KINDS: &'static [KeyKind];

    /// The key with its kinds known at run time.
    fn to_dyn(&self) -> DynKey;

    /// The key from a [`DynKey`]; [`Error::InvalidInput`] if its kinds are not [`Key::KINDS`].
    fn from_dyn(key: DynKey) -> Result<Self>;

    /// The canonical text (see the [module docs](self)).
    fn to_text(&self) -> String {
        self.to_dyn().to_text()
    }

    /// Parses a canonical text; [`Error::InvalidInput`] names the key and what was expected.
    fn parse(text: &str) -> Result<Self> {
        Self::from_dyn(DynKey::parse(text, Self::KINDS)?)
    }
}

/// One column of a [`Key`]: `i64`, `i32`, `uuid::Uuid` or `String`.
pub trait KeyScalar: Clone + fmt::Debug + Send + Sync + 'static {
    /// The column's kind.
    const KIND: KeyKind;
    /// As a key part.
    fn into_part(self) -> KeyPart;
    /// From a key part of [`KeyScalar::KIND`].
    fn from_part(part: KeyPart) -> Option<Self>;
}

macro_rules! scalar {
    ($t:ty, $kind:ident) => {
        impl KeyScalar for $t {
            const KIND: KeyKind = KeyKind::$kind;
            fn into_part(self) -> KeyPart {
                KeyPart::$kind(self)
            }
            fn from_part(part: KeyPart) -> Option<Self> {
                match part {
                    KeyPart::$kind(v) => Some(v),
                    _ => None,
                }
            }
        }

        impl Key for $t {
            const KINDS: &'static [KeyKind] = &[KeyKind::$kind];
            fn to_dyn(&self) -> DynKey {
                DynKey::single(self.clone().into_part())
            }
            fn from_dyn(key: DynKey) -> Result<Self> {
                let shown = key.to_text();
                let mut parts = key.0.into_iter();
                match (parts.next().and_then(<$t>::from_part), parts.next()) {
                    (Some(v), None) => Ok(v),
                    _ => Err(kind_error(&shown, Self::KINDS)),
                }
            }
        }
    };
}

scalar!(i64, BigInt);
scalar!(i32, Int);
scalar!(Uuid, Uuid);
scalar!(String, Text);

fn kind_error(shown: &str, kinds: &[KeyKind]) -> Error {
    let kinds: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    Error::InvalidInput(format!(
        "key {shown:?} is not a key of ({})",
        kinds.join(", ")
    ))
}

impl<A: KeyScalar, B: KeyScalar> Key for (A, B) {
    const KINDS: &'static [KeyKind] = &[A::KIND, B::KIND];
    fn to_dyn(&self) -> DynKey {
        DynKey(vec![self.0.clone().into_part(), self.1.clone().into_part()])
    }
    fn from_dyn(key: DynKey) -> Result<Self> {
        let shown = key.to_text();
        let mut parts = key.0.into_iter();
        match (
            parts.next().and_then(A::from_part),
            parts.next().and_then(B::from_part),
            parts.next(),
        ) {
            (Some(a), Some(b), None) => Ok((a, b)),
            _ => Err(kind_error(&shown, Self::KINDS)),
        }
    }
}

impl<A: KeyScalar, B: KeyScalar, C: KeyScalar> Key for (A, B, C) {
    const KINDS: &'static [KeyKind] = &[A::KIND, B::KIND, C::KIND];
    fn to_dyn(&self) -> DynKey {
        DynKey(vec![
            self.0.clone().into_part(),
            self.1.clone().into_part(),
            self.2.clone().into_part(),
        ])
    }
    fn from_dyn(key: DynKey) -> Result<Self> {
        let shown = key.to_text();
        let mut parts = key.0.into_iter();
        match (
            parts.next().and_then(A::from_part),
            parts.next().and_then(B::from_part),
            parts.next().and_then(C::from_part),
            parts.next(),
        ) {
            (Some(a), Some(b), Some(c), None) => Ok((a, b, c)),
            _ => Err(kind_error(&shown, Self::KINDS)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_text_keys_need_a_collation_that_compares_byte_for_byte() {
        let text = |ty, collation| KeyKind::from_mysql(ty, Some(collation));
        assert_eq!(
            text("varchar(64)", "utf8mb4_nopad_bin"),
            Some(KeyKind::Text)
        );
        assert_eq!(text("VARCHAR(64)", "utf8mb4_0900_bin"), Some(KeyKind::Text));
        for collation in [
            "latin1_nopad_bin",
            "utf8mb4_bin",
            "utf8mb4_general_ci",
            "utf8mb4_0900_ai_ci",
            "latin1_swedish_ci",
            "utf8mb4_nopad_general_ci",
        ] {
            assert_eq!(text("varchar(64)", collation), None, "{collation}");
            let why =
                KeyKind::mysql_text_refusal("t", "k", "varchar(64)", Some(collation)).unwrap();
            assert!(
                why.contains(collation) && why.contains("ALTER TABLE t MODIFY k varchar(64)"),
                "{why}"
            );
        }
        for ty in ["char(10)", "text", "tinytext", "longtext"] {
            assert_eq!(text(ty, "utf8mb4_nopad_bin"), None, "{ty}");
            assert!(KeyKind::mysql_text_refusal("t", "k", ty, Some("utf8mb4_nopad_bin")).is_some());
        }
        assert_eq!(KeyKind::from_mysql("varchar(64)", None), None);
        assert_eq!(
            KeyKind::from_mysql("bigint(20)", None),
            Some(KeyKind::BigInt)
        );
        assert_eq!(KeyKind::from_mysql("bigint(20) unsigned", None), None);
        assert_eq!(KeyKind::from_mysql("uuid", None), Some(KeyKind::Uuid));
        assert_eq!(KeyKind::mysql_text_refusal("t", "k", "double", None), None);
    }

    fn round_trip<K: Key + PartialEq>(key: K) {
        let text = key.to_text();
        assert_eq!(K::parse(&text).unwrap(), key, "{text}");
        let dynamic = DynKey::parse(&text, K::KINDS).unwrap();
        assert_eq!(dynamic.to_text(), text);
        assert_eq!(
            DynKey::from_json(&dynamic.to_json(), K::KINDS).unwrap(),
            dynamic
        );
    }

    #[test]
    fn every_kind_round_trips_through_its_canonical_text() {
        for v in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX] {
            round_trip(v);
        }
        for v in [i32::MIN, 0, i32::MAX] {
            round_trip(v);
        }
        round_trip(Uuid::nil());
        round_trip(Uuid::max());
        round_trip(Uuid::new_v4());
        for s in [
            "",
            " ",
            "a,b",
            "[1,2]",
            "\"quoted\"",
            "naïve ✓",
            "line\nbreak",
            "00123",
        ] {
            round_trip(s.to_owned());
        }
        round_trip((i64::MIN, Uuid::new_v4()));
        round_trip((7i64, "[\"x\"]".to_owned(), i32::MAX));
    }

    #[test]
    fn canonical_texts_are_natural() {
        assert_eq!(42i64.to_text(), "42");
        let u = Uuid::parse_str("0B5D5E2C-89AB-4CDE-8F01-23456789ABCD").unwrap();
        assert_eq!(u.to_text(), "0b5d5e2c-89ab-4cde-8f01-23456789abcd");
        assert_eq!(
            (5i64, u).to_text(),
            "[5,\"0b5d5e2c-89ab-4cde-8f01-23456789abcd\"]"
        );
        assert_eq!(serde_json::to_string(&42i64.to_dyn()).unwrap(), "42");
    }

    #[test]
    fn keys_of_the_wrong_type_are_refused_with_the_key_named() {
        for (text, kinds) in [
            ("abc", &[KeyKind::BigInt][..]),
            ("9223372036854775808", &[KeyKind::BigInt]),
            ("2147483648", &[KeyKind::Int]),
            ("1.5", &[KeyKind::BigInt]),
            ("not-a-uuid", &[KeyKind::Uuid]),
            ("5", &[KeyKind::BigInt, KeyKind::Uuid]),
            ("[5]", &[KeyKind::BigInt, KeyKind::Uuid]),
            ("[5, 6]", &[KeyKind::BigInt, KeyKind::Uuid]),
            (
                "[\"5\", \"0b5d5e2c-89ab-4cde-8f01-23456789abcd\"]",
                &[KeyKind::BigInt, KeyKind::Uuid],
            ),
        ] {
            let err = DynKey::parse(text, kinds).unwrap_err().to_string();
            assert!(err.contains("key "), "{err}");
            assert!(matches!(
                DynKey::parse(text, kinds),
                Err(Error::InvalidInput(_))
            ));
        }
        assert!(i64::from_dyn(DynKey::single(KeyPart::Text("1".into()))).is_err());
        assert!(<(i64, Uuid)>::from_dyn(DynKey::single(KeyPart::BigInt(1))).is_err());
    }
}
