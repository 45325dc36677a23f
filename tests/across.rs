//! Two databases all the way: the new shape in a database of its own, through the quickstart
//! (`NEW_DATABASE_URL`) and the CLI (`new_database_url_env`, `--new-database-url`): dual writes
//! land there, backfill copies across with `copy_select`, verify compares each side in its own
//! database and its evidence opens the gates, planted divergences are reported exactly and
//! repaired. On SQLite (two files), PostgreSQL and MariaDB (two databases on one server).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twintrack::Database;
use twintrack::db::Query;

/// The second database of a test: another SQLite file beside the first, or another fresh
/// PostgreSQL database on the shared server.
async fn second(backend: &str, dir: &Path) -> String {
    match backend {
        "sqlite" => format!("sqlite://{}?mode=rwc", dir.join("new.db").display()),
        "mariadb" => common::mariadb::fresh_db().await.unwrap().url,
        _ => common::pg::fresh_db().await.unwrap().url,
    }
}

/// `twintrack --database-url URL --config CONFIG <args>` with `NEW_DATABASE_URL` set (what the
/// quickstart's `new_database_url_env` names): exit code, stdout, stderr.
fn tt(url: &str, new_url: Option<&str>, config: &Path, args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_twintrack"));
    cmd.arg("--database-url")
        .arg(url)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("TWINTRACK_NEW_DATABASE_URL")
        .env_remove("NEW_DATABASE_URL");
    if let Some(new_url) = new_url {
        cmd.env("NEW_DATABASE_URL", new_url);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

async fn exec(db: &Database, sql: &str) {
    Query::assert_safe(sql).execute(db).await.unwrap();
}

async fn count(db: &Database, table: &str) -> i64 {
    Query::assert_safe(format!("SELECT COUNT(*) FROM {table}"))
        .scalar(db)
        .await
        .unwrap()
}

async fn has_table(db: &Database, table: &str) -> bool {
    let sql = match db.backend() {
        twintrack::Backend::Postgres => {
            format!("SELECT CAST(to_regclass('{table}') IS NOT NULL AS INTEGER)")
        }
        twintrack::Backend::MySql => format!(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name = '{table}'"
        ),
        _ => {
            format!("SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '{table}'")
        }
    };
    Query::assert_safe(sql).scalar::<i64>(db).await.unwrap() > 0
}

struct Quickstart {
    child: Child,
    base: String,
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Quickstart {
    fn start(cwd: &Path, url: &str, new_url: &str) -> Quickstart {
        let mut child = Command::new(common::example_binary("quickstart"))
            .current_dir(cwd)
            .env("TWINTRACK_LISTEN", "127.0.0.1:0")
            .env("TWINTRACK_DEBUG_HEADERS", "1")
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", url)
            .env("NEW_DATABASE_URL", new_url)
            .env_remove("REPLICA_DATABASE_URLS")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let base = common::listening_base(&mut child, "quickstart");
        Quickstart { child, base }
    }
}

/// Waits until the running quickstart serves `stage` (its debug header).
async fn serves(base: &str, stage: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, headers, _) = common::http(base, "GET", "/users/1/settings", "", None).await;
        if headers
            .get("x-twintrack-stage")
            .and_then(|v| v.to_str().ok())
            == Some(stage)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the quickstart never served {stage}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The quickstart with `NEW_DATABASE_URL` and the CLI: dual writes land in the second
/// database; legacy rows (200,000 on PostgreSQL, 20,000 on SQLite) are backfilled across while
/// the service keeps writing; the cross-database verify is clean and `shadow` is allowed
/// without `--force`; 2 rows missing, 3 changed and 1 extra planted in the second database are
/// reported exactly; `--repair` makes it clean; `live` is allowed.
#[tokio::test(flavor = "multi_thread")]
async fn the_quickstart_and_the_cli_run_a_migration_across_two_databases() {
    for (backend, url, _guard) in common::backends_with_mariadb().await {
        let dir = tempfile::tempdir().unwrap();
        let new_url = second(backend, dir.path()).await;
        let config = common::quickstart_config();
        let cli = |args: &[&str]| tt(&url, Some(&new_url), &config, args);
        let qs = Quickstart::start(dir.path(), &url, &new_url);
        let legacy = Database::connect(&url).await.unwrap();
        let new = Database::connect(&new_url).await.unwrap();
        assert!(has_table(&legacy, "users").await && !has_table(&legacy, "user_settings").await);
        assert!(has_table(&new, "user_settings").await && !has_table(&new, "users").await);

        let (code, out, err) = cli(&["init"]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("the new shape of user_settings"), "{out}");
        assert_eq!(
            cli(&[
                "stage",
                "set",
                "user_settings",
                "dual_write",
                "--reason",
                "t"
            ])
            .0,
            0
        );
        serves(&qs.base, "dual_write").await;

        // A dual write reaches the second database.
        let (status, _, created) = common::http(
            &qs.base,
            "POST",
            "/users",
            r#"{"email":"first@example.com","theme":"dark","notifications_enabled":true}"#,
            None,
        )
        .await;
        assert_eq!(status, 201, "{created}");
        let first = created["id"].as_i64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while count(&new, "user_settings").await == 0 {
            assert!(
                Instant::now() < deadline,
                "the dual write never reached the new database"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Rows from before dual writes, in the legacy database only.
        let n: i64 = match backend {
            "postgres" => 200_000,
            "mariadb" => 50_000,
            _ => 20_000,
        };
        let seed = match backend {
            "postgres" => format!(
                "INSERT INTO users (id, email, profile) SELECT 100000 + g, 'u' || g || '@example.com',
                 jsonb_build_object('theme', 'theme' || (g % 7), 'notifications_enabled', g % 2 = 0)
                 FROM generate_series(1, {n}) g"
            ),
            "mariadb" => format!(
                r#"INSERT INTO users (id, email, profile) SELECT 100000 + seq, CONCAT('u', seq, '@example.com'),
                   CONCAT('{{"theme": "theme', seq % 7, '", "notifications_enabled": ', IF(seq % 2 = 0, 'true', 'false'), '}}')
                   FROM seq_1_to_{n}"#
            ),
            _ => format!(
                "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {n})
                 INSERT INTO users (id, email, profile) SELECT 100000 + i, 'u' || i || '@example.com',
                 json_object('theme', 'theme' || (i % 7), 'notifications_enabled', json(CASE WHEN i % 2 = 0 THEN 'true' ELSE 'false' END))
                 FROM g"
            ),
        };
        exec(&legacy, &seed).await;

        // The service keeps writing while the backfill runs: updates of old rows, new users,
        // deletes (in the upper half of the old rows: the lower half is planted on below).
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let base = qs.base.clone();
            tokio::spawn(async move {
                let mut i = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let id = 100_000 + n / 2 + (i * 7919) % (n / 2) + 1;
                    let path = format!("/users/{id}/settings");
                    let body = format!(r#"{{"theme":"w{i}","notifications_enabled":true}}"#);
                    let (status, _, _) = common::http(&base, "PUT", &path, &body, None).await;
                    assert!(status == 200 || status == 404, "PUT {status}");
                    if i % 5 == 0 {
                        let body = format!(
                            r#"{{"email":"w{i}@example.com","theme":"t","notifications_enabled":false}}"#
                        );
                        let (status, _, _) =
                            common::http(&base, "POST", "/users", &body, None).await;
                        assert_eq!(status, 201);
                    }
                    if i % 11 == 0 {
                        let (status, _, _) = common::http(
                            &base,
                            "DELETE",
                            &format!("/users/{}", 100_000 + n / 2 + (i * 104_729) % (n / 2) + 1),
                            "",
                            None,
                        )
                        .await;
                        assert!(status == 204 || status == 404, "DELETE {status}");
                    }
                }
                i
            })
        };
        let (code, out, err) = cli(&[
            "--json",
            "backfill",
            "user_settings",
            "--batch-size",
            "2000",
        ]);
        stop.store(true, Ordering::Relaxed);
        let writes = writer.await.unwrap();
        assert_eq!(code, 0, "{err}");
        let report = json_of(&out);
        assert!(report["finished"].as_bool().unwrap(), "{report}");
        assert!(writes > 0);
        assert!(
            report["rows_copied"].as_i64().unwrap() >= n - writes,
            "{report}"
        );
        // Every legacy user has its settings in the other database (second sides of the last
        // writes may still be in flight: the verify's second look waits for them).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (code, out, err) = cli(&["--json", "verify", "user_settings"]);
        assert_eq!(code, 0, "{out}{err}");
        let report = json_of(&out);
        assert_eq!(report["legacy_rows"], report["new_rows"], "{report}");
        assert_eq!(
            report["legacy_rows"].as_i64().unwrap(),
            count(&legacy, "users").await,
            "{report}"
        );
        // PostgreSQL agrees on the whole range in one summary per side: nothing is cut.
        let segments = if backend == "postgres" { 1 } else { 64 };
        assert_eq!(report["segments"], segments, "{report}");
        assert_eq!(
            cli(&["stage", "set", "user_settings", "shadow", "--reason", "t"]).0,
            0
        );

        // Planted in the second database: 2 rows missing, 3 changed, 1 extra.
        let k = |i: i64| 100_000 + i;
        exec(
            &new,
            &format!(
                "DELETE FROM user_settings WHERE user_id IN ({}, {})",
                k(10),
                k(20)
            ),
        )
        .await;
        exec(
            &new,
            &format!(
                "UPDATE user_settings SET theme = 'planted' WHERE user_id IN ({}, {}, {})",
                k(30),
                k(40),
                k(50)
            ),
        )
        .await;
        let truth = if backend == "postgres" { "TRUE" } else { "1" };
        exec(
            &new,
            &format!("INSERT INTO user_settings VALUES (99999999, 'extra', {truth})"),
        )
        .await;
        let (code, out, _) = cli(&["--json", "verify", "user_settings", "--segments", "16"]);
        assert_eq!(code, 1, "{out}");
        let report = json_of(&out);
        assert_eq!(report["missing_in_new"], json!([k(10), k(20)]), "{report}");
        assert_eq!(report["missing_in_legacy"], json!([99999999]), "{report}");
        assert_eq!(
            report["different"],
            json!([
                {"key": k(30), "columns": ["theme"]},
                {"key": k(40), "columns": ["theme"]},
                {"key": k(50), "columns": ["theme"]}
            ]),
            "{report}"
        );
        let (code, out, err) = cli(&["--json", "verify", "user_settings", "--repair"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(json_of(&out)["repaired"].as_array().unwrap().len(), 6);
        assert_eq!(cli(&["verify", "user_settings"]).0, 0);
        assert_eq!(
            count(&new, "user_settings WHERE user_id = 99999999").await,
            0,
            "the extra row is removed"
        );
        assert_eq!(
            cli(&["stage", "set", "user_settings", "live", "--reason", "t"]).0,
            0
        );
        serves(&qs.base, "live").await;
        // Reads now come from the second database.
        let (status, _, got) = common::http(
            &qs.base,
            "GET",
            &format!("/users/{first}/settings"),
            "",
            None,
        )
        .await;
        assert_eq!(
            (status, got),
            (200, json!({"theme":"dark","notifications_enabled":true}))
        );
        drop(qs);
    }
}

/// A one-to-many new shape (`item_tag(item_id, tag)`, no unique key) in a second database:
/// each batch replaces its keys' rows; verify compares each key's rows as multisets across the
/// databases (a duplicated tag, a changed tag, a key with no rows, a key the legacy side lost),
/// and `--repair` copies exactly those keys.
#[tokio::test(flavor = "multi_thread")]
async fn a_one_to_many_shape_in_a_second_database_is_copied_compared_and_repaired() {
    for (backend, url, _guard) in common::backends_with_mariadb().await {
        let dir = tempfile::tempdir().unwrap();
        let new_url = second(backend, dir.path()).await;
        let legacy = Database::connect(&url).await.unwrap();
        let new = Database::connect(&new_url).await.unwrap();
        let (tags_type, seed, copy_select, legacy_projection) = match backend {
            "postgres" => (
                "JSONB",
                "INSERT INTO items SELECT g, jsonb_build_array('a' || (g % 3), 'b' || (g % 5), 'c') FROM generate_series(1, 3000) g",
                "SELECT i.id AS item_id, t AS tag FROM items i, jsonb_array_elements_text(i.tags) t WHERE {batch:i}",
                "SELECT id AS key, t AS tag FROM items, jsonb_array_elements_text(tags) t",
            ),
            "mariadb" => (
                "TEXT",
                "INSERT INTO items SELECT seq, JSON_ARRAY(CONCAT('a', seq % 3), CONCAT('b', seq % 5), 'c') FROM seq_1_to_3000",
                "SELECT i.id AS item_id, t.tag FROM items i, JSON_TABLE(i.tags, '$[*]' COLUMNS (tag VARCHAR(40) PATH '$')) t WHERE {batch:i}",
                "SELECT items.id AS \\\"key\\\", t.tag FROM items, JSON_TABLE(items.tags, '$[*]' COLUMNS (tag VARCHAR(40) PATH '$')) t",
            ),
            _ => (
                "TEXT",
                "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < 3000)
                 INSERT INTO items SELECT i, json_array('a' || (i % 3), 'b' || (i % 5), 'c') FROM g",
                "SELECT i.id AS item_id, j.value AS tag FROM items i, json_each(i.tags) j WHERE {batch:i}",
                "SELECT items.id AS key, j.value AS tag FROM items, json_each(items.tags) j",
            ),
        };
        exec(
            &legacy,
            &format!("CREATE TABLE items (id BIGINT PRIMARY KEY, tags {tags_type} NOT NULL)"),
        )
        .await;
        exec(&legacy, seed).await;
        exec(
            &new,
            "CREATE TABLE item_tag (item_id BIGINT NOT NULL, tag TEXT NOT NULL)",
        )
        .await;
        let config = dir.path().join("twintrack.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[[migration]]
name = "item_tags"
legacy_table = "items"
legacy_key = "id"
new_table = "item_tag"
new_key = "item_id"
new_database_url_env = "NEW_DATABASE_URL"
copy_select = "{copy_select}"
legacy_projection = "{legacy_projection}"
new_projection = "SELECT item_id AS \"key\", tag FROM item_tag"
"#
            ),
        )
        .unwrap();
        let cli = |args: &[&str]| tt(&url, Some(&new_url), &config, args);
        assert_eq!(cli(&["init"]).0, 0);
        assert_eq!(
            cli(&["stage", "set", "item_tags", "dual_write", "--reason", "t"]).0,
            0
        );
        let (code, out, err) = cli(&["--json", "backfill", "item_tags", "--batch-size", "500"]);
        assert_eq!(code, 0, "{err}");
        assert_eq!(json_of(&out)["rows_copied"], 9000, "{out}");
        assert_eq!(count(&new, "item_tag").await, 9000);
        let (code, out, _) = cli(&["--json", "verify", "item_tags"]);
        assert_eq!(code, 0, "{out}");
        assert_eq!(json_of(&out)["new_rows"], 9000);
        // A run again changes nothing (rows replaced by equal ones).
        exec(&new, "INSERT INTO item_tag VALUES (5, 'c')").await;
        exec(
            &new,
            "UPDATE item_tag SET tag = 'zz' WHERE item_id = 6 AND tag = 'c'",
        )
        .await;
        exec(&new, "DELETE FROM item_tag WHERE item_id = 7").await;
        exec(&legacy, "DELETE FROM items WHERE id = 8").await;
        let (code, out, _) = cli(&["--json", "verify", "item_tags", "--segments", "8"]);
        assert_eq!(code, 1, "{out}");
        let report = json_of(&out);
        assert_eq!(report["missing_in_new"], json!([7]), "{report}");
        assert_eq!(report["missing_in_legacy"], json!([8]), "{report}");
        assert_eq!(
            report["different"],
            json!([{"key": 5, "columns": ["tag"]}, {"key": 6, "columns": ["tag"]}]),
            "{report}"
        );
        let (code, out, err) = cli(&["--json", "verify", "item_tags", "--repair"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(json_of(&out)["repaired"], json!([5, 6, 7, 8]));
        assert_eq!(count(&new, "item_tag").await, 8997);
        assert_eq!(cli(&["verify", "item_tags"]).0, 0);
    }
}

/// Bad input across two databases is refused before anything is written: a second database
/// that cannot be reached (exit 4, naming it), a definition without `copy_select` (exit 2,
/// naming what to add), a forward backfill while the new shape is written first (exit 3).
#[tokio::test(flavor = "multi_thread")]
async fn two_database_mistakes_are_refused_before_anything_is_written() {
    for (backend, url, _guard) in common::backends_with_mariadb().await {
        let dir = tempfile::tempdir().unwrap();
        let new_url = second(backend, dir.path()).await;
        let legacy = Database::connect(&url).await.unwrap();
        let new = Database::connect(&new_url).await.unwrap();
        exec(
            &legacy,
            "CREATE TABLE ext_legacy (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        )
        .await;
        exec(&legacy, "INSERT INTO ext_legacy VALUES (1, 'a'), (2, 'b')").await;
        exec(
            &new,
            "CREATE TABLE ext_new (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        )
        .await;
        let write = |name: &str, extra: &str| {
            let path = dir.path().join(name);
            std::fs::write(
                &path,
                format!(
                    r#"
[[migration]]
name = "ext"
legacy_table = "ext_legacy"
legacy_key = "id"
new_table = "ext_new"
new_key = "id"
new_database_url_env = "NEW_DATABASE_URL"
legacy_projection = "SELECT id AS \"key\", v FROM ext_legacy"
new_projection = "SELECT id AS \"key\", v FROM ext_new"
{extra}
"#
                ),
            )
            .unwrap();
            path
        };
        let without = write("without.toml", "");
        let with = write(
            "with.toml",
            r#"copy_select = "SELECT id, v FROM ext_legacy WHERE {batch}""#,
        );
        assert_eq!(tt(&url, Some(&new_url), &with, &["init"]).0, 0);
        assert_eq!(
            tt(
                &url,
                Some(&new_url),
                &with,
                &["stage", "set", "ext", "dual_write", "--reason", "t"]
            )
            .0,
            0
        );
        // An unreachable second database, given by the variable or by the flag.
        let nowhere = "postgres://twintrack@127.0.0.1:1/nowhere";
        for args in [
            vec!["verify", "ext"],
            vec!["--new-database-url", nowhere, "backfill", "ext"],
        ] {
            let (code, _, err) = tt(&url, Some(nowhere), &with, &args);
            assert_eq!(code, 4, "{args:?}: {err}");
            assert!(err.contains("the new database"), "{err}");
        }
        // No cross-database copy.
        let (code, _, err) = tt(&url, Some(&new_url), &without, &["backfill", "ext"]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("add `copy_select`"), "{err}");
        let (code, _, err) = tt(
            &url,
            Some(&new_url),
            &without,
            &["verify", "ext", "--repair"],
        );
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("copy_select"), "{err}");
        // A select that misses the target key, or selects a column the target lacks.
        for (select, says) in [
            (
                "SELECT v FROM ext_legacy WHERE {batch}",
                "target key column id",
            ),
            (
                "SELECT id, v, v AS w FROM ext_legacy WHERE {batch}",
                "selects w",
            ),
            ("SELECT id, v FROM ext_legacy", "{batch}"),
        ] {
            let bad = write("bad.toml", &format!("copy_select = \"{select}\""));
            let (code, _, err) = tt(&url, Some(&new_url), &bad, &["backfill", "ext"]);
            assert_eq!(code, 2, "{select}: {err}");
            assert!(err.contains(says), "{select}: {err}");
        }
        assert_eq!(count(&new, "ext_new").await, 0);
        assert_eq!(count(&legacy, "twintrack_backfill_runs").await, 0);
        // The new shape written first (live): a forward backfill across is refused.
        let (code, _, err) = tt(
            &url,
            Some(&new_url),
            &with,
            &["stage", "set", "ext", "live", "--force", "--reason", "t"],
        );
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = tt(&url, Some(&new_url), &with, &["backfill", "ext"]);
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("rollback"), "{err}");
        assert_eq!(count(&new, "ext_new").await, 0);
        assert_eq!(count(&legacy, "twintrack_backfill_runs").await, 0);
    }
}

/// PostgreSQL rows cross as the text PostgreSQL wrote: `numeric` past a double's precision,
/// `json` with duplicate and unsorted keys, arrays, `bytea` and non-finite floats arrive
/// exactly. A target keyed by a covering unique index (`INCLUDE`) is upserted, so a column the
/// select does not write keeps its value.
#[tokio::test(flavor = "multi_thread")]
async fn exact_values_cross_the_databases_and_unselected_columns_keep_theirs() {
    let (Some(a), Some(b)) = (common::pg::fresh_db().await, common::pg::fresh_db().await) else {
        return;
    };
    let legacy = Database::connect(&a.url).await.unwrap();
    let new = Database::connect(&b.url).await.unwrap();
    let cols = "n NUMERIC, j JSON, arr INT[], b BYTEA, f DOUBLE PRECISION";
    exec(
        &legacy,
        &format!("CREATE TABLE src (id BIGINT PRIMARY KEY, {cols})"),
    )
    .await;
    exec(
        &new,
        &format!("CREATE TABLE dst (id BIGINT NOT NULL, {cols}, note TEXT NOT NULL DEFAULT 'default', UNIQUE (id) INCLUDE (note))"),
    )
    .await;
    exec(
        &legacy,
        r#"INSERT INTO src VALUES
           (1, 12345678901234567890123.000000000000000001, '{"z": 1, "a": 2, "z": 3}', '{1,2,3}', '\x00ff', 'NaN'),
           (2, 0.1234567890123456789, '[1.00, 2e400]', '{}', '\x', '-Infinity'),
           (3, NULL, NULL, NULL, NULL, NULL)"#,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twintrack.toml");
    std::fs::write(
        &config,
        r#"
[[migration]]
name = "exact"
legacy_table = "src"
legacy_key = "id"
new_table = "dst"
new_key = "id"
new_database_url_env = "NEW_DATABASE_URL"
copy_select = "SELECT id, n, j, arr, b, f FROM src WHERE {batch}"
reverse_copy_select = "SELECT id, n FROM dst WHERE {batch}"
legacy_projection = "SELECT id AS key, CAST(n AS TEXT) AS n, CAST(j AS TEXT) AS j, arr, b, CAST(f AS TEXT) AS f FROM src"
new_projection = "SELECT id AS key, CAST(n AS TEXT) AS n, CAST(j AS TEXT) AS j, arr, b, CAST(f AS TEXT) AS f FROM dst"
"#,
    )
    .unwrap();
    let cli = |args: &[&str]| tt(&a.url, Some(&b.url), &config, args);
    assert_eq!(cli(&["init"]).0, 0);
    assert_eq!(
        cli(&["stage", "set", "exact", "dual_write", "--reason", "t"]).0,
        0
    );
    let (code, _, err) = cli(&["backfill", "exact"]);
    assert_eq!(code, 0, "{err}");
    let text = |db: Database, table: &'static str| async move {
        Query::assert_safe(format!(
            "SELECT string_agg(CAST(n AS TEXT) || '|' || CAST(j AS TEXT) || '|' || CAST(arr AS TEXT) || '|' || CAST(b AS TEXT) || '|' || CAST(f AS TEXT), ';' ORDER BY id) FROM {table}"
        ))
        .scalar::<String>(&db)
        .await
        .unwrap()
    };
    assert_eq!(
        text(legacy.clone(), "src").await,
        text(new.clone(), "dst").await
    );
    let (code, out, _) = cli(&["--json", "verify", "exact"]);
    assert_eq!(code, 0, "{out}");
    // Upserted, not replaced: a column the select does not write keeps its value.
    exec(&new, "UPDATE dst SET note = 'kept'").await;
    exec(&legacy, "UPDATE src SET n = 7 WHERE id = 1").await;
    assert_eq!(
        cli(&["stage", "set", "exact", "legacy_only", "--reason", "t"]).0,
        0
    );
    assert_eq!(
        cli(&["stage", "set", "exact", "dual_write", "--reason", "t"]).0,
        0
    );
    let (code, _, err) = cli(&["backfill", "exact"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&new, "dst WHERE note = 'kept'").await, 3);
    assert_eq!(count(&new, "dst WHERE n = 7").await, 1);
    // A reverse copy (new written first) updates the legacy rows that exist, never inserts.
    assert_eq!(cli(&["verify", "exact"]).0, 0);
    for stage in ["shadow", "live"] {
        assert_eq!(cli(&["stage", "set", "exact", stage, "--reason", "t"]).0, 0);
    }
    exec(&new, "UPDATE dst SET n = 8 WHERE id = 1").await;
    exec(&new, "INSERT INTO dst (id, n) VALUES (99, 1)").await;
    let (code, _, err) = cli(&["backfill", "exact", "--reverse"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(count(&legacy, "src WHERE id = 1 AND n = 8").await, 1);
    assert_eq!(count(&legacy, "src").await, 3, "no legacy row is created");
}

/// A forward backfill across two databases waits while a repair intent in the new database
/// still has to bring a write to legacy (acknowledged while new was written first): copying
/// legacy's older row then would overwrite it. Once the intent is settled, it goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_across_waits_for_intents_that_target_its_source() {
    let Some(a) = common::pg::fresh_db().await else {
        return;
    };
    let b = common::pg::fresh_db().await.unwrap();
    let legacy = Database::connect(&a.url).await.unwrap();
    let new = Database::connect(&b.url).await.unwrap();
    exec(
        &legacy,
        "CREATE TABLE src (id BIGINT PRIMARY KEY, n INTEGER NOT NULL)",
    )
    .await;
    exec(
        &new,
        "CREATE TABLE dst (id BIGINT PRIMARY KEY, n INTEGER NOT NULL)",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("twintrack.toml");
    std::fs::write(
        &config,
        r#"
[[migration]]
name = "pending"
legacy_table = "src"
legacy_key = "id"
new_table = "dst"
new_key = "id"
new_database_url_env = "NEW_DATABASE_URL"
copy_select = "SELECT id, n FROM src WHERE {batch}"
"#,
    )
    .unwrap();
    let cli = |args: &[&str]| tt(&a.url, Some(&b.url), &config, args);
    assert_eq!(cli(&["init"]).0, 0);
    assert_eq!(
        cli(&["stage", "set", "pending", "dual_write", "--reason", "t"]).0,
        0
    );
    // Key 1's write (n = 2) landed in the new database while it was written first; its copy to
    // legacy (still n = 1) waits in an intent there.
    exec(&legacy, "INSERT INTO src VALUES (1, 1), (2, 20)").await;
    exec(&new, "INSERT INTO dst VALUES (1, 2)").await;
    exec(
        &new,
        "INSERT INTO twintrack_repair_intents (migration, key_text, key, target_side, created_at, last_error)
         VALUES ('pending', '1', 1, 'legacy', 1, 'pending')",
    )
    .await;
    let mut backfill = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(&a.url)
        .arg("--config")
        .arg(&config)
        .args(["backfill", "pending"])
        .env("NEW_DATABASE_URL", &b.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        backfill.try_wait().unwrap().is_none(),
        "the backfill went on with an intent targeting its source"
    );
    let n = |db: Database, sql: &'static str| async move {
        Query::assert_safe(sql).scalar::<i32>(&db).await.unwrap()
    };
    assert_eq!(n(new.clone(), "SELECT n FROM dst WHERE id = 1").await, 2);
    // The repair worker's settling: the write reaches legacy, the intent goes.
    exec(&legacy, "UPDATE src SET n = 2 WHERE id = 1").await;
    exec(&new, "DELETE FROM twintrack_repair_intents").await;
    let out = backfill.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(n(new.clone(), "SELECT n FROM dst WHERE id = 1").await, 2);
    assert_eq!(n(new.clone(), "SELECT n FROM dst WHERE id = 2").await, 20);
}
