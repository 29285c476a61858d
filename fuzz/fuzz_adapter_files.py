#!/usr/bin/env python3
"""Fuzz the readers of saved bca adapters.

Takes a valid saved adapter folder (by default a small one built here: two adapted layers,
one of them zero-padded, and a fully trained head), mutates its two files and runs every
reader on the result:

* ``bca.model.load_adapter`` (into a fresh base model),
* ``bca.onnx.read_adapter``,
* ``bca info`` and ``bca info --json`` (in process),
* with ``--peft``: ``bca.peft_interop.bca_adapter_dir_to_c3a``.

Each reader must either succeed with a correct result (the kernels, parameters, scale and
shapes it returns equal what the reference parsers, ``json`` and the ``safetensors``
library, read from the same files) or raise ``ValueError``/``TypeError`` (e.g.
``bca.BcaFormatError``) whose message names the damaged folder's config or weights file;
the command line must exit with status 1 and a one-line message naming the file. Any
other exception type, an error that names no file, or a wrong result is a failure.

Mutations: byte flips, truncation and extension of either file; the safetensors header's
length field; header entries (dtype and shape relabels, data offsets, dropped, duplicated
and renamed entries, metadata); config fields (wrong types, huge, zero and negative
numbers, NaN/Infinity, deep nesting, missing, renamed and duplicated keys); invalid UTF-8.
One to three mutations per case.

Usage::

    python fuzz/fuzz_adapter_files.py --iterations 100000          # seeded, with a progress bar
    python fuzz/fuzz_adapter_files.py --minutes 10 --seed 7
    python fuzz/fuzz_adapter_files.py --adapter DIR --model pkg.mod:make_base_model
    python fuzz/fuzz_adapter_files.py --atheris -- -runs=100000     # coverage guided (atheris)

Failures are listed at the end (and their folders kept under ``--keep-failures``); the
exit status is 1 when there was any. ``tests/test_fuzz_adapter_files.py`` runs a few hundred
cases of the same harness under hypothesis in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import math
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


# --------------------------------------------------------------------------------------
# where the random choices come from: random.Random, hypothesis, or atheris
# --------------------------------------------------------------------------------------
class Chooser(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...

    def raw(self, n: int) -> bytes: ...


def choice(c: Chooser, items: Sequence[Any]) -> Any:
    return items[c.integer(0, len(items) - 1)]


class RandomChooser:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def raw(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class HypothesisChooser:
    """Choices drawn from hypothesis' ``st.data()`` (so failures shrink)."""

    def __init__(self, data: Any) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return int(self.data.draw(self.st.integers(lo, hi)))

    def raw(self, n: int) -> bytes:
        return bytes(self.data.draw(self.st.binary(min_size=n, max_size=n)))


class AtherisChooser:
    def __init__(self, fdp: Any) -> None:
        self.fdp = fdp

    def integer(self, lo: int, hi: int) -> int:
        return int(self.fdp.ConsumeIntInRange(lo, hi))

    def raw(self, n: int) -> bytes:
        b = self.fdp.ConsumeBytes(n)
        return bytes(b) + b"\0" * (n - len(b))


# --------------------------------------------------------------------------------------
# the files and their mutations
# --------------------------------------------------------------------------------------
@dataclass
class Files:
    config: bytes
    weights: bytes
    labels: list[str] = field(default_factory=list)


def split_weights(raw: bytes) -> tuple[dict[str, Any], bytes] | None:
    """(header, data) of a safetensors file when its header still parses, else None."""
    if len(raw) < 8:
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        return None
    try:
        head = json.loads(raw[8 : 8 + n])
    except (ValueError, RecursionError):
        return None
    return (head, raw[8 + n :]) if isinstance(head, dict) else None


def join_weights(head: dict[str, Any], data: bytes) -> bytes:
    text = render_json(head, indent=None).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# Special values are placed in the document as sentinel strings and expanded in the text,
# so that json.dumps never recurses deeply nor refuses NaN.
def _special(c: Chooser) -> Any:
    kind = c.integer(0, 5)
    if kind == 0:
        return f"\u0000DEEP{choice(c, [50, 900, 3000, 100_000])}\u0000"
    if kind == 1:
        return "\u0000" + choice(c, ["NaN", "Infinity", "-Infinity"]) + "\u0000"
    if kind == 2:
        return "\u0000BIGINT\u0000"
    if kind == 3:
        return "\u0000DEEPOBJ\u0000"
    if kind == 4:
        return "\udcff"  # a lone surrogate: invalid UTF-8 once encoded
    return "\u0000EXP\u0000"


def render_json(doc: Any, indent: int | None = 2) -> str:
    text = json.dumps(doc, indent=indent, ensure_ascii=False)
    out = []
    parts = text.split('"\\u0000')
    out.append(parts[0])
    for part in parts[1:]:
        token, _, rest = part.partition('\\u0000"')
        if token.startswith("DEEP") and token[4:].isdigit():
            k = int(token[4:])
            out.append("[" * k + "]" * k)
        elif token in ("NaN", "Infinity", "-Infinity"):
            out.append(token)
        elif token == "BIGINT":
            out.append("9" * 5000)
        elif token == "DEEPOBJ":
            out.append('{"a":' * 2000 + "1" + "}" * 2000)
        elif token == "EXP":
            out.append("1e999999")
        else:  # not a sentinel after all
            out.append('"\\u0000' + token + '\\u0000"')
        out.append(rest)
    return "".join(out)


INTERESTING: list[Any] = [
    0,
    -1,
    1,
    2,
    3,
    4,
    7,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63),
    10**30,
    1.5,
    4.0,
    -0.0,
    1e308,
    True,
    False,
    None,
    "",
    "4",
    "fc1",
    "F32",
    "modules_to_save.head.weight",
    [],
    {},
    [1],
    [4, 4, 4],
    {"a": 1},
    {"in_features": 16, "out_features": 12, "block_size": 4},
]


def _value(c: Chooser) -> Any:
    return _special(c) if c.integer(0, 5) == 0 else choice(c, INTERESTING)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def mutate_tree(doc: Any, c: Chooser) -> tuple[Any, str]:
    """One structural mutation of a JSON document: a node replaced, removed, renamed,
    added or duplicated (duplicates are written as text, see render_json's caller)."""
    paths = _paths(doc)
    path = choice(c, paths)
    op = c.integer(0, 5)
    if not path:
        return (_value(c), "root replaced") if op == 0 else (doc, "root kept")
    parent, key = _get(doc, path[:-1]), path[-1]
    where = ".".join(str(p) for p in path)
    if op <= 2:
        parent[key] = _value(c)
        return doc, f"{where} = {parent[key]!r:.40}"
    if op == 3:
        del parent[key]
        return doc, f"{where} removed"
    if op == 4 and isinstance(parent, dict):
        parent[str(key) + choice(c, ["x", "", " ", ".", "\u00e9"])] = parent.pop(key)
        return doc, f"{where} renamed"
    if isinstance(parent, list):
        parent.insert(key, _value(c))
        return doc, f"{where} inserted"
    parent[choice(c, ["extra", "format", "scale", "shape", "dtype", "__metadata__"])] = _value(c)
    return doc, f"{where}: key added"


def _duplicate_key(text: str, c: Chooser) -> str:
    """Repeat one ``"key": value`` pair of an object in the text (a duplicate key)."""
    idx = [i for i in range(len(text)) if text.startswith('": ', i) or text.startswith('":', i)]
    if not idx:
        return text
    i = choice(c, idx)
    start = text.rfind('"', 0, i)
    close = text.find("}", i)
    if start < 0 or close < 0:
        return text
    return (
        text[:close]
        + f", {text[start : i + 1]}: {choice(c, ['1', '0', '-4', 'null'])}"
        + text[close:]
    )


def _flip(data: bytes, c: Chooser, lo: int = 0, hi: int | None = None) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    hi = len(b) - 1 if hi is None else min(hi, len(b) - 1)
    for _ in range(c.integer(1, 8)):
        i = c.integer(min(lo, hi), hi)
        b[i] = choice(c, [b[i] ^ (1 << c.integer(0, 7)), 0, 0xFF, ord("{"), ord('"'), 0x80])
    return bytes(b)


def _resize(data: bytes, c: Chooser) -> bytes:
    if c.integer(0, 2) == 0:
        return data + c.raw(c.integer(1, 64))
    return data[: c.integer(0, max(len(data) - 1, 0))]


DTYPES = ["F32", "F64", "F16", "BF16", "I32", "U32", "I64", "U8", "BOOL", "F8_E4M3", "C64"]
DTYPES += ["f32", "", "F128", "float32"]


def _mutate_entry(entry: dict[str, Any], c: Chooser) -> str:
    what = c.integer(0, 2)
    if what == 0:
        entry["dtype"] = choice(c, DTYPES) if c.integer(0, 4) else _value(c)
        return f"dtype -> {entry['dtype']!r:.20}"
    if what == 1:
        shape = list(entry.get("shape") or [])
        op = c.integer(0, 5)
        if op == 0 and len(shape) > 1:
            i, j = c.integer(0, len(shape) - 1), c.integer(0, len(shape) - 1)
            shape[i], shape[j] = shape[j], shape[i]
        elif op == 1 and shape:
            i = c.integer(0, len(shape) - 1)
            shape[i] = shape[i] + choice(c, [-1, 1, -shape[i]])
        elif op == 2:
            shape.insert(c.integer(0, len(shape)), choice(c, [1, 2, 0]))
        elif op == 3 and shape:
            shape.pop(c.integer(0, len(shape) - 1))
        elif op == 4 and shape:  # the same number of elements, another shape
            n = math.prod(int(s) for s in shape if isinstance(s, int))
            shape = [n] if c.integer(0, 1) else [1, n]
        else:
            shape = _value(c)
        entry["shape"] = shape
        return f"shape -> {shape!r:.40}"
    offsets = list(entry.get("data_offsets") or [0, 0])
    op = c.integer(0, 3)
    if op == 0 and len(offsets) == 2:
        offsets.reverse()
    elif op == 1 and offsets:
        i = c.integer(0, len(offsets) - 1)
        if isinstance(offsets[i], int):
            offsets[i] += choice(c, [-4, -1, 1, 4, 2**64])
    elif op == 2:
        offsets.append(0)
    else:
        offsets = _value(c)
    entry["data_offsets"] = offsets
    return f"data_offsets -> {offsets!r:.40}"


def mutate(base: Files, c: Chooser) -> Files:
    """One to three mutations of ``base`` (which is not changed)."""
    f = Files(base.config, base.weights, [])
    for _ in range(c.integer(1, 3)):
        before = (f.config, f.weights, len(f.labels))
        try:
            _mutate_once(f, c)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError):
            # a mutation that does not apply to what earlier ones left (the harness's own
            # limitation, not a finding): undo it
            f.config, f.weights = before[0], before[1]
            del f.labels[before[2] :]
    return f


def _mutate_once(f: Files, c: Chooser) -> None:
    """One mutation of ``f`` in place (may raise when it does not apply)."""
    op = c.integer(0, 11)
    if op == 0:
        (n,) = struct.unpack("<Q", f.weights[:8]) if len(f.weights) >= 8 else (0,)
        f.weights = _flip(f.weights, c, 0, 8 + n + 32)
        f.labels.append("weights: bytes flipped near the header")
    elif op == 1:
        f.weights = _flip(f.weights, c)
        f.labels.append("weights: bytes flipped")
    elif op == 2:
        f.weights = _resize(f.weights, c)
        f.labels.append(f"weights: resized to {len(f.weights)}")
    elif op == 3 and len(f.weights) >= 8:
        (n,) = struct.unpack("<Q", f.weights[:8])
        new = choice(c, [0, 1, 2, n - 1, n + 1, n + 8, len(f.weights), 2**63, 2**64 - 1])
        f.weights = struct.pack("<Q", new % 2**64) + f.weights[8:]
        f.labels.append(f"weights: header length {n} -> {new}")
    elif op in (4, 5, 6):
        parsed = split_weights(f.weights)
        if parsed is None:
            return
        head, data = parsed
        names = [k for k in head if k != "__metadata__"]
        sub = c.integer(0, 5)
        if sub <= 2 and names and isinstance(head[choice(c, names)], dict):
            name = choice(c, names)
            if isinstance(head[name], dict):
                f.labels.append(f"weights: {name}: " + _mutate_entry(head[name], c))
        elif sub == 3 and names:
            name = choice(c, names)
            head[choice(c, [name + "x", "stray", "modules_to_save.", name.upper()])] = head.pop(
                name
            )
            f.labels.append(f"weights: {name} renamed")
        elif sub == 4 and names:
            name = choice(c, names)
            head["modules_to_save.copy"] = json.loads(json.dumps(head[name]))
            f.labels.append(f"weights: {name} duplicated")
        else:
            head, label = mutate_tree(head, c)
            f.labels.append(f"weights header: {label}")
        f.weights = join_weights(head, data) if isinstance(head, dict) else f.weights
    elif op in (7, 8, 9):
        doc = json.loads(f.config)
        doc, label = mutate_tree(doc, c)
        text = render_json(doc)
        if c.integer(0, 4) == 0:
            text = _duplicate_key(text, c)
            label += ", a key duplicated"
        f.config = text.encode("utf-8", "surrogatepass")
        f.labels.append(f"config: {label}")
    elif op == 10:
        f.config = _flip(f.config, c) if c.integer(0, 1) else _resize(f.config, c)
        f.labels.append("config: bytes flipped or resized")
    else:
        f.config = choice(c, [b"\xef\xbb\xbf", b"\xff\xfe", b" ", b"\x00"]) + f.config
        f.labels.append("config: prefixed")


# --------------------------------------------------------------------------------------
# readers and the oracle
# --------------------------------------------------------------------------------------
def _fuzz_model() -> Any:
    import torch
    from torch import nn

    class FuzzModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(16, 12)
            self.fc2 = nn.Linear(12, 10)
            self.head = nn.Linear(10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc2(self.fc1(x)))

    torch.manual_seed(0)
    return FuzzModel()


def build_adapter(directory: Path, padded: bool = True) -> Path:
    """The default seed: FuzzModel with fc1 (p=4) and fc2 (p=3, zero-padded; p=2 with
    ``padded=False``, which PEFT's C3A can hold) adapted and its head trained fully."""
    import torch

    from bca.model import BCAConfig, inject_adapters, save_adapter

    model = _fuzz_model()
    cfg = BCAConfig(
        block_size=4,
        target_modules=["fc1", "fc2"],
        block_size_pattern={"fc2": 3 if padded else 2},
        init="gaussian",
        modules_to_save=["head"],
    )
    inject_adapters(model, cfg)
    with torch.no_grad():
        model.head.weight.add_(0.5)
    return save_adapter(model, directory)


@dataclass
class Context:
    scratch: Path
    base: Files
    make_model: Callable[[], Any] | None
    peft: bool = False


@dataclass
class Outcome:
    reader: str
    status: str  # "ok", "refused" or "FAIL"
    detail: str = ""


def _reference(d: Path) -> tuple[dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """The files as the reference parsers read them (None where they refuse)."""
    try:
        doc = json.loads((d / CONFIG).read_bytes())
    except (ValueError, RecursionError):
        doc = None
    try:
        import torch
        from safetensors.torch import load_file

        tensors = {
            k: (v.to(torch.float32) if v.dtype == torch.bfloat16 else v).numpy()
            for k, v in load_file(str(d / WEIGHTS)).items()
        }
    except Exception:  # noqa: BLE001 - the reference refuses: fine for the oracle
        tensors = None
    return (doc if isinstance(doc, dict) else None), tensors


def _same(a: Any, b: np.ndarray) -> bool:
    a = np.asarray(a)
    return a.shape == b.shape and np.array_equal(a.astype(b.dtype), b, equal_nan=True)


def _names_file(d: Path, text: str) -> bool:
    return str(d / CONFIG) in text or str(d / WEIGHTS) in text


def _check_load(ctx: Context, d: Path, ref: Any) -> str | None:
    from bca.model import load_adapter

    assert ctx.make_model is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_adapter(ctx.make_model(), d)
    doc, tensors = ref
    if doc is None or tensors is None:
        return "loaded, but the reference parsers refuse the files"
    for name, info in doc["modules"].items():
        layer = model.get_submodule(name)
        kernel = layer.bca_kernels["default"].detach().numpy()
        if not _same(tensors[name + ".bca_kernel"].astype(kernel.dtype), kernel):
            return f"kernel of {name} differs from the file"
        if layer.adapter_scale("default") != float(doc.get("scale", 1.0)):
            return f"scale of {name} differs from the config"
        if layer.adapter_block_size("default") != info["block_size"]:
            return f"block size of {name} differs from the config"
    params = dict(model.named_parameters())
    for key, t in tensors.items():
        if key.startswith("modules_to_save."):
            p = params[key[len("modules_to_save.") :]].detach().numpy()
            if not _same(t.astype(p.dtype), p):
                return f"{key} differs from the file"
    return None


def _check_read(ctx: Context, d: Path, ref: Any) -> str | None:
    from bca.onnx import read_adapter

    saved = read_adapter(d)
    doc, tensors = ref
    if doc is None or tensors is None:
        return "read, but the reference parsers refuse the files"
    if sorted(s.name for s in saved.specs) != sorted(doc["modules"]):
        return "modules differ from the config"
    for s in saved.specs:
        if not _same(tensors[s.name + ".bca_kernel"], np.asarray(s.kernel)):
            return f"kernel of {s.name} differs from the file"
        if s.scale != float(doc.get("scale", 1.0)):
            return "scale differs from the config"
    for k, v in saved.modules_to_save.items():
        if not _same(tensors["modules_to_save." + k], v):
            return f"modules_to_save.{k} differs from the file"
    return None


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    from bca.cli import main

    # the encodings of a real terminal: UTF-8, strict on stdout, backslashreplace on stderr
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    out.flush()
    err.flush()
    return code, out.buffer.getvalue().decode(), err.buffer.getvalue().decode()  # type: ignore[attr-defined]


def _check_cli(d: Path, ref: Any, as_json: bool) -> Outcome:
    reader = "bca info --json" if as_json else "bca info"
    code, out, err = _run_cli(["info", str(d), *(["--json"] if as_json else [])])
    if code == 1:
        lines = err.strip().splitlines()
        if len(lines) != 1 or not lines[0].startswith("bca info: error: "):
            return Outcome(reader, "FAIL", f"status 1 with stderr {err[-300:]!r}")
        msg = lines[0][len("bca info: error: ") :]
        kind = msg.split(":", 1)[0]
        if (
            kind.isidentifier()
            and kind.endswith("Error")
            and kind not in ("ValueError", "TypeError")
        ):
            return Outcome(reader, "FAIL", msg[:300])
        if not _names_file(d, msg):
            return Outcome(reader, "FAIL", f"error names no file: {msg[:300]}")
        return Outcome(reader, "refused", msg)
    if code != 0:
        return Outcome(reader, "FAIL", f"status {code}: {err[-300:]!r}")
    doc, tensors = ref
    if doc is None or tensors is None:
        # info reads the header only: the data may still be refused by the reference
        # parser (it is not read), but the header must parse the same way
        if doc is None:
            return Outcome(reader, "FAIL", "succeeded on a config the json module refuses")
    if as_json:
        info = json.loads(out)
        got = {m["module"]: m["kernel_shape"] for m in info["modules"]}
        if sorted(got) != sorted(doc["modules"]):
            return Outcome(reader, "FAIL", "modules differ from the config")
        if tensors is not None:
            for name, shape in got.items():
                if list(tensors[name + ".bca_kernel"].shape) != shape:
                    return Outcome(reader, "FAIL", f"kernel shape of {name} differs from the file")
    return Outcome(reader, "ok")


def _guard(reader: str, d: Path, fn: Callable[[], str | None]) -> Outcome:
    try:
        problem = fn()
    except (ValueError, TypeError) as e:
        if _names_file(d, str(e)):
            return Outcome(reader, "refused", f"{type(e).__name__}: {e}")
        return Outcome(reader, "FAIL", f"{type(e).__name__} names no file: {e!s:.300}")
    except Exception as e:  # noqa: BLE001 - what the harness is looking for
        tb = traceback.format_exc(limit=-4)
        return Outcome(reader, "FAIL", f"{type(e).__name__}: {e!s:.300}\n{tb}")
    return Outcome(reader, "FAIL", problem) if problem else Outcome(reader, "ok")


def run_case(ctx: Context, files: Files) -> list[Outcome]:
    """Write ``files`` into the scratch folder and run every reader on it."""
    d = ctx.scratch / "adapter"
    d.mkdir(parents=True, exist_ok=True)
    (d / CONFIG).write_bytes(files.config)
    (d / WEIGHTS).write_bytes(files.weights)
    ref = _reference(d)
    outcomes = []
    if ctx.make_model is not None:
        outcomes.append(_guard("load_adapter", d, lambda: _check_load(ctx, d, ref)))
    outcomes.append(_guard("read_adapter", d, lambda: _check_read(ctx, d, ref)))
    for as_json in (False, True):
        try:
            outcomes.append(_check_cli(d, ref, as_json))
        except Exception as e:  # noqa: BLE001
            outcomes.append(Outcome("bca info", "FAIL", f"{type(e).__name__}: {e!s:.300}"))
    if ctx.peft:
        from bca.peft_interop import bca_adapter_dir_to_c3a

        out = ctx.scratch / "peft"
        outcomes.append(
            _guard(
                "bca_adapter_dir_to_c3a",
                d,
                lambda: bca_adapter_dir_to_c3a(d, out, overwrite=True) and None,
            )
        )
    return outcomes


def make_context(
    scratch: Path, adapter: Path | None = None, model: str | None = None, peft: bool = False
) -> Context:
    if adapter is None:
        adapter = build_adapter(scratch / "seed", padded=not peft)
        make_model: Callable[[], Any] | None = _fuzz_model
    elif model is not None:
        mod, _, fn = model.partition(":")
        make_model = getattr(importlib.import_module(mod), fn)
    else:
        make_model = None
    base = Files((adapter / CONFIG).read_bytes(), (adapter / WEIGHTS).read_bytes())
    ctx = Context(scratch, base, make_model, peft)
    bad = [o for o in run_case(ctx, base) if o.status != "ok"]
    if bad:
        raise SystemExit(f"the unmutated adapter does not read cleanly: {bad}")
    return ctx


def failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status == "FAIL"]


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def _main_random(args: argparse.Namespace, ctx: Context) -> int:
    from tqdm import tqdm

    rng = random.Random(args.seed)
    counts: Counter[str] = Counter()
    found: list[tuple[int, list[str], Outcome]] = []
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else math.inf
    t0 = time.monotonic()
    bar = tqdm(total=args.iterations, unit="case", dynamic_ncols=True, mininterval=0.5)
    i = 0
    with bar:
        while i < args.iterations and time.monotonic() < deadline:
            case_seed = rng.getrandbits(64)
            files = mutate(ctx.base, RandomChooser(random.Random(case_seed)))
            outcomes = run_case(ctx, files)
            for o in outcomes:
                counts[o.status] += 1
            for o in failures(outcomes):
                found.append((case_seed, files.labels, o))
                if args.keep_failures:
                    dest = Path(args.keep_failures) / f"case-{case_seed:016x}"
                    shutil.copytree(ctx.scratch / "adapter", dest, dirs_exist_ok=True)
            i += 1
            bar.update(1)
            if i % 50 == 0:
                bar.set_postfix(ok=counts["ok"], refused=counts["refused"], FAIL=counts["FAIL"])
    elapsed = time.monotonic() - t0
    print(
        f"{i} mutated adapters, {sum(counts.values())} reader runs in {elapsed:.0f} s: "
        f"{counts['ok']} succeeded (checked), {counts['refused']} refused with a "
        f"ValueError/TypeError naming the file, {counts['FAIL']} failures"
    )
    for seed, labels, o in found[:20]:
        print(f"\nFAIL case seed {seed:#x} ({'; '.join(labels)})\n  {o.reader}: {o.detail}")
    if len(found) > 20:
        print(f"... and {len(found) - 20} more")
    return 1 if found else 0


def _main_atheris(args: argparse.Namespace, ctx: Context, rest: list[str]) -> int:
    import atheris

    def one_input(data: bytes) -> None:
        files = mutate(ctx.base, AtherisChooser(atheris.FuzzedDataProvider(data)))
        bad = failures(run_case(ctx, files))
        if bad:
            raise AssertionError(f"{files.labels}: {bad[0].reader}: {bad[0].detail}")

    atheris.Setup([sys.argv[0], *rest], one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=1000, help="mutated adapters to try")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapter", type=Path, default=None, help="a saved adapter folder")
    parser.add_argument(
        "--model",
        default=None,
        help="module:function returning a fresh base model for --adapter (load_adapter is "
        "skipped without it)",
    )
    parser.add_argument("--peft", action="store_true", help="also run bca_adapter_dir_to_c3a")
    parser.add_argument("--keep-failures", default=None, help="copy failing folders here")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided (atheris)")
    args, rest = parser.parse_known_args(argv)
    if rest and not args.atheris:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.atheris:  # coverage of bca's modules (imported here first, instrumented)
        import atheris

        with atheris.instrument_imports(include=["bca"]):
            for name in ("bca._adapter_format", "bca.model", "bca.onnx", "bca.cli"):
                importlib.import_module(name)
    import bca.cli

    # argparse builds bca's parser in ~13 ms, most of a case's time: build it once (a
    # parser is not changed by parsing)
    bca.cli.build_parser = functools.lru_cache(maxsize=1)(bca.cli.build_parser)  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="bca-fuzz-") as tmp:
        ctx = make_context(Path(tmp), args.adapter, args.model, args.peft)
        if args.atheris:
            return _main_atheris(args, ctx, [r for r in rest if r != "--"])
        return _main_random(args, ctx)


if __name__ == "__main__":
    sys.exit(main())
