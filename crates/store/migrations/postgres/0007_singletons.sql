-- Leases on work that runs in one process at a time; see
-- migrations/sqlite/0007.
CREATE TABLE singletons (
    name    TEXT    PRIMARY KEY,
    owner   TEXT    NOT NULL,
    until   BIGINT  NOT NULL
);
