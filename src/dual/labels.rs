//! What each repository call of a dual store records, built once per store: on the way of a
//! call that succeeds, no string is formatted and no attribute list is built (a failed call
//! copies its lists to set `outcome` and add `error.type`).

use opentelemetry::KeyValue;

use crate::Side;

/// A kind of repository call, by its `db.operation.name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Call {
    Read,
    Write,
}

impl Call {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Call::Read => "read",
            Call::Write => "write",
        }
    }
}

/// The span name and metric attributes of each (call, side), for one store.
pub(super) struct CallLabels {
    /// `otel.name` of a call's span: `{db.operation.name} {migration}`, as OpenTelemetry's
    /// database conventions name client spans.
    span_names: [Box<str>; 2],
    /// `twintrack.dual.operations` attributes of a call that succeeded: `migration`, `op`,
    /// `side`, `outcome` = `ok`.
    ops_ok: [[[KeyValue; 4]; 2]; 2],
    /// `db.client.operation.duration` attributes of a call that succeeded: `db.system.name`,
    /// `db.operation.name`, `twintrack.migration`, `twintrack.side`.
    duration_ok: [[[KeyValue; 4]; 2]; 2],
}

const CALLS: [Call; 2] = [Call::Read, Call::Write];
const SIDES: [Side; 2] = [Side::Legacy, Side::New];

impl CallLabels {
    /// Labels for `migration`, whose shapes live in databases of `db_system` (the
    /// `db.system.name`: both sides' pools are of one backend, even across two databases).
    pub(super) fn new(migration: &str, db_system: &'static str) -> CallLabels {
        let name: opentelemetry::StringValue = migration.to_owned().into();
        let ops = |call: Call, side: Side| {
            [
                KeyValue::new("migration", name.clone()),
                KeyValue::new("op", call.as_str()),
                KeyValue::new("side", side.as_str()),
                KeyValue::new("outcome", "ok"),
            ]
        };
        let duration = |call: Call, side: Side| {
            [
                KeyValue::new("db.system.name", db_system),
                KeyValue::new("db.operation.name", call.as_str()),
                KeyValue::new("twintrack.migration", name.clone()),
                KeyValue::new("twintrack.side", side.as_str()),
            ]
        };
        CallLabels {
            span_names: CALLS.map(|call| format!("{} {migration}", call.as_str()).into()),
            ops_ok: CALLS.map(|call| SIDES.map(|side| ops(call, side))),
            duration_ok: CALLS.map(|call| SIDES.map(|side| duration(call, side))),
        }
    }

    pub(super) fn span_name(&self, call: Call) -> &str {
        &self.span_names[call as usize]
    }

    pub(super) fn ops_ok(&self, call: Call, side: Side) -> &[KeyValue] {
        &self.ops_ok[call as usize][side_index(side)]
    }

    pub(super) fn duration_ok(&self, call: Call, side: Side) -> &[KeyValue] {
        &self.duration_ok[call as usize][side_index(side)]
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Legacy => 0,
        Side::New => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_call_and_side_has_its_own_labels() {
        let labels = CallLabels::new("user_settings", "mariadb");
        assert_eq!(labels.span_name(Call::Read), "read user_settings");
        assert_eq!(labels.span_name(Call::Write), "write user_settings");
        let text = |attrs: &[KeyValue]| {
            attrs
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            text(labels.ops_ok(Call::Write, Side::New)),
            "migration=user_settings op=write side=new outcome=ok"
        );
        assert_eq!(
            text(labels.duration_ok(Call::Read, Side::Legacy)),
            "db.system.name=mariadb db.operation.name=read twintrack.migration=user_settings twintrack.side=legacy"
        );
        assert_eq!(
            text(labels.duration_ok(Call::Write, Side::New)),
            "db.system.name=mariadb db.operation.name=write twintrack.migration=user_settings twintrack.side=new"
        );
    }
}
