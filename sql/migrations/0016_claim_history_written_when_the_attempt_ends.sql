-- 0016_claim_history_written_when_the_attempt_ends: a step's `claimed` transition, and its task's `started`, are written by the statements that end them, stamped with the claim's time.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- Until now a claim wrote, for every step it leased, the lease (an update of the step) and the
-- step's `claimed` transition (an insert into a partitioned table and its primary key). The
-- lease already holds all that transition says: the attempt, its broker and the time it began.
-- So the claim now writes only the lease, and bumps the step's history_seq as before, which
-- reserves the transition's sort_key. Whatever ends the lease (a result, the reaper, a requeue,
-- a cancel) writes the `claimed` transition from the lease, at that sort_key and with
-- created_at = lease_started_at, beside its own, in the same statement. Temporal writes an
-- activity's ActivityTaskStarted with its end the same way. While the attempt runs, its step's
-- history holds every transition up to `ready`, and get_transitions shows the claim from the
-- lease; after any crash the lease is still there, and the reaper that ends it writes the row.
--
-- The steps leased when this migration runs had their `claimed` transition written by their
-- claim. Their attempt ids are kept here, so that what ends those leases does not write it a
-- second time. Nothing else is ever added; once those attempts end, their rows are inert, and
-- they are few (at most the work in flight at the upgrade).
create table leases_claimed_before_0016 (
  attempt_id uuid primary key
);

insert into leases_claimed_before_0016 (attempt_id)
select s.lease_attempt_id from steps s where s.lease_attempt_id is not null;

-- The same for a task: the claim that starts it updates its row (state, history_seq) and no
-- longer writes its `started` transition. It stamps the row's new started_at instead, and the
-- statement that writes the task's next transition (its end: complete_results, finalize_tasks,
-- cancel_task) writes `started` first, from started_at. A task starts at most once and only from
-- its first state, so `started` is always its second transition: it is missing exactly when
-- started_at is set and history_seq is 2. Tasks started before 0016 have started_at null, and
-- their `started` transition is there.
alter table tasks add column started_at timestamptz;
