-- Who owns each stream: the advisory lock says who may start, this row says who may
-- commit. A run claims the row when it takes the lock and checks it (FOR SHARE) inside
-- every page transaction, so a run whose lock connection died commits nothing once
-- another run or `idem checkpoint` has claimed the stream.
CREATE TABLE idem_stream_owners (
    source_system text NOT NULL,
    stream        text NOT NULL,
    owner         uuid NOT NULL,
    claimed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_system, stream)
);
