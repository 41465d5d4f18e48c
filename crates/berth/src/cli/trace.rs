//! `berth trace`: a flow (`GET /v1/flows/{id}`) drawn as a waterfall — one
//! row per event and one per attempt, bars to the flow's scale, the wait
//! before each attempt (queue, then back-off) drawn apart from its run,
//! failed attempts and their error in red, and the causal tree as
//! indentation, so that a compensation sits under the failure that caused
//! it.

use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::output::{Out, between, cut, s, short, time};

/// Columns of the bars.
const WIDTH: usize = 48;

/// One row of the waterfall before it is drawn.
struct Row {
    depth: usize,
    label: String,
    /// `#n` for attempts.
    attempt: String,
    kind: RowKind,
}

enum RowKind {
    /// An event, at a time.
    Event { at: SystemTime },
    /// An attempt: waited from `queued` to `start`, ran for `run`.
    Attempt {
        queued: SystemTime,
        start: SystemTime,
        run: Option<Duration>,
        outcome: String,
        error: Option<String>,
    },
}

/// The waterfall of `flow` as lines of text.
pub fn render(flow: &Value, out: &Out) -> Vec<String> {
    let mut rows = Vec::new();
    if let Some(events) = flow.get("events").and_then(Value::as_array) {
        for e in events {
            collect(e, 0, &mut rows);
        }
    }
    let t0 = time(s(flow, "started_at"));
    let mut t1 = time(s(flow, "last_activity_at"));
    // The scale ends at the latest thing drawn (an attempt still running
    // has no end; the last activity covers what ended).
    for r in &rows {
        let end = match &r.kind {
            RowKind::Event { at } => Some(*at),
            RowKind::Attempt { start, run, .. } => Some(*start + run.unwrap_or_default()),
        };
        t1 = match (t1, end) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let (Some(t0), Some(t1)) = (t0, t1) else {
        return vec![format!("flow {} has no events", s(flow, "flow_id"))];
    };
    let total = between(t0, t1).max(Duration::from_micros(1));
    let col = |t: SystemTime| -> usize {
        let f = between(t0, t).as_secs_f64() / total.as_secs_f64();
        ((f * WIDTH as f64) as usize).min(WIDTH - 1)
    };
    let name_w = rows
        .iter()
        .map(|r| r.depth * 2 + r.label.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut lines = vec![
        format!(
            "flow {}  {} events, {} attempts, {}",
            s(flow, "flow_id"),
            rows.iter()
                .filter(|r| matches!(r.kind, RowKind::Event { .. }))
                .count(),
            rows.iter()
                .filter(|r| matches!(r.kind, RowKind::Attempt { .. }))
                .count(),
            short(total)
        ),
        format!(
            "{:<name_w$}  {:<4}  {:<WIDTH$}  {}",
            "STEP",
            "TRY",
            format!("0{:>w$}", short(total), w = WIDTH - 1),
            "WAIT+RUN",
        ),
    ];
    for r in rows {
        let label = format!("{}{}", "  ".repeat(r.depth), r.label);
        let (bar, tail) = match r.kind {
            RowKind::Event { at } => {
                let mut bar = vec![' '; WIDTH];
                bar[col(at)] = '│';
                (
                    out.dim(&bar.into_iter().collect::<String>()),
                    out.dim(&format!("+{}", short(between(t0, at)))),
                )
            }
            RowKind::Attempt {
                queued,
                start,
                run,
                outcome,
                error,
            } => {
                let mut wait: String = String::new();
                let (q, st) = (col(queued), col(start));
                let end = match run {
                    Some(d) => col(start + d).max(st),
                    None => WIDTH - 1,
                };
                wait.push_str(&" ".repeat(q));
                wait.push_str(&"·".repeat(st.saturating_sub(q)));
                let ran = "█".repeat(end - st + 1);
                let rest = " ".repeat(WIDTH - end - 1);
                let failed = !matches!(outcome.as_str(), "ok" | "duplicate");
                let ran = if failed {
                    out.red(&ran)
                } else {
                    out.green(&ran)
                };
                let times = format!(
                    "{}+{}",
                    short(between(queued, start)),
                    run.map(short).unwrap_or_else(|| "…".into())
                );
                let tail = match (failed, error) {
                    (true, Some(e)) => format!("{times} {}", out.red(&format!("{outcome} {e}"))),
                    (true, None) => format!("{times} {}", out.red(&outcome)),
                    (false, _) => format!("{times} {outcome}"),
                };
                (format!("{}{ran}{rest}", out.dim(&wait)), tail)
            }
        };
        lines.push(format!("{label:<name_w$}  {:<4}  {bar}  {tail}", r.attempt));
    }
    lines
}

/// Rows of event `e` (at `depth`), its attempts, then its children.
fn collect(e: &Value, depth: usize, rows: &mut Vec<Row>) {
    let Some(at) = time(s(e, "created_at")) else {
        return;
    };
    rows.push(Row {
        depth,
        label: s(e, "type").to_owned(),
        attempt: String::new(),
        kind: RowKind::Event { at },
    });
    let empty = Vec::new();
    let attempts = e
        .get("attempts")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    // The wait before an attempt starts when the event was committed (the
    // first) or when the previous attempt of the same worker ended.
    let mut last_end: std::collections::HashMap<(String, u64), SystemTime> = Default::default();
    for a in attempts {
        let Some(start) = time(s(a, "started_at")) else {
            continue;
        };
        let worker = s(a, "worker").to_owned();
        let round = a.get("round").and_then(Value::as_u64).unwrap_or(0);
        let run = a
            .get("duration_us")
            .and_then(Value::as_u64)
            .map(Duration::from_micros);
        let queued = last_end
            .get(&(worker.clone(), round))
            .copied()
            .unwrap_or(at)
            .min(start);
        last_end.insert((worker.clone(), round), start + run.unwrap_or_default());
        let error = a
            .get("error")
            .filter(|e| !e.is_null())
            .map(|e| cut(&format!("{}: {}", s(e, "code"), s(e, "message")), 100));
        let n = a.get("attempt").and_then(Value::as_u64).unwrap_or(0);
        rows.push(Row {
            depth: depth + 1,
            label: worker,
            attempt: if round > 0 {
                format!("#{n}r{round}")
            } else {
                format!("#{n}")
            },
            kind: RowKind::Attempt {
                queued,
                start,
                run,
                outcome: s(a, "outcome").to_owned(),
                error,
            },
        });
    }
    if let Some(children) = e.get("children").and_then(Value::as_array) {
        for c in children {
            collect(c, depth + 1, rows);
        }
    }
}

/// Every attempt of the flow, in the order they started: (event id,
/// attempt) pairs.
pub fn attempts(flow: &Value) -> Vec<(String, Value)> {
    fn walk(e: &Value, out: &mut Vec<(String, Value)>) {
        let id = s(e, "id").to_owned();
        if let Some(a) = e.get("attempts").and_then(Value::as_array) {
            out.extend(a.iter().map(|a| (id.clone(), a.clone())));
        }
        if let Some(c) = e.get("children").and_then(Value::as_array) {
            for c in c {
                walk(c, out);
            }
        }
    }
    let mut out = Vec::new();
    if let Some(events) = flow.get("events").and_then(Value::as_array) {
        for e in events {
            walk(e, &mut out);
        }
    }
    out.sort_by(|a, b| s(&a.1, "started_at").cmp(s(&b.1, "started_at")));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    fn at(ms: u64) -> String {
        let t =
            std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_millis(ms);
        humantime::format_rfc3339_micros(t).to_string()
    }

    /// A chain of `n` events, each caused by the one before and handled by
    /// one attempt; the second event's first attempt failed and was retried.
    fn chain(n: u64) -> Value {
        let mut child = Value::Null;
        for i in (0..n).rev() {
            let mut attempts = vec![json!({
                "worker": format!("step{i}"), "round": 0, "attempt": 1,
                "started_at": at(i * 10 + 1), "duration_us": 2000, "outcome": "ok",
                "error": null, "next_delay_us": null, "max_attempts": 3,
            })];
            if i == 1 {
                attempts[0]["outcome"] = json!("retry");
                attempts[0]["error"] = json!({"code": "timeout", "message": "timed out after 10s"});
                attempts[0]["next_delay_us"] = json!(4000);
                attempts.push(json!({
                    "worker": "step1", "round": 0, "attempt": 2,
                    "started_at": at(i * 10 + 7), "duration_us": 1000, "outcome": "ok",
                    "error": null, "next_delay_us": null, "max_attempts": 3,
                }));
            }
            let children = if child.is_null() { vec![] } else { vec![child] };
            child = json!({
                "id": format!("e{i}"), "type": format!("event.{i}"), "subject": "i",
                "causation_id": null, "created_at": at(i * 10), "payload": {},
                "attempts": attempts, "children": children,
            });
        }
        json!({
            "flow_id": "F", "started_at": at(0), "last_activity_at": at(n * 10),
            "events": [child],
        })
    }

    #[test]
    fn one_row_per_event_and_per_attempt_with_waits_apart_and_failures_in_red() {
        let flow = chain(50);
        let plain = Out {
            json: false,
            color: false,
            tty: false,
        };
        let lines = render(&flow, &plain);
        assert_eq!(lines.len(), 2 + 50 + 51, "{lines:#?}");
        assert!(!lines.iter().any(|l| l.contains('\x1b')));
        let failed = lines
            .iter()
            .find(|l| l.contains("retry timeout: timed out"))
            .unwrap();
        assert!(failed.trim_start().starts_with("step1 "), "{failed}");
        // The second attempt waited for the back-off: dots before its bar
        // (on a short flow's scale, where 4 ms is several columns).
        let short_flow = render(&chain(3), &plain);
        let second = short_flow
            .iter()
            .find(|l| l.contains("step1") && l.contains("#2"))
            .unwrap();
        assert!(second.contains("·█"), "{second}");
        // Nesting: each event one level deeper than its cause.
        let e3 = lines
            .iter()
            .find(|l| l.trim_start().starts_with("event.3 "))
            .unwrap();
        assert!(e3.starts_with(&" ".repeat(6)), "{e3}");

        let coloured = Out {
            json: false,
            color: true,
            tty: true,
        };
        let lines = render(&flow, &coloured);
        let failed = lines.iter().find(|l| l.contains("timed out")).unwrap();
        assert!(failed.contains("\x1b[31m"), "{failed}");
    }
}
