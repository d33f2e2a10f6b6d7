// Minimal RIFF/WAVE reader for the streaming command: finds the PCM payload and its format.
#pragma once

#include <cstdint>
#include <string>

namespace grym {

// The PCM payload of a WAV file in one of the two encodings StreamAnalyze accepts without conversion.
struct WavPcm {
  int sample_rate_hz = 0;
  int channels = 0;
  bool float32 = false;       // true: IEEE float32 (ENCODING_FLOAT32); false: signed 16-bit (ENCODING_LINEAR16)
  int bytes_per_sample = 0;
  std::string data;           // interleaved samples, trimmed to whole frames
};

// Reads a whole file into memory; throws std::runtime_error when it cannot be read.
std::string ReadFile(const std::string& path);

// Parses 16-bit integer or 32-bit float WAV bytes (WAVE_FORMAT_EXTENSIBLE included); throws std::runtime_error
// for anything else so that what the server analyses is exactly what the file holds.
WavPcm ParseWav(const std::string& bytes);

}  // namespace grym
