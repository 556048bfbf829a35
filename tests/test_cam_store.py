"""The CAM store: round trip, contract attributes, lazy per-process handles, and crash safety."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from weakclip_core.artifacts.cam_store import CamStoreError, CamStoreReader, CamStoreWriter

CLASS_NAMES = ["background", "cat", "dog", "kite"]


def test_round_trip_and_contract(tmp_path):
    path = tmp_path / "cams" / "train.h5"
    rng = np.random.default_rng(1)
    cams_a = rng.random((2, 5, 7)).astype(np.float32)
    cams_b = rng.random((1, 6, 4)).astype(np.float32)
    with CamStoreWriter(path, "toy", CLASS_NAMES, {"variant": "fused"}) as writer:
        writer.add("img_a", [1, 3], cams_a)
        writer.add("img_b", [2], cams_b)
    with h5py.File(path, "r") as raw:  # the documented on-disk contract, read without our reader
        assert raw["img_a/cams"].dtype == np.float16
        assert raw["img_a/cams"].shape == (2, 5, 7)
        assert list(raw["img_a"].attrs["classes"]) == [1, 3]
        assert json.loads(raw.attrs["class_names"]) == CLASS_NAMES
        assert raw.attrs["dataset"] == "toy"
    reader = CamStoreReader(path)
    classes, cams = reader.read("img_a")
    assert classes == [1, 3]
    np.testing.assert_allclose(cams, cams_a, atol=1e-3)  # float16 storage
    assert reader.params == {"variant": "fused"}
    assert sorted(reader.image_ids) == ["img_a", "img_b"]
    reader.check_matches(CLASS_NAMES, ["img_a", "img_b"])
    with pytest.raises(CamStoreError, match="1 image\\(s\\) have no CAMs, e.g. img_c"):
        reader.check_matches(CLASS_NAMES, ["img_a", "img_c"])
    with pytest.raises(CamStoreError, match="made for 4 classes"):
        reader.check_matches(CLASS_NAMES + ["extra"], ["img_a"])
    with pytest.raises(CamStoreError, match="no CAMs for image nope"):
        reader.read("nope")


def test_reader_pickles_without_its_handle(tmp_path):
    path = tmp_path / "s.h5"
    with CamStoreWriter(path, "toy", CLASS_NAMES, {}) as writer:
        writer.add("x", [1], np.full((1, 2, 2), 0.5, np.float32))
    reader = CamStoreReader(path)
    reader.read("x")
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._file is None
    assert clone.read("x")[1][0, 0, 0] == pytest.approx(0.5)


def test_writer_rejects_bad_cams(tmp_path):
    writer = CamStoreWriter(tmp_path / "s.h5", "toy", CLASS_NAMES, {})
    with pytest.raises(ValueError, match="expected \\(2, H, W\\)"):
        writer.add("x", [1, 2], np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        writer.add("x", [1], np.full((1, 2, 2), 1.5, np.float32))
    with pytest.raises(ValueError, match="outside 1..3"):
        writer.add("x", [4], np.zeros((1, 2, 2), np.float32))
    writer.abort()
    assert not (tmp_path / "s.h5").exists()
    assert not list(tmp_path.iterdir())


def test_exception_inside_writer_leaves_no_file(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(RuntimeError):
        with CamStoreWriter(path, "toy", CLASS_NAMES, {}) as writer:
            writer.add("x", [1], np.zeros((1, 2, 2), np.float32))
            raise RuntimeError("boom")
    assert not path.exists()


def test_killed_writer_leaves_no_file_under_final_name(tmp_path):
    path = tmp_path / "train.h5"
    script = textwrap.dedent(f"""
        import time, numpy as np
        from weakclip_core.artifacts.cam_store import CamStoreWriter
        writer = CamStoreWriter({str(path)!r}, "toy", {CLASS_NAMES!r}, {{}})
        for index in range(100000):
            writer.add(f"img_{{index}}", [1], np.random.rand(1, 32, 32).astype(np.float32))
            if index == 5:
                print("writing", flush=True)
        writer.close()
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not path.exists()
    with pytest.raises(CamStoreError, match="CAM store not found"):
        CamStoreReader(path)


def test_incomplete_store_is_refused(tmp_path):
    path = tmp_path / "partial.h5"
    with h5py.File(path, "w") as raw:
        raw.attrs["complete"] = 0
    with pytest.raises(CamStoreError, match="incomplete"):
        CamStoreReader(path)
