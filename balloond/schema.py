"""Versioned JSON documents of frozen dataclasses, with fds beside them: the shape of the
state record (:mod:`balloond.record`), written as data.

Each field of a record dataclass carries, in its ``metadata`` (:func:`meta`), the spec that
writes it and reads it back, checking it: an integer in a range, a string of bounded length,
a list, a mapping, a nested record, or an fd. An fd is written as its index in the list of
fds that travels beside the document, and the document's ``fds`` table gives each index its
*role*, the path of the field that holds it (``connection.backend.vrings[2].call``), and
optionally the *key* its keeper holds it by (systemd's ``FDNAME=``). A record class may
define ``_validate``, raising ValueError, for what no single field can check.

Versioning: ``format`` names the document, ``version`` is its major version and ``minor`` its
minor version. A reader refuses a newer major version. It reads an equal or older minor
version strictly: a missing field (unless a later minor version added it: ``since``), an
unknown field, an fd no field names, are errors, since no writer of that version wrote
such a document. It reads a newer minor version leaving alone the fields and fds it does not
know: a minor version may only add what an older reader can safely ignore; anything else
takes a new major version. Whatever else a reader cannot account for raises
:class:`RecordError`, whose message is one line naming the field: refused, never guessed at.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from balloond.errors import BalloondError

#: How a writer names each fd for its keeper: by number, or by number and role (the path
#: of the field that holds it).
Keys = Mapping[int, str] | Callable[[int, str], str]
#: The most a document may take; far above a real one (a few KiB per device).
MAX_DOCUMENT_BYTES = 64 << 20
_HEADER_KEYS = frozenset({"format", "version", "minor", "fds"})


class RecordError(BalloondError):
    """A state record this balloond cannot read, or one that does not fit its fds."""


class _Out:
    """The fds of a document being written, in table order, each with its slot."""

    def __init__(self, keys: Keys | None) -> None:
        self.fds: list[int] = []
        self.slots: list[FdSlot] = []
        self.keys = keys

    def add(self, fd: int, role: str) -> int:
        if type(fd) is not int or fd < 0:
            raise ValueError(f"{role}: {fd!r} is not an fd")
        self.fds.append(fd)
        keys = self.keys
        key = None if keys is None else keys(fd, role) if callable(keys) else keys[fd]
        self.slots.append(FdSlot(role, key))
        return len(self.fds) - 1


class _In:
    """The fds passed with a document, taken by index as its fields name them."""

    def __init__(self, fds: Sequence[int], slots: Sequence[FdSlot], minor: int, ours: int) -> None:
        if len(fds) != len(slots):
            raise RecordError(f"fds: the record names {len(slots)} fds, {len(fds)} were passed")
        if any(type(fd) is not int or fd < 0 for fd in fds):
            raise ValueError(f"not a list of fds: {list(fds)!r}")
        self.fds, self.slots, self.minor = fds, slots, minor
        #: A newer minor version: fields and fds this version does not know are left alone.
        self.lenient = minor > ours
        self.taken: set[int] = set()

    def take(self, raw: object, role: str, path: str) -> int:
        if not self.fds:
            raise RecordError(f"{path}: fd {raw!r} is out of range (no fds)")
        index = _int(raw, path, len(self.fds) - 1)
        if self.slots[index].role != role:
            raise RecordError(f"{path}: fd {index} is {self.slots[index].role!r}, not {role!r}")
        if index in self.taken:
            raise RecordError(f"{path}: fd {index} is named twice")
        self.taken.add(index)
        return self.fds[index]

    def check_all_taken(self) -> None:
        unused = sorted(set(range(len(self.fds))) - self.taken)
        if unused and not self.lenient:
            raise RecordError(f"fds: fd {unused[0]} ({self.slots[unused[0]].role}) is unused")


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


# --- specs ------------------------------------------------------------------------------------

Load = Callable[[object, str], Any]


class Spec:
    """How one field is written (``dump``) and read (``load``, which checks it); scalars are
    plain specs of two functions, containers subclass this."""

    def __init__(
        self, load: Load = lambda raw, path: raw, dump: Callable[[Any], object] = lambda v: v
    ) -> None:
        self._load, self._dump = load, dump

    def dump(self, value: Any, out: _Out, path: str) -> object:
        return self._dump(value)

    def load(self, raw: object, into: _In, path: str) -> Any:
        return self._load(raw, path)


def _kind(raw: object) -> str:
    return "null" if raw is None else type(raw).__name__


def _int(raw: object, path: str, hi: int, lo: int = 0) -> int:
    if type(raw) is not int:
        raise RecordError(f"{path}: expected an integer, found {_kind(raw)}")
    if not lo <= raw <= hi:
        raise RecordError(f"{path}: {raw} is outside {lo}..{hi}")
    return raw


def _bool(raw: object, path: str) -> bool:
    if not isinstance(raw, bool):
        raise RecordError(f"{path}: expected true or false, found {_kind(raw)}")
    return raw


def _str(raw: object, path: str, limit: int) -> str:
    if not isinstance(raw, str):
        raise RecordError(f"{path}: expected a string, found {_kind(raw)}")
    if len(raw) > limit:
        raise RecordError(f"{path}: longer than {limit} characters")
    return raw


def _float(raw: object, path: str) -> float:
    """A finite number >= 0."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise RecordError(f"{path}: expected a number, found {_kind(raw)}")
    if not math.isfinite(raw) or raw < 0:
        raise RecordError(f"{path}: {raw} is not a finite number >= 0")
    return float(raw)


def _hex(raw: object, path: str, digits: int) -> int:
    text = _str(raw, path, digits)
    if not text or text.strip("0123456789abcdef") or (len(text) > 1 and text.startswith("0")):
        raise RecordError(f"{path}: not a number in lower-case hex")
    return int(text, 16)


def _sha256(raw: object, path: str) -> str:
    text = _str(raw, path, 64)
    if len(text) != 64 or text.strip("0123456789abcdef"):
        raise RecordError(f"{path}: not a SHA-256 digest in hex")
    return text


def Int(hi: int, lo: int = 0) -> Spec:
    return Spec(lambda raw, path: _int(raw, path, hi, lo))


def Str(limit: int = 4096) -> Spec:
    return Spec(lambda raw, path: _str(raw, path, limit))


def Named(enum: type[Enum]) -> Spec:
    """A member of ``enum``, by its name."""

    def load(raw: object, path: str) -> Enum:
        name = _str(raw, path, 64)
        if name not in enum.__members__:
            raise RecordError(f"{path}: unknown {enum.__name__} {name!r}")
        return enum[name]

    return Spec(load, lambda value: value.name)


ANY = Spec()
BOOL = Spec(_bool)
FLOAT = Spec(_float)
#: A non-negative integer of any size, in hex: a 1 GiB page's mask of ballooned pieces has
#: 262,144 bits, past what int-to-decimal conversion allows.
HEX = Spec(lambda raw, path: _hex(raw, path, 1 << 17), lambda value: f"{value:x}")
SHA256 = Spec(_sha256)
U8, U16, U32, U64 = Int(0xFF), Int(0xFFFF), Int(0xFFFF_FFFF), Int((1 << 64) - 1)


class Fd(Spec):
    """An fd, written as its index in the fd list; its role is the field's path."""

    def dump(self, value: Any, out: _Out, path: str) -> object:
        return out.add(value, path)

    def load(self, raw: object, into: _In, path: str) -> int:
        return into.take(raw, path, path)


class Opt(Spec):
    """The inner spec's value, or None (``null``)."""

    def __init__(self, inner: Spec) -> None:
        self.inner = inner

    def dump(self, value: Any, out: _Out, path: str) -> object:
        return None if value is None else self.inner.dump(value, out, path)

    def load(self, raw: object, into: _In, path: str) -> Any:
        return None if raw is None else self.inner.load(raw, into, path)


class Seq(Spec):
    """A tuple, as a list of at most ``limit`` items (each one once, with ``unique``)."""

    def __init__(self, inner: Spec, limit: int = 1 << 20, *, unique: bool = False) -> None:
        self.inner, self.limit, self.unique = inner, limit, unique

    def dump(self, value: Any, out: _Out, path: str) -> object:
        inner = self.inner
        if type(inner) is Spec:  # a scalar: no path needed (only an fd's role is one)
            return [inner._dump(item) for item in value]
        return [inner.dump(item, out, _join(path, i)) for i, item in enumerate(value)]

    def load(self, raw: object, into: _In, path: str) -> tuple[Any, ...]:
        if not isinstance(raw, list):
            raise RecordError(f"{path}: expected a list, found {_kind(raw)}")
        if len(raw) > self.limit:
            raise RecordError(f"{path}: {len(raw)} items, more than {self.limit}")
        items = tuple(self.inner.load(item, into, _join(path, i)) for i, item in enumerate(raw))
        if self.unique and len(set(items)) != len(items):
            raise RecordError(f"{path}: an item appears twice")
        return items


class Map(Spec):
    """A mapping, as a tuple of (key, value) pairs with distinct keys (lists of two in JSON,
    whose object keys could only be strings)."""

    def __init__(self, key: Spec, value: Spec) -> None:
        self.key, self.value = key, value

    def dump(self, value: Any, out: _Out, path: str) -> object:
        key, item = self.key, self.value
        if type(key) is Spec and type(item) is Spec:  # scalars (every map a record has)
            return [[key._dump(k), item._dump(v)] for k, v in value]
        return [[key.dump(k, out, path), item.dump(v, out, path)] for k, v in value]

    def load(self, raw: object, into: _In, path: str) -> tuple[tuple[Any, Any], ...]:
        pairs: dict[Any, Any] = {}
        for i, item in enumerate(Seq(ANY).load(raw, into, path)):
            if not isinstance(item, list) or len(item) != 2:
                raise RecordError(f"{path}[{i}]: expected a [key, value] pair")
            key = self.key.load(item[0], into, f"{path}[{i}][0]")
            if key in pairs:
                raise RecordError(f"{path}: key {key!r} appears twice")
            pairs[key] = self.value.load(item[1], into, f"{path}[{i}][1]")
        return tuple(pairs.items())


class Rec(Spec):
    """A record dataclass, as an object of its fields."""

    def __init__(self, cls: type[Any], extra: frozenset[str] = frozenset()) -> None:
        self.cls, self.extra = cls, extra
        #: (name, spec, the minor version that added it) of each field, in order.
        self.fields = [(f.name, f.metadata["spec"], f.metadata["since"]) for f in fields(cls)]

    def dump(self, value: Any, out: _Out, path: str) -> object:
        prefix = f"{path}." if path else ""
        return {
            name: spec._dump(getattr(value, name))
            if type(spec) is Spec
            else spec.dump(getattr(value, name), out, prefix + name)
            for name, spec, _ in self.fields
        }

    def load(self, raw: object, into: _In, path: str) -> Any:
        where = path or "record"
        if not isinstance(raw, dict):
            raise RecordError(f"{where}: expected an object, found {_kind(raw)}")
        values: dict[str, Any] = {}
        for name, spec, since in self.fields:
            if name not in raw:
                if since > into.minor:  # added by a later minor version: absent is its default
                    continue
                raise RecordError(f"{_join(path, name)}: missing")
            values[name] = spec.load(raw[name], into, _join(path, name))
        unknown = sorted(set(raw) - set(values) - self.extra)
        if unknown and not into.lenient:
            raise RecordError(f"{where}: unknown field {unknown[0]!r} for its version")
        value = self.cls(**values)
        try:
            getattr(value, "_validate", lambda: None)()
        except ValueError as error:
            raise RecordError(f"{where}: {error}") from None
        return value


_RECS: dict[tuple[type[Any], frozenset[str]], Rec] = {}


def _rec(cls: type[Any], extra: frozenset[str] = frozenset()) -> Rec:
    """The spec of a top-level record class, made once."""
    spec = _RECS.get((cls, extra))
    if spec is None:
        spec = _RECS[cls, extra] = Rec(cls, extra)
    return spec


def dump_part(value: Any) -> object:
    """A record's part (a dataclass holding no fd) as the JSON value a document holds it as:
    the same writing as :func:`encode_document`'s, for documents built of parts."""
    out = _Out(None)
    dumped = _rec(type(value)).dump(value, out, "")
    if out.fds:
        raise ValueError(f"{type(value).__name__} holds fds: not a part to write alone")
    return dumped


def meta(spec: Spec, since: int = 0) -> dict[str, object]:
    """A field's metadata: its spec, and the minor version that added it (a field added after
    x.0 needs a default: a document of an older minor version gets that)."""
    return {"spec": spec, "since": since}


@dataclass(frozen=True)
class FdSlot:
    """An entry of a document's fd table: the fd's role (the path of the field that holds
    it) and the name a keeper holds it by (an ``FDNAME=``), if the writer gave one."""

    role: str = field(metadata=meta(Str(128)))
    key: str | None = field(default=None, metadata=meta(Opt(Str(255))))


# --- documents --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A document's name, and the version this balloond writes and reads."""

    name: str
    version: int
    minor: int


def encode_document(record: Any, form: Format, keys: Keys | None = None) -> tuple[bytes, list[int]]:
    """``record`` as JSON, and its fds in the order its ``fds`` table names them. ``keys``
    names every fd for a keeper that holds fds by name: a mapping by number, or a function of
    the number and the role, called once per fd in table order."""
    out = _Out(keys)
    body = _rec(type(record)).dump(record, out, "")
    assert isinstance(body, dict)
    table = [s.role if s.key is None else {"role": s.role, "key": s.key} for s in out.slots]
    header = {"format": form.name, "version": form.version, "minor": form.minor}
    document = header | body | {"fds": table}
    text = json.dumps(document, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.encode(), out.fds


def decode_document(data: bytes, fds: Sequence[int], cls: type[Any], form: Format) -> Any:
    """Read a document of ``form`` into ``cls``, its fds being ``fds`` in table order."""
    try:
        document = _load(data)
        minor = _check_header(document, form)
        into = _In(fds, _slots(document, minor, form.minor), minor, form.minor)
        record = _rec(cls, _HEADER_KEYS).load(document, into, "")
        into.check_all_taken()
        return record
    except RecordError as error:
        raise RecordError(f"state record: {error}") from None


def document_slots(data: bytes, forms: Sequence[Format]) -> tuple[FdSlot, ...]:
    """The fd table of a document of one of ``forms``, to gather its fds before decoding."""
    try:
        document = _load(data)
        name = document.get("format") if isinstance(document, dict) else None
        form = next((f for f in forms if f.name == name), forms[0])
        return _slots(document, _check_header(document, form), form.minor)
    except RecordError as error:
        raise RecordError(f"state record: {error}") from None


def _load(data: bytes) -> object:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise RecordError(f"{len(data)} bytes, more than a record can be")
    try:
        return json.loads(data.decode(), parse_constant=_no_constant, object_pairs_hook=_no_twice)
    except (UnicodeDecodeError, ValueError) as error:  # a JSONDecodeError is a ValueError
        raise RecordError(f"not a JSON document ({str(error).splitlines()[0]})") from None


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a number a record holds")


def _no_twice(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a field appears twice in one object")
    return result


def _check_header(document: object, form: Format) -> int:
    """Check the format and the version; the document's minor version."""
    if not isinstance(document, dict):
        raise RecordError(f"not a {form.name} record (a JSON {_kind(document)})")
    if document.get("format") != form.name:
        raise RecordError(f"not a {form.name} record (format {document.get('format')!r})")
    version, minor = document.get("version"), document.get("minor")
    if type(version) is not int or type(minor) is not int or minor < 0:
        raise RecordError(f"no valid version ({version!r}.{minor!r})")
    if version > form.version:
        raise RecordError(
            f"written by a newer balloond (version {version}.{minor}); "
            f"this one reads version {form.version} records"
        )
    if version < form.version:
        raise RecordError(f"version {version}.{minor}, older than any balloond wrote")
    return minor


def _slots(document: object, minor: int, ours: int) -> tuple[FdSlot, ...]:
    assert isinstance(document, dict)
    into = _In((), (), minor, ours)
    slots: list[FdSlot] = []
    for i, item in enumerate(Seq(ANY).load(document.get("fds"), into, "fds")):
        raw = {"role": item, "key": None} if isinstance(item, str) else item
        slots.append(Rec(FdSlot).load(raw, into, f"fds[{i}]"))
    return tuple(slots)
