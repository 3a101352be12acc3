"""Files diffmem reads and writes: prompt tables, crash-safe writes, saved networks, output folders, run records."""
