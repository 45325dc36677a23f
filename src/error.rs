//! The crate's one error type. Each variant is something a caller can act on; the CLI maps them
//! to its exit codes (2 bad input, 3 refused, 4 unreachable).

use crate::stage::ParseStageError;
use crate::transition::Refusal;

/// A `Result` with twintrack's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in twintrack.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The database could not be reached (connection refused, I/O, pool timeout, shutting down).
    #[error("cannot reach the database: {0}")]
    Unreachable(#[source] sqlx::Error),
    /// A statement reached the database and failed there.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A statement of a long job (a backfill's copy, a verify's projection) failed at run
    /// time; `what` says which and where. Not the caller's input: the definition was checked.
    #[error("{what}: {}", crate::definition::error_message_of(.source))]
    Statement {
        /// What was being run, and on which keys.
        what: String,
        /// The database's error.
        #[source]
        source: sqlx::Error,
    },
    /// No migration of that name is registered in the flag store.
    #[error(
        "unknown migration {0:?} (run `twintrack init` to register the migrations in the config)"
    )]
    UnknownMigration(String),
    /// A stage name that does not parse.
    #[error(transparent)]
    InvalidStage(#[from] ParseStageError),
    /// The stored flag row for a migration is not valid (for example a stage edited by hand).
    #[error("flag row for migration {migration:?} is invalid: {problem}")]
    InvalidFlag {
        /// The migration whose row is bad.
        migration: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The transition rules refuse the move; `--force` overrides (and is audited).
    #[error("{0}")]
    Refused(Refusal),
    /// An operation that would be unsafe in the migration's current state (a backfill in
    /// `legacy_only`, say); the message says what to do first.
    #[error("refused: {0}")]
    Precondition(String),
    /// Compare-and-set lost: someone else changed the flag first.
    #[error(
        "version conflict on {migration:?}: expected version {expected}, found {actual} (re-read the state and retry)"
    )]
    VersionConflict {
        /// The migration.
        migration: String,
        /// The version the caller expected.
        expected: i64,
        /// The version found in the store.
        actual: i64,
    },
    /// The configuration file or a configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A repository call on one side of a migration failed.
    #[error("{migration}: the {side} side failed: {source}")]
    Repository {
        /// The migration.
        migration: String,
        /// The side whose repository call failed.
        side: crate::Side,
        /// The error it returned.
        #[source]
        source: sqlx::Error,
    },
    /// twintrack's own tables do not exist in this database yet.
    #[error("twintrack's tables are missing in this database: run `twintrack init` first")]
    NotInitialized,
    /// An operating-system operation failed at run time (binding a listener, serving it).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// An external flag source (an OpenFeature provider, say) could not answer.
    #[error("flag source failed: {0}")]
    FlagSource(String),
    /// An argument is invalid (a name, an identifier, a key, a value out of range).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Something inside twintrack failed (a worker panicked, a value could not be read back):
    /// not the caller's input, and not the database refusing a statement.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// OpenTelemetry's `error.type` for this error: the database's code for a failed statement
    /// (see [`crate::metrics`]), else the kind of error.
    pub fn error_type(&self) -> String {
        match self {
            Error::Unreachable(e)
            | Error::Database(e)
            | Error::Repository { source: e, .. }
            | Error::Statement { source: e, .. } => crate::metrics::error_type(e),
            Error::UnknownMigration(_) => "unknown_migration".into(),
            Error::InvalidStage(_) | Error::InvalidFlag { .. } => "invalid_flag".into(),
            Error::Refused(_) => "refused".into(),
            Error::Precondition(_) => "precondition".into(),
            Error::VersionConflict { .. } => "version_conflict".into(),
            Error::Config(_) => "config".into(),
            Error::NotInitialized => "not_initialized".into(),
            Error::FlagSource(_) => "flag_source".into(),
            Error::Io { source, .. } => format!("{:?}", source.kind()).to_lowercase(),
            Error::InvalidInput(_) => "invalid_input".into(),
            Error::Internal(_) => "internal".into(),
        }
    }

    /// Sorts an sqlx error into "could not reach the database" or "the statement failed".
    pub(crate) fn from_sqlx(err: sqlx::Error) -> Error {
        if let sqlx::Error::Database(db) = &err {
            // PostgreSQL, MySQL/MariaDB, SQLite.
            let missing_table = matches!(db.code().as_deref(), Some("42P01" | "42S02"))
                || db.message().starts_with("no such table");
            if missing_table && db.message().contains("twintrack_") {
                return Error::NotInitialized;
            }
        }
        if let sqlx::Error::Configuration(e) = &err {
            return Error::Config(e.to_string());
        }
        if is_unreachable(&err) {
            Error::Unreachable(err)
        } else {
            Error::Database(err)
        }
    }

    /// True when the error means the database could not be reached (the CLI's exit code 4).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable(_))
    }
}

fn is_unreachable(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => {
            #[cfg(feature = "mysql")]
            if let Some(my) = db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
                // ER_BAD_DB_ERROR, ER_DBACCESS_DENIED_ERROR, ER_ACCESS_DENIED_ERROR,
                // ER_CON_COUNT_ERROR, ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED
                return matches!(my.number(), 1049 | 1044 | 1045 | 1040 | 1053 | 1927);
            }
            matches!(
                db.code().as_deref(),
                // invalid_catalog_name, too_many_connections, admin_shutdown, crash_shutdown,
                // cannot_connect_now, invalid_authorization_specification, database_dropped
                Some("3D000" | "53300" | "57P01" | "57P02" | "57P03" | "28000" | "28P01" | "57P04")
            ) || db.message().contains("unable to open database file")
        }
        _ => false,
    }
}

/// For repository code that runs twintrack's statements ([`crate::db::Query`]) and returns
/// `sqlx::Result`: a database error comes back as it was; any other as
/// [`sqlx::Error::InvalidArgument`] (bad input) or [`sqlx::Error::Protocol`] (the rest), with
/// twintrack's message.
impl From<Error> for sqlx::Error {
    fn from(err: Error) -> sqlx::Error {
        match err {
            Error::Database(e) | Error::Unreachable(e) | Error::Repository { source: e, .. } => e,
            Error::InvalidInput(_) | Error::Config(_) => {
                sqlx::Error::InvalidArgument(err.to_string())
            }
            other => sqlx::Error::Protocol(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        Error::from_sqlx(err)
    }
}
