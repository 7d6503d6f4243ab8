/**
 * SQL identifiers (schema names, LISTEN channels) cannot be parameters, so the
 * few that are put into SQL text must pass this check first. Values never are.
 */
const IDENTIFIER = /^[a-z_][a-z0-9_]{0,62}$/;

export function assertIdentifier(name: string, what: string): string {
  if (!IDENTIFIER.test(name)) {
    throw new Error(
      `${what} ${JSON.stringify(name)} is not a plain SQL identifier: use lowercase letters, digits and _, ` +
        `starting with a letter or _, at most 63 characters`,
    );
  }
  return name;
}

/** A checked identifier, double-quoted (quoting is belt and braces: the check already excludes quotes). */
export function quoteIdentifier(name: string, what: string): string {
  return `"${assertIdentifier(name, what)}"`;
}
