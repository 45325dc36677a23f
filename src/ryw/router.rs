//! The read router: which server each read goes to, decided per request by what happened.
//!
//! A [`Router`] holds the primary, the [`ReplicaSet`] (if any) and the token signer. For each
//! read it asks the request's [`RequestContext`]:
//!
//! 1. the migration asks for primary reads → primary (`migration_rule`);
//! 2. there are no replicas → primary (`no_replicas`);
//! 3. the request already wrote → primary (`wrote_in_request`);
//! 4. the request carried a valid token → the replica chosen earlier in this request if it is
//!    still in service, else the least-behind healthy replica that has replayed the token's WAL
//!    position, else the primary (`token`). A token without a position (SQLite; an instance
//!    without replicas, see [`TokenPositions`]; or a write whose position could not be read)
//!    pins to the primary for [`RywOptions::fallback_window`], after which the primary's
//!    position, read once for the request, stands in for the token's;
//! 5. otherwise → the replica chosen earlier in this request, else the least-behind healthy
//!    one, else the primary (`replica_lagging` / `replica_down`).
//!
//! A read that fails on a replica with a hot-standby conflict (SQLSTATE `40001`), a dead
//! connection, or a table or column the replica has not replayed yet (`42P01`, `42703`: it lags
//! a migration's DDL) is retried on another replica, then on the primary; a dead replica is
//! taken out at once. Writes and transactions always go to the primary ([`Router::begin`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use opentelemetry::KeyValue;
use sqlx::Transaction;
use sqlx::pool::PoolConnection;

use super::replicas::{NoReplica, ReplicaSet};
use super::token::{ClusterId, HEADER_NAME, Lsn, Rejection, Token, TokenSigner};
use crate::RequestContext;
use crate::db::{Backend, Database, Native};
use crate::flags::BoxFuture;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How read-your-writes tokens are issued and honoured.
#[derive(Clone, Debug)]
pub struct RywOptions {
    /// How long a token is honoured. Default 30 s, at most 10 min.
    pub ttl: Duration,
    /// How long a token without a WAL position (from an instance without replicas, see
    /// [`TokenPositions`]; SQLite; or a write whose position could not be read) pins reads to
    /// the primary outright. Past it, the request reads the primary's position once and a
    /// replica serves it only when it has replayed that (no clocks are trusted for
    /// freshness). Default 5 s, the replicas' default lag limit (a replica that far behind
    /// would not serve it anyway). Capped by `ttl`.
    pub fallback_window: Duration,
    /// Also set and read the token as this cookie (`HttpOnly; SameSite=Lax; Path=/`), for
    /// browsers that do not echo headers. Default: header only.
    pub cookie: Option<String>,
    /// Longest wait for the primary's WAL position when issuing a token; past it, the token
    /// carries no position and falls back to the time window. Default 1 s.
    pub lsn_timeout: Duration,
    /// When tokens carry the primary's position. Default [`TokenPositions::WithReplicas`].
    pub positions: TokenPositions,
}

/// When a token carries the primary's position (PostgreSQL's WAL LSN, MariaDB's GTID), which
/// costs each write that answers with one a statement (read on the write's own connection,
/// after its commit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenPositions {
    /// When this router has replicas (the default). An instance without replicas reads from
    /// the primary only and needs no position, and the instances sharing its configuration
    /// neither; its tokens carry none, so an instance *with* replicas (a fleet part-way
    /// through adding them) serves their reads from the primary for
    /// [`RywOptions::fallback_window`], then reads the primary's position once per such
    /// request and serves it from a replica that has replayed that, as for any token without
    /// a position.
    #[default]
    WithReplicas,
    /// Always (on PostgreSQL and MariaDB): for an instance without replicas whose tokens are
    /// honoured by instances with replicas, e.g. a write service and a read service sharing
    /// the secret, so that those read from a replica as soon as it has replayed the write.
    Always,
}

impl Default for RywOptions {
    fn default() -> Self {
        RywOptions {
            ttl: Duration::from_secs(30),
            fallback_window: Duration::from_secs(5),
            cookie: None,
            lsn_timeout: Duration::from_secs(1),
            positions: TokenPositions::WithReplicas,
        }
    }
}

/// Where one read went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReadTarget {
    /// The primary.
    Primary,
    /// Replica `i` of the [`ReplicaSet`].
    Replica(usize),
}

impl ReadTarget {
    /// `primary` or `replica`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadTarget::Primary => "primary",
            ReadTarget::Replica(_) => "replica",
        }
    }
}

/// Why a read was sent to the primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinReason {
    /// The request already wrote.
    WroteInRequest,
    /// The request's token names a WAL position no replica in service has replayed yet (or
    /// carries no position and is inside the fallback window).
    Token,
    /// Every replica is out for lag.
    ReplicaLagging,
    /// Every replica is down.
    ReplicaDown,
    /// The read hit a hot-standby conflict on every replica it tried.
    ReplicaConflict,
    /// The migration reads from the primary only.
    MigrationRule,
    /// No replicas are configured.
    NoReplicas,
}

impl PinReason {
    /// The `pin` label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::WroteInRequest => "wrote_in_request",
            PinReason::Token => "token",
            PinReason::ReplicaLagging => "replica_lagging",
            PinReason::ReplicaDown => "replica_down",
            PinReason::ReplicaConflict => "replica_conflict",
            PinReason::MigrationRule => "migration_rule",
            PinReason::NoReplicas => "no_replicas",
        }
    }
}

/// A routing decision: the target, and for the primary, why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// Where the read goes.
    pub target: ReadTarget,
    /// Why it goes to the primary (`None` for a replica).
    pub pin: Option<PinReason>,
}

impl Route {
    fn primary(reason: PinReason) -> Route {
        Route {
            target: ReadTarget::Primary,
            pin: Some(reason),
        }
    }
}

/// One request's read-your-writes state, shared by everything the request runs (also spawned
/// work it re-scopes).
#[derive(Debug)]
pub(crate) struct RequestRyw {
    wrote: AtomicBool,
    /// The response will carry a token if the request wrote (set by the layer; a background
    /// job's context has none to answer with).
    answers: AtomicBool,
    /// Writes noted whose commit's position is not known (see [`RequestRyw::committed_at`]).
    unpositioned: std::sync::atomic::AtomicU32,
    /// The largest position a write of this request read in its own commit's round trip (0:
    /// none).
    position: std::sync::atomic::AtomicU64,
    token: Option<Token>,
    /// For a token without a position: the primary's position read for it, at or after the
    /// token's writes (0: not read).
    floor: std::sync::atomic::AtomicU64,
    /// The token's identity (a hash of its signed text; 0: none), under which the router
    /// keeps the position read for it across requests.
    tag: u64,
    /// The replica chosen for this request, plus one (0: none yet).
    replica: AtomicUsize,
    /// Where the latest read went: 0 none, 1 primary, 2 replica.
    last_read: AtomicU8,
}

impl RequestRyw {
    pub(crate) fn new(token: Option<Token>) -> RequestRyw {
        RequestRyw::tagged(token, 0)
    }

    /// [`RequestRyw::new`] for a token known by `tag` (see [`Router::accept_tagged`]).
    pub(crate) fn tagged(token: Option<Token>, tag: u64) -> RequestRyw {
        RequestRyw {
            wrote: AtomicBool::new(false),
            answers: AtomicBool::new(false),
            unpositioned: std::sync::atomic::AtomicU32::new(0),
            position: std::sync::atomic::AtomicU64::new(0),
            token,
            floor: std::sync::atomic::AtomicU64::new(0),
            tag,
            replica: AtomicUsize::new(0),
            last_read: AtomicU8::new(0),
        }
    }

    pub(crate) fn note_write(&self) {
        self.unpositioned.fetch_add(1, Ordering::AcqRel);
        self.wrote.store(true, Ordering::Release);
    }

    /// One noted write committed, and the primary's position read in the commit's own round
    /// trip was `lsn` (at or after its commit record).
    pub(crate) fn committed_at(&self, lsn: Lsn) {
        self.position.fetch_max(lsn.0, Ordering::AcqRel);
        let _ = self
            .unpositioned
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// A position at or after every commit of this request, when each of its writes read one
    /// in its commit (a write noted any other way has none: then the primary is asked).
    pub(crate) fn known_position(&self) -> Option<Lsn> {
        // The count first: a write noted after it is read cannot have its position missed
        // (its `committed_at` raises the position before lowering the count).
        let unpositioned = self.unpositioned.load(Ordering::Acquire);
        let position = self.position.load(Ordering::Acquire);
        (unpositioned == 0 && position > 0).then_some(Lsn(position))
    }

    /// The layer will answer this request with a token if it writes.
    pub(crate) fn will_answer(&self) {
        self.answers.store(true, Ordering::Relaxed);
    }

    /// Whether [`RequestRyw::will_answer`] was called.
    pub(crate) fn answers(&self) -> bool {
        self.answers.load(Ordering::Relaxed)
    }

    pub(crate) fn wrote(&self) -> bool {
        self.wrote.load(Ordering::Acquire)
    }

    pub(crate) fn token(&self) -> Option<Token> {
        self.token
    }

    /// The position the token's writes are known to be at or before: the token's own, else
    /// the primary's read for it (see [`Router::open`]).
    fn token_position(&self) -> Option<Lsn> {
        let token = self.token?;
        token.lsn.or_else(|| {
            let floor = self.floor.load(Ordering::Acquire);
            (floor > 0).then_some(Lsn(floor))
        })
    }

    pub(crate) fn last_read(&self) -> Option<ReadTarget> {
        match self.last_read.load(Ordering::Relaxed) {
            1 => Some(ReadTarget::Primary),
            2 => Some(ReadTarget::Replica(
                self.replica.load(Ordering::Relaxed).saturating_sub(1),
            )),
            _ => None,
        }
    }

    fn chosen(&self) -> Option<usize> {
        self.replica.load(Ordering::Acquire).checked_sub(1)
    }

    /// Keeps `index` as the request's replica unless a concurrent read chose first; returns
    /// the one in force.
    fn choose(&self, index: usize) -> usize {
        match self
            .replica
            .compare_exchange(0, index + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => index,
            Err(current) => current - 1,
        }
    }

    fn forget(&self, index: usize) {
        let _ = self
            .replica
            .compare_exchange(index + 1, 0, Ordering::AcqRel, Ordering::Relaxed);
    }

    fn note_read(&self, target: ReadTarget) {
        let code = match target {
            ReadTarget::Primary => 1,
            ReadTarget::Replica(_) => 2,
        };
        self.last_read.store(code, Ordering::Relaxed);
    }
}

struct Inner {
    /// The position read for each token without one, by its tag, for the token's lifetime: a
    /// token's later requests wait for that one position, not a newer one each time.
    floors: moka::sync::Cache<u64, u64>,
    /// Keys the tags' hashes (random per process).
    tag_hasher: std::collections::hash_map::RandomState,
    primary: Database,
    replicas: Option<ReplicaSet>,
    signer: TokenSigner,
    cluster: ClusterId,
    options: RywOptions,
    metrics: Metrics,
}

/// A primary and its replicas, routed per request. Cheap to clone. See the [module
/// docs](self).
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("replicas", &self.inner.replicas)
            .field("cluster", &self.inner.cluster)
            .field("options", &self.inner.options)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Router`].
#[derive(Debug)]
pub struct RouterBuilder {
    primary: Database,
    replicas: Option<ReplicaSet>,
    secret: Vec<u8>,
    options: RywOptions,
    metrics: Option<Metrics>,
}

impl RouterBuilder {
    /// Reads go to these replicas (of the primary's cluster) when the request allows it.
    pub fn replicas(mut self, replicas: ReplicaSet) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Token lifetime, fallback window and cookie.
    pub fn options(mut self, options: RywOptions) -> Self {
        self.options = options;
        self
    }

    /// Records on these instruments instead of the global meter's.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The router. Reads the primary's cluster identity (PostgreSQL); fails with
    /// [`Error::Config`] for a short secret, a TTL out of range, a bad cookie name, or replicas
    /// of another cluster.
    pub async fn build(self) -> Result<Router> {
        let signer = TokenSigner::new(&self.secret, self.options.ttl)?;
        if let Some(name) = &self.options.cookie {
            let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
            if name.is_empty() || name.len() > 64 || !name.chars().all(token_char) {
                return Err(Error::Config(format!(
                    "invalid read-your-writes cookie name {name:?}: 1 to 64 letters, digits or !#$%&'*+-.^_`|~"
                )));
            }
        }
        let cluster = match (&self.replicas, self.primary.backend()) {
            (Some(set), _) => {
                let primary = super::cluster_id(&self.primary).await?;
                if primary != set.cluster() {
                    return Err(Error::Config(
                        "the replica set belongs to another primary than the router's".into(),
                    ));
                }
                primary
            }
            (None, Backend::Postgres | Backend::MySql) => super::cluster_id(&self.primary).await?,
            // No WAL positions: tokens carry none and only need to be this application's.
            (None, Backend::Sqlite) => ClusterId {
                system_identifier: 0,
                timeline: 0,
            },
        };
        Ok(Router {
            inner: Arc::new(Inner {
                floors: moka::sync::Cache::builder()
                    .max_capacity(100_000)
                    .time_to_live(self.options.ttl)
                    .build(),
                tag_hasher: std::collections::hash_map::RandomState::new(),
                primary: self.primary,
                replicas: self.replicas,
                signer,
                cluster,
                options: self.options,
                metrics: self.metrics.unwrap_or_else(Metrics::global),
            }),
        })
    }
}

/// Whether a failed replica read is worth retrying elsewhere, and what it says of the replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReplicaFailure {
    /// A hot-standby conflict: the replica is fine, this query lost to replay.
    Conflict,
    /// The connection or the server is gone.
    Down,
    /// The replica has not replayed the schema the read needs yet (a table or column the
    /// primary has: SQLSTATE 42P01 / 42703), as right after a migration's DDL.
    Behind,
}

impl ReplicaFailure {
    pub(crate) fn of(err: &sqlx::Error) -> Option<ReplicaFailure> {
        match err {
            sqlx::Error::Database(db) => {
                let code = db.code()?;
                if code == "40001" {
                    Some(ReplicaFailure::Conflict)
                } else if code == "42P01" || code == "42703" {
                    Some(ReplicaFailure::Behind)
                } else if code.starts_with("08") || code.starts_with("57P") {
                    // connection exceptions; admin/crash shutdown, cannot connect now
                    Some(ReplicaFailure::Down)
                } else {
                    None
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Some(ReplicaFailure::Down),
            _ => None,
        }
    }

    pub(crate) fn of_error(err: &Error) -> Option<ReplicaFailure> {
        match err {
            Error::Repository { source, .. } => ReplicaFailure::of(source),
            Error::Database(source) | Error::Unreachable(source) => ReplicaFailure::of(source),
            _ => None,
        }
    }
}

impl Router {
    /// A router over `primary`, signing tokens with `secret` (at least 16 bytes; the same on
    /// every instance that must honour another's tokens).
    pub fn builder(primary: Database, secret: impl Into<Vec<u8>>) -> RouterBuilder {
        RouterBuilder {
            primary,
            replicas: None,
            secret: secret.into(),
            options: RywOptions::default(),
            metrics: None,
        }
    }

    /// The primary.
    pub fn primary(&self) -> &Database {
        &self.inner.primary
    }

    /// The replicas, if any.
    pub fn replicas(&self) -> Option<&ReplicaSet> {
        self.inner.replicas.as_ref()
    }

    /// The cluster tokens are issued for.
    pub fn cluster(&self) -> ClusterId {
        self.inner.cluster
    }

    /// The token options.
    pub fn options(&self) -> &RywOptions {
        &self.inner.options
    }

    /// Whether this router's tokens carry the primary's position (see [`TokenPositions`]):
    /// PostgreSQL or MariaDB, and replicas here or [`TokenPositions::Always`].
    pub(crate) fn issues_positions(&self) -> bool {
        self.inner.primary.backend() != Backend::Sqlite
            && (self.inner.options.positions == TokenPositions::Always
                || self
                    .inner
                    .replicas
                    .as_ref()
                    .is_some_and(|set| !set.is_empty()))
    }

    /// The database behind `target`.
    pub fn database(&self, target: ReadTarget) -> &Database {
        match (target, &self.inner.replicas) {
            (ReadTarget::Replica(i), Some(set)) if i < set.len() => set.replica(i),
            _ => &self.inner.primary,
        }
    }

    /// Where a read in `ctx` goes now (see the [module docs](self)), skipping the replicas
    /// whose bit is set in `excluded`. `primary_only` is the migration's rule.
    pub fn route(&self, ctx: Option<&RequestContext>, primary_only: bool, excluded: u64) -> Route {
        if primary_only {
            return Route::primary(PinReason::MigrationRule);
        }
        let Some(set) = self.inner.replicas.as_ref().filter(|s| !s.is_empty()) else {
            return Route::primary(PinReason::NoReplicas);
        };
        let ryw = ctx.and_then(RequestContext::ryw_state);
        let mut min_lsn: Option<Lsn> = None;
        if let Some(ryw) = ryw {
            if ryw.wrote() {
                return Route::primary(PinReason::WroteInRequest);
            }
            if ryw.token().is_some() {
                match ryw.token_position() {
                    Some(lsn) => min_lsn = Some(lsn),
                    // Without a position, the primary until one is read (see `open`).
                    None => return Route::primary(PinReason::Token),
                }
            }
            if let Some(index) = ryw.chosen()
                && !excluded_bit(excluded, index)
                && set.usable(index, min_lsn)
            {
                return Route {
                    target: ReadTarget::Replica(index),
                    pin: None,
                };
            }
        }
        match set.choose(min_lsn, excluded) {
            Ok(index) => {
                let index = match ryw {
                    Some(ryw) => {
                        if let Some(old) = ryw.chosen() {
                            ryw.forget(old);
                        }
                        ryw.choose(index)
                    }
                    None => index,
                };
                Route {
                    target: ReadTarget::Replica(index),
                    pin: None,
                }
            }
            Err(NoReplica::NotReplayed) => Route::primary(PinReason::Token),
            Err(NoReplica::Lagging) => Route::primary(PinReason::ReplicaLagging),
            Err(NoReplica::Down) => Route::primary(PinReason::ReplicaDown),
        }
    }

    /// Routes a read and opens its connection, counted in `twintrack.reads` and remembered as
    /// the request's latest read target. `excluded` and `last_failure` come from earlier
    /// attempts of the same read.
    ///
    /// When the request's token is ahead of every replica's last polled position but a replica
    /// should have replayed it by now (the token's age exceeds the replica's lag), the replica
    /// is asked directly, on the connection that will serve the read: proven, it serves; not
    /// yet, the primary does. This keeps reads on replicas without waiting for the next poll.
    pub(crate) async fn open<DB: Native>(
        &self,
        ctx: Option<&RequestContext>,
        primary_only: bool,
        excluded: u64,
        last_failure: Option<ReplicaFailure>,
    ) -> (Route, std::result::Result<PoolConnection<DB>, sqlx::Error>) {
        let mut route = self.route(ctx, primary_only, excluded);
        if route.pin == Some(PinReason::Token) && self.read_floor(ctx).await {
            route = self.route(ctx, primary_only, excluded);
        }
        if excluded != 0 && route.target == ReadTarget::Primary {
            route.pin = Some(pin_after(last_failure));
        }
        if route.pin == Some(PinReason::Token)
            && let Some((index, conn)) = self.prove(ctx, excluded).await
        {
            let route = Route {
                target: ReadTarget::Replica(index),
                pin: None,
            };
            self.note(ctx, route);
            return (route, Ok(conn));
        }
        let conn = match DB::typed(self.database(route.target)) {
            Some(pool) => crate::db::acquire(pool).await,
            None => Err(wrong_backend::<DB>()),
        };
        if conn.is_ok() {
            self.note(ctx, route);
        }
        (route, conn)
    }

    /// For a token without a position (issued where no position was read: an instance without
    /// replicas, SQLite's time window, a read that timed out), past the fallback window: reads
    /// the primary's position now, which is at or after the token's writes (they committed
    /// before the token was issued, so before this request came), and keeps it for the rest of
    /// the request and, by the token's tag, for the token's later requests (so that a replica
    /// catches up with it rather than with a newer position each time). No clocks are compared for freshness: within the window the primary serves
    /// without a read, after it a replica does once it has replayed that position. Returns
    /// whether a position was read.
    async fn read_floor(&self, ctx: Option<&RequestContext>) -> bool {
        let Some(ryw) = ctx.and_then(RequestContext::ryw_state) else {
            return false;
        };
        let Some(token) = ryw.token() else {
            return false;
        };
        if token.lsn.is_some() || ryw.token_position().is_some() {
            return false;
        }
        let window = self
            .inner
            .options
            .fallback_window
            .min(self.inner.options.ttl);
        let until = token
            .issued_at_ms
            .saturating_add(u64::try_from(window.as_millis()).unwrap_or(u64::MAX));
        if now_ms() < until || self.inner.primary.backend() == Backend::Sqlite {
            return false;
        }
        if let Some(lsn) = self.inner.floors.get(&ryw.tag).filter(|_| ryw.tag != 0) {
            ryw.floor.fetch_max(lsn, Ordering::AcqRel);
            return true;
        }
        let read = super::position::primary(
            &self.inner.primary,
            self.inner.cluster,
            super::position::Mark::Token,
        );
        match tokio::time::timeout(self.inner.options.lsn_timeout, read).await {
            Ok(Ok(lsn)) => {
                ryw.floor.fetch_max(lsn.0, Ordering::AcqRel);
                if ryw.tag != 0 {
                    self.inner.floors.insert(ryw.tag, lsn.0);
                }
                true
            }
            // The primary serves, as without a position.
            _ => false,
        }
    }

    /// Asks a replica that should have replayed the request's token by now whether it has.
    async fn prove<DB: Native>(
        &self,
        ctx: Option<&RequestContext>,
        excluded: u64,
    ) -> Option<(usize, PoolConnection<DB>)> {
        let set = self.inner.replicas.as_ref()?;
        let ryw = ctx?.ryw_state()?;
        let token = ryw.token()?;
        let min = ryw.token_position()?;
        let (index, lag) = set.candidate(excluded, ryw.chosen())?;
        let due = token
            .issued_at_ms
            .saturating_add(u64::try_from(lag.as_millis()).unwrap_or(u64::MAX));
        if now_ms() < due {
            return None; // not worth a round trip yet
        }
        let check = async {
            let pool = DB::typed(set.replica(index)).ok_or_else(wrong_backend::<DB>)?;
            let mut conn = crate::db::acquire(pool).await?;
            let replayed = super::position::replayed(DB::conn(&mut conn), set.cluster()).await?;
            Ok::<_, Error>((conn, replayed))
        };
        let (conn, replayed) = tokio::time::timeout(set.poll_timeout(), check)
            .await
            .ok()?
            .ok()?;
        let replayed: Lsn = replayed?;
        set.observe_replay(index, replayed);
        if replayed < min {
            return None;
        }
        if let Some(old) = ryw.chosen()
            && old != index
        {
            ryw.forget(old);
        }
        Some((ryw.choose(index), conn)).filter(|(chosen, _)| *chosen == index)
    }

    fn note(&self, ctx: Option<&RequestContext>, route: Route) {
        if let Some(ryw) = ctx.and_then(RequestContext::ryw_state) {
            ryw.note_read(route.target);
        }
        let pin = route.pin.map_or("none", PinReason::as_str);
        self.inner.metrics.get().reads.add(
            1,
            &[
                KeyValue::new("target", route.target.as_str()),
                KeyValue::new("pin", pin),
            ],
        );
    }

    /// Records that a read on replica `index` failed as `failure`: a dead replica is taken out;
    /// either way the request stops using it. Returns the bit to exclude it by.
    pub(crate) fn replica_failed(
        &self,
        ctx: Option<&RequestContext>,
        index: usize,
        failure: ReplicaFailure,
        err: &dyn std::fmt::Display,
    ) -> u64 {
        if failure == ReplicaFailure::Down
            && let Some(set) = &self.inner.replicas
        {
            set.mark_down(index, format!("read failed: {err}"));
        }
        if let Some(ryw) = ctx.and_then(RequestContext::ryw_state) {
            ryw.forget(index);
        }
        tracing::debug!(replica = index, ?failure, error = %err, "replica read failed; retrying elsewhere");
        if index < 64 { 1 << index } else { 0 }
    }

    /// Runs the read `op` where the current request's state says (see the [module
    /// docs](self)), retrying on another replica and then on the primary after a hot-standby
    /// conflict or a dead replica.
    ///
    /// `op` gets the native connection (`&mut PgConnection`, `&mut SqliteConnection`) of the
    /// router's database; an [`Error::Config`] if the router's database is of another backend.
    pub async fn read<C, T, F>(&self, op: F) -> Result<T>
    where
        C: sqlx::Connection,
        C::Database: Native<Connection = C>,
        F: for<'c> Fn(&'c mut C) -> BoxFuture<'c, sqlx::Result<T>>,
    {
        if DB::<C>::typed(&self.inner.primary).is_none() {
            return Err(wrong_backend::<C::Database>().into());
        }
        let ctx = RequestContext::current();
        let op = &op;
        self.run_read::<C::Database, _, _, _>(ctx.as_ref(), false, |mut conn, _| async move {
            op(&mut conn).await.map_err(Error::from_sqlx)
        })
        .await
    }

    /// The retry loop of every routed read: opens a connection where [`Router::route`] says,
    /// runs `attempt` on it (told the target), and when the attempt fails on a replica the way
    /// a replica fails ([`ReplicaFailure`]), tries the next replica, then the primary.
    pub(crate) async fn run_read<DB: Native, T, A, Fut>(
        &self,
        ctx: Option<&RequestContext>,
        primary_only: bool,
        mut attempt: A,
    ) -> Result<T>
    where
        A: FnMut(PoolConnection<DB>, ReadTarget) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut excluded = 0u64;
        let mut last_failure = None;
        loop {
            let (route, conn) = self
                .open::<DB>(ctx, primary_only, excluded, last_failure)
                .await;
            let result = match conn {
                Ok(conn) => attempt(conn, route.target).await,
                Err(err) => Err(Error::from_sqlx(err)),
            };
            if let (ReadTarget::Replica(index), Err(err)) = (route.target, &result)
                && let Some(failure) = ReplicaFailure::of_error(err)
            {
                excluded |= self.replica_failed(ctx, index, failure, err);
                last_failure = Some(failure);
                continue;
            }
            return result;
        }
    }

    /// A transaction on the primary, for a write; marks the current request as having written
    /// (its later reads go to the primary and its response carries a token).
    ///
    /// `DB` is the router's backend (`sqlx::Postgres`, `sqlx::Sqlite`); another is an
    /// [`Error::Config`].
    pub async fn begin<DB: Native>(&self) -> Result<Transaction<'static, DB>> {
        let pool =
            DB::typed(&self.inner.primary).ok_or_else(|| Error::from(wrong_backend::<DB>()))?;
        note_write();
        Ok(crate::db::begin(pool).await?)
    }

    /// The token for an incoming request's headers: the `x-twintrack-ryw` header, else the
    /// configured cookie. Every verdict is counted; only a valid token is returned.
    pub fn accept(&self, headers: &HeaderMap) -> Option<Token> {
        self.accept_tagged(headers).map(|(token, _)| token)
    }

    /// [`Router::accept`], with the token's tag: a hash of its signed text, which names this
    /// one token (0 never).
    pub(crate) fn accept_tagged(&self, headers: &HeaderMap) -> Option<(Token, u64)> {
        let value = headers
            .get(HEADER_NAME)
            .map(HeaderValue::as_bytes)
            .or_else(|| self.cookie_value(headers));
        let verdict = match value {
            None => Err("missing"),
            Some(bytes) => match std::str::from_utf8(bytes) {
                Err(_) => Err(Rejection::Garbled.as_str()),
                Ok(text) => self
                    .inner
                    .signer
                    .verify(text, self.inner.cluster, now_ms())
                    .map_err(Rejection::as_str),
            },
        };
        self.count_token(match verdict {
            Ok(_) => "accepted",
            Err(why) => why,
        });
        let token = verdict.ok()?;
        let tag = std::hash::BuildHasher::hash_one(&self.inner.tag_hasher, value?).max(1);
        Some((token, tag))
    }

    fn cookie_value<'h>(&self, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        crate::layer::cookie(headers, self.inner.options.cookie.as_deref()?)
    }

    fn count_token(&self, verdict: &'static str) {
        self.inner
            .metrics
            .get()
            .ryw_tokens
            .add(1, &[KeyValue::new("verdict", verdict)]);
    }

    /// A token for a request that wrote: the primary's WAL position now (after the request's
    /// commits; when this router issues positions, see [`TokenPositions`]), this cluster, now.
    /// Without a position (SQLite, no replicas, or the primary did not answer in time) the
    /// token pins for the fallback window instead.
    pub async fn issue(&self) -> String {
        self.issue_at(None).await
    }

    /// [`Router::issue`] for a request: no read when its writes' commits told their position.
    pub(crate) async fn issue_for(&self, request: &RequestRyw) -> String {
        self.issue_at(request.known_position()).await
    }

    /// The primary's position for a token (at or after every commit before the call), read on
    /// `conn`, a connection to the primary: after a commit on it, no other connection is
    /// needed. `None` on SQLite (no positions: tokens pin for a time window).
    pub(crate) async fn position_on(&self, conn: crate::db::Conn<'_>) -> Result<Option<Lsn>> {
        if self.inner.primary.backend() == Backend::Sqlite {
            return Ok(None);
        }
        let read = super::position::primary_on(
            self.inner.primary.backend(),
            conn.into(),
            self.inner.cluster,
            super::position::Mark::Token,
        );
        tokio::time::timeout(self.inner.options.lsn_timeout, read)
            .await
            .map_err(|_| Error::Internal("reading the position timed out".into()))?
            .map(Some)
    }

    async fn issue_at(&self, known: Option<Lsn>) -> String {
        let lsn = match self.inner.primary.backend() {
            _ if known.is_some() => known,
            _ if !self.issues_positions() => None,
            Backend::Postgres | Backend::MySql => {
                let lsn = super::position::primary(
                    &self.inner.primary,
                    self.inner.cluster,
                    super::position::Mark::Token,
                );
                match tokio::time::timeout(self.inner.options.lsn_timeout, lsn).await {
                    Ok(Ok(lsn)) => Some(lsn),
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "could not read the WAL position; token falls back to the time window");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(
                            "reading the WAL position timed out; token falls back to the time window"
                        );
                        None
                    }
                }
            }
            Backend::Sqlite => None,
        };
        self.count_token("issued");
        self.inner.signer.sign(&Token {
            lsn,
            cluster: self.inner.cluster,
            issued_at_ms: now_ms(),
        })
    }

    /// The `Set-Cookie` value carrying `token`, when a cookie is configured.
    pub fn set_cookie(&self, token: &str) -> Option<String> {
        let name = self.inner.options.cookie.as_deref()?;
        Some(format!(
            "{name}={token}; Max-Age={}; Path=/; HttpOnly; SameSite=Lax",
            self.inner.options.ttl.as_secs().max(1)
        ))
    }
}

/// Marks the current request (if any) as having written: its later reads go to the primary and
/// its response carries a read-your-writes token. The dual store and [`Router::begin`] call it;
/// call it after writing to the primary any other way.
pub fn note_write() {
    if let Some(ctx) = RequestContext::current() {
        ctx.note_write();
    }
}

/// The connection type of a native database.
type DB<C> = <C as sqlx::Connection>::Database;

/// The error for a typed read or transaction on a router of another backend.
fn wrong_backend<DB: Native>() -> sqlx::Error {
    sqlx::Error::Configuration(
        format!(
            "the router's database is not {}: use the connection type of its backend",
            DB::BACKEND.as_str()
        )
        .into(),
    )
}

fn pin_after(failure: Option<ReplicaFailure>) -> PinReason {
    match failure {
        Some(ReplicaFailure::Conflict) => PinReason::ReplicaConflict,
        Some(ReplicaFailure::Behind) => PinReason::ReplicaLagging,
        _ => PinReason::ReplicaDown,
    }
}

fn excluded_bit(excluded: u64, index: usize) -> bool {
    index < 64 && excluded & (1 << index) != 0
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
