/**
 * Stopping under load. Four writer processes (libnbd, 16 writes in flight each, every other slot
 * with FUA) rewrite numbered slots of their own region over and over, one write per slot at a time,
 * each slot's bytes naming (writer, slot, pass); slots are 65539 bytes, so neighbouring slots share
 * blocks. A snapshot is taken through the control socket in the middle. Then the server gets SIGTERM
 * (round 1) or SIGINT (round 2) while the writers are still going: it must exit 0 promptly. After a
 * restart, every slot holds, untorn, the last pass the server acknowledged for it or the one write
 * that was in flight (never older, never garbage); the snapshot holds for each slot a pass between
 * the last acknowledged before the snapshot command started and the last issued before it returned;
 * `cowstack check` finds no damage. The same after SIGKILL (journal replay).
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
history = {}          # slot -> [[pass, issued at, acknowledged at or None], ...]
pending = {}          # cookie -> (slot, pass, history entry)
busy = set()          # slots with a write in flight
ended = 'deadline'
h = nbd.NBD()
h.connect_uri(uri)
print('connected', flush=True)
deadline = time.time() + 60
p = pass_base
def reap():
    while pending:   # (peeking with nothing in flight is an error)
        c = h.aio_peek_command_completed()
        if c <= 0:
            return
        s, q, entry = pending.pop(c)
        busy.discard(s)
        h.aio_command_completed(c)   # raises if the write failed
        entry[2] = time.time()
        acked[s] = q
try:
    while time.time() < deadline:
        p += 1
        for slot in range(nslots):
            while slot in busy or h.aio_in_flight() >= 16:
                h.poll(-1)
                reap()
            # even slots are written with FUA, odd ones plainly
            c = h.aio_pwrite(content(slot, p), region * writer + slot * slot_bytes, flags=nbd.CMD_FLAG_FUA if slot % 2 == 0 else 0)
            entry = [p, time.time(), None]
            history.setdefault(slot, []).append(entry)
            pending[c] = (slot, p, entry)
            busy.add(slot)
            issued[slot] = p
except nbd.Error as e:
    ended = str(e.string)
print(json.dumps({'acked': acked, 'issued': issued, 'history': history, 'ended': ended}), flush=True)
`;

interface WriterLog {
  acked: Record<string, number>;
  issued: Record<string, number>;
  history: Record<string, Array<[pass: number, issuedAt: number, ackedAt: number | null]>>;
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

interface Round {
  readonly logs: WriterLog[];
  /** Wall-clock seconds just before the snapshot command started and just after it returned. */
  readonly snapshotWindow?: readonly [number, number];
}

async function loadRound(store: string, passBase: number, stop: NodeJS.Signals, snapshot?: string): Promise<Round> {
  const server = await startServe(store, { args: ['-v'] });
  const jobs: Promise<RunResult>[] = [];
  for (let w = 0; w < writers; w++) {
    jobs.push(python(writerScript, [server.uri('default'), String(w), String(regionBytes), String(slotBytes), String(slotsPerRegion), String(passBase)], { timeoutMs: 90_000 }));
  }
  await sleep(1500);
  let snapshotWindow: [number, number] | undefined;
  if (snapshot !== undefined) {
    const t0 = Date.now() / 1000;
    await cowstackOk(['snapshot', store, 'default', '--name', snapshot]);
    snapshotWindow = [t0, Date.now() / 1000];
  }
  await sleep(1500);
  if (stop === 'SIGKILL') {
    await server.kill();
  } else {
    const stopping = Date.now();
    await server.stop(stop);
    const stopMs = Date.now() - stopping;
    assert.ok(stopMs < 10_000, `the server took ${stopMs} ms to stop; its log ends:\n${server.stderr().slice(-4000)}`);
    assert.match(server.stderr(), new RegExp(`${stop}: stopping`));
  }
  const logs = (await Promise.all(jobs)).map((r, w) => {
    assert.equal(r.code, 0, `writer ${w}: ${r.stderr}`);
    const lines = r.stdout.trim().split('\n');
    assert.equal(lines[0], 'connected', `writer ${w} did not connect: ${r.stdout}${r.stderr}`);
    const log = JSON.parse(lines[lines.length - 1]) as WriterLog;
    assert.notEqual(log.ended, 'deadline', `writer ${w} was not stopped by the server`);
    const ackedWrites = Object.values(log.history).flat().filter(([, , ackedAt]) => ackedAt !== null).length;
    assert.ok(ackedWrites >= 100, `writer ${w} got only ${ackedWrites} writes acknowledged before the stop`);
    return log;
  });
  return { logs, snapshotWindow };
}

/** Every slot holds the last acknowledged pass or the one in flight after it; returns the passes. */
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

/**
 * A snapshot taken during [t0, t1] holds, for each slot, a pass at least as new as the last one
 * acknowledged before t0 and no newer than the last one issued before t1.
 */
function checkSnapshot(image: Buffer, round: Round, volumePasses: number[][]): void {
  const [t0, t1] = round.snapshotWindow!;
  let written = 0;
  for (let w = 0; w < writers; w++) {
    for (let slot = 0; slot < slotsPerRegion; slot++) {
      const history = round.logs[w].history[slot] ?? [];
      const low = Math.max(0, ...history.filter(([, , ackedAt]) => ackedAt !== null && ackedAt < t0).map(([p]) => p));
      const high = Math.max(0, ...history.filter(([, issuedAt]) => issuedAt < t1).map(([p]) => p));
      const p = passOf(image, w, slot, 'snapshot taken under load');
      assert.ok(p >= low && p <= high, `snapshot slot ${w}/${slot} holds pass ${p}; acknowledged before the snapshot: ${low}, issued before it returned: ${high}`);
      assert.ok(p <= volumePasses[w][slot]);
      if (p > 0) written++;
    }
  }
  assert.ok(written > 0, 'the snapshot taken under load holds some of the writes');
}

test('SIGTERM and SIGINT under load: exit 0, and every acknowledged write is there after restart', async () => {
  const store = await initStore({ size: '64M' });

  const round1 = await loadRound(store, 0, 'SIGTERM', 'mid');
  let server = await startServe(store);
  assert.doesNotMatch(server.stderr(), /recovered: replayed/, 'SIGTERM wrote a checkpoint: a restart replays nothing');
  const passes1 = checkVolume(await readExport(server.uri('default')), round1.logs, 'after SIGTERM');
  const snap = await readExport(server.uri('default@mid'));
  checkSnapshot(snap, round1, passes1);
  await server.stop();

  const round2 = await loadRound(store, 100_000, 'SIGINT');
  server = await startServe(store);
  assert.doesNotMatch(server.stderr(), /recovered: replayed/, 'SIGINT wrote a checkpoint: a restart replays nothing');
  checkVolume(await readExport(server.uri('default')), round2.logs, 'after SIGINT');
  // The snapshot did not change in round 2.
  assert.ok((await readExport(server.uri('default@mid'))).equals(snap), 'the snapshot changed');
  await server.stop();

  const check = await cowstack(['check', store]);
  assert.equal(check.code, 0, `cowstack check: ${check.stdout}${check.stderr}`);
  assert.match(check.stdout, /: ok /);
});

test('SIGKILL under load: the restart replays the journal and every acknowledged write is there', async () => {
  // Acknowledged means journaled (DESIGN.md: append, commit, then acknowledge), and a killed process
  // loses nothing the kernel already has, so even writes without FUA or flush must survive.
  const store = await initStore({ size: '64M' });
  const round = await loadRound(store, 0, 'SIGKILL', 'mid');
  const server = await startServe(store);
  assert.match(server.stderr(), /recovered: replayed \d+ events/);
  const passes = checkVolume(await readExport(server.uri('default')), round.logs, 'after SIGKILL');
  checkSnapshot(await readExport(server.uri('default@mid')), round, passes);
  await server.stop();
  const check = await cowstack(['check', store]);
  assert.equal(check.code, 0, `cowstack check after a crash: ${check.stdout}${check.stderr}`);
});

test.run();
