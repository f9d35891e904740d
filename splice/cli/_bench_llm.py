"""``splice bench --suite llm [--track peft]``: the LLM suite's command-line glue (docs/bench.md,
"LLM suite")."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_llm_suite(
    profile: str,
    *,
    track: str,
    tasks: list[str] | None,
    methods: list[str] | None,
    steps: int | None,
    seed: int | None,
    device: str | None,
    text_model: str | None,
    finetune: str | None,
    out: Path,
    as_json: bool | None,
    suite: str | None = None,
    budget: int | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run the LLM suite's merge track (or ``track="peft"``: its PEFT track), print its table
    (or JSON; neither for ``as_json=None``), write the report and return the results.
    ``text_model`` names a causal-LM dir here (default: the packaged SmolLM2)."""
    from splice.errors import UsageError

    del suite  # "llm", or None when the full profile runs it after the others
    if track not in ("merge", "peft"):
        raise UsageError(
            f"--suite llm runs the merge and peft tracks, not --track {track}",
            fix="use --track merge or --track peft",
        )
    from splice.cli.bench import _run

    if track == "peft":  # splice/cli/bench.py refused --finetune here, --budget/--set elsewhere
        from splice.bench.llm_peft import configure_llm_peft, run_llm_peft
        from splice.bench.peft_report import print_peft_table, write_peft_report

        pcfg = configure_llm_peft(profile, tasks=tasks, methods=methods, steps=steps, seed=seed,
                                  budget=budget, options=options, device=device,
                                  model=text_model)  # fmt: skip
        title = f"splice bench --suite llm --track peft[/] {profile}"
        return _run(title, pcfg, run_llm_peft, write_peft_report, print_peft_table, out, as_json)
    if finetune not in (None, "lora"):
        raise UsageError("--suite llm fine-tunes with LoRA only", fix="drop --finetune")
    from splice.bench.llm import configure_llm, run_llm
    from splice.bench.llm_report import print_llm_table, write_llm_report

    cfg = configure_llm(profile, tasks=tasks, methods=methods, steps=steps, seed=seed,
                        device=device, model=text_model)  # fmt: skip

    def run(config: Any, console: Any) -> dict[str, Any]:
        return run_llm(
            config, say=lambda line: console.print(line, soft_wrap=True, highlight=False)
        )

    title = f"splice bench --suite llm[/] {profile}"
    return _run(title, cfg, run, write_llm_report, print_llm_table, out, as_json)
