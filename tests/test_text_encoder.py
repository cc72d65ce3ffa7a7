"""Specification of the frozen open_clip text encoder: shapes, determinism, frozenness, weights."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import huggingface_hub
import open_clip
import pytest
import torch
from helpers import TINY_CLIP, TINY_CLIP_CONFIG
from torch import nn

from ldm.text import (
    FrozenTextEncoder,
    TextEncoderConfig,
    TextEncoderWeightsUnavailableError,
)
from ldm.text.quiet import OpenClipChatter

PROMPTS = ["a small red circle on a blue background", "two dogs playing in the snow"]


def tiny_config(**changes: object) -> TextEncoderConfig:
    return TextEncoderConfig(**{"model_name": TINY_CLIP, "pretrained": None, **changes})


@pytest.fixture(scope="module")
def tiny_encoder() -> FrozenTextEncoder:
    return FrozenTextEncoder(tiny_config())


@pytest.fixture(scope="module")
def vit_b_32() -> FrozenTextEncoder:
    return FrozenTextEncoder(TextEncoderConfig(pretrained=None))


def test_vit_b_32_gives_77_hidden_states_of_width_512_and_a_pooled_embedding(
    vit_b_32: FrozenTextEncoder,
) -> None:
    embedding = vit_b_32.encode(PROMPTS)
    assert vit_b_32.width == 512
    assert embedding.hidden_states.shape == (2, 77, 512)
    assert embedding.pooled.shape == (2, 512)
    assert embedding.hidden_states.dtype == torch.float32


def test_token_lengths_count_start_and_end_markers(tiny_encoder: FrozenTextEncoder) -> None:
    embedding = tiny_encoder.encode(["", "cat", "a cat"])
    assert embedding.token_lengths.tolist() == [2, 3, 4]


def test_random_init_depends_on_the_seed_alone_not_the_global_random_state() -> None:
    torch.manual_seed(1)
    first = FrozenTextEncoder(tiny_config(seed=7)).encode(PROMPTS).hidden_states
    torch.manual_seed(2)
    second = FrozenTextEncoder(tiny_config(seed=7)).encode(PROMPTS).hidden_states
    assert torch.equal(first, second)


def test_random_init_differs_between_seeds() -> None:
    first = FrozenTextEncoder(tiny_config(seed=7)).encode(PROMPTS).hidden_states
    second = FrozenTextEncoder(tiny_config(seed=8)).encode(PROMPTS).hidden_states
    assert not torch.allclose(first, second)


def test_building_the_encoder_leaves_the_global_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    FrozenTextEncoder(tiny_config())
    assert torch.equal(torch.rand(3), expected)


def test_random_init_is_announced_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm.text"):
        FrozenTextEncoder(tiny_config())
    assert "RANDOM initialisation" in caplog.text


def test_open_clip_chatter_is_dropped_and_the_random_init_warning_given_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    open_clip_dir = str(Path(open_clip.__file__).parent)
    with caplog.at_level(logging.INFO):
        FrozenTextEncoder(tiny_config())
    assert [r.getMessage() for r in caplog.records if r.pathname.startswith(open_clip_dir)] == []
    assert caplog.text.count("RANDOM initialisation") == 1


def test_open_clip_warnings_other_than_the_random_init_one_still_pass() -> None:
    factory = str(Path(open_clip.__file__).parent / "factory.py")

    def passes(level: int, message: str, pathname: str = factory) -> bool:
        record = logging.LogRecord("root", level, pathname, 1, message, (), None)
        return OpenClipChatter().filter(record)

    assert passes(logging.WARNING, "Multiple checkpoints found in /x. Using 'a.bin'.")
    assert not passes(logging.INFO, "Loaded built-in ViT-B-32 model config.")
    assert not passes(logging.WARNING, "No pretrained weights loaded for model 'x'.")
    assert passes(logging.INFO, "a line of the user's own", pathname=__file__)


def test_building_the_encoder_leaves_the_root_logger_as_it_found_it() -> None:
    root = logging.getLogger()
    handlers, filters = list(root.handlers), list(root.filters)
    root.handlers.clear()  # as in a plain script: open_clip must not basicConfig it
    try:
        FrozenTextEncoder(tiny_config())
        assert (root.handlers, root.filters) == ([], filters)
    finally:
        root.handlers[:] = handlers


def test_vision_tower_is_not_kept(tiny_encoder: FrozenTextEncoder) -> None:
    assert not hasattr(tiny_encoder.model, "visual")


def test_no_parameter_requires_grad_and_outputs_carry_no_graph(
    tiny_encoder: FrozenTextEncoder,
) -> None:
    assert not any(parameter.requires_grad for parameter in tiny_encoder.parameters())
    assert not tiny_encoder.encode(PROMPTS).hidden_states.requires_grad


class _ModelUsingTheEncoder(nn.Module):
    def __init__(self, encoder: FrozenTextEncoder) -> None:
        super().__init__()
        self.text_encoder = encoder
        self.head = nn.Linear(encoder.width, 1)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.head(self.text_encoder.encode(prompts).hidden_states).mean()


def test_optimizer_step_on_a_model_using_its_outputs_leaves_its_weights_unchanged() -> None:
    model = _ModelUsingTheEncoder(FrozenTextEncoder(tiny_config()))
    before = {k: v.clone() for k, v in model.text_encoder.model.state_dict().items()}
    head_before = model.head.weight.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    model(PROMPTS).backward()
    optimizer.step()
    after = model.text_encoder.model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert not torch.equal(model.head.weight, head_before)  # the step did happen


def test_encoder_stays_in_eval_mode_when_its_parent_is_put_in_training_mode() -> None:
    model = _ModelUsingTheEncoder(FrozenTextEncoder(tiny_config()))
    model.train()
    assert model.head.training
    assert not model.text_encoder.training
    assert not any(module.training for module in model.text_encoder.modules())


def test_parent_state_dict_leaves_the_encoder_out_and_strict_loading_still_works() -> None:
    model = _ModelUsingTheEncoder(FrozenTextEncoder(tiny_config()))
    state = model.state_dict()
    assert sorted(state) == ["head.bias", "head.weight"]
    fresh = _ModelUsingTheEncoder(FrozenTextEncoder(tiny_config()))
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_hidden_states_are_float32_under_a_bf16_autocast(tiny_encoder: FrozenTextEncoder) -> None:
    expected = tiny_encoder.encode(PROMPTS).hidden_states
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = tiny_encoder.encode(PROMPTS).hidden_states
    assert found.dtype == torch.float32
    assert torch.equal(found, expected)


def test_tokens_match_open_clip_including_truncation_of_long_prompts(
    tiny_encoder: FrozenTextEncoder,
) -> None:
    prompts = [*PROMPTS, "word " * 100, ""]
    expected = open_clip.get_tokenizer(TINY_CLIP)(prompts)
    assert torch.equal(tiny_encoder.tokenize(prompts), expected)


def test_prompts_longer_than_max_length_are_truncated_with_a_warning(
    tiny_encoder: FrozenTextEncoder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm.text"):
        embedding = tiny_encoder.encode(["word " * 100, "short"])
    assert "1 of 2 prompts are longer than text_encoder.max_length=77" in caplog.text
    assert embedding.token_lengths.tolist() == [77, 3]


def test_a_shorter_max_length_cuts_prompts_and_hidden_states() -> None:
    encoder = FrozenTextEncoder(tiny_config(max_length=8))
    embedding = encoder.encode(["one two three four five six seven eight nine"])
    assert embedding.hidden_states.shape[1] == 8
    assert embedding.token_lengths.tolist() == [8]


def test_a_single_string_is_refused_with_a_hint_to_pass_a_list(
    tiny_encoder: FrozenTextEncoder,
) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        tiny_encoder.encode("a red circle")  # type: ignore[arg-type]


def test_first_positions_computed_alone_equal_those_of_the_full_encoding(
    tiny_encoder: FrozenTextEncoder,
) -> None:
    full = tiny_encoder.encode(PROMPTS).hidden_states
    first_ten = tiny_encoder.encode_hidden_states(PROMPTS, num_positions=10)
    assert first_ten.shape == (2, 10, tiny_encoder.width)
    torch.testing.assert_close(first_ten, full[:, :10], rtol=0, atol=1e-5)


def test_empty_prompt_hidden_states_are_computed_once_and_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoder = FrozenTextEncoder(tiny_config())
    calls = []
    original = encoder.encode
    monkeypatch.setattr(
        encoder, "encode", lambda prompts: calls.append(prompts) or original(prompts)
    )
    first = encoder.empty_prompt_hidden_states()
    second = encoder.empty_prompt_hidden_states()
    assert calls == [[""]]
    assert first.shape == (1, 77, encoder.width)
    assert torch.equal(first, second)
    assert torch.equal(first, original([""]).hidden_states)


def test_weights_file_loads_the_checkpoint_it_names(tmp_path: Path) -> None:
    torch.manual_seed(2024)
    reference = open_clip.create_model(TINY_CLIP).eval()
    weights_file = tmp_path / "clip.pt"
    torch.save(reference.state_dict(), weights_file)

    encoder = FrozenTextEncoder(tiny_config(weights_file=weights_file))

    tokens = open_clip.get_tokenizer(TINY_CLIP)(PROMPTS)
    with torch.no_grad():
        expected = reference.encode_text(tokens)
    torch.testing.assert_close(encoder.encode(PROMPTS).pooled, expected, rtol=0, atol=1e-5)
    random_init = FrozenTextEncoder(tiny_config()).encode(PROMPTS).pooled
    assert not torch.allclose(random_init, expected)


def test_weights_file_for_another_architecture_is_refused_naming_the_model(
    tmp_path: Path,
) -> None:
    weights_file = tmp_path / "clip.pt"
    torch.save(open_clip.create_model(TINY_CLIP).state_dict(), weights_file)
    with pytest.raises(ValueError, match="does not hold weights for open_clip model 'ViT-B-32'"):
        FrozenTextEncoder(TextEncoderConfig(weights_file=weights_file))


def test_missing_weights_file_is_reported_with_the_config_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"text_encoder\.weights_file=.*does not exist"):
        FrozenTextEncoder(tiny_config(weights_file=tmp_path / "absent.bin"))


def test_offline_download_fails_fast_with_a_message_naming_the_way_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    started = time.perf_counter()
    with pytest.raises(TextEncoderWeightsUnavailableError) as raised:
        FrozenTextEncoder(TextEncoderConfig(pretrained="laion2b_s34b_b79k"))
    assert time.perf_counter() - started < 10
    message = str(raised.value)
    assert "text_encoder.weights_file" in message
    assert "HF_HUB_OFFLINE" in message
    assert "laion2b_s34b_b79k" in message


def test_unknown_pretrained_tag_is_refused_listing_the_known_tags() -> None:
    with pytest.raises(ValueError, match=r"known tags: .*laion2b_s34b_b79k"):
        FrozenTextEncoder(TextEncoderConfig(pretrained="no-such-tag"))


def test_unknown_model_name_is_refused_at_config_time() -> None:
    with pytest.raises(ValueError, match="not an open_clip model"):
        TextEncoderConfig(model_name="ViT-B-33")


def test_fingerprint_tells_weight_sources_apart(tmp_path: Path) -> None:
    weights_file = tmp_path / "weights.bin"
    weights_file.write_bytes(b"not really weights")
    fingerprints = [
        tiny_config(seed=0).fingerprint(),
        tiny_config(seed=1).fingerprint(),
        tiny_config(pretrained="laion2b_s34b_b79k").fingerprint(),
        tiny_config(weights_file=weights_file).fingerprint(),
        tiny_config(max_length=32).fingerprint(),
    ]
    assert len({json.dumps(f, sort_keys=True) for f in fingerprints}) == len(fingerprints)
    assert tiny_config(seed=0).fingerprint() == tiny_config(seed=0).fingerprint()


def test_unknown_config_keys_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"text_encoder\.pretrainde=None: did you mean .*pretrained\?"
    ):
        TextEncoderConfig.from_dict({"pretrainde": None})


def test_clip_skip_takes_the_states_of_an_earlier_block_through_the_final_norm(
    tiny_encoder: FrozenTextEncoder,
) -> None:
    model = tiny_encoder.model
    tokens = tiny_encoder.tokenize(PROMPTS)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        if not model.transformer.batch_first:
            x = x.transpose(0, 1)
        x = model.transformer.resblocks[0](x, attn_mask=model.attn_mask)
        if not model.transformer.batch_first:
            x = x.transpose(0, 1)
        after_first_block = model.ln_final(x)
    num_layers = len(model.transformer.resblocks)
    skipping = FrozenTextEncoder(tiny_config(clip_skip=num_layers - 1))
    torch.testing.assert_close(skipping.encode(PROMPTS).hidden_states, after_first_block)


def test_skipping_every_block_leaves_each_word_blind_to_the_words_before_it() -> None:
    """With every block skipped a state is its word and position alone: "circle" after "red"
    equals "circle" after "blue". Through the blocks it depends on the words before it."""
    prompts = ["a red circle", "a blue circle"]
    circle = 3  # start marker, "a", colour, "circle"
    full = FrozenTextEncoder(tiny_config()).encode(prompts).hidden_states
    num_layers = TINY_CLIP_CONFIG["text_cfg"]["layers"]
    embeddings_only = FrozenTextEncoder(tiny_config(clip_skip=num_layers))
    states = embeddings_only.encode(prompts).hidden_states
    torch.testing.assert_close(states[0, circle], states[1, circle])
    assert not torch.allclose(states[0, circle - 1], states[1, circle - 1])
    assert not torch.allclose(full[0, circle], full[1, circle], atol=1e-4)


def test_clip_skip_beyond_the_towers_depth_is_refused_naming_the_range() -> None:
    with pytest.raises(ValueError, match=r"text_encoder\.clip_skip=9 skips more .* use 0\.\.2"):
        FrozenTextEncoder(tiny_config(clip_skip=9))
    with pytest.raises(ValueError, match=r"text_encoder\.clip_skip must be a non-negative"):
        tiny_config(clip_skip=-1)


def test_clip_skip_changes_the_fingerprint_but_zero_keeps_the_one_caches_were_built_with() -> None:
    assert tiny_config(clip_skip=1).fingerprint() != tiny_config().fingerprint()
    assert set(tiny_config().fingerprint()) == {"model_name", "max_length", "weights"}


def test_an_export_written_before_clip_skip_existed_loads_with_every_layer() -> None:
    older = {"model_name": "ViT-B-32", "pretrained": None, "weights_file": None}
    assert TextEncoderConfig.from_dict({**older, "max_length": 77, "seed": 0}).clip_skip == 0
