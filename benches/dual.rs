//! Dual writes and shadow reads against single ones, on a real PostgreSQL with durable commits
//! (`fsync=on`, `synchronous_commit=on`), through the quickstart's repositories.
//!
//! Every variant runs in the same rounds, interleaved (so machine drift hits all alike), and
//! each operation's latency is kept: the table gives p50 and p99 and the ratio to the single
//! operation without twintrack. Two tables, one run: first with a 1 ms pause (untimed) before
//! each operation, which lets the previous one's background work finish (on a 2-core machine
//! that also runs PostgreSQL it would otherwise compete for CPU with the operation being
//! timed); then back to back, where it does. The last row, two plain reads at once with no
//! twintrack at all, is the floor for `concurrent` shadow reads on the machine at hand.
//!
//! Run: `cargo bench --bench dual` (starts its own PostgreSQL; set `DATABASE_URL` to use yours).

#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::Arc;
use std::time::{Duration, Instant};

use repos::{LegacySettings, NewSettings, Settings, SettingsRepo, SettingsResync, Users};
use sqlx::Postgres;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::shadow::{ShadowMode, ShadowOptions};
use twintrack::{Database, Stage};

const USERS: i64 = 1000;
const ROUNDS: usize = 20;
const PER_ROUND: usize = 100;

fn settings(i: usize) -> Settings {
    Settings {
        theme: format!("theme-{}", i % 7),
        notifications_enabled: i.is_multiple_of(2),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks every bench target for its names.
    }
    let cluster;
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => url,
        _ => {
            cluster = pg::Cluster::start_durable().expect("start a durable PostgreSQL");
            cluster.fresh_db().await.url
        }
    };
    let db = Database::connect(&url).await.unwrap();
    let pool = db.as_postgres().expect("a PostgreSQL database").clone();
    let durable: String = sqlx::query_scalar(
        "SELECT current_setting('fsync') || '/' || current_setting('synchronous_commit')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    repos::create_shapes::<i64>(&db).await.unwrap();
    let flags_store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    let mut builder = FlagCache::builder(flags_store.clone()).soft_ttl(Duration::from_secs(3600));
    for (name, stage) in [
        ("bench_dual", Stage::DualWrite),
        ("bench_shadow", Stage::Shadow),
        ("bench_legacy", Stage::LegacyOnly),
    ] {
        flags_store.register(name, "bench").await.unwrap();
        if stage != Stage::LegacyOnly {
            flags_store
                .set_stage(StageChange::new(name, stage, "bench", "bench").force(true))
                .await
                .unwrap();
        }
        builder = builder.migration(name, Stage::LegacyOnly);
    }
    let flags = builder.build().await;
    let (legacy, new) = repos::repos::<Postgres, i64>();
    let store = |name: &str, mode: ShadowMode| Users {
        settings: DualStore::builder(
            name,
            legacy.clone(),
            new.clone(),
            pool.clone(),
            flags.clone(),
            SettingsResync::default(),
        )
        .shadow(ShadowOptions {
            mode,
            ..ShadowOptions::default()
        })
        .build()
        .unwrap(),
    };
    let dual = store("bench_dual", ShadowMode::Serial);
    let concurrent = store("bench_shadow", ShadowMode::Concurrent);
    let background = store("bench_shadow", ShadowMode::Background);
    let snapshot = store("bench_shadow", ShadowMode::Snapshot);
    let unshadowed = store("bench_legacy", ShadowMode::Serial);

    // Users with the same settings on both sides (created through dual writes).
    let mut ids = Vec::new();
    for i in 0..USERS as usize {
        ids.push(
            dual.create(&format!("bench{i}@example.com"), settings(i))
                .await
                .unwrap(),
        );
    }
    let plain: Arc<dyn SettingsRepo<Postgres, i64>> = Arc::new(LegacySettings);
    let new_plain: Arc<dyn SettingsRepo<Postgres, i64>> =
        Arc::new(NewSettings { standalone: false });

    let names = [
        "write: single (no twintrack)",
        "write: dual, one transaction",
        "read: single (no twintrack)",
        "read: twintrack, no shadow",
        "read: shadow concurrent",
        "read: shadow background",
        "read: shadow snapshot",
        "read: two at once (no twintrack)",
    ];
    println!(
        "\ntwintrack dual bench: PostgreSQL fsync/synchronous_commit = {durable}; {} ops per variant, {ROUNDS} interleaved rounds",
        ROUNDS * PER_ROUND
    );
    let mut n = 0usize;
    for pause in [true, false] {
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
        for _ in 0..ROUNDS {
            for (v, sample) in samples.iter_mut().enumerate() {
                for _ in 0..PER_ROUND {
                    n += 1;
                    // Plain single writes touch only legacy: keep them on their own half of the
                    // users, so they never make the compared rows diverge.
                    let half = ids.len() / 2;
                    let id = if v == 0 {
                        ids[half + n % half]
                    } else {
                        ids[n % half]
                    };
                    let s = settings(n);
                    if pause {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let start = Instant::now();
                    match v {
                        0 => {
                            let mut tx = pool.begin().await.unwrap();
                            assert!(plain.put(&mut tx, id, s).await.unwrap());
                            tx.commit().await.unwrap();
                        }
                        1 => dual.update(&id, s).await.unwrap(),
                        2 => {
                            let mut conn = pool.acquire().await.unwrap();
                            plain.get(&mut conn, id, false).await.unwrap().unwrap();
                        }
                        3 => drop(unshadowed.settings(&id).await.unwrap()),
                        4 => drop(concurrent.settings(&id).await.unwrap()),
                        5 => drop(background.settings(&id).await.unwrap()),
                        6 => drop(snapshot.settings(&id).await.unwrap()),
                        _ => {
                            // The floor for `concurrent`: both shapes read at once, by hand, the
                            // best way found (the second read on a task of its own, and both
                            // connections released once both reads are done).
                            let (other_pool, new_plain) = (pool.clone(), new_plain.clone());
                            let other = tokio::spawn(async move {
                                let mut conn = other_pool.acquire().await.unwrap();
                                new_plain.get(&mut conn, id, false).await.unwrap().unwrap();
                                conn
                            });
                            let mut conn = pool.acquire().await.unwrap();
                            plain.get(&mut conn, id, false).await.unwrap().unwrap();
                            let other = other.await.unwrap();
                            drop((conn, other));
                        }
                    }
                    sample.push(start.elapsed());
                }
            }
        }
        if pause {
            println!(
                "\neach operation started on an idle machine (an untimed 1 ms pause before it)"
            );
        } else {
            println!("\nback to back (no pause: background work overlaps the next operation)");
        }
        table(&names, &mut samples);
    }
}

fn table(names: &[&str], samples: &mut [Vec<Duration>]) {
    println!(
        "{:<34} {:>10} {:>10} {:>9} {:>9}",
        "variant", "p50", "p99", "p50 ×", "p99 ×"
    );
    let mut base = (Duration::ZERO, Duration::ZERO);
    for (v, sample) in samples.iter_mut().enumerate() {
        sample.sort();
        let (p50, p99) = (percentile(sample, 0.5), percentile(sample, 0.99));
        if v == 0 || v == 2 {
            base = (p50, p99);
        }
        println!(
            "{:<34} {:>8.0}µs {:>8.0}µs {:>9.2} {:>9.2}",
            names[v],
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            p50.as_secs_f64() / base.0.as_secs_f64(),
            p99.as_secs_f64() / base.1.as_secs_f64(),
        );
    }
}
