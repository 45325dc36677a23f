//! `twintrack.v1.ControlService` over the flag store.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::AdminIdentity;
use super::proto;
use super::proto::control_service_server::ControlService;
use crate::db::Database;
use crate::flags::source::current_hold;
use crate::flags::{
    FlagChange, FlagState, FlagStore, Hold, MigrationRecord, SqlFlagStore, StageChange, StageSource,
};
use crate::transition::{self, Verdict};
use crate::{Error, Stage};

/// The largest request message accepted (names, reasons and a few numbers fit easily).
pub(crate) const MAX_MESSAGE: usize = 64 * 1024;

/// The gRPC control service.
#[derive(Clone)]
pub struct ControlPlane {
    pub(crate) store: Arc<SqlFlagStore>,
    pub(crate) db: Database,
    /// The external flag source the served stages follow, if any (holds are shown).
    pub(crate) source: Option<Arc<dyn StageSource>>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane").finish_non_exhaustive()
    }
}

/// The gRPC status for a twintrack error.
pub fn status(err: Error) -> Status {
    let message = err.to_string();
    match err {
        Error::Refused(_) | Error::Precondition(_) => Status::failed_precondition(message),
        Error::VersionConflict { .. } => Status::aborted(message),
        Error::UnknownMigration(_) => Status::not_found(message),
        Error::InvalidStage(_) | Error::InvalidInput(_) | Error::Config(_) => {
            Status::invalid_argument(message)
        }
        Error::Unreachable(_) | Error::FlagSource(_) => Status::unavailable(message),
        Error::NotInitialized | Error::InvalidFlag { .. } => Status::failed_precondition(message),
        Error::Database(_)
        | Error::Statement { .. }
        | Error::Repository { .. }
        | Error::Io { .. }
        | Error::Internal(_) => Status::internal(message),
    }
}

/// A bound's integer value for the deprecated integer fields (0 when it is none or no integer).
fn integer(bound: &Option<String>) -> i64 {
    bound
        .as_deref()
        .and_then(|b| b.parse().ok())
        .unwrap_or_default()
}

pub(crate) fn to_proto(state: &FlagState) -> proto::Migration {
    proto::Migration {
        name: state.migration.clone(),
        stage: state.stage.as_str().to_owned(),
        version: state.version,
        updated_at_micros: state.updated_at,
        updated_by: state.updated_by.clone(),
        reason: state.reason.clone(),
        shadow_sample_rate: state.shadow_sample_rate,
        read_rollout_percent: state.read_rollout_percent.map(u32::from),
    }
}

/// Every move from the current stage and whether the rules allow it now.
pub(crate) fn moves(record: &MigrationRecord) -> Vec<proto::Move> {
    Stage::ALL
        .iter()
        .filter(|to| **to != record.state.stage)
        .map(|&to| {
            match transition::check(
                &record.state.migration,
                record.state.stage,
                to,
                &record.evidence,
            ) {
                Verdict::Refused(r) => proto::Move {
                    to_stage: to.as_str().into(),
                    allowed: false,
                    refusal_reason: r.reason,
                    remedy: r.remedy,
                },
                _ => proto::Move {
                    to_stage: to.as_str().into(),
                    allowed: true,
                    ..Default::default()
                },
            }
        })
        .collect()
}

fn actor<T>(request: &Request<T>) -> Result<String, Status> {
    request
        .extensions()
        .get::<AdminIdentity>()
        .map(AdminIdentity::actor)
        .ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

fn name_arg(name: &str) -> Result<&str, Status> {
    if name.trim().is_empty() {
        return Err(Status::invalid_argument("name is required"));
    }
    Ok(name)
}

impl ControlPlane {
    /// The hold of `migration`, when an external source wants a stage the rules refuse. A
    /// source that cannot answer shows no hold (it is logged).
    pub(crate) async fn hold(&self, migration: &str) -> Option<Hold> {
        let source = self.source.as_deref()?;
        match current_hold(source, &*self.store, migration).await {
            Ok(hold) => hold,
            Err(err) => {
                tracing::warn!(%migration, error = %err, "cannot read the flag source");
                None
            }
        }
    }

    /// Every registered migration's current state.
    async fn all(&self) -> Result<Vec<proto::Migration>, Status> {
        let flags = self.store.load_all().await.map_err(status)?;
        Ok(flags
            .into_iter()
            .filter_map(|f| f.state.ok())
            .map(|s| to_proto(&s))
            .collect())
    }
}

/// How often a `WatchMigrations` stream re-reads every migration even with nothing pushed.
const WATCH_RESYNC: Duration = Duration::from_secs(30);

/// How long a `WatchMigrations` stream keeps trying to re-read the state before it ends with
/// `UNAVAILABLE` (the client then subscribes again and gets the whole state).
const WATCH_REREAD_FOR: Duration = Duration::from_secs(30);

/// The state a watch stream must look at again: one migration, or (`None`) all of them. A
/// failed read is retried (every 500 ms, for [`WATCH_REREAD_FOR`]): a change is never skipped
/// because the database was briefly unreachable. `Err` is the status to end the stream with.
async fn reread(
    plane: &ControlPlane,
    migration: Option<&str>,
    tx: &tokio::sync::mpsc::Sender<Result<proto::WatchMigrationsResponse, Status>>,
) -> Result<Vec<proto::Migration>, Status> {
    let started = tokio::time::Instant::now();
    loop {
        let read = match migration {
            Some(name) => plane
                .store
                .get(name)
                .await
                .map(|record| vec![to_proto(&record.state)])
                .map_err(status),
            None => plane.all().await,
        };
        match read {
            Ok(found) => return Ok(found),
            // Gone (an unregistered name): nothing to send.
            Err(e) if e.code() == tonic::Code::NotFound => return Ok(Vec::new()),
            Err(e) if started.elapsed() >= WATCH_REREAD_FOR || tx.is_closed() => {
                return Err(Status::unavailable(format!(
                    "cannot re-read the migrations' state ({}); subscribe again",
                    e.message()
                )));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

#[tonic::async_trait]
impl ControlService for ControlPlane {
    async fn list_migrations(
        &self,
        _request: Request<proto::ListMigrationsRequest>,
    ) -> Result<Response<proto::ListMigrationsResponse>, Status> {
        Ok(Response::new(proto::ListMigrationsResponse {
            migrations: self.all().await?,
        }))
    }

    async fn get_migration(
        &self,
        request: Request<proto::GetMigrationRequest>,
    ) -> Result<Response<proto::GetMigrationResponse>, Status> {
        let name = name_arg(&request.get_ref().name)?;
        let record = self.store.get(name).await.map_err(status)?;
        let e = &record.evidence;
        Ok(Response::new(proto::GetMigrationResponse {
            migration: Some(to_proto(&record.state)),
            evidence: Some(proto::Evidence {
                backfill_finished_at_micros: e.backfill_finished_at,
                verify_clean_at_micros: e.verify_clean_at,
                reverse_synced_at_micros: e.reverse_synced_at,
                left_legacy_only_at_micros: e.left_legacy_only_at,
            }),
            moves: moves(&record),
            hold: self.hold(name).await.map(|h| proto::Hold {
                wanted: h.wanted.to_string(),
                serving: h.serving.to_string(),
                reason: h.refusal.reason,
                remedy: h.refusal.remedy,
                source: h.source,
            }),
        }))
    }

    async fn set_stage(
        &self,
        request: Request<proto::SetStageRequest>,
    ) -> Result<Response<proto::SetStageResponse>, Status> {
        let actor = actor(&request)?;
        let r = request.into_inner();
        name_arg(&r.name)?;
        let stage: Stage = r
            .stage
            .parse()
            .map_err(|e: crate::stage::ParseStageError| Status::invalid_argument(e.to_string()))?;
        if r.expected_version < 0 {
            return Err(Status::invalid_argument(
                "expected_version must not be negative",
            ));
        }
        let mut change = StageChange::new(&r.name, stage, actor, r.reason).force(r.force);
        if r.expected_version > 0 {
            change = change.expect_version(r.expected_version);
        }
        let outcome = self.store.set_stage(change).await.map_err(status)?;
        Ok(Response::new(proto::SetStageResponse {
            migration: Some(to_proto(&outcome.state)),
            changed: outcome.changed,
        }))
    }

    async fn rollback(
        &self,
        request: Request<proto::RollbackRequest>,
    ) -> Result<Response<proto::RollbackResponse>, Status> {
        let actor = actor(&request)?;
        let r = request.into_inner();
        name_arg(&r.name)?;
        let current = self.store.get(&r.name).await.map_err(status)?.state;
        let Some(target) = current.stage.rollback_target() else {
            return Err(Status::failed_precondition(format!(
                "{} is at legacy_only: there is nothing to roll back",
                r.name
            )));
        };
        let change =
            StageChange::new(&r.name, target, actor, r.reason).expect_version(current.version);
        let outcome = self.store.set_stage(change).await.map_err(status)?;
        Ok(Response::new(proto::RollbackResponse {
            migration: Some(to_proto(&outcome.state)),
            from_stage: current.stage.as_str().into(),
        }))
    }

    type WatchMigrationsStream = ReceiverStream<Result<proto::WatchMigrationsResponse, Status>>;

    async fn watch_migrations(
        &self,
        _request: Request<proto::WatchMigrationsRequest>,
    ) -> Result<Response<Self::WatchMigrationsStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        // Subscribed before the first snapshot is read, so no change falls in between.
        let mut changes = self.store.subscribe();
        let initial = self.all().await?;
        let plane = self.clone();
        tokio::spawn(async move {
            let send = async |m: proto::Migration| {
                tx.send(Ok(proto::WatchMigrationsResponse { migration: Some(m) }))
                    .await
                    .is_ok()
            };
            let mut versions = std::collections::HashMap::new();
            for m in initial {
                versions.insert(m.name.clone(), m.version);
                if !send(m).await {
                    return;
                }
            }
            // A whole re-read every so often even when nothing is pushed: a change a lost
            // notification took with it still arrives.
            let mut resync =
                tokio::time::interval_at(tokio::time::Instant::now() + WATCH_RESYNC, WATCH_RESYNC);
            loop {
                let wanted = match changes.as_mut() {
                    Some(rx) => tokio::select! {
                        change = rx.recv() => match change {
                            Ok(FlagChange::Migration(name)) => Some(name),
                            // Missed notifications (the listener reconnected, or this stream
                            // fell behind): everything is read again.
                            Ok(FlagChange::All) | Err(RecvError::Lagged(_)) => None,
                            Err(RecvError::Closed) => {
                                let _ = tx.send(Err(Status::unavailable(
                                    "the flag change feed stopped; subscribe again",
                                )))
                                .await;
                                return;
                            }
                        },
                        _ = resync.tick() => None,
                        // The client went away: stop now, not at the next change.
                        () = tx.closed() => return,
                    },
                    // SQLite cannot push: compare versions once a second instead.
                    None => {
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => None,
                            () = tx.closed() => return,
                        }
                    }
                };
                let changed = match reread(&plane, wanted.as_deref(), &tx).await {
                    Ok(changed) => changed,
                    Err(end) => {
                        let _ = tx.send(Err(end)).await;
                        return;
                    }
                };
                for m in changed {
                    if versions.get(&m.name) == Some(&m.version) {
                        continue;
                    }
                    versions.insert(m.name.clone(), m.version);
                    if !send(m).await {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[allow(deprecated)] // fills the deprecated integer key for older clients
    async fn list_mismatches(
        &self,
        request: Request<proto::ListMismatchesRequest>,
    ) -> Result<Response<proto::ListMismatchesResponse>, Status> {
        let r = request.into_inner();
        name_arg(&r.name)?;
        let limit = match r.limit {
            0 => 20,
            n @ 1..=1000 => n,
            n => {
                return Err(Status::invalid_argument(format!(
                    "limit must be between 1 and 1000, got {n}"
                )));
            }
        };
        self.store.get(&r.name).await.map_err(status)?;
        let found = crate::shadow::list_mismatches(&self.db, &r.name, limit)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::ListMismatchesResponse {
            mismatches: found
                .into_iter()
                .map(|m| proto::Mismatch {
                    key: m.key.parse().unwrap_or_default(),
                    class: m.class.as_str().into(),
                    stage: m.stage,
                    diff_json: serde_json::to_string(&m.diff).unwrap_or_default(),
                    at_micros: m.at,
                    key_text: m.key,
                })
                .collect(),
        }))
    }

    #[allow(deprecated)] // fills the deprecated integer bounds for older clients
    async fn get_progress(
        &self,
        request: Request<proto::GetProgressRequest>,
    ) -> Result<Response<proto::GetProgressResponse>, Status> {
        let name = name_arg(&request.get_ref().name)?.to_owned();
        let record = self.store.get(&name).await.map_err(status)?;
        let runs = crate::backfill::latest_runs(&self.db, &name)
            .await
            .map_err(status)?;
        Ok(Response::new(proto::GetProgressResponse {
            backfills: runs
                .into_iter()
                .map(|r| proto::BackfillRun {
                    run_id: r.run_id,
                    direction: r.direction,
                    lower_bound: integer(&r.lower_bound),
                    upper_bound: integer(&r.upper_bound),
                    keys_done: r.keys_done,
                    keys_total: r.keys_total,
                    rows_copied: r.rows_copied,
                    started_at_micros: r.started_at,
                    finished_at_micros: r.finished_at,
                    lower_key: r.lower_bound,
                    upper_key: r.upper_bound,
                })
                .collect(),
            verify_clean_at_micros: record.evidence.verify_clean_at,
            backfill_finished_at_micros: record.evidence.backfill_finished_at,
        }))
    }
}
