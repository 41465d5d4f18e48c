-- This installation's identity, made once with the database. Every engine
-- resource Berth creates is labelled with it, so that two installations
-- sharing an engine never take each other's resources for orphans.
CREATE TABLE install (
    id TEXT NOT NULL
);
INSERT INTO install (id) VALUES (lower(hex(randomblob(8))));
