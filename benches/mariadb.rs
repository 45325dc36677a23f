//! MariaDB figures, side by side with their baselines in one run, on a private MariaDB 10.11
//! primary (with its GTID replica, `tests/common/mariadb.rs`; InnoDB,
//! `innodb_flush_log_at_trx_commit=2`), through the quickstart's repositories and definition:
//!
//! - dual write vs a single write (the legacy repository's `put` in its own transaction), p50
//!   and p99, interleaved rounds;
//! - backfill rows/s (`twintrack::backfill`, 2 workers) vs one `INSERT … SELECT` of the same
//!   copy statement over every key, alternated rounds;
//! - flip propagation: a stage flip through one store until another store's cache (soft TTL
//!   60 s) serves it, through the 100 ms poller: p50, p99, max.
//!
//! Run: `cargo bench --bench mariadb` (`-- --rows N` for the backfill, default 200,000).

#[path = "../tests/common/mariadb.rs"]
mod mariadb;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::Arc;
use std::time::{Duration, Instant};

use repos::{LegacySettings, Settings, SettingsRepo, SettingsResync, Users};
use sqlx::MySql;
use twintrack::backfill::BackfillOptions;
use twintrack::config::Config;
use twintrack::db::{Query, query};
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::metrics::Metrics;
use twintrack::{Backend, Database, Stage};

const M: &str = "user_settings";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn arg(name: &str, default: i64) -> i64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn us(d: Duration) -> String {
    format!("{} µs", d.as_micros())
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = arg("--rows", 200_000);
    let cluster = mariadb::shared().expect("MariaDB (mariadbd, mariadb-install-db)");
    let url = cluster.fresh_db().await.url;
    let db = Database::connect(&url).await.unwrap();
    let pool = db.as_mysql().unwrap().clone();
    repos::create_shapes::<i64>(&db).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register(M, "bench").await.unwrap();
    store
        .set_stage(StageChange::new(M, Stage::DualWrite, "bench", "bench"))
        .await
        .unwrap();
    let flags = FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    let (legacy, new) = repos::repos::<MySql, i64>();
    let users = Users {
        settings: DualStore::builder(
            M,
            legacy,
            new,
            pool.clone(),
            flags.clone(),
            SettingsResync::default(),
        )
        .build()
        .unwrap(),
    };
    for i in 1..=1000i64 {
        users
            .create(
                &format!("u{i}@example.com"),
                Settings {
                    theme: "t".into(),
                    notifications_enabled: true,
                },
            )
            .await
            .unwrap();
    }

    // Dual write vs single write, interleaved.
    let (mut single, mut dual) = (Vec::new(), Vec::new());
    for round in 0..20 {
        for i in 0..100usize {
            let id = (i as i64 % 1000) + 1;
            let s = Settings {
                theme: format!("r{round}-{i}"),
                notifications_enabled: i % 2 == 0,
            };
            tokio::time::sleep(Duration::from_millis(1)).await;
            let t = Instant::now();
            let mut tx = pool.begin().await.unwrap();
            SettingsRepo::<MySql, i64>::put(&LegacySettings, &mut tx, id, s.clone())
                .await
                .unwrap();
            tx.commit().await.unwrap();
            single.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(1)).await;
            let t = Instant::now();
            users.update(&id, s).await.unwrap();
            dual.push(t.elapsed());
        }
    }
    single.sort();
    dual.sort();
    let (s50, d50) = (percentile(&single, 0.5), percentile(&dual, 0.5));
    println!(
        "dual write vs single write, 2,000 each, interleaved: p50 {} vs {} ({:.2}x), p99 {} vs {}",
        us(d50),
        us(s50),
        d50.as_secs_f64() / s50.as_secs_f64(),
        us(percentile(&dual, 0.99)),
        us(percentile(&single, 0.99))
    );

    // Flip propagation through the poller: store A flips, store B's cache (60 s TTL) sees it.
    let a = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    let b = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    a.register("bench_flip", "bench").await.unwrap();
    let cache = FlagCache::builder(b.clone())
        .migration("bench_flip", Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(60))
        .build()
        .await;
    let mut seen = Vec::new();
    for i in 0..200 {
        let to = if i % 2 == 0 {
            Stage::DualWrite
        } else {
            Stage::LegacyOnly
        };
        a.set_stage(StageChange::new("bench_flip", to, "bench", "flip"))
            .await
            .unwrap();
        let t = Instant::now();
        while cache.snapshot().stage("bench_flip") != Some(to) {
            assert!(t.elapsed() < Duration::from_secs(5), "flip {i} never seen");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        seen.push(t.elapsed());
    }
    seen.sort();
    println!(
        "flip propagation, 200 flips: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&seen, 0.5).as_secs_f64() * 1e3,
        percentile(&seen, 0.99).as_secs_f64() * 1e3,
        seen.last().unwrap().as_secs_f64() * 1e3
    );

    // Backfill vs one INSERT … SELECT, alternated.
    Query::assert_safe(format!(
        r#"INSERT INTO users (id, email, profile)
           SELECT 1000 + seq, CONCAT('b', seq, '@example.com'),
                  CONCAT('{{"theme": "theme-', seq % 7, '", "notifications_enabled": ', IF(seq % 2 = 0, 'true', 'false'), '}}')
           FROM seq_1_to_{rows}"#
    ))
    .execute(&db)
    .await
    .unwrap();
    let config = Config::parse(include_str!("../examples/quickstart.toml")).unwrap();
    let def = config
        .migration(M)
        .unwrap()
        .definition(Backend::MySql)
        .unwrap();
    let whole = def
        .copy_sql(twintrack::definition::Direction::Forward)
        .unwrap()
        .replace("{batch}", "1 = 1");
    let total = rows + 1000;
    for round in 1..=2 {
        query("TRUNCATE TABLE user_settings")
            .execute(&db)
            .await
            .unwrap();
        let t = Instant::now();
        Query::assert_safe(whole.clone())
            .execute(&db)
            .await
            .unwrap();
        let set = t.elapsed();
        query("TRUNCATE TABLE user_settings")
            .execute(&db)
            .await
            .unwrap();
        query("DELETE FROM twintrack_backfill_chunks")
            .execute(&db)
            .await
            .unwrap();
        query("DELETE FROM twintrack_backfill_runs")
            .execute(&db)
            .await
            .unwrap();
        let t = Instant::now();
        let report = twintrack::backfill::run(
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
        let ours = t.elapsed();
        assert_eq!(report.run_rows_copied as i64, total);
        let rate = |d: Duration| total as f64 / d.as_secs_f64();
        println!(
            "backfill of {total} rows, round {round}: INSERT … SELECT {:.2} s ({:.0} rows/s) | twintrack {:.2} s ({:.0} rows/s) | {:.2}x",
            set.as_secs_f64(),
            rate(set),
            ours.as_secs_f64(),
            rate(ours),
            rate(ours) / rate(set)
        );
    }
}
