"""Benchmark of the three data stages on a local Aozora mirror (a script, not a test).

    python bench/data_stages.py --aozora ../shared/aozora

Serves the mirror on 127.0.0.1 itself, selects every work through the catalogue
(``aozora:all`` against that base URL) and prints one ``name=value`` line per figure:

- ``tokenize_ratio_1proc``: the tokenize stage's sentences/s on 1 process divided by a bare
  fugashi ``Tagger.parse`` loop over the same sentences, in the same run (also printed on
  CPU seconds as ``tokenize_ratio_1proc_cpu``, which other load on the machine distorts less);
- ``tokenize_scaling_2proc``: tokenize throughput on 2 processes divided by 1 process (also
  on CPU seconds as ``tokenize_scaling_2proc_cpu``: the 1-process stage's CPU seconds over
  those of the busiest process of the 2-process run, each worker's read in the worker);
- ``data_stages_wall_s``: download from loopback + tokenize + vocab (8k) for the whole
  selection with the default settings (a cold raw cache);
- ``peak_rss_ratio_4x``: peak memory (max RSS of the stage process and of any worker) of
  the data stages on 4x the corpus (every work repeated under new ids, as plain UTF-8
  files with a distinct last line so none is deduplicated) divided by 1x.

Each memory run happens in a fresh child process so its peak is its own.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlm_core.config import DownloadConfig, TokenizeConfig, VocabConfig  # noqa: E402
from mlm_core.download import download_corpus  # noqa: E402
from mlm_core.shards import iter_rows, shard_paths, tokenize_corpus, tokenize_part  # noqa: E402
from mlm_core.vocab import build_vocab  # noqa: E402


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def data_stages(sources: list[str], base_url: str, work: Path, workers: int | None = None) -> dict:
    """download -> tokenize -> vocab (8k) with default settings; seconds per stage."""
    times = {}
    t0 = time.perf_counter()
    docs = download_corpus(DownloadConfig(sources=sources, aozora_base_url=base_url), work / "download", work / "raw")
    times["download_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids = [d["doc_id"] for d in docs["documents"]]
    shards = tokenize_corpus(work / "download" / "docs", ids, work / "tokenize", TokenizeConfig(workers=workers),
                             docs["fingerprint"])
    times["tokenize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    vocab = build_vocab(work / "tokenize", shards, work / "vocab", VocabConfig())
    times["vocab_s"] = time.perf_counter() - t0
    return {**times, "documents": len(ids), "characters": docs["counts"]["characters"],
            "sentences": shards["counts"]["sentences"], "vocab_size": vocab["counts"]["vocab_size"],
            "failed": docs["counts"]["failed"], "docs": docs, "shards": shards}


def timed_part(*args) -> dict:
    """``tokenize_part`` with the CPU seconds it took in its worker process, and that pid."""
    c0 = time.process_time()
    summary = tokenize_part(*args)
    return {**summary, "cpu_s": time.process_time() - c0, "pid": os.getpid()}


def timed_pool(workers: int, summaries: list[dict]):
    """An ordered map over a forkserver pool of ``workers`` processes (as the stage's own)
    that keeps each part's summary, with its worker CPU seconds, in ``summaries``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    def run(fn, *iterables):
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["mlm_core.shards", "pandas"])  # as the stage does
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for summary in pool.map(timed_part, *iterables):
                summaries.append(summary)
                yield summary

    return run


def tokenize_throughput(docs_dir: Path, ids: list[str], fp: str, work: Path, workers: int) -> tuple[float, dict]:
    """Sentences/s of the tokenize stage; with workers > 1, also the CPU seconds each worker
    process spent in its parts (``worker_cpu``), read in the workers with process_time."""
    out = work / f"tok-{workers}"
    summaries: list[dict] = []
    map_fn = timed_pool(workers, summaries) if workers > 1 else None
    t0, c0 = time.perf_counter(), time.process_time()
    manifest = tokenize_corpus(docs_dir, ids, out, TokenizeConfig(workers=workers), fp, map_fn=map_fn)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    worker_cpu: dict[int, float] = {}
    for summary in summaries:
        worker_cpu[summary["pid"]] = worker_cpu.get(summary["pid"], 0.0) + summary["cpu_s"]
    return manifest["counts"]["sentences"] / seconds, {"dir": out, "manifest": manifest, "seconds": seconds,
                                                       "cpu": cpu, "worker_cpu": sorted(worker_cpu.values())}


def bare_parse_rate(tokenize_dir: Path, manifest: dict) -> tuple[float, float, float]:
    import fugashi

    sentences = [s for split in ("train", "heldout")
                 for batch in iter_rows(shard_paths(tokenize_dir, split, manifest), ["text"])
                 for s in batch.column(0).to_pylist()]
    tagger = fugashi.Tagger()
    t0, c0 = time.perf_counter(), time.process_time()
    for s in sentences:
        tagger.parse(s)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(sentences) / seconds, seconds, cpu


class WorkerPeak:
    """The largest peak RSS (VmHWM) of any process descended from this one, sampled from
    /proc: tokenizer workers are children of the forkserver, not ours, so getrusage misses them."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    @staticmethod
    def _descendants() -> list[int]:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        found, frontier = [], [os.getpid()]
        while frontier:
            kids = [c for c, p in parents.items() if p == frontier[-1]]
            frontier.pop()
            found += kids
            frontier += kids
        return found

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for pid in self._descendants():
                try:
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_kib = max(self.peak_kib, int(line.split()[1]))
                except OSError:
                    continue

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_kib / 1024


def peak_rss_mib(workers: WorkerPeak) -> dict[str, float]:
    """Peak RSS of this process and of its largest worker process, MiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    worker = workers.stop()
    return {"main": own, "worker": worker, "peak": max(own, worker)}


def throughput(docs_dir: Path, ids: list[str], run: dict, work: Path) -> None:
    """Tokenize on 1 and 2 processes vs a bare Tagger.parse loop over the same sentences."""
    rate1, one = tokenize_throughput(docs_dir, ids, run["docs"]["fingerprint"], work, 1)
    rate2, two = tokenize_throughput(docs_dir, ids, run["docs"]["fingerprint"], work, 2)
    bare, bare_s, bare_cpu = bare_parse_rate(one["dir"], one["manifest"])
    print(f"ratio_documents={len(ids)} sentences={one['manifest']['counts']['sentences']} "
          f"tokenize_1proc_s={one['seconds']:.1f} tokenize_2proc_s={two['seconds']:.1f} bare_parse_s={bare_s:.1f}")
    # The same ratio on CPU seconds (1 process: all work is in this process), which a
    # machine shared with other jobs distorts far less than wall time.
    print(f"tokenize_1proc_cpu_s={one['cpu']:.1f} bare_parse_cpu_s={bare_cpu:.1f} "
          f"tokenize_ratio_1proc_cpu={bare_cpu / one['cpu']:.3f}")
    print(f"tokenize_ratio_1proc={rate1 / bare:.3f}")
    print(f"tokenize_scaling_2proc={rate2 / rate1:.3f}", flush=True)
    # On CPU seconds: the 1-process stage's CPU over the busiest process of the 2-process run
    # (a worker, or the main process merging the parts), i.e. its wall time on two idle cores.
    busiest = max([two["cpu"], *two["worker_cpu"]])
    print(f"tokenize_2proc_worker_cpu_s={','.join(f'{c:.1f}' for c in two['worker_cpu'])} "
          f"tokenize_2proc_main_cpu_s={two['cpu']:.1f}")
    print(f"tokenize_scaling_2proc_cpu={one['cpu'] / busiest:.3f}", flush=True)


def write_plain_copies(docs_dir: Path, ids: list[str], dest: Path, copies: int) -> None:
    """Every document ``copies`` times as plain UTF-8 text, each copy distinct."""
    dest.mkdir(parents=True)
    for doc_id in ids:
        text = (docs_dir / f"{doc_id}.txt").read_text(encoding="utf-8")
        for c in range(copies):
            (dest / f"{doc_id}-copy{c}.txt").write_text(f"{text}複製第{c}番。\n", encoding="utf-8")


def child_memory_run(args: argparse.Namespace) -> None:
    work = Path(args.child_work)
    workers = WorkerPeak()
    data_stages([str(Path(args.child_source))], DownloadConfig().aozora_base_url, work)
    print(json.dumps(peak_rss_mib(workers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--aozora", type=Path, required=False, help="the mirror directory (index_pages/, cards/)")
    parser.add_argument("--source", default="aozora:all", help="catalogue selection (default: aozora:all)")
    parser.add_argument("--ratio-every", type=int, default=1,
                        help="measure the 1/2-process throughput on every Nth document (default: all)")
    parser.add_argument("--rss-every", type=int, default=1,
                        help="measure the memory ratio on every Nth document (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--skip-throughput", action="store_true",
                        help="skip the 1/2-process tokenize and bare-parse measurements")
    parser.add_argument("--child-work", help=argparse.SUPPRESS)
    parser.add_argument("--child-source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_work:
        child_memory_run(args)
        return
    if args.aozora is None or not (args.aozora / "index_pages").is_dir():
        parser.error(f"--aozora {args.aozora}: not a mirror directory with index_pages/ and cards/")

    server, base_url = serve(args.aozora.resolve())
    work = Path(tempfile.mkdtemp(prefix="melos-bench-"))
    try:
        # 1. the three stages with default settings, cold raw cache, served over loopback
        t0 = time.perf_counter()
        run = data_stages([args.source], base_url, work / "full")
        wall = time.perf_counter() - t0
        print(f"documents={run['documents']} characters={run['characters']} sentences={run['sentences']} "
              f"failed={run['failed']} vocab_size={run['vocab_size']}")
        print(f"download_s={run['download_s']:.1f} tokenize_s={run['tokenize_s']:.1f} vocab_s={run['vocab_s']:.1f}")
        print(f"data_stages_wall_s={wall:.1f}", flush=True)

        # 2. tokenize on 1 and 2 processes vs a bare Tagger.parse loop over the same sentences
        docs_dir = work / "full" / "download" / "docs"
        ids = [d["doc_id"] for d in run["docs"]["documents"]][:: args.ratio_every]
        if not args.skip_throughput:
            throughput(docs_dir, ids, run, work)

        # 3. peak memory on 1x and 4x the corpus, each in a fresh process
        ids = [d["doc_id"] for d in run["docs"]["documents"]][:: args.rss_every]
        peaks = {}
        for copies in (1, 4):
            plain = work / f"plain-{copies}x"
            write_plain_copies(docs_dir, ids, plain, copies)
            out = subprocess.run(
                [sys.executable, __file__, "--child-work", str(work / f"mem-{copies}x"), "--child-source", str(plain)],
                check=True, capture_output=True, text=True,
            ).stdout
            peaks[copies] = json.loads(out.strip().splitlines()[-1])
            shutil.rmtree(plain)
            shutil.rmtree(work / f"mem-{copies}x")
        print(f"rss_documents={len(ids)} " + " ".join(
            f"{k}_rss_{c}x_mib={v:.0f}" for c in (1, 4) for k, v in peaks[c].items() if k != "peak"))
        print(f"main_rss_ratio_4x={peaks[4]['main'] / peaks[1]['main']:.3f}")
        print(f"peak_rss_ratio_4x={peaks[4]['peak'] / peaks[1]['peak']:.3f}", flush=True)
    finally:
        server.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
