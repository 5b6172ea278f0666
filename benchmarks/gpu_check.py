"""GPU readiness: the default transfer at DeepSpeech's width on one CUDA GPU, in minutes.

    python benchmarks/gpu_check.py            # one CUDA GPU: n_hidden=2048, bf16 (< 8 min)
    python benchmarks/gpu_check.py --tiny     # anywhere (the CPU): the tiny corpus, 1 epoch

Runs ``python -m freezeft.run`` with strategy=naive and strategy=frozen_encoder, one after
the other, and prints for each: training utterances per second, the GPU's utilisation
sampled every half second while the run trains (nvidia-smi), its peak memory in use, and
the test CER (greedy). The source model is pretrained for a few epochs at the same width
(the released source model is 256 wide): a check of speed and memory, not of accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

STRATEGIES = ("naive", "frozen_encoder")

GPU = [
    "trainer=gpu",
    "model.n_hidden=2048",  # DeepSpeech's width
    "trainer.precision=bf16-mixed",  # trainer=gpu's own, said here for the record
    "decoder=greedy",
    "source.max_epochs=4",
    "trainer.max_epochs=6",
    "data.corpus.n_train=1500",
    "source.data.corpus.n_train=3000",
    "data.batch_size=64",
    "source.data.batch_size=64",
]
TINY = ["experiment=tiny", "decoder=greedy", "data.num_workers=0", "trainer.max_epochs=1"]


class GpuSampler:
    """``nvidia-smi``'s utilisation (%) and memory in use (MiB) every ``period`` seconds."""

    def __init__(self, period: float = 0.5) -> None:
        self.period = period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _run(self) -> None:
        query = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
        ]
        while not self._stop.wait(self.period):
            try:
                line = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                used, memory = (float(x) for x in line.splitlines()[0].split(","))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                continue
            self.samples.append((used, memory))

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self.available:
            self._thread.join()


def run(strategy: str, overrides: list[str], out: Path, cache: Path) -> dict:
    """One app run; its results with the training throughput and the GPU's samples."""
    run_dir = out / strategy
    command = [
        sys.executable, "-m", "freezeft.run", f"strategy={strategy}", *overrides,
        f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}",
    ]  # fmt: skip
    with GpuSampler() as sampler:
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(
            f"gpu_check: strategy={strategy} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    results = json.loads((run_dir / "results.json").read_text())
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    n_train = cfg.data.corpus.n_train
    trained = results["epochs"] * n_train  # utterances trained on (every epoch)
    return {
        "strategy": strategy,
        "utt_per_s": trained / results["train_seconds"],
        "gpu_util": statistics.mean(u for u, _ in sampler.samples) if sampler.samples else None,
        "gpu_util_max": max((u for u, _ in sampler.samples), default=None),
        "gpu_mem_peak_mib": max((m for _, m in sampler.samples), default=None),
        "test_cer": results["cer"],
        "train_seconds": results["train_seconds"],
        "wall_seconds": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny CPU configuration")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a temp dir)")
    parser.add_argument("--cache", type=Path, help="corpus/source cache (default: in --out)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    cache = args.cache or out / "cache"
    overrides = TINY if args.tiny else GPU
    rows = [run(strategy, overrides, out, cache) for strategy in STRATEGIES]

    def shown(value: float | None, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    print(f"gpu_check ({'tiny, CPU' if args.tiny else 'n_hidden=2048, bf16, GPU'}): {out}")
    print(
        "| strategy | utt/s (train) | GPU util mean / max % | peak GPU MiB | test CER | train s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['strategy']} | {r['utt_per_s']:.1f} | {shown(r['gpu_util'], '.0f')} / "
            f"{shown(r['gpu_util_max'], '.0f')} | {shown(r['gpu_mem_peak_mib'], '.0f')} | "
            f"{r['test_cer']:.3f} | {r['train_seconds']:.1f} |"
        )
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
