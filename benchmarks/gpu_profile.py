"""Where the GPU time of the small ops goes (run on the GPU machine after the build):
a traceback of the CUDA tree search if it fails, then per-call time and the profiler's top
entries for policy_loss (ppo + k3) forward+backward and gae (whitened) at the bench's sizes."""
import time
import traceback

import torch

from rlfuse.ops import gae, policy_loss

dev = torch.device("cuda")


def timed(fn, n=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n, (time.perf_counter() - t0) / n * 1e3


def profile(name, fn):
    gpu_ms, host_ms = timed(fn)
    print(f"== {name}: {gpu_ms:.3f} ms per call (events), host {host_ms:.3f} ms")
    from torch.profiler import ProfilerActivity, profile as prof
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))
    print(p.key_averages().table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=48))


print("== search on cuda")
try:
    from rlfuse.bench.search import HashEnv
    from rlfuse.search import puct_search, gumbel_search
    env = HashEnv(64, device=dev)
    root = env.root(64)
    for s in (puct_search, gumbel_search):
        out = s(root, env.step, 32)
        torch.cuda.synchronize()
        print(s.__name__, "ok", type(out).__name__)
except Exception:
    traceback.print_exc()

g = torch.Generator(device=dev).manual_seed(0)
B, T = 64, 4096
lp = (-torch.rand(B, T, device=dev, generator=g) * 3).requires_grad_()
old = lp.detach() + 0.1 * torch.randn(B, T, device=dev, generator=g)
ref = lp.detach() + 0.1 * torch.randn(B, T, device=dev, generator=g)
adv = torch.randn(B, T, device=dev, generator=g)
mask = torch.rand(B, T, device=dev, generator=g) < 0.9


def pl():
    loss, _ = policy_loss(lp, old, adv, mask, ref_logp=ref, beta=0.04)
    loss.backward()


profile("policy_loss ppo+k3 fwd+bwd B=64 T=4096 (cuda)", pl)
r = torch.randn(1024, 4096, device=dev, generator=g)
v = torch.randn(1024, 4096, device=dev, generator=g)
m = torch.rand(1024, 4096, device=dev, generator=g) < 0.9
profile("gae whiten B=1024 T=4096 (cuda)", lambda: gae(r, v, m, gamma=1.0, lam=0.95, whiten=True))
