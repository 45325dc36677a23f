use http::HeaderName;
use tower_layer::Layer;

use super::TwinTrack;
use crate::flags::FlagCache;
use crate::ryw::Router;

/// Applies [`TwinTrack`] to a service: pins the flag snapshot per request, and with a
/// [`Router`] tracks read-your-writes per request.
#[derive(Clone, Debug)]
pub struct TwinTrackLayer {
    flags: FlagCache,
    key_header: Option<HeaderName>,
    router: Option<Router>,
}

impl TwinTrackLayer {
    /// A layer over `flags`, with no request key (rollout buckets are assigned at random).
    pub fn new(flags: FlagCache) -> TwinTrackLayer {
        TwinTrackLayer {
            flags,
            key_header: None,
            router: None,
        }
    }

    /// Hashes this header's value into the request's read rollout bucket, so the same key
    /// (a user id, a tenant) gets the same answer on every request and every instance.
    pub fn request_key_header(mut self, name: HeaderName) -> TwinTrackLayer {
        self.key_header = Some(name);
        self
    }

    /// Read-your-writes through `router`: each request's incoming token (header
    /// `x-twintrack-ryw`, or the router's cookie) is verified and counted; a request that
    /// wrote answers with a fresh token, even when its handler then failed.
    pub fn read_your_writes(mut self, router: Router) -> TwinTrackLayer {
        self.router = Some(router);
        self
    }
}

impl<S> Layer<S> for TwinTrackLayer {
    type Service = TwinTrack<S>;

    fn layer(&self, inner: S) -> TwinTrack<S> {
        TwinTrack::new(
            inner,
            &self.flags,
            self.key_header.clone(),
            self.router.clone(),
        )
    }
}
