//! CI's chaos runs: `examples/chaos.rs` for 15 seconds flipping `legacy_only` ⇄ `dual_write`,
//! then for 30 seconds walking every stage in two-database mode (`--walk-stages`, whose load goes
//! on until all six stages were visited, at most 240 s: how long a walk takes depends on the
//! machine, so the run is bounded by the walk rather than by a clock; the README quotes 60-second
//! runs). It provisions its own PostgreSQL servers; the counts of divergent rows, stale reads
//! and lost writes must all be 0, and the walk must visit all six stages.

use std::path::Path;
use std::process::Command;

#[test]
fn chaos_runs_lose_nothing_and_the_walk_visits_every_stage() {
    if Command::new("sh")
        .args([
            "-c",
            "ls /usr/lib/postgresql/*/bin/pg_basebackup || command -v pg_basebackup",
        ])
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
        && std::env::var("PG_BIN").is_err()
    {
        if std::env::var("TWINTRACK_REQUIRE_POSTGRES").as_deref() == Ok("1") {
            panic!("TWINTRACK_REQUIRE_POSTGRES=1 but there are no PostgreSQL server binaries");
        }
        eprintln!("\n!!!!!!!! SKIPPING THE CHAOS RUN: no PostgreSQL server binaries\n");
        return;
    }
    // `cargo test` builds the examples; make sure this one is current when run alone.
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--example", "chaos"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the chaos example failed");
    let exe = std::env::current_exe().unwrap();
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("examples/chaos");
    // One after the other: each loads both cores on its own.
    let flips = run(&binary, &["--seconds", "15"]);
    assert!(flips("requests") > 1000);
    let walk = run(&binary, &["--seconds", "30", "--walk-stages"]);
    assert_eq!(
        walk("stages_visited"),
        6,
        "the walk did not visit every stage in 240 s"
    );
}

/// Runs the chaos example with `args`; asserts its three loss counts are 0 and it exited 0;
/// returns its summary line's counts by name.
fn run(binary: &Path, args: &[&str]) -> impl Fn(&str) -> u64 {
    let out = Command::new(binary)
        .args(args)
        .output()
        .expect("run the chaos example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    let line = stdout.lines().last().unwrap_or_default().to_owned();
    eprintln!("{line}");
    let summary = line.clone();
    let count = move |name: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {summary:?}"))
    };
    assert_eq!(count("divergent_rows"), 0, "{line}");
    assert_eq!(count("stale_reads"), 0, "{line}");
    assert_eq!(count("lost_writes"), 0, "{line}");
    assert!(out.status.success(), "{line}");
    count
}
