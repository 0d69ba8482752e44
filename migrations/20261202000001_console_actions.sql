-- Every action taken in the console (`idem serve`): who, when, what, on which target,
-- the operator's note, and how it ended. Ledger resolutions read their note from here.
CREATE TABLE idem_console_actions (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    operator   text NOT NULL,
    action     text NOT NULL,
    target     text NOT NULL,
    note       text,
    outcome    text NOT NULL
);
CREATE INDEX idem_console_actions_by_target ON idem_console_actions (target, at DESC);
