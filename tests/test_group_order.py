"""Groups in forward order: a module that calls its parameterised children one after
another is grouped by them in the order a real forward pass calls them; where that order
does not hold (a child called twice, never, or on a parallel branch) discovery refuses,
naming the parts and why. Groups with nothing to train are listed but not counted."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import FrozenEncoder
from freezeft.callbacks.frozen_encoder import head_indices
from freezeft.groups import ForwardPass, format_group_table, resolve_groups, trainable_groups

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed


class OutOfOrder(nn.Module):
    """Registered head first; called fc1 -> norm -> fc2 -> out (a residual and an in-place
    ReLU on the way: still one after another)."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(8, 3)
        self.fc2 = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = torch.relu_(self.norm(h))
        h = h + self.fc2(h)
        return self.out(h)


class Holder(nn.Module):
    """A LightningModule-like holder: ``self.net``, discovery descends into it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def _watched(holder: Holder, x: torch.Tensor) -> list[ForwardPass]:
    return [ForwardPass("a test batch", lambda: holder.net(x))]


def test_children_are_grouped_in_the_order_the_forward_pass_calls_them():
    holder = Holder(OutOfOrder())
    groups = resolve_groups(holder, forward=_watched(holder, torch.randn(2, 4)))
    assert [g.name for g in groups] == ["net.fc1", "net.norm", "net.fc2", "net.out"]
    assert groups.found_by == "the order net calls its parts in, watched on a test batch"
    table = format_group_table(groups, head=1)
    assert table.splitlines()[1].split()[1] == "net.fc1"
    assert table.endswith(
        "groups found by: the order net calls its parts in, watched on a test batch"
    )


def test_the_watched_pass_stops_when_the_module_returns():
    holder, after = Holder(OutOfOrder()), []

    def step() -> None:  # a training_step: what comes after the model must not run
        holder.net(torch.randn(2, 4))
        after.append("loss")

    groups = resolve_groups(holder, forward=[ForwardPass("a step", step)])
    assert len(groups) == 4 and after == []


class Twice(OutOfOrder):
    def forward(self, x):
        h = self.fc2(self.norm(self.fc1(x)))
        return self.out(h) + self.out(h)


class Parallel(OutOfOrder):
    def forward(self, x):
        h = self.norm(self.fc1(x))
        side = self.fc2(torch.ones_like(x[:, :1]).expand(-1, 8))  # not from norm's output
        return self.out(h + side)


class Unused(OutOfOrder):
    def forward(self, x):
        return self.out(self.fc2(self.fc1(x)))


@pytest.mark.parametrize(
    ("module", "why"),
    [
        (Twice, r"parts called more than once: net\.out \(2 times\)"),
        (Parallel, r"net\.fc2 does not take the output of net\.norm, .*\(parallel branches\)"),
        (Unused, r"parts never called: net\.norm"),
    ],
    ids=["called_twice", "parallel_branches", "never_called"],
)
def test_an_order_the_forward_pass_does_not_establish_is_refused_naming_the_parts(module, why):
    holder = Holder(module())
    with pytest.raises(ValueError, match=r"found 1 layer group in Holder\.net") as raised:
        resolve_groups(holder, forward=_watched(holder, torch.randn(2, 4)))
    message = str(raised.value)
    assert "'net.out' (27 params), 'net.fc2' (72 params)" in message
    assert "freezeft does not guess it" in message
    assert re.search(why, message), message


def test_a_pass_that_fails_or_never_reaches_the_module_is_named_and_the_next_one_tried():
    holder = Holder(OutOfOrder())
    x = torch.randn(2, 4)

    def broken() -> None:
        raise RuntimeError("shapes do not match\nmore")

    with pytest.raises(ValueError, match=r"on A, it raised RuntimeError: shapes do not match; "):
        resolve_groups(holder, forward=[ForwardPass("A", broken), ForwardPass("B", lambda: x)])
    groups = resolve_groups(
        holder, forward=[ForwardPass("A", lambda: x), ForwardPass("B", lambda: holder.net(x))]
    )
    assert groups.found_by.endswith("watched on B")


def test_without_a_forward_pass_the_error_says_one_orders_them_at_fit_start():
    with pytest.raises(ValueError, match=r"orders such parts by watching one forward pass"):
        resolve_groups(Holder(OutOfOrder()))


class Blocks(nn.Module):
    """Blocks of two types in a ModuleList that forward iterates (never calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.LayerNorm(8)])
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        x = self.inp(x)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


def test_a_module_list_iterated_in_forward_gives_one_group_per_block():
    holder = Holder(Blocks())
    groups = resolve_groups(holder, forward=_watched(holder, torch.randn(2, 4)))
    assert [g.name for g in groups] == ["net.inp", "net.blocks.0", "net.blocks.1", "net.out"]


def test_the_other_discovery_paths_say_how_they_found_the_groups():
    net = Holder(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
    assert resolve_groups(net).found_by.startswith("the repeated stack net (2 blocks)")
    mixed = Holder(nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2)))
    assert resolve_groups(mixed).found_by == "containers descended, in registration order"
    assert resolve_groups(net, ["net.0", "net.2"]).found_by == "`groups`, as given"


def test_groups_the_user_froze_are_listed_but_not_counted():
    holder = Holder(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)))
    groups = resolve_groups(holder)
    for index in (0, 2):  # a LoRA-like base: input and output layers frozen by the user
        for param in groups[index].params.values():
            param.requires_grad_(False)
    assert trainable_groups(groups) == [1]
    expected = r"`head=1` leaves no encoder group .* 1 layer groups that can train "
    expected += r"\(\['net.1'\]\); \['net.0', 'net.2'\] hold only"
    with pytest.raises(ValueError, match=expected):
        head_indices(1, groups, "FrozenEncoder", trainable_groups(groups))
    frozen = {n for g in groups for n, p in g.params.items() if not p.requires_grad}
    table = format_group_table(groups, head=[1], user_frozen=frozen)
    roles = [line.split()[-1] for line in table.splitlines()[1:4]]
    assert roles == ["user-frozen", "head", "user-frozen"]
    assert "not counted by head, n_frozen, stages or LR depths" in table


class TopLevel(pl.LightningModule):
    """The layers on the LightningModule itself, registered head first (``reuse``: fc2
    called twice as well)."""

    def __init__(self, registered: tuple[str, ...] = ("out", "fc2", "fc1"), reuse=False):
        super().__init__()
        sizes = {"fc1": (4, 8), "fc2": (8, 8), "out": (8, 2)}
        for name in registered:
            setattr(self, name, nn.Linear(*sizes[name]))
        self.reuse = reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        return self.out(self.fc2(h) if self.reuse else h)

    def training_step(self, batch, _index):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_top_level(module: pl.LightningModule, strategy) -> None:
    data = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)))
    torch.manual_seed(0)
    quiet_trainer(max_epochs=1, callbacks=[strategy]).fit(module, DataLoader(data, batch_size=4))


def test_the_lightning_modules_own_layers_are_ordered_by_its_forward_pass():
    """Registered out, fc2, fc1 and called fc1 -> fc2 -> out: `out` is the head, as the
    forward pass says, and fc1, fc2 end bit-identical (registration order froze `out`)."""
    module = TopLevel()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    strategy = FrozenEncoder(head=1)
    _fit_top_level(module, strategy)
    assert [g.name for g in strategy.groups] == ["fc1", "fc2", "out"]
    assert strategy.coordinator.found_by == (
        "the order TopLevel calls its parts in, watched on one training batch (training_step "
        "at fit start), containers descended"
    )
    after = module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("out."))
    assert not torch.equal(after["out.weight"], before["out.weight"])


def test_own_layers_the_pass_cannot_order_stay_registered_with_a_warning_or_are_refused():
    """fc2 called twice: registered fc1, fc2, out, the first calls agree, so the
    registration order stands with a warning; registered out, fc2, fc1, the first calls
    contradict it and the pass cannot settle it: refused at fit start, naming both."""
    strategy = FrozenEncoder(head=1)
    with pytest.warns(
        UserWarning,
        match=r"in the order __init__ registered them, \['fc1', "
        r"'fc2', 'out'\], .* parts called more than once: fc2 \(2 times\)",
    ):
        _fit_top_level(TopLevel(("fc1", "fc2", "out"), reuse=True), strategy)  # fmt: skip
    assert [g.name for g in strategy.groups] == ["fc1", "fc2", "out"]
    expected = (
        r"cannot order the layer groups of TopLevel: its parts are registered as \['out', "
        r"'fc2', 'fc1'\], a forward pass first calls them as \['fc1', 'fc2', 'out'\]"
    )
    with pytest.raises(ValueError, match=expected):
        _fit_top_level(TopLevel(reuse=True), FrozenEncoder(head=1))


class HeadFirst(pl.LightningModule):
    """``self.head`` registered before a backbone whose blocks are a repeated stack, which
    ``features`` runs block by block (a method: the backbone's own forward never runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.backbone:
            x = torch.relu(block(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    training_step = TopLevel.training_step
    configure_optimizers = TopLevel.configure_optimizers


def test_a_head_registered_before_the_stack_is_still_the_head():
    """The stack's stem and head were taken in registration order: `head` became the stem
    and FrozenEncoder trained the backbone's last block. The forward pass orders the
    module's own parts, a part run through a method (its submodules called) included."""
    module = HeadFirst()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    strategy = FrozenEncoder(head=1)
    _fit_top_level(module, strategy)
    assert [g.name for g in strategy.groups] == [
        "backbone.0", "backbone.1", "backbone.2", "head"
    ]  # fmt: skip
    assert "in the order HeadFirst calls its parts in" in strategy.coordinator.found_by
    after = module.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(after["head.weight"], before["head.weight"])


class ManualDirect(TopLevel):
    """Manual optimization, the layers called in training_step itself (no forward), a step
    counter buffer and an EMA updated after the step: the watched pass must leave no trace
    (no optimizer or scheduler step, the buffers as they were)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.register_buffer("steps", torch.zeros(()))
        self.register_buffer("ema", torch.zeros(2, 8))

    def training_step(self, batch, _index):
        x, y = batch
        optimizer = self.optimizers()
        self.steps += 1  # before the layers: runs in the watched pass too, then put back
        try:
            logits = self.out(self.fc2(torch.relu(self.fc1(x))))
        except Exception:  # a user's broad except must not swallow the pass's stop
            raise
        loss = nn.functional.cross_entropy(logits, y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.lr_schedulers().step()
        with torch.no_grad():
            self.ema.mul_(0.5).add_(self.out.weight, alpha=0.5)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)]


def test_manual_optimization_calling_the_layers_itself_is_ordered_and_untouched():
    """The whole training_step is watched until every layer ran (its manual_backward and
    optimizer and scheduler steps inert): groups fc1, fc2, out, and the fit ends exactly
    as the same fit with the groups given (no pass at all)."""
    results = []
    for groups in (None, ["fc1", "fc2", "out"]):
        torch.manual_seed(0)
        module = ManualDirect()
        strategy = FrozenEncoder(head=1, groups=groups)
        _fit_top_level(module, strategy)
        results.append((module, strategy))
    (watched, strategy), (given, _) = results
    assert [g.name for g in strategy.groups] == ["fc1", "fc2", "out"]
    assert watched.steps.item() == given.steps.item() == 4  # 4 batches, not 5
    after, expected = watched.state_dict(), given.state_dict()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    assert watched.lr_schedulers().get_last_lr() == given.lr_schedulers().get_last_lr()


class WithTeacher(TopLevel):
    """A frozen teacher the forward never calls (its every parameter frozen by the user)."""

    def __init__(self) -> None:
        super().__init__()
        self.teacher = nn.Linear(4, 2).requires_grad_(False)


def test_a_part_the_user_froze_need_not_be_called():
    strategy = FrozenEncoder(head=1)
    _fit_top_level(WithTeacher(), strategy)
    assert [g.name for g in strategy.groups] == ["fc1", "fc2", "out", "teacher"]
    table = strategy.coordinator.found_by
    assert table.startswith("the order WithTeacher calls its parts in")


def test_compiled_layers_are_watched_as_plain_python():
    """torch.compile'd parts (and a compiled module) ran the watch through Dynamo, which
    failed on its hooks: the order was left unconfirmed or refused."""
    module = TopLevel()
    module.out = torch.compile(module.out, backend="eager")
    module.fc1 = torch.compile(module.fc1, backend="eager")
    strategy = FrozenEncoder(head=1)
    _fit_top_level(module, strategy)
    assert [g.name for g in strategy.groups] == ["fc1._orig_mod", "fc2", "out._orig_mod"]
    assert strategy.coordinator.found_by.startswith("the order TopLevel calls its parts in")
