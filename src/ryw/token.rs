//! The read-your-writes token: where the primary's WAL was after a request's write committed,
//! signed, so a later request from the same client can ask for a replica that has replayed at
//! least that far.
//!
//! Wire form (header `x-twintrack-ryw`, at most [`MAX_LEN`] bytes):
//!
//! ```text
//! v1.<lsn as 16 hex digits, or "-">.<system identifier>.<timeline>.<issued at, ms>.<HMAC-SHA256 hex>
//! ```
//!
//! The signature covers everything before it. A token is only ever a hint: a missing, garbled,
//! oversized, forged, expired or other-cluster token is ignored (the caller counts the
//! [`Rejection`]) and never makes a request fail or pin beyond the TTL.
//!
//! ```
//! use std::time::Duration;
//! use twintrack::ryw::{ClusterId, Lsn, Token, TokenSigner};
//!
//! let signer = TokenSigner::new(b"a secret of at least 16 bytes", Duration::from_secs(30)).unwrap();
//! let cluster = ClusterId { system_identifier: 7312345678901234567, timeline: 1 };
//! let token = Token { lsn: Some(Lsn(0x16_B374_D848)), cluster, issued_at_ms: 1_000 };
//! let header = signer.sign(&token);
//! assert_eq!(signer.verify(&header, cluster, 2_000), Ok(token));
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::util::push_hex;
use crate::{Error, Result};

/// The response and request header that carries the token.
pub const HEADER: &str = "x-twintrack-ryw";

/// [`HEADER`] as a header name, so looking it up or setting it parses nothing.
pub(crate) const HEADER_NAME: http::HeaderName = http::HeaderName::from_static(HEADER);

/// The longest token accepted; anything longer is rejected unread.
pub const MAX_LEN: usize = 256;

/// Tokens issued further in the future than this (clock skew between instances) are rejected.
const MAX_SKEW_MS: u64 = 5_000;

/// A PostgreSQL WAL position (`pg_lsn`), as a 64-bit integer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lsn(pub u64);

impl FromStr for Lsn {
    type Err = Error;

    /// Parses PostgreSQL's text form, `16/B374D848`.
    fn from_str(s: &str) -> Result<Lsn> {
        let bad = || Error::InvalidInput(format!("invalid WAL position {s:?}"));
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn((hi << 32) | lo))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// Which PostgreSQL cluster (and timeline) a WAL position belongs to. A position from another
/// cluster, or from before a failover, says nothing about this one's replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClusterId {
    /// `pg_control_system().system_identifier`.
    pub system_identifier: u64,
    /// The primary's current timeline.
    pub timeline: u32,
}

/// What a token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// The primary's WAL position after the write committed; `None` where there is no WAL
    /// position to give (SQLite): the token then pins reads to the primary for its TTL.
    pub lsn: Option<Lsn>,
    /// The cluster the position belongs to.
    pub cluster: ClusterId,
    /// When it was issued (ms since the Unix epoch).
    pub issued_at_ms: u64,
}

/// Why a token was ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Longer than [`MAX_LEN`].
    Oversized,
    /// Not in the token's format.
    Garbled,
    /// The signature does not match (tampered, or signed with another secret).
    Forged,
    /// Older than the TTL.
    Expired,
    /// Issued in the future, beyond the allowed clock skew.
    FromTheFuture,
    /// Issued for another cluster or timeline.
    ForeignCluster,
}

impl Rejection {
    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Oversized => "oversized",
            Rejection::Garbled => "garbled",
            Rejection::Forged => "forged",
            Rejection::Expired => "expired",
            Rejection::FromTheFuture => "future",
            Rejection::ForeignCluster => "foreign_cluster",
        }
    }
}

/// Signs and verifies tokens with one secret. Cheap to clone.
#[derive(Clone)]
pub struct TokenSigner {
    mac: Hmac<Sha256>,
    ttl: Duration,
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// A signer with `secret` (at least 16 bytes) and tokens valid for `ttl` (at most 10 min).
    pub fn new(secret: &[u8], ttl: Duration) -> Result<TokenSigner> {
        if secret.len() < 16 {
            return Err(Error::Config(
                "the read-your-writes secret must be at least 16 bytes".into(),
            ));
        }
        if ttl.is_zero() || ttl > Duration::from_secs(600) {
            return Err(Error::Config(
                "the read-your-writes token TTL must be between 1 ms and 10 minutes".into(),
            ));
        }
        let mac = Hmac::<Sha256>::new_from_slice(secret)
            .map_err(|e| Error::Config(format!("read-your-writes secret: {e}")))?;
        Ok(TokenSigner { mac, ttl })
    }

    /// How long a token is honoured.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn payload(token: &Token) -> String {
        use std::fmt::Write as _;
        // One buffer, with room for the longest payload (72 bytes) and the signature `sign`
        // appends (65).
        let mut out = String::with_capacity(144);
        out.push_str("v1.");
        let _ = match token.lsn {
            Some(Lsn(v)) => write!(out, "{v:016x}"),
            None => write!(out, "-"),
        };
        let _ = write!(
            out,
            ".{}.{}.{}",
            token.cluster.system_identifier, token.cluster.timeline, token.issued_at_ms
        );
        out
    }

    fn signature(&self, payload: &str) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(payload.as_bytes());
        mac
    }

    /// The header value for `token`.
    pub fn sign(&self, token: &Token) -> String {
        let payload = TokenSigner::payload(token);
        let tag = self.signature(&payload).finalize().into_bytes();
        let mut out = payload;
        out.push('.');
        push_hex(&mut out, &tag);
        out
    }

    /// Checks a header value against this cluster at `now_ms`. The signature is compared in
    /// constant time.
    pub fn verify(
        &self,
        value: &str,
        cluster: ClusterId,
        now_ms: u64,
    ) -> std::result::Result<Token, Rejection> {
        if value.len() > MAX_LEN {
            return Err(Rejection::Oversized);
        }
        let (payload, tag_hex) = value.rsplit_once('.').ok_or(Rejection::Garbled)?;
        let tag = decode_hex(tag_hex).ok_or(Rejection::Garbled)?;
        let token = parse_payload(payload).ok_or(Rejection::Garbled)?;
        self.signature(payload)
            .verify_slice(&tag)
            .map_err(|_| Rejection::Forged)?;
        if token.cluster != cluster {
            return Err(Rejection::ForeignCluster);
        }
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        if token.issued_at_ms > now_ms.saturating_add(MAX_SKEW_MS) {
            return Err(Rejection::FromTheFuture);
        }
        if now_ms > token.issued_at_ms.saturating_add(ttl_ms) {
            return Err(Rejection::Expired);
        }
        Ok(token)
    }
}

fn parse_payload(payload: &str) -> Option<Token> {
    let mut parts = payload.split('.');
    let (version, lsn, sysid, timeline, issued) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if version != "v1" || parts.next().is_some() {
        return None;
    }
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let lsn = match lsn {
        "-" => None,
        hex if hex.len() == 16 && hex.bytes().all(is_lower_hex) => {
            Some(Lsn(u64::from_str_radix(hex, 16).ok()?))
        }
        _ => return None,
    };
    if !digits(sysid) || !digits(timeline) || !digits(issued) {
        return None;
    }
    Some(Token {
        lsn,
        cluster: ClusterId {
            system_identifier: sysid.parse().ok()?,
            timeline: timeline.parse().ok()?,
        },
        issued_at_ms: issued.parse().ok()?,
    })
}

/// Lowercase only, as `sign` writes it: every token has exactly one valid spelling.
fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// A tag's 32 bytes from its 64 lowercase hex digits.
fn decode_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(is_lower_hex) {
        return None;
    }
    let mut tag = [0u8; 32];
    hex::decode_to_slice(s, &mut tag).ok()?;
    Some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: ClusterId = ClusterId {
        system_identifier: 7_312_345_678_901_234_567,
        timeline: 3,
    };

    fn signer() -> TokenSigner {
        TokenSigner::new(b"0123456789abcdef0123", Duration::from_secs(30)).unwrap()
    }

    fn token() -> Token {
        Token {
            lsn: Some(Lsn(0x16_B374_D848)),
            cluster: CLUSTER,
            issued_at_ms: 1_800_000_000_000,
        }
    }

    #[test]
    fn lsn_text_round_trips() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>().unwrap(), Lsn(0));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>().unwrap(), Lsn(u64::MAX));
        for bad in ["", "16", "/1", "1/", "G/1", "1/2/3", "123456789/0", " 1/2"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
        assert!(Lsn(5) < "0/6".parse().unwrap());
    }

    #[test]
    fn signs_and_verifies_both_kinds() {
        let s = signer();
        let now = token().issued_at_ms + 10_000;
        assert_eq!(s.verify(&s.sign(&token()), CLUSTER, now), Ok(token()));
        let timed = Token {
            lsn: None,
            ..token()
        };
        assert_eq!(s.verify(&s.sign(&timed), CLUSTER, now), Ok(timed));
        assert!(s.sign(&token()).len() <= MAX_LEN);
    }

    #[test]
    fn rejects_what_it_must() {
        let s = signer();
        let t = token();
        let now = t.issued_at_ms + 1;
        let good = s.sign(&t);
        let other_secret =
            TokenSigner::new(b"another secret, 16+ bytes", Duration::from_secs(30)).unwrap();
        let cases = [
            ("x".repeat(MAX_LEN + 1), Rejection::Oversized),
            (String::new(), Rejection::Garbled),
            ("v1".into(), Rejection::Garbled),
            (good.replace("v1.", "v2."), Rejection::Garbled),
            (good[..good.len() - 1].to_owned(), Rejection::Garbled),
            (format!("{good}00"), Rejection::Garbled),
            (good.replacen(".3.", ".+3.", 1), Rejection::Garbled),
            (other_secret.sign(&t), Rejection::Forged),
            // Tampered: a bigger LSN, with the old signature.
            (
                format!(
                    "{}{}",
                    s.sign(&Token {
                        lsn: Some(Lsn(u64::MAX)),
                        ..t
                    })
                    .rsplit_once('.')
                    .unwrap()
                    .0,
                    &good[good.rfind('.').unwrap()..]
                ),
                Rejection::Forged,
            ),
            (
                s.sign(&Token {
                    cluster: ClusterId {
                        timeline: 4,
                        ..CLUSTER
                    },
                    ..t
                }),
                Rejection::ForeignCluster,
            ),
            (
                s.sign(&Token {
                    cluster: ClusterId {
                        system_identifier: 1,
                        ..CLUSTER
                    },
                    ..t
                }),
                Rejection::ForeignCluster,
            ),
        ];
        for (value, why) in cases {
            assert_eq!(s.verify(&value, CLUSTER, now), Err(why), "{value:?}");
        }
        assert_eq!(
            s.verify(&good, CLUSTER, t.issued_at_ms + 30_001),
            Err(Rejection::Expired)
        );
        assert_eq!(s.verify(&good, CLUSTER, t.issued_at_ms + 30_000), Ok(t));
        assert_eq!(
            s.verify(&good, CLUSTER, t.issued_at_ms - 5_001),
            Err(Rejection::FromTheFuture)
        );
    }

    #[test]
    fn random_and_mutated_input_never_panics_and_never_verifies() {
        let s = signer();
        let good = s.sign(&token());
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            state >> 33
        };
        let alphabet: Vec<char> = "v1.-0123456789abcdefABCDEF/xyz \u{e9}\u{1F600}"
            .chars()
            .collect();
        for case in 0..50_000 {
            let value: String = if case % 2 == 0 {
                let len = (next() % 120) as usize;
                (0..len)
                    .map(|_| alphabet[(next() as usize) % alphabet.len()])
                    .collect()
            } else {
                // One character of a valid token changed.
                let mut chars: Vec<char> = good.chars().collect();
                let i = (next() as usize) % chars.len();
                let replacement = alphabet[(next() as usize) % alphabet.len()];
                if chars[i] == replacement {
                    continue;
                }
                chars[i] = replacement;
                chars.into_iter().collect()
            };
            assert!(
                s.verify(&value, CLUSTER, token().issued_at_ms).is_err(),
                "{value:?} verified"
            );
        }
    }

    #[test]
    fn weak_configuration_is_refused() {
        assert!(TokenSigner::new(b"short", Duration::from_secs(30)).is_err());
        assert!(TokenSigner::new(b"0123456789abcdef", Duration::ZERO).is_err());
        assert!(TokenSigner::new(b"0123456789abcdef", Duration::from_secs(3600)).is_err());
    }
}
