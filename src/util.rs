//! Small helpers shared across modules.

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    out
}

/// Appends the lowercase hex of `bytes` to `out`, by the `hex` crate's table in chunks on the
/// stack: a token's 32-byte tag costs a few hundred instructions, where `write!("{:02x}")`
/// per byte cost 8,000.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    let mut buf = [0u8; 128];
    for chunk in bytes.chunks(buf.len() / 2) {
        let digits = &mut buf[..chunk.len() * 2];
        if hex::encode_to_slice(chunk, digits).is_ok()
            && let Ok(text) = std::str::from_utf8(digits)
        {
            out.push_str(text);
        }
    }
}

/// `2026-11-21T04:05:06Z` from µs since the Unix epoch (UTC; no time-zone database needed).
#[cfg_attr(not(any(feature = "cli", feature = "control")), allow(dead_code))]
pub(crate) fn format_micros(micros: i64) -> String {
    if micros <= 0 {
        return "-".into();
    }
    // Whole seconds for people; `--json` carries the microseconds.
    crate::util::rfc3339::format(micros - micros.rem_euclid(1_000_000))
        .unwrap_or_else(|| format!("{micros} µs"))
}

/// Timestamps (µs since the Unix epoch, the unit of twintrack's tables) as RFC 3339 text in
/// UTC with microseconds (`2026-12-01T15:04:05.123456Z`), for JSON; use with
/// `#[serde(with = "crate::util::rfc3339")]` (or `rfc3339::option` for an `Option`).
/// Formatting and parsing are the `time` crate's.
pub(crate) mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use time::format_description::well_known::Rfc3339;
    use time::{OffsetDateTime, UtcOffset};

    /// `micros` as RFC 3339 text (UTC); `None` when out of the representable range.
    pub(crate) fn format(micros: i64) -> Option<String> {
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000).ok()?;
        at.to_offset(UtcOffset::UTC).format(&Rfc3339).ok()
    }

    /// RFC 3339 text (any offset) as µs since the epoch.
    pub(crate) fn parse(text: &str) -> Option<i64> {
        let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
        i64::try_from(at.unix_timestamp_nanos() / 1000).ok()
    }

    /// RFC 3339 text; a value outside years 0–9999 (a hand-edited row, nanoseconds stored as
    /// µs) stays the integer it is, so one bad row does not fail a whole listing.
    pub(crate) fn serialize<S: Serializer>(micros: &i64, s: S) -> Result<S::Ok, S::Error> {
        match format(*micros) {
            Some(text) => s.serialize_str(&text),
            None => s.serialize_i64(*micros),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).ok_or_else(|| D::Error::custom(format!("not an RFC 3339 timestamp: {text:?}")))
    }

    /// The same for `Option<i64>` (`null` when `None`).
    pub(crate) mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        pub(crate) fn serialize<S: Serializer>(
            micros: &Option<i64>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match micros {
                Some(m) => super::serialize(m, s),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<i64>, D::Error> {
            let text = Option::<String>::deserialize(d)?;
            text.map(|t| {
                super::parse(&t).ok_or_else(|| {
                    <D::Error as serde::de::Error>::custom(format!(
                        "not an RFC 3339 timestamp: {t:?}"
                    ))
                })
            })
            .transpose()
        }
    }

    #[cfg(test)]
    mod tests {
        use super::{format, parse};

        #[derive(serde::Serialize)]
        struct Wrapped(#[serde(with = "super")] i64);

        #[test]
        fn round_trips_in_utc_with_microseconds() {
            assert_eq!(format(0).unwrap(), "1970-01-01T00:00:00Z");
            assert_eq!(format(951_782_400_000_000).unwrap(), "2000-02-29T00:00:00Z");
            assert_eq!(
                format(1_795_233_906_123_456).unwrap(),
                "2026-11-21T04:05:06.123456Z"
            );
            assert_eq!(format(-1).unwrap(), "1969-12-31T23:59:59.999999Z");
            for micros in [0, 1, -1, 951_782_400_000_000, 1_795_233_906_123_456] {
                assert_eq!(parse(&format(micros).unwrap()), Some(micros));
            }
            assert_eq!(
                parse("2026-11-21T05:05:06.5+01:00"),
                Some(1_795_233_906_500_000)
            );
            assert_eq!(format(i64::MAX), None);
            let out_of_range = serde_json::to_string(&Wrapped(i64::MAX)).unwrap();
            assert_eq!(out_of_range, i64::MAX.to_string());
            assert_eq!(
                serde_json::to_string(&Wrapped(0)).unwrap(),
                "\"1970-01-01T00:00:00Z\""
            );
            for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "1795233906"] {
                assert_eq!(parse(bad), None, "{bad}");
            }
        }
    }
}

#[cfg(test)]
mod hex_tests {
    use super::hex;

    #[test]
    fn hex_is_lowercase_two_digits_a_byte_across_chunks() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        // Longer than one stack chunk (64 bytes): every byte, in order.
        let bytes: Vec<u8> = (0..=255).collect();
        let expected: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&bytes), expected);
    }
}
