"""Where Anti-Memorization Guidance loses a sample: sigma_t of each sample's clean estimate at every
step, the gate lambda_t and whether AMG guided, for chosen images of an ``eval mitigate`` run (same
prompts and seeds), and the final image's similarity. A copy that returns after the gate closed shows
as a jump of sigma_t in the last steps.

    python benchmarks/amg_trace.py --model data/lab-k3k-v --index data/keyed3k-sscd4000 \
        --images out/mit-k3kv-g10/images.parquet --method amg:gate_shift=0.1 --above 0.75
"""

from __future__ import annotations

import argparse

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from diffmem.core.method_spec import parse_method_spec
from diffmem.errors import DiffmemError
from diffmem.mitigate import mitigation_config
from diffmem.mitigate.anti_memorization_guidance import AntiMemorizationGuidance
from diffmem.mitigate.fitted_gate import SimilarityTrace
from diffmem.mitigate.training_similarity import measure_against_training, open_reference
from diffmem.models.source import open_model
from diffmem.sampling import sample
from support import report


def main(argv: list[str] | None = None) -> dict:
    """Trace the chosen images again under ``--method``; returns (and writes) the record."""
    args = _parser().parse_args(argv)
    device = torch.device(args.device)
    reference = open_reference(args.index, args.encoder, device)
    name, settings = parse_method_spec(args.method)
    if name != "amg":
        raise DiffmemError(f"--method must be an amg setting; got {args.method}")
    config = mitigation_config(name, reference=reference, **settings)
    table = pq.read_table(args.images)
    table = table.filter(pc.equal(table["mitigation"], args.method))
    table = table.filter(pc.greater(table[reference.measure], args.above))
    rows = table.slice(0, args.max_images).to_pylist()
    if not rows:
        raise DiffmemError(f"no {args.method} image of {args.images} has {reference.measure} > {args.above}")
    denoiser = open_model(args.model, device)
    trace = SimilarityTrace(denoiser, reference)
    guidance = AntiMemorizationGuidance(denoiser, config, len(rows))
    latents = sample(
        denoiser,
        denoiser.encode([r["prompt"] for r in rows]),
        [r["seed"] for r in rows],
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        observers=[trace],
        guidance=[guidance],
    )
    with torch.no_grad():
        final, _ = measure_against_training(denoiser.decode(latents).float(), reference)
    timesteps, sigmas = trace.trajectories()
    samples = []
    for k, row in enumerate(rows):
        steps = [
            {"t": t, "lambda": config.lambda_t(t), "sigma": float(sigma)}
            for t, sigma in zip(timesteps, sigmas[k])
        ]
        samples.append(
            {
                "prompt_id": row["prompt_id"],
                "generation": row["generation"],
                "evaluated": row[reference.measure],
                "final": final[k],
                "guided_steps": guidance.guided_steps[k],
                "steps": steps,
            }
        )
        print(f"prompt {row['prompt_id']} generation {row['generation']}: final {final[k]:.3f}")
        for step in steps[-args.last :]:
            mark = ">" if step["sigma"] > step["lambda"] else " "
            print(f"  t={step['t']:6.1f}  sigma {step['sigma']:.3f} {mark} lambda {step['lambda']:.3f}")
    record = {"model": args.model, "index": args.index, "method": args.method, "samples": samples}
    return report(record, args.out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="the model the images were generated with")
    parser.add_argument("--index", required=True, help="the index AMG guided against")
    parser.add_argument("--encoder", help="its copy-detection encoder (default: the one it records)")
    parser.add_argument("--images", required=True, help="images.parquet of a diffmem eval mitigate run")
    parser.add_argument("--method", required=True, help="the amg row of that run to trace")
    parser.add_argument("--above", type=float, default=0.75, help="trace images more similar than this")
    parser.add_argument("--max-images", type=int, default=8)
    parser.add_argument("--last", type=int, default=6, help="steps printed per image (all are written)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps of that run")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale of that run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/amg_trace.json")
    return parser


if __name__ == "__main__":
    main()
