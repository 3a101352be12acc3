"""The memorization lab: a dataset and models that memorize on purpose, with ground truth."""
