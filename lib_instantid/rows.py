"""Row labels: which rows of each UNet call are conditional and which unconditional.

In one CFG step the webui builds ``x_in`` = [cond rows (several per image with AND-prompts),
uncond rows] and then calls the model on that whole tensor or on consecutive slices of it:
one call, chunks of batch-size rows (batch cond/uncond off), cond and uncond separately (prompt and
negative of different lengths), or the cond rows alone (uncond skipped on some steps). Every call's
``x`` is a view into ``x_in``; its storage offset says exactly which rows it holds. Where a caller
passes a copy instead, consecutive calls are assumed to walk ``x_in`` in order, which is what every
webui layout does.

Labels are worked out per call; nothing assumes the row mix of an earlier call.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("instantid")

COND, UNCOND = 0, 1


def _row_offset(x: torch.Tensor, base: torch.Tensor) -> Optional[int]:
    """Index of the first row of ``x`` inside ``base`` if ``x`` is a slice of it, else None."""
    if x.dim() != base.dim() or x.dim() == 0 or x.device != base.device:
        return None
    try:
        if x.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            return None
    except (RuntimeError, NotImplementedError):
        return None
    if x.stride(0) != base.stride(0) or base.stride(0) == 0:
        return None
    delta = x.storage_offset() - base.storage_offset()
    if delta < 0:
        return None
    row = delta // base.stride(0)
    return row if row + x.shape[0] <= base.shape[0] else None


class RowLabeler:
    """Keeps the current CFG step's layout and labels the rows of each model call."""

    def __init__(self) -> None:
        self._x_in: Optional[torch.Tensor] = None
        self._kinds: Optional[torch.Tensor] = None
        self._cursor = 0
        self._warned = False

    def begin_step(self, x_in: torch.Tensor, n_cond: int) -> None:
        """Called once per CFG step with the full ``x_in`` and the number of its cond rows."""
        n = x_in.shape[0]
        kinds = torch.full((n,), UNCOND, dtype=torch.long)
        kinds[: min(n_cond, n)] = COND
        self._x_in, self._kinds, self._cursor = x_in, kinds, 0

    def end(self) -> None:
        self._x_in = self._kinds = None
        self._cursor = 0

    def kinds_for_call(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row kind (COND=0 / UNCOND=1) for a model call on ``x``.

        Outside a known CFG step (a caller that bypasses the webui's CFG denoiser) every row is
        treated as conditional, with one warning.
        """
        n = x.shape[0]
        if self._x_in is not None:
            row = _row_offset(x, self._x_in)
            if row is None and self._cursor + n <= self._kinds.shape[0]:
                row = self._cursor
            if row is not None:
                self._cursor = row + n
                return self._kinds[row: row + n]
        if not self._warned:
            self._warned = True
            log.warning("InstantID: a model call of %d rows came from outside the webui's CFG "
                        "step; its rows are treated as conditional.", n)
        return torch.full((n,), COND, dtype=torch.long)
