//! The figures as OpenMetrics text with exemplars: the provider-call and end-to-end latency
//! histograms carry, per bucket, the trace id of a recent sample, so a slow bucket on a dashboard
//! opens the trace of a command that fell in it. Served at `/metrics` to a scraper that asks
//! for OpenMetrics (Prometheus does; it keeps exemplars with `--enable-feature=exemplar-storage`);
//! everyone else gets the Prometheus text as before.

use std::collections::HashMap;
use std::sync::Mutex;

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The histograms that carry exemplars, and the label that tells their series apart.
pub const FAMILIES: [(&str, &str); 2] = [
    (
        "http_client_request_duration_seconds",
        "http_response_status_code",
    ),
    ("payment_link_command_time_to_outcome_seconds", "outcome"),
];

/// The latest sample of one bucket of one series.
#[derive(Clone, Debug)]
struct Exemplar {
    trace_id: String,
    value: f64,
    /// Seconds since the Unix epoch.
    at: f64,
}

/// The latest traced sample per (family, series, bucket): bounded by the families' series and
/// buckets, whatever the traffic.
#[derive(Default)]
pub struct Exemplars {
    latest: Mutex<HashMap<(usize, String, usize), Exemplar>>,
}

impl Exemplars {
    /// Keeps `value` as the exemplar of its bucket (of `boundaries`) in the series `series` of
    /// family `family` (an index into [`FAMILIES`]), when the current span belongs to a trace.
    pub fn offer(&self, family: usize, series: &str, value: f64, boundaries: &[f64]) {
        let trace_id = crate::telemetry::trace_id(&tracing::Span::current());
        if trace_id.is_empty() {
            return;
        }
        let bucket = boundaries
            .iter()
            .position(|le| value <= *le)
            .unwrap_or(boundaries.len());
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let exemplar = Exemplar {
            trace_id,
            value,
            at,
        };
        self.latest
            .lock()
            .expect("exemplars lock")
            .insert((family, series.to_owned(), bucket), exemplar);
    }

    fn find(&self, family: usize, series: &str, bucket: usize) -> Option<Exemplar> {
        let latest = self.latest.lock().expect("exemplars lock");
        latest.get(&(family, series.to_owned(), bucket)).cloned()
    }
}

/// The value of label `name` in a sample line (empty when the line has none).
fn label<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    line.find(&key)
        .map(|start| &line[start + key.len()..])
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("")
}

/// `text` (the Prometheus text format, as rendered) as OpenMetrics: counter families named
/// without their `_total` suffix, quotes escaped in help texts, each bucket of the
/// [`FAMILIES`] with its exemplar, and the closing `# EOF`.
pub fn render(text: &str, exemplars: &Exemplars, boundaries: &[f64]) -> String {
    let mut out = String::with_capacity(text.len() + 1024);
    let mut help: Option<&str> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let family = match kind {
                "counter" => name.strip_suffix("_total").unwrap_or(name),
                _ => name,
            };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {family} {}\n", text.replace('"', "\\\"")));
            }
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        out.push_str(line);
        if let Some((index, (_, series))) = FAMILIES
            .iter()
            .enumerate()
            .find(|(_, (family, _))| line.starts_with(&format!("{family}_bucket{{")))
        {
            let le = label(line, "le");
            let bucket = boundaries
                .iter()
                .position(|b| le.parse::<f64>().is_ok_and(|le| le == *b))
                .unwrap_or(boundaries.len());
            if let Some(e) = exemplars.find(index, label(line, series), bucket) {
                out.push_str(&format!(
                    " # {{trace_id=\"{}\"}} {} {:.3}",
                    e.trace_id, e.value, e.at
                ));
            }
        }
        out.push('\n');
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP a_total Things, \"quoted\"\n# TYPE a_total counter\na_total{x=\"1\"} 3\n\
        # HELP http_client_request_duration_seconds Calls\n\
        # TYPE http_client_request_duration_seconds histogram\n\
        http_client_request_duration_seconds_bucket{http_response_status_code=\"201\",le=\"0.1\"} 1\n\
        http_client_request_duration_seconds_bucket{http_response_status_code=\"201\",le=\"+Inf\"} 2\n\
        http_client_request_duration_seconds_bucket{http_response_status_code=\"503\",le=\"+Inf\"} 1\n\
        http_client_request_duration_seconds_sum{http_response_status_code=\"201\"} 2.05\n";

    #[test]
    fn counters_lose_their_suffix_in_metadata_and_buckets_carry_their_exemplar() {
        let exemplars = Exemplars::default();
        exemplars.latest.lock().unwrap().insert(
            (0, "201".into(), 1),
            Exemplar {
                trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                value: 2.0,
                at: 1.5,
            },
        );
        let out = render(TEXT, &exemplars, &[0.1]);
        assert!(
            out.contains("# HELP a Things, \\\"quoted\\\"\n# TYPE a counter\na_total{x=\"1\"} 3\n")
        );
        assert!(out.contains(
            "le=\"+Inf\"} 2 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 2 1.500\n"
        ));
        // Another series' bucket of the same bound has none.
        assert!(out.contains("http_response_status_code=\"503\",le=\"+Inf\"} 1\n"));
        assert!(out.contains("le=\"0.1\"} 1\n"));
        assert!(out.ends_with("# EOF\n"));
    }

    #[test]
    fn a_sample_outside_a_trace_is_not_kept() {
        let exemplars = Exemplars::default();
        exemplars.offer(0, "201", 0.05, &[0.1]);
        assert!(exemplars.latest.lock().unwrap().is_empty());
    }
}
