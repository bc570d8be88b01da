-- A batch is sent by one job per chunk of its recipients. A recipient that fails transiently
-- (or waits for a sending-rate window) leaves its chunk for a job of its own; this marks it,
-- so a chunk that runs again (its worker died) leaves that recipient to its own job.
ALTER TABLE recipients ADD COLUMN own_job boolean NOT NULL DEFAULT false;
