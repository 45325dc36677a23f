//! Backfill and verify against the set-based SQL a person would write by hand, side by side on
//! one PostgreSQL (its own private server, no replica, `fsync=off`), through the quickstart's
//! definition (`examples/quickstart.toml`), with UUID user ids (random v4, as
//! `gen_random_uuid()` makes them) or, with `--key bigint`, the quickstart's own `bigint` ones.
//!
//! - Backfill: `--rows` legacy users (default 1,000,000) copied into `user_settings`, once by a
//!   single `INSERT … SELECT` of the same transform (the copy SQL over every key), once by
//!   `twintrack::backfill` (keyset batches under `FOR SHARE`, checkpointed, 2 workers);
//!   alternated `--rounds` times (default 2), the new table truncated in between.
//! - Verify: `--verify-rows` rows per side (default 10,000,000) compared by `twintrack::verify`
//!   (64 segments) and by one `FULL OUTER JOIN … IS DISTINCT FROM` query over the same
//!   projections; alternated `--rounds` times.
//!
//! Run: `cargo bench --bench data` (`-- --rows N --verify-rows N --rounds N --key uuid|bigint`).

#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use twintrack::backfill::{self, BackfillOptions};
use twintrack::config::Config;
use twintrack::flags::{FlagStore, SqlFlagStore, StageChange};
use twintrack::metrics::Metrics;
use twintrack::verify::{self, VerifyOptions};
use twintrack::{Database, Stage};

const M: &str = "user_settings";

fn arg(name: &str, default: i64) -> i64 {
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

async fn seed(db: &PgPool, n: i64, uuid: bool) {
    sqlx::query("TRUNCATE users, user_settings RESTART IDENTITY")
        .execute(db)
        .await
        .unwrap();
    let sql = if uuid {
        "INSERT INTO users (id, email, profile)
         SELECT gen_random_uuid(), 'u' || g || '@example.com',
                jsonb_build_object('theme', 'theme-' || (g % 7), 'notifications_enabled', g % 2 = 0)
         FROM generate_series(1, $1) AS g"
    } else {
        "INSERT INTO users (email, profile)
         SELECT 'u' || g || '@example.com',
                jsonb_build_object('theme', 'theme-' || (g % 7), 'notifications_enabled', g % 2 = 0)
         FROM generate_series(1, $1) AS g"
    };
    sqlx::query(sql).bind(n).execute(db).await.unwrap();
    sqlx::query("VACUUM ANALYZE users")
        .execute(db)
        .await
        .unwrap();
}

async fn truncate_new(db: &PgPool) {
    sqlx::query("TRUNCATE user_settings")
        .execute(db)
        .await
        .unwrap();
    sqlx::query("CHECKPOINT").execute(db).await.unwrap();
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = arg("--rows", 1_000_000);
    let verify_rows = arg("--verify-rows", 10_000_000);
    let rounds = arg("--rounds", 2);
    let args: Vec<String> = std::env::args().collect();
    let uuid = match args
        .iter()
        .position(|a| a == "--key")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        None | Some("uuid") => true,
        Some("bigint") => false,
        Some(other) => {
            eprintln!("--key wants uuid or bigint, not {other:?}");
            std::process::exit(2)
        }
    };
    let cluster = pg::Cluster::start_with(vec![]).expect("start PostgreSQL");
    let url = cluster.fresh_db().await.url;
    let db = Database::connect_with(
        &url,
        twintrack::db::ConnectOptions {
            max_connections: 16,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    if uuid {
        repos::create_shapes::<uuid::Uuid>(&db).await.unwrap();
    } else {
        repos::create_shapes::<i64>(&db).await.unwrap();
    }
    let pool = db.as_postgres().unwrap().clone();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register(M, "bench").await.unwrap();
    store
        .set_stage(StageChange::new(M, Stage::DualWrite, "bench", "bench"))
        .await
        .unwrap();
    let config =
        Config::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.toml"))
            .unwrap();
    let def = config
        .migration(M)
        .unwrap()
        .definition(db.backend())
        .unwrap();
    // The same copy over every key at once: the set-based way.
    let copy = def.copy.clone().unwrap().replace("{batch}", "TRUE");

    // Backfill.
    seed(&pool, rows, uuid).await;
    let mut set_based = Vec::new();
    let mut ours = Vec::new();
    for _ in 0..rounds {
        truncate_new(&pool).await;
        let started = Instant::now();
        let done = sqlx::query(sqlx::AssertSqlSafe(copy.clone()))
            .execute(&pool)
            .await
            .unwrap()
            .rows_affected();
        assert_eq!(done as i64, rows);
        set_based.push(started.elapsed());

        truncate_new(&pool).await;
        let started = Instant::now();
        let report = backfill::run(
            &db,
            &*store,
            &def,
            BackfillOptions {
                workers: 2,
                ..BackfillOptions::default()
            },
            Metrics::global(),
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(report.rows_copied as i64, rows);
        ours.push(started.elapsed());
    }
    let rate = |d: &Duration| rows as f64 / d.as_secs_f64();
    let key = if uuid { "UUID" } else { "bigint" };
    println!("\nbackfill of {rows} rows, {key} keys ({rounds} rounds, alternated)\n");
    println!("| round | INSERT … SELECT | twintrack backfill | ratio (rows/s) |");
    println!("|---|---|---|---|");
    for (i, (a, b)) in set_based.iter().zip(&ours).enumerate() {
        println!(
            "| {} | {:.2} s ({:.0} rows/s) | {:.2} s ({:.0} rows/s) | {:.2}× |",
            i + 1,
            a.as_secs_f64(),
            rate(a),
            b.as_secs_f64(),
            rate(b),
            rate(b) / rate(a)
        );
    }

    // Verify: both sides full and equal.
    seed(&pool, verify_rows, uuid).await;
    sqlx::query(sqlx::AssertSqlSafe(copy.clone()))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("VACUUM ANALYZE user_settings")
        .execute(&pool)
        .await
        .unwrap();
    let (legacy, new) = def.projections().unwrap();
    let join = format!(
        "SELECT COUNT(*) FROM ({legacy}) l FULL OUTER JOIN ({new}) n ON l.key = n.key WHERE l IS DISTINCT FROM n"
    );
    println!("\nverify of {verify_rows} rows per side, {key} keys ({rounds} rounds, alternated)\n");
    println!("| round | FULL OUTER JOIN … IS DISTINCT FROM | twintrack verify | speed-up |");
    println!("|---|---|---|---|");
    for i in 0..rounds {
        let started = Instant::now();
        let differing: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(join.clone()))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(differing, 0);
        let join_took = started.elapsed();
        let started = Instant::now();
        let report = verify::run(
            &db,
            &*store,
            &def,
            VerifyOptions {
                segments: 64,
                parallel: 4,
                ..VerifyOptions::default()
            },
            Metrics::global(),
        )
        .await
        .unwrap();
        assert!(report.clean);
        assert_eq!(report.legacy_rows as i64, verify_rows);
        let ours = started.elapsed();
        println!(
            "| {} | {:.2} s | {:.2} s | {:.2}× |",
            i + 1,
            join_took.as_secs_f64(),
            ours.as_secs_f64(),
            join_took.as_secs_f64() / ours.as_secs_f64()
        );
    }
}
