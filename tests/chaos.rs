//! CI's chaos run: `examples/chaos.rs` for 15 seconds (the note quotes a 60-second one). It
//! provisions its own PostgreSQL servers; the counts of divergent rows, stale reads and lost
//! writes must all be 0.

use std::path::Path;
use std::process::Command;

#[test]
fn a_fifteen_second_chaos_run_loses_nothing() {
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
    let out = Command::new(&binary)
        .args(["--seconds", "15"])
        .output()
        .expect("run the chaos example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    let line = stdout.lines().last().unwrap_or_default();
    eprintln!("{line}");
    let count = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    assert_eq!(count("divergent_rows"), 0, "{line}");
    assert_eq!(count("stale_reads"), 0, "{line}");
    assert_eq!(count("lost_writes"), 0, "{line}");
    assert!(count("requests") > 1000, "{line}");
    assert!(out.status.success(), "{line}");
}
