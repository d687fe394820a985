"""`stream.pipeline.CalibrationPipeline` on its own, with a stand-in serving model: when serving updates are
checked, installed, refused and replaced, all by frame index."""
import numpy as np

from edge_cbn.stream.pipeline import CalibrationPipeline, CalibrationResult

LAG = 2


class Serving:
    """What the pipeline uses of a `NoisyModel`: three states, each an interpreter stand-in (the statistics'
    tag it was built with); a state built with the tag "bad" gives non-finite outputs."""

    def __init__(self):
        self.states, self.num_threads, self.tag = 3, 1, "exported"
        self.served = ["exported"] * 3
        self.builds = []

    def twin(self):
        twin = Serving()
        twin.builds = self.builds  # one log of what the worker built
        return twin

    def stats(self):
        return {"bn": self.tag}

    def prepare(self, stats):
        self.tag = stats["bn"]

    def build_state(self, j):
        self.builds.append((self.tag, j))
        return self.tag

    def probe_ok(self, state, probe):
        return state != "bad"

    def drop(self, j):
        self.served[j] = None

    def install(self, j, state, stats=None):
        if stats is not None:
            self.tag = stats["bn"]
        if state is not None:
            self.served[j] = state


def run(tags, frames=40):
    """Calibration frames 0, 1, 2, ... each bringing serving statistics tagged tags[i] (the one tagged "warm"
    ends the warm-up); returns the serving model's states at every frame, what was probed and refused."""
    serving, probed, refused = Serving(), [], []

    def calibrate(i, fi, x, serve):
        result = CalibrationResult(i, True, 1.0, tags[i] == "warm", "", 0, 0)
        result.update = serve({"bn": tags[i]}, x, tags[i] == "warm")
        return result

    pipeline = CalibrationPipeline(calibrate, serving, lag=LAG, background=False,
                                   on_probed=lambda u: probed.append((u.stats["bn"], u.warmed)),
                                   on_refused=lambda u, i: refused.append((u.stats["bn"], i)))
    served = []
    for i in range(frames):
        pipeline.sync(i)
        if i < len(tags):
            pipeline.submit(i, i, np.zeros(3))
        served.append(list(serving.served))
    return served, probed, refused, serving.builds


def test_an_update_installs_one_state_at_a_time_checked_on_its_first():
    served, probed, refused, builds = run(["a"])
    # seen at frame 2, state j dropped at 2 + 2j and rebuilt, serving from 2 + 2(j + 1)
    assert served[2] == [None, "exported", "exported"] and served[4] == ["a", None, "exported"]
    assert served[8] == ["a", "a", "a"] and probed == [("a", False)] and refused == []
    assert builds == [("a", 0), ("a", 1), ("a", 2)]  # no model built only to be checked


def test_a_refused_update_ends_at_state_0_with_the_statistics_serving():
    served, probed, refused, builds = run(["bad"])
    assert refused == [("bad", 4)] and probed == []
    assert builds == [("bad", 0), ("exported", 0)]  # state 0 built again with what serves, nothing more
    assert all(states == ["exported"] * 3 or states == [None, "exported", "exported"] for states in served)
    assert served[-1] == ["exported"] * 3


def test_a_waiting_update_replaced_by_a_newer_one_passes_on_the_end_of_the_warm_up():
    """"warm" waits while "a" is installed and is replaced by "b": "b" ends the warm-up in its place (the save
    that the warm-up's end forces must not be lost)."""
    served, probed, refused, _ = run(["a", "warm", "b"])
    assert probed == [("a", False), ("b", True)] and refused == []
    assert served[-1] == ["b", "b", "b"]
