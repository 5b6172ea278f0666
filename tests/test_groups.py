import pytest
from torch import nn

from freezeft.groups import format_group_table, resolve_groups

pytestmark = pytest.mark.library  # runs where only torch and Lightning are installed


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
        )


class Wrapped(nn.Module):
    """A wrapper with one parameterised child is descended into."""

    def __init__(self):
        super().__init__()
        self.inner = Net()


def test_discovery_finds_the_parameterised_layers_of_a_sequential():
    assert [g.name for g in resolve_groups(Net())] == ["net.0", "net.2", "net.4"]
    wrapped = resolve_groups(Wrapped())
    assert [g.name for g in wrapped] == ["inner.net.0", "inner.net.2", "inner.net.4"]


def test_patterns_group_several_modules_and_every_param_is_owned_once():
    groups = resolve_groups(Net(), ["net.[02]", "net.4"])
    assert [g.modules for g in groups] == [["net.0", "net.2"], ["net.4"]]
    assert sorted(groups[0].params) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert groups[0].num_params == 4 * 8 + 8 + 8 * 8 + 8


def test_unknown_group_lists_the_available_names():
    available = r"\['net', 'net\.0', 'net\.2', 'net\.4'\]"
    with pytest.raises(ValueError, match=r"'net\.9' matches no module.*" + available):
        resolve_groups(Net(), ["net.0", "net.9"])


def test_overlapping_patterns_are_refused():
    with pytest.raises(ValueError, match="matched by two layer groups"):
        resolve_groups(Net(), ["net.*", "net.0"])


def test_layer_groups_hook_is_used():
    class Hooked(Net):
        def layer_groups(self):
            return ["net.0", "net.[24]"]

    assert [g.name for g in resolve_groups(Hooked())] == ["net.0", "net.[24]"]


def test_table_lists_groups_and_trainable_count():
    groups = resolve_groups(Net())
    for p in groups[0].params.values():
        p.requires_grad_(False)
    table = format_group_table(groups, head=1)
    assert "net.0" in table and "head" in table
    assert "trainable parameters: 90 of 130" in table
