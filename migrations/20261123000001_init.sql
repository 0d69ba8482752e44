-- idem's own tables: runs, checkpoints, record failures, the notification ledger.

CREATE TABLE idem_runs (
    id            uuid PRIMARY KEY,
    source_system text NOT NULL,
    stream        text NOT NULL,
    mode          text NOT NULL CHECK (mode IN ('run', 'replay')),
    window_from   timestamptz,
    window_to     timestamptz,
    status        text NOT NULL CHECK (status IN ('running', 'succeeded', 'partial', 'failed', 'abandoned')),
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    pages         bigint NOT NULL DEFAULT 0,
    fetched       bigint NOT NULL DEFAULT 0,
    inserted      bigint NOT NULL DEFAULT 0,
    updated       bigint NOT NULL DEFAULT 0,
    unchanged     bigint NOT NULL DEFAULT 0,
    failed        bigint NOT NULL DEFAULT 0,
    deleted       bigint NOT NULL DEFAULT 0,
    error         text
);
CREATE INDEX idem_runs_by_stream ON idem_runs (source_system, stream, started_at DESC);

-- scope 'main' is the stream's regular checkpoint; a replay keeps its own resume point
-- under scope 'replay:<from>..<to>'.
CREATE TABLE idem_checkpoints (
    source_system   text NOT NULL,
    stream          text NOT NULL,
    scope           text NOT NULL DEFAULT 'main',
    cursor          text,
    high_water_mark timestamptz,
    resume          jsonb,
    last_run_id     uuid,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_system, stream, scope)
);

CREATE TABLE idem_failures (
    source_system   text NOT NULL,
    stream          text NOT NULL,
    record_key      text NOT NULL,
    source_id       text,
    payload         jsonb NOT NULL,
    error           text NOT NULL,
    attempts        integer NOT NULL DEFAULT 1,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    last_run_id     uuid,
    PRIMARY KEY (source_system, stream, record_key)
);

-- The transactional outbox. Rows are never deleted and never rewritten by a rule: the
-- key is the side effect's business identity and the payload is frozen at insert.
CREATE TABLE idem_ledger (
    key                 text PRIMARY KEY,
    channel             text NOT NULL,
    recipient           text NOT NULL,
    subject             text NOT NULL,
    body                text NOT NULL,
    message_id          text NOT NULL,
    source_system       text NOT NULL,
    stream              text NOT NULL,
    source_id           text NOT NULL,
    rule                text NOT NULL,
    status              text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'needs_review', 'cancelled')),
    attempts            integer NOT NULL DEFAULT 0,
    next_attempt_at     timestamptz NOT NULL DEFAULT now(),
    lease_owner         text,
    lease_expires_at    timestamptz,
    -- Set just before the network call: a dead dispatcher's claimed rows without it were
    -- never attempted and are safe to send; with it, the provider may have the message.
    in_flight_since     timestamptz,
    last_outcome        text,
    last_error          text,
    provider_message_id text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    first_attempt_at    timestamptz,
    sent_at             timestamptz
);
CREATE INDEX idem_ledger_due ON idem_ledger (next_attempt_at) WHERE status = 'pending';
CREATE INDEX idem_ledger_leased ON idem_ledger (lease_expires_at) WHERE status = 'sending';
-- source_id first: the rules' NOT EXISTS probe is always by one record.
CREATE INDEX idem_ledger_by_record ON idem_ledger (source_id, rule, stream, source_system);
