//! The admin page's charts, drawn server-side as inline SVG from the per-minute figures every
//! process writes ([`crate::stats`]): per migration, the shadow mismatch rate by class and the
//! write latency by side over the last [`WINDOW_MINUTES`], and the newest forward backfill's
//! progress over its run. Each chart carries its figures in words too (`summary`), for screen
//! readers and for tests.

use std::collections::BTreeMap;

use crate::Result;
use crate::backfill::RunStatus;
use crate::db::{Database, now_micros};
use crate::stats::{self, Figures, Series};

/// The minutes the rate and latency charts cover, ending with the current one.
pub(crate) const WINDOW_MINUTES: i64 = 60;

const MINUTE: i64 = 60_000_000;

// The plot area inside the SVG's 360 × 140 view box.
const LEFT: f64 = 44.0;
const RIGHT: f64 = 352.0;
const TOP: f64 = 8.0;
const BOTTOM: f64 = 112.0;

/// One chart.
pub(crate) struct Chart {
    /// The element id: `chart-{kind}-{migration}`.
    pub(crate) id: String,
    pub(crate) title: String,
    /// The figures in words.
    pub(crate) summary: String,
    pub(crate) lines: Vec<Line>,
    pub(crate) ticks: Vec<Tick>,
    /// The x axis' ends.
    pub(crate) from: String,
    pub(crate) to: String,
}

/// One line of a chart.
pub(crate) struct Line {
    pub(crate) name: String,
    pub(crate) color: &'static str,
    pub(crate) dashed: bool,
    /// SVG `points`: `x,y x,y …`.
    pub(crate) points: String,
    /// The same points, each drawn as a dot (a minute alone draws no line).
    pub(crate) dots: Vec<(String, String)>,
}

/// A horizontal grid line and its label.
pub(crate) struct Tick {
    pub(crate) y: String,
    pub(crate) label: String,
}

/// The three charts of `migration`; `forward` is its newest forward backfill run.
pub(crate) async fn charts(
    db: &Database,
    migration: &str,
    forward: Option<&RunStatus>,
) -> Result<Vec<Chart>> {
    let to = stats::minute_of(now_micros());
    let from = to - (WINDOW_MINUTES - 1) * MINUTE;
    let shadow = stats::read(db, migration, Series::Shadow, from).await?;
    let writes = stats::read(db, migration, Series::Write, from).await?;
    let mut out = vec![
        mismatch_rate(migration, &shadow, from, to),
        write_latency(migration, &writes, from, to),
    ];
    if let Some(run) = forward {
        let start = stats::minute_of(run.started_at);
        let figures = stats::read(db, migration, Series::Backfill, start).await?;
        out.push(backfill_progress(
            migration,
            run,
            figures.get(&run.run_id.to_string()),
            to,
        ));
    }
    Ok(out)
}

/// The classes a comparison can end in, with their colours; `match` is the rest.
const CLASSES: [(&str, &str); 3] = [
    ("confirmed", "#cf222e"),
    ("transient", "#bf8700"),
    ("unclassified", "#6e7781"),
];

/// Mismatches of each class as a percentage of comparisons, per minute (`skipped` reads were
/// not compared and count in neither).
fn mismatch_rate(
    migration: &str,
    shadow: &BTreeMap<String, BTreeMap<i64, Figures>>,
    from: i64,
    to: i64,
) -> Chart {
    let count = |label: &str, minute: i64| {
        shadow
            .get(label)
            .and_then(|by| by.get(&minute))
            .map_or(0, |f| f.count)
    };
    let compared = |minute: i64| {
        count("match", minute) + CLASSES.iter().map(|(c, _)| count(c, minute)).sum::<u64>()
    };
    let minutes: Vec<i64> = (0..WINDOW_MINUTES).map(|i| from + i * MINUTE).collect();
    let total: u64 = minutes.iter().map(|&m| compared(m)).sum();
    let mut lines = Vec::new();
    let mut words = Vec::new();
    for (class, color) in CLASSES {
        let points: Vec<(i64, f64)> = minutes
            .iter()
            .filter(|&&m| compared(m) > 0)
            .map(|&m| (m, 100.0 * count(class, m) as f64 / compared(m) as f64))
            .collect();
        let n: u64 = minutes.iter().map(|&m| count(class, m)).sum();
        words.push(format!("{class} {} ({n})", percent(n, total)));
        lines.push((class.to_owned(), color, false, points));
    }
    let summary = if total == 0 {
        format!("no shadow comparisons in the last {WINDOW_MINUTES} minutes")
    } else {
        format!(
            "{total} comparisons in the last {WINDOW_MINUTES} minutes: {}",
            words.join(", ")
        )
    };
    draw(
        format!("chart-mismatches-{migration}"),
        "Shadow mismatch rate by class (% of comparisons)",
        summary,
        ("%", None),
        (from, to),
        lines,
    )
}

/// p50 (dashed) and p99 of each side's writes per minute, in milliseconds.
fn write_latency(
    migration: &str,
    writes: &BTreeMap<String, BTreeMap<i64, Figures>>,
    from: i64,
    to: i64,
) -> Chart {
    let mut lines = Vec::new();
    let mut words = Vec::new();
    for (side, color) in [("legacy", "#0969da"), ("new", "#1a7f37")] {
        let Some(by_minute) = writes.get(side) else {
            continue;
        };
        let mut all = Figures::default();
        for figures in by_minute.values() {
            all.add(figures);
        }
        for (q, name, dashed) in [(0.5, "p50", true), (0.99, "p99", false)] {
            let points: Vec<(i64, f64)> = by_minute
                .iter()
                .filter_map(|(&m, f)| Some((m, 1000.0 * stats::percentile(&f.buckets, q)?)))
                .collect();
            lines.push((format!("{side} {name}"), color, dashed, points));
        }
        let ms = |q| stats::percentile(&all.buckets, q).map_or(0.0, |s| 1000.0 * s);
        words.push(format!(
            "{side} p50 {:.2} ms, p99 {:.2} ms ({} writes)",
            ms(0.5),
            ms(0.99),
            all.count
        ));
    }
    let summary = if words.is_empty() {
        format!("no writes in the last {WINDOW_MINUTES} minutes")
    } else {
        format!("last {WINDOW_MINUTES} minutes: {}", words.join("; "))
    };
    draw(
        format!("chart-latency-{migration}"),
        "Write latency by side (ms; p99, p50 dashed)",
        summary,
        ("ms", None),
        (from, to),
        lines,
    )
}

/// The run's keys done as a percentage of its keys, per minute from its start: counted back
/// from where it stands now, so the line ends at the run's true figure even when minutes of it
/// were not recorded (a process that could not write them, figures older than a day).
fn backfill_progress(
    migration: &str,
    run: &RunStatus,
    figures: Option<&BTreeMap<i64, Figures>>,
    now: i64,
) -> Chart {
    let start = stats::minute_of(run.started_at);
    let end = match run.finished_at {
        Some(at) if at > 0 => stats::minute_of(at).max(start),
        _ => now.max(start),
    };
    let total = run.keys_total.max(1) as f64;
    let empty = BTreeMap::new();
    let figures = figures.unwrap_or(&empty);
    // Where the run stood before its first recorded minute: what it has done now, less what
    // the recorded minutes did.
    let recorded: u64 = figures.values().map(|f| f.count).sum();
    let mut done = (run.keys_done.max(0) as u64).saturating_sub(recorded);
    // By the end of each minute (drawn at the next one's start, the last at `end`); a later
    // point for the same time replaces an earlier one.
    let mut by_time: BTreeMap<i64, f64> = BTreeMap::from([(start, 100.0 * done as f64 / total)]);
    for (&minute, f) in figures {
        done += f.count;
        by_time.insert((minute + MINUTE).min(end), 100.0 * done as f64 / total);
    }
    by_time.insert(end, 100.0 * run.keys_done.max(0) as f64 / total);
    let points: Vec<(i64, f64)> = by_time.into_iter().collect();
    let state = match run.finished_at {
        Some(at) if at > 0 => "finished",
        Some(_) => "abandoned",
        None => "running",
    };
    let summary = format!(
        "run {} ({state}): {} of {} keys ({}), {} rows copied",
        run.run_id,
        run.keys_done,
        run.keys_total,
        percent(run.keys_done.max(0) as u64, run.keys_total.max(0) as u64),
        run.rows_copied
    );
    draw(
        format!("chart-backfill-{migration}"),
        "Backfill progress (% of keys)",
        summary,
        ("%", Some(100.0)),
        (start, end.max(start + MINUTE)),
        vec![("keys done".to_owned(), "#8250df", false, points)],
    )
}

/// `n` of `of` as a percentage with two decimals (`0%` of nothing).
fn percent(n: u64, of: u64) -> String {
    if of == 0 {
        return "0%".into();
    }
    format!("{:.2}%", 100.0 * n as f64 / of as f64)
}

type Points = (String, &'static str, bool, Vec<(i64, f64)>);

/// Lays out `lines` over minutes `x` (from, to) and from 0 up to `y`'s fixed top, or a round
/// figure above their largest value; `y` also names the unit.
fn draw(
    id: String,
    title: &str,
    summary: String,
    y: (&str, Option<f64>),
    x: (i64, i64),
    lines: Vec<Points>,
) -> Chart {
    let (unit, fixed) = y;
    let largest = lines
        .iter()
        .flat_map(|(_, _, _, p)| p.iter().map(|&(_, v)| v))
        .fold(0.0_f64, f64::max);
    let top = fixed.unwrap_or_else(|| round_up(largest));
    let span = (x.1 - x.0).max(1) as f64;
    let x_of = |m: i64| LEFT + (RIGHT - LEFT) * (m - x.0) as f64 / span;
    let y_of = |v: f64| BOTTOM - (BOTTOM - TOP) * (v / top).clamp(0.0, 1.0);
    let ticks = (0..=4)
        .map(|i| {
            let v = top * f64::from(i) / 4.0;
            Tick {
                y: format!("{:.1}", y_of(v)),
                label: format!("{}{unit}", trim(v)),
            }
        })
        .collect();
    let lines = lines
        .into_iter()
        .filter(|(_, _, _, points)| !points.is_empty())
        .map(|(name, color, dashed, points)| {
            let dots: Vec<(String, String)> = points
                .iter()
                .map(|&(m, v)| (format!("{:.1}", x_of(m)), format!("{:.1}", y_of(v))))
                .collect();
            Line {
                name,
                color,
                dashed,
                points: dots
                    .iter()
                    .map(|(x, y)| format!("{x},{y}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                dots,
            }
        })
        .collect();
    Chart {
        id,
        title: title.to_owned(),
        summary,
        lines,
        ticks,
        from: clock(x.0),
        to: clock(x.1),
    }
}

/// The smallest of 1, 2, 5 × 10ⁿ at or above `v` (1 for nothing).
fn round_up(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let scale = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * scale)
        .find(|&c| c >= v * (1.0 - 1e-12))
        .unwrap_or(10.0 * scale)
}

/// A tick label: no trailing zeros.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// `HH:MM` (UTC) of a minute.
fn clock(at: i64) -> String {
    let minutes = at.div_euclid(MINUTE).rem_euclid(24 * 60);
    format!("{:02}:{:02} UTC", minutes / 60, minutes % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(count: u64) -> Figures {
        Figures {
            count,
            ..Figures::default()
        }
    }

    #[test]
    fn the_mismatch_rate_is_each_class_over_the_comparisons_of_its_minute() {
        let from = 1_000 * MINUTE;
        let to = from + (WINDOW_MINUTES - 1) * MINUTE;
        let mut shadow: BTreeMap<String, BTreeMap<i64, Figures>> = BTreeMap::new();
        shadow
            .entry("match".into())
            .or_default()
            .insert(to, figures(90));
        shadow
            .entry("confirmed".into())
            .or_default()
            .insert(to, figures(10));
        shadow
            .entry("skipped".into())
            .or_default()
            .insert(to, figures(500));
        let chart = mismatch_rate("m", &shadow, from, to);
        assert_eq!(
            chart.summary,
            "100 comparisons in the last 60 minutes: confirmed 10.00% (10), transient 0.00% (0), unclassified 0.00% (0)"
        );
        // 10% on a 0–10% axis: the top of the plot, at the right edge.
        assert_eq!(chart.lines[0].points, "352.0,8.0");
        assert_eq!(chart.ticks.last().unwrap().label, "10%");
    }

    #[test]
    fn backfill_progress_counts_back_from_where_the_run_stands() {
        let run = RunStatus {
            run_id: 7,
            direction: "forward".into(),
            lower_bound: None,
            upper_bound: None,
            keys_done: 800,
            keys_total: 1000,
            rows_copied: 800,
            started_at: 10 * MINUTE + 5,
            finished_at: None,
        };
        // 100 keys before the figures start; 300 in minute 10, 300 in 11, 100 so far in 12.
        let by_minute: BTreeMap<i64, Figures> = [
            (10 * MINUTE, figures(300)),
            (11 * MINUTE, figures(300)),
            (12 * MINUTE, figures(100)),
        ]
        .into();
        let chart = backfill_progress("m", &run, Some(&by_minute), 12 * MINUTE);
        assert_eq!(
            chart.summary,
            "run 7 (running): 800 of 1000 keys (80.00%), 800 rows copied"
        );
        // 10% at 10:00, 40% at 11:00, 80% now (12:00) — on a 0–100% axis.
        let y = |pct: f64| format!("{:.1}", BOTTOM - (BOTTOM - TOP) * pct / 100.0);
        assert_eq!(
            chart.lines[0].points,
            format!("44.0,{} 198.0,{} 352.0,{}", y(10.0), y(40.0), y(80.0))
        );
    }

    #[test]
    fn axes_end_at_round_figures() {
        assert_eq!(round_up(0.0), 1.0);
        assert_eq!(round_up(3.2), 5.0);
        assert_eq!(round_up(0.013), 0.02);
        assert_eq!(round_up(100.0), 100.0);
        assert_eq!(trim(2.5), "2.5");
        assert_eq!(trim(10.0), "10");
        assert_eq!(clock(61 * MINUTE), "01:01 UTC");
    }
}
