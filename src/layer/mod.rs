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
//! use twintrack::{RequestContext, TwinTrackLayer};
//!
//! async fn handler() -> String {
//!     let ctx = RequestContext::current().expect("inside TwinTrackLayer");
//!     format!("{:?}", ctx.stage("user_settings"))
//! }
//!
//! let app: Router = Router::new()
//!     .route("/", get(handler))
//!     .layer(TwinTrackLayer::new(flags).request_key_header(HeaderName::from_static("x-user-id")));
//! # }
//! ```
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
pub use layer::TwinTrackLayer;
pub use service::TwinTrack;
