/**
 * Mocha root hooks for the whole run: ONE embedded PostgreSQL (unless
 * DATABASE_URL is set), its URL put in process.env.DATABASE_URL for every test
 * file, stopped and its data directory deleted at the end. Each test file then
 * works in a schema of its own (see ./db.ts).
 *
 * DATABASE_URL connects as the non-superuser role the broker uses in
 * production, so the tests run with the privileges the broker really has;
 * DATABASE_ADMIN_URL (the superuser) is there for the few tests that need more
 * (loading auto_explain to read plans).
 */
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { type EmbeddedServer, startEmbeddedPostgres } from "../../broker/db/embedded";
import { stopOnSignals } from "../../broker/db/stopOnSignals";

let server: EmbeddedServer | undefined;
let tempDir: string | undefined;
let unhook: (() => void) | undefined;

export async function mochaGlobalSetup(): Promise<void> {
  if (process.env.DATABASE_URL) return;
  tempDir = await fs.mkdtemp(path.join(os.tmpdir(), "stepbroker-test-"));
  // Ctrl-C on a test run stops its server and removes its directory; mocha runs no teardown then
  unhook = stopOnSignals(mochaGlobalTeardown);
  // as root the server runs as user postgres, which must be able to enter the directory
  await fs.chmod(tempDir, 0o755);
  server = await startEmbeddedPostgres({
    dataDir: path.join(tempDir, "pgdata"),
    // a throwaway cluster: durability buys nothing here
    postgresFlags: [
      "-c",
      "fsync=off",
      "-c",
      "synchronous_commit=off",
      "-c",
      "full_page_writes=off",
      "-c",
      "max_connections=200",
    ],
  });
  process.env.DATABASE_URL = server.url;
  process.env.DATABASE_ADMIN_URL = server.adminUrl;
}

export async function mochaGlobalTeardown(): Promise<void> {
  unhook?.();
  unhook = undefined;
  try {
    await server?.stop();
  } finally {
    if (tempDir !== undefined) await fs.rm(tempDir, { recursive: true, force: true });
    server = undefined;
    tempDir = undefined;
    delete process.env.DATABASE_ADMIN_URL;
  }
}
