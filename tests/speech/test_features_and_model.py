import torch

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
