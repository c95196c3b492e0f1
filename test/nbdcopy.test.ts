/**
 * nbdcopy with 4 connections (multi-conn) and many requests in flight, in both directions: a file
 * into a volume that already holds other data (nbdcopy zeroes the image's holes), the volume back out
 * to a file, and a snapshot export into another volume of the same server. Every result is compared
 * byte for byte, read back with a different client (libnbd pread from Python). Then `cowstack export`
 * and `cowstack import` (through the control socket) against the same bytes.
 */
import { strict as assert } from 'node:assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { cowstackOk, initStore, killAll, MiB, pattern, readExport, runOk, sameBytes, sparseImage, startServe, tempDir } from './harness.js';

const sizeBytes = 64 * MiB;

test.after.each(killAll);

test('nbdcopy --connections 4: file → export → file, and snapshot → volume', async () => {
  const dir = tempDir('nbdcopy');
  const store = await initStore({ size: '64M' });
  // -v: the server logs each connection, so the test can see that nbdcopy really opened 4.
  const server = await startServe(store, { args: ['-v'] });
  const connections = (): number => (server.stderr().match(/nbd connection \d+: serving export/g) ?? []).length;
  const uri = server.uri('default');

  const old = join(dir, 'old.raw');
  writeFileSync(old, pattern(sizeBytes, 21));
  const image = sparseImage(sizeBytes, 22, 40);
  pattern(8 * MiB + 3, 23).copy(image, 20 * MiB - 1);
  const imageFile = join(dir, 'image.raw');
  writeFileSync(imageFile, image);

  // file → export, twice: dense old data first, then the sparse image over it.
  // (nbdcopy opens no more connections than threads, and defaults threads to the number of CPUs.)
  await runOk('nbdcopy', ['--connections', '4', '--threads', '4', '--requests', '32', '--flush', old, uri]);
  assert.equal(connections(), 4, `nbdcopy should have opened 4 connections:\n${server.stderr()}`);
  await runOk('nbdcopy', ['--connections', '4', '--threads', '4', '--requests', '32', '--request-size', '1048576', '--flush', imageFile, uri]);
  sameBytes(await readExport(uri), image, 'export after nbdcopy file → export');

  // export → file
  const out = join(dir, 'out.raw');
  writeFileSync(out, '');
  const before = connections();
  await runOk('nbdcopy', ['--connections', '4', '--threads', '4', '--requests', '32', uri, out]);
  assert.equal(connections() - before, 4, 'nbdcopy export → file should have opened 4 connections');
  sameBytes(readFileSync(out), image, 'file after nbdcopy export → file');

  // snapshot export → another volume on the same server, while the source volume changes.
  await cowstackOk(['snapshot', store, 'default', '--name', 'copied']);
  await cowstackOk(['volume', 'create', store, 'target', '--size', '64M']);
  await runOk('nbdcopy', ['--connections', '4', '--threads', '4', old, uri]);
  await runOk('nbdcopy', ['--connections', '4', '--threads', '4', '--requests', '16', server.uri('default@copied'), server.uri('target')]);
  sameBytes(await readExport(server.uri('target')), image, 'volume after nbdcopy snapshot → volume');
  sameBytes(await readExport(uri), readFileSync(old), 'source volume after it was overwritten');

  // The CLI's own copy paths agree, through the control socket while serving: export a snapshot to
  // a raw file, import that file as a new volume (which appears as an export at once).
  const exported = join(dir, 'exported.raw');
  await cowstackOk(['export', store, 'default@copied', exported]);
  sameBytes(readFileSync(exported), image, 'cowstack export of the snapshot');
  await cowstackOk(['import', store, exported, '--volume', 'imported']);
  sameBytes(await readExport(server.uri('imported')), image, 'volume imported while serving');

  await server.stop();
});

test.run();
