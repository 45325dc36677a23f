//! The admin page: server-rendered HTML, no front-end build step.
//!
//! One table row per migration: stage, version, last change (who, why, when), backfill
//! progress, last clean verify, mismatches by class over the last 15 minutes, and the newest
//! mismatches with their diffs. Each row has a rollback and an advance button; each asks for a
//! reason and a confirmation tick, carries the version it was rendered at (so it never undoes a
//! change it did not show) and a CSRF token, and is disabled, with the refusal's reason, when
//! the transition rules forbid the move. The page reloads itself every 5 s unless a form is
//! being filled in.

use std::fmt::Write as _;
use std::sync::Arc;

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

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}\
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:.4rem;text-align:left;vertical-align:top}\
.stage{font-weight:bold}.refused{color:#a40;font-size:.85em}.done{background:#e6f4e6;padding:.5rem}.err{background:#fbe9e7;padding:.5rem}\
form.move{margin:.2rem 0}pre{white-space:pre-wrap;font-size:.8em;margin:0}";

pub(crate) fn login_page(error: Option<&str>) -> String {
    let error = error
        .map(|e| format!("<p class=\"err\" id=\"error\">{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>twintrack: sign in</title><style>{STYLE}</style></head>\
<body><h1>twintrack</h1>{error}<form method=\"post\" action=\"/login\">\
<label>Admin token <input type=\"password\" name=\"token\" id=\"token\" required autofocus></label> \
<button type=\"submit\" id=\"login\">Sign in</button></form></body></html>"
    )
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
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, esc(&e.to_string())).into_response(),
    }
}

async fn render(
    state: &AdminState,
    who: &AdminIdentity,
    done: Option<&str>,
    error: Option<&str>,
) -> crate::Result<String> {
    let plane = &state.plane;
    let csrf = who.csrf();
    let mut html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>twintrack</title><style>{STYLE}</style></head><body>\
<h1>twintrack migrations</h1><p>Signed in as <b>{}</b>. \
<form method=\"post\" action=\"/logout\" style=\"display:inline\"><button>Sign out</button></form></p>",
        esc(&who.name)
    );
    if let Some(done) = done {
        let _ = write!(
            html,
            "<p class=\"done\" id=\"done\">{}</p>",
            esc(&done.chars().take(300).collect::<String>())
        );
    }
    if let Some(error) = error {
        let _ = write!(html, "<p class=\"err\" id=\"error\">{}</p>", esc(error));
    }
    html.push_str(
        "<table><thead><tr><th>migration</th><th>stage</th><th>version</th><th>last change</th>\
<th>backfill</th><th>last clean verify</th><th>mismatches (15 min)</th><th>actions</th></tr></thead><tbody>",
    );
    let since = now_micros() - 15 * 60 * 1_000_000;
    let mut details = String::new();
    for flag in plane.store.load_all().await? {
        let name = flag.migration.clone();
        let record = match plane.store.get(&name).await {
            Ok(record) => record,
            Err(e) => {
                let _ = write!(
                    html,
                    "<tr><td>{}</td><td colspan=\"7\" class=\"refused\">unreadable: {}</td></tr>",
                    esc(&name),
                    esc(&e.to_string())
                );
                continue;
            }
        };
        let runs = crate::backfill::latest_runs(&plane.db, &name).await?;
        let backfill = runs
            .iter()
            .find(|r| r.direction == "forward")
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
        let counts = if counts.is_empty() {
            "none".to_owned()
        } else {
            counts
                .iter()
                .map(|(class, n)| format!("{} {n}", class.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let s = &record.state;
        let held = match plane.hold(&name).await {
            Some(hold) => format!(
                "<div class=\"refused\" id=\"held-{}\">held: {} wants {}, refused: {}; {}</div>",
                esc(&name),
                esc(&hold.source),
                hold.wanted,
                esc(&hold.refusal.reason),
                esc(&hold.refusal.remedy)
            ),
            None => String::new(),
        };
        let _ = write!(
            html,
            "<tr id=\"m-{id}\"><td>{name}</td><td class=\"stage\" id=\"stage-{id}\">{stage}{held}</td><td>{version}</td>\
<td>{when} by {by}<br><i>{why}</i></td><td>{backfill}</td><td>{verify}</td><td>{counts}</td><td>",
            id = esc(&name),
            name = esc(&name),
            stage = s.stage.as_str(),
            version = s.version,
            when = format_micros(s.updated_at),
            by = esc(&s.updated_by),
            why = esc(&s.reason),
            backfill = esc(&backfill),
            verify = record
                .evidence
                .verify_clean_at
                .map_or_else(|| "never".into(), format_micros),
            counts = esc(&counts),
        );
        let next = Stage::ALL.get(s.stage as usize + 1).copied();
        for (label, to) in [("Roll back", s.stage.rollback_target()), ("Advance", next)] {
            if let Some(to) = to {
                move_form(&mut html, &record, label, to, &csrf);
            }
        }
        html.push_str("</td></tr>");
        let recent = crate::shadow::list_mismatches(&plane.db, &name, 5).await?;
        if !recent.is_empty() {
            let _ = write!(
                details,
                "<h3>Recent mismatches: {}</h3><table><tr><th>when</th><th>key</th><th>class</th><th>stage</th><th>diff</th></tr>",
                esc(&name)
            );
            for m in recent {
                let _ = write!(
                    details,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
                    format_micros(m.at),
                    m.key,
                    m.class.as_str(),
                    esc(&m.stage),
                    esc(&serde_json::to_string_pretty(&m.diff).unwrap_or_default())
                );
            }
            details.push_str("</table>");
        }
    }
    html.push_str("</tbody></table>");
    html.push_str(&details);
    html.push_str(
        "<script>setInterval(function(){var busy=document.activeElement&&document.activeElement.tagName==='INPUT';\
var typed=Array.prototype.some.call(document.querySelectorAll('input[name=reason]'),function(i){return i.value!=='';});\
if(!busy&&!typed){location.replace('/admin');}},5000);</script></body></html>",
    );
    Ok(html)
}

fn move_form(html: &mut String, record: &MigrationRecord, label: &str, to: Stage, csrf: &str) {
    let s = &record.state;
    let refusal = match transition::check(&s.migration, s.stage, to, &record.evidence) {
        Verdict::Refused(r) => Some(format!("{} ({})", r.reason, r.remedy)),
        _ => None,
    };
    let disabled = if refusal.is_some() { " disabled" } else { "" };
    let id = format!(
        "{}-{}",
        if label == "Roll back" {
            "rollback"
        } else {
            "advance"
        },
        s.migration
    );
    let _ = write!(
        html,
        "<form class=\"move\" method=\"post\" action=\"/admin/stage\" id=\"{id}\">\
<input type=\"hidden\" name=\"migration\" value=\"{m}\"><input type=\"hidden\" name=\"to\" value=\"{to}\">\
<input type=\"hidden\" name=\"expected_version\" value=\"{v}\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
<input name=\"reason\" placeholder=\"reason\" required maxlength=\"1000\"{disabled}> \
<label><input type=\"checkbox\" name=\"confirm\" value=\"yes\" required{disabled}> confirm</label> \
<button type=\"submit\"{disabled}>{label} to {to}</button>",
        id = esc(&id),
        m = esc(&s.migration),
        to = to.as_str(),
        v = s.version,
    );
    if let Some(refusal) = refusal {
        let _ = write!(
            html,
            "<div class=\"refused\">refused: {}</div>",
            esc(&refusal)
        );
    }
    html.push_str("</form>");
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
        let html = render(&state, &who, None, Some(&msg))
            .await
            .unwrap_or_else(|_| esc(&msg));
        (status, Html(html)).into_response()
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
