//! The quickstart's HTTP routes, wrapped by the twintrack layer. (Also compiled into the
//! read-your-writes tests and benchmark, which drive the service in-process.)
#![allow(dead_code)]

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tower::Layer as _;
use twintrack::db::Native;
use twintrack::flags::FlagCache;
use twintrack::metrics::PrometheusExporter;
use twintrack::ryw::{ReadTarget, Router as ReadRouter};
use twintrack::{RequestContext, TwinTrack, TwinTrackLayer};

use crate::repos::{Settings, UserError, UserId, Users};

/// The migration the quickstart runs.
pub const MIGRATION: &str = "user_settings";

/// The routes, wrapped by the twintrack layer. The layer goes around the whole router (not
/// `Router::layer`, which axum re-clones per route and request) to keep its cost minimal.
///
/// With a read router, reads go to a replica unless the request wrote or carries a
/// read-your-writes token a replica has not replayed yet, and writes answer with a token.
pub fn app<DB: Native, K: UserId>(
    users: Users<DB, K>,
    flags: FlagCache,
    router: Option<ReadRouter>,
    debug_headers: bool,
    metrics: Option<&PrometheusExporter>,
) -> TwinTrack<Router> {
    let mut app = Router::new()
        .route("/users", post(create_user::<DB, K>))
        .route(
            "/users/{id}/settings",
            get(get_settings::<DB, K>).put(put_settings::<DB, K>),
        )
        .route("/users/{id}", axum::routing::delete(delete_user::<DB, K>))
        .with_state(users);
    if debug_headers {
        app = app.layer(middleware::from_fn(debug_headers_middleware));
    }
    if let Some(metrics) = metrics {
        // GET /metrics: twintrack's series (and any of the service's own), Prometheus format.
        app = app.merge(metrics.router());
    }
    let layer = TwinTrackLayer::new(flags);
    match router {
        Some(router) => layer.read_your_writes(router).layer(app),
        None => layer.layer(app),
    }
}

/// Adds `x-twintrack-stage` (the stage pinned for this request) and `x-twintrack-read-from`
/// (where its latest read went: `primary` or `replica`; `primary` when it read nothing).
async fn debug_headers_middleware(req: Request, next: Next) -> Response {
    let ctx = req.extensions().get::<RequestContext>().cloned();
    let mut res = next.run(req).await;
    if let Some(ctx) = ctx {
        if let Some(stage) = ctx.stage(MIGRATION) {
            res.headers_mut().insert(
                "x-twintrack-stage",
                HeaderValue::from_static(stage.as_str()),
            );
        }
        let from = ctx.read_from().unwrap_or(ReadTarget::Primary);
        res.headers_mut().insert(
            "x-twintrack-read-from",
            HeaderValue::from_static(from.as_str()),
        );
    }
    res
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    email: String,
    theme: String,
    notifications_enabled: bool,
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> ApiError {
        match e {
            UserError::NotFound => ApiError(StatusCode::NOT_FOUND, "no such user".into()),
            UserError::Duplicate => ApiError(
                StatusCode::CONFLICT,
                "a user with that email already exists".into(),
            ),
            UserError::Failed(e) => ApiError::internal(e),
        }
    }
}

async fn create_user<DB: Native, K: UserId>(
    State(users): State<Users<DB, K>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let user: NewUser = parse_json(&body)?;
    if user.email.trim().is_empty() || user.email.len() > 320 || !user.email.contains('@') {
        return Err(ApiError::bad_request("email must be an address like a@b.c"));
    }
    check_theme(&user.theme)?;
    let settings = Settings {
        theme: user.theme.clone(),
        notifications_enabled: user.notifications_enabled,
    };
    let id = users.create(&user.email, settings).await?;
    let body = json!({
        "id": id,
        "email": user.email,
        "theme": user.theme,
        "notifications_enabled": user.notifications_enabled,
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

async fn get_settings<DB: Native, K: UserId>(
    State(users): State<Users<DB, K>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id::<K>(&id)?;
    Ok(axum::Json(users.settings(&id).await?).into_response())
}

async fn put_settings<DB: Native, K: UserId>(
    State(users): State<Users<DB, K>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id::<K>(&id)?;
    let settings: Settings = parse_json(&body)?;
    check_theme(&settings.theme)?;
    users.update(&id, settings.clone()).await?;
    Ok(axum::Json(settings).into_response())
}

async fn delete_user<DB: Native, K: UserId>(
    State(users): State<Users<DB, K>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id::<K>(&id)?;
    users.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn parse_id<K: UserId>(id: &str) -> Result<K, ApiError> {
    K::from_path(id).ok_or_else(|| {
        let shown: String = id.chars().take(80).collect();
        ApiError::bad_request(format!("user id must be {}, got {shown:?}", K::SHAPE))
    })
}

fn check_theme(theme: &str) -> Result<(), ApiError> {
    if theme.trim().is_empty() || theme.chars().count() > 64 {
        return Err(ApiError::bad_request("theme must be 1 to 64 characters"));
    }
    Ok(())
}

/// An error answered as `{"error": message}` with its status.
#[derive(Debug)]
struct ApiError(StatusCode, String);

impl ApiError {
    fn bad_request(msg: impl Into<String>) -> ApiError {
        ApiError(StatusCode::BAD_REQUEST, msg.into())
    }

    fn internal(err: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %err, "request failed");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}
