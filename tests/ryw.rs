//! Read-your-writes on a real primary and real streaming replicas with a real apply delay
//! (`recovery_min_apply_delay`), through the quickstart's own service (`examples/quickstart`)
//! driven in-process: tokens in real headers, reads routed by the router, values checked.

#[path = "../examples/quickstart/app.rs"]
mod app;
mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use common::TestKey;
use common::TestMetrics;
use common::pg::{self, Cluster, ReplicaSpec, TestDb};
use http_body_util::BodyExt;
use repos::{Settings, SettingsResync, UserId, Users};
use serde_json::{Value, json};
use tower::ServiceExt;
use twintrack::dual::DualStore;
use twintrack::flags::{BoxFuture, FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::ryw::{
    ClusterId, HEADER, Lsn, ReadTarget, ReplicaOptions, ReplicaSet, Router, RywOptions, Token,
    TokenPositions, TokenSigner,
};
use twintrack::shadow::{ShadowMode, ShadowOptions, list_mismatches};
use twintrack::{Database, DynKey, RequestContext, Stage, TwinTrack};

const M: &str = "user_settings";
const SECRET: &[u8] = b"twintrack test secret, 32 bytes!";

/// A user id type the read-your-writes guarantees run with.
trait K: UserId + TestKey {}
impl<T: UserId + TestKey> K for T {}

/// The quickstart service over a primary and its replicas, with metrics to look at; its user
/// ids are of type `I` (`bigint` as in the example itself, or UUID).
struct Svc<I: K = i64> {
    app: TwinTrack<axum::Router>,
    router: Router,
    replicas: ReplicaSet,
    users: Users<sqlx::Postgres, I>,
    flags: FlagCache,
    metrics: TestMetrics,
    primary: Database,
}

/// What one HTTP call returned.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Value,
    token: Option<String>,
    read_from: Option<String>,
}

impl Svc {
    async fn start(db: &TestDb, stage: Stage, options: RywOptions) -> Svc {
        Svc::keyed(db, stage, options).await
    }
}

impl<I: K> Svc<I> {
    async fn keyed(db: &TestDb, stage: Stage, options: RywOptions) -> Svc<I> {
        Svc::start_with(
            &db.url,
            &db.replica_urls,
            stage,
            options,
            false,
            Duration::from_millis(20),
        )
        .await
    }

    async fn start_with(
        url: &str,
        replica_urls: &[String],
        stage: Stage,
        options: RywOptions,
        primary_reads: bool,
        poll_interval: Duration,
    ) -> Svc<I> {
        let metrics = TestMetrics::new();
        let primary = Database::connect(url).await.unwrap();
        repos::create_shapes::<I>(&primary).await.unwrap();
        let flag_store = Arc::new(SqlFlagStore::open(primary.clone()).await.unwrap());
        flag_store.register(M, "test").await.unwrap();
        if stage != Stage::LegacyOnly {
            flag_store
                .set_stage(StageChange::new(M, stage, "test", "setup").force(true))
                .await
                .unwrap();
        }
        let flags = FlagCache::builder(flag_store.clone())
            .migration(M, Stage::LegacyOnly)
            .build()
            .await;
        assert_eq!(flags.snapshot().stage(M), Some(stage));
        let replicas = ReplicaSet::connect(
            primary.clone(),
            replica_urls,
            ReplicaOptions {
                poll_interval,
                poll_timeout: Duration::from_millis(500),
                metrics: metrics.metrics(),
                ..ReplicaOptions::default()
            },
        )
        .await
        .unwrap();
        let router = Router::builder(primary.clone(), SECRET)
            .replicas(replicas.clone())
            .options(options)
            .metrics(metrics.metrics())
            .build()
            .await
            .unwrap();
        let (legacy, new) = repos::repos::<sqlx::Postgres, I>();
        let settings = DualStore::builder(
            M,
            legacy,
            new,
            primary.as_postgres().unwrap().clone(),
            flags.clone(),
            SettingsResync::default(),
        )
        .router(router.clone())
        .primary_reads(primary_reads)
        .metrics(metrics.metrics())
        .build()
        .unwrap();
        let users = Users { settings };
        let app = app::app(
            users.clone(),
            flags.clone(),
            Some(router.clone()),
            true,
            None,
        );
        Svc {
            app,
            router,
            replicas,
            users,
            flags,
            metrics,
            primary,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> Reply {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(token) = token {
            req = req.header(HEADER, token);
        }
        let body = match body {
            Some(v) => Body::from(v.to_string()),
            None => Body::empty(),
        };
        let res = self
            .app
            .clone()
            .oneshot(req.body(body).unwrap())
            .await
            .unwrap();
        let header = |res: &http::Response<Body>, name: &str| {
            res.headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let (token, read_from) = (header(&res, HEADER), header(&res, "x-twintrack-read-from"));
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Reply {
            status,
            body,
            token,
            read_from,
        }
    }

    async fn create_user(&self, email: &str) -> (I, String) {
        let r = self
            .call(
                "POST",
                "/users",
                Some(json!({"email": email, "theme": "t0", "notifications_enabled": true})),
                None,
            )
            .await;
        assert_eq!(r.status, 201, "{r:?}");
        let id = DynKey::from_json(&r.body["id"], I::KINDS).unwrap();
        (
            I::from_dyn(id).unwrap(),
            r.token.expect("a write answers with a token"),
        )
    }

    /// Reads `id` with `token` until the replica serves it, every read seeing `expected`;
    /// returns how long after `written` that was. Fails past `deadline`.
    async fn read_until_the_replica_serves(
        &self,
        id: &I,
        token: &str,
        expected: &str,
        written: Instant,
        deadline: Duration,
    ) -> Duration {
        loop {
            let r = self.get(id, Some(token)).await;
            assert_eq!(theme(&r), expected, "a stale read with the token: {r:?}");
            if r.read_from.as_deref() == Some("replica") {
                return written.elapsed();
            }
            assert!(
                written.elapsed() < deadline,
                "never served by the replica within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn put_theme(&self, id: &I, theme: &str) -> String {
        let r = self
            .call(
                "PUT",
                &format!("/users/{}/settings", id.to_text()),
                Some(json!({"theme": theme, "notifications_enabled": true})),
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        r.token.expect("a write answers with a token")
    }

    async fn get(&self, id: &I, token: Option<&str>) -> Reply {
        self.call(
            "GET",
            &format!("/users/{}/settings", id.to_text()),
            None,
            token,
        )
        .await
    }

    /// Waits until every replica is in service and has replayed everything written so far.
    async fn wait_replicas_caught_up(&self) {
        let lsn = self.replicas.primary_lsn().await.unwrap();
        let start = Instant::now();
        loop {
            self.replicas.poll_all().await;
            let health = self.replicas.health();
            if health
                .iter()
                .all(|h| h.healthy && h.replay_lsn.is_some_and(|r| r >= lsn))
            {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "replicas never caught up: {health:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn reads(&self, target: &str, pin: &str) -> u64 {
        self.metrics
            .counter_all("twintrack.reads", &[("target", target), ("pin", pin)])
    }
}

fn theme(reply: &Reply) -> &str {
    reply.body["theme"].as_str().unwrap_or("<none>")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_writes_then_reads_with_the_token_are_never_stale() {
    // With `bigint` user ids, then UUID ones.
    thousand_writes::<i64>().await;
    thousand_writes::<uuid::Uuid>().await;
}

async fn thousand_writes<I: K>() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Svc::<I>::keyed(&db, Stage::LegacyOnly, RywOptions::default()).await;
    let (id, _) = svc.create_user("a@example.com").await;
    svc.wait_replicas_caught_up().await;

    // With the token: every read sees the write just made, whichever server serves it.
    let mut stale = 0;
    let mut from_primary = 0;
    for i in 1..=1000 {
        let value = format!("with-{i}");
        let token = svc.put_theme(&id, &value).await;
        let r = svc.get(&id, Some(&token)).await;
        assert_eq!(r.status, 200, "{r:?}");
        if theme(&r) != value {
            stale += 1;
        }
        if r.read_from.as_deref() == Some("primary") {
            from_primary += 1;
        }
    }
    assert_eq!(stale, 0, "stale reads with the token");
    // 300 ms behind, the replica cannot have the write yet: the token sent the reads to the
    // primary, and said so in the metrics. (A read delayed past the apply delay on a loaded
    // machine may rightly be served by the replica: that is why this is not exactly 1,000.)
    eprintln!("with the token: {from_primary}/1000 reads on the primary");
    assert!(from_primary >= 900, "{from_primary}");
    assert_eq!(svc.reads("primary", "token"), from_primary);

    // The same reads without the token: served by the replica, and stale.
    let mut stale = 0;
    let mut from_replica = 0;
    for i in 1..=1000 {
        let value = format!("without-{i}");
        svc.put_theme(&id, &value).await;
        let r = svc.get(&id, None).await;
        assert_eq!(r.status, 200, "{r:?}");
        if theme(&r) != value {
            stale += 1;
        }
        if r.read_from.as_deref() == Some("replica") {
            from_replica += 1;
        }
    }
    eprintln!("without the token: {from_replica}/1000 reads on the replica, {stale} stale");
    assert!(from_replica > 900, "{from_replica} reads on the replica");
    assert!(
        stale >= 1,
        "no stale read without the token: are replicas really used?"
    );
    assert!(svc.reads("replica", "none") >= 900);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_holder_reads_from_the_replica_once_it_has_caught_up() {
    // With `bigint` user ids, then UUID ones.
    token_holder_back_on_the_replica::<i64>().await;
    token_holder_back_on_the_replica::<uuid::Uuid>().await;
}

async fn token_holder_back_on_the_replica<I: K>() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Svc::<I>::keyed(&db, Stage::LegacyOnly, RywOptions::default()).await;
    let (id, _) = svc.create_user("b@example.com").await;
    svc.wait_replicas_caught_up().await;
    let token = svc.put_theme(&id, "fresh").await;
    let written = Instant::now();

    let early = written.elapsed() < Duration::from_millis(200);
    let r = svc.get(&id, Some(&token)).await;
    assert_eq!(theme(&r), "fresh");
    if early {
        assert_eq!(r.read_from.as_deref(), Some("primary"));
    }
    // The same token, a little later: the replica has replayed the write and serves it.
    let took = svc
        .read_until_the_replica_serves(&id, &token, "fresh", written, Duration::from_secs(10))
        .await;
    eprintln!("back on the replica {took:?} after the write");
    assert!(
        took >= Duration::from_millis(250),
        "the replica was used before its apply delay: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_two_replicas_the_caught_up_one_is_chosen() {
    let Some(cluster) =
        Cluster::start_or_skip(vec![ReplicaSpec::delayed(1500), ReplicaSpec::delayed(0)])
    else {
        return;
    };
    let db = cluster.fresh_db().await;
    let svc = Svc::start(&db, Stage::LegacyOnly, RywOptions::default()).await;
    let (id, _) = svc.create_user("c@example.com").await;
    svc.wait_replicas_caught_up().await;

    for i in 0..20 {
        let value = format!("v{i}");
        let token = svc.put_theme(&id, &value).await;
        // The token's position: the quick replica has it (or soon will); the slow one will
        // not for 1.5 s.
        let token = svc.router.accept(&header_map(&token)).unwrap();
        let ctx = RequestContext::from_cache(&svc.flags).with_read_your_writes(Some(token));
        let deadline = Instant::now() + Duration::from_secs(1);
        let (got, target) = loop {
            let got = ctx
                .clone()
                .scope(svc.users.settings(&id))
                .await
                .unwrap()
                .theme;
            let target = ctx.read_from();
            if target != Some(ReadTarget::Primary) || Instant::now() > deadline {
                break (got, target);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(got, value);
        assert_eq!(
            target,
            Some(ReadTarget::Replica(1)),
            "the lagging replica was chosen, or none"
        );
    }
    // Without a token, too, the least-behind replica serves.
    let ctx = RequestContext::from_cache(&svc.flags);
    ctx.clone().scope(svc.users.settings(&id)).await.unwrap();
    assert_eq!(ctx.read_from(), Some(ReadTarget::Replica(1)));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_replica_sends_reads_to_the_primary_without_errors() {
    let Some(cluster) = Cluster::start_or_skip(vec![ReplicaSpec::delayed(0)]) else {
        return;
    };
    let db = cluster.fresh_db().await;
    let svc = Arc::new(Svc::start(&db, Stage::LegacyOnly, RywOptions::default()).await);
    let (id, _) = svc.create_user("d@example.com").await;
    svc.wait_replicas_caught_up().await;
    assert_eq!(
        svc.get(&id, None).await.read_from.as_deref(),
        Some("replica")
    );

    // Reads run all the time while the replica goes away and comes back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (svc, stop) = (svc.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut errors) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = svc.get(&id, None).await;
                if r.status == 200 && theme(&r) == "t0" {
                    ok += 1;
                } else {
                    errors.push(format!("{r:?}"));
                }
            }
            (ok, errors)
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    cluster.stop_replica(0);
    common::pg::eventually(Duration::from_secs(10), "reads on the primary", || async {
        svc.get(&id, None).await.read_from.as_deref() == Some("primary")
    })
    .await;
    // The gauge says so too.
    let healthy = || {
        svc.metrics
            .gauge_u64("twintrack.replica.healthy", ("replica", 0))
    };
    assert_eq!(healthy(), Some(0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.start_replica(0);
    common::pg::eventually(
        Duration::from_secs(20),
        "reads on the replica again",
        || async { svc.get(&id, None).await.read_from.as_deref() == Some("replica") },
    )
    .await;
    assert_eq!(healthy(), Some(1));
    assert!(
        svc.metrics
            .gauge_u64("twintrack.replica.wal_lag", ("replica", 0))
            .is_some(),
        "replica lag is reported"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, errors) = reader.await.unwrap();
    assert!(
        errors.is_empty(),
        "{} failed reads, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    assert!(ok > 50, "only {ok} reads ran");
    assert!(svc.reads("primary", "replica_down") > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_ignored_counted_and_never_pin() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Svc::start(&db, Stage::LegacyOnly, RywOptions::default()).await;
    let (id, good) = svc.create_user("e@example.com").await;
    svc.wait_replicas_caught_up().await;
    let cluster = svc.router.cluster();
    let now = now_ms();
    // A real position far ahead: a valid token with it would pin to the primary.
    let ahead = Some(Lsn(u64::MAX / 2));
    let signer = TokenSigner::new(SECRET, Duration::from_secs(30)).unwrap();
    let other_secret =
        TokenSigner::new(b"another secret, another app!!!!!", Duration::from_secs(30)).unwrap();
    let token = |lsn, cluster, issued_at_ms| Token {
        lsn,
        cluster,
        issued_at_ms,
    };
    let valid = signer.sign(&token(ahead, cluster, now));
    let mut tampered = valid.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    let cases: Vec<(&str, String)> = vec![
        ("forged", other_secret.sign(&token(ahead, cluster, now))),
        ("forged", tampered),
        ("expired", signer.sign(&token(ahead, cluster, now - 31_000))),
        ("future", signer.sign(&token(ahead, cluster, now + 60_000))),
        ("garbled", "v1.nonsense".into()),
        ("garbled", valid.replace("v1.", "v2.")),
        ("oversized", format!("{valid}{}", "0".repeat(300))),
        (
            "foreign_cluster",
            signer.sign(&token(
                ahead,
                ClusterId {
                    system_identifier: cluster.system_identifier ^ 1,
                    timeline: cluster.timeline,
                },
                now,
            )),
        ),
        (
            "foreign_cluster",
            signer.sign(&token(
                ahead,
                ClusterId {
                    system_identifier: cluster.system_identifier,
                    timeline: cluster.timeline + 1,
                },
                now,
            )),
        ),
    ];
    for (verdict, bad) in &cases {
        let before = svc
            .metrics
            .counter("twintrack.ryw.tokens", ("verdict", verdict));
        let r = svc.get(&id, Some(bad)).await;
        assert_eq!(r.status, 200, "{verdict}: {r:?}");
        assert_eq!(theme(&r), "t0");
        assert_eq!(
            r.read_from.as_deref(),
            Some("replica"),
            "{verdict} token pinned the read"
        );
        let after = svc
            .metrics
            .counter("twintrack.ryw.tokens", ("verdict", verdict));
        assert_eq!(after, before + 1, "{verdict} not counted");
    }
    // Not valid UTF-8 at all: also ignored.
    let mut req = http::Request::get(format!("/users/{id}/settings"));
    req = req.header(
        HEADER,
        http::HeaderValue::from_bytes(b"v1.\xff\xfe").unwrap(),
    );
    let res = svc
        .app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-twintrack-read-from"], "replica");
    // The control: the same position, validly signed, does pin.
    let r = svc.get(&id, Some(&valid)).await;
    assert_eq!(r.read_from.as_deref(), Some("primary"));
    assert!(
        svc.metrics
            .counter("twintrack.ryw.tokens", ("verdict", "accepted"))
            >= 1
    );
    assert!(
        svc.metrics
            .counter("twintrack.ryw.tokens", ("verdict", "missing"))
            >= 1
    );
    assert!(
        svc.metrics
            .counter("twintrack.ryw.tokens", ("verdict", "issued"))
            >= 1
    );
    drop(good);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_writes_then_fails_still_pins_and_answers_with_a_token() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Svc::start(&db, Stage::LegacyOnly, RywOptions::default()).await;
    let (id, _) = svc.create_user("f@example.com").await;
    svc.wait_replicas_caught_up().await;

    // A handler of our own on the same stack: write, read back, then fail.
    let users = svc.users.clone();
    let failing = axum::Router::new().route(
        "/fail/{id}",
        axum::routing::post(move |axum::extract::Path(id): axum::extract::Path<i64>| {
            let users = users.clone();
            async move {
                let settings = Settings {
                    theme: "written-then-failed".into(),
                    notifications_enabled: false,
                };
                users.update(&id, settings).await.unwrap();
                let read = users.settings(&id).await.unwrap();
                let ctx = RequestContext::current().unwrap();
                let from = ctx.read_from().unwrap();
                (
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("{}|{}", read.theme, from.as_str()),
                )
            }
        }),
    );
    let app = tower::Layer::layer(
        &twintrack::TwinTrackLayer::new(svc.flags.clone()).read_your_writes(svc.router.clone()),
        failing,
    );
    let res = app
        .oneshot(
            http::Request::post(format!("/fail/{id}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 500);
    let token = res
        .headers()
        .get(HEADER)
        .expect("a token despite the error")
        .to_str()
        .unwrap()
        .to_owned();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        b"written-then-failed|primary",
        "the read after the write was not pinned"
    );
    // And the token works: the next request sees the write.
    let r = svc.get(&id, Some(&token)).await;
    assert_eq!(theme(&r), "written-then-failed");
    assert_eq!(svc.reads("primary", "wrote_in_request"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_keep_separate_read_your_writes_state() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Arc::new(Svc::start(&db, Stage::LegacyOnly, RywOptions::default()).await);
    let (id, _) = svc.create_user("g@example.com").await;
    let (other, _) = svc.create_user("h@example.com").await;
    svc.wait_replicas_caught_up().await;

    // Request A writes, then waits for B to be in flight, then reads. Request B only reads,
    // while A is pinned. Neither sees the other's state.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let users = svc.users.clone();
    let b1 = barrier.clone();
    let writer = axum::routing::post(move || {
        let (users, barrier) = (users.clone(), b1.clone());
        async move {
            users
                .update(
                    &id,
                    Settings {
                        theme: "a".into(),
                        notifications_enabled: true,
                    },
                )
                .await
                .unwrap();
            barrier.wait().await;
            let theme = users.settings(&id).await.unwrap().theme;
            barrier.wait().await;
            format!(
                "{theme}|{}",
                RequestContext::current()
                    .unwrap()
                    .read_from()
                    .unwrap()
                    .as_str()
            )
        }
    });
    let users = svc.users.clone();
    let b2 = barrier.clone();
    let reader = axum::routing::get(move || {
        let (users, barrier) = (users.clone(), b2.clone());
        async move {
            barrier.wait().await;
            let theme = users.settings(&other).await.unwrap().theme;
            barrier.wait().await;
            format!(
                "{theme}|{}",
                RequestContext::current()
                    .unwrap()
                    .read_from()
                    .unwrap()
                    .as_str()
            )
        }
    });
    let app = tower::Layer::layer(
        &twintrack::TwinTrackLayer::new(svc.flags.clone()).read_your_writes(svc.router.clone()),
        axum::Router::new().route("/a", writer).route("/b", reader),
    );
    let call = |path: &'static str, method: http::Method| {
        let app = app.clone();
        async move {
            let res = app
                .oneshot(
                    http::Request::builder()
                        .method(method)
                        .uri(path)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let token = res.headers().get(HEADER).is_some();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            (String::from_utf8(body.to_vec()).unwrap(), token)
        }
    };
    let (a, b) = tokio::join!(
        tokio::spawn(call("/a", http::Method::POST)),
        tokio::spawn(call("/b", http::Method::GET))
    );
    assert_eq!(a.unwrap(), ("a|primary".to_owned(), true));
    assert_eq!(b.unwrap(), ("t0|replica".to_owned(), false));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shadow_comparison_in_a_request_that_wrote_reads_both_sides_from_the_primary() {
    // With `bigint` user ids, then UUID ones.
    shadow_comparison_after_a_write::<i64>().await;
    shadow_comparison_after_a_write::<uuid::Uuid>().await;
}

async fn shadow_comparison_after_a_write<I: K>() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Svc::<I>::keyed(&db, Stage::Shadow, RywOptions::default()).await;
    // `serial` reads the two sides one after the other; `concurrent` reads the shadow side in a
    // task of its own, which must carry the request's state along.
    for (n, mode) in [ShadowMode::Serial, ShadowMode::Concurrent]
        .into_iter()
        .enumerate()
    {
        let (legacy, new) = repos::repos::<sqlx::Postgres, I>();
        let users = Users {
            settings: DualStore::builder(
                M,
                legacy,
                new,
                svc.primary.as_postgres().unwrap().clone(),
                svc.flags.clone(),
                SettingsResync::default(),
            )
            .router(svc.router.clone())
            .shadow(ShadowOptions {
                mode,
                ..ShadowOptions::default()
            })
            .metrics(svc.metrics.metrics())
            .build()
            .unwrap(),
        };
        let (id, _) = svc.create_user(&format!("i{n}@example.com")).await;
        svc.wait_replicas_caught_up().await;
        let before_primary = svc.reads("primary", "wrote_in_request");
        let before_replica = svc.reads("replica", "none");
        let before_match = svc
            .metrics
            .counter("twintrack.shadow.results", ("result", "match"));

        // In one request: write both shapes, then read with a shadow comparison. The replica,
        // 300 ms behind, still has the old value on both sides: any side read there would
        // differ from the other and show up as a mismatch.
        let ctx = RequestContext::from_cache(&svc.flags);
        let request_users = users.clone();
        let request_id = id.clone();
        let theme = ctx
            .clone()
            .scope(async move {
                let id = request_id;
                request_users
                    .update(
                        &id,
                        Settings {
                            theme: "new".into(),
                            notifications_enabled: false,
                        },
                    )
                    .await
                    .unwrap();
                request_users.settings(&id).await.unwrap().theme
            })
            .await;
        assert_eq!(theme, "new", "{mode:?}");
        assert_eq!(ctx.read_from(), Some(ReadTarget::Primary), "{mode:?}");
        assert_eq!(
            svc.reads("primary", "wrote_in_request") - before_primary,
            2,
            "{mode:?}: both sides on the primary"
        );
        assert_eq!(svc.reads("replica", "none"), before_replica, "{mode:?}");
        assert_eq!(
            svc.metrics
                .counter("twintrack.shadow.results", ("result", "match"))
                - before_match,
            1,
            "{mode:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            list_mismatches(&svc.primary, M, 10)
                .await
                .unwrap()
                .is_empty(),
            "{mode:?}"
        );

        // Control: a request that did not write compares on the replica (both sides there).
        svc.wait_replicas_caught_up().await;
        let ctx = RequestContext::from_cache(&svc.flags);
        ctx.clone().scope(users.settings(&id)).await.unwrap();
        assert_eq!(ctx.read_from(), Some(ReadTarget::Replica(0)), "{mode:?}");
        assert_eq!(svc.reads("replica", "none") - before_replica, 2, "{mode:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_migration_can_ask_for_primary_reads() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Svc::<i64>::start_with(
        &db.url,
        &db.replica_urls,
        Stage::LegacyOnly,
        RywOptions::default(),
        true,
        Duration::from_millis(20),
    )
    .await;
    let (id, _) = svc.create_user("j@example.com").await;
    svc.wait_replicas_caught_up().await;
    let r = svc.get(&id, None).await;
    assert_eq!((r.status, r.read_from.as_deref()), (200, Some("primary")));
    assert_eq!(svc.reads("primary", "migration_rule"), 1);
    assert_eq!(svc.reads("replica", "none"), 0);
}

/// An instance without replicas reads no position for its tokens (by default: one statement
/// less per write); an instance with replicas (a fleet part-way through adding them) serves
/// them from the primary for its fallback window, then reads the primary's position for the
/// request: every read with one sees its write, also past a window shorter than the replica's
/// lag (no clock decides). With `TokenPositions::Always` the tokens carry the position.
#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_an_instance_without_replicas_read_their_writes_on_one_with() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    // A window shorter than the replica's 300 ms apply delay.
    let window = RywOptions {
        fallback_window: Duration::from_millis(100),
        ..RywOptions::default()
    };
    let reader = Svc::start(&db, Stage::LegacyOnly, window).await;
    for positions in [TokenPositions::WithReplicas, TokenPositions::Always] {
        let options = RywOptions {
            positions,
            ..RywOptions::default()
        };
        let writer: Svc = Svc::start_with(
            &db.url,
            &[],
            Stage::LegacyOnly,
            options,
            false,
            Duration::from_millis(20),
        )
        .await;
        let (id, _) = writer
            .create_user(&format!("{positions:?}@example.com"))
            .await;
        reader.wait_replicas_caught_up().await;
        let (mut stale, mut stale_without) = (0, 0);
        let mut last = (String::new(), String::new(), Instant::now());
        for i in 0..30 {
            let value = format!("{positions:?}-{i}");
            let written = Instant::now();
            let token = writer.put_theme(&id, &value).await;
            let lsn = reader
                .router
                .accept(&header_map(&token))
                .expect("the writer's token is honoured")
                .lsn;
            assert_eq!(
                lsn.is_some(),
                positions == TokenPositions::Always,
                "{lsn:?}"
            );
            if theme(&reader.get(&id, None).await) != value {
                stale_without += 1;
            }
            // Past the reader's window, before the replica has the write.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let r = reader.get(&id, Some(&token)).await;
            assert_eq!(r.status, 200, "{r:?}");
            if theme(&r) != value {
                stale += 1;
            }
            last = (token, value, written);
        }
        assert_eq!(stale, 0, "{positions:?}: stale reads with the token");
        // The replica lags 300 ms: without the token, reads right after the write are stale.
        assert!(stale_without > 0, "{positions:?}: the replica never lagged");
        // Either way, a replica serves the token's reads once it has replayed the write.
        let (token, value, written) = last;
        reader
            .read_until_the_replica_serves(&id, &token, &value, written, Duration::from_secs(4))
            .await;
    }
}

/// A token without a position: the primary serves it for the fallback window; after it, the
/// primary's position read for the token (once: kept for its later requests) stands in, and
/// the replica serves as soon as it has replayed that.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_without_a_position_pins_for_the_window_then_to_a_position_read_for_it() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let options = RywOptions {
        fallback_window: Duration::from_millis(500),
        ..RywOptions::default()
    };
    let svc = Svc::start(&db, Stage::LegacyOnly, options).await;
    let (id, _) = svc.create_user("k@example.com").await;
    svc.wait_replicas_caught_up().await;
    // What an instance issues when it could not read the WAL position.
    let signer = TokenSigner::new(SECRET, Duration::from_secs(30)).unwrap();
    let token = signer.sign(&Token {
        lsn: None,
        cluster: svc.router.cluster(),
        issued_at_ms: now_ms(),
    });
    let r = svc.get(&id, Some(&token)).await;
    assert_eq!(r.read_from.as_deref(), Some("primary"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    // Other tests write to the same cluster all along: a position read afresh for every
    // request would stay ahead of a replica 300 ms behind.
    let past = Instant::now();
    let took = svc
        .read_until_the_replica_serves(&id, &token, "t0", past, Duration::from_secs(5))
        .await;
    eprintln!("served by the replica {took:?} after the window");
}

/// A hot-standby conflict: the replica cancels a read (SQLSTATE 40001) to replay a lock taken
/// on the primary. The read is retried on the primary and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn a_hot_standby_conflict_is_retried_on_the_primary() {
    let Some(cluster) = Cluster::start_or_skip(vec![
        ReplicaSpec::delayed(0)
            .with_conf("max_standby_streaming_delay = 0\nhot_standby_feedback = off"),
    ]) else {
        return;
    };
    let db = cluster.fresh_db().await;
    let svc = Svc::start(&db, Stage::LegacyOnly, RywOptions::default()).await;
    svc.create_user("l@example.com").await;
    svc.wait_replicas_caught_up().await;

    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let read = {
        let (router, attempts) = (svc.router.clone(), attempts.clone());
        tokio::spawn(async move {
            router
                .read(
                    move |conn: &mut sqlx::PgConnection| -> BoxFuture<'_, sqlx::Result<i64>> {
                        let attempts = attempts.clone();
                        Box::pin(async move {
                            let on_replica: i64 = sqlx::query_scalar(
                                "SELECT CAST(CAST(pg_is_in_recovery() AS INTEGER) AS BIGINT)",
                            )
                            .fetch_one(&mut *conn)
                            .await?;
                            attempts.lock().unwrap().push(on_replica);
                            let n: i64 = sqlx::query_scalar(
                                "SELECT COUNT(*) FROM users, (SELECT pg_sleep(3)) AS s",
                            )
                            .fetch_one(&mut *conn)
                            .await?;
                            Ok(n)
                        })
                    },
                )
                .await
        })
    };
    // Once the read is running on the replica, take a lock on the primary that the replica
    // must replay: it cancels the read.
    common::pg::eventually(Duration::from_secs(5), "the read to start", || async {
        !attempts.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut tx = svc.primary.as_postgres().unwrap().begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n = read
        .await
        .unwrap()
        .expect("the read succeeds despite the conflict");
    assert_eq!(n, 1);
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![1, 0],
        "replica first, then the primary"
    );
    assert_eq!(svc.reads("primary", "replica_conflict"), 1);
}

/// The quickstart's SQLite default: no replicas, no WAL positions; writes still answer with a
/// token (a time-window one), and reads accept it.
#[tokio::test(flavor = "multi_thread")]
async fn on_sqlite_tokens_fall_back_to_a_time_window() {
    let (_dir, url) = common::sqlite_db();
    let primary = Database::connect(&url).await.unwrap();
    repos::create_shapes::<i64>(&primary).await.unwrap();
    let flag_store = Arc::new(SqlFlagStore::open(primary.clone()).await.unwrap());
    flag_store.register(M, "test").await.unwrap();
    let flags = FlagCache::builder(flag_store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let router = Router::builder(primary.clone(), SECRET)
        .build()
        .await
        .unwrap();
    let (legacy, new) = repos::repos::<sqlx::Sqlite, i64>();
    let settings = DualStore::builder(
        M,
        legacy,
        new,
        primary.as_sqlite().unwrap().clone(),
        flags.clone(),
        SettingsResync::default(),
    )
    .router(router.clone())
    .build()
    .unwrap();
    let app = app::app(Users { settings }, flags, Some(router.clone()), true, None);
    let res = app
        .clone()
        .oneshot(
            http::Request::post("/users")
                .body(Body::from(
                    r#"{"email":"s@q.l","theme":"x","notifications_enabled":true}"#,
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let token = res.headers()[HEADER].to_str().unwrap().to_owned();
    let accepted = router
        .accept(&header_map(&token))
        .expect("our own token is accepted");
    assert_eq!(accepted.lsn, None);
    let res = app
        .oneshot(
            http::Request::get("/users/1/settings")
                .header(HEADER, &token)
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-twintrack-read-from"], "primary");
}

/// The token may also travel as a cookie.
#[tokio::test(flavor = "multi_thread")]
async fn the_token_can_travel_as_a_cookie() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let options = RywOptions {
        cookie: Some("tt_ryw".into()),
        ..RywOptions::default()
    };
    let svc = Svc::start(&db, Stage::LegacyOnly, options).await;
    let (id, _) = svc.create_user("m@example.com").await;
    svc.wait_replicas_caught_up().await;
    let res = svc
        .app
        .clone()
        .oneshot(
            http::Request::put(format!("/users/{id}/settings"))
                .body(Body::from(
                    r#"{"theme":"cookie","notifications_enabled":true}"#,
                ))
                .unwrap(),
        )
        .await
        .unwrap();
    let set_cookie = res.headers()[http::header::SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(set_cookie.starts_with("tt_ryw=v1."), "{set_cookie}");
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("Max-Age=30"));
    let cookie = set_cookie.split(';').next().unwrap();
    let res = svc
        .app
        .clone()
        .oneshot(
            http::Request::get(format!("/users/{id}/settings"))
                .header(http::header::COOKIE, format!("other=1; {cookie}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.headers()["x-twintrack-read-from"], "primary");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["theme"],
        "cookie"
    );
}

fn header_map(token: &str) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert(HEADER, token.parse().unwrap());
    headers
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Between polls, a replica that should have replayed a token by now is asked directly, on the
/// connection that then serves the read: the token holder is back on the replica as soon as the
/// replica has the write, not when the next poll says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_is_proven_on_demand_between_polls() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    // A poller so slow it never runs during the test: only the on-demand check can help.
    let svc = Svc::<i64>::start_with(
        &db.url,
        &db.replica_urls,
        Stage::LegacyOnly,
        RywOptions::default(),
        false,
        Duration::from_secs(600),
    )
    .await;
    let (id, _) = svc.create_user("n@example.com").await;
    svc.wait_replicas_caught_up().await;
    let token = svc.put_theme(&id, "proven").await;
    let written = Instant::now();
    let took = svc
        .read_until_the_replica_serves(&id, &token, "proven", written, Duration::from_secs(5))
        .await;
    eprintln!("proven on the replica {took:?} after the write");
    assert!(
        took >= Duration::from_millis(250),
        "served by the replica before its apply delay"
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
}

/// A write whose commit reads the primary's position (a request that will answer with a
/// token) and whose future is dropped before the commit: nothing of it is committed, its
/// connection is not handed back to the pool with the transaction open (it is closed, and
/// the server rolls back), and the next writes commit as usual with tokens of their own.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_dropped_before_its_commit_leaves_nothing_behind() {
    use sqlx::Connection as _;
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let svc = Svc::start(&db, Stage::DualWrite, RywOptions::default()).await;
    let (id, _) = svc.create_user("dropped@example.com").await;
    // Another session holds the new shape's row: the write's second side waits on it, after
    // its first side was written.
    let mut locker = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut locker).await.unwrap();
    let (locker_pid,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut locker)
        .await
        .unwrap();
    sqlx::query("SELECT 1 FROM user_settings WHERE user_id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut locker)
        .await
        .unwrap();
    let ctx = RequestContext::from_cache(&svc.flags).with_read_your_writes(None);
    let write = ctx.scope(svc.users.update(
        &id,
        Settings {
            theme: "dropped".into(),
            notifications_enabled: false,
        },
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), write)
            .await
            .is_err(),
        "the write waits on the locked row"
    );
    sqlx::raw_sql("COMMIT").execute(&mut locker).await.unwrap();
    // No session of the service's pool is left inside a transaction.
    let open = |primary: Database| async move {
        twintrack::db::query(
            "SELECT COUNT(*) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> $1 AND pid <> pg_backend_pid()
               AND (state LIKE 'idle in transaction%' OR (state = 'active' AND query LIKE 'UPDATE%'))",
        )
        .bind(locker_pid)
        .scalar::<i64>(&primary)
        .await
        .unwrap()
    };
    pg::eventually(Duration::from_secs(10), "no open transaction", || {
        let primary = svc.primary.clone();
        async move { open(primary).await == 0 }
    })
    .await;
    let (legacy, new) = {
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        let legacy: (Option<String>,) =
            sqlx::query_as("SELECT profile->>'theme' FROM users WHERE id = $1")
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
        let new: (String,) = sqlx::query_as("SELECT theme FROM user_settings WHERE user_id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        (legacy.0, new.0)
    };
    assert_eq!(
        (legacy.as_deref(), new.as_str()),
        (Some("t0"), "t0"),
        "nothing of the dropped write committed"
    );
    // The next writes: committed, each answered with a token at or after its commit.
    let after = async {
        for i in 0..20 {
            let wanted = format!("after-{i}");
            let token = svc.put_theme(&id, &wanted).await;
            let r = svc.get(&id, Some(&token)).await;
            assert_eq!(theme(&r), wanted, "{r:?}");
        }
    };
    tokio::time::timeout(Duration::from_secs(30), after)
        .await
        .expect("later writes are not held up by the dropped one");
    assert_eq!(open(svc.primary.clone()).await, 0);
}
