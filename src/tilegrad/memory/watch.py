"""Module bookkeeping for the estimator: a stack of running modules, per-leaf outputs, autograd nodes labelled
with the module that made them (NOTE [ Autograd node labels ]), and the innermost module an error left
(NOTE [ Naming the failing layer ] in diagnose.py)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..geometry.toolkit import observer_hook
from .diagnose import Failure

__all__ = ["NODE_LABEL", "ModuleWatch", "tensors_of"]

NODE_LABEL = "tilegrad.memory.module"


def tensors_of(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class ModuleWatch:
    """Forward hooks on every module: which module is running, what leaf modules output, who made which node."""

    def __init__(self, model: nn.Module, root_name: str, *, record_outputs: bool, label_nodes: bool) -> None:
        self.names: dict[nn.Module, str] = {}
        self.leaf: dict[str, bool] = {}
        self.types: dict[str, str] = {}
        for name, module in model.named_modules():
            self.names[module] = name
            self.leaf[name] = next(iter(module.children()), None) is None
            self.types[name] = type(module).__name__
        self.root_name = root_name
        self.stack: list[str] = []
        self.order: list[str] = []
        self.outputs: dict[str, list[list[torch.Tensor]]] = {}
        self.calls: dict[str, int] = {}
        self.record_outputs = (
            record_outputs  # keeps outputs alive: only in the layer pass, never in the timeline
        )
        self.label_nodes = label_nodes
        self._boundaries: list[set[Any]] = []
        self._handles: list[Any] = []
        self._model = model
        self.failure: Failure | None = None

    def display(self, name: str) -> str:
        return name or self.root_name

    def __enter__(self) -> ModuleWatch:
        for module in self.names:
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @observer_hook
    def _pre(self, module: nn.Module, args: Any) -> None:
        name = self.names[module]
        self.stack.append(name)
        if name not in self.calls:
            self.order.append(name)
            self.calls[name] = 0
        self.calls[name] += 1
        if self.label_nodes:
            self._boundaries.append({t.grad_fn for t in tensors_of(args) if t.grad_fn is not None})

    @observer_hook
    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names[module]
        if output is None:
            # Hooks with always_call=True also run while an error leaves the module, innermost module first, with
            # output None: remember that module for the error message (NOTE [ Naming the failing layer ]).
            error = sys.exc_info()[1]
            if error is not None and (self.failure is None or self.failure.error is not error):
                self.failure = Failure(error, name, module, [tuple(t.shape) for t in tensors_of(args)])
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        outs = tensors_of(output)
        if self.record_outputs and self.leaf[name]:
            self.outputs.setdefault(name, []).append(outs)
        if self.label_nodes:
            # NOTE [ Autograd node labels ]: the module that made an autograd node is written into the node's own
            # ``metadata`` dict, which lives and dies with the node. Nothing here holds a node, so graphs that
            # modules build again inside backward (streamed tiles, reversible blocks, checkpoints) get labelled
            # too without being kept alive (a dict of nodes would keep their saved tensors and inflate the peak).
            boundary = self._boundaries.pop() if self._boundaries else set()
            todo = [t.grad_fn for t in outs if t.grad_fn is not None]
            while todo:
                node = todo.pop()
                if node is None or node in boundary or NODE_LABEL in node.metadata:
                    continue
                node.metadata[NODE_LABEL] = name
                todo.extend(next_node for next_node, _ in node.next_functions)
            del todo, boundary

    def where(self) -> str:
        return self.display(self.stack[-1]) if self.stack else self.root_name

    @staticmethod
    def node_label(node: Any) -> str | None:
        """The module that made autograd ``node`` (NOTE [ Autograd node labels ]), if it was watched."""
        return node.metadata.get(NODE_LABEL)

    def failure_of(self, error: BaseException) -> Failure | None:
        """The innermost module that ``error`` (or an error it was raised from) left, if one did."""
        seen = set()
        while error is not None and id(error) not in seen:
            seen.add(id(error))
            if self.failure is not None and self.failure.error is error:
                return self.failure
            error = error.__cause__ or error.__context__
        return None
