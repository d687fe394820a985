"""Hostile and damaged frame sources, each run in a forked child within the harness's time and memory
bounds: a source is either refused at open with one line naming it, or streams every frame that decodes,
in order, with the damage skipped and counted.  FFmpeg's own log stays off stderr unless --debug."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_cbn.stream.sources import ImageDirSource, VideoSource
from media import (corrupt_mjpeg_frames, forge_avi_frame_count, jpeg_header, number_of, numbered_frame, png_header,
                   write_video)

from .harness import run_case

pytestmark = pytest.mark.hardening


def stream_all(source, expected_indices, expected_skipped, concealed=()):
    """Read `source` to its end and check what came: raises AssertionError (the case's "error") if not.
    `concealed`: frames the decoder delivers damaged (patched from the previous one), not skipped."""
    with source as src:
        got = [(src.index, number_of(frame)) for frame in src]
    indices = [i for i, _ in got]
    assert indices == list(expected_indices), f"frames {indices} != {list(expected_indices)}"
    assert all(n == i % 32 for i, n in got if i not in concealed), "a frame came with the wrong picture"
    assert src.skipped == expected_skipped, f"skipped {src.skipped} != {expected_skipped}"


def truncated(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    return path


def damaged_mp4(path):
    """An MPEG-4 file with 30 % of its bytes, in the middle, replaced by random ones."""
    write_video(path, 100, "mp4v")
    data = bytearray(path.read_bytes())
    begin, end = int(len(data) * 0.3), int(len(data) * 0.6)
    data[begin:end] = np.random.default_rng(1).integers(0, 256, end - begin, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def file(path, data):
    path.write_bytes(data)
    return path


def avi(tmp, n, bad=()):
    return corrupt_mjpeg_frames(write_video(tmp / "clip.avi", n), bad)


def fifo(path):
    os.mkfifo(path)
    return path


# name: (make the file in a folder, expected: "refused" with a reason, or (frame indices, skipped))
VIDEOS = {
    "empty file": (lambda t: file(t / "empty.avi", b""), "cannot open"),
    "text named .mp4": (lambda t: file(t / "notes.mp4", b"not a video"), "cannot open"),
    "random bytes": (lambda t: file(t / "r.avi", os.urandom(4096)), "cannot open"),
    "headers only": (lambda t: truncated(write_video(t / "h.avi", 30), 0.05), "cannot open"),
    "mp4 cut short (no moov)": (lambda t: truncated(write_video(t / "c.mp4", 30, "mp4v"), 0.5), "cannot open"),
    "every frame corrupt": (lambda t: avi(t, 30, range(30)), "no decodable video frame"),
    "a directory": (lambda t: t, "not a regular file"),
    "a fifo (would block)": (lambda t: fifo(t / "pipe.avi"), "not a regular file"),
    "/dev/zero": (lambda t: Path("/dev/zero"), "not a regular file"),
    "dangling symlink": (lambda t: (t / "l.avi").symlink_to(t / "gone.avi") or t / "l.avi", "not found"),
    "one corrupt frame": (lambda t: avi(t, 60, [7]), ([*range(7), *range(8, 60)], 1)),
    "stretch of 26 (the old limit)": (lambda t: avi(t, 60, range(10, 36)), ([*range(10), *range(36, 60)], 26)),
    "stretch of 500 in 600": (lambda t: avi(t, 600, range(50, 550)), ([*range(50), *range(550, 600)], 500)),
    "every other frame": (lambda t: avi(t, 60, range(1, 60, 2)), (range(0, 60, 2), 29)),
    "first 40 of 60": (lambda t: avi(t, 60, range(40)), (range(40, 60), 40)),
    "last 30 of 60": (lambda t: avi(t, 60, range(30, 60)), (range(30), 0)),
    "three stretches": (lambda t: avi(t, 120, [*range(5, 40), *range(50, 51), *range(60, 110)]),
                        ([*range(5), *range(40, 50), *range(51, 60), *range(110, 120)], 86)),
    "frame count forged to 1e9": (lambda t: forge_avi_frame_count(write_video(t / "f.avi", 30), 10 ** 9),
                                  (range(30), 0)),
    "frame count forged to 5": (lambda t: forge_avi_frame_count(avi(t, 60, range(10, 20)), 5),
                                ([*range(10), *range(20, 60)], 10)),
    "avi cut at 2/3": (lambda t: truncated(write_video(t / "t.avi", 60), 2 / 3), (range(34), 0)),
    "mp4 with 30 % garbage": (lambda t: damaged_mp4(t / "g.mp4"), ([*range(37), *range(75, 100)], 38, {36})),
}


@pytest.mark.parametrize("name", VIDEOS)
def test_damaged_or_hostile_video(tmp_path, name):
    make, expected = VIDEOS[name]
    path = make(tmp_path)
    if isinstance(expected, str):
        result = run_case(VideoSource, path)
        assert result.ok_refusal(path) and expected in result.message, result
    else:
        result = run_case(lambda: stream_all(VideoSource(path), *expected))
        assert result.kind == "loaded", result
    assert result.seconds < 5 and result.added_rss_mb < 200, result


def image_folder(tmp, good=3):
    for i in range(good):
        cv2.imwrite(str(tmp / f"good_{i}.png"), numbered_frame(i))
    bad = {"zero.png": b"", "text.jpg": b"hello", "huge.png": png_header(100_000, 100_000),
           "huge.jpg": jpeg_header(60_000, 60_000), "big_claim.png": png_header(30_000, 30_000),
           "trunc.png": cv2.imencode(".png", numbered_frame(9))[1].tobytes()[:40], "notes.txt": b"x"}
    for name, data in bad.items():
        (tmp / name).write_bytes(data)
    (tmp / "dir.png").mkdir()  # not files: never tried
    os.mkfifo(tmp / "pipe.jpg")
    (tmp / "dangling.png").symlink_to(tmp / "gone.png")
    return len(bad)


def test_image_folder_with_bad_files_streams_the_good_ones_and_counts_the_rest(tmp_path):
    bad = image_folder(tmp_path)

    def check():
        with ImageDirSource(tmp_path) as src:
            frames = [number_of(f) for f in src]
        assert frames == [0, 1, 2] and src.skipped == bad, (frames, src.skipped)

    result = run_case(check)
    assert result.kind == "loaded" and result.seconds < 5 and result.added_rss_mb < 200, result


def test_image_folder_with_nothing_readable_is_refused(tmp_path):
    image_folder(tmp_path, good=0)
    result = run_case(ImageDirSource, tmp_path)
    assert result.ok_refusal(tmp_path) and "no readable image" in result.message, result


QUIET_RUN = """
import logging, sys
from edge_cbn.stream.sources import VideoSource
with VideoSource(sys.argv[1]) as src:
    print(sum(1 for _ in src), src.skipped)
"""


@pytest.mark.parametrize("debug", ["", "1"])
def test_ffmpeg_log_is_quiet_unless_debug(tmp_path, debug):
    """Without --debug, stderr is our one warning for the stretch; with it, FFmpeg's own lines too."""
    path = avi(tmp_path, 200, range(20, 160))
    env = {**os.environ, "EDGE_CBN_DEBUG": debug}
    env.pop("OPENCV_FFMPEG_LOGLEVEL", None)
    run = subprocess.run([sys.executable, "-c", QUIET_RUN, str(path)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.split() == ["60", "140"], run.stderr
    ffmpeg_lines = [line for line in run.stderr.splitlines() if line.startswith("[mjpeg @")]
    ours = [line for line in run.stderr.splitlines() if not line.startswith("[mjpeg @")]
    assert ours == [f"{path}: skipped 140 undecodable frame(s), 20-159; going on from frame 160"]
    assert (len(ffmpeg_lines) >= 140) if debug else not ffmpeg_lines
