"""Train a lab model from scratch: first the VAE on the training scenes, then the UNet and the text
encoder together on latents with the eps-prediction loss (Ho et al. 2020, eq. 14) or SD 2.x's
velocity loss, and caption dropout for classifier-free guidance; in the stable-diffusion-3 family, an
MMDiT and two CLIP encoders with SD3's rectified-flow loss (:mod:`diffmem.lab.rectified_flow`).
Resumable: each stage checkpoints, and a time budget stops the run cleanly so a later call continues it.
A run may start from a trained lab model: its VAE alone, or its VAE, denoiser and text encoders (to train
a finished model further)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
)
from tqdm.auto import tqdm

from diffmem.errors import DiffmemError
from diffmem.io.run_record import environment
from diffmem.lab.dataset import LabDataset, load_lab_dataset
from diffmem.lab.model import SD, SD3, LabModelConfig, build_lab_pipeline, build_vae
from diffmem.lab.rectified_flow import flow_timesteps, rectified_flow
from diffmem.sampling.schedulers import STABLE_DIFFUSION_SCHEDULE

RECORD = "lab_training.json"
# the pipeline components the denoiser stage trains, per family (their checkpoint and folder names)
TRAINED = {SD: ("unet", "text_encoder"), SD3: ("transformer", "text_encoder", "text_encoder_2")}


@dataclass(frozen=True)
class LabTrainConfig:
    """Optimisation settings (defaults: the shipped lab model, sized for one GPU)."""

    vae_steps: int = 4000
    vae_batch_size: int = 64
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 30000
    batch_size: int = 128
    lr: float = 3e-4
    warmup_steps: int = 500
    caption_dropout: float = 0.1
    checkpoint_every: int = 2000
    seed: int = 0

    @classmethod
    def micro(cls) -> LabTrainConfig:
        """A recipe for the micro-lab that finishes in minutes on 2 CPU cores."""
        return cls(
            vae_steps=150,
            vae_batch_size=32,
            unet_steps=500,
            batch_size=32,
            warmup_steps=50,
            checkpoint_every=200,
        )

    @classmethod
    def small(cls) -> LabTrainConfig:
        """The recipe of the shipped CPU lab model (micro-lab data, ``LabModelConfig.small()``)."""
        return replace(cls.micro(), vae_steps=400, unet_steps=4000, lr=4e-4)


@dataclass(frozen=True)
class TrainingStatus:
    """Where a (possibly interrupted) training run stands."""

    directory: Path
    complete: bool
    vae_step: int
    unet_step: int


def train_lab_model(
    dataset_dir: Path,
    out_dir: Path,
    model_config: LabModelConfig | None = None,
    train_config: LabTrainConfig | None = None,
    device: str | torch.device = "cpu",
    time_budget_s: float | None = None,
    progress: bool = True,
    vae_from: Path | None = None,
    init_from: Path | None = None,
) -> TrainingStatus:
    """Train (or continue training) a lab model on a lab dataset; save the pipeline to ``out_dir`` when done.

    With ``time_budget_s`` the run checkpoints and returns ``complete=False`` once the budget is spent
    (after at least one step); calling again with the same arguments continues where it stopped.
    ``vae_from`` (a trained lab model directory) takes that model's VAE and skips the VAE stage;
    ``init_from`` also starts the UNet and text encoder from that model's weights, in its architecture
    (``model_config`` must be None or equal to it), and trains them ``unet_steps`` more steps.
    """
    if init_from is not None:
        if vae_from is not None and Path(vae_from) != Path(init_from):
            raise DiffmemError("give init_from or vae_from, not both: init_from takes that model's VAE too")
        vae_from = init_from
        trained = trained_model_config(init_from)
        if model_config is not None and model_config != trained:
            raise DiffmemError(
                f"{init_from} has another architecture than the one asked for; drop the size options"
            )
        model_config = trained
    model_config = model_config or LabModelConfig()
    train_config = train_config or LabTrainConfig()
    if vae_from is not None:
        train_config = replace(train_config, vae_steps=0)
    dataset = load_lab_dataset(dataset_dir)
    if dataset.config.image_size != model_config.image_size:
        raise DiffmemError(
            f"the dataset has {dataset.config.image_size} px images but the model config expects "
            f"{model_config.image_size} px; build the dataset with the matching config"
        )
    out_dir = Path(out_dir)
    if (out_dir / RECORD).is_file():
        done = json.loads((out_dir / RECORD).read_text())["train_config"]
        return TrainingStatus(out_dir, True, done["vae_steps"], done["unet_steps"])
    device = torch.device(device)
    vae = None if vae_from is None else _trained_vae(Path(vae_from), model_config)
    run = _Run(
        out_dir, model_config, train_config, time_budget_s, {"vae_from": vae_from, "init_from": init_from}
    )
    vae, vae_step = _train_vae(dataset, run, device, progress) if vae is None else (vae, 0)
    if vae_step < train_config.vae_steps:
        return TrainingStatus(out_dir, False, vae_step, 0)
    pipeline, unet_step = _train_denoiser(dataset, vae, run, device, progress)
    if unet_step < train_config.unet_steps:
        return TrainingStatus(out_dir, False, vae_step, unet_step)
    _save_pipeline(pipeline, dataset, run)
    return TrainingStatus(out_dir, True, vae_step, unet_step)


class _Run:
    """Checkpoint folder, configuration check and time budget of one training run."""

    def __init__(
        self,
        out_dir: Path,
        model: LabModelConfig,
        train: LabTrainConfig,
        budget: float | None,
        sources: dict[str, Path | None],
    ):
        self.out_dir = out_dir
        self.checkpoints = out_dir / "checkpoints"
        self.model = model
        self.train = train
        self.started = time.monotonic()
        self.budget = budget
        self.sources = {name: None if path is None else str(path) for name, path in sources.items()}
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        clock = self.checkpoints / "elapsed.json"
        self.previous_elapsed = json.loads(clock.read_text())["elapsed_s"] if clock.is_file() else 0.0
        settings = {"model": model.to_dict(), "train": asdict(train), **self.sources}
        recorded = self.checkpoints / "settings.json"
        if recorded.is_file() and _recorded_settings(recorded) != json.loads(json.dumps(settings)):
            raise DiffmemError(
                f"{out_dir} holds a run with other settings; resume with the same configuration or use a new directory"
            )
        recorded.write_text(json.dumps(settings, indent=2))

    def out_of_time(self) -> bool:
        return self.budget is not None and time.monotonic() - self.started > self.budget

    def elapsed(self) -> float:
        """Wall time of the whole run, over every call that continued it."""
        return self.previous_elapsed + time.monotonic() - self.started

    def after_step(
        self,
        name: str,
        step: int,
        total: int,
        loss: torch.Tensor,
        bar: tqdm,
        modules: dict,
        generator: torch.Generator,
    ) -> bool:
        """Report the step, checkpoint stage ``name`` when due; True when this call must stop (budget spent)."""
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        stop = self.out_of_time()
        if stop or step % self.train.checkpoint_every == 0 or step == total:
            state = {key: module.state_dict() for key, module in modules.items()}
            self.save(name, {**state, "step": step, "generator": generator.get_state()})
        return stop

    def save(self, name: str, state: dict) -> None:
        """Atomically replace checkpoint ``name``."""
        path = self.checkpoints / f"{name}.pt"
        torch.save(state, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        (self.checkpoints / "elapsed.json").write_text(json.dumps({"elapsed_s": self.elapsed()}))

    def load(self, name: str) -> dict | None:
        path = self.checkpoints / f"{name}.pt"
        return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def _recorded_settings(path: Path) -> dict:
    """A checkpointed run's settings, the fields its architecture predates at their defaults."""
    settings = json.loads(path.read_text())
    settings["model"] = _recorded_model_config(settings["model"]).to_dict()
    return json.loads(json.dumps(settings))


def _train_vae(
    dataset: LabDataset, run: _Run, device: torch.device, progress: bool
) -> tuple[AutoencoderKL, int]:
    """Stage 1: the VAE, on every training scene once; returns it and the steps done."""
    config = run.train
    vae = build_vae(run.model, config.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    generator = torch.Generator().manual_seed(config.seed)
    modules = {"vae": vae, "optimizer": optimizer}
    step = _restore(run.load("vae"), modules, generator)
    vae.to(device)
    _, images = dataset.unique_train_images()
    images = images.to(device) * 2 - 1
    bar = tqdm(total=config.vae_steps, initial=step, desc="vae", disable=not progress)
    vae.train()
    while step < config.vae_steps:
        batch = images[torch.randint(len(images), (config.vae_batch_size,), generator=generator).to(device)]
        with _autocast(device):
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
            loss = F.mse_loss(reconstruction.float(), batch) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if run.after_step("vae", step, config.vae_steps, loss, bar, modules, generator):
            break
    bar.close()
    vae.eval()
    if step >= config.vae_steps:
        vae.register_to_config(scaling_factor=_scaling_factor(vae, images))
    return vae, step


@torch.no_grad()
def _scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the latents, so diffusion sees unit-variance data (SD's 0.18215, measured here)."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])
    return float(1 / means.float().std())


def _train_denoiser(
    dataset: LabDataset, vae: AutoencoderKL, run: _Run, device: torch.device, progress: bool
) -> tuple[DiffusionPipeline, int]:
    """Stage 2: the denoiser and text encoders on latents of the training rows (duplicates drawn as often as
    they occur), with the family's objective (:class:`_NoisePrediction` or :class:`_FlowVelocity`)."""
    config = run.train
    pipeline = build_lab_pipeline(run.model, vae=vae, seed=config.seed)
    trained = {name: getattr(pipeline, name) for name in TRAINED[run.model.family]}
    parameters = [p for module in trained.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-2)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / config.warmup_steps))
    generator = torch.Generator().manual_seed(config.seed + 1)
    modules = {**trained, "optimizer": optimizer, "lr": warmup}
    checkpoint = run.load("denoiser")
    if checkpoint is None and run.sources["init_from"] is not None:  # a resumed run has its own weights
        _load_denoiser_weights(Path(run.sources["init_from"]), trained)
    step = _restore(checkpoint, modules, generator)
    pipeline.to(device)
    latent_mean, latent_std, row_scene = _latent_table(dataset, vae, device)
    captions = dataset.train.column("caption").to_pylist()
    if run.model.family == SD3:
        # SD3 normalises latents as (z - shift_factor) * scaling_factor: centred on the lab latents' mean
        vae.register_to_config(shift_factor=float(latent_mean.mean()))
        objective = _FlowVelocity(pipeline, captions)
    else:
        objective = _NoisePrediction(pipeline, captions, run.model.prediction_type, device)
    shift, scaling = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    bar = tqdm(total=config.unet_steps, initial=step, desc=next(iter(trained)), disable=not progress)
    for module in trained.values():
        module.train()
    while step < config.unet_steps:
        rows = torch.randint(len(row_scene), (config.batch_size,), generator=generator)
        scenes = row_scene[rows]
        z0 = latent_mean[scenes] + latent_std[scenes] * _randn(latent_mean[scenes].shape, generator, device)
        z0 = (z0 - shift) * scaling
        noise = _randn(z0.shape, generator, device)
        z_t, t, target = objective.noised(z0, noise, generator)
        drop = (torch.rand(config.batch_size, generator=generator) < config.caption_dropout).to(device)
        with _autocast(device):
            output = objective.predict(z_t, t, rows, drop)
            loss = F.mse_loss(output.float(), target)  # ||eps - eps_theta(z_t, t, c)||^2, or in v
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        warmup.step()
        step += 1
        if run.after_step("denoiser", step, config.unet_steps, loss, bar, modules, generator):
            break
    bar.close()
    for module in trained.values():
        module.eval()
    return pipeline, step


class _NoisePrediction:
    """SD 1.x/2.x: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps at a uniform timestep of SD's schedule; the
    UNet, cross-attending to the text encoder's last hidden state, predicts the noise or the velocity."""

    def __init__(
        self,
        pipeline: StableDiffusionPipeline,
        captions: list[str],
        prediction_type: str,
        device: torch.device,
    ):
        self.pipeline = pipeline
        self.prediction_type = prediction_type
        self.schedule = DDPMScheduler(**STABLE_DIFFUSION_SCHEDULE)
        self.token_ids = _token_ids(pipeline, captions, device)
        self.empty_ids = _token_ids(pipeline, [""], device)

    def noised(
        self, z0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_t, the timesteps [B] and the target of a batch of latents."""
        steps = self.schedule.config.num_train_timesteps
        t = torch.randint(steps, (len(z0),), generator=generator).to(z0.device)
        z_t = self.schedule.add_noise(z0, noise, t)  # z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps
        return z_t, t, _target(self.schedule, self.prediction_type, z0, noise, t)

    def predict(
        self, z_t: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, drop: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output for training rows ``rows``, their captions dropped where ``drop``."""
        ids = torch.where(drop[:, None], self.empty_ids, self.token_ids[rows.to(z_t.device)])
        encoder_hidden_states = self.pipeline.text_encoder(ids)[0]
        return self.pipeline.unet(z_t, t, encoder_hidden_states=encoder_hidden_states).sample


def _target(
    schedule: DDPMScheduler, prediction_type: str, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the UNet learns to output at z_t: the noise, or the velocity."""
    if prediction_type == "epsilon":
        return noise
    # v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (Salimans & Ho 2022, sec. 4)
    return schedule.get_velocity(z0, noise, t)


class _FlowVelocity:
    """SD3: the rectified flow of :mod:`diffmem.lab.rectified_flow`; the MMDiT sees the prompt as the
    pipeline encodes it (``encode_prompt``: both CLIP encoders, zeros in T5's place)."""

    def __init__(self, pipeline: StableDiffusion3Pipeline, captions: list[str]):
        self.pipeline = pipeline
        self.captions = captions
        self.schedule = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config)

    def noised(
        self, z0: torch.Tensor, noise: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_t, the timesteps [B] and the velocity target of a batch of latents."""
        t, sigma = flow_timesteps(self.schedule, len(z0), generator)
        z_t, v = rectified_flow(z0, noise, sigma)
        return z_t, t.to(z0.device), v

    def predict(
        self, z_t: torch.Tensor, t: torch.Tensor, rows: torch.Tensor, drop: torch.Tensor
    ) -> torch.Tensor:
        """The transformer's velocity for training rows ``rows``, their captions dropped where ``drop``."""
        prompts = [
            "" if dropped else self.captions[row] for row, dropped in zip(rows.tolist(), drop.tolist())
        ]
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompts, None, None, device=z_t.device, do_classifier_free_guidance=False
        )
        return self.pipeline.transformer(
            hidden_states=z_t,
            timestep=t,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]


def trained_model_config(model_dir: Path) -> LabModelConfig:
    """The architecture a lab model was trained with (from its ``lab_training.json``)."""
    return _recorded_model_config(_training_record(model_dir)["model_config"])


def trained_train_config(model_dir: Path) -> LabTrainConfig:
    """The optimisation settings a lab model was trained with (from its ``lab_training.json``)."""
    return LabTrainConfig(**_training_record(model_dir)["train_config"])


def _recorded_model_config(sizes: dict) -> LabModelConfig:
    """A recorded architecture; a field the record predates has its default (the prediction type: epsilon)."""
    sizes = {"prediction_type": "epsilon"} | sizes
    return LabModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})


def _training_record(model_dir: Path) -> dict:
    """A trained lab model's ``lab_training.json``."""
    record = Path(model_dir) / RECORD
    if not record.is_file():
        raise DiffmemError(
            f"{model_dir} is not a trained lab model (no {RECORD}); train one with `diffmem lab train`"
        )
    return json.loads(record.read_text())


def _trained_vae(model_dir: Path, config: LabModelConfig) -> AutoencoderKL:
    """The VAE of a trained lab model in float32, checked against the latents ``config`` expects."""
    trained = trained_model_config(model_dir)
    fields = ("image_size", "vae_channels", "latent_channels")
    if any(getattr(trained, f) != getattr(config, f) for f in fields):
        raise DiffmemError(
            f"the VAE of {model_dir} has {', '.join(f'{f}={getattr(trained, f)}' for f in fields)}; "
            f"this run needs {', '.join(f'{f}={getattr(config, f)}' for f in fields)}"
        )
    return AutoencoderKL.from_pretrained(model_dir / "vae").float().eval()


def _load_denoiser_weights(model_dir: Path, trained: dict[str, torch.nn.Module]) -> None:
    """Copy a trained lab model's denoiser and text-encoder weights (stored in float16) into float32 modules."""
    for name, module in trained.items():
        module.load_state_dict(type(module).from_pretrained(model_dir / name).float().state_dict())


@torch.no_grad()
def _latent_table(
    dataset: LabDataset, vae: AutoencoderKL, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every training scene, and the scene index of every training row."""
    scene_ids, images = dataset.unique_train_images()
    means, stds = [], []
    for chunk in images.split(256):
        posterior = vae.encode(chunk.to(device) * 2 - 1).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    position = {scene_id: i for i, scene_id in enumerate(scene_ids)}
    row_scene = torch.tensor([position[s] for s in dataset.train.column("scene_id").to_pylist()])
    return torch.cat(means), torch.cat(stds), row_scene


def _token_ids(pipeline: StableDiffusionPipeline, captions: list[str], device: torch.device) -> torch.Tensor:
    tokenizer = pipeline.tokenizer
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    return torch.tensor(ids, device=device)


def _randn(shape: torch.Size, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(device)


def _autocast(device: torch.device) -> torch.autocast:
    """bfloat16 mixed precision on CUDA; plain float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _restore(state: dict | None, modules: dict, generator: torch.Generator) -> int:
    """Load a checkpoint into modules, optimizers and the data generator; its step (0 without one)."""
    if state is None:
        return 0
    for name, module in modules.items():
        module.load_state_dict(state[name])
    generator.set_state(state["generator"])
    return int(state["step"])


def _save_pipeline(pipeline: DiffusionPipeline, dataset: LabDataset, run: _Run) -> None:
    """The trained pipeline in float16 safetensors, with a record of how it was made; checkpoints go."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.to("cpu", torch.float16)
    pipeline.save_pretrained(run.out_dir, safe_serialization=True)
    record = {
        "command": " ".join(sys.argv),
        "dataset": {"directory": str(dataset.directory), "config": asdict(dataset.config)},
        "model_config": run.model.to_dict(),
        "train_config": asdict(run.train),
        **{name: path for name, path in run.sources.items() if path is not None},
        "total_unet_steps": run.train.unet_steps + _steps_before(run.sources["init_from"]),
        "seed": run.train.seed,
        "wall_time_s": round(run.elapsed(), 1),
        "hardware": {"machine": platform.machine(), "cpus": os.cpu_count(), **environment()},
    }
    (run.out_dir / RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    shutil.rmtree(run.checkpoints)


def _steps_before(init_from: str | None) -> int:
    """UNet steps the starting model had seen, over every run it was continued from."""
    if init_from is None:
        return 0
    record = _training_record(Path(init_from))
    return record.get("total_unet_steps", record["train_config"]["unet_steps"])
