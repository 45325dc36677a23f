//! The transition rules: which stage moves are allowed, given what is known about the data.
//!
//! One function, [`check`], decides every `(from, to)` pair. It is pure: the flag store calls it
//! inside the transaction that changes the stage, the CLI, gRPC and admin page only show its
//! answer. A refusal always carries a reason and the command that would make the move safe.
//!
//! The rules (SPEC.md, "Transition rules"):
//! - **Rollback** (to an earlier stage) is instant and needs no evidence, as long as legacy has
//!   received every write: true in every stage up to `ramp_down`. Once the migration has been in
//!   `new_only`, legacy missed writes, so moving into any stage that *reads* legacy needs a reverse
//!   sync newer than that time.
//! - **Forward** into `dual_write` is always allowed (it only adds writes). Forward into `shadow`,
//!   `live`, `ramp_down` or `new_only` needs a finished backfill *and* a clean verify, both newer
//!   than the last time the migration was in `legacy_only` (writes made while in `legacy_only`
//!   never reached the new shape). `ramp_down` is gated like `live` because it serves the new shape.
//! - `--force` overrides a refusal; the store records the refusal in the audit entry.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Stage;

/// Microseconds since the Unix epoch. Evidence and transitions are compared with it.
pub type Micros = i64;

/// What is known about a migration's data, recorded by backfill, verify and stage changes.
/// Times are µs since the Unix epoch ([`Micros`]); RFC 3339 text (UTC) in JSON.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// When a backfill (legacy → new) last finished.
    #[serde(default, with = "crate::util::rfc3339::option")]
    pub backfill_finished_at: Option<Micros>,
    /// When a verify last found both shapes equal.
    #[serde(default, with = "crate::util::rfc3339::option")]
    pub verify_clean_at: Option<Micros>,
    /// When a reverse sync (new → legacy) last finished.
    #[serde(default, with = "crate::util::rfc3339::option")]
    pub reverse_synced_at: Option<Micros>,
    /// When the migration last left `legacy_only` (writes before this never reached new).
    #[serde(default, with = "crate::util::rfc3339::option")]
    pub left_legacy_only_at: Option<Micros>,
    /// When the migration last entered `new_only`.
    #[serde(default, with = "crate::util::rfc3339::option")]
    pub entered_new_only_at: Option<Micros>,
    /// When the migration last left `new_only` (writes before this never reached legacy).
    #[serde(default, with = "crate::util::rfc3339::option")]
    pub left_new_only_at: Option<Micros>,
}

impl Evidence {
    /// The evidence after a move from `from` to `to` at time `now` (the stage bookkeeping part).
    pub fn after_move(mut self, from: Option<Stage>, to: Stage, now: Micros) -> Evidence {
        if from == Some(to) {
            return self;
        }
        if from == Some(Stage::LegacyOnly) || to == Stage::LegacyOnly {
            // Leaving legacy_only starts the dual-write era; entering it ends it. In both cases
            // older backfills and verifies no longer prove anything about future reads.
            self.left_legacy_only_at = Some(now);
        }
        if to == Stage::NewOnly {
            self.entered_new_only_at = Some(now);
        }
        if from == Some(Stage::NewOnly) {
            self.left_new_only_at = Some(now);
        }
        self
    }
}

/// Whether a move is allowed, and if so what kind of move it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `from == to`: nothing to change.
    Unchanged,
    /// The move is allowed.
    Allowed(Move),
    /// The move is refused unless forced.
    Refused(Refusal),
}

/// The direction of an allowed move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Move {
    /// Towards `new_only`.
    Forward,
    /// Towards `legacy_only`: an instant rollback.
    Rollback,
}

/// Why a move is refused, and what to run to make it safe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The stage the migration is in.
    pub from: Stage,
    /// The stage asked for.
    pub to: Stage,
    /// Why the move would be unsafe.
    pub reason: String,
    /// What to run first (or `--force`, which is audited).
    pub remedy: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} refused: {}; {}",
            self.from, self.to, self.reason, self.remedy
        )
    }
}

/// Decides the move `from → to` for `migration` given `evidence`.
pub fn check(migration: &str, from: Stage, to: Stage, evidence: &Evidence) -> Verdict {
    if from == to {
        return Verdict::Unchanged;
    }
    let refuse = |reason: String, remedy: String| {
        Verdict::Refused(Refusal {
            from,
            to,
            reason,
            remedy,
        })
    };

    // Legacy must hold every write before anything reads it again.
    if to.reads_legacy() {
        let missed_since = if from == Stage::NewOnly {
            // In new_only without a recorded entry time (forced or edited by hand): assume the
            // worst, any reverse sync at all is needed.
            Some(evidence.entered_new_only_at.unwrap_or(Micros::MIN))
        } else {
            evidence.left_new_only_at
        };
        if let Some(since) = missed_since {
            let synced = evidence.reverse_synced_at.is_some_and(|at| at > since);
            if !synced {
                return refuse(
                    format!(
                        "legacy has missed the writes made while in new_only, and {to} reads legacy; no reverse sync has run since"
                    ),
                    format!(
                        "move to ramp_down (writes legacy again), run `twintrack backfill {migration} --reverse`, then retry; or pass --force"
                    ),
                );
            }
        }
    }

    if to < from {
        return Verdict::Allowed(Move::Rollback);
    }
    if to == Stage::DualWrite {
        return Verdict::Allowed(Move::Forward);
    }

    // Forward into a stage that reads (or serves) the new shape: needs proof it is complete.
    if from == Stage::LegacyOnly {
        return refuse(
            "dual writes are off, so the new shape is missing every write made from now on".into(),
            format!(
                "run `twintrack stage set {migration} dual_write`, then `twintrack backfill {migration}` and `twintrack verify {migration}`; or pass --force"
            ),
        );
    }
    let since = evidence.left_legacy_only_at.unwrap_or(Micros::MIN);
    let backfilled = evidence.backfill_finished_at.is_some_and(|at| at > since);
    let verified = evidence.verify_clean_at.is_some_and(|at| at > since);
    match (backfilled, verified) {
        (true, true) => Verdict::Allowed(Move::Forward),
        (false, _) => refuse(
            "no backfill has finished since dual writes were turned on, so rows written before then may be missing from the new shape".into(),
            format!(
                "run `twintrack backfill {migration}` then `twintrack verify {migration}`; or pass --force"
            ),
        ),
        (true, false) => refuse(
            "no clean verify since dual writes were turned on, so the shapes are not proven equal".into(),
            format!("run `twintrack verify {migration}` (add --repair to fix what it finds); or pass --force"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Stage::*;

    const T_DUAL: Micros = 1_000;

    fn fresh_in_dual_write() -> Evidence {
        Evidence::default().after_move(Some(LegacyOnly), DualWrite, T_DUAL)
    }

    /// `A` allowed, `R` refused, `U` unchanged. Rows are `from`, columns `to`, in stage order.
    fn assert_matrix(name: &str, evidence: &Evidence, expected: [[char; 6]; 6]) {
        for (i, from) in Stage::ALL.into_iter().enumerate() {
            for (j, to) in Stage::ALL.into_iter().enumerate() {
                let verdict = check("m", from, to, evidence);
                let got = match &verdict {
                    Verdict::Unchanged => 'U',
                    Verdict::Allowed(_) => 'A',
                    Verdict::Refused(r) => {
                        assert!(!r.reason.is_empty() && r.remedy.contains("twintrack"));
                        'R'
                    }
                };
                assert_eq!(got, expected[i][j], "{name}: {from} -> {to}: {verdict:?}");
            }
        }
    }

    #[test]
    fn all_36_pairs_without_backfill_or_verify() {
        // to:        lo   dw   sh   li   rd   no
        assert_matrix(
            "no evidence",
            &fresh_in_dual_write(),
            [
                ['U', 'A', 'R', 'R', 'R', 'R'], // legacy_only
                ['A', 'U', 'R', 'R', 'R', 'R'], // dual_write
                ['A', 'A', 'U', 'R', 'R', 'R'], // shadow (reached with --force)
                ['A', 'A', 'A', 'U', 'R', 'R'], // live
                ['A', 'A', 'A', 'A', 'U', 'R'], // ramp_down
                ['R', 'R', 'R', 'R', 'A', 'U'], // new_only: legacy missed writes
            ],
        );
    }

    #[test]
    fn all_36_pairs_with_backfill_and_clean_verify() {
        let mut e = fresh_in_dual_write();
        e.backfill_finished_at = Some(T_DUAL + 10);
        e.verify_clean_at = Some(T_DUAL + 20);
        assert_matrix(
            "backfilled and verified",
            &e,
            [
                ['U', 'A', 'R', 'R', 'R', 'R'], // legacy_only: dual writes first, always
                ['A', 'U', 'A', 'A', 'A', 'A'],
                ['A', 'A', 'U', 'A', 'A', 'A'],
                ['A', 'A', 'A', 'U', 'A', 'A'],
                ['A', 'A', 'A', 'A', 'U', 'A'],
                ['R', 'R', 'R', 'R', 'A', 'U'],
            ],
        );
    }

    #[test]
    fn after_new_only_legacy_reads_need_a_reverse_sync() {
        let mut e = fresh_in_dual_write();
        e.backfill_finished_at = Some(T_DUAL + 10);
        e.verify_clean_at = Some(T_DUAL + 20);
        let e = e.after_move(Some(RampDown), NewOnly, 2_000);
        // Straight out of new_only into a stage that reads legacy: refused, names the remedy.
        let Verdict::Refused(r) = check("user_settings", NewOnly, Shadow, &e) else {
            panic!("expected refusal")
        };
        assert!(
            r.remedy
                .contains("twintrack backfill user_settings --reverse"),
            "{r}"
        );
        // ramp_down reads only new: allowed, and from there a rollback is still refused...
        assert_eq!(
            check("m", NewOnly, RampDown, &e),
            Verdict::Allowed(Move::Rollback)
        );
        let e = e.after_move(Some(NewOnly), RampDown, 3_000);
        assert!(matches!(
            check("m", RampDown, Shadow, &e),
            Verdict::Refused(_)
        ));
        // ...until a reverse sync runs after dual writes resumed.
        let mut synced = e;
        synced.reverse_synced_at = Some(3_500);
        assert_eq!(
            check("m", RampDown, Shadow, &synced),
            Verdict::Allowed(Move::Rollback)
        );
        assert_eq!(
            check("m", RampDown, LegacyOnly, &synced),
            Verdict::Allowed(Move::Rollback)
        );
        // A reverse sync that ran while still in new_only allows leaving it directly (SPEC).
        let mut during = Evidence::default().after_move(Some(RampDown), NewOnly, 2_000);
        during.reverse_synced_at = Some(2_500);
        assert_eq!(
            check("m", NewOnly, Live, &during),
            Verdict::Allowed(Move::Rollback)
        );
    }

    #[test]
    fn returning_to_legacy_only_needs_fresh_evidence() {
        let mut e = fresh_in_dual_write();
        e.backfill_finished_at = Some(T_DUAL + 10);
        e.verify_clean_at = Some(T_DUAL + 20);
        assert_eq!(
            check("m", DualWrite, Shadow, &e),
            Verdict::Allowed(Move::Forward)
        );
        let e = e.after_move(Some(DualWrite), LegacyOnly, 5_000).after_move(
            Some(LegacyOnly),
            DualWrite,
            6_000,
        );
        let Verdict::Refused(r) = check("m", DualWrite, Shadow, &e) else {
            panic!("stale evidence must not count")
        };
        assert!(r.remedy.contains("twintrack backfill m"), "{r}");
        let mut e = e;
        e.backfill_finished_at = Some(6_100);
        let Verdict::Refused(r) = check("m", DualWrite, Shadow, &e) else {
            panic!("backfill alone is not enough")
        };
        assert!(r.remedy.contains("twintrack verify m"), "{r}");
        e.verify_clean_at = Some(6_200);
        assert_eq!(
            check("m", DualWrite, Shadow, &e),
            Verdict::Allowed(Move::Forward)
        );
    }
}
