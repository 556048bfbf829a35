"""Pool workers end when their parent is SIGKILLed (no orphaned CRF workers burning CPU)."""

import os
import signal
import subprocess
import sys
import textwrap
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status_path = f"/proc/{pid}/status"
    if os.path.exists(status_path):  # a zombie is dead for our purpose
        with open(status_path) as status:
            return "State:\tZ" not in status.read()
    return True


def test_crf_pool_workers_die_with_a_killed_parent():
    script = textwrap.dedent("""
        import os, time
        import numpy as np
        from weakclip_core.config.weakclip import CrfConfig
        from weakclip_core.method.crf import CrfPool
        if __name__ == "__main__":
            pool = CrfPool(CrfConfig(), workers=2)
            probabilities = np.full((2, 2, 8, 8), 0.5, np.float32)
            pool.map(np.zeros((2, 8, 8, 3), np.uint8), probabilities)
            print(" ".join(str(p) for p in pool._executor._processes), flush=True)
            time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker_pids = [int(pid) for pid in process.stdout.readline().split()]
    assert len(worker_pids) == 2 and all(_alive(pid) for pid in worker_pids)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid in worker_pids):
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in worker_pids), "CRF workers outlived their killed parent"
