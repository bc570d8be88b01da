-- When each periodic maintenance task (the stalled-job sweep, pruning) last succeeded. The
-- queue cannot tell: succeeded jobs are deleted. One row per task, read at every scrape.
CREATE TABLE mailroom_maintenance_runs (
    task text PRIMARY KEY,
    succeeded_at timestamptz NOT NULL
);
