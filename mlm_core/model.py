"""
A BERT masked language model, written from scratch in one file.

The architecture is the original post-LayerNorm BERT (Devlin et al., 2019), kept
parameter-for-parameter compatible with Hugging Face's `BertForMaskedLM` so that a
trained checkpoint can be exported with `to_hf_state_dict` + `hf_config_dict`.
Nothing here imports `transformers`.

Reading order: config -> embeddings -> attention -> layer -> MLM head -> full model
-> export helpers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

IGNORE_INDEX = -100  # label value for positions that are not scored (F.cross_entropy's default)


class ModelConfig(BaseModel):
    """Hyperparameters of the model. Frozen, so one config object can be shared safely."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    vocab_size: int = Field(gt=5, description="Number of token ids, special tokens included.")
    hidden_size: int = Field(128, gt=0, description="Width of every hidden state (H).")
    num_layers: int = Field(2, gt=0, description="Number of transformer layers.")
    num_heads: int = Field(2, gt=0, description="Attention heads per layer; must divide hidden_size.")
    intermediate_size: int = Field(512, gt=0, description="Inner width of the feed-forward block.")
    max_position_embeddings: int = Field(
        128, gt=0, description="Longest sequence the learned position table can encode."
    )
    type_vocab_size: int = Field(2, gt=0, description="Number of token-type (segment) ids.")
    dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Dropout on embeddings and on every residual branch."
    )
    attention_dropout: float = Field(
        0.1, ge=0.0, lt=1.0, description="Dropout on the attention probabilities."
    )
    layer_norm_eps: float = Field(1e-12, gt=0.0, description="Epsilon of every LayerNorm.")
    initializer_range: float = Field(
        0.02, gt=0.0, description="Standard deviation of the normal weight initialisation."
    )
    pad_token_id: int = Field(
        0, ge=0, description="Id of the padding token; its embedding row starts at zero."
    )
    tie_word_embeddings: bool = Field(
        True, description="The output projection is the word embedding table (False: its own weight, "
        "as some published checkpoints have)."
    )

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(
                f"pad_token_id ({self.pad_token_id}) must be smaller than vocab_size ({self.vocab_size})"
            )
        return self


# ----------------------------------------------------------------------------- modules


class Embeddings(nn.Module):
    """word + learned absolute position + token type, summed, then LayerNorm and dropout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H = config.hidden_size
        # padding_idx keeps the lookup from sending gradient into the pad row (as HF does)
        self.word = nn.Embedding(config.vocab_size, H, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, H)
        self.token_type = nn.Embedding(config.type_vocab_size, H)
        self.ln = nn.LayerNorm(H, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if position_ids is None:  # packed rows pass their own, restarting at each sentence
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)  # (B, T, H)
        return self.drop(self.ln(x))


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with one fused q/k/v projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.num_heads = config.num_heads
        # one (H -> 3H) matmul instead of three; to_hf_state_dict splits it back apart
        self.qkv = nn.Linear(H, 3 * H)
        self.proj = nn.Linear(H, H)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, H = x.shape
        nh, hs = self.num_heads, H // self.num_heads
        q, k, v = self.qkv(x).split(H, dim=2)  # 3 x (B, T, H)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,  # (B, 1, 1, T) or (B, 1, T, T) bool, True = may attend
            dropout_p=self.attention_dropout if self.training else 0.0,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, H)  # re-assemble heads: (B, T, H)
        return self.proj(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # exact erf GELU, which is what HF calls "gelu" (not the tanh approximation)
        return self.proj(F.gelu(self.fc(x)))  # (B, T, I) inside, (B, T, H) out


class Layer(nn.Module):
    """One post-LN transformer layer: x = LN(x + drop(f(x))) for f = attention, then FFN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.mlp_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)  # stateless, so one module serves both branches

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attn_ln(x + self.drop(self.attn(x, attn_mask)))
        x = self.mlp_ln(x + self.drop(self.mlp(x)))
        return x


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder onto the vocabulary.

    The decoder's weight is tied to the word embeddings by the owning model; its bias is
    the head's own. Works on any leading shape, e.g. (B, T, H) or only the masked (N, H).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(h))))  # (..., H) -> (..., V)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not IGNORE_INDEX.

    Sum / count instead of reduction="mean": a batch with nothing scored gives 0 (still
    attached to the graph) rather than NaN, and there is no host sync to check for that case.
    """
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    scored = (labels != IGNORE_INDEX).sum()
    return total / scored.clamp(min=1)


class BertForMaskedLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_layers))
        self.head = MLMHead(config)
        # weight tying: the output projection *is* the input embedding table
        if config.tie_word_embeddings:
            self.head.decoder.weight = self.embeddings.word.weight
        self.apply(self._init_weights)
        with torch.no_grad():  # after apply(): re-initialising the tied decoder would undo it
            self.embeddings.word.weight[config.pad_token_id].zero_()

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, H).

        attention_mask: (B, T) with 1/True = real token, 0 = padding; or a ready (B, 1, T, T)
        bool mask (True = may attend), e.g. block-diagonal for packed sentences, which then
        pass ``position_ids`` (B, T) restarting at each sentence.
        """
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length ({T}) exceeds max_position_embeddings "
                f"({self.config.max_position_embeddings})"
            )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        mask = None
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        elif attention_mask is not None:
            # Mask keys only, broadcast over heads and queries. Padding queries still see the
            # real keys, so no softmax row is ever fully masked (no NaN); their outputs are
            # junk nobody reads, since padding never carries a label.
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        masked_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (logits (B, T, V), loss or None). labels: -100 on unscored positions.

        Sparse prediction: with ``masked_positions`` (N,) — flat indices into the (B*T)
        positions — the head and the vocabulary projection run there only; logits are then
        (N, V) and ``labels`` are the (N,) targets of those positions.
        """
        hidden = self.encode(input_ids, attention_mask, token_type_ids, position_ids)  # (B, T, H)
        if masked_positions is not None:
            hidden = hidden.flatten(0, 1).index_select(0, masked_positions)  # (N, H)
        logits = self.head(hidden)  # (B, T, V) or (N, V)
        loss = mlm_loss(logits, labels) if labels is not None else None
        return logits, loss

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; the tied decoder weight is counted once (as the word embeddings).

        exclude_embeddings drops the word, position and token-type tables, which is the
        usual "non-embedding" size that scaling laws are quoted in.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() de-duplicates tied weights
        if exclude_embeddings:
            e = self.embeddings
            n -= sum(m.weight.numel() for m in (e.word, e.position, e.token_type))
        return n


# ----------------------------------------------------------------------------- export


# Inside one encoder layer, every tensor but the fused q/k/v: (our name, transformers' BertLayer name),
# each with ".weight" and ".bias"; to_hf_state_dict and from_hf_state_dict read the same table.
LAYER_NAMES = (
    ("attn.proj.", "attention.output.dense."),
    ("attn_ln.", "attention.output.LayerNorm."),
    ("mlp.fc.", "intermediate.dense."),
    ("mlp.proj.", "output.dense."),
    ("mlp_ln.", "output.LayerNorm."),
)


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and split the fused q/k/v of) a BertForMaskedLM state_dict to HF's names.

    The result loads with `transformers.BertForMaskedLM(...).load_state_dict(sd, strict=True)`.
    HF lists its tied tensors under both names (decoder.weight = word_embeddings.weight,
    decoder.bias = cls.predictions.bias), so both are emitted. q/k/v are cloned so the result
    holds no overlapping views (safetensors refuses those); other tensors are passed through.
    """
    # torch.compile wraps the module and prefixes every key with "_orig_mod."
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    tied = config.tie_word_embeddings
    used: set[str] = {"head.decoder.weight"} if tied else set()  # the tie; exported from the embedding table

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    H = config.hidden_size
    out: dict[str, torch.Tensor] = {}
    emb = "bert.embeddings."
    out[emb + "word_embeddings.weight"] = take("embeddings.word.weight")
    out[emb + "position_embeddings.weight"] = take("embeddings.position.weight")
    out[emb + "token_type_embeddings.weight"] = take("embeddings.token_type.weight")
    for kind in ("weight", "bias"):
        out[emb + "LayerNorm." + kind] = take("embeddings.ln." + kind)

    for i in range(config.num_layers):
        ours, hf = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = take(ours + "attn.qkv." + kind).split(H, dim=0)  # rows: [q; k; v]
            out[hf + "attention.self.query." + kind] = q.clone()
            out[hf + "attention.self.key." + kind] = k.clone()
            out[hf + "attention.self.value." + kind] = v.clone()
            for mine, theirs in LAYER_NAMES:
                out[hf + theirs + kind] = take(ours + mine + kind)

    cls = "cls.predictions."
    for kind in ("weight", "bias"):
        out[cls + "transform.dense." + kind] = take("head.dense." + kind)
        out[cls + "transform.LayerNorm." + kind] = take("head.ln." + kind)
    out[cls + "decoder.weight"] = out[emb + "word_embeddings.weight"] if tied else take("head.decoder.weight")
    out[cls + "bias"] = take("head.decoder.bias")
    out[cls + "decoder.bias"] = out[cls + "bias"]

    # fail loudly if the model grew a parameter this mapping does not know about
    leftover = sorted(set(sd) - used)
    if leftover:
        raise ValueError(f"state_dict keys with no Hugging Face mapping: {leftover}")
    return out


# Names older BERT checkpoints (converted from TensorFlow) give LayerNorm parameters.
_LEGACY_LN = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))
# Parts of a Hugging Face BERT checkpoint a masked LM does not use: the next-sentence head and
# pooler of BertForPreTraining, and the position-id buffer older versions saved.
_UNUSED_HF = ("cls.seq_relationship.", "bert.pooler.", "bert.embeddings.position_ids")


def from_hf_state_dict(hf_state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: a Hugging Face ``BertForMaskedLM`` (or
    ``BertForPreTraining``, whose next-sentence head and pooler are dropped) state_dict in
    this model's names, q/k/v fused again. ValueError names missing or unknown tensors."""
    sd: dict[str, torch.Tensor] = {}
    for key, value in hf_state.items():
        for old, new in _LEGACY_LN:
            if key.endswith(old):
                key = key[: -len(old)] + new
        if not key.startswith(_UNUSED_HF):
            sd[key] = value
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"the checkpoint has no tensor {key!r}; is it a BERT masked LM?")
        used.add(key)
        return sd[key]

    out: dict[str, torch.Tensor] = {}
    emb = "bert.embeddings."
    out["embeddings.word.weight"] = take(emb + "word_embeddings.weight")
    out["embeddings.position.weight"] = take(emb + "position_embeddings.weight")
    out["embeddings.token_type.weight"] = take(emb + "token_type_embeddings.weight")
    for kind in ("weight", "bias"):
        out["embeddings.ln." + kind] = take(emb + "LayerNorm." + kind)
    for i in range(config.num_layers):
        ours, hf = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[ours + "attn.qkv." + kind] = torch.cat(
                [take(hf + f"attention.self.{name}." + kind) for name in ("query", "key", "value")], dim=0
            )
            for mine, theirs in LAYER_NAMES:
                out[ours + mine + kind] = take(hf + theirs + kind)
    cls = "cls.predictions."
    for kind in ("weight", "bias"):
        out["head.dense." + kind] = take(cls + "transform.dense." + kind)
        out["head.ln." + kind] = take(cls + "transform.LayerNorm." + kind)
    out["head.decoder.bias"] = take(cls + "bias") if cls + "bias" in sd else take(cls + "decoder.bias")
    used.update(k for k in (cls + "bias", cls + "decoder.bias") if k in sd)
    if config.tie_word_embeddings:
        out["head.decoder.weight"] = out["embeddings.word.weight"]  # HF re-ties on load, whatever is stored
        used.add(cls + "decoder.weight")
    else:
        out["head.decoder.weight"] = take(cls + "decoder.weight")
    leftover = sorted(set(sd) - used)
    if leftover:
        more = f" and {len(leftover) - 3} more" if len(leftover) > 3 else ""
        raise ValueError(f"the checkpoint has tensors a BERT masked LM does not: {', '.join(leftover[:3])}{more}")
    return out


def model_config_from_hf(hf: Mapping) -> ModelConfig:
    """ModelConfig of a Hugging Face ``BertConfig`` dict (its ``config.json``)."""
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf.get("hidden_size", 768),
        num_layers=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        intermediate_size=hf.get("intermediate_size", 3072),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        initializer_range=hf.get("initializer_range", 0.02),
        pad_token_id=hf.get("pad_token_id") or 0,
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
    )


def hf_config_dict(config: ModelConfig) -> dict:
    """Keyword arguments for `transformers.BertConfig` describing the same architecture."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.attention_dropout,
        "layer_norm_eps": config.layer_norm_eps,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "gelu",
    }
