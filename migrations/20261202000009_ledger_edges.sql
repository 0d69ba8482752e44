-- Reminders at the edges (issue 9): what the dispatcher needs to re-check a row's reason
-- right before sending, and which transport handled each row.
--
-- Rows made before this migration keep their keys (un-namespaced): a key is what a
-- provider saw as the Idempotency-Key and what the Message-ID derives from, so rewriting
-- it could make a retry look new. Rules never insert a second row for a record and rule
-- that already has one, whatever the key template renders now, so upgrading re-sends
-- nothing. Those old rows have no frozen condition and are sent without the re-check.

-- The destination table of the record the row is about (the re-check reads it).
ALTER TABLE idem_ledger ADD COLUMN record_table text;
-- The rule's conditions as they were when the row was made (data, compiled to SQL with
-- bound parameters by the dispatcher; never SQL text).
ALTER TABLE idem_ledger ADD COLUMN condition jsonb;
-- The transport that attempted the row last ('log', 'smtp', 'http'); NULL for rows
-- attempted before this migration.
ALTER TABLE idem_ledger ADD COLUMN transport text;
