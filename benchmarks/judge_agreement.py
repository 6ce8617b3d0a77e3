"""Agreement of the default refusal-phrase judge with hand labels on HH-RLHF harmless-base.

docs/results/judge_labels.jsonl holds 60 final assistant turns (the chosen and the rejected
reply of 30 pairs drawn with random.Random(0) from harmless-base-test.jsonl.gz), each labelled
refusal/compliance by hand with a reason and a `clear` flag for borderline cases
(docs/judge.md). docs/results/judge_labels_smollm2.jsonl holds SmolLM2-135M-Instruct's own
responses (ld_jax.generate, T=0.7, 96 tokens, seed 0) to 40 first human turns drawn with
random.Random(1), labelled the same way: the E3 setting. Writes
benchmarks/results/judge_agreement.json and prints a summary.

    python benchmarks/judge_agreement.py
"""

import json
from pathlib import Path

from common import machine, write_result

from ld_jax import judge

ROOT = Path(__file__).resolve().parents[1]


def read(name):
    return [json.loads(line) for line in (ROOT / "docs/results" / name).read_text().splitlines()]


def smollm2_sample():
    rows = read("judge_labels_smollm2.jsonl")
    verdicts = judge.build_judge(judge.JudgeConfig())(
        [r["last_human"] for r in rows], [r["response"] for r in rows]
    )
    labels = [r["label"] for r in rows]
    clear = [i for i, r in enumerate(rows) if r["clear"]]
    return {
        "n": len(rows),
        "hand_refusals": labels.count("refusal"),
        "all": judge.agreement(verdicts, labels),
        "clear_only": judge.agreement([verdicts[i] for i in clear], [labels[i] for i in clear]),
        "judge": judge.summarize(verdicts),
        "mistakes": [
            {
                "index": i,
                "hand": labels[i],
                "judge": verdicts[i].label,
                "matched": verdicts[i].raw,
                "response": rows[i]["response"][:160],
            }
            for i in range(len(rows))
            if verdicts[i].label != labels[i]
        ],
    }


def main():
    rows = read("judge_labels.jsonl")
    verdicts = judge.build_judge(judge.JudgeConfig())(
        [r["last_human"] for r in rows], [r["response"] for r in rows]
    )
    labels = [r["label"] for r in rows]
    clear = [i for i, r in enumerate(rows) if r["clear"]]
    by_role = {}
    for role in ("chosen", "rejected"):
        idx = [i for i, r in enumerate(rows) if r["role"] == role]
        by_role[role] = {
            "n": len(idx),
            "hand_refusal_rate": sum(labels[i] == "refusal" for i in idx) / len(idx),
            "judge": judge.summarize([verdicts[i] for i in idx]),
        }
    # Pairs where exactly one reply is a refusal: is the refusal the chosen one?
    pairs = {}
    for i, r in enumerate(rows):
        pairs.setdefault(r["row"], {})[r["role"]] = i

    def refusal_is_chosen(is_refusal):
        split = [(is_refusal(p["chosen"]), is_refusal(p["rejected"])) for p in pairs.values()]
        one = [c for c, rj in split if c != rj]
        return {"pairs_with_one_refusal": len(one), "refusal_is_chosen": sum(one)}

    result = {
        "n": len(rows),
        "hand_refusals": labels.count("refusal"),
        "all": judge.agreement(verdicts, labels),
        "clear_only": judge.agreement([verdicts[i] for i in clear], [labels[i] for i in clear]),
        "by_role": by_role,
        "pairs_hand": refusal_is_chosen(lambda i: labels[i] == "refusal"),
        "pairs_judge": refusal_is_chosen(lambda i: verdicts[i].label == "refusal"),
        "mistakes": [
            {
                "index": i,
                "role": rows[i]["role"],
                "hand": labels[i],
                "judge": verdicts[i].label,
                "matched": verdicts[i].raw,
                "response": rows[i]["response"][:160],
            }
            for i in range(len(rows))
            if verdicts[i].label != labels[i]
        ],
        "smollm2": smollm2_sample(),
    }
    out = ROOT / "benchmarks/results/judge_agreement.json"
    result["machine"] = machine()
    write_result(result, out)
    print(
        json.dumps(
            {k: result[k] for k in ("all", "clear_only", "pairs_hand", "pairs_judge")}, indent=1
        )
    )
    print(
        {role: (v["hand_refusal_rate"], v["judge"]["refusal_rate"]) for role, v in by_role.items()}
    )
    for m in result["mistakes"]:
        print(m)
    print("smollm2:", json.dumps({k: result["smollm2"][k] for k in ("all", "clear_only", "judge")}))
    for m in result["smollm2"]["mistakes"]:
        print(m)


if __name__ == "__main__":
    main()
