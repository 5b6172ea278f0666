"""``python -m freezeft.transcribe CKPT AUDIO...``: what a trained speech model hears.

Prints one line per audio file, ``<file>\\t<transcript>``, in the order given. WAV, FLAC and
anything else libsndfile reads, at any sample rate (resampled) and channel count
(downmixed). A file that cannot be read, or that holds no samples or NaN or infinite ones
(which would give a blank transcript), gets a message on stderr naming it and why; the
others are still transcribed, and the exit code is 1. Options may come anywhere, before or
after the audio files.

Decoding is the run's: with the scorer the run built and tuned (``<run dir>/scorer``, next
to the checkpoint's ``checkpoints/`` folder) when it used ``decoder=beam``, else greedy.
``--decoder greedy`` skips the scorer; ``--scorer DIR`` names another scorer folder.

A scorer whose LM weight and word score were never tuned on dev (its ``scorer.json`` says
``"tuned_on": null``: the run was stopped before or during tuning) is used with a one-line
warning on stderr that says so and how to get tuned ones (resume the run). It warns rather
than refuses: the transcripts are the beam search's with the weights tuning starts from,
usually a little worse than tuned ones but not wrong in kind, and the stopped run reported
no test score they could contradict; refusing would only push a user to greedy decoding,
which is not tuned either. Weights the run's config fixed (``decoder.lm_weight`` and
``decoder.word_score``) are not tuned by design and get no warning.

    python -m freezeft.transcribe outputs/2026-11-23/16-03-19-4242/checkpoints/last.ckpt \\
        hallo.wav welt.flac

``--csv FILE`` transcribes the files of a DeepSpeech CSV instead and scores them against its
transcripts: a last line ``WER w  CER c  (n of m utterances, decoder)``, corpus-level, as
the run's test metrics are computed (e.g. on real recorded English:
:mod:`freezeft.speech.recordings`). Transcripts must be written in the model's alphabet, as
for training (an empty one, or one with other characters, is refused naming its row);
files that cannot be read or are refused are named with their row and left out of the
score, which says how many.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile
import torch

from freezeft.checkpoint_io import load_checkpoint
from freezeft.speech.audio import load_audio
from freezeft.speech.decoding import error_counts, greedy_decode
from freezeft.speech.manifest import not_a_regular_file, read_csv
from freezeft.speech.module import SpeechModule
from freezeft.speech.scorer import Scorer

__all__ = ["transcribe", "main", "load_model", "find_scorer", "untuned_scorer_warning"]

DECODERS = ("greedy", "beam")


def load_model(checkpoint: str | Path, *, trusted: bool = False) -> SpeechModule:
    """A speech model from a checkpoint written by ``python -m freezeft.run`` (any stage),
    on the CPU, in eval mode. It is loaded as weights only: a file that needs code to load
    is refused unless ``trusted``.

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: not a readable checkpoint of a
            speech model (the message names the file).
    """
    saved = load_checkpoint(checkpoint, trusted=trusted)  # errors name the file and the problem
    try:
        # the run's scorer is already built: its source text need not exist here
        model = SpeechModule.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=not trusted, decoder="greedy"
        )
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{checkpoint} is not a checkpoint of freezeft's speech model: {err}"
        ) from None
    decoder = saved.get("hyper_parameters", {}).get("decoder") or {}
    decoder = decoder if isinstance(decoder, dict) else {}
    #: how the run that wrote the checkpoint decoded ("greedy" or "beam")
    model.trained_decoder = decoder.get("name", "greedy")
    #: the (lm_weight, word_score) its config fixed; None where they were to be tuned on dev
    model.fixed_weights = (decoder.get("lm_weight"), decoder.get("word_score"))
    return model.eval()


def find_scorer(checkpoint: str | Path, model: SpeechModule) -> Scorer | None:
    """The scorer the checkpoint's run built (``<run dir>/scorer``), or ``None`` if the run
    decoded greedily.

    Raises:
        FileNotFoundError: the run used ``decoder=beam`` but its scorer folder is gone.
    """
    trained_with = getattr(model, "trained_decoder", "greedy")
    folder = Path(checkpoint).resolve().parent.parent / "scorer"
    if trained_with != "beam" and not folder.is_dir():
        return None
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{checkpoint} comes from a run with decoder=beam, but its scorer folder {folder} "
            "is missing: name one with --scorer DIR, or use --decoder greedy."
        )
    return Scorer.load(folder, model.alphabet.labels)


def untuned_scorer_warning(scorer: Scorer, model: SpeechModule) -> str | None:
    """One line saying that ``scorer``'s LM weight and word score are not tuned on dev
    (``"tuned_on": null`` in its ``scorer.json``) and how to get tuned ones, or ``None``
    when they were tuned or the checkpoint's run fixed them (``decoder.lm_weight`` and
    ``decoder.word_score`` set: nothing to tune)."""
    settings = scorer.settings
    weights = (settings.lm_weight, settings.word_score)
    if settings.tuned_on is not None or getattr(model, "fixed_weights", None) == weights:
        return None
    run_dir = scorer.folder.parent
    resume = (
        f"python -m freezeft.run <its overrides> resume={run_dir}"
        if (run_dir / "checkpoints").is_dir()
        else "python -m freezeft.run <its overrides> resume=<its run dir>"
    )
    return (
        f"warning: the scorer's lm_weight={settings.lm_weight} and word_score="
        f"{settings.word_score} (DeepSpeech's alpha and beta) are its defaults, not tuned on "
        f'dev ({scorer.folder / "scorer.json"} says "tuned_on": null: its run stopped before '
        f"tuning ended); for tuned ones resume the run ({resume}), which tunes and saves them."
    )


@torch.no_grad()
def transcribe(model: SpeechModule, audio_file: str | Path, scorer: Scorer | None = None) -> str:
    """The transcript of one audio file, with ``scorer`` if given, else greedy.

    Raises:
        OSError, RuntimeError: the file cannot be read as audio.
        ValueError: its audio has no samples, or NaN or infinite ones.
    """
    if Path(audio_file).is_dir():
        raise IsADirectoryError(f"{audio_file} is a folder, not an audio file")
    special = not_a_regular_file(audio_file)  # with stat: opening a FIFO would block
    if special is not None:
        raise OSError(f"{audio_file} is {special}, not a regular file")
    if not Path(audio_file).is_file():
        raise FileNotFoundError(f"no such file: {audio_file}")
    samples = load_audio(Path(audio_file), model.hparams.sample_rate)
    if len(samples) == 0:
        raise ValueError("it has no samples")
    bad = int(np.count_nonzero(~np.isfinite(samples)))
    if bad:
        raise ValueError(f"{bad} of its {len(samples)} samples are not finite (NaN or infinite)")
    audio = torch.from_numpy(samples)
    logits, lengths = model(audio[None], torch.tensor([len(audio)]))
    if scorer is not None:
        (text,) = scorer.decode(logits, lengths)
        return text
    (ids,) = greedy_decode(logits, lengths, model.model.blank)
    return model.alphabet.decode(ids)


def main(argv: Sequence[str] | None = None) -> int:
    """Transcribe the files given on the command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m freezeft.transcribe",
        description="Print the transcript of each audio file with a trained speech model.",
        epilog="A scorer whose lm_weight and word_score were not tuned on dev (the run was "
        'stopped during tuning: scorer.json says "tuned_on": null) is used with a warning '
        "on stderr, not refused: its transcripts are valid beam-search output with the "
        "weights tuning starts from. Resume the run to tune them.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by python -m freezeft.run")
    parser.add_argument("audio", nargs="*", help="audio files (WAV, FLAC, ...; any rate)")
    parser.add_argument(
        "--csv",
        help="a DeepSpeech CSV (wav_filename,wav_filesize,transcript): transcribe its files "
        "and print the corpus WER and CER against its transcripts",
    )
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        default=None,
        help="greedy, or beam (the scorer); default: the run's (beam if it built a scorer)",
    )
    parser.add_argument("--scorer", help="a scorer folder (default: <run dir>/scorer)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load a checkpoint that needs code to load (never needed for freezeft's own; "
        "only for a file whose origin you trust)",
    )
    args = parser.parse_intermixed_args(argv)  # options after the audio files too
    if bool(args.audio) == bool(args.csv):
        parser.error("give audio files or --csv FILE (one of the two)")
    try:
        rows = read_csv(args.csv) if args.csv else []
        files = [(row.path, row.source) for row in rows] or [(a, None) for a in args.audio]
        model = load_model(args.checkpoint, trusted=args.trust_checkpoint)
        scorer = None
        if args.scorer and args.decoder != "greedy":
            scorer = Scorer.load(args.scorer, model.alphabet.labels)
        elif args.decoder != "greedy":
            scorer = find_scorer(args.checkpoint, model)
            if scorer is None and args.decoder == "beam":
                raise FileNotFoundError(
                    f"--decoder beam: {args.checkpoint}'s run built no scorer (it decoded "
                    "greedily); name one with --scorer DIR."
                )
        for row in rows:  # what a run's data would refuse, refused here too
            if not row.transcript:
                raise ValueError(f"{row.source}: empty transcript; give the words spoken.")
            missing = model.alphabet.missing(row.transcript)
            if missing:
                raise ValueError(
                    f"{row.source}: transcript {row.transcript!r} has characters outside the "
                    f"model's alphabet: {missing}; write it as the model spells (lower case, "
                    "numbers in words, no punctuation)."
                )
        if scorer is not None:
            scorer.open()  # a broken scorer file is the scorer's error, not the audio's
            untuned = untuned_scorer_warning(scorer, model)
            if untuned:
                print(f"freezeft.transcribe: {untuned}", file=sys.stderr, flush=True)
    except (OSError, ValueError) as err:
        print(f"freezeft.transcribe: error: {err}", file=sys.stderr)
        return 1
    unreadable, refused, references, heard = 0, 0, [], []
    for number, (audio_file, where) in enumerate(files):
        row = f" ({where})" if where else ""
        try:
            text = transcribe(model, audio_file, scorer)
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            unreadable += 1
            print(f"freezeft.transcribe: cannot read {audio_file}{row}: {err}", file=sys.stderr)
            continue
        except ValueError as err:  # read, but nothing a transcript could be made of
            refused += 1
            print(f"freezeft.transcribe: refused {audio_file}{row}: {err}", file=sys.stderr)
            continue
        if rows:
            references.append(model.alphabet.spelling(rows[number].transcript))
            heard.append(text)
        print(f"{audio_file}\t{text}", flush=True)
    if rows:
        decoder = "greedy" if scorer is None else "with the scorer"
        counts = ((unreadable, "unreadable"), (refused, "refused"))
        failed = " and ".join(f"{n} {what}" for n, what in counts if n)
        left_out = f"; {failed}, left out" if failed else ""
        if not heard:
            print(f"no WER/CER: none of the {len(rows)} files of {args.csv} could be transcribed")
        else:
            word_edits, words, char_edits, chars = error_counts(references, heard)
            print(
                f"WER {word_edits / words:.3f}  CER {char_edits / chars:.3f}  ({len(heard)} of "
                f"{len(rows)} utterances of {args.csv}{left_out}, {decoder})",
                flush=True,
            )
    return 1 if unreadable or refused else 0


if __name__ == "__main__":
    sys.exit(main())
