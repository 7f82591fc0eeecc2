-- The key the worker signs its own marks with (see src/marks.rs) when the configuration gives
-- none: made by the first process that needs it, then shared by every worker, console and
-- command line of the deployment. One row.
CREATE TABLE signing_key (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    key BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
