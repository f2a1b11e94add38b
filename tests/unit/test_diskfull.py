"""A full disk is recognised however it arrives: an OSError, a quota error, or wrapped text from safetensors."""

import errno

import pytest

from lexfine.train.diskfull import DiskFullError, disk_full_cause, full_disk_is_one_line


def _chained():
    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/r/checkpoints/checkpoint-4/optimizer.pt")
    except OSError:
        raise RuntimeError("while marking the run failed")  # a second error on the way out


@pytest.mark.parametrize("make,path", [
    (lambda: OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/r/manifest.json"), "/runs/r/manifest.json"),
    (lambda: Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                       'left on device" })'), "/runs/r"),
])
def test_full_disk_becomes_one_line(make, path):
    with pytest.raises(DiskFullError) as e:
        with full_disk_is_one_line("/runs/r"):
            raise make()
    msg = str(e.value)
    assert "\n" not in msg and repr(path) in msg and "last complete checkpoint" in msg


def test_chained_full_disk_is_found_and_other_errors_pass():
    with pytest.raises(RuntimeError) as e:
        _chained()
    assert disk_full_cause(e.value).filename.endswith("optimizer.pt")
    with pytest.raises(KeyError):
        with full_disk_is_one_line("/runs/r"):
            raise KeyError("not a disk problem")
    assert disk_full_cause(OSError(errno.EACCES, "Permission denied")) is None
