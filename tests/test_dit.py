"""Specification of the transformer denoiser (`model.denoiser=dit`): shapes, conditioning,
adaLN-Zero initialisation, config checks, exports, and a run through stage 2 and sampling."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TINY_CONTEXT,
    TINY_UNET_RUN,
    compose_config,
    save_tiny_vae_export,
    synthetic_run_overrides,
    tiny_diffusion_module,
)
from PIL import Image

from ldm.config import plain
from ldm.config.checks import check_run_config
from ldm.exports import (
    load_unet_export,
    load_unet_for_sampling,
    read_checkpoint_export,
    read_unet_metadata,
    save_unet_export,
    unet_from_export,
)
from ldm.models.denoiser import build_denoiser, denoiser_name
from ldm.models.dit import DiT, DiTConfig, position_code_2d
from ldm.models.unet import UNet
from ldm.models.vae import count_parameters
from ldm.sampling import run_sampling
from ldm.training.unet_stage import check_inputs_fit, run_unet_stage

CONTEXT_DIM = 16
# Two blocks of width 32 in 2×2 patches: a few 10k parameters.
TINY = DiTConfig(hidden_dim=32, depth=2, attention_head_dim=16, context_dim=CONTEXT_DIM)
# The DiT of the stage run below, over the tiny U-Net run's 4×16×16 latents, with a text refiner.
TINY_DIT_RUN = [
    "model.denoiser=dit",
    "model.dit.hidden_dim=32",
    "model.dit.depth=2",
    "model.dit.attention_head_dim=16",
    "model.dit.text_refiner_layers=1",  # the refiner through training, export and sampling
]


@pytest.fixture(autouse=True)
def _seeded_on_one_thread() -> Iterator[None]:
    # Tiny tensors: on shared cores, threads cost more in synchronisation than they save.
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(batch: int = 2, size: int = 8, context_length: int = 5, config: DiTConfig = TINY):
    latents = torch.randn(batch, config.in_channels, size, size)
    timesteps = torch.randint(0, 1000, (batch,))
    context = torch.randn(batch, context_length, config.context_dim)
    return latents, timesteps, context


def _trained_like(model: DiT) -> DiT:
    """Every zero-initialised layer given random weights, as training would: a fresh DiT's
    blocks are identities and its output is zero, which hides everything inside."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    return model.eval()


# --- size and shapes ----------------------------------------------------------------------


def test_default_config_is_sized_like_the_default_unet() -> None:
    """18-24M parameters, as the U-Net it replaces (tests/test_unet_model.py)."""
    assert 18_000_000 <= count_parameters(DiT(DiTConfig())) <= 24_000_000


def test_default_config_maps_16px_latents_with_clip_context_to_the_same_shape() -> None:
    latents, timesteps, context = _inputs(size=16, context_length=77, config=DiTConfig())
    with torch.no_grad():
        assert DiT(DiTConfig()).eval()(latents, timesteps, context).shape == (2, 4, 16, 16)


@pytest.mark.parametrize(
    ("patch_size", "height", "width"), [(1, 8, 8), (2, 8, 8), (2, 16, 8), (4, 16, 16)]
)
def test_output_shape_equals_input_for_any_latent_size_divisible_by_the_patch(
    patch_size: int, height: int, width: int
) -> None:
    config = DiTConfig(**{**TINY.to_dict(), "patch_size": patch_size})
    model = _trained_like(DiT(config))
    latents = torch.randn(2, 4, height, width)
    _, timesteps, context = _inputs()
    with torch.no_grad():
        assert model(latents, timesteps, context).shape == latents.shape


def test_every_output_cell_comes_from_its_own_patch_in_place() -> None:
    """Unpatchify is the inverse of patchify: changing one latent patch changes the output
    there most (the other patches see it only through attention)."""
    model = _trained_like(DiT(TINY))
    latents, timesteps, context = _inputs(batch=1)
    changed = latents.clone()
    changed[:, :, 4:6, 2:4] += 3.0  # the patch at row 2, column 1
    with torch.no_grad():
        difference = (model(changed, timesteps, context) - model(latents, timesteps, context)).abs()
    per_patch = difference.sum(dim=1).unfold(1, 2, 2).unfold(2, 2, 2).sum(dim=(-1, -2))  # (1, 4, 4)
    assert per_patch[0].argmax() == 2 * 4 + 1


def test_integer_and_float_timesteps_of_the_same_value_give_the_same_output() -> None:
    """Flow matching feeds t = σ·T as floats; the sinusoidal code takes both."""
    model = _trained_like(DiT(TINY))
    latents, _, context = _inputs()
    with torch.no_grad():
        as_long = model(latents, torch.tensor([3, 700]), context)
        as_float = model(latents, torch.tensor([3.0, 700.0]), context)
        between = model(latents, torch.tensor([3.5, 700.5]), context)
    torch.testing.assert_close(as_long, as_float)
    assert not torch.allclose(as_float, between)


def test_a_single_fractional_timestep_applies_to_the_whole_batch() -> None:
    model = _trained_like(DiT(TINY))
    latents, _, context = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(latents, 12.5, context), model(latents, torch.full((2,), 12.5), context)
        )


@pytest.mark.parametrize("context_length", [1, 7, 77])
def test_context_of_any_length_is_accepted(context_length: int) -> None:
    latents, timesteps, context = _inputs(context_length=context_length)
    with torch.no_grad():
        assert DiT(TINY)(latents, timesteps, context).shape == latents.shape


# --- conditioning and initialisation ---------------------------------------------------------


def test_the_untrained_dit_predicts_exactly_zero() -> None:
    latents, timesteps, context = _inputs()
    with torch.no_grad():
        assert torch.equal(DiT(TINY)(latents, timesteps, context), torch.zeros_like(latents))


def test_every_untrained_block_is_the_identity() -> None:
    """adaLN-Zero: gates and the cross-attention output start at zero, whatever t and text."""
    model = DiT(TINY).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for block in model.blocks:
        block.register_forward_hook(lambda _, args, out: seen.append((args[0], out)))
    latents, timesteps, context = _inputs()
    with torch.no_grad():
        model(latents, timesteps, context)
    assert len(seen) == TINY.depth
    for tokens_in, tokens_out in seen:
        assert torch.equal(tokens_in, tokens_out)


def test_output_depends_on_the_caption_and_on_the_timestep() -> None:
    model = _trained_like(DiT(TINY))
    latents, timesteps, context = _inputs()
    with torch.no_grad():
        reference = model(latents, timesteps, context)
        other_caption = model(latents, timesteps, torch.randn_like(context))
        other_time = model(latents, timesteps + 100, context)
    assert not torch.allclose(reference, other_caption, atol=1e-4)
    assert not torch.allclose(reference, other_time, atol=1e-4)


def test_masked_padding_tokens_do_not_change_the_output() -> None:
    model = _trained_like(DiT(TINY))
    latents, timesteps, context = _inputs()
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    padded_differently = torch.where(mask[..., None], context, torch.randn_like(context))
    with torch.no_grad():
        reference = model(latents, timesteps, context, context_mask=mask)
        other_padding = model(latents, timesteps, padded_differently, context_mask=mask)
    torch.testing.assert_close(reference, other_padding)


TINY_POOLED = DiTConfig(**{**TINY.to_dict(), "pooled_text": True})


def test_masked_padding_does_not_reach_the_pooled_caption_either() -> None:
    model = _trained_like(DiT(TINY_POOLED))
    latents, timesteps, context = _inputs()
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    padded_differently = torch.where(mask[..., None], context, torch.randn_like(context))
    with torch.no_grad():
        reference = model(latents, timesteps, context, context_mask=mask)
        other_padding = model(latents, timesteps, padded_differently, context_mask=mask)
    torch.testing.assert_close(reference, other_padding)


def test_pooled_text_sets_every_blocks_modulation() -> None:
    # Cross-attention aside, the caption must change what adaLN gives every block.
    model = _trained_like(DiT(TINY_POOLED))
    latents, timesteps, context = _inputs()
    seen: list[torch.Tensor] = []
    hooks = [
        block.modulation.register_forward_hook(lambda _m, _inputs, out: seen.append(out))
        for block in model.blocks
    ]
    with torch.no_grad():
        model(latents, timesteps, context)
        model(latents, timesteps, -context)
    for hook in hooks:
        hook.remove()
    first, second = seen[: len(hooks)], seen[len(hooks) :]
    for before, after in zip(first, second, strict=True):
        assert (before - after).abs().max() > 1e-4


def test_without_pooled_text_the_modulation_ignores_the_caption() -> None:
    model = _trained_like(DiT(TINY))
    latents, timesteps, context = _inputs()
    seen: list[torch.Tensor] = []
    hook = model.blocks[0].modulation.register_forward_hook(
        lambda _m, _inputs, out: seen.append(out)
    )
    with torch.no_grad():
        model(latents, timesteps, context)
        model(latents, timesteps, -context)
    hook.remove()
    torch.testing.assert_close(seen[0], seen[1])


def test_every_parameter_of_the_pooled_dit_receives_a_gradient() -> None:
    model = _trained_like(DiT(TINY_POOLED)).train()
    latents, timesteps, context = _inputs()
    model(latents, timesteps, context).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_configs_written_before_pooled_text_load_without_it() -> None:
    values = TINY.to_dict()
    del values["pooled_text"]
    assert DiTConfig.from_dict(values).pooled_text is False


def test_every_cell_of_a_grid_gets_its_own_position_code() -> None:
    code = position_code_2d(4, 6, 32, torch.device("cpu"))  # (24, 32)
    assert code.shape == (24, 32)
    distances = torch.cdist(code, code) + torch.eye(24) * 1e3
    assert distances.min() > 0.1


def test_it_overfits_one_batch() -> None:
    """A fixed batch of inputs and targets is learnt: the loss falls by 100× within 60 steps,
    and the blocks' gates open (every block trains, not only the output layer)."""
    model = DiT(DiTConfig(hidden_dim=64, depth=2, attention_head_dim=16, context_dim=CONTEXT_DIM))
    latents, timesteps, context = _inputs(batch=4)
    target = torch.randn_like(latents)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(model(latents, timesteps, context), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 100, (losses[0], losses[-1])
    assert all(block.modulation[1].weight.abs().max() > 0 for block in model.blocks)


# --- configuration and input checks -----------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_dim": 48, "attention_head_dim": 32}, r"hidden_dim=48 is not divisible by "),
        ({"hidden_dim": 18, "attention_head_dim": 3}, r"hidden_dim must be a multiple of 4"),
        ({"patch_size": 0}, r"patch_size must be a positive integer, got 0"),
        ({"depth": 2.5}, r"depth must be a positive integer, got 2\.5"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"pooled_text": True, "context_dim": 24}, r"pooled_text .* must divide context_dim=24"),
    ],
)
def test_an_impossible_config_is_refused_naming_the_key(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiTConfig(**{**TINY.to_dict(), **change})


def test_config_round_trips_through_json_and_refuses_unknown_keys() -> None:
    assert DiTConfig.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY
    with pytest.raises(ValueError, match=r"model\.dit.*patch.*did you mean .*patch_size"):
        DiTConfig.from_dict({"patch": 2})


def test_latents_the_patch_does_not_divide_are_refused_naming_patch_size() -> None:
    _, timesteps, context = _inputs()
    with pytest.raises(ValueError, match=r"divisible by patch_size=2, got 7×8"):
        DiT(TINY)(torch.randn(2, 4, 7, 8), timesteps, context)


def test_context_of_the_wrong_width_is_refused_naming_context_dim() -> None:
    latents, timesteps, _ = _inputs()
    with pytest.raises(ValueError, match=r"\(2, L, 16\).*DiTConfig\.context_dim"):
        DiT(TINY)(latents, timesteps, torch.randn(2, 5, 512))


def test_an_unknown_denoiser_name_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'transformer'.*\['dit', 'unet'\]"):
        build_denoiser("transformer", {})


# --- configs, exports, training and sampling --------------------------------------------------


def test_model_dit_selects_the_dit_with_the_text_width_of_the_unet() -> None:
    real = compose_config("train_unet", ["model=dit"])
    demo = compose_config("train_unet", ["experiment=demo"])  # the demo's denoiser is the DiT
    assert real.model.denoiser == demo.model.denoiser == "dit"
    assert real.model.dit.context_dim == real.model.unet.context_dim
    assert demo.model.dit.context_dim == demo.model.unet.context_dim != real.model.dit.context_dim
    demo_dit = DiT(DiTConfig.from_dict(plain(demo.model.dit)))
    assert count_parameters(demo_dit) < count_parameters(DiT(DiTConfig())) / 5


def test_a_patch_that_does_not_divide_the_latents_is_refused_before_any_work(tmp_path) -> None:
    cfg = compose_config(
        "train_unet", [*TINY_UNET_RUN, *TINY_DIT_RUN, "model.dit.patch_size=3"]
    )  # 32 px through a 2× VAE: 16×16 latents
    vae_metadata = {"model_config": {"latent_channels": 4, "block_channels": [16, 32]}}
    with pytest.raises(ValueError, match=r"16×16 latents.*model\.dit\.patch_size that divides 16"):
        check_inputs_fit(cfg, vae_metadata)


def test_an_unknown_denoiser_in_the_config_is_refused_before_any_work(tmp_path) -> None:
    cfg = compose_config("train_unet", ["model.denoiser=vit", "trainer=cpu"])
    with pytest.raises(ValueError, match=r"model\.denoiser must be one of"):
        check_run_config(cfg, tmp_path / "run")


def test_the_export_records_the_dit_and_loads_it_back_with_the_same_outputs(tmp_path) -> None:
    module = tiny_diffusion_module(
        unet={**TINY.to_dict(), "context_dim": TINY_CONTEXT[1]}, denoiser="dit"
    )
    _trained_like(module.unet)
    _trained_like(module.ema.module)
    export_dir = save_unet_export(tmp_path / "export", module.export())
    assert read_unet_metadata(export_dir)["denoiser"] == "dit"
    latents, timesteps, _ = _inputs(batch=2)
    context = torch.randn(2, *TINY_CONTEXT)
    for weights, trained in (("raw", module.unet), ("ema", module.ema.module)):
        loaded, _ = load_unet_export(export_dir, weights=weights)
        assert isinstance(loaded, DiT)
        with torch.no_grad():
            torch.testing.assert_close(
                loaded(latents, timesteps, context), trained.eval()(latents, timesteps, context)
            )
    # A checkpoint carries the same export.
    checkpoint = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "last.ckpt")
    carried = read_checkpoint_export(tmp_path / "last.ckpt")
    from_checkpoint = unet_from_export(carried.metadata, carried.weights["ema"], source="ckpt")
    assert denoiser_name(from_checkpoint) == "dit"


def test_an_export_from_before_the_dit_loads_as_a_unet(tmp_path) -> None:
    module = tiny_diffusion_module()  # the U-Net
    export = module.export()
    assert export.metadata.pop("denoiser") == "unet"  # what older exports lack
    loaded = unet_from_export(export.metadata, export.weights["raw"], source="older export")
    assert isinstance(loaded, UNet)


def test_model_denoiser_dit_trains_through_stage_2_and_samples(
    tmp_path: Path, synthetic_root: Path
) -> None:
    vae_export = save_tiny_vae_export(tmp_path / "vae" / "export")
    overrides = [
        *TINY_UNET_RUN,
        *TINY_DIT_RUN,
        *synthetic_run_overrides(synthetic_root, tmp_path),
        f"vae_export={vae_export}",
        "data.batch_size=8",
        "trainer.max_steps=3",
        "trainer.limit_val_batches=1",
        "validation.prompts=[a red circle]",
        "validation.sampling.steps=2",
        "evaluation.every_n_steps=null",
        "cache.text_max_positions=8",
        "logger=none",
    ]
    result = run_unet_stage(compose_config("train_unet", overrides), tmp_path / "runs" / "dit")
    checkpoint = load_unet_for_sampling(result.export_dir)
    assert isinstance(checkpoint.unet, DiT)
    assert any(block.modulation[1].weight.any() for block in checkpoint.unet.blocks)

    sample = compose_config(
        "sample",
        [
            f"ckpt={result.export_dir}",
            f"out_dir={tmp_path / 'samples'}",
            "trainer=cpu",
            "prompt='a red circle'",
            "n=2",
            "steps=3",
            "progress=false",
        ],
    )
    images = run_sampling(sample).image_paths
    assert len(images) == 2
    pixels = np.asarray(Image.open(images[0]).convert("RGB"))
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0
