//! Retrying a long job's statements through the errors a busy or failing-over database gives:
//! deadlocks, serialization failures, lock timeouts, a busy SQLite file, lost connections.
//! Anything else is returned at once.

use std::future::Future;
use std::time::Duration;

use crate::{Error, Result};

/// How many times one step is retried before the job gives up: with the backoff below, about
/// 80 s of trying (longer than a typical PostgreSQL failover).
pub(crate) const MAX_RETRIES: u32 = 20;

/// Why an error is worth retrying for, if it is. Classified by the driver's error inside
/// (whether twintrack saw it as unreachable, a statement's failure or a repository's), so a
/// lost connection is retried and a wrong password or a missing database is not.
pub(crate) fn transient(err: &Error) -> Option<&'static str> {
    match err {
        Error::Unreachable(source)
        | Error::Database(source)
        | Error::Statement { source, .. }
        | Error::Repository { source, .. } => transient_sqlx(source),
        _ => None,
    }
}

fn transient_sqlx(err: &sqlx::Error) -> Option<&'static str> {
    let db = match err {
        sqlx::Error::Database(db) => db,
        // The connection broke or timed out, or the pool had none free in time.
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::WorkerCrashed => {
            return Some("connection");
        }
        // TLS refusals, bad configuration, a closed pool, protocol errors: retrying cannot help.
        _ => return None,
    };
    // MySQL's lock wait timeout (1205) and the server ending the session (1053 shutting down,
    // 1927 connection killed) carry the generic SQLSTATE HY000: told by their numbers.
    #[cfg(feature = "mysql")]
    if let Some(mysql) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
        match mysql.number() {
            1205 => return Some("lock_timeout"),
            1053 | 1927 => return Some("connection"),
            _ => {}
        }
    }
    match db.code().as_deref() {
        Some("40P01") => Some("deadlock"),
        Some("40001") => Some("serialization_failure"),
        Some("55P03") => Some("lock_timeout"),
        // Connection exceptions (class 08) and the server going away (admin or crash
        // shutdown, cannot connect now), or the session ended by a server-side timeout.
        Some(code) if code.starts_with("08") => Some("connection"),
        Some("57P01" | "57P02" | "57P03" | "57P05" | "25P03") => Some("connection"),
        // SQLITE_BUSY and SQLITE_LOCKED with their extended codes.
        Some("5" | "261" | "517" | "6" | "262") => Some("busy"),
        // Authentication (28xxx), a missing or dropped database (3D000, 57P04) and the rest.
        _ => None,
    }
}

/// The wait before retry number `attempt` (from 1): 100 ms doubling to at most 5 s, plus up
/// to 50 ms of jitter.
pub(crate) fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.min(7)).min(Duration::from_secs(5))
        + Duration::from_millis(crate::context::random_key() % 50)
}

/// Runs `op` until it succeeds, fails in a way [`transient`] does not know, or has been retried
/// [`MAX_RETRIES`] times; between tries waits 100 ms doubling to at most 5 s, with up to 50 ms
/// of jitter. Each retry is logged (naming `what`) and passed to `counted` with its reason.
pub(crate) async fn retrying<T, F, Fut>(
    what: &str,
    counted: impl Fn(&'static str),
    mut op: F,
) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 0u32;
    loop {
        let err = match op().await {
            Ok(done) => return Ok(done),
            Err(err) => err,
        };
        let Some(reason) = transient(&err).filter(|_| attempt < MAX_RETRIES) else {
            return Err(err);
        };
        attempt += 1;
        counted(reason);
        let backoff = backoff(attempt);
        tracing::warn!(what, attempt, reason, error = %err, retry_in = ?backoff,
            "failed transiently; retrying");
        tokio::time::sleep(backoff).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ))
    }

    #[test]
    fn errors_are_classified_by_the_driver_error_inside() {
        // A lost connection, whichever way twintrack wrapped it (a two-database copy's
        // repository call included).
        assert_eq!(transient(&Error::Unreachable(io())), Some("connection"));
        assert_eq!(transient(&Error::Database(io())), Some("connection"));
        assert_eq!(
            transient(&Error::Repository {
                migration: "m".into(),
                side: crate::Side::New,
                source: io(),
            }),
            Some("connection")
        );
        assert_eq!(
            transient(&Error::Unreachable(sqlx::Error::PoolTimedOut)),
            Some("connection")
        );
        // Retrying cannot fix these.
        assert_eq!(
            transient(&Error::Unreachable(sqlx::Error::PoolClosed)),
            None
        );
        assert_eq!(
            transient(&Error::Unreachable(sqlx::Error::Tls("unknown CA".into()))),
            None
        );
        assert_eq!(transient(&Error::Config("bad".into())), None);
        assert_eq!(transient(&Error::Database(sqlx::Error::RowNotFound)), None);
    }
}
