"""Tests for mlm_core.model: config validation, masking/padding semantics, the tie,
equivalence with transformers.BertForMaskedLM, and that a tiny model can overfit."""

from __future__ import annotations

import pydantic
import pytest
import torch
import torch.nn.functional as F

from mlm_core.model import (
    BertForMaskedLM,
    ModelConfig,
    hf_config_dict,
    to_hf_state_dict,
)

V, H = 50, 32
MASK_ID = 4  # arbitrary non-pad id standing in for [MASK]


def tiny_config(**overrides) -> ModelConfig:
    kwargs = dict(vocab_size=V, hidden_size=H, num_layers=2, num_heads=4, intermediate_size=64,
                  max_position_embeddings=32)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def make_model(seed: int = 0, **overrides) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(tiny_config(**overrides))


def padded_batch(seed: int = 0):
    """Two sequences of length 12, the second padded after 7 tokens; a few labels on each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = 0  # pad id
    labels = torch.full((2, 12), -100)
    labels[0, [1, 5, 9]] = torch.randint(5, V, (3,), generator=g)
    labels[1, [2, 6]] = torch.randint(5, V, (2,), generator=g)
    types = torch.zeros(2, 12, dtype=torch.long)
    types[:, 6:] = 1
    return ids, mask, types, labels


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        (dict(hidden_size=130, num_heads=4), ["hidden_size (130)", "num_heads (4)"]),
        (dict(vocab_size=3), ["vocab_size"]),
        (dict(num_layers=0), ["num_layers"]),
        (dict(intermediate_size=-1), ["intermediate_size"]),
        (dict(dropout=1.0), ["dropout"]),
        (dict(attention_dropout=-0.1), ["attention_dropout"]),
        (dict(pad_token_id=V), ["pad_token_id (50)", "vocab_size (50)"]),
        (dict(hiden_size=64), ["hiden_size"]),  # typo must not pass silently (extra="forbid")
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, fragments):
    with pytest.raises(ValueError) as exc:
        tiny_config(**overrides)
    for fragment in fragments:
        assert fragment in str(exc.value)


def test_config_defaults_frozen_and_documented():
    cfg = ModelConfig(vocab_size=100)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.pad_token_id) == (128, 2, 2, 0)
    with pytest.raises(pydantic.ValidationError):
        cfg.hidden_size = 64
    assert all(f.description for f in ModelConfig.model_fields.values())


# ----------------------------------------------------------------------------- shapes and loss


def test_shapes_and_no_loss_without_labels():
    model = make_model().eval()
    ids, mask, types, _ = padded_batch()
    logits, loss = model(ids, attention_mask=mask, token_type_ids=types)
    assert logits.shape == (2, 12, V)
    assert loss is None
    assert model.encode(ids, mask, types).shape == (2, 12, H)
    assert model(ids)[0].shape == (2, 12, V)  # mask and types are optional


def test_sequence_longer_than_position_table_is_rejected():
    model = make_model()
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.ones(1, 33, dtype=torch.long))


def test_loss_is_cross_entropy_over_labelled_positions_only():
    model = make_model().eval()
    ids, mask, types, labels = padded_batch()
    logits, loss = model(ids, mask, types, labels)
    scored = labels != -100
    expected = F.cross_entropy(logits[scored], labels[scored])
    torch.testing.assert_close(loss, expected)


def test_padding_content_does_not_leak_into_real_positions():
    model = make_model().eval()
    ids, mask, types, labels = padded_batch()
    other = ids.clone()
    other[1, 7:] = torch.arange(10, 15)  # different junk under attention_mask == 0
    with torch.no_grad():
        logits_a, loss_a = model(ids, mask, types, labels)
        logits_b, loss_b = model(other, mask, types, labels)
    real = mask.bool()
    torch.testing.assert_close(logits_a[real], logits_b[real])
    torch.testing.assert_close(loss_a, loss_b)


def test_padding_invariance_alone_vs_padded_in_batch():
    model = make_model().eval()
    ids, mask, types, _ = padded_batch()
    with torch.no_grad():
        batched = model(ids, mask, types)[0][1, :7]
        alone = model(ids[1:, :7], mask[1:, :7], types[1:, :7])[0][0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-4)


def test_no_scored_position_gives_zero_loss_with_grad():
    model = make_model()
    ids, mask, types, _ = padded_batch()
    _, loss = model(ids, mask, types, torch.full_like(ids, -100))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()  # must not raise and must not produce NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ----------------------------------------------------------------------------- params and init


def test_weights_tied_and_padding_row_zero_at_init():
    model = make_model(pad_token_id=3)
    word = model.embeddings.word.weight
    assert model.head.decoder.weight is word
    assert model.head.decoder.weight.data_ptr() == word.data_ptr()
    assert torch.count_nonzero(word[3]) == 0
    assert torch.count_nonzero(word[0]) > 0
    assert torch.count_nonzero(model.head.decoder.bias) == 0


def test_gradient_reaches_every_parameter():
    model = make_model()
    ids, mask, types, labels = padded_batch()
    _, loss = model(ids, mask, types, labels)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_num_parameters_counts_tied_weight_once():
    model = make_model()
    n = model.num_parameters()
    assert n == sum(p.numel() for p in set(model.parameters()))
    embedding_tables = (V + 32 + 2) * H  # word + position + token type
    assert model.num_parameters(exclude_embeddings=True) == n - embedding_tables


# ----------------------------------------------------------------------------- HF reference


@pytest.fixture
def hf_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the reference model is built locally, never fetched
    return pytest.importorskip("transformers")


def test_same_weights_same_logits_as_transformers(hf_transformers):
    cfg = tiny_config(pad_token_id=1)
    torch.manual_seed(0)
    ours = BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        # Perturb everything: at init the LN/bias values are trivial and activations so small
        # that e.g. the tanh-GELU approximation or a swapped LN mapping would go unnoticed.
        for p in ours.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ref = hf_transformers.BertForMaskedLM(hf_transformers.BertConfig(**hf_config_dict(cfg))).eval()
    result = ref.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert ref.cls.predictions.decoder.weight is ref.bert.embeddings.word_embeddings.weight

    ids, mask, types, labels = padded_batch(seed=1)
    ids[1, 7:] = 1
    with torch.no_grad():
        logits, loss = ours(ids, mask, types, labels)
        out = ref(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(logits[real], out.logits[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-4)


def test_hf_state_dict_has_exactly_the_reference_keys_and_shapes(hf_transformers):
    cfg = tiny_config()
    converted = to_hf_state_dict(make_model().state_dict(), cfg)
    ref = hf_transformers.BertForMaskedLM(hf_transformers.BertConfig(**hf_config_dict(cfg)))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_hf_state_dict_rejects_unknown_keys():
    cfg = tiny_config()
    sd = dict(make_model().state_dict())
    sd["layers.0.surprise.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="surprise"):
        to_hf_state_dict(sd, cfg)


# ----------------------------------------------------------------------------- learning


def test_tiny_model_overfits_fixed_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      max_position_embeddings=16, dropout=0.0, attention_dropout=0.0)
    model = BertForMaskedLM(cfg)
    targets = torch.randint(5, V, (4, 16))
    labelled = torch.rand(4, 16) < 0.15
    labelled[:, 3] = True  # at least one scored position per sequence
    ids = targets.masked_fill(labelled, MASK_ID)
    labels = targets.masked_fill(~labelled, -100)

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        _, loss = model(ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"overfit: initial loss {losses[0]:.4f}, final loss {losses[-1]:.4f}")
    assert losses[-1] < 0.2 * losses[0]
