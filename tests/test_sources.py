"""Frame sources: corrupt video frames, unreadable images, missing paths, camera reconnects, looping."""
import itertools
import logging
import sys
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_cbn.runtime.errors import BadInput
from edge_cbn.stream import sample
from edge_cbn.stream.sources import CameraSource, ImageDirSource, Prefetched, SourceError, VideoSource, open_source
from media import H, W, FakeCapture, corrupt_mjpeg_frames, forge_avi_frame_count, number_of, numbered_frame, write_video


def warnings_in(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_video_with_corrupt_frame_warns_and_goes_on(tmp_path, caplog):
    path = write_video(tmp_path / "clip.avi", 12)
    corrupt_mjpeg_frames(path, [5])
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
    assert "1 undecodable frame(s), 5-5; going on from frame 6" in warnings_in(caplog, "undecodable")[0]


def test_mp4_with_damaged_bytes_streams_to_the_end(tmp_path):
    path = write_video(tmp_path / "clip.mp4", 30, "mp4v")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(200)
    path.write_bytes(bytes(data))
    with VideoSource(path) as src:
        frames = list(src)
    assert len(frames) >= 25 and number_of(frames[-1]) == 29


def test_corrupt_stretch_of_any_length_is_skipped_with_one_warning(tmp_path, caplog):
    """140 undecodable frames in a row (the old limit took 26 as the end): all 60 good frames come back,
    in order, with the file's own numbering."""
    path = corrupt_mjpeg_frames(write_video(tmp_path / "clip.avi", 200), range(20, 160))
    with VideoSource(path) as src:
        got = [(number_of(f), src.index) for f in src]
    assert [i for _, i in got] == [*range(20), *range(160, 200)]
    assert [n for n, _ in got] == [i % 32 for _, i in got]
    assert src.skipped == 140 and src.expected_frames == 200
    assert warnings_in(caplog, "undecodable") == [
        f"{path}: skipped 140 undecodable frame(s), 20-159; going on from frame 160"]
    assert not warnings_in(caplog, "declares")  # the end was the true end


def test_end_of_file_is_told_from_a_stretch_by_the_declared_count(tmp_path, caplog):
    damaged_end = corrupt_mjpeg_frames(write_video(tmp_path / "end.avi", 60), range(30, 60))
    with VideoSource(damaged_end) as src:
        assert len(list(src)) == 30 and src.read() is None
    assert warnings_in(caplog, "declares") == [f"{damaged_end}: no decodable frame after frame 29 of the 60 "
                                               "the file declares (truncated?)"]
    full = write_video(tmp_path / "full.avi", 60).read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(full[:len(full) * 2 // 3])  # a copy cut short: the header still says 60
    with VideoSource(truncated) as src:
        frames = [number_of(f) for f in src]
    assert 30 <= len(frames) < 60 and frames == [i % 32 for i in range(len(frames))]


def test_forged_frame_count_cannot_make_the_end_endless(tmp_path):
    path = forge_avi_frame_count(write_video(tmp_path / "clip.avi", 30), 10 ** 9)
    with VideoSource(path) as src:
        assert src.expected_frames == path.stat().st_size // 4  # believed up to a frame per 4 bytes
        assert len(list(src)) == 30


def test_looping_over_damage_warns_once_and_counts_every_pass(tmp_path, caplog):
    path = corrupt_mjpeg_frames(write_video(tmp_path / "clip.avi", 40), range(10, 40))
    with VideoSource(path, loop=True) as src:
        got = [src.index for _ in itertools.islice(src, 35)]
    assert got == [*range(10)] * 3 + [*range(5)] and src.passes == 3
    assert src.skipped == 0  # a stretch running to the end is not a skip: nothing decodable followed it
    assert len(warnings_in(caplog, "declares")) == 1
    path = corrupt_mjpeg_frames(write_video(tmp_path / "mid.avi", 20), range(5, 10))
    caplog.clear()
    with VideoSource(path, loop=True) as src:
        assert len(list(itertools.islice(src, 45))) == 45 and src.passes == 2
    assert src.skipped == 15 and len(warnings_in(caplog, "undecodable")) == 1


def test_video_without_a_decodable_frame_is_refused_at_open(tmp_path):
    path = corrupt_mjpeg_frames(write_video(tmp_path / "clip.avi", 10), range(10))
    with pytest.raises(SourceError, match="no decodable video frame") as error:
        VideoSource(path)
    assert str(error.value).startswith(f"{path}: ")


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


@pytest.mark.parametrize("realtime, interval", [(True, 0.1), (40.0, 0.025)])  # the file's 10 fps, or a camera's rate
def test_realtime_paces_to_file_fps(tmp_path, realtime, interval):
    now, sleeps = [0.0], []

    def sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds

    path = write_video(tmp_path / "clip.avi", 4)
    with VideoSource(path, realtime=realtime, sleep=sleep, clock=lambda: now[0]) as src:
        assert len(list(src)) == 4
    assert sleeps == pytest.approx([interval] * 3)


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


def test_image_dir_with_nothing_readable_is_refused_at_open(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(SourceError, match="no readable image") as error:
        ImageDirSource(tmp_path, loop=True)
    assert isinstance(error.value, BadInput) and str(error.value).startswith(f"{tmp_path}: ")


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
    with pytest.raises(SourceError, match=r"^camera 7: cannot open /dev/video7"):
        open_source(camera="7")
    with pytest.raises(ValueError, match="camera and video"):
        open_source(camera=0, video="x.mp4")


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
    corrupt_mjpeg_frames(path, [5])
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


class StuckCapture(FakeCapture):
    """Delivers its frames, then a read that does not return until ``unstick`` is set (a hung driver)."""

    unstick = threading.Event()

    def read(self):
        if self.left:
            return super().read()
        StuckCapture.unstick.wait(10)
        return False, None


def test_camera_read_that_never_returns_is_reported_and_a_close_ends_the_wait(monkeypatch, caplog):
    monkeypatch.setattr(cv2, "VideoCapture", StuckCapture)
    FakeCapture.script(1)
    src = Prefetched(CameraSource(0, sleep=lambda s: None), stall_warning_s=0.3)
    assert src.read() is not None
    closer = threading.Timer(0.8, src.close)  # as SIGTERM's handler does for a live source
    closer.start()
    start = time.monotonic()
    assert src.read() is None
    waited = time.monotonic() - start
    StuckCapture.unstick.set()
    closer.join()
    assert 0.8 <= waited < 1.2 and src.source.closed
    assert warnings_in(caplog, "no frame for") == ["camera 0: no frame for 0.3 s; still waiting (SIGTERM or "
                                                   "Ctrl-C stops)"]


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
