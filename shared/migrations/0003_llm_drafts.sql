-- LLM drafting: the batch's context, review-before-sending, and tokens paid per recipient.
ALTER TABLE batches
    ADD COLUMN context text,
    ADD COLUMN review boolean NOT NULL DEFAULT false,
    ADD COLUMN approved_at timestamptz;

ALTER TABLE recipients
    ADD COLUMN prompt_tokens integer NOT NULL DEFAULT 0,
    ADD COLUMN completion_tokens integer NOT NULL DEFAULT 0,
    DROP CONSTRAINT recipients_status_check,
    ADD CONSTRAINT recipients_status_check CHECK (
        status IN ('queued', 'sending', 'drafted', 'sent', 'retrying', 'dead', 'cancelled'));

-- "drafted" (waiting for an operator to approve the batch) is open work too.
DROP INDEX recipients_open_status;
CREATE INDEX recipients_open_status ON recipients (status)
    WHERE status IN ('queued', 'sending', 'drafted', 'retrying', 'dead');
