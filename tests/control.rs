//! The control plane against a real PostgreSQL: every gRPC call and its error codes, a CLI flip
//! pushed to a watcher, the admin page's forms (auth, CSRF, refusals), and `/metrics`.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use twintrack::control::proto::control_service_client::ControlServiceClient;
use twintrack::control::proto::*;
use twintrack::control::{AdminTokens, ControlServer};
use twintrack::flags::{FlagStore, SqlFlagStore};
use twintrack::{Database, Stage};

const TOKEN: &str = "oncall-token-0123456789";
const M: &str = "user_settings";

struct Server {
    base: String,
    url: String,
    store: Arc<SqlFlagStore>,
    db: Database,
    _task: tokio::task::JoinHandle<()>,
}

async fn server() -> Option<Server> {
    let pg = common::pg::fresh_db().await?;
    let db = Database::connect(&pg.url).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register(M, "test").await.unwrap();
    store.register("other", "test").await.unwrap();
    let tokens =
        AdminTokens::parse(&format!("oncall={TOKEN},robot=robot-token-abcdefghij")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let exporter = twintrack::metrics::PrometheusExporter::new().unwrap();
    let control = ControlServer::new(store.clone(), db.clone(), tokens).prometheus(exporter);
    let task = tokio::spawn(async move {
        control
            .serve(listener, std::future::pending())
            .await
            .unwrap();
    });
    Some(Server {
        base,
        url: pg.url,
        store,
        db,
        _task: task,
    })
}

type Intercept =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client =
    ControlServiceClient<tonic::service::interceptor::InterceptedService<Channel, Intercept>>;

async fn client(base: &str, token: Option<&str>) -> Client {
    let channel = Channel::from_shared(base.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let header: Option<MetadataValue<_>> = token.map(|t| format!("Bearer {t}").parse().unwrap());
    let intercept: Intercept = Box::new(move |mut req: tonic::Request<()>| {
        if let Some(h) = &header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    });
    ControlServiceClient::with_interceptor(channel, intercept)
}

async fn stage_of(store: &SqlFlagStore, m: &str) -> Stage {
    store.get(m).await.unwrap().state.stage
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let status = r.expect_err("expected an error");
    (status.code(), status.message().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_answers_and_maps_errors_to_grpc_codes() {
    let Some(s) = server().await else { return };

    // No token, a wrong token: UNAUTHENTICATED, and nothing else is reachable.
    for token in [None, Some("wrong-token-wrong-token")] {
        let mut c = client(&s.base, token).await;
        let (code_, msg) = code(c.list_migrations(ListMigrationsRequest {}).await);
        assert_eq!(code_, Code::Unauthenticated, "{msg}");
        let (code_, _) = code(
            c.set_stage(SetStageRequest {
                name: M.into(),
                stage: "dual_write".into(),
                reason: "sneaky".into(),
                ..Default::default()
            })
            .await,
        );
        assert_eq!(code_, Code::Unauthenticated);
    }
    assert_eq!(stage_of(&s.store, M).await, Stage::LegacyOnly);

    let mut c = client(&s.base, Some(TOKEN)).await;
    let list = c
        .list_migrations(ListMigrationsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.migrations.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, vec!["other", M]);

    // GetMigration: state, evidence, the moves allowed now.
    let got = c
        .get_migration(GetMigrationRequest { name: M.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.migration.unwrap().stage, "legacy_only");
    let shadow = got.moves.iter().find(|m| m.to_stage == "shadow").unwrap();
    assert!(
        !shadow.allowed && shadow.remedy.contains("twintrack"),
        "{shadow:?}"
    );
    assert!(
        got.moves
            .iter()
            .any(|m| m.to_stage == "dual_write" && m.allowed)
    );
    assert_eq!(
        code(
            c.get_migration(GetMigrationRequest {
                name: "nope".into()
            })
            .await
        )
        .0,
        Code::NotFound
    );
    assert_eq!(
        code(
            c.get_migration(GetMigrationRequest { name: "".into() })
                .await
        )
        .0,
        Code::InvalidArgument
    );

    // SetStage: allowed, invalid stage, empty reason, refused, stale version, oversized.
    let set = |stage: &str, reason: &str, expected_version: i64| SetStageRequest {
        name: M.into(),
        stage: stage.into(),
        expected_version,
        reason: reason.into(),
        force: false,
    };
    let done = c
        .set_stage(set("dual_write", "start", 0))
        .await
        .unwrap()
        .into_inner();
    assert!(done.changed);
    let version = done.migration.unwrap().version;
    let audit = s.store.audit_log(M, 1).await.unwrap();
    assert_eq!(
        audit[0].actor, "admin:oncall",
        "the audit log names the token's holder"
    );
    assert_eq!(
        code(c.set_stage(set("sideways", "x", 0)).await).0,
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.set_stage(set("shadow", "", 0)).await).0,
        Code::InvalidArgument
    );
    let (refused, msg) = code(c.set_stage(set("shadow", "compare", 0)).await);
    assert_eq!(refused, Code::FailedPrecondition);
    assert!(
        msg.contains("twintrack backfill"),
        "the refusal names the remedy: {msg}"
    );
    assert_eq!(
        code(c.set_stage(set("legacy_only", "stale", version - 1)).await).0,
        Code::Aborted
    );
    assert_eq!(
        code(c.set_stage(set("legacy_only", &"r".repeat(5000), 0)).await).0,
        Code::InvalidArgument
    );
    let (big, _) = code(
        c.set_stage(set("legacy_only", &"r".repeat(200_000), 0))
            .await,
    );
    assert!(
        matches!(big, Code::OutOfRange | Code::ResourceExhausted),
        "{big:?}"
    );
    let unknown = SetStageRequest {
        name: "nope".into(),
        ..set("dual_write", "x", 0)
    };
    assert_eq!(code(c.set_stage(unknown).await).0, Code::NotFound);
    assert_eq!(
        stage_of(&s.store, M).await,
        Stage::DualWrite,
        "no bad call changed anything"
    );

    // Rollback.
    let back = c
        .rollback(RollbackRequest {
            name: M.into(),
            reason: "incident".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            back.from_stage.as_str(),
            back.migration.unwrap().stage.as_str()
        ),
        ("dual_write", "legacy_only")
    );
    let (at_bottom, _) = code(
        c.rollback(RollbackRequest {
            name: M.into(),
            reason: "again".into(),
        })
        .await,
    );
    assert_eq!(at_bottom, Code::FailedPrecondition);
    assert_eq!(
        code(
            c.rollback(RollbackRequest {
                name: M.into(),
                reason: "".into()
            })
            .await
        )
        .0,
        Code::FailedPrecondition
    );

    // ListMismatches.
    twintrack::db::query(
        "INSERT INTO twintrack_mismatches (migration, key_text, class, stage, diff, legacy_micros, new_micros, at)
         VALUES ($1, '42', 'confirmed', 'shadow', '[{\"path\":\"theme\",\"legacy\":\"a\",\"new\":\"b\"}]', 1, 2, 3)",
    )
    .bind(M)
    .execute(&s.db)
    .await
    .unwrap();
    let mm = c
        .list_mismatches(ListMismatchesRequest {
            name: M.into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mm.mismatches.len(), 1);
    #[allow(deprecated)] // the integer key stays filled for older clients
    let old_key = mm.mismatches[0].key;
    assert_eq!(
        (
            old_key,
            mm.mismatches[0].key_text.as_str(),
            mm.mismatches[0].class.as_str()
        ),
        (42, "42", "confirmed")
    );
    assert!(mm.mismatches[0].diff_json.contains("theme"));
    assert_eq!(
        code(
            c.list_mismatches(ListMismatchesRequest {
                name: M.into(),
                limit: 5000
            })
            .await
        )
        .0,
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.list_mismatches(ListMismatchesRequest {
                name: "nope".into(),
                limit: 1
            })
            .await
        )
        .0,
        Code::NotFound
    );

    // GetProgress.
    twintrack::db::query(
        "INSERT INTO twintrack_backfill_runs (migration, direction, lower_bound, upper_bound, started_at)
         VALUES ($1, 'forward', NULL, '100', 5)",
    )
    .bind(M)
    .execute(&s.db)
    .await
    .unwrap();
    let progress = c
        .get_progress(GetProgressRequest { name: M.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(progress.backfills.len(), 1);
    #[allow(deprecated)] // the integer bound stays filled for older clients
    let old_upper = progress.backfills[0].upper_bound;
    assert_eq!(
        (
            old_upper,
            progress.backfills[0].upper_key.as_deref(),
            progress.backfills[0].lower_key.as_deref(),
            progress.backfills[0].finished_at_micros
        ),
        (100, Some("100"), None, None)
    );
    assert_eq!(
        code(
            c.get_progress(GetProgressRequest {
                name: "nope".into()
            })
            .await
        )
        .0,
        Code::NotFound
    );

    // WatchMigrations: the current state first.
    let mut watch = c
        .watch_migrations(WatchMigrationsRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap().migration.unwrap();
    assert!(first.name == M || first.name == "other");
}

fn cli(url: &str, line: &str) -> (i32, String) {
    common::twintrack_cli(None, url, None, line)
}

/// The watcher hears the flip through LISTEN/NOTIFY: the server's PostgreSQL path has no timer.
#[tokio::test(flavor = "multi_thread")]
async fn a_cli_flip_reaches_a_watcher() {
    let Some(s) = server().await else { return };
    let mut c = client(&s.base, Some(TOKEN)).await;
    let mut watch = c
        .watch_migrations(WatchMigrationsRequest {})
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        watch.message().await.unwrap().unwrap();
    }
    let (code_, out) = cli(
        &s.url,
        "stage set user_settings dual_write --reason from-the-cli",
    );
    assert_eq!(code_, 0, "{out}");
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .expect("the flip reached the watcher")
        .unwrap()
        .unwrap()
        .migration
        .unwrap();
    assert_eq!((next.name.as_str(), next.stage.as_str()), (M, "dual_write"));
    assert_eq!(next.reason, "from-the-cli");
}

async fn http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, http::HeaderMap, String) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = client
        .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

fn form_value(html: &str, form_id: &str, name: &str) -> String {
    let form = &html[html.find(&format!("id=\"{form_id}\"")).expect(form_id)..];
    let at = form.find(&format!("name=\"{name}\" value=\"")).expect(name) + name.len() + 15;
    form[at..form[at..].find('"').unwrap() + at].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_page_needs_a_token_and_a_csrf_token_and_shows_refusals() {
    let Some(s) = server().await else { return };
    let (status, _, body) = http(&s.base, "GET", "/admin", &[], "").await;
    assert_eq!(status, 401);
    assert!(
        body.contains("name=\"token\""),
        "the 401 page offers the login form"
    );
    let (status, _, _) = http(
        &s.base,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        "token=wrong-wrong-wrong-wrong",
    )
    .await;
    assert_eq!(status, 401);
    let (status, headers, _) = http(
        &s.base,
        "POST",
        "/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        &format!("token={TOKEN}"),
    )
    .await;
    assert_eq!(status, 303);
    let cookie = headers["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_owned();
    let auth = [("cookie", cookie.as_str())];

    let (status, _, page) = http(&s.base, "GET", "/admin", &auth, "").await;
    assert_eq!(status, 200);
    assert!(
        page.contains("id=\"stage-user_settings\">legacy_only<"),
        "{page}"
    );
    // Moving forward into dual_write is allowed; the rollback button does not exist at the bottom.
    assert!(page.contains("Advance to dual_write"));
    let csrf = form_value(&page, "advance-user_settings", "csrf");
    let version = form_value(&page, "advance-user_settings", "expected_version");
    let post = |body: String| {
        let base = s.base.clone();
        let cookie = cookie.clone();
        async move {
            http(
                &base,
                "POST",
                "/admin/stage",
                &[
                    ("cookie", cookie.as_str()),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                &body,
            )
            .await
        }
    };
    // Without (or with a wrong) CSRF token, without confirm, with an empty reason: refused.
    for (body, expect) in [
        (
            format!(
                "migration={M}&to=dual_write&expected_version={version}&reason=x&confirm=yes&csrf=nope"
            ),
            403,
        ),
        (
            format!("migration={M}&to=dual_write&expected_version={version}&reason=x&confirm=yes"),
            400,
        ),
        (
            format!("migration={M}&to=dual_write&expected_version={version}&reason=x&csrf={csrf}"),
            400,
        ),
        (
            format!(
                "migration={M}&to=dual_write&expected_version={version}&reason=&confirm=yes&csrf={csrf}"
            ),
            400,
        ),
        (
            format!(
                "migration={M}&to=sideways&expected_version={version}&reason=x&confirm=yes&csrf={csrf}"
            ),
            400,
        ),
        (
            format!(
                "migration=nope&to=dual_write&expected_version={version}&reason=x&confirm=yes&csrf={csrf}"
            ),
            404,
        ),
    ] {
        let (status, _, _) = post(body.clone()).await;
        assert_eq!(status, expect, "{body}");
    }
    assert_eq!(
        stage_of(&s.store, M).await,
        Stage::LegacyOnly,
        "nothing changed"
    );
    // A robot's CSRF token does not work for the on-call session.
    let (status, _, _) = post(format!(
        "migration={M}&to=dual_write&expected_version={version}&reason=x&confirm=yes&csrf={}",
        "0".repeat(64)
    ))
    .await;
    assert_eq!(status, 403);

    let (status, headers, _) = post(format!(
        "migration={M}&to=dual_write&expected_version={version}&reason=start+dual+writes&confirm=yes&csrf={csrf}"
    ))
    .await;
    assert_eq!(status, 303);
    assert!(
        headers["location"]
            .to_str()
            .unwrap()
            .starts_with("/admin?done=")
    );
    assert_eq!(stage_of(&s.store, M).await, Stage::DualWrite);
    assert_eq!(
        s.store.audit_log(M, 1).await.unwrap()[0].actor,
        "admin:oncall"
    );
    // The same form again: its version is stale now.
    let (status, _, _) = post(format!(
        "migration={M}&to=dual_write&expected_version={version}&reason=again&confirm=yes&csrf={csrf}"
    ))
    .await;
    assert_eq!(status, 409);

    // Advancing into shadow is refused by the rules: the button is disabled and says why.
    let (_, _, page) = http(&s.base, "GET", "/admin", &auth, "").await;
    let advance = &page[page.find("id=\"advance-user_settings\"").unwrap()..];
    let advance = &advance[..advance.find("</form>").unwrap()];
    assert!(
        advance.contains("disabled")
            && advance.contains("refused:")
            && advance.contains("twintrack backfill"),
        "{advance}"
    );
    // A bearer header works for pages too.
    let bearer = format!("Bearer {TOKEN}");
    let (status, _, _) = http(
        &s.base,
        "GET",
        "/admin",
        &[("authorization", bearer.as_str())],
        "",
    )
    .await;
    assert_eq!(status, 200);
    // /metrics is open.
    let (status, _, _) = http(&s.base, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_admin_token_configuration_is_refused_by_serve() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
    for (spec, needle) in [
        ("", "no admin token"),
        ("short", "at least 16"),
        ("a=0123456789abcdef,a=0123456789abcdefg", "twice"),
        ("bad name=0123456789abcdef", "admin token name"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
            .arg("--database-url")
            .arg(&url)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("TWINTRACK_ADMIN_TOKEN", spec)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {err}");
        assert!(err.contains(needle), "{spec}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(&url)
        .args(["serve", "--listen", "not-an-address"])
        .env("TWINTRACK_ADMIN_TOKEN", "0123456789abcdef")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // A port already taken is a runtime failure: 5, not 2.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(&url)
        .args([
            "serve",
            "--listen",
            &taken.local_addr().unwrap().to_string(),
        ])
        .env("TWINTRACK_ADMIN_TOKEN", "0123456789abcdef")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("cannot listen on"), "{err}");
}

/// Turns new connections to a database off while alive (`ALLOW_CONNECTIONS false`, which holds
/// superusers off too) and back on when dropped.
struct ConnectionsHeld {
    admin: sqlx::PgPool,
    name: String,
}

impl ConnectionsHeld {
    async fn hold(admin: &sqlx::PgPool, name: &str) -> ConnectionsHeld {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
        )))
        .execute(admin)
        .await
        .unwrap();
        ConnectionsHeld {
            admin: admin.clone(),
            name: name.to_owned(),
        }
    }

    async fn release(self) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            self.name
        )))
        .execute(&self.admin)
        .await
        .unwrap();
        std::mem::forget(self);
    }
}

impl Drop for ConnectionsHeld {
    fn drop(&mut self) {
        // A failed test must not leave the database shut for the rest of the binary.
        let (admin, sql) = (
            self.admin.clone(),
            format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", self.name),
        );
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&admin)
                    .await;
            })
        })
        .join()
        .ok();
    }
}

/// The field report: a flip made while the control plane's connection to PostgreSQL was cut
/// never reached a `WatchMigrations` stream. Here every connection of the control plane and of
/// a flag cache (soft TTL of an hour, so only the push can bring it the flip) is terminated,
/// LISTEN ones included, reconnects are held off for over 30 s, a flip is made late in the gap, and
/// connections are let back in: the stream emits the flip and the cache serves it, a few
/// seconds after the reconnect.
#[tokio::test(flavor = "multi_thread")]
async fn a_flip_made_while_listen_connections_are_cut_reaches_watchers_and_caches() {
    let Some(s) = server().await else { return };
    let name = s
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let mut c = client(&s.base, Some(TOKEN)).await;
    let mut watch = c
        .watch_migrations(WatchMigrationsRequest {})
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        watch.message().await.unwrap().unwrap();
    }
    let cache_store = SqlFlagStore::open(Database::connect(&s.url).await.unwrap())
        .await
        .unwrap();
    let cache = twintrack::flags::FlagCache::builder(Arc::new(cache_store))
        .migration(M, Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    assert_eq!(cache.snapshot().stage(M), Some(Stage::LegacyOnly));
    // The flip is made over a connection opened before the gap.
    let flipper = SqlFlagStore::new(Database::from(
        sqlx::postgres::PgPoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .connect(&s.url)
            .await
            .unwrap(),
    ));
    flipper.get(M).await.unwrap();
    // ALLOW_CONNECTIONS is changed from another database.
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&s.url.replacen(&format!("/{name}"), "/postgres", 1))
        .await
        .unwrap();

    let flipper_pid: i32 = twintrack::db::query("SELECT pg_backend_pid()")
        .scalar(flipper.database())
        .await
        .unwrap();

    // The cut: every connection of the control plane and the cache ends (their pools', and
    // the LISTEN ones), and none can be made again for a while.
    let held = ConnectionsHeld::hold(&admin, &name).await;
    let cut: Vec<(String, bool)> = sqlx::query_as(
        "SELECT query, pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> $2",
    )
    .bind(&name)
    .bind(flipper_pid)
    .fetch_all(&admin)
    .await
    .unwrap();
    assert!(
        cut.iter().filter(|(q, _)| q.starts_with("LISTEN")).count() >= 2,
        "both listeners cut: {cut:?}"
    );
    // The listeners try to come back, and cannot, for longer than a connection attempt waits
    // (sqlx's pool gives up on an acquire after 30 s by default): as in the field report,
    // where the flip came 35 s into a 40 s cut.
    tokio::time::sleep(Duration::from_secs(31)).await;
    flipper
        .set_stage(twintrack::flags::StageChange::new(
            M,
            Stage::DualWrite,
            "oncall",
            "during the gap",
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    held.release().await;

    let next = tokio::time::timeout(Duration::from_secs(15), watch.message())
        .await
        .expect("the flip made in the gap reached the watcher")
        .unwrap()
        .unwrap()
        .migration
        .unwrap();
    assert_eq!((next.name.as_str(), next.stage.as_str()), (M, "dual_write"));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while cache.snapshot().stage(M) != Some(Stage::DualWrite) {
        assert!(
            std::time::Instant::now() < deadline,
            "the flip made in the gap reached the cache"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The field report: 20 mismatches with 400 KB values made a `ListMismatches` of 8 MB (a
/// default gRPC client refuses over 4 MiB), an 8 MB `twintrack mismatches` and a 2 MB admin
/// page. Here 100 rows sit in the table as an older twintrack stored them, uncapped (50 with
/// 400 KB values, 50 with 2,000 differing fields): the listing at its largest limit stays under
/// 4 MiB (values cut to their size, hash and first characters, fields past 64 KiB counted, and
/// past 2 MiB in all a diff is left out, saying so), as do the CLI's and the admin page's.
#[tokio::test(flavor = "multi_thread")]
async fn listings_of_mismatches_with_huge_values_stay_small() {
    let Some(s) = server().await else { return };
    // Older: 50 with 2,000 differing fields each; newer: 50 with two 400 KB values each.
    for sql in [
        "INSERT INTO twintrack_mismatches (migration, key_text, key, class, stage, diff, legacy_micros, new_micros, at)
         SELECT $1, CAST(g AS TEXT), g, 'confirmed', 'shadow',
                (SELECT CAST(json_agg(json_build_object('path', 'f' || i,
                    'legacy', repeat('l', 30), 'new', repeat('n', 30))) AS TEXT)
                 FROM generate_series(1, 2000) i), 1, 1, g
         FROM generate_series(1, 50) g",
        "INSERT INTO twintrack_mismatches (migration, key_text, key, class, stage, diff, legacy_micros, new_micros, at)
         SELECT $1, CAST(g AS TEXT), g, 'confirmed', 'shadow',
                CAST(json_build_array(json_build_object('path', 'theme',
                    'legacy', repeat('l', 400000), 'new', repeat('n', 400000))) AS TEXT), 1, 1, g
         FROM generate_series(51, 100) g",
    ] {
        twintrack::db::query(sql)
            .bind(M)
            .execute(&s.db)
            .await
            .unwrap();
    }
    let mut c = client(&s.base, Some(TOKEN)).await;
    let listed = c
        .list_mismatches(ListMismatchesRequest {
            name: M.into(),
            limit: 1000,
        })
        .await
        .expect("a default client takes the largest listing")
        .into_inner();
    assert_eq!(listed.mismatches.len(), 100);
    let size = prost::Message::encoded_len(&listed);
    assert!(size < 4 << 20, "ListMismatches answered {size} bytes");
    let first: serde_json::Value = serde_json::from_str(&listed.mismatches[0].diff_json).unwrap();
    assert_eq!(
        first[0]["legacy"]["twintrack_truncated"]["bytes"], 400_002,
        "{first}"
    );
    let fields: serde_json::Value = serde_json::from_str(&listed.mismatches[50].diff_json).unwrap();
    assert!(
        fields.as_array().unwrap().last().unwrap()["path"]
            .as_str()
            .unwrap()
            .contains("more fields differ"),
        "{fields}"
    );
    let last: serde_json::Value = serde_json::from_str(&listed.mismatches[99].diff_json).unwrap();
    assert!(
        last[0]["path"].as_str().unwrap().contains("diff left out"),
        "{last}"
    );

    let (code, out) = cli(&s.url, "mismatches user_settings --limit 1000");
    assert_eq!(code, 0);
    assert!(out.len() < 4 << 20, "the CLI printed {} bytes", out.len());
    let (code, out) = cli(&s.url, "--json mismatches user_settings --limit 1000");
    assert_eq!(code, 0);
    assert!(out.len() < 4 << 20, "the CLI printed {} bytes", out.len());

    let auth = [("authorization", "Bearer oncall-token-0123456789")];
    let (status, _, page) = http(&s.base, "GET", "/admin", &auth, "").await;
    assert_eq!(status, 200);
    assert!(
        page.len() < 1 << 20,
        "the admin page weighs {} bytes",
        page.len()
    );
}

/// With an external flag source (`twintrack serve --flags-file`): `GetMigration` and the admin
/// page show a hold, a stage the source wants that the rules refuse, and no hold where the
/// source agrees or asks for an allowed move.
#[tokio::test(flavor = "multi_thread")]
async fn get_migration_and_the_admin_page_show_holds_of_a_flag_source() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let db = Database::connect(&pg.url).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register(M, "test").await.unwrap();
    store.register("other", "test").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flags.json");
    let flag = |stage: &str| serde_json::json!({"state": "ENABLED", "variants": {"v": stage}, "defaultVariant": "v"});
    let doc = serde_json::json!({"flags": {M: flag("live"), "other": flag("dual_write")}});
    std::fs::write(&file, doc.to_string()).unwrap();
    let source = twintrack::flags::OpenFeatureSource::flagd_file(&file)
        .await
        .unwrap();
    let tokens = AdminTokens::parse(&format!("oncall={TOKEN}")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let control = ControlServer::new(store.clone(), db, tokens).stage_source(Arc::new(source));
    let task = tokio::spawn(control.serve(listener, std::future::pending()));

    let mut c = client(&base, Some(TOKEN)).await;
    let got = c
        .get_migration(GetMigrationRequest { name: M.into() })
        .await
        .unwrap()
        .into_inner();
    let hold = got.hold.expect("a hold");
    assert_eq!(
        (hold.wanted.as_str(), hold.serving.as_str()),
        ("live", "legacy_only")
    );
    assert!(hold.remedy.contains("twintrack backfill"), "{hold:?}");
    assert!(hold.source.contains("flags.json"), "{hold:?}");
    let other = c
        .get_migration(GetMigrationRequest {
            name: "other".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.hold, None, "an allowed move is no hold");

    let auth = format!("Bearer {TOKEN}");
    let (status, _, page) = http(&base, "GET", "/admin", &[("authorization", &auth)], "").await;
    assert_eq!(status, 200, "{page}");
    let held = &page[page.find("id=\"held-user_settings\"").expect("held line")..];
    assert!(held.contains("wants live"), "{held}");
    assert!(!page.contains("id=\"held-other\""));
    task.abort();
}

/// `twintrack serve` on SIGTERM (and SIGINT): stops taking connections, answers what is in
/// flight and exits 0; requests made during the shutdown get answers or a closed port, never a
/// reset. The time to exit is printed.
#[tokio::test(flavor = "multi_thread")]
async fn serve_exits_0_on_sigterm_and_sigint_answering_what_is_in_flight() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let store = SqlFlagStore::open(Database::connect(&pg.url).await.unwrap())
        .await
        .unwrap();
    store.register(M, "test").await.unwrap();
    for signal in ["-TERM", "-INT"] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_twintrack"))
            .arg("--database-url")
            .arg(&pg.url)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("TWINTRACK_ADMIN_TOKEN", format!("oncall={TOKEN}"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let base = common::listening_base(&mut child, "control plane");
        let signalled = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (base, signalled) = (base.clone(), signalled.clone());
            clients.push(tokio::spawn(async move {
                let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                    .build_http::<Full<Bytes>>();
                let mut answered = 0u32;
                loop {
                    let req = http::Request::get(format!("{base}/admin"))
                        .header("authorization", format!("Bearer {TOKEN}"))
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                    match client.request(req).await {
                        Ok(res) => {
                            assert_eq!(res.status(), 200);
                            let _ = res.into_body().collect().await;
                            answered += 1;
                        }
                        Err(e) if e.is_connect() && signalled.load(Ordering::SeqCst) => {
                            return answered;
                        }
                        Err(e) => panic!("a request saw {e:?}"),
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
        signalled.store(true, Ordering::SeqCst);
        let (status, took) = common::signal_and_wait(&mut child, signal).await;
        eprintln!("serve: {signal} to exit in {took:?}");
        assert_eq!(status.code(), Some(0), "{signal}: {status:?}");
        let mut answered = 0;
        for client in clients {
            answered += client.await.unwrap();
        }
        assert!(answered > 0, "{signal}: the load ran");
    }
}

/// The admin page's sign-in is a server-side session: the cookie holds a random id, never the
/// token; a signed-out or expired session gets the sign-in page; a CSRF token from another
/// session is refused (and nothing moves); each session has its own CSRF token.
#[tokio::test(flavor = "multi_thread")]
async fn admin_sessions_are_server_side_expire_and_keep_their_own_csrf_tokens() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let db = Database::connect(&pg.url).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register(M, "test").await.unwrap();
    let tokens = AdminTokens::parse(&format!("oncall={TOKEN}"))
        .unwrap()
        .with_session_ttl(Duration::from_secs(2));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(
        ControlServer::new(store.clone(), db, tokens).serve(listener, std::future::pending()),
    );

    let sign_in = |proto: &'static str| {
        let base = base.clone();
        async move {
            let (status, headers, _) = http(
                &base,
                "POST",
                "/login",
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("x-forwarded-proto", proto),
                ],
                &format!("token={TOKEN}"),
            )
            .await;
            assert_eq!(status, 303);
            headers["set-cookie"].to_str().unwrap().to_owned()
        }
    };
    let set_cookie = sign_in("https").await;
    assert!(!set_cookie.contains(TOKEN), "{set_cookie}");
    for part in ["HttpOnly", "SameSite=Strict", "Secure", "Max-Age=2"] {
        assert!(set_cookie.contains(part), "{part}: {set_cookie}");
    }
    assert!(!sign_in("http").await.contains("Secure"));
    let a = set_cookie.split(';').next().unwrap().to_owned();
    let b = sign_in("http").await.split(';').next().unwrap().to_owned();
    assert_ne!(a, b, "a session per sign-in");
    let id = a.split_once('=').unwrap().1;
    assert_eq!(id.len(), 64, "256 random bits: {a}");

    let page_of = |cookie: String| {
        let base = base.clone();
        async move { http(&base, "GET", "/admin", &[("cookie", cookie.as_str())], "").await }
    };
    let (status, _, page_a) = page_of(a.clone()).await;
    assert_eq!(status, 200);
    let (_, _, page_b) = page_of(b.clone()).await;
    let csrf_a = form_value(&page_a, "advance-user_settings", "csrf");
    let csrf_b = form_value(&page_b, "advance-user_settings", "csrf");
    assert_ne!(csrf_a, csrf_b, "each session has its own CSRF token");

    // Session A posting with B's CSRF token: refused, nothing moves.
    let version = form_value(&page_a, "advance-user_settings", "expected_version");
    let (status, _, _) = http(
        &base,
        "POST",
        "/admin/stage",
        &[
            ("cookie", a.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ],
        &format!(
            "migration={M}&to=dual_write&expected_version={version}&reason=r&confirm=yes&csrf={csrf_b}"
        ),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(stage_of(&store, M).await, Stage::LegacyOnly);

    // Signed out: the session is gone on the server, whatever the browser still sends.
    let (status, _, _) = http(&base, "POST", "/logout", &[("cookie", a.as_str())], "").await;
    assert_eq!(status, 303);
    let (status, _, page) = page_of(a.clone()).await;
    assert_eq!(status, 401);
    assert!(page.contains("name=\"token\""), "the sign-in page");
    // Expired: after the TTL, B gets the sign-in page too.
    assert_eq!(page_of(b.clone()).await.0, 200);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _, page) = page_of(b).await;
    assert_eq!(status, 401);
    assert!(page.contains("name=\"token\""));
    // A made-up session id: the sign-in page.
    let forged = format!("twintrack_session={}", "0".repeat(64));
    assert_eq!(page_of(forged).await.0, 401);
    task.abort();
}
