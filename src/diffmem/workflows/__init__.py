"""What each ``diffmem`` command does, as a Python function: a typed config in, a result object out.

The command line only turns flags into these configs and prints; a notebook calls the same functions.
"""
