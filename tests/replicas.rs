//! Replica health against a real streaming replica with a 300 ms apply delay: real lag, a lag
//! limit, an outage and a recovery.

mod common;

use std::time::{Duration, Instant};

use common::pg;
use twintrack::Database;
use twintrack::ryw::{ReplicaOptions, ReplicaSet, cluster_id};

async fn wait_for(
    what: &str,
    set: &ReplicaSet,
    mut ok: impl FnMut(&ReplicaSet) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        set.poll_all().await;
        if ok(set) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}: {:?}",
            set.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_health_follows_real_lag_and_outages() {
    let cluster = match pg::Cluster::start(300) {
        Ok(cluster) => cluster,
        Err(why) if std::env::var("TWINTRACK_REQUIRE_POSTGRES").as_deref() == Ok("1") => {
            panic!("TWINTRACK_REQUIRE_POSTGRES=1 but PostgreSQL cannot run here: {why}")
        }
        Err(why) => {
            eprintln!("\n!!!!!!!! SKIPPING POSTGRESQL TEST: {why}\n");
            return;
        }
    };
    let db = cluster.fresh_db().await;
    let primary = Database::connect(&db.url).await.unwrap();
    // The new database reaches the replica after the apply delay.
    let start = Instant::now();
    while Database::connect(&db.replica_urls[0]).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the replica never got the database"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let options = ReplicaOptions {
        poll_interval: Duration::from_millis(20),
        max_lag: Duration::from_secs(2),
        ..ReplicaOptions::default()
    };
    let set = ReplicaSet::connect(primary.clone(), &db.replica_urls, options)
        .await
        .unwrap();
    assert_eq!(set.cluster(), cluster_id(&primary).await.unwrap());
    assert_eq!(set.cluster().timeline, 1);
    wait_for("a healthy replica", &set, |s| s.pick(None) == Some(0)).await;

    // A committed write: the replica has not replayed it, so it must not serve a read of it...
    twintrack::db::query("CREATE TABLE written (x INT)")
        .execute(&primary)
        .await
        .unwrap();
    let lsn = set.primary_lsn().await.unwrap();
    set.poll_all().await;
    assert_eq!(set.pick(Some(lsn)), None, "{:?}", set.health());
    assert_eq!(
        set.pick(None),
        Some(0),
        "it still serves reads that need nothing newer"
    );
    // ...until it has, a real apply delay later.
    let took = wait_for("the replica to replay the write", &set, |s| {
        s.pick(Some(lsn)) == Some(0)
    })
    .await;
    assert!(
        took >= Duration::from_millis(150),
        "replayed after {took:?}: is the apply delay real?"
    );
    let replica = Database::connect(&db.replica_urls[0]).await.unwrap();
    twintrack::db::query("SELECT x FROM written")
        .fetch_all(&replica)
        .await
        .unwrap();

    // Over the lag limit under steady writes: taken out; caught up: back in.
    let tight = ReplicaSet::connect(
        primary.clone(),
        &db.replica_urls,
        ReplicaOptions {
            poll_interval: Duration::from_millis(20),
            max_lag: Duration::from_millis(100),
            ..ReplicaOptions::default()
        },
    )
    .await
    .unwrap();
    let writer = {
        let primary = primary.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                twintrack::db::query("INSERT INTO written (x) VALUES ($1)")
                    .bind(i)
                    .execute(&primary)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    wait_for("the lagging replica to be taken out", &tight, |s| {
        s.pick(None).is_none()
    })
    .await;
    assert!(
        tight.health()[0]
            .problem
            .as_deref()
            .unwrap()
            .contains("behind"),
        "{:?}",
        tight.health()
    );
    writer.await.unwrap();
    wait_for("the caught-up replica to come back", &tight, |s| {
        s.pick(None) == Some(0)
    })
    .await;

    // Replica down: out of service (reads fall back to the primary); up again: back in.
    cluster.stop_replica(0);
    wait_for("the stopped replica to be taken out", &set, |s| {
        s.pick(None).is_none()
    })
    .await;
    assert!(set.health()[0].problem.is_some());
    cluster.start_replica(0);
    wait_for("the restarted replica to come back", &set, |s| {
        s.pick(None) == Some(0)
    })
    .await;
}
