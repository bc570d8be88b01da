-- The metrics collector counts recipients that are not final (and dead letters) on every
-- scrape; this index keeps that proportional to the open work, not to all mail ever sent.
CREATE INDEX recipients_open_status ON recipients (status)
    WHERE status IN ('queued', 'sending', 'retrying', 'dead');
