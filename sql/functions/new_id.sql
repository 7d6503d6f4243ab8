-- new_id: a time-ordered UUID (version 7) for the ids the hot path creates, so inserts keep the index pages a batch touches together.
-- () -> uuid. PostgreSQL 18 has uuidv7(); on older servers the same layout is built from gen_random_uuid(). Both bodies are single SELECTs, so the planner inlines the call.
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); last defined by a migration in 0003.
do $$
begin
  if current_setting('server_version_num')::int >= 180000 then
    create or replace function new_id() returns uuid
    language sql volatile parallel safe
    as 'select uuidv7()';
  else
    create or replace function new_id() returns uuid
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
