-- Uploaded build contexts; see migrations/sqlite/0005.
CREATE TABLE builds (
    id         TEXT    PRIMARY KEY,
    org_id     TEXT    NOT NULL REFERENCES orgs (id),
    digest     TEXT    NOT NULL,
    size       BIGINT  NOT NULL,
    bases      TEXT    NOT NULL,
    context    BYTEA   NOT NULL,
    created_at BIGINT  NOT NULL,
    UNIQUE (org_id, digest)
);
