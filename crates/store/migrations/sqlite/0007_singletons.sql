-- Leases on work that must run in exactly one process at a time (the
-- reconciler, each host's engine-event listener) when several share the
-- database: the holder renews `until` well before it passes; another
-- process takes the lease once it has. Times in microseconds.
CREATE TABLE singletons (
    name    TEXT    PRIMARY KEY,
    owner   TEXT    NOT NULL,
    until   INTEGER NOT NULL
);
