/**
 * @cowstack/core: the copy-on-write engine.
 */
export { BlockDeviceError } from './block-device.js';
export type {
  BlockDevice,
  BlockDeviceErrorCode,
  ExportInfo,
  ExportProvider,
  Extent,
  ExtentContext,
  ReadPiece,
  ReadResult,
  WriteFlags,
  ZeroFlags,
} from './block-device.js';
