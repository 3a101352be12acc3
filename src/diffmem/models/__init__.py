"""Model sources: names resolved to directories or built-ins with their shipped assets, tiny pipelines, speed-ups."""
