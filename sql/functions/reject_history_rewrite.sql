-- reject_history_rewrite: Trigger function: raises check_violation when a history row (a finished attempt, a transition) would be rewritten.
-- Used by the append-only triggers on step_attempts, step_transitions and task_transitions; returns nothing, always raises.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0001.
--
-- History is insert-only (0013): no attempt or transition row is ever updated.
create or replace function reject_history_rewrite() returns trigger
language plpgsql
as $$
begin
  raise exception '% rows are append-only', tg_table_name using errcode = 'check_violation';
end
$$;
