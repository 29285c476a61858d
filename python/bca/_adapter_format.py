"""The saved-adapter format, in one place: constants, the validated config document,
safetensors reading with dtype and shape checks, and atomic writes (numpy only).

A saved bca adapter is a folder with two files:

* ``adapter_config.json``: ``{"format": "bca", "format_version": 1, "block_size", "scale",
  "target_modules", "init", "pad", "modules_to_save", "base_model": {"name_or_path",
  "class", "fingerprint", "weight_sketch"}, "modules": {name: {"in_features",
  "out_features", "block_size", "is_conv1d"}}}``;
* ``adapter_model.safetensors``: ``<module>.bca_kernel`` (float32 or float64, shape
  ``(ceil(out/p), ceil(in/p), p)``) for every module and ``modules_to_save.<parameter>``
  (float16, bfloat16, float32 or float64) for fully trained parameters.

Every reader of such a folder (:func:`bca.model.load_adapter`, :func:`bca.onnx.read_adapter`,
:mod:`bca.peft_interop`, the ``bca`` command line) goes through :func:`read_config`,
:func:`read_weights_header` and :func:`read_adapter_files` here. Anything malformed raises
:class:`BcaFormatError`, a ``ValueError`` whose message starts with the file's path and
names the field (``modules.fc.block_size``, a tensor name, ``header``); a missing folder or
file raises ``FileNotFoundError``. The safetensors parser is this module's own (JSON and
``numpy.frombuffer``): nothing is unpickled or executed, and it checks what the format
promises (header size, no duplicate keys, contiguous data offsets that cover the file,
each tensor's byte span equal to its shape times its dtype's size).

Writers stage their files in a hidden folder and move them into place only when
everything is written (:func:`atomic_directory`): a failure leaves any previous adapter
untouched and no half-written folder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import _sketch
from ._errors import BcaError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KERNEL_SUFFIX",
    "MODULES_TO_SAVE_PREFIX",
    "KERNEL_DTYPES",
    "PARAMETER_DTYPES",
    "BcaFormatError",
    "AdapterDocument",
    "AdapterFiles",
    "FieldChecker",
    "ModuleInfo",
    "SafetensorsHeader",
    "TensorEntry",
    "atomic_directory",
    "check_config",
    "finish_modes",
    "kind_of",
    "new_file_mode",
    "read_adapter_files",
    "read_config",
    "read_json_object",
    "read_safetensors",
    "read_safetensors_header",
    "read_tensors",
    "read_weights_header",
    "replace_file",
    "staging_directory",
    "write_adapter",
    "write_json",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_NAME = "bca"
FORMAT_VERSION = 1
KERNEL_SUFFIX = ".bca_kernel"
MODULES_TO_SAVE_PREFIX = "modules_to_save."
INITS: tuple[str, ...] = ("zeros", "xavier_uniform", "gaussian", "kaiming")  # = bca.nn.INITS

MAX_FEATURES = 2**31 - 1  # widths and block sizes; far beyond any layer, far below int64
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_JSON_DEPTH = 100  # levels of nesting (the safetensors library refuses more than 127)
KERNEL_DTYPES = ("F32", "F64")
PARAMETER_DTYPES = ("F16", "BF16", "F32", "F64")

# safetensors dtype code -> (bytes per element, name as numpy/torch spell it)
_ST_DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "C64": (8, "complex64"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
}
_NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
}


class BcaFormatError(BcaError):
    """A saved adapter file that does not follow the format.

    ``path`` is the file, ``field`` what in it is wrong (a dotted config key such as
    ``modules.fc.block_size``, a tensor name, or ``""`` for the file as a whole); the
    message starts with both.
    """

    def __init__(self, path: str | os.PathLike[str], field: str, problem: str) -> None:
        self.path = Path(path)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path}: {field}: {problem}" if field else f"{self.path}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.field, self.problem))


def dtype_name(code: str) -> str:
    """A safetensors dtype code as numpy/torch name it (``"F32"`` -> ``"float32"``)."""
    return _ST_DTYPES[code][1] if code in _ST_DTYPES else repr(code)


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------
class _JSONProblem(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _JSONProblem(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise _JSONProblem(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise _JSONProblem(f"number {text[:40]} is out of range")
    return x


def _too_deep(doc: Any, limit: int) -> bool:
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limit:
                return True
            children = value.values() if isinstance(value, dict) else value
            stack.extend((c, depth + 1) for c in children)
    return False


def _loads(
    data: bytes | str, path: Path, what: str, field: str = "", *, finite: bool = False
) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, at most
    :data:`MAX_JSON_DEPTH` levels of nesting, bounded digits; with ``finite`` no number
    that overflows a float either (as the safetensors library's own parser). Every
    failure a :class:`BcaFormatError` naming ``path``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        doc = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_finite_float if finite else float,
        )
        if _too_deep(doc, MAX_JSON_DEPTH):
            raise RecursionError
        # a "\udXXX" escape without its pair decodes to a lone surrogate, which no UTF-8
        # output (a file name, a printed module name) can hold
        json.dumps(doc, ensure_ascii=False, check_circular=False).encode("utf-8")
        return doc
    except UnicodeEncodeError:
        raise BcaFormatError(
            path, field, f"{what} holds an unpaired surrogate escape (not valid Unicode)"
        ) from None
    except UnicodeDecodeError as e:
        raise BcaFormatError(path, field, f"{what} is not UTF-8 text ({e.reason})") from None
    except RecursionError:
        raise BcaFormatError(
            path, field, f"{what} is nested too deeply (more than {MAX_JSON_DEPTH} levels)"
        ) from None
    except json.JSONDecodeError as e:
        raise BcaFormatError(
            path, field, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except ValueError as e:  # _JSONProblem, or an integer of more than 4300 digits
        raise BcaFormatError(path, field, f"{what} is not valid JSON ({e})") from None


def read_json_object(path: str | os.PathLike[str], what: str = "file") -> dict[str, Any]:
    """A JSON file that must hold an object (strict, see :func:`_loads`)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(p)!r} not found")
    doc = _loads(p.read_bytes(), p, what)
    if not isinstance(doc, dict):
        raise BcaFormatError(p, "", f"{what} must hold a JSON object, got {kind_of(doc)}")
    return doc


def kind_of(value: object) -> str:
    """A short description of a JSON value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int) and value.bit_length() > 128:
        return f"a {value.bit_length()}-bit number"
    if isinstance(value, (int, float)):
        text = repr(value)
        return f"number {text if len(text) <= 40 else text[:20] + '...'}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    return {"list": "an array", "dict": "an object"}.get(type(value).__name__, type(value).__name__)


# --------------------------------------------------------------------------------------
# the config document
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module of a saved adapter."""

    name: str
    in_features: int
    out_features: int
    block_size: int
    is_conv1d: bool = False

    @property
    def kernel_shape(self) -> tuple[int, int, int]:
        p = self.block_size
        return (-(-self.out_features // p), -(-self.in_features // p), p)

    @property
    def kernel_key(self) -> str:
        return self.name + KERNEL_SUFFIX

    def describe(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block_size={self.block_size}"
        )


@dataclass(frozen=True)
class AdapterDocument:
    """A validated ``adapter_config.json``; ``raw`` is the JSON object as read."""

    path: Path
    raw: dict[str, Any]
    modules: dict[str, ModuleInfo]
    block_size: int
    scale: float
    target_modules: list[str] | None
    init: str
    pad: bool
    modules_to_save: list[str]
    adapter_name: str | None
    base_name_or_path: str | None
    base_class: str | None
    fingerprint: dict[str, dict[str, Any]] = field(default_factory=dict)
    weight_sketch: dict[str, dict[str, Any]] = field(default_factory=dict)


class FieldChecker:
    """Type and range checks on a JSON document, errors naming ``path`` and the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> BcaFormatError:
        return BcaFormatError(self.path, where, problem)

    def obj(self, value: object, where: str, *, optional: bool = False) -> dict[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be an object, got {kind_of(value)}")
        return value

    def integer(self, value: object, where: str, lo: int = 1, hi: int = MAX_FEATURES) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(where, f"must be an integer, got {kind_of(value)}")
        if not lo <= value <= hi:
            raise self.fail(where, f"must be in [{lo}, {hi}], got {kind_of(value)}")
        return value

    def number(self, value: object, where: str, *, minimum: float | None = None) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(where, f"must be a number, got {kind_of(value)}")
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not math.isfinite(x):
            raise self.fail(where, f"must be finite, got {kind_of(value)}")
        if minimum is not None and x < minimum:
            raise self.fail(where, f"must be at least {minimum}, got {x}")
        return x

    def boolean(self, value: object, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, got {kind_of(value)}")
        return value

    def text(self, value: object, where: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(where, f"must be a string, got {kind_of(value)}")
        return value

    def names(self, value: object, where: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(where, f"must be an array of names, got {kind_of(value)}")
        for i, v in enumerate(value):
            if not isinstance(v, str) or not v:
                raise self.fail(f"{where}[{i}]", f"must be a non-empty string, got {kind_of(v)}")
        return list(value)


def _module_name_problem(name: str) -> str | None:
    if not name:
        return "a module name must not be empty"
    if any(not part for part in name.split(".")):
        return f"module name {name!r} has an empty dotted segment"
    return None


def check_config(doc: object, path: str | os.PathLike[str]) -> AdapterDocument:
    """Validate a parsed ``adapter_config.json`` (``path`` names it in errors)."""
    p = Path(path)
    c = FieldChecker(p)
    if not isinstance(doc, dict):
        raise c.fail("", f"not a bca adapter config (a JSON object), got {kind_of(doc)}")
    fmt = doc.get("format")
    if fmt != FORMAT_NAME:
        raise c.fail(
            "format", f'not a bca adapter config ("format" must be "bca", got {kind_of(fmt)})'
        )
    version = doc.get("format_version")
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise c.fail(
            "format_version",
            f"unsupported format_version {kind_of(version)} (this bca reads {FORMAT_VERSION})",
        )
    raw_modules = doc.get("modules")
    if not isinstance(raw_modules, dict) or not raw_modules:
        raise c.fail("modules", f"must be a non-empty object, got {kind_of(raw_modules)}")
    modules: dict[str, ModuleInfo] = {}
    for name, info in raw_modules.items():
        where = f"modules.{name}"
        problem = _module_name_problem(name)
        if problem is not None:
            raise c.fail(where, problem)
        info = c.obj(info, where)
        for key in ("in_features", "out_features", "block_size"):
            if key not in info:
                raise c.fail(f"{where}.{key}", "missing")
        conv = info.get("is_conv1d", False)
        modules[name] = ModuleInfo(
            name,
            c.integer(info["in_features"], f"{where}.in_features"),
            c.integer(info["out_features"], f"{where}.out_features"),
            c.integer(info["block_size"], f"{where}.block_size"),
            c.boolean(conv, f"{where}.is_conv1d"),
        )
    if "block_size" in doc:
        block_size = c.integer(doc["block_size"], "block_size")
    else:
        block_size = Counter(m.block_size for m in modules.values()).most_common(1)[0][0]
    scale = c.number(doc.get("scale", 1.0), "scale")
    targets = doc.get("target_modules")
    target_modules = None if targets is None else c.names(targets, "target_modules")
    if target_modules == []:
        target_modules = None
    init = doc.get("init", "zeros")
    if init not in INITS:
        raise c.fail("init", f"must be one of {list(INITS)}, got {kind_of(init)}")
    pad = c.boolean(doc.get("pad", True), "pad")
    mts = doc.get("modules_to_save")
    modules_to_save = [] if mts is None else c.names(mts, "modules_to_save")
    adapter_name = c.text(doc.get("adapter_name"), "adapter_name", optional=True)
    base = c.obj(doc.get("base_model"), "base_model", optional=True)
    name_or_path = c.text(base.get("name_or_path"), "base_model.name_or_path", optional=True)
    base_class = c.text(base.get("class"), "base_model.class", optional=True)
    fingerprint: dict[str, dict[str, Any]] = {}
    for name, fp in c.obj(base.get("fingerprint"), "base_model.fingerprint", optional=True).items():
        where = f"base_model.fingerprint.{name}"
        fp = c.obj(fp, where)
        entry: dict[str, Any] = {}
        for key in ("in_features", "out_features"):
            if key in fp:
                entry[key] = c.integer(fp[key], f"{where}.{key}")
        if "is_conv1d" in fp:
            entry["is_conv1d"] = c.boolean(fp["is_conv1d"], f"{where}.is_conv1d")
        fingerprint[name] = entry
    sketches: dict[str, dict[str, Any]] = {}
    for name, sk in c.obj(
        base.get("weight_sketch"), "base_model.weight_sketch", optional=True
    ).items():
        where = f"base_model.weight_sketch.{name}"
        sk = c.obj(sk, where)
        proj = sk.get("projections")
        if not isinstance(proj, list) or len(proj) != _sketch.PROJECTIONS:
            raise c.fail(
                f"{where}.projections",
                f"must be an array of {_sketch.PROJECTIONS} numbers, got {kind_of(proj)}"
                + (f" of length {len(proj)}" if isinstance(proj, list) else ""),
            )
        sketches[name] = {
            "rms": c.number(sk.get("rms"), f"{where}.rms", minimum=0.0),
            "projections": [c.number(v, f"{where}.projections[{i}]") for i, v in enumerate(proj)],
        }
    return AdapterDocument(
        path=p,
        raw=doc,
        modules=modules,
        block_size=block_size,
        scale=scale,
        target_modules=target_modules,
        init=init,
        pad=pad,
        modules_to_save=modules_to_save,
        adapter_name=adapter_name,
        base_name_or_path=name_or_path,
        base_class=base_class,
        fingerprint=fingerprint,
        weight_sketch=sketches,
    )


def _folder(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if not path.is_dir():
        if path.exists():
            raise NotADirectoryError(f"adapter directory {str(path)!r} is not a directory")
        raise FileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    return path


def read_config(directory: str | os.PathLike[str]) -> AdapterDocument:
    """Read and validate ``directory/adapter_config.json`` (JSON only, nothing executed)."""
    path = _folder(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}")
    return check_config(_loads(path.read_bytes(), path, CONFIG_NAME), path)


# --------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header; ``begin``/``end`` count from the data start."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def _unreadable(path: Path, why: str, where: str = "") -> BcaFormatError:
    return BcaFormatError(path, where, f"not a readable safetensors file ({why})")


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Parse and check a safetensors header (reads the header only, never the data)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _unreadable(p, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _unreadable(
                    p, f"header length {n} does not fit a file of {size} bytes", "header"
                )
            text = f.read(n)
    except OSError as e:
        raise _unreadable(p, f"{type(e).__name__}: {e.strerror or e}") from None
    if len(text) != n:
        raise _unreadable(p, "the file changed while it was read")
    if not text.startswith(b"{"):
        raise _unreadable(p, "the header is not a JSON object", "header")
    doc = _loads(text, p, "the safetensors header", "header", finite=True)
    if not isinstance(doc, dict):
        raise _unreadable(p, "the header is not a JSON object", "header")
    meta = doc.pop("__metadata__", None)
    metadata: dict[str, str] = {}
    if meta is not None:
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise _unreadable(p, "__metadata__ must map names to strings", "__metadata__")
        metadata = dict(meta)
    data_len = size - 8 - n
    entries: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise _unreadable(p, f"entry is {kind_of(info)}, not an object", name)
        code = info.get("dtype")
        if not isinstance(code, str) or code not in _ST_DTYPES:
            raise _unreadable(p, f"unknown dtype {kind_of(code)}", name)
        shape = info.get("shape")
        if not isinstance(shape, list) or any(
            isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape
        ):
            raise _unreadable(p, f"shape must be an array of sizes, got {kind_of(shape)}", name)
        offsets = info.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) or o < 0 for o in offsets)
            or offsets[0] > offsets[1]
        ):
            raise _unreadable(p, f"data_offsets must be [begin, end], got {offsets!r:.60}", name)
        nbytes = math.prod(shape) * _ST_DTYPES[code][0]
        if offsets[1] - offsets[0] != nbytes:
            raise _unreadable(
                p,
                f"dtype {code} and shape {shape} need {nbytes} bytes, data_offsets "
                f"{offsets} span {offsets[1] - offsets[0]}",
                name,
            )
        entries[name] = TensorEntry(name, code, tuple(shape), offsets[0], offsets[1])
    pos = 0
    for t in sorted(entries.values(), key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            raise _unreadable(
                p,
                f"data_offsets {[t.begin, t.end]} "
                + ("overlap the previous tensor" if t.begin < pos else "leave a gap"),
                t.name,
            )
        pos = t.end
    if pos != data_len:
        raise _unreadable(p, f"tensors span {pos} bytes of data, the file holds {data_len}")
    return SafetensorsHeader(p, entries, metadata, 8 + n)


def read_tensors(header: SafetensorsHeader, names: list[str]) -> dict[str, np.ndarray]:
    """The data of ``names`` (float dtypes; BF16 comes back as float32, exactly)."""
    out: dict[str, np.ndarray] = {}
    try:
        with open(header.path, "rb") as f:
            for name in names:
                e = header.tensors[name]
                buf = bytearray(e.end - e.begin)
                f.seek(header.data_start + e.begin)
                if f.readinto(buf) != len(buf):
                    raise _unreadable(header.path, "the file changed while it was read", name)
                if e.dtype == "BF16":
                    bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
                    arr = bits.view(np.float32)
                else:
                    arr = np.frombuffer(buf, dtype=_NUMPY_DTYPES[e.dtype])
                    arr = arr.astype(arr.dtype.newbyteorder("="), copy=False)
                out[name] = arr.reshape(e.shape)
    except OSError as e:
        raise _unreadable(header.path, f"{type(e).__name__}: {e.strerror or e}") from None
    return out


def _check_dtype(header: SafetensorsHeader, name: str, allowed: tuple[str, ...], why: str) -> None:
    code = header.tensors[name].dtype
    if code not in allowed:
        names = [dtype_name(a) for a in allowed]
        expected = " or ".join(names) if len(names) <= 2 else ", ".join(names)
        raise BcaFormatError(
            header.path, name, f"dtype {dtype_name(code)}, expected {expected}{why}"
        )


def read_safetensors(
    path: str | os.PathLike[str], dtypes: tuple[str, ...] = PARAMETER_DTYPES
) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy arrays; each must have one of
    ``dtypes`` (safetensors codes; BF16 is returned as float32, exactly)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"{p} not found (only safetensors files are read; pickled .bin files are never loaded)"
        )
    header = read_safetensors_header(p)
    for name in header.tensors:
        _check_dtype(header, name, dtypes, "")
    return read_tensors(header, list(header.tensors))


# --------------------------------------------------------------------------------------
# a saved adapter: config and weights together
# --------------------------------------------------------------------------------------
_KERNEL_DTYPE_WHY = (
    " (kernels are kept in float32 even for half-precision models; one cast to half after "
    "inject_adapters should be cast back before save_adapter)"
)


def read_weights_header(
    directory: str | os.PathLike[str], doc: AdapterDocument | None = None
) -> tuple[AdapterDocument, SafetensorsHeader]:
    """The config and the weights' header of a saved adapter, checked against each other:
    every module's kernel is present with dtype float32/float64 and the shape its config
    entry gives, every other tensor is a ``modules_to_save.`` parameter of a float dtype.
    Reads no tensor data."""
    if doc is None:
        doc = read_config(directory)
    path = _folder(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(directory)!r}")
    header = read_safetensors_header(path)
    kernels = {m.kernel_key: m for m in doc.modules.values()}
    missing = [k for k in kernels if k not in header.tensors]
    if missing:
        raise BcaFormatError(
            path,
            missing[0],
            f"lacks tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more kernels)" if len(missing) > 1 else "")
            + f" for the module the config's modules.{kernels[missing[0]].name} describes",
        )
    for key, m in kernels.items():
        _check_dtype(header, key, KERNEL_DTYPES, _KERNEL_DTYPE_WHY)
        shape = header.tensors[key].shape
        if shape != m.kernel_shape:
            raise BcaFormatError(
                path,
                key,
                f"has shape {shape}, expected {m.kernel_shape} for {m.describe()} "
                f"(config modules.{m.name})",
            )
    unexpected = [
        k
        for k in header.tensors
        if k not in kernels
        and not (k.startswith(MODULES_TO_SAVE_PREFIX) and len(k) > len(MODULES_TO_SAVE_PREFIX))
    ]
    if unexpected:
        raise BcaFormatError(
            path,
            unexpected[0],
            f"unexpected tensors {sorted(unexpected)[:8]} (an adapter holds "
            f"'<module>{KERNEL_SUFFIX}' and '{MODULES_TO_SAVE_PREFIX}<parameter>' tensors)",
        )
    for key in header.tensors:
        if key not in kernels:
            _check_dtype(header, key, PARAMETER_DTYPES, "")
    return doc, header


@dataclass(frozen=True)
class AdapterFiles:
    """A saved adapter read and checked: its config, kernels by module name (numpy,
    float32/float64, finite) and fully trained parameters by parameter name."""

    doc: AdapterDocument
    kernels: dict[str, np.ndarray]
    modules_to_save: dict[str, np.ndarray]
    header: SafetensorsHeader

    @property
    def weights_path(self) -> Path:
        return self.header.path


def read_adapter_files(directory: str | os.PathLike[str]) -> AdapterFiles:
    """Read a saved adapter folder completely, every check of :func:`read_config` and
    :func:`read_weights_header` applied, and the kernels checked finite."""
    doc, header = read_weights_header(directory)
    arrays = read_tensors(header, list(header.tensors))
    kernels: dict[str, np.ndarray] = {}
    for name, m in doc.modules.items():
        k = arrays.pop(m.kernel_key)
        if not np.all(np.isfinite(k)):
            raise BcaFormatError(header.path, m.kernel_key, "contains NaN or Inf")
        kernels[name] = k
    mts = {k[len(MODULES_TO_SAVE_PREFIX) :]: v for k, v in arrays.items()}
    return AdapterFiles(doc, kernels, mts, header)


# --------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------
def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # not thread-safe, hence only without /proc
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    return 0o666 & ~_umask()


def new_directory_mode() -> int:
    """The mode ``os.mkdir`` gives a new directory: ``0o777`` minus the umask."""
    return 0o777 & ~_umask()


def staging_directory(parent: Path, name: str) -> Path:
    """A new empty hidden directory in ``parent`` (same file system as its siblings)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))


def finish_modes(stage: Path) -> None:
    """Give the staged files the modes plain ``open``/``mkdir`` would have given them
    (``mkdtemp`` makes 0700 and some writers 0600 files)."""
    fmode, dmode = new_file_mode(), new_directory_mode()
    os.chmod(stage, dmode)
    for root, dirs, files in os.walk(stage):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            os.chmod(os.path.join(root, f), fmode)


def replace_file(src: Path, dst: Path) -> None:
    """``os.replace(src, dst)`` (atomic); when ``dst`` is a file, ``src`` takes its mode
    first, so a file made private stays private."""
    with contextlib.suppress(OSError):
        if dst.is_file() and src.is_file():
            os.chmod(src, stat.S_IMODE(dst.stat().st_mode))
    os.replace(src, dst)


def _move_into(src: Path, dst: Path) -> None:
    """Move the contents of ``src`` into the existing directory ``dst``, each file with
    ``os.replace`` (atomic per file, keeping the mode of the file it replaces);
    ``adapter_config.json`` last, so that a reader sees the new config only once the new
    weights are in place."""
    for entry in sorted(src.iterdir(), key=lambda e: (e.name == CONFIG_NAME, e.name)):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir():
            _move_into(entry, target)
            continue
        replace_file(entry, target)


@contextmanager
def atomic_directory(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a folder's files atomically: yields an empty staging folder; when the block
    ends without an exception the staged files move into ``directory``, and when it
    raises the staging folder is removed and ``directory`` is left as it was.

    A new ``directory`` is staged as a hidden sibling and renamed into place whole. An
    existing one is staged in a hidden folder inside it (the same file system) and each
    staged file replaces its namesake with ``os.replace``; files the save does not write
    are kept.
    """
    final = Path(directory)
    merge = final.is_dir()
    if not merge and final.exists():
        raise NotADirectoryError(f"{str(final)!r} exists and is not a directory")
    stage = staging_directory(final if merge else final.parent, final.name)
    try:
        yield stage
        finish_modes(stage)
        if not merge:
            try:
                os.rename(stage, final)
            except OSError:
                if not final.is_dir():  # else created meanwhile: move the files into it
                    raise
                merge = True
        if merge:
            _move_into(stage, final)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def write_json(path: Path, doc: Mapping[str, Any], *, sort_keys: bool = False) -> None:
    """``doc`` as indented JSON text (no NaN or Infinity), ending with a newline."""
    text = json.dumps(doc, indent=2, sort_keys=sort_keys, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def write_adapter(
    directory: str | os.PathLike[str],
    doc: dict[str, Any],
    write_weights: Callable[[Path], None],
) -> Path:
    """Write a saved adapter atomically: ``doc`` is checked with :func:`check_config`,
    ``write_weights(path)`` writes the safetensors file, which is checked against ``doc``
    before anything moves into ``directory``."""
    final = Path(directory)
    check_config(doc, final / CONFIG_NAME)
    with atomic_directory(final) as stage:
        write_weights(stage / WEIGHTS_NAME)
        write_json(stage / CONFIG_NAME, doc)
        read_weights_header(stage)
    return final
