//! The console's browser sessions, in PostgreSQL so that every console replica knows them.

use super::schema::console_sessions::dsl as s;
use super::{PgConn, StoreError};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

/// A session as the console reads it back.
#[derive(Clone, Debug, Queryable)]
pub struct Session {
    /// The operator's name; their role comes from the configuration.
    pub operator: String,
    /// The token every action of the session must carry.
    pub csrf: String,
}

/// Stores a session (and forgets the expired ones, so the table holds only live sessions).
pub async fn open(
    conn: &mut PgConn,
    id_sha256: &[u8],
    operator: &str,
    csrf: &str,
    expires_at: DateTime<Utc>,
) -> Result<(), StoreError> {
    diesel::delete(s::console_sessions.filter(s::expires_at.lt(diesel::dsl::now)))
        .execute(conn)
        .await?;
    diesel::insert_into(s::console_sessions)
        .values((
            s::id_sha256.eq(id_sha256),
            s::operator.eq(operator),
            s::csrf.eq(csrf),
            s::expires_at.eq(expires_at),
        ))
        .execute(conn)
        .await?;
    Ok(())
}

/// The live session with this id digest, if any.
pub async fn find(conn: &mut PgConn, id_sha256: &[u8]) -> Result<Option<Session>, StoreError> {
    Ok(s::console_sessions
        .filter(s::id_sha256.eq(id_sha256))
        .filter(s::expires_at.gt(diesel::dsl::now))
        .select((s::operator, s::csrf))
        .first(conn)
        .await
        .optional()?)
}

/// Ends a session.
pub async fn close(conn: &mut PgConn, id_sha256: &[u8]) -> Result<(), StoreError> {
    diesel::delete(s::console_sessions.filter(s::id_sha256.eq(id_sha256)))
        .execute(conn)
        .await?;
    Ok(())
}
