"""OpenAI TorchScript archives: read the weights without running the archive.

A TorchScript archive (``torch.jit.save``; OpenAI's released CLIP ``.pt`` files) is a program:
``torch.jit.load`` compiles its ``code/`` and runs a class's TorchScript ``__setstate__`` while
loading, so a weights file can write files. ``torch.load(weights_only=True)`` refuses such archives
(torch 2.13 raises before dispatching to ``torch.jit.load``), so they are read here instead, as data:

- the zip is checked first: one top-level folder, no duplicated, encrypted or overlapping entries,
  entries inside the file, ``data.pkl`` and every ``data/<key>`` stored uncompressed, code listings
  (deflated by torch) of bounded size;
- ``data.pkl`` is scanned opcode by opcode (only the opcodes TorchScript's pickler writes), then
  unpickled with an allowlist (``_GLOBALS``): ``__torch__.*`` classes become inert records (their
  BUILD state is stored, nothing is called), tensors become references to ``data/<key>`` checked
  against the entry's size before anything is allocated;
- which attributes are parameters and buffers is read from the class listings in ``code/`` as text
  (the ``__parameters__ = [...]`` / ``__buffers__ = [...]`` list literals only, ``ast.literal_eval``);
  a class whose listing defines ``__setstate__`` (code that loading would run) is refused;
- the state dict is rebuilt in ``torch.jit.load(path).state_dict()``'s order: from the root module,
  each module's parameters, then its buffers, then its submodules, in the archive's attribute order.

Anything else (an unknown global or opcode, a missing storage, a size mismatch, a class without a
listing ...) is a CheckpointError naming the file and how to convert a trusted file to safetensors.
"""
from __future__ import annotations

import ast
import io
import os
import pickle
import pickletools
import re
import sys
import zipfile
from collections import OrderedDict
from math import prod
from pathlib import Path
from typing import Any, Callable

import torch

from vop.errors import CheckpointError
from vop.formats.registry import Format, register

#: ``torch.<Name>Storage`` globals of TorchScript's pickler -> dtype
_STORAGES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
#: the opcodes TorchScript's pickler writes (protocol 2) and a few equivalent ones of newer protocols;
#: no INST/OBJ/EXT*/NEWOBJ_EX/PERSID (text)/out-of-band buffers
_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET",
    "LONG_BINGET", "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4",
    "FLOAT", "BINFLOAT", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES",
    "BINBYTES8", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "EMPTY_LIST", "LIST", "APPEND", "APPENDS",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "GLOBAL", "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD", "BINPERSID",
})
_MAX_PICKLE = 64 << 20  # data.pkl: a ViT-bigG archive's is well under 1 MiB
_MAX_CODE_FILE = 16 << 20  # one code listing (decompressed)
_MAX_CODE = 64 << 20  # all code listings read
_KEY = re.compile(r"[A-Za-z0-9_]{1,64}")
_CLASS = re.compile(r"^class[ \t]+(\w+)[ \t]*(?:\(([\w.]*)\))?[ \t]*:[ \t]*$", re.M)
_TOP_LEVEL = re.compile(r"^\S", re.M)


def convert_hint(path: str | os.PathLike) -> str:
    """The trusted one-liner that turns a TorchScript archive into safetensors (it runs the archive)."""
    p = Path(path)
    src, dst = str(p).replace("'", "\\'"), str(p.with_suffix(".safetensors") if p.suffix != ".safetensors"
                                              else p.with_name(p.stem + "-weights.safetensors")).replace("'", "\\'")
    return (f"python -c \"import torch, safetensors.torch as st; m = torch.jit.load('{src}', map_location='cpu'); "
            f"st.save_file({{k: v.clone().contiguous() for k, v in m.state_dict().items()}}, '{dst}')\"")


class _Refused(Exception):
    """Something the reader cannot interpret; becomes a CheckpointError naming the file."""


def _refuse(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: a TorchScript archive vop cannot read as plain weights ({reason}); vop reads TorchScript "
        "archives as data and never runs them (torch.jit.load would run the code they hold). Only if you trust "
        f"the file, convert it to safetensors with: {convert_hint(path)}"
    )


# ---------------------------------------------------------------------------------------------
# inert things the unpickler may produce (slots only; BUILD on them is refused)
# ---------------------------------------------------------------------------------------------
class _Inert:
    __slots__ = ()

    def __setstate__(self, state: Any) -> None:  # also closes BUILD's setattr path (slot state)
        raise _Refused(f"a pickle BUILD on {type(self).__name__}")


class _StorageType(_Inert):
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype

    def __call__(self, *args: Any) -> Any:
        raise _Refused(f"a call of torch.{self.name}")


class _Storage(_Inert):
    """A ``data/<key>`` entry: its dtype and element count, checked against the entry's size."""
    __slots__ = ("key", "dtype", "numel", "info")

    def __init__(self, key: str, dtype: torch.dtype, numel: int, info: zipfile.ZipInfo):
        self.key, self.dtype, self.numel, self.info = key, dtype, numel, info


class _TensorRef(_Inert):
    __slots__ = ("storage", "offset", "size", "stride")

    def __init__(self, storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    @property
    def nbytes(self) -> int:
        return prod(self.size) * self.storage.dtype.itemsize


class _NoHooks(_Inert):
    """``collections.OrderedDict()``: the empty backward-hooks argument of ``_rebuild_tensor_v2``."""
    __slots__ = ()


class _Function(_Inert):
    """An allowlisted global: our own implementation, never torch's or the archive's."""
    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name, self.fn = name, fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class _Listing:
    """What a class's code listing declares (read as text)."""

    def __init__(self, qualname: str, base: str, parameters: list[str], buffers: list[str], setstate: bool):
        self.qualname, self.base, self.parameters, self.buffers, self.setstate = qualname, base, parameters, buffers, setstate

    @property
    def is_module(self) -> bool:
        return self.base == "Module"


class _FrozenType(type):
    def __setattr__(cls, name: str, value: Any) -> None:
        raise _Refused(f"setting {name!r} on class {cls.__name__}")


class _ScriptObject:
    """An instance of a ``__torch__`` class: its pickled state, stored once, nothing run."""
    __slots__ = ("state",)
    listing: _Listing

    def __init__(self) -> None:  # REDUCE of the class with arguments fails here (TypeError)
        pass

    def __setstate__(self, state: Any) -> None:
        try:
            object.__getattribute__(self, "state")
        except AttributeError:
            object.__setattr__(self, "state", state)
            return
        raise _Refused(f"a second BUILD of a {self.listing.qualname} object")

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused(f"setting {name!r} on a {self.listing.qualname} object")


# ---------------------------------------------------------------------------------------------
# the archive
# ---------------------------------------------------------------------------------------------
def is_torchscript(path: str | os.PathLike) -> bool:
    """A zip written by ``torch.jit.save`` (by content, whatever the file is called): it holds
    ``<archive>/code/`` or ``<archive>/constants.pkl`` (torch.load's own test is the latter)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


class _Archive:
    def __init__(self, path: Path, z: zipfile.ZipFile):
        self.path, self.z = path, z
        size = path.stat().st_size
        infos = z.infolist()
        names = [i.filename for i in infos]
        if not infos:
            raise _Refused("an empty zip")
        if len(set(names)) != len(names):
            raise _Refused("duplicated zip entries")
        prefix = names[0].split("/", 1)[0]
        if any(not n.startswith(prefix + "/") for n in names):
            raise _Refused("entries outside one top-level folder")
        total = 0
        for i in infos:
            if i.flag_bits & 0x1:
                raise _Refused(f"an encrypted entry {i.filename}")
            if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _Refused(f"entry {i.filename} uses zip compression method {i.compress_type}")
            if i.compress_type == zipfile.ZIP_STORED and i.compress_size != i.file_size:
                raise _Refused(f"entry {i.filename} declares {i.file_size} bytes but stores {i.compress_size}")
            if i.header_offset + i.compress_size > size:
                raise _Refused(f"entry {i.filename} reaches past the end of the file ({size} bytes): truncated")
            total += i.compress_size
        if total > size:
            raise _Refused(f"zip entries of {total} bytes in all in a file of {size} bytes (overlapping entries)")
        self.prefix = prefix
        self.infos = {n[len(prefix) + 1:]: i for n, i in zip(names, infos)}
        self.code_read = 0
        self.listings: dict[str, dict[str, _Listing]] = {}

    def info(self, name: str) -> zipfile.ZipInfo:
        i = self.infos.get(name)
        if i is None:
            raise _Refused(f"no {self.prefix}/{name} in the archive")
        return i

    def read_stored(self, name: str, limit: int) -> bytes:
        i = self.info(name)
        if i.compress_type != zipfile.ZIP_STORED:
            raise _Refused(f"{self.prefix}/{name} is compressed (torch stores it uncompressed)")
        if i.file_size > limit:
            raise _Refused(f"{self.prefix}/{name} is {i.file_size} bytes (more than {limit})")
        return self.z.read(i)

    def listing(self, module: str) -> dict[str, _Listing]:
        """The classes of one code file, ``code/__torch__/a/b.py`` for module ``__torch__.a.b``."""
        if module in self.listings:
            return self.listings[module]
        parts = module.split(".")
        if parts[0] != "__torch__" or not all(re.fullmatch(r"\w+", p) for p in parts):
            raise _Refused(f"class module {module!r}")
        name = "code/" + "/".join(parts) + ".py"
        i = self.info(name)
        if i.file_size > _MAX_CODE_FILE or self.code_read + i.file_size > _MAX_CODE:
            raise _Refused(f"code listing {self.prefix}/{name} of {i.file_size} bytes")
        with self.z.open(i) as f:
            raw = f.read(i.file_size + 1)
        if len(raw) != i.file_size:
            raise _Refused(f"code listing {self.prefix}/{name} is not the size it declares")
        self.code_read += len(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(f"code listing {self.prefix}/{name} is not UTF-8 text") from None
        classes: dict[str, _Listing] = {}
        heads = list(_CLASS.finditer(text))
        for m in heads:
            nxt = _TOP_LEVEL.search(text, m.end() + 1)
            body = text[m.end(): nxt.start() if nxt else len(text)]
            qual, base = f"{module}.{m.group(1)}", m.group(2) or ""
            parameters, buffers = _names(body, "__parameters__", qual), _names(body, "__buffers__", qual)
            if base == "Module" and parameters is None:
                raise _Refused(f"the code listing of module class {qual} does not say which attributes are parameters")
            classes[m.group(1)] = _Listing(qual, base, parameters or [], buffers or [],  # older archives may lack __buffers__
                                           re.search(r"^[ \t]+def[ \t]+__setstate__\b", body, re.M) is not None)
        self.listings[module] = classes
        return classes


def _names(body: str, attr: str, qual: str) -> list[str] | None:
    found = re.findall(rf"^[ \t]+{attr}[ \t]*=[ \t]*(\[[^\]\n]*\])[ \t]*$", body, re.M)
    if not found:
        return None
    if len(found) > 1:
        raise _Refused(f"class {qual} declares {attr} twice")
    try:
        names = ast.literal_eval(found[0])
    except (ValueError, SyntaxError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise _Refused(f"class {qual}: {attr} is not a list of distinct names")
    return names


# ---------------------------------------------------------------------------------------------
# the restricted unpickler
# ---------------------------------------------------------------------------------------------
def _int(x: Any) -> bool:
    return type(x) is int and x >= 0


def _intlist(data: Any) -> list:
    if type(data) is not list or not all(type(x) is int for x in data):
        raise _Refused("build_intlist of something other than a list of ints")
    return data


def _doublelist(data: Any) -> list:
    if type(data) is not list or not all(type(x) is float for x in data):
        raise _Refused("build_doublelist of something other than a list of floats")
    return data


def _boollist(data: Any) -> list:
    if type(data) is not list or not all(type(x) is bool for x in data):
        raise _Refused("build_boollist of something other than a list of bools")
    return data


def _tensorlist(data: Any) -> list:
    if type(data) is not list or not all(isinstance(x, _TensorRef) for x in data):
        raise _Refused("build_tensorlist of something other than a list of tensors")
    return data


def _type_tag(value: Any, type_str: Any) -> Any:
    if type(value) not in (list, dict) or type(type_str) is not str:
        raise _Refused("restore_type_tag of something other than a list or dict")
    return value


def _no_hooks(*args: Any) -> _NoHooks:
    if args:
        raise _Refused("collections.OrderedDict with contents")
    return _NoHooks()


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                    metadata: Any = None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor without a storage of the archive")
    if not (_int(offset) and type(size) is tuple and type(stride) is tuple and len(size) == len(stride)
            and all(map(_int, size)) and all(map(_int, stride)) and type(requires_grad) is bool):
        raise _Refused(f"a tensor of storage {storage.key} with an unreadable offset, size or stride")
    if not isinstance(hooks, _NoHooks) or metadata not in (None, {}):
        raise _Refused(f"a tensor of storage {storage.key} with backward hooks or metadata")
    n = prod(size)
    if n and (offset + sum((s - 1) * st for s, st in zip(size, stride)) >= storage.numel or n > storage.numel):
        raise _Refused(f"a tensor of shape {size} that does not fit its storage {storage.key} ({storage.numel} elements)")
    return _TensorRef(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: _Archive):
        super().__init__(io.BytesIO(data))
        self.archive = archive
        self.storages: dict[str, _Storage] = {}
        self.classes: dict[str, type] = {}
        self.globals: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): _Function("_rebuild_tensor_v2", _rebuild_tensor),
            ("collections", "OrderedDict"): _Function("OrderedDict", _no_hooks),
            ("torch.jit._pickle", "build_intlist"): _Function("build_intlist", _intlist),
            ("torch.jit._pickle", "build_doublelist"): _Function("build_doublelist", _doublelist),
            ("torch.jit._pickle", "build_boollist"): _Function("build_boollist", _boollist),
            ("torch.jit._pickle", "build_tensorlist"): _Function("build_tensorlist", _tensorlist),
            ("torch.jit._pickle", "restore_type_tag"): _Function("restore_type_tag", _type_tag),
            **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGES.items()},
        }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.globals:
            return self.globals[(module, name)]
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            if qual not in self.classes:
                listing = self.archive.listing(module).get(name)
                if listing is None:
                    raise _Refused(f"class {qual} has no code listing in the archive")
                if listing.setstate:
                    raise _Refused(f"class {qual} defines __setstate__, code that loading it would run")
                self.classes[qual] = _FrozenType("ScriptObject", (_ScriptObject,), {"__slots__": (), "listing": listing})
            return self.classes[qual]
        raise _Refused(f"the pickle global {module}.{name}, not one a TorchScript weights archive needs")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and type(pid[2]) is str and type(pid[3]) is str and _int(pid[4])):
            raise _Refused("a persistent id other than a storage reference")
        _, kind, key, _location, numel = pid  # the location (cpu, cuda:0 ...) is ignored: read to the CPU
        if not _KEY.fullmatch(key):
            raise _Refused(f"storage key {key!r}")
        if key in self.storages:
            s = self.storages[key]
            if s.dtype != kind.dtype or s.numel != numel:
                raise _Refused(f"storage {key} declared twice with different types or sizes")
            return s
        info = self.archive.info(f"data/{key}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise _Refused(f"storage {self.archive.prefix}/data/{key} is compressed (torch stores it uncompressed)")
        if numel * kind.dtype.itemsize != info.file_size:
            raise _Refused(f"storage {key} declares {numel} {kind.name[:-7].lower()} elements "
                           f"({numel * kind.dtype.itemsize} bytes), its entry holds {info.file_size} bytes")
        s = self.storages[key] = _Storage(key, kind.dtype, numel, info)
        return s


def _scan(data: bytes) -> None:
    stop = False
    try:
        for op, _arg, _pos in pickletools.genops(data):
            if op.name not in _OPCODES:
                raise _Refused(f"pickle opcode {op.name} in data.pkl")
            stop = op.name == "STOP"
    except ValueError as e:  # truncated or garbled
        raise _Refused(f"data.pkl is not a whole pickle: {e}") from None
    if not stop:
        raise _Refused("data.pkl is not a whole pickle: no STOP")


def _collect(obj: Any, prefix: str, out: dict[str, _TensorRef], depth: int) -> None:
    """``state_dict()`` of a RecursiveScriptModule: parameters, buffers, then submodules, in slot order."""
    if depth > 64:
        raise _Refused("modules nested more than 64 deep (a cycle?)")
    listing = type(obj).listing
    state = getattr(obj, "state", None)
    if type(state) is not dict or not all(type(k) is str for k in state):
        raise _Refused(f"a {listing.qualname} module without its attributes")
    for kind, names in (("parameter", listing.parameters), ("buffer", listing.buffers)):
        missing = [n for n in names if n not in state]
        if missing:
            raise _Refused(f"{listing.qualname} lacks its {kind} {missing[0]!r}")
        for name, value in state.items():
            if name not in names or value is None:
                continue
            if not isinstance(value, _TensorRef):
                raise _Refused(f"{kind} {prefix}{name} is not a tensor")
            out[prefix + name] = value
    for name, value in state.items():
        if isinstance(value, _ScriptObject) and type(value).listing.is_module:
            _collect(value, f"{prefix}{name}.", out, depth + 1)


def _materialise(archive: _Archive, refs: dict[str, _TensorRef]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = OrderedDict()
    for name, r in refs.items():
        s = r.storage
        if s.key not in flat:
            buf = torch.empty(s.info.file_size, dtype=torch.uint8)
            view = memoryview(buf.numpy()).cast("B")
            pos = 0
            with archive.z.open(s.info) as f:  # the zip's CRC is checked when the entry is read to its end
                while pos < s.info.file_size:
                    chunk = f.read(min(16 << 20, s.info.file_size - pos))
                    if not chunk:
                        raise _Refused(f"storage {s.key} ends early")
                    view[pos:pos + len(chunk)] = chunk
                    pos += len(chunk)
                if f.read(1):
                    raise _Refused(f"storage {s.key} is longer than it declares")
            flat[s.key] = buf.view(s.dtype) if s.numel else torch.empty(0, dtype=s.dtype)
        out[name] = torch.as_strided(flat[s.key], r.size, r.stride, r.offset)
    return out


def read_torchscript(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict ``torch.jit.load(path).state_dict()`` gives (same names, order, dtypes and
    values, on the CPU), read without compiling or running anything the archive holds."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            archive = _Archive(path, z)
            order = archive.infos.get("byteorder")
            if order is not None:
                got = archive.read_stored("byteorder", 16).decode("ascii", "replace")
                if got != sys.byteorder:
                    raise _Refused(f"{got}-endian tensors on a {sys.byteorder}-endian machine")
            data = archive.read_stored("data.pkl", _MAX_PICKLE)
            _scan(data)
            root = _Unpickler(data, archive).load()
            if not isinstance(root, _ScriptObject) or not type(root).listing.is_module:
                raise _Refused("data.pkl does not hold a module")
            refs: dict[str, _TensorRef] = OrderedDict()
            _collect(root, "", refs, 0)
            total = sum(r.nbytes for r in refs.values())
            if total > path.stat().st_size:
                raise _Refused(f"its tensors add up to {total} bytes, more than the file's {path.stat().st_size}")
            return _materialise(archive, refs)
    except CheckpointError:
        raise
    except _Refused as e:
        raise _refuse(path, str(e)) from None
    except Exception as e:  # a damaged zip (BadZipFile, CRC), a malformed pickle, an impossible view ...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _refuse(path, f"damaged or unexpected content: {type(e).__name__}: {reason}") from None


register(Format("torchscript", "an OpenAI TorchScript .pt", is_file=is_torchscript,
                read_file=lambda path: (read_torchscript(path), {})))
