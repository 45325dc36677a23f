//! Read-your-writes: after a request writes, the reads that must see it go to the primary, or
//! to a replica proven to have replayed the write.
//!
//! This module holds the signed token that carries a write's WAL position from one request to
//! the next ([`TokenSigner`]). The replica router that uses it is work in progress (issue 4).

mod token;

pub use token::{ClusterId, HEADER, Lsn, MAX_LEN, Rejection, Token, TokenSigner};
