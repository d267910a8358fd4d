"""The atheris harness: ``python -m fuzz TARGET [libFuzzer options] [corpus dirs]``.

TARGET is ``wire`` (byte streams with fds through the server's framing), ``protocol``
(sequences of requests, guest actions and completions against one backend) or ``ring``
(the ring walker over arbitrary rings). balloond's modules are instrumented for coverage;
each input is a :class:`fuzz.source.BytesSource`. ``python -m fuzz TARGET --replay FILE…``
runs inputs without atheris and prints what they did (the protocol target prints its
steps as Python, ready for a regression test); ``--replay-quiet`` prints only breaches.
Breaches already known (``fuzz/known.py``) do not stop a campaign unless ``--all`` is given.
"""

from __future__ import annotations

import importlib
import logging
import sys

from fuzz.known import known
from fuzz.source import BytesSource, Exhausted

TARGETS = {"wire": "fuzz.streams", "protocol": "fuzz.steps", "ring": "fuzz.rings"}
INSTRUMENTED = (
    "balloond.wire",
    "balloond.memory",
    "balloond.virtqueue",
    "balloond.balloon",
    "balloond.protocol",
    "balloond.server",
    "balloond.fdcheck",
)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]")
    target = sys.argv.pop(1)
    strict = "--all" in sys.argv
    if strict:
        sys.argv.remove("--all")
    logging.disable(logging.CRITICAL)  # a guest's warnings, thousands of times a second
    if sys.argv[1:2] in (["--replay"], ["--replay-quiet"]):
        verbose = sys.argv[1] == "--replay"
        if verbose:
            logging.disable(logging.NOTSET)
            logging.basicConfig(level=logging.WARNING)
        module = importlib.import_module(TARGETS[target])
        for path in sys.argv[2:]:
            with open(path, "rb") as file:
                data = file.read()
            if verbose:
                print(f"# {path}: {len(data)} bytes")
            kwargs = {"log": print} if target == "protocol" and verbose else {}
            try:
                module.run(BytesSource(data), **kwargs)
            except Exhausted:
                pass
            except AssertionError as error:
                print(f"# {path}: {known(error) or 'NEW'}: {error}")
                continue
            if verbose:
                print(f"# {path}: no invariant broken")
        return
    import atheris

    with atheris.instrument_imports(include=["balloond"]):
        for name in INSTRUMENTED:
            importlib.import_module(name)
    module = importlib.import_module(TARGETS[target])

    def one_input(data: bytes) -> None:
        try:
            module.run(BytesSource(data))
        except Exhausted:
            pass
        except AssertionError as error:
            if strict or known(error) is None:
                raise

    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
