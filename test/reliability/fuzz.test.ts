/**
 * CI length of the protocol fuzzer (fuzz.harness.ts): 100 000 mutated handshake and transmission
 * frames against one `cowstack serve` while a libnbd client and qemu-io verify their own data on other
 * exports; zero crashes, hangs, resets or spec deviations, exit 0 after SIGTERM, `cowstack check`
 * clean. The full run (1 000 000 frames) is `pnpm torture fuzz`.
 *
 * Below it, one test per cowstack bug the fuzzer found, each reduced to a few lines. Each was first
 * committed failing; all four are fixed now and stay as regression tests (RELIABILITY.md, "Fuzzing").
 */
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { createConnection } from 'node:net';
import { optionCodec, protocol, requestCodec } from '@cowstack/nbd';
import { test } from 'uvu';
import { initStore, killAll, pythonOk, startServe } from '../harness.js';
import { ciOptions, formatFuzzReport, fuzzProblems, runFuzz } from './fuzz.harness.js';

test.after.each(killAll);

test('protocol fuzzing: 100 000 mutated frames, no crash, hang or deviation; other clients unaffected', async () => {
  const options = { ...ciOptions, log: (line: string) => process.env.COWSTACK_FUZZ_VERBOSE && console.log(line) };
  const report = await runFuzz(options);
  console.log(formatFuzzReport(report));
  const problems = fuzzProblems(report, options);
  assert.deepEqual(problems, [], problems.join('\n'));
  // the fuzzer reached every phase it is meant to
  for (const outcome of ['handshake-refused', 'handshake-aborted', 'transmission-ended', 'transmission-disc', 'transmission-bad-magic', 'transmission-oversized-write', 'client-reset']) {
    assert.ok((report.outcomes[outcome] ?? 0) > 0, `no session ended as ${outcome}: ${JSON.stringify(report.outcomes)}`);
  }
  for (const errno of ['OK', 'EINVAL', 'EPERM', 'ENOSPC']) assert.ok((report.errnos[errno] ?? 0) > 0, `no ${errno} answer: ${JSON.stringify(report.errnos)}`);
});

// ---------------------------------------------------------------------------------------------
// bugs found by the fuzzer

test('regression (fixed in dfa8f61): SET_META_CONTEXT selected qemu:dirty-bitmap:<point that does not exist>, then BLOCK_STATUS failed with EIO', async () => {
  const store = await initStore({ size: '1M', label: 'fuzzbug' });
  const server = await startServe(store);
  try {
    // Found by the fuzzer as "BLOCK_STATUS ... got EIO, expected OK" on export `default` with the
    // context qemu:dirty-bitmap:ro selected (`ro` is a snapshot of another volume). The server
    // selects any qemu:dirty-bitmap:* name (VolumeDevice.acceptsContext checks only the prefix), so
    // a client is told the context is available and then every BLOCK_STATUS fails with EIO. The spec:
    // the server replies NBD_REP_META_CONTEXT only for contexts it will serve; an unknown one is
    // simply not selected.
    const r = await pythonOk(
      String.raw`
import nbd, sys
h = nbd.NBD()
h.add_meta_context('base:allocation')
h.add_meta_context('qemu:dirty-bitmap:no-such-snapshot')
h.connect_uri(sys.argv[1])
selected = h.can_meta_context('qemu:dirty-bitmap:no-such-snapshot')
try:
    h.block_status(65536, 0, lambda *a: 0)
    status = 'ok'
except nbd.Error as e:
    status = 'errno %s: %s' % (e.errnum, e.string)
print(selected, status)
h.shutdown()
`,
      [server.uri('default')],
    );
    const [selected, ...status] = r.stdout.trim().split(' ');
    assert.equal(status.join(' '), 'ok', `BLOCK_STATUS failed: ${status.join(' ')} (context selected: ${selected})`);
    assert.equal(selected, 'False', 'a dirty bitmap of a point that does not exist must not be selected');
  } finally {
    await server.stop();
  }
});

/** CPU seconds (user + system) a process has used, from /proc. */
function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

test('regression (fixed in dfa8f61): NBD_OPT_INFO on a point-in-time name replayed the whole journal (a cheap option cost the server seconds of CPU)', async () => {
  // Found while fuzzing with VOLUME@seq:N / VOLUME@time:T export names. StoreExports.open() builds a
  // PointInTimeDevice, whose constructor starts resolvePoint + pointInTimeView: a fold of the whole
  // journal from seq 1, even when the client only asked NBD_OPT_INFO (or LIST/SET_META_CONTEXT) and
  // never reads. Nothing bounds how many run at once, and each keeps running after the connection is
  // gone: 30 INFOs on a 100 000-event journal cost the server ~2 s of CPU (200 000 events: ~4.4 s;
  // 4 such clients at once stalled another client's 4 KiB reads for up to 0.84 s and pushed RSS to
  // 290 MiB). Expected: INFO costs about what it costs for a plain volume.
  const store = await initStore({ size: '64M', label: 'fuzzbug' });
  const server = await startServe(store);
  try {
    await pythonOk(
      String.raw`
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = b'x' * 4096
for i in range(100000):
    while h.aio_in_flight() >= 32:
        h.poll(-1)
    h.aio_pwrite(buf, (i * 4096) % (64 << 20))
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()
`,
      [server.uri('default')],
      { timeoutMs: 120_000 },
    );
    const infos = String.raw`
import nbd, sys, time
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(sys.argv[1])
for i in range(30):
    h.set_export_name(sys.argv[2].replace('N', str(i + 1)))
    h.opt_info()
h.opt_abort()
`;
    const pid = server.child.pid!;
    const settle = async (): Promise<number> => {
      // let background work finish: CPU time stops growing
      let last = cpuSeconds(pid);
      for (;;) {
        await new Promise((resolve) => setTimeout(resolve, 500));
        const now = cpuSeconds(pid);
        if (now - last < 0.02) return now;
        last = now;
      }
    };
    const t0 = await settle();
    await pythonOk(infos, [server.uri(''), 'default'], { timeoutMs: 120_000 });
    const plain = (await settle()) - t0;
    const t1 = cpuSeconds(pid);
    await pythonOk(infos, [server.uri(''), 'default@seq:N'], { timeoutMs: 120_000 });
    const pointInTime = (await settle()) - t1;
    assert.ok(pointInTime < 0.5 + 3 * plain, `30 INFOs on default@seq:N cost the server ${pointInTime.toFixed(2)} s of CPU; on default ${plain.toFixed(2)} s`);
  } finally {
    await server.stop();
  }
});

test('regression (fixed in 318f97f): BLOCK_STATUS on a dirty bitmap folded the whole journal again for every connection (cost grew with journal × connections)', async () => {
  // Found by the full fuzz run: 3 BLOCK_STATUS requests on qemu:dirty-bitmap:{time:2000-01-01,
  // seq:1, ro} went unanswered for more than 5 s (the fuzzer's hang limit) while everything else on
  // those connections was answered. VolumeDevice.dirtyExtents computes the bitmap on a connection's
  // first BLOCK_STATUS with changedSince(), a fold of the whole journal from seq 1 (every event of
  // every volume), once per connection and context, with nothing shared or bounded. Measured by hand
  // on a 600 000-event journal: 0.35 s for one connection; 8 connections at once 2.3 s each and
  // 2.45 s of server CPU. A client can open connections and ask one BLOCK_STATUS each to keep the
  // server busy (a backup tool asking 100 VMs' dirty bitmaps does it too). Expected: the cost of a
  // bitmap does not multiply with the connections asking for it.
  const store = await initStore({ size: '64M', label: 'fuzzbug' });
  const server = await startServe(store);
  try {
    await pythonOk(
      String.raw`
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
buf = b'x' * 4096
for i in range(200000):
    while h.aio_in_flight() >= 64:
        h.poll(-1)
    h.aio_pwrite(buf, (i * 4096) % (64 << 20))
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()
`,
      [server.uri('default')],
      { timeoutMs: 180_000 },
    );
    const ask = String.raw`
import nbd, sys, threading
def one():
    h = nbd.NBD()
    h.add_meta_context('qemu:dirty-bitmap:seq:1')
    h.connect_uri(sys.argv[1])
    h.block_status(65536, 0, lambda *a: 0)
    h.shutdown()
threads = [threading.Thread(target=one) for _ in range(int(sys.argv[2]))]
[t.start() for t in threads]
[t.join() for t in threads]
`;
    const pid = server.child.pid!;
    const settle = async (): Promise<number> => {
      let last = cpuSeconds(pid);
      for (;;) {
        await new Promise((resolve) => setTimeout(resolve, 500));
        const now = cpuSeconds(pid);
        if (now - last < 0.02) return now;
        last = now;
      }
    };
    const t0 = await settle();
    await pythonOk(ask, [server.uri('default'), '1'], { timeoutMs: 120_000 });
    const one = (await settle()) - t0;
    const t1 = cpuSeconds(pid);
    await pythonOk(ask, [server.uri('default'), '8'], { timeoutMs: 120_000 });
    const eight = (await settle()) - t1;
    assert.ok(eight < 2 * one + 0.3, `one connection's first BLOCK_STATUS on qemu:dirty-bitmap:seq:1 cost the server ${one.toFixed(2)} s of CPU, eight connections' ${eight.toFixed(2)} s`);
  } finally {
    await server.stop();
  }
});

test('regression (fixed in d8dc857): replies still queued when the server ended a connection were cut off after 2 s (slow reader, then FIN or DISC)', async () => {
  // Found by the full fuzz run as "chunk type 1 of 32090880 bytes truncated" / "read data truncated
  // (30952752 of 33554432 bytes)", then "N requests unanswered (the server closed the connection)":
  // a client sends requests with large READ replies, then its FIN (or NBD_CMD_DISC), and reads the
  // replies slowly. Once every request has been answered the connection ends (Connection.end()): it
  // calls socket.end() and arms a closeGraceMs (2 s) timer that destroys the socket, whether or not
  // the replies already written have left the server. A client reading slower than that (a loaded
  // machine, a slow link: 32 MiB in 2 s is 16 MB/s) loses the end of its replies; the spec asks the
  // server to answer every request before it closes.
  const store = await initStore({ size: '40M', label: 'fuzzbug' });
  const server = await startServe(store);
  try {
    for (const ending of ['fin', 'disc'] as const) {
      const got = await slowReader(server.socket, ending, 32 * 1024 * 1024, 3000);
      assert.equal(got, 16 + 32 * 1024 * 1024, `after ${ending}: ${got} of ${16 + 32 * 1024 * 1024} reply bytes arrived before the server closed`);
    }
  } finally {
    await server.stop();
  }
});

/**
 * Handshake (GO, simple replies), one READ of `length` bytes, then FIN or DISC; reads nothing for
 * `pauseMs`, then everything. Returns the transmission bytes received before the server closed.
 */
function slowReader(socketPath: string, ending: 'fin' | 'disc', length: number, pauseMs: number): Promise<number> {
  const P = protocol;
  const handshake = Buffer.concat([optionCodec.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES), optionCodec.encodeOption(P.NBD_OPT_GO, optionCodec.encodeInfoRequest({ name: 'default', infos: [] }))]);
  const read = requestCodec.encodeRequestHeader({ flags: 0, type: P.NBD_CMD_READ, cookie: 1n, offset: 0, length });
  const disc = requestCodec.encodeRequestHeader({ flags: 0, type: P.NBD_CMD_DISC, cookie: 2n, offset: 0, length: 0 });
  return new Promise((resolve, reject) => {
    const socket = createConnection({ path: socketPath });
    let received = Buffer.alloc(0);
    let handshakeBytes: number | undefined;
    socket.on('error', () => {});
    socket.on('data', (d: Buffer) => {
      received = Buffer.concat([received, d]);
      if (handshakeBytes === undefined) {
        // greeting (18), INFO_EXPORT reply (20 + 12), ACK (20)
        if (received.length < 18 + 32 + 20) return;
        handshakeBytes = 18 + 32 + 20;
        socket.write(ending === 'disc' ? Buffer.concat([read, disc]) : read);
        if (ending === 'fin') socket.end();
        socket.pause();
        setTimeout(() => socket.resume(), pauseMs);
      }
    });
    socket.once('connect', () => socket.write(handshake));
    socket.once('close', () => resolve(received.length - (handshakeBytes ?? received.length)));
    setTimeout(() => reject(new Error('no close within 60 s')), 60_000).unref();
  });
}

test.run();

