"""Fine-tuning (or training from a fresh pipeline) on ``accelerate``: Stable-Diffusion-architecture
text-to-image pipelines (SD 1.x/2.x, SDXL and SD3) and unconditional or class-conditional ``UNet2DModel``
pipelines, shaped like diffusers' ``train_text_to_image.py``, ``train_text_to_image_sdxl.py`` and
``train_dreambooth_sd3.py`` (the UNet or MMDiT trained, VAE and text encoders frozen; mixed precision,
gradient accumulation, EMA, checkpoints and resume) with one seam: per-sample losses ([B]) pass through
the training policies before they are reduced.

Policies (SPEC §4, §6, §7): ``ambient`` (Shah et al.: the noisy-copy loss above sigma_n, in VP form, or
in rectified-flow form for SD3), ``filter`` (Wen et al.: samples whose ``||eps_c - eps_u||`` reaches the
threshold are masked out; a step where every process masks everything makes no update) and ``captions``
(Somepalli et al.: captions randomised with probability p) and ``dedup`` (each training image once,
near-duplicates dropped, before training). The clean latents are the VAE posterior means (shifted and)
scaled, cached on disk (:mod:`diffmem.train.latent_cache`), so an image's noisy copy (ambient) is a fixed
latent. Noise, velocity (SD 2.x) and clean-sample models train on their own parametrisation's loss and
the filter measures every one in noise terms; SD3 trains on the rectified flow's velocity at SD3's
logit-normal timesteps (:mod:`diffmem.lab.rectified_flow`) and the filter measures ``||v_c - v_u||``, its
detection score.

A text-to-image pipeline trains on any training set :mod:`diffmem.train.training_set` reads (a lab dataset,
an image folder, a saved ``datasets`` dataset, WebDataset shards); a ``UNet2DModel`` pipeline on a lab
dataset, whose scenes give its class labels.

With ``lora_rank`` set, a text-to-image UNet or MMDiT trains a LoRA adapter instead
(:mod:`diffmem.train.lora`): the base network frozen, the optimizer, EMA and checkpoints over the adapter
alone, the result the adapter in diffusers' LoRA format; the policies act on the data and the per-sample
losses, so they apply unchanged. With ``lora_text_encoder`` an SD 1.x/2.x text encoder trains an adapter of
the same rank beside it, its captions encoded with gradients at every step.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import (
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
)
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffmem.core.denoiser import FLOW_PREDICTION, eps_from_model_output
from diffmem.core.method_spec import method_config, parse_method_spec
from diffmem.data import RowReport
from diffmem.data.lab_rows import is_lab_dataset
from diffmem.errors import DiffmemError
from diffmem.io.atomic import write_json_atomic
from diffmem.io.run_record import environment
from diffmem.lab.rectified_flow import flow_timesteps
from diffmem.models.source import model_hash
from diffmem.train.ambient_loss import (
    NATIVE_WEIGHTS,
    ambient_flow_input,
    ambient_loss_flow,
    ambient_loss_vp,
    ambient_vp_input,
    flow_sigma_n,
    noisy_copies,
    timestep_of_sigma,
)
from diffmem.train.caption_randomisation import CaptionRandomisationConfig, randomise_captions
from diffmem.train.deduplication import DeduplicationConfig, deduplicate
from diffmem.train.latent_cache import cached_latents, encode_latents
from diffmem.train.lora import (
    TEXT_ENCODER_TARGET_MODULES,
    WEIGHT_NAME,
    add_lora,
    checkpoint_adapter_only,
    save_lora,
    target_modules,
)
from diffmem.train.magnitude_filter import MagnitudeFilter, MagnitudeFilterConfig, prediction_magnitude
from diffmem.train.training_set import DataOptions, TrainingSet, read_training_set

RECORD = "fine_tune.json"
DATA_REPORT = "data_report.json"  # the rows read and those skipped, beside the record
MODEL_DIR = "model"  # a full fine-tune's pipeline
LORA_DIR = "lora"  # a LoRA fine-tune's adapter
PROGRESS_EVERY = 25  # steps between loss read-outs on the progress bar
AUGMENT_STREAM = 1  # tells the random crops' and flips' seeds from the batches'


@dataclass(frozen=True)
class AmbientConfig:
    """Shah et al.'s noise level of the fixed noisy copies (0.5 for FFHQ 64x64 with 300 images)."""

    sigma_n: float = 0.5
    seed: int = 0


POLICIES: dict[str, tuple[type, type]] = {
    "ambient": (AmbientConfig, AmbientConfig),  # Shah, Kalavasis, Klivans, Daras (2025)
    "filter": (MagnitudeFilterConfig, MagnitudeFilterConfig),  # Wen et al. (ICLR 2024)
    "captions": (CaptionRandomisationConfig, CaptionRandomisationConfig),  # Somepalli et al. (NeurIPS 2023)
    "dedup": (
        DeduplicationConfig,
        DeduplicationConfig,
    ),  # before training: each image once, near-duplicates out
}


@dataclass(frozen=True)
class FineTuneConfig:
    """Optimisation settings (train_text_to_image.py's defaults where it has them)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-5
    warmup_steps: int = 0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no", "fp16" or "bf16"
    ema_decay: float | None = None  # e.g. 0.9999; None: no EMA
    max_grad_norm: float = 1.0
    checkpoint_every: int = 500
    max_images: int | None = (
        None  # train on the first N distinct training images (the ambient paper's subsets)
    )
    seed: int = 0
    policies: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> settings
    lora_rank: int | None = None  # r of a LoRA adapter on the attention projections; None: full fine-tuning
    lora_alpha: float | None = None  # the adapter's alpha (its update is scaled by alpha / r); None: the rank
    lora_text_encoder: bool = False  # the text encoder trains an adapter of the same rank and alpha too

    def __post_init__(self) -> None:
        if (
            self.steps < 1
            or self.batch_size < 1
            or self.gradient_accumulation_steps < 1
            or self.checkpoint_every < 1
        ):
            raise DiffmemError(
                "steps, batch_size, gradient_accumulation_steps and checkpoint_every must be >= 1"
            )
        if self.lora_rank is not None and self.lora_rank < 1:
            raise DiffmemError(
                f"the LoRA rank must be >= 1 (or unset for full fine-tuning); got {self.lora_rank}"
            )
        if self.lora_alpha is not None and (self.lora_rank is None or self.lora_alpha <= 0):
            raise DiffmemError(
                f"the LoRA alpha must be > 0 and comes with a LoRA rank; got {self.lora_alpha}"
            )
        if self.lora_text_encoder and self.lora_rank is None:
            raise DiffmemError("a text-encoder LoRA comes with a LoRA rank: add --lora-rank")
        for name, settings in self.policies.items():
            method_config("policy", name, POLICIES, settings)  # unknown policies or settings fail here

    @staticmethod
    def parse_policies(texts: list[str]) -> dict[str, dict[str, Any]]:
        """``["filter:threshold=2", "ambient:sigma_n=0.5"]`` -> policy settings by name."""
        policies = {}
        for text in texts:
            name, settings = parse_method_spec(text)
            if name in policies:
                raise DiffmemError(f"policy {name!r} given twice")
            policies[name] = settings
        return policies

    @property
    def resolved_lora_alpha(self) -> float | None:
        """The LoRA alpha trained with: ``lora_alpha``, else the rank (a scale alpha / r of 1); None
        without LoRA."""
        return self.lora_rank if self.lora_alpha is None else self.lora_alpha


@dataclass(frozen=True)
class FineTuneStatus:
    """Where a (possibly interrupted) run stands."""

    directory: Path
    complete: bool
    step: int
    drop_rate: float | None  # the magnitude filter's mean drop rate over the run's steps so far
    data_report: RowReport | None = None  # the rows read and those skipped (None for a lab dataset)


def fine_tune(
    model_dir: Path,
    data_dir: Path | str,
    out_dir: Path,
    config: FineTuneConfig = FineTuneConfig(),
    time_budget_s: float | None = None,
    progress: bool = True,
    data_options: DataOptions | None = None,
) -> FineTuneStatus:
    """Fine-tune the pipeline in ``model_dir`` on the training set at ``data_dir`` (read and prepared as
    ``data_options`` say; by default centre crops at the model's resolution) with the configured policies;
    the result goes to ``out_dir/model`` (a LoRA run's adapter to ``out_dir/lora``), the report of the rows
    read to ``out_dir/data_report.json``.
    With a time budget, the run checkpoints and stops; calling again continues (on the same data only)."""
    out_dir = Path(out_dir)
    if (out_dir / RECORD).is_file():
        record = json.loads((out_dir / RECORD).read_text())
        return FineTuneStatus(out_dir, True, record["config"]["steps"], record.get("drop_rate"))
    started = time.monotonic()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=not torch.cuda.is_available(),  # launched processes without GPUs train together on gloo
    )
    data_options = data_options or DataOptions()
    pipeline = _open_pipeline(model_dir)
    _add_lora(pipeline, config)
    training = _training_set(pipeline, data_dir, data_options)
    if training.report is not None and accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        training.report.save(out_dir / DATA_REPORT)
    with accelerator.main_process_first():  # the main process fills the latent cache, the others read it
        data = _Data(pipeline, training, config, accelerator.device, progress and accelerator.is_main_process)
    policies = {name: method_config("policy", name, POLICIES, s) for name, s in config.policies.items()}
    ambient = policies.get("ambient")
    # without the ambient policy, sigma_n = 0: the ambient input and loss are the ordinary ones (SPEC §6)
    sigma_n = 0.0 if ambient is None else ambient.sigma_n
    t_n = None if ambient is None else data.ambient_timestep(sigma_n)  # or an error
    network = _network(pipeline).train()
    trained = [network] + ([pipeline.text_encoder.train()] if config.lora_text_encoder else [])
    # the whole UNet or MMDiT, or its LoRA adapter (and the text encoder's)
    trainable = [p for model in trained for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps))
    )
    *trained, optimizer, warmup = accelerator.prepare(*trained, optimizer, warmup)
    network = trained[0]
    if config.lora_text_encoder:
        data.text_encoder = trained[1]  # captions are encoded through the prepared (synchronised) model
    if config.lora_rank is not None:
        checkpoint_adapter_only(accelerator)
    ema = EMAModel(trainable, decay=config.ema_decay) if config.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    checkpoint = out_dir / "checkpoint"
    step, state = _resume(accelerator, checkpoint, config, data.fingerprint)
    earlier_s = state.get("wall_s", 0.0)  # this run's time in earlier calls
    draw = _Draws(data, sigma_n, config.seed, accelerator.process_index, policies.get("captions"))
    flt = None
    if "filter" in policies:
        settings = policies["filter"]
        if state.get("filter_threshold") is not None:  # a resumed run keeps the threshold it started with
            settings = replace(settings, threshold=state["filter_threshold"], quantile=None)
        elif settings.quantile is not None:
            settings = _calibrate_filter(accelerator, network, data, settings, config.steps, draw)
        flt = MagnitudeFilter(settings)
    drops = _DropLog(state) if flt is not None else None
    main = accelerator.is_main_process
    bar = tqdm(total=config.steps, initial=step, desc="fine-tuning", disable=not (progress and main))
    while step < config.steps:
        batch, t, level, x_t = draw(step)
        with accelerator.accumulate(*trained):
            prediction = data.predict(network, x_t, t, level, batch.condition)
            losses = data.losses(prediction, x_t, level, batch, sigma_n)  # [B]
            update = True
            if flt is None:
                loss = losses.mean()
            else:
                with torch.no_grad():
                    unconditional = data.predict(network, x_t, t, level, data.null_condition(len(t)))
                filtered = flt(losses, prediction, unconditional)
                loss = filtered.loss
                drops.add(filtered.kept)
                update = bool(accelerator.gather(filtered.kept.sum().reshape(1)).sum() > 0)  # all ranks agree
            accelerator.backward(loss)
            if update:
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                warmup.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None and accelerator.sync_gradients:
            ema.step(trainable)
        step += 1
        bar.update()
        out_of_time = time_budget_s is not None and _any_process(
            accelerator, time.monotonic() - started > time_budget_s
        )
        saving = step % config.checkpoint_every == 0 or out_of_time or step == config.steps
        if step % PROGRESS_EVERY == 0 or saving:  # reading the loss waits for the device
            window = None if drops is None else drops.flush(accelerator, step)
            shown = {"loss": f"{loss.item():.4f}"}
            bar.set_postfix(shown if window is None else shown | {"dropped": f"{window:.0%}"})
        if saving:
            wall_s = earlier_s + time.monotonic() - started
            run = {
                "data": data.fingerprint,
                "wall_s": wall_s,
                "filter_threshold": None if flt is None else flt.threshold,
                **_drop_state(drops),
            }
            _checkpoint(accelerator, checkpoint, config, step, run)
        if out_of_time:
            break
    bar.close()
    drop_rate = None if drops is None else drops.rate
    if step < config.steps:
        return FineTuneStatus(out_dir, False, step, drop_rate, training.report)
    unwrapped = [accelerator.unwrap_model(model).eval() for model in trained]
    if ema is not None:
        ema.copy_to(trainable)
    if not main:
        accelerator.wait_for_everyone()  # the main process saves the model and the record
        return FineTuneStatus(out_dir, True, step, drop_rate, training.report)
    _save_trained(pipeline, unwrapped, out_dir, config)
    record = {
        "command": " ".join(sys.argv),
        "model": str(model_dir),
        "data": str(data_dir),
        "data_source": training.description,
        "data_options": asdict(replace(data_options, resolution=training.resolution)),
        "data_fingerprint": data.fingerprint,  # the images, captions and preparation trained on
        "data_report": None if training.report is None else training.report.to_dict(),
        # which lab dataset: compared with training-set indexes
        "lab_config": None if training.lab is None else asdict(training.lab.config),
        "images": data.num_images,
        "prediction_type": data.prediction_type,
        "config": asdict(config),
        "lora": _lora_record(model_dir, config, unwrapped[0]),
        "processes": accelerator.num_processes,  # each drew config.batch_size rows a step
        "ambient_t_n": t_n,
        "filter_threshold": None if flt is None else flt.threshold,  # the given one, or the quantile's value
        "drop_rate": drop_rate,  # over the whole run
        "drop_log": None
        if drops is None
        else drops.log,  # [step, drop rate of the steps since the last entry]
        "wall_time_s": round(earlier_s + time.monotonic() - started, 1),
        "deduplication": None
        if data.deduplication is None
        else asdict(data.deduplication) | {"kept_images": None},
        **environment(),
    }
    write_json_atomic(out_dir / RECORD, record)
    shutil.rmtree(checkpoint, ignore_errors=True)
    accelerator.wait_for_everyone()
    return FineTuneStatus(out_dir, True, step, drop_rate, training.report)


def training_magnitudes(
    model_dir: Path,
    data_dir: Path | str,
    batches: int = 16,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
) -> pa.Table:
    """The magnitude filter's ``||eps_c - eps_u||`` (``||v_c - v_u||`` for SD3) for a model on training
    batches drawn as fine-tuning draws them: one row per sample with its lab group (None for other data),
    t and magnitude (to choose a threshold)."""
    pipeline = _open_pipeline(model_dir)
    # as a filter run: an unconditional model is refused, since it has no eps_c - eps_u to measure
    config = FineTuneConfig(batch_size=batch_size, seed=seed, policies={"filter": {}})
    training = _training_set(pipeline, data_dir, DataOptions())
    data = _Data(pipeline, training, config, torch.device(device), progress=False)
    draw = _Draws(data, 0.0, seed, 0, None)
    network, rows = _network(pipeline).eval(), []
    for step in range(batches):
        batch, t, level, x_t = draw(step)
        magnitudes = _magnitudes(network, data, batch, t, level, x_t)
        for row, timestep, magnitude in zip(
            batch.rows.tolist(), t.tolist(), magnitudes.tolist(), strict=True
        ):
            group = None if data.groups is None else data.groups[row]
            rows.append({"group": group, "t": timestep, "magnitude": magnitude})
    return pa.Table.from_pylist(rows)


@dataclass(frozen=True)
class _Batch:
    latents: (
        torch.Tensor
    )  # [B, C, h, w] clean data: VAE posterior means x scaling factor, or pixels in [-1, 1]
    noisy: torch.Tensor  # [B, C, h, w] their fixed noisy copies (ambient), else the clean data
    condition: dict[str, torch.Tensor]  # the UNet's keyword arguments: text states, class labels or none
    rows: torch.Tensor  # [B] the training rows drawn


class _Data:
    """The training rows as clean data and conditions: latents (cached on disk, or encoded at each draw
    under random crops) and captions for a text-to-image pipeline; for a ``UNet2DModel`` pipeline, a lab
    dataset's pixels and, for a class-conditional one, each scene's first item's category."""

    def __init__(
        self, pipeline, data: TrainingSet, config: FineTuneConfig, device: torch.device, progress: bool
    ):
        if config.max_images:
            data = data.first_images(config.max_images)
        if not data.num_rows:
            raise DiffmemError("the dataset has no training rows to fine-tune on")
        self.kind = _kind(pipeline)
        self.flow = _is_flow(pipeline)
        self.prediction_type = (
            FLOW_PREDICTION if self.flow else pipeline.scheduler.config.get("prediction_type", "epsilon")
        )
        if not self.flow and self.prediction_type not in NATIVE_WEIGHTS:
            raise DiffmemError(
                f"the model predicts {self.prediction_type!r}; fine-tuning supports {', '.join(NATIVE_WEIGHTS)}"
            )
        if "captions" in config.policies and (self.kind != "text" or not all(data.captions)):
            raise DiffmemError("caption randomisation needs a text-to-image model and a caption on every row")
        if "filter" in config.policies and self.kind == "none":
            raise DiffmemError(
                "the magnitude filter compares conditional and unconditional predictions; this model is unconditional"
            )
        ambient = config.policies.get("ambient")
        self.ambient = None if ambient is None else method_config("policy", "ambient", POLICIES, ambient)
        if self.ambient is not None and not data.center_crop:
            raise DiffmemError(
                "ambient training learns from a fixed noisy copy of each image, and a random crop makes "
                "another image at every draw: use --center-crop with the ambient policy"
            )
        rows = list(range(data.num_rows))
        self.deduplication = None
        if "dedup" in config.policies:
            settings = method_config("policy", "dedup", POLICIES, config.policies["dedup"])
            self.deduplication = deduplicate(data.images(), data.row_image, settings)
            survivors, first = set(self.deduplication.kept_images), {}
            for row in rows:  # each surviving image's first row
                if data.row_image[row] in survivors:
                    first.setdefault(data.row_image[row], row)
            rows = list(first.values())
        self.data = data
        self.num_images = data.num_images
        self.batch_size = config.batch_size
        self.captions = [data.captions[r] for r in rows]
        self.groups = None if data.groups is None else [data.groups[r] for r in rows]
        self.row_image = torch.tensor([data.row_image[r] for r in rows])
        self.pipeline = pipeline.to(device)
        self.text_encoder = pipeline.text_encoder if self.kind == "text" else None
        self.device = device
        image_digest = data.image_digest()
        self.fingerprint = data.fingerprint(image_digest)  # a resumed run checks it trains on the same data
        self.latents = self.flipped = None  # [N, C, h, w] memory-mapped, or on the device for pixels
        if self.kind == "text":
            self.pipeline.vae.eval().requires_grad_(False)
            if not config.lora_text_encoder:  # else only its adapter trains (add_lora froze the rest)
                self.pipeline.text_encoder.eval().requires_grad_(False)
            for name in ("text_encoder_2", "text_encoder_3"):  # SDXL's second, SD3's second and T5
                if getattr(pipeline, name, None) is not None:
                    getattr(pipeline, name).eval().requires_grad_(False)
            if data.center_crop:  # else encoded at each draw
                self.latents = cached_latents(pipeline.vae, data, image_digest, progress=progress)
                if data.random_flip:
                    self.flipped = cached_latents(pipeline.vae, data, image_digest, True, progress)
        else:
            self.latents = self._pixels(data.images())
        self.vocabulary = (
            sorted({w for c in self.captions for w in c.split()}) if "captions" in config.policies else []
        )
        if self.kind == "class":
            categories = {r["scene_id"]: r["items"][0]["category"] for r in data.lab.scenes.to_pylist()}
            scenes = [data.image_ids[int(i)] for i in self.row_image]
            self.row_class = torch.tensor([categories[s] for s in scenes], device=device)
            self.null_class = pipeline.unet.config.num_class_embeds - 1  # diffmem's unconditional class
            if int(self.row_class.max()) >= self.null_class:
                raise DiffmemError(
                    f"the UNet has {self.null_class} classes besides the null class; the lab needs 10"
                )

    def batch(
        self,
        generator: torch.Generator,
        step: int,
        captions: CaptionRandomisationConfig | None,
        augment: np.random.Generator,
    ) -> _Batch:
        """``batch_size`` training rows drawn with ``generator`` (duplicates as often as they occur); random
        crops and flips drawn with ``augment``."""
        rows = torch.randint(len(self.captions), (self.batch_size,), generator=generator)
        images = self.row_image[rows]
        if self.kind == "text":
            texts = [self.captions[int(r)] for r in rows]
            if captions is not None:
                texts = randomise_captions(texts, rows.tolist(), step, self.vocabulary, captions)
            condition = self._condition(texts)
        elif self.kind == "class":
            condition = {"class_labels": self.row_class[rows.to(self.device)]}
        else:
            condition = {}
        clean = self._clean(images, augment)
        noisy = clean
        if self.ambient is not None:  # each image's fixed noisy copy (the same for its flipped latent)
            noisy = noisy_copies(clean, images.tolist(), self.ambient.sigma_n, self.ambient.seed)
        return _Batch(clean, noisy, condition, rows)

    def null_condition(self, count: int) -> dict[str, Any]:
        """The unconditional keyword arguments: the empty prompt, or the null class."""
        if self.kind == "text":
            return self._condition([""] * count)
        return {"class_labels": torch.full((count,), self.null_class, device=self.device)}

    def ambient_timestep(self, sigma_n: float) -> float:
        """The training timestep from which the ambient policy learns from noisy copies: the DDPM timestep
        t_n, or the rectified flow's s_n on its 0..1000 timestep scale."""
        if self.flow:
            return flow_sigma_n(sigma_n) * self.pipeline.scheduler.config.num_train_timesteps
        alphas_cumprod = DDPMScheduler.from_config(self.pipeline.scheduler.config).alphas_cumprod
        return timestep_of_sigma(alphas_cumprod, sigma_n)

    def predict(
        self,
        network: torch.nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        level: torch.Tensor,
        condition: dict[str, Any],
    ) -> torch.Tensor:
        """The network's prediction at ``x_t`` in the terms its loss and the filter use: the noise
        prediction of a UNet (``level``: alpha_bar_t), the velocity of SD3's MMDiT (``level``: s)."""
        if self.flow:
            return network(hidden_states=x_t, timestep=t, **condition, return_dict=False)[0].float()
        return self.eps(network(x_t, t, **condition).sample, x_t, level)

    def losses(
        self, prediction: torch.Tensor, x_t: torch.Tensor, level: torch.Tensor, batch: _Batch, sigma_n: float
    ) -> torch.Tensor:
        """[B] the per-sample ambient loss, the plain loss where sigma_n = 0 (SPEC §6)."""
        if self.flow:
            return ambient_loss_flow(prediction, x_t, batch.latents, batch.noisy, level, sigma_n)
        return ambient_loss_vp(
            prediction, x_t, level, batch.latents, batch.noisy, sigma_n, self.prediction_type
        )

    def eps(self, output: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The noise prediction of the UNet's native output (a learned-variance UNet's extra channels are
        not trained here)."""
        native = output[:, : x_t.shape[1]].float()
        return eps_from_model_output(native, x_t.float(), alpha_bar.view(-1, 1, 1, 1), self.prediction_type)

    def _clean(self, images: torch.Tensor, augment: np.random.Generator) -> torch.Tensor:
        """[B, C, h, w] the clean data of the drawn images: cached latents (each flipped with probability
        1/2 when flipping), latents of freshly drawn random crops, or pixels."""
        if self.latents is None:
            return encode_latents(self.pipeline.vae, self.data.drawn_pixels(images.tolist(), augment))
        if isinstance(self.latents, torch.Tensor):
            return self.latents[images]
        chosen = torch.from_numpy(self.latents[images.numpy()])
        if self.flipped is not None:
            flip = torch.from_numpy(augment.random(len(images)) < 0.5).view(-1, 1, 1, 1)
            chosen = torch.where(flip, torch.from_numpy(self.flipped[images.numpy()]), chosen)
        # channels-last, the layout of the VAE's output: the UNet's convolutions round by layout
        return chosen.to(self.device).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        """A pixel-space UNet's clean data: images [N, 3, H, W] in [0, 1] at its size, in [-1, 1]."""
        size = self.pipeline.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        pixels = (
            F.interpolate(images, size=size, mode="bilinear", antialias=True)
            if images.shape[-2:] != size
            else images
        )
        return (pixels * 2 - 1).to(self.device)

    def _condition(self, texts: list[str]) -> dict[str, Any]:
        """The network's conditioning keyword arguments for ``texts``: the text encoder's last hidden states
        (with gradients when it trains); for SDXL, both encoders' penultimate states, the pooled embedding
        and the size and crop micro-conditioning; for SD3, the prompt as its pipeline encodes it (both CLIP
        encoders and T5, or zeros in T5's place) and the pooled embedding."""
        if self.flow:
            with torch.no_grad():
                states, _, pooled, _ = self.pipeline.encode_prompt(
                    texts, None, None, device=self.device, do_classifier_free_guidance=False
                )
            return {"encoder_hidden_states": states, "pooled_projections": pooled}
        if _is_sdxl(self.pipeline):
            with torch.no_grad():
                states, _, pooled, _ = self.pipeline.encode_prompt(
                    texts, device=self.device, do_classifier_free_guidance=False
                )
            return {
                "encoder_hidden_states": states,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": self._sdxl_time_ids(len(texts))},
            }
        tokenizer = self.pipeline.tokenizer
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_encoder.training):
            return {"encoder_hidden_states": self.text_encoder(torch.tensor(ids, device=self.device))[0]}

    def _sdxl_time_ids(self, count: int) -> torch.Tensor:
        """[count, 6] SDXL's micro-conditioning (Podell et al. 2023, §2.2): original size, crop's top-left
        corner and target size, as the pipeline sets them when it generates at the training resolution
        (the image as the crop, uncropped)."""
        side = self.data.resolution
        return torch.tensor([[side, side, 0, 0, side, side]], device=self.device).float().repeat(count, 1)


def _training_set(pipeline, data: Path | str, options: DataOptions) -> TrainingSet:
    """The training set a pipeline trains on, read as ``options`` say: any layout for a text-to-image
    pipeline (at the model's resolution by default), a lab dataset as stored for a ``UNet2DModel`` one."""
    kind = _kind(pipeline)
    if kind == "text":
        training = read_training_set(data, options, _model_resolution(pipeline))
        _check_patches(pipeline, training.resolution)
        return training
    model = "a class-conditional" if kind == "class" else "an unconditional"
    if not (Path(data).is_dir() and is_lab_dataset(Path(data))):
        raise DiffmemError(
            f"{model} UNet2DModel pipeline fine-tunes on a lab dataset only (diffmem lab build; its scenes "
            f"give the class labels); {data} is not one: any other training set needs a text-to-image model"
        )
    training = read_training_set(data, options, 0)
    if not training.as_stored:
        raise DiffmemError(
            f"{model} UNet2DModel pipeline trains on the lab's images as stored, resized to its sample "
            "size: drop --resolution, --random-crop and --random-flip"
        )
    return training


def _check_patches(pipeline, resolution: int) -> None:
    """Refuse a training resolution whose latents have more patches a side than an MMDiT's position
    embedding covers (SD3's ``pos_embed_max_size``)."""
    most = _network(pipeline).config.get("pos_embed_max_size") if _is_flow(pipeline) else None
    if most is None:
        return
    factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1) * _network(pipeline).config.patch_size
    if resolution // factor > most:
        raise DiffmemError(
            f"at {resolution} px the latents have {resolution // factor} patches a side and this MMDiT's "
            f"position embedding covers {most}: pass --resolution {most * factor} or less"
        )


def _model_resolution(pipeline) -> int:
    """A text-to-image pipeline's training resolution: the network's sample size times the VAE's factor."""
    size = _network(pipeline).config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    if height != width:
        raise DiffmemError(
            f"the network's sample size is {height}x{width}; training crops squares: pass --resolution"
        )
    return height * 2 ** (len(pipeline.vae.config.block_out_channels) - 1)


def _open_pipeline(model_dir: Path):
    """A Stable-Diffusion-architecture pipeline (SD 1.x/2.x, SDXL, SD3), or a ``UNet2DModel`` one (DDPM/DDIM),
    from its directory."""
    if not (Path(model_dir) / "model_index.json").is_file():
        raise DiffmemError(f"{model_dir} is not a diffusers pipeline directory (no model_index.json)")
    pipeline = DiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32)
    if not (hasattr(pipeline, "unet") or _is_flow(pipeline)) or not hasattr(pipeline, "scheduler"):
        raise DiffmemError(
            f"{model_dir} holds a {type(pipeline).__name__}; fine-tuning trains a UNet or Stable Diffusion 3's "
            "MMDiT, not this pipeline's transformer"
        )
    return pipeline


def _network(pipeline) -> torch.nn.Module:
    """The denoising network fine-tuning trains: SD3's MMDiT, else the UNet."""
    return pipeline.transformer if _is_flow(pipeline) else pipeline.unet


def _is_flow(pipeline) -> bool:
    """Whether ``pipeline`` is Stable Diffusion 3: an MMDiT on the rectified flow."""
    return isinstance(pipeline, StableDiffusion3Pipeline)


def _is_sdxl(pipeline) -> bool:
    """Whether ``pipeline`` is SDXL-style: two text encoders, and a UNet conditioned on the pooled text
    embedding and the image's size and crop."""
    return getattr(pipeline, "text_encoder_2", None) is not None


def _add_lora(pipeline, config: FineTuneConfig) -> None:
    """For a LoRA run, freeze the pipeline's UNet and add the adapter to train; only a text-to-image
    pipeline takes one, since only its pipelines load LoRA adapters (``load_lora_weights``)."""
    if config.lora_rank is None:
        return
    kind = _kind(pipeline)
    if kind != "text":
        model = "a class-conditional" if kind == "class" else "an unconditional"
        raise DiffmemError(
            "LoRA fine-tuning needs a text-to-image pipeline (diffusers loads LoRA adapters into those only, "
            f"with load_lora_weights); this is {model} UNet2DModel pipeline: drop --lora-rank to train it fully"
        )
    if config.lora_text_encoder and (_is_sdxl(pipeline) or _is_flow(pipeline)):
        family = "SD3" if _is_flow(pipeline) else "SDXL"
        raise DiffmemError(
            f"a text-encoder LoRA trains SD 1.x/2.x-style pipelines' one text encoder; for {family} drop "
            "--lora-text-encoder (the denoising network's adapter trains)"
        )
    text_encoder = pipeline.text_encoder if config.lora_text_encoder else None
    add_lora(_network(pipeline), config.lora_rank, config.resolved_lora_alpha, config.seed, text_encoder)


def trained_directory(out_dir: Path, config: FineTuneConfig) -> Path:
    """Where a run's result goes: ``out_dir/model`` (the pipeline), or ``out_dir/lora`` (the adapter)."""
    return Path(out_dir) / (MODEL_DIR if config.lora_rank is None else LORA_DIR)


def _save_trained(pipeline, trained: list[torch.nn.Module], out_dir: Path, config: FineTuneConfig) -> None:
    """Save the result: the pipeline with its trained UNet or MMDiT, or a LoRA run's adapters alone
    (``trained``: the network, then the text encoder when it trained an adapter)."""
    if config.lora_rank is not None:
        save_lora(trained[0], trained_directory(out_dir, config), *trained[1:])
        return
    setattr(pipeline, "transformer" if _is_flow(pipeline) else "unet", trained[0])
    pipeline.save_pretrained(trained_directory(out_dir, config), safe_serialization=True)


def _lora_record(model_dir: Path, config: FineTuneConfig, network: torch.nn.Module) -> dict | None:
    """A LoRA run's adapter: its file, shape, and the base model it applies to (path and hash)."""
    if config.lora_rank is None:
        return None
    return {
        "weights": f"{LORA_DIR}/{WEIGHT_NAME}",
        "rank": config.lora_rank,
        "alpha": config.resolved_lora_alpha,
        "target_modules": list(target_modules(network)),
        "text_encoder_target_modules": list(TEXT_ENCODER_TARGET_MODULES)
        if config.lora_text_encoder
        else None,
        "base_model": str(model_dir),
        "base_model_sha256": model_hash(Path(model_dir)),
    }


def _kind(pipeline) -> str:
    """ "text" (a text-to-image pipeline), "class" (a class-conditional UNet) or "none"."""
    if getattr(pipeline, "text_encoder", None) is not None:
        return "text"
    return "class" if pipeline.unet.config.get("num_class_embeds") else "none"


class _DropLog:
    """The magnitude filter's dropped and examined samples: summed over processes and over the calls of a
    resumed run, and logged per window of steps (Wen et al. log the drop rate)."""

    def __init__(self, state: dict) -> None:
        self.dropped = state.get("dropped", 0.0)
        self.seen = state.get("seen", 0.0)
        self.log: list[list[float]] = state.get("drop_log", [])
        self.window: torch.Tensor | None = None  # [dropped, seen] on the device since the last flush

    def add(self, kept: torch.Tensor) -> None:
        counts = torch.stack([(~kept).sum().float(), torch.tensor(float(len(kept)), device=kept.device)])
        self.window = counts if self.window is None else self.window + counts

    def flush(self, accelerator: Accelerator, step: int) -> float | None:
        """Close the window (every process calls this at the same step); its drop rate, None if empty."""
        if self.window is None:
            return None
        dropped, seen = accelerator.reduce(self.window, "sum").tolist()
        self.window = None
        self.dropped, self.seen = self.dropped + dropped, self.seen + seen
        self.log.append([step, dropped / seen])
        return dropped / seen

    @property
    def rate(self) -> float | None:
        return self.dropped / self.seen if self.seen else None


class _Draws:
    """Each step's batch, sampled t, alpha_bar_t and noised input x_t, seeded by (seed, step, process): the
    same on resume, other rows on each process. Random crops and flips come from a stream of their own,
    so that turning them on leaves the rows, t and noise drawn as they were."""

    def __init__(self, data: _Data, sigma_n: float, seed: int, process: int, captions):
        self.data = data
        self.sigma_n = sigma_n
        self.seed = seed
        self.process = process
        self.captions = captions
        config = data.pipeline.scheduler.config
        if data.flow:  # an untouched table of the training sigmas
            self.flow_schedule = FlowMatchEulerDiscreteScheduler.from_config(config)
        else:
            schedule = DDPMScheduler.from_config(config)
            self.timesteps = schedule.config.num_train_timesteps
            self.alphas_cumprod = schedule.alphas_cumprod.to(data.device)

    def __call__(self, step: int) -> tuple[_Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch, its timesteps t, their noise levels (alpha_bar_t, or the flow's s) and x_t."""
        generator = torch.Generator().manual_seed(_batch_seed(self.seed, step, self.process))
        augment = np.random.default_rng([AUGMENT_STREAM, self.seed, step, self.process])
        batch = self.data.batch(generator, step, self.captions, augment)
        device = self.data.device
        if self.data.flow:  # SD3's logit-normal timesteps on the rectified flow (diffmem.lab.rectified_flow)
            t, s = flow_timesteps(self.flow_schedule, self.data.batch_size, generator)
            z = torch.randn(batch.latents.shape, generator=generator).to(device)
            t, s = t.to(device), s.to(device)
            return batch, t, s, ambient_flow_input(batch.latents, batch.noisy, s, self.sigma_n, z)
        t = torch.randint(self.timesteps, (self.data.batch_size,), generator=generator)
        z = torch.randn(batch.latents.shape, generator=generator).to(device)
        t = t.to(device)
        alpha_bar = self.alphas_cumprod[t]
        return batch, t, alpha_bar, ambient_vp_input(batch.latents, batch.noisy, alpha_bar, self.sigma_n, z)


def _magnitudes(
    network: torch.nn.Module,
    data: _Data,
    batch: _Batch,
    t: torch.Tensor,
    level: torch.Tensor,
    x_t: torch.Tensor,
) -> torch.Tensor:
    """[B] ``||eps_c - eps_u||`` (``||v_c - v_u||`` for SD3) of a batch at its sampled t (no gradients)."""
    with torch.no_grad():
        conditional = data.predict(network, x_t, t, level, batch.condition)
        unconditional = data.predict(network, x_t, t, level, data.null_condition(len(t)))
    return prediction_magnitude(conditional, unconditional)


def _calibrate_filter(
    accelerator: Accelerator,
    network: torch.nn.Module,
    data: _Data,
    settings: MagnitudeFilterConfig,
    steps: int,
    draw: _Draws,
) -> MagnitudeFilterConfig:
    """The filter with its threshold at ``settings.quantile`` of the starting model's magnitudes, over
    the batches that steps ``steps``, ``steps + 1``, ... would draw (never trained on); every process
    measures its own and all agree on the gathered quantile."""
    magnitudes = []
    for index in range(settings.calibration_batches):
        batch, t, level, x_t = draw(steps + index)
        magnitudes.append(_magnitudes(network, data, batch, t, level, x_t))
    return settings.calibrated(accelerator.gather(torch.cat(magnitudes)).cpu())


def _drop_state(drops: _DropLog | None) -> dict:
    return {} if drops is None else {"dropped": drops.dropped, "seen": drops.seen, "drop_log": drops.log}


def _resume(
    accelerator: Accelerator, checkpoint: Path, config: FineTuneConfig, data_fingerprint: str
) -> tuple[int, dict]:
    """The step to continue from (0 for a new run) and what the run recorded so far (time, filter
    counts); refuses a checkpoint made with other settings or on other data (images, captions, their
    preparation)."""
    state = checkpoint / "run.json"
    if not state.is_file():
        return 0, {}
    recorded = json.loads(state.read_text())
    there, here = _settings(recorded["config"]), _settings(asdict(config))
    if _training_kind(there) != _training_kind(here):
        raise DiffmemError(
            f"{checkpoint.parent} holds a run of {_training_kind(there)}, not {_training_kind(here)}; resume "
            "with the same --lora-rank and --lora-alpha or use a new directory"
        )
    if there != here:
        differ = sorted(k for k in here if there[k] != here[k])
        raise DiffmemError(
            f"{checkpoint.parent} holds a run with other settings ({', '.join(differ)}); resume with the same "
            "policies and configuration or use a new directory"
        )
    if recorded.get("run", {}).get("data", data_fingerprint) != data_fingerprint:
        raise DiffmemError(
            f"{checkpoint.parent} holds a run on other data (its images, captions or their preparation "
            "changed since it started); resume on the same data and options or use a new directory"
        )
    accelerator.load_state(str(checkpoint / "state"))
    return int(recorded["step"]), recorded.get("run", {})


def _settings(config: dict) -> dict:
    """A config as JSON values for comparison: settings a checkpoint predates at their defaults, an unset
    LoRA alpha at its rank."""
    settings = json.loads(json.dumps(asdict(FineTuneConfig()) | config))
    if settings["lora_alpha"] is None:
        settings["lora_alpha"] = settings["lora_rank"]
    return settings


def _training_kind(settings: dict) -> str:
    """What a run trains, in words: "full fine-tuning" or "a LoRA of rank r and alpha a"."""
    if settings["lora_rank"] is None:
        return "full fine-tuning"
    return f"a LoRA of rank {settings['lora_rank']} and alpha {settings['lora_alpha']:g}"


def _checkpoint(
    accelerator: Accelerator, checkpoint: Path, config: FineTuneConfig, step: int, run: dict
) -> None:
    """Replace the checkpoint: accelerate's state (model, optimizer, scheduler, EMA, each process's random
    state), the step and ``run`` (time and counts so far). Every process saves its part; the main process
    swaps the directories."""
    partial = checkpoint.with_name(checkpoint.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial / "state"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "config": asdict(config), "run": run}
        (partial / "run.json").write_text(json.dumps(state, default=str))
        shutil.rmtree(checkpoint, ignore_errors=True)
        partial.rename(checkpoint)
    accelerator.wait_for_everyone()


def _batch_seed(seed: int, step: int, process: int) -> int:
    """The seed of one process's batch at one step: the same batch on resume, other rows on each process.
    32 bits, all that a CPU generator uses."""
    return int(np.random.SeedSequence([seed, step, process]).generate_state(1)[0])


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` holds on any process, so that all of them stop at the same step (one process
    needs no device round trip)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum") > 0)
