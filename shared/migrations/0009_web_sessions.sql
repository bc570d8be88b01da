-- The web tier's browser sessions. The signed session cookie carries a random session id; a
-- row here (keyed on the id's SHA-256, so the table alone cannot be turned into cookies) is
-- what makes it valid. Logging out deletes the row: a copied cookie stops working at once
-- instead of at its expiry. Logins delete the rows that have expired.
CREATE TABLE web_sessions (
    id_hash bytea PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX web_sessions_expires_at ON web_sessions (expires_at);
