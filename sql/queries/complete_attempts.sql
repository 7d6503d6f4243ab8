-- Stores a batch of attempt results at once: each result whose attempt holds its step's lease completes the step (output stored in this same statement) or fails/re-schedules it by its retry policy; children whose last parent completed become ready.
-- $1 uuid[] attempt ids, $2 text[] statuses, $3 text[] outputs as JSON text, $4 text[] errors as JSON text, $5 float8[] duration ms, $6 text[] pool ids, $7 text[] usage as JSON text, $8 int[] output bytes. Returns kind 'stored', 'known' (every distinct attempt: its prior record) and 'readied' rows.
--
-- Plan shape (hot path): each big table is reached as the inner side of a join or UPDATE ... FROM
-- a small CTE, i.e. one primary-key probe per result; no two CTEs are joined to each other.
-- Call with the tasks of the attempts locked (lock_tasks_of_attempts.sql).
with input as (
  select r.*
  from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::text[], $8::int[])
       with ordinality as r(attempt_id, status, output, error, duration_ms, pool_id, usage, output_bytes, ord)
),
-- The first result of each attempt in the batch counts; later copies are duplicates.
firsts as (
  select distinct on (attempt_id) * from input order by attempt_id, ord
),
decided as (
  select f.*, s.id as step_id,
         case
           when f.status = 'complete' then 'complete'
           when coalesce((f.error::jsonb ->> 'retryable')::boolean, true)
                and s.retryable and s.attempts < s.max_attempts then 'ready'
           else 'error'
         end as new_state,
         coalesce((f.error::jsonb ->> 'retry_after_ms')::double precision,
                  backoff_delay_ms(s.backoff_initial_ms, s.backoff_multiplier, s.backoff_max_ms, s.backoff_jitter, s.attempts))
           as delay_ms
  from firsts f
  join step_attempts a on a.attempt_id = f.attempt_id
  join steps s on s.id = a.step_id
  where s.lease_attempt_id = f.attempt_id
),
-- Only the lease holder stores (a lease implies in_progress, by a CHECK). The condition is
-- re-checked on the current row version, so a lease lost meanwhile stores nothing.
stored as (
  update steps s
  set state = d.new_state,
      output = case when d.new_state = 'complete' then d.output::jsonb end,
      has_output = d.new_state = 'complete' and d.output is not null,
      error = case when d.new_state = 'complete' then null else d.error::jsonb end,
      run_at = case when d.new_state = 'ready' then now() + d.delay_ms * interval '1 millisecond' else s.run_at end,
      finished_at = case when d.new_state in ('complete', 'error') then now() end,
      lease_attempt_id = null, lease_broker_id = null, lease_expires_at = null
  from decided d
  where s.id = d.step_id and s.lease_attempt_id = d.attempt_id
  returning s.id, s.task_id, s.handler, s.state, s.run_at, s.attempts, d.attempt_id, d.status, d.error,
            d.duration_ms, d.pool_id, d.usage, d.output_bytes
),
attempt_rows as (
  update step_attempts a
  set finished_at = now(),
      outcome = st.status,
      error = st.error::jsonb,
      duration_ms = coalesce(st.duration_ms, extract(epoch from now() - a.started_at) * 1000),
      pool_id = coalesce(st.pool_id, a.pool_id),
      output_bytes = st.output_bytes,
      cost = (st.usage::jsonb ->> 'cost')::double precision,
      tokens = (st.usage::jsonb ->> 'tokens')::bigint,
      artifacts = st.usage::jsonb -> 'artifacts'
  from stored st
  where a.attempt_id = st.attempt_id
),
finished_parents as (
  select e.child_id, count(*)::int as n
  from stored st join step_edges e on e.parent_id = st.id
  where st.state = 'complete'
  group by e.child_id
),
readied_children as (
  update steps c
  set pending_parents = c.pending_parents - fp.n,
      state = case when c.state = 'pending' and c.pending_parents = fp.n then 'ready' else c.state end,
      run_at = case when c.state = 'pending' and c.pending_parents = fp.n then now() else c.run_at end
  from finished_parents fp
  where c.id = fp.child_id
  returning c.id, c.task_id, c.handler, c.state, c.run_at
),
changes as (
  select st.id as step_id, 'in_progress' as from_state, st.state as to_state,
         case st.state when 'complete' then 'completed' when 'ready' then 'retry_scheduled' else 'failed' end as event,
         st.attempt_id,
         case when st.state = 'complete' then null
              else jsonb_build_object('error', st.error::jsonb, 'attempt', st.attempts) end as metadata
  from stored st
  union all
  select rc.id, 'pending', 'ready', 'parents_finished', null::uuid, null::jsonb
  from readied_children rc
  where rc.state = 'ready'
),
flipped as (
  update step_transitions t set most_recent = false
  from changes ch
  where t.step_id = ch.step_id and t.most_recent
  returning t.step_id, t.task_id, t.sort_key, ch.from_state, ch.to_state, ch.event, ch.attempt_id, ch.metadata
),
history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, most_recent)
  select f.step_id, f.task_id, f.from_state, f.to_state, f.event, f.attempt_id, f.metadata, f.sort_key + 1, true
  from flipped f
)
select 'stored' as kind, st.attempt_id, null as prior_outcome, st.id as step_id, st.task_id, st.state, st.handler, st.run_at
from stored st
union all
select 'known', f.attempt_id, a.outcome, a.step_id, a.task_id, null, null, null
from firsts f left join step_attempts a on a.attempt_id = f.attempt_id
union all
select 'readied', null, null, rc.id, rc.task_id, rc.state, rc.handler, rc.run_at
from readied_children rc
where rc.state = 'ready'
