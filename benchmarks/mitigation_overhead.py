"""Mitigation cost: AMG and prompt-embedding optimisation against plain sampling, the share of AMG's
time spent querying the training-set index, and what one step's similarity check costs against its UNet
pair.

    python benchmarks/mitigation_overhead.py --device cuda            # SD 1.5 architecture, fp16 (the goals)
    python benchmarks/mitigation_overhead.py --size lab --device cpu  # the shipped lab model
    python benchmarks/mitigation_overhead.py --device cpu --dtype float32 --num-inference-steps 20 \
        --batch-size 1 --no-warmup --skip gate_open prompt_optimization  # SD 1.5 architecture on a CPU

Goals (mitigation issue): AMG <= 1.3x plain sampling while its gate stays closed (it still decodes and
queries the index at every check: every step, or every ``--check-every`` steps), and its cost when the
gate is always open; prompt optimisation <= 1.5x plain generation; the index query must not dominate.
The reference set is an exact embedding index of ``--index-rows`` random unit vectors queried through a
copy-detection encoder (random weights: speed only). Prints ratios and writes a JSON record, updated
after each run so that a run stopped at a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from diffmem.core.denoiser import Denoiser
from diffmem.core.timing import timed
from diffmem.index import TrainingSetIndex
from diffmem.io.atomic import write_json_atomic
from diffmem.io.run_record import environment
from diffmem.metrics.copy_detection import CopyDetectionEncoder
from diffmem.mitigate import ReferenceSet, SamplingOptions, mitigated_generate, mitigation_config
from diffmem.mitigate.training_similarity import training_similarity
from diffmem.models.source import resolve_device, resolve_dtype
from diffmem.sampling.guided_sampler import predict_pair
from support import benchmark_model, benchmark_parser, report

PROMPT = "a photograph of an astronaut riding a horse, detailed, trending"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and writes) its record."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    denoiser = benchmark_model(args.size, device, dtype)
    encoder = CopyDetectionEncoder().to(device).eval()
    vectors = F.normalize(
        torch.randn(
            args.index_rows, encoder.config.embedding_dim, generator=torch.Generator().manual_seed(0)
        ),
        dim=1,
    )
    reference = ReferenceSet(TrainingSetIndex.build_embeddings(vectors, [PROMPT] * args.index_rows), encoder)
    prompts = [PROMPT] * args.batch_size
    sampling = SamplingOptions(num_inference_steps=args.num_inference_steps)

    def run(name: str, **settings) -> float:
        config = mitigation_config(name, **settings)
        return timed(
            lambda: mitigated_generate(
                denoiser, prompts, name, config, batch_size=args.batch_size, sampling=sampling
            ),
            device,
            args.repeats,
            warmup=not args.no_warmup,
        )

    record = {
        "size": args.size,
        "device": str(device),
        "dtype": str(dtype),
        "batch_size": args.batch_size,
        "num_inference_steps": args.num_inference_steps,
        "index_rows": args.index_rows,
        "warmup": not args.no_warmup,
        **environment(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def keep(**values: float) -> None:  # each result is on disk as soon as it is measured
        record.update(values)
        write_json_atomic(out, record)

    plain_s = run("none")
    keep(plain_s_per_image=plain_s / args.batch_size)
    closed_s = {}
    for k in args.check_every:
        closed_s[k] = run("amg", reference=reference, gate="never", check_every=k)
        keep(**{f"amg_gate_closed_check_every_{k}_vs_plain": closed_s[k] / plain_s})
    check = _check_costs(denoiser, reference, prompts, device, dtype, not args.no_warmup)
    stride = min(args.check_every)  # the index query's share, at the most frequent checking timed
    keep(
        decode_vs_unet_pair=check["decode"] / check["unet_pair"],
        encoder_and_query_vs_unet_pair=check["similarity"] / check["unet_pair"],
        index_query_share_of_amg_gate_closed=check["query"]
        * math.ceil(args.num_inference_steps / stride)
        / closed_s[stride],
    )
    if "prompt_optimization" not in args.skip:
        optimised_s = run("prompt_optimization", target=0.0)  # never reached: all 10 iterations
        keep(prompt_optimization_10_iterations_vs_plain=optimised_s / plain_s)
    if "gate_open" not in args.skip:
        keep(amg_gate_open_vs_plain=run("amg", reference=reference, gate="always") / plain_s)
    return report(record, out)


def _check_costs(
    denoiser: Denoiser,
    reference: ReferenceSet,
    prompts: list[str],
    device: torch.device,
    dtype: torch.dtype,
    warmup: bool,
) -> dict[str, float]:
    """Seconds for one step of the batch: its CFG UNet pair, the decode of x0_hat, the copy detector with
    the index query, and the query alone."""
    x_t = torch.randn(len(prompts), *denoiser.sample_shape, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    cond, null = denoiser.encode(prompts), denoiser.null_condition(len(prompts))
    with torch.no_grad():
        images = denoiser.decode(x_t).float()
        embeddings = reference.encoder(images)
        return {
            "unet_pair": timed(lambda: predict_pair(denoiser, x_t, t, cond, null), device, warmup=warmup),
            "decode": timed(lambda: denoiser.decode(x_t), device, warmup=warmup),
            "similarity": timed(lambda: training_similarity(images, reference), device, warmup=warmup),
            "query": timed(lambda: reference.index.search(embeddings, 1), device, 10),
        }


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, "benchmarks/results/mitigation_overhead.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--index-rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--check-every",
        type=int,
        nargs="+",
        default=[1, 5, 10],
        help="AMG check strides to time, gate closed",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=("gate_open", "prompt_optimization"),
        help="runs to leave out",
    )
    parser.add_argument("--no-warmup", action="store_true", help="time the first call (for slow CPU runs)")
    return parser


if __name__ == "__main__":
    main()
