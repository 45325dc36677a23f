//! Bearer-token authentication for the control plane, as a tower layer (axum middleware).
//!
//! Tokens come from `TWINTRACK_ADMIN_TOKEN`: either one token (its holder is named `admin`), or
//! `name=token` pairs separated by commas. Each token is at least 16 characters. A request is
//! let in by `authorization: Bearer <token>`, or, for the admin page in a browser, by the
//! `twintrack_admin` cookie that `/login` sets (`HttpOnly; SameSite=Strict`). Tokens are
//! compared in constant time (SHA-256 digests, every configured token checked). The holder's
//! name is what the audit log records (`admin:<name>`).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The cookie the admin page's login sets.
pub(crate) const COOKIE: &str = "twintrack_admin";

/// Who a request was authenticated as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminIdentity {
    /// The token's configured name.
    pub name: String,
    /// The digest of the token used (keys the CSRF tokens of this holder's forms).
    digest: [u8; 32],
}

impl AdminIdentity {
    /// The audit log's actor for this holder.
    pub fn actor(&self) -> String {
        format!("admin:{}", self.name)
    }

    /// The CSRF token this holder's forms carry.
    pub(crate) fn csrf(&self) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.digest).expect("HMAC takes any key");
        mac.update(b"twintrack csrf v1");
        crate::util::hex(&mac.finalize().into_bytes())
    }

    /// Whether `presented` is this holder's CSRF token (constant time).
    pub(crate) fn csrf_matches(&self, presented: &str) -> bool {
        ct_eq(self.csrf().as_bytes(), presented.as_bytes())
    }
}

/// The configured admin tokens.
#[derive(Clone)]
pub struct AdminTokens {
    tokens: Vec<(String, [u8; 32])>,
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
        Ok(AdminTokens { tokens })
    }

    /// The holder of `token`, checking every configured token in constant time.
    pub fn verify(&self, token: &[u8]) -> Option<AdminIdentity> {
        let presented = digest(token);
        let mut found = None;
        for (name, expected) in &self.tokens {
            if ct_eq(expected, &presented) && found.is_none() {
                found = Some(AdminIdentity {
                    name: name.clone(),
                    digest: presented,
                });
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
        crate::layer::cookie(headers, COOKIE).and_then(|token| self.verify(token))
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Equality that takes the same time wherever the inputs differ (not only their lengths).
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
