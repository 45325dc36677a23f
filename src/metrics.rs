//! OpenTelemetry instruments, created once per [`Meter`] and shared by the parts that record.
//!
//! twintrack never installs a global provider. By default ([`Metrics::global`]) it records
//! through the meter provider the host has installed globally *at the time of each
//! recording*, so a provider installed after twintrack's parts were built is used from then on
//! (until one is installed, recordings go to OpenTelemetry's no-op provider). Or give the
//! builders [`Metrics::from_provider`] (or [`Metrics::new`] with a [`Meter`]) to route them to a
//! provider of your own. The three lines of a host that exports to a collector:
//!
//! ```ignore
//! let provider = SdkMeterProvider::builder().with_periodic_exporter(MetricExporter::builder().with_http().build()?).build();
//! opentelemetry::global::set_meter_provider(provider.clone()); // or: .metrics(Metrics::from_provider(&provider))
//! // … build the FlagCache, DualStore, ReplicaSet as usual; at exit: provider.shutdown()?;
//! ```
//!
//! In Prometheus (`PrometheusExporter`, or a collector's Prometheus exporter) the dots become
//! underscores, a unit is appended (`_seconds`, `_bytes`) and counters end in `_total`:
//! `db_client_operation_duration_seconds_bucket`, `twintrack_reads_total`. A Grafana dashboard
//! and Prometheus alert rules over them ship in `examples/observability/` (a test checks that
//! every series they name exists).
//!
//! | name | kind | attributes | meaning |
//! |---|---|---|---|
//! | `twintrack.flags.refresh` | counter | `outcome` = `ok`/`error` | flag cache reloads |
//! | `twintrack.flags.stale` | counter | `migration` | a reload failed and the last known value stayed in force |
//! | `twintrack.flags.fallback` | counter | `migration` | no value was ever loaded, the fallback stage is served |
//! | `twintrack.flags.invalid` | counter | `migration` | the stored row did not parse; the last good value stays |
//! | `twintrack.flags.held` | gauge | `migration`, `wanted`, `serving` | 1 while an external flag source wants a stage the transition rules refuse and `serving` is served instead; 0 once it is no longer held |
//! | `twintrack.flags.age` | gauge (s) | `migration` | age of the value in force, after each reload |
//! | `twintrack.dual.operations` | counter | `migration`, `op`, `side`, `outcome` | repository calls by the dual store |
//! | `db.client.operation.duration` | histogram (s; buckets [`DURATION_BUCKETS`], 0.5 ms to 10 s) | `db.system.name` = `postgresql`/`sqlite`/`mariadb`, `db.operation.name` = `get`/`insert`/`update`/`delete`/`write`/…, `twintrack.migration`, `twintrack.side`, and `error.type` on failures (the SQLSTATE or MariaDB error number, else `io`, `pool_timeout`, `tls`, `protocol`, `decode`, `row_not_found`, `_OTHER`) | the latency of each repository call the dual store makes, failed ones included (OpenTelemetry's database client semantic conventions) |
//! | `twintrack.shadow.results` | counter | `migration`, `result` = `match`/`transient`/`confirmed`/`skipped`/`unclassified` | compared reads (`skipped`: over the background cap; `unclassified`: a mismatch over the re-check cap) |
//! | `twintrack.shadow.errors` | counter | `migration`, `side` | compared reads where a side failed (or panicked) |
//! | `twintrack.repair.intents` | counter | `migration`, `event` = `recorded`/`repaired`/`failed` | repair intents |
//! | `twintrack.reads` | counter | `target` = `primary`/`replica`, `pin` = `none`/`wrote_in_request`/`token`/`replica_lagging`/`replica_down`/`replica_conflict`/`migration_rule`/`no_replicas` | routed reads, and why a read went to the primary |
//! | `twintrack.ryw.tokens` | counter | `verdict` = `issued`/`accepted`/`missing`/`oversized`/`garbled`/`forged`/`expired`/`future`/`foreign_cluster` | read-your-writes tokens issued, and incoming ones by verdict |
//! | `twintrack.replica.lag` | gauge (s) | `replica` | replay lag by time, after each poll |
//! | `twintrack.replica.wal_lag` (Prometheus: `twintrack_replica_wal_lag_bytes`) | gauge (By) | `replica` | replay lag in WAL bytes, after each poll |
//! | `twintrack.replica.healthy` | gauge | `replica` | 1 while the replica serves reads, 0 while it is out |
//! | `twintrack.backfill.rows` | counter | `migration`, `direction` | rows written by backfill copies |
//! | `twintrack.backfill.pauses` | counter | `migration` | backfill pauses for replica lag |
//! | `twintrack.verify.runs` | counter | `migration`, `result` = `clean`/`divergent` | verify runs |

use std::sync::{Arc, PoisonError, RwLock};

use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter, MeterProvider};

/// Bucket boundaries (s) of duration histograms: database calls, from a sub-millisecond
/// primary-key read to a 10 s timeout. The SDK's default boundaries (0, 5, 10, 25 … 10,000) are
/// made for milliseconds: in seconds, nearly every call lands in the first bucket.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// `error.type` for an sqlx error (OpenTelemetry's semantic conventions: low cardinality; the
/// database's own code when it has one).
pub(crate) fn error_type(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => db
            .code()
            .map_or_else(|| "database".into(), |c| c.into_owned()),
        sqlx::Error::Io(_) => "io".into(),
        sqlx::Error::PoolTimedOut => "pool_timeout".into(),
        sqlx::Error::PoolClosed => "pool_closed".into(),
        sqlx::Error::Tls(_) => "tls".into(),
        sqlx::Error::Protocol(_) => "protocol".into(),
        sqlx::Error::RowNotFound => "row_not_found".into(),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => "decode".into(),
        _ => "_OTHER".into(),
    }
}

/// Where twintrack's parts record: a fixed set of instruments, or the host's global meter
/// provider looked up at each recording (see the [module docs](self)). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Metrics(Source);

#[derive(Clone, Debug)]
enum Source {
    Fixed(Arc<Instruments>),
    Global,
}

/// The instruments of one meter.
#[derive(Debug)]
pub(crate) struct Instruments {
    pub(crate) flag_refresh: Counter<u64>,
    pub(crate) flag_stale: Counter<u64>,
    pub(crate) flag_fallback: Counter<u64>,
    pub(crate) flag_invalid: Counter<u64>,
    pub(crate) flag_age: Gauge<f64>,
    pub(crate) flag_held: Gauge<u64>,
    pub(crate) dual_ops: Counter<u64>,
    pub(crate) db_duration: Histogram<f64>,
    pub(crate) shadow_results: Counter<u64>,
    pub(crate) shadow_errors: Counter<u64>,
    pub(crate) repair_intents: Counter<u64>,
    pub(crate) reads: Counter<u64>,
    pub(crate) ryw_tokens: Counter<u64>,
    pub(crate) replica_lag: Gauge<f64>,
    pub(crate) replica_lag_bytes: Gauge<u64>,
    pub(crate) replica_healthy: Gauge<u64>,
    pub(crate) backfill_rows: Counter<u64>,
    pub(crate) backfill_pauses: Counter<u64>,
    pub(crate) backfill_retries: Counter<u64>,
    pub(crate) verify_runs: Counter<u64>,
    pub(crate) verify_retries: Counter<u64>,
    pub(crate) shadow_dropped: Counter<u64>,
}

/// The instruments built on the global provider, with the provider they were built on.
type GlobalInstruments = (Arc<dyn MeterProvider + Send + Sync>, Arc<Instruments>);
static GLOBAL: RwLock<Option<GlobalInstruments>> = RwLock::new(None);

/// [`Instruments`] to record into now: borrowed from a fixed set, or the global provider's.
pub(crate) enum Current<'a> {
    Fixed(&'a Instruments),
    Global(Arc<Instruments>),
}

impl std::ops::Deref for Current<'_> {
    type Target = Instruments;
    fn deref(&self) -> &Instruments {
        match self {
            Current::Fixed(i) => i,
            Current::Global(i) => i,
        }
    }
}

impl Metrics {
    /// Instruments on `meter`, fixed.
    pub fn new(meter: &Meter) -> Metrics {
        Metrics(Source::Fixed(Arc::new(Instruments::new(meter))))
    }

    /// Instruments on `provider`'s `twintrack` meter, fixed (the host's provider, not installed
    /// globally).
    pub fn from_provider(provider: &(impl MeterProvider + ?Sized)) -> Metrics {
        Metrics::new(&provider.meter("twintrack"))
    }

    /// The host's global meter provider's `twintrack` meter, looked up at each recording: a
    /// provider installed later (`opentelemetry::global::set_meter_provider`) is used from
    /// then on. Its instruments are built once per installed provider (one shared lock read
    /// and a pointer compare per recording after that).
    pub fn global() -> Metrics {
        Metrics(Source::Global)
    }

    /// The instruments to record into now.
    pub(crate) fn get(&self) -> Current<'_> {
        match &self.0 {
            Source::Fixed(i) => Current::Fixed(i),
            Source::Global => Current::Global(global_instruments()),
        }
    }
}

/// The global provider's instruments, built again when another provider has been installed.
fn global_instruments() -> Arc<Instruments> {
    let provider = opentelemetry::global::meter_provider();
    if let Some((built_on, instruments)) = &*GLOBAL.read().unwrap_or_else(PoisonError::into_inner)
        && Arc::ptr_eq(built_on, &provider)
    {
        return instruments.clone();
    }
    let instruments = Arc::new(Instruments::new(&provider.meter("twintrack")));
    let replaced = GLOBAL
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .replace((provider, instruments.clone()));
    // Dropped outside the lock: the last reference to a replaced SDK provider shuts it down
    // (a final export), which must not hold up every recording thread.
    drop(replaced);
    instruments
}

impl Instruments {
    fn new(meter: &Meter) -> Instruments {
        Instruments {
            flag_refresh: meter
                .u64_counter("twintrack.flags.refresh")
                .with_description("Flag cache reloads from the flag store, by outcome")
                .build(),
            flag_stale: meter
                .u64_counter("twintrack.flags.stale")
                .with_description(
                    "Reloads that failed while a last known value stayed in force, per migration",
                )
                .build(),
            flag_fallback: meter
                .u64_counter("twintrack.flags.fallback")
                .with_description(
                    "Reloads after which a migration still has no loaded value and serves its fallback stage",
                )
                .build(),
            flag_invalid: meter
                .u64_counter("twintrack.flags.invalid")
                .with_description("Stored flag rows that did not parse; the last good value stays")
                .build(),
            flag_held: meter
                .u64_gauge("twintrack.flags.held")
                .with_description(
                    "1 while an external flag source wants a stage the transition rules refuse (the last allowed one is served)",
                )
                .build(),
            flag_age: meter
                .f64_gauge("twintrack.flags.age")
                .with_unit("s")
                .with_description("Age of the flag value in force, measured after each reload")
                .build(),
            dual_ops: meter
                .u64_counter("twintrack.dual.operations")
                .with_description("Repository calls made by the dual store, by side and outcome")
                .build(),
            db_duration: meter
                .f64_histogram("db.client.operation.duration")
                .with_unit("s")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .with_description(
                    "Duration of database client operations (the dual store's repository calls, per side)",
                )
                .build(),
            shadow_results: meter
                .u64_counter("twintrack.shadow.results")
                .with_description("Compared reads by result: match, transient or confirmed")
                .build(),
            shadow_errors: meter
                .u64_counter("twintrack.shadow.errors")
                .with_description("Compared reads in which a side failed or panicked, per side")
                .build(),
            repair_intents: meter
                .u64_counter("twintrack.repair.intents")
                .with_description("Repair intents recorded, repaired and failed")
                .build(),
            reads: meter
                .u64_counter("twintrack.reads")
                .with_description(
                    "Routed reads by target, and the reason a read was pinned to the primary",
                )
                .build(),
            ryw_tokens: meter
                .u64_counter("twintrack.ryw.tokens")
                .with_description("Read-your-writes tokens issued, and incoming ones by verdict")
                .build(),
            replica_lag: meter
                .f64_gauge("twintrack.replica.lag")
                .with_unit("s")
                .with_description("Replica replay lag by time, measured by each poll")
                .build(),
            replica_lag_bytes: meter
                .u64_gauge("twintrack.replica.wal_lag")
                .with_unit("By")
                .with_description("Replica replay lag in WAL bytes, measured by each poll")
                .build(),
            replica_healthy: meter
                .u64_gauge("twintrack.replica.healthy")
                .with_description("1 while the replica serves reads, 0 while it is out of service")
                .build(),
            backfill_rows: meter
                .u64_counter("twintrack.backfill.rows")
                .with_description("Rows written by backfill copies")
                .build(),
            backfill_pauses: meter
                .u64_counter("twintrack.backfill.pauses")
                .with_description("Backfill pauses because a replica lagged past the limit")
                .build(),
            backfill_retries: meter
                .u64_counter("twintrack.backfill.retries")
                .with_description(
                    "Backfill batches retried after a transient error (deadlock, serialization failure, lock timeout, lost connection), by reason",
                )
                .build(),
            verify_runs: meter
                .u64_counter("twintrack.verify.runs")
                .with_description("Verify runs by result: clean or divergent")
                .build(),
            shadow_dropped: meter
                .u64_counter("twintrack.shadow.mismatches_dropped")
                .with_description(
                    "Classified mismatches not recorded, by reason: queue_full (the recorder is behind) or write_failed",
                )
                .build(),
            verify_retries: meter
                .u64_counter("twintrack.verify.retries")
                .with_description(
                    "Verify statements retried after a transient error (lost connection, serialization failure), by reason",
                )
                .build(),
        }
    }
}

#[cfg(feature = "prometheus")]
pub use exporter::PrometheusExporter;

#[cfg(feature = "prometheus")]
mod exporter {
    use opentelemetry::metrics::Meter;

    use super::Metrics;

    /// A Prometheus endpoint for twintrack's (and your own) OpenTelemetry metrics.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// // Once, first thing at start-up (twintrack's parts record through the global meter):
    /// let prometheus = twintrack::metrics::PrometheusExporter::install_global()?;
    /// let app: axum::Router = axum::Router::new(); // your routes
    /// let app = app.merge(prometheus.router()); // GET /metrics, Prometheus text format
    /// # Ok(()) }
    /// ```
    #[derive(Clone)]
    pub struct PrometheusExporter {
        registry: prometheus::Registry,
        provider: opentelemetry_sdk::metrics::SdkMeterProvider,
    }

    impl std::fmt::Debug for PrometheusExporter {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("PrometheusExporter").finish_non_exhaustive()
        }
    }

    impl PrometheusExporter {
        /// An exporter with its own meter provider (not installed globally).
        pub fn new() -> crate::Result<PrometheusExporter> {
            let (registry, builder) = Self::builder()?;
            Ok(PrometheusExporter {
                registry,
                provider: builder.build(),
            })
        }

        fn builder() -> crate::Result<(
            prometheus::Registry,
            opentelemetry_sdk::metrics::MeterProviderBuilder,
        )> {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
                .map_err(|e| crate::Error::Config(format!("Prometheus exporter: {e}")))?;
            let builder =
                opentelemetry_sdk::metrics::SdkMeterProvider::builder().with_reader(exporter);
            Ok((registry, builder))
        }

        /// An exporter whose meter provider also feeds `extra` (OTLP), with `resource`.
        #[cfg(feature = "otlp")]
        pub(crate) fn with_reader<R: opentelemetry_sdk::metrics::reader::MetricReader>(
            extra: Option<R>,
            resource: opentelemetry_sdk::Resource,
        ) -> crate::Result<PrometheusExporter> {
            let (registry, mut builder) = Self::builder()?;
            if let Some(reader) = extra {
                builder = builder.with_reader(reader);
            }
            Ok(PrometheusExporter {
                registry,
                provider: builder.with_resource(resource).build(),
            })
        }

        /// The meter provider behind this exporter.
        pub fn provider(&self) -> opentelemetry_sdk::metrics::SdkMeterProvider {
            self.provider.clone()
        }

        /// An exporter whose meter provider becomes the global one, so [`Metrics::global`] (the
        /// default of every twintrack part) records into it. Call it before building those parts.
        pub fn install_global() -> crate::Result<PrometheusExporter> {
            let exporter = PrometheusExporter::new()?;
            opentelemetry::global::set_meter_provider(exporter.provider.clone());
            Ok(exporter)
        }

        /// twintrack's instruments on this exporter's provider.
        pub fn metrics(&self) -> Metrics {
            use opentelemetry::metrics::MeterProvider as _;
            Metrics::new(&self.provider.meter("twintrack"))
        }

        /// A meter on this exporter's provider, for your own instruments.
        pub fn meter(&self, name: &'static str) -> Meter {
            use opentelemetry::metrics::MeterProvider as _;
            self.provider.meter(name)
        }

        /// Everything recorded so far, in the Prometheus text format.
        pub fn render(&self) -> String {
            use prometheus::Encoder as _;
            let mut out = Vec::new();
            let encoder = prometheus::TextEncoder::new();
            if let Err(e) = encoder.encode(&self.registry.gather(), &mut out) {
                return format!("# error encoding metrics: {e}\n");
            }
            String::from_utf8(out).unwrap_or_default()
        }

        /// `GET /metrics`: read-only, no authentication, Prometheus text format.
        pub fn router<S: Clone + Send + Sync + 'static>(&self) -> axum::Router<S> {
            let exporter = self.clone();
            axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let exporter = exporter.clone();
                    async move {
                        (
                            [(
                                http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            exporter.render(),
                        )
                    }
                }),
            )
        }
    }
}

#[cfg(all(test, feature = "prometheus"))]
mod tests {
    use std::collections::BTreeSet;

    use opentelemetry::KeyValue;

    use super::PrometheusExporter;

    /// Every series name the Prometheus exporter shows once each instrument has recorded, plus
    /// `twintrack serve`'s stage gauge.
    fn exported_names() -> BTreeSet<String> {
        let exporter = PrometheusExporter::new().unwrap();
        let m = exporter.metrics();
        let m = m.get();
        let none: &[KeyValue] = &[];
        for counter in [
            &m.flag_refresh,
            &m.flag_stale,
            &m.flag_fallback,
            &m.flag_invalid,
            &m.dual_ops,
            &m.shadow_results,
            &m.shadow_errors,
            &m.repair_intents,
            &m.reads,
            &m.ryw_tokens,
            &m.backfill_rows,
            &m.backfill_pauses,
            &m.backfill_retries,
            &m.verify_runs,
            &m.verify_retries,
            &m.shadow_dropped,
        ] {
            counter.add(1, none);
        }
        for gauge in [&m.flag_held, &m.replica_lag_bytes, &m.replica_healthy] {
            gauge.record(1, none);
        }
        for gauge in [&m.flag_age, &m.replica_lag] {
            gauge.record(1.0, none);
        }
        m.db_duration.record(0.001, none);
        let mut names: BTreeSet<String> = exporter
            .render()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
            .collect();
        names.insert("twintrack_migration_stage".into());
        names
    }

    /// The series a PromQL expression uses (twintrack's and the semantic conventions'): its
    /// words, leaving out label selectors (`{…}`) and grouping labels (`by (…)`, `without (…)`).
    fn metrics_in(expr: &str) -> Vec<String> {
        let mut kept = String::new();
        let mut rest = expr;
        while let Some(c) = rest.chars().next() {
            let grouping = ["by", "without"].iter().find_map(|kw| {
                let after = rest.strip_prefix(kw)?.trim_start();
                let starts_word = kept.ends_with(|p: char| !p.is_ascii_alphanumeric() && p != '_');
                (starts_word && after.starts_with('(')).then_some(after)
            });
            if let Some(after) = grouping {
                rest = after.split_once(')').map_or("", |(_, r)| r);
            } else if c == '{' {
                rest = rest.split_once('}').map_or("", |(_, r)| r);
            } else {
                kept.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
        kept.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|t| t.starts_with("twintrack_") || t.starts_with("db_client_"))
            .map(str::to_owned)
            .collect()
    }

    fn exprs_in_json(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                        _ => exprs_in_json(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| exprs_in_json(v, out)),
            _ => {}
        }
    }

    /// `examples/observability/`: the Grafana dashboard is JSON, the alert rules are
    /// Prometheus rule YAML, and every series either names is one twintrack exports.
    #[test]
    fn the_dashboard_and_the_alerts_parse_and_name_only_metrics_that_exist() {
        let names = exported_names();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/observability");
        let dashboard: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("grafana-dashboard.json")).unwrap(),
        )
        .expect("the dashboard is JSON");
        let mut exprs = Vec::new();
        exprs_in_json(&dashboard, &mut exprs);
        assert!(exprs.len() >= 8, "{exprs:?}");
        let rules: serde_json::Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("alerts.yml")).unwrap())
                .expect("the alert rules are YAML");
        let mut alerts = 0;
        for group in rules["groups"].as_array().expect("groups") {
            for rule in group["rules"].as_array().expect("rules") {
                assert!(rule["alert"].is_string(), "{rule}");
                assert!(rule["annotations"]["summary"].is_string(), "{rule}");
                exprs.push(rule["expr"].as_str().expect("expr").to_owned());
                alerts += 1;
            }
        }
        assert!(alerts >= 5, "{alerts} alerts");
        for expr in &exprs {
            let used = metrics_in(expr);
            assert!(!used.is_empty(), "no twintrack series in {expr:?}");
            for name in used {
                assert!(
                    names.contains(&name),
                    "{name} (in {expr:?}) is not exported: {names:?}"
                );
            }
        }
    }

    #[test]
    fn a_made_up_series_is_caught() {
        let names = exported_names();
        assert!(
            names.contains("db_client_operation_duration_seconds_bucket"),
            "{names:?}"
        );
        assert!(
            metrics_in("rate(twintrack_no_such_thing_total[5m])")
                .iter()
                .any(|n| !names.contains(n))
        );
        assert_eq!(
            metrics_in(
                "sum by (le, twintrack_side) (rate(db_client_operation_duration_seconds_bucket{twintrack_migration=\"m\"}[5m]))"
            ),
            ["db_client_operation_duration_seconds_bucket"]
        );
    }
}
