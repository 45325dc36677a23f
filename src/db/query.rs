//! twintrack's own statements, written once and run on any backend's native driver.
//!
//! A [`Query`] holds SQL text and its parameters as [`Value`]s. Running it on a [`Database`]
//! (its pool), a [`Tx`] or a borrowed native connection ([`Conn`]) binds each value with the
//! backend's native type and decodes the rows into [`Row`]s. Parameters are written `$1`,
//! `$2`, … on every backend (PostgreSQL's syntax, which SQLite accepts too); MySQL's `?` comes
//! from `mysql.rs`, in one place.
//!
//! SQL is either a `&'static str` ([`query`]) or text assembled from identifiers that were
//! validated and quoted by [`quote_ident`](super::quote_ident) first ([`Query::assert_safe`]):
//! values always travel as parameters.

use std::borrow::Cow;

use super::value::{FromValue, Row, Value};
use super::{Conn, Database, Pool, Tx};
use crate::key::DynKey;
use crate::{Error, Result};

/// A statement and its parameters. Build it with [`query`].
#[derive(Clone, Debug)]
#[must_use = "a query does nothing until it is run"]
pub struct Query {
    pub(crate) sql: Cow<'static, str>,
    pub(crate) args: Vec<Value>,
}

/// A statement with fixed SQL text.
pub fn query(sql: &'static str) -> Query {
    Query {
        sql: Cow::Borrowed(sql),
        args: Vec::new(),
    }
}

/// Where a statement runs: a pool (each statement on any pooled connection) or one connection
/// (inside a transaction, say).
pub enum On<'e> {
    /// Any connection of this database's pool.
    Pool(&'e Database),
    /// This connection.
    Conn(Conn<'e>),
}

impl<'e> From<&'e Database> for On<'e> {
    fn from(db: &'e Database) -> On<'e> {
        On::Pool(db)
    }
}

impl<'e> From<Conn<'e>> for On<'e> {
    fn from(conn: Conn<'e>) -> On<'e> {
        On::Conn(conn)
    }
}

impl<'e, 'c> From<&'e mut Conn<'c>> for On<'e> {
    fn from(conn: &'e mut Conn<'c>) -> On<'e> {
        On::Conn(conn.reborrow())
    }
}

impl<'e> From<&'e mut Tx> for On<'e> {
    fn from(tx: &'e mut Tx) -> On<'e> {
        On::Conn(tx.conn())
    }
}

/// What a run should hand back.
#[derive(Clone, Copy)]
pub(crate) enum Want {
    Affected,
    Rows,
    AtMostOne,
}

pub(crate) enum Output {
    Affected(u64),
    Rows(Vec<Row>),
}

impl Query {
    /// A statement whose text was assembled at run time. Every identifier in it must have gone
    /// through [`quote_ident`](super::quote_ident) (or come from a definition, which quotes
    /// its own); values go in as parameters, never as text.
    pub fn assert_safe(sql: impl Into<String>) -> Query {
        Query {
            sql: Cow::Owned(sql.into()),
            args: Vec::new(),
        }
    }

    /// Binds the next parameter.
    pub fn bind(mut self, value: impl Into<Value>) -> Query {
        self.args.push(value.into());
        self
    }

    /// Binds each part of `key`, in key order, as the next parameters.
    pub fn bind_key(mut self, key: &DynKey) -> Query {
        self.args.extend(key.parts().iter().map(|p| p.to_value()));
        self
    }

    /// The SQL text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    async fn run(self, on: On<'_>, want: Want) -> Result<Output> {
        let result = match on {
            On::Pool(db) => match db.pool() {
                #[cfg(feature = "postgres")]
                Pool::Postgres(pool) => super::postgres::run(pool, self, want).await,
                #[cfg(feature = "sqlite")]
                Pool::Sqlite(pool) => super::sqlite::run(pool, self, want).await,
                #[cfg(feature = "mysql")]
                Pool::MySql(pool) => super::mysql::run(pool, self, want).await,
            },
            On::Conn(conn) => match conn {
                #[cfg(feature = "postgres")]
                Conn::Postgres(conn) => super::postgres::run(conn, self, want).await,
                #[cfg(feature = "sqlite")]
                Conn::Sqlite(conn) => super::sqlite::run(conn, self, want).await,
                #[cfg(feature = "mysql")]
                Conn::MySql(conn) => super::mysql::run(conn, self, want).await,
            },
        };
        result.map_err(Error::from_sqlx)
    }

    /// Runs the statement; returns the rows it changed.
    pub async fn execute<'e>(self, on: impl Into<On<'e>>) -> Result<u64> {
        match self.run(on.into(), Want::Affected).await? {
            Output::Affected(n) => Ok(n),
            Output::Rows(rows) => Ok(rows.len() as u64),
        }
    }

    /// Every row.
    pub async fn fetch_all<'e>(self, on: impl Into<On<'e>>) -> Result<Vec<Row>> {
        match self.run(on.into(), Want::Rows).await? {
            Output::Rows(rows) => Ok(rows),
            Output::Affected(_) => Ok(Vec::new()),
        }
    }

    /// The first row, if any.
    pub async fn fetch_optional<'e>(self, on: impl Into<On<'e>>) -> Result<Option<Row>> {
        match self.run(on.into(), Want::AtMostOne).await? {
            Output::Rows(rows) => Ok(rows.into_iter().next()),
            Output::Affected(_) => Ok(None),
        }
    }

    /// The first row; an error when there is none.
    pub async fn fetch_one<'e>(self, on: impl Into<On<'e>>) -> Result<Row> {
        self.fetch_optional(on)
            .await?
            .ok_or_else(|| Error::from_sqlx(sqlx::Error::RowNotFound))
    }

    /// Runs the statement on `db`'s pool and hands each row to `f` as the driver receives it,
    /// so a result of any size is read in bounded memory. Returns how many rows there were; an
    /// error from `f` stops the statement.
    pub(crate) async fn for_each(
        self,
        db: &Database,
        mut f: impl FnMut(Row) -> Result<()> + Send,
    ) -> Result<u64> {
        match db.pool() {
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => super::postgres::each(pool, self, &mut f).await,
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => super::sqlite::each(pool, self, &mut f).await,
            #[cfg(feature = "mysql")]
            Pool::MySql(pool) => super::mysql::each(pool, self, &mut f).await,
        }
    }

    /// The first column of the first row, read as `T`.
    pub async fn scalar<'e, T: FromValue>(self, on: impl Into<On<'e>>) -> Result<T> {
        self.fetch_one(on).await?.get_at(0)
    }
}

/// Runs one or more statements separated by `;`, without parameters (DDL).
pub(crate) async fn raw(sql: &'static str, conn: Conn<'_>) -> Result<()> {
    let result = match conn {
        #[cfg(feature = "postgres")]
        Conn::Postgres(conn) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(conn)
            .await
            .map(drop),
        #[cfg(feature = "sqlite")]
        Conn::Sqlite(conn) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(conn)
            .await
            .map(drop),
        #[cfg(feature = "mysql")]
        Conn::MySql(conn) => sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(conn)
            .await
            .map(drop),
    };
    result.map_err(Error::from_sqlx)
}

/// Column names of a native row, shared by every row of one result.
pub(crate) fn names<C: sqlx::Column>(columns: &[C]) -> std::sync::Arc<[Box<str>]> {
    columns.iter().map(|c| c.name().into()).collect()
}
