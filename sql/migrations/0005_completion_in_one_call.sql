-- 0005_completion_in_one_call: storing a batch of results is one statement, one round trip.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- A batch of results was a transaction of five round trips: BEGIN, lock the tasks, store the
-- results, finalize the tasks, COMMIT. On loopback each round trip costs about as much as the
-- statements it carries, so a parent's result took about 2 ms to become durable, most of it
-- waiting, and its children could not be sent before. complete_results() does the same steps in
-- the same order in one call, which also commits by itself.
--
-- Each statement in a volatile function reads with a fresh snapshot, as the statements of the
-- transaction did: finalizing sees what the store just did, and (under the task locks taken first)
-- every change another transaction committed to the same tasks.

-- Ends each given task none of whose steps can still run: complete when every step is complete or
-- resolved_manually, else error naming the steps that failed. Call with the tasks locked.
-- Returns (task_id, state, error) for each task it ended.
create function finalize_tasks(p_task_ids uuid[]) returns table (task_id uuid, state text, error jsonb)
language sql volatile
as $$
  with candidates as (
    select t.id, t.state
    from tasks t
    where t.id = any(p_task_ids)
      and t.state in ('pending', 'in_progress')
      and not exists (select 1 from steps s where s.task_id = t.id and s.state in ('ready', 'in_progress'))
  ),
  summary as (
    select c.id, c.state as from_state,
           bool_and(s.state in ('complete', 'resolved_manually')) as all_done,
           coalesce(array_agg(s.name order by s.position) filter (where s.state = 'error'), '{}') as failed,
           (array_agg(s.error ->> 'message' order by s.position) filter (where s.state = 'error'))[1] as first_message
    from candidates c join steps s on s.task_id = c.id
    group by c.id, c.state
  ),
  ended as (
    update tasks t
    set state = case when su.all_done then 'complete' else 'error' end,
        finished_at = now(),
        error = case
          when su.all_done then null
          else jsonb_build_object(
            'message', case cardinality(su.failed)
              when 0 then 'no step can run any more'
              when 1 then format('step "%s" failed: %s', su.failed[1], coalesce(su.first_message, 'no message'))
              else format('%s steps failed: %s', cardinality(su.failed), array_to_string(su.failed, ', '))
            end,
            'failed_steps', to_jsonb(su.failed))
        end
    from summary su
    where t.id = su.id
    returning t.id, t.state, t.error, su.from_state
  ),
  flipped as (
    update task_transitions t set most_recent = false
    from ended e
    where t.task_id = e.id and t.most_recent
    returning t.task_id, t.sort_key, e.from_state, e.state, e.error
  )
  insert into task_transitions (task_id, from_state, to_state, event, metadata, sort_key, most_recent)
  select f.task_id, f.from_state, f.state, case f.state when 'complete' then 'completed' else 'failed' end,
         f.error, f.sort_key + 1, true
  from flipped f
  returning task_id, to_state as state, metadata as error
$$;

-- One row of complete_results(): kind stored | known | readied (see sql/queries/complete_attempts.sql)
-- or ended (a task this batch finished: task_id, state, error).
create type completion_row as (
  kind text,
  attempt_id uuid,
  prior_outcome text,
  step_id uuid,
  task_id uuid,
  state text,
  handler text,
  run_at timestamptz,
  error jsonb
);

create function complete_results(
  p_attempt_ids uuid[], p_statuses text[], p_outputs text[], p_errors text[],
  p_durations_ms float8[], p_pool_ids text[], p_usages text[], p_output_bytes int[]
) returns setof completion_row
language plpgsql volatile
as $$
declare
  v_rows completion_row[];
begin
  -- 1. Lock the tasks of the attempts, in id order (no deadlock between batches), so that
  --    finalizing below sees every concurrent change to their steps.
  perform 1
  from tasks t
  where t.id = any(array(select a.task_id from step_attempts a where a.attempt_id = any(p_attempt_ids)))
  order by t.id
  for update;

  -- 2. Store the results: each result whose attempt holds its step's lease completes the step or
  --    fails/re-schedules it by its retry policy; children whose last parent completed become ready.
  --    Plan shape (hot path): each big table is reached as the inner side of a join or
  --    UPDATE ... FROM a small CTE, one primary-key probe per result.
  with input as (
    select r.*
    from unnest(p_attempt_ids, p_statuses, p_outputs, p_errors, p_durations_ms, p_pool_ids, p_usages, p_output_bytes)
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
  select coalesce(array_agg(row(x.kind, x.attempt_id, x.prior_outcome, x.step_id, x.task_id, x.state,
                                x.handler, x.run_at, null::jsonb)::completion_row), '{}')
  into v_rows
  from (
    select 'stored' as kind, st.attempt_id, null as prior_outcome, st.id as step_id, st.task_id, st.state, st.handler, st.run_at
    from stored st
    union all
    select 'known', f.attempt_id, a.outcome, a.step_id, a.task_id, null, null, null
    from firsts f left join step_attempts a on a.attempt_id = f.attempt_id
    union all
    select 'readied', null, null, rc.id, rc.task_id, rc.state, rc.handler, rc.run_at
    from readied_children rc
    where rc.state = 'ready'
  ) as x;
  return query select * from unnest(v_rows);

  -- 3. End the tasks whose last runnable step this batch finished.
  return query
  select 'ended'::text, null::uuid, null::text, null::uuid, f.task_id, f.state, null::text, null::timestamptz, f.error
  from finalize_tasks(array(select distinct r.task_id from unnest(v_rows) r where r.kind = 'stored')) f;
end
$$;
