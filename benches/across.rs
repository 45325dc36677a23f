//! Cross-database verify against the naive way, side by side on one private PostgreSQL server
//! (`fsync=off`) holding two databases: the quickstart's `users` (legacy shape) in one and
//! `user_settings` (new shape) in the other, `--rows` rows per side (default 10,000,000),
//! `bigint` keys, both shapes equal.
//!
//! - twintrack: `verify::run_across` (each database counts and hashes its own rows,
//!   `hash_record_extended`, the whole range first; only summaries cross; 64 segments, 4 at a
//!   time, only where the whole range differs).
//! - naive: both projections streamed sorted by key (`COPY (… ORDER BY key) TO STDOUT`, both at
//!   once) and merge-compared here line by line.
//!
//! Alternated `--rounds` times (default 2). `--only twintrack` runs the twintrack verify alone
//! (for `/usr/bin/time -v`, whose maximum resident set size is the client's memory).
//!
//! Run: `cargo bench --bench across` (`-- --rows N --rounds N --only twintrack`).

#[path = "../tests/common/pg.rs"]
mod pg;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::time::Instant;

use futures_util::StreamExt;
use sqlx::{Connection, PgConnection};
use twintrack::config::Config;
use twintrack::flags::{FlagStore, SqlFlagStore, StageChange};
use twintrack::metrics::Metrics;
use twintrack::verify::{self, VerifyOptions};
use twintrack::{Database, Stage};

const M: &str = "user_settings";

fn arg(name: &str, default: i64) -> i64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| {
            v.parse().unwrap_or_else(|_| {
                eprintln!("{name} wants a whole number, not {v:?}");
                std::process::exit(2)
            })
        })
}

/// Lines of a `COPY … TO STDOUT` stream, one at a time, whatever the chunks.
struct Lines<S> {
    stream: S,
    buf: Vec<u8>,
    at: usize,
    done: bool,
}

impl<S: futures_util::Stream<Item = sqlx::Result<bytes::Bytes>> + Unpin> Lines<S> {
    async fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.buf[self.at..].iter().position(|b| *b == b'\n') {
                let line = self.buf[self.at..self.at + end].to_vec();
                self.at += end + 1;
                return Some(line);
            }
            if self.done {
                return None;
            }
            self.buf.drain(..self.at);
            self.at = 0;
            match self.stream.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk.unwrap()),
                None => self.done = true,
            }
        }
    }
}

fn key_of(line: &[u8]) -> i64 {
    let end = line.iter().position(|b| *b == b'\t').unwrap_or(line.len());
    std::str::from_utf8(&line[..end]).unwrap().parse().unwrap()
}

/// The naive verify: both projections sorted by key, streamed at once and merged. Returns
/// (rows per side, differences).
async fn naive(legacy_url: &str, new_url: &str, legacy: &str, new: &str) -> (u64, u64, u64) {
    let mut lc = PgConnection::connect(legacy_url).await.unwrap();
    let mut nc = PgConnection::connect(new_url).await.unwrap();
    let l_sql = format!("COPY (SELECT * FROM ({legacy}) p ORDER BY key) TO STDOUT");
    let n_sql = format!("COPY (SELECT * FROM ({new}) p ORDER BY key) TO STDOUT");
    let (ls, ns) = tokio::join!(lc.copy_out_raw(&l_sql), nc.copy_out_raw(&n_sql));
    let mut l = Lines {
        stream: ls.unwrap(),
        buf: Vec::new(),
        at: 0,
        done: false,
    };
    let mut n = Lines {
        stream: ns.unwrap(),
        buf: Vec::new(),
        at: 0,
        done: false,
    };
    let (mut lrows, mut nrows, mut diffs) = (0u64, 0u64, 0u64);
    let (mut a, mut b) = tokio::join!(l.next(), n.next());
    loop {
        match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => {
                lrows += 1;
                diffs += 1;
                a = l.next().await;
            }
            (None, Some(_)) => {
                nrows += 1;
                diffs += 1;
                b = n.next().await;
            }
            (Some(x), Some(y)) => {
                let (kx, ky) = (key_of(x), key_of(y));
                if kx == ky {
                    lrows += 1;
                    nrows += 1;
                    if x != y {
                        diffs += 1;
                    }
                    (a, b) = tokio::join!(l.next(), n.next());
                } else if kx < ky {
                    lrows += 1;
                    diffs += 1;
                    a = l.next().await;
                } else {
                    nrows += 1;
                    diffs += 1;
                    b = n.next().await;
                }
            }
        }
    }
    (lrows, nrows, diffs)
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rows = arg("--rows", 10_000_000);
    let rounds = arg("--rounds", 2);
    let only_twintrack = std::env::args().any(|a| a == "twintrack");
    let cluster = pg::Cluster::start_with(vec![]).expect("start PostgreSQL");
    let legacy_url = cluster.fresh_db().await.url;
    let new_url = cluster.fresh_db().await.url;
    let options = || twintrack::db::ConnectOptions {
        max_connections: 12,
        ..Default::default()
    };
    let legacy_db = Database::connect_with(&legacy_url, options())
        .await
        .unwrap();
    let new_db = Database::connect_with(&new_url, options()).await.unwrap();
    repos::create_shapes_apart::<i64>(&legacy_db, &new_db)
        .await
        .unwrap();
    twintrack::schema::install(&new_db).await.unwrap();
    let store = SqlFlagStore::open(legacy_db.clone()).await.unwrap();
    store.register(M, "bench").await.unwrap();
    store
        .set_stage(StageChange::new(M, Stage::DualWrite, "bench", "bench"))
        .await
        .unwrap();
    let seed = Instant::now();
    let (l, n) = tokio::join!(
        twintrack::db::Query::assert_safe(format!(
            "INSERT INTO users (id, email, profile)
             SELECT g, 'u' || g || '@example.com',
                    jsonb_build_object('theme', 'theme-' || (g % 7), 'notifications_enabled', g % 2 = 0)
             FROM generate_series(1, {rows}) AS g"
        ))
        .execute(&legacy_db),
        twintrack::db::Query::assert_safe(format!(
            "INSERT INTO user_settings (user_id, theme, notifications_enabled)
             SELECT g, 'theme-' || (g % 7), g % 2 = 0 FROM generate_series(1, {rows}) AS g"
        ))
        .execute(&new_db)
    );
    l.unwrap();
    n.unwrap();
    for db in [&legacy_db, &new_db] {
        twintrack::db::query("VACUUM ANALYZE")
            .execute(db)
            .await
            .unwrap();
        twintrack::db::query("CHECKPOINT")
            .execute(db)
            .await
            .unwrap();
    }
    eprintln!(
        "seeded {rows} rows per side in {:.1} s",
        seed.elapsed().as_secs_f64()
    );
    let config = Config::parse(include_str!("../examples/quickstart.toml")).unwrap();
    let def = config
        .migration(M)
        .unwrap()
        .definition(twintrack::Backend::Postgres)
        .unwrap();
    let (legacy, new) = def.projections().unwrap();
    let (legacy, new) = (legacy.to_owned(), new.to_owned());
    let run_twintrack = || async {
        let t = Instant::now();
        let report = verify::run_across(
            &legacy_db,
            &new_db,
            &store,
            &def,
            VerifyOptions {
                segments: 64,
                parallel: 4,
                ..VerifyOptions::default()
            },
            Metrics::global(),
            None,
        )
        .await
        .unwrap();
        assert!(report.clean, "{:?}", report.lines());
        assert_eq!(report.legacy_rows, rows as u64);
        t.elapsed().as_secs_f64()
    };
    if only_twintrack {
        let took = run_twintrack().await;
        println!("twintrack cross-database verify of {rows} rows per side: {took:.2} s");
        return;
    }
    let mut results = Vec::new();
    for round in 0..rounds {
        let mut round_result = (0.0, 0.0);
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            if which == 0 {
                round_result.0 = run_twintrack().await;
                eprintln!("  twintrack: {:.3} s", round_result.0);
            } else {
                let t = Instant::now();
                let (lrows, nrows, diffs) = naive(&legacy_url, &new_url, &legacy, &new).await;
                assert_eq!((lrows, nrows, diffs), (rows as u64, rows as u64, 0));
                round_result.1 = t.elapsed().as_secs_f64();
                eprintln!("  naive: {:.3} s", round_result.1);
            }
        }
        eprintln!(
            "round {}: twintrack {:.2} s, naive (COPY … ORDER BY key, merged) {:.2} s: {:.2}x faster",
            round + 1,
            round_result.0,
            round_result.1,
            round_result.1 / round_result.0
        );
        results.push(round_result);
    }
    for (i, (t, n)) in results.iter().enumerate() {
        println!(
            "cross-database verify, {rows} rows per side, round {}: twintrack {t:.2} s | naive {n:.2} s | {:.2}x",
            i + 1,
            n / t
        );
    }
}
