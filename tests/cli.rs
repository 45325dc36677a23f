//! The `twintrack` binary, driven as an operator would: exit codes, messages, JSON, and that a
//! refused or bad command changes nothing. On SQLite and PostgreSQL.

mod common;

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }
}

fn config_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.toml")
}

fn twintrack(url: &str, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .env("DATABASE_URL", url)
        .env("TWINTRACK_CONFIG", config_path())
        .env("TWINTRACK_ACTOR", "tester")
        .args(args)
        .output()
        .expect("run twintrack");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// `twintrack <line>`, the line split on whitespace.
fn sh(url: &str, line: &str) -> Run {
    twintrack(url, &line.split_whitespace().collect::<Vec<_>>())
}

/// The detailed status as JSON (stage, version, audit entries).
fn detail(url: &str) -> Value {
    let run = twintrack(url, &["--json", "status", "user_settings"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    run.json()
}

fn audit_len(url: &str) -> usize {
    detail(url)["audit"].as_array().unwrap().len()
}

#[tokio::test(flavor = "multi_thread")]
async fn init_status_and_flips_as_an_operator_would() {
    for (backend, url, _guard) in common::backends().await {
        let init = twintrack(&url, &["init"]);
        assert_eq!(init.code, 0, "{backend}: {}", init.stderr);
        assert!(
            init.stdout
                .contains("registered user_settings at legacy_only")
        );

        let set = twintrack(
            &url,
            &[
                "stage",
                "set",
                "user_settings",
                "dualwrite",
                "--reason",
                "start",
            ],
        );
        assert_eq!(set.code, 0, "{backend}: {}", set.stderr);
        assert!(
            set.stdout.contains("legacy_only -> dual_write (version 2)"),
            "{}",
            set.stdout
        );

        // init again: idempotent, the stage is left as it is.
        let again = twintrack(&url, &["--json", "init"]);
        assert_eq!(again.code, 0);
        assert_eq!(again.json()["already_registered"][0], "user_settings");
        let d = detail(&url);
        assert_eq!(d["state"]["stage"], "dual_write", "{backend}");
        assert_eq!(d["state"]["version"], 2);
        assert_eq!(d["audit"][0]["actor"], "tester");

        let none = twintrack(&url, &["mismatches", "user_settings"]);
        assert_eq!(none.code, 0, "{}", none.stderr);
        assert!(
            none.stdout
                .contains("no mismatches recorded for user_settings")
        );

        let list = twintrack(&url, &["--json", "status"]);
        assert_eq!(list.json()[0]["migration"], "user_settings");
        // Timestamps in --json are RFC 3339 in UTC, to the microsecond.
        let d = detail(&url);
        let now = std::time::SystemTime::now();
        for at in [
            &list.json()[0]["updated_at"],
            &d["state"]["updated_at"],
            &d["audit"][0]["at"],
            &d["evidence"]["left_legacy_only_at"],
        ] {
            let text = at.as_str().unwrap_or_else(|| panic!("{backend}: {at}"));
            assert!(
                text.ends_with('Z') && text.contains('T'),
                "{backend}: {text}"
            );
            let year: i32 = text[..4].parse().unwrap();
            let this_year =
                1970 + now.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() / 31_556_952;
            assert!((year - this_year as i32).abs() <= 1, "{backend}: {text}");
        }
        assert_eq!(d["evidence"]["verify_clean_at"], Value::Null);
        let human = twintrack(&url, &["status"]);
        assert!(human.stdout.contains("user_settings") && human.stdout.contains("dual_write"));

        // Rollback goes to legacy_only, and from there has nothing to do.
        let rb = twintrack(&url, &["rollback", "user_settings", "--reason", "incident"]);
        assert_eq!(rb.code, 0, "{}", rb.stderr);
        assert!(rb.stdout.contains("dual_write -> legacy_only"));
        let rb = twintrack(&url, &["rollback", "user_settings", "--reason", "again"]);
        assert_eq!(rb.code, 0);
        assert!(rb.stdout.contains("nothing to roll back"));

        // Compare-and-set from the CLI.
        let stale = sh(
            &url,
            "stage set user_settings dual_write --reason r --expect-version 1",
        );
        assert_eq!(stale.code, 3, "{backend}: {}", stale.stderr);
        assert!(stale.stderr.contains("version conflict"));
        let ok = sh(
            &url,
            "stage set user_settings dual_write --reason r --expect-version 3",
        );
        assert_eq!(ok.code, 0, "{}", ok.stderr);

        // Tuning.
        let tune = twintrack(
            &url,
            &[
                "--json",
                "tune",
                "user_settings",
                "--shadow-sample-rate",
                "0.25",
                "--read-rollout-percent",
                "10",
                "--reason",
                "canary",
            ],
        );
        assert_eq!(tune.code, 0, "{}", tune.stderr);
        assert_eq!(tune.json()["read_rollout_percent"], 10);
        assert_eq!(tune.json()["shadow_sample_rate"], 0.25);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_and_bad_commands_exit_with_their_code_and_change_nothing() {
    for (backend, url, _guard) in common::backends().await {
        assert_eq!(twintrack(&url, &["init"]).code, 0);
        let before = detail(&url);
        let n = audit_len(&url);

        // Unsafe transition: exit 3 with the reason and the remedy.
        let refused = twintrack(
            &url,
            &["stage", "set", "user_settings", "shadow", "--reason", "r"],
        );
        assert_eq!(refused.code, 3, "{backend}: {}", refused.stderr);
        assert!(
            refused.stderr.contains("legacy_only -> shadow refused"),
            "{}",
            refused.stderr
        );
        assert!(
            refused
                .stderr
                .contains("twintrack stage set user_settings dual_write")
        );
        let refused_json = twintrack(
            &url,
            &[
                "--json",
                "stage",
                "set",
                "user_settings",
                "new_only",
                "--reason",
                "r",
            ],
        );
        assert_eq!(refused_json.code, 3);
        assert_eq!(refused_json.json()["refusal"]["to"], "new_only");

        let cases: &[(&[&str], i32, &str)] = &[
            (
                &["stage", "set", "user_settings", "sideways", "--reason", "r"],
                2,
                "invalid stage",
            ),
            (
                &[
                    "stage",
                    "set",
                    "no_such_thing",
                    "dual_write",
                    "--reason",
                    "r",
                ],
                2,
                "unknown migration",
            ),
            (
                &[
                    "stage",
                    "set",
                    "user_settings",
                    "dual_write",
                    "--reason",
                    " ",
                ],
                2,
                "reason must not be empty",
            ),
            (
                &["stage", "set", "user_settings", "dual_write"],
                2,
                "--reason",
            ),
            (
                &[
                    "stage",
                    "set",
                    "user_settings",
                    "dual_write",
                    "--reason",
                    "r",
                    "--expect-version",
                    "x",
                ],
                2,
                "invalid value",
            ),
            (
                &["rollback", "no_such_thing", "--reason", "r"],
                2,
                "unknown migration",
            ),
            (&["status", "no_such_thing"], 2, "unknown migration"),
            (
                &[
                    "tune",
                    "user_settings",
                    "--shadow-sample-rate",
                    "2",
                    "--reason",
                    "r",
                ],
                2,
                "outside 0.0..=1.0",
            ),
            (
                &[
                    "tune",
                    "user_settings",
                    "--read-rollout-percent",
                    "101",
                    "--reason",
                    "r",
                ],
                2,
                "101",
            ),
            (
                &["tune", "user_settings", "--reason", "r"],
                2,
                "nothing to change",
            ),
            (&["frobnicate"], 2, "unrecognized subcommand"),
            (&["mismatches", "no_such_thing"], 2, "unknown migration"),
            (
                &["mismatches", "user_settings", "--limit", "0"],
                2,
                "invalid value",
            ),
            (
                &["mismatches", "user_settings", "--limit", "-3"],
                2,
                "unexpected argument",
            ),
        ];
        for (args, code, needle) in cases {
            let run = twintrack(&url, args);
            assert_eq!(run.code, *code, "{backend} {args:?}: {}", run.stderr);
            assert!(
                run.stderr.contains(needle),
                "{backend} {args:?}: {}",
                run.stderr
            );
        }
        assert_eq!(
            detail(&url)["state"],
            before["state"],
            "{backend}: state unchanged"
        );
        assert_eq!(audit_len(&url), n, "{backend}: audit unchanged");

        // --force is allowed, and audited as forced with the refusal it overrode.
        let forced = twintrack(
            &url,
            &[
                "stage",
                "set",
                "user_settings",
                "shadow",
                "--reason",
                "drill",
                "--force",
            ],
        );
        assert_eq!(forced.code, 0, "{}", forced.stderr);
        assert!(forced.stdout.contains("FORCED past"));
        let entry = &detail(&url)["audit"][0];
        assert_eq!(entry["forced"], true);
        assert!(entry["overridden"].as_str().unwrap().contains("refused"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_stage_in_the_table_is_reported_not_obeyed() {
    for (backend, url, _guard) in common::backends().await {
        assert_eq!(twintrack(&url, &["init"]).code, 0);
        let db = twintrack::Database::connect(&url).await.unwrap();
        twintrack::db::query(
            "UPDATE twintrack_flags SET stage = 'Live!' WHERE migration = 'user_settings'",
        )
        .execute(&db)
        .await
        .unwrap();
        let status = twintrack(&url, &["status"]);
        assert_eq!(status.code, 0);
        assert!(
            status.stdout.contains("INVALID: invalid stage \"Live!\""),
            "{backend}: {}",
            status.stdout
        );
        let set = twintrack(
            &url,
            &[
                "stage",
                "set",
                "user_settings",
                "dual_write",
                "--reason",
                "r",
            ],
        );
        // The table's state, not the caller's input: a runtime failure (5), never 2.
        assert_eq!(set.code, 5, "{backend}: {}", set.stderr);
        assert!(set.stderr.contains("--force"), "{}", set.stderr);
    }
}

#[test]
fn unreachable_databases_exit_4() {
    for url in [
        "postgres://postgres@127.0.0.1:1/nothing_listens_here",
        "sqlite:///nonexistent-dir/twintrack/x.db",
    ] {
        for args in [
            &["init"][..],
            &["status"],
            &["stage", "set", "user_settings", "live", "--reason", "r"],
        ] {
            let run = twintrack(url, args);
            assert_eq!(run.code, 4, "{url} {args:?}: {}", run.stderr);
            assert!(
                run.stderr.contains("cannot reach the database"),
                "{}",
                run.stderr
            );
        }
    }
}

#[test]
fn bad_setup_is_exit_2_and_writes_nothing() {
    let (dir, url) = common::sqlite_db();
    // No database URL at all.
    let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .env_remove("DATABASE_URL")
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--database-url"));

    // A bad URL scheme.
    let run = twintrack("oracle://localhost/x", &["status"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("unsupported database URL scheme"));

    // A config with an unsafe identifier: init refuses before creating anything.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[migration]]\nname = \"m\"\nlegacy_table = \"users; drop table users\"\nlegacy_key = \"id\"\nnew_table = \"n\"\nnew_key = \"id\"\n",
    )
    .unwrap();
    let run = twintrack(&url, &["--config", bad.to_str().unwrap(), "init"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("invalid SQL identifier"),
        "{}",
        run.stderr
    );
    let status = twintrack(&url, &["status"]);
    assert_eq!(status.code, 2);
    assert!(
        status.stderr.contains("run `twintrack init` first"),
        "{}",
        status.stderr
    );

    // A missing config named explicitly.
    let run = twintrack(&url, &["--config", "/no/such/twintrack.toml", "init"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("cannot read /no/such/twintrack.toml"));

    // A flags file that is missing, not JSON, or not a flagd document: exit 2, named.
    assert_eq!(sh(&url, "init").code, 0);
    let not_json = dir.path().join("not.json");
    std::fs::write(&not_json, "{\"flags\": ").unwrap();
    let not_flagd = dir.path().join("array.json");
    std::fs::write(&not_flagd, "[1, 2]").unwrap();
    for (file, says) in [
        (PathBuf::from("/no/such/flags.json"), "No such file"),
        (not_json, "not JSON"),
        (not_flagd, "flagd file"),
    ] {
        let run = twintrack(&url, &["--flags-file", file.to_str().unwrap(), "status"]);
        assert_eq!(run.code, 2, "{file:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(says) && run.stderr.contains(file.to_str().unwrap()),
            "{file:?}: {}",
            run.stderr
        );
    }
}
