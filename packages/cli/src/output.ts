/**
 * Command output: human-readable text (aligned tables) by default, JSON with --json. Errors and
 * progress go to stderr so stdout stays machine-readable.
 */

export interface Column<T> {
  readonly header: string;
  readonly value: (row: T) => string;
  readonly align?: 'left' | 'right';
}

export function table<T>(rows: readonly T[], columns: readonly Column<T>[]): string {
  const cells = rows.map((row) => columns.map((c) => c.value(row)));
  const widths = columns.map((c, i) => Math.max(c.header.length, ...cells.map((r) => r[i].length)));
  const format = (values: string[]): string =>
    values
      .map((v, i) => (columns[i].align === 'right' ? v.padStart(widths[i]) : v.padEnd(widths[i])))
      .join('  ')
      .trimEnd();
  return [format(columns.map((c) => c.header)), ...cells.map(format)].join('\n');
}

export class Output {
  constructor(readonly json: boolean) {}

  /** Print a result: `text()` for humans, the value itself as JSON with --json. */
  result(value: unknown, text: () => string): void {
    if (this.json) process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
    else {
      const out = text();
      if (out !== '') process.stdout.write(`${out}\n`);
    }
  }

  /** One record of a stream: a JSON line with --json, else a text line. */
  line(value: unknown, text: string): void {
    process.stdout.write(this.json ? `${JSON.stringify(value)}\n` : `${text}\n`);
  }

  note(text: string): void {
    if (!this.json) process.stderr.write(`${text}\n`);
  }
}
