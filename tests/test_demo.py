"""The demo's closing summary: stage times, the adherence table, where the grids are and what
the analyser reads in them."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import compose_config
from PIL import Image

from demo import grid_verdict, hydra_string, summary
from ldm.data.synthetic import prompt_caption
from ldm.evaluation.adherence import ATTRIBUTES, dataset_config, generator_images
from ldm.sampling import save_png

RESULTS = """# Evaluation

- U-Net: `runs/unet/x/export`

## Guidance sweep

| sampler | steps | cfg scale | train bg/colour/shape/size % |
|---|---|---|---|
| ddim | 25 | 3 | 100/90/80/85 |

## Prompt adherence (% of images showing the asked attribute)

|  | images | background | color | shape | size |
|---|---|---|---|---|---|
| chance |  | 14.3 | 12.5 | 33.3 | 50.0 |
| ddim 25 steps, cfg 3: heldout | 102 | 99.0 | 91.2 | 70.6 | 88.2 |

## Reconstruction

| psnr | 30.1 |
"""


def write_demo_outputs(out_dir: Path) -> Path:
    (out_dir / "evaluation").mkdir(parents=True)
    (out_dir / "evaluation" / "results.md").write_text(RESULTS)
    (out_dir / "samples").mkdir()
    grid = out_dir / "samples" / "000-a-red-circle-grid.png"
    grid.write_bytes(b"png")
    return grid


def test_summary_lists_each_stage_time_and_their_total(tmp_path: Path) -> None:
    write_demo_outputs(tmp_path)

    text = summary([("VAE (stage 1)", 90.0), ("U-Net", 150.0)], tmp_path)

    assert "VAE (stage 1)    1.5 min" in text
    assert "U-Net            2.5 min" in text
    assert "total            4.0 min" in text


def test_summary_shows_the_adherence_table_and_no_other_section(tmp_path: Path) -> None:
    write_demo_outputs(tmp_path)

    text = summary([("samples", 1.0)], tmp_path)

    assert "ddim 25 steps, cfg 3: heldout | 102 | 99.0 | 91.2 | 70.6 | 88.2" in text
    assert "| chance |" in text
    assert "Guidance sweep" not in text
    assert "Reconstruction" not in text


def test_summary_points_at_the_sample_grid(tmp_path: Path) -> None:
    grid = write_demo_outputs(tmp_path)

    assert f"Sample grid: {grid}" in summary([("samples", 1.0)], tmp_path)


def test_summary_ends_with_the_grid_verdict(tmp_path: Path) -> None:
    write_demo_outputs(tmp_path)

    text = summary([("samples", 1.0)], tmp_path, "Grid judged by the analyser: 4 of 4")

    assert text.splitlines()[-3] == "Grid judged by the analyser: 4 of 4"


def test_grid_verdict_names_each_image_that_shows_something_else(
    synthetic_root: Path, tmp_path: Path
) -> None:
    spec = dataset_config(synthetic_root).variant_spec
    (right, asked), *others = generator_images(synthetic_root)
    wrong, drawn = next((path, drawn) for path, drawn in others if drawn["shape"] != asked["shape"])
    prompt = prompt_caption(asked, spec)
    for seed, path in enumerate([right, wrong]):
        save_png(Image.open(path), tmp_path / f"{seed}.png", {"prompt": prompt, "seed": seed})
    save_png(Image.open(wrong), tmp_path / "other.png", {"prompt": "other", "seed": 9})
    save_png(Image.open(right), tmp_path / "grid.png", {"prompt": prompt, "seeds": "0,1"})

    verdict = grid_verdict(prompt, tmp_path, synthetic_root)

    assert verdict.startswith("Grid judged by the analyser: 1 of 2 images show everything")
    misread = [f"{name} {drawn[name]}" for name in ATTRIBUTES if drawn[name] != asked[name]]
    assert verdict.endswith(f"; seed 1 reads {', '.join(misread)}.")
    assert "seed 0" not in verdict and "seed 9" not in verdict


def test_a_prompt_outside_the_sets_wordings_is_not_judged(synthetic_root: Path) -> None:
    verdict = grid_verdict("a cat on a sofa", synthetic_root, synthetic_root)

    assert verdict == "Grid not judged: the prompt is in none of the set's caption wordings."


@pytest.mark.parametrize(
    "prompt", ["a small disc painted magenta, set on navy", "it's [red], 'quoted' \\ text"]
)
def test_a_prompt_reaches_sample_py_unchanged_through_hydra(prompt: str) -> None:
    override = f"prompt={hydra_string(prompt)}"

    cfg = compose_config("sample", ["experiment=demo", override])

    assert cfg.prompt == prompt
