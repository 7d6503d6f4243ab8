-- 0012_task_trace_context: a task keeps the W3C trace context it was submitted with, and a claim returns it.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- SUBMIT may carry a traceparent (and a tracestate); every STEP item carries its attempt's trace
-- context, built by the broker from the task's (PROTOCOL.md, Trace context). Stored on the task so
-- that an attempt dispatched after a restart, or by another broker, is still a span of the
-- caller's trace. Null for a task submitted without one: its trace id is derived from its id, so
-- nothing needs storing (and tasks created before this migration are traced the same way).
alter table tasks
  add column traceparent text,
  add column tracestate text;

-- The claim already joins the task row for its context and template: two more columns of the
-- same row, no further probe. Added at the end, so claim_steps() and complete_results() (in
-- sql/functions/) build the type with its fields in this order.
alter type claimed_step
  add attribute traceparent text,
  add attribute tracestate text;
