//! [`LaunchDarklySource`]: stages from LaunchDarkly migration flags, through the LaunchDarkly
//! Rust server SDK (cargo feature `launchdarkly`).
//!
//! A LaunchDarkly migration flag has the same six stages as twintrack, under its own names:
//! `off` (legacy_only), `dualwrite`, `shadow`, `live`, `rampdown`, `complete` (new_only); a
//! plain string flag holding twintrack's names (`dual_write`, …) is read as well. Each
//! migration's flag (key: the migration's name unless [`LaunchDarklySource::flag_key`] says
//! otherwise) is evaluated once per cache refresh for one context (kind `service`, key
//! `twintrack`, unless [`LaunchDarklySource::context`] gives another), never per request.
//!
//! The SDK's `migration_variation` answers the default stage when the flag is missing or of
//! another type, which would be indistinguishable from a real `off`. So the flag is evaluated
//! with `variation_detail` (the same evaluation), an error reason is a source error for that
//! migration (last known stage kept, counted, logged), and the value is read with the SDK's
//! own migration `Stage` conversion. A client that has not initialised (no connection to
//! LaunchDarkly yet) fails the whole source: every migration keeps its last known stage.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<twintrack::flags::SqlFlagStore>) -> twintrack::Result<()> {
//! use std::sync::Arc;
//! use std::time::Duration;
//! use twintrack::flags::{FlagCache, LaunchDarklySource};
//!
//! let config = launchdarkly_server_sdk::ConfigBuilder::new("sdk-key").build().unwrap();
//! let source = LaunchDarklySource::start(config, Duration::from_secs(5)).await?;
//! let flags = FlagCache::builder(store)
//!     .source(Arc::new(source))
//!     .migration("user_settings", twintrack::Stage::LegacyOnly)
//!     .build()
//!     .await;
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use launchdarkly_server_sdk as ld;

use super::source::FlagKeys;
use super::{BoxFuture, StageSource, WantedStage};
use crate::{Error, Result, Stage};

/// Stages from LaunchDarkly migration flags. See the [module docs](self).
pub struct LaunchDarklySource {
    client: Arc<ld::Client>,
    context: ld::Context,
    keys: FlagKeys,
}

impl std::fmt::Debug for LaunchDarklySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaunchDarklySource")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl LaunchDarklySource {
    /// A source over a client the service already runs (started with
    /// `start_with_default_executor`).
    pub fn new(client: Arc<ld::Client>) -> LaunchDarklySource {
        LaunchDarklySource {
            client,
            context: ld::ContextBuilder::new("twintrack")
                .kind("service")
                .build()
                .expect("a constant, valid context"),
            keys: FlagKeys::default(),
        }
    }

    /// Builds and starts a client from `config`, waiting up to `wait` for its first flag data.
    /// A client still without data then is kept (it goes on connecting), and every stage is
    /// the last known one (or the fallback) until it has some.
    ///
    /// Errors: [`Error::InvalidInput`] when the SDK refuses `config`.
    pub async fn start(config: ld::Config, wait: Duration) -> Result<LaunchDarklySource> {
        let client = ld::Client::build(config)
            .map_err(|e| Error::InvalidInput(format!("LaunchDarkly client: {e}")))?;
        client.start_with_default_executor();
        if client.wait_for_initialization(wait).await != Some(true) {
            tracing::warn!(
                ?wait,
                "LaunchDarkly client not initialised yet; serving last known stages until it is"
            );
        }
        Ok(LaunchDarklySource::new(Arc::new(client)))
    }

    /// The flag key of `migration` (default: the migration's name).
    pub fn flag_key(mut self, migration: impl Into<String>, key: impl Into<String>) -> Self {
        self.keys.set(migration, key);
        self
    }

    /// The flag key of every migration in `config` ([`MigrationConfig::external_flag_key`](
    /// crate::config::MigrationConfig::external_flag_key)).
    pub fn flag_keys_from(mut self, config: &crate::config::Config) -> Self {
        self.keys.set_from(config);
        self
    }

    /// The context the flags are evaluated for (default: kind `service`, key `twintrack`).
    pub fn context(mut self, context: ld::Context) -> Self {
        self.context = context;
        self
    }

    /// The SDK client.
    pub fn client(&self) -> &Arc<ld::Client> {
        &self.client
    }

    fn evaluate(&self, migration: &str) -> std::result::Result<Stage, String> {
        let key = self.keys.of(migration);
        let detail =
            self.client
                .variation_detail(&self.context, key, ld::FlagValue::Str(String::new()));
        if let ld::Reason::Error { error } = detail.reason {
            return Err(format!("flag {key:?}: {error:?}"));
        }
        let value = detail
            .value
            .ok_or_else(|| format!("flag {key:?}: no value"))?;
        let shown = format!("{value:?}");
        // A plain string flag holding twintrack's stage names works too.
        let own = match &value {
            ld::FlagValue::Str(s) => s.parse::<Stage>().ok(),
            _ => None,
        };
        ld::Stage::try_from(value)
            .ok()
            .and_then(from_launchdarkly)
            .or(own)
            .ok_or_else(|| {
                format!(
                    "flag {key:?} is {}, which names no migration stage",
                    shown.chars().take(80).collect::<String>()
                )
            })
    }
}

/// LaunchDarkly's migration stage as twintrack's (`None`: a stage a later SDK added).
fn from_launchdarkly(stage: ld::Stage) -> Option<Stage> {
    Some(match stage {
        ld::Stage::Off => Stage::LegacyOnly,
        ld::Stage::DualWrite => Stage::DualWrite,
        ld::Stage::Shadow => Stage::Shadow,
        ld::Stage::Live => Stage::Live,
        ld::Stage::Rampdown => Stage::RampDown,
        ld::Stage::Complete => Stage::NewOnly,
        _ => return None,
    })
}

impl StageSource for LaunchDarklySource {
    fn describe(&self) -> String {
        "LaunchDarkly".to_owned()
    }

    fn stages<'a>(&'a self, migrations: &'a [Arc<str>]) -> BoxFuture<'a, Result<Vec<WantedStage>>> {
        Box::pin(async move {
            if !self.client.initialized() {
                return Err(Error::FlagSource(
                    "the LaunchDarkly client has no flag data yet".into(),
                ));
            }
            Ok(migrations
                .iter()
                .map(|m| WantedStage {
                    migration: m.to_string(),
                    stage: self.evaluate(m),
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_launchdarkly_stage_maps_to_the_stage_of_the_same_name() {
        for stage in Stage::ALL {
            // twintrack parses LaunchDarkly's names; the SDK's Display gives them.
            let ld_stage = ld::Stage::try_from(ld::FlagValue::Str(
                match stage {
                    Stage::LegacyOnly => "off",
                    Stage::DualWrite => "dualwrite",
                    Stage::Shadow => "shadow",
                    Stage::Live => "live",
                    Stage::RampDown => "rampdown",
                    Stage::NewOnly => "complete",
                }
                .to_owned(),
            ))
            .unwrap();
            assert_eq!(from_launchdarkly(ld_stage), Some(stage));
            assert_eq!(ld_stage.to_string().parse::<Stage>().unwrap(), stage);
        }
    }
}
