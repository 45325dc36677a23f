//! The admin page: server-rendered HTML from askama templates (`src/control/templates/`,
//! every value escaped by the template engine), no front-end build step.
//!
//! One table row per migration: stage, version, last change (who, why, when), backfill
//! progress, last clean verify, mismatches by class over the last 15 minutes, and the newest
//! mismatches with their diffs; under it the six stages as a pipeline, the current one marked,
//! each other one marked allowed or refused with the transition rules' reason; and three
//! charts from the per-minute figures the services and backfills write (mismatch rate by
//! class, write latency by side, backfill progress; see [`super::charts`]). Each row has a
//! rollback and an advance button; each asks for a reason and a confirmation tick, carries the
//! version it was rendered at (so it never undoes a change it did not show) and a CSRF token,
//! and is disabled, with the refusal's reason, when the transition rules forbid the move. The
//! page reloads itself every 5 s unless a form is being filled in.

use std::sync::Arc;

use askama::Template;

use axum::extract::{Form, Query, State};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Router};
use http::StatusCode;
use serde::Deserialize;

use super::auth::{AdminIdentity, AdminTokens, COOKIE};
use super::grpc::ControlPlane;
use crate::db::now_micros;
use crate::flags::{FlagStore, MigrationRecord, StageChange};
use crate::transition::{self, Verdict};
use crate::util::format_micros;
use crate::{Error, Stage};

#[derive(Clone)]
pub(crate) struct AdminState {
    pub(crate) plane: ControlPlane,
    pub(crate) tokens: Arc<AdminTokens>,
}

pub(crate) fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", axum::routing::get(|| async { Redirect::to("/admin") }))
        .route("/login", axum::routing::get(login_form).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/admin", axum::routing::get(page))
        .route("/admin/stage", axum::routing::post(set_stage))
        .with_state(state)
}

#[derive(Template)]
#[template(path = "login.html", config = "src/control/askama.toml")]
struct LoginPage<'a> {
    error: Option<&'a str>,
}

/// The sign-in page, with `error` above the form.
pub(crate) fn login_page(error: Option<&str>) -> String {
    LoginPage { error }
        .render()
        .unwrap_or_else(|e| format!("the sign-in page failed to render: {e}"))
}

async fn login_form() -> Html<String> {
    Html(login_page(None))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(state): State<AdminState>,
    headers: http::HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let session = (form.token.len() <= 4096)
        .then(|| state.tokens.sign_in(form.token.trim().as_bytes()))
        .flatten();
    let Some(session) = session else {
        return (
            StatusCode::UNAUTHORIZED,
            Html(login_page(Some("that token is not valid"))),
        )
            .into_response();
    };
    // `Secure` when the page is served over TLS (by a proxy in front, which says so).
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let cookie = format!(
        "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        state.tokens.session_ttl().as_secs(),
        if secure { "; Secure" } else { "" }
    );
    (
        StatusCode::SEE_OTHER,
        [
            (http::header::SET_COOKIE, cookie),
            (http::header::LOCATION, "/admin".to_owned()),
        ],
    )
        .into_response()
}

async fn logout(
    State(state): State<AdminState>,
    who: Option<Extension<AdminIdentity>>,
) -> Response {
    if let Some(session) = who.as_ref().and_then(|Extension(who)| who.session()) {
        state.tokens.sign_out(session);
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                http::header::SET_COOKIE,
                format!("{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"),
            ),
            (http::header::LOCATION, "/login".to_owned()),
        ],
    )
        .into_response()
}

#[derive(Deserialize)]
struct PageQuery {
    done: Option<String>,
}

async fn page(
    State(state): State<AdminState>,
    Extension(who): Extension<AdminIdentity>,
    Query(query): Query<PageQuery>,
) -> Response {
    match render(&state, &who, query.done.as_deref(), None).await {
        Ok(html) => Html(html).into_response(),
        // Plain text: nothing to escape.
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

#[derive(Template)]
#[template(path = "page.html", config = "src/control/askama.toml")]
struct Page<'a> {
    who: &'a str,
    csrf: &'a str,
    done: Option<String>,
    error: Option<&'a str>,
    migrations: Vec<Row>,
}

/// One migration on the page.
#[derive(Default)]
struct Row {
    name: String,
    /// Why its record could not be read (then nothing else is shown).
    unreadable: Option<String>,
    stage: &'static str,
    held: Option<String>,
    version: i64,
    when: String,
    by: String,
    why: String,
    backfill: String,
    verify: String,
    mismatches: String,
    moves: Vec<MoveForm>,
    pipeline: Vec<PipelineStage>,
    charts: Vec<super::charts::Chart>,
    recent: Vec<Recent>,
}

/// A rollback or advance form.
struct MoveForm {
    /// `rollback-{migration}` or `advance-{migration}`.
    id: String,
    label: &'static str,
    to: &'static str,
    /// The rules' reason and remedy when they refuse the move (the form is disabled).
    refusal: Option<String>,
}

/// One stage of the pipeline: `current`, `allowed` (a move the rules allow now) or
/// `refused`, with the reason.
struct PipelineStage {
    stage: &'static str,
    class: &'static str,
    note: String,
}

/// One recent mismatch.
struct Recent {
    when: String,
    key: String,
    class: &'static str,
    stage: String,
    diff: String,
}

async fn render(
    state: &AdminState,
    who: &AdminIdentity,
    done: Option<&str>,
    error: Option<&str>,
) -> crate::Result<String> {
    let plane = &state.plane;
    let since = now_micros() - 15 * 60 * 1_000_000;
    let mut migrations = Vec::new();
    for flag in plane.store.load_all().await? {
        let name = flag.migration.clone();
        let record = match plane.store.get(&name).await {
            Ok(record) => record,
            Err(e) => {
                migrations.push(Row {
                    name,
                    unreadable: Some(e.to_string()),
                    ..Row::default()
                });
                continue;
            }
        };
        let runs = crate::backfill::latest_runs(&plane.db, &name).await?;
        let forward = runs.iter().find(|r| r.direction == "forward");
        // Figures missing (a control database not yet on schema 6) cost the charts only.
        let charts = super::charts::charts(&plane.db, &name, forward)
            .await
            .unwrap_or_else(|err| {
                tracing::warn!(migration = %name, error = %err, "the admin page's charts could not be read");
                Vec::new()
            });
        let backfill = forward
            .map(|r| {
                let pct = 100.0 * r.keys_done as f64 / r.keys_total.max(1) as f64;
                match r.finished_at {
                    Some(at) if at > 0 => {
                        format!("done {} ({} rows)", format_micros(at), r.rows_copied)
                    }
                    Some(_) => "abandoned".to_owned(),
                    None => format!("{pct:.1}% ({} rows)", r.rows_copied),
                }
            })
            .unwrap_or_else(|| "never".into());
        let counts = crate::shadow::mismatch_counts(&plane.db, &name, since).await?;
        let mismatches = if counts.is_empty() {
            "none".to_owned()
        } else {
            counts
                .iter()
                .map(|(class, n)| format!("{} {n}", class.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let held = plane.hold(&name).await.map(|hold| {
            format!(
                "held: {} wants {}, refused: {}; {}",
                hold.source, hold.wanted, hold.refusal.reason, hold.refusal.remedy
            )
        });
        let recent = crate::shadow::list_mismatches(&plane.db, &name, 5)
            .await?
            .into_iter()
            .map(|m| Recent {
                when: format_micros(m.at),
                key: m.key,
                class: m.class.as_str(),
                stage: m.stage,
                diff: serde_json::to_string_pretty(&m.diff).unwrap_or_default(),
            })
            .collect();
        let s = &record.state;
        let next = Stage::ALL.get(s.stage as usize + 1).copied();
        let moves = [
            ("rollback", "Roll back", s.stage.rollback_target()),
            ("advance", "Advance", next),
        ]
        .into_iter()
        .filter_map(|(id, label, to)| {
            let to = to?;
            Some(MoveForm {
                id: format!("{id}-{name}"),
                label,
                to: to.as_str(),
                refusal: refusal(&record, to),
            })
        })
        .collect();
        let pipeline = Stage::ALL
            .iter()
            .map(|&stage| {
                let (class, note) = if stage == s.stage {
                    ("current", "current".to_owned())
                } else {
                    match transition::check(&s.migration, s.stage, stage, &record.evidence) {
                        Verdict::Refused(r) => ("refused", r.reason),
                        _ => ("allowed", "allowed now".to_owned()),
                    }
                };
                PipelineStage {
                    stage: stage.as_str(),
                    class,
                    note,
                }
            })
            .collect();
        migrations.push(Row {
            stage: s.stage.as_str(),
            held,
            version: s.version,
            when: format_micros(s.updated_at),
            by: s.updated_by.clone(),
            why: s.reason.clone(),
            backfill,
            verify: record
                .evidence
                .verify_clean_at
                .map_or_else(|| "never".into(), format_micros),
            mismatches,
            moves,
            pipeline,
            charts,
            recent,
            name,
            unreadable: None,
        });
    }
    let csrf = who.csrf();
    Page {
        who: &who.name,
        csrf: &csrf,
        done: done.map(|d| d.chars().take(300).collect()),
        error,
        migrations,
    }
    .render()
    .map_err(|e| Error::Internal(format!("the admin page failed to render: {e}")))
}

/// Why the rules refuse moving `record` to `to`, with the remedy; `None` when allowed.
fn refusal(record: &MigrationRecord, to: Stage) -> Option<String> {
    let s = &record.state;
    match transition::check(&s.migration, s.stage, to, &record.evidence) {
        Verdict::Refused(r) => Some(format!("{} ({})", r.reason, r.remedy)),
        _ => None,
    }
}

#[derive(Deserialize)]
struct StageForm {
    migration: String,
    to: String,
    expected_version: i64,
    reason: String,
    confirm: Option<String>,
    csrf: String,
}

async fn set_stage(
    State(state): State<AdminState>,
    Extension(who): Extension<AdminIdentity>,
    form: Result<Form<StageForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let fail = async |status: StatusCode, msg: String| {
        match render(&state, &who, None, Some(&msg)).await {
            Ok(html) => (status, Html(html)).into_response(),
            // Plain text: nothing to escape.
            Err(_) => (status, msg).into_response(),
        }
    };
    let Ok(Form(form)) = form else {
        return fail(
            StatusCode::BAD_REQUEST,
            "incomplete form: nothing changed".into(),
        )
        .await;
    };
    if !who.csrf_matches(&form.csrf) {
        return fail(
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong: reload the page; nothing changed".into(),
        )
        .await;
    }
    if form.confirm.as_deref() != Some("yes") {
        return fail(
            StatusCode::BAD_REQUEST,
            "tick confirm to change a stage; nothing changed".into(),
        )
        .await;
    }
    let to: Stage = match form.to.parse() {
        Ok(to) => to,
        Err(e) => return fail(StatusCode::BAD_REQUEST, format!("{e}; nothing changed")).await,
    };
    let change = StageChange::new(&form.migration, to, who.actor(), form.reason)
        .expect_version(form.expected_version);
    match state.plane.store.set_stage(change).await {
        Ok(outcome) => {
            let done = format!(
                "{}: {} -> {} (version {})",
                outcome.state.migration,
                outcome.from.map_or("?", |f| f.as_str()),
                outcome.state.stage,
                outcome.state.version
            );
            let location = format!("/admin?done={}", url_encode(&done));
            Redirect::to(&location).into_response()
        }
        Err(err) => {
            let status = match &err {
                Error::Refused(_) | Error::VersionConflict { .. } => StatusCode::CONFLICT,
                Error::UnknownMigration(_) => StatusCode::NOT_FOUND,
                Error::Unreachable(_) | Error::Database(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            fail(status, format!("{err}; nothing changed")).await
        }
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value reaches the page escaped by the template engine: text, attribute values
    /// (a migration name in an `id`), a diff, the sign-in error.
    #[test]
    fn every_value_on_the_page_is_escaped() {
        let evil = "<script>alert(1)</script>\"'&";
        let page = Page {
            who: evil,
            csrf: evil,
            done: Some(evil.into()),
            error: Some(evil),
            migrations: vec![Row {
                name: evil.into(),
                stage: "shadow",
                held: Some(evil.into()),
                when: evil.into(),
                by: evil.into(),
                why: evil.into(),
                backfill: evil.into(),
                verify: evil.into(),
                mismatches: evil.into(),
                moves: vec![MoveForm {
                    id: format!("advance-{evil}"),
                    label: "Advance",
                    to: "live",
                    refusal: Some(evil.into()),
                }],
                pipeline: vec![PipelineStage {
                    stage: "live",
                    class: "refused",
                    note: evil.into(),
                }],
                recent: vec![Recent {
                    when: evil.into(),
                    key: evil.into(),
                    class: "confirmed",
                    stage: evil.into(),
                    diff: evil.into(),
                }],
                ..Row::default()
            }],
        }
        .render()
        .unwrap();
        assert!(!page.contains("<script>alert"), "{page}");
        assert!(!page.contains("\"'&"), "{page}");
        // Each of the 20 fields at least once (the name several times), all escaped.
        let escaped = page
            .matches("&#60;script&#62;alert(1)&#60;/script&#62;")
            .count();
        assert!(escaped >= 20, "{escaped}: {page}");
        let login = login_page(Some(evil));
        assert!(
            !login.contains("<script>alert") && login.contains("&#60;script&#62;"),
            "{login}"
        );
    }
}
