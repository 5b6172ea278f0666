"""What each strategy costs per training step: time, memory and optimizer state.

    python benchmarks/strategy_cost.py [--accelerator cpu|gpu] [--epochs 3] [--utterances 640]
                                       [--data-dir DIR] [--rounds 2] [--json results.json]

One process, the same model (n_hidden 256 by default), the same real batches of the
embedded German corpus (its first ``--utterances`` training rows, length-bucketed,
batch 32) for every variant:

* plain Lightning: no callback, and Lightning's own ``BackboneFinetuning`` (phase 1);
* freezeft: NaiveTransfer (full fine-tuning, the 1.00x reference), FrozenEncoder(head=1)
  without and with ``cache_frozen``, FreezeThenUnfreeze phase 1, NaiveTransfer +
  DiscriminativeLR.

Step time is the median over the steps of epochs 1 and later (epoch 0 fills the
frozen-output cache and warms up); memory is the peak CUDA allocation, or on the CPU
what training adds to the resident memory at its peak (``ru_maxrss`` of a fresh process
that trains only that variant, less its resident memory before ``fit``; the whole
process's peak, torch's libraries included, is reported beside it); optimizer state is
counted in bytes, for frozen parameters separately. Activation memory is counted
exactly: the largest per-step total of the tensors autograd saves for backward (in epoch
0). The callbacks' own cost is timed directly too: the time spent in their hooks
(Lightning's SimpleProfiler), per step. On a GPU also utterances per second and the
GPU's utilisation (NVML, sampled every 50 ms). ``--rounds`` repeats the whole set in
alternation and keeps each variant's fastest median, against drift in shared machines.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BackboneFinetuning
from pytorch_lightning.profilers import SimpleProfiler
from torch import nn

from freezeft.callbacks import DiscriminativeLR, FreezeThenUnfreeze, FrozenEncoder, NaiveTransfer
from freezeft.machine import describe, summary
from freezeft.speech.data import SpeechDataModule
from freezeft.speech.module import SpeechModule


class WithBackbone(SpeechModule):
    """The speech model as Lightning's BackboneFinetuning expects it: a ``backbone``."""

    @property
    def backbone(self) -> nn.Module:
        m = self.model
        return nn.ModuleList([m.layer_1, m.layer_2, m.layer_3, m.lstm, m.layer_5])


class Probe(pl.Callback):
    """Step times per epoch, activations kept for backward, GPU utilisation.

    In epoch 0 (left out of the step times) it counts the bytes of the tensors autograd
    saves for the backward pass of each step, parameters left out: the memory an
    autograd graph through the frozen layers would cost.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: dict[int, list[float]] = {}
        self.util: list[float] = []
        self.saved_bytes: list[int] = []
        self._stop = threading.Event()

    def on_train_start(self, trainer, pl_module):
        self._params = {p.untyped_storage().data_ptr() for p in pl_module.parameters()}
        if self.cuda:
            threading.Thread(target=self._sample_gpu, daemon=True).start()

    def _sample_gpu(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # no NVML: no utilisation figure
            return
        while not self._stop.wait(0.05):
            self.util.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def on_train_end(self, trainer, pl_module):
        self._stop.set()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._params:
            self._saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._hooks = None
        if trainer.current_epoch == 0:
            self._saved: dict[int, int] = {}
            self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._hooks.__enter__()
        if self.cuda:
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.setdefault(trainer.current_epoch, []).append(time.perf_counter() - self.start)
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self.saved_bytes.append(sum(self._saved.values()))


def rss_bytes() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * 4096


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(all, of frozen parameters) bytes of optimizer state tensors."""
    total = frozen = 0
    for param, state in optimizer.state.items():
        size = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        total += size
        if not param.requires_grad:
            frozen += size
    return total, frozen


def measure(name, callbacks, data, args, module_cls=SpeechModule) -> dict:
    pl.seed_everything(0)
    cuda = args.accelerator == "gpu"
    module = module_cls(labels=data.alphabet.labels, n_hidden=args.n_hidden)
    probe = Probe(cuda)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rss_before = rss_bytes()
    profiler = SimpleProfiler()
    trainer = pl.Trainer(
        profiler=profiler,
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=args.epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, probe],
    )
    trainer.fit(module, datamodule=data)
    steps = [t for epoch, times in probe.times.items() if epoch >= 1 for t in times]
    step = statistics.median(steps)
    # every call of the strategy callbacks' hooks, one-time ones included, per step
    prefixes = tuple(f"[Callback]{c.state_key}." for c in callbacks)
    hooks = sum(
        sum(durations)
        for action, durations in profiler.recorded_durations.items()
        if prefixes and action.startswith(prefixes)
    )
    total_state, frozen_state = optimizer_state_bytes(trainer.optimizers[0])
    return {
        "variant": name,
        "step_ms": step * 1000,
        "epoch0_step_ms": statistics.median(probe.times[0]) * 1000,
        "callback_ms_per_step": hooks / trainer.global_step * 1000,
        # on the CPU only meaningful in a fresh process (see peak_memory_of_child)
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated() if cuda else max_rss_bytes() - rss_before
        )
        / 2**20,
        "process_peak_mb": None if cuda else max_rss_bytes() / 2**20,
        "saved_for_backward_mb": max(probe.saved_bytes) / 2**20,
        "optimizer_state_mb": total_state / 2**20,
        "frozen_optimizer_state_bytes": frozen_state,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "utterances_per_s": args.batch_size / step,
        "gpu_util": statistics.fmean(probe.util) if probe.util else None,
    }


def max_rss_bytes() -> int:
    """The peak resident memory of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def peak_memory_of_child(name: str, args: argparse.Namespace) -> dict:
    """``peak_memory_mb`` and ``process_peak_mb`` of a fresh process training ``name``."""
    command = [sys.executable, __file__, "--only", name, "--rounds", "1"]
    command += ["--epochs", str(args.epochs), "--utterances", str(args.utterances)]
    command += ["--n-hidden", str(args.n_hidden), "--data-dir", str(args.data_dir)]
    child = subprocess.run(command, capture_output=True, text=True)
    results = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
    if child.returncode != 0 or not results:
        raise RuntimeError(
            f"measuring {name!r} in a child process failed (exit {child.returncode}):\n"
            + child.stderr[-2000:]
        )
    result = json.loads(results[-1].removeprefix("RESULT "))
    return {key: result[key] for key in ("peak_memory_mb", "process_peak_mb")}


def subset(data_dir: Path, utterances: int, folder: Path) -> Path:
    """A DeepSpeech folder with the first ``utterances`` training rows and 64 dev rows."""
    for split, count in (("train", utterances), ("dev", 64), ("test", 64)):
        with open(data_dir / f"{split}.csv", newline="") as stream:
            rows = list(csv.reader(stream))
        with open(folder / f"{split}.csv", "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(rows[0])
            for wav, size, text in rows[1 : count + 1]:
                writer.writerow([str((data_dir / wav).resolve()), size, text])
    (folder / "alphabet.txt").write_text((data_dir / "alphabet.txt").read_text())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default=None, help="default: 32 on CPU, bf16-mixed on GPU")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--utterances", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, help="DeepSpeech folder (default: the corpus)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--profile", metavar="VARIANT", help="print a torch profile of one")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16-mixed" if args.accelerator == "gpu" else "32-true")
    if args.data_dir is None:
        from freezeft.speech.corpus import SynthCorpus

        args.data_dir = SynthCorpus(language="de", n_train=1500, n_dev=200, n_test=300).build()
    folder = subset(args.data_dir, args.utterances, Path(tempfile.mkdtemp()))
    data = SpeechDataModule(data_dir=folder, batch_size=args.batch_size)

    variants = {
        "plain Lightning, no callback": lambda: ([], SpeechModule),
        "NaiveTransfer (full fine-tuning)": lambda: ([NaiveTransfer()], SpeechModule),
        "FrozenEncoder(head=1)": lambda: ([FrozenEncoder(head=1)], SpeechModule),
        "FrozenEncoder(head=1, cache_frozen=True)": lambda: (
            [FrozenEncoder(head=1, cache_frozen=True)],
            SpeechModule,
        ),
        "FreezeThenUnfreeze, phase 1": lambda: (
            [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=99)],
            SpeechModule,
        ),
        "NaiveTransfer + DiscriminativeLR(0.7)": lambda: (
            [NaiveTransfer(), DiscriminativeLR(0.7)],
            SpeechModule,
        ),
        "Lightning BackboneFinetuning, phase 1": lambda: (
            [BackboneFinetuning(unfreeze_backbone_at_epoch=99)],
            WithBackbone,
        ),
    }
    if args.profile:  # where a variant's time goes, by torch operator
        callbacks, cls = variants[args.profile]()
        with torch.profiler.profile() as prof:
            measure(args.profile, callbacks, data, args, cls)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        return
    if args.only:  # a child process measuring one variant's peak memory (see below)
        callbacks, cls = variants[args.only]()
        result = measure(args.only, callbacks, data, args, cls)
        print("RESULT " + json.dumps(result))
        return
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, make in variants.items():
            callbacks, cls = make()
            result = measure(name, callbacks, data, args, cls)
            if name not in best or result["step_ms"] < best[name]["step_ms"]:
                best[name] = result
    if args.accelerator == "cpu":
        # a process's peak resident memory never goes down, so each variant's is read
        # from a fresh process of its own
        for name in variants:
            best[name].update(peak_memory_of_child(name, args))
    base = best["NaiveTransfer (full fine-tuning)"]
    plain = best["plain Lightning, no callback"]
    machine = describe()
    print(f"\n{summary(machine)}; {args.accelerator}, precision {args.precision}")
    print(
        f"n_hidden {args.n_hidden}, batch {args.batch_size}, {args.utterances} utterances, "
        f"{args.epochs} epochs x {args.rounds} rounds; step time = median over epochs >= 1\n"
    )
    header = (
        "| variant | step (ms) | vs full | saved for backward (MB) | vs full "
        "| peak memory (MB) | vs full | optimizer state (MB) | of it frozen (bytes) | utt/s "
        "| in strategy hooks (ms/step) |"
    )
    header += " GPU util % |" if args.accelerator == "gpu" else " process peak (MB) |"
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for name, r in best.items():
        row = (
            f"| {name} | {r['step_ms']:.1f} | {r['step_ms'] / base['step_ms']:.2f}x | "
            f"{r['saved_for_backward_mb']:.1f} | "
            f"{r['saved_for_backward_mb'] / base['saved_for_backward_mb']:.2f}x | "
            f"{r['peak_memory_mb']:.0f} | {r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x | "
            f"{r['optimizer_state_mb']:.2f} | {r['frozen_optimizer_state_bytes']} | "
            f"{r['utterances_per_s']:.0f} | {r['callback_ms_per_step']:.3f} |"
        )
        if args.accelerator == "gpu":
            row += f" {r['gpu_util']:.0f} |" if r["gpu_util"] is not None else " – |"
        else:
            row += f" {r['process_peak_mb']:.0f} |"
        print(row)
    print()
    for name in ("NaiveTransfer (full fine-tuning)", "NaiveTransfer + DiscriminativeLR(0.7)"):
        overhead = best[name]["step_ms"] / plain["step_ms"] - 1
        hooks = best[name]["callback_ms_per_step"] / best[name]["step_ms"]
        print(
            f"{name}: step time vs no callback {overhead:+.1%}; "
            f"time inside its callbacks' hooks {hooks:.2%} of a step"
        )
    if args.json:
        payload = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({**payload, "results": best}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
