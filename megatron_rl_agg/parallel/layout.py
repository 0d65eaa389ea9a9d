"""The parallel-layout grammar: :class:`Layout` (TP/PP/VPP/CP/DP/EP sizes and micro-batches per step), one
spelling to parse (:func:`parse_layout`, :func:`parse_layouts`) and one to print (``str(layout)``). Pure: no
Megatron, no torch.distributed.

A layout is a list of factors ``dp<N>``, ``tp<N>``, ``pp<N>``, ``vpp<N>`` (virtual stages per pipeline
rank), ``cp<N>`` (context parallelism: each row split into ``2 N`` zigzag chunks), ``ep<N>`` (expert
parallelism) and ``m<N>`` (micro-batches per DP rank), each at most once, case-insensitive, written
together (``pp2vpp2m4``) or joined by ``+`` (``pp2+vpp2+m4``); omitted factors are 1 (no virtual stages),
except ``m`` with virtual stages, which defaults to ``pp`` (the interleaved schedule needs a multiple of
``pp``). A list of layouts (:func:`parse_layouts`, the audit's ``--layouts``) separates them by ``,``,
``;`` or whitespace: ``"dp2,m4,tp2"`` is three layouts. ``str(layout)`` is the short canonical spelling
(only the factors that differ from their default, e.g. ``pp2+vpp2+m4``; ``m1`` alone), and
``parse_layout(str(layout)) == layout`` for every layout::

    layout = parse_layout("pp2+vpp2+m4")
    initialize_model_parallel(layout.tp, layout.pp, layout.vpp, seed=1)
    parse_layouts("dp2+m4 tp2;pp2vpp2m4")      # three layouts
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

__all__ = ["Layout", "parse_layout", "parse_layouts"]

_FACTOR = re.compile(r"(vpp|dp|tp|pp|cp|ep|m)(\d+)")
_LAYOUT_SEPARATORS = re.compile(r"[\s;,]+")
_FIELDS = {"tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp", "dp": "dp", "ep": "ep", "m": "num_microbatches"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """A parallel layout and micro-batch count for one forward-backward over a mini-batch."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved 1F1B), or None."""
    cp: int = 1
    """Context-parallel size (each row split into 2 * cp zigzag chunks over cp ranks)."""
    dp: int = 1
    """Data-parallel size (without context parallelism) besides expert parallelism: with ``ep=1``
    Megatron's data-parallel size; with ``ep > 1`` each expert's replicas (its expert-data-parallel
    group holds ``dp * cp`` ranks)."""
    ep: int = 1
    """Expert-parallel size (``expert_model_parallel_size``). The factors multiply like the others:
    the layout needs ``tp * pp * cp * dp * ep`` processes and Megatron's data-parallel size (the ``D``
    of the loss, over which the dense weights' gradients are reduced) is ``dp * ep``; each expert
    lives on one EP rank and is replicated over the ``dp * cp`` expert-data-parallel ranks."""
    num_microbatches: int = 1
    """Micro-batches per data-parallel rank and optimizer step."""

    def __post_init__(self):
        for name in ("tp", "pp", "cp", "dp", "ep", "num_microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"Layout.{name}={getattr(self, name)} must be >= 1")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError(f"Layout vpp={self.vpp} needs vpp >= 2 and pp >= 2 (pp={self.pp})")

    @property
    def world_size(self) -> int:
        """Processes the layout needs: ``tp * pp * cp * dp * ep``."""
        return self.tp * self.pp * self.cp * self.dp * self.ep

    @property
    def data_parallel_size(self) -> int:
        """Megatron's data-parallel size ``dp * ep`` (without CP): the ranks that split a mini-batch's rows."""
        return self.dp * self.ep

    def __str__(self) -> str:
        """Short canonical spelling: only the factors that differ from 1, e.g. ``pp2+vpp2+m4``; ``m1`` alone.

        ``m`` is always written with virtual stages (where the parser's default is ``pp``, not 1).
        """
        parts = [f"{k}{v}" for k, v in (("ep", self.ep), ("cp", self.cp), ("dp", self.dp), ("tp", self.tp),
                                         ("pp", self.pp)) if v != 1]
        if self.vpp is not None:
            parts.append(f"vpp{self.vpp}")
        if self.num_microbatches != 1 or self.vpp is not None or not parts:
            parts.append(f"m{self.num_microbatches}")
        return "+".join(parts)


def parse_layout(text: str) -> Layout:
    """Parse ONE layout: factors written together or joined by '+' (``"dp2+m2"``, ``"pp2vpp2m4"``, ``"tp2"``).

    Raises:
        ValueError: naming the text and the grammar; a list of layouts (``"dp2,m2"`` is two: dp2 and m2)
            is refused with a pointer to :func:`parse_layouts`.
    """
    stripped = text.strip()
    if _LAYOUT_SEPARATORS.search(stripped):
        raise ValueError(
            f"{text!r} is not one layout: the factors of a layout are joined by '+' or written together "
            "(e.g. 'dp2+m2', 'pp2vpp2m4'); ',', ';' and spaces separate layouts (parse them with "
            "parse_layouts)")
    compact = stripped.lower().replace("+", "")
    pos, items = 0, []
    while pos < len(compact):
        match = _FACTOR.match(compact, pos)
        if match is None:
            raise ValueError(
                f"bad layout {text!r} at {compact[pos:]!r}: a layout is factors dp<N>, tp<N>, pp<N>, "
                "vpp<N>, cp<N>, ep<N>, m<N> written together or joined by '+' (e.g. 'dp2+m4', 'tp2', "
                "'pp2vpp2m4', 'ep2+dp2'); "
                "separate layouts with ',', ';' or spaces")
        items.append((match.group(1), int(match.group(2))))
        pos = match.end()
    if not items:
        raise ValueError(f"empty layout in {text!r}")
    keys = [key for key, _ in items]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise ValueError(
            f"layout {text!r} sets {', '.join(repeated)} more than once; to give several layouts separate "
            "them with ',', ';' or spaces (e.g. 'dp2,m4,tp2,pp2,pp2vpp2')")
    values = {_FIELDS[key]: value for key, value in items}
    if "vpp" in values and "pp" in values and "num_microbatches" not in values:
        # Megatron's interleaved schedule needs a multiple of pp micro-batches: with m omitted, take the
        # smallest such count (pp) rather than the usual default of 1.
        values["num_microbatches"] = values["pp"]
    return Layout(**values)


def parse_layouts(texts: Sequence[str] | str) -> list[Layout]:
    """Parse lists of layouts (e.g. ``--layouts`` values, each may hold several) into Layouts, duplicates
    removed.

    Examples: ``"dp2+m4 tp2"``, ``"pp2vpp2m4;dp2+m2"``, ``["m4", "tp2+m2"]``.

    Raises:
        ValueError: naming the bad layout text and the grammar.
    """
    if isinstance(texts, str):
        texts = [texts]
    layouts: list[Layout] = []
    for text in texts:
        for piece in _LAYOUT_SEPARATORS.split(text.strip()):
            if piece:
                layout = parse_layout(piece)
                if layout not in layouts:
                    layouts.append(layout)
    if not layouts:
        raise ValueError(f"no layout given in {list(texts)!r}")
    return layouts
