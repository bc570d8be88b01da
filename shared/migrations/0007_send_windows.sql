-- Messages sent per scope and fixed time window, shared by every worker on every host: how the
-- sending-rate limits hold across processes. A worker takes a slot in each window that applies
-- (one row per scope and window start) before it sends; old windows are pruned.
CREATE TABLE send_windows (
    scope text NOT NULL,
    window_start timestamptz NOT NULL,
    sent integer NOT NULL,
    PRIMARY KEY (scope, window_start)
);
