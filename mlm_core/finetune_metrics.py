"""Scores for fine-tuning: accuracy, macro F1, and entity-level micro F1 as seqeval computes it.

``entities`` follows seqeval's default (lenient) chunking rules: a chunk ends and a new one
starts where the tag letter or the type changes, and an ``I-`` after ``O`` (or after another
type) starts an entity, as in seqeval's ``get_entities``. Sentences are scored together, each
entity identified by (sentence, type, first token, last token); precision, recall and F1 are
micro-averaged over all entities, exact span and type. No import of seqeval here; the tests
compare against hand-worked cases (and seqeval itself where it is installed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def _split_tag(tag: str) -> tuple[str, str]:
    """("B", "PER") from "B-PER"; ("O", "_") from "O"; seqeval's prefix reading."""
    letter = tag[:1]
    kind = tag[1:].split("-", maxsplit=1)[-1] or "_"
    return letter, kind


def _ends(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev not in ("O", ".") and prev_type != kind


def _starts(prev: str, tag: str, prev_type: str, kind: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != kind


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of each entity in one sentence's tags (IOB2, IOB1, IOBES read leniently)."""
    found: list[tuple[str, int, int]] = []
    prev, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        letter, kind = _split_tag(tag)
        if _ends(prev, letter, prev_type, kind):
            found.append((prev_type, begin, i - 1))
        if _starts(prev, letter, prev_type, kind):
            begin = i
        prev, prev_type = letter, kind
    return found


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Micro precision, recall and F1 over entities (exact span and type), as seqeval's
    ``precision_score``/``recall_score``/``f1_score`` with their defaults (0 where undefined)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    true_set: set[tuple] = set()
    pred_set: set[tuple] = set()
    for s, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {s}: {len(g)} gold tags but {len(p)} predicted")
        true_set.update((s, *e) for e in entities(g))
        pred_set.update((s, *e) for e in entities(p))
    correct = len(true_set & pred_set)
    precision = correct / len(pred_set) if pred_set else 0.0
    recall = correct / len(true_set) if true_set else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "entities": float(len(true_set))}


def accuracy(gold: Sequence, pred: Sequence) -> float:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predicted")
    return sum(g == p for g, p in zip(gold, pred)) / len(gold) if gold else 0.0


def macro_f1(gold: Sequence, pred: Sequence) -> float:
    """Unweighted mean of per-label F1 over the labels seen in gold or predictions (as
    scikit-learn's ``f1_score(average="macro")``; a label with no true and no predicted
    positive cannot occur in that set, one with no correct prediction scores 0)."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predicted")
    labels = set(gold) | set(pred)
    if not labels:
        return 0.0
    tp = Counter(g for g, p in zip(gold, pred) if g == p)
    n_gold, n_pred = Counter(gold), Counter(pred)
    total = 0.0
    for label in labels:
        denom = n_gold[label] + n_pred[label]
        total += 2 * tp[label] / denom if denom else 0.0
    return total / len(labels)
