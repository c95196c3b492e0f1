/** Test helpers: temp directories that are removed when the test process exits. */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { lastValueFrom, toArray } from 'rxjs';
import type { Journal, JournalRecord } from '../src/index.js';

const made: string[] = [];
process.on('exit', () => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

export function tempDir(label = 'journal'): string {
  const dir = mkdtempSync(join(tmpdir(), `cowstack-${label}-`));
  made.push(dir);
  return dir;
}

export function replayAll<M>(journal: Journal<M>, from?: number, to?: number, payloads = true): Promise<JournalRecord<M>[]> {
  return lastValueFrom(journal.replay(from, to, { payloads }).pipe(toArray()));
}

/** What a full replay fails with (undefined when it succeeds). */
export function replayError<M>(journal: Journal<M>): Promise<unknown> {
  return lastValueFrom(journal.replay().pipe(toArray())).then(
    () => undefined,
    (e: unknown) => e,
  );
}
