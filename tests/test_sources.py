"""Frame sources: corrupt video frames, unreadable images, missing paths, camera reconnects, looping."""
import itertools
import logging
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_cbn.stream import sample
from edge_cbn.stream.sources import CameraSource, ImageDirSource, Prefetched, SourceError, VideoSource, open_source

W, H = 64, 48


def numbered_frame(i):
    """A flat gray frame whose level encodes ``i`` robustly through JPEG/MPEG-4."""
    return np.full((H, W, 3), 8 * i + 4, np.uint8)


def number_of(frame):
    return int(round((float(frame.mean()) - 4) / 8))


def write_video(path, n, fourcc="MJPG"):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (W, H))
    assert writer.isOpened()
    for i in range(n):
        writer.write(numbered_frame(i))
    writer.release()
    return path


def corrupt_mjpeg_frame(path, k):
    """Overwrite frame ``k``'s JPEG data (between two JPEG start markers) with garbage of the same length."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i:i + 3] == b"\xff\xd8\xff"]
    begin, end = starts[k], starts[k + 1] - 16  # keep the next AVI chunk header intact
    data[begin:end] = np.random.default_rng(0).integers(0, 256, end - begin, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def warnings_in(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_video_with_corrupt_frame_warns_and_goes_on(tmp_path, caplog):
    path = write_video(tmp_path / "clip.avi", 12)
    corrupt_mjpeg_frame(path, 5)
    numbers, indices = [], []
    with VideoSource(path) as src:
        assert src.fps == pytest.approx(10)
        for frame in src:
            assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
            numbers.append(number_of(frame))
            indices.append(src.index)
    assert numbers == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert indices == numbers  # the index counts the skipped frame: it matches the file's numbering
    assert len(warnings_in(caplog, "undecodable")) == 1
    assert "before frame 6" in warnings_in(caplog, "undecodable")[0]


def test_mp4_with_damaged_bytes_streams_to_the_end(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 30, "mp4v")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(200)
    path.write_bytes(bytes(data))
    with VideoSource(path) as src:
        frames = list(src)
    assert len(frames) >= 25 and number_of(frames[-1]) == 29


def test_video_loops_and_restarts_index(tmp_path):
    path = write_video(tmp_path / "clip.avi", 4)
    with VideoSource(path, loop=True) as src:
        got = [(number_of(f), src.index) for f in itertools.islice(src, 10)]
    assert [n for n, _ in got] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert [i for _, i in got] == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    with VideoSource(path, loop=False) as src:
        assert len(list(src)) == 4
        assert src.read() is None


def test_closed_video_yields_nothing(tmp_path):
    src = VideoSource(write_video(tmp_path / "clip.avi", 3))
    src.close()
    assert src.closed and src.read() is None and list(src) == []


def test_realtime_paces_to_file_fps(tmp_path):
    now, sleeps = [0.0], []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    path = write_video(tmp_path / "clip.avi", 4)
    with VideoSource(path, realtime=True, sleep=sleep, clock=lambda: now[0]) as src:
        assert len(list(src)) == 4
    assert sleeps == pytest.approx([0.1, 0.1, 0.1])


def test_image_dir_skips_unreadable_file_once(tmp_path, caplog):
    for i, name in enumerate(["a.png", "c.jpg", "d.png"]):
        cv2.imwrite(str(tmp_path / name), numbered_frame(i))
    (tmp_path / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really an image")
    (tmp_path / ".hidden.png").write_bytes(b"ignored")
    cv2.imwrite(str(tmp_path / "e_gray.png"), numbered_frame(3)[:, :, 0])
    with ImageDirSource(tmp_path) as src:
        frames = list(src)
    assert [number_of(f) for f in frames] == [0, 1, 2, 3]
    assert all(f.shape == (H, W, 3) for f in frames)  # the gray image comes as BGR too
    assert len(warnings_in(caplog, "b_broken.png")) == 1

    caplog.clear()
    with ImageDirSource(tmp_path, loop=True) as src:
        looped = [number_of(f) for f in itertools.islice(src, 9)]
    assert looped == [0, 1, 2, 3, 0, 1, 2, 3, 0]
    assert len(warnings_in(caplog, "b_broken.png")) == 1  # not warned again on the next passes


def test_image_dir_with_nothing_readable_ends_even_when_looping(tmp_path, caplog):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with ImageDirSource(tmp_path, loop=True) as src:
        assert list(src) == []
    assert warnings_in(caplog, "no readable image")


@pytest.mark.parametrize("make, name", [
    (lambda p: VideoSource(p / "missing.mp4"), "missing.mp4"),
    (lambda p: ImageDirSource(p / "missing_dir"), "missing_dir"),
    (lambda p: open_source(video=p / "missing.mp4"), "missing.mp4"),
    (lambda p: open_source(images=p / "missing_dir"), "missing_dir"),
    (lambda p: CameraSource(str(p / "video9")), "video9"),
])
def test_missing_path_is_one_clear_error(tmp_path, make, name):
    with pytest.raises(SourceError, match="not found") as error:
        make(tmp_path)
    assert str(tmp_path / name) in str(error.value)


def test_unopenable_inputs(tmp_path, monkeypatch):
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(SourceError, match="notes.mp4"):
        VideoSource(tmp_path / "notes.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        ImageDirSource(tmp_path / "empty")
    FakeCapture.script(None)
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    with pytest.raises(SourceError, match=r"camera 7 \(/dev/video7"):
        open_source(camera="7")
    with pytest.raises(ValueError, match="camera and video"):
        open_source(camera=0, video="x.mp4")


class FakeCapture:
    """Stands in for cv2.VideoCapture. Each open takes the next plan of the script: None fails to open,
    a number n delivers n frames (valued by the open's serial number) and then fails every read."""

    plans, opened, instances = [], 0, []

    @classmethod
    def script(cls, *plans):
        cls.plans, cls.opened, cls.instances = list(plans), 0, []

    def __init__(self, index, *args):
        FakeCapture.opened += 1
        self.serial = FakeCapture.opened
        self.left = FakeCapture.plans.pop(0) if FakeCapture.plans else 10 ** 9
        self.released = False
        FakeCapture.instances.append(self)

    def isOpened(self):
        return self.left is not None

    def set(self, prop, value):
        return True

    def get(self, prop):
        return 30.0 if prop == cv2.CAP_PROP_FPS else 0.0

    def read(self):
        if not self.left:
            return False, None
        self.left -= 1
        return True, np.full((4, 4, 3), self.serial, np.uint8)

    def release(self):
        self.released = True


@pytest.fixture
def fake_camera(monkeypatch):
    monkeypatch.setattr(cv2, "VideoCapture", FakeCapture)
    return FakeCapture


def test_camera_reconnects_with_exponential_backoff(fake_camera, caplog):
    fake_camera.script(3, None, None, 0, 2)  # 3 frames, lost, 2 failed opens, opens but no frame, back
    sleeps = []
    cam = CameraSource(0, 320, 240, sleep=sleeps.append)
    assert cam.fps == 30.0
    serials = [int(f[0, 0, 0]) for f in itertools.islice(cam, 6)]
    assert serials == [1, 1, 1, 5, 5, 6]  # after plan 5's two frames it fails again and reopens
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 0.5]  # doubling per attempt, reset after a reconnect
    assert len(warnings_in(caplog, "reconnecting")) == 5
    assert len(warnings_in(caplog, "reconnected")) == 2 and cam.reconnects == 2
    assert all(c.released for c in fake_camera.instances[:-1])
    cam.close()
    assert fake_camera.instances[-1].released and cam.read() is None


def test_camera_backoff_is_bounded_and_configurable(fake_camera):
    fake_camera.script(1, *[None] * 8)
    sleeps = []
    with CameraSource(0, sleep=sleeps.append) as cam:
        assert len(list(itertools.islice(cam, 2))) == 2
    assert sleeps == [0.5, 1, 2, 4, 8, 8, 8, 8, 8]

    fake_camera.script(1, None, None, None)
    sleeps = []
    with CameraSource(0, backoff=(0.1, 0.25), sleep=sleeps.append) as cam:
        assert len(list(itertools.islice(cam, 2))) == 2
    assert sleeps == [0.1, 0.2, 0.25, 0.25]


def test_camera_closed_while_reconnecting_stops(fake_camera):
    fake_camera.script(1, *[None] * 100)
    cam = None

    def sleep(seconds):
        if seconds >= 2:
            cam.close()  # as another thread would

    cam = CameraSource(0, sleep=sleep)
    assert len(list(cam)) == 1
    assert fake_camera.opened == 3  # no reopen after close


def test_picamera2_is_optional_and_lazy(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # "not installed"
    with pytest.raises(SourceError, match="picamera2"):
        CameraSource(0, picamera2=True)

    class FakePicamera2:
        def create_video_configuration(self, main):
            self.size = main["size"]
            return main

        def configure(self, config):
            pass

        def start(self):
            pass

        def capture_array(self):
            return np.zeros((self.size[1], self.size[0], 3), np.uint8)

        def stop(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "picamera2", types.SimpleNamespace(Picamera2=FakePicamera2))
    with CameraSource(0, 320, 240, picamera2=True) as cam:
        assert "picamera2" in cam.name
        assert cam.read().shape == (240, 320, 3)


def test_default_source_is_the_bundled_sample():
    info = sample.sample_info()
    assert sample.sample_path().stat().st_size < 1.5 * 2 ** 20
    with open_source(loop=True) as src:
        assert isinstance(src, VideoSource) and src.fps == pytest.approx(info["fps"])
        frames = list(itertools.islice(src, 3))
    assert frames[0].shape == (info["size"][1], info["size"][0], 3)
    assert sample.photo_at(0, info)["name"] == "chelsea"
    photos = info["photos"]
    assert photos[-1]["last_frame"] == info["frames"] - 1
    assert all(len(p["crops"]) == p["last_frame"] - p["first_frame"] + 1 for p in photos)
    with pytest.raises(IndexError):
        sample.photo_at(info["frames"], info)


def test_sample_clip_reads_back_every_frame():
    info = sample.sample_info()
    with VideoSource(sample.sample_path()) as src:
        assert sum(1 for _ in src) == info["frames"]
        assert src.index == info["frames"] - 1


def test_prefetched_reads_ahead_in_order_and_raises_the_sources_errors(tmp_path, caplog):
    path = write_video(tmp_path / "clip.avi", 12)
    corrupt_mjpeg_frame(path, 5)
    with Prefetched(VideoSource(path)) as src:
        assert (src.name, src.fps, src.live) == (str(path), pytest.approx(10), False)
        assert [number_of(f) for f in src] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
        assert src.read() is None and not src._thread.is_alive()
    assert len(warnings_in(caplog, "undecodable")) == 1  # logged from the reader thread, once

    class Failing(ImageDirSource):
        def read(self):
            raise OSError("disk gone")

    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", numbered_frame(1))[1].tobytes())
    src = Prefetched(Failing(tmp_path))
    with pytest.raises(OSError, match="disk gone"):
        src.read()
    assert src.read() is None
    src.close()


def test_prefetched_close_stops_the_reader_and_closes_the_source(fake_camera):
    fake_camera.script(1000)
    src = Prefetched(CameraSource(0))
    assert src.live and src.read() is not None
    src.close()
    assert not src._thread.is_alive() and src.source.closed and src.read() is None
    assert fake_camera.instances[-1].released


def test_sample_clip_credits_every_photo():
    """The CC BY 2.0 photos are attributed in the clip's JSON (and samples/README.md), the rest too."""
    info = sample.sample_info()
    credits = {p["name"]: p["credit"] for p in info["photos"]}
    assert len(credits) == len(info["photos"]) and all(credits.values())
    for name in ("china", "flower"):
        assert "CC BY 2.0" in credits[name] and "creativecommons.org/licenses/by/2.0" in credits[name]
    readme = (Path(__file__).parents[1] / "samples" / "README.md").read_text()
    assert readme.count("CC BY 2.0") >= 2 and (Path(__file__).parents[1] / "LICENSE").read_text().startswith(
        " " * 33 + "Apache License")
