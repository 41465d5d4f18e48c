-- The paged instance list's index; see migrations/sqlite/0006.
CREATE INDEX instances_org_created ON instances (org_id, created_at, id);
