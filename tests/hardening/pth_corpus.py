"""Generators of the weight-file hardening corpus: hostile `.pth` (zip and legacy) and `.weights` files
across the fault classes of docs/RELIABILITY.md, and genuine ones that must load with their values.

A case builds its file's bytes for a directory (`case.write(dir) -> path`) and says what must happen:
a one-line refusal whose message matches `match`, or a load equal to `expected()`.  Code-execution
payloads would create `dir / CANARY`; the corpus test asserts it never exists.  The pickles are
assembled opcode by opcode (the helpers below), so a case says exactly what its file holds."""
from __future__ import annotations

import dataclasses
import functools
import io
import os
import pickle
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from edge_cbn.convert.weights.torch_pickle import LEGACY_MAGIC

CANARY = "canary"
FLOATS = np.arange(16, dtype="<f4")  # the default storage: 16 float32s, 0..15

# -- a pickle assembler
MARK, STOP, TUPLE, REDUCE, BUILD, BINPERSID = b"(", b".", b"t", b"R", b"b", b"Q"
SETITEM, SETITEMS, APPEND, APPENDS = b"s", b"u", b"a", b"e"
EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, NEWFALSE, NONE, POP = b"}", b"]", b")", b"\x89", b"N", b"0"


def text(s: str) -> bytes:
    data = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def num(n: int) -> bytes:
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return (b"\x8a" + bytes([len(data)]) if len(data) < 256 else b"\x8b" + struct.pack("<i", len(data))) + data


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def stack_glob(module: str, name: str) -> bytes:
    return text(module) + text(name) + b"\x93"


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + REDUCE


def dict_of(entries: dict) -> bytes:
    return EMPTY_DICT + MARK + b"".join(text(k) + v for k, v in entries.items()) + SETITEMS


def pickled(body: bytes, protocol: int = 2) -> bytes:
    return b"\x80" + bytes([protocol]) + body + STOP


def storage(key="0", numel=16, stype="FloatStorage", module="torch") -> bytes:
    return tup(text("storage"), glob(module, stype), text(key), text("cpu"), num(numel)) + BINPERSID


def tensor(store: bytes | None = None, offset=0, size=(16,), stride=(1,), rebuild="_rebuild_tensor_v2") -> bytes:
    """`_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`; sizes may be raw bytes."""
    def ints(values):
        return values if isinstance(values, bytes) else tup(*(v if isinstance(v, bytes) else num(v) for v in values))
    return call(glob("torch._utils", rebuild), storage() if store is None else store,
                offset if isinstance(offset, bytes) else num(offset), ints(size), ints(stride), NEWFALSE,
                call(glob("collections", "OrderedDict")))


def state(**entries: bytes) -> bytes:
    """A state dict pickle: {'ok': a genuine tensor of FLOATS, **entries}."""
    return pickled(dict_of({"ok": tensor(), **entries}))


# -- containers
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy_header(magic=LEGACY_MAGIC, protocol=1001, sys_info=None) -> bytes:
    return b"".join(pickle.dumps(o, protocol=2) for o in (magic, protocol, SYS_INFO if sys_info is None else sys_info))


def legacy_bytes(pkl: bytes, storages=(("0", FLOATS.tobytes(), 16),), *, keys=None, header=None) -> bytes:
    """torch's legacy stream: header, pickle, key list, then per storage an int64 count and its bytes."""
    keys = [k for k, _, _ in storages] if keys is None else keys
    out = (legacy_header() if header is None else header) + pkl + pickle.dumps(keys, protocol=2)
    return out + b"".join(struct.pack("<q", count) + data for _, data, count in storages)


def zip_bytes(pkl: bytes, storages=None, *, root="archive", method=zipfile.ZIP_STORED, byteorder="little") -> bytes:
    """torch's zip archive: <root>/data.pkl, <root>/byteorder, <root>/data/<key>, <root>/version."""
    storages = {"0": FLOATS.tobytes()} if storages is None else storages
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as zf:
        zf.writestr(f"{root}/data.pkl", pkl)
        if byteorder:
            zf.writestr(f"{root}/byteorder", byteorder)
        for key, data in storages.items():
            zf.writestr(f"{root}/data/{key}", data)
        zf.writestr(f"{root}/version", "3\n")
    return buf.getvalue()


def member(name: str, data: bytes, *, method=0, size=None, crc=None, flags=0) -> tuple:
    return (name, data, method, len(data) if size is None else size, zlib.crc32(data) if crc is None else crc, flags)


def raw_zip(members: list[tuple]) -> bytes:
    """A zip archive whose headers say exactly what `members` (see `member`) say: flags, method, sizes."""
    local, central = io.BytesIO(), io.BytesIO()
    for name, data, method, size, crc, flags in members:
        offset, encoded = local.tell(), name.encode()
        local.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, flags, method, 0, 0x21, crc, len(data), size,
                                len(encoded), 0) + encoded + data)
        central.write(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, flags, method, 0, 0x21, crc, len(data),
                                  size, len(encoded), 0, 0, 0, 0, 0, offset) + encoded)
    directory, start = central.getvalue(), local.tell()
    return local.getvalue() + directory + struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(members), len(members),
                                                      len(directory), start, 0)


@functools.lru_cache(maxsize=None)
def deflated_zeros(nbytes: int) -> tuple[bytes, int]:
    """(raw deflate stream of `nbytes` zeros, their CRC-32), from one full-flushed 1 MiB block repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    crc, zeros = 0, bytes(1 << 20)
    for _ in range(nbytes >> 20):
        crc = zlib.crc32(zeros, crc)
    return block * (nbytes >> 20) + zlib.compressobj(9, zlib.DEFLATED, -15).flush(), crc


# -- cases
@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fault: str                                   # the fault class, a row of docs/RELIABILITY.md
    build: Callable[[Path], bytes]               # the file's bytes, for a case directory
    match: str | None = None                     # a refusal's message must match this regex
    expected: Callable[[], dict] | None = None   # set: the file must load, equal to this
    suffix: str = ".pth"
    needs_torch: bool = False                    # the file is what torch.save writes: skipped without torch

    def write(self, directory: Path) -> Path:
        path = Path(directory) / f"{self.name}{self.suffix}"
        path.write_bytes(self.build(Path(directory)))
        return path

    @property
    def loads(self) -> bool:
        return self.expected is not None


def _both_formats(name, fault, body: Callable[[Path], bytes], match=None, expected=None) -> list[Case]:
    """The case as a zip archive and as a legacy stream, the storage '0' holding FLOATS."""
    return [Case(f"{name}-zip", fault, lambda d: zip_bytes(body(d)), match, expected),
            Case(f"{name}-legacy", fault, lambda d: legacy_bytes(body(d)), match, expected)]


def _ok_only() -> dict:
    return {"ok": FLOATS}


# -- code execution: payloads that would create the canary file
class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _binbytes(data: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(data)) + data


def _touch(c: str) -> bytes:
    return text(f"touch {c}")


_PAYLOADS = {  # name -> (canary path -> pickle body that would run code)
    "os-system": lambda c: call(glob("os", "system"), _touch(c)),
    "posix-system": lambda c: call(glob("posix", "system"), _touch(c)),
    "stack-global": lambda c: call(stack_glob("os", "system"), _touch(c)),
    "eval": lambda c: call(glob("builtins", "eval"), text(f"open({c!r}, 'w')")),
    "exec": lambda c: call(glob("builtins", "exec"), text(f"open({c!r}, 'w')")),
    "open": lambda c: call(glob("builtins", "open"), text(c), text("w")),
    "subprocess-call": lambda c: call(glob("subprocess", "call"),
                                      EMPTY_LIST + MARK + text("touch") + text(c) + APPENDS),
    "subprocess-getoutput": lambda c: call(glob("subprocess", "getoutput"), _touch(c)),
    "import-getattr": lambda c: call(call(glob("builtins", "getattr"), call(glob("builtins", "__import__"), text("os")),
                                          text("system")), _touch(c)),
    "inst": lambda c: MARK + _touch(c) + b"i" + b"os\nsystem\n",
    "obj": lambda c: MARK + glob("os", "system") + _touch(c) + b"o",
    "newobj": lambda c: glob("collections", "OrderedDict") + EMPTY_TUPLE + b"\x81",
    "ext1": lambda c: b"\x82\x01",
    "nested-pickle": lambda c: call(glob("pickle", "loads"), _binbytes(pickle.dumps(_Evil(f"touch {c}")))),
    "as-storage": lambda c: tensor(call(glob("os", "system"), _touch(c))),
    "in-persistent-id": lambda c: tup(text("storage"), call(glob("os", "system"), _touch(c)), text("1"), text("cpu"),
                                      num(4)) + BINPERSID,
    "in-build-state": lambda c: call(glob("collections", "OrderedDict")) + dict_of(
        {"_metadata": call(glob("os", "system"), _touch(c))}) + BUILD,
    "torch-load": lambda c: call(glob("torch", "load"), text(c)),
}


def _code_cases() -> list[Case]:
    fault = "code execution"
    cases = []
    for name, payload in _PAYLOADS.items():
        cases += _both_formats(f"code-{name}", fault, lambda d, p=payload: state(evil=p(str(d / CANARY))),
                               match="refusing to load")
    for protocol in (0, 4):
        def real(d, protocol=protocol):
            return pickle.dumps({"w": _Evil(f"touch {d / CANARY}")}, protocol=protocol)
        cases += [Case(f"code-pickler-p{protocol}-zip", fault, lambda d, r=real: zip_bytes(r(d)), "refusing to load"),
                  Case(f"code-pickler-p{protocol}-legacy", fault, lambda d, r=real: legacy_bytes(r(d)),
                       "refusing to load")]
    evil_header = lambda d: pickle.dumps(_Evil(f"touch {d / CANARY}"), protocol=2)  # noqa: E731
    cases += [
        Case("code-in-legacy-magic", fault, lambda d: legacy_bytes(state(), header=evil_header(d) + legacy_header()[
            len(pickle.dumps(LEGACY_MAGIC, protocol=2)):]), "refusing to load"),
        Case("code-in-legacy-sys-info", fault, lambda d: legacy_bytes(state(), header=legacy_header()[
            :-len(pickle.dumps(SYS_INFO, protocol=2))] + evil_header(d)), "refusing to load"),
        Case("code-in-legacy-key-list", fault, lambda d: legacy_header() + state() + evil_header(d)
             + struct.pack("<q", 16) + FLOATS.tobytes(), "refusing to load"),
    ]
    return cases


# -- tensor layout: sizes, strides, offsets and storages
_DEEP_TUPLE = EMPTY_TUPLE + b"\x85" * 100_000  # a tuple nested 100,000 deep (TUPLE1 repeated)
_LAYOUTS = {  # name -> (the hostile tensor entry, what the refusal says)
    "negative-stride": (tensor(size=(4,), stride=(-1,)), "integer from 0"),
    "negative-offset": (tensor(offset=-8, size=(4,)), "integer from 0"),
    "huge-stride": (tensor(size=(2,), stride=(2**40,)), "out of bounds"),
    "huge-offset": (tensor(offset=2**61, size=(1,)), "out of bounds"),
    "stride-over-2^62": (tensor(size=(2,), stride=(2**64,)), "integer from 0"),
    "offset-at-end": (tensor(offset=16, size=(1,)), "out of bounds"),
    "past-the-end": (tensor(size=(4, 4), stride=(5, 1)), "out of bounds"),
    "size-overflow": (tensor(size=(2**62, 2**62), stride=(1, 1)), "limit"),
    "size-2^1986-bytes": (tensor(size=(2**62,) * 32, stride=(0,) * 32), "2\\^1986 bytes or more"),
    "5000-digit-stride": (tensor(size=(2,), stride=(2**16600,)), "integer of 16601 bits"),
    "negative-size": (tensor(size=(-1,), stride=(1,)), "integer from 0"),
    "stride-0-8GB": (tensor(size=(2**31,), stride=(0,)), "limit"),
    "rank-mismatch": (tensor(size=(4, 4), stride=(1,)), "same length"),
    "float-size": (tensor(size=(b"G" + struct.pack(">d", 4.0),), stride=(1,)), "a float"),
    "bool-size": (tensor(size=(b"\x88",), stride=(1,)), "a bool"),
    "size-is-text": (tensor(size=text("16"), stride=(1,)), "same length"),
    "40-dims": (tensor(size=(1,) * 40, stride=(1,) * 40), "up to 32"),
    "deep-tuple-size": (tensor(size=(_DEEP_TUPLE,), stride=(1,)), "a tuple"),
    "storage-is-int": (tensor(num(3)), "where a storage belongs"),
    "storage-too-big": (tensor(storage(numel=32), size=(32,)), "needs|declared"),
    "storage-numel-2^62": (tensor(storage(numel=2**62)), "needs|declared"),
    "storage-numel-negative": (tensor(storage(numel=-1)), "persistent id"),
    "storage-two-dtypes": (tensor(storage(stype="DoubleStorage")), "declared as"),
    "storage-missing": (tensor(storage(key="7")), "no data|has no"),
}


def views_pickle(entries: dict) -> bytes:
    """A state dict of views of storage '0' (FLOATS): the first entry's pickle memoises the storage as 1."""
    first, *rest = entries.items()
    body = {first[0]: tensor(storage() + b"q\x01", *first[1])}
    body.update({name: tensor(b"h\x01", *layout) for name, layout in rest})
    return pickled(dict_of(body))


_GRID = FLOATS.reshape(4, 4)
GENUINE_VIEWS = {  # name -> ((offset, size, stride), the values it must load as)
    "rows": ((0, (4, 4), (4, 1)), _GRID),
    "every-fifth": ((2, (3,), (5,)), FLOATS[2::5]),
    "transposed": ((0, (4, 4), (1, 4)), _GRID.T),
    "expanded": ((0, (1000, 16), (0, 1)), np.broadcast_to(FLOATS, (1000, 16))),
    "unused-stride": ((3, (1, 2), (2**62, 1)), FLOATS[3:5].reshape(1, 2)),
    "empty": ((16, (0, 5), (5, 1)), np.zeros((0, 5), np.float32)),
    "scalar": ((7, (), ()), np.float32(7)),
}


def genuine_views() -> tuple[bytes, dict]:
    """(a pickle of the GENUINE_VIEWS tensors, all on storage '0' holding FLOATS; the values they load as)."""
    return (views_pickle({name: layout for name, (layout, _) in GENUINE_VIEWS.items()}),
            {name: values for name, (_, values) in GENUINE_VIEWS.items()})


def _amplifying_views(count: int, numel: int) -> bytes:
    """`count` tensors each viewing all of one `numel`-float storage: logical bytes far above the file's."""
    return views_pickle({f"t{i}": (0, (numel,), (1,)) for i in range(count)}).replace(storage(), storage(numel=numel))


def _layout_cases() -> list[Case]:
    cases = []
    for name, (entry, match) in _LAYOUTS.items():
        cases += _both_formats(f"layout-{name}", "tensor layout", lambda d, e=entry: state(bad=e), match)
    cases += _both_formats("shared-views-genuine", "shared storage", lambda d: genuine_views()[0],
                           expected=lambda: genuine_views()[1])
    numel = 1 << 18  # 1 MiB of float32
    big = np.zeros(numel, "<f4").tobytes()
    cases += [
        Case("shared-views-amplify-zip", "shared storage", lambda d: zip_bytes(_amplifying_views(2000, numel),
                                                                               {"0": big}), "limit"),
        Case("shared-views-amplify-legacy", "shared storage", lambda d: legacy_bytes(
            _amplifying_views(2000, numel), (("0", big, numel),)), "limit"),
        Case("legacy-view-out-of-bounds", "tensor layout", lambda d: legacy_bytes(state(bad=tensor(
            tup(text("storage"), glob("torch", "FloatStorage"), text("0"), text("cpu"), num(16),
                tup(text("0v"), num(10), num(10))) + BINPERSID, size=(4,)))), "does not fit"),
    ]
    return cases


# -- the zip container
def _bomb_member(name: str, nbytes: int = 1 << 30, *, declared: int | None = None) -> tuple:
    stream, crc = deflated_zeros(nbytes)
    return member(name, stream, method=8, size=nbytes if declared is None else declared, crc=crc)


def _genuine_zip() -> bytes:
    return zip_bytes(state())


def _many_bombs(count: int = 64, nbytes: int = 16 << 20) -> bytes:
    """`count` storages, each a 16 MiB member inflated from 16 KiB of deflate stream."""
    numel = nbytes // 4
    entries = {f"t{i}": tensor(storage(key=str(i), numel=numel)) for i in range(count)}
    return raw_zip([member("archive/data.pkl", pickled(dict_of(entries)))]
                   + [_bomb_member(f"archive/data/{i}", nbytes) for i in range(count)])


def _directory_size_lie() -> bytes:
    data = bytearray(_genuine_zip())
    data[-10:-6] = struct.pack("<I", 2**31)  # the end record's central-directory size
    return bytes(data)


def _zip_cases() -> list[Case]:
    fault, ok = "zip container", state()
    cases = [
        Case("zip-bomb-storage", fault, lambda d: raw_zip([
            member("archive/data.pkl", state().replace(storage(), storage(numel=1 << 28))),
            _bomb_member("archive/data/0")]), "limit"),
        Case("zip-bomb-pickle", fault, lambda d: raw_zip([_bomb_member("archive/data.pkl")]), "limit"),
        Case("zip-bomb-lying-size", fault, lambda d: raw_zip([
            member("archive/data.pkl", ok), _bomb_member("archive/data/0", declared=64)]), "damaged|CRC"),
        Case("zip-many-bombs", fault, lambda d: _many_bombs(), "limit"),
        Case("zip-directory-size-lie", fault, lambda d: _directory_size_lie(), "limit|damaged|end record"),
        Case("zip-truncated-half", fault, lambda d: _genuine_zip()[: len(_genuine_zip()) // 2], "truncated"),
        Case("zip-truncated-end", fault, lambda d: _genuine_zip()[:-10], "truncated"),
        Case("zip-truncated-header", fault, lambda d: _genuine_zip()[:30], "truncated"),
        Case("zip-just-magic", fault, lambda d: b"PK\x03\x04", "truncated"),
        Case("zip-garbage-after-magic", fault, lambda d: b"PK\x03\x04" + np.random.default_rng(0).bytes(4000),
             "truncated"),
        Case("zip-encrypted-storage", fault, lambda d: raw_zip([
            member("archive/data.pkl", ok), member("archive/data/0", FLOATS.tobytes(), flags=1)]), "encrypted"),
        Case("zip-encrypted-pickle", fault, lambda d: raw_zip([member("archive/data.pkl", ok, flags=1)]),
             "encrypted"),
        Case("zip-bzip2", fault, lambda d: raw_zip([member("archive/data.pkl", ok, method=12)]), "method 12"),
        Case("zip-aes", fault, lambda d: raw_zip([member("archive/data.pkl", ok, method=99)]), "method 99"),
        Case("zip-corrupt-deflate", fault, lambda d: raw_zip([
            member("archive/data.pkl", ok),
            member("archive/data/0", np.random.default_rng(1).bytes(64), method=8, size=64)]), "damaged"),
        Case("zip-crc-mismatch", fault, lambda d: raw_zip([
            member("archive/data.pkl", ok), member("archive/data/0", FLOATS.tobytes(), crc=1)]), "damaged|CRC"),
        Case("zip-no-pickle", fault, lambda d: raw_zip([member("archive/data/0", FLOATS.tobytes())]),
             "0 data.pkl"),
        Case("zip-two-pickles", fault, lambda d: raw_zip([member("a/data.pkl", ok), member("b/data.pkl", ok)]),
             "2 data.pkl"),
        Case("zip-big-endian", fault, lambda d: zip_bytes(ok, byteorder="big"), "byte order"),
        Case("zip-deflated-genuine", fault, lambda d: zip_bytes(ok, method=zipfile.ZIP_DEFLATED),
             expected=_ok_only),
        Case("zip-20000-members", fault, lambda d: raw_zip(
            [member(f"archive/extra/{i}", b"") for i in range(20000)]
            + [member("archive/data.pkl", ok), member("archive/data/0", FLOATS.tobytes())]), expected=_ok_only),
    ]
    return cases


# -- the legacy stream
def _legacy_cases() -> list[Case]:
    fault, ok = "legacy stream", state()
    genuine = legacy_bytes(ok)
    data = FLOATS.tobytes()
    return [
        Case("legacy-bad-magic", fault, lambda d: legacy_bytes(ok, header=legacy_header(magic=12345)), "magic"),
        Case("legacy-magic-text", fault, lambda d: legacy_bytes(ok, header=legacy_header(magic="torch")), "magic"),
        Case("legacy-protocol-1002", fault, lambda d: legacy_bytes(ok, header=legacy_header(protocol=1002)),
             "version 1002"),
        Case("legacy-big-endian", fault, lambda d: legacy_bytes(ok, header=legacy_header(
            sys_info={**SYS_INFO, "little_endian": False})), "big-endian"),
        Case("legacy-truncated-pickle", fault, lambda d: genuine[: len(legacy_header()) + len(ok) // 2], "truncated"),
        Case("legacy-truncated-storage", fault, lambda d: genuine[:-10], "truncated"),
        Case("legacy-no-key-list", fault, lambda d: legacy_header() + ok, "truncated"),
        Case("legacy-count-negative", fault, lambda d: legacy_bytes(ok, (("0", data, -1),)), "declared"),
        Case("legacy-count-2^62", fault, lambda d: legacy_bytes(ok, (("0", data, 2**62),)), "declared"),
        Case("legacy-count-mismatch", fault, lambda d: legacy_bytes(ok, (("0", data, 8),)), "declared"),
        Case("legacy-undeclared-key", fault, lambda d: legacy_bytes(ok, (("0", data, 16), ("9", data, 16))),
             "no tensor declared"),
        Case("legacy-duplicate-key", fault, lambda d: legacy_bytes(ok, (("0", data, 16), ("0", data, 16))),
             "twice"),
        Case("legacy-keys-not-list", fault, lambda d: legacy_bytes(ok, keys={"0": 1}), "key list"),
        Case("plain-pickle", fault, lambda d: pickle.dumps({"a": 1}, protocol=2), "magic"),
        Case("numpy-pickle", fault, lambda d: pickle.dumps({"w": np.zeros(3)}, protocol=2), "refusing to load"),
        Case("empty-file", fault, lambda d: b"", "empty file"),
        Case("html-page", fault, lambda d: b"<!DOCTYPE html><html><body>404</body></html>", "HTML"),
        Case("random-bytes", fault, lambda d: np.random.default_rng(2).bytes(3000), "not a torch checkpoint"),
        Case("safetensors", fault, lambda d: struct.pack("<Q", 2) + b"{}", "safetensors"),
        Case("tar-archive", fault, lambda d: bytes(257) + b"ustar" + bytes(250), "tar"),
        Case("gzip-file", fault, lambda d: b"\x1f\x8b\x08\x00" + bytes(20), "gzip"),
    ]


# -- the pickle machine: memo, nesting, state-setting opcodes, calls, persistent ids, the stream
def _laughs(levels: int = 60, kind: str = "list") -> bytes:
    """A DAG of memo references: each level a container holding the previous one twice (2^levels paths)."""
    body = EMPTY_LIST + b"r" + struct.pack("<I", 0)
    for i in range(1, levels):
        get = b"j" + struct.pack("<I", i - 1)
        inner = EMPTY_LIST + MARK + get + get + APPENDS if kind == "list" else dict_of({"a": get, "b": get})
        body += POP + inner + b"r" + struct.pack("<I", i)
    return body


def _deep_lists(depth: int) -> bytes:
    """A list nested `depth` deep: `depth` empty lists pushed, then each appended into the one below."""
    return EMPTY_LIST * depth + APPEND * (depth - 1)


_ORDERED = call(glob("collections", "OrderedDict"))
STATE_SETTING = {  # name -> the hostile entry: each tries to set state on something it must not touch
    "build-on-ordereddict-class": glob("collections", "OrderedDict") + dict_of({"x": num(1)}) + BUILD,
    "build-on-rebuild-function": glob("torch._utils", "_rebuild_tensor_v2") + dict_of({"__code__": num(1)}) + BUILD,
    "build-on-storage-type": glob("torch", "FloatStorage") + dict_of({"dtype": text("float64")}) + BUILD,
    "build-on-tensor": tensor() + dict_of({"x": num(1)}) + BUILD,
    "build-on-list": EMPTY_LIST + dict_of({"x": num(1)}) + BUILD,
    "build-slot-state": _ORDERED + tup(NONE, dict_of({"x": num(1)})) + BUILD,
    "setitem-on-list": EMPTY_LIST + text("k") + num(1) + SETITEM,
    "setitems-on-global": glob("collections", "OrderedDict") + MARK + text("k") + num(1) + SETITEMS,
    "setitem-on-storage-type": glob("torch", "FloatStorage") + text("dtype") + num(1) + SETITEM,
    "append-on-dict": EMPTY_DICT + num(1) + APPEND,
    "append-on-global": glob("torch._utils", "_rebuild_tensor_v2") + num(1) + APPEND,
    "appends-on-tuple": EMPTY_TUPLE + MARK + num(1) + APPENDS,
    "additems-on-list": EMPTY_LIST + MARK + num(1) + b"\x90",
    "reduce-on-text": text("x") + tup() + REDUCE,
    "reduce-on-storage-type": call(glob("torch", "FloatStorage"), num(4)),
    "reduce-args-not-tuple": glob("collections", "OrderedDict") + EMPTY_LIST + REDUCE,
    "ordereddict-with-args": call(glob("collections", "OrderedDict"), EMPTY_LIST),
    "rebuild-wrong-arity": call(glob("torch._utils", "_rebuild_tensor_v2"), storage()),
    "rebuild-v3-dtype-text": call(glob("torch._utils", "_rebuild_tensor_v3"), storage(), num(0), tup(num(1)),
                                  tup(num(1)), NEWFALSE, _ORDERED, text("float32")),
    "parameter-of-int": call(glob("torch._utils", "_rebuild_parameter"), num(1), NEWFALSE, _ORDERED),
    "pid-int": num(3) + BINPERSID,
    "pid-short-tuple": tup(text("storage")) + BINPERSID,
    "pid-module-tag": tup(text("module"), NONE, text("x.py"), text("import os"), num(0)) + BINPERSID,
    "pid-bad-storage-type": tup(text("storage"), _ORDERED, text("0"), text("cpu"), num(16)) + BINPERSID,
    "pid-int-key": tup(text("storage"), glob("torch", "FloatStorage"), num(0), text("cpu"), num(16)) + BINPERSID,
    "pid-deep-view": tup(text("storage"), glob("torch", "FloatStorage"), text("0"), text("cpu"), num(16),
                         _DEEP_TUPLE) + BINPERSID,
}
_STREAMS = {  # name -> (a pickle body, what the refusal says)
    "unknown-opcode": (b"\xff", "not a pickle opcode"),
    "persid-text": (b"P0\n", "PERSID"),
    "next-buffer": (b"\x97", "NEXT_BUFFER"),
    "stack-underflow": (POP, "no MARK"),
    "reduce-underflow": (REDUCE, "stack is empty"),
    "memo-undefined": (b"h\x07", "never stored"),
    "long-binget-undefined": (b"j\xff\xff\xff\xff", "never stored"),
    "mark-unclosed": (MARK + num(1), "not a state dict"),
    "dict-odd-items": (EMPTY_DICT + MARK + text("a") + SETITEMS, "key-value"),
    "list-as-key": (EMPTY_DICT + EMPTY_LIST + num(1) + SETITEM, "dict key"),
    "deep-tuple-key": (EMPTY_DICT + _DEEP_TUPLE + num(1) + SETITEM, "dict key"),
    "long4-2GB": (b"\x8b" + struct.pack("<i", 2**31 - 1), "truncated"),
    "long4-negative": (b"\x8b" + struct.pack("<i", -5), "negative length"),
    "binunicode-4GB": (b"X" + struct.pack("<I", 2**32 - 1), "truncated"),
    "binunicode8-2^63": (b"\x8d" + struct.pack("<Q", 2**63), "truncated"),
    "bad-utf8": (b"X\x02\x00\x00\x00\xff\xfe", "utf-8"),
    "int-garbage": (b"Iabc\n", "ValueError"),
    "long-100k-digits": (b"L" + b"9" * 100_000 + b"L\n", "ValueError"),
    "float-garbage": (b"Fnan?\n", "ValueError"),
    "string-unquoted": (b"Sabc\n", "not quoted"),
    "global-no-newline": (b"cos", "never ends"),
    "deep-marks": (MARK * 200_000, "stack is empty"),
    "opcode-spam-lists": (EMPTY_LIST * 3_000_000, "limit"),
    "opcode-spam-memoize": (EMPTY_LIST + b"\x94" * 3_000_000, "limit"),
    "opcode-spam-dup": (EMPTY_LIST + b"2" * 3_000_000, "limit"),
    "laughs-only": (_laughs(), "not a state dict"),
    "int-tensor-name": (EMPTY_DICT + MARK + num(1) + tensor() + SETITEMS, "named by an int"),
    "huge-int-tensor-name": (EMPTY_DICT + MARK + num(2**20000) + tensor() + SETITEMS, "integer of 20001 bits"),
    "bytes-tensor-name": (EMPTY_DICT + MARK + b"C\x01k" + tensor() + SETITEMS, "named by a bytes"),
    "state-dict-is-list": (EMPTY_LIST, "holds a list"),
    "no-tensors": (dict_of({"a": num(1)}), "no tensors"),
}
_TOLERATED = {  # name -> an extra state-dict entry that must cost little and load with the genuine tensor
    "laughs-lists": _laughs(60, "list"),
    "laughs-dicts": _laughs(60, "dict"),
    "deep-lists": _deep_lists(100_000),
    "deep-tuples": _DEEP_TUPLE,
    "frame-2^60": b"\x95" + struct.pack("<Q", 2**60) + num(1),
}


def _machine_cases() -> list[Case]:
    fault = "pickle machine"
    cases = [Case(f"state-{name}-zip", fault, lambda d, e=entry: zip_bytes(state(bad=e)))
             for name, entry in STATE_SETTING.items()]
    cases += [Case(f"state-{name}-legacy", fault, lambda d, e=entry: legacy_bytes(state(bad=e)))
              for name, entry in list(STATE_SETTING.items())[:6]]
    cases += [Case(f"stream-{name}", fault, lambda d, b=body: zip_bytes(pickled(b)), match)
              for name, (body, match) in _STREAMS.items()]
    cases += [Case("stream-protocol-6", fault, lambda d: zip_bytes(pickled(EMPTY_DICT, protocol=6)), "protocol 6")]
    cases += _both_formats("tolerated-wrapped-state-dict", fault, lambda d: pickled(dict_of(
        {"state_dict": dict_of({"ok": tensor()}), "epoch": num(3)})), expected=_ok_only)
    cases += [Case(f"tolerated-{name}-zip", fault, lambda d, e=entry: zip_bytes(state(extra=e)), expected=_ok_only)
              for name, entry in _TOLERATED.items()]
    return cases


# -- dtypes and values: genuine torch files, and non-finite or negative-variance ones
def _torch_bytes(make: Callable[[], dict], zip_format: bool) -> bytes:
    import torch
    buf = io.BytesIO()
    with warnings.catch_warnings():  # torch's deprecation of quantized tensors, made here on purpose
        warnings.simplefilter("ignore", UserWarning)
        torch.save(make(), buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _as_numpy(make: Callable[[], dict]) -> Callable[[], dict]:
    def expected():
        import torch
        return {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy() for k, v in make().items()}
    return expected


def _seeded(fn):
    def make():
        import torch
        torch.manual_seed(0)  # modules draw their initial weights from the global generator
        return fn(torch, torch.Generator().manual_seed(0))
    return make


_GENUINE = {
    "bf16": _seeded(lambda t, g: {"w": t.randn(3, 5, generator=g).bfloat16(), "b": t.tensor([1.5, -2.0]).bfloat16()}),
    "dtypes": _seeded(lambda t, g: {"half": t.randn(5, generator=g).half(), "double": t.randn(4, generator=g).double(),
                                    "int8": t.tensor([-3, 7], dtype=t.int8), "bool": t.tensor([True, False]),
                                    "long": t.tensor(7), "complex": t.randn(3, generator=g, dtype=t.complex64)}),
    "views": _seeded(lambda t, g: (lambda base: {"fc.weight": base.t(), "fc.bias": base[2:4, 1],
                                                 "base": base})(t.randn(6, 4, generator=g))),
    "module-state-dict": _seeded(lambda t, g: dict(t.nn.Sequential(t.nn.Conv2d(2, 3, 3), t.nn.BatchNorm2d(3))
                                                   .state_dict())),
    "parameter-expanded": _seeded(lambda t, g: {"p": t.nn.Parameter(t.randn(3, generator=g)),
                                                "e": t.ones(1).expand(1000)}),
}
_GENUINE_ZIP_ONLY = {
    "uint16-untyped": _seeded(lambda t, g: {"u": t.tensor([1, 2, 65535], dtype=t.int32).to(t.uint16)}),
}
_UNSUPPORTED = {  # name -> (torch dict, what the refusal names)
    "float8": (_seeded(lambda t, g: {"w": t.zeros(4).to(t.float8_e4m3fn)}), "float8_e4m3fn"),
    "qint8": (_seeded(lambda t, g: {"w": t.quantize_per_tensor(t.ones(4), 0.1, 0, t.qint8)}), "quantized"),
    "sparse": (_seeded(lambda t, g: {"w": t.eye(3).to_sparse()}), "sparse"),
}


def _poisoned(dtype: str, value: float, key: str = "layer.weight"):
    def make(t, g):
        w = t.randn(4, generator=g).abs()
        w[2] = value
        return {"layer.bias": t.zeros(4), key: w.to(getattr(t, dtype))}
    return _seeded(make)


_BAD_VALUES = {  # name -> (torch dict, the tensor the refusal names)
    "nan-weight": (_poisoned("float32", float("nan")), "layer.weight"),
    "inf-weight": (_poisoned("float32", float("inf")), "layer.weight"),
    "nan-running-var": (_poisoned("float32", float("nan"), "bn.running_var"), "bn.running_var"),
    "negative-running-var": (_poisoned("float32", -1.0, "bn.running_var"), "bn.running_var.*negative"),
    "nan-bf16": (_poisoned("bfloat16", float("nan")), "layer.weight"),
    "inf-fp16": (_poisoned("float16", float("inf")), "layer.weight"),
    "nan-complex": (_seeded(lambda t, g: {"c": t.tensor([complex(float("nan"), 0)])}), "'c'"),
}


def _torch_file(make: Callable[[], dict], fmt: str) -> Callable[[Path], bytes]:
    return lambda d: _torch_bytes(make, fmt == "zip")


def _value_cases() -> list[Case]:
    cases = []
    for name, make in _GENUINE.items():
        cases += [Case(f"genuine-{name}-{fmt}", "dtypes and values", _torch_file(make, fmt), expected=_as_numpy(make),
                       needs_torch=True) for fmt in ("zip", "legacy")]
    cases += [Case(f"genuine-{name}-zip", "dtypes and values", _torch_file(make, "zip"), expected=_as_numpy(make),
                   needs_torch=True) for name, make in _GENUINE_ZIP_ONLY.items()]
    cases += [Case(f"unsupported-{name}-zip", "dtypes and values", _torch_file(make, "zip"), match, needs_torch=True)
              for name, (make, match) in _UNSUPPORTED.items()]
    for name, (make, match) in _BAD_VALUES.items():
        cases += [Case(f"values-{name}-{fmt}", "non-finite values", _torch_file(make, fmt), match, needs_torch=True)
                  for fmt in ("zip", "legacy")]
    return cases


def pth_cases() -> list[Case]:
    return _code_cases() + _layout_cases() + _zip_cases() + _legacy_cases() + _machine_cases() + _value_cases()


# -- darknet `.weights`: a tiny layout (conv_0 + bn_0, conv_2 + bn_2, conv_10 with bias; 200 floats)
_BN = ("beta", "gamma", "mean", "var")
TINY_LAYOUT = ([(f"bn_0.{k}", (4,)) for k in _BN] + [("conv_0.kernel", (4, 3, 3, 3))]
               + [(f"bn_2.{k}", (5,)) for k in _BN] + [("conv_2.kernel", (5, 4, 1, 1))]
               + [("conv_10.bias", (6,)), ("conv_10.kernel", (6, 5, 1, 1))])


def tiny_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: (rng.uniform(0.5, 1.5, shape) if len(shape) == 1 else rng.normal(0, 1, shape)).astype(np.float32)
            for name, shape in TINY_LAYOUT}


def weights_bytes(tensors=None, *, version=(0, 2, 0), seen=1234, extra: bytes = b"") -> bytes:
    tensors = tiny_tensors() if tensors is None else tensors
    seen_type = "<i8" if version[0] * 10 + version[1] >= 2 else "<i4"
    floats = np.concatenate([tensors[name].ravel() for name, _ in TINY_LAYOUT]).astype("<f4")
    return np.array(version, "<i4").tobytes() + np.array([seen], seen_type).tobytes() + floats.tobytes() + extra


def _poke(name: str, index: int, value: float) -> bytes:
    tensors = tiny_tensors()
    tensors[name].flat[index] = value
    return weights_bytes(tensors)


def weights_cases() -> list[Case]:
    def case(name, build, match=None, expected=None):
        return Case(f"weights-{name}", "darknet .weights", lambda d: build(), match, expected, ".weights")

    genuine = weights_bytes()
    return [
        case("genuine", lambda: genuine, expected=tiny_tensors),
        case("old-header", lambda: weights_bytes(version=(0, 1, 0)), expected=tiny_tensors),
        case("huge-seen", lambda: weights_bytes(seen=2**63 - 1), expected=tiny_tensors),
        case("empty", lambda: b"", "too short"),
        case("8-bytes", lambda: genuine[:8], "too short"),
        case("no-seen", lambda: genuine[:14], "too short"),
        case("negative-version", lambda: weights_bytes(version=(-1, 2, 0)), "no darknet version"),
        case("huge-version", lambda: weights_bytes(version=(2**31 - 1, 2**31 - 1, 0)), "no darknet version"),
        case("a-pth-file", lambda: zip_bytes(state()), "no darknet version"),
        case("odd-bytes", lambda: genuine + b"\x00\x00", "whole number of floats"),
        case("truncated", lambda: genuine[:-4], "ends inside tensor 'conv_10.kernel'"),
        case("header-only", lambda: genuine[:20], "ends inside tensor 'bn_0.beta'"),
        case("extra-floats", lambda: weights_bytes(extra=bytes(12)), "3 floats left over"),
        case("zeros-1MB", lambda: bytes(1 << 20), "left over"),
        case("nan-kernel", lambda: _poke("conv_0.kernel", 5, np.nan), "'conv_0.kernel'.*non-finite"),
        case("inf-bias", lambda: _poke("conv_10.bias", 0, np.inf), "'conv_10.bias'.*non-finite"),
        case("nan-var", lambda: _poke("bn_2.var", 1, np.nan), "'bn_2.var'.*non-finite"),
        case("negative-var", lambda: _poke("bn_0.var", 3, -0.5), "'bn_0.var'.*negative"),
        case("nan-gamma", lambda: _poke("bn_2.gamma", 0, np.nan), "'bn_2.gamma'"),
    ]
