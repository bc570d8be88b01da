-- Idempotency-Key on POST /api/batches: the same key with the same body returns the batch it
-- created; with a different body it is refused.
CREATE TABLE api_idempotency_keys (
    key text PRIMARY KEY,
    request_hash text NOT NULL,
    batch_id uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);
