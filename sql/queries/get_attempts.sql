-- Reads the attempt history of one step, or of every step of one task, oldest first.
-- $1 uuid step id or task id. Returns one row per attempt.
select a.attempt_id, a.step_id, a.task_id, s.name as step_name, a.attempt, a.broker_id, a.pool_id, a.started_at,
       a.finished_at, a.duration_ms, a.outcome, a.error, a.output_bytes, a.cost, a.tokens::float8 as tokens, a.artifacts
from steps s
-- by step id: step_attempts is indexed by step only (see migration 0007)
join step_attempts a on a.step_id = s.id
where s.id = $1::uuid or s.task_id = $1::uuid
order by a.started_at, s.position, a.attempt
