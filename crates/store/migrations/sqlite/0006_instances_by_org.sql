-- The paged instance list (GET /v1/instances?limit=N&after=<cursor>) reads
-- an org's instances in (created_at, id) order from a cursor: with this
-- index a page costs its own rows, not a sort of the org's whole list.
-- Both columns are set once, at insert, so it costs no update.
CREATE INDEX instances_org_created ON instances (org_id, created_at, id);
