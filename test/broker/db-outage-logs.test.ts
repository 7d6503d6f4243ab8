/**
 * A database outage, seen in the log: the broker reaches PostgreSQL through
 * a TCP relay the test can cut. While it is cut, a flood of SUBMITs is each
 * answered internal_error, but the log says so once per interval with a
 * count, and carries no stack above debug level.
 */
import { strict as assert } from "node:assert";
import { once } from "node:events";
import { connect, createServer, type Socket } from "node:net";
import { parse } from "pg-connection-string";
import { pino } from "pino";
import { Broker } from "../../broker/Broker";
import { openDatabase } from "../../broker/db/openDatabase";
import { StateManager } from "../../broker/state/StateManager";
import { BrokerError, StepbrokerClient } from "../../handlers-node/client";
import { databaseUrl, dropSchema, uniqueSchemaName } from "../support/db";
import { FAST } from "../support/stack";

type Line = {
  level: number;
  msg: string;
  err?: { stack?: string };
  error?: { message?: string };
  suppressed?: number;
};

describe("a database outage in the broker's log (tcp://127.0.0.1)", function () {
  this.timeout(60_000);

  it("logs a failure repeated by every SUBMIT once per interval, with a count, and no stack above debug", async () => {
    const target = parse(databaseUrl());
    const socketPath = `${target.host}/.s.PGSQL.${target.port ?? 5432}`;
    let down = false;
    const open = new Set<Socket>();
    const relay = createServer((client) => {
      if (down) return void client.destroy();
      const server = connect({ path: socketPath });
      open.add(client).add(server);
      client.pipe(server).pipe(client);
      const close = (): void => {
        client.destroy();
        server.destroy();
        open.delete(client);
        open.delete(server);
      };
      client.on("error", close).on("close", close);
      server.on("error", close).on("close", close);
    });
    relay.listen(0, "127.0.0.1");
    await once(relay, "listening");
    const port = (relay.address() as { port: number }).port;
    const url = `postgresql://${encodeURIComponent(target.user ?? "")}:${encodeURIComponent(target.password ?? "")}@127.0.0.1:${port}/${target.database ?? ""}`;

    const schema = uniqueSchemaName("db_outage");
    const db = await openDatabase({ databaseUrl: url, schema, poolSize: 4 });
    const sm = new StateManager(db);
    await sm.migrate();
    await sm.registerTemplate({
      namespace: "out",
      name: "one",
      version: "1",
      steps: [{ name: "s", handler: "h" }],
    });
    const lines: Line[] = [];
    const logger = pino({ level: "info" }, { write: (l: string) => void lines.push(JSON.parse(l) as Line) });
    const broker = new Broker({
      endpoints: ["tcp://127.0.0.1:*"],
      state: sm,
      logger,
      ...FAST,
      pollMs: 60_000,
    });
    await broker.start();
    const client = new StepbrokerClient({ endpoint: broker.endpoints[0]!, requestTimeoutMs: 10_000 });
    try {
      down = true;
      for (const s of open) s.destroy();
      const codes = await Promise.all(
        Array.from({ length: 200 }, () =>
          client.submit({ namespace: "out", name: "one" }, {}).then(
            () => "created",
            (e: unknown) => (e instanceof BrokerError ? e.code : String(e)),
          ),
        ),
      );
      assert.ok(
        codes.every((c) => c === "internal_error"),
        `every SUBMIT is answered internal_error: ${[...new Set(codes)]}`,
      );
      const serve = lines.filter((l) => l.msg.startsWith("failed to serve SUBMIT"));
      assert.equal(serve.length, 1, `one line for 200 failures in the interval: ${serve.length}`);
      assert.equal(serve[0]!.level, 50);
      assert.equal(typeof serve[0]!.error?.message, "string", "the line says what failed");
      const withStack = lines.filter((l) => l.level > 20 && JSON.stringify(l).includes('"stack"'));
      assert.deepEqual(withStack, [], "no stack above debug level");
    } finally {
      down = false;
      client.close();
      await broker.stop({ drainMs: 0 });
      const summary = lines.find((l) => l.msg.includes('similar lines for "failed to serve SUBMIT'));
      assert.ok(
        summary && (summary.suppressed ?? 0) >= 199,
        `the summary counts the rest: ${JSON.stringify(summary)}`,
      );
      await sm.close();
      relay.close();
      await dropSchema(schema);
    }
  });
});
