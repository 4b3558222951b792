"""The hand-written numpy training loop ddtrain is measured against (see loop_common.py).

usage: python -m ddtrain.benchmarks.numpy_loop --batch 64 --samples 60000 --weights init.npz [--reuse]
       mpiexec -n 2 python -m ddtrain.benchmarks.numpy_loop ... --reuse --mpi   (bare data parallel)

plain (default): the math as one writes it first, a new array for every intermediate.
--reuse: the same math into buffers allocated once (``out=``), parameters, gradients and
    momentum as flat vectors updated with whole-vector operations: what an expert writes.
--mpi: (with --reuse) each rank takes its half of a global batch of size x batch, and the
    gradient is summed with one blocking mpi4py Allreduce: the bare data-parallel loop.
--shm: (with --mpi) no Allreduce: parameters and momentum in node shared memory, each rank
    sums and updates its part of them (NodeShared): the physical limit of data parallelism
    on one node.
Set the BLAS threads in the environment (OPENBLAS_NUM_THREADS=1) before starting it.
"""

from __future__ import annotations

import numpy as np

from ddtrain.benchmarks.loop_common import (MOMENTUM, Clock, LossCheck, cosine_lr, load_data, parser,
                                           peak_rss_mb, report, steps_of)

NAMES = ("1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias")


def plain(args, x_all, y_all, mean, std, perm) -> None:
    init = np.load(args.weights)
    W1, b1, W2, b2, W3, b3 = (init[k].astype(np.float32) for k in NAMES)
    params = [W1, b1, W2, b2, W3, b3]
    velocity = [np.zeros_like(p) for p in params]
    B, N = args.batch, len(y_all)
    total = steps_of(N, B)
    clock, loss_sum, correct, check = Clock(), 0.0, 0, LossCheck(args.check_step)
    for step in range(total):
        idx = perm[step * B:(step + 1) * B]
        x = (x_all[idx].astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
        y = y_all[idx]
        n = len(idx)
        rows = np.arange(n)
        a1 = np.maximum(x @ W1.T + b1, 0)
        a2 = np.maximum(a1 @ W2.T + b2, 0)
        z = a2 @ W3.T + b3
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        loss = np.log(s).sum() - z[rows, y].sum()
        correct += int((z.argmax(axis=1) == y).sum())
        dz = e / s
        dz[rows, y] -= 1
        dz /= n
        grads = [None] * 6
        grads[4], grads[5] = dz.T @ a2, dz.sum(axis=0)
        dh2 = (dz @ W3) * (a2 > 0)
        grads[2], grads[3] = dh2.T @ a1, dh2.sum(axis=0)
        dh1 = (dh2 @ W2) * (a1 > 0)
        grads[0], grads[1] = dh1.T @ x, dh1.sum(axis=0)
        lr = cosine_lr(step, total)
        for p, g, v in zip(params, grads, velocity):
            v *= MOMENTUM
            v += g
            p -= lr * v
        loss_sum += float(loss)
        check.seen(step, loss / n)
        clock.tick(n)
    report("numpy", clock, loss / n, epoch_loss=loss_sum / N, epoch_accuracy=correct / N, check_loss=check.loss)


class NodeShared:
    """--shm: the parameters and momentum once per node, and every rank's gradient, in one MPI-3
    shared-memory window; each rank sums and updates only its own part of the flat vectors.

    After backward (every rank's gradient is in its slot) and a sync, rank r adds the other
    slots' part r into its own slot and takes the SGD step on part r of the shared parameters
    and momentum; a second sync publishes the new parameters to every rank's next forward. No
    gradient is copied or sent, and each rank updates 1/L of the vector: the reduction costs
    less than the single process's optimizer alone. (One node only: a benchmark reference.)
    """

    def __init__(self, comm, init_flat):
        from mpi4py import MPI
        self.local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        L, r = self.local.Get_size(), self.local.Get_rank()
        if L != comm.Get_size():
            raise SystemExit("--shm is for ranks on one node")
        n = init_flat.size
        stride = -(-n // 16) * 16  # rows start on 64-byte lines
        self.win = MPI.Win.Allocate_shared((2 + L) * stride * 4 if r == 0 else 0, 4, comm=self.local)
        whole = np.ndarray((2 + L, stride), np.float32, buffer=self.win.Shared_query(0)[0])[:, :n]
        self.flat, self.velocity, self.slots = whole[0], whole[1], whole[2:]
        self.win.Lock_all(MPI.MODE_NOCHECK)
        if r == 0:
            self.flat[...] = init_flat
            self.velocity.fill(0)
        per = -(-n // L // 16) * 16
        self.part = slice(min(n, r * per), min(n, (r + 1) * per))
        self.rank = r
        self.sync()

    def sync(self) -> None:
        self.win.Sync()
        self.local.Barrier()
        self.win.Sync()

    def step(self, lr: float, scratch) -> None:
        p, r = self.part, self.rank
        self.sync()  # every slot holds its rank's gradient
        g = self.slots[r, p]
        for j in range(len(self.slots)):  # two ranks: a + b == b + a exactly, so ranks agree bitwise
            if j != r:
                g += self.slots[j, p]
        v, t = self.velocity[p], scratch[p]
        v *= MOMENTUM
        v += g
        np.multiply(v, lr, out=t)
        self.flat[p] -= t
        self.sync()  # the whole parameter vector is updated


def reuse(args, x_all, y_all, mean, std, perm, comm=None, shm=False) -> None:
    init = np.load(args.weights)
    shapes = [init[k].shape for k in NAMES]
    sizes = [int(np.prod(s)) for s in shapes]
    flat = np.concatenate([init[k].astype(np.float32).ravel() for k in NAMES])
    grad, velocity, scratch = np.zeros_like(flat), np.zeros_like(flat), np.empty_like(flat)
    node = NodeShared(comm, flat) if shm else None
    if node is not None:
        flat, grad = node.flat, node.slots[node.rank]
    offsets = np.cumsum([0] + sizes)
    W1, b1, W2, b2, W3, b3 = (flat[a:b].reshape(s) for a, b, s in zip(offsets, offsets[1:], shapes))
    gW1, gb1, gW2, gb2, gW3, gb3 = (grad[a:b].reshape(s) for a, b, s in zip(offsets, offsets[1:], shapes))
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    if comm is not None:
        from mpi4py.MPI import IN_PLACE
    G, N = args.batch * size, len(y_all)  # the global batch; this rank takes rows [rank*B, (rank+1)*B)
    total = steps_of(N, G)
    bufs = {}

    def buffers(n):
        if n not in bufs:
            e = lambda *shape: np.empty(shape, np.float32)  # noqa: E731
            bufs[n] = dict(raw=np.empty((n, 784), np.uint8), x=e(n, 784), a1=e(n, 512), a2=e(n, 512),
                           z=e(n, 10), m=e(n, 1), s=e(n, 1), d2=e(n, 512), d1=e(n, 512),
                           mask=np.empty((n, 512), bool), rows=np.arange(n))
        return bufs[n]

    clock, loss_sum, correct, check = Clock(), 0.0, 0, LossCheck(args.check_step)
    for step in range(total):
        batch = perm[step * G:(step + 1) * G]
        g = len(batch)
        lo, hi = rank * g // size, (rank + 1) * g // size
        idx = batch[lo:hi]
        n = len(idx)
        b = buffers(n)
        x, a1, a2, z, m, s, d2, d1, mask, rows = (b[k] for k in ("x", "a1", "a2", "z", "m", "s", "d2", "d1",
                                                                  "mask", "rows"))
        np.take(x_all, idx, axis=0, out=b["raw"])
        y = y_all[idx]
        np.divide(b["raw"], np.float32(255), out=x, dtype=np.float32)
        x -= np.float32(mean)
        x /= np.float32(std)
        np.matmul(x, W1.T, out=a1)
        a1 += b1
        np.maximum(a1, 0, out=a1)
        np.matmul(a1, W2.T, out=a2)
        a2 += b2
        np.maximum(a2, 0, out=a2)
        np.matmul(a2, W3.T, out=z)
        z += b3
        np.max(z, axis=1, keepdims=True, out=m)
        z -= m
        correct += int((z.argmax(axis=1) == y).sum())
        loss = -z[rows, y].sum()
        np.exp(z, out=z)
        np.sum(z, axis=1, keepdims=True, out=s)
        z /= s
        np.log(s, out=s)
        loss += s.sum()
        z[rows, y] -= 1  # z is now p - onehot: d loss_sum / d logits
        z *= np.float32(1.0 / g)
        np.matmul(z.T, a2, out=gW3)
        np.sum(z, axis=0, out=gb3)
        np.matmul(z, W3, out=d2)
        np.greater(a2, 0, out=mask)
        d2 *= mask
        np.matmul(d2.T, a1, out=gW2)
        np.sum(d2, axis=0, out=gb2)
        np.matmul(d2, W2, out=d1)
        np.greater(a1, 0, out=mask)
        d1 *= mask
        np.matmul(d1.T, x, out=gW1)
        np.sum(d1, axis=0, out=gb1)
        if node is not None:
            node.step(cosine_lr(step, total), scratch)
            loss_sum += float(loss)
            clock.tick(g)
            continue
        if comm is not None:
            comm.Allreduce(IN_PLACE, grad)  # op defaults to SUM
        velocity *= MOMENTUM
        velocity += grad
        np.multiply(velocity, cosine_lr(step, total), out=scratch)
        flat -= scratch
        loss_sum += float(loss)
        check.seen(step, loss / n)  # this rank's slice: the global mean only with one process
        clock.tick(g)
    if comm is None:
        report("numpy-reuse", clock, loss / n, epoch_loss=loss_sum / N, epoch_accuracy=correct / N,
               check_loss=check.loss)
        return
    rss = comm.gather(peak_rss_mb())  # one line from rank 0: ranks' lines may interleave
    if rank == 0:
        report("numpy+shm" if shm else "numpy+mpi4py", clock, loss / n, peak_rss_mb_per_rank=rss)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--reuse", action="store_true", help="buffers allocated once, flat vectors")
    p.add_argument("--mpi", action="store_true", help="bare data parallel over mpi4py (needs --reuse)")
    p.add_argument("--shm", action="store_true", help="with --mpi: shared-memory parameters, sharded update")
    args = p.parse_args()
    if args.mpi and not args.reuse:
        p.error("--mpi needs --reuse (the flat gradient is what one Allreduce sums)")
    data = load_data(args.data_dir, args.samples)
    if args.mpi:
        from mpi4py import MPI
        reuse(args, *data, comm=MPI.COMM_WORLD, shm=args.shm)
    elif args.reuse:
        reuse(args, *data)
    else:
        plain(args, *data)


if __name__ == "__main__":
    main()
