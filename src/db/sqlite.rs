//! SQLite: binding [`Value`]s and decoding rows for [`Query`].

use futures_util::TryStreamExt;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row as _, Sqlite, TypeInfo, ValueRef};

use super::query::{Output, Query, Want, names};
use super::value::{Row, Value};

/// `q`'s text with its values bound natively.
fn bound(q: Query) -> sqlx::query::Query<'static, Sqlite, sqlx::sqlite::SqliteArguments> {
    let mut query = sqlx::query(AssertSqlSafe(q.sql));
    for value in q.args {
        query = match value {
            Value::Null => query.bind(None::<i64>),
            Value::Bool(v) => query.bind(v),
            Value::I32(v) => query.bind(v),
            Value::I64(v) => query.bind(v),
            Value::F64(v) => query.bind(v),
            Value::Text(v) => query.bind(v),
            Value::Bytes(v) => query.bind(v),
            // A 16-byte blob, as sqlx stores a `Uuid` in SQLite.
            Value::Uuid(v) => query.bind(v),
        };
    }
    query
}

/// Runs `q` on `pool` and hands each row to `f` as it arrives: the rows are never all held at
/// once. Returns how many rows there were.
pub(super) async fn each(
    pool: &sqlx::SqlitePool,
    q: Query,
    f: &mut (dyn FnMut(Row) -> crate::Result<()> + Send),
) -> crate::Result<u64> {
    let mut stream = bound(q).fetch(pool);
    let mut shared_names = None;
    let mut seen = 0u64;
    while let Some(row) = stream.try_next().await.map_err(crate::Error::from_sqlx)? {
        let names = shared_names
            .get_or_insert_with(|| names(row.columns()))
            .clone();
        let values = (0..row.len())
            .map(|i| decode(&row, i))
            .collect::<sqlx::Result<_>>()
            .map_err(crate::Error::from_sqlx)?;
        f(Row {
            names,
            values,
            uuids_as_text: false,
        })?;
        seen += 1;
    }
    Ok(seen)
}

pub(super) async fn run<'c, E>(executor: E, q: Query, want: Want) -> sqlx::Result<Output>
where
    E: sqlx::Executor<'c, Database = Sqlite>,
{
    let query = bound(q);
    match want {
        Want::Affected => Ok(Output::Affected(
            query.execute(executor).await?.rows_affected(),
        )),
        Want::Rows => rows(query.fetch_all(executor).await?),
        Want::AtMostOne => {
            let mut stream = query.fetch(executor);
            let first = stream.try_next().await?;
            rows(first.into_iter().collect())
        }
    }
}

fn rows(native: Vec<SqliteRow>) -> sqlx::Result<Output> {
    let Some(first) = native.first() else {
        return Ok(Output::Rows(Vec::new()));
    };
    let names = names(first.columns());
    native
        .iter()
        .map(|row| {
            let values = (0..row.len())
                .map(|i| decode(row, i))
                .collect::<sqlx::Result<_>>()?;
            Ok(Row {
                names: names.clone(),
                values,
                uuids_as_text: false,
            })
        })
        .collect::<sqlx::Result<_>>()
        .map(Output::Rows)
}

/// By the value's storage class (SQLite types values, not columns).
fn decode(row: &SqliteRow, i: usize) -> sqlx::Result<Value> {
    let raw = row.try_get_raw(i)?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let class = raw.type_info().name().to_owned();
    Ok(match class.as_str() {
        "INTEGER" | "BOOLEAN" => Value::I64(row.try_get_unchecked(i)?),
        "REAL" => Value::F64(row.try_get_unchecked(i)?),
        "BLOB" => Value::Bytes(row.try_get_unchecked(i)?),
        _ => Value::Text(row.try_get_unchecked(i)?),
    })
}
