"""``results.json`` — the record of one evaluation — and ``results.md``, its readable form.

A metric means nothing without what it was measured on, so the JSON holds, beside every number,
the model fingerprints, the data, the caption list's SHA-256, sample counts, resolution, resize
method, seed, sampler settings and the feature networks. Schema (version 1)::

    schema_version   int      1; bumped when a key changes meaning
    created_utc      str      ISO 8601
    metrics          [str]    what was asked: fid | clip_score | adherence | reconstruction
    evaluated        {unet: {checkpoint, weights, sha256, image_size} | null,
                      vae: {export, sha256}}
    data             {source, root, validation: {annotations, held_out_fraction, images} | null}
    settings         {seed, resolution_px, resize, batch_size, device, precision,
                      and for the metrics asked (in brackets):
                      num_samples, captions: {file, sha256, count, source}   (fid, clip_score)
                      num_real_images                                       (fid)
                      fid: {feature_extractor, feature_dim, weights_file}   (fid, reconstruction)
                      clip_score: {model, pretrained, weights_file, scale}  (clip_score)
                      adherence: {prompts_per_split, images_per_prompt, chance,
                                  analyser_check: {accuracy, num_images, resolution_px,
                                                   min_accuracy, passed},
                                  vae_ceiling: {accuracy, num_images}}      (adherence)}
    sweep            [{sampler, eta, steps, cfg_scale, guidance_interval: [low, high | null] | null,
                       samples_dir,
                       metrics: {fid: float, clip_score: float,
                                 adherence: {train|heldout: {accuracy: {background, color,
                                                             shape, size}, num_images}}}}]
                     (one entry per cfg_scale × steps, metrics as asked; [] for a VAE alone)
    reconstruction   {psnr_db, ssim, lpips: float | null, lpips_unavailable: str | null,
                      rfid, num_images} | null

Accuracies are fractions in [0, 1]; FID and rFID are distances (lower is better); the CLIP score
is 100 × max(cosine, 0) (higher is better).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldm.evaluation.adherence import ATTRIBUTES

SCHEMA_VERSION = 1
RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"


def write_results(out_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out_dir``."""
    json_path, markdown_path = out_dir / RESULTS_JSON, out_dir / RESULTS_MARKDOWN
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    markdown_path.write_text(results_markdown(results), encoding="utf-8")
    return json_path, markdown_path


def results_markdown(results: dict[str, Any]) -> str:
    """The numbers of ``results.json`` as Markdown tables, with the settings they depend on."""
    lines = ["# Evaluation", "", *_description(results)]
    if results["sweep"]:
        headers, rows = sweep_table(results["sweep"])
        lines += ["", "## Guidance sweep", "", *markdown_table(headers, rows)]
    if "adherence" in results["metrics"]:
        lines += ["", "## Prompt adherence (% of images showing the asked attribute)", ""]
        lines += markdown_table(*adherence_table(results))
    if results["reconstruction"] is not None:
        lines += ["", "## VAE reconstruction", "", *markdown_table(*reconstruction_table(results))]
    return "\n".join(lines) + "\n"


def sweep_table(sweep: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """One row per setting: FID, CLIP score and held-out adherence, as far as measured."""
    measured = sweep[0]["metrics"]
    headers = ["sampler", "eta", "steps", "cfg scale", "guided on σ"]
    if "fid" in measured:
        headers.append("FID ↓")
    if "clip_score" in measured:
        headers.append("CLIP score ↑")
    if "adherence" in measured:
        headers += [f"{split} bg/colour/shape/size %" for split in measured["adherence"]]
    rows = []
    for entry in sweep:
        metrics = entry["metrics"]
        row = [
            entry["sampler"],
            f"{entry['eta']:g}",
            str(entry["steps"]),
            f"{entry['cfg_scale']:g}",
            _interval_text(entry["guidance_interval"]),
        ]
        row += [f"{metrics[name]:.2f}" for name in ("fid", "clip_score") if name in metrics]
        row += [_accuracies(split["accuracy"]) for split in metrics.get("adherence", {}).values()]
        rows.append(row)
    return headers, rows


def adherence_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per-attribute accuracy per setting and split, under the chance level, the analyser's own
    accuracy on generator images and the VAE ceiling."""
    reference = results["settings"]["adherence"]
    headers = ["", "images", *ATTRIBUTES]
    rows = [
        ["chance", "", *(_percent(reference["chance"][name]) for name in ATTRIBUTES)],
        _accuracy_row("analyser on generator images", reference["analyser_check"]),
        _accuracy_row("VAE ceiling", reference["vae_ceiling"]),
    ]
    for entry in results["sweep"]:
        noise = f", eta {entry['eta']:g}" if entry["eta"] else ""
        interval = entry["guidance_interval"]
        guided = "" if interval is None else f" on σ in {_interval_text(interval)}"
        label = (
            f"{entry['sampler']} {entry['steps']} steps, cfg {entry['cfg_scale']:g}{guided}{noise}"
        )
        for split, scores in entry["metrics"]["adherence"].items():
            rows.append(_accuracy_row(f"{label}: {split}", scores))
    return headers, rows


def reconstruction_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    scores = results["reconstruction"]
    lpips = "n/a" if scores["lpips"] is None else f"{scores['lpips']:.4f}"
    headers = ["images", "PSNR dB ↑", "SSIM ↑", "LPIPS ↓", "rFID ↓"]
    row = [str(scores["num_images"]), f"{scores['psnr_db']:.2f}", f"{scores['ssim']:.4f}"]
    return headers, [[*row, lpips, f"{scores['rfid']:.2f}"]]


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _description(results: dict[str, Any]) -> list[str]:
    """The settings a reader needs to compare these numbers with others, as bullet points."""
    settings, evaluated = results["settings"], results["evaluated"]
    lines = []
    if evaluated["unet"] is not None:
        unet = evaluated["unet"]
        lines.append(
            f"- U-Net: `{unet['checkpoint']}` ({unet['weights']} weights, sha256 "
            f"`{unet['sha256'][:12]}…`)"
        )
    vae = evaluated["vae"]
    lines.append(f"- VAE: `{vae['export']}` (sha256 `{vae['sha256'][:12]}…`)")
    validation = results["data"]["validation"]
    if validation is not None:
        lines.append(
            f"- Validation data: {validation['images']} images of `{validation['annotations']}`"
        )
    lines.append(f"- {settings['resolution_px']} px: {settings['resize']}; seed {settings['seed']}")
    if "captions" in settings:
        captions = settings["captions"]
        lines.append(
            f"- {settings['num_samples']} samples per setting, one per caption of "
            f"`{captions['file']}` ({captions['source']}; sha256 `{captions['sha256'][:12]}…`)"
        )
    if "fid" in settings:
        fid = settings["fid"]
        real = settings.get("num_real_images")
        lines.append(
            f"- FID: {fid['feature_extractor']}, {fid['feature_dim']} features"
            + (f", {real} real images" if real is not None else "")
        )
    if "clip_score" in settings:
        clip = settings["clip_score"]
        weights = clip["weights_file"] or clip["pretrained"] or "random init"
        lines.append(f"- CLIP score: open_clip {clip['model']} ({weights}), {clip['scale']}")
    return lines


def _accuracy_row(label: str, scores: dict[str, Any]) -> list[str]:
    accuracy = scores["accuracy"]
    return [label, str(scores["num_images"]), *(_percent(accuracy[name]) for name in ATTRIBUTES)]


def _accuracies(accuracy: dict[str, float]) -> str:
    return "/".join(f"{100 * accuracy[name]:.0f}" for name in ATTRIBUTES)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _interval_text(interval: list[float | None] | None) -> str:
    """A results.json guidance interval as the table shows it: "all", or "(0.43, ∞]"."""
    if interval is None:
        return "all"
    low, high = interval
    return f"({low:g}, {'∞' if high is None else f'{high:g}'}]"
