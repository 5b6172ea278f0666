"""The speech and sequence models people bring, built tiny from configs (no downloads):
torchaudio's DeepSpeech, Wav2Letter, Conformer and wav2vec2, HF Whisper, a tiny Llama with
peft LoRA. Each run is compared with the same run without freezeft (the user freezing by
hand) or with the formula, as absolute values: the weights bit for bit, the LRs each
optimizer step applied (``StrategyCallback.applied_lr``) exactly."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import quiet_trainer, snapshot
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from freezeft._lightning import pl
from freezeft.callbacks import (
    DiscriminativeLR,
    FreezeThenUnfreeze,
    FrozenEncoder,
    GradualUnfreeze,
    LRWarmup,
)
from freezeft.groups import format_group_table, resolve_groups
from freezeft.history import History

LR = 1e-2


def fit(module: pl.LightningModule, callbacks: list, epochs: int = 2, **kwargs: Any) -> None:
    """A real Trainer, deterministic, two batches an epoch, without logs or checkpoints."""
    pl.seed_everything(0)
    options = dict(
        max_epochs=epochs, limit_train_batches=2, deterministic=True, num_sanity_val_steps=0
    )
    trainer = quiet_trainer(callbacks=callbacks, **{**options, **kwargs})
    trainer.fit(module, module.loader())


def max_abs_diff(before: dict[str, Tensor], after: dict[str, Tensor], keys) -> float:
    return max((before[k].float() - after[k].float()).abs().max().item() for k in keys)


def freeze_all_but(module: nn.Module, *prefixes: str) -> nn.Module:
    """What a user without freezeft does: requires_grad=False on everything else."""
    for name, param in module.named_parameters():
        if not name.startswith(prefixes):
            param.requires_grad_(False)
    return module


# -- torchaudio DeepSpeech: groups in forward order --------------------------------------
DEEPSPEECH = [f"net.{name}" for name in ("fc1", "fc2", "fc3", "bi_rnn", "fc4", "out")]


class DeepSpeechCTC(pl.LightningModule):
    """torchaudio's DeepSpeech as ``self.net`` of a CTC module (blank last), dropout on and
    shuffled batches: a watched forward pass that moved any random state would show."""

    def __init__(self) -> None:
        super().__init__()
        from torchaudio.models import DeepSpeech

        torch.manual_seed(0)
        self.net = DeepSpeech(n_feature=12, n_hidden=16, n_class=6, dropout=0.1)
        self.ctc = nn.CTCLoss(blank=5)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        features, labels = batch
        log_probs = self.net(features).transpose(0, 1)  # T, N, C
        steps, n = log_probs.shape[:2]
        lengths = torch.full((n,), steps), torch.full((n,), labels.shape[1])
        loss = self.ctc(log_probs, labels, *lengths)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(16, 1, 20, 12, generator=g), torch.randint(0, 5, (16, 4), generator=g)
        )
        return DataLoader(data, batch_size=4, shuffle=True)


def test_frozen_encoder_on_torchaudio_deepspeech_trains_out_alone_groups_in_forward_order():
    pytest.importorskip("torchaudio")
    module, strategy = DeepSpeechCTC(), FrozenEncoder()  # no groups=: discovery
    before = snapshot(module)
    fit(module, [strategy])
    assert [g.name for g in strategy.groups] == DEEPSPEECH
    assert strategy.coordinator.found_by == (
        "the order net calls its parts in, watched on one training batch (training_step "
        "at fit start)"
    )
    table = format_group_table(strategy.groups, head=[5], found_by=strategy.coordinator.found_by)
    assert [line.split()[1] for line in table.splitlines()[1:7]] == DEEPSPEECH
    after = module.state_dict()
    encoder = [k for k in before if not k.startswith("net.out.")]
    assert len(encoder) == 16 and max_abs_diff(before, after, encoder) == 0.0
    assert max_abs_diff(before, after, ["net.out.weight", "net.out.bias"]) > 0
    # the same run without freezeft, the user freezing the five layers by hand
    plain = freeze_all_but(DeepSpeechCTC(), "net.out.")
    fit(plain, [])
    assert max_abs_diff(plain.state_dict(), after, after) == 0.0
    assert strategy.applied_lr.of("net.out") == [LR] * 4
    assert strategy.applied_lr.of("net.fc1") == [0.0] * 4
    assert not any(strategy.applied_lr.trained_in("net.bi_rnn"))
    assert all(p.requires_grad for p in module.parameters())  # flags given back after fit


class UserCTC(pl.LightningModule):
    """A user's fc1 .. out module, registered head first, with ``example_input_array``."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(16, 6)
            self.rnn = nn.GRU(16, 16)
            self.fc2 = nn.Linear(16, 16)
            self.fc1 = nn.Linear(12, 16)

        def forward(self, x: Tensor) -> Tensor:
            x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
            x, _ = self.rnn(x)
            return self.out(x).log_softmax(-1)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = self.Net()
        self.example_input_array = torch.zeros(20, 2, 12)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        log_probs = self(x.transpose(0, 1))
        n = log_probs.shape[1]
        lengths = torch.full((n,), log_probs.shape[0]), torch.full((n,), y.shape[1])
        return nn.functional.ctc_loss(log_probs, y, *lengths, blank=5)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(
            torch.randn(8, 20, 12, generator=g), torch.randint(0, 5, (8, 3), generator=g)
        )
        return DataLoader(data, batch_size=4)


def test_a_users_module_is_ordered_by_its_example_input_array():
    module, strategy = UserCTC(), DiscriminativeLR(decay=0.5)
    fit(module, [FrozenEncoder(head=2), strategy], epochs=1)
    assert [g.name for g in strategy.groups] == ["net.fc1", "net.fc2", "net.rnn", "net.out"]
    assert strategy.coordinator.found_by.endswith("watched on the module's example_input_array")
    # depth counts from the top: out x1, rnn x0.5; fc1 and fc2 frozen (0 applied)
    assert strategy.applied_lr.of("net.out") == [LR, LR]
    assert strategy.applied_lr.of("net.rnn") == [LR * 0.5, LR * 0.5]
    assert strategy.applied_lr.of("net.fc2") == [0.0, 0.0]


def test_torchaudio_wav2letter_gets_one_group_per_convolution():
    torchaudio = pytest.importorskip("torchaudio")
    model = torchaudio.models.Wav2Letter(num_classes=5, input_type="mfcc", num_features=10)
    groups = resolve_groups(model)
    assert [g.name for g in groups] == [f"acoustic_model.{i}" for i in range(0, 21, 2)]
    assert groups.found_by.startswith("the repeated stack acoustic_model (11 blocks)")


# -- torchaudio Conformer: one group per block ------------------------------------------
class ConformerCTC(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from torchaudio.models import Conformer

        torch.manual_seed(0)
        self.encoder = Conformer(
            input_dim=16, num_heads=2, ffn_dim=32, num_layers=3, depthwise_conv_kernel_size=3
        )
        self.out = nn.Linear(16, 6)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        lengths = torch.full((x.shape[0],), x.shape[1])
        hidden, lengths = self.encoder(x, lengths)
        log_probs = self.out(hidden).log_softmax(-1).transpose(0, 1)
        return nn.functional.ctc_loss(
            log_probs, y, lengths, torch.full((x.shape[0],), y.shape[1]), blank=5
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(8, 12, 16, generator=g), torch.randint(0, 5, (8, 3), generator=g)
        )
        return DataLoader(data, batch_size=4)


@pytest.mark.slow  # about 4 s on the shared 2-core machine: six steps of three blocks
def test_gradual_unfreeze_and_discriminative_lr_on_torchaudio_conformer():
    pytest.importorskip("torchaudio")
    module, strategy = ConformerCTC(), GradualUnfreeze(head=1)
    names = [*(f"encoder.conformer_layers.{i}" for i in range(3)), "out"]
    epochs: list[dict[str, Tensor]] = [snapshot(module)]

    class EveryEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            epochs.append(snapshot(pl_module))

    fit(module, [strategy, DiscriminativeLR(decay=0.5), EveryEpoch()], epochs=3)
    assert [g.name for g in strategy.groups] == names
    for step in range(6):  # 2 steps an epoch; epoch e trains the top e + 1 groups
        epoch = step // 2
        for index, name in enumerate(names):
            depth = len(names) - 1 - index
            expected = LR * 0.5**depth if depth <= epoch else 0.0
            assert strategy.applied_lr.of(name)[step] == expected, (name, step)
    for epoch in range(3):  # a group not yet thawed is bit-identical to where it started
        for index, name in enumerate(names):
            keys = [k for k in epochs[0] if k.startswith(name + ".")]
            moved = max_abs_diff(epochs[epoch], epochs[epoch + 1], keys)
            assert (moved > 0) == (len(names) - 1 - index <= epoch), (name, epoch)


# -- torchaudio wav2vec2 ----------------------------------------------------------------
class TorchaudioWav2Vec2(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from torchaudio.models import wav2vec2_model

        torch.manual_seed(0)
        self.model = wav2vec2_model(
            extractor_mode="group_norm",
            extractor_conv_layer_config=[(8, 10, 5), (8, 3, 2)],
            extractor_conv_bias=False,
            encoder_embed_dim=16,
            encoder_projection_dropout=0.0,
            encoder_pos_conv_kernel=4,
            encoder_pos_conv_groups=2,
            encoder_num_layers=2,
            encoder_num_heads=2,
            encoder_attention_dropout=0.0,
            encoder_ff_interm_features=32,
            encoder_ff_interm_dropout=0.0,
            encoder_dropout=0.0,
            encoder_layer_norm_first=False,
            encoder_layer_drop=0.0,
            aux_num_out=6,
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        audio, labels = batch
        logits, _ = self.model(audio)
        log_probs = logits.log_softmax(-1).transpose(0, 1)
        n = audio.shape[0]
        lengths = torch.full((n,), log_probs.shape[0]), torch.full((n,), labels.shape[1])
        return nn.functional.ctc_loss(log_probs, labels, *lengths, blank=5)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(8, 800, generator=g), torch.randint(0, 5, (8, 3), generator=g)
        )
        return DataLoader(data, batch_size=4)


TORCHAUDIO_WAV2VEC2 = [
    "model.feature_extractor",
    "model.encoder.feature_projection",
    "model.encoder.transformer.pos_conv_embed",
    "model.encoder.transformer.layer_norm",
    "model.encoder.transformer.layers.0",
    "model.encoder.transformer.layers.1",
    "model.aux",
]


def test_frozen_encoder_on_torchaudio_wav2vec2_matches_the_run_frozen_by_hand():
    pytest.importorskip("torchaudio")
    module, strategy = TorchaudioWav2Vec2(), FrozenEncoder(head=1)
    before = snapshot(module)
    fit(module, [strategy])
    assert [g.name for g in strategy.groups] == TORCHAUDIO_WAV2VEC2
    after = module.state_dict()
    encoder = [k for k in before if not k.startswith("model.aux.")]
    assert max_abs_diff(before, after, encoder) == 0.0
    plain = freeze_all_but(TorchaudioWav2Vec2(), "model.aux.")
    fit(plain, [])
    assert max_abs_diff(plain.state_dict(), after, after) == 0.0
    assert max_abs_diff(before, after, ["model.aux.weight"]) > 0


# -- HF Whisper: the encoder frozen by name, the decoder and its tied embedding trained ---
class TinyWhisper(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        pytest.importorskip("transformers")
        from transformers import WhisperConfig, WhisperForConditionalGeneration

        config = WhisperConfig(
            vocab_size=40,
            num_mel_bins=8,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
            d_model=16,
            max_source_positions=8,
            max_target_positions=16,
            decoder_start_token_id=1,
            pad_token_id=0,
            eos_token_id=2,
            bos_token_id=1,
        )
        torch.manual_seed(0)
        self.model = WhisperForConditionalGeneration(config)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        features, labels = batch
        return self.model(input_features=features, labels=labels).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def loader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(8, 8, 16, generator=g), torch.randint(3, 40, (8, 5), generator=g)
        )
        return DataLoader(data, batch_size=4)


@pytest.mark.slow  # about 3 s: two Whisper fits
def test_whisper_encoder_frozen_by_name_decoder_and_tied_embedding_train():
    module = TinyWhisper()
    tied = module.model.proj_out.weight
    assert tied is module.model.model.decoder.embed_tokens.weight
    groups = ["model.model.encoder", ["model.model.decoder", "model.proj_out"]]
    strategy = FrozenEncoder(head=1, groups=groups)
    before = snapshot(module)
    fit(module, [strategy])
    after = module.state_dict()
    encoder = [k for k in before if k.startswith("model.model.encoder.")]
    assert max_abs_diff(before, after, encoder) == 0.0
    assert max_abs_diff(before, after, ["model.model.decoder.embed_tokens.weight"]) > 0
    plain = freeze_all_but(TinyWhisper(), "model.model.decoder.", "model.proj_out.")
    fit(plain, [])
    assert max_abs_diff(plain.state_dict(), after, after) == 0.0
    # discovery without groups=: the decoder's layer stack, the encoder one group
    found = [g.name for g in resolve_groups(TinyWhisper())]
    assert found[0] == "model.model.encoder" and found[-1] == "model.proj_out"


# -- a tiny Llama with peft LoRA: the adapters thaw top-down -----------------------------
LLAMA = "model.base_model.model."


class LoraLlama(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        pytest.importorskip("peft")
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
        torch.manual_seed(0)
        lora = LoraConfig(
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj"],
            r=2,
            lora_dropout=0.0,
            init_lora_weights=False,  # both adapter matrices move from the first step
        )
        self.model = get_peft_model(LlamaForCausalLM(config), lora)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> Any:  # peft's idiom: the trainable parameters only
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR)

    def loader(self) -> DataLoader:
        tokens = torch.randint(1, 32, (8, 6), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens), batch_size=4)


@pytest.mark.slow  # about 4 s: three epochs of a transformer
def test_gradual_unfreeze_on_a_lora_llama_thaws_the_adapters_top_down():
    module, strategy = LoraLlama(), GradualUnfreeze(head=1)
    base = {n for n, p in module.named_parameters() if not p.requires_grad}
    epochs: list[dict[str, Tensor]] = [snapshot(module)]

    class EveryEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            epochs.append(snapshot(pl_module))

    fit(module, [strategy, EveryEpoch()], epochs=3)
    names = [g.name for g in strategy.groups]
    layers = [f"{LLAMA}model.layers.0", f"{LLAMA}model.layers.1"]
    assert names == [f"{LLAMA}model.embed_tokens", *layers, f"{LLAMA}model.norm", f"{LLAMA}lm_head"]
    table = format_group_table(strategy.groups, head=[2], user_frozen=strategy.plan.user_frozen)
    assert [line.split()[-1] for line in table.splitlines()[1:6]] == [
        "user-frozen", "encoder", "head", "user-frozen", "user-frozen",
    ]  # fmt: skip
    after = module.state_dict()
    assert len(base) == 21 and max_abs_diff(epochs[0], after, base) == 0.0  # bit-identical
    assert not any(p.requires_grad for n, p in module.named_parameters() if n in base)

    def moved(epoch: int, layer: str) -> bool:
        keys = [k for k in after if k.startswith(layer + ".") and "lora_" in k]
        assert len(keys) == 4
        return max_abs_diff(epochs[epoch], epochs[epoch + 1], keys) > 0

    assert [moved(0, layer) for layer in layers] == [False, True]  # the top layer first
    assert [moved(1, layer) for layer in layers] == [True, True]  # then the one below
    assert strategy.applied_lr.of(layers[1]) == [LR] * 6
    assert strategy.applied_lr.of(layers[0]) == [0.0, 0.0, LR, LR, LR, LR]


@pytest.mark.slow  # about 3 s: building the LoRA model
def test_a_schedule_that_would_train_nothing_is_refused_at_fit_start_in_freezeft_words():
    with pytest.raises(ValueError, match=r"names only groups whose every parameter you froze"):
        fit(LoraLlama(), [FrozenEncoder(head=[f"{LLAMA}lm_head"])], epochs=1)

    class TopOnly(FrozenEncoder):  # a user's schedule: the top group, LoRA's frozen lm_head
        def trainable(self, index, n_groups, epoch):
            return index == n_groups - 1

    with pytest.raises(ValueError, match=r"TopOnly would train nothing at epoch 0: the groups it "
                       r"trains then \(\['model.base_model.model.lm_head'\]\) hold only "
                       r"parameters you froze .*\(`head=1` counts only those\)"):  # fmt: skip
        fit(LoraLlama(), [TopOnly()], epochs=1)


# -- the applied LR, readable ------------------------------------------------------------
def test_applied_lr_has_warmup_and_frozen_groups_at_zero_and_is_the_apps_lr_schedule_csv(
    tmp_path: Path,
):
    pytest.importorskip("torchaudio")
    strategy = FreezeThenUnfreeze(head=1, unfreeze_at_epoch=1, encoder_lr_scale=0.1)
    between: list[dict[str, float]] = []

    class BetweenSteps(pl.Callback):  # what optimizer.param_groups shows outside a step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            groups = trainer.optimizers[0].param_groups
            between.append({g["name"]: g["lr"] for g in groups})

    history = History(tmp_path)
    warmup = LRWarmup(warmup_steps=4, start_factor=0.25)
    fit(DeepSpeechCTC(), [strategy, warmup, history, BetweenSteps()], epochs=2)

    def ramp(steps: int) -> float:
        return 0.25 + 0.75 * min(1.0, steps / 4)

    applied = strategy.applied_lr
    assert [s.step for s in applied.steps] == [0, 1, 2, 3]
    assert applied.of("net.out") == [LR * ramp(step) for step in range(4)]
    # the encoder thaws at epoch 1 (step 2) at 0.1 x, with a ramp of its own
    assert applied.of("net.fc1") == [0.0, 0.0, LR * 0.1 * ramp(0), LR * 0.1 * ramp(1)]
    assert applied.trained_in("net.fc1") == [False, False, True, True]
    # param_groups between steps: the frozen encoder's non-zero lr, no warmup
    assert between[0]["net.fc1"] == pytest.approx(LR * 0.1) and between[0]["net.out"] == LR
    # the app's lr_schedule.csv is the same table
    applied.write_csv(tmp_path / "ours.csv")
    assert (tmp_path / "lr_schedule.csv").read_text() == (tmp_path / "ours.csv").read_text()
    with open(tmp_path / "lr_schedule.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [float(r["net.fc1"]) for r in rows] == applied.of("net.fc1")


class Detached(DeepSpeechCTC):
    """A bug of the user's: the loss is computed from a detached output."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return super().training_step(batch, batch_idx).detach()


def test_a_loss_without_gradient_in_automatic_optimization_gets_no_manual_advice():
    pytest.importorskip("torchaudio")
    with pytest.raises(RuntimeError, match=r"does not depend on any trainable") as raised:
        fit(Detached(), [FrozenEncoder(groups=DEEPSPEECH)], epochs=1)
    message = str(raised.value)
    assert "manual optimization" not in message and "toggle_optimizer" not in message
    assert "The loss does not reach the groups that train" in message


def test_under_a_grad_scaler_the_lr_schedule_csv_has_the_warmed_lr_the_step_used(tmp_path):
    """fp16 AMP with a GradScaler (on CPU: Lightning's plugin, given explicitly) runs the
    closure before the step: the table comes from inside the step, so it holds the LR
    the step used, and a step the scaler skipped (inf gradients) is no step."""
    pytest.importorskip("torchaudio")
    strategy, history = FrozenEncoder(), History(tmp_path)
    warmup = LRWarmup(warmup_steps=4, start_factor=0.25)
    amp = pl.plugins.precision.MixedPrecision("16-mixed", device="cpu")
    assert amp.scaler is not None
    fit(DeepSpeechCTC(), [history, strategy, warmup], epochs=1, plugins=[amp])
    applied = strategy.applied_lr
    assert applied.steps  # a step the scaler skipped is not there
    assert applied.of("net.out") == [LR * (0.25 + 0.75 * s.step / 4) for s in applied.steps]
    with open(tmp_path / "lr_schedule.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [float(row["net.out"]) for row in rows] == applied.of("net.out")
