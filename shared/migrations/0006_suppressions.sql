-- Addresses Mailroom never sends to again: unsubscribed, hard-bounced, complained about, or
-- suppressed by an operator. One row per address, keyed on its lower-cased form (recipients
-- are matched the same way). A recipient found here is "suppressed": counted, never sent.
CREATE TABLE suppressions (
    id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    address_key text PRIMARY KEY,
    address text NOT NULL,
    reason text NOT NULL
        CHECK (reason IN ('unsubscribed', 'hard_bounce', 'complaint', 'manual')),
    detail text,
    created_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE recipients
    DROP CONSTRAINT recipients_status_check,
    ADD CONSTRAINT recipients_status_check CHECK (
        status IN ('queued', 'sending', 'drafted', 'sent', 'retrying', 'dead', 'cancelled',
                   'suppressed'));
