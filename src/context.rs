//! The request context: the flag snapshot pinned for one request.
//!
//! [`TwinTrackLayer`](crate::TwinTrackLayer) creates one [`RequestContext`] when a request
//! starts and makes it reachable two ways:
//!
//! - in the request's extensions (`req.extensions().get::<RequestContext>()`, or axum's
//!   `Extension<RequestContext>` extractor), to pass explicitly to repository code;
//! - as a Tokio task-local for the whole request future, so repository code deep in a call
//!   stack can call [`RequestContext::current`] without threading an argument through.
//!
//! A task-local does not cross `tokio::spawn`. Work spawned from a request that must see the
//! request's stages re-scopes the context explicitly:
//!
//! ```no_run
//! # async fn handler() {
//! use twintrack::RequestContext;
//!
//! let ctx = RequestContext::current().expect("inside a request wrapped by TwinTrackLayer");
//! tokio::spawn(ctx.clone().scope(async {
//!     // Same pinned stages here, even if a flag flips meanwhile.
//!     let stage = RequestContext::current().unwrap().stage("user_settings");
//! }));
//! # }
//! ```
//!
//! Work that is not part of a request (a job, a consumer loop) takes a fresh context from the
//! cache with [`RequestContext::from_cache`] for each unit of work.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::task::futures::TaskLocalFuture;

use crate::Stage;
use crate::flags::{FlagCache, MigrationFlag, Snapshot};
use crate::ryw::{ReadTarget, RequestRyw, Token};

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// The flag state pinned for one request, and its read-your-writes state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RequestContext {
    snapshot: Arc<Snapshot>,
    rollout_key: u64,
    ryw: Option<Arc<RequestRyw>>,
}

impl RequestContext {
    /// A context over `snapshot`. `rollout_key` places the request in the read rollout of a
    /// `live` migration (the layer hashes the configured request-key header into it).
    pub fn new(snapshot: Arc<Snapshot>, rollout_key: u64) -> RequestContext {
        RequestContext {
            snapshot,
            rollout_key,
            ryw: None,
        }
    }

    /// This context with read-your-writes state: writes made under it pin its later reads to
    /// the primary, and reads honour `token` (an incoming request's verified token). The layer
    /// does this when it has a [`Router`](crate::ryw::Router).
    pub fn with_read_your_writes(mut self, token: Option<Token>) -> RequestContext {
        self.ryw = Some(Arc::new(RequestRyw::new(token)));
        self
    }

    /// [`RequestContext::with_read_your_writes`] for a token the router knows by `tag`.
    pub(crate) fn with_tagged_token(mut self, token: Option<(Token, u64)>) -> RequestContext {
        let (token, tag) = token.map_or((None, 0), |(token, tag)| (Some(token), tag));
        self.ryw = Some(Arc::new(RequestRyw::tagged(token, tag)));
        self
    }

    /// A context for work outside any request (a job, one message of a consumer): the cache's
    /// current snapshot, a random rollout key, and read-your-writes state of its own.
    pub fn from_cache(flags: &FlagCache) -> RequestContext {
        RequestContext::new(flags.snapshot(), random_key()).with_read_your_writes(None)
    }

    pub(crate) fn ryw_arc(&self) -> Option<Arc<RequestRyw>> {
        self.ryw.clone()
    }

    pub(crate) fn ryw_state(&self) -> Option<&RequestRyw> {
        self.ryw.as_deref()
    }

    /// Marks this request as having written: its later reads go to the primary and its
    /// response carries a read-your-writes token. The dual store and
    /// [`Router::begin`](crate::ryw::Router::begin) do this for you.
    pub fn note_write(&self) {
        if let Some(ryw) = &self.ryw {
            ryw.note_write();
        }
    }

    /// A write noted with [`RequestContext::note_write`] committed at `lsn` (read in its
    /// commit's round trip).
    pub(crate) fn committed_at(&self, lsn: crate::ryw::Lsn) {
        if let Some(ryw) = &self.ryw {
            ryw.committed_at(lsn);
        }
    }

    /// Whether the layer will answer this request with a read-your-writes token if it writes.
    pub(crate) fn answers_with_token(&self) -> bool {
        self.ryw.as_ref().is_some_and(|r| r.answers())
    }

    /// Whether this request wrote (through the dual store, the router, or
    /// [`RequestContext::note_write`]).
    pub fn wrote(&self) -> bool {
        self.ryw.as_ref().is_some_and(|r| r.wrote())
    }

    /// The verified read-your-writes token the request carried, if any.
    pub fn token(&self) -> Option<Token> {
        self.ryw.as_ref().and_then(|r| r.token())
    }

    /// Where this request's latest routed read went (`None` before its first one).
    pub fn read_from(&self) -> Option<ReadTarget> {
        self.ryw.as_ref().and_then(|r| r.last_read())
    }

    /// The context of the request being served by this task, if any.
    pub fn current() -> Option<RequestContext> {
        CURRENT.try_with(Clone::clone).ok()
    }

    /// Runs `future` with this context as [`RequestContext::current`] (for spawned work).
    pub fn scope<F: Future>(self, future: F) -> TaskLocalFuture<RequestContext, F> {
        CURRENT.scope(self, future)
    }

    /// Runs `f` with this context as [`RequestContext::current`].
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        CURRENT.sync_scope(self, f)
    }

    /// The snapshot of every registered migration taken when the request started.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The pinned flag of `migration`.
    pub fn flag(&self, migration: &str) -> Option<&MigrationFlag> {
        self.snapshot.get(migration)
    }

    /// The pinned stage of `migration`: what writes follow.
    pub fn stage(&self, migration: &str) -> Option<Stage> {
        self.snapshot.stage(migration)
    }

    /// The stage reads follow: the pinned stage, except that in `live` with a read rollout
    /// percent, a request whose key falls outside the percent reads as in `shadow`. Writes are
    /// never split (use [`RequestContext::stage`] for them).
    pub fn read_stage(&self, migration: &str) -> Option<Stage> {
        let flag = self.flag(migration)?;
        let stage = flag.stage();
        match (stage, flag.state.read_rollout_percent) {
            (Stage::Live, Some(percent)) if self.rollout_bucket(flag) >= percent => {
                Some(Stage::Shadow)
            }
            _ => Some(stage),
        }
    }

    /// The request's bucket, 0 to 99, for this migration's rollout. Mixed with the migration's
    /// name so one key is not in the first percent of every migration.
    fn rollout_bucket(&self, flag: &MigrationFlag) -> u8 {
        (splitmix64(self.rollout_key ^ flag.name_hash) % 100) as u8
    }
}

/// A well-mixed 64-bit value, different on every call (a Weyl sequence through splitmix64),
/// from a start the OS picks once per process: two processes (two containers, each pid 1)
/// never share a sequence, so their retry jitter and shadow sampling are independent.
pub(crate) fn random_key() -> u64 {
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    splitmix64(start.wrapping_add(NEXT.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)))
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
