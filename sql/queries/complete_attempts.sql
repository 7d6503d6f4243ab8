-- Stores a batch of results at once, in one statement (complete_results() in sql/functions/complete_results.sql): locks the tasks, stores each result whose attempt holds its step's lease (complete, or failed/re-scheduled by its retry policy), readies children whose last parent completed and claims up to $5 of them for one pool in the same update, and ends tasks that can no longer run.
-- $1 jsonb the results, an array of objects {attempt_id, status, output (complete only; JSON null for none), error (error only), duration_ms, pool_id, usage, output_bytes}, keys left out when null, $2 text broker id, $3 text pool to claim children for, $4 text[] its handlers, $5 int most children to claim (0: none). Returns kind 'stored', 'known' (every distinct attempt: its prior record), 'readied' (not claimed), 'claimed' (claim: the claim row as JSON) and 'ended' (task_id, state, error) rows.
-- read by position (ClaimTuple, CompletionTuple in broker/state/rows.ts): keep the order in step
select kind, attempt_id, prior_outcome, step_id, task_id, state, handler,
       -- UTC_ISO_TEXT: as toISOString writes it (broker/state/rows.ts); only a ready step's is read
       case when state = 'ready' then to_char(run_at at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"') end as run_at,
       error, claim
from complete_results($1::jsonb, $2::text, $3::text, $4::text[], $5::int)
