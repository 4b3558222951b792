"""The threads a layer's chunk loop runs on: one process's cores shared by its own work.

The convolution, BatchNorm and pooling layers work a few samples at a time, so that each
chunk's arrays stay in one core's cache (see ddtrain.engine.conv). A `Team` of T workers runs
those chunks T at a time: the chunk list is cut into T contiguous groups, worker w (the
calling thread is worker 0) runs group w in order, and `run` returns when all are done.

Why threads and not BLAS's own: OpenBLAS splits each product over its threads, and the
convolutions' products are narrow (64 or 192 output channels, a few MB of im2col columns):
on the 2-core EPYC two BLAS threads made a conv2 backward only 1.1x faster, while the
element-wise passes around the products (BatchNorm, pooling, the im2col copies) ran on one
core whatever the thread count. Two workers each running their chunks on a one-thread BLAS
do the copies and the products side by side. While a team runs, BLAS is set to one thread
(numpy releases the GIL in its loops and in BLAS, so the workers do run in parallel).

What a team changes in the results: nothing. Each chunk computes the same rows whichever
worker runs it, and a sum over chunks (Conv2d's weight gradient) is added up in chunk order
once every chunk is done, so a run on T threads gives bitwise the weights of one thread.
A product the workers share out (Linear's, `Team.cut`) is cut into the same pieces for any
team size, one after another on one worker: OpenBLAS's kernels may round an element
differently when a product's width changes (its Haswell sgemm does: 11% of the elements of a
Linear(784 -> 32)'s input gradient at batch 37, cut in 2), so the pieces fix the shapes.
`--deterministic` runs one thread, a team of 1: the plain loop over the same chunks and pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ddtrain.engine import blas


def split(chunks: Sequence, parts: int) -> list[list]:
    """`chunks` cut into at most `parts` contiguous groups, sizes differing by at most one."""
    parts = max(1, min(parts, len(chunks)))
    size, extra = divmod(len(chunks), parts)
    groups, start = [], 0
    for w in range(parts):
        stop = start + size + (w < extra)
        groups.append(list(chunks[start:stop]))
        start = stop
    return groups


class Team:
    """`size` workers for a layer's chunk loop (size 1: the plain loop, in the calling thread),
    and the number of `pieces` a shared-out product is cut into (the same for every size)."""

    # 6 pieces share out evenly on 1, 2, 3 or 6 workers; one thread pays 2-3% on a
    # Linear(3136 -> 128)'s input gradient for running 6 products instead of 1 (2-core EPYC).
    PIECES = 6

    def __init__(self, size: int = 1, pieces: int = PIECES):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"a team needs a positive number of workers, not {size!r}")
        self.size, self.pieces = size, pieces
        # workers beyond the caller; their threads start on the first run
        self._executor = ThreadPoolExecutor(size - 1, thread_name_prefix="ddtrain-team") if size > 1 else None

    def run(self, work: Callable[[int, int, int], None], chunks: Sequence[tuple[int, int]]) -> None:
        """work(slot, start, stop) for every (start, stop) of `chunks`; slot is the worker's
        index (0 <= slot < size), so a worker can own its scratch buffers. Each worker runs its
        group in order. The first exception of any worker is raised after all have stopped."""
        if self.size == 1 or len(chunks) < 2:
            for a, b in chunks:
                work(0, a, b)
            return
        groups = split(chunks, self.size)
        before = blas.threads()
        blas.set_threads(1)
        try:
            futures = [self._executor.submit(_run_group, work, w, g) for w, g in enumerate(groups[1:], 1)]
            error = None
            try:
                _run_group(work, 0, groups[0])
            except BaseException as e:  # wait for the others before raising: they use the buffers
                error = e
            for f in futures:
                try:
                    f.result()
                except BaseException as e:
                    error = error or e
            if error is not None:
                raise error
        finally:
            blas.set_threads(before)

    def cut(self, width: int, min_piece: int) -> list[tuple[int, int]]:
        """(start, stop) ranges cutting `width` into `pieces` (fewer where a piece would be
        narrower than `min_piece`), of sizes differing by at most one. Not a function of `size`."""
        parts = max(1, min(self.pieces, width // min_piece))
        edges = [width * w // parts for w in range(parts + 1)]
        return list(zip(edges[:-1], edges[1:]))

    def __repr__(self) -> str:
        return f"Team({self.size}, pieces={self.pieces})"


def _run_group(work, slot: int, group) -> None:
    for a, b in group:
        work(slot, a, b)


SOLO = Team(1, pieces=1)  # the plain loop, products whole: an MLP (BLAS's own threads), a GPU
_process_threads: list[int] = []  # the thread count configured for this process, remembered


def share_threads(layers, backend) -> Team:
    """Give this process's threads (what BLAS was set to, see configure_threads) to BLAS or to a
    team, for a model of `layers`, and return the team its layers run their chunk loops on.

    A model of products and element-wise layers (an MLP) gets BLAS's threads: OpenBLAS splits
    each product and keeps its threads spinning between calls (a team's hand-off costs 30-70 us
    on a VM, about a tenth of a product at batch 64). A model with chunk loops (convolution,
    BatchNorm, pooling: `Layer.chunked`) gets a team, and BLAS one thread per worker: 1.17x a
    step of the cnn recipe over two BLAS threads (1.38x over one; 2-core EPYC, paired), where
    BLAS's threads, left spinning, would take the second core from the team's worker.
    Such a model gets a team even on one thread: Team(1) runs the same chunks and pieces
    as Team(2), so 1 and 2 threads train the same bits.
    A GPU queues its work on one stream: SOLO. The last model built sets BLAS."""
    if backend.is_gpu:
        return SOLO
    if not _process_threads:
        _process_threads.append(blas.threads())
    n = _process_threads[0]
    if any(getattr(layer, "chunked", False) for layer in layers):
        blas.set_threads(1)
        return Team(n)
    blas.set_threads(n)
    return SOLO
