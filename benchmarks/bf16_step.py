"""One ResNet-20 training step (batch 128, SGD Nesterov) in float32 and bf16 autocast, with the model and
input contiguous or channels_last: median milliseconds over steps 6-30 (training ratio).

    OODFORGE_DATA=... python benchmarks/bf16_step.py
"""

import time

import torch

from oodforge.data.benchmarks import get_benchmark
from oodforge.training.config import TrainConfig
from oodforge.training.loop import make_model

torch.manual_seed(0)
cfg = TrainConfig(benchmark="cifar10")
b = get_benchmark("cifar10")


def run(prec, cl, n=30):
    m = make_model(cfg, b)
    if cl:
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(128, 3, 32, 32)
    y = torch.randint(0, 10, (128,))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    m.train()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=prec == "bf16"):
            out = m(x)
            logits = out[0] if isinstance(out, tuple) else out
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ts.append(time.perf_counter() - t)
    return sorted(ts[5:])[len(ts[5:]) // 2]


for prec in ["fp32", "bf16"]:
    for cl in [False, True]:
        print(prec, "channels_last" if cl else "contig", round(run(prec, cl) * 1000, 1), "ms", flush=True)
