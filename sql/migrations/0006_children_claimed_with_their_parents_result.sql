-- 0006_children_claimed_with_their_parents_result: the result that readies a child also claims it.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- A parent's result was stored by one call, and its children were claimed by a second one that
-- could only start after the first had committed and returned: one more round trip, statement and
-- durable commit between a parent's result and its children's STEP (measured with one diamond at a
-- time: store ~1.0 ms, then claim ~0.9 ms). The broker knows how many steps wait on each attempt
-- it sent (claim rows now carry that count), so when a batch of results can ready children it sets
-- that much of a pool's credit aside and complete_results() claims them for that pool in the same
-- transaction. The claim is the statement claim_steps.sql ran, moved into a function both use.

-- One claimed attempt: the fields of a STEP message item, its lease expiry, and how many steps
-- depend on it.
create type claimed_step as (
  task_id uuid,
  step_id uuid,
  attempt_id uuid,
  step_name text,
  handler text,
  attempt integer,
  max_attempts integer,
  timeout_ms integer,
  template jsonb,
  context jsonb,
  config jsonb,
  inputs jsonb,
  lease_expires_at timestamptz,
  children integer
);

-- Claims up to p_most ready steps (highest priority, then longest ready) whose handler is in
-- p_handlers, among p_step_ids only when given; see sql/queries/claim_steps.sql for the contract.
-- plpgsql, not sql: its statement plans are cached for the session on every server version.
--
-- Plan shape (this is the hot path): big tables are only ever reached by primary-key or partial-index
-- probes for the rows at hand: `= any(array(...))`, or as the inner side of UPDATE ... FROM a small CTE.
-- No two CTEs are joined to each other (a nested loop over CTE scans would be quadratic).
create function claim_steps(
  p_broker_id text, p_handlers text[], p_most integer, p_step_ids uuid[], p_pool_id text
) returns setof claimed_step
language plpgsql volatile
as $$
begin
  return query
  with picked as (
    -- any ready step: walk the ready index in priority order (see pick_ready_steps in 0004)
    select p.id from pick_ready_steps(p_handlers, p_most) as p(id)
    where p_step_ids is null
    union all
    -- only the given steps (children just readied): a few primary-key probes
    select given.id from (
      select s.id
      from steps s
      where p_step_ids is not null
        and s.id = any(p_step_ids)
        and s.state = 'ready'
        and s.run_at <= now()
        and s.handler = any(p_handlers)
      order by s.priority desc, s.run_at
      limit p_most
      for update skip locked
    ) as given
  ),
  claimed as (
    update steps s
    set state = 'in_progress',
        attempts = s.attempts + 1,
        lease_attempt_id = new_id(),
        lease_broker_id = p_broker_id,
        lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
    where s.id = any(array(select p.id from picked p))
    returning s.id, s.task_id, s.name, s.handler, s.config, s.attempts, s.max_attempts, s.timeout_ms,
              s.lease_attempt_id, s.lease_expires_at, s.priority, s.run_at, s.position
  ),
  attempt_rows as (
    insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id)
    select c.lease_attempt_id, c.id, c.task_id, c.attempts, p_broker_id, p_pool_id from claimed c
  ),
  step_flipped as (
    update step_transitions t set most_recent = false
    from claimed c
    where t.step_id = c.id and t.most_recent
    returning t.step_id, t.task_id, t.sort_key, c.lease_attempt_id, c.attempts
  ),
  step_history as (
    insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key, most_recent)
    select f.step_id, f.task_id, 'ready', 'in_progress', 'claimed', f.lease_attempt_id,
           jsonb_build_object('broker_id', p_broker_id, 'attempt', f.attempts), f.sort_key + 1, true
    from step_flipped f
  ),
  -- SKIP LOCKED here too: a claim never waits, so claims cannot deadlock on task rows.
  -- Whoever holds a pending task's lock is another claim starting it, or a cancel.
  started as (
    update tasks t set state = 'in_progress'
    where t.id = any(array(
      select t2.id from tasks t2
      where t2.id = any(array(select c.task_id from claimed c)) and t2.state = 'pending'
      order by t2.id
      for update skip locked
    ))
    returning t.id
  ),
  task_flipped as (
    update task_transitions t set most_recent = false
    from started s
    where t.task_id = s.id and t.most_recent
    returning t.task_id, t.sort_key
  ),
  task_history as (
    insert into task_transitions (task_id, from_state, to_state, event, sort_key, most_recent)
    select f.task_id, 'pending', 'in_progress', 'started', f.sort_key + 1, true
    from task_flipped f
  )
  -- One probe of the task row per claimed step gives both its template and its context (a correlated
  -- subquery each probed it twice); the template table is a handful of rows.
  select c.task_id, c.id as step_id, c.lease_attempt_id as attempt_id, c.name as step_name, c.handler,
         c.attempts as attempt, c.max_attempts, c.timeout_ms,
         jsonb_build_object('namespace', tt.namespace, 'name', tt.name, 'version', tt.version) as template,
         t.context,
         c.config,
         -- read with a snapshot taken after the pick (see step_inputs in 0004)
         step_inputs(c.id) as inputs,
         c.lease_expires_at,
         -- steps waiting on this one: the broker sets credit aside for them when the result comes
         (select count(*)::int from step_edges e where e.parent_id = c.id) as children
  from claimed c
  join tasks t on t.id = c.task_id
  join task_templates tt on tt.id = t.template_id
  -- in dispatch order (a join does not keep the order the steps were picked in)
  order by c.priority desc, c.run_at, c.task_id, c.position;
end
$$;

-- complete_results() gains the claim of readied children (step 3 below). Its rows gain a `claim`
-- column: rows of the new kind 'claimed' carry the claimed_step there, as JSON; a child claimed so is
-- not also returned as 'readied'. Everything else is as in 0005.
drop function complete_results(uuid[], text[], text[], text[], float8[], text[], text[], int[]);
alter type completion_row add attribute claim jsonb;

create function complete_results(
  p_attempt_ids uuid[], p_statuses text[], p_outputs text[], p_errors text[],
  p_durations_ms float8[], p_pool_ids text[], p_usages text[], p_output_bytes int[],
  p_broker_id text, p_claim_pool_id text, p_claim_handlers text[], p_claim_most int
) returns setof completion_row
language plpgsql volatile
as $$
declare
  v_rows completion_row[];
  v_claimed claimed_step[] := '{}';
  v_ending uuid[];
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
                                x.handler, x.run_at, null::jsonb, null::jsonb)::completion_row), '{}')
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
  -- 3. Claim, among the children just readied, up to p_claim_most that the given pool serves: the
  --    broker set that much of the pool's credit aside for them, and sends them when this returns.
  if p_claim_most > 0 then
    select coalesce(array_agg(c), '{}') into v_claimed
    from claim_steps(p_broker_id, p_claim_handlers, p_claim_most,
                     array(select r.step_id from unnest(v_rows) r where r.kind = 'readied'), p_claim_pool_id) c;
  end if;
  return query
  select r.* from unnest(v_rows) r
  where r.kind <> 'readied' or r.step_id <> all(array(select c.step_id from unnest(v_claimed) c));
  return query
  select 'claimed'::text, c.attempt_id, null::text, c.step_id, c.task_id, 'in_progress'::text, c.handler,
         null::timestamptz, null::jsonb, to_jsonb(c)
  from unnest(v_claimed) c;

  -- 4. End the tasks whose last runnable step this batch finished. A task this batch readied a
  --    step of cannot end (it is locked, and that step is ready or now claimed): it is not asked,
  --    which spares a parent's result the statement.
  v_ending := array(
    select r.task_id from unnest(v_rows) r where r.kind = 'stored'
    except
    select r.task_id from unnest(v_rows) r where r.kind = 'readied');
  if cardinality(v_ending) > 0 then
    return query
    select 'ended'::text, null::uuid, null::text, null::uuid, f.task_id, f.state, null::text, null::timestamptz,
           f.error, null::jsonb
    from finalize_tasks(v_ending) f;
  end if;
end
$$;
