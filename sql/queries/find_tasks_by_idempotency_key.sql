-- Finds the tasks holding the given idempotency keys (used after an insert skipped them).
-- $1 text[] idempotency keys. Returns (id, idempotency_key).
select t.id, t.idempotency_key from tasks t where t.idempotency_key = any($1::text[])
