//! Who is calling: an operator found by the SHA-256 of their token (sent as a bearer token by
//! scripts, or once through the sign-in form by a browser, which then holds a session cookie).
//! A browser's actions also carry the session's CSRF token, which a page of another site cannot
//! read; a bearer token is not sent by browsers on their own, so it needs none.

use super::Console;
use crate::config::ConsoleSettings;
use crate::store::{self, StoreError};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use sha2::{Digest, Sha256};
use std::time::Duration;

pub use crate::config::Role;

/// A configured operator.
#[derive(Clone)]
pub struct Operator {
    /// Shown in the audit log.
    pub name: String,
    /// What they may do.
    pub role: Role,
    /// SHA-256 of their token.
    digest: [u8; 32],
    /// Their token's length in characters: a token of another length never signs in, so a
    /// line whose stated length is not its token's lets nobody in.
    chars: usize,
}

/// What `[[console.operators]]` holds instead of a token: `sha256:<characters>:<hex digest>`.
/// The length is stated so that start-up can refuse a short token it cannot see (a bare digest
/// cannot show it), and checked at sign-in, so that stating it falsely lets nobody in.
pub fn token_sha256(token: &str) -> String {
    let hex: String = Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{}:{hex}", token.chars().count())
}

/// The stated length and the digest of a configured `token_sha256`; why not, if it is not one.
pub fn parse_token_sha256(text: &str) -> Result<(usize, [u8; 32]), String> {
    let how = "make the line with `payment-link-worker console hash-token`";
    let Some(rest) = text.strip_prefix("sha256:") else {
        return Err(if text.len() == 64 {
            format!(
                "is a bare SHA-256, which cannot show that the token is at least \
                 {SHORTEST_TOKEN} characters long: {how}"
            )
        } else {
            format!("is not sha256:<characters>:<64 hex digits>: {how}")
        });
    };
    let (chars, hex) = rest
        .split_once(':')
        .ok_or_else(|| format!("is not sha256:<characters>:<64 hex digits>: {how}"))?;
    let chars: usize = chars
        .parse()
        .map_err(|_| format!("states no token length: {how}"))?;
    if chars < SHORTEST_TOKEN {
        return Err(format!(
            "is for a token of {chars} characters: at least {SHORTEST_TOKEN} are needed, so it \
             cannot be guessed (e.g. `openssl rand -hex 24`)"
        ));
    }
    let mut out = [0u8; 32];
    if hex.len() != 64 {
        return Err(format!("does not end in 64 hex digits: {how}"));
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = hex
            .get(2 * i..2 * i + 2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| format!("does not end in 64 hex digits: {how}"))?;
    }
    Ok((chars, out))
}

/// The configured operators, plus the one `CONSOLE_OPERATOR_TOKEN` (named by
/// `CONSOLE_OPERATOR_NAME`, default "operator") adds; `env` reads a variable.
pub fn operators(
    settings: &ConsoleSettings,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Vec<Operator>> {
    let mut operators = Vec::new();
    for (i, configured) in settings.operators.iter().enumerate() {
        let (chars, digest) = parse_token_sha256(&configured.token_sha256)
            .map_err(|why| anyhow::anyhow!("`console.operators[{i}].token_sha256` {why}"))?;
        operators.push(Operator {
            name: configured.name.clone(),
            role: configured.role,
            digest,
            chars,
        });
    }
    if let Some(token) = env("CONSOLE_OPERATOR_TOKEN").filter(|t| !t.is_empty()) {
        if let Err(why) = strong_enough(&token) {
            anyhow::bail!("CONSOLE_OPERATOR_TOKEN {why}");
        }
        operators.push(Operator {
            name: env("CONSOLE_OPERATOR_NAME")
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| "operator".into()),
            role: Role::Operator,
            digest: Sha256::digest(token.as_bytes()).into(),
            chars: token.chars().count(),
        });
    }
    Ok(operators)
}

/// The fewest characters a token may have.
pub const SHORTEST_TOKEN: usize = 24;

/// Whether `token` is long enough not to be guessed; if not, why (to follow its name).
pub fn strong_enough(token: &str) -> Result<(), String> {
    let n = token.chars().count();
    if n < SHORTEST_TOKEN {
        return Err(format!(
            "is {n} characters long: at least {SHORTEST_TOKEN} are needed, so it cannot be \
             guessed (e.g. `openssl rand -hex 24`)"
        ));
    }
    Ok(())
}

/// What `console hash-token` prints for a token read from its standard input: the config lines
/// of an operator holding it, or why the token is refused.
pub fn operator_config(token: &str, name: &str, role: Role) -> Result<String, String> {
    let token = token.trim_end_matches(['\n', '\r']);
    strong_enough(token).map_err(|why| format!("the token {why}"))?;
    let role = role.as_str();
    Ok(format!(
        "[[console.operators]]\nname = {}\nrole = \"{role}\"\ntoken_sha256 = \"{}\"\n",
        toml_string(name),
        token_sha256(token)
    ))
}

/// `text` as a TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The operator whose token this is.
pub(super) fn find<'a>(operators: &'a [Operator], token: &str) -> Option<&'a Operator> {
    let digest = digest(token);
    let chars = token.chars().count();
    // Compared in constant time, so the answer time says nothing about how much matched.
    operators.iter().find(|o| {
        o.digest
            .iter()
            .zip(digest.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
            && o.chars == chars
    })
}

/// Browser sessions, kept in PostgreSQL so that every console replica knows them and a restart
/// signs nobody out; the cookie's value is stored only as its SHA-256.
#[derive(Clone)]
pub(super) struct Sessions(crate::store::PgPool);

/// A live session, with the operator's role as the configuration gives it now.
struct Session {
    name: String,
    role: Role,
    csrf: String,
}

/// How long a browser session lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub(super) const COOKIE: &str = "plw_console";

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The SHA-256 of a token or a session id: what is compared and stored instead of it.
fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    pub(super) fn new(pool: crate::store::PgPool) -> Self {
        Sessions(pool)
    }

    /// Opens a session for `operator`; returns its cookie value.
    pub(super) async fn open(&self, operator: &Operator) -> Result<String, StoreError> {
        let id = random_token();
        let expires = chrono::Utc::now()
            + chrono::Duration::from_std(SESSION_LIFETIME).expect("a lifetime of hours");
        let mut conn = self.0.get().await?;
        store::sessions::open(
            &mut conn,
            &digest(&id),
            &operator.name,
            &random_token(),
            expires,
        )
        .await?;
        Ok(id)
    }

    /// Ends a session, for every replica.
    pub(super) async fn close(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.0.get().await?;
        store::sessions::close(&mut conn, &digest(id)).await
    }

    /// The live session with this cookie value, if its operator is still configured.
    async fn get(&self, id: &str, operators: &[Operator]) -> Result<Option<Session>, StoreError> {
        let mut conn = self.0.get().await?;
        let Some(stored) = store::sessions::find(&mut conn, &digest(id)).await? else {
            return Ok(None);
        };
        Ok(operators
            .iter()
            .find(|o| o.name == stored.operator)
            .map(|o| Session {
                name: o.name.clone(),
                role: o.role,
                csrf: stored.csrf,
            }))
    }
}

/// The signed-in caller of a request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Their name, for the audit log.
    pub name: String,
    /// What they may do.
    pub role: Role,
    /// The session's CSRF token (none for a bearer token).
    pub csrf: Option<String>,
    /// The session cookie's value (none for a bearer token).
    pub session: Option<String>,
    /// Where the request came from (see [`super::throttle::client_address`]).
    pub address: Option<std::net::IpAddr>,
}

/// Why a request was refused.
#[derive(Debug)]
pub enum Refusal {
    /// No valid token or session.
    Unauthenticated {
        /// Whether the request was for a page (redirected to the sign-in form) or the API.
        page: bool,
    },
    /// Signed in, but not allowed to do this.
    Forbidden(&'static str),
    /// Too many wrong tokens from the caller's address: try again after this long.
    Throttled(Duration),
    /// The session store (PostgreSQL) cannot be read: try again shortly.
    Unavailable,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthenticated { page: true } => Redirect::to("/login").into_response(),
            Refusal::Unauthenticated { page: false } => super::reply::error(
                StatusCode::UNAUTHORIZED,
                "sign in: send Authorization: Bearer <token>",
            ),
            Refusal::Forbidden(why) => super::reply::error(StatusCode::FORBIDDEN, why),
            Refusal::Throttled(wait) => throttled(wait),
            Refusal::Unavailable => super::reply::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the console cannot read its sessions from the database: try again shortly",
            ),
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub(super) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

impl FromRequestParts<Console> for Caller {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, console: &Console) -> Result<Self, Refusal> {
        let page = !parts.uri.path().starts_with("/api/");
        let address = super::throttle::client_address(parts, &console.trusted_proxies);
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(token) = bearer {
            if let Some(wait) = console.throttle.blocked(address, "bearer") {
                return Err(Refusal::Throttled(wait));
            }
            let Some(operator) = find(&console.operators, token.trim()) else {
                refused(console, address, "bearer").await;
                return Err(Refusal::Unauthenticated { page });
            };
            console.throttle.succeeded(address);
            return Ok(Caller {
                name: operator.name.clone(),
                role: operator.role,
                csrf: None,
                session: None,
                address,
            });
        }
        let id = cookie(&parts.headers, COOKIE).ok_or(Refusal::Unauthenticated { page })?;
        let session = match console.sessions.get(&id, &console.operators).await {
            Ok(Some(session)) => session,
            Ok(None) => return Err(Refusal::Unauthenticated { page }),
            Err(error) => {
                tracing::warn!(%error, "cannot read a console session");
                return Err(Refusal::Unavailable);
            }
        };
        Ok(Caller {
            name: session.name,
            role: session.role,
            csrf: Some(session.csrf),
            session: Some(id),
            address,
        })
    }
}

/// A 429 that says when to come back.
pub(super) fn throttled(wait: Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let mut response = super::reply::error(
        StatusCode::TOO_MANY_REQUESTS,
        &format!("too many wrong tokens from this address: try again in {secs} s"),
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, secs.into());
    response
}

/// Notes a wrong token (`how`: sign-in or bearer) from `address`: counted toward the throttle
/// and logged at warn, without the token; the audit log gets it summed with the address's other
/// refusals of its window (see `audit_refusals`).
pub(super) async fn refused(console: &Console, address: Option<std::net::IpAddr>, how: &str) {
    let (failures, paced) = console.throttle.failed(address, how);
    let from = address.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
    tracing::warn!(client_address = %from, how, failures, paced = paced.is_some(),
        "console authentication refused: a token that belongs to no operator");
}

/// The header a browser's action carries its CSRF token in.
pub(super) const CSRF_HEADER: &str = "x-csrf-token";

impl Caller {
    /// Whether this caller may change something with this request: an operator, and for a
    /// browser session, the session's CSRF token in the request.
    pub(super) fn may_act(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.role != Role::Operator {
            return Err(Refusal::Forbidden(
                "viewers cannot replay or archive; ask an operator",
            ));
        }
        if let Some(expected) = &self.csrf {
            let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
            if sent != Some(expected.as_str()) {
                return Err(Refusal::Forbidden(
                    "missing or wrong CSRF token: reload the page and try again",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OperatorSettings;

    #[test]
    fn operators_are_found_by_their_token_only() {
        let mut settings = crate::config::Settings::load(None).unwrap().console;
        settings.operators = vec![OperatorSettings {
            name: "vera".into(),
            role: Role::Viewer,
            token_sha256: token_sha256("viewer-token-01234567890"),
        }];
        let env = |name: &str| match name {
            "CONSOLE_OPERATOR_TOKEN" => Some("operator-token-0123456789".to_owned()),
            _ => None,
        };
        let all = operators(&settings, env).unwrap();
        assert_eq!(
            find(&all, "viewer-token-01234567890").unwrap().role,
            Role::Viewer
        );
        let quick = find(&all, "operator-token-0123456789").unwrap();
        assert_eq!(
            (quick.name.as_str(), quick.role),
            ("operator", Role::Operator)
        );
        assert!(find(&all, "operator-token-012345678").is_none());
        assert!(find(&all, "").is_none());
        let short = |name: &str| (name == "CONSOLE_OPERATOR_TOKEN").then(|| "short".to_owned());
        assert!(operators(&settings, short).is_err());
    }

    #[test]
    fn a_configured_token_line_must_show_a_long_enough_token() {
        let hex = &token_sha256("x")["sha256:1:".len()..];
        // A bare digest (even of a 1-character token), a short stated length, junk: refused.
        for (line, says) in [
            (hex.to_owned(), "bare SHA-256"),
            (format!("sha256:1:{hex}"), "1 characters"),
            (format!("sha256:lots:{hex}"), "states no token length"),
            ("sha256:30:abc".to_owned(), "64 hex"),
            ("md5:abc".to_owned(), "is not sha256"),
        ] {
            let why = parse_token_sha256(&line).unwrap_err();
            assert!(why.contains(says), "{line}: {why}");
        }
        // A line that states a length its token does not have lets nobody in.
        let lying = format!("sha256:30:{hex}");
        let mut settings = crate::config::Settings::load(None).unwrap().console;
        settings.operators = vec![OperatorSettings {
            name: "liar".into(),
            role: Role::Operator,
            token_sha256: lying,
        }];
        let all = operators(&settings, |_| None).unwrap();
        assert!(find(&all, "x").is_none());
    }
}
