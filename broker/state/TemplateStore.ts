/**
 * Templates: registration (validated, idempotent per version) and lookup,
 * with every version seen kept in memory, since a version never changes.
 */
import { StateError } from "./errors";
import { TemplateError, TemplateErrorCodes, validateTemplate } from "./templates";
import type { StateSql } from "./StateSql";
import { type TemplateRow, iso } from "./rows";
import type { TemplateDefinition, TemplateRecord } from "./types";

export class TemplateStore {
  /** Registered templates by id and by "namespace\0name\0version": versions are immutable, so this never goes stale. */
  private readonly byKey = new Map<string, TemplateRecord>();
  constructor(private readonly sql: StateSql) {}

  private remember(row: TemplateRow): TemplateRecord {
    const record: TemplateRecord = {
      id: row.id,
      namespace: row.namespace,
      name: row.name,
      version: row.version,
      definition: row.definition,
      createdAt: iso(row.created_at),
    };
    this.byKey.set(`${row.namespace}\0${row.name}\0${row.version}`, record);
    this.byKey.set(`#${row.id}`, record);
    return record;
  }

  /**
   * Validates and registers a template. Registering the same definition again
   * returns the existing record; a different definition under a registered
   * namespace/name/version is refused (TemplateError template_conflict).
   */
  async register(definition: unknown): Promise<TemplateRecord> {
    const normalized = validateTemplate(definition);
    const values = [normalized.namespace, normalized.name, normalized.version, JSON.stringify(normalized)];
    // A concurrent registration of the same triple is invisible to the statement that waited for it: look again.
    for (let run = 0; run < 3; run++) {
      const [row] = await this.sql.run<TemplateRow & { inserted: boolean; same: boolean }>(
        "insert_template",
        values,
      );
      if (row === undefined) continue;
      if (!row.same) {
        const ref = `${normalized.namespace}/${normalized.name}@${normalized.version}`;
        throw new TemplateError(ref, [
          {
            code: TemplateErrorCodes.CONFLICT,
            path: "",
            message: `${ref} is already registered with a different definition; register a new version instead`,
          },
        ]);
      }
      if (row.inserted)
        this.sql.logger.info(
          { template: `${row.namespace}/${row.name}@${row.version}` },
          "registered template",
        );
      return this.remember(row);
    }
    throw new Error(
      `registering template ${normalized.namespace}/${normalized.name}@${normalized.version} kept conflicting`,
    );
  }

  /** A registered template; without a version, the one registered last. */
  async get(namespace: string, name: string, version?: string): Promise<TemplateRecord> {
    if (version !== undefined) {
      const cached = this.byKey.get(`${namespace}\0${name}\0${version}`);
      if (cached !== undefined) return cached;
    }
    const [row] = await this.sql.run<TemplateRow>("get_template", [namespace, name, version ?? null]);
    if (row === undefined) {
      throw new StateError(
        "unknown_template",
        `no template ${namespace}/${name}${version === undefined ? "" : `@${version}`} is registered`,
      );
    }
    return this.remember(row);
  }

  /** Every registered template, as registered (defaults filled in). */
  async list(): Promise<TemplateDefinition[]> {
    const rows = await this.sql.run<{ definition: TemplateDefinition }>("list_templates", []);
    return rows.map((r) => r.definition);
  }
}
