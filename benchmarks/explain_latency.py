"""Explanation latency: one prompt's token significance at the first step, and the serve page's round trips.

    python benchmarks/explain_latency.py --device cuda              # SD 1.5 architecture, fp16 (goal < 1 s)
    python benchmarks/explain_latency.py --size lab --device cpu    # the shipped lab model through the page's API

Measures ``token_significance`` (first of 50 steps, one generation: one CFG forward and one backward to
the prompt embedding), then the same through ``diffmem serve``'s HTTP API (``/api/explain``) and the
thumbnail (``/api/thumbnail``: a full 50-step generation). Prints seconds and writes a JSON record.
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from diffmem.core.timing import timed
from diffmem.explain import SignificanceConfig, token_significance
from diffmem.io.run_record import environment
from diffmem.models.source import resolve_device, resolve_dtype
from diffmem.serve import ExplanationServer, PromptExplainer
from support import benchmark_model, benchmark_parser, report

PROMPT = "the sulrhaquin quoobvel poster: a red pullover at the top left and pink trousers at the bottom left"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns (and writes) its record."""
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = SignificanceConfig(num_inference_steps=args.num_inference_steps)
    server = ExplanationServer(
        PromptExplainer(lambda: benchmark_model(args.size, device, dtype), config), port=0
    )
    worker = server.explainer
    explain_s = worker.run(
        lambda: timed(lambda: token_significance(worker.denoiser, PROMPT, config), device, args.repeats)
    )
    server.start()
    try:
        page_explain_s = timed(lambda: _post(server, "explain"), device, args.repeats)
        thumbnail_s = timed(lambda: _post(server, "thumbnail"), device, max(1, args.repeats // 5))
    finally:
        server.stop()
    record = {
        "size": args.size,
        "device": str(device),
        "dtype": str(dtype),
        "num_inference_steps": args.num_inference_steps,
        "token_significance_first_step_s": explain_s,
        "page_explain_round_trip_s": page_explain_s,
        "page_thumbnail_round_trip_s": thumbnail_s,
        **environment(),
    }
    return report(record, args.out)


def _post(server: ExplanationServer, action: str) -> dict:
    body = json.dumps({"prompt": PROMPT}).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{server.url}api/{action}", data=body, method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def _parser() -> argparse.ArgumentParser:
    parser = benchmark_parser(__doc__, "benchmarks/results/explain_latency.json")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    return parser


if __name__ == "__main__":
    main()
