/**
 * `nbdinfo --list --json` against `cowstack serve`: every volume (read-write) and snapshot (read-only)
 * is listed with its size and flags, and agrees with `cowstack ls --json`. Operations run through the
 * control socket while serving (snapshot, clone, volume create/delete, snapshot --delete) show up in
 * the very next listing, and the new exports serve the right bytes at once.
 */
import { strict as assert } from 'node:assert';
import { test } from 'uvu';
import { cowstack, cowstackJson, cowstackOk, initStore, killAll, MiB, pattern, nbdsh, readExport, run, runOk, sameBytes, startServe, writeExport, type Served } from './harness.js';

test.after.each(killAll);

interface ListedExport {
  'export-name': string;
  description?: string;
  uri?: string;
  'export-size': number;
  is_read_only: boolean;
  can_trim?: boolean;
  can_flush?: boolean;
  contexts?: string[];
  block_size_preferred?: number;
}

async function list(server: Served): Promise<Map<string, ListedExport>> {
  const { stdout } = await runOk('nbdinfo', ['--list', '--json', server.uri()]);
  const info = JSON.parse(stdout) as { protocol: string; exports: ListedExport[] };
  assert.equal(info.protocol, 'newstyle-fixed');
  const out = new Map<string, ListedExport>();
  for (const e of info.exports) {
    assert.ok(!out.has(e['export-name']), `export ${e['export-name']} listed twice`);
    out.set(e['export-name'], e);
  }
  return out;
}

function expectExport(exports: Map<string, ListedExport>, name: string, sizeBytes: number, readOnly: boolean): void {
  const e = exports.get(name);
  assert.ok(e !== undefined, `export ${name} missing from ${[...exports.keys()].join(', ')}`);
  assert.equal(e['export-size'], sizeBytes, `${name}: size`);
  assert.equal(e.is_read_only, readOnly, `${name}: read-only flag`);
  if (readOnly) assert.equal(e.can_trim, false, `${name}: a read-only export must not offer trim`);
  else assert.equal(e.can_flush, true, `${name}: flush`);
  // (other contexts, such as qemu:dirty-bitmap:SNAPSHOT, may be listed too)
  for (const c of ['base:allocation', 'qemu:allocation-depth']) assert.ok(e.contexts?.includes(c), `${name}: context ${c} missing from ${JSON.stringify(e.contexts)}`);
}

test('every volume and snapshot is listed with size and read-only flag; live changes appear at once', async () => {
  const store = await initStore({ size: '64M' });
  // Offline operations (no server yet).
  await cowstackOk(['volume', 'create', store, 'vm1', '--size', '32M']);
  await cowstackOk(['snapshot', store, 'default', '--name', 'golden']);
  const server = await startServe(store);

  let exports = await list(server);
  assert.deepEqual([...exports.keys()].sort(), ['default', 'default@golden', 'vm1']);
  expectExport(exports, 'default', 64 * MiB, false);
  expectExport(exports, 'default@golden', 64 * MiB, true);
  expectExport(exports, 'vm1', 32 * MiB, false);
  assert.equal(exports.get('default')?.block_size_preferred, 4096);

  // The empty name is the default volume.
  const byEmpty = JSON.parse((await runOk('nbdinfo', ['--json', server.uri('')])).stdout) as { exports: ListedExport[] };
  assert.equal(byEmpty.exports[0]['export-size'], 64 * MiB);
  assert.equal(byEmpty.exports[0].is_read_only, false);
  // An unknown export is refused.
  const unknown = await run('nbdinfo', ['--json', server.uri('nosuch')]);
  assert.notEqual(unknown.code, 0, 'nbdinfo of an unknown export must fail');

  // cowstack ls agrees.
  const ls = await cowstackJson<{ volumes: Array<{ name: string; sizeBytes: number }>; snapshots: Array<{ volume: string; name: string }> }>(['ls', store]);
  assert.deepEqual(ls.volumes.map((v) => [v.name, v.sizeBytes]).sort(), [['default', 64 * MiB], ['vm1', 32 * MiB]]);
  assert.deepEqual(ls.snapshots.map((s) => `${s.volume}@${s.name}`), ['default@golden']);

  // Live: data in vm1, snapshot it through the control socket, change vm1 afterwards.
  const before = pattern(10000, 41);
  await writeExport(server.uri('vm1'), 5000, before);
  await cowstackOk(['snapshot', store, 'vm1', '--name', 'live1']);
  exports = await list(server);
  expectExport(exports, 'vm1@live1', 32 * MiB, true);
  const after = pattern(10000, 42);
  await writeExport(server.uri('vm1'), 5000, after);
  const snapBytes = await readExport(server.uri('vm1@live1'));
  sameBytes(snapBytes.subarray(5000, 15000), before, 'vm1@live1 keeps the bytes from before the snapshot');
  assert.ok(snapBytes.subarray(0, 5000).equals(Buffer.alloc(5000)) && snapBytes.subarray(15000).equals(Buffer.alloc(32 * MiB - 15000)));
  sameBytes((await readExport(server.uri('vm1'))).subarray(5000, 15000), after, 'vm1 has the new bytes');

  // A write to the read-only snapshot export fails and changes nothing.
  // (libnbd with strict mode off, so the request reaches the server instead of being refused locally)
  const denied = await nbdsh(['-u', server.uri('vm1@live1'), '-c', "h.set_strict_mode(0)\ntry:\n    h.pwrite(b'w' * 4096, 0)\n    print('written')\nexcept nbd.Error as e:\n    print(e.errnum)"]);
  assert.equal(denied.stdout.trim(), '1', `write to a snapshot export must fail with EPERM: ${denied.stdout}${denied.stderr}`);
  sameBytes(await readExport(server.uri('vm1@live1')), snapBytes, 'snapshot after a refused write');

  // Clone and create appear; the clone starts as the snapshot and diverges on its own.
  await cowstackOk(['clone', store, 'vm1@live1', 'vm2']);
  await cowstackOk(['volume', 'create', store, 'vm3', '--size', '1M']);
  exports = await list(server);
  expectExport(exports, 'vm2', 32 * MiB, false);
  expectExport(exports, 'vm3', MiB, false);
  sameBytes(await readExport(server.uri('vm2')), snapBytes, 'clone vm2 = vm1@live1');
  await writeExport(server.uri('vm2'), 0, Buffer.from('clone'));
  sameBytes((await readExport(server.uri('vm1@live1'))).subarray(0, 5), Buffer.alloc(5), 'the snapshot under a clone does not change');
  sameBytes((await readExport(server.uri('vm1'))).subarray(0, 5), Buffer.alloc(5), 'the clone source volume does not change');

  // Deletions disappear from the listing; a deleted volume's snapshot stays until deleted.
  await cowstackOk(['volume', 'delete', store, 'vm2']);
  await cowstackOk(['volume', 'delete', store, 'vm1']);
  exports = await list(server);
  assert.deepEqual([...exports.keys()].sort(), ['default', 'default@golden', 'vm1@live1', 'vm3']);
  sameBytes(await readExport(server.uri('vm1@live1')), snapBytes, 'snapshot of a deleted volume');
  await cowstackOk(['snapshot', store, 'vm1@live1', '--delete']);
  exports = await list(server);
  assert.deepEqual([...exports.keys()].sort(), ['default', 'default@golden', 'vm3']);
  const gone = await run('nbdinfo', ['--json', server.uri('vm1@live1')]);
  assert.notEqual(gone.code, 0, 'a deleted snapshot is no longer served');

  // A name already taken is refused through the control socket too, and nothing changes.
  const dup = await cowstack(['snapshot', store, 'default', '--name', 'golden']);
  assert.equal(dup.code, 1, `duplicate snapshot: ${dup.stdout}${dup.stderr}`);
  assert.equal((await list(server)).size, 3);

  await server.stop();

  // After a restart the listing is the same.
  const again = await startServe(store);
  assert.deepEqual([...(await list(again)).keys()].sort(), ['default', 'default@golden', 'vm3']);
  await again.stop();
});

test.run();
