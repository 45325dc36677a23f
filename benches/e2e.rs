//! End to end, on a durable PostgreSQL (`fsync=on`): the quickstart's HTTP service under load,
//! and how fast a stage flip reaches several running instances.
//!
//! - Throughput: 32 keep-alive HTTP/1.1 clients over loopback against the quickstart in
//!   `dual_write` (twintrack layer, dual store writing both shapes in one transaction, read
//!   router) and against the same routes writing one shape without twintrack (the legacy
//!   repository called directly, no layer), and writing both shapes by hand (both
//!   repositories in one transaction, no twintrack: the floor for a dual write here). 70%
//!   `GET /users/{id}/settings`, 30% `PUT`, over 1,000 users; `--seconds` per round and
//!   variant (default 30: at 10, rounds of one build spread over ±4% on a shared 2-core
//!   machine), for `--rounds` (default 3); within a round the three take turns in `--slices`
//!   (default 18) equal slices, walking their six orders, so that the machine's drift (other
//!   tenants, PostgreSQL's checkpoints and autovacuum) hits them alike.
//! - Flip propagation: `--instances` flag caches (default 5), each with its own store and its
//!   own `LISTEN` connection as separate service instances have; `--flips` flips (default 200,
//!   50 ms apart) committed through the flag store, timed from the commit to each instance's
//!   snapshot showing the new stage.
//!
//! - Cost per request: the statements and round trips each request kind (`GET`, `PUT`, `POST`
//!   of a user, `DELETE` of a user) sends to PostgreSQL, one at a time, counted by a proxy
//!   that reads the client's side of the protocol (each `Execute`, each statement of a simple
//!   `Query`; a round trip is the client sending and then the server answering, connection
//!   checks on acquire included): the same routes on one shape without twintrack, and
//!   twintrack in `dual_write` without a replica, with one, and with the new shape in a
//!   second database (both databases' statements counted).
//!
//! Run: `cargo bench --bench e2e`.

#[path = "../examples/quickstart/app.rs"]
mod app;
#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use repos::{LegacySettings, NewSettings, Settings, SettingsRepo, SettingsResync, Users};
use sqlx::PgPool;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::{Database, Stage};

const M: &str = "user_settings";
const USERS: i64 = 1000;
/// The six orders of the three throughput variants (one shape, by hand, twintrack).
const ORDERS: [[usize; 3]; 6] = [
    [0, 1, 2],
    [2, 1, 0],
    [1, 2, 0],
    [0, 2, 1],
    [2, 0, 1],
    [1, 0, 2],
];

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{name} wants a whole number, not {v:?}");
                std::process::exit(2)
            })
        })
}

/// The baseline: the same routes, one shape, no twintrack.
fn plain_app(db: Database) -> axum::Router {
    #[derive(serde::Deserialize)]
    struct NewUser {
        email: String,
        theme: String,
        notifications_enabled: bool,
    }
    async fn create_user(
        State((db, repo)): State<(PgPool, Arc<LegacySettings>)>,
        axum::Json(user): axum::Json<NewUser>,
    ) -> Result<(http::StatusCode, axum::Json<serde_json::Value>), http::StatusCode> {
        let repo: &dyn SettingsRepo<sqlx::Postgres, i64> = &*repo;
        let failed = |_| http::StatusCode::INTERNAL_SERVER_ERROR;
        let mut tx = db.begin().await.map_err(failed)?;
        let (id,): (i64,) = sqlx::query_as("INSERT INTO users (email) VALUES ($1) RETURNING id")
            .bind(&user.email)
            .fetch_one(&mut *tx)
            .await
            .map_err(failed)?;
        let settings = Settings {
            theme: user.theme,
            notifications_enabled: user.notifications_enabled,
        };
        repo.put(&mut tx, id, settings).await.map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok((
            http::StatusCode::CREATED,
            axum::Json(serde_json::json!({ "id": id })),
        ))
    }
    async fn delete_user(
        State((db, repo)): State<(PgPool, Arc<LegacySettings>)>,
        Path(id): Path<i64>,
    ) -> Result<http::StatusCode, http::StatusCode> {
        let repo: &dyn SettingsRepo<sqlx::Postgres, i64> = &*repo;
        let failed = |_| http::StatusCode::INTERNAL_SERVER_ERROR;
        let mut tx = db.begin().await.map_err(failed)?;
        repo.delete(&mut tx, id).await.map_err(failed)?;
        let gone = sqlx::query("DELETE FROM users WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(failed)?
            .rows_affected();
        tx.commit().await.map_err(failed)?;
        if gone == 0 {
            return Err(http::StatusCode::NOT_FOUND);
        }
        Ok(http::StatusCode::NO_CONTENT)
    }
    let legacy = Arc::new(LegacySettings);
    let db = db.as_postgres().expect("a PostgreSQL database").clone();
    async fn get_settings(
        State((db, repo)): State<(PgPool, Arc<LegacySettings>)>,
        Path(id): Path<i64>,
    ) -> Result<axum::Json<Settings>, http::StatusCode> {
        let repo: &dyn SettingsRepo<sqlx::Postgres, i64> = &*repo;
        let mut conn = db
            .acquire()
            .await
            .map_err(|_| http::StatusCode::INTERNAL_SERVER_ERROR)?;
        match repo.get(&mut conn, id, false).await {
            Ok(Some(s)) => Ok(axum::Json(s)),
            Ok(None) => Err(http::StatusCode::NOT_FOUND),
            Err(_) => Err(http::StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
    async fn put_settings(
        State((db, repo)): State<(PgPool, Arc<LegacySettings>)>,
        Path(id): Path<i64>,
        axum::Json(s): axum::Json<Settings>,
    ) -> Result<axum::Json<Settings>, http::StatusCode> {
        let repo: &dyn SettingsRepo<sqlx::Postgres, i64> = &*repo;
        let mut tx = db
            .begin()
            .await
            .map_err(|_| http::StatusCode::INTERNAL_SERVER_ERROR)?;
        match repo.put(&mut tx, id, s.clone()).await {
            Ok(true) => {}
            Ok(false) => return Err(http::StatusCode::NOT_FOUND),
            Err(_) => return Err(http::StatusCode::INTERNAL_SERVER_ERROR),
        }
        tx.commit()
            .await
            .map_err(|_| http::StatusCode::INTERNAL_SERVER_ERROR)?;
        Ok(axum::Json(s))
    }
    axum::Router::new()
        .route("/users", axum::routing::post(create_user))
        .route("/users/{id}", axum::routing::delete(delete_user))
        .route("/users/{id}/settings", get(get_settings).put(put_settings))
        .with_state((db, legacy))
}

/// The floor for a dual write on this machine: the throughput routes writing both shapes by
/// hand, in one transaction (the legacy repository, then the new one), reading legacy; no
/// twintrack.
fn by_hand_app(db: Database) -> axum::Router {
    type Repos = (LegacySettings, NewSettings);
    async fn get_settings(
        State((db, repos)): State<(PgPool, Arc<Repos>)>,
        Path(id): Path<i64>,
    ) -> Result<axum::Json<Settings>, http::StatusCode> {
        let legacy: &dyn SettingsRepo<sqlx::Postgres, i64> = &repos.0;
        let failed = |_| http::StatusCode::INTERNAL_SERVER_ERROR;
        let mut conn = db.acquire().await.map_err(failed)?;
        match legacy.get(&mut conn, id, false).await.map_err(failed)? {
            Some(s) => Ok(axum::Json(s)),
            None => Err(http::StatusCode::NOT_FOUND),
        }
    }
    async fn put_settings(
        State((db, repos)): State<(PgPool, Arc<Repos>)>,
        Path(id): Path<i64>,
        axum::Json(s): axum::Json<Settings>,
    ) -> Result<axum::Json<Settings>, http::StatusCode> {
        let legacy: &dyn SettingsRepo<sqlx::Postgres, i64> = &repos.0;
        let new: &dyn SettingsRepo<sqlx::Postgres, i64> = &repos.1;
        let failed = |_| http::StatusCode::INTERNAL_SERVER_ERROR;
        let mut tx = db.begin().await.map_err(failed)?;
        if !legacy.put(&mut tx, id, s.clone()).await.map_err(failed)? {
            return Err(http::StatusCode::NOT_FOUND);
        }
        new.put(&mut tx, id, s.clone()).await.map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(axum::Json(s))
    }
    let repos = Arc::new((LegacySettings, NewSettings { standalone: false }));
    let db = db.as_postgres().expect("a PostgreSQL database").clone();
    axum::Router::new()
        .route("/users/{id}/settings", get(get_settings).put(put_settings))
        .with_state((db, repos))
}

/// Unique emails for the users the cost figures create.
static EMAILS: AtomicU64 = AtomicU64::new(0);

/// What the clients of a [`counting_proxy`] sent.
#[derive(Default)]
struct Sent {
    statements: AtomicU64,
    round_trips: AtomicU64,
}

/// A TCP proxy to `target` (a PostgreSQL server) counting what its clients send (see the
/// module docs); returns its port.
async fn counting_proxy(target: u16, sent: Arc<Sent>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let sent = sent.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let waiting = Arc::new(AtomicBool::new(false));
                let (sent_up, waiting_up) = (sent.clone(), waiting.clone());
                let up = tokio::spawn(async move {
                    let (mut buf, mut pending, mut started) = (vec![0u8; 65536], Vec::new(), false);
                    while let Ok(n) = client_read.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        count_messages(&mut pending, &mut started, &sent_up);
                        waiting_up.store(true, Ordering::Relaxed);
                        if server_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if waiting.swap(false, Ordering::Relaxed) {
                        sent.round_trips.fetch_add(1, Ordering::Relaxed);
                    }
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    port
}

/// Takes the whole messages at the front of `pending` (a client's bytes): the startup
/// messages (no type byte), then typed ones; counts each `Execute` and each statement of a
/// simple `Query` in `sent`.
fn count_messages(pending: &mut Vec<u8>, started: &mut bool, sent: &Sent) {
    loop {
        let (head, at) = if *started { (5, 1) } else { (4, 0) };
        if pending.len() < head {
            return;
        }
        let len = u32::from_be_bytes(pending[at..at + 4].try_into().unwrap()) as usize;
        let total = at + len;
        if pending.len() < total {
            return;
        }
        if *started {
            match pending[0] {
                b'E' => {
                    sent.statements.fetch_add(1, Ordering::Relaxed);
                }
                b'Q' => {
                    let text = String::from_utf8_lossy(&pending[5..total]);
                    let n = text
                        .trim_end_matches('\0')
                        .split(';')
                        .filter(|s| !s.trim().is_empty())
                        .count();
                    sent.statements.fetch_add(n as u64, Ordering::Relaxed);
                }
                _ => {}
            }
        } else {
            // An SSL or GSS encryption request is answered with one byte, then the startup
            // message follows; anything else is the startup message.
            let code = u32::from_be_bytes(pending[4..8].try_into().unwrap());
            *started = !matches!(code, 80_877_103 | 80_877_104);
        }
        pending.drain(..total);
    }
}

/// Statements and round trips per request of each kind, one request at a time, `n` of each
/// after a first one (connections opened, statements prepared), against `base` (whose
/// database connections go through the proxy counting into `sent`). `ids` are users to read
/// and update, `doomed` `n + 1` users to delete.
async fn cost_per_request(
    base: &str,
    sent: &Sent,
    ids: &[i64],
    doomed: &[i64],
    n: usize,
) -> Vec<(f64, f64)> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut out = Vec::new();
    for kind in ["GET", "PUT", "POST", "DELETE"] {
        let mut measure_from = None;
        for i in 0..=n {
            if i == 1 {
                measure_from = Some((
                    sent.statements.load(Ordering::Relaxed),
                    sent.round_trips.load(Ordering::Relaxed),
                ));
            }
            let id = if kind == "DELETE" {
                doomed[i]
            } else {
                ids[i % ids.len()]
            };
            let req = match kind {
                "GET" => settings_request(base, id, None),
                "PUT" => settings_request(base, id, Some(i as u64)),
                "POST" => http::Request::post(format!("{base}/users"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"email":"cost-{}@bench","theme":"t","notifications_enabled":true}}"#,
                        EMAILS.fetch_add(1, Ordering::Relaxed)
                    ))))
                    .unwrap(),
                _ => http::Request::delete(format!("{base}/users/{id}"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            };
            let res = client.request(req).await.unwrap();
            let status = res.status();
            let _ = res.into_body().collect().await;
            assert!(status.is_success(), "{kind} {id}: {status}");
        }
        let (s, r) = measure_from.unwrap();
        out.push((
            (sent.statements.load(Ordering::Relaxed) - s) as f64 / n as f64,
            (sent.round_trips.load(Ordering::Relaxed) - r) as f64 / n as f64,
        ));
    }
    out
}

async fn serve<S>(app: S) -> String
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(
            listener,
            axum::ServiceExt::<axum::extract::Request>::into_make_service(app),
        )
        .await
        .unwrap()
    });
    base
}

/// Runs 32 clients against `base` for `run`; returns the requests served, the time it took
/// and the errors.
async fn load(base: &str, run: Duration) -> (u64, Duration, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..32u64 {
        let (base, done, errors, stop) =
            (base.to_owned(), done.clone(), errors.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<Full<Bytes>>();
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ c.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let id = 1 + (rng % USERS as u64);
                let req = settings_request(&base, id, (rng % 10 < 3).then_some(rng % 100));
                match client.request(req).await {
                    Ok(res) if res.status().is_success() => {
                        let _ = res.into_body().collect().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(run).await;
    let n = done.load(Ordering::Relaxed);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    (n, took, errors.load(Ordering::Relaxed))
}

/// `TWINTRACK_ICOUNT=<variant>:<kind>:<n>` (`plain`, `by_hand` or `twintrack`; `get` or
/// `put`): run `n` requests of that kind one at a time against that variant and exit, for
/// `benches/icount.sh e2e` (callgrind counts the service's instructions per request: run at
/// `n` and `2n`, the difference over `n`, free of start-up).
fn icount_spec() -> Option<(String, String, u64)> {
    let spec = std::env::var("TWINTRACK_ICOUNT").ok()?;
    let parts: Vec<&str> = spec.split(':').collect();
    let parsed = match parts[..] {
        [
            variant @ ("plain" | "by_hand" | "twintrack"),
            kind @ ("get" | "put"),
            n,
        ] => n
            .parse()
            .ok()
            .map(|n| (variant.to_owned(), kind.to_owned(), n)),
        _ => None,
    };
    if parsed.is_none() {
        eprintln!("TWINTRACK_ICOUNT wants <plain|by_hand|twintrack>:<get|put>:<n>, not {spec:?}");
        std::process::exit(2);
    }
    parsed
}

/// `GET /users/{id}/settings`, or with `theme` a `PUT` of settings with that theme.
fn settings_request(
    base: &str,
    id: impl std::fmt::Display,
    theme: Option<u64>,
) -> http::Request<Full<Bytes>> {
    let uri = format!("{base}/users/{id}/settings");
    match theme {
        Some(theme) => http::Request::put(uri)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"theme":"t{theme}","notifications_enabled":true}}"#
            )))),
        None => http::Request::get(uri).body(Full::new(Bytes::new())),
    }
    .unwrap()
}

/// `n` requests of `kind` against `base`, one at a time, over the first `users` users.
async fn one_at_a_time(base: &str, kind: &str, n: u64, users: i64) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    for i in 0..n {
        let id = 1 + (i as i64 % users);
        let req = settings_request(base, id, (kind == "put").then_some(i % 100));
        let res = client.request(req).await.unwrap();
        assert!(res.status().is_success(), "{kind} {id}: {}", res.status());
        let _ = res.into_body().collect().await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let seconds = arg("--seconds", 30);
    let rounds = arg("--rounds", 3);
    let slices = arg("--slices", 18).max(1);
    let instances = arg("--instances", 5) as usize;
    let flips = arg("--flips", 200) as usize;
    let cli_flips = arg("--cli-flips", 50) as usize;
    let icount = icount_spec();
    let cluster = pg::Cluster::start_durable().expect("start a durable PostgreSQL");
    let test_db = cluster.fresh_db().await;
    let (url, replica_url) = (test_db.url, test_db.replica_urls[0].clone());
    let db = Database::connect_with(
        &url,
        twintrack::db::ConnectOptions {
            max_connections: 32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    repos::create_shapes::<i64>(&db).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register(M, "bench").await.unwrap();
    store
        .set_stage(StageChange::new(
            M,
            Stage::DualWrite,
            "bench",
            "dual writes on",
        ))
        .await
        .unwrap();
    let flags = FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let router =
        twintrack::ryw::Router::builder(db.clone(), b"e2e bench secret, 32 bytes long!".to_vec())
            .build()
            .await
            .unwrap();
    let (legacy, new) = repos::repos::<sqlx::Postgres, i64>();
    let pool = db.as_postgres().unwrap().clone();
    let users = Users {
        settings: DualStore::builder(
            M,
            legacy,
            new,
            pool,
            flags.clone(),
            SettingsResync::default(),
        )
        .router(router.clone())
        .build()
        .unwrap(),
    };
    // Under callgrind (`TWINTRACK_ICOUNT`) every request is slow: a few users do.
    let users_n = if icount.is_some() { 20 } else { USERS };
    for i in 0..users_n {
        users
            .create(
                &format!("u{i}@bench"),
                Settings {
                    theme: "t0".into(),
                    notifications_enabled: true,
                },
            )
            .await
            .unwrap();
    }
    let twintrack_base = serve(app::app(users, flags, Some(router), false, None)).await;
    let plain_base = serve(plain_app(db.clone())).await;
    let by_hand_base = serve(by_hand_app(db.clone())).await;
    if let Some((variant, kind, n)) = icount {
        let base = match variant.as_str() {
            "plain" => &plain_base,
            "by_hand" => &by_hand_base,
            _ => &twintrack_base,
        };
        one_at_a_time(base, &kind, n, users_n).await;
        return;
    }

    println!(
        "\nend-to-end throughput: 32 HTTP clients, 70% GET / 30% PUT over {USERS} users, {seconds} s per round and variant (in {slices} interleaved slices), durable PostgreSQL\n"
    );
    println!(
        "| round | one shape, no twintrack | both shapes by hand, no twintrack | twintrack, dual_write | ratio to one shape | ratio to both by hand | errors |"
    );
    println!("|---|---|---|---|---|---|---|");
    let slice = Duration::from_secs(seconds) / slices as u32;
    for round in 1..=rounds {
        // The three interleaved in slices, so that the machine's drift hits them alike.
        let mut served = [(0u64, Duration::ZERO); 3];
        let mut errors = 0;
        let bases = [&plain_base, &by_hand_base, &twintrack_base];
        for turn in 0..slices as usize {
            // The slices walk the six orders of the three, so that each follows each of the
            // others equally often (inheriting its dead tuples, WAL and checkpoints).
            for variant in ORDERS[turn % ORDERS.len()] {
                let (n, took, e) = load(bases[variant], slice).await;
                let total = &mut served[variant];
                *total = (total.0 + n, total.1 + took);
                errors += e;
            }
        }
        let [plain, by_hand, ours] = served.map(|(n, took)| n as f64 / took.as_secs_f64());
        println!(
            "| {round} | {plain:.0} req/s | {by_hand:.0} req/s | {ours:.0} req/s | {:.3}× | {:.3}× | {errors} |",
            ours / plain,
            ours / by_hand,
        );
    }

    // Cost per request: the same services over connections through a counting proxy.
    let sent = Arc::new(Sent::default());
    let proxied = async |url: &str| {
        use std::str::FromStr;
        let port = sqlx::postgres::PgConnectOptions::from_str(url)
            .unwrap()
            .get_port();
        let proxy = counting_proxy(port, sent.clone()).await;
        url.replace(&format!(":{port}/"), &format!(":{proxy}/"))
    };
    let counted_url = proxied(&url).await;
    let counted_replica = proxied(&replica_url).await;
    let counted = Database::connect(&counted_url).await.unwrap();
    let doomed = async |n: usize| -> Vec<i64> {
        let mut ids = Vec::new();
        for i in 0..n {
            let (id,): (i64,) =
                sqlx::query_as("INSERT INTO users (email) VALUES ($1) RETURNING id")
                    .bind(format!(
                        "doomed-{}-{i}@bench",
                        EMAILS.fetch_add(1, Ordering::Relaxed)
                    ))
                    .fetch_one(db.as_postgres().unwrap())
                    .await
                    .unwrap();
            ids.push(id);
        }
        ids
    };
    let n = arg("--cost-requests", 100) as usize;
    let ids: Vec<i64> = (1..=n as i64).collect();
    let mut costs = vec![(
        "one shape, no twintrack",
        cost_per_request(
            &serve(plain_app(counted.clone())).await,
            &sent,
            &ids,
            &doomed(n + 1).await,
            n,
        )
        .await,
    )];
    // The new shape in a database of its own (on the same server, through the same proxy):
    // the figures count both databases' statements.
    let counted_new = Database::connect(&proxied(&cluster.fresh_db().await.url).await)
        .await
        .unwrap();
    repos::create_shapes_apart::<i64>(&counted, &counted_new)
        .await
        .unwrap();
    twintrack::schema::install(&counted_new).await.unwrap();
    for (what, replicas, new_db) in [
        ("twintrack, no replica", Vec::new(), None),
        ("twintrack, a replica", vec![counted_replica.clone()], None),
        ("twintrack, two databases", Vec::new(), Some(&counted_new)),
    ] {
        let mut store = SqlFlagStore::open(counted.clone()).await.unwrap();
        if let Some(new_db) = new_db {
            store = store.intents_also_in(new_db.clone());
        }
        let flags = FlagCache::builder(Arc::new(store))
            .migration(M, Stage::LegacyOnly)
            .build()
            .await;
        let mut builder = twintrack::ryw::Router::builder(
            counted.clone(),
            b"e2e bench secret, 32 bytes long!".to_vec(),
        );
        if !replicas.is_empty() {
            builder = builder.replicas(
                twintrack::ryw::ReplicaSet::connect(
                    counted.clone(),
                    &replicas,
                    twintrack::ryw::ReplicaOptions::default(),
                )
                .await
                .unwrap(),
            );
        }
        let router = builder.build().await.unwrap();
        let (legacy, new) = match new_db {
            None => repos::repos::<sqlx::Postgres, i64>(),
            Some(_) => repos::split_repos::<sqlx::Postgres, i64>(),
        };
        let mut settings = DualStore::builder(
            M,
            legacy,
            new,
            counted.as_postgres().unwrap().clone(),
            flags.clone(),
            SettingsResync::default(),
        );
        if let Some(new_db) = new_db {
            settings = settings.new_database(new_db.as_postgres().unwrap().clone());
        }
        let users = Users {
            settings: settings.router(router.clone()).build().unwrap(),
        };
        let base = serve(app::app(users, flags, Some(router), false, None)).await;
        costs.push((
            what,
            cost_per_request(&base, &sent, &ids, &doomed(n + 1).await, n).await,
        ));
    }
    println!(
        "\ncost per request (dual_write; one request at a time, {n} of each): statements / round trips to PostgreSQL\n"
    );
    println!(
        "| request | {} |",
        costs
            .iter()
            .map(|(what, _)| *what)
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(costs.len()));
    for (i, kind) in ["GET", "PUT", "POST /users", "DELETE /users/{id}"]
        .iter()
        .enumerate()
    {
        println!(
            "| {kind} | {} |",
            costs
                .iter()
                .map(|(_, c)| format!("{:.2} / {:.2}", c[i].0, c[i].1))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }

    // Flip propagation to several instances.
    let mut caches = Vec::new();
    for _ in 0..instances {
        let db = Database::connect(&url).await.unwrap();
        let store = Arc::new(SqlFlagStore::open(db).await.unwrap());
        caches.push(
            FlagCache::builder(store)
                .migration(M, Stage::LegacyOnly)
                .build()
                .await,
        );
    }
    let mut samples = Vec::new();
    let mut stage = Stage::DualWrite;
    for _ in 0..flips {
        stage = if stage == Stage::DualWrite {
            Stage::LegacyOnly
        } else {
            Stage::DualWrite
        };
        store
            .set_stage(StageChange::new(M, stage, "bench", "flip"))
            .await
            .unwrap();
        let committed = Instant::now();
        let watchers: Vec<_> = caches
            .iter()
            .map(|cache| {
                let cache = cache.clone();
                std::thread::spawn(move || {
                    while cache.snapshot().stage(M) != Some(stage) {
                        assert!(
                            committed.elapsed() < Duration::from_secs(5),
                            "flip never arrived"
                        );
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    committed.elapsed()
                })
            })
            .collect();
        for w in watchers {
            samples.push(w.join().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    samples.sort();
    if samples.is_empty() {
        return;
    }
    // The same through the CLI, from spawning `twintrack stage set` (so including the
    // process's start and its connection) to every instance's snapshot: an upper bound.
    let cli = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/twintrack");
    let mut cli_samples = Vec::new();
    if cli.exists() {
        for _ in 0..cli_flips {
            stage = if stage == Stage::DualWrite {
                Stage::LegacyOnly
            } else {
                Stage::DualWrite
            };
            let spawned = Instant::now();
            let status = std::process::Command::new(&cli)
                .arg("--database-url")
                .arg(&url)
                .args(["stage", "set", M, stage.as_str(), "--reason", "cli-flip"])
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
            for cache in &caches {
                while cache.snapshot().stage(M) != Some(stage) {
                    assert!(
                        spawned.elapsed() < Duration::from_secs(5),
                        "flip never arrived"
                    );
                    std::thread::sleep(Duration::from_micros(100));
                }
                cli_samples.push(spawned.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cli_samples.sort();
    }
    println!(
        "\nflip propagation: {flips} flips x {instances} instances ({} samples), commit to snapshot: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().unwrap().as_secs_f64() * 1e3,
    );
    if cli_samples.is_empty() {
        println!("(build target/release/twintrack for the CLI figures: cargo build --release)");
    } else {
        println!(
            "flip propagation through the CLI: {cli_flips} flips x {instances} instances, spawn of `twintrack stage set` to snapshot: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&cli_samples, 0.5).as_secs_f64() * 1e3,
            percentile(&cli_samples, 0.99).as_secs_f64() * 1e3,
            cli_samples.last().unwrap().as_secs_f64() * 1e3,
        );
    }
}
