"""Where the GPU time of the small ops goes (run on the GPU machine after the build):
a traceback of the CUDA tree search if it fails, then per-call time and the profiler's top
entries for policy_loss (ppo + k3) forward+backward and gae (whitened) at the bench's sizes,
then the aten ops and syncs per forward call of the small ops on the cuda and triton backends
(tests/hostops.py; the counts tests/ops/test_gpu_host_ops.py pins, here on a GPU)."""
import time
import traceback

import torch

from rlfuse.ops import gae, group_advantages, policy_loss

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


def host_ops(dev, backends):
    """Aten ops / syncs per forward call of the GPU paths (tests/hostops.py; pinned on the
    Triton path by tests/ops/test_gpu_host_ops.py), on this device's tensors."""
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from tests.hostops import count_host_ops

    g = torch.Generator(device="cpu").manual_seed(1)
    B, T = 8, 64
    x = (-torch.rand(B, T, generator=g)).to(dev).requires_grad_()
    o, a, rf = (torch.randn(B, T, generator=g).to(dev) for _ in range(3))
    mk = (torch.rand(B, T, generator=g) < 0.9).float().to(dev)
    mi = mk.long()
    ids = (torch.arange(B) // 4).to(dev)
    calls = {
        "policy_loss ppo+k3": lambda b: policy_loss(x, o, a, mk, ref_logp=rf, beta=0.04,
                                                    backend=b),
        "gae whiten": lambda b: gae(o, a, mi, gamma=1.0, lam=0.95, whiten=True, backend=b),
        "group_advantages": lambda b: group_advantages(a, group_ids=ids, mask=mi,
                                                       semantics="verl", backend=b),
    }
    for b in backends:
        for name, fn in calls.items():
            fn(b)
            with count_host_ops() as c:
                fn(b)
            print(f"{b:7s} {name:20s} {c.summary()}")


print("== host ops per forward call (compute = launches)")
try:
    host_ops(dev, ("cuda", "triton"))
except Exception:
    traceback.print_exc()
