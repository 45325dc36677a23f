use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, Request, Response};
use tower_service::Service;

use super::ResponseFuture;
use crate::context::{RequestContext, random_key};
use crate::flags::{FlagCache, SnapshotReader};
use crate::ryw::{RequestRyw, Router};

/// Middleware that pins one flag snapshot per request. See the [module docs](super).
#[derive(Clone)]
pub struct TwinTrack<S> {
    inner: S,
    // Each clone of the service (servers clone one per connection) keeps its own cached Arc of
    // the snapshot, so a request costs one atomic load instead of a reference-counted load.
    snapshot: SnapshotReader,
    key_header: Option<HeaderName>,
    router: Option<Router>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for TwinTrack<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TwinTrack")
            .field("inner", &self.inner)
            .field("key_header", &self.key_header)
            .field("router", &self.router)
            .finish_non_exhaustive()
    }
}

impl<S> TwinTrack<S> {
    pub(crate) fn new(
        inner: S,
        flags: &FlagCache,
        key_header: Option<HeaderName>,
        router: Option<Router>,
    ) -> Self {
        TwinTrack {
            inner,
            snapshot: flags.snapshot_reader(),
            key_header,
            router,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B, ResBody> Service<Request<B>> for TwinTrack<S>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let snapshot = self.snapshot.load().clone();
        // The rollout key only matters while a migration is in a partial `live` rollout.
        let key = if snapshot.needs_rollout_key() {
            self.key_header
                .as_ref()
                .and_then(|name| req.headers().get(name))
                .map(|value| crate::flags::name_hash(value.as_bytes()))
                .unwrap_or_else(random_key)
        } else {
            0
        };
        let mut ctx = RequestContext::new(snapshot, key);
        let mut ryw = None;
        if let Some(router) = &self.router {
            // An incoming token is only ever a hint: a bad one is counted and ignored.
            let token = router.accept_tagged(req.headers());
            ctx = ctx.with_tagged_token(token);
            if let Some(state) = ctx.ryw_state() {
                state.will_answer();
            }
            ryw = ctx
                .ryw_arc()
                .map(|state: Arc<RequestRyw>| (router.clone(), state));
        }
        req.extensions_mut().insert(ctx.clone());
        // The task-local covers the response future, where handlers and repositories run. Code
        // in a service's synchronous `call` reads the context from the extensions instead.
        ResponseFuture::new(ctx.scope(self.inner.call(req)), ryw)
    }
}
