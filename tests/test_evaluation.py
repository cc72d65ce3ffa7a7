"""evaluate.py: FID, CLIP score, prompt adherence and VAE reconstruction, their record in
results.json, the guidance sweep's table and plot, and one clear message for every failure.

Everything runs on the CPU without network: tiny U-Net/VAE exports with random weights (those of
the sampling tests), a tiny random open_clip model, and a tiny stand-in for Inception.
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
import torchmetrics.functional.image.lpips as lpips_module
from helpers import TINY_CLIP, compose_config, synthetic_run_overrides
from omegaconf import DictConfig
from PIL import Image
from test_sample import (  # the sampling tests' tiny exports
    Exports,
    make_exports,
    one_torch_thread,  # noqa: F401  (autouse fixture: one thread for tiny models)
    script_fails,
)
from torch import nn

from ldm.data.synthetic import SHAPES, prompt_caption
from ldm.diffusion import GuidanceInterval, ScheduleConfig
from ldm.evaluation import adherence, reconstruction, run_evaluation
from ldm.evaluation.clip_score import ClipScorer, ClipScoreSettings
from ldm.evaluation.errors import MetricWeightsUnavailableError
from ldm.evaluation.fid import FidSettings, add_images, build_fid, fid_value
from ldm.evaluation.plot import plot_sweep
from ldm.evaluation.request import SweepSetting, request_from_config
from ldm.exports import load_vae_export
from ldm.pipeline import SamplingOptions
from ldm.sampling import read_png_metadata

# Above the tiny exports' 16 px: the attribute analyser reads the generator's images right
# from 32 px up (tests/test_attribute_reader.py).
JUDGING_RESOLUTION_PX = 64
CFG_SCALES, STEPS = (1.0, 3.0), (2, 3)
NUM_SAMPLES = 4


class PooledColours(nn.Module):
    """A stand-in for Inception: each image's colours averaged over a 2×2 grid, 12 features."""

    num_features = 12

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return make_exports(tmp_path_factory.mktemp("runs"))


def evaluate_cfg(
    exports: Exports, synthetic_root: Path, out_dir: Path, *overrides: str
) -> DictConfig:
    """The real conf/evaluate.yaml as `python evaluate.py ...` composes it, kept tiny and quiet."""
    defaults = [
        *synthetic_run_overrides(synthetic_root, out_dir.parent),
        f"ckpt={exports.unet}",
        f"out_dir={out_dir}",
        f"clip_score.model_name={TINY_CLIP}",
        "clip_score.pretrained=null",
        f"num_samples={NUM_SAMPLES}",
        "batch_size=4",
        "steps=[2]",
        "cfg_scales=[3]",
        "adherence.prompts=2",
        "adherence.images_per_prompt=1",
        "adherence.vae_ceiling_images=4",
        "progress=false",
    ]
    return compose_config("evaluate", [*defaults, *overrides])


def main_fails(cfg: DictConfig) -> str:
    return script_fails("evaluate.py", cfg)


@pytest.fixture(scope="module")
def sweep_run(exports, synthetic_root, tmp_path_factory):
    """One evaluation of every U-Net metric and the VAE's reconstruction, over a 2 × 2 sweep."""
    out_dir = tmp_path_factory.mktemp("eval") / "run"
    cfg = evaluate_cfg(
        exports,
        synthetic_root,
        out_dir,
        "metrics=[fid,clip_score,adherence,reconstruction]",
        f"cfg_scales=[{','.join(map(str, CFG_SCALES))}]",
        f"steps=[{','.join(map(str, STEPS))}]",
        f"resolution={JUDGING_RESOLUTION_PX}",
        "guidance_interval=[0.5,null]",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconstruction, "build_lpips", lpips_offline)
        return run_evaluation(cfg, feature_extractor=PooledColours())


def lpips_offline():
    """What building LPIPS does without network (torchvision's AlexNet download fails)."""
    raise urllib.error.URLError("no network")


def random_images(count: int, seed: int, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator, dtype=torch.uint8)


# ---- FID ----------------------------------------------------------------------------------------


def test_fid_is_about_zero_for_identical_sets_and_clearly_positive_for_different_ones() -> None:
    real = random_images(64, seed=0)
    brighter = (real.int() + 80).clamp(max=255).to(torch.uint8)
    fid = build_fid(FidSettings(), feature_extractor=PooledColours())
    add_images(fid, [real[:32], real[32:]], real=True)
    add_images(fid, [real], real=False)
    identical = fid_value(fid)
    fid.reset()  # the generated side only
    add_images(fid, [brighter], real=False)
    different = fid_value(fid)
    assert abs(identical) < 1e-4
    assert different > 0.5


def test_offline_inception_download_fails_with_one_message_naming_the_cache_and_the_fix(
    exports, synthetic_root, tmp_path, monkeypatch
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    message = main_fails(evaluate_cfg(exports, synthetic_root, tmp_path / "out", "metrics=[fid]"))
    assert "Inception-v3 weights" in message and "name resolution" in message
    assert "downloaded once from the internet" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "on a connected machine" in message and "fid.weights_file=" in message
    assert "\n" not in message


# ---- CLIP score ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_scorer() -> ClipScorer:
    return ClipScorer(ClipScoreSettings(model_name=TINY_CLIP, pretrained=None))


CAPTIONS = ["a red circle", "a blue square", "two dogs in the snow", "a green triangle"]


def test_clip_score_is_100_times_the_cosine_clipped_at_zero(tiny_scorer) -> None:
    images = random_images(4, seed=1)
    model = tiny_scorer.model
    with torch.no_grad():
        image_features = model.encode_image(tiny_scorer.model_inputs(images))
        text_features = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(CAPTIONS))
    cosine = (image_features * text_features).sum(-1) / (
        image_features.norm(dim=-1) * text_features.norm(dim=-1)
    )
    scores = tiny_scorer.scores(images, CAPTIONS)
    torch.testing.assert_close(scores, 100 * cosine.clamp(min=0), atol=1e-4, rtol=1e-4)


def test_clip_score_of_a_negative_cosine_is_zero(tiny_scorer) -> None:
    images = random_images(4, seed=2)
    flipped = ClipScorer(ClipScoreSettings(model_name=TINY_CLIP, pretrained=None))
    with torch.no_grad():  # every caption embedding negated, so every cosine changes sign
        flipped.model.text_projection.neg_()
    before, after = tiny_scorer.scores(images, CAPTIONS), flipped.scores(images, CAPTIONS)
    assert torch.all(torch.minimum(before, after) == 0)
    assert torch.all(torch.maximum(before, after) > 0)


def test_clip_score_is_deterministic_and_between_0_and_100(tiny_scorer) -> None:
    images = random_images(4, seed=3)
    again = ClipScorer(ClipScoreSettings(model_name=TINY_CLIP, pretrained=None))
    scores = tiny_scorer.scores(images, CAPTIONS)
    torch.testing.assert_close(again.scores(images, CAPTIONS), scores, atol=0, rtol=0)
    assert torch.all((scores >= 0) & (scores <= 100))


def test_a_random_init_clip_score_says_so_once_in_its_own_words(caplog) -> None:
    open_clip_dir = str(Path(open_clip.__file__).parent)
    with caplog.at_level(logging.INFO):
        ClipScorer(ClipScoreSettings(model_name=TINY_CLIP, pretrained=None))
    assert [r.getMessage() for r in caplog.records if r.pathname.startswith(open_clip_dir)] == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RANDOM-init" in warnings[0]
    assert "clip_score.pretrained" in warnings[0]


def test_offline_clip_download_fails_with_one_message(monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise FileNotFoundError("Failed to download file (open_clip_model.safetensors)")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    with pytest.raises(MetricWeightsUnavailableError) as error:
        ClipScorer(ClipScoreSettings())  # ViT-B-32, laion2b_s34b_b79k
    message = str(error.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message
    assert "downloaded once from the internet" in message and "Hugging Face" in message
    assert "on a connected machine" in message and "clip_score.weights_file=" in message


# ---- prompt adherence ---------------------------------------------------------------------------


def test_analyser_reads_at_least_99_percent_of_generator_images_right(synthetic_root) -> None:
    check = adherence.check_analyser(synthetic_root, JUDGING_RESOLUTION_PX)
    assert check.passed, check.accuracy
    assert check.num_images == 28  # the small set's 16 validation and 12 held-out images
    adherence.require_reliable_analyser(check)


def test_corrupted_analyser_fails_its_check_and_evaluation_refuses_to_judge(
    exports, synthetic_root, tmp_path, monkeypatch
) -> None:
    def sees_only_circles(image, palette):
        return {**adherence_read(image, palette), "shape": "circle"}

    adherence_read = adherence.read_attributes
    monkeypatch.setattr(adherence, "read_attributes", sees_only_circles)
    check = adherence.check_analyser(synthetic_root, JUDGING_RESOLUTION_PX)
    assert not check.passed and check.accuracy["shape"] < 0.99
    assert check.accuracy["background"] >= 0.99
    cfg = evaluate_cfg(
        exports,
        synthetic_root,
        tmp_path / "out",
        "metrics=[adherence]",
        f"resolution={JUDGING_RESOLUTION_PX}",
    )
    message = main_fails(cfg)
    assert "analyser" in message and "shape" in message and "99%" in message
    assert not list((tmp_path / "out").glob("samples/**/*.png"))  # refused before sampling


def test_renoised_adherence_judges_each_denoised_image_against_what_was_drawn(
    synthetic_root,
) -> None:
    """A denoiser that keeps its input scores 100% everywhere; one that turns every picture
    upside down at high strength (a triangle then has its mass high: not a triangle) loses
    exactly the triangles, in the triangle row and in "all", and nothing else."""
    spec = adherence.dataset_config(synthetic_root).variant_spec
    drawn = [attributes for _, attributes in adherence.generator_images(synthetic_root)]
    calls = []

    def flips_at_high_strength(prompts, images, strength):
        calls.append((prompts, images.shape, strength))
        return images.flip(2) if strength > 0.5 else images

    scores = adherence.renoised_adherence(
        flips_at_high_strength, synthetic_root, 32, [0.2, 0.8], images_per_shape=2
    )
    first_two = [[a for a in drawn if a["shape"] == shape][:2] for shape in SHAPES]
    expected_prompts = [prompt_caption(a, spec) for chosen in first_two for a in chosen]
    assert [call[0] for call in calls] == [expected_prompts] * 2
    assert calls[0][1] == (len(expected_prompts), 3, 32, 32) and [c[2] for c in calls] == [0.2, 0.8]
    assert set(scores) == {0.2, 0.8}
    for name, result in scores[0.2].items():
        assert result.accuracy == dict.fromkeys(adherence.ATTRIBUTES, 1.0), name
    flipped = scores[0.8]
    assert flipped["triangle"].accuracy["shape"] == 0.0
    assert flipped["circle"].accuracy["shape"] == flipped["square"].accuracy["shape"] == 1.0
    assert flipped["all"].accuracy["shape"] == pytest.approx(4 / 6)
    assert flipped["all"].accuracy["color"] == flipped["all"].accuracy["background"] == 1.0
    assert {name: r.num_images for name, r in flipped.items()} == {
        "all": 6,
        "circle": 2,
        "square": 2,
        "triangle": 2,
    }


# ---- the record of a run ------------------------------------------------------------------------

# results.json's documented schema (ldm/evaluation/results.py): key → type, nested.
ACCURACY = {"background": float, "color": float, "shape": float, "size": float}
SPLIT_SCORES = {"accuracy": ACCURACY, "num_images": int}
SCHEMA = {
    "schema_version": int,
    "created_utc": str,
    "metrics": list,
    "evaluated": {
        "unet": {"checkpoint": str, "weights": str, "sha256": str, "image_size": int},
        "vae": {"export": str, "sha256": str},
    },
    "data": {
        "source": str,
        "root": str,
        "validation": {"annotations": str, "held_out_fraction": type(None), "images": int},
    },
    "settings": {
        "seed": int,
        "resolution_px": int,
        "resize": str,
        "batch_size": int,
        "device": str,
        "precision": str,
        "num_samples": int,
        "num_real_images": int,
        "captions": {"file": str, "sha256": str, "count": int, "source": str},
        "fid": {"feature_extractor": str, "feature_dim": int, "weights_file": type(None)},
        "clip_score": {
            "model": str,
            "pretrained": type(None),
            "weights_file": type(None),
            "scale": str,
        },
        "adherence": {
            "prompts_per_split": int,
            "images_per_prompt": int,
            "chance": ACCURACY,
            "analyser_check": {
                "accuracy": ACCURACY,
                "num_images": int,
                "resolution_px": int,
                "min_accuracy": float,
                "passed": bool,
            },
            "vae_ceiling": SPLIT_SCORES,
        },
    },
    "sweep": list,
    "reconstruction": {
        "psnr_db": float,
        "ssim": float,
        "lpips": (float, type(None)),
        "lpips_unavailable": (str, type(None)),
        "rfid": float,
        "num_images": int,
    },
}
SWEEP_ENTRY = {
    "sampler": str,
    "eta": float,
    "steps": int,
    "cfg_scale": float,
    "guidance_interval": list,
    "samples_dir": str,
    "metrics": {
        "fid": float,
        "clip_score": float,
        "adherence": {"train": SPLIT_SCORES, "heldout": SPLIT_SCORES},
    },
}


def assert_matches(value, schema, where: str = "results") -> None:
    """``value`` has exactly the keys of ``schema`` with values of its types, recursively."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        assert set(value) == set(schema), f"{where}: {sorted(value)} != {sorted(schema)}"
        for key, expected in schema.items():
            assert_matches(value[key], expected, f"{where}.{key}")
    else:
        assert isinstance(value, schema), f"{where} = {value!r} is not {schema}"


def test_results_json_follows_the_documented_schema(sweep_run) -> None:
    results = json.loads((sweep_run.out_dir / "results.json").read_text())
    assert results == sweep_run.results
    assert_matches(results, SCHEMA)
    assert results["schema_version"] == 1
    assert results["metrics"] == ["fid", "clip_score", "adherence", "reconstruction"]
    assert len(results["sweep"]) == len(CFG_SCALES) * len(STEPS)
    for index, entry in enumerate(results["sweep"]):
        assert_matches(entry, SWEEP_ENTRY, f"results.sweep[{index}]")


def test_results_record_what_a_fid_depends_on(sweep_run, exports) -> None:
    settings, evaluated = sweep_run.results["settings"], sweep_run.results["evaluated"]
    captions_file = sweep_run.out_dir / settings["captions"]["file"]
    captions = captions_file.read_text().splitlines()
    assert len(captions) == settings["num_samples"] == NUM_SAMPLES
    assert settings["captions"]["sha256"] == hashlib.sha256(captions_file.read_bytes()).hexdigest()
    assert settings["num_real_images"] == 16  # every validation image of the small set
    assert settings["resolution_px"] == JUDGING_RESOLUTION_PX
    assert settings["fid"]["feature_dim"] == PooledColours.num_features
    assert settings["fid"]["feature_extractor"] == "custom: PooledColours"
    unet_json = json.loads((exports.unet / "unet.json").read_text())
    assert evaluated["unet"]["sha256"] == unet_json["weights_sha256"]["ema"]
    assert evaluated["vae"]["sha256"] == unet_json["vae_weights_sha256"]


def test_samples_are_lossless_pngs_recording_how_they_were_made(sweep_run) -> None:
    entry = sweep_run.results["sweep"][0]
    pngs = sorted((sweep_run.out_dir / entry["samples_dir"] / "captions").glob("*.png"))
    assert len(pngs) == NUM_SAMPLES
    captions = (sweep_run.out_dir / "captions.txt").read_text().splitlines()
    metadata = [read_png_metadata(path) for path in pngs]
    assert sorted(m["prompt"] for m in metadata) == sorted(captions)
    assert {m["sampler"] for m in metadata} == {entry["sampler"]}
    assert {m["steps"] for m in metadata} == {str(entry["steps"])}
    assert {m["cfg_scale"] for m in metadata} == {str(entry["cfg_scale"])}
    assert entry["guidance_interval"] == [0.5, None]
    assert {m["guidance_interval"] for m in metadata} == {"[0.5, null]"}  # as sample.py takes it
    assert sorted(int(m["seed"]) for m in metadata) == list(range(NUM_SAMPLES))  # seed 0 + i


def test_sweep_writes_a_table_row_and_a_plot_point_per_setting(sweep_run) -> None:
    markdown = (sweep_run.out_dir / "results.md").read_text()
    sweep_section = markdown.split("## Guidance sweep")[1].split("##")[0]
    rows = [line for line in sweep_section.splitlines() if line.startswith("| ddim")]
    assert len(rows) == len(CFG_SCALES) * len(STEPS)
    assert all("| (0.5, ∞] |" in row for row in rows)
    assert "FID ↓" in sweep_section and "CLIP score ↑" in sweep_section
    assert "## Prompt adherence" in markdown and "## VAE reconstruction" in markdown
    assert sweep_run.plot_path == sweep_run.out_dir / "sweep.png"
    with Image.open(sweep_run.plot_path) as plot:
        assert plot.format == "PNG" and plot.width > 300


def test_plot_without_fid_shows_each_metric_against_the_cfg_scale(tmp_path) -> None:
    sweep = [
        {"sampler": "ddim", "steps": steps, "cfg_scale": scale, "metrics": {"clip_score": scale}}
        for steps in (25, 50)
        for scale in (1.0, 3.0, 7.5)
    ]
    path = plot_sweep(sweep, tmp_path / "sweep.png")
    with Image.open(path) as plot:
        assert plot.format == "PNG"


def test_wandb_logger_records_the_sweep_offline(exports, synthetic_root, tmp_path) -> None:
    cfg = evaluate_cfg(
        exports,
        synthetic_root,
        tmp_path / "out",
        "metrics=[clip_score]",
        "logger=wandb",
        "logger.offline=true",
    )
    result = run_evaluation(cfg)
    (run_dir,) = (result.out_dir / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb")) and result.plot_path.is_file()


def test_default_sweep_is_sample_py_defaults_and_the_demo_its_own() -> None:
    diffusion = ScheduleConfig(num_train_timesteps=1000)
    default = request_from_config(compose_config("evaluate")).sweep_settings(diffusion)
    demo = request_from_config(compose_config("evaluate", ["experiment=demo"]))
    assert default == (SweepSetting(SamplingOptions("ddim", 50, 7.5)),)
    flow = ScheduleConfig(objective="flow_matching")  # the demo's objective
    assert demo.sweep_settings(flow) == (SweepSetting(SamplingOptions("euler", 25, 3.0, 1.0)),)


def test_a_stochastic_setting_names_its_eta_in_its_label_and_folder() -> None:
    deterministic = SweepSetting(SamplingOptions("euler", 25, 3.0))
    stochastic = SweepSetting(SamplingOptions("euler", 25, 3.0, 1.0))
    assert (deterministic.slug, stochastic.slug) == (
        "euler-25steps-cfg3",
        "euler-25steps-cfg3-eta1",
    )
    assert stochastic.label == "euler 25 steps, cfg 3, eta 1"


def test_a_guidance_interval_is_named_in_the_label_and_folder() -> None:
    interval = GuidanceInterval(low=0.43)
    setting = SweepSetting(SamplingOptions("euler", 25, 3.0, 1.0, guidance_interval=interval))
    assert setting.slug == "euler-25steps-cfg3-gi0.43-inf-eta1"
    assert setting.label == "euler 25 steps, cfg 3 on σ in (0.43, ∞], eta 1"


# ---- VAE reconstruction -------------------------------------------------------------------------


def test_reconstruction_of_a_vae_export_at_its_own_image_size(
    exports, synthetic_root, tmp_path
) -> None:
    cfg = evaluate_cfg(
        exports,
        synthetic_root,
        tmp_path / "out",
        "metrics=[reconstruction]",
        f"vae_export={exports.vae}",
        f"ckpt={tmp_path / 'no-unet-needed'}",
    )
    result = run_evaluation(cfg, feature_extractor=PooledColours())
    scores = result.results["reconstruction"]
    assert result.results["evaluated"]["unet"] is None and result.results["sweep"] == []
    assert result.results["settings"]["resolution_px"] == 16  # the VAE's own image size
    assert scores["num_images"] == 16
    assert scores["psnr_db"] > 0 and -1 <= scores["ssim"] <= 1 and scores["rfid"] >= 0
    assert scores["lpips"] is None  # AlexNet's pooling leaves nothing of 16 px
    assert "at least 32 px" in scores["lpips_unavailable"]
    assert result.plot_path is None


def test_lpips_without_its_network_weights_is_unavailable_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(reconstruction, "build_lpips", lpips_offline)
    lpips, reason = reconstruction.lpips_or_reason(JUDGING_RESOLUTION_PX)
    assert lpips is None
    assert "no network" in reason and "downloaded once" in reason


def test_lpips_is_measured_when_its_network_loads(exports, monkeypatch) -> None:
    original = lpips_module._get_tv_model_features
    # Random AlexNet features instead of downloaded ones: the path is the same.
    monkeypatch.setattr(
        lpips_module, "_get_tv_model_features", lambda net, pretrained=False: original(net)
    )
    vae, _ = load_vae_export(exports.vae)
    images = random_images(4, seed=4, size=JUDGING_RESOLUTION_PX)
    fid = build_fid(FidSettings(), feature_extractor=PooledColours())
    scores = reconstruction.measure_reconstruction(
        vae, [images[:2], images[2:]], fid, JUDGING_RESOLUTION_PX
    )
    assert scores.lpips is not None and scores.lpips >= 0
    assert scores.lpips_unavailable is None and scores.num_images == 4


# ---- requests refused before any work -----------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["metrics=[fid,inception_score]"], "Unknown metric(s) ['inception_score']"),
        (["metrics=[]"], "metrics must be a non-empty list"),
        (["metrics=[fid]", "num_samples=1"], "num_samples=1: FID compares covariances"),
        (["cfg_scales=[]"], "cfg_scales must be a non-empty list"),
        (["cfg_scales=[-1]"], "negative scale"),
        (["steps=[0]"], "steps must be at least 1"),
        (["sampler=plms"], "choose one of ddpm | ddim | dpmpp_2m"),
        (["sampler=euler"], "does not fit this model, trained with diffusion.objective=ddpm"),
        (["logger=csv"], "cannot record the sweep"),
        (["fid.feature_dim=1000"], "choose one of (64, 192, 768, 2048)"),
        (["clip_score.model_name=NoSuchCLIP"], "is not an open_clip model"),
        (["steps=[51]"], "steps=51 is outside 1..50"),
    ],
)
def test_bad_requests_are_explained(exports, synthetic_root, tmp_path, overrides, expected) -> None:
    message = main_fails(evaluate_cfg(exports, synthetic_root, tmp_path / "out", *overrides))
    assert expected in message


def test_empty_captions_file_is_refused(exports, synthetic_root, tmp_path) -> None:
    empty = tmp_path / "captions.txt"
    empty.write_text("\n  \n")
    cfg = evaluate_cfg(
        exports, synthetic_root, tmp_path / "out", "metrics=[clip_score]", f"captions_file={empty}"
    )
    assert "holds no captions" in main_fails(cfg)


def test_adherence_without_the_synthetic_set_says_how_to_get_it(exports, tmp_path) -> None:
    cfg = compose_config(
        "evaluate",
        [
            f"ckpt={exports.unet}",
            f"out_dir={tmp_path / 'out'}",
            "metrics=[adherence]",
            "data=coco",
            f"data.root={tmp_path / 'coco'}",
            f"paths.root_dir={tmp_path}",
            "trainer=cpu",
        ],
    )
    message = main_fails(cfg)
    assert "needs the synthetic set" in message and "data=synthetic" in message
