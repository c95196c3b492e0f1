/**
 * The transmission phase of one connection: parses requests from the connection's ByteQueue, runs them
 * on the device concurrently, and writes replies as they complete (so replies may be out of order, as
 * the spec allows).
 *
 * Hot path: a request costs one header decode, one device promise with one `.then`, and one reply
 * written with the payload side by side with its header (no copy). Replies produced in the same
 * event-loop turn go out in one writev: the socket is corked at the first reply and uncorked on the
 * next tick. Once a read reply's bytes have left, its buffers go back to the device (`recycle`) for
 * the next read.
 *
 * Ordering: a FLUSH waits for the WRITE, WRITE_ZEROES and TRIM requests of this connection that were
 * started before it, then calls device.flush() (which makes everything acknowledged durable). FUA is
 * passed to the device, which resolves only when the data is durable.
 *
 * Flow control: at most maxInflightRequests requests are in flight (parsed, not yet replied); at that
 * many, parsing stops and the socket is paused, and both resume when one completes. Reading also
 * pauses while more than maxQueuedReplyBytes of replies wait in the socket's write queue.
 *
 * Ending: NBD_CMD_DISC, end of input, a bad magic or shutdown stop the parsing; the connection is
 * ended once the requests in flight have been answered. During shutdown, requests that arrive before
 * that get NBD_ESHUTDOWN, as the spec advises.
 */
import { performance } from 'node:perf_hooks';
import type { Socket } from 'node:net';
import { type BlockDevice, type Extent, InflightList, type ReadResult } from '@cowstack/core';
import type { ByteQueue } from './byte-queue.js';
import { errorMessageOf, nbdErrnoFor, posixCodeOf } from './errno-table.js';
import { extentsToDescriptors } from './extent-descriptors.js';
import type { Negotiated } from './handshake.js';
import { maxDiscardedPayloadBytes, maxQueuedReplyBytes } from './limits.js';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EIO,
  NBD_ESHUTDOWN,
  NBD_REPLY_FLAG_DONE,
  NBD_REQUEST_MAGIC,
  NBD_SUCCESS,
  commandName,
  requestHeaderBytes,
} from './protocol-constants.js';
import { decodeRequestHeader, type RequestHeader } from './request-codec.js';
import { encodeBlockStatusChunk, encodeErrorChunk, encodeOffsetDataHeader, encodeOffsetHole, encodeSimpleReply } from './reply-codec.js';
import { validateRequest, type ValidationContext } from './request-validation.js';

export interface TransmissionOptions {
  readonly maxPayloadBytes: number;
  readonly maxInflightRequests: number;
  readonly log: (message: string) => void;
  readonly onRequest?: (command: string, bytes: number, latencyMs: number) => void;
}

/** What the transmission asks of its connection. */
export interface TransmissionHost {
  /** Flush what was written, then close (a clean disconnect). */
  end(reason: string): void;
  /** Close now (a hard disconnect). */
  destroy(reason: string): void;
}

const zeroes = Buffer.alloc(1024 * 1024);

/** Buffers of zeroes totalling `length`, views of one shared read-only buffer. */
function pushZeroes(out: Buffer[], length: number): void {
  while (length > 0) {
    const step = Math.min(length, zeroes.length);
    out.push(zeroes.subarray(0, step));
    length -= step;
  }
}

interface Segment {
  readonly offset: number;
  length: number;
  readonly data: Buffer | undefined;
}

/** A read result as segments with absolute offsets, adjacent holes merged; throws when it breaks the seam. */
function segmentsOf(result: ReadResult, offset: number, length: number): Segment[] {
  if (!Array.isArray(result)) {
    const data = result as Buffer;
    if (data.length !== length) throw new Error(`device returned ${data.length} bytes for a read of ${length}`);
    return [{ offset, length, data }];
  }
  const segments: Segment[] = [];
  let at = offset;
  for (const piece of result) {
    if (!Number.isSafeInteger(piece.length) || piece.length < 0) throw new Error(`device returned a read piece of length ${piece.length}`);
    if (piece.length === 0) continue;
    if (piece.data !== undefined && piece.data.length !== piece.length) throw new Error(`device returned a read piece of ${piece.data.length} bytes claiming ${piece.length}`);
    const last = segments[segments.length - 1];
    if (piece.data === undefined && last !== undefined && last.data === undefined) last.length += piece.length;
    else segments.push({ offset: at, length: piece.length, data: piece.data });
    at += piece.length;
  }
  if (at - offset !== length) throw new Error(`device returned ${at - offset} bytes for a read of ${length}`);
  return segments;
}

export class Transmission {
  private readonly device: BlockDevice;
  private readonly structured: boolean;
  private readonly validation: ValidationContext;
  private readonly discardCapBytes: number;
  private inflight = 0;
  /** WRITE, WRITE_ZEROES and TRIM operations in flight on the device, for FLUSH ordering (a list, not a Set: see InflightList). */
  private readonly writes = new InflightList<Promise<void>>();
  private pendingWrite: RequestHeader | undefined;
  private pendingWriteStarted = 0;
  /** The payload of pendingWrite, filled as bytes arrive when it did not come in one piece. */
  private pendingPayload: Buffer | undefined;
  private pendingFilled = 0;
  private discardLeft = 0;
  /**
   * The error reply of a rejected WRITE, sent once its payload has been read and discarded: a client
   * such as libnbd only matches replies to requests it has finished sending.
   */
  private discardReply: (() => void) | undefined;
  /** No more requests are parsed. */
  private stopped = false;
  /** End the connection once nothing is in flight. */
  private ending = false;
  private endReason = '';
  private ended = false;
  private shuttingDown = false;
  /** The client closed its side: nothing more will arrive. */
  private inputClosed = false;
  private pumping = false;
  private corked = false;
  private readPaused = false;
  private backlogPaused = false;

  constructor(
    private readonly socket: Socket,
    private readonly queue: ByteQueue,
    private readonly negotiated: Negotiated,
    private readonly options: TransmissionOptions,
    private readonly host: TransmissionHost,
  ) {
    this.device = negotiated.device;
    this.structured = negotiated.structuredReplies;
    this.validation = {
      sizeBytes: negotiated.device.sizeBytes,
      readOnly: negotiated.device.readOnly,
      transmissionFlags: negotiated.transmissionFlags,
      structuredReplies: negotiated.structuredReplies,
      metaContextCount: negotiated.metaContexts.length,
      maxPayloadBytes: options.maxPayloadBytes,
    };
    this.discardCapBytes = maxDiscardedPayloadBytes(options.maxPayloadBytes);
  }

  /** New bytes are in the queue. */
  receive(): void {
    if (this.stopped) {
      this.queue.skip(this.queue.length);
      return;
    }
    this.pump();
  }

  /** The client closed its side: serve what it sent before (some may still be queued), then end. */
  inputEnded(): void {
    this.inputClosed = true;
    if (!this.ending) this.endReason = 'client closed its side of the connection';
    this.ending = true;
    if (!this.stopped) this.pump();
    this.maybeEnd();
  }

  /** Server shutdown: answer what is in flight (and new requests with ESHUTDOWN meanwhile), then end. */
  shutdown(): void {
    this.shuttingDown = true;
    this.ending = true;
    this.endReason = 'server shutdown';
    this.maybeEnd();
  }

  // -------------------------------------------------------------------------------------------
  // parsing

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      const queue = this.queue;
      while (!this.stopped) {
        if (this.discardLeft > 0) {
          this.discardLeft -= queue.skip(this.discardLeft);
          if (this.discardLeft > 0) break;
          const reply = this.discardReply;
          this.discardReply = undefined;
          reply?.();
          continue;
        }
        if (this.pendingWrite !== undefined) {
          const header = this.pendingWrite;
          let payload = this.pendingPayload;
          if (payload === undefined) {
            if (queue.length >= header.length) {
              // all there: a view when it lies in one received chunk, else one copy
              this.pendingWrite = undefined;
              this.startWrite(header, this.pendingWriteStarted, queue.take(header.length));
              continue;
            }
            payload = this.pendingPayload = Buffer.allocUnsafe(header.length);
            this.pendingFilled = 0;
          }
          // copy what has arrived while it is still in cache; the rest follows chunk by chunk
          this.pendingFilled += queue.takeInto(payload, this.pendingFilled, header.length - this.pendingFilled);
          if (this.pendingFilled < header.length) break;
          this.pendingWrite = undefined;
          this.pendingPayload = undefined;
          this.startWrite(header, this.pendingWriteStarted, payload);
          continue;
        }
        if (this.inflight >= this.options.maxInflightRequests) break;
        if (queue.length < requestHeaderBytes) break;
        this.dispatch(decodeRequestHeader(queue.take(requestHeaderBytes)));
      }
    } finally {
      this.pumping = false;
    }
    this.updateReading();
    this.maybeEnd();
  }

  private updateReading(): void {
    const waitingForPayload = this.pendingWrite !== undefined || this.discardLeft > 0;
    const full = !this.stopped && !waitingForPayload && this.inflight >= this.options.maxInflightRequests;
    const pause = full || this.backlogPaused;
    if (pause && !this.readPaused) {
      this.readPaused = true;
      this.socket.pause();
    } else if (!pause && this.readPaused) {
      this.readPaused = false;
      this.socket.resume();
    }
  }

  private stop(reason: string): void {
    if (!this.ending) this.endReason = reason;
    this.stopped = true;
    this.ending = true;
    if (this.pendingWrite !== undefined) {
      // its payload will never arrive: the request is abandoned, not answered
      this.pendingWrite = undefined;
      this.pendingPayload = undefined;
      this.inflight--;
    }
    if (this.discardReply !== undefined) {
      // the rest of its payload will never arrive: abandoned, like a pending write
      this.discardReply = undefined;
      this.inflight--;
    }
    this.discardLeft = 0;
    this.queue.skip(this.queue.length);
    this.maybeEnd();
  }

  private maybeEnd(): void {
    if (!this.ending || this.ended || this.pumping) return;
    if (this.inputClosed && !this.stopped) {
      // Everything the client sent has been parsed as far as it goes (pump runs whenever a request
      // completes); once only a payload that can never arrive is left, stop.
      if (this.inflight > (this.pendingWrite !== undefined || this.discardReply !== undefined ? 1 : 0)) return;
      this.stop(this.endReason); // calls maybeEnd again, stopped
      return;
    }
    if (this.inflight > 0) return;
    this.ended = true;
    this.stopped = true;
    this.host.end(this.endReason);
  }

  private dispatch(header: RequestHeader): void {
    if (header.magic !== NBD_REQUEST_MAGIC) {
      this.options.log(`bad request magic 0x${header.magic.toString(16)}; closing the connection`);
      this.stop('bad request magic');
      return;
    }
    if (header.type === NBD_CMD_DISC) {
      this.stop('client sent NBD_CMD_DISC');
      return;
    }
    const started = this.options.onRequest !== undefined ? performance.now() : 0;
    this.inflight++;
    const rejection = this.shuttingDown ? { errno: NBD_ESHUTDOWN, message: 'the server is shutting down' } : validateRequest(header, this.validation);
    if (rejection !== undefined) {
      if (header.type === NBD_CMD_WRITE) {
        // The payload follows whatever we think of the request: skip it to stay in step, unless it is
        // too large to be anything but an attack (the spec allows a hard disconnect then).
        if (header.length > this.discardCapBytes) {
          this.options.log(`WRITE of ${header.length} bytes exceeds ${this.discardCapBytes}; closing the connection`);
          this.replyError(header, started, rejection.errno, rejection.message);
          this.stop('oversized WRITE payload');
          return;
        }
        if (header.length > 0) {
          this.discardLeft = header.length;
          this.discardReply = () => this.replyError(header, started, rejection.errno, rejection.message);
          return;
        }
      }
      this.replyError(header, started, rejection.errno, rejection.message);
      return;
    }
    switch (header.type) {
      case NBD_CMD_READ:
        this.startRead(header, started);
        return;
      case NBD_CMD_WRITE:
        this.pendingWrite = header;
        this.pendingWriteStarted = started;
        return;
      case NBD_CMD_FLUSH:
        this.startFlush(header, started);
        return;
      case NBD_CMD_TRIM:
        this.startTrackedWrite(header, started, () => this.device.trim(header.offset, header.length, { fua: (header.flags & NBD_CMD_FLAG_FUA) !== 0 }));
        return;
      case NBD_CMD_WRITE_ZEROES: {
        const flags = {
          fua: (header.flags & NBD_CMD_FLAG_FUA) !== 0,
          mayTrim: (header.flags & NBD_CMD_FLAG_NO_HOLE) === 0,
          fast: (header.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0,
        };
        this.startTrackedWrite(header, started, () => this.device.zero(header.offset, header.length, flags));
        return;
      }
      case NBD_CMD_CACHE:
        this.startSimple(header, started, () => this.device.cache(header.offset, header.length));
        return;
      case NBD_CMD_BLOCK_STATUS:
        this.startBlockStatus(header, started);
        return;
    }
    throw new Error(`validated request has unhandled type ${header.type}`);
  }

  // -------------------------------------------------------------------------------------------
  // running requests

  private startRead(header: RequestHeader, started: number): void {
    let op: Promise<ReadResult>;
    try {
      op = Promise.resolve(this.device.read(header.offset, header.length)); // a native promise is passed through as is
    } catch (error) {
      this.fail(header, started, error);
      return;
    }
    op.then(
      (result) => this.replyRead(header, started, result),
      (error) => this.fail(header, started, error),
    );
  }

  private startWrite(header: RequestHeader, started: number, data: Buffer): void {
    this.startTrackedWrite(header, started, () => this.device.write(header.offset, data, { fua: (header.flags & NBD_CMD_FLAG_FUA) !== 0 }));
  }

  /** A write-like operation, tracked so a later FLUSH waits for it. */
  private startTrackedWrite(header: RequestHeader, started: number, run: () => Promise<void>): void {
    let op: Promise<void>;
    try {
      op = Promise.resolve(run());
    } catch (error) {
      this.fail(header, started, error);
      return;
    }
    const entry = this.writes.add(op);
    op.then(
      () => {
        this.writes.remove(entry);
        this.replyOk(header, started);
      },
      (error) => {
        this.writes.remove(entry);
        this.fail(header, started, error);
      },
    );
  }

  private startSimple(header: RequestHeader, started: number, run: () => Promise<void>): void {
    let op: Promise<void>;
    try {
      op = Promise.resolve(run());
    } catch (error) {
      this.fail(header, started, error);
      return;
    }
    op.then(
      () => this.replyOk(header, started),
      (error) => this.fail(header, started, error),
    );
  }

  private startFlush(header: RequestHeader, started: number): void {
    const flush = () => this.device.flush();
    if (this.writes.size === 0) {
      this.startSimple(header, started, flush);
      return;
    }
    const earlier = Promise.allSettled(Array.from(this.writes.values()));
    this.startSimple(header, started, () => earlier.then(flush));
  }

  private startBlockStatus(header: RequestHeader, started: number): void {
    const contexts = this.negotiated.metaContexts;
    let op: Promise<Extent[][]>;
    try {
      op = Promise.all(contexts.map((c) => this.device.extents(header.offset, header.length, c.name)));
    } catch (error) {
      this.fail(header, started, error);
      return;
    }
    op.then(
      (lists) => {
        try {
          const reqOne = (header.flags & NBD_CMD_FLAG_REQ_ONE) !== 0;
          const chunks = contexts.map((context, i) => {
            const descriptors = extentsToDescriptors(lists[i], {
              offset: header.offset,
              length: header.length,
              sizeBytes: this.validation.sizeBytes,
              reqOne,
              context: context.name,
            });
            return encodeBlockStatusChunk(i === contexts.length - 1 ? NBD_REPLY_FLAG_DONE : 0, header.cookie, context.id, descriptors);
          });
          this.send(chunks);
          this.finish(header, started);
        } catch (error) {
          this.fail(header, started, error);
        }
      },
      (error) => this.fail(header, started, error),
    );
  }

  // -------------------------------------------------------------------------------------------
  // replies

  private replyRead(header: RequestHeader, started: number, result: ReadResult): void {
    let segments: Segment[];
    try {
      segments = segmentsOf(result, header.offset, header.length);
    } catch (error) {
      this.fail(header, started, error);
      return;
    }
    try {
      const out: Buffer[] = [];
      const cookie = header.cookie;
      if (!this.structured) {
        out.push(encodeSimpleReply(cookie, NBD_SUCCESS));
        for (const s of segments) {
          if (s.data !== undefined) out.push(s.data);
          else pushZeroes(out, s.length);
        }
      } else if (segments.length === 1 || (header.flags & NBD_CMD_FLAG_DF) !== 0) {
        // one content chunk: data, a single hole, or (DF with data and holes mixed) data with zeroes
        const only = segments.length === 1 ? segments[0] : undefined;
        if (only !== undefined && only.data === undefined) out.push(encodeOffsetHole(NBD_REPLY_FLAG_DONE, cookie, header.offset, header.length));
        else {
          out.push(encodeOffsetDataHeader(NBD_REPLY_FLAG_DONE, cookie, header.offset, header.length));
          for (const s of segments) {
            if (s.data !== undefined) out.push(s.data);
            else pushZeroes(out, s.length);
          }
        }
      } else {
        const last = segments.length - 1;
        segments.forEach((s, i) => {
          const flags = i === last ? NBD_REPLY_FLAG_DONE : 0;
          if (s.data === undefined) out.push(encodeOffsetHole(flags, cookie, s.offset, s.length));
          else out.push(encodeOffsetDataHeader(flags, cookie, s.offset, s.length), s.data);
        });
      }
      this.send(out, this.device.recycle === undefined ? undefined : () => this.recycle(result));
      this.finish(header, started);
    } catch (error) {
      this.internalError(error);
    }
  }

  /** The read's bytes have left: the device may reuse its buffers. A throw here ends nothing. */
  private recycle(result: ReadResult): void {
    try {
      this.device.recycle?.(result);
    } catch (error) {
      this.options.log(`device recycle threw: ${errorMessageOf(error)}`);
    }
  }

  private replyOk(header: RequestHeader, started: number): void {
    try {
      // A simple reply is allowed for every successful non-READ, structured or not.
      this.send([encodeSimpleReply(header.cookie, NBD_SUCCESS)]);
      this.finish(header, started);
    } catch (error) {
      this.internalError(error);
    }
  }

  private fail(header: RequestHeader, started: number, error: unknown): void {
    try {
      const errno = nbdErrnoFor(error, header.type, header.flags);
      if (errno === NBD_EIO && posixCodeOf(error) === undefined) {
        this.options.log(`${commandName(header.type)} at ${header.offset}+${header.length} failed unexpectedly: ${errorMessageOf(error)}`);
      }
      this.replyError(header, started, errno, errorMessageOf(error));
    } catch (inner) {
      this.internalError(inner);
    }
  }

  private replyError(header: RequestHeader, started: number, errno: number, message: string): void {
    this.send([this.structured ? encodeErrorChunk(NBD_REPLY_FLAG_DONE, header.cookie, errno, message) : encodeSimpleReply(header.cookie, errno)]);
    this.finish(header, started);
  }

  private finish(header: RequestHeader, started: number): void {
    this.inflight--;
    const onRequest = this.options.onRequest;
    if (onRequest !== undefined) {
      try {
        onRequest(commandName(header.type), header.type === NBD_CMD_FLUSH ? 0 : header.length, performance.now() - started);
      } catch (error) {
        this.options.log(`onRequest hook threw: ${errorMessageOf(error)}`);
      }
    }
    if (!this.pumping) {
      if (this.queue.length > 0 && !this.stopped) this.pump();
      else this.updateReading();
    }
    this.maybeEnd();
  }

  /** Queue a reply; `sent` runs once its bytes have left (not if the connection dies first). */
  private send(buffers: readonly Buffer[], sent?: () => void): void {
    const socket = this.socket;
    if (socket.destroyed || socket.writableEnded) return;
    if (!this.corked) {
      this.corked = true;
      socket.cork();
      process.nextTick(this.uncork);
    }
    const last = buffers.length - 1;
    for (let i = 0; i < last; i++) socket.write(buffers[i]);
    if (sent === undefined) socket.write(buffers[last]);
    else socket.write(buffers[last], (err) => err == null && sent());
    if (!this.backlogPaused && socket.writableLength > maxQueuedReplyBytes) {
      this.backlogPaused = true;
      this.updateReading();
      socket.once('drain', this.onDrain);
    }
  }

  private readonly uncork = (): void => {
    this.corked = false;
    if (!this.socket.destroyed) this.socket.uncork();
  };

  private readonly onDrain = (): void => {
    this.backlogPaused = false;
    if (!this.stopped && this.queue.length > 0) this.pump();
    else this.updateReading();
  };

  private internalError(error: unknown): void {
    this.options.log(`internal error, closing the connection: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
    this.stopped = true;
    this.ended = true;
    this.host.destroy('internal error');
  }
}
