//! Migration stages and what each one means for reads and writes.
//!
//! The six stages follow the expand/contract order. Each has a fixed [`StagePlan`]: which sides
//! are written and in what order, which side serves reads, which side is shadow-compared, and
//! which side is authoritative (the one whose write must succeed for the request to succeed).
//!
//! | stage | writes, in order | reads | value served | authoritative |
//! |---|---|---|---|---|
//! | `legacy_only` | legacy | legacy | legacy | legacy |
//! | `dual_write` | legacy → new | legacy | legacy | legacy |
//! | `shadow` | legacy → new | legacy, shadow-compare new | legacy | legacy |
//! | `live` | new → legacy | new, shadow-compare legacy | new | new |
//! | `ramp_down` | new → legacy | new | new | new |
//! | `new_only` | new | new | new | new |
//!
//! ```
//! use twintrack::{Side, Stage};
//!
//! let stage: Stage = "dualwrite".parse().unwrap(); // LaunchDarkly alias
//! assert_eq!(stage, Stage::DualWrite);
//! assert_eq!(stage.to_string(), "dual_write");
//! assert_eq!(stage.plan().writes, &[Side::Legacy, Side::New]);
//! assert_eq!(Stage::Live.plan().shadow, Some(Side::Legacy));
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One of the two shapes of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The shape being migrated away from.
    Legacy,
    /// The shape being migrated to.
    New,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Legacy => Side::New,
            Side::New => Side::Legacy,
        }
    }

    /// `"legacy"` or `"new"`: the label used in metrics, spans and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Legacy => "legacy",
            Side::New => "new",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stage of a migration. Ordered from `LegacyOnly` (start) to `NewOnly` (done).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    /// Only the legacy shape exists as far as the application is concerned.
    LegacyOnly,
    /// Writes go to both shapes (legacy first); reads are served from legacy.
    DualWrite,
    /// As `DualWrite`, and reads are shadow-compared against the new shape.
    Shadow,
    /// The new shape is authoritative and serves reads; legacy is still written and compared.
    Live,
    /// The new shape serves reads; legacy is still written so a rollback stays instant.
    RampDown,
    /// Only the new shape is used. Legacy no longer receives writes.
    NewOnly,
}

/// What a stage does with reads and writes (one row of the stage table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StagePlan {
    /// The sides written, in the order they are written. The first is authoritative.
    pub writes: &'static [Side],
    /// The side whose read is served to the caller.
    pub served: Side,
    /// The side read in the background for comparison, if any.
    pub shadow: Option<Side>,
    /// The side that holds the truth: its write must succeed, repairs copy from it.
    pub authoritative: Side,
}

const LEGACY: &[Side] = &[Side::Legacy];
const LEGACY_THEN_NEW: &[Side] = &[Side::Legacy, Side::New];
const NEW_THEN_LEGACY: &[Side] = &[Side::New, Side::Legacy];
const NEW: &[Side] = &[Side::New];

impl Stage {
    /// Every stage, in order.
    pub const ALL: [Stage; 6] = [
        Stage::LegacyOnly,
        Stage::DualWrite,
        Stage::Shadow,
        Stage::Live,
        Stage::RampDown,
        Stage::NewOnly,
    ];

    /// The canonical (snake_case) name, as stored in the flag table.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::LegacyOnly => "legacy_only",
            Stage::DualWrite => "dual_write",
            Stage::Shadow => "shadow",
            Stage::Live => "live",
            Stage::RampDown => "ramp_down",
            Stage::NewOnly => "new_only",
        }
    }

    /// The stage's row of the stage table.
    pub fn plan(self) -> StagePlan {
        match self {
            Stage::LegacyOnly => StagePlan {
                writes: LEGACY,
                served: Side::Legacy,
                shadow: None,
                authoritative: Side::Legacy,
            },
            Stage::DualWrite => StagePlan {
                writes: LEGACY_THEN_NEW,
                served: Side::Legacy,
                shadow: None,
                authoritative: Side::Legacy,
            },
            Stage::Shadow => StagePlan {
                writes: LEGACY_THEN_NEW,
                served: Side::Legacy,
                shadow: Some(Side::New),
                authoritative: Side::Legacy,
            },
            Stage::Live => StagePlan {
                writes: NEW_THEN_LEGACY,
                served: Side::New,
                shadow: Some(Side::Legacy),
                authoritative: Side::New,
            },
            Stage::RampDown => StagePlan {
                writes: NEW_THEN_LEGACY,
                served: Side::New,
                shadow: None,
                authoritative: Side::New,
            },
            Stage::NewOnly => StagePlan {
                writes: NEW,
                served: Side::New,
                shadow: None,
                authoritative: Side::New,
            },
        }
    }

    /// Whether reads in this stage touch the legacy shape (served or shadow-compared).
    pub fn reads_legacy(self) -> bool {
        let plan = self.plan();
        plan.served == Side::Legacy || plan.shadow == Some(Side::Legacy)
    }

    /// Whether every write in this stage reaches the legacy shape.
    pub fn writes_legacy(self) -> bool {
        self.plan().writes.contains(&Side::Legacy)
    }

    /// The stage `twintrack rollback` moves to: the nearest earlier stage in which legacy is
    /// authoritative (`live`/`ramp_down` → `shadow`, `shadow` → `dual_write`,
    /// `dual_write` → `legacy_only`, `new_only` → `shadow`). `None` from `legacy_only`.
    pub fn rollback_target(self) -> Option<Stage> {
        match self {
            Stage::LegacyOnly => None,
            Stage::DualWrite => Some(Stage::LegacyOnly),
            Stage::Shadow => Some(Stage::DualWrite),
            Stage::Live | Stage::RampDown | Stage::NewOnly => Some(Stage::Shadow),
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage name that is neither a canonical name nor an accepted alias.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid stage {input:?}: expected one of legacy_only, dual_write, shadow, live, ramp_down, new_only (aliases: off, dualwrite, rampdown, complete)"
)]
pub struct ParseStageError {
    /// The rejected input (truncated to 64 characters).
    pub input: String,
}

impl FromStr for Stage {
    type Err = ParseStageError;

    /// Parses a canonical snake_case name or a LaunchDarkly alias (`off`, `dualwrite`,
    /// `rampdown`, `complete`). Surrounding whitespace is ignored; case matters, so a stored
    /// value has exactly one spelling.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "legacy_only" | "off" => Stage::LegacyOnly,
            "dual_write" | "dualwrite" => Stage::DualWrite,
            "shadow" => Stage::Shadow,
            "live" => Stage::Live,
            "ramp_down" | "rampdown" => Stage::RampDown,
            "new_only" | "complete" => Stage::NewOnly,
            other => {
                return Err(ParseStageError {
                    input: other.chars().take(64).collect(),
                });
            }
        })
    }
}

impl Serialize for Stage {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Stage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_match_the_stage_table() {
        use Side::*;
        let rows = [
            (Stage::LegacyOnly, &[Legacy][..], Legacy, None, Legacy),
            (Stage::DualWrite, &[Legacy, New][..], Legacy, None, Legacy),
            (Stage::Shadow, &[Legacy, New][..], Legacy, Some(New), Legacy),
            (Stage::Live, &[New, Legacy][..], New, Some(Legacy), New),
            (Stage::RampDown, &[New, Legacy][..], New, None, New),
            (Stage::NewOnly, &[New][..], New, None, New),
        ];
        for (stage, writes, served, shadow, authoritative) in rows {
            let plan = stage.plan();
            assert_eq!(plan.writes, writes, "{stage} writes");
            assert_eq!(plan.served, served, "{stage} served");
            assert_eq!(plan.shadow, shadow, "{stage} shadow");
            assert_eq!(plan.authoritative, authoritative, "{stage} authoritative");
            assert_eq!(
                plan.writes[0], plan.authoritative,
                "{stage}: authoritative first"
            );
        }
    }

    #[test]
    fn parses_names_and_aliases_and_round_trips() {
        for stage in Stage::ALL {
            assert_eq!(stage.as_str().parse::<Stage>(), Ok(stage));
            assert_eq!(stage.to_string(), stage.as_str());
        }
        assert_eq!("off".parse(), Ok(Stage::LegacyOnly));
        assert_eq!("dualwrite".parse(), Ok(Stage::DualWrite));
        assert_eq!("rampdown".parse(), Ok(Stage::RampDown));
        assert_eq!("complete".parse(), Ok(Stage::NewOnly));
        assert_eq!(" live\n".parse(), Ok(Stage::Live));
    }

    #[test]
    fn rejects_bogus_names_with_the_choices() {
        for bad in [
            "",
            "Live",
            "LIVE",
            "dual-write",
            "banana",
            "new only",
            "legacy_only;drop",
        ] {
            let err = bad.parse::<Stage>().unwrap_err();
            assert!(err.to_string().contains("expected one of"), "{bad}: {err}");
        }
        let long = "x".repeat(10_000);
        assert_eq!(long.parse::<Stage>().unwrap_err().input.len(), 64);
    }

    #[test]
    fn serde_uses_canonical_names_and_accepts_aliases() {
        assert_eq!(
            serde_json::to_string(&Stage::RampDown).unwrap(),
            "\"ramp_down\""
        );
        let s: Stage = serde_json::from_str("\"complete\"").unwrap();
        assert_eq!(s, Stage::NewOnly);
        assert!(serde_json::from_str::<Stage>("\"nope\"").is_err());
    }

    #[test]
    fn rollback_targets_are_legacy_authoritative() {
        assert_eq!(Stage::LegacyOnly.rollback_target(), None);
        for stage in &Stage::ALL[1..] {
            let target = stage.rollback_target().unwrap();
            assert!(target < *stage);
            assert_eq!(target.plan().authoritative, Side::Legacy);
        }
    }
}
