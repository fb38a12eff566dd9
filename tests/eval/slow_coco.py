"""`harness` on a slow data set: every batch a rank stores is followed by a pause of
argv[1] seconds, so that a test can kill a rank midway. Run as a script (by torchrun or a
plain subprocess): `slow_coco.py 0.4 coco DIR ... --launcher torchrun`."""
import sys
import time

from harness.eval.store import RunStore

PAUSE_S = float(sys.argv.pop(1))
_append = RunStore.append_images


def _slow_append(self, records):
    _append(self, records)
    time.sleep(PAUSE_S)


RunStore.append_images = _slow_append

from harness.cli import main  # noqa: E402

sys.exit(main())
