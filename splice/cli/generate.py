"""``splice generate``: decode with the guided speculative engine (splice.decode), streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from splice.cli import app
from splice.cli._adapters import ActiveOption, AdapterOption, load_named
from splice.cli._printers import print_json

POLICIES = ("speculative", "ambedkar", "tq", "args", "cd")


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Target: 'smollm2' (packaged) or a causal-LM dir.")],
    prompt: Annotated[str, typer.Option("--prompt", help="The prompt text.")],
    policy: Annotated[str, typer.Option(help=f"One of {', '.join(POLICIES)}.")] = "speculative",
    draft: Annotated[Path | None, typer.Option(help="Drafter: a causal-LM dir.")] = None,
    self_draft: Annotated[
        int | None, typer.Option(help="Drafter: the target's first K blocks.")
    ] = None,
    ngram: Annotated[int | None, typer.Option(help="Drafter: n-gram prompt lookup, n≤N.")] = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Drafter: an int8 copy of the target (CPU; K blocks with --self-draft K).",
        ),
    ] = False,
    lean: Annotated[
        bool,
        typer.Option(
            "--lean",
            help="CPU speculative: target and self-drafters on splice's packed-weight forward.",
        ),
    ] = False,
    gamma: Annotated[int, typer.Option(help="Tokens drafted per target call (γ ≥ 1).")] = 4,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 1.0,
    top_k: Annotated[int | None, typer.Option(help="Top-k of φ (both models).")] = None,
    top_p: Annotated[float, typer.Option(help="Top-p of φ, in (0, 1].")] = 1.0,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 64,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the chat template.")] = True,
    k: Annotated[int, typer.Option(help="Candidates per step (re-ranking policies).")] = 5,
    weight: Annotated[
        float, typer.Option(help="AMBEDKAR α, or 1/α of TQ*/ARGS/CD (log q + w·score).")
    ] = 1.0,
    verifier: Annotated[
        str | None, typer.Option(help="AMBEDKAR verifier (default: MODEL).")
    ] = None,
    terms: Annotated[
        Path | None, typer.Option(help="AMBEDKAR term pairs, 'word, opposite' per line.")
    ] = None,
    cf_mode: Annotated[
        str,
        typer.Option(
            help="AMBEDKAR counterfactual: 'framing' (swap framing words) or 'identity_swap' "
            "(swap identity cues; default pairs: splice.decode.cues)."
        ),
    ] = "framing",
    constitution: Annotated[
        bool, typer.Option(help="Prepend the constitution preamble to the verifier.")
    ] = True,
    reward: Annotated[
        Path | None, typer.Option(help="TQ*/ARGS/CD reward: a sequence-classifier dir.")
    ] = None,
    baseline: Annotated[
        str | None, typer.Option(help="TQ* rollout policy (aligned baseline) model.")
    ] = None,
    horizon: Annotated[int, typer.Option(help="Rollout tokens (TQ*/CD).")] = 20,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 42,
    device: Annotated[str, typer.Option(help="Torch device.")] = "cpu",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print text and metrics as JSON.")
    ] = False,
    adapter: AdapterOption = None,
    active: ActiveOption = None,
) -> None:
    """Generate text: plain, exact speculative, AMBEDKAR, Transfer Q*, ARGS or CD decoding."""
    import pydantic

    from splice.decode import Sampling
    from splice.errors import SpliceError

    if not prompt.strip():
        raise SpliceError("the prompt is empty", fix="pass --prompt 'some text'")
    if policy not in POLICIES:
        raise SpliceError(
            f"unknown --policy {policy!r}", fix=f"choose one of {', '.join(POLICIES)}"
        )
    if gamma < 1:
        raise SpliceError(f"--gamma {gamma} must be >= 1")
    if sum(x is not None for x in (draft, self_draft, ngram)) > 1:
        raise SpliceError("give at most one of --draft, --self-draft, --ngram")
    if int8 and (draft is not None or ngram is not None):
        raise SpliceError("--int8 quantises the target's own weights: not with --draft or --ngram")
    if lean and policy not in ("speculative", "ambedkar"):
        raise SpliceError(f"--lean serves --policy speculative or ambedkar, not {policy}")
    if lean and policy == "ambedkar" and (draft or self_draft or int8 or verifier):
        raise SpliceError(
            "--lean --policy ambedkar drafts and verifies with MODEL itself in one forward",
            fix="drop --draft/--self-draft/--int8/--verifier, or drop --lean",
        )
    if cf_mode not in ("framing", "identity_swap"):
        raise SpliceError(f"unknown --cf-mode {cf_mode!r}", fix="use framing or identity_swap")
    try:
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        flag = "--" + str(err["loc"][0]).replace("_", "-")
        raise SpliceError(err["msg"].removeprefix("Value error, "), fix=f"change {flag}") from None
    if terms is not None and not terms.is_file():
        raise SpliceError("term list not found", where=str(terms))
    if policy in ("tq", "args", "cd") and reward is None:
        raise SpliceError(f"--policy {policy} needs --reward (a sequence-classifier dir)")
    if policy == "tq" and baseline is None:
        raise SpliceError("--policy tq needs --baseline (the aligned rollout policy)")
    parts = _build(locals())
    out_text: list[int] = []
    shown = [""]

    from rich.console import Console
    from rich.progress import Progress

    # with --json stdout is reserved for the result: show a progress bar on stderr instead
    bar = Progress(console=Console(stderr=True), transient=True, disable=not as_json)
    task = bar.add_task("generating", total=max_new_tokens)

    def stream(tokens: list[int]) -> None:
        out_text.extend(tokens)
        if as_json:
            bar.advance(task, len(tokens))
            return
        text = parts["tok"].decode(out_text, skip_special_tokens=True)
        typer.echo(text[len(shown[0]) :], nl=False)
        shown[0] = text

    from splice.decode import generate as run

    with bar:
        result = run(
            parts["ids"],
            target=parts.get("target"),
            proposer=parts.get("proposer"),
            policy=parts.get("policy"),
            scorer=parts.get("scorer"),
            sampling=sampling,
            gamma=gamma,
            max_new_tokens=max_new_tokens,
            eos=parts["eos"],
            seed=seed,
            on_tokens=stream,
        )
    text = parts["tok"].decode(result.tokens, skip_special_tokens=True)
    if as_json:
        print_json(
            {
                "text": text,
                "policy": policy,
                "lossless": result.lossless,
                "drafter": parts["drafter"],
                "metrics": result.metrics,
            }
        )
        return
    m = result.metrics
    typer.echo("")
    note = "target's distribution" if result.lossless else "NOT the target's distribution"
    extra = f", α {m['alpha']}" if m["alpha"] is not None else ""
    typer.secho(
        f"[{policy}, {parts['drafter']}: {m['new_tokens']} tokens, {m['tokens_per_s']} tok/s, "
        f"{m['tokens_per_target_call']} tokens/target call{extra}; {note}]",
        err=True,
        fg="cyan",
    )


def _build(o: dict[str, Any]) -> dict[str, Any]:
    """Load the models and assemble proposer, scorer and policy from the options."""
    from splice.convert import register
    from splice.data.causal_lm import load_causal_lm
    from splice.decode import (
        CachedLM,
        ModelProposer,
        NgramProposer,
        RerankTopK,
        early_exit,
        int8_draft,
    )
    from splice.decode.ambedkar import require_same_vocab

    register()  # recursive models from `splice convert recursive` load without remote code
    target, tok = load_causal_lm(o["model"], o["device"])
    load_named(target, o["adapter"], o["active"])
    text = o["prompt"]
    if o["chat"] and getattr(tok, "chat_template", None):
        msgs = [{"role": "user", "content": text}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = list(tok.encode(text, add_special_tokens=False))
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    parts: dict[str, Any] = {"tok": tok, "ids": ids, "eos": eos, "drafter": "none"}
    draft_model = None
    if o["draft"] is not None:
        draft_model, dtok = load_causal_lm(o["draft"], o["device"])
        if o["policy"] == "speculative":
            require_same_vocab(tok, dtok)
        parts["drafter"] = f"model {o['draft']}"
    elif o["int8"]:
        draft_model = int8_draft(target, o["self_draft"])
        blocks = "all blocks" if o["self_draft"] is None else f"first {o['self_draft']} blocks"
        parts["drafter"] = f"int8 self, {blocks}"
    elif o["self_draft"] is not None:
        draft_model = early_exit(target, o["self_draft"])
        parts["drafter"] = f"self, first {o['self_draft']} blocks"
    if o["policy"] == "speculative" and o["lean"]:
        return _lean(o, parts, target, draft_model)
    if o["policy"] == "speculative":
        parts["target"] = CachedLM(target, "target")
        if draft_model is not None:
            parts["proposer"] = ModelProposer(draft_model)
        elif o["ngram"] is not None:
            parts["proposer"] = NgramProposer(target.config.vocab_size, max_n=o["ngram"])
            parts["drafter"] = f"n-gram n≤{o['ngram']}"
        return parts
    # re-ranking: the drafter proposes top-k (default: the target itself)
    parts["proposer"] = ModelProposer(draft_model if draft_model is not None else target)
    parts["drafter"] = parts["drafter"] if draft_model is not None else "the model itself"
    parts["policy"] = RerankTopK(k=o["k"], weight=o["weight"])
    parts["scorer"] = (
        _ambedkar(o, target, tok) if o["policy"] == "ambedkar" else _value(o, target, tok, eos)
    )
    if o["lean"]:  # ambedkar: drafter row and both verifier branches in one LeanLM forward
        parts["proposer"] = parts["scorer"].joint_proposer()
        parts["drafter"] = "the model itself, lean, one forward with the verifier"
    return parts


def _lean(o: dict[str, Any], parts: dict[str, Any], target: Any, draft_model: Any) -> Any:
    """Speculative decoding on LeanLM: self-drafters read the target's exact K/V."""
    from splice.decode import LeanLM, ModelProposer, NgramProposer

    parts["target"] = lean = LeanLM(target, "target")
    if o["int8"] or o["self_draft"] is not None:
        weights = "int8" if o["int8"] else "fp32"
        drafter = LeanLM(target, "draft", weights=weights, layers=o["self_draft"], kv_from=lean)
        parts["proposer"] = ModelProposer(drafter)
        parts["drafter"] += ", lean, target K/V"
    elif draft_model is not None:
        parts["proposer"] = ModelProposer(LeanLM(draft_model, "draft"))
        parts["drafter"] += ", lean"
    elif o["ngram"] is not None:
        parts["proposer"] = NgramProposer(target.config.vocab_size, max_n=o["ngram"])
        parts["drafter"] = f"n-gram n≤{o['ngram']}"
    return parts


def _ambedkar(o: dict[str, Any], target: Any, tok: Any) -> Any:
    from splice.data.causal_lm import load_causal_lm
    from splice.decode.ambedkar import CONSTITUTION, CounterfactualDivergenceScorer
    from splice.decode.counterfactual import FRAMING_PAIRS, Counterfactual, parse_pairs
    from splice.decode.cues import cue_pairs
    from splice.decode.iir import PROTECTED

    verifier, vtok = (
        (target, tok) if o["verifier"] is None else load_causal_lm(o["verifier"], o["device"])
    )
    swap = o["cf_mode"] == "identity_swap"
    pairs = cue_pairs() if swap else FRAMING_PAIRS
    if o["terms"] is not None:
        pairs = parse_pairs(o["terms"].read_text().splitlines(), source=str(o["terms"]))
    return CounterfactualDivergenceScorer(
        verifier,
        tok,
        Counterfactual(pairs, ["[mask]"] if swap else PROTECTED, mode=o["cf_mode"]),
        constitution=CONSTITUTION if o["constitution"] else None,
        verifier_tokenizer=vtok if vtok is not tok else None,
        lean=o["lean"],
    )


def _value(o: dict[str, Any], target: Any, tok: Any, eos: list[int]) -> Any:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from splice.data.causal_lm import load_causal_lm
    from splice.decode.reward import ClassifierReward
    from splice.decode.tq import args_scorer, cd_scorer, tq_scorer
    from splice.errors import SpliceError

    rdir = o["reward"]
    if not (rdir / "config.json").is_file():
        raise SpliceError("not a model dir (no config.json)", where=str(rdir))
    rm = AutoModelForSequenceClassification.from_pretrained(rdir)
    reward = ClassifierReward(rm, AutoTokenizer.from_pretrained(rdir), tok)
    if o["policy"] == "args":
        return args_scorer(reward)
    if o["policy"] == "cd":
        return cd_scorer(target, reward, horizon=o["horizon"], eos=eos)
    baseline, _ = load_causal_lm(o["baseline"], o["device"])
    return tq_scorer(baseline, reward, horizon=o["horizon"], eos=eos)
