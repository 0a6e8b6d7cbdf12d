"""The portable model file: plain arrays and JSON, nothing that can run code when it is read.

A model (``settlements model export``) travels between people and pipelines, so it is data only: a ZIP
archive, stored uncompressed, of one JSON header (``model.json``: the format, its version, and what the
model is, see :mod:`settlements.transfer`) and one ``.npy`` file per array; numpy opens it as an ``.npz``
too. Reading never unpickles: each array is loaded with numpy's ``allow_pickle=False``, and only numeric
arrays are taken. Anything else (a pickle, a torch checkpoint, an object array, a compressed or unknown
member, a newer format) is refused with one :class:`~settlements.errors.ModelFileError` line, before
anything in it is used.

Light to import (the standard library; numpy only where arrays are read or written): the config loader
reads the header.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelFileError

if TYPE_CHECKING:
    import numpy as np

FORMAT = "settlements-model"
#: The version this code writes, and the newest it reads.
FORMAT_VERSION = 1
HEADER = "model.json"
#: A reader takes files of at most 4 GiB (a fine-tuned MobileNetV2 makes one of about 10 MB).
MAX_FILE_BYTES = 4 << 30
_ARRAY_MEMBER = re.compile(r"^[A-Za-z0-9_.\-]{1,200}\.npy$")
#: Array kinds a model holds: booleans, integers and floats (never objects, which numpy would unpickle).
_NUMERIC = "biuf"
#: Every member's time stamp: the same model always makes the same bytes (and SHA-256).
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class ModelFile:
    """A model file as read: its header, its arrays by name, and the SHA-256 of its bytes."""

    path: Path
    sha256: str
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def array(self, name: str) -> np.ndarray:
        try:
            return self.arrays[name]
        except KeyError:
            raise refused(self.path, f"the header names the array {name!r}, which is missing") from None

    def group(self, prefix: str) -> dict[str, np.ndarray]:
        """The arrays named ``<prefix>.<key>``, by key (a state dict's tensors)."""
        start = prefix + "."
        return {name[len(start):]: a for name, a in self.arrays.items() if name.startswith(start)}


def refused(path: Path, why: str) -> ModelFileError:
    return ModelFileError(f"{path}: not a settlements model file ({why}); nothing in it was used")


def _archive(path: Path) -> tuple[str, zipfile.ZipFile]:
    """The file's SHA-256 and its archive, every member checked by name and storage (nothing read yet)."""
    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise refused(path, f"larger than {MAX_FILE_BYTES >> 30} GiB")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if data[:1] == b"\x80":  # the opcode every pickle of protocol 2 or later starts with
        raise refused(path, "a Python pickle, which is never unpickled")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError):
        raise refused(path, "not a ZIP archive of arrays and JSON") from None
    names = [m.filename for m in members]
    if len(set(names)) != len(names):
        raise refused(path, "a member is given twice")
    for m in members:
        if m.filename != HEADER and not _ARRAY_MEMBER.match(m.filename):
            raise refused(path, f"member {m.filename[:80]!r} is neither {HEADER} nor an array (.npy)")
        if m.compress_type != zipfile.ZIP_STORED:
            raise refused(path, f"member {m.filename!r} is compressed; a model file stores its arrays as they are")
    if HEADER not in names:
        raise refused(path, f"no {HEADER}")
    return hashlib.sha256(data).hexdigest(), archive


def _header(path: Path, archive: zipfile.ZipFile) -> dict[str, Any]:
    try:
        header = json.loads(archive.read(HEADER).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile):
        raise refused(path, f"{HEADER} is not JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise refused(path, f"{HEADER} does not say format {FORMAT!r}")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise refused(path, f"format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: model format version {version}, written by a newer settlements; this one "
                             f"reads version {FORMAT_VERSION} (update settlements)")
    return header


def read_header(path: Path) -> tuple[dict[str, Any], str]:
    """The header of the model file at ``path`` and the file's SHA-256, without reading an array."""
    sha, archive = _archive(path)
    with archive:
        return _header(path, archive), sha


def read_model_file(path: Path) -> ModelFile:
    """The model file at ``path``, every array loaded without unpickling (see the module)."""
    import numpy as np

    sha, archive = _archive(path)
    with archive:
        header = _header(path, archive)
        arrays: dict[str, np.ndarray] = {}
        for member in archive.infolist():
            if member.filename == HEADER:
                continue
            name = member.filename.removesuffix(".npy")
            try:
                value = np.load(io.BytesIO(archive.read(member)), allow_pickle=False)
            except ValueError as exc:  # "Object arrays cannot be loaded when allow_pickle=False", a bad header
                raise refused(path, f"array {name!r}: {str(exc).splitlines()[0][:120]}") from None
            except (OSError, EOFError, zipfile.BadZipFile):
                raise refused(path, f"array {name!r} is damaged") from None
            if not isinstance(value, np.ndarray) or value.dtype.kind not in _NUMERIC:
                raise refused(path, f"array {name!r} holds {getattr(value, 'dtype', type(value).__name__)}, "
                                    "not numbers")
            arrays[name] = value
    return ModelFile(path, sha, header, arrays)


def write_model_file(path: Path, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write a model file at ``path`` (a staged path: the caller's commit puts it in place): ``header``
    with the format and its version, and each array under its name. The same content makes the same bytes."""
    import numpy as np

    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **header}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        def member(name: str, data: bytes) -> None:
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)

        member(HEADER, json.dumps(body, indent=1, ensure_ascii=False).encode("utf-8"))
        for name in sorted(arrays):
            if not _ARRAY_MEMBER.match(f"{name}.npy"):
                raise ValueError(f"array name {name!r}: letters, digits, '_', '.', '-' only")
            value = np.ascontiguousarray(arrays[name])
            if value.dtype.kind not in _NUMERIC:
                raise ValueError(f"array {name!r}: {value.dtype} is not numeric")
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            member(f"{name}.npy", buf.getvalue())
