//! Bearer-token authentication for the control plane, as a tower layer (axum middleware).
//!
//! Tokens come from `TWINTRACK_ADMIN_TOKEN`: either one token (its holder is named `admin`), or
//! `name=token` pairs separated by commas. Each token is at least 16 characters. A request is
//! let in by `authorization: Bearer <token>`, or, for the admin page in a browser, by a
//! **server-side session**: `POST /login` with the form field `token` creates one and sets the
//! `twintrack_session` cookie to its id (256 random bits from the OS; `HttpOnly;
//! SameSite=Strict`, `Secure` behind TLS, `Max-Age` = [`SESSION_TTL`]). The cookie never holds
//! the token. A session ends at its expiry or at `POST /logout`; every session holds its own
//! random CSRF token for the page's forms. Tokens, session ids and CSRF tokens are compared in
//! constant time (`subtle`; tokens as SHA-256 digests, every configured token checked). The
//! holder's name is what the audit log records (`admin:<name>`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{Error, Result};

/// The cookie holding the admin page's session id.
pub(crate) const COOKIE: &str = "twintrack_session";

/// How long a sign-in lasts.
pub const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(8 * 3600);

/// Sessions kept at most (the oldest go first past it).
const MAX_SESSIONS: u64 = 10_000;

/// Who a request was authenticated as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminIdentity {
    /// The token's configured name.
    pub name: String,
    /// The CSRF token this holder's forms carry: the session's own (random), or for a bearer
    /// token one derived from its digest (a browser never sends a bearer token by itself).
    csrf: String,
    /// The session this request came with, if by cookie.
    session: Option<String>,
}

impl AdminIdentity {
    fn bearer(name: &str, digest: &[u8; 32]) -> AdminIdentity {
        let mut mac = Hmac::<Sha256>::new_from_slice(digest).expect("HMAC takes any key");
        mac.update(b"twintrack csrf v1");
        AdminIdentity {
            name: name.to_owned(),
            csrf: crate::util::hex(&mac.finalize().into_bytes()),
            session: None,
        }
    }

    /// The audit log's actor for this holder.
    pub fn actor(&self) -> String {
        format!("admin:{}", self.name)
    }

    /// The CSRF token this holder's forms carry.
    pub(crate) fn csrf(&self) -> String {
        self.csrf.clone()
    }

    /// Whether `presented` is this holder's CSRF token (constant time).
    pub(crate) fn csrf_matches(&self, presented: &str) -> bool {
        bool::from(self.csrf.as_bytes().ct_eq(presented.as_bytes()))
    }

    /// The session id, when signed in by cookie.
    pub(crate) fn session(&self) -> Option<&str> {
        self.session.as_deref()
    }
}

/// The configured admin tokens, and the admin page's sessions.
#[derive(Clone)]
pub struct AdminTokens {
    tokens: Vec<(String, [u8; 32])>,
    /// Session id → the identity it signs in (its CSRF token included); expires by itself.
    sessions: moka::sync::Cache<String, AdminIdentity>,
    session_ttl: std::time::Duration,
}

impl std::fmt::Debug for AdminTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.tokens.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("AdminTokens")
            .field("names", &names)
            .finish()
    }
}

impl AdminTokens {
    /// Parses `TWINTRACK_ADMIN_TOKEN`'s format: `token`, or `name=token,name=token`.
    pub fn parse(spec: &str) -> Result<AdminTokens> {
        let mut tokens = Vec::new();
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, token) = match part.split_once('=') {
                Some((name, token)) => (name.trim(), token.trim()),
                None => ("admin", part),
            };
            let name_ok = !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
            if !name_ok {
                return Err(Error::Config(format!(
                    "admin token name {name:?}: 1 to 64 letters, digits, '-', '_', '.' or '@'"
                )));
            }
            if token.len() < 16 || !token.chars().all(|c| c.is_ascii_graphic()) {
                return Err(Error::Config(format!(
                    "the admin token of {name:?} must be at least 16 visible ASCII characters"
                )));
            }
            if tokens.iter().any(|(n, _): &(String, _)| n == name) {
                return Err(Error::Config(format!(
                    "admin token name {name:?} is given twice"
                )));
            }
            tokens.push((name.to_owned(), digest(token.as_bytes())));
        }
        if tokens.is_empty() {
            return Err(Error::Config(
                "no admin token: set TWINTRACK_ADMIN_TOKEN (a token of 16+ characters, or name=token pairs)".into(),
            ));
        }
        Ok(AdminTokens {
            tokens,
            sessions: sessions(SESSION_TTL),
            session_ttl: SESSION_TTL,
        })
    }

    /// Sign-ins last `ttl` instead of [`SESSION_TTL`] (existing sessions are dropped).
    pub fn with_session_ttl(mut self, ttl: std::time::Duration) -> AdminTokens {
        self.sessions = sessions(ttl);
        self.session_ttl = ttl;
        self
    }

    /// How long a sign-in lasts.
    pub(crate) fn session_ttl(&self) -> std::time::Duration {
        self.session_ttl
    }

    /// Signs the holder of `token` in: a new session, its id to put in the cookie.
    pub(crate) fn sign_in(&self, token: &[u8]) -> Option<String> {
        let who = self.verify(token)?;
        let id = random_hex()?;
        let identity = AdminIdentity {
            name: who.name,
            csrf: random_hex()?,
            session: Some(id.clone()),
        };
        self.sessions.insert(id.clone(), identity);
        Some(id)
    }

    /// Ends a session (sign-out).
    pub(crate) fn sign_out(&self, session: &str) {
        self.sessions.invalidate(session);
    }

    /// The holder of `token`, checking every configured token in constant time.
    pub fn verify(&self, token: &[u8]) -> Option<AdminIdentity> {
        let presented = digest(token);
        let mut found = None;
        for (name, expected) in &self.tokens {
            if bool::from(expected.ct_eq(&presented)) && found.is_none() {
                found = Some(AdminIdentity::bearer(name, &presented));
            }
        }
        found
    }

    /// The holder named by a request's bearer token or login cookie.
    pub(crate) fn holder_of(&self, headers: &HeaderMap) -> Option<AdminIdentity> {
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let value = value.as_bytes();
            let token = value
                .strip_prefix(b"Bearer ")
                .or_else(|| value.strip_prefix(b"bearer "))?;
            return self.verify(token.trim_ascii());
        }
        let id = crate::layer::cookie(headers, COOKIE)?;
        let id = std::str::from_utf8(id).ok()?;
        // A lookup by id; the stored id is compared again in constant time.
        let identity = self.sessions.get(id)?;
        let stored = identity.session.as_deref()?;
        bool::from(stored.as_bytes().ct_eq(id.as_bytes())).then_some(identity)
    }
}

fn sessions(ttl: std::time::Duration) -> moka::sync::Cache<String, AdminIdentity> {
    moka::sync::Cache::builder()
        .max_capacity(MAX_SESSIONS)
        .time_to_live(ttl)
        .build()
}

/// 256 bits from the operating system's generator, as hex; `None` if it fails.
fn random_hex() -> Option<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).ok()?;
    Some(crate::util::hex(&bytes))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// The middleware: `/metrics` and `/login` are open; everything else needs a holder. gRPC calls
/// without one get `UNAUTHENTICATED`; pages get 401 with the login form.
pub(crate) async fn require(
    State(tokens): State<std::sync::Arc<AdminTokens>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if path == "/metrics" || path == "/login" {
        return next.run(req).await;
    }
    match tokens.holder_of(req.headers()) {
        Some(identity) => {
            req.extensions_mut().insert(identity);
            next.run(req).await
        }
        None => {
            let grpc = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
            let presented = req.headers().contains_key(http::header::AUTHORIZATION);
            let why = if presented {
                "the bearer token is not valid"
            } else {
                "missing credentials: send `authorization: Bearer <token>`"
            };
            if grpc {
                let (parts, _) = tonic::Status::unauthenticated(why)
                    .into_http::<Body>()
                    .into_parts();
                Response::from_parts(parts, Body::empty())
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    [(http::header::WWW_AUTHENTICATE, "Bearer")],
                    axum::response::Html(super::admin::login_page(Some(why))),
                )
                    .into_response()
            }
        }
    }
}
