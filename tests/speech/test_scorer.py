"""The scorer: its LM file is a normalised LM, it corrects spelling to known words, it is
tuned on dev (never test), and the test reports both its and greedy decoding's rates."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict

import pytest
import pytorch_lightning as pl
import torch
from tiny_models import quiet_trainer

from freezeft.speech.data import SpeechDataModule
from freezeft.speech.decoding import error_counts
from freezeft.speech.module import SpeechModule
from freezeft.speech.scorer import Decoder, Scorer, text_counts, write_arpa

LABELS = [" ", *"abcdefghijklmnopqrstuvwxyzäöüß"]


def read_arpa(path):
    """{order: {ngram: (log10 p, log10 backoff)}} of an ARPA file."""
    grams: dict[int, dict[tuple, tuple[float, float]]] = defaultdict(dict)
    order = 0
    for line in path.read_text().splitlines():
        if line.endswith("-grams:"):
            order = int(line[1])
        elif order and line.strip() and not line.startswith("\\"):
            parts = line.split("\t")
            grams[order][tuple(parts[1].split())] = (
                float(parts[0]),
                float(parts[2]) if len(parts) > 2 else 0.0,
            )
    return grams


def test_the_bigram_lm_of_a_text_is_normalised(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("der hund bellt\nder hund schläft\ndie katze schläft\nder 42 hund\n")
    unigrams, bigrams = text_counts(text, set(LABELS) - {" "})
    assert ("42" not in unigrams) and bigrams[("der", "hund")] == 2  # "der 42 hund" splits
    write_arpa(tmp_path / "lm.arpa", unigrams, bigrams)
    grams = read_arpa(tmp_path / "lm.arpa")
    words = [w for (w,) in grams[1] if w not in ("<s>", "<unk>")]
    for history in ["<s>", "der", "hund", "katze"]:
        total = 0.0
        for w in words:
            if (history, w) in grams[2]:
                total += 10 ** grams[2][(history, w)][0]
            else:  # backoff: bow(history) * p(w)
                total += 10 ** (grams[1][(history,)][1] + grams[1][(w,)][0])
        assert total == pytest.approx(1.0, abs=1e-5), history
    assert sum(10 ** grams[1][(w,)][0] for w in words) == pytest.approx(1.0, abs=1e-5)


def emissions(text: str, confusions: dict[int, tuple[str, float]]) -> torch.Tensor:
    """Log-probs spelling ``text`` a frame per character with blanks between; at character
    ``i`` in ``confusions`` another label ("": the blank) gets probability ``p``."""
    frames = []
    for i, char in enumerate(text):
        frame = torch.full((len(LABELS) + 1,), 1e-4)
        if i in confusions:
            other, p = confusions[i]
            frame[LABELS.index(other) if other else -1] = p  # "": the blank
            frame[LABELS.index(char)] = 1 - p
        else:
            frame[LABELS.index(char)] = 1.0
        blank = torch.full((len(LABELS) + 1,), 1e-4)
        blank[-1] = 1.0
        frames += [frame, blank]
    return (torch.stack(frames) / torch.stack(frames).sum(-1, keepdim=True)).log()[None]


def test_the_scorer_spells_words_its_lexicon_knows(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("der hund bellt\nder hund schläft\n")
    scorer = Scorer.build(tmp_path / "scorer", LABELS, lm_text=text, lm_weight=1.0)
    log_probs = emissions("der hund", {7: ("t", 0.6)})  # greedy reads "der hunt"
    assert scorer.settings.words == 4 and scorer.settings.order == 2
    assert scorer.decode(log_probs, torch.tensor([log_probs.shape[1]])) == ["der hund"]
    reopened = Scorer.load(tmp_path / "scorer", LABELS)
    assert reopened.settings == scorer.settings
    with pytest.raises(ValueError, match="built for the tokens"):
        Scorer.load(tmp_path / "scorer", LABELS[:-1])


def test_a_language_scorer_has_tens_of_thousands_of_words(tmp_path):
    scorer = Scorer.build(tmp_path / "scorer", LABELS, language="de", vocabulary=30000)
    assert scorer.settings.words == 30000 and scorer.settings.source == "wordfreq:de"
    lexicon = (tmp_path / "scorer" / "lexicon.txt").read_text().splitlines()
    assert lexicon[0] == "die\td i e |" and len(lexicon) == 30000
    log_probs = emissions("ich habe hunger", {10: ("m", 0.7)})  # greedy: "ich habe mungen"
    assert scorer.decode(log_probs, torch.tensor([log_probs.shape[1]])) == ["ich habe hunger"]


def test_tuning_picks_the_grid_point_with_the_lowest_wer(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("die hand\n" * 20 + "der hund\n")
    scorer = Scorer.build(tmp_path / "scorer", LABELS, lm_text=text)
    # "hund" heard a little better than "hand": a heavy LM prefers the frequent "hand"
    first = emissions("der hund", {5: ("a", 0.4)})
    second = emissions("die hand", {})
    batch = torch.nn.utils.rnn.pad_sequence([first[0], second[0]], batch_first=True)
    lengths = torch.tensor([first.shape[1], second.shape[1]])
    references = ["der hund", "die hand"]
    grid = dict(lm_weights=(0.0, 1.0, 3.0), word_scores=(-5.0, 0.0, 2.0))
    tuned = scorer.tune([batch], [lengths], references, **grid)

    def wer(alpha, beta):
        counts = error_counts(references, scorer.with_weights(alpha, beta).decode(batch, lengths))
        return counts[0] / counts[1]

    # each weight at word score 0, then each word score at the best weight
    by_weight = [wer(alpha, 0.0) for alpha in grid["lm_weights"]]
    alpha = grid["lm_weights"][by_weight.index(min(by_weight))]
    by_score = [wer(alpha, beta) for beta in grid["word_scores"]]
    beta = grid["word_scores"][by_score.index(min(by_score))]
    assert (tuned.settings.lm_weight, tuned.settings.word_score) == (alpha, beta)
    assert tuned.settings.tuned_on["wer"] == min(by_score)
    assert tuned.settings.tuned_on["reference_words"] == 4
    assert len(tuned.settings.tuned_on["tried"]) == 5  # 3 weights, then 2 more scores
    assert max(by_weight) > min(by_weight)  # the weights matter here


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(decoder="beam"), "decoder.lm_text=PATH"),
        (dict(decoder={"name": "beam", "lm_wieght": 1}), "Unknown `decoder` key"),
        (dict(decoder={"name": "viterbi"}), "'greedy' or 'beam'"),
        (dict(decoder={"name": "beam", "beam_size": 0}, language="de"), "beam_size"),
        (dict(decoder={"name": "beam", "lm_text": "/no/such.txt"}), "lm_text.*does not exist"),
    ],
)
def test_a_bad_decoder_setting_is_refused_when_the_model_is_built(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        SpeechModule(labels=LABELS, n_hidden=8, **kwargs)


def test_a_missing_text_or_a_labelless_alphabet_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="decoder.lm_text"):
        Scorer.build(tmp_path / "s", LABELS, lm_text=tmp_path / "gone.txt")
    with pytest.raises(ValueError, match="needs a space label"):
        Scorer.build(tmp_path / "s", list("abc"), language="de")
    with pytest.raises(ValueError, match="wordfreq has no word list"):
        Scorer.build(tmp_path / "s", LABELS, language="xx")


@pytest.mark.slow
def test_the_test_is_decoded_with_a_scorer_tuned_on_dev(german_corpus, tmp_path):
    data = SpeechDataModule(data_dir=german_corpus, batch_size=4, num_workers=0, language="de")
    decoder = Decoder(name="beam", vocabulary=5000, lm_weights=(0.5, 1.0), word_scores=(0.0,))
    module = SpeechModule(labels=data.alphabet.labels, n_hidden=32, decoder=decoder, language="de")
    trainer = quiet_trainer(max_epochs=2, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    (metrics,) = trainer.test(module, datamodule=data)
    assert {"test_wer", "test_cer", "test_greedy_wer", "test_greedy_cer"} <= set(metrics)
    results = module.test_results(metrics)
    assert results["greedy_cer"] == metrics["test_greedy_cer"]
    assert results["cer"] == metrics["test_cer"]
    saved = json.loads((tmp_path / "scorer" / "scorer.json").read_text())
    with (german_corpus / "dev.csv").open() as handle:  # tuned on dev's words, not test's
        dev_words = sum(len(row["transcript"].split()) for row in csv.DictReader(handle))
    assert saved["tuned_on"]["reference_words"] == dev_words
    assert saved["lm_weight"] in (0.5, 1.0) and saved["words"] == 5000
    assert results["scorer"]["lm_weight"] == saved["lm_weight"]
    # what the test decoded is the scorer's own output, word for word in its lexicon
    lexicon = {line.split("\t")[0] for line in (tmp_path / "scorer" / "lexicon.txt").open()}
    assert all(set(s["hypothesis"].split()) <= lexicon for s in module.test_samples)
    assert not math.isnan(results["wer"])


def test_sentence_text_from_excel_keeps_its_words(tmp_path):
    text = tmp_path / "excel.txt"  # a BOM, CRLF line ends, punctuation around words
    text.write_bytes("\ufeffWürde er kommen?\r\n„Ja“, sagte sie: der Hund.\r\n".encode())
    unigrams, bigrams = text_counts(text, set(LABELS) - {" "})
    assert {"würde", "er", "kommen", "ja", "sagte", "sie", "der", "hund"} <= set(unigrams)
    assert bigrams[("der", "hund")] == 1 and bigrams[("hund", "</s>")] == 1


@pytest.mark.parametrize(
    ("decoder", "language", "message"),
    [
        ({"name": "beam", "lm_text": "EMPTY"}, None, "has no word spelled.*it is empty"),
        ({"name": "beam", "lm_text": "LATIN1"}, None, "is not UTF-8"),
        ({"name": "beam", "lm_text": "DIR"}, None, "is a folder"),
        ({"name": "beam", "vocabulary": 2000}, "xx", "no word list for language 'xx'"),
        ({"name": "beam", "vocabulary": 2000}, "ru", "Only [0-9]+ of the 1000 most frequent 'ru'"),
        ({"name": "beam", "lm_weight": "abc"}, "de", "decoder.lm_weight"),
        ({"name": "beam", "word_score": float("-inf")}, "de", "decoder.word_score"),
        ({"name": "beam", "lm_weights": [True]}, "de", "decoder.lm_weights"),
    ],
)
def test_a_scorer_that_cannot_be_built_is_refused_before_training(tmp_path, decoder, language,
                                                                  message):  # fmt: skip
    files = {"EMPTY": tmp_path / "empty.txt", "LATIN1": tmp_path / "l1.txt", "DIR": tmp_path}
    files["EMPTY"].write_text("")
    files["LATIN1"].write_bytes("Grüße aus Köln\n".encode("latin-1"))
    if decoder.get("lm_text") in files:
        decoder = {**decoder, "lm_text": str(files[decoder["lm_text"]])}
    with pytest.raises((ValueError, OSError), match=message):
        SpeechModule(labels=LABELS, n_hidden=8, decoder=decoder, language=language)


@pytest.mark.slow
def test_a_signal_while_the_scorer_is_tuned_stops_the_test(german_corpus, tmp_path):
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    class SignalAtTestStart(pl.Callback):  # as if SIGTERM came just before tuning
        def on_test_start(self, trainer, pl_module):
            trainer._signal_connector.received_sigterm = True

    data = SpeechDataModule(data_dir=german_corpus, batch_size=4, num_workers=0, language="de")
    decoder = Decoder(name="beam", vocabulary=2000, lm_weights=(0.5, 1.0), word_scores=(0.0,))
    module = SpeechModule(labels=data.alphabet.labels, n_hidden=8, decoder=decoder, language="de")
    trainer = quiet_trainer(default_root_dir=tmp_path, callbacks=[SignalAtTestStart()])
    with pytest.raises(SIGTERMException):
        trainer.test(module, datamodule=data)
    assert "tuned_on" not in (tmp_path / "scorer" / "scorer.json").read_text() or (
        json.loads((tmp_path / "scorer" / "scorer.json").read_text())["tuned_on"] is None
    )
