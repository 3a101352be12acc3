"""Mitigation cost: AMG and prompt-embedding optimisation against plain sampling, and the share of AMG's
time spent querying the training-set index.

    python benchmarks/mitigation_overhead.py --device cuda            # SD 1.5 architecture, fp16 (the goals)
    python benchmarks/mitigation_overhead.py --size lab --device cpu  # the shipped lab model

Goals (mitigation issue): AMG <= 1.3x plain sampling while its gate stays closed (it still decodes and
queries the index every step), and its cost when the gate is always open; prompt optimisation <= 1.5x
plain generation; the index query must not dominate. The reference set is an exact embedding index of
``--index-rows`` random unit vectors queried through a copy-detection encoder (random weights: speed
only). Prints ratios and writes a JSON record.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from diffmem.benchmark_support import benchmark_model, benchmark_parser, report
from diffmem.index import TrainingSetIndex
from diffmem.metrics.copy_detection import CopyDetectionEncoder
from diffmem.mitigate import ReferenceSet, SamplingOptions, mitigated_generate, mitigation_config
from diffmem.models import resolve_device, resolve_dtype
from diffmem.run_record import environment
from diffmem.timing import timed

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
        )

    plain_s = run("none")
    closed_s = run("amg", reference=reference, gate="never")
    open_s = run("amg", reference=reference, gate="always")
    optimised_s = run("prompt_optimization", target=0.0)  # never reached: all 10 iterations
    with torch.no_grad():
        images = denoiser.decode(
            torch.randn(args.batch_size, *denoiser.sample_shape, device=device, dtype=dtype)
        ).float()
        embeddings = encoder(images)
    query_s = timed(lambda: reference.index.search(embeddings, 1), device, 10) * args.num_inference_steps
    record = {
        "size": args.size,
        "device": str(device),
        "dtype": str(dtype),
        "batch_size": args.batch_size,
        "num_inference_steps": args.num_inference_steps,
        "index_rows": args.index_rows,
        "plain_s_per_image": plain_s / args.batch_size,
        "amg_gate_closed_vs_plain": closed_s / plain_s,
        "amg_gate_open_vs_plain": open_s / plain_s,
        "prompt_optimization_10_iterations_vs_plain": optimised_s / plain_s,
        "index_query_share_of_amg_gate_closed": query_s / closed_s,
        **environment(),
    }
    return report(record, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, "benchmarks/results/mitigation_overhead.json")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--index-rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=1)
    return parser


if __name__ == "__main__":
    main()
