-- delete_task_history: Statement trigger function (after delete on tasks, transition table `gone`): deletes the transitions of deleted tasks.
-- Stands in for ON DELETE CASCADE, which task_transitions' foreign key gave before migration 0002 dropped it.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0002.
--
-- As delete_step_history: under retention's `stepbroker.history_drop_below`, rows below it are
-- left to the partition drop.
create or replace function delete_task_history() returns trigger
language plpgsql
as $$
declare
  v_keep_from timestamptz := nullif(current_setting('stepbroker.history_drop_below', true), '')::timestamptz;
begin
  if v_keep_from is null then
    delete from task_transitions t using gone g where t.task_id = g.id;
  else
    delete from task_transitions t using gone g where t.task_id = g.id and t.created_at >= v_keep_from;
  end if;
  return null;
end
$$;
