//! `twintrack mismatches MIGRATION [--limit N]`

use std::process::ExitCode;

use super::output::format_micros;
use super::{Env, Output};
use crate::Error;
use crate::flags::{FlagStore, SqlFlagStore};
use crate::shadow::list_mismatches;

pub(crate) async fn run(
    env: &Env,
    out: &Output,
    migration: &str,
    limit: u32,
) -> Result<ExitCode, Error> {
    let db = env.database().await?;
    // An unknown migration is an error, not an empty list.
    SqlFlagStore::new(db.clone()).get(migration).await?;
    let mismatches = list_mismatches(&db, migration, limit).await?;
    out.print(&mismatches, || {
        if mismatches.is_empty() {
            return format!("no mismatches recorded for {migration}");
        }
        let mut text = String::new();
        for m in &mismatches {
            text.push_str(&format!(
                "{} key {} {} in {} (legacy {} µs, new {} µs)\n",
                format_micros(m.at),
                m.key,
                m.class.as_str().to_uppercase(),
                m.stage,
                m.legacy_micros,
                m.new_micros
            ));
            for d in &m.diff {
                let show = |v: &Option<serde_json::Value>| {
                    v.as_ref()
                        .map_or_else(|| "(absent)".to_owned(), |v| v.to_string())
                };
                let path = if d.path.is_empty() {
                    "(record)"
                } else {
                    &d.path
                };
                text.push_str(&format!(
                    "    {path}: legacy {} / new {}\n",
                    show(&d.legacy),
                    show(&d.new)
                ));
            }
        }
        text.trim_end().to_owned()
    });
    Ok(ExitCode::SUCCESS)
}
