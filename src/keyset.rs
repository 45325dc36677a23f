//! Keyset ranges: predicates over a key's columns with bounds taken from the data.
//!
//! Every range twintrack walks or compares (a backfill batch, a chunk, a verify segment, one
//! key) is a [`KeyRange`] whose bounds are keys read from the table, compared by the database
//! with row values: `("tenant_id", "id") > ($1, $2) AND ("tenant_id", "id") <= ($3, $4)`. No
//! arithmetic is ever done on a key, so the ends of a type's range (`i64::MIN`, `i64::MAX`),
//! sparse and skewed keys, UUIDs and text all behave the same.
//!
//! The functions here only build SQL text and its parameters; they are pure and tested below.

use crate::db::Value;
use crate::key::DynKey;

/// The lower end of a range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lower {
    /// No lower end.
    Unbounded,
    /// Keys greater than this one (a keyset walk's "after the last key").
    After(DynKey),
    /// Keys from this one on.
    From(DynKey),
}

/// The upper end of a range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upper {
    /// No upper end.
    Unbounded,
    /// Keys up to and including this one.
    UpTo(DynKey),
    /// Keys below this one.
    Before(DynKey),
}

/// A range of keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRange {
    /// Where it starts.
    pub lower: Lower,
    /// Where it ends.
    pub upper: Upper,
}

impl KeyRange {
    /// Every key.
    pub fn all() -> KeyRange {
        KeyRange {
            lower: Lower::Unbounded,
            upper: Upper::Unbounded,
        }
    }

    /// Exactly one key: `[key, key]`.
    pub fn exactly(key: DynKey) -> KeyRange {
        KeyRange {
            lower: Lower::From(key.clone()),
            upper: Upper::UpTo(key),
        }
    }

    /// `(after, upto]`, each end optional.
    pub fn after_upto(after: Option<DynKey>, upto: Option<DynKey>) -> KeyRange {
        KeyRange {
            lower: after.map_or(Lower::Unbounded, Lower::After),
            upper: upto.map_or(Upper::Unbounded, Upper::UpTo),
        }
    }

    /// `[from, before)`, each end optional.
    pub fn from_before(from: Option<DynKey>, before: Option<DynKey>) -> KeyRange {
        KeyRange {
            lower: from.map_or(Lower::Unbounded, Lower::From),
            upper: before.map_or(Upper::Unbounded, Upper::Before),
        }
    }
}

/// A predicate and the parameters it binds, numbered from some `$n` on.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Predicate {
    pub(crate) sql: String,
    pub(crate) args: Vec<Value>,
}

/// `"a"` for one column, `("a", "b")` for several (a row value).
pub(crate) fn row(columns: &[String]) -> String {
    match columns {
        [one] => one.clone(),
        many => format!("({})", many.join(", ")),
    }
}

/// `"a", "b"`: an ORDER BY list in key order.
pub(crate) fn order_by(columns: &[String]) -> String {
    columns.join(", ")
}

/// Each column qualified by `alias` (`p."key"`), or as they are without one.
pub(crate) fn qualified(columns: &[String], alias: Option<&str>) -> Vec<String> {
    match alias {
        Some(alias) => columns.iter().map(|c| format!("{alias}.{c}")).collect(),
        None => columns.to_vec(),
    }
}

/// The predicate selecting `range` over `columns`, its parameters numbered from `$first`.
/// Every key's parts are bound as parameters; an unbounded range is `1 = 1`.
pub(crate) fn predicate(columns: &[String], range: &KeyRange, first: usize) -> Predicate {
    let mut out = Predicate::default();
    let mut terms = Vec::new();
    let mut next = first;
    let mut term = |op: &str, key: &DynKey, out: &mut Predicate| {
        let params: Vec<String> = key
            .parts()
            .iter()
            .map(|part| {
                out.args.push(part.to_value());
                let p = format!("${next}");
                next += 1;
                p
            })
            .collect();
        format!("{} {op} {}", row(columns), row(&params))
    };
    if let (Lower::From(a), Upper::UpTo(b)) = (&range.lower, &range.upper)
        && a == b
    {
        out.sql = term("=", a, &mut out);
        return out;
    }
    match &range.lower {
        Lower::Unbounded => {}
        Lower::After(k) => terms.push(term(">", k, &mut out)),
        Lower::From(k) => terms.push(term(">=", k, &mut out)),
    }
    match &range.upper {
        Upper::Unbounded => {}
        Upper::UpTo(k) => terms.push(term("<=", k, &mut out)),
        Upper::Before(k) => terms.push(term("<", k, &mut out)),
    }
    out.sql = if terms.is_empty() {
        "1 = 1".to_owned()
    } else {
        terms.join(" AND ")
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::KeyPart;

    fn k(v: i64) -> DynKey {
        DynKey::single(KeyPart::BigInt(v))
    }

    #[test]
    fn single_column_ranges() {
        let cols = vec!["\"id\"".to_owned()];
        let p = predicate(&cols, &KeyRange::after_upto(Some(k(1)), Some(k(9))), 1);
        assert_eq!(p.sql, "\"id\" > $1 AND \"id\" <= $2");
        assert_eq!(p.args, vec![Value::I64(1), Value::I64(9)]);
        let p = predicate(&cols, &KeyRange::after_upto(None, Some(k(i64::MIN))), 3);
        assert_eq!(p.sql, "\"id\" <= $3");
        assert_eq!(p.args, vec![Value::I64(i64::MIN)]);
        assert_eq!(predicate(&cols, &KeyRange::all(), 1).sql, "1 = 1");
        let p = predicate(&cols, &KeyRange::exactly(k(i64::MAX)), 1);
        assert_eq!(p.sql, "\"id\" = $1");
        let p = predicate(&cols, &KeyRange::from_before(Some(k(2)), None), 1);
        assert_eq!(p.sql, "\"id\" >= $1");
    }

    #[test]
    fn composite_ranges_compare_row_values() {
        let cols = qualified(&["\"tenant_id\"".into(), "\"id\"".into()], Some("s"));
        let a = DynKey::new(vec![KeyPart::BigInt(1), KeyPart::Text("b".into())]).unwrap();
        let b = DynKey::new(vec![KeyPart::BigInt(2), KeyPart::Text("a".into())]).unwrap();
        let p = predicate(&cols, &KeyRange::after_upto(Some(a), Some(b)), 1);
        assert_eq!(
            p.sql,
            "(s.\"tenant_id\", s.\"id\") > ($1, $2) AND (s.\"tenant_id\", s.\"id\") <= ($3, $4)"
        );
        assert_eq!(p.args.len(), 4);
        assert_eq!(order_by(&cols), "s.\"tenant_id\", s.\"id\"");
    }
}
