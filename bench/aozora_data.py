"""Shared by the benchmarks: the four authors of the Aozora mirror through the data stages.

Runs the project's own stage functions (download from local ZIP paths -> tokenize -> vocab
-> encode) into a work directory, once; later calls find the outputs there and return at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from mlm_core.config import DownloadConfig, TokenizeConfig, VocabConfig
from mlm_core.data import EncodedCorpus, encode_key, encode_shards
from mlm_core.download import download_corpus, download_key
from mlm_core.io import read_json
from mlm_core.shards import shard_paths, tokenize_corpus, tokenize_key
from mlm_core.tokenizer import WordPieceTokenizer
from mlm_core.vocab import build_vocab, vocab_key


@dataclass
class Prepared:
    tokenizer: WordPieceTokenizer
    tokenizer_path: Path
    train: EncodedCorpus
    heldout: EncodedCorpus
    data_fingerprint: str
    seconds: float


def author_zips(aozora: Path) -> list[str]:
    """Every work ZIP on the mirror's author cards (the mirror holds exactly four authors)."""
    zips = sorted(str(p) for p in (aozora / "cards").glob("*/files/*.zip"))
    if not zips:
        raise SystemExit(f"no work ZIPs under {aozora / 'cards'}: pass --aozora the mirror's directory")
    return zips


def prepare(aozora: Path, workdir: Path, vocab_size: int, max_length: int = 128) -> Prepared:
    started = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    dcfg = DownloadConfig(sources=author_zips(aozora))
    dkey = download_key(dcfg)
    ddir = workdir / "download" / dkey
    docs = read_json(ddir / "manifest.json") if (ddir / "manifest.json").is_file() else \
        download_corpus(dcfg, ddir, workdir / "raw")
    tcfg = TokenizeConfig()
    tdir = workdir / "tokenize" / tokenize_key(docs["fingerprint"], tcfg)
    shards = read_json(tdir / "manifest.json") if (tdir / "manifest.json").is_file() else tokenize_corpus(
        ddir / "docs", [d["doc_id"] for d in docs["documents"]], tdir, tcfg, docs["fingerprint"])
    vcfg = VocabConfig(vocab_size=vocab_size)
    vdir = workdir / "vocab" / vocab_key(shards["fingerprint"], vcfg)
    vocab = read_json(vdir / "manifest.json") if (vdir / "manifest.json").is_file() else \
        build_vocab(tdir, shards, vdir, vcfg)
    tokenizer = WordPieceTokenizer.from_file(vdir / "vocab.txt")
    corpora = {}
    for split in ("train", "heldout"):
        key = encode_key(shards["fingerprint"], vocab["fingerprint"], split, max_length)
        corpora[split] = EncodedCorpus(
            encode_shards(shard_paths(tdir, split, shards), tokenizer, workdir / "encoded" / key, max_length, key)
        )
    return Prepared(tokenizer, vdir / "vocab.txt", corpora["train"], corpora["heldout"],
                    f"{shards['fingerprint']}-{vocab['fingerprint']}", time.perf_counter() - started)
