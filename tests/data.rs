//! Backfill, verify and repair on real databases, through the quickstart's own definition
//! (`examples/quickstart.toml`) and repositories, with `bigint` keys on both backends, text
//! keys on SQLite and UUID keys on PostgreSQL (each guarantee runs once per
//! [`common::Shape`]): copies that race dual writes, runs killed and resumed, planted
//! divergences, the stage gates fed by real evidence, and bad definitions.

mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{Shape, TestKey, quickstart_config};
use repos::{Settings, SettingsRepo, SettingsResync, UserId, Users};
use twintrack::backfill::{self, BackfillOptions};
use twintrack::config::Config;
use twintrack::db::{Native, Query, query};
use twintrack::definition::MigrationDef;
use twintrack::dual::{DualStore, NativeConnection};
use twintrack::flags::{BoxFuture, FlagCache, FlagStore, SqlFlagStore, StageChange};
use twintrack::metrics::Metrics;
use twintrack::verify::{self, VerifyOptions};
use twintrack::{Backend, Database, DynKey, Error, Stage};

const M: &str = "user_settings";

/// A key type the data guarantees run with.
trait K: UserId + TestKey {}
impl<T: UserId + TestKey> K for T {}

fn definition(backend: Backend) -> MigrationDef {
    let config = Config::load(&quickstart_config()).unwrap();
    config.migration(M).unwrap().definition(backend).unwrap()
}

struct Fixture<DB: Native, I: K> {
    name: String,
    db: Database,
    pool: sqlx::Pool<DB>,
    store: Arc<SqlFlagStore>,
    def: MigrationDef,
    url: String,
    _guard: Option<tempfile::TempDir>,
    _key: std::marker::PhantomData<I>,
}

impl<DB: Native, I: K> Fixture<DB, I> {
    async fn new(shape: Shape) -> Self {
        let db = Database::connect(&shape.url).await.unwrap();
        repos::create_shapes::<I>(&db).await.unwrap();
        let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
        store.register(M, "test").await.unwrap();
        Fixture {
            name: shape.name(),
            def: definition(db.backend()),
            pool: db.typed::<DB>().unwrap().clone(),
            db,
            store,
            url: shape.url,
            _guard: shape.guard,
            _key: std::marker::PhantomData,
        }
    }

    /// `n` legacy users with settings in the JSON profile, as before the migration, with keys
    /// the database assigns (`bigint`) or random ones (UUID, text).
    async fn seed(&self, n: i64) {
        seed::<I>(&self.db, n).await
    }

    /// Every user's id, sorted.
    async fn keys(&self) -> Vec<I> {
        let mut keys: Vec<I> = query("SELECT id FROM users")
            .fetch_all(&self.db)
            .await
            .unwrap()
            .into_iter()
            .map(|r| I::from_dyn(DynKey::from_row(r, I::KINDS).unwrap()).unwrap())
            .collect();
        keys.sort();
        keys
    }

    async fn stage(&self, stage: Stage) {
        self.store
            .set_stage(StageChange::new(M, stage, "test", "setup").force(true))
            .await
            .unwrap();
    }

    async fn count(&self, table: &str) -> i64 {
        count(&self.db, table).await
    }

    /// Runs `sql` with `key` bound as `$1`.
    async fn with_key(&self, sql: &'static str, key: &I) {
        query(sql)
            .bind_key(&key.to_dyn())
            .execute(&self.db)
            .await
            .unwrap();
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

    /// The user service over the quickstart's dual store.
    async fn users(&self) -> Users<DB, I> {
        self.users_with(twintrack::shadow::ShadowOptions::default())
            .await
    }

    /// [`Fixture::users`] whose shadow reads run with `shadow`.
    async fn users_with(&self, shadow: twintrack::shadow::ShadowOptions) -> Users<DB, I> {
        let flags = FlagCache::builder(self.store.clone())
            .migration(M, Stage::LegacyOnly)
            .build()
            .await;
        let (legacy, new) = repos::repos::<DB, I>();
        Users {
            settings: DualStore::builder(
                M,
                legacy,
                new,
                self.pool.clone(),
                flags,
                SettingsResync::default(),
            )
            .shadow(shadow)
            .build()
            .unwrap(),
        }
    }
}

async fn count(db: &Database, table: &str) -> i64 {
    Query::assert_safe(format!("SELECT COUNT(*) FROM {table}"))
        .scalar(db)
        .await
        .unwrap()
}

async fn seed<I: K>(db: &Database, n: i64) {
    let id = I::random_sql(db.backend());
    let (columns, value) = match id {
        Some(expr) => ("id, email, profile", format!("{expr}, ")),
        None => ("email, profile", String::new()),
    };
    let sql = match db.backend() {
        Backend::Postgres => format!(
            "INSERT INTO users ({columns})
             SELECT {value}'u' || g || '@example.com',
                    jsonb_build_object('theme', 'theme-' || (g % 7), 'notifications_enabled', g % 2 = 0)
             FROM generate_series(1, $1) AS g"
        ),
        // MariaDB's sequence engine numbers the rows (`seq_1_to_N`).
        Backend::MySql => format!(
            r#"INSERT INTO users ({columns})
               SELECT {value}CONCAT('u', seq, '@example.com'),
                      CONCAT('{{"theme": "theme-', seq % 7, '", "notifications_enabled": ', IF(seq % 2 = 0, 'true', 'false'), '}}')
               FROM seq_1_to_{n}"#
        ),
        _ => format!(
            "WITH RECURSIVE g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < $1)
             INSERT INTO users ({columns})
             SELECT {value}'u' || i || '@example.com',
                    json_object('theme', 'theme-' || (i % 7), 'notifications_enabled',
                                json(CASE WHEN i % 2 = 0 THEN 'true' ELSE 'false' END))
             FROM g"
        ),
    };
    Query::assert_safe(sql).bind(n).execute(db).await.unwrap();
}

/// Runs `$test::<DB, K>(fixture)` for a fixture of every shape (PostgreSQL ones only with
/// `postgres_only`).
macro_rules! each_fixture {
    ($test:ident) => {{
        async fn with_fixture<DB: Native, I: K>(shape: Shape) {
            $test(Fixture::<DB, I>::new(shape).await).await
        }
        each_shape_with_mariadb!(with_fixture);
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn backfill_copies_every_row_and_verify_finds_them_equal() {
    each_fixture!(backfill_and_verify);
}

async fn backfill_and_verify<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.seed(5_000).await;
    // Refused while dual writes are off: rows written meanwhile would be missed.
    f.stage(Stage::LegacyOnly).await;
    let err = f.backfill(BackfillOptions::default()).await.unwrap_err();
    assert!(matches!(err, Error::Precondition(_)), "{b}: {err}");
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
    assert_eq!(report.rows_copied, 5_000, "{b}");
    assert_eq!(report.run_rows_copied, 5_000);
    assert_eq!(report.keys_done, 5_000);
    assert_eq!(f.count("user_settings").await, 5_000);
    // The flag copied as it is: every even user has notifications on (`seed`).
    let on: i64 = query("SELECT COUNT(*) FROM user_settings WHERE notifications_enabled")
        .scalar(&f.db)
        .await
        .unwrap();
    assert_eq!(on, 2_500, "{b}");
    let record = f.store.get(M).await.unwrap();
    assert!(record.evidence.backfill_finished_at.is_some());

    let v = f.verify(false).await;
    assert!(v.clean, "{b}: {:?}", v.lines());
    assert_eq!((v.legacy_rows, v.new_rows), (5_000, 5_000));
    if f.db.backend() == Backend::MySql {
        assert_eq!(v.row_hash, "checksum");
    }
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

#[tokio::test(flavor = "multi_thread")]
async fn planted_divergences_are_reported_exactly_and_repaired() {
    each_fixture!(planted_divergences);
}

async fn planted_divergences<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    // 750 rows a segment: a differing segment is cut again before rows are compared.
    f.seed(6_000).await;
    f.stage(Stage::DualWrite).await;
    f.backfill(BackfillOptions::default()).await.unwrap();
    assert!(f.verify(false).await.clean);
    let keys = f.keys().await;
    let (missing, gone, changed) = (&keys[16], &keys[3233], &keys[5998]);

    // Missing in new, missing in legacy (a user whose legacy settings are gone), and one
    // column different.
    f.with_key("DELETE FROM user_settings WHERE user_id = $1", missing)
        .await;
    f.with_key("UPDATE users SET profile = '{}' WHERE id = $1", gone)
        .await;
    f.with_key(
        "UPDATE user_settings SET theme = 'planted' WHERE user_id = $1",
        changed,
    )
    .await;
    let v = f.verify(false).await;
    assert!(!v.clean);
    assert_eq!(v.missing_in_new, vec![missing.to_dyn()], "{b}");
    assert_eq!(v.missing_in_legacy, vec![gone.to_dyn()], "{b}");
    assert_eq!(v.different.len(), 1, "{:?}", v.different);
    assert_eq!(v.different[0].key, changed.to_dyn());
    assert_eq!(v.different[0].columns, vec!["theme".to_owned()]);
    assert!((1..=3).contains(&v.differing_segments), "{b}: {v:?}");
    assert_eq!(v.unexplained_segments, 0);

    // --repair re-syncs exactly those keys from legacy (authoritative in dual_write).
    let r = f.verify(true).await;
    assert!(r.clean, "{:?}", r.lines());
    let mut repaired = r.repaired.clone();
    repaired.sort();
    let mut want = vec![missing.to_dyn(), gone.to_dyn(), changed.to_dyn()];
    want.sort();
    assert_eq!(repaired, want, "{b}");
    assert!(f.verify(false).await.clean);
    assert_eq!(f.count("user_settings").await, 5_999);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_stage_gates_follow_real_evidence() {
    each_fixture!(stage_gates);
}

async fn stage_gates<DB: Native, I: K>(f: Fixture<DB, I>) {
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

    // A divergence: verify exits 1 and names it, by its key's natural text.
    let key = f.keys().await[2].clone();
    f.with_key(
        "UPDATE user_settings SET theme = 'x' WHERE user_id = $1",
        &key,
    )
    .await;
    let (code, out) = f.cli(dir.path(), "verify user_settings");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("different {} (theme)", key.to_text())),
        "{out}"
    );
    let (code, out) = f.cli(dir.path(), "--json verify user_settings --repair");
    assert_eq!(code, 0, "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&out[..out.rfind('}').unwrap() + 1]).unwrap();
    assert_eq!(
        json["repaired"],
        serde_json::json!([key.to_dyn().to_json()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_definitions_are_refused_before_anything_is_written() {
    each_fixture!(bad_definitions);
}

async fn bad_definitions<DB: Native, I: K>(f: Fixture<DB, I>) {
    let dir = tempfile::tempdir().unwrap();
    f.seed(50).await;
    f.stage(Stage::DualWrite).await;
    let other = if I::KINDS == [twintrack::KeyKind::Text] {
        "BIGINT"
    } else if f.db.backend() == Backend::MySql {
        // Text keys are refused there (`tests/mariadb.rs`): another integer type.
        "INT"
    } else {
        "TEXT"
    };
    Query::assert_safe(format!("CREATE TABLE other_key (k {other})"))
        .execute(&f.db)
        .await
        .unwrap();
    let good = std::fs::read_to_string(quickstart_config()).unwrap();
    let cases = [
        (
            good.replace(
                "legacy_table = \"users\"",
                "legacy_table = \"no_such_table\"",
            ),
            "legacy_table no_such_table does not exist",
        ),
        (
            good.replace("legacy_key = \"id\"", "legacy_key = \"no_such_column\""),
            "legacy_key: no column no_such_column in users",
        ),
        (
            // A key column of another type than the legacy key's.
            good.replace("new_table = \"user_settings\"", "new_table = \"other_key\"")
                .replace("new_key = \"user_id\"", "new_key = \"k\""),
            "the key columns' types differ between the shapes",
        ),
        (
            good.replace("legacy_key = \"id\"", "legacy_key = [\"id\", \"email\"]"),
            "legacy_key has 2 columns and new_key 1",
        ),
        (
            good.replace("legacy_key = \"id\"", "legacy_key = 7"),
            "a key column name, or an array",
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
            good.replace("ON CONFLICT (user_id)", "ON CONFLICT (no_such)")
                .replace(
                    "UPDATE theme = VALUES(theme)",
                    "UPDATE theme = VALUES(no_such)",
                ),
            "copy SQL fails",
        ),
        (
            good.replace("{batch:s}", "{batch:s t}"),
            "the alias must be a plain identifier",
        ),
        (
            good.replace("SELECT user_id AS key,", "SELECT user_id AS k,")
                .replace("SELECT user_id AS \"key\",", "SELECT user_id AS k,"),
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
                "{} {command} with {needle}: {text}",
                f.name
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

/// The `FOR SHARE` lock (and the batch's one snapshot) is what keeps a racing dual write from
/// being overwritten by a batch's older copy. A copy statement made slow on purpose (it sleeps
/// after taking its snapshot) gives a write the time to land in between: with the protections
/// the write waits for the batch and wins; without them, the batch's stale copy overwrites it.
/// (PostgreSQL: SQLite's batch holds the database's write lock.)
#[tokio::test(flavor = "multi_thread")]
async fn the_row_lock_keeps_racing_writes_from_being_overwritten() {
    each_fixture!(row_lock);
}

async fn row_lock<DB: Native, I: K>(f: Fixture<DB, I>) {
    if f.db.backend() != Backend::Postgres {
        return;
    }
    for lock in [true, false] {
        query(
            "TRUNCATE users, user_settings, twintrack_backfill_runs, twintrack_backfill_chunks RESTART IDENTITY",
        )
        .execute(&f.db)
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
        let users = f.users().await;
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
        let key = f.keys().await[4].clone();
        users
            .update(
                &key,
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
            assert!(v.clean, "{} with the lock: {:?}", f.name, v.lines());
        } else {
            assert_eq!(
                v.different.len(),
                1,
                "without the lock the race is real: {:?}",
                v.lines()
            );
            assert_eq!(v.different[0].key, key.to_dyn());
        }
    }
}

/// Rows copied by every batch of every run so far: each row once means no range was copied
/// twice.
async fn rows_copied(db: &Database) -> i64 {
    let sql = match db.backend() {
        Backend::MySql => {
            "SELECT CAST(COALESCE(SUM(rows_copied), 0) AS SIGNED) FROM twintrack_backfill_chunks"
        }
        _ => "SELECT CAST(COALESCE(SUM(rows_copied), 0) AS BIGINT) FROM twintrack_backfill_chunks",
    };
    query(sql).scalar(db).await.unwrap()
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

/// A million rows, the backfill SIGKILLed halfway and started again: the second run resumes
/// the first, and together they copy every row exactly once. (PostgreSQL, `bigint` and UUID
/// keys.)
#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_backfill_killed_halfway_resumes_without_gap_or_duplicate() {
    each_fixture!(killed_and_resumed);
}

async fn killed_and_resumed<DB: Native, I: K>(f: Fixture<DB, I>) {
    if f.db.backend() != Backend::Postgres {
        return;
    }
    let b = &f.name;
    f.seed(1_000_000).await;
    f.stage(Stage::DualWrite).await;

    let mut first = backfill_process(&f.url, &["--workers", "2"]);
    common::pg::eventually(Duration::from_secs(180), "half the rows copied", || async {
        rows_copied(&f.db).await >= 500_000
    })
    .await;
    first.kill().unwrap(); // SIGKILL: no chance to clean up
    let _ = first.wait();
    let at_kill = rows_copied(&f.db).await;
    assert!(
        at_kill < 1_000_000,
        "{b}: the run finished before it was killed ({at_kill})"
    );
    eprintln!("{b}: killed after {at_kill} rows");

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
    assert!(v.clean, "{b}: {:?}", v.lines());
    assert_eq!(v.legacy_rows, 1_000_000);
}

/// Two CLI processes join one run and split its chunks (leases `FOR UPDATE SKIP LOCKED`):
/// every row copied exactly once. (PostgreSQL and MariaDB, `bigint` keys.)
#[tokio::test(flavor = "multi_thread")]
async fn two_backfill_processes_share_the_range_without_overlap() {
    each_fixture!(two_processes);
}

async fn two_processes<DB: Native, I: K>(f: Fixture<DB, I>) {
    if !matches!(f.name.as_str(), "postgres/i64" | "mariadb/i64") {
        return;
    }
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
    let f = Fixture::<sqlx::Postgres, i64>::new(Shape {
        backend: "postgres",
        key: "i64",
        url: db.url,
        replica_urls: db.replica_urls,
        guard: None,
    })
    .await;
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
    each_fixture!(racing_writes);
}

async fn racing_writes<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    let n = 20_000;
    f.seed(n).await;
    f.stage(Stage::DualWrite).await;
    let keys = f.keys().await;
    let users = f.users().await;
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
        let id = &keys[(rng % keys.len() as u64) as usize];
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
            Err(e) => panic!("{b}: a racing write failed: {e:?}"),
        }
    }
    run.await.unwrap().unwrap();
    eprintln!("{b}: {writes} updates and deletes raced the backfill");
    assert!(writes > 50, "{b}: only {writes} writes raced the backfill");
    let v = f.verify(false).await;
    assert!(v.clean, "{b}: {:?}", v.lines());
}

/// Leaving `new_only` for a stage that reads legacy needs a reverse sync: `backfill --reverse`
/// (the definition's `reverse_copy`) copies what only the new shape received.
#[tokio::test(flavor = "multi_thread")]
async fn a_reverse_backfill_makes_leaving_new_only_safe() {
    each_fixture!(reverse_backfill);
}

async fn reverse_backfill<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
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
            .unwrap_or_else(|e| panic!("{b} → {stage}: {e}"));
    }
    // In new_only only the new shape is written.
    for key in &f.keys().await[..10] {
        f.with_key(
            "UPDATE user_settings SET theme = 'new-only' WHERE user_id = $1",
            key,
        )
        .await;
    }
    let err = set(Stage::Shadow).await.unwrap_err();
    assert!(err.to_string().contains("--reverse"), "{b}: {err}");
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
    assert!(f.verify(false).await.clean, "{b}");
    set(Stage::Shadow).await.unwrap();
}

/// A `Resync` that must not be called: proves the repair worker used the definition's SQL.
struct NoResync<DB, I>(std::marker::PhantomData<fn() -> (DB, I)>);

fn not_called<'c, T: Send + 'c>(what: &'static str) -> BoxFuture<'c, sqlx::Result<T>> {
    Box::pin(async move {
        Err(sqlx::Error::Protocol(format!(
            "Resync::{what} must not be called"
        )))
    })
}

impl<'a, DB: Native, I: K> twintrack::dual::Resync<dyn SettingsRepo<DB, I> + 'a>
    for NoResync<DB, I>
{
    type Database = DB;
    type Key = I;
    type Record = Settings;

    fn load<'c>(
        &'c self,
        _: &'c (dyn SettingsRepo<DB, I> + 'a),
        _: &'c mut NativeConnection<DB>,
        _: &'c I,
    ) -> BoxFuture<'c, sqlx::Result<Option<Settings>>> {
        not_called("load")
    }

    fn store<'c>(
        &'c self,
        _: &'c (dyn SettingsRepo<DB, I> + 'a),
        _: &'c mut NativeConnection<DB>,
        _: &'c I,
        _: Settings,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        not_called("store")
    }

    fn delete<'c>(
        &'c self,
        _: &'c (dyn SettingsRepo<DB, I> + 'a),
        _: &'c mut NativeConnection<DB>,
        _: &'c I,
    ) -> BoxFuture<'c, sqlx::Result<()>> {
        not_called("delete")
    }
}

/// The dual store's repair worker and `verify --repair` re-sync a key the same way: with the
/// definition's SQL.
#[tokio::test(flavor = "multi_thread")]
async fn the_repair_worker_resyncs_keys_with_the_definition() {
    each_fixture!(repair_with_definition);
}

async fn repair_with_definition<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.seed(100).await;
    f.stage(Stage::DualWrite).await;
    f.backfill(BackfillOptions::default()).await.unwrap();
    let keys = f.keys().await;
    // Three keys drift (different, missing in new, settings gone from legacy), each with
    // the repair intent a failed non-authoritative write would have left.
    f.with_key(
        "UPDATE user_settings SET theme = 'drift' WHERE user_id = $1",
        &keys[6],
    )
    .await;
    f.with_key("DELETE FROM user_settings WHERE user_id = $1", &keys[7])
        .await;
    f.with_key("UPDATE users SET profile = '{}' WHERE id = $1", &keys[8])
        .await;
    for key in &keys[6..9] {
        query(
            "INSERT INTO twintrack_repair_intents (migration, key_text, target_side, created_at) VALUES ($1, $2, 'new', 0)",
        )
        .bind(M)
        .bind(key.to_text())
        .execute(&f.db)
        .await
        .unwrap();
    }
    assert!(!f.verify(false).await.clean);
    let flags = FlagCache::builder(f.store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let (legacy, new) = repos::repos::<DB, I>();
    let store = DualStore::builder(
        M,
        legacy,
        new,
        f.pool.clone(),
        flags,
        NoResync(std::marker::PhantomData),
    )
    .definition(f.def.clone())
    .build()
    .unwrap();
    let report = store.repair(Duration::ZERO).await.unwrap();
    assert_eq!(
        (report.copied, report.deleted, report.failed),
        (2, 1, 0),
        "{b}: {report:?}"
    );
    assert_eq!(twintrack::dual::pending_intents(&f.db, M).await.unwrap(), 0);
    assert!(f.verify(false).await.clean, "{b}");
}

/// An interrupted run from before the migration went back to `legacy_only` is not resumed: rows
/// written meanwhile never reached the new shape, so its done chunks prove nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_older_than_the_last_legacy_only_is_started_over() {
    each_fixture!(stale_run);
}

async fn stale_run<DB: Native, I: K>(f: Fixture<DB, I>) {
    f.seed(300).await;
    f.stage(Stage::DualWrite).await;
    // An interrupted run that claims the whole range is done.
    let run: i64 = query(
        "INSERT INTO twintrack_backfill_runs (migration, direction, lower_bound, upper_bound, started_at)
         VALUES ($1, 'forward', NULL, NULL, 1) RETURNING id",
    )
    .bind(M)
    .scalar(&f.db)
    .await
    .unwrap();
    query(
        "INSERT INTO twintrack_backfill_chunks (run_id, chunk, lo, hi, next_key, done_at) VALUES ($1, 0, NULL, NULL, NULL, 2)",
    )
    .bind(run)
    .execute(&f.db)
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

/// A two-database store backfills through its `Resync`: each batch's keys are read under the
/// batch's row locks and written to the other database before the batch commits. Updates and
/// deletes race it; afterwards both databases hold the same settings for every user.
#[tokio::test(flavor = "multi_thread")]
async fn a_two_database_store_backfills_through_resync_under_racing_writes() {
    each_fixture!(two_database_backfill);
}

async fn two_database_backfill<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    let (_second_guard, new_url) = match f.db.backend() {
        Backend::Postgres => (None, common::pg::fresh_db().await.unwrap().url),
        Backend::MySql => (None, common::mariadb::fresh_db().await.unwrap().url),
        _ => {
            let (dir, url) = common::sqlite_db();
            (Some(dir), url)
        }
    };
    let new_db = Database::connect(&new_url).await.unwrap();
    repos::create_shapes::<I>(&new_db).await.unwrap();
    twintrack::schema::install(&new_db).await.unwrap();
    let n = 3_000;
    f.seed(n).await;
    f.stage(Stage::DualWrite).await;
    let keys = f.keys().await;
    let flags = FlagCache::builder(f.store.clone())
        .migration(M, Stage::LegacyOnly)
        .build()
        .await;
    let (legacy, new) = repos::split_repos::<DB, I>();
    let store = DualStore::builder(
        M,
        legacy.clone(),
        new.clone(),
        f.pool.clone(),
        flags,
        SettingsResync::default(),
    )
    .new_database(new_db.typed::<DB>().unwrap().clone())
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
        let id = keys[(rng % keys.len() as u64) as usize].clone();
        let key = id.clone();
        if rng.is_multiple_of(5) {
            store
                .write(&id, move |repo, conn| repo.delete(conn, key.clone()))
                .await
                .unwrap();
        } else {
            let s = Settings {
                theme: format!("raced-{writes}"),
                notifications_enabled: true,
            };
            store
                .write(&id, move |repo, conn| {
                    repo.put(conn, key.clone(), s.clone())
                })
                .await
                .unwrap();
        }
        writes += 1;
    }
    let report = run.await.unwrap().unwrap();
    assert!(report.finished, "{b}");
    assert!(writes > 50, "{b}: only {writes} writes raced the backfill");
    let new_pool = new_db.typed::<DB>().unwrap();
    let (mut lc, mut nc) = (
        f.pool.acquire().await.unwrap(),
        new_pool.acquire().await.unwrap(),
    );
    let mut differing = Vec::new();
    for id in &keys {
        let l = legacy.get(&mut lc, id.clone(), false).await.unwrap();
        let r = new.get(&mut nc, id.clone(), false).await.unwrap();
        if l != r {
            differing.push((id.to_text(), l, r));
        }
    }
    eprintln!("{b}: {writes} writes raced a two-database backfill of {n} users");
    assert!(
        differing.is_empty(),
        "{b}: {} differ, e.g. {:?}",
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

/// The field report: a backfill chosen as a deadlock victim against an application
/// transaction that locks the batch's rows in the opposite order exited 5 with nothing copied.
/// Here it really is the victim (its deadlock check runs first: `deadlock_timeout` 300 ms for
/// its sessions, under its 500 ms lock timeout; 10 s for the application's), the application's
/// transaction commits, and the batch is retried (counted by reason) until every row is copied.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_chosen_as_a_deadlock_victim_retries_and_copies_every_row() {
    use sqlx::Connection;
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let f = Fixture::<sqlx::Postgres, i64>::new(Shape {
        backend: "postgres",
        key: "i64",
        url: pg.url.clone(),
        replica_urls: Vec::new(),
        guard: None,
    })
    .await;
    f.seed(2_000).await;
    f.stage(Stage::DualWrite).await;
    let keys = f.keys().await;
    Query::assert_safe(format!(
        "ALTER DATABASE {} SET deadlock_timeout = '300ms'",
        pg.name
    ))
    .execute(&f.db)
    .await
    .unwrap();
    // Sessions opened from now on get it: the backfill's own pool.
    let backfill_db = Database::connect(&pg.url).await.unwrap();

    // The application: locks a row in the middle of the first batch.
    let mut app = sqlx::PgConnection::connect(&pg.url).await.unwrap();
    sqlx::raw_sql("BEGIN; SET LOCAL deadlock_timeout = '10s'")
        .execute(&mut app)
        .await
        .unwrap();
    sqlx::query("SELECT id FROM users WHERE id = $1 FOR UPDATE")
        .bind(keys[500])
        .execute(&mut app)
        .await
        .unwrap();

    let metrics = common::TestMetrics::new();
    let backfill = {
        let (db, store, def, metrics) = (
            backfill_db.clone(),
            f.store.clone(),
            f.def.clone(),
            metrics.metrics(),
        );
        tokio::spawn(async move {
            backfill::run(
                &db,
                &*store,
                &def,
                BackfillOptions {
                    batch_size: 1_000,
                    ..BackfillOptions::default()
                },
                metrics,
                |_| {},
            )
            .await
        })
    };
    // The batch holds the first 500 rows FOR SHARE and waits for the 501st…
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = query(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .scalar(&f.db)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the batch never waited"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // …and the application now wants the first: a lock cycle.
    let app_done = tokio::spawn(async move {
        sqlx::query("UPDATE users SET email = email || '.x' WHERE id = $1")
            .bind(keys[0])
            .execute(&mut app)
            .await?;
        sqlx::raw_sql("COMMIT").execute(&mut app).await?;
        Ok::<_, sqlx::Error>(())
    });
    app_done
        .await
        .unwrap()
        .expect("the application's transaction is not the one aborted");
    let report = backfill.await.unwrap().expect("the backfill finishes");
    assert!(report.finished);
    assert_eq!(f.count("user_settings").await, 2_000);
    assert!(
        metrics.counter("twintrack.backfill.retries", ("reason", "deadlock")) >= 1,
        "the batch was a deadlock victim and was retried"
    );
    assert!(f.verify(false).await.clean);
}

/// A lost connection in the middle of a batch (its backend terminated while the batch holds
/// its rows, twice): the batch is retried on a new connection, counted as `connection`, and
/// the run finishes with every row.
#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_whose_connection_is_cut_mid_batch_retries_and_copies_every_row() {
    let Some(pg) = common::pg::fresh_db().await else {
        return;
    };
    let f = Fixture::<sqlx::Postgres, i64>::new(Shape {
        backend: "postgres",
        key: "i64",
        url: pg.url.clone(),
        replica_urls: Vec::new(),
        guard: None,
    })
    .await;
    f.seed(3_000).await;
    f.stage(Stage::DualWrite).await;
    let cuts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let hook = {
        let (db, cuts) = (f.db.clone(), cuts.clone());
        backfill::BeforeCopy(Arc::new(move || {
            let (db, cuts) = (db.clone(), cuts.clone());
            Box::pin(async move {
                if cuts.load(std::sync::atomic::Ordering::SeqCst) < 2 {
                    let cut: i64 = query(
                        "SELECT COUNT(*) FILTER (WHERE cut) FROM (
                           SELECT pg_terminate_backend(pid) AS cut FROM pg_stat_activity
                           WHERE datname = current_database() AND state = 'idle in transaction'
                             AND pid <> pg_backend_pid()) s",
                    )
                    .scalar(&db)
                    .await
                    .unwrap();
                    cuts.fetch_add(
                        u32::try_from(cut).unwrap(),
                        std::sync::atomic::Ordering::SeqCst,
                    );
                }
            })
        }))
    };
    let metrics = common::TestMetrics::new();
    let report = backfill::run(
        &f.db,
        &*f.store,
        &f.def,
        BackfillOptions {
            batch_size: 500,
            before_copy: Some(hook),
            ..BackfillOptions::default()
        },
        metrics.metrics(),
        |_| {},
    )
    .await
    .expect("the backfill finishes");
    assert!(report.finished);
    assert_eq!(cuts.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(f.count("user_settings").await, 3_000);
    assert!(metrics.counter("twintrack.backfill.retries", ("reason", "connection")) >= 2);
    assert!(f.verify(false).await.clean);
}

/// SQLite: another connection holds the database's write lock for longer than the busy
/// timeout (5 s) between two batches: the batch that gets `SQLITE_BUSY` is retried, counted as
/// `busy`, and the run finishes with every row.
#[tokio::test(flavor = "multi_thread")]
async fn a_sqlite_backfill_that_finds_the_database_busy_retries_and_copies_every_row() {
    use sqlx::Connection;
    let (dir, url) = common::sqlite_db();
    let f = Fixture::<sqlx::Sqlite, i64>::new(Shape {
        backend: "sqlite",
        key: "i64",
        url: url.clone(),
        replica_urls: Vec::new(),
        guard: Some(dir),
    })
    .await;
    f.seed(2_000).await;
    f.stage(Stage::DualWrite).await;
    // After the first batch has committed (its progress report), another connection takes
    // the write lock and holds it for 6 s; the report returns once it holds it.
    let locked = std::sync::atomic::AtomicBool::new(false);
    let lock_url = url.clone();
    let progress = move |_: &backfill::Progress| {
        if locked.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let url = lock_url.clone();
        std::thread::spawn(move || {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(async move {
                    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
                    sqlx::raw_sql("BEGIN IMMEDIATE")
                        .execute(&mut conn)
                        .await
                        .unwrap();
                    held_tx.send(()).unwrap();
                    tokio::time::sleep(Duration::from_secs(6)).await;
                    sqlx::raw_sql("COMMIT").execute(&mut conn).await.unwrap();
                })
        });
        held_rx.recv().unwrap();
    };
    let metrics = common::TestMetrics::new();
    let report = backfill::run(
        &f.db,
        &*f.store,
        &f.def,
        BackfillOptions {
            batch_size: 100,
            target_batch_time: Duration::from_secs(60),
            ..BackfillOptions::default()
        },
        metrics.metrics(),
        progress,
    )
    .await
    .expect("the backfill finishes");
    assert!(report.finished);
    assert_eq!(f.count("user_settings").await, 2_000);
    assert!(metrics.counter("twintrack.backfill.retries", ("reason", "busy")) >= 1);
}

/// The admin page's charts from what really happened: writes and shadow reads through two
/// dual stores (two processes' figures, each written whole, so writing again counts nothing
/// twice), a confirmed mismatch, and a backfill run, read back by `twintrack serve`'s page.
#[tokio::test(flavor = "multi_thread")]
async fn the_admin_page_charts_what_the_stores_and_the_backfill_did() {
    each_fixture!(charted);
}

async fn charted<DB: Native, I: K>(f: Fixture<DB, I>) {
    let b = &f.name;
    f.seed(200).await;
    f.stage(Stage::DualWrite).await;
    let run = f.backfill(BackfillOptions::default()).await.unwrap();
    f.stage(Stage::Shadow).await;
    let shadow = twintrack::shadow::ShadowOptions {
        recheck_delay: Duration::from_millis(10),
        ..Default::default()
    };
    let (one, two) = (
        f.users_with(shadow.clone()).await,
        f.users_with(shadow).await,
    );
    let keys = f.keys().await;
    let settings = Settings {
        theme: "dark".into(),
        notifications_enabled: true,
    };
    // Written once after 19 writes, then again after the 20th: each write of a minute's
    // figures replaces the last (39 if they added up).
    for key in &keys[..19] {
        one.update(key, settings.clone()).await.unwrap();
    }
    assert!(one.settings.drain(Duration::from_secs(10)).await, "{b}");
    one.update(&keys[19], settings.clone()).await.unwrap();
    for key in &keys[20..25] {
        two.update(key, settings.clone()).await.unwrap();
    }
    for key in &keys[..10] {
        one.settings(key).await.unwrap();
    }
    f.with_key(
        "UPDATE user_settings SET theme = 'planted' WHERE user_id = $1",
        &keys[30],
    )
    .await;
    one.settings(&keys[30]).await.unwrap();
    // Classified and written.
    assert!(one.settings.drain(Duration::from_secs(10)).await, "{b}");
    assert!(two.settings.drain(Duration::from_secs(10)).await, "{b}");
    // By series/label: the count summed over processes, and how many processes wrote.
    let mut sums: std::collections::BTreeMap<String, (i64, std::collections::BTreeSet<String>)> =
        Default::default();
    for r in
        query("SELECT series, label, instance, count FROM twintrack_stats WHERE migration = $1")
            .bind(M)
            .fetch_all(&f.db)
            .await
            .unwrap()
    {
        let (series, label): (String, String) = (r.get("series").unwrap(), r.get("label").unwrap());
        let sum = sums.entry(format!("{series}/{label}")).or_default();
        sum.0 += r.get::<i64>("count").unwrap();
        sum.1.insert(r.get("instance").unwrap());
    }
    let sums: Vec<(String, i64, usize)> = sums
        .into_iter()
        .map(|(what, (n, instances))| (what, n, instances.len()))
        .collect();
    let run_label = format!("backfill/{}", run.run_id);
    assert_eq!(
        sums,
        [
            (run_label, 200, 1),
            ("shadow/confirmed".to_owned(), 1, 1),
            ("shadow/match".to_owned(), 10, 1),
            ("write/legacy".to_owned(), 25, 2),
            ("write/new".to_owned(), 25, 2),
        ],
        "{b}"
    );

    // The page: each chart's figures in words, and a line drawn for each.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let tokens = twintrack::control::AdminTokens::parse("oncall=chart-token-0123456789").unwrap();
    let server = twintrack::control::ControlServer::new(f.store.clone(), f.db.clone(), tokens);
    let serving = tokio::spawn(async move {
        server
            .serve(listener, std::future::pending())
            .await
            .unwrap()
    });
    let (status, _, page) = common::http_with(
        &base,
        "GET",
        "/admin",
        "",
        &[("authorization", "Bearer chart-token-0123456789")],
    )
    .await;
    serving.abort();
    assert_eq!(status, 200, "{b}");
    let page = page.as_str().unwrap().to_owned();
    let chart = |id: &str| -> String {
        let at = page
            .find(&format!("id=\"chart-{id}-{M}\""))
            .unwrap_or_else(|| panic!("{b}: no {id} chart"));
        page[at..at + page[at..].find("</figure>").unwrap()].to_owned()
    };
    let mismatches = chart("mismatches");
    assert!(
        mismatches.contains(
            "11 comparisons in the last 60 minutes: confirmed 9.09% (1), transient 0.00% (0), unclassified 0.00% (0)"
        ),
        "{b}: {mismatches}"
    );
    let latency = chart("latency");
    assert!(
        latency.contains("(25 writes); new p50") && latency.ends_with("(25 writes)</p>"),
        "{b}: {latency}"
    );
    assert_eq!(
        latency.matches("<polyline").count(),
        4,
        "{b}: p50 and p99 of both sides"
    );
    let progress = chart("backfill");
    assert!(
        progress.contains(&format!(
            "run {} (finished): 200 of 200 keys (100.00%), 200 rows copied",
            run.run_id
        )),
        "{b}: {progress}"
    );
}
