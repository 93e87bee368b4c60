"""The attack registry: ``ATTACKS[name]`` is an attack class, registered with :func:`register_attack`.

An attack class is called ``cls(model, **options)`` and its instances ``attack(images, labels,
ids)`` (images (B, C, H, W) in [0, 1]) return the perturbed images, each prediction kept, and set
``p_at_k``, ``flipped``, ``steps_taken`` and ``clean_logits`` (B, ...) after a call, and
``explanation`` (the real model's saliency and logits at the returned images, or None: the
evaluation protocol then explains them itself).

Registry metadata, read by the evaluation protocol and iterated by the tests:

- ``name``: the registry key (and the class attribute ``name``);
- ``options``: the keyword options its constructor takes (``frozenset``), read from the signature
  of ``__init__`` (through ``**kwargs`` to the parent's), or declared as a class attribute
  ``options`` on a class whose constructor forwards them elsewhere. :func:`build_attack` passes an
  attack only the shared settings it takes (e.g. the noise baseline takes no ``steps`` or
  ``pair_set``) and refuses any other keyword, naming it and the options.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, TypeVar

from torch import nn

#: name -> attack class (see the module docstring).
ATTACKS: dict[str, type] = {}

A = TypeVar("A", bound=type)


def constructor_options(cls: type) -> frozenset[str]:
    """The keyword parameters of ``cls.__init__`` other than ``self`` and ``model``; a constructor
    with ``**kwargs`` adds its parent's (the next ``__init__`` in the MRO)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(names - {"self", "model"})


def register_attack(cls: A) -> A:
    """Class decorator: ``ATTACKS[cls.name] = cls`` and ``cls.options`` recorded (module docstring)."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"attack class {cls.__qualname__} needs its own class attribute `name` (the registry key)")
    if "options" not in cls.__dict__:
        cls.options = constructor_options(cls)
    ATTACKS[name] = cls
    return cls


def attack_class(name: str) -> type:
    """``ATTACKS[name]`` with a clear error for unknown names."""
    if name not in ATTACKS:
        raise ValueError(f"attack={name!r} is not known; valid: {sorted(ATTACKS)}")
    return ATTACKS[name]


def check_attack_options(name: str, kwargs: Mapping[str, Any], entry: str | None = None) -> None:
    """Refuse keywords the attack ``name`` does not take (TypeError naming them and its options);
    ``entry``: the ensemble member's name, for the message."""
    cls = attack_class(name)
    unknown = sorted(set(kwargs) - cls.options)
    if unknown:
        which = f"attack {name!r} ({cls.__name__})" if entry is None else f"attack entry {entry!r} ({name!r}, {cls.__name__})"
        raise TypeError(f"{which} does not take {unknown}; its options: {sorted(cls.options)}")


def build_attack(name: str, model: nn.Module, shared: Mapping[str, Any] | None = None, **kwargs: Any):
    """``ATTACKS[name](model, **shared settings it takes, **kwargs)``.

    ``shared``: settings offered to every attack (e.g. a protocol's eps, steps, k, pair_set); the
    attack gets those among its ``options``. ``kwargs``: this attack's own settings (override
    ``shared``); one it does not take is refused (:func:`check_attack_options`).
    """
    check_attack_options(name, kwargs)
    cls = ATTACKS[name]
    taken = {key: value for key, value in (shared or {}).items() if key in cls.options}
    return cls(model, **{**taken, **kwargs})
