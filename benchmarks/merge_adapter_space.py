"""LoRA → LoRA merging: splice's adapter-space merge vs peft's ``add_weighted_adapter``.

Run by hand (~1 min on 2 cores)::

    .venv/bin/python benchmarks/merge_adapter_space.py

Builds a random Llama (hidden 256, 2 layers, vocab 1000) and three PEFT LoRAs (rank 8 on
q/v/up_proj, random A and B), then reports, against the exact ``Σ w_i ΔW_i`` computed here
from the adapter files: peft's ``combination_type="linear"`` and ``"svd"`` merges, and
splice's ``task_arithmetic`` with ``rank: exact`` and ``rank: 8``; for TIES (density 0.5)
splice's relative error at ranks 4…24 (reported by the ledger, i.e. ‖ΔW − B·A‖/‖ΔW‖).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS = [0.5, 0.3, 0.2]


def main() -> None:
    import peft
    import transformers

    from splice.merge import merge
    from tests.merge.output.test_adapter import reference_deltas

    root = Path(tempfile.mkdtemp(prefix="splice-adapter-bench-"))
    cfg = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")
    names = ["a", "b", "c"]
    for i, name in enumerate(names):
        torch.manual_seed(i + 1)
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        lora = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
            init_lora_weights=False,
        )  # fmt: skip
        peft.get_peft_model(model, lora).save_pretrained(root / name)
    refs = [reference_deltas(root / n) for n in names]
    exact = {k: sum(w * r[k] for w, r in zip(WEIGHTS, refs, strict=True)) for k in refs[0]}

    def error(deltas: dict[str, torch.Tensor]) -> float:
        num = sum(float((deltas[k].double() - v).norm() ** 2) for k, v in exact.items())
        return math.sqrt(num / sum(float(v.norm() ** 2) for v in exact.values()))

    rows = []
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    pm = peft.PeftModel.from_pretrained(model, root / "a", adapter_name="a")
    for n in names[1:]:
        pm.load_adapter(root / n, adapter_name=n)
    for kind in ("linear", "svd"):
        pm.add_weighted_adapter(names, WEIGHTS, f"m_{kind}", combination_type=kind)
        got = {}
        for mod_name, module in pm.base_model.model.named_modules():
            if hasattr(module, "lora_A") and f"m_{kind}" in module.lora_A:
                got[f"{mod_name}.weight"] = module.get_delta_weight(f"m_{kind}")
        rows.append((f"peft add_weighted_adapter({kind!r})", error(got)))
    models = [
        {"path": str(root / n), "params": {"weight": w}}
        for n, w in zip(names, WEIGHTS, strict=True)
    ]
    for rank in ("exact", 8):
        recipe = {"method": "task_arithmetic", "models": models, "output": "adapter"}
        out = merge({**recipe, "rank": rank}, root / f"ta_{rank}")
        report = json.loads((out / "splice-ledger.json").read_text())["adapter"]
        rows.append((f"splice task_arithmetic, rank {rank}", report["relative_error_total"]))
        got = reference_deltas(out)
        rows.append(("  (recomputed from the written adapter)", error(got)))
    for rank in (4, 8, 16, 24):
        recipe = {"method": "ties", "models": models, "output": "adapter", "rank": rank}
        recipe["params"] = {"density": 0.5, "scope": "tensor"}
        out = merge(recipe, root / f"ties_{rank}")
        report = json.loads((out / "splice-ledger.json").read_text())["adapter"]
        rows.append((f"splice ties (vs merged ΔW), rank {rank}", report["relative_error_total"]))
    print("| merge | relative error ‖ΔW − B·A‖/‖ΔW‖ |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.3g} |")


if __name__ == "__main__":
    main()
