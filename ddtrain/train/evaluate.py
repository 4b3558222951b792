"""Test-set evaluation: sharded over ranks without padding, reduced as sums and counts.

`evaluate_model` is what the trainer calls at the end of every epoch; `evaluate_checkpoint`
is `ddtrain evaluate`. Both give exactly the single-process figure for any number of ranks:
rank r evaluates its contiguous slice of the test set and the ranks sum (loss, correct, count).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddtrain.data.transforms import normalize_batch
from ddtrain.data.order import rank_slice


def evaluate_model(model, loss, test_x, test_y, normalize: str, batch_size: int, comm,
                   stats: tuple[float, float]) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole test set. test_x: (N, ...) uint8, test_y: (N,) int64, on device;
    stats: the dataset's pixel (mean, std) for "standard" normalisation."""
    xp = model.params.backend.xp
    n = len(test_y)
    start, stop = rank_slice(n, comm.rank, comm.size)
    loss_sum = xp.zeros((), dtype=xp.float64)
    correct = xp.zeros((), dtype=xp.int64)
    for a in range(start, stop, batch_size):
        b = min(a + batch_size, stop)
        logits = model.forward(normalize_batch(test_x[a:b], normalize, mean=stats[0], std=stats[1]), train=False)
        loss_sum += loss.forward(logits, test_y[a:b])
        correct += loss.correct(logits, test_y[a:b])
    sums = np.array([float(loss_sum), float(correct), float(stop - start)], dtype=np.float64)
    comm.Allreduce(sums)
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def evaluate_checkpoint(path: Path, data_dir=None, device: str = "auto", warn=print) -> dict:
    """Load a verified checkpoint (a checkpoint directory, or a run directory's newest valid one)."""
    from ddtrain.backend import resolve_backend
    from ddtrain.config import config_from_dict
    from ddtrain.data.registry import load_dataset
    from ddtrain.parallel.comm import SingleProcess
    from ddtrain.engine.losses import make_loss
    from ddtrain.engine.model import build_model
    from ddtrain.errors import CheckpointError
    from ddtrain.train.checkpoint import find_resume_checkpoint, load_checkpoint

    path = Path(path)
    if (path / "checkpoints").is_dir():
        ckpt = find_resume_checkpoint(path / "checkpoints", warn=warn)
        if ckpt is None:
            raise CheckpointError(f"{path}: no valid checkpoint in {path / 'checkpoints'}")
    else:
        ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt.state["config"])
    backend = resolve_backend(device)
    data = load_dataset(cfg.data.dataset, data_dir, train_samples=None)
    model = build_model(cfg.model.layers, data.input_shape, backend, init=cfg.model.init,
                        seed=cfg.train.seed)
    try:
        model.load_state_dict(ckpt.model)
    except ValueError as e:
        raise CheckpointError(f"{ckpt.path.name}: does not fit its own config's model: {e}") from None
    test_x = backend.from_host(data.test_x)
    test_y = backend.from_host(data.test_y.astype(np.int64))
    test_loss, test_acc = evaluate_model(model, make_loss(cfg.model.loss, backend), test_x, test_y, cfg.data.normalize,
                                         cfg.train.eval_batch_size, SingleProcess(),
                                         stats=(data.mean, data.std))
    return {"checkpoint": str(ckpt.path), "step": ckpt.step, "test_loss": test_loss,
            "test_accuracy": test_acc, "samples": int(len(data.test_y))}
