-- Replicas that share the work (issue 17): one schedule for every `idem serve` process,
-- a heartbeat row per process, and which process recorded each run.

-- Each scheduled stream's next due time. A replica claims a due stream by moving its due
-- time forward in the same statement (FOR UPDATE SKIP LOCKED), so each due time is
-- claimed by exactly one replica, and a dead replica's streams are simply claimed by
-- another one when they come due.
CREATE TABLE idem_schedule (
    source_system text NOT NULL,
    stream        text NOT NULL,
    -- `every` of the schedule that names the stream, in milliseconds.
    every_ms      bigint NOT NULL CHECK (every_ms > 0),
    next_due_at   timestamptz NOT NULL DEFAULT now(),
    claimed_by    text,
    claimed_at    timestamptz,
    PRIMARY KEY (source_system, stream)
);
CREATE INDEX idem_schedule_due ON idem_schedule (next_due_at);

-- One row per live `idem serve` process, its heartbeat renewed on a timer. A row whose
-- heartbeat is older than the timeout belongs to a dead process: its `running` runs are
-- marked `abandoned`, and the live rows are how replicas share a connector's rate limit.
CREATE TABLE idem_instances (
    id            text PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    -- Heartbeat period of that process, in milliseconds (others judge it by its own).
    heartbeat_ms  bigint NOT NULL
);

-- The process that recorded the run (`idem serve`'s instance id, or host:pid of a CLI run).
ALTER TABLE idem_runs ADD COLUMN instance text;
CREATE INDEX idem_runs_running ON idem_runs (instance) WHERE status = 'running';
-- A run stopped by a shutdown is `interrupted`: a deploy is not a failure.
ALTER TABLE idem_runs DROP CONSTRAINT idem_runs_status_check;
ALTER TABLE idem_runs ADD CONSTRAINT idem_runs_status_check
    CHECK (status IN ('running', 'succeeded', 'partial', 'failed', 'abandoned', 'interrupted'));
