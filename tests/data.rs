//! Backfill, verify and repair on real databases, through the quickstart's own definition
//! (`examples/quickstart.toml`) and repositories: copies that race dual writes, planted
//! divergences, the stage gates fed by real evidence, and bad definitions.

mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::path::Path;

use common::quickstart_config;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use repos::{Settings, SettingsResync, Users};
use twintrack::backfill::{self, BackfillOptions};
use twintrack::config::Config;
use twintrack::definition::MigrationDef;
use twintrack::dual::DualStore;
use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::metrics::Metrics;
use twintrack::verify::{self, VerifyOptions};
use twintrack::{Backend, Database, Error, Stage};

const M: &str = "user_settings";

fn definition(backend: Backend) -> MigrationDef {
    let config = Config::load(&quickstart_config()).unwrap();
    config.migration(M).unwrap().definition(backend).unwrap()
}

struct Fixture {
    db: Database,
    store: Arc<SqlFlagStore>,
    def: MigrationDef,
    url: String,
    _guard: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn new(url: &str, guard: Option<tempfile::TempDir>) -> Fixture {
        let db = Database::connect(url).await.unwrap();
        repos::create_shapes(&db).await.unwrap();
        let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
        store.register(M, "test").await.unwrap();
        Fixture {
            def: definition(db.backend()),
            db,
            store,
            url: url.to_owned(),
            _guard: guard,
        }
    }

    async fn all() -> Vec<Fixture> {
        let mut out = Vec::new();
        for (_, url, guard) in common::backends().await {
            out.push(Fixture::new(&url, guard).await);
        }
        out
    }

    /// `n` legacy users with settings in the JSON profile, as before the migration.
    async fn seed(&self, n: i64) {
        let sql = match self.db.backend() {
            Backend::Postgres => {
                "INSERT INTO users (email, profile)
                 SELECT 'u' || g || '@example.com',
                        jsonb_build_object('theme', 'theme-' || (g % 7), 'notifications_enabled', g % 2 = 0)
                 FROM generate_series(1, $1) AS g"
            }
            Backend::Sqlite => {
                "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < $1)
                 INSERT INTO users (email, profile)
                 SELECT 'u' || i || '@example.com',
                        json_object('theme', 'theme-' || (i % 7), 'notifications_enabled',
                                    json(CASE WHEN i % 2 = 0 THEN 'true' ELSE 'false' END))
                 FROM g"
            }
        };
        sqlx::query(sql)
            .bind(n)
            .execute(self.db.pool())
            .await
            .unwrap();
    }

    async fn stage(&self, stage: Stage) {
        self.store
            .set_stage(StageChange::new(M, stage, "test", "setup").force(true))
            .await
            .unwrap();
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
            .fetch_one(self.db.pool())
            .await
            .unwrap()
    }

    async fn backfill(
        &self,
        options: BackfillOptions,
    ) -> twintrack::Result<backfill::BackfillReport> {
        backfill::run(
            &self.db,
            &*self.store,
            &self.def,
            options,
            Metrics::global(),
            |_| {},
        )
        .await
    }

    async fn verify(&self, repair: bool) -> verify::VerifyReport {
        let options = VerifyOptions {
            segments: 8,
            repair,
            recheck_delay: Duration::from_millis(50),
            ..VerifyOptions::default()
        };
        verify::run(
            &self.db,
            &*self.store,
            &self.def,
            options,
            Metrics::global(),
        )
        .await
        .unwrap()
    }

    fn cli(&self, cwd: &Path, line: &str) -> (i32, String) {
        common::twintrack_cli(Some(cwd), &self.url, Some(&quickstart_config()), line)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_copies_every_row_and_verify_finds_them_equal() {
    for f in Fixture::all().await {
        let backend = f.db.backend();
        f.seed(5_000).await;
        // Refused while dual writes are off: rows written meanwhile would be missed.
        f.stage(Stage::LegacyOnly).await;
        let err = f.backfill(BackfillOptions::default()).await.unwrap_err();
        assert!(matches!(err, Error::Precondition(_)), "{backend:?}: {err}");
        assert!(err.to_string().contains("dual_write"), "{err}");
        assert_eq!(f.count("user_settings").await, 0);

        f.stage(Stage::DualWrite).await;
        let report = f
            .backfill(BackfillOptions {
                batch_size: 300,
                workers: 3,
                ..BackfillOptions::default()
            })
            .await
            .unwrap();
        assert!(report.finished);
        assert_eq!(report.rows_copied, 5_000, "{backend:?}");
        assert_eq!(report.run_rows_copied, 5_000);
        assert_eq!(f.count("user_settings").await, 5_000);
        let record = f.store.get(M).await.unwrap();
        assert!(record.evidence.backfill_finished_at.is_some());

        let v = f.verify(false).await;
        assert!(v.clean, "{backend:?}: {:?}", v.lines());
        assert_eq!((v.legacy_rows, v.new_rows), (5_000, 5_000));
        assert!(
            f.store
                .get(M)
                .await
                .unwrap()
                .evidence
                .verify_clean_at
                .is_some()
        );

        // A second backfill starts a new run and changes nothing.
        let again = f.backfill(BackfillOptions::default()).await.unwrap();
        assert!(!again.resumed);
        assert_eq!(f.count("user_settings").await, 5_000);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn planted_divergences_are_reported_exactly_and_repaired() {
    for f in Fixture::all().await {
        let backend = f.db.backend();
        f.seed(2_000).await;
        f.stage(Stage::DualWrite).await;
        f.backfill(BackfillOptions::default()).await.unwrap();
        assert!(f.verify(false).await.clean);

        // Missing in new, missing in legacy (a user whose legacy settings are gone), and one
        // column different.
        sqlx::query("DELETE FROM user_settings WHERE user_id = 17")
            .execute(f.db.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE users SET profile = '{}' WHERE id = 1234")
            .execute(f.db.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE user_settings SET theme = 'planted' WHERE user_id = 1999")
            .execute(f.db.pool())
            .await
            .unwrap();
        let v = f.verify(false).await;
        assert!(!v.clean);
        assert_eq!(v.missing_in_new, vec![17], "{backend:?}");
        assert_eq!(v.missing_in_legacy, vec![1234], "{backend:?}");
        assert_eq!(v.different.len(), 1, "{:?}", v.different);
        assert_eq!(v.different[0].key, 1999);
        assert_eq!(v.different[0].columns, vec!["theme".to_owned()]);
        assert_eq!(
            v.differing_segments,
            3.min(v.segments),
            "{backend:?}: {v:?}"
        );

        // --repair re-syncs exactly those keys from legacy (authoritative in dual_write).
        let r = f.verify(true).await;
        assert!(r.clean, "{:?}", r.lines());
        let mut repaired = r.repaired.clone();
        repaired.sort();
        assert_eq!(repaired, vec![17, 1234, 1999]);
        assert!(f.verify(false).await.clean);
        assert_eq!(f.count("user_settings").await, 1_999);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stage_gates_follow_real_evidence() {
    for f in Fixture::all().await {
        let dir = tempfile::tempdir().unwrap();
        f.seed(500).await;
        f.cli(dir.path(), "stage set user_settings dual_write --reason go");
        let (code, out) = f.cli(
            dir.path(),
            "stage set user_settings shadow --reason compare",
        );
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("twintrack backfill user_settings"), "{out}");

        let (code, out) = f.cli(dir.path(), "backfill user_settings --batch-size 100");
        assert_eq!(code, 0, "{out}");
        let (code, out) = f.cli(
            dir.path(),
            "stage set user_settings shadow --reason compare",
        );
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("twintrack verify user_settings"), "{out}");
        let (code, out) = f.cli(dir.path(), "verify user_settings --segments 4");
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("CLEAN"), "{out}");
        let (code, out) = f.cli(
            dir.path(),
            "stage set user_settings shadow --reason compare",
        );
        assert_eq!(code, 0, "{out}");

        // Back to legacy_only and forward again: the old proof no longer counts.
        let (code, out) = f.cli(
            dir.path(),
            "stage set user_settings legacy_only --reason back",
        );
        assert_eq!(code, 0, "{out}");
        let (code, _) = f.cli(
            dir.path(),
            "stage set user_settings dual_write --reason again",
        );
        assert_eq!(code, 0);
        let (code, out) = f.cli(dir.path(), "stage set user_settings shadow --reason again");
        assert_eq!(code, 3, "{out}");
        let (code, out) = f.cli(dir.path(), "backfill user_settings");
        assert_eq!(code, 0, "{out}");
        let (code, out) = f.cli(dir.path(), "verify user_settings");
        assert_eq!(code, 0, "{out}");
        let (code, out) = f.cli(dir.path(), "stage set user_settings shadow --reason again");
        assert_eq!(code, 0, "{out}");

        // A divergence: verify exits 1 and names it.
        sqlx::query("UPDATE user_settings SET theme = 'x' WHERE user_id = 3")
            .execute(f.db.pool())
            .await
            .unwrap();
        let (code, out) = f.cli(dir.path(), "verify user_settings");
        assert_eq!(code, 1, "{out}");
        assert!(out.contains("different 3 (theme)"), "{out}");
        let (code, out) = f.cli(dir.path(), "--json verify user_settings --repair");
        assert_eq!(code, 0, "{out}");
        let json: serde_json::Value =
            serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
        assert_eq!(json["repaired"], serde_json::json!([3]));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_definitions_are_refused_before_anything_is_written() {
    for f in Fixture::all().await {
        let dir = tempfile::tempdir().unwrap();
        f.seed(50).await;
        f.stage(Stage::DualWrite).await;
        let good = std::fs::read_to_string(quickstart_config()).unwrap();
        let cases = [
            (
                good.replace(
                    "legacy_table = \"users\"",
                    "legacy_table = \"no_such_table\"",
                ),
                "legacy_table",
            ),
            (
                good.replace("legacy_key = \"id\"", "legacy_key = \"no_such_column\""),
                "legacy_table/legacy_key",
            ),
            (
                good.replace(
                    "legacy_table = \"users\"",
                    "legacy_table = \"users; drop table users\"",
                ),
                "invalid SQL identifier",
            ),
            (
                good.replace("new_key = \"user_id\"", "new_key = \"user\\\"_id\""),
                "invalid SQL identifier",
            ),
            (
                good.replace("ON CONFLICT (user_id)", "ON CONFLICT (no_such)"),
                "copy SQL fails",
            ),
            (
                good.replace("SELECT user_id AS key,", "SELECT user_id AS k,"),
                "new_projection",
            ),
        ];
        for (text, needle) in cases {
            let path = dir.path().join("bad.toml");
            std::fs::write(&path, &text).unwrap();
            for command in ["backfill user_settings", "verify user_settings"] {
                let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
                    .arg("--database-url")
                    .arg(&f.url)
                    .arg("--config")
                    .arg(&path)
                    .args(command.split_whitespace())
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stderr);
                assert_eq!(
                    out.status.code(),
                    Some(2),
                    "{command} with {needle}: {text}"
                );
                assert!(
                    text.contains(needle),
                    "{command}: expected {needle:?} in {text}"
                );
            }
        }
        assert_eq!(f.count("user_settings").await, 0, "nothing was copied");
        assert_eq!(
            f.count("twintrack_backfill_runs").await,
            0,
            "no run was started"
        );
        let record = f.store.get(M).await.unwrap();
        assert!(record.evidence.backfill_finished_at.is_none());
        assert!(record.evidence.verify_clean_at.is_none());
    }
}

/// The `FOR SHARE` lock is what keeps a racing dual write from being overwritten by a batch's
/// older copy. A copy statement made slow on purpose (it sleeps after taking its snapshot)
/// gives a write the time to land in between: with the lock the write waits for the batch and
/// wins; without it, the batch's stale copy overwrites it.
#[tokio::test(flavor = "multi_thread")]
async fn the_row_lock_keeps_racing_writes_from_being_overwritten() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    for lock in [true, false] {
        let f = Fixture::new(&pg.url, None).await;
        sqlx::query(
            "TRUNCATE users, user_settings, twintrack_backfill_runs, twintrack_backfill_chunks RESTART IDENTITY",
        )
        .execute(f.db.pool())
        .await
        .unwrap();
        f.seed(10).await;
        f.stage(Stage::DualWrite).await;
        let mut def = f.def.clone();
        // The snapshot is taken when the statement starts; the sleep runs before any row is read
        // out of it.
        def.copy = Some(def.copy.clone().unwrap().replace(
            "FROM users\nWHERE",
            "FROM users, (SELECT pg_sleep(0.5)) AS slow\nWHERE",
        ));
        assert!(def.copy.as_ref().unwrap().contains("pg_sleep"));
        let flags = FlagCache::builder(f.store.clone())
            .migration(M, Stage::LegacyOnly)
            .build()
            .await;
        let (legacy, new) = repos::repos(Backend::Postgres);
        let users = Users {
            settings: DualStore::builder(M, legacy, new, f.db.clone(), flags, SettingsResync)
                .build()
                .unwrap(),
        };
        let options = BackfillOptions {
            batch_size: 100,
            unsafe_no_row_locks: !lock,
            ..BackfillOptions::default()
        };
        let (db, store) = (f.db.clone(), f.store.clone());
        let run = tokio::spawn(async move {
            backfill::run(&db, &*store, &def, options, Metrics::global(), |_| {}).await
        });
        // The run exists once the definition was checked; its first batch starts right after.
        common::pg::eventually(Duration::from_secs(10), "the run to start", || async {
            f.count("twintrack_backfill_runs").await > 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        users
            .update(
                5,
                Settings {
                    theme: "written-during-backfill".into(),
                    notifications_enabled: true,
                },
            )
            .await
            .unwrap();
        run.await.unwrap().unwrap();
        let v = f.verify(false).await;
        if lock {
            assert!(v.clean, "with the lock: {:?}", v.lines());
        } else {
            assert_eq!(
                v.different.len(),
                1,
                "without the lock the race is real: {:?}",
                v.lines()
            );
            assert_eq!(v.different[0].key, 5);
        }
    }
}

/// Rows copied by every batch of every run so far: each row once means no range was copied
/// twice.
async fn rows_copied(db: &Database) -> i64 {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(rows_copied), 0) AS BIGINT) FROM twintrack_backfill_chunks",
    )
    .fetch_one(db.pool())
    .await
    .unwrap()
}

fn backfill_process(url: &str, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(url)
        .arg("--config")
        .arg(quickstart_config())
        .arg("--json")
        .args(["backfill", M])
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_backfill_killed_halfway_resumes_without_gap_or_duplicate() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let f = Fixture::new(&pg.url, None).await;
    f.seed(1_000_000).await;
    f.stage(Stage::DualWrite).await;

    let mut first = backfill_process(&f.url, &["--workers", "2"]);
    common::pg::eventually(Duration::from_secs(120), "half the rows copied", || async {
        rows_copied(&f.db).await >= 500_000
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no chance to clean up
    let _ = first.wait();
    let at_kill = rows_copied(&f.db).await;
    assert!(
        at_kill < 1_000_000,
        "the run finished before it was killed ({at_kill})"
    );
    eprintln!("killed after {at_kill} rows");

    let second = backfill_process(&f.url, &["--workers", "2"])
        .wait_with_output()
        .unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    assert_eq!(report["resumed"], true);
    assert_eq!(report["finished"], true);
    assert_eq!(report["run_rows_copied"], 1_000_000, "{report}");
    // The resumed run copied exactly what the first had not: together, every row once.
    assert_eq!(
        report["rows_copied"].as_i64().unwrap() + at_kill,
        1_000_000,
        "{report}"
    );
    assert_eq!(f.count("user_settings").await, 1_000_000);
    let v = f.verify(false).await;
    assert!(v.clean, "{:?}", v.lines());
    assert_eq!(v.legacy_rows, 1_000_000);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_backfill_processes_share_the_range_without_overlap() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let f = Fixture::new(&pg.url, None).await;
    f.seed(200_000).await;
    f.stage(Stage::DualWrite).await;
    let args = [
        "--workers",
        "2",
        "--batch-size",
        "500",
        "--target-chunk-ms",
        "20",
    ];
    let a = backfill_process(&f.url, &args);
    let b = backfill_process(&f.url, &args);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let a: serde_json::Value = serde_json::from_slice(&a.stdout).unwrap();
    let b: serde_json::Value = serde_json::from_slice(&b.stdout).unwrap();
    assert_eq!(a["run_id"], b["run_id"], "both joined one run");
    let (ra, rb) = (
        a["rows_copied"].as_i64().unwrap(),
        b["rows_copied"].as_i64().unwrap(),
    );
    eprintln!("process A copied {ra} rows, process B {rb}");
    assert!(
        ra > 0 && rb > 0,
        "both processes did part of the work: {a} {b}"
    );
    assert_eq!(ra + rb, 200_000, "every row copied exactly once");
    assert_eq!(rows_copied(&f.db).await, 200_000);
    assert_eq!(f.count("user_settings").await, 200_000);
    assert!(f.verify(false).await.clean);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lagging_replica_pauses_the_backfill_until_it_catches_up() {
    let Some(cluster) =
        common::pg::Cluster::start_or_skip(vec![common::pg::ReplicaSpec::delayed(300)])
    else {
        return;
    };
    let db = cluster.fresh_db().await;
    let f = Fixture::new(&db.url, None).await;
    f.seed(2_000).await;
    f.stage(Stage::DualWrite).await;
    let metrics = common::TestMetrics::new();
    let paused_seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = paused_seen.clone();
    let report = backfill::run(
        &f.db,
        &*f.store,
        &f.def,
        BackfillOptions {
            batch_size: 200,
            target_batch_time: Duration::from_millis(5),
            max_lag: Some(Duration::from_millis(50)),
            ..BackfillOptions::default()
        },
        metrics.metrics(),
        move |p| {
            if p.paused {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
    )
    .await
    .unwrap();
    assert!(report.finished);
    assert_eq!(f.count("user_settings").await, 2_000);
    assert!(
        paused_seen.load(std::sync::atomic::Ordering::Relaxed),
        "progress never showed a pause"
    );
    assert!(report.paused_seconds > 0.2, "{report:?}");
    assert!(metrics.counter("twintrack.backfill.pauses", ("migration", M)) > 0);
    assert!(f.verify(false).await.clean);
}

/// Updates and deletes through the dual store while a backfill runs (small batches, several
/// workers): afterwards verify finds both shapes equal.
#[tokio::test(flavor = "multi_thread")]
async fn updates_and_deletes_racing_the_backfill_leave_both_shapes_equal() {
    for f in Fixture::all().await {
        let backend = f.db.backend();
        let n = 20_000;
        f.seed(n).await;
        f.stage(Stage::DualWrite).await;
        let flags = FlagCache::builder(f.store.clone())
            .migration(M, Stage::LegacyOnly)
            .build()
            .await;
        let (legacy, new) = repos::repos(backend);
        let users = Users {
            settings: DualStore::builder(M, legacy, new, f.db.clone(), flags, SettingsResync)
                .build()
                .unwrap(),
        };
        let (db, store, def) = (f.db.clone(), f.store.clone(), f.def.clone());
        let run = tokio::spawn(async move {
            let options = BackfillOptions {
                batch_size: 200,
                target_batch_time: Duration::from_millis(10),
                workers: 3,
                // About 2 s, so plenty of writes land while batches run.
                rate: Some(10_000.0),
                ..BackfillOptions::default()
            };
            backfill::run(&db, &*store, &def, options, Metrics::global(), |_| {}).await
        });
        let mut writes = 0;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        while !run.is_finished() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let id = 1 + (rng % n as u64) as i64;
            let result = if rng.is_multiple_of(5) {
                users.delete(id).await
            } else {
                users
                    .update(
                        id,
                        Settings {
                            theme: format!("raced-{writes}"),
                            notifications_enabled: rng.is_multiple_of(2),
                        },
                    )
                    .await
            };
            match result {
                Ok(()) | Err(repos::UserError::NotFound) => writes += 1,
                Err(e) => panic!("{backend:?}: a racing write failed: {e:?}"),
            }
        }
        run.await.unwrap().unwrap();
        eprintln!("{backend:?}: {writes} updates and deletes raced the backfill");
        assert!(
            writes > 50,
            "{backend:?}: only {writes} writes raced the backfill"
        );
        let v = f.verify(false).await;
        assert!(v.clean, "{backend:?}: {:?}", v.lines());
    }
}

/// Leaving `new_only` for a stage that reads legacy needs a reverse sync: `backfill --reverse`
/// (the definition's `reverse_copy`) copies what only the new shape received.
#[tokio::test(flavor = "multi_thread")]
async fn a_reverse_backfill_makes_leaving_new_only_safe() {
    for f in Fixture::all().await {
        let backend = f.db.backend();
        f.seed(500).await;
        let set = |stage: Stage| {
            let store = f.store.clone();
            async move {
                store
                    .set_stage(StageChange::new(M, stage, "test", "walk"))
                    .await
            }
        };
        set(Stage::DualWrite).await.unwrap();
        f.backfill(BackfillOptions::default()).await.unwrap();
        assert!(f.verify(false).await.clean);
        for stage in [Stage::Shadow, Stage::Live, Stage::RampDown, Stage::NewOnly] {
            set(stage)
                .await
                .unwrap_or_else(|e| panic!("{backend:?} → {stage}: {e}"));
        }
        // In new_only only the new shape is written.
        sqlx::query("UPDATE user_settings SET theme = 'new-only' WHERE user_id <= 10")
            .execute(f.db.pool())
            .await
            .unwrap();
        let err = set(Stage::Shadow).await.unwrap_err();
        assert!(err.to_string().contains("--reverse"), "{backend:?}: {err}");
        // Reverse backfill is refused until legacy receives writes again...
        let reverse = BackfillOptions {
            direction: twintrack::definition::Direction::Reverse,
            ..BackfillOptions::default()
        };
        assert!(matches!(
            f.backfill(reverse.clone()).await.unwrap_err(),
            Error::Precondition(_)
        ));
        // ...which ramp_down does (it still reads new, so it needs no proof).
        set(Stage::RampDown).await.unwrap();
        let report = f.backfill(reverse).await.unwrap();
        assert!(report.finished);
        assert!(
            f.store
                .get(M)
                .await
                .unwrap()
                .evidence
                .reverse_synced_at
                .is_some()
        );
        assert!(f.verify(false).await.clean, "{backend:?}");
        set(Stage::Shadow).await.unwrap();
    }
}

/// A `Resync` that must not be called: proves the repair worker used the definition's SQL.
struct NoResync;

impl twintrack::dual::Resync<dyn repos::SettingsRepo> for NoResync {
    type Record = Settings;

    fn load<'c>(
        &'c self,
        _: &'c dyn repos::SettingsRepo,
        _: &'c mut sqlx::AnyConnection,
        _: i64,
    ) -> twintrack::flags::BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        Box::pin(async {
            Err(sqlx::Error::Protocol(
                "Resync::load must not be called".into(),
            ))
        })
    }

    fn store<'c>(
        &'c self,
        _: &'c dyn repos::SettingsRepo,
        _: &'c mut sqlx::AnyConnection,
        _: i64,
        _: Settings,
    ) -> twintrack::flags::BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async {
            Err(sqlx::Error::Protocol(
                "Resync::store must not be called".into(),
            ))
        })
    }

    fn delete<'c>(
        &'c self,
        _: &'c dyn repos::SettingsRepo,
        _: &'c mut sqlx::AnyConnection,
        _: i64,
    ) -> twintrack::flags::BoxFuture<'c, sqlx::Result<()>> {
        Box::pin(async {
            Err(sqlx::Error::Protocol(
                "Resync::delete must not be called".into(),
            ))
        })
    }
}

/// The dual store's repair worker and `verify --repair` re-sync a key the same way: with the
/// definition's SQL.
#[tokio::test(flavor = "multi_thread")]
async fn the_repair_worker_resyncs_keys_with_the_definition() {
    for f in Fixture::all().await {
        let backend = f.db.backend();
        f.seed(100).await;
        f.stage(Stage::DualWrite).await;
        f.backfill(BackfillOptions::default()).await.unwrap();
        // Three keys drift (different, missing in new, settings gone from legacy), each with
        // the repair intent a failed non-authoritative write would have left.
        for sql in [
            "UPDATE user_settings SET theme = 'drift' WHERE user_id = 7",
            "DELETE FROM user_settings WHERE user_id = 8",
            "UPDATE users SET profile = '{}' WHERE id = 9",
        ] {
            sqlx::query(sql).execute(f.db.pool()).await.unwrap();
        }
        for key in [7i64, 8, 9] {
            sqlx::query(
                "INSERT INTO twintrack_repair_intents (migration, key, target_side, created_at) VALUES ($1, $2, 'new', 0)",
            )
            .bind(M)
            .bind(key)
            .execute(f.db.pool())
            .await
            .unwrap();
        }
        assert!(!f.verify(false).await.clean);
        let flags = FlagCache::builder(f.store.clone())
            .migration(M, Stage::LegacyOnly)
            .build()
            .await;
        let (legacy, new) = repos::repos(backend);
        let store = DualStore::builder(M, legacy, new, f.db.clone(), flags, NoResync)
            .definition(f.def.clone())
            .build()
            .unwrap();
        let report = store.repair(Duration::ZERO).await.unwrap();
        assert_eq!(
            (report.copied, report.deleted, report.failed),
            (2, 1, 0),
            "{backend:?}: {report:?}"
        );
        assert_eq!(twintrack::dual::pending_intents(&f.db, M).await.unwrap(), 0);
        assert!(f.verify(false).await.clean, "{backend:?}");
    }
}

/// An interrupted run from before the migration went back to `legacy_only` is not resumed: rows
/// written meanwhile never reached the new shape, so its done chunks prove nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_older_than_the_last_legacy_only_is_started_over() {
    for f in Fixture::all().await {
        f.seed(300).await;
        f.stage(Stage::DualWrite).await;
        // An interrupted run that claims the whole range is done.
        let run: i64 = sqlx::query_scalar(
            "INSERT INTO twintrack_backfill_runs (migration, direction, lower_bound, upper_bound, started_at)
             VALUES ($1, 'forward', 0, 300, 1) RETURNING id",
        )
        .bind(M)
        .fetch_one(f.db.pool())
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO twintrack_backfill_chunks (run_id, chunk, lo, hi, next_key, done_at) VALUES ($1, 0, 0, 300, 300, 2)",
        )
        .bind(run)
        .execute(f.db.pool())
        .await
        .unwrap();
        f.stage(Stage::LegacyOnly).await;
        f.stage(Stage::DualWrite).await;
        let report = f.backfill(BackfillOptions::default()).await.unwrap();
        assert!(!report.resumed);
        assert_ne!(report.run_id, run);
        assert_eq!(report.rows_copied, 300);
        assert!(f.verify(false).await.clean);
    }
}

/// A two-database store backfills through its `Resync`: each batch's keys are read under the
/// batch's row locks and written to the other database before the batch commits. Updates and
/// deletes race it; afterwards both databases hold the same settings for every user.
#[tokio::test(flavor = "multi_thread")]
async fn a_two_database_store_backfills_through_resync_under_racing_writes() {
    let mut pairs: Vec<(String, String, Vec<tempfile::TempDir>)> = Vec::new();
    let (d1, u1) = common::sqlite_db();
    let (d2, u2) = common::sqlite_db();
    pairs.push((u1, u2, vec![d1, d2]));
    if let (Some(a), Some(b)) = (common::pg::fresh_db().await, common::pg::fresh_db().await) {
        pairs.push((a.url, b.url, vec![]));
    }
    for (legacy_url, new_url, _guards) in pairs {
        let f = Fixture::new(&legacy_url, None).await;
        let backend = f.db.backend();
        let new_db = Database::connect(&new_url).await.unwrap();
        repos::create_shapes(&new_db).await.unwrap();
        twintrack::schema::install(&new_db).await.unwrap();
        let n = 3_000;
        f.seed(n).await;
        f.stage(Stage::DualWrite).await;
        let flags = FlagCache::builder(f.store.clone())
            .migration(M, Stage::LegacyOnly)
            .build()
            .await;
        let (legacy, new) = repos::split_repos(backend);
        let store = DualStore::builder(
            M,
            legacy.clone(),
            new.clone(),
            f.db.clone(),
            flags,
            SettingsResync,
        )
        .new_database(new_db.clone())
        .definition(f.def.clone())
        .build()
        .unwrap();
        let run = {
            let store = store.clone();
            tokio::spawn(async move {
                let options = BackfillOptions {
                    batch_size: 100,
                    target_batch_time: Duration::from_millis(10),
                    workers: 2,
                    rate: Some(3_000.0),
                    ..BackfillOptions::default()
                };
                store.backfill(options, |_| {}).await
            })
        };
        let mut writes = 0;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        while !run.is_finished() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let id = 1 + (rng % n as u64) as i64;
            if rng.is_multiple_of(5) {
                store
                    .write(id, move |repo, conn| repo.delete(conn, id))
                    .await
                    .unwrap();
            } else {
                let s = Settings {
                    theme: format!("raced-{writes}"),
                    notifications_enabled: true,
                };
                store
                    .write(id, move |repo, conn| repo.put(conn, id, s.clone()))
                    .await
                    .unwrap();
            }
            writes += 1;
        }
        let report = run.await.unwrap().unwrap();
        assert!(report.finished, "{backend:?}");
        assert!(
            writes > 50,
            "{backend:?}: only {writes} writes raced the backfill"
        );
        let (mut lc, mut nc) = (
            f.db.pool().acquire().await.unwrap(),
            new_db.pool().acquire().await.unwrap(),
        );
        let mut differing = Vec::new();
        for id in 1..=n {
            let l = legacy.get(&mut lc, id, false).await.unwrap();
            let r = new.get(&mut nc, id, false).await.unwrap();
            if l != r {
                differing.push((id, l, r));
            }
        }
        eprintln!("{backend:?}: {writes} writes raced a two-database backfill of {n} users");
        assert!(
            differing.is_empty(),
            "{backend:?}: {} differ, e.g. {:?}",
            differing.len(),
            differing.first()
        );
        assert!(
            f.store
                .get(M)
                .await
                .unwrap()
                .evidence
                .backfill_finished_at
                .is_some()
        );
    }
}
