-- pick_ready_steps: Locks and returns up to `most` ready step ids whose handler is in `handlers`, highest priority then longest ready, skipping locked rows and the steps in `avoid`.
-- (handlers text[], most int, avoid uuid[] default null) -> setof uuid. Called by claim_steps(); its own settings force the ordered walk of steps_ready.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0004; its signature changed in 0010.
--
-- 0004_ordered_ready_walk: dispatch walks the ready index in order, whatever the planner's statistics say.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- Tasks arrive in bursts: thousands of ready steps can exist before autovacuum has analyzed `steps`
-- once. With no statistics the planner guesses a handful of ready rows, and for "the first N by
-- (priority desc, run_at)" it then prefers reading every ready row through a bitmap and sorting them
-- over walking steps_ready in order and stopping after N. Each claim so cost time in proportion to
-- the whole queue (measured: 7.4 ms per claim of 64 with 22,000 ready steps, against 0.1 ms for
-- the ordered walk), and draining a queue became quadratic.
--
-- The walk lives in a function whose own settings rule out the sort, so its plan is the index walk
-- on any statistics. (Settings on a function stop it from being inlined; that is the point here.)
create or replace function pick_ready_steps(handlers text[], most integer, avoid uuid[] default null)
returns setof uuid
language sql volatile
set enable_sort = off
as $$
  select s.id
  from steps s
  where s.state = 'ready'
    and s.run_at <= now()
    and s.handler = any(handlers)
    and (avoid is null or s.id <> all(avoid))
  order by s.priority desc, s.run_at
  limit most
  for update skip locked
$$;
