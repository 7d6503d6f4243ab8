/**
 * The HTTP side beside a test broker: serveHttp on a free loopback port, and
 * a raw request helper (node:http, so tests can send any Host, Origin or body).
 */
import { request } from "node:http";
import { HttpAuth } from "../../broker/http/HttpAuth";
import type { HttpServerOptions } from "../../broker/http/HttpServer";
import { type HttpSide, serveHttp } from "../../broker/http/serveHttp";
import { silent, type Stack } from "../support/stack";

export const TOKEN = "test-token-0123456789abcdef";

export async function startHttp(
  stack: Stack,
  opts: { token?: string; running?: () => boolean; server?: Partial<HttpServerOptions> } = {},
): Promise<HttpSide> {
  const side = await serveHttp({
    broker: stack.broker,
    state: stack.sm,
    logger: silent,
    listen: "127.0.0.1:0",
    auth: new HttpAuth(opts.token),
    ...(opts.running ? { running: opts.running } : {}),
    server: { liveIntervalMs: 200, queueSampleMs: 100, ...opts.server },
  });
  if (!side) throw new Error("the HTTP server did not start");
  return side;
}

export interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
  json<T = Record<string, unknown>>(): T;
}

/** One request, bounded in time; `body` is sent as is (string or Buffer). */
export function raw(
  base: string,
  method: string,
  path: string,
  headers: Record<string, string> = {},
  body?: string | Buffer,
  timeoutMs = 10_000,
): Promise<Answer> {
  const url = new URL(path, base);
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers, timeout: timeoutMs }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        resolve({
          status: res.statusCode ?? 0,
          headers: res.headers,
          text,
          json: <T>() => JSON.parse(text) as T,
        });
      });
      res.on("error", reject);
    });
    req.on("timeout", () => req.destroy(new Error(`${method} ${path} timed out after ${timeoutMs} ms`)));
    // a server that refuses a large body early may close while we still write: the answer still arrives
    req.on("error", reject);
    req.end(body);
  });
}

export const get = (base: string, path: string, token?: string) =>
  raw(base, "GET", path, token ? { Authorization: `Bearer ${token}` } : {});

export const post = (base: string, path: string, body: unknown = {}, token?: string) =>
  raw(
    base,
    "POST",
    path,
    { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) },
    JSON.stringify(body),
  );

/** Parses the Prometheus text format strictly enough to catch a malformed line: family → samples. */
export function parseMetrics(text: string): Map<string, { labels: Record<string, string>; value: number }[]> {
  const out = new Map<string, { labels: Record<string, string>; value: number }[]>();
  const typed = new Set<string>();
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const t = /^# TYPE (\S+) (counter|gauge|histogram|summary|untyped)$/.exec(line);
    if (t) {
      typed.add(t[1]!);
      out.set(t[1]!, out.get(t[1]!) ?? []);
      continue;
    }
    if (line.startsWith("# HELP ")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (-?[0-9.e+-]+|NaN|\+Inf|-Inf)$/.exec(line);
    if (!m) throw new Error(`not a Prometheus sample line: ${JSON.stringify(line)}`);
    const name = m[1]!;
    const family =
      [...typed].find(
        (f) =>
          name === f ||
          (/^_(bucket|sum|count|total|created)$/.test(name.slice(f.length)) && name.startsWith(f)),
      ) ?? name;
    const labels: Record<string, string> = {};
    for (const lm of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g))
      labels[lm[1]!] = lm[2]!;
    const list = out.get(family) ?? [];
    list.push({ labels: name === family ? labels : { ...labels, __name__: name }, value: Number(m[3]) });
    out.set(family, list);
  }
  return out;
}
