//! Where the primary is and how far a replica has replayed, per backend, as the [`Lsn`] the
//! router compares.
//!
//! - PostgreSQL: WAL positions (`pg_current_wal_insert_lsn()`, `pg_last_wal_replay_lsn()`);
//!   the cluster is the system identifier and the primary's timeline.
//! - MariaDB: GTIDs (`domain-server-seq`). A cluster is the primary's `@@server_id` and its
//!   `@@gtid_domain_id`: within one domain, sequence numbers only grow, so the position is
//!   the domain's sequence number in the primary's `@@gtid_binlog_pos` (read after the
//!   commit: it covers it), and a replica has replayed it when the same domain's sequence
//!   number in its `@@gtid_slave_pos` is at least that (what `MASTER_GTID_WAIT(pos, 0)`
//!   tests). Health and lag come from `SHOW ALL SLAVES STATUS` (`Slave_SQL_Running`,
//!   `Seconds_Behind_Master`); the lag "in bytes" is in transactions of the domain there.
//!   (MySQL 8's `@@gtid_executed` sets are UUID-keyed intervals: not handled yet.)

use super::token::{ClusterId, Lsn};
use crate::db::{Backend, Conn, Database, query};
use crate::{Error, Result};

/// The cluster identity of `primary`.
pub(crate) async fn cluster(primary: &Database) -> Result<ClusterId> {
    match primary.backend() {
        Backend::Postgres => {
            let row = query(
                "SELECT CAST(s.system_identifier AS TEXT) AS sysid, CAST(c.timeline_id AS TEXT) AS timeline
                 FROM pg_control_system() s, pg_control_checkpoint() c",
            )
            .fetch_one(primary)
            .await?;
            let field = |name: &str| -> Result<String> { row.get(name) };
            let bad = |what: &str| Error::Internal(format!("the primary's {what} is unreadable"));
            Ok(ClusterId {
                system_identifier: field("sysid")?
                    .parse()
                    .map_err(|_| bad("system identifier"))?,
                timeline: field("timeline")?.parse().map_err(|_| bad("timeline"))?,
            })
        }
        Backend::MySql => {
            let row = query(
                "SELECT CAST(@@server_id AS SIGNED) AS server_id, CAST(@@gtid_domain_id AS SIGNED) AS domain",
            )
            .fetch_one(primary)
            .await?;
            let server_id: i64 = row.get("server_id")?;
            let domain: i64 = row.get("domain")?;
            Ok(ClusterId {
                system_identifier: u64::try_from(server_id).unwrap_or(0),
                timeline: u32::try_from(domain).unwrap_or(0),
            })
        }
        Backend::Sqlite => Err(Error::Config(
            "SQLite has no replicas to route reads to".into(),
        )),
    }
}

/// Which position of the primary.
#[derive(Clone, Copy)]
pub(crate) enum Mark {
    /// For a token: past every transaction committed before the call (PostgreSQL: the WAL
    /// insert position, past our commits even with `synchronous_commit` off).
    Token,
    /// For replica lag: what replicas can have received (PostgreSQL: the WAL write position).
    Lag,
}

/// The primary's position now.
pub(crate) async fn primary(primary: &Database, cluster: ClusterId, mark: Mark) -> Result<Lsn> {
    primary_on(primary.backend(), primary.into(), cluster, mark).await
}

/// The primary's position now, read on `on` (a connection to the primary, of `backend`).
pub(crate) async fn primary_on(
    backend: Backend,
    primary: crate::db::On<'_>,
    cluster: ClusterId,
    mark: Mark,
) -> Result<Lsn> {
    match (backend, mark) {
        (Backend::MySql, _) => {
            let pos: String = query("SELECT CAST(@@gtid_binlog_pos AS CHAR)")
                .scalar(primary)
                .await?;
            gtid_seq(&pos, cluster.timeline)
        }
        (_, Mark::Token) => query("SELECT CAST(pg_current_wal_insert_lsn() AS TEXT)")
            .scalar::<String>(primary)
            .await?
            .parse(),
        (_, Mark::Lag) => query("SELECT CAST(pg_current_wal_lsn() AS TEXT)")
            .scalar::<String>(primary)
            .await?
            .parse(),
    }
}

/// How far the replica on `conn` has replayed (`None`: nothing yet, or not a replica).
pub(crate) async fn replayed(conn: Conn<'_>, cluster: ClusterId) -> Result<Option<Lsn>> {
    match conn.backend() {
        Backend::MySql => {
            let pos: Option<String> = query("SELECT CAST(@@gtid_slave_pos AS CHAR)")
                .scalar(conn)
                .await?;
            pos.map(|p| gtid_seq(&p, cluster.timeline)).transpose()
        }
        _ => {
            let text: Option<String> = query("SELECT CAST(pg_last_wal_replay_lsn() AS TEXT)")
                .scalar(conn)
                .await?;
            Ok(text.and_then(|t| t.parse().ok()))
        }
    }
}

/// One poll of a replica: whether it is replicating, how far it has replayed, and its lag in
/// milliseconds by its own clock.
pub(crate) struct ReplicaPoll {
    pub(crate) replicating: bool,
    pub(crate) replayed: Option<Lsn>,
    pub(crate) lag_ms: i64,
}

/// Polls the replica `db`.
pub(crate) async fn poll(db: &Database, cluster: ClusterId) -> Result<ReplicaPoll> {
    match db.backend() {
        Backend::MySql => {
            let rows = query("SHOW ALL SLAVES STATUS").fetch_all(db).await?;
            // The connection to this cluster's primary (one, in the usual setup).
            let Some(row) = rows.first() else {
                return Ok(ReplicaPoll {
                    replicating: false,
                    replayed: None,
                    lag_ms: 0,
                });
            };
            let sql: String = row.get("Slave_SQL_Running")?;
            let io: String = row.get("Slave_IO_Running")?;
            let behind: Option<i64> = row.get("Seconds_Behind_Master")?;
            let pos: String = row.get("Gtid_Slave_Pos")?;
            // Both threads running, and a lag the server can tell (NULL: it cannot, e.g. the
            // connection to the primary is down): else out of service, never "0 s behind".
            Ok(ReplicaPoll {
                replicating: sql == "Yes" && io == "Yes" && behind.is_some(),
                replayed: Some(gtid_seq(&pos, cluster.timeline)?),
                lag_ms: behind.unwrap_or(0).saturating_mul(1000),
            })
        }
        _ => {
            let row = query(
                "SELECT CAST(pg_is_in_recovery() AS INTEGER) AS recovering,
                        CAST(pg_last_wal_replay_lsn() AS TEXT) AS replayed,
                        CAST(COALESCE(EXTRACT(EPOCH FROM (now() - pg_last_xact_replay_timestamp())) * 1000, 0) AS BIGINT) AS lag_ms",
            )
            .fetch_one(db)
            .await?;
            let recovering: i64 = row.get("recovering")?;
            let replayed: Option<String> = row.get("replayed")?;
            Ok(ReplicaPoll {
                replicating: recovering != 0,
                replayed: replayed.and_then(|t| t.parse().ok()),
                lag_ms: row.get("lag_ms")?,
            })
        }
    }
}

/// The sequence number of `domain` in a MariaDB GTID position (`0-1-123,1-2-5`), as an
/// [`Lsn`]; 0 when the position has nothing in the domain yet. An error names a position
/// that is not one.
pub(crate) fn gtid_seq(position: &str, domain: u32) -> Result<Lsn> {
    let bad = || Error::Internal(format!("unreadable GTID position {position:?}"));
    for gtid in position.split(',').map(str::trim).filter(|g| !g.is_empty()) {
        let mut parts = gtid.split('-');
        let (Some(d), Some(_server), Some(seq), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let d: u32 = d.parse().map_err(|_| bad())?;
        let seq: u64 = seq.parse().map_err(|_| bad())?;
        if d == domain {
            return Ok(Lsn(seq));
        }
    }
    Ok(Lsn(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gtid_positions_give_their_domains_sequence_number() {
        assert_eq!(gtid_seq("0-1-123", 0).unwrap(), Lsn(123));
        assert_eq!(gtid_seq("0-1-123,1-2-5", 1).unwrap(), Lsn(5));
        assert_eq!(gtid_seq(" 1-2-5, 0-3-9 ", 0).unwrap(), Lsn(9));
        assert_eq!(gtid_seq("", 0).unwrap(), Lsn(0));
        assert_eq!(gtid_seq("1-2-5", 0).unwrap(), Lsn(0));
        for bad in [
            "0-1",
            "0-1-x",
            "a-1-2",
            "0-1-2-3",
            "0-1-99999999999999999999999",
            "-",
        ] {
            assert!(gtid_seq(bad, 0).is_err(), "{bad}");
        }
    }
}
