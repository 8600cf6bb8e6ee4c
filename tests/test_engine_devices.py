"""The continuous-batching engine on four (forced host) devices: one engine per device behind one
interface (mvjax.inference.engines.DeviceEngines) gives every request the tokens one device gives it.

Forced host devices need ``XLA_FLAGS`` before jax is imported, so the check runs in a child process."""

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    assert jax.local_device_count() == 4, jax.devices()
    from mvjax.core.parallel import local_mesh
    from mvjax.inference.decode import FirstStageDecoder
    from mvjax.inference.engine import FirstStageEngine
    from mvjax.inference.engines import DeviceEngines
    from mvjax.io.checkpoint import load_gpt_stage
    from tests.test_engine import _requests

    config, params, tok = load_gpt_stage(sys.argv[1], "first_stage")
    out = {}
    for kind in ("float32", "int8"):
        one = FirstStageDecoder(config, params, end_of_audio=tok.offset - 1, kv_cache=kind)
        four = FirstStageDecoder(config, params, end_of_audio=tok.offset - 1, kv_cache=kind, mesh=local_mesh())
        expected = FirstStageEngine(one, slots=2, steps=5).run(_requests(tok))
        engines = DeviceEngines(four, slots=1, steps=5)
        requests = _requests(tok)
        # Three now, the rest while those decode: seven requests for four slots, so some wait for a device.
        for r in requests[:3]:
            engines.submit(r)
        results, steps, spread = [], 0, set()
        while not engines.idle:
            if steps == 1:
                for r in requests[3:]:
                    engines.submit(r)
            results += engines.step()
            spread |= {device for device, _ in engines.running}
            assert len(engines.running) <= 4 and engines.free_slots == 4 - len(engines.running)
            steps += 1
        results.sort(key=lambda r: r.tag)
        out[kind] = {
            "same": [bool(np.array_equal(a.sequence, b.sequence)) and a.finished == b.finished
                     for a, b in zip(expected, results)],
            "tags": [r.tag for r in results],
            "devices_used": sorted(spread),
            "per_device_tokens": [e.tokens_generated for e in engines.engines],
            "devices": [str(e.device) for e in engines.engines],
        }
        engines.close()
    print("RESULT " + json.dumps(out))
""")


def test_engines_on_four_devices_give_each_request_its_one_device_tokens(converted):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(converted)], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))
    for kind, got in json.loads(line[len("RESULT "):]).items():
        assert got["tags"] == list(range(7)), kind
        assert all(got["same"]), (kind, got["same"])
        assert got["devices_used"] == [0, 1, 2, 3], kind  # every device took requests
        assert all(n > 0 for n in got["per_device_tokens"]), kind
        assert len(set(got["devices"])) == 4, kind
