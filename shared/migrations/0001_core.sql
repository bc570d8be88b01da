-- Mailroom's own tables. procrastinate's schema is applied before this file.

CREATE TABLE batches (
    id uuid PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL,
    request_id text,
    drafter text NOT NULL DEFAULT 'template' CHECK (drafter IN ('template', 'llm')),
    subject_template text NOT NULL,
    body_template text NOT NULL,
    total integer NOT NULL CHECK (total > 0)
);

CREATE INDEX batches_created_at ON batches (created_at DESC);

CREATE TABLE recipients (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    email text NOT NULL,
    fields jsonb NOT NULL DEFAULT '{}',
    status text NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'sending', 'sent', 'retrying', 'dead', 'cancelled')),
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    subject text,
    body text,
    message_id text,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);

-- Counts per batch and status come from this index alone (index-only scans).
CREATE INDEX recipients_batch_status ON recipients (batch_id, status);
-- The same address twice in one batch is refused at validation; this is the backstop.
CREATE UNIQUE INDEX recipients_batch_email ON recipients (batch_id, lower(email));

-- One row per side effect that must happen at most once. The worker inserts the key in the
-- transaction that records the effect, and holds it while performing the effect.
CREATE TABLE processed_jobs (
    idempotency_key text PRIMARY KEY,
    result jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
