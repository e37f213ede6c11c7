"""A store that fails at random: :class:`FaultyStore` wraps any Store for chaos tests.

Every coroutine method of the wrapped store (found on its class when the wrapper
is made, so a method added to the Store contract is covered without a change
here) may raise, with a seeded probability, one of the *kinds* of exception:
a :class:`~mailstrom_async.StoreError`, an :class:`OSError`, or an arbitrary one
(:class:`RuntimeError`, :class:`KeyError`). A fault comes either BEFORE the inner
method runs (nothing was written) or AFTER it returned (it was written, yet the
caller sees an error: the nastiest case for ``record`` and ``add``).
``open`` and ``aclose`` always pass through (the Deliverer's own lifetime is not
under test), unless named in ``faulty_methods``.

Every injected exception is an instance of :class:`InjectedFault` as well as of
its kind, so a test can tell an injected fault from a real error. ``calm()``
switches faults off; ``rage()`` back on.

What a fault destroyed is recorded, as (message id, lower-cased address):
:attr:`FaultyStore.lost_deliveries` holds each DELIVERED outcome whose ``record``
failed before it was written. Such a recipient may be sent again without any
flag: that is the second duplicate window of DESIGN §6 (between the server's 250
and the commit of the outcome), which the chaos test tolerates.
:attr:`FaultyStore.lost_flags` holds each ``possible_duplicate`` flag whose
``record`` failed so: the engine knew, the store forgot.
"""

from __future__ import annotations

import enum
import functools
import inspect
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from mailstrom_async._exceptions import StoreError
from mailstrom_async._models import RecipientState, RecipientStatus
from mailstrom_async._store import Store
from tests.smtpd import WaitableCount

__all__ = [
    "ALL_KINDS",
    "Fault",
    "FaultyStore",
    "InjectedFault",
    "InjectedKeyError",
    "InjectedOSError",
    "InjectedRuntimeError",
    "InjectedStoreError",
    "When",
]


class InjectedFault(Exception):  # noqa: N818 - a mixin, never raised alone
    """Marks an exception raised by a :class:`FaultyStore` on purpose."""


class InjectedStoreError(InjectedFault, StoreError):
    pass


class InjectedOSError(InjectedFault, OSError):
    pass


class InjectedRuntimeError(InjectedFault, RuntimeError):
    pass


class InjectedKeyError(InjectedFault, KeyError):
    pass


#: Every kind of fault, in the order ``kinds`` weights refer to.
ALL_KINDS: tuple[type[InjectedFault], ...] = (
    InjectedStoreError,
    InjectedOSError,
    InjectedRuntimeError,
    InjectedKeyError,
)

#: Methods that pass through unless asked for: the store's own lifetime.
LIFETIME_METHODS = frozenset({"open", "aclose"})


class When(enum.Enum):
    """When a fault strikes, relative to the inner call."""

    BEFORE = "before"
    """Nothing was done."""
    AFTER = "after"
    """The inner call completed (and committed); its result is lost."""


@dataclass(frozen=True)
class Fault:
    """One injected fault."""

    method: str
    when: When
    kind: type[InjectedFault]
    call: int
    """The how-manieth call of *method* (from 0)."""


def _coroutine_methods(store: object) -> list[str]:
    return sorted(
        name
        for name, member in inspect.getmembers(type(store))
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    )


class FaultyStore:
    """Wraps *inner* (any Store); its coroutine methods fail at random.

    *rng* seeds one independent random stream per method, so the n-th call of
    ``record`` meets the same fate for a given seed, whatever the other methods
    do. *probability* is the chance that a call faults; *kinds* the exception
    types to pick from (uniformly); *when* the timings to pick from.
    """

    def __init__(
        self,
        inner: Store,
        *,
        rng: random.Random,
        probability: float,
        kinds: Sequence[type[InjectedFault]] = ALL_KINDS,
        when: Collection[When] = (When.BEFORE, When.AFTER),
        faulty_methods: Collection[str] | None = None,
    ) -> None:
        if not 0 <= probability <= 1:
            msg = f"probability must be from 0 to 1, not {probability!r}"
            raise ValueError(msg)
        self.inner = inner
        self.probability = probability
        self.kinds = tuple(kinds)
        self.when = tuple(sorted(when, key=lambda w: w.value))
        self.faults: list[Fault] = []
        self.lost_deliveries: set[tuple[str, str]] = set()
        self.lost_flags: set[tuple[str, str]] = set()
        self.calls = WaitableCount()
        """Calls of faulty methods so far (``await .wait_for(n)``)."""
        self.per_method: Counter[str] = Counter()
        self._calm = False
        methods = _coroutine_methods(inner)
        if faulty_methods is None:
            faulty_methods = [m for m in methods if m not in LIFETIME_METHODS]
        unknown = set(faulty_methods) - set(methods)
        if unknown:
            msg = f"{type(inner).__name__} has no coroutine methods {sorted(unknown)}"
            raise ValueError(msg)
        seed = rng.getrandbits(64)
        for name in methods:
            bound = getattr(inner, name)
            if name in faulty_methods:
                method_rng = random.Random(f"{seed}:{name}")
                bound = self._faulty(name, bound, method_rng)
            # In the instance's __dict__: found by isinstance(x, Store) (which
            # looks attributes up statically from Python 3.12 on) and by mypy's
            # reading of __getattr__ alike.
            setattr(self, name, bound)

    def __getattr__(self, name: str) -> Any:
        # Anything that is not a coroutine method (a path, a property) is the
        # inner store's, unchanged.
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        state = "calm" if self._calm else f"p={self.probability}"
        return f"<FaultyStore {state} around {self.inner!r}>"

    @property
    def store(self) -> Store:
        """This wrapper, typed as the Store it stands in for."""
        assert isinstance(self, Store)
        return self

    @property
    def is_calm(self) -> bool:
        return self._calm

    def calm(self) -> None:
        """No more faults: every call passes through."""
        self._calm = True

    def rage(self) -> None:
        """Faults again, with the configured probability."""
        self._calm = False

    def report(self) -> str:
        """The faults injected so far, counted by method, timing and kind."""
        counts = Counter(
            f"{f.method}/{f.when.value}/{f.kind.__name__}" for f in self.faults
        )
        return ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) or "none"

    def _faulty(
        self, name: str, method: Callable[..., Awaitable[Any]], rng: random.Random
    ) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            index = self.per_method[name]
            self.per_method[name] += 1
            self.calls.bump()
            # Draw the fate first, so the stream does not depend on calm phases.
            strikes = rng.random() < self.probability
            when = rng.choice(self.when)
            kind = rng.choice(self.kinds)
            if self._calm or not strikes:
                return await method(*args, **kwargs)
            fault = Fault(method=name, when=when, kind=kind, call=index)
            if when is When.BEFORE:
                self._note(fault, args, kwargs)
                raise kind(f"injected fault before {name}() (call #{index})")
            await method(*args, **kwargs)
            self._note(fault, args, kwargs)
            raise kind(f"injected fault after {name}() returned (call #{index})")

        return call

    def _note(
        self, fault: Fault, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.faults.append(fault)
        if fault.method == "record" and fault.when is When.BEFORE:
            message_id = str(args[0] if args else kwargs.get("message_id"))
            statuses = args[1] if len(args) > 1 else kwargs.get("statuses")
            for status in _statuses(statuses):
                key = (message_id, status.address.lower())
                if status.state is RecipientState.DELIVERED:
                    self.lost_deliveries.add(key)
                if status.possible_duplicate:
                    self.lost_flags.add(key)


def _statuses(value: object) -> list[RecipientStatus]:
    if isinstance(value, Sequence):
        return [s for s in value if isinstance(s, RecipientStatus)]
    return []
