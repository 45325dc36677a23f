//! Telemetry set-up for binaries: the `twintrack` command and the examples (cargo feature
//! `otlp`). A library never installs globals; a service embedding twintrack installs its own
//! `MeterProvider` before building twintrack's parts (they record through
//! `opentelemetry::global::meter("twintrack")` unless given a [`Metrics`](crate::metrics::Metrics)),
//! and its own `tracing` subscriber: in three lines,
//!
//! ```ignore
//! let provider = SdkMeterProvider::builder().with_periodic_exporter(otlp_exporter).build();
//! opentelemetry::global::set_meter_provider(provider.clone());
//! let flags = FlagCache::builder(store).migration("user_settings", Stage::LegacyOnly).build().await;
//! ```
//!
//! [`init`] does it all for a binary, from the standard OpenTelemetry environment variables:
//!
//! - OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` /
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not `true`:
//!   metrics every `OTEL_METRIC_EXPORT_INTERVAL` ms (default 60,000) and spans in batches,
//!   over `OTEL_EXPORTER_OTLP_PROTOCOL` = `http/protobuf` (the default; `grpc` is refused for
//!   now, with that reason). `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the
//!   resource (the service name defaults to the binary's).
//! - Prometheus `/metrics` from the same meter provider, when asked.
//! - A `tracing` subscriber: logs to stderr filtered by `RUST_LOG`, and every span exported
//!   as an OpenTelemetry span (`tracing-opentelemetry`) when OTLP is on.

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::{Error, Result};

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
/// the `tracing` subscriber (stderr, `RUST_LOG` or `default_filter`). Call it first, before
/// building twintrack's parts.
///
/// Errors: [`Error::Config`] for a bad `OTEL_*` value (an unsupported protocol, an endpoint
/// the exporter refuses).
pub fn init(service: &str, default_filter: &str, prometheus: bool) -> Result<Telemetry> {
    let otlp = otlp_configured();
    if otlp {
        check_protocol()?;
    }
    let resource = resource(service);
    let metric_reader = match otlp {
        true => Some(
            opentelemetry_sdk::metrics::PeriodicReader::builder(
                opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .build()
                    .map_err(|e| Error::Config(format!("OTLP metric exporter: {e}")))?,
            )
            .build(),
        ),
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
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()
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
    let spans = tracer.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(provider.tracer("twintrack"))
    });
    // A second init in one process (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
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
    /// figures would be lost without it).
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer {
            let _ = tracer.shutdown();
        }
        if let Some(meter) = self.meter {
            let _ = meter.shutdown();
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

/// Checks `OTEL_EXPORTER_OTLP_PROTOCOL` before anything is built: `http/protobuf` (or unset).
fn check_protocol() -> Result<()> {
    match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").ok().as_deref().map(str::trim) {
        None | Some("" | "http/protobuf") => Ok(()),
        Some("grpc") => Err(Error::Config(
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc is not supported yet: use http/protobuf (an OpenTelemetry collector takes both)".into(),
        )),
        Some(other) => Err(Error::Config(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other:?}: expected http/protobuf"
        ))),
    }
}
