"""The SQL Mailroom runs against procrastinate's tables and functions, all in one place.

procrastinate's public API (``App.job_manager``, its connector) runs each query on a connection
of its own. Mailroom uses it wherever that loses nothing (the stalled-job sweep retries jobs
through ``JobManager``). The fragments here exist because it would lose something:

- deferring jobs in the same statement, and so the same transaction, as the recipients they
  send (an enqueue is all or nothing; ``JobManager.batch_defer_jobs_async`` commits on its own);
- cancelling a batch's waiting jobs in the transaction that cancels its recipients
  (``JobManager.cancel_job_by_id_async`` takes one id and its own transaction);
- pruning old failed jobs in bounded rounds (``JobManager.delete_old_jobs`` has no limit, joins
  every event of every job and keeps jobs without events);
- reading heartbeats, queue depth and live workers, which procrastinate has no reader for.

Each was checked against procrastinate :data:`CHECKED_AGAINST` (``pyproject.toml`` allows only
that minor version; ``tests/test_procrastinate_sql.py`` checks that every table, type and
function named here exists in a migrated database). Re-check them, against procrastinate's
``sql/schema.sql`` and the migration files it adds, before allowing a newer minor.
"""

from __future__ import annotations

# The procrastinate minor version these queries were read against.
CHECKED_AGAINST = "3.10"

JOBS_TABLE = "procrastinate_jobs"
# The columns of procrastinate_jobs its fetch plans depend on (ANALYZE samples only these).
JOBS_PLANNED_COLUMNS = ("id", "status", "queue_name", "priority", "lock", "scheduled_at")

# Defers one send_chunk job per chunk of at most %(chunk_size)s rows of the CTE named ``rows``
# (which must expose ``id`` and ``batch_id``), a chunk never spanning two batches, in the
# caller's statement and so in the caller's transaction. procrastinate's own SQL function does
# the insert (checked against procrastinate 3.10); we only skip its Python-side job objects.
# Evaluates to the number of jobs deferred (NULL for none).
DEFER_CHUNKS_OF_ROWS = """
cardinality(procrastinate_defer_jobs_v1(ARRAY(
    SELECT ROW(%(queue)s, %(chunk_task)s, 0, NULL, NULL,
               jsonb_build_object('batch_id', batch_id, 'recipient_ids', jsonb_agg(id ORDER BY id)),
               %(scheduled_at)s::timestamptz
           )::procrastinate_job_to_defer_v1
      FROM (SELECT id, batch_id,
                   (row_number() OVER (PARTITION BY batch_id ORDER BY id) - 1) / %(chunk_size)s
                       AS chunk
              FROM rows) c
     GROUP BY batch_id, chunk
     ORDER BY min(id)
)))
"""

# A job of its own for each row of the CTE named ``failed`` (exposing ``id``) when
# %(retry_at)s is set: the recipient tries again alone, at that time, behind fresh emails.
# Same function as above (checked against procrastinate 3.10).
DEFER_OWN_JOB = """
cardinality(procrastinate_defer_jobs_v1(ARRAY(
    SELECT ROW(%(queue)s, %(email_task)s, %(priority)s, NULL, NULL,
               jsonb_build_object('recipient_id', id), %(retry_at)s::timestamptz
           )::procrastinate_job_to_defer_v1
      FROM failed WHERE %(retry_at)s::timestamptz IS NOT NULL AND status <> 'cancelled'
)))
"""

# The body of a CTE that cancels the waiting jobs of the batch %(batch_id)s in queue
# %(queue)s: each recipient's own job for the ids of the CTE named ``cancelled``, and each
# chunk job (task %(chunk_task)s) none of whose recipients is still open. RETURNING j.id.
# What procrastinate_cancel_job_v1 does to a 'todo' job (status 'cancelled'; its triggers
# write the event), for many jobs at once (checked against procrastinate 3.10).
CANCEL_WAITING_JOBS = (
    "  UPDATE procrastinate_jobs j SET status = 'cancelled'"
    "   WHERE j.status = 'todo' AND j.queue_name = %(queue)s AND ("
    "     (j.args ->> 'recipient_id')::bigint IN (SELECT id FROM cancelled)"
    "     OR (j.task_name = %(chunk_task)s"
    "       AND j.args ->> 'batch_id' = %(batch_id)s::text"
    "       AND NOT EXISTS (SELECT 1 FROM recipients r"
    "         WHERE r.id IN (SELECT jsonb_array_elements_text("
    "           j.args -> 'recipient_ids')::bigint)"
    "         AND r.status IN ('queued', 'sending') AND NOT r.own_job"
    "         AND r.id NOT IN (SELECT id FROM cancelled))))"
    "  RETURNING j.id"
)

# Deletes up to %s (limit) jobs of queue %s in a final failed state with no event in the last
# %s days (params: queue, retention_days, limit). Checked against procrastinate 3.10.
PRUNE_FINISHED_JOBS = (
    "DELETE FROM procrastinate_jobs WHERE id IN ("
    " SELECT j.id FROM procrastinate_jobs j"
    " WHERE j.queue_name = %s AND j.status IN ('failed', 'cancelled', 'aborted')"
    " AND NOT EXISTS (SELECT 1 FROM procrastinate_events e WHERE e.job_id = j.id"
    "   AND e.at > now() - make_interval(days => %s))"
    " LIMIT %s)"
)

# Seconds since worker %s last sent its heartbeat (no row: not registered). procrastinate 3.10.
WORKER_HEARTBEAT_AGE = (
    "SELECT extract(epoch FROM now() - last_heartbeat)::float8"
    " FROM procrastinate_workers WHERE id = %s"
)

# One pass over todo/doing rows (the partial indexes cover them). The oldest ready job is the
# older of: the fresh job with the lowest id (ids only grow; its "deferred" event has the
# time), and the retry that has been due the longest. Checked against procrastinate 3.10.
QUEUE_DEPTH = """
WITH groups AS (
    SELECT queue_name,
           CASE WHEN status = 'doing' THEN 'doing'
                WHEN scheduled_at > now() THEN 'todo_scheduled'
                ELSE 'todo_ready' END AS state,
           count(*) AS n,
           min(id) FILTER (WHERE status = 'todo' AND scheduled_at IS NULL) AS oldest_fresh_id,
           min(scheduled_at) FILTER (WHERE status = 'todo' AND scheduled_at <= now()) AS oldest_due
      FROM procrastinate_jobs
     WHERE status IN ('todo', 'doing')
     GROUP BY 1, 2
)
SELECT queue_name, state, n,
       extract(epoch FROM now() - least(
           (SELECT min(at) FROM procrastinate_events
             WHERE job_id = oldest_fresh_id AND type = 'deferred'),
           oldest_due))::float8 AS oldest_ready_s
  FROM groups
"""

# One row per registered worker: its id and the seconds since its heartbeat (procrastinate
# deletes the rows of workers long stalled). Checked against procrastinate 3.10.
WORKER_HEARTBEATS = (
    "SELECT id, extract(epoch FROM now() - last_heartbeat)::float8 FROM procrastinate_workers"
)

# Running jobs no live worker holds, by queue: what the stalled-job sweep will requeue
# (procrastinate's own definition: no worker, or a worker whose heartbeat is older than %s
# seconds). Checked against procrastinate 3.10.
ORPHANED_JOBS = """
SELECT queue_name, count(*) FROM procrastinate_jobs job
 WHERE status = 'doing'
   AND NOT EXISTS (SELECT 1 FROM procrastinate_workers w
                    WHERE w.id = job.worker_id
                      AND w.last_heartbeat > now() - make_interval(secs => %s))
 GROUP BY 1
"""
