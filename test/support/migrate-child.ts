/**
 * A separate process that migrates one schema: connects, prints "ready", waits
 * for a line on stdin (so two children start migrating at the same moment),
 * migrates, prints the applied migration names as JSON, and exits.
 * Usage: node --import tsx test/support/migrate-child.ts <database url> <schema>
 */
import readline from "node:readline";
import pg from "pg";
import { migrateSchema } from "../../broker/db/migrate";
import { connectionConfig } from "../../broker/db/openDatabase";

const [url, schema] = process.argv.slice(2);
if (url === undefined || schema === undefined) throw new Error("usage: migrate-child.ts <url> <schema>");
const client = new pg.Client(connectionConfig(url, schema));
await client.connect();
process.stdout.write("ready\n");
const lines = readline.createInterface({ input: process.stdin });
await new Promise<void>((resolve) => lines.once("line", () => resolve()));
lines.close();
try {
  const applied = await migrateSchema(client, schema);
  process.stdout.write(`${JSON.stringify(applied)}\n`);
} finally {
  await client.end();
}
