/**
 * Checks on the tables themselves, run after scenarios: the audit log agrees
 * with the current state columns, and the guarantees of DESIGN.md hold.
 */
import assert from "node:assert/strict";
import type { TestState } from "./db";

/** Anything that runs a query on the schema under test: a TestState, or a broker Stack. */
export type SchemaQuery = Pick<TestState, "sql">;

/**
 * DESIGN.md, "History is insert-only": for every step and task the chain of
 * transitions is continuous and ends in the row's state; exactly one complete
 * attempt per complete step and none for any other; no attempt open without
 * its step's lease. Holds at every commit, so it may run while work is in flight.
 */
export async function assertInvariants(t: SchemaQuery): Promise<void> {
  // exactly one most_recent transition per step and per task, and it names the current state
  const stepDrift = await t.sql<{ id: string; state: string; current: number; to_state: string | null }>(`
    select s.id, s.state, count(tr.*) filter (where tr.most_recent)::int as current,
           max(tr.to_state) filter (where tr.most_recent) as to_state
    from steps s left join step_transitions tr on tr.step_id = s.id
    group by s.id, s.state
    having count(tr.*) filter (where tr.most_recent) <> 1 or max(tr.to_state) filter (where tr.most_recent) <> s.state`);
  assert.deepEqual(stepDrift, [], "step state and most_recent transition disagree");
  const taskDrift = await t.sql<{ id: string }>(`
    select t.id from tasks t left join task_transitions tr on tr.task_id = t.id
    group by t.id, t.state
    having count(tr.*) filter (where tr.most_recent) <> 1 or max(tr.to_state) filter (where tr.most_recent) <> t.state`);
  assert.deepEqual(taskDrift, [], "task state and most_recent transition disagree");
  // sort keys run 1..n without gaps, and each transition starts where the previous one ended
  for (const [table, key] of [
    ["step_transitions", "step_id"],
    ["task_transitions", "task_id"],
  ] as const) {
    const gaps = await t.sql<Record<typeof key, string>>(`
      select ${key} from (
        select ${key}, sort_key, from_state, lag(to_state) over w as previous, row_number() over w as n
        from ${table} window w as (partition by ${key} order by sort_key)) x
      where sort_key <> n or from_state is distinct from previous`);
    assert.deepEqual(gaps, [], `${table} are not a contiguous chain`);
  }
  // exactly-once completion: one complete attempt per complete step, none elsewhere
  const completions = await t.sql<{ id: string; state: string; complete_attempts: number }>(`
    select s.id, s.state, count(a.*)::int as complete_attempts
    from steps s left join step_attempts a on a.step_id = s.id and a.outcome = 'complete'
    group by s.id, s.state
    having count(a.*) <> (case when s.state = 'complete' then 1 else 0 end)`);
  assert.deepEqual(completions, [], "a step whose complete attempts are not exactly one (complete) or none");
  // a complete step always has its output; only the lease holder is unfinished
  const noOutput = await t.sql(`select id from steps where state = 'complete' and not has_output`);
  assert.deepEqual(noOutput, []);
  const openAttempts = await t.sql<{ attempt_id: string }>(`
    select a.attempt_id from step_attempts a join steps s on s.id = a.step_id
    where a.finished_at is null and s.lease_attempt_id is distinct from a.attempt_id`);
  assert.deepEqual(openAttempts, [], "an unfinished attempt that does not hold its step's lease");
  // pending_parents counts exactly the parents not yet complete or resolved
  const parentDrift = await t.sql<{ id: string }>(`
    select s.id from steps s
    left join (select e.child_id, count(*) filter (where p.state not in ('complete', 'resolved_manually')) as n
               from step_edges e join steps p on p.id = e.parent_id group by e.child_id) unfinished
      on unfinished.child_id = s.id
    where s.state in ('pending', 'ready') and s.pending_parents <> coalesce(unfinished.n, 0)`);
  assert.deepEqual(parentDrift, [], "pending_parents drifted from the parents' states");
}
