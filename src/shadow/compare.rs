//! Comparing what the two sides returned: normalized serde values, ignored paths, redacted
//! fields, a field-level diff, and an optional custom comparator.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// A custom equality: `true` when the two (normalized) values count as the same.
pub type Comparator = Arc<dyn Fn(&Value, &Value) -> bool + Send + Sync>;

/// How two reads are compared.
#[derive(Clone, Default)]
pub struct Comparison {
    ignore: Vec<Vec<String>>,
    redact: Vec<String>,
    custom: Option<Comparator>,
}

impl fmt::Debug for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Comparison")
            .field("ignore", &self.ignore)
            .field("redact", &self.redact)
            .field("custom", &self.custom.is_some())
            .finish()
    }
}

/// One field that differs. `None` means the field (or the whole record) is absent on that side.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FieldDiff {
    /// Dotted path to the field (`""` for the whole value, `items[2].name` inside arrays).
    pub path: String,
    /// The legacy side's value (redacted fields read `"<redacted>"`).
    pub legacy: Option<Value>,
    /// The new side's value.
    pub new: Option<Value>,
}

impl Comparison {
    /// Equality of normalized values, nothing ignored or redacted.
    pub fn new() -> Comparison {
        Comparison::default()
    }

    /// Leaves this dotted path (`"meta.updated_at"`) out of the comparison on both sides.
    pub fn ignore(mut self, path: &str) -> Comparison {
        self.ignore
            .push(path.split('.').map(str::to_owned).collect());
        self
    }

    /// Shows fields with this name, at any depth, as `"<redacted>"` in diffs (they are still
    /// compared).
    pub fn redact(mut self, field: &str) -> Comparison {
        self.redact.push(field.to_owned());
        self
    }

    /// Uses `eq` instead of equality to decide whether two normalized values match; the diff
    /// is still computed field by field when they do not.
    pub fn comparator(
        mut self,
        eq: impl Fn(&Value, &Value) -> bool + Send + Sync + 'static,
    ) -> Comparison {
        self.custom = Some(Arc::new(eq));
        self
    }

    /// Normalizes both values and compares them. `Ok(())` when equal, else the differing fields.
    pub fn compare(&self, legacy: &Value, new: &Value) -> Result<(), Vec<FieldDiff>> {
        let legacy = self.prepare(legacy);
        let new = self.prepare(new);
        let equal = match &self.custom {
            Some(eq) => eq(&legacy, &new),
            None => legacy == new,
        };
        if equal {
            return Ok(());
        }
        let mut diffs = Vec::new();
        self.diff("", Some(&legacy), Some(&new), &mut diffs);
        if diffs.is_empty() {
            // The custom comparator said "different" about structurally equal values.
            diffs.push(FieldDiff {
                path: String::new(),
                legacy: Some(self.redacted(&legacy)),
                new: Some(self.redacted(&new)),
            });
        }
        Err(diffs)
    }

    fn prepare(&self, value: &Value) -> Value {
        let mut value = normalize(value);
        for path in &self.ignore {
            remove_path(&mut value, path);
        }
        value
    }

    fn diff(
        &self,
        path: &str,
        legacy: Option<&Value>,
        new: Option<&Value>,
        out: &mut Vec<FieldDiff>,
    ) {
        match (legacy, new) {
            (Some(Value::Object(a)), Some(Value::Object(b))) => {
                let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
                for key in keys {
                    let child = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    if self.redact.iter().any(|r| r == key) {
                        if a.get(key) != b.get(key) {
                            let shown = |v: Option<&Value>| v.map(|_| Value::from("<redacted>"));
                            out.push(FieldDiff {
                                path: child,
                                legacy: shown(a.get(key)),
                                new: shown(b.get(key)),
                            });
                        }
                        continue;
                    }
                    self.diff(&child, a.get(key), b.get(key), out);
                }
            }
            (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
                for (i, (x, y)) in a.iter().zip(b).enumerate() {
                    self.diff(&format!("{path}[{i}]"), Some(x), Some(y), out);
                }
            }
            (a, b) if a != b => out.push(FieldDiff {
                path: path.to_owned(),
                legacy: a.map(|v| self.redacted(v)),
                new: b.map(|v| self.redacted(v)),
            }),
            _ => {}
        }
    }

    fn redacted(&self, value: &Value) -> Value {
        match value {
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        let v = if self.redact.iter().any(|r| r == k) {
                            Value::from("<redacted>")
                        } else {
                            self.redacted(v)
                        };
                        (k.clone(), v)
                    })
                    .collect(),
            ),
            Value::Array(items) => Value::Array(items.iter().map(|v| self.redacted(v)).collect()),
            other => other.clone(),
        }
    }
}

/// The canonical form compared: object keys in order (serde_json maps are sorted), and numbers
/// that are whole written as integers (`1.0` and `1` are the same value).
pub fn normalize(value: &Value) -> Value {
    match value {
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(_), _) => value.clone(),
            (None, Some(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                Value::Number(Number::from(f as i64))
            }
            _ => value.clone(),
        },
        Value::Array(items) => Value::Array(items.iter().map(normalize).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect::<Map<_, _>>(),
        ),
        other => other.clone(),
    }
}

fn remove_path(value: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cursor = value;
    for part in parents {
        match cursor.get_mut(part.as_str()) {
            Some(next) => cursor = next,
            None => return,
        }
    }
    if let Value::Object(map) = cursor {
        map.remove(last.as_str());
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn equal_after_normalizing() {
        let c = Comparison::new();
        assert_eq!(
            c.compare(&json!({"a": 1, "b": [1.0]}), &json!({"b": [1], "a": 1.0})),
            Ok(())
        );
        assert!(c.compare(&json!({"a": 1.5}), &json!({"a": 1})).is_err());
    }

    #[test]
    fn diff_names_the_fields() {
        let c = Comparison::new();
        let diffs = c
            .compare(
                &json!({"theme": "dark", "n": true, "tags": ["a", "b"]}),
                &json!({"theme": "light", "n": true, "tags": ["a", "c"], "extra": 1}),
            )
            .unwrap_err();
        let paths: Vec<&str> = diffs.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["extra", "tags[1]", "theme"]);
        assert_eq!(diffs[0].legacy, None);
        assert_eq!(diffs[2].new, Some(json!("light")));
        // One side absent altogether.
        let diffs = c
            .compare(&json!({"theme": "dark"}), &Value::Null)
            .unwrap_err();
        assert_eq!(diffs[0].path, "");
    }

    #[test]
    fn ignored_paths_are_not_compared() {
        let c = Comparison::new().ignore("meta.updated_at").ignore("etag");
        assert_eq!(
            c.compare(
                &json!({"x": 1, "etag": "a", "meta": {"updated_at": 1, "by": "me"}}),
                &json!({"x": 1, "etag": "b", "meta": {"updated_at": 2, "by": "me"}}),
            ),
            Ok(())
        );
        assert!(
            c.compare(
                &json!({"meta": {"by": "me"}}),
                &json!({"meta": {"by": "you"}})
            )
            .is_err()
        );
    }

    #[test]
    fn redacted_fields_never_appear_in_diffs() {
        let c = Comparison::new().redact("email");
        let diffs = c
            .compare(
                &json!({"email": "a@x.io", "user": {"email": "a@x.io", "n": 1}}),
                &json!({"email": "b@x.io", "user": {"email": "a@x.io", "n": 2}}),
            )
            .unwrap_err();
        let text = serde_json::to_string(&diffs).unwrap();
        assert!(!text.contains("@x.io"), "{text}");
        assert_eq!(diffs[0].path, "email");
        assert_eq!(diffs[1].path, "user.n");
        let whole = c
            .compare(&json!({"email": "a@x.io"}), &Value::Null)
            .unwrap_err();
        assert!(!serde_json::to_string(&whole).unwrap().contains("@x.io"));
    }

    #[test]
    fn custom_comparator_decides_equality() {
        let case_blind = Comparison::new()
            .comparator(|a, b| a.to_string().to_lowercase() == b.to_string().to_lowercase());
        assert_eq!(
            case_blind.compare(&json!({"t": "Dark"}), &json!({"t": "dark"})),
            Ok(())
        );
        assert!(
            case_blind
                .compare(&json!({"t": "Dark"}), &json!({"t": "light"}))
                .is_err()
        );
    }
}
