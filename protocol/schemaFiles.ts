/**
 * Loads the JSON Schemas in protocol/schemas/ from disk. The JSON files are
 * the source of truth: SDKs in other languages read the same files.
 */
import { readFileSync, readdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const SCHEMA_DIR = join(dirname(fileURLToPath(import.meta.url)), "schemas");
export const SCHEMA_ID_PREFIX = "urn:stepbroker:1:";

export interface SchemaFile {
  file: string;
  schema: Record<string, unknown> & { $id: string };
}

export function loadSchemaFiles(): SchemaFile[] {
  return readdirSync(SCHEMA_DIR)
    .filter((f) => f.endsWith(".json"))
    .sort()
    .map((file) => ({ file, schema: JSON.parse(readFileSync(join(SCHEMA_DIR, file), "utf8")) }));
}
