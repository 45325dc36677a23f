//! Printing: human text on stdout, or JSON with `--json`; errors always on stderr (and, with
//! `--json`, also as a JSON object on stdout so scripts can read the reason).

use serde::Serialize;

use crate::Error;

/// Where command output goes.
pub(crate) struct Output {
    json: bool,
}

impl Output {
    pub(crate) fn new(json: bool) -> Output {
        Output { json }
    }

    /// Prints `value` as JSON, or `human` when not in JSON mode.
    pub(crate) fn print<T: Serialize>(&self, value: &T, human: impl FnOnce() -> String) {
        if self.json {
            match serde_json::to_string_pretty(value) {
                Ok(text) => println!("{text}"),
                Err(e) => eprintln!("error: cannot encode output as JSON: {e}"),
            }
        } else {
            let text = human();
            if !text.is_empty() {
                println!("{text}");
            }
        }
    }

    pub(crate) fn is_json(&self) -> bool {
        self.json
    }

    pub(crate) fn error(&self, err: &Error) {
        eprintln!("error: {err}");
        if self.json {
            let mut body = serde_json::json!({
                "error": err.to_string(),
                "exit_code": super::exit_code(err),
            });
            if let Error::Refused(refusal) = err {
                body["refusal"] = serde_json::json!(refusal);
            }
            println!("{body}");
        }
    }
}

pub(crate) use crate::util::format_micros;

#[cfg(test)]
mod tests {
    use super::format_micros;

    #[test]
    fn formats_utc() {
        assert_eq!(format_micros(0), "-");
        assert_eq!(format_micros(1_000_000), "1970-01-01T00:00:01Z");
        assert_eq!(format_micros(951_782_400_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_micros(1_795_233_906_000_000), "2026-11-21T04:05:06Z");
    }
}
