use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;
use tokio::task::futures::TaskLocalFuture;

use crate::RequestContext;
use crate::flags::BoxFuture;
use crate::ryw::{HEADER_NAME, RequestRyw, Router};

pin_project! {
    /// Response future of [`TwinTrack`](super::TwinTrack): the inner future, run with the
    /// request's context as the task-local [`RequestContext::current`]; then, when the request
    /// wrote, the read-your-writes token is read and added to the response.
    pub struct ResponseFuture<F: Future> {
        #[pin]
        inner: TaskLocalFuture<RequestContext, F>,
        ryw: Option<(Router, Arc<RequestRyw>)>,
        // Boxed: only requests that wrote get here, and the others keep a small future.
        finishing: Option<Box<Finishing<F::Output>>>,
    }
}

/// The response, held while the token is read.
struct Finishing<O> {
    output: Option<O>,
    token: BoxFuture<'static, String>,
}

impl<F: Future> ResponseFuture<F> {
    pub(crate) fn new(
        inner: TaskLocalFuture<RequestContext, F>,
        ryw: Option<(Router, Arc<RequestRyw>)>,
    ) -> Self {
        ResponseFuture {
            inner,
            ryw,
            finishing: None,
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
            if let Some(finishing) = this.finishing.as_mut() {
                let token = ready!(finishing.token.as_mut().poll(cx));
                let output = finishing.output.take();
                *this.finishing = None;
                let Some(mut output) = output else {
                    // Polled again after completion: nothing left to give.
                    return Poll::Pending;
                };
                if let (Ok(response), Some((router, _))) = (&mut output, this.ryw.as_ref()) {
                    add_token(response, router, &token);
                }
                return Poll::Ready(output);
            }
            let output = ready!(this.inner.as_mut().poll(cx));
            match this.ryw.as_ref() {
                // Also after a handler error: whatever it committed must be readable next.
                Some((router, state)) if state.wrote() && output.is_ok() => {
                    let (router, state) = (router.clone(), state.clone());
                    *this.finishing = Some(Box::new(Finishing {
                        output: Some(output),
                        token: Box::pin(async move { router.issue_for(&state).await }),
                    }));
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
        headers.insert(HEADER_NAME, value);
    }
    if let Some(cookie) = router.set_cookie(token)
        && let Ok(value) = HeaderValue::from_str(&cookie)
    {
        headers.append(http::header::SET_COOKIE, value);
    }
}
