use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use crate::RequestContext;

pin_project! {
    /// Response future of [`TwinTrack`](super::TwinTrack): the inner future, run with the
    /// request's context as the task-local [`RequestContext::current`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: TaskLocalFuture<RequestContext, F>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: TaskLocalFuture<RequestContext, F>) -> Self {
        ResponseFuture { inner }
    }
}

impl<F: Future> Future for ResponseFuture<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().inner.poll(cx)
    }
}
