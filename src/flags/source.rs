//! Read-side flag sources: where the stage a migration *should* be in comes from.
//!
//! twintrack's own [`SqlFlagStore`](super::SqlFlagStore) is one [`StageSource`]; a team that
//! already flips flags elsewhere plugs in another (an OpenFeature provider, e.g. flagd's file
//! mode: [`OpenFeatureSource`](super::OpenFeatureSource)). A source is read only: it cannot
//! record evidence, audit, or move a stage under the transition rules, so the
//! [`FlagCache`](super::FlagCache) holds what it reports to those rules:
//!
//! - the stage it reports is **wanted**; the stage twintrack's flag table holds is **served**
//!   (every instance serves it, so they agree);
//! - when the wanted stage differs, the cache checks the move with
//!   [`transition::check`](crate::transition::check) against the evidence in twintrack's tables
//!   (backfill finished, verify clean, reverse sync). An allowed move is written to the flag
//!   table (actor `external`, audited, compare-and-set on the version) and served from then on;
//! - a refused move is **held**: the last allowed stage stays in force, the refusal and its
//!   remedy are logged, `twintrack.flags.held` is 1 for (migration, wanted, serving), and
//!   [`MigrationFlag::held`](super::MigrationFlag::held), `twintrack status`, the admin page
//!   and gRPC `GetMigration` show it. `hold_unsafe = false` for a migration follows the source
//!   anyway, as a forced move (the overridden refusal is in the audit entry).
//!
//! Sources are evaluated once per cache refresh (the soft TTL, 1 s by default), never per
//! request: the request path stays one atomic load of the published snapshot.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{BoxFuture, FlagChange, FlagStore, SqlFlagStore};
use crate::transition::{self, Evidence, Refusal, Verdict};
use crate::{Result, Stage};

/// What a source says one migration's stage should be.
#[derive(Clone, Debug, PartialEq)]
pub struct WantedStage {
    /// The migration.
    pub migration: String,
    /// The stage, or why the source's value is unusable (missing flag, wrong type, a value
    /// that names no stage — quoted): the cache keeps the last known stage for it.
    pub stage: std::result::Result<Stage, String>,
}

/// A read-only source of stages. Implemented by [`SqlFlagStore`] (twintrack's own table) and
/// [`OpenFeatureSource`](super::OpenFeatureSource); implement it to drive twintrack from any
/// other flag system.
pub trait StageSource: Send + Sync + 'static {
    /// Names the source in logs, audit reasons and `status` (e.g. `flagd file flags.json`).
    fn describe(&self) -> String;

    /// The wanted stage of each of `migrations`, in any order. `Err` when the source as a whole
    /// cannot answer (every migration then keeps its last known stage); a per-migration problem
    /// goes in that migration's [`WantedStage::stage`].
    fn stages<'a>(&'a self, migrations: &'a [Arc<str>]) -> BoxFuture<'a, Result<Vec<WantedStage>>>;

    /// Change notices, for a source that can push them; `None` (the default) leaves the cache
    /// to its soft TTL.
    fn changes(&self) -> Option<broadcast::Receiver<FlagChange>> {
        None
    }
}

impl StageSource for SqlFlagStore {
    fn describe(&self) -> String {
        format!("twintrack's flag table ({:?})", self.database().backend())
    }

    fn stages<'a>(&'a self, migrations: &'a [Arc<str>]) -> BoxFuture<'a, Result<Vec<WantedStage>>> {
        Box::pin(async move {
            Ok(self
                .load_all()
                .await?
                .into_iter()
                .filter(|f| migrations.iter().any(|m| **m == *f.migration))
                .map(|f| WantedStage {
                    migration: f.migration,
                    stage: f.state.map(|s| s.stage),
                })
                .collect())
        })
    }

    fn changes(&self) -> Option<broadcast::Receiver<FlagChange>> {
        FlagStore::subscribe(self)
    }
}

/// Each migration's flag key in an external flag system: the migration's name unless set.
#[cfg(any(feature = "openfeature", feature = "launchdarkly"))]
#[derive(Clone, Debug, Default)]
pub(crate) struct FlagKeys(std::collections::HashMap<String, String>);

#[cfg(any(feature = "openfeature", feature = "launchdarkly"))]
impl FlagKeys {
    /// Sets `migration`'s key.
    pub(crate) fn set(&mut self, migration: impl Into<String>, key: impl Into<String>) {
        self.0.insert(migration.into(), key.into());
    }

    /// Sets the key of every migration in `config` (its `flag_key`, else its name).
    pub(crate) fn set_from(&mut self, config: &crate::config::Config) {
        for m in &config.migrations {
            self.set(&m.name, m.external_flag_key());
        }
    }

    /// The key of `migration`.
    pub(crate) fn of<'a>(&'a self, migration: &'a str) -> &'a str {
        self.0.get(migration).map_or(migration, String::as_str)
    }
}

/// A stage an external source wants that the transition rules refuse: the service keeps
/// serving `serving`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The stage the source reports.
    pub wanted: Stage,
    /// The stage served instead (the last allowed one).
    pub serving: Stage,
    /// The refusal: why the move is unsafe and what to run first.
    pub refusal: Refusal,
    /// The source ([`StageSource::describe`]).
    pub source: String,
}

impl std::fmt::Display for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "held at {}: {} wants {}, refused: {}; {}",
            self.serving, self.source, self.wanted, self.refusal.reason, self.refusal.remedy
        )
    }
}

/// What following a wanted stage from `serving` would be: `None` when nothing is to do or the
/// move is allowed, `Some(hold)` when the rules refuse it. Pure; the cache, `twintrack status`,
/// the admin page and `GetMigration` all decide with it.
pub fn assess(
    migration: &str,
    serving: Stage,
    wanted: Stage,
    evidence: &Evidence,
    source: &str,
) -> Option<Hold> {
    match transition::check(migration, serving, wanted, evidence) {
        Verdict::Refused(refusal) => Some(Hold {
            wanted,
            serving,
            refusal,
            source: source.to_owned(),
        }),
        Verdict::Unchanged | Verdict::Allowed(_) => None,
    }
}

/// The hold of one migration right now, for tools outside a service (`twintrack status`, the
/// control plane): asks `source` for the wanted stage and checks it against the record in
/// `store`. `Ok(None)`: no hold (or the source has no usable value for it).
pub async fn current_hold(
    source: &dyn StageSource,
    store: &dyn FlagStore,
    migration: &str,
) -> Result<Option<Hold>> {
    let names = [Arc::<str>::from(migration)];
    let wanted = source.stages(&names).await?;
    let Some(Ok(wanted)) = wanted
        .into_iter()
        .find(|w| w.migration == migration)
        .map(|w| w.stage)
    else {
        return Ok(None);
    };
    let record = store.get(migration).await?;
    Ok(assess(
        migration,
        record.state.stage,
        wanted,
        &record.evidence,
        &source.describe(),
    ))
}
