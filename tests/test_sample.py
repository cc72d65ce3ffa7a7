"""sample.py: loading a trained U-Net safely, reproducible PNGs that record how they were made,
image-to-image, guidance cost, and a clear message (never a traceback) for every bad input.

Everything runs on tiny exports with random weights, written directly (no training).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, TINY_CLIP, compose_config
from omegaconf import DictConfig
from PIL import Image

from ldm.data.images import read_rgb_image
from ldm.data.transforms import image_to_model_tensor
from ldm.diffusion import ScheduleConfig
from ldm.exports import (
    load_vae_export,
    read_unet_metadata,
    save_unet_export,
    save_vae_export,
)
from ldm.models.unet import UNet, UNetConfig
from ldm.models.vae import VAE, VAEConfig
from ldm.pipeline import SamplingOptions
from ldm.sampling import labelled_grid, read_png_metadata, run_sampling
from ldm.training.diffusion_module import LatentDiffusionModule

TINY_VAE = VAEConfig(block_channels=(16, 32), layers_per_block=1, norm_groups=8)
TINY_UNET = UNetConfig(
    model_channels=16,
    channel_multipliers=(1, 2),
    transformer_levels=(1,),
    attention_head_dim=16,
    context_dim=32,
    norm_groups=8,
)
IMAGE_SIZE = 16  # → 4×8×8 latents
NUM_TIMESTEPS = 50
# β_0 = 1e-4 as in DDPM: the least noisy step barely perturbs a latent (see the img2img test).
SCHEDULE = ScheduleConfig(
    num_train_timesteps=NUM_TIMESTEPS,
    beta_start=1e-4,
    beta_end=0.4,
    prediction_type="epsilon",
    rescale_zero_terminal_snr=False,
)
CONTEXT_LENGTH = 8
LATENT_STATS = {
    "channel_mean": [0.0] * 4,
    "channel_std": [1.0] * 4,
    "global_mean": 0.0,
    "global_std": 1.0,
    "scale_factor": 0.8,
    "num_latents": 8,
    "sampled_posterior": True,
}


@dataclasses.dataclass(frozen=True)
class Exports:
    vae: Path
    unet: Path
    lightning_ckpt: Path


def trained_like_unet(seed: int) -> UNet:
    """A U-Net whose output depends on its inputs: fresh ones predict exactly zero."""
    torch.manual_seed(seed)
    unet = UNet(TINY_UNET)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return unet.eval()


def make_exports(root: Path) -> Exports:
    """A VAE export, a U-Net export naming it, and the Lightning checkpoint of the same run:
    written from one training module, as the stage runner and Lightning write them."""
    torch.manual_seed(0)
    vae_dir = save_vae_export(
        root / "vae" / "export",
        VAE(TINY_VAE),
        latent_stats=LATENT_STATS,
        extra={"image_size": IMAGE_SIZE},
    )
    module = LatentDiffusionModule(
        unet=TINY_UNET.to_dict(),
        diffusion=dataclasses.asdict(SCHEDULE),
        optim={"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0},
        ema={},
        cond_dropout=0.1,
        latent_norm={"kind": "global", "scale_factor": LATENT_STATS["scale_factor"]},
        latent_shape=[4, 8, 8],
        context_length=CONTEXT_LENGTH,
        validation={"timestep_buckets": 2},
        provenance={
            "vae_export": str(vae_dir.resolve()),
            "vae_weights_sha256": read_json(vae_dir / "vae.json")["weights_sha256"],
            "text_encoder": {"model_name": TINY_CLIP, "pretrained": None, "max_length": 77},
            "image_size": IMAGE_SIZE,
        },
    )
    module.unet.load_state_dict(trained_like_unet(1).state_dict())
    module.ema.module.load_state_dict(trained_like_unet(2).state_dict())
    unet_dir = save_unet_export(root / "unet" / "run" / "export", module.export())
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)  # as Lightning calls it before writing the file
    ckpt = root / "unet" / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save(checkpoint, ckpt)
    return Exports(vae_dir, unet_dir, ckpt)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a few shared cores, OpenMP threads waiting on each other make these tiny models up to
    50× slower; one thread keeps the file fast and changes no result the tests check."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return make_exports(tmp_path_factory.mktemp("runs"))


def sample_cfg(ckpt: Path, out_dir: Path, *overrides: str) -> DictConfig:
    """The real conf/sample.yaml composed as `python sample.py ...` would, kept small and quiet."""
    defaults = [
        f"ckpt={ckpt}",
        f"out_dir={out_dir}",
        "trainer=cpu",
        "prompt='a red circle'",
        "n=2",
        "steps=4",
        "progress=false",
    ]
    return compose_config("sample", [*defaults, *overrides])


def entry_script(filename: str) -> ModuleType:
    """An entry script of the repository (sample.py, evaluate.py), loaded to call its main."""
    spec = importlib.util.spec_from_file_location(Path(filename).stem, REPO_ROOT / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_fails(filename: str, cfg: DictConfig) -> str:
    """Run the script's main; it must exit non-zero with a message (returned), no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        entry_script(filename).main(cfg)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith(f"{filename}: ")
    return message


def main_fails(cfg: DictConfig) -> str:
    return script_fails("sample.py", cfg)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def pngs(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.png"))}


# ---- reproducibility and what each PNG records ------------------------------------------------


def test_same_seed_gives_identical_png_bytes_and_another_seed_does_not(exports, tmp_path) -> None:
    options = ("sampler=ddpm", "seed=5")  # ancestral: draws fresh noise at every step
    run_sampling(sample_cfg(exports.unet, tmp_path / "first", *options))
    run_sampling(sample_cfg(exports.unet, tmp_path / "second", *options))
    run_sampling(sample_cfg(exports.unet, tmp_path / "other", "sampler=ddpm", "seed=6"))
    first, second = pngs(tmp_path / "first"), pngs(tmp_path / "second")
    assert len(first) == 3  # two images and the grid
    assert first == second
    image = next(name for name in first if "seed5" in name)
    other = next(path for path in (tmp_path / "other").glob("*seed6.png"))
    assert not np.array_equal(pixels(tmp_path / "first" / image), pixels(other))


def test_png_text_records_prompt_seed_settings_and_the_unet_fingerprint(exports, tmp_path) -> None:
    cfg = sample_cfg(
        exports.unet,
        tmp_path,
        "prompt='ein rotes Quadrat, größer'",
        "negative_prompt='blurry'",
        "sampler=dpmpp_2m",
        "steps=3",
        "cfg_scale=2.5",
        "seed=11",
        "n=1",
    )
    result = run_sampling(cfg)
    metadata = read_png_metadata(result.image_paths[0])
    ema_sha256 = read_unet_metadata(exports.unet)["weights_sha256"]["ema"]
    assert metadata["prompt"] == "ein rotes Quadrat, größer"
    assert metadata["negative_prompt"] == "blurry"
    assert (metadata["seed"], metadata["sampler"], metadata["steps"]) == ("11", "dpmpp_2m", "3")
    assert (metadata["cfg_scale"], metadata["strength"]) == ("2.5", "1.0")
    assert metadata["checkpoint_sha256"] == ema_sha256
    assert metadata["checkpoint_weights"] == "ema"
    assert Path(metadata["checkpoint"]) == exports.unet.resolve()


def test_image_i_gets_seed_plus_i_counted_over_all_prompts(exports, tmp_path) -> None:
    cfg = sample_cfg(exports.unet, tmp_path, "prompt=[a red circle,a blue square]", "seed=100")
    result = run_sampling(cfg)
    recorded = [
        (read_png_metadata(p)["prompt"], int(read_png_metadata(p)["seed"]))
        for p in result.image_paths
    ]
    assert recorded == [
        ("a red circle", 100),
        ("a red circle", 101),
        ("a blue square", 102),
        ("a blue square", 103),
    ]


def test_an_image_is_made_again_alone_from_its_recorded_seed(exports, tmp_path) -> None:
    batch = sample_cfg(exports.unet, tmp_path / "batch", "prompt=[one,two]", "batch_size=4")
    third = run_sampling(batch).image_paths[2]
    metadata = read_png_metadata(third)
    alone = sample_cfg(
        exports.unet,
        tmp_path / "alone",
        f"prompt={metadata['prompt']}",
        "n=1",
        f"seed={metadata['seed']}",
    )
    remade = run_sampling(alone).image_paths[0]
    assert np.abs(pixels(third) - pixels(remade)).max() <= 1  # batch size may round differently


def test_a_guidance_interval_is_recorded_and_guides_only_the_steps_inside_it(
    exports, tmp_path, monkeypatch
) -> None:
    calls: list[int] = []
    forward = UNet.forward

    def counted(self, x, t, context):
        calls.append(x.shape[0])
        return forward(self, x, t, context)

    monkeypatch.setattr(UNet, "forward", counted)
    cfg = sample_cfg(exports.unet, tmp_path, "cfg_scale=5", "n=1", "guidance_interval=[2,null]")
    image = run_sampling(cfg).image_paths[0]

    assert read_png_metadata(image)["guidance_interval"] == "[2.0, null]"
    # 4 steps at t = 199, 149, 99, 49 of T = 200: the last is below noise-to-signal ratio 2
    assert calls == [2, 2, 2, 1]


def test_each_prompt_gets_a_grid_labelled_with_it(exports, tmp_path) -> None:
    cfg = sample_cfg(exports.unet, tmp_path, "prompt=[a red circle,a blue square]", "n=3")
    result = run_sampling(cfg)
    assert len(result.grid_paths) == 2
    assert read_png_metadata(result.grid_paths[1])["prompt"] == "a blue square"
    assert read_png_metadata(result.grid_paths[1])["seeds"] == "3,4,5"


def test_grid_puts_the_images_in_a_row_under_a_strip_with_the_prompt_written_in_it() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    tiles = [Image.new("RGB", (16, 16), colour) for colour in colours]
    grid = labelled_grid(tiles, "a red circle on a blue background")
    zoom = grid.width // (3 * 16)
    assert zoom > 1 and grid.width == 3 * 16 * zoom  # enlarged so the label is legible
    label_height = grid.height - 16 * zoom
    label = np.asarray(grid.crop((0, 0, grid.width, label_height)).convert("L"))
    assert label.min() < 64  # dark text drawn on the white strip
    for index, colour in enumerate(colours):
        centre = ((index + 0.5) * 16 * zoom, label_height + 8 * zoom)
        assert grid.getpixel(centre) == colour


# ---- checkpoints ------------------------------------------------------------------------------


def test_lightning_checkpoint_samples_like_the_export_of_its_run(exports, tmp_path) -> None:
    from_export = run_sampling(sample_cfg(exports.unet, tmp_path / "export"))
    from_ckpt = run_sampling(sample_cfg(exports.lightning_ckpt, tmp_path / "ckpt"))
    for a, b in zip(from_export.image_paths, from_ckpt.image_paths, strict=True):
        assert np.array_equal(pixels(a), pixels(b))
    assert read_png_metadata(from_ckpt.image_paths[0])["checkpoint"].endswith("last.ckpt")


def test_raw_weights_give_other_images_than_the_default_ema(exports, tmp_path) -> None:
    ema = run_sampling(sample_cfg(exports.unet, tmp_path / "ema")).image_paths[0]
    raw = run_sampling(sample_cfg(exports.unet, tmp_path / "raw", "weights=raw")).image_paths[0]
    assert read_png_metadata(raw)["checkpoint_weights"] == "raw"
    assert not np.array_equal(pixels(ema), pixels(raw))


def test_default_checkpoint_is_the_latest_unet_run(tmp_path) -> None:
    made = make_exports(tmp_path / "runs")
    (tmp_path / "runs" / "unet" / "latest").symlink_to("run", target_is_directory=True)
    cfg = compose_config(
        "sample",
        [
            f"paths.root_dir={tmp_path}",
            "trainer=cpu",
            "prompt=x",
            "n=1",
            "steps=2",
            "progress=false",
        ],
    )
    result = run_sampling(cfg)
    assert Path(read_png_metadata(result.image_paths[0])["checkpoint"]) == made.unet.resolve()
    assert result.out_dir.parent == tmp_path / "runs" / "samples"


# ---- image-to-image, guidance, the demo -------------------------------------------------------


@pytest.fixture
def init_image(tmp_path: Path) -> Path:
    """A 24×20 picture (not square, not the model's size): stripes under a bright disc."""
    y, x = np.mgrid[0:20, 0:24]
    pixels_ = np.stack([(x * 10) % 256, (y * 12) % 256, np.full_like(x, 90)], -1)
    pixels_[(x - 12) ** 2 + (y - 10) ** 2 < 25] = 250
    path = tmp_path / "init.png"
    Image.fromarray(pixels_.astype(np.uint8)).save(path)
    return path


def test_img2img_with_strength_near_zero_returns_the_decoded_init_image(
    exports, tmp_path, init_image
) -> None:
    vae, _ = load_vae_export(exports.vae)
    start = image_to_model_tensor(read_rgb_image(init_image), IMAGE_SIZE)[None]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(start).mode()).clamp(-1, 1)
    expected = ((decoded[0].permute(1, 2, 0) + 1) * 127.5).round().numpy()

    def sampled(strength: float) -> np.ndarray:
        cfg = sample_cfg(
            exports.unet,
            tmp_path / str(strength),
            f"init_image={init_image}",
            f"strength={strength}",
            f"steps={NUM_TIMESTEPS}",
            "n=1",
        )
        return pixels(run_sampling(cfg).image_paths[0])

    # strength 0.01 runs only the last step, from t = 0: noise of std √β_0 = 0.01 in the latent.
    assert np.abs(sampled(0.01) - expected).mean() < 3.0  # of 255 levels
    assert np.abs(sampled(0.9) - expected).mean() > 20.0


@pytest.mark.parametrize(("cfg_scale", "batch_per_call"), [(1.0, 3), (7.5, 6)])
def test_cfg_scale_one_makes_one_conditional_model_call_per_step(
    exports, tmp_path, monkeypatch, cfg_scale: float, batch_per_call: int
) -> None:
    calls: list[int] = []
    forward = UNet.forward

    def counted(self, x, t, context):
        calls.append(x.shape[0])
        return forward(self, x, t, context)

    monkeypatch.setattr(UNet, "forward", counted)
    run_sampling(sample_cfg(exports.unet, tmp_path, f"cfg_scale={cfg_scale}", "n=3", "steps=5"))
    assert calls == [batch_per_call] * 5  # guidance batches both branches into the one call


def test_compile_option_compiles_the_unet_and_pads_the_last_batch_to_full_size(
    exports, tmp_path, monkeypatch
) -> None:
    """torch.compile itself is replaced (compiling even this U-Net takes a minute on the CPU;
    tests/test_sampling_speed_paths.py compares a really compiled model with the eager one)."""
    compiled_with: list[dict] = []
    calls: list[int] = []
    forward = UNet.forward

    def counted(self, x, t, context):
        calls.append(x.shape[0])
        return forward(self, x, t, context)

    def recording_compile(model, **options):
        compiled_with.append(options)
        return model

    eager = run_sampling(sample_cfg(exports.unet, tmp_path / "eager", "n=3", "batch_size=2"))
    monkeypatch.setattr(UNet, "forward", counted)
    monkeypatch.setattr(torch, "compile", recording_compile)
    overrides = ("n=3", "batch_size=2", "compile=reduce-overhead")
    compiled = run_sampling(sample_cfg(exports.unet, tmp_path / "compiled", *overrides))

    assert compiled_with == [{"mode": "reduce-overhead", "dynamic": False, "fullgraph": False}]
    assert calls == [4] * 8  # 2 batches × 4 steps, guided: the last image padded to a pair
    assert len(compiled.image_paths) == 3
    for a, b in zip(eager.image_paths, compiled.image_paths, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1  # batch size may round differently


def test_demo_experiment_samples_with_the_demo_defaults(exports, tmp_path) -> None:
    cfg = compose_config("sample", ["experiment=demo"])
    assert (cfg.steps, cfg.cfg_scale) == (25, 3.0)
    cfg = sample_cfg(exports.unet, tmp_path, "experiment=demo", "steps=3", "n=1")
    entry_script("sample.py").main(cfg)
    image = next(tmp_path.glob("*seed0.png"))
    # No sampler named: the (ddpm-objective) model's own, DDIM.
    assert read_png_metadata(image)["cfg_scale"] == "3.0"
    assert read_png_metadata(image)["sampler"] == "ddim"


def test_wandb_logger_records_the_grids_offline_into_out_dir(exports, tmp_path) -> None:
    cfg = sample_cfg(exports.unet, tmp_path, "logger=wandb", "logger.offline=true", "n=1")
    run_sampling(cfg)
    assert list((tmp_path / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))


# ---- bad input: a message each, exit non-zero, nothing unsafe runs -----------------------------


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_would_run_code_is_refused_before_it_runs(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"hyper_parameters": RunsCodeWhenUnpickled(marker), "state_dict": {}}, crafted)
    message = main_fails(sample_cfg(crafted, tmp_path / "out"))
    assert "Refusing to load" in message and "run arbitrary code" in message
    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # the file really is malicious: plain loading runs it
    assert marker.exists()


@pytest.mark.parametrize("given", ["vae_export_dir", "vae_json", "vae_lightning_ckpt"])
def test_vae_output_given_as_the_unet_checkpoint_is_named_as_such(
    exports, tmp_path, given: str
) -> None:
    vae_ckpt = tmp_path / "vae.ckpt"
    torch.save({"hyper_parameters": {"model": {}, "kl_weight": 1e-5}, "state_dict": {}}, vae_ckpt)
    path = {
        "vae_export_dir": exports.vae,
        "vae_json": exports.vae / "vae.json",
        "vae_lightning_ckpt": vae_ckpt,
    }[given]
    assert "VAE" in main_fails(sample_cfg(path, tmp_path / "out"))


def test_missing_checkpoint_names_the_path_and_how_to_train_one(tmp_path) -> None:
    message = main_fails(sample_cfg(tmp_path / "nowhere", tmp_path / "out"))
    assert str(tmp_path / "nowhere") in message and "train_unet.py" in message


def test_run_dir_without_an_export_points_at_its_lightning_checkpoints(exports, tmp_path) -> None:
    run_dir = tmp_path / "unfinished"
    shutil.copytree(exports.lightning_ckpt.parent, run_dir / "checkpoints")
    message = main_fails(sample_cfg(run_dir, tmp_path / "out"))
    assert "No U-Net export" in message and "last.ckpt" in message


def test_export_of_another_format_version_is_refused(exports, tmp_path) -> None:
    copy = shutil.copytree(exports.unet, tmp_path / "export")
    metadata = read_json(copy / "unet.json") | {"format_version": 99}
    (copy / "unet.json").write_text(json.dumps(metadata))
    assert "format version 99" in main_fails(sample_cfg(copy, tmp_path / "out"))


def test_lightning_checkpoint_lacking_what_sampling_needs_is_refused(exports, tmp_path) -> None:
    state = torch.load(exports.lightning_ckpt, weights_only=True)
    del state["export"]["metadata"]["vae_export"]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    message = main_fails(sample_cfg(old, tmp_path / "out"))
    assert "vae_export" in message and "incompatible" in message


def test_checkpoint_from_before_checkpoints_carried_an_export_says_what_to_do(
    exports, tmp_path
) -> None:
    state = torch.load(exports.lightning_ckpt, weights_only=True)
    del state["export"]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    message = main_fails(sample_cfg(old, tmp_path / "out"))
    assert "before checkpoints carried their export" in message
    assert "runs/unet/<run>/export" in message and f"ckpt_path={old}" in message


def test_retrained_vae_is_caught_by_its_fingerprint(tmp_path) -> None:
    made = make_exports(tmp_path / "runs")
    torch.manual_seed(123)  # train_vae.py run again: new weights at the same path
    save_vae_export(made.vae, VAE(TINY_VAE), latent_stats=LATENT_STATS)
    message = main_fails(sample_cfg(made.unet, tmp_path / "out"))
    assert "retrained or replaced" in message and "vae_export=" in message


def test_moved_vae_export_says_to_pass_vae_export(tmp_path) -> None:
    made = make_exports(tmp_path / "runs")
    shutil.move(made.vae, tmp_path / "moved")
    message = main_fails(sample_cfg(made.unet, tmp_path / "out"))
    assert "cannot be found" in message
    run_sampling(sample_cfg(made.unet, tmp_path / "out", f"vae_export={tmp_path / 'moved'}"))


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_init_image_that_cannot_be_read_is_reported(exports, tmp_path, content: bytes) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(content)
    message = main_fails(sample_cfg(exports.unet, tmp_path / "out", f"init_image={broken}"))
    assert "cannot be read as an image" in message and str(broken) in message


def test_missing_init_image_is_reported(exports, tmp_path) -> None:
    message = main_fails(sample_cfg(exports.unet, tmp_path, f"init_image={tmp_path / 'no.png'}"))
    assert "does not exist" in message


def test_prompt_longer_than_77_tokens_is_truncated_with_a_warning(
    exports, tmp_path, caplog
) -> None:
    long_prompt = " ".join(["red"] * 90)
    with caplog.at_level(logging.WARNING):
        result = run_sampling(sample_cfg(exports.unet, tmp_path, f"prompt='{long_prompt}'", "n=1"))
    assert result.image_paths
    warnings = [r.getMessage() for r in caplog.records if r.name == "ldm.sampling.run"]
    assert any("92 tokens" in w and "truncated" in w for w in warnings)


@pytest.mark.parametrize("strength", [0, -0.5, 1.5])
def test_strength_outside_zero_to_one_is_refused(exports, tmp_path, init_image, strength) -> None:
    cfg = sample_cfg(exports.unet, tmp_path, f"init_image={init_image}", f"strength={strength}")
    assert f"strength={float(strength)} is outside (0, 1)" in main_fails(cfg)


def test_strength_without_an_init_image_is_refused(exports, tmp_path) -> None:
    assert "init_image" in main_fails(sample_cfg(exports.unet, tmp_path, "strength=0.5"))


def test_an_empty_guidance_interval_is_refused_with_the_form_it_takes(exports, tmp_path) -> None:
    message = main_fails(sample_cfg(exports.unet, tmp_path, "guidance_interval=[2,1]"))
    assert "guidance_interval=[2, 1] is empty" in message and "[0.43, null]" in message


def test_more_steps_than_training_timesteps_is_refused(exports, tmp_path) -> None:
    message = main_fails(sample_cfg(exports.unet, tmp_path, f"steps={NUM_TIMESTEPS + 1}"))
    assert f"steps={NUM_TIMESTEPS + 1}" in message and f"T={NUM_TIMESTEPS}" in message


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"steps": 201}, r"steps=201 is outside 1\.\.200: .*T=200"),
        ({"steps": 0}, "steps must be at least 1, got 0"),
        ({"steps": 20.0}, r"steps must be an integer, got 20\.0"),
        ({"sampler": "plms"}, r"sampler='plms' is not supported; .*ddpm \| ddim \| dpmpp_2m"),
        ({"sampler": "ddpm", "eta": 0.5}, "eta=0.5 only applies to sampler ddim"),
        ({"eta": 1.5}, r"eta=1\.5 is outside \[0, 1\]"),
        ({"cfg_scale": -1}, r"cfg_scale=-1\.0 is a negative scale"),
        ({"cfg_scale": "high"}, "cfg_scale must be a number, got 'high'"),
        ({"strength": 0.5}, "strength=0.5 only applies to image-to-image"),
        ({"strength": 0, "image_to_image": True}, r"strength=0\.0 is outside \(0, 1\)"),
        ({"strength": 1.2, "image_to_image": True}, r"strength=1\.2 is outside \(0, 1\)"),
        ({"strength": 1, "image_to_image": True}, "strength 1 would ignore the init image"),
    ],
)
def test_sampling_options_are_checked_where_they_enter_with_what_was_wrong(
    options, expected
) -> None:
    """The one check every entry (sample.py, evaluate.py, training's grids) goes through."""
    with pytest.raises(ValueError, match=expected):
        SamplingOptions.checked(diffusion=ScheduleConfig(), **options)


def test_checked_options_default_to_text_to_image_and_img2img_strength() -> None:
    assert SamplingOptions.checked(diffusion=ScheduleConfig()) == SamplingOptions()
    img2img = SamplingOptions.checked(diffusion=ScheduleConfig(), image_to_image=True)
    assert img2img.strength == 0.75


def test_training_refuses_validation_sampling_options_when_its_module_is_built() -> None:
    with pytest.raises(ValueError, match=r"validation\.sampling: steps=51 is outside 1\.\.50"):
        LatentDiffusionModule(
            unet=TINY_UNET.to_dict(),
            diffusion=dataclasses.asdict(SCHEDULE),
            optim={},
            ema={},
            cond_dropout=0.1,
            latent_norm={"kind": "global", "scale_factor": 1.0},
            latent_shape=[4, 8, 8],
            context_length=CONTEXT_LENGTH,
            validation={"timestep_buckets": 2, "sampling": {"steps": NUM_TIMESTEPS + 1}},
            provenance={},
        )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["prompt=null"], "exactly one of prompt= and prompts_file="),
        (["prompt=null", "prompts_file=/nowhere/prompts.txt"], "prompts.txt does not exist"),
        (["n=0"], "n must be at least 1"),
        (["sampler=euler"], "objective=ddpm; its samplers are ddpm | ddim | dpmpp_2m"),
        (["eta=0.5", "sampler=ddpm"], "only applies to sampler ddim"),
        (["weights=best"], "weights='best'"),
        (["logger=csv"], "cannot record images"),
        (
            ["compile=bogus"],
            "compile='bogus' is not supported; choose one of none, default, reduce-overhead, "
            "max-autotune",
        ),
    ],
)
def test_other_bad_options_are_explained(exports, tmp_path, overrides, expected) -> None:
    assert expected in main_fails(sample_cfg(exports.unet, tmp_path, *overrides))


def test_prompts_file_gives_one_prompt_per_non_blank_line(exports, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    cfg = sample_cfg(
        exports.unet, tmp_path / "out", "prompt=null", f"prompts_file={prompts}", "n=1"
    )
    result = run_sampling(cfg)
    assert [read_png_metadata(p)["prompt"] for p in result.image_paths] == [
        "a red circle",
        "a blue square",
    ]
