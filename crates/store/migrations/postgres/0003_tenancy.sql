-- Tokens (hashed) and the admin token's hash; see migrations/sqlite/0003.
CREATE TABLE tokens (
    id         TEXT    PRIMARY KEY,
    org_id     TEXT    NOT NULL REFERENCES orgs (id),
    hash       TEXT    NOT NULL UNIQUE,
    created_at BIGINT  NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX tokens_org ON tokens (org_id, created_at);

CREATE TABLE admin_token (
    id         BIGINT  PRIMARY KEY CHECK (id = 1),
    hash       TEXT    NOT NULL,
    created_at BIGINT  NOT NULL
);

CREATE INDEX events_org ON events (org_id, seq);
