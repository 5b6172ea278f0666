"""Augmentation changes what training hears, never what evaluation hears."""

from __future__ import annotations

import pytest
import soundfile
import torch

from freezeft.speech.augment import SpecAugment, SpeedPerturbation
from freezeft.speech.features import MFCCFeatures
from freezeft.speech.module import SpeechModule


def test_speed_perturbation_plays_a_batch_faster_or_slower(german_mini):
    audio, rate = soundfile.read(german_mini / "test" / "00000.wav", dtype="float32")
    batch = torch.from_numpy(audio)[None].repeat(2, 1)
    lengths = torch.tensor([len(audio), len(audio) // 2])
    faster = SpeedPerturbation((1.1,), rate)
    out, out_lengths = faster(batch, lengths)
    assert out.shape[1] == pytest.approx(len(audio) / 1.1, abs=2)
    assert out_lengths.tolist() == [int(len(audio) / 1.1), int(len(audio) // 2 / 1.1)]
    slower, _ = SpeedPerturbation((0.9,), rate)(batch, lengths)
    assert slower.shape[1] == pytest.approx(len(audio) / 0.9, abs=2)
    faster.eval()
    assert faster(batch, lengths)[0] is batch  # evaluation hears the audio as it is
    with pytest.raises(ValueError, match="speed_perturbation"):
        SpeedPerturbation((3.0,))


def test_spec_augment_masks_training_features_only():
    torch.manual_seed(0)
    audio, lengths = torch.randn(4, 16000), torch.tensor([16000, 16000, 12000, 8000])
    plain = MFCCFeatures()
    masked = MFCCFeatures(spec_augment=SpecAugment(freq_masks=2, freq_width=8, time_masks=2))
    assert plain.state_dict().keys() == masked.state_dict().keys()  # checkpoints interchange
    reference, _ = plain(audio, lengths)
    training, _ = masked.train()(audio, lengths)
    assert not torch.allclose(training, reference)
    evaluation, _ = masked.eval()(audio, lengths)
    assert torch.equal(evaluation, reference)
    assert SpecAugment(freq_masks=0, time_masks=0).train()(reference) is reference
    with pytest.raises(ValueError, match="spec_augment.time_width"):
        SpecAugment(time_width=-1)


def test_an_augmented_model_is_not_cached_as_deterministic():
    labels = list(" ab")
    assert SpeechModule(labels, n_hidden=8).prefix_is_deterministic()
    assert not SpeechModule(labels, n_hidden=8, spec_augment={}).prefix_is_deterministic()
    assert not SpeechModule(labels, n_hidden=8, noise_std=0.01).prefix_is_deterministic()


def test_speed_perturbed_samples_are_keyed_by_their_batch_speed():
    torch.manual_seed(0)
    module = SpeechModule(list(" ab"), n_hidden=8, speed_perturbation=[0.9, 1.1])
    assert module.prefix_is_deterministic()  # the speed is part of each sample's key
    batch = {"paths": ["a.wav", "b.wav"], "audio": torch.randn(2, 8000)}
    batch["audio_lengths"] = torch.tensor([8000, 6000])
    drawn = module.train()._with_speed(batch)
    assert drawn["speed"] in (0.9, 1.1)
    assert module.sample_keys(drawn) == [("a.wav", drawn["speed"]), ("b.wav", drawn["speed"])]
    assert module.sample_keys(batch) == [("a.wav", 1.0), ("b.wav", 1.0)]
    # the prefix plays the batch at its speed: what an uncached training step hears
    played, lengths = module._played(drawn)
    assert played.shape[1] == pytest.approx(8000 / drawn["speed"], abs=2)
    expected = module.features(played, lengths)[0]
    with torch.no_grad():
        prefix = module.forward_prefix(drawn, 0)
    assert all(torch.equal(p, e[: len(p)]) for p, e in zip(prefix, expected, strict=True))
    assert module.eval()._with_speed(batch) is batch  # evaluation hears the audio as it is
