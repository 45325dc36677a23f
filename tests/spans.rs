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

type Spans = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

struct Recorder(Spans);
struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl<S> tracing_subscriber::Layer<S> for Recorder
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        if attrs.metadata().name() == "twintrack.dual" {
            let mut fields = BTreeMap::new();
            attrs.record(&mut Fields(&mut fields));
            let parent = match (attrs.parent(), attrs.is_contextual()) {
                (Some(id), _) => ctx.span(id).map(|s| s.name()),
                (None, true) => ctx.lookup_current().map(|s| s.name()),
                (None, false) => None,
            };
            fields.insert("parent".into(), parent.unwrap_or("none").into());
            self.0.lock().unwrap().push(fields);
        }
    }
}

#[tokio::test]
async fn repository_calls_run_in_spans_with_migration_stage_and_side() {
    let spans: Spans = Arc::default();
    let _default = tracing::subscriber::set_default(
        tracing_subscriber::registry().with(Recorder(spans.clone())),
    );
    tracing::callsite::rebuild_interest_cache();

    let (_dir, url) = common::sqlite_db();
    let db = Database::connect(&url).await.unwrap();
    repos::create_shapes::<i64>(&db).await.unwrap();
    let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
    store.register("user_settings", "t").await.unwrap();
    store
        .set_stage(StageChange::new("user_settings", Stage::Shadow, "t", "t").force(true))
        .await
        .unwrap();
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

    let seen: Vec<String> = spans
        .lock()
        .unwrap()
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
        spans.lock().unwrap().clear();
        store(mode)
            .settings(&id)
            .instrument(tracing::info_span!("request"))
            .await
            .unwrap();
        let start = std::time::Instant::now();
        while spans.lock().unwrap().len() < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{mode:?}: no shadow read"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let parents: BTreeMap<String, String> = spans
            .lock()
            .unwrap()
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
