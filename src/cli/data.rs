//! `twintrack backfill MIGRATION …` and `twintrack verify MIGRATION …`

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use super::{Env, Output};
use crate::across::CrossCopier;
use crate::backfill::{self, BackfillOptions, Progress};
use crate::config::MigrationConfig;
use crate::definition::Direction;
use crate::flags::SqlFlagStore;
use crate::metrics::Metrics;
use crate::verify::{self, VerifyOptions};
use crate::{Database, Error};

/// The migration's entry in the config file.
fn migration_config(env: &Env, migration: &str) -> Result<MigrationConfig, Error> {
    let config = env.config()?.ok_or_else(|| {
        Error::Config(
            "backfill and verify need the migration's definition: pass --config or create twintrack.toml".into(),
        )
    })?;
    config.migration(migration).cloned().ok_or_else(|| {
        Error::Config(format!(
            "migration {migration:?} is not defined in the config file"
        ))
    })
}

/// The new shape's database when it lives apart from `db` (the same database given twice
/// counts as one), checked to be of the same backend.
async fn apart(
    env: &Env,
    m: &MigrationConfig,
    db: &Database,
    max_connections: u32,
) -> Result<Option<Database>, Error> {
    let Some(new_db) = env.new_database(Some(m), max_connections).await? else {
        return Ok(None);
    };
    if new_db.same_database(db) {
        return Ok(None);
    }
    if new_db.backend() != db.backend() {
        return Err(Error::Config(format!(
            "migration {:?}: the legacy database is {} and the new one {}: both shapes' databases must be of one backend",
            m.name,
            db.backend().as_str(),
            new_db.backend().as_str()
        )));
    }
    Ok(Some(new_db))
}

/// The options of `twintrack backfill`.
pub(crate) struct BackfillArgs {
    pub(crate) batch_size: u32,
    pub(crate) target_chunk_ms: u64,
    pub(crate) max_lag_ms: Option<u64>,
    /// Replica URLs whose lag `max_lag_ms` reads directly.
    pub(crate) replicas: Vec<String>,
    pub(crate) rate: Option<f64>,
    pub(crate) workers: usize,
    pub(crate) reverse: bool,
}

pub(crate) async fn backfill(
    env: &Env,
    out: &Output,
    migration: &str,
    args: BackfillArgs,
) -> Result<ExitCode, Error> {
    let m = migration_config(env, migration)?;
    let db = env.database_with(args.workers as u32 + 2).await?;
    let def = m.definition(db.backend())?;
    let new_db = apart(env, &m, &db, args.workers as u32 + 2).await?;
    let flags = SqlFlagStore::new(db.clone());
    let replicas = match args.max_lag_ms {
        Some(_) if !args.replicas.is_empty() && db.backend() != crate::Backend::Sqlite => Some(
            crate::ryw::ReplicaSet::connect(
                db.clone(),
                &args.replicas,
                crate::ryw::ReplicaOptions::default(),
            )
            .await?,
        ),
        _ => None,
    };
    let options = BackfillOptions {
        direction: if args.reverse {
            Direction::Reverse
        } else {
            Direction::Forward
        },
        batch_size: args.batch_size,
        target_batch_time: Duration::from_millis(args.target_chunk_ms),
        max_lag: args.max_lag_ms.map(Duration::from_millis),
        replicas,
        rate: args.rate,
        workers: args.workers,
        actor: env.actor.clone(),
        ..BackfillOptions::default()
    };
    let bar = std::io::stderr().is_terminal() && !out.is_json();
    let progress = move |p: &Progress| {
        if bar {
            draw(p);
        } else if p.paused {
            // Scripts and logs see pauses too (one line per report while paused).
            eprintln!(
                "paused: {}",
                p.pause_reason
                    .as_deref()
                    .unwrap_or("replica lag over --max-lag-ms")
            );
        }
    };
    let report = match &new_db {
        None => backfill::run(&db, &flags, &def, options, Metrics::global(), progress).await,
        Some(new_db) => {
            // Two databases: each batch read on the source, written to the other database by
            // the definition's `copy_select`; proved before anything is written.
            let kinds = def.key_kinds_across(&db, new_db).await?;
            let (source, target) = match options.direction {
                Direction::Forward => (&db, new_db),
                Direction::Reverse => (new_db, &db),
            };
            let copier = CrossCopier::new(&def, &kinds, options.direction, source, target).await?;
            backfill::run_with(
                source,
                &flags,
                &def,
                options,
                Metrics::global(),
                progress,
                backfill::Copier::Keys(std::sync::Arc::new(copier)),
            )
            .await
        }
    };
    if bar {
        eprintln!();
    }
    let report = report?;
    out.print(&report, || {
        format!(
            "{} {} backfill of {migration}: {} rows copied by this run ({} in total) over {} keys {} in {:.1} s{}{}",
            if report.finished { "finished" } else { "done here; other processes still hold chunks of" },
            report.direction.as_str(),
            report.rows_copied,
            report.run_rows_copied,
            report.keys_done,
            match (&report.lower_bound, &report.upper_bound) {
                (None, None) => "(all of them)".to_owned(),
                (None, Some(hi)) => format!("up to {hi}"),
                (Some(lo), None) => format!("after {lo}"),
                (Some(lo), Some(hi)) => format!("after {lo} up to {hi}"),
            },
            report.elapsed_seconds,
            if report.resumed { " (resumed an interrupted run)" } else { "" },
            if report.paused_seconds > 0.0 {
                format!(", paused {:.1} s for replica lag", report.paused_seconds)
            } else {
                String::new()
            }
        )
    });
    Ok(ExitCode::SUCCESS)
}

fn draw(p: &Progress) {
    let share = if p.keys_total == 0 {
        1.0
    } else {
        p.keys_done as f64 / p.keys_total as f64
    };
    let filled = (share * 30.0).round() as usize;
    let eta = p
        .eta_seconds
        .map_or_else(|| "?".to_owned(), |s| format!("{s:.0}s"));
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r[{}{}] {:5.1}%  {} keys  {} rows  {:.0} keys/s  ETA {eta}  batch {}{}   ",
        "#".repeat(filled.min(30)),
        " ".repeat(30 - filled.min(30)),
        share * 100.0,
        p.keys_done,
        p.rows_copied,
        p.keys_per_second,
        p.batch_size,
        match (&p.paused, &p.pause_reason) {
            (true, Some(why)) => format!("  PAUSED: {why}"),
            (true, None) => "  PAUSED (replica lag)".to_owned(),
            (false, _) => String::new(),
        }
    );
    let _ = err.flush();
}

pub(crate) async fn verify(
    env: &Env,
    out: &Output,
    migration: &str,
    segments: usize,
    repair: bool,
    keys: Vec<String>,
) -> Result<ExitCode, Error> {
    let parallel = 4;
    let m = migration_config(env, migration)?;
    let db = env.database_with(parallel as u32 * 2 + 2).await?;
    let def = m.definition(db.backend())?;
    let new_db = apart(env, &m, &db, parallel as u32 * 2 + 2).await?;
    let flags = SqlFlagStore::new(db.clone());
    let options = VerifyOptions {
        segments,
        parallel,
        repair,
        actor: env.actor.clone(),
        ..VerifyOptions::default()
    };
    let chosen = (!keys.is_empty()).then_some(keys.as_slice());
    let report = verify::run_across(
        &db,
        new_db.as_ref().unwrap_or(&db),
        &flags,
        &def,
        options,
        Metrics::global(),
        chosen,
    )
    .await?;
    out.print(&report, || {
        let mut text = format!(
            "{migration}: {} ({} legacy rows, {} new rows, {} segments, {} differing) in {:.1} s",
            if report.clean { "CLEAN" } else { "DIVERGENT" },
            report.legacy_rows,
            report.new_rows,
            report.segments,
            report.differing_segments,
            report.elapsed_seconds
        );
        for line in report.lines() {
            text.push_str("\n  ");
            text.push_str(&line);
        }
        if !report.repaired.is_empty() {
            text.push_str(&format!("\n  repaired {} keys", report.repaired.len()));
        }
        if report.in_flight > 0 {
            text.push_str(&format!(
                "\n  {} differences were writes in flight (gone on a second look)",
                report.in_flight
            ));
        }
        text
    });
    Ok(if report.clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
