/**
 * A broker in a child process (test/broker/fixtures/broker-process.ts), for
 * tests that kill it with SIGKILL and start it again on the same endpoint.
 * The child uses the test's DATABASE_URL and the schema it is given.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { createServer } from "node:net";
import { join } from "node:path";
import { createInterface } from "node:readline";

const BROKER_FIXTURE = join(import.meta.dirname, "..", "broker", "fixtures", "broker-process.ts");

export interface BrokerProcessOptions {
  /** A fixed endpoint (see freeTcpEndpoint) so a restarted broker is found where the pools look. */
  endpoint: string;
  schema: string;
  /** Keep it across restarts: a restarted broker recognises its previous life's leases by it. */
  brokerId: string;
  heartbeatMs?: number;
  recoveryGraceMs?: number;
  /** A directory of template JSON files the broker registers before serving. */
  templatesDir?: string;
  timeoutMs?: number;
  /** Extra environment, e.g. STEPBROKER_LOG_LEVEL: "info" to have its logs for a failure message. */
  env?: NodeJS.ProcessEnv;
}

export interface BrokerProcess {
  readonly child: ChildProcess;
  /** The endpoint it bound, as printed on its READY line. */
  readonly endpoint: string;
  /** The last 8 kB of its stderr (its logs), for failure messages. */
  stderr(): string;
  /** SIGTERM, then SIGKILL if it has not exited 5 s later. */
  stop(): Promise<void>;
  /** SIGKILL: no goodbye, no hand-back, leases left as they are. */
  kill9(): Promise<void>;
}

/**
 * A loopback TCP endpoint whose port was free a moment ago (the kernel picked
 * it for a listener we closed at once). Brokers restarted in a test bind it
 * again, so pools that reconnect to it find the new one.
 */
export async function freeTcpEndpoint(): Promise<string> {
  const server = createServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const address = server.address();
  server.close();
  await once(server, "close");
  if (address === null || typeof address === "string") throw new Error("could not read the free port");
  return `tcp://127.0.0.1:${address.port}`;
}

/** Starts a broker process and resolves once it printed READY (bound and serving). */
export async function spawnBrokerProcess(opts: BrokerProcessOptions): Promise<BrokerProcess> {
  const args = [
    "--import",
    "tsx",
    BROKER_FIXTURE,
    "--endpoint",
    opts.endpoint,
    "--schema",
    opts.schema,
    "--broker-id",
    opts.brokerId,
  ];
  if (opts.heartbeatMs !== undefined) args.push("--heartbeat-ms", String(opts.heartbeatMs));
  if (opts.recoveryGraceMs !== undefined) args.push("--recovery-grace-ms", String(opts.recoveryGraceMs));
  if (opts.templatesDir !== undefined) args.push("--templates", opts.templatesDir);
  const child = spawn(process.execPath, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, ...opts.env },
  });
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-8000)));
  const exited = once(child, "exit");
  const gone = (): boolean => child.exitCode !== null || child.signalCode !== null;
  const timeoutMs = opts.timeoutMs ?? 20_000;
  let endpoint: string;
  try {
    endpoint = await new Promise<string>((resolve, reject) => {
      const lines = createInterface({ input: child.stdout! });
      const timer = setTimeout(
        () => reject(new Error(`broker process did not print READY within ${timeoutMs} ms: ${stderr}`)),
        timeoutMs,
      );
      lines.on("line", (line) => {
        const m = /^READY (.+)$/.exec(line.trim());
        if (m) {
          clearTimeout(timer);
          resolve(m[1]!);
        }
      });
      child.once("exit", (code, signal) => {
        clearTimeout(timer);
        reject(new Error(`broker process exited (${code ?? signal}) before READY: ${stderr}`));
      });
    });
  } catch (e) {
    if (!gone()) {
      child.kill("SIGKILL");
      await exited;
    }
    throw e;
  }
  return {
    child,
    endpoint,
    stderr: () => stderr,
    async stop() {
      if (gone()) return;
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(t);
    },
    async kill9() {
      if (gone()) return;
      child.kill("SIGKILL");
      await exited;
    },
  };
}
