//! A database handle: one sqlx pool plus which backend it talks to.
//!
//! twintrack runs the same code on PostgreSQL and SQLite through sqlx's `Any` driver; the few
//! statements that differ (DDL, locking) ask [`Database::backend`]. Identifiers that come from
//! configuration go through [`quote_ident`] before they are put into SQL.

use std::sync::Arc;
use std::time::Duration;

use sqlx::{AnyConnection, AnyPool, Connection, any::AnyPoolOptions};

use crate::{Error, Result};

/// Which database a [`Database`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL (the main target).
    Postgres,
    /// SQLite (the embedded default).
    Sqlite,
}

impl Backend {
    /// The statement that begins a transaction which will write: on SQLite `BEGIN IMMEDIATE`
    /// takes the write lock up front (a deferred transaction that later writes fails at once
    /// if another writer committed in between); on PostgreSQL plain `BEGIN`.
    pub(crate) fn begin_write(self) -> &'static str {
        match self {
            Backend::Postgres => "BEGIN",
            Backend::Sqlite => "BEGIN IMMEDIATE",
        }
    }

    /// The backend a connection URL names, or an error naming the accepted schemes.
    pub fn from_url(url: &str) -> Result<Backend> {
        let scheme = url.split(':').next().unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" if cfg!(feature = "postgres") => Ok(Backend::Postgres),
            "sqlite" if cfg!(feature = "sqlite") => Ok(Backend::Sqlite),
            _ => Err(Error::InvalidInput(format!(
                "unsupported database URL scheme {scheme:?}: expected postgres://… or sqlite:… (with the matching cargo feature)"
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

/// A pool and the backend behind it. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Database {
    pool: AnyPool,
    backend: Backend,
    url: Arc<str>,
}

impl Database {
    /// Connects with default options. Fails with [`Error::Unreachable`] when the database
    /// does not answer, [`Error::InvalidInput`] when the URL is not one twintrack can use.
    pub async fn connect(url: &str) -> Result<Database> {
        Database::connect_with(url, ConnectOptions::default()).await
    }

    /// Connects with the given options. One connection is opened first, so a wrong URL or a
    /// database that is down fails at once with the real cause (the pool alone would retry
    /// until its acquire timeout and only report "timed out").
    pub async fn connect_with(url: &str, options: ConnectOptions) -> Result<Database> {
        let backend = Backend::from_url(url)?;
        sqlx::any::install_default_drivers();
        let classify = |e: sqlx::Error| match e {
            sqlx::Error::Configuration(_) => Error::InvalidInput(format!("bad database URL: {e}")),
            other => Error::from_sqlx(other),
        };
        let probe = tokio::time::timeout(options.acquire_timeout, AnyConnection::connect(url))
            .await
            .map_err(|_| Error::Unreachable(sqlx::Error::PoolTimedOut))?
            .map_err(classify)?;
        let _ = probe.close().await;
        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect(url)
            .await
            .map_err(classify)?;
        Ok(Database {
            pool,
            backend,
            url: url.into(),
        })
    }

    /// A handle that connects on first use (for a server that may be down at start-up, such as
    /// a replica). Only the URL is checked now.
    pub fn connect_lazy(url: &str) -> Result<Database> {
        Database::connect_lazy_with(url, ConnectOptions::default())
    }

    /// [`Database::connect_lazy`] with options.
    pub fn connect_lazy_with(url: &str, options: ConnectOptions) -> Result<Database> {
        let backend = Backend::from_url(url)?;
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy(url)
            .map_err(|e| Error::InvalidInput(format!("bad database URL: {e}")))?;
        Ok(Database {
            pool,
            backend,
            url: url.into(),
        })
    }

    /// The pool, for running statements.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL this handle was opened with (it may hold a password: do not log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        self.pool.close().await
    }
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
        assert!(Backend::from_url("mysql://h/db").is_err());
        assert!(Backend::from_url("nonsense").is_err());
    }
}
