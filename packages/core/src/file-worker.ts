/**
 * A file worker: one worker thread that runs batches of pwrites or preads on the process's file
 * descriptors, so page-cache copies (a 4 KiB pwrite costs the calling thread 3-10 µs here, most of it
 * in the kernel; a 1 MiB read at stack depth 16 is 16 preads) run on another core, and the event loop
 * pays one message each way per batch instead of one threadpool request per pread or pwrite
 * (measured in BENCHMARKS.md). Layer files use one worker for writes behind and one for large reads.
 *
 * Writes: the batch's bytes are copied into one fresh ArrayBuffer that is transferred (not cloned).
 * Reads: the caller's target memory (an ArrayBuffer of its own) is transferred to the worker, which
 * reads straight into it and transfers it back with its answer: how many bytes each read got (fewer
 * at the end of a file), so a read's memory does not stay in the thread. (Reads went into
 * SharedArrayBuffers at first: the worker's handle on each one kept its memory alive until the
 * worker's own garbage collector ran, which in a thread that allocates next to nothing is almost
 * never; reads of ever-new lengths then held hundreds of MiB, see BENCHMARKS.md. A write batch's
 * memory does stay until then, but V8 counts transferred memory against the worker's heap and
 * collects it as it grows.) A worker runs batches in the order they were sent and each batch in
 * order, so two writes of the same bytes never race inside it.
 *
 * Descriptors are shared by the process: the caller keeps a descriptor open until the batch using it
 * is answered. The worker is referenced (keeps the process alive) only while a batch is out; it is
 * started on first use and stopped by `close` once nothing is outstanding.
 */
import { Worker } from 'node:worker_threads';
import { assert } from './errors.js';

export interface FileWrite {
  readonly fd: number;
  readonly position: number;
  readonly data: Buffer;
}

/** One read of a batch: `length` bytes at `position` of `fd`, into the batch's target at `targetOffset`. */
export interface FileRead {
  readonly fd: number;
  readonly position: number;
  readonly length: number;
  readonly targetOffset: number;
}

/**
 * One batch as the worker gets it. The operations travel as one array, four numbers per
 * operation (descriptor, file position, length, where its bytes start in `memory`), built with `push`:
 * a packed array is cloned as a dense one, where an array made with `new Array(n)` is holey and
 * crosses as a sparse one, index by index (measured in BENCHMARKS.md).
 */
interface BatchMessage {
  readonly id: number;
  readonly kind: 'read' | 'write';
  /** Write: the bytes of every write, back to back. Read: the target memory. Transferred either way. */
  readonly memory: ArrayBuffer;
  readonly ops: number[];
}

/** What the worker answers: bytes done per operation, and the index, code and message of each failure. */
interface BatchReply {
  readonly id: number;
  /** A read batch's target memory, transferred back. */
  readonly memory: ArrayBuffer | undefined;
  readonly counts: number[];
  readonly errors: Array<[index: number, code: string | undefined, message: string]>;
}

/**
 * Called once per batch: each operation's error (null if none) and bytes done, by index; for a read
 * batch also its target memory, back from the worker (undefined if the worker died with it).
 */
export type BatchDone = (errorOf: (index: number) => NodeJS.ErrnoException | null, countOf: (index: number) => number, memory: ArrayBuffer | undefined) => void;

/**
 * The worker's whole program. It runs as a script in its own thread, so it uses `require` and
 * nothing from this module.
 */
function workerMain(): void {
  const { parentPort } = require('node:worker_threads') as typeof import('node:worker_threads');
  const { readSync, writeSync } = require('node:fs') as typeof import('node:fs');
  const fields = 4; // numbers per operation in BatchMessage.ops
  parentPort!.on('message', (batch: BatchMessage) => {
    const memory = Buffer.from(batch.memory);
    const ops = batch.ops;
    const counts: number[] = [];
    const errors: BatchReply['errors'] = [];
    for (let i = 0; i < ops.length / fields; i++) {
      const fd = ops[i * fields];
      const position = ops[i * fields + 1];
      const length = ops[i * fields + 2];
      const at = ops[i * fields + 3];
      try {
        let done = 0;
        while (done < length) {
          const n =
            batch.kind === 'write'
              ? writeSync(fd, memory, at + done, length - done, position + done)
              : readSync(fd, memory, at + done, length - done, position + done);
          if (n === 0) break;
          done += n;
        }
        counts.push(done);
      } catch (err) {
        counts.push(0);
        errors.push([i, (err as NodeJS.ErrnoException).code, (err as Error).message]);
      }
    }
    const back = batch.kind === 'read' ? batch.memory : undefined;
    parentPort!.postMessage({ id: batch.id, memory: back, counts, errors } satisfies BatchReply, back !== undefined ? [back] : []);
  });
}

export class FileWorker {
  private worker: Worker | undefined;
  private nextId = 1;
  private closing = false;
  private readonly waiting = new Map<number, BatchDone>();

  /** Write a batch; `done` is called once the worker has written every write. */
  write(writes: readonly FileWrite[], done: BatchDone): void {
    assert(writes.length > 0, 'a file-worker batch holds at least one operation');
    let total = 0;
    for (const w of writes) total += w.data.length;
    // A buffer of its own (never the shared allocation pool): it is transferred to the worker.
    const bytes = Buffer.allocUnsafeSlow(total);
    const ops: number[] = [];
    let at = 0;
    for (const w of writes) {
      ops.push(w.fd, w.position, w.data.length, at);
      at += w.data.copy(bytes, at);
    }
    const memory = bytes.buffer as ArrayBuffer;
    this.send({ kind: 'write', memory, ops }, done, [memory]);
  }

  /**
   * Read a batch into `target` (a Buffer on an ArrayBuffer of its own); `done` is called once every
   * read has finished, with the target's memory back. That memory is transferred to the worker
   * meanwhile: every view of it, `target` too, is empty until it comes back as a new ArrayBuffer
   * with the same bytes.
   */
  read(target: Buffer, reads: readonly FileRead[], done: BatchDone): void {
    assert(reads.length > 0, 'a file-worker batch holds at least one operation');
    const memory = target.buffer;
    assert(!(memory instanceof SharedArrayBuffer), 'file-worker reads go into memory of their own, transferred');
    const ops: number[] = [];
    for (const r of reads) ops.push(r.fd, r.position, r.length, target.byteOffset + r.targetOffset);
    this.send({ kind: 'read', memory, ops }, done, [memory]);
  }

  private send(message: Omit<BatchMessage, 'id'>, done: BatchDone, transfer: ArrayBuffer[]): void {
    assert(!this.closing, 'no batch is sent to a closed file worker');
    const id = this.nextId++;
    const worker = this.start();
    if (this.waiting.size === 0) worker.ref();
    this.waiting.set(id, done);
    worker.postMessage({ id, ...message } satisfies BatchMessage, transfer);
  }

  private start(): Worker {
    if (this.worker !== undefined) return this.worker;
    const worker = new Worker(`(${workerMain.toString()})()`, { eval: true, execArgv: [], env: {} });
    worker.unref();
    worker.on('message', (reply: BatchReply) => this.answered(reply));
    worker.on('error', (err) => this.failAll(err));
    worker.on('exit', (code) => {
      if (this.worker === worker) this.worker = undefined;
      this.failAll(new Error(`the file worker thread exited (code ${code}) with batches outstanding`));
    });
    this.worker = worker;
    return worker;
  }

  private answered(reply: BatchReply): void {
    const done = this.waiting.get(reply.id);
    assert(done !== undefined, `the file worker answered batch ${reply.id}, which is not outstanding`);
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
    done(
      (index) => errors.get(index) ?? null,
      (index) => reply.counts[index],
      reply.memory,
    );
  }

  /** The worker died: every outstanding batch fails. */
  private failAll(err: Error): void {
    const waiting = [...this.waiting.values()];
    this.waiting.clear();
    for (const done of waiting) done(() => err, () => 0, undefined);
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
