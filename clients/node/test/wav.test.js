'use strict';
// Unit tests of the WAV reader that feeds StreamAnalyze (node --test clients/node/test/).
const test = require('node:test');
const assert = require('node:assert');
const { readWavPcm } = require('../src/client');

/** A RIFF/WAVE file with the given fmt fields, an unknown chunk before data (must be skipped) and `data`. */
function wav({ format, channels, rate, bits, data, extensibleSubformat }) {
  const fmtSize = extensibleSubformat === undefined ? 16 : 40;
  const fmt = Buffer.alloc(8 + fmtSize);
  fmt.write('fmt ', 0, 'ascii');
  fmt.writeUInt32LE(fmtSize, 4);
  fmt.writeUInt16LE(extensibleSubformat === undefined ? format : 0xfffe, 8);
  fmt.writeUInt16LE(channels, 10);
  fmt.writeUInt32LE(rate, 12);
  fmt.writeUInt32LE(rate * channels * (bits / 8), 16);
  fmt.writeUInt16LE(channels * (bits / 8), 20);
  fmt.writeUInt16LE(bits, 22);
  if (extensibleSubformat !== undefined) {
    fmt.writeUInt16LE(22, 24);
    fmt.writeUInt16LE(extensibleSubformat, 32);
  }
  const odd = Buffer.from('LIST\x03\x00\x00\x00abc\x00', 'latin1'); // odd-sized chunk + pad byte
  const dataHdr = Buffer.alloc(8);
  dataHdr.write('data', 0, 'ascii');
  dataHdr.writeUInt32LE(data.length, 4);
  const body = Buffer.concat([Buffer.from('WAVE'), fmt, odd, dataHdr, data]);
  const riff = Buffer.alloc(8);
  riff.write('RIFF', 0, 'ascii');
  riff.writeUInt32LE(body.length, 4);
  return Buffer.concat([riff, body]);
}

test('16-bit PCM is sent as LINEAR16 with its rate and channels', () => {
  const samples = Buffer.alloc(2 * 2 * 5); // 5 stereo frames
  const pcm = readWavPcm(wav({ format: 1, channels: 2, rate: 44100, bits: 16, data: samples }));
  assert.deepStrictEqual([pcm.encoding, pcm.channels, pcm.sampleRate, pcm.bytesPerSample, pcm.data.length],
    ['ENCODING_LINEAR16', 2, 44100, 2, 20]);
});

test('float32 (also as WAVE_FORMAT_EXTENSIBLE) is sent as FLOAT32, trailing partial frame dropped', () => {
  const data = Buffer.alloc(4 * 3 + 2);
  const pcm = readWavPcm(wav({ format: 3, channels: 1, rate: 16000, bits: 32, data, extensibleSubformat: 3 }));
  assert.strictEqual(pcm.encoding, 'ENCODING_FLOAT32');
  assert.strictEqual(pcm.data.length, 12);
});

test('24-bit PCM and non-WAV bytes are rejected', () => {
  assert.throws(() => readWavPcm(wav({ format: 1, channels: 1, rate: 16000, bits: 24, data: Buffer.alloc(6) })),
    /unsupported WAV encoding/);
  assert.throws(() => readWavPcm(Buffer.from('not a wav file at all')), /not a RIFF\/WAVE file/);
});
