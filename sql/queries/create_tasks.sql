-- Inserts tasks with their steps (built from the stored template definitions), edges and first transitions; root steps are ready at once; a task whose idempotency key exists is skipped. Notifies the work channel.
-- $1 uuid[] task ids, $2 int[] template ids, $3 text[] contexts as JSON text, $4 int[] priorities, $5 text[] idempotency keys (null: none), $6 text channel, $7 text payload,
-- $8 int[] edge template ids, $9 int[] edge child positions, $10 int[] edge parent positions (0-based, one entry per edge of each template in the batch),
-- $11 text[] traceparents, $12 text[] tracestates (null: none submitted). Returns the ids of the tasks inserted.
-- Edges come as step positions, and a step's id is looked up by subscript in its task's array of step ids: matching
-- depends_on names against the inserted steps was a join the planner ran as a nested loop over CTE rows
-- (edges x steps), about 40 s for a 1,000-step template with 499,500 edges. This way the work grows with steps + edges.
with input as (
  select * from unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::text[], $11::text[], $12::text[])
    with ordinality as i(task_id, template_id, context, priority, idempotency_key, traceparent, tracestate, ord)
),
-- Each template's step count, once per template in the batch (not per task: a definition can be large).
step_counts as (
  select tt.id, jsonb_array_length(tt.definition -> 'steps') as n
  from task_templates tt
  where tt.id = any(array(select distinct i.template_id from input i))
),
new_tasks as (
  insert into tasks (id, template_id, state, context, priority, idempotency_key, traceparent, tracestate, history_seq,
                     step_count)
  select i.task_id, i.template_id, 'pending', i.context::jsonb, i.priority, i.idempotency_key, i.traceparent, i.tracestate, 1,
         sc.n
  from input i
  left join step_counts sc on sc.id = i.template_id
  -- in request order, whatever order the join yields: of two requests with one key, the first is created
  order by i.ord
  on conflict (idempotency_key) do nothing
  returning id, template_id, priority
),
defs as (
  select nt.id as task_id, nt.priority, st.def, st.ord
  from new_tasks nt
  join task_templates tt on tt.id = nt.template_id
  cross join lateral jsonb_array_elements(tt.definition -> 'steps') with ordinality as st(def, ord)
),
new_steps as (
  insert into steps (id, task_id, position, name, handler, config, state, pending_parents, max_attempts, retryable,
                     backoff_initial_ms, backoff_multiplier, backoff_max_ms, backoff_jitter, timeout_ms, priority,
                     history_seq)
  select new_id(), d.task_id, d.ord - 1, d.def ->> 'name', d.def ->> 'handler', d.def -> 'config',
         case when jsonb_array_length(d.def -> 'depends_on') = 0 then 'ready' else 'pending' end,
         jsonb_array_length(d.def -> 'depends_on'),
         (d.def #>> '{retry,max_attempts}')::int,
         (d.def #>> '{retry,retryable}')::boolean,
         (d.def #>> '{retry,backoff,initial_ms}')::int,
         (d.def #>> '{retry,backoff,multiplier}')::double precision,
         (d.def #>> '{retry,backoff,max_ms}')::int,
         (d.def #>> '{retry,backoff,jitter}')::double precision,
         (d.def ->> 'timeout_ms')::int,
         d.priority,
         1
  from defs d
  returning id, task_id, position, state
),
step_ids as (
  select ns.task_id, array_agg(ns.id order by ns.position) as ids
  from new_steps ns
  group by ns.task_id
),
edge_input as (
  select * from unnest($8::int[], $9::int[], $10::int[]) as e(template_id, child, parent)
),
new_edges as (
  insert into step_edges (parent_id, child_id)
  select s.ids[e.parent + 1], s.ids[e.child + 1]
  from new_tasks nt
  join step_ids s on s.task_id = nt.id
  join edge_input e on e.template_id = nt.template_id
),
step_history as (
  insert into step_transitions (step_id, task_id, from_state, to_state, event, sort_key)
  select ns.id, ns.task_id, null, ns.state, 'created', 1 from new_steps ns
),
task_history as (
  insert into task_transitions (task_id, from_state, to_state, event, sort_key)
  select nt.id, null, 'pending', 'created', 1 from new_tasks nt
),
notified as (
  select pg_notify($6, $7) from new_tasks limit 1
)
select nt.id, (select count(*) from notified)::int as notified from new_tasks nt
