-- Children owed by parent records: a parent page's transaction inserts one row per parent
-- whose children must be walked (inserted or changed in that run, or touched by a replay),
-- in the same transaction as the parent rows. The row is deleted in the transaction that
-- commits the last page of that parent's children, so a crash anywhere in between leaves
-- it here and the next drain walks that parent's children again.
CREATE TABLE IF NOT EXISTS idem_child_queue (
    source_system text NOT NULL,
    -- The child stream.
    stream text NOT NULL,
    parent_source_id text NOT NULL,
    -- The parent record as stored, for the child's {parent/...} templates.
    parent jsonb NOT NULL,
    -- The parent run that last owed it.
    run_id uuid NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_system, stream, parent_source_id)
);
