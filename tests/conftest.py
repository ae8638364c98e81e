"""Keep every test's writes in temporary folders of this run: torch.compile's inductor (and Triton) cache
goes to a fresh folder per session instead of the shared ``/tmp/torchinductor_<user>``, where a run killed
mid-compile once left a 0-byte ``.so`` that failed the next run; hypothesis keeps no example database."""

import os
import shutil
import tempfile

from hypothesis import settings

# libgomp (PyTorch's OpenMP) reads this once, when torch is first imported, which is after this file:
# its threads spin a tenth of the default at barriers, as `sdstudio generate` has them (sdstudio.threads),
# so the suite does not crawl when other processes keep the cores busy.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")
# Under pytest-xdist (`-n 2`, as the README runs the suite) each worker is one of as many processes as
# there are cores: one thread each, or their OpenMP teams would fight over the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

_SESSION_TMP = tempfile.mkdtemp(prefix="sdstudio-tests-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_SESSION_TMP, "inductor")
os.environ["TRITON_CACHE_DIR"] = os.path.join(_SESSION_TMP, "triton")

settings.register_profile("sdstudio", database=None, deadline=None)
settings.load_profile("sdstudio")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
