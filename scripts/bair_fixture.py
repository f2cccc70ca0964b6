"""Writes a tiny dataset in the BAIR robot-pushing TFRecord layout for dws's import tests.

The layout is that of `softmotion30_44k/{train,test}/*.tfrecords`: one tf.train.Example
per trajectory with, per time step i, `i/image_aux1/encoded` (raw 64x64x3 uint8 bytes),
`i/action` (4 floats) and `i/endeffector_pos` (3 floats). Real trajectories have 30 steps;
these have 3 (train: two trajectories in one file, test: one), so the fixture stays small.
The records are written by the `tfrecord` package (an independent TFRecord writer):

    python3 -m venv /tmp/venv-tfr && /tmp/venv-tfr/bin/pip install tfrecord==1.14.6 numpy
    /tmp/venv-tfr/bin/python scripts/bair_fixture.py crates/data/tests/fixtures/bair

Frame pixels are a deterministic function of (trajectory, step, row, column, channel) and
actions of (trajectory, step), so the test recomputes what it expects; see
`bair_pixel` and `bair_action` in crates/data/tests/bair.rs.
"""

import os
import sys

import numpy as np
from tfrecord import TFRecordWriter

STEPS = 3


def frame(traj, step):
    r, c, ch = np.meshgrid(np.arange(64), np.arange(64), np.arange(3), indexing="ij")
    return ((traj * 71 + step * 37 + r * 3 + c * 5 + ch * 11) % 256).astype(np.uint8)


def action(traj, step):
    return [0.1 * traj - 0.05 * step, 0.02 * step, -1.0 if step % 2 else 1.0, 0.25]


def example(traj):
    d = {}
    for i in range(STEPS):
        d[f"{i}/image_aux1/encoded"] = (frame(traj, i).tobytes(), "byte")
        d[f"{i}/action"] = (action(traj, i), "float")
        d[f"{i}/endeffector_pos"] = ([0.5 * traj, 0.1 * i, 0.2], "float")
    return d


def main(out):
    for split, trajs in [("train", [0, 1]), ("test", [2])]:
        folder = os.path.join(out, "softmotion30_44k", split)
        os.makedirs(folder, exist_ok=True)
        w = TFRecordWriter(os.path.join(folder, f"traj_{trajs[0]}_to_{trajs[-1]}.tfrecords"))
        for t in trajs:
            w.write(example(t))
        w.close()


if __name__ == "__main__":
    main(sys.argv[1])
