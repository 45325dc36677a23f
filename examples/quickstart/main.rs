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
//! - `NEW_DATABASE_URL`: optional; the new shape (`user_settings`) then lives in this database
//!   of its own (same backend as `DATABASE_URL`), `users` stays in `DATABASE_URL`. Writes
//!   commit on the authoritative side with a repair intent, then reach the other database;
//!   the CLI finds it through `new_database_url_env` in `examples/quickstart.toml`.
//! - `TWINTRACK_LISTEN`: default `127.0.0.1:8080`.
//! - `REPLICA_DATABASE_URLS`: comma-separated streaming replicas of a `postgres://` primary.
//!   Reads go to them unless the request wrote, or carries a read-your-writes token that no
//!   replica has replayed yet.
//! - `TWINTRACK_RYW_SECRET`: the key (16 bytes or more) that signs read-your-writes tokens;
//!   every instance must share it. Unset: a random one per process (tokens then only work
//!   with this process, until it restarts).
//! - `TWINTRACK_FLAGS_FILE`: optional; a flagd flag-definition JSON file to take the stages
//!   from (`{"flags": {"user_settings": {"state": "ENABLED", "variants": {"on": "dual_write"},
//!   "defaultVariant": "on"}}}`), re-read by the flagd provider whenever it changes. A stage
//!   the transition rules refuse (no clean verify yet, say) is held: the last allowed stage is
//!   served, the log says why and what to run, `twintrack_flags_held` is 1 on `/metrics`.
//! - `TWINTRACK_DEBUG_HEADERS=1`: every response carries `x-twintrack-stage`, the stage pinned
//!   for the request, and `x-twintrack-read-from`, `primary` or `replica`.
//!
//! Routes: `POST /users`, `GET /users/{id}/settings`, `PUT /users/{id}/settings`,
//! `DELETE /users/{id}`, and `GET /metrics` (Prometheus). The settings go through a twintrack
//! dual store (`repos.rs`): written to the shapes the pinned stage names, read from the one it
//! serves, compared in `shadow`/`live`.

use std::sync::Arc;

use twintrack::config::Config;
use twintrack::db::Native;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, OpenFeatureSource, SqlFlagStore, StageSource};
use twintrack::metrics::PrometheusExporter;
use twintrack::ryw::{ReplicaOptions, ReplicaSet, Router};
use twintrack::{Backend, Database};

mod app;
mod repos;
use app::MIGRATION;
use repos::{SettingsResync, Users};

type BoxError = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            // As the CLI: 4 when the database cannot be reached (TLS refusals included), 2 for
            // a bad URL or configuration, 5 for the rest.
            std::process::ExitCode::from(match e.downcast_ref::<twintrack::Error>() {
                Some(twintrack::Error::Unreachable(_)) => 4,
                Some(twintrack::Error::Config(_) | twintrack::Error::InvalidInput(_)) => 2,
                _ => 5,
            })
        }
    }
}

async fn run() -> Result<(), BoxError> {
    // First: logs (to stderr: stdout carries the one "listening on" line scripts wait for),
    // and the global meter and tracer twintrack's parts record through: Prometheus on
    // /metrics, and OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    let telemetry = twintrack::telemetry::init("quickstart", "info,sqlx=warn", true)?;
    let prometheus = telemetry
        .prometheus()
        .cloned()
        .ok_or("no Prometheus exporter")?;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "sqlite://twintrack-quickstart.db?mode=rwc".into());
    let listen = std::env::var("TWINTRACK_LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let debug_headers = std::env::var("TWINTRACK_DEBUG_HEADERS").as_deref() == Ok("1");

    let db = Database::connect(&url).await?;
    let new_db = match std::env::var("NEW_DATABASE_URL") {
        Ok(new_url) if !new_url.trim().is_empty() => {
            let new_db = Database::connect(&new_url).await.map_err(|e| match e {
                twintrack::Error::Unreachable(source) => {
                    twintrack::Error::Unreachable(sqlx::Error::Io(std::io::Error::other(format!(
                        "the new database (NEW_DATABASE_URL): {source}"
                    ))))
                }
                other => other,
            })?;
            if new_db.backend() != db.backend() {
                return Err(twintrack::Error::Config(
                    "NEW_DATABASE_URL must be of the same backend as DATABASE_URL".into(),
                )
                .into());
            }
            Some(new_db).filter(|n| !n.same_database(&db))
        }
        _ => None,
    };
    // The backend is picked by the URL: the rest runs on that backend's native driver.
    let served = match db.backend() {
        Backend::Postgres => {
            serve::<sqlx::Postgres>(db, new_db, &listen, debug_headers, prometheus).await
        }
        Backend::MySql => {
            serve::<sqlx::MySql>(db, new_db, &listen, debug_headers, prometheus).await
        }
        _ => serve::<sqlx::Sqlite>(db, new_db, &listen, debug_headers, prometheus).await,
    };
    // What is still buffered for OTLP goes out before the process ends.
    telemetry.shutdown();
    served
}

async fn serve<DB: Native>(
    db: Database,
    new_db: Option<Database>,
    listen: &str,
    debug_headers: bool,
    prometheus: PrometheusExporter,
) -> Result<(), BoxError> {
    let pool = DB::typed(&db)
        .ok_or("a database of another backend")?
        .clone();
    repos::create_shapes_apart::<i64>(&db, new_db.as_ref().unwrap_or(&db)).await?;
    if let Some(new_db) = &new_db {
        // Repair intents of writes made while the new shape is authoritative live there.
        twintrack::schema::install(new_db).await?;
        tracing::info!(legacy = %db.describe(), new = %new_db.describe(),
            "two databases: users in the first, user_settings in the second");
    }

    // twintrack's own tables, and the migration from the same file the CLI reads.
    let config = Config::parse(include_str!("../quickstart.toml"))?;
    let mut store = SqlFlagStore::open(db.clone()).await?;
    if let Some(new_db) = &new_db {
        // Its repair intents (of writes made while the new shape was authoritative) gate
        // moves onto the legacy side, as the legacy database's gate moves onto the new one.
        store = store.intents_also_in(new_db.clone());
    }
    let store = Arc::new(store);
    for m in &config.migrations {
        store.register(&m.name, "quickstart").await?;
    }
    let mut flags = FlagCache::builder(store.clone()).configured(&config);
    if let Some(path) = std::env::var_os("TWINTRACK_FLAGS_FILE").filter(|p| !p.is_empty()) {
        let source = OpenFeatureSource::flagd_file(&path)
            .await?
            .flag_keys_from(&config);
        tracing::info!(source = %source.describe(), "stages from a flagd file, held to twintrack's rules");
        flags = flags.source(Arc::new(source));
    }
    let flags = flags.build().await;

    let router = read_router(&db).await?;
    let (legacy, new) = match new_db {
        None => repos::repos::<DB, i64>(),
        // The new database holds only `user_settings`: no `users` there to check against.
        Some(_) => repos::split_repos::<DB, i64>(),
    };
    let migration = config
        .migration(MIGRATION)
        .ok_or("examples/quickstart.toml defines no user_settings migration")?;
    let definition = migration.definition(db.backend())?;
    // The repair worker re-syncs keys with the same SQL as `twintrack verify --repair` (one
    // database), or through `SettingsResync` across two.
    let mut settings = DualStore::builder(
        MIGRATION,
        legacy,
        new,
        pool,
        flags.clone(),
        SettingsResync::default(),
    );
    if let Some(new_db) = &new_db {
        settings = settings.new_database(
            DB::typed(new_db)
                .ok_or("a database of another backend")?
                .clone(),
        );
    }
    let settings = settings
        .router(router.clone())
        .primary_reads(migration.primary_reads)
        .definition(definition)
        .build()?;
    // SIGTERM or SIGINT stops the server (it drains the requests in flight) and the repair
    // worker (between passes: an intent it has not replayed stays in the database).
    let stopping = stop_flag();
    let repair_worker = new_db.is_some().then(|| {
        // Two databases: a write whose second side failed (or whose process died before it)
        // left a repair intent; replay those older than a few seconds, every few seconds.
        let (store, mut stop) = (settings.clone(), stopping.subscribe());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
                if let Err(err) = store.repair(std::time::Duration::from_secs(2)).await {
                    tracing::warn!(error = %err, "repair pass failed; trying again");
                }
            }
        })
    });
    let drained = settings.clone();
    let app = app::app(
        Users { settings },
        flags,
        Some(router),
        debug_headers,
        Some(&prometheus),
    );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    // Tests and scripts read this line to find the port (TWINTRACK_LISTEN may say port 0).
    println!(
        "twintrack quickstart listening on http://{}",
        listener.local_addr()?
    );
    // On SIGTERM or SIGINT: refuse new connections, answer every request made (HTTP/1
    // responses then say `Connection: close`), then close what is left.
    twintrack::shutdown::serve(
        listener,
        app,
        twintrack::shutdown::signal(),
        twintrack::shutdown::DEFAULT_GRACE,
    )
    .await?;
    // Every request has been answered. Stop the repair worker, let background shadow reads
    // and the mismatch recorder finish, and exit 0.
    let _ = stopping.send(true);
    if let Some(worker) = repair_worker {
        let _ = worker.await;
    }
    if !drained.drain(std::time::Duration::from_secs(3)).await {
        tracing::warn!("background shadow work still running at exit; it is diagnostics only");
    }
    tracing::info!("stopped");
    Ok(())
}

/// A stop flag the workers watch.
fn stop_flag() -> tokio::sync::watch::Sender<bool> {
    tokio::sync::watch::channel(false).0
}

/// The read router: the replicas in `REPLICA_DATABASE_URLS` (if any) and the token secret.
async fn read_router(db: &Database) -> Result<Router, BoxError> {
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
            random_secret()
        }
    };
    let mut router = Router::builder(db.clone(), secret);
    if !urls.is_empty() {
        if db.backend() == Backend::Sqlite {
            return Err(
                "REPLICA_DATABASE_URLS needs a postgres:// or mysql:// DATABASE_URL".into(),
            );
        }
        let replicas = ReplicaSet::connect(db.clone(), &urls, ReplicaOptions::default()).await?;
        router = router.replicas(replicas);
    }
    Ok(router.build().await?)
}

/// 32 bytes from the standard library's per-process random hash keys (good enough for a key
/// that lives as long as this demo process; set TWINTRACK_RYW_SECRET for real use).
fn random_secret() -> Vec<u8> {
    use std::hash::{BuildHasher, Hasher};
    (0..4u8)
        .flat_map(|i| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u8(i);
            h.finish().to_le_bytes()
        })
        .collect()
}
