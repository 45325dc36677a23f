//! `twintrack stage set`, `twintrack rollback`, `twintrack tune`

use std::process::ExitCode;

use super::{Env, Output};
use crate::flags::{FlagStore, SqlFlagStore, StageChange, StageOutcome, TuningChange};
use crate::{Error, Stage};

/// The flag store for moving `migration`: with its new shape's database too when it lives
/// apart (its repair intents gate moves onto the legacy side). A new database that cannot be
/// reached is not waited for: the legacy database's own intents are still checked.
async fn store_for(env: &Env, migration: &str) -> Result<SqlFlagStore, Error> {
    let store = SqlFlagStore::new(env.database().await?);
    let config = env.config()?;
    let definition = config.as_ref().and_then(|c| c.migration(migration));
    Ok(match env.new_database(definition, 1).await {
        Ok(Some(new_db)) => store.intents_also_in(new_db),
        Ok(None) => store,
        Err(err) => {
            tracing::warn!(error = %err, "the new database is unreachable; its repair intents are not checked");
            store
        }
    })
}

pub(crate) async fn set(env: &Env, out: &Output, change: StageChange) -> Result<ExitCode, Error> {
    let store = store_for(env, &change.migration).await?;
    let outcome = store.set_stage(change).await?;
    report(out, &outcome);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn rollback(
    env: &Env,
    out: &Output,
    migration: &str,
    reason: &str,
) -> Result<ExitCode, Error> {
    let store = store_for(env, migration).await?;
    let current = store.get(migration).await?.state;
    let Some(target) = current.stage.rollback_target() else {
        out.print(
            &StageOutcome {
                state: current,
                from: Some(Stage::LegacyOnly),
                changed: false,
                overridden: None,
            },
            || format!("{migration} is already at legacy_only: nothing to roll back"),
        );
        return Ok(ExitCode::SUCCESS);
    };
    // Compare-and-set on the version just read: a rollback must not undo a change it never saw.
    let change = StageChange::new(migration, target, env.actor.clone(), reason)
        .expect_version(current.version);
    let outcome = store.set_stage(change).await?;
    report(out, &outcome);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn tune(env: &Env, out: &Output, change: TuningChange) -> Result<ExitCode, Error> {
    let store = SqlFlagStore::new(env.database().await?);
    let state = store.tune(change).await?;
    out.print(&state, || {
        format!(
            "{}: shadow sample rate {}, read rollout {} (version {})",
            state.migration,
            state.shadow_sample_rate,
            state
                .read_rollout_percent
                .map(|p| format!("{p}%"))
                .unwrap_or_else(|| "all".into()),
            state.version
        )
    });
    Ok(ExitCode::SUCCESS)
}

fn report(out: &Output, outcome: &StageOutcome) {
    out.print(outcome, || {
        let s = &outcome.state;
        if !outcome.changed {
            return format!("{} is already at {}: nothing changed", s.migration, s.stage);
        }
        let from = outcome.from.map(|f| f.as_str()).unwrap_or("(invalid)");
        let mut text = format!(
            "{}: {from} -> {} (version {})",
            s.migration, s.stage, s.version
        );
        if let Some(refusal) = &outcome.overridden {
            text.push_str(&format!("\nFORCED past: {refusal}"));
        }
        text
    });
}
