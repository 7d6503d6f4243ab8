/**
 * One workflow across three languages at once: a Node.js pool, a Python pool
 * and a Ruby pool (each its SDK's test pool, a child process) connected to one
 * broker over tcp on loopback, each serving a different step of the template:
 *
 *   node_step (Node) ──> python_step (Python) ──┐
 *                   └──> ruby_step   (Ruby)   ──┴──> join (Node)
 *
 * so every language both consumes another language's stored output and
 * produces output another language consumes. Run with JSON and with
 * MessagePack between the broker and the Python and Ruby pools.
 */
import { strict as assert } from "node:assert";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import type { TaskView } from "../../protocol";
import { ensurePython, ensureRuby, pythonTestPoolArgs, rubyTestPoolArgs } from "../support/languages";
import {
  eventually,
  spawnNodePool,
  spawnPool,
  stepOf,
  useBrokerStack,
  type ChildPool,
} from "../support/stack";

// The Ruby test pool serves its built-ins under their own names only (no
// name=builtin aliases), so ruby_step's handler is the built-in `echo`; no
// other pool here serves `echo`, so routing alone decides which pool runs it.
const THREE = {
  namespace: "xlang",
  name: "three",
  version: "1",
  steps: [
    { name: "node_step", handler: "node_step" },
    { name: "python_step", handler: "python_step", depends_on: ["node_step"] },
    { name: "ruby_step", handler: "echo", depends_on: ["node_step"] },
    { name: "join", handler: "join", depends_on: ["python_step", "ruby_step"] },
  ],
};

/** Values that must survive JSON and MessagePack through all three languages. */
const CONTEXT = {
  order: 7,
  customer: "Zoë Ångström ✓",
  ratio: 0.25,
  big: 2 ** 40,
  negative: -12,
  tags: ["a", "b", ""],
  nested: { ok: true, no: false, none: null, empty_list: [], empty_map: {} },
};

type Output = {
  inputs?: Record<string, unknown>;
  context?: unknown;
  lang?: string;
  step?: { handler?: string; stepName?: string };
};

/**
 * The language an output says produced it: the Python and Ruby test pools'
 * echo writes `lang`; the Node fixture's echo writes its step as seen by the
 * Node SDK (camelCase ids), which no other SDK does.
 */
function languageOf(output: Output): string {
  if (typeof output.lang === "string") return output.lang;
  if (output.step?.stepName !== undefined) return "node";
  return "unknown";
}

describe("a workflow served by Node, Python and Ruby pools at once", function () {
  this.timeout(60_000);
  const stack = useBrokerStack("xlang", "tcp");
  const pools: ChildPool[] = [];
  let python: string;
  let ruby: string;

  before(async function () {
    python = await ensurePython(this);
    ruby = await ensureRuby(this);
    await stack.registerTemplate(THREE);
  });
  afterEach(async function () {
    this.timeout(30_000);
    await Promise.all(pools.splice(0).map((p) => p.stop()));
  });

  for (const encoding of ["json", "msgpack"] as const) {
    it(`gives each step its parents' stored outputs across the language boundaries (${encoding} to Python and Ruby)`, async () => {
      const id = randomBytes(3).toString("hex");
      const ids = { node: `node-${id}`, python: `py-${id}`, ruby: `rb-${id}` };
      pools.push(
        await spawnNodePool(stack.endpoint, [
          "--handlers",
          "node_step=echo,join=echo",
          "--capacity",
          "2",
          "--pool-id",
          ids.node,
        ]),
      );
      pools.push(
        await spawnPool(
          python,
          pythonTestPoolArgs(stack.endpoint, join(stack.tmp, `py-state-${randomBytes(3).toString("hex")}`), [
            "--handlers",
            "python_step=echo",
            "--capacity",
            "2",
            "--pool-id",
            ids.python,
            "--encoding",
            encoding,
          ]),
        ),
      );
      pools.push(
        await spawnPool(
          ruby,
          rubyTestPoolArgs(stack.endpoint, [
            "--handlers",
            "echo",
            "--capacity",
            "2",
            "--pool-id",
            ids.ruby,
            "--encoding",
            encoding,
            "--log-level",
            "warn",
          ]),
        ),
      );
      // The Python and Ruby pools print READY before their WELCOME: wait until the broker lists all three.
      const listed = await eventually("all three pools to be welcomed", () => {
        const view = stack.broker.listPools().filter((p) => Object.values(ids).includes(p.pool_id));
        return view.length === 3 ? view : undefined;
      });
      const languageOfPool = new Map(listed.map((p) => [p.pool_id, p.sdk.language]));
      assert.deepEqual(
        Object.fromEntries(listed.map((p) => [p.pool_id, [p.sdk.language, p.encoding]])),
        { [ids.node]: ["node", "json"], [ids.python]: ["python", encoding], [ids.ruby]: ["ruby", encoding] },
        "each pool says its language and the encoding it asked for",
      );

      const { task } = await stack.broker.submit({ namespace: "xlang", name: "three", context: CONTEXT });
      const done: TaskView = await stack.waitForTask(task.task_id, 30_000);
      assert.equal(done.state, "complete", JSON.stringify(done));

      const out = (name: string): Output => stepOf(done, name).output as Output;
      const expected: Record<string, string> = {
        node_step: "node",
        python_step: "python",
        ruby_step: "ruby",
        join: "node",
      };
      for (const [name, lang] of Object.entries(expected)) {
        assert.equal(languageOf(out(name)), lang, `${name}'s output says it ran in ${lang}`);
        assert.deepEqual(out(name).context, CONTEXT, `${name} received the task context intact`);
      }
      assert.deepEqual(out("node_step").inputs, {}, "the root step has no inputs");
      assert.deepEqual(
        out("python_step").inputs,
        { node_step: out("node_step") },
        "Python received Node's stored output",
      );
      assert.deepEqual(
        out("ruby_step").inputs,
        { node_step: out("node_step") },
        "Ruby received Node's stored output",
      );
      assert.deepEqual(
        out("join").inputs,
        { python_step: out("python_step"), ruby_step: out("ruby_step") },
        "Node received Python's and Ruby's stored outputs",
      );

      // Where each step ran, by the broker's own record of attempts.
      const attempts = await stack.sm.getAttempts(task.task_id);
      assert.equal(attempts.length, 4, "one attempt per step");
      for (const a of attempts) {
        assert.equal(a.outcome, "complete", `${a.stepName} completed`);
        assert.equal(
          languageOfPool.get(a.poolId ?? ""),
          expected[a.stepName],
          `${a.stepName} ran on the ${expected[a.stepName]} pool`,
        );
      }
    });
  }
});
