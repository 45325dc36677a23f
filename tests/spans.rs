//! Every repository call the dual store makes runs in a span (`twintrack.dual`, named
//! `{db.operation.name} {migration}` for OpenTelemetry) carrying `db.operation.name`,
//! `db.system.name`, `twintrack.migration`, `twintrack.stage` and `twintrack.side`
//! (`twintrack.read_from` is recorded once the read is routed).
//!
//! In a test binary of its own: tracing caches whether a callsite is enabled process-wide, so a
//! thread-scoped recorder must not share the process with other tests hitting the same spans.

mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use repos::{Settings, SettingsResync, Users};
use tracing::Instrument;
use tracing_subscriber::layer::{Context, SubscriberExt};
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::shadow::{ShadowMode, ShadowOptions};
use twintrack::{Database, Stage};

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// Every twintrack span a test saw: its name, fields (as created and as recorded later) and
/// its parent's name, in order of creation.
#[derive(Clone, Default)]
struct Tree(Arc<Mutex<Vec<Seen>>>);

/// A span's id and its fields (with `name` and `parent`).
type Seen = (tracing::span::Id, BTreeMap<String, String>);

impl Tree {
    fn named(&self, name: &str) -> Vec<BTreeMap<String, String>> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, f)| f["name"] == name)
            .map(|(_, f)| f.clone())
            .collect()
    }
}

impl<S> tracing_subscriber::Layer<S> for Tree
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let name = attrs.metadata().name();
        if !name.starts_with("twintrack.") {
            return;
        }
        let mut fields = BTreeMap::new();
        attrs.record(&mut Fields(&mut fields));
        let parent = match (attrs.parent(), attrs.is_contextual()) {
            (Some(id), _) => ctx.span(id).map(|s| s.name()),
            (None, true) => ctx.lookup_current().map(|s| s.name()),
            (None, false) => None,
        };
        fields.insert("name".into(), name.into());
        fields.insert("parent".into(), parent.unwrap_or("none").into());
        self.0.lock().unwrap().push((id.clone(), fields));
    }

    fn on_follows_from(
        &self,
        id: &tracing::span::Id,
        follows: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let Some(name) = ctx.span(follows).map(|s| s.name()) else {
            return;
        };
        if let Some((_, fields)) = self.0.lock().unwrap().iter_mut().find(|(i, _)| i == id) {
            fields.insert("follows_from".into(), name.into());
        }
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: Context<'_, S>,
    ) {
        if let Some((_, fields)) = self.0.lock().unwrap().iter_mut().find(|(i, _)| i == id) {
            values.record(&mut Fields(fields));
        }
    }
}

/// The quickstart's shapes in a fresh SQLite database, `user_settings` registered and at `stage`.
async fn quickstart_db(stage: Stage) -> (tempfile::TempDir, Database, Arc<SqlFlagStore>) {
    let (dir, url) = common::sqlite_db();
    let db = Database::connect(&url).await.unwrap();
    repos::create_shapes::<i64>(&db).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register("user_settings", "t").await.unwrap();
    store
        .set_stage(StageChange::new("user_settings", stage, "t", "t").force(true))
        .await
        .unwrap();
    (dir, db, store)
}

#[tokio::test]
async fn repository_calls_run_in_spans_with_migration_stage_and_side() {
    let tree = Tree::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(tree.clone()));
    tracing::callsite::rebuild_interest_cache();

    let (_dir, db, store) = quickstart_db(Stage::Shadow).await;
    let flags = FlagCache::builder(store)
        .migration("user_settings", Stage::LegacyOnly)
        .soft_ttl(Duration::from_secs(3600))
        .build()
        .await;
    let (legacy, new) = repos::repos::<sqlx::Sqlite, i64>();
    let pool = db.as_sqlite().unwrap().clone();
    let store = |mode| Users {
        settings: DualStore::builder(
            "user_settings",
            legacy.clone(),
            new.clone(),
            pool.clone(),
            flags.clone(),
            SettingsResync::default(),
        )
        .shadow(ShadowOptions {
            mode,
            ..ShadowOptions::default()
        })
        .build()
        .unwrap(),
    };
    let users = store(ShadowMode::Serial);
    let settings = Settings {
        theme: "x".into(),
        notifications_enabled: true,
    };
    let id = users.create("span@example.com", settings).await.unwrap();
    users.settings(&id).await.unwrap();

    let seen: Vec<String> = tree
        .named("twintrack.dual")
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {} {} {}",
                s["twintrack.migration"],
                s["db.operation.name"],
                s["twintrack.stage"],
                s["twintrack.side"],
                s["db.system.name"],
                s["otel.name"],
            )
        })
        .collect();
    for expected in [
        "user_settings write shadow legacy sqlite write user_settings",
        "user_settings write shadow new sqlite write user_settings",
        "user_settings read shadow legacy sqlite read user_settings",
        "user_settings read shadow new sqlite read user_settings",
    ] {
        assert!(
            seen.iter().any(|s| s == expected),
            "{expected} not in {seen:?}"
        );
    }

    // `concurrent` and `background` shadow reads run in tasks of their own; their spans are
    // still the caller's children, as the served read's is.
    for mode in [ShadowMode::Concurrent, ShadowMode::Background] {
        tree.0.lock().unwrap().clear();
        store(mode)
            .settings(&id)
            .instrument(tracing::info_span!("request"))
            .await
            .unwrap();
        let start = std::time::Instant::now();
        while tree.named("twintrack.dual").len() < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{mode:?}: no shadow read"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let parents: BTreeMap<String, String> = tree
            .named("twintrack.dual")
            .iter()
            .map(|s| (s["twintrack.side"].clone(), s["parent"].clone()))
            .collect();
        for side in ["legacy", "new"] {
            assert_eq!(
                parents.get(side).map(String::as_str),
                Some("request"),
                "{mode:?} {side}"
            );
        }
    }
}

/// Backfill batches, verify segments, shadow comparisons (and the re-check they spawn) and
/// control-plane calls each run in a span of their own, under their parent's, with the
/// attributes a trace viewer needs. (One thread: the recorder is this thread's subscriber.)
#[tokio::test]
async fn backfill_verify_shadow_and_control_plane_calls_run_in_spans() {
    use tower::ServiceExt as _;
    use twintrack::backfill::{self, BackfillOptions};
    use twintrack::control::{AdminTokens, ControlServer};
    use twintrack::verify::{self, VerifyOptions};

    let tree = Tree::default();
    let _default =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(tree.clone()));
    tracing::callsite::rebuild_interest_cache();

    let (_dir, db, store) = quickstart_db(Stage::DualWrite).await;
    twintrack::db::query(
        "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < 300)
         INSERT INTO users (email, profile)
         SELECT 'u' || i || '@example.com', json_object('theme', 'dark', 'notifications_enabled', json('true')) FROM g",
    )
    .execute(&db)
    .await
    .unwrap();
    let def = twintrack::config::Config::load(&common::quickstart_config())
        .unwrap()
        .migration("user_settings")
        .unwrap()
        .definition(twintrack::Backend::Sqlite)
        .unwrap();
    let metrics = twintrack::metrics::Metrics::global();

    // Backfill: the run, and its batches under it.
    let options = BackfillOptions {
        batch_size: 100,
        ..BackfillOptions::default()
    };
    backfill::run(&db, &*store, &def, options, metrics.clone(), |_| {})
        .await
        .unwrap();
    let run = tree.named("twintrack.backfill");
    assert_eq!(run.len(), 1);
    assert_eq!(run[0]["twintrack.migration"], "user_settings");
    assert_eq!(run[0]["twintrack.backfill.direction"], "forward");
    let batches = tree.named("twintrack.backfill.batch");
    assert!(!batches.is_empty());
    let copied: u64 = batches
        .iter()
        .map(|b| b["twintrack.backfill.rows"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(copied, 300, "{batches:?}");
    assert!(batches.iter().all(|b| b["parent"] == "twintrack.backfill"));

    // Verify with a planted difference: the run says divergent, the differing segment is a
    // child.
    twintrack::db::query("UPDATE user_settings SET theme = 'planted' WHERE user_id = 150")
        .execute(&db)
        .await
        .unwrap();
    let options = VerifyOptions {
        recheck_delay: Duration::from_millis(10),
        ..VerifyOptions::default()
    };
    let report = verify::run(&db, &*store, &def, options, metrics)
        .await
        .unwrap();
    assert!(!report.clean);
    let runs = tree.named("twintrack.verify");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0]["twintrack.verify.result"], "divergent");
    let segments = tree.named("twintrack.verify.segment");
    assert!(!segments.is_empty(), "no segment span");
    assert!(
        segments.iter().any(|s| s["parent"] == "twintrack.verify"),
        "{segments:?}"
    );

    // A shadow read of the planted key: compared (mismatch), re-checked in a task of its
    // own under the comparison (confirmed).
    store
        .set_stage(StageChange::new("user_settings", Stage::Shadow, "t", "t").force(true))
        .await
        .unwrap();
    let flags = FlagCache::builder(store.clone())
        .migration("user_settings", Stage::LegacyOnly)
        .build()
        .await;
    let (legacy, new) = repos::repos::<sqlx::Sqlite, i64>();
    let users = Users {
        settings: DualStore::builder(
            "user_settings",
            legacy,
            new,
            db.as_sqlite().unwrap().clone(),
            flags,
            SettingsResync::default(),
        )
        .shadow(ShadowOptions {
            mode: ShadowMode::Serial,
            recheck_delay: Duration::from_millis(10),
            ..ShadowOptions::default()
        })
        .build()
        .unwrap(),
    };
    users
        .settings(&150)
        .instrument(tracing::info_span!("request"))
        .await
        .unwrap();
    users.settings(&151).await.unwrap();
    let compares = tree.named("twintrack.shadow.compare");
    assert_eq!(compares.len(), 2, "{compares:?}");
    assert_eq!(
        (
            compares[0]["twintrack.shadow.result"].as_str(),
            compares[0]["parent"].as_str()
        ),
        ("mismatch", "request")
    );
    assert_eq!(compares[0]["twintrack.stage"], "shadow");
    assert_eq!(compares[1]["twintrack.shadow.result"], "match");
    let start = std::time::Instant::now();
    loop {
        let classified = tree.named("twintrack.shadow.classify");
        if classified
            .first()
            .is_some_and(|c| c.contains_key("twintrack.shadow.result"))
        {
            assert_eq!(classified[0]["twintrack.shadow.result"], "confirmed");
            // Its own trace root, linked to the comparison: it does not hold the request's
            // span open for the re-check's delay.
            assert_eq!(classified[0]["parent"], "none");
            assert_eq!(classified[0]["follows_from"], "twintrack.shadow.compare");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never classified"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Control-plane calls: a page and a gRPC call, authenticated.
    let token = "oncall-token-0123456789";
    let tokens = AdminTokens::parse(&format!("oncall={token}")).unwrap();
    let app = ControlServer::new(store, db, tokens).router();
    let page = http::Request::get("/admin")
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::empty())
        .unwrap();
    assert_eq!(app.clone().oneshot(page).await.unwrap().status(), 200);
    let call = http::Request::post("/twintrack.v1.ControlService/ListMigrations")
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(axum::body::Body::from(vec![0u8; 5]))
        .unwrap();
    let answer = app.clone().oneshot(call).await.unwrap();
    assert_eq!(answer.status(), 200);
    let unknown = http::Request::get("/no/such/page?secret=1")
        .body(axum::body::Body::empty())
        .unwrap();
    app.clone().oneshot(unknown).await.unwrap();
    let control = tree.named("twintrack.control");
    assert_eq!(control.len(), 3, "{control:?}");
    assert_eq!(control[0]["otel.name"], "GET /admin");
    assert_eq!(control[0]["http.route"], "/admin");
    assert_eq!(control[0]["http.response.status_code"], "200");
    assert_eq!(
        control[1]["otel.name"],
        "twintrack.v1.ControlService/ListMigrations"
    );
    assert_eq!(control[1]["rpc.system"], "grpc");
    assert_eq!(control[1]["rpc.method"], "ListMigrations");
    assert_eq!(
        control[2]["otel.name"], "GET",
        "a path not served names no route"
    );
    // A method the service does not have is not a span name either.
    let made_up = http::Request::post("/twintrack.v1.ControlService/MadeUpMethod")
        .header("content-type", "application/grpc")
        .body(axum::body::Body::empty())
        .unwrap();
    app.oneshot(made_up).await.unwrap();
    let control = tree.named("twintrack.control");
    assert_eq!(control[3]["otel.name"], "POST", "{control:?}");
}
