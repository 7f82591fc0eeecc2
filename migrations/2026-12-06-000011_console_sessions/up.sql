-- The console's browser sessions, shared by every console replica: a load balancer needs no
-- sticky sessions, and a console restart signs nobody out. The cookie's value is never stored,
-- only its SHA-256, so a reader of this table cannot take over a session. The operator's role is
-- not stored either: it is read from the console's configuration on every request, so removing
-- an operator from the configuration ends their sessions.
CREATE TABLE console_sessions (
    id_sha256 BYTEA PRIMARY KEY,
    operator TEXT NOT NULL,
    csrf TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);
