//! Per-minute figures behind the admin page's charts: each process adds up what it did in
//! each minute (dual-write latency by side, shadow comparisons by result, backfill progress)
//! and writes the sums to `twintrack_stats` every [`FLUSH_EVERY`]; `twintrack serve` reads
//! them back over every process.
//!
//! The figures live in the service processes, the page in another one, so they meet in the
//! database twintrack already writes to (the dual store's bookkeeping database, the backfill's
//! flag database). Each writer owns its rows (`instance`: random per dual store or backfill
//! run, so per process) and writes
//! each minute's figures whole (`count`, `total`, the latency buckets), not increments: a
//! flush that fails or is retried never counts twice. One upsert per flush, rows for every
//! `(minute, series, label)` touched since the last one; rows older than [`KEEP_MINUTES`] are
//! deleted by their writers, at most once an hour. A process that exits loses at most the
//! figures since its last flush ([`DualStore::drain`](crate::dual::DualStore::drain) writes
//! them at once).
//!
//! Series (`series` / `label`; `count`; `total`):
//! - `write` / the side (`legacy`, `new`): repository writes; `total` their summed duration in
//!   µs; `buckets` counts per [`crate::metrics::DURATION_BUCKETS`] bound (the last one over
//!   10 s), whence the percentiles ([`percentile`]).
//! - `shadow` / the result (`match`, `transient`, `confirmed`, `unclassified`, `skipped`):
//!   shadow comparisons, as `twintrack.shadow.results` counts them.
//! - `backfill` / the run's id: keys done (`count`) and rows copied (`total`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::Result;
use crate::db::{Backend, Database, Query, now_micros, query};
use crate::metrics::DURATION_BUCKETS;

/// How often a process writes its figures.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// How long figures are kept: a day of minutes.
pub const KEEP_MINUTES: i64 = 24 * 60;

/// Rows a statement writes at most (8 parameters each: far below every backend's limit).
const UPSERT_ROWS: usize = 500;

const MINUTE_MICROS: i64 = 60_000_000;

/// A chart's series.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Series {
    /// Repository writes by side, with latency.
    Write,
    /// Shadow comparisons by result.
    Shadow,
    /// Backfill keys and rows by run.
    Backfill,
}

impl Series {
    /// The name stored in `series`.
    pub fn as_str(self) -> &'static str {
        match self {
            Series::Write => "write",
            Series::Shadow => "shadow",
            Series::Backfill => "backfill",
        }
    }
}

/// One `(minute, series, label)`'s figures.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    /// Writes, comparisons, or keys done.
    pub count: u64,
    /// Their summed duration in µs (writes), or rows copied (backfill).
    pub total: u64,
    /// Latency series only: counts per bucket, `DURATION_BUCKETS.len() + 1` of them.
    pub buckets: Vec<u64>,
}

impl Figures {
    /// Adds `other`'s figures (another process's, another minute's).
    pub fn add(&mut self, other: &Figures) {
        self.count += other.count;
        self.total += other.total;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
    }

    fn buckets_text(&self) -> String {
        self.buckets
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

type Slot = (i64, Series, Cow<'static, str>);

/// One process's figures for one migration, written to `db` (see the module docs). Cheap to
/// clone; recording takes a short lock and never waits on the database.
#[derive(Clone)]
pub(crate) struct Stats {
    shared: Arc<Shared>,
}

struct Shared {
    db: Database,
    /// The pool connections the owner's bookkeeping may hold at once; a flush takes one.
    permits: Option<Arc<tokio::sync::Semaphore>>,
    migration: Arc<str>,
    instance: String,
    state: Mutex<State>,
    /// Held across a flush, so two at once (the flusher's and `drain`'s) never write an
    /// older total after a newer one.
    flushing: tokio::sync::Mutex<()>,
}

/// A slot's figures, how many times they changed, and the change last written.
#[derive(Default)]
struct Kept {
    figures: Figures,
    version: u64,
    written: u64,
}

#[derive(Default)]
struct State {
    slots: HashMap<Slot, Kept>,
    flusher: bool,
    pruned_at: i64,
    /// A failed background write was logged as a warning (later ones at debug level).
    warned: bool,
}

impl Stats {
    /// Figures of `migration`, to be written to `db`; a write holds one of `permits` when
    /// given (a dual store's bookkeeping connections).
    pub(crate) fn new(
        db: Database,
        migration: Arc<str>,
        permits: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Stats {
        Stats {
            shared: Arc::new(Shared {
                db,
                permits,
                migration,
                instance: uuid::Uuid::new_v4().simple().to_string(),
                state: Mutex::default(),
                flushing: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// One repository write on `side` that took `took`.
    pub(crate) fn write(&self, side: &'static str, took: Duration) {
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| took.as_secs_f64() <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.add(
            Series::Write,
            Cow::Borrowed(side),
            1,
            took.as_micros() as u64,
            Some(bucket),
        );
    }

    /// One shadow comparison's `result`.
    pub(crate) fn shadow(&self, result: &'static str) {
        self.add(Series::Shadow, Cow::Borrowed(result), 1, 0, None);
    }

    /// A backfill batch of run `run`: `keys` done, `rows` copied.
    pub(crate) fn backfill(&self, run: i64, keys: u64, rows: u64) {
        self.add(
            Series::Backfill,
            Cow::Owned(run.to_string()),
            keys,
            rows,
            None,
        );
    }

    fn add(
        &self,
        series: Series,
        label: Cow<'static, str>,
        count: u64,
        total: u64,
        bucket: Option<usize>,
    ) {
        let minute = now_micros().div_euclid(MINUTE_MICROS) * MINUTE_MICROS;
        let start = {
            let Ok(mut state) = self.shared.state.lock() else {
                return;
            };
            let kept = state.slots.entry((minute, series, label)).or_default();
            kept.figures.count += count;
            kept.figures.total += total;
            if let Some(bucket) = bucket {
                kept.figures.buckets.resize(DURATION_BUCKETS.len() + 1, 0);
                kept.figures.buckets[bucket] += 1;
            }
            kept.version += 1;
            !std::mem::replace(&mut state.flusher, true)
        };
        if start {
            self.start_flusher();
        }
    }

    /// Writes every [`FLUSH_EVERY`] until the last clone is dropped (outside a runtime: never;
    /// [`Stats::flush`] still writes).
    fn start_flusher(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(FLUSH_EVERY).await;
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                let stats = Stats { shared };
                if let Err(err) = stats.flush().await {
                    let first = stats
                        .shared
                        .state
                        .lock()
                        .is_ok_and(|mut s| !std::mem::replace(&mut s.warned, true));
                    if first {
                        tracing::warn!(migration = %stats.shared.migration, error = %err,
                            "could not write the per-minute figures for the admin page's charts (is the schema current? `twintrack init`); trying again every 10 s");
                    } else {
                        tracing::debug!(error = %err, "could not write the per-minute figures");
                    }
                }
            }
        });
    }

    /// Writes the figures that changed since the last write ([`UPSERT_ROWS`] rows a
    /// statement), and forgets minutes that are over and written, and any older than
    /// [`KEEP_MINUTES`] (so memory stays bounded while writes fail, say before `twintrack
    /// init` made the table). Failing or cancelled, it leaves them to the next try.
    pub(crate) async fn flush(&self) -> Result<()> {
        let _flushing = self.shared.flushing.lock().await;
        let now = now_micros();
        let current = now.div_euclid(MINUTE_MICROS) * MINUTE_MICROS;
        let oldest = current - KEEP_MINUTES * MINUTE_MICROS;
        let (dirty, prune): (Vec<(Slot, Figures, u64)>, bool) = {
            let Ok(mut state) = self.shared.state.lock() else {
                return Ok(());
            };
            state.slots.retain(|(minute, _, _), kept| {
                *minute >= oldest && (kept.version != kept.written || *minute >= current)
            });
            let dirty = state
                .slots
                .iter()
                .filter(|(_, kept)| kept.version != kept.written)
                .map(|(slot, kept)| (slot.clone(), kept.figures.clone(), kept.version))
                .collect();
            let prune = now - state.pruned_at > 60 * MINUTE_MICROS;
            if prune {
                state.pruned_at = now;
            }
            (dirty, prune)
        };
        let _permit = match &self.shared.permits {
            Some(permits) if !dirty.is_empty() || prune => Some(
                permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| crate::Error::Internal("the store is closing".into()))?,
            ),
            _ => None,
        };
        for rows in dirty.chunks(UPSERT_ROWS) {
            self.upsert(rows).await?;
            if let Ok(mut state) = self.shared.state.lock() {
                for (slot, _, version) in rows {
                    if let Some(kept) = state.slots.get_mut(slot) {
                        kept.written = kept.written.max(*version);
                    }
                }
            }
        }
        if prune {
            query("DELETE FROM twintrack_stats WHERE migration = $1 AND minute < $2")
                .bind(&*self.shared.migration)
                .bind(oldest)
                .execute(&self.shared.db)
                .await?;
        }
        Ok(())
    }

    async fn upsert(&self, rows: &[(Slot, Figures, u64)]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut sql = String::from(
            "INSERT INTO twintrack_stats (migration, minute, series, label, instance, count, total, buckets) VALUES ",
        );
        for i in 0..rows.len() {
            let n = i * 8;
            if i > 0 {
                sql.push_str(", ");
            }
            let params: Vec<String> = (1..=8).map(|p| format!("${}", n + p)).collect();
            sql.push_str(&format!("({})", params.join(", ")));
        }
        sql.push_str(match self.shared.db.backend() {
            Backend::MySql => {
                " ON DUPLICATE KEY UPDATE count = VALUES(count), total = VALUES(total), buckets = VALUES(buckets)"
            }
            _ => {
                " ON CONFLICT (migration, minute, series, label, instance) DO UPDATE SET count = excluded.count, total = excluded.total, buckets = excluded.buckets"
            }
        });
        let mut insert = Query::assert_safe(sql);
        for ((minute, series, label), figures, _) in rows {
            insert = insert
                .bind(&*self.shared.migration)
                .bind(*minute)
                .bind(series.as_str())
                .bind(label.as_ref())
                .bind(&self.shared.instance)
                .bind(i64::try_from(figures.count).unwrap_or(i64::MAX))
                .bind(i64::try_from(figures.total).unwrap_or(i64::MAX))
                .bind(figures.buckets_text());
        }
        insert.execute(&self.shared.db).await?;
        Ok(())
    }
}

/// `migration`'s figures of `series` from minute `since` (µs since the epoch) on, summed over
/// every process: by label, then by minute.
pub async fn read(
    db: &Database,
    migration: &str,
    series: Series,
    since: i64,
) -> Result<BTreeMap<String, BTreeMap<i64, Figures>>> {
    let rows = query(
        "SELECT label, minute, count, total, buckets FROM twintrack_stats
         WHERE migration = $1 AND minute >= $2 AND series = $3",
    )
    .bind(migration)
    .bind(since)
    .bind(series.as_str())
    .fetch_all(db)
    .await?;
    let mut out: BTreeMap<String, BTreeMap<i64, Figures>> = BTreeMap::new();
    for row in rows {
        let label: String = row.get_at(0)?;
        let minute: i64 = row.get_at(1)?;
        let buckets: String = row.get_at(4)?;
        let figures = Figures {
            count: u64::try_from(row.get_at::<i64>(2)?).unwrap_or(0),
            total: u64::try_from(row.get_at::<i64>(3)?).unwrap_or(0),
            // Written by twintrack only; a part that does not parse counts as none.
            buckets: buckets
                .split(',')
                .filter(|b| !b.is_empty())
                .map(|b| b.parse().unwrap_or(0))
                .collect(),
        };
        out.entry(label)
            .or_default()
            .entry(minute)
            .or_default()
            .add(&figures);
    }
    Ok(out)
}

/// The `q` quantile (0 to 1) of a latency histogram's `buckets`, in seconds: linear within the
/// bucket it falls in, as Prometheus' `histogram_quantile` does; the largest bound when it
/// falls past it. `None` without samples.
pub fn percentile(buckets: &[u64], q: f64) -> Option<f64> {
    let count: u64 = buckets.iter().sum();
    if count == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * count as f64;
    let mut seen = 0u64;
    for (i, &n) in buckets.iter().enumerate() {
        if n > 0 && (seen + n) as f64 >= rank {
            let Some(&upper) = DURATION_BUCKETS.get(i) else {
                return DURATION_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { DURATION_BUCKETS[i - 1] };
            let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * within);
        }
        seen += n;
    }
    DURATION_BUCKETS.last().copied()
}

/// The start of the minute `at` (µs since the epoch) falls in.
pub fn minute_of(at: i64) -> i64 {
    at.div_euclid(MINUTE_MICROS) * MINUTE_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_within_their_bucket() {
        let mut buckets = vec![0; DURATION_BUCKETS.len() + 1];
        assert_eq!(percentile(&buckets, 0.5), None);
        // 100 samples, all in (0.001, 0.0025].
        buckets[2] = 100;
        let p50 = percentile(&buckets, 0.5).unwrap();
        assert!((p50 - 0.00175).abs() < 1e-9, "{p50}");
        assert!((percentile(&buckets, 1.0).unwrap() - 0.0025).abs() < 1e-12);
        // One more, over the largest bound: p99 stays in the bucket, the maximum is the bound.
        buckets[DURATION_BUCKETS.len()] = 1;
        assert!(percentile(&buckets, 0.99).unwrap() <= 0.0025);
        assert_eq!(percentile(&buckets, 1.0), Some(10.0));
    }

    #[test]
    fn figures_add_up_across_processes() {
        let mut a = Figures {
            count: 2,
            total: 10,
            buckets: vec![1, 1],
        };
        a.add(&Figures {
            count: 3,
            total: 5,
            buckets: vec![0, 1, 2],
        });
        assert_eq!(
            a,
            Figures {
                count: 5,
                total: 15,
                buckets: vec![1, 2, 2]
            }
        );
        assert_eq!(a.buckets_text(), "1,2,2");
        assert_eq!(minute_of(61_000_000), 60_000_000);
        assert_eq!(minute_of(-1), -60_000_000);
    }
}
