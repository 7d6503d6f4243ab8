-- delete_task_history: Statement trigger function (after delete on tasks, transition table `gone`): deletes the transitions of deleted tasks.
-- Stands in for ON DELETE CASCADE, which task_transitions' foreign key gave before migration 0002 dropped it.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0002.
create or replace function delete_task_history() returns trigger
language plpgsql
as $$
begin
  delete from task_transitions t using gone g where t.task_id = g.id;
  return null;
end
$$;
