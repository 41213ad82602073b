"""One home for the argument checks every wing shares: whole numbers in a range, token ids.

Each check returns its (normalised) input or raises an error that names the argument,
the value and what was expected.

>>> check_int(3, "k", low=1)
3
>>> check_int(True, "k", low=1)
Traceback (most recent call last):
...
tl_featureflow.errors.InvalidArgumentError: k=True is not an int: expected an int >= 1
>>> import torch
>>> check_tokens(torch.tensor([[1, 99]]), d_vocab=64).shape
Traceback (most recent call last):
...
tl_featureflow.errors.InvalidArgumentError: tokens hold ids [99] outside the vocabulary 0-63 (d_vocab 64)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TypeVar

from tl_featureflow.errors import FeatureFlowError, InvalidArgumentError

if TYPE_CHECKING:  # torch loads lazily: refs (and the CLI's --help) import this module
    from jaxtyping import Int
    from torch import Tensor

__all__ = ["check_int", "check_tokens", "takes_settings"]

_F = TypeVar("_F", bound=Callable[..., Any])


def takes_settings(cls: type) -> Callable[[_F], _F]:
    """Let a function with many keyword options take them as one frozen settings dataclass too.

    The decorated function declares ``settings: cls | None = None`` (keyword-only) beside its
    keywords, which keep working unchanged. With ``settings=``, every field of ``cls`` not passed
    as a keyword is taken from it; **a keyword passed explicitly overrides the settings' field**
    (as :func:`~tl_featureflow.steer.sweeps.steering_sweep`'s keywords override its
    ``SweepSettings``). Something other than a ``cls`` as ``settings`` is an
    :class:`~tl_featureflow.errors.InvalidArgumentError`.
    """
    names = [f.name for f in fields(cls)]

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            settings = kwargs.get("settings")
            if settings is not None:
                if not isinstance(settings, cls):
                    raise InvalidArgumentError(
                        f"{fn.__name__}(settings={settings!r}): expected a {cls.__name__} or None")
                for name in names:
                    kwargs.setdefault(name, getattr(settings, name))
            return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def check_int(value: object, name: str, *, low: int = 0, high: int | None = None,
              error: type[FeatureFlowError] = InvalidArgumentError, context: str = "") -> int:
    """``value`` if it is an int (not a bool) with ``low <= value <= high``; else raise ``error``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise error(f"{name}={value!r} is not an int{context}: expected {_expected(low, high)}")
    if value < low or (high is not None and value > high):
        raise error(f"{name}={value!r} is out of range{context}: expected {_expected(low, high)}")
    return value


def check_number(value: object, name: str, *, low: float | None = None, high: float | None = None,
                 positive: bool = False,
                 error: type[FeatureFlowError] = InvalidArgumentError, context: str = "") -> float:
    """``value`` as a float if it is a finite real number (not a bool), in ``[low, high]`` and above 0
    when ``positive``; else raise ``error``. NaN and inf are refused: they would flow on silently.

    >>> check_number(0.5, "r"), check_number(2, "strength")
    (0.5, 2.0)
    >>> check_number(float("nan"), "r")
    Traceback (most recent call last):
    ...
    tl_featureflow.errors.InvalidArgumentError: r=nan is not a finite number: expected a finite real number
    """
    import math
    import numbers

    want = (("a positive" if positive else "a finite") + " real number" + (f" >= {low:g}" if low is not None else "")
            + (f" <= {high:g}" if high is not None else ""))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name}={value!r} is not a number{context}: expected {want}")
    number = float(value)
    if not math.isfinite(number):
        raise error(f"{name}={value!r} is not a finite number{context}: expected {want}")
    if (low is not None and number < low) or (high is not None and number > high) or (positive and number <= 0):
        raise error(f"{name}={value!r} is out of range{context}: expected {want}")
    return number


def check_device(device: Any, name: str = "device") -> Any:
    """``device`` as a ``torch.device`` that exists on this machine; else :class:`InvalidArgumentError`
    saying what is here (``"cuda"`` without a GPU failed deep inside torch, or as a "corrupt" bank).

    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("banana")
    Traceback (most recent call last):
    ...
    tl_featureflow.errors.InvalidArgumentError: device='banana' is not a torch device: expected e.g. 'cpu' or 'cuda'
    """
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InvalidArgumentError(f"{name}={device!r} is not a torch device: expected e.g. 'cpu' or 'cuda'") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index is not None and parsed.index >= count):
            raise InvalidArgumentError(f"{name}={device!r}: this machine has {count} CUDA device(s) "
                                       "(torch.cuda.is_available() is False or the index is too high): use 'cpu'")
    elif parsed.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidArgumentError(f"{name}={device!r}: MPS is not available on this machine: use 'cpu'")
    return parsed


def _expected(low: int, high: int | None) -> str:
    if high is not None:
        return f"an int in {low}..{high}"
    return "a non-negative int" if low == 0 else f"an int >= {low}"


def check_tokens(tokens: Any, d_vocab: int, *, name: str = "tokens", min_pos: int = 1,
                 n_ctx: int | None = None) -> Int[Tensor, "batch pos"]:
    """``tokens`` as a non-empty ``[batch, pos]`` integer tensor of ids in ``0..d_vocab-1``,
    at most ``n_ctx`` positions long (the model's context) when given.

    Out-of-vocabulary ids would otherwise surface as an IndexError deep inside an
    embedding lookup (or, on some devices, as garbage); empty inputs as empty results.
    """
    import torch
    from torch import Tensor

    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise InvalidArgumentError(f"{name} must be an integer tensor of token ids [batch, pos], got "
                                   f"{type(tokens).__name__}{'' if not isinstance(tokens, Tensor) else ' ' + str(tokens.dtype)}")
    if tokens.ndim != 2 or tokens.shape[0] == 0 or tokens.shape[1] < min_pos:
        raise InvalidArgumentError(f"{name} must be [batch, pos] with batch >= 1 and pos >= {min_pos}, "
                                   f"got shape {tuple(tokens.shape)}")
    if n_ctx is not None and tokens.shape[1] > n_ctx:
        raise InvalidArgumentError(f"{name} have {tokens.shape[1]} positions but the model's context is {n_ctx} "
                                   f"(cfg.n_ctx): cut them to at most {n_ctx}, e.g. tokens[:, :{n_ctx}]")
    bad = tokens[(tokens < 0) | (tokens >= d_vocab)]
    if bad.numel():
        shown = sorted(set(bad.tolist()))[:5]
        raise InvalidArgumentError(f"{name} hold ids {shown} outside the vocabulary 0-{d_vocab - 1} (d_vocab {d_vocab})")
    return tokens


def check_quantile(value: object, name: str = "quantile") -> float:
    """``value`` as a float strictly between 0 and 1; else :class:`InvalidArgumentError`.

    >>> check_quantile(0.99)
    0.99
    """
    number = check_number(value, name, low=0.0, high=1.0)
    if not 0 < number < 1:
        raise InvalidArgumentError(f"{name}={value!r} is out of range: expected 0 < {name} < 1")
    return number


def check_cosine(value: object, name: str) -> float:
    """A cosine threshold (``t_res``, ``t_module``): a finite number in ``[-1, 1]``.

    >>> check_cosine(0.5, "t_res")
    0.5
    """
    return check_number(value, name, low=-1.0, high=1.0)
