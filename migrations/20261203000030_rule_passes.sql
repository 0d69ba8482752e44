-- When each reminder rule last looked at its table at a walk's end, and in which form.
-- A walk's end then looks only at records written since `covers_from` and at those whose
-- `older_than` column crossed its threshold since; a change of the rule's conditions
-- (`fingerprint`), or a full pass (`full_at`) older than a day, makes it look at the whole
-- table again. `covers_from` is the start of the oldest transaction open at the pass.
CREATE TABLE IF NOT EXISTS idem_rule_passes (
    source_system text NOT NULL,
    stream        text NOT NULL,
    rule          text NOT NULL,
    fingerprint   text NOT NULL,
    covers_from   timestamptz NOT NULL,
    full_at       timestamptz NOT NULL,
    PRIMARY KEY (source_system, stream, rule)
);
