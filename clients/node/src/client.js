'use strict';
/**
 * Node.js client of the grym-synth Orchestrator API.
 *
 * The stubs are built at run time from the repository's proto/ files with @grpc/proto-loader, so the client can
 * never drift from the API it is run against and needs no code generation step. Everything here returns
 * Promises (unary) or async iterables (streams) so that the CLI, and callers embedding this module, read in
 * plain order.
 */
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const health = require('grpc-health-check');

/** proto/ of the repository this client lives in; GRYM_PROTO_DIR overrides it for installed copies. */
const PROTO_DIR = process.env.GRYM_PROTO_DIR || path.resolve(__dirname, '..', '..', '..', 'proto');

/** Options that keep field names as in the .proto (snake_case) and enums as their names. */
const LOADER_OPTIONS = {
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

/** Every .proto under PROTO_DIR, relative to it, sorted (the loader resolves imports from includeDirs). */
function protoFiles() {
  const found = [];
  const walk = (dir) => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const full = path.join(dir, entry.name);
      if (entry.isDirectory()) walk(full);
      else if (entry.name.endsWith('.proto')) found.push(path.relative(PROTO_DIR, full));
    }
  };
  walk(PROTO_DIR);
  return found.sort();
}

let cached = null;

/** Loads proto/ once; returns the grpc package object (grpc.v1.Orchestrator etc.). */
function loadProtos() {
  if (!cached) {
    const files = protoFiles();
    if (files.length === 0) throw new Error(`no .proto files under ${PROTO_DIR}`);
    const definition = protoLoader.loadSync(files, LOADER_OPTIONS);
    cached = grpc.loadPackageDefinition(definition);
  }
  return cached;
}

/** Channel options shared by both stubs: large messages (audio, features) both ways. */
const CHANNEL_OPTIONS = {
  'grpc.max_receive_message_length': 64 * 1024 * 1024,
  'grpc.max_send_message_length': 64 * 1024 * 1024,
};

/** A connected pair of stubs (Orchestrator + grpc.health.v1.Health) on one insecure channel. */
class GrymClient {
  constructor(target, { timeoutS = 60 } = {}) {
    const pkg = loadProtos();
    const creds = grpc.credentials.createInsecure();
    this.timeoutS = timeoutS;
    this.orchestrator = new pkg.grym.v1.Orchestrator(target, creds, CHANNEL_OPTIONS);
    const HealthClient = grpc.makeGenericClientConstructor(health.service, 'Health');
    // Share the Orchestrator's channel so both stubs see the same connection state.
    this.health = new HealthClient(target, creds, { channelOverride: this.orchestrator.getChannel() });
  }

  deadline() {
    return new Date(Date.now() + this.timeoutS * 1000);
  }

  /** grpc.health.v1.Health/Check; returns the status name ("SERVING", "NOT_SERVING", ...). */
  checkHealth(service = '') {
    return new Promise((resolve, reject) => {
      this.health.check({ service }, { deadline: this.deadline() }, (err, res) => {
        if (err) reject(err);
        else resolve(statusName(res.status));
      });
    });
  }

  /** Unary AnalyzeAudio of a whole WAV file. */
  analyzeWav(wavBytes, { includeFeatures = false, requestId = '' } = {}) {
    const request = { request_id: requestId, audio: { wav: wavBytes }, include_features: includeFeatures };
    return new Promise((resolve, reject) => {
      this.orchestrator.AnalyzeAudio(request, { deadline: this.deadline() }, (err, res) => {
        if (err) reject(err);
        else resolve(res);
      });
    });
  }

  /**
   * Bidirectional StreamAnalyze: sends the config, then the PCM in chunks of `chunkFrames` frames, then
   * half-closes; yields every response in arrival order.
   */
  async *streamAnalyze(pcm, { chunkFrames = 8000, requestId = '' } = {}) {
    const call = this.orchestrator.StreamAnalyze({ deadline: this.deadline() });
    call.write({
      request_id: requestId,
      config: { sample_rate_hz: pcm.sampleRate, channels: pcm.channels, encoding: pcm.encoding },
    });
    const frameBytes = pcm.bytesPerSample * pcm.channels;
    const step = Math.max(1, chunkFrames) * frameBytes;
    for (let off = 0; off < pcm.data.length; off += step) {
      call.write({ audio_content: pcm.data.subarray(off, Math.min(off + step, pcm.data.length)) });
    }
    call.end();
    for await (const response of call) yield response;
  }

  /**
   * Server-streaming Generate: yields every event (progress per denoising step, WAV chunks, the result) in
   * arrival order. `request` uses the proto's field names (prompt, duration_seconds, steps, seed, ...).
   */
  async *generate(request) {
    const call = this.orchestrator.Generate(request, { deadline: this.deadline() });
    for await (const event of call) yield event;
  }

  close() {
    this.orchestrator.close();
  }
}

/** The grpc-health-check loader keeps enums as numbers; map them to the proto's names. */
function statusName(status) {
  const names = ['UNKNOWN', 'SERVING', 'NOT_SERVING', 'SERVICE_UNKNOWN'];
  return typeof status === 'number' ? names[status] ?? String(status) : String(status);
}

/**
 * Reads the PCM payload of a RIFF/WAVE file: 16-bit integer PCM (sent as ENCODING_LINEAR16) or 32-bit float
 * (sent as ENCODING_FLOAT32), the two encodings StreamAnalyze accepts as-is. Other formats are rejected with a
 * message rather than converted, so what the server analyses is byte-for-byte what the file holds.
 */
function readWavPcm(buffer) {
  if (buffer.length < 12 || buffer.toString('ascii', 0, 4) !== 'RIFF' || buffer.toString('ascii', 8, 12) !== 'WAVE') {
    throw new Error('not a RIFF/WAVE file');
  }
  let fmt = null;
  let data = null;
  for (let off = 12; off + 8 <= buffer.length; ) {
    const id = buffer.toString('ascii', off, off + 4);
    const size = buffer.readUInt32LE(off + 4);
    const body = buffer.subarray(off + 8, Math.min(off + 8 + size, buffer.length));
    if (id === 'fmt ') {
      let format = body.readUInt16LE(0);
      if (format === 0xfffe && body.length >= 26) format = body.readUInt16LE(24); // WAVE_FORMAT_EXTENSIBLE
      fmt = { format, channels: body.readUInt16LE(2), sampleRate: body.readUInt32LE(4), bits: body.readUInt16LE(14) };
    } else if (id === 'data') {
      data = body;
    }
    off += 8 + size + (size % 2); // chunks are word-aligned
  }
  if (!fmt || !data) throw new Error('WAV file without fmt or data chunk');
  let encoding;
  if (fmt.format === 1 && fmt.bits === 16) encoding = 'ENCODING_LINEAR16';
  else if (fmt.format === 3 && fmt.bits === 32) encoding = 'ENCODING_FLOAT32';
  else throw new Error(`unsupported WAV encoding (format ${fmt.format}, ${fmt.bits} bits): use 16-bit PCM or 32-bit float`);
  const bytesPerSample = fmt.bits / 8;
  const whole = data.length - (data.length % (bytesPerSample * fmt.channels));
  return {
    sampleRate: fmt.sampleRate,
    channels: fmt.channels,
    encoding,
    bytesPerSample,
    data: data.subarray(0, whole),
  };
}

module.exports = { GrymClient, loadProtos, readWavPcm, protoFiles, PROTO_DIR };
