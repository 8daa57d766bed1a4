"""A mapping of tensors made when looked up, so a loaded or converted copy lives only while used."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any


class LazyTensors(Mapping):
    """name -> tensor, each made by its loader at every lookup and never kept here.

    Loading looks each tensor up once: a de-interleaved or quantized copy is made, repacked by
    the kernels and freed before the next one, instead of every copy living until the model
    is built (which would double the memory a load needs).
    """

    def __init__(self, loaders: Mapping[str, Callable[[], Any]], shapes: Mapping[str, tuple[int, ...]] | None = None):
        self._loaders = dict(loaders)
        self.shapes = dict(shapes) if shapes is not None else None  # known without making the tensors

    def __getitem__(self, name: str) -> Any:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def __contains__(self, name: object) -> bool:  # Mapping's default would make the tensor
        return name in self._loaders


def shapes_of(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor, without making those of a LazyTensors that knows them."""
    if isinstance(tensors, LazyTensors) and tensors.shapes is not None:
        return tensors.shapes
    return {name: tuple(w.shape) for name, w in tensors.items()}
