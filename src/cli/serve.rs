//! `twintrack serve --listen ADDR`: the control plane (gRPC, admin page, `/metrics`).

use std::process::ExitCode;
use std::sync::Arc;

use opentelemetry::KeyValue;

use super::Env;
use crate::Error;
use crate::control::{AdminTokens, ControlServer};
use crate::flags::{FlagCache, FlagStore, SqlFlagStore};
use crate::metrics::PrometheusExporter;

pub(crate) async fn run(
    env: &Env,
    listen: &str,
    prometheus: Option<&PrometheusExporter>,
) -> Result<ExitCode, Error> {
    let spec = std::env::var("TWINTRACK_ADMIN_TOKEN").unwrap_or_default();
    let tokens = AdminTokens::parse(&spec)?;
    let addr: std::net::SocketAddr = listen.parse().map_err(|e| {
        Error::InvalidInput(format!("--listen {listen:?}: {e} (expected host:port)"))
    })?;
    let prometheus = match prometheus {
        Some(exporter) => exporter.clone(),
        None => PrometheusExporter::install_global()?,
    };
    let db = env.database_with(8).await?;
    let mut store = SqlFlagStore::open(db.clone()).await?;
    // Two databases: moves from the admin page and gRPC check the new database's repair
    // intents too. One store holds one such database: the one the configured migrations share.
    let config = env.config()?;
    let mut apart = Vec::new();
    for m in config.iter().flat_map(|c| &c.migrations) {
        if let Some((url, _)) = env.new_database_url(Some(m))
            && !apart.contains(&url)
        {
            apart.push(url);
        }
    }
    match apart.len() {
        0 => {}
        1 => {
            let new_db = crate::Database::connect(&apart[0]).await?;
            store = store.intents_also_in(new_db);
        }
        n => tracing::warn!(
            databases = n,
            "migrations keep their new shapes in {n} databases: stage moves from the control plane check the legacy database's repair intents only"
        ),
    }
    let store = Arc::new(store);
    // The stage of every migration known at start, as a gauge for dashboards and alerts.
    let mut cache = FlagCache::builder(store.clone());
    for flag in store.load_all().await? {
        cache = cache.migration(&flag.migration, crate::Stage::LegacyOnly);
    }
    let cache = cache.build().await;
    let _gauge = prometheus
        .meter("twintrack")
        .u64_observable_gauge("twintrack.migration.stage")
        .with_description(
            "Each migration's stage: 0 legacy_only … 5 new_only (label `stage` names it)",
        )
        .with_callback(move |observer| {
            for flag in cache.snapshot().iter() {
                let stage = flag.stage();
                let index = stage as u64; // declaration order: legacy_only 0 … new_only 5
                observer.observe(
                    index,
                    &[
                        KeyValue::new("migration", flag.name().to_owned()),
                        KeyValue::new("stage", stage.as_str()),
                    ],
                );
            }
        })
        .build();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            what: format!("cannot listen on {addr}"),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        what: format!("cannot listen on {addr}"),
        source,
    })?;
    // Scripts and tests read this line to find the port (the address may say port 0).
    println!("twintrack control plane listening on http://{local}");
    let mut server = ControlServer::new(store, db, tokens).prometheus(prometheus);
    if let Some(source) = env.stage_source().await? {
        server = server.stage_source(source);
    }
    server
        // SIGTERM or SIGINT: stop accepting, let the requests in flight finish, exit 0.
        .serve(listener, crate::shutdown::signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}
