//! How `dead-letters list` looks at a terminal: a table with aligned columns, the count per kind,
//! and what reading the queue did to it.

use super::dead_letters::Listing;

/// The listing as a table with aligned columns (the message last, on one line), then the count
/// per kind, then a note on what reading the queue did to it.
pub fn format_listing(listing: &Listing) -> String {
    let opt = |v: Option<i64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
    let header = [
        "COMMAND ID",
        "KIND",
        "STATUS",
        "ATTEMPTS",
        "FAILED AT",
        "INVOICE",
        "ADHOC",
        "CUSTOMER",
        "REPLAYS",
        "MESSAGE",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| (*h).to_owned()).collect()];
    for l in &listing.letters {
        rows.push(vec![
            if l.command_id.is_empty() {
                "(no message_id)".into()
            } else {
                l.command_id.clone()
            },
            l.kind.clone(),
            opt(l.http_status),
            opt(l.attempts),
            l.failed_at.clone().unwrap_or_else(|| "-".into()),
            opt(l.invoice_id),
            opt(l.adhoc_invoice_id),
            opt(l.customer_id),
            l.replay_count.to_string(),
            l.message.replace(['\n', '\r', '\t'], " "),
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
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    out.push_str(&format!(
        "{} shown of {} in the dead-letter queue; by kind: {}\n",
        listing.letters.len(),
        listing.in_queue,
        if kinds.is_empty() {
            "none".into()
        } else {
            kinds.join(", ")
        }
    ));
    out.push_str(READ_NOTE);
    out
}

/// What listing does to the queue, said where the listing is read.
const READ_NOTE: &str = "(Reading puts every message back in order; RabbitMQ marks them \
redelivered, and RabbitMQ 3.x also adds 1 to their x-delivery-count.)\n";
