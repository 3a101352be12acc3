"""Token significance against the lab's ground truth (explanation issue): on the shipped lab model's
memorized captions, how often the top-ranked word is a recorded trigger word, and how often replacing
it (vs a random non-trigger word) takes a flagged prompt below the calibrated threshold.

    python benchmarks/explain_triggers.py
"""

import json

import pyarrow.parquet as pq

from diffmem.explain.evaluate import trigger_evaluation
from diffmem.models import open_model, shipped_directory

lab = shipped_directory("builtin:lab-micro")
rows = [r for r in pq.read_table(lab / "labels.parquet").to_pylist() if r["group"] == "memorized"]
threshold = json.loads((lab / "calibration.json").read_text())["threshold"]
t = trigger_evaluation(
    open_model("builtin:lab-micro"),
    [r["caption"] for r in rows],
    [r["trigger_words"] for r in rows],
    threshold,
).to_pylist()
flagged = [r for r in t if r["flagged"]]
print("top word is a trigger word:", sum(r["top_is_trigger"] for r in t), "of", len(t))
print(
    "flagged:",
    len(flagged),
    "below after replacing top word:",
    sum(r["below_without_top"] for r in flagged),
    "after a random non-trigger word:",
    sum(r["below_without_random"] for r in flagged),
)
print(
    "mean score",
    round(sum(r["score"] for r in t) / len(t), 3),
    "without top",
    round(sum(r["score_without_top"] for r in t) / len(t), 3),
    "without random",
    round(sum(r["score_without_random"] for r in t) / len(t), 3),
)
