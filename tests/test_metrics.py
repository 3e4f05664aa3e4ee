"""transferlab.metrics: what a resumed run's writer keeps, drops and tells TensorBoard."""

import glob
import os
import struct
import time

from tensorboardX.proto import event_pb2
from tensorboardX.proto.event_pb2 import SessionLog

from transferlab.metrics import MetricWriter, read_jsonl


def _events(path):
    """The Event protos of one tfevents file (TFRecord: length, crc, data, crc)."""
    out = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event()
            event.ParseFromString(f.read(length))
            f.read(4)
            out.append(event)
    return out


def test_resume_drops_later_records_and_purges_them_in_tensorboard(tmp_path):
    workdir = str(tmp_path)
    first = MetricWriter(workdir, total_steps=10, start_step=-1, progress=False)
    for step in range(1, 7):
        first.write(step, {"loss": float(step)})
    first.flush()  # what a checkpoint save does: the events so far are on disk
    assert any(e.summary.value for e in _events(glob.glob(os.path.join(workdir, "tensorboard", "*"))[0]))
    first.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write('{"step": 7, "lo')  # torn by a kill
    time.sleep(1.1)  # tfevents files are named by the second they are opened in
    resumed = MetricWriter(workdir, total_steps=10, start_step=3, progress=False)  # the checkpoint is at step 3
    resumed.write(3, {"event": "resumed"})
    resumed.write(4, {"loss": 4.5})
    resumed.close()
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4] and records[-1]["loss"] == 4.5
    files = sorted(glob.glob(os.path.join(workdir, "tensorboard", "*")), key=os.path.getmtime)
    assert len(files) == 2
    # the resumed file opens with a purge at step 4: TensorBoard drops the first file's steps 4..6
    restarts = [[e.step for e in _events(f) if e.session_log.status == SessionLog.START] for f in files]
    assert restarts == [[], [4]]
    scalars = [[(e.step, e.summary.value[0].simple_value) for e in _events(f) if e.summary.value] for f in files]
    assert scalars == [[(s, float(s)) for s in range(1, 7)], [(4, 4.5)]]
