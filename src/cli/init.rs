//! `twintrack init`

use std::process::ExitCode;

use serde::Serialize;

use super::{Env, Output};
use crate::Error;
use crate::flags::{FlagStore, SqlFlagStore};

#[derive(Serialize)]
struct InitReport {
    schema_version: i64,
    registered: Vec<String>,
    already_registered: Vec<String>,
}

pub(crate) async fn run(env: &Env, out: &Output) -> Result<ExitCode, Error> {
    // Read the config first: a bad file must fail before anything is written.
    let config = env.config()?;
    let db = env.database().await?;
    crate::schema::install(&db).await?;
    let store = SqlFlagStore::new(db);
    let mut report = InitReport {
        schema_version: crate::schema::SCHEMA_VERSION,
        registered: Vec::new(),
        already_registered: Vec::new(),
    };
    for migration in config.iter().flat_map(|c| &c.migrations) {
        if store.register(&migration.name, &env.actor).await? {
            report.registered.push(migration.name.clone());
        } else {
            report.already_registered.push(migration.name.clone());
        }
    }
    out.print(&report, || {
        let mut text = format!(
            "twintrack tables ready (schema version {})",
            report.schema_version
        );
        if config.is_none() {
            text.push_str("\nno twintrack.toml found: no migrations registered (pass --config)");
        }
        for name in &report.registered {
            text.push_str(&format!("\nregistered {name} at legacy_only"));
        }
        for name in &report.already_registered {
            text.push_str(&format!("\n{name} already registered (left as it is)"));
        }
        text
    });
    Ok(ExitCode::SUCCESS)
}
