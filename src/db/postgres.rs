//! PostgreSQL: binding [`Value`]s and decoding rows for [`Query`].

use futures_util::TryStreamExt;
use sqlx::postgres::{PgRow, PgTypeInfo};
use sqlx::{AssertSqlSafe, Column, Postgres, Row as _, TypeInfo, ValueRef};

use super::query::{Output, Query, Want, names};
use super::value::{Row, Value};

/// A NULL of no declared type, so PostgreSQL infers it from where it is used (a typed NULL,
/// say `bigint`, would be refused in a `text` column).
struct UntypedNull;

impl sqlx::Type<Postgres> for UntypedNull {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(sqlx::postgres::types::Oid(0))
    }
}

impl sqlx::Encode<'_, Postgres> for UntypedNull {
    fn encode_by_ref(
        &self,
        _: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        Ok(sqlx::encode::IsNull::Yes)
    }
}

/// `q`'s text with its values bound natively.
fn bound(q: Query) -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> {
    let mut query = sqlx::query(AssertSqlSafe(q.sql));
    for value in q.args {
        query = match value {
            Value::Null => query.bind(UntypedNull),
            Value::Bool(v) => query.bind(v),
            Value::I32(v) => query.bind(v),
            Value::I64(v) => query.bind(v),
            Value::F64(v) => query.bind(v),
            Value::Text(v) => query.bind(v),
            Value::Bytes(v) => query.bind(v),
            Value::Uuid(v) => query.bind(v),
        };
    }
    query
}

/// Runs `q` on `pool` and hands each row to `f` as it arrives: the rows are never all held at
/// once. Returns how many rows there were.
pub(super) async fn each(
    pool: &sqlx::PgPool,
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
    E: sqlx::Executor<'c, Database = Postgres>,
{
    let query = bound(q);
    match want {
        Want::Affected => Ok(Output::Affected(
            query.execute(executor).await?.rows_affected(),
        )),
        Want::Rows => rows(query.fetch_all(executor).await?),
        Want::AtMostOne => {
            // Stop after the first row rather than reading them all.
            let mut stream = query.fetch(executor);
            let first = stream.try_next().await?;
            rows(first.into_iter().collect())
        }
    }
}

fn rows(native: Vec<PgRow>) -> sqlx::Result<Output> {
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

fn decode(row: &PgRow, i: usize) -> sqlx::Result<Value> {
    if row.try_get_raw(i)?.is_null() {
        return Ok(Value::Null);
    }
    let column = &row.columns()[i];
    Ok(match column.type_info().name() {
        "INT8" => Value::I64(row.try_get(i)?),
        "INT4" => Value::I32(row.try_get(i)?),
        "INT2" => Value::I32(row.try_get::<i16, _>(i)?.into()),
        "OID" => Value::I64(row.try_get::<sqlx::postgres::types::Oid, _>(i)?.0.into()),
        "BOOL" => Value::Bool(row.try_get(i)?),
        "FLOAT8" => Value::F64(row.try_get(i)?),
        "FLOAT4" => Value::F64(row.try_get::<f32, _>(i)?.into()),
        "TEXT" | "VARCHAR" | "BPCHAR" | "NAME" => Value::Text(row.try_get(i)?),
        "UUID" => Value::Uuid(row.try_get(i)?),
        "BYTEA" => Value::Bytes(row.try_get(i)?),
        "VOID" => Value::Null,
        other => {
            return Err(sqlx::Error::ColumnDecode {
                index: column.name().to_owned(),
                source: format!("twintrack reads no {other} values here: CAST the column to TEXT")
                    .into(),
            });
        }
    })
}
