-- How a batch's messages are written: the body as plain text (as before) or Markdown, and a
-- sender display name and Reply-To address of its own (NULL: the worker's settings).
ALTER TABLE batches
    ADD COLUMN body_format text NOT NULL DEFAULT 'text'
        CONSTRAINT batches_body_format_known CHECK (body_format IN ('text', 'markdown')),
    ADD COLUMN from_name text,
    ADD COLUMN reply_to text;
