-- 0014_task_step_count: a task knows how many steps it has, so a one-step task ends with its step's result.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- Ending a task took finalize_tasks() its own statement: the task probed, every step of the task
-- probed twice (is any still runnable? then the summary), a sort and an aggregate. For a task of
-- one step the result being stored already says all of it: that step is the task. With the count
-- on the task row, complete_results() ends such a task right after storing the result, with one
-- primary-key update of the row it locked and no read of its steps (measured on 20,000 one-step
-- tasks, claim + completion by 2048: see the commit that added this file).
--
-- A task's steps are all inserted with it (create_tasks) and never added or removed, so the count
-- never changes once written. Null: not known (the task is finished, or ends through
-- finalize_tasks() as before).
alter table tasks add column step_count integer;
alter table tasks add constraint tasks_step_count_positive check (step_count > 0);

-- Tasks still running get theirs; finished ones need none, and are left as they are (no rewrite
-- of a large history).
update tasks t
set step_count = (select count(*)::int from steps s where s.task_id = t.id)
where t.state in ('pending', 'in_progress');
