/**
 * A filesystem on a cowstack volume, through qemu-storage-daemon's FUSE export of the NBD export (no
 * kernel NBD here): `mke2fs -t ext4 -d DIR` builds and populates it (mke2fs also discards the device
 * first, which reaches cowstack as TRIM), qsd stops, `cowstack snapshot` freezes it, a second qsd
 * session changes files with `debugfs -w`, and then the snapshot (read-only) and the volume are each
 * checked with `e2fsck -fn` and their files read back with debugfs and compared with the originals.
 */
import { strict as assert } from 'node:assert';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { cowstackOk, fuseExport, initStore, killAll, pattern, run, runOk, sameBytes, startServe, tempDir } from './harness.js';

test.after.each(killAll);

async function fsck(file: string, label: string): Promise<void> {
  const r = await run('e2fsck', ['-fn', file]);
  assert.equal(r.code, 0, `e2fsck -fn ${label} exited ${r.code}:\n${r.stdout}${r.stderr}`);
}

async function debugfsCat(image: string, path: string): Promise<string> {
  const r = await runOk('debugfs', ['-R', `cat ${path}`, image]);
  return r.stdout;
}

async function debugfsDump(image: string, path: string, dir: string): Promise<Buffer> {
  const out = join(dir, `dump-${Math.random().toString(36).slice(2)}`);
  await runOk('debugfs', ['-R', `dump ${path} ${out}`, image]);
  return readFileSync(out);
}

async function exists(image: string, path: string): Promise<boolean> {
  const r = await runOk('debugfs', ['-R', `stat ${path}`, image]);
  return !/File not found/.test(r.stderr + r.stdout);
}

test('ext4 through qemu-storage-daemon FUSE: populate, snapshot, change, fsck and read both', async () => {
  const dir = tempDir('fs');
  const store = await initStore({ size: '64M' });
  const server = await startServe(store);

  // The files mke2fs puts in the new filesystem.
  const src = join(dir, 'src');
  mkdirSync(join(src, 'etc'), { recursive: true });
  mkdirSync(join(src, 'data/deep/er'), { recursive: true });
  const hostname = 'cowstack-e2e\n';
  const big = pattern(3 * 1024 * 1024 + 1234, 81);
  const small = pattern(5000, 82);
  writeFileSync(join(src, 'etc/hostname'), hostname);
  writeFileSync(join(src, 'data/big.bin'), big);
  writeFileSync(join(src, 'data/deep/er/small.bin'), small);
  writeFileSync(join(src, 'doomed.txt'), 'this file is removed after the snapshot\n');

  // Session 1: mkfs + populate.
  const mnt1 = join(dir, 'vol1.img');
  const fuse1 = await fuseExport(server.socket, 'default', mnt1, { writable: true });
  await runOk('mke2fs', ['-q', '-F', '-t', 'ext4', '-L', 'e2e', '-d', src, mnt1], { timeoutMs: 120_000 });
  await fsck(mnt1, 'the new filesystem');
  await fuse1.stop();

  await cowstackOk(['snapshot', store, 'default', '--name', 'fs1']);

  // Session 2: change files with debugfs -w.
  const extra = pattern(200_000, 83);
  writeFileSync(join(dir, 'extra.bin'), extra);
  const motd = 'written after the snapshot\n';
  writeFileSync(join(dir, 'motd'), motd);
  const commands = join(dir, 'debugfs.cmds');
  writeFileSync(
    commands,
    [`write ${join(dir, 'extra.bin')} /data/extra.bin`, `cd /etc`, `write ${join(dir, 'motd')} motd`, 'cd /', 'mkdir /newdir', 'rm /doomed.txt', ''].join('\n'),
  );
  const mnt2 = join(dir, 'vol2.img');
  const fuse2 = await fuseExport(server.socket, 'default', mnt2, { writable: true });
  const dbg = await runOk('debugfs', ['-w', '-f', commands, mnt2]);
  assert.doesNotMatch(dbg.stderr, /error|not found|cannot/i, dbg.stderr);
  await fuse2.stop();

  // Both at once: the snapshot read-only, the volume (read-only here too: e2fsck -n and debugfs read).
  const snapFile = join(dir, 'snap.img');
  const volFile = join(dir, 'vol.img');
  const snap = await fuseExport(server.socket, 'default@fs1', snapFile, { writable: false });
  const vol = await fuseExport(server.socket, 'default', volFile, { writable: false });

  await fsck(snapFile, 'the snapshot');
  await fsck(volFile, 'the volume');

  // The snapshot: exactly the populated tree.
  assert.equal(await debugfsCat(snapFile, '/etc/hostname'), hostname);
  sameBytes(await debugfsDump(snapFile, '/data/big.bin', dir), big, 'snapshot /data/big.bin');
  sameBytes(await debugfsDump(snapFile, '/data/deep/er/small.bin', dir), small, 'snapshot /data/deep/er/small.bin');
  assert.equal(await exists(snapFile, '/doomed.txt'), true, 'the snapshot still has /doomed.txt');
  assert.equal(await exists(snapFile, '/data/extra.bin'), false, 'the snapshot must not see later files');
  assert.equal(await exists(snapFile, '/etc/motd'), false);

  // The volume: the tree plus the changes.
  assert.equal(await debugfsCat(volFile, '/etc/hostname'), hostname);
  assert.equal(await debugfsCat(volFile, '/etc/motd'), motd);
  sameBytes(await debugfsDump(volFile, '/data/big.bin', dir), big, 'volume /data/big.bin');
  sameBytes(await debugfsDump(volFile, '/data/extra.bin', dir), extra, 'volume /data/extra.bin');
  sameBytes(await debugfsDump(volFile, '/data/deep/er/small.bin', dir), small, 'volume /data/deep/er/small.bin');
  assert.equal(await exists(volFile, '/doomed.txt'), false, '/doomed.txt was removed from the volume');
  assert.equal(await exists(volFile, '/newdir'), true);
  const label = await runOk('dumpe2fs', ['-h', volFile]);
  assert.match(label.stdout, /Filesystem volume name:\s+e2e/);

  await snap.stop();
  await vol.stop();
  await server.stop();
});

test.run();
