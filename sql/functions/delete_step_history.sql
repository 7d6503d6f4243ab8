-- delete_step_history: Statement trigger function (after delete on steps, transition table `gone`): deletes the attempts and transitions of deleted steps.
-- Stands in for ON DELETE CASCADE, which the history tables' foreign keys gave before migration 0002 dropped them.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0002.
create or replace function delete_step_history() returns trigger
language plpgsql
as $$
begin
  delete from step_attempts a using gone g where a.step_id = g.id;
  delete from step_transitions t using gone g where t.step_id = g.id;
  return null;
end
$$;
