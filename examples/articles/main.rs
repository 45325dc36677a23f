//! A PostgreSQL service written the way an experienced sqlx user writes one, in the middle of
//! a twintrack migration: `article.tag_list text[]` moving into `article_tag(article_id, tag)`
//! rows, one legacy row to many new rows (migration `article_tags`, `examples/articles.toml`).
//!
//! The service keeps its own `PgPool` in axum state and uses typed `query_as` with `FromRow`,
//! `uuid::Uuid` keys and `timestamptz` (`store.rs`). twintrack takes that pool as it is: the
//! tags go through a dual store whose operations get a `&mut PgConnection`.
//!
//! Run it with `DATABASE_URL=postgres://… cargo run --example articles`. Environment (as the
//! quickstart's):
//!
//! - `DATABASE_URL` (required): a `postgres://` URL (`sslmode` and `sslrootcert` honoured).
//! - `REPLICA_DATABASE_URLS`: comma-separated streaming replicas; reads go to them unless the
//!   request wrote or carries a read-your-writes token they have not replayed.
//! - `TWINTRACK_LISTEN`: default `127.0.0.1:8081`.
//! - `TWINTRACK_CONFIG`: the migration's definition, default the `examples/articles.toml` built
//!   in.
//! - `TWINTRACK_FLAGS_FILE`: optional; a flagd flag-definition JSON file to take the stage from
//!   (flag key `article_tags`), held to the transition rules (as in the quickstart).
//! - `TWINTRACK_RYW_SECRET`: the key (16 bytes or more) signing read-your-writes tokens.
//! - `TWINTRACK_DEBUG_HEADERS=1`: every response carries `x-twintrack-stage` and
//!   `x-twintrack-read-from`.
//!
//! Routes: `POST /articles` `{"title","body","tags":[…]}` → 201 the article
//! `{"id","title","body","tags","created_at"}` (tags sorted, distinct); `GET /articles/{id}`;
//! `PUT /articles/{id}/tags` `{"tags":[…]}`; `DELETE /articles/{id}` → 204;
//! `GET /articles?tag=T` → `{"articles":[…]}`, newest first.

mod store;

use std::process::ExitCode;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;
use sqlx::PgPool;
use tower::Layer as _;
use twintrack::config::Config;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, OpenFeatureSource, SqlFlagStore};
use twintrack::ryw::{ReadTarget, ReplicaOptions, ReplicaSet, Router as ReadRouter};
use twintrack::{Database, RequestContext, TwinTrackLayer};
use uuid::Uuid;

use store::{ArticleError, Articles, TagSync};

const MIGRATION: &str = "article_tags";

type BoxError = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> ExitCode {
    // Logs to stderr (RUST_LOG), and OTLP export of metrics and spans when
    // OTEL_EXPORTER_OTLP_ENDPOINT is set (OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_SERVICE_NAME, …).
    let telemetry = match twintrack::telemetry::init("articles", "info,sqlx=warn", false) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("articles: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(url) = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    else {
        eprintln!(
            "articles needs DATABASE_URL: a postgres:// URL (for example postgres://postgres@127.0.0.1/articles)"
        );
        return ExitCode::from(2);
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        eprintln!("articles runs on PostgreSQL: DATABASE_URL must be a postgres:// URL");
        return ExitCode::from(2);
    }
    let result = run(&url).await;
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("articles: {e}");
            ExitCode::from(match e.downcast_ref::<twintrack::Error>() {
                Some(twintrack::Error::Unreachable(_)) => 4,
                Some(twintrack::Error::Config(_) | twintrack::Error::InvalidInput(_)) => 2,
                _ => 5,
            })
        }
    }
}

async fn run(url: &str) -> Result<(), BoxError> {
    let listen = std::env::var("TWINTRACK_LISTEN").unwrap_or_else(|_| "127.0.0.1:8081".into());
    let debug_headers = std::env::var("TWINTRACK_DEBUG_HEADERS").as_deref() == Ok("1");

    // The service's own pool, as it would have it anyway (twintrack's URL parsing gives the
    // same sslmode handling and a clear error when the server is down).
    let db = Database::connect(url).await?;
    let pool: PgPool = db.as_postgres().ok_or("not PostgreSQL")?.clone();
    store::create_shapes(&pool).await?;

    let config = match std::env::var("TWINTRACK_CONFIG") {
        Ok(path) => Config::load(std::path::Path::new(&path))?,
        Err(_) => Config::parse(include_str!("../articles.toml"))?,
    };
    let migration = config
        .migration(MIGRATION)
        .ok_or("the config defines no article_tags migration")?;
    let flag_store = Arc::new(SqlFlagStore::open(db.clone()).await?);
    flag_store.register(MIGRATION, "articles").await?;
    let mut flags = FlagCache::builder(flag_store).configured(&config);
    // As the quickstart: stages from a flagd file, held to twintrack's rules.
    if let Some(path) = std::env::var_os("TWINTRACK_FLAGS_FILE").filter(|p| !p.is_empty()) {
        let source = OpenFeatureSource::flagd_file(&path)
            .await?
            .flag_keys_from(&config);
        flags = flags.source(Arc::new(source));
    }
    let flags = flags.build().await;

    let router = read_router(&db).await?;
    let (legacy, new) = store::shapes();
    let tags = DualStore::builder(MIGRATION, legacy, new, pool.clone(), flags.clone(), TagSync)
        .router(router.clone())
        .primary_reads(migration.primary_reads)
        .definition(migration.definition(db.backend())?)
        .build()?;
    let articles = Articles {
        pool,
        tags: tags.clone(),
    };

    let mut app = axum::Router::new()
        .route("/articles", post(create).get(with_tag))
        .route("/articles/{id}", get(get_one).delete(delete))
        .route("/articles/{id}/tags", put(set_tags))
        .with_state(articles);
    if debug_headers {
        app = app.layer(middleware::from_fn(debug_headers_middleware));
    }
    let app = TwinTrackLayer::new(flags)
        .read_your_writes(router)
        .layer(app);
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!(
        "twintrack articles listening on http://{}",
        listener.local_addr()?
    );
    twintrack::shutdown::serve(
        listener,
        app,
        twintrack::shutdown::signal(),
        twintrack::shutdown::DEFAULT_GRACE,
    )
    .await?;
    // Every request has been answered: let background shadow work finish, exit 0.
    if !tags.drain(std::time::Duration::from_secs(3)).await {
        tracing::warn!("background shadow work still running at exit; it is diagnostics only");
    }
    Ok(())
}

/// The read router: the replicas in `REPLICA_DATABASE_URLS` (if any) and the token secret.
async fn read_router(db: &Database) -> Result<ReadRouter, BoxError> {
    let urls: Vec<String> = std::env::var("REPLICA_DATABASE_URLS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    let secret = match std::env::var("TWINTRACK_RYW_SECRET") {
        Ok(secret) => secret.into_bytes(),
        Err(_) => {
            tracing::warn!(
                "TWINTRACK_RYW_SECRET is not set: read-your-writes tokens are signed with a random key and only this process honours them"
            );
            Uuid::new_v4().as_bytes().repeat(2)
        }
    };
    let mut router = ReadRouter::builder(db.clone(), secret);
    if !urls.is_empty() {
        let replicas = ReplicaSet::connect(db.clone(), &urls, ReplicaOptions::default()).await?;
        router = router.replicas(replicas);
    }
    Ok(router.build().await?)
}

/// Adds `x-twintrack-stage` and `x-twintrack-read-from` (see the module docs).
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewArticle {
    title: String,
    body: String,
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTags {
    tags: Vec<String>,
}

#[derive(Deserialize)]
struct TagQuery {
    tag: Option<String>,
}

async fn create(State(articles): State<Articles>, body: Bytes) -> Result<Response, ApiError> {
    let new: NewArticle = parse_json(&body)?;
    check_text("title", &new.title, 200)?;
    check_text("body", &new.body, 100_000)?;
    check_tags(&new.tags)?;
    let article = articles.create(new.title, new.body, new.tags).await?;
    Ok((StatusCode::CREATED, axum::Json(article)).into_response())
}

async fn get_one(
    State(articles): State<Articles>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    Ok(axum::Json(articles.get(id).await?).into_response())
}

async fn set_tags(
    State(articles): State<Articles>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let new: NewTags = parse_json(&body)?;
    check_tags(&new.tags)?;
    Ok(axum::Json(articles.set_tags(id, new.tags).await?).into_response())
}

async fn delete(
    State(articles): State<Articles>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    articles.delete(id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn with_tag(
    State(articles): State<Articles>,
    query: Result<Query<TagQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Ok(Query(TagQuery { tag: Some(tag) })) = query else {
        return Err(ApiError::bad_request(
            "give the tag to list: /articles?tag=T",
        ));
    };
    check_tags(std::slice::from_ref(&tag))?;
    let found = articles.with_tag(tag).await?;
    Ok(axum::Json(json!({ "articles": found })).into_response())
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        let shown: String = id.chars().take(80).collect();
        ApiError::bad_request(format!(
            "article id must be a UUID (8-4-4-4-12 hex digits), got {shown:?}"
        ))
    })
}

fn check_text(what: &str, text: &str, max: usize) -> Result<(), ApiError> {
    if text.trim().is_empty() || text.chars().count() > max {
        return Err(ApiError::bad_request(format!(
            "{what} must be 1 to {max} characters"
        )));
    }
    Ok(())
}

fn check_tags(tags: &[String]) -> Result<(), ApiError> {
    if tags.len() > 50 {
        return Err(ApiError::bad_request("at most 50 tags"));
    }
    for tag in tags {
        if tag.trim().is_empty() || tag.chars().count() > 64 || tag.chars().any(char::is_control) {
            return Err(ApiError::bad_request(
                "each tag must be 1 to 64 printable characters",
            ));
        }
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
}

impl From<ArticleError> for ApiError {
    fn from(e: ArticleError) -> ApiError {
        match e {
            ArticleError::NotFound => ApiError(StatusCode::NOT_FOUND, "no such article".into()),
            ArticleError::Failed(e) => {
                tracing::error!(error = %e, "request failed");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
            }
        }
    }
}

impl From<twintrack::Error> for ApiError {
    fn from(e: twintrack::Error) -> ApiError {
        ArticleError::Failed(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, axum::Json(json!({ "error": self.1 }))).into_response()
    }
}
