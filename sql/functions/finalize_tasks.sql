-- finalize_tasks: Ends each given task none of whose steps can still run: complete, or error naming the failed steps. Call with the tasks locked.
-- (p_task_ids uuid[]) -> table (task_id uuid, state text, error jsonb), one row per task it ended.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0005.
--
-- Ends each given task none of whose steps can still run: complete when every step is complete or
-- resolved_manually, else error naming the steps that failed. Call with the tasks locked.
-- Returns (task_id, state, error) for each task it ended.
create or replace function finalize_tasks(p_task_ids uuid[]) returns table (task_id uuid, state text, error jsonb)
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
