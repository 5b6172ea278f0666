"""``python -m freezeft.transcribe CKPT AUDIO...``: what a trained speech model hears.

Prints one line per audio file, ``<file>\\t<transcript>``, in the order given. WAV, FLAC and
anything else libsndfile reads, at any sample rate (resampled) and channel count
(downmixed). A file that cannot be read gets a message on stderr naming it and why; the
others are still transcribed, and the exit code is 1.

    python -m freezeft.transcribe outputs/2026-11-23/16-03-19-4242/checkpoints/last.ckpt \\
        hallo.wav welt.flac
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import soundfile
import torch

from freezeft.checkpointing import load_checkpoint
from freezeft.speech.audio import load_audio
from freezeft.speech.decoding import greedy_decode
from freezeft.speech.module import SpeechModule

__all__ = ["transcribe", "main"]

DECODERS = ("greedy",)


def load_model(checkpoint: str | Path) -> SpeechModule:
    """A speech model from a checkpoint written by ``python -m freezeft.run`` (any stage),
    on the CPU, in eval mode.

    Raises:
        FileNotFoundError, IsADirectoryError, ValueError: not a readable checkpoint of a
            speech model (the message names the file).
    """
    load_checkpoint(checkpoint)  # its errors name the file and what is wrong with it
    try:
        model = SpeechModule.load_from_checkpoint(
            checkpoint, map_location="cpu", weights_only=False
        )
    except (KeyError, TypeError, RuntimeError) as err:
        raise ValueError(
            f"{checkpoint} is not a checkpoint of freezeft's speech model: {err}"
        ) from None
    return model.eval()


@torch.no_grad()
def transcribe(model: SpeechModule, audio_file: str | Path, decoder: str = "greedy") -> str:
    """The transcript of one audio file (``decoder``: ``"greedy"``).

    Raises:
        OSError, RuntimeError: the file cannot be read as audio.
    """
    if decoder not in DECODERS:
        raise ValueError(f"Expected `decoder` in {DECODERS}, but got {decoder!r}.")
    if not Path(audio_file).is_file():
        raise FileNotFoundError(f"no such file: {audio_file}")
    audio = torch.from_numpy(load_audio(Path(audio_file), model.hparams.sample_rate))
    logits, lengths = model(audio[None], torch.tensor([len(audio)]))
    (ids,) = greedy_decode(logits, lengths, model.model.blank)
    return model.alphabet.decode(ids)


def main(argv: Sequence[str] | None = None) -> int:
    """Transcribe the files given on the command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m freezeft.transcribe",
        description="Print the transcript of each audio file with a trained speech model.",
    )
    parser.add_argument("checkpoint", help="a .ckpt written by python -m freezeft.run")
    parser.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, ...; any rate)")
    parser.add_argument(
        "--decoder", choices=DECODERS, default="greedy", help="CTC decoding (default: greedy)"
    )
    args = parser.parse_args(argv)
    try:
        model = load_model(args.checkpoint)
    except (OSError, ValueError) as err:
        print(f"freezeft.transcribe: error: {err}", file=sys.stderr)
        return 1
    failed = 0
    for audio_file in args.audio:
        try:
            text = transcribe(model, audio_file, args.decoder)
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            failed += 1
            print(f"freezeft.transcribe: cannot read {audio_file}: {err}", file=sys.stderr)
            continue
        print(f"{audio_file}\t{text}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
