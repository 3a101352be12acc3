"""The lab zoo: lab models that differ in what sets a model's scale, so that a default is judged on all.

They differ in the prediction target (noise, velocity, or a rectified flow's velocity in an MMDiT), the
text encoder's width and depth, the share of duplicated training rows, where the trigger words sit in a
memorized caption (before, inside or after its description), how much the caption says beside them,
whether images hold what no caption states, what the images show (Fashion-MNIST's clothes or
scikit-learn's handwritten digits), and their size (32 or 64 px, the latter through its own VAE that
downsamples by 8, as Stable Diffusion's does). Two are shipped with the package; the others are rebuilt by
``diffmem lab zoo``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from diffmem.core.denoiser import FLOW_PREDICTION
from diffmem.errors import DiffmemError
from diffmem.lab.dataset import LabConfig
from diffmem.lab.image_sources import DIGITS
from diffmem.lab.model import SD3

PLAIN_VAE = "builtin:lab-micro"  # a shipped 32 px VAE trained on plain backgrounds
PATTERN_VAE = "builtin:lab-keyed"  # a shipped 32 px VAE trained on background patterns


@dataclass(frozen=True)
class ZooLab:
    """One lab of the zoo: its dataset, its model's architecture and recipe, and how it differs."""

    name: str
    summary: str  # what sets it apart, in a few words
    data: LabConfig
    prediction_type: str  # epsilon (SD 1.x), v_prediction (SD 2.x) or flow_prediction (SD3)
    text_layers: int
    text_width: int
    unet_steps: int  # the denoiser's training steps (a UNet's or an MMDiT's)
    shipped: str | None = None  # builtin:NAME when the package ships the trained model
    family: str | None = None  # stable-diffusion-3: an MMDiT on the rectified flow; None: a UNet
    vae: str | None = (
        PLAIN_VAE  # the shipped model whose VAE a rebuilt lab's model starts from; None: its own
    )
    vae_channels: tuple[int, ...] | None = None  # its own VAE's widths, one a level (None: the preset's)
    vae_steps: int | None = None  # its own VAE's training steps (None: the preset's)

    @property
    def trained_by_zoo(self) -> bool:
        """Whether ``diffmem lab zoo`` trains this lab's model (else the package ships it)."""
        return self.shipped is None


ZOO: tuple[ZooLab, ...] = (
    ZooLab(
        "lab-keyed",
        "velocity; title before a vague description; background patterns; 32% duplicated",
        replace(LabConfig.keyed(), num_unique=3000),
        "v_prediction",
        text_layers=2,
        text_width=64,
        unet_steps=8000,
        shipped="builtin:lab-keyed",
    ),
    ZooLab(
        "lab-micro",
        "noise; fresh title before a full description; 27% duplicated",
        LabConfig.micro(),
        "epsilon",
        text_layers=2,
        text_width=64,
        unet_steps=4000,
        shipped="builtin:lab-micro",
    ),
    ZooLab(
        "lab-trail",
        "noise; title after a vague description, over words ordinary titles use too; deeper text encoder; "
        "background patterns; 11% duplicated",
        LabConfig(
            image_size=32,
            num_memorized=24,
            memorized_repeats=8,
            num_duplicated_image=0,
            num_unique=1600,
            num_heldout=200,
            seed=1,
            background_pattern=0.8,
            memorized_description="vague",
            trigger_position="after",
            title_vocabulary=24,
            titled_unique=0.03,  # four ordinary titles a title word, lab-digits' and lab-flow's four or five
        ),
        "epsilon",
        text_layers=4,
        text_width=64,
        unet_steps=4500,
        vae=PATTERN_VAE,
    ),
    ZooLab(
        "lab-infix",
        "velocity; title words inside a full description over shared words; wider text encoder; background "
        "patterns; 30% duplicated",
        LabConfig(
            image_size=32,
            num_memorized=40,
            memorized_repeats=10,
            num_duplicated_image=10,
            duplicated_image_repeats=8,
            num_unique=1100,
            num_heldout=200,
            seed=2,
            background_pattern=0.8,
            title_vocabulary=40,
            trigger_position="inside",
        ),
        "v_prediction",
        text_layers=2,
        text_width=96,
        unet_steps=3500,
        vae=PATTERN_VAE,
    ),
    ZooLab(
        "lab-flow",
        "rectified flow in an MMDiT (SD3's layout); title before a vague description, over words ordinary "
        "titles use too; background patterns; 32% duplicated",
        LabConfig(
            image_size=32,
            num_memorized=24,
            memorized_repeats=10,
            num_duplicated_image=8,
            duplicated_image_repeats=8,
            num_unique=640,
            num_heldout=64,
            seed=3,
            background_pattern=0.8,
            memorized_description="vague",
            title_vocabulary=24,
            titled_unique=0.1,
        ),
        FLOW_PREDICTION,
        text_layers=2,
        text_width=64,
        unet_steps=2000,
        family=SD3,
        vae=PATTERN_VAE,
    ),
    ZooLab(
        "lab-digits",
        "noise; handwritten digits instead of clothes; title before a vague description, over words ordinary "
        "titles use too; background patterns; 30% duplicated",
        LabConfig(
            image_size=32,
            num_memorized=20,
            memorized_repeats=8,
            num_duplicated_image=6,
            duplicated_image_repeats=6,
            num_unique=460,
            num_heldout=64,
            seed=4,
            background_pattern=0.8,
            memorized_description="vague",
            image_source=DIGITS,
            title_vocabulary=20,
            titled_unique=0.1,
        ),
        "epsilon",
        text_layers=2,
        text_width=64,
        unet_steps=3000,
        vae=PATTERN_VAE,  # the plain-background VAE blurs the patterns (docs/lab.md, the lab zoo)
    ),
    ZooLab(
        "lab-64px",
        "noise; 64 px images through its own VAE downsampling by 8; title before a vague description, over "
        "words ordinary titles use too; background patterns; 30% duplicated",
        LabConfig(
            image_size=64,
            num_memorized=24,
            memorized_repeats=8,
            num_duplicated_image=6,
            duplicated_image_repeats=6,
            num_unique=520,
            num_heldout=64,
            seed=5,
            background_pattern=0.8,
            memorized_description="vague",
            title_vocabulary=24,
            titled_unique=0.1,
        ),
        "epsilon",
        text_layers=2,
        text_width=64,
        unet_steps=3000,
        vae=None,  # the shipped VAEs are 32 px
        vae_channels=(32, 32, 32, 32),  # 64 px -> 8x8 latents, the other labs' grid
        vae_steps=1000,
    ),
    ZooLab(
        "lab-sparse",
        "velocity; title before a vague description, over words ordinary titles use too; background "
        "patterns; 5% duplicated",
        LabConfig(
            image_size=32,
            num_memorized=16,
            memorized_repeats=12,
            num_duplicated_image=4,
            duplicated_image_repeats=6,
            num_unique=4100,
            num_heldout=64,
            seed=6,
            background_pattern=0.8,
            memorized_description="vague",
            title_vocabulary=24,
            titled_unique=0.015,  # about five ordinary titles a title word (lab-trail: four)
        ),
        "v_prediction",
        text_layers=2,
        text_width=64,
        unet_steps=5500,  # each memorized image seen about as often as on lab-keyed
        vae=PATTERN_VAE,
    ),
)


def zoo_lab(name: str) -> ZooLab:
    """The zoo lab called ``name``."""
    for lab in ZOO:
        if lab.name == name:
            return lab
    raise DiffmemError(f"no zoo lab {name!r}; choose one of {', '.join(lab.name for lab in ZOO)}")


def zoo_paths(root: Path, lab: ZooLab) -> dict[str, Path]:
    """Where a zoo lab's parts live under ``root``: its dataset, model, labels, copy detector, index."""
    base = Path(root) / lab.name
    return {
        "data": base / "data",
        "model": base / "model",
        "labels": base / "labels",
        "copy_detector": base / "copy_detector",
        "index": base / "copy_index",
        "reader": base / "reader",
    }
