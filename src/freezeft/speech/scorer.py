"""DeepSpeech's external scorer: CTC beam search with a lexicon and an n-gram word LM.

A scorer is a folder: ``tokens.txt`` (the model's outputs in order, blank last),
``lexicon.txt`` (each word spelled in tokens), ``lm.arpa`` (the word LM) and
``scorer.json`` (its words' source, beam size and the LM weight and word score, DeepSpeech's
alpha and beta). The search is torchaudio's :func:`~torchaudio.models.decoder.ctc_decoder`
(flashlight-text, a KenLM reader included); the ARPA file is written here in Python, so no
KenLM build tools are needed.

Two sources of words:

* a language's general word list from ``wordfreq`` (``language=``): tens of thousands of
  its most frequent words, spelled with the alphabet, and a unigram LM of their frequencies;
* a text file (``lm_text=``): its words and a bigram LM with absolute discounting.

Example::

    scorer = Scorer.build("run/scorer", labels, language="de", vocabulary=50000)
    scorer = scorer.tune(log_probs, lengths, references)  # on dev, never on test
    texts = scorer.decode(log_probs, lengths)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from freezeft.files import write_text_atomic
from freezeft.speech.decoding import error_counts
from freezeft.text import is_number

log = logging.getLogger(__name__)

__all__ = [
    "check_words",
    "Decoder",
    "Scorer",
    "ScorerSettings",
    "write_arpa",
    "DEFAULT_LM_WEIGHTS",
    "DEFAULT_WORD_SCORES",
]

#: The grid :meth:`Scorer.tune` searches by default (DeepSpeech's lm_alpha, lm_beta).
DEFAULT_LM_WEIGHTS: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
DEFAULT_WORD_SCORES: tuple[float, ...] = (-1.0, 0.0, 1.0, 2.0)

_BLANK = "<blank>"
_SILENCE = "|"
_FILES = ("tokens.txt", "lexicon.txt", "lm.arpa", "scorer.json")


@dataclass(frozen=True)
class Decoder:
    """How a speech model turns its outputs into text (the ``decoder`` config group).

    Args:
        name: ``"greedy"`` (best path, no word knowledge) or ``"beam"`` (the scorer).
        beam_size: hypotheses kept at each frame (beam).
        lm_weight: the LM's weight, DeepSpeech's ``lm_alpha``; ``None``: tuned on dev.
        word_score: score per word, DeepSpeech's ``lm_beta``; ``None``: tuned on dev.
        lm_text: a text file whose words and bigrams make the LM; ``None``: the corpus'
            language's general word list from ``wordfreq``.
        vocabulary: words taken from ``wordfreq`` (ignored with ``lm_text``).
        lm_weights: the values of ``lm_weight`` tuning tries.
        word_scores: the values of ``word_score`` tuning tries.
    """

    name: str = "greedy"
    beam_size: int = 50
    lm_weight: float | None = None
    word_score: float | None = None
    lm_text: str | None = None
    vocabulary: int = 50000
    lm_weights: Sequence[float] = DEFAULT_LM_WEIGHTS
    word_scores: Sequence[float] = DEFAULT_WORD_SCORES

    def __post_init__(self) -> None:
        if self.name not in ("greedy", "beam"):
            raise ValueError(f"Expected `decoder.name` 'greedy' or 'beam', but got {self.name!r}.")
        for key in ("beam_size", "vocabulary"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Expected `decoder.{key}` an integer >= 1, but got {value!r}.")
        for key in ("lm_weights", "word_scores"):
            values = getattr(self, key)
            values = tuple(values) if isinstance(values, (list, tuple)) else (values,)
            if not values or not all(is_number(v, finite=True) for v in values):
                raise ValueError(
                    f"Expected `decoder.{key}` a list of finite numbers, but got {values!r}."
                )
            object.__setattr__(self, key, values)
        for key in ("lm_weight", "word_score"):
            value = getattr(self, key)
            if value is not None and not is_number(value, finite=True):
                raise ValueError(
                    f"Expected `decoder.{key}` a finite number or null (tuned on dev), but "
                    f"got {value!r}."
                )
        if self.lm_text is not None:
            path = Path(self.lm_text).expanduser()
            if path.is_dir():
                raise IsADirectoryError(
                    f"`decoder.lm_text={self.lm_text}` is a folder; give a UTF-8 text file "
                    "(one sentence per line) of the target language."
                )
            if not path.is_file():
                raise FileNotFoundError(
                    f"`decoder.lm_text={self.lm_text}` does not exist: give a UTF-8 text file "
                    "(one sentence per line) of the target language."
                )
            # absolute: a resumed run or a sweep job started elsewhere finds it too
            object.__setattr__(self, "lm_text", str(path.resolve()))

    @classmethod
    def from_config(cls, config: Decoder | str | dict | None) -> Decoder:
        """A decoder from a name, a dict (Hydra's ``decoder`` group) or ``None`` (greedy)."""
        if config is None:
            return cls()
        if isinstance(config, Decoder):
            return config
        if isinstance(config, str):
            return cls(name=config)
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"Unknown `decoder` key(s) {unknown}; known: {[f.name for f in fields(cls)]}."
            )
        return cls(**config)

    @property
    def beam(self) -> bool:
        """Whether this decoder uses the scorer."""
        return self.name == "beam"


@dataclass(frozen=True)
class ScorerSettings:
    """What a scorer folder holds besides its files.

    Args:
        source: where its words came from (``wordfreq:<language>`` or the text file).
        words: words in its lexicon.
        order: the LM's n-gram order (1 for a word list, 2 for a text).
        beam_size: hypotheses kept at each frame.
        lm_weight: weight of the LM score (DeepSpeech's ``lm_alpha``).
        word_score: score added per word (DeepSpeech's ``lm_beta``).
        tuned_on: what ``lm_weight``/``word_score`` were tuned on (``None``: not tuned).
    """

    source: str
    words: int
    order: int
    beam_size: int = 50
    lm_weight: float = 1.0
    word_score: float = 0.0
    tuned_on: dict[str, Any] | None = None


class Scorer:
    """A built scorer folder: beam-search CTC decoding with its lexicon and LM.

    Build one with :meth:`build`, open one with :meth:`load`.
    """

    def __init__(self, folder: str | Path, labels: Sequence[str], settings: ScorerSettings):
        self.folder = Path(folder)
        self.labels = list(labels)
        self.settings = settings
        self._decoder = None

    # -- building -------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        folder: str | Path,
        labels: Sequence[str],
        *,
        language: str | None = None,
        lm_text: str | Path | None = None,
        vocabulary: int = 50000,
        beam_size: int = 50,
        lm_weight: float = 1.0,
        word_score: float = 0.0,
    ) -> Scorer:
        """Write a scorer for a model with output ``labels`` into ``folder``.

        Give ``lm_text`` (a UTF-8 text file, one sentence per line) or ``language`` (a
        ``wordfreq`` language code, whose ``vocabulary`` most frequent words are used).

        Raises:
            ValueError: neither or both given, a bad setting, or no word spelled with the
                labels (the message names the text file or language).
        """
        if (language is None) == (lm_text is None):
            raise ValueError(
                "A scorer needs exactly one source of words: `decoder.lm_text` (a text file) "
                f"or the corpus' language, but got language={language!r}, lm_text={lm_text!r}."
            )
        if beam_size < 1:
            raise ValueError(f"Expected `decoder.beam_size` >= 1, but got {beam_size}.")
        if vocabulary < 1:
            raise ValueError(f"Expected `decoder.vocabulary` >= 1, but got {vocabulary}.")
        tokens = _tokens(labels)
        spellable = set(labels) - {" "}
        if lm_text is not None:
            unigrams, bigrams = text_counts(lm_text, spellable)
            source, order = str(lm_text), 2
        else:
            unigrams, bigrams = word_frequencies(language, spellable, vocabulary), None
            source, order = f"wordfreq:{language}", 1
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        words = [w for w in unigrams if w not in ("<s>", "</s>")]
        _write_lines(folder / "tokens.txt", tokens)
        _write_lines(
            folder / "lexicon.txt",
            [f"{w}\t{' '.join(w)} {_SILENCE}" for w in words],  # its letters, then a word end
        )
        write_arpa(folder / "lm.arpa", unigrams, bigrams)
        settings = ScorerSettings(
            source=source,
            words=len(words),
            order=order,
            beam_size=beam_size,
            lm_weight=lm_weight,
            word_score=word_score,
        )
        scorer = cls(folder, labels, settings)
        scorer.save()
        return scorer

    @classmethod
    def load(cls, folder: str | Path, labels: Sequence[str]) -> Scorer:
        """Open a scorer folder written by :meth:`build` for a model with ``labels``.

        Raises:
            FileNotFoundError: a file is missing (named).
            ValueError: its tokens are not the model's labels.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Scorer folder {folder} does not exist (or is not a folder): give the "
                "`scorer` folder a run with decoder=beam wrote."
            )
        for name in _FILES:
            if not (folder / name).is_file():
                raise FileNotFoundError(f"Scorer folder {folder} has no {name}.")
        saved = (folder / "tokens.txt").read_text(encoding="utf-8").splitlines()
        if saved != _tokens(labels):
            raise ValueError(
                f"The scorer in {folder} was built for the tokens {saved}, but the model's are "
                f"{_tokens(labels)}: build the scorer for this model's alphabet."
            )
        try:
            settings = json.loads((folder / "scorer.json").read_text(encoding="utf-8"))
            return cls(folder, labels, ScorerSettings(**settings))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(
                f"{folder / 'scorer.json'} is not a scorer's settings: {err}"
            ) from None

    def open(self) -> None:
        """Read the lexicon and LM now (decoding does on first use).

        Raises:
            ValueError: a file of the folder is broken (the message names the folder).
        """
        try:
            self._search()
        except (RuntimeError, ValueError, OSError) as err:
            raise ValueError(
                f"The scorer in {self.folder} cannot be read ({err}); rebuild it with the run."
            ) from None

    def save(self) -> None:
        """Write :attr:`settings` to ``scorer.json``."""
        write_text_atomic(
            self.folder / "scorer.json", json.dumps(asdict(self.settings), indent=2) + "\n"
        )

    def with_weights(self, lm_weight: float, word_score: float, **tuned: Any) -> Scorer:
        """This scorer with another LM weight and word score (files shared, not rewritten)."""
        settings = replace(self.settings, lm_weight=lm_weight, word_score=word_score, **tuned)
        return Scorer(self.folder, self.labels, settings)

    # -- decoding -------------------------------------------------------------------
    def _search(self):
        if self._decoder is None:
            from torchaudio.models.decoder import ctc_decoder

            with _quiet_stderr():  # KenLM prints a progress bar for every ARPA file it reads
                self._decoder = ctc_decoder(
                    lexicon=str(self.folder / "lexicon.txt"),
                    tokens=str(self.folder / "tokens.txt"),
                    lm=str(self.folder / "lm.arpa"),
                    beam_size=self.settings.beam_size,
                    lm_weight=self.settings.lm_weight,
                    word_score=self.settings.word_score,
                    blank_token=_BLANK,
                    sil_token=_SILENCE,
                )
        return self._decoder

    @torch.no_grad()
    def decode(self, logits: Tensor, lengths: Tensor) -> list[str]:
        """Transcripts of ``logits`` (B, T, labels + 1; log-probabilities too) with
        ``lengths`` (B,) valid frames."""
        emissions = logits.detach().float().log_softmax(-1).cpu().contiguous()
        results = self._search()(emissions, lengths.detach().cpu().to(torch.int32))
        return [" ".join(hyps[0].words) if hyps else "" for hyps in results]

    def tune(
        self,
        logits: Sequence[Tensor],
        lengths: Sequence[Tensor],
        references: Sequence[str],
        lm_weights: Iterable[float] = DEFAULT_LM_WEIGHTS,
        word_scores: Iterable[float] = DEFAULT_WORD_SCORES,
        reduce: Callable[[Tensor], Tensor] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Scorer:
        """The scorer whose LM weight and word score give the lowest WER on these utterances.

        A coordinate search: each of ``lm_weights`` with the word score nearest 0, then each
        of ``word_scores`` with the best weight (ties go to the earlier value). ``logits``
        and ``lengths`` are batches as the model gave them, ``references`` their transcripts
        in order: dev data, never test. ``reduce`` sums an error-count tensor over processes
        (DDP), so every process picks the same weights. ``should_stop`` is asked before
        each decode; when it says True, tuning stops with ``InterruptedError``.
        """
        lm_weights = [float(a) for a in lm_weights]
        word_scores = [float(b) for b in word_scores]
        tried: dict[tuple[float, float], Tensor] = {}  # error counts per point

        def wer(point: tuple[float, float]) -> float:
            counts = tried[point]
            return float(counts[0] / counts[1].clamp(min=1))

        def wer_of(points: list[tuple[float, float]]) -> list[float]:
            counts = torch.zeros(len(points), 4, dtype=torch.float64)
            for index, (alpha, beta) in enumerate(points):
                if should_stop is not None and should_stop():
                    raise InterruptedError("scorer tuning interrupted")
                candidate = self.with_weights(alpha, beta)
                hypotheses = [
                    text
                    for batch, n in zip(logits, lengths, strict=True)
                    for text in candidate.decode(batch, n)
                ]
                if references:
                    counts[index] = torch.tensor(error_counts(references, hypotheses))
            if reduce is not None:
                counts = reduce(counts)
            tried.update(zip(points, counts, strict=True))
            return [wer(point) for point in points]

        start = min(word_scores, key=abs)
        first = [(alpha, start) for alpha in lm_weights]
        wers = wer_of(first)
        alpha = first[wers.index(min(wers))][0]
        second = [(alpha, beta) for beta in word_scores if (alpha, beta) not in tried]
        wer_of(second)
        best = min(((alpha, beta) for beta in word_scores), key=wer)  # first of equals
        return self.with_weights(
            *best,
            tuned_on={
                "reference_words": int(tried[best][1]),
                "wer": round(wer(best), 4),
                "tried": [
                    {"lm_weight": a, "word_score": b, "wer": round(wer((a, b)), 4)}
                    for a, b in tried
                ],
            },
        )


def _tokens(labels: Sequence[str]) -> list[str]:
    """The decoder's token list: the labels (space as the word boundary ``|``), blank last."""
    tokens = []
    for label in labels:
        if label in (_SILENCE, _BLANK) or (label.isspace() and label != " "):
            raise ValueError(
                f"Alphabet label {label!r} cannot be used with the scorer (it stands for the "
                "word boundary or the blank there); use `decoder=greedy`."
            )
        tokens.append(_SILENCE if label == " " else label)
    if _SILENCE not in tokens:
        raise ValueError(
            "The scorer needs a space label between words, but the alphabet has none; "
            "use `decoder=greedy`."
        )
    return [*tokens, _BLANK]


def word_frequencies(language: str, letters: set[str], vocabulary: int) -> dict[str, float]:
    """The ``vocabulary`` most frequent words of ``language`` spelled with ``letters``,
    with their frequencies (``wordfreq``'s large lists where there is one).

    Raises:
        ValueError: no word list for ``language``, or so few of its frequent words are
            spelled with ``letters`` that the language or the alphabet must be wrong.
    """
    import wordfreq

    if language not in wordfreq.available_languages():
        raise ValueError(
            f"wordfreq has no word list for language {language!r} (data.language); give a "
            "wordfreq code such as de, fr, es, ru, or a text with `decoder.lm_text=PATH`."
        )
    wordlist = "large" if language in wordfreq.available_languages("large") else "best"
    words: dict[str, float] = {}
    examined = 0
    for word in wordfreq.iter_wordlist(language, wordlist):
        word = word.lower()
        examined += 1
        if examined == 1000 and len(words) < 300:
            cased = " (the alphabet has upper-case letters; wordfreq's words are lower case)"
            raise ValueError(
                f"Only {len(words)} of the 1000 most frequent {language!r} words are spelled "
                f"with the alphabet's letters {''.join(sorted(letters))!r}"
                + (cased if any(c.isupper() for c in letters) else "")
                + ": is `data.language` the data's language? Or give a text of it with "
                "`decoder.lm_text=PATH`, or use `decoder=greedy`."
            )
        if word in words or not set(word) <= letters or word.strip("'") != word:
            continue
        words[word] = wordfreq.word_frequency(word, language, wordlist)
        if len(words) == vocabulary:
            break
    return words


def _words_of(line: str, letters: set[str], strip: str) -> list[str | None]:
    """A line's words, the characters of ``strip`` around them removed; ``None`` for a word
    with a character outside ``letters`` (it splits the sentence there)."""
    out: list[str | None] = []
    for token in line.split():
        word = token.strip(strip)
        if not word:
            continue
        out.append(word if set(word) <= letters else None)
    return out


#: Stripped from both ends of a text's words (what sentence text wraps words in).
_PUNCTUATION = (
    "".join(c for c in map(chr, range(0x2000)) if unicodedata.category(c).startswith(("P", "S")))
    + "\u201e\u201c\u201d\u00ab\u00bb\u2026\u2013\u2014\u201a\u2018\u2019"
)


def text_counts(path: str | Path, letters: set[str]) -> tuple[Counter, Counter]:
    """Unigram and bigram counts of a text, one sentence per line, lower-cased.

    Punctuation around words is stripped (``Haus,`` counts as ``haus``); a word with another
    character outside ``letters`` splits the sentence there (it is not in the lexicon, so
    no n-gram spans it). Sentence marks ``<s>``/``</s>`` are counted.

    Raises:
        FileNotFoundError, ValueError: the file is missing, not UTF-8, or has no word
            spelled with ``letters`` (the message names ``decoder.lm_text``).
    """
    unigrams: Counter = Counter()
    bigrams: Counter = Counter()
    try:
        text = Path(path).read_text(encoding="utf-8-sig")  # Excel's UTF-8 starts with a BOM
    except FileNotFoundError:
        raise FileNotFoundError(
            f"The scorer's text file {path} (decoder.lm_text) does not exist."
        ) from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} (decoder.lm_text) is not UTF-8 text ({err}); save it as UTF-8."
        ) from None
    dropped = 0
    strip = "".join(c for c in _PUNCTUATION if c not in letters)  # punctuation, not a label
    for line in text.lower().splitlines():
        run: list[str] = []
        for word in [*_words_of(line, letters, strip), None]:
            if word is not None:
                run.append(word)
                continue
            dropped += 1
            if run:
                sentence = ["<s>", *run, "</s>"]
                unigrams.update(sentence[1:])
                unigrams["<s>"] += 1
                bigrams.update(zip(sentence[:-1], sentence[1:], strict=True))
            run = []
        dropped -= 1  # the end-of-line marker
    if not unigrams:
        raise ValueError(
            f"{path} (decoder.lm_text) has no word spelled only with the model's letters "
            f"{''.join(sorted(letters))!r}"
            + (" (it is empty)" if not text.strip() else "")
            + ": give sentences of the target language, one per line, or use decoder=greedy."
        )
    if dropped:
        log.warning(
            f"{path} (decoder.lm_text): {dropped} words with characters outside the alphabet "
            "were left out of the scorer's lexicon and LM."
        )
    return unigrams, bigrams


def check_words(
    labels: Sequence[str], language: str | None, lm_text: str | None, vocabulary: int
) -> None:
    """Check before training that a scorer can be built for ``labels`` from these words.

    Raises:
        ValueError, OSError: what :meth:`Scorer.build` would raise, or no word source.
    """
    letters = set(labels) - {" "}
    _tokens(labels)
    if lm_text is not None:
        text_counts(lm_text, letters)
    elif language is None:
        raise ValueError(
            "decoder=beam builds its word LM from the data's language or a text, but the "
            "data names no language: give it (`data.language=de`, a wordfreq code), or a "
            "text of the language with `decoder.lm_text=PATH` (one sentence per line), or "
            "use `decoder=greedy`."
        )
    else:
        word_frequencies(language, letters, vocabulary)


def write_arpa(
    path: str | Path, unigrams: dict[str, float], bigrams: dict[tuple[str, str], int] | None = None
) -> None:
    """Write an ARPA LM: unigrams from counts or frequencies, and bigrams with absolute
    discounting (D = 0.75) backing off to them when ``bigrams`` is given.

    KenLM's reader needs a bigram section, so a unigram LM gets one entry ``<s> </s>``.
    """
    counts = {w: float(c) for w, c in unigrams.items() if w != "<s>"}
    counts.setdefault("</s>", max(counts.values(), default=1.0) * 1e-3)
    total = sum(counts.values())
    unigram_p = {w: c / total for w, c in counts.items()}
    lines_2: list[str] = []
    backoff: dict[str, float] = {}
    if bigrams:
        discount = 0.75
        by_history: dict[str, list[tuple[str, int]]] = {}
        for (h, w), c in bigrams.items():
            by_history.setdefault(h, []).append((w, c))
        for h, followers in sorted(by_history.items()):
            n = sum(c for _, c in followers)
            reserved = discount * len(followers) / n
            seen_p = 0.0
            seen_uni = 0.0
            for w, c in sorted(followers):
                p = (c - discount) / n + reserved * unigram_p[w]
                seen_p += p
                seen_uni += unigram_p[w]
                lines_2.append(f"{math.log10(p):.6f}\t{h} {w}")
            backoff[h] = math.log10(max(1.0 - seen_p, 1e-12) / max(1.0 - seen_uni, 1e-12))
    else:
        lines_2.append(f"{math.log10(unigram_p['</s>']):.6f}\t<s> </s>")
    lines_1 = [f"-99.000000\t<s>\t{backoff.get('<s>', 0.0):.6f}"]
    lines_1 += [
        f"{math.log10(p):.6f}\t{w}\t{backoff.get(w, 0.0):.6f}" for w, p in unigram_p.items()
    ]
    lines_1.append("-99.000000\t<unk>\t0.000000")
    body = [
        "\\data\\",
        f"ngram 1={len(lines_1)}",
        f"ngram 2={len(lines_2)}",
        "",
        "\\1-grams:",
        *lines_1,
        "",
        "\\2-grams:",
        *lines_2,
        "",
        "\\end\\",
    ]
    _write_lines(Path(path), body)


@contextlib.contextmanager
def _quiet_stderr():
    """Send what C++ code writes to file descriptor 2 to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    write_text_atomic(path, "\n".join(lines) + "\n")
