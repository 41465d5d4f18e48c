-- The event log. Every envelope ever published, append-only; it is also the
-- outbox: a handler's state changes and the events it emits land here in one
-- transaction. `seq` is local commit order (stream cursors); `id` is the ULID
-- and dedupe key.
CREATE TABLE events (
    seq          INTEGER PRIMARY KEY,
    id           TEXT    NOT NULL UNIQUE,
    type         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    org_id       TEXT,
    subject      TEXT,
    flow_id      TEXT    NOT NULL,
    causation_id TEXT,
    created_at   INTEGER NOT NULL, -- microseconds since the Unix epoch
    not_before   INTEGER,
    payload      TEXT    NOT NULL
);
CREATE INDEX events_flow ON events (flow_id);

-- One row per (event, subscribed worker) still to be handled: the work queue.
-- `attempt` counts attempts *started* and is committed before the handler
-- runs, so a crash never resets it. A row is deleted when handled or
-- dead-lettered, which keeps this table as small as the backlog. Keyed by
-- (event, worker) so that the dispatcher can address a row it inserted
-- without reading an id back.
CREATE TABLE deliveries (
    event_id    TEXT    NOT NULL,
    worker      TEXT    NOT NULL,
    round       INTEGER NOT NULL DEFAULT 0, -- bumped by each re-drive
    attempt     INTEGER NOT NULL DEFAULT 0,
    not_before  INTEGER NOT NULL,
    lease_owner TEXT,
    leased_at   INTEGER,
    lease_until INTEGER,
    PRIMARY KEY (event_id, worker)
) WITHOUT ROWID;
CREATE INDEX deliveries_due ON deliveries (worker, not_before) WHERE lease_owner IS NULL;

-- Per-worker inbox: the ids each worker has processed. Written in the
-- handler's transaction, so a duplicate delivery is recognised and skipped.
CREATE TABLE inbox (
    worker       TEXT    NOT NULL,
    event_id     TEXT    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (worker, event_id)
) WITHOUT ROWID;

-- Every attempt of every delivery: the trace of a flow and the evidence of a
-- dead letter. Never deleted by re-drive.
CREATE TABLE attempts (
    id            INTEGER PRIMARY KEY,
    event_id      TEXT    NOT NULL,
    worker        TEXT    NOT NULL,
    round         INTEGER NOT NULL,
    attempt       INTEGER NOT NULL,
    started_at    INTEGER NOT NULL,
    duration_us   INTEGER,          -- NULL when the process died mid-attempt
    outcome       TEXT    NOT NULL, -- ok | duplicate | retry | timeout | fatal | panic | malformed | abandoned
    error         TEXT,             -- JSON ErrorInfo
    next_delay_us INTEGER           -- back-off chosen after this attempt
);
CREATE INDEX attempts_event ON attempts (event_id);

-- Deliveries that will not be retried any more, with why.
CREATE TABLE dead_letters (
    id          TEXT    PRIMARY KEY,
    event_id    TEXT    NOT NULL,
    worker      TEXT    NOT NULL,
    round       INTEGER NOT NULL,
    attempts    INTEGER NOT NULL,
    reason      TEXT    NOT NULL,   -- fatal | panic | malformed | exhausted
    error       TEXT    NOT NULL,   -- JSON ErrorInfo
    org_id      TEXT,
    flow_id     TEXT    NOT NULL,
    dead_at     INTEGER NOT NULL,
    redriven_at INTEGER
);
CREATE INDEX dead_letters_open ON dead_letters (dead_at) WHERE redriven_at IS NULL;
