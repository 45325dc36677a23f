//! MariaDB as a backend, on a real primary and a real GTID replica one second behind, started
//! by the harness (`tests/common/mariadb.rs`): the harness itself, the driver seam (parameters,
//! identifiers, values), twintrack's tables, and clear refusals for the parts that do not run
//! there yet. The flag store and cache run the shared suite in `tests/flags.rs`.

mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::time::Duration;

use common::mariadb;
use serde_json::json;
use twintrack::db::{Query, Value, query};
use twintrack::{Backend, Database};

#[tokio::test(flavor = "multi_thread")]
async fn the_replica_replays_the_primary_through_gtid_one_second_behind() {
    let Some(db) = mariadb::fresh_db().await else {
        return;
    };
    let primary = Database::connect(&db.url).await.unwrap();
    assert_eq!(primary.backend(), Backend::MySql);
    let replica = Database::connect(&db.replica_urls[0]).await.unwrap();
    query("CREATE TABLE t (id BIGINT PRIMARY KEY, v VARCHAR(20) NOT NULL)")
        .execute(&primary)
        .await
        .unwrap();
    query("INSERT INTO t VALUES (1, 'one')")
        .execute(&primary)
        .await
        .unwrap();
    let position: String = query("SELECT CAST(@@gtid_binlog_pos AS CHAR)")
        .scalar(&primary)
        .await
        .unwrap();
    assert!(!position.is_empty(), "the primary logs GTIDs");
    // Applied no sooner than a second after the primary committed it.
    let seen_at_once: i64 = query("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = 't'")
        .scalar(&replica)
        .await
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let replayed: Option<i64> =
            Query::assert_safe(format!("SELECT MASTER_GTID_WAIT('{position}', 0)"))
                .scalar(&replica)
                .await
                .unwrap();
        if replayed == Some(0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the replica never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v: String = query("SELECT v FROM t WHERE id = 1")
        .scalar(&replica)
        .await
        .unwrap();
    assert_eq!(v, "one");
    eprintln!(
        "replica: table visible at once: {}; caught up after {:?}",
        seen_at_once == 1,
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn parameters_identifiers_and_values_cross_the_driver_seam() {
    let Some(db) = mariadb::fresh_db().await else {
        return;
    };
    let db = Database::connect(&db.url).await.unwrap();
    // `key` is reserved in MySQL: twintrack's double-quoted identifiers become backticks.
    query(
        r#"CREATE TABLE "vals" ("key" BIGINT PRIMARY KEY, i INT, f DOUBLE, d DECIMAL(30,10),
           b BOOLEAN, t TEXT, bin VARBINARY(8), u BIGINT UNSIGNED)"#,
    )
    .execute(&db)
    .await
    .unwrap();
    // `$2` twice, out of order; a `$1` inside a string stays text.
    query(r#"INSERT INTO "vals" VALUES ($2, $1, 0.5, 12345678901234567890.0123456789, $3, '$1 literal', $4, 18446744073709551615)"#)
        .bind(7i32)
        .bind(9_000_000_000i64)
        .bind(true)
        .bind(vec![0u8, 255])
        .execute(&db)
        .await
        .unwrap();
    let row =
        query(r#"SELECT "key", i, f, d, b, t, bin, u FROM "vals" WHERE "key" = $1 AND i = $2"#)
            .bind(9_000_000_000i64)
            .bind(7i32)
            .fetch_one(&db)
            .await
            .unwrap();
    let values = row.into_values();
    assert_eq!(
        values,
        vec![
            Value::I64(9_000_000_000),
            Value::I64(7),
            Value::F64(0.5),
            Value::Text("12345678901234567890.0123456789".into()),
            Value::Bool(true),
            Value::Text("$1 literal".into()),
            Value::Bytes(vec![0, 255]),
            Value::Text("18446744073709551615".into()),
        ]
    );
    // A date is refused with the remedy, not misread.
    let err = query("SELECT CURRENT_DATE()")
        .fetch_one(&db)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("CAST"), "{err}");
    // A parameter without a value is an error, not a panic.
    let err = query("SELECT $2")
        .bind(1i64)
        .fetch_one(&db)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("$2"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_schema_installs_idempotently_even_from_many_processes_at_once() {
    let Some(db) = mariadb::fresh_db().await else {
        return;
    };
    let db = Database::connect(&db.url).await.unwrap();
    let installs: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move { twintrack::schema::install(&db).await })
        })
        .collect();
    for install in installs {
        install.await.unwrap().unwrap();
    }
    twintrack::schema::install(&db).await.unwrap();
    let versions: Vec<i64> = query("SELECT version FROM twintrack_schema ORDER BY version")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get_at(0).unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=twintrack::schema::SCHEMA_VERSION).collect::<Vec<_>>()
    );
    for table in [
        "twintrack_flags",
        "twintrack_audit",
        "twintrack_repair_intents",
        "twintrack_mismatches",
        "twintrack_backfill_runs",
        "twintrack_backfill_chunks",
    ] {
        let n: i64 = query("SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = $1")
            .bind(table)
            .scalar(&db)
            .await
            .unwrap();
        assert_eq!(n, 1, "{table}");
    }
    // The schema lock was released: another install on any connection goes straight through.
    let free: i64 = query("SELECT IS_FREE_LOCK('twintrack_schema')")
        .scalar(&db)
        .await
        .unwrap();
    assert_eq!(free, 1);
}

/// A text key is refused on MariaDB with the reason, on every command that reads the key,
/// before anything is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_text_key_is_refused_clearly() {
    let Some((url, db)) = seeded(100).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("text_key.toml");
    std::fs::write(
        &config,
        std::fs::read_to_string(common::quickstart_config())
            .unwrap()
            .replace("legacy_key = \"id\"", "legacy_key = \"email\""),
    )
    .unwrap();
    for line in ["backfill user_settings", "verify user_settings"] {
        let (code, out) = common::twintrack_cli(None, &url, Some(&config), line);
        assert_eq!(code, 2, "{line}: {out}");
        assert!(
            out.contains("of type \"varchar(255)\"")
                && out.contains("does not compare text byte for byte")
                && out.contains("ALTER TABLE users MODIFY email varchar(255) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"),
            "{line}: {out}"
        );
    }
    let runs: i64 = query("SELECT COUNT(*) FROM twintrack_backfill_runs")
        .scalar(&db)
        .await
        .unwrap();
    assert_eq!(runs, 0, "nothing written");
}

/// The CLI on MariaDB: `init`, stage moves (the rules and their refusals), `status`; a
/// backfill without `copy` SQL is refused with exit 2 naming it, and an unreachable server is
/// exit 4.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_manages_stages_on_mariadb() {
    let Some(db) = mariadb::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twintrack.toml");
    std::fs::write(
        &config,
        "[[migration]]\nname = \"m\"\nlegacy_table = \"a\"\nlegacy_key = \"id\"\nnew_table = \"b\"\nnew_key = \"id\"\n",
    )
    .unwrap();
    let cli = |url: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_twintrack"))
            .arg("--database-url")
            .arg(url)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&db.url, &["init"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("registered m at legacy_only"), "{out}");
    assert_eq!(
        cli(
            &db.url,
            &["stage", "set", "m", "dual_write", "--reason", "go"]
        )
        .0,
        0
    );
    let (code, _, err) = cli(
        &db.url,
        &["stage", "set", "m", "shadow", "--reason", "too soon"],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no backfill has finished"), "{err}");
    let (code, out, _) = cli(&db.url, &["--json", "status"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"dual_write\""), "{out}");
    // A definition without SQL for MySQL is refused, naming what is missing.
    let (code, _, err) = cli(&db.url, &["backfill", "m"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("defines no `copy` SQL"), "{err}");
    let (code, _, err) = cli("mysql://tt:tt@127.0.0.1:1/nowhere", &["status"]);
    assert_eq!(code, 4, "{err}");
    // A database that does not exist on a running server is unreachable too (exit 4).
    let missing = format!("{}_missing", db.url);
    let (code, _, err) = cli(&missing, &["status"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("Unknown database"), "{err}");
    let db = Database::connect(&db.url).await.unwrap();
    let stage: String = query("SELECT stage FROM twintrack_flags WHERE migration = 'm'")
        .scalar(&db)
        .await
        .unwrap();
    assert_eq!(stage, "dual_write", "the refusals changed nothing");
}

/// `twintrack` with `args` against `url` and the quickstart's definition.
fn quickstart_cli(url: &str, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_twintrack"));
    cmd.arg("--database-url")
        .arg(url)
        .arg("--config")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/quickstart.toml"
        ))
        .args(args)
        .env_remove("NEW_DATABASE_URL")
        .env_remove("TWINTRACK_NEW_DATABASE_URL");
    cmd
}

/// [`quickstart_cli`], run; it must succeed.
/// `stage set user_settings dual_write`.
const DUAL_WRITE: &[&str] = &[
    "stage",
    "set",
    "user_settings",
    "dual_write",
    "--reason",
    "t",
];

fn quickstart_cli_ok(url: &str, args: &[&str]) {
    let out = quickstart_cli(url, args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Rows of the new shape that are missing or differ from what the legacy profile says.
async fn differing(db: &Database) -> i64 {
    query(
        "SELECT COUNT(*) FROM users u LEFT JOIN user_settings s ON s.user_id = u.id
         WHERE JSON_VALUE(u.profile, '$.theme') IS NOT NULL AND (s.user_id IS NULL
            OR s.theme <> JSON_VALUE(u.profile, '$.theme')
            OR s.notifications_enabled <> (JSON_UNQUOTE(JSON_EXTRACT(u.profile, '$.notifications_enabled')) = 'true'))",
    )
    .scalar(db)
    .await
    .unwrap()
}

async fn seeded(rows: i64) -> Option<(String, Database)> {
    Some(seeded_at(mariadb::fresh_db().await?, rows).await)
}

/// `rows` legacy users in `test`'s database, twintrack's tables made and the quickstart's
/// migration in `dual_write`.
async fn seeded_at(test: mariadb::TestDb, rows: i64) -> (String, Database) {
    let db = Database::connect(&test.url).await.unwrap();
    repos::create_shapes::<i64>(&db).await.unwrap();
    Query::assert_safe(format!(
        r#"INSERT INTO users (id, email, profile)
           SELECT seq, CONCAT('u', seq, '@example.com'),
                  CONCAT('{{"theme": "theme-', seq % 7, '", "notifications_enabled": ', IF(seq % 2 = 0, 'true', 'false'), '}}')
           FROM seq_1_to_{rows}"#
    ))
    .execute(&db)
    .await
    .unwrap();
    quickstart_cli_ok(&test.url, &["init"]);
    quickstart_cli_ok(&test.url, DUAL_WRITE);
    (test.url, db)
}

/// The CLI backfills 100,000 quickstart users on MariaDB with the definition's `mysql` copy:
/// every row copied exactly; verify finds it clean (and `shadow` opens), reports planted
/// divergences exactly, `--repair` makes it clean (and `live` opens); a backfill killed
/// half-way resumes without gap or duplicate.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_backfills_verifies_and_repairs_100_000_rows_and_a_killed_backfill_resumes() {
    let Some((url, db)) = seeded(100_000).await else {
        return;
    };
    let out = quickstart_cli(&url, &["--json", "backfill", "user_settings"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |db: Database| async move {
        query("SELECT COUNT(*) FROM user_settings")
            .scalar::<i64>(&db)
            .await
            .unwrap()
    };
    assert_eq!(count(db.clone()).await, 100_000);
    assert_eq!(differing(&db).await, 0);

    // Verify: clean, and its evidence opens the gate into `shadow`.
    let run = |args: &[&str]| {
        let out = quickstart_cli(&url, args).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run(&["--json", "verify", "user_settings"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["clean"], true, "{report}");
    assert_eq!(report["legacy_rows"], 100_000, "{report}");
    assert_eq!(
        run(&["stage", "set", "user_settings", "shadow", "--reason", "t"]).0,
        0
    );
    // Planted in the new shape: 2 rows missing, 3 changed, 1 extra; reported exactly.
    for sql in [
        "DELETE FROM user_settings WHERE user_id IN (10, 20)",
        "UPDATE user_settings SET theme = 'planted' WHERE user_id IN (30, 40, 50)",
        "INSERT INTO user_settings VALUES (999999, 'extra', TRUE)",
    ] {
        query(sql).execute(&db).await.unwrap();
    }
    let (code, out, _) = run(&["--json", "verify", "user_settings", "--segments", "16"]);
    assert_eq!(code, 1, "{out}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["missing_in_new"], json!([10, 20]), "{report}");
    assert_eq!(report["missing_in_legacy"], json!([999999]), "{report}");
    assert_eq!(
        report["different"],
        json!([
            {"key": 30, "columns": ["theme"]},
            {"key": 40, "columns": ["theme"]},
            {"key": 50, "columns": ["theme"]}
        ]),
        "{report}"
    );
    let (code, out, err) = run(&["--json", "verify", "user_settings", "--repair"]);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["repaired"].as_array().unwrap().len(), 6, "{report}");
    assert_eq!(run(&["verify", "user_settings"]).0, 0);
    assert_eq!(differing(&db).await, 0);
    assert_eq!(count(db.clone()).await, 100_000);
    assert_eq!(
        run(&["stage", "set", "user_settings", "live", "--reason", "t"]).0,
        0
    );

    // Killed once it has copied part of the table (throttled so there is a middle), resumed.
    let Some((url, db)) = seeded(100_000).await else {
        return;
    };
    let mut child = quickstart_cli(
        &url,
        &[
            "backfill",
            "user_settings",
            "--rate",
            "20000",
            "--batch-size",
            "500",
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let start = std::time::Instant::now();
    while count(db.clone()).await < 10_000 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the backfill never got going"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = count(db.clone()).await;
    assert!(partial < 100_000, "killed after it finished: {partial}");
    let out = quickstart_cli(&url, &["--json", "backfill", "user_settings"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["resumed"], true, "{report}");
    assert_eq!(count(db.clone()).await, 100_000);
    assert_eq!(differing(&db).await, 0);
    eprintln!("killed at {partial} rows; resumed: {report}");
}

/// The quickstart service itself on `DATABASE_URL=mysql://…`, unchanged: it creates its
/// tables, serves and dual-writes, and a flip made by the CLI reaches it through the flag
/// poller (its cache's soft TTL alone would take up to a second; either way it is seen).
#[tokio::test(flavor = "multi_thread")]
async fn the_quickstart_runs_on_mariadb_and_follows_cli_flips() {
    let Some(test) = mariadb::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(common::example_binary("quickstart"))
        .current_dir(dir.path())
        .env("TWINTRACK_LISTEN", "127.0.0.1:0")
        .env("TWINTRACK_DEBUG_HEADERS", "1")
        .env("RUST_LOG", "warn")
        .env("DATABASE_URL", &test.url)
        .env_remove("NEW_DATABASE_URL")
        .env_remove("REPLICA_DATABASE_URLS")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let base = common::listening_base(&mut child, "quickstart");
    let (status, _, body) = common::http(
        &base,
        "POST",
        "/users",
        r#"{"email": "a@example.com", "theme": "dark", "notifications_enabled": true}"#,
        None,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    quickstart_cli_ok(&test.url, DUAL_WRITE);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, headers, _) = common::http(&base, "GET", "/users/1/settings", "", None).await;
        if headers
            .get("x-twintrack-stage")
            .and_then(|v| v.to_str().ok())
            == Some("dual_write")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the flip never reached the service"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = common::http(
        &base,
        "PUT",
        "/users/1/settings",
        r#"{"theme": "light", "notifications_enabled": false}"#,
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let db = Database::connect(&test.url).await.unwrap();
    let row = query(
        "SELECT theme, CAST(notifications_enabled AS SIGNED) FROM user_settings WHERE user_id = 1",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        row.into_values(),
        vec![Value::Text("light".into()), Value::I64(0)]
    );
    assert_eq!(differing(&db).await, 0, "both shapes hold the write");
    let _ = child.kill();
    let _ = child.wait();
}

/// Verify on MariaDB summarises each side in the database with a pt-table-checksum style row
/// checksum (`row_hash == "checksum"`). Rows that differ only where a `NULL` falls, where a
/// separator or a quote sits inside a value, in one byte of a binary column or in letter case
/// under a case-insensitive collation must make the whole range's checksums differ (a clean
/// verify would mean a collision); the same text stored in two character sets must not (an
/// unexplained difference would keep the verify from being clean).
#[tokio::test(flavor = "multi_thread")]
async fn the_in_database_checksum_tells_apart_every_row_that_differs() {
    use std::sync::Arc;
    use twintrack::config::Config;
    use twintrack::flags::{FlagStore, SqlFlagStore, StageChange};

    let Some(test) = mariadb::fresh_db().await else {
        return;
    };
    let db = Database::connect(&test.url).await.unwrap();
    for sql in [
        "CREATE TABLE legacy_t (id BIGINT PRIMARY KEY, a VARCHAR(20) NULL, b VARCHAR(20) NULL,
                                bin VARBINARY(8) NULL, n DECIMAL(10, 2) NULL)",
        "CREATE TABLE new_t (id BIGINT PRIMARY KEY, a VARCHAR(20) NULL,
                             b VARCHAR(20) CHARACTER SET latin1 NULL, bin VARBINARY(8) NULL,
                             n DECIMAL(10, 2) NULL)",
        "INSERT INTO legacy_t SELECT seq, CONCAT('a', seq), 'é', UNHEX('00ff'), seq / 4 FROM seq_1_to_2000",
        "INSERT INTO new_t SELECT * FROM legacy_t",
    ] {
        Query::assert_safe(sql).execute(&db).await.unwrap();
    }
    let config = Config::parse(
        r#"
[[migration]]
name = "t"
legacy_table = "legacy_t"
legacy_key = ["id"]
new_table = "new_t"
new_key = ["id"]
copy = "INSERT INTO new_t SELECT * FROM legacy_t WHERE {batch} ON DUPLICATE KEY UPDATE a = VALUES(a)"
legacy_projection = "SELECT id AS \"key\", a, b, bin, n FROM legacy_t"
new_projection = "SELECT id AS \"key\", n, bin, b, a FROM new_t"
"#,
    )
    .unwrap();
    let def = config
        .migration("t")
        .unwrap()
        .definition(Backend::MySql)
        .unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register("t", "test").await.unwrap();
    store
        .set_stage(StageChange::new("t", twintrack::Stage::DualWrite, "test", "t").force(true))
        .await
        .unwrap();
    let verify = async || verify_now(&db, &store, &def, false).await;
    // Columns in another order, one in latin1: still the same rows.
    let v = verify().await;
    assert_eq!(v.row_hash, "checksum");
    assert!(v.clean, "{:?}", v.lines());
    assert_eq!((v.legacy_rows, v.new_rows), (2000, 2000));

    let cases: [(&str, [&str; 2], &str); 6] = [
        (
            "a NULL moved",
            ["a = NULL, b = 'x'", "a = 'x', b = NULL"],
            "a, b",
        ),
        (
            "a separator moved",
            ["a = 'p,q', b = 'r'", "a = 'p', b = 'q,r'"],
            "a, b",
        ),
        (
            "a quote moved",
            ["a = 'p''', b = 'q'", "a = 'p', b = '''q'"],
            "a, b",
        ),
        (
            "one byte",
            ["bin = UNHEX('0001')", "bin = UNHEX('0002')"],
            "bin",
        ),
        ("letter case", ["a = 'Case'", "a = 'case'"], "a"),
        ("a decimal digit", ["n = 1.5", "n = 1.25"], "n"),
    ];
    for (what, [legacy, new], columns) in cases {
        for (table, set) in [("legacy_t", legacy), ("new_t", new)] {
            Query::assert_safe(format!("UPDATE {table} SET {set} WHERE id = 1234"))
                .execute(&db)
                .await
                .unwrap();
        }
        let v = verify().await;
        assert!(
            !v.clean,
            "{what}: a checksum collision called the sides equal"
        );
        assert_eq!(v.different.len(), 1, "{what}: {:?}", v.lines());
        assert_eq!(v.different[0].columns.join(", "), columns, "{what}");
        assert_eq!(v.unexplained_segments, 0, "{what}");
        Query::assert_safe(
            "UPDATE new_t n JOIN legacy_t l ON l.id = n.id SET n.a = l.a, n.b = l.b, n.bin = l.bin, n.n = l.n WHERE n.id = 1234",
        )
        .execute(&db)
        .await
        .unwrap();
        let v = verify().await;
        assert!(v.clean, "{what}, put back: {:?}", v.lines());
    }
}

/// `max_lag` on MariaDB: the primary lists its replica (`SHOW SLAVE HOSTS`) but cannot tell its
/// lag, so a backfill not given the replica pauses, blind, and says what to give; given it,
/// the backfill pauses while the replica (applying one second behind) lags more than the
/// limit, and finishes with every row copied.
#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_replica_pauses_the_backfill_until_it_catches_up() {
    use std::sync::{Arc, Mutex};
    use twintrack::backfill::{self, BackfillOptions};
    use twintrack::config::Config;
    use twintrack::flags::SqlFlagStore;
    use twintrack::ryw::{ReplicaOptions, ReplicaSet};

    let Some(test) = mariadb::fresh_db().await else {
        return;
    };
    let Some(replica_url) = test.replica_urls.first().cloned() else {
        eprintln!("skipped: MARIADB_URL has no replica");
        return;
    };
    let (_, db) = seeded_at(test, 1_200).await;
    let def = Config::load(&common::quickstart_config())
        .unwrap()
        .migration("user_settings")
        .unwrap()
        .definition(Backend::MySql)
        .unwrap();
    let store = SqlFlagStore::new(db.clone());
    let options = |replicas: Option<ReplicaSet>| BackfillOptions {
        // Three batches, each followed by a lag of a second or more.
        batch_size: 400,
        target_batch_time: Duration::from_secs(10),
        max_lag: Some(Duration::from_millis(500)),
        replicas,
        // The blind run's lease on the chunk runs out soon after it is stopped.
        lease: Duration::from_secs(1),
        ..BackfillOptions::default()
    };

    // Not given the replica: blind, paused, with the reason.
    let reason = Arc::new(Mutex::new(None::<String>));
    let seen = reason.clone();
    let blind = tokio::time::timeout(
        Duration::from_secs(3),
        backfill::run(
            &db,
            &store,
            &def,
            options(None),
            twintrack::metrics::Metrics::global(),
            move |p| {
                if p.paused {
                    *seen.lock().unwrap() = p.pause_reason.clone();
                }
            },
        ),
    )
    .await;
    assert!(blind.is_err(), "a blind backfill went on: {blind:?}");
    let why = reason
        .lock()
        .unwrap()
        .clone()
        .expect("progress showed no pause");
    assert!(
        why.contains("SHOW SLAVE HOSTS") && why.contains("--replica-url"),
        "{why}"
    );
    assert_eq!(count(&db, "user_settings").await, 0);

    // Given it: paused while it lags, then done.
    let replicas = ReplicaSet::connect(db.clone(), &[replica_url], ReplicaOptions::default())
        .await
        .unwrap();
    let metrics = common::TestMetrics::new();
    let report = backfill::run(
        &db,
        &store,
        &def,
        options(Some(replicas)),
        metrics.metrics(),
        |_| {},
    )
    .await
    .unwrap();
    assert!(report.finished);
    assert_eq!(count(&db, "user_settings").await, 1_200);
    assert!(report.paused_seconds > 0.5, "{report:?}");
    assert!(metrics.counter("twintrack.backfill.pauses", ("migration", "user_settings")) > 0);
}

async fn count(db: &Database, table: &str) -> i64 {
    Query::assert_safe(format!("SELECT COUNT(*) FROM {table}"))
        .scalar(db)
        .await
        .unwrap()
}

/// Text keys on MariaDB: a `varchar` under a binary no-pad collation is a key, byte for byte as
/// Rust compares it, so keys a default collation would take for one (`a`, `A`, `a `, `á` and
/// `a` + a combining accent, `ss` and `ß`) are each copied, compared and repaired as
/// themselves; a `_bin` text column compares with the same text under another collation
/// (sqlx calls it `VARBINARY`). Every other text key column is refused with the reason and the
/// remedy, before anything is written.
#[tokio::test(flavor = "multi_thread")]
async fn text_keys_under_a_binary_no_pad_collation_are_copied_and_compared_byte_for_byte() {
    let Some(test) = mariadb::fresh_db().await else {
        return;
    };
    let db = Database::connect(&test.url).await.unwrap();
    let key = "VARCHAR(32) COLLATE utf8mb4_nopad_bin";
    for sql in [
        format!(
            "CREATE TABLE legacy_t (k {key} PRIMARY KEY, label VARCHAR(20) COLLATE utf8mb4_bin NOT NULL)"
        ),
        format!("CREATE TABLE new_t (k {key} PRIMARY KEY, label VARCHAR(20) NOT NULL)"),
        "INSERT INTO legacy_t SELECT CONCAT('key-', seq), CONCAT('v', seq) FROM seq_1_to_3000"
            .into(),
    ] {
        Query::assert_safe(sql).execute(&db).await.unwrap();
    }
    let special = ["a", "A", "a ", "á", "a\u{301}", "ss", "ß", "", " "];
    for (i, k) in special.iter().enumerate() {
        query("INSERT INTO legacy_t (k, label) VALUES ($1, $2)")
            .bind(*k)
            .bind(format!("s{i}"))
            .execute(&db)
            .await
            .unwrap();
    }
    let def = key_definition("k");
    let store = dual_write_store(&db).await;
    let backfill =
        async |def: &twintrack::definition::MigrationDef| backfill_now(&db, &store, def).await;
    let verify = async |repair: bool| verify_now(&db, &store, &def, repair).await;

    let report = backfill(&def).await.unwrap();
    assert!(report.finished);
    assert_eq!(
        count(&db, "new_t").await,
        3009,
        "every key copied as itself"
    );
    for (i, k) in special.iter().enumerate() {
        let label: Option<String> = query("SELECT label FROM new_t WHERE k = $1")
            .bind(*k)
            .scalar(&db)
            .await
            .unwrap();
        assert_eq!(
            label.as_deref(),
            Some(format!("s{i}").as_str()),
            "key {k:?}"
        );
    }
    let v = verify(false).await;
    assert!(v.clean, "{:?}", v.lines());
    assert_eq!((v.legacy_rows, v.new_rows), (3009, 3009));

    // Planted: `A` missing, `a ` changed, `ß ` extra, `key-17`'s label in another case.
    for sql in [
        "DELETE FROM new_t WHERE k = 'A'",
        "UPDATE new_t SET label = 'changed' WHERE k = 'a '",
        "INSERT INTO new_t VALUES ('ß ', 'extra')",
        "UPDATE new_t SET label = 'V17' WHERE k = 'key-17'",
    ] {
        Query::assert_safe(sql).execute(&db).await.unwrap();
    }
    let v = verify(false).await;
    let texts = |keys: &[twintrack::DynKey]| keys.iter().map(|k| k.to_text()).collect::<Vec<_>>();
    assert_eq!(texts(&v.missing_in_new), ["A"], "{:?}", v.lines());
    assert_eq!(texts(&v.missing_in_legacy), ["ß "], "{:?}", v.lines());
    let mut changed: Vec<String> = v.different.iter().map(|d| d.key.to_text()).collect();
    changed.sort();
    assert_eq!(changed, ["a ", "key-17"], "{:?}", v.lines());
    assert_eq!(v.unexplained_segments, 0);
    let v = verify(true).await;
    assert_eq!(v.repaired.len(), 4, "{:?}", v.lines());
    let v = verify(false).await;
    assert!(v.clean, "after --repair: {:?}", v.lines());
    assert_eq!(count(&db, "new_t").await, 3009);

    // Every other text key column: refused with the reason, nothing written.
    for (column, says) in [
        ("VARCHAR(32)", "does not compare text byte for byte"),
        (
            "VARCHAR(32) COLLATE utf8mb4_bin",
            "its collation utf8mb4_bin does not compare text byte for byte",
        ),
        (
            "VARCHAR(32) COLLATE latin1_swedish_ci",
            "its collation latin1_swedish_ci",
        ),
        ("CHAR(32) COLLATE utf8mb4_nopad_bin", "char columns pad"),
        ("TEXT", "text columns pad or need a prefix index"),
        ("BINARY(16)", "a key column must be a signed bigint"),
    ] {
        Query::assert_safe(format!(
            "ALTER TABLE legacy_t ADD COLUMN other {column} NULL"
        ))
        .execute(&db)
        .await
        .unwrap();
        let runs: i64 = query("SELECT COUNT(*) FROM twintrack_backfill_runs")
            .scalar(&db)
            .await
            .unwrap();
        let err = backfill(&key_definition("other"))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(says) && err.contains("utf8mb4_nopad_bin"),
            "{column}: {err}"
        );
        let after: i64 = query("SELECT COUNT(*) FROM twintrack_backfill_runs")
            .scalar(&db)
            .await
            .unwrap();
        assert_eq!(after, runs, "{column}: nothing written");
        Query::assert_safe("ALTER TABLE legacy_t DROP COLUMN other")
            .execute(&db)
            .await
            .unwrap();
    }
}

/// MariaDB's `uuid` type as a key: its values arrive as text and are read as UUIDs; the
/// database compares two time-based (v1) UUIDs node field first, not byte for byte, and every
/// walk and range follows its order: a verify covers up to the largest key by the database's
/// order, so an extra row whose key is the database's largest but not Rust's is still found
/// (it was not, when twintrack picked the larger of the two tables' largest keys itself).
#[tokio::test(flavor = "multi_thread")]
async fn uuid_keys_are_walked_and_compared_in_the_databases_order() {
    let Some(test) = mariadb::fresh_db().await else {
        return;
    };
    let db = Database::connect(&test.url).await.unwrap();
    // Time-based (v1) UUIDs, which the database compares node field first: the largest by
    // its order and among the smallest by Rust's (byte for byte), and the reverse.
    let db_largest = "00000000-0000-1000-8000-ffffffffffff";
    let rust_largest = "ffffffff-0000-1000-8000-000000000000";
    for sql in [
        "CREATE TABLE legacy_t (k UUID PRIMARY KEY, label VARCHAR(20) NOT NULL)".to_owned(),
        "CREATE TABLE new_t (k UUID PRIMARY KEY, label VARCHAR(20) NOT NULL)".to_owned(),
        // `UUID()` makes v1 UUIDs.
        "INSERT INTO legacy_t SELECT UUID(), CONCAT('t', seq) FROM seq_1_to_3000".to_owned(),
        format!("INSERT INTO legacy_t VALUES ('{rust_largest}', 'top')"),
    ] {
        Query::assert_safe(sql).execute(&db).await.unwrap();
    }
    let def = key_definition("k");
    let store = dual_write_store(&db).await;
    let report = backfill_now(&db, &store, &def).await.unwrap();
    assert!(report.finished);
    let joined: i64 =
        query("SELECT COUNT(*) FROM legacy_t l JOIN new_t n ON n.k = l.k AND n.label = l.label")
            .scalar(&db)
            .await
            .unwrap();
    assert_eq!(joined, 3001, "every key copied as itself");
    let v = verify_now(&db, &store, &def, false).await;
    assert!(v.clean, "{:?}", v.lines());
    assert_eq!((v.legacy_rows, v.new_rows), (3001, 3001));

    // Planted: the Rust-largest key missing, a time-based key's label changed, an extra row
    // at the database's largest key.
    let changed: String = query("SELECT CAST(k AS CHAR) FROM legacy_t WHERE label = 't17'")
        .scalar(&db)
        .await
        .unwrap();
    for sql in [
        format!("DELETE FROM new_t WHERE k = '{rust_largest}'"),
        format!("UPDATE new_t SET label = 'changed' WHERE k = '{changed}'"),
        format!("INSERT INTO new_t VALUES ('{db_largest}', 'extra')"),
    ] {
        Query::assert_safe(sql).execute(&db).await.unwrap();
    }
    let v = verify_now(&db, &store, &def, false).await;
    let texts = |keys: &[twintrack::DynKey]| keys.iter().map(|k| k.to_text()).collect::<Vec<_>>();
    assert_eq!(texts(&v.missing_in_new), [rust_largest], "{:?}", v.lines());
    assert_eq!(texts(&v.missing_in_legacy), [db_largest], "{:?}", v.lines());
    let different: Vec<String> = v.different.iter().map(|d| d.key.to_text()).collect();
    assert_eq!(different, [changed], "{:?}", v.lines());
    let v = verify_now(&db, &store, &def, true).await;
    assert_eq!(v.repaired.len(), 3, "{:?}", v.lines());
    let v = verify_now(&db, &store, &def, false).await;
    assert!(v.clean, "after --repair: {:?}", v.lines());
    assert_eq!(count(&db, "new_t").await, 3001);
}

/// Migration `t` from `legacy_t` (keyed by `legacy_key`) to `new_t` (keyed by `k`), both with a
/// `label`, copied by an upsert; the tables are the caller's.
fn key_definition(legacy_key: &str) -> twintrack::definition::MigrationDef {
    twintrack::config::Config::parse(&format!(
        r#"
[[migration]]
name = "t"
legacy_table = "legacy_t"
legacy_key = ["{legacy_key}"]
new_table = "new_t"
new_key = ["k"]
copy = "INSERT INTO new_t SELECT k, label FROM legacy_t WHERE {{batch}} ON DUPLICATE KEY UPDATE label = VALUES(label)"
legacy_projection = "SELECT k AS \"key\", label FROM legacy_t"
new_projection = "SELECT k AS \"key\", label FROM new_t"
"#
    ))
    .unwrap()
    .migration("t")
    .unwrap()
    .definition(Backend::MySql)
    .unwrap()
}

/// The flag store in `db`, with migration `t` registered and forced to dual-write.
async fn dual_write_store(db: &Database) -> std::sync::Arc<twintrack::flags::SqlFlagStore> {
    use twintrack::flags::{FlagStore, SqlFlagStore, StageChange};
    let store = std::sync::Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register("t", "test").await.unwrap();
    store
        .set_stage(StageChange::new("t", twintrack::Stage::DualWrite, "test", "t").force(true))
        .await
        .unwrap();
    store
}

/// A backfill of `def` in batches of 500.
async fn backfill_now(
    db: &Database,
    store: &twintrack::flags::SqlFlagStore,
    def: &twintrack::definition::MigrationDef,
) -> twintrack::Result<twintrack::backfill::BackfillReport> {
    let options = twintrack::backfill::BackfillOptions {
        batch_size: 500,
        ..Default::default()
    };
    twintrack::backfill::run(
        db,
        store,
        def,
        options,
        twintrack::metrics::Metrics::global(),
        |_| {},
    )
    .await
}

/// A verify of `def` (re-checks 10 ms apart), `--repair` with `repair`.
async fn verify_now(
    db: &Database,
    store: &twintrack::flags::SqlFlagStore,
    def: &twintrack::definition::MigrationDef,
    repair: bool,
) -> twintrack::verify::VerifyReport {
    let options = twintrack::verify::VerifyOptions {
        repair,
        recheck_delay: Duration::from_millis(10),
        ..Default::default()
    };
    twintrack::verify::run(
        db,
        store,
        def,
        options,
        twintrack::metrics::Metrics::global(),
    )
    .await
    .unwrap()
}
