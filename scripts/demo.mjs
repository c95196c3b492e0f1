#!/usr/bin/env node
// The main job: serve a demo volume. Creates a 1 GiB store in .demo-store (or $COWSTACK_DEMO_STORE)
// on first run, with a "golden" snapshot and a clone "vm1", then runs `cowstack serve` on
// nbd://127.0.0.1:10809 (or $COWSTACK_DEMO_PORT) until Ctrl-C.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const cli = join(root, 'packages/cli/bin/cowstack.js');
const store = resolve(process.env.COWSTACK_DEMO_STORE ?? join(root, '.demo-store'));
const port = process.env.COWSTACK_DEMO_PORT ?? '10809';
const run = (...args) => {
  const r = spawnSync(process.execPath, [cli, ...args], { stdio: 'inherit' });
  if (r.status !== 0) process.exit(r.status ?? 1);
};

if (!existsSync(join(store, 'journal'))) {
  run('init', store, '--size', '1G');
  run('snapshot', store, 'default', '--name', 'golden');
  run('clone', store, 'default@golden', 'vm1');
}
console.log(`\nTry:  nbdinfo --list nbd://127.0.0.1:${port}     qemu-img info nbd://127.0.0.1:${port}/vm1`);
console.log(`      node_modules/.bin/cowstack ls ${store}    (works while serving, through the control socket)\n`);
run('serve', store, '--port', port);
