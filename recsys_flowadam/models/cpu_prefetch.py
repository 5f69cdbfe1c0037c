"""``prefetch(a, i, j)``: a hint to the CPU to bring the cache line of ``a[i, j]`` in ahead of use,
for the compiled kernels (imported only where numba is); ``prefetch_row``/``prefetch_row_read``:
every line of row ``i``.

Why: numba has no prefetch call, and the gradient kernel waits on random reads of item rows it
could name several ratings ahead. LLVM's ``llvm.prefetch`` is a hint, never a load: it cannot fault
or change a result, so the kernels' numbers stay the same with or without it. Measured on the 10M
problem's 178k-rating batches at rank 50 (the ratings' part of ``fused_kernels.data_term``, two
threads): 9.1 -> 6.2 ms a batch with the row 4-8 ratings ahead.

The intrinsic uses numba's and llvmlite's code-generation API (``numba.core.cgutils``), which a
numba release may change: a probe compiles it once (numba's cache keeps it), and where that fails
the kernels get a hint that does nothing, with a warning, instead of failing to compile.
"""

import warnings

import numba
import numpy as np


def _intrinsics():
    """``(prefetch, prefetch_read)`` as LLVM prefetch intrinsics."""
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    i32 = ir.IntType(32)

    def codegen_for(for_write: int):
        def codegen(context, builder, signature, args):
            array_type, row_type, col_type = signature.args
            array = context.make_array(array_type)(context, builder, args[0])
            index = [context.cast(builder, args[1], row_type, types.intp),
                     context.cast(builder, args[2], col_type, types.intp)]
            address = cgutils.get_item_pointer(context, builder, array_type, array, index, wraparound=False)
            byte_pointer = ir.IntType(8).as_pointer()
            hint = builder.module.declare_intrinsic(
                "llvm.prefetch", [byte_pointer], ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
            # (address, 0: for a read / 1: for a write, 3: keep in every level, 1: the data cache)
            builder.call(hint, [builder.bitcast(address, byte_pointer), ir.Constant(i32, for_write),
                                ir.Constant(i32, 3), ir.Constant(i32, 1)])
            return context.get_dummy_value()

        return codegen

    def typed(arr, row, col) -> bool:
        return (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(row, types.Integer)
                and isinstance(col, types.Integer))

    @intrinsic
    def prefetch(typingctx, arr, row, col):
        """Prefetch ``arr[row, col]`` of a 2-D array for writing (the gradient kernel updates the rows
        it reads), into every cache level; no bounds check, as none is needed for a hint."""
        return (types.void(arr, row, col), codegen_for(1)) if typed(arr, row, col) else None

    @intrinsic
    def prefetch_read(typingctx, arr, row, col):
        """:func:`prefetch` for a row that is only read."""
        return (types.void(arr, row, col), codegen_for(0)) if typed(arr, row, col) else None

    return prefetch, prefetch_read


@numba.njit(inline="always")
def _no_hint(arr, row, col):
    """The fallback: no hint."""


try:
    prefetch, prefetch_read = _intrinsics()

    @numba.njit(cache=True)
    def _probe(a):
        prefetch(a, 0, 0)
        prefetch_read(a, 0, a.shape[1] - 1)
        return a[0, 0]

    _probe(np.ones((1, 2)))
    ACTIVE = True  # the hints compile here
except Exception as error:  # numba's internals moved: the kernels run without the hint
    warnings.warn(f"the compiled kernels run without prefetch hints ({type(error).__name__}: {error})",
                  RuntimeWarning, stacklevel=2)
    prefetch = prefetch_read = _no_hint
    ACTIVE = False


@numba.njit(inline="always")
def prefetch_row(arr, row):
    """:func:`prefetch` every cache line of ``arr[row]`` (a row need not start on a line, hence its
    last element too); nothing for a row of no elements."""
    width = arr.shape[1]
    if width > 0:
        for col in range(0, width, max(1, 64 // arr.itemsize)):
            prefetch(arr, row, col)
        prefetch(arr, row, width - 1)


@numba.njit(inline="always")
def prefetch_row_read(arr, row):
    """:func:`prefetch_row` for a row that is only read."""
    width = arr.shape[1]
    if width > 0:
        for col in range(0, width, max(1, 64 // arr.itemsize)):
            prefetch_read(arr, row, col)
        prefetch_read(arr, row, width - 1)
