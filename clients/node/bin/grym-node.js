#!/usr/bin/env node
'use strict';
/**
 * grym-node: command-line client of the grym-synth Orchestrator (Node.js).
 *
 *   grym-node [--target HOST:PORT] [--timeout S] [--json] health
 *   grym-node [...] analyze WAV [--features]
 *   grym-node [...] stream WAV [--chunk-frames N]      (StreamAnalyze: one line per window, then the final one)
 *   grym-node [...] generate PROMPT [--seconds S] [--steps N] [--seed N] [--out FILE.wav]
 *                                                      (Generate: progress per step, audio chunks, then the result)
 *
 * --json prints one JSON object per line (per event for streams) for scripts and tests; the default is one
 * human-readable line. Exit status: 0 ok, 1 RPC failed, 2 usage error, 3 health not SERVING.
 */
const fs = require('node:fs');
const grpc = require('@grpc/grpc-js');
const { GrymClient, readWavPcm } = require('../src/client');

const USAGE = `usage: grym-node [--target HOST:PORT] [--timeout SECONDS] [--json] COMMAND
commands:
  health                          grpc.health.v1 Check of the whole server; prints the status (SERVING)
  analyze WAV [--features]        AnalyzeAudio; prints frames and embedding length
  stream WAV [--chunk-frames N]   StreamAnalyze; prints each window's result in order, then the final one
  generate PROMPT [--seconds S] [--steps N] [--seed N] [--out FILE.wav]
                                  Generate; prints each progress event, audio chunk and the result in order
environment: GRYM_TARGET (default 127.0.0.1:50051)`;

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = { target: process.env.GRYM_TARGET || '127.0.0.1:50051', timeoutS: 60, json: false, features: false, chunkFrames: 8000,
    seconds: 0, steps: 0, seed: null, out: null };
  const positional = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === '--target') opts.target = value();
    else if (arg === '--timeout') opts.timeoutS = Number(value());
    else if (arg === '--json') opts.json = true;
    else if (arg === '--features') opts.features = true;
    else if (arg === '--chunk-frames') opts.chunkFrames = Number.parseInt(value(), 10);
    else if (arg === '--seconds') opts.seconds = Number(value());
    else if (arg === '--steps') opts.steps = Number.parseInt(value(), 10);
    else if (arg === '--seed') opts.seed = value();
    else if (arg === '--out') opts.out = value();
    else if (arg === '-h' || arg === '--help') throw new UsageError('');
    else if (arg.startsWith('--')) throw new UsageError(`unknown option ${arg}`);
    else positional.push(arg);
  }
  if (!(opts.timeoutS > 0)) throw new UsageError('--timeout must be > 0');
  if (!(opts.chunkFrames > 0)) throw new UsageError('--chunk-frames must be > 0');
  if (!(opts.seconds >= 0) || !(opts.steps >= 0)) throw new UsageError('--seconds and --steps must be >= 0');
  if (opts.seed !== null && !/^-?[0-9]+$/.test(opts.seed)) throw new UsageError('--seed must be an integer');
  if (positional.length === 0) throw new UsageError('missing command');
  return { opts, command: positional[0], args: positional.slice(1) };
}

function needFile(args, what) {
  if (args.length !== 1) throw new UsageError(`${what} needs exactly one WAV path`);
  return args[0];
}

function fmt(x) {
  return Number(x).toFixed(3);
}

async function run({ opts, command, args }) {
  const client = new GrymClient(opts.target, { timeoutS: opts.timeoutS });
  try {
    if (command === 'health') {
      if (args.length) throw new UsageError('health takes no arguments');
      const status = await client.checkHealth('');
      console.log(opts.json ? JSON.stringify({ status }) : status);
      return status === 'SERVING' ? 0 : 3;
    }
    if (command === 'analyze') {
      const res = await client.analyzeWav(fs.readFileSync(needFile(args, 'analyze')), { includeFeatures: opts.features });
      const out = {
        request_id: res.request_id,
        frames: res.frames,
        embedding_len: res.embedding.length,
        duration_seconds: res.duration_seconds,
        model: res.model,
        profile: res.profile,
      };
      if (opts.features && res.features) out.features_shape = [res.features.rows, res.features.cols];
      if (opts.json) console.log(JSON.stringify({ ...out, embedding: res.embedding }));
      else {
        const extra = out.features_shape ? ` features=${out.features_shape.join('x')}` : '';
        console.log(`frames=${out.frames} embedding_len=${out.embedding_len} duration_s=${fmt(out.duration_seconds)} ` +
          `model=${out.model} profile=${out.profile} request_id=${out.request_id}${extra}`);
      }
      return 0;
    }
    if (command === 'stream') {
      const pcm = readWavPcm(fs.readFileSync(needFile(args, 'stream')));
      for await (const ev of client.streamAnalyze(pcm, { chunkFrames: opts.chunkFrames })) {
        const out = {
          request_id: ev.request_id,
          is_final: ev.is_final,
          window_index: ev.window_index,
          start_seconds: ev.start_seconds,
          end_seconds: ev.end_seconds,
          frames: ev.frames,
          embedding_len: ev.embedding.length,
        };
        if (opts.json) console.log(JSON.stringify({ ...out, embedding: ev.embedding }));
        else console.log(`${out.is_final ? 'final ' : 'window'} index=${out.window_index} ` +
          `start_s=${fmt(out.start_seconds)} end_s=${fmt(out.end_seconds)} frames=${out.frames} embedding_len=${out.embedding_len}`);
      }
      return 0;
    }
    if (command === 'generate') {
      if (args.length !== 1) throw new UsageError('generate needs exactly one PROMPT');
      const request = { prompt: args[0], duration_seconds: opts.seconds, steps: opts.steps };
      if (opts.seed !== null) request.seed = opts.seed; // int64 as a decimal string: no precision loss
      const wav = [];
      for await (const ev of client.generate(request)) {
        const out = generateEvent(ev);
        if (ev.event === 'audio') wav.push(ev.audio.wav_data);
        console.log(opts.json ? JSON.stringify(out) : generateLine(out));
      }
      if (opts.out) fs.writeFileSync(opts.out, Buffer.concat(wav));
      return 0;
    }
    throw new UsageError(`unknown command ${command}`);
  } finally {
    client.close();
  }
}

/** One Generate event as a flat object: {event: "progress" | "audio" | "result", ...its fields}. */
function generateEvent(ev) {
  if (ev.event === 'progress') {
    return { event: 'progress', request_id: ev.request_id, step: ev.progress.step, total_steps: ev.progress.total_steps };
  }
  if (ev.event === 'audio') {
    const a = ev.audio;
    return { event: 'audio', request_id: ev.request_id, chunk_index: a.chunk_index, bytes: a.wav_data.length,
      last: a.last, sample_rate_hz: a.sample_rate_hz };
  }
  if (ev.event === 'result') {
    const r = ev.result;
    return { event: 'result', request_id: ev.request_id, seed: String(r.seed), duration_seconds: r.duration_seconds,
      sample_rate_hz: r.sample_rate_hz, frames: r.frames, embedding_len: r.embedding.length, embedding: r.embedding,
      pattern_id: r.pattern_id, cached: r.cached };
  }
  throw new Error(`unknown Generate event ${ev.event}`);
}

function generateLine(out) {
  if (out.event === 'progress') return `progress step=${out.step}/${out.total_steps}`;
  if (out.event === 'audio') return `audio    chunk=${out.chunk_index} bytes=${out.bytes} last=${out.last}`;
  return `result   seed=${out.seed} duration_s=${fmt(out.duration_seconds)} sample_rate_hz=${out.sample_rate_hz} ` +
    `frames=${out.frames} embedding_len=${out.embedding_len} cached=${out.cached}` +
    (out.pattern_id ? ` pattern_id=${out.pattern_id}` : '');
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs(process.argv.slice(2));
    return await run(parsed);
  } catch (err) {
    if (err instanceof UsageError) {
      if (err.message) console.error(`error: ${err.message}`);
      console.error(USAGE);
      return 2;
    }
    if (err && typeof err.code === 'number' && grpc.status[err.code] !== undefined) {
      console.error(`error: ${grpc.status[err.code]}: ${err.details}`);
    } else {
      console.error(`error: ${err && err.message ? err.message : err}`);
    }
    return 1;
  }
}

main().then((code) => {
  process.exitCode = code;
});
