"""Many processes with Lightning's DDP: the same global batch trains like one process, caches are
built once, validation is split, metrics are summed over processes, and rank 0 alone exports.

Two CPU processes (gloo) are started once per module by ``torchrun --standalone`` (a free port)
running this file as a script; each writes what it saw as JSON, which the tests read.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import (
    SMALL_SYNTHETIC,
    TINY_CLIP,
    TINY_CLIP_CONFIG,
    TINY_CONTEXT,
    TINY_LATENT_SHAPE,
    TINY_OPTIM,
    TINY_UNET_RUN,
    compose_config,
    register_tiny_clip,
    save_tiny_vae_export,
    synthetic_run_overrides,
    tiny_diffusion_module,
)
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from ldm.data.batch_randomness import StepRandomness
from ldm.data.dataset import batch_as_is
from ldm.data.resumable_datamodule import ResumableDataModule
from ldm.data.resumable_loader import ResumableDataLoader, ResumableSampler
from ldm.devices import resolve_device
from ldm.training.diffusion_module import LatentDiffusionModule
from ldm.training.trainer import build_trainer, training_plan

PROCESSES = 2
PER_PROCESS_BATCH = 4
GLOBAL_BATCH = PROCESSES * PER_PROCESS_BATCH
STEPS = 3
LAUNCH_TIMEOUT_S = 300

# Stage 2 end to end under DDP, as small as it gets: 32 px images, a two-level U-Net.
TINY_STAGE2 = [
    *TINY_UNET_RUN,
    f"data.batch_size={PER_PROCESS_BATCH}",
    f"text_encoder.model_name={TINY_CLIP}",
    f"model.unet.context_dim={TINY_CLIP_CONFIG['text_cfg']['width']}",
    "validation.prompts=[a red circle]",
    "validation.sampling.steps=2",
    "validation.timestep_buckets=2",
    "cache.text_max_positions=8",
    "optim.lr_warmup_steps=2",
    "trainer=ddp",
    "trainer.device=cpu",
    f"trainer.devices={PROCESSES}",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=3",
    "trainer.checkpoint_every_n_steps=100",
    "logger=csv",
]


# ---- a per-item data set: the same items give the same numbers, however they are batched ----


class PerItemLatents(Dataset):
    """Stand-in for the latent cache whose every number (latents, text states and the step's
    random draws) is a function of its item's seed alone, so a batch of 2B and two shards or
    micro-batches of B hold exactly the same training signal. (The real loader draws per batch,
    which is exact on resume but differs when the global batch is split differently.)"""

    def __init__(self, size: int, randomness: StepRandomness) -> None:
        self.size = size
        self.randomness = randomness

    def __len__(self) -> int:
        return self.size

    def _item(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {
            "index": torch.tensor([index]),
            "latent_mean": torch.randn(1, *TINY_LATENT_SHAPE, generator=generator).half(),
            "latent_std": torch.rand(1, *TINY_LATENT_SHAPE, generator=generator).half(),
            "text_hidden_states": torch.randn(1, *TINY_CONTEXT, generator=generator).half(),
        } | self.randomness.draw(1, generator)

    def __getitems__(self, keys: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        items = [self._item(index, seed) for index, seed in keys]
        return {name: torch.cat([item[name] for item in items]) for name in items[0]}


class PerItemData(ResumableDataModule):
    """The project's resumable, rank-sharded train loader over :class:`PerItemLatents`."""

    def __init__(self, randomness: StepRandomness, batch_size: int) -> None:
        super().__init__()
        self.randomness = randomness
        self.batch_size = batch_size

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = PerItemLatents(GLOBAL_BATCH * STEPS, self.randomness)
        return self.resumable_train_loader(
            dataset, seed=7, batch_size=self.batch_size, collate_fn=batch_as_is
        )


def tiny_module() -> LatentDiffusionModule:
    return tiny_diffusion_module(
        optim=TINY_OPTIM | {"weight_decay": 1e-4, "lr_warmup_steps": 1, "lr_schedule": "cosine"},
        cond_dropout=0.25,
    )


def fit_tiny(
    trainer_overrides: list[str], batch_size: int, run_dir: Path
) -> tuple[LatentDiffusionModule, Any]:
    """STEPS optimizer steps of the tiny U-Net with the Trainer that ``conf/trainer`` builds."""
    cfg = compose_config("train_unet", [*trainer_overrides, "trainer.num_workers=0"])
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg |= {"max_steps": STEPS, "log_every_n_steps": 1}
    module = tiny_module()
    trainer = build_trainer(
        trainer_cfg, resolve_device(trainer_cfg), run_dir=run_dir, logger=None, callbacks=[]
    )
    trainer.fit(module, datamodule=PerItemData(module.step_randomness(train=True), batch_size))
    return module, trainer


# ---- what each process of the launched run records ---------------------------------------


class Recorder(Callback):
    """Per process: training and validation image ids, training losses, the training plan."""

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {"train_ids": [], "val_ids": [], "losses": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen["plan"] = training_plan(trainer, dict(pl_module.hparams["optim"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen["train_ids"].append(batch["image_id"].tolist())
        self.seen["losses"].append(float(outputs["loss"]))

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.sanity_checking:
            self.seen["val_ids"].extend(batch["image_id"].tolist())


def _worker(spec_file: Path) -> None:
    """One process of the torchrun launch: stage 2 end to end, then the tiny parity run."""
    import logging

    import ldm.training.unet_stage as stage
    from ldm.caches.datamodule import LatentDataModule

    logging.basicConfig(level=logging.INFO)  # the stage's own report, as Hydra would show it
    spec = json.loads(spec_file.read_text())
    out = Path(spec["out"])
    register_tiny_clip(out / "clip")

    builds: list[dict[str, str]] = []
    for name in ("_build_latents", "_build_captions"):
        original = getattr(LatentDataModule, name)

        def recording(self, *args, _original=original, _name=name, **kwargs):
            builds.append({"what": _name, "device": str(self.encode_device)})
            return _original(self, *args, **kwargs)

        setattr(LatentDataModule, name, recording)
    recorder = Recorder()
    original_callbacks = stage._callbacks

    def with_recorder(cfg, run_dir, with_logger):
        callbacks, best = original_callbacks(cfg, run_dir, with_logger)
        return [*callbacks, recorder], best

    stage._callbacks = with_recorder
    cfg = compose_config("train_unet", spec["stage2_overrides"])
    result = stage.run_unet_stage(cfg, run_dir=Path(spec["run_dir"]))

    module, trainer = fit_tiny(
        ["trainer=ddp", "trainer.device=cpu", f"trainer.devices={PROCESSES}"],
        PER_PROCESS_BATCH,
        out / "parity",
    )
    if trainer.is_global_zero:
        torch.save(module.state_dict(), out / "ddp_state.pt")
    record = recorder.seen | {
        "builds": builds,
        "export_dir": None if result.export_dir is None else str(result.export_dir),
        "ema_steps": module.ema.steps_seen,
        "global_step": trainer.global_step,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory) -> Path:
    return save_tiny_vae_export(tmp_path_factory.mktemp("vae") / "export")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, synthetic_root, vae_export) -> SimpleNamespace:
    """Two processes under torchrun; returns each one's record and the run's paths."""
    root = tmp_path_factory.mktemp("ddp")
    run_dir = root / "runs" / "unet" / "run"
    spec = {
        "out": str(root),
        "run_dir": str(run_dir),
        "stage2_overrides": [
            *TINY_STAGE2,  # trainer=ddp on the CPU, instead of the helper's trainer=cpu
            *(o for o in synthetic_run_overrides(synthetic_root, root) if o != "trainer=cpu"),
            f"vae_export={vae_export}",
        ],
    }
    spec_file = root / "spec.json"
    spec_file.write_text(json.dumps(spec))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        f"--nproc_per_node={PROCESSES}",
        str(Path(__file__).resolve()),
        str(spec_file),
    ]
    environment = os.environ | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    # A session of its own, so that a hung run is stopped with every process it started.
    process = subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, log = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, log = process.communicate()
    if process.returncode != 0:
        readable = "\n".join(line for line in log.splitlines() if "it/s]" not in line)
        pytest.fail(
            f"The {PROCESSES}-process run failed (exit status {process.returncode}; killed after "
            f"{LAUNCH_TIMEOUT_S} s if negative):\n{readable[-8000:]}"
        )
    records = [json.loads((root / f"rank{rank}.json").read_text()) for rank in range(PROCESSES)]
    return SimpleNamespace(records=records, root=root, run_dir=run_dir, log=log)


@pytest.fixture(scope="module")
def one_process_global_batch(tmp_path_factory) -> LatentDiffusionModule:
    """The reference: one process, batch = the DDP run's global batch."""
    module, _ = fit_tiny(["trainer=cpu"], GLOBAL_BATCH, tmp_path_factory.mktemp("single"))
    return module


def assert_same_weights(ours: dict, reference: dict) -> None:
    """Equal up to float rounding (a sum of two half-batch gradients vs one full-batch sum)."""
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def _initial_weights_differ_from(state: dict) -> bool:
    initial = tiny_module().state_dict()
    return any(
        not torch.allclose(initial[name], tensor, rtol=1e-4, atol=1e-6)
        for name, tensor in state.items()
        if name.startswith("unet.")
    )


# ---- the tests -----------------------------------------------------------------------------


def test_two_processes_train_like_one_process_with_the_same_global_batch(
    launched, one_process_global_batch
) -> None:
    reference = one_process_global_batch.state_dict()
    ddp = torch.load(launched.root / "ddp_state.pt", weights_only=True)
    assert _initial_weights_differ_from(reference)  # the comparison is not of untrained weights
    assert_same_weights(ddp, reference)  # raw and EMA weights, EMA step counter included
    assert all(record["ema_steps"] == STEPS for record in launched.records)


def test_accumulating_two_batches_of_b_trains_like_one_batch_of_2b(
    one_process_global_batch, tmp_path
) -> None:
    """Gradients of two micro-batches are averaged into one optimizer step: the LR schedule and
    the EMA see one step per pair, as the 2B run does."""
    module, trainer = fit_tiny(
        ["trainer=cpu", "trainer.accumulate_grad_batches=2"], PER_PROCESS_BATCH, tmp_path
    )
    assert trainer.global_step == STEPS
    assert module.ema.steps_seen == STEPS  # once per optimizer step, not per micro-batch
    assert_same_weights(module.state_dict(), one_process_global_batch.state_dict())


def test_the_caches_are_built_once_by_rank_0_while_rank_1_waits(launched) -> None:
    """Had rank 1 not waited, it would have found no caches (and failed) or built its own."""
    rank0, rank1 = launched.records
    assert sorted(build["what"] for build in rank0["builds"]) == [
        "_build_captions",
        "_build_latents",
        "_build_latents",
    ]
    assert rank1["builds"] == []
    assert {build["device"] for build in rank0["builds"]} == {"cpu"}


def test_each_process_trains_on_its_own_share_and_validates_its_own_shard(launched) -> None:
    rank0, rank1 = launched.records
    train = [{i for batch in record["train_ids"] for i in batch} for record in launched.records]
    assert train[0] and train[1] and not train[0] & train[1]
    assert len(rank0["train_ids"]) == len(rank1["train_ids"])  # in step
    val = [set(record["val_ids"]) for record in launched.records]
    assert not val[0] & val[1]
    assert len(val[0] | val[1]) == SMALL_SYNTHETIC.num_val  # together: the whole split


def test_the_global_batch_and_optimizer_steps_are_stated(launched) -> None:
    plan = launched.records[0]["plan"]
    assert plan["global_batch_size"] == GLOBAL_BATCH
    assert plan["processes"] == PROCESSES
    assert plan["optimizer_steps"] == len(launched.records[0]["train_ids"])
    assert f"Global batch {GLOBAL_BATCH} = {PER_PROCESS_BATCH} per process × 2" in launched.log


def test_logged_training_loss_is_the_mean_over_every_process(launched) -> None:
    """The window is summed over processes at the logging step (3), then divided."""
    rows = list(csv.DictReader((launched.run_dir / "csv" / "metrics.csv").open()))
    logged = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    losses = [record["losses"][:3] for record in launched.records]
    expected = sum(map(sum, losses)) / 6
    assert logged[0] == pytest.approx(expected, rel=1e-5)
    assert logged[0] != pytest.approx(sum(losses[0]) / 3, rel=1e-5)  # not rank 0's alone


def test_only_rank_0_exports_and_moves_the_latest_link(launched) -> None:
    rank0, rank1 = launched.records
    assert rank1["export_dir"] is None
    assert Path(rank0["export_dir"]).is_dir()
    assert (launched.run_dir.parent / "latest").resolve() == launched.run_dir.resolve()


def test_validation_loaders_split_the_set_into_disjoint_equal_shards() -> None:
    data = ResumableDataModule()
    shards = []
    for rank in range(3):
        data.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        shards.append([int(i) for batch in data.evaluation_loader(range(10)) for i in batch])
    assert [len(shard) for shard in shards] == [4, 4, 4]  # padded with repeats to equal length
    assert set().union(*shards) == set(range(10))
    data.trainer = None
    assert [int(i) for batch in data.evaluation_loader(range(10)) for i in batch] == list(range(10))


def test_resuming_with_another_process_count_is_refused() -> None:
    def loader(num_replicas: int) -> ResumableDataLoader:
        sampler = ResumableSampler(40, seed=3, num_replicas=num_replicas, rank=0)
        return ResumableDataLoader(range(40), sampler=sampler, batch_size=4, drop_last=True)

    state = loader(2).state_dict()
    loader(2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"written by 2 training process\(es\), this run has 4"):
        loader(4).load_state_dict(state)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
