-- Takes in-flight steps away from the given attempts (lease expired, pool or broker lost, or never delivered): back to ready, or to error when a counted attempt leaves no retry. Call with their tasks locked.
-- $1 uuid[] attempt ids, $2 text attempt outcome (timeout | lost | undelivered), $3 bool the attempt counts, $4 bool wait the backoff before the retry, $5 bool only if the lease expired, $6 text reason, $7 text transition event. Returns one row per step taken back.
with target as (
  select s.id, s.task_id, s.lease_attempt_id as attempt_id, s.lease_broker_id as broker_id, s.lease_pool_id as pool_id,
         s.lease_started_at as started_at, s.attempts, s.max_attempts,
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
  join steps s on s.lease_attempt_id = given.attempt_id
  where not $5::boolean or s.lease_expires_at < now()
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
      history_seq = s.history_seq + 1,
      lease_attempt_id = null, lease_broker_id = null, lease_pool_id = null, lease_started_at = null,
      lease_expires_at = null
  from target tg
  where s.id = tg.id and s.lease_attempt_id = tg.attempt_id
  returning s.id, s.task_id, s.handler, s.state, s.run_at, s.error, s.history_seq, tg.attempt_id, tg.broker_id,
            tg.pool_id, tg.started_at, tg.attempts, tg.message
),
-- The attempt's one row (0013): it reached a pool, or was meant to, under this lease.
attempt_rows as (
  insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at, duration_ms,
                             outcome, error)
  select rq.attempt_id, rq.id, rq.task_id, rq.attempts, coalesce(rq.broker_id, ''), rq.pool_id, rq.started_at,
         extract(epoch from now() - rq.started_at) * 1000, $2::text,
         jsonb_build_object('type', $2::text, 'message', rq.message, 'retryable', true)
  from requeued rq
),
-- The attempt's `claimed` transition, from its lease, at the sort_key its claim reserved (0016;
-- not for a lease whose claim wrote it, leased before 0016), and the step's move off the lease.
history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key,
                                created_at)
  select rq.id, rq.task_id, 'ready', 'in_progress', 'claimed', rq.attempt_id,
         jsonb_build_object('broker_id', rq.broker_id, 'attempt', rq.attempts), rq.history_seq - 1, rq.started_at
  from requeued rq
  where not exists (select 1 from leases_claimed_before_0016 l where l.attempt_id = rq.attempt_id)
  union all
  select rq.id, rq.task_id, 'in_progress', rq.state, $7::text, rq.attempt_id,
         jsonb_build_object('reason', $6::text, 'counted', $3::boolean), rq.history_seq, now()
  from requeued rq
)
select rq.attempt_id, rq.id as step_id, rq.task_id, rq.handler, rq.state, rq.run_at, rq.broker_id, rq.pool_id
from requeued rq
