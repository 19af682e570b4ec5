"""Our joint (stage-3) train step against the PyTorch peer, eager and torch.compile'd, on the same CPU,
in alternating runs.

    python bench/compare_torch.py --size 128 --batch 4
    python bench/compare_torch.py --size 256 --batch 2 --variants paper,uiqe3 --rounds 4 --steps 1
    python bench/compare_torch.py --peers eager            # leave out the torch.compile peer

The peer is ``../shared/reference/torch_cleaq.py`` (a PyTorch rewrite of the authors' joint model:
shared ResNet-34 encoder, 3 residual blocks per U-IQE level, 6-channel U-IQE input), loaded from
that path by the torch worker. torch is a bench-only dependency that the project never needs:
install it in its own virtualenv outside the repository and name its interpreter::

    python3.11 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch==2.13.0 numpy
    python bench/compare_torch.py --torch-python /work/torchvenv/bin/python

Every side (ours; the peer in eager mode; the peer's model under ``torch.compile``, inductor, which
needs a C compiler) is a long-lived worker process pinned to the same ``--threads`` CPUs (torch also
gets ``torch.set_num_threads``; XLA sizes its pool from the CPUs it may use). Workers start one at a
time; each compiles (ours: lower + XLA compile; torch.compile: its first step, reported as its
compile time) and runs ``--warmup`` untimed steps. Then each side, alone in turn, runs
``--standalone`` timed steps (its standalone time), and the controller asks the sides in turn, in
alternating order (ABC CBA ...), for ``--steps`` timed steps each, ``--rounds`` times, so all see the
same background load. A worker waiting for its turn is blocked on a pipe and uses no CPU.

Guards against a disturbed run becoming a headline: a warning when the 1-minute load average at
start is above 0.5 (other work is running), and a check of every side's median alternating step
against its standalone median: a difference above 20% is flagged on the side's line and in the
JSON (``disturbed``).

Our networks follow the paper, the peer the authors' code, so the two do not do the same work:
FLOPs per image of both sides (ours from XLA's cost analysis, the peer's from torch's
FlopCounterMode) and GFLOP/s are printed beside images/s, and variant ``uiqe3`` runs ours with the
peer's U-IQE depth (``model.uiqe_blocks=3``).

Prints a line per variant and one JSON line with every figure: images/s from the median step
time, GFLOP/s, CPU-seconds per image (process user + system time: robust to other work on the
machine), the ratios ours / peer of each, compile times and the standalone check.
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
# The peer lives in shared/reference/ beside the repository (or beside the folder of its worktrees).
_REF_CANDIDATES = [os.path.join(up, "shared", "reference", "torch_cleaq.py")
                   for up in (os.path.dirname(REPO), os.path.dirname(os.path.dirname(REPO)))]
DEFAULT_TORCH_REF = next((c for c in _REF_CANDIDATES if os.path.isfile(c)), _REF_CANDIDATES[0])
# Our variants: name -> config overrides (KEY=VALUE as bench/train_step.py --set takes them).
VARIANTS = {"paper": [], "uiqe3": ["model.uiqe_blocks=3"]}


PEERS = ("eager", "compiled")  # the peer in eager mode, and its model under torch.compile
LOAD_LIMIT = 0.5  # 1-minute load average above which the machine is not idle
DISTURBED = 0.20  # relative difference of alternating vs standalone median step that flags a side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPUs (and torch threads) per side")
    p.add_argument("--rounds", type=int, default=4, help="alternations per variant (order reversed every round)")
    p.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side after compilation")
    p.add_argument("--standalone", type=int, default=2, help="timed steps per side, run alone, before alternating")
    p.add_argument("--variants", default="paper,uiqe3", help=f"comma list of {sorted(VARIANTS)}")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {PEERS}")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="our compute dtype")
    p.add_argument("--torch-python", default="/work/torchvenv/bin/python",
                   help="interpreter with torch installed (kept out of the project's environment)")
    p.add_argument("--torch-ref", default=DEFAULT_TORCH_REF, help="the peer's source file")
    p.add_argument("--worker", choices=("jax", *PEERS), help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {sorted(VARIANTS)}")
    for peer in args.peers.split(","):
        if peer not in PEERS:
            p.error(f"--peers: {peer!r} is not one of {PEERS}")
    if min(args.rounds, args.steps, args.standalone) < 1 or args.warmup < 0:
        p.error("--rounds, --steps and --standalone must be at least 1, --warmup at least 0")
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


def torch_worker(args: argparse.Namespace, compiled: bool) -> None:
    """The peer's joint step (its model, loss, batch and Adam), run by the torch interpreter; with
    ``compiled`` the model's forward (and through AOTAutograd its backward) is ``torch.compile``'d."""
    import torch

    spec = importlib.util.spec_from_file_location("torch_cleaq", args.torch_ref)
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = peer.CLEAQ().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = peer.make_batch(args.batch, args.size)
    forward = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = peer.joint_loss(forward(data[0]), data)
        loss.backward()
        opt.step()
        return loss.item()

    start = time.perf_counter()
    step()  # eager: first-touch allocation and oneDNN kernel selection; compiled: tracing + inductor
    first_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    serve(step, {"side": args.worker, "version": torch.__version__, "threads": torch.get_num_threads(),
                 "compile_s": first_s if compiled else None, "first_step_s": first_s})


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

    start = time.perf_counter()
    run()
    first_s = time.perf_counter() - start
    for _ in range(args.warmup):
        run()
    serve(run, {"side": "ours", "version": jax.__version__, "compile_s": info["compile_s"],
                "first_step_s": first_s, "flops_per_image": info["flops"] / args.batch,
                "overrides": args.set})


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


def standalone(workers: dict[str, Worker], steps: int) -> dict[str, list[float]]:
    """Each side alone (the others blocked on their pipes): ``steps`` timed steps, wall seconds."""
    return {name: w.run(steps)["wall"] for name, w in workers.items()}


def alternate(workers: dict[str, Worker], rounds: int, steps: int) -> dict[str, dict]:
    """Rounds of ``steps`` timed steps per side, the order reversed every round (ABC CBA ...);
    returns each side's wall and CPU times."""
    times = {name: {"wall": [], "cpu": []} for name in workers}
    names = list(workers)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            result = workers[name].run(steps)
            times[name]["wall"] += result["wall"]
            times[name]["cpu"] += result["cpu"]
    return times


def summarise(times: dict, alone: list[float], batch: int, gflops_per_image: float) -> dict:
    """Median step time -> images/s and GFLOP/s; median CPU-seconds per image; the raw steps; the
    standalone median and whether the alternating median strays from it by more than DISTURBED."""
    wall, cpu = statistics.median(times["wall"]), statistics.median(times["cpu"])
    alone_s = statistics.median(alone)
    drift = wall / alone_s - 1.0
    return {"images_per_s": batch / wall, "gflops_per_image": gflops_per_image,
            "gflops_per_s": gflops_per_image * batch / wall, "step_s": wall,
            "step_s_min": min(times["wall"]), "step_s_max": max(times["wall"]),
            "cpu_s_per_image": cpu / batch, "steps": [round(t, 3) for t in times["wall"]],
            "standalone_step_s": alone_s, "standalone_steps": [round(t, 3) for t in alone],
            "vs_standalone": drift, "disturbed": abs(drift) > DISTURBED}


def _check_paths(args: argparse.Namespace) -> None:
    if not os.path.isfile(args.torch_ref):
        raise SystemExit(f"--torch-ref {args.torch_ref}: no such file (the peer lives in "
                         "../shared/reference/torch_cleaq.py beside the repository)")
    if not os.access(args.torch_python, os.X_OK):
        raise SystemExit(f"--torch-python {args.torch_python}: no such interpreter; create it with "
                         "`python3.11 -m venv /work/torchvenv && /work/torchvenv/bin/pip install "
                         "torch==2.13.0 numpy`")


def load_warning(load: float) -> str | None:
    """The warning for a 1-minute load average ``load`` at start, or None on an idle machine."""
    if load <= LOAD_LIMIT:
        return None
    return (f"WARNING: 1-minute load average {load:.2f} > {LOAD_LIMIT} at start: other work is running, "
            "so these figures are disturbed and must not be quoted as the comparison")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        jax_worker(args) if args.worker == "jax" else torch_worker(args, args.worker == "compiled")
        return
    _check_paths(args)
    start_load = os.getloadavg()[0]
    warning = load_warning(start_load)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= args.threads <= len(allowed):
        raise SystemExit(f"--threads {args.threads}: this process may use {len(allowed)} CPUs")
    cpus = set(allowed[:args.threads])
    common = ["--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
              "--dtype", args.dtype, "--torch-ref", args.torch_ref, "--warmup", str(args.warmup)]
    peer_flops = torch_flops(args.torch_python, args.torch_ref, args.size)
    peers: dict[str, Worker] = {}
    try:
        for name in args.peers.split(","):  # one at a time: a compiling worker has the CPUs alone
            peers[name] = Worker(args.torch_python, [*common, "--worker", name], cpus)
        for variant in args.variants.split(","):
            sets = [a for s in VARIANTS[variant] for a in ("--set", s)]
            ours = Worker(sys.executable, [*common, "--worker", "jax", *sets], cpus)
            workers = {"ours": ours, **peers}
            load = os.getloadavg()[0]
            alone = standalone(workers, args.standalone)
            times = alternate(workers, args.rounds, args.steps)
            ours.close()
            report(args, variant, {n: w.ready for n, w in workers.items()}, times, alone, peer_flops,
                   load, start_load, warning)
    finally:
        for w in peers.values():
            w.close()


def report(args, variant, ready, times, alone, peer_flops, load, start_load, warning) -> None:
    """One human line and one JSON line for a variant."""
    sides = {}
    for name in times:
        gflops = (ready[name]["flops_per_image"] / 1e9 if name == "ours"
                  else peer_flops["forward_backward_gflops"])
        sides[name] = summarise(times[name], alone[name], args.batch, gflops)
        sides[name]["compile_s"] = ready[name]["compile_s"]
        sides[name]["first_step_s"] = ready[name]["first_step_s"]
    ours = sides["ours"]
    ratios = {name: {"images_per_s": ours["images_per_s"] / side["images_per_s"],
                     "gflops_per_s": ours["gflops_per_s"] / side["gflops_per_s"],
                     "cpu_time": side["cpu_s_per_image"] / ours["cpu_s_per_image"]}
              for name, side in sides.items() if name != "ours"}

    def part(name):
        side = sides[name]
        text = (f"{name} {side['images_per_s']:.3f} img/s ({side['gflops_per_image']:.1f} GFLOP/img, "
                f"{side['gflops_per_s']:.0f} GFLOP/s")
        if side["compile_s"] is not None:
            text += f", compile {side['compile_s']:.0f} s"
        if side["disturbed"]:
            text += f", DISTURBED: {100 * side['vs_standalone']:+.0f}% vs standalone {side['standalone_step_s']:.2f} s"
        text += ")"
        if name in ratios:
            r = ratios[name]
            text += (f": {r['images_per_s']:.2f}x img/s, {r['gflops_per_s']:.2f}x GFLOP/s "
                     f"(CPU time {r['cpu_time']:.2f}x)")
        return text

    print(f"{variant:6s} {args.size} px batch {args.batch}, {args.threads} threads: "
          + "; ".join(part(n) for n in sides) + f"; load {load:.1f}", flush=True)
    record = dict(variant=variant, overrides=VARIANTS[variant], size=args.size, batch=args.batch,
                  threads=args.threads, dtype=args.dtype, rounds=args.rounds, steps_per_round=args.steps,
                  warmup=args.warmup, standalone=args.standalone, sides=sides, ratios=ratios,
                  disturbed=[n for n, s in sides.items() if s["disturbed"]],
                  load_1min_at_start=start_load, load_warning=warning, load_1min_variant_start=load,
                  load_1min_at_end=os.getloadavg()[0], jax=ready["ours"]["version"],
                  torch=next((r["version"] for n, r in ready.items() if n != "ours"), None),
                  commit=_commit(), time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    print(json.dumps(record), flush=True)


def _commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() or None


if __name__ == "__main__":
    main()
