"""Losses over integer class labels, each fused with what its gradient needs.

Contract (the trainer and data parallelism rely on it):
  * ``forward(logits, labels)``: logits (N, C) float, labels (N,) integers in [0, C).
    Returns the SUM over the N samples as a 0-d array of the backend (no host sync);
  * ``backward(scale)``: d(scale * loss_sum)/d logits, shape (N, C). The trainer passes
    scale = 1 / global_batch_size, so each rank's gradient is its slice's sum divided by
    the global batch, and an allreduce sum of those is exactly the global mean;
  * ``correct(logits, labels)``: 0-d count of samples whose argmax is the label;
  * returned (N, C) arrays are buffers reused by the next call with the same shape.
"""

from __future__ import annotations


from ddtrain.backend import CPU, Backend
from ddtrain.engine.layers import BufferPool, memory_order
from ddtrain.choices import registry, unknown
from ddtrain import choices
from ddtrain.errors import ConfigError


class Loss:
    """Shared plumbing: the array module, reusable buffers, the accuracy count."""

    def __init__(self, backend: Backend = CPU):
        self.xp = backend.xp
        self._pool = BufferPool()
        self._rows: dict = {}

    def _buf(self, tag, shape, dtype, order="C"):
        return self._pool.get(self.xp, tag, shape, dtype, order)

    def _arange(self, n):
        """arange(n) on the device, cached: the row indices that pick each sample's label column."""
        rows = self._rows.get(n)
        if rows is None:
            rows = self._rows[n] = self.xp.arange(n)
        return rows

    def forward(self, logits, labels):
        raise NotImplementedError

    def backward(self, scale: float):
        raise NotImplementedError

    def correct(self, logits, labels):
        """0-d count of rows where argmax(logits) == label. logits (N, C), labels (N,)."""
        return self.xp.asarray(self.xp.count_nonzero(logits.argmax(axis=1) == labels))


class SoftmaxCrossEntropy(Loss):
    """loss_n = logsumexp(z_n) - z_n[y_n], fused with softmax (gradient softmax - onehot).

    With label smoothing e (torch's CrossEntropyLoss(label_smoothing=e)) the target is
    t = (1 - e) * onehot(y) + e / C, so loss_n = logsumexp(z_n) - sum_c t_c z_nc.
    Stable for any logits: z is shifted by its row max before exp (sum_c t_c = 1, so the shift
    cancels). Keeps the softmax p:
        d(scale * sum_n loss_n)/dz = (p - t) * scale.
    Its (N, C) buffers take the memory order of the logits (Linear writes them column-major):
    mixing orders made every element-wise call of the loss a strided one (forward 26 -> 17 us,
    batch 256). z is computed in p's buffer and its label column read before exp overwrites it.
    """

    def __init__(self, backend: Backend = CPU, label_smoothing: float = 0.0):
        super().__init__(backend)
        self.smoothing = float(label_smoothing)

    def forward(self, logits, labels):
        xp = self.xp
        n, c = logits.shape
        order = memory_order(logits)
        shift = self._buf("shift", (n, 1), logits.dtype)
        xp.max(logits, axis=1, keepdims=True, out=shift)
        p = self._buf("p", (n, c), logits.dtype, order)
        xp.subtract(logits, shift, out=p)  # z = logits - row max
        picked = p[self._arange(n), labels].sum()  # sum_n z_n[y_n]
        if self.smoothing:  # sum_n sum_c t_nc z_nc
            picked = (1 - self.smoothing) * picked + (self.smoothing / c) * p.sum()
        xp.exp(p, out=p)
        s = self._buf("s", (n, 1), logits.dtype)
        xp.sum(p, axis=1, keepdims=True, out=s)
        xp.divide(p, s, out=p)
        xp.log(s, out=s)
        self._p, self._labels, self._n = p, labels, n
        return xp.asarray(s.sum() - picked)

    def backward(self, scale):
        xp, p = self.xp, self._p
        d = self._buf("d", p.shape, p.dtype, memory_order(p))
        if self.smoothing:
            xp.subtract(p, self.smoothing / p.shape[1], out=d)
            xp.multiply(d, scale, out=d)
            d[self._arange(self._n), self._labels] -= (1 - self.smoothing) * scale
        else:
            xp.multiply(p, scale, out=d)
            d[self._arange(self._n), self._labels] -= scale
        return d


class MeanSquaredError(Loss):
    """Regression onto one-hot targets (the single-layer tanh network's loss), PyTorch's MSELoss convention per sample.

    loss_n = (1/C) * sum_c (z_nc - t_nc)^2 with t = onehot(y) (1.0 for the class, 0 elsewhere),
    i.e. MSELoss(reduction='mean') over one sample's C outputs; forward returns sum_n loss_n.
        d(scale * sum_n loss_n)/dz = (2 * scale / C) * (z - t).
    """

    def forward(self, logits, labels):
        xp = self.xp
        n, c = logits.shape
        diff = self._buf("diff", (n, c), logits.dtype)
        xp.copyto(diff, logits)
        diff[self._arange(n), labels] -= 1
        self._diff = diff
        flat = diff.reshape(-1)
        return xp.asarray(xp.dot(flat, flat) / c)

    def backward(self, scale):
        xp, diff = self.xp, self._diff
        d = self._buf("d", diff.shape, diff.dtype)
        xp.multiply(diff, 2.0 * scale / diff.shape[1], out=d)
        return d


class MulticlassHinge(Loss):
    """The multiclass SVM loss (cs231n): loss_n = sum_{j != y_n} max(0, z_nj - z_ny + 1).

    d/dz_nj = scale * [margin_nj > 0] for j != y_n, and d/dz_ny = -scale * (number of such j).
    """

    def forward(self, logits, labels):
        xp = self.xp
        n, c = logits.shape
        rows = self._arange(n)
        margins = self._buf("margins", (n, c), logits.dtype)
        correct_score = logits[rows, labels]
        xp.subtract(logits, correct_score[:, None], out=margins)
        xp.add(margins, 1, out=margins)
        xp.maximum(margins, 0, out=margins)
        margins[rows, labels] = 0
        self._margins, self._labels = margins, labels
        return xp.asarray(margins.sum())

    def backward(self, scale):
        xp, margins = self.xp, self._margins
        n = margins.shape[0]
        d = self._buf("d", margins.shape, margins.dtype)
        xp.sign(margins, out=d)  # margins >= 0, so this is the indicator margin > 0
        d[self._arange(n), self._labels] = -d.sum(axis=1)
        xp.multiply(d, scale, out=d)
        return d


LOSSES = registry(choices.LOSSES, {
    "cross_entropy": SoftmaxCrossEntropy,
    "mse": MeanSquaredError,
    "hinge": MulticlassHinge,
})


def make_loss(name: str, backend: Backend = CPU, label_smoothing: float = 0.0) -> Loss:
    """A new loss by registry name; ConfigError (with a suggestion) for an unknown one."""
    if name not in LOSSES:
        raise ConfigError(unknown("loss", name, LOSSES))
    options = {"label_smoothing": label_smoothing} if label_smoothing else {}
    return LOSSES[name](backend, **options)
