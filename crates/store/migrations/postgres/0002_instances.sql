-- Orgs, instances and host claims; see migrations/sqlite/0002.
CREATE TABLE orgs (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    created_at BIGINT  NOT NULL
);

CREATE TABLE instances (
    id          TEXT    PRIMARY KEY,
    org_id      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    spec        TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    version     BIGINT  NOT NULL,
    generation  BIGINT  NOT NULL,
    host        TEXT,
    network     TEXT,
    image_tag   TEXT,
    container   TEXT,
    ip          TEXT,
    conditions  TEXT    NOT NULL,
    error       TEXT,
    exit_code   BIGINT,
    oom_killed  BIGINT  NOT NULL DEFAULT 0,
    restarts    BIGINT  NOT NULL DEFAULT 0,
    flow_id     TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL
);
CREATE UNIQUE INDEX instances_org_name ON instances (org_id, name) WHERE status != 'deleted';
CREATE INDEX instances_host ON instances (host, org_id);

CREATE TABLE host_claims (
    host       TEXT    NOT NULL,
    org_id     TEXT    NOT NULL,
    claimed_at BIGINT  NOT NULL,
    PRIMARY KEY (host, org_id)
);
