-- 0003_time_ordered_ids: new_id(), a time-ordered UUID (version 7) for the ids the hot path creates.
-- Runs once, in a transaction under an advisory lock, with search_path set to the target schema. Never edit it once released.
--
-- Step and attempt ids were random (version 4): each insert, and each update that cannot be HOT,
-- put its primary-key entry on a random leaf page of an index as large as the history, and so did
-- every index that leads with a step or task id. Ids that grow with time keep the pages a batch
-- touches together and warm. Measured on claim + completion of one-step tasks by 256 (PostgreSQL 18,
-- durable): server CPU per step ~187 us -> ~153 us. A version 7 id still has 62 random bits.
-- PostgreSQL 18 has uuidv7(); on older servers the same layout is built from gen_random_uuid().
-- Both bodies are single SELECTs, so the planner inlines the call.
do $$
begin
  if current_setting('server_version_num')::int >= 180000 then
    create function new_id() returns uuid
    language sql volatile parallel safe
    as 'select uuidv7()';
  else
    create function new_id() returns uuid
    language sql volatile parallel safe
    as $body$
      select encode(
               set_bit(set_bit(
                 overlay(uuid_send(gen_random_uuid())
                         placing substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)
                         from 1 for 6),
                 52, 1), 53, 1),
               'hex')::uuid
    $body$;
  end if;
end
$$;
