"""Runs that survive: a run killed (SIGKILL) or stopped (SIGTERM, Ctrl-C) part-way, then resumed
from its last.ckpt, ends bit-identical to one that never stopped; ``ckpt_path=last`` finds it;
W&B continues the same run; a checkpoint is never half-written."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO_ROOT,
    TINY_UNET_RUN,
    TINY_VAE_RUN,
    compose_config,
    save_tiny_vae_export,
    synthetic_run_overrides,
)
from lightning.pytorch.callbacks import Callback

import ldm.training.vae_stage as vae_stage
from ldm.runs import resolve_checkpoint
from ldm.training.checkpointing import save_atomically
from ldm.training.loggers import WANDB_RUN_ID_KEY, build_logger
from ldm.training.unet_stage import run_unet_stage
from ldm.training.vae_stage import run_vae_stage

VAE_STEPS = 12  # 2 epochs of 6 batches
VAE_RUN = [
    *TINY_VAE_RUN,
    "latent_stats.max_batches=1",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.checkpoint_every_n_steps=2",
    "optim.lr_warmup_steps=2",
    "optim.lr_schedule=cosine",
]
UNET_STEPS = 12  # 3 epochs of 4 batches
UNET_RUN = [
    *TINY_UNET_RUN,
    "data.batch_size=8",
    "validation.prompts=[a red circle]",
    "validation.sampling.steps=2",
    "validation.timestep_buckets=2",
    "cache.text_max_positions=8",
    "cond_dropout=0.5",
    "optim.lr_warmup_steps=2",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.checkpoint_every_n_steps=2",
    "logger=none",
]


def kill_point_rng() -> tuple[random.Random, int]:
    """A random kill point, reproducible from the seed shown in failure messages
    (``KILL_SEED=<seed>`` replays one)."""
    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 1_000_000))
    return random.Random(seed), seed


def assert_same_training_state(whole: Path, resumed: Path, context: str) -> None:
    """Weights, EMA, buffers, AdamW moments and step counts, LR schedule: bit for bit."""
    a, b = (torch.load(path, map_location="cpu", weights_only=True) for path in (whole, resumed))
    assert a["global_step"] == b["global_step"], context
    assert a["state_dict"].keys() == b["state_dict"].keys(), context
    for name, tensor in a["state_dict"].items():  # NaN: latent statistics not measured yet
        torch.testing.assert_close(
            b["state_dict"][name], tensor, rtol=0, atol=0, equal_nan=True, msg=f"{name} {context}"
        )
    for ours, theirs in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for index, state in ours["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(
                    theirs["state"][index][key], value, rtol=0, atol=0, msg=f"AdamW {key} {context}"
                )
    assert a["lr_schedulers"] == b["lr_schedulers"], context


def start_training(script: str, overrides: list[str], run_dir: Path, log: Path) -> subprocess.Popen:
    """The real entry point in its own process, computing with this process's thread count
    (CPU results depend on it) so that its steps match the in-process runs bit for bit."""
    env = os.environ | {"OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, script, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_for_checkpoint_writes(
    process: subprocess.Popen, checkpoint: Path, count: int, log: Path
) -> list[float]:
    """When ``checkpoint`` was (re)written, until it was ``count`` times. Each write replaces
    the file, so its inode and modification time change."""
    seen, times = None, []
    deadline = time.monotonic() + 300
    while len(times) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"The run stopped or hung before {count} checkpoints:\n{log.read_text()}")
        try:
            stat = checkpoint.stat()
            identity = (stat.st_ino, stat.st_mtime_ns)
        except FileNotFoundError:
            identity = None
        if identity is not None and identity != seen:
            seen = identity
            times.append(time.monotonic())
        time.sleep(0.002)
    return times


def interrupt_at_random(
    script: str, overrides: list[str], run_dir: Path, signum: int
) -> tuple[int, str, int]:
    """Train in a subprocess, send ``signum`` at a random moment between checkpoints, wait for
    it to end; (global step of its last.ckpt, its output, its exit status)."""
    rng, seed = kill_point_rng()
    log = run_dir.parent / f"{run_dir.name}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    process = start_training(script, overrides, run_dir, log)
    last = run_dir / "checkpoints" / "last.ckpt"
    writes = wait_for_checkpoint_writes(process, last, rng.choice([2, 3]), log)
    time.sleep(rng.uniform(0, writes[-1] - writes[-2]))  # somewhere in the next two steps
    process.send_signal(signum)
    process.wait(timeout=300)
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    return stopped_at, f"KILL_SEED={seed}, stopped after step {stopped_at}", process.returncode


@pytest.fixture(scope="module")
def vae_root(tmp_path_factory, synthetic_root) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("vae")
    return root, [*synthetic_run_overrides(synthetic_root, root), *VAE_RUN]


@pytest.fixture(scope="module")
def vae_whole(vae_root) -> Path:
    """The uninterrupted VAE run the interrupted ones must reproduce: its final last.ckpt."""
    root, overrides = vae_root
    run_vae_stage(compose_config("train_vae", overrides), run_dir=root / "whole")
    return root / "whole" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def unet_setup(tmp_path_factory, synthetic_root) -> tuple[Path, list[str], Path]:
    """A tiny random VAE export, the overrides of a tiny U-Net run on it, and that run's
    uninterrupted final last.ckpt (which also builds the caches every run here shares)."""
    root = tmp_path_factory.mktemp("unet")
    export = save_tiny_vae_export(root / "vae")
    overrides = [*synthetic_run_overrides(synthetic_root, root), *UNET_RUN, f"vae_export={export}"]
    run_unet_stage(compose_config("train_unet", overrides), run_dir=root / "whole")
    return root, overrides, root / "whole" / "checkpoints" / "last.ckpt"


def test_a_vae_run_killed_mid_epoch_resumes_bit_identical(vae_root, vae_whole, tmp_path) -> None:
    """With a loader worker process, as real runs have (the reference run has none)."""
    _, overrides = vae_root
    overrides = [*overrides, f"paths.runs_dir={tmp_path / 'runs'}", "trainer.num_workers=1"]
    killed_dir = tmp_path / "runs" / "vae" / "killed"
    stopped_at, context, status = interrupt_at_random(
        "train_vae.py", overrides, killed_dir, signal.SIGKILL
    )
    assert status == -signal.SIGKILL, f"the run ended by itself before the kill ({context})"
    assert 0 < stopped_at < VAE_STEPS, context
    resumed = run_vae_stage(
        compose_config("train_vae", [*overrides, "ckpt_path=last"]),
        run_dir=tmp_path / "runs" / "vae" / "resumed",
    )
    assert_same_training_state(vae_whole, resumed.run_dir / "checkpoints" / "last.ckpt", context)


def test_a_unet_run_killed_mid_epoch_resumes_bit_identical_ema_included(
    unet_setup, tmp_path
) -> None:
    _, overrides, whole = unet_setup
    killed_dir = tmp_path / "killed"
    stopped_at, context, status = interrupt_at_random(
        "train_unet.py", overrides, killed_dir, signal.SIGKILL
    )
    assert status == -signal.SIGKILL, f"the run ended by itself before the kill ({context})"
    assert 0 < stopped_at < UNET_STEPS, context
    last = killed_dir / "checkpoints" / "last.ckpt"
    resumed = run_unet_stage(
        compose_config("train_unet", [*overrides, f"ckpt_path={last}"]),
        run_dir=tmp_path / "resumed",
    )
    final = resumed.run_dir / "checkpoints" / "last.ckpt"
    assert any(
        name.startswith("ema.") for name in torch.load(final, weights_only=True)["state_dict"]
    )
    assert_same_training_state(whole, final, context)


def test_sigterm_writes_last_ckpt_and_the_resumed_run_is_bit_identical_in_the_same_wandb_run(
    vae_root, vae_whole, tmp_path, monkeypatch
) -> None:
    """Preemption: the run finishes its step, writes last.ckpt there, exits with 128+15; resumed
    with ckpt_path=last (W&B offline, no network) it logs into the same W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    _, overrides = vae_root
    overrides = [*overrides, f"paths.runs_dir={tmp_path / 'runs'}", "logger=wandb"]
    stopped_dir = tmp_path / "runs" / "vae" / "stopped"
    stopped_at, context, status = interrupt_at_random(
        "train_vae.py", overrides, stopped_dir, signal.SIGTERM
    )
    output = (stopped_dir.parent / "stopped.log").read_text()
    assert status == 128 + signal.SIGTERM, f"{context}\n{output}"
    # The checkpoint holds the step the run stopped at, whether or not a periodic save fell there.
    assert f"SIGTERM: stopped after optimizer step {stopped_at} and wrote" in output, context
    assert 0 < stopped_at < VAE_STEPS, context
    assert not (stopped_dir / "export").exists(), "an interrupted run must not export"
    first_wandb_run = torch.load(stopped_dir / "checkpoints" / "last.ckpt", weights_only=True)[
        WANDB_RUN_ID_KEY
    ]
    resumed = run_vae_stage(
        compose_config("train_vae", [*overrides, "ckpt_path=last"]),
        run_dir=tmp_path / "runs" / "vae" / "resumed",
    )
    assert_same_training_state(vae_whole, resumed.run_dir / "checkpoints" / "last.ckpt", context)
    wandb_runs = [path.name for path in (resumed.run_dir / "wandb").glob("offline-run-*")]
    assert wandb_runs and all(name.endswith(f"-{first_wandb_run}") for name in wandb_runs)


class RaiseSignal(Callback):
    """Sends ``signum`` to this process after optimizer step ``step``, or while validating
    right after it (before its last validation batch)."""

    def __init__(self, signum: int, step: int, during_validation: bool = False) -> None:
        self.signum, self.step, self.during_validation = signum, step, during_validation

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.during_validation and trainer.global_step == self.step:
            signal.raise_signal(self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        due = self.during_validation and trainer.global_step == self.step and batch_idx == 0
        if due and not trainer.sanity_checking:
            signal.raise_signal(self.signum)


def stop_in_process(monkeypatch, overrides: list[str], run_dir: Path, sender: Callback) -> int:
    """Run the VAE stage with ``sender`` among its callbacks; the exit status it stopped with."""
    original = vae_stage._callbacks

    def with_sender(cfg, run_dir, with_logger):
        callbacks, best = original(cfg, run_dir, with_logger)
        return [*callbacks, sender], best

    monkeypatch.setattr(vae_stage, "_callbacks", with_sender)
    with pytest.raises(SystemExit) as stopped:
        run_vae_stage(compose_config("train_vae", overrides), run_dir=run_dir)
    monkeypatch.setattr(vae_stage, "_callbacks", original)
    return stopped.value.code


def test_ctrl_c_finishes_the_step_writes_last_ckpt_and_resumes_bit_identical(
    vae_root, vae_whole, tmp_path, monkeypatch
) -> None:
    _, overrides = vae_root
    stop_at = 3  # between the periodic checkpoints of steps 2 and 4
    status = stop_in_process(
        monkeypatch, overrides, tmp_path / "stopped", RaiseSignal(signal.SIGINT, stop_at)
    )
    assert status == 128 + signal.SIGINT
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop_at
    resumed = run_vae_stage(
        compose_config("train_vae", [*overrides, f"ckpt_path={last}"]), run_dir=tmp_path / "resumed"
    )
    assert_same_training_state(vae_whole, resumed.run_dir / "checkpoints" / "last.ckpt", "Ctrl-C")


def test_sigterm_during_validation_resumes_bit_identical(
    vae_root, vae_whole, tmp_path, monkeypatch
) -> None:
    _, overrides = vae_root
    epoch_end = VAE_STEPS // 2
    sender = RaiseSignal(signal.SIGTERM, step=epoch_end, during_validation=True)
    # No periodic checkpoint at the epoch's end, and the epoch-end one comes after validation:
    # a last.ckpt of that step can only be the one written on the signal.
    stopped = [*overrides, f"trainer.checkpoint_every_n_steps={epoch_end - 1}"]
    status = stop_in_process(monkeypatch, stopped, tmp_path / "stopped", sender)
    assert status == 128 + signal.SIGTERM
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == epoch_end
    resumed = run_vae_stage(
        compose_config("train_vae", [*overrides, f"ckpt_path={last}"]), run_dir=tmp_path / "resumed"
    )
    assert_same_training_state(
        vae_whole, resumed.run_dir / "checkpoints" / "last.ckpt", "SIGTERM in validation"
    )


class RaiseSigtermAtFirstEpochEnd(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            signal.raise_signal(signal.SIGTERM)


def test_sigterm_at_an_epoch_end_resumes_bit_identical(
    vae_root, vae_whole, tmp_path, monkeypatch
) -> None:
    """Lightning defers a SIGTERM that comes in an epoch's last step to after the epoch's end."""
    _, overrides = vae_root
    sender = RaiseSigtermAtFirstEpochEnd()
    status = stop_in_process(monkeypatch, overrides, tmp_path / "stopped", sender)
    assert status == 128 + signal.SIGTERM
    last = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == VAE_STEPS // 2
    resumed = run_vae_stage(
        compose_config("train_vae", [*overrides, f"ckpt_path={last}"]), run_dir=tmp_path / "resumed"
    )
    assert_same_training_state(
        vae_whole, resumed.run_dir / "checkpoints" / "last.ckpt", "SIGTERM at an epoch end"
    )


def test_a_checkpoint_killed_while_being_written_leaves_the_previous_one_whole(tmp_path) -> None:
    target = tmp_path / "last.ckpt"
    save_atomically({"version": 1, "weights": torch.zeros(4)}, target)
    writer = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from ldm.training.checkpointing import save_atomically\n"
        "save_atomically({'version': 2, 'weights': torch.ones(50_000_000)}, Path(sys.argv[1]))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(target)], cwd=REPO_ROOT)
    deadline = time.monotonic() + 120
    while not any(path.stat().st_size for path in tmp_path.glob(".last.ckpt.*.tmp")):
        assert process.poll() is None, "the write finished without a temporary file beside it"
        assert time.monotonic() < deadline, "no checkpoint write started"
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert list(tmp_path.glob(".last.ckpt.*.tmp")), "killed after the write, not during it"
    state = torch.load(target, weights_only=True)
    assert state["version"] == 1 and torch.equal(state["weights"], torch.zeros(4))


def write_checkpoint(path: Path, mtime: float, **extra: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 1, **extra}, path)
    os.utime(path, (mtime, mtime))
    return path


def test_ckpt_path_last_is_the_most_recently_written_last_ckpt_of_the_stage(tmp_path) -> None:
    """Not ``latest`` (pointed only when a run finishes) and not the newest directory name:
    the run that wrote its last.ckpt most recently, e.g. a killed resumed run."""
    runs = tmp_path / "runs" / "unet"
    finished = write_checkpoint(runs / "2024-05-02_10-00-00" / "checkpoints" / "last.ckpt", 1000)
    killed = write_checkpoint(runs / "2024-05-01_09-00-00" / "checkpoints" / "last.ckpt", 2000)
    (runs / "2024-05-03_08-00-00").mkdir()  # started after both, no checkpoint yet
    (runs / "latest").symlink_to("2024-05-02_10-00-00")
    assert resolve_checkpoint("last", runs) == killed.resolve()
    os.utime(finished, (3000, 3000))
    assert resolve_checkpoint("last", runs) == finished.resolve()


def test_ckpt_path_last_without_any_run_says_how_to_start_one(tmp_path) -> None:
    (tmp_path / "runs" / "vae" / "2024-05-01_09-00-00" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no run to resume.*without ckpt_path") as error:
        resolve_checkpoint("last", tmp_path / "runs" / "vae")
    assert str(tmp_path / "runs" / "vae") in str(error.value)


def test_a_missing_checkpoint_file_is_refused_before_training(tmp_path) -> None:
    missing = tmp_path / "runs" / "vae" / "old" / "checkpoints" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=r"is not a file.*ckpt_path=last"):
        resolve_checkpoint(str(missing), tmp_path / "runs" / "vae")


def test_the_wandb_logger_of_a_resumed_run_continues_the_run_its_checkpoint_names(
    tmp_path,
) -> None:
    checkpoint = write_checkpoint(tmp_path / "last.ckpt", 1000, **{WANDB_RUN_ID_KEY: "abc123xy"})
    logger_cfg = {
        "kind": "wandb",
        "project": "ldm-coco",
        "entity": None,
        "name": None,
        "tags": [],
        "offline": True,
        "id": None,
    }
    resumed = build_logger(logger_cfg, tmp_path / "run", resume_from=checkpoint)
    assert resumed.version == "abc123xy"
    chosen = build_logger(logger_cfg | {"id": "mine0001"}, tmp_path / "run", resume_from=checkpoint)
    assert chosen.version == "mine0001"  # logger.id still wins
    without = write_checkpoint(tmp_path / "csv.ckpt", 1000)  # trained with logger=csv
    assert build_logger(logger_cfg, tmp_path / "run", resume_from=without).version is None
