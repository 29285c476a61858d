"""Check a built wheel or sdist of bca: tags, contents, and what the extension links.

    python .ci/check_dist.py wheel dist/bca-*.whl
    python .ci/check_dist.py sdist dist/bca-*.tar.gz

Wheel: one file named ``bca-<version>-cp310-abi3-<platform>.whl`` whose platform tags
include manylinux2014_x86_64 (= manylinux_2_17_x86_64), the same tags in its WHEEL file,
the abi3 extension ``bca/_bca.abi3.so`` (an x86-64 ELF, not a debug build: no
.debug_info), every package module of the checkout (``python/bca/**/*.py`` as git lists
them), the stub and ``py.typed``, and the ``bca`` console script. auditwheel (run by
``make wheel`` before this) checks the glibc symbol versions against manylinux2014.

sdist: the Rust sources, Cargo.toml/Cargo.lock, pyproject.toml, README.md and the
package, so ``pip install bca-<version>.tar.gz`` can build it with Rust installed.
Exits non-zero with a message naming what is wrong.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from elftools.elf.elffile import ELFFile  # pyelftools, installed with auditwheel

REPO = Path(__file__).resolve().parents[1]
WHEEL_NAME = re.compile(
    r"^bca-(?P<version>[^-]+)-(?P<python>[^-]+)-(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl$"
)


def _fail(msg: str) -> None:
    sys.exit(f"check_dist: {msg}")


def _tracked_modules() -> set[str]:
    """``bca/...py`` for every package module git tracks (the checkout's source of truth)."""
    out = subprocess.run(
        ["git", "ls-files", "python/bca"],  # noqa: S607 - git from PATH, fixed arguments
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:  # not a git checkout: check against the files on disk
        files = [str(p.relative_to(REPO)) for p in (REPO / "python" / "bca").rglob("*.py")]
    else:
        files = out.stdout.split()
    return {f.removeprefix("python/") for f in files if f.endswith(".py")}


def check_wheel(path: Path) -> None:
    m = WHEEL_NAME.match(path.name)
    if m is None:
        _fail(f"{path.name}: not a wheel file name of bca")
    if m["python"] != "cp310" or m["abi"] != "abi3":
        _fail(f"{path.name}: tags {m['python']}-{m['abi']}, want cp310-abi3 (stable ABI, 3.10+)")
    platforms = set(m["platform"].split("."))
    if "manylinux2014_x86_64" not in platforms:
        _fail(f"{path.name}: platform tags {sorted(platforms)} lack manylinux2014_x86_64")
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        wheel_meta = zf.read(f"bca-{m['version']}.dist-info/WHEEL").decode()
        entry_points = zf.read(f"bca-{m['version']}.dist-info/entry_points.txt").decode()
        so = zf.read("bca/_bca.abi3.so") if "bca/_bca.abi3.so" in names else None
    tags = {ln.split(":", 1)[1].strip() for ln in wheel_meta.splitlines() if ln.startswith("Tag:")}
    want_tags = {f"cp310-abi3-{p}" for p in platforms}
    if tags != want_tags:
        _fail(f"WHEEL lists tags {sorted(tags)}, the file name says {sorted(want_tags)}")
    if "Root-Is-Purelib: false" not in wheel_meta:
        _fail("WHEEL must say Root-Is-Purelib: false (it holds a compiled extension)")
    if so is None:
        _fail("bca/_bca.abi3.so is missing (the extension must be built for the stable ABI)")
    elf = ELFFile(io.BytesIO(so))
    if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
        _fail(f"bca/_bca.abi3.so is {elf.elfclass}-bit {elf['e_machine']}, want x86-64")
    if elf.get_section_by_name(".debug_info") is not None:
        _fail("bca/_bca.abi3.so has a .debug_info section: a debug build, not the release profile")
    missing = sorted((_tracked_modules() | {"bca/_bca.pyi", "bca/py.typed"}) - names)
    if missing:
        _fail(f"the wheel lacks {missing}")
    if not re.search(r"^bca\s*=\s*bca\.cli:main\s*$", entry_points, flags=re.M):
        _fail(f"the wheel's console script is not bca = bca.cli:main:\n{entry_points}")
    print(f"check_dist: {path.name}: tags {sorted(tags)}, {len(names)} files, extension "
          f"{len(so) / 2**20:.1f} MiB: ok")  # fmt: skip


def check_sdist(path: Path) -> None:
    if not path.name.endswith(".tar.gz"):
        _fail(f"{path.name}: not an sdist (.tar.gz)")
    with tarfile.open(path) as tf:
        names = tf.getnames()
    if not names:
        _fail(f"{path.name} is empty")
    root = names[0].split("/", 1)[0]
    rel = {n.split("/", 1)[1] for n in names if "/" in n}
    want = {"Cargo.toml", "Cargo.lock", "pyproject.toml", "README.md", "rust/src/lib.rs",
            "rust/src/python.rs", "python/bca/_bca.pyi", "python/bca/py.typed"}  # fmt: skip
    want |= {f"python/{m}" for m in _tracked_modules()}
    missing = sorted(want - rel)
    if missing:
        _fail(f"{path.name} lacks {missing}")
    if any(n.endswith((".so", ".pyd")) for n in rel):
        _fail(f"{path.name} holds a compiled extension; an sdist is sources only")
    print(f"check_dist: {path.name}: {len(rel)} files under {root}/: ok")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[0] not in ("wheel", "sdist"):
        _fail("usage: check_dist.py wheel|sdist FILE (exactly one file: clean dist/ first)")
    path = Path(argv[1])
    if not path.is_file():
        _fail(f"{path} is not a file")
    (check_wheel if argv[0] == "wheel" else check_sdist)(path)


if __name__ == "__main__":
    main(sys.argv[1:])
