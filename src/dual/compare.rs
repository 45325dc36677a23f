//! Comparing a read's two values and classifying a mismatch: the one place that decides
//! `match`, `transient` or `confirmed`, counts it, and records it.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use serde::Serialize;
use tracing::Instrument as _;

use super::read::{Pair, Reading, Subject};
use super::{ConnOf, DualStore, KeyOf, Operation, Resync};
use crate::context::random_key;
use crate::db::now_micros;
use crate::shadow::{MismatchClass, NewMismatch, cap_diff, spawn_recorder};
use crate::{Result, Side, Stage};

/// One side's value, as compared, and how long its read took.
pub(super) struct Observed {
    pub(super) value: serde_json::Value,
    pub(super) took: Duration,
}

impl Observed {
    pub(super) fn of<T: Serialize>(value: &T, took: Duration) -> Observed {
        Observed {
            value: to_value(value),
            took,
        }
    }
}

/// Whether this read is compared, for a sample rate between 0 (never) and 1 (always).
pub(super) fn sampled(rate: f64) -> bool {
    let unit = (random_key() >> 11) as f64 / (1u64 << 53) as f64; // uniform in [0, 1)
    rate >= 1.0 || (rate > 0.0 && unit < rate)
}

fn to_value<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

impl<R, X> DualStore<R, X>
where
    R: ?Sized + Send + Sync + 'static,
    X: Resync<R>,
{
    /// Counts a failed or panicked shadow read, returns the served value (or its error), and on
    /// a pair of values compares them, classifying a mismatch off the caller's path.
    pub(super) fn serve_and_compare<T, F>(
        &self,
        key: &Subject<'_, KeyOf<R, X>>,
        stage: Stage,
        pair: Pair<T>,
        op: Arc<F>,
    ) -> Result<T>
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T> + 'static,
    {
        let Pair {
            served,
            served_result,
            shadow,
            shadow_result,
        } = pair;
        let shadow_value = match shadow_result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                tracing::warn!(migration = %self.inner.migration, key = %key.text(), side = %shadow, error = %err, "shadow read failed");
                self.count_shadow_error(shadow);
                None
            }
            Err(_panic) => {
                tracing::error!(migration = %self.inner.migration, key = %key.text(), side = %shadow, "shadow read panicked");
                self.count_shadow_error(shadow);
                None
            }
        };
        let (value, served_took) = match served_result {
            Ok(v) => v,
            Err(err) => {
                self.count_shadow_error(served);
                return Err(err);
            }
        };
        if let Some((other, shadow_took)) = shadow_value {
            let served_read = Observed::of(&value, served_took);
            let shadow_read = Observed::of(&other, shadow_took);
            // A mismatch is classified off the request's path (a second look after a delay).
            if let Some(classify) = self.clone().compare_or_classify_later(
                key,
                stage,
                served,
                served_read,
                shadow_read,
                op,
            ) {
                tokio::spawn(classify);
            }
        }
        Ok(value)
    }

    /// Compares; on a mismatch returns the classification work (re-read and record), to be run
    /// off the caller's path.
    pub(super) fn compare_or_classify_later<T, F>(
        self,
        key: &Subject<'_, KeyOf<R, X>>,
        stage: Stage,
        served: Side,
        served_read: Observed,
        shadow_read: Observed,
        op: Arc<F>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static>
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T> + 'static,
    {
        let (legacy, new) = match served {
            Side::Legacy => (served_read, shadow_read),
            Side::New => (shadow_read, served_read),
        };
        let span = tracing::info_span!(
            "twintrack.shadow.compare",
            "otel.name" = format!("shadow compare {}", self.inner.migration),
            "twintrack.migration" = %self.inner.migration,
            "twintrack.stage" = %stage,
            "twintrack.read_from" = %served,
            "twintrack.shadow.result" = tracing::field::Empty,
        );
        let compared = span.in_scope(|| {
            self.inner
                .shadow
                .comparison
                .compare(&legacy.value, &new.value)
        });
        if compared.is_ok() {
            span.record("twintrack.shadow.result", "match");
            self.count_result("match");
            return None;
        }
        let Ok(permit) = self.inner.classifying.clone().try_acquire_owned() else {
            // Too many re-checks in flight already: count it, do not pile up more work.
            span.record("twintrack.shadow.result", "unclassified");
            self.count_result("unclassified");
            return None;
        };
        span.record("twintrack.shadow.result", "mismatch");
        // The second look runs in a task of its own, after `recheck_delay`: a span of its own
        // that follows from the comparison (an OpenTelemetry link), not a child, so the
        // request's span is not held open until it ends.
        let classifying = tracing::info_span!(
            parent: None,
            "twintrack.shadow.classify",
            "otel.name" = format!("shadow classify {}", self.inner.migration),
            "twintrack.migration" = %self.inner.migration,
            "twintrack.shadow.result" = tracing::field::Empty,
        );
        classifying.follows_from(&span);
        let key = key.text();
        Some(
            async move {
                let _permit = permit;
                self.classify(&key, stage, op, micros(legacy.took), micros(new.took))
                    .await
            }
            .instrument(classifying),
        )
    }

    /// The second look: both sides re-read on the primary after a delay; agreeing now is
    /// `transient`, still differing is `confirmed`. Counted and recorded.
    async fn classify<T, F>(&self, key: &str, stage: Stage, op: Arc<F>, legacy_us: i64, new_us: i64)
    where
        T: Serialize + Send + 'static,
        F: Operation<R, ConnOf<R, X>, T>,
    {
        tokio::time::sleep(self.inner.shadow.recheck_delay).await;
        // The second look is on the primary: the truth, whatever served the first. It holds
        // one of the store's bookkeeping permits, never more of the pool than those.
        let Ok(permit) = self.inner.bookkeeping.acquire().await else {
            return;
        };
        // Bounded like a background shadow read, so hung reads cannot hold the permits the
        // recorder needs.
        let reread = tokio::time::timeout(self.inner.shadow.background_timeout, async {
            let legacy = self
                .read_side(&*op, Side::Legacy, stage, Reading::Primary)
                .await;
            let new = self
                .read_side(&*op, Side::New, stage, Reading::Primary)
                .await;
            (legacy, new)
        })
        .await;
        drop(permit);
        let Ok((Ok((legacy, _)), Ok((new, _)))) = reread else {
            tracing::warn!(migration = %self.inner.migration, key, "re-read of a mismatch failed or timed out; not classified");
            return;
        };
        let (class, diff) = match self
            .inner
            .shadow
            .comparison
            .compare(&to_value(&legacy), &to_value(&new))
        {
            Ok(()) => (MismatchClass::Transient, Vec::new()),
            Err(diff) => (MismatchClass::Confirmed, diff),
        };
        self.count_result(class.as_str());
        tracing::Span::current().record("twintrack.shadow.result", class.as_str());
        let mismatch = NewMismatch {
            key: key.to_owned(),
            class,
            stage,
            diff: cap_diff(&diff, self.inner.shadow.max_diff_bytes),
            legacy_micros: legacy_us,
            new_micros: new_us,
            at: now_micros(),
        };
        let recorder = self.inner.recorder.get_or_init(|| {
            let metrics = self.inner.metrics.clone();
            let attr = self.migration_attr();
            spawn_recorder(
                self.inner.db.clone(),
                self.inner.migration.clone(),
                self.inner.shadow.keep,
                self.inner.bookkeeping.clone(),
                move |reason, n| {
                    metrics
                        .get()
                        .shadow_dropped
                        .add(n, &[attr.clone(), KeyValue::new("reason", reason)]);
                },
            )
        });
        if recorder.try_send(mismatch).is_err() {
            self.inner.metrics.get().shadow_dropped.add(
                1,
                &[self.migration_attr(), KeyValue::new("reason", "queue_full")],
            );
        }
    }

    pub(super) fn count_result(&self, result: &'static str) {
        self.inner.stats.shadow(result);
        self.inner
            .metrics
            .get()
            .shadow_results
            .add(1, &[self.migration_attr(), KeyValue::new("result", result)]);
    }

    pub(super) fn count_shadow_error(&self, side: Side) {
        self.inner.metrics.get().shadow_errors.add(
            1,
            &[self.migration_attr(), KeyValue::new("side", side.as_str())],
        );
    }
}
