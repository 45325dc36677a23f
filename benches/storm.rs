//! A mismatch storm: every compared read mismatching (the new shape fully divergent), 32
//! clients on one pool of 10 connections, on a real PostgreSQL with durable commits. Shadow
//! bookkeeping (re-reads of each mismatch, recording) must not take the requests' connections:
//! the goal is p99 with every read mismatching at most 1.5× p99 with shadow reads off.
//!
//! Four variants, interleaved in rounds (2 s of closed-loop load each), same run:
//! - shadow reads off (sample rate 0): the baseline;
//! - `background` shadow reads, every read compared and mismatching;
//! - `serial` shadow reads, every read compared and mismatching;
//! - `serial` shadow reads, every read compared and matching (serial puts both reads on the
//!   request's path, so this is its own baseline: the storm's bookkeeping is the difference).
//!
//! Run: `cargo bench --bench storm` (starts its own PostgreSQL; set `DATABASE_URL` to use yours).

#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::Arc;
use std::time::{Duration, Instant};

use repos::{Settings, SettingsResync, Users};
use sqlx::Postgres;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange, TuningChange};
use twintrack::shadow::{ShadowMode, ShadowOptions};
use twintrack::{Database, Stage};

const USERS: usize = 1000;
const CLIENTS: usize = 32;
const POOL: u32 = 10;
const ROUNDS: usize = 5;
const ROUND: Duration = Duration::from_secs(2);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cluster;
    let url = match std::env::var("DATABASE_URL") {
        Ok(url) if url.starts_with("postgres") => url,
        _ => {
            cluster = pg::Cluster::start_durable().expect("start a durable PostgreSQL");
            cluster.fresh_db().await.url
        }
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(POOL)
        .connect(&url)
        .await
        .unwrap();
    let db = Database::from(pool.clone());
    repos::create_shapes::<i64>(&db).await.unwrap();
    let flags_store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    let mut builder = FlagCache::builder(flags_store.clone()).soft_ttl(Duration::from_secs(3600));
    for (name, stage, rate) in [
        ("storm_setup", Stage::DualWrite, 1.0),
        ("storm_off", Stage::Shadow, 0.0),
        ("storm_on", Stage::Shadow, 1.0),
    ] {
        flags_store.register(name, "bench").await.unwrap();
        flags_store
            .set_stage(StageChange::new(name, stage, "bench", "bench").force(true))
            .await
            .unwrap();
        flags_store
            .tune(TuningChange {
                migration: name.into(),
                shadow_sample_rate: Some(rate),
                read_rollout_percent: None,
                expected_version: None,
                actor: "bench".into(),
                reason: "bench".into(),
            })
            .await
            .unwrap();
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
    let setup = store("storm_setup", ShadowMode::Serial);
    let mut ids = Vec::new();
    for i in 0..USERS {
        let s = Settings {
            theme: format!("theme-{}", i % 7),
            notifications_enabled: i % 2 == 0,
        };
        ids.push(
            setup
                .create(&format!("storm{i}@example.com"), s)
                .await
                .unwrap(),
        );
    }
    // The first half diverges entirely in the new shape; the second half matches.
    let (diverged, matching) = ids.split_at(USERS / 2);
    sqlx::query("UPDATE user_settings SET theme = theme || '-diverged' WHERE user_id = ANY($1)")
        .bind(diverged)
        .execute(&pool)
        .await
        .unwrap();
    let variants: Vec<(&str, Users<Postgres, i64>, Vec<i64>)> = vec![
        (
            "shadow reads off",
            store("storm_off", ShadowMode::Serial),
            diverged.to_vec(),
        ),
        (
            "background, every read mismatching",
            store("storm_on", ShadowMode::Background),
            diverged.to_vec(),
        ),
        (
            "serial, every read mismatching",
            store("storm_on", ShadowMode::Serial),
            diverged.to_vec(),
        ),
        (
            "serial, every read matching",
            store("storm_on", ShadowMode::Serial),
            matching.to_vec(),
        ),
    ];
    println!(
        "\ntwintrack storm bench: {CLIENTS} clients, pool of {POOL}, {ROUNDS} rounds of {ROUND:?} per variant, interleaved"
    );
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    for _ in 0..ROUNDS {
        for (v, (_, users, keys)) in variants.iter().enumerate() {
            let until = Instant::now() + ROUND;
            let clients: Vec<_> = (0..CLIENTS)
                .map(|c| {
                    let (users, keys) = (users.clone(), keys.clone());
                    tokio::spawn(async move {
                        let mut took = Vec::new();
                        let mut n = c * 7919;
                        while Instant::now() < until {
                            n += 1;
                            let start = Instant::now();
                            users.settings(&keys[n % keys.len()]).await.unwrap();
                            took.push(start.elapsed());
                        }
                        took
                    })
                })
                .collect();
            for client in clients {
                samples[v].extend(client.await.unwrap());
            }
            // Let background work of this variant drain before the next one is timed.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let recorded: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM twintrack_mismatches")
        .fetch_one(&pool)
        .await
        .unwrap();
    println!(
        "{:<38} {:>8} {:>10} {:>10} {:>7}",
        "variant", "reads", "p50", "p99", "p99 ×"
    );
    let mut base = Duration::ZERO;
    for (v, sample) in samples.iter_mut().enumerate() {
        sample.sort();
        let (p50, p99) = (percentile(sample, 0.5), percentile(sample, 0.99));
        if v == 0 {
            base = p99;
        }
        println!(
            "{:<38} {:>8} {:>8.0}µs {:>8.0}µs {:>7.2}",
            variants[v].0,
            sample.len(),
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            p99.as_secs_f64() / base.as_secs_f64(),
        );
    }
    println!("(p99 × against shadow reads off; {recorded} mismatches kept in the table)");
}
