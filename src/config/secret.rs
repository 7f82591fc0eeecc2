//! Settings that must never be printed: the provider token and URLs that may hold a password.
//! `Debug` and `Display` show a placeholder or the URL with its password masked, so a secret
//! cannot reach a log line, an event or an error message by being formatted.

use serde::Deserialize;
use std::fmt;

/// A value that must never be printed: `Debug` and `Display` show a placeholder.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A URL that may carry a password: printing it shows the URL with the password masked.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps a URL.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The URL with its password, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// Query parameters whose values are secrets (`?password=…` in a PostgreSQL URL, for one).
const SECRET_PARAMS: [&str; 4] = ["password", "pass", "pwd", "secret"];

/// Where the secrets of a URL stand, as byte ranges: the password of its user information and
/// the values of secret query parameters. A password may hold `/`, `?`, `#` or `@` written raw:
/// the user information ends at the last `@` that is followed by something host-like.
fn secret_ranges(url: &str) -> Vec<std::ops::Range<usize>> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return Vec::new();
    };
    let rest = &url[scheme_end..];
    let host_like = |at: usize| {
        let host = &rest[at + 1..];
        let host = &host[..host.find(['/', '?', '#']).unwrap_or(host.len())];
        !host.is_empty() && !host.contains(['=', '&', '@'])
    };
    let before_query = rest.find(['?', '#']).unwrap_or(rest.len());
    let at = rest
        .rfind('@')
        .filter(|at| host_like(*at))
        .or_else(|| rest[..before_query].rfind('@'));
    let mut ranges = Vec::new();
    if let Some(at) = at
        && let Some(colon) = rest[..at].find(':')
    {
        ranges.push(scheme_end + colon + 1..scheme_end + at);
    }
    let query_from = at.map_or(0, |at| at + 1);
    if let Some(q) = rest[query_from..].find('?') {
        let mut offset = scheme_end + query_from + q + 1;
        for pair in url[offset..].split(['&', '#']) {
            if let Some((name, value)) = pair.split_once('=')
                && SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
                && !value.is_empty()
            {
                let start = offset + name.len() + 1;
                ranges.push(start..start + value.len());
            }
            offset += pair.len() + 1;
        }
    }
    ranges
}

/// The URL with every secret in it (a password, a secret query parameter) shown as `***`.
pub fn redact_url(url: &str) -> String {
    let mut shown = url.to_owned();
    for range in secret_ranges(url).into_iter().rev() {
        shown.replace_range(range, "***");
    }
    shown
}

impl SecretUrl {
    /// `text` (an error message from a library that may quote the URL) with this URL's secrets,
    /// as written and percent-decoded, shown as `***`. Secrets shorter than 4 characters are left
    /// alone: replacing them would garble the message more than it would hide.
    pub fn scrub(&self, text: &str) -> String {
        let mut scrubbed = text.to_owned();
        for range in secret_ranges(&self.0) {
            let raw = &self.0[range];
            for secret in [raw.to_owned(), percent_decoded(raw)] {
                if secret.chars().count() >= 4 {
                    scrubbed = scrubbed.replace(&secret, "***");
                }
            }
        }
        scrubbed
    }
}

fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_url_form_hides_its_password() {
        for (url, shown) in [
            ("amqp://u:p@h/%2f", "amqp://u:***@h/%2f"),
            ("amqp://u:pa/ss@h:5672/%2f", "amqp://u:***@h:5672/%2f"),
            ("amqp://u:p?w#d@h/%2f", "amqp://u:***@h/%2f"),
            ("amqp://u:p@ss@h/", "amqp://u:***@h/"),
            ("postgres://u:p@h/db?x=@", "postgres://u:***@h/db?x=@"),
            (
                "postgres://h/db?user=a&password=s3cret&x=1",
                "postgres://h/db?user=a&password=***&x=1",
            ),
            (
                "postgres://u:pw@h/db?sslmode=require&PASSWORD=two",
                "postgres://u:***@h/db?sslmode=require&PASSWORD=***",
            ),
            ("amqp://guest@h/%2f", "amqp://guest@h/%2f"),
            ("postgres://h:5432/db", "postgres://h:5432/db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    #[test]
    fn error_text_loses_the_password_as_written_and_decoded() {
        let url = SecretUrl::new("amqp://u:hunter%2F2@h/%2f");
        let text = "invalid uri amqp://u:hunter%2F2@h/%2f (password hunter/2)";
        let scrubbed = url.scrub(text);
        assert!(!scrubbed.contains("hunter"), "{scrubbed}");
    }
}
