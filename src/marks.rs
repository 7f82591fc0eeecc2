//! The worker's signature on what it says about a message. Anyone who may publish a command can
//! set `x-replay-count` (a recorded failure is attempted again only when it grows) or
//! `x-delay-round`, and any AMQP user can write a letter into the dead-letter exchange with
//! `x-error-kind` and `x-failed-at` of their choosing. So the worker signs its own: an HMAC-SHA256,
//! with a per-deployment key, over a command's counters on each copy it sends back to the command
//! queue ([`WORKER_MARK`]: delayed copies and replays) and over a dead letter's id, kind, time and
//! replay count ([`DEAD_LETTER_MARK`]). A counter without a valid mark is ignored (read as absent),
//! and a dead letter without one is stored as `foreign`.
//!
//! The key is `dead_letters.signing_key` when set (every process of the deployment must have the
//! same), else one made at random by the first process that needs it and kept in PostgreSQL
//! (`signing_key`), where every worker, console and command line of the deployment reads it.

use crate::headers::{
    ATTEMPTS, DEAD_LETTER_ID, DEAD_LETTER_MARK, DELAY_ROUND, ERROR_KIND, FAILED_AT, REPLAY_COUNT,
    WORKER_MARK,
};
use crate::store::{PgConn, StoreError};
use hmac::{Hmac, Mac};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use std::borrow::Cow;
use std::sync::Arc;

/// Bytes of the HMAC a mark keeps (128 bits).
const TAG_BYTES: usize = 16;
/// The counters a [`WORKER_MARK`] covers.
const COUNTERS: [&str; 3] = [REPLAY_COUNT, DELAY_ROUND, ATTEMPTS];

/// Signs and checks the worker's marks with the deployment's key.
#[derive(Clone)]
pub struct Marks {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Marks([redacted])")
    }
}

impl Marks {
    /// Marks signed with `key`.
    pub fn with_key(key: &[u8]) -> Self {
        Self { key: key.into() }
    }

    /// The deployment's marks: `dead_letters.signing_key`, or the key kept in PostgreSQL (made
    /// now if nobody has made it yet).
    pub async fn load(
        settings: &crate::config::Settings,
        conn: &mut PgConn,
    ) -> Result<Self, StoreError> {
        use diesel::sql_types::Bytea;
        use diesel_async::RunQueryDsl;
        let configured = settings.dead_letters.signing_key.expose();
        if !configured.is_empty() {
            return Ok(Self::with_key(configured.as_bytes()));
        }
        let fresh: Vec<u8> = [uuid::Uuid::new_v4(), uuid::Uuid::new_v4()]
            .iter()
            .flat_map(|u| u.into_bytes())
            .collect();
        diesel::sql_query(
            "INSERT INTO signing_key (id, key) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind::<Bytea, _>(fresh)
        .execute(conn)
        .await?;
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = Bytea)]
            key: Vec<u8>,
        }
        let row: Row = diesel::sql_query("SELECT key FROM signing_key WHERE id = 1")
            .get_result(conn)
            .await?;
        Ok(Self::with_key(&row.key))
    }

    /// The mark over `parts` (each length-prefixed, so no two lists of parts sign alike), hex.
    fn tag(&self, parts: &[&str]) -> String {
        let mut mac =
            Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("HMAC takes a key of any size");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        let tag = mac.finalize().into_bytes();
        tag[..TAG_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `mark` is the tag over `parts`, compared in constant time.
    fn verify(&self, parts: &[&str], mark: &str) -> bool {
        let expected = self.tag(parts);
        expected.len() == mark.len()
            && expected
                .bytes()
                .zip(mark.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Adds the [`WORKER_MARK`] over the counters `headers` holds, for the command `message_id`.
    pub fn sign_counters(&self, headers: &mut FieldTable, message_id: &str) {
        let parts = counter_parts(headers, message_id);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        headers.insert(WORKER_MARK.into(), crate::headers::text(&self.tag(&parts)));
    }

    /// The properties with the counters kept only when the worker's mark over them holds: a
    /// publisher's own `x-replay-count`, `x-delay-round` or `x-attempts` is read as absent.
    /// Borrowed when there is nothing to remove.
    pub fn verified_counters<'a>(
        &self,
        properties: &'a BasicProperties,
    ) -> Cow<'a, BasicProperties> {
        let Some(headers) = properties.headers() else {
            return Cow::Borrowed(properties);
        };
        let inner = headers.inner();
        if !COUNTERS.iter().any(|c| inner.contains_key(*c)) && !inner.contains_key(WORKER_MARK) {
            return Cow::Borrowed(properties);
        }
        let message_id = properties.message_id().as_ref().map_or("", |m| m.as_str());
        let parts = counter_parts(headers, message_id);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        let valid = text(headers, WORKER_MARK).is_some_and(|mark| self.verify(&parts, &mark));
        let mut kept = FieldTable::default();
        for (name, value) in inner {
            let counter = COUNTERS.contains(&name.as_str());
            if name.as_str() != WORKER_MARK && (valid || !counter) {
                kept.insert(name.clone(), value.clone());
            }
        }
        Cow::Owned(properties.clone().with_headers(kept))
    }

    /// Adds the [`DEAD_LETTER_MARK`] over the dead letter's id, kind, time and replay count.
    pub fn sign_dead_letter(&self, headers: &mut FieldTable, message_id: &str) {
        let parts = dead_letter_parts(headers, message_id);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        headers.insert(
            DEAD_LETTER_MARK.into(),
            crate::headers::text(&self.tag(&parts)),
        );
    }

    /// Whether the dead letter carries this deployment's mark over what it says about itself.
    pub fn dead_letter_is_ours(&self, properties: &BasicProperties) -> bool {
        let Some(headers) = properties.headers() else {
            return false;
        };
        let message_id = properties.message_id().as_ref().map_or("", |m| m.as_str());
        let parts = dead_letter_parts(headers, message_id);
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        text(headers, DEAD_LETTER_MARK).is_some_and(|mark| self.verify(&parts, &mark))
    }
}

/// What a [`WORKER_MARK`] covers.
fn counter_parts(headers: &FieldTable, message_id: &str) -> Vec<String> {
    let mut parts = vec!["counters".to_owned(), message_id.to_owned()];
    parts.extend(COUNTERS.iter().map(|c| canonical(headers, c)));
    parts
}

/// What a [`DEAD_LETTER_MARK`] covers.
fn dead_letter_parts(headers: &FieldTable, message_id: &str) -> Vec<String> {
    let mut parts = vec!["dead-letter".to_owned(), message_id.to_owned()];
    parts.extend(
        [DEAD_LETTER_ID, ERROR_KIND, FAILED_AT, REPLAY_COUNT]
            .iter()
            .map(|c| canonical(headers, c)),
    );
    parts
}

/// A header's value as the mark reads it: its type and value, or `-` when absent.
fn canonical(headers: &FieldTable, name: &str) -> String {
    match headers.inner().get(name) {
        None => "-".to_owned(),
        Some(AMQPValue::LongString(s)) => format!("S{}", String::from_utf8_lossy(s.as_bytes())),
        Some(other) => format!("{other:?}"),
    }
}

/// A text header's value.
fn text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(headers: FieldTable) -> BasicProperties {
        BasicProperties::default()
            .with_message_id("c-1".into())
            .with_headers(headers)
    }

    #[test]
    fn signed_counters_are_kept_and_forged_or_changed_ones_dropped() {
        let marks = Marks::with_key(b"k1");
        let mut headers = FieldTable::default();
        headers.insert(REPLAY_COUNT.into(), AMQPValue::LongLongInt(2));
        headers.insert("other".into(), crate::headers::text("o"));
        marks.sign_counters(&mut headers, "c-1");
        let signed = with(headers.clone());
        let kept = marks.verified_counters(&signed);
        assert_eq!(crate::headers::read_int(&kept, REPLAY_COUNT), Some(2));
        assert!(
            !kept
                .headers()
                .as_ref()
                .unwrap()
                .inner()
                .contains_key(WORKER_MARK)
        );

        // Another key, another count, another command: the counters go, the rest stays.
        for (marks, properties) in [
            (Marks::with_key(b"k2"), signed.clone()),
            (marks.clone(), signed.clone().with_message_id("c-2".into())),
            (marks.clone(), {
                let mut h = headers.clone();
                h.insert(REPLAY_COUNT.into(), AMQPValue::LongLongInt(3));
                with(h)
            }),
        ] {
            let kept = marks.verified_counters(&properties);
            assert_eq!(crate::headers::read_int(&kept, REPLAY_COUNT), None);
            assert_eq!(
                crate::headers::read_text(&kept, "other").as_deref(),
                Some("o")
            );
        }
        let plain = with(FieldTable::default());
        assert!(matches!(marks.verified_counters(&plain), Cow::Borrowed(_)));
    }

    #[test]
    fn a_dead_letter_is_ours_only_with_its_mark_over_what_it_says() {
        let marks = Marks::with_key(b"k1");
        let mut headers = FieldTable::default();
        headers.insert(DEAD_LETTER_ID.into(), crate::headers::text("d-1"));
        headers.insert(ERROR_KIND.into(), crate::headers::text("provider-rejected"));
        headers.insert(
            FAILED_AT.into(),
            crate::headers::text("2026-12-01T00:00:00Z"),
        );
        assert!(!marks.dead_letter_is_ours(&with(headers.clone())));
        marks.sign_dead_letter(&mut headers, "c-1");
        assert!(marks.dead_letter_is_ours(&with(headers.clone())));
        assert!(!Marks::with_key(b"k2").dead_letter_is_ours(&with(headers.clone())));
        headers.insert(
            FAILED_AT.into(),
            crate::headers::text("2099-01-01T00:00:00Z"),
        );
        assert!(!marks.dead_letter_is_ours(&with(headers)));
    }
}
