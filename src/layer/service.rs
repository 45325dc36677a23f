use std::task::{Context, Poll};

use http::{HeaderName, Request};
use tower_service::Service;

use super::ResponseFuture;
use crate::context::{RequestContext, random_key};
use crate::flags::FlagCache;

/// Middleware that pins one flag snapshot per request. See the [module docs](super).
#[derive(Clone, Debug)]
pub struct TwinTrack<S> {
    inner: S,
    flags: FlagCache,
    key_header: Option<HeaderName>,
}

impl<S> TwinTrack<S> {
    pub(crate) fn new(inner: S, flags: FlagCache, key_header: Option<HeaderName>) -> Self {
        TwinTrack {
            inner,
            flags,
            key_header,
        }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S, B> Service<Request<B>> for TwinTrack<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let key = self
            .key_header
            .as_ref()
            .and_then(|name| req.headers().get(name))
            .map(|value| crate::flags::name_hash(value.as_bytes()))
            .unwrap_or_else(random_key);
        let ctx = RequestContext::new(self.flags.snapshot(), key);
        req.extensions_mut().insert(ctx.clone());
        // Scope the synchronous part of `call` too: some services do work before their future.
        let inner = &mut self.inner;
        let future = ctx.clone().sync_scope(|| inner.call(req));
        ResponseFuture::new(ctx.scope(future))
    }
}
