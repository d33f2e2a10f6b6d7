"""AudioLDM exporters: one Triton model per pipeline component, plus the files the ``audioldm`` pipeline model needs.

diffusers' ``AudioLDMPipeline`` (diffusers/pipelines/deprecated/audioldm/pipeline_audioldm.py) is split at its
component boundaries so that Triton can batch each one across concurrent generations:

* ``clap_text_encoder``: ``ClapTextModelWithProjection`` -> ``text_embeds``, **L2-normalised in the graph**
  (the pipeline's ``F.normalize(prompt_embeds, dim=-1)``). In: ``input_ids``/``attention_mask`` [B, L] int64.
  Out: ``text_embeds`` [B, projection_dim].
* ``unet``: ``UNet2DConditionModel`` with class-label (FiLM) conditioning — no ``encoder_hidden_states``, the
  pipeline passes ``class_labels=prompt_embeds``. In: ``sample`` [B, C, H, W], ``timestep`` [B, 1] float32 (one
  timestep *per row*, so rows from generations at different steps batch together), ``class_labels`` [B, P].
  Out: ``noise_pred`` [B, C, H, W]. H (latent frames, i.e. duration) is dynamic.
* ``vae_decoder``: ``AutoencoderKL.decode(1 / scaling_factor * latents)`` (the pipeline's ``decode_latents``,
  scaling folded into the graph). In: ``latents`` [B, C, H, W]. Out: ``mel`` [B, 1, 4H', F].
* ``vocoder``: ``SpeechT5HifiGan``. In: ``mel`` [B, T, F] (the pipeline squeezes the channel axis first).
  Out: ``waveform`` [B, T * prod(upsample_rates)].

``export_pipeline`` writes no ONNX: the tokenizer, scheduler configs (DDIM as AudioLDM's conversion script builds it,
plus DPM-Solver++, Euler, PNDM and LMS derived from it with ``from_config``) and ``components.json``.

All five exporters share one set of components per (profile, weights, seed) (see :func:`build_components`), so the
UNet exported by ``export_unet`` is the very object whose config ``export_pipeline`` describes.

Weights: ``weights=None`` -> seeded random weights (``torch.manual_seed(seed)`` before each component); otherwise a
local diffusers AudioLDM checkpoint directory (``unet/``, ``vae/``, ``text_encoder/``, ``vocoder/``, ``tokenizer/``,
``scheduler/``) loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

ONNX_OPSET = 17
ONNX_FILE = "model.onnx"

# Triton model folder -> (ONNX/Triton input names, output names). The model configs and the pipeline model
# (via components.json) use these exact names.
TENSORS: dict[str, dict[str, tuple[str, ...]]] = {
    "clap_text_encoder": {"inputs": ("input_ids", "attention_mask"), "outputs": ("text_embeds",)},
    "unet": {"inputs": ("sample", "timestep", "class_labels"), "outputs": ("noise_pred",)},
    "vae_decoder": {"inputs": ("latents",), "outputs": ("mel",)},
    "vocoder": {"inputs": ("mel",), "outputs": ("waveform",)},
    "vae_encoder": {"inputs": ("waveform",), "outputs": ("latents",)},
}

# AudioLDM's mel front end (the original repository's audioldm/audio/stft.py ``TacotronSTFT`` with the
# audioldm-s configs: 16 kHz, filter_length 1024, hop 160, win 1024, 64 mel bins, fmin 0, fmax 8000; librosa's
# Slaney mel filters; magnitude (not power) STFT, reflect-padded by n_fft/2 (centred frames); log(clamp(x, 1e-5))),
# applied to audio normalised as its ``normalize_wav``: mean removed, peak scaled to 0.5. The hop is the vocoder's
# (prod(upsample_rates): 160 for AudioLDM-S, 64 for the tiny profile) and the bin count its model_in_dim, so that
# one mel frame is one vocoder frame and encode -> decode -> vocoder round-trips in time.
MEL_N_FFT = 1024
MEL_WIN_LENGTH = 1024
MEL_FMIN_HZ = 0.0
MEL_FMAX_HZ = 8000.0
MEL_LOG_FLOOR = 1e-5
INIT_PEAK = 0.5

# Schedulers the pipeline model offers. "ddim" is AudioLDM's own; the others are built exactly the way
# scripts/convert_original_audioldm_to_diffusers.py derives them: ``<Class>.from_config(ddim.config)``
# (PNDM additionally with ``skip_prk_steps=True``).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
}
DEFAULT_SCHEDULER = "ddim"


@dataclass(frozen=True)
class AudioLDMProfile:
    """Architecture of one size profile (kwargs of the diffusers/transformers config classes)."""

    text_encoder: dict[str, Any]
    unet: dict[str, Any]
    vae: dict[str, Any]
    vocoder: dict[str, Any]
    scheduler: dict[str, Any]
    tokenizer_max_length: int
    tokenizer_vocab_size: int
    # Latent frames used for tracing the UNet/VAE: deliberately NOT a multiple of the UNet's overall up-sampling
    # factor so the trace takes diffusers' ``forward_upsample_size`` path, whose up-sampling sizes follow the skip
    # connections' shapes — valid for every H. (A multiple would bake ``scale_factor=2`` in, which breaks odd H.)
    trace_latent_frames: int
    # Self-verification bound on max |ORT - PyTorch| per component (float32, CPU). Measured values are in the
    # manifest ("max_abs_diff") and in the report at the top of tests/integration/test_audioldm_export.py.
    parity_bound: dict[str, float] = field(default_factory=dict)


# Scheduler: AudioLDM's DDIM as built by diffusers' scripts/convert_original_audioldm_to_diffusers.py
# (load_pipeline_from_original_audioldm_ckpt: DEFAULT_CONFIG linear_start/linear_end/timesteps, scaled_linear,
# steps_offset=1, clip_sample=False, set_alpha_to_one=False, prediction_type="epsilon").
_AUDIOLDM_DDIM = dict(
    num_train_timesteps=1000,
    beta_start=0.0015,
    beta_end=0.0195,
    beta_schedule="scaled_linear",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    prediction_type="epsilon",
)

PROFILES: dict[str, AudioLDMProfile] = {
    # tiny: the shapes of diffusers' own AudioLDM fast tests (tests/pipelines/audioldm/test_audioldm.py,
    # get_dummy_components), trimmed further (fewer layers, 16 mel bins, 64x vocoder) so a 4-step generation of
    # a short clip takes well under a second on one CPU core.
    "tiny": AudioLDMProfile(
        text_encoder=dict(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            max_position_embeddings=80,
            projection_dim=32,
        ),
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=(32, 64),
            class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=32,
            class_embeddings_concat=True,
        ),
        vae=dict(
            block_out_channels=(32, 64),
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            layers_per_block=1,
            scaling_factor=0.9392935633659363,
        ),
        vocoder=dict(
            model_in_dim=16,
            sampling_rate=16000,
            upsample_initial_channel=16,
            upsample_rates=[8, 8],
            upsample_kernel_sizes=[16, 16],
            resblock_kernel_sizes=[3],
            resblock_dilation_sizes=[[1, 3]],
            normalize_before=False,
            # The default 0.01 init makes this narrow random HiFi-GAN emit ~1e-5 amplitudes, which would make the
            # waveform parity tests vacuous; 0.1 gives audio-scale output (peak ~0.1) without saturating the tanh.
            initializer_range=0.1,
        ),
        scheduler=_AUDIOLDM_DDIM,
        tokenizer_max_length=64,
        tokenizer_vocab_size=1000,
        trace_latent_frames=63,
        parity_bound={"clap_text_encoder": 1e-4, "unet": 1e-4, "vae_decoder": 1e-4, "vocoder": 1e-4,
                      "vae_encoder": 1e-4},
    ),
    # full: the architecture of cvssp/audioldm-s-full-v2 (AudioLDM-S).
    # * UNet / VAE / vocoder: diffusers scripts/convert_original_audioldm_to_diffusers.py, DEFAULT_CONFIG (the
    #   original AudioLDM-S config) run through create_unet_diffusers_config / create_vae_diffusers_config /
    #   create_transformers_vocoder_config with image_size=512:
    #   unet model_channels=128, channel_mult=[1,2,3,5] -> block_out_channels (128,256,384,640);
    #   attention_resolutions=[8,4,2] -> Down, CrossAttnDown x3 / CrossAttnUp x3, Up; num_res_blocks=2;
    #   in/out_channels=8; extra_film_condition_dim=512 -> class_embed_type="simple_projection",
    #   projection_class_embeddings_input_dim=512; extra_film_use_concat=True; cross_attention_dim =
    #   block_out_channels (no cross-attention context: the blocks self-attend); sample_size=512//4=128;
    #   attention_head_dim left at diffusers' default 8 (the script does not set it).
    #   vae ch=128, ch_mult=[1,2,4] -> (128,256,512), z_channels=8, num_res_blocks=2, in/out 1, sample_size=512.
    #   vocoder num_mels=64, 16 kHz, upsample_rates [5,4,2,2,2], kernels [16,16,8,4,4], initial channel 1024,
    #   resblock kernels [3,7,11], dilations [[1,3,5]]*3, normalize_before=False.
    # * VAE scaling_factor: learnt per checkpoint (scale_by_std); 0.9392935633659363 is the value in
    #   cvssp/audioldm-s-full-v2's vae/config.json.
    # * text encoder: the script loads ClapTextConfig of laion/clap-htsat-unfused ("AudioLDM uses the same
    #   configuration and tokenizer as the original CLAP model") — RoBERTa-base: vocab 50265, hidden 768, 12 layers,
    #   12 heads, intermediate 3072, max_position_embeddings 514, type_vocab_size 1, projection_dim 512 (relu);
    #   these are transformers' ClapTextConfig defaults, spelled out here. Tokenizer model_max_length=512
    #   (cvssp/audioldm-s-full-v2 tokenizer/tokenizer_config.json).
    "full": AudioLDMProfile(
        text_encoder=dict(
            vocab_size=50265,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            hidden_act="gelu",
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-12,
            projection_dim=512,
            projection_hidden_act="relu",
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        unet=dict(
            sample_size=128,
            in_channels=8,
            out_channels=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(128, 256, 384, 640),
            layers_per_block=2,
            cross_attention_dim=(128, 256, 384, 640),
            class_embed_type="simple_projection",
            projection_class_embeddings_input_dim=512,
            class_embeddings_concat=True,
        ),
        vae=dict(
            sample_size=512,
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(128, 256, 512),
            latent_channels=8,
            layers_per_block=2,
            scaling_factor=0.9392935633659363,
        ),
        vocoder=dict(
            model_in_dim=64,
            sampling_rate=16000,
            upsample_initial_channel=1024,
            upsample_rates=[5, 4, 2, 2, 2],
            upsample_kernel_sizes=[16, 16, 8, 4, 4],
            resblock_kernel_sizes=[3, 7, 11],
            resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
            normalize_before=False,
        ),
        scheduler=_AUDIOLDM_DDIM,
        tokenizer_max_length=512,
        tokenizer_vocab_size=1000,
        trace_latent_frames=125,  # a 5 s clip: int(5 / 0.01) = 500 mel frames / 4
        parity_bound={"clap_text_encoder": 1e-3, "unet": 1e-3, "vae_decoder": 1e-3, "vocoder": 1e-3,
                      "vae_encoder": 1e-3},
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Components (built once per (profile, weights, seed))
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Components:
    """The six AudioLDMPipeline components (torch, eval mode, float32) and the profile they came from."""

    profile: str
    text_encoder: Any
    unet: Any
    vae: Any
    vocoder: Any
    tokenizer: Any
    scheduler_config: dict[str, Any]

    @property
    def vae_scale_factor(self) -> int:
        """Exactly the pipeline's ``2 ** (len(vae.config.block_out_channels) - 1)``."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vocoder_upsample_factor(self) -> float:
        """Seconds per mel frame, computed like the pipeline (``np.prod(upsample_rates) / sampling_rate``)."""
        return float(np.prod(self.vocoder.config.upsample_rates) / self.vocoder.config.sampling_rate)


_CACHE: dict[tuple[str, str | None, int], Components] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Drop the cached components (the full profile holds ~1.7 GB of float32 weights once exported)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _profile(profile: str) -> AudioLDMProfile:
    try:
        return PROFILES[profile]
    except KeyError:
        raise ValueError(f"unknown AudioLDM profile {profile!r}; expected one of {sorted(PROFILES)}") from None


def build_components(profile: str, weights: Path | None = None, seed: int = 0) -> Components:
    """The components for (profile, weights, seed); built once and cached so every exporter shares them."""
    key = (profile, str(Path(weights).resolve()) if weights else None, int(seed))
    with _CACHE_LOCK:
        if key not in _CACHE:
            started = time.perf_counter()
            _CACHE[key] = _load_components(profile, Path(weights)) if weights else _seeded_components(profile, seed)
            log.info("built AudioLDM components %s in %.1fs", key, time.perf_counter() - started)
        return _CACHE[key]


def _seeded_components(profile: str, seed: int) -> Components:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    from grym_synth.inference.export.audioldm_tokenizer import build_tokenizer

    arch = _profile(profile)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**arch.unet)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch.vae)
    torch.manual_seed(seed)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(**arch.text_encoder))
    torch.manual_seed(seed)
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**arch.vocoder))
    tokenizer = build_tokenizer(arch.tokenizer_max_length, arch.tokenizer_vocab_size)
    if len(tokenizer) > text_encoder.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, text encoder only {text_encoder.config.vocab_size}")
    return _finish(profile, text_encoder, unet, vae, vocoder, tokenizer, dict(arch.scheduler))


def _load_components(profile: str, weights: Path) -> Components:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextModelWithProjection, RobertaTokenizer, SpeechT5HifiGan

    if not weights.is_dir():
        raise FileNotFoundError(f"AudioLDM weights directory {weights} does not exist")
    unet = UNet2DConditionModel.from_pretrained(weights, subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(weights, subfolder="vae", local_files_only=True)
    text_encoder = ClapTextModelWithProjection.from_pretrained(weights / "text_encoder", local_files_only=True)
    vocoder = SpeechT5HifiGan.from_pretrained(weights / "vocoder", local_files_only=True)
    tokenizer = RobertaTokenizer.from_pretrained(weights / "tokenizer", local_files_only=True)
    scheduler_config = dict(DDIMScheduler.load_config(weights / "scheduler", local_files_only=True))
    return _finish(profile, text_encoder, unet, vae, vocoder, tokenizer, scheduler_config)


def _finish(profile, text_encoder, unet, vae, vocoder, tokenizer, scheduler_config) -> Components:
    for module in (text_encoder, unet, vae, vocoder):
        module.float().eval().requires_grad_(False)
    if vocoder.config.model_in_dim % (2 ** (len(vae.config.block_out_channels) - 1)) != 0:
        raise ValueError("vocoder model_in_dim must be divisible by the VAE scale factor (AudioLDMPipeline check)")
    clean = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    return Components(profile, text_encoder, unet, vae, vocoder, tokenizer, clean)


def make_scheduler(name: str, base_config: dict[str, Any]):
    """A fresh diffusers scheduler of kind ``name`` (see :data:`SCHEDULERS`) derived from AudioLDM's DDIM config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    cls_name, overrides = SCHEDULERS[name]
    ddim = diffusers.DDIMScheduler.from_config(base_config)
    return getattr(diffusers, cls_name).from_config({**dict(ddim.config), **overrides})


def reference_pipeline(components: Components, scheduler: str = DEFAULT_SCHEDULER, tokenizer: Any = None):
    """diffusers' ``AudioLDMPipeline`` over the same component objects (tests compare Triton against it)."""
    from diffusers import AudioLDMPipeline

    pipe = AudioLDMPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=tokenizer if tokenizer is not None else components.tokenizer,
        unet=components.unet,
        scheduler=make_scheduler(scheduler, components.scheduler_config),
        vocoder=components.vocoder,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


def _decoder_parameters(vae) -> int:
    """Parameters of what ``vae.decode`` uses (post_quant_conv + decoder), i.e. what the vae_decoder graph holds."""
    post = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else None
    return count_parameters(vae.decoder) + (count_parameters(post) if post is not None else 0)


# --------------------------------------------------------------------------------------------------------------
# Export wrappers: the exact computations the pipeline performs around each component
# --------------------------------------------------------------------------------------------------------------
def _wrappers():
    import torch
    import torch.nn.functional as F

    class ClapTextEmbeds(torch.nn.Module):
        """``text_encoder(ids, attention_mask).text_embeds`` followed by the pipeline's ``F.normalize(dim=-1)``."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            embeds = self.model(input_ids=input_ids, attention_mask=attention_mask).text_embeds
            return F.normalize(embeds, dim=-1)

    class UNetStep(torch.nn.Module):
        """One noise prediction: ``unet(sample, t, encoder_hidden_states=None, class_labels=embeds).sample``.

        ``timestep`` arrives as [B, 1] (Triton needs a non-empty per-row shape) and is flattened to the [B] vector
        diffusers accepts, so each row may carry its own timestep."""

        def __init__(self, unet):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, class_labels):
            return self.unet(
                sample, timestep.reshape(-1), encoder_hidden_states=None, class_labels=class_labels, return_dict=False
            )[0]

    class VaeDecode(torch.nn.Module):
        """The pipeline's ``decode_latents``: ``vae.decode(1 / scaling_factor * latents).sample``."""

        def __init__(self, vae):
            super().__init__()
            self.vae = vae
            self.inv_scale = 1 / vae.config.scaling_factor

        def forward(self, latents):
            return self.vae.decode(self.inv_scale * latents).sample

    class Vocoder(torch.nn.Module):
        """``SpeechT5HifiGan`` on a batched [B, T, mel_bins] spectrogram -> [B, samples]."""

        def __init__(self, vocoder):
            super().__init__()
            self.vocoder = vocoder

        def forward(self, mel):
            return self.vocoder(mel)

    return ClapTextEmbeds, UNetStep, VaeDecode, Vocoder


# --------------------------------------------------------------------------------------------------------------
# Fused attention for the exported graphs
# --------------------------------------------------------------------------------------------------------------
# Traced as-is, diffusers' attention becomes MatMul -> Softmax -> MatMul with the full [B, heads, S, S] score matrix
# materialised. AudioLDM attends over every latent position (tiny: 1,252 tokens per UNet attention, 5,000 in the
# VAE's mid block for a 5 s clip), so those graphs spent 70-78% of their time there, and a batch of 8 cost 4.4x a
# batch of 2. ONNX Runtime's ``com.microsoft.MultiHeadAttention`` runs the same computation as one fused kernel
# (CPU and CUDA); measured on the tiny UNet at batch 2: 160 -> 103 ms per step, and batch 8 costs 4x batch 2 again
# (PyTorch's SDPA: 122 ms). The op is an ONNX Runtime contrib op: the python-backend and native
# onnxruntime variants run it on every execution provider, and the TensorRT EP hands that node to CUDA.
def _fused_attention_processor():
    import torch
    import torch.nn.functional as F

    class MultiHeadAttention(torch.autograd.Function):
        """``softmax(q k^T / sqrt(d)) v`` over [B, S, heads * d] tensors; traces to one ORT MultiHeadAttention."""

        @staticmethod
        def forward(ctx, query, key, value, heads: int):  # type: ignore[override]
            batch, length, width = query.shape

            def split(t):  # [B, S, heads * d] -> [B, heads, S, d]
                return t.view(batch, -1, heads, width // heads).transpose(1, 2)

            out = F.scaled_dot_product_attention(split(query), split(key), split(value))
            return out.transpose(1, 2).reshape(batch, length, width)

        @staticmethod
        def symbolic(g, query, key, value, heads: int):
            return g.op("com.microsoft::MultiHeadAttention", query, key, value, num_heads_i=heads)

    class FusedAttnProcessor:
        """diffusers' ``AttnProcessor2_0`` for the configurations AudioLDM uses (no mask, spatial norm or q/k norm;
        optional group norm, residual and output rescale) with the attention core as one fused op. The default
        ``1/sqrt(head_dim)`` scale is what ``AttnProcessor2_0`` applies too (it ignores ``attn.scale``)."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                     *args, **kwargs):
            if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None \
                    or attn.norm_k is not None or attn.norm_cross:
                raise NotImplementedError("fused attention export: unsupported Attention configuration")
            residual = hidden_states
            four_d = hidden_states.ndim == 4
            if four_d:
                batch, channels, height, width = hidden_states.shape
                hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            out = MultiHeadAttention.apply(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context),
                                           attn.heads)
            out = attn.to_out[1](attn.to_out[0](out))
            if four_d:
                out = out.transpose(-1, -2).reshape(batch, channels, height, width)
            if attn.residual_connection:
                out = out + residual
            return out / attn.rescale_output_factor

    return FusedAttnProcessor()


@contextlib.contextmanager
def fused_attention(model):
    """Export ``model`` (a diffusers model) with :func:`_fused_attention_processor`, restoring its own processors
    afterwards: the components are shared with the in-process reference pipeline, which must stay stock."""
    original = dict(model.attn_processors)
    model.set_attn_processor(_fused_attention_processor())
    try:
        yield model
    finally:
        model.set_attn_processor(original)


# --------------------------------------------------------------------------------------------------------------
# ONNX export + self-verification
# --------------------------------------------------------------------------------------------------------------
def _export_onnx(module, args: tuple, path: Path, names: dict[str, tuple[str, ...]], dynamic_axes: dict) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency, handles diffusers' python control flow
            opset_version=ONNX_OPSET,
            input_names=list(names["inputs"]),
            output_names=list(names["outputs"]),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(str(path))


def ort_session(path: Path, threads: int = 0):
    """A CPU ONNX Runtime session (``threads`` = intra-op threads, 0 = ORT default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def verify_onnx(path: Path, module, feeds: dict[str, np.ndarray], output: str) -> float:
    """max |ORT - PyTorch| of ``output`` for ``feeds`` (numpy, keyed by ONNX input name, in forward order)."""
    import torch

    with torch.no_grad():
        expected = module(*[torch.from_numpy(v) for v in feeds.values()]).numpy()
    got = ort_session(path).run([output], feeds)[0]
    if got.shape != expected.shape:
        raise AssertionError(f"{path}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
    return float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))


def _check_parity(model: str, profile: str, diffs: list[float]) -> float:
    worst = max(diffs)
    bound = _profile(profile).parity_bound[model]
    log.info("%s (%s): ONNX vs PyTorch max abs diff %.3g (bound %.0e)", model, profile, worst, bound)
    print(f"[audioldm export] {model} ({profile}): ONNX vs PyTorch max abs diff {worst:.3g} (bound {bound:.0e})")
    if not worst <= bound:  # also catches NaN
        raise AssertionError(f"{model}: ONNX output differs from PyTorch by {worst:.3g} > {bound:.0e}")
    return worst


def _meta(model: str, onnx_path: Path, module, diff: float, started: float, **extra: Any) -> dict[str, Any]:
    return {
        "onnx": f"1/{ONNX_FILE}",
        "onnx_bytes": onnx_path.stat().st_size,
        "parameters": count_parameters(module),
        "inputs": list(TENSORS[model]["inputs"]),
        "outputs": list(TENSORS[model]["outputs"]),
        "max_abs_diff": diff,
        "onnx_export_seconds": round(time.perf_counter() - started, 2),
        **extra,
    }


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _latent_shape(c: Components, batch: int, frames: int) -> tuple[int, int, int, int]:
    return (batch, c.unet.config.in_channels, frames, c.vocoder.config.model_in_dim // c.vae_scale_factor)


def export_clap(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """``clap_text_encoder``: CLAP text tower + projection + L2 norm -> model_dir/1/model.onnx."""
    started = time.perf_counter()
    c = build_components(profile, weights, seed)
    ClapTextEmbeds, _, _, _ = _wrappers()
    module = ClapTextEmbeds(c.text_encoder).eval()
    names = TENSORS["clap_text_encoder"]
    length = int(c.tokenizer.model_max_length)
    enc = c.tokenizer(["a warm analog synth pad", ""], padding="max_length", max_length=length, return_tensors="pt")
    path = Path(model_dir) / "1" / ONNX_FILE
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    axes["text_embeds"] = {0: "batch"}
    _export_onnx(module, (enc.input_ids, enc.attention_mask), path, names, axes)
    # Verify at another batch size and sequence length than traced (proves both axes are dynamic).
    diffs = []
    for prompts, max_len in ((["A hammer hitting a wooden surface", "rain", "jazz trio, brushed drums"], length),
                             (["techno"], min(length, 16))):
        e = c.tokenizer(prompts, padding="max_length", max_length=max_len, truncation=True, return_tensors="np")
        feeds = {"input_ids": e["input_ids"].astype(np.int64), "attention_mask": e["attention_mask"].astype(np.int64)}
        diffs.append(verify_onnx(path, module, feeds, "text_embeds"))
    diff = _check_parity("clap_text_encoder", profile, diffs)
    return _meta(
        "clap_text_encoder", path, c.text_encoder, diff, started,
        projection_dim=int(c.text_encoder.config.projection_dim), max_length=length,
    )


def export_unet(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """``unet``: one class-conditioned noise prediction per row -> model_dir/1/model.onnx."""
    import torch

    started = time.perf_counter()
    c = build_components(profile, weights, seed)
    _, UNetStep, _, _ = _wrappers()
    module = UNetStep(c.unet).eval()
    proj = int(c.unet.config.projection_class_embeddings_input_dim)
    frames = _profile(profile).trace_latent_frames
    rng = _rng(seed)
    args = (
        torch.from_numpy(rng.standard_normal(_latent_shape(c, 2, frames)).astype(np.float32)),
        torch.tensor([[981.0], [981.0]]),
        torch.from_numpy(rng.standard_normal((2, proj)).astype(np.float32)),
    )
    path = Path(model_dir) / "1" / ONNX_FILE
    axes = {
        "sample": {0: "batch", 2: "frames"},
        "timestep": {0: "batch"},
        "class_labels": {0: "batch"},
        "noise_pred": {0: "batch", 2: "frames"},
    }
    with fused_attention(c.unet):
        _export_onnx(module, args, path, TENSORS["unet"], axes)
    up = 2 ** (len(c.unet.config.block_out_channels) - 1)
    diffs = []
    # Another batch, per-row timesteps, and one length that is a multiple of the up-sampling factor and one not.
    for batch, f in ((3, up * max(1, frames // up)), (1, frames + 2)):
        feeds = {
            "sample": rng.standard_normal(_latent_shape(c, batch, f)).astype(np.float32),
            "timestep": rng.integers(1, 1000, size=(batch, 1)).astype(np.float32),
            "class_labels": rng.standard_normal((batch, proj)).astype(np.float32),
        }
        diffs.append(verify_onnx(path, module, feeds, "noise_pred"))
    diff = _check_parity("unet", profile, diffs)
    return _meta(
        "unet", path, c.unet, diff, started,
        in_channels=int(c.unet.config.in_channels), class_dim=proj, latent_width=_latent_shape(c, 1, 1)[3],
    )


def export_vae_decoder(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """``vae_decoder``: scaled latents -> mel spectrogram [B, 1, frames, mel_bins] -> model_dir/1/model.onnx."""
    import torch

    started = time.perf_counter()
    c = build_components(profile, weights, seed)
    _, _, VaeDecode, _ = _wrappers()
    module = VaeDecode(c.vae).eval()
    frames = _profile(profile).trace_latent_frames
    rng = _rng(seed + 1)
    args = (torch.from_numpy(rng.standard_normal(_latent_shape(c, 1, frames)).astype(np.float32)),)
    path = Path(model_dir) / "1" / ONNX_FILE
    axes = {"latents": {0: "batch", 2: "frames"}, "mel": {0: "batch", 2: "mel_frames"}}
    with fused_attention(c.vae):
        _export_onnx(module, args, path, TENSORS["vae_decoder"], axes)
    diffs = [
        verify_onnx(path, module, {"latents": rng.standard_normal(_latent_shape(c, b, f)).astype(np.float32)}, "mel")
        for b, f in ((2, frames + 1), (1, max(2, frames // 2)))
    ]
    diff = _check_parity("vae_decoder", profile, diffs)
    meta = _meta("vae_decoder", path, c.vae, diff, started, scaling_factor=float(c.vae.config.scaling_factor),
                 scale_factor=c.vae_scale_factor)
    meta["parameters"] = _decoder_parameters(c.vae)  # the graph holds the decoder half of the VAE only
    return meta


def export_vocoder(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """``vocoder``: mel [B, frames, mel_bins] -> waveform [B, samples] -> model_dir/1/model.onnx."""
    import torch

    started = time.perf_counter()
    c = build_components(profile, weights, seed)
    _, _, _, Vocoder = _wrappers()
    module = Vocoder(c.vocoder).eval()
    bins = int(c.vocoder.config.model_in_dim)
    frames = _profile(profile).trace_latent_frames * c.vae_scale_factor
    rng = _rng(seed + 2)
    args = (torch.from_numpy(rng.standard_normal((1, frames, bins)).astype(np.float32)),)
    path = Path(model_dir) / "1" / ONNX_FILE
    axes = {"mel": {0: "batch", 1: "frames"}, "waveform": {0: "batch", 1: "samples"}}
    _export_onnx(module, args, path, TENSORS["vocoder"], axes)
    diffs = [
        verify_onnx(path, module, {"mel": rng.standard_normal((b, f, bins)).astype(np.float32)}, "waveform")
        for b, f in ((2, frames + 3), (1, max(4, frames // 3)))
    ]
    diff = _check_parity("vocoder", profile, diffs)
    return _meta(
        "vocoder", path, c.vocoder, diff, started,
        sampling_rate=int(c.vocoder.config.sampling_rate), upsample_rates=list(c.vocoder.config.upsample_rates),
    )


# --------------------------------------------------------------------------------------------------------------
# Audio-to-audio: the mel front end and the VAE encoder
# --------------------------------------------------------------------------------------------------------------
def mel_config(c: Components) -> dict[str, Any]:
    """The front end's parameters for these components (see the MEL_* constants for where they come from)."""
    return {
        "sampling_rate": int(c.vocoder.config.sampling_rate),
        "n_fft": MEL_N_FFT,
        "win_length": MEL_WIN_LENGTH,
        "hop_length": int(np.prod(c.vocoder.config.upsample_rates)),
        "n_mels": int(c.vocoder.config.model_in_dim),
        "fmin_hz": MEL_FMIN_HZ,
        "fmax_hz": min(MEL_FMAX_HZ, c.vocoder.config.sampling_rate / 2),
        "log_floor": MEL_LOG_FLOOR,
        "init_peak": INIT_PEAK,
    }


def mel_filters(config: dict[str, Any]) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] Slaney mel filters (librosa.filters.mel's defaults, via transformers' port)."""
    from transformers.audio_utils import mel_filter_bank

    bank = mel_filter_bank(num_frequency_bins=config["n_fft"] // 2 + 1, num_mel_filters=config["n_mels"],
                           min_frequency=config["fmin_hz"], max_frequency=config["fmax_hz"],
                           sampling_rate=config["sampling_rate"], norm="slaney", mel_scale="slaney")
    return np.ascontiguousarray(bank.T, dtype=np.float32)


def normalize_init_audio(waveform: np.ndarray, peak: float = INIT_PEAK) -> tuple[np.ndarray, float]:
    """AudioLDM's ``normalize_wav``: (waveform - mean) scaled to ``peak``; returns it and the gain applied, so that
    generated audio can be brought back to the caller's level (divided by the gain)."""
    x = np.asarray(waveform, dtype=np.float64)
    x = x - x.mean() if x.size else x
    gain = peak / (float(np.max(np.abs(x))) + 1e-8) if x.size else 1.0
    return (x * gain).astype(np.float32), gain


def _front_end_modules():
    import torch
    import torch.nn.functional as F

    class MelFrontEnd(torch.nn.Module):
        """waveform [B, S] -> log-mel [B, 1, S // hop, n_mels], TacotronSTFT's computation as graph-friendly ops:
        the STFT is a strided conv1d with a windowed Fourier basis (as the original's ``STFT`` module computes it),
        so it exports to plain ONNX. Frames are centred (reflect padding of n_fft / 2); the last, partial frame is
        dropped so that S = frames * hop maps to exactly ``frames`` mel frames (AudioLDM cuts to its target length
        the same way)."""

        def __init__(self, config: dict[str, Any]):
            super().__init__()
            n_fft, win = config["n_fft"], config["win_length"]
            self.n_fft, self.hop = n_fft, config["hop_length"]
            self.bins = n_fft // 2 + 1
            self.floor = float(config["log_floor"])
            window = torch.zeros(n_fft, dtype=torch.float64)
            start = (n_fft - win) // 2
            window[start:start + win] = torch.hann_window(win, periodic=True, dtype=torch.float64)
            n = torch.arange(n_fft, dtype=torch.float64)
            k = torch.arange(self.bins, dtype=torch.float64)[:, None]
            angle = 2 * torch.pi * k * n / n_fft
            basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
            self.register_buffer("basis", basis[:, None, :].float())
            self.register_buffer("mel_basis", torch.from_numpy(mel_filters(config)))

        def forward(self, waveform):
            frames = waveform.shape[1] // self.hop
            x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
            spec = F.conv1d(x, self.basis, stride=self.hop)
            magnitude = torch.sqrt(spec[:, : self.bins] ** 2 + spec[:, self.bins:] ** 2)
            mel = torch.log(torch.clamp(torch.matmul(self.mel_basis, magnitude), min=self.floor))
            return mel[:, :, :frames].transpose(1, 2)[:, None]

    class VaeEncode(torch.nn.Module):
        """waveform -> latents in the UNet's space: ``scaling_factor * vae.encode(mel).latent_dist.mean`` (AudioLDM's
        ``get_first_stage_encoding`` with the posterior's mode instead of a sample, so that encoding is
        deterministic)."""

        def __init__(self, vae, config: dict[str, Any]):
            super().__init__()
            self.front = MelFrontEnd(config)
            self.vae = vae
            self.scale = float(vae.config.scaling_factor)

        def forward(self, waveform):
            return self.scale * self.vae.encode(self.front(waveform)).latent_dist.mean

    return MelFrontEnd, VaeEncode


def mel_front_end(c: Components):
    """The front end as a torch module (tests compare it with a reference STFT)."""
    MelFrontEnd, _ = _front_end_modules()
    return MelFrontEnd(mel_config(c)).eval()


def vae_encode_module(c: Components):
    """waveform -> latents, the exact module exported as ``vae_encoder`` (tests run it in process)."""
    _, VaeEncode = _front_end_modules()
    return VaeEncode(c.vae, mel_config(c)).eval()


def export_vae_encoder(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """``vae_encoder``: AudioLDM-normalised 16 kHz waveform [B, S] -> latents [B, C, S // (hop * f), mel_bins // f],
    S a multiple of hop * f (the pipeline model pads) -> model_dir/1/model.onnx."""
    import torch

    started = time.perf_counter()
    c = build_components(profile, weights, seed)
    module = vae_encode_module(c)
    config = mel_config(c)
    step = config["hop_length"] * c.vae_scale_factor  # samples per latent frame
    frames = _profile(profile).trace_latent_frames
    rng = _rng(seed + 3)
    args = (torch.from_numpy((0.3 * rng.standard_normal((1, frames * step))).astype(np.float32)),)
    path = Path(model_dir) / "1" / ONNX_FILE
    axes = {"waveform": {0: "batch", 1: "samples"}, "latents": {0: "batch", 2: "frames"}}
    with fused_attention(c.vae):
        _export_onnx(module, args, path, TENSORS["vae_encoder"], axes)
    diffs = [
        verify_onnx(path, module, {"waveform": (0.3 * rng.standard_normal((b, f * step))).astype(np.float32)},
                    "latents")
        for b, f in ((2, frames + 1), (1, max(8, frames // 2)))
    ]
    diff = _check_parity("vae_encoder", profile, diffs)
    meta = _meta("vae_encoder", path, c.vae, diff, started, scaling_factor=float(c.vae.config.scaling_factor),
                 scale_factor=c.vae_scale_factor, mel=config)
    meta["parameters"] = _encoder_parameters(c.vae)
    return meta


def _encoder_parameters(vae) -> int:
    """Parameters of what ``vae.encode`` uses (encoder + quant_conv)."""
    quant = getattr(vae, "quant_conv", None)
    return count_parameters(vae.encoder) + (count_parameters(quant) if quant is not None else 0)


def pipeline_description(c: Components) -> dict[str, Any]:
    """What the ``audioldm`` pipeline model needs to know about the components (written as components.json)."""
    return {
        "profile": c.profile,
        "vae_scale_factor": c.vae_scale_factor,
        "vae_scaling_factor": float(c.vae.config.scaling_factor),
        "latent_channels": int(c.unet.config.in_channels),
        "mel_bins": int(c.vocoder.config.model_in_dim),
        "vocoder_upsample_rates": [int(r) for r in c.vocoder.config.upsample_rates],
        "vocoder_upsample_factor": c.vocoder_upsample_factor,
        "sampling_rate": int(c.vocoder.config.sampling_rate),
        "projection_dim": int(c.text_encoder.config.projection_dim),
        "tokenizer_max_length": int(c.tokenizer.model_max_length),
        "unet_sample_size": int(c.unet.config.sample_size),
        "schedulers": sorted(SCHEDULERS),
        "default_scheduler": DEFAULT_SCHEDULER,
        "tensors": {name: {k: list(v) for k, v in io.items()} for name, io in TENSORS.items()},
        "mel": mel_config(c),
    }


def export_pipeline(profile: str, model_dir: Path, weights: Path | None, seed: int) -> dict[str, Any]:
    """``audioldm``: tokenizer, scheduler configs and components.json under model_dir/1/ (no ONNX here)."""
    c = build_components(profile, weights, seed)
    version_dir = Path(model_dir) / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    c.tokenizer.save_pretrained(str(version_dir / "tokenizer"))
    for name in SCHEDULERS:
        make_scheduler(name, c.scheduler_config).save_config(str(version_dir / "schedulers" / name))
    description = pipeline_description(c)
    (version_dir / "components.json").write_text(json.dumps(description, indent=2, sort_keys=True))
    return {
        "tokenizer": "1/tokenizer",
        "schedulers": sorted(SCHEDULERS),
        "sampling_rate": description["sampling_rate"],
        "min_duration_s": description["vocoder_upsample_factor"] * description["vae_scale_factor"],
        "parameters": {
            "clap_text_encoder": count_parameters(c.text_encoder),
            "unet": count_parameters(c.unet),
            "vae_decoder": _decoder_parameters(c.vae),
            "vocoder": count_parameters(c.vocoder),
            "vae_encoder": _encoder_parameters(c.vae),
        },
    }


EXPORTERS: dict[str, Callable[[str, Path, Path | None, int], dict[str, Any]]] = {
    "clap_text_encoder": export_clap,
    "unet": export_unet,
    "vae_decoder": export_vae_decoder,
    "vocoder": export_vocoder,
    "vae_encoder": export_vae_encoder,
    "audioldm": export_pipeline,
}
"""Model folder -> exporter, for the lead's registry (grym_synth.inference.export.repository.EXPORTERS)."""

MODELS: tuple[str, ...] = tuple(EXPORTERS)

