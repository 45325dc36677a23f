//! Flag state: the source of truth ([`FlagStore`], [`SqlFlagStore`]) and its in-process cache
//! ([`FlagCache`]).
//!
//! Each migration has one flag row: its [`Stage`], a `version` for compare-and-set, who changed
//! it, why and when, the shadow sample rate and the optional read rollout percent. Every change is
//! appended to an audit table in the same transaction. The stage can only change through
//! [`FlagStore::set_stage`], which applies the [transition rules](crate::transition) to the row it
//! has locked, so two operators racing each other cannot both win.
//!
//! ```no_run
//! # async fn demo() -> twintrack::Result<()> {
//! use std::sync::Arc;
//! use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
//! use twintrack::{Database, Stage};
//!
//! let db = Database::connect("sqlite://app.db?mode=rwc").await?;
//! let store = Arc::new(SqlFlagStore::open(db).await?);
//! store.register("user_settings", "deploy").await?;
//!
//! let flags = FlagCache::builder(store.clone())
//!     .migration("user_settings", Stage::LegacyOnly) // the fallback if never loaded
//!     .build()
//!     .await;
//! assert_eq!(flags.snapshot().stage("user_settings"), Some(Stage::LegacyOnly));
//!
//! store
//!     .set_stage(StageChange::new("user_settings", Stage::DualWrite, "alice", "start dual writes"))
//!     .await?;
//! # Ok(()) }
//! ```

mod cache;
#[cfg(feature = "launchdarkly")]
mod launchdarkly;
#[cfg(feature = "postgres")]
mod listen;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod listen_handle;
#[cfg(feature = "openfeature")]
mod openfeature;
#[cfg(feature = "mysql")]
mod poll;
pub mod source;
mod store;

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

pub use cache::{FlagCache, FlagCacheBuilder, FlagSource, MigrationFlag, Snapshot};
#[cfg(feature = "launchdarkly")]
pub use launchdarkly::LaunchDarklySource;
#[cfg(feature = "openfeature")]
pub use openfeature::OpenFeatureSource;
pub use source::{Hold, StageSource, WantedStage};
pub use store::{SqlFlagStore, validate_migration_name};

use crate::transition::{Evidence, Micros, Refusal};
use crate::{Result, Stage};

/// A boxed, sendable future, so [`FlagStore`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The flag state of one migration, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlagState {
    /// The migration's name.
    pub migration: String,
    /// The current stage.
    pub stage: Stage,
    /// Incremented by every change; the compare-and-set token.
    pub version: i64,
    /// When it last changed (µs since the Unix epoch; RFC 3339 text in JSON).
    #[serde(with = "crate::util::rfc3339")]
    pub updated_at: Micros,
    /// Who changed it last.
    pub updated_by: String,
    /// Why.
    pub reason: String,
    /// Share of reads, 0.0 to 1.0, that are shadow-compared in `shadow` and `live`.
    pub shadow_sample_rate: f64,
    /// In `live`, the percent of requests (by request key) whose reads are served as `live`;
    /// the rest are served as `shadow`. `None` means all of them. Writes are never split.
    pub read_rollout_percent: Option<u8>,
}

/// A flag row as loaded in bulk: valid, or the reason it is not (the cache keeps the last good
/// value for an invalid row rather than failing every migration).
#[derive(Clone, Debug)]
pub struct LoadedFlag {
    /// The migration's name.
    pub migration: String,
    /// The parsed state, or what is wrong with the row.
    pub state: std::result::Result<FlagState, String>,
}

/// A migration's flag state together with the evidence the transition rules use.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationRecord {
    /// The flag state.
    pub state: FlagState,
    /// Backfill, verify and stage-history facts.
    pub evidence: Evidence,
}

/// A request to move a migration to another stage.
#[derive(Clone, Debug)]
pub struct StageChange {
    /// The migration.
    pub migration: String,
    /// The stage asked for.
    pub to: Stage,
    /// If set, the change only applies when the stored version is still this one.
    pub expected_version: Option<i64>,
    /// Who asks (recorded in the audit log).
    pub actor: String,
    /// Why (recorded in the audit log; must not be empty).
    pub reason: String,
    /// Override a refusal of the transition rules (recorded in the audit log).
    pub force: bool,
}

impl StageChange {
    /// A change with no expected version and no force.
    pub fn new(
        migration: impl Into<String>,
        to: Stage,
        actor: impl Into<String>,
        reason: impl Into<String>,
    ) -> StageChange {
        StageChange {
            migration: migration.into(),
            to,
            expected_version: None,
            actor: actor.into(),
            reason: reason.into(),
            force: false,
        }
    }

    /// Only apply if the stored version is `version`.
    pub fn expect_version(mut self, version: i64) -> StageChange {
        self.expected_version = Some(version);
        self
    }

    /// Override a refusal (audited).
    pub fn force(mut self, force: bool) -> StageChange {
        self.force = force;
        self
    }
}

/// What [`FlagStore::set_stage`] did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageOutcome {
    /// The state after the call.
    pub state: FlagState,
    /// The stage before the call (`None` if the stored one was unreadable).
    pub from: Option<Stage>,
    /// False when the migration already was in the stage asked for (nothing was written).
    pub changed: bool,
    /// The refusal that `force` overrode, if any.
    pub overridden: Option<Refusal>,
}

/// A change to the shadow sample rate or the read rollout percent.
#[derive(Clone, Debug)]
pub struct TuningChange {
    /// The migration.
    pub migration: String,
    /// New shadow sample rate (0.0 to 1.0), if changing.
    pub shadow_sample_rate: Option<f64>,
    /// New read rollout percent (`Some(None)` clears it), if changing.
    pub read_rollout_percent: Option<Option<u8>>,
    /// If set, only apply when the stored version is still this one.
    pub expected_version: Option<i64>,
    /// Who asks.
    pub actor: String,
    /// Why.
    pub reason: String,
}

/// A fact recorded by backfill, verify or reverse sync, used by the transition rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceKind {
    /// A backfill (legacy → new) finished.
    BackfillFinished,
    /// A verify found both shapes equal.
    VerifyClean,
    /// A reverse sync (new → legacy) finished.
    ReverseSynced,
}

impl EvidenceKind {
    pub(crate) fn column(self) -> &'static str {
        match self {
            EvidenceKind::BackfillFinished => "backfill_finished_at",
            EvidenceKind::VerifyClean => "verify_clean_at",
            EvidenceKind::ReverseSynced => "reverse_synced_at",
        }
    }
}

/// One line of the append-only audit log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Increasing id.
    pub id: i64,
    /// The migration.
    pub migration: String,
    /// When (µs since the Unix epoch; RFC 3339 text in JSON).
    #[serde(with = "crate::util::rfc3339")]
    pub at: Micros,
    /// Who.
    pub actor: String,
    /// `register`, `set_stage`, `tune` or `evidence`.
    pub action: String,
    /// The stage before (as stored, even if invalid).
    pub from_stage: Option<String>,
    /// The stage after.
    pub to_stage: Option<String>,
    /// The version before.
    pub from_version: Option<i64>,
    /// The version after.
    pub to_version: Option<i64>,
    /// Whether `--force` overrode a refusal.
    pub forced: bool,
    /// Why.
    pub reason: String,
    /// The refusal that was overridden, if forced.
    pub overridden: Option<String>,
}

/// A notice that flag rows changed somewhere (any process), so cached copies are out of date.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlagChange {
    /// This migration's row changed.
    Migration(String),
    /// Notifications may have been missed (the listener reconnected): assume everything changed.
    All,
}

/// The source of truth for flag state. [`SqlFlagStore`] implements it for PostgreSQL and
/// SQLite; the cache only needs this trait, so another store (an HTTP flag service, say) can be
/// plugged in.
pub trait FlagStore: Send + Sync + 'static {
    /// The database holding the flag rows, for a store that keeps them in one
    /// ([`SqlFlagStore`]): a two-database backfill batch holds its migration's flag row there
    /// (`FOR SHARE`) so the stage cannot move under the batch. `None` by default.
    fn flag_database(&self) -> Option<&crate::Database> {
        None
    }

    /// Loads every flag row. An unparsable row is returned as such, not as an error.
    fn load_all(&self) -> BoxFuture<'_, Result<Vec<LoadedFlag>>>;

    /// One migration's state and evidence.
    fn get<'a>(&'a self, migration: &'a str) -> BoxFuture<'a, Result<MigrationRecord>>;

    /// Registers a migration at `legacy_only` if it is not registered yet. Returns whether it
    /// was added; an existing row is never touched.
    fn register<'a>(&'a self, migration: &'a str, actor: &'a str) -> BoxFuture<'a, Result<bool>>;

    /// Moves a migration to another stage under the transition rules (compare-and-set on the
    /// version, audited).
    fn set_stage(&self, change: StageChange) -> BoxFuture<'_, Result<StageOutcome>>;

    /// Changes the shadow sample rate or read rollout percent (compare-and-set, audited).
    fn tune(&self, change: TuningChange) -> BoxFuture<'_, Result<FlagState>>;

    /// Records evidence for the transition rules (audited).
    fn record_evidence<'a>(
        &'a self,
        migration: &'a str,
        kind: EvidenceKind,
        at: Micros,
        actor: &'a str,
    ) -> BoxFuture<'a, Result<()>>;

    /// The newest `limit` audit entries of a migration, newest first.
    fn audit_log<'a>(
        &'a self,
        migration: &'a str,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<AuditEntry>>>;

    /// A stream of change notices pushed by the store, if it can push (PostgreSQL `NOTIFY`).
    /// Stores that cannot push return `None`; the cache then relies on its soft TTL.
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<FlagChange>>;
}
pub(crate) use cache::{SnapshotReader, name_hash};
