-- Every message of a bounce mailbox the IMAP poll has read, by the mailbox it was read from and
-- its UIDVALIDITY and UID (RFC 3501: a UID names one message for as long as UIDVALIDITY stays
-- the same). A message is recorded in the same transaction as the suppressions it leads to, so
-- a message is counted once even when the poll dies before it marks the message on the server;
-- `marked` says whether that was done (flagged \Seen or moved), and the next poll finishes it.
-- The highest UID recorded is where the next poll starts: a message that is not a report is
-- recorded too, and never read again.
CREATE TABLE bounce_mailbox_messages (
    mailbox text NOT NULL,
    uidvalidity bigint NOT NULL CHECK (uidvalidity > 0),
    uid bigint NOT NULL CHECK (uid > 0),
    outcome text NOT NULL
        CHECK (outcome IN ('report', 'verp_bounce', 'not_report', 'unreadable', 'too_large')),
    marked boolean NOT NULL,
    read_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mailbox, uidvalidity, uid)
);
CREATE INDEX bounce_mailbox_messages_unmarked ON bounce_mailbox_messages (mailbox, uidvalidity)
    WHERE NOT marked;
