//! The admin page in a real browser: Debian's headless Chromium, driven over WebDriver by
//! chromedriver. Sign in, see the migration, roll it back with a reason; the stage changes in
//! the database and the page shows it. Saves a screenshot to `target/admin-rollback.png`.
//!
//! Without chromium and chromedriver the test says so loudly and returns; with
//! `TWINTRACK_REQUIRE_BROWSER=1` (set by `.ci/run`, which installs them) it fails instead.

mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use twintrack::control::{AdminTokens, ControlServer};
use twintrack::flags::{FlagStore, SqlFlagStore, StageChange};
use twintrack::{Database, Stage};

const TOKEN: &str = "browser-oncall-token-123";
const M: &str = "user_settings";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Driver {
    child: Child,
    base: String,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wd(base: &str, method: &str, path: &str, body: Value) -> Value {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        }))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if value["value"]["error"].is_string() {
        panic!("webdriver {method} {path}: {}", value["value"]);
    }
    value["value"].clone()
}

impl Driver {
    async fn start() -> Option<Driver> {
        let found = |name: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {name}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if !found("chromedriver") || !(found("chromium") || found("chromium-browser")) {
            let why =
                "no chromium/chromedriver here (Debian: apt-get install chromium chromium-driver)";
            if std::env::var("TWINTRACK_REQUIRE_BROWSER").as_deref() == Ok("1") {
                panic!("TWINTRACK_REQUIRE_BROWSER=1 but {why}");
            }
            eprintln!("\n!!!!!!!! SKIPPING THE BROWSER TEST: {why}\n");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let base = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "chromedriver did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut driver = Driver {
            child,
            base,
            session: String::new(),
        };
        let session = wd(
            &driver.base,
            "POST",
            "/session",
            json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"]
            }}}}),
        )
        .await;
        driver.session = session["sessionId"].as_str().unwrap().to_owned();
        Some(driver)
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        wd(
            &self.base,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
        .await
    }

    async fn go(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    async fn find(&self, css: &str) -> String {
        let found = self
            .call(
                "POST",
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        found[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css).await;
        self.call(
            "POST",
            &format!("/element/{element}/value"),
            json!({ "text": text }),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let element = self.find(css).await;
        self.call("POST", &format!("/element/{element}/click"), json!({}))
            .await;
    }

    async fn source(&self) -> String {
        self.call("GET", "/source", Value::Null)
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn wait_for(&self, what: &str, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let page = self.source().await;
            if page.contains(needle) {
                return page;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "waiting for {what}: {page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn screenshot(&self, path: &std::path::Path) {
        let png = self.call("GET", "/screenshot", Value::Null).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        assert!(bytes.len() > 1000, "an empty screenshot");
        // Written aside and renamed: a reader (or a second test run) never sees half a file.
        let aside = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&aside, bytes).unwrap();
        std::fs::rename(&aside, path).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn on_call_rolls_back_from_the_admin_page_in_a_real_browser() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let Some(browser) = Driver::start().await else {
        return;
    };
    let db = Database::connect(&pg.url).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register(M, "test").await.unwrap();
    store
        .set_stage(StageChange::new(
            M,
            Stage::DualWrite,
            "deploy",
            "dual writes on",
        ))
        .await
        .unwrap();
    // Real dual writes, for the latency chart: users created and updated through the
    // quickstart's dual store, its figures written at drain.
    repos::create_shapes::<i64>(&db).await.unwrap();
    let flags = twintrack::flags::FlagCache::builder(store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let (legacy, new) = repos::repos::<sqlx::Postgres, i64>();
    let users = repos::Users {
        settings: twintrack::dual::DualStore::builder(
            M,
            legacy,
            new,
            db.typed::<sqlx::Postgres>().unwrap().clone(),
            flags,
            repos::SettingsResync::default(),
        )
        .build()
        .unwrap(),
    };
    for i in 0..40 {
        let settings = repos::Settings {
            theme: format!("theme-{i}"),
            notifications_enabled: i % 2 == 0,
        };
        let id = users
            .create(&format!("u{i}@example.com"), settings.clone())
            .await
            .unwrap();
        users.update(&id, settings).await.unwrap();
    }
    assert!(users.settings.drain(Duration::from_secs(10)).await);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let tokens = AdminTokens::parse(&format!("oncall={TOKEN}")).unwrap();
    let server = ControlServer::new(store.clone(), db, tokens);
    tokio::spawn(async move {
        server
            .serve(listener, std::future::pending())
            .await
            .unwrap()
    });

    // Not signed in: the login form. Sign in.
    browser.go(&format!("{base}/admin")).await;
    browser.wait_for("the login form", "name=\"token\"").await;
    browser.type_into("#token", TOKEN).await;
    browser.click("#login").await;
    let page = browser
        .wait_for("the admin page", "twintrack migrations")
        .await;
    assert!(
        page.contains("id=\"stage-user_settings\">dual_write<"),
        "{page}"
    );
    // The pipeline: six stages, the current one marked, the rollback allowed, moves the
    // rules refuse showing why.
    let pipeline = &page[page
        .find("id=\"pipeline-user_settings\"")
        .expect("a pipeline")..];
    let pipeline = &pipeline[..pipeline.find("</ol>").unwrap()];
    assert_eq!(pipeline.matches("<li ").count(), 6, "{pipeline}");
    assert!(
        pipeline.contains(
            "<li class=\"current\" title=\"current\"><span class=\"name\">dual_write</span>"
        ),
        "{pipeline}"
    );
    assert!(
        pipeline.contains(
            "<li class=\"allowed\" title=\"allowed now\"><span class=\"name\">legacy_only</span>"
        ),
        "{pipeline}"
    );
    let shadow = &pipeline[pipeline.find(">shadow<").unwrap() - 80..];
    assert!(
        shadow.contains("class=\"refused\"") && shadow.contains("backfill"),
        "{shadow}"
    );
    // The charts: the latency of 80 writes on each side drawn (p50 and p99), the mismatch
    // chart empty and saying so.
    let latency = &page[page
        .find("id=\"chart-latency-user_settings\"")
        .expect("a latency chart")..];
    let latency = &latency[..latency.find("</figure>").unwrap()];
    assert_eq!(latency.matches("<polyline").count(), 4, "{latency}");
    assert!(latency.contains("(80 writes); new p50"), "{latency}");
    assert!(
        page.contains("no shadow comparisons in the last 60 minutes"),
        "{page}"
    );
    let screenshot =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/admin-pipeline.png");
    browser.screenshot(&screenshot).await;
    eprintln!("screenshot: {}", screenshot.display());

    // Roll back with a reason and the confirmation tick.
    browser
        .type_into(
            "#rollback-user_settings input[name=reason]",
            "incident 42 from the browser",
        )
        .await;
    browser
        .click("#rollback-user_settings input[name=confirm]")
        .await;
    browser.click("#rollback-user_settings button").await;
    let page = browser
        .wait_for(
            "the rolled-back stage",
            "id=\"stage-user_settings\">legacy_only<",
        )
        .await;
    assert!(
        page.contains("dual_write -&gt; legacy_only"),
        "the page confirms the move: {page}"
    );
    let screenshot =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/admin-rollback.png");
    browser.screenshot(&screenshot).await;
    eprintln!("screenshot: {}", screenshot.display());

    // The database agrees, and the audit log names the token's holder and the reason.
    let record = store.get(M).await.unwrap();
    assert_eq!(record.state.stage, Stage::LegacyOnly);
    let audit = store.audit_log(M, 1).await.unwrap();
    assert_eq!(audit[0].actor, "admin:oncall");
    assert_eq!(audit[0].reason, "incident 42 from the browser");
    browser.call("DELETE", "", Value::Null).await;
}
