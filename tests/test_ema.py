"""Specification of the weight EMA: warmup schedule, update rule, swap-in, checkpointing."""

import pytest
import torch
from torch import nn

from ldm.training.ema import EMA


def _model_with_weights(value: float) -> nn.Module:
    """One weight, one bias and one float buffer, all set to `value`."""
    model = nn.Linear(1, 1)
    model.register_buffer("running", torch.zeros(1))
    _set(model, value)
    return model


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(value)


def _values(model: nn.Module) -> list[float]:
    return [tensor.item() for tensor in [*model.parameters(), *model.buffers()]]


def _warmup_decay(step: int, power: float = 0.75) -> float:
    return 1.0 - (1.0 + step) ** -power


# --- decay schedule -----------------------------------------------------------------------


def test_decay_starts_at_zero_and_rises_with_the_step() -> None:
    ema = EMA(_model_with_weights(0.0))
    decays = [ema.decay_at(step) for step in (0, 1, 10, 100, 1000)]
    assert decays[0] == 0.0
    assert decays[1] < 0.5
    assert decays == sorted(decays)


def test_decay_never_exceeds_decay_max() -> None:
    ema = EMA(_model_with_weights(0.0), decay_max=0.999)
    assert ema.decay_at(10_000_000) == 0.999


def test_decay_reports_the_latest_step_for_logging() -> None:
    model = _model_with_weights(0.0)
    ema = EMA(model)
    for _ in range(3):
        ema.update(model)
    assert ema.decay == pytest.approx(_warmup_decay(2))


@pytest.mark.parametrize(
    "arguments",
    [{"decay_max": 1.0}, {"warmup_power": 0.0}, {"warmup_inv_gamma": -1.0}, {"update_every": 0}],
)
def test_invalid_settings_are_refused(arguments: dict) -> None:
    with pytest.raises(ValueError, match="ema\\."):
        EMA(_model_with_weights(0.0), **arguments)


# --- update rule --------------------------------------------------------------------------


def test_updates_match_a_hand_computed_average() -> None:
    model = _model_with_weights(0.0)
    ema = EMA(model)
    expected = None
    for step, weight in enumerate([2.0, 4.0, 8.0]):
        _set(model, weight)
        ema.update(model)
        decay = _warmup_decay(step)  # 0, then 1 - 2^-0.75, then 1 - 3^-0.75
        expected = weight if expected is None else decay * expected + (1 - decay) * weight
    assert _values(ema.module) == pytest.approx([expected] * 3)


def test_first_update_copies_the_model_because_warmup_starts_at_zero_decay() -> None:
    model = _model_with_weights(0.0)
    ema = EMA(model)
    _set(model, 5.0)
    ema.update(model)
    assert _values(ema.module) == [5.0, 5.0, 5.0]


def test_updating_every_k_steps_raises_the_decay_to_the_kth_power() -> None:
    model = _model_with_weights(1.0)
    ema = EMA(model, update_every=2)
    ema.update(model)  # step 0: copies 1.0
    _set(model, 3.0)
    ema.update(model)  # step 1: skipped
    assert _values(ema.module) == [1.0, 1.0, 1.0]
    ema.update(model)  # step 2: averages with decay(2)^2
    decay = _warmup_decay(2) ** 2
    assert _values(ema.module) == pytest.approx([decay * 1.0 + (1 - decay) * 3.0] * 3)


def test_a_model_with_a_different_architecture_is_refused() -> None:
    ema = EMA(_model_with_weights(0.0))
    with pytest.raises(ValueError, match="differ from the one the EMA was built from"):
        ema.update(nn.Linear(2, 1))


def test_averaged_copy_is_frozen_and_stays_in_eval_mode() -> None:
    ema = EMA(nn.Sequential(nn.Linear(1, 1), nn.Dropout(0.5)))
    ema.train()
    assert not ema.module.training
    assert not any(parameter.requires_grad for parameter in ema.module.parameters())


# --- swap-in ------------------------------------------------------------------------------


def test_swapped_in_puts_the_average_in_the_live_model_and_restores_it_exactly() -> None:
    model = _model_with_weights(1.0)
    ema = EMA(model)
    ema.update(model)
    _set(model, 1.0 + 1e-7)  # a value the restore must keep bit-for-bit
    live_before = [tensor.clone() for tensor in [*model.parameters(), *model.buffers()]]
    with ema.swapped_in(model) as swapped:
        assert swapped is model
        assert _values(model) == [1.0, 1.0, 1.0]
    for tensor, before in zip([*model.parameters(), *model.buffers()], live_before, strict=True):
        assert torch.equal(tensor, before)


def test_swapped_in_restores_the_live_weights_even_when_evaluation_fails() -> None:
    model = _model_with_weights(2.0)
    ema = EMA(model)
    ema.update(model)
    _set(model, 3.0)
    with pytest.raises(RuntimeError, match="evaluation failed"), ema.swapped_in(model):
        raise RuntimeError("evaluation failed")
    assert _values(model) == [3.0, 3.0, 3.0]


# --- checkpointing ------------------------------------------------------------------------


def test_state_dict_round_trip_keeps_weights_and_step_count() -> None:
    model = _model_with_weights(0.0)
    ema = EMA(model)
    for weight in (1.0, 2.0, 3.0):
        _set(model, weight)
        ema.update(model)

    restored = EMA(_model_with_weights(-1.0))
    restored.load_state_dict(ema.state_dict())

    assert restored.steps_seen == 3
    assert _values(restored.module) == _values(ema.module)
    _set(model, 4.0)
    ema.update(model)
    restored.update(model)
    assert _values(restored.module) == _values(ema.module)
