-- reject_illegal_move: Trigger function: raises check_violation for a state move the steps_legal_moves / tasks_legal_moves triggers' WHEN clause did not list.
-- TG_ARGV[0] names the table kind ('step' or 'task') for the message; fires only on an illegal move, so legal updates pay nothing.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0001.
--
-- The legal moves, the same as broker/state/transitions.ts. The triggers fire
-- only on an illegal move (the WHEN clause does the test), so legal updates pay nothing.
create or replace function reject_illegal_move() returns trigger
language plpgsql
as $$
begin
  raise exception 'illegal % state move % -> % (id %)', tg_argv[0], old.state, new.state, old.id
    using errcode = 'check_violation';
end
$$;
