//! The `twintrack` command line: flag flips with guard rails, from a terminal or a script.
//!
//! Global options: `--database-url` (env `DATABASE_URL`), `--new-database-url` (env
//! `TWINTRACK_NEW_DATABASE_URL`: the new shape's database when it lives apart; else a
//! migration's `new_database_url_env`), `--config` (env `TWINTRACK_CONFIG`, default
//! `twintrack.toml`), `--json` (machine-readable output on stdout).
//!
//! Exit codes (stable): 0 ok; 1 verify found divergence; 2 bad usage or bad input; 3 transition
//! refused (including a lost compare-and-set); 4 cannot reach the database; 5 any other failure.

mod data;
mod init;
mod mismatches;
pub(crate) mod output;
mod serve;
mod stage;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::db::{ConnectOptions, Database};
use crate::{Error, Stage};

pub(crate) use output::Output;

/// Zero-downtime expand/contract migrations: stages, flags and instant rollback.
#[derive(Debug, Parser)]
#[command(name = "twintrack", version)]
pub struct Cli {
    /// Database holding the flag table (postgres://… or sqlite:…).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// The new shape's database, when it lives apart from the legacy one (backfill, verify and
    /// init use it; flags, audit and evidence stay in --database-url). Overrides a
    /// migration's `new_database_url_env`.
    #[arg(
        long,
        env = "TWINTRACK_NEW_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub new_database_url: Option<String>,
    /// Configuration file listing the migrations [default: twintrack.toml].
    #[arg(long, env = "TWINTRACK_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// A flagd flag-definition JSON file the services take their stages from (an external
    /// flag source): `status` and `serve` show where it wants a stage the transition rules
    /// refuse (a hold).
    #[arg(long, env = "TWINTRACK_FLAGS_FILE", global = true, value_name = "PATH")]
    pub flags_file: Option<PathBuf>,
    /// Who is acting, for the audit log [default: cli:$USER].
    #[arg(long, env = "TWINTRACK_ACTOR", global = true)]
    pub actor: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create twintrack's tables and register the configured migrations at legacy_only
    /// (idempotent: existing migrations are left as they are).
    Init,
    /// Show every migration's stage, or one migration in detail with the moves allowed now.
    Status {
        /// Only this migration, in detail.
        migration: Option<String>,
    },
    /// Change a migration's stage.
    Stage {
        /// What to do with the stage.
        #[command(subcommand)]
        action: StageCommand,
    },
    /// Roll back to the nearest stage where legacy is authoritative (live/ramp_down -> shadow,
    /// shadow -> dual_write, dual_write -> legacy_only). From new_only, refused unless a reverse
    /// sync has run.
    Rollback {
        /// The migration.
        migration: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Show the newest shadow-read mismatches of a migration, with their field diffs.
    Mismatches {
        /// The migration.
        migration: String,
        /// How many to show (1-1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Copy the rows that existed before dual writes (keyset batches, resumable, throttled).
    /// Refused in legacy_only: turn dual writes on first.
    Backfill {
        /// The migration (defined in the config file, with its `copy` SQL).
        migration: String,
        /// Rows in the first batch; later batches are tuned toward --target-chunk-ms.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch_size: u32,
        /// Target time per batch, in milliseconds.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=60_000))]
        target_chunk_ms: u64,
        /// Pause while a standby replays more than this many milliseconds behind, or while a
        /// standby that should be there shows no lag (an inactive replication slot, slots but no
        /// streaming standby, a --replica that cannot be polled). PostgreSQL only.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
        max_lag_ms: Option<u64>,
        /// A replica whose replay lag --max-lag-ms reads directly (repeatable); without it, the
        /// comma-separated REPLICA_DATABASE_URLS, if set.
        #[arg(long = "replica", value_name = "URL")]
        replicas: Vec<String>,
        /// At most this many rows per second.
        #[arg(long)]
        rate: Option<f64>,
        /// Concurrent workers in this process (more processes may run at once).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
        workers: u64,
        /// Copy new -> legacy with `reverse_copy` (the reverse sync that makes leaving new_only safe).
        #[arg(long)]
        reverse: bool,
    },
    /// Compare both shapes (counts and hashes per segment, then rows); exit 1 if they differ.
    Verify {
        /// The migration (defined in the config file, with its projections).
        migration: String,
        /// Segments the key space is cut into.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        segments: u64,
        /// Re-sync each difference from the authoritative side, then check again.
        #[arg(long)]
        repair: bool,
        /// Compare only this key (repeatable): `42`, a UUID, text, or a JSON array for a
        /// composite key (`[7,"0b5d…"]`). A verify of chosen keys is not gate evidence.
        #[arg(long = "key", value_name = "KEY")]
        keys: Vec<String>,
    },
    /// Serve the control plane: gRPC, the admin page and /metrics, on one listener. Every call
    /// but /metrics needs a token from TWINTRACK_ADMIN_TOKEN (`token`, or `name=token,…`).
    Serve {
        /// host:port to listen on.
        #[arg(long, default_value = "127.0.0.1:7070")]
        listen: String,
    },
    /// Change a migration's shadow sample rate or read rollout percent.
    Tune {
        /// The migration.
        migration: String,
        /// Share of reads shadow-compared in shadow and live, 0.0 to 1.0.
        #[arg(long)]
        shadow_sample_rate: Option<f64>,
        /// In live, percent of request keys whose reads are served by the new shape (0-100).
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=100), conflicts_with = "clear_read_rollout")]
        read_rollout_percent: Option<u8>,
        /// Remove the read rollout percent (all reads in live go to the new shape).
        #[arg(long)]
        clear_read_rollout: bool,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Only apply if the flag's version is still N.
        #[arg(long, value_name = "N")]
        expect_version: Option<i64>,
    },
}

/// `twintrack stage …`
#[derive(Debug, Subcommand)]
pub enum StageCommand {
    /// Move a migration to STAGE under the transition rules.
    Set {
        /// The migration.
        migration: String,
        /// legacy_only, dual_write, shadow, live, ramp_down or new_only (aliases: off, dualwrite,
        /// rampdown, complete).
        stage: Stage,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Override a refusal of the transition rules (audited with the refusal).
        #[arg(long)]
        force: bool,
        /// Only apply if the flag's version is still N (compare-and-set).
        #[arg(long, value_name = "N")]
        expect_version: Option<i64>,
    },
}

/// Parses the process arguments, runs the command, prints, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(5);
        }
    };
    let out = Output::new(cli.json);
    // Logs (RUST_LOG, default warnings) and, when OTEL_EXPORTER_OTLP_ENDPOINT is set, metrics
    // and spans over OTLP, so a backfill's or a verify's figures reach the collector; `serve`
    // also gets its Prometheus `/metrics` from the same meter provider.
    let serving = matches!(cli.command, Command::Serve { .. });
    let telemetry =
        match runtime.block_on(async { crate::telemetry::init("twintrack", "warn", serving) }) {
            Ok(telemetry) => telemetry,
            Err(err) => {
                out.error(&err);
                return ExitCode::from(exit_code(&err));
            }
        };
    let result = runtime.block_on(run(cli, &out, &telemetry));
    // On a blocking thread while this (current-thread) runtime keeps running: the gRPC
    // exporter's connection is a task on it, and the final flush needs it driven.
    let _ = runtime
        .block_on(async move { tokio::task::spawn_blocking(move || telemetry.shutdown()).await });
    match result {
        Ok(code) => code,
        Err(err) => {
            out.error(&err);
            ExitCode::from(exit_code(&err))
        }
    }
}

/// Runs one parsed command.
pub(crate) async fn run(
    cli: Cli,
    out: &Output,
    telemetry: &crate::telemetry::Telemetry,
) -> Result<ExitCode, Error> {
    let env = Env::from_cli(&cli)?;
    match cli.command {
        Command::Init => init::run(&env, out).await,
        Command::Status { migration } => status::run(&env, out, migration.as_deref()).await,
        Command::Stage {
            action:
                StageCommand::Set {
                    migration,
                    stage: to,
                    reason,
                    force,
                    expect_version,
                },
        } => {
            let change = crate::flags::StageChange {
                migration,
                to,
                expected_version: expect_version,
                actor: env.actor.clone(),
                reason,
                force,
            };
            stage::set(&env, out, change).await
        }
        Command::Backfill {
            migration,
            batch_size,
            target_chunk_ms,
            max_lag_ms,
            replicas,
            rate,
            workers,
            reverse,
        } => {
            if !replicas.is_empty() && max_lag_ms.is_none() {
                return Err(Error::InvalidInput(
                    "--replica is read for --max-lag-ms: give the lag limit too".into(),
                ));
            }
            let replicas = if replicas.is_empty() {
                std::env::var("REPLICA_DATABASE_URLS")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect()
            } else {
                replicas
            };
            if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
                return Err(Error::InvalidInput(
                    "--rate must be a positive number of rows per second".into(),
                ));
            }
            let args = data::BackfillArgs {
                batch_size,
                target_chunk_ms,
                max_lag_ms,
                replicas,
                rate,
                workers: usize::try_from(workers).unwrap_or(1),
                reverse,
            };
            data::backfill(&env, out, &migration, args).await
        }
        Command::Verify {
            migration,
            segments,
            repair,
            keys,
        } => {
            let segments = usize::try_from(segments).unwrap_or(64);
            data::verify(&env, out, &migration, segments, repair, keys).await
        }
        Command::Serve { listen } => serve::run(&env, &listen, telemetry.prometheus()).await,
        Command::Mismatches { migration, limit } => {
            mismatches::run(&env, out, &migration, limit).await
        }
        Command::Rollback { migration, reason } => {
            stage::rollback(&env, out, &migration, &reason).await
        }
        Command::Tune {
            migration,
            shadow_sample_rate,
            read_rollout_percent,
            clear_read_rollout,
            reason,
            expect_version,
        } => {
            let read_rollout_percent = match (read_rollout_percent, clear_read_rollout) {
                (Some(p), _) => Some(Some(p)),
                (None, true) => Some(None),
                (None, false) => None,
            };
            if shadow_sample_rate.is_none() && read_rollout_percent.is_none() {
                return Err(Error::InvalidInput(
                    "nothing to change: pass --shadow-sample-rate, --read-rollout-percent or --clear-read-rollout".into(),
                ));
            }
            let change = crate::flags::TuningChange {
                migration,
                shadow_sample_rate,
                read_rollout_percent,
                expected_version: expect_version,
                actor: env.actor.clone(),
                reason,
            };
            stage::tune(&env, out, change).await
        }
    }
}

/// The exit code for an error (see the module docs).
pub fn exit_code(err: &Error) -> u8 {
    match err {
        Error::Refused(_) | Error::VersionConflict { .. } | Error::Precondition(_) => 3,
        Error::Unreachable(_) => 4,
        Error::UnknownMigration(_) | Error::InvalidStage(_) | Error::Config(_)
        | Error::InvalidInput(_)
        | Error::NotInitialized => 2,
        Error::Database(_)
        | Error::Statement { .. }
        | Error::Repository { .. }
        | Error::FlagSource(_)
        | Error::Io { .. }
        // A stored flag row that does not parse: the database's state, not the caller's input.
        | Error::InvalidFlag { .. }
        | Error::Internal(_) => 5,
    }
}

/// What every command needs: where the database is, the config, who is acting.
pub(crate) struct Env {
    database_url: Option<String>,
    new_database_url: Option<String>,
    config_path: PathBuf,
    config_explicit: bool,
    flags_file: Option<PathBuf>,
    pub(crate) actor: String,
}

impl Env {
    fn from_cli(cli: &Cli) -> Result<Env, Error> {
        let actor = match &cli.actor {
            Some(actor) => actor.clone(),
            None => format!(
                "cli:{}",
                std::env::var("USER")
                    .or_else(|_| std::env::var("LOGNAME"))
                    .unwrap_or_else(|_| "anonymous".into())
            ),
        };
        Ok(Env {
            database_url: cli.database_url.clone().filter(|u| !u.is_empty()),
            new_database_url: cli.new_database_url.clone().filter(|u| !u.is_empty()),
            config_explicit: cli.config.is_some(),
            config_path: cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from("twintrack.toml")),
            flags_file: cli.flags_file.clone().filter(|p| !p.as_os_str().is_empty()),
            actor,
        })
    }

    /// The external flag source from `--flags-file` (its flag keys from the config file), if
    /// one is given.
    pub(crate) async fn stage_source(
        &self,
    ) -> Result<Option<std::sync::Arc<dyn crate::flags::StageSource>>, Error> {
        let Some(path) = &self.flags_file else {
            return Ok(None);
        };
        #[cfg(feature = "flagd")]
        {
            let mut source = crate::flags::OpenFeatureSource::flagd_file(path).await?;
            if let Some(config) = self.config()? {
                source = source.flag_keys_from(&config);
            }
            Ok(Some(std::sync::Arc::new(source)))
        }
        #[cfg(not(feature = "flagd"))]
        Err(Error::InvalidInput(format!(
            "--flags-file {}: this twintrack was built without the `flagd` feature",
            path.display()
        )))
    }

    /// The config file; `None` when the default file is absent (only an explicitly named file
    /// must exist).
    pub(crate) fn config(&self) -> Result<Option<Config>, Error> {
        if !self.config_explicit && !self.config_path.exists() {
            return Ok(None);
        }
        Config::load(&self.config_path).map(Some)
    }

    pub(crate) async fn database(&self) -> Result<Database, Error> {
        self.database_with(2).await
    }

    /// Where `migration`'s new shape lives, if apart from the legacy database: the URL from
    /// `--new-database-url` (env `TWINTRACK_NEW_DATABASE_URL`), else from the environment
    /// variable the migration's `new_database_url_env` names, and where that came from.
    /// `None`: in the legacy database.
    pub(crate) fn new_database_url(
        &self,
        migration: Option<&crate::config::MigrationConfig>,
    ) -> Option<(String, String)> {
        if let Some(url) = &self.new_database_url {
            return Some((
                url.clone(),
                "--new-database-url / TWINTRACK_NEW_DATABASE_URL".into(),
            ));
        }
        let name = migration?.new_database_url_env.as_ref()?;
        let url = std::env::var(name).ok().filter(|u| !u.trim().is_empty())?;
        Some((url, format!("${name}")))
    }

    /// Connects to `migration`'s new database when it lives apart ([`Env::new_database_url`]);
    /// `None` when it is the legacy one. Unreachable: exit 4, naming the new database.
    pub(crate) async fn new_database(
        &self,
        migration: Option<&crate::config::MigrationConfig>,
        max_connections: u32,
    ) -> Result<Option<Database>, Error> {
        let Some((url, from)) = self.new_database_url(migration) else {
            return Ok(None);
        };
        let db = Database::connect_with(
            &url,
            ConnectOptions {
                max_connections,
                ..ConnectOptions::default()
            },
        )
        .await
        .map_err(|e| match e {
            Error::Unreachable(source) => Error::Unreachable(sqlx::Error::Io(
                std::io::Error::other(format!("the new database (from {from}): {source}")),
            )),
            Error::InvalidInput(msg) => {
                Error::InvalidInput(format!("the new database (from {from}): {msg}"))
            }
            Error::Config(msg) => Error::Config(format!("the new database (from {from}): {msg}")),
            other => other,
        })?;
        Ok(Some(db))
    }

    pub(crate) async fn database_with(&self, max_connections: u32) -> Result<Database, Error> {
        let url = self.database_url.as_deref().ok_or_else(|| {
            Error::InvalidInput("no database: pass --database-url or set DATABASE_URL".into())
        })?;
        Database::connect_with(
            url,
            ConnectOptions {
                max_connections,
                ..ConnectOptions::default()
            },
        )
        .await
    }
}
