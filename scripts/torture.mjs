#!/usr/bin/env node
// `pnpm torture`: the full-length reliability harnesses (crash torture, protocol fuzzing, soak), as
// opposed to the shortened forms `pnpm test` runs in CI. Each harness is a module under
// test/reliability/ with a `main()` that takes its full-length settings from the environment.
import { spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const build = spawnSync('pnpm', ['-s', 'build'], { cwd: root, stdio: 'inherit' });
if (build.status !== 0) process.exit(build.status ?? 1);
const dir = join(root, 'test/reliability');
const only = process.argv[2];
const harnesses = existsSync(dir) ? readdirSync(dir).filter((f) => /^[a-z-]+\.harness\.ts$/.test(f) && (!only || f.includes(only))) : [];
let failed = 0;
for (const file of harnesses) {
  console.log(`\n=== ${file} (full run) ===`);
  const r = spawnSync(process.execPath, ['--conditions=source', '--import', 'tsx', join(dir, file), '--full'], { cwd: root, stdio: 'inherit', env: { ...process.env, COWSTACK_ROOT: root } });
  if (r.status !== 0) failed++;
}
console.log(`\ntorture: ${harnesses.length - failed} harness(es) passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
