#!/usr/bin/env node
// Runs every test in one uvu process: unit tests beside each package (packages/*/test) and the
// end-to-end tests in test/. Builds first (the e2e tests drive the built CLI), runs test sources
// through tsx with the "source" export condition, and stops the whole run if it exceeds
// testRunTimeoutMs. Arguments narrow the run: `pnpm test journal` runs files whose path matches.
import { spawn, spawnSync } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const testRunTimeoutMs = 60 * 60 * 1000;
const root = join(dirname(fileURLToPath(import.meta.url)), '..');

const build = spawnSync('pnpm', ['-s', 'build'], { cwd: root, stdio: 'inherit' });
if (build.status !== 0) process.exit(build.status ?? 1);

const filter = process.argv[2];
const pattern = filter ? `${filter}.*\\.test\\.ts$|[^/]*${filter}[^/]*\\.test\\.ts$` : '\\.test\\.ts$';
const child = spawn(
  process.execPath,
  ['--conditions=source', '--import', 'tsx', join(root, 'node_modules/uvu/bin.js'), '.', pattern, '-i', 'dist', '-c', String(Boolean(process.stdout.isTTY))],
  { cwd: root, stdio: 'inherit', env: { ...process.env, COWSTACK_ROOT: root } },
);
const timer = setTimeout(() => {
  console.error(`test run exceeded ${testRunTimeoutMs / 60000} minutes; stopping it`);
  child.kill('SIGKILL');
}, testRunTimeoutMs);
child.on('exit', (code, signal) => {
  clearTimeout(timer);
  process.exit(code ?? (signal ? 1 : 0));
});
