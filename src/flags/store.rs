//! [`SqlFlagStore`]: the flag table, the evidence columns and the audit log, in the
//! application's own database (PostgreSQL, SQLite, MySQL or MariaDB).

use tokio::sync::broadcast;

use super::{
    AuditEntry, BoxFuture, EvidenceKind, FlagChange, FlagState, FlagStore, LoadedFlag,
    MigrationRecord, StageChange, StageOutcome, TuningChange,
};
use crate::db::{Backend, Database, Query, Row, Tx, now_micros, query};
use crate::transition::{self, Evidence, Verdict};
use crate::{Error, Result, Stage};

const STATE_COLUMNS: &str = "migration, stage, version, updated_at, updated_by, reason, shadow_sample_rate, read_rollout_percent";
const EVIDENCE_COLUMNS: &str = "backfill_finished_at, verify_clean_at, reverse_synced_at, left_legacy_only_at, entered_new_only_at, left_new_only_at";

/// Longest accepted reason, actor or migration name, so a pasted log file cannot land in the
/// audit table.
const MAX_REASON: usize = 1000;
const MAX_ACTOR: usize = 200;

/// The SQL flag store for PostgreSQL, SQLite, MySQL and MariaDB.
///
/// On PostgreSQL a background listener turns the flag table's `NOTIFY`s into [`FlagChange`]s for
/// every [`FlagCache`](super::FlagCache) in the process; it stops when the store is dropped.
pub struct SqlFlagStore {
    db: Database,
    /// Two databases: the new shape's, which keeps the repair intents of writes made while the
    /// new shape was authoritative (checked before a move onto the legacy side).
    intents_elsewhere: Option<Database>,
    #[cfg_attr(not(any(feature = "postgres", feature = "mysql")), allow(dead_code))]
    changes: broadcast::Sender<FlagChange>,
    #[cfg(any(feature = "postgres", feature = "mysql"))]
    listener: Option<super::listen_handle::ListenerHandle>,
}

impl std::fmt::Debug for SqlFlagStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlFlagStore")
            .field("backend", &self.db.backend())
            .finish_non_exhaustive()
    }
}

impl SqlFlagStore {
    /// Opens the store for a long-running service: creates twintrack's tables if needed and,
    /// on PostgreSQL, starts listening for flag changes (see [`SqlFlagStore::listen`]).
    pub async fn open(db: Database) -> Result<SqlFlagStore> {
        crate::schema::install(&db).await?;
        SqlFlagStore::new(db).listen().await
    }

    /// A store over `db` that neither touches the schema nor listens (for one-shot tools such
    /// as the CLI). No I/O happens until it is used.
    pub fn new(db: Database) -> SqlFlagStore {
        SqlFlagStore {
            db,
            intents_elsewhere: None,
            changes: broadcast::channel(256).0,
            #[cfg(any(feature = "postgres", feature = "mysql"))]
            listener: None,
        }
    }

    /// Starts pushing [`FlagChange`]s to [`FlagStore::subscribe`]rs: PostgreSQL `LISTEN`;
    /// on MySQL/MariaDB a poll of the flag table every 100 ms (see `poll.rs`: one single-row
    /// statement per interval); a no-op on SQLite, where caches rely on their soft TTL. It
    /// reconnects by itself and stops when the store is dropped.
    pub async fn listen(self) -> Result<SqlFlagStore> {
        #[cfg(feature = "postgres")]
        if let Some(pool) = self.db.as_postgres()
            && self.listener.is_none()
        {
            let listener = super::listen::spawn(pool, self.changes.clone()).await?;
            return Ok(SqlFlagStore {
                listener: Some(listener),
                ..self
            });
        }
        #[cfg(feature = "mysql")]
        if let Some(pool) = self.db.as_mysql()
            && self.listener.is_none()
        {
            let listener =
                super::poll::spawn(pool, super::poll::POLL_INTERVAL, self.changes.clone()).await;
            return Ok(SqlFlagStore {
                listener: Some(listener),
                ..self
            });
        }
        Ok(self)
    }

    /// Two databases: `new_db` also holds repair intents (those of writes made while the new
    /// shape was authoritative, targeting legacy). A stage move onto a side is refused while
    /// intents in either database target it.
    pub fn intents_also_in(mut self, new_db: Database) -> SqlFlagStore {
        self.intents_elsewhere = Some(new_db);
        self
    }

    /// The database this store lives in.
    pub fn database(&self) -> &Database {
        &self.db
    }

    async fn lock_row(
        &self,
        tx: &mut Tx,
        migration: &str,
    ) -> Result<(std::result::Result<FlagState, String>, Evidence)> {
        let lock = match self.db.backend() {
            Backend::Postgres | Backend::MySql => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "SELECT {STATE_COLUMNS}, {EVIDENCE_COLUMNS} FROM twintrack_flags WHERE migration = $1{lock}"
        );
        let row = Query::assert_safe(sql)
            .bind(migration)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::UnknownMigration(migration.to_owned()))?;
        Ok((parse_state(&row)?, parse_evidence(&row)?))
    }
}

/// A move that starts serving a side, or makes it authoritative, while repair intents in this
/// database still target it: acknowledged writes have not reached that side yet, so reads
/// there would miss them (and its later writes would be overwritten by their replays). Two
/// databases keep the intents of writes made while legacy is authoritative here (the flag
/// store's database); those made while the new shape is authoritative are in the new database,
/// where reads settle them before serving. Intents of writes still in flight (under
/// [`IN_FLIGHT_FOR`](crate::dual::IN_FLIGHT_FOR) old, no failure noted) do not count: their
/// writes finish, or their keys are settled by the reads that follow.
async fn unrepaired_toward(
    tx: &mut Tx,
    migration: &str,
    from: Stage,
    to: Stage,
) -> Result<Option<transition::Refusal>> {
    let (before, after) = (from.plan(), to.plan());
    for side in [after.served, after.authoritative] {
        if side == before.served || side == before.authoritative {
            continue;
        }
        // Not the intents of writes still in flight (written with the write, cleared when its
        // other side lands): a read settles those of its key before serving.
        let in_flight_since = now_micros()
            - i64::try_from(crate::dual::IN_FLIGHT_FOR.as_micros()).unwrap_or(i64::MAX);
        let pending: i64 = query(
            "SELECT COUNT(*) FROM twintrack_repair_intents WHERE migration = $1 AND target_side = $2
             AND NOT (last_error = $3 AND attempts = 0 AND created_at > $4)",
        )
        .bind(migration)
        .bind(side.as_str())
        .bind(crate::dual::IN_FLIGHT)
        .bind(in_flight_since)
        .scalar(&mut *tx)
        .await?;
        if pending > 0 {
            return Ok(Some(transition::Refusal {
                from,
                to,
                reason: format!(
                    "{pending} repair intents still target the {side} side: writes acknowledged there have not landed yet, and {to} would serve it"
                ),
                remedy: format!(
                    "let the repair worker replay them (or run `twintrack verify {migration} --repair`), then retry; or pass --force"
                ),
            }));
        }
    }
    Ok(None)
}

fn check_text(what: &str, value: &str, max: usize) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::InvalidInput(format!("{what} must not be empty")));
    }
    if value.chars().count() > max {
        return Err(Error::InvalidInput(format!(
            "{what} is longer than {max} characters"
        )));
    }
    if value
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(Error::InvalidInput(format!(
            "{what} contains control characters"
        )));
    }
    Ok(())
}

/// Checks a migration name: lowercase letters, digits and `_`, starting with a letter, at most
/// 63 characters (it is also used in metric attributes and URLs).
pub fn validate_migration_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 63;
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(80).collect();
        Err(Error::InvalidInput(format!(
            "invalid migration name {shown:?}: lowercase letters, digits and '_', starting with a letter, at most 63 characters"
        )))
    }
}

fn parse_state(row: &Row) -> Result<std::result::Result<FlagState, String>> {
    let migration: String = row.get("migration")?;
    let stage_text: String = row.get("stage")?;
    let rate: f64 = row.get("shadow_sample_rate")?;
    let percent: Option<i64> = row.get("read_rollout_percent")?;
    let stage = match stage_text.parse::<Stage>() {
        Ok(stage) => stage,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if !(0.0..=1.0).contains(&rate) {
        return Ok(Err(format!(
            "shadow_sample_rate {rate} is outside 0.0..=1.0"
        )));
    }
    let read_rollout_percent = match percent {
        None => None,
        Some(p @ 0..=100) => Some(p as u8),
        Some(p) => return Ok(Err(format!("read_rollout_percent {p} is outside 0..=100"))),
    };
    Ok(Ok(FlagState {
        migration,
        stage,
        version: row.get("version")?,
        updated_at: row.get("updated_at")?,
        updated_by: row.get("updated_by")?,
        reason: row.get("reason")?,
        shadow_sample_rate: rate,
        read_rollout_percent,
    }))
}

fn parse_evidence(row: &Row) -> Result<Evidence> {
    Ok(Evidence {
        backfill_finished_at: row.get("backfill_finished_at")?,
        verify_clean_at: row.get("verify_clean_at")?,
        reverse_synced_at: row.get("reverse_synced_at")?,
        left_legacy_only_at: row.get("left_legacy_only_at")?,
        entered_new_only_at: row.get("entered_new_only_at")?,
        left_new_only_at: row.get("left_new_only_at")?,
    })
}

struct AuditRecord<'a> {
    migration: &'a str,
    at: i64,
    actor: &'a str,
    action: &'static str,
    from_stage: Option<String>,
    to_stage: Option<&'a str>,
    from_version: Option<i64>,
    to_version: Option<i64>,
    forced: bool,
    reason: &'a str,
    overridden: Option<String>,
}

async fn append_audit(tx: &mut Tx, rec: AuditRecord<'_>) -> Result<()> {
    query(
        "INSERT INTO twintrack_audit (migration, at, actor, action, from_stage, to_stage, from_version, to_version, forced, reason, overridden)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(rec.migration)
    .bind(rec.at)
    .bind(rec.actor)
    .bind(rec.action)
    .bind(rec.from_stage)
    .bind(rec.to_stage)
    .bind(rec.from_version)
    .bind(rec.to_version)
    .bind(rec.forced)
    .bind(rec.reason)
    .bind(rec.overridden)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

fn check_version(migration: &str, expected: Option<i64>, actual: i64) -> Result<()> {
    match expected {
        Some(expected) if expected != actual => Err(Error::VersionConflict {
            migration: migration.to_owned(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

impl FlagStore for SqlFlagStore {
    fn flag_database(&self) -> Option<&Database> {
        Some(&self.db)
    }

    fn load_all(&self) -> BoxFuture<'_, Result<Vec<LoadedFlag>>> {
        Box::pin(async move {
            let sql = format!("SELECT {STATE_COLUMNS} FROM twintrack_flags ORDER BY migration");
            let rows = Query::assert_safe(sql).fetch_all(&self.db).await?;
            rows.iter()
                .map(|row| {
                    Ok(LoadedFlag {
                        migration: row.get("migration")?,
                        state: parse_state(row)?,
                    })
                })
                .collect()
        })
    }

    fn get<'a>(&'a self, migration: &'a str) -> BoxFuture<'a, Result<MigrationRecord>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT {STATE_COLUMNS}, {EVIDENCE_COLUMNS} FROM twintrack_flags WHERE migration = $1"
            );
            let row = Query::assert_safe(sql)
                .bind(migration)
                .fetch_optional(&self.db)
                .await?
                .ok_or_else(|| Error::UnknownMigration(migration.to_owned()))?;
            let state = parse_state(&row)?.map_err(|problem| Error::InvalidFlag {
                migration: migration.to_owned(),
                problem,
            })?;
            Ok(MigrationRecord {
                state,
                evidence: parse_evidence(&row)?,
            })
        })
    }

    fn register<'a>(&'a self, migration: &'a str, actor: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            validate_migration_name(migration)?;
            check_text("actor", actor, MAX_ACTOR)?;
            let now = now_micros();
            let mut tx = self.db.begin().await?;
            // MySQL has no `ON CONFLICT`; a duplicate key there fails the statement only (not
            // the transaction) and means the migration is registered already.
            let sql = match self.db.backend() {
                Backend::MySql => {
                    "INSERT INTO twintrack_flags (migration, stage, version, updated_at, updated_by, reason)
                     VALUES ($1, 'legacy_only', 1, $2, $3, 'registered')"
                }
                _ => {
                    "INSERT INTO twintrack_flags (migration, stage, version, updated_at, updated_by, reason)
                     VALUES ($1, 'legacy_only', 1, $2, $3, 'registered')
                     ON CONFLICT (migration) DO NOTHING"
                }
            };
            let inserted = match query(sql)
                .bind(migration)
                .bind(now)
                .bind(actor)
                .execute(&mut tx)
                .await
            {
                Ok(n) => n == 1,
                Err(Error::Database(sqlx::Error::Database(e)))
                    if e.kind() == sqlx::error::ErrorKind::UniqueViolation =>
                {
                    false
                }
                Err(e) => return Err(e),
            };
            if inserted {
                append_audit(
                    &mut tx,
                    AuditRecord {
                        migration,
                        at: now,
                        actor,
                        action: "register",
                        from_stage: None,
                        to_stage: Some(Stage::LegacyOnly.as_str()),
                        from_version: None,
                        to_version: Some(1),
                        forced: false,
                        reason: "registered",
                        overridden: None,
                    },
                )
                .await?;
            }
            tx.commit().await?;
            Ok(inserted)
        })
    }

    fn set_stage(&self, change: StageChange) -> BoxFuture<'_, Result<StageOutcome>> {
        Box::pin(async move {
            check_text("reason", &change.reason, MAX_REASON)?;
            check_text("actor", &change.actor, MAX_ACTOR)?;
            let mut tx = self.db.begin().await?;
            let (state, evidence) = self.lock_row(&mut tx, &change.migration).await?;
            let raw_stage: String;
            let (from, version, current) = match state {
                Ok(state) => {
                    raw_stage = state.stage.to_string();
                    (Some(state.stage), state.version, Some(state))
                }
                Err(problem) => {
                    // The stored stage is unreadable (edited by hand). Only --force may replace it.
                    let row =
                        query("SELECT stage, version FROM twintrack_flags WHERE migration = $1")
                            .bind(&change.migration)
                            .fetch_one(&mut tx)
                            .await?;
                    raw_stage = row.get("stage")?;
                    if !change.force {
                        return Err(Error::InvalidFlag {
                            migration: change.migration.clone(),
                            problem: format!("{problem}; pass --force to overwrite it"),
                        });
                    }
                    (None, row.get("version")?, None)
                }
            };
            check_version(&change.migration, change.expected_version, version)?;

            let overridden = match from
                .map(|from| transition::check(&change.migration, from, change.to, &evidence))
            {
                Some(Verdict::Unchanged) => {
                    let state = current.expect("a parsed stage comes with its state");
                    return Ok(StageOutcome {
                        state,
                        from,
                        changed: false,
                        overridden: None,
                    });
                }
                Some(Verdict::Allowed(_)) => {
                    let from = from.expect("a verdict comes from a parsed stage");
                    let here =
                        unrepaired_toward(&mut tx, &change.migration, from, change.to).await?;
                    let elsewhere = match (&here, &self.intents_elsewhere) {
                        (None, Some(db)) => {
                            let mut other = db.begin().await?;
                            let found =
                                unrepaired_toward(&mut other, &change.migration, from, change.to)
                                    .await?;
                            other.rollback().await?;
                            found
                        }
                        _ => None,
                    };
                    match here.or(elsewhere) {
                        Some(refusal) if change.force => Some(refusal),
                        Some(refusal) => return Err(Error::Refused(refusal)),
                        None => None,
                    }
                }
                None => None,
                Some(Verdict::Refused(refusal)) if change.force => Some(refusal),
                Some(Verdict::Refused(refusal)) => return Err(Error::Refused(refusal)),
            };

            let now = now_micros();
            let evidence = evidence.after_move(from, change.to, now);
            let updated = query(
                "UPDATE twintrack_flags SET stage = $1, version = version + 1, updated_at = $2, updated_by = $3, reason = $4,
                     left_legacy_only_at = $5, entered_new_only_at = $6, left_new_only_at = $7
                 WHERE migration = $8 AND version = $9",
            )
            .bind(change.to.as_str())
            .bind(now)
            .bind(&change.actor)
            .bind(&change.reason)
            .bind(evidence.left_legacy_only_at)
            .bind(evidence.entered_new_only_at)
            .bind(evidence.left_new_only_at)
            .bind(&change.migration)
            .bind(version)
            .execute(&mut tx)
            .await?;
            if updated != 1 {
                // The row is locked, so this means the table was changed outside the rules.
                return Err(Error::Database(sqlx::Error::Protocol(format!(
                    "flag row {:?} changed while locked",
                    change.migration
                ))));
            }
            append_audit(
                &mut tx,
                AuditRecord {
                    migration: &change.migration,
                    at: now,
                    actor: &change.actor,
                    action: "set_stage",
                    from_stage: Some(raw_stage),
                    to_stage: Some(change.to.as_str()),
                    from_version: Some(version),
                    to_version: Some(version + 1),
                    forced: change.force && (overridden.is_some() || from.is_none()),
                    reason: &change.reason,
                    overridden: overridden.as_ref().map(|r| r.to_string()),
                },
            )
            .await?;
            tx.commit().await?;
            let state = match current {
                Some(current) => FlagState {
                    stage: change.to,
                    version: version + 1,
                    updated_at: now,
                    updated_by: change.actor.clone(),
                    reason: change.reason.clone(),
                    ..current
                },
                None => self.get(&change.migration).await?.state,
            };
            Ok(StageOutcome {
                state,
                from,
                changed: true,
                overridden,
            })
        })
    }

    fn tune(&self, change: TuningChange) -> BoxFuture<'_, Result<FlagState>> {
        Box::pin(async move {
            check_text("reason", &change.reason, MAX_REASON)?;
            check_text("actor", &change.actor, MAX_ACTOR)?;
            if let Some(rate) = change.shadow_sample_rate
                && !(0.0..=1.0).contains(&rate)
            {
                return Err(Error::InvalidInput(format!(
                    "shadow sample rate {rate} is outside 0.0..=1.0"
                )));
            }
            if let Some(Some(p)) = change.read_rollout_percent
                && p > 100
            {
                return Err(Error::InvalidInput(format!(
                    "read rollout percent {p} is outside 0..=100"
                )));
            }
            let mut tx = self.db.begin().await?;
            let (state, _) = self.lock_row(&mut tx, &change.migration).await?;
            let state = state.map_err(|problem| Error::InvalidFlag {
                migration: change.migration.clone(),
                problem,
            })?;
            check_version(&change.migration, change.expected_version, state.version)?;
            let now = now_micros();
            let new = FlagState {
                version: state.version + 1,
                updated_at: now,
                updated_by: change.actor.clone(),
                reason: change.reason.clone(),
                shadow_sample_rate: change
                    .shadow_sample_rate
                    .unwrap_or(state.shadow_sample_rate),
                read_rollout_percent: change
                    .read_rollout_percent
                    .unwrap_or(state.read_rollout_percent),
                ..state.clone()
            };
            query(
                "UPDATE twintrack_flags SET version = $1, updated_at = $2, updated_by = $3, reason = $4,
                     shadow_sample_rate = $5, read_rollout_percent = $6
                 WHERE migration = $7 AND version = $8",
            )
            .bind(new.version)
            .bind(now)
            .bind(&new.updated_by)
            .bind(&new.reason)
            .bind(new.shadow_sample_rate)
            .bind(new.read_rollout_percent.map(i64::from))
            .bind(&change.migration)
            .bind(state.version)
            .execute(&mut tx)
            .await?;
            append_audit(
                &mut tx,
                AuditRecord {
                    migration: &change.migration,
                    at: now,
                    actor: &change.actor,
                    action: "tune",
                    from_stage: Some(state.stage.to_string()),
                    to_stage: Some(state.stage.as_str()),
                    from_version: Some(state.version),
                    to_version: Some(new.version),
                    forced: false,
                    reason: &change.reason,
                    overridden: None,
                },
            )
            .await?;
            tx.commit().await?;
            Ok(new)
        })
    }

    fn record_evidence<'a>(
        &'a self,
        migration: &'a str,
        kind: EvidenceKind,
        at: i64,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            check_text("actor", actor, MAX_ACTOR)?;
            let mut tx = self.db.begin().await?;
            // Locks the row and fails for an unknown migration; the state itself is not needed.
            let _ = self.lock_row(&mut tx, migration).await?;
            let sql = format!(
                "UPDATE twintrack_flags SET {} = $1 WHERE migration = $2",
                kind.column()
            );
            Query::assert_safe(sql)
                .bind(at)
                .bind(migration)
                .execute(&mut tx)
                .await?;
            let reason = format!("{} at {at}", kind.column());
            append_audit(
                &mut tx,
                AuditRecord {
                    migration,
                    at: now_micros(),
                    actor,
                    action: "evidence",
                    from_stage: None,
                    to_stage: None,
                    from_version: None,
                    to_version: None,
                    forced: false,
                    reason: &reason,
                    overridden: None,
                },
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn audit_log<'a>(
        &'a self,
        migration: &'a str,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<AuditEntry>>> {
        Box::pin(async move {
            let sql = match self.db.backend() {
                Backend::MySql => {
                    "SELECT id, migration, at, actor, action, from_stage, to_stage, from_version, to_version,
                            CAST(forced AS SIGNED) AS forced, reason, overridden
                     FROM twintrack_audit WHERE migration = $1 ORDER BY id DESC LIMIT $2"
                }
                _ => {
                    "SELECT id, migration, at, actor, action, from_stage, to_stage, from_version, to_version,
                            CAST(forced AS INTEGER) AS forced, reason, overridden
                     FROM twintrack_audit WHERE migration = $1 ORDER BY id DESC LIMIT $2"
                }
            };
            let rows = query(sql)
                .bind(migration)
                .bind(i64::from(limit))
                .fetch_all(&self.db)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(AuditEntry {
                        id: row.get("id")?,
                        migration: row.get("migration")?,
                        at: row.get("at")?,
                        actor: row.get("actor")?,
                        action: row.get("action")?,
                        from_stage: row.get("from_stage")?,
                        to_stage: row.get("to_stage")?,
                        from_version: row.get("from_version")?,
                        to_version: row.get("to_version")?,
                        forced: row.get::<i64>("forced")? != 0,
                        reason: row.get("reason")?,
                        overridden: row.get("overridden")?,
                    })
                })
                .collect()
        })
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<FlagChange>> {
        #[cfg(any(feature = "postgres", feature = "mysql"))]
        if self.listener.is_some() {
            return Some(self.changes.subscribe());
        }
        None
    }
}
