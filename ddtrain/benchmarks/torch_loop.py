"""The PyTorch training loop ddtrain is measured against (see loop_common.py).

usage: python -m ddtrain.benchmarks.torch_loop --batch 64 --samples 60000 --weights init.npz [--device cuda]

What a PyTorch user writes for this model: torch.nn.Sequential, F.cross_entropy,
torch.optim.SGD(momentum=0.9) with its defaults, zero_grad() each step, on one thread
(torch.set_num_threads(1), and OMP/MKL_NUM_THREADS=1 in the environment). The batch is
gathered with index_select from the uint8 dataset in memory and standardised in float32,
as ddtrain does it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddtrain.benchmarks.loop_common import (BASE_LR, MOMENTUM, Clock, LossCheck, cosine_lr, load_data, parser,
                                           report, steps_of)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="torch device: cpu (1 thread) or cuda (ddtrain bench's gpu section)")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    x_all, y_all, mean, std, perm = load_data(args.data_dir, args.samples)
    # The dataset lives on the device as uint8, as in ddtrain (a writable copy first).
    x_all, y_all = torch.from_numpy(np.array(x_all)).to(device), torch.from_numpy(y_all).to(device)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    init = np.load(args.weights)
    model.load_state_dict({k: torch.from_numpy(init[k].astype(np.float32)) for k in init.files})
    model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=BASE_LR, momentum=MOMENTUM)
    B, N = args.batch, len(y_all)
    total = steps_of(N, B)
    perm = torch.from_numpy(perm).to(device)
    clock, check = Clock(), LossCheck(args.check_step)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    if device.type == "cuda":  # GPU work is asynchronous: time what has finished
        clock.sync = torch.cuda.synchronize
    for step in range(total):
        idx = perm[step * B:(step + 1) * B]
        x = x_all.index_select(0, idx).to(torch.float32).div_(255).sub_(mean).div_(std)
        y = y_all.index_select(0, idx)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, total)
        opt.step()
        with torch.no_grad():
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(dim=1) == y).sum()
        check.seen(step, loss.detach())
        clock.tick(len(idx))
    report("torch", clock, float(loss.detach()), epoch_loss=float(loss_sum) / N, epoch_accuracy=int(correct) / N,
           check_loss=check.loss,
           torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
