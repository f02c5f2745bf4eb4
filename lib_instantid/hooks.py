"""A registry of the torch hooks one generation installs, so that all of them go away together.

Every patch this extension makes to the webui's models is a forward hook or forward pre-hook:
no weight, attribute or method of the webui's modules is changed, so removing the handles restores
the models exactly. Each hook function is tagged; ``purge_stale_hooks`` removes tagged hooks that
somehow survived (a crashed process cannot leave any, but a reloaded extension could).
"""

from __future__ import annotations

from typing import Callable, List

import torch

_TAG = "_instantid_hook"


def _tag(fn: Callable) -> Callable:
    setattr(fn, _TAG, True)
    return fn


class HookSet:
    """Handles of the hooks installed for one generation."""

    def __init__(self) -> None:
        self._handles: List[torch.utils.hooks.RemovableHandle] = []

    def __len__(self) -> int:
        return len(self._handles)

    def pre(self, module: torch.nn.Module, fn: Callable, with_kwargs: bool = False) -> None:
        self._handles.append(module.register_forward_pre_hook(_tag(fn), with_kwargs=with_kwargs))

    def post(self, module: torch.nn.Module, fn: Callable, with_kwargs: bool = False,
             always_call: bool = False) -> None:
        self._handles.append(module.register_forward_hook(
            _tag(fn), with_kwargs=with_kwargs, always_call=always_call))

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()


def purge_stale_hooks(root: torch.nn.Module) -> int:
    """Remove hooks of this extension left on ``root`` or its submodules; return how many."""
    removed = 0
    for module in root.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, fn in hooks.items() if getattr(fn, _TAG, False)]:
                del hooks[key]
                for extra in ("_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                              "_forward_hooks_always_called"):
                    getattr(module, extra, {}).pop(key, None)
                removed += 1
    return removed


def count_hooks(root: torch.nn.Module) -> int:
    """All forward hooks and pre-hooks on ``root`` and its submodules (ours and others')."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in root.modules())
