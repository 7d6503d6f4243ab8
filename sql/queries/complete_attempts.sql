-- Stores a batch of attempt results at once: each result whose attempt holds its step's lease completes the step (output stored in this same statement) or fails/re-schedules it by its retry policy; children whose last parent completed become ready.
-- $1 uuid[] attempt ids, $2 text[] statuses, $3 text[] outputs as JSON text, $4 text[] errors as JSON text, $5 float8[] duration ms, $6 text[] pool ids, $7 text[] usage as JSON text, $8 int[] output bytes. Returns kind 'outcome' rows (one per input, by ord) and kind 'readied' rows.
with input as (
  select r.*
  from unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::text[], $8::int[])
       with ordinality as r(attempt_id, status, output, error, duration_ms, pool_id, usage, output_bytes, ord)
),
-- The first result of each attempt in the batch counts; later copies are duplicates.
firsts as (
  select distinct on (attempt_id) * from input order by attempt_id, ord
),
-- Plans: the big tables are reached by `= any(array(...))` (index probes for the rows at hand) or as
-- the inner side of an UPDATE ... FROM a small CTE (a primary-key probe per row); never a scan.
known as (
  select a.attempt_id, a.step_id, a.task_id, a.outcome from step_attempts a where a.attempt_id = any($1::uuid[])
),
leased as (
  select s.id, s.attempts, s.max_attempts, s.retryable, s.lease_attempt_id, s.state,
         s.backoff_initial_ms, s.backoff_multiplier, s.backoff_max_ms, s.backoff_jitter
  from steps s
  where s.id = any(array(select k.step_id from known k))
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
  join known a on a.attempt_id = f.attempt_id
  join leased s on s.id = a.step_id
  where s.lease_attempt_id = f.attempt_id and s.state = 'in_progress'
),
-- The WHERE is re-checked on the current row version, so a lease lost meanwhile stores nothing.
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
  where s.id = d.step_id and s.lease_attempt_id = d.attempt_id and s.state = 'in_progress'
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
  from step_edges e
  where e.parent_id = any(array(select st.id from stored st where st.state = 'complete'))
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
  select st.id as step_id, st.task_id, st.state as to_state,
         case st.state when 'complete' then 'completed' when 'ready' then 'retry_scheduled' else 'failed' end as event,
         st.attempt_id,
         case when st.state = 'complete' then null
              else jsonb_build_object('error', st.error::jsonb, 'attempt', st.attempts) end as metadata,
         'in_progress' as from_state
  from stored st
  union all
  select rc.id, rc.task_id, 'ready', 'parents_finished', null::uuid, null::jsonb, 'pending'
  from readied_children rc
  where rc.state = 'ready'
),
flipped as (
  update step_transitions t set most_recent = false
  where t.step_id = any(array(select ch.step_id from changes ch)) and t.most_recent
  returning t.step_id, t.sort_key
),
history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, most_recent)
  select ch.step_id, ch.task_id, ch.from_state, ch.to_state, ch.event, ch.attempt_id, ch.metadata, f.sort_key + 1, true
  from changes ch join flipped f on f.step_id = ch.step_id
),
judged as (
  select f.attempt_id, f.ord,
         case
           when st.attempt_id is not null then 'stored'
           when a.attempt_id is null then 'unknown'
           when a.outcome in ('complete', 'error') then 'duplicate'
           else 'stale'
         end as outcome,
         coalesce(st.id, a.step_id) as step_id,
         coalesce(st.task_id, a.task_id) as task_id,
         st.state, st.handler, st.run_at
  from firsts f
  left join stored st on st.attempt_id = f.attempt_id
  left join known a on a.attempt_id = f.attempt_id
)
select 'outcome' as kind, i.ord::int as ord, i.attempt_id,
       case when i.ord = j.ord then j.outcome
            when j.outcome = 'stored' then 'duplicate'
            else j.outcome end as outcome,
       j.step_id, j.task_id,
       case when i.ord = j.ord then j.state end as state,
       case when i.ord = j.ord then j.handler end as handler,
       case when i.ord = j.ord then j.run_at end as run_at
from input i join judged j on j.attempt_id = i.attempt_id
union all
select 'readied', null, null, null, rc.id, rc.task_id, rc.state, rc.handler, rc.run_at
from readied_children rc
where rc.state = 'ready'
