//! A real PostgreSQL primary with a lagging streaming replica, for tests.
//!
//! - [`shared`] starts one pair per test binary (about 2 s) and hands each test a fresh database
//!   on it ([`Cluster::fresh_db`]). The pair is stopped and its directory removed when the test
//!   process exits, however it exits: a watchdog process waits for it.
//! - [`Cluster::start`] starts a private pair, stopped on drop (for tests that stop servers).
//! - `DATABASE_URL` / `REPLICA_DATABASE_URLS` in the environment take precedence: fresh
//!   databases are then created on that server.
//! - Without PostgreSQL, [`shared`] returns `None` after a loud notice, or panics when
//!   `TWINTRACK_REQUIRE_POSTGRES=1` (CI sets it).
//!
//! The replica's apply delay defaults to 300 ms (`TWINTRACK_TEST_REPLICA_DELAY_MS`).
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;

/// A database made for one test, on the primary and (after the apply delay) the replicas.
#[derive(Clone, Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub replica_urls: Vec<String>,
}

/// Where the servers are: self-provisioned, or given by the environment.
pub struct Cluster {
    pub primary_url: String,
    pub replica_urls: Vec<String>,
    servers: Option<Servers>,
}

struct Servers {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    primary_data: PathBuf,
    replicas: Vec<ReplicaSpec>,
    pub primary_port: u16,
    stop_on_drop: bool,
    durable: bool,
    /// TLS only (`ssl = on`, `hostssl` entries only), with this CA's certificate.
    tls: Option<PathBuf>,
}

/// One replica of a private cluster: its apply delay and any extra `postgresql.conf` lines.
#[derive(Clone, Debug, Default)]
pub struct ReplicaSpec {
    pub delay_ms: u64,
    pub extra_conf: String,
    data: PathBuf,
    port: u16,
}

impl ReplicaSpec {
    pub fn delayed(delay_ms: u64) -> ReplicaSpec {
        ReplicaSpec {
            delay_ms,
            ..ReplicaSpec::default()
        }
    }

    pub fn with_conf(mut self, conf: &str) -> ReplicaSpec {
        self.extra_conf = conf.to_owned();
        self
    }
}

static SHARED: OnceLock<Option<Cluster>> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The per-binary cluster, or `None` (after a loud notice) when there is no PostgreSQL here.
pub fn shared() -> Option<&'static Cluster> {
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("DATABASE_URL")
                && url.starts_with("postgres")
            {
                let replica_urls = std::env::var("REPLICA_DATABASE_URLS")
                    .map(|s| {
                        s.split(',')
                            .filter(|u| !u.trim().is_empty())
                            .map(|u| u.trim().to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                return Some(Cluster {
                    primary_url: url,
                    replica_urls,
                    servers: None,
                });
            }
            match Cluster::provision(vec![ReplicaSpec::delayed(delay_ms())], false, false) {
                Ok(cluster) => Some(cluster),
                Err(why) => {
                    if std::env::var("TWINTRACK_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                        panic!("TWINTRACK_REQUIRE_POSTGRES=1 but PostgreSQL cannot run here: {why}");
                    }
                    eprintln!(
                        "\n\n!!!!!!!! SKIPPING POSTGRESQL TESTS: {why}\n!!!!!!!! (set TWINTRACK_REQUIRE_POSTGRES=1 to make this a failure)\n"
                    );
                    None
                }
            }
        })
        .as_ref()
}

/// A fresh database on the shared cluster, or `None` when there is no PostgreSQL here.
pub async fn fresh_db() -> Option<TestDb> {
    let cluster = shared()?;
    Some(cluster.fresh_db().await)
}

fn delay_ms() -> u64 {
    std::env::var("TWINTRACK_TEST_REPLICA_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

impl Cluster {
    /// A private primary + replica pair, stopped when dropped.
    pub fn start(replica_delay_ms: u64) -> Result<Cluster, String> {
        Cluster::provision(vec![ReplicaSpec::delayed(replica_delay_ms)], true, false)
    }

    /// A private primary with these replicas, stopped when dropped.
    pub fn start_with(replicas: Vec<ReplicaSpec>) -> Result<Cluster, String> {
        Cluster::provision(replicas, true, false)
    }

    /// [`Cluster::start_with`], or `None` (after a loud notice) without PostgreSQL here;
    /// panics when `TWINTRACK_REQUIRE_POSTGRES=1`.
    pub fn start_or_skip(replicas: Vec<ReplicaSpec>) -> Option<Cluster> {
        match Cluster::start_with(replicas) {
            Ok(cluster) => Some(cluster),
            Err(why) if std::env::var("TWINTRACK_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
                panic!("TWINTRACK_REQUIRE_POSTGRES=1 but PostgreSQL cannot run here: {why}")
            }
            Err(why) => {
                eprintln!("\n!!!!!!!! SKIPPING POSTGRESQL TEST: {why}\n");
                None
            }
        }
    }

    /// A private primary (no replica) that accepts TLS connections only: `ssl = on` with a
    /// server certificate for `localhost` and `127.0.0.1` signed by a throwaway CA made here
    /// (`openssl`), and only `hostssl` entries in `pg_hba.conf`. Its URL asks for
    /// `sslmode=verify-full` against that CA; see [`Cluster::ca_cert`].
    pub fn start_tls() -> Result<Cluster, String> {
        Cluster::provision_with(Vec::new(), true, false, true)
    }

    /// The CA certificate a TLS-only cluster's server certificate is signed by.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.servers.as_ref()?.tls.as_deref()
    }

    /// A private pair with durable commits (`fsync=on`, `synchronous_commit=on`), for
    /// benchmarks whose figures must include the cost of a real commit.
    pub fn start_durable() -> Result<Cluster, String> {
        Cluster::provision(vec![ReplicaSpec::delayed(0)], true, true)
    }

    /// Creates a fresh, empty database and returns its URLs.
    pub async fn fresh_db(&self) -> TestDb {
        let name = format!(
            "tt_{}_{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = sqlx::PgConnection::connect(&self.primary_url)
            .await
            .expect("connect to the test primary");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create test database");
        conn.close().await.ok();
        TestDb {
            url: with_db(&self.primary_url, &name),
            replica_urls: self
                .replica_urls
                .iter()
                .map(|u| with_db(u, &name))
                .collect(),
            name,
        }
    }

    /// Stops the primary (private clusters only).
    pub fn stop_primary(&self) {
        let s = self.servers.as_ref().expect("a self-provisioned cluster");
        s.pg_ctl(&s.primary_data, "stop", &["-m", "fast"]);
    }

    /// Starts the primary again (private clusters only).
    pub fn start_primary(&self) {
        let s = self.servers.as_ref().expect("a self-provisioned cluster");
        s.pg_ctl(&s.primary_data, "start", &[]);
    }

    /// Starts the primary unless it is running (private clusters only).
    pub fn start_primary_if_stopped(&self) {
        let s = self.servers.as_ref().expect("a self-provisioned cluster");
        if !s.running(&s.primary_data) {
            s.pg_ctl(&s.primary_data, "start", &[]);
        }
    }

    /// Starts replica `index` unless it is running (private clusters only).
    pub fn start_replica_if_stopped(&self, index: usize) {
        let s = self.servers.as_ref().expect("a self-provisioned cluster");
        if !s.running(&s.replicas[index].data) {
            s.pg_ctl(&s.replicas[index].data, "start", &[]);
        }
    }

    /// Stops replica `index` (private clusters only).
    pub fn stop_replica(&self, index: usize) {
        let s = self.servers.as_ref().expect("a self-provisioned cluster");
        s.pg_ctl(&s.replicas[index].data, "stop", &["-m", "fast"]);
    }

    /// Starts replica `index` again (private clusters only).
    pub fn start_replica(&self, index: usize) {
        let s = self.servers.as_ref().expect("a self-provisioned cluster");
        s.pg_ctl(&s.replicas[index].data, "start", &[]);
    }

    fn provision(
        replicas: Vec<ReplicaSpec>,
        stop_on_drop: bool,
        durable: bool,
    ) -> Result<Cluster, String> {
        Cluster::provision_with(replicas, stop_on_drop, durable, false)
    }

    fn provision_with(
        mut replicas: Vec<ReplicaSpec>,
        stop_on_drop: bool,
        durable: bool,
        tls: bool,
    ) -> Result<Cluster, String> {
        let bin = find_bin()?;
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("twintrack-pg-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?
            .keep();
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir))?;
        }
        let primary_port = free_port()?;
        for (i, replica) in replicas.iter_mut().enumerate() {
            replica.data = dir.join(format!("replica{i}"));
            replica.port = free_port()?;
        }
        let servers = Servers {
            primary_data: dir.join("primary"),
            replicas,
            dir: dir.clone(),
            bin,
            as_postgres,
            primary_port,
            stop_on_drop,
            durable,
            tls: tls.then(|| dir.join("ca.crt")),
        };
        if !stop_on_drop {
            servers.spawn_watchdog()?;
        }
        servers.init_primary()?;
        for replica in &servers.replicas {
            servers.init_replica(replica)?;
        }
        let url = |port: u16| match &servers.tls {
            Some(ca) => format!(
                "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
                ca.display()
            ),
            None => format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        Ok(Cluster {
            primary_url: url(primary_port),
            replica_urls: servers.replicas.iter().map(|r| url(r.port)).collect(),
            servers: Some(servers),
        })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if self.stop_on_drop {
            for replica in &self.replicas {
                self.pg_ctl_quiet(&replica.data, "stop", &["-m", "immediate"]);
            }
            self.pg_ctl_quiet(&self.primary_data, "stop", &["-m", "immediate"]);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Servers {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn pg_ctl(&self, data: &Path, action: &str, extra: &[&str]) {
        let log = data.with_extension("log");
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(data)
            .arg("-l")
            .arg(log)
            .arg("-w")
            .args(extra)
            .arg(action);
        run(&mut c).unwrap_or_else(|e| panic!("pg_ctl {action}: {e}"));
    }

    fn running(&self, data: &Path) -> bool {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(data).arg("status");
        c.stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn pg_ctl_quiet(&self, data: &Path, action: &str, extra: &[&str]) {
        let mut c = self.command("pg_ctl");
        c.arg("-D").arg(data).arg("-w").args(extra).arg(action);
        let _ = c.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }

    fn init_primary(&self) -> Result<(), String> {
        run(self
            .command("initdb")
            .arg("-D")
            .arg(&self.primary_data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]))?;
        append(
            &self.primary_data.join("postgresql.conf"),
            &format!(
                "port = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = replica\nmax_wal_senders = 10\nfsync = {}\nsynchronous_commit = on\nfull_page_writes = {}\nmax_connections = 200\nwal_keep_size = '256MB'\nshared_buffers = '128MB'\n",
                self.primary_port,
                self.dir.display(),
                if self.durable { "on" } else { "off" },
                if self.durable { "on" } else { "off" },
            ),
        )?;
        append(
            &self.primary_data.join("pg_hba.conf"),
            "host replication all 127.0.0.1/32 trust\n",
        )?;
        if self.tls.is_some() {
            self.make_certificates()?;
            append(
                &self.primary_data.join("postgresql.conf"),
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
            )?;
            // Only local (socket) and TLS connections: a plain TCP connection is refused.
            std::fs::write(
                self.primary_data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .map_err(|e| format!("pg_hba.conf: {e}"))?;
        }
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(&self.primary_data)
            .arg("-l")
            .arg(self.dir.join("primary.log"))
            .args(["-w", "start"]);
        run(&mut c)
    }

    /// A throwaway CA (`ca.crt` in the cluster's directory) and the server's certificate and
    /// key (in the data directory, the key mode 600 and owned by the server's user).
    fn make_certificates(&self) -> Result<(), String> {
        let openssl = |args: &[&str]| {
            run(Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .stdout(Stdio::null()))
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=twintrack test CA",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ])?;
        std::fs::write(
            self.dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .map_err(|e| format!("san.ext: {e}"))?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ])?;
        for file in ["server.crt", "server.key"] {
            std::fs::copy(self.dir.join(file), self.primary_data.join(file))
                .map_err(|e| format!("{file}: {e}"))?;
        }
        let key = self.primary_data.join("server.key");
        run(Command::new("chmod").arg("600").arg(&key))?;
        if self.as_postgres {
            run(Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&key)
                .arg(self.primary_data.join("server.crt")))?;
        }
        Ok(())
    }

    fn init_replica(&self, replica: &ReplicaSpec) -> Result<(), String> {
        run(self
            .command("pg_basebackup")
            .args(["-h", "127.0.0.1", "-p", &self.primary_port.to_string()])
            .args(["-U", "postgres", "-D"])
            .arg(&replica.data)
            .args(["-R", "-X", "stream"]))?;
        append(
            &replica.data.join("postgresql.conf"),
            &format!(
                "port = {}\nrecovery_min_apply_delay = '{}ms'\nhot_standby = on\nhot_standby_feedback = on\n{}\n",
                replica.port, replica.delay_ms, replica.extra_conf
            ),
        )?;
        let mut c = self.command("pg_ctl");
        c.arg("-D")
            .arg(&replica.data)
            .arg("-l")
            .arg(replica.data.with_extension("log"))
            .args(["-w", "start"]);
        run(&mut c)
    }

    /// A detached shell that waits for this test process to end, however it ends, then stops
    /// both servers and removes their directory.
    fn spawn_watchdog(&self) -> Result<(), String> {
        let pg_ctl = self.bin.join("pg_ctl");
        let prefix = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; \
             for r in {dir}/replica*/; do {prefix}{ctl} -D $r stop -m immediate >/dev/null 2>&1; done; \
             {prefix}{ctl} -D {dir}/primary stop -m immediate >/dev/null 2>&1; \
             rm -rf {dir}",
            pid = std::process::id(),
            ctl = pg_ctl.display(),
            dir = self.dir.display(),
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
}

fn find_bin() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("PG_BIN") {
        candidates.push(PathBuf::from(dir));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    for v in ["17", "16", "15", "14"] {
        candidates.push(PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")));
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_basebackup").exists())
        .ok_or_else(|| "no PostgreSQL server binaries (initdb, pg_ctl, pg_basebackup) found; set PG_BIN or install postgresql".into())
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

fn append(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// `url` with its database name replaced by `db`.
fn with_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

/// Waits until `check` returns true, or panics after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
