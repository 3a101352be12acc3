"""Detection throughput: noise-norm prompts/s against the raw network bound, and batched against per-prompt.

    python benchmarks/detect_throughput.py --device cuda            # SD 1.5 architecture, fp16 (the goal)
    python benchmarks/detect_throughput.py --size tiny --device cpu  # a smoke run of the same code
    python benchmarks/detect_throughput.py --size sd3-medium --device cpu --dtype float32 --resolution 512 \
        --prompts 4 --batch-size 2 --repeats 2 --skip shared_noise all_steps  # SD3-medium's MMDiT, first step

Goals (detection issue): first step n = 1 at >= 0.9x the bound of one batched UNet forward of the CFG
pair at the same batch size; all steps n = 4 at >= 5x a one-prompt-at-a-time loop like the reference
implementation's (each prompt's n generations in one batch). Prints the ratios and writes a JSON record.
For the SD3 sizes the bound is one batched transformer forward of the CFG pair, its text condition of the
shapes the adapter passes (``prompt_embeds`` [2B, 77 + 256, 4096]: CLIP, then T5's zeros; ``pooled`` [2B,
2048]); ``--resolution`` sets the image size (SD3-medium: 1024 px by default).

--speedups measures first step n = 1 with each speedup against plain (scaled-dot-product attention is
diffusers' default, so it is measured by switching it off: `eager_attention`, UNet sizes only); compiled
variants are timed after a warm-up run that compiles every batch shape. --skip leaves out the shared-noise
and all-steps settings (the latter runs 50 steps per prompt: hours for SD3-medium on a CPU).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import replace

import torch
from diffusers.models.attention_processor import AttnProcessor

from diffmem.adapters import StableDiffusion3Denoiser
from diffmem.core.timing import timed
from diffmem.detect import NoiseNormConfig, noise_norm
from diffmem.io.run_record import environment
from diffmem.models.source import resolve_device, resolve_dtype
from diffmem.models.speedups import Speedups, apply_speedups
from support import SD3_SIZES, SIZES, benchmark_model, benchmark_parser, report

SPEEDUPS = {
    "channels_last": Speedups(channels_last=True),
    "compile": Speedups(compile_mode="default"),
    "compile_channels_last": Speedups(channels_last=True, compile_mode="default"),
    "cuda_graphs": Speedups(compile_mode="reduce-overhead"),  # CUDA only
}
SKIPPABLE = ("shared_noise", "all_steps")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and writes) its record."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.size in SD3_SIZES and "eager_attention" in args.speedups:
        parser.error("eager_attention swaps a UNet's attention processors; SD3's joint attention has none")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    denoiser = benchmark_model(args.size, device, dtype, args.resolution)
    prompts = [
        f"a photograph of item {i} by an artist, trending, detailed, high quality"
        for i in range(args.prompts)
    ]
    first = NoiseNormConfig(batch_size=args.batch_size)
    bound = args.batch_size / _raw_cfg_forward_s(denoiser, args.batch_size, args.repeats)
    first_pps = _prompts_per_s(denoiser, prompts, first)
    record = {
        "size": args.size,
        "device": str(device),
        "dtype": str(dtype),
        "latent_shape": list(denoiser.sample_shape),
        "batch_size": args.batch_size,
        "prompts": args.prompts,
        "raw_bound_prompts_per_s": bound,
        "first_step_n1_prompts_per_s": first_pps,
        "first_step_n1_vs_bound": first_pps / bound,
    }
    if "shared_noise" not in args.skip:
        shared_pps = _prompts_per_s(denoiser, prompts, replace(first, shared_noise=True))
        record.update(shared_noise_prompts_per_s=shared_pps, shared_noise_vs_bound=shared_pps / bound)
    if "all_steps" not in args.skip:
        record.update(_all_steps(denoiser, prompts[: args.loop_prompts], args))
    for variant in args.speedups:
        variant_pps = _speedup_pps(variant, args, device, dtype, prompts, first)
        record[f"first_step_{variant}_prompts_per_s"] = variant_pps
        record[f"first_step_{variant}_vs_plain"] = variant_pps / first_pps
    record.update(environment())
    return report(record, args.out)


def _raw_cfg_forward_s(denoiser, batch_size: int, repeats: int) -> float:
    """Seconds of one network forward of the CFG pair (2 x batch_size samples), the speed-of-light per batch."""
    build = _sd3_forward if isinstance(denoiser, StableDiffusion3Denoiser) else _unet_forward
    forward = build(denoiser, 2 * batch_size)
    with torch.no_grad():
        return timed(forward, denoiser.device, repeats)


def _unet_forward(denoiser, samples: int) -> Callable[[], object]:
    """One UNet call on ``samples`` latents attending to CLIP states [samples, 77, cross_attention_dim]."""
    unet = denoiser.unet
    x = torch.randn((samples, *denoiser.sample_shape), device=denoiser.device, dtype=denoiser.dtype)
    hidden = torch.randn(
        samples, 77, unet.config.cross_attention_dim, device=denoiser.device, dtype=denoiser.dtype
    )
    t = torch.tensor(981, device=denoiser.device)
    return lambda: unet(x, t, encoder_hidden_states=hidden, return_dict=False)


def _sd3_forward(denoiser: StableDiffusion3Denoiser, samples: int) -> Callable[[], object]:
    """One SD3 transformer call on ``samples`` latents at the first step (t = 1000), its condition of the
    shapes the adapter's encoder gives: ``prompt_embeds`` [samples, 77 + T5 positions, joint_attention_dim]
    and ``pooled_projections`` [samples, 2 CLIP widths]."""
    cond = denoiser.encode([""])

    def like(name: str) -> torch.Tensor:
        shape = (samples, *cond[name].shape[1:])
        return torch.randn(shape, device=denoiser.device, dtype=denoiser.dtype)

    x = torch.randn((samples, *denoiser.sample_shape), device=denoiser.device, dtype=denoiser.dtype)
    prompt_embeds, pooled = like("prompt_embeds"), like("pooled_projections")
    t = torch.full((samples,), 1000.0, device=denoiser.device)
    return lambda: denoiser.transformer(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled,
        return_dict=False,
    )


def _all_steps(denoiser, prompts: list[str], args: argparse.Namespace) -> dict:
    """All steps, n = 4: batched prompts/s against a one-prompt-at-a-time loop's."""
    every = NoiseNormConfig(
        num_inference_steps=args.num_inference_steps, steps=None, n_generations=4, batch_size=args.batch_size
    )
    batched_pps = _prompts_per_s(denoiser, prompts, every)
    loop_pps = _per_prompt_loop_pps(denoiser, prompts, every)
    return {
        "all_steps_num_inference_steps": args.num_inference_steps,
        "all_steps_n4_batched_prompts_per_s": batched_pps,
        "all_steps_n4_per_prompt_loop_prompts_per_s": loop_pps,
        "all_steps_n4_batched_vs_loop": batched_pps / loop_pps,
    }


def _prompts_per_s(denoiser, prompts: list[str], config: NoiseNormConfig) -> float:
    seconds = timed(lambda: noise_norm(denoiser, prompts, config), denoiser.device, 1)
    return len(prompts) / seconds


def _speedup_pps(
    variant: str,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    prompts: list[str],
    config: NoiseNormConfig,
) -> float:
    """First-step prompts/s of a fresh model with one speedup (or SDPA switched off)."""
    denoiser = benchmark_model(args.size, device, dtype, args.resolution)
    if variant == "eager_attention":
        denoiser.network.set_attn_processor(AttnProcessor())
    else:
        apply_speedups(denoiser, SPEEDUPS[variant])
        if SPEEDUPS[variant].compile_mode is not None:
            noise_norm(denoiser, prompts, config)  # compiles each batch shape
    return _prompts_per_s(denoiser, prompts, config)


def _per_prompt_loop_pps(denoiser, prompts: list[str], config: NoiseNormConfig) -> float:
    """One prompt at a time, its generations batched together (as the reference implementation runs)."""
    single = replace(config, batch_size=config.n_generations)
    seconds = timed(
        lambda: [noise_norm(denoiser, [p], single, prompt_ids=[i]) for i, p in enumerate(prompts)],
        denoiser.device,
        1,
    )
    return len(prompts) / seconds


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, "benchmarks/results/detect_throughput.json", (*SIZES, *SD3_SIZES))
    parser.add_argument(
        "--resolution", type=int, default=None, help="image side in pixels (default: the model's own)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=512, help="prompts for the first-step settings")
    parser.add_argument("--loop-prompts", type=int, default=16, help="prompts for the all-steps comparison")
    parser.add_argument(
        "--num-inference-steps", type=int, default=50, help="schedule of the all-steps setting"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed raw forwards")
    parser.add_argument(
        "--speedups",
        nargs="*",
        default=[],
        choices=["eager_attention", *SPEEDUPS],
        help="first-step variants to time against plain",
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=SKIPPABLE, help="settings to leave out")
    return parser


if __name__ == "__main__":
    main()
