-- 0010_retries_avoid_the_pool_that_timed_out: claims can skip named steps.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- A step whose attempt timed out at a pool is better retried by another pool (the first one may
-- be a zombie: it heartbeats, but its handler never returns). The broker names such steps when it
-- claims for that pool, while another pool could take them, and the claim skips them. That adds a
-- parameter to claim_steps() and pick_ready_steps(); the old signatures are dropped here, and the
-- new definitions are in sql/functions/ (applied after the migrations).
drop function if exists claim_steps(text, text[], integer, uuid[], text);
drop function if exists pick_ready_steps(text[], integer);
