-- step_inputs: The outputs of a step's parents as one JSON object keyed by parent name (null for a parent without output): the `inputs` of a STEP.
-- (child uuid) -> jsonb. Volatile, so it reads with a snapshot taken after the claim that picked the child.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0004.
--
-- A volatile function reads with a snapshot of its own, taken when it runs: so pick_ready_steps can
-- claim a child readied by a completion that committed after the claim statement began. The
-- statement's own snapshot would then still show that child's parents unfinished, without outputs.
-- The outputs a STEP carries are therefore read here, with a snapshot taken after the pick, which
-- sees every parent the pick saw completed. Parents are reached by primary key: a join let the
-- planner, on missing statistics, hash all of steps for every claimed child.
create or replace function step_inputs(child uuid) returns jsonb
language sql volatile
as $$
  select coalesce(jsonb_object_agg(p.name, coalesce(p.output, 'null'::jsonb)), '{}'::jsonb)
  from steps p
  where p.id = any(array(select e.parent_id from step_edges e where e.child_id = child))
$$;
