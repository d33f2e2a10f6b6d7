"""AudioLDM exporters (tiny profile): every ONNX graph against diffusers' own AudioLDMPipeline code, the Triton
configs against the graphs, seeded determinism, the weights-directory path and the pipeline model's files.

The parity tests compare onnxruntime with the *pipeline's own methods* (``_encode_prompt``, ``unet(...)``,
``decode_latents``, ``mel_spectrogram_to_waveform``) rather than with the export wrappers, so a wrapper that
drifted from what diffusers does would fail here. Measured max |ORT - diffusers| (tiny, 2-core Xeon, ORT 1.32,
torch 2.13): clap 1.2e-7, unet 1.5e-6, vae_decoder 3.0e-6, vocoder 1.2e-7 (outputs are O(0.1 .. 1)); bound 1e-4. The UNet
and VAE graphs carry ORT's fused MultiHeadAttention, the reference runs diffusers' SDPA.

The full (AudioLDM-S) profile is not exported here (~400M parameters, ~1.6 GB of ONNX, ~1 min on 2 cores); its
self-verification measured clap 8.9e-8, unet 1.5e-6, vae_decoder 1.6e-5, vocoder 4.3e-11 (bound 1e-3).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from grym_synth.inference.export import audioldm

SEED = 0
ATOL = 1e-4
TEMPLATES = Path(__file__).resolve().parents[2] / "model_repository"
COMPONENT_MODELS = ("clap_text_encoder", "unet", "vae_decoder", "vocoder")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    """All five AudioLDM exporters run once into <tmp>/<model>/ (generated files only)."""
    root = tmp_path_factory.mktemp("audioldm_export")
    manifest = {name: export("tiny", root / name, None, SEED) for name, export in audioldm.EXPORTERS.items()}
    return root, manifest


@pytest.fixture(scope="module")
def pipe(exported):
    """diffusers' AudioLDMPipeline over the same seeded components the exporters used."""
    return audioldm.reference_pipeline(audioldm.build_components("tiny", None, SEED), "ddim")


def session(root: Path, model: str):
    return audioldm.ort_session(root / model / "1" / "model.onnx")


def maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ---------------------------------------------------------------------------------------------- parity vs diffusers
def test_clap_matches_pipeline_encode_prompt(exported, pipe):
    root, _ = exported
    prompts = ["Techno music with a strong, upbeat tempo", "", "a dog barks twice 🐕 near ünïcode rain"]
    with torch.no_grad():
        want = pipe._encode_prompt(prompts, "cpu", 1, False).numpy()
    enc = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="np")
    got = session(root, "clap_text_encoder").run(
        ["text_embeds"], {"input_ids": enc["input_ids"].astype(np.int64),
                          "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
    assert got.shape == (3, pipe.text_encoder.config.projection_dim)
    assert maxdiff(got, want) <= ATOL
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)  # the L2 norm is in the graph


def test_clap_padding_length_does_not_change_embeddings(exported, pipe):
    """diffusers pads prompts to model_max_length and negative prompts to projection_dim; the pipeline model pads
    [negative, prompt] only to the longer row rounded up to a multiple of 32. All give the same embeddings."""
    root, _ = exported
    sess = session(root, "clap_text_encoder")
    texts = ["", "low quality, noise"]
    encodings = [pipe.tokenizer(texts, padding="max_length", max_length=length, return_tensors="np")
                 for length in (pipe.tokenizer.model_max_length, pipe.text_encoder.config.projection_dim)]
    encodings.append(pipe.tokenizer(texts, padding="longest", pad_to_multiple_of=32, return_tensors="np"))
    assert encodings[-1]["input_ids"].shape[1] == 32 < encodings[0]["input_ids"].shape[1]
    out = [sess.run(["text_embeds"], {"input_ids": enc["input_ids"].astype(np.int64),
                                      "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
           for enc in encodings]
    assert maxdiff(out[0], out[1]) <= 1e-6 and maxdiff(out[0], out[2]) <= 1e-6


def test_clap_without_padding(exported, pipe):
    """The trace saw padded rows; an all-ones mask (prompt filling the whole window) must still be right."""
    root, _ = exported
    enc = pipe.tokenizer(["orchestral strings swelling into a dramatic crescendo"] * 2, max_length=8,
                         truncation=True, return_tensors="pt")
    assert bool(enc.attention_mask.all())
    with torch.no_grad():
        want = torch.nn.functional.normalize(pipe.text_encoder(enc.input_ids, enc.attention_mask).text_embeds, dim=-1)
    got = session(root, "clap_text_encoder").run(
        ["text_embeds"], {"input_ids": enc.input_ids.numpy(), "attention_mask": enc.attention_mask.numpy()})[0]
    assert maxdiff(got, want.numpy()) <= ATOL


@pytest.mark.parametrize("batch,frames", [(1, 40), (5, 63), (2, 64)])
def test_unet_matches_diffusers_unet(exported, pipe, batch, frames):
    root, _ = exported
    rng = np.random.default_rng(batch * 100 + frames)
    c = pipe.unet.config
    sample = rng.standard_normal((batch, c.in_channels, frames, 8)).astype(np.float32)
    labels = rng.standard_normal((batch, c.projection_class_embeddings_input_dim)).astype(np.float32)
    t = 501
    with torch.no_grad():
        want = pipe.unet(torch.from_numpy(sample), torch.tensor(t), encoder_hidden_states=None,
                         class_labels=torch.from_numpy(labels)).sample.numpy()
    got = session(root, "unet").run(["noise_pred"], {
        "sample": sample, "timestep": np.full((batch, 1), t, np.float32), "class_labels": labels})[0]
    assert got.shape == want.shape
    assert maxdiff(got, want) <= ATOL


def test_unet_rows_carry_their_own_timestep(exported, pipe):
    """Rows of different generations (different steps) share one batch: each row must equal its solo run."""
    root, _ = exported
    sess = session(root, "unet")
    rng = np.random.default_rng(1)
    sample = rng.standard_normal((4, 4, 63, 8)).astype(np.float32)
    labels = rng.standard_normal((4, 32)).astype(np.float32)
    steps = np.array([[981.0], [981.0], [21.0], [21.0]], np.float32)
    batched = sess.run(["noise_pred"], {"sample": sample, "timestep": steps, "class_labels": labels})[0]
    for row in range(4):
        solo = sess.run(["noise_pred"], {"sample": sample[row:row + 1], "timestep": steps[row:row + 1],
                                         "class_labels": labels[row:row + 1]})[0]
        assert maxdiff(batched[row:row + 1], solo) <= 1e-5
    # ... and the timestep matters: row 0 evaluated at row 2's timestep is a different prediction.
    other = sess.run(["noise_pred"], {"sample": sample[:1], "timestep": steps[2:3], "class_labels": labels[:1]})[0]
    assert maxdiff(other, batched[:1]) > 1e-3


@pytest.mark.parametrize("batch,frames", [(1, 63), (3, 10)])
def test_vae_decoder_matches_pipeline_decode_latents(exported, pipe, batch, frames):
    root, _ = exported
    latents = np.random.default_rng(frames).standard_normal((batch, 4, frames, 8)).astype(np.float32)
    with torch.no_grad():
        want = pipe.decode_latents(torch.from_numpy(latents)).numpy()
    got = session(root, "vae_decoder").run(["mel"], {"latents": latents})[0]
    assert got.shape == want.shape == (batch, 1, frames * 2, 16)
    assert maxdiff(got, want) <= ATOL


@pytest.mark.parametrize("batch,frames", [(1, 126), (4, 20)])
def test_vocoder_matches_pipeline_mel_to_waveform(exported, pipe, batch, frames):
    root, _ = exported
    mel = np.random.default_rng(frames).standard_normal((batch, 1, frames, 16)).astype(np.float32)
    with torch.no_grad():
        want = pipe.mel_spectrogram_to_waveform(torch.from_numpy(mel)).numpy()
    got = session(root, "vocoder").run(["waveform"], {"mel": mel[:, 0]})[0]
    assert got.shape == want.shape == (batch, frames * 64)
    assert np.max(np.abs(want)) > 1e-2  # audible-scale output, so the comparison means something
    assert maxdiff(got, want) <= ATOL


def test_manifest_reports_self_verification(exported):
    _, manifest = exported
    for model in COMPONENT_MODELS:
        meta = manifest[model]
        assert meta["max_abs_diff"] <= audioldm.PROFILES["tiny"].parity_bound[model]
        assert meta["parameters"] > 0 and meta["onnx_bytes"] > 0
        assert meta["inputs"] == list(audioldm.TENSORS[model]["inputs"])


def test_graphs_have_dynamic_batch_and_length(exported):
    import onnx

    root, _ = exported
    dynamic = {  # input -> axes that must be symbolic
        "clap_text_encoder": {"input_ids": (0, 1), "attention_mask": (0, 1)},
        "unet": {"sample": (0, 2), "timestep": (0,), "class_labels": (0,)},
        "vae_decoder": {"latents": (0, 2)},
        "vocoder": {"mel": (0, 1)},
    }
    for model, inputs in dynamic.items():
        graph = onnx.load(str(root / model / "1" / "model.onnx"), load_external_data=False).graph
        dims = {i.name: i.type.tensor_type.shape.dim for i in graph.input}
        for name, axes in inputs.items():
            for axis in axes:
                assert dims[name][axis].dim_param, f"{model}.{name} axis {axis} is fixed"


def test_attention_is_fused_and_the_components_stay_stock(exported):
    """The UNet and VAE graphs hold one ORT MultiHeadAttention per diffusers Attention (no materialised softmax),
    while the shared torch components keep diffusers' own processors for the reference pipeline."""
    import onnx
    from diffusers.models.attention_processor import AttnProcessor2_0

    root, _ = exported
    c = audioldm.build_components("tiny", None, SEED)
    for model, module in (("unet", c.unet), ("vae_decoder", c.vae.decoder)):
        ops = [n.op_type for n in onnx.load(str(root / model / "1" / "model.onnx")).graph.node]
        attentions = [m for m in module.modules() if type(m).__name__ == "Attention"]
        assert attentions and ops.count("MultiHeadAttention") == len(attentions), model
        assert "Softmax" not in ops, model
    assert all(isinstance(p, AttnProcessor2_0) for p in c.unet.attn_processors.values())
    assert all(isinstance(p, AttnProcessor2_0) for p in c.vae.attn_processors.values())


# ---------------------------------------------------------------------------------------------- Triton configs
def _parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _onnx_signature(path: Path) -> dict[str, tuple[int, int]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
            for v in list(graph.input) + list(graph.output)}


@pytest.mark.parametrize("model", COMPONENT_MODELS)
def test_component_configs_match_graph(exported, model):
    from tritonclient.grpc import model_config_pb2 as pb

    root, _ = exported
    onnx_types = {"TYPE_FP32": 1, "TYPE_INT64": 7}
    signature = _onnx_signature(root / model / "1" / "model.onnx")
    files = [TEMPLATES / model / "config.pbtxt", *sorted((TEMPLATES / model / "configs").glob("*.pbtxt"))]
    assert {f.name for f in files} == {"config.pbtxt", "onnxruntime.pbtxt", "tensorrt.pbtxt"}
    for path in files:
        cfg = _parse_config(path)
        assert cfg.name == model, path
        assert cfg.max_batch_size > 0 and cfg.HasField("dynamic_batching"), path
        assert [t.name for t in cfg.input] == list(audioldm.TENSORS[model]["inputs"]), path
        assert [t.name for t in cfg.output] == list(audioldm.TENSORS[model]["outputs"]), path
        for tensor in [*cfg.input, *cfg.output]:
            elem, rank = signature[tensor.name]
            assert onnx_types[pb.DataType.Name(tensor.data_type)] == elem, (path, tensor.name)
            assert len(tensor.dims) + 1 == rank, (path, tensor.name)  # + the batch axis
        if path.name == "config.pbtxt":
            assert cfg.backend == "grym_python"
        else:
            assert cfg.platform == "onnxruntime_onnx" and cfg.default_model_filename == "model.onnx"
    trt = _parse_config(TEMPLATES / model / "configs" / "tensorrt.pbtxt")
    accelerators = trt.optimization.execution_accelerators.gpu_execution_accelerator
    assert [a.name for a in accelerators] == ["tensorrt"]
    profile_inputs = {s.split(":")[0] for s in accelerators[0].parameters["trt_profile_opt_shapes"].split(",")}
    assert profile_inputs == set(audioldm.TENSORS[model]["inputs"])


def test_pipeline_config_is_decoupled_python():
    cfg = _parse_config(TEMPLATES / "audioldm" / "config.pbtxt")
    assert cfg.name == "audioldm" and cfg.backend == "grym_python" and cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled
    inputs = {t.name: t for t in cfg.input}
    assert set(inputs) == {"prompt", "negative_prompt", "seed", "steps", "guidance_scale", "duration_s", "scheduler",
                           "mode", "init_audio", "init_strength", "context_s"}  # the last four: audio-to-audio
    assert not inputs["prompt"].optional and all(t.optional for n, t in inputs.items() if n != "prompt")
    assert {t.name for t in cfg.output} == {"step", "total_steps", "waveform", "sample_rate", "seed",
                                            "context_waveform"}
    models = {k: v.string_value for k, v in cfg.parameters.items() if k.endswith("_model")}
    assert sorted(models.values()) == sorted((*COMPONENT_MODELS, "vae_encoder"))  # the encoder: init audio


# ---------------------------------------------------------------------------------------------- pipeline files
def test_pipeline_files(exported):
    import diffusers
    from transformers import RobertaTokenizer

    root, manifest = exported
    version = root / "audioldm" / "1"
    c = audioldm.build_components("tiny", None, SEED)
    desc = json.loads((version / "components.json").read_text())
    assert desc == audioldm.pipeline_description(c)
    assert desc["vae_scale_factor"] == 2 and desc["latent_channels"] == 4 and desc["mel_bins"] == 16
    assert desc["vocoder_upsample_factor"] == pytest.approx(64 / 16000)
    assert manifest["audioldm"]["min_duration_s"] == pytest.approx(0.008)

    tok = RobertaTokenizer.from_pretrained(version / "tokenizer", local_files_only=True)
    text = "Lo-fi hip hop beat with vinyl crackle 🎧"
    assert tok(text).input_ids == c.tokenizer(text).input_ids
    assert tok.model_max_length == 64 and (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)

    for name in audioldm.SCHEDULERS:
        config = json.loads((version / "schedulers" / name / "scheduler_config.json").read_text())
        loaded = getattr(diffusers, config["_class_name"]).from_config(config)
        expected = audioldm.make_scheduler(name, c.scheduler_config)
        assert type(loaded) is type(expected)
        public = lambda cfg: {k: v for k, v in dict(cfg).items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.config) == public(expected.config)
    ddim = json.loads((version / "schedulers" / "ddim" / "scheduler_config.json").read_text())
    assert (ddim["beta_start"], ddim["beta_end"], ddim["steps_offset"]) == (0.0015, 0.0195, 1)


# ---------------------------------------------------------------------------------------------- weights & seeds
def test_seeded_components_are_deterministic():
    a = audioldm._seeded_components("tiny", SEED)
    b = audioldm._seeded_components("tiny", SEED)
    c = audioldm._seeded_components("tiny", SEED + 1)
    for part in ("text_encoder", "unet", "vae", "vocoder"):
        sa, sb, sc = (getattr(x, part).state_dict() for x in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), part
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()


def test_components_are_shared_between_exporters(exported):
    assert audioldm.build_components("tiny", None, SEED) is audioldm.build_components("tiny", None, SEED)
    assert audioldm.build_components("tiny", None, SEED).unet is audioldm.build_components("tiny", None, SEED).unet


def test_weights_directory_round_trip(exported, pipe, tmp_path):
    """A local diffusers checkpoint exports to the same graphs as the seeded components it was saved from."""
    root, _ = exported
    ckpt = tmp_path / "ckpt"
    pipe.save_pretrained(ckpt)
    out = tmp_path / "repo"
    for name in ("unet", "audioldm"):
        audioldm.EXPORTERS[name]("tiny", out / name, ckpt, SEED)
    rng = np.random.default_rng(5)
    feeds = {"sample": rng.standard_normal((2, 4, 30, 8)).astype(np.float32),
             "timestep": np.array([[10.0], [900.0]], np.float32),
             "class_labels": rng.standard_normal((2, 32)).astype(np.float32)}
    seeded = session(root, "unet").run(["noise_pred"], feeds)[0]
    loaded = audioldm.ort_session(out / "unet" / "1" / "model.onnx").run(["noise_pred"], feeds)[0]
    assert maxdiff(seeded, loaded) <= 1e-6
    assert json.loads((out / "audioldm" / "1" / "components.json").read_text()) == json.loads(
        (root / "audioldm" / "1" / "components.json").read_text())
    assert audioldm.build_components("tiny", ckpt, SEED) is not audioldm.build_components("tiny", None, SEED)


def test_missing_weights_directory_and_unknown_profile(tmp_path):
    with pytest.raises(FileNotFoundError):
        audioldm.build_components("tiny", tmp_path / "nope", SEED)
    with pytest.raises(ValueError, match="unknown AudioLDM profile"):
        audioldm.build_components("huge", None, SEED)


@pytest.mark.slow
def test_full_profile_architecture():
    """AudioLDM-S sizes (scripts/convert_original_audioldm_to_diffusers.py DEFAULT_CONFIG): builds and has the
    expected shapes. Slow: ~440M parameters."""
    c = audioldm._seeded_components("full", SEED)
    assert c.unet.config.block_out_channels == (128, 256, 384, 640)
    assert c.vae_scale_factor == 4 and c.vocoder_upsample_factor == pytest.approx(0.01)
    assert c.text_encoder.config.projection_dim == c.unet.config.projection_class_embeddings_input_dim == 512
    assert audioldm.count_parameters(c.unet) > 150_000_000
