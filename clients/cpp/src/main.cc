// grym-cpp: command-line client of the grym-synth Orchestrator (C++, synchronous gRPC API).
//
//   grym-cpp [--target HOST:PORT] [--timeout S] [--json] health
//   grym-cpp [...] analyze WAV [--features]
//   grym-cpp [...] stream WAV [--chunk-frames N]     (StreamAnalyze: one line per window, then the final one)
//   grym-cpp [...] generate PROMPT [--seconds S] [--steps N] [--seed N] [--out FILE.wav]
//                                                    (Generate: progress per step, audio chunks, then the result)
//
// --json prints one JSON object per line (per event for streams) for scripts and tests. Exit status: 0 ok,
// 1 RPC failed, 2 usage error, 3 health not SERVING. It exists to prove the API is usable from C++ with the
// distribution's stock toolchain, and as a starting point for native integrations.
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "grpc/health/v1/health.grpc.pb.h"
#include "grym/v1/orchestrator.grpc.pb.h"
#include "wav.h"

namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;
using grym::v1::Orchestrator;

constexpr int kExitOk = 0, kExitRpc = 1, kExitUsage = 2, kExitNotServing = 3;
constexpr int kMaxMessageBytes = 64 * 1024 * 1024;

const char kUsage[] =
    "usage: grym-cpp [--target HOST:PORT] [--timeout SECONDS] [--json] COMMAND\n"
    "commands:\n"
    "  health                          grpc.health.v1 Check of the whole server; prints the status (SERVING)\n"
    "  analyze WAV [--features]        AnalyzeAudio; prints frames and embedding length\n"
    "  stream WAV [--chunk-frames N]   StreamAnalyze; prints each window's result in order, then the final one\n"
    "  generate PROMPT [--seconds S] [--steps N] [--seed N] [--out FILE.wav]\n"
    "                                  Generate; prints each progress event, audio chunk and the result in order\n"
    "environment: GRYM_TARGET (default 127.0.0.1:50051)\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct RpcError : std::runtime_error {
  explicit RpcError(const grpc::Status& s)
      : std::runtime_error(CodeName(s.error_code()) + ": " + s.error_message()) {}
  static std::string CodeName(grpc::StatusCode c) {
    static const char* names[] = {"OK",           "CANCELLED",        "UNKNOWN",           "INVALID_ARGUMENT",
                                  "DEADLINE_EXCEEDED", "NOT_FOUND",   "ALREADY_EXISTS",    "PERMISSION_DENIED",
                                  "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",  "OUT_OF_RANGE",
                                  "UNIMPLEMENTED", "INTERNAL",        "UNAVAILABLE",       "DATA_LOSS",
                                  "UNAUTHENTICATED"};
    const int i = static_cast<int>(c);
    return (i >= 0 && i <= 16) ? names[i] : std::to_string(i);
  }
};

struct Options {
  std::string target;
  double timeout_s = 60;
  bool json = false;
  bool features = false;
  int chunk_frames = 8000;
  double seconds = 0;
  int steps = 0;
  bool has_seed = false;
  long long seed = 0;
  std::string out;
  std::string command;
  std::vector<std::string> args;
};

Options ParseArgs(int argc, char** argv) {
  Options o;
  const char* env = std::getenv("GRYM_TARGET");
  o.target = env && *env ? env : "127.0.0.1:50051";
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(a + " needs a value");
      return argv[++i];
    };
    if (a == "--target") {
      o.target = value();
    } else if (a == "--timeout") {
      o.timeout_s = std::atof(value().c_str());
    } else if (a == "--json") {
      o.json = true;
    } else if (a == "--features") {
      o.features = true;
    } else if (a == "--chunk-frames") {
      o.chunk_frames = std::atoi(value().c_str());
    } else if (a == "--seconds") {
      o.seconds = std::atof(value().c_str());
    } else if (a == "--steps") {
      o.steps = std::atoi(value().c_str());
    } else if (a == "--seed") {
      const std::string v = value();
      char* end = nullptr;
      o.seed = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0') throw UsageError("--seed must be an integer");
      o.has_seed = true;
    } else if (a == "--out") {
      o.out = value();
    } else if (a == "-h" || a == "--help") {
      throw UsageError("");
    } else if (a.rfind("--", 0) == 0) {
      throw UsageError("unknown option " + a);
    } else {
      positional.push_back(a);
    }
  }
  if (!(o.timeout_s > 0)) throw UsageError("--timeout must be > 0");
  if (o.chunk_frames <= 0) throw UsageError("--chunk-frames must be > 0");
  if (o.seconds < 0 || o.steps < 0) throw UsageError("--seconds and --steps must be >= 0");
  if (positional.empty()) throw UsageError("missing command");
  o.command = positional[0];
  o.args.assign(positional.begin() + 1, positional.end());
  return o;
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

// Shortest round-trip text of a float32 (9 significant digits).
std::string Num(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}

template <typename Repeated>
std::string JsonFloats(const Repeated& values) {
  std::string out = "[";
  for (int i = 0; i < values.size(); ++i) {
    if (i) out += ',';
    out += Num(values.Get(i));
  }
  return out + "]";
}

std::string Fixed3(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3f", v);
  return buf;
}

const std::string& OnlyPath(const Options& o) {
  if (o.args.size() != 1) throw UsageError(o.command + " needs exactly one WAV path");
  return o.args[0];
}

class Client {
 public:
  explicit Client(const Options& o) : opts_(o) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(kMaxMessageBytes);
    args.SetMaxSendMessageSize(kMaxMessageBytes);
    channel_ = grpc::CreateCustomChannel(o.target, grpc::InsecureChannelCredentials(), args);
    orchestrator_ = Orchestrator::NewStub(channel_);
    health_ = Health::NewStub(channel_);
  }

  int CheckHealth() {
    if (!opts_.args.empty()) throw UsageError("health takes no arguments");
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    HealthCheckRequest req;
    req.set_service("");
    HealthCheckResponse res;
    const grpc::Status s = health_->Check(&ctx, req, &res);
    if (!s.ok()) throw RpcError(s);
    const std::string status = HealthCheckResponse::ServingStatus_Name(res.status());
    std::cout << (opts_.json ? "{\"status\":" + JsonString(status) + "}" : status) << std::endl;
    return res.status() == HealthCheckResponse::SERVING ? kExitOk : kExitNotServing;
  }

  int Analyze() {
    grym::v1::AnalyzeAudioRequest req;
    req.mutable_audio()->set_wav(grym::ReadFile(OnlyPath(opts_)));
    req.set_include_features(opts_.features);
    grym::v1::AnalyzeAudioResponse res;
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    const grpc::Status s = orchestrator_->AnalyzeAudio(&ctx, req, &res);
    if (!s.ok()) throw RpcError(s);
    if (opts_.json) {
      std::ostringstream js;
      js << "{\"request_id\":" << JsonString(res.request_id()) << ",\"frames\":" << res.frames()
         << ",\"embedding_len\":" << res.embedding_size() << ",\"duration_seconds\":" << Num(res.duration_seconds())
         << ",\"model\":" << JsonString(res.model()) << ",\"profile\":" << JsonString(res.profile());
      if (opts_.features && res.has_features()) {
        js << ",\"features_shape\":[" << res.features().rows() << "," << res.features().cols() << "]";
      }
      js << ",\"embedding\":" << JsonFloats(res.embedding()) << "}";
      std::cout << js.str() << std::endl;
    } else {
      std::cout << "frames=" << res.frames() << " embedding_len=" << res.embedding_size()
                << " duration_s=" << Fixed3(res.duration_seconds()) << " model=" << res.model()
                << " profile=" << res.profile() << " request_id=" << res.request_id();
      if (opts_.features && res.has_features()) {
        std::cout << " features=" << res.features().rows() << "x" << res.features().cols();
      }
      std::cout << std::endl;
    }
    return kExitOk;
  }

  // Bidirectional stream: a writer thread sends the config and the chunks while this thread prints every
  // response as it arrives (reading concurrently keeps flow control from stalling either side).
  int Stream() {
    const grym::WavPcm pcm = grym::ParseWav(grym::ReadFile(OnlyPath(opts_)));
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    auto stream = orchestrator_->StreamAnalyze(&ctx);
    std::thread writer([&] {
      grym::v1::StreamAnalyzeRequest first;
      auto* cfg = first.mutable_config();
      cfg->set_sample_rate_hz(pcm.sample_rate_hz);
      cfg->set_channels(pcm.channels);
      cfg->set_encoding(pcm.float32 ? grym::v1::PcmAudio::ENCODING_FLOAT32 : grym::v1::PcmAudio::ENCODING_LINEAR16);
      bool ok = stream->Write(first);
      const size_t step = static_cast<size_t>(opts_.chunk_frames) * pcm.bytes_per_sample * pcm.channels;
      for (size_t off = 0; ok && off < pcm.data.size(); off += step) {
        grym::v1::StreamAnalyzeRequest chunk;
        chunk.set_audio_content(pcm.data.substr(off, step));
        ok = stream->Write(chunk);
      }
      stream->WritesDone();  // a failed Write means the server ended the call; Finish() reports why
    });
    grym::v1::StreamAnalyzeResponse ev;
    while (stream->Read(&ev)) PrintStreamEvent(ev);
    writer.join();
    const grpc::Status s = stream->Finish();
    if (!s.ok()) throw RpcError(s);
    return kExitOk;
  }

  // Server-streaming Generate: prints every event as it arrives; the WAV chunks are concatenated into --out.
  int Generate() {
    if (opts_.args.size() != 1) throw UsageError("generate needs exactly one PROMPT");
    grym::v1::GenerateRequest req;
    req.set_prompt(opts_.args[0]);
    req.set_duration_seconds(opts_.seconds);
    req.set_steps(opts_.steps);
    if (opts_.has_seed) req.set_seed(opts_.seed);
    grpc::ClientContext ctx;
    SetDeadline(ctx);
    auto reader = orchestrator_->Generate(&ctx, req);
    std::string wav;
    grym::v1::GenerateResponse ev;
    while (reader->Read(&ev)) {
      if (ev.has_audio()) wav += ev.audio().wav_data();
      PrintGenerateEvent(ev);
    }
    const grpc::Status s = reader->Finish();
    if (!s.ok()) throw RpcError(s);
    if (!opts_.out.empty()) {
      std::ofstream f(opts_.out, std::ios::binary);
      f.write(wav.data(), static_cast<std::streamsize>(wav.size()));
      if (!f) throw std::runtime_error("cannot write " + opts_.out);
    }
    return kExitOk;
  }

 private:
  void PrintGenerateEvent(const grym::v1::GenerateResponse& ev) const {
    const std::string rid = JsonString(ev.request_id());
    switch (ev.event_case()) {
      case grym::v1::GenerateResponse::kProgress:
        if (opts_.json) {
          std::cout << "{\"event\":\"progress\",\"request_id\":" << rid << ",\"step\":" << ev.progress().step()
                    << ",\"total_steps\":" << ev.progress().total_steps() << "}" << std::endl;
        } else {
          std::cout << "progress step=" << ev.progress().step() << "/" << ev.progress().total_steps() << std::endl;
        }
        break;
      case grym::v1::GenerateResponse::kAudio: {
        const auto& a = ev.audio();
        if (opts_.json) {
          std::cout << "{\"event\":\"audio\",\"request_id\":" << rid << ",\"chunk_index\":" << a.chunk_index()
                    << ",\"bytes\":" << a.wav_data().size() << ",\"last\":" << (a.last() ? "true" : "false")
                    << ",\"sample_rate_hz\":" << a.sample_rate_hz() << "}" << std::endl;
        } else {
          std::cout << "audio    chunk=" << a.chunk_index() << " bytes=" << a.wav_data().size()
                    << " last=" << (a.last() ? "true" : "false") << std::endl;
        }
        break;
      }
      case grym::v1::GenerateResponse::kResult: {
        const auto& r = ev.result();
        if (opts_.json) {
          std::cout << "{\"event\":\"result\",\"request_id\":" << rid << ",\"seed\":\"" << r.seed() << "\""
                    << ",\"duration_seconds\":" << Num(r.duration_seconds())
                    << ",\"sample_rate_hz\":" << r.sample_rate_hz() << ",\"frames\":" << r.frames()
                    << ",\"embedding_len\":" << r.embedding_size() << ",\"embedding\":" << JsonFloats(r.embedding())
                    << ",\"pattern_id\":" << JsonString(r.pattern_id())
                    << ",\"cached\":" << (r.cached() ? "true" : "false") << "}" << std::endl;
        } else {
          std::cout << "result   seed=" << r.seed() << " duration_s=" << Fixed3(r.duration_seconds())
                    << " sample_rate_hz=" << r.sample_rate_hz() << " frames=" << r.frames()
                    << " embedding_len=" << r.embedding_size() << " cached=" << (r.cached() ? "true" : "false");
          if (!r.pattern_id().empty()) std::cout << " pattern_id=" << r.pattern_id();
          std::cout << std::endl;
        }
        break;
      }
      case grym::v1::GenerateResponse::EVENT_NOT_SET:
        throw std::runtime_error("Generate event without a payload");
    }
  }

  void SetDeadline(grpc::ClientContext& ctx) const {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::milliseconds(static_cast<long long>(opts_.timeout_s * 1000)));
  }

  void PrintStreamEvent(const grym::v1::StreamAnalyzeResponse& ev) const {
    if (opts_.json) {
      std::cout << "{\"request_id\":" << JsonString(ev.request_id())
                << ",\"is_final\":" << (ev.is_final() ? "true" : "false") << ",\"window_index\":" << ev.window_index()
                << ",\"start_seconds\":" << Num(ev.start_seconds()) << ",\"end_seconds\":" << Num(ev.end_seconds())
                << ",\"frames\":" << ev.frames() << ",\"embedding_len\":" << ev.embedding_size()
                << ",\"embedding\":" << JsonFloats(ev.embedding()) << "}" << std::endl;
    } else {
      std::cout << (ev.is_final() ? "final " : "window") << " index=" << ev.window_index()
                << " start_s=" << Fixed3(ev.start_seconds()) << " end_s=" << Fixed3(ev.end_seconds())
                << " frames=" << ev.frames() << " embedding_len=" << ev.embedding_size() << std::endl;
    }
  }

  Options opts_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<Orchestrator::Stub> orchestrator_;
  std::unique_ptr<Health::Stub> health_;
};

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options opts = ParseArgs(argc, argv);
    Client client(opts);
    if (opts.command == "health") return client.CheckHealth();
    if (opts.command == "analyze") return client.Analyze();
    if (opts.command == "stream") return client.Stream();
    if (opts.command == "generate") return client.Generate();
    throw UsageError("unknown command " + opts.command);
  } catch (const UsageError& e) {
    if (*e.what()) std::cerr << "error: " << e.what() << "\n";
    std::cerr << kUsage;
    return kExitUsage;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << std::endl;
    return kExitRpc;
  }
}
