/**
 * The Python and Ruby SDKs ask for trace context in HELLO and hand it to
 * handlers (PROTOCOL.md, Trace context): each SDK's test pool (a child
 * process) runs its built-in echo, which returns `step.trace` as the SDK
 * parsed it, against a real broker over tcp, in JSON and MessagePack.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { attemptSpanId } from "../../protocol";
import { ensurePython, ensureRuby, pythonTestPoolArgs, rubyTestPoolArgs } from "../support/languages";
import { spawnPool, useBrokerStack, type ChildPool } from "../support/stack";

const TRACE_ID = "0af7651916cd43dd8448eb211c80319c";
const TRACEPARENT = `00-${TRACE_ID}-b7ad6b7169203331-01`;

const TEMPLATES = [
  { namespace: "trsdk", name: "py", version: "1", steps: [{ name: "only", handler: "py_echo" }] },
  { namespace: "trsdk", name: "rb", version: "1", steps: [{ name: "only", handler: "echo" }] },
];

type EchoTrace = { traceparent: string; trace_id: string; span_id: string } | null;

describe("trace context in the Python and Ruby SDKs", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("trsdk", "tcp");
  const pools: ChildPool[] = [];
  let python: string;
  let ruby: string;

  before(async function () {
    python = await ensurePython(this);
    ruby = await ensureRuby(this);
    for (const t of TEMPLATES) await stack.registerTemplate(t);
  });
  afterEach(async function () {
    this.timeout(30_000);
    await Promise.all(pools.splice(0).map((p) => p.stop()));
  });

  for (const encoding of ["json", "msgpack"] as const) {
    it(`gives Python and Ruby handlers the task's trace id and the attempt's span (${encoding})`, async () => {
      const id = randomBytes(3).toString("hex");
      pools.push(
        await spawnPool(
          python,
          pythonTestPoolArgs(stack.endpoint, join(stack.tmp, `py-state-${id}`), [
            "--handlers",
            "py_echo=echo",
            "--pool-id",
            `py-${id}`,
            "--encoding",
            encoding,
          ]),
        ),
        await spawnPool(
          ruby,
          rubyTestPoolArgs(stack.endpoint, [
            "--handlers",
            "echo",
            "--pool-id",
            `rb-${id}`,
            "--encoding",
            encoding,
            "--log-level",
            "warn",
          ]),
        ),
      );
      for (const [name, lang] of [
        ["py", "python"],
        ["rb", "ruby"],
      ] as const) {
        const { task } = await stack.broker.submit({
          namespace: "trsdk",
          name,
          context: {},
          traceparent: TRACEPARENT,
        });
        const done = await stack.waitForTask(task.task_id, 20_000);
        assert.equal(done.state, "complete", `${lang}: ${JSON.stringify(done)}`);
        const only = done.steps?.find((s) => s.name === "only");
        const output = only?.output as { lang: string; trace: EchoTrace };
        assert.equal(output.lang, lang);
        const [attempt] = await stack.sql<{ attempt_id: string }>(
          "select attempt_id::text from step_attempts where task_id = $1",
          [task.task_id],
        );
        const span = attemptSpanId(attempt!.attempt_id);
        assert.deepEqual(
          output.trace,
          { traceparent: `00-${TRACE_ID}-${span}-01`, trace_id: TRACE_ID, span_id: span },
          `${lang} handler's step.trace`,
        );
      }
    });
  }
});
