/**
 * The dashboard's files, read once at start and served from memory with a
 * content security policy that allows nothing from elsewhere.
 */
import { readdirSync, readFileSync } from "node:fs";
import type { ServerResponse } from "node:http";
import { extname, join } from "node:path";
import { HttpError } from "./HttpError";

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
};

export class StaticFiles {
  private readonly files = new Map<string, { body: Buffer; type: string }>();

  constructor(dir: string) {
    this.load(dir);
  }

  private load(dir: string): void {
    let names: string[];
    try {
      names = readdirSync(dir);
    } catch {
      return; // no dashboard files: the API still serves
    }
    for (const name of names) {
      const type = TYPES[extname(name)];
      if (type) this.files.set(`/${name}`, { body: readFileSync(join(dir, name)), type });
    }
  }

  serve(res: ServerResponse, path: string): void {
    const file = this.files.get(path === "/" ? "/index.html" : path);
    if (!file) throw new HttpError(404, "not_found", `no file ${path}; the dashboard is at /`);
    res.writeHead(200, {
      "Content-Type": file.type,
      "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
      "X-Frame-Options": "DENY",
    });
    res.end(file.body);
  }
}
