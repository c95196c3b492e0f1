#!/usr/bin/env node
// The main job's demo: appends a few thousand events to a journal in a temp dir with group commit,
// replays them, verifies the chain and prints what it did.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { count, lastValueFrom } from 'rxjs';
import { Journal } from '@cowstack/journal';

const dir = mkdtempSync(join(tmpdir(), 'cowstack-demo-'));
const journal = await Journal.open(dir, { create: true });
const started = performance.now();
const seqs = await Promise.all(Array.from({ length: 5000 }, (_, i) => journal.append(['write', i * 4096, 4096], { payload: Buffer.alloc(4096, i & 0xff), sync: i % 100 === 0 })));
const appendMs = performance.now() - started;
const replayed = await lastValueFrom(journal.replay().pipe(count()));
const report = await journal.verify();
const stats = await journal.stats();
console.log(`journal ${dir}: appended seq ${seqs[0]}..${seqs.at(-1)} in ${appendMs.toFixed(0)} ms, replayed ${replayed} records, verify ${report.ok ? 'ok' : 'FAILED'}, ${(stats.diskBytes / 1048576).toFixed(1)} MiB on disk`);
await journal.close();
rmSync(dir, { recursive: true, force: true });
