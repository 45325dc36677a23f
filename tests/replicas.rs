//! Replica health against a real streaming replica with a 300 ms apply delay: real lag, a lag
//! limit, an outage and a recovery.

mod common;

use std::time::{Duration, Instant};

use common::pg;
use twintrack::Database;
use twintrack::ryw::{ReplicaOptions, ReplicaSet, cluster_id};

async fn wait_for(
    what: &str,
    set: &ReplicaSet,
    mut ok: impl FnMut(&ReplicaSet) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        set.poll_all().await;
        if ok(set) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {:?}",
            set.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_health_follows_real_lag_and_outages() {
    let cluster = match pg::Cluster::start(300) {
        Ok(cluster) => cluster,
        Err(why) if std::env::var("TWINTRACK_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("TWINTRACK_REQUIRE_POSTGRES=1 but PostgreSQL cannot run here: {why}")
        }
        Err(why) => {
            eprintln!("\n!!!!!!!! SKIPPING POSTGRESQL TEST: {why}\n");
            return;
        }
    };
    let db = cluster.fresh_db().await;
    let primary = Database::connect(&db.url).await.unwrap();
    // The new database reaches the replica after the apply delay.
    let start = Instant::now();
    while Database::connect(&db.replica_urls[0]).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the replica never got the database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let options = ReplicaOptions {
        poll_interval: Duration::from_millis(20),
        max_lag: Duration::from_secs(2),
        ..ReplicaOptions::default()
    };
    let set = ReplicaSet::connect(primary.clone(), &db.replica_urls, options)
        .await
        .unwrap();
    assert_eq!(set.cluster(), cluster_id(&primary).await.unwrap());
    assert_eq!(set.cluster().timeline, 1);
    wait_for("a healthy replica", &set, |s| s.pick(None) == Some(0)).await;

    // A committed write: the replica has not replayed it, so it must not serve a read of it...
    twintrack::db::query("CREATE TABLE written (x INT)")
        .execute(&primary)
        .await
        .unwrap();
    let lsn = set.primary_lsn().await.unwrap();
    set.poll_all().await;
    assert_eq!(set.pick(Some(lsn)), None, "{:?}", set.health());
    assert_eq!(
        set.pick(None),
        Some(0),
        "it still serves reads that need nothing newer"
    );
    // ...until it has, a real apply delay later.
    let took = wait_for("the replica to replay the write", &set, |s| {
        s.pick(Some(lsn)) == Some(0)
    })
    .await;
    assert!(
        took >= Duration::from_millis(150),
        "replayed after {took:?}: is the apply delay real?"
    );
    let replica = Database::connect(&db.replica_urls[0]).await.unwrap();
    twintrack::db::query("SELECT x FROM written")
        .fetch_all(&replica)
        .await
        .unwrap();

    // Over the lag limit under steady writes: taken out; caught up: back in.
    let tight = ReplicaSet::connect(
        primary.clone(),
        &db.replica_urls,
        ReplicaOptions {
            poll_interval: Duration::from_millis(20),
            max_lag: Duration::from_millis(100),
            ..ReplicaOptions::default()
        },
    )
    .await
    .unwrap();
    let writer = {
        let primary = primary.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                twintrack::db::query("INSERT INTO written (x) VALUES ($1)")
                    .bind(i)
                    .execute(&primary)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    wait_for("the lagging replica to be taken out", &tight, |s| {
        s.pick(None).is_none()
    })
    .await;
    assert!(
        tight.health()[0]
            .problem
            .as_deref()
            .unwrap()
            .contains("behind"),
        "{:?}",
        tight.health()
    );
    writer.await.unwrap();
    wait_for("the caught-up replica to come back", &tight, |s| {
        s.pick(None) == Some(0)
    })
    .await;

    // Replica down: out of service (reads fall back to the primary); up again: back in.
    cluster.stop_replica(0);
    wait_for("the stopped replica to be taken out", &set, |s| {
        s.pick(None).is_none()
    })
    .await;
    assert!(set.health()[0].problem.is_some());
    cluster.start_replica(0);
    wait_for("the restarted replica to come back", &set, |s| {
        s.pick(None) == Some(0)
    })
    .await;
}

/// `twintrack backfill` of `n` rows from `ext_legacy` to `ext_new`, started with `args`: the
/// child, and its stderr lines as they come.
fn lagged_backfill(
    url: &str,
    config: &std::path::Path,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(url)
        .arg("--config")
        .arg(config)
        .args(["--json", "backfill", "ext"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, rx)
}

/// Waits for a stderr line containing `needle`; returns it.
fn wait_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("stderr ended before {needle:?}: {e}: {seen:?}"),
        }
    }
    panic!("no line with {needle:?} within 60 s: {seen:?}")
}

async fn copied(db: &Database) -> i64 {
    twintrack::db::query("SELECT COUNT(*) FROM ext_new")
        .scalar(db)
        .await
        .unwrap()
}

/// The field report: `--max-lag-ms` with its only standby disconnected ran at full speed. A
/// lag limit that cannot see pauses and says why: an inactive replication slot (before the
/// run), and a replica given by URL that stops during the run (read directly, not through the
/// primary, which stops listing it). Each resumes once it can see again and finishes with
/// every row. On SQLite, or with `--replica` but no limit, the options are refused (exit 2).
#[tokio::test(flavor = "multi_thread")]
async fn a_lag_limit_that_cannot_see_a_standby_pauses_and_says_why() {
    let Some(cluster) = pg::Cluster::start_or_skip(vec![pg::ReplicaSpec::delayed(0)]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twintrack.toml");
    std::fs::write(
        &config,
        r#"
[[migration]]
name = "ext"
legacy_table = "ext_legacy"
legacy_key = "id"
new_table = "ext_new"
new_key = "id"
copy = "INSERT INTO ext_new (id, v) SELECT id, v FROM ext_legacy WHERE {batch} ON CONFLICT (id) DO UPDATE SET v = excluded.v"
legacy_projection = "SELECT id AS key, v FROM ext_legacy"
new_projection = "SELECT id AS key, v FROM ext_new"
"#,
    )
    .unwrap();
    let tdb = cluster.fresh_db().await;
    let db = Database::connect(&tdb.url).await.unwrap();
    for sql in [
        "CREATE TABLE ext_legacy (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        "CREATE TABLE ext_new (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        "INSERT INTO ext_legacy SELECT g, 'v' || g FROM generate_series(1, 20000) g",
    ] {
        twintrack::db::Query::assert_safe(sql)
            .execute(&db)
            .await
            .unwrap();
    }
    let cli = |line: &str| common::twintrack_cli(None, &tdb.url, Some(&config), line);
    assert_eq!(cli("init").0, 0);
    assert_eq!(cli("stage set ext dual_write --reason go").0, 0);

    // An inactive slot: paused before the first batch, and says so.
    twintrack::db::query("SELECT 1 FROM pg_create_physical_replication_slot('ghost_standby')")
        .execute(&db)
        .await
        .unwrap();
    let (child, lines) = lagged_backfill(&tdb.url, &config, &["--max-lag-ms", "50"]);
    let line = wait_line(&lines, "paused:");
    assert!(
        line.contains("physical replication slot ghost_standby is inactive"),
        "{line}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(copied(&db).await, 0, "nothing copied while blind");
    twintrack::db::query("SELECT pg_drop_replication_slot('ghost_standby')")
        .execute(&db)
        .await
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["paused_seconds"].as_f64().unwrap() > 0.5, "{report}");
    assert_eq!(copied(&db).await, 20_000);

    // A replica given by URL, stopped during the run: its lag is read from it, so the run
    // pauses naming it, and goes on once it is back.
    twintrack::db::query("DELETE FROM ext_new")
        .execute(&db)
        .await
        .unwrap();
    let replica = &tdb.replica_urls[0];
    let (child, lines) = lagged_backfill(
        &tdb.url,
        &config,
        &[
            "--max-lag-ms",
            "5000",
            "--replica",
            replica,
            "--rate",
            "2000",
            "--batch-size",
            "200",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while copied(&db).await == 0 {
        assert!(Instant::now() < deadline, "the run never started copying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop_replica(0);
    let line = wait_line(&lines, "paused:");
    let port = replica
        .split(':')
        .nth(2)
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    assert!(
        line.contains("no replica lag figure: replica postgres://") && line.contains(port),
        "{line}"
    );
    let before = copied(&db).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(copied(&db).await, before, "nothing copied while blind");
    assert!(before < 20_000);
    cluster.start_replica(0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(copied(&db).await, 20_000);

    // A standby without a slot that streamed when the run began and then stops: gone from
    // pg_stat_replication with no other trace, still expected, so the run pauses.
    twintrack::db::query("DELETE FROM ext_new")
        .execute(&db)
        .await
        .unwrap();
    let (child, lines) = lagged_backfill(
        &tdb.url,
        &config,
        &[
            "--max-lag-ms",
            "5000",
            "--rate",
            "2000",
            "--batch-size",
            "200",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while copied(&db).await == 0 {
        assert!(Instant::now() < deadline, "the run never started copying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop_replica(0);
    let line = wait_line(&lines, "paused:");
    assert!(
        line.contains("streaming earlier in this run are gone"),
        "{line}"
    );
    let before = copied(&db).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(copied(&db).await, before, "nothing copied while blind");
    cluster.start_replica(0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(copied(&db).await, 20_000);

    // Refused before anything is written: a limit on SQLite, a replica without a limit.
    let (code, out) = cli(&format!("backfill ext --replica {replica}"));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--max-lag-ms"), "{out}");
    let sqlite_dir = tempfile::tempdir().unwrap();
    let sqlite = format!(
        "sqlite://{}?mode=rwc",
        sqlite_dir.path().join("t.db").display()
    );
    let lite = Database::connect(&sqlite).await.unwrap();
    for sql in [
        "CREATE TABLE ext_legacy (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        "CREATE TABLE ext_new (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        "INSERT INTO ext_legacy VALUES (1, 'a')",
    ] {
        twintrack::db::Query::assert_safe(sql)
            .execute(&lite)
            .await
            .unwrap();
    }
    let lite_cli = |line: &str| common::twintrack_cli(None, &sqlite, Some(&config), line);
    assert_eq!(lite_cli("init").0, 0);
    assert_eq!(lite_cli("stage set ext dual_write --reason go").0, 0);
    let (code, out) = lite_cli("backfill ext --max-lag-ms 50");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("lag limit"), "{out}");
    assert_eq!(
        twintrack::db::query("SELECT COUNT(*) FROM ext_new")
            .scalar::<i64>(&lite)
            .await
            .unwrap(),
        0
    );
}
