//! `config reference`: every setting with its type, its default, the environment variables that
//! set it and what it is for, read from `config/default.toml` as compiled in. That file is the
//! list of every key the worker accepts, so the reference cannot name a key that does not exist
//! or miss one that does; `docs/configuration.md` is this output, and a test keeps them equal.

use super::{DEFAULTS, ENV_ALIASES, ENV_PREFIX};
use std::fmt::Write as _;

/// One setting as the defaults file declares it.
#[derive(Debug, PartialEq)]
pub struct Entry {
    /// `section.key`.
    pub key: String,
    /// The default, as TOML writes it.
    pub default: String,
    /// The TOML type of the default (what a file or a variable must give).
    pub kind: &'static str,
    /// The comment above the key (or above the group of keys it belongs to).
    pub doc: String,
}

/// The file's opening comment (how the layers combine), then every setting in file order.
pub fn entries() -> (String, Vec<Entry>) {
    let mut intro = Vec::new();
    let mut section: Option<String> = None;
    let mut comment: Vec<String> = Vec::new();
    // A comment stays with the keys that follow it until a blank line: a group shares one.
    let mut doc = String::new();
    let mut entries = Vec::new();
    for line in DEFAULTS.lines() {
        let line = line.trim();
        if let Some(text) = line.strip_prefix('#') {
            comment.push(text.trim().to_owned());
        } else if line.is_empty() {
            if section.is_none() && !comment.is_empty() {
                intro.append(&mut comment);
            }
            comment.clear();
            doc.clear();
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.to_owned());
            comment.clear();
            doc.clear();
        } else if let Some((key, value)) = line.split_once('=') {
            if !comment.is_empty() {
                doc = paragraph(&comment);
                comment.clear();
            }
            let key = key.trim();
            let full = match &section {
                Some(section) => format!("{section}.{key}"),
                None => key.to_owned(),
            };
            let default = value.trim().to_owned();
            let kind = toml::from_str::<toml::Table>(&format!("v = {default}"))
                .ok()
                .and_then(|t| t.get("v").map(toml::Value::type_str))
                .unwrap_or("string");
            entries.push(Entry {
                key: full,
                default,
                kind,
                doc: doc.clone(),
            });
        }
    }
    (intro.join("\n"), entries)
}

/// Comment lines as one paragraph of text.
fn paragraph(lines: &[String]) -> String {
    let words: Vec<&str> = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect();
    words.join(" ")
}

/// The environment variables that set `key`: the general one, and its short alias if any.
fn variables(key: &str) -> String {
    let general = format!("`{ENV_PREFIX}{}`", key.to_uppercase().replace('.', "__"));
    match ENV_ALIASES.iter().find(|(_, k)| *k == key) {
        Some((alias, _)) => format!("{general} or `{alias}`"),
        None => general,
    }
}

/// The reference as Markdown (`docs/configuration.md`).
pub fn markdown() -> String {
    let (intro, entries) = entries();
    let mut sections: Vec<&str> = Vec::new();
    for entry in &entries {
        let section = entry.key.split_once('.').map_or("", |(s, _)| s);
        if sections.last() != Some(&section) {
            sections.push(section);
        }
    }
    let mut out = String::new();
    out.push_str(
        "# Configuration reference\n\n\
         For whoever deploys or tunes the worker: every setting, its type, its default, the \
         environment variables that set it, and what it is for. This file is the output of \
         `payment-link-worker config reference`, which reads `config/default.toml` as compiled \
         into the binary (the list of every key the worker accepts); a test fails when the two \
         differ. `config/default.toml` opens with:\n\n",
    );
    // The defaults file's own opening, paragraph by paragraph, quoted.
    let lines: Vec<String> = intro.lines().map(str::to_owned).collect();
    for part in lines.split(String::is_empty) {
        let _ = writeln!(out, "> {}\n>", paragraph(part));
    }
    out.truncate(out.trim_end_matches(['>', '\n']).len());
    out.push_str("\n\n");
    for section in &sections {
        let _ = writeln!(out, "- [`[{section}]`](#{section})");
    }
    let mut current = "";
    for entry in &entries {
        let section = entry.key.split_once('.').map_or("", |(s, _)| s);
        if section != current {
            let _ = writeln!(out, "\n## `[{section}]`");
            current = section;
        }
        let _ = writeln!(
            out,
            "\n### `{}`\n\n{} · default `{}` · {}\n",
            entry.key,
            entry.kind,
            entry.default,
            variables(&entry.key)
        );
        let _ = writeln!(out, "{}", entry.doc);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_the_worker_accepts_is_in_the_reference_with_a_doc() {
        let (intro, entries) = entries();
        assert!(intro.contains("Layering"), "{intro}");
        let mut keys = Vec::new();
        for (section, table) in super::super::layers::defaults_table() {
            let toml::Value::Table(table) = table else {
                panic!("{section} is a table")
            };
            keys.extend(table.keys().map(|k| format!("{section}.{k}")));
        }
        let mut listed: Vec<String> = entries.iter().map(|e| e.key.clone()).collect();
        keys.sort();
        listed.sort();
        assert_eq!(listed, keys);
        for entry in &entries {
            assert!(!entry.doc.is_empty(), "{} has no comment", entry.key);
        }
    }

    #[test]
    fn an_entry_names_its_type_default_and_variables() {
        let (_, entries) = entries();
        let url = entries.iter().find(|e| e.key == "database.url").unwrap();
        assert_eq!(url.kind, "string");
        assert!(url.doc.contains("PostgreSQL URL"), "{}", url.doc);
        assert_eq!(
            variables("database.url"),
            "`PAYMENT_LINK_WORKER__DATABASE__URL` or `DATABASE_URL`"
        );
        let tiers = entries
            .iter()
            .find(|e| e.key == "retry.delay_tiers_ms")
            .unwrap();
        assert_eq!(tiers.kind, "array");
        let ratio = entries
            .iter()
            .find(|e| e.key == "breaker.failure_ratio")
            .unwrap();
        assert_eq!((ratio.kind, ratio.default.as_str()), ("float", "0.5"));
    }
}
