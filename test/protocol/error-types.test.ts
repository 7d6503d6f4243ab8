/**
 * The error types the protocol reserves are one list: protocol/constants.ts,
 * the schema's $defs/reserved_error_type, and the SQL that writes the broker's
 * own. The Python and Ruby SDK suites check their constants against the same
 * schema entry.
 */
import { strict as assert } from "node:assert";
import { readFileSync } from "node:fs";
import { StepErrorTypes } from "../../protocol";

interface Reserved {
  const: string;
  description: string;
}

const common = JSON.parse(
  readFileSync(new URL("../../protocol/schemas/common.json", import.meta.url), "utf8"),
) as {
  $defs: { reserved_error_type: { oneOf: Reserved[] } };
};
const reserved = common.$defs.reserved_error_type.oneOf;

describe("reserved error types", () => {
  it("are the same in protocol/constants.ts and the schema, each saying who writes it", () => {
    assert.deepEqual(reserved.map((r) => r.const).sort(), Object.values(StepErrorTypes).sort());
    for (const r of reserved) assert.match(r.description, /^\((pool|broker)\) /, r.const);
  });

  it("include every type the broker's SQL writes for an attempt it ends itself", () => {
    const requeue = readFileSync(new URL("../../sql/queries/requeue_attempts.sql", import.meta.url), "utf8");
    const outcomes = /attempt outcome \(([a-z_ |]+)\)/.exec(requeue)?.[1]?.split(" | ") ?? [];
    assert.ok(outcomes.length > 0, "requeue_attempts.sql names the outcomes it writes as error types");
    const broker = reserved.filter((r) => r.description.startsWith("(broker)")).map((r) => r.const);
    assert.deepEqual(outcomes.sort(), broker.sort());
  });
});
