//! The flag store and the flag cache, on real PostgreSQL and MariaDB (self-provisioned) and
//! SQLite.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Proxy, TestMetrics, backends_with_mariadb as backends, mariadb, pg};
use twintrack::flags::{
    EvidenceKind, FlagCache, FlagSource, FlagStore, SqlFlagStore, StageChange, TuningChange,
};
use twintrack::{Database, Error, Stage};

async fn store(url: &str) -> Arc<SqlFlagStore> {
    let db = Database::connect(url).await.expect("connect");
    Arc::new(SqlFlagStore::open(db).await.expect("open store"))
}

async fn audit_len(store: &SqlFlagStore, migration: &str) -> usize {
    store.audit_log(migration, 1000).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn init_is_idempotent_and_register_keeps_existing_state() {
    for (backend, url, _guard) in backends().await {
        let s = store(&url).await;
        assert!(s.register("m1", "test").await.unwrap(), "{backend}");
        s.set_stage(StageChange::new("m1", Stage::DualWrite, "test", "go"))
            .await
            .unwrap();
        // A second schema install and register change nothing.
        twintrack::schema::install(s.database()).await.unwrap();
        assert!(!s.register("m1", "test").await.unwrap(), "{backend}");
        let record = s.get("m1").await.unwrap();
        assert_eq!(record.state.stage, Stage::DualWrite, "{backend}");
        assert_eq!(record.state.version, 2, "{backend}");
        assert_eq!(
            audit_len(&s, "m1").await,
            2,
            "{backend}: register + set_stage"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_compare_and_set_has_exactly_one_winner() {
    for (backend, url, _guard) in backends().await {
        let s = store(&url).await;
        s.register("race", "test").await.unwrap();
        for round in 0..10 {
            let version = s.get("race").await.unwrap().state.version;
            let audit_before = audit_len(&s, "race").await;
            let to = if round % 2 == 0 {
                Stage::DualWrite
            } else {
                Stage::LegacyOnly
            };
            let a = s.set_stage(StageChange::new("race", to, "alice", "a").expect_version(version));
            let b = s.set_stage(StageChange::new("race", to, "bob", "b").expect_version(version));
            let (a, b) = tokio::join!(a, b);
            let results = [a, b];
            let wins = results.iter().filter(|r| r.is_ok()).count();
            let conflicts = results
                .iter()
                .filter(|r| matches!(r, Err(Error::VersionConflict { .. })))
                .count();
            assert_eq!(
                (wins, conflicts),
                (1, 1),
                "{backend} round {round}: {results:?}"
            );
            let after = s.get("race").await.unwrap().state;
            assert_eq!((after.stage, after.version), (to, version + 1), "{backend}");
            assert_eq!(
                audit_len(&s, "race").await,
                audit_before + 1,
                "{backend}: one entry"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_moves_change_nothing_and_forced_moves_are_audited() {
    for (backend, url, _guard) in backends().await {
        let s = store(&url).await;
        s.register("m", "test").await.unwrap();
        let before = s.get("m").await.unwrap();
        let err = s
            .set_stage(StageChange::new("m", Stage::Shadow, "t", "too soon"))
            .await
            .unwrap_err();
        let Error::Refused(refusal) = &err else {
            panic!("{backend}: {err}")
        };
        assert!(
            refusal.remedy.contains("twintrack stage set m dual_write"),
            "{refusal}"
        );
        assert_eq!(s.get("m").await.unwrap(), before, "{backend}: unchanged");
        assert_eq!(
            audit_len(&s, "m").await,
            1,
            "{backend}: only the register entry"
        );

        // Evidence recorded after dual writes began unlocks the gate.
        s.set_stage(StageChange::new("m", Stage::DualWrite, "t", "dual"))
            .await
            .unwrap();
        let blocked = s
            .set_stage(StageChange::new("m", Stage::Shadow, "t", "x"))
            .await;
        assert!(matches!(blocked, Err(Error::Refused(_))), "{backend}");
        let now = twintrack_now();
        s.record_evidence("m", EvidenceKind::BackfillFinished, now + 1, "backfill")
            .await
            .unwrap();
        s.record_evidence("m", EvidenceKind::VerifyClean, now + 2, "verify")
            .await
            .unwrap();
        let moved = s
            .set_stage(StageChange::new("m", Stage::Shadow, "t", "compare"))
            .await
            .unwrap();
        assert!(moved.changed && moved.overridden.is_none(), "{backend}");

        // Forced past a refusal: allowed, and the audit entry says so and keeps the refusal.
        let s2 = "forced";
        s.register(s2, "t").await.unwrap();
        let out = s
            .set_stage(StageChange::new(s2, Stage::NewOnly, "oncall", "incident 42").force(true))
            .await
            .unwrap();
        assert!(out.overridden.is_some(), "{backend}");
        let entry = &s.audit_log(s2, 1).await.unwrap()[0];
        assert!(entry.forced, "{backend}");
        assert_eq!(entry.actor, "oncall");
        assert_eq!(entry.to_stage.as_deref(), Some("new_only"));
        assert!(
            entry.overridden.as_deref().unwrap().contains("refused"),
            "{entry:?}"
        );

        // Same stage again: a no-op, no audit entry.
        let n = audit_len(&s, s2).await;
        let same = s
            .set_stage(StageChange::new(s2, Stage::NewOnly, "t", "again"))
            .await
            .unwrap();
        assert!(!same.changed);
        assert_eq!(audit_len(&s, s2).await, n, "{backend}");
    }
}

fn twintrack_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_changes_nothing() {
    for (backend, url, _guard) in backends().await {
        let s = store(&url).await;
        s.register("m", "t").await.unwrap();
        let before = s.get("m").await.unwrap();
        type IsExpected = fn(&Error) -> bool;
        let cases: Vec<(StageChange, IsExpected)> = vec![
            (StageChange::new("nope", Stage::DualWrite, "t", "r"), |e| {
                matches!(e, Error::UnknownMigration(_))
            }),
            (StageChange::new("m", Stage::DualWrite, "t", "   "), |e| {
                matches!(e, Error::InvalidInput(_))
            }),
            (
                StageChange::new("m", Stage::DualWrite, "t", "x".repeat(5000)),
                |e| matches!(e, Error::InvalidInput(_)),
            ),
            (
                StageChange::new("m", Stage::DualWrite, "t", "r").expect_version(99),
                |e| matches!(e, Error::VersionConflict { expected: 99, .. }),
            ),
        ];
        for (change, expected) in cases {
            let err = s.set_stage(change).await.unwrap_err();
            assert!(expected(&err), "{backend}: {err}");
        }
        for bad in [
            TuningChange {
                migration: "m".into(),
                shadow_sample_rate: Some(1.5),
                read_rollout_percent: None,
                expected_version: None,
                actor: "t".into(),
                reason: "r".into(),
            },
            TuningChange {
                migration: "m".into(),
                shadow_sample_rate: Some(f64::NAN),
                read_rollout_percent: None,
                expected_version: None,
                actor: "t".into(),
                reason: "r".into(),
            },
            TuningChange {
                migration: "m".into(),
                shadow_sample_rate: None,
                read_rollout_percent: Some(Some(101)),
                expected_version: None,
                actor: "t".into(),
                reason: "r".into(),
            },
        ] {
            assert!(
                matches!(s.tune(bad).await, Err(Error::InvalidInput(_))),
                "{backend}"
            );
        }
        assert!(matches!(
            s.register("Bad Name", "t").await,
            Err(Error::InvalidInput(_))
        ));
        assert_eq!(s.get("m").await.unwrap(), before, "{backend}");
        assert_eq!(audit_len(&s, "m").await, 1, "{backend}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unparsable_stored_stage_keeps_the_last_good_value() {
    for (backend, url, _guard) in backends().await {
        let s = store(&url).await;
        s.register("m", "t").await.unwrap();
        s.set_stage(StageChange::new("m", Stage::DualWrite, "t", "dual"))
            .await
            .unwrap();
        let metrics = TestMetrics::new();
        let cache = FlagCache::builder(s.clone())
            .migration("m", Stage::LegacyOnly)
            .soft_ttl(Duration::from_secs(3600))
            .metrics(metrics.metrics())
            .build()
            .await;
        assert_eq!(cache.snapshot().stage("m"), Some(Stage::DualWrite));

        // Someone edits the row by hand.
        twintrack::db::query("UPDATE twintrack_flags SET stage = 'banana' WHERE migration = 'm'")
            .execute(s.database())
            .await
            .unwrap();
        cache.refresh().await.unwrap();
        let snap = cache.snapshot();
        let flag = snap.get("m").unwrap();
        assert_eq!(flag.stage(), Stage::DualWrite, "{backend}: last good value");
        assert_eq!(flag.source, FlagSource::Stale, "{backend}");
        // At least our reload; on PostgreSQL the edit's NOTIFY may trigger one more.
        assert!(metrics.counter("twintrack.flags.invalid", ("migration", "m")) >= 1);

        // The store refuses to build on it without --force, and writes nothing.
        let audit_before = audit_len(&s, "m").await;
        let err = s
            .set_stage(StageChange::new("m", Stage::LegacyOnly, "t", "fix"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidFlag { problem, .. } if problem.contains("banana") && problem.contains("--force")),
            "{backend}: {err}"
        );
        assert!(matches!(s.get("m").await, Err(Error::InvalidFlag { .. })));
        assert_eq!(audit_len(&s, "m").await, audit_before, "{backend}");

        // --force repairs it, audited with the bad value it replaced.
        s.set_stage(StageChange::new("m", Stage::DualWrite, "oncall", "repair row").force(true))
            .await
            .unwrap();
        let entry = &s.audit_log("m", 1).await.unwrap()[0];
        assert_eq!(entry.from_stage.as_deref(), Some("banana"));
        assert!(entry.forced);
        cache.refresh().await.unwrap();
        assert_eq!(cache.snapshot().get("m").unwrap().source, FlagSource::Fresh);
    }
}

/// Two independent store + cache instances (as two service processes would have) with a
/// 60-second soft TTL: a flip through one reaches the other's cache at once. Only NOTIFY can
/// explain that.
#[tokio::test(flavor = "multi_thread")]
async fn a_flip_reaches_another_instance_through_notify() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    flip_reaches_another_instance(&db.url, "NOTIFY").await;
}

/// The same on MariaDB, which has no NOTIFY: the stores' pollers (one single-row statement
/// every 100 ms) explain it.
#[tokio::test(flavor = "multi_thread")]
async fn a_flip_reaches_another_instance_through_polling_on_mariadb() {
    let Some(db) = mariadb::fresh_db().await else {
        return;
    };
    flip_reaches_another_instance(&db.url, "polling").await;
}

async fn flip_reaches_another_instance(url: &str, how: &str) {
    let a = store(url).await;
    let b = store(url).await;
    a.register("m", "t").await.unwrap();
    let ttl = Duration::from_secs(60);
    let cache_a = FlagCache::builder(a.clone())
        .migration("m", Stage::LegacyOnly)
        .soft_ttl(ttl)
        .build()
        .await;
    let cache_b = FlagCache::builder(b.clone())
        .migration("m", Stage::LegacyOnly)
        .soft_ttl(ttl)
        .build()
        .await;
    let mut worst = Duration::ZERO;
    for (i, stage) in [Stage::DualWrite, Stage::LegacyOnly, Stage::DualWrite]
        .into_iter()
        .enumerate()
    {
        let start = Instant::now();
        a.set_stage(StageChange::new("m", stage, "t", format!("flip {i}")))
            .await
            .unwrap();
        pg::eventually(Duration::from_secs(2), "the flip to reach cache B", || {
            let seen = cache_b.snapshot().stage("m") == Some(stage);
            async move { seen }
        })
        .await;
        worst = worst.max(start.elapsed());
        // The writer's own cache hears the same notice, not necessarily first.
        pg::eventually(Duration::from_secs(2), "the flip to reach cache A", || {
            let seen = cache_a.snapshot().stage("m") == Some(stage);
            async move { seen }
        })
        .await;
    }
    eprintln!("{how} propagation, worst of 3 flips: {worst:?} (soft TTL {ttl:?})");
}

/// The store becomes unreachable after a successful load: the last known stage is served and
/// counted as stale. A cache that never loaded serves the fallback stage.
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_store_serves_last_known_then_fallback() {
    let Some(db) = pg::fresh_db().await else {
        return;
    };
    let setup = store(&db.url).await;
    setup.register("m", "t").await.unwrap();
    setup
        .set_stage(StageChange::new("m", Stage::DualWrite, "t", "dual"))
        .await
        .unwrap();

    let port: u16 = db.url.split(':').nth(2).unwrap()[..]
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let proxy = Proxy::start(([127, 0, 0, 1], port).into()).await;
    let url = proxy.url_for(&db.url);
    let fast = twintrack::db::ConnectOptions {
        max_connections: 2,
        acquire_timeout: Duration::from_millis(500),
    };
    let proxied = Arc::new(
        SqlFlagStore::new(Database::connect_with(&url, fast.clone()).await.unwrap())
            .listen()
            .await
            .unwrap(),
    );
    let metrics = TestMetrics::new();
    let cache = FlagCache::builder(proxied.clone())
        .migration("m", Stage::LegacyOnly)
        .migration("never_registered", Stage::Shadow)
        .soft_ttl(Duration::from_millis(100))
        .metrics(metrics.metrics())
        .build()
        .await;
    assert_eq!(cache.snapshot().stage("m"), Some(Stage::DualWrite));

    proxy.cut();
    pg::eventually(Duration::from_secs(10), "a failed reload", || {
        let stale = cache.snapshot().get("m").unwrap().source == FlagSource::Stale;
        async move { stale }
    })
    .await;
    assert!(cache.refresh().await.unwrap_err().is_unreachable());
    let snap = cache.snapshot();
    assert_eq!(snap.stage("m"), Some(Stage::DualWrite), "last known value");
    assert_eq!(
        snap.get("never_registered").unwrap().source,
        FlagSource::Fallback
    );
    assert_eq!(snap.stage("never_registered"), Some(Stage::Shadow));
    assert!(metrics.counter("twintrack.flags.stale", ("migration", "m")) >= 1);
    assert!(metrics.counter("twintrack.flags.refresh", ("outcome", "error")) >= 1);

    // A cache that has never loaded anything serves every migration's fallback.
    let cold = FlagCache::builder(proxied.clone())
        .migration("m", Stage::LegacyOnly)
        .soft_ttl(Duration::from_millis(100))
        .metrics(metrics.metrics())
        .build()
        .await;
    let flag = cold.snapshot().get("m").unwrap().clone();
    assert_eq!(
        (flag.stage(), flag.source),
        (Stage::LegacyOnly, FlagSource::Fallback)
    );
    assert!(metrics.counter("twintrack.flags.fallback", ("migration", "m")) >= 1);

    // Back online: both caches converge on the stored value.
    proxy.restore().await;
    pg::eventually(Duration::from_secs(10), "recovery", || {
        let ok = [&cache, &cold].iter().all(|c| {
            let f = c.snapshot().get("m").unwrap().clone();
            f.source == FlagSource::Fresh && f.stage() == Stage::DualWrite
        });
        async move { ok }
    })
    .await;
}

/// SQLite: a database where `twintrack init` never ran serves the fallback stage.
#[tokio::test]
async fn uninitialised_sqlite_store_serves_fallback() {
    let (_dir, url) = common::sqlite_db();
    let s = Arc::new(SqlFlagStore::new(Database::connect(&url).await.unwrap()));
    let cache = FlagCache::builder(s.clone())
        .migration("m", Stage::DualWrite)
        .build()
        .await;
    let flag = cache.snapshot().get("m").unwrap().clone();
    assert_eq!(
        (flag.stage(), flag.source),
        (Stage::DualWrite, FlagSource::Fallback)
    );
    assert!(matches!(cache.refresh().await, Err(Error::NotInitialized)));
    assert!(matches!(s.get("m").await, Err(Error::NotInitialized)));
}

/// A move that would serve a side (or make it authoritative) while repair intents still
/// target it is refused with the count and the remedy: those acknowledged writes have not
/// landed there. Moves that do not start reading that side stay allowed; `--force` overrides,
/// audited; once the intents are replayed the move goes through.
#[tokio::test(flavor = "multi_thread")]
async fn moves_onto_a_side_that_repair_intents_still_target_are_refused() {
    for (backend, url, _guard) in backends().await {
        let s = store(&url).await;
        s.register("m", "t").await.unwrap();
        for (stage, evidence) in [(Stage::DualWrite, false), (Stage::Shadow, true)] {
            if evidence {
                let at = twintrack_now();
                s.record_evidence("m", EvidenceKind::BackfillFinished, at + 1, "t")
                    .await
                    .unwrap();
                s.record_evidence("m", EvidenceKind::VerifyClean, at + 2, "t")
                    .await
                    .unwrap();
            }
            s.set_stage(StageChange::new("m", stage, "t", "setup"))
                .await
                .unwrap();
        }
        let db = s.database().clone();
        let intent = |side: &'static str| {
            let db = db.clone();
            async move {
                twintrack::db::query(
                    "INSERT INTO twintrack_repair_intents (migration, key_text, target_side, created_at) VALUES ('m', '7', $1, 1)",
                )
                .bind(side)
                .execute(&db)
                .await
                .unwrap();
            }
        };
        // A write in flight has its intent too (two databases): it does not hold a move up.
        twintrack::db::query(
            "INSERT INTO twintrack_repair_intents (migration, key_text, target_side, created_at, last_error) VALUES ('m', '8', 'new', $1, 'pending')",
        )
        .bind(twintrack_now())
        .execute(&db)
        .await
        .unwrap();
        intent("new").await;
        let before = audit_len(&s, "m").await;
        let err = s
            .set_stage(StageChange::new("m", Stage::Live, "t", "go"))
            .await
            .unwrap_err();
        let Error::Refused(refusal) = &err else {
            panic!("{backend}: {err:?}")
        };
        assert!(
            refusal
                .reason
                .contains("1 repair intents still target the new side"),
            "{backend}: {refusal}"
        );
        assert!(refusal.remedy.contains("--repair"), "{refusal}");
        assert_eq!(s.get("m").await.unwrap().state.stage, Stage::Shadow);
        assert_eq!(
            audit_len(&s, "m").await,
            before,
            "{backend}: nothing written"
        );

        // Rolling back does not start reading the new side: allowed.
        s.set_stage(StageChange::new("m", Stage::DualWrite, "t", "back"))
            .await
            .unwrap();
        s.set_stage(StageChange::new("m", Stage::Shadow, "t", "again"))
            .await
            .unwrap();
        // Forced: allowed, the refusal in the audit entry.
        let forced = s
            .set_stage(StageChange::new("m", Stage::Live, "t", "incident").force(true))
            .await
            .unwrap();
        assert!(forced.overridden.is_some(), "{backend}");
        // Intents targeting legacy refuse the way back to reading legacy.
        intent("legacy").await;
        let err = s
            .set_stage(StageChange::new("m", Stage::Shadow, "t", "back"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::Refused(r) if r.reason.contains("target the legacy side")),
            "{backend}: {err:?}"
        );
        // Replayed (gone): allowed.
        twintrack::db::query("DELETE FROM twintrack_repair_intents WHERE migration = 'm'")
            .execute(&db)
            .await
            .unwrap();
        s.set_stage(StageChange::new("m", Stage::Shadow, "t", "back"))
            .await
            .unwrap();
    }
}

/// Two databases: the new shape's database keeps the intents of writes made while it was
/// authoritative (targeting legacy); with `intents_also_in`, a move back onto legacy is
/// refused while they wait, as moves onto the new side are by the legacy database's own.
#[tokio::test(flavor = "multi_thread")]
async fn intents_in_the_new_database_gate_moves_onto_legacy() {
    let (_legacy_dir, legacy_url) = common::sqlite_db();
    let (_new_dir, new_url) = common::sqlite_db();
    let new_db = Database::connect(&new_url).await.unwrap();
    twintrack::schema::install(&new_db).await.unwrap();
    let s = Arc::new(
        SqlFlagStore::open(Database::connect(&legacy_url).await.unwrap())
            .await
            .unwrap()
            .intents_also_in(new_db.clone()),
    );
    s.register("m", "t").await.unwrap();
    s.set_stage(StageChange::new("m", Stage::Live, "t", "setup").force(true))
        .await
        .unwrap();
    twintrack::db::query(
        "INSERT INTO twintrack_repair_intents (migration, key_text, target_side, created_at, last_error) VALUES ('m', '3', 'legacy', 1, 'connection refused')",
    )
    .execute(&new_db)
    .await
    .unwrap();
    let err = s
        .set_stage(StageChange::new("m", Stage::Shadow, "t", "back"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Refused(r) if r.reason.contains("target the legacy side")),
        "{err:?}"
    );
    assert_eq!(s.get("m").await.unwrap().state.stage, Stage::Live);
    // ramp_down keeps reading and writing the new side first: not a move onto legacy (only
    // the evidence gate applies, forced here).
    s.set_stage(StageChange::new("m", Stage::RampDown, "t", "on").force(true))
        .await
        .unwrap();
    let audit = s.audit_log("m", 1).await.unwrap();
    assert!(
        !audit[0]
            .overridden
            .as_deref()
            .unwrap_or_default()
            .contains("repair intents"),
        "{audit:?}"
    );
}
