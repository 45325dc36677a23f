//! twintrack's own tables, created by embedded, versioned migrations.
//!
//! [`install`] is idempotent and safe to call from several processes at once: on PostgreSQL it
//! serialises on an advisory lock, on SQLite on the database write lock. `twintrack init` calls
//! it, and so does [`SqlFlagStore::connect`](crate::flags::SqlFlagStore) unless told not to.
//!
//! Times are stored as microseconds since the Unix epoch (`BIGINT`) so both backends read them
//! the same way.

use crate::db::{Backend, Database, query, raw};
use crate::{Error, Result};

/// One schema step, with its statements per backend.
struct Step {
    version: i64,
    description: &'static str,
    postgres: &'static [&'static str],
    sqlite: &'static [&'static str],
    /// MySQL/MariaDB (InnoDB, `utf8mb4`). Each step creates what it does on the other
    /// backends, in its latest shape: the MySQL schema starts at version 4's columns (canonical
    /// key text, nullable integer `key`). `key` is a reserved word there: backticks.
    mysql: &'static [&'static str],
}

const STEPS: &[Step] = &[
    Step {
        version: 1,
        description: "flags, evidence and audit",
        postgres: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_flags (
            migration TEXT PRIMARY KEY,
            stage TEXT NOT NULL,
            version BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            updated_by TEXT NOT NULL,
            reason TEXT NOT NULL,
            shadow_sample_rate DOUBLE PRECISION NOT NULL DEFAULT 1.0,
            read_rollout_percent BIGINT,
            backfill_finished_at BIGINT,
            verify_clean_at BIGINT,
            reverse_synced_at BIGINT,
            left_legacy_only_at BIGINT,
            entered_new_only_at BIGINT,
            left_new_only_at BIGINT
        )"#,
            r#"CREATE TABLE IF NOT EXISTS twintrack_audit (
            id BIGSERIAL PRIMARY KEY,
            migration TEXT NOT NULL,
            at BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            from_stage TEXT,
            to_stage TEXT,
            from_version BIGINT,
            to_version BIGINT,
            forced BOOLEAN NOT NULL DEFAULT FALSE,
            reason TEXT NOT NULL,
            overridden TEXT
        )"#,
            "CREATE INDEX IF NOT EXISTS twintrack_audit_by_migration ON twintrack_audit (migration, id)",
            // Every change to a flag row, by twintrack or by hand, wakes every listening process.
            r#"CREATE OR REPLACE FUNCTION twintrack_flags_notify() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('twintrack_flags', COALESCE(NEW.migration, OLD.migration));
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql"#,
            "DROP TRIGGER IF EXISTS twintrack_flags_notify ON twintrack_flags",
            r#"CREATE TRIGGER twintrack_flags_notify
            AFTER INSERT OR UPDATE OR DELETE ON twintrack_flags
            FOR EACH ROW EXECUTE FUNCTION twintrack_flags_notify()"#,
        ],
        sqlite: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_flags (
            migration TEXT PRIMARY KEY,
            stage TEXT NOT NULL,
            version INTEGER NOT NULL,
            updated_at INTEGER NOT NULL,
            updated_by TEXT NOT NULL,
            reason TEXT NOT NULL,
            shadow_sample_rate REAL NOT NULL DEFAULT 1.0,
            read_rollout_percent INTEGER,
            backfill_finished_at INTEGER,
            verify_clean_at INTEGER,
            reverse_synced_at INTEGER,
            left_legacy_only_at INTEGER,
            entered_new_only_at INTEGER,
            left_new_only_at INTEGER
        )"#,
            r#"CREATE TABLE IF NOT EXISTS twintrack_audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration TEXT NOT NULL,
            at INTEGER NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            from_stage TEXT,
            to_stage TEXT,
            from_version INTEGER,
            to_version INTEGER,
            forced INTEGER NOT NULL DEFAULT 0,
            reason TEXT NOT NULL,
            overridden TEXT
        )"#,
            "CREATE INDEX IF NOT EXISTS twintrack_audit_by_migration ON twintrack_audit (migration, id)",
        ],
        mysql: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_flags (
            migration VARCHAR(255) PRIMARY KEY,
            stage VARCHAR(32) NOT NULL,
            version BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            updated_by TEXT NOT NULL,
            reason TEXT NOT NULL,
            shadow_sample_rate DOUBLE NOT NULL DEFAULT 1.0,
            read_rollout_percent BIGINT,
            backfill_finished_at BIGINT,
            verify_clean_at BIGINT,
            reverse_synced_at BIGINT,
            left_legacy_only_at BIGINT,
            entered_new_only_at BIGINT,
            left_new_only_at BIGINT
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
            r#"CREATE TABLE IF NOT EXISTS twintrack_audit (
            id BIGINT AUTO_INCREMENT PRIMARY KEY,
            migration VARCHAR(255) NOT NULL,
            at BIGINT NOT NULL,
            actor TEXT NOT NULL,
            action VARCHAR(64) NOT NULL,
            from_stage VARCHAR(32),
            to_stage VARCHAR(32),
            from_version BIGINT,
            to_version BIGINT,
            forced BOOLEAN NOT NULL DEFAULT FALSE,
            reason TEXT NOT NULL,
            overridden TEXT,
            INDEX twintrack_audit_by_migration (migration, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
        ],
    },
    Step {
        version: 2,
        description: "repair intents and shadow-read mismatches",
        postgres: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_repair_intents (
            id BIGSERIAL PRIMARY KEY,
            migration TEXT NOT NULL,
            key BIGINT NOT NULL,
            target_side TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            last_error TEXT
        )"#,
            "CREATE INDEX IF NOT EXISTS twintrack_repair_intents_by_age ON twintrack_repair_intents (migration, created_at)",
            r#"CREATE TABLE IF NOT EXISTS twintrack_mismatches (
            id BIGSERIAL PRIMARY KEY,
            migration TEXT NOT NULL,
            key BIGINT NOT NULL,
            class TEXT NOT NULL,
            stage TEXT NOT NULL,
            diff TEXT NOT NULL,
            legacy_micros BIGINT NOT NULL,
            new_micros BIGINT NOT NULL,
            at BIGINT NOT NULL
        )"#,
            "CREATE INDEX IF NOT EXISTS twintrack_mismatches_by_migration ON twintrack_mismatches (migration, id)",
        ],
        sqlite: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_repair_intents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration TEXT NOT NULL,
            key INTEGER NOT NULL,
            target_side TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )"#,
            "CREATE INDEX IF NOT EXISTS twintrack_repair_intents_by_age ON twintrack_repair_intents (migration, created_at)",
            r#"CREATE TABLE IF NOT EXISTS twintrack_mismatches (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration TEXT NOT NULL,
            key INTEGER NOT NULL,
            class TEXT NOT NULL,
            stage TEXT NOT NULL,
            diff TEXT NOT NULL,
            legacy_micros INTEGER NOT NULL,
            new_micros INTEGER NOT NULL,
            at INTEGER NOT NULL
        )"#,
            "CREATE INDEX IF NOT EXISTS twintrack_mismatches_by_migration ON twintrack_mismatches (migration, id)",
        ],
        mysql: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_repair_intents (
            id BIGINT AUTO_INCREMENT PRIMARY KEY,
            migration VARCHAR(255) NOT NULL,
            `key` BIGINT,
            key_text VARCHAR(512),
            target_side VARCHAR(16) NOT NULL,
            created_at BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            INDEX twintrack_repair_intents_by_age (migration, created_at)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
            r#"CREATE TABLE IF NOT EXISTS twintrack_mismatches (
            id BIGINT AUTO_INCREMENT PRIMARY KEY,
            migration VARCHAR(255) NOT NULL,
            `key` BIGINT,
            key_text TEXT,
            class VARCHAR(32) NOT NULL,
            stage VARCHAR(32) NOT NULL,
            diff MEDIUMTEXT NOT NULL,
            legacy_micros BIGINT NOT NULL,
            new_micros BIGINT NOT NULL,
            at BIGINT NOT NULL,
            INDEX twintrack_mismatches_by_migration (migration, id)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
        ],
    },
    Step {
        version: 3,
        description: "backfill runs and chunk leases",
        postgres: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_backfill_runs (
            id BIGSERIAL PRIMARY KEY,
            migration TEXT NOT NULL,
            direction TEXT NOT NULL,
            lower_bound BIGINT NOT NULL,
            upper_bound BIGINT NOT NULL,
            started_at BIGINT NOT NULL,
            finished_at BIGINT
        )"#,
            "CREATE UNIQUE INDEX IF NOT EXISTS twintrack_backfill_one_open_run ON twintrack_backfill_runs (migration, direction) WHERE finished_at IS NULL",
            r#"CREATE TABLE IF NOT EXISTS twintrack_backfill_chunks (
            run_id BIGINT NOT NULL,
            chunk BIGINT NOT NULL,
            lo BIGINT NOT NULL,
            hi BIGINT NOT NULL,
            next_key BIGINT NOT NULL,
            rows_copied BIGINT NOT NULL DEFAULT 0,
            batches BIGINT NOT NULL DEFAULT 0,
            owner TEXT,
            leased_until BIGINT,
            done_at BIGINT,
            PRIMARY KEY (run_id, chunk)
        )"#,
        ],
        sqlite: &[
            r#"CREATE TABLE IF NOT EXISTS twintrack_backfill_runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration TEXT NOT NULL,
            direction TEXT NOT NULL,
            lower_bound INTEGER NOT NULL,
            upper_bound INTEGER NOT NULL,
            started_at INTEGER NOT NULL,
            finished_at INTEGER
        )"#,
            "CREATE UNIQUE INDEX IF NOT EXISTS twintrack_backfill_one_open_run ON twintrack_backfill_runs (migration, direction) WHERE finished_at IS NULL",
            r#"CREATE TABLE IF NOT EXISTS twintrack_backfill_chunks (
            run_id INTEGER NOT NULL,
            chunk INTEGER NOT NULL,
            lo INTEGER NOT NULL,
            hi INTEGER NOT NULL,
            next_key INTEGER NOT NULL,
            rows_copied INTEGER NOT NULL DEFAULT 0,
            batches INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            leased_until INTEGER,
            done_at INTEGER,
            PRIMARY KEY (run_id, chunk)
        )"#,
        ],
        mysql: &[
            // One open run per migration and direction: a generated column that is NULL once
            // the run finishes (MySQL has no partial unique index).
            r#"CREATE TABLE IF NOT EXISTS twintrack_backfill_runs (
            id BIGINT AUTO_INCREMENT PRIMARY KEY,
            migration VARCHAR(255) NOT NULL,
            direction VARCHAR(16) NOT NULL,
            lower_bound TEXT,
            upper_bound TEXT,
            started_at BIGINT NOT NULL,
            finished_at BIGINT,
            rows_total BIGINT NOT NULL DEFAULT 0,
            open_run VARCHAR(300) AS (IF(finished_at IS NULL, CONCAT(migration, '/', direction), NULL)) STORED,
            UNIQUE KEY twintrack_backfill_one_open_run (open_run)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
            r#"CREATE TABLE IF NOT EXISTS twintrack_backfill_chunks (
            run_id BIGINT NOT NULL,
            chunk BIGINT NOT NULL,
            lo TEXT,
            hi TEXT,
            next_key TEXT,
            rows_copied BIGINT NOT NULL DEFAULT 0,
            batches BIGINT NOT NULL DEFAULT 0,
            owner VARCHAR(255),
            leased_until BIGINT,
            done_at BIGINT,
            rows_expected BIGINT NOT NULL DEFAULT 0,
            keys_done BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (run_id, chunk)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#,
        ],
    },
    Step {
        version: 4,
        description: "keys of any type, stored as canonical text; keyset backfill chunks",
        // Intents and mismatches gain `key_text` beside the integer `key`, which stays (no
        // longer required): processes of the previous version, still running during a rolling
        // upgrade, keep writing their intents (and reading integer keys). The backfill tables
        // are converted in place: stop backfills of the previous version before upgrading.
        postgres: &[
            "ALTER TABLE twintrack_repair_intents ADD COLUMN IF NOT EXISTS key_text TEXT",
            "UPDATE twintrack_repair_intents SET key_text = CAST(key AS TEXT) WHERE key_text IS NULL",
            "ALTER TABLE twintrack_repair_intents ALTER COLUMN key DROP NOT NULL",
            "ALTER TABLE twintrack_mismatches ADD COLUMN IF NOT EXISTS key_text TEXT",
            "UPDATE twintrack_mismatches SET key_text = CAST(key AS TEXT) WHERE key_text IS NULL",
            "ALTER TABLE twintrack_mismatches ALTER COLUMN key DROP NOT NULL",
            r#"ALTER TABLE twintrack_backfill_runs
               ALTER COLUMN lower_bound TYPE TEXT USING CAST(lower_bound AS TEXT),
               ALTER COLUMN lower_bound DROP NOT NULL,
               ALTER COLUMN upper_bound TYPE TEXT USING CAST(upper_bound AS TEXT),
               ALTER COLUMN upper_bound DROP NOT NULL,
               ADD COLUMN IF NOT EXISTS rows_total BIGINT NOT NULL DEFAULT 0"#,
            r#"ALTER TABLE twintrack_backfill_chunks
               ALTER COLUMN lo TYPE TEXT USING CAST(lo AS TEXT),
               ALTER COLUMN lo DROP NOT NULL,
               ALTER COLUMN hi TYPE TEXT USING CAST(hi AS TEXT),
               ALTER COLUMN hi DROP NOT NULL,
               ALTER COLUMN next_key TYPE TEXT USING CAST(next_key AS TEXT),
               ALTER COLUMN next_key DROP NOT NULL,
               ADD COLUMN IF NOT EXISTS rows_expected BIGINT NOT NULL DEFAULT 0,
               ADD COLUMN IF NOT EXISTS keys_done BIGINT NOT NULL DEFAULT 0"#,
        ],
        // SQLite cannot change a column's type: each table is rebuilt, its rows copied over.
        sqlite: &[
            r#"CREATE TABLE twintrack_repair_intents_v4 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration TEXT NOT NULL,
            key INTEGER,
            key_text TEXT,
            target_side TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT
        )"#,
            r#"INSERT INTO twintrack_repair_intents_v4 (id, migration, key, key_text, target_side, created_at, attempts, last_error)
               SELECT id, migration, key, CAST(key AS TEXT), target_side, created_at, attempts, last_error FROM twintrack_repair_intents"#,
            "DROP TABLE twintrack_repair_intents",
            "ALTER TABLE twintrack_repair_intents_v4 RENAME TO twintrack_repair_intents",
            "CREATE INDEX IF NOT EXISTS twintrack_repair_intents_by_age ON twintrack_repair_intents (migration, created_at)",
            r#"CREATE TABLE twintrack_mismatches_v4 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration TEXT NOT NULL,
            key INTEGER,
            key_text TEXT,
            class TEXT NOT NULL,
            stage TEXT NOT NULL,
            diff TEXT NOT NULL,
            legacy_micros INTEGER NOT NULL,
            new_micros INTEGER NOT NULL,
            at INTEGER NOT NULL
        )"#,
            r#"INSERT INTO twintrack_mismatches_v4 (id, migration, key, key_text, class, stage, diff, legacy_micros, new_micros, at)
               SELECT id, migration, key, CAST(key AS TEXT), class, stage, diff, legacy_micros, new_micros, at FROM twintrack_mismatches"#,
            "DROP TABLE twintrack_mismatches",
            "ALTER TABLE twintrack_mismatches_v4 RENAME TO twintrack_mismatches",
            "CREATE INDEX IF NOT EXISTS twintrack_mismatches_by_migration ON twintrack_mismatches (migration, id)",
            r#"CREATE TABLE twintrack_backfill_runs_v4 (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            migration TEXT NOT NULL,
            direction TEXT NOT NULL,
            lower_bound TEXT,
            upper_bound TEXT,
            started_at INTEGER NOT NULL,
            finished_at INTEGER,
            rows_total INTEGER NOT NULL DEFAULT 0
        )"#,
            r#"INSERT INTO twintrack_backfill_runs_v4 (id, migration, direction, lower_bound, upper_bound, started_at, finished_at)
               SELECT id, migration, direction, CAST(lower_bound AS TEXT), CAST(upper_bound AS TEXT), started_at, finished_at FROM twintrack_backfill_runs"#,
            "DROP TABLE twintrack_backfill_runs",
            "ALTER TABLE twintrack_backfill_runs_v4 RENAME TO twintrack_backfill_runs",
            "CREATE UNIQUE INDEX IF NOT EXISTS twintrack_backfill_one_open_run ON twintrack_backfill_runs (migration, direction) WHERE finished_at IS NULL",
            r#"CREATE TABLE twintrack_backfill_chunks_v4 (
            run_id INTEGER NOT NULL,
            chunk INTEGER NOT NULL,
            lo TEXT,
            hi TEXT,
            next_key TEXT,
            rows_copied INTEGER NOT NULL DEFAULT 0,
            batches INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            leased_until INTEGER,
            done_at INTEGER,
            rows_expected INTEGER NOT NULL DEFAULT 0,
            keys_done INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (run_id, chunk)
        )"#,
            r#"INSERT INTO twintrack_backfill_chunks_v4 (run_id, chunk, lo, hi, next_key, rows_copied, batches, owner, leased_until, done_at)
               SELECT run_id, chunk, CAST(lo AS TEXT), CAST(hi AS TEXT), CAST(next_key AS TEXT), rows_copied, batches, owner, leased_until, done_at FROM twintrack_backfill_chunks"#,
            "DROP TABLE twintrack_backfill_chunks",
            "ALTER TABLE twintrack_backfill_chunks_v4 RENAME TO twintrack_backfill_chunks",
        ],
        // Steps 2 and 3 create these tables in this shape already.
        mysql: &[],
    },
    Step {
        version: 5,
        description: "repair intents by key (two databases: a read settles its key's intents)",
        postgres: &[
            "CREATE INDEX IF NOT EXISTS twintrack_repair_intents_by_key ON twintrack_repair_intents (migration, key_text)",
        ],
        sqlite: &[
            "CREATE INDEX IF NOT EXISTS twintrack_repair_intents_by_key ON twintrack_repair_intents (migration, key_text)",
        ],
        mysql: &[
            "CREATE INDEX IF NOT EXISTS twintrack_repair_intents_by_key ON twintrack_repair_intents (migration, key_text)",
        ],
    },
    Step {
        version: 6,
        description: "per-minute figures for the admin page's charts (see crate::stats)",
        postgres: &[r#"CREATE TABLE IF NOT EXISTS twintrack_stats (
            migration TEXT NOT NULL,
            minute BIGINT NOT NULL,
            series TEXT NOT NULL,
            label TEXT NOT NULL,
            instance TEXT NOT NULL,
            count BIGINT NOT NULL,
            total BIGINT NOT NULL,
            buckets TEXT NOT NULL,
            PRIMARY KEY (migration, minute, series, label, instance)
        )"#],
        sqlite: &[r#"CREATE TABLE IF NOT EXISTS twintrack_stats (
            migration TEXT NOT NULL,
            minute INTEGER NOT NULL,
            series TEXT NOT NULL,
            label TEXT NOT NULL,
            instance TEXT NOT NULL,
            count INTEGER NOT NULL,
            total INTEGER NOT NULL,
            buckets TEXT NOT NULL,
            PRIMARY KEY (migration, minute, series, label, instance)
        )"#],
        mysql: &[r#"CREATE TABLE IF NOT EXISTS twintrack_stats (
            migration VARCHAR(255) NOT NULL,
            minute BIGINT NOT NULL,
            series VARCHAR(16) NOT NULL,
            label VARCHAR(64) NOT NULL,
            instance VARCHAR(64) NOT NULL,
            count BIGINT NOT NULL,
            total BIGINT NOT NULL,
            buckets VARCHAR(1024) NOT NULL,
            PRIMARY KEY (migration, minute, series, label, instance)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4"#],
    },
];

/// The schema version this build of twintrack installs.
pub const SCHEMA_VERSION: i64 = 6;

/// Creates or upgrades twintrack's tables. Idempotent; concurrent callers are serialised.
/// Upgrades keep every row (schema version 4 turns the integer key columns into canonical key
/// text, see [`crate::key`]).
pub async fn install(db: &Database) -> Result<()> {
    install_to(db, SCHEMA_VERSION).await
}

/// Installs the schema up to `version` only: for tests of upgrades from an older twintrack.
#[doc(hidden)]
pub async fn install_to(db: &Database, version: i64) -> Result<()> {
    if db.backend() == Backend::Sqlite {
        // WAL lets the CLI flip flags while the service reads them. The setting is stored in
        // the file, so this runs once per database; it is a no-op for in-memory databases.
        query("PRAGMA journal_mode = WAL").execute(db).await?;
    }
    let mut tx = db.begin().await?;
    match db.backend() {
        // 0x7477696e = "twin": one lock id for every twintrack schema change.
        Backend::Postgres => {
            query("SELECT pg_advisory_xact_lock(1953986926)")
                .execute(&mut tx)
                .await?;
        }
        // DDL commits implicitly there: a named lock, held by this connection until released,
        // serialises installers instead (released whatever happens).
        Backend::MySql => {
            // Written for MariaDB 10.6+: MySQL 8 lacks `CREATE INDEX IF NOT EXISTS`,
            // `INSERT … RETURNING`, `SHOW ALL SLAVES STATUS` and MariaDB's GTID variables.
            let server: String = query("SELECT VERSION()").scalar(&mut tx).await?;
            if !server.contains("MariaDB") {
                return Err(Error::Config(format!(
                    "twintrack's MySQL backend needs MariaDB 10.6 or later; this server is MySQL {server}"
                )));
            }
            let got: Option<i64> = query("SELECT GET_LOCK('twintrack_schema', 60)")
                .scalar(&mut tx)
                .await?;
            if got != Some(1) {
                return Err(Error::Precondition(
                    "another process held twintrack's schema lock (GET_LOCK('twintrack_schema')) for 60 s".into(),
                ));
            }
            let applied = apply(&mut tx, db.backend(), version).await;
            let released = query("SELECT RELEASE_LOCK('twintrack_schema')")
                .execute(&mut tx)
                .await;
            applied?;
            released?;
            tx.commit().await?;
            return Ok(());
        }
        Backend::Sqlite => {}
    }
    apply(&mut tx, db.backend(), version).await?;
    tx.commit().await?;
    Ok(())
}

/// Applies the steps past the recorded version, up to `version`, on `tx`.
async fn apply(tx: &mut crate::db::Tx, backend: Backend, version: i64) -> Result<()> {
    query(
        "CREATE TABLE IF NOT EXISTS twintrack_schema (version BIGINT PRIMARY KEY, description TEXT NOT NULL, applied_at BIGINT NOT NULL)",
    )
    .execute(&mut *tx)
    .await?;
    let current: i64 = query("SELECT COALESCE(MAX(version), 0) FROM twintrack_schema")
        .scalar(&mut *tx)
        .await?;
    if current > SCHEMA_VERSION {
        return Err(Error::Config(format!(
            "the database holds twintrack schema version {current}, newer than this build understands ({SCHEMA_VERSION}); upgrade twintrack"
        )));
    }
    for step in STEPS
        .iter()
        .filter(|s| s.version > current && s.version <= version)
    {
        let statements = match backend {
            Backend::Postgres => step.postgres,
            Backend::Sqlite => step.sqlite,
            Backend::MySql => step.mysql,
        };
        for statement in statements {
            raw(statement, tx.conn()).await?;
        }
        query(
            "INSERT INTO twintrack_schema (version, description, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(step.version)
        .bind(step.description)
        .bind(crate::db::now_micros())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
