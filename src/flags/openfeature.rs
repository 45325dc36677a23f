//! [`OpenFeatureSource`]: stages from any OpenFeature provider (the official `open-feature`
//! SDK), and with the `flagd` feature the flagd provider's file mode.
//!
//! One **string** flag per migration; its key is the migration's name unless
//! [`OpenFeatureSource::flag_key`] says otherwise, and its value a stage name (twintrack's, or
//! LaunchDarkly's migration stage names: `off`, `dualwrite`, `shadow`, `live`, `rampdown`,
//! `complete`). A flag that is missing, of another type, or whose value names no stage is a
//! source error for that migration: the cache keeps its last known stage, counts it in
//! `twintrack.flags.invalid` and logs the value.
//!
//! Flags are evaluated once per cache refresh with one evaluation context (empty by default:
//! a migration's stage is the same for every request), not per request.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<twintrack::flags::SqlFlagStore>) -> twintrack::Result<()> {
//! use std::sync::Arc;
//! use twintrack::flags::{FlagCache, OpenFeatureSource};
//! use twintrack::Stage;
//!
//! // A flagd flag-definition file, watched for edits by the flagd provider.
//! let source = OpenFeatureSource::flagd_file("flags.json").await?;
//! let flags = FlagCache::builder(store)
//!     .source(Arc::new(source))
//!     .migration("user_settings", Stage::LegacyOnly)
//!     .build()
//!     .await;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use open_feature::provider::FeatureProvider;
use open_feature::{EvaluationContext, EvaluationErrorCode};

use super::source::FlagKeys;
use super::{BoxFuture, StageSource, WantedStage};
use crate::{Result, Stage};

/// Longest flag value quoted in an error (a value is logged, not a whole document).
const MAX_QUOTED: usize = 80;

/// Stages from an OpenFeature provider. See the [module docs](self).
pub struct OpenFeatureSource {
    provider: Arc<dyn FeatureProvider>,
    keys: FlagKeys,
    context: EvaluationContext,
    name: String,
}

impl std::fmt::Debug for OpenFeatureSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFeatureSource")
            .field("name", &self.name)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl OpenFeatureSource {
    /// A source over `provider` (already initialised). Named after the provider's metadata.
    pub fn new(provider: impl FeatureProvider) -> OpenFeatureSource {
        let name = format!("OpenFeature provider {}", provider.metadata().name);
        OpenFeatureSource {
            provider: Arc::new(provider),
            keys: FlagKeys::default(),
            context: EvaluationContext::default(),
            name,
        }
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

    /// The evaluation context every flag is evaluated with (default: empty).
    pub fn context(mut self, context: EvaluationContext) -> Self {
        self.context = context;
        self
    }

    /// Renames the source in logs, audit reasons and `status`.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The flagd provider in file mode (`open-feature-flagd`, in-process resolver): flags from
    /// a flagd flag-definition JSON file (`{"flags": {"user_settings": {"state": "ENABLED",
    /// "variants": {...}, "defaultVariant": "..."}}}`), re-read when the file changes (the
    /// provider watches it). An edit that is not valid JSON is ignored by the provider: the
    /// flags of the last valid version stay in force.
    ///
    /// Errors: [`crate::Error::InvalidInput`] when the file cannot be read or is not a valid flagd
    /// document at start (the provider gives up after 5 s).
    #[cfg(feature = "flagd")]
    pub async fn flagd_file(path: impl AsRef<std::path::Path>) -> Result<OpenFeatureSource> {
        use open_feature_flagd::{
            CacheSettings, CacheType, FlagdOptions, FlagdProvider, ResolverType,
        };
        let path = path.as_ref();
        let shown = path.display().to_string();
        // The provider's own checks come after a 5 s wait for a first sync; fail fast on the
        // obvious cases.
        let text = std::fs::read_to_string(path)
            .map_err(|e| crate::Error::InvalidInput(format!("flagd file {shown}: {e}")))?;
        serde_json::from_str::<serde_json::Value>(&text).map_err(|e| {
            crate::Error::InvalidInput(format!("flagd file {shown}: not JSON: {e}"))
        })?;
        let provider = FlagdProvider::new(FlagdOptions {
            resolver_type: ResolverType::File,
            source_configuration: Some(shown.clone()),
            // No evaluation cache (the resolver re-reads the file on every change), but a cache
            // setting all the same: only with one does the resolver drain its channel of sync
            // notices, which holds 1,000 and then stops the file's updates from applying.
            cache_settings: Some(CacheSettings {
                cache_type: CacheType::Disabled,
                ..CacheSettings::default()
            }),
            ..FlagdOptions::default()
        })
        .await
        .map_err(|e| crate::Error::InvalidInput(format!("flagd file {shown}: {e}")))?;
        Ok(OpenFeatureSource::new(provider).named(format!("flagd file {shown}")))
    }

    async fn evaluate(&self, migration: &str) -> std::result::Result<Stage, String> {
        let key = self.keys.of(migration);
        match self.provider.resolve_string_value(key, &self.context).await {
            Ok(details) => details.value.parse::<Stage>().map_err(|_| {
                format!(
                    "flag {key:?} is {:?}, which names no stage",
                    quoted(&details.value)
                )
            }),
            Err(err) => {
                let what = match err.code {
                    EvaluationErrorCode::FlagNotFound => "not found".to_owned(),
                    EvaluationErrorCode::TypeMismatch => "not a string flag".to_owned(),
                    code => format!("{code:?}"),
                };
                Err(match err.message {
                    Some(message) => format!("flag {key:?}: {what}: {}", quoted(&message)),
                    None => format!("flag {key:?}: {what}"),
                })
            }
        }
    }
}

fn quoted(value: &str) -> String {
    if value.chars().count() <= MAX_QUOTED {
        return value.to_owned();
    }
    let cut: String = value.chars().take(MAX_QUOTED).collect();
    format!("{cut}…")
}

impl StageSource for OpenFeatureSource {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn stages<'a>(&'a self, migrations: &'a [Arc<str>]) -> BoxFuture<'a, Result<Vec<WantedStage>>> {
        Box::pin(async move {
            let mut wanted = Vec::with_capacity(migrations.len());
            for migration in migrations {
                wanted.push(WantedStage {
                    migration: migration.to_string(),
                    stage: self.evaluate(migration).await,
                });
            }
            Ok(wanted)
        })
    }
}
