"""The ``diffmem`` command line: a thin mirror of the Python API."""
