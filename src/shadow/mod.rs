//! Shadow reads: read both shapes, serve one, compare, and record what differs.
//!
//! In `shadow` the legacy side is served and the new side compared; in `live` the other way
//! round. A share of reads (the flag's shadow sample rate) is compared. Both sides must succeed
//! for a comparison; each side's errors are counted apart, and a failing or panicking shadow
//! side never changes what is served.
//!
//! When the two values differ, both sides are read again once after a short delay
//! ([`ShadowOptions::recheck_delay`]), off the request's path: agreeing now means a write landed
//! between the two reads (`transient`); still differing means the shapes diverge (`confirmed`).
//! Every mismatch is counted by class and stored, with its field-level diff (redacted), in a
//! capped table that `twintrack mismatches MIGRATION` prints.

mod compare;
mod record;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use compare::{Comparator, Comparison, FieldDiff, normalize};
pub use record::{
    DEFAULT_MAX_DIFF_BYTES, LIST_DIFF_BUDGET, MAX_DIFF_BYTES_RANGE, Mismatch, cap_diff,
    list_mismatches, mismatch_counts,
};
pub(crate) use record::{NewMismatch, spawn_recorder};

/// The order in which the two sides of a compared read run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowMode {
    /// The served side, then the shadow side, one after the other.
    #[default]
    Serial,
    /// Like `Serial`, in a random order each time (so neither side is always read second).
    Random,
    /// Both sides at once, on two connections: the shadow read in a task of its own (so a
    /// multi-threaded runtime drives the two on two threads), aborted if the caller drops the
    /// read. The caller waits for both.
    Concurrent,
    /// The served side only, then the response; the shadow read and the comparison run
    /// afterwards in a task of their own, off the latency path. Bounded by
    /// [`ShadowOptions::background_timeout`], [`ShadowOptions::background_limit`] and
    /// [`ShadowOptions::bookkeeping_connections`] (reads over the limits are not compared, and
    /// counted as `skipped`); never cancelled by the request ending.
    Background,
    /// Both reads in one `REPEATABLE READ` transaction (both shapes in one database), so a
    /// write landing between them cannot show up as a mismatch.
    Snapshot,
}

/// How a dual store runs shadow reads.
#[derive(Clone, Debug)]
pub struct ShadowOptions {
    /// The order of the two reads.
    pub mode: ShadowMode,
    /// How two results are compared.
    pub comparison: Comparison,
    /// How long to wait before re-reading both sides of a mismatch (default 50 ms).
    pub recheck_delay: Duration,
    /// How many mismatches to keep per migration in the mismatch table (default 1,000).
    pub keep: u32,
    /// `Background` mode: the longest a shadow read may take (default 2 s).
    pub background_timeout: Duration,
    /// `Background` mode: the most shadow read tasks in flight at once (default 64; their
    /// connections are [`ShadowOptions::bookkeeping_connections`]). Also the most
    /// mismatch re-checks waiting or running, in every mode (past it a mismatch is counted
    /// `unclassified` and not looked at again).
    pub background_limit: usize,
    /// The most pool connections shadow bookkeeping holds at once (default 2): `Background`
    /// shadow reads (one that finds none free is skipped), re-reading both sides of a mismatch,
    /// and writing recorded mismatches (one task, in batches). With
    /// every read mismatching, bookkeeping waits for these instead of taking the requests'
    /// connections; mismatches beyond what it can record (a queue of 1,024) are dropped and
    /// counted in `twintrack.shadow.mismatches_dropped`. At least 1.
    pub bookkeeping_connections: usize,
    /// The most bytes of diff stored with one mismatch (default 2 KiB, 256 B to 64 KiB): larger
    /// values are stored as their size, SHA-256 and first characters, and fields past the
    /// budget as a count ([`cap_diff`]). A listing of the largest limit (1,000) then stays
    /// around 2 MB with the default.
    pub max_diff_bytes: usize,
}

impl Default for ShadowOptions {
    fn default() -> Self {
        ShadowOptions {
            mode: ShadowMode::Serial,
            comparison: Comparison::default(),
            recheck_delay: Duration::from_millis(50),
            keep: 1000,
            background_timeout: Duration::from_secs(2),
            background_limit: 64,
            bookkeeping_connections: 2,
            max_diff_bytes: DEFAULT_MAX_DIFF_BYTES,
        }
    }
}

/// What a compared read found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchClass {
    /// The sides differed, then agreed when read again: a write raced the first reads.
    Transient,
    /// The sides differed, and still did when read again.
    Confirmed,
}

impl MismatchClass {
    /// `"transient"` or `"confirmed"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MismatchClass::Transient => "transient",
            MismatchClass::Confirmed => "confirmed",
        }
    }
}
