/**
 * The roles of the embedded server: the superuser (used by the embedded setup
 * alone), the non-superuser `stepbroker` role the broker connects as, and the
 * upgrade of a data directory an earlier stepbroker ran as superuser.
 */
import pg from "pg";
import {
  EMBEDDED_DATABASE,
  EMBEDDED_ROLE,
  EMBEDDED_SUPERUSER,
  type EmbeddedCredentials,
} from "./embeddedCredentials";

/**
 * The superuser password every data directory initialised before the
 * credentials file existed was given. It is only ever tried to upgrade such a
 * directory (over the private socket), and replaced at once.
 */
const LEGACY_SUPERUSER_PASSWORD = "stepbroker";
/**
 * Gives every schema an earlier stepbroker created as the superuser (and all
 * in it) to the `stepbroker` role, so the broker, no longer superuser, still
 * owns its tables. System schemas and `public` stay as they are.
 */
export const GIVE_SCHEMAS_TO_ROLE = `
do $$
declare
  s record;
  o record;
begin
  for s in
    select n.oid, n.nspname from pg_namespace n
    where n.nspowner = '${EMBEDDED_SUPERUSER}'::regrole
      and n.nspname !~ '^pg_' and n.nspname not in ('information_schema', 'public')
  loop
    execute format('alter schema %I owner to ${EMBEDDED_ROLE}', s.nspname);
    -- a table's identity sequences, indexes and row type follow the table
    for o in
      select c.oid, c.relkind from pg_class c
      where c.relnamespace = s.oid and c.relowner = '${EMBEDDED_SUPERUSER}'::regrole
        and c.relkind in ('r', 'p', 'f', 'v', 'm', 'c')
    loop
      execute format(
        case o.relkind
          when 'v' then 'alter view %s owner to ${EMBEDDED_ROLE}'
          when 'm' then 'alter materialized view %s owner to ${EMBEDDED_ROLE}'
          when 'c' then 'alter type %s owner to ${EMBEDDED_ROLE}'
          else 'alter table %s owner to ${EMBEDDED_ROLE}'
        end,
        o.oid::regclass);
    end loop;
    for o in
      select c.oid from pg_class c
      where c.relnamespace = s.oid and c.relowner = '${EMBEDDED_SUPERUSER}'::regrole and c.relkind = 'S'
        and not exists (select from pg_depend d where d.objid = c.oid and d.deptype in ('a', 'i'))
    loop
      execute format('alter sequence %s owner to ${EMBEDDED_ROLE}', o.oid::regclass);
    end loop;
    for o in
      select p.oid from pg_proc p
      where p.pronamespace = s.oid and p.proowner = '${EMBEDDED_SUPERUSER}'::regrole
    loop
      execute format('alter routine %s owner to ${EMBEDDED_ROLE}', o.oid::regprocedure);
    end loop;
    for o in
      select t.oid from pg_type t
      where t.typnamespace = s.oid and t.typowner = '${EMBEDDED_SUPERUSER}'::regrole and t.typtype in ('e', 'd', 'r')
    loop
      execute format('alter type %s owner to ${EMBEDDED_ROLE}', o.oid::regtype);
    end loop;
  end loop;
end $$`;

/**
 * Connects as the superuser with the credentials file's password; a directory
 * from before that file existed still has the fixed legacy password, which
 * is tried next (also when an earlier upgrade was interrupted). Says which one
 * worked.
 */
export async function connectSuperuser(
  socketDir: string,
  port: number,
  password: string,
  tryLegacy: boolean,
): Promise<{ client: pg.Client; legacy: boolean }> {
  const attempt = async (pw: string): Promise<pg.Client> => {
    const client = new pg.Client({
      host: socketDir,
      port,
      user: EMBEDDED_SUPERUSER,
      password: pw,
      database: EMBEDDED_DATABASE,
    });
    try {
      await client.connect();
    } catch (err) {
      await client.end().catch(() => undefined);
      throw err;
    }
    return client;
  };
  try {
    return { client: await attempt(password), legacy: false };
  } catch (err) {
    if (!tryLegacy || (err as { code?: string }).code !== "28P01") throw err;
    return { client: await attempt(LEGACY_SUPERUSER_PASSWORD), legacy: true };
  }
}

/**
 * The broker's role: may log in and create schemas in this database (its own,
 * and the per-file schemas of the tests), nothing more. Its password is set
 * on every start, so the credentials file is always the truth.
 */
export async function ensureRole(admin: pg.Client, credentials: EmbeddedCredentials): Promise<void> {
  await admin.query(`do $$ begin
    if not exists (select from pg_roles where rolname = '${EMBEDDED_ROLE}') then create role ${EMBEDDED_ROLE}; end if;
  end $$`);
  await admin.query(
    `alter role ${EMBEDDED_ROLE} with login nosuperuser nocreaterole nocreatedb noreplication nobypassrls password ${admin.escapeLiteral(credentials.rolePassword)}`,
  );
  await admin.query(`grant create on database ${EMBEDDED_DATABASE} to ${EMBEDDED_ROLE}`);
}
