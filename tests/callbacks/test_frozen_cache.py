"""cache_frozen=True: the head trains from cached outputs of the frozen layers, and the cache
is dropped whenever what it assumed (prefix, determinism, weights) stops being true; its
spill folder goes on any exit, and a full disk while spilling is named."""

from __future__ import annotations

import errno
import gc
import os
import re
import socket
import subprocess
import sys
import tempfile

import pytest
import pytorch_lightning as pl
import torch
from full_disk import fill
from tiny_models import quiet_trainer

from freezeft.callbacks import AutoFreeze, FreezeThenUnfreeze, FrozenEncoder, GradualUnfreeze
from freezeft.frozen_cache import FrozenOutputCache, cached_forward
from freezeft.speech.data import SpeechDataModule
from freezeft.speech.manifest import read_csv
from freezeft.speech.module import SpeechModule


def fit(german_mini, strategy, epochs=3, extra=(), dropout=0.0, **module_options):
    """The fitted module, its weights before, and how many samples an epoch sees (its
    training samples and, in its validation, the dev samples: both go through the cache).
    8 training utterances in batches of 2: 4 steps an epoch."""
    pl.seed_everything(0)
    data = SpeechDataModule(data_dir=german_mini, batch_size=2)
    module = SpeechModule(
        labels=data.alphabet.labels, n_hidden=32, dropout=dropout, **module_options
    )
    trainer = quiet_trainer(
        max_epochs=epochs, accelerator="cpu", num_sanity_val_steps=0, callbacks=[strategy, *extra]
    )
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.fit(module, datamodule=data)
    return module, before, len(data.dataset("train")) + len(data.dataset("dev"))


class Spy(pl.Callback):
    """Per epoch (after its validation): the cache's hit and miss counts so far, and its
    prefix length; ``sizes``: how many outputs it holds, ``val_loss``: each epoch's (the
    only record of a strategy without a cache)."""

    def __init__(self, strategy):
        self.strategy, self.seen, self.sizes, self.val_loss = strategy, [], [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.val_loss.append(float(trainer.callback_metrics["val_loss"]))
        cache = self.strategy.coordinator.frozen_cache
        if cache is not None:
            self.seen.append((cache.hits, cache.misses, cache.n_groups, len(cache.invalidations)))
            self.sizes.append(len(cache))


def test_head_trains_from_cached_outputs_after_the_first_epoch(german_mini):
    strategy = FrozenEncoder(head=1, cache_frozen=True)
    spy = Spy(strategy)
    module, before, n = fit(german_mini, strategy, extra=[spy])
    # epoch 0 computes every sample's layer_5 output once (training and validation);
    # epochs 1 and 2 only read them
    assert spy.seen == [(0, n, 5, 0), (n, n, 5, 0), (2 * n, n, 5, 0)]
    for name, tensor in module.state_dict().items():
        if not name.startswith("model.layer_6"):
            assert torch.equal(tensor, before[name]), name  # the encoder never changed
    assert not torch.equal(module.model.layer_6.weight, before["model.layer_6.weight"])
    assert FrozenOutputCache.of(module) is None  # released at the end of fit

    uncached = Spy(FrozenEncoder(head=1))  # no cache, same (dropout-free) model
    plain, _, _ = fit(german_mini, uncached.strategy, extra=[uncached])
    for name, tensor in plain.state_dict().items():
        assert torch.allclose(module.state_dict()[name], tensor, atol=1e-5), name
    assert spy.val_loss == pytest.approx(uncached.val_loss, abs=1e-5)  # validation as well


def test_speed_perturbed_training_caches_one_output_per_sample_and_speed(german_mini):
    strategy = FrozenEncoder(head=1, cache_frozen=True)
    spy = Spy(strategy)
    speeds = [0.9, 1.1]
    module, _, n = fit(german_mini, strategy, epochs=4, extra=[spy], speed_perturbation=speeds)
    n_dev = len(read_csv(german_mini / "dev.csv"))
    n_train = n - n_dev
    hits, misses, prefix, invalidations = spy.seen[-1]
    assert (prefix, invalidations) == (5, 0)
    assert hits + misses == 4 * n
    # every training sample at most once per speed, each dev sample once
    assert spy.sizes[-1] == misses <= len(speeds) * n_train + n_dev
    # reused across epochs, not only in validation
    assert spy.sizes[0] == n and hits > 3 * n_dev
    # the same speeds drawn in the same order: the same model as without the cache
    uncached = Spy(FrozenEncoder(head=1))
    plain, _, _ = fit(
        german_mini, uncached.strategy, epochs=4, extra=[uncached],
        speed_perturbation=speeds,
    )  # fmt: skip
    for name, tensor in plain.state_dict().items():
        assert torch.allclose(module.state_dict()[name], tensor, atol=1e-5), name
    assert spy.val_loss == pytest.approx(uncached.val_loss, abs=1e-5)


def test_outputs_past_the_memory_budget_go_to_disk(german_mini):
    on_disk = FrozenEncoder(head=1, cache_frozen=True, cache_memory_gb=0)
    spy = Spy(on_disk)
    module, _, n = fit(german_mini, on_disk, epochs=2, extra=[spy])
    assert spy.seen[-1][:2] == (n, n)
    in_memory, _, _ = fit(german_mini, FrozenEncoder(head=1, cache_frozen=True), epochs=2)
    for name, tensor in in_memory.state_dict().items():
        assert torch.equal(module.state_dict()[name], tensor), name


def test_unfreezing_drops_the_cache(german_mini):
    strategy = FreezeThenUnfreeze(head=1, unfreeze_at_epoch=2, cache_frozen=True)
    spy = Spy(strategy)
    _, _, n = fit(german_mini, strategy, extra=[spy])
    assert spy.seen[:2] == [(0, n, 5, 0), (n, n, 5, 0)]
    hits, misses, prefix, invalidations = spy.seen[2]
    assert (hits, misses, prefix) == (n, n, 0)  # phase 2 trains everything, uncached
    assert strategy.coordinator.frozen_cache.invalidations == [
        "the frozen prefix changed from 5 to 0 groups"
    ]


def test_a_shrinking_prefix_is_recomputed(german_mini):
    strategy = GradualUnfreeze(head=1, every_n_epochs=1, cache_frozen=True)
    spy = Spy(strategy)
    _, _, n = fit(german_mini, strategy, extra=[spy])
    assert [prefix for *_, prefix, _ in spy.seen] == [5, 4, 3]
    assert [misses for _, misses, *_ in spy.seen] == [n, 2 * n, 3 * n]
    assert strategy.coordinator.frozen_cache.invalidations == [
        "the frozen prefix changed from 5 to 4 groups",
        "the frozen prefix changed from 4 to 3 groups",
    ]


class AtEpoch(pl.Callback):
    def __init__(self, epoch, action):
        self.epoch, self.action = epoch, action

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            self.action(pl_module)


def test_augmentation_turns_the_cache_off(german_mini):
    strategy = FrozenEncoder(head=1, cache_frozen=True)
    spy = Spy(strategy)
    noise_on = AtEpoch(1, lambda m: setattr(m, "noise_std", 0.01))
    _, _, n = fit(german_mini, strategy, extra=[noise_on, spy])
    assert [(h, m) for h, m, *_ in spy.seen] == [(0, n), (0, n), (0, n)]  # no hit once noisy
    assert strategy.coordinator.frozen_cache.invalidations == [
        "the frozen prefix is not deterministic (augmentation is on)"
    ]


def test_changed_frozen_weights_invalidate_the_cache(german_mini):
    strategy = FrozenEncoder(head=1, cache_frozen=True)
    spy = Spy(strategy)

    def edit(module):
        with torch.no_grad():
            module.model.layer_2.weight.mul_(0.5)

    _, _, n = fit(german_mini, strategy, extra=[AtEpoch(1, edit), spy])
    assert [(h, m) for h, m, *_ in spy.seen] == [(0, n), (0, 2 * n), (n, 2 * n)]
    assert strategy.coordinator.frozen_cache.invalidations == ["a frozen weight changed"]


def test_a_module_without_the_protocol_is_told_what_to_implement(german_mini):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)))
    trainer = quiet_trainer(max_epochs=1, callbacks=[FrozenEncoder(head=1, cache_frozen=True)])
    with pytest.raises(TypeError, match=r"implement freezeft.frozen_cache.PrefixCachable"):
        trainer.fit(Plain(), data)


def test_a_growing_prefix_carries_its_outputs_through_the_newly_frozen_groups(german_mini):
    # one window per epoch (4 steps), every window calm: a group freezes at each epoch's end
    # from epoch 1 on, so epochs 2, 3 and 4 train behind 1, 2 and 3 frozen groups
    def auto_freeze(**cache):
        return AutoFreeze(
            threshold=1e9, check_every_n_steps=4, patience=1, after_plateau=False, **cache
        )

    strategy = auto_freeze(cache_frozen=True)
    spy = Spy(strategy)
    module, _, n = fit(german_mini, strategy, epochs=5, extra=[spy])
    assert [d["group"] for d in strategy.decisions][:3] == [
        "model.layer_1", "model.layer_2", "model.layer_3"
    ]  # fmt: skip
    cache = strategy.coordinator.frozen_cache
    # epoch 2 computes layer_1's outputs once; epochs 3 and 4 carry them deeper instead of
    # recomputing them from the audio
    assert [(h, m, p) for h, m, p, _ in spy.seen] == [
        (0, 0, 0), (0, 0, 0), (0, n, 1), (n, n, 2), (2 * n, n, 3)
    ]  # fmt: skip
    assert cache.advanced == 2 * n and cache.invalidations == []
    plain, _, _ = fit(german_mini, auto_freeze(), epochs=5)
    for name, tensor in plain.state_dict().items():
        assert torch.allclose(module.state_dict()[name], tensor, atol=1e-5), name


class DropoutNet(pl.LightningModule):
    """A user's own PrefixCachable module: dense blocks with dropout inside the groups,
    integer sample keys (the same in training and validation), a validation_step that asks
    the cache too, and no ``advance_prefix``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        block = lambda: torch.nn.Sequential(  # noqa: E731
            torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Dropout(0.3)
        )
        self.blocks = torch.nn.ModuleList([block(), block()])
        self.head = torch.nn.Linear(6, 1)
        self.prefix_modes: list[bool] = []  # the mode forward_prefix ran in, each call

    def layer_groups(self):
        return ["blocks.0", "blocks.1", "head"]

    def sample_keys(self, batch):
        return batch[2].tolist()

    def forward_prefix(self, batch, n_groups):
        self.prefix_modes.append(self.blocks[0][2].training)
        x = batch[0]
        for block in self.blocks[:n_groups]:
            x = block(x)
        return list(x)

    def forward_from_prefix(self, outputs, batch, n_groups):
        x = torch.stack(list(outputs))
        for block in self.blocks[n_groups:]:
            x = block(x)
        return self.head(x)

    def prefix_is_deterministic(self):
        return True

    def _output(self, batch):
        output = cached_forward(self, batch)
        if output is None:
            x = batch[0]
            for block in self.blocks:
                x = block(x)
            output = self.head(x)
        return torch.nn.functional.mse_loss(output, batch[1])

    def training_step(self, batch, batch_idx):
        return self._output(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._output(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def loaders(self):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)
        data = torch.utils.data.TensorDataset(x, y, torch.arange(16))
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        return loader, loader


def test_a_users_dropout_is_off_in_what_the_cache_holds():
    module = DropoutNet()
    strategy = FrozenEncoder(head=1, cache_frozen=True)
    spy = Spy(strategy)
    trainer = quiet_trainer(max_epochs=3, num_sanity_val_steps=0, callbacks=[strategy, spy])
    trainer.fit(module, *module.loaders())
    assert module.prefix_modes and not any(module.prefix_modes)  # computed in eval mode
    # 16 training and 16 validation samples under the same integer keys, kept apart
    assert spy.seen[-1][:2] == (2 * 32, 32) and spy.sizes[-1] == 32


def spill_fit(tmp_path, monkeypatch, module, epochs=2):
    """A fit whose every frozen output spills (cache_memory_gb=0) into ``tmp_path/tmp``,
    the system's temporary folder ($TMPDIR) meanwhile."""
    spill_root = tmp_path / "tmp"
    spill_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill_root))
    strategy = FrozenEncoder(head=1, cache_frozen=True, cache_memory_gb=0)
    trainer = quiet_trainer(max_epochs=epochs, num_sanity_val_steps=0, callbacks=[strategy])
    trainer.fit(module, *module.loaders())
    return spill_root


def test_a_full_disk_while_spilling_names_the_folder_and_removes_it(tmp_path, monkeypatch):
    fill(monkeypatch, tmp_path / "tmp")
    with pytest.raises(OSError) as raised:
        spill_fit(tmp_path, monkeypatch, DropoutNet())
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert re.search(rf"no space left on {tmp_path}/tmp/freezeft-frozen-[^ ]+ \(\d+ MiB free\) "
                     r"while writing .*\.pt", message), message  # fmt: skip
    assert "Set TMPDIR to a folder with room" in message and "cache_memory_gb" in message
    assert list((tmp_path / "tmp").iterdir()) == []  # the spill folder is gone


class FailsInEpoch1(DropoutNet):
    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            raise RuntimeError("a bug in the user's module")


def test_the_spill_folder_goes_when_a_failed_fit_is_let_go(tmp_path, monkeypatch):
    """A fit that raises does not tear its callbacks down (Lightning skips ``teardown``): the
    folder goes when the cache does, at the latest when the process exits."""
    with pytest.raises(RuntimeError, match="a bug in the user's module"):
        spill_fit(tmp_path, monkeypatch, FailsInEpoch1())
    spilled = list((tmp_path / "tmp").glob("freezeft-frozen-*"))
    assert spilled and any(spilled[0].iterdir())  # its outputs of epoch 0
    gc.collect()  # the trainer, the strategy and the cache are no one's now
    assert not spilled[0].exists()


def test_a_killed_processes_spill_folder_goes_with_the_next_spill(tmp_path):
    gone = subprocess.Popen(["true"])  # a process that ended: the run killed with -9
    gone.wait()
    left = tmp_path / f"freezeft-frozen-{gone.pid}@{socket.gethostname()}-abc123"
    left.mkdir()
    (left / "1.pt").write_bytes(b"outputs of a run killed with -9")
    alive = tmp_path / f"freezeft-frozen-{os.getpid()}@{socket.gethostname()}-def456"
    alive.mkdir()  # a live run's: kept
    elsewhere = tmp_path / f"freezeft-frozen-{gone.pid}@another-machine-ghi789"
    elsewhere.mkdir()  # a shared TMPDIR: another machine's process may live
    cache = FrozenOutputCache(memory_gb=0, spill_dir=tmp_path)
    cache.put(("train", 0), torch.ones(3))
    assert not left.exists() and alive.exists() and elsewhere.exists()
    cache.clear()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, elsewhere.name])


@pytest.mark.slow  # a subprocess
def test_the_spill_folder_goes_when_the_process_exits_on_an_error(tmp_path):
    script = (
        "import torch\n"
        "from freezeft.frozen_cache import FrozenOutputCache\n"
        f"cache = FrozenOutputCache(memory_gb=0, spill_dir={str(tmp_path)!r})\n"
        "cache.put(('train', 0), torch.ones(3))\n"
        "raise RuntimeError('the run failed')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1 and "the run failed" in done.stderr
    assert list(tmp_path.iterdir()) == []
