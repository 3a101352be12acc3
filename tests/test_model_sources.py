"""The models people bring, opened offline: Hub ids from the local cache (revision, variant), single-file
checkpoints with local configs, and LoRA adapters; each recorded against what it loads."""

import json
import re
import shutil

import huggingface_hub
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from diffmem.adapters import wrap_pipeline
from diffmem.cli.main import run
from diffmem.detect.noise_norm import NoiseNormConfig, noise_norm
from diffmem.errors import DiffmemError
from diffmem.models.source import ModelSource, model_hash
from diffmem.models.spec import Lora, ModelSpec, model_spec
from diffmem.models.tiny import tiny_stable_diffusion, tiny_unet2d

COMMIT, OTHER_COMMIT = "a" * 40, "b" * 40
PROMPTS = ["a red sneaker at the top left", "a blue bag on a gray background"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """builtin:tiny-sd (seed 0) saved as a diffusers directory, with seed-1 weights as its fp16 variant."""
    directory = tmp_path_factory.mktemp("saved") / "tiny-sd"
    tiny_stable_diffusion().save_pretrained(directory)
    tiny_stable_diffusion(seed=1).save_pretrained(directory, variant="fp16")
    return directory


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, saved):
    """A Hugging Face cache holding org/tiny-sd: main at COMMIT, tag v2 at OTHER_COMMIT (both the saved model)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny-sd"
    for ref, commit in (("main", COMMIT), ("v2", OTHER_COMMIT)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        (repo / "snapshots").mkdir(exist_ok=True)
        (repo / "snapshots" / commit).symlink_to(saved, target_is_directory=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A rank-4 LoRA on the tiny UNet's attention projections, nonzero B, in diffusers' LoRA format."""
    unet = tiny_stable_diffusion().unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(directory, unet_lora_layers=layers)
    return directory / "pytorch_lora_weights.safetensors"


def scores(denoiser) -> torch.Tensor:
    return noise_norm(denoiser, PROMPTS, NoiseNormConfig(num_inference_steps=3)).scores


# --- Hub ids from the local cache ------------------------------------------------------------------------


def test_a_hub_id_resolves_to_the_cached_snapshot_of_its_revision(hub_cache):
    main = ModelSource.resolve("org/tiny-sd")
    assert main.directory == hub_cache / "models--org--tiny-sd" / "snapshots" / COMMIT
    assert main.commit == COMMIT and main.identity == f"hf:org/tiny-sd@{COMMIT}"
    tagged = ModelSource.resolve(ModelSpec("org/tiny-sd", revision="v2"))
    pinned = ModelSource.resolve(ModelSpec("org/tiny-sd", revision=OTHER_COMMIT))
    assert (
        tagged.directory
        == pinned.directory
        == hub_cache / "models--org--tiny-sd" / "snapshots" / OTHER_COMMIT
    )
    assert tagged.identity == pinned.identity != main.identity


def test_a_hub_id_opens_offline_with_the_variant_asked_for(hub_cache):
    fp16 = ModelSource.resolve(ModelSpec("org/tiny-sd", variant="fp16"))
    assert fp16.identity != ModelSource.resolve("org/tiny-sd").identity
    for source, seed in ((fp16, 1), (ModelSource.resolve("org/tiny-sd"), 0)):  # fp16 files: seed-1 weights
        loaded = source.open().unet.state_dict()
        assert all(
            torch.equal(loaded[k], v) for k, v in tiny_stable_diffusion(seed=seed).unet.state_dict().items()
        )


def test_a_model_outside_the_cache_says_where_it_looked_and_how_to_get_it(hub_cache):
    with pytest.raises(DiffmemError) as missing:
        ModelSource.resolve("org/absent")
    message = str(missing.value)
    assert "not in the local Hugging Face cache" in message and str(hub_cache) in message
    assert "hf download org/absent" in message and "\n" not in message
    with pytest.raises(DiffmemError, match=f"not at revision v3; cached snapshots: {COMMIT}, {OTHER_COMMIT}"):
        ModelSource.resolve(ModelSpec("org/tiny-sd", revision="v3"))


def test_a_local_directory_wins_over_the_hub_id_it_spells(hub_cache, saved, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    shutil.copytree(saved, tmp_path / "org" / "tiny-sd")
    local = ModelSource.resolve("org/tiny-sd")
    assert local.commit is None and local.directory.resolve() == (tmp_path / "org" / "tiny-sd").resolve()
    assert local.identity == model_hash(saved)


# --- single-file checkpoints ------------------------------------------------------------------------------


def test_a_single_file_checkpoint_loads_its_own_weights_with_local_configs(saved, tmp_path):
    original = tiny_stable_diffusion(seed=3)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(ldm_checkpoint(original), checkpoint)
    configs = shutil.copytree(saved, tmp_path / "configs", ignore=shutil.ignore_patterns("*.safetensors"))
    source = ModelSource.resolve(ModelSpec(str(checkpoint), model_config=str(configs)))
    assert source.checkpoint == checkpoint and source.directory == configs
    opened = source.open().pipeline
    for component in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(original, component).state_dict(), getattr(opened, component).state_dict()
        assert expected.keys() == loaded.keys()
        assert all(torch.equal(expected[k], loaded[k]) for k in expected), component
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "other.safetensors")
    other = ModelSource.resolve(ModelSpec(str(tmp_path / "other.safetensors"), model_config=str(configs)))
    assert other.identity != source.identity


def test_a_single_file_checkpoint_needs_configs_of_a_family_that_reads_one(saved, tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"not read before the configs are checked")
    with pytest.raises(DiffmemError, match="single-file checkpoint: give --model-config DIR"):
        ModelSource.resolve(str(checkpoint))
    with pytest.raises(DiffmemError, match="is not a diffusers model directory"):
        ModelSource.resolve(ModelSpec(str(checkpoint), model_config=str(tmp_path)))
    tiny_unet2d().save_pretrained(tmp_path / "ddpm")
    with pytest.raises(DiffmemError, match="DDPMPipeline .* cannot read a single-file checkpoint"):
        ModelSource.resolve(ModelSpec(str(checkpoint), model_config=str(tmp_path / "ddpm")))
    with pytest.raises(DiffmemError, match="could not load the StableDiffusionPipeline in .*model.ckpt"):
        ModelSource.resolve(ModelSpec(str(checkpoint), model_config=str(saved))).open()


def test_each_weight_option_goes_only_to_a_model_it_fits(saved, lora, tmp_path):
    cases = [
        (ModelSpec(str(saved), revision="main"), "--revision picks a commit of a Hub id"),
        (ModelSpec(str(saved), model_config=str(saved)), "--model-config gives a single-file checkpoint's"),
        (ModelSpec("builtin:tiny-sd", variant="fp16"), "--variant picks the weight files"),
        (ModelSpec("builtin:tiny-unet2d", loras=(Lora(lora),)), "DDPMPipeline takes no LoRA adapters"),
    ]
    for spec, message in cases:
        with pytest.raises(DiffmemError, match=message):
            ModelSource.resolve(spec).open()
    with pytest.raises(DiffmemError, match="--lora need the model they apply to: give --model too"):
        model_spec(None, loras=[str(lora)])
    with pytest.raises(DiffmemError, match="LoRA not found"):
        Lora.parse(str(tmp_path / "absent.safetensors:0.5"))
    assert Lora.parse(f"{lora}:0.25") == Lora(lora, 0.25) and Lora.parse(str(lora)) == Lora(lora, 1.0)


# --- LoRA ------------------------------------------------------------------------------------------------


def test_a_lora_scores_as_its_fused_weights_and_is_part_of_the_identity(saved, lora):
    spec = ModelSpec(str(saved), loras=(Lora(lora, 0.7),))
    with_lora = ModelSource.resolve(spec)
    fused = tiny_stable_diffusion()
    fused.load_lora_weights(str(lora), adapter_name="fused")
    fused.set_adapters(["fused"], adapter_weights=[0.7])
    fused.fuse_lora()
    fused.unload_lora_weights()
    lora_scores, base_scores = scores(with_lora.open()), scores(ModelSource.resolve(str(saved)).open())
    torch.testing.assert_close(lora_scores, scores(wrap_pipeline(fused)), rtol=1e-5, atol=1e-5)
    assert (lora_scores - base_scores).abs().max() > 1e-3
    other_scale = ModelSource.resolve(ModelSpec(str(saved), loras=(Lora(lora, 0.5),)))
    assert len({with_lora.identity, other_scale.identity, ModelSource.resolve(str(saved)).identity}) == 3


def test_a_lora_from_the_hub_cache_scores_as_the_same_file(saved, lora, hub_cache):
    repo = hub_cache / "models--org--tiny-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    shutil.copy(lora, repo / "snapshots" / COMMIT / lora.name)
    cached = Lora.parse("org/tiny-lora:0.7")
    assert cached == Lora(repo / "snapshots" / COMMIT, 0.7)
    from_cache = ModelSource.resolve(ModelSpec(str(saved), loras=(cached,)))
    from_file = ModelSource.resolve(ModelSpec(str(saved), loras=(Lora(lora, 0.7),)))
    torch.testing.assert_close(scores(from_cache.open()), scores(from_file.open()), rtol=0, atol=0)
    with pytest.raises(
        DiffmemError, match="LoRA org/absent is not a local file and not in the local Hugging"
    ):
        Lora.parse("org/absent")
    (repo / "snapshots" / COMMIT / lora.name).unlink()
    with pytest.raises(DiffmemError, match="holds no .safetensors file"):
        Lora.parse("org/tiny-lora")


def test_the_command_line_opens_a_model_with_a_lora_and_records_it(saved, lora, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    args = ["scan", "--model", str(saved), "--prompts", str(prompts), "--num-inference-steps", "3"]
    out = str(tmp_path / "scan")
    assert run([*args, "--lora", f"{lora}:0.7", "--out", out]) == 0
    record = json.loads((tmp_path / "scan" / "summary.json").read_text())
    assert f"--lora {lora}:0.7" in json.dumps(record)
    capsys.readouterr()
    assert run([*args, "--out", out, "--resume"]) == 2  # the same directory without its LoRA is another model
    assert re.search(r"error: cannot resume .*model_hash.* differ", capsys.readouterr().err)
    assert run(["info", "--lora", str(lora)]) == 2
    assert "--lora need the model they apply to" in capsys.readouterr().err


# --- an original-format (LDM) checkpoint of a tiny pipeline, for the single-file test ----------------------

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_checkpoint(pipeline: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """A Stable Diffusion 1.x pipeline's weights under the original (LDM) names that
    ``from_single_file`` reads: the inverse of diffusers' conversion, for UNets and VAEs of any depth."""
    unet, vae = pipeline.unet, pipeline.vae
    attended = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    checkpoint = {}
    for key, value in unet.state_dict().items():
        name = _ldm_unet_key(key, unet.config.layers_per_block, attended)
        checkpoint["model.diffusion_model." + name] = value
    for key, value in vae.state_dict().items():
        checkpoint["first_stage_model." + _ldm_vae_key(key, len(vae.config.down_block_types))] = value
    for key, value in pipeline.text_encoder.state_dict().items():
        checkpoint[
            "cond_stage_model.transformer." + ("" if key.startswith("text_model.") else "text_model.") + key
        ] = value
    return {key: value.contiguous() for key, value in checkpoint.items()}


def _ldm_unet_key(key: str, per_block: int, attended: set[int]) -> str:
    layers = per_block + 1  # the LDM UNet numbers a down block's layers and its downsampler in one sequence
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, layer, rest = int(m[2]), int(m[4]), m[5]
        index = 1 + block * layers + layer if m[1] == "down" else block * layers + layer
        side = "input" if m[1] == "down" else "output"
        return f"{side}_blocks.{index}.{0 if m[3] == 'resnets' else 1}.{_renamed(rest, RESNET) if m[3] == 'resnets' else rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * layers}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(m[1])
        return f"output_blocks.{block * layers + per_block}.{2 if block in attended else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_renamed(m[2], RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    return _renamed(key, UNET_TOP)


def _ldm_vae_key(key: str, blocks: int) -> str:
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        block = (
            int(m[3]) if m[2] == "down" else blocks - 1 - int(m[3])
        )  # LDM numbers up blocks from the bottom
        return f"{m[1]}.{m[2]}.{block}.block.{m[4]}.{m[5].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_renamed(m[2], VAE_ATTENTION)}"
    return key.replace("conv_norm_out", "norm_out")


def _renamed(key: str, names: dict[str, str]) -> str:
    """``key`` with the first of ``names`` it starts with replaced."""
    for new, old in names.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    return key
