-- Orgs (tenants).
CREATE TABLE orgs (
    id         TEXT    PRIMARY KEY,
    name       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

-- Instances. Every change goes through a guarded update (`version`), so a
-- replayed event changes nothing; `generation` counts (re)creations, and
-- names every engine resource of that generation.
CREATE TABLE instances (
    id          TEXT    PRIMARY KEY,
    org_id      TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    spec        TEXT    NOT NULL, -- JSON: image, env, cmd, ports, restart
    status      TEXT    NOT NULL,
    version     INTEGER NOT NULL,
    generation  INTEGER NOT NULL,
    host        TEXT,
    network     TEXT,
    image_tag   TEXT,
    container   TEXT,
    ip          TEXT,
    conditions  TEXT    NOT NULL, -- JSON
    error       TEXT,             -- JSON InstanceError
    exit_code   INTEGER,
    oom_killed  INTEGER NOT NULL DEFAULT 0,
    restarts    INTEGER NOT NULL DEFAULT 0,
    flow_id     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
-- A name is unique in its org among instances not deleted.
CREATE UNIQUE INDEX instances_org_name ON instances (org_id, name) WHERE status != 'deleted';
CREATE INDEX instances_host ON instances (host, org_id);

-- Which org holds which host (the pool provider's claims).
CREATE TABLE host_claims (
    host       TEXT    NOT NULL,
    org_id     TEXT    NOT NULL,
    claimed_at INTEGER NOT NULL,
    PRIMARY KEY (host, org_id)
) WITHOUT ROWID;
