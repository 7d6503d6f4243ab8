-- Takes in-flight steps away from the given attempts (lease expired, pool or broker lost, or never delivered): back to ready, or to error when a counted attempt leaves no retry. Call with their tasks locked.
-- $1 uuid[] attempt ids, $2 text attempt outcome (timeout | lost | undelivered), $3 bool the attempt counts, $4 bool wait the backoff before the retry, $5 bool only if the lease expired, $6 text reason, $7 text transition event. Returns one row per step taken back.
with target as (
  select s.id, s.lease_attempt_id as attempt_id, s.lease_broker_id as broker_id, s.attempts, s.max_attempts,
         s.timeout_ms, s.error as last_error,
         case
           when not $3::boolean then 'ready'
           when s.retryable and s.attempts < s.max_attempts then 'ready'
           else 'error'
         end as new_state,
         case
           when $2::text = 'timeout'
             then format('attempt %s of %s timed out after %s ms without a result', s.attempts, s.max_attempts, s.timeout_ms)
           else format('attempt %s of %s: %s', s.attempts, s.max_attempts, $6::text)
         end as message
  from unnest($1::uuid[]) as given(attempt_id)
  join step_attempts a on a.attempt_id = given.attempt_id
  join steps s on s.id = a.step_id
  where s.lease_attempt_id = a.attempt_id
    and (not $5::boolean or s.lease_expires_at < now())
),
requeued as (
  update steps s
  set state = tg.new_state,
      attempts = case when $3::boolean then s.attempts else s.attempts - 1 end,
      error = case when $3::boolean
                then jsonb_build_object('type', $2::text, 'message', tg.message, 'retryable', tg.new_state = 'ready')
                else tg.last_error end,
      run_at = case
        when tg.new_state <> 'ready' then s.run_at
        when $3::boolean and $4::boolean
          then now() + backoff_delay_ms(s.backoff_initial_ms, s.backoff_multiplier, s.backoff_max_ms, s.backoff_jitter, s.attempts)
                       * interval '1 millisecond'
        else now()
      end,
      finished_at = case when tg.new_state = 'error' then now() end,
      lease_attempt_id = null, lease_broker_id = null, lease_expires_at = null
  from target tg
  where s.id = tg.id and s.lease_attempt_id = tg.attempt_id
  returning s.id, s.task_id, s.handler, s.state, s.run_at, s.error, tg.attempt_id, tg.broker_id, tg.message
),
attempt_rows as (
  update step_attempts a
  set finished_at = now(),
      outcome = $2::text,
      error = jsonb_build_object('type', $2::text, 'message', rq.message, 'retryable', true),
      duration_ms = extract(epoch from now() - a.started_at) * 1000
  from requeued rq
  where a.attempt_id = rq.attempt_id and a.finished_at is null
  returning a.attempt_id, a.pool_id
),
flipped as (
  update step_transitions t set most_recent = false
  from requeued rq
  where t.step_id = rq.id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, rq.state, rq.attempt_id
),
history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, most_recent)
  select f.step_id, f.task_id, 'in_progress', f.state, $7::text, f.attempt_id,
         jsonb_build_object('reason', $6::text, 'counted', $3::boolean), f.sort_key + 1, true
  from flipped f
)
select rq.attempt_id, rq.id as step_id, rq.task_id, rq.handler, rq.state, rq.run_at, rq.broker_id, ar.pool_id
from requeued rq left join attempt_rows ar on ar.attempt_id = rq.attempt_id
