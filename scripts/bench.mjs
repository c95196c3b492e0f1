#!/usr/bin/env node
// `pnpm bench`: the side-by-side NBD benchmark (bench/compare.ts), the recovery benchmark
// (bench/recovery.ts) and the fleet memory benchmark (bench/clones-rss.ts), against the built
// packages. Environment knobs are documented in each file.
import { spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const build = spawnSync('pnpm', ['-s', 'build'], { cwd: root, stdio: 'inherit' });
if (build.status !== 0) process.exit(build.status ?? 1);
for (const script of ['bench/compare.ts', 'bench/recovery.ts', 'bench/clones-rss.ts']) {
  const r = spawnSync(process.execPath, ['--import', 'tsx', join(root, script)], { cwd: root, stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
}
