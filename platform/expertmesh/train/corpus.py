"""The demo corpus: the Python standard library's own ``.py`` source files.

Every machine that runs ExpertMesh has a Python, so the demo model is trained on a corpus
that never has to be downloaded. This module finds those files in a fixed order, splits
them into train and validation by a hash of their path, and reads them.

Discovery rule (documented here because it defines the corpus):

- root: ``sysconfig.get_paths()["stdlib"]`` (e.g. ``/usr/lib/python3.11``) unless a root
  is passed in;
- every ``*.py`` regular file below the root, walked without following symlinks;
- except files under a directory named in :data:`EXCLUDED_DIR_NAMES` (third-party
  packages, the test suites, IDLE and turtle demos, generated codec tables and the pydoc
  topic dump, compiled extension folders), under a directory whose name starts with one of
  :data:`EXCLUDED_DIR_PREFIXES` (``config-3.11-x86_64-linux-gnu``), and files whose name
  starts with one of :data:`EXCLUDED_FILE_PREFIXES` (``_sysconfigdata_*.py`` records the
  build machine, so it differs between machines with the same Python version);
- relative paths are POSIX strings and the list is sorted by them, so two machines with the
  same Python release get the same list in the same order.

Split rule: a file is in validation when ``H(seed, relpath) < validation_fraction``, where
``H`` maps the SHA-256 of ``"split\\0{seed}\\0{relpath}"`` to ``[0, 1)``. The split of a file does not
depend on which other files exist, so subsets (``max_bytes``) split consistently. When the
rule puts no file in validation (tiny subsets), the file with the smallest hash goes there.

Numbers for CPython 3.11.7 (Linux): 527 files, 9.08 MB after exclusions; with the defaults
8 files (0.12 MB) are validation.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SplitName = Literal["train", "validation"]
SPLITS: tuple[SplitName, SplitName] = ("train", "validation")

EXCLUDED_DIR_NAMES: frozenset[str] = frozenset(
    {
        "site-packages",  # third-party packages: differ per machine
        "dist-packages",  # Debian's name for the same
        "test",  # CPython's test suite and package-local test folders
        "tests",
        "idlelib",  # the IDLE application
        "turtledemo",  # turtle graphics demos
        "encodings",  # mostly generated charmap tables
        "pydoc_data",  # one 750 KB generated string literal
        "lib-dynload",  # compiled extension modules
        "__pycache__",
    }
)
EXCLUDED_DIR_PREFIXES: tuple[str, ...] = ("config-",)
EXCLUDED_FILE_PREFIXES: tuple[str, ...] = ("_sysconfigdata",)

DEFAULT_VALIDATION_FRACTION = 0.02
DEFAULT_SPLIT_SEED = 0
_HASH_DENOMINATOR = float(2**64)
_SPLIT_SALT = "split"
_SUBSET_SALT = "subset"


@dataclass(frozen=True)
class CorpusFile:
    """One source file of the corpus.

    Attributes:
        relpath: POSIX path relative to the corpus root, e.g. ``"json/decoder.py"``.
        path: absolute path on this machine.
        size_bytes: file size in bytes at discovery time.
    """

    relpath: str
    path: Path
    size_bytes: int

    def read_bytes(self) -> bytes:
        """The raw file content."""
        return self.path.read_bytes()

    def read_text(self) -> str:
        """The content decoded as UTF-8 (``errors="replace"``), newlines untouched."""
        return read_source(self.path)


@dataclass(frozen=True)
class Corpus:
    """A discovered corpus split into train and validation files (each sorted by relpath)."""

    root: Path
    train: tuple[CorpusFile, ...]
    validation: tuple[CorpusFile, ...]
    validation_fraction: float
    seed: int

    def split(self, name: SplitName) -> tuple[CorpusFile, ...]:
        """The files of split ``name`` ("train" or "validation")."""
        if name == "train":
            return self.train
        if name == "validation":
            return self.validation
        raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")

    @property
    def files(self) -> tuple[CorpusFile, ...]:
        """All files, sorted by relpath."""
        return tuple(sorted(self.train + self.validation, key=lambda f: f.relpath))

    def describe(self) -> str:
        """One log line, e.g. ``"corpus /usr/lib/python3.11: train 547 files 7.4 MB, ..."``."""
        return (
            f"corpus {self.root}: train {describe_files(self.train)}, "
            f"validation {describe_files(self.validation)} "
            f"(fraction={self.validation_fraction}, seed={self.seed})"
        )


def stdlib_root() -> Path:
    """The directory of this interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def read_source(path: Path) -> str:
    """Read a source file as UTF-8 with ``errors="replace"``, keeping ``\\r\\n`` as is."""
    return path.read_bytes().decode("utf-8", errors="replace")


def _is_excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIR_NAMES or name.startswith(EXCLUDED_DIR_PREFIXES)


def discover_files(root: Path | str | None = None) -> list[CorpusFile]:
    """All corpus files below ``root`` (default: the stdlib), sorted by relative path.

    Raises:
        ValueError: ``root`` is not a directory or holds no matching file.
    """
    base = stdlib_root() if root is None else Path(root).resolve()
    if not base.is_dir():
        raise ValueError(f"corpus root {base} is not a directory")
    found: list[CorpusFile] = []
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        dirnames[:] = [d for d in dirnames if not _is_excluded_dir(d)]
        for name in filenames:
            if not name.endswith(".py") or name.startswith(EXCLUDED_FILE_PREFIXES):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            relpath = path.relative_to(base).as_posix()
            found.append(CorpusFile(relpath=relpath, path=path, size_bytes=path.stat().st_size))
    if not found:
        raise ValueError(f"no .py files found below {base} after exclusions")
    found.sort(key=lambda f: f.relpath)
    return found


def path_hash_unit(relpath: str, seed: int, salt: str = _SPLIT_SALT) -> float:
    """Map ``(salt, seed, relpath)`` to a number in ``[0, 1)``, the same on every machine.

    ``salt`` keeps independent uses apart: the split and the byte-limited subset must not
    be correlated, or a small subset would land entirely in validation.
    """
    digest = hashlib.sha256(f"{salt}\0{seed}\0{relpath}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _HASH_DENOMINATOR


def limit_bytes(files: Sequence[CorpusFile], max_bytes: int | None, seed: int = 0) -> list[CorpusFile]:
    """A deterministic, well-mixed subset of ``files`` holding at most ``max_bytes`` bytes.

    Files are taken in hash order (:func:`path_hash_unit` with ``seed`` and a salt of its
    own, so the subset is independent of the split), skipping any
    that would overflow the budget, and returned sorted by relpath. ``None`` keeps all.

    Raises:
        ValueError: ``max_bytes`` is not positive or no single file fits in it.
    """
    if max_bytes is None:
        return list(files)
    if max_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} must be positive (or None for no limit)")
    chosen: list[CorpusFile] = []
    used_bytes = 0
    for f in sorted(files, key=lambda f: (path_hash_unit(f.relpath, seed, _SUBSET_SALT), f.relpath)):
        if used_bytes + f.size_bytes <= max_bytes:
            chosen.append(f)
            used_bytes += f.size_bytes
    if not chosen:
        smallest = min((f.size_bytes for f in files), default=0)
        raise ValueError(f"max_bytes={max_bytes} is smaller than the smallest file ({smallest} bytes)")
    chosen.sort(key=lambda f: f.relpath)
    return chosen


def split_files(
    files: Sequence[CorpusFile],
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[tuple[CorpusFile, ...], tuple[CorpusFile, ...]]:
    """Split ``files`` into ``(train, validation)`` by the path hash (see module docstring).

    Raises:
        ValueError: the fraction is outside ``[0, 1)`` or fewer than 2 files are given
            while a validation split is asked for.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must be in [0, 1)")
    ordered = sorted(files, key=lambda f: f.relpath)
    if validation_fraction == 0.0:
        return tuple(ordered), ()
    if len(ordered) < 2:
        raise ValueError(f"need at least 2 files to split off validation, got {len(ordered)}")
    scores = {f.relpath: path_hash_unit(f.relpath, seed) for f in ordered}
    validation = [f for f in ordered if scores[f.relpath] < validation_fraction]
    if not validation:
        validation = [min(ordered, key=lambda f: (scores[f.relpath], f.relpath))]
    if len(validation) == len(ordered):
        validation.remove(max(validation, key=lambda f: (scores[f.relpath], f.relpath)))
    held_out = {f.relpath for f in validation}
    train = tuple(f for f in ordered if f.relpath not in held_out)
    return train, tuple(validation)


def load_corpus(
    root: Path | str | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
    max_bytes: int | None = None,
) -> Corpus:
    """Discover, optionally subset (``max_bytes``, via :func:`limit_bytes`), and split.

    Args:
        root: corpus directory; ``None`` means this interpreter's stdlib.
        validation_fraction: expected share of files held out, in ``[0, 1)``.
        seed: seeds both the split and the ``max_bytes`` subset.
        max_bytes: cap on the total bytes of the corpus (tests use ~0.3 MB); ``None`` = all.
    """
    base = stdlib_root() if root is None else Path(root).resolve()
    files = limit_bytes(discover_files(base), max_bytes, seed=seed)
    train, validation = split_files(files, validation_fraction=validation_fraction, seed=seed)
    return Corpus(root=base, train=train, validation=validation,
                  validation_fraction=validation_fraction, seed=seed)


def files_fingerprint(files: Iterable[CorpusFile]) -> str:
    """SHA-256 hex over the sorted relpaths and the content of each file.

    Two machines with byte-identical sources get the same fingerprint; any edited, added
    or removed file changes it. Used to key token caches.
    """
    outer = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        outer.update(f.relpath.encode("utf-8") + b"\0")
        outer.update(hashlib.sha256(f.read_bytes()).digest())
    return outer.hexdigest()


def describe_files(files: Sequence[CorpusFile]) -> str:
    """Short human summary, e.g. ``"547 files, 7.41 MB"``."""
    n_bytes = sum(f.size_bytes for f in files)
    return f"{len(files)} files, {n_bytes / 1e6:.2f} MB"
