//! Keys of every shape, end to end through the `twintrack` CLI on real databases: composite
//! keys, the ends of the `bigint` range, a skewed key distribution, the `$1`/`$2` bounds of
//! definitions written before `{batch}`, keys of the wrong type, and twintrack's own tables
//! upgraded from integer keys to key text without losing a row.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use twintrack::Database;
use twintrack::db::{Query, query};

/// `twintrack --database-url URL --config CONFIG ARGS…`: exit code, stdout, stderr.
fn tt(url: &str, config: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(url)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
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

/// Writes `text` as the config file of a test (in `dir`, made if missing) and returns its path.
fn config(dir: &Path, text: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("twintrack.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `(tenant_id bigint, id uuid)` on PostgreSQL, `(tenant_id integer, id text)` on SQLite:
/// backfilled, verified clean, then a changed row and a missing one reported by their keys (a
/// JSON array) and the changed column, checked one key at a time, and repaired.
#[tokio::test(flavor = "multi_thread")]
async fn a_composite_key_is_backfilled_verified_and_its_differences_reported_by_key() {
    for (backend, url, _guard) in common::backends().await {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::connect(&url).await.unwrap();
        let (schema, copy, legacy_projection, seed) = match backend {
            "postgres" => (
                [
                    "CREATE TABLE legacy_items (tenant_id bigint NOT NULL, id uuid NOT NULL, payload jsonb NOT NULL, PRIMARY KEY (tenant_id, id))",
                    "CREATE TABLE items (tenant_id bigint NOT NULL, id uuid NOT NULL, name text NOT NULL, qty integer NOT NULL, PRIMARY KEY (tenant_id, id))",
                ],
                "INSERT INTO items (tenant_id, id, name, qty) SELECT tenant_id, id, payload->>'name', CAST(payload->>'qty' AS INTEGER) FROM legacy_items WHERE {batch} ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name, qty = excluded.qty",
                "SELECT tenant_id AS key1, id AS key2, payload->>'name' AS name, CAST(payload->>'qty' AS INTEGER) AS qty FROM legacy_items",
                "INSERT INTO legacy_items SELECT t, gen_random_uuid(), jsonb_build_object('name', 'n' || g, 'qty', g) FROM generate_series(1, 20) t, generate_series(1, 500) g",
            ),
            _ => (
                [
                    "CREATE TABLE legacy_items (tenant_id INTEGER NOT NULL, id TEXT NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (tenant_id, id))",
                    "CREATE TABLE items (tenant_id INTEGER NOT NULL, id TEXT NOT NULL, name TEXT NOT NULL, qty INTEGER NOT NULL, PRIMARY KEY (tenant_id, id))",
                ],
                "INSERT INTO items (tenant_id, id, name, qty) SELECT tenant_id, id, json_extract(payload, '$.name'), json_extract(payload, '$.qty') FROM legacy_items WHERE {batch} ON CONFLICT (tenant_id, id) DO UPDATE SET name = excluded.name, qty = excluded.qty",
                "SELECT tenant_id AS key1, id AS key2, json_extract(payload, '$.name') AS name, json_extract(payload, '$.qty') AS qty FROM legacy_items",
                "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 20),
                      g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 500)
                 INSERT INTO legacy_items SELECT t.n, lower(hex(randomblob(8))), json_object('name', 'n' || g.n, 'qty', g.n) FROM t, g",
            ),
        };
        for sql in schema {
            exec(&db, sql).await;
        }
        exec(&db, seed).await;
        let config = config(
            dir.path(),
            &format!(
                r#"
[[migration]]
name = "items"
legacy_table = "legacy_items"
legacy_key = ["tenant_id", "id"]
new_table = "items"
new_key = ["tenant_id", "id"]
copy = "{copy}"
legacy_projection = "{legacy_projection}"
new_projection = "SELECT tenant_id AS key1, id AS key2, name, qty FROM items"
"#
            ),
        );
        let run = |args: &[&str]| tt(&url, &config, args);
        assert_eq!(run(&["init"]).0, 0);
        let (code, _, err) = run(&["stage", "set", "items", "dual_write", "--reason", "go"]);
        assert_eq!(code, 0, "{err}");
        let (code, out, err) = run(&["--json", "backfill", "items", "--batch-size", "700"]);
        assert_eq!(code, 0, "{backend}: {err}");
        let report = json_of(&out);
        assert_eq!(report["rows_copied"], 10_000, "{report}");
        assert_eq!(report["upper_bound"].as_array().map(Vec::len), Some(2));
        assert_eq!(count(&db, "items").await, 10_000);
        // Four segments of 2,500 rows: differing ones are cut again before rows are compared.
        let (code, out, err) = run(&["--json", "verify", "items", "--segments", "4"]);
        assert_eq!(code, 0, "{backend}: {out}{err}");
        assert_eq!(json_of(&out)["legacy_rows"], 10_000);

        let pick = async |offset: i64| -> Value {
            let row = Query::assert_safe(format!(
                "SELECT tenant_id, id FROM items ORDER BY tenant_id, id LIMIT 1 OFFSET {offset}"
            ))
            .fetch_one(&db)
            .await
            .unwrap();
            let key = twintrack::DynKey::from_values(
                row.into_values(),
                &[
                    twintrack::KeyKind::BigInt,
                    if backend == "postgres" {
                        twintrack::KeyKind::Uuid
                    } else {
                        twintrack::KeyKind::Text
                    },
                ],
            )
            .unwrap();
            key.to_json()
        };
        let (changed, missing) = (pick(1234).await, pick(8765).await);
        let bind = |key: &Value, sql: &'static str| {
            let q = query(sql).bind(key[0].as_i64().unwrap());
            match backend {
                "postgres" => q.bind(uuid::Uuid::parse_str(key[1].as_str().unwrap()).unwrap()),
                _ => q.bind(key[1].as_str().unwrap()),
            }
        };
        bind(
            &changed,
            "UPDATE items SET qty = -1 WHERE tenant_id = $1 AND id = $2",
        )
        .execute(&db)
        .await
        .unwrap();
        bind(
            &missing,
            "DELETE FROM items WHERE tenant_id = $1 AND id = $2",
        )
        .execute(&db)
        .await
        .unwrap();
        let (code, out, _) = run(&["--json", "verify", "items", "--segments", "4"]);
        assert_eq!(code, 1, "{backend}: {out}");
        let report = json_of(&out);
        assert_eq!(report["missing_in_new"], json!([missing]), "{report}");
        assert_eq!(
            report["different"],
            json!([{"key": changed, "columns": ["qty"]}]),
            "{report}"
        );
        let (code, out, _) = run(&["verify", "items"]);
        assert_eq!(code, 1);
        let shown = format!(
            "different [{},\"{}\"] (qty)",
            changed[0],
            changed[1].as_str().unwrap()
        );
        assert!(out.contains(&shown), "{shown:?} in {out}");

        // One key at a time: the changed one differs, a clean one does not.
        let (code, out, _) = run(&["--json", "verify", "items", "--key", &changed.to_string()]);
        assert_eq!(code, 1, "{out}");
        assert_eq!(json_of(&out)["different"][0]["key"], changed);
        let clean = pick(10).await.to_string();
        let (code, out, _) = run(&["verify", "items", "--key", &clean]);
        assert_eq!(code, 0, "{out}");
        // A key of the wrong shape is refused, naming it.
        for bad in ["5", "[5]", "[\"x\", \"y\"]", "[5, 6]", "not json"] {
            let (code, _, err) = run(&["verify", "items", "--key", bad]);
            assert_eq!(code, 2, "{bad}: {err}");
            assert!(err.contains(&format!("key {bad:?}")), "{bad}: {err}");
        }

        let (code, out, err) = run(&["verify", "items", "--repair"]);
        assert_eq!(code, 0, "{out}{err}");
        assert_eq!(run(&["verify", "items"]).0, 0);
        assert_eq!(count(&db, "items").await, 10_000);
    }
}

const EXT_COPY_BATCH: &str = "INSERT INTO ext_new (id, v) SELECT id, v FROM ext_legacy WHERE {batch} ON CONFLICT (id) DO UPDATE SET v = excluded.v";
const EXT_COPY_BOUNDS: &str = "INSERT INTO ext_new (id, v) SELECT id, v FROM ext_legacy WHERE id > $1 AND id <= $2 ON CONFLICT (id) DO UPDATE SET v = excluded.v";

fn ext_config(dir: &Path, copy: &str) -> std::path::PathBuf {
    config(
        dir,
        &format!(
            r#"
[[migration]]
name = "ext"
legacy_table = "ext_legacy"
legacy_key = "id"
new_table = "ext_new"
new_key = "id"
copy = "{copy}"
legacy_projection = "SELECT id AS key, v FROM ext_legacy"
new_projection = "SELECT id AS key, v FROM ext_new"
"#
        ),
    )
}

/// Keys at both ends of the `bigint` range and around zero, through both ways of bounding a
/// batch (`{batch}`, and the `$1`/`$2` of definitions written before it): every row copied
/// and compared, with no arithmetic on keys, so nothing overflows, loops or is left out (the
/// field reports: `1` and `i64::MAX` never ending, `±9e18` out of range, `i64::MIN` never
/// copied). The smallest key, deleted from the new shape, is reported missing and repaired.
#[tokio::test(flavor = "multi_thread")]
async fn keys_at_the_ends_of_the_range_are_all_copied_and_compared() {
    let bigint: &[&[i64]] = &[
        &[1, i64::MAX],
        &[-9_000_000_000_000_000_000, 9_000_000_000_000_000_000],
        &[i64::MIN, i64::MIN + 1],
        &[i64::MIN, i64::MAX],
        &[i64::MIN, i64::MIN + 1, -7, 0, 1, i64::MAX - 1, i64::MAX],
    ];
    let min = i64::from(i32::MIN);
    let max = i64::from(i32::MAX);
    let integer: &[&[i64]] = &[&[1, max], &[min, min + 1], &[min, -7, 0, max - 1, max]];
    for (backend, url, _guard) in common::backends().await {
        // SQLite's INTEGER is 64-bit: `integer` (32-bit) keys on PostgreSQL only.
        let types: &[(&str, &[&[i64]])] = if backend == "postgres" {
            &[("BIGINT", bigint), ("INTEGER", integer)]
        } else {
            &[("BIGINT", bigint)]
        };
        for (ty, sets) in types {
            ends_of(backend, &url, ty, sets).await;
        }
    }
}

/// [`keys_at_the_ends_of_the_range_are_all_copied_and_compared`] for key columns of type `ty`.
async fn ends_of(backend: &str, url: &str, ty: &str, sets: &[&[i64]]) {
    let url = url.to_owned();
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&url).await.unwrap();
    for table in ["ext_legacy", "ext_new"] {
        exec(&db, &format!("DROP TABLE IF EXISTS {table}")).await;
        exec(
            &db,
            &format!("CREATE TABLE {table} (id {ty} PRIMARY KEY, v TEXT NOT NULL)"),
        )
        .await;
    }
    let batch = ext_config(dir.path(), EXT_COPY_BATCH);
    assert_eq!(tt(&url, &batch, &["init"]).0, 0);
    assert_eq!(
        tt(
            &url,
            &batch,
            &["stage", "set", "ext", "dual_write", "--reason", "go"]
        )
        .0,
        0
    );
    let bounds = ext_config(&dir.path().join("bounds"), EXT_COPY_BOUNDS);
    for keys in sets.iter().copied() {
        for (form, config) in [("{batch}", &batch), ("$1/$2", &bounds)] {
            for batch_size in ["1", "1000"] {
                let case = format!("{backend} {ty} {form} keys {keys:?} batch {batch_size}");
                let run = |args: &[&str]| tt(&url, config, args);
                exec(&db, "DELETE FROM ext_legacy").await;
                exec(&db, "DELETE FROM ext_new").await;
                for k in keys {
                    query("INSERT INTO ext_legacy (id, v) VALUES ($1, $2)")
                        .bind(*k)
                        .bind(format!("v{k}"))
                        .execute(&db)
                        .await
                        .unwrap();
                }
                let (code, out, err) =
                    run(&["--json", "backfill", "ext", "--batch-size", batch_size]);
                assert_eq!(code, 0, "{case}: {err}");
                let report = json_of(&out);
                assert_eq!(report["rows_copied"], json!(keys.len()), "{case}: {report}");
                assert_eq!(count(&db, "ext_new").await, keys.len() as i64, "{case}");
                let (code, out, _) = run(&["--json", "verify", "ext", "--segments", "3"]);
                assert_eq!(code, 0, "{case}: {out}");
                assert_eq!(json_of(&out)["legacy_rows"], json!(keys.len()), "{case}");

                query("DELETE FROM ext_new WHERE id = $1")
                    .bind(keys[0])
                    .execute(&db)
                    .await
                    .unwrap();
                let (code, out, _) = run(&["--json", "verify", "ext", "--segments", "3"]);
                assert_eq!(code, 1, "{case}: {out}");
                assert_eq!(json_of(&out)["missing_in_new"], json!([keys[0]]), "{case}");
                let (code, out, err) = run(&["verify", "ext", "--repair"]);
                assert_eq!(code, 0, "{case}: {out}{err}");
                assert_eq!(count(&db, "ext_new").await, keys.len() as i64, "{case}");
            }
        }
    }
    // `$1` cast to the key's type cannot take a bound below every bigint: a batch starting at
    // i64::MIN is refused as bad input naming {batch}, and nothing is copied.
    if backend == "postgres" && ty == "BIGINT" {
        let cast = ext_config(
            &dir.path().join("cast"),
            &EXT_COPY_BOUNDS.replace("$1", "$1::bigint"),
        );
        exec(&db, "DELETE FROM ext_legacy").await;
        exec(&db, "DELETE FROM ext_new").await;
        for k in [i64::MIN, 5] {
            query("INSERT INTO ext_legacy (id, v) VALUES ($1, 'x')")
                .bind(k)
                .execute(&db)
                .await
                .unwrap();
        }
        let (code, _, err) = tt(&url, &cast, &["backfill", "ext"]);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains("{batch}") && err.contains("below every bigint"),
            "{err}"
        );
        assert_eq!(count(&db, "ext_new").await, 0);
        // Abandon the refused run (as moving back to legacy_only does), for the next types.
        for stage in ["legacy_only", "dual_write"] {
            assert_eq!(
                tt(
                    &url,
                    &cast,
                    &["stage", "set", "ext", stage, "--reason", "t"]
                )
                .0,
                0
            );
        }
    }
}

/// A million keys, 99% of them in 1% of the range: chunks are cut at the table's own keys, so
/// they hold the same number of rows however the keys are spread (the largest at most twice the
/// median), and every row is copied and compared. (PostgreSQL.)
#[tokio::test(flavor = "multi_thread")]
async fn a_skewed_million_row_table_is_cut_into_even_chunks() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&pg.url).await.unwrap();
    for table in ["ext_legacy", "ext_new"] {
        exec(
            &db,
            &format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, v TEXT NOT NULL)"),
        )
        .await;
    }
    // 990,000 keys in [0, 10^10), 10,000 in [10^10, 10^12): the range is 10^12 wide.
    exec(
        &db,
        "INSERT INTO ext_legacy (id, v)
         SELECT CAST(g AS BIGINT) * 10101, 'dense' FROM generate_series(1, 990000) g
         UNION ALL
         SELECT 10000000000 + CAST(g AS BIGINT) * 99000000, 'sparse' FROM generate_series(1, 10000) g",
    )
    .await;
    let config = ext_config(dir.path(), EXT_COPY_BATCH);
    let run = |args: &[&str]| tt(&pg.url, &config, args);
    assert_eq!(run(&["init"]).0, 0);
    assert_eq!(
        run(&["stage", "set", "ext", "dual_write", "--reason", "go"]).0,
        0
    );
    let (code, out, err) = run(&["--json", "backfill", "ext", "--workers", "2"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["rows_copied"], 1_000_000, "{out}");
    let mut sizes: Vec<i64> = query("SELECT rows_copied FROM twintrack_backfill_chunks")
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get_at(0).unwrap())
        .collect();
    sizes.sort_unstable();
    let median = sizes[sizes.len() / 2];
    let largest = *sizes.last().unwrap();
    eprintln!(
        "{} chunks: smallest {} rows, median {median}, largest {largest}; all: {sizes:?}",
        sizes.len(),
        sizes[0]
    );
    assert!(sizes.len() > 10, "{sizes:?}");
    assert!(largest <= 2 * median, "largest {largest}, median {median}");
    let (code, out, _) = run(&["--json", "verify", "ext"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(json_of(&out)["legacy_rows"], 1_000_000);
    assert_eq!(json_of(&out)["new_rows"], 1_000_000);
}

/// twintrack's tables from before keys of any type (integer key columns) are upgraded in place:
/// every intent, mismatch, run and chunk is kept, its key now canonical key text.
#[tokio::test(flavor = "multi_thread")]
async fn twintracks_own_tables_are_upgraded_to_key_text_keeping_every_row() {
    for (backend, url, _guard) in common::backends().await {
        let db = Database::connect(&url).await.unwrap();
        twintrack::schema::install_to(&db, 3).await.unwrap();
        for sql in [
            "INSERT INTO twintrack_repair_intents (migration, key, target_side, created_at, attempts, last_error) VALUES ('m', 42, 'new', 5, 2, 'boom')",
            "INSERT INTO twintrack_repair_intents (migration, key, target_side, created_at) VALUES ('m', -9223372036854775808, 'legacy', 6)",
            "INSERT INTO twintrack_mismatches (migration, key, class, stage, diff, legacy_micros, new_micros, at) VALUES ('m', 7, 'confirmed', 'shadow', '[]', 1, 2, 3)",
            "INSERT INTO twintrack_backfill_runs (migration, direction, lower_bound, upper_bound, started_at) VALUES ('m', 'forward', 0, 100, 9)",
            "INSERT INTO twintrack_backfill_chunks (run_id, chunk, lo, hi, next_key, rows_copied) VALUES (1, 0, 0, 100, 40, 40)",
        ] {
            exec(&db, sql).await;
        }
        twintrack::schema::install(&db).await.unwrap();
        let version: i64 = query("SELECT MAX(version) FROM twintrack_schema")
            .scalar(&db)
            .await
            .unwrap();
        assert_eq!(version, twintrack::schema::SCHEMA_VERSION, "{backend}");
        let intents: Vec<(i64, String, i64, Option<String>)> = query(
            "SELECT id, key_text, attempts, last_error FROM twintrack_repair_intents ORDER BY id",
        )
        .fetch_all(&db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.get("id").unwrap(),
                r.get("key_text").unwrap(),
                r.get("attempts").unwrap(),
                r.get("last_error").unwrap(),
            )
        })
        .collect();
        assert_eq!(
            intents,
            vec![
                (1, "42".to_owned(), 2, Some("boom".to_owned())),
                (2, "-9223372036854775808".to_owned(), 0, None)
            ],
            "{backend}"
        );
        let mismatch = twintrack::shadow::list_mismatches(&db, "m", 10)
            .await
            .unwrap();
        assert_eq!(
            (mismatch.len(), mismatch[0].key.as_str()),
            (1, "7"),
            "{backend}"
        );
        let run = query("SELECT lower_bound, upper_bound FROM twintrack_backfill_runs")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(
            (
                run.get::<Option<String>>("lower_bound").unwrap(),
                run.get::<Option<String>>("upper_bound").unwrap()
            ),
            (Some("0".into()), Some("100".into())),
            "{backend}"
        );
        let chunk = query("SELECT lo, hi, next_key, rows_copied FROM twintrack_backfill_chunks")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(chunk.get::<String>("next_key").unwrap(), "40", "{backend}");
        assert_eq!(chunk.get::<i64>("rows_copied").unwrap(), 40);
        // A process of the previous version, still running during a rolling upgrade, writes
        // its intents and mismatches as it always did; they read back by their key.
        exec(&db, "INSERT INTO twintrack_repair_intents (migration, key, target_side, created_at) VALUES ('m', 77, 'new', 8)").await;
        exec(&db, "INSERT INTO twintrack_mismatches (migration, key, class, stage, diff, legacy_micros, new_micros, at) VALUES ('m', 78, 'confirmed', 'shadow', '[]', 1, 2, 4)").await;
        assert_eq!(twintrack::dual::pending_intents(&db, "m").await.unwrap(), 3);
        let newest = twintrack::shadow::list_mismatches(&db, "m", 1)
            .await
            .unwrap();
        assert_eq!(newest[0].key, "78", "{backend}");
        // New rows get ids after the old ones.
        exec(&db, "INSERT INTO twintrack_repair_intents (migration, key_text, target_side, created_at) VALUES ('m', 'x', 'new', 7)").await;
        let last: i64 = query("SELECT MAX(id) FROM twintrack_repair_intents")
            .scalar(&db)
            .await
            .unwrap();
        assert_eq!(last, 4, "{backend}");
        // Idempotent.
        twintrack::schema::install(&db).await.unwrap();
    }
}

/// Runs `twintrack` like [`tt`], failing the test if it has not finished within `secs`.
fn tt_within(secs: u64, url: &str, config: &Path, args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(url)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > std::time::Duration::from_secs(secs) {
            let _ = child.kill();
            panic!("twintrack {args:?} still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A projection with many rows per key (one-to-many), one key holding more rows than a
/// comparison of rows takes at once: verify cuts ranges at keys of their rows, and a range
/// that is all one key cannot be cut; it is compared row by row, the key reported, and verify
/// ends.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_with_more_rows_than_one_comparison_is_compared_and_verify_ends() {
    for (backend, url, _guard) in common::backends().await {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::connect(&url).await.unwrap();
        for sql in [
            "CREATE TABLE nums (g BIGINT PRIMARY KEY)",
            "CREATE TABLE many_legacy (id BIGINT PRIMARY KEY, n BIGINT NOT NULL)",
            "CREATE TABLE many_new (id BIGINT NOT NULL, v BIGINT NOT NULL)",
        ] {
            exec(&db, sql).await;
        }
        for g in 1..=700i64 {
            query("INSERT INTO nums (g) VALUES ($1)")
                .bind(g)
                .execute(&db)
                .await
                .unwrap();
        }
        // Key 1 has 600 rows; keys 2 to 60 five each.
        exec(&db, "INSERT INTO many_legacy (id, n) VALUES (1, 600)").await;
        for id in 2..=60i64 {
            query("INSERT INTO many_legacy (id, n) VALUES ($1, 5)")
                .bind(id)
                .execute(&db)
                .await
                .unwrap();
        }
        exec(
            &db,
            "INSERT INTO many_new (id, v) SELECT l.id, nums.g FROM many_legacy l JOIN nums ON nums.g <= l.n",
        )
        .await;
        // One extra row for key 1 on the new side.
        exec(&db, "INSERT INTO many_new (id, v) VALUES (1, 9999)").await;
        let config = config(
            dir.path(),
            r#"
[[migration]]
name = "many"
legacy_table = "many_legacy"
legacy_key = "id"
new_table = "many_new"
new_key = "id"
legacy_projection = "SELECT l.id AS key, nums.g AS v FROM many_legacy l JOIN nums ON nums.g <= l.n"
new_projection = "SELECT id AS key, v FROM many_new"
"#,
        );
        assert_eq!(tt(&url, &config, &["init"]).0, 0);
        for segments in ["1", "2", "5"] {
            let (code, out, err) = tt_within(
                60,
                &url,
                &config,
                &["--json", "verify", "many", "--segments", segments],
            );
            assert_eq!(code, 1, "{backend} {segments}: {out}{err}");
            let report = json_of(&out);
            assert_eq!(
                report["different"],
                json!([{"key": 1, "columns": ["v"]}]),
                "{backend} {segments}: {report}"
            );
            assert_eq!(report["legacy_rows"], 895);
            assert_eq!(report["new_rows"], 896);
        }
    }
}

/// Keys of types PostgreSQL's record comparison does not mix with the parameters bound
/// against them (`smallint`, `varchar`), in a composite key: backfilled and verified with
/// segment cuts. `char(n)` is refused as a key type, naming it.
#[tokio::test(flavor = "multi_thread")]
async fn composite_keys_of_smallint_and_varchar_columns_are_cut_and_compared() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&pg.url).await.unwrap();
    for sql in [
        "CREATE TABLE sv_legacy (region smallint NOT NULL, code varchar(20) NOT NULL, v text NOT NULL, PRIMARY KEY (region, code))",
        "CREATE TABLE sv_new (region smallint NOT NULL, code varchar(20) NOT NULL, v text NOT NULL, PRIMARY KEY (region, code))",
        "INSERT INTO sv_legacy SELECT r, 'c' || g, 'v' || g FROM generate_series(1, 8) r, generate_series(1, 600) g",
    ] {
        exec(&db, sql).await;
    }
    let text = r#"
[[migration]]
name = "sv"
legacy_table = "sv_legacy"
legacy_key = ["region", "code"]
new_table = "sv_new"
new_key = ["region", "code"]
copy = "INSERT INTO sv_new SELECT region, code, v FROM sv_legacy WHERE {batch} ON CONFLICT (region, code) DO UPDATE SET v = excluded.v"
legacy_projection = "SELECT region AS key1, code AS key2, v FROM sv_legacy"
new_projection = "SELECT region AS key1, code AS key2, v FROM sv_new"
"#;
    let sv = config(dir.path(), text);
    let config_of = config;
    let config = sv;
    assert_eq!(tt(&pg.url, &config, &["init"]).0, 0);
    assert_eq!(
        tt(
            &pg.url,
            &config,
            &["stage", "set", "sv", "dual_write", "--reason", "go"]
        )
        .0,
        0
    );
    let (code, out, err) = tt(
        &pg.url,
        &config,
        &["--json", "backfill", "sv", "--batch-size", "500"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(json_of(&out)["rows_copied"], 4800);
    exec(
        &db,
        "UPDATE sv_new SET v = 'x' WHERE region = 3 AND code = 'c77'",
    )
    .await;
    let (code, out, err) = tt_within(
        60,
        &pg.url,
        &config,
        &["--json", "verify", "sv", "--segments", "8"],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(
        json_of(&out)["different"],
        json!([{"key": [3, "c77"], "columns": ["v"]}])
    );

    exec(&db, "CREATE TABLE ch_legacy (id char(8) PRIMARY KEY)").await;
    exec(&db, "CREATE TABLE ch_new (id char(8) PRIMARY KEY)").await;
    let config = config_of(
        dir.path(),
        r#"
[[migration]]
name = "ch"
legacy_table = "ch_legacy"
legacy_key = "id"
new_table = "ch_new"
new_key = "id"
legacy_projection = "SELECT id AS key FROM ch_legacy"
new_projection = "SELECT id AS key FROM ch_new"
"#,
    );
    assert_eq!(tt(&pg.url, &config, &["init"]).0, 0);
    let (code, _, err) = tt(&pg.url, &config, &["verify", "ch"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("\"bpchar\"") && err.contains("column id of ch_legacy"),
        "{err}"
    );
}

/// A batch copies the rows its own snapshot holds, the rows whose keys it locked: a row
/// inserted into its key range afterwards (dual-written by the service, so it needs no copy)
/// is not copied, so a later change to that row can never be overwritten by the batch's
/// older read of it. (PostgreSQL: SQLite's batch holds the database's write lock.)
#[tokio::test(flavor = "multi_thread")]
async fn a_row_inserted_into_a_batch_s_range_meanwhile_is_not_copied_by_it() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let db = Database::connect(&pg.url).await.unwrap();
    for sql in [
        "CREATE TABLE rr_legacy (id uuid PRIMARY KEY, v text NOT NULL)",
        "CREATE TABLE rr_new (id uuid PRIMARY KEY, v text NOT NULL)",
        "INSERT INTO rr_legacy SELECT gen_random_uuid(), 'v' || g FROM generate_series(1, 2000) g",
    ] {
        exec(&db, sql).await;
    }
    let store = std::sync::Arc::new(
        twintrack::flags::SqlFlagStore::open(db.clone())
            .await
            .unwrap(),
    );
    use twintrack::flags::FlagStore as _;
    store.register("rr", "t").await.unwrap();
    store
        .set_stage(twintrack::flags::StageChange::new(
            "rr",
            twintrack::Stage::DualWrite,
            "t",
            "t",
        ))
        .await
        .unwrap();
    let def = twintrack::definition::MigrationDef::builder("rr")
        .tables("rr_legacy", "id", "rr_new", "id")
        .copy("INSERT INTO rr_new SELECT id, v FROM rr_legacy WHERE {batch} ON CONFLICT (id) DO UPDATE SET v = excluded.v")
        .projections(
            "SELECT id AS key, v FROM rr_legacy",
            "SELECT id AS key, v FROM rr_new",
        )
        .build()
        .unwrap();
    // The smallest UUID there is: inside the first batch's range whatever the keys are.
    let late = uuid::Uuid::from_u128(1);
    let inserted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hook = {
        let (db, inserted) = (db.clone(), inserted.clone());
        twintrack::backfill::BeforeCopy(std::sync::Arc::new(move || {
            let (db, inserted) = (db.clone(), inserted.clone());
            Box::pin(async move {
                if !inserted.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    query("INSERT INTO rr_legacy (id, v) VALUES ($1, 'late')")
                        .bind(late)
                        .execute(&db)
                        .await
                        .unwrap();
                }
            })
        }))
    };
    let report = twintrack::backfill::run(
        &db,
        &*store,
        &def,
        twintrack::backfill::BackfillOptions {
            batch_size: 5000,
            before_copy: Some(hook),
            ..Default::default()
        },
        twintrack::metrics::Metrics::global(),
        |_| {},
    )
    .await
    .unwrap();
    assert!(inserted.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(report.rows_copied, 2000, "{report:?}");
    let copied: i64 = query("SELECT COUNT(*) FROM rr_new WHERE id = $1")
        .bind(late)
        .scalar(&db)
        .await
        .unwrap();
    assert_eq!(
        copied, 0,
        "the batch copied a row its snapshot did not hold"
    );
}

/// Values that a type's equality calls equal but that are stored differently (`numeric`
/// `1.0` and `1.00`) are not hashed by that equality: verify does not call the shapes clean.
/// Columns of a type without a hash function (`json`) are compared by their text.
/// (PostgreSQL.)
#[tokio::test(flavor = "multi_thread")]
async fn values_equal_only_by_their_type_s_equality_keep_verify_from_being_clean() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&pg.url).await.unwrap();
    for sql in [
        "CREATE TABLE num_legacy (id bigint PRIMARY KEY, amount numeric NOT NULL, doc json NOT NULL)",
        "CREATE TABLE num_new (id bigint PRIMARY KEY, amount numeric NOT NULL, doc json NOT NULL)",
        "INSERT INTO num_legacy SELECT g, 1.0, '{\"a\": 1}' FROM generate_series(1, 100) g",
        "INSERT INTO num_new SELECT g, 1.0, '{\"a\": 1}' FROM generate_series(1, 100) g",
    ] {
        exec(&db, sql).await;
    }
    let config = config(
        dir.path(),
        r#"
[[migration]]
name = "num"
legacy_table = "num_legacy"
legacy_key = "id"
new_table = "num_new"
new_key = "id"
legacy_projection = "SELECT id AS key, amount, doc FROM num_legacy"
new_projection = "SELECT id AS key, amount, doc FROM num_new"
"#,
    );
    assert_eq!(tt(&pg.url, &config, &["init"]).0, 0);
    let (code, out, err) = tt(&pg.url, &config, &["verify", "num"]);
    assert_eq!(code, 0, "{out}{err}");
    exec(&db, "UPDATE num_new SET amount = 1.00 WHERE id = 42").await;
    let (code, out, err) = tt(&pg.url, &config, &["--json", "verify", "num"]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(json_of(&out)["clean"], false);
}

/// A copy that bounds its batches with `$1`/`$2` works for a single integer key only: with a
/// text, UUID or composite key it is refused, naming `{batch}`, before anything is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_without_batch_for_a_key_integers_cannot_bound_is_refused() {
    for (backend, url, _guard) in common::backends().await {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::connect(&url).await.unwrap();
        for sql in [
            "CREATE TABLE tk_legacy (id TEXT PRIMARY KEY, v TEXT NOT NULL)",
            "CREATE TABLE tk_new (id TEXT PRIMARY KEY, v TEXT NOT NULL)",
            "INSERT INTO tk_legacy (id, v) VALUES ('a', '1'), ('b', '2')",
        ] {
            exec(&db, sql).await;
        }
        let config = config(
            dir.path(),
            r#"
[[migration]]
name = "tk"
legacy_table = "tk_legacy"
legacy_key = "id"
new_table = "tk_new"
new_key = "id"
copy = "INSERT INTO tk_new SELECT id, v FROM tk_legacy WHERE id > $1 AND id <= $2"
legacy_projection = "SELECT id AS key, v FROM tk_legacy"
new_projection = "SELECT id AS key, v FROM tk_new"
"#,
        );
        assert_eq!(tt(&url, &config, &["init"]).0, 0);
        assert_eq!(
            tt(
                &url,
                &config,
                &["stage", "set", "tk", "dual_write", "--reason", "go"]
            )
            .0,
            0
        );
        for command in [&["backfill", "tk"][..], &["verify", "tk"][..]] {
            let (code, _, err) = tt(&url, &config, command);
            assert_eq!(code, 2, "{backend} {command:?}: {err}");
            assert!(err.contains("{batch}") && err.contains("(text)"), "{err}");
        }
        assert_eq!(count(&db, "tk_new").await, 0);
        assert_eq!(count(&db, "twintrack_backfill_runs").await, 0);
    }
}

/// The tags of users in the legacy shape's JSON, one row per tag in the new shape, with no
/// unique key there: projections with several rows per key, compared per key as multisets.
fn tags_config(dir: &Path, backend: &str) -> std::path::PathBuf {
    let (each, copy_from) = match backend {
        "postgres" => (
            "SELECT id AS key, t AS tag FROM users, jsonb_array_elements_text(profile->'tags') t",
            "SELECT id, t FROM users, jsonb_array_elements_text(profile->'tags') t",
        ),
        _ => (
            "SELECT users.id AS key, t.value AS tag FROM users, json_each(users.profile, '$.tags') t",
            "SELECT users.id, t.value FROM users, json_each(users.profile, '$.tags') t",
        ),
    };
    config(
        dir,
        &format!(
            r#"
[[migration]]
name = "tags"
legacy_table = "users"
legacy_key = "id"
new_table = "user_tags"
new_key = "user_id"
copy = "INSERT INTO user_tags (user_id, tag) {copy_from} WHERE {{batch:users}}"
legacy_projection = "{each}"
new_projection = "SELECT user_id AS key, tag FROM user_tags"
"#
        ),
    )
}

/// Rows for `users` and `user_tags`: `(id, [tags])` on the legacy side, `(user_id, tag)` rows
/// on the new side.
async fn put_tags(db: &Database, legacy: &[(i64, &[&str])], new: &[(Option<i64>, &str)]) {
    let insert = match db.backend() {
        twintrack::db::Backend::Postgres => {
            "INSERT INTO users (id, profile) VALUES ($1, CAST($2 AS JSONB))"
        }
        _ => "INSERT INTO users (id, profile) VALUES ($1, $2)",
    };
    exec(db, "DELETE FROM users").await;
    exec(db, "DELETE FROM user_tags").await;
    for (id, tags) in legacy {
        query(insert)
            .bind(*id)
            .bind(json!({ "tags": tags }).to_string())
            .execute(db)
            .await
            .unwrap();
    }
    for (id, tag) in new {
        query("INSERT INTO user_tags (user_id, tag) VALUES ($1, $2)")
            .bind(*id)
            .bind(*tag)
            .execute(db)
            .await
            .unwrap();
    }
}

/// The field report: projections with several rows per key that differ as multisets (a
/// different tag; a tag twice on one side) are reported by key, exit 1, and never recorded as
/// the clean verify the stage gate asks for; so are duplicates that agree as sets and in count
/// (`[a, a, b]` against `[a, b, b]`), pairs that cancel out under an XOR of hashes (`[a, a]`
/// against `[b, b]`), found through the segment summaries and bisection among thousands of
/// equal keys; and rows whose key is NULL, which no key range holds.
#[tokio::test(flavor = "multi_thread")]
async fn projections_with_several_rows_per_key_compare_as_multisets_and_never_pass_clean() {
    for (backend, url, _guard) in common::backends().await {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::connect(&url).await.unwrap();
        let profile = if backend == "postgres" {
            "JSONB"
        } else {
            "TEXT"
        };
        exec(
            &db,
            &format!("CREATE TABLE users (id BIGINT PRIMARY KEY, profile {profile} NOT NULL)"),
        )
        .await;
        exec(
            &db,
            "CREATE TABLE user_tags (user_id BIGINT, tag TEXT NOT NULL)",
        )
        .await;
        let config = tags_config(dir.path(), backend);
        let run = |args: &[&str]| tt(&url, &config, args);
        assert_eq!(run(&["init"]).0, 0);
        assert_eq!(
            run(&["stage", "set", "tags", "dual_write", "--reason", "go"]).0,
            0
        );
        let (code, _, err) = run(&["backfill", "tags"]);
        assert_eq!(code, 0, "{backend}: {err}");
        let different = |out: &str| -> Vec<(Value, Value)> {
            let report = json_of(out);
            report["different"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| (d["key"].clone(), d["columns"].clone()))
                .collect()
        };

        // The listed input: 3 legacy rows against 4 new ones.
        put_tags(
            &db,
            &[(1, &["x", "b"]), (2, &["a"])],
            &[
                (Some(1), "y"),
                (Some(1), "b"),
                (Some(2), "a"),
                (Some(2), "a"),
            ],
        )
        .await;
        let (code, out, _) = run(&["--json", "verify", "tags"]);
        assert_eq!(code, 1, "{backend}: {out}");
        assert_eq!(
            different(&out),
            vec![(json!(1), json!(["tag"])), (json!(2), json!(["tag"]))],
            "{backend}: {out}"
        );
        let (code, out, _) = run(&["verify", "tags"]);
        assert_eq!(code, 1);
        assert!(out.contains("DIVERGENT") && !out.contains("CLEAN"), "{out}");
        let (code, _, err) = run(&["stage", "set", "tags", "shadow", "--reason", "compare"]);
        assert_eq!(code, 3, "{backend}: no clean verify recorded: {err}");

        // Multisets among 3,000 equal keys: found through summaries and bisection.
        let both: Vec<(i64, &[&str])> = (1..=3000).map(|k| (k, &["a", "b"][..])).collect();
        let mut legacy = both.clone();
        let mut new: Vec<(Option<i64>, &str)> = both
            .iter()
            .flat_map(|(k, tags)| tags.iter().map(move |t| (Some(*k), *t)))
            .collect();
        let cases: [(i64, &[&str], &[&str]); 5] = [
            (1001, &["a", "a", "b"], &["a", "b", "b"]),
            (1002, &["a", "a"], &["b", "b"]),
            (1003, &["a"], &["a", "a"]),
            (2004, &["c", "d"], &["d", "c"]),
            (2005, &[], &[]),
        ];
        for (k, l, n) in cases {
            legacy.retain(|(id, _)| *id != k);
            new.retain(|(id, _)| *id != Some(k));
            legacy.push((k, l));
            new.extend(n.iter().map(|t| (Some(k), *t)));
        }
        put_tags(&db, &legacy, &new).await;
        for segments in ["1", "4"] {
            let (code, out, _) = run(&["--json", "verify", "tags", "--segments", segments]);
            assert_eq!(code, 1, "{backend}: {out}");
            assert_eq!(
                different(&out),
                vec![
                    (json!(1001), json!(["tag"])),
                    (json!(1002), json!(["tag"])),
                    (json!(1003), json!(["tag"])),
                ],
                "{backend} {segments} segments: {out}"
            );
            assert_eq!(json_of(&out)["unexplained_segments"], 0, "{out}");
        }

        // A row whose key is NULL: counted, named, never clean.
        let equal: Vec<(Option<i64>, &str)> = both
            .iter()
            .flat_map(|(k, tags)| tags.iter().map(move |t| (Some(*k), *t)))
            .collect();
        let mut equal_and_null = equal.clone();
        equal_and_null.push((None, "z"));
        put_tags(&db, &both, &equal_and_null).await;
        let (code, out, _) = run(&["--json", "verify", "tags", "--segments", "4"]);
        assert_eq!(code, 1, "{backend}: {out}");
        assert_eq!(json_of(&out)["new_null_keys"], 1, "{out}");
        let (code, out, _) = run(&["verify", "tags"]);
        assert_eq!(code, 1);
        assert!(
            out.contains("1 new projection rows have a NULL key"),
            "{out}"
        );
        // Without it: clean, and the gate opens.
        put_tags(&db, &both, &equal).await;
        let (code, out, _) = run(&["verify", "tags", "--segments", "4"]);
        assert_eq!(code, 0, "{backend}: {out}");
        let (code, _, err) = run(&["stage", "set", "tags", "shadow", "--reason", "compare"]);
        assert_eq!(code, 0, "{backend}: {err}");
    }
}

/// A verify whose connection is cut while a projection runs (its backend terminated): the
/// statement is retried on a new connection and the verify ends clean, exit 0, not exit 5.
#[tokio::test(flavor = "multi_thread")]
async fn a_verify_whose_connection_is_cut_mid_statement_retries_and_ends_clean() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&pg.url).await.unwrap();
    for sql in [
        "CREATE TABLE ext_legacy (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        "CREATE TABLE ext_new (id BIGINT PRIMARY KEY, v TEXT NOT NULL)",
        "INSERT INTO ext_legacy SELECT g, 'v' || g FROM generate_series(1, 3000) g",
        "INSERT INTO ext_new SELECT * FROM ext_legacy",
    ] {
        exec(&db, sql).await;
    }
    // A slow legacy projection (half a millisecond a row), so there is time to cut it.
    let config = config(
        dir.path(),
        r#"
[[migration]]
name = "ext"
legacy_table = "ext_legacy"
legacy_key = "id"
new_table = "ext_new"
new_key = "id"
copy = "INSERT INTO ext_new (id, v) SELECT id, v FROM ext_legacy WHERE {batch}"
legacy_projection = "SELECT l.id AS key, l.v FROM ext_legacy l, LATERAL (SELECT pg_sleep(0.0005 + 0 * l.id)) s"
new_projection = "SELECT id AS key, v FROM ext_new"
"#,
    );
    assert_eq!(tt(&pg.url, &config, &["init"]).0, 0);
    let child = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(&pg.url)
        .arg("--config")
        .arg(&config)
        .args(["verify", "ext", "--segments", "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        // The verify's own statement, not the definition's check that probes the projection
        // (`… WHERE 1 = 0`) before it: cut there, the run ends as a configuration error.
        let cut: i64 = query(
            "SELECT COUNT(*) FILTER (WHERE cut) FROM (
               SELECT pg_terminate_backend(pid) AS cut FROM pg_stat_activity
               WHERE datname = current_database() AND state = 'active'
                 AND query LIKE '%pg_sleep%' AND query NOT LIKE '%WHERE 1 = 0%'
                 AND pid <> pg_backend_pid()) s",
        )
        .scalar(&db)
        .await
        .unwrap();
        if cut > 0 {
            break;
        }
        if std::time::Instant::now() > deadline {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the projection never ran: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("CLEAN"), "{text}");
}

/// Values a double cannot tell apart (`numeric` past 17 digits) are compared by every digit
/// PostgreSQL writes: the key is named with its column, never an unexplained segment and never
/// clean; `--repair` copies it and the verify ends clean.
#[tokio::test(flavor = "multi_thread")]
async fn numbers_that_differ_past_a_doubles_precision_are_named_and_repaired() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = Database::connect(&pg.url).await.unwrap();
    for sql in [
        "CREATE TABLE ext_legacy (id BIGINT PRIMARY KEY, v NUMERIC NOT NULL)",
        "CREATE TABLE ext_new (id BIGINT PRIMARY KEY, v NUMERIC NOT NULL)",
        "INSERT INTO ext_legacy SELECT g, 12345678901234567.01 + g FROM generate_series(1, 3000) g",
    ] {
        exec(&db, sql).await;
    }
    let config = ext_config(dir.path(), EXT_COPY_BATCH);
    let run = |args: &[&str]| tt(&pg.url, &config, args);
    assert_eq!(run(&["init"]).0, 0);
    assert_eq!(
        run(&["stage", "set", "ext", "dual_write", "--reason", "go"]).0,
        0
    );
    assert_eq!(run(&["backfill", "ext"]).0, 0);
    assert_eq!(run(&["verify", "ext"]).0, 0);
    exec(&db, "UPDATE ext_new SET v = v + 0.01 WHERE id = 1700").await;
    let (code, out, _) = run(&["--json", "verify", "ext", "--segments", "4"]);
    assert_eq!(code, 1, "{out}");
    let report = json_of(&out);
    assert_eq!(
        report["different"],
        json!([{"key": 1700, "columns": ["v"]}]),
        "{report}"
    );
    assert_eq!(report["unexplained_segments"], 0, "{report}");
    let (code, out, _) = run(&["--json", "verify", "ext", "--key", "1700"]);
    assert_eq!(code, 1, "{out}");
    let (code, out, err) = run(&["--json", "verify", "ext", "--repair"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json_of(&out)["repaired"], json!([1700]));
    assert_eq!(run(&["verify", "ext"]).0, 0);
}
