//! PostgreSQL `LISTEN twintrack_flags`: turns the flag table trigger's notifications into
//! [`FlagChange`]s, so a flip made by any process reaches every cache at once.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::FlagChange;
use crate::{Error, Result};

const CHANNEL: &str = "twintrack_flags";

/// Stops the listener task when dropped.
pub(crate) struct ListenerHandle(JoinHandle<()>);

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Connects and subscribes before returning, so no change made after `open` is missed. The
/// listener gets a one-connection pool of its own, with the service pool's connect options
/// (TLS included), so it never holds one of the service's connections.
pub(crate) async fn spawn(
    pool: &PgPool,
    changes: broadcast::Sender<FlagChange>,
) -> Result<ListenerHandle> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(PgConnectOptions::clone(&pool.connect_options()));
    let mut listener = PgListener::connect_with(&own)
        .await
        .map_err(Error::from_sqlx)?;
    listener.listen(CHANNEL).await.map_err(Error::from_sqlx)?;
    Ok(ListenerHandle(tokio::spawn(run(listener, changes))))
}

async fn run(mut listener: PgListener, changes: broadcast::Sender<FlagChange>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match listener.try_recv().await {
            Ok(Some(notification)) => {
                backoff = Duration::from_millis(100);
                let _ = changes.send(FlagChange::Migration(notification.payload().to_owned()));
            }
            Ok(None) => {
                // The connection dropped; the next try_recv reconnects and re-listens. Anything
                // sent meanwhile is lost, so everyone must reload.
                tracing::warn!("flag change listener lost its connection; reconnecting");
                let _ = changes.send(FlagChange::All);
            }
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "flag change listener failed");
                let _ = changes.send(FlagChange::All);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
