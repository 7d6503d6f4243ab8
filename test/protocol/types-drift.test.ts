import { strict as assert } from "node:assert";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { generateTypes } from "../../scripts/generate-types";
import { loadSchemaFiles, SCHEMA_DIR } from "../../protocol/schemaFiles";
import {
  AckOutcomes,
  CancelReasons,
  COMMAND_SCHEMAS,
  Encodings,
  ERROR_CODES,
  ID_PATTERN,
  NAME_PATTERN,
  ResultStatuses,
  StepStates,
  TaskStates,
} from "../../protocol/constants";
import { TRACEPARENT } from "../../protocol/traceContext";

const common = loadSchemaFiles().find((f) => f.file === "common.json")!.schema as unknown as {
  $defs: Record<string, { enum?: string[]; pattern?: string }>;
};
const byFile = new Map(loadSchemaFiles().map((f) => [f.file, f.schema as Record<string, unknown>]));

function enumAt(file: string, path: string[]): string[] {
  let node: unknown = byFile.get(file);
  for (const key of path) node = (node as Record<string, unknown>)[key];
  return (node as { enum: string[] }).enum;
}

describe("protocol types and schemas stay in step", () => {
  it("types.generated.ts is what the schemas generate (run `npm run gen:types` after editing a schema)", async () => {
    const committed = readFileSync(join(SCHEMA_DIR, "..", "types.generated.ts"), "utf8");
    assert.equal(committed, await generateTypes());
  });

  it("the id, name and traceparent patterns the code checks by hand are the schema's", () => {
    // isPlainBody, salvageResults, the codec and the Node SDK test these without Ajv
    assert.equal(ID_PATTERN.source, common.$defs.id!.pattern);
    assert.equal(NAME_PATTERN.source, common.$defs.name!.pattern);
    assert.equal(TRACEPARENT.source, common.$defs.traceparent!.pattern);
  });

  it("the state vocabularies in constants.ts equal the schema enums", () => {
    assert.deepEqual(Object.values(StepStates), common.$defs.step_state!.enum);
    assert.deepEqual(Object.values(TaskStates), common.$defs.task_state!.enum);
    assert.deepEqual(Object.values(ResultStatuses), common.$defs.result_status!.enum);
    assert.deepEqual(Object.values(Encodings), common.$defs.encoding!.enum);
    const ackItem = ["properties", "acks", "items", "properties", "outcome"];
    assert.deepEqual(Object.values(AckOutcomes), enumAt("ack.json", ackItem));
    const cancelItem = ["properties", "cancels", "items", "properties", "reason"];
    assert.deepEqual(Object.values(CancelReasons), enumAt("cancel.json", cancelItem));
  });

  it("every command has a schema file and every schema file but common.json belongs to a command", () => {
    const files = new Set(loadSchemaFiles().map((f) => f.file));
    for (const file of Object.values(COMMAND_SCHEMAS)) assert.ok(files.has(file), `${file} is missing`);
    const used = new Set<string>([...Object.values(COMMAND_SCHEMAS), "common.json"]);
    for (const file of files) assert.ok(used.has(file), `${file} belongs to no command`);
  });

  it("every error code matches the schema's error_code pattern", () => {
    const pattern = new RegExp((common.$defs.error_code as { pattern: string }).pattern);
    for (const code of ERROR_CODES) assert.match(code, pattern);
  });
});
