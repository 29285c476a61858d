"""ONNX Runtime adapter files (``.onnx_adapter``) for a servable graph and
:class:`AdapterSession`, one session serving them chosen per run."""

from __future__ import annotations

import os
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._adapter_format import new_file_mode

if TYPE_CHECKING:  # pragma: no cover
    pass
from ._feeds import (
    AdapterInput,
    adapter_feeds,
)
from ._layout import (
    ServableLayout,
    ServableSource,
    servable_layout,
)

ADAPTER_FILE_SUFFIX = ".onnx_adapter"


def _ort_adapter_api() -> Any:
    try:
        import onnxruntime as ort  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover - onnxruntime is in bca[onnx]
        raise ImportError("serving needs onnxruntime: pip install 'bca[onnx]'") from e
    if not all(hasattr(ort, n) for n in ("AdapterFormat", "LoraAdapter")) or not hasattr(
        ort.RunOptions, "add_active_adapter"
    ):
        raise RuntimeError(
            "ONNX Runtime adapter files need onnxruntime >= 1.20 (AdapterFormat, LoraAdapter, "
            f"RunOptions.add_active_adapter); this is onnxruntime {ort.__version__}: upgrade "
            "it (pip install 'onnxruntime>=1.20'), or feed the spectra as inputs instead "
            "(bca.onnx.adapter_feeds, which runs on onnxruntime >= 1.17)"
        )
    return ort


def write_ort_adapter(
    adapter: AdapterInput,
    servable: ServableSource,
    out_path: str | os.PathLike[str],
    *,
    adapter_version: int = 1,
) -> Path:
    """Write ``adapter``'s spectra for a servable graph as an ONNX Runtime adapter file.

    The file (``onnxruntime.AdapterFormat``, conventionally ``*.onnx_adapter``) holds one
    tensor per layer of the graph and one per fully trained parameter of the graph (the
    adapter's, else the base model's; see :func:`adapter_feeds`, which validates the adapter),
    ``adapter_version`` and, as model version, the graph layout's ``model_version``: load
    it with ``onnxruntime.LoraAdapter`` (or :class:`AdapterSession`, which checks it) and
    activate it per run with ``RunOptions.add_active_adapter``. Returns the path.
    """
    ort = _ort_adapter_api()
    if isinstance(adapter_version, bool) or not isinstance(adapter_version, int):
        raise TypeError(f"adapter_version must be an int, got {type(adapter_version).__name__}")
    if not 0 <= adapter_version < 2**31:
        raise ValueError(f"adapter_version must be in [0, 2**31), got {adapter_version}")
    layout = servable_layout(servable)
    feeds = adapter_feeds(adapter, layout)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # OrtValue.ortvalue_from_numpy does not copy on CPU: keep the arrays alive until written
    arrays = {k: np.ascontiguousarray(v) for k, v in feeds.items()}
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(adapter_version)
    fmt.set_model_version(layout.model_version)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in arrays.items()})
    # onnxruntime.LoraAdapter memory-maps its file: rewriting a loaded file in place would
    # change what a running session serves. Write a temporary file and rename it over
    # ``out`` (atomic), so sessions that loaded the old file keep the old contents.
    fd, tmp_name = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fmt.export_adapter(str(tmp))
        read_ort_adapter(tmp, layout)  # what was written reads back and fits
        os.chmod(tmp, _new_file_mode())  # mkstemp creates 0600; a plain open() would not
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


_new_file_mode = new_file_mode  # 0o666 minus the umask, as open(path, "w") gives


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_ort_adapter(
    path: str | os.PathLike[str], servable: ServableSource | None = None
) -> dict[str, np.ndarray]:
    """The parameters of an ONNX Runtime adapter file, as numpy arrays (copies).

    With ``servable`` (a servable graph or its layout) the file is checked against the
    graph's layout: the same parameter names, shapes and dtypes, finite values, and the
    layout's model version (an adapter written for a graph with equal shapes but another
    lowering or layer set is refused). Raises ``ValueError`` naming the file, the module
    and both shapes on a mismatch; ``FileNotFoundError`` for a missing file.
    """
    ort = _ort_adapter_api()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"adapter file {str(p)!r} does not exist")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(p))
    except Exception as e:  # noqa: BLE001 - ORT raises RuntimeError with a C++ trace
        raise ValueError(
            f"{str(p)!r} is not a readable ONNX Runtime adapter file ({_first_line(e)[:200]})"
        ) from None
    # copy while the AdapterFormat (which owns the buffers) is alive
    arrays = {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
    model_version = int(fmt.get_model_version())
    del fmt
    if servable is not None:
        _check_adapter_file(arrays, model_version, servable_layout(servable), str(p))
    return arrays


def _check_adapter_file(
    arrays: Mapping[str, np.ndarray], model_version: int, layout: ServableLayout, source: str
) -> None:
    want = {x.parameter: x for x in layout.layers}
    want_saved = {x.initializer: x for x in layout.saved}
    names = set(want) | set(want_saved)
    extra = sorted(set(arrays) - names)
    if extra:
        raise ValueError(
            f"adapter file {source!r} has parameters {extra[:8]} that the servable graph does "
            f"not have (written for another model?); the graph's: {sorted(names)[:8]}"
        )
    missing = sorted(set(want) - set(arrays))
    if missing:
        raise ValueError(
            f"adapter file {source!r} lacks the spectra of module(s) "
            f"{[want[n].module for n in missing]} of the servable graph (written for another "
            "model?)"
        )
    missing = sorted(set(want_saved) - set(arrays))
    if missing:
        raise ValueError(
            f"adapter file {source!r} lacks fully trained parameter(s) "
            f"{[want_saved[n].name for n in missing]} of the servable graph (written for "
            "another graph?)"
        )
    for name, layer in want.items():
        a = arrays[name]
        if tuple(a.shape) != layer.shape or a.dtype.name != layer.dtype:
            raise ValueError(
                f"adapter file {source!r}, module {layer.module!r}: spectra {name!r} is "
                f"{tuple(a.shape)} {a.dtype}; the servable graph expects {layer.shape} "
                f"{layer.dtype} ({layer.describe()}, lowering {layer.lowering!r})"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"adapter file {source!r}: spectra {name!r} contain NaN or Inf")
    for name, x in want_saved.items():
        a = arrays[name]
        if tuple(a.shape) != x.shape or a.dtype.name != x.dtype:
            raise ValueError(
                f"adapter file {source!r}: fully trained parameter {x.name!r} ({name!r}) is "
                f"{tuple(a.shape)} {a.dtype}; the servable graph expects {x.shape} {x.dtype}"
            )
        if not np.all(np.isfinite(a)):
            raise ValueError(f"adapter file {source!r}: {name!r} contains NaN or Inf")
    if model_version != layout.model_version:
        raise ValueError(
            f"adapter file {source!r} was written for another servable graph (model version "
            f"{model_version}, this graph's layout has {layout.model_version}): the shapes "
            "agree but the layout (lowering, block sizes, layers or fully trained parameters) "
            "differs; write it again for this graph with write_ort_adapter / `bca serve adapter`"
        )


class AdapterSession:
    """One ``onnxruntime.InferenceSession`` of a servable graph serving many adapters.

    ``load_adapter(name, path)`` checks an ``.onnx_adapter`` file against the graph's
    layout and keeps it as an ``onnxruntime.LoraAdapter`` (memory-mapped, loaded once);
    ``run(..., adapter=name)`` activates it for that call only (a fresh ``RunOptions``
    per call), so runs with different adapters may go on in several threads at once.
    ``adapter=None`` runs the base model. Combined adapters are served as one file or
    feeds made from a weighted list (:func:`write_ort_adapter`, :func:`adapter_feeds`):
    onnxruntime does not add active adapters up.
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        *,
        providers: Sequence[Any] | None = None,
        sess_options: Any = None,
    ) -> None:
        ort = _ort_adapter_api()
        self._ort = ort
        self.path = Path(onnx_path)
        self.layout = servable_layout(self.path)
        if sess_options is None:
            sess_options = ort.SessionOptions()
            # one warning per overridable initializer otherwise ("may prevent const folding")
            sess_options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(self.path),
            sess_options,
            providers=list(providers) if providers is not None else ["CPUExecutionProvider"],
        )
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        lost = [n for n in self.layout.parameter_names if n not in overridable]
        if lost:  # pragma: no cover - defensive: layout checked against the graph
            raise ValueError(f"{str(self.path)!r}: spectra {lost} are not overridable in ORT")
        self._params = frozenset(self.layout.parameter_names)
        self._adapters: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._used: weakref.WeakSet[Any] = weakref.WeakSet()
        # an adapter-default graph: adapter=None feeds the base model (zero spectra, base
        # values of the fully trained parameters)
        self._base = None if self.layout.default == "zeros" else self.layout.base_feeds()

    @property
    def input_names(self) -> list[str]:
        """The model's real inputs (the overridable spectra and fully trained parameters are
        not among them)."""
        return [i.name for i in self.session.get_inputs() if i.name not in self._params]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    @property
    def adapter_names(self) -> list[str]:
        with self._lock:
            return sorted(self._adapters)

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> None:
        """Check ``path`` against the graph's layout and load it as adapter ``name``
        (replacing an adapter of that name; runs already going on keep the old one)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        read_ort_adapter(path, self.layout)
        lora = self._ort.LoraAdapter()
        try:
            lora.Load(str(path))
        except Exception as e:  # noqa: BLE001 - ORT raises RuntimeError with a C++ trace
            raise ValueError(
                f"onnxruntime could not load {str(path)!r}: {_first_line(e)}"
            ) from None
        with self._lock:
            self._adapters[name] = lora

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                raise KeyError(f"no adapter named {name!r} is loaded ({sorted(self._adapters)})")
            del self._adapters[name]

    def run(
        self,
        output_names: Sequence[str] | None,
        feeds: Mapping[str, Any],
        *,
        adapter: str | None = None,
        run_options: Any = None,
    ) -> list[Any]:
        """``session.run`` with adapter ``adapter`` active (None: the base model).

        ``run_options`` (optional) receives the adapter: pass a fresh one per call;
        one that already carries an adapter is refused, because onnxruntime silently keeps
        the first active adapter of a parameter and ignores later ones. Feeds of spectra
        (:func:`adapter_feeds`) are allowed with ``adapter=None`` only: with an active
        adapter onnxruntime would silently ignore them.
        """
        names = list(output_names) if output_names is not None else None
        fed = sorted(k for k in feeds if k in self._params)
        if run_options is not None and self._carries_adapter(run_options):
            raise ValueError(
                "run_options already carries an adapter from an earlier call (onnxruntime "
                "keeps the first active adapter and ignores later ones); pass a fresh "
                "RunOptions per call"
            )
        if adapter is None:
            if self._base is not None:  # the graph's default is an adapter: override it
                feeds = {**self._base, **feeds}
            return self.session.run(names, dict(feeds), run_options)  # type: ignore[no-any-return]
        if fed:
            raise ValueError(
                f"feeds hold overridable parameters {fed[:4]} and adapter={adapter!r} is active; "
                "onnxruntime would ignore the feeds: use one or the other"
            )
        with self._lock:
            lora = self._adapters.get(adapter)
            known = sorted(self._adapters)
        if lora is None:
            raise KeyError(f"no adapter named {adapter!r} is loaded ({known})")
        ro = run_options if run_options is not None else self._ort.RunOptions()
        ro.add_active_adapter(lora)
        if run_options is not None:  # the caller's: remember it carries an adapter now
            with self._lock:
                self._used.add(ro)
        return self.session.run(names, dict(feeds), ro)  # type: ignore[no-any-return]

    def _carries_adapter(self, run_options: Any) -> bool:
        with self._lock:
            return run_options in self._used

    def __repr__(self) -> str:
        return (
            f"AdapterSession({str(self.path)!r}, layers={len(self.layout.layers)}, "
            f"adapters={self.adapter_names})"
        )
