//! How the layers are merged: a file's table over the defaults (refusing keys the defaults do
//! not have, and values of another type), and one environment variable's text parsed as the type
//! of the key's default.

use super::{ConfigError, DEFAULTS};
use std::path::Path;

pub(super) fn defaults_table() -> toml::Table {
    toml::from_str(DEFAULTS).expect("config/default.toml is valid TOML")
}

/// Overlays a file's table on the merged one, refusing keys the defaults do not have.
pub(super) fn merge_file(
    into: &mut toml::Table,
    overlay: toml::Table,
    prefix: &str,
    path: &Path,
) -> Result<(), ConfigError> {
    for (key, value) in overlay {
        let full = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(nested)) => {
                merge_file(existing, nested, &full, path)?
            }
            (Some(toml::Value::Table(_)), _) => {
                return Err(ConfigError(format!(
                    "`{full}` in {} must be a table",
                    path.display()
                )));
            }
            (Some(toml::Value::Float(existing)), toml::Value::Integer(value)) => {
                *existing = value as f64
            }
            (Some(existing), value) if existing.type_str() == value.type_str() => *existing = value,
            (Some(existing), value) => {
                return Err(ConfigError(format!(
                    "`{full}` in {} must be {}, got {}",
                    path.display(),
                    article(existing.type_str()),
                    article(value.type_str())
                )));
            }
            (None, _) => {
                return Err(ConfigError(format!(
                    "unknown setting `{full}` in {}",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

fn article(type_name: &str) -> String {
    match type_name {
        "integer" => "a whole number".into(),
        "array" => "an array".into(),
        other => format!("a {other}"),
    }
}

/// Sets `key` from an environment variable's text, parsed as the type its default has.
pub(super) fn set_from_env(
    table: &mut toml::Table,
    key: &str,
    raw: &str,
    var: &str,
) -> Result<(), ConfigError> {
    let unknown = || {
        ConfigError(format!(
            "unknown setting `{key}` in environment variable {var}"
        ))
    };
    let mut parts = key.split('.');
    let (Some(section), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(unknown());
    };
    let Some(toml::Value::Table(section)) = table.get_mut(section) else {
        return Err(unknown());
    };
    let slot = section.get_mut(name).ok_or_else(unknown)?;
    let bad = |expected: &str| {
        ConfigError(format!(
            "environment variable {var} (`{key}`) must be {expected}"
        ))
    };
    *slot = match slot {
        toml::Value::String(_) => toml::Value::String(raw.to_owned()),
        toml::Value::Integer(_) => {
            toml::Value::Integer(raw.trim().parse().map_err(|_| bad("a whole number"))?)
        }
        toml::Value::Float(_) => {
            toml::Value::Float(raw.trim().parse().map_err(|_| bad("a number"))?)
        }
        toml::Value::Boolean(_) => {
            toml::Value::Boolean(raw.trim().parse().map_err(|_| bad("true or false"))?)
        }
        // A comma-separated list: of text for the lists of URLs, of whole numbers otherwise.
        toml::Value::Array(_) => {
            let items = raw
                .split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty());
            if TEXT_LISTS.contains(&key) {
                toml::Value::Array(items.map(|i| toml::Value::String(i.to_owned())).collect())
            } else {
                toml::Value::Array(
                    items
                        .map(|item| item.parse().map(toml::Value::Integer))
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad("a comma-separated list of whole numbers"))?,
                )
            }
        }
        _ => return Err(unknown()),
    };
    Ok(())
}

/// The list settings whose items are text (the others hold whole numbers).
const TEXT_LISTS: [&str; 3] = [
    "broker.urls",
    "broker.carried_headers",
    "console.trust_forwarded_for",
];

/// Every leaf key of a file's table, dotted (`broker.prefetch`), for recording where it came from.
pub(super) fn keys_of(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (key, value) in table {
        let full = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(nested) => keys_of(nested, &full, out),
            _ => out.push(full),
        }
    }
}
