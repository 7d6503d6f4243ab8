-- claim_steps: Claims up to p_most ready steps whose handler is in p_handlers (among p_step_ids when given, never those in p_avoid) for one pool, one attempt each under a lease.
-- The contract is sql/queries/claim_steps.sql's (its only caller); complete_results() claims children itself and returns their STEP fields in this row type.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0006; its signature changed in 0010; its row type (claimed_step) grew in 0012; insert-only history and the attempt on the lease since 0013; one statement since issue 16; the `claimed` and `started` transitions written when what they begin ends since 0016; the inputs read in the statement unless its snapshot shows a parent unfinished since then.
--
-- Claims up to p_most ready steps (highest priority, then longest ready) whose handler is in
-- p_handlers, among p_step_ids only when given; see sql/queries/claim_steps.sql for the contract.
-- plpgsql, not sql: its statement plans are cached for the session on every server version.
--
-- Plan shape (this is the hot path): big tables are only ever reached by primary-key or partial-index
-- probes for the rows at hand: `= any(array(...))`, a LATERAL ... LIMIT 1 probe per row, or as the
-- inner side of UPDATE ... FROM a small CTE. No two CTEs are joined to each other (a nested loop over
-- CTE scans would be quadratic).
--
-- One statement since issue 16. Until then the STEP fields were read by a statement of their own,
-- `steps join tasks` by `= any(v_ids)` and `= any(v_task_ids)`: from a connection's sixth call its
-- generic plan (10 rows guessed a side) was a nested loop with the tasks side materialized and the
-- join as a Join Filter, every claimed step compared with every task: 1,967,136 rows removed to
-- claim 1,984 steps (auto_explain on the broker's connections, bench/stepbroker.ts one-step run).
-- That read alone, no write, took 2,446 ms of claim_steps()' 7,059 ms in PostgreSQL over 20,000
-- one-step tasks (122 us a row). Now the step's fields come from the UPDATE's RETURNING and each
-- task is one primary-key probe.
-- Measured on a loaded 2-core machine (load average 4 to 9), two interleaved pairs each, PostgreSQL
-- CPU per step from /proc: one-step tasks (20,000) 295 / 293.5 us before, 248.5 / 235.5 after;
-- diamonds (5,000 tasks, 20,000 steps) 327 / 354.5 before, 291.5 / 303 after; bench/run.ts one-step
-- row 329 / 301 before, 233 / 259.5 after. In pg_stat_statements (one-step) the claim's three
-- statements took 6,998 / 10,047 ms against 6,480 / 7,160 ms for the one statement (wall time
-- inside PostgreSQL, inflated by waits for CPU); its WAL is the same, 1.9 kB a step.
create or replace function claim_steps(
  p_broker_id text, p_handlers text[], p_most integer, p_step_ids uuid[], p_pool_id text,
  p_avoid uuid[] default null
) returns setof claimed_step
language plpgsql volatile
as $$
begin
  -- One statement: the claim, the task start and the STEP fields. Every CTE runs once
  -- (a data-modifying CTE always does, to completion), whether or not the select reads it.
  return query
  with picked as (
    -- any ready step: walk the ready index in priority order (see pick_ready_steps.sql)
    select p.id from pick_ready_steps(p_handlers, p_most, p_avoid) as p(id)
    where p_step_ids is null
    union all
    -- only the given steps (children just readied): a few primary-key probes
    select given.id from (
      select s.id
      from steps s
      where p_step_ids is not null
        and s.id = any(p_step_ids)
        and s.state = 'ready'
        and s.run_at <= now()
        and s.handler = any(p_handlers)
      order by s.priority desc, s.run_at
      limit p_most
      for update skip locked
    ) as given
  ),
  claimed as (
    update steps s
    set state = 'in_progress',
        attempts = s.attempts + 1,
        history_seq = s.history_seq + 1,
        lease_attempt_id = new_id(),
        lease_broker_id = p_broker_id,
        lease_pool_id = p_pool_id,
        lease_started_at = now(),
        lease_expires_at = now() + s.timeout_ms * interval '1 millisecond'
    where s.id = any(array(select p.id from picked p))
    -- the STEP's own fields come from the new row version: no second probe of steps
    returning s.id, s.task_id, s.attempts, s.lease_attempt_id, s.history_seq, s.name, s.handler,
              s.max_attempts, s.timeout_ms, s.config, s.lease_expires_at, s.priority, s.run_at, s.position
  ),
  -- The attempt's row is written when it ends (0013), and so is the step's `claimed` transition
  -- (0016): the lease holds what it says, and history_seq, bumped above, keeps its sort_key.
  -- Measured (bench/stepbroker.ts, 20,000 one-step tasks, two interleaved pairs): 4,911 / 4,943
  -- steps/s with the transition written here, 5,951 / 6,244 without; PostgreSQL CPU 258 / 258.5
  -- against 220.5 / 193.5 us a step. The same rows are written, but by the one backend that stores
  -- results, in an insert it makes anyway, not by two backends appending to the same index pages.
  -- SKIP LOCKED here too: a claim never waits, so claims cannot deadlock on task rows.
  -- Whoever holds a pending task's lock is another claim starting it, or a cancel. (A task row
  -- that changed since this statement's snapshot is re-read at its latest version by the lock.)
  -- The task's `started` transition is written with its next one, from started_at (0016).
  started as (
    update tasks t set state = 'in_progress', history_seq = t.history_seq + 1, started_at = now()
    where t.id = any(array(
      select t2.id from tasks t2
      where t2.id = any(array(select distinct c.task_id from claimed c)) and t2.state = 'pending'
      order by t2.id
      for update skip locked
    ))
  )
  select c.task_id, c.id as step_id, c.lease_attempt_id as attempt_id, c.name as step_name, c.handler,
         c.attempts as attempt, c.max_attempts, c.timeout_ms,
         t.template,
         t.context,
         c.config,
         -- The parents' outputs, read by key in this statement when its snapshot already shows
         -- every parent finished (their outputs are then final); step_inputs() reads them with a
         -- snapshot of its own, taken after the pick, only when it does not: a child readied by a
         -- result that committed after this statement began (see step_inputs.sql). A volatile
         -- function call costs an executor start per row: about 40 us of a claim's 250 us per
         -- step, measured on one-step tasks (which have no parents, and skip the probe), and
         -- about 45 us a child claimed here in diamond runs (pg_stat_statements).
         case when t.step_count = 1 then '{}'::jsonb
              else (select case when bool_and(p.state in ('complete', 'resolved_manually')) is distinct from false
                                then coalesce(jsonb_object_agg(p.name, coalesce(p.output, 'null'::jsonb)), '{}'::jsonb)
                                else step_inputs(c.id) end
                    from step_edges e join steps p on p.id = e.parent_id
                    where e.child_id = c.id)
         end as inputs,
         c.lease_expires_at,
         -- steps waiting on this one: the broker sets credit aside for them when the result comes
         -- (the step of a one-step task has none: tasks.step_count, 0014, spares the probe)
         case when t.step_count = 1 then 0
              else (select count(*)::int from step_edges e where e.parent_id = c.id) end as children,
         -- the task's trace context, for the attempt's (PROTOCOL.md, Trace context)
         t.traceparent, t.tracestate
  from claimed c
  -- One primary-key probe of the task (and of its template) per claimed step. LIMIT keeps the
  -- subquery from being flattened into a join: as a join, the generic plan (estimated 10 rows a
  -- side) was a nested loop comparing every claimed step with every task read (Join Filter),
  -- 2 million comparisons for a claim of 2,000. Task rows are read as this statement's snapshot
  -- has them: the columns read here never change, and every claimed step's task is in it.
  cross join lateral (
    select t.context, t.step_count, t.traceparent, t.tracestate,
           (select jsonb_build_object('namespace', tt.namespace, 'name', tt.name, 'version', tt.version)
            from task_templates tt where tt.id = t.template_id) as template
    from tasks t
    where t.id = c.task_id
    limit 1
  ) t
  -- in dispatch order (the update returns rows in the order it found them)
  order by c.priority desc, c.run_at, c.task_id, c.position;
end
$$;
