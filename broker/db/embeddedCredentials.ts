/**
 * The embedded PostgreSQL's secrets and whereabouts, kept beside its data
 * directory in one file only the broker's OS user may read (mode 0600): the
 * superuser's password (used by the embedded setup alone), the password of the
 * `stepbroker` role the broker connects as, and the socket directory and port
 * the running server listens on. Other stepbroker commands of the same OS user
 * (`stepbroker status` next to `stepbroker start`) read it to find the server.
 */
import { randomBytes } from "node:crypto";
import fs from "node:fs/promises";
import path from "node:path";

/** The bootstrap superuser initdb creates; only the embedded setup connects as it. */
export const EMBEDDED_SUPERUSER = "postgres";
/** The role the broker connects as: LOGIN, not superuser, owner of its schemas only. */
export const EMBEDDED_ROLE = "stepbroker";
/** The database both connect to. */
export const EMBEDDED_DATABASE = "postgres";

export interface EmbeddedCredentials {
  /** Password of EMBEDDED_SUPERUSER. */
  readonly superuserPassword: string;
  /** Password of EMBEDDED_ROLE. */
  readonly rolePassword: string;
  /** Directory of the server's Unix socket (as of its last start). */
  readonly socketDir: string;
  /** The port number in the socket's name (.s.PGSQL.<port>); no TCP port is open. */
  readonly port: number;
}

/** `<parent>/<name>.credentials.json` for data directory `<parent>/<name>`. */
export function credentialsFile(dataDir: string): string {
  const resolved = path.resolve(dataDir);
  return path.join(path.dirname(resolved), `${path.basename(resolved)}.credentials.json`);
}

/** 32 random bytes as hex: nothing to escape in a URL or in SQL. */
export function randomPassword(): string {
  return randomBytes(32).toString("hex");
}

/**
 * The credentials, or undefined when the file does not exist or this OS user
 * cannot read it (another user's broker). A file others could read, or one
 * owned by someone else, is refused: its secrets may be known, or planted.
 */
export async function readCredentials(file: string): Promise<EmbeddedCredentials | undefined> {
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(file, "r");
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === "ENOENT" || code === "EACCES") return undefined;
    throw err;
  }
  try {
    const stat = await handle.stat();
    const uid = process.getuid?.();
    if (uid !== undefined && stat.uid !== uid) {
      throw new Error(
        `${file} belongs to uid ${stat.uid}, not to this user (uid ${uid}): remove it, or run stepbroker as its owner`,
      );
    }
    if ((stat.mode & 0o077) !== 0) {
      throw new Error(
        `${file} is readable by other users (mode ${(stat.mode & 0o777).toString(8)}): its passwords may be known; ` +
          `remove it and restart to generate new ones`,
      );
    }
    const parsed = JSON.parse(await handle.readFile("utf8")) as Partial<
      Record<keyof EmbeddedCredentials, unknown>
    >;
    const { superuserPassword, rolePassword, socketDir, port } = parsed;
    if (
      typeof superuserPassword !== "string" ||
      typeof rolePassword !== "string" ||
      typeof socketDir !== "string" ||
      typeof port !== "number"
    ) {
      throw new Error(
        `${file} lacks superuserPassword, rolePassword, socketDir or port: remove it and restart`,
      );
    }
    return { superuserPassword, rolePassword, socketDir, port };
  } finally {
    await handle.close();
  }
}

/**
 * Writes the file with mode 0600 from its first byte (never briefly readable
 * by others), through a temporary file and a rename so a reader never sees
 * half of it.
 */
export async function writeCredentials(file: string, credentials: EmbeddedCredentials): Promise<void> {
  const temp = `${file}.${randomBytes(6).toString("hex")}.tmp`;
  await fs.writeFile(temp, `${JSON.stringify(credentials, null, 2)}\n`, { mode: 0o600, flag: "wx" });
  try {
    await fs.rename(temp, file);
  } catch (err) {
    await fs.rm(temp, { force: true });
    throw err;
  }
}

/**
 * A libpq-style URL for `user` on the Unix socket in `socketDir` (host and port
 * as query parameters, which both node-postgres and psql accept).
 */
export function socketUrl(user: string, password: string, socketDir: string, port: number): string {
  return (
    `postgresql://${user}:${encodeURIComponent(password)}@/${EMBEDDED_DATABASE}` +
    `?host=${encodeURIComponent(socketDir)}&port=${port}`
  );
}
