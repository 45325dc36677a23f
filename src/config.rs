//! `twintrack.toml`: the migrations a deployment knows about.
//!
//! ```toml
//! [[migration]]
//! name = "user_settings"          # lowercase, digits, '_'
//! legacy_table = "users"          # plain or schema-qualified identifiers only
//! legacy_key = "id"                # or ["tenant_id", "id"] (a composite key, in order)
//! new_table = "user_settings"
//! new_key = "user_id"
//! fallback_stage = "legacy_only"  # optional: served if the flag was never loaded
//! primary_reads = false           # optional: true keeps this migration's reads off replicas
//! # The SQL backfill, verify and repair use (see `twintrack::definition`); one string for
//! # every backend, or a table with `postgres` and `sqlite` keys:
//! # `{batch}` is replaced by the batch's key predicate, its bounds bound by twintrack.
//! copy = "INSERT INTO user_settings (user_id, theme) SELECT id, theme FROM users WHERE {batch} ON CONFLICT (user_id) DO UPDATE SET theme = excluded.theme"
//! legacy_projection = "SELECT id AS key, theme FROM users"
//! new_projection = "SELECT user_id AS key, theme FROM user_settings"
//! ```
//!
//! Unknown keys are an error (a typo must not silently change nothing), and so is every
//! identifier that is not a plain SQL identifier.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::db::{Backend, quote_ident};
use crate::definition::{KeyColumns, MigrationDef, SqlText};
use crate::flags::validate_migration_name;
use crate::{Error, Result, Stage};

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The migrations, one `[[migration]]` table each.
    #[serde(default, rename = "migration")]
    pub migrations: Vec<MigrationConfig>,
}

/// One migration's definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// The migration's name, used by the CLI, the flag table and metrics.
    pub name: String,
    /// The legacy table.
    pub legacy_table: String,
    /// The legacy table's key: one column name, or an array of up to three (a composite key,
    /// in key order).
    pub legacy_key: KeyColumns,
    /// The new table.
    pub new_table: String,
    /// The new table's key columns (as many as `legacy_key`, of the same types).
    pub new_key: KeyColumns,
    /// The stage served when the flag was never loaded (default `legacy_only`).
    #[serde(default = "default_fallback")]
    pub fallback_stage: Stage,
    /// Read from the primary only, never a replica (default `false`); see
    /// [`DualStoreBuilder::primary_reads`](crate::dual::DualStoreBuilder::primary_reads).
    #[serde(default)]
    pub primary_reads: bool,
    /// Upserts new rows from legacy rows with key in `($1, $2]`.
    #[serde(default)]
    pub copy: Option<SqlText>,
    /// Upserts legacy rows from new rows with key in `($1, $2]`.
    #[serde(default)]
    pub reverse_copy: Option<SqlText>,
    /// The new shape in a database of its own: a `SELECT`, run on the legacy database, of the
    /// batch's legacy rows (`{batch}`) in the new table's columns, named as there. twintrack
    /// writes them to the new database (see [`crate::across`]).
    #[serde(default)]
    pub copy_select: Option<SqlText>,
    /// The same from the new database, in the legacy table's columns (a reverse backfill).
    #[serde(default)]
    pub reverse_copy_select: Option<SqlText>,
    /// The name of an environment variable holding the new shape's database URL, when it
    /// lives apart (the URL itself stays out of the file). Unset or empty variable: the new
    /// shape is in the legacy database. The CLI's `--new-database-url` takes precedence.
    #[serde(default)]
    pub new_database_url_env: Option<String>,
    /// With an external flag source (`TWINTRACK_FLAGS_FILE`, or
    /// [`FlagCacheBuilder::source`](crate::flags::FlagCacheBuilder::source)): the key of this
    /// migration's flag there (default: the migration's name).
    #[serde(default)]
    pub flag_key: Option<String>,
    /// With an external flag source: hold a stage the transition rules refuse and keep serving
    /// the last allowed one (`true`, the default), or follow it anyway as a forced move,
    /// audited (`false`).
    #[serde(default = "default_true")]
    pub hold_unsafe: bool,
    /// `SELECT key, …` over the legacy shape, in canonical form.
    #[serde(default)]
    pub legacy_projection: Option<SqlText>,
    /// `SELECT key, …` over the new shape, in the same form.
    #[serde(default)]
    pub new_projection: Option<SqlText>,
}

fn default_true() -> bool {
    true
}

impl MigrationConfig {
    /// The key of this migration's flag in an external flag source: `flag_key`, else the name.
    pub fn external_flag_key(&self) -> &str {
        self.flag_key.as_deref().unwrap_or(&self.name)
    }

    /// The definition for `backend` (its SQL picked for that backend).
    pub fn definition(&self, backend: Backend) -> Result<MigrationDef> {
        fn pick(sql: &Option<SqlText>, backend: Backend) -> Option<&str> {
            sql.as_ref().and_then(|s| s.for_backend(backend))
        }
        let mut builder = MigrationDef::builder(&self.name).tables(
            &self.legacy_table,
            self.legacy_key.clone(),
            &self.new_table,
            self.new_key.clone(),
        );
        if let Some(sql) = pick(&self.copy, backend) {
            builder = builder.copy(sql);
        }
        if let Some(sql) = pick(&self.reverse_copy, backend) {
            builder = builder.reverse_copy(sql);
        }
        if let Some(sql) = pick(&self.copy_select, backend) {
            builder = builder.copy_select(sql);
        }
        if let Some(sql) = pick(&self.reverse_copy_select, backend) {
            builder = builder.reverse_copy_select(sql);
        }
        if let (Some(l), Some(n)) = (
            pick(&self.legacy_projection, backend),
            pick(&self.new_projection, backend),
        ) {
            builder = builder.projections(l, n);
        }
        builder.build()
    }
}

fn default_fallback() -> Stage {
    Stage::LegacyOnly
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks names, identifiers and uniqueness.
    pub fn validate(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for m in &self.migrations {
            validate_migration_name(&m.name).map_err(|e| Error::Config(e.to_string()))?;
            if !seen.insert(m.name.as_str()) {
                return Err(Error::Config(format!(
                    "migration {:?} is defined twice",
                    m.name
                )));
            }
            let idents = [
                ("legacy_table", m.legacy_table.as_str()),
                ("new_table", &m.new_table),
            ]
            .into_iter()
            .chain(m.legacy_key.names().into_iter().map(|n| ("legacy_key", n)))
            .chain(m.new_key.names().into_iter().map(|n| ("new_key", n)));
            for (field, ident) in idents {
                quote_ident(ident)
                    .map_err(|e| Error::Config(format!("migration {:?}, {field}: {e}", m.name)))?;
            }
            if let Some(key) = &m.flag_key {
                let ok = !key.trim().is_empty()
                    && key.chars().count() <= 200
                    && !key.chars().any(char::is_control);
                if !ok {
                    return Err(Error::Config(format!(
                        "migration {:?}, flag_key: {key:?} is not a flag key (1 to 200 characters, no control characters)",
                        m.name
                    )));
                }
            }
            if let Some(name) = &m.new_database_url_env {
                let ok = !name.is_empty()
                    && name.len() <= 128
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    return Err(Error::Config(format!(
                        "migration {:?}, new_database_url_env: {name:?} is not an environment variable name (letters, digits and '_'; it names the variable holding the URL, not the URL)",
                        m.name
                    )));
                }
            }
            for backend in [Backend::Postgres, Backend::Sqlite] {
                m.definition(backend).map_err(|e| match e {
                    Error::Config(msg) => Error::Config(format!("migration {:?}: {msg}", m.name)),
                    other => other,
                })?;
            }
        }
        Ok(())
    }

    /// The migration called `name`.
    pub fn migration(&self, name: &str) -> Option<&MigrationConfig> {
        self.migrations.iter().find(|m| m.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[migration]]
        name = "user_settings"
        legacy_table = "users"
        legacy_key = "id"
        new_table = "app.user_settings"
        new_key = "user_id"
        fallback_stage = "dualwrite"
    "#;

    #[test]
    fn parses_a_good_file() {
        let config = Config::parse(GOOD).unwrap();
        let m = config.migration("user_settings").unwrap();
        assert_eq!(m.new_table, "app.user_settings");
        assert_eq!(m.fallback_stage, Stage::DualWrite);
        assert!(!m.primary_reads);
        let primary = format!("{GOOD}primary_reads = true\n");
        assert!(Config::parse(&primary).unwrap().migrations[0].primary_reads);
        assert!(Config::parse("").unwrap().migrations.is_empty());
        // An external flag source: the flag's key defaults to the name; unsafe stages held.
        assert_eq!(m.external_flag_key(), "user_settings");
        assert!(m.hold_unsafe);
        let keyed = format!("{GOOD}flag_key = \"migrations.user-settings\"\nhold_unsafe = false\n");
        let keyed = Config::parse(&keyed).unwrap();
        assert_eq!(
            keyed.migrations[0].external_flag_key(),
            "migrations.user-settings"
        );
        assert!(!keyed.migrations[0].hold_unsafe);
    }

    #[test]
    fn rejects_bad_files_with_a_clear_message() {
        let cases = [
            (GOOD.replace("legacy_key", "legacy_kee"), "unknown field"),
            (
                GOOD.replace("\"users\"", "\"users; drop table x\""),
                "invalid SQL identifier",
            ),
            (
                GOOD.replace("\"id\"", "\"i\\\"d\""),
                "invalid SQL identifier",
            ),
            (
                GOOD.replace("user_settings\"\n", "User Settings\"\n"),
                "invalid migration name",
            ),
            (GOOD.replace("dualwrite", "sideways"), "invalid stage"),
            (format!("{GOOD}{GOOD}"), "defined twice"),
            ("[[migration]]\nname = 3".to_owned(), "invalid type"),
            ("this is not toml".to_owned(), "expected"),
            (format!("{GOOD}primary_reads = \"yes\"\n"), "invalid type"),
            (
                GOOD.replace("legacy_key = \"id\"", "legacy_key = 5"),
                "expected a key column name, or an array of 1 to 3 column names",
            ),
            (
                GOOD.replace(
                    "legacy_key = \"id\"",
                    "legacy_key = [\"a\", \"b\", \"c\", \"d\"]",
                ),
                "invalid length 4",
            ),
            (
                GOOD.replace("legacy_key = \"id\"", "legacy_key = []"),
                "invalid length 0",
            ),
            (
                GOOD.replace("legacy_key = \"id\"", "legacy_key = [\"a\", 1]"),
                "invalid type",
            ),
            (
                GOOD.replace("legacy_key = \"id\"", "legacy_key = [\"a\", \"b\"]"),
                "legacy_key has 2 columns and new_key 1",
            ),
            (
                GOOD.replace("legacy_key = \"id\"", "legacy_key = [\"a\", \"b;c\"]"),
                "invalid SQL identifier",
            ),
            (format!("{GOOD}flag_key = \"\"\n"), "is not a flag key"),
            (format!("{GOOD}flag_key = \"  \"\n"), "is not a flag key"),
            (
                format!("{GOOD}flag_key = \"a\\u0007b\"\n"),
                "is not a flag key",
            ),
            (
                format!("{GOOD}flag_key = \"{}\"\n", "k".repeat(201)),
                "is not a flag key",
            ),
            (format!("{GOOD}flag_key = 3\n"), "invalid type"),
            (format!("{GOOD}hold_unsafe = \"no\"\n"), "invalid type"),
        ];
        for (text, needle) in cases {
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }
}
