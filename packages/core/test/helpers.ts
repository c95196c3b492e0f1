/** Test helpers: temp directories removed at exit, and whole-device reads as one Buffer. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import type { ReadResult } from '../src/index.js';

const made: string[] = [];
process.on('exit', () => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

export function tempDir(label = 'core'): string {
  const dir = mkdtempSync(join(tmpdir(), `cowstack-${label}-`));
  made.push(dir);
  return dir;
}

/** Flatten a ReadResult (a Buffer, or data/zero pieces) into one Buffer. */
export function flat(result: ReadResult): Buffer {
  if (Buffer.isBuffer(result)) return result;
  return Buffer.concat(result.map((p) => p.data ?? Buffer.alloc(p.length)));
}

/** fc.assert, with the failing run's own error message (uvu does not print causes). */
export async function checkProperty<T>(property: fc.IAsyncProperty<T>, params: fc.Parameters<T>): Promise<void> {
  try {
    await fc.assert(property, params);
  } catch (err) {
    const cause = (err as Error).cause as Error | undefined;
    throw new Error(`${(err as Error).message}\nFailing run's error: ${cause?.stack ?? String(cause)}`);
  }
}
