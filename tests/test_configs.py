"""Every YAML composes, instantiates, and binds its keys against its target's signature."""

import inspect
from pathlib import Path

import freezeft.conf
import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf

import freezeft.speech.conf
from freezeft.app.build import build_run as check_config

CONF = Path(freezeft.conf.__file__).parent  # the app's configs
SPEECH_CONF = Path(freezeft.speech.conf.__file__).parent  # the speech task's, on its search path
OPTIONS = sorted(
    (path.parent.name, path.stem)
    for root in (CONF, SPEECH_CONF)
    for path in root.glob("*/*.yaml")
    if path.parent.name not in ("hydra", "parts", "speech")  # pieces the options share
)
SPECIAL = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def compose_with(*overrides: str) -> DictConfig:
    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=False)


def target_blocks(node, where="cfg"):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield where, node
        for key, value in node.items_ex(resolve=False):
            yield from target_blocks(value, f"{where}.{key}")
    elif OmegaConf.is_list(node):
        for i, value in enumerate(node):
            yield from target_blocks(value, f"{where}[{i}]")


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_binds_to_its_targets(group, option, tmp_path):
    choice = f"[{option}]" if group == "addons" else option  # a list-valued group
    overrides = [f"{group}={choice}", f"paths.cache_dir={tmp_path}"]
    if option == "deepspeech_csv":
        overrides.append(f"data.data_dir={tmp_path}")
    if option == "schedule":  # a schedule needs its phases (or a file)
        overrides.append("strategy.phases=[{epoch:0,train:[model.layer_6]},{epoch:2,train:['*']}]")
    cfg = compose_with(*overrides)
    OmegaConf.resolve(cfg)
    blocks = list(target_blocks(cfg))
    assert blocks, "no _target_ block"
    for where, block in blocks:
        target = get_method(block._target_)
        kwargs = {k: v for k, v in block.items() if k not in SPECIAL}
        signature = inspect.signature(target)
        try:
            if block.get("_partial_"):
                signature.bind_partial(**kwargs)
            else:
                signature.bind_partial(**kwargs)  # the run supplies e.g. `labels`, `callbacks`
        except TypeError as err:
            pytest.fail(f"{where} ({block._target_}) does not fit its signature: {err}")
    try:
        instantiate(cfg.data, _convert_="all")
    except Exception as err:  # a voice engine that is a system package (Debian's Festival)
        if "which are not installed" in str(err.__cause__ or err):
            pytest.skip(f"data={option} needs a system package: {err.__cause__ or err}")
        raise
    labels = [" ", *"abcdefghijklmnopqrstuvwxyzäöüß"]  # German: what the scorer checks against
    instantiate(cfg.model, labels=labels, language="de", _convert_="all")
    for callback in {**cfg.strategy.callbacks, **cfg.strategy.get("addons", {})}.values():
        instantiate(callback, _convert_="all")
    instantiate(cfg.logger, save_dir=str(tmp_path), _convert_="all")
    if cfg.trainer.accelerator == "cpu":
        instantiate(cfg.trainer, _convert_="all")


def test_strategies_combine_from_the_command_line():
    cfg = compose_with("strategy=freeze_then_unfreeze", "addons=[discriminative_lr,warmup]")
    chosen = {**cfg.strategy.callbacks, **cfg.strategy.addons}
    targets = sorted(c._target_.rsplit(".", 1)[1] for c in chosen.values())
    assert targets == ["DiscriminativeLR", "FreezeThenUnfreeze", "LRWarmup"]


def test_freeze_bottom_takes_n_from_the_command_line_and_names_its_row_by_it():
    cfg = compose_with("strategy=freeze_bottom", "strategy.n_frozen=3")
    assert cfg.strategy.name == "freeze_bottom_3"
    callback = instantiate(cfg.strategy.callbacks.freeze_bottom, _convert_="all")
    assert callback.n_frozen == 3


@pytest.mark.parametrize("search", sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml")))
def test_hparams_search_tunes_keys_that_exist(search):
    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"hparams_search={search}"],
            return_hydra_config=True,
        )
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.direction == "minimize"
    for key in cfg.hydra.sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"{search} tunes unknown key {key}"


def test_unknown_option_lists_the_allowed_ones():
    with pytest.raises(
        Exception, match=r"(?s)Could not find 'strategy/nope'.*freeze_then_unfreeze"
    ):
        compose_with("strategy=nope")


def test_the_commissioned_command_composes_to_freeze_then_unfreeze():
    """`python -m freezeft.run strategy=freeze_then_finetune`, as the project was asked
    for; the earlier name stays an alias of the same strategy, keys and name."""
    new, old = (
        compose_with(f"strategy={name}")
        for name in ("freeze_then_finetune", "freeze_then_unfreeze")
    )
    assert new.strategy.name == old.strategy.name == "freeze_then_finetune"
    assert OmegaConf.to_container(new.strategy) == OmegaConf.to_container(old.strategy)
    (callback,) = new.strategy.callbacks.values()
    assert callback._target_ == "freezeft.callbacks.FreezeThenUnfreeze"


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("strategy=freeze_then_unfreez", "Did you mean strategy=freeze_then_unfreeze or"),
        ("strategy=freeze_then_finetuning", "Did you mean strategy=freeze_then_finetune"),
        (
            "addons=[warmpu]",
            "Options for addons: discriminative_lr, warmup. Did you mean addons=[warmup]?",
        ),
        ("experiment=tinny", "Did you mean experiment=tiny?"),
    ],
)
def test_a_misspelt_choice_gets_the_nearest_names(override, suggestion):
    from freezeft.app.errors import one_line

    with pytest.raises(Exception) as error:
        compose_with(override)
    assert suggestion in one_line(error.value)


def test_unknown_key_is_named():
    with pytest.raises(Exception, match=r"Could not override 'trainer.max_epoch'") as error:
        compose_with("trainer.max_epoch=3")
    assert "Key 'max_epoch' is not in struct" in str(error.value.__cause__)  # printed below it


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", "`trainer.max_epochs='abc'`: expected an integer >= 1"),
        ("stage=train", "`stage='train'`: expected 'transfer', 'pretrain' or 'schedule'"),
        # the task's values: checked by its own classes, the key named by Hydra
        ("data.batch_size=0", "Expected `batch_size` >= 1, but got 0.*full_key: data"),
        ("data.on_bad_sample=ignore", "`on_bad_sample` to be 'skip' or 'error'.*full_key: data"),
        ("data.num_workers=-1", "`num_workers` >= 0 or 'auto', but got -1.*full_key: data"),
        ("model.n_hidden=0", "Expected `n_hidden` >= 1, but got 0"),
        ("transfer.drop_source_layers=7", "transfer: Expected `drop_source_layers` in 0..5"),
        # numbers in range of their type but not of what they drive (each once a traceback
        # after training started, or 2,750 threads started without a word)
        ("cpu_threads=100000", "`cpu_threads=100000`: expected null or an integer from 1 to"),
        ("seed=4294967296", "`seed=4294967296`: expected an integer from 0 to 4294967295"),
        ("+trainer.accumulate_grad_batches=0", "`trainer.accumulate_grad_batches=0`: expected"),
        ("+trainer.val_check_interval=0", r"`trainer.val_check_interval=0`: expected null, a"),
        ("+trainer.val_check_interval=1.5", r"`trainer.val_check_interval=1.5`: expected null"),
        ("+trainer.limit_train_batches=-1", r"`trainer.limit_train_batches=-1`: expected"),
    ],
)
def test_wrong_types_and_ranges_name_the_key_and_the_allowed_values(override, message, tmp_path):
    with pytest.raises(Exception, match=f"(?s){message}"):
        check_config(compose_with(override, f"paths.cache_dir={tmp_path}"))


def test_a_strategy_too_large_for_the_model_is_refused_before_any_work(tmp_path):
    cfg = compose_with(
        "strategy=freeze_bottom", "strategy.n_frozen=9", f"paths.cache_dir={tmp_path}"
    )
    with pytest.raises(ValueError, match=r"n_frozen=9` leaves no group.*strategy.callbacks"):
        check_config(cfg)
    assert not any(tmp_path.iterdir())  # no corpus synthesised, no source model pretrained


def test_a_strategy_argument_out_of_range_names_its_config_key():
    cfg = compose_with(
        "strategy=freeze_then_unfreeze",
        "strategy.callbacks.freeze_then_unfreeze.unfreeze_at_epoch=-1",
    )
    with pytest.raises(
        Exception, match=r"(?s)`unfreeze_at_epoch` an integer >= 0.*full_key: strategy.callbacks"
    ):
        check_config(cfg)


def test_a_strategy_and_an_add_on_duplicating_it_are_refused():
    with pytest.raises(ValueError, match="include LRWarmup twice.*drop it from `addons`"):
        check_config(compose_with("strategy=warmup", "addons=[warmup]"))


def test_errors_of_objects_built_from_configs_are_user_errors():
    from hydra.errors import InstantiationException

    from freezeft.app.main import _is_user_error
    from freezeft.speech.data import SpeechDataModule

    try:
        SpeechDataModule(data_dir="x", corpus="y")
    except ValueError as err:
        wrapped = InstantiationException("Error in call to target ...")
        wrapped.__cause__ = err
    assert _is_user_error(wrapped)
    assert "~data.corpus" in str(wrapped.__cause__)
    assert not _is_user_error(ValueError("raised outside freezeft: keeps its traceback"))


def _target_blocks_with_lines(path: Path):
    """Each ``_target_`` block of a YAML file with the text of each key's line."""
    lines = path.read_text().splitlines()
    for where, block in target_blocks(OmegaConf.load(path)):
        yield where, block, lines


@pytest.mark.parametrize(
    "path",
    sorted([*CONF.rglob("*.yaml"), *SPEECH_CONF.rglob("*.yaml")]),
    ids=lambda p: str(p.relative_to(p.parents[1])),
)
def test_configs_override_class_defaults_only_on_purpose(path):
    """One source for each default: the class signature. A config value that differs
    from it says why in a comment on its line."""
    for where, block, lines in _target_blocks_with_lines(path):
        try:
            signature = inspect.signature(get_method(block._target_))
        except Exception:
            continue  # a target that needs an optional extra (tested where installed)
        for key, value in block.items_ex(resolve=False):
            parameter = signature.parameters.get(key)
            if key in SPECIAL or parameter is None or OmegaConf.is_config(value):
                continue
            if isinstance(value, str) and ("${" in value or value == "???"):
                continue
            if value != parameter.default:
                line = next(t for t in lines if t.strip().startswith(f"{key}:"))
                assert "#" in line, (
                    f"{path.name}{where}.{key}={value!r} differs from the "
                    f"default {parameter.default!r} of {block._target_} without a comment"
                )
