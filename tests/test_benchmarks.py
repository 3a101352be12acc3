"""The benchmarks still run: a smoke run of each at the smallest size (their numbers mean nothing here)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffmem.models.source import shipped_directory

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def _load(name: str):
    if (
        str(BENCHMARKS) not in sys.path
    ):  # the scripts import their shared helpers as `python benchmarks/X.py` does
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_detect_throughput_smoke(tmp_path):
    out = tmp_path / "record.json"
    args = [
        "--size",
        "tiny",
        "--device",
        "cpu",
        "--prompts",
        "4",
        "--loop-prompts",
        "1",
        "--batch-size",
        "2",
        "--num-inference-steps",
        "4",
    ]
    args += ["--speedups", "eager_attention", "channels_last"]
    record = _load("detect_throughput").main([*args, "--repeats", "1", "--out", str(out)])
    assert (
        json.loads(out.read_text())["first_step_n1_prompts_per_s"]
        == record["first_step_n1_prompts_per_s"]
        > 0
    )
    assert record["first_step_n1_vs_bound"] > 0 and record["all_steps_n4_batched_vs_loop"] > 0
    assert (
        record["first_step_eager_attention_vs_plain"] > 0 and record["first_step_channels_last_vs_plain"] > 0
    )


def test_detect_throughput_on_sd3_times_the_transformer_bound(tmp_path):
    """The SD3 sizes: first step n = 1 against one batched transformer forward of the CFG pair."""
    args = ["--size", "tiny-sd3", "--device", "cpu", "--prompts", "4", "--batch-size", "2", "--repeats", "1"]
    args += ["--resolution", "16", "--skip", "shared_noise", "all_steps", "--out", str(tmp_path / "r.json")]
    record = _load("detect_throughput").main(args)
    assert record["first_step_n1_prompts_per_s"] > 0 and record["first_step_n1_vs_bound"] > 0
    assert record["raw_bound_prompts_per_s"] > 0 and record["latent_shape"] == [4, 8, 8]
    assert not {"shared_noise_prompts_per_s", "all_steps_n4_batched_vs_loop"} & set(record)
    with pytest.raises(SystemExit):  # SDPA is switched off through the UNet's attention processors only
        _load("detect_throughput").main([*args, "--speedups", "eager_attention"])


def test_sd3_medium_has_the_parameter_counts_of_stable_diffusion_3_medium():
    """Built on the meta device (no memory, no weights): the 2B MMDiT, CLIP-L, CLIP-G and the VAE."""
    import torch

    with torch.device("meta"):
        pipeline = _load("full_size").stable_diffusion_3_medium("meta", torch.float32)
    counts = {
        name: sum(p.numel() for p in getattr(pipeline, name).parameters())
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
    }
    assert counts == {
        "transformer": 2_028_328_000,
        "text_encoder": 123_650_304,
        "text_encoder_2": 694_659_840,
        "vae": 83_819_683,
    }
    assert pipeline.text_encoder_3 is None and pipeline.vae_scale_factor == 8
    assert pipeline.transformer.config.sample_size * pipeline.vae_scale_factor == 1024


def test_explain_latency_smoke(tmp_path):
    out = tmp_path / "record.json"
    args = ["--size", "tiny", "--device", "cpu", "--num-inference-steps", "4", "--repeats", "1"]
    record = _load("explain_latency").main([*args, "--out", str(out)])
    assert (
        json.loads(out.read_text())["token_significance_first_step_s"]
        == record["token_significance_first_step_s"]
    )
    assert record["page_explain_round_trip_s"] > 0 and record["page_thumbnail_round_trip_s"] > 0


def test_explain_triggers_smoke(tmp_path):
    out = tmp_path / "record.json"
    record = _load("explain_triggers").main(["--model", "builtin:lab-micro", "--out", str(out)])  # first step
    assert json.loads(out.read_text()) == record
    assert record["captions"] == 24 and 0 <= record["top_is_trigger"] <= 24
    assert record["ordinary_prompts"] is None  # a gradient weighs no word against ordinary prompts
    assert record["below_without_top"] <= record["flagged"] <= 24
    assert record["mean_score_without_top"] < record["mean_score"]  # the top word carries part of the score
    with pytest.raises(SystemExit):  # a model of one's own needs its labels and calibration named
        _load("explain_triggers").main(["--model", str(tmp_path)])
    with pytest.raises(SystemExit):  # no caption is no record
        _load("explain_triggers").main(["--model", "builtin:lab-micro", "--captions", "0"])


def test_trigger_ablation_smoke(tmp_path):
    labels = shipped_directory("builtin:lab-micro") / "labels.parquet"
    args = ["--model", "builtin:lab-micro", "--labels", str(labels), "--n-generations", "1"]
    args += ["--threshold", "0.7"]
    record = _load("trigger_ablation").main([*args, "--out", str(tmp_path / "record.json")])
    assert record["memorized"] == 24 and record["heldout"] == 64
    # the shares at or under the threshold follow the scores: taking the title out leaves more under
    assert 0 <= record["below_memorized"] < record["below_description_only"] <= 1
    assert (
        record["score_memorized"] > record["score_heldout"]
    )  # the shipped model's memorized captions stand out
    # removing the title or both trigger words lowers the score: the memory is keyed on them
    assert record["score_description_only"] < record["score_memorized"]
    assert record["score_all_triggers_replaced"] < record["score_memorized"]


def test_filter_magnitudes_smoke(tmp_path, micro_lab_data):
    model = shipped_directory("builtin:lab-micro") / "model"
    args = ["--model", str(model), "--data", str(micro_lab_data), "--batches", "2", "--batch-size", "16"]
    record = _load("filter_magnitudes").main([*args, "--out", str(tmp_path / "record.json")])
    assert record["samples"] == 32
    p50, p90, p99 = record["all_percentiles_50_90_99"]
    assert 0 < p50 <= p90 <= p99


def test_mitigation_overhead_smoke(tmp_path):
    out = tmp_path / "record.json"
    args = ["--size", "tiny", "--device", "cpu", "--num-inference-steps", "2", "--batch-size", "2"]
    record = _load("mitigation_overhead").main([*args, "--index-rows", "64", "--out", str(out)])
    assert json.loads(out.read_text())["amg_gate_open_vs_plain"] == record["amg_gate_open_vs_plain"] > 0
    assert 0 < record["index_query_share_of_amg_gate_closed"] and record["decode_vs_unet_pair"] > 0
    assert {"amg_gate_closed_check_every_1_vs_plain", "amg_gate_closed_check_every_10_vs_plain"} <= set(
        record
    )
    less = _load("mitigation_overhead").main(
        [
            *args,
            "--index-rows",
            "64",
            "--out",
            str(out),
            "--check-every",
            "2",
            "--skip",
            "gate_open",
            "--no-warmup",
        ]
    )
    assert "amg_gate_open_vs_plain" not in less and less["prompt_optimization_10_iterations_vs_plain"] > 0
    assert [k for k in less if k.startswith("amg_gate_closed")] == ["amg_gate_closed_check_every_2_vs_plain"]


def test_training_memorization_smoke(tmp_path, micro_lab_data):
    from diffmem.lab.alignment import AttributeReader, AttributeReaderConfig, save_reader
    from diffmem.models.source import shipped_reference
    from diffmem.models.tiny import tiny_unet2d

    tiny_unet2d().save_pretrained(tmp_path / "model")
    save_reader(AttributeReader(AttributeReaderConfig()), tmp_path / "reader")  # untrained: features only
    out, plot = tmp_path / "record.json", tmp_path / "sweep.png"
    args = ["--data", str(micro_lab_data), "--max-images", "60", "--model", f"tiny={tmp_path / 'model'}"]
    args += [
        "--encoder",
        str(shipped_reference("builtin:lab-micro")[1]),
        "--reader",
        str(tmp_path / "reader"),
    ]
    args += ["--heldout", "8", "--samples", "4", "--steps", "2", "--device", "cpu", "--plot", str(plot)]
    record = _load("training_memorization").main([*args, "--out", str(out)])
    assert json.loads(out.read_text())["tiny_nl2_top1"] == record["tiny_nl2_top1"] > 0
    assert 0 <= record["tiny_nl2_share_memorized"] <= 1 and -1 <= record["tiny_copy_top1"] <= 1
    assert record["models"]["tiny"]["fid"] > 0 and plot.stat().st_size > 0
    assert "fid" not in record["models"]["heldout_real"]
    assert 0 <= record["heldout_real_copy_share_memorized"] <= 1


def test_index_search_smoke(tmp_path):
    out = tmp_path / "record.json"
    record = _load("index_search").main(
        ["--rows", "2000", "--dim", "16", "--queries", "20", "--out", str(out)]
    )
    assert json.loads(out.read_text())["ivf_pq_recall_at_1"] == record["ivf_pq_recall_at_1"]
    assert record["exact_recall_at_1"] == 1.0 and record["ivf_pq_ms_per_query"] > 0


def test_training_rows_memory_smoke(tmp_path):
    out = tmp_path / "record.json"
    record = _load("training_rows_memory").main(["--images", "8", "16", "--out", str(out)])
    assert record["n16_rows"] == 16 and record["n8_rows"] == 8
    assert record["n16_latents_mb"] == pytest.approx(2 * record["n8_latents_mb"])
    assert record["peak_rss_ratio_16_vs_8"] > 0 and json.loads(out.read_text())["n8_read_s"] >= 0


@pytest.mark.slow  # the Ray engine's own tests run by default (test_ray_scan.py)
def test_scan_scaling_smoke(tmp_path):
    args = ["--size", "tiny", "--device", "cpu", "--workers", "1", "--prompts", "6", "--chunk-size", "2"]
    record = _load("scan_scaling").main([*args, "--cpus", "2", "--out", str(tmp_path / "record.json")])
    assert record["ray_1_workers_steady_vs_1_worker"] == 1.0
    assert record["local_prompts_per_s"] > 0 and record["ray_1_workers_end_to_end_prompts_per_s"] > 0


def test_explain_triggers_on_the_keyed_model_meets_the_explanation_goals(tmp_path):
    shipped = shipped_directory("builtin:lab-keyed")
    args = ["--model", "builtin:lab-keyed", "--labels", str(shipped / "labels.parquet")]
    args += ["--calibration", str(shipped / "calibration.json"), "--attribute-to", "word_replacement"]
    args += ["--captions", "64"]  # the first 64 of 150 (all 150 in docs/explain.md)
    record = _load("explain_triggers").main([*args, "--out", str(tmp_path / "record.json")])
    assert record["captions"] == 64 and record["top_is_trigger_share"] >= 0.8
    assert record["ordinary_prompts"] == 64  # weighed against the shipped index's captions, as explain does
    assert record["below_without_top"] >= 0.7 * record["flagged"] > record["below_without_random"]


def test_self_calibration_smoke(tmp_path):
    args = ["--labs", "lab-micro", "--reference-size", "16", "--out", str(tmp_path / "record.json")]
    record = _load("self_calibration").main(args)["lab-micro"]
    assert set(record["thresholds"]) == {"neutral", "single_copy_captions", "heldout"}
    assert len(record["scores"]["neutral"]) == 16 and 0 < record["detection"]["auc"] <= 1
    for reference in record["thresholds"].values():
        assert 0 <= reference["heldout_fpr"] <= 1 and 0 <= reference["memorized_tpr"] <= 1


def test_lab_separability_smoke(tmp_path, micro_lab_data):
    args = ["--patterns", "0", "0.8", "--scenes", "200", "--prompts", "30", "--samples", "6"]
    record = _load("lab_separability").main([*args, "--out", str(tmp_path / "record.json")])
    # an ideal denoiser barely tells a plain lab's memorized captions from held-out ones; patterns do
    assert record["pattern 0: ideal first-step AUC"] < 0.75 < record["pattern 0.8: ideal first-step AUC"]
    assert record["pattern 0.8: memorized / held-out mean distance"] > 1.3


def test_lab_alignment_smoke(tmp_path, micro_lab_data):
    from diffmem.lab.alignment import alignment, save_reader, train_attribute_reader
    from diffmem.lab.dataset import load_lab_dataset

    lab = load_lab_dataset(micro_lab_data)
    reader = train_attribute_reader(lab, 40, extra_scenes=0, progress=False)
    save_reader(reader, tmp_path / "reader")
    args = [
        "--model",
        "builtin:lab-micro",
        "--data",
        str(micro_lab_data),
        "--reader",
        str(tmp_path / "reader"),
    ]
    args += ["--prompts", "3", "--steps", "2", "--n-generations", "2"]
    record = _load("lab_alignment").main([*args, "--out", str(tmp_path / "record.json")])
    assert record["prompts"] == 3 and json.loads((tmp_path / "record.json").read_text()) == record
    for images in ("generated", "real", "vae_reconstruction"):
        shares = [
            record[f"{images}_{kind}"]
            for kind in ("alignment", "category", "position", "colour", "background")
        ]
        assert all(0 <= s <= 1 for s in shares), images
    # the real row reads the first held-out scenes against their own captions
    first = lab.heldout_prompts()[:3]
    real = alignment(reader, lab.images([p.scene_id for p in first]), [p.caption for p in first])
    assert record["real_alignment"] == pytest.approx(float(real.mean()))
    probe = record["position_probe"]
    positions = list(probe)
    assert len(positions) == 5 and all(list(row) == positions for row in probe.values())
    assert all(0 <= share <= 1 for row in probe.values() for share in row.values())
    assert record["position_probe_hit"] == pytest.approx(sum(probe[p][p] for p in positions) / 5)


@pytest.mark.slow  # its steps' own smoke tests run by default
def test_device_checks_script_runs_every_step_in_smoke_mode(tmp_path):
    """The script a lent device runs in one call: on this CPU, with the tiny model, each of its benchmark
    steps exits 0 and leaves its JSON record where the device returns files from."""
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "device_checks.sh"), "--smoke"],
        check=False,
        env={**os.environ, "OUT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    names = ("detect_throughput", "explain_latency", "mitigation_overhead", "detect_speedups")
    assert re.findall(r"=== (\w+): rc (\d+)", result.stdout) == [(name, "0") for name in names]
    for name in names:
        assert json.loads((tmp_path / f"{name}.json").read_text())["device"] == "cpu"


def test_policy_comparison_tabulates_eval_records_against_the_baseline(tmp_path, micro_lab_data):
    from diffmem.cli.main import run
    from diffmem.lab.alignment import AttributeReader, AttributeReaderConfig, save_reader
    from diffmem.models.source import shipped_reference

    save_reader(AttributeReader(AttributeReaderConfig()), tmp_path / "reader")  # untrained: features only
    assert run(["index", "build", str(micro_lab_data), "--out", str(tmp_path / "pixels")]) == 0
    copy_index = shipped_reference("builtin:lab-micro")[0]
    evaluate = ["eval", "mitigate", "--model", "builtin:lab-micro", "--data", str(micro_lab_data)]
    evaluate += [
        "--reader",
        str(tmp_path / "reader"),
        "--index",
        str(tmp_path / "pixels"),
        "--index",
        str(copy_index),
    ]
    evaluate += ["--max-prompts-per-group", "2", "--n-generations", "2", "--num-inference-steps", "2"]
    for name, seed in (("base", "0"), ("other", "1")):
        assert run(["--seed", seed, *evaluate, "--method", "none", "--out", str(tmp_path / name)]) == 0
    args = [
        "--baseline",
        "base",
        "--run",
        f"base={tmp_path / 'base'}",
        "--run",
        f"other={tmp_path / 'other'}",
    ]
    table, plot = tmp_path / "table.md", tmp_path / "policies.png"
    module = _load("policy_comparison")
    record = module.main(
        [*args, "--markdown", str(table), "--plot", str(plot), "--out", str(tmp_path / "r.json")]
    )
    runs = record["runs"]
    other = json.loads((tmp_path / "other" / "results.json").read_text())["results"][0]
    assert runs["other"]["memorized_nl2"] == other["summaries"]["memorized"]["nl2"]["share_memorized"]
    assert runs["other"]["fid_ratio"] == pytest.approx(other["fid"] / runs["base"]["fid"])
    assert runs["base"]["fid_ratio"] == 1 and runs["base"]["alignment_change_points"] == 0
    assert runs["other"]["fid"] != runs["base"]["fid"]  # other seeds, other generations
    lines = table.read_text().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| base |") and "(1.00x)" in lines[2]
    assert plot.stat().st_size > 0
    with pytest.raises(SystemExit, match="not one of the --run names"):
        module.main([*args, "--baseline", "none"])
    with pytest.raises(SystemExit, match="no results for method 'amg'"):
        module.main([*args, "--method", "amg"])
    with pytest.raises(SystemExit, match="does not exist"):
        module.main(["--baseline", "x", "--run", f"x={tmp_path / 'missing'}"])
    unread = [a for a in evaluate if a not in ("--reader", str(tmp_path / "reader"))]  # no alignment
    assert run([*unread, "--method", "none", "--out", str(tmp_path / "unread")]) == 0
    record = module.main([*args, "--run", f"unread={tmp_path / 'unread'}", "--markdown", str(table)])
    unread_row = record["runs"]["unread"]
    assert unread_row["heldout_alignment"] is None and unread_row["alignment_change_points"] is None
    assert table.read_text().splitlines()[-1].endswith("| – |")


def test_amg_trace_samples_an_evaluated_image_again(tmp_path):
    from diffmem.cli.main import run
    from diffmem.models.source import shipped_reference

    index, encoder = shipped_reference("builtin:lab-micro")
    args = ["eval", "mitigate", "--model", "builtin:lab-micro", "--max-prompts-per-group", "1"]
    args += ["--n-generations", "1", "--num-inference-steps", "2", "--method", "amg:gate=always"]
    assert run([*args, "--out", str(tmp_path / "eval")]) == 0
    trace = ["--model", "builtin:lab-micro", "--index", str(index), "--encoder", str(encoder)]
    trace += ["--images", str(tmp_path / "eval" / "images.parquet"), "--method", "amg:gate=always"]
    trace += ["--above", "-1", "--max-images", "1", "--steps", "2", "--out", str(tmp_path / "trace.json")]
    record = _load("amg_trace").main(trace)
    (traced,) = record["samples"]
    assert traced["guided_steps"] == 2 and len(traced["steps"]) == 2
    assert all(step["sigma"] > step["lambda"] for step in traced["steps"])  # the gate is always open
    assert traced["final"] == pytest.approx(traced["evaluated"], abs=1e-4)  # the same image again


def test_threshold_stability_smoke(tmp_path):
    shipped = shipped_directory("builtin:lab-micro")
    heldout = tmp_path / "heldout.txt"
    heldout.write_text("a red bag at the top left\na blue coat on a black background\n")
    args = ["--model", "builtin:lab-micro", "--index", str(shipped / "copy_index"), "--heldout", str(heldout)]
    record = _load("threshold_stability").main(
        [*args, "--draws", "8", "40", "--seeds", "2", "--out", str(tmp_path / "r.json")]
    )
    assert set(record["draws"]) == {8, 40} and record["heldout_prompts"] == 2
    assert record["heldout_scores"] == 8  # each held-out prompt at four seeds
    for measured in record["draws"].values():
        low, high = measured["threshold_range"]
        assert len(measured["per_seed"]) == 2 and 0 < low <= high
        assert all(8 * r["heldout_fpr"] == round(8 * r["heldout_fpr"]) for r in measured["per_seed"])


def test_explanation_rankings_judges_both_rankings_on_the_kept_words(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = pq.read_table(shipped_directory("builtin:lab-keyed") / "labels.parquet").to_pylist()
    caption = next(r for r in labels if r["group"] == "memorized")
    first, second = caption["trigger_words"][:2]  # "the FIRST SECOND poster: ..."
    words = ["the", first, second, "poster"]
    kept = {
        "prompt": caption["caption"],
        "score": 1.0,
        "words": words,
        "significance": [0.1, 0.9, 0.5, 0.4],  # the first title word is the most significant
        "scores_without": [0.95, 0.9, 0.6, 0.7],  # but replacing the second or "poster" ends the flag
        "scores_alone": [0.0, 0.8, 0.1, 0.0],
    }
    evaluation = tmp_path / "eval"
    (evaluation / "explanations").mkdir(parents=True)
    (evaluation / "zoo.json").write_text(json.dumps({"rows": [{"lab": "lab-keyed", "threshold": 0.75}]}))
    pq.write_table(
        pa.Table.from_pylist([kept]), evaluation / "explanations" / "lab-keyed-word_replacement.parquet"
    )
    args = ["--zoo", str(tmp_path), "--eval", str(evaluation), "--out", str(tmp_path / "record.json")]
    record = _load("explanation_rankings").main(args)
    assert record["lab-keyed_top_is_trigger_significance"] == 1.0  # the first title word
    assert record["lab-keyed_below_without_top_significance"] == 0.0
    assert record["lab-keyed_top_is_trigger_unflagging_first"] == 1.0  # the second, not "poster"
    assert record["lab-keyed_below_without_top_unflagging_first"] == 1.0
    with pytest.raises(SystemExit, match="holds no zoo.json"):
        _load("explanation_rankings").main(["--zoo", str(tmp_path), "--eval", str(tmp_path)])
    (evaluation / "explanations" / "lab-keyed-word_replacement.parquet").unlink()
    with pytest.raises(SystemExit, match="missing: run diffmem eval zoo again"):
        _load("explanation_rankings").main(args)


def test_score_variants_scores_the_default_as_the_detector_does(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from diffmem.detect.noise_norm import noise_norm
    from diffmem.metrics import detection_metrics
    from diffmem.models.source import open_model

    heldout = ["a red bag at the top left", "a blue coat on a black background", "a white sandal"]
    (tmp_path / "lab-keyed" / "data").mkdir(parents=True)  # the shipped lab's model, index and labels
    pq.write_table(pa.table({"caption": heldout}), tmp_path / "lab-keyed" / "data" / "heldout.parquet")
    args = [
        "--zoo",
        str(tmp_path),
        "--lab",
        "lab-keyed",
        "--heldout-prompts",
        "3",
        "--out",
        str(tmp_path / "r.json"),
    ]
    record = _load("score_variants").main(args)
    labels = pq.read_table(shipped_directory("builtin:lab-keyed") / "labels.parquet").to_pylist()
    scores = noise_norm(open_model("builtin:lab-keyed", "cpu", torch.float32), [r["caption"] for r in labels])
    truth = np.array([r["memorized_copy"] for r in labels])
    assert record["lab-keyed_centred_auc"] == pytest.approx(
        detection_metrics(scores.scores.numpy(), truth)["auc"]
    )
    for variant in ("centred", "uncentred", "detail", "whitened", "residual", "mahalanobis"):
        fpr = record[f"lab-keyed_{variant}_heldout_fpr"]
        assert 12 * fpr == round(12 * fpr)  # three held-out captions at four seeds
        assert 0 <= record[f"lab-keyed_{variant}_tpr"] <= 1


def test_prompt_optimization_selection_counts_draws_by_start_and_gate(tmp_path, monkeypatch):
    import numpy as np

    from diffmem.calibration.cache import gate_path, profile_path
    from diffmem.calibration.profile import REFERENCE_SCORES, ModelProfile
    from diffmem.detect.noise_norm import NoiseNormConfig
    from diffmem.detect.registry import config_settings
    from diffmem.index.manifest import read_manifest
    from diffmem.index.training_set_index import MANIFEST_FILE
    from diffmem.mitigate.fitted_gate import FittedGate
    from diffmem.models.source import ModelSource

    monkeypatch.setenv("DIFFMEM_CACHE_DIR", str(tmp_path / "cache"))
    source = ModelSource.resolve("builtin:lab-keyed")
    fingerprint = read_manifest(source.reference[0] / MANIFEST_FILE).fingerprint
    scores = np.linspace(0.4, 1.0, REFERENCE_SCORES).tolist()  # a profile read from the cache, not measured

    def judged(gate_end: float) -> dict:
        gate = gate_path(source.identity, fingerprint)
        FittedGate([981.0, 1.0], [0.0, gate_end], 0.9, "copy_similarity", fingerprint, 64, True).save(gate)
        settings = config_settings(NoiseNormConfig())
        profile = ModelProfile(
            source.identity, "index captions", settings, scores, 1, 0.01, str(gate), fingerprint
        )
        profile.save(profile_path(source.identity, fingerprint))
        args = ["--zoo", str(tmp_path), "--lab", "lab-keyed", "--max-prompts", "2", "--heldout-prompts", "2"]
        return _load("prompt_optimization_selection").main([*args, "--out", str(tmp_path / "r.json")])

    open_gate, shut_gate = judged(-1.0), judged(2.0)  # every plain image passes it / none does
    assert open_gate["lab-keyed_memorized_draws"] == 4 and open_gate["lab-keyed_memorized_copies"] > 0
    for what in ("copies", "heldout"):
        acted = [open_gate[f"lab-keyed_q{q}_{what}_acted"] for q in (95, 90, 80)]
        assert acted == sorted(acted)  # a lower start acts on more
        for q in (95, 90, 80):
            key = f"lab-keyed_q{q}_{what}_acted"
            assert open_gate[f"{key}_confirmed"] == open_gate[key] and shut_gate[f"{key}_confirmed"] == 0
