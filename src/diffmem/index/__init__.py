"""The training-set index: nearest training images (pixels or copy-detection embeddings) and their captions,
queried by Anti-Memorization Guidance at every sampling step (SPEC §5)."""

from diffmem.index.build import index_embeddings, index_images
from diffmem.index.manifest import IndexManifest
from diffmem.index.sources import clip_retrieval_source, image_source
from diffmem.index.training_set_index import Neighbours, TrainingSetIndex

__all__ = [
    "IndexManifest",
    "Neighbours",
    "TrainingSetIndex",
    "clip_retrieval_source",
    "image_source",
    "index_embeddings",
    "index_images",
]
