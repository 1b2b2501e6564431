"""Config overrides shared by every script, nanoGPT style.

A script declares its settings as plain module-level globals (int, float, bool, str, list,
tuple or None) and calls

    cfg = configurator.configure(globals(), sys.argv[1:], __doc__)

and runs as `configurator.run(main)`, which turns a user error into one line on stderr.

Arguments are applied left to right:
    path/to/config.py   executed; its settings apply. One experiment file (configs/*.py) serves
                        every stage, so a name that belongs to another stage's script is skipped
                        here, and a name that no stage knows is an error.
    --key=value         value parsed with ast.literal_eval (bare words stay strings)
    --help              prints the script's docstring and its settings (with the comment that
                        explains each in the script), then exits

Unknown keys and wrong types are errors, so a typo never silently trains the wrong thing.
An int is accepted where the default is a float; a setting whose default is None takes any value.
A list whose default holds numbers or strings of one type takes elements of that type only
(--ks=[0.5] is refused where ks defaults to [8, 16]), and a setting whose default is a non-empty
string cannot be set empty (--out_dir= is an unset shell variable, not a folder).
"""
import ast
import difflib
import functools
import io
import os
import sys
import tokenize
from types import SimpleNamespace

_PLAIN_TYPES = (bool, int, float, str, list, tuple, type(None))
_STAGES = ("prepare.py", "train.py", "evaluate.py", "compare.py")  # the scripts that read configs/*.py


class ConfigError(ValueError):
    pass


def defaults(namespace):
    """The settings of a module: its public lower-case globals of plain types, in definition order
    (an UPPER_CASE name is a constant, such as prepare.SAE_PROBES_TRAIN, not a setting)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, _PLAIN_TYPES)}


@functools.cache  # parsing the three scripts takes ~0.1 s; a config file asks once per foreign key
def _settings_of_stages():
    """Setting names of every stage script, read from their top-level assignments (no import)."""
    here = os.path.dirname(os.path.abspath(__file__))
    names = set()
    for script in _STAGES:
        path = os.path.join(here, script)
        if os.path.exists(path):
            tree = ast.parse(open(path).read(), path)
            names |= {t.id for node in tree.body if isinstance(node, ast.Assign)
                      for t in node.targets if isinstance(t, ast.Name) and not t.id.startswith("_")}
    return names


def _setting_comments(path):
    """The comment that explains each setting in its script: the one ending its assignment line,
    plus the indented comment-only lines right after it. Shown by --help."""
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        source = f.read()
    comments = {token.start[0]: token.string.lstrip("# ").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    explained = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            line = node.end_lineno
            parts = []
            while line in comments and (line == node.end_lineno or lines[line - 1][:1].isspace()):
                parts.append(comments[line])
                line += 1
            if parts:
                explained[node.targets[0].id] = " ".join(parts)
    return explained


def _check(key, value, default_values, source):
    if key not in default_values:
        close = [k for k in default_values if k.split("_")[0] == key.split("_")[0]]
        close += [k for k in difflib.get_close_matches(key, default_values, n=3) if k not in close]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{source}: unknown setting '{key}'{hint}")
    default = default_values[key]
    if default is None:
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        kinds = {type(v) for v in default}
        kind = kinds.pop() if len(kinds) == 1 else None
        if kind in (int, float, str):
            for v in value:
                if not (type(v) is kind or (kind is float and type(v) is int)):
                    raise ConfigError(f"{source}: '{key}' must list {kind.__name__} values like its "
                                      f"default {default!r}, got {v!r} in {value!r}")
        return type(default)(value)
    if type(value) is not type(default):
        raise ConfigError(f"{source}: '{key}' must be {type(default).__name__} "
                          f"like its default {default!r}, got {value!r} ({type(value).__name__})")
    if isinstance(default, str) and default and not value.strip():
        raise ConfigError(f"{source}: '{key}' is empty; it needs a value like its default {default!r}")
    return value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --device=cuda


def configure(namespace, argv, doc=""):
    """Apply config files and --key=value overrides to a copy of the module's defaults."""
    default_values = defaults(namespace)
    values = dict(default_values)
    for arg in argv:
        if arg in ("-h", "--help"):
            print((doc or "").strip() + "\n\nSettings (defaults):")
            comments = _setting_comments(namespace.get("__file__"))
            for k, v in default_values.items():
                option = f"  --{k}={v!r}"
                print(f"{option:<40} # {comments[k]}" if k in comments else option)
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"'{arg}': overrides are written --key=value")
            values[key] = _check(key, _parse_value(text), default_values, arg)
        else:
            try:
                source = open(arg).read()
            except OSError as e:
                raise ConfigError(f"cannot read config file '{arg}': {e.strerror}") from None
            scope = {}
            try:
                exec(compile(source, arg, "exec"), scope)
            except SyntaxError as e:
                raise ConfigError(f"config file '{arg}', line {e.lineno}: {e.msg}") from None
            except Exception as e:  # a config file is the user's input: its error is one line too
                raise ConfigError(f"config file '{arg}': {type(e).__name__}: {e}") from None
            for key, value in scope.items():
                if key.startswith("_") or not isinstance(value, _PLAIN_TYPES):
                    continue
                if key not in default_values and key in _settings_of_stages():
                    continue  # another stage's setting
                values[key] = _check(key, value, default_values, arg)
    return SimpleNamespace(**values)


def run(main):
    """Run main(argv) as a command: a user error (bad setting, missing or corrupt file, NaN,
    disk full) prints one line and exits 1 instead of a traceback. TRACEBACK=1 shows it."""
    try:
        main(sys.argv[1:])
    except (ConfigError, OSError, ValueError, FloatingPointError) as e:
        if os.environ.get("TRACEBACK"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: error: {e}\n(set TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: what was written is complete (atomic writes), no traceback
        if os.environ.get("TRACEBACK"):
            raise
        print(f"{os.path.basename(sys.argv[0])}: interrupted", file=sys.stderr)
        sys.exit(130)
