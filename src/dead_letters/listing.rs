//! How `dead-letters list` and `show` look at a terminal: a table with aligned columns, then the
//! count per kind; one dead letter in full.

use super::actions::Listing;
use super::guard::{LetterOutcome, Settled, Tally};
use super::run_view::ReplayRunView;
use super::view::DeadLetterView;
use crate::text::{pretty_json, visible, visible_block};
use std::fmt::Write as _;

/// One dead letter as `dead-letters show` prints it: what the console's detail page shows, in
/// the same order (warnings, why it failed and its ids, the original message, its replays).
/// Everything that came off the wire has its control characters made visible.
pub fn format_detail(letter: &DeadLetterView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "dead letter {}  {}  {}",
        letter.id, letter.kind, letter.state
    );
    warnings(&mut out, letter);
    fields(&mut out, letter);
    original(&mut out, &letter.original);
    let _ = writeln!(out, "\nReplays");
    if letter.replays.is_empty() {
        out.push_str("  none\n");
    }
    for replay in &letter.replays {
        let _ = writeln!(
            out,
            "  run {}  {}  {}",
            replay.run_id,
            replay.replayed_at.to_rfc3339(),
            visible(&replay.outcome)
        );
    }
    out
}

/// One replay run as `dead-letters run` prints it: the run, its guard and outcome counts, why it
/// stopped, then each replayed letter's outcome in the order it was sent.
pub fn format_run(run: &ReplayRunView, letters: &[LetterOutcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replay run {}  {}  by {} ({})",
        run.job_id,
        run.state,
        visible(&run.requested_by),
        run.source
    );
    let guard = &run.guard;
    let _ = writeln!(
        out,
        "  {} selected, {} replayed, {} refused by the broker, {} skipped",
        run.total, run.replayed, run.failed, run.skipped
    );
    let _ = writeln!(
        out,
        "  guard: canary {} (up to {} s), stops when {} of the last {} settled fail again{}",
        guard.canary,
        guard.canary_wait_ms / 1000,
        guard
            .max_failure_ratio
            .map_or("no share".to_owned(), |r| r.to_string()),
        guard.failure_window,
        guard
            .stop_after_failures
            .map_or(String::new(), |n| format!(" or after {n} failures"))
    );
    let tally = Tally::of(letters);
    let _ = writeln!(
        out,
        "  outcomes: {} succeeded, {} failed again, {} pending",
        tally.succeeded, tally.failed_again, tally.pending
    );
    if let Some(reason) = &run.stop_reason {
        let _ = writeln!(out, "  stopped: {}", visible(reason));
        let _ = writeln!(out, "  resume: dead-letters replay --resume {}", run.job_id);
    }
    let outcomes: Vec<String> = letters
        .iter()
        .map(|letter| match &letter.settled {
            Settled::Pending => "pending".to_owned(),
            Settled::Succeeded => "succeeded".to_owned(),
            Settled::FailedAgain(kind) => format!("failed again: {}", visible(kind)),
        })
        .collect();
    let width = outcomes
        .iter()
        .map(|o| o.chars().count())
        .max()
        .unwrap_or(0);
    if !letters.is_empty() {
        let _ = writeln!(
            out,
            "\n{:<12} {:<width$}  COMMAND",
            "DEAD LETTER", "OUTCOME"
        );
    }
    for (letter, outcome) in letters.iter().zip(&outcomes) {
        let _ = writeln!(
            out,
            "{:<12} {outcome:<width$}  {}",
            letter.dead_letter_id,
            visible(&letter.command_id)
        );
    }
    out
}

/// What an operator must know before replaying the letter.
fn warnings(out: &mut String, letter: &DeadLetterView) {
    if letter.fails_again {
        out.push_str(
            "! replayed as it is, it fails the same way again: its body or id is what was \
             wrong; send a corrected command instead\n",
        );
    }
    if letter.duplicate_risk {
        out.push_str(
            "! its first provider call is older than the provider's idempotency window: a \
             replay may create a second payment link\n",
        );
    }
    if let Some(why) = &letter.not_replayable_because {
        let _ = writeln!(out, "! not replayable: {}", visible(why));
    }
}

/// Its fields, one a line, every character visible.
fn fields(out: &mut String, letter: &DeadLetterView) {
    let text = |v: &Option<String>| v.as_deref().map(|v| visible(v).into_owned());
    let number = |v: Option<i64>| v.map(|v| v.to_string());
    let fields = [
        ("Error", Some(visible(&letter.error_message).into_owned())),
        ("HTTP status", letter.http_status.map(|v| v.to_string())),
        ("Provider answer", text(&letter.error_body)),
        ("Provider calls", letter.attempts.map(|v| v.to_string())),
        (
            "Replays of its command before it failed",
            Some(letter.replay_count.to_string()),
        ),
        ("Command id", Some(visible(&letter.command_id).into_owned())),
        ("Trace id", text(&letter.trace_id)),
        ("Provider id", number(letter.provider_id)),
        ("Invoice id", number(letter.invoice_id)),
        ("Ad hoc invoice id", number(letter.adhoc_invoice_id)),
        ("Customer id", number(letter.customer_id)),
        ("Description", text(&letter.description)),
        ("E-mail", text(&letter.email)),
        ("Stored with changes", text(&letter.stored_with_changes)),
        ("Failed at", Some(letter.failed_at.to_rfc3339())),
        (
            "Replayed from",
            letter.previous_id.map(|p| format!("dead letter {p}")),
        ),
    ];
    for (name, value) in fields {
        let _ = writeln!(
            out,
            "{:<20}{}",
            format!("{name}:"),
            value.as_deref().unwrap_or("-")
        );
    }
}

/// The message as it was published: where to, its properties, headers and body.
fn original(out: &mut String, original: &super::view::OriginalView) {
    let _ = writeln!(out, "\nOriginal message");
    let _ = writeln!(
        out,
        "{:<20}{}",
        "Published to:",
        visible(&super::targets::exchange_name(&original.exchange))
    );
    let _ = writeln!(
        out,
        "{:<20}{}",
        "Routing key:",
        visible(&original.routing_key)
    );
    let properties = serde_json::to_string_pretty(&original.properties).unwrap_or_default();
    let headers = serde_json::to_string_pretty(&original.headers).unwrap_or_default();
    let _ = writeln!(out, "Properties:\n{}", indent(&visible_block(&properties)));
    let _ = writeln!(out, "Headers:\n{}", indent(&visible_block(&headers)));
    let body = match &original.text {
        Some(text) => pretty_json(text).unwrap_or_else(|| text.clone()),
        None => format!("({} bytes, not UTF-8)", original.body_bytes),
    };
    let _ = writeln!(
        out,
        "Body ({} bytes):\n{}",
        original.body_bytes,
        indent(&visible_block(&body))
    );
}

/// Rows as columns two spaces apart, the last column as it is.
fn aligned(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Every line two spaces in.
fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}\n"))
        .collect::<String>()
        .trim_end()
        .to_owned()
}

/// The listing as a table with aligned columns (the message last, on one line), then the count
/// per kind.
pub fn format_listing(listing: &Listing) -> String {
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let header = [
        "ID",
        "STATE",
        "COMMAND ID",
        "KIND",
        "STATUS",
        "ATTEMPTS",
        "FAILED AT",
        "INVOICE",
        "ADHOC",
        "CUSTOMER",
        "REPLAYS",
        "REPLAYABLE",
        "MESSAGE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for l in &listing.letters {
        rows.push(vec![
            l.id.to_string(),
            l.state.to_string(),
            if l.command_id.is_empty() {
                "(no message_id)".into()
            } else {
                visible(&l.command_id).into_owned()
            },
            l.kind.to_string(),
            opt(l.http_status.map(i64::from)),
            opt(l.attempts.map(i64::from)),
            l.failed_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            opt(l.invoice_id),
            opt(l.adhoc_invoice_id),
            opt(l.customer_id),
            l.times_replayed.to_string(),
            match (l.replayable, l.fails_again) {
                (false, _) => "no",
                (true, true) => "if asked",
                (true, false) => "yes",
            }
            .into(),
            visible(&l.error_message).into_owned(),
        ]);
    }
    let mut out = if listing.letters.is_empty() {
        String::new()
    } else {
        aligned(&rows)
    };
    let kinds: Vec<String> = listing
        .by_kind
        .iter()
        .map(|(k, n)| format!("{}: {n}", visible(k)))
        .collect();
    for l in listing.letters.iter().filter(|l| !l.replayable) {
        out.push_str(&format!(
            "dead letter {} is not replayable: {}\n",
            l.id,
            l.not_replayable_because.as_deref().unwrap_or("")
        ));
    }
    out.push_str(&format!(
        "{} shown of {} matching; by kind: {}\n",
        listing.letters.len(),
        listing.matching,
        if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join(", ")
        }
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dead_letters::Listed;
    use crate::dead_letters::store::Summary;

    #[test]
    fn hidden_characters_are_shown_and_unreplayable_letters_say_why() {
        let summary = Summary {
            id: 7,
            command_id: "bidi-\u{202E}gpj.exe".into(),
            kind: crate::dead_letters::Kind::Expired,
            http_status: None,
            attempts: None,
            failed_at: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
            replay_count: 0,
            state: crate::dead_letters::State::Open,
            invoice_id: Some(1),
            adhoc_invoice_id: None,
            customer_id: None,
            error_message: "line\nbreak".into(),
            original_exchange: String::new(),
            original_routing_key: "some-queue".into(),
        };
        let listing = Listing {
            letters: vec![Listed {
                summary,
                replayable: false,
                not_replayable_because: Some("it names the default exchange".into()),
                fails_again: false,
                times_replayed: 0,
            }],
            by_kind: [("expired".to_owned(), 1)].into_iter().collect(),
            matching: 1,
        };
        let table = format_listing(&listing);
        assert!(table.contains("bidi-⟨U+202E⟩gpj.exe"), "{table}");
        assert!(table.contains("line⟨U+000A⟩break"), "{table}");
        assert!(!table.contains('\u{202E}'), "{table}");
        assert!(
            table.contains("dead letter 7 is not replayable: it names the default exchange"),
            "{table}"
        );
    }
}
