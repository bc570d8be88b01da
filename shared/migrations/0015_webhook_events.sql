-- Provider webhook deliveries already acted on (an SNS MessageId, a Postmark bounce ID, a
-- SendGrid sg_event_id), so a replayed or retried delivery is recognised and changes nothing.
-- Written in the same transaction as the suppressions the delivery makes; rows older than
-- MAILROOM_RETENTION_DAYS are pruned by the worker's hourly prune task.
CREATE TABLE webhook_events (
    provider text NOT NULL CHECK (provider IN ('ses', 'postmark', 'sendgrid')),
    event_id text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 200),
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);

CREATE INDEX webhook_events_received_at ON webhook_events (received_at);
