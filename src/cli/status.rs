//! `twintrack status [MIGRATION]`

use std::process::ExitCode;

use serde::Serialize;

use super::output::format_micros;
use super::{Env, Output};
use crate::flags::source::current_hold;
use crate::flags::{AuditEntry, FlagStore, Hold, MigrationRecord, SqlFlagStore, StageSource};
use crate::transition::{self, Verdict};
use crate::{Error, Stage};

#[derive(Serialize)]
struct Row {
    migration: String,
    stage: Option<Stage>,
    version: Option<i64>,
    #[serde(with = "crate::util::rfc3339::option")]
    updated_at: Option<i64>,
    updated_by: Option<String>,
    reason: Option<String>,
    shadow_sample_rate: Option<f64>,
    read_rollout_percent: Option<u8>,
    /// Set when the stored row does not parse.
    invalid: Option<String>,
    /// With `--flags-file`: the stage the flag source wants that the rules refuse.
    held: Option<Hold>,
}

#[derive(Serialize)]
struct Move {
    to: Stage,
    allowed: bool,
    refusal: Option<String>,
}

#[derive(Serialize)]
struct Detail {
    #[serde(flatten)]
    record: MigrationRecord,
    moves: Vec<Move>,
    /// With `--flags-file`: the stage the flag source wants that the rules refuse.
    held: Option<Hold>,
    audit: Vec<AuditEntry>,
}

pub(crate) async fn run(
    env: &Env,
    out: &Output,
    migration: Option<&str>,
) -> Result<ExitCode, Error> {
    let store = SqlFlagStore::new(env.database().await?);
    let source = env.stage_source().await?;
    let source = source.as_deref();
    match migration {
        None => list(&store, source, out).await,
        Some(name) => detail(&store, source, out, name).await,
    }
}

/// The hold of `migration` under `source`, if any.
async fn hold(
    store: &SqlFlagStore,
    source: Option<&dyn StageSource>,
    migration: &str,
) -> Result<Option<Hold>, Error> {
    match source {
        Some(source) => current_hold(source, store, migration).await,
        None => Ok(None),
    }
}

async fn list(
    store: &SqlFlagStore,
    source: Option<&dyn StageSource>,
    out: &Output,
) -> Result<ExitCode, Error> {
    let mut rows: Vec<Row> = store
        .load_all()
        .await?
        .into_iter()
        .map(|loaded| match loaded.state {
            Ok(s) => Row {
                migration: loaded.migration,
                stage: Some(s.stage),
                version: Some(s.version),
                updated_at: Some(s.updated_at),
                updated_by: Some(s.updated_by),
                reason: Some(s.reason),
                shadow_sample_rate: Some(s.shadow_sample_rate),
                read_rollout_percent: s.read_rollout_percent,
                invalid: None,
                held: None,
            },
            Err(problem) => Row {
                migration: loaded.migration,
                stage: None,
                version: None,
                updated_at: None,
                updated_by: None,
                reason: None,
                shadow_sample_rate: None,
                read_rollout_percent: None,
                invalid: Some(problem),
                held: None,
            },
        })
        .collect();
    for row in rows.iter_mut().filter(|r| r.invalid.is_none()) {
        row.held = hold(store, source, &row.migration).await?;
    }
    out.print(&rows, || {
        if rows.is_empty() {
            return "no migrations registered (run `twintrack init`)".into();
        }
        let mut text = format!(
            "{:<24} {:<12} {:>7}  {:<20}  {:<16} REASON",
            "MIGRATION", "STAGE", "VERSION", "UPDATED", "BY"
        );
        for r in &rows {
            match &r.invalid {
                Some(problem) => {
                    text.push_str(&format!("\n{:<24} INVALID: {problem}", r.migration))
                }
                None => text.push_str(&format!(
                    "\n{:<24} {:<12} {:>7}  {:<20}  {:<16} {}",
                    r.migration,
                    r.stage.map(|s| s.as_str()).unwrap_or("-"),
                    r.version.unwrap_or_default(),
                    format_micros(r.updated_at.unwrap_or_default()),
                    r.updated_by.as_deref().unwrap_or("-"),
                    r.reason.as_deref().unwrap_or("-"),
                )),
            }
            if let Some(held) = &r.held {
                text.push_str(&format!("\n{:<24} HELD: {held}", ""));
            }
        }
        text
    });
    Ok(ExitCode::SUCCESS)
}

async fn detail(
    store: &SqlFlagStore,
    source: Option<&dyn StageSource>,
    out: &Output,
    name: &str,
) -> Result<ExitCode, Error> {
    let record = store.get(name).await?;
    let held = hold(store, source, name).await?;
    let audit = store.audit_log(name, 10).await?;
    let moves = Stage::ALL
        .into_iter()
        .filter(|to| *to != record.state.stage)
        .map(
            |to| match transition::check(name, record.state.stage, to, &record.evidence) {
                Verdict::Refused(r) => Move {
                    to,
                    allowed: false,
                    refusal: Some(format!("{}; {}", r.reason, r.remedy)),
                },
                _ => Move {
                    to,
                    allowed: true,
                    refusal: None,
                },
            },
        )
        .collect();
    let detail = Detail {
        record,
        moves,
        held,
        audit,
    };
    out.print(&detail, || {
        let s = &detail.record.state;
        let e = &detail.record.evidence;
        let when = |t: Option<i64>| t.map(format_micros).unwrap_or_else(|| "never".into());
        let mut text = format!(
            "{}: {} (version {})\n  last change: {} by {}: {}\n  shadow sample rate: {}, read rollout: {}\n  backfill finished: {}\n  verify clean: {}\n  reverse sync: {}",
            s.migration,
            s.stage,
            s.version,
            format_micros(s.updated_at),
            s.updated_by,
            s.reason,
            s.shadow_sample_rate,
            s.read_rollout_percent
                .map(|p| format!("{p}%"))
                .unwrap_or_else(|| "all".into()),
            when(e.backfill_finished_at),
            when(e.verify_clean_at),
            when(e.reverse_synced_at),
        );
        if let Some(held) = &detail.held {
            text.push_str(&format!("\n  HELD: {held}"));
        }
        text.push_str("\n  moves:");
        for m in &detail.moves {
            match &m.refusal {
                None => text.push_str(&format!("\n    -> {:<12} allowed", m.to.as_str())),
                Some(why) => text.push_str(&format!("\n    -> {:<12} refused: {why}", m.to.as_str())),
            }
        }
        text.push_str("\n  recent changes:");
        for a in &detail.audit {
            text.push_str(&format!(
                "\n    {} {:<10} {} -> {} by {}{}: {}",
                format_micros(a.at),
                a.action,
                a.from_stage.as_deref().unwrap_or("-"),
                a.to_stage.as_deref().unwrap_or("-"),
                a.actor,
                if a.forced { " (FORCED)" } else { "" },
                a.reason
            ));
        }
        text
    });
    Ok(ExitCode::SUCCESS)
}
