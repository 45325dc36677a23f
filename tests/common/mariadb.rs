//! A real MariaDB primary with a GTID replica one second behind, for tests.
//!
//! - [`shared`] starts one pair per test binary (a few seconds) and hands each test a fresh
//!   database on it ([`Cluster::fresh_db`]). Both servers are stopped and their directory
//!   removed when the test process exits, however it exits: a watchdog process waits for it.
//! - The primary writes a row-based binary log (`--log-bin`, `--binlog-format=ROW`,
//!   `--server-id=1`); the replica (`--server-id=2`) replicates it with
//!   `MASTER_USE_GTID=slave_pos, MASTER_DELAY=1`: a real apply delay of one second.
//! - `MARIADB_URL` in the environment (`mysql://user:password@host:port`) takes precedence:
//!   fresh databases are then created on that server (no replica).
//! - Without MariaDB, [`shared`] returns `None` after a loud notice, or panics when
//!   `TWINTRACK_REQUIRE_MARIADB=1` (CI sets it).
//!
//! Servers run as the `mysql` user when the tests run as root (as `mariadbd` requires).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A database made for one test, on the primary and (after the apply delay) the replica.
#[derive(Clone, Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub replica_urls: Vec<String>,
}

/// Where the servers are: self-provisioned, or given by the environment.
pub struct Cluster {
    /// `mysql://tt:tt@127.0.0.1:PORT` (no database).
    pub primary_url: String,
    pub replica_urls: Vec<String>,
    /// The primary's and the replica's sockets, for setup as root (self-provisioned only).
    sockets: Option<(PathBuf, PathBuf)>,
}

static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The per-binary pair, or `None` (after a loud notice) when there is no MariaDB here.
pub fn shared() -> Option<&'static Cluster> {
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("MARIADB_URL") {
                return Some(Cluster {
                    primary_url: url.trim_end_matches('/').to_owned(),
                    replica_urls: Vec::new(),
                    sockets: None,
                });
            }
            match Cluster::provision() {
                Ok(cluster) => Some(cluster),
                Err(why) => {
                    if std::env::var("TWINTRACK_REQUIRE_MARIADB").as_deref() == Ok("1") {
                        panic!("TWINTRACK_REQUIRE_MARIADB=1 but MariaDB cannot run here: {why}");
                    }
                    eprintln!(
                        "\n\n!!!!!!!! SKIPPING MARIADB TESTS: {why}\n!!!!!!!! (set TWINTRACK_REQUIRE_MARIADB=1 to make this a failure)\n"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// A fresh database on the shared pair, or `None` when there is no MariaDB here.
pub async fn fresh_db() -> Option<TestDb> {
    let cluster = shared()?;
    Some(cluster.fresh_db().await)
}

impl Cluster {
    /// A fresh database, created on the primary and, once the replica has replayed it (about
    /// a second: its apply delay), there too.
    pub async fn fresh_db(&self) -> TestDb {
        let name = format!(
            "tt_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let sql = format!("CREATE DATABASE {name}");
        match &self.sockets {
            Some((primary, replica)) => {
                client(primary, &sql).expect("create test database");
                let position = output(primary, "SELECT @@gtid_binlog_pos").expect("GTID position");
                let waited = output(
                    replica,
                    &format!("SELECT MASTER_GTID_WAIT('{position}', 30)"),
                )
                .expect("wait for the replica");
                assert_eq!(waited, "0", "the replica did not replay {position} in 30 s");
            }
            None => {
                let db = twintrack::Database::connect(&self.primary_url)
                    .await
                    .expect("connect to MARIADB_URL");
                twintrack::db::Query::assert_safe(sql)
                    .execute(&db)
                    .await
                    .expect("create test database");
            }
        }
        TestDb {
            url: format!("{}/{name}", self.primary_url),
            replica_urls: self
                .replica_urls
                .iter()
                .map(|u| format!("{u}/{name}"))
                .collect(),
            name,
        }
    }

    /// Stops the replica the hard way (`SIGKILL`), as a crash or a cut network would: for a
    /// test binary of its own, as every later test of the binary finds it gone.
    /// Self-provisioned pairs only.
    pub fn kill_replica(&self) {
        let Some((_, replica)) = &self.sockets else {
            panic!("MARIADB_URL servers are not stopped by tests");
        };
        let pid = std::fs::read_to_string(replica.with_file_name("pid")).expect("replica pid");
        let status = Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -9 {pid}");
    }

    fn provision() -> Result<Cluster, String> {
        let daemon = find("mariadbd", &["/usr/sbin/mariadbd", "/usr/bin/mariadbd"])?;
        let install = find(
            "mariadb-install-db",
            &[
                "/usr/bin/mariadb-install-db",
                "/usr/scripts/mariadb-install-db",
            ],
        )?;
        let as_mysql = is_root();
        let dir = tempfile::Builder::new()
            .prefix("twintrack-mariadb-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        if as_mysql {
            run(Command::new("chown").args(["-R", "mysql:mysql"]).arg(&dir))?;
        }
        let user = if as_mysql {
            "mysql".to_owned()
        } else {
            String::from_utf8_lossy(
                &Command::new("whoami")
                    .output()
                    .map_err(|e| e.to_string())?
                    .stdout,
            )
            .trim()
            .to_owned()
        };
        spawn_watchdog(&dir)?;
        let (primary_port, replica_port) = (free_port()?, free_port()?);
        let primary = dir.join("primary");
        let replica = dir.join("replica");
        for (data, port, server_id) in [(&primary, primary_port, 1), (&replica, replica_port, 2)] {
            run(Command::new(&install)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--user={user}"))
                .arg("--auth-root-authentication-method=normal")
                .stdout(Stdio::null()))?;
            let log = data.with_extension("log");
            Command::new(&daemon)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .arg(format!("--user={user}"))
                .arg(format!("--port={port}"))
                .arg("--bind-address=127.0.0.1")
                .arg(format!("--socket={}", data.join("sock").display()))
                .arg(format!("--pid-file={}", data.join("pid").display()))
                .arg(format!("--log-error={}", log.display()))
                // Its own temporary files beside its data: /tmp is shared with everything else.
                .arg(format!("--tmpdir={}", data.display()))
                .arg("--log-bin=mb")
                .arg(format!("--server-id={server_id}"))
                .arg("--binlog-format=ROW")
                // `TWINTRACK_MARIADB_BUFFER_POOL` (e.g. `1G`) for benchmarks on big tables.
                .arg(format!(
                    "--innodb-buffer-pool-size={}",
                    std::env::var("TWINTRACK_MARIADB_BUFFER_POOL").unwrap_or_else(|_| "64M".into())
                ))
                .arg("--innodb-flush-log-at-trx-commit=2")
                .arg("--skip-name-resolve")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("start mariadbd: {e}"))?;
            wait_for(&data.join("sock"), &log)?;
        }
        // The anonymous users `mariadb-install-db` creates shadow `tt@'%'` from 127.0.0.1.
        let hostname = String::from_utf8_lossy(
            &Command::new("hostname")
                .output()
                .map_err(|e| e.to_string())?
                .stdout,
        )
        .trim()
        .to_owned();
        // Users on each server, kept out of the binary log (the replica has its own).
        let setup = format!(
            "SET SESSION sql_log_bin = 0;
             DROP USER IF EXISTS ''@'localhost'; DROP USER IF EXISTS ''@'{hostname}';
             CREATE USER 'tt'@'%' IDENTIFIED BY 'tt'; GRANT ALL ON *.* TO 'tt'@'%' WITH GRANT OPTION;
             CREATE USER 'repl'@'%' IDENTIFIED BY 'repl'; GRANT REPLICATION SLAVE ON *.* TO 'repl'@'%';"
        );
        let (primary_socket, replica_socket) = (primary.join("sock"), replica.join("sock"));
        client(&primary_socket, &setup)?;
        client(&replica_socket, &setup)?;
        client(
            &replica_socket,
            &format!(
                "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={primary_port},
                 MASTER_USER='repl', MASTER_PASSWORD='repl', MASTER_USE_GTID=slave_pos, MASTER_DELAY=1;
                 START SLAVE;"
            ),
        )?;
        Ok(Cluster {
            primary_url: format!("mysql://tt:tt@127.0.0.1:{primary_port}"),
            replica_urls: vec![format!("mysql://tt:tt@127.0.0.1:{replica_port}")],
            sockets: Some((primary_socket, replica_socket)),
        })
    }
}

/// Runs `sql` as root over `socket` with the `mariadb` client.
fn client(socket: &Path, sql: &str) -> Result<(), String> {
    let out = Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", socket.display()))
        .args(["-u", "root", "-e", sql])
        .output()
        .map_err(|e| format!("mariadb client: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mariadb client: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The first column of the first row of `sql`, run as root over `socket`, as text.
fn output(socket: &Path, sql: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .arg("--no-defaults")
        .arg(format!("--socket={}", socket.display()))
        .args(["-u", "root", "-N", "-B", "-e", sql])
        .output()
        .map_err(|e| format!("mariadb client: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "mariadb client: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Waits (up to 30 s) until the server answers on `socket`.
fn wait_for(socket: &Path, log: &Path) -> Result<(), String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if socket.exists() && client(socket, "SELECT 1").is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "mariadbd did not start: {}",
        std::fs::read_to_string(log).unwrap_or_default()
    ))
}

/// Stops both servers and removes `dir` when this process exits.
fn spawn_watchdog(dir: &Path) -> Result<(), String> {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
         for p in {dir}/*/pid; do kill -9 $(cat $p) 2>/dev/null; done; \
         sleep 0.5; rm -rf {dir}",
        pid = std::process::id(),
        dir = dir.display(),
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("watchdog: {e}"))
}

fn find(name: &str, candidates: &[&str]) -> Result<PathBuf, String> {
    candidates
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| format!("no {name} (install mariadb-server)"))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("free port: {e}"))?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}
