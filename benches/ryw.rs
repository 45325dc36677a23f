//! Read-your-writes by WAL position against a fixed pin window, side by side, on a real
//! PostgreSQL primary with a streaming replica 200 ms behind (`recovery_min_apply_delay`).
//!
//! Workload, through the quickstart service in-process (layer, dual store, router, real
//! headers): each client owns one user and loops: think (exponential, mean `--think-ms`), then
//! 10% of the time write its settings (a new value each time), else read them back, checking
//! the value is the last one it wrote. Both policies run at the same time, on the same
//! servers, with the same number of clients:
//!
//! - `twintrack`: the token twintrack issues (the primary's WAL position after the write);
//!   a read goes to a replica that has replayed it, else the primary.
//! - `fixed 2 s window`: the common time-based approach: after a write, the client's reads go
//!   to the primary for 2 s, then to the replica. (Implemented with the same router, as a token
//!   that carries no WAL position and a 2 s window.)
//!
//! Stale read: a read that returned anything but the client's last written value. Ceiling: the
//! share of reads made at least 200 ms after the client's own last write, the most a replica
//! 200 ms behind can serve without a stale read.
//!
//! Run: `cargo bench --bench ryw` (starts its own PostgreSQL pair). Options:
//! `--think-ms N[,N...]` (default `100,250`), `--clients N` per policy (default 16),
//! `--seconds N` per pacing (default 30).

#[path = "../examples/quickstart/app.rs"]
mod app;
#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use repos::{SettingsResync, Users};
use serde_json::{Value, json};
use tower::ServiceExt;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore};
use twintrack::ryw::{HEADER, ReplicaOptions, ReplicaSet, Router, RywOptions, Token, TokenSigner};
use twintrack::{Database, Stage, TwinTrack};

const M: &str = "user_settings";
const SECRET: &[u8] = b"bench secret, at least 16 bytes.";
const LAG_MS: u64 = 200;
const WINDOW: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Tally {
    reads: AtomicU64,
    on_replica: AtomicU64,
    /// Reads made at least the replica's lag after the client's own last write: the most a
    /// replica that far behind could serve without a stale read.
    could_be_replica: AtomicU64,
    stale: AtomicU64,
    writes: AtomicU64,
    errors: AtomicU64,
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    Twintrack,
    FixedWindow,
}

struct Client {
    app: TwinTrack<axum::Router>,
    policy: Policy,
    id: i64,
    signer: TokenSigner,
    tally: Arc<Tally>,
    rng: u64,
}

impl Client {
    fn next(&mut self) -> f64 {
        // xorshift64*: uniform in [0, 1)
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        (self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }

    async fn call(&self, req: http::Request<Body>) -> Option<(http::HeaderMap, Value)> {
        let res = self.app.clone().oneshot(req).await.ok()?;
        if !res.status().is_success() {
            return None;
        }
        let headers = res.headers().clone();
        let bytes = res.into_body().collect().await.ok()?.to_bytes();
        Some((headers, serde_json::from_slice(&bytes).ok()?))
    }

    /// Runs until `until`, starting from the client's last written value and token; returns
    /// them for the next pacing.
    async fn run(
        mut self,
        think: Duration,
        until: Instant,
        mut last_written: String,
        mut token: Option<String>,
    ) -> (String, Option<String>) {
        let path = format!("/users/{}/settings", self.id);
        let mut wrote_at: Option<Instant> = None;
        let mut n = 0u64;
        while Instant::now() < until {
            let pause = -self.next().max(1e-9).ln() * think.as_secs_f64();
            tokio::time::sleep(Duration::from_secs_f64(pause.min(10.0))).await;
            n += 1;
            if self.next() < 0.1 {
                let value = format!("v{}-{n}", self.id);
                let req = http::Request::put(&path)
                    .body(Body::from(
                        json!({"theme": value, "notifications_enabled": true}).to_string(),
                    ))
                    .unwrap();
                let Some((headers, _)) = self.call(req).await else {
                    self.tally.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                last_written = value;
                wrote_at = Some(Instant::now());
                self.tally.writes.fetch_add(1, Ordering::Relaxed);
                let issued = headers
                    .get(HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                token = match self.policy {
                    Policy::Twintrack => issued,
                    // The same moment, no WAL position: the router pins for its window.
                    Policy::FixedWindow => issued.map(|t| self.window_token(&t)),
                };
            } else {
                if wrote_at.is_none_or(|at| at.elapsed() >= Duration::from_millis(LAG_MS)) {
                    self.tally.could_be_replica.fetch_add(1, Ordering::Relaxed);
                }
                let mut req = http::Request::get(&path);
                if let Some(token) = &token {
                    req = req.header(HEADER, token);
                }
                let Some((headers, body)) = self.call(req.body(Body::empty()).unwrap()).await
                else {
                    self.tally.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                self.tally.reads.fetch_add(1, Ordering::Relaxed);
                if headers.get("x-twintrack-read-from").map(|v| v.as_bytes()) == Some(b"replica") {
                    self.tally.on_replica.fetch_add(1, Ordering::Relaxed);
                }
                if body["theme"].as_str() != Some(last_written.as_str()) {
                    self.tally.stale.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        (last_written, token)
    }

    /// The issued token's cluster and time, without its WAL position.
    fn window_token(&self, issued: &str) -> String {
        let parts: Vec<&str> = issued.split('.').collect();
        let cluster = twintrack::ryw::ClusterId {
            system_identifier: parts[2].parse().unwrap(),
            timeline: parts[3].parse().unwrap(),
        };
        self.signer.sign(&Token {
            lsn: None,
            cluster,
            issued_at_ms: parts[4].parse().unwrap(),
        })
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

async fn service(
    primary: &Database,
    replicas: &ReplicaSet,
    flags: &FlagCache,
    window: Duration,
) -> TwinTrack<axum::Router> {
    let router = Router::builder(primary.clone(), SECRET)
        .replicas(replicas.clone())
        .options(RywOptions {
            fallback_window: window,
            ..RywOptions::default()
        })
        .build()
        .await
        .unwrap();
    let (legacy, new) = repos::repos::<sqlx::Postgres, i64>();
    let settings = DualStore::builder(
        M,
        legacy,
        new,
        primary.as_postgres().unwrap().clone(),
        flags.clone(),
        SettingsResync::default(),
    )
    .router(router.clone())
    .build()
    .unwrap();
    app::app(Users { settings }, flags.clone(), Some(router), true, None)
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks every bench target for its names.
    }
    let thinks: Vec<u64> = arg("--think-ms")
        .unwrap_or_else(|| "100,250".into())
        .split(',')
        .map(|v| v.parse().expect("--think-ms: milliseconds"))
        .collect();
    let clients: i64 = arg("--clients").map_or(16, |v| v.parse().expect("--clients N"));
    let seconds: u64 = arg("--seconds").map_or(30, |v| v.parse().expect("--seconds N"));

    let cluster = pg::Cluster::start(LAG_MS).expect("start PostgreSQL with a replica");
    let db = cluster.fresh_db().await;
    let primary = Database::connect(&db.url).await.unwrap();
    repos::create_shapes::<i64>(&primary).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(primary.clone()).await.unwrap());
    store.register(M, "bench").await.unwrap();
    let flags = FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let replicas =
        ReplicaSet::connect(primary.clone(), &db.replica_urls, ReplicaOptions::default())
            .await
            .unwrap();
    let twintrack_app = service(
        &primary,
        &replicas,
        &flags,
        RywOptions::default().fallback_window,
    )
    .await;
    let window_app = service(&primary, &replicas, &flags, WINDOW).await;

    // One user per client, created before the clock starts; wait for the replica to have them.
    let mut ids = Vec::new();
    for i in 0..clients * 2 {
        let res = twintrack_app
            .clone()
            .oneshot(
                http::Request::post("/users")
                    .body(Body::from(
                        json!({"email": format!("u{i}@bench"), "theme": "t0", "notifications_enabled": true})
                            .to_string(),
                    ))
                    .unwrap(),
            )
            .await
            .unwrap();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        ids.push(
            serde_json::from_slice::<Value>(&bytes).unwrap()["id"]
                .as_i64()
                .unwrap(),
        );
    }
    let lsn = replicas.primary_lsn().await.unwrap();
    while replicas.pick(Some(lsn)).is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!(
        "\nread-your-writes: {clients} clients per policy, 10% writes, replica {LAG_MS} ms behind, {seconds} s per pacing\n"
    );
    println!(
        "| think time (mean) | policy | reads | on replica | ceiling | stale reads | writes | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut state: Vec<(String, Option<String>)> = vec![("t0".to_owned(), None); ids.len()];
    for think in thinks {
        let until = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        let tallies = [Arc::new(Tally::default()), Arc::new(Tally::default())];
        for (c, id) in ids.iter().enumerate() {
            let policy = if c % 2 == 0 {
                Policy::Twintrack
            } else {
                Policy::FixedWindow
            };
            let client = Client {
                app: match policy {
                    Policy::Twintrack => twintrack_app.clone(),
                    Policy::FixedWindow => window_app.clone(),
                },
                policy,
                id: *id,
                signer: TokenSigner::new(SECRET, Duration::from_secs(30)).unwrap(),
                tally: tallies[c % 2].clone(),
                rng: 0x9e37_79b9_7f4a_7c15 ^ (*id as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9),
            };
            let (last, token) = state[c].clone();
            tasks.push(tokio::spawn(client.run(
                Duration::from_millis(think),
                until,
                last,
                token,
            )));
        }
        for (c, t) in tasks.into_iter().enumerate() {
            state[c] = t.await.unwrap();
        }
        for (name, tally) in [
            ("twintrack (WAL position)", &tallies[0]),
            ("fixed 2 s window", &tallies[1]),
        ] {
            let reads = tally.reads.load(Ordering::Relaxed);
            let share =
                |n: &AtomicU64| 100.0 * n.load(Ordering::Relaxed) as f64 / reads.max(1) as f64;
            println!(
                "| {think} ms | {name} | {reads} | {:.1}% | {:.1}% | {} | {} | {} |",
                share(&tally.on_replica),
                share(&tally.could_be_replica),
                tally.stale.load(Ordering::Relaxed),
                tally.writes.load(Ordering::Relaxed),
                tally.errors.load(Ordering::Relaxed),
            );
        }
        // Let the replica catch up between pacings so one does not start with the other's pins.
        tokio::time::sleep(Duration::from_millis(2 * LAG_MS + 500)).await;
    }
}
