"""Compile Triton kernel launches for a Hopper GPU (sm_90) on a machine without one.

    python tests/kernels/hopper_compile.py < launches.json

Reads ``[[module, kernel name, signature, constexprs, num_warps], ...]`` (what
``test_hopper_compile.py`` recorded while the kernels ran in the interpreter) and prints one JSON
line: ``{"compiled": n, "failed": [[kernel, constexprs, error], ...]}``. Triton's compiler needs no GPU
to lower a kernel to PTX and assemble it with the ``ptxas`` its wheel carries; it must run in a
process without ``TRITON_INTERPRET=1``, which swaps ``triton.language`` for the interpreter's.
"""

from __future__ import annotations

import importlib
import json
import sys

HOPPER = ("cuda", 90, 32)  # backend, compute capability 9.0, warp size


def compile_launches(launches: list) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target, failed = GPUTarget(*HOPPER), []
    for module, name, signature, constexprs, num_warps in launches:
        kernel = getattr(importlib.import_module(module), name)
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        try:
            triton.compile(source, target=target, options={"num_warps": num_warps})
        except Exception as error:  # every launch is tried: the report names all that fail
            failed.append([name, constexprs, f"{type(error).__name__}: {error}"[-2000:]])
    return {"compiled": len(launches) - len(failed), "failed": failed}


if __name__ == "__main__":
    print(json.dumps(compile_launches(json.load(sys.stdin))))
