import pytest
import torch
from tiny_models import quiet_trainer

from freezeft.groups import resolve_groups
from freezeft.speech.features import MFCCFeatures
from freezeft.speech.model import LAYER_NAMES, DeepSpeech
from freezeft.speech.module import SpeechModule


def test_mfcc_shapes_follow_deepspeech_framing():
    features = MFCCFeatures()
    assert features.n_features == 494
    audio = torch.randn(2, 16000)  # 1 s
    lengths = torch.tensor([16000, 8000])
    frames, frame_lengths = features(audio, lengths)
    # 32 ms window, 20 ms step: (16000 - 512) // 320 + 1 = 49 frames
    assert frames.shape == (2, 49, 494)
    assert frame_lengths.tolist() == [49, (8000 - 512) // 320 + 1]


def test_features_of_an_utterance_do_not_depend_on_batch_padding():
    features = MFCCFeatures()
    short = torch.randn(6000)
    alone, n = features(short[None], torch.tensor([6000]))
    padded, m = features(
        torch.stack([torch.cat([short, torch.zeros(4000)]), torch.randn(10000)]),
        torch.tensor([6000, 10000]),
    )
    assert n[0] == m[0]
    torch.testing.assert_close(padded[0, : n[0]], alone[0, : n[0]], atol=1e-4, rtol=1e-4)


def test_features_of_an_utterance_do_not_depend_on_the_other_files_in_its_batch():
    """torchaudio's decibel floor (80 dB below the loudest value) is taken per utterance: a
    file 60 dB louder, or one holding NaNs, beside it changes nothing."""
    features = MFCCFeatures()
    generator = torch.Generator().manual_seed(0)
    quiet = 1e-3 * torch.randn(8000, generator=generator)
    quiet[3000:5000] = 1e-9 * torch.randn(2000, generator=generator)  # near-silence
    alone, n = features(quiet[None], torch.tensor([8000]))
    loud = 10.0 * torch.randn(12000, generator=generator)
    broken = torch.randn(12000, generator=generator)
    broken[100:200] = float("nan")
    for neighbour in (loud, broken):
        batch = torch.stack([torch.cat([quiet, torch.zeros(4000)]), neighbour])
        frames, m = features(batch, torch.tensor([8000, 12000]))
        assert m[0] == n[0]
        torch.testing.assert_close(frames[0, : n[0]], alone[0, : n[0]], atol=1e-4, rtol=1e-4)
        assert torch.isfinite(frames[0]).all()


def test_model_outputs_labels_plus_blank_last():
    model = DeepSpeech(n_features=494, n_labels=31, n_hidden=32)
    logits = model(torch.randn(3, 17, 494))
    assert logits.shape == (3, 17, 32)
    assert model.blank == 31
    assert [name for name, _ in model.named_children()][:6] == list(LAYER_NAMES)


def test_speech_module_layer_groups_cover_every_parameter():
    module = SpeechModule(labels=list(" abc"), n_hidden=16)
    groups = resolve_groups(module)
    assert [g.name for g in groups] == [f"model.{n}" for n in LAYER_NAMES]
    grouped = {name for g in groups for name in g.params}
    assert grouped == {name for name, _ in module.named_parameters()}


def test_module_forward_gives_logits_and_frame_lengths():
    module = SpeechModule(labels=list(" abc"), n_hidden=16)
    logits, lengths = module(torch.randn(2, 16000), torch.tensor([16000, 12000]))
    assert logits.shape == (2, 49, 5)
    assert lengths.tolist() == [49, 36]


def test_bf16_mixed_precision_trains_with_a_float32_ctc_loss(german_mini):
    """trainer=gpu's precision, run on the CPU's bf16 autocast: MFCCs, LSTM and CTC all work."""
    import pytorch_lightning as pl

    from freezeft.speech.data import SpeechDataModule

    pl.seed_everything(0)
    data = SpeechDataModule(data_dir=german_mini, batch_size=8)
    module = SpeechModule(labels=data.alphabet.labels, n_hidden=32)
    losses = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"])

    trainer = quiet_trainer(
        accelerator="cpu", precision="bf16-mixed", max_epochs=1, callbacks=[Spy()]
    )
    trainer.fit(module, datamodule=data)
    assert losses and all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses)
    assert trainer.callback_metrics["val_cer"] >= 0


def test_forward_layers_split_anywhere_equals_the_whole_forward():
    torch.manual_seed(0)
    model = DeepSpeech(n_features=494, n_labels=5, n_hidden=16).eval()
    frames = torch.randn(2, 7, 494)
    whole = model(frames)
    for cut in range(len(LAYER_NAMES) + 1):
        prefix = model.forward_layers(frames, 0, cut, dropout=False)
        assert torch.allclose(model.forward_layers(prefix, cut, len(LAYER_NAMES)), whole, atol=1e-6)


def test_an_utterance_whose_loss_is_not_finite_is_named_and_left_out_of_the_loss():
    """A NaN file the row checks could not see: the batch's other files keep their loss
    and hypotheses; the file is named, never a silent NaN (stored as null) test loss."""
    import math

    from torch.utils.data import DataLoader

    from freezeft.speech.dataset import collate

    torch.manual_seed(0)
    module = SpeechModule(labels=list(" ab"), n_hidden=16, decoder="greedy", log_samples=False)
    good = {
        "audio": 0.1 * torch.randn(16000),
        "labels": torch.tensor([1, 2]),
        "transcript": "ab",
        "path": "good.wav",
    }
    bad_audio = 0.1 * torch.randn(16000)
    bad_audio[500:600] = float("nan")
    bad = {**good, "audio": bad_audio, "path": "bad.wav"}
    trainer = quiet_trainer(accelerator="cpu")

    def loader(items: list[dict]) -> DataLoader:
        return DataLoader(items, batch_size=len(items), collate_fn=collate)

    alone = trainer.test(module, loader([good]), verbose=False)[0]
    mixed = trainer.test(module, loader([good, bad]), verbose=False)[0]
    assert math.isfinite(mixed["test_loss"])
    assert mixed["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)
    assert [(s, p) for s, p, _ in module.non_finite_losses] == [("test", "bad.wav")]
    results = module.test_results(mixed)
    assert "1 test file(s) with a non-finite loss" in results["headline"]
    assert results["non_finite_losses"][0]["path"] == "bad.wav"


def test_a_training_batch_whose_loss_is_not_finite_is_skipped_and_named():
    """NaN audio the row checks could not see (it decoded to NaN only later): DeepSpeech's
    way, the batch is not trained on, its files are listed, the weights stay finite."""
    from torch.utils.data import DataLoader

    from freezeft.speech.dataset import collate

    torch.manual_seed(0)
    module = SpeechModule(labels=list(" ab"), n_hidden=16, decoder="greedy", log_samples=False)
    audio = 0.1 * torch.randn(16000)
    audio[500:600] = float("nan")
    bad = {"audio": audio, "labels": torch.tensor([1, 2]), "transcript": "ab", "path": "bad.wav"}
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = quiet_trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0)
    trainer.fit(module, DataLoader([bad], batch_size=1, collate_fn=collate))
    assert [b["paths"] for b in module.skipped_batches] == [["bad.wav"]]
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
