//! The control plane: a gRPC API (`proto/twintrack/v1/control.proto`), an admin page with
//! one-click rollback, and Prometheus `/metrics`, on one listener (`twintrack serve`).
//!
//! ```no_run
//! # async fn demo() -> twintrack::Result<()> {
//! use std::sync::Arc;
//! use twintrack::control::{AdminTokens, ControlServer};
//! use twintrack::flags::SqlFlagStore;
//!
//! let db = twintrack::Database::connect("postgres://localhost/app").await?;
//! let store = Arc::new(SqlFlagStore::open(db.clone()).await?);
//! let tokens = AdminTokens::parse("oncall=a-long-random-token-here")?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:7070").await.unwrap();
//! ControlServer::new(store, db, tokens)
//!     .serve(listener, std::future::pending())
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Every gRPC call and page needs `authorization: Bearer <token>` (the admin page signs in with
//! a form that sets an `HttpOnly` cookie instead); `/metrics` is open and read-only. Errors map
//! to gRPC codes: a refused transition is `FAILED_PRECONDITION` with the reason, a lost
//! compare-and-set `ABORTED`, an unknown migration `NOT_FOUND`, bad arguments
//! `INVALID_ARGUMENT`, no or a wrong token `UNAUTHENTICATED`.

mod admin;
mod auth;
mod charts;
mod grpc;

use std::future::Future;
use std::sync::Arc;

pub use auth::{AdminIdentity, AdminTokens, SESSION_TTL};
pub use grpc::{ControlPlane, status};

use crate::db::Database;
use crate::flags::SqlFlagStore;
use crate::{Error, Result};

/// The generated gRPC types (`twintrack.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("twintrack.v1");
}

/// gRPC, the admin page and `/metrics` on one listener.
#[derive(Debug)]
pub struct ControlServer {
    plane: ControlPlane,
    tokens: Arc<AdminTokens>,
    #[cfg(feature = "prometheus")]
    prometheus: Option<crate::metrics::PrometheusExporter>,
}

impl ControlServer {
    /// A server over `store` (its database also holds mismatches and backfill runs).
    pub fn new(store: Arc<SqlFlagStore>, db: Database, tokens: AdminTokens) -> ControlServer {
        ControlServer {
            plane: ControlPlane {
                store,
                db,
                source: None,
            },
            tokens: Arc::new(tokens),
            #[cfg(feature = "prometheus")]
            prometheus: None,
        }
    }

    /// The external flag source the service's stages follow: holds (a stage it wants that the
    /// transition rules refuse) are shown on the admin page and in `GetMigration`.
    pub fn stage_source(mut self, source: Arc<dyn crate::flags::StageSource>) -> ControlServer {
        self.plane.source = Some(source);
        self
    }

    /// Also serve `GET /metrics` from this exporter.
    #[cfg(feature = "prometheus")]
    pub fn prometheus(mut self, exporter: crate::metrics::PrometheusExporter) -> ControlServer {
        self.prometheus = Some(exporter);
        self
    }

    /// The routes: gRPC (`/twintrack.v1.ControlService/*`), `/admin`, `/login`, and `/metrics`
    /// when an exporter is set; everything but `/metrics` and `/login` behind the tokens.
    pub fn router(&self) -> axum::Router {
        let grpc = proto::control_service_server::ControlServiceServer::new(self.plane.clone())
            .max_decoding_message_size(grpc::MAX_MESSAGE);
        #[cfg_attr(not(feature = "prometheus"), allow(unused_mut))]
        let mut app = admin::router(admin::AdminState {
            plane: self.plane.clone(),
            tokens: self.tokens.clone(),
        })
        .merge(tonic::service::Routes::new(grpc).into_axum_router());
        #[cfg(feature = "prometheus")]
        if let Some(exporter) = &self.prometheus {
            app = app.merge(exporter.router());
        }
        app.layer(axum::middleware::from_fn_with_state(
            self.tokens.clone(),
            auth::require,
        ))
        .layer(axum::middleware::from_fn(traced))
    }

    /// Serves until `shutdown` completes (HTTP/1.1 for pages, HTTP/2 for gRPC).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        crate::shutdown::serve(
            listener,
            self.router(),
            shutdown,
            crate::shutdown::DEFAULT_GRACE,
        )
        .await
        .map_err(|source| Error::Io {
            what: "the control server failed".into(),
            source,
        })
    }
}

/// The methods of `twintrack.v1.ControlService` (`proto/twintrack/v1/control.proto`): span
/// names come from this list, never from whatever path a client asks for.
const RPCS: [&str; 7] = [
    "ListMigrations",
    "GetMigration",
    "SetStage",
    "Rollback",
    "WatchMigrations",
    "ListMismatches",
    "GetProgress",
];

/// Runs each control-plane call in a server span `twintrack.control` (authentication
/// included): a gRPC call named `{rpc.service}/{rpc.method}` with `rpc.system` = `grpc`
/// (OpenTelemetry's RPC conventions), a page or `/metrics` named `{http.request.method}
/// {http.route}` with the response's `http.response.status_code`. Paths twintrack does not
/// serve are named by the method alone (a route, not the path asked for: low cardinality).
async fn traced(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument as _;
    let path = request.uri().path();
    let method = request.method().clone();
    let span = match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((service, rpc))
            if service == proto::control_service_server::SERVICE_NAME && RPCS.contains(&rpc) =>
        {
            tracing::info_span!(
                "twintrack.control",
                "otel.name" = format!("{service}/{rpc}"),
                "otel.kind" = "server",
                "rpc.system" = "grpc",
                "rpc.service" = service,
                "rpc.method" = rpc,
                "http.response.status_code" = tracing::field::Empty,
            )
        }
        _ => {
            let route = [
                "/",
                "/admin",
                "/admin/stage",
                "/login",
                "/logout",
                "/metrics",
            ]
            .into_iter()
            .find(|r| path == *r);
            tracing::info_span!(
                "twintrack.control",
                "otel.name" = match route {
                    Some(route) => format!("{method} {route}"),
                    None => method.to_string(),
                },
                "otel.kind" = "server",
                "http.request.method" = %method,
                "http.route" = route.unwrap_or_default(),
                "http.response.status_code" = tracing::field::Empty,
            )
        }
    };
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}
