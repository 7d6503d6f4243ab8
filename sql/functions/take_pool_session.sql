-- take_pool_session: Judges a HELLO's session against the one on record for its pool_id, and records it when it may take the pool_id.
-- (pool_id text, session_hash text or null) -> text outcome: none | new | same | held | released | replaced (below).
-- Live definition: applied after the numbered migrations whenever this file changes (broker/db/migrate.ts); its table is created by migration 0009.
--
-- Takes, keeps or refuses the pool_id for the session of a HELLO; p_session_hash null: a pool that
-- sends no session (an older SDK). Outcomes:
--   none      no session on record and none sent: as before sessions existed
--   new       no session on record: this one is recorded
--   same      the session on record: kept (a reconnect)
--   held      another session is on record and attempts of this pool_id still hold leases: refused
--   released  another session is on record, no lease is held, none sent: the record is dropped
--   replaced  another session is on record, no lease is held: this one replaces it (a restarted process)
-- Whether the pool_id is connected to this broker right now is the broker's to check, before this.
create or replace function take_pool_session(p_pool_id text, p_session_hash text) returns text
language plpgsql volatile
as $$
declare
  v_hash text;
begin
  -- HELLOs for one pool_id, from any broker on this database, are judged one at a time.
  perform pg_advisory_xact_lock(hashtext('stepbroker.pool_session'), hashtext(p_pool_id));
  select s.session_hash into v_hash from pool_sessions s where s.pool_id = p_pool_id;
  if not found then
    if p_session_hash is null then
      return 'none';
    end if;
    insert into pool_sessions (pool_id, session_hash) values (p_pool_id, p_session_hash);
    return 'new';
  end if;
  if v_hash = p_session_hash then
    update pool_sessions set updated_at = now() where pool_id = p_pool_id;
    return 'same';
  end if;
  -- In-flight steps are few (the steps_in_flight index); the pool an attempt was sent to is on its lease.
  if exists (
    select 1
    from steps s
    where s.state = 'in_progress' and s.lease_pool_id = p_pool_id
  ) then
    return 'held';
  end if;
  if p_session_hash is null then
    delete from pool_sessions where pool_id = p_pool_id;
    return 'released';
  end if;
  update pool_sessions set session_hash = p_session_hash, updated_at = now() where pool_id = p_pool_id;
  return 'replaced';
end;
$$;
