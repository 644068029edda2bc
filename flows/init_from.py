"""``--init-from SOURCE``: continue pre-training a published or earlier checkpoint.

SOURCE is a local Hugging Face model directory, a hub id found through ``huggingface_hub``'s
cache (``HF_HUB_OFFLINE`` honoured), a Melos model directory, or ``run:<id>`` / ``run:latest``
(a Melos run's model, from MLflow). ``resolve_init`` checks it and describes it
(``mlm_core.hf_import.describe_init``) before any server starts; ``finetune_train_config``
applies the defaults of continued pre-training to the options the user did not give.
"""

from __future__ import annotations

from pathlib import Path

from mlm_core.config import TokenizeConfig, TrainConfig
from mlm_core.hf_import import CheckpointError, describe_init, resolve_source

# What continued pre-training changes when the user does not say otherwise: the learning rate
# of fine-tuning a large model (transformers' run_mlm.py default), its warm-up share, three
# epochs as run_mlm.py. Dropout and the model's shape come from the checkpoint.
FINETUNE_DEFAULTS = {"learning_rate": 5e-5, "warmup_ratio": 0.06, "epochs": 3.0}
_SHAPE = {"hidden_size": "hidden_size", "num_layers": "num_layers", "num_heads": "num_heads",
          "intermediate_size": "intermediate_size"}


def resolve_init(source: str, workdir: str | Path = "melos-work", tracking_uri: str | None = None) -> dict:
    """The checked record of SOURCE (see ``describe_init``); ValueError (one line) if unusable."""
    if source.startswith("run:"):  # recorded as run:<its id>, so run:latest stays traceable
        ref = source.removeprefix("run:") or "latest"
        path, run_id = _melos_run_model(ref, Path(workdir).resolve(), tracking_uri)
        return describe_init(path, f"run:{run_id}")
    return describe_init(resolve_source(source), source)


def _melos_run_model(ref: str, workdir: Path, tracking_uri: str | None) -> tuple[Path, str]:
    from flows.runs import RunNotFound, resolve_run

    try:
        store, found = resolve_run(ref, tracking_uri)
    except RunNotFound as exc:
        raise CheckpointError(f"--init-from run:{ref}: {exc}") from None
    from flows.cli import resolve_model_dir

    run_id = found.info.run_id
    try:
        return resolve_model_dir(run_id, workdir / "models" / run_id, store), run_id
    except SystemExit as exc:  # its message is already one "melos: ..." line
        raise CheckpointError(str(exc).removeprefix("melos: ")) from None


def finetune_train_config(train: TrainConfig, init: dict) -> TrainConfig:
    """``train`` with the model's shape from the checkpoint and, for every field the user did
    not set, the continued pre-training defaults (``FINETUNE_DEFAULTS``, dropout of the
    checkpoint). ValueError when an explicit model-size option contradicts the checkpoint."""
    model = init["model"]
    explicit = train.model_fields_set
    for field, key in _SHAPE.items():
        if field in explicit and getattr(train, field) != model[key]:
            raise CheckpointError(f"--init-from {init['source']} has {key} {model[key]}; the model's size comes from the "
                             f"checkpoint, drop the {field} option")
    update = {field: model[key] for field, key in _SHAPE.items()}
    update.update({k: v for k, v in FINETUNE_DEFAULTS.items() if k not in explicit})
    if "dropout" not in explicit:
        update["dropout"] = model["dropout"]
    max_length = train.max_length if "max_length" in explicit else min(train.max_length, model["max_position_embeddings"])
    if max_length > model["max_position_embeddings"]:
        raise CheckpointError(f"--max-length {max_length} exceeds the {model['max_position_embeddings']} positions of "
                         f"{init['source']}")
    update["max_length"] = max_length
    return TrainConfig(**{**train.model_dump(), **update})


def init_tokenize_config(tokenize: TokenizeConfig, init: dict) -> TokenizeConfig:
    """The tokenize stage splits words with the checkpoint's own splitter."""
    return tokenize.model_copy(update={"word_splitter": init["tokenizer"]["splitter"]})


def with_checkpoint_shape(train: TrainConfig, init: dict) -> TrainConfig:
    """``train`` naming the checkpoint's model size (what the run trains, whatever was passed)."""
    return train.model_copy(update={field: init["model"][key] for field, key in _SHAPE.items()})


def apply_to_configs(configs: dict, source: str, workdir: str, tracking_uri: str | None = None) -> dict:
    """The CLI's configs for ``--init-from SOURCE``: SOURCE checked, its splitter, its size and
    the continued pre-training defaults applied (ValueError, one line, if SOURCE is unusable)."""
    init = resolve_init(source, workdir, tracking_uri)
    return {**configs, "tokenize": init_tokenize_config(configs["tokenize"], init),
            "train": finetune_train_config(configs["train"], init)}


def compare_train_config(train: TrainConfig, init: dict) -> TrainConfig:
    """A compare setting that continues ``init``: the checkpoint's size, and the continued
    pre-training defaults for every field left at its from-scratch default (the shared
    options then set the from-scratch settings; give a value in the grid to set both)."""
    defaults = TrainConfig()
    changed = {f for f in TrainConfig.model_fields if getattr(train, f) != getattr(defaults, f)} - set(_SHAPE)
    base = TrainConfig(**{f: getattr(train, f) for f in changed})
    return finetune_train_config(base, init)


def check_grid_sources(train: TrainConfig, grid, workdir: str, tracking_uri: str | None = None) -> None:
    """Every ``init_from`` of a compare grid checked before any server starts (ValueError)."""
    from mlm_core.grid import setting_jobs

    for source in {source for *_, source in setting_jobs(train, grid, 1) if source is not None}:
        resolve_init(source, workdir, tracking_uri)
