//! Read-your-writes: after a request writes, the reads that must see it go to the primary, or
//! to a replica proven to have replayed the write.
//!
//! - [`Router`] decides where each read goes, per request, by what actually happened: the
//!   request wrote, or carried a token naming a WAL position, or the migration asks for the
//!   primary (see its module docs for the rules).
//! - [`TokenSigner`] signs the token that carries a write's WAL position from one request to
//!   the next (header `x-twintrack-ryw`, optionally a cookie); the
//!   [`TwinTrackLayer`](crate::TwinTrackLayer) verifies incoming tokens and issues one after
//!   every request that wrote.
//! - [`ReplicaSet`] polls each replica's replayed position and lag and takes out the ones
//!   that lag or fail.

mod position;
mod replicas;
mod router;
mod token;

pub use replicas::{NoReplica, OutReason, ReplicaHealth, ReplicaOptions, ReplicaSet, cluster_id};
pub use router::{
    PinReason, ReadTarget, Route, Router, RouterBuilder, RywOptions, TokenPositions, note_write,
};
pub(crate) use router::{ReplicaFailure, RequestRyw};
pub(crate) use token::HEADER_NAME;
pub use token::{ClusterId, HEADER, Lsn, MAX_LEN, Rejection, Token, TokenSigner};
