//! Property tests over every input parser: the read-your-writes token, the stage and WAL
//! position parsers, the config loader, and the quickstart's HTTP inputs. None may panic; each
//! rejects what is not valid with an error. Case counts are set per property (the
//! `PROPTEST_CASES` environment variable overrides them for longer runs).

#[path = "../examples/quickstart/app.rs"]
mod app;
mod common;
#[path = "../examples/quickstart/repos.rs"]
mod repos;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use http_body_util::BodyExt;
use proptest::prelude::*;
use tower::ServiceExt;
use twintrack::config::Config;
use twintrack::ryw::{ClusterId, Lsn, MAX_LEN, Token, TokenSigner};
use twintrack::{Stage, TwinTrack};

const SECRET: &[u8] = b"property test secret, 32 bytes!!";

fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig::with_cases(cases)
}

fn signer() -> TokenSigner {
    TokenSigner::new(SECRET, Duration::from_secs(30)).unwrap()
}

const CLUSTER: ClusterId = ClusterId {
    system_identifier: 7_312_345_678_901_234_567,
    timeline: 1,
};

proptest! {
    #![proptest_config(cases(20_000))]

    /// Any text: verify never panics, and accepts nothing that `sign` did not produce.
    #[test]
    fn token_verify_rejects_arbitrary_text(text in any::<String>()) {
        let verdict = signer().verify(&text, CLUSTER, 1_000_000);
        prop_assert!(verdict.is_err(), "{text:?} accepted");
    }

    /// Text shaped like a token (the right alphabet and separators) is still rejected.
    #[test]
    fn token_verify_rejects_token_shaped_text(text in "v1\\.[0-9a-f-]{0,17}\\.[0-9]{0,21}\\.[0-9]{0,11}\\.[0-9]{0,14}\\.[0-9a-f]{0,70}") {
        prop_assert!(signer().verify(&text, CLUSTER, 1_000_000).is_err());
    }

    /// A signed token round-trips; any single-byte change to it is rejected.
    #[test]
    fn signed_tokens_round_trip_and_any_change_is_rejected(
        lsn in proptest::option::of(any::<u64>()),
        issued in 0u64..4_000_000_000_000,
        at in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let token = Token { lsn: lsn.map(Lsn), cluster: CLUSTER, issued_at_ms: issued };
        let signed = signer().sign(&token);
        prop_assert!(signed.len() <= MAX_LEN);
        prop_assert_eq!(signer().verify(&signed, CLUSTER, issued + 1), Ok(token));
        let mut bytes = signed.clone().into_bytes();
        let i = at.index(bytes.len());
        prop_assume!(bytes[i] != byte);
        bytes[i] = byte;
        if let Ok(changed) = String::from_utf8(bytes) {
            prop_assert!(signer().verify(&changed, CLUSTER, issued + 1).is_err(), "{changed:?}");
        }
    }

    /// Stage names: only the six names and four aliases parse.
    #[test]
    fn stage_parser_accepts_only_known_names(text in any::<String>()) {
        let known = ["legacy_only", "dual_write", "shadow", "live", "ramp_down", "new_only",
                     "off", "dualwrite", "rampdown", "complete"];
        match text.parse::<Stage>() {
            Ok(_) => prop_assert!(known.contains(&text.trim())),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    /// WAL positions: no panic; what parses prints back the same.
    #[test]
    fn lsn_parser_never_panics(text in "[0-9A-Fa-f/xX+-]{0,24}") {
        if let Ok(lsn) = text.parse::<Lsn>() {
            let again: Lsn = lsn.to_string().parse().unwrap();
            prop_assert_eq!(again, lsn);
        }
    }
}

proptest! {
    #![proptest_config(cases(5_000))]

    /// Arbitrary text as a config file: an error or a validated config, never a panic.
    #[test]
    fn config_loader_never_panics_on_text(text in any::<String>()) {
        let _ = Config::parse(&text);
    }

    /// Config-shaped text with hostile values: every accepted identifier is a plain one.
    #[test]
    fn config_loader_validates_every_identifier(
        name in "[a-zA-Z0-9_ ;\"'.-]{0,20}",
        table in "[a-zA-Z0-9_ ;\"'.()*-]{0,20}",
        key in "[a-zA-Z0-9_ ;\"'.-]{0,12}",
        second in proptest::option::of("[a-zA-Z0-9_ ;\"'.-]{0,12}"),
        stage in "[a-z_]{0,12}",
    ) {
        // One key column, or a composite key of two (and a new key of as many).
        let (legacy_key, new_key) = match &second {
            None => (format!("{key:?}"), "\"k\"".to_owned()),
            Some(second) => (format!("[{key:?}, {second:?}]"), "[\"k1\", \"k2\"]".to_owned()),
        };
        let text = format!(
            "[[migration]]\nname = {name:?}\nlegacy_table = {table:?}\nlegacy_key = {legacy_key}\nnew_table = \"t\"\nnew_key = {new_key}\nfallback_stage = {stage:?}\n"
        );
        if let Ok(config) = Config::parse(&text) {
            let m = &config.migrations[0];
            let plain = |s: &str| s.split('.').all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
            prop_assert!(plain(&m.legacy_table), "{text}");
            prop_assert!(m.legacy_key.names().iter().all(|k| plain(k)), "{text}");
            prop_assert!(m.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        }
    }
}

/// The quickstart on SQLite, built once for the HTTP properties.
fn service() -> &'static (
    tokio::runtime::Runtime,
    TwinTrack<axum::Router>,
    tempfile::TempDir,
) {
    static SERVICE: OnceLock<(
        tokio::runtime::Runtime,
        TwinTrack<axum::Router>,
        tempfile::TempDir,
    )> = OnceLock::new();
    SERVICE.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let (dir, url) = common::sqlite_db();
        let app = rt.block_on(async {
            use twintrack::flags::{FlagCache, FlagStore, SqlFlagStore};
            let db = twintrack::Database::connect(&url).await.unwrap();
            repos::create_shapes::<i64>(&db).await.unwrap();
            let store = Arc::new(SqlFlagStore::open(db.clone()).await.unwrap());
            store.register(app::MIGRATION, "fuzz").await.unwrap();
            let flags = FlagCache::builder(store)
                .migration(app::MIGRATION, Stage::LegacyOnly)
                .build()
                .await;
            let router = twintrack::ryw::Router::builder(db.clone(), SECRET)
                .build()
                .await
                .unwrap();
            let (legacy, new) = repos::repos::<sqlx::Sqlite, i64>();
            let settings = twintrack::dual::DualStore::builder(
                app::MIGRATION,
                legacy,
                new,
                db.as_sqlite().unwrap().clone(),
                flags.clone(),
                repos::SettingsResync::default(),
            )
            .router(router.clone())
            .build()
            .unwrap();
            // One real user, so that some fuzzed requests reach the database.
            let users = repos::Users { settings };
            users
                .create(
                    "fuzz@example.com",
                    repos::Settings {
                        theme: "dark".into(),
                        notifications_enabled: true,
                    },
                )
                .await
                .unwrap();
            app::app(users, flags, Some(router), true, None)
        });
        (rt, app, dir)
    })
}

fn call(method: &str, path: &str, body: Vec<u8>, token: Option<String>) -> (u16, String) {
    let (rt, app, _) = service();
    rt.block_on(async {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(token) = token {
            req = req.header("x-twintrack-ryw", token);
        }
        let Ok(req) = req.body(Body::from(body)) else {
            return (0, "not a valid HTTP request".into());
        };
        let res = app.clone().oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    })
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
            .map_or(serde_json::Value::Null, serde_json::Value::Number)),
        ".{0,80}".prop_map(serde_json::Value::from),
        Just(serde_json::json!("theme")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("email".to_owned()),
                    Just("theme".to_owned()),
                    Just("notifications_enabled".to_owned()),
                    ".{0,12}"
                ],
                inner,
                0..5,
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(cases(3_000))]

    /// Arbitrary JSON to every write route, arbitrary path segments and tokens: never a 5xx,
    /// and every 400 says why.
    #[test]
    fn quickstart_http_inputs_are_rejected_cleanly(
        route in 0usize..4,
        segment in prop_oneof![Just("1".to_owned()), Just("2".to_owned()), "[^/?#]{0,24}"],
        body in prop_oneof![json_value().prop_map(|v| v.to_string().into_bytes()), prop::collection::vec(any::<u8>(), 0..200)],
        token in proptest::option::of(".{0,300}"),
    ) {
        let segment: String = segment.bytes().map(|b| if b.is_ascii_alphanumeric() || b == b'-' { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
        let (method, path) = match route {
            0 => ("POST", "/users".to_owned()),
            1 => ("PUT", format!("/users/{segment}/settings")),
            2 => ("GET", format!("/users/{segment}/settings")),
            _ => ("DELETE", format!("/users/{segment}")),
        };
        let (status, text) = call(method, &path, body, token);
        prop_assert!(status < 500, "{method} {path} -> {status}: {text}");
        if status == 400 {
            prop_assert!(text.contains("\"error\""), "{text}");
        }
    }
}
