"""Specification of the text refiner (`model.<denoiser>.text_refiner_layers`): trainable
bidirectional layers over the frozen, causal caption states, in front of either denoiser."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from ldm.models.denoiser import build_denoiser
from ldm.models.dit import DiT, DiTConfig
from ldm.models.text_refiner import TextRefiner
from ldm.models.unet import UNet, UNetConfig

CONTEXT_DIM = 16
TINY_DIT = DiTConfig(
    hidden_dim=32, depth=2, attention_head_dim=16, context_dim=CONTEXT_DIM, text_refiner_layers=1
)
TINY_UNET = UNetConfig(
    model_channels=16,
    channel_multipliers=(1, 2),
    res_blocks_per_level=1,
    transformer_levels=(1,),
    attention_head_dim=8,
    context_dim=CONTEXT_DIM,
    norm_groups=4,
    text_refiner_layers=2,
)
CONFIGS = [TINY_DIT, TINY_UNET]
IDS = ["dit", "unet"]


@pytest.fixture(autouse=True)
def _seeded_on_one_thread() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trained_like(module: torch.nn.Module) -> torch.nn.Module:
    """Zero-initialised layers given random weights, as training would: a fresh refiner's
    residual branches are zero and hide everything inside."""
    with torch.no_grad():
        for parameter in module.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    return module.eval()


def _build(config: DiTConfig | UNetConfig) -> DiT | UNet:
    return build_denoiser("dit" if isinstance(config, DiTConfig) else "unet", config.to_dict())


def _refiner(layers: int = 2) -> TextRefiner:
    return TextRefiner(CONTEXT_DIM, width=32, layers=layers, head_dim=8, dropout=0.0)


def test_a_token_sees_the_words_after_it() -> None:
    """The frozen encoder is causal; the refiner is what lets an early colour word learn that a
    later one says 'background'."""
    refiner = _trained_like(_refiner())
    context = torch.randn(1, 6, CONTEXT_DIM)
    changed_last_word = context.clone()
    changed_last_word[:, -1] = torch.randn(CONTEXT_DIM)
    with torch.no_grad():
        first = refiner(context, None)[:, 0]
        first_after_change = refiner(changed_last_word, None)[:, 0]
    assert (first - first_after_change).abs().max() > 1e-3


def test_padding_never_reaches_a_real_token() -> None:
    refiner = _trained_like(_refiner())
    context = torch.randn(2, 6, CONTEXT_DIM)
    mask = torch.tensor([[True] * 3 + [False] * 3, [True] * 5 + [False]])
    padded_differently = torch.where(mask[..., None], context, torch.randn_like(context))
    with torch.no_grad():
        reference = refiner(context, mask)
        other_padding = refiner(padded_differently, mask)
    torch.testing.assert_close(reference[mask], other_padding[mask])


def test_an_untrained_refiner_only_maps_the_states_to_its_width() -> None:
    """Its residual branches start at zero: training starts from the frozen states, linearly
    mapped to the denoiser's attention width."""
    refiner = _refiner().eval()
    context = torch.randn(2, 5, CONTEXT_DIM)
    with torch.no_grad():
        torch.testing.assert_close(refiner(context, None), refiner.proj_in(context))
    assert refiner.out_dim == 32


def test_no_layers_pass_the_states_through_and_add_no_parameters() -> None:
    refiner = _refiner(layers=0)
    context = torch.randn(2, 5, CONTEXT_DIM)
    assert torch.equal(refiner(context, None), context)
    assert refiner.out_dim == CONTEXT_DIM
    assert list(refiner.parameters()) == []


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_the_denoiser_attends_to_the_refined_states_at_its_own_width(config) -> None:
    model = _trained_like(_build(config))
    assert config.attended_context_dim != CONTEXT_DIM
    key_widths = {
        module.to_k.in_features
        for name, module in model.named_modules()
        if name.endswith("cross_attention")
    }
    assert key_widths == {config.attended_context_dim}
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 5, CONTEXT_DIM)
    with torch.no_grad():
        reference = model(latents, torch.tensor([3, 7]), context)
        other_last_word = context.clone()
        other_last_word[:, -1] = torch.randn(CONTEXT_DIM)
        changed = model(latents, torch.tensor([3, 7]), other_last_word)
    assert reference.shape == latents.shape
    assert (reference - changed).abs().max() > 1e-4


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_every_refiner_parameter_receives_a_gradient(config) -> None:
    model = _trained_like(_build(config)).train()
    latents = torch.randn(2, 4, 8, 8)
    model(latents, torch.tensor([3, 7]), torch.randn(2, 5, CONTEXT_DIM)).square().mean().backward()
    refiner_parameters = list(model.text_refiner.named_parameters())
    assert refiner_parameters
    assert [name for name, p in refiner_parameters if p.grad is None or not p.grad.any()] == []


@pytest.mark.parametrize("config_class", [DiTConfig, UNetConfig])
def test_configs_written_before_the_refiner_load_without_it(config_class) -> None:
    values = config_class(context_dim=CONTEXT_DIM).to_dict()
    del values["text_refiner_layers"]
    config = config_class.from_dict(values)
    assert config.text_refiner_layers == 0
    assert config.attended_context_dim == CONTEXT_DIM


@pytest.mark.parametrize("config_class", [DiTConfig, UNetConfig])
@pytest.mark.parametrize("layers", [-1, 1.5, True])
def test_a_bad_refiner_depth_is_refused_naming_the_key(config_class, layers) -> None:
    with pytest.raises(ValueError, match="text_refiner_layers"):
        config_class(text_refiner_layers=layers)
