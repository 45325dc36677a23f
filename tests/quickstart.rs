//! The quickstart, tried as a new user would from the README: start it, call its routes, flip
//! the stage with the CLI while it runs, and see the flip without a restart.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

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
    /// Starts the quickstart in `cwd`, as `cargo run --example quickstart` would.
    fn start(cwd: &Path, database_url: Option<&str>) -> Quickstart {
        Quickstart::start_with(cwd, database_url, &[])
    }

    /// [`Quickstart::start`] with more environment variables.
    fn start_with(cwd: &Path, database_url: Option<&str>, env: &[(&str, &str)]) -> Quickstart {
        Quickstart::start_logged(cwd, database_url, env, Stdio::inherit())
    }

    /// [`Quickstart::start_with`], its log (stderr) going to `log`.
    fn start_logged(
        cwd: &Path,
        database_url: Option<&str>,
        env: &[(&str, &str)],
        log: Stdio,
    ) -> Quickstart {
        let mut cmd = Command::new(common::example_binary("quickstart"));
        cmd.current_dir(cwd)
            .env("TWINTRACK_LISTEN", "127.0.0.1:0")
            .env("TWINTRACK_DEBUG_HEADERS", "1")
            .env("RUST_LOG", "warn")
            .env_remove("DATABASE_URL")
            .env_remove("REPLICA_DATABASE_URLS")
            .env_remove("TWINTRACK_RYW_SECRET")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(url) = database_url {
            cmd.env("DATABASE_URL", url);
        }
        let mut child = cmd.spawn().expect("start the quickstart");
        let base = common::listening_base(&mut child, "quickstart");
        Quickstart { child, base }
    }

    async fn call(&self, method: &str, path: &str, body: &str) -> (u16, Option<String>, Value) {
        let (status, headers, value) = self.request(method, path, body, None).await;
        let stage = headers
            .get("x-twintrack-stage")
            .map(|v| v.to_str().unwrap().to_owned());
        (status, stage, value)
    }

    /// One call, with an optional read-your-writes token; the status, headers and JSON body.
    async fn request(
        &self,
        method: &str,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> (u16, http::HeaderMap, Value) {
        common::http(&self.base, method, path, body, token).await
    }
}

/// Runs `twintrack --database-url URL --config examples/quickstart.toml <line>` in `cwd`.
fn cli(cwd: &Path, url: &str, line: &str) -> (i32, String) {
    common::twintrack_cli(Some(cwd), url, Some(&common::quickstart_config()), line)
}

async fn exercise_routes(qs: &Quickstart) {
    let (status, stage, created) = qs
        .call(
            "POST",
            "/users",
            r#"{"email":"ada@example.com","theme":"dark","notifications_enabled":true}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(stage.as_deref(), Some("legacy_only"));
    let id = created["id"].as_i64().unwrap();
    assert_eq!(created["theme"], "dark");

    let path = format!("/users/{id}/settings");
    let (status, _, got) = qs.call("GET", &path, "").await;
    assert_eq!(
        (status, got.clone()),
        (200, json!({"theme":"dark","notifications_enabled":true}))
    );

    let (status, _, _) = qs
        .call(
            "PUT",
            &path,
            r#"{"theme":"light","notifications_enabled":false}"#,
        )
        .await;
    assert_eq!(status, 200);
    let (_, _, got) = qs.call("GET", &path, "").await;
    assert_eq!(got, json!({"theme":"light","notifications_enabled":false}));

    // Bad input: 400 with a message, and nothing written.
    for (method, p, body) in [
        ("POST", "/users", "{not json"),
        (
            "POST",
            "/users",
            r#"{"email":"x@example.com","theme":"dark","notifications_enabled":"yes"}"#,
        ),
        (
            "POST",
            "/users",
            r#"{"email":"x@example.com","theme":"dark"}"#,
        ),
        (
            "POST",
            "/users",
            r#"{"email":"x@example.com","theme":"","notifications_enabled":true}"#,
        ),
        (
            "PUT",
            path.as_str(),
            r#"{"theme":5,"notifications_enabled":true}"#,
        ),
        ("PUT", path.as_str(), r#"[]"#),
        ("GET", "/users/abc/settings", ""),
        ("GET", "/users/-1/settings", ""),
    ] {
        let (status, _, body) = qs.call(method, p, body).await;
        assert_eq!(status, 400, "{method} {p}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }
    let (_, _, got) = qs.call("GET", &path, "").await;
    assert_eq!(got, json!({"theme":"light","notifications_enabled":false}));
    let (status, _, _) = qs
        .call(
            "POST",
            "/users",
            r#"{"email":"x@example.com","theme":"dark","notifications_enabled":true}"#,
        )
        .await;
    assert_eq!(status, 201, "the email rejected above was never stored");

    let (status, _, _) = qs.call("DELETE", &format!("/users/{id}"), "").await;
    assert_eq!(status, 204);
    let (status, _, _) = qs.call("GET", &path, "").await;
    assert_eq!(status, 404);
}

async fn wait_for_stage(qs: &Quickstart, stage: &str, within: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let (_, seen, _) = qs.call("GET", "/users/999999/settings", "").await;
        if seen.as_deref() == Some(stage) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "still {seen:?}, expected {stage} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_on_the_default_sqlite_file_sees_cli_flips() {
    let dir = tempfile::tempdir().unwrap();
    let qs = Quickstart::start(dir.path(), None);
    assert!(dir.path().join("twintrack-quickstart.db").exists());
    exercise_routes(&qs).await;

    // GET /metrics: twintrack's series, after that traffic.
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let res = client
        .get(format!("{}/metrics", qs.base).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    for series in [
        "twintrack_dual_operations",
        "db_client_operation_duration_seconds_bucket{",
        "twintrack_flags_refresh",
        "twintrack_ryw_tokens",
    ] {
        assert!(
            text.contains(series),
            "{series} missing from /metrics:\n{text}"
        );
    }
    // Durations in seconds, bucketed for database calls: sub-millisecond buckets exist.
    for le in ["0.0005", "0.001", "0.005"] {
        assert!(
            text.lines().any(
                |l| l.starts_with("db_client_operation_duration_seconds_bucket{")
                    && l.contains("db_system_name=\"sqlite\"")
                    && l.contains(&format!("le=\"{le}\""))
            ),
            "no {le} s bucket:\n{text}"
        );
    }

    // The README's CLI command, run from the same directory while the service runs.
    let url = "sqlite://twintrack-quickstart.db";
    let (code, out) = cli(
        dir.path(),
        url,
        "stage set user_settings dual_write --reason try-it",
    );
    assert_eq!(code, 0, "{out}");
    let took = wait_for_stage(&qs, "dual_write", Duration::from_secs(5)).await;
    eprintln!("SQLite: flip seen after {took:?} (soft TTL 1 s)");
    let (code, out) = cli(dir.path(), url, "rollback user_settings --reason back");
    assert_eq!(code, 0, "{out}");
    wait_for_stage(&qs, "legacy_only", Duration::from_secs(5)).await;

    // A restart keeps the data and the stage (idempotent start-up).
    drop(qs);
    let qs = Quickstart::start(dir.path(), None);
    let (status, _, _) = qs
        .call(
            "POST",
            "/users",
            r#"{"email":"x@example.com","theme":"dark","notifications_enabled":true}"#,
        )
        .await;
    assert_eq!(
        status, 409,
        "the user created before the restart is still there"
    );
}

/// `GET /metrics` as text.
async fn metrics_text(qs: &Quickstart) -> String {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let res = client
        .get(format!("{}/metrics", qs.base).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// A flagd flag-definition document setting `user_settings` to `stage`.
fn flagd_file(stage: &str) -> String {
    json!({
        "$schema": "https://flagd.dev/schema/v0/flags.json",
        "flags": {
            "user_settings": {
                "state": "ENABLED",
                "variants": {"current": stage, "rollback": "legacy_only"},
                "defaultVariant": "current"
            }
        }
    })
    .to_string()
}

/// `TWINTRACK_FLAGS_FILE`: the quickstart takes its stage from a flagd file, watched by the
/// real flagd provider; an edit is followed; an edit to a stage the rules refuse is held (the
/// last allowed stage served, `twintrack_flags_held` 1 on `/metrics`, the refusal and remedy
/// in the log, `twintrack status --flags-file` saying HELD); a safe edit afterwards is
/// followed; a file that is not JSON keeps the last known stage with every request served.
#[tokio::test(flavor = "multi_thread")]
async fn quickstart_takes_its_stages_from_a_flagd_file_held_to_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let flags = dir.path().join("flags.json");
    std::fs::write(&flags, flagd_file("dual_write")).unwrap();
    let log_path = dir.path().join("quickstart.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let qs = Quickstart::start_logged(
        dir.path(),
        None,
        &[
            ("TWINTRACK_FLAGS_FILE", flags.to_str().unwrap()),
            ("RUST_LOG", "info,sqlx=warn"),
        ],
        log.into(),
    );
    wait_for_stage(&qs, "dual_write", Duration::from_secs(10)).await;
    let (status, _, created) = qs
        .call(
            "POST",
            "/users",
            r#"{"email":"ada@example.com","theme":"dark","notifications_enabled":true}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");

    // An edit is followed (the figure is printed; the bound is generous for a shared machine).
    std::fs::write(&flags, flagd_file("legacy_only")).unwrap();
    let took = wait_for_stage(&qs, "legacy_only", Duration::from_secs(10)).await;
    eprintln!("flagd file edit seen after {took:?}");
    std::fs::write(&flags, flagd_file("dual_write")).unwrap();
    wait_for_stage(&qs, "dual_write", Duration::from_secs(10)).await;

    // live with no backfill and no clean verify: held at dual_write.
    std::fs::write(&flags, flagd_file("live")).unwrap();
    let url = "sqlite://twintrack-quickstart.db";
    let held_line = "twintrack_flags_held{";
    let start = std::time::Instant::now();
    let text = loop {
        let text = metrics_text(&qs).await;
        if text
            .lines()
            .any(|l| l.starts_with(held_line) && l.ends_with(" 1"))
        {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no hold:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let line = text.lines().find(|l| l.starts_with(held_line)).unwrap();
    for part in [
        "migration=\"user_settings\"",
        "wanted=\"live\"",
        "serving=\"dual_write\"",
    ] {
        assert!(line.contains(part), "{line}");
    }
    for _ in 0..5 {
        let (status, stage, _) = qs.call("GET", "/users/999999/settings", "").await;
        assert_eq!((status, stage.as_deref()), (404, Some("dual_write")));
    }
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("transition rules refuse") && logged.contains("twintrack backfill"),
        "the refusal and its remedy in the log:\n{logged}"
    );
    let (code, out) = cli(
        dir.path(),
        url,
        &format!("--flags-file {} status", flags.display()),
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("HELD: held at dual_write") && out.contains("wants live"),
        "{out}"
    );
    let (code, out) = cli(
        dir.path(),
        url,
        &format!(
            "--json --flags-file {} status user_settings",
            flags.display()
        ),
    );
    assert_eq!(code, 0, "{out}");
    let detail: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(detail["held"]["wanted"], "live", "{detail}");
    assert_eq!(detail["state"]["stage"], "dual_write", "{detail}");

    // A safe edit afterwards is followed, and the hold ends.
    std::fs::write(&flags, flagd_file("legacy_only")).unwrap();
    wait_for_stage(&qs, "legacy_only", Duration::from_secs(10)).await;
    let text = metrics_text(&qs).await;
    let line = text.lines().find(|l| l.starts_with(held_line)).unwrap();
    assert!(line.ends_with(" 0"), "{line}");

    // Not JSON: the provider keeps the last valid flags, every request is served.
    std::fs::write(&flags, "{\"flags\": {\"user_settings\": ").unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let (status, stage, _) = qs.call("GET", "/users/999999/settings", "").await;
        assert_eq!((status, stage.as_deref()), (404, Some("legacy_only")));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, got) = qs
        .call("GET", &format!("/users/{}/settings", created["id"]), "")
        .await;
    assert_eq!(status, 200, "{got}");
    // A value that names no stage: the last known stage stays, the value is in the log.
    std::fs::write(&flags, flagd_file("dual-write-please")).unwrap();
    let start = std::time::Instant::now();
    while !std::fs::read_to_string(&log_path)
        .unwrap()
        .contains("dual-write-please")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the bad value is logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, stage, _) = qs.call("GET", "/users/999999/settings", "").await;
    assert_eq!((status, stage.as_deref()), (404, Some("legacy_only")));
    assert!(metrics_text(&qs).await.contains("twintrack_flags_invalid"));

    // And a valid file again is followed.
    std::fs::write(&flags, flagd_file("dual_write")).unwrap();
    wait_for_stage(&qs, "dual_write", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_on_postgres_sees_cli_flips_by_notify() {
    let Some(db) = common::pg::fresh_db().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let qs = Quickstart::start(dir.path(), Some(&db.url));
    exercise_routes(&qs).await;
    let (code, out) = cli(
        dir.path(),
        &db.url,
        "stage set user_settings dual_write --reason try-it",
    );
    assert_eq!(code, 0, "{out}");
    let took = wait_for_stage(&qs, "dual_write", Duration::from_secs(5)).await;
    eprintln!("PostgreSQL: flip seen after {took:?}");
}

/// The README's replica set-up: `REPLICA_DATABASE_URLS` and `TWINTRACK_RYW_SECRET`, on a real
/// replica 300 ms behind. A write answers with a token; a read with it sees the write (from the
/// primary); a read without it is served by the replica.
#[tokio::test(flavor = "multi_thread")]
async fn quickstart_reads_its_writes_through_a_lagging_replica() {
    let Some(db) = common::pg::fresh_db().await else {
        return;
    };
    assert!(
        !db.replica_urls.is_empty(),
        "the test cluster has a replica"
    );
    let dir = tempfile::tempdir().unwrap();
    let replicas = db.replica_urls.join(",");
    let qs = Quickstart::start_with(
        dir.path(),
        Some(&db.url),
        &[
            ("REPLICA_DATABASE_URLS", replicas.as_str()),
            ("TWINTRACK_RYW_SECRET", "a shared secret of 32 bytes ...."),
        ],
    );
    let (status, headers, created) = qs
        .request(
            "POST",
            "/users",
            r#"{"email":"r@example.com","theme":"dark","notifications_enabled":true}"#,
            None,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let token = headers["x-twintrack-ryw"].to_str().unwrap().to_owned();
    let path = format!("/users/{}/settings", created["id"]);
    let (status, headers, got) = qs.request("GET", &path, "", Some(&token)).await;
    assert_eq!((status, got["theme"].as_str()), (200, Some("dark")));
    assert_eq!(headers["x-twintrack-read-from"], "primary");
    assert!(
        headers.get("x-twintrack-ryw").is_none(),
        "a read issues no token"
    );
    // Without the token, once the replica is in service: served by the replica.
    let start = std::time::Instant::now();
    loop {
        let (status, headers, _) = qs.request("GET", &path, "", None).await;
        // 404 while the replica has not replayed the new user yet: that is what a token is for.
        assert!(status == 200 || status == 404, "{status}");
        if headers["x-twintrack-read-from"] == "replica" && status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the replica was never used"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A garbage token is ignored (no pin), not an error.
    let (status, headers, _) = qs.request("GET", &path, "", Some("v1.garbage")).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-twintrack-read-from"], "replica");
}

/// SIGTERM during load (two databases, dual writes): the quickstart stops taking connections,
/// answers every request already made, stops its repair worker and exits 0; no request sees
/// a reset (a request either gets its answer, or finds the port closed); every acknowledged
/// write is in legacy, and in the new database or still a repair intent. The time to exit is
/// printed (the issue's figure: within 5 s).
#[tokio::test(flavor = "multi_thread")]
async fn quickstart_drains_its_requests_on_sigterm_and_exits_0() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let legacy_url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("legacy.db").display()
    );
    let new_url = format!("sqlite://{}?mode=rwc", dir.path().join("new.db").display());
    let qs = Quickstart::start_with(
        dir.path(),
        Some(&legacy_url),
        &[("NEW_DATABASE_URL", new_url.as_str())],
    );
    let (code, out) = cli(
        dir.path(),
        &legacy_url,
        "stage set user_settings dual_write --reason sigterm-test",
    );
    assert_eq!(code, 0, "{out}");
    wait_for_stage(&qs, "dual_write", Duration::from_secs(10)).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let body =
            format!(r#"{{"email":"u{i}@example.com","theme":"t0","notifications_enabled":true}}"#);
        let (status, _, created) = qs.call("POST", "/users", &body).await;
        assert_eq!(status, 201, "{created}");
        ids.push(created["id"].as_i64().unwrap());
    }

    // Eight clients writing their own users, each on a kept-alive connection.
    let signalled = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..8 {
        let (base, signalled) = (qs.base.clone(), signalled.clone());
        let mine: Vec<i64> = ids.iter().copied().skip(c).step_by(8).collect();
        clients.push(tokio::spawn(async move {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .build_http::<Full<Bytes>>();
            // Per user: the acknowledged theme, and any whose answer never came.
            let mut acked: std::collections::HashMap<i64, Vec<String>> = Default::default();
            let mut answered = 0u32;
            for n in 1.. {
                let id = mine[n % mine.len()];
                let theme = format!("t{n}");
                let req = http::Request::builder()
                    .method("PUT")
                    .uri(format!("{base}/users/{id}/settings"))
                    .body(Full::new(Bytes::from(format!(
                        r#"{{"theme":"{theme}","notifications_enabled":false}}"#
                    ))))
                    .unwrap();
                match client.request(req).await {
                    Ok(res) => {
                        let status = res.status().as_u16();
                        let _ = res.into_body().collect().await;
                        assert!(status == 200, "PUT answered {status}");
                        acked.insert(id, vec![theme]);
                        answered += 1;
                    }
                    // The port is closed: the server has stopped taking connections.
                    Err(e) if e.is_connect() && signalled.load(Ordering::SeqCst) => break,
                    Err(e) => panic!(
                        "a request saw {e:?} (signalled: {})",
                        signalled.load(Ordering::SeqCst)
                    ),
                }
            }
            (acked, answered)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signalled.store(true, Ordering::SeqCst);
    let mut qs = qs;
    let (status, took) = common::signal_and_wait(&mut qs.child, "-TERM").await;
    eprintln!("SIGTERM to exit: {took:?}");
    assert_eq!(status.code(), Some(0), "exit status {status:?}");

    let mut acked = std::collections::HashMap::new();
    let mut answered = 0;
    for client in clients {
        let (mine, n) = client.await.unwrap();
        acked.extend(mine);
        answered += n;
    }
    assert!(answered > 50, "the load ran ({answered} answered PUTs)");

    // Nothing acknowledged is lost: legacy holds it; the new database too, or an intent says so.
    let legacy = twintrack::Database::connect(&legacy_url).await.unwrap();
    let new = twintrack::Database::connect(&new_url).await.unwrap();
    let mut behind = 0;
    for (id, themes) in &acked {
        let profile: String = twintrack::db::query("SELECT profile FROM users WHERE id = $1")
            .bind(*id)
            .scalar(&legacy)
            .await
            .unwrap();
        let theme: Value = serde_json::from_str::<Value>(&profile).unwrap()["theme"].clone();
        assert!(
            themes.iter().any(|t| theme == *t),
            "user {id}: legacy {theme}, acked {themes:?}"
        );
        let new_theme: Option<String> =
            twintrack::db::query("SELECT theme FROM user_settings WHERE user_id = $1")
                .bind(*id)
                .fetch_optional(&new)
                .await
                .unwrap()
                .map(|row| row.get("theme").unwrap());
        if new_theme.as_deref() != theme.as_str() {
            behind += 1;
        }
    }
    let intents = twintrack::dual::pending_intents(&legacy, "user_settings")
        .await
        .unwrap();
    assert!(
        behind <= intents,
        "{behind} keys behind in the new database, {intents} intents"
    );
    eprintln!("{answered} PUTs answered; {behind} keys behind, {intents} intents pending");
}

/// What the OTLP receiver below was sent.
#[derive(Default)]
struct Received {
    metrics: std::collections::BTreeSet<String>,
    /// Attributes (key → value) of each data point of `db.client.operation.duration`.
    duration_points: Vec<std::collections::BTreeMap<String, String>>,
    /// Each span's name and attributes.
    spans: Vec<(String, std::collections::BTreeMap<String, String>)>,
    service_names: std::collections::BTreeSet<String>,
}

fn any_value(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(V::StringValue(s)) => s.clone(),
        Some(V::IntValue(i)) => i.to_string(),
        Some(V::BoolValue(b)) => b.to_string(),
        Some(V::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(
    kvs: &[opentelemetry_proto::tonic::common::v1::KeyValue],
) -> std::collections::BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), any_value(&kv.value)))
        .collect()
}

type Sink = std::sync::Arc<std::sync::Mutex<Received>>;

/// What an OTLP metrics export carried: service names, metric names, duration points.
fn take_metrics(
    req: &opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
    r: &mut Received,
) {
    use opentelemetry_proto::tonic::metrics::v1::metric::Data;
    for rm in &req.resource_metrics {
        if let Some(resource) = &rm.resource {
            let attrs = attributes(&resource.attributes);
            r.service_names.extend(attrs.get("service.name").cloned());
        }
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            r.metrics.insert(m.name.clone());
            if m.name == "db.client.operation.duration"
                && let Some(Data::Histogram(h)) = &m.data
            {
                for dp in &h.data_points {
                    r.duration_points.push(attributes(&dp.attributes));
                }
            }
        }
    }
}

/// What an OTLP traces export carried: each span's name and attributes.
fn take_traces(
    req: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    r: &mut Received,
) {
    for rs in &req.resource_spans {
        for span in rs.scope_spans.iter().flat_map(|s| &s.spans) {
            r.spans
                .push((span.name.clone(), attributes(&span.attributes)));
        }
    }
}

/// A real OTLP/HTTP receiver on loopback (the collector protocol: protobuf bodies on
/// `/v1/metrics` and `/v1/traces`, decoded with the protocol's own message types).
async fn otlp_receiver() -> (String, Sink) {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message as _;
    let received = Sink::default();
    let (metrics_sink, traces_sink) = (received.clone(), received.clone());
    let app = axum::Router::new()
        .route(
            "/v1/metrics",
            axum::routing::post(move |body: Bytes| async move {
                let req = ExportMetricsServiceRequest::decode(body).expect("OTLP metrics");
                take_metrics(&req, &mut metrics_sink.lock().unwrap());
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }),
        )
        .route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP traces");
                take_traces(&req, &mut traces_sink.lock().unwrap());
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, received)
}

/// The collector's gRPC services (`opentelemetry.proto.collector.{metrics,trace}.v1`), from
/// the protocol's own generated server code.
#[derive(Clone)]
struct GrpcReceiver(Sink);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsService
    for GrpcReceiver
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceResponse,
        >,
        tonic::Status,
    > {
        take_metrics(req.get_ref(), &mut self.0.lock().unwrap());
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for GrpcReceiver
{
    async fn export(
        &self,
        req: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        take_traces(req.get_ref(), &mut self.0.lock().unwrap());
        Ok(tonic::Response::new(Default::default()))
    }
}

/// A real OTLP/gRPC receiver on loopback.
async fn otlp_grpc_receiver() -> (String, Sink) {
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::MetricsServiceServer;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
    let received = Sink::default();
    let receiver = GrpcReceiver(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(receiver.clone()))
            .add_service(TraceServiceServer::new(receiver))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (base, received)
}

/// Waits until `received` holds duration points of both sides and two dual-store spans.
async fn wait_for_export(received: &Sink) {
    let start = std::time::Instant::now();
    loop {
        {
            let r = received.lock().unwrap();
            let sides: std::collections::BTreeSet<&str> = r
                .duration_points
                .iter()
                .filter_map(|p| p.get("twintrack.side").map(String::as_str))
                .collect();
            // Both sides' spans: batches are cut on a timer, so the first may hold only one.
            let span_sides: std::collections::BTreeSet<&str> = r
                .spans
                .iter()
                .filter_map(|(_, a)| a.get("twintrack.side").map(String::as_str))
                .collect();
            if sides.len() == 2 && span_sides.len() == 2 {
                return;
            }
        }
        if start.elapsed() > Duration::from_secs(30) {
            let r = received.lock().unwrap();
            panic!(
                "nothing (enough) received: metrics {:?}, spans {:?}",
                r.metrics,
                r.spans.iter().map(|(name, _)| name).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at an OTLP/HTTP receiver, the quickstart exports
/// metrics and spans over HTTP/protobuf: the semantic-convention duration histogram with
/// `db.system.name`, `db.operation.name`, `twintrack.migration`, `twintrack.side`; a span per
/// dual-store call and side with `twintrack.stage` and `twintrack.read_from`; the service named
/// by `OTEL_SERVICE_NAME`. Its log still goes to stderr and `/metrics` still answers.
#[tokio::test(flavor = "multi_thread")]
async fn quickstart_exports_metrics_and_spans_over_otlp_http() {
    let (endpoint, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let qs = Quickstart::start_with(
        dir.path(),
        None,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_SERVICE_NAME", "quickstart-otlp-test"),
            ("RUST_LOG", "info,sqlx=warn"),
        ],
    );
    let url = "sqlite://twintrack-quickstart.db";
    let (code, out) = cli(
        dir.path(),
        url,
        "stage set user_settings dual_write --reason otlp",
    );
    assert_eq!(code, 0, "{out}");
    wait_for_stage(&qs, "dual_write", Duration::from_secs(10)).await;
    exercise_routes_in_dual_write(&qs).await;
    assert!(
        metrics_text(&qs)
            .await
            .contains("db_client_operation_duration_seconds")
    );

    wait_for_export(&received).await;
    let r = received.lock().unwrap();
    assert!(
        r.service_names.contains("quickstart-otlp-test"),
        "{:?}",
        r.service_names
    );
    assert!(
        r.metrics.contains("twintrack.flags.refresh"),
        "{:?}",
        r.metrics
    );
    let point = r
        .duration_points
        .iter()
        .find(|p| p.get("twintrack.side").map(String::as_str) == Some("new"))
        .unwrap();
    for (key, value) in [
        ("db.system.name", "sqlite"),
        ("twintrack.migration", "user_settings"),
    ] {
        assert_eq!(point.get(key).map(String::as_str), Some(value), "{point:?}");
    }
    assert!(point.contains_key("db.operation.name"), "{point:?}");
    let (name, attrs) = r
        .spans
        .iter()
        .find(|(_, a)| a.get("twintrack.side").map(String::as_str) == Some("new"))
        .unwrap();
    assert_eq!(name, "write user_settings", "{attrs:?}");
    for (key, value) in [
        ("db.operation.name", "write"),
        ("db.system.name", "sqlite"),
        ("twintrack.migration", "user_settings"),
        ("twintrack.stage", "dual_write"),
        ("twintrack.read_from", "primary"),
    ] {
        assert_eq!(
            attrs.get(key).map(String::as_str),
            Some(value),
            "{key}: {attrs:?}"
        );
    }
}

/// `OTEL_EXPORTER_OTLP_PROTOCOL=grpc`: the quickstart exports the same metrics and spans to
/// a collector's gRPC services; `http/json` (not built) is refused with exit 2 naming it.
#[tokio::test(flavor = "multi_thread")]
async fn quickstart_exports_metrics_and_spans_over_otlp_grpc() {
    let (endpoint, received) = otlp_grpc_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let qs = Quickstart::start_with(
        dir.path(),
        None,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_SERVICE_NAME", "quickstart-otlp-grpc"),
        ],
    );
    let (code, out) = cli(
        dir.path(),
        "sqlite://twintrack-quickstart.db",
        "stage set user_settings dual_write --reason otlp",
    );
    assert_eq!(code, 0, "{out}");
    wait_for_stage(&qs, "dual_write", Duration::from_secs(10)).await;
    exercise_routes_in_dual_write(&qs).await;
    wait_for_export(&received).await;
    let r = received.lock().unwrap();
    assert!(
        r.service_names.contains("quickstart-otlp-grpc"),
        "{:?}",
        r.service_names
    );
    let point = r
        .duration_points
        .iter()
        .find(|p| p.get("twintrack.side").map(String::as_str) == Some("legacy"))
        .unwrap();
    assert_eq!(
        point.get("db.system.name").map(String::as_str),
        Some("sqlite")
    );
    drop(r);
    drop(qs);

    // A short CLI command (a verify) exports its figures at exit: its final flush over gRPC
    // runs while its runtime still drives the connection.
    let verify = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .current_dir(dir.path())
        .arg("--database-url")
        .arg("sqlite://twintrack-quickstart.db")
        .arg("--config")
        .arg(common::quickstart_config())
        .args(["verify", "user_settings"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .output()
        .unwrap();
    assert!(
        verify.status.code().is_some_and(|c| c <= 1),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let metrics = received.lock().unwrap().metrics.clone();
    assert!(
        metrics.contains("twintrack.verify.runs"),
        "the verify's figures did not arrive: {metrics:?}"
    );

    // `twintrack status` with these OTEL variables: its stderr, after checking it exited 2.
    let refused = |env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
            .current_dir(dir.path())
            .args([
                "--database-url",
                "sqlite://twintrack-quickstart.db",
                "status",
            ])
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        stderr
    };
    let out = refused(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
    ]);
    assert!(
        out.contains(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=\"http/json\": expected http/protobuf or grpc"
        ),
        "{out}"
    );
    // A TLS endpoint would fail every export quietly: refused, naming it.
    let out = refused(&[(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "https://collector.example:4317",
    )]);
    assert!(out.contains("built without TLS"), "{out}");
}

/// A write and reads in `dual_write`: both sides' calls.
async fn exercise_routes_in_dual_write(qs: &Quickstart) {
    let (status, _, created) = qs
        .call(
            "POST",
            "/users",
            r#"{"email":"otlp@example.com","theme":"dark","notifications_enabled":true}"#,
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let path = format!("/users/{}/settings", created["id"]);
    for _ in 0..3 {
        let (status, _, _) = qs.call("GET", &path, "").await;
        assert_eq!(status, 200);
    }
}
