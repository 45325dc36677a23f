//! TLS to the database, against a PostgreSQL that accepts TLS connections only (`ssl = on`,
//! `hostssl` entries only, a throwaway CA made by the test harness): the CLI and both examples
//! connect with `sslmode=verify-full&sslrootcert=…`; a plain connection is refused by the
//! server and a certificate from another CA by the client, each an exit 4 with the reason.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::pg::Cluster;

fn tls_cluster() -> Option<Cluster> {
    match Cluster::start_tls() {
        Ok(cluster) => Some(cluster),
        Err(why) if std::env::var("TWINTRACK_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("TWINTRACK_REQUIRE_POSTGRES=1 but a TLS PostgreSQL cannot run here: {why}")
        }
        Err(why) => {
            eprintln!("\n!!!!!!!! SKIPPING POSTGRESQL TLS TEST: {why}\n");
            None
        }
    }
}

/// `twintrack --database-url URL ARGS…`: exit code and stdout + stderr.
fn cli(url: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_twintrack"))
        .arg("--database-url")
        .arg(url)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Starts example `name` on `url` and returns it with the base URL it listens on.
fn start(name: &str, url: &str, cwd: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(common::example_binary(name))
        .current_dir(cwd)
        .env("DATABASE_URL", url)
        .env("TWINTRACK_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .env_remove("REPLICA_DATABASE_URLS")
        .env_remove("TWINTRACK_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .rsplit_once(' ')
        .map(|(_, base)| base.to_owned())
        .filter(|b| b.starts_with("http://"))
        .unwrap_or_else(|| panic!("{name} did not start: {line:?}"));
    (child, base)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_and_both_examples_connect_with_verify_full_and_plain_connections_are_refused() {
    let Some(cluster) = tls_cluster() else {
        return;
    };
    let db = cluster.fresh_db().await;
    assert!(db.url.contains("sslmode=verify-full"), "{}", db.url);

    // The CLI.
    let (code, out) = cli(&db.url, &["init"]);
    assert_eq!(code, 0, "{out}");
    let (code, out) = cli(&db.url, &["status"]);
    assert_eq!(code, 0, "{out}");
    // Encrypted without checking the server: allowed too.
    let require = db.url.split('?').next().unwrap().to_owned() + "?sslmode=require";
    let (code, out) = cli(&require, &["status"]);
    assert_eq!(code, 0, "{out}");

    // No encryption: the server refuses, and says why; exit 4.
    let plain = db.url.split('?').next().unwrap().to_owned() + "?sslmode=disable";
    let (code, out) = cli(&plain, &["status"]);
    assert_eq!(code, 4, "{out}");
    assert!(
        out.contains("no pg_hba.conf entry") && out.contains("no encryption"),
        "{out}"
    );

    // A server certificate from a CA other than the one named: the client refuses; exit 4.
    let other = tempfile::tempdir().unwrap();
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
            "-days",
            "1",
            "-subj",
            "/CN=another CA",
        ])
        .current_dir(other.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let wrong_ca = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.url.split('?').next().unwrap(),
        other.path().join("other.crt").display()
    );
    let (code, out) = cli(&wrong_ca, &["status"]);
    assert_eq!(code, 4, "{out}");
    assert!(out.to_lowercase().contains("certificate"), "{out}");

    // Both examples, over verify-full.
    let dir = tempfile::tempdir().unwrap();
    let (qs, base) = start("quickstart", &db.url, dir.path());
    let _qs = Killed(qs);
    let (status, _, user) = common::http(
        &base,
        "POST",
        "/users",
        r#"{"email":"tls@example.com","theme":"dark","notifications_enabled":true}"#,
        None,
    )
    .await;
    assert_eq!(status, 201, "{user}");
    let (status, _, settings) = common::http(
        &base,
        "GET",
        &format!("/users/{}/settings", user["id"]),
        "",
        None,
    )
    .await;
    assert_eq!((status, settings["theme"].as_str()), (200, Some("dark")));

    let (articles, base) = start("articles", &db.url, dir.path());
    let _articles = Killed(articles);
    let (status, _, article) = common::http(
        &base,
        "POST",
        "/articles",
        r#"{"title":"over TLS","body":"b","tags":["tls"]}"#,
        None,
    )
    .await;
    assert_eq!(status, 201, "{article}");
    let (status, _, got) = common::http(
        &base,
        "GET",
        &format!("/articles/{}", article["id"].as_str().unwrap()),
        "",
        None,
    )
    .await;
    assert_eq!(
        (status, got["tags"].clone()),
        (200, serde_json::json!(["tls"]))
    );

    // Either example pointed at the server without TLS stops with exit 4 and the reason.
    for example in ["quickstart", "articles"] {
        let out = Command::new(common::example_binary(example))
            .current_dir(dir.path())
            .env("DATABASE_URL", &plain)
            .env("TWINTRACK_LISTEN", "127.0.0.1:0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{example}: {err}");
        assert!(err.contains("no encryption"), "{example}: {err}");
    }
}
