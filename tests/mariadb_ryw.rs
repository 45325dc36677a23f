//! Read-your-writes on a real MariaDB primary and a real GTID replica one second behind
//! (`MASTER_DELAY=1`), through the quickstart's own service driven in-process: the token
//! carries the primary's GTID sequence number, a read with it goes to the replica only once
//! the replica's `@@gtid_slave_pos` covers it. A binary of its own: its last step kills the
//! replica.

#[path = "../examples/quickstart/app.rs"]
mod app;
mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use common::TestMetrics;
use common::mariadb;
use http_body_util::BodyExt;
use repos::{SettingsResync, Users};
use serde_json::{Value, json};
use tower::ServiceExt;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore};
use twintrack::ryw::{HEADER, ReplicaOptions, ReplicaSet, Router};
use twintrack::{Database, Stage, TwinTrack};

const M: &str = "user_settings";
const SECRET: &[u8] = b"twintrack test secret, 32 bytes!";

struct Reply {
    status: u16,
    body: Value,
    token: Option<String>,
    read_from: Option<String>,
}

async fn call(
    app: &TwinTrack<axum::Router>,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> Reply {
    let mut req = http::Request::builder().method(method).uri(path);
    if let Some(token) = token {
        req = req.header(HEADER, token);
    }
    let body = body.map_or_else(Body::empty, |v| Body::from(v.to_string()));
    let res = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (token, read_from) = (header(HEADER), header("x-twintrack-read-from"));
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        token,
        read_from,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn gtid_tokens_are_never_stale_the_replica_serves_without_them_and_a_dead_replica_costs_nothing()
 {
    let Some(cluster) = mariadb::shared() else {
        return;
    };
    let db = cluster.fresh_db().await;
    let metrics = TestMetrics::new();
    let primary = Database::connect(&db.url).await.unwrap();
    repos::create_shapes::<i64>(&primary).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(primary.clone()).await.unwrap());
    store.register(M, "test").await.unwrap();
    let flags = FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let replicas = ReplicaSet::connect(
        primary.clone(),
        &db.replica_urls,
        ReplicaOptions {
            poll_interval: Duration::from_millis(20),
            poll_timeout: Duration::from_millis(500),
            // MASTER_DELAY=1 reports up to about a second behind: in service.
            max_lag: Duration::from_secs(5),
            metrics: metrics.metrics(),
            ..ReplicaOptions::default()
        },
    )
    .await
    .unwrap();
    let router = Router::builder(primary.clone(), SECRET)
        .replicas(replicas.clone())
        .metrics(metrics.metrics())
        .build()
        .await
        .unwrap();
    let (legacy, new) = repos::repos::<sqlx::MySql, i64>();
    let settings = DualStore::builder(
        M,
        legacy,
        new,
        primary.as_mysql().unwrap().clone(),
        flags.clone(),
        SettingsResync::default(),
    )
    .router(router.clone())
    .metrics(metrics.metrics())
    .build()
    .unwrap();
    let app = app::app(
        Users { settings },
        flags.clone(),
        Some(router.clone()),
        true,
        None,
    );

    let r = call(
        &app,
        "POST",
        "/users",
        Some(json!({"email": "a@example.com", "theme": "t0", "notifications_enabled": true})),
        None,
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let id = r.body["id"].as_i64().unwrap();
    let path = format!("/users/{id}/settings");
    // The replica has replayed the user before the trials begin.
    let start = Instant::now();
    loop {
        replicas.poll_all().await;
        let at = replicas.primary_lsn().await.unwrap();
        if replicas
            .health()
            .iter()
            .all(|h| h.healthy && h.replay_lsn.is_some_and(|r| r >= at))
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{:?}",
            replicas.health()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let put = |value: String| {
        let (app, path) = (app.clone(), path.clone());
        async move {
            let r = call(
                &app,
                "PUT",
                &path,
                Some(json!({"theme": value, "notifications_enabled": true})),
                None,
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.token.expect("a write answers with a token")
        }
    };

    // With the token: 1,000 writes, each read right after with its token, never stale.
    let (mut stale, mut on_primary) = (0, 0);
    for i in 1..=1000 {
        let value = format!("with-{i}");
        let token = put(value.clone()).await;
        let r = call(&app, "GET", &path, None, Some(&token)).await;
        assert_eq!(r.status, 200);
        if r.body["theme"] != value.as_str() {
            stale += 1;
        }
        if r.read_from.as_deref() == Some("primary") {
            on_primary += 1;
        }
    }
    eprintln!("with the token: {on_primary}/1000 reads on the primary, {stale} stale");
    assert_eq!(stale, 0, "stale reads with the token");
    assert!(
        on_primary >= 900,
        "a second behind, the replica cannot have them: {on_primary}"
    );

    // Without it: the replica serves, a second behind, so stale.
    let (mut stale, mut on_replica) = (0, 0);
    for i in 1..=1000 {
        let value = format!("without-{i}");
        put(value.clone()).await;
        let r = call(&app, "GET", &path, None, None).await;
        assert_eq!(r.status, 200);
        if r.body["theme"] != value.as_str() {
            stale += 1;
        }
        if r.read_from.as_deref() == Some("replica") {
            on_replica += 1;
        }
    }
    eprintln!("without the token: {on_replica}/1000 reads on the replica, {stale} stale");
    assert!(
        on_replica >= 900,
        "the replica is really used: {on_replica}"
    );
    assert!(
        stale >= 1,
        "no stale read without the token: is the replica really used?"
    );

    // The replica dies: reads with and without a token go on, on the primary, no errors.
    cluster.kill_replica();
    let mut errors = 0;
    for i in 1..=200 {
        let value = format!("dead-{i}");
        let token = put(value.clone()).await;
        for token in [Some(token.as_str()), None] {
            let r = call(&app, "GET", &path, None, token).await;
            if r.status != 200 {
                errors += 1;
            } else {
                assert_eq!(
                    r.body["theme"],
                    value.as_str(),
                    "the primary serves the write"
                );
            }
        }
    }
    assert_eq!(errors, 0, "errors after the replica died");
    assert!(
        !replicas.health()[0].healthy,
        "the dead replica is out of service: {:?}",
        replicas.health()
    );
}
