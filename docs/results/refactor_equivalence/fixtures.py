"""Build the fixtures once (new conftest builders + the persona fixture's recipe)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, "/work/main/tests")
from conftest import save_tiny_llama, tiny_tokenizer

fx = Path(sys.argv[1])
fx.mkdir(parents=True, exist_ok=True)
save_tiny_llama(fx / "model", tokenizer=tiny_tokenizer(markers=False))
sys.path.insert(0, "/work/main/tests")
import test_percentiles  # noqa: E402 (after the path and environment are set)
import test_persona  # noqa: E402 (after the path and environment are set)
import test_unalign  # noqa: E402 (after the path and environment are set)

(fx / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_percentiles._rows()))
test_unalign._prompt_file(fx / "prompts.jsonl")


# the persona fixture, called with a fake tmp_path_factory
class F:
    def mktemp(self, name):
        (fx / name).mkdir(exist_ok=True)
        return fx / name


d = test_persona.tiny.__wrapped__(F())
print(d)
