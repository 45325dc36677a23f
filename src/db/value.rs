//! Values and rows of twintrack's own statements, the same on every backend.
//!
//! Each backend's driver decodes its native row into a [`Row`] of [`Value`]s by the column's
//! type (PostgreSQL) or the value's storage class (SQLite); [`FromValue`] reads them back into
//! Rust types, accepting the forms a backend may hand back for one logical type (an SQLite
//! boolean is an integer, an SQLite UUID a 16-byte blob).

use std::sync::Arc;

use uuid::Uuid;

use crate::{Error, Result};

/// One bound parameter or one decoded column value.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Value {
    /// SQL `NULL`.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 32-bit integer (PostgreSQL `integer`).
    I32(i32),
    /// A 64-bit integer (PostgreSQL `bigint`, SQLite `INTEGER`).
    I64(i64),
    /// A double.
    F64(f64),
    /// Text.
    Text(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A UUID (PostgreSQL `uuid`; a 16-byte blob on SQLite, as sqlx stores it).
    Uuid(Uuid),
}

impl Value {
    /// The value's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "boolean",
            Value::I32(_) => "integer",
            Value::I64(_) => "bigint",
            Value::F64(_) => "double",
            Value::Text(_) => "text",
            Value::Bytes(_) => "bytes",
            Value::Uuid(_) => "uuid",
        }
    }

    /// The value as JSON: numbers, strings, booleans, null. What JSON has no value for keeps
    /// its own shape, so it never equals another value's JSON: bytes as `{"bytes": "<hex>"}`,
    /// a float that is not finite as `{"float": "inf"}` (`-inf`, `NaN`).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::I32(v) => (*v).into(),
            Value::I64(v) => (*v).into(),
            Value::F64(v) if v.is_finite() => (*v).into(),
            Value::F64(v) => serde_json::json!({ "float": v.to_string() }),
            Value::Text(s) => s.clone().into(),
            Value::Bytes(b) => serde_json::json!({ "bytes": crate::util::hex(b) }),
            Value::Uuid(u) => u.to_string().into(),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Value {
                Value::$v(v.into())
            }
        }
    )*};
}

value_from!(bool => Bool, i32 => I32, i64 => I64, f64 => F64, String => Text, Vec<u8> => Bytes, Uuid => Uuid);

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Value {
        Value::Text(v.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// A Rust type a [`Value`] can be read as.
pub trait FromValue: Sized {
    /// The value as `Self`, or `None` when it is of another kind.
    fn from_value(value: Value) -> Option<Self>;
}

impl FromValue for Value {
    fn from_value(value: Value) -> Option<Self> {
        Some(value)
    }
}

impl FromValue for i64 {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::I64(v) => Some(v),
            Value::I32(v) => Some(v.into()),
            Value::Bool(b) => Some(b.into()),
            _ => None,
        }
    }
}

impl FromValue for i32 {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::I32(v) => Some(v),
            Value::I64(v) => i32::try_from(v).ok(),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::F64(v) => Some(v),
            Value::I64(v) => Some(v as f64),
            Value::I32(v) => Some(v.into()),
            _ => None,
        }
    }
}

impl FromValue for bool {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(b),
            Value::I64(v) => Some(v != 0),
            Value::I32(v) => Some(v != 0),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

impl FromValue for Uuid {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Uuid(u) => Some(u),
            Value::Bytes(b) => Uuid::from_slice(&b).ok(),
            Value::Text(s) => Uuid::parse_str(&s).ok(),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One row of a twintrack statement: its columns by name and position.
#[derive(Clone, Debug)]
pub struct Row {
    pub(crate) names: Arc<[Box<str>]>,
    pub(crate) values: Vec<Value>,
    /// The row came from MySQL/MariaDB, which sends MariaDB's `uuid` type as its text (sqlx
    /// does not ask for MariaDB's extended type information), so a UUID key column's text is
    /// a UUID there (see [`crate::DynKey::from_row`]).
    pub(crate) uuids_as_text: bool,
}

impl Row {
    /// Column `name` read as `T`; an error names the column when it is missing or of another
    /// kind.
    pub fn get<T: FromValue>(&self, name: &str) -> Result<T> {
        let index = self
            .names
            .iter()
            .position(|n| &**n == name)
            .ok_or_else(|| Error::Internal(format!("no column {name:?} in the result")))?;
        self.get_at(index)
    }

    /// Column `index` (from 0) read as `T`.
    pub fn get_at<T: FromValue>(&self, index: usize) -> Result<T> {
        let value = self
            .values
            .get(index)
            .ok_or_else(|| Error::Internal(format!("no column {index} in the result")))?;
        let kind = value.kind();
        T::from_value(value.clone()).ok_or_else(|| {
            Error::Internal(format!(
                "column {:?} holds a {kind}, not a {}",
                self.names.get(index).map_or("?", |n| &**n),
                std::any::type_name::<T>()
            ))
        })
    }

    /// The column names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(|n| &**n)
    }

    /// The values, in column order.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// The values, taken out of the row.
    pub fn into_values(self) -> Vec<Value> {
        self.values
    }
}
