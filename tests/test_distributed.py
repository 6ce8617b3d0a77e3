"""Two local processes joined by jax.distributed see one 8-device mesh (launch/local_multiprocess.sh)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
from ld_jax.distributed import initialize_from_env
assert initialize_from_env()
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("data",))
local = np.arange(4, dtype=np.float32) + 4 * jax.process_index()
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
print("RESULT", jax.process_index(), jax.device_count(), float(jax.jit(jnp.sum)(x)))
"""


def test_two_processes_share_one_mesh(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run(
        [
            "bash",
            str(ROOT / "launch/local_multiprocess.sh"),
            "-n",
            "2",
            "-d",
            "4",
            "-p",
            "23511",
            "--",
            sys.executable,
            str(script),
        ],
        env={"PATH": "/usr/bin:/bin", "LOG_DIR": str(tmp_path / "logs"), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    logs = [(tmp_path / "logs" / f"proc{i}.log").read_text() for i in range(2)]
    results = [
        line.split()[1:] for log in logs for line in log.splitlines() if line.startswith("RESULT")
    ]
    # sum over both processes' shards of 0..7 is 28: the collective really crossed processes
    assert sorted(results) == [["0", "8", "28.0"], ["1", "8", "28.0"]]
