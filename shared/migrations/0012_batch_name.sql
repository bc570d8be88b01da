-- A batch has a name, so batches can be told apart in the list and searched. Batches from
-- before get one from their subject template, or the start of their LLM context (the web tier
-- makes new ones the same way: shared/batch_names.py), on one line and at most 60 characters.
ALTER TABLE batches ADD COLUMN name text;
UPDATE batches SET name = coalesce(
    nullif(left(btrim(regexp_replace(coalesce(nullif(btrim(subject_template), ''), context, ''),
                                     '[\s\x01-\x1f\x7f-\x9f\u2028\u2029]+', ' ', 'g')), 60), ''),
    'Untitled batch');
-- The web tier checks a name; the database refuses a bad one again: one line of at most 100
-- characters, no control characters.
ALTER TABLE batches
    ALTER COLUMN name SET NOT NULL,
    ADD CONSTRAINT batches_name_is_text CHECK (
        char_length(name) BETWEEN 1 AND 100 AND name !~ '[\x01-\x1f\x7f-\x9f\u2028\u2029]');

-- The batch list pages newest first on (created_at, id): one index serves the order and the
-- keyset condition of every page, so a page reads its rows and no more.
CREATE INDEX batches_newest ON batches (created_at DESC, id DESC);
DROP INDEX batches_created_at;
