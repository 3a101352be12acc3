"""Adapters: each model family behind the denoiser contract (``diffmem.core.denoiser.Denoiser``)."""

from diffmem.adapters.diffusers_base import DiffusersDenoiser
from diffmem.adapters.flux import FluxDenoiser
from diffmem.adapters.load import load_denoiser, wrap_pipeline
from diffmem.adapters.pixart import PixArtDenoiser
from diffmem.adapters.stable_diffusion import StableDiffusionDenoiser
from diffmem.adapters.stable_diffusion_3 import StableDiffusion3Denoiser
from diffmem.adapters.stable_diffusion_xl import StableDiffusionXLDenoiser
from diffmem.adapters.unet2d import UNet2DDenoiser

__all__ = [
    "DiffusersDenoiser",
    "FluxDenoiser",
    "PixArtDenoiser",
    "StableDiffusion3Denoiser",
    "StableDiffusionDenoiser",
    "StableDiffusionXLDenoiser",
    "UNet2DDenoiser",
    "load_denoiser",
    "wrap_pipeline",
]
