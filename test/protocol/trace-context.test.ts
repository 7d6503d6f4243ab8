/**
 * The trace ids PROTOCOL.md ("Trace context") defines, computed here the
 * slow, obvious way and compared with the broker's: a task's own trace id is
 * its task_id's hex, an attempt's span id the first 8 bytes of SHA-256 of its
 * attempt_id.
 */
import { strict as assert } from "node:assert";
import { createHash, randomUUID } from "node:crypto";
import { attemptSpanId, attemptTrace, taskTrace } from "../../protocol/traceContext";

describe("trace context ids", () => {
  it("gives an attempt the first 16 hex digits of SHA-256 of its id as its span id", () => {
    for (let i = 0; i < 200; i++) {
      const id = randomUUID();
      assert.equal(attemptSpanId(id), createHash("sha256").update(id, "utf8").digest("hex").slice(0, 16));
    }
  });

  it("gives a task submitted without a traceparent its id's hex, lowercase, whatever the id's form", () => {
    const id = randomUUID();
    const hex = id.replace(/-/g, "");
    assert.equal(taskTrace(id, null).traceId, hex);
    assert.equal(taskTrace(id.toUpperCase(), null).traceId, hex);
    assert.equal(taskTrace(hex.toUpperCase(), null).traceId, hex);
    // hyphens elsewhere than the canonical places still all go
    assert.equal(taskTrace(`${hex.slice(0, 4)}-${hex.slice(4, 20)}-${hex.slice(20)}`, null).traceId, hex);
    assert.deepEqual(taskTrace(id, null), { traceId: hex, flags: "01" });
  });

  it("builds the STEP traceparent from the task's trace and the attempt's span", () => {
    const taskId = randomUUID();
    const attemptId = randomUUID();
    assert.deepEqual(attemptTrace(taskId, attemptId, null, "k=v"), {
      traceparent: `00-${taskId.replace(/-/g, "")}-${attemptSpanId(attemptId)}-01`,
    });
    const parent = `00-${"ab".repeat(16)}-${"cd".repeat(8)}-00`;
    assert.deepEqual(attemptTrace(taskId, attemptId, parent, "k=v"), {
      traceparent: `00-${"ab".repeat(16)}-${attemptSpanId(attemptId)}-00`,
      tracestate: "k=v",
    });
  });
});
