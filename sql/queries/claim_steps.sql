-- Claims up to $3 ready steps (highest priority, then longest ready) whose handler is served, starting one attempt each under a lease; a task claimed for the first time moves pending -> in_progress.
-- $1 text broker id, $2 text[] handlers served, $3 int most steps, $4 uuid[] only these steps (null: any), $5 text the pool the attempts go to (null: not yet known), $6 uuid[] steps not to claim (null: none; ignored with $4). Returns one row per attempt with all a STEP message needs, its lease expiry, how many steps depend on it, and the task's traceparent and tracestate (null: none submitted) (claim_steps() in sql/functions/claim_steps.sql).
-- read by position (ClaimTuple, CompletionTuple in broker/state/rows.ts): keep the order in step
select task_id, step_id, attempt_id, step_name, handler, attempt, max_attempts, timeout_ms,
       template, context, config, inputs,
       -- UTC_ISO_TEXT: as toISOString writes it, which the broker passes on (broker/state/rows.ts)
       to_char(lease_expires_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') as lease_expires_at,
       children, traceparent, tracestate
from claim_steps($1::text, $2::text[], $3::int, $4::uuid[], $5::text, $6::uuid[])
