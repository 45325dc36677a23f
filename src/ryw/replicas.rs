//! Replica health: which replicas have replayed how far, and which may serve reads.
//!
//! A [`ReplicaSet`] polls each replica in the background (at a jittered interval, each poll
//! bounded by a timeout): its replayed WAL position, and its lag behind the primary in bytes
//! and in time. A replica that lags past the configured limits, is not in recovery, or fails to
//! answer is taken out until a later poll finds it healthy again. [`ReplicaSet::pick`] chooses
//! among the healthy ones, optionally only those that have replayed at least a given position
//! (a read-your-writes token's).

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use opentelemetry::KeyValue;

use super::token::{ClusterId, Lsn};
use crate::db::{ConnectOptions, Database};
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How replicas are watched and when they are taken out.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// Time between polls of one replica (jittered by up to ±25%). Default 100 ms.
    pub poll_interval: Duration,
    /// Longest a poll may take before the replica counts as failing. Default 1 s.
    pub poll_timeout: Duration,
    /// A replica further behind the primary than this (by replay time) is taken out. Default 5 s.
    pub max_lag: Duration,
    /// A replica further behind than this many WAL bytes is taken out. Default 64 MiB.
    pub max_lag_bytes: u64,
    /// Connection pool size per replica. Default 10.
    pub max_connections: u32,
    /// Where replica lag and health are recorded (default: the global meter).
    pub metrics: Metrics,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            poll_interval: Duration::from_millis(100),
            poll_timeout: Duration::from_secs(1),
            max_lag: Duration::from_secs(5),
            max_lag_bytes: 64 << 20,
            max_connections: 10,
            metrics: Metrics::global(),
        }
    }
}

/// What the latest poll found out about one replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaHealth {
    /// Whether it may serve reads now.
    pub healthy: bool,
    /// How far it has replayed.
    pub replay_lsn: Option<Lsn>,
    /// Bytes of WAL it is behind the primary.
    pub lag_bytes: Option<u64>,
    /// How far behind in time (zero when it has replayed everything the primary wrote).
    pub lag: Option<Duration>,
    /// Why it is out, when it is.
    pub problem: Option<String>,
    /// What kind of problem that is.
    pub out: Option<OutReason>,
}

/// Why a replica is out of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutReason {
    /// Further behind than the configured limits.
    Lagging,
    /// Not answering, failing, not a replica, or not polled yet.
    Down,
}

/// Why [`ReplicaSet::choose`] found no replica for a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoReplica {
    /// Healthy replicas exist but none has replayed the required position yet.
    NotReplayed,
    /// Every usable replica is out for lag.
    Lagging,
    /// Every usable replica is down (or there are none).
    Down,
}

impl ReplicaHealth {
    fn unknown() -> ReplicaHealth {
        ReplicaHealth {
            healthy: false,
            replay_lsn: None,
            lag_bytes: None,
            lag: None,
            problem: Some("not polled yet".into()),
            out: Some(OutReason::Down),
        }
    }
}

struct Replica {
    db: Database,
    health: ArcSwap<ReplicaHealth>,
    /// The `replica` metric attribute.
    attr: KeyValue,
}

impl Replica {
    fn set_health(&self, mut health: ReplicaHealth, metrics: &Metrics) {
        // Replay only moves forward: a poll that started before an on-demand check (or before
        // another poll) must not move the known position back.
        let known = self.health.load().replay_lsn;
        if let (Some(known), Some(polled)) = (known, health.replay_lsn)
            && known > polled
        {
            health.replay_lsn = Some(known);
        }
        let attrs = std::slice::from_ref(&self.attr);
        metrics
            .get()
            .replica_healthy
            .record(u64::from(health.healthy), attrs);
        if let Some(lag) = health.lag {
            metrics.get().replica_lag.record(lag.as_secs_f64(), attrs);
        }
        if let Some(bytes) = health.lag_bytes {
            metrics.get().replica_lag_bytes.record(bytes, attrs);
        }
        self.health.store(Arc::new(health));
    }
}

struct Inner {
    primary: Database,
    replicas: Vec<Replica>,
    cluster: ClusterId,
    options: ReplicaOptions,
}

/// A primary and its replicas, with a background health poller. Cheap to clone.
#[derive(Clone)]
pub struct ReplicaSet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet")
            .field("replicas", &self.inner.replicas.len())
            .field("cluster", &self.inner.cluster)
            .finish_non_exhaustive()
    }
}

impl ReplicaSet {
    /// Reads the primary's cluster identity, connects to each replica (a replica that is down
    /// now only starts out of service) and starts polling. PostgreSQL only.
    pub async fn connect(
        primary: Database,
        replica_urls: &[String],
        options: ReplicaOptions,
    ) -> Result<ReplicaSet> {
        let mut pools = Vec::with_capacity(replica_urls.len());
        for url in replica_urls {
            // A short acquire timeout: a replica that cannot hand out a connection quickly is
            // skipped for the primary, not waited for.
            pools.push(Database::connect_lazy_with(
                url,
                ConnectOptions {
                    max_connections: options.max_connections,
                    acquire_timeout: options.poll_timeout,
                },
            )?);
        }
        ReplicaSet::with_pools(primary, pools, options).await
    }

    /// Like [`ReplicaSet::connect`], over replica pools the service already has
    /// (`Database::from(pg_pool)`). Give them a short acquire timeout: a read waits that long
    /// for a busy replica before the primary serves it.
    pub async fn with_pools(
        primary: Database,
        replica_pools: Vec<Database>,
        options: ReplicaOptions,
    ) -> Result<ReplicaSet> {
        if replica_pools.len() > 64 {
            return Err(Error::Config(format!(
                "{} replicas configured; at most 64 are supported",
                replica_pools.len()
            )));
        }
        if primary.backend() == crate::Backend::Sqlite {
            return Err(Error::Config(
                "SQLite has no replicas: replicas are PostgreSQL streaming replicas or MariaDB GTID replicas".into(),
            ));
        }
        if let Some(other) = replica_pools
            .iter()
            .find(|db| db.backend() != primary.backend())
        {
            return Err(Error::Config(format!(
                "the replica {} is not of the primary's backend ({})",
                other.describe(),
                primary.backend().as_str()
            )));
        }
        let cluster = cluster_id(&primary).await?;
        let replicas = replica_pools
            .into_iter()
            .enumerate()
            .map(|(index, db)| Replica {
                db,
                health: ArcSwap::from_pointee(ReplicaHealth::unknown()),
                attr: KeyValue::new("replica", index as i64),
            })
            .collect();
        let set = ReplicaSet {
            inner: Arc::new(Inner {
                primary,
                replicas,
                cluster,
                options,
            }),
        };
        set.poll_all().await;
        for index in 0..set.inner.replicas.len() {
            tokio::spawn(poller(Arc::downgrade(&set.inner), index));
        }
        Ok(set)
    }

    /// The primary.
    pub fn primary(&self) -> &Database {
        &self.inner.primary
    }

    /// Replica `index`.
    pub fn replica(&self, index: usize) -> &Database {
        &self.inner.replicas[index].db
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.inner.replicas.len()
    }

    /// Whether there are no replicas.
    pub fn is_empty(&self) -> bool {
        self.inner.replicas.is_empty()
    }

    /// The primary's cluster identity (for tokens).
    pub fn cluster(&self) -> ClusterId {
        self.inner.cluster
    }

    /// Each replica's latest health.
    pub fn health(&self) -> Vec<ReplicaHealth> {
        self.inner
            .replicas
            .iter()
            .map(|r| ReplicaHealth::clone(&r.health.load()))
            .collect()
    }

    /// A healthy replica that has replayed at least `min_lsn` (any healthy one without it),
    /// preferring the one least behind. `None` means: read from the primary.
    pub fn pick(&self, min_lsn: Option<Lsn>) -> Option<usize> {
        self.choose(min_lsn, 0).ok()
    }

    /// Like [`ReplicaSet::pick`], skipping the replicas whose bit is set in `excluded`
    /// (replica `i` is bit `i`; replicas from the 64th on cannot be excluded), and saying why
    /// there is none.
    pub fn choose(
        &self,
        min_lsn: Option<Lsn>,
        excluded: u64,
    ) -> std::result::Result<usize, NoReplica> {
        let mut best: Option<(usize, u64)> = None;
        let mut why = NoReplica::Down;
        for (index, replica) in self.inner.replicas.iter().enumerate() {
            if index < 64 && excluded & (1 << index) != 0 {
                continue;
            }
            let health = replica.health.load();
            if !health.healthy {
                if health.out == Some(OutReason::Lagging) && why == NoReplica::Down {
                    why = NoReplica::Lagging;
                }
                continue;
            }
            let replayed = match (min_lsn, health.replay_lsn) {
                (None, _) => true,
                (Some(min), Some(replayed)) => replayed >= min,
                (Some(_), None) => false,
            };
            if !replayed {
                why = NoReplica::NotReplayed;
                continue;
            }
            let behind = health.lag_bytes.unwrap_or(u64::MAX);
            if best.is_none_or(|(_, b)| behind < b) {
                best = Some((index, behind));
            }
        }
        best.map(|(index, _)| index).ok_or(why)
    }

    /// Whether replica `index` is in service and has replayed at least `min_lsn`.
    pub fn usable(&self, index: usize, min_lsn: Option<Lsn>) -> bool {
        let Some(replica) = self.inner.replicas.get(index) else {
            return false;
        };
        let health = replica.health.load();
        health.healthy
            && match (min_lsn, health.replay_lsn) {
                (None, _) => true,
                (Some(min), Some(replayed)) => replayed >= min,
                (Some(_), None) => false,
            }
    }

    /// A replica in service to prove a position on: `prefer` if it is in service, else the
    /// least behind; with its lag by time.
    pub(crate) fn candidate(
        &self,
        excluded: u64,
        prefer: Option<usize>,
    ) -> Option<(usize, Duration)> {
        let healthy = |index: usize| {
            let health = self.inner.replicas.get(index)?.health.load();
            let skip = index < 64 && excluded & (1 << index) != 0;
            (health.healthy && !skip).then(|| {
                (
                    health.lag.unwrap_or_default(),
                    health.lag_bytes.unwrap_or(u64::MAX),
                )
            })
        };
        if let Some(index) = prefer
            && let Some((lag, _)) = healthy(index)
        {
            return Some((index, lag));
        }
        (0..self.inner.replicas.len())
            .filter_map(|i| healthy(i).map(|(lag, bytes)| (i, lag, bytes)))
            .min_by_key(|(_, _, bytes)| *bytes)
            .map(|(i, lag, _)| (i, lag))
    }

    /// Records a replayed position read from replica `index` outside the poller.
    pub(crate) fn observe_replay(&self, index: usize, lsn: Lsn) {
        if let Some(replica) = self.inner.replicas.get(index) {
            let health = replica.health.load();
            if health.replay_lsn.is_none_or(|known| known < lsn) {
                let mut updated = ReplicaHealth::clone(&health);
                updated.replay_lsn = Some(lsn);
                // A lost race with the poller only costs one more primary read.
                replica.health.store(Arc::new(updated));
            }
        }
    }

    /// The longest a poll (or an on-demand replay check) may take.
    pub(crate) fn poll_timeout(&self) -> Duration {
        self.inner.options.poll_timeout
    }

    /// Takes replica `index` out of service now (a read on it failed the way a down server
    /// fails); the poller puts it back once it answers again.
    pub fn mark_down(&self, index: usize, problem: String) {
        if let Some(replica) = self.inner.replicas.get(index) {
            tracing::warn!(replica = index, %problem, "replica taken out after a failed read");
            replica.set_health(
                ReplicaHealth {
                    problem: Some(problem),
                    ..ReplicaHealth::unknown()
                },
                &self.inner.options.metrics,
            );
        }
    }

    /// Polls every replica now (the background poller does this on its own).
    pub async fn poll_all(&self) {
        let primary = self.primary_lsn().await.ok();
        for replica in &self.inner.replicas {
            let health = poll(replica, self.inner.cluster, primary, &self.inner.options).await;
            replica.set_health(health, &self.inner.options.metrics);
        }
    }

    /// The primary's current position (PostgreSQL: WAL written; MariaDB: its domain's GTID
    /// sequence number): after a commit, the position a reader must see.
    pub async fn primary_lsn(&self) -> Result<Lsn> {
        super::position::primary(
            &self.inner.primary,
            self.inner.cluster,
            super::position::Mark::Lag,
        )
        .await
    }
}

/// The cluster's identity: PostgreSQL's system identifier and the primary's timeline;
/// MariaDB's primary `@@server_id` and `@@gtid_domain_id`.
pub async fn cluster_id(primary: &Database) -> Result<ClusterId> {
    super::position::cluster(primary).await
}

async fn poll(
    replica: &Replica,
    cluster: ClusterId,
    primary: Option<Lsn>,
    options: &ReplicaOptions,
) -> ReplicaHealth {
    let poll = super::position::poll(&replica.db, cluster);
    let polled = match tokio::time::timeout(options.poll_timeout, poll).await {
        Ok(Ok(polled)) => polled,
        Ok(Err(err)) => return out_of_service(format!("poll failed: {err}")),
        Err(_) => return out_of_service(format!("no answer within {:?}", options.poll_timeout)),
    };
    let lag_ms = polled.lag_ms;
    if !polled.replicating {
        return out_of_service("not replicating (promoted, stopped, or not a replica)".into());
    }
    let Some(replay_lsn) = polled.replayed else {
        return out_of_service("no replayed position yet".into());
    };
    let lag_bytes = primary.map(|p| p.0.saturating_sub(replay_lsn.0));
    // The replay timestamp is that of the last replayed transaction: a caught-up replica on an
    // idle primary looks old by it. Caught up in bytes means no lag.
    let lag = match lag_bytes {
        Some(0) => Duration::ZERO,
        _ => Duration::from_millis(u64::try_from(lag_ms.max(0)).unwrap_or(0)),
    };
    let lagging = if lag_bytes.is_some_and(|b| b > options.max_lag_bytes) {
        Some(format!(
            "{} WAL bytes behind",
            lag_bytes.unwrap_or_default()
        ))
    } else if lag > options.max_lag {
        Some(format!("{lag:?} behind"))
    } else {
        None
    };
    ReplicaHealth {
        healthy: lagging.is_none(),
        replay_lsn: Some(replay_lsn),
        lag_bytes,
        lag: Some(lag),
        out: lagging.as_ref().map(|_| OutReason::Lagging),
        problem: lagging,
    }
}

fn out_of_service(problem: String) -> ReplicaHealth {
    ReplicaHealth {
        problem: Some(problem),
        ..ReplicaHealth::unknown()
    }
}

async fn poller(set: Weak<Inner>, index: usize) {
    let mut jitter = crate::context::random_key();
    loop {
        let Some(inner) = set.upgrade() else { return };
        let base = inner.options.poll_interval;
        // ±25% so a fleet of instances does not poll in lockstep.
        jitter = jitter.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15;
        let spread = base.as_micros() as u64 / 2;
        let delay = base.saturating_sub(Duration::from_micros(spread / 2))
            + Duration::from_micros(if spread == 0 { 0 } else { jitter % spread });
        drop(inner);
        tokio::time::sleep(delay).await;
        let Some(inner) = set.upgrade() else { return };
        let started = Instant::now();
        let primary =
            super::position::primary(&inner.primary, inner.cluster, super::position::Mark::Lag);
        let primary = match tokio::time::timeout(inner.options.poll_timeout, primary).await {
            Ok(Ok(lsn)) => Some(lsn),
            _ => None,
        };
        let replica = &inner.replicas[index];
        let health = poll(replica, inner.cluster, primary, &inner.options).await;
        if health.healthy != replica.health.load().healthy {
            tracing::info!(replica = index, healthy = health.healthy, problem = ?health.problem,
                took = ?started.elapsed(), "replica health changed");
        }
        replica.set_health(health, &inner.options.metrics);
    }
}
