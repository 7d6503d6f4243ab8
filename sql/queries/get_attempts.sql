-- Reads the attempt history of one step, or of every step of one task, oldest first: the ended attempts' rows and the running ones, which live on their step's lease.
-- $1 uuid step id or task id. Returns one row per attempt; a running one has no finished_at, duration_ms or outcome.
select x.*
from (
  select a.attempt_id, a.step_id, a.task_id, s.name as step_name, a.attempt, a.broker_id, a.pool_id, a.started_at,
         a.finished_at, a.duration_ms, a.outcome, a.error, a.output_bytes, a.cost, a.tokens::float8 as tokens,
         a.artifacts, s.position
  from steps s
  -- by step id: step_attempts is indexed by step only (see migration 0007)
  join step_attempts a on a.step_id = s.id
  where s.id = $1::uuid or s.task_id = $1::uuid
  union all
  select s.lease_attempt_id, s.id, s.task_id, s.name, s.attempts, s.lease_broker_id, s.lease_pool_id, s.lease_started_at,
         null::timestamptz, null::float8, null::text, null::jsonb, null::int, null::float8, null::float8, null::jsonb,
         s.position
  from steps s
  where (s.id = $1::uuid or s.task_id = $1::uuid) and s.lease_attempt_id is not null
) x
order by x.started_at, x.position, x.attempt
