//! The chaos run: the quickstart's service under load while stages flip and parts fail, then a
//! count of what went wrong. `cargo run --release --example chaos -- --seconds 60`
//!
//! It provisions its own PostgreSQL: a primary with a streaming replica 200 ms behind (users,
//! the legacy shape, twintrack's tables) and a second server holding the new shape
//! (two-database mode). For `--seconds` it drives `--clients` concurrent clients (default 200)
//! through the quickstart's HTTP routes in-process: creates, updates, deletes and reads of the
//! users each client owns, reading with the read-your-writes token of its last write. At the
//! same time it:
//!
//! - flips the stage every 100 ms between `legacy_only` and `dual_write`; or, with
//!   `--walk-stages`, walks every stage the way an operator would, gates included:
//!   `legacy_only` → `dual_write` → a backfill to the end and a cross-database `verify
//!   --repair` (again until clean) → `shadow` → `live` → `ramp_down`, every other cycle on to
//!   `new_only` and back to `ramp_down` with a reverse backfill, then rollbacks down to
//!   `legacy_only` (each move checked by the transition rules). The load then goes on past
//!   `--seconds` until the walk has visited all six stages, `--max-seconds` (default 240) in
//!   all. CI runs both modes (15 s, and 30 s then on to every stage).
//! - stops and restarts the new-shape server, and the replica;
//! - starts a backfill and kills it, over and over.
//!
//! Then it stops the faults, moves to `dual_write` (through `ramp_down` and a reverse backfill
//! if it stopped in `new_only`), backfills to the end, lets the repair worker
//! drain every intent, compares both shapes for every user, and prints one line:
//!
//! `divergent_rows=N stale_reads=N lost_writes=N stages_visited=N requests=N errors=N`
//!
//! - divergent_rows: users whose settings differ between the shapes;
//! - stale_reads: reads made with the client's token that did not see its own last write;
//! - lost_writes: users whose acknowledged settings are not what the authoritative (legacy)
//!   side holds;
//! - stages_visited: distinct stages the migration was in during the run (6 at most);
//! - errors: requests answered 5xx (a write that failed this way leaves both outcomes possible).
//!
//! Exit 0 only when the first three are all 0.
//!
//! For diagnosing the walk: `CHAOS_VERBOSE=1` prints each move, backfill, verify and outage,
//! and for each user counted stale or lost its requests (start..end ms, method, status, value);
//! `CHAOS_FIRST_PLAN=1` starts with the cycle that skips `new_only`; `CHAOS_NO_LO=1` walks
//! only `shadow`, `live` and `ramp_down` (authority moving with no single-sided stage).

#[path = "quickstart/app.rs"]
mod app;
#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "quickstart/repos.rs"]
mod repos;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use http_body_util::BodyExt;
use repos::{LegacySettings, NewSettings, Settings, SettingsRepo, SettingsResync, Users};
use serde_json::{Value, json};
use tower::ServiceExt;
use twintrack::backfill::BackfillOptions;
use twintrack::config::Config;
use twintrack::db::ConnectOptions;
use twintrack::db::query;
use twintrack::definition::Direction;
use twintrack::dual::{DualStore, pending_intents};
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::ryw::{ReplicaOptions, ReplicaSet, Router};
use twintrack::verify::VerifyOptions;
use twintrack::{Database, Stage, TwinTrack};

const M: &str = "user_settings";

/// `CHAOS_VERBOSE`: every request on each user (start and end in ms since the run began,
/// method, status, value), printed for a user counted stale or lost.
static HISTORY: std::sync::Mutex<Option<History>> = std::sync::Mutex::new(None);

/// When the run began, and each user's requests.
type History = (Instant, HashMap<i64, Vec<String>>);

fn note(id: i64, started: Instant, what: String) {
    if let Some((t0, map)) = HISTORY.lock().unwrap().as_mut() {
        let (a, b) = (
            started.duration_since(*t0).as_millis(),
            t0.elapsed().as_millis(),
        );
        map.entry(id).or_default().push(format!("{a}..{b} {what}"));
    }
}

fn verbose() -> bool {
    std::env::var_os("CHAOS_VERBOSE").is_some()
}

fn history(id: i64) -> String {
    HISTORY
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|(_, map)| map.get(&id))
        .map(|h| h.join("\n    "))
        .unwrap_or_default()
}
const SEEDED: i64 = 2_000;

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

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    errors: AtomicU64,
    stale: AtomicU64,
    checked_reads: AtomicU64,
    flips: AtomicU64,
    backfill_kills: AtomicU64,
    outages: AtomicU64,
    verifies: AtomicU64,
    clean_verifies: AtomicU64,
}

/// What a user's settings may be after the client's acknowledged (and failed) writes: one
/// state, or several after a write whose outcome is unknown.
type Candidates = Vec<Option<Settings>>;

struct Client {
    app: TwinTrack<axum::Router>,
    index: u64,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    users: HashMap<i64, Candidates>,
    token: Option<(String, Instant)>,
    rng: u64,
}

impl Client {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<Value>,
        with_token: bool,
    ) -> (u16, Value) {
        let mut req = http::Request::builder().method(method).uri(path);
        if with_token && let Some((token, _)) = &self.token {
            req = req.header("x-twintrack-ryw", token);
        }
        let body = body.map_or_else(Body::empty, |v| Body::from(v.to_string()));
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        let res = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        if status >= 500 {
            self.counts.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(token) = res
            .headers()
            .get("x-twintrack-ryw")
            .and_then(|v| v.to_str().ok())
        {
            self.token = Some((token.to_owned(), Instant::now()));
        }
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    fn settings(&mut self) -> Settings {
        let n = self.next();
        Settings {
            theme: format!("c{}-{}", self.index, n % 1_000_000),
            notifications_enabled: n.is_multiple_of(2),
        }
    }

    async fn run(mut self) -> HashMap<i64, Candidates> {
        let mut created = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let roll = self.next() % 100;
            let ids: Vec<i64> = self.users.keys().copied().collect();
            let id = if ids.is_empty() {
                None
            } else {
                Some(ids[(self.next() % ids.len() as u64) as usize])
            };
            match (roll, id) {
                (0..10, _) | (_, None) => {
                    let s = self.settings();
                    created += 1;
                    let email = format!("c{}-{created}@chaos", self.index);
                    let body = json!({"email": email, "theme": s.theme, "notifications_enabled": s.notifications_enabled});
                    let t = Instant::now();
                    let (status, body) = self.call("POST", "/users", Some(body), false).await;
                    if status == 201
                        && let Some(id) = body["id"].as_i64()
                    {
                        note(id, t, format!("POST {status} {}", s.theme));
                        self.users.insert(id, vec![Some(s)]);
                    }
                }
                (10..35, Some(id)) => {
                    let s = self.settings();
                    let body =
                        json!({"theme": s.theme, "notifications_enabled": s.notifications_enabled});
                    let t = Instant::now();
                    let (status, _) = self
                        .call("PUT", &format!("/users/{id}/settings"), Some(body), false)
                        .await;
                    note(id, t, format!("PUT {status} {}", s.theme));
                    let states = self.users.get_mut(&id).unwrap();
                    match status {
                        200 => *states = vec![Some(s)],
                        404 => {}
                        _ => states.push(Some(s)),
                    }
                }
                (35..40, Some(id)) => {
                    let t = Instant::now();
                    let (status, _) = self
                        .call("DELETE", &format!("/users/{id}"), None, false)
                        .await;
                    note(id, t, format!("DELETE {status}"));
                    let states = self.users.get_mut(&id).unwrap();
                    match status {
                        204 | 404 => *states = vec![None],
                        _ => states.push(None),
                    }
                }
                (_, Some(id)) => {
                    // Reads check read-your-writes only while the token is fresh (30 s TTL).
                    let fresh = self
                        .token
                        .as_ref()
                        .is_some_and(|(_, at)| at.elapsed() < Duration::from_secs(25));
                    let t = Instant::now();
                    let (status, body) = self
                        .call("GET", &format!("/users/{id}/settings"), None, true)
                        .await;
                    note(id, t, format!("GET {status} {}", body["theme"]));
                    let seen = match status {
                        200 => serde_json::from_value::<Settings>(body).ok(),
                        404 => None,
                        _ => continue,
                    };
                    if fresh {
                        self.counts.checked_reads.fetch_add(1, Ordering::Relaxed);
                        if !self.users[&id].contains(&seen) {
                            self.counts.stale.fetch_add(1, Ordering::Relaxed);
                            eprintln!(
                                "stale read: user {id} showed {seen:?}, expected one of {:?}\n    {}",
                                self.users[&id],
                                history(id)
                            );
                        }
                    }
                }
            }
        }
        self.users
    }
}

/// Repair passes until no intent is left in either database (at most 60 s).
async fn drain(
    dual: &repos::SettingsStore<sqlx::Postgres, i64>,
    legacy_db: &Database,
    new_db: &Database,
) {
    let started = Instant::now();
    loop {
        let _ = dual.repair(Duration::ZERO).await;
        let left = pending_intents(legacy_db, M).await.unwrap()
            + pending_intents(new_db, M).await.unwrap();
        if left == 0 {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{left} repair intents never drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The repair pass as a boxed `Send` future (spawning the generic one directly trips a rustc
/// limitation with higher-ranked lifetimes and trait objects).
fn repair_once(
    dual: &repos::SettingsStore<sqlx::Postgres, i64>,
    min_age: Duration,
) -> twintrack::flags::BoxFuture<'_, twintrack::Result<twintrack::dual::RepairReport>> {
    Box::pin(dual.repair(min_age))
}

/// A backfill of the store in `direction`, to the end, as a boxed `Send` future.
fn backfill_once(
    dual: &repos::SettingsStore<sqlx::Postgres, i64>,
    direction: Direction,
) -> twintrack::flags::BoxFuture<'_, twintrack::Result<twintrack::backfill::BackfillReport>> {
    Box::pin(dual.backfill(
        BackfillOptions {
            direction,
            batch_size: 500,
            workers: 2,
            lease: Duration::from_secs(2),
            ..BackfillOptions::default()
        },
        |p| {
            if verbose() {
                eprintln!(
                    "chaos: backfill progress: keys {}/{}, chunks {}/{}, batch {}",
                    p.keys_done, p.keys_total, p.chunks_done, p.chunks, p.batch_size
                );
            }
        },
    ))
}

async fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f).await.unwrap();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors only (each 5xx logs its cause); RUST_LOG widens it.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let seconds = arg("--seconds", 60);
    let walk = std::env::args().any(|a| a == "--walk-stages");
    let clients = arg("--clients", 200);
    let max_seconds = arg("--max-seconds", 240);
    let started = Instant::now();
    if verbose() {
        *HISTORY.lock().unwrap() = Some((started, HashMap::new()));
    }

    let main_cluster = Arc::new(
        pg::Cluster::start_with(vec![pg::ReplicaSpec::delayed(200)]).expect("start PostgreSQL"),
    );
    let new_server =
        Arc::new(pg::Cluster::start_with(vec![]).expect("start the new-shape PostgreSQL"));
    let legacy_t = main_cluster.fresh_db().await;
    let new_t = new_server.fresh_db().await;
    let options = |max| ConnectOptions {
        max_connections: max,
        acquire_timeout: Duration::from_secs(2),
    };
    let legacy_db = Database::connect_with(&legacy_t.url, options(40))
        .await
        .unwrap();
    let new_db = Database::connect_with(&new_t.url, options(20))
        .await
        .unwrap();
    repos::create_shapes::<i64>(&legacy_db).await.unwrap();
    repos::create_shapes::<i64>(&new_db).await.unwrap();
    twintrack::schema::install(&new_db).await.unwrap();
    let store = Arc::new(
        SqlFlagStore::open(legacy_db.clone())
            .await
            .unwrap()
            .intents_also_in(new_db.clone()),
    );
    store.register(M, "chaos").await.unwrap();
    store
        .set_stage(StageChange::new(
            M,
            Stage::DualWrite,
            "chaos",
            "dual writes on",
        ))
        .await
        .unwrap();
    // Users that exist before dual writes: only a backfill brings them to the new shape.
    query(
        "INSERT INTO users (email, profile) SELECT 'seed' || g || '@chaos',
                jsonb_build_object('theme', 'seed', 'notifications_enabled', true)
         FROM generate_series(1, $1) AS g",
    )
    .bind(SEEDED)
    .execute(&legacy_db)
    .await
    .unwrap();

    let flags = FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let replicas = ReplicaSet::connect(
        legacy_db.clone(),
        &legacy_t.replica_urls,
        ReplicaOptions {
            poll_interval: Duration::from_millis(50),
            poll_timeout: Duration::from_millis(500),
            ..ReplicaOptions::default()
        },
    )
    .await
    .unwrap();
    // Start once the replica has the schema and the seeded users, as a real service would.
    let lsn = replicas.primary_lsn().await.unwrap();
    while replicas.pick(Some(lsn)).is_none() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let router = Router::builder(
        legacy_db.clone(),
        b"chaos run secret, at least 16 b".to_vec(),
    )
    .replicas(replicas)
    .build()
    .await
    .unwrap();
    let config = Config::parse(include_str!("quickstart.toml")).unwrap();
    let definition = config
        .migration(M)
        .unwrap()
        .definition(twintrack::Backend::Postgres)
        .unwrap();
    let (legacy, new) = repos::split_repos::<sqlx::Postgres, i64>();
    let dual = DualStore::builder(
        M,
        legacy,
        new,
        legacy_db.as_postgres().unwrap().clone(),
        flags.clone(),
        SettingsResync::default(),
    )
    .new_database(new_db.as_postgres().unwrap().clone())
    .router(router.clone())
    .definition(definition.clone())
    .build()
    .unwrap();
    // The walk's backfills and verifies run as an operator's `twintrack backfill` and
    // `twintrack verify` would: a process of their own, with pools of their own beside the
    // service's (sharing its 200 clients' pools, a batch waited seconds for a connection).
    let operator_legacy_db = Database::connect_with(&legacy_t.url, options(6))
        .await
        .unwrap();
    let operator_new_db = Database::connect_with(&new_t.url, options(6))
        .await
        .unwrap();
    let operator = DualStore::builder(
        M,
        repos::split_repos::<sqlx::Postgres, i64>().0,
        repos::split_repos::<sqlx::Postgres, i64>().1,
        operator_legacy_db.as_postgres().unwrap().clone(),
        flags.clone(),
        SettingsResync::default(),
    )
    .new_database(operator_new_db.as_postgres().unwrap().clone())
    .definition(definition.clone())
    .build()
    .unwrap();
    let app = app::app(
        Users {
            settings: dual.clone(),
        },
        flags.clone(),
        Some(router),
        false,
        None,
    );

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut background = Vec::new();

    let visited = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::from([
        Stage::DualWrite,
    ])));
    // Without --walk-stages: stage flips every 100 ms between legacy_only and dual_write (the
    // moves that keep legacy authoritative).
    if !walk {
        let (store, stop, counts, visited) =
            (store.clone(), stop.clone(), counts.clone(), visited.clone());
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(record) = store.get(M).await else {
                    continue;
                };
                let to = if record.state.stage == Stage::LegacyOnly {
                    Stage::DualWrite
                } else {
                    Stage::LegacyOnly
                };
                if store
                    .set_stage(StageChange::new(M, to, "chaos", "flip"))
                    .await
                    .is_ok()
                {
                    counts.flips.fetch_add(1, Ordering::Relaxed);
                    visited.lock().unwrap().insert(to);
                }
            }
        }));
    }
    // With --walk-stages: the stage walker (an operator: backfills in a process of its own).
    if walk {
        let (store, stop, counts, dual, visited) = (
            store.clone(),
            stop.clone(),
            counts.clone(),
            operator.clone(),
            visited.clone(),
        );
        let (legacy_db, new_db, definition) = (
            operator_legacy_db.clone(),
            operator_new_db.clone(),
            definition.clone(),
        );
        background.push(tokio::spawn(async move {
            use Stage::*;
            // Every other cycle goes on to new_only and comes back with a reverse backfill.
            let plans: [&[Stage]; 2] = [
                &[
                    Shadow, Live, RampDown, NewOnly, RampDown, Live, Shadow, DualWrite, LegacyOnly,
                    DualWrite,
                ],
                &[
                    Shadow, Live, RampDown, Shadow, DualWrite, LegacyOnly, DualWrite,
                ],
            ];
            let plans: [&[Stage]; 2] = if std::env::var_os("CHAOS_NO_LO").is_some() {
                [
                    &[Shadow, Live, RampDown, Shadow],
                    &[Live, RampDown, Live, Shadow],
                ]
            } else {
                plans
            };
            let mut cycle = std::env::var("CHAOS_FIRST_PLAN")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0usize);
            let mut step = 0usize;
            let mut came_from_new_only = false;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let plan = plans[cycle % 2];
                let to = plan[step];
                let Ok(record) = store.get(M).await else {
                    continue;
                };
                let from = record.state.stage;
                // Back in ramp_down from new_only: legacy missed writes; a reverse backfill
                // first (the rules refuse reading legacy again without one).
                if from == RampDown && came_from_new_only {
                    let done = backfill_once(&dual, Direction::Reverse).await;
                    if verbose() {
                        eprintln!(
                            "chaos: reverse backfill: {:?}",
                            done.as_ref().map(|r| (r.rows_copied, r.finished))
                        );
                    }
                    if done.is_err() {
                        continue;
                    }
                    came_from_new_only = false;
                }
                match store
                    .set_stage(StageChange::new(M, to, "chaos", "walk"))
                    .await
                {
                    Ok(_) => {
                        if verbose() {
                            eprintln!("chaos: {from} -> {to} at {:?}", started.elapsed());
                        }
                        counts.flips.fetch_add(1, Ordering::Relaxed);
                        visited.lock().unwrap().insert(to);
                        came_from_new_only = from == NewOnly;
                        step += 1;
                        if step == plan.len() {
                            step = 0;
                            cycle += 1;
                        }
                    }
                    // The gate into shadow: a finished backfill and a clean verify, then again.
                    Err(twintrack::Error::Refused(why)) if to == Shadow && from == DualWrite => {
                        if verbose() {
                            eprintln!("chaos: shadow refused: {why}");
                        }
                        let t = Instant::now();
                        let done = backfill_once(&dual, Direction::Forward).await;
                        if verbose() {
                            eprintln!(
                                "chaos: backfill took {:?}: {:?}",
                                t.elapsed(),
                                done.as_ref().map(|r| (r.rows_copied, r.finished))
                            );
                        }
                        if let Err(err) = done {
                            if verbose() {
                                eprintln!("chaos: backfill: {err}");
                            }
                            continue;
                        }
                        let _ = dual.repair(Duration::ZERO).await;
                        let verified = twintrack::verify::run_across(
                            &legacy_db,
                            &new_db,
                            &*store,
                            &definition,
                            // As an operator would under load: what differs (second sides
                            // still waiting for the new server) is re-synced from legacy.
                            VerifyOptions {
                                segments: 8,
                                parallel: 2,
                                repair: true,
                                // Longer than an outage of the new server: second sides held
                                // up by one land before the second look.
                                recheck_delay: Duration::from_secs(2),
                                ..VerifyOptions::default()
                            },
                            twintrack::metrics::Metrics::global(),
                            None,
                        )
                        .await;
                        counts.verifies.fetch_add(1, Ordering::Relaxed);
                        if verbose() {
                            eprintln!("chaos: verify took {:?}", t.elapsed());
                            eprintln!("chaos: verify: {:?}", verified.as_ref().map(|r| r.lines()));
                        }
                        if verified.is_ok_and(|r| r.clean) {
                            counts.clean_verifies.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Writes acknowledged on a side the move would serve have not landed there:
                    // as the remedy says, replay the intents (an operator's `verify --repair`
                    // or a repair pass), then retry.
                    Err(twintrack::Error::Refused(why))
                        if why.reason.contains("repair intents") =>
                    {
                        if verbose() {
                            eprintln!("chaos: {from} -> {to} refused: {why}");
                        }
                        let replayed = dual.repair(Duration::ZERO).await;
                        if verbose() {
                            eprintln!("chaos: repair pass: {replayed:?}");
                        }
                    }
                    Err(err) => eprintln!("chaos: {from} -> {to} refused: {err}"),
                }
            }
        }));
    }
    // The repair worker.
    {
        let (dual, stop) = (dual.clone(), stop.clone());
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = repair_once(&dual, Duration::from_millis(300)).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }
    // Outages: the new-shape server, then the replica.
    {
        let (main_cluster, new_server, stop, counts) = (
            main_cluster.clone(),
            new_server.clone(),
            stop.clone(),
            counts.clone(),
        );
        background.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let s = new_server.clone();
                blocking(move || s.stop_primary()).await;
                if verbose() {
                    eprintln!("chaos: new server stopped at {:?}", started.elapsed());
                }
                counts.outages.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(800)).await;
                let s = new_server.clone();
                blocking(move || s.start_primary()).await;
                if verbose() {
                    eprintln!("chaos: new server started at {:?}", started.elapsed());
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let c = main_cluster.clone();
                blocking(move || c.stop_replica(0)).await;
                counts.outages.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(800)).await;
                let c = main_cluster.clone();
                blocking(move || c.start_replica(0)).await;
            }
        }));
    }
    // A backfill, started and killed over and over.
    {
        let (dual, stop, counts) = (dual.clone(), stop.clone(), counts.clone());
        background.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let run = {
                    let dual = dual.clone();
                    tokio::spawn(async move {
                        let options = BackfillOptions {
                            batch_size: 100,
                            workers: 2,
                            lease: Duration::from_secs(2),
                            ..BackfillOptions::default()
                        };
                        dual.backfill(options, |_| {}).await
                    })
                };
                tokio::time::sleep(Duration::from_millis(400 + (round * 37) % 700)).await;
                run.abort();
                counts.backfill_kills.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }));
    }

    // The clients: each owns the seeded users with id ≡ its index (mod clients).
    let mut tasks = Vec::new();
    for index in 0..clients {
        let users = (1..=SEEDED)
            .filter(|id| (*id as u64) % clients == index)
            .map(|id| {
                (
                    id,
                    vec![Some(Settings {
                        theme: "seed".into(),
                        notifications_enabled: true,
                    })],
                )
            })
            .collect();
        let client = Client {
            app: app.clone(),
            index,
            counts: counts.clone(),
            stop: stop.clone(),
            users,
            token: None,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (index + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9),
        };
        tasks.push(tokio::spawn(client.run()));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    // With --walk-stages, the load goes on until the walk has visited every stage (a slow or
    // shared machine needs longer for the same walk), at most --max-seconds in all.
    while walk
        && visited.lock().unwrap().len() < Stage::ALL.len()
        && started.elapsed() < Duration::from_secs(max_seconds.max(seconds))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut model: HashMap<i64, Candidates> = HashMap::new();
    for task in tasks {
        model.extend(task.await.unwrap());
    }
    for task in background {
        let _ = task.await;
    }
    let load_ended = started.elapsed();

    // Settle: every server up, dual writes on, a complete backfill, every intent repaired.
    let s = new_server.clone();
    blocking(move || s.start_primary_if_stopped()).await;
    let c = main_cluster.clone();
    blocking(move || c.start_replica_if_stopped(0)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Back to dual_write the way an operator would: out of new_only through ramp_down, with a
    // reverse backfill before legacy is authoritative again.
    loop {
        let stage = store.get(M).await.unwrap().state.stage;
        if stage == Stage::DualWrite {
            break;
        }
        if stage == Stage::NewOnly {
            store
                .set_stage(StageChange::new(M, Stage::RampDown, "chaos", "settle"))
                .await
                .unwrap();
            continue;
        }
        match store
            .set_stage(StageChange::new(M, Stage::DualWrite, "chaos", "settle"))
            .await
        {
            Ok(_) => {}
            Err(twintrack::Error::Refused(why)) if why.reason.contains("repair intents") => {
                drain(&dual, &legacy_db, &new_db).await;
            }
            Err(twintrack::Error::Refused(_)) => {
                flags.refresh().await.unwrap();
                backfill_once(&dual, Direction::Reverse)
                    .await
                    .expect("the settling reverse backfill");
            }
            Err(err) => panic!("settling to dual_write: {err}"),
        }
    }
    flags.refresh().await.unwrap();
    // The service's repair worker stopped with the load: drained here, as it would have been,
    // before the backfill (which waits for intents that would make legacy an unsafe source).
    drain(&dual, &legacy_db, &new_db).await;
    let report = dual
        .backfill(
            BackfillOptions {
                workers: 2,
                lease: Duration::from_secs(2),
                ..BackfillOptions::default()
            },
            |_| {},
        )
        .await
        .expect("the final backfill");
    drain(&dual, &legacy_db, &new_db).await;

    // Verify: every user, both shapes; and every acknowledged write on the authoritative side.
    let legacy_repo = LegacySettings;
    let new_repo = NewSettings { standalone: true };
    let legacy_pool = legacy_db.as_postgres().unwrap();
    let new_pool = new_db.as_postgres().unwrap();
    let mut ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM users")
        .fetch_all(legacy_pool)
        .await
        .unwrap();
    ids.extend(
        sqlx::query_scalar::<_, i64>("SELECT user_id FROM user_settings")
            .fetch_all(new_pool)
            .await
            .unwrap(),
    );
    ids.extend(model.keys().copied());
    ids.sort_unstable();
    ids.dedup();
    let (mut lc, mut nc) = (
        legacy_pool.acquire().await.unwrap(),
        new_pool.acquire().await.unwrap(),
    );
    let (mut divergent, mut lost) = (0u64, 0u64);
    for id in &ids {
        let l = SettingsRepo::<sqlx::Postgres, i64>::get(&legacy_repo, &mut lc, *id, false)
            .await
            .unwrap();
        let n = SettingsRepo::<sqlx::Postgres, i64>::get(&new_repo, &mut nc, *id, false)
            .await
            .unwrap();
        if l != n {
            divergent += 1;
            eprintln!("divergent: user {id}: legacy {l:?}, new {n:?}");
        }
        if let Some(expected) = model.get(id)
            && !expected.contains(&l)
        {
            lost += 1;
            eprintln!(
                "lost write: user {id}: legacy {l:?}, acknowledged {expected:?}\n    {}",
                history(*id)
            );
        }
    }
    let c = &counts;
    eprintln!(
        "chaos: {seconds} s of load ({:.1} s), {} clients, {} users checked; {} stage moves ({} verifies across, {} clean), {} outages, {} backfill kills; {} reads checked with the token; final backfill copied {} rows; settled in {:.1} s",
        load_ended.as_secs_f64(),
        clients,
        ids.len(),
        c.flips.load(Ordering::Relaxed),
        c.verifies.load(Ordering::Relaxed),
        c.clean_verifies.load(Ordering::Relaxed),
        c.outages.load(Ordering::Relaxed),
        c.backfill_kills.load(Ordering::Relaxed),
        c.checked_reads.load(Ordering::Relaxed),
        report.rows_copied,
        (started.elapsed() - load_ended).as_secs_f64(),
    );
    let stale = c.stale.load(Ordering::Relaxed);
    println!(
        "divergent_rows={divergent} stale_reads={stale} lost_writes={lost} stages_visited={} requests={} errors={}",
        visited.lock().unwrap().len(),
        c.requests.load(Ordering::Relaxed),
        c.errors.load(Ordering::Relaxed)
    );
    if divergent == 0 && stale == 0 && lost == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
