-- Partitions: a stream walked once per value of a static list (accounts, regions) keeps
-- one checkpoint, owner row, run history and failure set per partition. '' is the
-- partition of every unpartitioned stream, so their rows and keys mean what they did.
ALTER TABLE idem_checkpoints ADD COLUMN partition text NOT NULL DEFAULT '';
ALTER TABLE idem_checkpoints DROP CONSTRAINT idem_checkpoints_pkey;
ALTER TABLE idem_checkpoints ADD PRIMARY KEY (source_system, stream, partition, scope);

ALTER TABLE idem_stream_owners ADD COLUMN partition text NOT NULL DEFAULT '';
ALTER TABLE idem_stream_owners DROP CONSTRAINT idem_stream_owners_pkey;
ALTER TABLE idem_stream_owners ADD PRIMARY KEY (source_system, stream, partition);

ALTER TABLE idem_failures ADD COLUMN partition text NOT NULL DEFAULT '';
ALTER TABLE idem_failures DROP CONSTRAINT idem_failures_pkey;
ALTER TABLE idem_failures ADD PRIMARY KEY (source_system, stream, partition, record_key);

-- Runs are keyed by their id; the partition joins the index the status queries use.
ALTER TABLE idem_runs ADD COLUMN partition text NOT NULL DEFAULT '';
DROP INDEX idem_runs_by_stream;
CREATE INDEX idem_runs_by_stream ON idem_runs (source_system, stream, partition, started_at DESC);
