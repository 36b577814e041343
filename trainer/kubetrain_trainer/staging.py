"""Host staging buffers for DCP saves, allocated once and reused by every save (s3_writer.py's
S3Writer and local_writer.py's LocalWriter share them): the caller of an asynchronous save is blocked
only while its state is copied into them, never while they are created.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class CachedStaging:
    """Stage into host buffers allocated once and reused by every save (pinned only where a GPU is)."""

    state_dict_cache: Any = None

    def allocate(self, state_dict: Any, touch: bool = True) -> None:
        """Create the host buffers for `state_dict`'s tensors. With `touch`, write them once, so that the
        first save does not pay the page faults of fresh memory (pinned memory is resident already)."""
        from torch.distributed._state_dict_utils import _create_cpu_state_dict

        pin = torch.cuda.is_available()
        cache = _create_cpu_state_dict(state_dict, pin_memory=pin)
        if touch and not pin:
            for tensor in _tensors(cache):
                tensor.zero_()
        self.state_dict_cache = cache

    def stage(self, state_dict: Any) -> Any:
        from torch.distributed._state_dict_utils import _copy_state_dict

        if self.state_dict_cache is None:
            self.allocate(state_dict, touch=False)  # the copy below touches every page anyway
        return _copy_state_dict(state_dict, self.state_dict_cache)


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        yield tree.to_local()
    elif isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _tensors(value)
