"""The strategies on the models people fine-tune, built tiny from configs: which layer
groups each gets, which parameters change under each strategy (bit-identical where frozen,
norm statistics included), per-layer LRs and warmup as absolute values, LoRA kept LoRA."""

from __future__ import annotations

import pytest
from tiny_models import MODELS, LRRecorder, Task, changed, fit, snapshot

from freezeft.callbacks import (
    DiscriminativeLR,
    FreezeThenUnfreeze,
    FrozenEncoder,
    GradualUnfreeze,
    LRWarmup,
    NaiveTransfer,
)
from freezeft.groups import resolve_groups

BERT = [
    "model.bert.embeddings",
    *(f"model.bert.encoder.layer.{i}" for i in range(3)),
    "model.bert.pooler",
    "model.classifier",
]
GROUPS = {
    "bert": BERT,
    "bert_lora": [n.replace("model.", "model.base_model.model.", 1) for n in BERT],
    "wav2vec2": [
        "model.wav2vec2.feature_extractor",
        "model.wav2vec2.feature_projection",
        "model.wav2vec2.encoder.pos_conv_embed",
        "model.wav2vec2.encoder.layer_norm",
        "model.wav2vec2.encoder.layers.0",
        "model.wav2vec2.encoder.layers.1",
        "model.lm_head",
    ],
    "resnet18": [
        "model.conv1+model.bn1",
        *(f"model.layer{i}.{j}" for i in range(1, 5) for j in range(2)),
        "model.fc",
    ],
    "vit": [
        "model.cls_token+model.pos_embed+model.patch_embed",
        "model.blocks.0",
        "model.blocks.1",
        "model.blocks.2+model.norm",
        "model.head",
    ],
    "sequential": ["model.0", "model.2", "model.4"],
}


@pytest.mark.parametrize("name", MODELS)
def test_each_model_gets_its_layer_groups_input_to_output(name):
    assert [g.name for g in resolve_groups(Task(name))] == GROUPS[name]


def _owner(key: str, groups) -> int:
    """The group a parameter or buffer (e.g. BN running stats) belongs to."""
    for index, group in enumerate(groups):
        if key in group.params or any(key.startswith(m + ".") for m in group.modules):
            return index
    raise AssertionError(f"{key} is in no group")


STRATEGIES = {  # name -> (callback, how many groups from the top train in 2 epochs)
    "naive": (NaiveTransfer, None),
    "frozen_encoder": (lambda: FrozenEncoder(head=1), 1),
    "freeze_then_unfreeze": (lambda: FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1), None),
    "gradual_unfreeze": (lambda: GradualUnfreeze(head=1, every_n_epochs=1), 2),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_frozen_groups_stay_bit_identical_and_the_others_train(name, strategy):
    task = Task(name)
    make, n_top = STRATEGIES[strategy]
    groups = resolve_groups(task)
    flags = {n: p.requires_grad for n, p in task.named_parameters()}
    trainable = {n for n, f in flags.items() if f}
    # groups holding only parameters the user froze (LoRA) take no turn in a schedule
    turns = [i for i, g in enumerate(groups) if set(g.params) & trainable]
    trained_from = turns[-(n_top or len(turns))]
    before = snapshot(task)
    fit(task, [make()])
    diff = changed(before, task)
    for key in before:
        if _owner(key, groups) < trained_from or (key in flags and key not in trainable):
            assert key not in diff, f"{key} changed though frozen"
        elif key in trainable:
            assert key in diff, f"{key} did not train"
    assert {n: p.requires_grad for n, p in task.named_parameters()} == flags


def test_discriminative_lr_gives_each_transformer_layer_its_own_lr():
    recorder = LRRecorder()
    fit(Task("bert"), [DiscriminativeLR(decay=0.5), recorder], epochs=1)
    expected = {name: 1e-2 * 0.5 ** (len(BERT) - 1 - i) for i, name in enumerate(BERT)}
    assert all(step == expected for step in recorder.steps)  # exact: ratio 1/decay = 2


def test_warmup_multiplies_the_users_hf_schedule_step_by_step():
    from transformers import get_linear_schedule_with_warmup

    def schedule(optimizer):
        return get_linear_schedule_with_warmup(optimizer, 2, 8)

    plain = LRRecorder()
    fit(Task("bert", scheduler=schedule), [plain])
    warmed = LRRecorder()
    fit(Task("bert", scheduler=schedule), [LRWarmup(warmup_steps=5, start_factor=0.2), warmed])
    assert len(warmed.steps) == len(plain.steps) == 8
    for step, (ours, theirs) in enumerate(zip(warmed.steps, plain.steps, strict=True)):
        factor = 0.2 + 0.8 * min(1.0, step / 5)
        assert list(ours.values()) == pytest.approx([theirs["0"] * factor] * 6, rel=1e-12, abs=0)


@pytest.mark.parametrize("filtered", [False, True], ids=["full_optimizer", "filtered_optimizer"])
def test_lora_base_weights_never_train_while_the_adapters_thaw(filtered):
    task = Task("bert_lora", filtered=filtered)
    before = snapshot(task)
    base = {n for n, p in task.named_parameters() if not p.requires_grad}
    adapters = {n for n, p in task.named_parameters() if p.requires_grad}
    strategies = [FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1), DiscriminativeLR(decay=0.5)]
    trainer = fit(task, strategies)
    diff = changed(before, task)
    assert base and not diff & base  # bit-identical base weights
    encoder_adapters = {n for n in adapters if ".encoder.layer." in n}
    assert len(encoder_adapters) == 12 and encoder_adapters <= diff  # trained after the thaw
    assert {n for n, p in task.named_parameters() if p.requires_grad} == adapters
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in in_optimizer for n, p in task.named_parameters() if n in adapters)
