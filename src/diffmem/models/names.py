"""The names of the models that come with diffmem, importable without loading any of them."""

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = BUILTIN_PREFIX + "tiny-sd"  # random weights: for trying the tools and for tests
LAB_MODEL = BUILTIN_PREFIX + "lab-keyed"  # the shipped lab model: the default of the lab-facing commands
