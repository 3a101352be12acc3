"""Self-calibration: a model's own scale, learnt without labels from prompts it has no reason to have
memorized, and the defaults every method reads from it."""
