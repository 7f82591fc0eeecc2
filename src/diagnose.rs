//! Start-up failures as one line a person can act on: what failed, the cause (the innermost
//! error, said once), the setting and the variable or file that point there, and the fix when
//! it is obvious. The database pool reports only "error connecting to server"; to say *why*, the
//! worker connects once more, directly, and reads the cause from that attempt.

use crate::config::{BrokerSettings, SecretUrl, Settings, redact_url};
use std::time::Duration;

/// A database step at start-up failed (`what`, e.g. "migrate the database"); returns the one-line
/// error, diagnosed by a direct connection attempt.
pub async fn database(
    settings: &Settings,
    what: &str,
    error: impl std::fmt::Display,
) -> anyhow::Error {
    let db = &settings.database;
    let url = db.url.expose();
    let setting = settings.origins.describe("database.url");
    let shown = db.url.to_string();
    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return anyhow::anyhow!("cannot {what}: {setting} is not a valid PostgreSQL URL");
    };
    let timeout = Duration::from_millis(db.connect_timeout_ms);
    let attempt = tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls)).await;
    let cause = match attempt {
        Err(_) => format!(
            "no answer within {} ms (database.connect_timeout_ms); is the host right and PostgreSQL up?",
            timeout.as_millis()
        ),
        Ok(Ok((_client, _connection))) => {
            // Connecting works: the failure was the step itself.
            return anyhow::anyhow!(
                "cannot {what} at {shown}: {}",
                settings.database.url.scrub(&dedup(&error.to_string()))
            );
        }
        Ok(Err(failure)) => postgres_cause(&config, &failure),
    };
    anyhow::anyhow!("cannot {what}: PostgreSQL at {shown} ({setting}): {cause}")
}

/// What a failed connection attempt says, with the fix for the usual cases.
fn postgres_cause(config: &tokio_postgres::Config, failure: &tokio_postgres::Error) -> String {
    use tokio_postgres::error::SqlState;
    if let Some(db_error) = failure.as_db_error() {
        let code = db_error.code();
        if *code == SqlState::INVALID_CATALOG_NAME {
            let name = config.get_dbname().unwrap_or("");
            return format!(
                "database \"{name}\" does not exist; create it with `{}` (the worker creates its \
                 tables), or change the URL",
                createdb(config, name)
            );
        }
        if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            return format!(
                "{}; check the user and password in the URL",
                db_error.message()
            );
        }
        return db_error.message().to_owned();
    }
    let io = std::error::Error::source(failure)
        .and_then(|source| source.downcast_ref::<std::io::Error>());
    match io {
        Some(io) => io_cause(io, "PostgreSQL"),
        None => redact_url(&failure.to_string()),
    }
}

/// The `createdb` command line that makes the database the URL names.
fn createdb(config: &tokio_postgres::Config, name: &str) -> String {
    let mut line = String::from("createdb");
    if let Some(tokio_postgres::config::Host::Tcp(host)) = config.get_hosts().first() {
        line.push_str(&format!(" -h {host}"));
    }
    if let Some(port) = config.get_ports().first().filter(|p| **p != 5432) {
        line.push_str(&format!(" -p {port}"));
    }
    if let Some(user) = config.get_user() {
        line.push_str(&format!(" -U {user}"));
    }
    format!("{line} {name}")
}

/// An operating-system error in words, with what to check.
pub fn io_cause(io: &std::io::Error, server: &str) -> String {
    use std::io::ErrorKind as K;
    match io.kind() {
        K::ConnectionRefused => {
            format!("connection refused; is {server} running and listening there?")
        }
        K::TimedOut => format!("connection timed out; is the host right and {server} reachable?"),
        K::ConnectionReset | K::ConnectionAborted => {
            format!("the connection was closed at once; is that {server}'s port?")
        }
        _ => {
            // std has no error kind for a failed name lookup (getaddrinfo's answer comes as
            // text): the one place a cause is told by its words.
            let text = io.to_string();
            if text.contains("lookup")
                || text.contains("resolve")
                || text.contains("Name or service")
            {
                "the host name does not resolve; check the host in the URL".into()
            } else {
                text
            }
        }
    }
}

/// The broker's AMQP reply code when `error` is a refusal (a channel or connection closed by the
/// broker): how a refusal's kind is told, never by its text.
pub fn refusal(error: &lapin::Error) -> Option<&lapin::protocol::AMQPErrorKind> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(reply) => Some(reply.kind()),
        _ => None,
    }
}

/// The broker could not be reached: one line naming the URL (password masked), the setting that
/// gave it and the cause. lapin's own error text may quote the URL: it is scrubbed.
pub fn broker(settings: &BrokerSettings, url: &SecretUrl, error: &lapin::Error) -> anyhow::Error {
    let setting = if settings.url_origin.is_empty() {
        "`broker.url`"
    } else {
        settings.url_origin.as_str()
    };
    use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
    let cause = match (error.kind(), refusal(error)) {
        (lapin::ErrorKind::IOError(io), _) => io_cause(io, "RabbitMQ"),
        (_, Some(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))) => {
            "the broker refused the login; check the user and password in the URL".into()
        }
        (_, Some(AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED))) => format!(
            "{}; check the virtual host in the URL (%2f is the default one)",
            url.scrub(&error.to_string())
        ),
        _ => url.scrub(&error.to_string()),
    };
    anyhow::anyhow!("cannot connect to RabbitMQ at {url} ({setting}): {cause}")
}

/// An error chain as one line, each distinct message once (the pool repeats its cause at every
/// level, and prefixes it with "Error occurred while creating a new object").
pub fn dedup(chain: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in chain.split(": ") {
        let part = part.trim();
        if part.is_empty() || part == "Error occurred while creating a new object" {
            continue;
        }
        if !parts.contains(&part) {
            parts.push(part);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_cause_is_said_once() {
        let chain = "cannot get a database connection: Error occurred while creating a new object: \
                     role \"x\" does not exist: Error occurred while creating a new object: role \"x\" \
                     does not exist: role \"x\" does not exist";
        assert_eq!(
            dedup(chain),
            "cannot get a database connection: role \"x\" does not exist"
        );
    }

    #[test]
    fn createdb_names_host_port_and_user() {
        let config: tokio_postgres::Config = "postgres://app:secret@db.example:5433/links"
            .parse()
            .unwrap();
        assert_eq!(
            createdb(&config, "links"),
            "createdb -h db.example -p 5433 -U app links"
        );
    }
}
