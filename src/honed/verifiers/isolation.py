"""The code under test in a process of its own, behind proxies, so that it cannot reach the verdict.

Stand-alone on purpose (stdlib only): the zygote loads this file's source inside the sandbox.

A sandboxed pytest run is two processes:

- the **tests process** (trusted): pytest, the task's test file and the reporter that writes the
  verdict. `import solution` there gives a `SolutionModule`, whose attributes are proxies: the
  agent's code is never imported into it.
- the **solution process** (untrusted): imports the agent's module and answers requests over a
  socket. It is not the tests process's child, shares no memory with it, holds none of its file
  descriptors (the result pipe in particular) and cannot ptrace it or read its `/proc` entries (the
  tests process is not dumpable). It was forked before the job was read, so the test file is not in
  its memory either, and the tests process deletes the file before the first request lets agent code
  run.

What crosses the socket is data, never code: JSON with tags for tuples, sets, bytes, dicts with any
keys, exceptions, and references. The tests process decodes strictly:

- `None`, bools, numbers, strings, bytes, lists, tuples, dicts, sets of *exactly* those types come
  back as values of the tests process's own types; an instance of a subclass of one of them
  (`IntEnum`, a namedtuple, `Counter`) comes back as the same value in a tests-side subclass whose
  unknown attributes are read from the solution (`point.x`);
- every other object is a `Remote` proxy: attribute access, calls, operators, iteration, `len`,
  `repr`, `hash`, `isinstance(x, Cls)` and context managers go to the solution process. Its
  `==` (and the orderings) against a plain value is *never* asked of the solution: an object that
  claims to equal everything does not make `assert add(1, 1) == 3` pass;
- an exception raised by the solution comes back as the same builtin exception class (or, for
  classes the solution defines, a tests-side stand-in subclassing the same builtin bases, so
  `pytest.raises(ValueError)` and `pytest.raises(solution.MyError)` work), with the solution's
  traceback as a note; `SystemExit` too (pytest fails a test that raises it). Anything else
  (pytest's skip/exit/xfail outcomes, `KeyboardInterrupt`, `GeneratorExit`) arrives as
  `RemoteError`: the solution cannot skip, xfail or end a test, or the session.
- values passed to the solution are copies; callables (a key function, a callback) are passed by
  reference and can only be called. An `AssertionError` raised by the test's own callback fails the
  test even if the solution swallows it; a solution context manager cannot suppress one either.

Limits of the proxies: a solution object is not an instance of a tests-side class (`isinstance(x,
int)` holds only for values), the tests cannot subclass a solution class, and in-place changes the
solution makes to a list the test passed are not seen by the test. What an opaque solution object
says about itself (`len`, `bool`, arithmetic, `str`) is its own word, as it would be in one process:
only `==` and the orderings against plain values are kept from it. Each call into the solution is a
round trip, ~40 µs of the tests process's CPU plus two context switches (0.1-0.25 ms on a busy
2-core machine); the process itself adds ~6 ms of CPU to a test run.
"""

import base64
import builtins
import contextlib
import json
import linecache
import math
import operator
import os
import select
import socket
import struct
import sys
import threading
import traceback
import types

MAX_MESSAGE = 16 << 20  # bytes in one message
MAX_DEPTH = 200  # nesting of one encoded value
MAX_FORWARDED_OUTPUT = 256 << 10  # bytes of the solution's stdout/stderr copied into the tests' streams
_LENGTH = struct.Struct(">I")
_BIG = 1 << 53

# What the solution may not be asked for: pytest and its plugins probe these on every object they
# meet, and the answer must not come from the code under test.
_ALLOWED_DUNDERS = frozenset(
    ("__name__", "__qualname__", "__doc__", "__module__", "__dict__", "__annotations__", "__defaults__",
     "__kwdefaults__", "__slots__", "__version__")
)  # fmt: skip
_DENIED_PREFIXES = ("_pytest", "pytest", "_honed", "_mock", "__pytest")


class RemoteError(Exception):
    """The solution raised something that cannot cross as itself, or its process is gone."""


class ProtocolError(Exception):
    """A malformed message from the other process."""


def denied(name: str) -> bool:
    """Attribute names a proxy answers itself (AttributeError) instead of asking the solution."""
    if name.startswith("__") and name.endswith("__"):
        return name not in _ALLOWED_DUNDERS
    return name.startswith(_DENIED_PREFIXES)


# -- the wire ------------------------------------------------------------------------------------


class Channel:
    """Length-prefixed JSON messages over a socket, with nested requests in both directions.

    `call` sends a request and serves the other side's requests (callbacks) until the answer to its
    own arrives. `side` decodes and encodes values and serves incoming requests. On the tests side,
    `pipes` are the solution's stdout and stderr, read while waiting and copied into `sys.stdout` and
    `sys.stderr` (so pytest captures them with the test that caused them).
    """

    def __init__(self, sock, side, pipes=()):
        self.sock, self.side = sock, side
        self.pipes = {fd: bytearray() for fd in pipes}
        self.pipe_names = dict(zip(pipes, ("stdout", "stderr"), strict=False))
        for fd in pipes:
            os.set_blocking(fd, False)
        self.lock = threading.RLock()
        self.inbox = bytearray()
        self.counter = 0
        self.broken = None
        self.forwarded = 0
        self.pending = None  # tests side: an AssertionError the solution swallowed in a callback

    def call(self, op, **fields):
        __tracebackhide__ = True
        with self.lock:
            if self.broken:
                raise RemoteError(self.broken)
            self.counter += 1
            number = self.counter
            self.send({"op": op, "id": number, **fields})
            while True:
                message = self.receive()
                if "op" in message:
                    self.send(self.side.serve(message))
                    continue
                if message.get("re") != number:
                    self.fail("the solution process answered out of turn")
                break
        self.forward_output()
        if self.pending is not None:
            pending, self.pending = self.pending, None
            raise pending
        if "err" in message:
            raise self.side.decode_error(message["err"])
        if "ok" not in message:
            self.fail("the solution process sent an answer without a value")
        try:
            return self.side.decode(message["ok"])
        except (ProtocolError, RecursionError, ValueError, TypeError, ArithmeticError) as exc:
            self.fail(f"a malformed value from the solution process: {type(exc).__name__}: {exc}")

    def fail(self, reason):
        __tracebackhide__ = True
        self.broken = self.broken or reason
        raise RemoteError(reason)

    def send(self, message):
        self.send_bytes(json.dumps(message, separators=(",", ":")).encode())

    def send_bytes(self, data):
        try:
            self.sock.sendall(_LENGTH.pack(len(data)) + data, socket.MSG_NOSIGNAL)
        except OSError as exc:
            self.fail(f"the solution process is gone ({exc.strerror or exc})")

    def receive(self):
        __tracebackhide__ = True
        fd = self.sock.fileno()
        while True:
            if len(self.inbox) >= 4:
                (size,) = _LENGTH.unpack_from(self.inbox)
                if size > MAX_MESSAGE:
                    self.fail(f"a message of {size} bytes from the solution process (limit {MAX_MESSAGE})")
                if len(self.inbox) >= 4 + size:
                    data = bytes(self.inbox[4 : 4 + size])
                    del self.inbox[: 4 + size]
                    try:
                        message = json.loads(data)
                    except (ValueError, RecursionError):
                        self.fail("a malformed message from the solution process")
                    if not isinstance(message, dict):
                        self.fail("a malformed message from the solution process")
                    return message
            if self.pipes:  # read the solution's output meanwhile: a full pipe would block it
                ready, _, _ = select.select([fd, *self.pipes], [], [])
                for ready_fd in ready:
                    if ready_fd != fd:
                        self.read_pipe(ready_fd)
                if fd not in ready:
                    continue
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                self.fail(f"the solution process is gone ({exc.strerror or exc})")
            if not data:
                self.fail("the solution process is gone: it exited or was killed")
            self.inbox += data

    def read_pipe(self, fd):
        try:
            data = os.read(fd, 1 << 16)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            del self.pipes[fd]  # closed: the solution process is gone
            return False
        room = MAX_FORWARDED_OUTPUT - self.forwarded
        if room > 0:
            self.pipes[fd] += data[:room]
        self.forwarded += len(data)
        return True

    def forward_output(self):
        """Copy what the solution printed (it flushes before answering) into this process's streams."""
        if not self.pipes:
            return
        ready, _, _ = select.select(list(self.pipes), [], [], 0)
        for fd in ready:
            while fd in self.pipes and self.read_pipe(fd):
                pass
        for fd, buffer in self.pipes.items():
            if buffer:
                stream = getattr(sys, self.pipe_names[fd], None)
                try:
                    stream.write(buffer.decode("utf-8", "replace"))
                    stream.flush()
                except Exception:  # a closed or odd stream: the output is evidence only
                    pass
                buffer.clear()


# -- values ----------------------------------------------------------------------------------------

_SCALARS = (type(None), bool, int, float, str)


def _encode_int(value):
    return value if -_BIG < value < _BIG else {"$": "int", "v": hex(value)}


def _decode_int(data):
    text = data.get("v")
    if not isinstance(text, str) or len(text) > 1 << 20:
        raise ProtocolError("bad int")
    return int(text, 16)


class _Side:
    """What both sides share: data by value; subclasses decide what becomes a reference."""

    def __init__(self):
        self.channel = None
        self.objects = {}  # our objects the other side holds, by number
        self.numbers = {}  # id(object) -> number
        self.refs = {}  # the other side's objects we hold, by number

    def number(self, obj):
        number = self.numbers.get(id(obj))
        if number is None:
            number = len(self.objects) + 1
            self.objects[number] = obj  # kept alive, so its id() is never reused within a job
            self.numbers[id(obj)] = number
        return number

    def encode(self, value, depth=0):
        kind = type(value)
        if kind is int:
            return _encode_int(value)
        if kind in _SCALARS:
            return value
        if depth > MAX_DEPTH:
            return self.encode_other(value)
        if kind is list:
            return [self.encode(v, depth + 1) for v in value]
        if kind in (tuple, set, frozenset):
            return {"$": kind.__name__, "v": [self.encode(v, depth + 1) for v in value]}
        if kind is dict:
            return {
                "$": "dict",
                "v": [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in value.items()],
            }
        if kind in (bytes, bytearray):
            return {"$": kind.__name__, "v": base64.b64encode(value).decode()}
        if kind is complex:
            return {"$": "complex", "v": [value.real, value.imag]}
        return self.encode_other(value, depth)

    def decode(self, data, depth=0):
        kind = type(data)
        if kind in _SCALARS:
            return data
        if depth > MAX_DEPTH:
            raise ProtocolError("a value nested too deeply")
        if kind is list:
            return [self.decode(v, depth + 1) for v in data]
        if kind is not dict:
            raise ProtocolError(f"a value of JSON type {kind.__name__}")
        tag = data.get("$")
        if tag in ("tuple", "set", "frozenset"):
            items = data.get("v")
            if not isinstance(items, list):
                raise ProtocolError("bad sequence")
            return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](
                self.decode(v, depth + 1) for v in items
            )
        if tag == "dict":
            pairs = data.get("v")
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise ProtocolError("bad dict")
            return {self.decode(k, depth + 1): self.decode(v, depth + 1) for k, v in pairs}
        if tag in ("bytes", "bytearray"):
            text = data.get("v")
            if not isinstance(text, str):
                raise ProtocolError("bad bytes")
            raw = base64.b64decode(text, validate=True)
            return raw if tag == "bytes" else bytearray(raw)
        if tag == "complex":
            parts = data.get("v")
            if not (
                isinstance(parts, list) and len(parts) == 2 and all(type(p) in (int, float) for p in parts)
            ):
                raise ProtocolError("bad complex")
            return complex(*parts)
        if tag == "int":
            return _decode_int(data)
        if tag == "back":
            number = data.get("id")
            if type(number) is not int or number not in self.objects:
                raise ProtocolError("a reference to an unknown object")
            return self.objects[number]
        return self.decode_other(tag, data, depth)

    def encode_args(self, args, kwargs):
        return {
            "args": [self.encode(a) for a in args],
            "kwargs": [[k, self.encode(v)] for k, v in kwargs.items()],
        }

    def decode_args(self, message):
        args, kwargs = message.get("args", []), message.get("kwargs", [])
        if not isinstance(args, list) or not isinstance(kwargs, list):
            raise ProtocolError("bad arguments")
        decoded = {}
        for pair in kwargs:
            if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
                raise ProtocolError("bad keyword argument")
            decoded[pair[0]] = self.decode(pair[1])
        return [self.decode(a) for a in args], decoded


# -- the tests side (trusted) --------------------------------------------------------------------------

_SESSION = None  # the tests side of this process, once `install` ran


def _session():
    if _SESSION is None:
        raise RemoteError("no solution process")
    return _SESSION


def _op(name, *args):
    __tracebackhide__ = True
    side = _session()
    return side.channel.call("op", name=name, args=[side.encode(a) for a in args])


def is_remote(value):
    """A proxy, or a value that stands for a solution object (the tests-side subclasses)."""
    return isinstance(value, Remote) or type(value) in _HYBRID_TYPES


def _remote_number(value):
    return value._honed_id if isinstance(value, Remote) else value.__dict__["_honed_id"]


def _plain(value, kind):
    """A value the solution returned where Python needs `kind` (int for `__index__`, ...)."""
    if type(value) is kind:
        return value
    if kind is not bool and isinstance(value, kind):
        return kind(value)
    raise TypeError(f"the solution returned {type(value).__name__}, not {kind.__name__}")


class Remote:
    """An object that lives in the solution process. See the module docstring for what it forwards."""

    __slots__ = ("__weakref__", "_honed_id")

    def __init__(self, number):
        object.__setattr__(self, "_honed_id", number)

    def __getattr__(self, name):
        __tracebackhide__ = True
        if denied(name):
            raise AttributeError(name)
        side = _session()
        return side.channel.call("getattr", obj=side.encode(self), name=name)

    def __setattr__(self, name, value):
        __tracebackhide__ = True
        if name == "_honed_id":
            return object.__setattr__(self, name, value)
        side = _session()
        side.channel.call("setattr", obj=side.encode(self), name=name, value=side.encode(value))

    def __delattr__(self, name):
        __tracebackhide__ = True
        side = _session()
        side.channel.call("delattr", obj=side.encode(self), name=name)

    def __call__(self, *args, **kwargs):
        __tracebackhide__ = True
        side = _session()
        return side.channel.call("call", obj=side.encode(self), **side.encode_args(args, kwargs))

    def __repr__(self):
        __tracebackhide__ = True
        try:
            text = _op("repr", self)
        except RemoteError:
            return "<solution object>"
        return _plain(text, str)[:10000]

    def __str__(self):
        __tracebackhide__ = True
        return _plain(_op("str", self), str)

    def __format__(self, spec):
        __tracebackhide__ = True
        return _plain(_op("format", self, spec), str)

    def __bool__(self):
        __tracebackhide__ = True
        return _plain(_op("bool", self), bool)

    def __len__(self):
        __tracebackhide__ = True
        return _plain(_op("len", self), int)

    def __hash__(self):
        __tracebackhide__ = True
        return _plain(_op("hash", self), int)

    def __index__(self):
        __tracebackhide__ = True
        return _plain(_op("index", self), int)

    def __int__(self):
        __tracebackhide__ = True
        return _plain(_op("int", self), int)

    def __float__(self):
        __tracebackhide__ = True
        return _plain(_op("float", self), float)

    def __complex__(self):
        __tracebackhide__ = True
        return _plain(_op("complex", self), complex)

    def __iter__(self):
        __tracebackhide__ = True
        return _op("iter", self)

    def __next__(self):
        __tracebackhide__ = True
        return _op("next", self)

    def __contains__(self, item):
        __tracebackhide__ = True
        return _op("contains", self, item)

    def __getitem__(self, key):
        __tracebackhide__ = True
        return _op("getitem", self, key)

    def __setitem__(self, key, value):
        __tracebackhide__ = True
        _op("setitem", self, key, value)

    def __delitem__(self, key):
        __tracebackhide__ = True
        _op("delitem", self, key)

    def __enter__(self):
        __tracebackhide__ = True
        return _op("enter", self)

    def __exit__(self, kind, exc, tb):
        __tracebackhide__ = True
        suppress = _op("exit", self, exc)
        if exc is not None and (isinstance(exc, AssertionError) or not isinstance(exc, Exception)):
            return False  # the test's own failure: not the solution's to suppress
        return bool(suppress)

    def __instancecheck__(self, instance):
        __tracebackhide__ = True
        return _plain(_op("isinstance", instance, self), bool)

    def __subclasscheck__(self, cls):
        __tracebackhide__ = True
        return _plain(_op("issubclass", cls, self), bool)

    def __dir__(self):
        __tracebackhide__ = True
        names = _op("dir", self)
        return [n for n in names if type(n) is str] if type(names) is list else []

    def __round__(self, ndigits=None):
        __tracebackhide__ = True
        return _op("round", self) if ndigits is None else _op("round", self, ndigits)

    def __trunc__(self):
        __tracebackhide__ = True
        return _op("trunc", self)

    def __floor__(self):
        __tracebackhide__ = True
        return _op("floor", self)

    def __ceil__(self):
        __tracebackhide__ = True
        return _op("ceil", self)

    def __neg__(self):
        __tracebackhide__ = True
        return _op("neg", self)

    def __pos__(self):
        __tracebackhide__ = True
        return _op("pos", self)

    def __abs__(self):
        __tracebackhide__ = True
        return _op("abs", self)

    def __invert__(self):
        __tracebackhide__ = True
        return _op("invert", self)


def _binary(name):
    def forward(self, other):
        __tracebackhide__ = True
        return _op(name, self, other)

    def reflected(self, other):
        __tracebackhide__ = True
        return _op(name, other, self)

    return forward, reflected


def _comparison(name):
    def compare(self, other):
        __tracebackhide__ = True
        if not is_remote(other):
            return NotImplemented  # never the solution's word against a plain value
        return _op(name, self, other)

    return compare


_BINARY = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "lshift", "rshift", "and", "or",
           "xor", "divmod")  # fmt: skip
_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge")
for _name in _BINARY:
    _forward, _reflected = _binary(_name)
    setattr(Remote, f"__{_name}__", _forward)
    setattr(Remote, f"__r{_name}__", _reflected)
for _name in _COMPARISONS:
    setattr(Remote, f"__{_name}__", _comparison(_name))


def _hybrid_getattr(self, name):
    __tracebackhide__ = True
    if denied(name) or "_honed_id" not in self.__dict__:
        raise AttributeError(name)
    side = _session()
    return side.channel.call("getattr", obj=side.encode(self), name=name)


_HYBRID_BASES = (int, float, complex, str, bytes, bytearray, tuple, list, dict, set, frozenset)
_HYBRIDS = {
    base.__name__: type(f"Solution{base.__name__.title()}", (base,), {"__getattr__": _hybrid_getattr})
    for base in _HYBRID_BASES
}
_HYBRID_TYPES = frozenset(_HYBRIDS.values())


def _exception_getattr(self, name):
    __tracebackhide__ = True
    number = self.__dict__.get("_honed_id")
    if number is None or denied(name):
        raise AttributeError(name)
    side = _session()
    return side.channel.call("getattr", obj={"$": "back", "id": number}, name=name)


def _exception_str(self):
    text = self.__dict__.get("_honed_text")
    return text if isinstance(text, str) else Exception.__str__(self)


class TestsSide(_Side):
    """The trusted side: strict decoding, proxies, callbacks restricted to calls."""

    def __init__(self, module_name, before_import=None, start=None):
        super().__init__()
        self.module_name = module_name
        self.before_import = before_import
        self.start = start
        self.module = None
        self.import_error = None
        self.classes = {}  # solution exception classes by number -> tests-side stand-ins

    # -- what the solution module proxy needs

    def solution_module(self):
        __tracebackhide__ = True
        if self.module is None and self.import_error is None:
            if self.before_import is not None:
                hook, self.before_import = self.before_import, None
                hook()
            try:
                if self.start is not None:
                    self.channel.call("start", **self.start)
                    self.start = None
                self.module = self.channel.call("import", module=self.module_name)
            except BaseException as exc:
                self.import_error = exc
        if self.import_error is not None:
            raise self.import_error.with_traceback(None)
        return self.module

    def public_names(self, taken=()):
        names = _op("public", self.solution_module())
        if type(names) is not list:
            return []
        reserved = set(dir(builtins)) | {n.partition(".")[0] for n in sys.modules} | set(taken)
        return [
            n for n in names
            if type(n) is str and n.isidentifier() and not n.startswith(("test", "Test", "_")) and n not in reserved
        ]  # fmt: skip

    # -- values

    def encode_other(self, value, depth=0):
        if isinstance(value, Remote):
            return {"$": "back", "id": value._honed_id}
        if isinstance(value, SolutionModule):
            return self.encode(self.solution_module())
        if type(value) in _HYBRID_TYPES and "_honed_id" in value.__dict__:
            return {"$": "back", "id": value.__dict__["_honed_id"]}
        if isinstance(value, type) and "_honed_id" in value.__dict__:
            return {"$": "back", "id": value.__dict__["_honed_id"]}
        if isinstance(value, type) and getattr(builtins, value.__name__, None) is value:
            return {"$": "type", "name": value.__name__}  # int, str, ValueError: the solution's own
        if isinstance(value, BaseException):
            number = value.__dict__.get("_honed_id")
            if type(number) is int:
                return {"$": "back", "id": number}
            return self.encode_exception(value)
        if type(value) in _HYBRID_TYPES:  # built here, not received: its plain value
            return self.encode(value.__class__.__mro__[1](value), depth)
        return {"$": "ref", "id": self.number(value), "call": callable(value)}

    def encode_exception(self, exc):
        kind = type(exc)
        number = kind.__dict__.get("_honed_id")
        if type(number) is int:
            cls = {"$": "back", "id": number}
        elif getattr(builtins, kind.__name__, None) is kind:
            cls = {"$": "cls", "builtin": kind.__name__}
        else:
            cls = {
                "$": "cls",
                "builtin": next(b.__name__ for b in kind.__mro__ if getattr(builtins, b.__name__, None) is b),
            }
        try:
            args = [self.encode(a) for a in exc.args]
        except Exception:
            args = [str(exc)]
        return {"$": "exc", "cls": cls, "args": args, "str": _safe_str(exc)}

    def decode_other(self, tag, data, depth):
        if tag == "ref":
            number = data.get("id")
            if type(number) is not int:
                raise ProtocolError("bad reference")
            proxy = self.refs.get(number)
            if proxy is None:
                proxy = self.refs[number] = Remote(number)
            return proxy
        if tag == "sub":
            hybrid, number = _HYBRIDS.get(data.get("base")), data.get("id")
            if hybrid is None or type(number) is not int:
                raise ProtocolError("bad value")
            value = self.decode(data.get("v"), depth + 1)
            base = hybrid.__mro__[1]
            if type(value) is not base:
                raise ProtocolError("bad value")
            result = hybrid(value)
            result.__dict__["_honed_id"] = number
            return result
        if tag == "cls":
            return self.exception_class(data, depth)
        if tag == "exc":
            return self.exception(data, depth)
        if tag == "fraction":
            import fractions

            parts = data.get("v")
            if not (isinstance(parts, list) and len(parts) == 2):
                raise ProtocolError("bad fraction")
            numerator, denominator = (p if type(p) is int else self.decode(p, depth + 1) for p in parts)
            if type(numerator) is not int or type(denominator) is not int or denominator <= 0:
                raise ProtocolError("bad fraction")
            return fractions.Fraction(numerator, denominator)
        if tag == "decimal":
            import decimal

            text = data.get("v")
            if not isinstance(text, str) or len(text) > 10000:
                raise ProtocolError("bad decimal")
            return decimal.Decimal(text)
        raise ProtocolError(f"unknown tag {tag!r}")

    def exception_class(self, data, depth=0):
        """A solution exception class as a tests-side class: builtins as themselves, others as stand-ins."""
        if depth > 50:
            raise ProtocolError("exception classes nested too deeply")
        if "builtin" in data:
            cls = getattr(builtins, str(data["builtin"]), None)
            if isinstance(cls, type) and (issubclass(cls, Exception) or cls is SystemExit):
                return cls  # SystemExit: pytest fails a test with it, so pytest.raises(SystemExit) may see it
            return RemoteError  # KeyboardInterrupt, GeneratorExit, BaseException: never themselves
        number = data.get("id")
        if type(number) is not int:
            raise ProtocolError("bad exception class")
        if number in self.classes:
            return self.classes[number]
        module, qualname = data.get("module"), data.get("qualname")
        known = _stdlib_exception(module, qualname)
        if known is not None:
            self.classes[number] = known
            return known
        bases_data = data.get("bases")
        bases = []
        for base in bases_data if isinstance(bases_data, list) else []:
            cls = (
                self.exception_class(base, depth + 1)
                if isinstance(base, dict) and base.get("$") == "cls"
                else None
            )
            if isinstance(cls, type) and issubclass(cls, Exception) and cls not in bases:
                bases.append(cls)
        name = data.get("name")
        name = name if isinstance(name, str) and name.isidentifier() else "SolutionException"
        namespace = {
            "__module__": module if isinstance(module, str) else self.module_name,
            "__qualname__": qualname if isinstance(qualname, str) else name,
            "_honed_id": number,
            "__getattr__": _exception_getattr,
            "__str__": _exception_str,
        }
        bases = [RemoteError if _special(base) else base for base in bases]
        for candidate in (tuple(bases) or (Exception,), (bases[0],) if bases else (Exception,), (Exception,)):
            try:
                cls = type(name, candidate, namespace)
                break
            except TypeError:
                continue
        self.classes[number] = cls
        return cls

    def exception(self, data, depth=0):
        cls_data = data.get("cls")
        if not isinstance(cls_data, dict):
            raise ProtocolError("bad exception")
        cls = self.decode(cls_data, depth + 1)
        if not (isinstance(cls, type) and (issubclass(cls, Exception) or cls is SystemExit)):
            cls = RemoteError
        text = data.get("str")
        text = text if isinstance(text, str) else ""
        try:
            args = self.decode(data.get("args", []), depth + 1)
            args = args if type(args) is list else [text]
        except ProtocolError:
            args = [text]
        try:
            exc = (
                cls(*args)
                if cls is not RemoteError
                else RemoteError(f"{data.get('type', 'an exception')}: {text}")
            )
        except Exception:
            exc = RemoteError(text)
        if "_honed_id" in type(exc).__dict__:
            exc.__dict__["_honed_text"] = text
        number = data.get("id")
        if type(number) is int and type(exc) is not RemoteError:
            exc.__dict__["_honed_id"] = number
        tb = data.get("tb")
        if isinstance(tb, str) and tb:
            exc.add_note("In the solution process:\n" + tb[-4000:])
        return exc

    def decode_error(self, data):
        __tracebackhide__ = True
        try:
            exc = self.decode(data) if isinstance(data, dict) and data.get("$") == "exc" else None
        except (ProtocolError, RecursionError, ValueError, TypeError, ArithmeticError) as problem:
            return RemoteError(f"a malformed error from the solution process: {problem}")
        return (
            exc
            if isinstance(exc, BaseException)
            else RemoteError("a malformed error from the solution process")
        )

    def serve(self, message):
        """A request from the solution: only calling a callable the tests handed over."""
        number = message.get("id")
        try:
            if message.get("op") != "call":
                raise RemoteError("the solution process may only call what the tests passed it")
            fn = self.decode(message.get("obj"))
            if isinstance(fn, Remote) or not callable(fn) or id(fn) not in self.numbers:
                raise RemoteError("the solution process may only call what the tests passed it")
            args, kwargs = self.decode_args(message)
            return {"re": number, "ok": self.encode(fn(*args, **kwargs))}
        except BaseException as exc:
            failure = isinstance(exc, AssertionError) or not isinstance(exc, Exception)
            if failure and self.channel.pending is None:
                self.channel.pending = exc  # fails the test whatever the solution does with it
            return {"re": number, "err": self.encode_exception(exc)}


def _stdlib_exception(module, qualname):
    """A standard-library exception class the tests process already imported (json.JSONDecodeError)."""
    if not (isinstance(module, str) and isinstance(qualname, str)):
        return None
    if module.partition(".")[0] not in sys.stdlib_module_names or module not in sys.modules:
        return None
    obj = sys.modules[module]
    for part in qualname.split("."):
        obj = obj.__dict__.get(part) if isinstance(obj, (type, types.ModuleType)) else None
    if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == module:
        return None if _special(obj) else obj
    return None


def _special(cls):
    """Exceptions pytest turns into an outcome other than a failure (unittest.SkipTest is a skip)."""
    special = tuple(
        c for c in (getattr(sys.modules.get("unittest"), "SkipTest", None),) if isinstance(c, type)
    )
    return bool(special) and issubclass(cls, special)


def _safe_str(exc):
    try:
        text = str(exc)
    except BaseException:
        text = f"<unprintable {type(exc).__name__}>"
    return text[:4000] if isinstance(text, str) else ""


class SolutionModule(types.ModuleType):
    """What `import solution` gives the tests: attributes come from the solution process."""

    def __getattr__(self, name):
        __tracebackhide__ = True
        side = _session()
        if name == "__all__":
            try:
                taken = sys._getframe(1).f_globals  # `from solution import *` must not shadow names
            except ValueError:
                taken = ()
            return side.public_names(taken)
        if denied(name) or name in ("__file__", "__dict__"):
            raise AttributeError(name)
        return side.channel.call("getattr", obj=side.encode(side.solution_module()), name=name)

    def __setattr__(self, name, value):
        __tracebackhide__ = True
        if name.startswith("__") and name.endswith("__"):
            return super().__setattr__(name, value)
        side = _session()
        side.channel.call(
            "setattr", obj=side.encode(side.solution_module()), name=name, value=side.encode(value)
        )

    def __delattr__(self, name):
        __tracebackhide__ = True
        side = _session()
        side.channel.call("delattr", obj=side.encode(side.solution_module()), name=name)

    def __dir__(self):
        __tracebackhide__ = True
        return sorted(set(Remote.__dir__(_session().solution_module())) | set(self.__dict__))


class _Finder:
    """`import solution` in the tests process: the module is imported in the solution process, and
    the import fails here as it failed there (a test file that only imports it still runs it)."""

    def __init__(self, name):
        self.name = name

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(fullname, self, origin="the solution process")

    def create_module(self, spec):
        return SolutionModule(spec.name)

    def exec_module(self, module):
        __tracebackhide__ = True
        _session().solution_module()


def install(sock_fd, pipes=(), *, module="solution", start=None, before_import=None):
    """Make `import <module>` in this (trusted) process reach the solution process on `sock_fd`.

    `start` (the solution's directory and limits) is sent and `before_import` (which should delete
    the test file) runs right before the first request that lets agent code run.
    """
    global _SESSION
    side = TestsSide(module, before_import=before_import, start=start)
    side.channel = Channel(socket.socket(fileno=sock_fd), side, pipes)
    _SESSION = side
    sys.modules.pop(module, None)
    sys.meta_path.insert(0, _Finder(module))
    return side


def keep_source(path):
    """Keep a file's lines for tracebacks after it is deleted (entries without mtime are never checked)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
    except OSError:
        return
    linecache.cache[path] = (sum(map(len, lines)), None, lines, path)


# -- the solution side (untrusted: everything here may be subverted by the code it imports) -------------


def _number_value(value):
    """Numbers a test compares with plain values, sent by value: Fraction, Decimal, numpy scalars."""
    kind, fractions, decimal = type(value), sys.modules.get("fractions"), sys.modules.get("decimal")
    if fractions is not None and kind is fractions.Fraction:
        return {"$": "fraction", "v": [_encode_int(value.numerator), _encode_int(value.denominator)]}
    if decimal is not None and kind is decimal.Decimal:
        return {"$": "decimal", "v": str(value)}
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic) and kind.__module__ == "numpy":
        item = value.item()
        if type(item) in (bool, int, float, complex, str, bytes):
            return item
    return None


def _public_names(module):
    names = getattr(module, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in vars(module) if not n.startswith("_")]
    return [str(n) for n in names]


def _exit_context(obj, exc):
    kind = type(exc) if exc is not None else None
    return type(obj).__exit__(obj, kind, exc, getattr(exc, "__traceback__", None))


_OPS = {
    "repr": repr, "str": str, "format": format, "bool": bool, "len": len, "hash": hash, "index": operator.index,
    "int": int, "float": float, "complex": complex, "iter": iter, "next": next, "contains": operator.contains,
    "getitem": operator.getitem, "setitem": operator.setitem, "delitem": operator.delitem,
    "enter": lambda obj: type(obj).__enter__(obj), "exit": _exit_context, "isinstance": isinstance,
    "issubclass": issubclass, "dir": lambda obj: [n for n in dir(obj) if isinstance(n, str)], "round": round,
    "trunc": math.trunc, "floor": math.floor, "ceil": math.ceil, "neg": operator.neg, "pos": operator.pos,
    "abs": abs, "invert": operator.invert, "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod, "pow": pow,
    "matmul": operator.matmul, "lshift": operator.lshift, "rshift": operator.rshift, "and": operator.and_,
    "or": operator.or_, "xor": operator.xor, "divmod": divmod, "eq": operator.eq, "ne": operator.ne,
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge, "public": _public_names,
}  # fmt: skip
# The plain value behind a subclass of a builtin, read with the builtin's own methods (a str-valued
# Enum's value, not its str()).
_BASE_VALUE = {
    int: int.__int__, float: float.__float__, complex: complex.__complex__, str: str.__str__,
    bytes: bytes.__bytes__, bytearray: bytearray, tuple: lambda v: tuple(tuple.__iter__(v)),
    list: lambda v: list(list.__iter__(v)), dict: lambda v: dict(dict.items(v)),
    set: lambda v: set(set.__iter__(v)), frozenset: lambda v: frozenset(frozenset.__iter__(v)),
}  # fmt: skip


class _Foreign:
    """A callable the tests passed: calling it asks the tests process."""

    __slots__ = ("_callable", "_number")

    def __init__(self, number, is_callable):
        self._number, self._callable = number, is_callable

    def __call__(self, *args, **kwargs):
        if not self._callable:
            raise TypeError("an object from the tests is not callable")
        side = _SOLUTION
        return side.channel.call(
            "call", obj={"$": "back", "id": self._number}, **side.encode_args(args, kwargs)
        )

    def __repr__(self):
        return f"<object from the tests #{self._number}>"


_SOLUTION = None


class SolutionSide(_Side):
    def __init__(self, apply_limits):
        super().__init__()
        self.apply_limits = apply_limits

    def encode_other(self, value, depth=0):
        if isinstance(value, _Foreign):
            return {"$": "back", "id": value._number}
        if isinstance(value, type) and issubclass(value, BaseException):
            return self.exception_class(value)
        if isinstance(value, BaseException):
            return self.exception(value, with_traceback=False)
        kind = type(value)
        number = _number_value(value)
        if number is not None:
            return self.encode(number, depth) if type(number) is not dict else number
        if kind is not bool:
            for base in _HYBRID_BASES:
                if isinstance(value, base):
                    return {
                        "$": "sub",
                        "base": base.__name__,
                        "id": self.number(value),
                        "v": self.encode(_BASE_VALUE[base](value), depth + 1),
                    }
        return {"$": "ref", "id": self.number(value)}

    def exception_class(self, cls, depth=0):
        if getattr(builtins, cls.__name__, None) is cls or depth > 40:
            return {"$": "cls", "builtin": cls.__name__ if depth <= 40 else "Exception"}
        return {
            "$": "cls",
            "id": self.number(cls),
            "name": str(cls.__name__),
            "qualname": str(getattr(cls, "__qualname__", cls.__name__)),
            "module": str(getattr(cls, "__module__", "")),
            "bases": [
                self.exception_class(b, depth + 1) for b in cls.__bases__ if issubclass(b, BaseException)
            ],
        }

    def exception(self, exc, with_traceback=True):
        try:
            args = [self.encode(a) for a in exc.args]
        except BaseException:
            args = []
        data = {
            "$": "exc",
            "cls": self.exception_class(type(exc)),
            "type": type(exc).__name__,
            "args": args,
            "str": _safe_str(exc),
            "id": self.number(exc),
        }
        if with_traceback and not isinstance(exc, StopIteration):
            with contextlib.suppress(BaseException):
                data["tb"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))[
                    -4000:
                ]
        return data

    def decode_other(self, tag, data, depth):
        if tag == "ref":
            number = data.get("id")
            proxy = self.refs.get(number)
            if proxy is None:
                proxy = self.refs[number] = _Foreign(number, bool(data.get("call")))
            return proxy
        if tag == "cls":
            cls = getattr(builtins, str(data.get("builtin")), None)
            return cls if isinstance(cls, type) and issubclass(cls, BaseException) else Exception
        if tag == "type":
            cls = getattr(builtins, str(data.get("name")), None)
            return cls if isinstance(cls, type) else None
        if tag == "exc":
            cls = self.decode(data.get("cls"), depth + 1)
            args = self.decode(data.get("args", []), depth + 1)
            try:
                return cls(*args)
            except BaseException:
                return Exception(data.get("str"))
        raise ProtocolError(f"unknown tag {tag!r}")

    def decode_error(self, data):
        try:
            exc = self.decode(data)
        except BaseException as problem:
            return Exception(f"a malformed error from the tests process: {problem}")
        return exc if isinstance(exc, BaseException) else Exception("an error in the tests process")

    def serve(self, message):
        number = message.get("id")
        try:
            return {"re": number, "ok": self.encode(self.handle(message))}
        except BaseException as exc:
            try:
                return {"re": number, "err": self.exception(exc)}
            except BaseException:
                return {"re": number, "err": _UNREPORTABLE}

    def handle(self, message):
        op = message.get("op")
        if op == "start":
            self.apply_limits(message["limits"])
            os.chdir(message["dir"])
            sys.path.insert(0, message["dir"])
            sys.argv = [""]
            return None
        if op == "import":
            __import__(message["module"])
            return sys.modules[message["module"]]
        if op == "getattr":
            return getattr(self.decode(message["obj"]), message["name"])
        if op == "setattr":
            return setattr(self.decode(message["obj"]), message["name"], self.decode(message["value"]))
        if op == "delattr":
            return delattr(self.decode(message["obj"]), message["name"])
        if op == "call":
            args, kwargs = self.decode_args(message)
            return self.decode(message["obj"])(*args, **kwargs)
        if op == "op":
            return _OPS[message["name"]](*(self.decode(a) for a in message["args"]))
        raise ProtocolError(f"unknown request {op!r}")

    def receive_request(self):
        message = self.channel.receive()
        if "op" not in message:
            raise ProtocolError("an answer nobody asked for")
        return message


_UNREPORTABLE = {"$": "exc", "cls": {"$": "cls", "builtin": "Exception"}, "args": [], "str": "(unreportable)"}


class _SolutionChannel(Channel):
    """The solution's end: flushes its stdout/stderr before every message, so the tests see output first."""

    def send(self, message):
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        try:
            data = json.dumps(message, separators=(",", ":")).encode()
        except BaseException as exc:  # e.g. an int too long for str(): say so instead
            error = _SOLUTION.exception(exc) if "re" in message else _UNREPORTABLE
            data = json.dumps({"re": message.get("re"), "err": error}).encode()
        self.send_bytes(data)

    def fail(self, reason):
        os._exit(0)  # the tests process is gone: nothing left to answer


def serve(sock_fd, apply_limits):
    """The solution process: answer the tests' requests until they hang up, then exit."""
    global _SOLUTION
    side = _SOLUTION = SolutionSide(apply_limits)
    side.channel = _SolutionChannel(socket.socket(fileno=sock_fd), side)
    side.channel.sock.settimeout(None)
    while True:
        side.channel.send(side.serve(side.receive_request()))
