/**
 * Stopping under load. Four writer processes (libnbd, 16 writes in flight each) rewrite numbered
 * slots of their own region over and over, one write per slot at a time, each slot's bytes naming
 * (writer, slot, pass); slots are 65539 bytes, so neighbouring slots share blocks. A snapshot is taken
 * through the control socket in the middle. Then the server gets SIGTERM (round 1) or SIGINT
 * (round 2) while the writers are still going: it must exit 0 promptly. After a restart, every slot
 * holds, untorn, the last pass the server acknowledged for it or the one write that was in flight
 * (never older, never garbage); the snapshot is self-consistent; `cowstack check` finds no damage.
 */
import { strict as assert } from 'node:assert';
import { test } from 'uvu';
import { cowstack, cowstackOk, initStore, killAll, MiB, python, readExport, sleep, startServe, type RunResult } from './harness.js';

const sizeBytes = 64 * MiB;
const writers = 4;
const regionBytes = sizeBytes / writers;
const slotBytes = 65539;
const slotsPerRegion = Math.floor(regionBytes / slotBytes);

test.after.each(killAll);

const writerScript = String.raw`
import json, nbd, struct, sys, time
uri, writer, region, slot_bytes, nslots, pass_base = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def content(slot, p):
    head = struct.pack('<IIII', 0xC0575AC4, writer, slot, p)
    return head + bytes([(p * 7 + slot * 13 + writer) & 0xff]) * (slot_bytes - len(head))
acked = {}
issued = {}
pending = {}          # cookie -> (slot, pass)
busy = set()          # slots with a write in flight
ended = 'deadline'
h = nbd.NBD()
h.connect_uri(uri)
print('connected', flush=True)
deadline = time.time() + 60
p = pass_base
try:
    while time.time() < deadline:
        p += 1
        for slot in range(nslots):
            while slot in busy or h.aio_in_flight() >= 16:
                h.poll(-1)
                while True:
                    c = h.aio_peek_command_completed()
                    if c <= 0:
                        break
                    s, q = pending.pop(c)
                    busy.discard(s)
                    h.aio_command_completed(c)   # raises if the write failed
                    acked[s] = q
            buf = content(slot, p)
            c = h.aio_pwrite(buf, region * writer + slot * slot_bytes)
            pending[c] = (slot, p)
            busy.add(slot)
            issued[slot] = p
except nbd.Error as e:
    ended = str(e.string)
print(json.dumps({'acked': acked, 'issued': issued, 'ended': ended}), flush=True)
`;

interface WriterLog {
  acked: Record<string, number>;
  issued: Record<string, number>;
  ended: string;
}

/** The pass a slot holds, or 0 for zeroes; throws on torn or foreign bytes. */
function passOf(image: Buffer, writer: number, slot: number, what: string): number {
  const at = writer * regionBytes + slot * slotBytes;
  const bytes = image.subarray(at, at + slotBytes);
  if (bytes.every((b) => b === 0)) return 0;
  const magic = bytes.readUInt32LE(0);
  const w = bytes.readUInt32LE(4);
  const s = bytes.readUInt32LE(8);
  const p = bytes.readUInt32LE(12);
  if (magic !== 0xc0575ac4 || w !== writer || s !== slot) throw new Error(`${what}: writer ${writer} slot ${slot} has a bad header (magic ${magic.toString(16)}, writer ${w}, slot ${s})`);
  const fill = (p * 7 + slot * 13 + writer) & 0xff;
  for (let i = 16; i < slotBytes; i++) {
    if (bytes[i] !== fill) throw new Error(`${what}: writer ${writer} slot ${slot} pass ${p} is torn at byte ${i}: 0x${bytes[i].toString(16)}, expected 0x${fill.toString(16)}`);
  }
  return p;
}

async function loadRound(store: string, passBase: number, signal: NodeJS.Signals, snapshot?: string): Promise<WriterLog[]> {
  const server = await startServe(store);
  const jobs: Promise<RunResult>[] = [];
  for (let w = 0; w < writers; w++) {
    jobs.push(python(writerScript, [server.uri('default'), String(w), String(regionBytes), String(slotBytes), String(slotsPerRegion), String(passBase)], { timeoutMs: 90_000 }));
  }
  await sleep(1500);
  if (snapshot !== undefined) await cowstackOk(['snapshot', store, 'default', '--name', snapshot]);
  await sleep(1500);
  const stopping = Date.now();
  await server.stop(signal);
  const stopMs = Date.now() - stopping;
  assert.ok(stopMs < 10_000, `the server took ${stopMs} ms to stop`);
  assert.match(server.stderr(), new RegExp(`${signal}: stopping`));
  const logs = (await Promise.all(jobs)).map((r, w) => {
    assert.equal(r.code, 0, `writer ${w}: ${r.stderr}`);
    const lines = r.stdout.trim().split('\n');
    assert.equal(lines[0], 'connected', `writer ${w} did not connect: ${r.stdout}${r.stderr}`);
    const log = JSON.parse(lines[lines.length - 1]) as WriterLog;
    assert.notEqual(log.ended, 'deadline', `writer ${w} was not stopped by the server`);
    assert.ok(Object.keys(log.acked).length === slotsPerRegion, `writer ${w} got only ${Object.keys(log.acked).length} slots acknowledged before the stop`);
    return log;
  });
  return logs;
}

function checkVolume(image: Buffer, logs: WriterLog[], what: string): number[][] {
  const passes: number[][] = [];
  for (let w = 0; w < writers; w++) {
    passes.push([]);
    for (let slot = 0; slot < slotsPerRegion; slot++) {
      const acked = logs[w].acked[slot] ?? 0;
      const issued = logs[w].issued[slot] ?? 0;
      const p = passOf(image, w, slot, what);
      assert.ok(p >= acked && p <= issued, `${what}: writer ${w} slot ${slot} holds pass ${p}; acknowledged ${acked}, last issued ${issued}`);
      passes[w].push(p);
    }
  }
  return passes;
}

test('SIGTERM and SIGINT under load: exit 0, and every acknowledged write is there after restart', async () => {
  const store = await initStore({ size: '64M' });

  const round1 = await loadRound(store, 0, 'SIGTERM', 'mid');
  let server = await startServe(store);
  const image1 = await readExport(server.uri('default'));
  const passes1 = checkVolume(image1, round1, 'after SIGTERM');
  const snap = await readExport(server.uri('default@mid'));
  let snapWritten = 0;
  for (let w = 0; w < writers; w++) {
    for (let slot = 0; slot < slotsPerRegion; slot++) {
      const p = passOf(snap, w, slot, 'snapshot taken under load');
      assert.ok(p <= passes1[w][slot], `snapshot slot ${w}/${slot} has pass ${p}, newer than the volume's ${passes1[w][slot]}`);
      if (p > 0) snapWritten++;
    }
  }
  assert.ok(snapWritten > 0, 'the snapshot taken under load holds some of the writes');
  await server.stop();

  const round2 = await loadRound(store, 100_000, 'SIGINT');
  server = await startServe(store);
  checkVolume(await readExport(server.uri('default')), round2, 'after SIGINT');
  // The snapshot did not change in round 2.
  assert.ok((await readExport(server.uri('default@mid'))).equals(snap), 'the snapshot changed');
  await server.stop();

  const check = await cowstack(['check', store]);
  assert.equal(check.code, 0, `cowstack check: ${check.stdout}${check.stderr}`);
  assert.match(check.stdout, /: ok /);
});

test.run();
