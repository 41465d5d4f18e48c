-- Build contexts uploaded by orgs (POST /v1/builds): a tar archive, kept
-- whole so that any host can build it. Content-addressed per org: the same
-- bytes uploaded twice by one org are one row (and one image); another org
-- uploading the same bytes gets a row of its own, so nothing tells an org
-- what another has uploaded.
CREATE TABLE builds (
    id         TEXT    PRIMARY KEY,
    org_id     TEXT    NOT NULL REFERENCES orgs (id),
    digest     TEXT    NOT NULL, -- sha256:<hex> of the archive
    size       INTEGER NOT NULL,
    bases      TEXT    NOT NULL, -- JSON array: the images its FROMs name
    context    BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (org_id, digest)
);

