/**
 * The layer writer: one worker thread that pwrites the live path's small layer-file writes, so the
 * page-cache work (a 4 KiB pwrite costs the calling thread 3-10 µs here, most of it in the kernel)
 * runs on another core instead of the event loop.
 *
 * The event loop hands it one batch per turn: the batch's bytes copied into one fresh ArrayBuffer
 * that is transferred (not cloned) with the file descriptors and positions, and the worker answers
 * with one message per batch. One message each way costs the event loop far less than a threadpool
 * request per write (measured in BENCHMARKS.md). The worker writes batches in the order they were
 * sent and each batch in order, so two writes of the same bytes never race inside it.
 *
 * Descriptors are shared by the process: the caller keeps a descriptor open until the batch using it
 * is answered. The worker is referenced (keeps the process alive) only while a batch is out; it is
 * started on first use and stopped by `close` once nothing is outstanding.
 */
import { Worker } from 'node:worker_threads';
import { assert } from './errors.js';

export interface LayerWrite {
  readonly fd: number;
  readonly position: number;
  readonly data: Buffer;
}

/** What the worker answers for a batch: the index, code and message of each write that failed. */
interface BatchReply {
  readonly id: number;
  readonly errors: Array<[index: number, code: string | undefined, message: string]>;
}

/**
 * The worker's whole program. It runs as a script in its own thread, so it uses `require` and
 * nothing from this module.
 */
function writerMain(): void {
  const { parentPort } = require('node:worker_threads') as typeof import('node:worker_threads');
  const { writeSync } = require('node:fs') as typeof import('node:fs');
  parentPort!.on('message', (batch: { id: number; bytes: ArrayBuffer; fds: number[]; positions: number[]; lengths: number[] }) => {
    const bytes = Buffer.from(batch.bytes);
    const errors: BatchReply['errors'] = [];
    let at = 0;
    for (let i = 0; i < batch.fds.length; i++) {
      const length = batch.lengths[i];
      try {
        for (let done = 0; done < length; ) done += writeSync(batch.fds[i], bytes, at + done, length - done, batch.positions[i] + done);
      } catch (err) {
        errors.push([i, (err as NodeJS.ErrnoException).code, (err as Error).message]);
      }
      at += length;
    }
    parentPort!.postMessage({ id: batch.id, errors } satisfies BatchReply);
  });
}

/** Called with the error of each write of a batch (by index), null for one that succeeded. */
export type BatchDone = (errorOf: (index: number) => NodeJS.ErrnoException | null) => void;

export class LayerWriter {
  private worker: Worker | undefined;
  private nextId = 1;
  private closing = false;
  private readonly waiting = new Map<number, BatchDone>();

  /** Write a batch in the worker; `done` is called once, when the worker has written every write. */
  write(writes: readonly LayerWrite[], done: BatchDone): void {
    assert(writes.length > 0, 'a layer-writer batch holds at least one write');
    assert(!this.closing, 'no batch is sent to a closed layer writer');
    let total = 0;
    for (const w of writes) total += w.data.length;
    // A buffer of its own (never the shared allocation pool): it is transferred to the worker.
    const bytes = Buffer.allocUnsafeSlow(total);
    const fds = new Array<number>(writes.length);
    const positions = new Array<number>(writes.length);
    const lengths = new Array<number>(writes.length);
    let at = 0;
    for (let i = 0; i < writes.length; i++) {
      const w = writes[i];
      at += w.data.copy(bytes, at);
      fds[i] = w.fd;
      positions[i] = w.position;
      lengths[i] = w.data.length;
    }
    const id = this.nextId++;
    const worker = this.start();
    if (this.waiting.size === 0) worker.ref();
    this.waiting.set(id, done);
    worker.postMessage({ id, bytes: bytes.buffer, fds, positions, lengths }, [bytes.buffer]);
  }

  private start(): Worker {
    if (this.worker !== undefined) return this.worker;
    const worker = new Worker(`(${writerMain.toString()})()`, { eval: true, execArgv: [], env: {} });
    worker.unref();
    worker.on('message', (reply: BatchReply) => this.answered(reply));
    worker.on('error', (err) => this.failAll(err));
    worker.on('exit', (code) => {
      if (this.worker === worker) this.worker = undefined;
      this.failAll(new Error(`the layer writer thread exited (code ${code}) with writes outstanding`));
    });
    this.worker = worker;
    return worker;
  }

  private answered(reply: BatchReply): void {
    const done = this.waiting.get(reply.id);
    assert(done !== undefined, `the layer writer answered batch ${reply.id}, which is not outstanding`);
    this.waiting.delete(reply.id);
    if (this.waiting.size === 0) {
      if (this.closing) this.stop();
      else this.worker?.unref();
    }
    const errors = new Map<number, NodeJS.ErrnoException>();
    for (const [index, code, message] of reply.errors) {
      const err: NodeJS.ErrnoException = new Error(message);
      err.code = code;
      errors.set(index, err);
    }
    done((index) => errors.get(index) ?? null);
  }

  /** The worker died: every outstanding batch fails (its blocks stay in memory; the journal has them). */
  private failAll(err: Error): void {
    const waiting = [...this.waiting.values()];
    this.waiting.clear();
    for (const done of waiting) done(() => err);
  }

  /** Stop the worker, once the batches already sent are answered. */
  close(): void {
    this.closing = true;
    if (this.waiting.size === 0) this.stop();
  }

  private stop(): void {
    const worker = this.worker;
    this.worker = undefined;
    if (worker !== undefined) void worker.terminate();
  }
}
