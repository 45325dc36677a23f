//! The twintrack quickstart: a small user service in the middle of moving a JSON column into a
//! table, the canonical expand/contract migration.
//!
//! - Legacy shape: `users(id, email, profile)`, `profile` a JSON object
//!   `{"theme": text, "notifications_enabled": bool}`.
//! - New shape: `user_settings(user_id, theme, notifications_enabled)`.
//!
//! Run it with `cargo run --example quickstart`, then flip the migration's stage with the CLI
//! while it runs (see the README). Environment:
//!
//! - `DATABASE_URL`: default `sqlite://twintrack-quickstart.db?mode=rwc`; a `postgres://` URL
//!   works the same (and flag flips then arrive by `NOTIFY` instead of the 1 s refresh).
//! - `TWINTRACK_LISTEN`: default `127.0.0.1:8080`.
//! - `TWINTRACK_DEBUG_HEADERS=1`: every response carries `x-twintrack-stage`, the stage pinned
//!   for the request.
//!
//! Routes: `POST /users`, `GET /users/{id}/settings`, `PUT /users/{id}/settings`,
//! `DELETE /users/{id}`. The settings go through a twintrack dual store (`repos.rs`): written to
//! the shapes the pinned stage names, read from the one it serves, compared in `shadow`/`live`.

use std::sync::Arc;

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
use twintrack::config::Config;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore};
use twintrack::{Database, RequestContext, TwinTrack, TwinTrackLayer};

mod repos;
use repos::{Settings, SettingsResync, UserError, Users};

const MIGRATION: &str = "user_settings";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .init();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "sqlite://twintrack-quickstart.db?mode=rwc".into());
    let listen = std::env::var("TWINTRACK_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let debug_headers = std::env::var("TWINTRACK_DEBUG_HEADERS").as_deref() == Ok("1");

    let db = Database::connect(&url).await?;
    repos::create_shapes(&db).await?;

    // twintrack's own tables, and the migration from the same file the CLI reads.
    let config = Config::parse(include_str!("../quickstart.toml"))?;
    let store = Arc::new(SqlFlagStore::open(db.clone()).await?);
    let mut flags = FlagCache::builder(store.clone());
    for m in &config.migrations {
        store.register(&m.name, "quickstart").await?;
        flags = flags.migration(&m.name, m.fallback_stage);
    }
    let flags = flags.build().await;

    let (legacy, new) = repos::repos(db.backend());
    let settings =
        DualStore::builder(MIGRATION, legacy, new, db, flags.clone(), SettingsResync).build()?;
    let app = app(Users { settings }, flags, debug_headers);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    // Tests and scripts read this line to find the port (TWINTRACK_LISTEN may say port 0).
    println!(
        "twintrack quickstart listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(
        listener,
        axum::ServiceExt::<Request>::into_make_service(app),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}

/// The routes, wrapped by the twintrack layer. The layer goes around the whole router (not
/// `Router::layer`, which axum re-clones per route and request) to keep its cost minimal.
fn app(users: Users, flags: FlagCache, debug_headers: bool) -> TwinTrack<Router> {
    let mut app = Router::new()
        .route("/users", post(create_user))
        .route("/users/{id}/settings", get(get_settings).put(put_settings))
        .route("/users/{id}", axum::routing::delete(delete_user))
        .with_state(users);
    if debug_headers {
        app = app.layer(middleware::from_fn(debug_stage_header));
    }
    TwinTrackLayer::new(flags).layer(app)
}

/// Adds `x-twintrack-stage`: the stage pinned for this request.
async fn debug_stage_header(req: Request, next: Next) -> Response {
    let stage = req
        .extensions()
        .get::<RequestContext>()
        .and_then(|ctx| ctx.stage(MIGRATION));
    let mut res = next.run(req).await;
    if let Some(stage) = stage {
        res.headers_mut().insert(
            "x-twintrack-stage",
            HeaderValue::from_static(stage.as_str()),
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

async fn create_user(State(users): State<Users>, body: Bytes) -> Result<Response, ApiError> {
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

async fn get_settings(
    State(users): State<Users>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    Ok(axum::Json(users.settings(id).await?).into_response())
}

async fn put_settings(
    State(users): State<Users>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let settings: Settings = parse_json(&body)?;
    check_theme(&settings.theme)?;
    users.update(id, settings.clone()).await?;
    Ok(axum::Json(settings).into_response())
}

async fn delete_user(
    State(users): State<Users>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    users.delete(id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn parse_id(id: &str) -> Result<i64, ApiError> {
    id.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::bad_request(format!("user id must be a positive integer, got {id:?}"))
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
