//! twintrack: zero-downtime, expand/contract schema changes for live services, with an instant
//! way back.
//!
//! While a table is being reshaped, the service keeps running against both shapes. Each
//! migration has a [`Stage`] (`legacy_only` → `dual_write` → `shadow` → `live` → `ramp_down` →
//! `new_only`) stored as a flag; the service reads the flag through a cache, pins it per request,
//! and routes reads and writes by it. Flipping the flag back is the rollback.
//!
//! ```no_run
//! # async fn demo() -> twintrack::Result<()> {
//! use std::sync::Arc;
//! use tower::Layer;
//! use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore};
//! use twintrack::{Database, RequestContext, Stage, TwinTrackLayer};
//!
//! let db = Database::connect("sqlite://app.db?mode=rwc").await?;
//! let store = Arc::new(SqlFlagStore::open(db).await?);
//! store.register("user_settings", "deploy").await?;
//! let flags = FlagCache::builder(store)
//!     .migration("user_settings", Stage::LegacyOnly)
//!     .build()
//!     .await;
//!
//! async fn handler() -> &'static str {
//!     match RequestContext::current().and_then(|c| c.stage("user_settings")) {
//!         Some(Stage::LegacyOnly) => "reading users.profile",
//!         _ => "reading user_settings",
//!     }
//! }
//! let router: axum::Router = axum::Router::new().route("/", axum::routing::get(handler));
//! let app = TwinTrackLayer::new(flags).layer(router);
//! # let _ = app;
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! A request flows layer → request context → (repositories) → pool:
//!
//! - [`stage`]: the six stages and each one's plan (write order, served side, shadow side,
//!   authoritative side).
//! - [`transition`]: the rules deciding which stage moves are allowed, given the evidence
//!   (backfill, verify, reverse sync). Pure; the flag store applies it.
//! - [`flags`]: the flag store (source of truth, compare-and-set, audit log, `LISTEN/NOTIFY`) and
//!   the flag cache (moka, soft TTL, last known value, fallback, one immutable snapshot).
//! - [`layer`]: the tower layer that pins one snapshot per request.
//! - [`context`]: the per-request context (extensions and task-local) that repositories read.
//! - [`dual`]: the dual store: runs one repository operation on the side(s) the stage names;
//!   atomic dual writes with repair intents, and the repair worker.
//! - [`shadow`]: shadow-read comparison (normalized values, ignore/redact, field diffs),
//!   transient/confirmed classification, and the mismatch table.
//! - [`db`]: the database handle over a native sqlx pool (PostgreSQL or SQLite), twintrack's
//!   backend-neutral statements, and identifier quoting.
//! - [`key`]: migration keys of any orderable type (integers, UUIDs, text, composites) and
//!   their canonical text.
//! - [`keyset`]: row-value range predicates over a key's columns, with bounds taken from the
//!   data (never computed).
//! - [`schema`]: twintrack's own tables, as embedded versioned migrations.
//! - [`config`]: the `twintrack.toml` file.
//! - [`metrics`]: the OpenTelemetry instruments.
//! - [`ryw`]: read-your-writes: the read router (primary or a replica, per request), the signed
//!   WAL-position token and the replica health poller.
//! - [`definition`]: a migration's definition (tables, keys, copy and projection SQL), checked
//!   against the database before use.
//! - [`backfill`]: resumable, throttled, parallel keyset copies with chunk leases.
//! - [`verify`]: segment hashes, bisection to rows, re-checks, repair.
//! - [`control`]: the control plane: gRPC API, admin page, `/metrics`, bearer-token auth.
//! - [`cli`]: the `twintrack` command (the binary in `src/bin` only calls it).
//! - [`error`]: the crate's error type.
//!
//! # Invariants
//!
//! - A request sees one snapshot of every migration's stage from start to end.
//! - A stage changes only through [`flags::FlagStore::set_stage`]: under a row lock, by the
//!   transition rules, compare-and-set on the version, with an audit entry in the same
//!   transaction. `force` overrides a refusal and is audited with the refusal it overrode.
//! - A flag value that cannot be loaded or parsed never replaces a good one.

#![deny(missing_docs, unsafe_code)]
#![warn(unreachable_pub)]

pub mod across;
pub mod backfill;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod context;
#[cfg(feature = "control")]
pub mod control;
pub mod db;
pub mod definition;
pub mod dual;
pub mod error;
pub mod flags;
pub mod key;
pub mod keyset;
pub mod layer;
pub mod metrics;
mod retry;
pub mod ryw;
pub mod schema;
pub mod shadow;
pub mod shutdown;
pub mod stage;
pub mod stats;
#[cfg(feature = "otlp")]
pub mod telemetry;
pub mod transition;
mod util;
pub mod verify;

pub use context::RequestContext;
pub use db::{Backend, Database, Native};
pub use error::{Error, Result};
pub use key::{DynKey, Key, KeyKind};
pub use layer::{TwinTrack, TwinTrackLayer};
pub use stage::{Side, Stage, StagePlan};
