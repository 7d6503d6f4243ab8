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
 * attempt per complete step and none for any other; an attempt's row exactly
 * when it has ended. Holds at every commit, so it may run while work is in flight.
 */
export async function assertInvariants(t: SchemaQuery): Promise<void> {
  // the latest transition is the one whose sort_key is the row's history_seq, and it names the current
  // state; but what a claim begins is written when it ends (0016): a running attempt's `claimed`
  // transition (its step's history ends one before, in `ready`, unless it was leased before 0016,
  // when its claim wrote it), and a running task's `started` (its history ends in `pending`)
  for (const [table, history, key, deferred, before] of [
    [
      "steps",
      "step_transitions",
      "step_id",
      `r.lease_attempt_id is not null
       and not exists (select 1 from leases_claimed_before_0016 l where l.attempt_id = r.lease_attempt_id)`,
      "ready",
    ],
    ["tasks", "task_transitions", "task_id", "r.started_at is not null and r.history_seq = 2", "pending"],
  ] as const) {
    const drift = await t.sql<{ id: string; state: string; history_seq: number; last: number | null }>(`
      select r.id, r.state, r.history_seq, max(tr.sort_key) as last,
             max(tr.to_state) filter (where tr.sort_key = r.history_seq - d.behind) as to_state
      from ${table} r
      cross join lateral (select case when ${deferred} then 1 else 0 end as behind) d
      left join ${history} tr on tr.${key} = r.id
      group by r.id, r.state, r.history_seq, d.behind
      having max(tr.sort_key) is distinct from r.history_seq - d.behind
          or max(tr.to_state) filter (where tr.sort_key = r.history_seq - d.behind)
             is distinct from case when d.behind = 1 then '${before}' else r.state end`);
    assert.deepEqual(drift, [], `${table}: state and latest transition (sort_key = history_seq) disagree`);
  }
  // a task's start is its second transition, stamped with the claim's time when the claim left it
  const starts = await t.sql<{ task_id: string }>(`
    select tr.task_id from task_transitions tr join tasks r on r.id = tr.task_id
    where tr.event = 'started' and (tr.sort_key <> 2 or (r.started_at is not null and tr.created_at <> r.started_at))`);
  assert.deepEqual(starts, [], "a task's started transition is not its second, or not at its start");
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
  // a complete step always has its output
  const noOutput = await t.sql(`select id from steps where state = 'complete' and not has_output`);
  assert.deepEqual(noOutput, []);
  // an attempt is one row, written when it ends: none for the attempt a lease still holds, and one
  // for every other attempt that was claimed (whatever ends it writes the 'claimed' transition
  // naming it, and its claim did before 0016)
  const rowWhileLeased = await t.sql<{ attempt_id: string }>(`
    select a.attempt_id from step_attempts a join steps s on s.lease_attempt_id = a.attempt_id`);
  assert.deepEqual(rowWhileLeased, [], "a running attempt (its step's lease) already has its row");
  const missing = await t.sql<{ attempt_id: string }>(`
    select tr.attempt_id from step_transitions tr join steps s on s.id = tr.step_id
    where tr.event = 'claimed' and tr.attempt_id is distinct from s.lease_attempt_id
      and not exists (select 1 from step_attempts a where a.attempt_id = tr.attempt_id)`);
  assert.deepEqual(missing, [], "a claimed attempt that ended without its row");
  // and the other way: every ended attempt's claim is in its step's history, once
  const unclaimed = await t.sql<{ attempt_id: string; claims: number }>(`
    select a.attempt_id, count(tr.*)::int as claims
    from step_attempts a
    left join step_transitions tr on tr.step_id = a.step_id and tr.attempt_id = a.attempt_id and tr.event = 'claimed'
    group by a.attempt_id
    having count(tr.*) <> 1`);
  assert.deepEqual(unclaimed, [], "an ended attempt whose claim is not in its step's history exactly once");
  const duplicated = await t.sql<{ attempt_id: string }>(`
    select attempt_id from step_attempts group by attempt_id having count(*) > 1`);
  assert.deepEqual(duplicated, [], "an attempt with more than one row");
  // pending_parents counts exactly the parents not yet complete or resolved
  const parentDrift = await t.sql<{ id: string }>(`
    select s.id from steps s
    left join (select e.child_id, count(*) filter (where p.state not in ('complete', 'resolved_manually')) as n
               from step_edges e join steps p on p.id = e.parent_id group by e.child_id) unfinished
      on unfinished.child_id = s.id
    where s.state in ('pending', 'ready') and s.pending_parents <> coalesce(unfinished.n, 0)`);
  assert.deepEqual(parentDrift, [], "pending_parents drifted from the parents' states");
}
