//! MariaDB figures, side by side with their baselines in one run, on a private MariaDB 10.11
//! primary (with its GTID replica, `tests/common/mariadb.rs`; InnoDB,
//! `innodb_flush_log_at_trx_commit=2`), through the quickstart's repositories and definition:
//!
//! - dual write vs a single write (the legacy repository's `put` in its own transaction), p50
//!   and p99, interleaved rounds;
//! - backfill rows/s (`twintrack::backfill`, 2 workers) vs one `INSERT … SELECT` of the same
//!   copy statement over every key, alternated rounds, the replica stopped meanwhile;
//! - flip propagation: a stage flip through one store until another store's cache (soft TTL
//!   60 s) serves it, through the 100 ms poller: p50, p99, max;
//! - verify of two equal tables (`--verify-rows N` rows per side, default 1,000,000; seeded
//!   outside the binary log, so the replica stays idle) vs one `LEFT JOIN … UNION ALL … RIGHT
//!   JOIN` of the same two projections, alternated, then once more with 3 planted differences.
//!
//! Run: `cargo bench --bench mariadb` (`-- --rows N` for the backfill, default 200,000;
//! `TWINTRACK_MARIADB_BUFFER_POOL=2G` for a 10M-row verify that fits in memory).

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
    let test_db = cluster.fresh_db().await;
    let url = test_db.url.clone();
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
    // The replica stops applying during the backfill rounds: in production it runs on a machine
    // of its own, and here it would share the two cores with the primary during twintrack's
    // rounds only (one `INSERT … SELECT` is applied after it commits, outside its timing).
    let replica = match test_db.replica_urls.first() {
        Some(url) => Some(Database::connect(url).await.unwrap()),
        None => None,
    };
    if let Some(replica) = &replica {
        query("STOP ALL SLAVES").execute(replica).await.unwrap();
    }
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

    if let Some(replica) = &replica {
        query("START ALL SLAVES").execute(replica).await.unwrap();
    }
    verify_vs_join(&db, &pool, arg("--verify-rows", 1_000_000)).await;
}

/// Verify of `rows` equal rows per side vs a `LEFT JOIN … UNION ALL … RIGHT JOIN`.
async fn verify_vs_join(db: &Database, pool: &sqlx::MySqlPool, rows: i64) {
    use twintrack::verify::{self, VerifyOptions};
    {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("SET SESSION sql_log_bin = 0")
            .execute(&mut *conn)
            .await
            .unwrap();
        for table in ["legacy_v", "new_v"] {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE TABLE {table} (id BIGINT PRIMARY KEY, name VARCHAR(40) NOT NULL,
                                       qty INT NOT NULL, note VARCHAR(40) NULL)"
            )))
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        let step = 1_000_000;
        for from in (0..rows).step_by(step as usize) {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO legacy_v SELECT seq, CONCAT('name-', seq), seq % 1000,
                        IF(seq % 3 = 0, NULL, 'note') FROM seq_{}_to_{}",
                from + 1,
                (from + step).min(rows)
            )))
            .execute(&mut *conn)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO new_v SELECT * FROM legacy_v WHERE id > {from} AND id <= {}",
                from + step
            )))
            .execute(&mut *conn)
            .await
            .unwrap();
        }
    }
    let legacy = "SELECT id AS \"key\", name, qty, note FROM legacy_v";
    let new = "SELECT id AS \"key\", name, qty, note FROM new_v";
    let config = Config::parse(&format!(
        r#"
[[migration]]
name = "bench_verify"
legacy_table = "legacy_v"
legacy_key = ["id"]
new_table = "new_v"
new_key = ["id"]
copy = "INSERT INTO new_v SELECT * FROM legacy_v WHERE {{batch}} ON DUPLICATE KEY UPDATE name = VALUES(name)"
legacy_projection = "{}"
new_projection = "{}"
"#,
        legacy.replace('"', "\\\""),
        new.replace('"', "\\\"")
    ))
    .unwrap();
    let def = config
        .migration("bench_verify")
        .unwrap()
        .definition(Backend::MySql)
        .unwrap();
    let store = SqlFlagStore::open(db.clone()).await.unwrap();
    store.register("bench_verify", "bench").await.unwrap();
    store
        .set_stage(StageChange::new(
            "bench_verify",
            Stage::DualWrite,
            "bench",
            "bench",
        ))
        .await
        .unwrap();
    let join = format!(
        "SELECT COUNT(*) FROM (
           SELECT l.\"key\" FROM ({legacy}) l LEFT JOIN ({new}) n ON n.\"key\" = l.\"key\"
            WHERE n.\"key\" IS NULL OR NOT (l.name <=> n.name AND l.qty <=> n.qty AND l.note <=> n.note)
           UNION ALL
           SELECT n.\"key\" FROM ({legacy}) l RIGHT JOIN ({new}) n ON n.\"key\" = l.\"key\"
            WHERE l.\"key\" IS NULL) d"
    );
    let round = async |label: &str, differing: i64| {
        let t = Instant::now();
        let found: i64 = Query::assert_safe(join.clone()).scalar(db).await.unwrap();
        let joined = t.elapsed();
        assert_eq!(found, differing);
        let t = Instant::now();
        let report = verify::run(
            db,
            &store,
            &def,
            VerifyOptions::default(),
            Metrics::global(),
        )
        .await
        .unwrap();
        let ours = t.elapsed();
        assert_eq!(report.row_hash, "checksum");
        assert_eq!(report.different.len() as i64, differing);
        assert_eq!(report.legacy_rows as i64, rows);
        println!(
            "verify of {rows} rows per side, {label}: LEFT JOIN … UNION ALL … RIGHT JOIN {:.2} s | twintrack {:.2} s | {:.2}x",
            joined.as_secs_f64(),
            ours.as_secs_f64(),
            joined.as_secs_f64() / ours.as_secs_f64()
        );
    };
    round("clean, round 1", 0).await;
    round("clean, round 2", 0).await;
    Query::assert_safe(format!(
        "UPDATE new_v SET name = 'planted' WHERE id IN (17, {}, {})",
        rows / 2,
        rows - 3
    ))
    .execute(db)
    .await
    .unwrap();
    round("3 planted differences", 3).await;
}
