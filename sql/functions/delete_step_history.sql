-- delete_step_history: Statement trigger function (after delete on steps, transition table `gone`): deletes the attempts and transitions of deleted steps.
-- Stands in for ON DELETE CASCADE, which the history tables' foreign keys gave before migration 0002 dropped them.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0002.
--
-- Retention (HistoryPartitions.prune) deletes old finished tasks and then drops the history
-- partitions below a bound; rows below it are the drop's to remove, and deleting them row by row
-- would probe every one of those partitions. It sets `stepbroker.history_drop_below` for its
-- transaction, and only rows at or above it are deleted here (partition pruning skips the rest).
create or replace function delete_step_history() returns trigger
language plpgsql
as $$
declare
  v_keep_from timestamptz := nullif(current_setting('stepbroker.history_drop_below', true), '')::timestamptz;
begin
  if v_keep_from is null then
    delete from step_attempts a using gone g where a.step_id = g.id;
    delete from step_transitions t using gone g where t.step_id = g.id;
  else
    delete from step_attempts a using gone g where a.step_id = g.id and a.finished_at >= v_keep_from;
    delete from step_transitions t using gone g where t.step_id = g.id and t.created_at >= v_keep_from;
  end if;
  return null;
end
$$;
