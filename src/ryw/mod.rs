//! Read-your-writes: after a request writes, the reads that must see it go to the primary, or
//! to a replica proven to have replayed the write.
//!
//! This module holds the signed token that carries a write's WAL position from one request to
//! the next ([`TokenSigner`]) and the replica health poller that knows which replica has
//! replayed how far ([`ReplicaSet`]). Routing requests by them is work in progress (issue 4).

mod replicas;
mod token;

pub use replicas::{ReplicaHealth, ReplicaOptions, ReplicaSet, cluster_id};
pub use token::{ClusterId, HEADER, Lsn, MAX_LEN, Rejection, Token, TokenSigner};
