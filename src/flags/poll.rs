//! MySQL/MariaDB have no `LISTEN`/`NOTIFY`: a poller turns changes of the flag table into
//! [`FlagChange`]s instead, so a flip made by any process reaches every cache within one poll
//! interval (default [`POLL_INTERVAL`], 100 ms) plus the cache's reload.
//!
//! Each poll is one statement, `SELECT COUNT(*), COALESCE(SUM(version), 0) FROM
//! twintrack_flags`: every change twintrack makes to a migration's state bumps its row's
//! `version` (and registering adds a row), so the pair moves with every change, and the table
//! holds one small row per migration (its primary key is all the statement reads). A change
//! made by hand that leaves `version` alone is seen at the cache's soft TTL instead.

use std::time::Duration;

use sqlx::MySqlPool;
use tokio::sync::broadcast;

use super::FlagChange;
use super::listen_handle::ListenerHandle;
use crate::db::{Database, query};

/// How often the flag table is polled.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Starts the poller on a one-connection pool of its own (the service pool's connect options),
/// so it never holds one of the service's connections. The table is read once before this
/// returns, so no change made after it is missed. It stops when the handle is dropped.
pub(crate) async fn spawn(
    pool: &MySqlPool,
    interval: Duration,
    changes: broadcast::Sender<FlagChange>,
) -> ListenerHandle {
    let own: Database = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(pool.connect_options().as_ref().clone())
        .into();
    // Unreadable now: the first good read tells every consumer to reload.
    let first = read(&own).await.ok();
    ListenerHandle::new(tokio::spawn(run(own, interval, changes, first)))
}

/// The flag table's row count and version sum.
async fn read(db: &Database) -> crate::Result<(i64, String)> {
    let row =
        query("SELECT COUNT(*), CAST(COALESCE(SUM(version), 0) AS CHAR) FROM twintrack_flags")
            .fetch_one(db)
            .await?;
    Ok((row.get_at(0)?, row.get_at(1)?))
}

async fn run(
    db: Database,
    interval: Duration,
    changes: broadcast::Sender<FlagChange>,
    mut last: Option<(i64, String)>,
) {
    let mut failing = last.is_none();
    loop {
        tokio::time::sleep(interval).await;
        match read(&db).await {
            Ok(now) => {
                // After a failure, changes made meanwhile may have been missed: reload all.
                if failing || last.as_ref() != Some(&now) {
                    let _ = changes.send(FlagChange::All);
                }
                failing = false;
                last = Some(now);
            }
            Err(err) => {
                if !failing {
                    tracing::warn!(error = %err, "flag change poller cannot read the flag table; retrying");
                }
                failing = true;
            }
        }
    }
}
