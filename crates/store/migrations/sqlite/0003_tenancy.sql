-- API tokens of orgs. Only a SHA-256 of each token is kept: a token is 256
-- random bits, so a fast unsalted hash cannot be brute-forced, and it lets a
-- request find its token with one indexed lookup. A revoked token keeps its
-- row (and hash) so that it is recognised, and refused, for good.
CREATE TABLE tokens (
    id         TEXT    PRIMARY KEY,
    org_id     TEXT    NOT NULL REFERENCES orgs (id),
    hash       TEXT    NOT NULL UNIQUE, -- hex SHA-256 of the token
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX tokens_org ON tokens (org_id, created_at);

-- The admin token generated at first start when none is configured (its
-- hash only; the token itself is printed once). At most one row.
CREATE TABLE admin_token (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    hash       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);

-- The org's event stream (WebSocket /v1/events) reads an org's events after
-- a cursor, in log order.
CREATE INDEX events_org ON events (org_id, seq);
