//! The tower layer that pins every migration's flag state for the whole of a request.
//!
//! [`TwinTrackLayer`] wraps any `Service<http::Request<B>>`, so it works under axum, a bare
//! hyper `service_fn` and tonic alike. For each request it takes one [`Snapshot`] of the
//! [`FlagCache`] (one atomic load), wraps it in a [`RequestContext`], puts that into the request's
//! extensions and scopes it as the task-local [`RequestContext::current`] for the request's
//! future. A flag flipped while the request runs does not change what the request sees; the
//! next request sees the flip.
//!
//! ```no_run
//! # async fn demo(flags: twintrack::flags::FlagCache) {
//! use axum::{Router, http::HeaderName, routing::get};
//! use tower::Layer;
//! use twintrack::{RequestContext, TwinTrackLayer};
//!
//! async fn handler() -> String {
//!     let ctx = RequestContext::current().expect("inside TwinTrackLayer");
//!     format!("{:?}", ctx.stage("user_settings"))
//! }
//!
//! let router: Router = Router::new().route("/", get(handler));
//! // Around the whole router: one layer per connection.
//! let app = TwinTrackLayer::new(flags)
//!     .request_key_header(HeaderName::from_static("x-user-id"))
//!     .layer(router);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await.unwrap();
//! axum::serve(listener, axum::ServiceExt::<axum::extract::Request>::into_make_service(app))
//!     .await
//!     .unwrap();
//! # }
//! ```
//!
//! `Router::layer(TwinTrackLayer::new(flags))` works too, but axum then wraps every route and
//! clones the layer's service on every request: about 1,700 more instructions per request in
//! `benches/layer.rs` (1.058× instead of 1.022× the bare per-request cost over HTTP).
//!
//! The request key (here the `x-user-id` header) decides which requests fall inside a `live`
//! migration's read rollout percent; requests without it are assigned at random.
//!
//! [`Snapshot`]: crate::flags::Snapshot
//! [`FlagCache`]: crate::flags::FlagCache
//! [`RequestContext`]: crate::RequestContext
//! [`RequestContext::current`]: crate::RequestContext::current

mod future;
#[allow(clippy::module_inception)]
mod layer;
mod service;

pub use future::ResponseFuture;

/// The value of cookie `name` among a request's `Cookie` headers.
pub(crate) fn cookie<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .find_map(|pair| pair.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
}
pub use layer::TwinTrackLayer;
pub use service::TwinTrack;
