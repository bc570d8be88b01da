-- A batch may be scheduled: its jobs wait (procrastinate's scheduled_at) until send_at.
ALTER TABLE batches ADD COLUMN send_at timestamptz;
