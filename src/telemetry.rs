//! Telemetry set-up for binaries: the `twintrack` command and the examples (cargo feature
//! `otlp`). A library never installs globals; a service embedding twintrack installs its own
//! `MeterProvider` whenever it likes (twintrack's parts record through the global provider of
//! the moment, unless given a [`Metrics`](crate::metrics::Metrics) of their own; see
//! [`crate::metrics`]) and its own `tracing` subscriber: in three lines,
//!
//! ```ignore
//! let provider = SdkMeterProvider::builder().with_periodic_exporter(otlp_exporter).build();
//! opentelemetry::global::set_meter_provider(provider.clone());
//! tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(tracer)).init();
//! ```
//!
//! Spans (all `INFO`): `twintrack.dual` per repository call and side, `twintrack.shadow.compare`
//! per compared read and `twintrack.shadow.classify` for its re-check (a root of its own that
//! follows from the comparison: it runs after a delay and must not hold the request's span
//! open), `twintrack.backfill` per run and
//! `twintrack.backfill.batch` per batch, `twintrack.verify` per run and
//! `twintrack.verify.segment` per differing segment looked into, `twintrack.control` per
//! control-plane call (OpenTelemetry's RPC and HTTP server conventions).
//!
//! [`init`] does it all for a binary, from the standard OpenTelemetry environment variables:
//!
//! - OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` /
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not `true`:
//!   metrics every `OTEL_METRIC_EXPORT_INTERVAL` ms (default 60,000) and spans in batches,
//!   over `OTEL_EXPORTER_OTLP_PROTOCOL` = `http/protobuf` (the default) or `grpc` (also per
//!   signal: `OTEL_EXPORTER_OTLP_METRICS_PROTOCOL`, `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`;
//!   `http/json` is refused). `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the
//!   resource (the service name defaults to the binary's). gRPC needs a Tokio runtime: call
//!   [`init`] inside one.
//! - Prometheus `/metrics` from the same meter provider, when asked.
//! - A `tracing` subscriber: logs to stderr filtered by `RUST_LOG`, and every span exported
//!   as an OpenTelemetry span (`tracing-opentelemetry`) when OTLP is on.

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::{Error, Result};

/// How long [`Telemetry::shutdown`] waits for the exporters.
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// What [`init`] installed; [`Telemetry::shutdown`] flushes it at exit.
#[derive(Debug)]
pub struct Telemetry {
    meter: Option<SdkMeterProvider>,
    tracer: Option<SdkTracerProvider>,
    #[cfg(feature = "prometheus")]
    prometheus: Option<crate::metrics::PrometheusExporter>,
}

/// Installs, for a binary named `service`: the global meter provider (Prometheus when
/// `prometheus`, OTLP when configured), the global tracer provider (OTLP when configured) and
/// the `tracing` subscriber (stderr, `RUST_LOG` or `default_filter`). Call it first, inside
/// the Tokio runtime (the gRPC exporter's connection lives there).
///
/// Errors: [`Error::Config`] for a bad `OTEL_*` value (an unsupported protocol, an endpoint
/// the exporter refuses).
pub fn init(service: &str, default_filter: &str, prometheus: bool) -> Result<Telemetry> {
    let otlp = otlp_configured();
    if otlp {
        refuse_tls_endpoints()?;
    }
    let (metrics_protocol, traces_protocol) = match otlp {
        true => (protocol("METRICS")?, protocol("TRACES")?),
        false => (Protocol::Http, Protocol::Http),
    };
    let resource = resource(service);
    let metric_reader = match otlp {
        true => {
            let exporter = opentelemetry_otlp::MetricExporter::builder();
            let exporter = match metrics_protocol {
                Protocol::Http => exporter.with_http().build(),
                Protocol::Grpc => exporter.with_tonic().build(),
            }
            .map_err(|e| Error::Config(format!("OTLP metric exporter: {e}")))?;
            Some(opentelemetry_sdk::metrics::PeriodicReader::builder(exporter).build())
        }
        false => None,
    };
    // One meter provider: Prometheus's when asked (OTLP as its second reader), else OTLP's.
    #[cfg(feature = "prometheus")]
    let (prometheus, meter) = match prometheus {
        true => {
            let exporter =
                crate::metrics::PrometheusExporter::with_reader(metric_reader, resource.clone())?;
            let provider = exporter.provider();
            (Some(exporter), Some(provider))
        }
        false => (None, own_provider(metric_reader, &resource)),
    };
    #[cfg(not(feature = "prometheus"))]
    let meter = match prometheus {
        true => {
            return Err(Error::Config(
                "Prometheus asked for, but built without the `prometheus` feature".into(),
            ));
        }
        false => own_provider(metric_reader, &resource),
    };
    if let Some(meter) = &meter {
        opentelemetry::global::set_meter_provider(meter.clone());
    }
    let tracer = match otlp {
        true => {
            let exporter = opentelemetry_otlp::SpanExporter::builder();
            let exporter = match traces_protocol {
                Protocol::Http => exporter.with_http().build(),
                Protocol::Grpc => exporter.with_tonic().build(),
            }
            .map_err(|e| Error::Config(format!("OTLP span exporter: {e}")))?;
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_tracer_provider(provider.clone());
            Some(provider)
        }
        false => None,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    // Spans are exported at INFO whatever the log's filter says (RUST_LOG=warn must not
    // silence traces), except the exporter's own transport's, which would feed back.
    let spans = tracer.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::filter::{LevelFilter, Targets};
        let exported = Targets::new().with_default(LevelFilter::INFO).with_targets(
            [
                "h2",
                "hyper",
                "hyper_util",
                "tonic",
                "tower",
                "reqwest",
                "opentelemetry",
            ]
            .map(|target| (target, LevelFilter::OFF)),
        );
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("twintrack"))
            .with_filter(exported)
    });
    // A second init in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(spans)
        .try_init();
    Ok(Telemetry {
        meter,
        tracer,
        #[cfg(feature = "prometheus")]
        prometheus,
    })
}

impl Telemetry {
    /// The Prometheus exporter, when [`init`] was asked for one.
    #[cfg(feature = "prometheus")]
    pub fn prometheus(&self) -> Option<&crate::metrics::PrometheusExporter> {
        self.prometheus.as_ref()
    }

    /// Whether OTLP export is on.
    pub fn otlp(&self) -> bool {
        self.tracer.is_some()
    }

    /// Exports what is pending and stops the exporters (at exit; a short-lived command's
    /// figures would be lost without it), waiting at most [`SHUTDOWN_WAIT`]: a collector that
    /// does not answer must not hold a process's exit up (after SIGTERM, Kubernetes kills it
    /// 30 s later); what it has not taken by then is dropped, with a warning.
    pub fn shutdown(self) {
        let (done, finished) = std::sync::mpsc::channel();
        let (tracer, meter) = (self.tracer, self.meter);
        std::thread::spawn(move || {
            if let Some(tracer) = tracer {
                let _ = tracer.shutdown();
            }
            if let Some(meter) = meter {
                let _ = meter.shutdown();
            }
            let _ = done.send(());
        });
        if finished.recv_timeout(SHUTDOWN_WAIT).is_err() {
            tracing::warn!(
                "the OTLP exporters did not finish within {SHUTDOWN_WAIT:?}; exiting without what they had pending"
            );
        }
    }
}

fn own_provider(
    reader: Option<opentelemetry_sdk::metrics::PeriodicReader<opentelemetry_otlp::MetricExporter>>,
    resource: &Resource,
) -> Option<SdkMeterProvider> {
    reader.map(|reader| {
        SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource.clone())
            .build()
    })
}

/// Whether the environment asks for OTLP export.
fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    !disabled
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The resource: `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` (the SDK's detectors), the
/// service name defaulting to `service`.
fn resource(service: &str) -> Resource {
    let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty());
    let builder = Resource::builder();
    match named {
        true => builder.build(),
        false => builder.with_service_name(service.to_owned()).build(),
    }
}

/// Refuses an `https://` OTLP endpoint: the exporters are built without TLS, and would fail
/// every export quietly. A collector (or agent) reached over plain HTTP on the host or in the
/// pod is the supported set-up for now.
fn refuse_tls_endpoints() -> Result<()> {
    for name in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        if let Ok(value) = std::env::var(name)
            && value.trim().to_ascii_lowercase().starts_with("https://")
        {
            return Err(Error::Config(format!(
                "{name}={value:?}: twintrack's OTLP exporters are built without TLS; export to a collector over http:// (one beside the service, which may forward over TLS)"
            )));
        }
    }
    Ok(())
}

/// An OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// `http/protobuf`: protobuf bodies POSTed to `{endpoint}/v1/metrics`, `/v1/traces`.
    Http,
    /// `grpc`: the collector's gRPC services at the endpoint.
    Grpc,
}

/// The protocol of one signal (`METRICS` or `TRACES`), read before anything is built:
/// `OTEL_EXPORTER_OTLP_{signal}_PROTOCOL`, else `OTEL_EXPORTER_OTLP_PROTOCOL`, else
/// `http/protobuf` (the specification's default).
fn protocol(signal: &str) -> Result<Protocol> {
    let specific = format!("OTEL_EXPORTER_OTLP_{signal}_PROTOCOL");
    let (name, value) = [specific.as_str(), "OTEL_EXPORTER_OTLP_PROTOCOL"]
        .into_iter()
        .find_map(|name| {
            let value = std::env::var(name).ok()?;
            (!value.trim().is_empty()).then(|| (name.to_owned(), value))
        })
        .unwrap_or_else(|| (String::new(), "http/protobuf".into()));
    match value.trim() {
        "http/protobuf" => Ok(Protocol::Http),
        "grpc" => Ok(Protocol::Grpc),
        other => Err(Error::Config(format!(
            "{name}={other:?}: expected http/protobuf or grpc"
        ))),
    }
}
