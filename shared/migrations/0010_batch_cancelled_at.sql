-- When a batch was cancelled: a send in flight at that moment that then fails transiently is
-- cancelled too, instead of trying again on its own.
ALTER TABLE batches ADD COLUMN cancelled_at timestamptz;
