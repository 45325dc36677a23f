//! Shared test helpers: real databases (PostgreSQL pair in [`pg`], MariaDB pair in
//! [`mariadb`], SQLite files) and a TCP proxy that can cut a connection the way a network
//! failure would.
#![allow(dead_code)]

pub mod mariadb;
pub mod pg;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A fresh SQLite database file in a temp dir (removed when the returned guard drops).
pub fn sqlite_db() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("test.db").display());
    (dir, url)
}

/// The database URLs a test runs on: SQLite always, PostgreSQL when available.
pub async fn backends() -> Vec<(&'static str, String, Option<tempfile::TempDir>)> {
    let (dir, sqlite) = sqlite_db();
    let mut all = vec![("sqlite", sqlite, Some(dir))];
    if let Some(db) = pg::fresh_db().await {
        all.push(("postgres", db.url, None));
    }
    if let Some(only) = only_backends() {
        all.retain(|(backend, _, _)| only.iter().any(|b| b == backend));
    }
    all
}

/// [`backends`], and MariaDB when available.
pub async fn backends_with_mariadb() -> Vec<(&'static str, String, Option<tempfile::TempDir>)> {
    let mut all = backends().await;
    if only_backends().is_none_or(|only| only.contains(&"mariadb".to_owned()))
        && let Some(db) = mariadb::fresh_db().await
    {
        all.push(("mariadb", db.url, None));
    }
    all
}

/// One database and key type a guarantee runs on: SQLite with `bigint` and text keys,
/// PostgreSQL (when available) with `bigint` and UUID keys. Each gets a database of its own.
pub struct Shape {
    /// `sqlite`, `postgres` or `mariadb`.
    pub backend: &'static str,
    /// `i64`, `text` or `uuid`.
    pub key: &'static str,
    pub url: String,
    /// The test's replicas of `url` (PostgreSQL).
    pub replica_urls: Vec<String>,
    pub guard: Option<tempfile::TempDir>,
}

impl Shape {
    /// `backend/key`, for assertion messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.backend, self.key)
    }
}

/// Every [`Shape`] a guarantee runs on (PostgreSQL ones only when a server is available).
pub async fn shapes() -> Vec<Shape> {
    let mut all = Vec::new();
    for key in ["i64", "text"] {
        let (dir, url) = sqlite_db();
        all.push(Shape {
            backend: "sqlite",
            key,
            url,
            replica_urls: Vec::new(),
            guard: Some(dir),
        });
    }
    for key in ["i64", "uuid"] {
        if let Some(db) = pg::fresh_db().await {
            all.push(Shape {
                backend: "postgres",
                key,
                url: db.url,
                replica_urls: db.replica_urls,
                guard: None,
            });
        }
    }
    if let Some(only) = only_backends() {
        all.retain(|shape| only.iter().any(|b| b == shape.backend));
    }
    all
}

/// `TWINTRACK_TEST_BACKENDS=mariadb,postgres`: run the per-shape suites on those backends
/// only (for working on one backend; CI runs every one).
fn only_backends() -> Option<Vec<String>> {
    let only = std::env::var("TWINTRACK_TEST_BACKENDS").ok()?;
    Some(only.split(',').map(|b| b.trim().to_owned()).collect())
}

/// [`shapes`], and MariaDB with `bigint`, text (`utf8mb4_nopad_bin`) and `uuid` keys when
/// available.
pub async fn shapes_with_mariadb() -> Vec<Shape> {
    let mut all = shapes().await;
    if only_backends().is_none_or(|only| only.contains(&"mariadb".to_owned())) {
        for key in ["i64", "text", "uuid"] {
            if let Some(db) = mariadb::fresh_db().await {
                all.push(Shape {
                    backend: "mariadb",
                    key,
                    url: db.url,
                    replica_urls: db.replica_urls,
                    guard: None,
                });
            }
        }
    }
    all
}

/// [`each_shape!`] over [`shapes_with_mariadb`].
#[macro_export]
macro_rules! each_shape_with_mariadb {
    ($test:ident $(, $arg:expr)* $(,)?) => {{
        for shape in common::shapes_with_mariadb().await {
            match (shape.backend, shape.key) {
                ("sqlite", "i64") => $test::<sqlx::Sqlite, i64>(shape $(, $arg)*).await,
                ("sqlite", "text") => $test::<sqlx::Sqlite, String>(shape $(, $arg)*).await,
                ("postgres", "i64") => $test::<sqlx::Postgres, i64>(shape $(, $arg)*).await,
                ("postgres", "uuid") => $test::<sqlx::Postgres, uuid::Uuid>(shape $(, $arg)*).await,
                ("mariadb", "i64") => $test::<sqlx::MySql, i64>(shape $(, $arg)*).await,
                ("mariadb", "text") => $test::<sqlx::MySql, String>(shape $(, $arg)*).await,
                ("mariadb", "uuid") => $test::<sqlx::MySql, uuid::Uuid>(shape $(, $arg)*).await,
                other => panic!("no test shape {other:?}"),
            }
        }
    }};
}

/// Runs the generic async fn `$test::<DB, K>(shape, args…)` once per [`Shape`], with the
/// database type and key type it names.
#[macro_export]
macro_rules! each_shape {
    ($test:ident $(, $arg:expr)* $(,)?) => {{
        for shape in common::shapes().await {
            match (shape.backend, shape.key) {
                ("sqlite", "i64") => $test::<sqlx::Sqlite, i64>(shape $(, $arg)*).await,
                ("sqlite", "text") => $test::<sqlx::Sqlite, String>(shape $(, $arg)*).await,
                ("postgres", "i64") => $test::<sqlx::Postgres, i64>(shape $(, $arg)*).await,
                ("postgres", "uuid") => $test::<sqlx::Postgres, uuid::Uuid>(shape $(, $arg)*).await,
                other => panic!("no test shape {other:?}"),
            }
        }
    }};
}

/// A key type the tests make keys of.
pub trait TestKey: twintrack::Key + Ord + std::hash::Hash {
    /// The `n`-th of a set of distinct keys.
    fn nth(n: u64) -> Self;
    /// The column type of a key column, on `backend`.
    fn column(backend: twintrack::Backend) -> &'static str;
    /// An SQL expression making a new random key on `backend`, or `None` when the database
    /// assigns keys (an identity column).
    fn random_sql(backend: twintrack::Backend) -> Option<&'static str>;
}

impl TestKey for i64 {
    fn nth(n: u64) -> i64 {
        n as i64 + 1
    }
    fn column(backend: twintrack::Backend) -> &'static str {
        match backend {
            twintrack::Backend::Postgres | twintrack::Backend::MySql => "BIGINT",
            _ => "INTEGER",
        }
    }
    fn random_sql(_: twintrack::Backend) -> Option<&'static str> {
        None
    }
}

impl TestKey for uuid::Uuid {
    fn nth(n: u64) -> uuid::Uuid {
        // Spread over the whole range, not in insertion order.
        uuid::Uuid::from_u128(u128::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835))
    }
    fn column(_: twintrack::Backend) -> &'static str {
        "UUID"
    }
    fn random_sql(backend: twintrack::Backend) -> Option<&'static str> {
        Some(match backend {
            twintrack::Backend::Postgres => "gen_random_uuid()",
            twintrack::Backend::MySql => "UUID()",
            // A 16-byte blob, as sqlx stores a UUID in SQLite.
            _ => "randomblob(16)",
        })
    }
}

impl TestKey for String {
    fn nth(n: u64) -> String {
        format!("key-{:x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
    fn column(backend: twintrack::Backend) -> &'static str {
        match backend {
            // The collation a text key takes there (byte for byte, no padding).
            twintrack::Backend::MySql => "VARCHAR(64) COLLATE utf8mb4_nopad_bin",
            _ => "TEXT",
        }
    }
    fn random_sql(backend: twintrack::Backend) -> Option<&'static str> {
        Some(match backend {
            twintrack::Backend::Postgres => "md5(random()::text)",
            // Unique per row (`RAND()` repeats across connections seeded alike).
            twintrack::Backend::MySql => "MD5(UUID())",
            _ => "lower(hex(randomblob(8)))",
        })
    }
}

/// A TCP proxy in front of a server. [`Proxy::cut`] drops every connection and refuses new
/// ones, as if the network went away; [`Proxy::restore`] brings it back on the same port.
pub struct Proxy {
    pub addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let proxy = Proxy {
            addr,
            target,
            tasks: Arc::default(),
            acceptor: Mutex::new(None),
        };
        proxy.serve(listener);
        proxy
    }

    /// `url` (a postgres URL) pointed at this proxy instead of its host:port.
    pub fn url_for(&self, url: &str) -> String {
        let target = format!("127.0.0.1:{}", self.target.port());
        assert!(url.contains(&target), "{url} does not point at {target}");
        url.replace(&target, &self.addr.to_string())
    }

    fn serve(&self, listener: TcpListener) {
        let target = self.target;
        let tasks = self.tasks.clone();
        let acceptor = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        *self.acceptor.lock().unwrap() = Some(acceptor);
    }

    pub fn cut(&self) {
        if let Some(a) = self.acceptor.lock().unwrap().take() {
            a.abort();
        }
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    pub async fn restore(&self) {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket.bind(self.addr).unwrap();
        self.serve(socket.listen(128).unwrap());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

/// A meter backed by the SDK's in-memory exporter, to assert on metrics.
pub struct TestMetrics {
    pub provider: SdkMeterProvider,
    pub exporter: InMemoryMetricExporter,
}

impl TestMetrics {
    pub fn new() -> TestMetrics {
        let exporter = InMemoryMetricExporter::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(exporter.clone()).build())
            .build();
        TestMetrics { provider, exporter }
    }

    pub fn metrics(&self) -> twintrack::metrics::Metrics {
        twintrack::metrics::Metrics::new(&self.provider.meter("twintrack"))
    }

    /// The current value of counter `name` for data points whose attributes include `attr`.
    pub fn counter(&self, name: &str, attr: (&str, &str)) -> u64 {
        self.counter_all(name, &[attr])
    }

    /// The current value of counter `name` for data points whose attributes include all of
    /// `attrs`.
    pub fn counter_all(&self, name: &str, attrs: &[(&str, &str)]) -> u64 {
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
        self.provider.force_flush().unwrap();
        let mut latest = 0;
        for rm in self.exporter.get_finished_metrics().unwrap() {
            for sm in rm.scope_metrics() {
                for m in sm.metrics().filter(|m| m.name() == name) {
                    if let AggregatedMetrics::U64(MetricData::Sum(sum)) = m.data() {
                        let total: u64 = sum
                            .data_points()
                            .filter(|dp| {
                                attrs.iter().all(|attr| {
                                    dp.attributes().any(|kv| {
                                        kv.key.as_str() == attr.0 && kv.value.as_str() == attr.1
                                    })
                                })
                            })
                            .map(|dp| dp.value())
                            .sum();
                        // Cumulative temporality: the last export holds the running total.
                        latest = total;
                    }
                }
            }
        }
        latest
    }

    /// The count of f64 histogram `name` over data points whose attributes include all of
    /// `attrs`, and whether those points all have `bounds` as their bucket boundaries.
    pub fn histogram_count(&self, name: &str, attrs: &[(&str, &str)], bounds: &[f64]) -> u64 {
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
        self.provider.force_flush().unwrap();
        let mut latest = 0;
        for rm in self.exporter.get_finished_metrics().unwrap() {
            for sm in rm.scope_metrics() {
                for m in sm.metrics().filter(|m| m.name() == name) {
                    if let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() {
                        latest = h
                            .data_points()
                            .filter(|dp| {
                                attrs.iter().all(|attr| {
                                    dp.attributes().any(|kv| {
                                        kv.key.as_str() == attr.0 && kv.value.as_str() == attr.1
                                    })
                                })
                            })
                            .inspect(|dp| {
                                assert_eq!(dp.bounds().collect::<Vec<_>>(), bounds, "{name}")
                            })
                            .map(|dp| dp.count())
                            .sum();
                    }
                }
            }
        }
        latest
    }

    /// The latest value of u64 gauge `name` for the data point whose attributes include all of
    /// `attrs` (string values).
    pub fn gauge_u64_all(&self, name: &str, attrs: &[(&str, &str)]) -> Option<u64> {
        self.gauge_u64_where(name, |kv| {
            attrs
                .iter()
                .all(|attr| kv.iter().any(|(k, v)| *k == attr.0 && v.as_str() == attr.1))
        })
    }

    /// The latest value of u64 gauge `name` for the data point whose attributes include `attr`.
    pub fn gauge_u64(&self, name: &str, attr: (&str, i64)) -> Option<u64> {
        self.gauge_u64_where(name, |kv| {
            kv.iter()
                .any(|(k, v)| *k == attr.0 && **v == opentelemetry::Value::I64(attr.1))
        })
    }

    fn gauge_u64_where(
        &self,
        name: &str,
        matches: impl Fn(&[(&str, &opentelemetry::Value)]) -> bool,
    ) -> Option<u64> {
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
        self.provider.force_flush().unwrap();
        let mut latest = None;
        for rm in self.exporter.get_finished_metrics().unwrap() {
            for sm in rm.scope_metrics() {
                for m in sm.metrics().filter(|m| m.name() == name) {
                    if let AggregatedMetrics::U64(MetricData::Gauge(gauge)) = m.data() {
                        for dp in gauge.data_points() {
                            let kv: Vec<_> = dp
                                .attributes()
                                .map(|kv| (kv.key.as_str(), &kv.value))
                                .collect();
                            if matches(&kv) {
                                latest = Some(dp.value());
                            }
                        }
                    }
                }
            }
        }
        latest
    }
}

/// The quickstart's migration config, `examples/quickstart.toml`.
pub fn quickstart_config() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/quickstart.toml")
}

/// Runs the `twintrack` binary as `twintrack --database-url URL [--config CONFIG] <line>`
/// (in `cwd`, if given) and returns its exit code and its stdout followed by its stderr.
pub fn twintrack_cli(
    cwd: Option<&std::path::Path>,
    url: &str,
    config: Option<&std::path::Path>,
    line: &str,
) -> (i32, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_twintrack"));
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    cmd.arg("--database-url").arg(url);
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd.args(line.split_whitespace()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The built example `name` (`target/debug/examples/NAME`), built first if need be.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    use std::path::Path;
    // `cargo test --test X` alone does not rebuild examples: make sure this one is current.
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    if !built.iter().any(|b| b == name) {
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", name])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo");
        assert!(status.success(), "building the {name} example failed");
        built.push(name.to_owned());
    }
    // target/debug/deps/TEST-<hash> -> target/debug/examples/NAME
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test` (it builds the examples)",
        path.display()
    );
    path
}

/// One HTTP/1.1 call to `base`, with an optional read-your-writes token: the status, the
/// headers and the JSON body (`Null` when empty).
pub async fn http(
    base: &str,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, http::HeaderMap, serde_json::Value) {
    let headers: Vec<(&str, &str)> = token.map(|t| ("x-twintrack-ryw", t)).into_iter().collect();
    http_with(base, method, path, body, &headers).await
}

/// [`http`] with these request headers; a body that is not JSON comes back as a string.
pub async fn http_with(
    base: &str,
    method: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, http::HeaderMap, serde_json::Value) {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let value = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        })
    };
    (status, headers, value)
}

/// The base URL a started example prints on its first stdout line
/// (`twintrack {name} listening on {base}`); its stdout must be piped.
pub fn listening_base(child: &mut std::process::Child, name: &str) -> String {
    use std::io::BufRead;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix(&format!("twintrack {name} listening on "))
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned()
}

/// Sends `signal` (`-TERM`, `-INT`) to `child` and waits for it to exit (at most 30 s); its
/// exit status and how long it took.
pub async fn signal_and_wait(
    child: &mut std::process::Child,
    signal: &str,
) -> (std::process::ExitStatus, std::time::Duration) {
    let at = std::time::Instant::now();
    let kill = std::process::Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, at.elapsed());
        }
        assert!(
            at.elapsed() < std::time::Duration::from_secs(30),
            "{signal}: still running after 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
