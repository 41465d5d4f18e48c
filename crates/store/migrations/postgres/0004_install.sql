-- This installation's identity; see migrations/sqlite/0004. 16 hex digits,
-- as SQLite's `hex(randomblob(8))` makes.
CREATE TABLE install (
    id TEXT NOT NULL
);
INSERT INTO install (id) VALUES (lpad(to_hex((random() * 4294967295)::bigint), 8, '0')
                               || lpad(to_hex((random() * 4294967295)::bigint), 8, '0'));
