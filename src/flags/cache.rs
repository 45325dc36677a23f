//! [`FlagCache`]: the in-process copy of every registered migration's flag state.
//!
//! - Each migration's value in force lives in a moka cache with the time it was loaded and where
//!   it came from ([`FlagSource`]): fresh from the store, the last known value kept while the
//!   store fails (or while its row is unparsable), or the configured fallback stage when nothing
//!   was ever loaded.
//! - A background task reloads every `soft_ttl` (default 1 s), and at once when the store pushes
//!   a change (PostgreSQL `NOTIFY`). A failed reload never evicts anything.
//! - After each reload the values are frozen into one immutable [`Snapshot`]. Taking a snapshot
//!   is a single atomic load: that is what the tower layer does per request, so it costs no
//!   cache lookups, clock reads or locks on the request path.
//! - With an external [`StageSource`] ([`FlagCacheBuilder::source`]), each reload also asks it
//!   for the wanted stages and holds them to the transition rules (see [`super::source`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use opentelemetry::KeyValue;
use tokio::sync::{Mutex, broadcast};

use super::source::{Hold, StageSource, WantedStage, assess};
use super::{FlagChange, FlagState, FlagStore, StageChange};
use crate::metrics::Metrics;
use crate::{Error, Result, Stage};

/// How long a reload waits for an external source's answer; past it, the source has failed
/// for this reload.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the value in force for a migration came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagSource {
    /// Loaded from the store by the latest reload.
    Fresh,
    /// The last known value, kept because the latest reload failed or the row did not parse.
    Stale,
    /// Never loaded: the configured fallback stage.
    Fallback,
}

/// One migration's flag state as the cache holds it.
#[derive(Clone, Debug)]
pub struct MigrationFlag {
    /// The flag state (for a fallback: the fallback stage, version 0).
    pub state: Arc<FlagState>,
    /// Where it came from.
    pub source: FlagSource,
    /// When it was loaded from the store (`None` for a fallback).
    pub loaded_at: Option<SystemTime>,
    /// With an external source: the stage it wants that the transition rules refuse (the
    /// `state` above is what is served instead).
    pub held: Option<Arc<Hold>>,
    /// Stable hash of the migration name, for read rollout bucketing.
    pub(crate) name_hash: u64,
}

impl MigrationFlag {
    /// The migration's name.
    pub fn name(&self) -> &str {
        &self.state.migration
    }

    /// The stage in force.
    pub fn stage(&self) -> Stage {
        self.state.stage
    }
}

/// Every registered migration's flag state at one instant. Immutable; shared by `Arc`.
#[derive(Debug)]
pub struct Snapshot {
    flags: Box<[MigrationFlag]>,
    generation: u64,
    needs_rollout_key: bool,
}

impl Snapshot {
    /// The flag of `migration`, if it is registered with the cache.
    pub fn get(&self, migration: &str) -> Option<&MigrationFlag> {
        // A handful of migrations: a linear scan beats hashing.
        self.flags.iter().find(|f| f.name() == migration)
    }

    /// The stage of `migration`, if it is registered with the cache.
    pub fn stage(&self, migration: &str) -> Option<Stage> {
        self.get(migration).map(MigrationFlag::stage)
    }

    /// Every registered migration's flag.
    pub fn iter(&self) -> impl Iterator<Item = &MigrationFlag> {
        self.flags.iter()
    }

    /// Increases with every reload; two snapshots with the same generation are the same.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether some migration is in `live` with a partial read rollout, so requests need a
    /// rollout key. When not, the layer skips computing one.
    pub fn needs_rollout_key(&self) -> bool {
        self.needs_rollout_key
    }

    fn new(flags: Vec<MigrationFlag>, generation: u64) -> Snapshot {
        let needs_rollout_key = flags.iter().any(|f| {
            f.stage() == Stage::Live && f.state.read_rollout_percent.is_some_and(|p| p < 100)
        });
        Snapshot {
            flags: flags.into_boxed_slice(),
            generation,
            needs_rollout_key,
        }
    }
}

/// See [`FlagCache::snapshot_reader`].
pub(crate) type SnapshotReader = arc_swap::Cache<SnapshotSource, Arc<Snapshot>>;

/// The published snapshot, reached through (and keeping alive) the whole cache.
#[derive(Clone)]
pub(crate) struct SnapshotSource(Arc<Inner>);

impl std::ops::Deref for SnapshotSource {
    type Target = ArcSwap<Snapshot>;

    fn deref(&self) -> &ArcSwap<Snapshot> {
        &self.0.snapshot
    }
}

#[derive(Clone, Debug)]
struct Registered {
    name: Arc<str>,
    fallback: Stage,
}

/// Builds a [`FlagCache`].
pub struct FlagCacheBuilder {
    store: Arc<dyn FlagStore>,
    source: Option<Arc<dyn StageSource>>,
    follow_unsafe: HashSet<Arc<str>>,
    migrations: Vec<Registered>,
    soft_ttl: Duration,
    metrics: Option<Metrics>,
}

impl FlagCacheBuilder {
    /// Registers a migration, with the stage to serve if its flag was never loaded.
    /// Registering the same name twice keeps the last fallback.
    pub fn migration(mut self, name: impl Into<String>, fallback: Stage) -> Self {
        let name: Arc<str> = name.into().into();
        self.migrations.retain(|m| m.name != name);
        self.migrations.push(Registered { name, fallback });
        self
    }

    /// Registers every migration of `config` with its `fallback_stage` and `hold_unsafe`.
    pub fn configured(mut self, config: &crate::config::Config) -> Self {
        for m in &config.migrations {
            self = self
                .migration(&m.name, m.fallback_stage)
                .hold_unsafe(&m.name, m.hold_unsafe);
        }
        self
    }

    /// Takes the wanted stages from `source` (an OpenFeature provider, say) instead of the
    /// store, held to the transition rules against the store's evidence; the store's flag table
    /// then mirrors what is served. See [`super::source`].
    pub fn source(mut self, source: Arc<dyn StageSource>) -> Self {
        self.source = Some(source);
        self
    }

    /// With an external source: whether a stage the rules refuse is held (`true`, the default)
    /// or followed anyway as a forced, audited move (`false`).
    pub fn hold_unsafe(mut self, migration: impl Into<String>, hold: bool) -> Self {
        let name: Arc<str> = migration.into().into();
        if hold {
            self.follow_unsafe.remove(&name);
        } else {
            self.follow_unsafe.insert(name);
        }
        self
    }

    /// How often the cache reloads without a push from the store (default 1 s).
    pub fn soft_ttl(mut self, ttl: Duration) -> Self {
        self.soft_ttl = ttl.max(Duration::from_millis(10));
        self
    }

    /// Records metrics on these instruments instead of the global meter's.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Loads once (serving fallbacks if the store fails) and starts the background refresher,
    /// which stops when the last clone of the cache is dropped. Needs a Tokio runtime.
    pub async fn build(self) -> FlagCache {
        let mut migrations = self.migrations;
        migrations.sort_by(|a, b| a.name.cmp(&b.name));
        let values = moka::sync::Cache::builder()
            .max_capacity(migrations.len().max(1) as u64 * 2)
            .build();
        // A source that pushes its changes wakes the cache; else the store's NOTIFY does
        // (another instance mirrored a move, a tuning changed), and the soft TTL in any case.
        let changes = match &self.source {
            Some(source) => source.changes().or_else(|| self.store.subscribe()),
            None => self.store.subscribe(),
        };
        let inner = Arc::new(Inner {
            store: self.store,
            source: self.source,
            settled: std::sync::Mutex::new(HashMap::new()),
            follow_unsafe: self.follow_unsafe,
            names: migrations.iter().map(|m| m.name.clone()).collect(),
            migrations,
            values,
            snapshot: ArcSwap::from_pointee(Snapshot::new(Vec::new(), 0)),
            reload_lock: Mutex::new(0),
            metrics: self.metrics.unwrap_or_else(Metrics::global),
        });
        let _ = inner.reload().await;
        tokio::spawn(refresher(Arc::downgrade(&inner), self.soft_ttl, changes));
        FlagCache { inner }
    }
}

/// The cached flag state of a set of migrations. Cheap to clone; clones share the cache.
#[derive(Clone)]
pub struct FlagCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FlagCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagCache")
            .field("snapshot", &self.inner.snapshot.load())
            .finish_non_exhaustive()
    }
}

struct Inner {
    store: Arc<dyn FlagStore>,
    source: Option<Arc<dyn StageSource>>,
    /// Per migration, the wanted stage from the source this process last settled.
    settled: std::sync::Mutex<HashMap<Arc<str>, Stage>>,
    follow_unsafe: HashSet<Arc<str>>,
    names: Vec<Arc<str>>,
    migrations: Vec<Registered>,
    values: moka::sync::Cache<Arc<str>, MigrationFlag>,
    /// The published snapshot.
    snapshot: ArcSwap<Snapshot>,
    /// Serialises reloads (so an older load never overwrites a newer one); holds the generation.
    reload_lock: Mutex<u64>,
    metrics: Metrics,
}

impl FlagCache {
    /// Starts building a cache over `store`.
    pub fn builder(store: Arc<dyn FlagStore>) -> FlagCacheBuilder {
        FlagCacheBuilder {
            store,
            source: None,
            follow_unsafe: HashSet::new(),
            migrations: Vec::new(),
            soft_ttl: Duration::from_secs(1),
            metrics: None,
        }
    }

    /// The current snapshot of every registered migration. One atomic load.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// A per-owner cache of the published snapshot: after the first call, checking it for a
    /// newer snapshot is one atomic load. For hot paths that own `&mut` state (the layer). It
    /// keeps the cache, and so its refresher, alive.
    pub(crate) fn snapshot_reader(&self) -> SnapshotReader {
        arc_swap::Cache::new(SnapshotSource(self.inner.clone()))
    }

    /// One migration's cached flag (outside a request; inside one, use the request's snapshot).
    pub fn get(&self, migration: &str) -> Option<MigrationFlag> {
        self.inner.values.get(migration)
    }

    /// Reloads now, and returns the store's error if the reload failed (the cache still serves
    /// the last known values in that case).
    pub async fn refresh(&self) -> Result<()> {
        self.inner.reload().await
    }

    /// The store behind the cache.
    pub fn store(&self) -> &Arc<dyn FlagStore> {
        &self.inner.store
    }

    /// The external stage source, if the cache follows one.
    pub fn source(&self) -> Option<&Arc<dyn StageSource>> {
        self.inner.source.as_ref()
    }
}

impl Inner {
    async fn reload(&self) -> Result<()> {
        let mut generation = self.reload_lock.lock().await;
        let loaded = self.store.load_all().await;
        let wanted = match &self.source {
            Some(source) => Some(
                tokio::time::timeout(SOURCE_TIMEOUT, source.stages(&self.names))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Error::FlagSource(format!(
                            "no answer within {SOURCE_TIMEOUT:?}"
                        )))
                    }),
            ),
            None => None,
        };
        let now = SystemTime::now();
        let source_error = match &wanted {
            Some(Err(err)) => Some(format!("{}: {err}", self.describe_source())),
            _ => None,
        };
        let failed = loaded.is_err() || source_error.is_some();
        self.metrics.get().flag_refresh.add(
            1,
            &[KeyValue::new(
                "outcome",
                if failed { "error" } else { "ok" },
            )],
        );
        let rows: HashMap<&str, &std::result::Result<FlagState, String>> = match &loaded {
            Ok(rows) => rows
                .iter()
                .map(|r| (r.migration.as_str(), &r.state))
                .collect(),
            Err(err) => {
                tracing::warn!(error = %err, "flag store unreachable; serving last known flag values");
                HashMap::new()
            }
        };
        let wanted: Option<HashMap<&str, &WantedStage>> = match &wanted {
            None => None,
            Some(Ok(stages)) => Some(stages.iter().map(|w| (w.migration.as_str(), w)).collect()),
            Some(Err(err)) => {
                tracing::warn!(error = %err, source = %self.describe_source(), "flag source unreachable; serving last known stages");
                Some(HashMap::new())
            }
        };
        let mut flags = Vec::with_capacity(self.migrations.len());
        for registered in &self.migrations {
            let name = &registered.name;
            let attrs = [KeyValue::new("migration", name.to_string())];
            let last = self.values.get(name);
            let mut held = None;
            // What the store holds for the migration (the stage served, with an external
            // source), when it parsed.
            let row = match rows.get(&**name) {
                Some(Ok(state)) => Some(state),
                Some(Err(problem)) => {
                    tracing::error!(migration = %name, %problem, "invalid flag row; the last good value stays in force");
                    self.metrics.get().flag_invalid.add(1, &attrs);
                    None
                }
                None if loaded.is_ok() => {
                    tracing::warn!(migration = %name, "migration not registered in the flag store (run `twintrack init`)");
                    None
                }
                None => None,
            };
            let last_hold = last.as_ref().and_then(|l| l.held.clone());
            // The state to serve, and whether it is the latest word (else: kept).
            let fresh = match (&wanted, row) {
                (None, row) => row.map(|row| (row.clone(), FlagSource::Fresh)),
                (Some(_), None) => None,
                (Some(wanted), Some(row)) => match wanted.get(&**name).map(|w| &w.stage) {
                    Some(Ok(stage)) => {
                        // Edge-triggered: act on a wanted stage this process has not settled
                        // yet (or one it holds, in case the evidence has come). A wanted stage
                        // already settled is not pressed again, so an operator's rollback, or
                        // another instance following a newer value first, is not undone by
                        // this instance's older observation.
                        let pressing = self.settled(name) != Some(*stage)
                            || last_hold.as_ref().is_some_and(|h| h.wanted == *stage);
                        if pressing {
                            let (state, hold, settled) = self.follow(name, row, *stage).await;
                            if settled {
                                self.settle(name, *stage);
                            }
                            held = hold.map(Arc::new);
                            Some((state, FlagSource::Fresh))
                        } else {
                            Some((row.clone(), FlagSource::Fresh))
                        }
                    }
                    // The source's value is unusable, or the source failed as a whole (counted
                    // and logged above): the stage twintrack's table serves stays in force (so
                    // a rollback made meanwhile is followed), and so does any hold.
                    unusable => {
                        if let Some(Err(problem)) = unusable {
                            tracing::error!(migration = %name, source = %self.describe_source(), %problem, "unusable stage from the flag source; the stage served stays in force");
                            self.metrics.get().flag_invalid.add(1, &attrs);
                        }
                        held = last_hold.clone();
                        Some((row.clone(), FlagSource::Stale))
                    }
                },
            };
            self.report_hold(
                name,
                last.as_ref().and_then(|l| l.held.as_deref()),
                held.as_deref(),
            );
            if let Some((_, FlagSource::Stale)) = &fresh {
                self.metrics.get().flag_stale.add(1, &attrs);
            }
            let flag = match (fresh, last) {
                (Some((state, source)), _) => MigrationFlag {
                    state: Arc::new(state),
                    source,
                    loaded_at: Some(now),
                    held,
                    name_hash: name_hash(name.as_bytes()),
                },
                (None, Some(last)) if last.source != FlagSource::Fallback => {
                    self.metrics.get().flag_stale.add(1, &attrs);
                    MigrationFlag {
                        source: FlagSource::Stale,
                        ..last
                    }
                }
                (None, _) => {
                    self.metrics.get().flag_fallback.add(1, &attrs);
                    fallback(name, registered.fallback)
                }
            };
            if let Some(loaded_at) = flag.loaded_at {
                let age = now.duration_since(loaded_at).unwrap_or_default();
                self.metrics
                    .get()
                    .flag_age
                    .record(age.as_secs_f64(), &attrs);
            }
            self.values.insert(name.clone(), flag.clone());
            flags.push(flag);
        }
        *generation += 1;
        self.snapshot
            .store(Arc::new(Snapshot::new(flags, *generation)));
        loaded?;
        match source_error {
            Some(err) => Err(Error::FlagSource(err)),
            None => Ok(()),
        }
    }

    fn describe_source(&self) -> String {
        self.source
            .as_ref()
            .map_or_else(String::new, |source| source.describe())
    }

    /// The wanted stage of `migration` this process last settled (moved to, found in force,
    /// or holds).
    fn settled(&self, migration: &str) -> Option<Stage> {
        let settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        settled.get(migration).copied()
    }

    fn settle(&self, migration: &Arc<str>, wanted: Stage) {
        let mut settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        settled.insert(migration.clone(), wanted);
    }

    /// Moves the served stage (`row`, the store's) towards `wanted` from an external source, as
    /// far as the transition rules allow: returns the state to serve, the hold if refused, and
    /// whether the outcome is settled (moved, already there, or held; not a failure to retry).
    async fn follow(
        &self,
        name: &str,
        row: &FlagState,
        wanted: Stage,
    ) -> (FlagState, Option<Hold>, bool) {
        if row.stage == wanted {
            return (row.clone(), None, true);
        }
        // The evidence, and the row as it is now (another instance may have moved it).
        let record = match self.store.get(name).await {
            Ok(record) => record,
            Err(err) => {
                tracing::warn!(migration = %name, error = %err, "cannot read the evidence; serving the last allowed stage");
                return (row.clone(), None, false);
            }
        };
        if record.state.stage == wanted {
            return (record.state, None, true);
        }
        let source = self.describe_source();
        let hold = assess(name, record.state.stage, wanted, &record.evidence, &source);
        let force = hold.is_some() && self.follow_unsafe.contains(name);
        if hold.is_some() && !force {
            return (record.state, hold, true);
        }
        let change = StageChange::new(name, wanted, "external", format!("{source} wants {wanted}"))
            .expect_version(record.state.version)
            .force(force);
        match self.store.set_stage(change).await {
            Ok(outcome) => {
                if let Some(refusal) = &outcome.overridden {
                    tracing::warn!(migration = %name, %source, %refusal, "hold_unsafe = false: following the flag source into a refused stage (audited)");
                } else {
                    tracing::info!(migration = %name, %source, from = %record.state.stage, to = %wanted, "following the flag source");
                }
                (outcome.state, None, true)
            }
            // Refused by the store's own checks (repair intents still target the side): a
            // hold like any other.
            Err(Error::Refused(refusal)) => {
                let hold = Hold {
                    wanted,
                    serving: record.state.stage,
                    refusal,
                    source,
                };
                (record.state, Some(hold), true)
            }
            // Another instance moved it first, or the store failed: the next reload looks
            // again.
            Err(err) => {
                tracing::warn!(migration = %name, %source, error = %err, "could not follow the flag source yet; serving the last allowed stage");
                (record.state, None, false)
            }
        }
    }

    /// Keeps `twintrack.flags.held` and the log in step with a migration's hold.
    fn report_hold(&self, name: &str, before: Option<&Hold>, now: Option<&Hold>) {
        let attrs = |h: &Hold| {
            [
                KeyValue::new("migration", name.to_owned()),
                KeyValue::new("wanted", h.wanted.as_str()),
                KeyValue::new("serving", h.serving.as_str()),
            ]
        };
        let same = |a: &Hold, b: &Hold| a.wanted == b.wanted && a.serving == b.serving;
        if let Some(before) = before
            && now.is_none_or(|now| !same(before, now))
        {
            self.metrics.get().flag_held.record(0, &attrs(before));
            if now.is_none() {
                tracing::info!(migration = %name, wanted = %before.wanted, "no longer held");
            }
        }
        if let Some(now) = now {
            self.metrics.get().flag_held.record(1, &attrs(now));
            if before.is_none_or(|before| !same(before, now)) {
                tracing::error!(migration = %name, wanted = %now.wanted, serving = %now.serving, source = %now.source,
                    reason = %now.refusal.reason, remedy = %now.refusal.remedy,
                    "the flag source wants a stage the transition rules refuse; holding the last allowed stage");
            }
        }
    }
}

fn fallback(name: &str, stage: Stage) -> MigrationFlag {
    MigrationFlag {
        state: Arc::new(FlagState {
            migration: name.to_owned(),
            stage,
            version: 0,
            updated_at: 0,
            updated_by: "twintrack".into(),
            reason: "fallback: flag never loaded from the store".into(),
            shadow_sample_rate: 1.0,
            read_rollout_percent: None,
        }),
        source: FlagSource::Fallback,
        loaded_at: None,
        held: None,
        name_hash: name_hash(name.as_bytes()),
    }
}

/// FNV-1a: stable across processes and releases, so a request key lands in the same rollout
/// bucket on every instance.
pub(crate) fn name_hash(bytes: impl AsRef<[u8]>) -> u64 {
    bytes.as_ref().iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn refresher(
    cache: Weak<Inner>,
    soft_ttl: Duration,
    mut changes: Option<broadcast::Receiver<FlagChange>>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(soft_ttl) => {}
            pushed = next_change(&mut changes) => {
                if let Err(broadcast::error::RecvError::Closed) = pushed {
                    changes = None; // the store stopped pushing: fall back to the soft TTL
                }
                // Coalesce a burst of notifications into one reload.
                if let Some(rx) = changes.as_mut() {
                    while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = rx.try_recv() {}
                }
            }
        }
        let Some(inner) = cache.upgrade() else { return };
        // A failure is already logged and counted, and the last known values stay in force.
        let _ = inner.reload().await;
    }
}

async fn next_change(
    changes: &mut Option<broadcast::Receiver<FlagChange>>,
) -> std::result::Result<FlagChange, broadcast::error::RecvError> {
    match changes {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_hash_is_fnv1a() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(name_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(name_hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(name_hash("foobar"), 0x8594_4171_f739_67e8);
    }
}
