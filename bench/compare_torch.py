"""Our joint (stage-3) train step against the PyTorch eager peer, on the same CPU, in alternating runs.

    python bench/compare_torch.py --size 128 --batch 4
    python bench/compare_torch.py --size 256 --batch 2 --variants paper,uiqe3 --rounds 4 --steps 2

The peer is ``../shared/reference/torch_cleaq.py`` (a PyTorch rewrite of the authors' joint model:
shared ResNet-34 encoder, 3 residual blocks per U-IQE level, 6-channel U-IQE input). torch is a
bench-only dependency that the project never needs: install it in its own virtualenv outside the
repository and name its interpreter::

    python3.11 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy
    python bench/compare_torch.py --torch-python /work/torchvenv/bin/python

Both sides run as long-lived worker processes pinned to the same ``--threads`` CPUs (torch also gets
``torch.set_num_threads``; XLA sizes its pool from the CPUs it may use). Each has compiled / warmed
up before timing starts; then the controller asks them in turn, ABBA order, for ``--steps`` timed
steps each, so both see the same background load. A worker waiting for its turn is blocked on a
pipe and uses no CPU. Our networks follow the paper, the peer the authors' code, so the two do not
do the same work: FLOPs per image of both sides are printed beside images/s (ours from XLA's cost
analysis, the peer's from torch's FlopCounterMode), and variant ``uiqe3`` runs ours with the peer's
U-IQE depth (``model.uiqe_blocks=3``).

Prints a line per variant and one JSON line with every figure: images/s from the median step
time, CPU-seconds per image (process user + system time: robust to other work on the machine),
the ratio ours / peer of each, and FLOPs per image.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TORCH_REF = os.path.join(os.path.dirname(REPO), "shared", "reference", "torch_cleaq.py")
# Our variants: name -> config overrides (KEY=VALUE as bench/train_step.py --set takes them).
VARIANTS = {"paper": [], "uiqe3": ["model.uiqe_blocks=3"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs (and torch threads) per side")
    p.add_argument("--rounds", type=int, default=4, help="alternations (ABBA) per variant")
    p.add_argument("--steps", type=int, default=2, help="timed steps per side per round")
    p.add_argument("--variants", default="paper,uiqe3", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--torch-python", default="/work/torchvenv/bin/python",
                   help="interpreter with torch installed (kept out of the project's environment)")
    p.add_argument("--torch-ref", default=DEFAULT_TORCH_REF, help="the peer's source file")
    p.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {sorted(VARIANTS)}")
    return args


# --------------------------------------------------------------------------- workers
def serve(step, ready: dict) -> None:
    """Worker loop: print ``ready``, then answer each "run K" line on stdin with K timed steps."""
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        command = line.split()
        if not command or command[0] != "run":
            break
        wall, cpu = [], []
        for _ in range(int(command[1])):
            t, c = time.perf_counter(), _cpu_seconds()
            step()
            wall.append(time.perf_counter() - t)
            cpu.append(_cpu_seconds() - c)
        print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def torch_worker(args: argparse.Namespace) -> None:
    """The peer's joint step (its model, loss, batch and Adam), run by the torch interpreter."""
    import torch

    spec = importlib.util.spec_from_file_location("torch_cleaq", args.torch_ref)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = peer.CLEAQ().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = peer.make_batch(args.batch, args.size)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = peer.joint_loss(model(data[0]), data)
        loss.backward()
        opt.step()
        return loss.item()

    step()  # warm-up: first-touch allocation and oneDNN kernel selection
    serve(step, {"side": "torch", "version": torch.__version__, "threads": torch.get_num_threads()})


def jax_worker(args: argparse.Namespace) -> None:
    """Our stage-3 step, built as training builds it (bench/train_step.py), compiled and warmed up."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import jax
    import train_step as tsb

    cfg = tsb.bench_config("stage3", args.size, args.batch, args.dtype, False, 1.0,
                           tsb.parse_overrides(args.set))
    step, state, batch, _ = tsb.build_step(cfg, "stage3")
    compiled, info = tsb.compile_step(step, state, batch)
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))

    run()
    serve(run, {"side": "jax", "version": jax.__version__, "compile_s": info["compile_s"],
                "flops_per_image": info["flops"] / args.batch, "overrides": args.set})


# --------------------------------------------------------------------------- controller
class Worker:
    """A worker process pinned to ``cpus``; ``ready`` holds its first message."""

    def __init__(self, python: str, args: list[str], cpus: set[int]):
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), *args], cwd=REPO, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        code = self.proc.wait()
        raise RuntimeError(f"worker {self.proc.args[2:]} exited with {code} before answering; see its stderr above")

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(f"run {steps}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def torch_flops(python: str, ref: str, size: int) -> dict:
    """The peer's forward and forward+backward GFLOPs per image from its own ``--flops`` mode."""
    out = subprocess.run([python, ref, "--flops", "--size", str(size), "--batch", "1"], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"forward ([\d.]+) GFLOP, forward\+backward ([\d.]+) GFLOP", out)
    if not m:
        raise RuntimeError(f"{ref} --flops printed no FLOP line:\n{out[-2000:]}")
    return {"forward_gflops": float(m.group(1)), "forward_backward_gflops": float(m.group(2))}


def alternate(ours: Worker, peer: Worker, rounds: int, steps: int) -> dict[str, dict]:
    """ABBA rounds of ``steps`` timed steps per side; returns each side's wall and CPU times."""
    times = {"ours": {"wall": [], "cpu": []}, "peer": {"wall": [], "cpu": []}}
    for r in range(rounds):
        order = (("ours", ours), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("ours", ours))
        for name, worker in order:
            result = worker.run(steps)
            times[name]["wall"] += result["wall"]
            times[name]["cpu"] += result["cpu"]
    return times


def summarise(times: dict, batch: int) -> dict:
    """Median step time -> images/s; median CPU-seconds per image; the raw steps."""
    wall, cpu = statistics.median(times["wall"]), statistics.median(times["cpu"])
    return {"images_per_s": batch / wall, "step_s": wall, "step_s_min": min(times["wall"]),
            "step_s_max": max(times["wall"]), "cpu_s_per_image": cpu / batch,
            "steps": [round(t, 3) for t in times["wall"]]}


def _check_paths(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.torch_ref):
        raise SystemExit(f"--torch-ref {args.torch_ref}: no such file (the peer lives in "
                         "../shared/reference/torch_cleaq.py beside the repository)")
    if not os.access(args.torch_python, os.X_OK):
        raise SystemExit(f"--torch-python {args.torch_python}: no such interpreter; create it with "
                         "`python3.11 -m venv /work/torchvenv && /work/torchvenv/bin/pip install "
                         "torch==2.13.0 numpy`")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        (jax_worker if args.worker == "jax" else torch_worker)(args)
        return
    _check_paths(args)
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(allowed):
        raise SystemExit(f"--threads {args.threads}: this process may use {len(allowed)} CPUs")
    cpus = set(allowed[:args.threads])
    common = ["--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
              "--dtype", args.dtype, "--torch-ref", args.torch_ref]
    peer_flops = torch_flops(args.torch_python, args.torch_ref, args.size)
    peer = Worker(args.torch_python, [*common, "--worker", "torch"], cpus)
    try:
        for variant in args.variants.split(","):
            sets = [a for s in VARIANTS[variant] for a in ("--set", s)]
            ours = Worker(sys.executable, [*common, "--worker", "jax", *sets], cpus)
            load = os.getloadavg()[0]
            times = alternate(ours, peer, args.rounds, args.steps)
            ours.close()
            report(args, variant, ours.ready, peer.ready, times, peer_flops, load)
    finally:
        peer.close()


def report(args, variant, ours_ready, peer_ready, times, peer_flops, load) -> None:
    """One human line and one JSON line for a variant."""
    ours, peer = summarise(times["ours"], args.batch), summarise(times["peer"], args.batch)
    ours["gflops_per_image"] = ours_ready["flops_per_image"] / 1e9
    ours["compile_s"] = round(ours_ready["compile_s"], 1)
    peer["gflops_per_image"] = peer_flops["forward_backward_gflops"]
    ratio = ours["images_per_s"] / peer["images_per_s"]
    cpu_ratio = peer["cpu_s_per_image"] / ours["cpu_s_per_image"]
    print(f"{variant:6s} {args.size} px batch {args.batch}, {args.threads} threads: ours "
          f"{ours['images_per_s']:.3f} img/s ({ours['gflops_per_image']:.0f} GFLOP/img), peer "
          f"{peer['images_per_s']:.3f} img/s ({peer['gflops_per_image']:.0f} GFLOP/img): "
          f"{ratio:.2f}x (CPU time {cpu_ratio:.2f}x), load {load:.1f}", flush=True)
    record = dict(variant=variant, overrides=VARIANTS[variant], size=args.size, batch=args.batch,
                  threads=args.threads, dtype=args.dtype, rounds=args.rounds, steps_per_round=args.steps,
                  ours=ours, peer=peer, ratio=ratio, cpu_ratio=cpu_ratio, load_1min_at_start=load,
                  load_1min_at_end=os.getloadavg()[0], jax=ours_ready["version"], torch=peer_ready["version"],
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
