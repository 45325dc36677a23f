use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use crate::RequestContext;
use crate::flags::BoxFuture;
use crate::ryw::{HEADER, RequestRyw, Router};

pin_project! {
    /// Response future of [`TwinTrack`](super::TwinTrack): the inner future, run with the
    /// request's context as the task-local [`RequestContext::current`]; then, when the request
    /// wrote, the read-your-writes token is read and added to the response.
    pub struct ResponseFuture<F: Future> {
        #[pin]
        inner: TaskLocalFuture<RequestContext, F>,
        ryw: Option<(Router, Arc<RequestRyw>)>,
        output: Option<F::Output>,
        token: Option<BoxFuture<'static, String>>,
    }
}

impl<F: Future> ResponseFuture<F> {
    pub(crate) fn new(
        inner: TaskLocalFuture<RequestContext, F>,
        ryw: Option<(Router, Arc<RequestRyw>)>,
    ) -> Self {
        ResponseFuture {
            inner,
            ryw,
            output: None,
            token: None,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            if let Some(token) = this.token.as_mut() {
                let token = ready!(token.as_mut().poll(cx));
                *this.token = None;
                let mut output = this
                    .output
                    .take()
                    .expect("the response is kept while the token is read");
                if let (Ok(response), Some((router, _))) = (&mut output, this.ryw.as_ref()) {
                    add_token(response, router, &token);
                }
                return Poll::Ready(output);
            }
            let output = ready!(this.inner.as_mut().poll(cx));
            match this.ryw.as_ref() {
                // Also after a handler error: whatever it committed must be readable next.
                Some((router, state)) if state.wrote() && output.is_ok() => {
                    let router = router.clone();
                    *this.output = Some(output);
                    *this.token = Some(Box::pin(async move { router.issue().await }));
                }
                _ => return Poll::Ready(output),
            }
        }
    }
}

fn add_token<B>(response: &mut Response<B>, router: &Router, token: &str) {
    let headers = response.headers_mut();
    // Tokens are ASCII by construction.
    if let Ok(value) = HeaderValue::from_str(token) {
        headers.insert(HEADER, value);
    }
    if let Some(cookie) = router.set_cookie(token)
        && let Ok(value) = HeaderValue::from_str(&cookie)
    {
        headers.append(http::header::SET_COOKIE, value);
    }
}
