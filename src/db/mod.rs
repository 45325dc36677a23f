//! Databases: twintrack's handle on a pool, the native-driver seam, and identifier quoting.
//!
//! twintrack runs on sqlx's native drivers. A [`Database`] is a cheap handle on a native pool
//! (`PgPool`, `SqlitePool` or `MySqlPool`), made from the pool a service already has
//! (`Database::from(pool)`) or from a URL ([`Database::connect`], which picks the driver by
//! its scheme, as the CLI does). twintrack's own statements are written once as [`Query`]s and
//! run on whichever driver the handle holds; the few statements that differ per backend (DDL,
//! locking) ask [`Database::backend`].
//!
//! Repository code never sees this layer: the dual store hands it the native connection of its
//! database (`&mut PgConnection`, `&mut SqliteConnection`), typed by the [`Native`] trait, so
//! typed queries and the checked `query!` macros work unchanged.
//!
//! Adding a backend means: a [`Pool`], [`Conn`] and `Tx` variant, a module binding and decoding
//! [`Value`]s (see `postgres.rs`), a [`Native`] impl, and its arms where SQL differs.
//!
//! Identifiers that come from configuration go through [`quote_ident`] before they are put
//! into SQL; values always travel as parameters.

mod query;
mod value;

#[cfg(feature = "mysql")]
pub(crate) mod mysql;
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::str::FromStr;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::Connection as _;

pub(crate) use query::raw;
pub use query::{On, Query, query};
pub use value::{FromValue, Row, Value};

use crate::{Error, Result};

#[cfg(feature = "mysql")]
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool};
#[cfg(feature = "postgres")]
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
#[cfg(feature = "sqlite")]
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool};

/// Which database a [`Database`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// PostgreSQL (the main target).
    Postgres,
    /// SQLite (the embedded default).
    Sqlite,
    /// MySQL or MariaDB (InnoDB).
    MySql,
}

impl Backend {
    /// OpenTelemetry's `db.system.name`: `postgresql`, `sqlite`, or `mariadb` (the MySQL
    /// backend runs on MariaDB only).
    pub fn db_system_name(self) -> &'static str {
        match self {
            Backend::Postgres => "postgresql",
            Backend::Sqlite => "sqlite",
            Backend::MySql => "mariadb",
        }
    }

    /// The statement that begins a transaction which will write: on SQLite `BEGIN IMMEDIATE`
    /// takes the write lock up front (a deferred transaction that later writes fails at once
    /// if another writer committed in between); on PostgreSQL plain `BEGIN`.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Backend::Postgres | Backend::MySql => "BEGIN",
            Backend::Sqlite => "BEGIN IMMEDIATE",
        }
    }

    /// The clause that makes a `SELECT` lock the rows it reads against writes, appended to
    /// it: ` FOR SHARE`, ` LOCK IN SHARE MODE` (MySQL), or nothing (SQLite's write
    /// transaction holds the whole database).
    pub(crate) fn share_lock(self) -> &'static str {
        match self {
            Backend::Postgres => " FOR SHARE",
            Backend::MySql => " LOCK IN SHARE MODE",
            Backend::Sqlite => "",
        }
    }

    /// `postgres`, `sqlite` or `mysql` (the key of a definition's per-backend SQL).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
            Backend::MySql => "mysql",
        }
    }

    /// The backend a connection URL names, or an error naming the accepted schemes.
    pub fn from_url(url: &str) -> Result<Backend> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" if cfg!(feature = "postgres") => Ok(Backend::Postgres),
            "sqlite" if cfg!(feature = "sqlite") => Ok(Backend::Sqlite),
            "mysql" | "mariadb" if cfg!(feature = "mysql") => Ok(Backend::MySql),
            _ => Err(Error::InvalidInput(format!(
                "unsupported database URL scheme {scheme:?}: expected postgres://…, sqlite:… or mysql://… (with the matching cargo feature)"
            ))),
        }
    }
}

/// Options for [`Database::connect_with`].
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The most connections the pool opens.
    pub max_connections: u32,
    /// How long to wait for a connection before the database counts as unreachable.
    pub acquire_timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The native pool behind a [`Database`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Pool {
    /// A PostgreSQL pool.
    #[cfg(feature = "postgres")]
    Postgres(PgPool),
    /// An SQLite pool.
    #[cfg(feature = "sqlite")]
    Sqlite(SqlitePool),
    /// A MySQL or MariaDB pool.
    #[cfg(feature = "mysql")]
    MySql(MySqlPool),
}

/// A native pool and the backend behind it: what twintrack's own tables, the router and the
/// tools run on. Cheap to clone (clones share the pool).
#[derive(Clone, Debug)]
pub struct Database {
    pool: Pool,
}

#[cfg(feature = "postgres")]
impl From<PgPool> for Database {
    fn from(pool: PgPool) -> Database {
        Database {
            pool: Pool::Postgres(pool),
        }
    }
}

#[cfg(feature = "sqlite")]
impl From<SqlitePool> for Database {
    fn from(pool: SqlitePool) -> Database {
        Database {
            pool: Pool::Sqlite(pool),
        }
    }
}

#[cfg(feature = "mysql")]
impl From<MySqlPool> for Database {
    fn from(pool: MySqlPool) -> Database {
        Database {
            pool: Pool::MySql(pool),
        }
    }
}

/// The connect options of backend `DB`'s connections.
type ConnectOptionsOf<DB> = <<DB as sqlx::Database>::Connection as sqlx::Connection>::Options;

/// Pool settings from `options`.
fn pool_options<DB: sqlx::Database>(options: &ConnectOptions) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::new()
        .max_connections(options.max_connections)
        .acquire_timeout(options.acquire_timeout)
}

/// One connection opened first, so a wrong URL or a database that is down fails at once with
/// the real cause (the pool alone would retry until its acquire timeout and only report
/// "timed out"); then the pool.
async fn open<DB: Native>(
    opts: ConnectOptionsOf<DB>,
    options: &ConnectOptions,
) -> Result<Database> {
    let probe = tokio::time::timeout(
        options.acquire_timeout,
        <DB::Connection as sqlx::Connection>::connect_with(&opts),
    )
    .await
    .map_err(|_| Error::Unreachable(sqlx::Error::PoolTimedOut))?
    .map_err(Error::from_sqlx)?;
    let _ = probe.close().await;
    let pool = pool_options::<DB>(options)
        .connect_with(opts)
        .await
        .map_err(Error::from_sqlx)?;
    Ok(DB::database(pool))
}

/// Parsed connection options, by backend.
enum Options {
    #[cfg(feature = "postgres")]
    Postgres(PgConnectOptions),
    #[cfg(feature = "sqlite")]
    Sqlite(SqliteConnectOptions),
    #[cfg(feature = "mysql")]
    MySql(MySqlConnectOptions),
}

fn parse_url(url: &str) -> Result<Options> {
    let bad = |e: sqlx::Error| Error::InvalidInput(format!("bad database URL: {e}"));
    match Backend::from_url(url)? {
        #[cfg(feature = "postgres")]
        Backend::Postgres => Ok(Options::Postgres(
            PgConnectOptions::from_str(url).map_err(bad)?,
        )),
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => Ok(Options::Sqlite(
            SqliteConnectOptions::from_str(url).map_err(bad)?,
        )),
        // sqlx parses `mysql://`; `mariadb://` names the same protocol.
        #[cfg(feature = "mysql")]
        Backend::MySql => Ok(Options::MySql(
            MySqlConnectOptions::from_str(&url.replacen("mariadb://", "mysql://", 1))
                .map_err(bad)?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(Error::InvalidInput(format!(
            "this build of twintrack has no {} support",
            other.as_str()
        ))),
    }
}

impl Database {
    /// Connects with default options. Fails with [`Error::Unreachable`] when the database
    /// does not answer (TLS failures included, with sqlx's reason), [`Error::InvalidInput`]
    /// when the URL is not one twintrack can use. PostgreSQL URLs take `sslmode` (`disable`,
    /// `prefer`, `require`, `verify-ca`, `verify-full`) and `sslrootcert`.
    pub async fn connect(url: &str) -> Result<Database> {
        Database::connect_with(url, ConnectOptions::default()).await
    }

    /// Connects with the given options. One connection is opened first, so a wrong URL or a
    /// database that is down fails at once with the real cause (the pool alone would retry
    /// until its acquire timeout and only report "timed out").
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Database> {
        match parse_url(url)? {
            #[cfg(feature = "postgres")]
            Options::Postgres(opts) => open::<sqlx::Postgres>(opts, &options).await,
            #[cfg(feature = "sqlite")]
            Options::Sqlite(opts) => open::<sqlx::Sqlite>(opts, &options).await,
            #[cfg(feature = "mysql")]
            Options::MySql(opts) => open::<sqlx::MySql>(opts, &options).await,
        }
    }

    /// A handle that connects on first use (for a server that may be down at start-up, such as
    /// a replica). Only the URL is checked now.
    pub fn connect_lazy(url: &str) -> Result<Database> {
        Database::connect_lazy_with(url, ConnectOptions::default())
    }

    /// [`Database::connect_lazy`] with options.
    pub fn connect_lazy_with(url: &str, options: ConnectOptions) -> Result<Database> {
        Ok(match parse_url(url)? {
            #[cfg(feature = "postgres")]
            Options::Postgres(opts) => sqlx::Postgres::database(
                pool_options::<sqlx::Postgres>(&options).connect_lazy_with(opts),
            ),
            #[cfg(feature = "sqlite")]
            Options::Sqlite(opts) => sqlx::Sqlite::database(
                pool_options::<sqlx::Sqlite>(&options).connect_lazy_with(opts),
            ),
            #[cfg(feature = "mysql")]
            Options::MySql(opts) => {
                sqlx::MySql::database(pool_options::<sqlx::MySql>(&options).connect_lazy_with(opts))
            }
        })
    }

    /// The native pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The PostgreSQL pool, if this is PostgreSQL.
    #[cfg(feature = "postgres")]
    pub fn as_postgres(&self) -> Option<&PgPool> {
        match &self.pool {
            Pool::Postgres(pool) => Some(pool),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The SQLite pool, if this is SQLite.
    #[cfg(feature = "sqlite")]
    pub fn as_sqlite(&self) -> Option<&SqlitePool> {
        match &self.pool {
            Pool::Sqlite(pool) => Some(pool),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The MySQL/MariaDB pool, if this is MySQL or MariaDB.
    #[cfg(feature = "mysql")]
    pub fn as_mysql(&self) -> Option<&MySqlPool> {
        match &self.pool {
            Pool::MySql(pool) => Some(pool),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The native pool of type `DB`, if this handle holds one.
    pub fn typed<DB: Native>(&self) -> Option<&sqlx::Pool<DB>> {
        DB::typed(self)
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        match &self.pool {
            #[cfg(feature = "postgres")]
            Pool::Postgres(_) => Backend::Postgres,
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(_) => Backend::Sqlite,
            #[cfg(feature = "mysql")]
            Pool::MySql(_) => Backend::MySql,
        }
    }

    /// Where this database is, without credentials: `postgres://user@host:port/db` or
    /// `sqlite:path` (for messages and logs).
    pub fn describe(&self) -> String {
        match &self.pool {
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => {
                let o = pool.connect_options();
                format!(
                    "postgres://{}@{}:{}/{}",
                    o.get_username(),
                    o.get_host(),
                    o.get_port(),
                    o.get_database().unwrap_or_default()
                )
            }
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => {
                format!("sqlite:{}", pool.connect_options().get_filename().display())
            }
            #[cfg(feature = "mysql")]
            Pool::MySql(pool) => {
                let o = pool.connect_options();
                format!(
                    "mysql://{}@{}:{}/{}",
                    o.get_username(),
                    o.get_host(),
                    o.get_port(),
                    o.get_database().unwrap_or_default()
                )
            }
        }
    }

    /// Whether `other` reaches the same database (same server and database name, or the same
    /// SQLite file), whatever its pool settings.
    pub fn same_database(&self, other: &Database) -> bool {
        self.describe() == other.describe()
    }

    /// Begins a transaction that will write (see [`Backend`]: SQLite takes its write lock now).
    pub async fn begin(&self) -> Result<Tx> {
        self.begin_with(self.backend().begin_write()).await
    }

    /// Begins a transaction in which each statement reads the rows committed when it starts
    /// (READ COMMITTED), for work that locks rows and then reads them, or others, with plain
    /// `SELECT`s. PostgreSQL's default already; MySQL's default, REPEATABLE READ, would serve
    /// every plain read from a snapshot taken at the first one, older than rows committed
    /// since (a row locked later is read as it was, or not at all). MySQL: `SET TRANSACTION
    /// ISOLATION LEVEL READ COMMITTED` on the connection, which applies to its next transaction
    /// only. SQLite: [`Database::begin`] (its write lock serialises everything).
    pub async fn begin_read_committed(&self) -> Result<Tx> {
        #[cfg(feature = "mysql")]
        #[allow(irrefutable_let_patterns)] // a build with MySQL only
        if let Pool::MySql(pool) = &self.pool {
            use sqlx::Executor as _;
            let mut conn = pool.acquire().await?;
            conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .await?;
            let tx = sqlx::Transaction::begin(conn, None).await?;
            return Ok(Tx {
                inner: TxInner::MySql(tx),
            });
        }
        self.begin().await
    }

    /// Begins a transaction with `statement` (`BEGIN …`).
    pub async fn begin_with(&self, statement: &'static str) -> Result<Tx> {
        let inner = match &self.pool {
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => {
                TxInner::Postgres(pool.begin_with(AssertSqlSafe(statement)).await?)
            }
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => TxInner::Sqlite(pool.begin_with(AssertSqlSafe(statement)).await?),
            #[cfg(feature = "mysql")]
            Pool::MySql(pool) => TxInner::MySql(pool.begin_with(AssertSqlSafe(statement)).await?),
        };
        Ok(Tx { inner })
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        match &self.pool {
            #[cfg(feature = "postgres")]
            Pool::Postgres(pool) => pool.close().await,
            #[cfg(feature = "sqlite")]
            Pool::Sqlite(pool) => pool.close().await,
            #[cfg(feature = "mysql")]
            Pool::MySql(pool) => pool.close().await,
        }
    }
}

/// A borrowed native connection, for running twintrack's statements on the connection (and in
/// the transaction) a repository operation runs on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Conn<'c> {
    /// A PostgreSQL connection.
    #[cfg(feature = "postgres")]
    Postgres(&'c mut PgConnection),
    /// An SQLite connection.
    #[cfg(feature = "sqlite")]
    Sqlite(&'c mut SqliteConnection),
    /// A MySQL or MariaDB connection.
    #[cfg(feature = "mysql")]
    MySql(&'c mut MySqlConnection),
}

impl Conn<'_> {
    /// The same connection, borrowed again (to run several statements on it).
    pub fn reborrow(&mut self) -> Conn<'_> {
        match self {
            #[cfg(feature = "postgres")]
            Conn::Postgres(c) => Conn::Postgres(c),
            #[cfg(feature = "sqlite")]
            Conn::Sqlite(c) => Conn::Sqlite(c),
            #[cfg(feature = "mysql")]
            Conn::MySql(c) => Conn::MySql(c),
        }
    }

    /// Which database the connection talks to.
    pub fn backend(&self) -> Backend {
        match self {
            #[cfg(feature = "postgres")]
            Conn::Postgres(_) => Backend::Postgres,
            #[cfg(feature = "sqlite")]
            Conn::Sqlite(_) => Backend::Sqlite,
            #[cfg(feature = "mysql")]
            Conn::MySql(_) => Backend::MySql,
        }
    }
}

/// A transaction on a pooled connection. Dropped without [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub struct Tx {
    inner: TxInner,
}

#[derive(Debug)]
enum TxInner {
    #[cfg(feature = "postgres")]
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    #[cfg(feature = "mysql")]
    MySql(sqlx::Transaction<'static, sqlx::MySql>),
}

impl Tx {
    /// The transaction's connection.
    pub fn conn(&mut self) -> Conn<'_> {
        match &mut self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(tx) => Conn::Postgres(tx),
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(tx) => Conn::Sqlite(tx),
            #[cfg(feature = "mysql")]
            TxInner::MySql(tx) => Conn::MySql(tx),
        }
    }

    /// Which database the transaction runs on.
    pub fn backend(&self) -> Backend {
        match &self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(_) => Backend::Postgres,
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(_) => Backend::Sqlite,
            #[cfg(feature = "mysql")]
            TxInner::MySql(_) => Backend::MySql,
        }
    }

    /// Commits.
    pub async fn commit(self) -> Result<()> {
        match self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(tx) => tx.commit().await?,
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(tx) => tx.commit().await?,
            #[cfg(feature = "mysql")]
            TxInner::MySql(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Rolls back.
    pub async fn rollback(self) -> Result<()> {
        match self.inner {
            #[cfg(feature = "postgres")]
            TxInner::Postgres(tx) => tx.rollback().await?,
            #[cfg(feature = "sqlite")]
            TxInner::Sqlite(tx) => tx.rollback().await?,
            #[cfg(feature = "mysql")]
            TxInner::MySql(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "postgres")]
    impl Sealed for sqlx::Postgres {}
    #[cfg(feature = "sqlite")]
    impl Sealed for sqlx::Sqlite {}
    #[cfg(feature = "mysql")]
    impl Sealed for sqlx::MySql {}
}

/// An sqlx database twintrack runs on natively: `sqlx::Postgres` or `sqlx::Sqlite`.
///
/// Generic parts of twintrack (the dual store, the router's typed reads) are written over it:
/// they hand repository code `&mut DB::Connection` and run their own statements on the same
/// connection through [`Native::conn`]. Sealed: a new backend is added inside twintrack.
pub trait Native: sqlx::Database + sealed::Sealed {
    /// Which backend this is.
    const BACKEND: Backend;

    /// The twintrack handle on `pool`.
    fn database(pool: sqlx::Pool<Self>) -> Database;

    /// The native pool inside `db`, if it is of this backend.
    fn typed(db: &Database) -> Option<&sqlx::Pool<Self>>;

    /// A native connection, as twintrack runs its own statements on it.
    fn conn(conn: &mut Self::Connection) -> Conn<'_>;

    /// The native connection inside `conn`, if it is of this backend.
    fn native(conn: Conn<'_>) -> Option<&mut Self::Connection>;
}

#[cfg(feature = "postgres")]
impl Native for sqlx::Postgres {
    const BACKEND: Backend = Backend::Postgres;

    fn database(pool: sqlx::Pool<Self>) -> Database {
        pool.into()
    }

    fn typed(db: &Database) -> Option<&sqlx::Pool<Self>> {
        db.as_postgres()
    }

    fn conn(conn: &mut PgConnection) -> Conn<'_> {
        Conn::Postgres(conn)
    }

    fn native(conn: Conn<'_>) -> Option<&mut PgConnection> {
        match conn {
            Conn::Postgres(conn) => Some(conn),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

#[cfg(feature = "sqlite")]
impl Native for sqlx::Sqlite {
    const BACKEND: Backend = Backend::Sqlite;

    fn database(pool: sqlx::Pool<Self>) -> Database {
        pool.into()
    }

    fn typed(db: &Database) -> Option<&sqlx::Pool<Self>> {
        db.as_sqlite()
    }

    fn conn(conn: &mut SqliteConnection) -> Conn<'_> {
        Conn::Sqlite(conn)
    }

    fn native(conn: Conn<'_>) -> Option<&mut SqliteConnection> {
        match conn {
            Conn::Sqlite(conn) => Some(conn),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

#[cfg(feature = "mysql")]
impl Native for sqlx::MySql {
    const BACKEND: Backend = Backend::MySql;

    fn database(pool: sqlx::Pool<Self>) -> Database {
        pool.into()
    }

    fn typed(db: &Database) -> Option<&sqlx::Pool<Self>> {
        db.as_mysql()
    }

    fn conn(conn: &mut MySqlConnection) -> Conn<'_> {
        Conn::MySql(conn)
    }

    fn native(conn: Conn<'_>) -> Option<&mut MySqlConnection> {
        match conn {
            Conn::MySql(conn) => Some(conn),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// `pool.acquire()`, boxed. sqlx 0.9's `Pool::acquire` future is about 14.5 KB: awaited
/// inline, it makes every future that awaits it that large (a request handler's, which axum
/// moves twice, copying it each time); boxed, a dual store's read or write future stays near
/// 1 KB, for one allocation.
pub(crate) async fn acquire<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> std::result::Result<sqlx::pool::PoolConnection<DB>, sqlx::Error> {
    Box::pin(pool.acquire()).await
}

/// `pool.begin()`, boxed, for the reason [`acquire`] gives.
pub(crate) async fn begin<DB: sqlx::Database>(
    pool: &sqlx::Pool<DB>,
) -> std::result::Result<sqlx::Transaction<'static, DB>, sqlx::Error> {
    Box::pin(pool.begin()).await
}

/// Checks that `name` is a plain SQL identifier, optionally schema-qualified (`schema.table`),
/// and returns it double-quoted for use in SQL. Letters, digits and `_` only, not starting with a
/// digit, at most 63 bytes per part: anything else (quotes, semicolons, spaces) is refused.
pub fn quote_ident(name: &str) -> Result<String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 {
        return Err(invalid_ident(name, "at most one '.' (schema.table)"));
    }
    let mut quoted = Vec::with_capacity(parts.len());
    for part in parts {
        let mut chars = part.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok || !rest_ok {
            return Err(invalid_ident(
                name,
                "letters, digits and '_' only, not starting with a digit",
            ));
        }
        if part.len() > 63 {
            return Err(invalid_ident(name, "at most 63 characters per part"));
        }
        quoted.push(format!("\"{part}\""));
    }
    Ok(quoted.join("."))
}

fn invalid_ident(name: &str, rule: &str) -> Error {
    let shown: String = name.chars().take(80).collect();
    Error::InvalidInput(format!("invalid SQL identifier {shown:?}: {rule}"))
}

/// Microseconds since the Unix epoch, the time unit of twintrack's tables.
pub(crate) fn now_micros() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_plain_identifiers() {
        assert_eq!(quote_ident("users").unwrap(), "\"users\"");
        assert_eq!(
            quote_ident("app.user_settings").unwrap(),
            "\"app\".\"user_settings\""
        );
        assert_eq!(quote_ident("_t1").unwrap(), "\"_t1\"");
    }

    #[test]
    fn refuses_anything_that_could_escape() {
        for bad in [
            "",
            "users; drop table x",
            "us\"ers",
            "users--",
            "1users",
            "a.b.c",
            "a.",
            "user settings",
            "naïve",
            &"x".repeat(64),
        ] {
            assert!(quote_ident(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn backend_from_url() {
        assert_eq!(
            Backend::from_url("postgres://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("postgresql://h/db").unwrap(),
            Backend::Postgres
        );
        assert_eq!(
            Backend::from_url("sqlite://x.db?mode=rwc").unwrap(),
            Backend::Sqlite
        );
        assert_eq!(
            Backend::from_url("sqlite::memory:").unwrap(),
            Backend::Sqlite
        );
        assert_eq!(Backend::from_url("mysql://h/db").unwrap(), Backend::MySql);
        assert_eq!(Backend::from_url("mariadb://h/db").unwrap(), Backend::MySql);
        assert!(Backend::from_url("mysqlx://h/db").is_err());
        assert!(Backend::from_url("nonsense").is_err());
    }
}
