"""Groups in forward order: a module that calls its parameterised children one after
another is grouped by them in the order a real forward pass calls them; where that order
does not hold (a child called twice, never, or on a parallel branch) discovery refuses,
naming the parts and why. Groups with nothing to train are listed but not counted."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

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
