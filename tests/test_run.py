"""`python -m freezeft.run` end to end, as a user runs it: a subprocess from a temp dir."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from pyrun import run_python

from freezeft.history import read_history, read_lr_schedule

pytestmark = pytest.mark.slow  # subprocess runs


def run(tmp_path: Path, cache_dir: Path, *overrides: str) -> tuple[Path, str]:
    out = tmp_path / "run"
    proc = run_python(
        [
            "-m",
            "freezeft.run",
            "experiment=tiny",
            f"paths.cache_dir={cache_dir}",
            f"hydra.run.dir={out}",
            *overrides,
        ],
        cwd=tmp_path,
        env={"PYTHONUNBUFFERED": "1"},
    )
    return out, proc.stdout


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory, cache_dir, german_corpus, english_corpus):
    return run(tmp_path_factory.mktemp("transfer"), cache_dir)


def test_transfer_run_writes_results_and_ends_with_a_summary(transfer_run):
    out, stdout = transfer_run
    results = json.loads((out / "results.json").read_text())
    required = (
        "wer",
        "cer",
        "loss",
        "strategy",
        "seed",
        "epochs",
        "train_seconds",
        "trainable_params",
        "greedy_wer",
        "greedy_cer",
        "scorer",
    )
    assert set(required) <= set(results)
    assert results["decoder"] == "beam" and (out / "scorer" / "scorer.json").is_file()
    assert results["scorer"]["tuned_on"]["tried"]  # tuned on dev
    assert results["strategy"] == "naive" and results["seed"] == 0 and results["epochs"] == 1
    assert 0 <= results["cer"] and results["trainable_params"] == results["total_params"] > 0
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("freezeft transfer: strategy=naive seed=0 test WER ")
    assert f"CER {results['cer']:.4f}" in last
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert (out / "csv" / "version_0" / "metrics.csv").exists()


def test_transfer_to_german_drops_the_output_layer(transfer_run):
    out, _ = transfer_run
    report = json.loads((out / "transfer.json").read_text())
    assert report["dropped_layers"] == ["layer_6"]
    assert report["reinitialised"] == ["layer_6.weight", "layer_6.bias"]
    assert "ä" in report["target_labels"] and "ä" not in report["source_labels"]
    assert Path(json.loads((out / "results.json").read_text())["source"]).exists()


def test_evaluation_after_transfer_uses_the_transferred_weights(tmp_path, cache_dir, transfer_run):
    """English -> English with nothing dropped and lr=0: the test must score the source model.

    (DeepSpeech once evaluated the source model instead of the transferred one, its #3665;
    here the two are the same model, so their test numbers must agree exactly.)
    """
    _, _ = transfer_run  # the cached source model exists
    out, _ = run(
        tmp_path,
        cache_dir,
        "data=english",
        "data.corpus.n_train=32",
        "data.corpus.n_dev=8",
        "data.corpus.n_test=8",
        "data.corpus.vocabulary=200",
        "data.corpus.max_words=2",
        "transfer.drop_source_layers=0",
        "model.optimizer.lr=0",
    )
    results = json.loads((out / "results.json").read_text())
    source = json.loads((Path(results["source"]).parent / "results.json").read_text())
    # the source is tested with greedy decoding, the run with its scorer and greedy too
    assert source["decoder"] == "greedy" and results["decoder"] == "beam"
    assert results["greedy_cer"] == pytest.approx(source["cer"], abs=1e-9)
    assert results["greedy_wer"] == pytest.approx(source["wer"], abs=1e-9)


def test_scratch_baseline_and_pretrain_stage(tmp_path, cache_dir, german_corpus, english_corpus):
    out, _ = run(tmp_path, cache_dir, "strategy=scratch")
    results = json.loads((out / "results.json").read_text())
    assert results["source"] is None and not (out / "transfer.json").exists()
    assert results["strategy"] == "scratch"
    (tmp_path / "p").mkdir()
    out, stdout = run(tmp_path / "p", cache_dir, "stage=pretrain")
    results = json.loads((out / "results.json").read_text())
    assert results["budget"]["language"] == "en"
    assert "freezeft pretrain:" in stdout.strip().splitlines()[-1]


def test_combined_strategy_from_the_command_line(tmp_path, cache_dir, transfer_run):
    out, _ = run(
        tmp_path,
        cache_dir,
        "strategy=freeze_then_unfreeze",
        "addons=[discriminative_lr,warmup]",
        "strategy.callbacks.freeze_then_unfreeze.unfreeze_at_epoch=1",
        "trainer.max_epochs=2",
    )
    results = json.loads((out / "results.json").read_text())
    assert results["strategy"] == "freeze_then_finetune+discriminative_lr+warmup"  # alias
    log = (out / "run.log").read_text()  # freezeft's and Lightning's messages, as on the console
    assert "FreezeThenUnfreeze + DiscriminativeLR + LRWarmup: layer groups" in log
    assert log.count("FreezeThenUnfreeze: epoch 1: unfroze") == 1  # once, not once per handler
    assert "FreezeThenUnfreeze: epoch 1: unfroze ['model.layer_1'" in log
    metrics = (out / "csv" / "version_0" / "metrics.csv").read_text()
    assert "lr-AdamW/model.layer_1" in metrics and "trainable_params" in metrics

    # what the sweep report plots: dev CER per epoch, each group's LR per step
    epochs = read_history(out)
    assert [e["epoch"] for e in epochs] == [0, 1] and all("val_cer" in e for e in epochs)
    lr = read_lr_schedule(out)
    phase1 = [i for i, epoch in enumerate(lr["epoch"]) if epoch == 0]
    phase2 = [i for i, epoch in enumerate(lr["epoch"]) if epoch == 1]
    assert phase1 and phase2
    assert all(lr["model.layer_1"][i] == 0 for i in phase1)  # frozen: trains at LR 0
    assert all(lr["model.layer_6"][i] > 0 for i in phase1)
    assert all(0 < lr["model.layer_1"][i] < lr["model.layer_6"][i] for i in phase2)


def test_the_commissioned_command_thaws_within_six_epochs_of_the_tiny_corpus(
    tmp_path, cache_dir, transfer_run
):
    """`python -m freezeft.run strategy=freeze_then_finetune`, as written (experiment=tiny,
    6 epochs): the head trains alone until epoch 4, then everything, the encoder at a tenth."""
    out, stdout = run(tmp_path, cache_dir, "strategy=freeze_then_finetune", "trainer.max_epochs=6",
                      "decoder=greedy")  # fmt: skip
    assert "freezeft transfer: strategy=freeze_then_finetune seed=0" in stdout
    lr = read_lr_schedule(out)
    before = [i for i, epoch in enumerate(lr["epoch"]) if epoch < 4]
    after = [i for i, epoch in enumerate(lr["epoch"]) if epoch >= 4]
    assert before and after
    assert all(lr["model.layer_1"][i] == 0 < lr["model.layer_6"][i] for i in before)
    assert all(lr["model.layer_1"][i] == pytest.approx(0.1 * lr["model.layer_6"][i]) for i in after)


def test_bad_rows_nan_audio_included_are_skipped_and_reported(tmp_path, german_corpus):
    data = tmp_path / "data"
    shutil.copytree(german_corpus, data, ignore=shutil.ignore_patterns("COMPLETE", "*.json"))
    good = data / "train" / "00000.wav"
    audio, rate = soundfile.read(good, dtype="float32")
    (data / "truncated.wav").write_bytes(good.read_bytes()[:2000])
    soundfile.write(data / "nan.wav", np.full_like(audio, np.nan), rate, subtype="FLOAT")
    soundfile.write(data / "corrupt.flac", audio, rate)  # a good header, a corrupt body:
    body = bytearray((data / "corrupt.flac").read_bytes())  # passes the checks, fails to decode
    body[2000:-100] = bytes((b * 7 + 13) % 256 for b in body[2000:-100])
    (data / "corrupt.flac").write_bytes(body)
    with open(data / "train.csv", "a") as stream:
        stream.write(
            "missing.wav,0,gut\ntruncated.wav,0,gut\ntrain/00001.wav,0,ok!\nnan.wav,0,gut\n"
            "corrupt.flac,0,gut\n"
        )
    out = tmp_path / "run"
    proc = run_python(
        [
            "-m",
            "freezeft.run",
            "data=deepspeech_csv",
            f"data.data_dir={data}",
            "data.language=de",  # the scorer's words: German's from wordfreq
            "decoder.vocabulary=2000",
            "data.num_workers=0",
            "data.batch_size=8",
            "strategy=scratch",
            "model.n_hidden=32",
            "trainer.max_epochs=1",
            f"hydra.run.dir={out}",
        ],
        cwd=tmp_path,
    )
    with open(out / "skipped_samples.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(r["split"], r["row"].rsplit(":", 1)[1], r["kind"]) for r in rows] == [
        ("train", "34", "missing audio"),
        ("train", "35", "truncated audio"),
        ("train", "36", "outside alphabet"),
        ("train", "37", "non-finite audio"),  # float audio's samples are read by the check
        ("train", "38", "unreadable audio"),  # found while training, which went on
    ]
    assert "['!']" in rows[2]["detail"]
    results = json.loads((out / "results.json").read_text())
    assert results["skipped_rows"] == {
        "missing audio": 1,
        "truncated audio": 1,
        "outside alphabet": 1,
        "non-finite audio": 1,
        "unreadable audio": 1,
    }
    assert results["skipped_batches"] == []  # the NaN file never reached a batch
    json.loads((out / "results.json").read_text(), parse_constant=pytest.fail)
    output = proc.stdout + proc.stderr  # Hydra logs to stdout, Lightning warns on stderr
    assert "Skipped 5 rows (" in output and "skipped_samples.csv" in output


def test_runs_started_in_the_same_second_get_their_own_run_dirs(tmp_path):
    # each stops at once on a bad value, after Hydra made its run dir
    args = [sys.executable, "-m", "freezeft.run", "seed=-1"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 1
    run_dirs = sorted(p.parent for p in tmp_path.glob("outputs/*/*/.hydra"))
    pids = sorted(str(proc.pid) for proc in procs)
    assert len(run_dirs) == 2 and sorted(d.name.rsplit("-", 1)[1] for d in run_dirs) == pids


def test_train_runs_in_process_from_a_composed_config(tmp_path, cache_dir, german_corpus):
    """`freezeft.app.train.train(cfg, output_dir)`: what `python -m freezeft.run` wraps."""
    from hydra import compose, initialize_config_module

    from freezeft.app.train import train

    with initialize_config_module(config_module="freezeft.conf", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=["experiment=tiny", "strategy=scratch", f"paths.cache_dir={cache_dir}"],
        )
    results = train(cfg, tmp_path / "run")
    assert results["stage"] == "transfer" and results["strategy"] == "scratch"
    assert results["monitor"] == "val_cer" and results["dev_cer"] is not None
    assert json.loads((tmp_path / "run" / "results.json").read_text())["cer"] == results["cer"]


def test_the_converge_protocol_stops_when_dev_stops_improving(tmp_path, cache_dir, transfer_run):
    out, _ = run(
        tmp_path,
        cache_dir,
        "protocol=converge",
        "callbacks.early_stopping.patience=1",
        "decoder=greedy",
    )
    results = json.loads((out / "results.json").read_text())
    assert results["budget"]["protocol"] == "converge" and results["budget"]["max_epochs"] == 40
    epochs = read_history(out)
    cers = [e["val_cer"] for e in epochs]
    # it stopped at the first validation that did not beat the best before it
    stop = next(i for i in range(1, len(cers)) if cers[i] >= min(cers[:i]))
    assert len(epochs) == stop + 1 < 40 and results["epochs"] == stop + 1


def test_auto_freeze_decisions_reach_history_lr_schedule_and_report(tmp_path, cache_dir,
                                                                    transfer_run):  # fmt: skip
    from freezeft.app.report import write_report
    from freezeft.history import read_decisions

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    out, _ = run(
        sweep,
        cache_dir,
        "strategy=auto_freeze",
        "strategy.callbacks.auto_freeze.threshold=1e9",  # freeze at every chance
        "strategy.callbacks.auto_freeze.check_every_n_steps=1",
        "strategy.callbacks.auto_freeze.patience=1",
        "strategy.callbacks.auto_freeze.after_plateau=false",  # on the gradient test alone
        "strategy.callbacks.auto_freeze.min_epochs=0",
        "trainer.max_epochs=3",
        "decoder=greedy",
    )
    decisions = read_decisions(out)
    assert [d["group"] for d in decisions][:2] == ["model.layer_1", "model.layer_2"]
    assert all(d["strategy"] == "AutoFreeze" for d in decisions)
    assert len({(d["group"], d["step"]) for d in decisions}) == len(decisions)  # once each
    assert "AutoFreeze: epoch 0: froze ['model.layer_1']" in (out / "run.log").read_text()
    schedule = read_lr_schedule(out)
    first = decisions[0]
    after = [lr for step, lr in zip(schedule["step"], schedule["model.layer_1"], strict=True)
             if step >= first["step"]]  # fmt: skip
    assert after and all(lr == 0 for lr in after)
    assert any(lr > 0 for lr in schedule["model.layer_6"][-2:])  # the head still trains
    write_report(sweep)  # a sweep dir of one job: the run dir
    assert (sweep / "lr_schedule.png").read_bytes().startswith(b"\x89PNG")


def test_a_full_disk_is_one_line_with_the_folder_the_file_and_how_to_resume(tmp_path):
    """ENOSPC from a write freezeft does not make itself (Lightning's CSV logger, while a
    resumed run trains on): one line naming the folder and the file, exit code 1."""
    project = Path(__file__).parents[1] / "examples" / "own_model"
    args = ["--config-dir", str(project / "conf"), "model=mynet", "data=mydata",
            "monitor=val_acc", "monitor_mode=max", "strategy=scratch"]  # fmt: skip
    out = tmp_path / "run"
    run_python(["-m", "freezeft.run", *args, f"hydra.run.dir={out}"], cwd=project)
    full_disk = Path(__file__).with_name("full_disk.py")
    proc = run_python(
        [
            str(full_disk),
            str(out / "csv"),
            "-m",
            "freezeft.run",
            *args,
            "trainer.max_epochs=12",  # trains on: the logger writes again
            f"resume={out}",
            f"hydra.run.dir={tmp_path / 'resumed'}",
        ],
        cwd=project,
        check=False,
    )
    assert proc.returncode == 1
    error = re.search(r"freezeft: error: (.*)", proc.stderr)
    assert error, proc.stderr[-3000:]
    folder = re.escape(str(out / "csv" / "version_1"))
    assert re.fullmatch(
        rf"no space left on {folder} \(\d+ MiB free\) while writing {folder}/\S+; "
        rf"free space and resume with resume={re.escape(str(out))}",
        error.group(1),
    ), error.group(1)
    assert "Traceback" not in proc.stdout + proc.stderr


def test_the_app_under_ddp_finishes_with_every_app_callback_on(tmp_path, cache_dir, german_corpus):
    """The README's multi-GPU command on two CPU processes (gloo): History, DivergenceCheck,
    checkpoints and the interrupt checkpoint all run on both ranks. History once read the
    epoch's synced metrics on rank 0 alone, so rank 0 waited in one all-reduce while rank 1
    was in DivergenceCheck's: gloo aborted the run (SIGABRT) in its first epoch."""
    out, stdout = run(
        tmp_path,
        cache_dir,
        "decoder=greedy",
        "transfer.source=null",
        "data.num_workers=0",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=2",
    )
    assert len(re.findall(r"^freezeft transfer: ", stdout, re.M)) == 1  # rank 0's line alone
    assert stdout.count("Testing the best checkpoint") == 1  # ranks > 0 log warnings only
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "finished" and 0.0 <= results["cer"] <= 1.5
    epochs = read_history(out)
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert all("val_cer" in e and "train_loss" in e for e in epochs)
    assert read_lr_schedule(out)["step"]


@pytest.mark.parametrize(
    "strategy",
    [
        ["strategy=gradual_unfreeze", "strategy.callbacks.gradual_unfreeze.every_n_epochs=1",
         "addons=[discriminative_lr]"],
        ["strategy=freeze_then_finetune",
         "strategy.callbacks.freeze_then_unfreeze.unfreeze_at_epoch=2", "addons=[warmup]",
         "strategy.addons.warmup.warmup_steps=6"],
    ],
    ids=["gradual_unfreeze+discriminative_lr", "freeze_then_finetune+warmup"],
)  # fmt: skip
def test_a_speech_runs_schedule_yaml_replays_it_on_the_tiny_corpus(
    tmp_path, cache_dir, transfer_run, strategy
):
    """Issue 37's "shown by": the run, then `strategy=schedule strategy.path=RUN/schedule.yaml`:
    the same lr_schedule.csv byte for byte, the same test loss and CER."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    first, _ = run(tmp_path / "a", cache_dir, *strategy, "trainer.max_epochs=4")
    replay, stdout = run(
        tmp_path / "b", cache_dir, "strategy=schedule",
        f"strategy.path={first / 'schedule.yaml'}", "trainer.max_epochs=4",
    )  # fmt: skip
    assert "freezeft transfer: strategy=schedule" in stdout
    assert (first / "lr_schedule.csv").read_bytes() == (replay / "lr_schedule.csv").read_bytes()
    a, b = (json.loads((d / "results.json").read_text()) for d in (first, replay))
    assert (a["loss"], a["cer"], a["greedy_cer"]) == (b["loss"], b["cer"], b["greedy_cer"])
