//! How `dead-letters list` looks at a terminal: a table with aligned columns, then the count per
//! kind.

use super::actions::Listing;
use crate::text::visible;

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
            l.replay_count.to_string(),
            if l.replayable { "yes" } else { "no" }.into(),
            visible(&l.error_message).into_owned(),
        ]);
    }
    let mut out = String::new();
    if !listing.letters.is_empty() {
        let columns = header.len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        for row in &rows {
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
    }
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
