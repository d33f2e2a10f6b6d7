#include "wav.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace grym {
namespace {

uint32_t U32(const std::string& b, size_t off) {
  return static_cast<uint32_t>(static_cast<unsigned char>(b[off])) |
         static_cast<uint32_t>(static_cast<unsigned char>(b[off + 1])) << 8 |
         static_cast<uint32_t>(static_cast<unsigned char>(b[off + 2])) << 16 |
         static_cast<uint32_t>(static_cast<unsigned char>(b[off + 3])) << 24;
}

uint16_t U16(const std::string& b, size_t off) {
  return static_cast<uint16_t>(static_cast<unsigned char>(b[off]) |
                               static_cast<unsigned char>(b[off + 1]) << 8);
}

}  // namespace

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

WavPcm ParseWav(const std::string& b) {
  if (b.size() < 12 || b.compare(0, 4, "RIFF") != 0 || b.compare(8, 4, "WAVE") != 0) {
    throw std::runtime_error("not a RIFF/WAVE file");
  }
  bool have_fmt = false, have_data = false;
  int format = 0, bits = 0;
  WavPcm pcm;
  for (size_t off = 12; off + 8 <= b.size();) {
    const std::string id = b.substr(off, 4);
    const size_t size = U32(b, off + 4);
    const size_t body = off + 8;
    const size_t avail = std::min(size, b.size() - body);
    if (id == "fmt " && avail >= 16) {
      format = U16(b, body);
      if (format == 0xFFFE && avail >= 26) format = U16(b, body + 24);  // WAVE_FORMAT_EXTENSIBLE sub-format
      pcm.channels = U16(b, body + 2);
      pcm.sample_rate_hz = static_cast<int>(U32(b, body + 4));
      bits = U16(b, body + 14);
      have_fmt = true;
    } else if (id == "data") {
      pcm.data = b.substr(body, avail);
      have_data = true;
    }
    off = body + size + (size % 2);  // chunks are word-aligned
  }
  if (!have_fmt || !have_data) throw std::runtime_error("WAV file without fmt or data chunk");
  if (format == 1 && bits == 16) {
    pcm.float32 = false;
  } else if (format == 3 && bits == 32) {
    pcm.float32 = true;
  } else {
    throw std::runtime_error("unsupported WAV encoding (format " + std::to_string(format) + ", " +
                             std::to_string(bits) + " bits): use 16-bit PCM or 32-bit float");
  }
  if (pcm.channels <= 0) throw std::runtime_error("WAV file with 0 channels");
  pcm.bytes_per_sample = bits / 8;
  const size_t frame = static_cast<size_t>(pcm.bytes_per_sample) * pcm.channels;
  pcm.data.resize(pcm.data.size() - pcm.data.size() % frame);
  return pcm;
}

}  // namespace grym
