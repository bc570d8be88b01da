-- Operator accounts. A user has a role (viewer < sender < admin) and an argon2id password
-- hash; disabling a user keeps the row (the audit log names them) and ends their sessions and
-- tokens. Names are unique regardless of case.
CREATE TABLE users (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name text NOT NULL
        CONSTRAINT users_name_syntax CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$'),
    password_hash text NOT NULL,
    role text NOT NULL CONSTRAINT users_role_known CHECK (role IN ('viewer', 'sender', 'admin')),
    disabled_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE UNIQUE INDEX users_name_key ON users (lower(name));

-- A session belongs to a user, or (NULL) to whoever logged in with MAILROOM_API_TOKEN.
-- Deleting a user's rows ends their sessions at once (a disable, a new password).
ALTER TABLE web_sessions ADD COLUMN user_id bigint REFERENCES users (id) ON DELETE CASCADE;

CREATE INDEX web_sessions_user_id ON web_sessions (user_id) WHERE user_id IS NOT NULL;

-- Personal API tokens: a Bearer that acts as its user, with the user's role. Only the token's
-- SHA-256 is kept; the token itself is shown once, when it is made.
CREATE TABLE api_tokens (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name text NOT NULL CONSTRAINT api_tokens_name_length CHECK (length(name) BETWEEN 1 AND 100),
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE INDEX api_tokens_user_id ON api_tokens (user_id);

-- Who did what, and when: every change an operator makes (batches, dead letters,
-- suppressions, users, tokens), written in the same transaction as the change itself.
-- actor is the user's name, 'api-token' for MAILROOM_API_TOKEN, 'cli' for the command line.
CREATE TABLE audit_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    actor text NOT NULL,
    action text NOT NULL,
    batch_id uuid,
    recipient_ids bigint[],
    count integer,
    subject text,
    detail jsonb NOT NULL DEFAULT '{}'
);
