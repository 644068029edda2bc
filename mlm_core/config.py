"""One typed, documented config per pipeline stage.

Only settings that change *what is computed* live here and go into fingerprints; settings
that change only *how fast* (device, precision, threads, timeouts) live in ``RuntimeConfig``
or are marked in ``SPEED_ONLY`` so a faster machine reuses the same cached outputs.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EMBEDDED_SOURCE = "embedded"


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ()

    def fingerprint_fields(self) -> dict:
        """The fields that decide the stage's output (everything but speed-only knobs)."""
        return self.model_dump(exclude=set(self.SPEED_ONLY))


class DownloadConfig(_Config):
    """Stage 1: where the raw documents come from and how they are read."""

    SPEED_ONLY: ClassVar[tuple[str, ...]] = (
        "timeout_s", "max_bytes", "concurrency", "per_host", "retries", "retry_backoff_s", "max_failed_fraction",
    )

    sources: list[str] = Field(
        default_factory=lambda: [EMBEDDED_SOURCE],
        description=(
            "Corpus sources, several allowed: 'embedded' (走れメロス, shipped with Melos), "
            "a local .zip or .txt path, a directory or glob of them, an http(s) URL of an Aozora Bunko ZIP, "
            "an Aozora catalogue selection ('aozora:author=35', 'aozora:author=35,879', 'aozora:work=1567', "
            "'aozora:all'), or a JSON Lines / Parquet file with a text column ('jsonl:path?field=text', "
            "'parquet:path?field=text')."
        ),
    )
    aozora_base_url: str = Field(
        "https://www.aozora.gr.jp/",
        description=(
            "Where 'aozora:' sources read the catalogue and the works: the site, a mirror URL, or a local "
            "directory laid out like the site (index_pages/, cards/)."
        ),
    )
    encoding: str = Field(
        "auto",
        description="Text encoding: 'auto' (UTF-8 if valid, else cp932 as Aozora uses) or a codec name.",
    )
    timeout_s: float = Field(30.0, gt=0, description="HTTP connect/read timeout in seconds.")
    max_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Refuse a download or ZIP member larger than this many bytes (guards against zip bombs).",
    )
    concurrency: int = Field(8, ge=1, description="Downloads in flight at once.")
    per_host: int = Field(4, ge=1, description="Downloads in flight at once from any one host.")
    retries: int = Field(2, ge=0, description="Retries of a file after a transient error (timeout, reset, 5xx/429).")
    retry_backoff_s: float = Field(1.0, ge=0, description="First retry delay in seconds; doubles with each retry.")
    max_failed_fraction: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description=(
            "Share of the works of a catalogue, directory or glob selection that may fail without failing the stage "
            "(failures are listed in the manifest). A source named explicitly always fails the stage."
        ),
    )

    @field_validator("sources")
    @classmethod
    def _non_empty(cls, sources: list[str]) -> list[str]:
        cleaned = [s.strip() for s in sources if s and s.strip()]
        if not cleaned:
            raise ValueError("sources is empty: give at least one source ('embedded', a path or a URL)")
        return cleaned


class TokenizeConfig(_Config):
    """Stage 2: sentence splitting, MeCab words, held-out split and Parquet sharding."""

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("part_chars", "workers", "dask", "dask_address")

    heldout_fraction: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Share of sentences held out for evaluation, chosen by a hash of the sentence text.",
    )
    split_salt: str = Field(
        "melos-heldout-v1",
        description="Salt of the held-out hash; change it to draw a different (still deterministic) split.",
    )
    max_rows_per_shard: int = Field(100_000, gt=0, description="Sentences per Parquet shard file.")
    row_group_size: int = Field(10_000, gt=0, description="Rows per Parquet row group (the streaming unit).")
    part_chars: int = Field(
        200_000,
        gt=0,
        description=(
            "Documents are tokenized in parts of about this many characters (whole documents): the unit of "
            "parallel work and of crash recovery. The shards do not depend on it."
        ),
    )
    workers: int | None = Field(
        None, ge=1, description="Tokenizer processes on this machine (None: one per CPU core)."
    )
    dask: bool = Field(False, description="Tokenize on a Dask cluster (prefect-dask) instead of a local process pool.")
    dask_address: str | None = Field(
        None,
        description=(
            "Scheduler address of an existing Dask cluster (e.g. tcp://10.0.0.5:8786); implies --dask. Without it "
            "--dask starts a local cluster of --workers processes. Outputs must be on storage every worker sees."
        ),
    )
    word_splitter: str = Field(
        "mecab:unidic_lite",
        description="How sentences are cut into words: mecab:unidic_lite (Melos's own), mecab:ipadic, mecab:unidic "
        "or basic (Hugging Face's BasicTokenizer), each optionally with :lower. --init-from sets it to the "
        "checkpoint's own.",
    )

    @field_validator("word_splitter")
    @classmethod
    def _splitter(cls, value: str) -> str:
        from .tokenizer import check_splitter

        check_splitter(value)  # known, and its dictionary installed
        return value

    def fingerprint_fields(self) -> dict:
        fields = super().fingerprint_fields()
        if fields.get("word_splitter") == "mecab:unidic_lite":  # outputs cached before the field existed stay valid
            del fields["word_splitter"]
        return fields


class VocabConfig(_Config):
    """Stage 3: WordPiece vocabulary over MeCab words (as Tohoku's Japanese BERT)."""

    vocab_size: int = Field(
        8000,
        ge=32,
        description=(
            "Target vocabulary size, special tokens included. Every character seen (and its ## form) is "
            "always kept, so a corpus with many distinct characters can exceed it; cap with limit_alphabet."
        ),
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a WordPiece merge.")
    limit_alphabet: int | None = Field(
        None, ge=1, description="Keep at most this many initial characters (None: all seen characters)."
    )
    max_input_chars_per_word: int = Field(100, ge=1, description="Longer words become [UNK].")


class TrainConfig(_Config):
    """Stage 4: model size, optimisation and masking."""

    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("checkpoint_every", "keep_checkpoints", "log_every")

    # --- model size -------------------------------------------------------------------
    hidden_size: int = Field(64, gt=0, description="Transformer width.")
    num_layers: int = Field(2, gt=0, description="Number of encoder layers.")
    num_heads: int = Field(2, gt=0, description="Attention heads per layer.")
    intermediate_size: int = Field(256, gt=0, description="Feed-forward inner width.")
    max_length: int = Field(128, ge=8, description="Max tokens per sequence, [CLS] and [SEP] included.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Hidden and attention dropout.")

    # --- optimisation -----------------------------------------------------------------
    seed: int = Field(0, description="Seed for initialisation, data order, masking and dropout.")
    epochs: float = Field(60.0, gt=0, description="Passes over the training sentences (ignored if max_steps is set).")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimiser steps, however many epochs that is."
    )
    batch_size: int = Field(
        32,
        gt=0,
        description="Average sentences per micro-batch, used only when --tokens-per-batch is not set "
        "(the token budget is then batch_size x the mean sequence length).",
    )
    tokens_per_batch: int | None = Field(
        None,
        gt=0,
        description="Token budget of one micro-batch ([CLS]/[SEP] counted, no padding); sentences are "
        "packed into rows of max_length. Not set: --batch-size x the mean sequence length.",
    )
    grad_accum: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimiser step, across all processes (global batch = "
        "tokens_per_batch x grad_accum); must be a multiple of the number of processes.",
    )
    budget_minutes: float | None = Field(
        None,
        gt=0,
        description="Train for this many minutes of wall-clock time instead of --epochs/--max-steps; "
        "warm-up and decay follow the elapsed share of the budget. From scratch, every model, optimisation and "
        "vocabulary setting you do not give comes from the budget profile for this budget and device "
        "(mlm_core/profiles.py, chosen by measured sweeps); what you give wins.",
    )
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="Share of steps with linear warm-up.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW decoupled weight decay (not on biases/LayerNorm).")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    length_group_size: int = Field(
        50,
        ge=1,
        description="Unused since training packs sentences (kept so older configs still load).",
    )

    # --- masking ----------------------------------------------------------------------
    mask_rate: float | str = Field(
        0.15,
        description="Share of maskable tokens selected for prediction: a constant such as 0.15, or a schedule "
        "over training steps: START:END:linear (e.g. 0.3:0.15:linear), START:END:cosine, or R1,R2,...:step "
        "(equal parts of training).",
    )
    whole_word: bool = Field(
        False,
        description="Mask whole MeCab words (all their subwords together); the rate still counts tokens.",
    )
    mask_token_prob: float = Field(0.8, ge=0.0, le=1.0, description="Selected tokens replaced by [MASK].")
    random_token_prob: float = Field(0.1, ge=0.0, le=1.0, description="Selected tokens replaced by a random token.")
    masking: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="'dynamic': a fresh mask each time a sentence is seen; 'static': one fixed mask per sentence.",
    )

    # --- bookkeeping (speed/ops only) ---------------------------------------------------
    checkpoint_every: int = Field(200, gt=0, description="Save a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="How many step checkpoints to keep.")
    log_every: int = Field(1, gt=0, description="Log loss / lr / tokens-per-second every N steps.")

    @field_validator("mask_rate")
    @classmethod
    def _mask_rate(cls, value: float | str) -> float | str:
        from .mask_schedule import normalise_rate

        return normalise_rate(value)

    @field_validator("tokens_per_batch")
    @classmethod
    def _tokens_per_batch(cls, value: int | None, info) -> int | None:
        max_length = info.data.get("max_length")
        if value is not None and max_length is not None and value < max_length:
            raise ValueError(f"{value} tokens cannot hold one sequence of max_length {max_length}; give at least "
                             f"{max_length} (or lower max_length)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if isinstance(self.mask_rate, str) and self.budget_minutes and not self.max_steps:
            raise ValueError(
                f"mask rate schedule {self.mask_rate!r} needs a known number of steps: add --max-steps to "
                "--budget-minutes, or use a constant --mask-rate"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ValueError(
                f"mask_token_prob ({self.mask_token_prob}) + random_token_prob "
                f"({self.random_token_prob}) must not exceed 1"
            )
        return self


class EvalConfig(_Config):
    """Stage 5: fixed evaluation masking so runs with different training masks compare."""

    mask_rate: float = Field(0.15, gt=0.0, lt=1.0, description="Share of held-out tokens masked.")
    seed: int = Field(1234, description="Seed of the evaluation mask (fixed across runs).")
    passes: int = Field(
        5,
        ge=1,
        description="Score the held-out split this many times, each with its own fixed mask (more positions, less noise).",
    )
    batch_size: int = Field(64, gt=0, description="Sentences per evaluation batch.")
    max_sentences: int | None = Field(
        4000,
        ge=1,
        description="Score a fixed, seeded sample of this many held-out sentences when the split is larger "
        "(each keeps its own fixed mask), so evaluation does not eat a training budget; None: all.",
    )
    pll_sentences: int = Field(
        64,
        ge=0,
        description="Pseudo-perplexity (each token masked in turn, with the later pieces of its word) on a fixed, "
        "seeded sample of this many held-out sentences; 0: skip.",
    )
    top_k: int = Field(5, ge=1, description="How many predictions fill-mask examples show.")
    fill_mask_examples: list[str] = Field(
        default_factory=lambda: [
            "メロスは[MASK]した。",
            "メロスには[MASK]がわからぬ。",
            "私は、[MASK]を信じている。",
        ],
        description="Sentences with [MASK] whose predictions go into the report.",
    )


class RuntimeConfig(_Config):
    """How fast, never what: none of this enters a fingerprint."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when present.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 autocast on CUDA, fp32 on CPU."
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch CPU threads (None: every usable CPU; idle OpenMP threads sleep, see README)."
    )
    compile: bool = Field(False, description="torch.compile the model for training.")
    prefetch: int = Field(
        2, ge=0, description="Optimizer steps of batches a background thread prepares ahead (0: none)."
    )
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="Processes that collate (mask and pack) training batches, for a GPU that trains faster "
        "than one thread collates; 0: a background thread. None: 0 on CPU, on CUDA up to 4 (the CPUs per "
        "training process, less one).",
    )
    peak_tflops: float | None = Field(
        None,
        gt=0,
        description="Peak TFLOP/s of one device, the denominator of model FLOPs utilisation (None: a "
        "table of known GPUs at bf16, or on CPU 0.08 TFLOP/s per torch thread, i.e. 2.5 GHz x 32 "
        "fp32 FLOPs per cycle for AVX2 with two FMA units).",
    )
    nproc_per_node: int = Field(
        1, ge=1, description="Training processes per machine; more than 1 (or nnodes > 1) trains with DDP under torchrun."
    )
    nnodes: int = Field(1, ge=1, description="Machines taking part in training (torchrun --nnodes).")
    rdzv_endpoint: str | None = Field(
        None, description="host:port where the machines of a multi-node run meet (torchrun --rdzv-endpoint)."
    )
    rdzv_id: str = Field("melos", description="Rendezvous id shared by the machines of one run (torchrun --rdzv-id).")
    tracking_grace_s: float = Field(
        300.0, gt=0, description="Seconds training goes on while the tracking server is unreachable, its "
        "metrics queued; a longer outage fails the run, its checkpoints kept for --resume."
    )

    @model_validator(mode="after")
    def _check_rendezvous(self) -> "RuntimeConfig":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                f"nnodes={self.nnodes} needs a rendezvous endpoint: pass --rdzv-endpoint HOST:PORT of the first machine"
            )
        return self

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1
