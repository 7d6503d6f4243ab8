-- finalize_tasks: Ends each given task none of whose steps can still run: complete, or error naming the failed steps. Call with the tasks locked.
-- (p_task_ids uuid[]) -> table (task_id uuid, state text, error jsonb), one row per task it ended; NOTIFYs events_<schema> with kind finished.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0005; insert-only history since 0013; one pass over the steps since 0014; writes the task's `started` transition its claim left since 0016.
--
-- Ends each given task none of whose steps can still run: complete when every step is complete or
-- resolved_manually, else error naming the steps that failed. Call with the tasks locked.
-- Returns (task_id, state, error) for each task it ended.
create or replace function finalize_tasks(p_task_ids uuid[]) returns table (task_id uuid, state text, error jsonb)
language sql volatile
as $$
  -- One pass over each task's steps (steps_task_name) both decides whether it can end and sums
  -- it up. A separate "no step still runnable" test was an anti-join the planner ran as a hash
  -- of every ready and in-flight step of the table, read on each call.
  with summary as (
    select t.id, t.state as from_state,
           bool_and(s.state in ('complete', 'resolved_manually')) as all_done,
           coalesce(array_agg(s.name order by s.position) filter (where s.state = 'error'), '{}') as failed,
           (array_agg(s.error ->> 'message' order by s.position) filter (where s.state = 'error'))[1] as first_message
    from tasks t join steps s on s.task_id = t.id
    where t.id = any(p_task_ids)
      and t.state in ('pending', 'in_progress')
    group by t.id, t.state
    having not bool_or(s.state in ('ready', 'in_progress'))
  ),
  ended as (
    update tasks t
    set state = case when su.all_done then 'complete' else 'error' end,
        finished_at = now(),
        history_seq = t.history_seq + 1,
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
    returning t.id, t.state, t.error, t.history_seq, t.started_at, su.from_state
  ),
  -- The claim that started a task left its `started` transition to be written with the next one
  -- (0016), from started_at: a task starts at most once, from its first state, so `started` is
  -- its second transition, and it is missing when this update made history_seq 3 from a row the
  -- claim stamped (a task started before 0016 has started_at null, and its `started` row). An
  -- insert of its own, so that `history` returns the ends alone. (A data-modifying CTE always runs.)
  start_history as (
    insert into task_transitions (task_id, from_state, to_state, event, sort_key, created_at)
    select e.id, 'pending', 'in_progress', 'started', 2, e.started_at
    from ended e
    where e.history_seq = 3 and e.started_at is not null
  ),
  history as (
    insert into task_transitions (task_id, from_state, to_state, event, metadata, sort_key)
    select e.id, e.from_state, e.state, case e.state when 'complete' then 'completed' else 'failed' end,
           e.error, e.history_seq
    from ended e
    returning task_id, to_state, metadata
  ),
  -- Tells every broker on this database (EventNotifier, broker/state/), in this transaction, so one
  -- that holds a WAIT for the task answers at once. 100 tasks a payload (about 60 bytes each) stays
  -- under PostgreSQL's 8000-byte limit; the channel is EventNotifier's: events_<schema>, 63 at most.
  -- Built by concatenation, not json_build_object() and json_agg(): a uuid and a task state need no
  -- escaping, and the JSON functions cost about 10 us per task (measured on 2,048-task batches).
  notified as (
    select pg_notify(left('events_' || current_schema(), 63),
                     '{"kind":"finished","tasks":['
                     || string_agg('{"task_id":"' || c.task_id || '","state":"' || c.to_state || '"}', ',')
                     || ']}')
    from (select h.task_id, h.to_state, (row_number() over (order by h.task_id) - 1) / 100 as chunk from history h) c
    group by c.chunk
  )
  -- The count makes the notified CTE run (a plain select CTE runs only when referenced).
  select h.task_id, h.to_state as state, h.metadata as error
  from history h
  where (select count(*) from notified) >= 0
$$;
