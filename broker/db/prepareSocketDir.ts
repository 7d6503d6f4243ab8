/**
 * How the embedded server can be reached: only through a Unix socket in a
 * directory no other user can enter, and only with a password (pg_hba.conf).
 */
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import type { Logger } from "./logger";
import type { UserIds } from "./postgresUserIds";

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

export interface SocketDir {
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
export async function prepareSocketDir(
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
export async function writeHba(
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
