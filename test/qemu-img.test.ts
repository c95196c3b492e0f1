/**
 * qemu-img against `cowstack serve`: convert a raw image into a volume export (over data already
 * there, so qemu-img's zeroing of the image's holes must take effect), compare it both with
 * `qemu-img compare` and byte for byte, convert the export back out to a file, and check that
 * `qemu-img compare` notices a one-byte change (so the comparison can fail).
 */
import { strict as assert } from 'node:assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { cowstack, cowstackOk, initStore, killAll, MiB, pattern, readExport, run, runOk, sameBytes, sparseImage, startServe, tempDir } from './harness.js';

const sizeBytes = 32 * MiB;

test.after.each(killAll);

test('qemu-img convert into an export over old data, compare, and convert back out', async () => {
  const dir = tempDir('qemu-img');
  const store = await initStore({ size: '32M' });
  const server = await startServe(store);
  const uri = server.uri('default');

  // Old content everywhere: the image's holes must overwrite it with zeroes.
  const old = join(dir, 'old.raw');
  writeFileSync(old, pattern(sizeBytes, 99));
  await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', old, uri]);
  sameBytes(await readExport(uri), readFileSync(old), 'export after writing the old content');

  const image = sparseImage(sizeBytes, 3, 24);
  // A dense, unaligned run in the middle and data in the very last bytes.
  pattern(3 * MiB + 777, 5).copy(image, 9 * MiB + 123);
  pattern(4097, 6).copy(image, sizeBytes - 4097);
  const imageFile = join(dir, 'image.raw');
  writeFileSync(imageFile, image);

  // -W -m 8: out-of-order writes on 8 coroutines, so requests overlap on the connection.
  await runOk('qemu-img', ['convert', '-n', '-W', '-m', '8', '-f', 'raw', '-O', 'raw', imageFile, uri]);
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageFile, uri]);
  assert.equal(cmp.code, 0, `qemu-img compare image vs export: ${cmp.stdout}${cmp.stderr}`);
  assert.match(cmp.stdout, /Images are identical/);
  sameBytes(await readExport(uri), image, 'export after qemu-img convert (read with libnbd)');

  // The other direction: export → a new file.
  const out = join(dir, 'out.raw');
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
  sameBytes(readFileSync(out), image, 'file converted out of the export');
  const cmpOut = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, out]);
  assert.equal(cmpOut.code, 0, `qemu-img compare export vs converted file: ${cmpOut.stdout}${cmpOut.stderr}`);

  // A qcow2 made from the export holds the same bytes.
  const qcow = join(dir, 'out.qcow2');
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', uri, qcow]);
  const cmpQcow = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', qcow, imageFile]);
  assert.equal(cmpQcow.code, 0, `qemu-img compare qcow2 vs image: ${cmpQcow.stdout}${cmpQcow.stderr}`);

  // The comparison can fail: change one byte in a hole of the image, through the export.
  const at = image.indexOf(Buffer.alloc(8192)) + 4096 + 17;
  assert.equal(image[at], 0);
  await runOk('qemu-io', ['-f', 'raw', '-c', `write -P 0x5a ${at} 1`, uri]);
  const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', imageFile, uri]);
  assert.equal(differ.code, 1, `qemu-img compare should report a difference: ${differ.stdout}${differ.stderr}`);
  const mismatch = /Content mismatch at offset (\d+)!/.exec(differ.stdout);
  assert.ok(mismatch !== null, differ.stdout);
  const reported = Number(mismatch[1]);
  assert.ok(reported <= at && at - reported < 4096, `mismatch reported at ${reported}, the byte changed is at ${at}`);
  image[at] = 0x5a;
  sameBytes(await readExport(uri), image, 'export after the one-byte write');

  await server.stop();
});

test('qemu-img convert out of an imported store and of a snapshot export', async () => {
  const dir = tempDir('qemu-img');
  const image = sparseImage(16 * MiB, 11, 12);
  const imageFile = join(dir, 'base.raw');
  writeFileSync(imageFile, image);
  const store = await initStore({ import: imageFile });
  const server = await startServe(store);
  // The imported base reads back as the image.
  sameBytes(await readExport(server.uri('default')), image, 'volume on an imported base');

  // Overwrite the volume after a snapshot: the snapshot export keeps the image.
  await cowstackOk(['snapshot', store, 'default', '--name', 'golden']);
  const other = join(dir, 'other.raw');
  writeFileSync(other, pattern(16 * MiB, 12));
  await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', other, server.uri('default')]);

  const out = join(dir, 'golden.raw');
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', server.uri('default@golden'), out]);
  sameBytes(readFileSync(out), image, 'snapshot converted out');
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', server.uri('default@golden'), imageFile]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  const cmpVol = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', server.uri('default'), other]);
  assert.equal(cmpVol.code, 0, cmpVol.stdout + cmpVol.stderr);
  await server.stop();
});

test('an external base image: read through, copy-up on write, never written, refused once changed', async () => {
  const dir = tempDir('qemu-img');
  const size = 3_000_001; // not a multiple of the block size
  const base = pattern(size, 71);
  const baseFile = join(dir, 'base.raw');
  writeFileSync(baseFile, base);
  const store = await initStore({ base: baseFile });
  const server = await startServe(store);
  const uri = server.uri('default');
  const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', baseFile, uri]);
  assert.equal(same.code, 0, same.stdout + same.stderr);

  // Unaligned writes (one at the very end), a write-zeroes and a discard of blocks that live in the base.
  await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 100 10', '-c', `write -P 0x62 ${size - 1001} 1001`, '-c', 'write -z 409600 8192', '-c', 'discard 1048576 65536', uri]);
  const model = Buffer.from(base);
  model.fill(0x61, 100, 110);
  model.fill(0x62, size - 1001, size);
  model.fill(0, 409600, 409600 + 8192);
  model.fill(0, 1048576, 1048576 + 65536);
  sameBytes(await readExport(uri), model, 'volume over an external base');
  sameBytes(readFileSync(baseFile), base, 'the external base file (cowstack must never write it)');

  await server.stop();
  // A changed base is refused with a message saying so.
  const changed = Buffer.from(base);
  changed[12345] ^= 0xff;
  writeFileSync(baseFile, changed);
  const refused = await cowstack(['serve', store, '--socket', join(dir, 'refused.sock')], { timeoutMs: 20_000 });
  assert.equal(refused.code, 1, `serve over a changed base: ${refused.stdout}${refused.stderr}`);
  assert.match(refused.stderr, /base image .* changed/);
});

test.run();
