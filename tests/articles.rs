//! The articles example (`examples/articles/`), a PostgreSQL service written the usual sqlx
//! way (`PgPool`, `query_as` + `FromRow`, UUID keys, `timestamptz`), driven as a black box
//! through its HTTP routes, the `twintrack` CLI and `psql`: every stage writes exactly the
//! sides it names and serves the side it names; a planted difference in `shadow` is served
//! from legacy and recorded as a confirmed mismatch naming `tags`; bad input is refused and
//! writes nothing; and a million articles are backfilled (killed halfway, resumed), verified,
//! and their planted divergences reported by key and repaired.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use twintrack::Stage;

const M: &str = "article_tags";

fn config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/articles.toml")
}

/// The articles service, started as `cargo run --example articles` would.
struct Articles {
    child: Child,
    base: String,
    url: String,
}

impl Drop for Articles {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Articles {
    fn start(url: &str) -> Articles {
        let mut child = Command::new(common::example_binary("articles"))
            .env("DATABASE_URL", url)
            .env("TWINTRACK_LISTEN", "127.0.0.1:0")
            .env("TWINTRACK_DEBUG_HEADERS", "1")
            .env("RUST_LOG", "warn")
            .env_remove("REPLICA_DATABASE_URLS")
            .env_remove("TWINTRACK_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the articles example");
        let base = common::listening_base(&mut child, "articles");
        Articles {
            child,
            base,
            url: url.to_owned(),
        }
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> (u16, Option<String>, Value) {
        let (status, headers, value) = common::http(&self.base, method, path, body, None).await;
        let stage = headers
            .get("x-twintrack-stage")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, stage, value)
    }

    /// Moves the migration to `stage` with the CLI and waits until the service serves it.
    async fn stage(&self, stage: Stage) {
        let (code, out) = cli(
            &self.url,
            &format!("stage set {M} {stage} --reason test --force"),
        );
        assert_eq!(code, 0, "{out}");
        let start = Instant::now();
        loop {
            let (_, seen, _) = self.call("GET", "/articles?tag=none", "").await;
            if seen.as_deref() == Some(stage.as_str()) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the service never saw {stage}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `twintrack --database-url URL --config examples/articles.toml <line>`.
fn cli(url: &str, line: &str) -> (i32, String) {
    common::twintrack_cli(None, url, Some(&config()), line)
}

/// Runs `sql` with `psql` and returns its unaligned, tuples-only output.
fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// What each shape holds for an article: `tag_list` and the `article_tag` rows, as text.
fn sides(url: &str, id: &str) -> (String, String) {
    (
        psql(
            url,
            &format!("SELECT tag_list FROM article WHERE article_id = '{id}'"),
        ),
        psql(
            url,
            &format!(
                "SELECT COALESCE(string_agg(tag, ',' ORDER BY tag), '') FROM article_tag WHERE article_id = '{id}'"
            ),
        ),
    )
}

fn tags(value: &Value) -> Vec<String> {
    value["tags"]
        .as_array()
        .unwrap_or_else(|| panic!("no tags in {value}"))
        .iter()
        .map(|t| t.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_stage_writes_and_serves_exactly_its_sides() {
    let Some(db) = common::pg::fresh_db().await else {
        return;
    };
    let svc = Articles::start(&db.url);
    let url = &db.url;
    let (code, out) = cli(url, "init");
    assert_eq!(code, 0, "{out}");
    let mut mismatches = 0;
    for (i, stage) in Stage::ALL.into_iter().enumerate() {
        svc.stage(stage).await;
        let plan = stage.plan();
        let writes_legacy = plan.writes.contains(&twintrack::Side::Legacy);
        let writes_new = plan.writes.contains(&twintrack::Side::New);

        // Create: tags sorted and distinct, written to exactly the stage's sides.
        let (status, seen, article) = svc
            .call(
                "POST",
                "/articles",
                &json!({"title": format!("t{i}"), "body": "b", "tags": ["rust", "db", "rust"]})
                    .to_string(),
            )
            .await;
        assert_eq!(
            (status, seen.as_deref()),
            (201, Some(stage.as_str())),
            "{article}"
        );
        assert_eq!(tags(&article), ["db", "rust"], "{stage}");
        assert!(article["created_at"].as_str().unwrap().contains('T'));
        let id = article["id"].as_str().unwrap().to_owned();
        let want = |writes: bool, tags: &str| {
            if writes {
                tags.to_owned()
            } else {
                String::new()
            }
        };
        let (legacy, new) = sides(url, &id);
        assert_eq!(
            (legacy.as_str(), new.as_str()),
            (
                if writes_legacy { "{db,rust}" } else { "{}" },
                want(writes_new, "db,rust").as_str()
            ),
            "{stage}: create"
        );

        // Replace the tags.
        let (status, _, article) = svc
            .call(
                "PUT",
                &format!("/articles/{id}/tags"),
                r#"{"tags":["zig"]}"#,
            )
            .await;
        assert_eq!((status, tags(&article).len()), (200, 1), "{article}");
        let (legacy, new) = sides(url, &id);
        assert_eq!(
            legacy == "{zig}",
            writes_legacy,
            "{stage}: legacy after put: {legacy}"
        );
        assert_eq!(new == "zig", writes_new, "{stage}: new after put: {new}");

        // Planted apart, the stage's served side answers, for one article and for a list.
        psql(
            url,
            &format!("UPDATE article SET tag_list = '{{on-legacy}}' WHERE article_id = '{id}'"),
        );
        psql(
            url,
            &format!(
                "DELETE FROM article_tag WHERE article_id = '{id}'; INSERT INTO article_tag VALUES ('{id}', 'on-new')"
            ),
        );
        let served = match plan.served {
            twintrack::Side::Legacy => "on-legacy",
            twintrack::Side::New => "on-new",
        };
        let (status, _, article) = svc.call("GET", &format!("/articles/{id}"), "").await;
        assert_eq!(status, 200);
        assert_eq!(tags(&article), [served], "{stage}: served side");
        let (status, _, listed) = svc
            .call("GET", &format!("/articles?tag={served}"), "")
            .await;
        assert_eq!(status, 200, "{listed}");
        assert_eq!(
            listed["articles"][0]["id"],
            id.as_str(),
            "{stage}: {listed}"
        );
        let other = if served == "on-new" {
            "on-legacy"
        } else {
            "on-new"
        };
        let (_, _, listed) = svc.call("GET", &format!("/articles?tag={other}"), "").await;
        assert_eq!(
            listed["articles"],
            json!([]),
            "{stage}: the other side is not served"
        );
        if plan.shadow.is_some() {
            // Two compared reads of a planted difference: two mismatches recorded.
            mismatches += 2;
            let start = Instant::now();
            loop {
                let (code, out) = cli(url, &format!("--json mismatches {M} --limit 100"));
                assert_eq!(code, 0, "{out}");
                let listed: Value = serde_json::from_str(&out[..=out.rfind(']').unwrap()]).unwrap();
                if listed.as_array().unwrap().len() >= mismatches {
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "{stage}: {out}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        // Delete: the article goes; its tags go from exactly the stage's sides.
        let (status, _, _) = svc.call("DELETE", &format!("/articles/{id}"), "").await;
        assert_eq!(status, 204);
        let (status, _, _) = svc.call("GET", &format!("/articles/{id}"), "").await;
        assert_eq!(status, 404, "{stage}");
        let (_, new) = sides(url, &id);
        assert_eq!(
            new.is_empty(),
            writes_new,
            "{stage}: new rows after delete: {new}"
        );
    }

    // In shadow: served from legacy, recorded as a confirmed mismatch naming `tags`, under the
    // article's key (the list reads are recorded under their query's label).
    let (code, out) = cli(url, &format!("--json mismatches {M} --limit 100"));
    assert_eq!(code, 0, "{out}");
    let listed: Value = serde_json::from_str(&out[..=out.rfind(']').unwrap()]).unwrap();
    let listed = listed.as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|m| m["stage"] == "shadow" && m["key"] == "articles_with_tag"),
        "{out}"
    );
    let in_shadow: Vec<&Value> = listed
        .iter()
        .filter(|m| m["stage"] == "shadow" && m["key"] != "articles_with_tag")
        .collect();
    assert_eq!(in_shadow.len(), 1, "{out}");
    assert!(uuid::Uuid::parse_str(in_shadow[0]["key"].as_str().unwrap()).is_ok());
    for m in in_shadow {
        assert_eq!(m["class"], "confirmed", "{m}");
        assert!(
            m["diff"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["path"].as_str().unwrap().starts_with("tags")),
            "{m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_and_writes_nothing() {
    let Some(db) = common::pg::fresh_db().await else {
        return;
    };
    let svc = Articles::start(&db.url);
    svc.stage(Stage::DualWrite).await;
    let count = || {
        (
            psql(&db.url, "SELECT count(*) FROM article"),
            psql(&db.url, "SELECT count(*) FROM article_tag"),
        )
    };
    let before = count();
    for (method, path, body, needle) in [
        ("GET", "/articles/not-a-uuid", "", "must be a UUID"),
        ("GET", "/articles/12345", "", "must be a UUID"),
        (
            "PUT",
            "/articles/0b5d-zz/tags",
            r#"{"tags":[]}"#,
            "must be a UUID",
        ),
        ("DELETE", "/articles/%27%3B%20drop", "", "must be a UUID"),
        ("POST", "/articles", "{", "invalid JSON"),
        (
            "POST",
            "/articles",
            r#"{"title":"t","body":"b","tags":"x"}"#,
            "invalid JSON",
        ),
        (
            "POST",
            "/articles",
            r#"{"title":5,"body":"b"}"#,
            "invalid JSON",
        ),
        (
            "POST",
            "/articles",
            r#"{"title":"t","body":"b","extra":1}"#,
            "invalid JSON",
        ),
        (
            "POST",
            "/articles",
            r#"{"title":"","body":"b"}"#,
            "title must be",
        ),
        (
            "POST",
            "/articles",
            r#"{"title":"t","body":"b","tags":[""]}"#,
            "each tag",
        ),
        ("GET", "/articles", "", "give the tag"),
    ] {
        let (status, _, body) = svc.call(method, path, body).await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert!(
            body["error"].as_str().unwrap_or_default().contains(needle),
            "{method} {path}: {body}"
        );
    }
    let unknown = uuid::Uuid::new_v4();
    let (status, _, _) = svc.call("GET", &format!("/articles/{unknown}"), "").await;
    assert_eq!(status, 404);
    let (status, _, _) = svc
        .call(
            "PUT",
            &format!("/articles/{unknown}/tags"),
            r#"{"tags":["a"]}"#,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(count(), before, "nothing written");

    // Without DATABASE_URL: a clear message and exit 2.
    let out = Command::new(common::example_binary("articles"))
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));

    // Its telemetry is configured by the standard OTEL_* variables: a protocol it does not
    // speak is exit 2, naming the variable.
    let out = Command::new(common::example_binary("articles"))
        .env("DATABASE_URL", &db.url)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("OTEL_EXPORTER_OTLP_PROTOCOL=\"http/json\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Source keys walked by every run so far.
fn keys_done(url: &str) -> i64 {
    psql(
        url,
        "SELECT COALESCE(SUM(keys_done), 0) FROM twintrack_backfill_chunks",
    )
    .parse()
    .unwrap()
}

fn backfill_process(url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(url)
        .arg("--config")
        .arg(config())
        .args(["--json", "backfill", M, "--workers", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A million articles with random UUID v4 keys and one to five tags each: the backfill is
/// SIGKILLed halfway and resumed, every tag row is copied exactly once, verify is clean;
/// planted divergences (an article's tags missing, an extra tag, a changed tag) are reported
/// exactly, by key, and `--repair` makes it clean again.
#[tokio::test(flavor = "multi_thread")]
async fn a_million_uuid_keyed_articles_backfill_killed_resumed_verified_and_repaired() {
    let Some(db) = common::pg::fresh_db().await else {
        return;
    };
    let url = &db.url;
    // The service creates both shapes and twintrack's tables.
    drop(Articles::start(url));
    psql(
        url,
        "INSERT INTO article (article_id, title, body, tag_list, created_at)
         SELECT gen_random_uuid(), 'title ' || g, 'body',
                ARRAY(SELECT 'tag' || ((g * 7 + i * 13) % 50) FROM generate_series(1, 1 + g % 5) AS i),
                now() - g * interval '1 second'
         FROM generate_series(1, 1000000) AS g",
    );
    psql(url, "VACUUM ANALYZE article");
    let tag_rows: i64 = psql(url, "SELECT sum(cardinality(tag_list)) FROM article")
        .parse()
        .unwrap();
    assert_eq!(tag_rows, 3_000_000);
    let (code, out) = cli(url, &format!("stage set {M} dual_write --reason backfill"));
    assert_eq!(code, 0, "{out}");

    let mut first = backfill_process(url);
    common::pg::eventually(
        Duration::from_secs(300),
        "half the articles copied",
        || async { keys_done(url) >= 500_000 },
    )
    .await;
    first.kill().unwrap(); // SIGKILL
    let _ = first.wait();
    let rows_at_kill: i64 = psql(
        url,
        "SELECT COALESCE(SUM(rows_copied), 0) FROM twintrack_backfill_chunks",
    )
    .parse()
    .unwrap();
    assert!(keys_done(url) < 1_000_000, "finished before the kill");
    let second = backfill_process(url).wait_with_output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let report: Value = serde_json::from_slice(&second.stdout).unwrap();
    eprintln!("killed after {rows_at_kill} tag rows; resumed: {report}");
    assert_eq!(report["resumed"], true);
    assert_eq!(report["finished"], true);
    assert_eq!(report["keys_done"], 1_000_000, "{report}");
    assert_eq!(report["run_rows_copied"], 3_000_000, "{report}");
    assert_eq!(
        report["rows_copied"].as_i64().unwrap() + rows_at_kill,
        3_000_000,
        "every tag row copied exactly once: {report}"
    );
    assert_eq!(psql(url, "SELECT count(*) FROM article_tag"), "3000000");

    let (code, out) = cli(url, &format!("verify {M}"));
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("CLEAN") && out.contains("1000000 legacy rows"),
        "{out}"
    );

    // Planted: one article's tags gone from the new shape, one extra tag, one changed tag.
    let pick = |offset: i64| {
        psql(
            url,
            &format!("SELECT article_id FROM article ORDER BY created_at LIMIT 1 OFFSET {offset}"),
        )
    };
    let (gone, extra, changed) = (pick(17), pick(400_000), pick(999_998));
    psql(
        url,
        &format!("DELETE FROM article_tag WHERE article_id = '{gone}'"),
    );
    psql(
        url,
        &format!("INSERT INTO article_tag VALUES ('{extra}', 'planted-extra')"),
    );
    psql(
        url,
        &format!(
            "UPDATE article_tag SET tag = 'planted-change' WHERE article_id = '{changed}'
               AND tag = (SELECT min(tag) FROM article_tag WHERE article_id = '{changed}')"
        ),
    );
    let (code, out) = cli(url, &format!("--json verify {M}"));
    assert_eq!(code, 1, "{out}");
    let report: Value = serde_json::from_str(&out[..=out.rfind('}').unwrap()]).unwrap();
    assert_eq!(report["missing_in_new"], json!([gone]), "{report}");
    assert_eq!(report["missing_in_legacy"], json!([]), "{report}");
    let mut different: Vec<(String, String)> = report["different"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["key"].as_str().unwrap().to_owned(),
                d["columns"].to_string(),
            )
        })
        .collect();
    different.sort();
    let mut want = vec![
        (extra.clone(), "[\"tags\"]".to_owned()),
        (changed.clone(), "[\"tags\"]".to_owned()),
    ];
    want.sort();
    assert_eq!(different, want, "{report}");

    let (code, out) = cli(url, &format!("--json verify {M} --repair"));
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(url, &format!("verify {M}"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(psql(url, "SELECT count(*) FROM article_tag"), "3000000");
}

/// SIGTERM while clients write: the articles service answers every request made, refuses
/// new connections, and exits 0 (the time is printed).
#[tokio::test(flavor = "multi_thread")]
async fn articles_exits_0_on_sigterm_answering_what_is_in_flight() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(db) = common::pg::fresh_db().await else {
        return;
    };
    let mut svc = Articles::start(&db.url);
    let (code, out) = cli(&db.url, "init");
    assert_eq!(code, 0, "{out}");
    svc.stage(Stage::DualWrite).await;
    let signalled = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (base, signalled) = (svc.base.clone(), signalled.clone());
        clients.push(tokio::spawn(async move {
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
            let mut answered = 0u32;
            for n in 0.. {
                let body = format!(r#"{{"title":"t{c}-{n}","body":"b","tags":["x","y"]}}"#);
                let req = http::Request::post(format!("{base}/articles"))
                    .header("content-type", "application/json")
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap();
                match client.request(req).await {
                    Ok(res) => {
                        assert_eq!(res.status(), 201);
                        answered += 1;
                    }
                    Err(e) if e.is_connect() && signalled.load(Ordering::SeqCst) => break,
                    Err(e) => panic!("a request saw {e:?}"),
                }
            }
            answered
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signalled.store(true, Ordering::SeqCst);
    let (status, took) = common::signal_and_wait(&mut svc.child, "-TERM").await;
    eprintln!("articles: SIGTERM to exit in {took:?}");
    assert_eq!(status.code(), Some(0), "{status:?}");
    let mut answered = 0;
    for client in clients {
        answered += client.await.unwrap();
    }
    assert!(answered > 0, "the load ran");
}
