import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    PNDMScheduler,
)

from diffmem.errors import DiffmemError
from diffmem.models.tiny import tiny_stable_diffusion, tiny_stable_diffusion_xl, tiny_unet2d

PROMPT = "a red sneaker"


@pytest.fixture(autouse=True, scope="module")
def _private_tokenizer_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFMEM_CACHE", str(tmp_path_factory.mktemp("diffmem-cache")))
        yield


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _text_latents(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_inference_steps=2, output_type="latent", generator=_generator()).images


def _pixels(pipe) -> torch.Tensor:
    return torch.from_numpy(
        pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=_generator()).images
    )


def _modules(pipe) -> dict[str, torch.nn.Module]:
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _same_weights(a, b) -> bool:
    modules_a, modules_b = _modules(a), _modules(b)
    assert modules_a.keys() == modules_b.keys()
    for name, module in modules_a.items():
        state_a, state_b = module.state_dict(), modules_b[name].state_dict()
        assert state_a.keys() == state_b.keys()
        if not all(torch.equal(state_a[key], state_b[key]) for key in state_a):
            return False
    return True


def _public_config(scheduler) -> dict:
    return {key: value for key, value in scheduler.config.items() if not key.startswith("_")}


def _reload(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    return DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)


BUILDERS = {
    "sd": tiny_stable_diffusion,
    "sdxl": tiny_stable_diffusion_xl,
    "unet2d": tiny_unet2d,
    "unet2d-class": lambda seed=0: tiny_unet2d(class_conditional=True, learned_variance=True, seed=seed),
}


@pytest.mark.parametrize("kind", BUILDERS)
def test_models_are_cpu_float32_eval(kind):
    for module in _modules(BUILDERS[kind]()).values():
        assert not module.training
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in module.parameters())


@pytest.mark.parametrize("kind", BUILDERS)
def test_same_seed_same_weights_other_seed_other_weights(kind):
    build = BUILDERS[kind]
    assert _same_weights(build(seed=3), build(seed=3))
    first, other = build(seed=3), build(seed=4)
    for name, module in _modules(first).items():
        a, b = module.state_dict(), _modules(other)[name].state_dict()
        assert any(not torch.equal(a[key], b[key]) for key in a), name


@pytest.mark.parametrize(
    ("scheduler", "scheduler_class"),
    [
        ("ddim", DDIMScheduler),
        ("ddpm", DDPMScheduler),
        ("pndm", PNDMScheduler),
        ("euler", EulerDiscreteScheduler),
    ],
)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_stable_diffusion_runs_with_each_scheduler(scheduler, scheduler_class, prediction_type):
    pipe = tiny_stable_diffusion(prediction_type=prediction_type, scheduler=scheduler)
    assert type(pipe.scheduler) is scheduler_class
    assert pipe.scheduler.config.prediction_type == prediction_type
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert (pipe.scheduler.config.beta_start, pipe.scheduler.config.beta_end) == (0.00085, 0.012)
    latents = _text_latents(pipe)
    assert latents.shape == (1, 4, 8, 8)
    assert torch.isfinite(latents).all()


def test_stable_diffusion_decodes_16_pixel_images():
    pipe = tiny_stable_diffusion()
    assert pipe.vae_scale_factor == 2
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    images = pipe([PROMPT, "a cat"], num_inference_steps=2, output_type="pt", generator=_generator()).images
    assert images.shape == (2, 3, 16, 16)


def test_stable_diffusion_text_encoder_matches_tokenizer():
    pipe = tiny_stable_diffusion()
    assert len(pipe.tokenizer) == pipe.text_encoder.config.vocab_size == 49408
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings == 77
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_unknown_scheduler_is_refused():
    with pytest.raises(DiffmemError, match="euler"):
        tiny_stable_diffusion(scheduler="lms")


def test_stable_diffusion_xl_runs():
    pipe = tiny_stable_diffusion_xl()
    assert type(pipe.scheduler) is EulerDiscreteScheduler
    assert pipe.config.force_zeros_for_empty_prompt
    assert pipe.tokenizer_2.pad_token == "!" and len(pipe.tokenizer_2) == 49408
    latents = _text_latents(pipe)
    assert latents.shape == (1, 4, 8, 8)
    assert torch.isfinite(latents).all()


def test_stable_diffusion_xl_embeddings_have_the_expected_sizes():
    pipe = tiny_stable_diffusion_xl()
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
    assert embeds.shape == (1, 77, pipe.unet.config.cross_attention_dim) == (1, 77, 64)
    assert pooled.shape == (1, 32)
    assert torch.count_nonzero(negative) == 0 and torch.count_nonzero(negative_pooled) == 0


def test_unet2d_ddpm_runs():
    pipe = tiny_unet2d()
    assert type(pipe) is DDPMPipeline and type(pipe.scheduler) is DDPMScheduler
    assert pipe.unet.config.num_class_embeds is None
    images = _pixels(pipe)
    assert images.shape == (2, 8, 8, 3)
    assert images.min() >= 0 and images.max() <= 1


def test_unet2d_ddim_runs():
    pipe = tiny_unet2d(scheduler="ddim")
    assert type(pipe) is DDIMPipeline and type(pipe.scheduler) is DDIMScheduler
    assert _pixels(pipe).shape == (2, 8, 8, 3)


def test_unet2d_learned_variance_runs():
    pipe = tiny_unet2d(learned_variance=True)
    assert pipe.unet.config.out_channels == 6
    assert pipe.scheduler.config.variance_type == "learned_range"
    assert _pixels(pipe).shape == (2, 8, 8, 3)


def test_unet2d_learned_variance_needs_ddpm():
    with pytest.raises(DiffmemError, match="ddpm"):
        tiny_unet2d(learned_variance=True, scheduler="ddim")


def test_unet2d_class_conditional_has_a_null_class():
    pipe = tiny_unet2d(class_conditional=True, num_classes=5)
    null_class = pipe.unet.config.num_class_embeds - 1
    assert null_class == 5
    sample = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        out = pipe.unet(sample, 10, class_labels=torch.tensor([0, 4, null_class])).sample
        other = pipe.unet(sample, 10, class_labels=torch.tensor([1, 4, null_class])).sample
    assert out.shape == (3, 3, 8, 8)
    assert not torch.equal(out[0], other[0])
    assert torch.equal(out[1:], other[1:])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_text_pipelines_round_trip(kind, tmp_path):
    pipe = BUILDERS[kind]()
    reloaded = _reload(pipe, tmp_path)
    assert type(reloaded) is type(pipe)
    assert _same_weights(pipe, reloaded)
    assert _public_config(reloaded.scheduler) == _public_config(pipe.scheduler)
    for name in ("tokenizer", "tokenizer_2"):
        if name in pipe.components:
            tokenizer, loaded = pipe.components[name], reloaded.components[name]
            assert len(loaded) == 49408 and loaded.model_max_length == 77
            assert loaded.pad_token == tokenizer.pad_token
            assert loaded(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    # Reloaded weights may sit at other memory alignments, so CPU kernels can differ in the last bits.
    torch.testing.assert_close(_text_latents(reloaded), _text_latents(pipe), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [{}, {"scheduler": "ddim"}, {"learned_variance": True}])
def test_unet2d_round_trips(options, tmp_path):
    pipe = tiny_unet2d(**options)
    reloaded = _reload(pipe, tmp_path)
    assert type(reloaded) is type(pipe)
    assert _same_weights(pipe, reloaded)
    assert _public_config(reloaded.scheduler) == _public_config(pipe.scheduler)
    torch.testing.assert_close(_pixels(reloaded), _pixels(pipe), rtol=1e-5, atol=1e-5)


def test_class_conditional_unet2d_round_trips(tmp_path):
    pipe = tiny_unet2d(class_conditional=True)
    reloaded = _reload(pipe, tmp_path)
    assert reloaded.unet.config.num_class_embeds == 11
    assert _same_weights(pipe, reloaded)
