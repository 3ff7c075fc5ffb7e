"""Method registry. Each method lives in its own module and registers itself once.

Add a method: write ``bench/methods/mymethod.py`` with a ``Method`` subclass
decorated ``@METHODS.register("my-method")`` and import it in ``_load_all``.
"""
from __future__ import annotations

from bench.registry import Registry
from bench.methods.base import Method, MethodContext


def _load_all() -> None:
    # Import for the registration side effect; order is the display order's tiebreak only.
    from bench.methods import full  # noqa: F401
    from bench.methods import dgst  # noqa: F401  (dgst, dgst-random, dgst-static, dgst-released)
    from bench.methods import partial  # noqa: F401  (linear-probe, decoder, bitfit, norm)
    from bench.methods import lora  # noqa: F401
    from bench.methods import adapter  # noqa: F401
    from bench.methods import l2sp  # noqa: F401
    from bench.methods import scratch  # noqa: F401
    from bench.methods import reference  # noqa: F401  (zero-shot, oracle)


METHODS: Registry = Registry("method", load=_load_all)  # loads every method on the first lookup


def get_method(name: str, **hparams) -> Method:
    return METHODS.get(name)(**hparams)


def method_names() -> list:
    return METHODS.names()


def resolve_methods(selection, first: str | None = None) -> list:
    """``all`` (every registered method) or a comma list (or list) of names; unknown names fail with
    the valid list. ``first``, if given, is always included and put first (a comparison's reference)."""
    if selection is None or selection == "all" or selection == ["all"]:
        names = METHODS.names()
    else:
        names = [n.strip() for n in (selection.split(",") if isinstance(selection, str) else selection) if n.strip()]
        for n in names:
            METHODS.get(n)
    names = list(dict.fromkeys(names))
    return [first] + [n for n in names if n != first] if first else names


__all__ = ["METHODS", "Method", "MethodContext", "get_method", "method_names", "resolve_methods"]
