"""A second device on a CPU-only machine, and a process group that serves it alone -- like NCCL.

On a GPU the process group runs NCCL, which serves CUDA tensors only: a collective on a CPU tensor
raises "No backend type associated with device type cpu". CPU tests run gloo, which serves CPU
tensors, so a loop that builds its collective tensors on the host passes them all and crashes at
the first GPU step. This module brings that failure to the CPU:

- :class:`OnDevice` is a tensor whose data live in CPU memory but which reports itself on
  ``DEVICE`` (``meta``: a device type every torch build knows and nothing here computes on);
- :class:`FakeAccelerator` (a torch function mode plus a dispatch mode) creates such tensors for
  every ``device=DEVICE`` / ``.to(DEVICE)`` and runs each op on the CPU data, and makes every
  collective (the ``c10d`` ops under ``torch.distributed``) refuse a tensor on any other device,
  with NCCL's message. Object collectives put their bytes on the device the backend names (NCCL:
  the current CUDA device); the mode names ``DEVICE``.

Usage: give the code under test ``DEVICE`` where it would get ``engine.device`` and run it inside
``with FakeAccelerator():`` with a (gloo) process group initialized.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

DEVICE = torch.device("meta")
# The backend picks these tensors itself (a barrier's token), as NCCL does on its own device.
BACKEND_OWN_TENSORS = {"barrier"}


def on_device(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == DEVICE.type


class OnDevice(torch.Tensor):
    """CPU data that reports ``DEVICE`` as its device."""

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        tensor = torch.Tensor._make_wrapper_subclass(
            cls,
            data.shape,
            strides=data.stride(),
            dtype=data.dtype,
            device=DEVICE,
            requires_grad=data.requires_grad,
        )
        tensor.data_ = data
        return tensor

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return NotImplemented  # FakeAccelerator's dispatch mode runs every op

    def __repr__(self):
        return f"OnDevice({self.data_!r})"


def _wrap(out):
    return tree_map(lambda x: OnDevice(x) if type(x) is torch.Tensor else x, out)


def _unwrap(tree):
    return tree_map(lambda x: x.data_ if isinstance(x, OnDevice) else x, tree)


class _Placement(TorchFunctionMode):
    """``device=DEVICE`` and ``.to(DEVICE)`` make OnDevice tensors; host reads unwrap them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        to_device = False
        if on_device(kwargs.get("device")):
            kwargs["device"], to_device = "cpu", True
        if func is torch.Tensor.to and any(on_device(a) for a in args[1:]):
            args, to_device = tuple("cpu" if on_device(a) else a for a in args), True
        if func in (torch.Tensor.tolist, torch.Tensor.numpy) and isinstance(args[0], OnDevice):
            return func(args[0].data_, *args[1:], **kwargs)
        out = func(*args, **kwargs)
        return _wrap(out) if to_device else out


class _Collectives(TorchDispatchMode):
    """Runs ops on the CPU data; a collective refuses any tensor not on ``DEVICE``."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        if func.namespace == "c10d" and func._opname not in BACKEND_OWN_TENSORS:
            for tensor in tensors:
                if tensor.device.type != DEVICE.type:
                    raise RuntimeError(
                        f"No backend type associated with device type {tensor.device.type} "
                        f"(this process group serves {DEVICE.type} tensors only, as NCCL serves cuda)"
                    )
        to_host = func is torch.ops.aten._to_copy.default and not on_device(kwargs.get("device", DEVICE))
        out = func(*_unwrap(args), **_unwrap(kwargs))
        if func.namespace == "c10d" or to_host or not any(isinstance(x, OnDevice) for x in tensors):
            return out
        return _wrap(out)


@contextlib.contextmanager
def FakeAccelerator():  # noqa: N802 (used like a class: `with FakeAccelerator():`)
    saved = c10d._get_object_coll_device
    c10d._get_object_coll_device = lambda group=None: DEVICE
    try:
        with _Placement(), _Collectives():
            yield DEVICE
    finally:
        c10d._get_object_coll_device = saved
