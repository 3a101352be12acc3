"""A model as the user asks for it: its name and the options that pick its weights (a Hub revision and
variant, the configs of a single-file checkpoint, LoRA adapters). Importable without torch."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from diffmem.errors import DiffmemError

DEFAULT_LORA_SCALE = 1.0


@dataclass(frozen=True)
class Lora:
    """A LoRA adapter (a diffusers/kohya ``.safetensors`` file, a folder holding one, or a Hub id from the
    local cache) and its scale."""

    path: Path
    scale: float = DEFAULT_LORA_SCALE

    @classmethod
    def parse(cls, text: str) -> Lora:
        """``PATH``, ``ORG/NAME`` or either with ``:SCALE``; the path is made absolute (a Hub id: its cached
        snapshot) so worker processes find it too."""
        path, scale = text, DEFAULT_LORA_SCALE
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass  # a colon inside the path (C:\...), not a scale
        from diffmem.models.hub import cached_lora, is_hub_id  # huggingface_hub only when a LoRA is given

        resolved = Path(path).expanduser().absolute()
        if not resolved.exists() and is_hub_id(path):
            resolved = cached_lora(path)
        if not resolved.exists():
            raise DiffmemError(
                f"LoRA not found: {resolved}; give --lora PATH[:SCALE] with a local file or a cached Hub id"
            )
        return cls(resolved, scale)

    def __str__(self) -> str:
        return f"{self.path}:{self.scale:g}"


@dataclass(frozen=True)
class ModelSpec:
    """A model name (a local diffusers directory, a Hub id ``ORG/NAME``, a ``.safetensors``/``.ckpt``
    checkpoint or ``builtin:NAME``) with the options that choose its weights."""

    name: str
    revision: str | None = None  # a Hub id's branch, tag or commit (default main)
    variant: str | None = None  # weight files' variant, such as fp16 (``unet/*.fp16.safetensors``)
    model_config: str | None = None  # a single-file checkpoint's diffusers configs: a directory or Hub id
    loras: tuple[Lora, ...] = ()

    @classmethod
    def of(cls, model: str | os.PathLike | ModelSpec) -> ModelSpec:
        """``model`` as a spec: a bare name (or path) has no options."""
        return model if isinstance(model, ModelSpec) else cls(os.fspath(model))

    def __str__(self) -> str:
        """The name followed by the options, as they would be written on the command line."""
        options = [("--revision", self.revision), ("--variant", self.variant)]
        options += [("--model-config", self.model_config), *(("--lora", str(lora)) for lora in self.loras)]
        return " ".join([self.name, *(f"{flag} {value}" for flag, value in options if value is not None)])


def model_spec(
    name: str | None,
    revision: str | None = None,
    variant: str | None = None,
    model_config: str | None = None,
    loras: list[str] | None = None,
) -> str | ModelSpec | None:
    """The model the command-line options name: ``name`` alone when no option is given, else a spec;
    options without a model are an error (they would change a default the user did not pick)."""
    given = [flag for flag, value in (("--revision", revision), ("--variant", variant),
             ("--model-config", model_config), ("--lora", loras)) if value]  # fmt: skip
    if not given:
        return name
    if name is None:
        raise DiffmemError(f"{', '.join(given)} need the model they apply to: give --model too")
    return ModelSpec(name, revision, variant, model_config, tuple(Lora.parse(t) for t in loras or ()))
