"""#23 equivalence: run E1/E2/E3 on tiny fixed models with one version of ld_jax.

usage: PYTHONPATH=<code root> python drive.py <code root> <out dir> <fixtures dir>
The fixtures (models, data) are built once by /work/main/tests/conftest.py's builders and the
same files are used by both versions."""

import os
import sys
from pathlib import Path

code, out, fx = (Path(a) for a in sys.argv[1:4])
os.chdir(code)
os.environ["LD_JAX_CACHE"] = str(out / "cache")
import ld_jax  # noqa: E402 (after the path and environment are set)

assert Path(ld_jax.__file__).is_relative_to(code), ld_jax.__file__
from ld_jax import cli, judge  # noqa: E402 (after the path and environment are set)


def rule_judge(cfg):
    def verdict(r):
        return "refusal" if r.split()[:1] == ["w1"] or len(r) % 3 == 0 else "compliance"

    return lambda prompts, responses: [judge.Verdict(verdict(r), "rule") for r in responses]


judge.register("test_rule", rule_judge)
import yaml  # noqa: E402 (after the path and environment are set)

e1 = out / "e1.yaml"
e1.write_text(
    yaml.safe_dump(
        {
            "model": str(fx / "persona" / "model"),
            "data": str(fx / "persona" / "persona.jsonl"),
            "pairs": [["No", "Never"], ["Yes", "No"]],
            "seeds": 2,
            "steps": 6,
            "report_steps": [3, 6],
            "optimizer": {"lr": 1e-3},
            "out_dir": str(out / "e1"),
            "sft": {"enabled": False},
        }
    )
)
assert cli.main(["persona", "--config", str(e1)]) == 0
assert (
    cli.main(
        [
            "percentiles",
            "--config",
            "configs/percentiles_smollm2_ultrafeedback.yaml",
            f"model={fx / 'model'}",
            f"data.source={fx / 'prefs.jsonl'}",
            f"out_dir={out / 'e2'}",
            "data.max_length=80",
            "data.max_prompt_length=48",
            "data.pad_to_multiple=80",
            "window=4",
            "seeds=2",
            "percentiles=[0,50,100]",
            "batch_size=2",
            "score_batch_size=4",
            "progress=false",
            "optimizer.lr=1e-3",
        ]
    )
    == 0
)
assert (
    cli.main(
        [
            "unalign",
            "--config",
            "configs/unalign_smollm2.yaml",
            f"model={fx / 'model'}",
            f"prompts.source={fx / 'prompts.jsonl'}",
            "prompts.format=jsonl",
            "prompts.max_prompt_tokens=80",
            "n_prompts=20",
            "warmup.n_prompts=6",
            "warmup.eval_prompts=4",
            "warmup.max_rounds=1",
            "warmup.steps_per_round=2",
            "warmup.batch_size=2",
            "warmup.lr=1e-3",
            "max_new_tokens=8",
            "sample_batch_size=8",
            "eval.max_new_tokens=8",
            "eval.batch_size=8",
            "eval.seeds=[0,1]",
            "judge.kind=test_rule",
            "batch_size=4",
            "optimizer.lr=1e-3",
            "sft_lambdas=[0.1,1.0]",
            "ches_fraction=0.25",
            f"cache_dir={out / 'e3cache'}",
            "progress=false",
            f"out_dir={out / 'e3'}",
        ]
    )
    == 0
)
print("done", code)
