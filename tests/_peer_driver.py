"""Run several peers in ONE fresh process, for the tests (not collected by pytest).

    python tests/_peer_driver.py OUT.json SCRIPT:PEER:INPUTS [...]

The benchmark runs each peer in its own process (bench/peers/protocol.py); the
tests group them, so that the suite imports torch or TensorFlow once per
framework, and never into the pytest process, which runs JAX.
"""

import importlib.util
import json
import sys
import warnings
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent.parent / "bench" / "peers"
sys.path.insert(0, str(PEERS_DIR))

import protocol  # noqa: E402


def main() -> None:
    out, *jobs = sys.argv[1:]
    modules, results = {}, []
    warnings.simplefilter("ignore", DeprecationWarning)
    for job in jobs:
        script, peer, inputs = job.split(":", 2)
        if script not in modules:
            spec = importlib.util.spec_from_file_location(script, PEERS_DIR / script)
            modules[script] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[script])
        config, arrays = protocol.load_inputs(inputs)
        result = modules[script].run(peer, config, arrays)
        result.setdefault("status", "ok")
        results.append(result)
    Path(out).write_text(json.dumps(results, default=float))


if __name__ == "__main__":
    main()
