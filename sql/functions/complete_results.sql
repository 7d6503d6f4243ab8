-- complete_results: Stores a batch of results in one call: the contract is sql/queries/complete_attempts.sql's (the only caller).
-- Returns rows of kind stored | known | readied | claimed | ended; see that file for the parameters and the rows.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0008; insert-only history and the attempt on the lease since 0013; a one-step task ends without finalize_tasks() since 0014 (tasks.step_count); its results one jsonb parameter since 0015; no sequential scans in its plans since then; the one-step task's end, the list of tasks for finalize_tasks() and the NOTIFY payloads made by the statement that stores the results since issue 16; the claimed children's inputs read without step_inputs() since then too; it writes the ending attempts' `claimed` transitions, and none for the children it claims, and an ending task's `started`, since 0016.
create or replace function complete_results(
  p_results jsonb,
  p_broker_id text, p_claim_pool_id text, p_claim_handlers text[], p_claim_most int
) returns setof completion_row
language plpgsql volatile
-- Its statements' plans are built once per connection, not planned again for each of a connection's
-- first calls: a custom plan over the partitioned history tables costs more to make than these
-- statements, one probe per row, cost to run. Measured (bench/run.ts, 20,000 tasks, two interleaved
-- pairs): one-step 5,426 / 4,919 against 5,008 / 4,772 steps/s, one diamond at a time p50 6.0 / 6.8
-- against 7.1 / 7.7 ms, and the function's own time at one result 3.5 against 4.6 ms
-- (bench/childLatency.ts --statements).
set plan_cache_mode = force_generic_plan
-- Those generic plans are made on the connection's first call, when a new schema's tables hold a
-- few rows and have no statistics yet, and are kept while the tables grow: made then, they read
-- steps and tasks whole (sequential scans and hash joins, every probe below among them, the
-- claimed children's STEP fields and finalize_tasks() too, which run under this setting). Every
-- statement here reaches rows by key, so a sequential scan is never the plan wanted. Measured
-- (bench/childLatency.ts --tasks 100 --statements, three interleaved pairs, load average 10-12
-- on 2 cores): the call 6.1 / 6.6 / 6.1 ms against 5.6 / 4.7 / 4.3 ms, its main statement
-- 2.3 / 2.9 / 2.2 ms against 1.8 / 1.6 / 1.6 ms.
set enable_seqscan = off
as $$
declare
  -- the batch's attempt ids, in its order, under the name the statements below use
  p_attempt_ids uuid[] := array(select (e ->> 'attempt_id')::uuid from jsonb_array_elements(p_results) e);
  -- those whose `claimed` transition their claim wrote (leased when 0016 ran; none afterwards)
  v_logged uuid[] := array(select l.attempt_id from leases_claimed_before_0016 l where l.attempt_id = any(p_attempt_ids));
  v_rows completion_row[];
  v_ending uuid[];
  v_finished text[];
  v_claimed boolean;
begin
  -- 1. Lock the tasks of the attempts, in id order (no deadlock between batches), so that
  --    finalizing below sees every concurrent change to their steps.
  perform 1
  from tasks t
  where t.id = any(array(select s.task_id from steps s where s.lease_attempt_id = any(p_attempt_ids)))
  order by t.id
  for update;

  -- 2. Store the results: each result whose attempt holds its step's lease completes the step or
  --    fails/re-schedules it by its retry policy; children whose last parent completed become ready.
  --    Plan shape (hot path): each big table is reached as the inner side of a join or
  --    UPDATE ... FROM a small CTE, one primary-key probe per result.
  -- A key left out is SQL null; `output` of a complete result is always there (JSON null for none,
  -- which has_output counts as an output), so -> and not ->> (which would make that null SQL's).
  with input as (
    select (e ->> 'attempt_id')::uuid as attempt_id, e ->> 'status' as status, e -> 'output' as output,
           e -> 'error' as error, (e ->> 'duration_ms')::float8 as duration_ms, e ->> 'pool_id' as pool_id,
           e -> 'usage' as usage, (e ->> 'output_bytes')::int as output_bytes, r.ord
    from jsonb_array_elements(p_results) with ordinality as r(e, ord)
  ),
  -- The first result of each attempt in the batch counts; later copies are duplicates.
  firsts as (
    select distinct on (attempt_id) * from input order by attempt_id, ord
  ),
  decided as (
    select f.*, s.id as step_id, s.lease_broker_id, s.lease_pool_id, s.lease_started_at,
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
    join steps s on s.lease_attempt_id = f.attempt_id
    -- the batch's own leases, by key: with the join condition alone the generic plan read every
    -- leased step (a bitmap scan of steps_leased_attempt, hashed), each in-flight step once per commit
    where s.lease_attempt_id = any(p_attempt_ids)
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
        history_seq = s.history_seq + 1,
        lease_attempt_id = null, lease_broker_id = null, lease_pool_id = null, lease_started_at = null,
        lease_expires_at = null
    from decided d
    where s.id = d.step_id and s.lease_attempt_id = d.attempt_id
      -- the same: the batch's steps by primary key, not every leased step
      and s.id = any(array(select d2.step_id from decided d2))
    returning s.id, s.task_id, s.handler, s.state, s.run_at, s.attempts, s.history_seq, d.attempt_id, d.status,
              d.error, d.duration_ms, d.pool_id, d.usage, d.output_bytes, d.lease_broker_id, d.lease_pool_id,
              d.lease_started_at
  ),
  -- The attempt's one row, whole (0013): until now it was the step's lease.
  attempt_rows as (
    insert into step_attempts (attempt_id, step_id, task_id, attempt, broker_id, pool_id, started_at, duration_ms,
                               outcome, error, output_bytes, cost, tokens, artifacts)
    select st.attempt_id, st.id, st.task_id, st.attempts, coalesce(st.lease_broker_id, p_broker_id),
           coalesce(st.pool_id, st.lease_pool_id), st.lease_started_at,
           coalesce(st.duration_ms, extract(epoch from now() - st.lease_started_at) * 1000),
           st.status, st.error::jsonb, st.output_bytes,
           (st.usage::jsonb ->> 'cost')::double precision,
           (st.usage::jsonb ->> 'tokens')::bigint,
           st.usage::jsonb -> 'artifacts'
    from stored st
  ),
  finished_parents as (
    select e.child_id, count(*)::int as n
    from stored st join step_edges e on e.parent_id = st.id
    where st.state = 'complete'
    group by e.child_id
  ),
  -- The children of the completed steps; those whose last parent this batch completes become
  -- ready, and up to p_claim_most of them that the named pool serves are claimed at once (highest
  -- priority first). Tasks are locked (step 1), so no other writer changes these rows meanwhile.
  children as (
    select fp.child_id as id, fp.n,
           c.state = 'pending' and c.pending_parents = fp.n as becomes_ready,
           coalesce(c.state = 'pending' and c.pending_parents = fp.n and p_claim_most > 0
                    and c.handler = any(p_claim_handlers), false) as claimable,
           c.priority
    from finished_parents fp join steps c on c.id = fp.child_id
  ),
  marked as (
    select ch.id, ch.n, ch.becomes_ready,
           ch.claimable and row_number() over (partition by ch.claimable order by ch.priority desc, ch.id) <= p_claim_most
             as take
    from children ch
  ),
  readied_children as (
    update steps c
    set pending_parents = c.pending_parents - m.n,
        state = case when m.take then 'in_progress'
                     when m.becomes_ready then 'ready'
                     else c.state end,
        run_at = case when m.becomes_ready then now() else c.run_at end,
        attempts = case when m.take then c.attempts + 1 else c.attempts end,
        -- two transitions for a claimed child (pending -> ready -> in_progress), one for a readied one
        history_seq = c.history_seq + case when m.take then 2 when m.becomes_ready then 1 else 0 end,
        lease_attempt_id = case when m.take then new_id() end,
        lease_broker_id = case when m.take then p_broker_id end,
        lease_pool_id = case when m.take then p_claim_pool_id end,
        lease_started_at = case when m.take then now() end,
        lease_expires_at = case when m.take then now() + c.timeout_ms * interval '1 millisecond' end
    from marked m
    where c.id = m.id
    returning c.id, c.task_id, c.handler, c.state, c.run_at, c.attempts, c.lease_attempt_id, c.history_seq,
              m.becomes_ready, m.take
  ),
  -- Each transition carries the history_seq its row's update set. The attempt's `claimed`
  -- transition is written now that it ends (0016), from its lease: at the sort_key its claim
  -- reserved (the one before this update's), stamped with the claim's time, naming the broker
  -- that held the lease at the end (the claim's, unless another broker adopted the attempt).
  -- A claimed child's claim is likewise left to the end of its attempt: here only its readying,
  -- the transition before the one its claim reserved.
  history as (
    insert into step_transitions (step_id, task_id, from_state, to_state, event, attempt_id, metadata, sort_key,
                                  created_at)
    select st.id, st.task_id, 'ready', 'in_progress', 'claimed', st.attempt_id,
           jsonb_build_object('broker_id', coalesce(st.lease_broker_id, p_broker_id), 'attempt', st.attempts),
           st.history_seq - 1, st.lease_started_at
    from stored st
    where st.attempt_id <> all(v_logged)
    union all
    select st.id, st.task_id, 'in_progress', st.state,
           case st.state when 'complete' then 'completed' when 'ready' then 'retry_scheduled' else 'failed' end,
           st.attempt_id,
           case when st.state = 'complete' then null
                else jsonb_build_object('error', st.error::jsonb, 'attempt', st.attempts) end,
           st.history_seq, now()
    from stored st
    union all
    select rc.id, rc.task_id, 'pending', 'ready', 'parents_finished', null::uuid, null::jsonb,
           rc.history_seq - case when rc.take then 1 else 0 end, now()
    from readied_children rc
    where rc.becomes_ready
  ),
  -- A task of one step (tasks.step_count, 0014) ends with that step: a complete result says all
  -- that finalize_tasks() would find by reading the task's steps, so it is not asked. The row is
  -- the one step 1 locked, updated as finalize_tasks() would (state, transition; NOTIFY below).
  -- Only an in_progress task: one a claim left pending (its lock was taken) ends through
  -- finalize_tasks(), which reads its from_state; so does a failed step's task (its error names
  -- the step). This was a statement of its own after this one, so that the task row's page could
  -- first drop the version the claim left and keep the update HOT; measured, it does not need
  -- to: 96.4% of the task updates are HOT either way (claim + complete of 20,000 one-step tasks
  -- 200 at a time, pg_stat_user_tables), and with fillfactor 50 (0013) the page has room.
  -- Here it costs one CTE instead of a statement (its plan, its executor, an unnest of the rows
  -- above), and so do the task list and the NOTIFY payloads below, which read these CTEs'
  -- narrow rows instead of unnesting the batch's rows three more times. Measured, interleaved,
  -- load average 7-10 on 2 cores: the completing backend's own CPU (/proc/<pid>/schedstat around
  -- each call; 10,000 one-step tasks claimed and completed 200 at a time, five pairs) 110.0
  -- against 106.5 µs a result on average; at one result a call (the lone diamond's path) 2.20
  -- against 2.06 ms a call; in a bench run of 20,000 one-step tasks (pg_stat_statements, two
  -- pairs) these statements' time in PostgreSQL 7.5 / 6.9 s against 6.8 / 6.6 s, the task's end
  -- 1.9 / 1.7 s of it before. The statements that store, insert and update are the rest of the
  -- cost: one non-HOT step update (state and the lease are indexed), the attempt, step and task
  -- transition rows, a HOT task update, at ~1,500 bytes of WAL a result either way.
  ended as (
    update tasks t
    set state = 'complete', finished_at = now(), history_seq = t.history_seq + 1, error = null
    where t.id = any(array(select st.task_id from stored st where st.state = 'complete'))
      and t.step_count = 1 and t.state = 'in_progress'
    returning t.id, t.history_seq, t.started_at
  ),
  -- its `started` first, if its claim left it to be written here (0016: see finalize_tasks)
  task_history as (
    insert into task_transitions (task_id, from_state, to_state, event, sort_key, created_at)
    select e.id, 'pending', 'in_progress', 'started', 2, e.started_at
    from ended e
    where e.history_seq = 3 and e.started_at is not null
    union all
    select e.id, 'in_progress', 'complete', 'completed', e.history_seq, now()
    from ended e
  )
  select coalesce((
    select array_agg(row(x.kind, x.attempt_id, x.prior_outcome, x.step_id, x.task_id, x.state,
                         x.handler, x.run_at, null::jsonb, null::jsonb)::completion_row)
    from (
      select 'stored' as kind, st.attempt_id, null as prior_outcome, st.id as step_id, st.task_id, st.state, st.handler, st.run_at
      from stored st
      union all
      -- the results not stored: their attempt's row, if it ended, tells a duplicate from a stale one
      select 'known', f.attempt_id, a.outcome, a.step_id, a.task_id, null, null, null
      from firsts f left join step_attempts a on a.attempt_id = f.attempt_id
      where not exists (select 1 from stored st where st.attempt_id = f.attempt_id)
      union all
      -- 'readied' rows are the children left ready; 'claimed' ones get their STEP fields in step 3
      select case when rc.take then 'claimed' else 'readied' end, rc.lease_attempt_id, null, rc.id,
             rc.task_id, rc.state, rc.handler, rc.run_at
      from readied_children rc
      where rc.becomes_ready
      union all
      select 'ended', null, null, null, e.id, 'complete', null, null
      from ended e
    ) as x), '{}'),
    -- the tasks step 5 asks finalize_tasks() to end: those of the steps stored complete or failed,
    -- but for a task this batch readied a step of (it cannot end: it is locked, and that step is
    -- ready or now claimed), one whose step it re-scheduled (ready again) and one ended above
    array(select st.task_id from stored st where st.state <> 'ready'
          except
          select rc.task_id from readied_children rc where rc.becomes_ready
          except
          select e.id from ended e),
    -- the NOTIFY payloads of the tasks ended above, as finalize_tasks() builds them for the tasks
    -- it ends (100 tasks each, built as text; see there)
    array(select '{"kind":"finished","tasks":['
                 || string_agg('{"task_id":"' || n.id || '","state":"complete"}', ',' order by n.id) || ']}'
          from (select e.id, (row_number() over (order by e.id) - 1) / 100 as chunk from ended e) n
          group by n.chunk),
    exists (select 1 from readied_children rc where rc.take)
  into v_rows, v_ending, v_finished, v_claimed;
  return query
  select r.* from unnest(v_rows) r where r.kind <> 'claimed';

  -- 3. The children claimed above (the pool the broker named serves them, and it set that much of
  --    the pool's credit aside): the fields of their STEP, as claim_steps() returns them. A
  --    statement of its own, so it sees the parents' outputs stored above.
  --    Their parents' outputs are read in this statement, a subquery per child by key (step_edges
  --    by child_id, then steps by id), not by step_inputs(): a volatile function call is an
  --    executor start of its own for each row. Measured, backend CPU from /proc/<pid>/schedstat,
  --    the statement alone prepared with this function's settings (generic plan, no sequential
  --    scans), three rounds: 1,500 children claimed by commits of 500 diamonds' roots and joins,
  --    79 to 89 us a claimed child with step_inputs(), 50 to 59 now. The lone diamond's commits
  --    (bench/childLatency.ts --statements, one or two children a call): 0.28 to 0.35 ms a call
  --    before, 0.19 to 0.21 now. Bench runs of 6,000 diamonds (pg_stat_statements, wall time in
  --    PostgreSQL on a loaded machine, two interleaved pairs): 166 and 295 us a claimed child
  --    before, 107 and 126 now. One grouped pass over all the children's parents, hash-joined to
  --    the children, was 47 to 49 us a child in the large batch but 0.49 to 0.54 ms a call at one
  --    or two children (its hash tables and aggregates set up on every call), so it lost where
  --    the latency target is. Most of what is left (about 30 us a child) is building the STEP's
  --    jsonb (to_jsonb of the row, its template, context, config and inputs nested in it); as
  --    separate columns the same fields cost about 30 us a child in all, but that changes
  --    completion_row and its readers.
  if v_claimed then
    return query
    select 'claimed'::text, c.lease_attempt_id, null::text, c.id, c.task_id, c.state, c.handler,
           null::timestamptz, null::jsonb,
           to_jsonb(row(c.task_id, c.id, c.lease_attempt_id, c.name, c.handler, c.attempts, c.max_attempts,
                        c.timeout_ms,
                        jsonb_build_object('namespace', tt.namespace, 'name', tt.name, 'version', tt.version),
                        t.context, c.config,
                        (select coalesce(jsonb_object_agg(p.name, coalesce(p.output, 'null'::jsonb)), '{}'::jsonb)
                         from step_edges e join steps p on p.id = e.parent_id
                         where e.child_id = c.id),
                        c.lease_expires_at,
                        (select count(*)::int from step_edges e where e.parent_id = c.id),
                        t.traceparent, t.tracestate)::claimed_step)
    from steps c
    join tasks t on t.id = c.task_id
    join task_templates tt on tt.id = t.template_id
    where c.id = any(array(select r.step_id from unnest(v_rows) r where r.kind = 'claimed'))
    order by c.priority desc, c.task_id, c.position;
  end if;

  -- 4. Every broker on this database hears of the one-step tasks ended above.
  perform pg_notify(left('events_' || current_schema(), 63), p) from unnest(v_finished) p;

  -- 5. End the other tasks whose last runnable step this batch finished (v_ending, above).
  if cardinality(v_ending) > 0 then
    return query
    select 'ended'::text, null::uuid, null::text, null::uuid, f.task_id, f.state, null::text, null::timestamptz,
           f.error, null::jsonb
    from finalize_tasks(v_ending) f;
  end if;
end
$$;
