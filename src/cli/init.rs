//! `twintrack init`

use std::process::ExitCode;

use serde::Serialize;

use super::{Env, Output};
use crate::flags::{FlagStore, SqlFlagStore};
use crate::{Database, Error};

#[derive(Serialize)]
struct DatabaseRole {
    database: String,
    holds: String,
}

#[derive(Serialize)]
struct InitReport {
    schema_version: i64,
    /// Each database twintrack set up, and what it keeps there.
    databases: Vec<DatabaseRole>,
    registered: Vec<String>,
    already_registered: Vec<String>,
}

pub(crate) async fn run(env: &Env, out: &Output) -> Result<ExitCode, Error> {
    // Read the config first: a bad file must fail before anything is written.
    let config = env.config()?;
    let db = env.database().await?;
    // New shapes that live in databases of their own (the CLI's --new-database-url, or each
    // migration's new_database_url_env), each reached before anything is written.
    let mut apart: Vec<(Database, Vec<String>)> = Vec::new();
    let migrations: Vec<Option<&crate::config::MigrationConfig>> = match &config {
        Some(c) if !c.migrations.is_empty() => c.migrations.iter().map(Some).collect(),
        _ => vec![None],
    };
    for m in migrations {
        let Some(new_db) = env.new_database(m, 2).await? else {
            continue;
        };
        if new_db.same_database(&db) {
            continue;
        }
        let name = m.map_or_else(|| "(all)".to_owned(), |m| m.name.clone());
        match apart.iter_mut().find(|(d, _)| d.same_database(&new_db)) {
            Some((_, names)) => names.push(name),
            None => apart.push((new_db, vec![name])),
        }
    }
    crate::schema::install(&db).await?;
    let mut databases = vec![DatabaseRole {
        database: db.describe(),
        holds: "flags, audit, evidence, mismatches, backfill checkpoints and repair intents".into(),
    }];
    for (new_db, names) in &apart {
        crate::schema::install(new_db).await?;
        databases.push(DatabaseRole {
            database: new_db.describe(),
            holds: format!(
                "the new shape of {}: repair intents written while it is authoritative, reverse backfill checkpoints",
                names.join(", ")
            ),
        });
    }
    let store = SqlFlagStore::new(db);
    let mut report = InitReport {
        databases,
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
        for role in &report.databases {
            text.push_str(&format!("\n{}: {}", role.database, role.holds));
        }
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
