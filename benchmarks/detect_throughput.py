"""Detection throughput: noise-norm prompts/s against the raw UNet bound, and batched against per-prompt.

    python benchmarks/detect_throughput.py --device cuda            # SD 1.5 architecture, fp16 (the goal)
    python benchmarks/detect_throughput.py --size tiny --device cpu  # a smoke run of the same code

Goals (detection issue): first step n = 1 at >= 0.9x the bound of one batched UNet forward of the CFG
pair at the same batch size; all steps n = 4 at >= 5x a one-prompt-at-a-time loop like the reference
implementation's (each prompt's n generations in one batch). Prints the ratios and writes a JSON record.

--speedups measures first step n = 1 with each speedup against plain (scaled-dot-product attention is
diffusers' default, so it is measured by switching it off: `eager_attention`); compiled variants are
timed after a warm-up run that compiles every batch shape.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from diffusers.models.attention_processor import AttnProcessor

from diffmem.core.timing import timed
from diffmem.detect import NoiseNormConfig, noise_norm
from diffmem.io.run_record import environment
from diffmem.models.source import resolve_device, resolve_dtype
from diffmem.models.speedups import Speedups, apply_speedups
from support import benchmark_model, benchmark_parser, report

SPEEDUPS = {
    "channels_last": Speedups(channels_last=True),
    "compile": Speedups(compile_mode="default"),
    "compile_channels_last": Speedups(channels_last=True, compile_mode="default"),
    "cuda_graphs": Speedups(compile_mode="reduce-overhead"),  # CUDA only
}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and writes) its record."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    denoiser = benchmark_model(args.size, device, dtype)
    prompts = [
        f"a photograph of item {i} by an artist, trending, detailed, high quality"
        for i in range(args.prompts)
    ]
    first = NoiseNormConfig(batch_size=args.batch_size)
    bound_s = _raw_cfg_forward_s(denoiser, args.batch_size, args.repeats)
    bound = args.batch_size / bound_s
    first_pps = _prompts_per_s(denoiser, prompts, first)
    shared_pps = _prompts_per_s(denoiser, prompts, replace(first, shared_noise=True))
    every = NoiseNormConfig(
        num_inference_steps=args.num_inference_steps, steps=None, n_generations=4, batch_size=args.batch_size
    )
    loop_prompts = prompts[: args.loop_prompts]
    batched_pps = _prompts_per_s(denoiser, loop_prompts, every)
    loop_pps = _per_prompt_loop_pps(denoiser, loop_prompts, every)
    record = {
        "size": args.size,
        "device": str(device),
        "dtype": str(dtype),
        "batch_size": args.batch_size,
        "prompts": args.prompts,
        "all_steps_num_inference_steps": args.num_inference_steps,
        "raw_bound_prompts_per_s": bound,
        "first_step_n1_prompts_per_s": first_pps,
        "first_step_n1_vs_bound": first_pps / bound,
        "shared_noise_prompts_per_s": shared_pps,
        "shared_noise_vs_bound": shared_pps / bound,
        "all_steps_n4_batched_prompts_per_s": batched_pps,
        "all_steps_n4_per_prompt_loop_prompts_per_s": loop_pps,
        "all_steps_n4_batched_vs_loop": batched_pps / loop_pps,
    }
    for variant in args.speedups:
        variant_pps = _speedup_pps(variant, args.size, device, dtype, prompts, first)
        record[f"first_step_{variant}_prompts_per_s"] = variant_pps
        record[f"first_step_{variant}_vs_plain"] = variant_pps / first_pps
    record.update(environment())
    return report(record, args.out)


def _raw_cfg_forward_s(denoiser, batch_size: int, repeats: int) -> float:
    """Seconds of one UNet forward of the CFG pair (2 x batch_size samples), the speed-of-light per batch."""
    unet = denoiser.unet
    shape = (2 * batch_size, *denoiser.sample_shape)
    x = torch.randn(shape, device=denoiser.device, dtype=denoiser.dtype)
    hidden = torch.randn(
        2 * batch_size, 77, unet.config.cross_attention_dim, device=denoiser.device, dtype=denoiser.dtype
    )
    t = torch.tensor(981, device=denoiser.device)
    with torch.no_grad():
        return timed(
            lambda: unet(x, t, encoder_hidden_states=hidden, return_dict=False), denoiser.device, repeats
        )


def _prompts_per_s(denoiser, prompts: list[str], config: NoiseNormConfig) -> float:
    seconds = timed(lambda: noise_norm(denoiser, prompts, config), denoiser.device, 1)
    return len(prompts) / seconds


def _speedup_pps(
    variant: str,
    size: str,
    device: torch.device,
    dtype: torch.dtype,
    prompts: list[str],
    config: NoiseNormConfig,
) -> float:
    """First-step prompts/s of a fresh model with one speedup (or SDPA switched off)."""
    denoiser = benchmark_model(size, device, dtype)
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
    parser = benchmark_parser(__doc__, "benchmarks/results/detect_throughput.json")
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
    return parser


if __name__ == "__main__":
    main()
