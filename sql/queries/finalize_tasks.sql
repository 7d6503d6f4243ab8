-- Ends each given task none of whose steps can still run: complete when every step is complete or resolved_manually, else error naming the steps that failed. Call with the tasks locked. The statement is finalize_tasks() in sql/functions/finalize_tasks.sql (complete_results() calls it too).
-- $1 uuid[] task ids. Returns (task_id, state, error) for each task it ended.
select task_id, state, error from finalize_tasks($1::uuid[])
