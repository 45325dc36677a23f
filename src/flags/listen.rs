//! PostgreSQL `LISTEN twintrack_flags`: turns the flag table trigger's notifications into
//! [`FlagChange`]s, so a flip made by any process reaches every cache at once.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::broadcast;

use super::FlagChange;
use super::listen_handle::ListenerHandle;
use crate::{Error, Result};

const CHANNEL: &str = "twintrack_flags";

/// Connects and subscribes before returning, so no change made after `open` is missed. The
/// listener gets a one-connection pool of its own, with the service pool's connect options
/// (TLS included), so it never holds one of the service's connections.
pub(crate) async fn spawn(
    pool: &PgPool,
    changes: broadcast::Sender<FlagChange>,
) -> Result<ListenerHandle> {
    let own = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(PgConnectOptions::clone(&pool.connect_options()));
    let listener = subscribe(&own).await?;
    Ok(ListenerHandle::new(tokio::spawn(run(
        own, listener, changes,
    ))))
}

/// A listener connected and subscribed to the flag channel.
async fn subscribe(own: &PgPool) -> Result<PgListener> {
    let mut listener = PgListener::connect_with(own)
        .await
        .map_err(Error::from_sqlx)?;
    listener.listen(CHANNEL).await.map_err(Error::from_sqlx)?;
    Ok(listener)
}

/// Forwards notifications. Whenever the connection was lost, notifications sent meanwhile are
/// gone: once a new connection is listening again, [`FlagChange::All`] tells every consumer to
/// re-read the whole state (a `FlagChange::All` sent while the database is still unreachable
/// would be answered by a failed read, and the flip made in the gap never seen).
async fn run(own: PgPool, listener: PgListener, changes: broadcast::Sender<FlagChange>) {
    let mut listener = Some(listener);
    // Drops of the connection seen close together, for the backoff below.
    let mut last_drop: Option<tokio::time::Instant> = None;
    let mut drops = 0u32;
    loop {
        let Some(live) = listener.as_mut() else {
            // The failed listener is gone first: it held the pool's one connection.
            listener = Some(reconnect(&own).await);
            tracing::info!("flag change listener reconnected");
            let _ = changes.send(FlagChange::All);
            continue;
        };
        match live.try_recv().await {
            Ok(Some(notification)) => {
                let _ = changes.send(FlagChange::Migration(notification.payload().to_owned()));
            }
            Ok(None) => {
                // The connection dropped and sqlx has already reconnected and re-listened
                // (eager reconnect): re-read now. A connection that keeps dropping right
                // after it listens (a proxy, a server-side session timeout) is waited on with
                // backoff, so consumers are not told to reload everything in a tight loop.
                let now = tokio::time::Instant::now();
                drops = match last_drop {
                    Some(at) if now - at < Duration::from_secs(5) => drops + 1,
                    _ => 0,
                };
                last_drop = Some(now);
                if drops > 0 {
                    let wait =
                        Duration::from_millis(100u64 << drops.min(5)).min(Duration::from_secs(2));
                    tokio::time::sleep(wait).await;
                }
                tracing::warn!("flag change listener lost its connection and reconnected");
                let _ = changes.send(FlagChange::All);
            }
            Err(err) => {
                tracing::warn!(error = %err, "flag change listener failed; reconnecting");
                listener = None;
            }
        }
    }
}

/// A fresh subscribed listener, retried with backoff (100 ms doubling, at most 2 s) for as long
/// as it takes.
async fn reconnect(own: &PgPool) -> PgListener {
    let mut backoff = Duration::from_millis(100);
    loop {
        tokio::time::sleep(backoff).await;
        match subscribe(own).await {
            Ok(listener) => return listener,
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "flag change listener cannot reconnect yet");
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
