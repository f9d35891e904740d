"""``splice bench --suite llm``: the LLM suite's command-line glue (docs/bench.md, "LLM suite")."""

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
    as_json: bool,
    suite: str | None = None,
) -> None:
    """Run the LLM suite's merge track, print its table (or JSON), write ``llm-results.*``.
    ``text_model`` names a causal-LM dir here (default: the packaged SmolLM2)."""
    from splice.errors import UsageError

    del suite  # "llm", or None when the full profile runs it after the others
    if track != "merge":
        raise UsageError(
            f"--suite llm runs the merge track, not --track {track}",
            fix="drop --track (the llm PEFT track is not implemented)",
        )
    if finetune not in (None, "lora"):
        raise UsageError("--suite llm fine-tunes with LoRA only", fix="drop --finetune")
    from splice.bench.llm import configure_llm, run_llm
    from splice.bench.llm_report import print_llm_table, write_llm_report

    cfg = configure_llm(profile, tasks=tasks, methods=methods, steps=steps, seed=seed,
                        device=device, model=text_model)  # fmt: skip
    from splice.cli.bench import _run

    def run(config: Any, console: Any) -> dict[str, Any]:
        return run_llm(
            config, say=lambda line: console.print(line, soft_wrap=True, highlight=False)
        )

    title = f"splice bench --suite llm[/] {profile}"
    _run(title, cfg, run, write_llm_report, print_llm_table, out, as_json)
