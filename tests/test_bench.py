"""dyt-bench runs end to end and writes what it printed (timings themselves are not asserted)."""

import json

from dyt.bench import main


def test_bench_writes_kernels_and_block(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--shape", "64x48", "--repeats", "1", "--warmup", "0", "--block", "--block-size", "32,2,64,16",
          "--json", str(out)])
    payload = json.loads(out.read_text())
    ops = payload["kernels"]["64x48"]
    assert {"copy", "F.layer_norm", "F.rms_norm", "LLaMA reference RMSNorm", "DyT eager", "DyT compiled",
            "add + F.rms_norm", "residual DyT eager"} <= ops.keys()  # auto at 64x48 on CPU: eager
    assert all(row["forward_ms"] > 0 for row in ops.values())
    assert set(payload["block"]["results"]) == {"rmsnorm", "layernorm", "dyt (eager)"}
    assert "'auto' = compiled (eager under 2097152 elements)" in capsys.readouterr().out
